"""INT4 (AWQ/RTN) GEMV for 1-8 activation rows with the products on tensor cores: each
warp runs `mma.sync.m16n8k16` (bf16 in, fp32 accumulate) on weights decoded straight into
the MMA's register fragments, the way Marlin does, in place of the CUDA-core FMAs of the
decoder GEMV (w4a16._decoder_gemv_kernel). A word costs its decode (prmt and lop3 per
pair, and with SUB a bf16x2 subtraction of the zero point) plus one MMA: about 18
instructions a word in the K loop (sm_90 SASS) against the decoder GEMV's 27. Measured on
the H200 (Llama-8B shapes, docs/BENCHMARKS.md): at one row it is no faster than the
decoder GEMV (both stream at ~1.5x a plain read of the words, so the instruction count
was not what held that kernel back) and the tuner picks between them per shape; at 2-8
rows it costs about what one row does, where the decoder GEMV reads the weights once per
row, and it replaced the skinny kernel there (1.4-1.6x faster per layer).

NVFP4 (NVFP4 = True) runs the same loop: the E2M1 codes are looked up into bf16 by prmt
(decode.nvfp4_ptx), multiplied by their 16-column block's E4M3 scale in bf16 (exact:
2 significant bits times 4) so the block scales ride inside A and the MMAs accumulate
straight into the output, and the per-row global scale applies once at the end. About 40
instructions a word (the lookups and signs), against the NVFP4 decoder GEMV's 44, yet
faster on the H200 at one row (gate_up 35.5 against 47.5 us) and far faster at 2-8 rows.

A form for 9-64 rows (8-row blocks of x, each word decoded once for all of them) measured
no faster than the skinny kernel at 16 rows and 2.5x slower at 64 (docs/BENCHMARKS.md,
seventeenth session) and was removed.

Fragment mapping (per warp, 16 weight rows x 128 columns a step; PTX ISA, m16n8k16 .bf16):
lane l = 4g + t holds A rows g and g + 8 at k slots {2t, 2t+1, 2t+8, 2t+9}, B column g at
the same k slots, and D rows g, g + 8 at columns 2t, 2t+1. A GEMV may number k however it
likes as long as A and B agree, so slot 2t / 2t+8 of the MMA on word u of lane t's run
means weight columns 32t + 8u + 4h + {0,1} / {2,3} (h = which of the word's two MMAs):
every lane reads 4 consecutive words of row g and of row g + 8 (16 bytes each, the
checkpoint's own [N, K / 8] layout, no repacking) and 16 consecutive bf16 pairs of x. B's
column g is activation row g (lanes past M read the last row; those D columns are never
stored), so D's column m is output row m.

The lane mapping relies on Triton giving each [32 WARPS, 4] load and the [32 WARPS]
tensors split from it the layout "warp e // 32, lane e % 32" for index e; tests on the GPU check
the results against the torch reference. Under the interpreter (CPU tests) `_mma_emulated`
computes each MMA from the lanes' fragments with plain tensor arithmetic over the warp's
32 lanes, so the indexing is tested there too.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ember.quant.kernels.decode import (E2M1_HI_0, E2M1_HI_4, E2M1_LO_0, E2M1_LO_4, NVFP4_REGS, bf16_pair,
                                        e4m3_from_bits, int4_zero_pair, native_decode, nvfp4_parts, nvfp4_ptx)
from ember.quant.kernels.prefetch import prefetch_l2
from ember.quant.kernels.splitk import finish_splits, k_range, split_buffers, store_split

STEP = 128
MAX_ROWS = 8         # B's 8 columns
STEP_COLUMNS = tl.constexpr(STEP)   # columns one warp covers per step: 4 lanes x 4 words x 8 columns

# One word pair (word u of rows g and g + 8 in lane t's run) -> two MMAs. Pairs of nibbles
# (2i, 2i + 1) become bf16x2 128 + code (prmt picks byte i of the word and of word >> 4,
# lop3 masks the nibbles and ors in 128's bits). Two ways to take the zero point off:
# - SUB: minus the zero pair (bf16x2, exact code - zero) before the MMA. Outputs $0..$3 D
#   (c0..c3); inputs $4 row g's word, $5 row g + 8's, $6 / $7 their zero pairs
#   (int4_zero_pair), $8..$11 x pairs (columns 0-1, 2-3, 4-5, 6-7 of the word), $12..$15 C.
# - ONES: the MMAs take 128 + code as it is, and two more with A all ones sum x over the
#   same k (X, the same for every row); the caller subtracts (128 + zero) X per group in
#   fp32. Products and sums are exact or fp32, so this is as accurate, and saves the 8
#   subtractions of a word pair for 2 MMAs. Outputs $0..$3 D, $4 / $5 X for columns 2t /
#   2t + 1; inputs $6 / $7 the words, $8..$11 x pairs, $12..$15 C, $16 / $17 X so far.
_MMA = "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
_PAIRS = "".join(f"""
prmt.b32 p, {{w}}, s, 0x{4 + i}{4 + i}{i}{i};
lop3.b32 {{r}}{i}, p, 0x000F000F, 0x43004300, 0xEA;{{sub{i}}}""" for i in range(4))


def _pairs(word: str, reg: str, zero: str | None) -> str:
    """PTX decoding `word` into bf16x2 registers reg0..reg3 (pairs 0-3), minus `zero` if given."""
    subs = {f"sub{i}": "" if zero is None else f"\nsub.rn.bf16x2 {reg}{i}, {reg}{i}, {zero};"
            for i in range(4)}
    return f"\nshr.u32 s, {word}, 4;" + _PAIRS.format(w=word, r=reg, **subs)


_INT4_MMA_SUB_ASM = tl.constexpr("{\n.reg .b32 s, p, g0, g1, g2, g3, h0, h1, h2, h3;"
                                 + _pairs("$4", "g", "$6") + _pairs("$5", "h", "$7") + f"""
{_MMA}{{$0, $1, $2, $3}}, {{g0, h0, g1, h1}}, {{$8, $9}}, {{$12, $13, $14, $15}};
{_MMA}{{$0, $1, $2, $3}}, {{g2, h2, g3, h3}}, {{$10, $11}}, {{$0, $1, $2, $3}};
}}""")

def _nvfp4_pairs(word: str, reg: str, scale: str) -> str:
    """PTX decoding the NVFP4 `word` into bf16x2 registers reg0..reg3 (code pairs 2i, 2i + 1,
    decode.nvfp4_ptx, tables in $16..$19), each times `scale` (a bf16x2 pair of the block
    scale: E2M1 x E4M3 is exact in bf16)."""
    return nvfp4_ptx(word, ("$16", "$17", "$18", "$19"), lambda i: f"mul.rn.bf16x2 {reg}{i}, v, {scale};")


# NVFP4 (NVFP4 = True): the words' E2M1 codes decoded and multiplied by their 16-column
# block's E4M3 scale in bf16 (exact), then the same two MMAs; the per-row global scale
# applies once at the end. Outputs $0..$3 D; inputs $4 / $5 the words of rows g / g + 8,
# $6 / $7 their block-scale pairs, $8..$11 x pairs, $12..$15 C, $16..$19 the E2M1 tables.
_NVFP4_MMA_ASM = tl.constexpr("{\n" + NVFP4_REGS + "\n.reg .b32 g0, g1, g2, g3, h0, h1, h2, h3;"
                              + _nvfp4_pairs("$4", "g", "$6") + _nvfp4_pairs("$5", "h", "$7") + f"""
{_MMA}{{$0, $1, $2, $3}}, {{g0, h0, g1, h1}}, {{$8, $9}}, {{$12, $13, $14, $15}};
{_MMA}{{$0, $1, $2, $3}}, {{g2, h2, g3, h3}}, {{$10, $11}}, {{$0, $1, $2, $3}};
}}""")
_INT4_MMA_ONES_ASM = tl.constexpr("{\n.reg .b32 s, p, g0, g1, g2, g3, h0, h1, h2, h3, one;\n"
                                  ".reg .f32 e2, e3;\nmov.b32 one, 0x3F803F80;"
                                  + _pairs("$6", "g", None) + _pairs("$7", "h", None) + f"""
{_MMA}{{$0, $1, $2, $3}}, {{g0, h0, g1, h1}}, {{$8, $9}}, {{$12, $13, $14, $15}};
{_MMA}{{$0, $1, $2, $3}}, {{g2, h2, g3, h3}}, {{$10, $11}}, {{$0, $1, $2, $3}};
{_MMA}{{$4, $5, e2, e3}}, {{one, one, one, one}}, {{$8, $9}}, {{$16, $17, $16, $17}};
{_MMA}{{$4, $5, e2, e3}}, {{one, one, one, one}}, {{$10, $11}}, {{$4, $5, e2, e3}};
}}""")


@triton.jit
def _lane_columns(d, WARPS: tl.constexpr):
    """D [WARPS, 8 (row g), 8 (column n)] -> what lane 4g + t holds: columns 2t, 2t + 1,
    each [32 WARPS]."""
    n = tl.arange(0, 8)[None, None, None, :]
    t = tl.arange(0, 4)[None, None, :, None]
    d4 = tl.reshape(d, (WARPS, 8, 1, 8))
    even = tl.sum(tl.where(n == 2 * t, d4, 0.0), axis=3)
    odd = tl.sum(tl.where(n == 2 * t + 1, d4, 0.0), axis=3)
    return tl.reshape(even, (32 * WARPS,)), tl.reshape(odd, (32 * WARPS,))


@triton.jit
def _bf16_bits_pair(lo, hi):
    """Two fp32 values exact in bf16 -> their bf16 bits as one int32 (lo in the low half)."""
    lo16 = lo.to(tl.bfloat16).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
    hi16 = hi.to(tl.bfloat16).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
    return lo16 | (hi16 << 16)


@triton.jit
def _zero_of(zz):
    """The zero point (fp32) of an int4_zero_pair."""
    return ((zz & 0xFFFF) - 0x4300).to(tl.float32)


@triton.jit
def _pairs_minus(q, z):
    """Interpreter form of a word's decode: pairs of nibbles (2i, 2i + 1) minus z (fp32 [E];
    the results are small integers or 128 + code, exact in bf16) as bf16x2 int32."""
    p0 = _bf16_bits_pair((q & 0xF).to(tl.float32) - z, ((q >> 4) & 0xF).to(tl.float32) - z)
    p1 = _bf16_bits_pair(((q >> 8) & 0xF).to(tl.float32) - z, ((q >> 12) & 0xF).to(tl.float32) - z)
    p2 = _bf16_bits_pair(((q >> 16) & 0xF).to(tl.float32) - z, ((q >> 20) & 0xF).to(tl.float32) - z)
    p3 = _bf16_bits_pair(((q >> 24) & 0xF).to(tl.float32) - z, ((q >> 28) & 0xF).to(tl.float32) - z)
    return p0, p1, p2, p3


@triton.jit
def _row_products(ra, rb, b0, b1, WARPS: tl.constexpr):
    """Interpreter form of one MMA's D for one A row per lane: A's registers ra (k slots 2t,
    2t + 1) and rb (2t + 8, 2t + 9) against B's b0 / b1 from lane (n, t) -> [WARPS, 8, 8]."""
    d = tl.zeros((WARPS, 8, 8), dtype=tl.float32)
    for i in tl.static_range(2):
        for r in tl.static_range(2):
            a = bf16_pair(ra if r == 0 else rb)[i]
            b = bf16_pair(b0 if r == 0 else b1)[i]
            d += tl.sum(tl.reshape(a, (WARPS, 8, 1, 4)) * tl.reshape(b, (WARPS, 1, 8, 4)), axis=3)
    return d


