"""The decoder GEMV's SASS for sm_90, compiled on any machine (no GPU: the triton wheel's
ptxas and cuobjdump), with the launch's 16-divisibility of pointers, sizes and strides:
instruction classes inside the K loop and the barriers there, for the INT4 and NVFP4
tiles. `--x-direct` compiles a variant that loads x's four bf16 pairs as four plain loads
in the word tile's layout (instead of one [GROUPS, GW, 4] load split in registers), to see
whether the layout conversion through shared memory leaves the loop.

  PYTHONPATH=$PWD python bench/sass_decoder_gemv.py [--x-direct] [--tile 32 256 4 4 0]
  PYTHONPATH=$PWD python bench/sass_decoder_gemv.py --mma 4 1 1 0 0 [--mma ...] [--nvfp4]

--mma WARPS SPLIT_K UNROLL SUB AHEAD: the tensor-core GEMV (kernels/int4_mma.py) instead,
whole steps (EVEN), INT4 group 128 (with --nvfp4: NVFP4 words and block scales).
"""
from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import tempfile

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from ember.quant.kernels import w4a16


@triton.jit
def _x_pairs_direct(x_row, col):
    p = x_row + col // 2
    return tl.load(p), tl.load(p + 1), tl.load(p + 2), tl.load(p + 3)


SIG = {"x_ptr": "*i32", "y_ptr": "*bf16", "part_ptr": "*fp32", "cnt_ptr": "*i32", "w_ptr": "*i32",
       "s_ptr": "*bf16", "z_ptr": "*u8", "gs_ptr": "*fp32", "M": "i32", "N": "i32", "K": "i32",
       "stride_xm": "i32", "stride_wn": "i32", "stride_sn": "i32"}
DIVISIBLE = [n for n in SIG if n not in ("M",)]


def sass(nvfp4: bool, tile: list[int]) -> str:
    bn, bk, split, warps, prefetch = tile
    const = {"G": 16 if nvfp4 else 128, "NVFP4": nvfp4, "NATIVE": True, "X_PAIRS": True,
             "SPLIT_K": split, "FIXUP": split > 1, "BLOCK_N": bn, "BLOCK_K": bk,
             "GW": 2 if nvfp4 else min(bk, 128) // 8, "PREFETCH": bool(prefetch), "PDL": False}
    sig = dict(SIG, s_ptr="*u8") if nvfp4 else SIG
    return compile_sass(w4a16._decoder_gemv_kernel, sig, const, DIVISIBLE, warps)


def compile_sass(fn, sig: dict[str, str], const: dict, divisible: list[str], warps: int) -> str:
    """A jitted kernel's SASS for sm_90 (cuobjdump), its pointer/size arguments in
    `divisible` marked 16-divisible as a launch would specialize them."""
    names = list(sig)
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in divisible}
    src = ASTSource(fn=fn, signature={**sig, **{c: "constexpr" for c in const}}, constexprs=const, attrs=attrs)
    k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(k.asm["cubin"])
        f.flush()
        return subprocess.run([tool, "-sass", f.name], capture_output=True, text=True, check=True).stdout


def loop_report(text: str) -> str:
    """Instruction classes between the K loop's backward branch and its target."""
    lines = [ln for ln in text.splitlines() if re.match(r"\s+/\*[0-9a-f]{4}\*/", ln)]
    addr = [int(re.match(r"\s+/\*([0-9a-f]+)\*/", ln).group(1), 16) for ln in lines]
    back = [(i, int(m.group(1), 16)) for i, ln in enumerate(lines)
            if (m := re.search(r"BRA 0x([0-9a-f]+)", ln)) and int(m.group(1), 16) < addr[i]
            and int(m.group(1), 16) != addr[i]]
    end, target = max(back, key=lambda b: addr[b[0]] - b[1])   # the longest backward branch
    body = [ln for a, ln in zip(addr, lines) if target <= a <= addr[end]]
    ops = collections.Counter(re.sub(r"^\s+/\*[0-9a-f]+\*/\s+(@!?U?P\w+\s+)?", "", ln).split()[0].rstrip(";")
                              for ln in body)
    top = ", ".join(f"{op} {n}" for op, n in ops.most_common(14))
    return f"{len(body)} instructions in the loop; BAR.SYNC {ops.get('BAR.SYNC.DEFER_BLOCKING', 0)}; {top}"


def mma_sass(config: list[int], nvfp4: bool = False) -> str:
    """The MMA GEMV's SASS for one (warps, split, unroll, sub, ahead), INT4 or NVFP4."""
    from ember.quant.kernels import int4_mma
    warps, split, unroll, sub, ahead = config
    sig = dict(SIG, s_ptr="*u8") if nvfp4 else SIG
    const = {"G": 16 if nvfp4 else 128, "NVFP4": nvfp4, "NATIVE": True, "SPLIT_K": split, "FIXUP": split > 1,
             "WARPS": warps, "UNROLL": unroll, "SUB": bool(sub), "AHEAD": ahead, "EVEN": True, "PDL": False}
    return compile_sass(int4_mma._int4_mma_gemv_kernel, sig, const, DIVISIBLE, warps)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--x-direct", action="store_true")
    ap.add_argument("--tile", type=int, nargs=5, default=[32, 256, 4, 4, 0],
                    metavar=("BLOCK_N", "BLOCK_K", "SPLIT_K", "WARPS", "PREFETCH"))
    ap.add_argument("--mma", type=int, nargs=5, action="append", default=[],
                    metavar=("WARPS", "SPLIT_K", "UNROLL", "SUB", "AHEAD"))
    ap.add_argument("--nvfp4", action="store_true", help="with --mma: the NVFP4 form")
    args = ap.parse_args()
    if args.mma:
        for config in args.mma:
            print(f"{'NVFP4' if args.nvfp4 else 'INT4'} MMA GEMV {config}: "
                  f"{loop_report(mma_sass(config, args.nvfp4))}", flush=True)
        return
    if args.x_direct:
        w4a16._x_word_pairs = _x_pairs_direct
    for nvfp4 in (False, True):
        print(f"{'NVFP4' if nvfp4 else 'INT4'} tile {args.tile}{' x-direct' if args.x_direct else ''}: "
              + loop_report(sass(nvfp4, args.tile)), flush=True)


if __name__ == "__main__":
    main()
