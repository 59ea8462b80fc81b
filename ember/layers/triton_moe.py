"""The routed experts as two grouped-GEMM launches (Triton), with no host sync.

The (token, slot) pairs of a step are sorted by expert and each expert's run of pairs is
padded to a multiple of BLOCK_M (`align_by_expert`, plain torch on the device), so every
M tile belongs to one expert. One kernel then covers all experts in a single launch over
(M tile, N tile): it reads the tile's expert id, gathers its activation rows through the
sorted pair indices, multiplies by that expert's weight tile, and writes each result row
to the pair's own row of the output. Tiles past the padded total (the grid is sized for
the worst case so no count has to reach the host) exit at once; that is what makes a
decode step capturable in a CUDA graph.

    inter[p]  = x[p // k] @ w13[e_p]^T                 launch 1, [T * k, 2 * I]
    act       = silu(gate) * up                        the layer ops' silu_and_mul
    y[p]      = w_p * (act[p] @ w2[e_p]^T)             launch 2, [T * k, H]
    out[t]    = sum_j y[t * k + j]                     one reduction, fp32

Because every pair owns its output row, the combine is a reshape and a sum: no atomics,
and the result does not depend on the order of the tiles. The routing weight is applied to
the fp32 accumulator before the one rounding to the activation dtype.

Torch reference: `ReferenceExperts` (moe_experts.py).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ember.attention.triton_common import dot_flags, mma
from ember.layers.layer_ops import TORCH_LAYER_OPS, LayerOps
from ember.layers.moe_experts import MoEExperts


@dataclass(frozen=True)
class MoEGemmConfig:
    block_m: int
    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 3


def choose_config(num_pairs: int, num_experts: int) -> MoEGemmConfig:
    """Tiles by the average number of rows per expert: few rows (decode) want a short M tile,
    so little of each weight tile's work is padding, and a long K tile to stream weights."""
    rows = num_pairs / num_experts
    if rows <= 16:
        return MoEGemmConfig(16, 64, 128)
    if rows <= 48:
        return MoEGemmConfig(32, 64, 64)
    return MoEGemmConfig(64, 128, 64, num_warps=8)


