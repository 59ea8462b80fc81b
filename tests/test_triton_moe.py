"""The Triton grouped-GEMM MoE experts against the per-token torch reference: on the CPU
through Triton's interpreter, on a GPU compiled. Includes experts with no tokens, ragged
N and K tiles, and the torch alignment step on its own."""
from __future__ import annotations

import pytest
import torch
from _triton_interpret import DEVICE

from ember.layers.moe_experts import ReferenceExperts
from ember.layers.triton_moe import MoEGemmConfig, TritonExperts, align_by_expert

pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")

# H and I off the tile sizes, so the masks on N and K are exercised.
H, I = 48, 24
SMALL = MoEGemmConfig(block_m=16, block_n=32, block_k=32)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def case(t: int, k: int, e: int, seed: int):
    g = gen(seed)
    w13 = torch.randn(e, 2 * I, H, generator=g) * 0.2
    w2 = torch.randn(e, H, I, generator=g) * 0.2
    x = torch.randn(t, H, generator=g)
    ids = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(t)])
    weights = torch.rand(t, k, generator=g)
    return x, w13, w2, weights, ids


def test_align_by_expert():
    ids = torch.tensor([[3, 0], [3, 1], [0, 3]])       # expert 2 gets nothing
    pairs, block_expert, num_padded = align_by_expert(ids, num_experts=4, block_m=2)
    m = ids.numel()
    assert num_padded.item() == 8                      # experts 0, 1, 3: 2 + 1 + 3 pairs -> 2 + 2 + 4
    used = pairs[:8].tolist()
    # Expert 0: pairs 1 and 4; expert 1: pair 3 and padding; expert 3: pairs 0, 2, 5 over two tiles.
    assert used == [1, 4, 3, m, 0, 2, 5, m]
    assert block_expert[:4].tolist() == [0, 1, 3, 3]
    # The bound on tiles holds the worst case; every pair appears exactly once.
    assert sorted(p for p in pairs.tolist() if p < m) == list(range(m))


def test_align_by_expert_every_pair_in_its_experts_tiles():
    g = gen(0)
    for t, k, e, bm in [(1, 6, 64, 16), (37, 4, 8, 16), (100, 2, 3, 32)]:
        ids = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(t)])
        pairs, block_expert, num_padded = align_by_expert(ids, e, bm)
        flat = ids.reshape(-1)
        counts = torch.bincount(flat, minlength=e)
        assert num_padded.item() == int(((counts + bm - 1) // bm * bm).sum())
        seen = []
        for b in range(num_padded.item() // bm):
            tile = [p for p in pairs[b * bm:(b + 1) * bm].tolist() if p < flat.numel()]
            assert tile and all(flat[p] == block_expert[b] for p in tile)
            seen += tile
        assert sorted(seen) == list(range(flat.numel()))


@pytest.mark.parametrize("t,k,e", [(1, 1, 4), (1, 6, 16), (5, 2, 8), (40, 4, 8)])
def test_triton_experts_equal_reference(t, k, e):
    x, w13, w2, weights, ids = case(t, k, e, seed=t * 10 + k)
    ref = ReferenceExperts().forward(x, w13, w2, weights, ids)
    dev = [a.to(DEVICE) for a in (x, w13, w2, weights, ids)]
    out = TritonExperts(SMALL).forward(*dev)
    torch.testing.assert_close(out.cpu(), ref, rtol=1e-5, atol=1e-5)
    assert ref.abs().max() > 0.1


def test_triton_experts_one_expert_takes_every_token():
    """Two M tiles of one expert, the rest empty."""
    x, w13, w2, weights, _ = case(20, 2, 6, seed=3)
    ids = torch.tensor([[5, 1]] * 20)
    ref = ReferenceExperts().forward(x, w13, w2, weights, ids)
    out = TritonExperts(SMALL).forward(*(a.to(DEVICE) for a in (x, w13, w2, weights, ids)))
    torch.testing.assert_close(out.cpu(), ref, rtol=1e-5, atol=1e-5)


def test_triton_experts_default_config():
    x, w13, w2, weights, ids = case(3, 2, 4, seed=5)
    ref = ReferenceExperts().forward(x, w13, w2, weights, ids)
    out = TritonExperts().forward(*(a.to(DEVICE) for a in (x, w13, w2, weights, ids)))
    torch.testing.assert_close(out.cpu(), ref, rtol=1e-5, atol=1e-5)


def test_triton_experts_bf16():
    """bf16 weights and activations: within a few bf16 steps of the fp32 reference (the kernel
    rounds once per GEMM; the interpreter truncates instead of rounding)."""
    x, w13, w2, weights, ids = case(9, 3, 8, seed=7)
    ref = ReferenceExperts().forward(x, w13, w2, weights, ids)
    args = [a.to(DEVICE) for a in (x.bfloat16(), w13.bfloat16(), w2.bfloat16(), weights, ids)]
    out = TritonExperts(SMALL).forward(*args)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float().cpu(), ref, rtol=3e-2, atol=3e-2)
