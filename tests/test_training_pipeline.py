"""The training pipeline without Django: real sft-lora steps on the bundled SmolLM2, a
classifier-kd run on BANKING77 with soft labels, the preflight cases and clear refusals."""
import json
import math
from pathlib import Path

import os

import pytest

# Two shared cores: one torch thread each trains several times faster than oversubscribed OpenMP.
os.environ.setdefault("DISTILLHUB_TORCH_THREADS", "1")

from tests.training_data import banking_rows
from workers.pipeline.local_lm import LocalCausalLM
from workers.pipeline.registry import resolve_model
from workers.pipeline.security import SecurityPolicy
from workers.pipeline.specs import TaskSpec
from workers.pipeline.training import (TrainingRefused, TrainRow, TrainSpec, ensure_chat_template,
                                       resolve_hyperparams, split_validation, train)


def soft(labels, gold, p_gold=0.7):
    rest = (1 - p_gold) / (len(labels) - 1)
    return {l: (p_gold if l == gold else rest) for l in labels}


def _local(tmp_path) -> SecurityPolicy:
    """The operator's policy with the test's folder allowed, as DISTILLHUB_MODEL_DIRS would."""
    return SecurityPolicy().with_model_dirs(str(tmp_path))


def _spec(tmp_path, method, student, task, train_rows, val_rows, **over):
    return TrainSpec(method=method, student_model=student, task=task, train_rows=train_rows, val_rows=val_rows,
                     hyperparams=resolve_hyperparams(method, "fast", over), output_dir=str(tmp_path / "out"),
                     checkpoint_dir=str(tmp_path / "ckpt"), policy=_local(tmp_path))


