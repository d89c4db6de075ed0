"""Diverse query selection on generation runs (issue #15, part 1): the option on the service and
the CLI, the selection computed once by the real worker (bundled MiniLM + k-means) and stored,
the near-duplicate report on the run page, and a resume that asks the same queries."""
from __future__ import annotations

import pytest

from tests.conftest import wait_job
from tests.generation_fixtures import add_queries, banking77_rows, banking_project
from tests.test_cli import distill, last_json

NEAR_DUPLICATES = ["Where is my new card? It has not arrived yet.", "where is my new card?? it has not arrived yet"]


def test_generation_start_validates_selection(db, team, owner):
    from projects.services import InvalidInput
    from projects.services.generation import generation_start, teacher_create

    project = banking_project(team, owner)
    add_queries(project, [("card missing", "card_arrival"), ("exchange rate?", "exchange_rate")])
    teacher_create(project=project, name="smol", provider="transformers", user=owner)
    with pytest.raises(InvalidInput, match="selection: 'random'"):
        generation_start(project=project, user=owner, limit=1, selection="random")
    with pytest.raises(InvalidInput, match="duplicate_threshold"):
        generation_start(project=project, user=owner, limit=1, selection="diverse", duplicate_threshold=1.5)
    run = generation_start(project=project, user=owner, limit=1, selection="diverse", seed=3)
    assert run.options["selection"] == "diverse" and run.options["seed"] == 3
    assert run.options["duplicate_threshold"] == 0.95 and "selected_query_ids" not in run.options
    first = generation_start(project=project, user=owner, limit=1)
    assert first.pk != run.pk and "selection" not in first.options


@pytest.mark.timeout(600)
def test_diverse_run_asks_the_chosen_queries_and_resume_reuses_them(celery_worker, team, owner, owner_client,
                                                                    shared_data):
    from projects.models import GenerationRun, Sample
    from projects.services.generation import generation_resume, teacher_create
    from workers.pipeline.diversity import embed_texts, select_diverse

    project = banking_project(team, owner)
    rows = banking77_rows(shared_data, per_intent=4)  # ordered by intent: the first 4 are card_arrival
    queries = add_queries(project, rows + [(t, "card_arrival") for t in NEAR_DUPLICATES])
    intent_of = {q.pk: q.reference for q in queries}
    teacher_create(project=project, name="smol", provider="transformers", user=owner)

    r = distill("generate", "--project", project.slug, "--limit", "4", "--select", "diverse", "--wait", "--json",
                timeout=540)
    assert r.returncode == 0, r.stderr
    out = last_json(r)
    assert out["status"] == "succeeded" and out["selection"] == "diverse" and out["queries"] == 4
    assert out["near_duplicates"]["groups"] == 1 and out["near_duplicates"]["scanned"] == 18
    run = GenerationRun.objects.get(pk=out["run"])
    chosen = run.options["selected_query_ids"]
    assert len(chosen) == 4 and chosen == sorted(chosen)
    samples = list(Sample.objects.filter(run=run))
    assert sorted(s.query_id for s in samples) == chosen  # exactly the chosen ones, once each
    first_ids = sorted(intent_of)[:4]
    assert {intent_of[q] for q in first_ids} == {"card_arrival"}
    assert len({intent_of[q] for q in chosen}) >= 3
    nd = run.options["near_duplicates"]
    assert nd["pairs"] == 1 and [sorted(q["text"] for q in g) for g in nd["examples"]] == [sorted(NEAR_DUPLICATES)]

    page = owner_client.get(f"/p/{project.slug}/generation/runs/{run.pk}/").content.decode()
    assert "Selection: <strong>diverse</strong>" in page
    assert "<strong>1</strong> group" in page and "it has not arrived yet" in page

    # Resume after two answers are lost, with new queries in the split meanwhile: the stored
    # selection is asked again (a fresh selection would now pick one of the new queries).
    extra = add_queries(project, banking77_rows(shared_data, per_intent=4, intents=("atm_support",)))
    lost = sorted(s.pk for s in samples)[:2]
    Sample.objects.filter(pk__in=lost).update(status="failed")
    pool = list(project.queries.filter(split="train", golden=False).order_by("id").values_list("id", "text"))
    fresh = {pool[i][0] for i in select_diverse(embed_texts([t for _, t in pool]), 4, seed=0)}
    assert fresh & {q.pk for q in extra}
    run = generation_resume(run=run, user=owner)
    job = wait_job(run.job.pk, timeout=300)
    assert job.status == "succeeded", (job.message, job.error)
    run.refresh_from_db()
    assert run.options["selected_query_ids"] == chosen
    after = list(Sample.objects.filter(run=run))
    assert sorted(s.query_id for s in after) == chosen and not {s.pk for s in after} & set(lost)
    assert run.accepted + run.rejected == 4 and run.failed == 0


def test_generate_form_takes_the_selection(owner_client, team, owner):
    from projects.models import GenerationRun
    from projects.services.generation import teacher_create

    project = banking_project(team, owner)
    add_queries(project, [("card missing", "card_arrival"), ("exchange rate?", "exchange_rate")])
    teacher_create(project=project, name="smol", provider="transformers", user=owner)
    page = owner_client.get(f"/p/{project.slug}/generation/").content.decode()
    assert '<option value="diverse">' in page and 'name="duplicate_threshold"' in page
    url = f"/p/{project.slug}/generation/start/"
    base = {"limit": 1, "samples_per_query": 1, "concurrency": 4}
    r = owner_client.post(url, {**base, "selection": "nearest"}, follow=True)
    assert "selection: Select a valid choice" in r.content.decode() and GenerationRun.objects.count() == 0
    r = owner_client.post(url, {**base, "selection": "diverse", "duplicate_threshold": 0.9}, follow=True)
    run = GenerationRun.objects.get()
    assert (run.options["selection"], run.options["duplicate_threshold"], run.limit) == ("diverse", 0.9, 1)
    body = r.content.decode()
    assert "Selection: <strong>diverse</strong>" in body and "choosing" in body
