"""Teacher data pages and the teacher/generate services' validation."""
from __future__ import annotations

import pytest
from django.urls import reverse

from tests.generation_fixtures import add_queries


@pytest.fixture
def queries(project):
    return add_queries(project, [("Where is my card?", "card_arrival"), ("I lost my card", "lost_or_stolen_card")])


def test_teacher_add_edit_and_generate_from_the_browser(owner_client, project, queries):
    from projects.models import GenerationRun, Job, Teacher

    page = reverse("generation_page", kwargs={"slug": project.slug})
    r = owner_client.get(page)
    assert r.status_code == 200 and "No teacher yet" in r.content.decode()
    r = owner_client.post(reverse("teacher_new", kwargs={"slug": project.slug}), {
        "name": "gpt", "provider": "openai", "model": "gpt-4o-mini", "base_url": "https://api.openai.com/v1",
        "api_key_env": "OPENAI_API_KEY", "temperature": "0.3", "max_tokens": "64", "timeout_s": "30",
        "price_in_per_1m": "0.15", "price_out_per_1m": "0.60"})
    assert r.status_code == 302
    t = Teacher.objects.get(project=project, name="gpt")
    assert (t.provider, t.model, t.api_key_env, t.max_tokens, str(t.price_out_per_1m)) == (
        "openai", "gpt-4o-mini", "OPENAI_API_KEY", 64, "0.600000")
    # a key pasted where the variable name goes is refused, with the field named
    r = owner_client.post(reverse("teacher_new", kwargs={"slug": project.slug}), {
        "name": "bad", "provider": "openai", "model": "m", "api_key_env": "sk-abc123", "temperature": "0.3",
        "max_tokens": "64", "timeout_s": "30", "price_in_per_1m": "0", "price_out_per_1m": "0"})
    assert r.status_code == 200 and "api_key_env: give the NAME" in r.content.decode()
    assert not Teacher.objects.filter(name="bad").exists()
    r = owner_client.post(reverse("teacher_edit", kwargs={"slug": project.slug, "teacher_id": t.pk}), {
        "name": "gpt", "model": "gpt-4o", "base_url": "", "api_key_env": "OPENAI_API_KEY", "temperature": "0.7",
        "max_tokens": "128", "timeout_s": "30", "price_in_per_1m": "2.5", "price_out_per_1m": "10"})
    assert r.status_code == 302
    t.refresh_from_db()
    assert (t.model, t.temperature, t.max_tokens) == ("gpt-4o", 0.7, 128)

    r = owner_client.post(reverse("generation_start", kwargs={"slug": project.slug}),
                          {"teachers": [t.pk], "samples_per_query": "2", "concurrency": "8", "budget_usd": "1.5", "limit": "1"})
    run = GenerationRun.objects.get(project=project)
    assert r.status_code == 302 and r["Location"] == reverse("generation_run", kwargs={"slug": project.slug, "run_id": run.pk})
    assert (run.samples_per_query, run.concurrency, float(run.budget_usd), run.limit) == (2, 8, 1.5, 1)
    assert run.job.kind == "generation" and run.job.status == "queued" and run.options["split"] == "train"
    body = owner_client.get(page).content.decode()
    assert f"#{run.pk}" in body and 'hx-trigger="every 2s"' in body
    body = owner_client.get(r["Location"]).content.decode()
    assert "Cancel</button>" in body and "No samples" in body
    stats = owner_client.get(reverse("generation_run_stats", kwargs={"slug": project.slug, "run_id": run.pk}))
    assert 'hx-trigger="every 2s"' in stats.content.decode()
    # Cancel while queued: the job and the run end at once; Resume then queues a new job
    owner_client.post(reverse("generation_run_cancel", kwargs={"slug": project.slug, "run_id": run.pk}))
    run.refresh_from_db()
    assert run.status == "cancelled" and run.job.status == "cancelled" and run.stop_reason == "cancelled by user"
    old_job = run.job_id
    owner_client.post(reverse("generation_run_resume", kwargs={"slug": project.slug, "run_id": run.pk}), {"budget_usd": "3"})
    run.refresh_from_db()
    assert run.job_id != old_job and run.status == "queued" and float(run.budget_usd) == 3.0 and not run.stop_reason
    assert Job.objects.get(pk=old_job).status == "cancelled"


def test_samples_list_with_checks_and_filters(owner_client, project, queries):
    from projects.models import GenerationRun, Sample
    from projects.services.generation import teacher_create

    t = teacher_create(project=project, name="local", provider="transformers")
    run = GenerationRun.objects.create(project=project, status="succeeded", accepted=1, rejected=1)
    run.teachers.set([t])
    Sample.objects.create(run=run, query=queries[0], teacher=t, response="card_arrival", status="accepted",
                          checks=[{"name": "label_in_set", "passed": True, "reason": "card_arrival"}],
                          prompt=[{"role": "user", "content": "Where is my card?"}], label_probs={"card_arrival": 0.9})
    Sample.objects.create(run=run, query=queries[1], teacher=t, response="pizza", status="rejected",
                          checks=[{"name": "label_in_set", "passed": False, "reason": "'pizza' is not one of the 3 labels"}],
                          failed_checks=["label_in_set"])
    url = reverse("generation_run", kwargs={"slug": project.slug, "run_id": run.pk})
    body = owner_client.get(url).content.decode()
    assert "pizza" in body and "card_arrival" in body and "is not one of the 3 labels" in body and "Resume</button>" in body
    assert "label_in_set</a></td><td class=\"num\">1</td>" in body  # rejected by check
    body = owner_client.get(url + "?status=accepted").content.decode()
    assert "pizza" not in body and "0.900" in body
    body = owner_client.get(url + "?check=label_in_set").content.decode()
    assert "pizza" in body and "Where is my card?" not in body