def test_sft_lora_lowers_loss_and_artifacts_reload_the_same(tmp_path, shared_data):
    labels, pairs = banking_rows(shared_data, "train", 4, 4)
    task = TaskSpec(task_type="classification", labels=tuple(labels))
    rows = [TrainRow(query=q, answer=l, label=l) for q, l in pairs]
    events = []
    spec = _spec(tmp_path, "sft-lora", "smollm2-135m-instruct", task, rows[:12], rows[12:],
                 num_train_epochs=2, per_device_train_batch_size=4, logging_steps=1)
    res = train(spec, report=lambda e, d: events.append((e, d)))
    pf = res.preflight
    # The preflight checked TRL's own batches: the end-of-turn token is supervised in every row
    # although SmolLM2's pad token IS its eos token.
    assert pf["ok"] and pf["pad_is_eos"] and pf["eos_token"] == "<|im_end|>"
    assert pf["eos_supervised_rows"] == 12 and pf["rows_cut_by_max_length"] == 0
    assert pf["supervised_tokens_min"] >= 2 and pf["supervised_tokens_total"] > 12
    assert [e for e, _ in events].count("preflight") == 1
    train_losses = [d["loss"] for e, d in events if e == "metric" and d["split"] == "train"]
    val = [d for e, d in events if e == "metric" and d["split"] == "validation"]
    assert len(train_losses) == 6 and train_losses[-1] < train_losses[0] * 0.6
    assert len(val) == 2 and val[-1]["loss"] < val[0]["loss"] and 0 <= val[-1]["fidelity"] <= 1
    assert all(d["learning_rate"] is not None and d["grad_norm"] is not None
               for e, d in events if e == "metric" and d["split"] == "train")
    assert res.best_step == 6 and res.best_val_loss == pytest.approx(val[-1]["loss"])
    kinds = {a["kind"]: Path(a["path"]) for a in res.artifacts}
    assert set(kinds) == {"adapter", "merged", "int8"}
    cfg = json.loads((kinds["adapter"] / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == "smollm2-135m-instruct"
    # Every saved tokenizer carries the chat template used in training.
    for k in kinds.values():
        assert "<|im_start|>" in (json.dumps(json.loads((k / "tokenizer_config.json").read_text()))
                                  + ((k / "chat_template.jinja").read_text() if (k / "chat_template.jinja").exists() else ""))
    msgs = [{"role": "user", "content": "Label: " + pairs[0][0]}]
    adapter = LocalCausalLM.load(str(kinds["adapter"]), kind="adapter", device="cpu", policy=_local(tmp_path))
    merged = LocalCausalLM.load(str(kinds["merged"]), kind="merged", device="cpu", policy=_local(tmp_path))
    a = adapter.generate(msgs, max_new_tokens=8)
    m = merged.generate(msgs, max_new_tokens=8)
    assert a.text == m.text and a.output_tokens == m.output_tokens
    int8 = LocalCausalLM.load(str(kinds["int8"]), kind="int8", policy=_local(tmp_path))
    assert int8.generate(msgs, max_new_tokens=8).output_tokens >= 1


def test_classifier_kd_on_banking77_beats_chance(tmp_path, shared_data):
    labels, train_pairs = banking_rows(shared_data, "train", 10, 30)
    _, val_pairs = banking_rows(shared_data, "test", 10, 8)
    task = TaskSpec(task_type="classification", labels=tuple(labels))
    tr = [TrainRow(query=q, label=l, teacher_label=l, label_probs=soft(labels, l)) for q, l in train_pairs]
    va = [TrainRow(query=q, label=l, teacher_label=l, label_probs=soft(labels, l)) for q, l in val_pairs]
    events = []
    res = train(_spec(tmp_path, "classifier-kd", "minilm-l6", task, tr, va, num_train_epochs=2, logging_steps=5),
                report=lambda e, d: events.append((e, d)))
    acc = res.preflight["final_validation_accuracy"]
    assert acc >= 0.6, acc  # chance is 0.1
    assert res.preflight["rows_with_soft_labels"] == 300 and res.preflight["temperature"] == 4.0
    val = [d for e, d in events if e == "metric" and d["split"] == "validation"]
    assert len(val) == 2 and val[-1]["fidelity"] >= 0.6
    out = Path(res.artifacts[0]["path"])
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    assert model.config.id2label[0] == labels[0] and model.config.label2id[labels[3]] == 3
    import torch

    with torch.no_grad():
        logits = model(**tok([q for q, _ in val_pairs[:40]], return_tensors="pt", padding=True)).logits
    hits = sum(labels[i] == l for i, (_, l) in zip(logits.argmax(-1).tolist(), val_pairs[:40]))
    assert hits >= 20


def test_preflight_refuses_when_max_length_cuts_every_answer(tmp_path, shared_data):
    labels, pairs = banking_rows(shared_data, "train", 2, 2)
    task = TaskSpec(task_type="classification", labels=tuple(labels))
    rows = [TrainRow(query=q, answer=l) for q, l in pairs]
    events = []
    with pytest.raises(TrainingRefused, match="no supervised tokens"):
        train(_spec(tmp_path, "sft-lora", "smollm2-135m-instruct", task, rows, [], max_length=16),
              report=lambda e, d: events.append((e, d)))
    pf = next(d for e, d in events if e == "preflight")
    assert not pf["ok"] and pf["rows_cut_by_max_length"] == 4 and pf["supervised_tokens_total"] == 0
    assert not (tmp_path / "ckpt").exists() or not list((tmp_path / "ckpt").glob("checkpoint-*"))


def test_student_without_chat_template_is_refused_or_given_one(tmp_path):
    from transformers import AutoTokenizer

    src = Path(resolve_model("smollm2-135m-instruct"))
    folder = tmp_path / "plain-lm"
    folder.mkdir()
    for f in ("config.json", "model.safetensors", "generation_config.json"):
        if (src / f).exists():
            (folder / f).symlink_to(src / f)
    tok = AutoTokenizer.from_pretrained(src)
    tok.chat_template = None
    tok.save_pretrained(folder)
    (folder / "chat_template.jinja").unlink(missing_ok=True)
    task = TaskSpec(task_type="classification", labels=("a", "b"))
    with pytest.raises(TrainingRefused, match="no chat template"):
        train(_spec(tmp_path, "sft-lora", str(folder), task, [TrainRow(query="x", answer="a")], []))
    plain = AutoTokenizer.from_pretrained(folder)
    ensure_chat_template(plain, str(folder), "{% for m in messages %}{{ m['content'] }}{{ eos_token }}{% endfor %}")
    assert plain.chat_template


def test_wrong_target_module_lists_valid_ones(tmp_path):
    task = TaskSpec(task_type="classification", labels=("a", "b"))
    with pytest.raises(TrainingRefused, match=r"qkv_proj not a linear layer.*valid: .*q_proj.*v_proj"):
        train(_spec(tmp_path, "sft-lora", "smollm2-135m-instruct", task, [TrainRow(query="x", answer="a")], [],
                    target_modules="q_proj,qkv_proj"))


def test_logit_kd_with_another_tokenizer_suggests_sft_lora(tmp_path):
    task = TaskSpec(task_type="classification", labels=("a", "b"))
    spec = _spec(tmp_path, "logit-kd", "smollm2-135m-instruct", task, [TrainRow(query="x", answer="a")], [])
    spec.teacher_model = "minilm-l6"
    with pytest.raises(TrainingRefused, match="share a tokenizer.*uld_weight > 0.*sft-lora"):
        train(spec)


def test_hyperparameters_overrides_and_errors():
    hp = resolve_hyperparams("sft-lora", "seed")
    assert (hp["lora_r"], hp["lora_alpha"], hp["target_modules"], hp["learning_rate"], hp["num_train_epochs"],
            hp["lr_scheduler_type"], hp["max_length"]) == (16, 32, ["q_proj", "v_proj"], 2e-5, 3.0, "cosine", 2048)
    hp = resolve_hyperparams("sft-lora", "fast", {"num_train_epochs": "1", "target_modules": "q_proj, o_proj"})
    assert hp["num_train_epochs"] == 1.0 and hp["target_modules"] == ["q_proj", "o_proj"]
    with pytest.raises(TrainingRefused, match="'temperature' is not a setting of sft-lora"):
        resolve_hyperparams("sft-lora", "fast", {"temperature": 2})
    with pytest.raises(TrainingRefused, match="lora_r.*not a valid int"):
        resolve_hyperparams("sft-lora", "fast", {"lora_r": "eight"})
    with pytest.raises(TrainingRefused, match="alpha.*\\[0, 1\\]"):
        resolve_hyperparams("classifier-kd", "fast", {"alpha": 1.5})
    assert resolve_hyperparams("classifier-kd", "seed")["temperature"] == 4.0
    tr, va = split_validation(list(range(25)))
    assert va == [9, 19] and len(tr) == 23


def test_every_hyperparameter_has_a_range_and_out_of_range_values_are_refused():
    from workers.pipeline.training import HYPERPARAMS, PRESETS, convert_hyperparam

    for method, presets in PRESETS.items():
        for preset, hp in presets.items():
            assert set(hp) <= set(HYPERPARAMS), (method, preset)
            assert {k: convert_hyperparam(k, v) for k, v in hp.items()} == hp  # the presets are in range
    cases = {
        ("num_train_epochs", 1e9): "hyperparameter 'num_train_epochs' must be in [0.01, 100], got 1e+09 "
                                   "(passes over the training set)",
        ("num_train_epochs", "1e9"): "hyperparameter 'num_train_epochs' must be in [0.01, 100], got 1e+09 "
                                     "(passes over the training set)",
        ("learning_rate", "inf"): "hyperparameter 'learning_rate': 'inf' is not a finite number (valid: [1e-08, 1])",
        ("learning_rate", float("nan")): "hyperparameter 'learning_rate': nan is not a finite number (valid: [1e-08, 1])",
        ("weight_decay", "NaN"): "hyperparameter 'weight_decay': 'NaN' is not a finite number (valid: [0, 1])",
        ("lora_r", "1e999999"): "hyperparameter 'lora_r': '1e999999' is not a finite number (valid: [1, 1024])",
        ("lora_r", 1.5): "hyperparameter 'lora_r': 1.5 is not a valid int (valid: [1, 1024])",
        ("lora_r", True): "hyperparameter 'lora_r': True is not a valid int (valid: [1, 1024])",
        ("max_steps", -2): "hyperparameter 'max_steps' must be in [-1, 1000000], got -2 "
                           "(stop after this many optimizer steps; -1: run the epochs)",
        ("activation_checkpointing", "maybe"): "hyperparameter 'activation_checkpointing': 'maybe' is not a valid bool "
                                               "(valid: true or false)",
        ("lr_scheduler_type", "bogus"): "hyperparameter 'lr_scheduler_type' must be one of linear, cosine, "
                                        "cosine_with_restarts, polynomial, constant, constant_with_warmup, "
                                        "inverse_sqrt, got 'bogus'",
        ("target_modules", ",".join(f"m{i}" for i in range(65))): "hyperparameter 'target_modules': give 1-64 "
                                                                   "comma-separated names, got 65 (LoRA's target "
                                                                   "linear layers, e.g. q_proj,v_proj)",
    }
    for (key, value), message in cases.items():
        method = "classifier-kd" if key not in ("lora_r", "target_modules") else "sft-lora"
        with pytest.raises(TrainingRefused) as info:
            resolve_hyperparams(method, "fast", {key: value})
        assert str(info.value) == message
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    training = readme[readme.index("### Training students"):readme.index("### Evaluating student vs teacher")]
    assert [k for k in HYPERPARAMS if f"`{k}`" not in training] == []  # the README lists every range
    hp = resolve_hyperparams("sft-lora", "fast", {"lora_r": "8.0", "max_steps": "1e3", "activation_checkpointing": "on",
                                                  "num_train_epochs": 100})
    assert (hp["lora_r"], hp["max_steps"], hp["activation_checkpointing"], hp["num_train_epochs"]) == (8, 1000, True, 100.0)


def test_nan_loss_stops_the_run_with_that_reason(tmp_path):
    from workers.pipeline.training import TrainingStopped

    task = TaskSpec(task_type="classification", labels=("a", "b"))
    rows = [TrainRow(query=f"message number {i}", label="ab"[i % 2], teacher_label="ab"[i % 2]) for i in range(24)]
    events = []
    spec = _spec(tmp_path, "classifier-kd", "minilm-l6", task, rows, [], max_grad_norm=0.0,
                 per_device_train_batch_size=4, logging_steps=1, num_train_epochs=3)
    # A learning rate far past HYPERPARAMS' range (resolve_hyperparams refuses it) makes the
    # loss blow up: the NaN guard is the safety net behind the ranges.
    spec.hyperparams["learning_rate"] = 1e38
    with pytest.raises(TrainingStopped, match=r"loss became (nan|inf) at step \d+"):
        train(spec, report=lambda e, d: events.append((e, d)))
    losses = [d["loss"] for e, d in events if e == "metric"]
    assert losses and not math.isfinite(losses[-1])  # the last logged loss is NaN (or inf)
    assert len(losses) < 18  # stopped early, not after all 18 steps
    assert not (tmp_path / "out" / "classifier").exists()


def test_logit_kd_on_a_teacher_with_the_same_tokenizer(tmp_path, shared_data):
    labels, pairs = banking_rows(shared_data, "train", 2, 4)
    task = TaskSpec(task_type="classification", labels=tuple(labels))
    rows = [TrainRow(query=q, answer=l) for q, l in pairs]
    spec = _spec(tmp_path, "logit-kd", "smollm2-135m-instruct", task, rows, [], max_steps=2,
                 per_device_train_batch_size=4, logging_steps=1, temperature=2.0)
    spec.teacher_model = "smollm2-135m-instruct"
    events = []
    res = train(spec, report=lambda e, d: events.append((e, d)))
    losses = [d["loss"] for e, d in events if e == "metric" and d["split"] == "train"]
    assert len(losses) == 2 and all(l == l and l > 0 for l in losses)
    assert res.preflight["eos_supervised_rows"] == 8
    assert {a["kind"] for a in res.artifacts} == {"adapter", "merged", "int8"}


def test_apply_student_size_records_the_preset_and_refuses_other_methods(tmp_path):
    from workers.pipeline.training import apply_student_size

    hp = resolve_hyperparams("logit-kd", "fast")
    sized = apply_student_size(hp, method="logit-kd", preset="fast", size="heavy")
    # Full fine-tuning of the cut teacher: sft-full's learning rate, not LoRA's 1e-3.
    assert (sized["student_size"], sized["learning_rate"], hp["learning_rate"]) == ("heavy", 5e-5, 1e-3)
    kept = apply_student_size(hp, method="logit-kd", preset="fast", size="light", overrides={"learning_rate": 3e-4})
    assert kept["learning_rate"] == 1e-3  # the caller's resolved value stays when the user set one
    assert apply_student_size(hp, method="logit-kd", preset="fast", size="") is hp
    assert apply_student_size(resolve_hyperparams("sft-full", "seed"), method="sft-full", preset="seed",
                              size="medium")["learning_rate"] == 2e-5
    with pytest.raises(TrainingRefused, match=r"^student_size: only for sft-full and logit-kd .*not sft-lora"):
        apply_student_size(resolve_hyperparams("sft-lora"), method="sft-lora", preset="fast", size="light")
    with pytest.raises(TrainingRefused, match=r"^student_size: 'xl' is not one of light, medium, heavy"):
        apply_student_size(hp, method="logit-kd", preset="fast", size="xl")
    # train() refuses a sized classifier-kd spec before loading anything.
    task = TaskSpec(task_type="classification", labels=("a", "b"))
    spec = TrainSpec(method="classifier-kd", student_model="minilm-l6", task=task, train_rows=[TrainRow(query="q", label="a")],
                     val_rows=[], hyperparams={**resolve_hyperparams("classifier-kd"), "student_size": "light"},
                     output_dir=str(tmp_path / "o"), checkpoint_dir=str(tmp_path / "c"))
    with pytest.raises(TrainingRefused, match=r"^student_size: only for sft-full and logit-kd, not classifier-kd"):
        train(spec)


# --- richer KD: hidden-state and relation losses, cross-tokenizer (ULD) ----------------------


def _tiny_llama_teacher(path: Path) -> str:
    """A random-weight Llama with the SmolLM2 tokenizer and a much smaller hidden size (32, the
    student has 576): same tokens, so feature/relation KD applies, through the projection."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(resolve_model("smollm2-135m-instruct"))
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=512)
    LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def _tiny_gpt2_teacher(path: Path, texts: list[str]) -> str:
    """A random-weight GPT-2 with its own byte-level BPE tokenizer (a few hundred tokens, no
    chat template): a teacher whose vocabulary has nothing in common with SmolLM2's."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts, vocab_size=300, min_frequency=1, special_tokens=["<eos>"])
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<eos>", pad_token="<eos>")
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=1, n_head=2, n_positions=512)).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def _train_losses(events):
    return [d for e, d in events if e == "metric" and d["split"] == "train"]


