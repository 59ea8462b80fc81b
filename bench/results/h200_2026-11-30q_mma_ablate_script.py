"""Scratch (not kept): what the MMA GEMV's L1 traffic costs. Variants of the BLOCKS=1 kernel:
scales hoisted out of the loop (NOSCALE), x hoisted (NOX), both, and s/z packed in one int32."""
import os, sys
sys.path.insert(0, os.getcwd()); sys.path.insert(0, os.path.join(os.getcwd(), "bench"))
import torch, triton, triton.language as tl
from gpu_timing import capture, graph_replay_ms
from ember.quant.kernels.int4_mma import _maybe_masked, _split4, _mma_pair, _store_rows, STEP_COLUMNS
from ember.quant.kernels.decode import int4_zero_pair, native_decode, x_operand
from ember.quant.kernels.splitk import k_range, split_buffers, finish_splits
from ember.quant.int4 import pack_int4, quantize_int4


@triton.jit
def _scales(s_lo, s_hi, z_lo, z_hi, grp, PACKED: tl.constexpr):
    if PACKED:
        vl = tl.load(s_lo + grp)
        vh = tl.load(s_hi + grp)
        return ((vl & -65536).to(tl.float32, bitcast=True), (vh & -65536).to(tl.float32, bitcast=True),
                vl & 0xFF, vh & 0xFF)
    return (tl.load(s_lo + grp).to(tl.float32), tl.load(s_hi + grp).to(tl.float32),
            tl.load(z_lo + grp).to(tl.int32), tl.load(z_hi + grp).to(tl.int32))


