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

import numpy as np
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
    return torch.from_numpy(ancestor_mask_np(parents)).to(device)


def ancestor_mask_np(parents: list[int]) -> np.ndarray:
    """ancestor_mask on the host, as numpy (cheap per node: a verify step builds one per
    request)."""
    n = len(parents)
    mask = np.eye(n, dtype=bool)
    for i, p in enumerate(parents):
        if p >= 0:
            mask[i] |= mask[p]   # parents come first, so mask[p] is complete
    return mask


def with_root_row(mask: torch.Tensor) -> torch.Tensor:
    """The visibility among a verify step's new tokens: the root (the request's own last
    token) first, then the nodes. [N, N] node mask -> [N + 1, N + 1]: the root sees itself,
    every node sees the root."""
    return tree_step_mask(mask, 1)


def tree_step_mask(ancestors: torch.Tensor, own: int) -> torch.Tensor:
    """[..., N, N] bool ancestor masks -> the [..., own + N, own + N] visibility of a verify
    step's rows, built where the masks lie: the request's own tokens causal, every node
    sees them all and its ancestors."""
    n = ancestors.shape[-1]
    m = ancestors.new_zeros((*ancestors.shape[:-2], own + n, own + n))
    m[..., :own, :own] = torch.ones((own, own), dtype=torch.bool, device=ancestors.device).tril()
    m[..., own:, :own] = True
    m[..., own:, own:] = ancestors
    return m


Children = list[tuple[float, int]]   # a node's children: (log q, token) pairs, most likely first


def top_children(top_k: int, *logq: torch.Tensor, token_ids: np.ndarray | None = None) -> list[Children]:
    """Each row's `top_k` most likely tokens as host (log q, token) pairs, most likely
    first: one topk per tensor and one copy to the host for all of them, so a whole
    depth's children (every request's) cost a single device sync.

    logq: tensors [rows_i, vocab] of log q (one row per node whose children they score),
    of one vocabulary; returns one list per row, the tensors' rows in order. Row by row the
    result is exactly a 1-D topk of that row (same values, same ids, same order among ties).
    token_ids [vocab]: the token of each column (a drafter's reduced vocabulary scored in
    its own columns, mapped on the host); None: the column is the token."""
    tops = [x.float().topk(min(top_k, x.shape[-1]), dim=-1) for x in logq]
    vals = tops[0][0] if len(tops) == 1 else torch.cat([v for v, _ in tops])   # [rows, k]
    ids = tops[0][1] if len(tops) == 1 else torch.cat([i for _, i in tops])
    # One [2, rows, k] int32 copy: the fp32 values' bits, and the ids (vocab < 2^31).
    host = torch.stack([vals.view(torch.int32), ids.to(torch.int32)]).cpu().numpy()
    tokens = host[1] if token_ids is None else token_ids[host[1]]
    return [list(zip(v, t)) for v, t in zip(host[0].view(np.float32).tolist(), tokens.tolist())]


class TreeBuilder:
    """EAGLE-2 dynamic expansion of one request's tree, a depth at a time, so a proposer
    can batch the drafter forward of every request's level: `to_feed()`, run the drafter
    on those candidates, `expand(fed, children)`, repeat; then `finish(budget)`. It works
    on host lists only: the proposer scores the children of every request's fed nodes
    with one `top_children` per depth."""

    def __init__(self, root_children: Children, top_k: int) -> None:
        if top_k < 1:
            raise ValueError("tree top_k must be >= 1")
        self.top_k = top_k
        self.cand = DraftTree([], [], [], [])   # every candidate so far, in creation order
        self.level = self._add_children(-1, 0.0, root_children)

    def _add_children(self, parent: int, parent_score: float, children: Children) -> list[int]:
        c = self.cand
        depth = 1 if parent < 0 else c.depths[parent] + 1
        added = []
        for v, t in children[:self.top_k]:
            if v == float("-inf"):
                break   # fewer than top_k tokens are possible
            c.tokens.append(t)
            c.parents.append(parent)
            c.depths.append(depth)
            c.scores.append(parent_score + v)
            added.append(len(c.tokens) - 1)
        return added

    def to_feed(self) -> list[int]:
        """The best top_k candidates of the last depth (creation order among equal scores),
        in creation order."""
        s = self.cand.scores
        return sorted(heapq.nsmallest(self.top_k, self.level, key=lambda i: (-s[i], i)))

    def expand(self, fed: list[int], children: list[Children]) -> None:
        """children[row]: the children of fed[row] (top_children of its log q)."""
        s = self.cand.scores
        self.level = [c for i, kids in zip(fed, children) for c in self._add_children(i, s[i], kids)]

    def finish(self, budget: int) -> tuple[DraftTree, list[int]]:
        """The `budget` best candidates as a tree, and each node's candidate index."""
        c = self.cand
        chosen = sorted(heapq.nsmallest(budget, range(len(c.tokens)), key=lambda i: (-c.scores[i], i)))
        index = {x: j for j, x in enumerate(chosen)}
        tree = DraftTree([c.tokens[x] for x in chosen],
                         [-1 if c.parents[x] < 0 else index[c.parents[x]] for x in chosen],
                         [c.depths[x] for x in chosen], [c.scores[x] for x in chosen])
        return tree, chosen


