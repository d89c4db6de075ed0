"""workers/pipeline/local_lm.py: loading by kind (base, adapter, int8), the policy check before
anything is read, batched greedy generation, label scoring. Plumbing runs on a tiny random-weight
Llama built here (with SmolLM2's tokenizer files); one module-scoped fixture loads the bundled
SmolLM2 for the real-model checks."""
from __future__ import annotations

import math
import os
import shutil
from pathlib import Path

import pytest

from workers.pipeline.local_lm import INT8_FILE, LocalCausalLM, checked_policy, load_cached
from workers.pipeline.registry import SMOLLM2
from workers.pipeline.security import Refused, SecurityPolicy

CACHE = Path(os.environ.get("DISTILLHUB_MODEL_CACHE", "/work/model-cache"))
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")
CHAT = [{"role": "user", "content": "Where is my new card?"}]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A 2-layer random Llama (seeded) with SmolLM2's tokenizer, saved as a normal folder."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    src = CACHE / SMOLLM2
    if not (src / "tokenizer.json").exists():
        pytest.skip(f"no SmolLM2 tokenizer under {src} (set DISTILLHUB_MODEL_CACHE)")
    root = tmp_path_factory.mktemp("models")
    d = root / "tiny"
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=49152, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
                      bos_token_id=1, eos_token_id=2, pad_token_id=2)
    LlamaForCausalLM(cfg).save_pretrained(d)
    for f in TOKENIZER_FILES:
        if (src / f).exists():
            shutil.copy(src / f, d / f)
    return d


@pytest.fixture(scope="module")
def policy(tiny_dir):
    return SecurityPolicy(model_dirs=(os.path.realpath(tiny_dir.parent),))


@pytest.fixture(scope="module")
def tiny(tiny_dir, policy):
    return LocalCausalLM.load(str(tiny_dir), device="cpu", policy=policy)


# --- policy and kinds ----------------------------------------------------------------------------

def test_paths_outside_model_dirs_refused_before_reading(tiny_dir):
    with pytest.raises(Refused, match=r"^model: "):
        LocalCausalLM.load(str(tiny_dir), policy=SecurityPolicy())
    with pytest.raises(Refused):
        load_cached(str(tiny_dir), policy=SecurityPolicy())
    with pytest.raises(Refused):
        checked_policy("../tiny", SecurityPolicy())
    assert checked_policy(SMOLLM2, SecurityPolicy()) == SecurityPolicy()


def test_unknown_kind_and_missing_files(tiny_dir, policy):
    with pytest.raises(ValueError, match=r"^kind: 'onnx' is not one of base, merged, adapter, int8$"):
        LocalCausalLM.load(str(tiny_dir), kind="onnx", policy=policy)
    with pytest.raises(FileNotFoundError, match="adapter_config.json is missing"):
        LocalCausalLM.load(str(tiny_dir), kind="adapter", policy=policy)
    with pytest.raises(FileNotFoundError, match=f"{INT8_FILE} is missing"):
        LocalCausalLM.load(str(tiny_dir), kind="int8", policy=policy)


def test_base_load_sets_pad_and_eval(tiny, tiny_dir):
    assert tiny.name == str(tiny_dir) and tiny.device == "cpu"
    assert tiny.tokenizer.pad_token is not None
    assert not tiny.model.training
    assert 2 in tiny._eos_ids()


def test_chat_text_uses_template_or_fallback(tiny):
    assert tiny.chat_text(CHAT).rstrip().endswith("assistant")  # SmolLM2's template opens the answer
    saved = tiny.tokenizer.chat_template
    try:
        tiny.tokenizer.chat_template = None
        assert tiny.chat_text(CHAT) == "user: Where is my new card?\nassistant: "
        assert tiny.chat_text(CHAT, add_generation_prompt=False) == "user: Where is my new card?\n"
    finally:
        tiny.tokenizer.chat_template = saved


# --- generation ----------------------------------------------------------------------------------

def test_greedy_generation_counts_and_length(tiny):
    g = tiny.generate(CHAT, max_new_tokens=4, temperature=0.0)
    assert g.input_tokens == len(tiny._encode(tiny.chat_text(CHAT)))
    assert 1 <= g.output_tokens <= 4
    assert g.finish_reason == ("length" if g.output_tokens == 4 else "stop")
    assert g.latency_ms > 0
    again = tiny.generate(CHAT, max_new_tokens=4)  # greedy: the same answer every time
    assert (again.text, again.finish_reason, again.output_tokens) == (g.text, g.finish_reason, g.output_tokens)


