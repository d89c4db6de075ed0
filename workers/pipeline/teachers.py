"""Teacher clients: an OpenAI-compatible Chat Completions endpoint, a local transformers model,
and an ensemble of teachers. Each answers one chat (a list of messages) asynchronously and
returns a ``TeacherReply``.

Faults: transient ones (timeouts, connection errors, 429 rate limits, 5xx) are retried with
exponential backoff (0.5 s, 1 s, 2 s, ... capped at 30 s, with jitter) that honours the
server's ``Retry-After``; after ``max_retries`` they end as a failed reply with ``error_kind``
``timeout``/``rate_limited``/``server_error``/``connection``. ``insufficient_quota`` (a 429 whose
error code says the account is out of credit) and authentication errors raise ``RunStopped``:
no retry can succeed, so the whole run stops at once with that reason.

Before a client reads a key, sends a request or loads a model, it checks its settings against
the operator's ``workers.pipeline.security.SecurityPolicy`` (``TeacherConfig.policy``, default
read from the environment): a refused key variable, URL or model raises ``RunStopped("refused")``.
"""
from __future__ import annotations

import asyncio
import math
import os
import random
import time
from dataclasses import dataclass, field

from workers.pipeline.prompts import _norm_label


class RunStopped(Exception):
    """The run must stop now (``reason``: ``insufficient_quota``, ``authentication``,
    ``budget``, ``cancelled``, ``refused``); the message says why."""

    def __init__(self, reason: str, message: str = "") -> None:
        super().__init__(message or reason)
        self.reason = reason


@dataclass(frozen=True)
class TeacherConfig:
    """A teacher's settings as plain data. Prices in USD per 1M tokens; ``timeout_s`` per
    request; ``members`` for an ensemble; ``policy``: the operator's ``SecurityPolicy`` the
    client checks its settings against (None: read from the environment); ``cache_dir``: where a
    local teacher's bundled model is converted and kept (the worker passes the
    ``MODEL_CACHE_DIR`` setting; None: ``registry.default_cache_dir()``)."""

    id: int
    name: str
    provider: str
    model: str = ""
    base_url: str = ""
    api_key_env: str = ""
    temperature: float = 0.3
    max_tokens: int = 256
    top_logprobs: int | None = None
    timeout_s: float = 60.0
    price_in_per_1m: float = 0.0
    price_out_per_1m: float = 0.0
    max_retries: int = 4
    members: tuple["TeacherConfig", ...] = ()
    policy: object | None = None
    cache_dir: str | None = None

    def cost_usd(self, input_tokens: int, output_tokens: int) -> float:
        """USD = tokens_in * price_in / 1e6 + tokens_out * price_out / 1e6."""
        return input_tokens * self.price_in_per_1m / 1e6 + output_tokens * self.price_out_per_1m / 1e6

    def estimate_cost_usd(self, messages: list[dict]) -> float:
        """Upper-bound estimate for one request before it is sent (budget check): prompt
        characters / 3 as input tokens (a generous tokens-per-character ratio) and
        ``max_tokens`` as output tokens."""
        chars = sum(len(str(m.get("content") or "")) for m in messages)
        return self.cost_usd(math.ceil(chars / 3) + 8, self.max_tokens)


@dataclass
class TeacherReply:
    """One teacher call's outcome. ``text`` may be None (no content, e.g. content_filter, or a
    failed call with ``error`` set). Tokens are counts, cost in USD, latency in ms (last
    attempt). ``label_probs``: ``{label: probability}`` soft labels when known."""

    text: str | None
    finish_reason: str = ""
    input_tokens: int = 0
    output_tokens: int = 0
    cost_usd: float = 0.0
    latency_ms: float = 0.0
    label_probs: dict[str, float] | None = None
    token_logprobs: list | None = None
    error: str = ""
    error_kind: str = ""
    attempts: int = 1
    extra_checks: list = field(default_factory=list)

    @property
    def failed(self) -> bool:
        return bool(self.error)


