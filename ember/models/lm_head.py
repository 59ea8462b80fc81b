"""The LM head of a causal LM: its own Linear, or the embedding matrix when the checkpoint
ties them, and, with the quantization option `lm_head` (`--quantize-lm-head`), a Linear in
the model's quantized format either way.

At batch 1 a Llama-8B-shaped head reads 1 GB of bf16 weights a token, about an eighth of an
INT4 model's decode step; quantizing it is off by default (AutoAWQ, ModelOpt and most
published checkpoints keep the head in full precision) and costs accuracy of its own
(docs/BENCHMARKS.md). A tied head, quantized, becomes a quantized copy of the embedding
(the embedding lookup keeps full precision): made when the checkpoint is full precision,
read from the checkpoint's `lm_head.*` tensors when `ember quantize --lm-head` wrote them
(with `--method awq` after a scale search of its own, folded into the final norm).
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
from torch import nn

from ember.config import ModelConfig
from ember.layers.linear import Linear
from ember.quant.base import linear_method_for


def head_is_quantized(cfg: ModelConfig) -> bool:
    quant = cfg.quantization
    return quant is not None and quant.method != "none" and bool(quant.params.get("lm_head"))


def build_lm_head(cfg: ModelConfig) -> Linear | None:
    """The head module: None when the embedding serves as the head (tied, full precision)."""
    if head_is_quantized(cfg):
        return Linear(cfg.hidden_size, cfg.vocab_size, method=linear_method_for(cfg.quantization))
    return None if cfg.tie_word_embeddings else Linear(cfg.hidden_size, cfg.vocab_size)


def compute_logits(head: Linear | None, embed: nn.Embedding, hidden: torch.Tensor) -> torch.Tensor:
    """hidden: [N, hidden] -> logits [N, vocab] in fp32."""
    if head is None:
        return torch.nn.functional.linear(hidden, embed.weight).float()
    return head(hidden).float()


def head_weights(cfg: ModelConfig, head: Linear | None, embed: nn.Embedding,
                 weights: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
    """The checkpoint's tensors as the head needs them: a tied full-precision head drops any
    `lm_head.weight`; a quantized head of a tied full-precision checkpoint gets the loaded
    embedding as its `lm_head.weight` (quantized by its method's finalize)."""
    seen = False
    for name, t in weights:
        if name.startswith("lm_head."):
            if head is None:
                continue
            seen = True
        yield name, t
    quant = cfg.quantization
    if head is not None and not seen and cfg.tie_word_embeddings and not quant.prequantized:
        yield "lm_head.weight", embed.weight.data
