"""Bulk L2 prefetch of a decode GEMV's weights while the kernel before it still runs.

Why: at batch 1 a GEMV streams its weights once, and the small ones finish in a few
microseconds (an FP8 o_proj of Llama-8B, 17 MB, in ~6.6 us on the H200), of which the
first DRAM round trips and the ramp to full bandwidth are a fixed cost. Launched early
under PDL (ember.layers.pdl), a GEMV's programs are resident while the kernel before it
(attention, a norm) runs and leaves HBM mostly idle. Before its PDL wait each program
asks the L2 for its whole weight slice, one `cp.async.bulk.prefetch.L2` per row (the TMA
engine fetches; no registers are held), so the loads after the wait find the L2 filling
or filled. Weights are never written by an earlier kernel, so reading them early is safe.

The switch is `EMBER_L2_PREFETCH` (default on, see `l2_prefetch_enabled`); it needs PDL
(without it nothing runs early) and is never used by the CPU interpreter (no PTX there).
Prefetching is a hint: a kernel computes the same with it or without it.

One element per row goes to `inline_asm_elementwise`; a tensor of fewer rows than the
program has threads is replicated across threads, so only the thread whose index equals
the row's (modulo the thread count) issues it (checked on the GPU by
tests/test_l2_prefetch.py, which runs the same predicate with a counting store).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ember.layers.pdl import pdl_enabled

# $1 address (16-byte aligned), $2 bytes (a multiple of 16; 0: nothing), $3 the thread
# index that issues it; $0 a dummy result (inline asm must return one).
_ISSUE_ONCE = """{{
.reg .pred %p<3>;
.reg .b32 %t;
mov.u32 %t, %tid.x;
setp.eq.u32 %p0, %t, $3;
setp.ne.u32 %p1, $2, 0;
and.pred %p2, %p0, %p1;
@%p2 {op};
mov.u32 $0, 0;
}}"""
PREFETCH_ASM = tl.constexpr(_ISSUE_ONCE.format(op="cp.async.bulk.prefetch.L2.global [$1], $2"))
# The same predicate with a counting store (the GPU test): adds 1 at the address.
COUNT_ASM = tl.constexpr(_ISSUE_ONCE.format(op="red.global.add.u32 [$1], 1"))


@triton.jit
def issue_once_per_row(asm: tl.constexpr, row0, row_stride, row_offset, nbytes, valid_rows,
                       ROWS: tl.constexpr, THREADS: tl.constexpr):
    """Run `asm` once for each row r < ROWS: address row0 + r * row_stride + row_offset (in
    row0's elements), size operand nbytes for r < valid_rows, else 0 (skipped)."""
    r = tl.arange(0, ROWS)
    addr = (row0 + r.to(tl.int64) * row_stride + row_offset).to(tl.int64, bitcast=True)
    size = tl.where(r < valid_rows, nbytes, 0).to(tl.int32)
    tl.inline_asm_elementwise(asm, "=r,l,r,r", [addr, size, r % THREADS], dtype=tl.int32,
                              is_pure=False, pack=1)


@triton.jit
def prefetch_rows_l2(row0, row_stride, row_offset, nbytes, valid_rows, ROWS: tl.constexpr,
                     THREADS: tl.constexpr):
    """Fetch into L2 nbytes bytes (a multiple of 16, from a 16-byte aligned address) of each
    row r < min(ROWS, valid_rows): row r starts at row0 + r * row_stride + row_offset (in
    row0's elements). THREADS: the program's thread count (32 * num_warps)."""
    issue_once_per_row(PREFETCH_ASM, row0, row_stride, row_offset, nbytes, valid_rows, ROWS, THREADS)


def l2_prefetch_enabled(t: torch.Tensor, *aligned: int) -> bool:
    """True when the kernels on t's device should prefetch their weights into L2: PDL on,
    `EMBER_L2_PREFETCH` not "0", and every value in `aligned` (byte addresses, row strides
    and row-slice lengths) a multiple of 16, as the bulk prefetch requires."""
    if os.environ.get("EMBER_L2_PREFETCH", "1") == "0" or not pdl_enabled(t):
        return False
    return all(v % 16 == 0 for v in aligned)


def threads(num_warps: int) -> int:
    return 32 * num_warps