def test_left_padded_batch_matches_single_answers(tiny):
    short = [{"role": "user", "content": "Hi"}]
    batch = tiny.generate_batch([CHAT, short], max_new_tokens=5)
    assert [b.input_tokens for b in batch] == [tiny.generate(CHAT, max_new_tokens=5).input_tokens,
                                               tiny.generate(short, max_new_tokens=5).input_tokens]
    assert batch[0].input_tokens > batch[1].input_tokens
    assert [b.text for b in batch] == [tiny.generate(CHAT, max_new_tokens=5).text,
                                       tiny.generate(short, max_new_tokens=5).text]


def test_sampling_with_seed_is_reproducible(tiny):
    a = tiny.generate(CHAT, max_new_tokens=6, temperature=1.0, seed=7)
    b = tiny.generate(CHAT, max_new_tokens=6, temperature=1.0, seed=7)
    assert a.text == b.text


# --- scoring -------------------------------------------------------------------------------------

def test_score_labels_distribution_and_both_paths_agree(tiny):
    labels = ["card_arrival", "lost_or_stolen_card", "refund_not_showing_up"]
    probs = tiny.score_labels(CHAT, labels)
    assert list(probs) == labels
    assert sum(probs.values()) == pytest.approx(1.0)
    assert all(0 <= p <= 1 for p in probs.values())  # a random model: longer labels get tiny mass
    prompt = tiny._encode(tiny.chat_text(CHAT))
    conts = [tiny._encode(l + tiny.tokenizer.eos_token) for l in labels]
    cached, full = tiny._score_with_prompt_cache(prompt, conts), tiny._score_full(prompt, conts)
    assert cached == pytest.approx(full, abs=1e-3)
    z = sum(math.exp(s) for s in full)
    assert [probs[l] for l in labels] == pytest.approx([math.exp(s) / z for s in full], rel=1e-3)


# --- other kinds ---------------------------------------------------------------------------------

def test_int8_artifact_loads_on_cpu(tiny, tiny_dir, policy, tmp_path_factory):
    import torch

    d = tiny_dir.parent / "tiny-int8"
    d.mkdir(exist_ok=True)
    q = torch.ao.quantization.quantize_dynamic(tiny.model, {torch.nn.Linear}, dtype=torch.qint8)
    torch.save(q, d / INT8_FILE)
    tiny.tokenizer.save_pretrained(d)
    lm = LocalCausalLM.load(str(d), kind="int8", device="cuda", policy=policy)  # int8 forces the CPU
    assert lm.device == "cpu"
    g = lm.generate(CHAT, max_new_tokens=3)
    assert 1 <= g.output_tokens <= 3


def test_adapter_loads_on_its_base(tiny_dir, policy):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    d = tiny_dir.parent / "tiny-lora"
    base = AutoModelForCausalLM.from_pretrained(tiny_dir)
    peft_model = get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    peft_model.save_pretrained(d)
    import json

    cfg = json.loads((d / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = str(tiny_dir)
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    lm = LocalCausalLM.load(str(d), kind="adapter", device="cpu", policy=policy)
    from peft import PeftModel

    assert isinstance(lm.model, PeftModel)
    assert any("lora_A" in n for n, _ in lm.model.named_parameters())
    assert lm.tokenizer.pad_token is not None  # tokenizer from the base folder
    assert sum(lm.score_labels(CHAT, ["a", "b"]).values()) == pytest.approx(1.0)


# --- the bundled SmolLM2 (the one real model load) ----------------------------------------------

@pytest.mark.slow
def test_bundled_smollm2_generates_and_scores():
    if not (CACHE / SMOLLM2 / "model.safetensors").exists():
        pytest.skip(f"no converted SmolLM2 under {CACHE}")
    lm = load_cached(SMOLLM2, device="cpu", cache_dir=str(CACHE), policy=SecurityPolicy())
    assert load_cached(SMOLLM2, device="cpu", cache_dir=str(CACHE), policy=SecurityPolicy()) is lm  # memoised
    msgs = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]
    a = lm.generate(msgs, max_new_tokens=5)
    b = lm.generate(msgs, max_new_tokens=5)
    assert (a.text, a.output_tokens) == (b.text, b.output_tokens)  # greedy: deterministic
    assert a.text.startswith("The capital of France")
    assert (a.finish_reason, a.output_tokens) == ("length", 5)
    assert a.input_tokens == len(lm._encode(lm.chat_text(msgs)))
    probs = lm.score_labels(msgs, ["Paris", "London", "Berlin"])
    assert list(probs) == ["Paris", "London", "Berlin"]
    assert sum(probs.values()) == pytest.approx(1.0)
    assert max(probs, key=probs.get) == "Paris"
