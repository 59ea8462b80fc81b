"""One of a model's decoder layers run on its own: the transformer block of an MTP module
(ember.spec.mtp), which a target model builds with `mtp_block(backend, ops)`."""
from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

from ember.cache.kv_spec import KVCacheLayer
from ember.engine.forward_batch import ForwardBatch
from ember.layers.rotary import RotaryEmbedding

WeightLoader = Callable[[nn.Module, Iterable[tuple[str, torch.Tensor]]], None]


class DecoderLayerBlock(nn.Module):
    """x [T, hidden] in, the residual stream after the layer out. `layer` is called as the
    model's own decoder layers are, `layer(rope, h, residual, fb) -> (h, residual)`; the
    rotary tables are the target's; `load` fills the layer from checkpoint tensors named as
    in one decoder layer (the model's own loader, rooted at the layer)."""

    def __init__(self, layer: nn.Module, rotary: RotaryEmbedding, load: WeightLoader) -> None:
        super().__init__()
        self.layer = layer
        self._shared = (rotary, load)   # the target's table and loader, not submodules

    def forward(self, x: torch.Tensor, positions: torch.Tensor, fb: ForwardBatch) -> torch.Tensor:
        """x: [T, hidden], positions: [T] -> [T, hidden]."""
        rotary, _ = self._shared
        h, residual = self.layer(rotary.lookup(positions), x, None, fb)
        return h + residual

    def attention_layers(self) -> list[KVCacheLayer]:
        return [self.layer.self_attn.attn]

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Decoder-layer tensor names (`self_attn.q_proj.weight`, `mlp.down_proj.weight`, ...)."""
        _, load = self._shared
        load(self.layer, weights)
