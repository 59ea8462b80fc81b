"""Register-level decoders of packed weight words, shared by the GEMV and skinny kernels.

A word is an int32 holding 8 INT4 codes (column 8w + j in nibble j) or 4 E4M3 bytes
(column 4w + j in byte j). Decoding with Triton's casts costs conversion instructions,
which run at a fraction of the integer and FP32 rate on Hopper and made the decode-bound
GEMVs slower than their weights' bandwidth. These decoders move bits instead (inline PTX,
the trick Marlin uses), two values per 32-bit operation:

- INT4: `lop3(word >> 4i, 0x000F000F, 0x43004300)` gives nibbles i and i + 4 as the two
  bf16 halves 128 + code (bf16 counts by 1 in [128, 256), so this is exact).
- E4M3: a byte's low 7 bits moved to bf16 bits 4..10 and its sign to bit 15 give the E4M3
  value times 2^-120 exactly (E4M3 subnormals become bf16 subnormals); bytes 0 and 2 share
  one operation, bytes 1 and 3 the next.

Each comes in two output forms: bf16 parts (tensor-core operands) and fp32 parts (a bf16
half widened by a shift or a mask: CUDA-core FMAs). Values carry the offset or factor
named below, which callers fold into zero points or scales. On the CPU interpreter (tests)
the same parts come from plain integer arithmetic.
"""
from __future__ import annotations

import os
from collections.abc import Callable

import torch
import triton
import triton.language as tl

INT4_OFFSET = tl.constexpr(128.0)             # INT4 parts are code + 128 (fp32 and bf16 parts)
E4M3_FACTOR_HALF = tl.constexpr(2.0 ** 60)    # E4M3 parts are value * 2^-120: multiply by this twice


@triton.jit
def e4m3_from_bits(byte):
    """Positive E4M3 bytes (int32; bias 7; e == 0 subnormal m * 2^-9) -> fp32. Read as
    bytes: portable, and the interpreter has no fp8."""
    e = (byte >> 3) & 0xF
    m = (byte & 7).to(tl.float32)
    return tl.where(e == 0, m * 0.001953125, (8.0 + m) * tl.exp2((e - 10).to(tl.float32)))


_INT4_PAIR = """
lop3.b32 t, s, 0x000F000F, 0x43004300, 0xEA;"""

# Outputs $0..$7 = nibbles 0..7; input $8. `s` walks the word by 4 bits.
_INT4_BF16_ASM = tl.constexpr("""
{
.reg .b32 t, s;
mov.b32 s, $8;""" + _INT4_PAIR + """
mov.b32 {$0, $4}, t;
shr.u32 s, $8, 4;""" + _INT4_PAIR + """
mov.b32 {$1, $5}, t;
shr.u32 s, $8, 8;""" + _INT4_PAIR + """
mov.b32 {$2, $6}, t;
shr.u32 s, $8, 12;""" + _INT4_PAIR + """
mov.b32 {$3, $7}, t;
}
""")

_INT4_F32_ASM = tl.constexpr("""
{
.reg .b32 t, s;
mov.b32 s, $8;""" + _INT4_PAIR + """
shl.b32 $0, t, 16;
and.b32 $4, t, 0xFFFF0000;
shr.u32 s, $8, 4;""" + _INT4_PAIR + """
shl.b32 $1, t, 16;
and.b32 $5, t, 0xFFFF0000;
shr.u32 s, $8, 8;""" + _INT4_PAIR + """
shl.b32 $2, t, 16;
and.b32 $6, t, 0xFFFF0000;
shr.u32 s, $8, 12;""" + _INT4_PAIR + """
shl.b32 $3, t, 16;
and.b32 $7, t, 0xFFFF0000;
}
""")

# Bytes 0 and 2 -> t02, bytes 1 and 3 -> t13 (bf16 pairs); input $4.
_E4M3_PAIRS = """
.reg .b32 a, b, t02, t13;
shl.b32 a, $4, 4;
shl.b32 b, $4, 8;
and.b32 b, b, 0x80008000;
lop3.b32 t02, a, 0x07F007F0, b, 0xEA;
shr.b32 a, $4, 4;
and.b32 b, $4, 0x80008000;
lop3.b32 t13, a, 0x07F007F0, b, 0xEA;"""

