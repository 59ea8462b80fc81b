"""Layer-by-layer AWQ calibration (`apply_awq_sequential`): each decoder layer's input
statistics come from running the calibration sequences through the layers before it as they
will run, i.e. with their AWQ scales folded, clipped and INT4-quantized, so each layer's
search sees (and its loss weighs) the inputs it will actually get. apply_awq, by contrast,
searches every layer on statistics from one full-precision pass.

The decoder layers run here in plain PyTorch, one sequence at a time, outside the engine
(no paged KV cache: every calibration sequence is one causal prefill from position 0); they
compute the same function as the engine's Llama-style layers (tests/test_quant.py checks the
statistics against the engine's). Only the residual stream of every sequence is kept
between layers (sequences x seq_len x hidden floats).
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from ember.quant.awq_calibrate import awq_layer
from ember.quant.base import effective_group_size
from ember.quant.calibrate import InputStats, sample_rows
from ember.quant.int4 import fake_quantize_int4

Observe = Callable[[str, torch.Tensor], None]   # (linear suffix, its input [T, in])
SUFFIXES = ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")


def layer_forward(model: nn.Module, layer: nn.Module, stream: torch.Tensor,
                  observe: Observe | None = None) -> torch.Tensor:
    """One pre-norm decoder layer on one sequence's residual stream [T, hidden] (positions
    0..T-1, causal) -> the stream after it; `observe` sees each linear's input."""
    att, mlp = layer.self_attn, layer.mlp
    ops = att.ops
    look = observe or (lambda name, x: None)
    t = stream.shape[0]
    h, kvh, d = att.num_heads, att.num_kv_heads, att.head_dim
    x = ops.rms_norm(stream, layer.input_layernorm.weight, layer.input_layernorm.eps)
    look("self_attn.qkv_proj", x)
    q, k, v = F.linear(x, att.qkv_proj.weight, att.qkv_proj.bias).split([h * d, kvh * d, kvh * d], -1)
    q, k, v = q.reshape(t, h, d), k.reshape(t, kvh, d), v.reshape(t, kvh, d)
    rope = model.model.rotary.lookup(torch.arange(t, device=stream.device))
    if att.q_norm is not None:
        q, k = ops.rope(rope, q, k, att.q_norm.weight, att.k_norm.weight, att.q_norm.eps)
    else:
        q, k = ops.rope(rope, q, k)
    o = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
                                       is_causal=True, scale=att.attn.scale, enable_gqa=True)
    o = o.transpose(0, 1).reshape(t, h * d)
    look("self_attn.o_proj", o)
    stream = stream + F.linear(o, att.o_proj.weight, att.o_proj.bias)
    x = ops.rms_norm(stream, layer.post_attention_layernorm.weight, layer.post_attention_layernorm.eps)
    look("mlp.gate_up_proj", x)
    act = ops.silu_and_mul(F.linear(x, mlp.gate_up_proj.weight, mlp.gate_up_proj.bias))
    look("mlp.down_proj", act)
    return stream + F.linear(act, mlp.down_proj.weight, mlp.down_proj.bias)


@contextmanager
def int4_weights(layer: nn.Module, group_size: int) -> Iterator[None]:
    """Inside: the layer's four linears hold their INT4 round-to-nearest weights (what
    quantize_model will store for them); after: their weights as before."""
    lins = [layer.self_attn.qkv_proj, layer.self_attn.o_proj, layer.mlp.gate_up_proj,
            layer.mlp.down_proj]
    saved = [lin.weight.data.clone() for lin in lins]
    try:
        for lin in lins:
            g = effective_group_size(lin.weight.shape[1], group_size)
            lin.weight.data.copy_(fake_quantize_int4(lin.weight.data, g))
        yield
    finally:
        for lin, w in zip(lins, saved):
            lin.weight.data.copy_(w)


def layer_stats(model: nn.Module, layer: nn.Module, prefix: str, streams: list[torch.Tensor],
                picks: list[torch.Tensor], full_seqs: int, gram: bool) -> dict[str, InputStats]:
    """The input statistics of the layer's linears (named prefix.suffix) over every stream,
    as collect_input_stats keeps them (sampled rows `picks`, whole qkv inputs of the first
    `full_seqs` sequences for the block loss, Gram matrices with `gram`)."""
    stats: dict[str, InputStats] = {}
    for j, stream in enumerate(streams):
        def observe(suffix: str, x: torch.Tensor, j: int = j) -> None:
            st = stats.setdefault(f"{prefix}.{suffix}", InputStats.empty(x.shape[1]))
            st.observe(x.float(), picks[j], suffix == SUFFIXES[0] and j < full_seqs, gram)
        layer_forward(model, layer, stream, observe)
    return stats


@torch.no_grad()
def apply_awq_sequential(model: nn.Module, sequences: list[list[int]], group_size: int = 128,
                         rows_per_seq: int = 32, seed: int = 0, gram: bool = True,
                         **options) -> dict[str, tuple[float | None, float, float]]:
    """AWQ (awq_layer: scale search, fold, clip; `options` are its options) on every decoder
    layer in turn, each calibrated on the calibration token sequences as the already
    quantized layers before it transform them. The model is left full precision with the
    scales folded and the weights clipped, like apply_awq, ready for quantize_model.
    Returns {linear name: (alpha (None: identity), loss, rtn loss)}."""
    dev = model.model.embed_tokens.weight.device
    gen = torch.Generator().manual_seed(seed)
    picks = [sample_rows(len(s), rows_per_seq, gen) for s in sequences]
    streams = [model.model.embed_tokens(torch.tensor(s, device=dev)).float() for s in sequences]
    full_seqs = len(sequences) if options.get("loss") == "block" else 0
    report: dict[str, tuple[float | None, float, float]] = {}
    for i, layer in enumerate(model.model.layers):
        prefix = f"model.layers.{i}"
        stats = layer_stats(model, layer, prefix, streams, picks, min(full_seqs, 16), gram)
        report.update(awq_layer(model, layer, prefix, stats, group_size, **options))
        del stats
        with int4_weights(layer, group_size):
            streams = [layer_forward(model, layer, s) for s in streams]
    return report
