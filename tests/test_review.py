"""Review by hand: queue and filters, claims, decisions, conflicts, undo, bulk, audit share,
history, viewers read-only, escaping, and the page's htmx item swap."""
import threading
from datetime import timedelta

import psycopg
import pytest
from django.db import connection
from django.urls import reverse
from django.utils import timezone

from projects.models import ReviewDecision, Sample
from projects.services import InvalidState, NotAllowed
from projects.services.review import (
    EditFailsChecks, ReviewConflict, ReviewFilters, audit_selected, review_audit_configure, review_audit_mark,
    review_bulk, review_bulk_count, review_claim_next, review_decide, review_queue, review_recheck, review_undo,
)
from tests.review_data import make_samples

LABEL_FAIL = ("label_in_set", "not one of the labels")
LEN_FAIL = ("max_length", "answer is 900 characters, limit 200")


@pytest.fixture
def rejected(project):
    return make_samples(project, [
        {"query": "My card hasn't arrived yet", "response": "card arival", "failed": [LABEL_FAIL],
         "label_probs": {"card_arrival": 0.7, "lost_or_stolen_card": 0.2, "refund_not_showing_up": 0.1}},
        {"query": "I lost my card in Paris", "response": "lost card, " * 90, "failed": [LEN_FAIL], "teacher": "llama"},
        {"query": "Where is my refund?", "response": "refund?", "failed": [LABEL_FAIL, LEN_FAIL]},
        {"query": "Card arrived, thanks", "response": "card_arrival", "parsed": "card_arrival"},  # accepted
    ])


def test_queue_holds_unreviewed_rejected_and_filters(project, rejected):
    ids = lambda f: list(review_queue(project=project, filters=f).values_list("id", flat=True))
    r0, r1, r2, acc = rejected
    assert ids(ReviewFilters()) == [r0.pk, r1.pk, r2.pk]
    assert ids(ReviewFilters(check="label_in_set")) == [r0.pk, r2.pk]
    assert ids(ReviewFilters(check="max_length")) == [r1.pk, r2.pk]
    assert ids(ReviewFilters(teacher_id=r1.teacher_id)) == [r1.pk]
    assert ids(ReviewFilters(text="PARIS")) == [r1.pk]
    assert ids(ReviewFilters(text="refund?")) == [r2.pk]  # matches the answer too
    assert ids({"mode": "rejected", "check": "label_in_set", "q": "card"}) == [r0.pk]


def test_two_reviewers_get_different_items_and_a_reload_keeps_mine(project, rejected, owner, member):
    a = review_claim_next(project=project, user=owner)
    b = review_claim_next(project=project, user=member)
    assert (a.pk, b.pk) == (rejected[0].pk, rejected[1].pk)
    assert a.claimed_by_id == owner.pk and a.claimed_until > timezone.now() + timedelta(minutes=4)
    assert review_claim_next(project=project, user=owner).pk == a.pk  # reload: same item
    # An expired claim frees the item for the next reviewer.
    Sample.objects.filter(pk=a.pk).update(claimed_until=timezone.now() - timedelta(seconds=1))
    assert review_claim_next(project=project, user=member).pk == b.pk  # member still holds b
    Sample.objects.filter(pk=b.pk).update(claimed_until=None, claimed_by=None)
    third = review_claim_next(project=project, user=member)
    assert third.pk == a.pk and third.claimed_by_id == member.pk


@pytest.mark.django_db(transaction=True)
def test_claim_skips_a_row_locked_by_a_concurrent_claim(project, rejected, owner):
    """Another session in the middle of claiming item 1 (row locked) must not block or share it:
    SELECT ... FOR UPDATE SKIP LOCKED hands out item 2 at once."""
    s = connection.settings_dict
    conninfo = f"host={s['HOST'] or '127.0.0.1'} port={s['PORT'] or 5432} user={s['USER'] or 'postgres'} dbname={s['NAME']}"
    locked = threading.Event()
    release = threading.Event()

    def hold():
        with psycopg.connect(conninfo) as c:
            with c.transaction():
                c.execute("SELECT id FROM projects_sample WHERE id = %s FOR UPDATE", [rejected[0].pk])
                locked.set()
                release.wait(10)

    t = threading.Thread(target=hold)
    t.start()
    try:
        assert locked.wait(10)
        got = review_claim_next(project=project, user=owner)
        assert got.pk == rejected[1].pk
    finally:
        release.set()
        t.join()