_E4M3_BF16_ASM = tl.constexpr("{" + _E4M3_PAIRS + """
mov.b32 {$0, $2}, t02;
mov.b32 {$1, $3}, t13;
}""")

_E4M3_F32_ASM = tl.constexpr("{" + _E4M3_PAIRS + """
shl.b32 $0, t02, 16;
and.b32 $2, t02, 0xFFFF0000;
shl.b32 $1, t13, 16;
and.b32 $3, t13, 0xFFFF0000;
}""")


@triton.jit
def _asm_parts(q, BF16_ASM: tl.constexpr, F32_ASM: tl.constexpr, N: tl.constexpr, DTYPE: tl.constexpr):
    """A decoder's N parts of each word of q from its inline PTX: bf16 halves (16-bit
    outputs) or fp32 (32-bit outputs), one word in."""
    if DTYPE == tl.bfloat16:
        p = tl.inline_asm_elementwise(BF16_ASM, "=h," * N + "r", [q], dtype=(tl.bfloat16,) * N,
                                      is_pure=True, pack=1)
    else:
        p = tl.inline_asm_elementwise(F32_ASM, "=r," * N + "r", [q], dtype=(tl.float32,) * N,
                                      is_pure=True, pack=1)
    return p


@triton.jit
def int4_parts(q, NATIVE: tl.constexpr, DTYPE: tl.constexpr):
    """q [..] int32 words -> 8 tensors, part j = code j + INT4_OFFSET, in DTYPE (bf16 or
    fp32; the interpreter path takes any float type)."""
    if NATIVE:
        p = _asm_parts(q, _INT4_BF16_ASM, _INT4_F32_ASM, 8, DTYPE)
    else:
        p = (((q & 0xF) + 128).to(DTYPE), (((q >> 4) & 0xF) + 128).to(DTYPE),
             (((q >> 8) & 0xF) + 128).to(DTYPE), (((q >> 12) & 0xF) + 128).to(DTYPE),
             (((q >> 16) & 0xF) + 128).to(DTYPE), (((q >> 20) & 0xF) + 128).to(DTYPE),
             (((q >> 24) & 0xF) + 128).to(DTYPE), (((q >> 28) & 0xF) + 128).to(DTYPE))
    return p


@triton.jit
def int4_columns(p):
    """int4_parts' 8 parts [..., WORDS] -> [..., 8 WORDS] in column order (column 8w + j is
    part j of word w)."""
    return tl.interleave(tl.interleave(tl.interleave(p[0], p[4]), tl.interleave(p[2], p[6])),
                         tl.interleave(tl.interleave(p[1], p[5]), tl.interleave(p[3], p[7])))


# One INT4 word against its 8 bf16 activations in packed bf16 math (GEMV, one row): per
# column pair (2i, 2i+1), prmt puts nibble 2i in the low half and nibble 2i + 1 in the
# high half (from q and q >> 4), so the lop3 gives bf16 pairs in x's own pair order;
# sub.bf16x2 takes (z + 128) off exactly (integers below 256), and the four products
# accumulate in bf16x2 before one widening to fp32. About 20 instructions per word where
# the fp32 path (int4_parts + widened x) costs over 40: the GEMV was issue-bound, not
# bandwidth-bound. The bf16 partials (4 products each) round at 2^-9 relative, below the
# 4-bit weights' own error by far. Outputs $0 (fp32 bits); inputs $1 word, $2 zz, $3..$6 x.
_INT4_WORD_DOT_ASM = tl.constexpr("""
{
.reg .b32 q4, p, t, d, a;
shr.u32 q4, $1, 4;
prmt.b32 p, $1, q4, 0x4400;
lop3.b32 t, p, 0x000F000F, 0x43004300, 0xEA;
sub.rn.bf16x2 d, t, $2;
mul.rn.bf16x2 a, d, $3;
prmt.b32 p, $1, q4, 0x5511;
lop3.b32 t, p, 0x000F000F, 0x43004300, 0xEA;
sub.rn.bf16x2 d, t, $2;
fma.rn.bf16x2 a, d, $4, a;
prmt.b32 p, $1, q4, 0x6622;
lop3.b32 t, p, 0x000F000F, 0x43004300, 0xEA;
sub.rn.bf16x2 d, t, $2;
fma.rn.bf16x2 a, d, $5, a;
prmt.b32 p, $1, q4, 0x7733;
lop3.b32 t, p, 0x000F000F, 0x43004300, 0xEA;
sub.rn.bf16x2 d, t, $2;
fma.rn.bf16x2 a, d, $6, a;
shl.b32 t, a, 16;
and.b32 d, a, 0xFFFF0000;
add.f32 $0, t, d;
}
""")


