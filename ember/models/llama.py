"""The Llama family (Llama 2/3/3.1, Mistral, SmolLM2): GQA/MQA via num_key_value_heads.

Module names mirror Hugging Face's so checkpoints load by name; q/k/v and gate/up are
merged into one GEMM each (`qkv_proj`, `gate_up_proj`) and loaded shard by shard.
"""
from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import nn

from ember.attention.backend import AttentionBackend
from ember.config import ModelConfig
from ember.engine.forward_batch import ForwardBatch
from ember.layers.attention import Attention
from ember.layers.layer_ops import TORCH_LAYER_OPS, LayerOps, RopeStep
from ember.layers.linear import Linear
from ember.layers.norm import RMSNorm
from ember.layers.rotary import RotaryEmbedding
from ember.models.mtp_block import DecoderLayerBlock
from ember.models.lm_head import build_lm_head, compute_logits, head_weights
from ember.quant.base import linear_method_for

# checkpoint projection name -> (merged module name, shard name)
MERGED_PROJECTIONS = {
    "q_proj": ("qkv_proj", "q"), "k_proj": ("qkv_proj", "k"), "v_proj": ("qkv_proj", "v"),
    "gate_proj": ("gate_up_proj", "gate"), "up_proj": ("gate_up_proj", "up"),
}


class LlamaAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, backend: AttentionBackend, qk_norm: bool,
                 ops: LayerOps) -> None:
        super().__init__()
        self.ops = ops
        h, kvh, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = h, kvh, d
        # The quantization method (None: unquantized) comes from the model's quant config.
        self.qkv_proj = Linear(cfg.hidden_size, {"q": h * d, "k": kvh * d, "v": kvh * d},
                               bias=cfg.attention_bias, method=linear_method_for(cfg.quantization))
        self.o_proj = Linear(h * d, cfg.hidden_size, bias=cfg.attention_bias,
                             method=linear_method_for(cfg.quantization))
        # Qwen3 normalizes each head's q and k before RoPE.
        # (Their weights are applied by the layer ops, fused with RoPE.)
        self.q_norm = RMSNorm(d, cfg.rms_norm_eps) if qk_norm else None
        self.k_norm = RMSNorm(d, cfg.rms_norm_eps) if qk_norm else None
        self.attn = Attention(h, kvh, d, d ** -0.5, backend)

    def forward(self, rope: RopeStep, x: torch.Tensor, fb: ForwardBatch) -> torch.Tensor:
        """x: [T, hidden] -> [T, hidden]; rope: this step's rotary inputs."""
        t = x.shape[0]
        q, k, v = self.qkv_proj(x).split(
            [self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim,
             self.num_kv_heads * self.head_dim], dim=-1)
        q = q.view(t, self.num_heads, self.head_dim)
        k = k.view(t, self.num_kv_heads, self.head_dim)
        v = v.view(t, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.ops.rope(rope, q, k, self.q_norm.weight, self.k_norm.weight, self.q_norm.eps)
        else:
            q, k = self.ops.rope(rope, q, k)
        o = self.attn(q, k, v, fb)
        return self.o_proj(o.reshape(t, self.num_heads * self.head_dim))


class LlamaMLP(nn.Module):
    def __init__(self, cfg: ModelConfig, ops: LayerOps) -> None:
        super().__init__()
        self.ops = ops
        i = cfg.intermediate_size
        self.gate_up_proj = Linear(cfg.hidden_size, {"gate": i, "up": i}, bias=cfg.mlp_bias,
                                   method=linear_method_for(cfg.quantization))
        self.down_proj = Linear(i, cfg.hidden_size, bias=cfg.mlp_bias,
                                method=linear_method_for(cfg.quantization))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.ops.silu_and_mul(self.gate_up_proj(x)))