def test_second_decision_on_same_version_conflicts_and_first_stands(project, rejected, owner, member):
    s = rejected[0]
    review_decide(sample=s, user=owner, decision="accept", expected_version=0)
    with pytest.raises(ReviewConflict) as exc:
        review_decide(sample=s, user=member, decision="reject", expected_version=0)
    assert "olivia accepted it first" in str(exc.value)
    s.refresh_from_db()
    assert (s.review_status, s.reviewed_by_id, s.version) == ("accepted", owner.pk, 1)
    assert ReviewDecision.objects.filter(sample=s).count() == 1


def test_edit_is_rechecked_before_save_and_original_kept(project, rejected, owner):
    s = rejected[0]
    with pytest.raises(EditFailsChecks) as exc:
        review_decide(sample=s, user=owner, decision="edit", edited_response="card arrived?", expected_version=0)
    assert [c["name"] for c in exc.value.checks if not c["passed"]] == ["label_in_set"]
    s.refresh_from_db()
    assert (s.review_status, s.edited_response, s.version) == (None, None, 0)

    saved = review_decide(sample=s, user=owner, decision="edit", edited_response="Card arrival", expected_version=0)
    assert (saved.review_status, saved.edited_response, saved.parsed, saved.response) == (
        "accepted", "Card arrival", "card_arrival", "card arival")
    d = ReviewDecision.objects.get(sample=s)
    assert (d.decision, d.original_response, d.edited_response, d.user_id) == ("edit", "card arival", "Card arrival", owner.pk)


def test_recheck_extraction_json_and_schema(team, owner):
    from projects.services.projects import project_create

    p = project_create(team=team, user=owner, name="Slots", task_type="extraction",
                       output_schema={"type": "object", "required": ["city"], "properties": {"city": {"type": "string"}}})
    checks, parsed = review_recheck(project=p, response='{"city": "Kyōto"}')
    assert all(c["passed"] for c in checks) and parsed == {"city": "Kyōto"}
    checks, _ = review_recheck(project=p, response='{"town": 1}')
    # The same checks as a teacher's answer (workers.pipeline.checks), less the finish reason.
    assert [(c["name"], c["passed"]) for c in checks] == [
        ("non_empty", True), ("length", True), ("refusal", True), ("unicode_escapes", True), ("json_schema", False)]
    assert "'city' is a required property" in checks[-1]["reason"]
    checks, _ = review_recheck(project=p, response="{city:")
    assert [(c["name"], c["passed"]) for c in checks][-1] == ("json_valid", False)
    checks, _ = review_recheck(project=p, response="   ")
    assert checks == [{"name": "non_empty", "passed": False, "reason": "the answer is empty"}]
    checks, _ = review_recheck(project=p, response="I'm sorry, I cannot help with that.")
    assert ("refusal", False) in [(c["name"], c["passed"]) for c in checks]


def test_undo_restores_previous_state_and_requeues(project, rejected, owner, member):
    s = rejected[0]
    review_decide(sample=s, user=owner, decision="edit", edited_response="card_arrival", expected_version=0)
    back = review_undo(project=project, user=owner)
    assert back.pk == s.pk
    assert (back.review_status, back.edited_response, back.parsed, back.reviewed_by_id, back.version) == (None, None, None, None, 2)
    assert back.claimed_by_id == owner.pk
    assert ReviewDecision.objects.get(sample=s).undone is True
    assert review_claim_next(project=project, user=owner).pk == s.pk
    with pytest.raises(InvalidState):
        review_undo(project=project, user=owner)
    # Undo refuses when someone decided after you.
    review_decide(sample=s, user=owner, decision="reject", expected_version=2)
    review_decide(sample=s, user=member, decision="accept", expected_version=3)
    with pytest.raises(ReviewConflict):
        review_undo(project=project, user=owner)
    s.refresh_from_db()
    assert (s.review_status, s.reviewed_by_id) == ("accepted", member.pk)


