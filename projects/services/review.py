"""Review by hand: the queue of rejected samples (and the audit share of accepted ones), claims so
that many reviewers never get the same item, decisions with history and undo, bulk decisions,
and the export of the curated dataset.

Concurrency model: an item is *claimed* (``claimed_by`` / ``claimed_until``, ``CLAIM_SECONDS``)
by ``SELECT ... FOR UPDATE SKIP LOCKED`` and a conditional write, so two reviewers asking at the
same moment get different items. A decision names the ``version`` of the sample it was shown;
any write to a sample's review state increments ``version``, so a decision on a stale view raises
``ReviewConflict`` and the first decision stands."""
from __future__ import annotations

import hashlib
import os
import uuid
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

from django.db import connection, transaction
from django.db.models import Max, Q, QuerySet
from django.utils import timezone

from projects.models import Project, ReviewDecision, Sample, SampleStatus
from projects.services import InvalidInput, InvalidState, ServiceError
from projects.services.permissions import ensure_can_write

CLAIM_SECONDS = 300  # a claim lasts 5 minutes; a reviewer who walks away frees the item
DECISIONS = {"accept": "accepted", "reject": "rejected", "edit": "accepted"}
MODES = ("rejected", "audit")
# Knuth's multiplicative hash (TAOCP vol. 3, 6.4): ((id * 2654435761) mod 2^32) / 2^32 spreads
# consecutive ids uniformly over [0, 1); the same formula runs in SQL and in Python.
_KNUTH = 2654435761
_TWO32 = 4294967296


class ReviewConflict(ServiceError):
    """The sample changed since the reviewer saw it (another decision came first), or a bulk
    action's count no longer matches what was confirmed. Nothing was written. ``sample`` is the
    sample as it is now (None for bulk)."""

    def __init__(self, message: str, *, sample: Sample | None = None):
        super().__init__(message)
        self.sample = sample


class EditFailsChecks(InvalidInput):
    """An edited answer fails a re-check; nothing was saved. ``checks`` lists every check as
    ``{"name", "passed", "reason"}``."""

    def __init__(self, message: str, *, checks: list[dict]):
        super().__init__(message)
        self.checks = checks


@dataclass(frozen=True)
class ReviewFilters:
    """Which items a queue holds. ``mode``: ``"rejected"`` (rejected by the checks) or
    ``"audit"`` (the audit share of accepted samples); ``check``: a failed check's name;
    ``teacher_id``; ``text``: case-insensitive substring of the query or the answer;
    ``exclude_ids``: sample ids this reviewer skipped; ``after_id``: only items after this id
    (how a viewer, who claims nothing, pages through the queue)."""

    mode: str = "rejected"
    check: str = ""
    teacher_id: int | None = None
    text: str = ""
    exclude_ids: tuple[int, ...] = field(default_factory=tuple)
    after_id: int | None = None

    @classmethod
    def from_params(cls, params, *, exclude_ids=()) -> "ReviewFilters":
        """Build from a GET/POST mapping (``mode``, ``check``, ``teacher``, ``q``); bad values
        raise InvalidInput naming the field."""
        mode = (params.get("mode") or "rejected").strip()
        if mode not in MODES:
            raise InvalidInput(f"mode: {mode!r} is not one of {', '.join(MODES)}")
        teacher = (params.get("teacher") or "").strip()
        try:
            teacher_id = int(teacher) if teacher else None
        except ValueError:
            raise InvalidInput(f"teacher: {teacher!r} is not a teacher id") from None
        after = (params.get("after") or "").strip()
        try:
            after_id = int(after) if after else None
        except ValueError:
            raise InvalidInput(f"after: {after!r} is not a sample id") from None
        return cls(mode=mode, check=(params.get("check") or "").strip(), teacher_id=teacher_id,
                   text=(params.get("q") or "").strip(), exclude_ids=tuple(exclude_ids), after_id=after_id)

    def as_params(self) -> dict:
        """The filters as query-string parameters (skips are not part of them)."""
        out = {"mode": self.mode}
        if self.check:
            out["check"] = self.check
        if self.teacher_id:
            out["teacher"] = str(self.teacher_id)
        if self.text:
            out["q"] = self.text
        return out