def test_logit_kd_with_feature_and_relation_losses_logs_each_component(tmp_path, shared_data):
    labels, pairs = banking_rows(shared_data, "train", 2, 4)
    task = TaskSpec(task_type="classification", labels=tuple(labels))
    rows = [TrainRow(query=q, answer=l) for q, l in pairs]
    spec = _spec(tmp_path, "logit-kd", "smollm2-135m-instruct", task, rows, [], max_steps=2,
                 per_device_train_batch_size=4, logging_steps=1, feature_weight=0.5, relation_weight=2.0)
    spec.teacher_model = _tiny_llama_teacher(tmp_path / "teacher")
    events = []
    res = train(spec, report=lambda e, d: events.append((e, d)))
    metrics = _train_losses(events)
    assert len(metrics) == 2
    for m in metrics:
        c = m["components"]
        assert set(c) == {"response", "feature", "relation"}
        assert c["response"] > 0 and c["feature"] > 0 and c["relation"] > 0
        # The logged loss is the weighted sum of its parts (one step per log)
        assert m["loss"] == pytest.approx(c["response"] + 0.5 * c["feature"] + 2.0 * c["relation"], rel=1e-3)
    assert res.preflight["kd_losses"] == ["response", "feature", "relation"]
    assert res.preflight["loss_components_last"] == metrics[-1]["components"]
    assert {a["kind"] for a in res.artifacts} == {"adapter", "merged", "int8"}