def test_bulk_decides_exactly_the_confirmed_count_and_undo_reverts_all(project, rejected, owner):
    f = ReviewFilters(check="label_in_set")
    assert review_bulk_count(project=project, filters=f) == 2
    with pytest.raises(ReviewConflict, match="2 samples match now, not the 3"):
        review_bulk(project=project, user=owner, filters=f, decision="reject", expected_count=3)
    assert Sample.objects.filter(review_status__isnull=False).count() == 0
    assert review_bulk(project=project, user=owner, filters=f, decision="reject", expected_count=2) == 2
    got = dict(Sample.objects.filter(review_status__isnull=False).values_list("id", "review_status"))
    assert got == {rejected[0].pk: "rejected", rejected[2].pk: "rejected"}
    assert ReviewDecision.objects.filter(decision="bulk_reject", user=owner).count() == 2
    assert review_undo(project=project, user=owner) == 2
    assert Sample.objects.filter(review_status__isnull=False).count() == 0
    assert review_bulk_count(project=project, filters=ReviewFilters()) == 3


def test_viewer_cannot_decide_undo_or_bulk(project, rejected, viewer):
    s = rejected[0]
    with pytest.raises(NotAllowed):
        review_decide(sample=s, user=viewer, decision="accept", expected_version=0)
    with pytest.raises(NotAllowed):
        review_bulk(project=project, user=viewer, filters=ReviewFilters(), decision="accept", expected_count=3)
    with pytest.raises(NotAllowed):
        review_undo(project=project, user=viewer)
    # A viewer looks at the next item without claiming it.
    assert review_claim_next(project=project, user=viewer).pk == s.pk
    s.refresh_from_db()
    assert (s.review_status, s.claimed_by_id, s.version) == (None, None, 0)


def test_audit_share_is_deterministic_and_fills_audit_queue(project, owner):
    picked = sum(audit_selected(sample_id=i, share=0.05) for i in range(1, 20001))
    assert 900 <= picked <= 1100  # 5 % of 20,000 = 1,000
    assert audit_selected(sample_id=12345, share=0.05) == audit_selected(sample_id=12345, share=0.05)
    samples = make_samples(project, [{"query": f"q{i}", "response": "card_arrival", "parsed": "card_arrival"} for i in range(60)])
    review_audit_configure(project=project, user=owner, share=0.25)
    expected = sorted(s.pk for s in samples if audit_selected(sample_id=s.pk, share=0.25))
    assert expected and len(expected) < 60
    got = list(review_queue(project=project, filters=ReviewFilters(mode="audit")).values_list("id", flat=True))
    assert got == expected
    # Incremental: new samples are drawn on the next mark, earlier ones are not redrawn.
    more = make_samples(project, [{"query": f"new{i}", "response": "card_arrival"} for i in range(40)])
    review_audit_mark(project=project)
    expected += sorted(s.pk for s in more if audit_selected(sample_id=s.pk, share=0.25))
    assert list(review_queue(project=project, filters=ReviewFilters(mode="audit")).values_list("id", flat=True)) == expected


# --- pages -------------------------------------------------------------------------------------

def test_page_escapes_teacher_html_and_shows_checks_and_probs(owner_client, project):
    evil = '<script>alert("x")</script><b>bold</b>'
    make_samples(project, [{"query": "Hi <img src=x onerror=alert(1)>", "response": evil, "failed": [LABEL_FAIL],
                            "label_probs": {"card_arrival": 0.61, "lost_or_stolen_card": 0.39}}])
    body = owner_client.get(reverse("review_page", kwargs={"slug": project.slug})).content.decode()
    assert "<script>alert" not in body and "<b>bold</b>" not in body and "<img src=x" not in body
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;&lt;b&gt;bold&lt;/b&gt;" in body
    assert "&lt;img src=x onerror=alert(1)&gt;" in body
    assert "label_in_set</strong>: failed — not one of the labels" in body
    assert "0.610" in body and "0.390" in body
    assert "js/review.js" in body and 'data-key="a"' in body
    assert ">label_in_set (1)</option>" in body  # the failed-check filter with its count


