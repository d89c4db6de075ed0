"""``distill serve-student``: one model loaded once and answered over the OpenAI chat-completions
wire format, so a deployment points at it by URL (``student_url``), as it would at vLLM or a
llama.cpp server.

Each answer carries its confidence in an extension field, ``"distillhub": {"confidence": x}``:
a classifier's top-label probability, or a causal LM's mean token log-probability of its own
answer (natural log; also as ``choices[0].logprobs`` when the request asks for ``logprobs``).
A local (transformers) teacher is served the same way; for a classification project it scores
the project's labels and answers the most probable one, as generation's local teacher does
(``workers.pipeline.teachers.LocalTeacher``), so its answers pass the label check when they are
harvested from the request log. Requests are answered one at a time (the
model holds a lock); run more copies behind the gateway for more throughput, or use vLLM."""
from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass


@dataclass(frozen=True)
class ServeTarget:
    """What to serve: ``kind`` is ``classifier`` or a causal-LM artifact kind (``merged``,
    ``int8``, ``adapter``, ``base``); ``path`` a folder or model name; ``name`` the model id
    it answers to; ``policy`` the ``workers.pipeline.security.SecurityPolicy`` that allows
    loading ``path`` (None: the operator's, from the environment); ``labels``: a classification
    project's label set, which a served teacher scores instead of generating free text (empty:
    generate)."""

    kind: str
    path: str
    name: str
    policy: object = None
    labels: tuple[str, ...] = ()


def serve_target(*, artifact_id: int | None = None, teacher: str | None = None):
    """What ``distill serve-student`` serves: artifact ``artifact_id`` (classifier, merged, int8
    or adapter) or the local teacher ``"PROJECT_SLUG:NAME"``. Returns a
    ``ServeTarget`` whose ``policy`` allows exactly what it loads (the
    artifact's folder, with its project's other artifacts for an adapter's base; a teacher's
    ``artifact:<id>`` resolved to that folder). Raises InvalidInput naming the option, also for
    an artifact whose stored path leaves the media folder."""
    from pathlib import Path

    from projects.models import ModelArtifact, Teacher
    from projects.services import InvalidInput, InvalidState
    from projects.services.security import artifact_folder, model_ref_resolve, project_model_policy

    if artifact_id is not None:
        art = ModelArtifact.objects.filter(pk=artifact_id).first()
        if art is None:
            raise InvalidInput(f"--artifact: no artifact with id {artifact_id}")
        if art.kind not in ("classifier", "merged", "int8", "adapter"):
            raise InvalidInput(f"--artifact: a {art.kind!r} artifact cannot answer")
        try:
            path = Path(artifact_folder(artifact=art))
        except InvalidState as exc:
            raise InvalidInput(f"--artifact: {exc}") from None
        if not path.exists():
            raise InvalidInput(f"--artifact: the files of artifact {art.pk} are missing ({path})")
        return ServeTarget(kind=art.kind, path=str(path), name=f"artifact-{art.pk}",
                           policy=project_model_policy(project=art.project).with_model_dirs(str(path)))
    slug, _, name = (teacher or "").partition(":")
    t = Teacher.objects.filter(project__slug=slug, name=name).select_related("project").first()
    if t is None:
        raise InvalidInput(f"--teacher: no teacher {name!r} in project {slug!r} (give PROJECT_SLUG:NAME)")
    if t.provider != Teacher.Provider.TRANSFORMERS:
        raise InvalidInput(f"--teacher: {t.name!r} is not a local (transformers) teacher; the gateway calls it directly")
    try:
        path, policy = model_ref_resolve(project=t.project, ref=t.model, field="--teacher", kinds=("merged",))
    except InvalidState as exc:
        raise InvalidInput(f"--teacher: {exc}") from None
    labels = tuple(t.project.labels or ()) if t.project.task_type == "classification" else ()
    return ServeTarget(kind="base", path=path, name=t.model or t.name, policy=policy, labels=labels)