def _as_filters(filters) -> ReviewFilters:
    if filters is None:
        return ReviewFilters()
    if isinstance(filters, ReviewFilters):
        return filters
    return ReviewFilters.from_params(filters, exclude_ids=filters.get("exclude_ids", ()))


def _run_ids(project: Project) -> list[int]:
    """The runs whose samples are reviewable: the train-split runs (``projects.selectors.
    train_run_ids``). A literal id list plans better than a join on the run table, and keeps
    FOR UPDATE on samples."""
    from projects.selectors import train_run_ids

    return train_run_ids(project)


def review_queue(*, project: Project, filters=None) -> QuerySet[Sample]:
    """Samples still to review that match ``filters`` (a ReviewFilters or a params dict), in id
    order: only samples of train-split generation runs (``projects.selectors.reviewable_samples``;
    the evaluation's test / golden teacher runs are never reviewed). Claims are not applied here
    (see ``review_claim_next``); bulk decisions and their counts use this queryset too."""
    from projects.selectors import reviewable_samples

    f = _as_filters(filters)
    qs = reviewable_samples(project).filter(review_status__isnull=True)
    if f.mode == "audit":
        qs = qs.filter(status=SampleStatus.ACCEPTED, audit=True)
    else:
        qs = qs.filter(status=SampleStatus.REJECTED)
    if f.check:
        qs = qs.filter(failed_checks__contains=[f.check])
    if f.teacher_id:
        qs = qs.filter(teacher_id=f.teacher_id)
    if f.text:
        qs = qs.filter(Q(query__text__icontains=f.text) | Q(response__icontains=f.text))
    if f.exclude_ids:
        qs = qs.exclude(id__in=list(f.exclude_ids))
    if f.after_id:
        qs = qs.filter(id__gt=f.after_id)
    return qs.order_by("id")


def review_claim_next(*, project: Project, user, filters=None, seconds: int = CLAIM_SECONDS) -> Sample | None:
    """Claim the next item of the queue for ``user`` for ``seconds`` and return it (with query
    and teacher loaded), or None when the queue is empty. An item the user already holds comes
    back first (a reload shows the same item); items others hold are skipped until their claim
    expires. Viewers get the next item without a claim (they only look)."""
    from projects.selectors import user_can_write

    f = _as_filters(filters)
    base = review_queue(project=project, filters=f)
    now = timezone.now()
    if user is not None and not user_can_write(user, project.team):
        s = base.filter(Q(claimed_until__isnull=True) | Q(claimed_until__lte=now)).first()
        return _load(s.pk) if s else None
    until = now + timedelta(seconds=seconds)
    with transaction.atomic():
        # No ORDER BY here: the planner then uses the claimed_by index instead of walking the queue.
        held = (next(iter(base.filter(claimed_by=user, claimed_until__gt=now).order_by()[:1]), None)
                if user is not None else None)
        if held is not None:
            Sample.objects.filter(pk=held.pk).update(claimed_until=until)
            return _load(held.pk)
        free = (base.filter(Q(claimed_until__isnull=True) | Q(claimed_until__lte=now))
                .select_for_update(skip_locked=True).only("id")[:1])
        s = next(iter(free), None)
        if s is None:
            return None
        Sample.objects.filter(pk=s.pk).update(claimed_by=user, claimed_until=until)
    return _load(s.pk)


def review_claim(*, sample: Sample, user, seconds: int = CLAIM_SECONDS) -> bool:
    """Claim one given sample (opened by id, e.g. going back with ``k``) if nobody else holds
    it; returns True when ``user`` now holds it."""
    now = timezone.now()
    n = (Sample.objects.filter(pk=sample.pk)
         .filter(Q(claimed_until__isnull=True) | Q(claimed_until__lte=now) | Q(claimed_by=user))
         .update(claimed_by=user, claimed_until=now + timedelta(seconds=seconds)))
    return n == 1


