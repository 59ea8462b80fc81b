"""Rotary position embeddings (neox / rotate-half layout, as in HF Llama), with llama3 scaling."""
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


def compute_inv_freq(head_dim: int, theta: float, scaling: dict[str, Any] | None) -> torch.Tensor:
    # fp32 throughout, the way transformers computes it, so positions agree to the last bit.
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    rope_type = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if rope_type == "llama3":
        inv_freq = _llama3_inv_freq(inv_freq, scaling)
    elif rope_type == "linear":
        inv_freq = inv_freq / scaling["factor"]
    elif rope_type != "default":
        raise NotImplementedError(f"rope_scaling type {rope_type!r} is not supported yet")
    return inv_freq


class RotaryEmbedding(nn.Module):
    """Precomputes cos/sin for every position once; a step only indexes them (the layer
    ops apply the rotation, fused with Qwen3's q/k norm where there is one)."""

    def __init__(self, head_dim: int, max_positions: int, theta: float,
                 scaling: dict[str, Any] | None = None, ops: LayerOps = TORCH_LAYER_OPS) -> None:
        super().__init__()
        inv_freq = compute_inv_freq(head_dim, theta, scaling)
        t = torch.arange(max_positions, dtype=torch.int64).float()
        freqs = torch.outer(t, inv_freq)  # [max_pos, head_dim / 2]
        self.register_buffer("cos", freqs.cos(), persistent=False)
        self.register_buffer("sin", freqs.sin(), persistent=False)
        self.ops = ops

    def lookup(self, positions: torch.Tensor) -> RopeStep:
        """positions: [T] -> this step's rotary inputs; done once per step."""
        return self.ops.rope_step(self.cos, self.sin, positions)
