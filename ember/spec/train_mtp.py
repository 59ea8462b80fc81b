"""`ember train-mtp`: train an MTP module (DeepSeek-V3's multi-token prediction) for a
frozen target, for MTP self-speculation (ember.spec.mtp has the definition).

Initialisation: the block is a copy of the target's last decoder layer (as is common: it
already maps a late residual stream to next-token features), shared_head.norm a copy of
the target's final norm, enorm and hnorm at 1, eh_proj [I | I] (the block starts from the
sum of both normalized inputs; on SmolLM2 this reached a higher held-out agreement than a
random eh_proj after the same short run, 0.14 vs 0.12); the embedding and LM head are the
target's and stay frozen.

Data: one teacher pass of the target over the text (the first 80% of each file) stores,
per position, its hidden state (its forward output, after the final norm: what the
runner hands the MTP at serving time) and its top-64 next-token probabilities
(ember.spec.distill). Pair i, (t_{i+1}, h_i), teacher-forced with the real tokens, is
trained towards the target's distribution at position i + 1, i.e. of token i + 2:
KL(target || MTP) over the target's top-k. KL to the target's distribution rather than
cross-entropy on its greedy tokens, because under sampling the verifier accepts a draft
with probability min(1, p / q), so it is the whole distribution that should match; under
greedy the KL fit's argmax is the greedy token anyway; and 64 probabilities per position
get more out of the expensive teacher pass than one token does.

Output: a folder with model.safetensors (the layer in DeepSeek-V3's naming,
`model.layers.{num_hidden_layers}.*`, without the embedding / head copies), config.json
and train_log.json, which `--speculative-config '{"method": "mtp", "model": DIR}'` loads.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from typing import Any

import torch
from torch import nn

from ember.spec.distill import (
    add_distill_args,
    load_target,
    teacher_topk,
    text_chunks,
    topk_kl,
    train_loop,
)
from ember.spec.mtp import save_mtp_checkpoint


class TrainableMTP(nn.Module):
    """The MTP module in transformers' layers, attached to a frozen transformers target."""

    def __init__(self, target) -> None:
        from transformers.models.llama.modeling_llama import (
            LlamaDecoderLayer,
            LlamaRMSNorm,
        )
        super().__init__()
        cfg = target.config
        h, eps = cfg.hidden_size, cfg.rms_norm_eps
        self.enorm = LlamaRMSNorm(h, eps)
        self.hnorm = LlamaRMSNorm(h, eps)
        self.eh_proj = nn.Linear(2 * h, h, bias=False)
        with torch.no_grad():   # [I | I]: both inputs pass through from the start
            self.eh_proj.weight.copy_(torch.cat([torch.eye(h), torch.eye(h)], dim=1))
        self.block = LlamaDecoderLayer(cfg, layer_idx=cfg.num_hidden_layers - 1)
        self.block.load_state_dict(target.model.layers[-1].state_dict())
        self.shared_head_norm = LlamaRMSNorm(h, eps)
        self.shared_head_norm.load_state_dict(target.model.norm.state_dict())
        self.float()
        self._target = (target,)   # not a submodule: frozen, and not saved with the MTP

    def forward(self, next_ids: torch.Tensor,   # [B, T] t_{i+1}
                prev: torch.Tensor) -> torch.Tensor:   # [B, T, H] h_i
        """-> o [B, T, H]; pair j runs at position j, causally over the pairs before it."""
        target = self._target[0]
        x = self.eh_proj(torch.cat([self.enorm(target.model.embed_tokens(next_ids)),
                                    self.hnorm(prev.float())], dim=-1))
        pos = torch.arange(next_ids.shape[1], device=next_ids.device)[None].expand(next_ids.shape[0], -1)
        # No mask: transformers' SDPA attention is causal then.
        return self.block(x, position_embeddings=target.model.rotary_emb(x, pos), position_ids=pos)

    def logits(self, o: torch.Tensor) -> torch.Tensor:
        """o: [..., H] -> [..., vocab] (the target's head after shared_head.norm)."""
        return self._target[0].lm_head(self.shared_head_norm(o))

    def layer_tensors(self) -> dict[str, torch.Tensor]:
        """Names inside one DeepSeek-V3 MTP layer."""
        tensors = {"enorm.weight": self.enorm.weight, "hnorm.weight": self.hnorm.weight,
                   "eh_proj.weight": self.eh_proj.weight,
                   "shared_head.norm.weight": self.shared_head_norm.weight}
        tensors.update(self.block.state_dict())
        return tensors


