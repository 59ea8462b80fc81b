"""Software prefetch into L2 for the FP8 weight-streaming GEMV.

A batch-1 GEMV keeps its next weight tile in flight in registers while it decodes the
current one; under load a DRAM round trip can outlast one tile's decode, and then the
warps stall. Asking the L2 for tiles further ahead (`prefetch.global.L2`, one 128-byte
line per element, no register held) keeps more bytes in flight, so the register loads
that follow find their lines in L2. A hint: results are the same with or without it.

Measured per tile at one row of the Llama-8B shapes on the H200 (AHEAD 0 / 1, us; raw
bench/results/h200_2026-11-30n_ahead_configs.txt): FP8 qkv 8.4 / 7.9, o 6.7 / 6.3, down
18.0 / 17.8, gate_up 32.3 / 33.4 (kept without). The INT4 decoder GEMV lost on every shape
(gate_up 23.4 / 28.5), so it has no prefetch.
"""
from __future__ import annotations

import triton
import triton.language as tl

# $1 the address, $2 nonzero to issue; $0 a dummy result (inline asm returns one).
_PREFETCH_L2_ASM = tl.constexpr("""{
.reg .pred p;
setp.ne.u32 p, $2, 0;
@p prefetch.global.L2 [$1];
mov.u32 $0, 0;
}""")


@triton.jit
def prefetch_l2(ptrs, live, NATIVE: tl.constexpr):
    """Hint the L2 to fetch the line holding each address of `ptrs` (any shape) where
    `live`; nothing on the CPU interpreter (NATIVE False)."""
    if NATIVE:
        tl.inline_asm_elementwise(_PREFETCH_L2_ASM, "=r,l,r",
                                  [ptrs.to(tl.int64, bitcast=True), live.to(tl.int32)],
                                  dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def prefetch_tile_l2(w_ptr, n_safe, stride_wn, k0, end, BLOCK_K: tl.constexpr, NATIVE: tl.constexpr):
    """Prefetch the FP8 weight tile at column k0 (BLOCK_K one-byte columns = BLOCK_K / 4
    int32 words of each row n_safe [BN], row stride stride_wn words) into L2, one element
    per 128-byte line; nothing when k0 >= end."""
    LINES: tl.constexpr = (BLOCK_K // 4 + 31) // 32
    lines = w_ptr + n_safe[:, None] * stride_wn + (k0 // 4 + 32 * tl.arange(0, LINES))[None, :]
    prefetch_l2(lines, k0 < end, NATIVE)
