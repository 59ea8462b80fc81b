"""Function-preserving rescaling of a Llama-style decoder layer: divide a linear group's
inputs by s (folded into the op that produces them) and multiply its weight columns by s.

Where the input comes from:
- qkv_proj   <- input_layernorm (RMSNorm weight / s)
- gate_up    <- post_attention_layernorm
- down_proj  <- the `up` rows of gate_up (silu(gate) * up is linear in up)
- o_proj     <- the `v` rows of qkv_proj (attention output is linear in v). With GQA a v
               channel feeds `heads / kv_heads` o channels, so s is defined per v channel
               and repeated (`o_scale_from_kv`).
"""
from __future__ import annotations

import torch
from torch import nn

from ember.layers.linear import Linear


def kv_groups(layer: nn.Module) -> tuple[int, int, int]:
    att = layer.self_attn
    return att.num_kv_heads, att.num_heads // att.num_kv_heads, att.head_dim


def o_stat_to_kv(layer: nn.Module, stat: torch.Tensor) -> torch.Tensor:
    """A per-channel statistic of o_proj's input [heads * d] -> one per v channel [kv * d]
    (mean over the heads sharing the v channel)."""
    kvh, g, d = kv_groups(layer)
    return stat.reshape(kvh, g, d).mean(1).reshape(-1)


def o_scale_from_kv(layer: nn.Module, s_kv: torch.Tensor) -> torch.Tensor:
    """s per v channel [kv * d] -> s per o_proj input channel [heads * d]."""
    kvh, g, d = kv_groups(layer)
    return s_kv.reshape(kvh, 1, d).expand(kvh, g, d).reshape(-1)


def _scale_columns(lin: Linear, s: torch.Tensor) -> None:
    lin.weight.data.mul_(s.to(lin.weight.dtype))


def _scale_rows(lin: Linear, shard: str, inv: torch.Tensor) -> None:
    off, n = lin.shard_offsets[shard], lin.shard_sizes[shard]
    lin.weight.data[off:off + n].mul_(inv[:, None].to(lin.weight.dtype))
    if lin.bias is not None:
        lin.bias.data[off:off + n].mul_(inv.to(lin.bias.dtype))


@torch.no_grad()
def fold_qkv(layer: nn.Module, s: torch.Tensor) -> None:
    layer.input_layernorm.weight.data.div_(s.to(layer.input_layernorm.weight.dtype))
    _scale_columns(layer.self_attn.qkv_proj, s)


@torch.no_grad()
def fold_gate_up(layer: nn.Module, s: torch.Tensor) -> None:
    layer.post_attention_layernorm.weight.data.div_(s.to(layer.post_attention_layernorm.weight.dtype))
    _scale_columns(layer.mlp.gate_up_proj, s)


@torch.no_grad()
def fold_down(layer: nn.Module, s: torch.Tensor) -> None:
    _scale_rows(layer.mlp.gate_up_proj, "up", 1.0 / s)
    _scale_columns(layer.mlp.down_proj, s)


@torch.no_grad()
def fold_o(layer: nn.Module, s_kv: torch.Tensor) -> None:
    """s_kv: [kv_heads * head_dim], one scale per v channel."""
    _scale_rows(layer.self_attn.qkv_proj, "v", 1.0 / s_kv)
    _scale_columns(layer.self_attn.o_proj, o_scale_from_kv(layer, s_kv))
