"""Student training (no Django): response-based SFT (LoRA or full) with TRL, soft-label
classifier distillation, and token-level logit distillation, optionally with hidden-state
(FitNets) and relation (similarity-preserving) losses, or across tokenizers (Universal Logit
Distillation, ``uld_weight``); the losses are in ``workers.pipeline.kd``.

Entry point: ``train(TrainSpec, report=..., check_stop=...) -> TrainResult``. The caller (a
Celery task) turns ``report`` events into TrainingMetric rows and Job progress, and passes
``check_stop`` (which raises to cancel). Every trainer is a ``transformers.Trainer`` (TRL's
``SFTTrainer`` is one), so ``accelerate launch`` spreads a run over several GPUs, CUDA + bf16 is
used when available and the CPU otherwise.

Files written under ``TrainSpec.output_dir`` (artifact kinds, the formats
``workers.pipeline.local_lm`` and the evaluation load):

- ``adapter/``: PEFT adapter + tokenizer (with the chat template used in training);
  ``adapter_config.json``'s ``base_model_name_or_path`` is the student's name as the user gave
  it (e.g. the bundled short name ``smollm2-135m-instruct``), resolved through the registry.
- ``merged/``: full HF causal-LM folder (adapter merged onto a float32 base) + tokenizer.
- ``int8/``: tokenizer + ``model_int8.pt``, ``torch.save`` of the whole merged module after
  ``torch.ao.quantization.quantize_dynamic`` on ``nn.Linear`` (CPU serving).
- ``classifier/``: ``AutoModelForSequenceClassification`` folder with id2label/label2id + tokenizer.

Checkpoints go to ``TrainSpec.checkpoint_dir`` (``checkpoint-<step>``, at most two kept: the
best on validation loss and the latest) so a killed worker resumes from the last one.
"""
from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from workers.pipeline import prompts
from workers.pipeline.kd import (IGNORE_INDEX, feature_kd_loss, relation_kd_loss, soft_label_kd_loss, token_kd_loss,
                                 uld_loss)
from workers.pipeline.local_lm import INT8_FILE
from workers.pipeline.registry import clear_quantizer_marker, resolve_model
from workers.pipeline.specs import TaskSpec

METHODS = ("sft-lora", "sft-full", "classifier-kd", "logit-kd")

_COMMON = {
    "per_device_train_batch_size": 8, "gradient_accumulation_steps": 1, "weight_decay": 0.0,
    "warmup_ratio": 0.0, "max_grad_norm": 1.0, "logging_steps": 5, "eval_steps": 0,
    "early_stopping_patience": 2, "seed": 42, "max_steps": -1,
    # Recompute activations in the backward pass: saves GPU memory on long sequences and big
    # students at ~30 % more compute. Off by default (TRL's SFTConfig would turn it on): the
    # bundled students are small, and on the H200 it made sft-lora about 2x slower.
    "activation_checkpointing": False,
}
_LORA_SEED = {"lora_r": 16, "lora_alpha": 32, "lora_dropout": 0.05, "target_modules": ["q_proj", "v_proj"],
              "learning_rate": 2e-5, "num_train_epochs": 3.0, "lr_scheduler_type": "cosine", "max_length": 2048}
_LORA_FAST = {"lora_r": 16, "lora_alpha": 32, "lora_dropout": 0.0,
              "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"],
              "learning_rate": 1e-3, "num_train_epochs": 2.0, "lr_scheduler_type": "cosine", "max_length": 256}

#: logit-kd's own settings; the three weights are 0 (off) by default: plain token-level KD.
_LOGIT_KD = {"temperature": 1.0, "alpha": 0.5, "teacher": "", "feature_weight": 0.0, "relation_weight": 0.0,
             "uld_weight": 0.0, "uld_top_k": 256}
#: The ``teacher`` value that makes a cross-tokenizer (uld_weight > 0) run learn from the samples'
#: stored ``top_logprobs`` (an API teacher) instead of running a local teacher.
TEACHER_FROM_SAMPLES = "samples"
#: classifier-kd's feature/relation settings; 0 (off) by default: plain soft-label KD. The
#: ``teacher`` (a local causal teacher) is only read when ``feature_weight`` > 0.
_CLASSIFIER_KD = {"teacher": "", "feature_weight": 0.0, "relation_weight": 0.0}

#: Hyperparameters by method and preset. Every value can be overridden; ``eval_steps`` 0 means
#: validate (and checkpoint) once per epoch; ``max_steps`` -1 means "run the epochs".
PRESETS: dict[str, dict[str, dict]] = {
    "sft-lora": {"seed": {**_COMMON, **_LORA_SEED}, "fast": {**_COMMON, **_LORA_FAST}},
    "sft-full": {
        "seed": {**_COMMON, "learning_rate": 2e-5, "num_train_epochs": 3.0, "lr_scheduler_type": "cosine", "max_length": 2048},
        "fast": {**_COMMON, "learning_rate": 5e-5, "num_train_epochs": 2.0, "lr_scheduler_type": "cosine", "max_length": 256},
    },
    "classifier-kd": {
        "seed": {**_COMMON, "per_device_train_batch_size": 32, "learning_rate": 5e-5, "num_train_epochs": 5.0,
                 "lr_scheduler_type": "linear", "max_length": 128, "temperature": 4.0, "alpha": 0.5, **_CLASSIFIER_KD},
        "fast": {**_COMMON, "per_device_train_batch_size": 16, "learning_rate": 2e-4, "num_train_epochs": 3.0,
                 "lr_scheduler_type": "linear", "max_length": 64, "temperature": 4.0, "alpha": 0.5, **_CLASSIFIER_KD},
    },
    "logit-kd": {
        "seed": {**_COMMON, **_LORA_SEED, **_LOGIT_KD},
        "fast": {**_COMMON, **_LORA_FAST, **_LOGIT_KD},
    },
}
PRESET_NAMES = ("seed", "fast")
#: What each preset is for, in the order the Train form offers them.
PRESET_DESCRIPTIONS = {"fast": "minutes on a CPU", "seed": "the seed recipe"}


class HyperParam(NamedTuple):
    """A hyperparameter's type, valid range (inclusive; for a list: how many items; for text:
    its longest length) and meaning. ``choices``: the valid texts, where there is such a list."""

    type: type
    min: float | None
    max: float | None
    help: str
    choices: tuple[str, ...] = ()


