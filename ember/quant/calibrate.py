"""Calibration: token sequences from text, and per-linear input statistics collected with
forward hooks while the full-precision model runs them."""
from __future__ import annotations

from dataclasses import dataclass, field
from collections.abc import Collection

import torch
from torch import nn

from ember.layers.linear import Linear


def calibration_sequences(tokenizer, paths: list[str], num_seqs: int, seq_len: int,
                          split_end: float = 0.8) -> list[list[int]]:
    """Up to `num_seqs` sequences of `seq_len` tokens, cut from the first `split_end` of each
    text (the rest is held out for evaluation), taken from the texts in turn."""
    from ember.eval.ppl import read_split
    per_text = []
    for p in paths:
        ids = tokenizer.encode(read_split(p, 0.0, split_end), add_special_tokens=False)
        per_text.append([ids[i:i + seq_len] for i in range(0, len(ids) - seq_len + 1, seq_len)])
    out: list[list[int]] = []
    for i in range(max(len(c) for c in per_text)):
        for chunks in per_text:
            if i < len(chunks) and len(out) < num_seqs:
                out.append(chunks[i])
    if not out:
        raise ValueError(f"calibration text is shorter than one {seq_len}-token sequence")
    return out


@dataclass
class InputStats:
    """Statistics of one linear layer's inputs over the calibration tokens."""

    abs_sum: torch.Tensor          # [in] sum of |x| per input channel
    abs_max: torch.Tensor          # [in] max of |x| per input channel
    count: int = 0
    samples: list[torch.Tensor] = field(default_factory=list)  # rows kept for the AWQ loss
    seqs: list[torch.Tensor] = field(default_factory=list)     # whole sequences [T, in] (AWQ's attention loss)
    gram: torch.Tensor | None = None   # [in, in] float64 sum of x x^T over every token (collect_input_stats(gram=True))

    @property
    def mean_abs(self) -> torch.Tensor:
        return self.abs_sum / max(self.count, 1)

    @property
    def sample(self) -> torch.Tensor:
        return torch.cat(self.samples)   # [n, in]

    def observe(self, x: torch.Tensor, rows: torch.Tensor, keep_seq: bool = False,
                gram: bool = False) -> None:
        """Add one sequence's inputs x [T, in] (fp32): its |x| sums and maxima, its rows `rows`
        as samples, the whole x (keep_seq) and its Gram matrix (gram)."""
        a = x.abs().cpu()
        self.abs_sum += a.sum(0)
        self.abs_max = torch.maximum(self.abs_max, a.amax(0))
        self.count += x.shape[0]
        self.samples.append(x[rows.to(x.device)].cpu())
        if keep_seq:
            self.seqs.append(x.to("cpu", copy=True))  # the engine may reuse its buffer
        if gram:
            g = (x.t() @ x).double().cpu()   # fp32 per sequence, summed in fp64
            self.gram = g if self.gram is None else self.gram + g

    @classmethod
    def empty(cls, width: int) -> InputStats:
        """No tokens seen yet, for inputs of `width` channels."""
        return cls(torch.zeros(width), torch.zeros(width))

    def second_moment(self) -> torch.Tensor:
        """E[x x^T] [in, in] fp32: over every calibration token when the Gram matrix was kept,
        else over the sampled rows. A linear's mean squared output error for a weight error D
        is then tr(D M D^T) / out, whatever the number of tokens behind M."""
        if self.gram is not None:
            return (self.gram / max(self.count, 1)).float()
        x = self.sample.double()
        return (x.t() @ x / x.shape[0]).float()


HEAD_STATS = "lm_head"   # collect_input_stats' name for the LM head's input


def quantizable_linears(model: nn.Module) -> dict[str, Linear]:
    """The linear layers quantization applies to: all but the LM head."""
    head = getattr(model, "lm_head", None)
    return {n: m for n, m in model.named_modules() if isinstance(m, Linear) and m is not head}


def attention_input_linears(model: nn.Module) -> list[str]:
    """The names of the linears that read each decoder layer's attention input (a Llama-style
    layer's `self_attn.qkv_proj`): an attention-output loss needs whole sequences of them."""
    layers = getattr(getattr(model, "model", None), "layers", [])
    return [f"model.layers.{i}.self_attn.qkv_proj" for i, layer in enumerate(layers)
            if isinstance(getattr(getattr(layer, "self_attn", None), "qkv_proj", None), Linear)]


def sample_rows(seq_len: int, rows: int, gen: torch.Generator) -> torch.Tensor:
    """`rows` positions of a sequence kept as AWQ loss samples: the first token always (the
    attention-sink token, whose massive activations the clipping search must see; sampled
    at random it is missed in most sequences), then random others."""
    return torch.cat([torch.zeros(1, dtype=torch.long),
                      1 + torch.randperm(seq_len - 1, generator=gen)[:rows - 1]])


@torch.inference_mode()
def collect_input_stats(llm, sequences: list[list[int]], rows_per_seq: int = 32, seed: int = 0,
                        full_seqs: int = 0, full_inputs_of: Collection[str] | None = None,
                        gram: bool = False, head: bool = False) -> dict[str, InputStats]:
    """Run every sequence through the model; for each quantizable linear keep per-channel
    mean/max |x| over all tokens and `rows_per_seq` rows of each sequence (its first token and
    random others); for the linears in `full_inputs_of` (default: attention_input_linears)
    also the whole input of
    the first `full_seqs` sequences (only AWQ's block loss needs them; they cost
    layers x full_seqs x seq_len x hidden floats). With `gram`, also each input's Gram matrix
    sum x x^T over every token, so AWQ's losses see all the calibration tokens, not just the
    sampled rows (in^2 doubles per linear). With `head`, also the LM head's input (the final
    norm's output) at every position, as "lm_head" (the engine itself scores only the last)."""
    from ember.eval.forward import sequence_logits
    model = llm.engine.runner.model
    if full_inputs_of is None:
        full_inputs_of = set(attention_input_linears(model))
    stats: dict[str, InputStats] = {}
    gen = torch.Generator().manual_seed(seed)
    picks: list[torch.Tensor] = []

    def hook(name: str):
        def fn(module: Linear, args: tuple[torch.Tensor, ...]) -> None:
            x = args[0].reshape(-1, args[0].shape[-1]).float()
            s = stats.get(name)
            if s is None:
                s = stats[name] = InputStats.empty(x.shape[1])
            s.observe(x, picks[-1], name in full_inputs_of and len(picks) <= full_seqs, gram)
        return fn

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in quantizable_linears(model).items()]
    if head:
        head_hook = hook(HEAD_STATS)
        handles.append(model.model.norm.register_forward_hook(
            lambda m, args, out: head_hook(m, (out[0] if isinstance(out, tuple) else out,))))
    try:
        for seq in sequences:
            picks.append(sample_rows(len(seq), rows_per_seq, gen))
            sequence_logits(llm, seq, torch.tensor([len(seq) - 1]))
    finally:
        for h in handles:
            h.remove()
    return stats