def test_viewer_sees_but_cannot_generate(client, viewer, project, queries):
    from projects.models import GenerationRun
    from projects.services.generation import teacher_create

    t = teacher_create(project=project, name="local", provider="transformers")
    client.force_login(viewer)
    body = client.get(reverse("generation_page", kwargs={"slug": project.slug})).content.decode()
    assert "local" in body and ">Generate</button>" not in body
    client.post(reverse("generation_start", kwargs={"slug": project.slug}), {"teachers": [t.pk], "samples_per_query": 1,
                                                                             "concurrency": 4})
    assert not GenerationRun.objects.exists()


def test_generation_start_validates_its_input(project, queries, owner):
    from projects.services import InvalidInput, InvalidState
    from projects.services.generation import generation_start, teacher_create

    with pytest.raises(InvalidState, match="no teacher"):
        generation_start(project=project, user=owner)
    teacher_create(project=project, name="local", provider="transformers")
    with pytest.raises(InvalidInput, match="samples_per_query"):
        generation_start(project=project, samples_per_query=0)
    with pytest.raises(InvalidInput, match="teacher: no teacher named 'nope'"):
        generation_start(project=project, teachers=["nope"])
    with pytest.raises(InvalidState, match="no golden queries"):
        generation_start(project=project, split="golden")
    with pytest.raises(InvalidInput, match="an ensemble needs at least two"):
        teacher_create(project=project, name="ens", provider="ensemble", members=["local"])
    with pytest.raises(InvalidInput, match="already has a teacher named"):
        teacher_create(project=project, name="local", provider="transformers")


def test_resume_with_a_non_finite_or_huge_budget_is_a_message_not_a_500(owner_client, project, queries, owner):
    from projects.models import GenerationRun
    from projects.services.generation import generation_cancel, generation_start, teacher_create

    teacher_create(project=project, name="local", provider="transformers")
    run = generation_start(project=project, user=owner, budget_usd="2")
    generation_cancel(run=run, user=owner)
    run.refresh_from_db()
    old_job = run.job_id
    url = reverse("generation_run_resume", kwargs={"slug": project.slug, "run_id": run.pk})
    for budget, message in (("NaN", "budget_usd: Enter a number."), ("Infinity", "budget_usd: Enter a number."),
                            ("-Infinity", "budget_usd: Enter a number."), ("1e999999", "budget_usd: Ensure that there are no more than 12 digits in total."),
                            ("123456789012", "budget_usd: Ensure that there are no more than 8 digits before the decimal point."),
                            ("0", "budget_usd: Ensure this value is greater than or equal to 0.0001.")):
        r = owner_client.post(url, {"budget_usd": budget}, follow=True)
        assert r.redirect_chain == [(reverse("generation_run", kwargs={"slug": project.slug, "run_id": run.pk}), 302)]
        assert [str(m) for m in r.context["messages"]] == [message], budget
    run.refresh_from_db()
    assert run.job_id == old_job and float(run.budget_usd) == 2.0 and run.status == "cancelled"
    assert GenerationRun.objects.count() == 1


def test_services_refuse_non_finite_and_out_of_range_numbers(project, queries, owner):
    from projects.services import InvalidInput
    from projects.services.evaluation import evaluation_start
    from projects.services.generation import generation_resume, generation_start, teacher_create

    with pytest.raises(InvalidInput, match=r"^price_in_per_1m: Decimal\('Infinity'\) is not a finite number$"):
        teacher_create(project=project, name="x", provider="transformers", price_in_per_1m=__import__("decimal").Decimal("Infinity"))
    with pytest.raises(InvalidInput, match=r"^price_out_per_1m: 1e\+20 is too large"):
        teacher_create(project=project, name="x", provider="transformers", price_out_per_1m=1e20)
    teacher_create(project=project, name="local", provider="transformers")
    for budget in (float("nan"), float("inf"), "NaN", "-Infinity"):
        with pytest.raises(InvalidInput, match=r"^budget_usd: .* is not a finite number$"):
            generation_start(project=project, user=owner, budget_usd=budget)
    with pytest.raises(InvalidInput, match=r"^budget_usd: 1e999999 is too large \(the limit is below 100,000,000\)$"):
        generation_start(project=project, user=owner, budget_usd="1e999999")
    with pytest.raises(InvalidInput, match=r"^budget_usd: must be more than 0, got 0$"):
        generation_start(project=project, user=owner, budget_usd=0)
    with pytest.raises(InvalidInput, match=r"^limit: 2147483648 is outside 1-2147483647$"):
        generation_start(project=project, user=owner, limit=2**31)
    run = generation_start(project=project, user=owner)
    from projects.services.generation import generation_cancel

    generation_cancel(run=run, user=owner)
    with pytest.raises(InvalidInput, match=r"^budget_usd: 'NaN' is not a finite number$"):
        generation_resume(run=run, user=owner, budget_usd="NaN")
    for price in (float("inf"), float("nan"), 1e7):
        with pytest.raises(InvalidInput, match=r"^price_per_hour_usd: must be between 0 and 1000000"):
            evaluation_start(project=project, user=owner, options={"price_per_hour_usd": price})
    with pytest.raises(InvalidInput, match=r"^limit: 10000000000 is outside 1-2147483647$"):
        evaluation_start(project=project, user=owner, options={"limit": 10**10})
