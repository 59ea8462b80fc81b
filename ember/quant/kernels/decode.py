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
def int4_parts(q, NATIVE: tl.constexpr, DTYPE: tl.constexpr):
    """q [..] int32 words -> 8 tensors, part j = code j + INT4_OFFSET, in DTYPE (bf16 or
    fp32; the interpreter path takes any float type)."""
    if NATIVE:
        if DTYPE == tl.bfloat16:
            p = tl.inline_asm_elementwise(_INT4_BF16_ASM, "=h,=h,=h,=h,=h,=h,=h,=h,r", [q],
                                          dtype=(tl.bfloat16,) * 8, is_pure=True, pack=1)
        else:
            p = tl.inline_asm_elementwise(_INT4_F32_ASM, "=r,=r,=r,=r,=r,=r,=r,=r,r", [q],
                                          dtype=(tl.float32,) * 8, is_pure=True, pack=1)
    else:
        p = (((q & 0xF) + 128).to(DTYPE), (((q >> 4) & 0xF) + 128).to(DTYPE),
             (((q >> 8) & 0xF) + 128).to(DTYPE), (((q >> 12) & 0xF) + 128).to(DTYPE),
             (((q >> 16) & 0xF) + 128).to(DTYPE), (((q >> 20) & 0xF) + 128).to(DTYPE),
             (((q >> 24) & 0xF) + 128).to(DTYPE), (((q >> 28) & 0xF) + 128).to(DTYPE))
    return p


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
        if DTYPE == tl.bfloat16:
            p = tl.inline_asm_elementwise(_E4M3_BF16_ASM, "=h,=h,=h,=h,r", [q],
                                          dtype=(tl.bfloat16,) * 4, is_pure=True, pack=1)
        else:
            p = tl.inline_asm_elementwise(_E4M3_F32_ASM, "=r,=r,=r,=r,r", [q],
                                          dtype=(tl.float32,) * 4, is_pure=True, pack=1)
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
    v = tl.load(ptr, mask=mask, other=0)
    return (v << 16).to(tl.float32, bitcast=True), (v & -65536).to(tl.float32, bitcast=True)


def x_operand(x2: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """A GEMV's activations [M, K]: bf16 rows with even K as int32 pairs [M, K // 2] (read
    with x_pair), others as they are. Returns (tensor, pairs)."""
    if x2.dtype == torch.bfloat16 and x2.shape[-1] % 2 == 0 and x2.stride(0) % 2 == 0:
        return x2.view(torch.int32), True
    return x2, False


def native_decode() -> bool:
    """Whether the kernels run compiled (inline PTX) rather than under the interpreter."""
    return os.environ.get("TRITON_INTERPRET") != "1"