class Model:
    """The loaded model behind the server."""

    def __init__(self, target: ServeTarget) -> None:
        self.target = target
        if target.kind == "classifier":
            from gateway.upstream import load_classifier

            load_classifier(target.path)
            self.lm = None
        else:
            from workers.pipeline.local_lm import load_cached

            self.lm = load_cached(target.path, kind=target.kind, policy=target.policy)

    def answer(self, messages: list[dict], *, max_tokens: int = 256, temperature: float = 0.0) -> dict:
        """``{text, finish_reason, input_tokens, output_tokens, confidence, token_logprobs}`` (and
        ``label_probs`` from a classifier or a label-scoring teacher). ``confidence``: a
        classifier's top-label probability, otherwise the mean token log-probability of the
        answer (natural log)."""
        if self.lm is None:
            from gateway.routing import last_user_text
            from gateway.upstream import classify_text

            r = classify_text(self.target.path, last_user_text(messages) or "")
            return {"text": r.text, "finish_reason": "stop", "input_tokens": r.input_tokens, "output_tokens": 1,
                    "confidence": r.confidence, "token_logprobs": None, "label_probs": r.extra.get("label_probs")}
        if self.target.labels:
            # Scored, not sampled (as generation's LocalTeacher): the answer is always a label.
            probs = self.lm.score_labels(messages, list(self.target.labels))
            label = max(self.target.labels, key=probs.get)  # max keeps the first on ties
            lps = answer_logprobs(self.lm, messages, label)
            conf = sum(lp for _, lp in lps) / len(lps) if lps else None
            return {"text": label, "finish_reason": "stop",
                    "input_tokens": len(self.lm._encode(self.lm.chat_text(messages))), "output_tokens": len(lps) + 1,
                    "confidence": conf, "token_logprobs": lps, "label_probs": probs}
        g = self.lm.generate(messages, max_new_tokens=max_tokens, temperature=temperature)
        lps = answer_logprobs(self.lm, messages, g.text)
        conf = sum(lp for _, lp in lps) / len(lps) if lps else None
        return {"text": g.text, "finish_reason": g.finish_reason, "input_tokens": g.input_tokens,
                "output_tokens": g.output_tokens, "confidence": conf, "token_logprobs": lps}


def answer_logprobs(lm, messages: list[dict], text: str) -> list[tuple[str, float]]:
    """``[(token, log p)]`` of ``text`` as the answer to ``messages`` under ``lm`` (one forward
    pass over prompt + answer; natural log)."""
    import torch

    prompt = lm._encode(lm.chat_text(messages))
    ans = lm._encode(text)
    if not ans:
        return []
    ids = torch.tensor([prompt + ans], device=lm.device)
    with lm._lock, torch.inference_mode():
        logits = lm.model(input_ids=ids).logits[0, len(prompt) - 1:-1].float()
    lp = torch.log_softmax(logits, dim=-1)
    vals = lp[torch.arange(len(ans)), torch.tensor(ans, device=lp.device)].tolist()
    return [(lm.tokenizer.decode([t]), v) for t, v in zip(ans, vals)]


def build_app(model: Model):
    """The Starlette app answering ``POST /v1/chat/completions`` and ``GET /v1/models``."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    lock = asyncio.Lock()

    async def completions(request: Request):
        try:
            body = await request.json()
            messages = body["messages"]
            assert isinstance(messages, list)
        except (ValueError, KeyError, AssertionError, TypeError):
            return JSONResponse({"error": {"message": "messages: a list of chat messages is required",
                                           "type": "invalid_request_error"}}, status_code=400)
        async with lock:
            out = await asyncio.to_thread(model.answer, messages, max_tokens=int(body.get("max_tokens") or 256),
                                          temperature=float(body.get("temperature") or 0.0))
        logprobs = None
        if body.get("logprobs") and out["token_logprobs"] is not None:
            logprobs = {"content": [{"token": t, "logprob": lp, "bytes": None, "top_logprobs": []}
                                    for t, lp in out["token_logprobs"]]}
        ext = {"confidence": out["confidence"]}
        if out.get("label_probs"):
            ext["label_probs"] = out["label_probs"]
        return JSONResponse({
            "id": "chatcmpl-" + uuid.uuid4().hex[:24], "object": "chat.completion", "created": int(time.time()),
            "model": model.target.name,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": out["text"]}, "logprobs": logprobs,
                         "finish_reason": out["finish_reason"]}],
            "usage": {"prompt_tokens": out["input_tokens"], "completion_tokens": out["output_tokens"],
                      "total_tokens": out["input_tokens"] + out["output_tokens"]},
            "distillhub": ext})

    async def models(request: Request):
        return JSONResponse({"object": "list", "data": [{"id": model.target.name, "object": "model", "created": 0,
                                                          "owned_by": "distillhub"}]})

    return Starlette(routes=[Route("/v1/chat/completions", completions, methods=["POST"]),
                             Route("/v1/models", models, methods=["GET"])])


def run_server(target: ServeTarget, *, host: str, port: int) -> None:
    """Load ``target`` once and serve it until interrupted."""
    import uvicorn

    model = Model(target)
    print(f"serving {target.name} ({target.kind}) at http://{host}:{port}/v1", flush=True)
    uvicorn.run(build_app(model), host=host, port=port, log_level="warning", access_log=False)