def review_release(*, sample: Sample, user) -> None:
    """Give up ``user``'s claim on ``sample`` (skip): others can take it at once."""
    Sample.objects.filter(pk=sample.pk, claimed_by=user).update(claimed_by=None, claimed_until=None)


def _load(pk: int) -> Sample:
    return Sample.objects.select_related("query", "teacher", "reviewed_by", "claimed_by").get(pk=pk)


def _project_of(sample: Sample) -> Project:
    return Project.objects.select_related("team").get(generation_runs__id=sample.run_id)


def review_recheck(*, project: Project, response: str) -> tuple[list[dict], object]:
    """Re-check an edited answer with the checks a teacher's answer gets
    (``workers.pipeline.checks.run_checks`` on the project's task and check settings: non-empty,
    length, refusal, stray ``\\uXXXX`` escapes, the label set for classification, JSON and the
    JSON Schema for extraction), less the finish-reason check, which only a model's answer has.
    Returns ``(checks, parsed)``: ``checks`` a list of ``{"name", "passed", "reason"}`` in order,
    ``parsed`` the canonical label, the JSON object, or None."""
    from projects.selectors import project_task_spec
    from workers.pipeline.checks import Answer, run_checks

    verdict = run_checks(Answer(text=response or ""), project_task_spec(project))
    checks = [c.as_dict() for c in verdict.checks if c.name != "finish_reason"]
    return checks, verdict.parsed


def review_decide(*, sample: Sample, user, decision: str, edited_response: str | None = None,
                  expected_version: int, project: Project | None = None) -> Sample:
    """Record ``user``'s decision on ``sample``: ``"accept"``, ``"reject"`` or ``"edit"``
    (edit-and-accept: ``edited_response`` is re-checked first and saved beside the original).
    ``expected_version`` is the sample's version when it was shown.

    Returns the sample as saved (version + 1, claim released). Raises NotAllowed for viewers,
    InvalidInput for an unknown decision or an empty edit, EditFailsChecks when the edit fails a
    re-check (nothing saved), ReviewConflict when the sample's version is no longer
    ``expected_version`` (someone decided first; their decision stands), InvalidState when the
    sample is not reviewable (not in ``projects.selectors.reviewable_samples``: e.g. a teacher
    answer an evaluation scores, over the test split or golden set)."""
    from projects.selectors import reviewable_samples

    project = project or _project_of(sample)
    ensure_can_write(user=user, team=project.team)
    if decision not in DECISIONS:
        raise InvalidInput(f"decision: {decision!r} is not one of {', '.join(DECISIONS)}")
    if not reviewable_samples(project).filter(pk=sample.pk).exists():
        raise InvalidState(f"sample {sample.pk} is not from a train-split generation run of project "
                           f"{project.slug!r} (teacher answers over the test split or golden set are what "
                           "evaluations score, so they are never reviewed)")
    parsed_new = None
    if decision == "edit":
        if edited_response is None or not edited_response.strip():
            raise InvalidInput("edited_response: the edited answer is empty")
        checks, parsed_new = review_recheck(project=project, response=edited_response)
        failed = [c for c in checks if not c["passed"]]
        if failed:
            raise EditFailsChecks("The edit fails " + "; ".join(f"{c['name']}: {c['reason']}" for c in failed)
                                  + ". Nothing was saved.", checks=checks)
    with transaction.atomic():
        cur = Sample.objects.select_for_update(of=("self",)).select_related("reviewed_by").get(pk=sample.pk)
        if cur.version != int(expected_version):
            who = cur.reviewed_by.username if cur.reviewed_by else "someone"
            what = cur.review_status or "changed"
            raise ReviewConflict(f"Sample {cur.pk} changed since you saw it: {who} {what} it first; "
                                 "that decision stands and yours was not saved.", sample=_load(cur.pk))
        prev_status, prev_edit, prev_parsed = cur.review_status, cur.edited_response, cur.parsed
        cur.review_status = DECISIONS[decision]
        if decision == "edit":
            cur.edited_response = edited_response
            cur.parsed = parsed_new
        cur.reviewed_by = user
        cur.reviewed_at = timezone.now()
        cur.claimed_by = None
        cur.claimed_until = None
        cur.version += 1
        cur.save(update_fields=["review_status", "edited_response", "parsed", "reviewed_by", "reviewed_at",
                                "claimed_by", "claimed_until", "version"])
        ReviewDecision.objects.create(
            sample=cur, user=user, decision=decision, previous_review_status=prev_status,
            previous_edited_response=prev_edit, previous_parsed=prev_parsed, original_response=cur.response,
            edited_response=edited_response if decision == "edit" else None, version_after=cur.version)
    return cur


