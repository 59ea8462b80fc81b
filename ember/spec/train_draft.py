"""`ember train-draft`: distill a small draft model for speculative decoding.

The draft is Llama-shaped with the target's hidden size and vocabulary, initialised from
the target's embedding, its first `num_layers` decoder layers, its final norm and its
(tied) LM head, then trained to minimise KL(target || draft) over a text.

To fit a CPU budget the target runs once: its top-`top_k` next-token probabilities at
every position are stored (~6 bytes each), and the draft is trained against them (the KL
restricted to the target's top-k, which holds nearly all of its mass). The embedding and
LM head stay frozen (they are the target's, and the vocabulary projection is most of the
cost), so only the few decoder layers and the final norm learn.

Output: a Hugging Face folder (config.json, model.safetensors, tokenizer.json) that
`--speculative-config '{"method": "draft", "model": DIR}'` loads, plus train_log.json.
Training uses transformers (the reference Llama); serving loads the folder with ember.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from typing import Any

import torch

from ember.spec.distill import (
    add_distill_args,
    hf_llama,
    load_target,
    teacher_topk,
    text_chunks,
    topk_kl,
    train_loop,
)


def init_draft(target, hf_config: dict[str, Any], num_layers: int):
    """A `num_layers` Llama holding copies of the target's embedding, first layers and norm."""
    draft = hf_llama(hf_config, num_layers)
    state = {k: v for k, v in target.state_dict().items()
             if not k.startswith("model.layers.") or int(k.split(".")[2]) < num_layers}
    draft.load_state_dict(state, strict=False)
    draft.tie_weights()
    return draft


@torch.no_grad()
def agreement(target, draft, chunks: torch.Tensor, batch: int) -> float:
    """Fraction of positions where draft and target argmax agree (greedy acceptance proxy)."""
    hits = total = 0
    dev = next(target.parameters()).device
    for i in range(0, len(chunks), batch):
        x = chunks[i:i + batch].to(dev)
        hits += (target(x).logits.argmax(-1) == draft(x).logits.argmax(-1)).sum().item()
        total += x.numel()
    return hits / max(total, 1)


def train(args: argparse.Namespace, log=print) -> dict[str, Any]:
    t0 = time.time()
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    target, tokenizer, target_cfg = load_target(args.target)
    target.to(device)
    train_chunks, held = text_chunks(tokenizer, args, log)
    t_ids, t_probs = teacher_topk(target, train_chunks, args.batch_size, args.top_k, log)
    draft = init_draft(target, target_cfg.hf_config, args.num_layers).to(device)
    base_agree = agreement(target, draft, held, args.batch_size)
    log(f"held-out argmax agreement before training: {base_agree:.3f}")
    draft.model.embed_tokens.weight.requires_grad_(False)  # tied with the LM head
    params = [p for p in draft.parameters() if p.requires_grad]
    draft.train()
    losses = train_loop(
        params, len(train_chunks),
        lambda idx: topk_kl(draft(train_chunks[idx].to(device)).logits, t_ids[idx], t_probs[idx]),
        args, t0 + args.time_budget * 60 - args.reserve_s, log)
    draft.eval()
    final_agree = agreement(target, draft, held, args.batch_size)
    log(f"held-out argmax agreement after training: {final_agree:.3f}")
    save(draft.cpu(), tokenizer, args.out)
    report = {"target": args.target, "text": args.text, "num_layers": args.num_layers,
              "train_fraction": args.train_fraction, "train_tokens": int(train_chunks.numel()),
              "steps": len(losses), "epochs_planned": args.epochs,
              "final_kl": losses[-1] if losses else None,
              "heldout_argmax_agreement_before": base_agree,
              "heldout_argmax_agreement_after": final_agree, "seconds": time.time() - t0,
              "threads": torch.get_num_threads()}
    with open(os.path.join(args.out, "train_log.json"), "w") as f:
        json.dump({**report, "kl_curve": losses}, f, indent=1)
    return report


def save(draft, tokenizer, out: str) -> None:
    """A Hugging Face folder ember loads: safetensors weights, config, and the target's
    tokenizer (the draft must share it)."""
    os.makedirs(out, exist_ok=True)
    draft.save_pretrained(out, safe_serialization=True)
    tokenizer.backend.save(os.path.join(out, "tokenizer.json"))
    specials = {"bos_token": tokenizer.bos_token, "eos_token": tokenizer.eos_token}
    with open(os.path.join(out, "tokenizer_config.json"), "w") as f:
        json.dump({k: v for k, v in specials.items() if v is not None}, f)


def add_train_draft_parser(sub) -> None:
    p = sub.add_parser("train-draft", help="distill a small draft model for speculative decoding")
    add_distill_args(p, epochs=3, lr=1e-3)
    p.add_argument("--num-layers", type=int, default=2)
    p.set_defaults(func=lambda a: print(json.dumps(train(a), indent=1)))
