"""Export a merged causal-LM student (a Hugging Face folder) to one GGUF file that llama.cpp
(``llama-server``, ``llama-cpp-python``'s OpenAI-compatible server, Ollama) serves.

Written with the ``gguf`` package (the one llama.cpp ships): ``GGUFWriter`` for the file,
``get_tensor_name_map`` for the tensor names, ``SpecialVocab`` for the merges, special token ids
and chat template. It follows what llama.cpp's own ``convert_hf_to_gguf.py`` does for a Llama
model with a BPE tokenizer:

- q/k projection rows are permuted back from Hugging Face's rotary layout (rotate-half, the two
  halves of each head apart) to the interleaved pairs llama.cpp's RoPE expects; k uses the
  key/value head count (grouped-query attention);
- a tied ``lm_head`` is not written (llama.cpp reuses ``token_embd``);
- the vocabulary is written as ``gpt2`` (byte-level BPE) tokens with their types (control for
  special added tokens, user-defined for other added ones), the merges, and the BPE
  pre-tokenizer's name, recognised by the same check (the sha256 of the token ids of a fixed
  text) the reference converter uses;
- 1-D tensors (norms) stay F32; matrices become the chosen ``outtype`` (``f32``, ``f16`` or
  ``q8_0``; a matrix whose rows do not split into 32-value blocks stays F16 under q8_0).

Supported: ``LlamaForCausalLM`` (model_type ``llama``: SmolLM/SmolLM2, Llama 2/3 style students
with a ``tokenizer.json`` BPE tokenizer), default RoPE. Anything else raises ``ExportRefused``
naming what is not supported; nothing is left at the output path then.
"""
from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from hashlib import sha256
from pathlib import Path

import numpy as np

OUTTYPES = ("f32", "f16", "q8_0")
SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM",)

# The fixed text whose token ids identify a BPE pre-tokenizer (llama.cpp PR #6920,
# convert_hf_to_gguf_update.py): the sha256 of ``str(tokenizer.encode(text))``.
PRE_TOKENIZER_CHECK_TEXT = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ 🦙🦙 "
    "3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ "
    "------======= нещо на Български ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, "
    "'RE you sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL"
)
#: Pre-tokenizers of the Llama-architecture BPE families (hash -> llama.cpp's name).
KNOWN_PRE_TOKENIZERS = {
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",     # SmolLM / SmolLM2
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",  # Llama 3
}


class ExportRefused(Exception):
    """The folder cannot be exported: an unsupported architecture, RoPE scaling or tokenizer,
    missing weights, or an unknown tensor (the message names it)."""


@dataclass(frozen=True)
class ExportResult:
    """What was written: ``path`` (the .gguf file), ``outtype``, ``tensors`` (count),
    ``architecture`` (GGUF's, e.g. ``llama``), ``pre_tokenizer`` (e.g. ``smollm``),
    ``vocab_size`` and ``context_length`` (tokens), ``size_bytes``, ``sha256`` (hex, of the file)."""

    path: str
    outtype: str
    tensors: int
    architecture: str
    pre_tokenizer: str
    vocab_size: int
    context_length: int
    size_bytes: int
    sha256: str


