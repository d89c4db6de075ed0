"""The async core of teacher generation with rejection sampling (no Django).

``Generator.run(groups)`` answers every group — one (query, teacher) pair with its sample
slots ``start_index .. samples_per_query-1`` — with at most ``concurrency`` requests in flight
(an ``asyncio.Semaphore``). Within a group the samples are drawn one after another and the first
that passes the checks is kept (rejection sampling: later slots are not drawn); with an LLM judge
all slots are drawn, judged, and only the best-scored passing sample stays accepted. Each
finished sample is handed to ``emit(SampleResult)`` at once, so the caller can write it before
the next one arrives (a crash then repeats no completed call).

Stops: ``RunStopped`` from a teacher (``insufficient_quota``, ``authentication``), the budget
(the next request's worst-case cost would pass ``budget_usd``) or ``stop(reason)`` from another
thread (cancel) end the run early; ``run`` returns the stop reason or None.
"""
from __future__ import annotations

import asyncio
import threading
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field

from workers.pipeline.checks import (Answer, CheckResult, check_judge, judge_messages, normalise_for_duplicate,
                                     parse_judge_score, run_checks)
from workers.pipeline.prompts import teacher_messages
from workers.pipeline.specs import QueryItem, TaskSpec
from workers.pipeline.teachers import EnsembleTeacher, RunStopped, TeacherConfig, TeacherReply


@dataclass(frozen=True)
class Group:
    """One (query, teacher) pair; ``start_index`` is the first sample slot still to draw."""

    query: QueryItem
    teacher_id: int
    start_index: int = 0


@dataclass
class SampleResult:
    """One finished sample slot, ready to be written. ``status``: accepted, rejected or failed;
    ``checks``: ``[{"name", "passed", "reason"}]``; cost in USD, latency in ms."""

    query_id: int
    teacher_id: int
    sample_index: int
    prompt: list[dict]
    response: str | None
    status: str
    parsed: object = None
    finish_reason: str = ""
    input_tokens: int = 0
    output_tokens: int = 0
    cost_usd: float = 0.0
    latency_ms: float = 0.0
    label_probs: dict | None = None
    token_logprobs: list | None = None
    checks: list[dict] = field(default_factory=list)
    failed_checks: list[str] = field(default_factory=list)
    error: str = ""
    judge_score: int | None = None


def effective_samples_per_query(cfg: TeacherConfig, task: TaskSpec, samples_per_query: int) -> int:
    """Slots drawn per query for a teacher: 1 when a second draw cannot differ (a local teacher
    that scores labels, or temperature 0), else ``samples_per_query``."""
    if cfg.provider == "ensemble":
        return 1 if all(effective_samples_per_query(m, task, 2) == 1 for m in cfg.members) else samples_per_query
    if cfg.temperature <= 0:
        return 1
    if cfg.provider == "transformers" and task.task_type == "classification" and task.labels:
        return 1
    return samples_per_query


def slot_seed(query_id: int, teacher_id: int, sample_index: int) -> int:
    """A stable seed per slot, so a redrawn local sample is the same answer."""
    return zlib.crc32(f"{query_id}:{teacher_id}:{sample_index}".encode()) & 0x7FFFFFFF


