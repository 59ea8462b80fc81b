"""Load a llama.cpp GGUF file as a Hugging Face-style checkpoint.

A GGUF holds the config as metadata under llama.cpp's key names, the tokenizer as metadata
too, and weights under llama.cpp's tensor names, quantized, with dimensions listed
fastest-first and -- for Llama -- the rows of q_proj/k_proj reordered for llama.cpp's rope.
`load_gguf` undoes all of that, so a model that loads HF safetensors loads a GGUF unchanged:
a config.json-style dict, tensors under HF names in HF layout, and the tokenizer.

The file is read with a small reader of our own rather than gguf.GGUFReader: that one
builds a numpy view per array element, which takes ~5 s for SmolLM2's 49k-token vocabulary
(and longer for 128k-token ones); reading the header with struct takes ~0.1 s. Tensor data
stays memory-mapped; gguf-py still does the dequantizing.
"""
from __future__ import annotations

import math
import mmap
import os
import struct
from collections.abc import Collection, Iterator, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, NamedTuple

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize

from ember.tokenizer import Tokenizer

# general.architecture -> (HF architectures entry, HF model_type)
_ARCHITECTURES = {
    "llama": ("LlamaForCausalLM", "llama"),
    "qwen3": ("Qwen3ForCausalLM", "qwen3"),
}

# llama.cpp's converter permutes q/k rows only for these architectures (its "normal"
# rope pairs adjacent dimensions; HF Llama rotates halves). Qwen3 uses NeoX rope, unpermuted.
_ROPE_PERMUTED = {"llama"}

_GLOBAL_TENSORS = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_LAYER_TENSORS = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
# Folded into config["rope_scaling"] instead of being a weight.
_ROPE_FREQS = "rope_freqs.weight"

# Llama 3's pre-training context. llama.cpp stores Llama 3.1+'s rope scaling only as
# per-frequency factors, which fix the ratios original_context/low_freq_factor and
# original_context/high_freq_factor but not the context itself; this value reproduces
# Meta's published parameters (factor 8 or 32, low 1, high 4).
_LLAMA3_ORIGINAL_CONTEXT = 8192


class GGUFTensorInfo(NamedTuple):
    """One tensor of a GGUF file, its data still in the memory map."""

    name: str  # llama.cpp's name, e.g. "blk.0.attn_q.weight"
    shape: tuple[int, ...]  # torch order (slowest dim first), e.g. [out, in]
    ggml_type: GGMLQuantizationType
    data: np.ndarray  # the raw bytes, uint8, read-only view of the file


@dataclass
class GGUFCheckpoint:
    """A GGUF file seen as a Hugging Face checkpoint. Tensors are read lazily from the
    memory-mapped file and dequantized one at a time."""

    path: str
    metadata: dict[str, Any] = field(repr=False)  # every key/value of the file
    tensor_infos: list[GGUFTensorInfo] = field(repr=False)
    config: dict[str, Any]

    @cached_property
    def tokenizer(self) -> Tokenizer:
        """The tokenizer described by the same file's metadata."""
        return Tokenizer.from_gguf(self.metadata)

    @property
    def chat_template(self) -> str | None:
        """The Jinja chat template stored in the file, if any."""
        return self.metadata.get("tokenizer.chat_template")

    def tensor_names(self) -> list[str]:
        """HF names of all weights `tensors()` yields, in file order."""
        return [name for name in (self._hf_name(t.name) for t in self.tensor_infos) if name is not None]

    def tensors(
        self, dtype: torch.dtype = torch.float32, names: Collection[str] | None = None
    ) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield `(hf_name, tensor)` for every weight (or only those in `names`), dequantized
        to `dtype`, in HF's [out_features, in_features] layout with rope rows as HF has them."""
        permute = self.config["model_type"] in _ROPE_PERMUTED
        heads, kv_heads = self.config["num_attention_heads"], self.config["num_key_value_heads"]
        for info in self.tensor_infos:
            name = self._hf_name(info.name)
            if name is None or (names is not None and name not in names):
                continue
            weight = _to_torch(info, dtype)
            if permute and ".self_attn.q_proj." in name:
                weight = _unpermute_rope_rows(weight, heads)
            elif permute and ".self_attn.k_proj." in name:
                weight = _unpermute_rope_rows(weight, kv_heads)
            yield name, weight

    @staticmethod
    def _hf_name(gguf_name: str) -> str | None:
        """HF name of a GGUF tensor; None for tensors that are not weights (rope_freqs)."""
        if gguf_name == _ROPE_FREQS:
            return None
        stem, _, suffix = gguf_name.rpartition(".")  # suffix: weight | bias
        parts = stem.split(".")
        if len(parts) == 1 and stem in _GLOBAL_TENSORS:
            return f"{_GLOBAL_TENSORS[stem]}.{suffix}"
        if len(parts) == 3 and parts[0] == "blk" and parts[2] in _LAYER_TENSORS:
            return f"model.layers.{parts[1]}.{_LAYER_TENSORS[parts[2]]}.{suffix}"
        raise ValueError(f"GGUF tensor {gguf_name!r} has no Hugging Face equivalent that ember knows")


