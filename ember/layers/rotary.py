"""Rotary position embeddings (neox / rotate-half layout, as in HF Llama), with llama3,
linear and YaRN scaling."""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from ember.layers.layer_ops import TORCH_LAYER_OPS, LayerOps, RopeStep


def _llama3_inv_freq(inv_freq: torch.Tensor, scaling: dict[str, Any]) -> torch.Tensor:
    """Llama 3.1's frequency-dependent scaling: long wavelengths are divided by `factor`,
    short ones kept, and the band between interpolated smoothly."""
    factor = scaling["factor"]
    low_freq_factor = scaling.get("low_freq_factor", 1.0)
    high_freq_factor = scaling.get("high_freq_factor", 4.0)
    old_len = scaling["original_max_position_embeddings"]
    low_freq_wavelen = old_len / low_freq_factor
    high_freq_wavelen = old_len / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def rope_type(scaling: dict[str, Any] | None) -> str:
    """The scaling's type (`rope_type` in transformers 5 configs, `type` in older ones)."""
    return (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature for a context stretched `scale` times."""
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _yarn_factor(scaling: dict[str, Any], max_positions: int | None) -> float:
    # DeepSeek-style configs may leave `factor` out: the stretch is then new / original length.
    factor = scaling.get("factor")
    if factor is None:
        factor = max_positions / scaling["original_max_position_embeddings"]
    return factor


def _yarn_inv_freq(inv_freq: torch.Tensor, head_dim: int, theta: float,
                   scaling: dict[str, Any], max_positions: int | None) -> torch.Tensor:
    """YaRN ("NTK-by-parts"): dimensions that turn fewer than beta_slow times over the
    original context are interpolated (divided by the factor), those turning more than
    beta_fast times kept, with a linear ramp between."""
    factor = _yarn_factor(scaling, max_positions)
    old_len = scaling.get("original_max_position_embeddings") or max_positions
    beta_fast = scaling.get("beta_fast") or 32
    beta_slow = scaling.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        return head_dim * math.log(old_len / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = ((torch.arange(head_dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    keep = 1 - ramp   # 1: extrapolate (original frequency), 0: interpolate
    # 1 / (factor * base^(2i/d)) rather than inv_freq / factor: transformers' rounding.
    pos_freqs = theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim)
    return (1.0 / (factor * pos_freqs)) * (1 - keep) + inv_freq * keep


def rope_attention_factor(scaling: dict[str, Any] | None, max_positions: int | None = None) -> float:
    """The factor YaRN multiplies cos and sin by (1 for the other types). With both
    `mscale` and `mscale_all_dim` (DeepSeek) it is their ratio of temperatures."""
    if rope_type(scaling) != "yarn":
        return 1.0
    if scaling.get("attention_factor") is not None:
        return float(scaling["attention_factor"])
    factor = _yarn_factor(scaling, max_positions)
    mscale, mscale_all_dim = scaling.get("mscale"), scaling.get("mscale_all_dim")
    if mscale and mscale_all_dim:
        return float(yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim))
    return yarn_mscale(factor)


def compute_inv_freq(head_dim: int, theta: float, scaling: dict[str, Any] | None,
                     max_positions: int | None = None) -> torch.Tensor:
    # fp32 throughout, the way transformers computes it, so positions agree to the last bit.
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    kind = rope_type(scaling)
    if kind == "llama3":
        inv_freq = _llama3_inv_freq(inv_freq, scaling)
    elif kind == "linear":
        inv_freq = inv_freq / scaling["factor"]
    elif kind == "yarn":
        inv_freq = _yarn_inv_freq(inv_freq, head_dim, theta, scaling, max_positions)
    elif kind != "default":
        raise NotImplementedError(f"rope_scaling type {kind!r} is not supported yet")
    return inv_freq


class RotaryEmbedding(nn.Module):
    """Precomputes cos/sin for every position once; a step only indexes them (the layer
    ops apply the rotation, fused with Qwen3's q/k norm where there is one)."""

    def __init__(self, head_dim: int, max_positions: int, theta: float,
                 scaling: dict[str, Any] | None = None, ops: LayerOps = TORCH_LAYER_OPS) -> None:
        super().__init__()
        inv_freq = compute_inv_freq(head_dim, theta, scaling, max_positions)
        t = torch.arange(max_positions, dtype=torch.int64).float()
        freqs = torch.outer(t, inv_freq)  # [max_pos, head_dim / 2]
        factor = rope_attention_factor(scaling, max_positions)
        self.register_buffer("cos", freqs.cos() * factor, persistent=False)
        self.register_buffer("sin", freqs.sin() * factor, persistent=False)
        self.ops = ops

    def lookup(self, positions: torch.Tensor) -> RopeStep:
        """positions: [T] -> this step's rotary inputs; done once per step."""
        return self.ops.rope_step(self.cos, self.sin, positions)