#: Every hyperparameter a preset holds, with its valid range: ``resolve_hyperparams``, the Train
#: form (its fields' bounds and its ``extra`` lines) and ``distill train --set`` all check
#: against this table, and the README's training section lists it. Bounds are generous; they
#: exist so that a typo (``epochs=1e9``) is an error instead of a run that never ends.
HYPERPARAMS: dict[str, HyperParam] = {
    "num_train_epochs": HyperParam(float, 0.01, 100, "passes over the training set"),
    "max_steps": HyperParam(int, -1, 1_000_000, "stop after this many optimizer steps; -1: run the epochs"),
    "learning_rate": HyperParam(float, 1e-8, 1.0, "peak learning rate"),
    "lr_scheduler_type": HyperParam(str, None, 40, "learning-rate schedule",
                                    ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant",
                                     "constant_with_warmup", "inverse_sqrt")),
    "warmup_ratio": HyperParam(float, 0.0, 1.0, "share of the steps spent warming the learning rate up"),
    "weight_decay": HyperParam(float, 0.0, 1.0, "AdamW weight decay"),
    "max_grad_norm": HyperParam(float, 0.0, 1000.0, "gradient clipping norm; 0: no clipping"),
    "per_device_train_batch_size": HyperParam(int, 1, 1024, "examples per step on each device"),
    "gradient_accumulation_steps": HyperParam(int, 1, 1024, "steps whose gradients add up to one update"),
    "max_length": HyperParam(int, 8, 32768, "tokens per example; longer ones are truncated"),
    "logging_steps": HyperParam(int, 1, 100_000, "record the training loss every N steps"),
    "eval_steps": HyperParam(int, 0, 1_000_000, "validate and checkpoint every N steps; 0: once per epoch"),
    "early_stopping_patience": HyperParam(int, 0, 1000, "stop after N validations without improvement; 0: off"),
    "seed": HyperParam(int, 0, 2**32 - 1, "random seed"),
    "activation_checkpointing": HyperParam(bool, None, None, "recompute activations in the backward pass"),
    "lora_r": HyperParam(int, 1, 1024, "LoRA rank"),
    "lora_alpha": HyperParam(int, 1, 4096, "LoRA scaling (alpha / r multiplies the update)"),
    "lora_dropout": HyperParam(float, 0.0, 0.9, "dropout on the LoRA layers"),
    "target_modules": HyperParam(list, 1, 64, "LoRA's target linear layers, e.g. q_proj,v_proj"),
    "temperature": HyperParam(float, 0.01, 100.0, "KD softmax temperature T"),
    "alpha": HyperParam(float, 0.0, 1.0, "weight of the KD loss against the cross-entropy"),
    "teacher": HyperParam(str, None, 300, "logit-kd, and classifier-kd with feature_weight > 0: the project's local "
                          "teacher to learn from (default: the first); logit-kd with uld_weight > 0, "
                          f"'{TEACHER_FROM_SAMPLES}': the API teacher's stored top_logprobs"),
    "feature_weight": HyperParam(float, 0.0, 100.0, "weight of the FitNets hidden-state loss (Romero et al. 2015): "
                                 "MSE between the teacher's hidden states and the student's through a learned linear "
                                 "projection; logit-kd: last hidden states on the answer tokens; classifier-kd: the "
                                 "local teacher's mean-pooled last hidden state over the query vs the student's "
                                 "mean-pooled one; 0: off"),
    "relation_weight": HyperParam(float, 0.0, 100.0, "weight of the similarity-preserving loss (Tung & Mori 2019): "
                                  "MSE between the batch's normalised pairwise similarity matrices of student and "
                                  "teacher; logit-kd: mean-pooled answer hidden states; classifier-kd: the student's "
                                  "mean-pooled hidden state vs the teacher's soft-label vectors (works with API "
                                  "teachers); 0: off"),
    "uld_weight": HyperParam(float, 0.0, 100.0, "logit-kd: > 0 allows a teacher with another tokenizer: the loss is "
                             "the student's cross-entropy on the teacher's answer + uld_weight x the Universal Logit "
                             "Distillation loss (Boizard et al. 2024); temperature and alpha are then unused; 0: off"),
    "uld_top_k": HyperParam(int, 1, 1_000_000, "logit-kd with uld_weight > 0 and a local teacher: its K largest "
                            "probabilities per answer token are kept, the rest compared as one bucket"),
}
#: Methods that take a ``student_size`` preset (``workers.pipeline.student_init.STUDENT_SIZES``):
#: the student is then the local teacher cut to evenly spaced layers, fully fine-tuned.
SIZE_METHODS = ("sft-full", "logit-kd")
DEFAULT_STUDENT = {"sft-lora": "smollm2-135m-instruct", "sft-full": "smollm2-135m-instruct",
                   "classifier-kd": "minilm-l6", "logit-kd": "smollm2-135m-instruct"}


class TrainingRefused(ValueError):
    """The run cannot start (bad setting, preflight failure); the message says what to change."""


class TrainingStopped(RuntimeError):
    """Training stopped early for a reason that fails the run (e.g. the loss became NaN)."""


@dataclass
class TrainRow:
    """One curated example. ``answer``: the text the student learns (the teacher's response or
    a human edit); ``label``: the hard label for classification (gold where it exists, else the
    teacher's); ``teacher_label``: the teacher's label; ``label_probs``: ``{label: p}`` soft labels;
    ``token_logprobs``: an API teacher's per-token log-probabilities of ``answer`` (the Sample's
    list ``[{"token", "logprob", "top": [[token, logprob], ...]}]``), only when ``answer`` is the
    teacher's own text (cross-tokenizer logit-kd)."""

    query: str
    answer: str = ""
    label: str | None = None
    teacher_label: str | None = None
    label_probs: dict | None = None
    token_logprobs: list | None = None


@dataclass
class TrainSpec:
    """Everything a run needs. ``hyperparams`` come from ``resolve_hyperparams``. ``teacher_model``:
    a local causal teacher (logit-kd; classifier-kd with ``feature_weight`` > 0). Paths are absolute folders. ``policy``: the
    operator's ``security.SecurityPolicy`` that ``student_model`` and ``teacher_model`` must pass
    before they are loaded (None: read from the environment); a refused one raises
    TrainingRefused."""

    method: str
    student_model: str
    task: TaskSpec
    train_rows: list[TrainRow]
    val_rows: list[TrainRow]
    hyperparams: dict
    output_dir: str
    checkpoint_dir: str
    resume_from_checkpoint: str | None = None
    teacher_model: str | None = None
    cache_dir: str | None = None
    policy: object | None = None
    #: ``student``: rows use the student's short prompt (a student in training); ``teacher``:
    #: the teacher's full prompt (instructions, labels or schema, few-shot), for a local teacher
    #: domain-tuned on the golden references, which later answers exactly that prompt.
    prompt_style: str = "student"


@dataclass
class TrainResult:
    """What a run produced. ``artifacts``: ``[{"kind", "path"}]`` (absolute paths, files or
    folders); losses are mean token cross-entropy (nats) or the KD loss; ``stop_reason`` says why
    it ended early (empty when it ran all epochs)."""

    train_loss: float | None
    best_val_loss: float | None
    best_step: int | None
    global_step: int
    stop_reason: str
    preflight: dict
    artifacts: list[dict] = field(default_factory=list)
    resumed_from_step: int | None = None
    train_tokens: int = 0
    train_seconds: float = 0.0


def _fmt(x) -> str:
    return str(x) if isinstance(x, int) else format(x, "g")


def describe_range(name: str) -> str:
    """The valid values of hyperparameter ``name`` as text, e.g. ``[0.01, 100]``,
    ``one of linear, cosine`` or ``1-64 names``."""
    spec = HYPERPARAMS[name]
    if spec.choices:
        return "one of " + ", ".join(spec.choices)
    if spec.type is bool:
        return "true or false"
    if spec.type is list:
        return f"{spec.min}-{spec.max} comma-separated names"
    if spec.type is str:
        return f"text of at most {spec.max} characters"
    return f"[{_fmt(spec.min)}, {_fmt(spec.max)}]"


def convert_hyperparam(name: str, value):
    """``value`` (a number, bool, list, or the text a user typed) converted to hyperparameter
    ``name``'s type (see ``HYPERPARAMS``) and checked against its range. Integers accept
    ``8``, ``8.0`` or ``"1e3"``; booleans ``true/false``, ``yes/no``, ``on/off``, ``1/0``; lists a
    comma-separated string. Raises TrainingRefused naming the setting and its valid range for an
    unknown name, a value of the wrong type, a non-finite number (inf, nan) or one out of range."""
    spec = HYPERPARAMS.get(name)
    if spec is None:
        raise TrainingRefused(f"hyperparameter {name!r} is not a setting; settings: {', '.join(sorted(HYPERPARAMS))}")
    bad = TrainingRefused(f"hyperparameter {name!r}: {value!r} is not a valid {spec.type.__name__} "
                          f"(valid: {describe_range(name)})")
    if spec.type in (int, float):
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise bad
        try:
            number = float(value)
        except ValueError:
            raise bad from None
        if not math.isfinite(number):
            raise TrainingRefused(f"hyperparameter {name!r}: {value!r} is not a finite number "
                                  f"(valid: {describe_range(name)})")
        if spec.type is int:
            if number != int(number):
                raise bad
            number = int(number)
        if not spec.min <= number <= spec.max:
            raise TrainingRefused(f"hyperparameter {name!r} must be in {describe_range(name)}, got {_fmt(number)} "
                                  f"({spec.help})")
        return number
    if spec.type is bool:
        if isinstance(value, bool):
            return value
        word = str(value).strip().lower()
        if word in ("1", "true", "yes", "on"):
            return True
        if word in ("0", "false", "no", "off"):
            return False
        raise bad
    if spec.type is list:
        if isinstance(value, str):
            items = [v.strip() for v in value.split(",") if v.strip()]
        elif isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
            items = [v.strip() for v in value if v.strip()]
        else:
            raise bad
        if not spec.min <= len(items) <= spec.max or any(len(v) > 200 for v in items):
            raise TrainingRefused(f"hyperparameter {name!r}: give {describe_range(name)}, got {len(items)} "
                                  f"({spec.help})")
        return items
    if not isinstance(value, (str, int, float)) or isinstance(value, bool):
        raise bad
    text = str(value).strip()
    if spec.choices and text not in spec.choices:
        raise TrainingRefused(f"hyperparameter {name!r} must be {describe_range(name)}, got {text!r}")
    if len(text) > spec.max:
        raise TrainingRefused(f"hyperparameter {name!r}: longer than {spec.max} characters")
    return text