@triton.jit
def int4_zero_pair(z):
    """Zero points (int, 0..15) -> int32 holding bf16 (z + INT4_OFFSET) in both halves, the
    operand int4_word_dot subtracts (bf16 128 + z has the bits 0x4300 + z)."""
    h = z.to(tl.int32) + 0x4300
    return (h << 16) | h


@triton.jit
def bf16_pair(v):
    """int32 bf16 pairs -> fp32 (low, high)."""
    return (v << 16).to(tl.float32, bitcast=True), (v & -65536).to(tl.float32, bitcast=True)


@triton.jit
def int4_word_dot(q, zz, x01, x23, x45, x67, NATIVE: tl.constexpr):
    """sum_j (c_j - z) x_j over each word's 8 columns, fp32 (same shape as the inputs,
    which broadcast). q: int32 words; zz: int4_zero_pair(z); x01..x67: x's bf16 pairs as
    int32 (columns 8w + 2i, 8w + 2i + 1). Compiled: packed bf16 math (see the asm); the
    interpreter computes the same sum in fp32."""
    if NATIVE:
        return tl.inline_asm_elementwise(_INT4_WORD_DOT_ASM, "=r,r,r,r,r,r,r",   # broadcasts
                                         [q, zz, x01, x23, x45, x67], dtype=tl.float32,
                                         is_pure=True, pack=1)
    else:
        z = ((zz & 0xFFFF) - 0x4300).to(tl.float32)
        x0, x1 = bf16_pair(x01)
        x2, x3 = bf16_pair(x23)
        x4, x5 = bf16_pair(x45)
        x6, x7 = bf16_pair(x67)
        t = (((q & 0xF).to(tl.float32) - z) * x0 + (((q >> 4) & 0xF).to(tl.float32) - z) * x1
             + (((q >> 8) & 0xF).to(tl.float32) - z) * x2 + (((q >> 12) & 0xF).to(tl.float32) - z) * x3)
        t += ((((q >> 16) & 0xF).to(tl.float32) - z) * x4 + (((q >> 20) & 0xF).to(tl.float32) - z) * x5
              + (((q >> 24) & 0xF).to(tl.float32) - z) * x6 + (((q >> 28) & 0xF).to(tl.float32) - z) * x7)
        return t


# One NVFP4 word (8 E2M1 codes s e e m, column 8w + j in nibble j) against its 8 bf16
# activations, in packed bf16 math (GEMV, one row). E2M1 has 8 magnitudes, whose bf16 bits
# are looked up with prmt (an 8-entry byte table in two registers: the low bytes and the
# high bytes of 0, 0.5, 1, 1.5, 2, 3, 4, 6), 4 codes at a time (selectors: the codes with
# their sign bits cleared); prmt then pairs each code's two bytes as bf16 in x's column-pair
# order, and the signs (bits 3 and 7 of each byte, from q and q << 4) are xor-ed into
# bits 15 and 31. The values are exact; the products accumulate in bf16x2 as in
# _INT4_WORD_DOT_ASM. Outputs $0 (fp32 bits); inputs $1 word, $2..$5 x pairs, $6..$9 the
# table (low bytes 0-3, 4-7, high bytes 0-3, 4-7).
_NVFP4_PAIR = """
prmt.b32 v, {L}, {H}, {pair};
prmt.b32 sg, t4, t, {sign};
lop3.b32 v, v, sg, 0x80008000, 0x78;"""
_NVFP4_PAIRS = (("L0", "H0", "0x5140", "0x4000"), ("L0", "H0", "0x7362", "0x5010"),
                ("L1", "H1", "0x5140", "0x6020"), ("L1", "H1", "0x7362", "0x7030"))
