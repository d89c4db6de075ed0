"""A causal language model run in-process with transformers: the local teacher, the base student
and trained student artifacts all go through this one class.

Artifact formats it loads (``kind``):

- ``base`` / ``merged``: a Hugging Face causal-LM folder (or a bundled short name / hub id).
- ``adapter``: a PEFT adapter folder; its base model comes from ``adapter_config.json``
  (``base_model_name_or_path``, which may be a bundled short name).
- ``int8``: a folder with the tokenizer files and ``model_int8.pt``, a ``torch.save`` of the whole
  module after ``torch.ao.quantization.quantize_dynamic`` (Linear layers to qint8; CPU only).
"""
from __future__ import annotations

import json
import math
import threading
import time
from dataclasses import dataclass
from pathlib import Path

INT8_FILE = "model_int8.pt"


@dataclass
class Generation:
    """One generated answer. ``finish_reason``: ``stop`` (end token) or ``length`` (hit
    ``max_new_tokens``). Tokens are counts; latency in milliseconds."""

    text: str
    finish_reason: str
    input_tokens: int
    output_tokens: int
    latency_ms: float


def pick_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


class LocalCausalLM:
    """A loaded causal LM and its tokenizer. Thread-safe for sequential use (a lock serialises
    calls). Load with ``LocalCausalLM.load``; instances are cached per (path, kind) in-process
    by ``load_cached`` so a worker loads a model once and keeps it."""

    def __init__(self, model, tokenizer, name: str, device: str) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.name = name
        self.device = device
        self._lock = threading.Lock()
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token

    # -- loading ---------------------------------------------------------------------------
    @classmethod
    def load(cls, path_or_name: str, *, kind: str = "base", device: str | None = None,
             cache_dir: str | None = None, policy=None) -> "LocalCausalLM":
        """Load a model of ``kind`` (see the module docstring). ``path_or_name`` (and an
        adapter's base) must pass ``security.check_model_name`` under ``policy`` (default: read
        from the environment): a folder only under the policy's ``model_dirs``. Raises
        ``security.Refused`` for anything else, FileNotFoundError when a folder lacks its files
        and ValueError for an unknown kind."""
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from workers.pipeline.registry import resolve_model

        policy = checked_policy(path_or_name, policy)
        device = device or pick_device()
        dtype = torch.bfloat16 if device == "cuda" else torch.float32
        if kind in ("base", "merged"):
            src = resolve_model(path_or_name, cache_dir, policy=policy)
            tok = AutoTokenizer.from_pretrained(src)
            model = AutoModelForCausalLM.from_pretrained(src, dtype=dtype)
        elif kind == "adapter":
            from peft import PeftModel

            cfg_path = Path(path_or_name) / "adapter_config.json"
            if not cfg_path.exists():
                raise FileNotFoundError(f"{cfg_path} is missing: not a PEFT adapter folder")
            base = json.loads(cfg_path.read_text())["base_model_name_or_path"]
            src = resolve_model(base, cache_dir, policy=policy)
            tok_src = path_or_name if (Path(path_or_name) / "tokenizer_config.json").exists() else src
            tok = AutoTokenizer.from_pretrained(tok_src)
            model = AutoModelForCausalLM.from_pretrained(src, dtype=dtype)
            model = PeftModel.from_pretrained(model, path_or_name)
        elif kind == "int8":
            f = Path(path_or_name) / INT8_FILE
            if not f.exists():
                raise FileNotFoundError(f"{f} is missing: not an INT8 artifact folder")
            device = "cpu"  # dynamic INT8 kernels are CPU kernels
            tok = AutoTokenizer.from_pretrained(path_or_name)
            model = torch.load(f, weights_only=False, map_location="cpu")
        else:
            raise ValueError(f"kind: {kind!r} is not one of base, merged, adapter, int8")
        model.to(device) if kind != "int8" else None
        model.eval()
        return cls(model, tok, name=str(path_or_name), device=device)

    # -- prompting -------------------------------------------------------------------------
    def chat_text(self, messages: list[dict], *, add_generation_prompt: bool = True) -> str:
        """The prompt text for ``messages`` through the tokenizer's chat template."""
        if not getattr(self.tokenizer, "chat_template", None):
            # A plain LM without a template: a simple, explicit fallback.
            text = "".join(f"{m['role']}: {m['content']}\n" for m in messages)
            return text + ("assistant: " if add_generation_prompt else "")
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False)

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    # -- generation ------------------------------------------------------------------------
    def generate(self, messages: list[dict], *, max_new_tokens: int = 128, temperature: float = 0.0,
                 seed: int | None = None) -> Generation:
        """Answer one chat. Greedy when ``temperature`` is 0, sampled otherwise (``seed`` makes a
        sampled answer reproducible)."""
        return self.generate_batch([messages], max_new_tokens=max_new_tokens, temperature=temperature, seed=seed)[0]

    def generate_batch(self, batch: list[list[dict]], *, max_new_tokens: int = 128, temperature: float = 0.0,
                       seed: int | None = None) -> list[Generation]:
        """Answer several chats in one left-padded batch. Latency of each item is the batch's
        wall time divided by the batch size (ms)."""
        import torch

        prompts = [self._encode(self.chat_text(m)) for m in batch]
        width = max(len(p) for p in prompts)
        pad = self.tokenizer.pad_token_id
        ids = torch.full((len(prompts), width), pad, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, width - len(p):] = torch.tensor(p)
            mask[i, width - len(p):] = 1
        kwargs = dict(max_new_tokens=max_new_tokens, pad_token_id=pad)
        if temperature and temperature > 0:
            kwargs.update(do_sample=True, temperature=float(temperature), top_k=0, top_p=1.0)
            if seed is not None:
                torch.manual_seed(seed)
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        eos_ids = self._eos_ids()
        with self._lock, torch.inference_mode():
            t0 = time.perf_counter()
            out = self.model.generate(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                                      eos_token_id=eos_ids, **kwargs)
            elapsed_ms = (time.perf_counter() - t0) * 1000.0
        results = []
        for i, p in enumerate(prompts):
            new = out[i, width:].tolist()
            n_out, stopped = 0, False
            for tok in new:
                n_out += 1
                if tok in eos_ids:
                    stopped = True
                    break
            toks = [t for t in new[:n_out] if t not in eos_ids and t != pad]
            text = self.tokenizer.decode(toks, skip_special_tokens=True).strip()
            results.append(Generation(text=text, finish_reason="stop" if stopped else "length",
                                      input_tokens=len(p), output_tokens=n_out,
                                      latency_ms=elapsed_ms / len(prompts)))
        return results

    def _eos_ids(self) -> list[int]:
        ids = set()
        if self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        gen_cfg = getattr(self.model, "generation_config", None)
        eos = getattr(gen_cfg, "eos_token_id", None)
        if isinstance(eos, int):
            ids.add(eos)
        elif isinstance(eos, (list, tuple)):
            ids.update(eos)
        return sorted(ids)

    # -- scoring ---------------------------------------------------------------------------
    def score_labels(self, messages: list[dict], labels: list[str] | tuple[str, ...]) -> dict[str, float]:
        """Soft labels: P(label | prompt) for every label, scored rather than sampled.

        Each label's score is the summed log-probability of its tokens followed by the end
        token, as the assistant's answer to ``messages``; a softmax over the labels' scores
        gives probabilities that sum to 1. Returns ``{label: probability}``."""
        import torch

        prompt = self._encode(self.chat_text(messages))
        end = self.tokenizer.eos_token or ""
        conts = [self._encode(l + end) for l in labels]
        with self._lock, torch.inference_mode():
            try:
                scores = self._score_with_prompt_cache(prompt, conts)
            except Exception:  # noqa: BLE001 - a model whose cache cannot be shared: score whole sequences
                scores = self._score_full(prompt, conts)
        m = max(scores)
        exps = [math.exp(s - m) for s in scores]
        z = sum(exps)
        return {l: e / z for l, e in zip(labels, exps)}

    def _score_with_prompt_cache(self, prompt: list[int], conts: list[list[int]]) -> list[float]:
        """Summed log-probabilities of each continuation after ``prompt``, running the prompt once
        and the continuations as one right-padded batch on a copy of its KV cache (the prompt is
        most of the tokens, so this is several times faster than scoring whole sequences)."""
        import torch

        dev = self.device
        out = self.model(input_ids=torch.tensor([prompt], device=dev), use_cache=True)
        first_logp = torch.log_softmax(out.logits[0, -1].float(), dim=-1).cpu()
        n, width = len(conts), max(len(c) for c in conts)
        cache = out.past_key_values
        cache.batch_repeat_interleave(n)
        pad = self.tokenizer.pad_token_id
        ids = torch.full((n, width), pad, dtype=torch.long)
        mask = torch.zeros((n, len(prompt) + width), dtype=torch.long)
        mask[:, : len(prompt)] = 1
        for i, c in enumerate(conts):
            ids[i, : len(c)] = torch.tensor(c)
            mask[i, len(prompt): len(prompt) + len(c)] = 1
        logits = self.model(input_ids=ids.to(dev), attention_mask=mask.to(dev), past_key_values=cache,
                            use_cache=True).logits.float()
        logp = torch.log_softmax(logits, dim=-1).cpu()
        scores = []
        for i, c in enumerate(conts):
            total = float(first_logp[c[0]])
            for j in range(1, len(c)):
                total += float(logp[i, j - 1, c[j]])  # logits at j-1 predict continuation token j
            scores.append(total)
        return scores

    def _score_full(self, prompt: list[int], conts: list[list[int]]) -> list[float]:
        """The same scores by running prompt + continuation for every label (no shared cache)."""
        import torch

        seqs = [prompt + c for c in conts]
        width = max(len(s) for s in seqs)
        pad = self.tokenizer.pad_token_id
        scores: list[float] = []
        chunk = 32
        for start in range(0, len(seqs), chunk):
            part = seqs[start:start + chunk]
            ids = torch.full((len(part), width), pad, dtype=torch.long)
            mask = torch.zeros((len(part), width), dtype=torch.long)
            for i, s in enumerate(part):
                ids[i, :len(s)] = torch.tensor(s)
                mask[i, :len(s)] = 1
            logits = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device)).logits.float()
            logp = torch.log_softmax(logits, dim=-1).cpu()
            for i, c in enumerate(conts[start:start + chunk]):
                total = 0.0
                for j, tok in enumerate(c):
                    pos = len(prompt) + j - 1  # logits at pos predict token pos+1
                    total += float(logp[i, pos, tok])
                scores.append(total)
        return scores