@triton.jit
def _mma_emulated(a0, a1, a2, a3, b0, b1, c0, c1, c2, c3, WARPS: tl.constexpr):
    """D = A B + C for one m16n8k16 MMA under the interpreter, each lane's fragments as [E]
    tensors (A, B bf16x2 int32; C, D fp32), the lanes' products added up as the hardware
    does."""
    e, o = _lane_columns(_row_products(a0, a2, b0, b1, WARPS), WARPS)
    c0 += e
    c1 += o
    e, o = _lane_columns(_row_products(a1, a3, b0, b1, WARPS), WARPS)
    c2 += e
    c3 += o
    return c0, c1, c2, c3


@triton.jit
def _mma_pair(qg, qh, zzg, zzh, x01, x23, x45, x67, c0, c1, c2, c3, x0, x1, NATIVE: tl.constexpr,
              SUB: tl.constexpr, WARPS: tl.constexpr):
    """C += the two MMAs of one word pair, and with SUB False X += x's sums (the asm's
    comment); all [32 WARPS]: int32 words, zero pairs (used with SUB) and x pairs, fp32 C
    and X. Returns the new c0..c3, x0, x1."""
    if NATIVE:
        if SUB:
            c0, c1, c2, c3 = tl.inline_asm_elementwise(
                _INT4_MMA_SUB_ASM, "=f,=f,=f,=f,r,r,r,r,r,r,r,r,f,f,f,f",
                [qg, qh, zzg, zzh, x01, x23, x45, x67, c0, c1, c2, c3],
                dtype=(tl.float32,) * 4, is_pure=True, pack=1)
        else:
            c0, c1, c2, c3, x0, x1 = tl.inline_asm_elementwise(
                _INT4_MMA_ONES_ASM, "=f,=f,=f,=f,=f,=f,r,r,r,r,r,r,f,f,f,f,f,f",
                [qg, qh, x01, x23, x45, x67, c0, c1, c2, c3, x0, x1],
                dtype=(tl.float32,) * 6, is_pure=True, pack=1)
    else:   # the same MMAs, emulated
        if SUB:
            zg = _zero_of(zzg)
            zh = _zero_of(zzh)
        else:   # A is 128 + code; X from an all-ones A against the same B
            zg = tl.full(qg.shape, -128.0, tl.float32)
            zh = zg
            one = tl.full(qg.shape, 0x3F803F80, tl.int32)
            x0, x1, _, _ = _mma_emulated(one, one, one, one, x01, x23, x0, x1, x0, x1, WARPS)
            x0, x1, _, _ = _mma_emulated(one, one, one, one, x45, x67, x0, x1, x0, x1, WARPS)
        g0, g1, g2, g3 = _pairs_minus(qg, zg)
        h0, h1, h2, h3 = _pairs_minus(qh, zh)
        c0, c1, c2, c3 = _mma_emulated(g0, h0, g1, h1, x01, x23, c0, c1, c2, c3, WARPS)
        c0, c1, c2, c3 = _mma_emulated(g2, h2, g3, h3, x45, x67, c0, c1, c2, c3, WARPS)
    return c0, c1, c2, c3, x0, x1