NVFP4_REGS = ".reg .b32 s0, s1, t, t4, L0, H0, L1, H1, v, sg;"   # the temporaries nvfp4_ptx uses


def nvfp4_ptx(word: str, tables: tuple[str, str, str, str], after: Callable[[int], str]) -> str:
    """PTX decoding the NVFP4 `word` (a register) into its four bf16x2 code pairs (2i,
    2i + 1), each left in `v` for the instructions `after(i)` returns. `tables`: the
    registers holding E2M1_LO_0, E2M1_LO_4, E2M1_HI_0, E2M1_HI_4. Temporaries: NVFP4_REGS."""
    lo0, lo4, hi0, hi4 = tables
    head = f"""
and.b32 s0, {word}, 0x7777;
shr.u32 s1, {word}, 16;
and.b32 s1, s1, 0x7777;
and.b32 t, {word}, 0x88888888;
shl.b32 t4, t, 4;
prmt.b32 L0, {lo0}, {lo4}, s0;
prmt.b32 H0, {hi0}, {hi4}, s0;
prmt.b32 L1, {lo0}, {lo4}, s1;
prmt.b32 H1, {hi0}, {hi4}, s1;"""
    return head + "".join(_NVFP4_PAIR.format(L=lo, H=hi, pair=pair, sign=sign) + "\n" + after(i)
                          for i, (lo, hi, pair, sign) in enumerate(_NVFP4_PAIRS))


_NVFP4_WORD_DOT_ASM = tl.constexpr("{\n" + NVFP4_REGS + "\n.reg .b32 a;" + nvfp4_ptx(
    "$1", ("$6", "$7", "$8", "$9"),
    lambda i: "mul.rn.bf16x2 a, v, $2;" if i == 0 else f"fma.rn.bf16x2 a, v, ${2 + i}, a;") + """
shl.b32 t, a, 16;
and.b32 v, a, 0xFFFF0000;
add.f32 $0, t, v;
}
""")
# bf16 bits of the E2M1 magnitudes 0, 0.5, 1, 1.5, 2, 3, 4, 6: low bytes, then high bytes,
# as two little-endian 4-byte registers each.
E2M1_LO_0, E2M1_LO_4 = tl.constexpr(-1065353216), tl.constexpr(-1065336832)   # 0xC0800000, 0xC0804000
E2M1_HI_0, E2M1_HI_4 = tl.constexpr(0x3F3F3F00), tl.constexpr(0x40404040)


E2M1_UNSCALE = tl.constexpr(16384.0)     # e2m1_scaled's values are E2M1 / 2^14


@triton.jit
def e2m1_scaled(code):
    """E2M1 codes (int32, 0..15) -> values / 2^14. Bits s e e m, placed as fp16 bits
    s 0 0 0 e e m 0..0, read as fp16: e == 0 gives the subnormal m * 2^-15 and e > 0 gives
    2^(e-15) (1 + m/2), both exactly the E2M1 value times 2^-14 (callers fold E2M1_UNSCALE
    into a scale)."""
    bits = ((code & 7) << 9) | ((code & 8) << 12)
    return bits.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)


# One NVFP4 word -> its 8 E2M1 values as parts (tiles that dequantize before an MMA): the
# same table lookups and sign xor as _NVFP4_WORD_DOT_ASM, tables as immediates, each pair
# split into its halves (bf16) or widened (fp32). Outputs $0..$7 = codes 0..7; input $8.
_NVFP4_TABLES = """
.reg .b32 a0, a4, b0, b4;
mov.b32 a0, 0xC0800000;
mov.b32 a4, 0xC0804000;
mov.b32 b0, 0x3F3F3F00;
mov.b32 b4, 0x40404040;"""
_NVFP4_BF16_ASM = tl.constexpr("{\n" + NVFP4_REGS + _NVFP4_TABLES + nvfp4_ptx(
    "$8", ("a0", "a4", "b0", "b4"), lambda i: f"mov.b32 {{${2 * i}, ${2 * i + 1}}}, v;") + "\n}")
