"""Student-size presets: a smaller causal student built from a local teacher by keeping evenly
spaced decoder layers (no Django).

The initialisation follows DistilBERT (Sanh et al., 2019, "DistilBERT, a distilled version of
BERT"): the student has the teacher's architecture with fewer layers, and starts from a subset
of the teacher's own layers (DistilBERT took one layer out of two) instead of random weights. The
embeddings, the final norm and the LM head are copied unchanged, so the student shares the
teacher's tokenizer and vocabulary (which ``logit-kd`` needs). The truncated model is then
distilled with full fine-tuning: the kept layers must re-learn to work without their neighbours.

Presets (share of the teacher's decoder layers): ``light`` 10 %, ``medium`` 25 %, ``heavy`` 50 %.
For the bundled SmolLM2-135M (30 layers): light 3, medium 8, heavy 15 layers.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

#: Share of the teacher's decoder layers each preset keeps.
STUDENT_SIZES: dict[str, float] = {"light": 0.10, "medium": 0.25, "heavy": 0.50}
#: What each preset is for, and the seed's target figures (quality retention, speed-up).
STUDENT_SIZE_DESCRIPTIONS = {
    "light": "about 10 % of the teacher's layers (target: 70-75 % retention, 10-20x faster)",
    "medium": "about 25 % of the teacher's layers (target: 85-90 % retention, 4-8x faster)",
    "heavy": "about 50 % of the teacher's layers (target: 95-98 % retention, 2-3x faster)",
}
#: Key written into the student's ``config.json`` (and so into every model trained from it).
CONFIG_KEY = "distillhub_student"


class StudentInitError(ValueError):
    """The student cannot be built (unknown preset, a teacher with too few layers or whose
    decoder layers cannot be found); the message names the setting."""


@dataclass
class StudentInit:
    """What ``build_student`` wrote: ``path`` (the model folder), the preset ``size``, the kept
    teacher layer ``indices`` (0-based), ``teacher_layers`` and ``student_layers`` (counts),
    ``parameters`` of the student and of the teacher."""

    path: str
    size: str
    indices: list[int]
    teacher_layers: int
    student_layers: int
    parameters: int
    teacher_parameters: int

    @property
    def label(self) -> str:
        """e.g. ``light (3/30 layers)``."""
        return f"{self.size} ({self.student_layers}/{self.teacher_layers} layers)"


def student_layer_count(size: str, teacher_layers: int) -> int:
    """Decoder layers a ``size`` preset keeps of ``teacher_layers``:
    ``k = clamp(floor(f * n + 0.5), 2, n)`` with ``f`` = ``STUDENT_SIZES[size]`` (the first and
    the last layer are always kept, so at least 2). Raises StudentInitError for an unknown preset
    or a teacher with fewer than 2 layers."""
    if size not in STUDENT_SIZES:
        raise StudentInitError(f"student_size: {size!r} is not one of {', '.join(STUDENT_SIZES)}")
    if teacher_layers < 2:
        raise StudentInitError(f"student_size: the teacher has {teacher_layers} decoder layer(s); at least 2 needed")
    return min(teacher_layers, max(2, math.floor(STUDENT_SIZES[size] * teacher_layers + 0.5)))


def kept_layer_indices(size: str, teacher_layers: int) -> list[int]:
    """The teacher layers a preset keeps, evenly spaced, first and last included: with ``n``
    teacher layers and ``k = student_layer_count(size, n)``,
    ``i_j = floor(j * (n - 1) / (k - 1) + 0.5)`` for ``j = 0 .. k-1`` (strictly increasing, since
    the spacing ``(n - 1) / (k - 1) >= 1``). E.g. n=30: light [0, 15, 29]; medium
    [0, 4, 8, 12, 17, 21, 25, 29]. Raises StudentInitError as ``student_layer_count``."""
    k = student_layer_count(size, teacher_layers)
    step = (teacher_layers - 1) / (k - 1)
    return [math.floor(j * step + 0.5) for j in range(k)]


def _decoder_layers(model) -> tuple[str, object]:
    """(dotted name, ModuleList) of the model's decoder layers: the ModuleList holding
    ``config.num_hidden_layers`` modules (``model.layers`` for Llama, Qwen, Mistral, ...)."""
    import torch.nn as nn

    n = getattr(model.config, "num_hidden_layers", None)
    found = [(name, mod) for name, mod in model.named_modules()
             if isinstance(mod, nn.ModuleList) and n is not None and len(mod) == n]
    if len(found) != 1:
        raise StudentInitError(f"student_size: cannot find the decoder layers of a {type(model).__name__} "
                               f"(num_hidden_layers={n}); student sizes need a decoder-only causal LM")
    return found[0]


def truncate_model(teacher, size: str):
    """A new causal LM with the teacher's architecture and ``kept_layer_indices(size, n)`` of its
    decoder layers, weights copied (embeddings, final norm, LM head unchanged). The student is
    built afresh from a copy of the teacher's config with ``num_hidden_layers = k`` (and
    ``layer_types`` cut to the kept layers where the config has one), so every attention module's
    ``layer_idx`` is its new position 0..k-1 and the KV cache has k slots. Returns ``(student,
    indices)``; the teacher is not modified. Raises StudentInitError."""
    import copy

    from transformers import AutoModelForCausalLM

    prefix, layers = _decoder_layers(teacher)
    n = len(layers)
    idx = kept_layer_indices(size, n)
    cfg = copy.deepcopy(teacher.config)
    cfg.num_hidden_layers = len(idx)
    if isinstance(getattr(cfg, "layer_types", None), list) and len(cfg.layer_types) == n:
        cfg.layer_types = [cfg.layer_types[i] for i in idx]
    setattr(cfg, CONFIG_KEY, {"size": size, "teacher_layers": n, "layer_indices": idx})
    dtype = next(teacher.parameters()).dtype
    student = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    remap = {old: new for new, old in enumerate(idx)}
    head = prefix + "."
    state = {}
    for key, value in teacher.state_dict().items():
        if key.startswith(head):
            old, rest = key[len(head):].split(".", 1)
            if int(old) not in remap:
                continue
            key = f"{head}{remap[int(old)]}.{rest}"
        state[key] = value.detach().clone()
    missing, unexpected = student.load_state_dict(state, strict=False)
    # A tied LM head is absent from the state dict on some versions; anything else is a bug.
    missing = [m for m in missing if not (m.endswith("lm_head.weight") and cfg.tie_word_embeddings)]
    if missing or unexpected:
        raise StudentInitError(f"student_size: weights did not map onto the truncated model "
                               f"(missing {missing[:5]}, unexpected {unexpected[:5]})")
    if cfg.tie_word_embeddings:
        student.tie_weights()
    return student.eval(), idx


def build_student(teacher_src: str, size: str, out_dir: str | Path) -> StudentInit:
    """Load the causal teacher from ``teacher_src`` (a local model folder or hub id that
    ``from_pretrained`` reads, float32), build the ``size`` student (``truncate_model``) and save
    it with the teacher's tokenizer as a model folder ``out_dir`` (``config.json`` records
    ``distillhub_student = {size, teacher_layers, layer_indices}``). Written to a temporary folder
    and renamed last, so ``out_dir`` is never half-written; an existing complete ``out_dir`` from
    the same teacher and preset is reused. Raises StudentInitError."""
    import json
    import os
    import shutil

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = Path(out_dir)
    teacher = AutoModelForCausalLM.from_pretrained(teacher_src, dtype=torch.float32)
    if getattr(teacher, "hf_quantizer", None) is not None or getattr(teacher, "is_quantized", False):
        from workers.pipeline.registry import clear_quantizer_marker

        clear_quantizer_marker(teacher)
    n_teacher_params = sum(p.numel() for p in teacher.parameters())
    cfg_file = out / "config.json"
    if cfg_file.exists():
        info = json.loads(cfg_file.read_text()).get(CONFIG_KEY) or {}
        if info.get("size") == size and info.get("teacher_layers") == teacher.config.num_hidden_layers:
            student = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
            return StudentInit(str(out), size, list(info["layer_indices"]), info["teacher_layers"],
                               student.config.num_hidden_layers, sum(p.numel() for p in student.parameters()),
                               n_teacher_params)
    student, idx = truncate_model(teacher, size)
    tok = AutoTokenizer.from_pretrained(teacher_src)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    student.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return StudentInit(str(out), size, idx, teacher.config.num_hidden_layers, len(idx),
                       sum(p.numel() for p in student.parameters()), n_teacher_params)