@triton.jit
def _nvfp4_pairs_emulated(q, sp):
    """Interpreter form of _nvfp4_pairs: a word's code pairs (2i, 2i + 1) times the block
    scale (sp: a bf16x2 pair), as bf16x2 int32 (exact)."""
    sc = bf16_pair(sp)[0]
    p = nvfp4_parts(q, False, tl.float32)
    return (_bf16_bits_pair(p[0] * sc, p[1] * sc), _bf16_bits_pair(p[2] * sc, p[3] * sc),
            _bf16_bits_pair(p[4] * sc, p[5] * sc), _bf16_bits_pair(p[6] * sc, p[7] * sc))


@triton.jit
def _nvfp4_mma_pair(qg, qh, spg, sph, x01, x23, x45, x67, c0, c1, c2, c3, NATIVE: tl.constexpr,
                    WARPS: tl.constexpr):
    """C += the two MMAs of one NVFP4 word pair (words qg / qh of rows g / g + 8, their
    block-scale pairs spg / sph, x pairs), all [32 WARPS]. Returns the new c0..c3."""
    if NATIVE:
        c0, c1, c2, c3 = tl.inline_asm_elementwise(
            _NVFP4_MMA_ASM, "=f,=f,=f,=f,r,r,r,r,r,r,r,r,f,f,f,f,r,r,r,r",
            [qg, qh, spg, sph, x01, x23, x45, x67, c0, c1, c2, c3,
             tl.full(qg.shape, E2M1_LO_0, tl.int32), tl.full(qg.shape, E2M1_LO_4, tl.int32),
             tl.full(qg.shape, E2M1_HI_0, tl.int32), tl.full(qg.shape, E2M1_HI_4, tl.int32)],
            dtype=(tl.float32,) * 4, is_pure=True, pack=1)
    else:
        g0, g1, g2, g3 = _nvfp4_pairs_emulated(qg, spg)
        h0, h1, h2, h3 = _nvfp4_pairs_emulated(qh, sph)
        c0, c1, c2, c3 = _mma_emulated(g0, h0, g1, h1, x01, x23, c0, c1, c2, c3, WARPS)
        c0, c1, c2, c3 = _mma_emulated(g2, h2, g3, h3, x45, x67, c0, c1, c2, c3, WARPS)
    return c0, c1, c2, c3