def backoff_s(attempt: int, retry_after: float | None = None, *, base: float = 0.5, cap: float = 30.0) -> float:
    """Seconds to wait before retry ``attempt`` (1-based): the server's Retry-After when given
    (capped at 120 s), else ``base * 2**(attempt-1)`` capped at ``cap``, with +-20 % jitter."""
    if retry_after is not None and retry_after >= 0:
        return min(retry_after, 120.0)
    return min(cap, base * 2 ** (attempt - 1)) * random.uniform(0.8, 1.2)


def _retry_after(headers) -> float | None:
    if headers is None:
        return None
    for key in ("retry-after-ms", "retry-after"):
        v = headers.get(key)
        if v is None:
            continue
        try:
            return float(v) / (1000.0 if key.endswith("-ms") else 1.0)
        except ValueError:
            from email.utils import parsedate_to_datetime

            try:
                return max(0.0, parsedate_to_datetime(v).timestamp() - time.time())
            except (TypeError, ValueError):
                return None
    return None


def label_probs_from_top_logprobs(top: list[tuple[str, float]], labels: tuple[str, ...]) -> dict[str, float] | None:
    """Soft labels from an API's first-token ``top_logprobs`` (``[(token, logprob)]``): each
    token's probability goes to the labels whose normalised text starts with the token's
    (split evenly between them); renormalised over the labels. None when no token matches."""
    if not top or not labels:
        return None
    normed = {l: _norm_label(l) for l in labels}
    mass = {l: 0.0 for l in labels}
    for tok, lp in top:
        t = _norm_label(tok)
        if not t:
            continue
        hits = [l for l, n in normed.items() if n.startswith(t)]
        for l in hits:
            mass[l] += math.exp(lp) / len(hits)
    z = sum(mass.values())
    if z <= 0:
        return None
    return {l: m / z for l, m in mass.items()}


