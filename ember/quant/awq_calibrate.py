"""AWQ (Lin et al., 2024): activation-aware per-input-channel scales for INT4 weights.

For each group of linears that share an input x (qkv; o; gate_up; down) the scale s is
searched over a grid of exponents alpha in [0, 1): s = mean|x|^alpha (or, with `duo`,
mean|x|^alpha / mean|w|^(1 - alpha), |w| normalised by its group's max), keeping the s
whose output is closest to full precision with the group's weights quantized at that
scale, Q(W diag(s)) diag(1/s). The output compared is (`loss`):
- "linear" (the default): each group's own output, over every calibration token when the
  stats hold Gram matrices (collect_input_stats(gram=True), as `ember quantize` collects
  them; from E[x x^T], linear_loss), else over the sampled rows;
- "block" (AutoAWQ's): for qkv the self-attention output (attention over whole calibration
  sequences, o_proj in full precision, at a subset of query positions), for gate_up the MLP
  output (down_proj in full precision), for o and down their own output.
On SmolLM2-135M the block loss measured no better than the linear one (docs/BENCHMARKS.md),
so the cheaper one is the default. The identity (plain RTN) is always a candidate, so the
search never picks worse than RTN on its own data. The scales are folded into the
preceding norm / linear (fold.py). AWQ's second step, the clipping search (search_clip),
then clamps each (row, group) of the folded weights; the model is then quantized to INT4.
"""
from __future__ import annotations

import logging
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ember.quant.base import effective_group_size
from ember.quant.calibrate import InputStats
from ember.quant.fold import fold_down, fold_gate_up, fold_o, fold_qkv, o_scale_from_kv, o_stat_to_kv
from ember.quant.int4 import fake_quantize_int4

logger = logging.getLogger("ember")

LossFn = Callable[[torch.Tensor], float]   # s (full input width) -> output error