@triton.jit
def _warp_sum(v, WARPS: tl.constexpr):
    """[32 WARPS] -> [32]: the warps' sums per lane."""
    return tl.sum(tl.reshape(v, (WARPS, 32)), axis=0)


@triton.jit
def _split4(v):
    """[E, 4] -> four [E] (the last axis, held by one thread: no data movement)."""
    a, b = tl.split(tl.reshape(v, (v.shape[0], 2, 2)))
    v0, v2 = tl.split(a)
    v1, v3 = tl.split(b)
    return v0, v1, v2, v3


@triton.jit
def _maybe_masked(ptr, mask, EVEN: tl.constexpr):
    """A load masked (zeros) unless EVEN: unmasked loads need no zeroed registers."""
    if EVEN:
        v = tl.load(ptr)
    else:
        v = tl.load(ptr, mask=mask, other=0)
    return v


@triton.jit
def _load_step(w_lo, w_hi, kk, valid, EVEN: tl.constexpr):
    """The words of rows g and g + 8 for the step at kk (kk // 8 words on), [E, 4]."""
    return _maybe_masked(w_lo + kk // 8, valid, EVEN), _maybe_masked(w_hi + kk // 8, valid, EVEN)


@triton.jit
def _chunk_scales(s_lo, s_hi, z_lo, z_hi, k0, valid, G: tl.constexpr, EVEN: tl.constexpr):
    """The scales and zero points of rows g / g + 8 at the group of column k0 [E]."""
    grp = k0 // G
    return (_maybe_masked(s_lo + grp, valid, EVEN), _maybe_masked(s_hi + grp, valid, EVEN),
            _maybe_masked(z_lo + grp, valid, EVEN), _maybe_masked(z_hi + grp, valid, EVEN))


@triton.jit
def _block_scale_pair(ptr, valid, EVEN: tl.constexpr):
    """An E4M3 block scale byte -> bf16x2 (the scale in both halves) as int32."""
    sc = e4m3_from_bits(_maybe_masked(ptr, valid, EVEN).to(tl.int32))
    return _bf16_bits_pair(sc, sc)


@triton.jit
def _nvfp4_chunk_scales(s_lo, s_hi, col, valid, EVEN: tl.constexpr):
    """NVFP4: the block-scale pairs of the lane's run (col [E], its first column: words 0-1
    are one 16-column block, words 2-3 the next) for rows g and g + 8."""
    b = col // 16
    return (_block_scale_pair(s_lo + b, valid, EVEN), _block_scale_pair(s_lo + b + 1, valid, EVEN),
            _block_scale_pair(s_hi + b, valid, EVEN), _block_scale_pair(s_hi + b + 1, valid, EVEN))


@triton.jit
def _nvfp4_chunk(a0, a1, a2, a3, q_lo, q_hi, x_at, scales, valid, NATIVE: tl.constexpr, EVEN: tl.constexpr,
                 WARPS: tl.constexpr):
    """_chunk for NVFP4 words (scales from _nvfp4_chunk_scales): the block scales ride in A,
    so the MMAs accumulate straight into a0..a3."""
    lo = _split4(q_lo)
    hi = _split4(q_hi)
    for u in tl.static_range(4):
        xq = _split4(_maybe_masked(x_at + 4 * u, valid[:, None], EVEN))
        a0, a1, a2, a3 = _nvfp4_mma_pair(lo[u], hi[u], scales[u // 2], scales[2 + u // 2], xq[0], xq[1], xq[2],
                                         xq[3], a0, a1, a2, a3, NATIVE, WARPS)
    return a0, a1, a2, a3


@triton.jit
def _chunk(a0, a1, a2, a3, q_lo, q_hi, x_at, scales, valid, NATIVE: tl.constexpr, SUB: tl.constexpr,
           EVEN: tl.constexpr, WARPS: tl.constexpr):
    """Each warp's 128 columns (inside one group): the words q_lo / q_hi [E, 4] of rows g /
    g + 8, x's pairs from x_at [E, 4] on, `scales` from _chunk_scales. Returns the
    accumulators a0..a3 (lane columns 2t, 2t + 1 of rows g, then g + 8) plus this chunk's
    scaled sums."""
    sc_lo = scales[0].to(tl.float32)      # [E]
    sc_hi = scales[1].to(tl.float32)
    zp_lo = scales[2]
    zp_hi = scales[3]
    zz_lo = int4_zero_pair(zp_lo)
    zz_hi = int4_zero_pair(zp_hi)
    lo = _split4(q_lo)
    hi = _split4(q_hi)
    c0 = tl.zeros_like(sc_lo)
    c1 = c0
    c2 = c0
    c3 = c0
    x0 = c0
    x1 = c0
    for u in tl.static_range(4):
        xq = _split4(_maybe_masked(x_at + 4 * u, valid[:, None], EVEN))
        c0, c1, c2, c3, x0, x1 = _mma_pair(lo[u], hi[u], zz_lo, zz_hi, xq[0], xq[1], xq[2], xq[3],
                                           c0, c1, c2, c3, x0, x1, NATIVE, SUB, WARPS)
    if not SUB:       # D holds sum (128 + code) x: take (128 + zero) X off
        off_lo = zp_lo.to(tl.float32) + 128.0
        off_hi = zp_hi.to(tl.float32) + 128.0
        c0 -= off_lo * x0
        c1 -= off_lo * x1
        c2 -= off_hi * x0
        c3 -= off_hi * x1
    return a0 + sc_lo * c0, a1 + sc_lo * c1, a2 + sc_hi * c2, a3 + sc_hi * c3


@triton.jit
def _store_rows(a0, a1, a2, a3, y_ptr, part_ptr, cnt_ptr, M, N, tile,
                SPLIT_K: tl.constexpr, FIXUP: tl.constexpr, WARPS: tl.constexpr):
    """Store the outputs: lane 4g + t holds rows 2t, 2t + 1 (D's columns) at weight rows g,
    g + 8 of this program's 16."""
    acc = tl.join(tl.join(_warp_sum(a0, WARPS), _warp_sum(a1, WARPS)),
                  tl.join(_warp_sum(a2, WARPS), _warp_sum(a3, WARPS)))  # [32, 2 (column), 2 (row)]
    lane3 = tl.arange(0, 32)[:, None, None]
    m = 2 * (lane3 % 4) + tl.arange(0, 2)[None, :, None]
    n = tl.program_id(0) * 16 + lane3 // 4 + 8 * tl.arange(0, 2)[None, None, :]
    store_split(acc, y_ptr, part_ptr, cnt_ptr, m * N + n, (m < M) & (n < N), M * N, tile, SPLIT_K, FIXUP)


@triton.jit
def _int4_mma_gemv_kernel(x_ptr, y_ptr, part_ptr, cnt_ptr, w_ptr, s_ptr, z_ptr, gs_ptr, M, N, K,
                          stride_xm, stride_wn, stride_sn, G: tl.constexpr, NVFP4: tl.constexpr,
                          NATIVE: tl.constexpr,
                          SPLIT_K: tl.constexpr, FIXUP: tl.constexpr, WARPS: tl.constexpr,
                          UNROLL: tl.constexpr, SUB: tl.constexpr, AHEAD: tl.constexpr,
                          EVEN: tl.constexpr, PDL: tl.constexpr):
    """y [M, N] = x [M, K] @ dequant(W)^T for M <= 8, W [N, K / 8] int32 words, s and z per
    row and group (G a multiple of 128), x as int32 bf16 pairs [M, K / 2]; NVFP4: E2M1
    words, s the E4M3 block scales per 16 columns, gs the per-row global scale (z unused,
    SUB not read). One program: 16 rows (program_id(0)); its WARPS warps take turns over 128-column chunks of the split's
    K range (UNROLL chunks a loop step, their words and scales all requested first) and
    are summed at the end. SUB: how the zero point comes off (the asm's comment). AHEAD >
    0: each step asks the L2 for the words AHEAD steps on (kernels/prefetch.py). EVEN:
    every split's range is whole steps of all warps (no masks). Lanes of B columns past M
    read x's last row (their D columns are never stored). Split partials and counters as
    splitk.store_split, one output tile per program."""
    CHUNK: tl.constexpr = STEP_COLUMNS * WARPS          # the warps' chunks side by side
    STEP: tl.constexpr = CHUNK * UNROLL
    AHEAD_UNROLL: tl.constexpr = UNROLL if AHEAD > 0 else 0
    # One flat index e = 32 w + l per thread (a [32 WARPS] axis, not [WARPS, 32]: with two
    # axes Triton's coalescing may spread a warp's lanes over both, breaking the mapping).
    e = tl.arange(0, 32 * WARPS)
    wi = e // 32
    g = (e % 32) // 4
    t = e % 4
    row_lo = tl.minimum(tl.program_id(0) * 16 + g, N - 1)   # rows past N re-read the last
    row_hi = tl.minimum(tl.program_id(0) * 16 + g + 8, N - 1)
    four = tl.arange(0, 4)[None, :]
    col = wi * STEP_COLUMNS + t * 32                                    # [E]
    run_lo = w_ptr + row_lo * stride_wn + col // 8                      # [E]: the lane's run
    run_hi = w_ptr + row_hi * stride_wn + col // 8
    w_lo = run_lo[:, None] + four                                       # [E, 4]
    w_hi = run_hi[:, None] + four
    x_lanes = x_ptr + (tl.minimum(g, M - 1) * stride_xm + col // 2)[:, None] + four  # 4 pairs on
    sz = (s_ptr + row_lo * stride_sn, s_ptr + row_hi * stride_sn,
          z_ptr + row_lo * stride_sn, z_ptr + row_hi * stride_sn)
    start, end = k_range(K, SPLIT_K, STEP)
    a0 = tl.zeros((32 * WARPS,), dtype=tl.float32)
    a1 = a0
    a2 = a0
    a3 = a0
    if PDL:
        tl.extra.cuda.gdc_wait()      # x is written by the kernel before
        tl.extra.cuda.gdc_launch_dependents()
    for kk in range(start, end, STEP):
        kk = tl.multiple_of(kk, STEP)   # 16-byte x loads
        k0 = kk + wi * STEP_COLUMNS                                     # [E]
        words = ()      # every chunk's words and scales requested before the first chunk's MMAs
        scales = ()
        for j in tl.static_range(UNROLL):
            words = words + (_load_step(w_lo, w_hi, kk + j * CHUNK, (k0 + j * CHUNK < end)[:, None], EVEN),)
            if NVFP4:
                scales = scales + (_nvfp4_chunk_scales(sz[0], sz[1], k0 + j * CHUNK + 32 * t, k0 + j * CHUNK < end,
                                                       EVEN),)
            else:
                scales = scales + (_chunk_scales(*sz, k0 + j * CHUNK, k0 + j * CHUNK < end, G, EVEN),)
        for j in tl.static_range(AHEAD_UNROLL):     # into L2, AHEAD steps on
            ahead = kk + AHEAD * STEP + j * CHUNK
            prefetch_l2(run_lo + ahead // 8, k0 + AHEAD * STEP + j * CHUNK < end, NATIVE)
            prefetch_l2(run_hi + ahead // 8, k0 + AHEAD * STEP + j * CHUNK < end, NATIVE)
        for j in tl.static_range(UNROLL):
            if NVFP4:
                a0, a1, a2, a3 = _nvfp4_chunk(a0, a1, a2, a3, words[j][0], words[j][1],
                                              x_lanes + (kk + j * CHUNK) // 2, scales[j], k0 + j * CHUNK < end,
                                              NATIVE, EVEN, WARPS)
            else:
                a0, a1, a2, a3 = _chunk(a0, a1, a2, a3, words[j][0], words[j][1], x_lanes + (kk + j * CHUNK) // 2,
                                        scales[j], k0 + j * CHUNK < end, NATIVE, SUB, EVEN, WARPS)
    if NVFP4:
        gs_lo = tl.load(gs_ptr + row_lo)
        gs_hi = tl.load(gs_ptr + row_hi)
        a0 *= gs_lo
        a1 *= gs_lo
        a2 *= gs_hi
        a3 *= gs_hi
    _store_rows(a0, a1, a2, a3, y_ptr, part_ptr, cnt_ptr, M, N, tl.program_id(0), SPLIT_K, FIXUP, WARPS)


# (warps, SPLIT_K, UNROLL, SUB, AHEAD): the winners of the H200 sweep at one row (every
# shape's best three, bench/results/h200_2026-11-30p_mma_sweep4.txt); on CUDA the tuner
# times them (at one row beside the decoder GEMV's tiles).
INT4_MMA_CONFIGS = ((8, 1, 2, 0, 0), (8, 1, 4, 0, 0), (8, 1, 1, 0, 2), (8, 1, 2, 0, 2), (8, 1, 1, 0, 0),
                    (2, 1, 2, 1, 0), (2, 1, 4, 1, 0), (4, 1, 2, 0, 0), (4, 1, 1, 0, 0), (4, 4, 1, 0, 0),
                    (4, 4, 1, 0, 2), (2, 4, 2, 0, 2), (2, 4, 4, 0, 0), (4, 2, 4, 0, 0))


def mma_applies(k_in: int, group: int, pairs: bool, nvfp4: bool = False) -> bool:
    """Whether the MMA GEMV serves a layer: bf16 activations (read as int32 pairs), K whole
    128-column steps, INT4 groups of whole steps (NVFP4's 16-column blocks always fit)."""
    return pairs and k_in % 128 == 0 and (nvfp4 or group % 128 == 0)


def int4_mma_gemv(xk: torch.Tensor, y: torch.Tensor, w: torch.Tensor, s: torch.Tensor,
                  z: torch.Tensor | None, group: int, config: tuple, pdl: dict,
                  gs: torch.Tensor | None = None) -> None:
    """y [M, N] (M <= MAX_ROWS) = x @ dequant(W)^T, xk: x as int32 bf16 pairs [M, K / 2] (decode.x_operand);
    w [N, K / 8] int32; INT4: s, z [N, K / G]; NVFP4 (gs given): s the E4M3 block scales as
    uint8 [N, K / 16], gs [N] fp32; config from INT4_MMA_CONFIGS; pdl: pdl_launch's."""
    if xk.dtype != torch.int32:
        raise ValueError("the MMA GEMV reads bf16 activations as int32 pairs (decode.x_operand)")
    warps, split, unroll, sub, ahead = config
    m, n_out, k_in = xk.shape[0], w.shape[0], w.shape[1] * 8
    if m > MAX_ROWS:
        raise ValueError(f"the MMA GEMV serves at most {MAX_ROWS} rows, got {m}")
    part, cnt, fixup = split_buffers(y, split, triton.cdiv(n_out, 16), True)
    _int4_mma_gemv_kernel[(triton.cdiv(n_out, 16), split, 1)](
        xk, y, part, cnt, w, s, s if z is None else z, s if gs is None else gs, m, n_out, k_in, xk.stride(0),
        w.stride(0), s.stride(0), G=group, NVFP4=gs is not None, NATIVE=native_decode(), SPLIT_K=split, FIXUP=fixup, WARPS=warps, UNROLL=unroll, SUB=bool(sub),
        AHEAD=ahead, EVEN=k_in % (STEP * warps * unroll * split) == 0, num_warps=warps, **pdl)
    finish_splits(part, y, fixup)
