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
import math
import os
import time
from typing import Any

import torch


def _read_split(path: str, fraction: float, held_out: bool) -> str:
    """The first `fraction` of a text file (by characters), or the rest when held_out."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    cut = int(len(text) * fraction)
    return text[cut:] if held_out else text[:cut]


def _hf_llama(hf_config: dict[str, Any], num_layers: int | None = None):
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = dict(hf_config)
    if num_layers is not None:
        cfg["num_hidden_layers"] = num_layers
    keys = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
            "num_attention_heads", "num_key_value_heads", "head_dim", "rms_norm_eps", "rope_theta",
            "max_position_embeddings", "tie_word_embeddings", "bos_token_id", "eos_token_id")
    config = LlamaConfig(**{k: cfg[k] for k in keys if cfg.get(k) is not None})
    return LlamaForCausalLM(config).float()


def load_target(model: str):
    """The target as a transformers LlamaForCausalLM (fp32, eval), and ember's tokenizer."""
    from ember.models.loader import resolve_model
    source = resolve_model(model)
    if source.config.architecture != "LlamaForCausalLM":
        raise ValueError("train-draft supports Llama-architecture targets")
    target = _hf_llama(source.config.hf_config)
    state = dict(source.weights(torch.float32))
    missing, unexpected = target.load_state_dict(state, strict=False)
    missing = [m for m in missing if m != "lm_head.weight"]  # tied
    if missing or unexpected:
        raise ValueError(f"target weights do not fit: missing {missing[:3]}, unexpected {unexpected[:3]}")
    return target.eval(), source.tokenizer, source.config.hf_config


def init_draft(target, hf_config: dict[str, Any], num_layers: int):
    """A `num_layers` Llama holding copies of the target's embedding, first layers and norm."""
    draft = _hf_llama(hf_config, num_layers)
    state = {k: v for k, v in target.state_dict().items()
             if not k.startswith("model.layers.") or int(k.split(".")[2]) < num_layers}
    draft.load_state_dict(state, strict=False)
    draft.tie_weights()
    return draft


def _chunks(ids: torch.Tensor, seq_len: int) -> torch.Tensor:
    n = ids.numel() // seq_len
    return ids[: n * seq_len].view(n, seq_len)  # [n, seq_len]


@torch.no_grad()
def teacher_topk(target, chunks: torch.Tensor, batch: int, top_k: int,
                 log=print) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k next-token probabilities of the target at every position.
    Returns (ids [n, seq_len, top_k] int32, probs [n, seq_len, top_k] fp16)."""
    ids_out, probs_out = [], []
    start = time.time()
    dev = next(target.parameters()).device
    for i in range(0, len(chunks), batch):
        logits = target(chunks[i:i + batch].to(dev)).logits  # [b, seq_len, vocab]
        top = torch.softmax(logits.float(), dim=-1).topk(top_k, dim=-1)
        ids_out.append(top.indices.int())
        probs_out.append(top.values.half())
        log(f"teacher {min(i + batch, len(chunks))}/{len(chunks)} chunks, {time.time() - start:.0f} s")
    return torch.cat(ids_out), torch.cat(probs_out)


def topk_kl(draft_logits: torch.Tensor,  # [b, seq_len, vocab]
            t_ids: torch.Tensor,         # [b, seq_len, top_k] int
            t_probs: torch.Tensor) -> torch.Tensor:  # [b, seq_len, top_k]
    """KL(target || draft) over the target's top-k tokens (mean per position)."""
    logq = torch.log_softmax(draft_logits.float(), dim=-1).gather(-1, t_ids.long())
    p = t_probs.float()
    return (p * (torch.log(p.clamp(min=1e-8)) - logq)).sum(-1).mean()


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
    target, tokenizer, hf_config = load_target(args.target)
    target.to(device)
    if tokenizer is None:
        raise ValueError("the target has no tokenizer; train-draft needs text")
    train_ids = torch.tensor([t for path in args.text
                              for t in tokenizer.encode(_read_split(path, args.train_fraction, False))])
    held_ids = torch.tensor([t for path in args.text
                             for t in tokenizer.encode(_read_split(path, args.train_fraction, True))])
    chunks = _chunks(train_ids, args.seq_len)
    if args.max_train_tokens:
        chunks = chunks[: max(1, args.max_train_tokens // args.seq_len)]
    held = _chunks(held_ids, args.seq_len)[: args.eval_chunks]
    log(f"{train_ids.numel()} training tokens ({len(chunks)} chunks used), {held_ids.numel()} held out")

    t_ids, t_probs = teacher_topk(target, chunks, args.batch_size, args.top_k, log)
    draft = init_draft(target, hf_config, args.num_layers).to(device)
    base_agree = agreement(target, draft, held, args.batch_size)
    log(f"held-out argmax agreement before training: {base_agree:.3f}")
    draft.model.embed_tokens.weight.requires_grad_(False)  # tied with the LM head
    params = [p for p in draft.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    deadline = t0 + args.time_budget * 60 - args.reserve_s
    steps_per_epoch = math.ceil(len(chunks) / args.batch_size)
    total_steps = args.epochs * steps_per_epoch
    losses: list[float] = []
    step = 0
    draft.train()
    for epoch in range(args.epochs):
        order = torch.randperm(len(chunks))
        for i in range(0, len(chunks), args.batch_size):
            if time.time() > deadline:
                break
            idx = order[i:i + args.batch_size]
            lr = args.lr * 0.5 * (1 + math.cos(math.pi * step / total_steps))
            for g in opt.param_groups:
                g["lr"] = lr
            loss = topk_kl(draft(chunks[idx].to(device)).logits, t_ids[idx], t_probs[idx])
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            losses.append(loss.item())
            step += 1
            if step % 10 == 0:
                log(f"epoch {epoch} step {step}/{total_steps} kl {sum(losses[-10:]) / 10:.4f} "
                    f"lr {lr:.2e} {time.time() - t0:.0f} s")
    draft.eval()
    final_agree = agreement(target, draft, held, args.batch_size)
    log(f"held-out argmax agreement after training: {final_agree:.3f}")
    save(draft.cpu(), tokenizer, args.out)
    report = {"target": args.target, "text": args.text, "num_layers": args.num_layers,
              "train_fraction": args.train_fraction, "train_tokens": int(chunks.numel()),
              "steps": step, "epochs_planned": args.epochs, "final_kl": losses[-1] if losses else None,
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
    p.add_argument("--target", default="smollm2-135m")
    p.add_argument("--text", nargs="+", required=True, help="training text file(s)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--num-layers", type=int, default=2)
    p.add_argument("--train-fraction", type=float, default=0.8,
                   help="train on this leading fraction of each file; the rest is held out")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--top-k", type=int, default=64, help="target probabilities kept per position")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--time-budget", type=float, default=30.0, help="minutes, all included")
    p.add_argument("--reserve-s", type=float, default=120.0,
                   help="seconds kept for the final evaluation and saving")
    p.add_argument("--max-train-tokens", type=int, default=0, help="0 = all")
    p.add_argument("--eval-chunks", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.set_defaults(func=lambda a: print(json.dumps(train(a), indent=1)))
