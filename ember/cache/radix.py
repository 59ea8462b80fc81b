"""RadixAttention's prefix cache (SGLang): a radix tree over token ids whose edges own KV blocks.

Each node's edge is a run of whole blocks: `tokens` (a multiple of block_size long) and the
`block_ids` holding their K/V. A node's children are keyed by the first block of their edge,
so siblings always differ within their first block and every split falls on a block
boundary. A partial last block is never cached: the request that computed it keeps it and
frees it when it finishes.

`lock_ref` counts the running requests whose matched prefix passes through a node; a lock
covers the node and all its ancestors, so unlocked nodes form whole subtrees that can be
evicted leaf first. Eviction takes the least recently used unlocked leaf and drops blocks
from the end of its edge (a leaf may be trimmed, not only removed), so exactly as many
blocks are freed as were asked for when that many are evictable.
"""
from __future__ import annotations

import heapq
import itertools
from typing import Sequence

from ember.cache.block_pool import BlockPool
from ember.cache.prefix import PrefixCache, PrefixMatch


class _Node:
    __slots__ = ("parent", "children", "tokens", "block_ids", "lock_ref", "last_access", "serial")

    def __init__(self, parent: "_Node | None", tokens: list[int], block_ids: list[int],
                 serial: int) -> None:
        self.parent = parent
        self.children: dict[tuple[int, ...], _Node] = {}
        self.tokens = tokens          # the edge: len(block_ids) * block_size token ids
        self.block_ids = block_ids
        self.lock_ref = 0
        self.last_access = 0          # logical clock of the last match / insert through here
        self.serial = serial          # a stable tie-break for the eviction heap


