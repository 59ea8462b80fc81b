"""MTP self-speculation: DeepSeek-V3's multi-token-prediction module as a proposer.

The module. Given the target's hidden state h_i at position i and the token t_{i+1}:

    x      = eh_proj(cat(enorm(embed(t_{i+1})), hnorm(h_i)))     # [2H] -> H, no bias
    o_i    = block(x) at position i                               # one decoder layer
    logits = lm_head(shared_head.norm(o_i))                       # scores t_{i+2}

h_i is the target's forward output, i.e. after its final norm: that is what vLLM hands
DeepSeek's MTP layer (its DeepSeek-V3 model returns the normed hidden states, which its MTP
proposer passes on; "the representation given by the main model" in the DeepSeek-V3
report); hnorm then normalizes it with its own weight. The embedding and the
LM head are the target's. The report runs the block at position i + 1 (the position of
t_{i+1}); here the pair (t_{i+1}, h_i) runs at position i, as vLLM's MTP does: RoPE
attention depends only on position differences, so the output is the same, and the
pair's K/V then sits in the slot the target uses for token i, with no gap at position 0.
Chained drafts feed the block's own output o (before shared_head.norm, as vLLM does) with
the token just drafted: draft j + 1 comes from (d_j, o) at the next position.

The block is the target's decoder-layer type, built by the target (`mtp_block(backend,
ops)` -> an `MTPBlock`, ember.models.mtp_block: a Llama layer for Llama-family targets,
DeepSeek's MLA + MoE layer for DeepSeek-V3), attending through the target's backend.

Weights use DeepSeek-V3's naming: the MTP layer j is `model.layers.{num_hidden_layers + j}.*`
with `enorm`, `hnorm`, `eh_proj`, `shared_head.norm`, the decoder layer's usual names, and
`embed_tokens` / `shared_head.head` (copies of the target's, skipped). They come from an
`ember train-mtp` folder (config.json + safetensors) or from the target's own checkpoint
when it carries MTP layers (`num_nextn_predict_layers`). Only the first MTP layer is used;
k > 1 chains it, as vLLM does for DeepSeek-V3.

The proposer. The MTP's input at position i needs h_i, the target's hidden state there.
The runner's hook hands over each step's hidden states and their KV slots, on the device
(`observe_hidden_states`: after verification, or at launch for a step deferred by async
scheduling); the proposer only copies the rows into `TargetRows` (ember.spec.drafting: one
row per slot of the target's pool, on its block tables), with no MTP forward. `propose`, for the requests
that draft this step only, first catches up: one MTP forward over the pairs (t_{i+1}, h_i)
from the MTP's coverage of the request to its last computed position (usually the one or
two pairs the last step made known; the whole prompt the first time, or every token since
the request last drafted), which writes the MTP's K/V (its own paged KV on the target's
block tables, `ProposerKV`) for those positions; the last pair's output o scores draft 0.
Then k - 1 chained single-token steps. The K/V those chained steps write sits past
num_computed_tokens and is overwritten by the next catch-up with the target's hidden
states (the chain's inputs were the MTP's own outputs, never reusable).

Costs: a step where no request drafts (adaptive k = 0) runs no MTP forward: the hook's
index copy is its whole cost. A drafting step runs the catch-up plus k - 1 chained
forwards (`forwards_for(k) = k`), the catch-up over every token the request computed
since it last drafted. Stale MTP K/V can only lower acceptance, never change the output:
requests that share a cached prefix write the pair at its last position with their own
next token, and the verifier makes the output the target's whatever the drafts are.
"""
from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Protocol

import torch
from torch import nn

from ember.config import ModelConfig
from ember.engine.forward_batch import ForwardBatch
from ember.engine.model_runner import TargetHiddenStates, build_forward_batch
from ember.engine.scheduler import SchedulerOutput
from ember.layers.attention import Attention
from ember.layers.layer_ops import TORCH_LAYER_OPS, LayerOps
from ember.layers.linear import Linear
from ember.layers.norm import RMSNorm
from ember.models.loader import (
    WeightStream,
    build_context,
    finalize_linears,
    randomize,
    safetensors_stream,
)
from ember.spec.drafting import (
    ProposerKV,
    TargetRows,
    catch_up,
    draw_drafts,
    state_bytes_per_token,
)
from ember.spec.proposer import Proposer