def review_undo(*, project: Project, user) -> Sample | int:
    """Undo ``user``'s latest decision in ``project`` that is not undone yet: the sample's review
    state goes back to what it was (and the item returns to the user's queue, claimed by them).
    A bulk action is undone as a whole (returns the number of samples reverted); a single
    decision returns the sample.

    Raises NotAllowed for viewers, InvalidState when there is nothing to undo, ReviewConflict
    when the sample changed since the decision (someone decided after; nothing changed)."""
    ensure_can_write(user=user, team=project.team)
    with transaction.atomic():
        last = (ReviewDecision.objects.select_for_update(of=("self",))
                .filter(user=user, undone=False, sample__run__project=project).order_by("-id").first())
        if last is None:
            raise InvalidState("Nothing to undo: you have no decision in this project that is not undone.")
        if last.batch is not None:
            return _undo_batch(batch=last.batch)
        cur = Sample.objects.select_for_update(of=("self",)).get(pk=last.sample_id)
        if cur.version != last.version_after:
            raise ReviewConflict(f"Sample {cur.pk} changed after your decision (someone else decided it); "
                                 "nothing was undone.", sample=_load(cur.pk))
        before = (ReviewDecision.objects.filter(sample_id=cur.pk, undone=False).exclude(pk=last.pk)
                  .order_by("-id").first())
        cur.review_status = last.previous_review_status
        cur.edited_response = last.previous_edited_response
        cur.parsed = last.previous_parsed
        cur.reviewed_by_id = before.user_id if before and cur.review_status else None
        cur.reviewed_at = before.created_at if before and cur.review_status else None
        cur.claimed_by = user
        cur.claimed_until = timezone.now() + timedelta(seconds=CLAIM_SECONDS)
        cur.version += 1
        cur.save(update_fields=["review_status", "edited_response", "parsed", "reviewed_by", "reviewed_at",
                                "claimed_by", "claimed_until", "version"])
        last.undone = True
        last.save(update_fields=["undone"])
    return _load(cur.pk)


def _undo_batch(*, batch: uuid.UUID) -> int:
    s, d = Sample._meta.db_table, ReviewDecision._meta.db_table
    with connection.cursor() as c:
        # Revert only samples nobody touched since the bulk action (version still matches).
        c.execute(f"""
            UPDATE {s} AS s SET review_status = d.previous_review_status,
                edited_response = d.previous_edited_response, parsed = d.previous_parsed,
                reviewed_by_id = NULL, reviewed_at = NULL, version = s.version + 1
            FROM {d} AS d
            WHERE d.batch = %s AND d.undone = FALSE AND d.sample_id = s.id AND s.version = d.version_after""",
                  [batch])
        n = c.rowcount
        c.execute(f"UPDATE {d} SET undone = TRUE WHERE batch = %s", [batch])
    return n


