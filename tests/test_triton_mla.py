"""The Triton MLA decode kernel against `mla_decode_ref` at tiny shapes: on the CPU through
Triton's interpreter (TRITON_INTERPRET=1), on a GPU compiled. bench/mla_gpu.py checks real
shapes (R = 512, P = 64, 16 and 128 heads) on a GPU.

Run this file on its own on the CPU: the interpreter must be switched on before triton is
first imported (see _triton_interpret.py).
"""
from __future__ import annotations

import pytest
import torch

from _triton_interpret import DEVICE  # noqa: F401  (sets TRITON_INTERPRET on the CPU first)

from ember.attention import triton_mla as mla  # noqa: E402
from ember.attention.mla_ref import mla_decode_ref, write_latent_cache  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")

# The interpreter rounds fp32 -> bf16 by truncation, hence bf16's looser bound.
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}
BLOCK_SIZE = 16
# A padded row (0), one token, both sides of a block (16) and of a 32-token tile, several
# blocks with a ragged tail.
LENS = [0, 1, 15, 17, 32, 33, 75]


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert torch.isfinite(out).all(), "non-finite or unwritten (NaN-poisoned) output"
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


class LatentBatch:
    """Sequences of the given lengths in a paged latent cache: blocks shuffled over a pool
    with spare blocks, random stale values in every unused slot, and q_nope / q_rope as
    strided views of one [B, H, R + P] projection (as the model produces them)."""

    def __init__(self, lens: list[int], heads: int, rank: int, rope: int, dtype: torch.dtype,
                 seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.lens = lens
        nblocks = [-(-n // BLOCK_SIZE) for n in lens]
        pool = sum(nblocks) + 3
        perm = torch.randperm(pool, generator=g)
        # One spare column: the kernel must stop at each sequence's own length.
        self.block_tables = torch.zeros((len(lens), max(nblocks) + 1), dtype=torch.int32)
        used = 0
        for i, nb in enumerate(nblocks):
            self.block_tables[i, :nb] = perm[used:used + nb].int()
            used += nb
        self.cache = torch.randn((pool, BLOCK_SIZE, rank + rope), generator=g).to(dtype)
        # Overwrite the live slots through the layout's own writer (as the engine will).
        slots = torch.cat([self.block_tables[i].long()[torch.arange(n) // BLOCK_SIZE] * BLOCK_SIZE
                           + torch.arange(n) % BLOCK_SIZE for i, n in enumerate(lens)])
        t = slots.numel()
        write_latent_cache(self.cache, torch.randn((t, rank), generator=g),
                           torch.randn((t, rope), generator=g), slots)
        q = torch.randn((len(lens), heads, rank + rope), generator=g).to(dtype)
        self.q_nope, self.q_rope = q[..., :rank], q[..., rank:]
        for name in ("block_tables", "cache", "q_nope", "q_rope"):
            setattr(self, name, getattr(self, name).to(DEVICE))
        self.seq_lens = torch.tensor(lens, dtype=torch.int32, device=DEVICE)
        self.scale = (rank + rope) ** -0.5

    def ref(self) -> torch.Tensor:
        return mla_decode_ref(self.q_nope, self.q_rope, self.cache, self.block_tables,
                              self.seq_lens, self.scale)

    def run(self, num_splits: int, config: mla.MlaKernelConfig | None = None) -> torch.Tensor:
        out = torch.full_like(self.q_nope, float("nan"))
        got = mla.mla_decode(self.q_nope, self.q_rope, self.cache, self.block_tables,
                             self.seq_lens, self.scale, out=out, num_splits=num_splits,
                             config=config)
        assert got is out
        return out


# (heads, R, P): one head, a few, a full 16-head tile.
SHAPES = [(1, 64, 16), (4, 128, 32), (16, 64, 32)]


@pytest.mark.parametrize("heads,rank,rope", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mla_decode_matches_reference(heads, rank, rope, dtype):
    b = LatentBatch(LENS, heads, rank, rope, dtype, seed=heads + rank)
    ref = b.ref()
    # 1 split (direct write); 2 (splits of unequal fill); 4 (more splits than the short
    # sequences have tiles: empty splits must weigh nothing).
    for splits in (1, 2, 4):
        out = b.run(splits)
        assert rel_err(out, ref) < TOL[dtype], f"splits={splits}"
        assert torch.equal(out[0], torch.zeros_like(out[0])), "a length-0 row must give zeros"


def test_mla_decode_several_head_tiles_and_small_tiles():
    # 40 heads in tiles of 16 (the last one partial), 16-token KV tiles (= one block each).
    b = LatentBatch(LENS, 40, 64, 16, torch.float32, seed=7)
    ref = b.ref()
    cfg = mla.MlaKernelConfig(block_h=16, block_n=16, num_warps=4, num_stages=1)
    for splits in (1, 3):
        assert rel_err(b.run(splits, cfg), ref) < TOL[torch.float32], f"splits={splits}"


def test_mla_decode_reads_the_latent_through_the_block_table():
    # Changing the rope key of one cached token changes only its sequence's output, and the
    # result still matches the reference (scores use pe; the output uses c).
    b = LatentBatch([20, 20], 4, 64, 16, torch.float32, seed=8)
    before = b.run(1)
    blk = b.block_tables[1, 1].item()
    b.cache[blk, 2, 64:] += 3.0  # sequence 1, position 18
    after = b.run(1)
    assert torch.equal(before[0], after[0])
    assert not torch.allclose(before[1], after[1])
    assert rel_err(after, b.ref()) < TOL[torch.float32]
    # Defaults: the split count from the block table's width, the config from the heads.
    auto = mla.mla_decode(b.q_nope, b.q_rope, b.cache, b.block_tables, b.seq_lens, b.scale)
    assert rel_err(auto, b.ref()) < TOL[torch.float32]


def test_mla_decode_rejects_shapes_it_does_not_handle():
    b = LatentBatch([5], 2, 64, 16, torch.float32)
    with pytest.raises(AssertionError, match="power of two"):
        mla.mla_decode(b.q_nope[..., :48], b.q_rope, b.cache[..., 16:], b.block_tables,
                       b.seq_lens, b.scale, num_splits=1)


def test_choose_num_splits():
    # Batch 1 at 32k with 16 heads (one head tile) must fill a 132-SM GPU with splits alone.
    assert mla.choose_num_splits(1, 16, 32768, 132) >= 100
    # 128 heads take several tiles, which share the work: fewer splits for the same fill.
    assert mla.choose_num_splits(1, 128, 32768, 132) < mla.choose_num_splits(1, 16, 32768, 132)
    # Large batches need no split; short contexts are not cut into slivers.
    assert mla.choose_num_splits(256, 16, 32768, 132) <= 3
    assert mla.choose_num_splits(1, 16, 200, 132) == 1
    assert mla.choose_num_splits(1, 16, 1024, 132) <= 1024 // 256
    assert mla.choose_num_splits(1, 16, 10 ** 7, 132) == mla.MAX_SPLITS