if TYPE_CHECKING:
    from ember.engine.engine import Engine
    from ember.engine.model_runner import ModelRunner
    from ember.spec.config import SpeculativeConfig

logger = logging.getLogger("ember")

# Names inside an MTP layer (after `model.layers.{N}.`) that copy the target's tensors;
# the target's own serve. Besides them: the MTP's enorm, hnorm, eh_proj, shared_head.norm,
# and the decoder layer's names.
MTP_SHARED_WITH_TARGET = ("embed_tokens.", "shared_head.head.")


class MTPBlock(Protocol):
    """The transformer block of an MTP module: one decoder layer of the target's type,
    which the target model builds (`target.mtp_block(backend, ops)`)."""

    def __call__(self, x: torch.Tensor, positions: torch.Tensor, fb: ForwardBatch) -> torch.Tensor:
        """x: [T, H] at positions [T], attending causally over the MTP's paged K/V through
        fb -> the residual stream after the layer, [T, H]."""

    def attention_layers(self) -> list[Attention]:
        """Its attention layers (their caches are the MTP's paged KV)."""

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Tensors named as in one of the target's decoder layers (`self_attn.q_proj.weight`...)."""


class SharedHead(nn.Module):
    """DeepSeek's `shared_head`: its own final norm; the head itself is the target's."""

    def __init__(self, hidden_size: int, eps: float, ops: LayerOps) -> None:
        super().__init__()
        self.norm = RMSNorm(hidden_size, eps, ops)