class OpenAITeacher:
    """Any OpenAI-compatible Chat Completions endpoint via ``openai.AsyncOpenAI`` (OpenAI, Azure,
    vLLM, Ollama, llama.cpp's server, gateways). The key is read from the environment variable
    ``api_key_env`` at call time and never stored; servers without auth get a placeholder.

    Raises RunStopped (``refused``) when the operator's policy refuses ``api_key_env`` or
    ``base_url`` (checked here, right before the requests: the host is resolved again)."""

    def __init__(self, cfg: TeacherConfig, labels: tuple[str, ...] = ()) -> None:
        import openai

        from workers.pipeline.security import Refused, SecurityPolicy, check_key_env, check_teacher_url

        self.cfg = cfg
        self.labels = labels
        policy = cfg.policy if cfg.policy is not None else SecurityPolicy.from_env()
        try:
            check_key_env(cfg.api_key_env, policy=policy)
            check_teacher_url(cfg.base_url, policy=policy, require_resolution=True)
        except Refused as exc:
            raise RunStopped("refused", f"teacher {cfg.name}: {exc}") from None
        key = os.environ.get(cfg.api_key_env, "") if cfg.api_key_env else ""
        if cfg.api_key_env and not key:
            raise RunStopped("authentication", f"teacher {cfg.name}: environment variable {cfg.api_key_env} is not set")
        self.client = openai.AsyncOpenAI(api_key=key or "not-needed", base_url=cfg.base_url or None,
                                         timeout=cfg.timeout_s, max_retries=0)

    async def close(self) -> None:
        await self.client.close()

    async def answer(self, messages: list[dict], *, seed: int | None = None, temperature: float | None = None) -> TeacherReply:
        """Send one chat; retry transient faults; raise RunStopped on quota/auth errors."""
        import openai

        cfg = self.cfg
        kwargs: dict = {"model": cfg.model or "default", "messages": messages, "max_tokens": cfg.max_tokens,
                        "temperature": cfg.temperature if temperature is None else temperature}
        if cfg.top_logprobs:
            kwargs.update(logprobs=True, top_logprobs=int(cfg.top_logprobs))
        attempt = 0
        while True:
            attempt += 1
            t0 = time.perf_counter()
            retry_after: float | None = None
            try:
                # POST the Chat Completions body through the client (auth, base URL, timeout and
                # typed errors from the openai package) and read the JSON ourselves: skipping the
                # SDK's request transform and response models halves the CPU per request.
                raw = await self.client.post("/chat/completions", body=kwargs, cast_to=_http_response_class())
                resp = raw.json()
            except openai.RateLimitError as exc:
                code = _error_code(exc)
                if code == "insufficient_quota":
                    raise RunStopped("insufficient_quota", f"teacher {cfg.name}: insufficient_quota: {_error_message(exc)}") from None
                kind, err = "rate_limited", f"429 rate limited: {_error_message(exc)}"
                retry_after = _retry_after(exc.response.headers)
            except openai.AuthenticationError as exc:
                raise RunStopped("authentication", f"teacher {cfg.name}: authentication failed ({_error_message(exc)}); "
                                 f"check the key in {cfg.api_key_env or 'its environment variable'}") from None
            except openai.APITimeoutError:
                kind, err = "timeout", f"no answer within {cfg.timeout_s:g} s"
            except openai.APIConnectionError as exc:
                kind, err = "connection", f"connection error: {exc}"
            except openai.InternalServerError as exc:
                kind, err = "server_error", f"{exc.status_code} server error: {_error_message(exc)}"
                retry_after = _retry_after(exc.response.headers)
            except openai.APIStatusError as exc:
                # 400/404/422...: the request itself is wrong; retrying will not help.
                return TeacherReply(text=None, error=f"{exc.status_code}: {_error_message(exc)}", error_kind="bad_request",
                                    attempts=attempt, latency_ms=(time.perf_counter() - t0) * 1000)
            except (openai.APIResponseValidationError, ValueError) as exc:
                return TeacherReply(text=None, error=f"invalid response: {exc}", error_kind="invalid_response",
                                    attempts=attempt, latency_ms=(time.perf_counter() - t0) * 1000)
            else:
                return self._reply(resp, attempt, (time.perf_counter() - t0) * 1000)
            if attempt > cfg.max_retries:
                return TeacherReply(text=None, error=f"{err} (after {attempt} attempts)", error_kind=kind,
                                    attempts=attempt, latency_ms=(time.perf_counter() - t0) * 1000)
            await asyncio.sleep(backoff_s(attempt, retry_after))

    def _reply(self, resp: dict, attempt: int, latency_ms: float) -> TeacherReply:
        """A TeacherReply from a Chat Completions response body (a dict)."""
        choices = resp.get("choices") if isinstance(resp, dict) else None
        if not choices:
            return TeacherReply(text=None, error="the response has no choices", error_kind="invalid_response",
                                attempts=attempt, latency_ms=latency_ms)
        choice = choices[0] or {}
        usage = resp.get("usage") or {}
        tin = int(usage.get("prompt_tokens") or 0)
        tout = int(usage.get("completion_tokens") or 0)
        content = (choice.get("message") or {}).get("content")
        token_logprobs = None
        label_probs = None
        lp_content = (choice.get("logprobs") or {}).get("content") or []
        if lp_content:
            token_logprobs = [{"token": t.get("token"), "logprob": t.get("logprob"),
                               "top": [[x.get("token"), x.get("logprob")] for x in (t.get("top_logprobs") or [])]}
                              for t in lp_content[:64]]
            if self.labels:
                label_probs = label_probs_from_top_logprobs(
                    [(x.get("token") or "", float(x.get("logprob") or -1e9)) for x in (lp_content[0].get("top_logprobs") or [])],
                    self.labels)
        return TeacherReply(text=content, finish_reason=choice.get("finish_reason") or "", input_tokens=tin,
                            output_tokens=tout, cost_usd=self.cfg.cost_usd(tin, tout), latency_ms=latency_ms,
                            label_probs=label_probs, token_logprobs=token_logprobs, attempts=attempt)