class PreNormDecoderLayer(nn.Module):
    """The pre-norm residual block every supported family shares: it owns the two norms;
    subclasses set `self_attn` (called as self_attn(rope, h, fb)) and `mlp`."""

    self_attn: nn.Module
    mlp: nn.Module

    def __init__(self, cfg: ModelConfig, ops: LayerOps) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, ops)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, ops)

    def forward(self, rope: RopeStep, h: torch.Tensor, residual: torch.Tensor | None,
                fb: ForwardBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """h: [T, hidden]; residual carries the un-normalized stream between layers."""
        if residual is None:
            residual, h = h, self.input_layernorm(h)
        else:
            h, residual = self.input_layernorm(h, residual)
        h = self.self_attn(rope, h, fb)
        h, residual = self.post_attention_layernorm(h, residual)
        return self.mlp(h), residual


class LlamaDecoderLayer(PreNormDecoderLayer):
    def __init__(self, cfg: ModelConfig, backend: AttentionBackend, qk_norm: bool,
                 ops: LayerOps) -> None:
        super().__init__(cfg, ops)
        self.self_attn = LlamaAttention(cfg, backend, qk_norm, ops)
        self.mlp = LlamaMLP(cfg, ops)


class LlamaModel(nn.Module):
    def __init__(self, cfg: ModelConfig, backend: AttentionBackend, qk_norm: bool,
                 ops: LayerOps) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        # One rotary table for all layers, looked up once per step.
        self.rotary = RotaryEmbedding(cfg.head_dim, cfg.max_position_embeddings, cfg.rope_theta,
                                      cfg.rope_scaling, ops)
        self.layers = nn.ModuleList(LlamaDecoderLayer(cfg, backend, qk_norm, ops)
                                    for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, ops)
        # Opt-in (EAGLE-3 drafters read them): the residual stream entering each of these
        # layers, concatenated, is kept in `aux_hidden_states` after every forward.
        self.aux_layers: tuple[int, ...] = ()
        self.aux_hidden_states: torch.Tensor | None = None   # [T, len(aux_layers) * hidden]

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                fb: ForwardBatch) -> torch.Tensor:
        h, residual = self.embed_tokens(input_ids), None
        rope = self.rotary.lookup(positions)
        if self.aux_layers:
            return self._forward_with_aux(h, rope, fb)
        for layer in self.layers:
            h, residual = layer(rope, h, residual, fb)
        h, _ = self.norm(h, residual)
        return h

    def _forward_with_aux(self, h: torch.Tensor, rope: RopeStep, fb: ForwardBatch) -> torch.Tensor:
        """The same forward, keeping the stream entering the aux layers (h + residual:
        before layer 0 the stream is the embedding alone)."""
        aux, residual = [], None
        for i, layer in enumerate(self.layers):
            if i in self.aux_layers:
                # A copy: the fused layer ops reuse h's and residual's buffers.
                aux.append(h.clone() if residual is None else h + residual)
            h, residual = layer(rope, h, residual, fb)
        if len(self.layers) in self.aux_layers:   # the stream after the last layer
            aux.append(h + residual)
        self.aux_hidden_states = torch.cat(aux, dim=-1)
        h, _ = self.norm(h, residual)
        return h