def test_page_filters_pick_the_item(owner_client, project, rejected):
    url = reverse("review_page", kwargs={"slug": project.slug})
    body = owner_client.get(url, {"check": "max_length", "q": "refund"}).content.decode()
    assert f'data-sample="{rejected[2].pk}"' in body and "1 to review" in body
    body = owner_client.get(url, {"teacher": str(rejected[1].teacher_id)}).content.decode()
    assert f'data-sample="{rejected[1].pk}"' in body
    body = owner_client.get(url, {"mode": "bogus"}).content.decode()
    assert "mode: &#x27;bogus&#x27; is not one of rejected, audit" in body


def test_decide_via_htmx_swaps_in_next_item_and_undo(owner_client, project, rejected, owner):
    page = owner_client.get(reverse("review_page", kwargs={"slug": project.slug}))
    assert f'data-sample="{rejected[0].pk}"' in page.content.decode()
    url = reverse("review_decide", kwargs={"slug": project.slug, "sample_id": rejected[0].pk})
    r = owner_client.post(url, {"decision": "reject", "version": "0", "mode": "rejected"}, HTTP_HX_REQUEST="true")
    body = r.content.decode()
    assert r.status_code == 200 and "<html" not in body  # a partial, not a page
    assert f"Rejected sample {rejected[0].pk}" in body and f'data-sample="{rejected[1].pk}"' in body
    r = owner_client.post(reverse("review_undo", kwargs={"slug": project.slug}), {"mode": "rejected"}, HTTP_HX_REQUEST="true")
    assert f"Undid your decision on sample {rejected[0].pk}" in r.content.decode()
    assert Sample.objects.get(pk=rejected[0].pk).review_status is None


def test_edit_failing_recheck_is_shown_not_saved(owner_client, project, rejected):
    url = reverse("review_decide", kwargs={"slug": project.slug, "sample_id": rejected[0].pk})
    r = owner_client.post(url, {"decision": "edit", "version": "0", "edited_response": "<i>nope</i>"}, HTTP_HX_REQUEST="true")
    body = r.content.decode()
    assert "The edit fails label_in_set" in body and "Nothing was saved" in body
    assert "&lt;i&gt;nope&lt;/i&gt;</textarea>" in body
    assert Sample.objects.get(pk=rejected[0].pk).version == 0


def test_two_reviewers_in_browser_conflict_message(client, owner, member, project, rejected):
    from django.test import Client

    a, b = Client(), Client()
    a.force_login(owner)
    b.force_login(member)
    a.get(reverse("review_page", kwargs={"slug": project.slug}))
    # member opens the same item by id (its claim is held by owner, so member sees who holds it)
    item = b.get(reverse("review_item", kwargs={"slug": project.slug, "sample_id": rejected[0].pk}))
    assert "held by olivia" in item.content.decode()
    url = reverse("review_decide", kwargs={"slug": project.slug, "sample_id": rejected[0].pk})
    assert a.post(url, {"decision": "accept", "version": "0"}, HTTP_HX_REQUEST="true").status_code == 200
    r = b.post(url, {"decision": "reject", "version": "0"}, HTTP_HX_REQUEST="true")
    assert "changed since you saw it: olivia accepted it first" in r.content.decode()
    s = Sample.objects.get(pk=rejected[0].pk)
    assert (s.review_status, s.reviewed_by_id) == ("accepted", owner.pk)