def review_bulk_count(*, project: Project, filters=None) -> int:
    """How many samples a bulk decision with ``filters`` would decide now (for the confirmation)."""
    return review_queue(project=project, filters=filters).count()


def review_bulk(*, project: Project, user, filters, decision: str, expected_count: int) -> int:
    """Accept or reject (``decision`` = ``"accept"`` / ``"reject"``) every sample still to review
    that matches ``filters``, after the user confirmed ``expected_count`` of them. Each gets a
    history row (one shared ``batch``, so one undo reverts them all). Returns the count decided.

    Raises NotAllowed for viewers, InvalidInput for another decision, ReviewConflict when the
    number that matches now is not ``expected_count`` (nothing changed)."""
    ensure_can_write(user=user, team=project.team)
    if decision not in ("accept", "reject"):
        raise InvalidInput(f"decision: bulk takes accept or reject, not {decision!r}")
    f = _as_filters(filters)
    f = ReviewFilters(mode=f.mode, check=f.check, teacher_id=f.teacher_id, text=f.text)  # skips don't apply
    status = DECISIONS[decision]
    batch = uuid.uuid4()
    now = timezone.now()
    s, d = Sample._meta.db_table, ReviewDecision._meta.db_table
    with transaction.atomic():
        ids = list(review_queue(project=project, filters=f).select_for_update(of=("self",))
                   .values_list("id", flat=True))
        if len(ids) != int(expected_count):
            raise ReviewConflict(f"{len(ids)} samples match now, not the {expected_count} you confirmed "
                                 "(the queue changed); nothing was decided. Check the count and confirm again.")
        if not ids:
            return 0
        with connection.cursor() as c:
            c.execute(f"""
                INSERT INTO {d} (sample_id, user_id, decision, previous_review_status, previous_edited_response,
                                 original_response, edited_response, undone, created_at, previous_parsed,
                                 version_after, batch)
                SELECT id, %s, %s, review_status, edited_response, response, NULL, FALSE, %s, parsed,
                       version + 1, %s
                FROM {s} WHERE id = ANY(%s)""", [user.pk if user else None, f"bulk_{decision}", now, batch, ids])
            c.execute(f"""
                UPDATE {s} SET review_status = %s, reviewed_by_id = %s, reviewed_at = %s, version = version + 1,
                               claimed_by_id = NULL, claimed_until = NULL
                WHERE id = ANY(%s)""", [status, user.pk if user else None, now, ids])
    return len(ids)


BULK_INLINE_MAX = 5000  # above this many samples a bulk decision runs as a background job


def review_bulk_start(*, project: Project, user, filters, decision: str, expected_count: int):
    """Queue a bulk decision as a background Job (kind ``review_bulk``) for large counts, so no
    web request runs for minutes. The count is checked now and again when the job runs (the job
    fails with the ReviewConflict message if it changed). Returns the Job. Raises NotAllowed,
    InvalidInput, ReviewConflict like ``review_bulk``."""
    from projects.services.jobs import job_create, job_enqueue

    ensure_can_write(user=user, team=project.team)
    if decision not in ("accept", "reject"):
        raise InvalidInput(f"decision: bulk takes accept or reject, not {decision!r}")
    f = _as_filters(filters)
    n = review_bulk_count(project=project, filters=ReviewFilters(mode=f.mode, check=f.check,
                                                                 teacher_id=f.teacher_id, text=f.text))
    if n != int(expected_count):
        raise ReviewConflict(f"{n} samples match now, not the {expected_count} you confirmed "
                             "(the queue changed); nothing was decided. Check the count and confirm again.")

    with transaction.atomic():
        job = job_create(kind="review_bulk", team=project.team, project=project, user=user,
                         payload={"filters": f.as_params(), "decision": decision, "expected_count": n,
                                  "user_id": user.pk if user else None})
        job_enqueue(job=job, task="workers.tasks.review_bulk_task")
    return job


