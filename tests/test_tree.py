"""Draft trees: the EAGLE-2 expansion, the ancestor mask, and tree attention over the paged
cache (the reference and the torch backend's masked path) against a dense computation."""
from __future__ import annotations

import math

import pytest
import torch

from ember.attention.torch_ref import TorchAttentionBackend, write_kv
from ember.engine.forward_batch import ForwardBatch
from ember.spec.tree import (DraftTree, TreeBuilder, ancestor_mask, build_dynamic_tree, top_children,
                             tree_attention_ref, with_root_row)


def test_ancestor_mask_and_paths() -> None:
    #        root
    #      0      1
    #    2   3    4
    #    5
    t = DraftTree([10, 11, 12, 13, 14, 15], [-1, -1, 0, 0, 1, 2], [1, 1, 2, 2, 2, 3], [0.0] * 6)
    m = ancestor_mask(t.parents)
    expect = {0: {0}, 1: {1}, 2: {0, 2}, 3: {0, 3}, 4: {1, 4}, 5: {0, 2, 5}}
    for i, anc in expect.items():
        assert set(torch.nonzero(m[i]).flatten().tolist()) == anc
    assert t.children() == [[0, 1], [2, 3], [4], [5], [], [], []]
    assert t.path(5) == [0, 2, 5]
    r = with_root_row(m)
    assert r[0].tolist() == [True] + [False] * 6 and r[:, 0].all()
    c = DraftTree.chain([4, 5, 6])
    assert torch.equal(ancestor_mask(c.parents), torch.ones(3, 3, dtype=torch.bool).tril())


def _logq(seed: int, vocab: int = 12) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.log_softmax(torch.randn(vocab, generator=g) * 2, -1)


def test_dynamic_tree_follows_eagle2() -> None:
    """Each depth feeds the top_k candidates of the last level by cumulative log q; the
    tree keeps the budget best candidates overall, which is ancestor-closed."""
    fed_calls = []

    def expand(fed, cand):
        fed_calls.append([(cand.tokens[i], round(cand.scores[i], 6)) for i in fed])
        # The children's distribution depends on the fed node's token and depth.
        return torch.stack([_logq(100 * cand.depths[i] + cand.tokens[i]) for i in fed])

    root = _logq(0)
    tree, chosen = build_dynamic_tree(root, expand, depth=4, top_k=3, budget=10)
    assert tree.num_nodes == 10 and tree.max_depth <= 4
    assert len(fed_calls) == 3 and all(len(f) == 3 for f in fed_calls)
    # Depth 2 feeds exactly the root's top 3 children.
    assert sorted(t for t, _ in fed_calls[0]) == sorted(root.topk(3).indices.tolist())
    for i, p in enumerate(tree.parents):
        assert p < i
        assert tree.depths[i] == (1 if p < 0 else tree.depths[p] + 1)
        expect = _logq(100 * tree.depths[p] + tree.tokens[p]) if p >= 0 else root
        prev = tree.scores[p] if p >= 0 else 0.0
        assert tree.scores[i] == pytest.approx(prev + expect[tree.tokens[i]].item(), abs=1e-5)
    # Siblings keep the drafter's order (most likely first).
    for kids in tree.children():
        scores = [tree.scores[c] for c in kids]
        assert scores == sorted(scores, reverse=True)


def test_dynamic_tree_budget_is_global_best() -> None:
    """Brute force: with the same expansion rule, every candidate not chosen scores no
    better than every chosen one."""
    seen = {}

    def expand(fed, cand):
        for i in range(len(cand.tokens)):
            seen[i] = cand.scores[i]
        return torch.stack([_logq(7 * cand.tokens[i] + cand.depths[i]) for i in fed])

    tree, chosen = build_dynamic_tree(_logq(3), expand, depth=3, top_k=4, budget=7)
    assert len(set(chosen)) == 7
    lowest_chosen = min(tree.scores)
    best_left_out = max((s for i, s in seen.items() if i not in chosen), default=-math.inf)
    assert best_left_out <= lowest_chosen + 1e-9


def test_dynamic_tree_depth_one_and_tiny_vocab() -> None:
    tree, _ = build_dynamic_tree(torch.log(torch.tensor([0.5, 0.5, 0.0])), lambda f, c: None,
                                 depth=1, top_k=3, budget=5)
    assert tree.tokens == [0, 1] and tree.parents == [-1, -1]   # -inf tokens are never drafted


