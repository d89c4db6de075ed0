"""Review pages: the keyboard-driven queue (one item at a time, swapped in by htmx), decisions,
undo, bulk decisions with a confirmed count, the history and the curated dataset export."""
from __future__ import annotations

from urllib.parse import urlencode

from django.conf import settings
from django.contrib import messages
from django.http import Http404, StreamingHttpResponse
from django.shortcuts import redirect, render
from django.urls import path, reverse
from django.views.decorators.http import require_POST

from projects import selectors
from projects.models import ReviewDecision, Sample, Teacher
from projects.services import InvalidInput, InvalidState, NotAllowed, ServiceError
from projects.services.review import (
    BULK_INLINE_MAX, EXPORT_FORMATS, EditFailsChecks, ReviewConflict, ReviewFilters, review_audit_configure, review_audit_mark,
    review_bulk, review_bulk_count, review_bulk_start, review_claim, review_claim_next, review_decide, review_queue, review_release,
    review_undo,
)

SKIP_CAP = 500

SEEN_CAP = 50


def _key(project, what: str) -> str:
    return f"review:{project.pk}:{what}"


def _filters(request, project, params=None) -> ReviewFilters:
    params = params if params is not None else request.GET
    try:
        return ReviewFilters.from_params(params, exclude_ids=request.session.get(_key(project, "skipped"), []))
    except InvalidInput as exc:
        messages.error(request, str(exc))
        return ReviewFilters(exclude_ids=tuple(request.session.get(_key(project, "skipped"), [])))


def _sample(project, sample_id: int) -> Sample:
    # Only reviewable samples (train-split runs): an evaluation's teacher answers are never reviewed.
    try:
        return (selectors.reviewable_samples(project).select_related("query", "teacher", "reviewed_by", "claimed_by")
                .get(pk=sample_id))
    except Sample.DoesNotExist:
        raise Http404("No such sample in this project") from None


def _push_session_list(request, key: str, value: int, cap: int) -> None:
    items = [x for x in request.session.get(key, []) if x != value]
    items.append(value)
    request.session[key] = items[-cap:]


def _item_context(request, project, sample, f: ReviewFilters, **extra) -> dict:
    """Everything the item partial shows. ``prev_id``: the item seen before this one (k)."""
    seen = request.session.get(_key(project, "seen"), [])
    prev_id = None
    if sample is not None:
        _push_session_list(request, _key(project, "seen"), sample.pk, SEEN_CAP)
        seen = request.session[_key(project, "seen")]
        prev_id = seen[-2] if len(seen) >= 2 else None
    elif seen:
        prev_id = seen[-1]
    ctx = {"project": project, "sample": sample, "filters": f, "qs": urlencode(f.as_params()),
           "can_write": selectors.user_can_write(request.user, project.team), "prev_id": prev_id}
    if sample is not None:
        ctx["label_probs"] = sorted((sample.label_probs or {}).items(), key=lambda kv: -float(kv[1]))[:10]
        ctx["history"] = list(ReviewDecision.objects.filter(sample=sample).select_related("user")[:20])
        ctx["held_by_other"] = (sample.claimed_by_id and sample.claimed_by_id != request.user.pk
                                and sample.claimed_until and sample.claimed_until > _now())
    ctx.update(extra)
    return ctx


def _now():
    from django.utils import timezone

    return timezone.now()


def _render_item(request, project, sample, f: ReviewFilters, status: int = 200, **extra):
    ctx = _item_context(request, project, sample, f, **extra)
    if request.headers.get("HX-Request"):
        return render(request, "review/_item.html", ctx, status=status)
    ctx.update(_page_context(request, project, f))
    return render(request, "review/page.html", ctx, status=status)


def _page_context(request, project, f: ReviewFilters) -> dict:
    return {"section": "review", "teachers": Teacher.objects.filter(project=project).order_by("name"),
            "check_counts": selectors.review_check_counts(project) if f.mode == "rejected" else [],
            "to_review": review_queue(project=project, filters=ReviewFilters(
                mode=f.mode, check=f.check, teacher_id=f.teacher_id, text=f.text)).count(),
            "skipped": len(f.exclude_ids)}


def review_page(request, slug: str):
    """The queue: filters, the current item (claimed for this reviewer), bulk and export links."""
    project = selectors.project_for_user(request.user, slug)
    f = _filters(request, project)
    if f.mode == "audit":
        review_audit_mark(project=project)
    sample = review_claim_next(project=project, user=request.user, filters=f)
    ctx = _item_context(request, project, sample, f)
    ctx.update(_page_context(request, project, f))
    return render(request, "review/page.html", ctx)


def review_next(request, slug: str):
    """The item partial with the next item of the queue (htmx swaps it in)."""
    project = selectors.project_for_user(request.user, slug)
    f = _filters(request, project)
    sample = review_claim_next(project=project, user=request.user, filters=f)
    return _render_item(request, project, sample, f)