def test_skip_and_previous(owner_client, project, rejected):
    slug = project.slug
    owner_client.get(reverse("review_page", kwargs={"slug": slug}))
    r = owner_client.post(reverse("review_skip", kwargs={"slug": slug, "sample_id": rejected[0].pk}), HTTP_HX_REQUEST="true")
    body = r.content.decode()
    assert f'data-sample="{rejected[1].pk}"' in body
    assert reverse("review_item", kwargs={"slug": slug, "sample_id": rejected[0].pk}) in body  # k goes back
    assert Sample.objects.get(pk=rejected[0].pk).claimed_by_id is None
    # the skipped item does not come back to this reviewer on reload
    assert f'data-sample="{rejected[1].pk}"' in owner_client.get(reverse("review_page", kwargs={"slug": slug})).content.decode()


def test_bulk_confirmation_states_count_then_applies(owner_client, project, rejected):
    url = reverse("review_bulk", kwargs={"slug": project.slug})
    r = owner_client.get(url, {"mode": "rejected", "check": "max_length", "decision": "accept"})
    assert "accept 2 samples" in r.content.decode()
    r = owner_client.post(url, {"mode": "rejected", "check": "max_length", "decision": "accept", "expected_count": "2"})
    assert r.status_code == 302
    assert set(Sample.objects.filter(review_status="accepted").values_list("id", flat=True)) == {rejected[1].pk, rejected[2].pk}


def test_viewer_pages_read_only(client, viewer, project, rejected):
    client.force_login(viewer)
    page = client.get(reverse("review_page", kwargs={"slug": project.slug})).content.decode()
    assert "card arival" in page and 'data-key="a"' not in page and "cannot decide" in page
    # j pages on through the queue without claiming anything
    nxt = client.get(reverse("review_next", kwargs={"slug": project.slug}), {"after": rejected[0].pk}, HTTP_HX_REQUEST="true")
    assert f'data-sample="{rejected[1].pk}"' in nxt.content.decode()
    url = reverse("review_decide", kwargs={"slug": project.slug, "sample_id": rejected[0].pk})
    r = client.post(url, {"decision": "accept", "version": "0"}, HTTP_HX_REQUEST="true")
    assert r.status_code == 403 and "read-only" in r.content.decode()
    r = client.post(reverse("review_bulk", kwargs={"slug": project.slug}),
                    {"mode": "rejected", "decision": "accept", "expected_count": "3"})
    assert r.status_code == 403
    assert client.post(reverse("review_undo", kwargs={"slug": project.slug})).status_code == 403
    assert not Sample.objects.filter(review_status__isnull=False).exists()
    assert not Sample.objects.filter(claimed_by__isnull=False).exists()
    assert ReviewDecision.objects.count() == 0


def test_history_page_shows_who_what_and_original_beside_edit(owner_client, project, rejected, owner):
    review_decide(sample=rejected[0], user=owner, decision="edit", edited_response="card_arrival", expected_version=0)
    body = owner_client.get(reverse("review_history", kwargs={"slug": project.slug})).content.decode()
    assert "<td>olivia</td>" in body and "<td>edit</td>" in body
    assert '<pre class="review-text">card arival</pre>' in body and '<pre class="review-text">card_arrival</pre>' in body


def test_other_projects_sample_is_404(owner_client, project, rejected, other_team, outsider):
    from projects.services.projects import project_create

    theirs = project_create(team=other_team, user=outsider, name="Theirs", task_type="classification", labels=["a", "b"])
    s = make_samples(theirs, [{"query": "secret", "failed": [LABEL_FAIL]}])[0]
    for name in ("review_item", "review_decide", "review_skip"):
        url = reverse(name, kwargs={"slug": project.slug, "sample_id": s.pk})
        assert owner_client.post(url, {"decision": "accept", "version": "0"}).status_code in (404, 405)
        assert owner_client.get(url).status_code in (404, 405)
    assert Sample.objects.get(pk=s.pk).review_status is None