_NVFP4_F32_ASM = tl.constexpr("{\n" + NVFP4_REGS + _NVFP4_TABLES + nvfp4_ptx(
    "$8", ("a0", "a4", "b0", "b4"), lambda i: f"shl.b32 ${2 * i}, v, 16;\nand.b32 ${2 * i + 1}, v, 0xFFFF0000;")
    + "\n}")


@triton.jit
def nvfp4_parts(q, NATIVE: tl.constexpr, DTYPE: tl.constexpr):
    """q [..] int32 NVFP4 words -> 8 tensors, part j = the E2M1 value of code j (exact), in
    DTYPE (bf16 or fp32); column order as int4_parts (int4_columns)."""
    if NATIVE:
        p = _asm_parts(q, _NVFP4_BF16_ASM, _NVFP4_F32_ASM, 8, DTYPE)
    else:
        p = ((e2m1_scaled(q & 0xF) * E2M1_UNSCALE).to(DTYPE),
             (e2m1_scaled((q >> 4) & 0xF) * E2M1_UNSCALE).to(DTYPE),
             (e2m1_scaled((q >> 8) & 0xF) * E2M1_UNSCALE).to(DTYPE),
             (e2m1_scaled((q >> 12) & 0xF) * E2M1_UNSCALE).to(DTYPE),
             (e2m1_scaled((q >> 16) & 0xF) * E2M1_UNSCALE).to(DTYPE),
             (e2m1_scaled((q >> 20) & 0xF) * E2M1_UNSCALE).to(DTYPE),
             (e2m1_scaled((q >> 24) & 0xF) * E2M1_UNSCALE).to(DTYPE),
             (e2m1_scaled((q >> 28) & 0xF) * E2M1_UNSCALE).to(DTYPE))
    return p


@triton.jit
def nvfp4_columns(q, sc, NATIVE: tl.constexpr, DTYPE: tl.constexpr):
    """q [..., WORDS] NVFP4 words, sc [..., WORDS] (or broadcastable) each word's block scale
    in DTYPE -> the dequantized values [..., 8 WORDS] in column order, code times scale
    (exact in bf16: 2 significant bits times E4M3's 4)."""
    p = nvfp4_parts(q, NATIVE, DTYPE)
    return int4_columns((p[0] * sc, p[1] * sc, p[2] * sc, p[3] * sc, p[4] * sc, p[5] * sc, p[6] * sc, p[7] * sc))


@triton.jit
def nvfp4_word_dot(q, x01, x23, x45, x67, NATIVE: tl.constexpr):
    """sum_j value(c_j) x_j over each word's 8 E2M1 codes, fp32 (shapes broadcast as in
    int4_word_dot). Compiled: the prmt table lookup in packed bf16 math (see the asm); the
    interpreter computes the same sum in fp32."""
    if NATIVE:
        lo0 = tl.full(q.shape, E2M1_LO_0, tl.int32)
        lo4 = tl.full(q.shape, E2M1_LO_4, tl.int32)
        hi0 = tl.full(q.shape, E2M1_HI_0, tl.int32)
        hi4 = tl.full(q.shape, E2M1_HI_4, tl.int32)
        return tl.inline_asm_elementwise(_NVFP4_WORD_DOT_ASM, "=r,r,r,r,r,r,r,r,r,r",
                                         [q, x01, x23, x45, x67, lo0, lo4, hi0, hi4],
                                         dtype=tl.float32, is_pure=True, pack=1)
    else:
        x0, x1 = bf16_pair(x01)
        x2, x3 = bf16_pair(x23)
        x4, x5 = bf16_pair(x45)
        x6, x7 = bf16_pair(x67)
        t = (e2m1_scaled(q & 0xF) * x0 + e2m1_scaled((q >> 4) & 0xF) * x1
             + e2m1_scaled((q >> 8) & 0xF) * x2 + e2m1_scaled((q >> 12) & 0xF) * x3)
        t += (e2m1_scaled((q >> 16) & 0xF) * x4 + e2m1_scaled((q >> 20) & 0xF) * x5
              + e2m1_scaled((q >> 24) & 0xF) * x6 + e2m1_scaled((q >> 28) & 0xF) * x7)
        return t * E2M1_UNSCALE


