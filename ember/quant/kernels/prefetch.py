"""Software prefetch into L2 for the weight-streaming GEMVs.

A batch-1 GEMV keeps its next weight tile in flight in registers while it decodes the
current one; under load a DRAM round trip can outlast one tile's decode, and then the
warps stall. Asking the L2 for tiles further ahead (`prefetch.global.L2`, one 128-byte
line per element, no register held) keeps more bytes in flight, so the register loads
that follow find their lines in L2. A hint: results are the same with or without it.
"""
from __future__ import annotations

import os

import triton
import triton.language as tl


def with_ahead(configs, width: int) -> list[tuple]:
    """The tile configs plus, for each prefetch distance in EMBER_GEMV_AHEAD (e.g. "1 2"),
    a copy of each with that AHEAD as field `width` (shorter configs padded with zeros)."""
    out = [tuple(c) for c in configs]
    for a in map(int, os.environ.get("EMBER_GEMV_AHEAD", "").split()):
        out += [tuple(c) + (0,) * (width - len(c)) + (a,) for c in configs]
    return out

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
def row_lines(w_ptr, n_safe, stride_wn, word, WORDS_PER_ROW: tl.constexpr):
    """[BN, LINES] addresses of the 128-byte lines in WORDS_PER_ROW int32 words of each row
    n_safe [BN] (row stride stride_wn words), from word `word` on."""
    LINES: tl.constexpr = (WORDS_PER_ROW + 31) // 32
    return w_ptr + n_safe[:, None] * stride_wn + (word + 32 * tl.arange(0, LINES))[None, :]
