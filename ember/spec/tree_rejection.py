"""Lossless verification of draft trees: recursive rejection sampling over each node's children.

The chain verifier (ember.spec.rejection) walks position j -> j + 1. A tree verifier walks
from the root to the accepted child, trying the children of the current node in order:

    p <- the target's distribution at the current node
    for each child c_i (i = 1..m), drawn from q_i:
        accept c_i with probability min(1, p(c_i) / q_i(c_i))  -> move to c_i, repeat there
        on rejection:                p <- norm(max(p - q_i, 0))
    no child accepted (or a leaf):   emit a token drawn from p and stop

(SpecInfer's multi-step speculative sampling; Miao et al. 2024, Chen et al. 2024 "Sequoia".)

Why it is exact. Claim: from any node, whatever was drafted and rejected before, the token
the procedure emits next is distributed as the current p. By induction from the last child:
with no children left, it draws from p. Otherwise c_i is drawn from q_i given everything
before it, and the rest of the procedure (by induction) emits from r = norm(max(p - q_i, 0)),
a distribution that does not depend on c_i. So P(emit x) = q_i(x) min(1, p(x)/q_i(x)) +
P(reject) r(x) = min(p(x), q_i(x)) + (1 - sum_y min(p(y), q_i(y))) r(x) = p(x), because
P(reject) = sum_y max(p(y) - q_i(y), 0) is exactly r's normalizer. At the root p is the
target's distribution there; after accepting c, the walk restarts at c with the target's
distribution given c, so the whole emitted sequence follows the target.

The step needs only that q_i is the distribution c_i was drawn from *given the history*
(the tree so far and the earlier siblings). Three ways to draw children, all exact:

- independently from q (with replacement): q_i = q for every child;
- from q without replacement: q_i = q with the earlier siblings removed, renormalized;
- deterministically, e.g. EAGLE-2's top-k children: c_i is a function of the history, so
  it was "drawn" from the one-hot q_i = delta(c_i). Then min(1, p/q_i) = p(c_i) and
  max(p - q_i, 0) is p with c_i removed: accept c_1 with p(c_1), else c_2 with
  p(c_2) / (1 - p(c_1)), ...; that is sampling from p by walking its categories, and the
  emitted token is distributed as p. A greedy row (p one-hot) accepts the child equal to
  the argmax, i.e. the longest path the target's greedy decoding would take.

One caution for sampled children: which children a node keeps must not depend on the
drawn tokens themselves (e.g. pruning sampled children by their own scores), or c_i is no
longer distributed as q_i given the history. Deterministic children (how ember builds
trees: ember.spec.tree) may be pruned freely, since everything about them is a function
of the drafter's outputs.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ember.spec.rejection import _noise, sample_from
from ember.spec.tree import DraftTree


@dataclass
class TreeVerifyOutput:
    """Per request: tokens to append (the accepted path's tokens, then one more) and the
    accepted node indices, root side first."""

    token_ids: list[list[int]]
    accepted_nodes: list[list[int]]

    @property
    def num_accepted(self) -> list[int]:
        return [len(a) for a in self.accepted_nodes]


def _renorm(x: torch.Tensor, fallback: torch.Tensor) -> torch.Tensor:
    """x / sum(x) per row; where rounding left no mass, the fallback (the residual's limit)."""
    s = x.sum(dim=-1, keepdim=True)
    return torch.where(s > 0, x / s.clamp(min=torch.finfo(x.dtype).tiny), fallback)


def tree_rejection_sample(
    target_probs: torch.Tensor,        # [B, N + 1, vocab] fp32: row 0 the root's p, row i + 1 node i's
    trees: list[DraftTree],            # [B] (nodes padded to N in target_probs)
    draft_probs: torch.Tensor | None,  # [B, N + 1, vocab] q each node's children were drawn
                                       # from (row 0: the root's); None: children deterministic
    generators: list[torch.Generator | None],  # [B]
    replacement: bool = False,         # sampled children: drawn with replacement (else without)
    greedy: bool = False,              # every row of target_probs is one-hot (greedy requests)
) -> TreeVerifyOutput:
    """Verify a batch of draft trees; see the module docstring for the rule.

    Vectorized over requests, a loop over depth and child slot. A seeded request draws
    N uniforms (one per node) then one vocabulary row of exponentials from its generator.
    `greedy` with deterministic children takes the rule's one-hot case directly (the
    child equal to the argmax is accepted, the argmax is emitted where none is): one
    read-back instead of one per child slot.
    """
    b, n1, vocab = target_probs.shape
    dev = target_probs.device
    if b == 0:
        return TreeVerifyOutput([], [])
    if greedy and draft_probs is None:
        return _greedy_walk(target_probs.argmax(dim=-1).tolist(), trees)
    n = n1 - 1
    rows = torch.arange(b, device=dev)
    kids, tokens = _tables(trees, n)
    kids, tokens = kids.to(dev), tokens.to(dev)
    u = _noise((b, max(n, 1)), generators, dev, "uniform")   # [B, N] one per node

    cur = torch.zeros(b, dtype=torch.long, device=dev)      # current node + 1 (0 = root)
    done = torch.zeros(b, dtype=torch.bool, device=dev)
    final = torch.zeros((b, vocab), device=dev)             # each row's last-token distribution
    path = torch.full((b, max(_depth(trees), 1)), -1, dtype=torch.long, device=dev)
    for level in range(_depth(trees) + 1):
        p = target_probs[rows, cur]                          # [B, vocab]
        q = draft_probs[rows, cur].clone() if draft_probs is not None else None
        hit = torch.full((b,), -1, dtype=torch.long, device=dev)
        for slot in range(kids.shape[2]):
            child = kids[rows, cur, slot]                    # [B] node id, -1 none
            active = ~done & (hit < 0) & (child >= 0)
            if not bool(active.any()):
                break
            c = child.clamp(min=0)
            tok = tokens[rows, c]                            # [B]
            p_c = p.gather(1, tok[:, None]).squeeze(1)
            if q is None:
                accept = active & (u[rows, c] < p_c)
                resid = p.scatter(1, tok[:, None], 0.0)      # max(p - onehot(c), 0)
            else:
                q_c = q.gather(1, tok[:, None]).squeeze(1)
                # u < p/q <=> u q < p; never accepts p == 0, always p >= q.
                accept = active & (u[rows, c] * q_c < p_c)
                resid = (p - q).clamp(min=0.0)
            hit = torch.where(accept, child, hit)
            rejected = (active & ~accept)[:, None]
            p = torch.where(rejected, _renorm(resid, p), p)
            if q is not None and not replacement:
                # The next sibling was drawn from q without the ones drawn before it.
                q = torch.where(rejected, _renorm(q.scatter(1, tok[:, None], 0.0), q), q)
        stop = ~done & (hit < 0)                             # no child accepted, or a leaf
        final = torch.where(stop[:, None], p, final)
        done |= stop
        if level < path.shape[1]:
            path[:, level] = hit   # -1 for rows that stopped (now or before)
        cur = torch.where(done, cur, hit + 1)
        if bool(done.all()):
            break
    last = sample_from(final, generators).tolist()
    path_l = path.tolist()
    tok_l = tokens.tolist()
    accepted = [[x for x in row if x >= 0] for row in path_l]
    out = [[tok_l[i][x] for x in accepted[i]] + [last[i]] for i in range(b)]
    return TreeVerifyOutput(out, accepted)


def _greedy_walk(best: list[list[int]],   # [B][N + 1] the target's argmax at the root, node i
                 trees: list[DraftTree]) -> TreeVerifyOutput:
    """Follow, from the root, the child whose token is the target's argmax there; emit the
    argmax where no child matches (one-hot p: acceptance is an exact match)."""
    out, accepted = [], []
    for row, t in zip(best, trees):
        kids = t.children()
        at, path = -1, []
        while True:
            nxt = next((c for c in kids[at + 1] if t.tokens[c] == row[at + 1]), None)
            if nxt is None:
                break
            path.append(nxt)
            at = nxt
        accepted.append(path)
        out.append([t.tokens[c] for c in path] + [row[at + 1]])
    return TreeVerifyOutput(out, accepted)


def _tables(trees: list[DraftTree], n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """kids [B, N + 1, max children] (node ids in order, -1 padding; row 0 the root's) and
    tokens [B, max(N, 1)]."""
    b = len(trees)
    kids = np.full((b, n + 1, 1), -1, dtype=np.int64)
    tokens = np.zeros((b, max(n, 1)), dtype=np.int64)
    for i, t in enumerate(trees):
        if not t.num_nodes:
            continue
        parents = np.asarray(t.parents) + 1
        # Rank of each node among its siblings (nodes are in order, so a stable sort by
        # parent keeps sibling order).
        order = np.argsort(parents, kind="stable")
        first = np.searchsorted(parents[order], parents[order])
        rank = np.empty_like(order)
        rank[order] = np.arange(len(order)) - first
        if rank.max() + 1 > kids.shape[2]:
            kids = np.concatenate([kids, np.full((b, n + 1, rank.max() + 1 - kids.shape[2]), -1,
                                                 dtype=np.int64)], axis=2)
        kids[i, parents, rank] = np.arange(t.num_nodes)
        tokens[i, :t.num_nodes] = t.tokens
    return torch.from_numpy(kids), torch.from_numpy(tokens)


def _depth(trees: list[DraftTree]) -> int:
    return max((t.max_depth for t in trees), default=0)