def load_gguf(path: str | os.PathLike[str]) -> GGUFCheckpoint:
    """Open a GGUF file (memory-mapped) and read its config. Supports general.architecture
    "llama" (Llama 2/3, Mistral, SmolLM2) and "qwen3"."""
    path = os.fspath(path)
    metadata, tensor_infos = read_gguf(path)
    return GGUFCheckpoint(path=path, metadata=metadata, tensor_infos=tensor_infos,
                          config=_hf_config(metadata, tensor_infos))


# ---------------------------------------------------------------------- reading the file

_GGUF_MAGIC = b"GGUF"
_DEFAULT_ALIGNMENT = 32
# GGUF metadata value types: fixed-size scalars, then string (8) and array (9).
_SCALAR_FORMATS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_SCALAR_DTYPES = {k: np.dtype(v) for k, v in _SCALAR_FORMATS.items()}
_STRING, _ARRAY = 8, 9


class _Cursor:
    """Sequential little-endian reads from the file's header."""

    def __init__(self, buffer: mmap.mmap) -> None:
        self.buffer = buffer
        self.pos = 0

    def scalar(self, fmt: str) -> Any:
        (value,) = struct.unpack_from(fmt, self.buffer, self.pos)
        self.pos += struct.calcsize(fmt)
        return value

    def string(self) -> str:
        length = self.scalar("<Q")
        self.pos += length
        return self.buffer[self.pos - length : self.pos].decode("utf-8")

    def value(self, kind: int) -> Any:
        if kind in _SCALAR_FORMATS:
            return self.scalar(_SCALAR_FORMATS[kind])
        if kind == _STRING:
            return self.string()
        if kind != _ARRAY:
            raise ValueError(f"unknown GGUF metadata type {kind}")
        item_kind, count = self.scalar("<I"), self.scalar("<Q")
        if item_kind in _SCALAR_DTYPES:  # one numpy read instead of `count` struct calls
            dtype = _SCALAR_DTYPES[item_kind]
            items = np.frombuffer(self.buffer, dtype=dtype, count=count, offset=self.pos).tolist()
            self.pos += count * dtype.itemsize
            return items
        return [self.value(item_kind) for _ in range(count)]


