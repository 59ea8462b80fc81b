"""Prefix caching: KV blocks of token prefixes computed before are reused, not recomputed.

A `PrefixCache` holds references on KV blocks of the `BlockPool`, indexed by the tokens
whose K/V they contain. It caches whole blocks only: a block of `block_size` tokens is
reusable by any request whose tokens agree with it *and with everything before it*.

The life of a request against the cache (driven by the scheduler):

    m = cache.match(tokens)          # longest cached prefix, path locked
    pool.share(m.block_ids)          # the request takes its own reference on those blocks
    ... the request computes the rest into blocks of its own ...
    cache.insert(tokens, block_ids)  # the tree takes a reference on blocks it did not have
    cache.unlock(m.handle)           # the path may be evicted again
    pool.free(request's block_ids)   # the request lets go; tree-held blocks stay allocated

A block held by the cache and a request is freed only when both have dropped it (the pool
counts references). A locked path is never evicted, so eviction always frees memory.

`NoPrefixCache` is the null implementation: nothing is ever cached.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Sequence

from ember.cache.block_pool import BlockPool


@dataclass
class PrefixMatch:
    """`num_tokens` tokens (a multiple of the block size) found in `block_ids`.

    `handle` names the end of the matched path; pass it to `unlock` (or `lock`)."""

    block_ids: list[int] = field(default_factory=list)
    num_tokens: int = 0
    handle: Any = None


@dataclass
class PrefixCacheStats:
    """Counters since the engine started, plus what the cache holds now."""

    prompt_tokens: int = 0          # prompt tokens of admitted requests (each counted once)
    cached_prompt_tokens: int = 0   # of those, served from the cache instead of computed
    evicted_blocks: int = 0
    cached_blocks: int = 0          # blocks the cache holds now
    cached_tokens: int = 0          # = cached_blocks * block_size
    evictable_blocks: int = 0       # of cached_blocks, those no running request uses

    @property
    def hit_rate(self) -> float:
        return self.cached_prompt_tokens / self.prompt_tokens if self.prompt_tokens else 0.0


class PrefixCache(ABC):
    """Maps token prefixes to KV blocks. Block-granular: only full blocks are cached."""

    def __init__(self, block_pool: BlockPool, block_size: int) -> None:
        self.block_pool = block_pool
        self.block_size = block_size
        self._prompt_tokens = 0
        self._cached_prompt_tokens = 0
        self._evicted_blocks = 0

    @abstractmethod
    def match(self, token_ids: Sequence[int]) -> PrefixMatch:
        """The longest cached prefix of token_ids, in whole blocks. Locks the matched path
        (the caller must `unlock(m.handle)` later) and counts as a use for LRU."""

    @abstractmethod
    def match_length(self, token_ids: Sequence[int]) -> int:
        """How many tokens `match` would find; changes nothing (for scheduling decisions)."""

    @abstractmethod
    def insert(self, token_ids: Sequence[int], block_ids: Sequence[int]) -> PrefixMatch:
        """Cache the full blocks of token_ids, whose K/V are in block_ids[i] for block i.

        Blocks the cache already has for a prefix are kept (the caller's duplicates are
        not adopted); new ones gain a reference held by the cache. Returns the cache's
        blocks for the inserted prefix and its (unlocked) handle."""

    @abstractmethod
    def lock(self, handle: Any) -> None:
        """Protect the path ending at handle from eviction (counted: lock twice, unlock
        twice). A handle of None (nothing matched) is a no-op."""

    @abstractmethod
    def unlock(self, handle: Any) -> None:
        ...

    @abstractmethod
    def evict(self, num_blocks: int) -> int:
        """Drop up to num_blocks unlocked blocks, least recently used first; returns how
        many went back to the pool's free list."""

    @property
    @abstractmethod
    def num_cached_blocks(self) -> int:
        ...

    @property
    @abstractmethod
    def num_evictable_blocks(self) -> int:
        ...

    def reset(self) -> int:
        """Evict everything no running request uses; returns the blocks freed."""
        return self.evict(self.num_evictable_blocks)

    def record_admission(self, num_prompt_tokens: int, num_cached_tokens: int) -> None:
        """Account a request's first admission: its prompt length and the part served cached."""
        self._prompt_tokens += num_prompt_tokens
        self._cached_prompt_tokens += num_cached_tokens

    def stats(self) -> PrefixCacheStats:
        n = self.num_cached_blocks
        return PrefixCacheStats(self._prompt_tokens, self._cached_prompt_tokens, self._evicted_blocks,
                                n, n * self.block_size, self.num_evictable_blocks)

    @property
    def hit_rate(self) -> float:
        """Prompt tokens served from the cache / prompt tokens, since the start."""
        return self.stats().hit_rate


class NoPrefixCache(PrefixCache):
    """Prefix caching off: every match is empty and nothing is kept."""

    def match(self, token_ids: Sequence[int]) -> PrefixMatch:
        return PrefixMatch()

    def match_length(self, token_ids: Sequence[int]) -> int:
        return 0

    def insert(self, token_ids: Sequence[int], block_ids: Sequence[int]) -> PrefixMatch:
        return PrefixMatch()

    def lock(self, handle: Any) -> None:
        pass

    def unlock(self, handle: Any) -> None:
        pass

    def evict(self, num_blocks: int) -> int:
        return 0

    @property
    def num_cached_blocks(self) -> int:
        return 0

    @property
    def num_evictable_blocks(self) -> int:
        return 0


class InBatchPrefixes:
    """The blocks other requests are computing (a prefill scheduled this step and continuing),
    by chained block hash. A request whose next uncached `min_blocks` blocks are among them
    should wait a step and take them from the cache instead of computing them a second time
    (SGLang's in-batch prefix check)."""

    def __init__(self, block_size: int, min_blocks: int = 2) -> None:
        self.block_size = block_size
        self.min_blocks = min_blocks
        self._hashes: set[int] = set()

    def _chain(self, token_ids: Sequence[int], num_blocks: int) -> list[int]:
        """h[k] identifies token_ids[:(k + 1) * block_size] (the block and all before it)."""
        bs, h, out = self.block_size, 0, []
        for k in range(num_blocks):
            h = hash((h, tuple(token_ids[k * bs:(k + 1) * bs])))
            out.append(h)
        return out

    def add(self, token_ids: Sequence[int], start: int) -> None:
        """A request computes token_ids from position start on."""
        chain = self._chain(token_ids, len(token_ids) // self.block_size)
        self._hashes.update(chain[start // self.block_size:])

    def covers(self, token_ids: Sequence[int], cached: int) -> bool:
        """True when the min_blocks blocks after the first `cached` tokens are being computed."""
        n = cached // self.block_size + self.min_blocks
        if n * self.block_size > len(token_ids):
            return False
        return self._chain(token_ids, n)[-1] in self._hashes


PREFIX_CACHES = ("radix", "none")


def create_prefix_cache(name: str, block_pool: BlockPool, block_size: int) -> PrefixCache:
    if name == "none":
        return NoPrefixCache(block_pool, block_size)
    if name == "radix":
        from ember.cache.radix import RadixPrefixCache
        return RadixPrefixCache(block_pool, block_size)
    raise ValueError(f"unknown prefix cache {name!r}; choose one of {', '.join(PREFIX_CACHES)}")
