"""The tree verifier: exact cases (greedy = the longest path of argmax tokens), agreement
with the chain verifier on chains, then statistics: every emitted token follows the
target's distribution at its node for trees with several children per node drawn from a
q unlike p: deterministic (top-k) children, sampled with and without replacement."""
from __future__ import annotations

import pytest
import torch

from _stats import chi2_pvalue

from ember.spec.tree import DraftTree
from ember.spec.tree_rejection import tree_rejection_sample

V = 8


def one_hot(i: int) -> torch.Tensor:
    return torch.nn.functional.one_hot(torch.tensor(i), V).float()


# ---- exact cases ------------------------------------------------------------------------
def test_greedy_takes_the_longest_argmax_path() -> None:
    #          root (argmax 3)
    #     0:tok5   1:tok3            <- node 1 matches
    #     2:tok1   3:tok6  4:tok2    <- node 3 (child of 1) matches argmax 6 at node 1
    #                      5:tok7    <- child of 3; node 3's argmax is 4: rejected
    t = DraftTree([5, 3, 1, 6, 2, 7], [-1, -1, 0, 1, 1, 3], [1, 1, 2, 2, 2, 3], [0.0] * 6)
    argmax = [3, 0, 6, 0, 4, 0, 0]   # root, then nodes 0..5
    p = torch.stack([one_hot(a) for a in argmax])[None]
    out = tree_rejection_sample(p, [t], None, [None])
    assert out.accepted_nodes == [[1, 3]] and out.token_ids == [[3, 6, 4]]
    assert out.num_accepted == [2]
    # A draft distribution changes nothing for a greedy target.
    q = torch.softmax(torch.randn(1, 7, V), -1)
    for _ in range(10):
        assert tree_rejection_sample(p, [t], q, [None]).token_ids == [[3, 6, 4]]


def test_greedy_walk_equals_the_general_rule_on_one_hot_targets() -> None:
    """The greedy shortcut (one read-back) against the rule's loop, on random trees
    (duplicate sibling tokens included) and targets that often match a child."""
    g = torch.Generator().manual_seed(4)
    for _ in range(30):
        trees, rows = [], []
        for _ in range(3):
            n = int(torch.randint(0, 9, (1,), generator=g))
            parents = [int(torch.randint(-1, i, (1,), generator=g)) for i in range(n)]
            depths = []
            for p_ in parents:
                depths.append(1 if p_ < 0 else depths[p_] + 1)
            tokens = torch.randint(0, 3, (n,), generator=g).tolist()
            trees.append(DraftTree(tokens, parents, depths, [0.0] * n))
            rows.append(torch.randint(0, 3, (9,), generator=g))
        p = torch.stack([torch.stack([one_hot(int(a)) for a in r]) for r in rows])   # [3, 9, V]
        fast = tree_rejection_sample(p, trees, None, [None] * 3, greedy=True)
        slow = tree_rejection_sample(p, trees, None, [None] * 3)
        assert fast == slow


def test_no_children_accepted_and_empty_tree() -> None:
    t = DraftTree([1, 2], [-1, -1], [1, 1], [0.0, 0.0])
    p = torch.stack([one_hot(4), one_hot(0), one_hot(0)])[None]
    assert tree_rejection_sample(p, [t], None, [None]).token_ids == [[4]]
    empty = DraftTree([], [], [], [])
    p2 = torch.cat([one_hot(6)[None], torch.zeros(2, V)])[None]   # padded to the batch's N
    out = tree_rejection_sample(torch.cat([p, p2]), [t, empty], None, [None, None])
    assert out.token_ids == [[4], [6]] and out.accepted_nodes == [[], []]


def test_seeded_rows_are_reproducible_whatever_the_batch() -> None:
    torch.manual_seed(2)
    t = DraftTree([1, 2, 3, 4], [-1, -1, 0, 0], [1, 1, 2, 2], [0.0] * 4)
    p = torch.softmax(torch.randn(3, 5, V), -1)
    gens = lambda: [torch.Generator().manual_seed(s) for s in (5, 6, 7)]
    a = tree_rejection_sample(p, [t] * 3, None, gens())
    b = tree_rejection_sample(p, [t] * 3, None, gens())
    assert a == b
    c = tree_rejection_sample(p[2:], [t], None, [torch.Generator().manual_seed(7)])
    assert c.token_ids[0] == a.token_ids[2]


# ---- statistics -------------------------------------------------------------------------
N = 40_000
# root -> 3 children; each child -> 2 children (depth 2): 9 nodes.
PARENTS = [-1, -1, -1, 0, 0, 1, 1, 2, 2]
DEPTHS = [1, 1, 1, 2, 2, 2, 2, 2, 2]


