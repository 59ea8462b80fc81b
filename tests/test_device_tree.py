"""P-EAGLE trees built and verified on the device (ember.spec.device_tree), against plain
host references: the product tree's best candidates by enumeration, greedy acceptance by
walking the tree."""
from __future__ import annotations

import itertools

import pytest
import torch

from ember.spec.device_tree import (
    build_product_trees,
    chain_moves,
    greedy_accept,
    greedy_verdict_tensors,
    num_candidates,
)
from ember.spec.tree import ancestor_mask_np


def _top(b: int, depth: int, top_k: int, vocab: int, seed: int, ties: bool = False
         ) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, D, K] log q (best first, as topk gives them) and distinct tokens per depth."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn((b, depth, vocab), generator=g) * 2
    if ties:   # repeated values, and certainty (log q = 0 for the best token)
        logits = logits.round()
        logits[:, 0, 0] = 1e4
    top = torch.log_softmax(logits, dim=-1).topk(top_k, dim=-1)
    return top.values, top.indices * 7 + 1   # a draft-to-target id map


def _reference(logq: torch.Tensor, tokens: torch.Tensor, budget: int) -> tuple[list, list, list]:
    """One request: every rank tuple scored, the `budget` best (earlier tuple first among
    equal scores, tuples listed breadth first), in list order."""
    depth, top_k = logq.shape
    cands = [r for d in range(1, depth + 1) for r in itertools.product(range(top_k), repeat=d)]
    score = [sum(float(logq[d, x]) for d, x in enumerate(r)) for r in cands]
    best = sorted(sorted(range(len(cands)), key=lambda i: (-score[i], i))[:budget])
    index = {cands[c]: j for j, c in enumerate(best)}
    toks = [int(tokens[len(cands[c]) - 1, cands[c][-1]]) for c in best]
    parents = [index[cands[c][:-1]] if len(cands[c]) > 1 else -1 for c in best]
    return toks, parents, [len(cands[c]) for c in best]


@pytest.mark.parametrize("depth,top_k,budget,ties", [(3, 3, 9, False), (5, 3, 24, False), (4, 4, 16, True),
                                                     (2, 2, 6, False), (1, 3, 3, False)])
def test_product_tree_is_the_best_candidates(depth, top_k, budget, ties) -> None:
    logq, tokens = _top(3, depth, top_k, 40, seed=depth * 10 + top_k, ties=ties)
    trees = build_product_trees(logq, tokens, budget)
    assert trees.num_nodes == budget and trees.depth == depth
    for b in range(3):
        toks, parents, depths = _reference(logq[b], tokens[b], budget)
        assert trees.tokens[b].tolist() == toks
        assert trees.parents[b].tolist() == parents
        assert trees.depths[b].tolist() == depths
        assert all(p < i for i, p in enumerate(parents))   # topological: every parent chosen, before
        assert torch.equal(trees.ancestors[b], torch.from_numpy(ancestor_mask_np(parents)))


def test_budget_beyond_the_candidates_is_refused() -> None:
    logq, tokens = _top(1, 2, 2, 10, seed=0)
    assert num_candidates(2, 2) == 6
    with pytest.raises(ValueError, match="candidates"):
        build_product_trees(logq, tokens, 7)


def _walk(tokens: list[int], parents: list[int], target: list[int]) -> list[int]:
    """The accepted nodes: from the root, the child whose token is the target's argmax."""
    path, node = [], -1
    while True:
        kids = [i for i, p in enumerate(parents) if p == node and tokens[i] == target[node + 1]]
        if not kids:
            return path
        node = kids[0]
        path.append(node)


@pytest.mark.parametrize("seed", range(6))
def test_greedy_accept_is_the_tree_walk(seed) -> None:
    depth, top_k, budget, b = 4, 3, 14, 5
    logq, tokens = _top(b, depth, top_k, 12, seed=seed)
    trees = build_product_trees(logq, tokens, budget)
    g = torch.Generator().manual_seed(100 + seed)
    # Targets that follow the tree for a random number of steps, then leave it.
    target = torch.randint(0, 90, (b, budget + 1), generator=g)
    for i in range(b):
        node, stop = -1, int(torch.randint(0, depth + 1, (1,), generator=g))
        for _ in range(stop):
            kids = [j for j, p in enumerate(trees.parents[i].tolist()) if p == node]
            if not kids:
                break
            pick = kids[int(torch.randint(0, len(kids), (1,), generator=g))]
            target[i, node + 1] = trees.tokens[i, pick]
            node = pick
    verdict = greedy_accept(trees, target)
    root_rows = torch.tensor([0, 20, 40, 60, 80])
    src, dst = chain_moves(verdict, root_rows)
    # The graphed form: one packed tensor for the host (deepest node, accepted, emitted).
    packed, src2, dst2 = greedy_verdict_tensors(target, trees.tokens, trees.parents, trees.depths,
                                                trees.ancestors, root_rows, depth)
    assert torch.equal(packed[:, 0], trees.depths.max(dim=1).values)
    assert torch.equal(packed[:, 1], verdict.num_accepted) and torch.equal(packed[:, 2:], verdict.emitted)
    assert torch.equal(src2, src) and torch.equal(dst2, dst)
    lengths = set()
    for i in range(b):
        toks, parents, tgt = trees.tokens[i].tolist(), trees.parents[i].tolist(), target[i].tolist()
        path = _walk(toks, parents, tgt)
        n = len(path)
        lengths.add(n)
        assert int(verdict.num_accepted[i]) == n
        last = path[-1] if path else -1
        expect = [toks[x] for x in path] + [tgt[last + 1]]
        assert verdict.emitted[i].tolist() == expect + [-1] * (depth + 1 - len(expect))
        # Moves: accepted node at depth d + 1 to the row d + 1 after the root; others stay.
        r = int(root_rows[i])
        pairs = list(zip(src[i * depth:(i + 1) * depth].tolist(), dst[i * depth:(i + 1) * depth].tolist()))
        assert pairs == [(r + 1 + path[d], r + 1 + d) if d < n else (r + 1 + d, r + 1 + d) for d in range(depth)]
    assert len(lengths) > 1   # the cases are not all alike


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_graphed_call_replays_what_the_function_computes() -> None:
    """The device trees' captured graphs: every call, new inputs, the function's result."""
    from ember.engine.graphed_call import GraphedCall
    from ember.spec.device_tree import product_tree_tensors
    call = GraphedCall(product_tree_tensors, torch.device("cuda"))
    for seed in range(4):
        for depth, budget in [(3, 9), (5, 24)]:
            logq, tokens = _top(2, depth, 3, 50, seed=seed)
            logq, tokens = logq.cuda(), tokens.cuda()
            got = [t.clone() for t in call(logq, tokens, budget=budget)]
            want = product_tree_tensors(logq, tokens, budget)
            assert all(torch.equal(g, w) for g, w in zip(got, want))
    assert len(call._graphs) == 2