def _http_response_class():
    """The HTTP response class of the openai package's HTTP client (httpx or its fork)."""
    try:
        import httpx2

        return httpx2.Response
    except ImportError:  # older openai releases use httpx
        import httpx

        return httpx.Response


def _error_code(exc) -> str:
    body = getattr(exc, "body", None)
    if isinstance(body, dict):
        err = body.get("error", body)
        if isinstance(err, dict) and err.get("code"):
            return str(err.get("code"))
        if isinstance(err, dict) and err.get("type"):
            return str(err.get("type"))
    return str(getattr(exc, "code", "") or "")


def _error_message(exc) -> str:
    body = getattr(exc, "body", None)
    if isinstance(body, dict):
        err = body.get("error", body)
        if isinstance(err, dict) and err.get("message"):
            return str(err["message"])[:300]
    return str(exc)[:300]


class LocalTeacher:
    """A local causal LM run in the worker process (``workers.pipeline.local_lm.load_cached``:
    loaded once per process). For classification it scores every label instead of sampling
    (``LocalCausalLM.score_labels``): the answer is the most probable label and
    ``label_probs`` the soft labels; otherwise it generates (greedy at temperature 0)."""

    scored_task_types = ("classification",)

    def __init__(self, cfg: TeacherConfig, labels: tuple[str, ...] = (), task_type: str = "generation") -> None:
        from workers.pipeline.local_lm import load_cached
        from workers.pipeline.registry import SMOLLM2

        self.cfg = cfg
        self.labels = labels
        self.task_type = task_type
        self.lm = load_cached(cfg.model or SMOLLM2, policy=cfg.policy, cache_dir=cfg.cache_dir)

    @property
    def deterministic(self) -> bool:
        """True when a second sample would give the same answer (scored labels, greedy)."""
        return (self.task_type in self.scored_task_types and bool(self.labels)) or self.cfg.temperature <= 0

    async def close(self) -> None:
        return None

    async def answer(self, messages: list[dict], *, seed: int | None = None, temperature: float | None = None) -> TeacherReply:
        # One forward pass at a time: torch already uses every core for one, and queued calls
        # must not count their wait as the teacher's latency.
        async with self._serial():
            return await asyncio.to_thread(self._answer_sync, messages, seed, temperature)

    def _serial(self) -> asyncio.Lock:
        loop = asyncio.get_running_loop()
        if getattr(self, "_lock_loop", None) is not loop:
            self._lock, self._lock_loop = asyncio.Lock(), loop
        return self._lock

    def _answer_sync(self, messages, seed, temperature) -> TeacherReply:
        t0 = time.perf_counter()
        try:
            if self.task_type in self.scored_task_types and self.labels:
                probs = self.lm.score_labels(messages, list(self.labels))
                label = max(probs, key=probs.get)
                tin = len(self.lm._encode(self.lm.chat_text(messages)))
                tout = len(self.lm._encode(label)) + 1
                return TeacherReply(text=label, finish_reason="stop", input_tokens=tin, output_tokens=tout,
                                    cost_usd=self.cfg.cost_usd(tin, tout), latency_ms=(time.perf_counter() - t0) * 1000,
                                    label_probs=probs)
            g = self.lm.generate(messages, max_new_tokens=self.cfg.max_tokens,
                                 temperature=self.cfg.temperature if temperature is None else temperature, seed=seed)
            return TeacherReply(text=g.text, finish_reason=g.finish_reason, input_tokens=g.input_tokens,
                                output_tokens=g.output_tokens, cost_usd=self.cfg.cost_usd(g.input_tokens, g.output_tokens),
                                latency_ms=g.latency_ms)
        except Exception as exc:  # noqa: BLE001 - a local model fault fails this sample, not the run
            return TeacherReply(text=None, error=f"local model error: {exc}", error_kind="local_error",
                                latency_ms=(time.perf_counter() - t0) * 1000)