def checked_policy(path_or_name: str, policy=None):
    """Check ``path_or_name`` against ``policy`` (default: read from the environment) before
    anything is read from it, and return the policy. Raises ``security.Refused``."""
    from workers.pipeline.security import SecurityPolicy, check_model_name

    policy = policy if policy is not None else SecurityPolicy.from_env()
    check_model_name(str(path_or_name), policy=policy, field="model")
    return policy


_CACHE: dict[tuple[str, str, str], LocalCausalLM] = {}
_CACHE_LOCK = threading.Lock()


def load_cached(path_or_name: str, *, kind: str = "base", device: str | None = None,
                cache_dir: str | None = None, policy=None) -> LocalCausalLM:
    """``LocalCausalLM.load`` memoised per process, so a worker loads a model once and keeps it
    for the chunks that follow. The name is checked against ``policy`` on every call, before the
    cache is consulted, so a model loaded for one project is never handed to a setting that may
    not name it. Raises ``security.Refused``."""
    policy = checked_policy(path_or_name, policy)
    key = (str(path_or_name), kind, device or pick_device())
    with _CACHE_LOCK:
        if key not in _CACHE:
            _CACHE[key] = LocalCausalLM.load(path_or_name, kind=kind, device=device, cache_dir=cache_dir,
                                             policy=policy)
        return _CACHE[key]