Expand = Callable[[list[int], DraftTree], torch.Tensor]


def build_dynamic_tree(root_logq: torch.Tensor,  # [vocab] log q of the root's children
                       expand: Expand, depth: int, top_k: int, budget: int) -> tuple[DraftTree, list[int]]:
    """EAGLE-2 dynamic tree for one request; see the module docstring and TreeBuilder.

    expand(fed, candidates) is called once per depth 2..depth with the candidate indices
    to feed (each candidate's parent was fed in an earlier call, or is the root) and the
    candidate tree so far; it returns [len(fed), vocab] log q of each fed node's children.
    Returns the chosen tree and, for each of its nodes, its candidate index.
    """
    if depth < 1 or budget < 1:
        raise ValueError("tree depth and budget must be >= 1")
    builder = TreeBuilder(top_children(top_k, root_logq[None])[0], top_k)
    for _ in range(depth - 1):
        fed = builder.to_feed()
        if not fed:
            break
        builder.expand(fed, top_children(top_k, expand(fed, builder.cand)))
    return builder.finish(budget)


@dataclass
class TreeShape:
    """The most a tree may hold (`--speculative-config` "tree": {"depth", "top_k",
    "budget"}), and how a smaller step's shape follows from it.

    Adaptive speculation picks a depth k each step; the tree then gets the node budget
    `budget_for(k)` (the full budget scaled by k / depth, at least k), and the scheduler
    leaves that many slots. A level-by-level drafter (EAGLE) writes its fed nodes' K/V in
    those slots too: top_k per depth below the first, starting one slot earlier (at the
    root's own), so a depth also needs top_k * (k - 1) - 1 <= slots. `for_room(slots)`
    inverts it: the deepest tree (and its budget) that fits the slots a request got."""

    depth: int = 4
    top_k: int = 4
    budget: int = 16
    level_slots: bool = True   # the drafter's fed nodes live in the slots (EAGLE, not P-EAGLE)
    # P-EAGLE: greedy requests' trees are chosen, verified and moved into place on the
    # device, one read-back a step (ember.spec.device_tree); False builds them on the host.
    device_greedy: bool = True

    def __post_init__(self) -> None:
        if self.depth < 1 or self.top_k < 1 or self.budget < self.depth:
            raise ValueError("tree needs depth >= 1, top_k >= 1 and budget >= depth")

    def max_nodes(self, k: int) -> int:
        """The most candidates a depth-k expansion makes: top_k children of the root, then
        top_k children of each of the top_k nodes fed at every further depth."""
        return self.top_k + (k - 1) * self.top_k ** 2

    def budget_for(self, k: int) -> int:
        # Never more than the expansion can fill: a budget it cannot reach would give trees
        # smaller than the slots (and the captured verify shape) asked for.
        b = max(k, min(-(-self.budget * k // self.depth), self.max_nodes(k)))
        if self.level_slots:
            b = max(b, self.top_k * (k - 1) - 1)
        return b

    def for_room(self, slots: int) -> tuple[int, int]:
        """(depth, budget) of the tree for a request with `slots` draft slots (depth 0: none)."""
        best = (0, 0)
        for k in range(1, self.depth + 1):
            need = k if not self.level_slots else max(k, self.top_k * (k - 1) - 1)
            if need <= slots:
                best = (k, min(slots, self.budget_for(k)))
        return best


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
