"""What one attention layer's paged KV cache looks like, chosen by the layer (the model).

The runner, the CUDA-graph budget probe and the draft model allocate caches from these
specs and size the pool from `bytes_per_token`; none of them knows the layout. The
scheduler and the prefix cache see only block ids, so a new layout (MLA's latent rows,
a quantized cache) is a new spec plus the attention backend that reads it.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch


class KVCacheSpec:
    """Interface: the shape and dtype of one layer's cache for a pool of blocks."""

    dtype: torch.dtype

    def shape(self, num_blocks: int, block_size: int) -> tuple[int, ...]:
        """Shape of the layer's cache tensor holding num_blocks blocks of block_size tokens."""
        raise NotImplementedError

    @property
    def bytes_per_token(self) -> int:
        """Cache bytes one token takes in this layer (read off the shape, not a formula)."""
        return math.prod(self.shape(1, 1)) * self.dtype.itemsize

    def allocate(self, num_blocks: int, block_size: int, device: torch.device) -> torch.Tensor:
        return torch.zeros(self.shape(num_blocks, block_size), dtype=self.dtype, device=device)

    def copy_slots(self, cache: torch.Tensor, src: torch.Tensor, dst: torch.Tensor) -> None:
        """Copy the entries of token slots src to slots dst ([n] long each; slot =
        block * block_size + offset), reading every source before writing (tree
        verification moves the accepted path's K/V into place). `cache` is one layer's,
        or every layer's stacked on a leading dim (kv_stack): one copy for all of them."""
        raise NotImplementedError


@dataclass(frozen=True)
class PagedKVSpec(KVCacheSpec):
    """Separate K and V per KV head (MHA / GQA / MQA): [2, num_blocks, block_size, kv_heads, head_dim]."""

    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype

    def shape(self, num_blocks: int, block_size: int) -> tuple[int, ...]:
        return (2, num_blocks, block_size, self.num_kv_heads, self.head_dim)

    def copy_slots(self, cache: torch.Tensor, src: torch.Tensor, dst: torch.Tensor) -> None:
        flat = cache.view(*cache.shape[:-5], 2, -1, self.num_kv_heads, self.head_dim)   # [(L,) 2, slots, kv_heads, d]
        flat[..., dst, :, :] = flat[..., src, :, :]


@dataclass(frozen=True)
class LatentKVSpec(KVCacheSpec):
    """MLA: one row per token, the normalized latent c_kv then the rotated rope key k_pe:
    [num_blocks, block_size, kv_lora_rank + rope_dim] (see ember/attention/mla_ref.py)."""

    kv_lora_rank: int
    rope_dim: int
    dtype: torch.dtype

    def shape(self, num_blocks: int, block_size: int) -> tuple[int, ...]:
        return (num_blocks, block_size, self.kv_lora_rank + self.rope_dim)

    def copy_slots(self, cache: torch.Tensor, src: torch.Tensor, dst: torch.Tensor) -> None:
        flat = cache.view(*cache.shape[:-3], -1, cache.shape[-1])   # [(L,) slots, R + P]
        flat[..., dst, :] = flat[..., src, :]


class KVCacheLayer(Protocol):
    """What a model's `attention_layers()` return: a layer that says what its cache looks
    like and is handed the tensor once the pool exists."""

    kv_cache: torch.Tensor | None

    def kv_cache_spec(self, dtype: torch.dtype) -> KVCacheSpec: ...


def kv_bytes_per_token(layers: Sequence[KVCacheLayer], dtype: torch.dtype) -> int:
    """Bytes of KV cache one token takes across all the given layers."""
    return sum(layer.kv_cache_spec(dtype).bytes_per_token for layer in layers)


def allocate_kv_caches(layers: Sequence[KVCacheLayer], num_blocks: int, block_size: int,
                       dtype: torch.dtype, device: torch.device) -> list[torch.Tensor]:
    """One cache tensor per layer, shaped by the layer's spec, bound to the layer. When
    every layer has the same spec, the tensors are the layers of one [L, ...] allocation
    (kv_stack), so a slot copy for all layers is one indexing, not one per layer."""
    specs = [layer.kv_cache_spec(dtype) for layer in layers]
    if specs and all(sp == specs[0] for sp in specs):
        stack = torch.zeros((len(specs), *specs[0].shape(num_blocks, block_size)), dtype=specs[0].dtype,
                            device=device)
        caches = list(stack.unbind(0))
    else:
        caches = [sp.allocate(num_blocks, block_size, device) for sp in specs]
    for layer, cache in zip(layers, caches):
        layer.kv_cache = cache
    return caches


def kv_stack(caches: Sequence[torch.Tensor]) -> torch.Tensor | None:
    """The [L, ...] allocation the caches are the layers of (allocate_kv_caches), or None."""
    base = caches[0]._base if caches else None
    if base is None or base.shape[0] != len(caches) or tuple(base.shape[1:]) != tuple(caches[0].shape):
        return None
    return base if all(c._base is base for c in caches) else None