def permute_qk(weights: np.ndarray, n_head: int) -> np.ndarray:
    """Reorder the rows of a q or k projection (shape ``[n_head * head_dim, ...]``) from Hugging
    Face's rotate-half RoPE layout to llama.cpp's interleaved-pairs layout: within each head, row
    ``j`` of the first half and row ``j`` of the second half become rows ``2j`` and ``2j+1``.
    ``n_head``: query heads for q, key/value heads for k. Same as ``LlamaModel.permute`` in
    llama.cpp's convert_hf_to_gguf.py (the inverse of transformers' convert_llama_weights_to_hf)."""
    rows = weights.shape[0]
    if rows % (2 * n_head):
        raise ExportRefused(f"a q/k projection has {rows} rows, not a multiple of 2 x {n_head} heads")
    return (weights.reshape(n_head, 2, rows // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def _config(folder: Path) -> dict:
    path = folder / "config.json"
    if not path.is_file():
        raise ExportRefused(f"{folder.name}: no config.json; a merged Hugging Face model folder is needed")
    return json.loads(path.read_text(encoding="utf-8"))


def check_supported(config: dict) -> None:
    """Raise ExportRefused unless ``config`` (a config.json dict) is a Llama causal LM with
    default RoPE."""
    archs = config.get("architectures") or []
    if config.get("model_type") != "llama" or not any(a in SUPPORTED_ARCHITECTURES for a in archs):
        raise ExportRefused(f"architecture {', '.join(archs) or config.get('model_type') or 'unknown'!s} is not supported "
                            f"for GGUF export; supported: {', '.join(SUPPORTED_ARCHITECTURES)} (model_type llama)")
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    rope_type = rope.get("rope_type") or rope.get("type") or "default"
    if rope_type != "default":
        raise ExportRefused(f"RoPE type {rope_type!r} is not supported for GGUF export (only default RoPE)")


def _rope_theta(config: dict) -> float:
    rope = config.get("rope_parameters") or {}
    return float(rope.get("rope_theta") or config.get("rope_theta") or 10000.0)


def _tensors(folder: Path) -> Iterator[tuple[str, np.ndarray]]:
    """``(hf name, float32 array)`` for every tensor in the folder's safetensors files."""
    from safetensors import safe_open

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ExportRefused(f"{folder.name}: no .safetensors weights (save the merged model with safetensors)")
    for f in files:
        with safe_open(str(f), framework="pt") as st:
            for name in st.keys():
                yield name, st.get_tensor(name).float().numpy()


def _vocab(folder: Path, vocab_size: int) -> tuple[list[str], list[int], str, bool]:
    """Tokens, token types, the pre-tokenizer name of a byte-level BPE tokenizer, and whether
    it puts a BOS token before a text (so llama.cpp does the same)."""
    import gguf
    from transformers import AutoTokenizer

    tj = folder / "tokenizer.json"
    if not tj.is_file():
        raise ExportRefused(f"{folder.name}: no tokenizer.json; only byte-level BPE tokenizers (tokenizer.json) are "
                            "supported for GGUF export")
    model_type = json.loads(tj.read_text(encoding="utf-8")).get("model", {}).get("type")
    if model_type != "BPE":
        raise ExportRefused(f"tokenizer model {model_type!r} is not supported for GGUF export (only BPE)")
    tok = AutoTokenizer.from_pretrained(str(folder))
    chkhsh = sha256(str(tok.encode(PRE_TOKENIZER_CHECK_TEXT)).encode()).hexdigest()
    pre = KNOWN_PRE_TOKENIZERS.get(chkhsh)
    if pre is None:
        raise ExportRefused(f"the tokenizer's BPE pre-tokenizer is not recognised (check hash {chkhsh}); known: "
                            f"{', '.join(sorted(KNOWN_PRE_TOKENIZERS.values()))}. llama.cpp would tokenize prompts "
                            "differently from transformers")
    vocab = tok.get_vocab()
    if max(vocab.values()) >= vocab_size:
        raise ExportRefused(f"the tokenizer has token id {max(vocab.values())} but the model's vocab_size is {vocab_size}")
    reverse = {i: t for t, i in vocab.items()}
    added = tok.get_added_vocab()
    decoder = tok.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif reverse[i] in added:
            tokens.append(reverse[i])
            types.append(gguf.TokenType.CONTROL if decoder[i].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(reverse[i])
            types.append(gguf.TokenType.NORMAL)
    probe = tok.encode("a")
    add_bos = tok.bos_token_id is not None and bool(probe) and probe[0] == tok.bos_token_id
    return tokens, [int(t) for t in types], pre, add_bos


def export_gguf(folder: str | os.PathLike, out_path: str | os.PathLike, *, outtype: str = "f16", name: str = "",
                report: Callable[[float, str], None] | None = None) -> ExportResult:
    """Convert the merged model in ``folder`` (config.json, *.safetensors, tokenizer.json) to the
    GGUF file ``out_path``. ``outtype``: ``f32``, ``f16`` (default) or ``q8_0`` for the matrices;
    ``name``: ``general.name`` in the file (default: the folder's name). ``report(fraction,
    message)`` is called as tensors are converted.

    The file is written beside ``out_path`` under a temporary name and renamed at the end, so a
    failure never leaves a partial GGUF. Raises ExportRefused (see ``check_supported`` and the
    module docstring) and ValueError for an unknown ``outtype``."""
    import gguf

    if outtype not in OUTTYPES:
        raise ValueError(f"outtype: {outtype!r} is not one of {', '.join(OUTTYPES)}")
    folder, out_path = Path(folder), Path(out_path)
    report = report or (lambda f, m: None)
    config = _config(folder)
    check_supported(config)

    n_layer = int(config["num_hidden_layers"])
    n_head = int(config["num_attention_heads"])
    n_kv = int(config.get("num_key_value_heads") or n_head)
    n_embd = int(config["hidden_size"])
    head_dim = int(config.get("head_dim") or n_embd // n_head)
    vocab_size = int(config["vocab_size"])
    n_ctx = int(config.get("max_position_embeddings") or 2048)
    tied = bool(config.get("tie_word_embeddings", False))

    tokens, toktypes, pre, add_bos = _vocab(folder, vocab_size)
    arch = gguf.MODEL_ARCH.LLAMA
    arch_name = gguf.MODEL_ARCH_NAMES[arch]
    name_map = gguf.get_tensor_name_map(arch, n_layer)
    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                 "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[outtype]

    out_path.parent.mkdir(parents=True, exist_ok=True)
    # A name of this process's own, so two exports to the same path never write one temp file.
    tmp = out_path.with_name(f"{out_path.name}.{os.getpid()}.part")
    writer = gguf.GGUFWriter(str(tmp), arch_name)
    try:
        writer.add_type(gguf.GGUFType.MODEL)
        writer.add_name(name or folder.name)
        writer.add_context_length(n_ctx)
        writer.add_embedding_length(n_embd)
        writer.add_block_count(n_layer)
        writer.add_feed_forward_length(int(config["intermediate_size"]))
        writer.add_head_count(n_head)
        writer.add_head_count_kv(n_kv)
        writer.add_rope_freq_base(_rope_theta(config))
        writer.add_layer_norm_rms_eps(float(config.get("rms_norm_eps", 1e-5)))
        writer.add_rope_dimension_count(head_dim)
        if head_dim != n_embd // n_head:
            writer.add_key_length(head_dim)
            writer.add_value_length(head_dim)
        writer.add_vocab_size(vocab_size)
        writer.add_file_type(int(file_type))
        if outtype == "q8_0":
            writer.add_quantization_version(gguf.GGML_QUANT_VERSION)

        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(pre)
        writer.add_token_list(tokens)
        writer.add_token_types(toktypes)
        special = gguf.SpecialVocab(folder, load_merges=True, n_vocab=vocab_size)
        if not special.merges:
            raise ExportRefused(f"{folder.name}: the BPE tokenizer has no merges")
        if "bos" not in special.add_special_token:
            special.add_special_token["bos"] = add_bos
        special.add_to_gguf(writer, quiet=True)

        n = 0
        names = []
        for hf_name, data in _tensors(folder):
            if hf_name.endswith("rotary_emb.inv_freq"):
                continue
            if hf_name == "lm_head.weight" and tied:
                continue
            new = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
            if new is None:
                raise ExportRefused(f"tensor {hf_name!r} has no GGUF name in the llama architecture")
            if hf_name.endswith(("q_proj.weight", "q_proj.bias")):
                data = permute_qk(data, n_head)
            elif hf_name.endswith(("k_proj.weight", "k_proj.bias")):
                data = permute_qk(data, n_kv)
            _add_tensor(writer, gguf, new, data, outtype)
            n += 1
            names.append(new)
            if n % 16 == 0:
                report(0.9 * n / (n_layer * 9 + 3), f"converted {n} tensors")
        if "token_embd.weight" not in names:
            raise ExportRefused(f"{folder.name}: no token embedding (model.embed_tokens.weight) in the weights")
        report(0.9, f"writing {out_path.name}")
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, out_path)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    report(1.0, f"wrote {out_path.name}")
    return ExportResult(path=str(out_path), outtype=outtype, tensors=n, architecture=arch_name, pre_tokenizer=pre,
                        vocab_size=vocab_size, context_length=n_ctx, size_bytes=out_path.stat().st_size,
                        sha256=file_sha256(out_path))


def file_sha256(path: str | os.PathLike) -> str:
    """The sha256 (hex) of a file, read in 1 MiB chunks."""
    h = sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _add_tensor(writer, gguf, name: str, data: np.ndarray, outtype: str) -> None:
    # Norms and other 1-D tensors stay F32, as llama.cpp's converter keeps them.
    if data.ndim <= 1 or outtype == "f32":
        writer.add_tensor(name, data.astype(np.float32))
        return
    if outtype == "q8_0":
        qtype = gguf.GGMLQuantizationType.Q8_0
        block = gguf.GGML_QUANT_SIZES[qtype][0]
        if data.shape[-1] % block == 0:
            writer.add_tensor(name, gguf.quants.quantize(data.astype(np.float32), qtype), raw_dtype=qtype)
            return
    writer.add_tensor(name, data.astype(np.float16))