class MTPModule(nn.Module):
    """One MTP layer: enorm, hnorm, eh_proj, the block, shared_head.norm. The target's
    embedding and LM head are shared through `share_target`, not owned."""

    def __init__(self, cfg: ModelConfig, block: MTPBlock, ops: LayerOps = TORCH_LAYER_OPS) -> None:
        super().__init__()
        h, eps = cfg.hidden_size, cfg.rms_norm_eps
        self.enorm = RMSNorm(h, eps, ops)
        self.hnorm = RMSNorm(h, eps, ops)
        self.eh_proj = Linear(2 * h, h, bias=False)
        self.block = block
        self.shared_head = SharedHead(h, eps, ops)
        # Not registered: they are the target's parameters.
        self._target: tuple[nn.Embedding, Callable[[torch.Tensor], torch.Tensor]] | None = None

    def share_target(self, embed_tokens: nn.Embedding,
                     compute_logits: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """The target's embedding, and its LM head (hidden [N, H] -> fp32 logits [N, vocab])."""
        self._target = (embed_tokens, compute_logits)

    def forward(self, next_token_ids: torch.Tensor,   # [T] t_{i+1}
                positions: torch.Tensor,              # [T] i
                prev_hidden: torch.Tensor,            # [T, H] h_i (the target's, or o of the last chained step)
                fb: ForwardBatch) -> torch.Tensor:
        """-> o: [T, H], the block's output residual stream (before shared_head.norm)."""
        embed, _ = self._target
        x = torch.cat([self.enorm(embed(next_token_ids)), self.hnorm(prev_hidden)], dim=-1)  # [T, 2H]
        return self.block(self.eh_proj(x), positions, fb)

    def compute_logits(self, o: torch.Tensor) -> torch.Tensor:
        """o: [N, H] -> fp32 logits [N, vocab] for the token two after the pair's position."""
        _, lm_head = self._target
        return lm_head(self.shared_head.norm(o))

    def attention_layers(self) -> list[Attention]:
        return self.block.attention_layers()

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Tensors named inside one MTP layer (`enorm.weight`, `eh_proj.weight`,
        `self_attn.q_proj.weight`, ...); raises if any of the MTP's own is missing."""
        own = {n: p for n, p in self.named_parameters() if not n.startswith("block.")}
        loaded, block_weights = set(), []
        for name, tensor in weights:
            if name.startswith(MTP_SHARED_WITH_TARGET):
                continue
            if name.startswith("eh_proj."):
                kind = self.eh_proj.load_tensor(name.split(".", 1)[1], tensor)
                name = f"eh_proj.{kind}"
            elif name in own:
                own[name].data.copy_(tensor)
            else:
                block_weights.append((name, tensor))
                continue
            loaded.add(name)
        missing = sorted(set(own) - loaded)
        if missing:
            raise ValueError(f"MTP checkpoint is missing {missing}")
        self.block.load_weights(block_weights)


def mtp_layer_weights(weights: Iterable[tuple[str, torch.Tensor]],
                      layer_index: int) -> Iterable[tuple[str, torch.Tensor]]:
    """DeepSeek naming -> names inside the MTP layer: `model.layers.{layer_index}.X` -> `X`;
    other tensors are not this layer's."""
    prefix = f"model.layers.{layer_index}."
    for name, tensor in weights:
        if name.startswith(prefix):
            yield name[len(prefix):], tensor


def mtp_checkpoint(model: str | None, target_path: str, target_cfg: ModelConfig,
                   dummy: bool) -> tuple[int, WeightStream | None]:
    """Where the MTP layer's weights are: (its layer index, a stream of the checkpoint's
    tensors under `model.layers.{index}.`, or None for random weights with a dummy target).

    `model`: a folder whose config.json gives `num_hidden_layers` (the MTP layer's index)
    and `num_nextn_predict_layers` (an `ember train-mtp` output, or a DeepSeek-V3
    checkpoint); None: the target's own checkpoint, which must carry MTP layers."""
    if model is None:
        if not target_cfg.hf_config.get("num_nextn_predict_layers"):
            raise ValueError('speculative method "mtp" needs "model" (an `ember train-mtp` folder) '
                             "unless the target checkpoint carries MTP layers (num_nextn_predict_layers)")
        index = target_cfg.num_hidden_layers
        if dummy:
            return index, None
        if not os.path.isdir(target_path):
            raise ValueError("MTP layers are read from a Hugging Face folder target; pass \"model\"")
        folder = target_path
    else:
        folder = model
        path = os.path.join(folder, "config.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"MTP folder {folder} has no config.json")
        with open(path) as f:
            mcfg = json.load(f)
        if not mcfg.get("num_nextn_predict_layers"):
            raise ValueError(f"{path} has no MTP layer (num_nextn_predict_layers)")
        for key in ("hidden_size", "vocab_size"):
            if mcfg.get(key) != getattr(target_cfg, key):
                raise ValueError(f"the MTP module's {key} ({mcfg.get(key)}) differs from the "
                                 f"target's ({getattr(target_cfg, key)}): it was trained for another model")
        index = mcfg["num_hidden_layers"]
    prefix = f"model.layers.{index}."
    return index, safetensors_stream(folder, keep=lambda name: name.startswith(prefix))


def build_mtp(target: nn.Module, cfg: SpeculativeConfig, engine: Engine) -> MTPModule:
    """The MTP module for the engine's target, its block from the target, weights loaded."""
    runner = engine.runner
    if not hasattr(target, "mtp_block"):
        raise ValueError(f"{engine.model_config.architecture} has no MTP block type (mtp_block)")
    dummy = engine.cfg.load_format == "dummy" or engine.cfg.model.endswith(".json")
    index, weights = mtp_checkpoint(cfg.model, engine.cfg.model, engine.model_config, dummy)
    with build_context(runner.dtype, runner.device):
        mtp = MTPModule(engine.model_config, target.mtp_block(runner.backend, runner.layer_ops),
                        runner.layer_ops)
    mtp.share_target(target.model.embed_tokens, target.compute_logits)
    with torch.no_grad():
        if weights is None:
            randomize(mtp, engine.cfg.seed)
        else:
            mtp.load_weights(mtp_layer_weights(weights(runner.dtype), index))
        finalize_linears(mtp)
    return mtp.eval()


class MTPProposer(Proposer):
    """Drafts with an MTP module on the target's hidden states; see the module docstring."""

    name = "mtp"
    needs_hidden_states = True

    def __init__(self, cfg: SpeculativeConfig, engine: Engine) -> None:
        runner = engine.runner
        self.device = runner.device
        self.block_size = runner.block_size
        self.backend = runner.backend
        self.vocab_size = engine.model_config.vocab_size
        self.mtp = build_mtp(runner.model, cfg, engine)
        self.hidden_size = engine.model_config.hidden_size
        self.source = cfg.model or "from the target checkpoint"
        self.max_catch_up = runner.max_num_batched_tokens

    def bytes_per_token(self, dtype: torch.dtype) -> int:
        return state_bytes_per_token(self.mtp.attention_layers(), self.hidden_size, dtype)

    def allocate(self, runner: ModelRunner) -> None:
        self.kv = ProposerKV(self.mtp.attention_layers(), runner)
        self.hidden = TargetRows(self.hidden_size, runner)
        logger.info("MTP module %s: KV %.1f MiB, target hidden rows %.1f MiB", self.source,
                    self.kv.nbytes / 2**20, self.hidden.nbytes / 2**20)

    def observe_hidden_states(self, step: TargetHiddenStates) -> None:
        """Keep the hidden state of every token the step computed (no MTP forward)."""
        self.hidden.write(step, step.hidden)

    def _catch_up_forward(self, fb: ForwardBatch) -> torch.Tensor:
        """The MTP over pairs (t_{i+1}, h_i), h_i from the kept hidden rows -> o [T, H]."""
        self.backend.prepare(fb)
        return self.mtp(fb.input_ids, fb.positions, self.hidden.rows[fb.slot_mapping], fb)

    @torch.inference_mode()
    def propose(self, batch: SchedulerOutput) -> None:
        spec, o, self.catch_up_tokens, _ = catch_up(self.kv, batch.scheduled, self.block_size, self.device,
                                                    self.max_catch_up, self._catch_up_forward)
        if not spec:
            return
        # o: [B, H] the output of each request's last pair: it scores draft 0.
        logits = self.mtp.compute_logits(o)
        tokens: list[list[int]] = [[] for _ in spec]
        probs: list[list[torch.Tensor]] = [[] for _ in spec]
        active = list(range(len(spec)))
        while True:
            draw_drafts(spec, active, logits, tokens, probs, self.vocab_size)
            still = [j for j, i in enumerate(active) if len(tokens[i]) < spec[i].num_spec_slots]
            if not still:
                break
            if len(still) < len(active):
                o = o[torch.tensor(still, device=self.device)]
            active = [active[j] for j in still]
            # (last draft, o) at the position after the last pair: the draft's own position - 1.
            seqs = []
            for i in active:
                r = spec[i].request
                seqs.append((r.block_ids, r.num_tokens - 2 + len(tokens[i]), [tokens[i][-1]]))
            fb = build_forward_batch(seqs, self.block_size, self.device)
            self.backend.prepare(fb)
            o = self.mtp(fb.input_ids, fb.positions, o, fb)
            logits = self.mtp.compute_logits(o)
        for s, toks, ps in zip(spec, tokens, probs):
            s.spec_token_ids = toks
            s.spec_probs = torch.stack(ps)   # [k, vocab]


def save_mtp_checkpoint(folder: str, layer_tensors: dict[str, torch.Tensor], target_cfg: ModelConfig,
                        meta: dict | None = None) -> None:
    """Write one MTP layer in DeepSeek-V3's naming (`model.layers.{num_hidden_layers}.X`
    for each `X` of layer_tensors) as model.safetensors, plus a config.json saying where
    the layer sits and what target it fits (`meta`: anything else worth recording)."""
    from safetensors.torch import save_file
    os.makedirs(folder, exist_ok=True)
    index = target_cfg.num_hidden_layers
    save_file({f"model.layers.{index}.{name}": t.detach().contiguous().cpu()
               for name, t in layer_tensors.items()}, os.path.join(folder, "model.safetensors"))
    config = {"model_type": "ember_mtp", "num_hidden_layers": index, "num_nextn_predict_layers": 1,
              "hidden_size": target_cfg.hidden_size, "vocab_size": target_cfg.vocab_size,
              "rms_norm_eps": target_cfg.rms_norm_eps,
              "target_architecture": target_cfg.architecture, **(meta or {})}
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f, indent=1)