def weight_stat(weight: torch.Tensor, group_size: int) -> torch.Tensor:
    """weight: [out, in] -> [in]: mean over rows of |w| / (its group's max |w|) (duo scaling)."""
    out, k = weight.shape
    g = effective_group_size(k, group_size)
    a = weight.float().abs().reshape(out, k // g, g)
    return (a / a.amax(-1, keepdim=True).clamp(min=1e-10)).reshape(out, k).mean(0)


def quantized_at(weight: torch.Tensor, s: torch.Tensor, group_size: int) -> torch.Tensor:
    """The weight [out, in] as INT4 at per-input-channel scale s [in]: Q(W diag(s)) diag(1/s)
    (on the weight's device: scales built from CPU statistics move there)."""
    g = effective_group_size(weight.shape[1], group_size)
    s = s.to(weight.device)
    return fake_quantize_int4(weight.float() * s, g) / s


@torch.no_grad()
def search_scale(loss_fn: LossFn, x_mean: torch.Tensor, w_mean: torch.Tensor | None = None,
                 grid: int = 20, expand: Callable[[torch.Tensor], torch.Tensor] | None = None
                 ) -> tuple[torch.Tensor, float | None, float, float]:
    """x_mean: the activation statistic s is built from ([in], or reduced, with `expand`
    mapping a scale back to [in]); w_mean: the same for the weight (duo scaling) or None;
    loss_fn(s [in]): the block output error with the group quantized at scale s.
    Returns (best s in x_mean's shape, its alpha (None: the identity, i.e. RTN), its loss,
    the RTN loss)."""
    expand = expand or (lambda s: s)
    ones = torch.ones_like(x_mean, dtype=torch.float32)
    rtn = loss_fn(expand(ones))
    best = (ones, None, rtn)
    x = x_mean.float().clamp(min=1e-4)
    for i in range(0 if w_mean is not None else 1, grid):   # without duo, alpha 0 is the identity
        alpha = i / grid
        s = x.pow(alpha)
        if w_mean is not None:
            s = s / w_mean.float().clamp(min=1e-4).pow(1 - alpha)
        s = s / (s.max() * s.min()).sqrt()     # centre the scales around 1
        loss = loss_fn(expand(s))
        if loss < best[2]:
            best = (s, alpha, loss)
    return best[0], best[1], best[2], rtn


def linear_loss(weight: torch.Tensor, m2: torch.Tensor, group_size: int) -> LossFn:
    """The linear's own mean squared output error, tr(D M D^T) / out with D the weight error and
    M = E[x x^T] [in, in] its inputs' second moment (InputStats.second_moment): the same
    number as averaging over the rows themselves, at a cost that does not grow with them."""
    w, m2 = weight.float(), m2.float()

    def loss(s: torch.Tensor) -> float:
        d = quantized_at(w, s, group_size) - w
        return ((d @ m2) * d).sum().item() / w.shape[0]
    return loss


def mlp_rows(layer: nn.Module, x: torch.Tensor, w_gu: torch.Tensor) -> torch.Tensor:
    """The MLP output on rows x [n, hidden] with gate_up weight w_gu and down_proj as it is."""
    mlp = layer.mlp
    h = mlp.ops.silu_and_mul(F.linear(x, w_gu, mlp.gate_up_proj.bias))
    return F.linear(h, mlp.down_proj.weight.float(), mlp.down_proj.bias)


def mlp_loss(layer: nn.Module, x: torch.Tensor, group_size: int) -> LossFn:
    """The MLP output error on rows x [n, hidden] with gate_up quantized, down_proj exact."""
    w = layer.mlp.gate_up_proj.weight
    x = x.to(w.device).float()
    ref = mlp_rows(layer, x, w.float())
    return lambda s: (mlp_rows(layer, x, quantized_at(w, s, group_size)) - ref).pow(2).mean().item()


def attention_rows(layer: nn.Module, rope, x: torch.Tensor, w_qkv: torch.Tensor,
                   rows: torch.Tensor) -> torch.Tensor:
    """One sequence's self-attention output at query positions `rows` [r] (causal, from
    position 0), with qkv weight w_qkv and o_proj as it is. x: [T, hidden] -> [r, hidden]."""
    att = layer.self_attn
    h, kvh, d = att.num_heads, att.num_kv_heads, att.head_dim
    t = x.shape[0]
    q, k, v = F.linear(x, w_qkv, att.qkv_proj.bias).split([h * d, kvh * d, kvh * d], dim=-1)
    q, k, v = q.reshape(t, h, d), k.reshape(t, kvh, d), v.reshape(t, kvh, d)
    if att.q_norm is not None:
        q, k = att.ops.rope(rope, q, k, att.q_norm.weight, att.k_norm.weight, att.q_norm.eps)
    else:
        q, k = att.ops.rope(rope, q, k)
    mask = rows[:, None] >= torch.arange(t, device=x.device)[None, :]       # [r, T]
    o = F.scaled_dot_product_attention(q[rows].transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
                                       attn_mask=mask, scale=att.attn.scale, enable_gqa=True)
    return F.linear(o.transpose(0, 1).reshape(len(rows), h * d), att.o_proj.weight.float(),
                    att.o_proj.bias)


def attention_loss(model: nn.Module, layer: nn.Module, seqs: list[torch.Tensor], group_size: int,
                   rows_per_seq: int = 64) -> LossFn:
    """The self-attention output error over whole sequences seqs ([T, hidden] each) with qkv
    quantized, o_proj exact, at `rows_per_seq` evenly spaced query positions of each."""
    qkv = layer.self_attn.qkv_proj
    dev = qkv.weight.device
    cases = []
    for x in seqs:
        x = x.to(dev).float()
        t = x.shape[0]
        rope = model.model.rotary.lookup(torch.arange(t, device=dev))
        rows = torch.linspace(0, t - 1, min(rows_per_seq, t), device=dev).round().long().unique()
        cases.append((x, rope, rows, attention_rows(layer, rope, x, qkv.weight.float(), rows)))

    def loss(s: torch.Tensor) -> float:
        w = quantized_at(qkv.weight, s, group_size)
        err = sum((attention_rows(layer, rope, x, w, rows) - ref).pow(2).sum().item()
                  for x, rope, rows, ref in cases)
        return err / sum(ref.numel() for *_, ref in cases)
    return loss


def diagonal_blocks(m2: torch.Tensor, g: int) -> torch.Tensor:
    """m2: [in, in] -> its g x g blocks on the diagonal, [in // g, g, g] (a group's inputs)."""
    k = m2.shape[0]
    return torch.stack([m2[j:j + g, j:j + g] for j in range(0, k, g)])


@torch.no_grad()
def search_clip(weight: torch.Tensor, m2: torch.Tensor, group_size: int, steps: int = 10,
                step: float = 0.05) -> torch.Tensor:
    """AWQ's clipping search (AutoAWQ's auto_clip). weight: [out, in]; m2: E[x x^T] [in, in] of
    the inputs as the weight sees them -> the weight with each (row, group) clamped to
    r * [-max|w|, max|w|], r in {1, 1 - step, ...} chosen to minimise the group's share of the
    output error, E_n (x_g . (w_g - Q(clip_r(w_g))))^2 = d_g^T M_gg d_g. The clamp is
    symmetric (only the side(s) beyond r * max|w| are cut): clamping r * [min, max] instead
    also cut the other, in-range side of one-sided groups and measured worse on SmolLM2, and
    searching each side's ratio separately measured no better (docs/BENCHMARKS.md)."""
    w = weight.float()
    out, k = w.shape
    g = effective_group_size(k, group_size)
    wg = w.reshape(out, k // g, g)
    mg = diagonal_blocks(m2.float(), g)                                   # [groups, g, g]
    best_err = torch.full((out, k // g), float("inf"), device=w.device)
    hi0 = wg.abs().amax(-1, keepdim=True)
    best_r = torch.ones(out, k // g, 1, device=w.device)
    for i in range(steps):
        r = 1.0 - i * step
        wc = wg.clamp(-hi0 * r, hi0 * r)
        delta = wg - fake_quantize_int4(wc.reshape(out, k), g).reshape(wg.shape)   # [out, groups, g]
        err = (torch.einsum("ogi,gij->ogj", delta, mg) * delta).sum(-1)            # [out, groups]
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_r = torch.where(better[..., None], torch.tensor(r, device=w.device), best_r)
    return wg.clamp(-hi0 * best_r, hi0 * best_r).reshape(out, k).to(weight.dtype)


def group_loss(model: nn.Module, layer: nn.Module, lin: nn.Module, st: InputStats, x: torch.Tensor,
               group_size: int, loss: str, attn_rows: int) -> LossFn:
    """The error the scale search of `lin` (a linear of `layer`, its inputs' stats st, sample
    rows x) minimises: the attention / MLP output for qkv / gate_up with loss="block" (on the
    sampled rows), else the linear's own output (on every token when st has a Gram matrix)."""
    att, mlp = layer.self_attn, layer.mlp
    if loss == "block" and lin is att.qkv_proj:
        if not st.seqs:
            raise ValueError("the attention loss needs whole calibration sequences "
                             "(collect_input_stats(full_seqs=...))")
        return attention_loss(model, layer, st.seqs, group_size, attn_rows)
    if loss == "block" and lin is mlp.gate_up_proj:
        return mlp_loss(layer, x, group_size)
    return linear_loss(lin.weight.data, st.second_moment().to(x.device), group_size)


def clip_rows(layer: nn.Module, lin: nn.Module) -> slice:
    """The rows of `lin` the clipping search may touch: all but qkv's q and k rows (they feed
    a softmax, whose error the linear's output error does not measure; as in AutoAWQ)."""
    if lin is layer.self_attn.qkv_proj:
        off = lin.shard_offsets["v"]
        return slice(off, off + lin.shard_sizes["v"])
    return slice(0, None)


@torch.no_grad()
def awq_layer(model: nn.Module, layer: nn.Module, prefix: str, stats: dict[str, InputStats],
              group_size: int = 128, grid: int = 20, clip: bool = True, loss: str = "linear",
              duo: bool = False, attn_rows: int = 64) -> dict[str, tuple[float | None, float, float]]:
    """Search and fold AWQ scales for one decoder layer (its linears' input stats in `stats`,
    named `prefix`.self_attn.qkv_proj etc.), then clip its weights (`clip`), in place. Returns {linear name: (alpha (None: identity), loss, rtn loss)}."""
    att, mlp = layer.self_attn, layer.mlp
    dev = att.qkv_proj.weight.device
    report: dict[str, tuple[float | None, float, float]] = {}
    seen: list[tuple[nn.Module, slice, torch.Tensor]] = []   # (linear, rows to clip, E[x x^T] after folding)
    plan = [
        (f"{prefix}.self_attn.qkv_proj", att.qkv_proj, fold_qkv),
        (f"{prefix}.self_attn.o_proj", att.o_proj, fold_o),
        (f"{prefix}.mlp.gate_up_proj", mlp.gate_up_proj, fold_gate_up),
        (f"{prefix}.mlp.down_proj", mlp.down_proj, fold_down),
    ]
    for name, lin, fold in plan:
        st = stats[name]
        x = st.sample.to(dev)
        x_mean, w_mean, expand = st.mean_abs.to(dev), None, None
        if duo:
            w_mean = weight_stat(lin.weight.data, group_size)
        if lin is att.o_proj:  # one scale per v channel (GQA: shared by the heads reading it)
            x_mean = o_stat_to_kv(layer, x_mean)
            w_mean = None if w_mean is None else o_stat_to_kv(layer, w_mean)
            expand = lambda s, L=layer: o_scale_from_kv(L, s)  # noqa: E731
        fn = group_loss(model, layer, lin, st, x, group_size, loss, attn_rows)
        s, alpha, best, rtn = search_scale(fn, x_mean, w_mean, grid, expand)
        fold(layer, s)
        s_in = expand(s) if expand is not None else s
        if clip:
            seen.append((lin, clip_rows(layer, lin), st.second_moment().to(dev) / (s_in[:, None] * s_in[None, :])))
        report[name] = (alpha, best, rtn)
        logger.info("awq %s: alpha %s, loss %.3g (rtn %.3g)", name, alpha, best, rtn)
    # After every fold of the layer (fold_o and fold_down rescale qkv's and gate_up's rows).
    for lin, rows, m2 in seen:
        lin.weight.data[rows] = search_clip(lin.weight.data[rows], m2, group_size)
    return report


@torch.no_grad()
def awq_head(model: nn.Module, st: InputStats, group_size: int = 128, grid: int = 20,
             clip: bool = True) -> tuple[float | None, float, float]:
    """AWQ for an LM head of its own (`model.lm_head` with a full-precision weight; a tied
    head is first copied, checkpoint.untied_head): the scale search on the head's output
    error, folded into the final norm (whose output only the head reads), then clipping.
    `st`: the head input's statistics (collect_input_stats(head=True)).
    Returns (alpha (None: identity), loss, rtn loss)."""
    head, norm = model.lm_head, model.model.norm
    dev = head.weight.device
    m2 = st.second_moment().to(dev)
    s, alpha, best, rtn = search_scale(linear_loss(head.weight.data, m2, group_size),
                                       st.mean_abs.to(dev), None, grid)
    norm.weight.data.div_(s.to(norm.weight.dtype))
    head.weight.data.mul_(s.to(head.weight.dtype))
    if clip:
        head.weight.data = search_clip(head.weight.data, m2 / (s[:, None] * s[None, :]), group_size)
    logger.info("awq lm_head: alpha %s, loss %.3g (rtn %.3g)", alpha, best, rtn)
    return alpha, best, rtn


@torch.no_grad()
def apply_awq(model: nn.Module, stats: dict[str, InputStats], group_size: int = 128,
              **options) -> dict[str, tuple[float | None, float, float]]:
    """Search and fold AWQ scales, then clip the weights, in every decoder layer of a
    full-precision Llama-style model, in place (`options`: awq_layer's). `stats` from
    collect_input_stats (with whole sequences of the attention inputs for loss="block", with
    Gram matrices for losses over every token). Returns {linear name: (alpha (None:
    identity), loss, rtn loss)}."""
    if options.get("loss", "linear") not in ("block", "linear"):
        raise ValueError(f"unknown AWQ loss {options['loss']!r}")
    report: dict[str, tuple[float | None, float, float]] = {}
    for i, layer in enumerate(model.model.layers):
        report.update(awq_layer(model, layer, f"model.layers.{i}", stats, group_size, **options))
    return report