def pairs(chunk_ids: torch.Tensor, hidden: torch.Tensor, t_ids: torch.Tensor,
          t_probs: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Teacher-forced MTP inputs and targets from [b, seq_len, ...] teacher data: pair i is
    (t_{i+1}, h_i) and learns the target's distribution at i + 1 (of token i + 2)."""
    return chunk_ids[:, 1:], hidden[:, :-1], t_ids[:, 1:], t_probs[:, 1:]


@torch.no_grad()
def agreement(mtp: TrainableMTP, target, chunks: torch.Tensor, batch: int) -> float:
    """Fraction of pairs whose MTP argmax is the target's argmax for the same token
    (the greedy acceptance of draft 0, teacher-forced)."""
    hits = total = 0
    dev = next(target.parameters()).device
    for i in range(0, len(chunks), batch):
        x = chunks[i:i + batch].to(dev)
        out = target.model(x).last_hidden_state
        want = target.lm_head(out[:, 1:]).argmax(-1)
        got = mtp.logits(mtp(x[:, 1:], out[:, :-1])).argmax(-1)
        hits += (want == got).sum().item()
        total += want.numel()
    return hits / max(total, 1)


def train(args: argparse.Namespace, log=print) -> dict[str, Any]:
    t0 = time.time()
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    target, tokenizer, target_cfg = load_target(args.target)
    target.to(device)
    train_chunks, held = text_chunks(tokenizer, args, log)
    t_ids, t_probs, hidden = teacher_topk(target, train_chunks, args.batch_size, args.top_k, log,
                                          keep_hidden=True)
    mtp = TrainableMTP(target).to(device)
    base_agree = agreement(mtp, target, held, args.batch_size)
    log(f"held-out draft-0 argmax agreement before training: {base_agree:.3f}")

    def loss(idx: torch.Tensor) -> torch.Tensor:
        nxt, prev, ids, probs = pairs(train_chunks[idx], hidden[idx], t_ids[idx], t_probs[idx])
        return topk_kl(mtp.logits(mtp(nxt.to(device), prev.to(device))), ids.to(device), probs.to(device))
    mtp.train()
    losses = train_loop(list(mtp.parameters()), len(train_chunks), loss, args,
                        t0 + args.time_budget * 60 - args.reserve_s, log)
    mtp.eval()
    final_agree = agreement(mtp, target, held, args.batch_size)
    log(f"held-out draft-0 argmax agreement after training: {final_agree:.3f}")
    report = {"target": args.target, "text": args.text, "train_fraction": args.train_fraction,
              "train_tokens": int(train_chunks.numel()), "steps": len(losses),
              "epochs_planned": args.epochs, "final_kl": losses[-1] if losses else None,
              "heldout_draft0_argmax_agreement_before": base_agree,
              "heldout_draft0_argmax_agreement_after": final_agree, "seconds": time.time() - t0,
              "threads": torch.get_num_threads()}
    save_mtp_checkpoint(args.out, mtp.layer_tensors(), target_cfg, {"target": args.target})
    with open(os.path.join(args.out, "train_log.json"), "w") as f:
        json.dump({**report, "kl_curve": losses}, f, indent=1)
    return report


def add_train_mtp_parser(sub) -> None:
    p = sub.add_parser("train-mtp", help="train an MTP module for MTP self-speculation")
    add_distill_args(p, epochs=3, lr=1e-3)
    p.set_defaults(func=lambda a: print(json.dumps(train(a), indent=1)))