def audit_selected(*, sample_id: int, share: float) -> bool:
    """True when sample ``sample_id`` falls in an audit share ``share`` (0..1): Knuth's
    multiplicative hash of the id, so the draw is random-looking but the same every time."""
    return ((sample_id * _KNUTH) % _TWO32) < share * _TWO32


def review_audit_mark(*, project: Project) -> int:
    """Flag ``audit=True`` on the checks-accepted samples of ``project`` that fall in its
    ``review_audit_share`` (see ``audit_selected``), considering only samples newer than the last
    call (incremental, so it stays cheap with millions of rows). Returns how many were flagged."""
    runs = _run_ids(project)
    with transaction.atomic():
        p = Project.objects.select_for_update().get(pk=project.pk)
        upto = Sample.objects.aggregate(m=Max("id"))["m"] or 0
        if upto <= p.review_audit_marked_upto or not runs:
            return 0
        with connection.cursor() as c:
            c.execute(f"""
                UPDATE {Sample._meta.db_table} SET audit = TRUE
                WHERE run_id = ANY(%s) AND status = 'accepted' AND audit = FALSE AND id > %s AND id <= %s
                  AND ((id::numeric * {_KNUTH}) %% {_TWO32}) < %s""",
                      [runs, p.review_audit_marked_upto, upto, p.review_audit_share * _TWO32])
            n = c.rowcount
        p.review_audit_marked_upto = upto
        p.save(update_fields=["review_audit_marked_upto"])
        project.review_audit_marked_upto = upto
    return n


def review_audit_configure(*, project: Project, user, share: float) -> int:
    """Set the audit share (0..1) and redraw the audit queue: unreviewed samples lose the flag
    and are drawn again. Raises NotAllowed for viewers, InvalidInput for a share outside 0..1.
    Returns how many samples are flagged for audit now."""
    ensure_can_write(user=user, team=project.team)
    if share is None or not (0.0 <= float(share) <= 1.0):
        raise InvalidInput(f"audit_share: must be a fraction between 0 and 1, got {share!r}")
    with transaction.atomic():
        Sample.objects.filter(run_id__in=_run_ids(project), audit=True, review_status__isnull=True).update(audit=False)
        Project.objects.filter(pk=project.pk).update(review_audit_share=float(share), review_audit_marked_upto=0)
        project.review_audit_share, project.review_audit_marked_upto = float(share), 0
        review_audit_mark(project=project)
    return Sample.objects.filter(run_id__in=_run_ids(project), audit=True, status=SampleStatus.ACCEPTED).count()


EXPORT_FORMATS = ("openai-chat", "hf-jsonl")


def curated_dataset_export(*, project: Project, fmt: str, path: str | os.PathLike) -> dict:
    """Write the curated dataset to ``path`` as UTF-8 JSONL (``fmt``: ``"openai-chat"`` or
    ``"hf-jsonl"``, see ``projects.selectors.curated_export_lines``), streaming row by row.
    Written to a temporary file beside ``path`` and renamed, so nothing half-written is left.
    Returns ``{"rows": int, "sha256": hex of the file's bytes, "path": str, "format": fmt}``.
    Raises InvalidInput for an unknown format or an unwritable path."""
    from projects.selectors import curated_export_lines

    if fmt not in EXPORT_FORMATS:
        raise InvalidInput(f"format: {fmt!r} is not one of {', '.join(EXPORT_FORMATS)}")
    out = Path(path).resolve()
    tmp = out.with_name(f".{out.name}.{uuid.uuid4().hex[:8]}.part")
    h = hashlib.sha256()
    rows = 0
    try:
        with open(tmp, "wb") as fh:
            for line in curated_export_lines(project, fmt):
                fh.write(line)
                h.update(line)
                rows += 1
        os.replace(tmp, out)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise InvalidInput(f"out: cannot write {str(out)!r}: {exc.strerror}") from None
    return {"rows": rows, "sha256": h.hexdigest(), "path": str(out), "format": fmt}
