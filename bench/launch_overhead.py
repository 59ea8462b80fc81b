"""Host time of one eager kernel launch (the eager prefill is host-bound on the H200's host).

    PYTHONPATH=$PWD python3 bench/launch_overhead.py

Each row: microseconds of host time per call, averaged over --calls back-to-back calls of
a tiny problem (the device finishes each in a few us, so the host's time is what is
measured), after a warm-up. Rows: torch ops for scale, a Triton kernel launched the usual
way (`fn[grid](...)`, with and without PDL), the same compiled kernel launched directly
(`CompiledKernel.run`, what is left once Triton's argument binding and cache lookup are
skipped), and ember's FP8 activation quantization as the W8A8 path calls it.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402


def host_us(fn, calls: int) -> float:
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(calls):
        fn()
    took = time.perf_counter() - t
    torch.cuda.synchronize()
    return took / calls * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calls", type=int, default=2000)
    args = ap.parse_args()
    from ember.quant.fp8 import quantize_fp8
    from ember.quant.kernels.fp8_quant import _quant_rows_kernel, quantize_fp8_rows
    m, k = 128, 4096
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    q = torch.empty((m, k), dtype=torch.uint8, device="cuda")
    s = torch.empty((m, 1), dtype=torch.float32, device="cuda")
    w = torch.randn(256, k, device="cuda", dtype=torch.bfloat16)
    qw, sw = quantize_fp8(w, True)
    qx, sx = quantize_fp8_rows(x)
    sw = sw.reshape(1, -1)

    def launch(pdl: bool):
        opts = {"PDL": True, "launch_pdl": True} if pdl else {"PDL": False}
        return lambda: _quant_rows_kernel[(m,)](x, q, s, k, x.stride(0), q.stride(0), BLOCK=4096,
                                               num_warps=8, **opts)

    rows: list[tuple[str, object]] = [
        ("torch.empty [128, 4096] uint8", lambda: torch.empty((m, k), dtype=torch.uint8, device="cuda")),
        ("x.abs() (one elementwise op)", lambda: x.abs()),
        ("F.linear [128, 4096] x [256, 4096]", lambda: F.linear(x, w)),
        ("torch._scaled_mm row-wise, same shape", lambda: torch._scaled_mm(
            qx, qw.t(), scale_a=sx, scale_b=sw, out_dtype=torch.bfloat16)),
        ("Triton fn[grid](...), PDL off", launch(False)),
        ("Triton fn[grid](...), PDL on", launch(True)),
    ]
    for pdl in (False, True):
        kernel = launch(pdl)()
        stream = torch.cuda.current_stream().cuda_stream
        bound = (x, q, s, k, x.stride(0), q.stride(0), 4096, pdl)
        rows.append((f"CompiledKernel.run direct, PDL {'on' if pdl else 'off'}",
                     lambda kernel=kernel, bound=bound: kernel.run(
                         m, 1, 1, stream, kernel.function, kernel.packed_metadata, None, None, None,
                         *bound)))
    rows.append(("ember quantize_fp8_rows(x) (allocations + launch)", lambda: quantize_fp8_rows(x)))
    torch.cuda.synchronize()
    print(f"host us per call, {args.calls} calls, {torch.cuda.get_device_name()}, torch "
          f"{torch.__version__}")
    for name, fn in rows:
        print(f"{host_us(fn, args.calls):8.1f}  {name}", flush=True)
    # The direct launch must compute what the usual one does.
    q2 = q.clone()
    q.zero_()
    rows[-2][1]()
    torch.cuda.synchronize()
    print("direct launch output equal to fn[grid]'s:", bool(torch.equal(q, q2)))


if __name__ == "__main__":
    main()