# Two FP8 words (4 E4M3 bytes each, column 4w + j in byte j) against their activations in
# packed bf16 math (GEMV, one row). Each word decodes as in _E4M3_PAIRS into the bf16 pairs
# (byte 0, byte 2) and (byte 1, byte 3), values times 2^-120; x comes in the same pairing,
# scaled by 2^60 (fp8_x_quad) so that the products, times 2^-60, stay normal in bf16 (at
# 2^-120 a product below 2^-6 would be subnormal). The four products of each half
# accumulate in bf16x2 before one widening to fp32, as in _INT4_WORD_DOT_ASM: about 11
# instructions per word where the fp32 path (_E4M3_F32_ASM and 4 FFMAs) costs 15. Outputs
# $0 (fp32 bits); inputs $1, $2 the words, $3, $4 word 1's x (02, 13), $5, $6 word 2's.
_E4M3_WORD = """
shl.b32 a, {q}, 4;
shl.b32 b, {q}, 8;
and.b32 b, b, 0x80008000;
lop3.b32 t, a, 0x07F007F0, b, 0xEA;
{first}
shr.u32 a, {q}, 4;
and.b32 b, {q}, 0x80008000;
lop3.b32 t, a, 0x07F007F0, b, 0xEA;
fma.rn.bf16x2 acc, t, {x13}, acc;"""

_FP8_WORD_DOT2_ASM = tl.constexpr("""
{
.reg .b32 a, b, t, acc;""" + _E4M3_WORD.format(q="$1", x13="$4", first="mul.rn.bf16x2 acc, t, $3;")
    + _E4M3_WORD.format(q="$2", x13="$6", first="fma.rn.bf16x2 acc, t, $5, acc;") + """
shl.b32 t, acc, 16;
and.b32 a, acc, 0xFFFF0000;
add.f32 $0, t, a;
}
""")
FP8_X_SCALE = tl.constexpr(2.0 ** 60)     # fp8_x_quad's factor; results carry 2^-60

# A word's four bf16 activations (one int64: columns 0..3) -> $0 = (x0, x2), $1 = (x1, x3),
# each times 2^60 (bf16 0x5D80; a power of two: exact for every finite bf16 below 2^67).
_FP8_X_QUAD_ASM = tl.constexpr("""
{
.reg .b32 lo, hi, c;
mov.b64 {lo, hi}, $2;
mov.b32 c, 0x5D805D80;
mul.rn.bf16x2 lo, lo, c;
mul.rn.bf16x2 hi, hi, c;
prmt.b32 $0, lo, hi, 0x5410;
prmt.b32 $1, lo, hi, 0x7632;
}
""")


@triton.jit
def fp8_x_quad(ptr, mask, NATIVE: tl.constexpr):
    """x's bf16 activations read four at a time (ptr: int64 pointers, one per FP8 word:
    fp8_x_operand) -> (x02, x13), int32 bf16 pairs of columns (0, 2) and (1, 3) times
    FP8_X_SCALE, the pairing fp8_word_dot2 multiplies."""
    v = tl.load(ptr, mask=mask, other=0)
    if NATIVE:
        return tl.inline_asm_elementwise(_FP8_X_QUAD_ASM, "=r,=r,l", [v], dtype=(tl.int32, tl.int32),
                                         is_pure=True, pack=1)
    else:
        x0, x1 = bf16_pair((v & 0xFFFFFFFF).to(tl.int32))
        x2, x3 = bf16_pair((v >> 32).to(tl.int32))
        b0 = (x0 * FP8_X_SCALE).to(tl.int32, bitcast=True)
        b1 = (x1 * FP8_X_SCALE).to(tl.int32, bitcast=True)
        b2 = (x2 * FP8_X_SCALE).to(tl.int32, bitcast=True)
        b3 = (x3 * FP8_X_SCALE).to(tl.int32, bitcast=True)
        return ((b0 >> 16) & 0xFFFF) | (b2 & -65536), ((b1 >> 16) & 0xFFFF) | (b3 & -65536)