def test_large_bulk_runs_as_a_job_on_the_worker(celery_worker, client, owner, project, settings):
    from projects.models import Job
    from tests.conftest import wait_job

    settings.DISTILLHUB_REVIEW_BULK_INLINE_MAX = 2
    samples = make_samples(project, [{"query": f"q{i}", "failed": [LABEL_FAIL]} for i in range(4)])
    client.force_login(owner)
    url = reverse("review_bulk", kwargs={"slug": project.slug})
    r = client.post(url, {"mode": "rejected", "decision": "accept", "expected_count": "4"})
    job = Job.objects.get(kind="review_bulk")
    assert r.status_code == 302 and r["Location"] == reverse("job_detail", kwargs={"job_id": job.pk})
    job = wait_job(job.pk, 60)
    assert (job.status, job.result["decided"], job.message) == ("succeeded", 4, "Accepted 4 samples")
    assert sorted(Sample.objects.filter(review_status="accepted", reviewed_by=owner).values_list("id", flat=True)) == \
        sorted(s.pk for s in samples)
    assert review_undo(project=project, user=owner) == 4


def test_evaluation_teacher_runs_stay_out_of_every_review_queue(owner_client, project, owner, rejected):
    """Samples of the evaluation's own teacher runs (test split, golden set) are never reviewed:
    not in the rejected or audit queue, their counts, the check filter, bulk decisions, or when
    opened by id, so no reviewer's edit can change the teacher's measured quality."""
    from projects.selectors import project_stages, review_check_counts

    r0, r1, r2, acc = rejected
    test_run = make_samples(project, [
        {"query": "Test: where is my card", "response": "card arival", "failed": [LABEL_FAIL], "split": "test"},
        {"query": "Test: card stolen", "response": "lost_or_stolen_card", "parsed": "lost_or_stolen_card", "split": "test"},
    ], run_split="test")
    golden_run = make_samples(project, [
        {"query": "Golden: refund?", "response": "refund?", "failed": [LABEL_FAIL], "golden": True, "split": "test"},
    ], run_split="golden")
    train_run = make_samples(project, [{"query": "Train: my refund", "response": "refnd", "failed": [LABEL_FAIL]}],
                             run_split="train")
    outside = [test_run[0], test_run[1], golden_run[0]]
    train_ids = [r0.pk, r1.pk, r2.pk, train_run[0].pk]

    assert list(review_queue(project=project, filters=ReviewFilters()).values_list("id", flat=True)) == train_ids
    assert review_bulk_count(project=project, filters=ReviewFilters(check="label_in_set")) == 3
    assert review_check_counts(project) == [("label_in_set", 3), ("max_length", 2)]
    assert dict(next(s for s in project_stages(project) if s["key"] == "review")["counts"]) == \
        {"to review": 4, "reviewed": 0}
    # The audit draw never picks an evaluation run's accepted answer, even at a 100 % share.
    review_audit_configure(project=project, user=owner, share=1.0)
    assert list(review_queue(project=project, filters=ReviewFilters(mode="audit")).values_list("id", flat=True)) == [acc.pk]
    assert Sample.objects.get(pk=test_run[1].pk).audit is False
    # Bulk decisions decide only train samples.
    assert review_bulk(project=project, user=owner, filters=ReviewFilters(), decision="reject", expected_count=4) == 4
    assert Sample.objects.filter(pk__in=[s.pk for s in outside], review_status__isnull=False).count() == 0
    # An evaluation sample cannot be opened or decided by id (the page 404s, the service refuses).
    for s in outside:
        assert owner_client.get(reverse("review_item", kwargs={"slug": project.slug, "sample_id": s.pk})).status_code == 404
        url = reverse("review_decide", kwargs={"slug": project.slug, "sample_id": s.pk})
        assert owner_client.post(url, {"decision": "edit", "version": "0", "edited_response": "card_arrival"},
                                 HTTP_HX_REQUEST="true").status_code == 404
        with pytest.raises(InvalidState, match="not from a train-split generation run"):
            review_decide(sample=s, user=owner, decision="edit", edited_response="card_arrival", expected_version=0)
    for s in outside:
        s.refresh_from_db()
        assert (s.review_status, s.edited_response, s.version) == (None, None, 0)
    assert ReviewDecision.objects.filter(sample__in=outside).count() == 0
    from projects.selectors import reviewable_samples  # the one queryset all of the above start from

    assert set(reviewable_samples(project).values_list("id", flat=True)) == {*train_ids, acc.pk}