def test_cross_tokenizer_kd_from_a_local_teacher_with_another_vocabulary(tmp_path, shared_data):
    from transformers import AutoTokenizer

    from workers.pipeline.training import teacher_answer_probs

    labels, pairs = banking_rows(shared_data, "train", 2, 4)
    task = TaskSpec(task_type="classification", labels=tuple(labels))
    rows = [TrainRow(query=q, answer=l) for q, l in pairs]
    path = _tiny_gpt2_teacher(tmp_path / "teacher", [q for q, _ in pairs] + list(labels))
    ttok = AutoTokenizer.from_pretrained(path)
    assert len(ttok) < 400  # truly another vocabulary than SmolLM2's 49,152
    # Plain logit-kd still refuses it, pointing to the cross-tokenizer option
    plain = _spec(tmp_path, "logit-kd", "smollm2-135m-instruct", task, rows, [])
    plain.teacher_model = path
    with pytest.raises(TrainingRefused, match="uld_weight > 0"):
        train(plain)
    # The teacher's distributions: one row per answer token (+ its EOS), top-K, descending
    from transformers import AutoModelForCausalLM

    probs = teacher_answer_probs(AutoModelForCausalLM.from_pretrained(path), ttok, task, rows[:2], top_k=16,
                                 max_length=256)
    n_tokens = len(ttok(rows[0].answer, add_special_tokens=False)["input_ids"]) + 1
    assert probs[0].shape == (n_tokens, 16)
    assert bool((probs[0][:, :-1] >= probs[0][:, 1:]).all()) and bool((probs[0].sum(-1) <= 1 + 1e-5).all())

    spec = _spec(tmp_path, "logit-kd", "smollm2-135m-instruct", task, rows, [], max_steps=4,
                 per_device_train_batch_size=4, logging_steps=1, uld_weight=1.0, uld_top_k=64)
    spec.teacher_model = path
    events = []
    res = train(spec, report=lambda e, d: events.append((e, d)))
    metrics = _train_losses(events)
    assert len(metrics) == 4
    assert all(set(m["components"]) == {"ce", "uld"} and 0 < m["components"]["uld"] <= 2 for m in metrics)
    assert metrics[-1]["loss"] < metrics[0]["loss"]
    pf = res.preflight
    assert pf["teacher_source"] == "local teacher (own tokenizer)" and pf["same_tokenizer"] is False
    assert pf["rows_with_teacher_distributions"] == 8 and pf["kd_losses"] == ["ce", "uld"]
    assert {a["kind"] for a in res.artifacts} == {"adapter", "merged", "int8"}