class RadixPrefixCache(PrefixCache):
    def __init__(self, block_pool: BlockPool, block_size: int) -> None:
        super().__init__(block_pool, block_size)
        self._serials = itertools.count()
        self.root = _Node(None, [], [], next(self._serials))
        self._clock = 0
        self._num_blocks = 0        # blocks held by the tree
        self._num_evictable = 0     # of those, in nodes with lock_ref == 0

    # ---- lookups ----------------------------------------------------------------------------
    def match(self, token_ids: Sequence[int]) -> PrefixMatch:
        token_ids = list(token_ids)
        node, blocks, n = self._walk(token_ids, len(token_ids) - len(token_ids) % self.block_size)
        self.lock(node)
        return PrefixMatch(blocks, n, node)

    def match_length(self, token_ids: Sequence[int]) -> int:
        token_ids = list(token_ids)
        bs = self.block_size
        end = len(token_ids) - len(token_ids) % bs
        node, pos = self.root, 0
        while pos < end:
            child = node.children.get(tuple(token_ids[pos:pos + bs]))
            if child is None:
                break
            k = self._common_blocks(child, token_ids, pos, end)
            pos += k * bs
            if k < len(child.block_ids):
                break
            node = child
        return pos

    def _walk(self, token_ids: list[int], end: int, block_ids: Sequence[int] | None = None
              ) -> tuple[_Node, list[int], int]:
        """Follow token_ids[:end] down the tree, splitting the last edge where the match ends so
        that the returned node ends exactly at the matched length; marks the path used. With
        block_ids (insert), a missing edge is created from them instead of ending the walk."""
        bs = self.block_size
        tick = self._tick()
        node, pos, blocks = self.root, 0, []
        while pos < end:
            key = tuple(token_ids[pos:pos + bs])
            child = node.children.get(key)
            if child is None:
                if block_ids is None:
                    break
                child = _Node(node, list(token_ids[pos:end]), list(block_ids[pos // bs:end // bs]),
                              next(self._serials))
                node.children[key] = child
                self.block_pool.share(child.block_ids)
                self._num_blocks += len(child.block_ids)
                self._num_evictable += len(child.block_ids)
            else:
                k = self._common_blocks(child, token_ids, pos, end)
                if k < len(child.block_ids):
                    child = self._split(child, k)
            child.last_access = tick
            blocks.extend(child.block_ids)
            pos += len(child.tokens)
            node = child
        return node, blocks, pos

    def _common_blocks(self, child: _Node, token_ids: list[int], pos: int, end: int) -> int:
        """Whole blocks at the start of child's edge equal to token_ids[pos:end] (>= 1:
        the first block matched the child's key)."""
        bs = self.block_size
        n = min(len(child.tokens), end - pos)
        if child.tokens[:n] == token_ids[pos:pos + n]:
            return n // bs
        k = 1  # some block before n differs, so this stops there
        while child.tokens[k * bs:(k + 1) * bs] == token_ids[pos + k * bs:pos + (k + 1) * bs]:
            k += 1
        return k

    def _split(self, node: _Node, k: int) -> _Node:
        """Cut node's edge after k blocks; returns the new upper node (node keeps the rest)."""
        bs = self.block_size
        top = _Node(node.parent, node.tokens[:k * bs], node.block_ids[:k], next(self._serials))
        top.lock_ref = node.lock_ref        # whoever locks node locks its ancestors too
        top.last_access = node.last_access
        node.parent.children[tuple(top.tokens[:bs])] = top
        node.tokens = node.tokens[k * bs:]
        node.block_ids = node.block_ids[k:]
        node.parent = top
        top.children[tuple(node.tokens[:bs])] = node
        return top

    # ---- updates ----------------------------------------------------------------------------
    def insert(self, token_ids: Sequence[int], block_ids: Sequence[int]) -> PrefixMatch:
        token_ids = list(token_ids)
        bs = self.block_size
        end = min(len(token_ids) // bs, len(block_ids)) * bs
        node, blocks, pos = self._walk(token_ids, end, block_ids)
        return PrefixMatch(blocks, pos, node)

    def lock(self, handle: _Node | None) -> None:
        node = handle
        while node is not None and node is not self.root:
            if node.lock_ref == 0:
                self._num_evictable -= len(node.block_ids)
            node.lock_ref += 1
            node = node.parent

    def unlock(self, handle: _Node | None) -> None:
        node = handle
        while node is not None and node is not self.root:
            if node.lock_ref <= 0:
                raise ValueError("unlock of a prefix-cache path that is not locked")
            node.lock_ref -= 1
            if node.lock_ref == 0:
                self._num_evictable += len(node.block_ids)
            node = node.parent

    def evict(self, num_blocks: int) -> int:
        if num_blocks <= 0 or self._num_evictable == 0:
            return 0
        free_before = self.block_pool.num_free
        heap = [(n.last_access, n.serial, n) for n in self._unlocked_leaves()]
        heapq.heapify(heap)
        dropped = 0
        while heap and dropped < num_blocks:
            _, _, leaf = heapq.heappop(heap)
            k = min(len(leaf.block_ids), num_blocks - dropped)
            cut = len(leaf.block_ids) - k
            self.block_pool.free(leaf.block_ids[cut:])
            dropped += k
            if cut:
                leaf.block_ids = leaf.block_ids[:cut]
                leaf.tokens = leaf.tokens[:cut * self.block_size]
                continue
            parent = leaf.parent
            del parent.children[tuple(leaf.tokens[:self.block_size])]
            if parent is not self.root and not parent.children and parent.lock_ref == 0:
                heapq.heappush(heap, (parent.last_access, parent.serial, parent))
        self._num_blocks -= dropped
        self._num_evictable -= dropped
        self._evicted_blocks += dropped
        return self.block_pool.num_free - free_before

    def _unlocked_leaves(self) -> list[_Node]:
        leaves, stack = [], list(self.root.children.values())
        while stack:
            node = stack.pop()
            if node.children:
                stack.extend(node.children.values())
            elif node.lock_ref == 0:
                leaves.append(node)
        return leaves

    def _tick(self) -> int:
        self._clock += 1
        return self._clock

    @property
    def num_cached_blocks(self) -> int:
        return self._num_blocks

    @property
    def num_evictable_blocks(self) -> int:
        return self._num_evictable
