"""P-EAGLE trees for greedy requests, built, verified and moved into place on the device.

A P-EAGLE drafter scores every depth of a tree in one forward, and its mask rows never
see the drafted tokens, so the children below every node of a depth are the same: the
top_k tokens of that depth's distribution (a product tree). A node is then a tuple of
ranks (r_1 .. r_d), its token the r_d-th best of depth d, and its score the sum of the
ranks' log q. Every such tuple up to the step's depth is a candidate (a static table per
(depth, top_k)); the `budget` best candidates are the tree. Scores only fall along a path
(log q <= 0) and ties go to the earlier candidate (parents are listed before children),
so the chosen set holds every chosen node's ancestors, and in candidate order it is
topological.

For a greedy request the whole step then stays on the device: the tree's tokens go into
the verify forward's inputs by a device copy (`place_device_trees`), the target's argmax at the root
and at each node decides the accepted path (`greedy_accept`: a node is accepted when its
token is its parent's argmax and its parent is accepted; siblings hold distinct tokens,
so at most one node per depth is), and the accepted nodes' K/V and hidden rows move to
the rows a chain would have had, by fixed-shape copies (a path shorter than the depth
copies rows onto themselves). One read-back a step brings the emitted tokens home,
against two (the drafts, then the verdict) when the host builds the tree
(ember.spec.tree.TreeBuilder). The selection (the proposer's) and the verdict (the
runner's) are pure functions of fixed-shape tensors, replayed from CUDA graphs
(ember.engine.graphed_call).

This is the same selection as a TreeBuilder over the product tree with no per-depth
feeding limit (every candidate of a depth may get children), so it can only choose paths
at least as likely; greedy output stays exactly the target's.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING

import numpy as np
import torch

from ember.engine.forward_batch import ForwardBatch, long_tensor
from ember.spec.tree import tree_step_mask

if TYPE_CHECKING:
    from ember.engine.scheduler import ScheduledRequest

MAX_CANDIDATES = 1 << 17   # a bigger (depth, top_k) drafts on the host


@lru_cache(maxsize=16)
def _candidate_table(depth: int, top_k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every rank tuple of length 1..depth, breadth first (parents first, ranks in order).
    Returns (depth [C], parent candidate [C] (-1: the root), column [C, depth]): column
    (d * top_k + rank) of depth d's top_k values for d < the candidate's depth, else the
    pad column depth * top_k."""
    depths, parents, cols = [], [], []
    level = [(-1, ())]
    for d in range(depth):
        nxt = []
        for parent, ranks in level:
            for r in range(top_k):
                idx = len(depths)
                depths.append(d + 1)
                parents.append(parent)
                ranks_c = ranks + (r,)
                row = [i * top_k + x for i, x in enumerate(ranks_c)] + [depth * top_k] * (depth - d - 1)
                cols.append(row)
                nxt.append((idx, ranks_c))
        level = nxt
    return (np.asarray(depths, dtype=np.int64), np.asarray(parents, dtype=np.int64),
            np.asarray(cols, dtype=np.int64))


_DEVICE_TABLES: dict[tuple[int, int, torch.device], tuple[torch.Tensor, ...]] = {}