def _api_logprobs(answer: str, p_first: float):
    """An API teacher's ``token_logprobs`` as generation stores them (top 3 per token)."""
    rest = (1 - p_first) / 4
    return [{"token": t, "logprob": math.log(p_first),
             "top": [[t, math.log(p_first)], ["x", math.log(rest)], ["y", math.log(rest / 2)]]}
            for t in answer.split("_")[:3] or [answer]]


def test_cross_tokenizer_kd_from_an_api_teachers_top_logprobs(tmp_path, shared_data):
    labels, pairs = banking_rows(shared_data, "train", 2, 4)
    task = TaskSpec(task_type="classification", labels=tuple(labels))
    rows = [TrainRow(query=q, answer=l, token_logprobs=_api_logprobs(l, 0.9)) for q, l in pairs]
    spec = _spec(tmp_path, "logit-kd", "smollm2-135m-instruct", task, rows, [], max_steps=4,
                 per_device_train_batch_size=4, logging_steps=1, uld_weight=2.0, teacher="samples")
    events = []
    res = train(spec, report=lambda e, d: events.append((e, d)))
    metrics = _train_losses(events)
    assert len(metrics) == 4 and metrics[-1]["loss"] < metrics[0]["loss"]
    for m in metrics:
        assert m["loss"] == pytest.approx(m["components"]["ce"] + 2.0 * m["components"]["uld"], rel=1e-3)
    pf = res.preflight
    assert pf["teacher_source"] == "samples' top_logprobs" and pf["teacher_top_k"] == 3
    assert pf["rows_with_teacher_distributions"] == 8


