"""The FP8 GEMV's K loop in SASS for sm_90, compiled on any machine (no GPU: the triton
wheel's ptxas and cuobjdump), fp32 tiles against PACKED (packed-bf16) ones: instructions
per int32 word of four weights, and the instruction classes (bench/sass_decoder_gemv.py's
loop reader). Also checks Triton's interpreter fp8 cast against torch's, the reason
kernels/fp8_quant.py rounds on the fp32 bits.

  PYTHONPATH=$PWD python bench/sass_fp8_gemv.py
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
from sass_decoder_gemv import compile_sass, loop_report  # noqa: E402

from ember.quant.kernels import fp8_gemv  # noqa: E402

SIG = {"x_ptr": "*i32", "y_ptr": "*bf16", "part_ptr": "*fp32", "cnt_ptr": "*i32", "w_ptr": "*i32",
       "s_ptr": "*fp32", "M": "i32", "N": "i32", "K": "i32", "stride_xm": "i32", "stride_wn": "i32"}
DIVISIBLE = [n for n in SIG if n != "M"]


def sass(tile: tuple[int, int, int, int], packed: bool) -> str:
    bn, bk, split, warps = tile
    const = {"NATIVE": True, "X_PAIRS": True, "PACKED": packed, "SPLIT_K": split, "FIXUP": split > 1,
             "BLOCK_N": bn, "BLOCK_K": bk, "AHEAD": 0, "PDL": False}
    return compile_sass(fp8_gemv._fp8_gemv_kernel, SIG, const, DIVISIBLE, warps)


def interpreter_fp8_cast() -> str:
    """Values whose E4M3 rounding Triton's interpreter gets wrong (against torch)."""
    import subprocess as sp
    code = """
import os; os.environ["TRITON_INTERPRET"] = "1"
import torch, triton, triton.language as tl
@triton.jit
def k(x_ptr, y_ptr, N: tl.constexpr):
    i = tl.arange(0, N)
    tl.store(y_ptr + i, tl.load(x_ptr + i).to(tl.float8e4nv))
x = torch.randn(64, generator=torch.Generator().manual_seed(0)) * 100
x = x.clamp(-448, 448)
y = torch.empty(64, dtype=torch.float8_e4m3fn)
k[(1,)](x, y, N=64)
ref = x.to(torch.float8_e4m3fn).float()
d = (y.float() != ref).nonzero().flatten()
print("interpreter fp8 cast vs torch:", len(d), "of 64 differ:",
      [(round(x[i].item(), 4), y.float()[i].item(), ref[i].item()) for i in d])
"""
    return sp.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip()


def main() -> None:
    for tile in [(16, 512, 1, 4), (8, 1024, 1, 2), (32, 256, 2, 4)]:
        for packed in (False, True):
            rep = loop_report(sass(tile, packed))
            per_thread = tile[0] * tile[1] / (32 * tile[3])          # weights per thread per step
            print(tile, "packed" if packed else "fp32  ",
                  f"{int(rep.split()[0]) / per_thread * 4:.1f} instructions/word;", rep, flush=True)
    print(interpreter_fp8_cast())


if __name__ == "__main__":
    main()