class PerNodeTreeBuilder:
    """The reference: TreeBuilder as it was before batching, each node's children a 1-D topk
    of that node's own log q row, read back one node at a time."""

    def __init__(self, root_logq: torch.Tensor, top_k: int) -> None:   # root_logq: [vocab]
        self.top_k = top_k
        self.cand = DraftTree([], [], [], [])
        self.level = self._add_children(-1, 0.0, root_logq)

    def _add_children(self, parent: int, parent_score: float, logq: torch.Tensor) -> list[int]:
        c = self.cand
        vals, ids = logq.float().topk(min(self.top_k, logq.numel()))
        added = []
        for v, t in zip(vals.tolist(), ids.tolist()):
            if v == float("-inf"):
                break
            c.tokens.append(t)
            c.parents.append(parent)
            c.depths.append(1 if parent < 0 else c.depths[parent] + 1)
            c.scores.append(parent_score + v)
            added.append(len(c.tokens) - 1)
        return added

    def to_feed(self) -> list[int]:
        s = self.cand.scores
        return sorted(sorted(self.level, key=lambda i: (-s[i], i))[:self.top_k])

    def expand(self, fed: list[int], logq: torch.Tensor) -> None:   # logq: [len(fed), vocab]
        self.level = [c for row, i in enumerate(fed)
                      for c in self._add_children(i, self.cand.scores[i], logq[row])]

    def finish(self, budget: int) -> tuple[DraftTree, list[int]]:
        c = self.cand
        chosen = sorted(sorted(range(len(c.tokens)), key=lambda i: (-c.scores[i], i))[:budget])
        index = {x: j for j, x in enumerate(chosen)}
        return DraftTree([c.tokens[x] for x in chosen],
                         [-1 if c.parents[x] < 0 else index[c.parents[x]] for x in chosen],
                         [c.depths[x] for x in chosen], [c.scores[x] for x in chosen]), chosen


def _tied_logq(rows: int, vocab: int, seed: int, device: str = "cpu") -> torch.Tensor:
    """[rows, vocab] log q with many exact ties (logits in {0, 1, 2}) and impossible tokens
    (-inf), some rows with fewer possible tokens than a top_k of 3."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randint(0, 3, (rows, vocab), generator=g).float()
    logits[torch.rand(rows, vocab, generator=g) < 0.3] = float("-inf")
    logits[::7, 2:] = float("-inf")   # every 7th row: two possible tokens at most
    logits[::7, :2] = 0.0
    return torch.log_softmax(logits, dim=-1).to(device)


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("vocab", [5, 300, 49152])
def test_top_children_equals_a_topk_per_row(device: str, vocab: int) -> None:
    """One topk over many rows (of several tensors) and one copy back gives each row exactly
    its own 1-D topk: values, ids and the order among ties."""
    parts = [_tied_logq(n, vocab, seed, device) for n, seed in [(1, 0), (23, 1), (9, 2)]]
    got = top_children(4, *parts)
    rows = torch.cat(parts)
    assert len(got) == rows.shape[0]
    for row, kids in zip(rows, got):
        vals, ids = row.topk(min(4, vocab))
        assert kids == list(zip(vals.tolist(), ids.tolist()))
    assert any(len({v for v, _ in kids}) < len(kids) for kids in got)   # ties were there


def test_top_children_of_a_reduced_vocabulary_map_columns_to_tokens() -> None:
    """token_ids: the rows score a drafter's reduced vocabulary (column j is token
    token_ids[j], increasing); the children are those of the same log q spread over the
    full vocabulary (the missing tokens at -inf)."""
    import numpy as np
    g = torch.Generator().manual_seed(3)
    token_ids = np.sort(np.random.default_rng(3).choice(1000, 64, replace=False))
    logq = torch.log_softmax(torch.randn(7, 64, generator=g), -1)
    full = torch.full((7, 1000), float("-inf")).index_copy_(1, torch.from_numpy(token_ids), logq)
    assert top_children(5, logq, token_ids=token_ids) == top_children(5, full)
    assert top_children(5, logq) != top_children(5, full)   # the columns alone are not the tokens


def _node_row(request: int, cand: DraftTree, node: int, table_rows: int) -> int:
    """The 'drafter': which row of a table of tied log q scores node's children."""
    return (31 * request + 7 * cand.tokens[node] + 13 * cand.depths[node] + node) % table_rows