def test_cross_tokenizer_settings_that_cannot_work_are_refused(tmp_path):
    task = TaskSpec(task_type="classification", labels=("a", "b"))
    rows = [TrainRow(query="x", answer="a")]
    with pytest.raises(TrainingRefused, match="no training row has them"):
        train(_spec(tmp_path, "logit-kd", "smollm2-135m-instruct", task, rows, [], uld_weight=1.0))
    with pytest.raises(TrainingRefused, match="need a teacher with the student's tokenizer"):
        train(_spec(tmp_path, "logit-kd", "smollm2-135m-instruct", task, rows, [], uld_weight=1.0, feature_weight=1.0))
    with pytest.raises(TrainingRefused, match="'uld_weight' is not a setting of classifier-kd"):
        resolve_hyperparams("classifier-kd", "fast", {"uld_weight": 1.0})  # feature/relation are, see below
    with pytest.raises(TrainingRefused, match="uld_weight"):
        resolve_hyperparams("logit-kd", "fast", {"uld_weight": -1})


def test_sample_answer_probs_reads_stored_top_logprobs():
    from workers.pipeline.training import sample_answer_probs

    lp = [{"token": "a", "logprob": math.log(0.5), "top": [["b", math.log(0.2)], ["a", math.log(0.5)], ["c", math.log(0.1)]]},
          {"token": "d", "logprob": math.log(0.7), "top": [["d", math.log(0.7)], ["e", math.log(0.3)]]},
          {"token": "f", "logprob": math.log(0.9), "top": []}]
    [p, none] = sample_answer_probs([TrainRow(query="q", answer="adf", token_logprobs=lp), TrainRow(query="q")])
    # K = the fewest alternatives (1: the last token has only its own logprob); sorted descending
    assert none is None and p.shape == (3, 1)
    assert p[:, 0].tolist() == pytest.approx([0.5, 0.7, 0.9])
    [p2] = sample_answer_probs([TrainRow(query="q", answer="ad", token_logprobs=lp[:2])])
    assert p2.flatten().tolist() == pytest.approx([0.5, 0.2, 0.7, 0.3])