def resolve_hyperparams(method: str, preset: str = "fast", overrides: dict | None = None) -> dict:
    """The preset's hyperparameters with ``overrides`` applied, each converted and checked by
    ``convert_hyperparam`` (type and range from ``HYPERPARAMS``). A blank (None or "")
    override keeps the preset's value. Raises TrainingRefused naming an unknown method, preset
    or setting (listing the method's settings), a value of the wrong type or out of range."""
    if method not in PRESETS:
        raise TrainingRefused(f"method: {method!r} is not one of {', '.join(METHODS)}")
    if preset not in PRESETS[method]:
        raise TrainingRefused(f"preset: {preset!r} is not one of {', '.join(PRESETS[method])}")
    hp = json.loads(json.dumps(PRESETS[method][preset]))
    for key, value in (overrides or {}).items():
        if key not in hp:
            raise TrainingRefused(f"hyperparameter {key!r} is not a setting of {method}; "
                                  f"settings: {', '.join(sorted(hp))}")
        if value is None or value == "":
            continue
        hp[key] = convert_hyperparam(key, value)
    return hp


def apply_student_size(hp: dict, *, method: str, preset: str, size: str, overrides: dict | None = None) -> dict:
    """``hp`` (from ``resolve_hyperparams``) with the student-size preset ``size`` (light,
    medium, heavy; blank: none) recorded as ``hp["student_size"]``. A sized student is fully
    fine-tuned, so logit-kd then takes sft-full's learning rate for the preset (LoRA's 1e-3
    would wreck full weights) unless ``overrides`` set one. Raises TrainingRefused for an
    unknown size or a method outside ``SIZE_METHODS``."""
    from workers.pipeline.student_init import STUDENT_SIZES

    size = (size or "").strip()
    if not size:
        return hp
    if size not in STUDENT_SIZES:
        raise TrainingRefused(f"student_size: {size!r} is not one of {', '.join(STUDENT_SIZES)}")
    if method not in SIZE_METHODS:
        raise TrainingRefused(f"student_size: only for {' and '.join(SIZE_METHODS)} (the student is the local "
                              f"teacher cut to fewer layers), not {method}")
    hp = dict(hp, student_size=size)
    if method == "logit-kd" and (overrides or {}).get("learning_rate") in (None, ""):
        hp["learning_rate"] = PRESETS["sft-full"][preset]["learning_rate"]
    return hp


def linear_module_names(model) -> list[str]:
    """Names (last path component) of the model's ``nn.Linear`` layers, e.g. ``q_proj``."""
    import torch.nn as nn

    return sorted({name.rsplit(".", 1)[-1] for name, mod in model.named_modules()
                   if isinstance(mod, nn.Linear) and name})


def check_target_modules(model, target_modules: list[str]) -> None:
    """Raise TrainingRefused naming LoRA target modules that are not linear layers of the
    model, and listing the valid ones."""
    valid = linear_module_names(model)
    bad = [m for m in target_modules if m not in valid]
    if bad:
        raise TrainingRefused(f"target_modules: {', '.join(bad)} not a linear layer of this model; "
                              f"valid: {', '.join(valid)}")


def _device() -> tuple[bool, object]:
    import torch

    cuda = torch.cuda.is_available()
    return cuda, (torch.bfloat16 if cuda and torch.cuda.is_bf16_supported() else torch.float32)


# --- callbacks ------------------------------------------------------------------------------