@pytest.mark.parametrize("seed", range(4))
def test_batched_expansion_equals_the_per_node_reference(seed: int) -> None:
    """The proposers' way (every request's fed nodes of a depth scored by one top_children;
    P-EAGLE: one row per depth, shared by the depth's fed nodes) against the per-node
    reference on tied log-probs: the same candidates, trees and chosen nodes, bit for bit."""
    top_k, vocab = 3, 40
    table = _tied_logq(64, vocab, 100 + seed)
    g = torch.Generator().manual_seed(seed)
    depths = torch.randint(1, 6, (6,), generator=g).tolist()
    budgets = [d + int(torch.randint(0, 12, (1,), generator=g)) for d in depths]
    roots = table[torch.randint(0, 64, (len(depths),), generator=g)]
    for product in (False, True):   # EAGLE's per-node rows, P-EAGLE's per-depth rows
        # P-EAGLE: request i's depth l + 2 reads row per_depth[i] + l of the table.
        per_depth = torch.randint(0, 60, (len(depths),), generator=g).tolist()
        ref = [PerNodeTreeBuilder(roots[i], top_k) for i in range(len(depths))]
        for i, r in enumerate(ref):
            for level in range(2, depths[i] + 1):
                fed = r.to_feed()
                if not fed:
                    break
                rows = [per_depth[i] + level - 2 if product else _node_row(i, r.cand, c, 64) for c in fed]
                r.expand(fed, table[rows])
        new = [TreeBuilder(kids, top_k) for kids in top_children(top_k, roots)]
        for level in range(2, max(depths) + 1):
            who = [(i, b.to_feed()) for i, b in enumerate(new) if depths[i] >= level]
            who = [(i, fed) for i, fed in who if fed]
            if not who:
                break
            if product:
                kids = top_children(top_k, table[[per_depth[i] + level - 2 for i, _ in who]])
                for (i, fed), k in zip(who, kids):
                    new[i].expand(fed, [k] * len(fed))
            else:
                kids = top_children(top_k, table[[_node_row(i, new[i].cand, c, 64) for i, fed in who for c in fed]])
                at = 0
                for i, fed in who:
                    new[i].expand(fed, kids[at:at + len(fed)])
                    at += len(fed)
        for i, (r, b) in enumerate(zip(ref, new)):
            assert b.cand == r.cand
            assert b.finish(budgets[i]) == r.finish(budgets[i])
        assert any(len(set(b.cand.scores)) < len(b.cand.scores) for b in new)   # tied scores


def _dense_tree_attention(q, keys, values, prefix, parents, scale):
    """Each node: softmax over the prefix keys and its ancestors' keys, one node at a time."""
    n, heads, d = q.shape
    rep = heads // keys.shape[1]
    keys, values = keys.repeat_interleave(rep, 1), values.repeat_interleave(rep, 1)
    out = torch.zeros(n, heads, d)
    for i in range(n):
        idx = list(range(prefix))
        j = i
        anc = []
        while j >= 0:
            anc.append(prefix + j)
            j = parents[j]
        idx += sorted(anc)
        s = torch.einsum("hd,khd->hk", q[i], keys[idx]) * scale
        out[i] = torch.einsum("hk,khd->hd", s.softmax(-1), values[idx])
    return out