def align_by_expert(ids: torch.Tensor,  # [T, k] expert of each (token, slot)
                    num_experts: int, block_m: int,
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sort the pairs by expert and pad each expert's run to a multiple of block_m.

    Returns (pairs [num_blocks * block_m] int32: pair index t * k + j, or T * k for padding;
    block_expert [num_blocks] int32: the expert of each M tile; num_padded [1] int32: how many
    entries of `pairs` are in use). num_blocks is a bound that needs no look at the data.
    """
    flat = ids.reshape(-1)
    m = flat.numel()
    dev = flat.device
    # scatter_add_, not bincount: bincount would read its maximum back to the host.
    counts = torch.zeros(num_experts, dtype=torch.int64, device=dev)
    counts.scatter_add_(0, flat, torch.ones_like(flat))
    padded = (counts + block_m - 1) // block_m * block_m
    padded_end = padded.cumsum(0)
    order = flat.argsort(stable=True)                                   # pairs by expert
    expert_of_sorted = flat[order]
    rank = torch.arange(m, device=dev) - (counts.cumsum(0) - counts)[expert_of_sorted]
    dest = (padded_end - padded)[expert_of_sorted] + rank
    # Each non-empty expert adds less than one tile of padding.
    num_blocks = triton.cdiv(m, block_m) + min(num_experts, m)
    pairs = torch.full((num_blocks * block_m,), m, dtype=torch.int32, device=dev)
    pairs[dest] = order.to(torch.int32)
    block_start = torch.arange(num_blocks, device=dev) * block_m
    block_expert = torch.searchsorted(padded_end, block_start, right=True)
    block_expert = block_expert.clamp_(max=num_experts - 1).to(torch.int32)
    return pairs, block_expert, padded_end[-1:].to(torch.int32)


@triton.jit
def _moe_gemm_kernel(a_ptr, b_ptr, c_ptr, w_ptr, pairs_ptr, block_expert_ptr, num_padded_ptr,
                     num_pairs, N, K, stride_am, stride_be, stride_bn, stride_cm,
                     A_ROW_DIV: tl.constexpr, MUL_WEIGHT: tl.constexpr,
                     PRECISION: tl.constexpr, UPCAST: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m = tl.program_id(0)
    if pid_m * BLOCK_M >= tl.load(num_padded_ptr):
        return
    pid_n = tl.program_id(1)
    pair = tl.load(pairs_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))     # [BLOCK_M]
    row_ok = pair < num_pairs
    a_row = (pair // A_ROW_DIV).to(tl.int64)
    expert = tl.load(block_expert_ptr + pid_m).to(tl.int64)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = rn < N
    rk = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + a_row[:, None] * stride_am + rk[None, :]                           # [M, K]
    b_ptrs = b_ptr + expert * stride_be + rn[None, :].to(tl.int64) * stride_bn + rk[:, None]  # [K, N]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k in range(0, K, BLOCK_K):
        k_ok = rk < K - k
        a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        acc = mma(a, b, acc, PRECISION, UPCAST)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K
    if MUL_WEIGHT:
        acc = acc * tl.load(w_ptr + pair, mask=row_ok, other=0.0)[:, None]
    c_ptrs = c_ptr + pair[:, None].to(tl.int64) * stride_cm + rn[None, :]
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=row_ok[:, None] & n_ok[None, :])


def moe_gemm(a: torch.Tensor,              # [rows, K]; pair p reads row p // a_row_div
             b: torch.Tensor,              # [E, N, K]
             out: torch.Tensor,            # [T * k, N], row p written for pair p
             pair_weights: torch.Tensor | None,  # [T * k] fp32, multiplied in when given
             pairs: torch.Tensor, block_expert: torch.Tensor, num_padded: torch.Tensor,
             a_row_div: int, config: MoEGemmConfig) -> None:
    """One launch of the grouped GEMM over the aligned pairs (see align_by_expert)."""
    assert a.stride(1) == 1 and b.stride(2) == 1 and out.stride(1) == 1
    n, k = b.shape[1], b.shape[2]
    grid = (block_expert.numel(), triton.cdiv(n, config.block_n))
    _moe_gemm_kernel[grid](
        a, b, out, pair_weights if pair_weights is not None else out, pairs, block_expert,
        num_padded, out.shape[0], n, k, a.stride(0), b.stride(0), b.stride(1), out.stride(0),
        A_ROW_DIV=a_row_div, MUL_WEIGHT=pair_weights is not None,
        **dot_flags(a),  # exact fp32 (no TF32); bf16 upcast under the CPU interpreter
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
        num_warps=config.num_warps, num_stages=config.num_stages)


class TritonExperts(MoEExperts):
    """Grouped GEMMs in two launches; `config` fixes the tiles (None: by shape)."""

    name = "triton"

    def __init__(self, config: MoEGemmConfig | None = None) -> None:
        self.config = config

    def forward(self, x, w13, w2, weights, ids, ops: LayerOps = TORCH_LAYER_OPS):
        t, top_k = ids.shape
        num_experts, hidden = w13.shape[0], x.shape[1]
        m = t * top_k
        cfg = self.config or choose_config(m, num_experts)
        pairs, block_expert, num_padded = align_by_expert(ids, num_experts, cfg.block_m)
        x = x.contiguous()
        inter = torch.empty(m, w13.shape[1], dtype=x.dtype, device=x.device)
        moe_gemm(x, w13, inter, None, pairs, block_expert, num_padded, top_k, cfg)
        act = ops.silu_and_mul(inter).contiguous()                            # [T * k, I]
        y = torch.empty(m, hidden, dtype=x.dtype, device=x.device)
        moe_gemm(act, w2, y, weights.reshape(-1).float().contiguous(), pairs, block_expert,
                 num_padded, 1, cfg)
        return y.view(t, top_k, hidden).sum(1, dtype=torch.float32).to(x.dtype)