def _report_callback(report: Callable[[str, dict], None], check_stop: Callable[[], None], state_box: dict):
    """A TrainerCallback that forwards logs as metric events, checks for cancel after every
    step (``check_stop`` raises to stop within a step) and stops on a NaN loss."""
    from transformers import TrainerCallback

    class ReportCallback(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            check_stop()
            total = max(state.max_steps, 1)
            report("progress", {"progress": 0.05 + 0.85 * state.global_step / total,
                                "message": f"step {state.global_step}/{total}"})

        def on_log(self, args, state, control, logs=None, **kw):
            if state_box.get("mute"):
                return
            logs = logs or {}
            step = state.global_step
            if "loss" in logs:
                loss = float(logs["loss"])
                components = {k[3:]: _finite(v) for k, v in logs.items() if k.startswith("kd_")}
                metric = {"split": "train", "step": step, "epoch": logs.get("epoch", state.epoch),
                          "loss": loss, "learning_rate": logs.get("learning_rate"),
                          "grad_norm": _finite(logs.get("grad_norm"))}
                if components:  # logit-kd's loss terms, unweighted (see _logit_kd_trainer_cls)
                    metric["components"] = components
                    state_box["components"] = components
                report("metric", metric)
                if not math.isfinite(loss):
                    state_box["stop_reason"] = f"the training loss became {loss} at step {step}"
                    control.should_training_stop = True
            if "eval_loss" in logs:
                fid = logs.get("eval_fidelity", logs.get("eval_mean_token_accuracy"))
                report("metric", {"split": "validation", "step": step, "epoch": logs.get("epoch", state.epoch),
                                  "loss": float(logs["eval_loss"]), "fidelity": _finite(fid)})
                if not math.isfinite(float(logs["eval_loss"])):
                    state_box["stop_reason"] = f"the validation loss became {logs['eval_loss']} at step {step}"
                    control.should_training_stop = True
            if "train_loss" in logs:
                state_box["train_loss"] = float(logs["train_loss"])

        def on_train_begin(self, args, state, control, **kw):
            state_box["start_step"] = state.global_step

    return ReportCallback()


def _finite(x):
    try:
        x = float(x)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def _training_args_kwargs(hp: dict, spec: TrainSpec, n_train: int, has_val: bool) -> dict:
    cuda, dtype = _device()
    import torch

    steps_per_epoch = max(1, math.ceil(n_train / (hp["per_device_train_batch_size"] * hp["gradient_accumulation_steps"])))
    every = int(hp["eval_steps"]) or steps_per_epoch
    kw = dict(
        output_dir=spec.checkpoint_dir, num_train_epochs=hp["num_train_epochs"], max_steps=int(hp["max_steps"]),
        per_device_train_batch_size=hp["per_device_train_batch_size"], per_device_eval_batch_size=hp["per_device_train_batch_size"],
        gradient_accumulation_steps=hp["gradient_accumulation_steps"], learning_rate=hp["learning_rate"],
        lr_scheduler_type=hp["lr_scheduler_type"], warmup_steps=float(hp["warmup_ratio"]), weight_decay=hp["weight_decay"],
        max_grad_norm=hp["max_grad_norm"], logging_steps=hp["logging_steps"], logging_first_step=True,
        save_strategy="steps", save_steps=every, save_total_limit=2, seed=hp["seed"], report_to=[],
        disable_tqdm=True, dataloader_num_workers=0,
        use_cpu=not cuda, bf16=bool(cuda and dtype == torch.bfloat16),
        activation_checkpointing=bool(hp.get("activation_checkpointing", False)),
        logging_nan_inf_filter=False,  # a NaN/inf loss must reach the callback, which stops the run
    )
    if has_val:
        kw.update(eval_strategy="steps", eval_steps=every, load_best_model_at_end=True,
                  metric_for_best_model="eval_loss", greater_is_better=False)
    return kw


def _finish(trainer, state_box: dict, spec: TrainSpec, preflight: dict, t0: float, tokens: int) -> TrainResult:
    import time

    st = trainer.state
    if state_box.get("stop_reason"):
        raise TrainingStopped(state_box["stop_reason"])
    reason = ""
    if st.max_steps and st.global_step < st.max_steps:
        reason = f"early stopping: validation loss did not improve for {spec.hyperparams['early_stopping_patience']} evaluation(s)"
    best_step = None
    if st.best_model_checkpoint:
        try:
            best_step = int(Path(st.best_model_checkpoint).name.split("-")[-1])
        except ValueError:
            best_step = None
    start = state_box.get("start_step") or 0
    return TrainResult(train_loss=state_box.get("train_loss"), best_val_loss=_finite(st.best_metric),
                       best_step=best_step, global_step=st.global_step, stop_reason=reason, preflight=preflight,
                       resumed_from_step=start if spec.resume_from_checkpoint else None,
                       train_tokens=tokens, train_seconds=time.perf_counter() - t0)


# --- SFT (LoRA / full) and logit KD ---------------------------------------------------------


def _resolve(spec: TrainSpec, name: str, field: str) -> str:
    """``registry.resolve_model`` under the spec's policy; a refused name is TrainingRefused."""
    from workers.pipeline.security import Refused

    try:
        return resolve_model(name, spec.cache_dir, policy=spec.policy, field=field)
    except Refused as exc:
        raise TrainingRefused(str(exc)) from None


def _load_tokenizer(spec: TrainSpec):
    from transformers import AutoTokenizer

    src = _resolve(spec, spec.student_model, "student_model")
    tok = AutoTokenizer.from_pretrained(src)
    return src, tok


def ensure_chat_template(tokenizer, student_model: str, chat_template: str | None = None) -> None:
    """Give the tokenizer ``chat_template`` when one is given; refuse (TrainingRefused) a
    student whose tokenizer has none, because the chat rows cannot be rendered and the saved
    tokenizer must carry the template used in training."""
    if chat_template:
        tokenizer.chat_template = chat_template
    if not getattr(tokenizer, "chat_template", None):
        raise TrainingRefused(f"student {student_model!r} has no chat template: choose an instruct/chat model "
                              "(e.g. smollm2-135m-instruct) or give the hyperparameter 'chat_template' a Jinja template")


def chat_rows(task: TaskSpec, rows: list[TrainRow], prompt_style: str = "student") -> list[dict]:
    """Prompt/completion chat rows for TRL: ``{"prompt": student_messages (or teacher_messages
    with ``prompt_style="teacher"``), "completion": [{"role": "assistant", "content": answer}]}``.
    Raises TrainingRefused for another ``prompt_style``."""
    if prompt_style not in ("student", "teacher"):
        raise TrainingRefused(f"prompt_style: {prompt_style!r} is not student or teacher")
    render = prompts.teacher_messages if prompt_style == "teacher" else prompts.student_messages
    return [{"prompt": render(task, r.query),
             "completion": [{"role": "assistant", "content": r.answer or ""}]} for r in rows]


def sft_preflight(trainer, tokenizer, raw_rows: list[dict], max_length: int) -> dict:
    """Check what TRL will actually train on, before the first step.

    Runs TRL's own tokenized dataset through its own data collator and reports: supervised
    tokens per row (labels != -100; min/mean/max and total), whether the end-of-turn token
    (``tokenizer.eos_token``) is a supervised label in every row (also when pad == eos: TRL's
    collator pads labels by length with -100, so a real EOS keeps its label), rows cut by
    ``max_length`` (their answer loses its end), the chat template. ``ok`` is False with
    ``refusal`` set when no token is supervised or no row teaches the student to stop."""
    ds = trainer.train_dataset
    collate = trainer.data_collator
    eos_id = tokenizer.eos_token_id
    per_row: list[int] = []
    without_eos: list[int] = []
    for i in range(len(ds)):
        batch = collate([ds[i]])
        labels = batch["labels"][0]
        sup = labels[labels != IGNORE_INDEX]
        per_row.append(int(sup.numel()))
        if eos_id is None or not bool((sup == eos_id).any()):
            without_eos.append(i)
    cut: list[int] = []
    for i, row in enumerate(raw_rows):
        full = tokenizer.apply_chat_template(row["prompt"] + row["completion"], tokenize=True)
        n = len(full["input_ids"] if isinstance(full, dict) or hasattr(full, "keys") else full)
        if n > max_length:
            cut.append(i)
    total = sum(per_row)
    pf = {
        "rows": len(raw_rows), "max_length": max_length,
        "rows_dropped_fully_masked": len(raw_rows) - len(per_row),
        "supervised_tokens_total": total,
        "supervised_tokens_min": min(per_row) if per_row else 0,
        "supervised_tokens_mean": round(total / len(per_row), 2) if per_row else 0,
        "supervised_tokens_max": max(per_row) if per_row else 0,
        "rows_without_supervised_tokens": sum(1 for n in per_row if n == 0) + len(raw_rows) - len(per_row),
        "eos_token": tokenizer.eos_token, "eos_token_id": eos_id,
        "pad_token": tokenizer.pad_token, "pad_is_eos": tokenizer.pad_token_id == eos_id,
        "eos_supervised_rows": len(per_row) - len(without_eos),
        "rows_without_eos_label": without_eos[:50],
        "rows_cut_by_max_length": len(cut), "cut_row_indexes": cut[:50],
        "chat_template_present": bool(getattr(tokenizer, "chat_template", None)),
        "chat_template_chars": len(tokenizer.chat_template or ""),
        "ok": True, "refusal": "",
    }
    if total == 0:
        pf.update(ok=False, refusal=f"no supervised tokens: every answer is cut off by max_length={max_length} "
                                    "or empty; raise max_length or check the curated answers")
    elif pf["eos_supervised_rows"] == 0:
        pf.update(ok=False, refusal=f"the end-of-turn token {tokenizer.eos_token!r} is not a supervised label "
                                    "in any row, so the student would never learn to stop; raise max_length")
    return pf


def _sft_model(spec: TrainSpec, src: str, dtype):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(src, dtype=dtype)
    if getattr(model, "hf_quantizer", None) is not None or getattr(model, "is_quantized", False):
        clear_quantizer_marker(model)
    return model


def _lora_config(model, hp: dict):
    from peft import LoraConfig

    check_target_modules(model, hp["target_modules"])
    return LoraConfig(r=hp["lora_r"], lora_alpha=hp["lora_alpha"], lora_dropout=hp["lora_dropout"],
                      target_modules=list(hp["target_modules"]), task_type="CAUSAL_LM", bias="none")


def _train_sft(spec: TrainSpec, report, check_stop) -> TrainResult:
    import time

    import torch
    from datasets import Dataset
    from transformers import EarlyStoppingCallback
    from trl import SFTConfig, SFTTrainer

    hp = spec.hyperparams
    method = spec.method
    src, tok = _load_tokenizer(spec)
    ensure_chat_template(tok, spec.student_model, hp.get("chat_template"))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    teacher = teacher_probs = None
    kd_info: dict = {}
    if method == "logit-kd":
        teacher, teacher_probs, kd_info = _logit_kd_sources(spec, tok, report)
    report("progress", {"progress": 0.01, "message": "loading the student"})
    cuda, dtype = _device()
    # Full fine-tuning keeps float32 master weights (the Trainer's bf16 flag autocasts the
    # compute): AdamW steps of ~lr are below bf16's resolution for most weights. A LoRA run's
    # base is frozen, so it is loaded in bf16 (the adapters PEFT adds stay float32).
    size = hp.get("student_size") or ""
    size_info: dict = {}
    if size:
        # A student-size preset: the student is the teacher (``spec.student_model``) cut to
        # evenly spaced layers, then fully fine-tuned (the kept layers must re-learn to work
        # together; LoRA on a frozen truncated model cannot do that).
        if method not in SIZE_METHODS:
            raise TrainingRefused(f"student_size: only for {' and '.join(SIZE_METHODS)}, not {method}")
        init = _build_sized_student(spec, src, size)
        src = init.path
        size_info = {"student_size": size, "student_layers": init.student_layers,
                     "teacher_layers": init.teacher_layers, "student_layer_indices": init.indices,
                     "student_parameters": init.parameters, "teacher_parameters": init.teacher_parameters,
                     "student_label": f"{spec.student_model}@{init.label}"}
        report("progress", {"progress": 0.03, "message": f"built the student {size_info['student_label']}"})
    full = method == "sft-full" or bool(size)
    model = _sft_model(spec, src, torch.float32 if full else dtype)
    peft_config = _lora_config(model, hp) if method in ("sft-lora", "logit-kd") and not full else None
    train_raw = chat_rows(spec.task, spec.train_rows, spec.prompt_style)
    val_raw = chat_rows(spec.task, spec.val_rows, spec.prompt_style)
    if teacher_probs is not None:  # the trainer finds each row's teacher distributions by row id
        for i, r in enumerate(train_raw + val_raw):
            r["row_id"] = i
    kw = _training_args_kwargs(hp, spec, len(train_raw), bool(val_raw))
    args = SFTConfig(max_length=hp["max_length"], completion_only_loss=True, assistant_only_loss=False,
                     packing=False, dataset_num_proc=None, **kw)
    state_box: dict = {}
    callbacks = [_report_callback(report, check_stop, state_box)]
    if val_raw and hp["early_stopping_patience"] > 0:
        callbacks.append(EarlyStoppingCallback(early_stopping_patience=hp["early_stopping_patience"]))
    trainer_cls = SFTTrainer if method != "logit-kd" else _logit_kd_trainer_cls(
        teacher, hp, teacher_probs=teacher_probs, student_hidden=model.config.hidden_size,
        teacher_hidden=teacher.config.hidden_size if teacher is not None else 0)
    trainer = trainer_cls(model=model, args=args, train_dataset=Dataset.from_list(train_raw),
                          eval_dataset=Dataset.from_list(val_raw) if val_raw else None,
                          processing_class=tok, peft_config=peft_config, callbacks=callbacks)
    preflight = sft_preflight(trainer, tok, train_raw, hp["max_length"])
    preflight.update(student_prompt_template=prompts.student_template(spec.task), method=method,
                     validation_rows=len(val_raw), device="cuda" if cuda else "cpu", **size_info, **kd_info)
    report("preflight", preflight)
    if not preflight["ok"]:
        raise TrainingRefused(f"preflight: {preflight['refusal']}")
    check_stop()
    report("progress", {"progress": 0.05, "message": "training"})
    tokens = sum(len(r["input_ids"]) for r in trainer.train_dataset) * max(1, math.ceil(hp["num_train_epochs"]))
    t0 = time.perf_counter()
    trainer.train(resume_from_checkpoint=spec.resume_from_checkpoint)
    result = _finish(trainer, state_box, spec, preflight, t0, tokens)
    if state_box.get("components"):
        result.preflight = {**preflight, "loss_components_last": state_box["components"]}
    report("progress", {"progress": 0.92, "message": "saving artifacts"})
    result.artifacts = save_causal_artifacts(trainer, tok, spec, lora=peft_config is not None)
    return result


def _build_sized_student(spec: TrainSpec, teacher_src: str, size: str):
    """``student_init.build_student`` into ``<checkpoint_dir>/student-<size>`` (kept for a resume,
    which needs the same architecture); a bad preset or teacher is TrainingRefused."""
    from workers.pipeline.student_init import StudentInitError, build_student

    try:
        return build_student(teacher_src, size, Path(spec.checkpoint_dir) / f"student-{size}")
    except StudentInitError as exc:
        raise TrainingRefused(str(exc)) from None


def save_causal_artifacts(trainer, tok, spec: TrainSpec, *, lora: bool) -> list[dict]:
    """Write ``adapter`` (LoRA only), ``merged`` and ``int8`` under ``spec.output_dir`` from the
    trainer's (best) model. Returns ``[{"kind", "path"}]``."""
    import torch
    from transformers import AutoModelForCausalLM

    out = Path(spec.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    arts = []
    merged_dir = out / "merged"
    if lora:
        adapter_dir = out / "adapter"
        trainer.model.save_pretrained(adapter_dir)
        tok.save_pretrained(adapter_dir)
        cfg_path = adapter_dir / "adapter_config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg["base_model_name_or_path"] = spec.student_model  # resolved through the registry on load
        cfg_path.write_text(json.dumps(cfg, indent=2))
        arts.append({"kind": "adapter", "path": str(adapter_dir)})
        from peft import PeftModel

        # Merge onto a float32 base (not the bf16 training copy) so the merged weights are exact.
        base = _sft_model(spec, _resolve(spec, spec.student_model, "student_model"), torch.float32)
        merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    else:
        merged = trainer.model
        merged = merged.to(torch.float32)
    merged.save_pretrained(merged_dir)
    tok.save_pretrained(merged_dir)
    arts.append({"kind": "merged", "path": str(merged_dir)})
    int8_dir = out / "int8"
    int8_dir.mkdir(exist_ok=True)
    fp32 = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
    q = torch.ao.quantization.quantize_dynamic(fp32, {torch.nn.Linear}, dtype=torch.qint8)
    torch.save(q, int8_dir / INT8_FILE)
    tok.save_pretrained(int8_dir)
    arts.append({"kind": "int8", "path": str(int8_dir)})
    return arts


def _load_logit_teacher(spec: TrainSpec, student_tok):
    """Load the local causal teacher for logit-kd. Returns ``(teacher model, teacher tokenizer)``.

    Plain logit-kd (``uld_weight`` 0) compares the two models' distributions token by token, so
    it refuses (TrainingRefused) a teacher whose tokenizer differs from the student's, pointing
    to ``uld_weight`` (cross-tokenizer distillation) and to sft-lora. With ``uld_weight`` > 0 any
    causal teacher is taken."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cross = spec.hyperparams.get("uld_weight", 0) > 0
    if not spec.teacher_model:
        raise TrainingRefused("logit-kd needs a local teacher (a transformers teacher of this project); "
                              "for an API teacher use sft-lora on its answers, or uld_weight > 0 with "
                              f"teacher={TEACHER_FROM_SAMPLES} to learn from its stored top_logprobs")
    src = _resolve(spec, spec.teacher_model, "teacher_model")
    ttok = AutoTokenizer.from_pretrained(src)
    if not cross and ttok.get_vocab() != student_tok.get_vocab():
        raise TrainingRefused(f"logit-kd needs the teacher and the student to share a tokenizer, but teacher "
                              f"{spec.teacher_model!r} and student {spec.student_model!r} have different "
                              "vocabularies; set uld_weight > 0 (cross-tokenizer distillation, Universal Logit "
                              "Distillation) or use sft-lora (response-based distillation) instead")
    return _load_frozen_causal(src), ttok


def _load_frozen_causal(src: str):
    """The causal LM at folder ``src`` in the run's dtype, frozen (eval, no grad), on the GPU
    when there is one: a local teacher."""
    from transformers import AutoModelForCausalLM

    cuda, dtype = _device()
    teacher = AutoModelForCausalLM.from_pretrained(src, dtype=dtype)
    if getattr(teacher, "is_quantized", False):
        clear_quantizer_marker(teacher)
    teacher.eval().requires_grad_(False)
    if cuda:
        teacher.to("cuda")
    return teacher


def _logit_kd_sources(spec: TrainSpec, student_tok, report):
    """Where a logit-kd run's teacher signal comes from: ``(teacher model or None, per-row
    teacher probabilities or None, preflight facts)``. Plain logit-kd: the local teacher (same
    tokenizer), run on every batch. Cross-tokenizer (``uld_weight`` > 0): the local teacher's
    top-``uld_top_k`` probabilities per answer token, computed once before training (the
    teacher is then freed), or without a local teacher the samples' stored top_logprobs.
    Raises TrainingRefused on a setting that cannot work."""
    hp = spec.hyperparams
    fw, rw, uw = hp.get("feature_weight", 0), hp.get("relation_weight", 0), hp.get("uld_weight", 0)
    rows = spec.train_rows + spec.val_rows
    terms = ["ce", "uld"] if uw > 0 else ["response"] + ["feature"] * (fw > 0) + ["relation"] * (rw > 0)
    if uw > 0 and (fw > 0 or rw > 0):
        raise TrainingRefused("feature_weight and relation_weight compare hidden states on the same tokens, so they "
                              "need a teacher with the student's tokenizer; set them to 0 when uld_weight > 0")
    if uw > 0 and not spec.teacher_model:
        probs = sample_answer_probs(rows)
        n = sum(p is not None for p in probs[:len(spec.train_rows)])
        if n == 0:
            raise TrainingRefused("uld_weight > 0 without a local teacher learns from the samples' stored "
                                  "top_logprobs, but no training row has them: generate with an API teacher that "
                                  "returns logprobs (top_logprobs), or name a local teacher")
        return None, probs, {"kd_losses": terms, "teacher_source": "samples' top_logprobs",
                             "rows_with_teacher_distributions": n,
                             "teacher_top_k": min(p.shape[1] for p in probs if p is not None)}
    teacher, ttok = _load_logit_teacher(spec, student_tok)
    if uw <= 0:
        return teacher, None, {"kd_losses": terms, "teacher_source": "local teacher"}
    report("progress", {"progress": 0.01, "message": "teacher distributions over the answers"})
    probs = teacher_answer_probs(teacher, ttok, spec.task, rows, top_k=hp["uld_top_k"], max_length=hp["max_length"])
    del teacher
    n = sum(p is not None for p in probs[:len(spec.train_rows)])
    return None, probs, {"kd_losses": terms, "teacher_source": "local teacher (own tokenizer)",
                         "rows_with_teacher_distributions": n, "teacher_top_k": hp["uld_top_k"],
                         "same_tokenizer": ttok.get_vocab() == student_tok.get_vocab()}


def teacher_answer_probs(teacher, ttok, task: TaskSpec, rows: list[TrainRow], *, top_k: int, max_length: int) -> list:
    """Cross-tokenizer KD with a local teacher: the teacher's top-``top_k`` next-token
    probabilities at each token of each row's answer, under the teacher's own tokenization.

    The teacher reads the messages it answered (``prompts.teacher_messages``) through its chat
    template (or, without one, the messages' texts joined by newlines) followed by the answer
    and its EOS token; the sequence is cut to ``max_length`` teacher tokens. Returns one float32
    tensor [n_answer_tokens, min(top_k, V_t)] per row (descending), or None for a row whose
    answer is empty or cut off entirely."""
    import torch

    out = []
    device = next(teacher.parameters()).device
    for r in rows:
        msgs = prompts.teacher_messages(task, r.query)
        if getattr(ttok, "chat_template", None):
            enc = ttok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
            prompt_ids = list(enc["input_ids"] if hasattr(enc, "keys") else enc)
        else:
            prompt_ids = ttok("\n".join(m["content"] for m in msgs) + "\n", add_special_tokens=False)["input_ids"]
        ans_ids = ttok(r.answer or "", add_special_tokens=False)["input_ids"]
        if ttok.eos_token_id is not None:
            ans_ids = ans_ids + [ttok.eos_token_id]
        ids = (prompt_ids + ans_ids)[:max_length]
        n_ans = len(ids) - len(prompt_ids)
        if not r.answer or n_ans <= 0:
            out.append(None)
            continue
        with torch.no_grad():
            logits = teacher(input_ids=torch.tensor([ids], device=device)).logits[0].float()
        # logits at position t predict token t + 1: the answer's tokens are predicted from
        # positions len(prompt) - 1 .. len(ids) - 2
        p = torch.softmax(logits[len(prompt_ids) - 1:len(ids) - 1], dim=-1)
        out.append(torch.topk(p, min(top_k, p.shape[-1]), dim=-1).values.cpu())
    return out


def sample_answer_probs(rows: list[TrainRow]) -> list:
    """Cross-tokenizer KD from an API teacher: per row, the stored ``token_logprobs`` (the
    OpenAI ``logprobs.content`` list: ``{"token", "logprob", "top": [[token, logprob], ...]}``
    per generated token) as a float32 tensor [n_tokens, K] of top-K probabilities (descending;
    K = the fewest alternatives any position of the row has, at least the chosen token's own
    probability). None for a row without them. The mass outside the top K is what
    ``kd.uld_loss`` compares as one bucket."""
    import math

    import torch

    out = []
    for r in rows:
        lps = r.token_logprobs or []
        per_pos = []
        for t in lps:
            top = [float(x[1]) for x in (t.get("top") or []) if x and x[1] is not None]
            if not top and t.get("logprob") is not None:
                top = [float(t["logprob"])]
            if not top:
                break
            per_pos.append(sorted((math.exp(min(0.0, v)) for v in top), reverse=True))
        if not per_pos:
            out.append(None)
            continue
        k = min(len(p) for p in per_pos)
        out.append(torch.tensor([p[:k] for p in per_pos], dtype=torch.float32))
    return out


class _KDComponentsMixin:
    """Trainer mix-in shared by logit-kd and classifier-kd: ``_note(name, value)`` records an
    unweighted loss term during training, ``log`` adds the mean of each since the last log as
    ``kd_<name>`` (the report callback turns them into the metric's ``components``), and
    ``create_optimizer`` adds ``kd_projection`` (the FitNets regressor, an ``nn.Linear`` or None)
    to the optimizer so that it learns with the student (no weight decay)."""

    kd_projection = None

    def create_optimizer(self, model=None):
        opt = super().create_optimizer(model)
        if self.kd_projection is not None and not any(
                any(p is q for q in g["params"]) for g in opt.param_groups for p in self.kd_projection.parameters()):
            opt.add_param_group({"params": list(self.kd_projection.parameters()), "weight_decay": 0.0})
        return opt

    def _note(self, name: str, value) -> None:
        if self.model.training:
            sums = self.__dict__.setdefault("_kd_sums", {})
            sums.setdefault(name, []).append(float(value.detach()))

    def log(self, logs, *args, **kwargs):
        sums = self.__dict__.get("_kd_sums")
        if "loss" in logs and sums:
            for k, v in sums.items():
                logs[f"kd_{k}"] = sum(v) / len(v)
            self._kd_sums = {}
        return super().log(logs, *args, **kwargs)


def _logit_kd_trainer_cls(teacher, hp: dict, *, teacher_probs: list | None = None, student_hidden: int = 0,
                          teacher_hidden: int = 0):
    """The SFTTrainer subclass for logit-kd. Same tokenizer (``teacher`` given): response loss
    ``token_kd_loss`` plus ``feature_weight`` x ``feature_kd_loss`` (student's last hidden states
    through a learned ``nn.Linear(student_hidden, teacher_hidden)``, on the answer tokens) plus
    ``relation_weight`` x ``relation_kd_loss`` (mean-pooled answer hidden states). Cross-tokenizer
    (``teacher_probs``: per row id a [n, K] tensor or None): the student's cross-entropy + ``uld_weight``
    x ``uld_loss`` on the answer positions aligned by index (cut to the shorter answer), as in
    Boizard et al. 2024. The mean of each component since the last log is added to the logs
    (``kd_response``, ``kd_feature``, ``kd_relation``, ``kd_ce``, ``kd_uld``)."""
    import torch
    import torch.nn.functional as F
    from trl import SFTTrainer

    fw, rw, uw = float(hp.get("feature_weight", 0)), float(hp.get("relation_weight", 0)), float(hp.get("uld_weight", 0))
    need_hidden = teacher_probs is None and (fw > 0 or rw > 0)
    projection = None
    if need_hidden and fw > 0:
        with torch.random.fork_rng(devices=[]):  # the regressor's init follows the run's seed
            torch.manual_seed(int(hp.get("seed", 42)))
            projection = torch.nn.Linear(student_hidden, teacher_hidden)

    class LogitKDTrainer(_KDComponentsMixin, SFTTrainer):
        """SFTTrainer whose loss is logit distillation (see ``_logit_kd_trainer_cls``)."""

        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            self._kd_sums: dict[str, list[float]] = {}
            self.kd_projection = projection
            if teacher_probs is not None:
                inner = self.data_collator

                def collate(examples):
                    ids = [int(e["row_id"]) for e in examples]
                    batch = inner([{k: v for k, v in e.items() if k != "row_id"} for e in examples])
                    batch["row_id"] = torch.tensor(ids)
                    return batch

                self.data_collator = collate

        def _set_signature_columns_if_needed(self):
            super()._set_signature_columns_if_needed()
            if teacher_probs is not None and "row_id" not in self._signature_columns:
                self._signature_columns = [*self._signature_columns, "row_id"]

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            labels = inputs["labels"]
            fwd = {k: v for k, v in inputs.items() if k in ("input_ids", "attention_mask", "position_ids")}
            if teacher_probs is not None:
                outputs = model(**fwd)
                loss = self._uld(outputs.logits, labels, inputs["row_id"])
                return (loss, outputs) if return_outputs else loss
            outputs = model(**fwd, output_hidden_states=need_hidden)
            with torch.no_grad():
                t_out = teacher.to(outputs.logits.device)(**fwd, output_hidden_states=need_hidden)
            loss = token_kd_loss(outputs.logits, t_out.logits, labels, temperature=hp["temperature"], alpha=hp["alpha"])
            self._note("response", loss)
            if need_hidden:
                hs, ht = outputs.hidden_states[-1].float(), t_out.hidden_states[-1].float()
                mask = labels != IGNORE_INDEX  # the answer's tokens (TRL labels = input ids, prompt masked)
                if fw > 0:
                    proj = self.kd_projection.to(hs.device)
                    f = feature_kd_loss(hs[mask], ht[mask], proj)
                    self._note("feature", f)
                    loss = loss + fw * f
                if rw > 0:
                    m = mask.unsqueeze(-1).float()
                    keep = mask.any(1)
                    pooled_s = (hs * m).sum(1)[keep] / m.sum(1)[keep]
                    pooled_t = (ht * m).sum(1)[keep] / m.sum(1)[keep]
                    r = relation_kd_loss(pooled_s, pooled_t)
                    self._note("relation", r)
                    loss = loss + rw * r
            return (loss, outputs) if return_outputs else loss

        def _uld(self, logits, labels, row_ids):
            s = logits[:, :-1, :]
            y = labels[:, 1:]
            mask = y != IGNORE_INDEX
            n = int(mask.sum())
            if n == 0:
                return logits.sum() * 0.0
            ce = F.cross_entropy(s[mask].float(), y[mask].long(), reduction="sum") / n
            total, aligned = logits.sum() * 0.0, 0
            for b, rid in enumerate(row_ids.tolist()):
                tp = teacher_probs[rid]
                if tp is None:
                    continue
                s_b = s[b][mask[b]]
                k = min(s_b.shape[0], tp.shape[0])  # answers aligned by position, cut to the shorter
                if k == 0:
                    continue
                total = total + uld_loss(s_b[:k], tp[:k].to(s_b.device), reduction="sum")
                aligned += k
            u = total / aligned if aligned else total
            self._note("ce", ce)
            self._note("uld", u)
            return ce + uw * u

    return LogitKDTrainer


# --- classifier KD --------------------------------------------------------------------------


def soft_targets(row: TrainRow, labels: list[str]) -> list[float]:
    """The teacher distribution over ``labels`` for one row: its soft labels (missing labels get
    0, renormalised) or, without them, one-hot on the teacher's (else the hard) label."""
    probs = [0.0] * len(labels)
    if row.label_probs:
        for i, l in enumerate(labels):
            probs[i] = max(0.0, float(row.label_probs.get(l, 0.0)))
    z = sum(probs)
    if z <= 0:
        lab = row.teacher_label or row.label
        probs = [1.0 if l == lab else 0.0 for l in labels]
        z = sum(probs)
    if z <= 0:
        return [1.0 / len(labels)] * len(labels)
    return [p / z for p in probs]


def teacher_query_features(teacher, ttok, queries: list[str], *, max_length: int, batch_size: int = 16):
    """Feature-based classifier-kd (FitNets hints, Romero et al. 2015): the local causal
    ``teacher``'s last hidden state mean-pooled over each query's tokens under its own
    tokenizer ``ttok`` (the query text as is, cut to ``max_length`` teacher tokens; padding
    excluded by the attention mask), computed without gradients in batches of ``batch_size``.
    Returns a float32 CPU tensor [len(queries), D_t] (D_t: the teacher's hidden size)."""
    import torch

    if ttok.pad_token is None:
        ttok.pad_token = ttok.eos_token or ttok.unk_token
    device = next(teacher.parameters()).device
    out = []
    for i in range(0, len(queries), batch_size):
        enc = ttok(list(queries[i:i + batch_size]), truncation=True, max_length=max_length, padding=True,
                   return_tensors="pt")
        ids, att = enc["input_ids"].to(device), enc["attention_mask"].to(device)
        with torch.no_grad():
            h = teacher(input_ids=ids, attention_mask=att, output_hidden_states=True).hidden_states[-1].float()
        m = att.unsqueeze(-1).float()
        out.append(((h * m).sum(1) / m.sum(1).clamp(min=1.0)).cpu())
    return torch.cat(out) if out else torch.zeros(0, teacher.config.hidden_size)


def _classifier_teacher_features(spec: TrainSpec, report):
    """classifier-kd with ``feature_weight`` > 0: ``teacher_query_features`` of the local teacher
    ``spec.teacher_model`` for every training then validation row (the teacher is freed
    afterwards). Raises TrainingRefused, naming feature_weight, without a local teacher."""
    from transformers import AutoTokenizer

    if not spec.teacher_model:
        raise TrainingRefused("feature_weight > 0 (classifier-kd) matches a local (transformers) teacher's hidden "
                              "states, and this run has none: add a local teacher to the project (or name one with "
                              "teacher=NAME), or set feature_weight to 0; relation_weight works with any teacher "
                              "(it compares the soft labels)")
    src = _resolve(spec, spec.teacher_model, "teacher_model")
    ttok = AutoTokenizer.from_pretrained(src)
    teacher = _load_frozen_causal(src)
    report("progress", {"progress": 0.02, "message": "teacher hidden states of the queries"})
    feats = teacher_query_features(teacher, ttok, [r.query for r in spec.train_rows + spec.val_rows],
                                   max_length=spec.hyperparams["max_length"])
    del teacher
    return feats


def _train_classifier(spec: TrainSpec, report, check_stop) -> TrainResult:
    import time

    import numpy as np
    import torch
    from transformers import (AutoModelForSequenceClassification, AutoTokenizer, EarlyStoppingCallback, Trainer,
                              TrainingArguments)

    hp = spec.hyperparams
    labels = list(spec.task.labels)
    if spec.task.task_type != "classification" or len(labels) < 2:
        raise TrainingRefused("classifier-kd needs a classification project with at least two labels")
    index = {l: i for i, l in enumerate(labels)}
    src = _resolve(spec, spec.student_model, "student_model")
    tok = AutoTokenizer.from_pretrained(src)
    report("progress", {"progress": 0.01, "message": "loading the student"})
    model = AutoModelForSequenceClassification.from_pretrained(
        src, num_labels=len(labels), id2label=dict(enumerate(labels)), label2id=index)
    # Feature- and relation-based terms (0: off), on the student's mean-pooled last hidden state.
    fw, rw = float(hp.get("feature_weight", 0)), float(hp.get("relation_weight", 0))
    teacher_feats = _classifier_teacher_features(spec, report) if fw > 0 else None
    projection = None
    if teacher_feats is not None:
        with torch.random.fork_rng(devices=[]):  # the regressor's init follows the run's seed
            torch.manual_seed(int(hp.get("seed", 42)))
            projection = torch.nn.Linear(model.config.hidden_size, teacher_feats.shape[1])

    def encode(rows: list[TrainRow], start: int) -> list[dict]:
        """Tokenised rows; ``row_id``: the row's index in train + validation rows (from ``start``)."""
        if not rows:
            return []
        enc = tok([r.query for r in rows], truncation=True, max_length=hp["max_length"])
        out = []
        for i, r in enumerate(rows):
            hard = index.get(r.label, index.get(r.teacher_label, IGNORE_INDEX))
            out.append({"input_ids": enc["input_ids"][i], "attention_mask": enc["attention_mask"][i],
                        "labels": hard, "teacher_probs": soft_targets(r, labels),
                        "teacher_label": index.get(r.teacher_label, hard), "row_id": start + i})
        return out

    # teacher_feats holds the training rows, then the validation rows
    train_ds, val_ds = encode(spec.train_rows, 0), encode(spec.val_rows, len(spec.train_rows))
    supervised = sum(1 for r in train_ds if r["labels"] != IGNORE_INDEX)
    preflight = {"rows": len(train_ds), "validation_rows": len(val_ds), "labels": len(labels),
                 "rows_with_soft_labels": sum(1 for r in spec.train_rows if r.label_probs),
                 "rows_with_hard_label": supervised,
                 "rows_cut_by_max_length": sum(1 for r in train_ds if len(r["input_ids"]) >= hp["max_length"]),
                 "max_length": hp["max_length"], "temperature": hp["temperature"], "alpha": hp["alpha"],
                 "student_prompt_template": "{query}", "method": spec.method,
                 "device": "cuda" if torch.cuda.is_available() else "cpu", "ok": True, "refusal": ""}
    if fw > 0 or rw > 0:
        preflight["kd_losses"] = ["response"] + ["feature"] * (fw > 0) + ["relation"] * (rw > 0)
        if rw > 0:
            preflight["relation_teacher_repr"] = "soft labels"
        if teacher_feats is not None:
            preflight.update(teacher_source="local teacher", teacher_hidden=int(teacher_feats.shape[1]))
    if not train_ds:
        preflight.update(ok=False, refusal="no training rows")
    report("preflight", preflight)
    if not preflight["ok"]:
        raise TrainingRefused(f"preflight: {preflight['refusal']}")

    def collate(batch: list[dict]) -> dict:
        padded = tok.pad([{"input_ids": b["input_ids"], "attention_mask": b["attention_mask"]} for b in batch],
                         return_tensors="pt")
        padded["labels"] = torch.tensor([b["labels"] for b in batch])
        padded["teacher_probs"] = torch.tensor([b["teacher_probs"] for b in batch], dtype=torch.float32)
        padded["teacher_label"] = torch.tensor([b["teacher_label"] for b in batch])
        padded["row_id"] = torch.tensor([b["row_id"] for b in batch])
        return dict(padded)

    need_hidden = fw > 0 or rw > 0

    class KDTrainer(_KDComponentsMixin, Trainer):
        """Trainer with the soft-label KD loss (workers.pipeline.kd.soft_label_kd_loss), plus
        ``feature_weight`` x ``feature_kd_loss`` (the student's mean-pooled last hidden state
        through ``kd_projection`` vs the local teacher's, ``teacher_query_features``) plus
        ``relation_weight`` x ``relation_kd_loss`` (the student's mean-pooled hidden states vs the
        rows' teacher soft-label vectors: relations between the teacher's output distributions)."""

        kd_projection = projection

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            out = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                        output_hidden_states=need_hidden)
            loss = soft_label_kd_loss(out.logits, inputs["teacher_probs"], inputs["labels"],
                                      temperature=hp["temperature"], alpha=hp["alpha"])
            if need_hidden:
                self._note("response", loss)
                h = out.hidden_states[-1].float()
                m = inputs["attention_mask"].unsqueeze(-1).float()
                pooled = (h * m).sum(1) / m.sum(1).clamp(min=1.0)
                if fw > 0:
                    t = teacher_feats[inputs["row_id"].cpu()].to(pooled.device)
                    f = feature_kd_loss(pooled, t, self.kd_projection.to(pooled.device))
                    self._note("feature", f)
                    loss = loss + fw * f
                if rw > 0:
                    r = relation_kd_loss(pooled, inputs["teacher_probs"])
                    self._note("relation", r)
                    loss = loss + rw * r
            if return_outputs:  # predictions for the metrics: the logits only
                return loss, {"logits": out.logits}
            return loss

    def metrics(ev) -> dict:
        logits = ev.predictions[0] if isinstance(ev.predictions, tuple) else ev.predictions
        hard, _probs, teacher_label = ev.label_ids
        pred = np.asarray(logits).argmax(-1)
        return {"fidelity": float((pred == teacher_label).mean()),
                "accuracy": float((pred == hard)[hard != IGNORE_INDEX].mean()) if (hard != IGNORE_INDEX).any() else 0.0}

    kw = _training_args_kwargs(hp, spec, len(train_ds), bool(val_ds))
    args = TrainingArguments(remove_unused_columns=False, label_names=["labels", "teacher_probs", "teacher_label"], **kw)
    state_box: dict = {}
    callbacks = [_report_callback(report, check_stop, state_box)]
    if val_ds and hp["early_stopping_patience"] > 0:
        callbacks.append(EarlyStoppingCallback(early_stopping_patience=hp["early_stopping_patience"]))
    trainer = KDTrainer(model=model, args=args, train_dataset=train_ds, eval_dataset=val_ds or None,
                        data_collator=collate, compute_metrics=metrics if val_ds else None, callbacks=callbacks)
    check_stop()
    report("progress", {"progress": 0.05, "message": "training"})
    tokens = sum(len(r["input_ids"]) for r in train_ds) * max(1, math.ceil(hp["num_train_epochs"]))
    t0 = time.perf_counter()
    trainer.train(resume_from_checkpoint=spec.resume_from_checkpoint)
    result = _finish(trainer, state_box, spec, preflight, t0, tokens)
    if state_box.get("components"):
        result.preflight = {**preflight, "loss_components_last": state_box["components"]}
        preflight = result.preflight
    if val_ds:
        state_box["mute"] = True  # the best model's figures; already logged at its step
        final = trainer.evaluate()
        result.preflight = {**preflight, "final_validation_accuracy": final.get("eval_accuracy"),
                            "final_validation_fidelity": final.get("eval_fidelity")}
    report("progress", {"progress": 0.92, "message": "saving artifacts"})
    out = Path(spec.output_dir) / "classifier"
    out.mkdir(parents=True, exist_ok=True)
    trainer.model.to(torch.float32).save_pretrained(out)
    tok.save_pretrained(out)
    result.artifacts = [{"kind": "classifier", "path": str(out)}]
    return result


def train(spec: TrainSpec, *, report: Callable[[str, dict], None] | None = None,
          check_stop: Callable[[], None] | None = None) -> TrainResult:
    """Train the student described by ``spec``.

    ``report(event, data)`` receives ``("progress", {"progress": 0..1, "message"})``,
    ``("preflight", dict)`` once before the first step, and ``("metric", {"split": "train" |
    "validation", "step", "epoch", "loss", "learning_rate", "grad_norm", "fidelity"})`` every
    ``logging_steps`` steps and at every validation. ``check_stop()`` is called after every step
    and may raise to stop the run (cancel). Raises TrainingRefused before training on a bad
    setting or a failed preflight, TrainingStopped when the loss becomes NaN.

    ``hyperparams["student_size"]`` (light / medium / heavy; sft-full and logit-kd only): the
    student is ``spec.student_model`` (the local teacher) cut to evenly spaced layers by
    ``workers.pipeline.student_init.build_student``, then fully fine-tuned; the preflight gets
    ``student_size``, ``student_layers``, ``teacher_layers``, ``student_layer_indices``,
    ``student_parameters``, ``teacher_parameters`` and ``student_label`` (e.g.
    ``smollm2-135m-instruct@light (3/30 layers)``)."""
    report = report or (lambda event, data: None)
    check_stop = check_stop or (lambda: None)
    if spec.method not in METHODS:
        raise TrainingRefused(f"method: {spec.method!r} is not one of {', '.join(METHODS)}")
    if not spec.train_rows:
        raise TrainingRefused("no training rows: the curated dataset is empty")
    if spec.hyperparams.get("student_size") and spec.method not in SIZE_METHODS:
        raise TrainingRefused(f"student_size: only for {' and '.join(SIZE_METHODS)}, not {spec.method}")
    os.makedirs(spec.output_dir, exist_ok=True)
    _limit_threads()
    import torch

    # A worker process is reused across tasks; an earlier task (evaluation, a local teacher) may
    # have left autograd switched off process-wide.
    with torch.enable_grad():
        if spec.method == "classifier-kd":
            return _train_classifier(spec, report, check_stop)
        return _train_sft(spec, report, check_stop)


def _limit_threads() -> None:
    """``DISTILLHUB_TORCH_THREADS=N`` caps torch's CPU threads: on a CPU shared with other
    processes, OpenMP threads that outnumber free cores spin and slow training down many times
    (measured here: MiniLM 12 examples/s with 1 thread vs 1.7 with 2 on a busy 2-core machine)."""
    n = os.environ.get("DISTILLHUB_TORCH_THREADS")
    if n and n.isdigit() and int(n) > 0:
        import torch

        torch.set_num_threads(int(n))


def split_validation(rows: list, *, every: int = 10) -> tuple[list, list]:
    """Deterministic hold-out when no validation-split samples exist: every ``every``-th row
    (index % every == every - 1, in curated order) goes to validation; fewer than ``every`` rows
    -> no validation. Returns (train, validation)."""
    if len(rows) < every:
        return list(rows), []
    train_rows = [r for i, r in enumerate(rows) if i % every != every - 1]
    val_rows = [r for i, r in enumerate(rows) if i % every == every - 1]
    return train_rows, val_rows
