"""The EAGLE-3 drafter (Li et al. 2025) and its parallel variant P-EAGLE: the network, and
its checkpoint format.

The drafter is one decoder layer fed by the target. For each position i it takes

    fused_i = fc(cat(a_i, b_i, c_i))                     # [3 Ht] -> H, no bias

where a, b, c are the target's residual stream entering a low, a middle and a high layer
(`aux_layers`, vLLM's convention: id j is the stream entering layer j, 0 the embedding;
by default (2, L // 2, L - 3)), and the embedding of token t_{i+1}. The layer's first
projection reads both, [2H] wide:

    x    = cat(input_layernorm(embed(t_{i+1})), hidden_norm(fused_i))     # [2H]
    h    = fused_i + o_proj(attention(q/k/v_proj(x)))                     # the residual is fused_i
    o_i  = h + mlp(post_attention_layernorm(h))                           # [H], before the final norm
    logits = lm_head(norm(o_i))                                           # scores t_{i+2}

The pair (t_{i+1}, fused_i) sits at position i, so its K/V takes the slot the target uses
for token i. A chain of drafts feeds the layer's own o back: draft j + 1 comes from
(d_j, o) at the next position, with no fc (o is already [H]). The head may cover a
reduced draft vocabulary: draft id d is target id d + d2t[d] (published EAGLE-3
checkpoints; t2d marks the target ids that have one).

P-EAGLE (parallel drafting): positions after the first are fed a learned mask-token
embedding `mask_embed` and a shared learned hidden state `mask_hidden` instead of
(d_j, o). Their inputs no longer depend on earlier drafts, so draft 1 and the k - 1 mask
positions after it run in one forward, attending causally to each other and to the
drafter's cache; the drafter is trained for that (ember.spec.train_eagle --parallel).

Deeper drafters (`num_hidden_layers` > 1, as AWS's published P-EAGLE drafters have four):
the layer above feeds plain Llama decoder layers on the [H] stream, each with its own
KV cache, and o is the last one's output. One forward drafts all k positions in P-EAGLE,
so its depth costs once per step, not once per draft.

Checkpoint layout (as published for vLLM / SGLang, e.g. SpecForge output): `fc.weight`,
`midlayer.{self_attn.{q,k,v,o}_proj, mlp.{gate,up,down}_proj, input_layernorm,
hidden_norm, post_attention_layernorm}.weight`, `norm.weight`, `lm_head.weight`, `d2t`,
`t2d`, optionally `embed_tokens.weight` (else the target's is used), and for P-EAGLE
`mask_embed` and `mask_hidden` ([H], or [3 Ht] before fc as vLLM stores it); a deeper
drafter's further layers as `layers.{i}.*` (i >= 1; `layers.0` is another name for
`midlayer`). config.json is a Llama config (`architectures: ["LlamaForCausalLMEagle3"]`,
`num_hidden_layers` its depth) plus
`draft_vocab_size`, `target_hidden_size`, optionally `eagle_aux_hidden_state_layer_ids`
(top level or under `eagle_config`) and `norm_before_residual`; ember adds
`parallel_drafting` (+ `parallel_positions`, the k it was trained for) for P-EAGLE.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn

from ember.config import ModelConfig
from ember.layers.attention import Attention
from ember.layers.layer_ops import TORCH_LAYER_OPS, LayerOps, RopeStep
from ember.layers.linear import Linear
from ember.layers.norm import RMSNorm
from ember.layers.rotary import RotaryEmbedding
from ember.models.llama import MERGED_PROJECTIONS, LlamaMLP
from ember.models.loader import build_context, finalize_linears, safetensors_stream

# q, k, v: [T, heads or kv_heads, head_dim] -> [T, heads, head_dim]
Attend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
ARCHITECTURE = "LlamaForCausalLMEagle3"


def default_aux_layers(num_target_layers: int) -> tuple[int, ...]:
    """vLLM's default low / middle / high choice for EAGLE-3 (for a target of fewer than 6
    layers, which only tests build: the distinct ones of 0, the middle and the last)."""
    n = num_target_layers
    return (2, n // 2, n - 3) if n >= 6 else tuple(sorted({0, n // 2, n - 1}))


@dataclass
class EagleConfig:
    """The drafter's shape (a Llama config; layer 0 is EAGLE-3's) plus what ties it to its target."""

    layer: ModelConfig                 # hidden, heads, intermediate, rope, eps of the drafter
    vocab_size: int                    # the target's
    draft_vocab_size: int
    target_hidden_size: int
    aux_layers: tuple[int, ...]
    norm_before_residual: bool = False
    parallel: bool = False             # P-EAGLE: trained with mask positions
    parallel_positions: int = 0        # how many positions it was trained to draft in one pass
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def hidden_size(self) -> int:
        return self.layer.hidden_size

    @classmethod
    def from_dict(cls, cfg: dict[str, Any], target: ModelConfig) -> EagleConfig:
        cfg = dict(cfg)
        cfg.setdefault("architectures", [ARCHITECTURE])
        layer = ModelConfig.from_dict(cfg)
        if layer.num_hidden_layers < 1:
            raise ValueError(f"an EAGLE-3 drafter has at least one layer, this config says {layer.num_hidden_layers}")
        vocab = cfg.get("vocab_size", target.vocab_size)
        if vocab != target.vocab_size:
            raise ValueError(f"the drafter's vocabulary ({vocab}) differs from the target's "
                             f"({target.vocab_size}): it was trained for another model")
        eagle = cfg.get("eagle_config") or {}
        aux = cfg.get("eagle_aux_hidden_state_layer_ids") or eagle.get("eagle_aux_hidden_state_layer_ids")
        aux = tuple(aux) if aux else default_aux_layers(target.num_hidden_layers)
        th = cfg.get("target_hidden_size") or target.hidden_size
        if th != target.hidden_size:
            raise ValueError(f"the drafter reads hidden states of size {th}, the target's are "
                             f"{target.hidden_size}: it was trained for another model")
        return cls(layer, vocab, cfg.get("draft_vocab_size") or vocab, th, aux,
                   bool(cfg.get("norm_before_residual", False)), bool(cfg.get("parallel_drafting", False)),
                   int(cfg.get("parallel_positions", 0)), cfg)

    def to_dict(self) -> dict[str, Any]:
        """config.json in the published layout."""
        c = self.layer
        out = dict(self.raw)
        out.update({
            "architectures": [ARCHITECTURE], "model_type": "llama", "num_hidden_layers": c.num_hidden_layers,
            "hidden_size": c.hidden_size, "intermediate_size": c.intermediate_size,
            "num_attention_heads": c.num_attention_heads, "num_key_value_heads": c.num_key_value_heads,
            "head_dim": c.head_dim, "rms_norm_eps": c.rms_norm_eps, "rope_theta": c.rope_theta,
            "rope_scaling": c.rope_scaling, "max_position_embeddings": c.max_position_embeddings,
            "hidden_act": "silu", "tie_word_embeddings": False, "vocab_size": self.vocab_size,
            "draft_vocab_size": self.draft_vocab_size, "target_hidden_size": self.target_hidden_size,
            "eagle_aux_hidden_state_layer_ids": list(self.aux_layers),
            "norm_before_residual": self.norm_before_residual,
            "parallel_drafting": self.parallel, "parallel_positions": self.parallel_positions,
        })
        out.pop("rope_parameters", None)
        return out


class EagleAttention(nn.Module):
    """Llama attention whose q/k/v projection reads `in_features` (2H for EAGLE-3's layer)."""

    def __init__(self, cfg: ModelConfig, in_features: int, backend, ops: LayerOps) -> None:
        super().__init__()
        self.ops = ops
        h, kvh, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = h, kvh, d
        self.qkv_proj = Linear(in_features, {"q": h * d, "k": kvh * d, "v": kvh * d}, bias=cfg.attention_bias)
        self.o_proj = Linear(h * d, cfg.hidden_size, bias=cfg.attention_bias)
        self.attn = Attention(h, kvh, d, d ** -0.5, backend)

    def forward(self, rope: RopeStep, x: torch.Tensor, attend: Attend) -> torch.Tensor:
        """x: [T, in_features] -> [T, hidden]; `attend` is the paged backend or, in
        training, a dense multi-step attention."""
        t, d = x.shape[0], self.head_dim
        q, k, v = self.qkv_proj(x).split(
            [self.num_heads * d, self.num_kv_heads * d, self.num_kv_heads * d], dim=-1)
        q, k = self.ops.rope(rope, q.reshape(t, self.num_heads, d), k.reshape(t, self.num_kv_heads, d))
        o = attend(q, k, v.reshape(t, self.num_kv_heads, d))
        return self.o_proj(o.reshape(t, self.num_heads * d))


class EagleLayer(nn.Module):
    """EAGLE-3's decoder layer: [embedding ; hidden] in, residual stream out."""

    def __init__(self, cfg: ModelConfig, backend, ops: LayerOps, norm_before_residual: bool) -> None:
        super().__init__()
        h = cfg.hidden_size
        self.self_attn = EagleAttention(cfg, 2 * h, backend, ops)
        self.mlp = LlamaMLP(cfg, ops)
        self.input_layernorm = RMSNorm(h, cfg.rms_norm_eps, ops)
        self.hidden_norm = RMSNorm(h, cfg.rms_norm_eps, ops)
        self.post_attention_layernorm = RMSNorm(h, cfg.rms_norm_eps, ops)
        self.norm_before_residual = norm_before_residual

    def forward(self, rope: RopeStep, embeds: torch.Tensor, hidden: torch.Tensor,
                attend: Attend) -> torch.Tensor:
        """embeds, hidden: [T, H] -> o: [T, H] (before the drafter's final norm)."""
        normed = self.hidden_norm(hidden)
        # The fused add-norm may write the residual sum in place (the Triton layer ops do),
        # so the residual must be this layer's own: `hidden` belongs to the caller, and for
        # P-EAGLE's mask rows it is the mask_hidden parameter expanded (one row of memory),
        # which an in-place sum would overwrite on every draft.
        residual = normed if self.norm_before_residual else hidden.clone()
        x = torch.cat([self.input_layernorm(embeds), normed], dim=-1)
        h = self.self_attn(rope, x, attend)
        h, residual = self.post_attention_layernorm(h, residual)
        return self.mlp(h) + residual


class EagleDeepLayer(nn.Module):
    """A plain Llama decoder layer on the drafter's [H] stream (layers 1.. of a deeper drafter)."""

    def __init__(self, cfg: ModelConfig, backend, ops: LayerOps) -> None:
        super().__init__()
        h = cfg.hidden_size
        self.self_attn = EagleAttention(cfg, h, backend, ops)
        self.mlp = LlamaMLP(cfg, ops)
        self.input_layernorm = RMSNorm(h, cfg.rms_norm_eps, ops)
        self.post_attention_layernorm = RMSNorm(h, cfg.rms_norm_eps, ops)

    def forward(self, rope: RopeStep, x: torch.Tensor, attend: Attend) -> torch.Tensor:
        """x: [T, H] the stream -> [T, H]."""
        # x is the layer below's fresh output, read by nothing after this layer, so the
        # fused add-norm may write the residual sum into it (unlike EagleLayer's `hidden`).
        h = self.self_attn(rope, self.input_layernorm(x), attend)
        h, residual = self.post_attention_layernorm(h, x)
        return self.mlp(h) + residual


class EagleDrafter(nn.Module):
    """fc + an EagleLayer (+ plain layers) + norm + (draft-vocabulary) head; see the module docstring."""

    def __init__(self, cfg: EagleConfig, backend=None, ops: LayerOps = TORCH_LAYER_OPS) -> None:
        super().__init__()
        c = cfg.layer
        h = c.hidden_size
        self.config = cfg
        self.fc = Linear(len(cfg.aux_layers) * cfg.target_hidden_size, h, bias=False)
        self.midlayer = EagleLayer(c, backend, ops, cfg.norm_before_residual)
        self.more_layers = nn.ModuleList(EagleDeepLayer(c, backend, ops) for _ in range(c.num_hidden_layers - 1))
        self.norm = RMSNorm(h, c.rms_norm_eps, ops)
        self.lm_head = Linear(h, cfg.draft_vocab_size, bias=False)
        self.register_buffer("d2t", torch.zeros(cfg.draft_vocab_size, dtype=torch.long))
        self._token_ids: np.ndarray | None = None   # draft_logq's column -> target token, once d2t is final
        self.rotary = RotaryEmbedding(c.head_dim, max(c.max_position_embeddings, 8192), c.rope_theta,
                                      c.rope_scaling, ops)
        # Its own embedding when the checkpoint has one (or its width differs from the
        # target's); otherwise the target's, shared, not a parameter of the drafter.
        self.embed_tokens: nn.Embedding | None = None
        self._shared_embed: tuple[nn.Embedding, ...] = ()
        if cfg.parallel:
            self.mask_embed = nn.Parameter(torch.zeros(h))
            self.mask_hidden = nn.Parameter(torch.zeros(h))

    # ---- wiring ------------------------------------------------------------------------
    def share_embedding(self, embed: nn.Embedding) -> None:
        """Use the target's embedding (when the checkpoint has none of its own)."""
        if self.embed_tokens is None:
            if embed.weight.shape[1] != self.config.hidden_size:
                raise ValueError("the drafter has no embedding and the target's has another width")
            self._shared_embed = (embed,)

    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        """token_ids: [T] target ids -> [T, H]."""
        if self.embed_tokens is not None:
            return self.embed_tokens(token_ids)
        # The target's: never trained through the drafter.
        return torch.nn.functional.embedding(token_ids, self._shared_embed[0].weight.detach())

    def attention_layers(self) -> list[Attention]:
        return [self.midlayer.self_attn.attn] + [m.self_attn.attn for m in self.more_layers]

    # ---- compute -----------------------------------------------------------------------
    def fuse(self, aux: torch.Tensor) -> torch.Tensor:
        """aux: [T, n_aux * Ht] the target's aux hidden states -> [T, H]."""
        return self.fc(aux)

    def forward(self, embeds: torch.Tensor, hidden: torch.Tensor, positions: torch.Tensor,
                attends: Sequence[Attend]) -> torch.Tensor:
        """embeds [T, H] (token embeddings, or mask_embed), hidden [T, H] (fused target
        states, the drafter's own o, or mask_hidden), positions [T] -> o [T, H]. `attends`:
        one attention per layer (`paged`, or training's `step_attentions`)."""
        if len(attends) != 1 + len(self.more_layers):
            raise ValueError(f"{len(attends)} attentions for a drafter of {1 + len(self.more_layers)} layers")
        rope = self.rotary.lookup(positions)
        o = self.midlayer(rope, embeds, hidden, attends[0])
        for layer, att in zip(self.more_layers, attends[1:]):
            o = layer(rope, o, att)
        return o

    def paged(self, fb) -> list[Attend]:
        """Attention over the paged KV cache for one engine forward (`fb`: ForwardBatch),
        one per layer."""
        return [lambda q, k, v, attn=attn: attn(q, k, v, fb) for attn in self.attention_layers()]

    def compute_logits(self, o: torch.Tensor) -> torch.Tensor:
        """o: [N, H] -> fp32 logits [N, draft_vocab]."""
        return self.lm_head(self.norm(o)).float()

    def to_target_ids(self, draft_ids: torch.Tensor) -> torch.Tensor:
        return draft_ids + self.d2t[draft_ids]

    def draft_logq(self, o: torch.Tensor) -> tuple[torch.Tensor, np.ndarray]:
        """o: [N, H] -> (log q [N, draft_vocab] fp32, the target token of each column
        [draft_vocab] on the host). The same log q as over the target's vocabulary (the
        tokens the draft vocabulary lacks have q = 0), at a sixth of the width: what tree
        expansion ranks, with the columns mapped back on the host."""
        if self._token_ids is None or self._token_ids.shape[0] != self.config.draft_vocab_size:
            ids = torch.arange(self.config.draft_vocab_size, device=self.d2t.device)
            self._token_ids = self.to_target_ids(ids).cpu().numpy()
        return self.draft_log_probs(o), self._token_ids

    def draft_log_probs(self, o: torch.Tensor) -> torch.Tensor:
        """o: [N, H] -> log q [N, draft_vocab] fp32 (draft_logq's, device only)."""
        return torch.log_softmax(self.compute_logits(o), dim=-1)

    def target_logits(self, o: torch.Tensor) -> torch.Tensor:
        """o: [N, H] -> fp32 logits [N, vocab] over the target's vocabulary (-inf for the
        tokens the draft vocabulary lacks), so the request's sampling settings apply."""
        logits = self.compute_logits(o)
        if self.config.draft_vocab_size == self.config.vocab_size and not bool(self.d2t.any()):
            return logits
        out = logits.new_full((logits.shape[0], self.config.vocab_size), float("-inf"))
        ids = torch.arange(self.config.draft_vocab_size, device=logits.device)
        out[:, self.to_target_ids(ids)] = logits
        return out

    # ---- weights -----------------------------------------------------------------------
    def load_weights(self, weights: dict[str, torch.Tensor]) -> None:
        """Tensors by their published names; raises on an unknown or missing tensor."""
        modules = dict(self.named_modules())
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        pending_mask_hidden = None
        for name, tensor in weights.items():
            name = _canonical(name)
            if name == "t2d":
                continue   # implied by d2t
            if name == "d2t":
                self.d2t.copy_(tensor.long())
                self._token_ids = None
                continue
            if name == "embed_tokens.weight":
                self.embed_tokens = nn.Embedding(*tensor.shape, device=tensor.device, dtype=self.norm.weight.dtype)
                self.embed_tokens.weight.data.copy_(tensor)
                self.embed_tokens.weight.requires_grad_(False)
                continue
            if name == "mask_hidden" and tensor.numel() != self.config.hidden_size:
                pending_mask_hidden = tensor.reshape(-1)   # [3 Ht] before fc: applied below
                continue
            module_name, kind = name.rsplit(".", 1) if "." in name else ("", name)
            parent, _, proj = module_name.rpartition(".")
            shard = None
            if proj in MERGED_PROJECTIONS:
                merged, shard = MERGED_PROJECTIONS[proj]
                module_name = f"{parent}.{merged}"
            module = modules.get(module_name)
            if isinstance(module, Linear):
                loaded.add(f"{module_name}.{module.load_tensor(kind, tensor, shard)}")
            elif name in params:
                params[name].data.copy_(tensor.reshape(params[name].shape))
                loaded.add(name)
            else:
                raise KeyError(f"EAGLE checkpoint tensor {name!r} matches nothing in the drafter")
        if pending_mask_hidden is not None and "mask_hidden" in params:
            with torch.no_grad():
                params["mask_hidden"].copy_(self.fc(pending_mask_hidden.to(self.fc.weight.dtype)[None])[0])
            loaded.add("mask_hidden")
        missing = [n for n in params if n not in loaded and not n.startswith("embed_tokens.")]
        if missing:
            raise ValueError(f"EAGLE checkpoint is missing {missing}")

    def state_for_saving(self) -> dict[str, torch.Tensor]:
        """The published tensor names (q/k/v and gate/up split again), contiguous, on the CPU."""
        attn = self.midlayer.self_attn
        d = attn.head_dim
        qkv_rows = [attn.num_heads * d, attn.num_kv_heads * d, attn.num_kv_heads * d]
        out: dict[str, torch.Tensor] = {}
        for name, p in self.named_parameters():
            if name.startswith("embed_tokens."):
                continue
            if name.startswith("more_layers."):   # published: layers.1, layers.2, ...
                i, rest = name[len("more_layers."):].split(".", 1)
                name = f"layers.{int(i) + 1}.{rest}"
            module, _, kind = name.rpartition(".")
            parent, _, proj = module.rpartition(".")
            t = p.detach()
            if proj == "qkv_proj":
                out.update({f"{parent}.{s}_proj.{kind}": x for s, x in zip("qkv", t.split(qkv_rows))})
            elif proj == "gate_up_proj":
                gate, up = t.chunk(2, dim=0)
                out.update({f"{parent}.gate_proj.{kind}": gate, f"{parent}.up_proj.{kind}": up})
            else:
                out[name] = t
        out["d2t"] = self.d2t.clone()
        ids = self.to_target_ids(torch.arange(self.config.draft_vocab_size, device=self.d2t.device))
        t2d = torch.zeros(self.config.vocab_size, dtype=torch.bool)
        t2d[ids.cpu()] = True
        out["t2d"] = t2d
        return {k: v.contiguous().cpu() for k, v in out.items()}


def _canonical(name: str) -> str:
    """Published variants -> this module's names (midlayer.*, more_layers.{i - 1}.* for
    layers.{i}.*; no `model.` prefix)."""
    if name.startswith("model."):
        name = name[len("model."):]
    for prefix in ("layers.0.", "midlayer."):
        if name.startswith(prefix):
            return "midlayer." + name[len(prefix):]
    if name.startswith("layers."):
        i, rest = name[len("layers."):].split(".", 1)
        return f"more_layers.{int(i) - 1}.{rest}"
    return name


def save_eagle(drafter: EagleDrafter, folder: str, extra_config: dict[str, Any] | None = None) -> None:
    """Write config.json + model.safetensors in the published layout."""
    from safetensors.torch import save_file
    os.makedirs(folder, exist_ok=True)
    save_file(drafter.state_for_saving(), os.path.join(folder, "model.safetensors"))
    cfg = drafter.config.to_dict()
    cfg.update(extra_config or {})
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(cfg, f, indent=1)


def load_eagle(folder: str, target: ModelConfig, backend=None, ops: LayerOps = TORCH_LAYER_OPS,
               device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> EagleDrafter:
    """Build the drafter of an EAGLE-3 / P-EAGLE folder for `target` and load its weights
    (memory-mapped safetensors; never pickle)."""
    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"EAGLE drafter folder {folder} has no config.json")
    with open(path) as f:
        cfg = EagleConfig.from_dict(json.load(f), target)
    stream = safetensors_stream(folder)   # raises on a folder without *.safetensors
    with build_context(dtype, device):
        drafter = EagleDrafter(cfg, backend, ops)
    with torch.no_grad():
        drafter.load_weights({k: v.to(device) for k, v in stream(dtype)})
        finalize_linears(drafter)
    return drafter.eval()