def review_item(request, slug: str, sample_id: int):
    """One given item (going back with k, or a link from the history); claimed if it is free."""
    project = selectors.project_for_user(request.user, slug)
    sample = _sample(project, sample_id)
    f = _filters(request, project)
    if selectors.user_can_write(request.user, project.team) and sample.review_status is None:
        review_claim(sample=sample, user=request.user)
        sample = _sample(project, sample_id)
    return _render_item(request, project, sample, f)


@require_POST
def review_decide_view(request, slug: str, sample_id: int):
    """Accept / reject / edit-and-accept the item shown at ``version``; then the next item."""
    project = selectors.project_for_user(request.user, slug)
    sample = _sample(project, sample_id)
    f = _filters(request, project, request.POST)
    decision = request.POST.get("decision", "")
    edited = request.POST.get("edited_response") if decision == "edit" else None
    try:
        version = int(request.POST.get("version", ""))
    except ValueError:
        return _render_item(request, project, sample, f, status=400,
                            error="version: missing; reload the page and decide again.")
    try:
        saved = review_decide(sample=sample, user=request.user, decision=decision, edited_response=edited,
                              expected_version=version, project=project)
    except NotAllowed as exc:
        return _render_item(request, project, sample, f, status=403, error=str(exc))
    except EditFailsChecks as exc:
        return _render_item(request, project, sample, f, error=str(exc), edit_checks=exc.checks,
                            edit_text=edited, edit_open=True)
    except ReviewConflict as exc:
        return _render_item(request, project, exc.sample or sample, f, conflict=str(exc))
    except ServiceError as exc:
        return _render_item(request, project, sample, f, status=400, error=str(exc))
    word = {"accept": "Accepted", "reject": "Rejected", "edit": "Edited and accepted"}[decision]
    nxt = review_claim_next(project=project, user=request.user, filters=f)
    return _render_item(request, project, nxt, f, notice=f"{word} sample {saved.pk}. Press u to undo.")


@require_POST
def review_skip_view(request, slug: str, sample_id: int):
    """Skip: release the claim (others may take it), hide it from this reviewer, show the next."""
    project = selectors.project_for_user(request.user, slug)
    sample = _sample(project, sample_id)
    review_release(sample=sample, user=request.user)
    _push_session_list(request, _key(project, "skipped"), sample.pk, SKIP_CAP)
    f = _filters(request, project, request.POST)
    nxt = review_claim_next(project=project, user=request.user, filters=f)
    return _render_item(request, project, nxt, f, notice=f"Skipped sample {sample.pk}.")


@require_POST
def review_unskip_view(request, slug: str):
    """Bring the items this reviewer skipped back into their queue."""
    project = selectors.project_for_user(request.user, slug)
    request.session[_key(project, "skipped")] = []
    f = _filters(request, project, request.POST)
    return redirect(reverse("review_page", kwargs={"slug": slug}) + "?" + urlencode(f.as_params()))


@require_POST
def review_undo_view(request, slug: str):
    """Undo this reviewer's latest decision; the item comes back (claimed by them)."""
    project = selectors.project_for_user(request.user, slug)
    f = _filters(request, project, request.POST)
    try:
        result = review_undo(project=project, user=request.user)
    except NotAllowed as exc:
        return _render_item(request, project, None, f, status=403, error=str(exc))
    except (InvalidState, ReviewConflict) as exc:
        sample = review_claim_next(project=project, user=request.user, filters=f)
        return _render_item(request, project, sample, f, error=str(exc))
    if isinstance(result, int):
        sample = review_claim_next(project=project, user=request.user, filters=f)
        return _render_item(request, project, sample, f, notice=f"Undid a bulk decision: {result} samples are back in the queue.")
    return _render_item(request, project, result, f, notice=f"Undid your decision on sample {result.pk}.")


