"""The MLA attention layer: owns its slice of the latent KV pool and delegates to the
MLA backend (the projections around it belong to the model)."""
from __future__ import annotations

import torch
from torch import nn

from ember.attention.mla_backend import MLABackend, MLADims
from ember.cache.kv_spec import LatentKVSpec
from ember.engine.forward_batch import ForwardBatch


class LatentAttention(nn.Module):
    def __init__(self, dims: MLADims, scale: float, backend: MLABackend) -> None:
        super().__init__()
        self.dims = dims
        self.scale = scale
        self.backend = backend
        # [num_blocks, block_size, R + P], bound by the runner once the pool exists.
        self.kv_cache: torch.Tensor | None = None

    def kv_cache_spec(self, dtype: torch.dtype) -> LatentKVSpec:
        """Only the normalized latent and the rotated rope key, no head axis."""
        return LatentKVSpec(self.dims.kv_lora_rank, self.dims.qk_rope_head_dim, dtype)

    def forward(self, q_nope: torch.Tensor, q_pe: torch.Tensor, c_kv: torch.Tensor,
                k_pe: torch.Tensor, kv_b_weight: torch.Tensor, fb: ForwardBatch) -> torch.Tensor:
        """q_nope: [T, H, dn]; q_pe: [T, H, P]; c_kv: [T, R]; k_pe: [T, P];
        kv_b_weight: [H * (dn + dv), R] -> [T, H, dv]."""
        return self.backend.forward(q_nope, q_pe, c_kv, k_pe, kv_b_weight, self.kv_cache, fb, self.scale)