def make_client(cfg: TeacherConfig, *, labels: tuple[str, ...], task_type: str):
    """The client for ``cfg``: OpenAITeacher, LocalTeacher or EnsembleTeacher. Raises
    RunStopped (authentication) when the key's environment variable is missing, RunStopped
    (refused) when the operator's policy refuses a setting, ValueError for an unknown provider."""
    from workers.pipeline.security import Refused

    if cfg.provider == "openai":
        return OpenAITeacher(cfg, labels)
    if cfg.provider == "transformers":
        try:
            return LocalTeacher(cfg, labels, task_type)
        except Refused as exc:
            raise RunStopped("refused", f"teacher {cfg.name}: {exc}") from None
    if cfg.provider == "ensemble":
        return EnsembleTeacher(cfg, [make_client(m, labels=labels, task_type=task_type) for m in cfg.members], labels, task_type)
    raise ValueError(f"teacher {cfg.name}: unknown provider {cfg.provider!r}")


class EnsembleTeacher:
    """Several teachers answer the same chat. Classification: average their label
    probabilities (members without probabilities count as one-hot on the label they named);
    with no probabilities at all, a majority vote (ties go to the earlier member). Other tasks:
    ``pick`` (set by the generation pipeline) keeps the best answer that passes the checks,
    else the first member's. Tokens and cost are summed over members."""

    def __init__(self, cfg: TeacherConfig, members: list, labels: tuple[str, ...], task_type: str) -> None:
        if not members:
            raise ValueError(f"ensemble {cfg.name} has no members")
        self.cfg = cfg
        self.members = members
        self.labels = labels
        self.task_type = task_type
        self.pick = None  # callable(list[TeacherReply]) -> (index, extra check) for non-classification

    @property
    def deterministic(self) -> bool:
        return all(getattr(m, "deterministic", False) for m in self.members)

    async def close(self) -> None:
        for m in self.members:
            await m.close()

    async def answer(self, messages: list[dict], *, seed: int | None = None, temperature: float | None = None) -> TeacherReply:
        from workers.pipeline.prompts import match_label

        replies = await asyncio.gather(*(m.answer(messages, seed=seed, temperature=temperature) for m in self.members))
        ok = [r for r in replies if not r.failed]
        total = dict(input_tokens=sum(r.input_tokens for r in replies), output_tokens=sum(r.output_tokens for r in replies),
                     cost_usd=sum(r.cost_usd for r in replies), latency_ms=max(r.latency_ms for r in replies))
        if not ok:
            return TeacherReply(text=None, error="; ".join(r.error for r in replies), error_kind=replies[0].error_kind, **total)
        if self.task_type == "classification" and self.labels:
            dists = []
            for r in ok:
                if r.label_probs:
                    dists.append(r.label_probs)
                else:
                    lab = match_label(r.text, self.labels)
                    if lab is not None:
                        dists.append({l: 1.0 if l == lab else 0.0 for l in self.labels})
            if not dists:
                return TeacherReply(text=ok[0].text, finish_reason=ok[0].finish_reason, **total)
            avg = {l: sum(d.get(l, 0.0) for d in dists) / len(dists) for l in self.labels}
            best = max(self.labels, key=lambda l: avg[l])  # max keeps the first on ties
            have_probs = any(r.label_probs for r in ok)
            return TeacherReply(text=best, finish_reason="stop", label_probs=avg if have_probs else None,
                                extra_checks=[("ensemble", True, f"{'mean probability' if have_probs else 'majority vote'} "
                                                                 f"of {len(dists)} member(s)")], **total)
        idx, note = (self.pick(ok) if self.pick else (0, "first member"))
        chosen = ok[idx]
        return TeacherReply(text=chosen.text, finish_reason=chosen.finish_reason, label_probs=chosen.label_probs,
                            token_logprobs=chosen.token_logprobs, extra_checks=[("ensemble", True, note)], **total)
