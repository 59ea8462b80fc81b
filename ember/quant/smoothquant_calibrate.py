"""SmoothQuant (Xiao et al., 2023): migrate activation outliers into the weights.

Per input channel j of a linear group, s_j = max|x_j|^alpha / max|W_:,j|^(1 - alpha)
(alpha = migration strength, 0.5 by default); x / s is folded into the preceding norm or
linear and the weight columns are multiplied by s (fold.py), so both become easier to
quantize to INT8. Applied to qkv, o (per v channel under GQA), gate_up and down.
"""
from __future__ import annotations

import torch
from torch import nn

from ember.quant.calibrate import InputStats
from ember.quant.fold import fold_down, fold_gate_up, fold_o, fold_qkv


def smooth_scale(act_max: torch.Tensor, weight: torch.Tensor, alpha: float) -> torch.Tensor:
    """act_max: [in] (calibration statistics live on the CPU); weight: [out, in] -> s [in],
    on the weight's device."""
    w_max = weight.abs().amax(0).float().clamp(min=1e-5)
    a = act_max.to(w_max.device).float().clamp(min=1e-5)
    return (a.pow(alpha) / w_max.pow(1 - alpha)).clamp(min=1e-5)


@torch.no_grad()
def apply_smoothquant(model: nn.Module, stats: dict[str, InputStats], alpha: float = 0.5) -> None:
    """Fold SmoothQuant scales into every decoder layer of a full-precision model, in place."""
    for i, layer in enumerate(model.model.layers):
        p = f"model.layers.{i}"
        att, mlp = layer.self_attn, layer.mlp
        fold_qkv(layer, smooth_scale(stats[f"{p}.self_attn.qkv_proj"].abs_max, att.qkv_proj.weight, alpha))
        fold_gate_up(layer, smooth_scale(stats[f"{p}.mlp.gate_up_proj"].abs_max, mlp.gate_up_proj.weight, alpha))
        fold_down(layer, smooth_scale(stats[f"{p}.mlp.down_proj"].abs_max, mlp.down_proj.weight, alpha))
        # o_proj: channels sharing a v channel share a scale (max over them for both terms).
        kvh, g, d = att.num_kv_heads, att.num_heads // att.num_kv_heads, att.head_dim
        a_kv = stats[f"{p}.self_attn.o_proj"].abs_max.reshape(kvh, g, d).amax(1).reshape(-1)
        w_kv = att.o_proj.weight.abs().reshape(-1, kvh, g, d).amax(dim=(0, 2)).reshape(1, -1)
        fold_o(layer, smooth_scale(a_kv, w_kv, alpha))
