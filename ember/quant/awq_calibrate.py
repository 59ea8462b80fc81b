"""AWQ (Lin et al., 2024): activation-aware per-input-channel scales for INT4 weights.

For each group of linears that share an input x (qkv; o; gate_up; down), search
s = mean|x|^alpha over a grid of alpha in [0, 1) and keep the one minimising the group's
output error || Q(W diag(s)) (x / s) - W x ||^2 on calibration rows; alpha = 0 is plain
RTN, so the search never picks worse than RTN on its own data. The scales are folded into
the preceding norm / linear (fold.py), then the model is quantized to INT4 as usual.
AWQ's second step, a per-(row, group) clipping ratio r in {1, 0.95, ..., 0.55} minimising the
group's output error (q and k rows not clipped, as in AutoAWQ), is `clip=True`; it is off by
default because on SmolLM2 (weights already on a Q4_1 grid) it made perplexity worse than
RTN (docs/BENCHMARKS.md).
"""
from __future__ import annotations

import logging

import torch
from torch import nn

from ember.quant.base import effective_group_size
from ember.quant.calibrate import InputStats
from ember.quant.fold import fold_down, fold_gate_up, fold_o, fold_qkv, o_scale_from_kv, o_stat_to_kv
from ember.quant.int4 import fake_quantize_int4

logger = logging.getLogger("ember")


@torch.no_grad()
def search_scale(weight: torch.Tensor, x: torch.Tensor, mean_abs: torch.Tensor, group_size: int,
                 grid: int = 20, expand=None) -> tuple[torch.Tensor, float, float, float]:
    """weight: [out, in]; x: [n, in] calibration rows; mean_abs: the statistic s is built
    from ([in], or reduced, with `expand` mapping it back to [in]).
    Returns (best s in the statistic's shape, best alpha, best loss, the RTN (alpha 0) loss)."""
    w = weight.float()
    x = x.float()
    ref = x @ w.t()
    g = effective_group_size(w.shape[1], group_size)
    best = (torch.ones_like(mean_abs), 0.0, float("inf"))
    rtn_loss = float("nan")
    for i in range(grid):
        alpha = i / grid
        s = mean_abs.float().clamp(min=1e-4).pow(alpha)
        s = s / (s.max() * s.min()).sqrt()     # centre the scales around 1
        s_full = expand(s) if expand is not None else s
        wq = fake_quantize_int4(w * s_full, g) / s_full
        loss = (x @ wq.t() - ref).pow(2).mean().item()
        if i == 0:
            rtn_loss = loss
        if loss < best[2]:
            best = (s, alpha, loss)
    return best[0], best[1], best[2], rtn_loss


@torch.no_grad()
def search_clip(weight: torch.Tensor, x: torch.Tensor, group_size: int, steps: int = 10,
                step: float = 0.05) -> torch.Tensor:
    """weight: [out, in]; x: [n, in] (inputs as the weight sees them) -> the weight with each
    (row, group) clamped to r * its [min, max], r chosen to minimise E_n (x_g . (w_g - Q(w_g)))^2."""
    w = weight.float()
    out, k = w.shape
    g = effective_group_size(k, group_size)
    wg = w.reshape(out, k // g, g)
    xg = x.float().reshape(x.shape[0], k // g, g)
    lo0 = wg.amin(-1, keepdim=True).clamp(max=0)
    hi0 = wg.amax(-1, keepdim=True).clamp(min=0)
    best_err = torch.full((out, k // g), float("inf"), device=w.device)
    best_r = torch.ones(out, k // g, 1, device=w.device)
    for i in range(steps):
        r = 1.0 - i * step
        lo, hi = lo0 * r, hi0 * r
        scales = ((hi - lo) / 15).clamp(min=1e-10)
        zeros = torch.round(-lo / scales).clamp(0, 15)
        q = torch.clamp(torch.round(wg.clamp(lo, hi) / scales) + zeros, 0, 15)
        delta = wg - (q - zeros) * scales                                # [out, groups, g]
        err = torch.einsum("nkg,okg->nok", xg, delta).pow(2).mean(0)    # [out, groups]
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_r = torch.where(better[..., None], torch.tensor(r, device=w.device), best_r)
    return wg.clamp(lo0 * best_r, hi0 * best_r).reshape(out, k).to(weight.dtype)


@torch.no_grad()
def apply_awq(model: nn.Module, stats: dict[str, InputStats], group_size: int = 128,
              grid: int = 20, clip: bool = False) -> dict[str, tuple[float, float, float]]:
    """Search and fold AWQ scales (and clip the weights) in every decoder layer of a
    full-precision Llama-style model, in place. Returns {linear name: (alpha, loss, rtn loss)}."""
    report: dict[str, tuple[float, float, float]] = {}
    for i, layer in enumerate(model.model.layers):
        p = f"model.layers.{i}"
        plan = [
            (f"{p}.self_attn.qkv_proj", layer.self_attn.qkv_proj, fold_qkv, None),
            (f"{p}.self_attn.o_proj", layer.self_attn.o_proj, fold_o, layer),
            (f"{p}.mlp.gate_up_proj", layer.mlp.gate_up_proj, fold_gate_up, None),
            (f"{p}.mlp.down_proj", layer.mlp.down_proj, fold_down, None),
        ]
        for name, lin, fold, gqa_layer in plan:
            st = stats[name]
            stat, expand = st.mean_abs, None
            if gqa_layer is not None:  # o_proj: one scale per v channel
                stat = o_stat_to_kv(gqa_layer, stat)
                expand = lambda s, L=gqa_layer: o_scale_from_kv(L, s)  # noqa: E731
            s, alpha, loss, rtn = search_scale(lin.weight.data, st.sample.to(lin.weight.device),
                                               stat.to(lin.weight.device), group_size, grid, expand)
            fold(layer, s)
            if clip:
                x_seen = st.sample.to(lin.weight.device) / (expand(s) if expand is not None else s)
                rows = slice(0, None)
                if lin is layer.self_attn.qkv_proj:  # clip only the v rows
                    off = lin.shard_offsets["v"]
                    rows = slice(off, off + lin.shard_sizes["v"])
                lin.weight.data[rows] = search_clip(lin.weight.data[rows], x_seen, group_size)
            report[name] = (alpha, loss, rtn)
            logger.info("awq %s: alpha %.2f, loss %.3g (rtn %.3g)", name, alpha, loss, rtn)
    return report
