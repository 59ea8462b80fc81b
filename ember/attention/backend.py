"""The attention backend interface and its registry (`torch` now, `triton` on the GPU path)."""
from __future__ import annotations

import torch

from ember.engine.forward_batch import ForwardBatch


class AttentionBackend:
    """Paged attention over a KV cache laid out as [2, num_blocks, block_size, kv_heads, head_dim]."""

    name: str = "base"

    def prepare(self, fb: ForwardBatch) -> None:
        """Build whatever per-step metadata the kernels need, once per step (not per layer)."""

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                kv_cache: torch.Tensor, fb: ForwardBatch, scale: float) -> torch.Tensor:
        """q: [T, heads, d]; k, v: [T, kv_heads, d] for the new tokens.

        Writes k, v into the cache at fb.slot_mapping, then returns [T, heads, d]: each query
        attends causally to its sequence's cached prefix and to the new tokens up to itself.
        """
        raise NotImplementedError


def get_attention_backend(name: str) -> AttentionBackend:
    if name == "torch":
        from ember.attention.torch_ref import TorchAttentionBackend
        return TorchAttentionBackend()
    raise ValueError(f"unknown attention backend {name!r}; available: torch")