def review_bulk_view(request, slug: str):
    """GET: the confirmation, stating how many samples the filter matches. POST: decide them all
    (only if the count still matches)."""
    project = selectors.project_for_user(request.user, slug)
    params = request.POST if request.method == "POST" else request.GET
    f = _filters(request, project, params)
    f = ReviewFilters(mode=f.mode, check=f.check, teacher_id=f.teacher_id, text=f.text)
    decision = params.get("decision", "")
    status = 200
    if decision not in ("accept", "reject"):
        messages.error(request, f"decision: bulk takes accept or reject, not {decision!r}")
        return redirect(reverse("review_page", kwargs={"slug": slug}) + "?" + urlencode(f.as_params()))
    if request.method == "POST":
        raw = params.get("expected_count") or ""
        expected = int(raw) if raw.isdigit() else -1
        # Large bulk actions run as a background job, so no request runs for minutes.
        background = expected > getattr(settings, "DISTILLHUB_REVIEW_BULK_INLINE_MAX", BULK_INLINE_MAX)
        service = review_bulk_start if background else review_bulk
        try:
            result = service(project=project, user=request.user, filters=f, decision=decision, expected_count=expected)
        except ServiceError as exc:
            messages.error(request, str(exc))
            status = 403 if isinstance(exc, NotAllowed) else 409 if isinstance(exc, ReviewConflict) else 400
        else:
            if background:
                messages.info(request, f"Deciding {expected} samples in the background (job {result.pk}).")
                return redirect("job_detail", job_id=result.pk)
            messages.success(request, f"{'Accepted' if decision == 'accept' else 'Rejected'} {result} samples. "
                                      "Undo on the queue page reverts the whole bulk action.")
            return redirect(reverse("review_page", kwargs={"slug": slug}) + "?" + urlencode(f.as_params()))
    count = review_bulk_count(project=project, filters=f)
    teacher = Teacher.objects.filter(project=project, pk=f.teacher_id).first() if f.teacher_id else None
    return render(request, "review/bulk.html", {
        "project": project, "section": "review", "filters": f, "decision": decision, "count": count,
        "teacher": teacher, "qs": urlencode(f.as_params()), "can_write": selectors.user_can_write(request.user, project.team)}, status=status)


def review_history(request, slug: str):
    """Who decided what and when, newest first; the original answer beside each edit."""
    project = selectors.project_for_user(request.user, slug)
    decisions = (ReviewDecision.objects.filter(sample__run__project=project)
                 .select_related("user", "sample").order_by("-id")[:200])
    return render(request, "review/history.html", {"project": project, "section": "review", "decisions": decisions})


def review_dataset(request, slug: str):
    """The curated dataset: row count, content hash (on request), export downloads."""
    project = selectors.project_for_user(request.user, slug)
    sha = None
    if request.GET.get("hash"):
        sha, rows = selectors.curated_dataset_sha256(project)
    else:
        rows = selectors.curated_samples(project).count()
    return render(request, "review/dataset.html", {"project": project, "section": "review", "rows": rows,
                                                   "sha256": sha, "formats": EXPORT_FORMATS})


def review_export(request, slug: str):
    """Stream the curated dataset as JSONL (``?format=openai-chat|hf-jsonl``), row by row."""
    project = selectors.project_for_user(request.user, slug)
    fmt = request.GET.get("format", "openai-chat")
    if fmt not in EXPORT_FORMATS:
        messages.error(request, f"format: {fmt!r} is not one of {', '.join(EXPORT_FORMATS)}")
        return redirect("review_dataset", slug=slug)
    resp = StreamingHttpResponse(selectors.curated_export_lines(project, fmt),
                                 content_type="application/jsonl; charset=utf-8")
    resp["Content-Disposition"] = f'attachment; filename="{project.slug}-{fmt}.jsonl"'
    resp["X-Accel-Buffering"] = "no"
    return resp


@require_POST
def review_audit_view(request, slug: str):
    """Set the audit share (percent of checks-accepted samples drawn into the audit queue)."""
    project = selectors.project_for_user(request.user, slug)
    try:
        share = float(request.POST.get("audit_percent", "")) / 100.0
    except ValueError:
        messages.error(request, "audit_percent: must be a number between 0 and 100")
    else:
        try:
            n = review_audit_configure(project=project, user=request.user, share=share)
        except ServiceError as exc:
            messages.error(request, str(exc))
        else:
            messages.success(request, f"Audit share set to {share * 100:g} %: {n} accepted samples drawn for audit.")
    return redirect(reverse("review_page", kwargs={"slug": slug}) + "?mode=audit")


urlpatterns = [
    path("p/<slug:slug>/review/", review_page, name="review_page"),
    path("p/<slug:slug>/review/next/", review_next, name="review_next"),
    path("p/<slug:slug>/review/item/<int:sample_id>/", review_item, name="review_item"),
    path("p/<slug:slug>/review/item/<int:sample_id>/decide/", review_decide_view, name="review_decide"),
    path("p/<slug:slug>/review/item/<int:sample_id>/skip/", review_skip_view, name="review_skip"),
    path("p/<slug:slug>/review/unskip/", review_unskip_view, name="review_unskip"),
    path("p/<slug:slug>/review/undo/", review_undo_view, name="review_undo"),
    path("p/<slug:slug>/review/bulk/", review_bulk_view, name="review_bulk"),
    path("p/<slug:slug>/review/history/", review_history, name="review_history"),
    path("p/<slug:slug>/review/dataset/", review_dataset, name="review_dataset"),
    path("p/<slug:slug>/review/export/", review_export, name="review_export"),
    path("p/<slug:slug>/review/audit/", review_audit_view, name="review_audit"),
]