@pytest.mark.parametrize("prefix", [0, 5, 11])
def test_tree_attention_matches_dense(prefix: int) -> None:
    torch.manual_seed(prefix)
    heads, kv_heads, d, bs = 4, 2, 8, 4
    parents = [-1, -1, 0, 0, 1, 2, 2, 5]
    n = len(parents)
    seq_len = prefix + n
    nb = -(-seq_len // bs)
    cache = torch.zeros(2, 16, bs, kv_heads, d)
    table = torch.randperm(16)[:nb]
    keys, values = torch.randn(seq_len, kv_heads, d), torch.randn(seq_len, kv_heads, d)
    slots = table[torch.arange(seq_len) // bs] * bs + torch.arange(seq_len) % bs
    write_kv(cache, keys, values, slots)
    q = torch.randn(n, heads, d)
    mask = ancestor_mask(parents)
    ref = tree_attention_ref(q, cache, table, seq_len, mask, 0.3)
    dense = _dense_tree_attention(q, keys, values, prefix, parents, 0.3)
    torch.testing.assert_close(ref, dense, atol=1e-5, rtol=1e-5)

    # The torch backend's masked path: the tree is one sequence of n new tokens, written
    # through the slot mapping, after a decode sequence (which must stay causal).
    cache2 = torch.zeros_like(cache)
    write_kv(cache2, keys[:prefix], values[:prefix], slots[:prefix])
    other = torch.tensor([15])   # a 1-token decode in its own block
    fb = ForwardBatch(
        input_ids=torch.zeros(n + 1, dtype=torch.long), positions=torch.zeros(n + 1, dtype=torch.long),
        slot_mapping=torch.cat([other * bs, slots[prefix:]]), query_start_loc=[0, 1, n + 1],
        seq_lens=torch.tensor([1, seq_len]), seq_lens_list=[1, seq_len],
        block_tables=torch.stack([torch.cat([other, torch.zeros(nb - 1, dtype=torch.long)]), table]),
        num_decodes=1, logits_indices=torch.tensor([0, n]), block_size=bs,
        attn_masks=[None, mask])
    backend = TorchAttentionBackend()
    backend.prepare(fb)
    k_new = torch.cat([torch.randn(1, kv_heads, d), keys[prefix:]])
    v_new = torch.cat([torch.randn(1, kv_heads, d), values[prefix:]])
    out = backend.forward(torch.cat([torch.randn(1, heads, d), q]), k_new, v_new, cache2, fb, 0.3)
    torch.testing.assert_close(out[1:], dense, atol=1e-5, rtol=1e-5)


def test_chain_tree_attention_is_causal_prefill() -> None:
    torch.manual_seed(0)
    cache = torch.randn(2, 8, 4, 1, 8)
    table = torch.tensor([3, 1, 6])
    q = torch.randn(5, 2, 8)
    chain = ancestor_mask(DraftTree.chain([0] * 5).parents)
    from ember.attention.torch_ref import paged_attention_ref
    ref = paged_attention_ref(q, cache, table[None], [11], [0, 5], 0.5)
    torch.testing.assert_close(tree_attention_ref(q, cache, table, 11, chain, 0.5), ref)


def test_tree_attention_level_by_level() -> None:
    """Drafting a tree a level per forward: the level's queries see the prefix and, among
    the earlier levels' slots (a mask over the last w > n slots), only their ancestors."""
    torch.manual_seed(1)
    heads, kv_heads, d, bs, prefix = 2, 1, 8, 4, 6
    parents = [-1, -1, 0, 0, 1]          # level 1: nodes 0, 1; level 2: nodes 2, 3, 4
    n = len(parents)
    seq_len = prefix + n
    table = torch.tensor([4, 0, 7])
    keys, values = torch.randn(seq_len, kv_heads, d), torch.randn(seq_len, kv_heads, d)
    q = torch.randn(n, heads, d)
    dense = _dense_tree_attention(q, keys, values, prefix, parents, 0.4)
    cache = torch.zeros(2, 8, bs, kv_heads, d)
    slots = table[torch.arange(seq_len) // bs] * bs + torch.arange(seq_len) % bs
    full = ancestor_mask(parents)
    backend = TorchAttentionBackend()
    write_kv(cache, keys[:prefix], values[:prefix], slots[:prefix])
    outs = []
    for lo, hi in [(0, 2), (2, 5)]:
        m = hi - lo
        fb = ForwardBatch(
            input_ids=torch.zeros(m, dtype=torch.long), positions=torch.zeros(m, dtype=torch.long),
            slot_mapping=slots[prefix + lo:prefix + hi], query_start_loc=[0, m],
            seq_lens=torch.tensor([prefix + hi]), seq_lens_list=[prefix + hi], block_tables=table[None],
            num_decodes=0, logits_indices=torch.tensor([m - 1]), block_size=bs,
            attn_masks=[full[lo:hi, :hi]])
        backend.prepare(fb)
        outs.append(backend.forward(q[lo:hi], keys[prefix + lo:prefix + hi], values[prefix + lo:prefix + hi],
                                    cache, fb, 0.4))
        torch.testing.assert_close(tree_attention_ref(q[lo:hi], cache, table, prefix + hi, full[lo:hi, :hi], 0.4),
                                   dense[lo:hi], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.cat(outs), dense, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("depth,top_k,budget", [(3, 3, 24), (5, 3, 24), (2, 4, 30), (4, 2, 9), (1, 3, 5)])
def test_budget_never_exceeds_what_the_expansion_fills(depth: int, top_k: int, budget: int) -> None:
    """budget_for(k) is the size of the tree a depth-k expansion actually builds (the
    verify step's captured shape is sized from it): a budget beyond top_k + (k - 1) top_k^2
    candidates is cut to that, the rest is filled exactly."""
    from ember.spec.tree import TreeShape
    g = torch.Generator().manual_seed(depth * 100 + budget)
    vocab = 50
    expand = lambda fed, cand: torch.log_softmax(torch.randn(len(fed), vocab, generator=g), -1)  # noqa: E731
    for level_slots in (False, True):
        shape = TreeShape(depth=depth, top_k=top_k, budget=max(budget, depth), level_slots=level_slots)
        for k in range(1, depth + 1):
            tree, _ = build_dynamic_tree(torch.log_softmax(torch.randn(vocab, generator=g), -1), expand,
                                         k, top_k, shape.budget_for(k))
            assert shape.budget_for(k) <= shape.max_nodes(k)
            assert len(tree.tokens) == shape.budget_for(k), (k, shape)
    assert TreeShape(depth=3, top_k=3, budget=24, level_slots=False).budget_for(3) == 21   # 3 + 2 * 9
    assert TreeShape(depth=5, top_k=3, budget=24, level_slots=False).budget_for(5) == 24


@pytest.mark.parametrize("kind", ["paged", "latent"])
def test_slot_copy_over_the_stacked_layers_equals_one_per_layer(kind: str) -> None:
    """Layers of one spec get views of one [L, ...] allocation (kv_stack finds it), and a
    slot copy over the stack equals a copy in each layer; layers of different specs get
    tensors of their own (no stack)."""
    from types import SimpleNamespace

    from ember.cache.kv_spec import LatentKVSpec, PagedKVSpec, allocate_kv_caches, kv_stack
    spec = (PagedKVSpec(num_kv_heads=2, head_dim=4, dtype=torch.float32) if kind == "paged"
            else LatentKVSpec(kv_lora_rank=6, rope_dim=2, dtype=torch.float32))
    layers = [SimpleNamespace(kv_cache=None, kv_cache_spec=lambda dtype, s=spec: s) for _ in range(3)]
    caches = allocate_kv_caches(layers, num_blocks=5, block_size=4, dtype=torch.float32, device=torch.device("cpu"))
    stack = kv_stack(caches)
    assert stack is not None and stack.shape == (3, *caches[0].shape)
    assert all(layer.kv_cache is c for layer, c in zip(layers, caches))
    g = torch.Generator().manual_seed(0)
    for c in caches:
        c.copy_(torch.randn(c.shape, generator=g))
    before = [c.clone() for c in caches]
    ref = [c.clone() for c in caches]
    src, dst = torch.tensor([7, 9, 12, 3]), torch.tensor([5, 6, 7, 8])   # a destination is an earlier source
    for r in ref:
        spec.copy_slots(r, src, dst)
    spec.copy_slots(stack, src, dst)
    assert all(torch.equal(c, r) for c, r in zip(caches, ref))
    # What a slot copy means, written out: each destination holds its source's entry as it
    # was before the copy (every source read first); the other slots are unchanged.
    slots = (lambda c: c.view(2, 20, -1).transpose(0, 1)) if kind == "paged" else (lambda c: c.view(20, -1))
    others = torch.tensor([i for i in range(20) if i not in dst.tolist()])
    for c, b in zip(caches, before):
        assert torch.equal(slots(c)[dst], slots(b)[src])
        assert torch.equal(slots(c)[others], slots(b)[others])
    other = PagedKVSpec(num_kv_heads=1, head_dim=4, dtype=torch.float32)
    mixed = [SimpleNamespace(kv_cache=None, kv_cache_spec=lambda dtype, s=s: s) for s in (spec, other)]
    assert kv_stack(allocate_kv_caches(mixed, 5, 4, torch.float32, torch.device("cpu"))) is None
