"""Student-size presets: evenly spaced teacher layers, weights copied, the built model runs
(the bundled SmolLM2 as teacher on the main path; a tiny random Llama for the plumbing)."""
import json
import os

import pytest
import torch

os.environ.setdefault("DISTILLHUB_TORCH_THREADS", "1")

from workers.pipeline.registry import resolve_model
from workers.pipeline.student_init import (CONFIG_KEY, STUDENT_SIZES, StudentInitError, build_student,
                                           kept_layer_indices, student_layer_count, truncate_model)


def test_layer_indices_are_evenly_spaced_with_first_and_last():
    assert kept_layer_indices("light", 30) == [0, 15, 29]
    assert kept_layer_indices("medium", 30) == [0, 4, 8, 12, 17, 21, 25, 29]
    assert kept_layer_indices("heavy", 30) == [0, 2, 4, 6, 8, 10, 12, 15, 17, 19, 21, 23, 25, 27, 29]
    assert [student_layer_count(s, 30) for s in STUDENT_SIZES] == [3, 8, 15]
    # Small teachers: never fewer than 2 layers, never more than the teacher has.
    assert kept_layer_indices("light", 4) == [0, 3]
    assert kept_layer_indices("heavy", 2) == [0, 1]
    for n in range(2, 80):
        for s in STUDENT_SIZES:
            idx = kept_layer_indices(s, n)
            assert idx[0] == 0 and idx[-1] == n - 1 and idx == sorted(set(idx))


def test_bad_preset_or_teacher_is_refused():
    with pytest.raises(StudentInitError, match="student_size: 'tiny' is not one of light, medium, heavy"):
        kept_layer_indices("tiny", 30)
    with pytest.raises(StudentInitError, match="at least 2 needed"):
        kept_layer_indices("light", 1)


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=10,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).eval()


def test_truncate_tiny_llama_keeps_the_chosen_layers_and_fixes_layer_idx():
    teacher = _tiny_llama()
    student, idx = truncate_model(teacher, "medium")
    assert idx == [0, 5, 9]  # k = floor(0.25 * 10 + 0.5) = 3, spacing 4.5
    assert student.config.num_hidden_layers == 3 == len(student.model.layers)
    assert teacher.config.num_hidden_layers == 10  # the teacher is untouched
    assert [l.self_attn.layer_idx for l in student.model.layers] == [0, 1, 2]
    for new, old in enumerate(idx):
        for (kn, vn), (ko, vo) in zip(student.model.layers[new].state_dict().items(),
                                      teacher.model.layers[old].state_dict().items()):
            assert kn == ko and torch.equal(vn, vo), kn
    assert torch.equal(student.lm_head.weight, teacher.lm_head.weight)
    assert torch.equal(student.model.norm.weight, teacher.model.norm.weight)
    ids = torch.tensor([[1, 5, 9, 3]])
    with torch.no_grad():
        out = student(input_ids=ids).logits
        gen = student.generate(input_ids=ids, max_new_tokens=3, do_sample=False)  # the KV cache has 3 slots
    assert out.shape == (1, 4, 64) and torch.isfinite(out).all()
    assert gen.shape == (1, 7)
    assert getattr(student.config, CONFIG_KEY) == {"size": "medium", "teacher_layers": 10, "layer_indices": idx}


def test_build_student_from_bundled_smollm2(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = resolve_model("smollm2-135m-instruct")
    init = build_student(src, "light", tmp_path / "light")
    assert (init.size, init.indices, init.teacher_layers, init.student_layers) == ("light", [0, 15, 29], 30, 3)
    assert init.label == "light (3/30 layers)"
    assert 0.2 < init.parameters / init.teacher_parameters < 0.35  # embeddings (tied head) stay whole
    cfg = json.loads((tmp_path / "light" / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 3 and cfg[CONFIG_KEY]["layer_indices"] == [0, 15, 29]
    student = AutoModelForCausalLM.from_pretrained(init.path, dtype=torch.float32).eval()
    teacher = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    assert len(student.model.layers) == 3
    for new, old in enumerate(init.indices):
        s, t = student.model.layers[new].state_dict(), teacher.model.layers[old].state_dict()
        assert s.keys() == t.keys() and all(torch.equal(s[k], t[k]) for k in s)
    assert torch.equal(student.model.embed_tokens.weight, teacher.model.embed_tokens.weight)
    tok = AutoTokenizer.from_pretrained(init.path)
    assert tok.get_vocab() == AutoTokenizer.from_pretrained(src).get_vocab()
    enc = tok("Where is my card?", return_tensors="pt")
    with torch.no_grad():
        logits = student(**enc).logits
    assert logits.shape == (1, enc["input_ids"].shape[1], 49152) and torch.isfinite(logits).all()
    # A second build of the same preset reuses the complete folder.
    again = build_student(src, "light", tmp_path / "light")
    assert again.indices == [0, 15, 29] and again.parameters == init.parameters