def _dists(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """p and q [10, V] for the root and each node: q correlated with p but different, and
    q has a hole (a token p may emit that q never drafts)."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(10, V, generator=g) * 1.3
    p = torch.softmax(logits, -1)
    q = torch.softmax(logits + torch.randn(10, V, generator=g) * 1.2, -1)
    q[:, 0] = 0.0
    return p, q / q.sum(-1, keepdim=True)


def _draw_children(q: torch.Tensor, m: int, n: int, replacement: bool, g: torch.Generator) -> torch.Tensor:
    """[n, m] children of one node per trial, drawn from q [V]."""
    return torch.multinomial(q.expand(n, V), m, replacement=replacement, generator=g)


def _trees(mode: str, q: torch.Tensor, n: int) -> list[DraftTree]:
    g = torch.Generator().manual_seed(11)
    if mode == "top-k":   # deterministic: the most likely children under q
        kids = [q[0].topk(3).indices.expand(n, 3)] + \
               [q[1 + c].topk(2).indices.expand(n, 2) for c in range(3)]
    else:
        rep = mode == "with-replacement"
        kids = [_draw_children(q[0], 3, n, rep, g)] + \
               [_draw_children(q[1 + c], 2, n, rep, g) for c in range(3)]
    # Node c (depth 1) is the root's child c; nodes 3 + 2c, 4 + 2c are node c's children.
    toks = torch.cat([kids[0]] + [kids[1 + c] for c in range(3)], dim=1).tolist()
    return [DraftTree(row, PARENTS, DEPTHS, [0.0] * 9) for row in toks]


def _check(tokens: list[int], p: torch.Tensor, what: str) -> None:
    counts = torch.bincount(torch.tensor(tokens), minlength=V).double()
    assert counts.sum() > 500, what
    tv = 0.5 * (counts / counts.sum() - p.double()).abs().sum()
    assert tv < 2 * (V / counts.sum()) ** 0.5, (what, float(tv))
    assert chi2_pvalue(counts, p) > 1e-4, what


@pytest.mark.parametrize("mode", ["top-k", "with-replacement", "without-replacement"])
def test_emitted_tokens_follow_the_target(mode: str) -> None:
    p, q = _dists({"top-k": 1, "with-replacement": 2, "without-replacement": 3}[mode])
    trees = _trees(mode, q, N)
    torch.manual_seed(5)
    draft_probs = None if mode == "top-k" else q[None].expand(N, 10, V)
    out = tree_rejection_sample(p[None].expand(N, 10, V), trees, draft_probs, [None] * N,
                                replacement=mode == "with-replacement")
    # The first token follows p at the root...
    _check([t[0] for t in out.token_ids], p[0], "root")
    # ...the next one, after accepting node c, follows p at c (a leaf's too).
    accepted_any = 0
    for c in range(9):
        nxt = [t[a.index(c) + 1] for t, a in zip(out.token_ids, out.accepted_nodes) if c in a]
        if c < 3 or len(nxt) > 500:
            _check(nxt, p[1 + c], f"after node {c}")
            accepted_any += 1
    assert accepted_any >= 4
    # The trees are accepted often (the test exercises more than the residual draw).
    assert sum(1 for a in out.accepted_nodes if len(a) == 2) > N // 10


def test_statistical_check_detects_a_wrong_residual(monkeypatch) -> None:
    """Resampling from p instead of norm(max(p - q, 0)) after a rejection must fail."""
    import ember.spec.tree_rejection as tr
    monkeypatch.setattr(tr, "_renorm", lambda x, fallback: fallback)
    p, q = _dists(2)
    trees = _trees("without-replacement", q, N)
    torch.manual_seed(5)
    out = tr.tree_rejection_sample(p[None].expand(N, 10, V), trees, q[None].expand(N, 10, V), [None] * N)
    counts = torch.bincount(torch.tensor([t[0] for t in out.token_ids]), minlength=V).double()
    assert chi2_pvalue(counts, p[0]) < 1e-4


def test_a_chain_verifies_like_the_chain_verifier() -> None:
    """The same chain and q through both verifiers: the same output distribution."""
    from ember.spec.rejection import rejection_sample
    p, q = _dists(4)
    n = 20_000
    g = torch.Generator().manual_seed(1)
    d0 = torch.multinomial(q[0], n, replacement=True, generator=g)
    d1 = torch.multinomial(q[1], n, replacement=True, generator=g)
    chain = rejection_sample(p[None, :3].expand(n, 3, V), torch.stack([d0, d1], 1), [2] * n,
                             q[None, :2].expand(n, 2, V), [None] * n)
    trees = [DraftTree.chain([a, b]) for a, b in zip(d0.tolist(), d1.tolist())]
    tree = tree_rejection_sample(p[None, :3].expand(n, 3, V), trees, q[None, :3].expand(n, 3, V),
                                 [None] * n)
    for j in range(2):
        a = torch.bincount(torch.tensor([t[j] for t in chain.token_ids if len(t) > j]), minlength=V)
        b = torch.bincount(torch.tensor([t[j] for t in tree.token_ids if len(t) > j]), minlength=V)
        assert abs(int(a.sum()) - int(b.sum())) < 5 * n ** 0.5
        _check([t[j] for t in tree.token_ids if len(t) > j], p[j], f"position {j}")
    mean = lambda o: sum(o.num_accepted) / n
    assert abs(mean(chain) - mean(tree)) < 0.03