class LlamaForCausalLM(nn.Module):
    """Decoder-only causal LM; `forward` returns hidden states, `compute_logits` the vocab scores."""

    qk_norm = False

    def __init__(self, cfg: ModelConfig, backend: AttentionBackend,
                 ops: LayerOps = TORCH_LAYER_OPS) -> None:
        super().__init__()
        self.config = cfg
        self.model = LlamaModel(cfg, backend, self.qk_norm, ops)
        self.lm_head = build_lm_head(cfg)

    def attention_layers(self) -> list[Attention]:
        return [layer.self_attn.attn for layer in self.model.layers]

    def mtp_block(self, backend: AttentionBackend, ops: LayerOps) -> DecoderLayerBlock:
        """A decoder layer of this model's type for an MTP module (ember.spec.mtp)."""
        return DecoderLayerBlock(LlamaDecoderLayer(self.config, backend, self.qk_norm, ops),
                                 self.model.rotary, load_hf_tensors)

    def set_aux_hidden_layers(self, layers: tuple[int, ...]) -> None:
        """Also keep, after every forward, the residual stream entering each of `layers`
        (0 = the embedding output, num_hidden_layers = the last layer's output, before the
        final norm) in `model.aux_hidden_states` ([T, len(layers) * hidden]), in the order
        given. An empty tuple turns it off (the default: the forward is unchanged)."""
        n = self.config.num_hidden_layers
        if any(not 0 <= i <= n for i in layers) or len(set(layers)) != len(layers):
            raise ValueError(f"aux hidden layers {layers} must be distinct, in [0, {n}]")
        if tuple(sorted(layers)) != tuple(layers):
            raise ValueError(f"aux hidden layers {layers} must be in increasing order")
        self.model.aux_layers = tuple(layers)
        self.model.aux_hidden_states = None

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                fb: ForwardBatch) -> torch.Tensor:
        """input_ids, positions: [T] -> hidden states [T, hidden]."""
        return self.model(input_ids, positions, fb)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: [N, hidden] -> logits [N, vocab] in fp32."""
        return compute_logits(self.lm_head, self.model.embed_tokens, hidden)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load Hugging Face-named tensors; raises if any parameter is left unloaded.

        A checkpoint may carry DeepSeek-style MTP layers after the decoder layers
        (`model.layers.{num_hidden_layers + j}.*`, j < num_nextn_predict_layers): they belong
        to the MTP proposer (ember.spec.mtp), which reads them itself, so they are skipped."""
        cfg = self.config
        first_mtp = cfg.num_hidden_layers
        last_mtp = first_mtp + int(cfg.hf_config.get("num_nextn_predict_layers") or 0)

        def keep(name: str) -> bool:
            parts = name.split(".")
            return not (name.startswith("model.layers.") and first_mtp <= int(parts[2]) < last_mtp)
        load_hf_tensors(self, (nt for nt in head_weights(cfg, self.lm_head, self.model.embed_tokens, weights)
                              if keep(nt[0])))


def load_hf_tensors(root: nn.Module, weights: Iterable[tuple[str, torch.Tensor]],
                    special: Callable[[str, torch.Tensor], list[str] | None] | None = None,
                    merged_projections: dict[str, tuple[str, str]] = MERGED_PROJECTIONS) -> None:
    """Load Hugging Face-named tensors (names relative to `root`) into root's modules: q/k/v
    and gate/up go into their merged layer shard by shard, Linear layers load through their
    method (quantized formats); `merged_projections` says which (the family's own map).
    `special(name, tensor)` may claim a tensor first (returning
    the parameter names it filled, or None to pass). Raises if a tensor fits no module or a
    parameter is left unloaded."""
    modules = dict(root.named_modules())
    params = dict(root.named_parameters())
    loaded: set[str] = set()
    for name, tensor in weights:
        if name.endswith("rotary_emb.inv_freq"):
            continue  # a buffer some old checkpoints saved; recomputed here
        claimed = special(name, tensor) if special is not None else None
        if claimed is not None:
            loaded.update(claimed)
            continue
        module_name, kind = name.rsplit(".", 1)
        parent, _, proj = module_name.rpartition(".")
        shard = None
        if proj in merged_projections:
            merged, shard = merged_projections[proj]
            module_name = f"{parent}.{merged}" if parent else merged
        module = modules.get(module_name)
        if module is None:
            raise KeyError(f"checkpoint tensor {name!r} matches no module of {type(root).__name__}")
        if isinstance(module, Linear):
            kind = module.load_tensor(kind, tensor, shard)  # may name a quantized tensor
        else:
            params[name].data.copy_(tensor)
        if kind is not None:
            loaded.add(f"{module_name}.{kind}")
    missing = [n for n in params if n not in loaded]
    if missing:
        raise ValueError(f"checkpoint is missing {len(missing)} tensors, e.g. {missing[:3]}")
