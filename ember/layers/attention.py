"""The attention layer: owns its slice of the KV pool and delegates to the chosen backend."""
from __future__ import annotations

import torch
from torch import nn

from ember.attention.backend import AttentionBackend
from ember.cache.kv_spec import PagedKVSpec
from ember.engine.forward_batch import ForwardBatch


class Attention(nn.Module):
    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float,
                 backend: AttentionBackend) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = scale
        self.backend = backend
        # Shaped by kv_cache_spec(), bound by the runner once the pool exists.
        self.kv_cache: torch.Tensor | None = None

    def kv_cache_spec(self, dtype: torch.dtype) -> PagedKVSpec:
        """K and V per KV head: [2, num_blocks, block_size, kv_heads, head_dim]."""
        return PagedKVSpec(self.num_kv_heads, self.head_dim, dtype)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                fb: ForwardBatch) -> torch.Tensor:
        """q: [T, heads, d]; k, v: [T, kv_heads, d] -> [T, heads, d]."""
        return self.backend.forward(q, k, v, self.kv_cache, fb, self.scale)