def _device_table(depth: int, top_k: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """_candidate_table on the device, copied once (a copy from pageable host memory
    waits for the device's queue: no copies inside a step)."""
    key = (depth, top_k, device)
    if key not in _DEVICE_TABLES:
        _DEVICE_TABLES[key] = tuple(torch.from_numpy(a).to(device) for a in _candidate_table(depth, top_k))
    return _DEVICE_TABLES[key]


def num_candidates(depth: int, top_k: int) -> int:
    return sum(top_k ** d for d in range(1, depth + 1))


@dataclass
class DeviceTrees:
    """One step's trees, one row per drafting request, all of one shape, on the device."""

    tokens: torch.Tensor      # [B, N] long: each node's token (the target's ids)
    parents: torch.Tensor     # [B, N] long: parent node, -1 = the root
    depths: torch.Tensor      # [B, N] long: 1 for the root's children
    ancestors: torch.Tensor   # [B, N, N] bool: (i, j) when node j is node i or its ancestor
    step_masks: torch.Tensor  # [B, N + 1, N + 1] bool: a verify step's mask (the root, then the nodes)
    depth: int                # the depth the step drafted to (nodes may stop short of it)

    @property
    def num_nodes(self) -> int:
        return self.tokens.shape[1]

    def rows(self, which: torch.Tensor) -> DeviceTrees:
        """The trees of rows `which` ([B'] long, on the device)."""
        return DeviceTrees(self.tokens[which], self.parents[which], self.depths[which],
                           self.ancestors[which], self.step_masks[which], self.depth)


@dataclass
class DeviceDraftTree:
    """One request's tree in a DeviceTrees (what ScheduledRequest.spec_tree holds for it).
    The host knows only its size: its tokens are read back with the verdict."""

    trees: DeviceTrees
    row: int
    deepest: int | None = None   # its deepest node's depth, once read back with the verdict

    @property
    def num_nodes(self) -> int:
        return self.trees.num_nodes

    @property
    def max_depth(self) -> int:
        """Its deepest node's depth (the depth drafted to before the verdict): statistics
        and adaptive k count acceptance per depth up to it, as for a host tree."""
        return self.deepest if self.deepest is not None else self.trees.depth


def build_product_trees(logq_top: torch.Tensor,   # [B, D, K] fp32: each depth's top_k log q, best first
                        tokens_top: torch.Tensor,  # [B, D, K] long: their tokens
                        budget: int) -> DeviceTrees:
    """The `budget` best candidates of each request's product tree (module docstring)."""
    return DeviceTrees(*product_tree_tensors(logq_top, tokens_top, budget), depth=logq_top.shape[1])


def product_tree_tensors(logq_top: torch.Tensor, tokens_top: torch.Tensor, budget: int
                         ) -> tuple[torch.Tensor, ...]:
    """build_product_trees' tensors, as a tuple (what a captured graph returns)."""
    b, depth, top_k = logq_top.shape
    dev = logq_top.device
    c_depth, c_parent, c_cols = _device_table(depth, top_k, dev)
    n_cand = c_depth.shape[0]
    if budget > n_cand:
        raise ValueError(f"tree budget {budget} exceeds the {n_cand} candidates of depth {depth}, top_k {top_k}")
    # Scores in float64 with an index tie-break far below any fp32 difference, so ties go
    # to the earlier candidate (closure) and topk's order among equals never matters.
    vals = torch.cat([logq_top.double().reshape(b, -1), logq_top.new_zeros((b, 1), dtype=torch.float64)], dim=1)
    scores = vals[:, c_cols].sum(dim=-1)                                     # [B, C]
    key = scores - torch.arange(n_cand, device=dev, dtype=torch.float64) * 1e-12
    chosen = key.topk(budget, dim=1).indices.sort(dim=1).values              # [B, N] candidate order
    pos_of = torch.full((b, n_cand), -1, dtype=torch.long, device=dev)
    pos_of.scatter_(1, chosen, torch.arange(budget, device=dev).expand(b, -1))
    parent_c = c_parent[chosen]                                              # [B, N]
    parents = torch.where(parent_c >= 0, pos_of.gather(1, parent_c.clamp(min=0)), -1)
    depths = c_depth[chosen]
    last_col = c_cols[chosen].gather(2, (depths - 1)[..., None]).squeeze(-1)  # [B, N]: d * K + rank
    tokens = tokens_top.reshape(b, -1).gather(1, last_col)
    ancestors = _ancestors(parents, depth)
    return tokens, parents, depths, ancestors, tree_step_mask(ancestors, 1)


def _ancestors(parents: torch.Tensor, depth: int) -> torch.Tensor:
    """[B, N] parents -> [B, N, N] bool ancestor-or-self, by depth - 1 parent steps."""
    b, n = parents.shape
    dev = parents.device
    up = torch.zeros((b, n, n + 1), dtype=torch.float32, device=dev)          # column n: the root
    up.scatter_(2, torch.where(parents >= 0, parents, n)[..., None], 1.0)
    up = up[..., :n]                                                          # [B, N, N] one-hot parent
    reach = torch.eye(n, device=dev).expand(b, n, n)
    out = reach.clone()
    for _ in range(depth - 1):
        reach = reach @ up
        out = out + reach
    return out > 0


@dataclass
class GreedyVerdict:
    """Device tensors of a verified step's trees."""

    num_accepted: torch.Tensor   # [B] long: accepted nodes (a path from the root)
    emitted: torch.Tensor        # [B, D + 1] long: the path's tokens then the target's next; -1 past them
    path: torch.Tensor           # [B, D] long: the accepted node at each depth (meaningful below num_accepted)


def greedy_accept(trees: DeviceTrees,
                  target: torch.Tensor,   # [B, N + 1] long: the target's argmax at the root, then at each node
                  ) -> GreedyVerdict:
    """The longest path whose every token is the target's argmax at its parent."""
    depth = trees.depth
    at_parent = target.gather(1, trees.parents + 1)                          # [B, N]
    wrong = (trees.tokens != at_parent).float()
    accepted = (trees.ancestors.float() @ wrong[..., None]).squeeze(-1) == 0  # [B, N]
    acc_depth = torch.where(accepted, trees.depths, 0)
    num_accepted = acc_depth.max(dim=1).values                               # [B]
    levels = torch.arange(1, depth + 1, device=target.device)
    at_level = acc_depth[:, None, :] == levels[None, :, None]                # [B, D, N]
    path = at_level.float().argmax(dim=-1)                                   # [B, D]
    last = path.gather(1, (num_accepted - 1).clamp(min=0)[:, None]).squeeze(1)
    bonus = target.gather(1, torch.where(num_accepted > 0, last + 1, 0)[:, None])   # [B, 1]
    path_tokens = torch.cat([trees.tokens.gather(1, path), bonus], dim=1)   # [B, D + 1]
    steps = torch.arange(depth + 1, device=target.device)[None, :]
    n_acc = num_accepted[:, None]
    emitted = torch.where(steps < n_acc, path_tokens, torch.where(steps == n_acc, bonus, -1))
    return GreedyVerdict(num_accepted, emitted, path)


def greedy_verdict_tensors(target: torch.Tensor,      # [B, N + 1] long: greedy_accept's
                           tokens: torch.Tensor, parents: torch.Tensor, depths: torch.Tensor,
                           ancestors: torch.Tensor,   # a DeviceTrees' tensors
                           root_rows: torch.Tensor,   # [B] long: each request's root row
                           depth: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """greedy_accept and chain_moves as one tuple (what a captured graph returns):
    ([B, D + 3] the tree's deepest node's depth, num_accepted, then emitted; the rows to
    copy src [B * D], dst [B * D])."""
    trees = DeviceTrees(tokens, parents, depths, ancestors, ancestors, depth)   # step_masks unused
    verdict = greedy_accept(trees, target)
    src, dst = chain_moves(verdict, root_rows)
    deepest = depths.max(dim=1).values[:, None]
    return torch.cat([deepest, verdict.num_accepted[:, None], verdict.emitted], dim=1), src, dst


def chain_moves(verdict: GreedyVerdict, root_rows: torch.Tensor   # [B] long: each request's root row
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows to copy (src, dst), [B * D] each: the node accepted at depth d + 1 to the row
    d + 1 after the root (where a chain keeps it); depths past the accepted path copy a
    row onto itself, so the shapes never depend on the verdict."""
    depth = verdict.path.shape[1]
    steps = torch.arange(depth, device=root_rows.device)[None, :]
    dst = root_rows[:, None] + 1 + steps
    src = torch.where(steps < verdict.num_accepted[:, None], root_rows[:, None] + 1 + verdict.path, dst)
    return src.reshape(-1), dst.reshape(-1)


def tree_rows_contiguous(trees: dict[int, ScheduledRequest], num_seqs: int) -> bool:
    """True when a step's sequences are all device trees of one step, in their DeviceTrees
    rows' order, each its root and nodes: the step's rows are then [B, N + 1] from row 0
    (the usual drafting step), and placing and verifying index nothing."""
    if len(trees) != num_seqs or not all(isinstance(s.spec_tree, DeviceDraftTree) for s in trees.values()):
        return False
    t = next(iter(trees.values())).spec_tree.trees
    return (t.tokens.shape[0] == num_seqs
            and all(s.spec_tree.trees is t and s.spec_tree.row == i and s.num_new_tokens == 1
                    for i, s in trees.items()))


def place_device_trees(trees: dict[int, ScheduledRequest], fb: ForwardBatch, contiguous: bool) -> None:
    """Device trees' node tokens and RoPE positions into the step's inputs (device copies:
    the host never saw the tokens). `contiguous`: tree_rows_contiguous(trees, fb.num_seqs)."""
    device = [(i, s) for i, s in trees.items() if isinstance(s.spec_tree, DeviceDraftTree)]
    if not device:
        return
    t = device[0][1].spec_tree.trees
    n = t.num_nodes
    if contiguous:
        b = len(device)
        fb.input_ids[:b * (n + 1)].view(b, n + 1)[:, 1:] = t.tokens
        positions = fb.positions[:b * (n + 1)].view(b, n + 1)   # the roots' own positions first
        positions[:, 1:] = positions[:, :1] + t.depths
        return
    first = [fb.query_start_loc[i] + s.num_new_tokens for i, s in device]    # node 0's row
    base = [s.request.num_computed_tokens + s.num_new_tokens - 1 for _, s in device]   # the root's position
    which = [s.spec_tree.row for _, s in device]
    first_t, base_t, which_t = long_tensor([first, base, which], fb.input_ids.device)
    rows = (first_t[:, None] + torch.arange(n, device=first_t.device)).reshape(-1)
    fb.input_ids[rows] = t.tokens[which_t].reshape(-1)
    fb.positions[rows] = (base_t[:, None] + t.depths[which_t]).reshape(-1)
