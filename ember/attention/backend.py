"""The attention backend interface and its registry (`torch` now, `triton` on the GPU path)."""
from __future__ import annotations

import functools

import torch

from ember.engine.forward_batch import ForwardBatch


class AttentionBackendBase:
    """What the engine calls on any attention backend, whatever KV layout it reads
    (the runner, the CUDA-graph runner and proposers call only this)."""

    name: str = "base"
    # True when a pure-decode forward launches only kernels (no host syncs, no shapes that
    # depend on sequence lengths), so it can be captured in a CUDA graph.
    supports_cuda_graphs: bool = False
    # True when the backend honours ForwardBatch.attn_masks (tree verification and tree
    # drafting); a backend that would ignore them must not be handed trees.
    supports_tree_masks: bool = False

    def prepare(self, fb: ForwardBatch) -> None:
        """Build whatever per-step metadata the kernels need, once per step (not per layer)."""


class AttentionBackend(AttentionBackendBase):
    """Paged attention over a KV cache laid out as [2, num_blocks, block_size, kv_heads, head_dim]
    (`PagedKVSpec`). MLA models use an `MLABackend` (mla_backend.py) instead."""

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                kv_cache: torch.Tensor, fb: ForwardBatch, scale: float) -> torch.Tensor:
        """q: [T, heads, d]; k, v: [T, kv_heads, d] for the new tokens.

        Writes k, v into the cache at fb.slot_mapping, then returns [T, heads, d]: each query
        attends causally to its sequence's cached prefix and to the new tokens up to itself.
        """
        raise NotImplementedError


def get_attention_backend(name: str, device: torch.device | None = None) -> AttentionBackend:
    """`auto` is triton on CUDA and torch elsewhere."""
    if name == "auto":
        name = "triton" if device is not None and device.type == "cuda" else "torch"
    if name == "torch":
        from ember.attention.torch_ref import TorchAttentionBackend
        return TorchAttentionBackend()
    if name == "triton":
        from ember.attention.triton_backend import TritonAttentionBackend
        return TritonAttentionBackend()
    raise ValueError(f"unknown attention backend {name!r}; available: auto, torch, triton")


@functools.cache
def _cuda_sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (kernels size their split counts by it);
    4 elsewhere, where Triton runs in its interpreter (tests)."""
    if device.type != "cuda":
        return 4
    return _cuda_sm_count(device.index if device.index is not None else torch.cuda.current_device())
