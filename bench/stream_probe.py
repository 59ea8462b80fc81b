"""How fast can a GEMV-shaped kernel stream a weight matrix at all? (H200)

    PYTHONPATH=$PWD python3 bench/stream_probe.py [--int4]

For the FP8 gate_up matrix of Llama-3.1-8B (28672 x 4096 bytes, 117 MB) and its bf16
twin (235 MB), a probe kernel reads every int32 word once in the FP8 GEMV's tiling
(BLOCK_N rows x BLOCK_K bytes per step, SPLIT_K splits, the next tile in registers while
the current one is folded by xor) and writes one word per row: the bandwidth a GEMV of
that tiling could reach if decoding cost nothing. Timed as CUDA-graph replays
(bench/gpu_timing.py), with the real FP8 GEMV and the bf16 Triton GEMV at the same shape
for comparison. If the probe streams no faster than the FP8 GEMV, the GEMV is at its
memory floor for that tiling; if it is faster, the decode is what costs.

--int4: the same for the INT4 (AWQ) gate_up words (28672 x 2048 bytes, 59 MB) in INT4
tilings, four distinct matrices chained in each graph (one alone would half fit in the
H200's L2), beside the INT4 decoder GEMV and the tensor-core GEMV (kernels/int4_mma.py).

and the floor kernel (int4_floor_gemv: the same words, scales, zero points and x read,
nothing decoded) in its tilings.

--ncu: one INT4 gate_up matrix, each of the probe, the decoder GEMV, the tensor-core GEMV
and the bf16 Triton GEMV (its bf16 twin) launched twice, nothing timed: a driver for Nsight
Compute (`ncu -k regex:"probe|gemv" --set full python3 bench/stream_probe.py --ncu`), whose
stall reasons say what holds each kernel below the probe's bandwidth.
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from gpu_timing import capture, graph_replay_ms  # noqa: E402

TILES = ((8, 1024, 1, 2), (16, 512, 1, 4), (64, 256, 4, 4), (64, 256, 4, 8), (32, 512, 4, 4),
         (16, 1024, 1, 4), (32, 1024, 1, 8), (8, 2048, 1, 4), (16, 2048, 1, 8), (4, 4096, 1, 4))


@triton.jit
def _probe_range(N, KW, BLOCK_N: tl.constexpr, WORDS: tl.constexpr, SPLIT_K: tl.constexpr):
    """This program's BLOCK_N rows (past N: the last row again) and its split's [start, end)
    of the KW words a row, in whole WORDS steps."""
    n = tl.minimum(tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N), N - 1)
    per = (KW // WORDS + SPLIT_K - 1) // SPLIT_K * WORDS
    start = tl.program_id(1) * per
    return n, start, tl.minimum(start + per, KW)


@triton.jit
def _probe_kernel(w_ptr, out_ptr, N, KW, stride_wn, BLOCK_N: tl.constexpr, WORDS: tl.constexpr,
                  SPLIT_K: tl.constexpr):
    n, start, end = _probe_range(N, KW, BLOCK_N, WORDS, SPLIT_K)
    wi = tl.arange(0, WORDS)
    rows = w_ptr + n[:, None] * stride_wn + wi[None, :]
    acc = tl.zeros((BLOCK_N, WORDS), dtype=tl.int32)
    q = tl.load(rows + start, mask=(start < end), other=0, eviction_policy="evict_first")
    for k0 in range(start, end, WORDS):
        nq = tl.load(rows + k0 + WORDS, mask=(k0 + WORDS < end), other=0, eviction_policy="evict_first")
        acc ^= q
        q = nq
    tl.store(out_ptr + tl.program_id(1) * N + n, tl.xor_sum(acc, axis=1))


@triton.jit
def _floor_gemv_kernel(x_ptr, y_ptr, w_ptr, s_ptr, z_ptr, N, K, stride_wn, stride_sn, never,
                       G: tl.constexpr, BLOCK_N: tl.constexpr, WORDS: tl.constexpr, SPLIT_K: tl.constexpr,
                       GROUPS: tl.constexpr, PDL: tl.constexpr):
    """An INT4 'GEMV' that reads what the real one reads (x, the packed words [N, K / 8],
    the scales and zero points [N, K / G]) and decodes nothing: each program xors its
    words and writes y = 0 for its rows (1 if the xor happens to equal `never`, a runtime
    value, so that no load can be dropped by the compiler). Launched as the GEMVs are (PDL:
    the first words requested before waiting on the kernel before). The floor under any
    INT4 GEMV of this tiling: bench/quant_gpu.py's 'awq-floor' variants."""
    n, start, end = _probe_range(N, K // 8, BLOCK_N, WORDS, SPLIT_K)
    wi = tl.arange(0, WORDS)
    rows = w_ptr + n[:, None] * stride_wn + wi[None, :]
    acc = tl.zeros((BLOCK_N, WORDS), dtype=tl.int32)
    q = tl.load(rows + start, mask=start < end, other=0)
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    gi = start * 8 // G + tl.arange(0, GROUPS)
    g_mask = (gi < end * 8 // G)[None, :]
    sz = tl.load(s_ptr + n[:, None] * stride_sn + gi[None, :], mask=g_mask, other=0).to(tl.int16, bitcast=True)
    sz = sz.to(tl.int32) ^ tl.load(z_ptr + n[:, None] * stride_sn + gi[None, :], mask=g_mask, other=0).to(tl.int32)
    kx = start * 8 + tl.arange(0, WORDS * 8)
    xs = tl.zeros((WORDS * 8,), dtype=tl.int32)
    for k0 in range(start, end, WORDS):
        nq = tl.load(rows + k0 + WORDS, mask=k0 + WORDS < end, other=0)
        xs ^= tl.load(x_ptr + kx, mask=kx < end * 8, other=0.0).to(tl.int16, bitcast=True).to(tl.int32)
        kx += WORDS * 8
        acc ^= q
        q = nq
    total = tl.xor_sum(acc, axis=1) ^ tl.xor_sum(sz, axis=1) ^ tl.xor_sum(xs, axis=0)
    tl.store(y_ptr + n, tl.where(total == never, 1.0, 0.0).to(y_ptr.dtype.element_ty))


# (BLOCK_N rows, WORDS a row a step, SPLIT_K, warps) for the floor kernel: probe tilings.
FLOOR_TILES = ((32, 32, 1, 4), (32, 32, 2, 4), (16, 128, 1, 8), (16, 64, 2, 4), (8, 256, 1, 4), (32, 64, 4, 4),
               (64, 32, 4, 4), (16, 32, 8, 2))


def int4_floor_gemv(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, qzeros: torch.Tensor) -> torch.Tensor:
    """x: [1, K] (one row, bf16); qweight [N, K / 8] int32; scales [N, K / G] bf16; qzeros
    [N, K / G] uint8 -> y [1, N], zeros: the floor kernel with the fastest of FLOOR_TILES
    for this shape (tuned as the engine's kernels are, outside graph capture)."""
    from ember.layers.pdl import pdl_launch
    from ember.quant.kernels.splitk import choose_config
    n, k = qweight.shape[0], qweight.shape[1] * 8
    group = k // scales.shape[1]
    y = torch.empty((1, n), dtype=x.dtype, device=x.device)

    def run(c: tuple) -> None:
        bn, words, split, warps = c
        _floor_gemv_kernel[(triton.cdiv(n, bn), split)](
            x, y, qweight, scales, qzeros, n, k, qweight.stride(0), scales.stride(0), -12345, G=group,
            BLOCK_N=bn, WORDS=words, SPLIT_K=split,
            GROUPS=triton.next_power_of_2(triton.cdiv(k // 8 // words, split) * words * 8 // group), num_warps=warps,
            **pdl_launch(x))

    cands = [c for c in FLOOR_TILES if (k // 8) % c[1] == 0 and (c[1] * 8) % group == 0]
    run(choose_config(("floor", n, k, group), cands, run, x))
    return y


def probe_us(w: torch.Tensor, tile: tuple[int, int, int, int]) -> float:
    bn, bk, split, warps = tile
    n, kw = w.shape
    out = torch.empty((split, n), dtype=torch.int32, device=w.device)
    fn = lambda: _probe_kernel[(triton.cdiv(n, bn), split)](  # noqa: E731
        w, out, n, kw, w.stride(0), BLOCK_N=bn, WORDS=bk // 4, SPLIT_K=split, num_warps=warps)
    return graphed_us(fn)


def graphed_us(fn, calls: int = 10) -> float:
    g = capture(fn, calls)
    return min(graph_replay_ms(g, 10) for _ in range(5)) * 1e3 / calls


INT4_TILES = ((32, 128, 2, 4), (32, 128, 1, 4), (16, 512, 1, 8), (16, 1024, 1, 8), (8, 1024, 1, 4),
              (64, 128, 4, 4), (16, 128, 1, 2), (32, 256, 1, 8), (16, 2048, 1, 8))


def int4_main() -> None:
    from ember.quant.int4 import pack_int4, quantize_int4
    from ember.quant.kernels.w4a16 import int4_linear_triton
    torch.manual_seed(0)
    n, k = 28672, 4096
    mats = []
    for _ in range(4):
        q, s, z = quantize_int4(torch.randn(n, k, device="cuda") * 0.02, 128)
        mats.append((pack_int4(q), s.to(torch.bfloat16), z))
    x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
    nbytes = mats[0][0].numel() * 4
    print(f"{torch.cuda.get_device_name()}, INT4 gate_up {n} x {k}: {nbytes / 1e6:.0f} MB a matrix, 4 chained")

    def per_matrix_us(one) -> float:
        return graphed_us(lambda: [one(m) for m in mats], calls=2) / 4

    for tile in INT4_TILES:
        bn, bk, split, warps = tile
        out = torch.empty((split, n), dtype=torch.int32, device="cuda")
        us = per_matrix_us(lambda m: _probe_kernel[(triton.cdiv(n, bn), split)](
            m[0], out, n, m[0].shape[1], m[0].stride(0), BLOCK_N=bn, WORDS=bk // 4, SPLIT_K=split,
            num_warps=warps))
        print(f"probe tile {tile} (rows, bytes a row a step, splits, warps): {us:.1f} us, "
              f"{nbytes / us / 1e6:.2f} TB/s", flush=True)
    for tile in FLOOR_TILES:
        bn, words, split, warps = tile
        y = torch.empty((1, n), dtype=torch.bfloat16, device="cuda")
        us = per_matrix_us(lambda m: _floor_gemv_kernel[(triton.cdiv(n, bn), split)](
            x, y, m[0], m[1], m[2], n, k, m[0].stride(0), m[1].stride(0), -12345, G=128, BLOCK_N=bn, WORDS=words,
            SPLIT_K=split, GROUPS=triton.next_power_of_2(triton.cdiv(k // 8 // words, split) * words * 8 // 128),
            PDL=False, num_warps=warps))
        print(f"floor GEMV tile {tile} (rows, words a row a step, splits, warps; words + scales + zeros + x): "
              f"{us:.1f} us, {nbytes / us / 1e6:.2f} TB/s of words", flush=True)
    for config in ((32, 256, 2, 4, 1), (16, 1024, 1, 8, 1), ("mma", 2, 1, 2, 1, 0), ("mma", 4, 1, 1, 0, 0),
                   ("mma", 8, 1, 4, 0, 0)):
        us = per_matrix_us(lambda m: int4_linear_triton(x, *m, config=config))
        print(f"INT4 GEMV {config}: {us:.1f} us, {nbytes / us / 1e6:.2f} TB/s", flush=True)


def ncu_main() -> None:
    from ember.layers.triton_gemv import gemv
    from ember.quant.int4 import pack_int4, quantize_int4
    from ember.quant.kernels.w4a16 import int4_linear_triton
    torch.manual_seed(0)
    n, k = 28672, 4096
    wb = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
    q, s, z = quantize_int4(wb.float(), 128)
    w, s = pack_int4(q), s.to(torch.bfloat16)
    x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
    bn, bk, split, warps = INT4_TILES[0]
    out = torch.empty((split, n), dtype=torch.int32, device="cuda")
    for _ in range(2):
        _probe_kernel[(triton.cdiv(n, bn), split)](w, out, n, w.shape[1], w.stride(0), BLOCK_N=bn,
                                                   WORDS=bk // 4, SPLIT_K=split, num_warps=warps)
        for config in ((32, 256, 2, 4, 1), ("mma", 2, 1, 2, 1, 0), ("mma", 4, 1, 1, 0, 0)):
            int4_linear_triton(x, w, s, z, config=config)
        gemv(x, wb)
    torch.cuda.synchronize()
    print("ran: probe", INT4_TILES[0], "decoder GEMV (32, 256, 2, 4, 1), MMA GEMV (2, 1, 2, 1, 0) and "
          "(4, 1, 1, 0, 0), bf16 GEMV; twice each")


def main() -> None:
    if "--ncu" in sys.argv:
        return ncu_main()
    if "--int4" in sys.argv:
        return int4_main()
    from ember.layers.triton_gemv import gemv
    from ember.quant.fp8 import quantize_fp8
    from ember.quant.kernels.fp8_gemv import CONFIGS, fp8_gemv_triton
    torch.manual_seed(0)
    n, k = 28672, 4096
    wb = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
    q8, s8 = quantize_fp8(wb, True)
    s8 = s8.reshape(-1)
    x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
    words8 = q8.view(torch.uint8).view(torch.int32)          # [N, K / 4]
    words16 = wb.view(torch.int32)                          # [N, K / 2]
    print(f"{torch.cuda.get_device_name()}, gate_up {n} x {k}: FP8 {q8.numel() / 1e6:.0f} MB, "
          f"bf16 {wb.numel() * 2 / 1e6:.0f} MB")
    us = graphed_us(lambda: gemv(x, wb))
    print(f"bf16 Triton GEMV (its default tile): {us:.1f} us, {wb.numel() * 2 / us / 1e6:.2f} TB/s")
    for tile in TILES:
        cells = []
        for name, w, nbytes in (("FP8", words8, q8.numel()), ("bf16", words16, wb.numel() * 2)):
            us = probe_us(w, tile)
            cells.append(f"probe {name} matrix {us:.1f} us {nbytes / us / 1e6:.2f} TB/s")
        for packed in (0, 1):
            us = graphed_us(lambda: fp8_gemv_triton(x, q8, s8, config=tile + (packed,)))
            cells.append(f"FP8 GEMV{' packed' if packed else ''} {us:.1f} us {q8.numel() / us / 1e6:.2f} TB/s")
        print(f"tile {tile}{' (a tuner candidate)' if tile in [c[:4] for c in CONFIGS] else ''}: "
              + "; ".join(cells), flush=True)


if __name__ == "__main__":
    main()