@triton.jit
def _k(x_ptr, y_ptr, part_ptr, cnt_ptr, w_ptr, s_ptr, z_ptr, M, N, K, stride_xm, stride_wn, stride_sn,
       G: tl.constexpr, NATIVE: tl.constexpr, WARPS: tl.constexpr, UNROLL: tl.constexpr, SUB: tl.constexpr,
       NOSCALE: tl.constexpr, NOX: tl.constexpr, PACKED: tl.constexpr):
    CHUNK: tl.constexpr = STEP_COLUMNS * WARPS
    STEP: tl.constexpr = CHUNK * UNROLL
    e = tl.arange(0, 32 * WARPS)
    wi = e // 32
    g = (e % 32) // 4
    t = e % 4
    row_lo = tl.minimum(tl.program_id(0) * 16 + g, N - 1)
    row_hi = tl.minimum(tl.program_id(0) * 16 + g + 8, N - 1)
    four = tl.arange(0, 4)[None, :]
    col = wi * STEP_COLUMNS + t * 32
    w_lo = (w_ptr + row_lo * stride_wn + col // 8)[:, None] + four
    w_hi = (w_ptr + row_hi * stride_wn + col // 8)[:, None] + four
    x_lanes = x_ptr + (tl.minimum(g, M - 1) * stride_xm + col // 2)[:, None] + four
    s_lo = s_ptr + row_lo * stride_sn
    s_hi = s_ptr + row_hi * stride_sn
    z_lo = z_ptr + row_lo * stride_sn
    z_hi = z_ptr + row_hi * stride_sn
    a0 = tl.zeros((32 * WARPS,), dtype=tl.float32)
    a1 = a0
    a2 = a0
    a3 = a0
    sc0 = _scales(s_lo, s_hi, z_lo, z_hi, wi, PACKED)
    x00, x01, x02, x03 = _split4(tl.load(x_lanes))
    x10, x11, x12, x13 = _split4(tl.load(x_lanes + 4))
    x20, x21, x22, x23 = _split4(tl.load(x_lanes + 8))
    x30, x31, x32, x33 = _split4(tl.load(x_lanes + 12))
    for kk in range(0, K, STEP):
        kk = tl.multiple_of(kk, STEP)
        k0 = kk + wi * STEP_COLUMNS
        words = ()
        scales = ()
        for j in tl.static_range(UNROLL):
            words = words + ((tl.load(w_lo + (kk + j * CHUNK) // 8), tl.load(w_hi + (kk + j * CHUNK) // 8)),)
            if NOSCALE:
                scales = scales + (sc0,)
            else:
                scales = scales + (_scales(s_lo, s_hi, z_lo, z_hi, (k0 + j * CHUNK) // G, PACKED),)
        for j in tl.static_range(UNROLL):
            sc = scales[j]
            zz_lo = int4_zero_pair(sc[2])
            zz_hi = int4_zero_pair(sc[3])
            lo = _split4(words[j][0])
            hi = _split4(words[j][1])
            c0 = tl.zeros_like(a0)
            c1 = c0
            c2 = c0
            c3 = c0
            xs0 = c0
            xs1 = c0
            xa = x_lanes + (kk + j * CHUNK) // 2
            for u in tl.static_range(4):
                if NOX:
                    if u == 0:
                        xq = (x00, x01, x02, x03)
                    elif u == 1:
                        xq = (x10, x11, x12, x13)
                    elif u == 2:
                        xq = (x20, x21, x22, x23)
                    else:
                        xq = (x30, x31, x32, x33)
                else:
                    xq = _split4(tl.load(xa + 4 * u))
                c0, c1, c2, c3, xs0, xs1 = _mma_pair(lo[u], hi[u], zz_lo, zz_hi, xq[0], xq[1], xq[2], xq[3],
                                                     c0, c1, c2, c3, xs0, xs1, NATIVE, SUB, WARPS)
            if not SUB:
                off_lo = sc[2].to(tl.float32) + 128.0
                off_hi = sc[3].to(tl.float32) + 128.0
                c0 -= off_lo * xs0
                c1 -= off_lo * xs1
                c2 -= off_hi * xs0
                c3 -= off_hi * xs1
            a0 += sc[0] * c0
            a1 += sc[0] * c1
            a2 += sc[1] * c2
            a3 += sc[1] * c3
    _store_rows(a0, a1, a2, a3, y_ptr, part_ptr, cnt_ptr, M, N, 0, tl.program_id(0), 1, False, WARPS)


def run(x, w, s, z, sz, warps, unroll, sub, noscale, nox, packed):
    m, n, k = x.shape[0], w.shape[0], w.shape[1] * 8
    y = torch.empty((m, n), dtype=torch.bfloat16, device=x.device)
    xk = x_operand(x)[0]
    _k[(triton.cdiv(n, 16), 1, 1)](xk, y, y, y, w, sz if packed else s, z, m, n, k, xk.stride(0), w.stride(0),
                                  s.stride(0), G=128, NATIVE=True, WARPS=warps, UNROLL=unroll, SUB=sub,
                                  NOSCALE=noscale, NOX=nox, PACKED=packed, num_warps=warps)
    return y


def main():
    from ember.quant.kernels.w4a16 import int4_linear_triton
    from ember.quant.kernels import int4_linear_ref
    torch.manual_seed(0)
    for name, (k, n) in {"gate_up": (4096, 28672), "down": (14336, 4096), "qkv": (4096, 6144)}.items():
        mats = []
        for _ in range(4):
            q, s, z = quantize_int4(torch.randn(n, k, device="cuda") * 0.02, 128)
            s = s.to(torch.bfloat16)
            sz = (s.view(torch.int16).to(torch.int32) << 16) | z.to(torch.int32)
            mats.append((pack_int4(q), s, z, sz.contiguous()))
        x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        ref = int4_linear_ref(x, mats[0][0], mats[0][1], mats[0][2]).float()
        nbytes = mats[0][0].numel() * 4

        def us(one):
            gr = capture(lambda: [one(m) for m in mats], 2)
            return min(graph_replay_ms(gr, 10) for _ in range(5)) * 1e3 / 8
        for cfg in (("mma", 2, 1, 2, 1, 0), ("mma", 8, 1, 2, 0, 0), ("mma", 4, 1, 1, 0, 0)):
            print(f"{name} shipped {cfg}: {us(lambda m: int4_linear_triton(x, *m[:3], config=cfg)):.1f} us", flush=True)
        for warps, unroll, sub in ((2, 2, True), (8, 2, False), (4, 1, False)):
            for noscale, nox, packed in ((0, 0, 0), (1, 0, 0), (0, 1, 0), (1, 1, 0), (0, 0, 1)):
                f = lambda m: run(x, *m, warps, unroll, sub, bool(noscale), bool(nox), bool(packed))  # noqa
                err = ""
                if not noscale and not nox:
                    y = f(mats[0]).float()
                    err = f" rel_err {((y - ref).norm() / ref.norm()).item():.4f}"
                print(f"{name} w{warps} u{unroll} sub{int(sub)} noscale{noscale} nox{nox} packed{packed}: "
                      f"{us(f):.1f} us ({nbytes / 1e6:.0f} MB){err}", flush=True)


if __name__ == "__main__":
    main()