class Generator:
    """Bounded-concurrency rejection sampling over groups (see the module docstring).

    ``clients``: ``{teacher_id: client}`` (teachers.make_client); ``configs``: their
    TeacherConfig; ``judge``: an optional client grading answers 1-5; ``spent_usd``: what the run
    already cost (budget accounting); ``emit``: called in the event loop's thread per sample."""

    def __init__(self, task: TaskSpec, clients: dict, configs: dict[int, TeacherConfig], *, emit: Callable[[SampleResult], None],
                 samples_per_query: int = 1, concurrency: int = 16, budget_usd: float | None = None,
                 spent_usd: float = 0.0, judge=None, seen: set[str] | None = None) -> None:
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        self.task = task
        self.clients = clients
        self.configs = configs
        self.emit = emit
        self.samples_per_query = max(1, int(samples_per_query))
        self.concurrency = concurrency
        self.budget_usd = budget_usd
        self.spent_usd = spent_usd
        self.reserved_usd = 0.0
        self.judge = judge
        self.seen = seen if seen is not None else set()
        self.stop_reason: str | None = None
        self.stop_message: str = ""
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks: list[asyncio.Task] = []
        self._lock = threading.Lock()
        for c in clients.values():
            if isinstance(c, EnsembleTeacher):
                c.pick = self._ensemble_pick

    # -- control -----------------------------------------------------------------------------
    def stop(self, reason: str, message: str = "", *, grace_s: float = 0.0) -> None:
        """Stop the run (thread-safe): nothing new starts; requests in flight get ``grace_s``
        seconds to finish (their answers, already paid for, are kept), then are cancelled."""
        with self._lock:
            if self.stop_reason is None:
                self.stop_reason, self.stop_message = reason, message or reason
        loop = self._loop
        if loop is not None and not loop.is_closed():
            try:
                if grace_s > 0:
                    loop.call_soon_threadsafe(loop.call_later, grace_s, self._cancel_all)
                else:
                    loop.call_soon_threadsafe(self._cancel_all)
            except RuntimeError:  # the loop closed meanwhile: nothing left to cancel
                pass

    def sync_spent(self, run_total_usd: float) -> None:
        """Thread-safe: raise the spent figure to the run's total cost so far (written by every
        worker), so chunks on several workers respect one budget."""
        loop = self._loop
        if loop is not None and not loop.is_closed():
            def apply() -> None:
                self.spent_usd = max(self.spent_usd, run_total_usd)

            try:
                loop.call_soon_threadsafe(apply)
            except RuntimeError:
                pass

    def _cancel_all(self) -> None:
        for t in self._tasks:
            t.cancel()

    # -- running -----------------------------------------------------------------------------
    async def run(self, groups: list[Group]) -> str | None:
        """Answer every group; returns the stop reason or None when all were answered."""
        self._loop = asyncio.get_running_loop()
        self._sem = asyncio.Semaphore(self.concurrency)
        if self.stop_reason:
            return self.stop_reason
        self._tasks = [asyncio.create_task(self._group(g)) for g in groups]
        try:
            results = await asyncio.gather(*self._tasks, return_exceptions=True)
        finally:
            for c in {id(c): c for c in list(self.clients.values()) + ([self.judge] if self.judge else [])}.values():
                try:
                    await c.close()
                except Exception:  # noqa: BLE001 - closing is best effort
                    pass
        for r in results:
            if isinstance(r, RunStopped):
                self.stop(r.reason, str(r))
            elif isinstance(r, BaseException) and not isinstance(r, asyncio.CancelledError):
                raise r
        return self.stop_reason

    async def _call(self, client, cfg: TeacherConfig, messages: list[dict], seed: int) -> TeacherReply:
        async with self._sem:
            if self.stop_reason:
                raise asyncio.CancelledError()  # stopping: start nothing new
            est = cfg.estimate_cost_usd(messages) * max(1, len(cfg.members))
            if self.budget_usd is not None and self.spent_usd + self.reserved_usd + est > self.budget_usd:
                exc = RunStopped("budget", f"the budget of ${self.budget_usd:.4f} would be passed "
                                           f"(spent ${self.spent_usd:.4f}, next request up to ${est:.4f})")
                self.stop(exc.reason, str(exc))
                raise exc
            self.reserved_usd += est
            try:
                reply = await client.answer(messages, seed=seed)
            except RunStopped as exc:
                self.stop(exc.reason, str(exc))
                raise
            finally:
                self.reserved_usd -= est
            self.spent_usd += reply.cost_usd
            return reply

    async def _group(self, g: Group) -> None:
        cfg = self.configs[g.teacher_id]
        client = self.clients[g.teacher_id]
        messages = teacher_messages(self.task, g.query.text)
        n = effective_samples_per_query(cfg, self.task, self.samples_per_query)
        drawn: list[SampleResult] = []
        for i in range(g.start_index, n):
            if self.stop_reason:
                return
            reply = await self._call(client, cfg, messages, slot_seed(g.query.query_id, g.teacher_id, i))
            res = self._result(g, i, messages, reply)
            if self.judge is not None and res.status == "accepted":
                await self._judge(g, res)
            if self.judge is None:
                self._emit(res)
                if res.status == "accepted":
                    return
            else:
                drawn.append(res)
        if drawn:
            passing = [r for r in drawn if r.status == "accepted"]
            if len(passing) > 1:
                best = max(passing, key=lambda r: (r.judge_score or 0, -r.sample_index))
                for r in passing:
                    if r is not best:
                        r.status = "rejected"
                        r.checks.append(CheckResult("best_of_n", False, f"sample {best.sample_index} scored higher "
                                                                        f"({best.judge_score}/5)").as_dict())
                        r.failed_checks.append("best_of_n")
            for r in drawn:
                self._emit(r)

    def _emit(self, res: SampleResult) -> None:
        if res.status == "accepted" and res.response:
            self.seen.add(normalise_for_duplicate(res.response))
        self.emit(res)

    def _result(self, g: Group, index: int, messages: list[dict], reply: TeacherReply) -> SampleResult:
        base = dict(query_id=g.query.query_id, teacher_id=g.teacher_id, sample_index=index, prompt=messages,
                    response=reply.text, finish_reason=reply.finish_reason, input_tokens=reply.input_tokens,
                    output_tokens=reply.output_tokens, cost_usd=reply.cost_usd, latency_ms=reply.latency_ms,
                    label_probs=reply.label_probs, token_logprobs=reply.token_logprobs)
        if reply.failed:
            return SampleResult(status="failed", error=reply.error,
                                checks=[{"name": reply.error_kind or "error", "passed": False, "reason": reply.error}],
                                failed_checks=[reply.error_kind or "error"], **base)
        verdict = run_checks(Answer(reply.text, reply.finish_reason, reply.label_probs), self.task, seen=self.seen)
        checks = [c.as_dict() for c in verdict.checks]
        checks += [{"name": n, "passed": p, "reason": r} for n, p, r in reply.extra_checks]
        return SampleResult(status="accepted" if verdict.accepted else "rejected", parsed=verdict.parsed, checks=checks,
                            failed_checks=verdict.failed, **base)

    async def _judge(self, g: Group, res: SampleResult) -> None:
        s = self.task.checks or {}
        msgs = judge_messages(self.task, g.query.text, res.response or "", s.get("judge_rubric"))
        jcfg = getattr(self.judge, "cfg", None)
        reply = await self._call(self.judge, jcfg, msgs, 0) if jcfg else await self.judge.answer(msgs)
        res.input_tokens += reply.input_tokens
        res.output_tokens += reply.output_tokens
        res.cost_usd += reply.cost_usd
        if reply.failed:
            c = CheckResult("judge", False, f"the judge call failed: {reply.error}")
        else:
            res.judge_score = parse_judge_score(reply.text)
            c = check_judge(res.judge_score, s)
        res.checks.append(c.as_dict())
        if not c.passed:
            res.status = "rejected"
            res.failed_checks.append(c.name)

    def _ensemble_pick(self, replies: list[TeacherReply]) -> tuple[int, str]:
        """For an ensemble on a non-classification task: the first member answer that passes
        the checks, else the first answer."""
        for i, r in enumerate(replies):
            if run_checks(Answer(r.text, r.finish_reason, r.label_probs), self.task, seen=self.seen).accepted:
                return i, f"kept member answer {i + 1} of {len(replies)}, the first that passes the checks"
        return 0, f"no member answer passes the checks; kept the first of {len(replies)}"
