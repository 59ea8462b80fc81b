"""The decode GEMVs' bulk L2 prefetch (ember.layers.l2_prefetch).

CPU: the prefetch's PTX goes through ptxas for sm_90 (the triton wheel's, no GPU needed)
and lands in the SASS as a bulk prefetch. GPU (Hopper): the once-per-row predicate issues
each row exactly once for every tile shape the GEMVs use (a counting store in place of
the prefetch), and the FP8, INT4 and bf16 GEMVs compute bit for bit the same with the
prefetch on and off.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import triton
import triton.language as tl

from ember.layers.l2_prefetch import COUNT_ASM, issue_once_per_row, prefetch_rows_l2

HOPPER = torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 9


@triton.jit
def _count_kernel(flags_ptr, valid, ROWS: tl.constexpr, THREADS: tl.constexpr):
    # flags [programs, ROWS] int32: row r of program p adds 1 at flags[p, r]
    issue_once_per_row(COUNT_ASM, flags_ptr + tl.program_id(0) * ROWS, 1, 0, 4, valid, ROWS, THREADS)


# Run in a fresh interpreter: the suite runs Triton in interpreter mode, which compiles nothing.
_COMPILE = """
import os, subprocess, tempfile
import triton, triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from ember.layers.l2_prefetch import prefetch_rows_l2

@triton.jit
def k(w_ptr, stride, nbytes, valid, ROWS: tl.constexpr, THREADS: tl.constexpr):
    prefetch_rows_l2(w_ptr, stride, 0, nbytes, valid, ROWS, THREADS)

sig = {"w_ptr": "*i32", "stride": "i32", "nbytes": "i32", "valid": "i32", "ROWS": "constexpr",
       "THREADS": "constexpr"}
src = ASTSource(fn=k, signature=sig, constexprs={"ROWS": 16, "THREADS": 128},
                attrs={(0,): [["tt.divisibility", 16]]})
c = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})
tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
    f.write(c.asm["cubin"])
    f.flush()
    sass = subprocess.run([tool, "-sass", f.name], capture_output=True, text=True, check=True).stdout
print("PTX", c.asm["ptx"].count("cp.async.bulk.prefetch.L2.global"))
print("SASS", sass.count("UBLKPF.L2"))
"""


def test_prefetch_compiles_to_a_bulk_l2_prefetch_for_sm90(tmp_path):
    script = tmp_path / "compile_prefetch.py"     # Triton reads a kernel's source file
    script.write_text(_COMPILE)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    out = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True,
                         timeout=240)
    assert out.returncode == 0, out.stderr[-2000:]
    counts = dict(line.split() for line in out.stdout.splitlines())
    assert counts == {"PTX": "1", "SASS": "1"}, out.stdout


@pytest.mark.skipif(not HOPPER, reason="needs a Hopper GPU (inline PTX for sm_90)")
@pytest.mark.parametrize("rows,warps", [(1, 4), (4, 2), (8, 4), (16, 4), (32, 4), (64, 8),
                                        (128, 4), (512, 4)])
def test_each_row_is_issued_exactly_once(rows, warps):
    programs = 3
    for valid in (rows, max(rows - 3, 0)):
        flags = torch.zeros((programs, rows), dtype=torch.int32, device="cuda")
        _count_kernel[(programs,)](flags, valid, ROWS=rows, THREADS=32 * warps, num_warps=warps)
        want = (torch.arange(rows, device="cuda") < valid).int().expand(programs, rows)
        assert torch.equal(flags, want), (rows, warps, valid, flags)


@pytest.mark.skipif(not HOPPER, reason="needs a Hopper GPU (PDL and the bulk prefetch)")
@pytest.mark.parametrize("kind", ["fp8", "int4", "bf16"])
def test_gemvs_compute_the_same_with_the_prefetch(kind, monkeypatch):
    from ember.layers.triton_gemv import gemv
    from ember.quant.fp8 import quantize_fp8
    from ember.quant.int4 import pack_int4, quantize_int4
    from ember.quant.kernels.fp8_gemv import CONFIGS as FP8_CONFIGS, fp8_gemv_triton
    from ember.quant.kernels.w4a16 import INT4_GEMV_CONFIGS, int4_linear_triton
    g = torch.Generator(device="cuda").manual_seed(0)
    n, k = 1000, 4096       # N not a multiple of the tiles: the last program's rows run out
    x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16, generator=g)
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16, generator=g) * 0.02
    if kind == "fp8":
        qw, sw = quantize_fp8(w, True)
        runs = [lambda c=c: fp8_gemv_triton(x, qw, sw.reshape(-1), config=c) for c in FP8_CONFIGS]
    elif kind == "int4":
        q, sc, zp = quantize_int4(w, 128)
        qw, sc = pack_int4(q), sc.to(torch.bfloat16)
        runs = [lambda c=c: int4_linear_triton(x, qw, sc, zp, config=c) for c in INT4_GEMV_CONFIGS]
    else:
        runs = [lambda: gemv(x, w)]
    for run in runs:
        monkeypatch.setenv("EMBER_L2_PREFETCH", "0")
        off = run()
        monkeypatch.setenv("EMBER_L2_PREFETCH", "1")
        on = run()
        torch.cuda.synchronize()
        assert torch.equal(on, off)
