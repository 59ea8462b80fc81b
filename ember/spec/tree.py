"""Draft trees: EAGLE-2-style dynamic expansion, the tree's layout, and tree attention.

A tree drafts several continuations at once. Node 0.. N-1 hang below the root, which is
the request's last token (already sampled, not yet computed by the target); every node
has a parent (-1: the root) that comes before it, so the node order is topological and
a node's depth is its parent's + 1.

Dynamic expansion (EAGLE-2, Li et al. 2024). The drafter scores the root's children; at
each further depth the `top_k` candidates of the last depth with the highest cumulative
draft log-probability (the sum of log q along their path: an estimate of the chance the
target accepts the whole path) are fed through the drafter in one forward, and each gets
its `top_k` most likely children. After `depth` levels the `budget` candidates with the
highest cumulative log-probability become the tree. A child's score is at most its
parent's, and ties are broken in creation order (parents are created first), so the
chosen set always contains every chosen node's ancestors.

Layout for one forward over the tree: a node at depth d sits at position base + d (RoPE
sees path lengths, as a chain would), while its K/V takes the slot after the previous
node's (slots are consecutive, positions repeat across siblings). Each node attends to
the committed prefix and to its ancestors and itself only: `ancestor_mask`.
"""
from __future__ import annotations

import heapq
from dataclasses import dataclass
from typing import Callable

import torch

from ember.attention.torch_ref import gather_kv


@dataclass
class DraftTree:
    """One request's draft tree, nodes in topological order (parent before child)."""

    tokens: list[int]         # [N] token of each node
    parents: list[int]        # [N] parent node index; -1 = the root (the last committed token)
    depths: list[int]         # [N] 1 for the root's children
    scores: list[float]       # [N] cumulative draft log-probability of the path to the node

    @property
    def num_nodes(self) -> int:
        return len(self.tokens)

    @property
    def max_depth(self) -> int:
        return max(self.depths, default=0)

    def children(self) -> list[list[int]]:
        """[N + 1] lists: entry 0 the root's children, entry i + 1 node i's, in node order."""
        out: list[list[int]] = [[] for _ in range(self.num_nodes + 1)]
        for i, p in enumerate(self.parents):
            out[p + 1].append(i)
        return out

    def path(self, node: int) -> list[int]:
        """The nodes from the root's child down to `node` (inclusive)."""
        out = []
        while node >= 0:
            out.append(node)
            node = self.parents[node]
        return out[::-1]

    @classmethod
    def chain(cls, tokens: list[int]) -> DraftTree:
        """A chain is the tree whose every node has one child."""
        n = len(tokens)
        return cls(list(tokens), list(range(-1, n - 1)), list(range(1, n + 1)), [0.0] * n)


def ancestor_mask(parents: list[int], device: torch.device | str = "cpu") -> torch.Tensor:
    """[N, N] bool: entry (i, j) is True when node j is node i or one of its ancestors."""
    n = len(parents)
    mask = torch.eye(n, dtype=torch.bool)
    for i, p in enumerate(parents):
        if p >= 0:
            mask[i] |= mask[p]   # parents come first, so mask[p] is complete
    return mask.to(device)


def with_root_row(mask: torch.Tensor) -> torch.Tensor:
    """The visibility among a verify step's new tokens: the root (the request's own last
    token) first, then the nodes. [N, N] node mask -> [N + 1, N + 1]: the root sees itself,
    every node sees the root."""
    n = mask.shape[0]
    out = torch.zeros((n + 1, n + 1), dtype=torch.bool, device=mask.device)
    out[:, 0] = True
    out[1:, 1:] = mask
    return out


Expand = Callable[[list[int], "DraftTree"], torch.Tensor]


def build_dynamic_tree(root_logq: torch.Tensor,  # [vocab] log q of the root's children
                       expand: Expand, depth: int, top_k: int, budget: int) -> tuple[DraftTree, list[int]]:
    """EAGLE-2 dynamic tree; see the module docstring.

    expand(fed, candidates) is called once per depth 2..depth with the candidate indices
    to feed (each candidate's parent was fed in an earlier call, or is the root) and the
    candidate tree so far; it returns [len(fed), vocab] log q of each fed node's children.
    Returns the chosen tree and, for each of its nodes, its candidate index.
    """
    if depth < 1 or top_k < 1 or budget < 1:
        raise ValueError("tree depth, top_k and budget must be >= 1")
    cand = DraftTree([], [], [], [])

    def add_children(parent: int, parent_score: float, logq: torch.Tensor) -> list[int]:
        vals, ids = logq.float().topk(min(top_k, logq.numel()))
        added = []
        for v, t in zip(vals.tolist(), ids.tolist()):
            if v == float("-inf"):
                break   # fewer than top_k tokens are possible
            cand.tokens.append(t)
            cand.parents.append(parent)
            cand.depths.append(1 if parent < 0 else cand.depths[parent] + 1)
            cand.scores.append(parent_score + v)
            added.append(len(cand.tokens) - 1)
        return added

    level = add_children(-1, 0.0, root_logq)
    for _ in range(depth - 1):
        # Feed the best top_k of the last level (creation order among equal scores).
        fed = sorted(heapq.nsmallest(top_k, level, key=lambda i: (-cand.scores[i], i)))
        if not fed:
            break
        logq = expand(fed, cand)   # [len(fed), vocab]
        level = [c for row, i in enumerate(fed) for c in add_children(i, cand.scores[i], logq[row])]
    chosen = sorted(heapq.nsmallest(budget, range(len(cand.tokens)),
                                    key=lambda i: (-cand.scores[i], i)))
    index = {c: j for j, c in enumerate(chosen)}
    tree = DraftTree([cand.tokens[c] for c in chosen],
                     [-1 if cand.parents[c] < 0 else index[cand.parents[c]] for c in chosen],
                     [cand.depths[c] for c in chosen], [cand.scores[c] for c in chosen])
    return tree, chosen


def tree_attention_ref(q: torch.Tensor,            # [n, heads, d] the step's queries of one sequence
                       kv_cache: torch.Tensor,     # [2, blocks, block_size, kv_heads, d], new K/V written
                       block_table: torch.Tensor,  # [max_blocks] the sequence's blocks
                       seq_len: int,               # slots in use, the queries' own included
                       tail_mask: torch.Tensor,    # [n, w] bool over the last w >= n slots
                       scale: float) -> torch.Tensor:
    """Tree attention over the paged cache, fp32: query i attends to every slot before the
    last w and to those of the last w that tail_mask[i] allows (the queries are the last n
    slots). A causal (lower-triangular) [n, n] mask is ordinary chunked prefill. Returns
    [n, heads, d] fp32."""
    n, heads, w = q.shape[0], q.shape[1], tail_mask.shape[1]
    nb = -(-seq_len // kv_cache.shape[2])
    keys, values = gather_kv(kv_cache, block_table[None, :nb].long())
    rep = heads // kv_cache.shape[3]
    keys = keys[0, :seq_len].float().repeat_interleave(rep, dim=1)     # [L, heads, d]
    values = values[0, :seq_len].float().repeat_interleave(rep, dim=1)
    visible = torch.ones((n, seq_len), dtype=torch.bool, device=q.device)
    visible[:, seq_len - w:] = tail_mask
    scores = torch.einsum("qhd,khd->hqk", q.float(), keys) * scale
    probs = scores.masked_fill(~visible, float("-inf")).softmax(dim=-1)
    return torch.einsum("hqk,khd->qhd", probs, values)