def read_gguf(path: str) -> tuple[dict[str, Any], list[GGUFTensorInfo]]:
    """All metadata of a GGUF file (v2/v3, little-endian) as plain Python values, and its
    tensors as memory-mapped views."""
    with open(path, "rb") as f:
        buffer = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    cursor = _Cursor(buffer)
    if buffer[:4] != _GGUF_MAGIC:
        raise ValueError(f"{path} is not a GGUF file")
    cursor.pos = 4
    version = cursor.scalar("<I")
    if version not in (2, 3):
        raise NotImplementedError(f"{path}: GGUF version {version} is not supported (only v2/v3, little-endian)")
    tensor_count, kv_count = cursor.scalar("<Q"), cursor.scalar("<Q")
    metadata: dict[str, Any] = {}
    for _ in range(kv_count):
        key = cursor.string()
        metadata[key] = cursor.value(cursor.scalar("<I"))

    raw_infos = []
    for _ in range(tensor_count):
        name = cursor.string()
        dims = [cursor.scalar("<Q") for _ in range(cursor.scalar("<I"))]  # fastest-varying first
        raw_infos.append((name, dims, GGMLQuantizationType(cursor.scalar("<I")), cursor.scalar("<Q")))
    alignment = metadata.get("general.alignment", _DEFAULT_ALIGNMENT)
    data_start = -(-cursor.pos // alignment) * alignment

    data = np.frombuffer(buffer, dtype=np.uint8)  # zero-copy, keeps the map alive
    infos = []
    for name, dims, kind, offset in raw_infos:
        block_size, block_bytes = GGML_QUANT_SIZES[kind]
        nbytes = math.prod(dims) // block_size * block_bytes
        start = data_start + offset
        infos.append(GGUFTensorInfo(name, tuple(reversed(dims)), kind, data[start : start + nbytes]))
    return metadata, infos


def _hf_config(metadata: Mapping[str, Any], tensor_infos: list[GGUFTensorInfo]) -> dict[str, Any]:
    """config.json-style dict from the GGUF metadata."""
    arch = metadata.get("general.architecture")
    if arch not in _ARCHITECTURES:
        raise NotImplementedError(f"GGUF architecture {arch!r} is not supported; ember loads {sorted(_ARCHITECTURES)}")
    architecture, model_type = _ARCHITECTURES[arch]

    def meta(key: str, default: Any = None) -> Any:
        return metadata.get(f"{arch}.{key}", default)

    required = ("embedding_length", "feed_forward_length", "block_count", "attention.head_count")
    missing = [f"{arch}.{key}" for key in required if meta(key) is None]
    if missing:
        raise ValueError(f"GGUF metadata lacks {', '.join(missing)}")
    tensors = {t.name: t for t in tensor_infos}
    hidden = meta("embedding_length")
    heads = meta("attention.head_count")
    kv_heads = meta("attention.head_count_kv", heads)
    if isinstance(kv_heads, list):
        raise NotImplementedError("per-layer attention.head_count_kv is not supported")
    head_dim = meta("attention.key_length")
    if head_dim is None and arch in _ROPE_PERMUTED:
        head_dim = meta("rope.dimension_count")  # many Llama files carry only this
    head_dim = head_dim or hidden // heads
    rope_theta = float(meta("rope.freq_base", 10000.0))
    vocab_size = meta("vocab_size") or len(metadata.get("tokenizer.ggml.tokens", ()))

    config: dict[str, Any] = {
        "architectures": [architecture],
        "model_type": model_type,
        "hidden_size": hidden,
        "intermediate_size": meta("feed_forward_length"),
        "num_hidden_layers": meta("block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": float(meta("attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": rope_theta,
        "rope_scaling": _rope_scaling(metadata, arch, tensors.get(_ROPE_FREQS), rope_theta, head_dim),
        "vocab_size": vocab_size,
        "max_position_embeddings": meta("context_length"),
        "tie_word_embeddings": "output.weight" not in tensors,
        "attention_bias": "blk.0.attn_q.bias" in tensors,
        "mlp_bias": False,
    }
    for name in ("bos", "pad"):
        token_id = metadata.get(f"tokenizer.ggml.{name}_token_id")
        if token_id is not None:
            config[f"{name}_token_id"] = token_id
    # End of sequence, plus llama.cpp's end-of-turn / end-of-message ids when they differ.
    eos = [metadata.get(f"tokenizer.ggml.{name}_token_id") for name in ("eos", "eot", "eom")]
    eos = list(dict.fromkeys(i for i in eos if i is not None))
    if eos:
        config["eos_token_id"] = eos[0] if len(eos) == 1 else eos
    return config


def _rope_scaling(
    metadata: Mapping[str, Any], arch: str, rope_freqs: GGUFTensorInfo | None, rope_theta: float, head_dim: int
) -> dict[str, Any] | None:
    """HF rope_scaling from llama.cpp's rope.scaling.* keys or its rope_freqs tensor."""
    kind = metadata.get(f"{arch}.rope.scaling.type")
    factor = metadata.get(f"{arch}.rope.scaling.factor")
    original = metadata.get(f"{arch}.rope.scaling.original_context_length")
    if rope_freqs is not None:
        rope_dims = metadata.get(f"{arch}.rope.dimension_count", head_dim)
        freq_factors = _to_torch(rope_freqs, torch.float64).numpy().reshape(-1)  # [rope_dims / 2]
        return _llama3_rope_scaling(freq_factors, rope_theta, rope_dims, original or _LLAMA3_ORIGINAL_CONTEXT)
    if kind in (None, "none") or factor in (None, 1.0):
        return None
    if kind == "linear":
        return {"rope_type": "linear", "factor": float(factor)}
    if kind == "yarn":
        scaling = {"rope_type": "yarn", "factor": float(factor)}
        if original is not None:
            scaling["original_max_position_embeddings"] = int(original)
        return scaling
    raise NotImplementedError(f"GGUF rope scaling type {kind!r} is not supported")


def _llama3_rope_scaling(
    freq_factors: np.ndarray, rope_theta: float, rope_dims: int, original_context: int
) -> dict[str, Any] | None:
    """Recover HF's llama3 rope parameters from llama.cpp's per-frequency divisors.

    HF divides inv_freq by 1 (short wavelengths), by `factor` (long ones), and in between by
    1 / ((1 - s) / factor + s) with s = (original_context / wavelength - low) / (high - low).
    So 1 / divisor is linear in 1 / wavelength on the middle band, and a line through those
    points gives `low_freq_factor` and `high_freq_factor`. The result is checked by
    recomputing the divisors.
    """
    divisors = freq_factors  # [rope_dims / 2]
    if np.allclose(divisors, 1.0):
        return None
    inv_freq = rope_theta ** (-np.arange(0, rope_dims, 2, dtype=np.float64) / rope_dims)
    wavelength = 2 * math.pi / inv_freq
    factor = float(divisors.max())
    middle = (divisors > 1 + 1e-4) & (divisors < factor * (1 - 1e-4))
    c = 1 - 1 / factor
    if middle.sum() >= 2:
        slope, intercept = np.polyfit(1 / wavelength[middle], 1 / divisors[middle], 1)
        low = (1 / factor - intercept) * original_context / slope
        high = low + original_context * c / slope
    elif not middle.any():
        # No middle band: any boundaries between the two flat bands reproduce the divisors.
        high = original_context / wavelength[divisors <= 1 + 1e-4].max()
        low = original_context / wavelength[divisors >= factor * (1 - 1e-4)].min()
    else:
        raise NotImplementedError("cannot recover llama3 rope scaling from a single intermediate frequency")
    scaling = {
        "rope_type": "llama3",
        "factor": round(factor, 4),
        "low_freq_factor": round(float(low), 4),
        "high_freq_factor": round(float(high), 4),
        "original_max_position_embeddings": int(original_context),
    }
    if not np.allclose(_llama3_divisors(scaling, wavelength), divisors, rtol=1e-3):
        raise NotImplementedError("the GGUF's rope_freqs do not follow Llama 3's rope scaling; cannot convert them")
    return scaling


def _llama3_divisors(scaling: dict[str, Any], wavelength: np.ndarray) -> np.ndarray:
    """What HF's llama3 rope divides each inv_freq by, for the given parameters."""
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    context = scaling["original_max_position_embeddings"]
    smooth = np.clip((context / wavelength - low) / (high - low), 0.0, 1.0)
    return 1 / ((1 - smooth) / factor + smooth)


def _to_torch(info: GGUFTensorInfo, dtype: torch.dtype) -> torch.Tensor:
    """Dequantize one GGUF tensor to `dtype`, shaped as HF expects."""
    kind = info.ggml_type
    # Float types convert directly (no float32 detour, bit-exact for bf16 -> bf16); np.array
    # copies out of the read-only memory map.
    if kind == GGMLQuantizationType.F32:
        weight = torch.from_numpy(np.array(info.data.view(np.float32)))
    elif kind == GGMLQuantizationType.F16:
        weight = torch.from_numpy(np.array(info.data.view(np.float16)))
    elif kind == GGMLQuantizationType.BF16:
        weight = torch.from_numpy(np.array(info.data.view(np.int16))).view(torch.bfloat16)
    else:
        block_size, block_bytes = GGML_QUANT_SIZES[kind]
        rows = info.data.reshape(-1, info.shape[-1] // block_size * block_bytes)  # [rows, bytes per row]
        weight = torch.from_numpy(dequantize(rows, kind))  # float32 [rows, in]
    return weight.reshape(info.shape).to(dtype)


def _unpermute_rope_rows(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row permutation.

    Per head, HF orders rows [first halves of the rotary pairs..., second halves...]
    (rotate_half); llama.cpp interleaves them (x0, y0, x1, y1, ...) for its rope. Applies to
    weights [num_heads * head_dim, in] and biases [num_heads * head_dim] alike.
    """
    rows = weight.shape[0]
    per_head = weight.reshape(num_heads, rows // num_heads // 2, 2, *weight.shape[1:])  # [h, d/2, 2, ...]
    return per_head.transpose(1, 2).reshape(weight.shape)
