"""Fused Triton kernels for the elementwise layer ops: one launch each instead of 4-10.

- `_rmsnorm_kernel`: one program per row; optionally adds the residual first and writes
  the sum back into the residual buffer and the normalized row into x's (in place).
- `_rope_kernel`: one program per (token, q-or-k); rotates every head of the token in
  place, reading cos/sin straight from the table by position (no per-step gather), with
  Qwen3's per-head RMSNorm folded in.
- `_silu_mul_kernel`: silu(gate) * up over the merged gate/up GEMM output.

Each rounds to the activation dtype where the torch reference (`TorchLayerOps`) does, so
they match it to within one rounding step. No host syncs, so decode graphs capture them.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ember.layers.layer_ops import LayerOps, RopeStep
from ember.layers.pdl import pdl_launch


@triton.jit
def _rmsnorm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, stride_x, stride_r, stride_o, n_cols, eps,
                    HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr):
    if PDL:   # launched early (ember.layers.pdl): wait for the kernel before, let the next start
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + row * stride_r + cols, mask=mask, other=0.0)
        # The sum is rounded to the activation dtype before it is normalized, as in torch.
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x.dtype)
        tl.store(res_ptr + row * stride_r + cols, x, mask=mask)
    xf = x.to(tl.float32)
    inv_rms = tl.rsqrt(tl.sum(xf * xf, axis=0) / n_cols + eps)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0)
    y = (xf * inv_rms).to(x.dtype).to(tl.float32) * w.to(tl.float32)
    tl.store(out_ptr + row * stride_o + cols, y.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rope_heads(x_ptr, t, stride_t, stride_h, cos, sin, w_ptr, eps,
                NUM_HEADS: tl.constexpr, HEADS_P2: tl.constexpr,
                HALF: tl.constexpr, HALF_P2: tl.constexpr, HAS_NORM: tl.constexpr):
    h = tl.arange(0, HEADS_P2)[:, None]
    i = tl.arange(0, HALF_P2)[None, :]
    mask = (h < NUM_HEADS) & (i < HALF)
    lo = x_ptr + t * stride_t + h * stride_h + i
    x1 = tl.load(lo, mask=mask, other=0.0)
    x2 = tl.load(lo + HALF, mask=mask, other=0.0)
    a = x1.to(tl.float32)
    b = x2.to(tl.float32)
    if HAS_NORM:
        inv_rms = tl.rsqrt((tl.sum(a * a, axis=1) + tl.sum(b * b, axis=1)) / (2 * HALF) + eps)
        w1 = tl.load(w_ptr + i, mask=i < HALF, other=0.0).to(tl.float32)
        w2 = tl.load(w_ptr + HALF + i, mask=i < HALF, other=0.0).to(tl.float32)
        a = (w1 * (a * inv_rms[:, None]).to(x1.dtype).to(tl.float32)).to(x1.dtype).to(tl.float32)
        b = (w2 * (b * inv_rms[:, None]).to(x1.dtype).to(tl.float32)).to(x1.dtype).to(tl.float32)
    tl.store(lo, (a * cos - b * sin).to(x1.dtype), mask=mask)
    tl.store(lo + HALF, (b * cos + a * sin).to(x1.dtype), mask=mask)


@triton.jit
def _rope_kernel(q_ptr, k_ptr, pos_ptr, cos_ptr, sin_ptr, qw_ptr, kw_ptr, eps,
                 stride_qt, stride_qh, stride_kt, stride_kh,
                 Q_HEADS: tl.constexpr, Q_HEADS_P2: tl.constexpr,
                 K_HEADS: tl.constexpr, K_HEADS_P2: tl.constexpr,
                 HALF: tl.constexpr, HALF_P2: tl.constexpr, HAS_NORM: tl.constexpr, PDL: tl.constexpr):
    if PDL:   # launched early (ember.layers.pdl): wait for the kernel before, let the next start
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    t = tl.program_id(0)
    i = tl.arange(0, HALF_P2)[None, :]
    pos = tl.load(pos_ptr + t)
    cos = tl.load(cos_ptr + pos * HALF + i, mask=i < HALF, other=0.0)  # [1, HALF_P2] fp32
    sin = tl.load(sin_ptr + pos * HALF + i, mask=i < HALF, other=0.0)
    if tl.program_id(1) == 0:
        _rope_heads(q_ptr, t, stride_qt, stride_qh, cos, sin, qw_ptr, eps,
                    Q_HEADS, Q_HEADS_P2, HALF, HALF_P2, HAS_NORM)
    else:
        _rope_heads(k_ptr, t, stride_kt, stride_kh, cos, sin, kw_ptr, eps,
                    K_HEADS, K_HEADS_P2, HALF, HALF_P2, HAS_NORM)


@triton.jit
def _silu_mul_kernel(x_ptr, out_ptr, stride_x, stride_o, d, BLOCK: tl.constexpr, PDL: tl.constexpr):
    if PDL:   # launched early (ember.layers.pdl): wait for the kernel before, let the next start
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    t = tl.program_id(0)
    c = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = c < d
    gate = tl.load(x_ptr + t * stride_x + c, mask=mask, other=0.0)
    up = tl.load(x_ptr + t * stride_x + d + c, mask=mask, other=0.0)
    g = gate.to(tl.float32)
    act = (g / (1.0 + tl.exp(-g))).to(gate.dtype)  # silu, rounded as F.silu rounds
    tl.store(out_ptr + t * stride_o + c, (act.to(tl.float32) * up.to(tl.float32)).to(gate.dtype),
             mask=mask)


def _norm_warps(block: int) -> int:
    return 8 if block >= 2048 else 4 if block >= 512 else 1


def _rows(x: torch.Tensor) -> torch.Tensor:
    """[..., d] -> [rows, d] with unit stride along d (a view when possible)."""
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


class TritonLayerOps(LayerOps):
    name = "triton"

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        x2 = _rows(x)
        out = torch.empty_like(x2)
        block = triton.next_power_of_2(x2.shape[1])
        _rmsnorm_kernel[(x2.shape[0],)](x2, x2, weight, out, x2.stride(0), x2.stride(0),
                                        out.stride(0), x2.shape[1], eps, HAS_RESIDUAL=False,
                                        BLOCK=block, num_warps=_norm_warps(block), **pdl_launch(x2))
        return out.view(x.shape)

    def add_rms_norm(self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                     eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        # In place: residual <- x + residual, x <- norm(x + residual). No allocation.
        assert x.dim() == 2 and x.stride(-1) == 1 and residual.stride(-1) == 1
        block = triton.next_power_of_2(x.shape[1])
        _rmsnorm_kernel[(x.shape[0],)](x, residual, weight, x, x.stride(0), residual.stride(0),
                                       x.stride(0), x.shape[1], eps, HAS_RESIDUAL=True,
                                       BLOCK=block, num_warps=_norm_warps(block), **pdl_launch(x))
        return x, residual

    def rope_step(self, cos_table: torch.Tensor, sin_table: torch.Tensor,
                  positions: torch.Tensor) -> RopeStep:
        return RopeStep(positions, cos_table, sin_table)

    def rope(self, step: RopeStep, q: torch.Tensor, k: torch.Tensor,
             q_norm: torch.Tensor | None = None, k_norm: torch.Tensor | None = None,
             eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
        # In place on q and k (views into the fresh qkv GEMM output).
        assert q.stride(-1) == 1 and k.stride(-1) == 1
        t, qh, d = q.shape
        kh = k.shape[1]
        half = d // 2
        has_norm = q_norm is not None
        _rope_kernel[(t, 2)](
            q, k, step.positions, step.cos, step.sin,
            q_norm if has_norm else q, k_norm if has_norm else k, eps,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1),
            Q_HEADS=qh, Q_HEADS_P2=triton.next_power_of_2(qh),
            K_HEADS=kh, K_HEADS_P2=triton.next_power_of_2(kh),
            HALF=half, HALF_P2=triton.next_power_of_2(half), HAS_NORM=has_norm, num_warps=4,
            **pdl_launch(q))
        return q, k

    def silu_and_mul(self, x: torch.Tensor) -> torch.Tensor:
        x2 = _rows(x)
        d = x2.shape[1] // 2
        out = torch.empty((x2.shape[0], d), dtype=x.dtype, device=x.device)
        block = min(1024, triton.next_power_of_2(d))
        _silu_mul_kernel[(x2.shape[0], triton.cdiv(d, block))](
            x2, out, x2.stride(0), out.stride(0), d, BLOCK=block, num_warps=4, **pdl_launch(x2))
        return out.view(*x.shape[:-1], d)