def fp8_x_operand(x2: torch.Tensor) -> torch.Tensor | None:
    """A GEMV's bf16 activations [M, K] as int64 [M, K // 4] (fp8_x_quad's operand), or
    None where the view is impossible (other dtypes, K or the row stride not a multiple of
    4, an unaligned start)."""
    if (x2.dtype == torch.bfloat16 and x2.shape[-1] % 4 == 0 and x2.stride(0) % 4 == 0
            and x2.data_ptr() % 8 == 0):
        return x2.view(torch.int64)
    return None


@triton.jit
def fp8_word_dot2(qa, qb, xa02, xa13, xb02, xb13, NATIVE: tl.constexpr):
    """sum over two words' 8 columns of value(byte) * x, times 2^-60 (E4M3's 2^-120 and
    FP8_X_SCALE), fp32; x pairs from fp8_x_quad (shapes broadcast as in int4_word_dot).
    Compiled: packed bf16 math (see the asm); the interpreter computes it in fp32."""
    if NATIVE:
        return tl.inline_asm_elementwise(_FP8_WORD_DOT2_ASM, "=r,r,r,r,r,r,r",
                                         [qa, qb, xa02, xa13, xb02, xb13], dtype=tl.float32,
                                         is_pure=True, pack=1)
    else:
        t = _fp8_word_dot_f32(qa, xa02, xa13)
        return t + _fp8_word_dot_f32(qb, xb02, xb13)


@triton.jit
def _fp8_word_dot_f32(q, x02, x13):
    """Interpreter path of fp8_word_dot2 for one word."""
    x0, x2 = bf16_pair(x02)
    x1, x3 = bf16_pair(x13)
    p = e4m3_parts(q, False, tl.float32)
    return p[0] * x0 + p[1] * x1 + p[2] * x2 + p[3] * x3


@triton.jit
def _e4m3_part(q, shift: tl.constexpr, DTYPE: tl.constexpr):
    """Interpreter path: byte shift // 8 of each word as its E4M3 value times 2^-120."""
    b = (q >> shift) & 0xFF
    mag = e4m3_from_bits(b & 0x7F) * 7.52316384526264e-37   # 2^-120
    return tl.where((b & 0x80) != 0, -mag, mag).to(DTYPE)


@triton.jit
def e4m3_parts(q, NATIVE: tl.constexpr, DTYPE: tl.constexpr):
    """q [..] int32 words of 4 E4M3 bytes -> 4 tensors, part j = byte j's value * 2^-120,
    in DTYPE (bf16 or fp32)."""
    if NATIVE:
        p = _asm_parts(q, _E4M3_BF16_ASM, _E4M3_F32_ASM, 4, DTYPE)
    else:
        p = (_e4m3_part(q, 0, DTYPE), _e4m3_part(q, 8, DTYPE), _e4m3_part(q, 16, DTYPE),
             _e4m3_part(q, 24, DTYPE))
    return p


@triton.jit
def x_pair(ptr, mask):
    """Two bf16 activations read as one int32 (ptr: int32 pointers, x_operand) -> their fp32
    values, low column first: bf16 widens to fp32 by a shift or a mask, where the cast
    is a conversion instruction (a quarter of the integer rate), once per weight in a GEMV
    whose threads each hold different columns."""
    return bf16_pair(tl.load(ptr, mask=mask, other=0))


def x_operand(x2: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """A GEMV's activations [M, K]: bf16 rows with even K as int32 pairs [M, K // 2] (read
    with x_pair), others as they are. Returns (tensor, pairs)."""
    if x2.dtype == torch.bfloat16 and x2.shape[-1] % 2 == 0 and x2.stride(0) % 2 == 0:
        return x2.view(torch.int32), True
    return x2, False


def native_decode() -> bool:
    """Whether the kernels run compiled (inline PTX) rather than under the interpreter."""
    return os.environ.get("TRITON_INTERPRET") != "1"