# --- classifier-kd with feature- and relation-based terms -------------------------------------


def _classifier_kd_rows(shared_data, n=6):
    labels, pairs = banking_rows(shared_data, "train", 3, 2)
    task = TaskSpec(task_type="classification", labels=tuple(labels))
    rows = [TrainRow(query=q, label=l, teacher_label=l, label_probs=soft(labels, l)) for q, l in pairs[:n]]
    return task, rows


def test_classifier_kd_relation_loss_on_the_teachers_soft_labels(tmp_path, shared_data):
    task, rows = _classifier_kd_rows(shared_data)
    spec = _spec(tmp_path, "classifier-kd", "minilm-l6", task, rows, [], max_steps=2, per_device_train_batch_size=6,
                 logging_steps=1, relation_weight=3.0)
    events = []
    res = train(spec, report=lambda e, d: events.append((e, d)))
    metrics = _train_losses(events)
    assert len(metrics) == 2
    for m in metrics:
        c = m["components"]
        assert set(c) == {"response", "relation"} and c["response"] > 0 and c["relation"] > 0
        assert m["loss"] == pytest.approx(c["response"] + 3.0 * c["relation"], rel=1e-3)
    assert res.preflight["kd_losses"] == ["response", "relation"]
    assert res.preflight["relation_teacher_repr"] == "soft labels"
    assert res.preflight["loss_components_last"] == metrics[-1]["components"]
    assert res.global_step == 2 and res.artifacts[0]["kind"] == "classifier"


def test_classifier_kd_feature_loss_through_a_learned_projection(tmp_path, shared_data, monkeypatch):
    import torch

    from workers.pipeline import training as tp

    task, rows = _classifier_kd_rows(shared_data, n=4)
    spec = _spec(tmp_path, "classifier-kd", "minilm-l6", task, rows, rows[:2], max_steps=2,
                 per_device_train_batch_size=4, logging_steps=1, feature_weight=0.5, early_stopping_patience=0)
    spec.teacher_model = _tiny_llama_teacher(tmp_path / "teacher")
    seen = {}
    real = tp.feature_kd_loss

    def spy(student, teacher, projection=None):  # records what the real loss gets, changes nothing
        seen.update(student=tuple(student.shape), teacher=tuple(teacher.shape), projection=projection)
        return real(student, teacher, projection)

    monkeypatch.setattr(tp, "feature_kd_loss", spy)
    events = []
    res = train(spec, report=lambda e, d: events.append((e, d)))
    # MiniLM's 384-d pooled state is mapped to the tiny teacher's 32-d one by the learned Linear
    assert seen["student"] == (2, 384) and seen["teacher"] == (2, 32)  # the last validation batch
    assert isinstance(seen["projection"], torch.nn.Linear) and seen["projection"].weight.shape == (32, 384)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(42)  # the run's seed: the projection's initial weights
        init = torch.nn.Linear(384, 32)
    assert not torch.allclose(seen["projection"].weight.detach().cpu(), init.weight)  # it learned with the student
    assert res.preflight["kd_losses"] == ["response", "feature"] and res.preflight["teacher_hidden"] == 32
    for m in _train_losses(events):
        c = m["components"]
        assert c["feature"] > 0
        assert m["loss"] == pytest.approx(c["response"] + 0.5 * c["feature"], rel=1e-3)
    assert res.global_step == 2 and res.preflight["final_validation_fidelity"] is not None


def test_classifier_kd_feature_weight_without_a_local_teacher_is_refused(tmp_path, shared_data):
    task, rows = _classifier_kd_rows(shared_data, n=3)
    spec = _spec(tmp_path, "classifier-kd", "minilm-l6", task, rows, [], max_steps=1, feature_weight=1.0)
    with pytest.raises(TrainingRefused, match=r"^feature_weight > 0 \(classifier-kd\) matches a local"):
        train(spec)
