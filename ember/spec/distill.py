"""What `ember train-draft` and `ember train-mtp` share: the target as a transformers model,
the text split into training and held-out tokens, one teacher pass that stores the
target's top-k next-token probabilities (and, for MTP, its hidden states), the top-k KL,
and the training loop under a wall-clock budget.

Training uses transformers (the reference Llama) with the target frozen; serving loads
the result with ember.
"""
from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable
from typing import Any

import torch

Log = Callable[[str], None]


def read_split(path: str, fraction: float, held_out: bool) -> str:
    """The first `fraction` of a text file (by characters), or the rest when held_out."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    cut = int(len(text) * fraction)
    return text[cut:] if held_out else text[:cut]


def hf_llama(hf_config: dict[str, Any], num_layers: int | None = None):
    """A transformers LlamaForCausalLM (fp32) of the config's shape."""
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
    """The target as a transformers LlamaForCausalLM (fp32, eval), ember's tokenizer, and
    the target's ember ModelConfig."""
    from ember.models.loader import resolve_model
    source = resolve_model(model)
    if source.config.architecture != "LlamaForCausalLM":
        raise ValueError("training supports Llama-architecture targets")
    target = hf_llama(source.config.hf_config)
    state = dict(source.weights(torch.float32))
    missing, unexpected = target.load_state_dict(state, strict=False)
    missing = [m for m in missing if m != "lm_head.weight"]  # tied
    if missing or unexpected:
        raise ValueError(f"target weights do not fit: missing {missing[:3]}, unexpected {unexpected[:3]}")
    for p in target.parameters():
        p.requires_grad_(False)
    return target.eval(), source.tokenizer, source.config


def chunks(ids: torch.Tensor, seq_len: int) -> torch.Tensor:
    n = ids.numel() // seq_len
    return ids[: n * seq_len].view(n, seq_len)  # [n, seq_len]


def text_chunks(tokenizer, args: argparse.Namespace, log: Log) -> tuple[torch.Tensor, torch.Tensor]:
    """(training chunks [n, seq_len], held-out chunks [eval_chunks, seq_len]): the first
    args.train_fraction of each file, and the rest."""
    if tokenizer is None:
        raise ValueError("the target has no tokenizer; training needs text")
    train_ids = torch.tensor([t for path in args.text
                              for t in tokenizer.encode(read_split(path, args.train_fraction, False))])
    held_ids = torch.tensor([t for path in args.text
                             for t in tokenizer.encode(read_split(path, args.train_fraction, True))])
    train = chunks(train_ids, args.seq_len)
    if args.max_train_tokens:
        train = train[: max(1, args.max_train_tokens // args.seq_len)]
    log(f"{train_ids.numel()} training tokens ({len(train)} chunks used), {held_ids.numel()} held out")
    return train, chunks(held_ids, args.seq_len)[: args.eval_chunks]


@torch.no_grad()
def teacher_topk(target, chunks: torch.Tensor, batch: int, top_k: int, log: Log = print,
                 keep_hidden: bool = False) -> tuple[torch.Tensor, ...]:
    """Top-k next-token probabilities of the target at every position.
    Returns (ids [n, seq_len, top_k] int32, probs [n, seq_len, top_k] fp16), and with
    keep_hidden also its final hidden states (after the final norm) [n, seq_len, H] fp16."""
    ids_out, probs_out, hidden_out = [], [], []
    start = time.time()
    dev = next(target.parameters()).device
    for i in range(0, len(chunks), batch):
        out = target.model(chunks[i:i + batch].to(dev))
        logits = target.lm_head(out.last_hidden_state)   # [b, seq_len, vocab]
        top = torch.softmax(logits.float(), dim=-1).topk(top_k, dim=-1)
        ids_out.append(top.indices.int().cpu())
        probs_out.append(top.values.half().cpu())
        if keep_hidden:
            hidden_out.append(out.last_hidden_state.half().cpu())
        log(f"teacher {min(i + batch, len(chunks))}/{len(chunks)} chunks, {time.time() - start:.0f} s")
    result = (torch.cat(ids_out), torch.cat(probs_out))
    return result + (torch.cat(hidden_out),) if keep_hidden else result


def topk_kl(draft_logits: torch.Tensor,  # [b, seq_len, vocab]
            t_ids: torch.Tensor,         # [b, seq_len, top_k] int
            t_probs: torch.Tensor) -> torch.Tensor:  # [b, seq_len, top_k]
    """KL(target || draft) over the target's top-k tokens (mean per position)."""
    logq = torch.log_softmax(draft_logits.float(), dim=-1).gather(-1, t_ids.long())
    p = t_probs.float()
    return (p * (torch.log(p.clamp(min=1e-8)) - logq)).sum(-1).mean()


def train_loop(params: list[torch.nn.Parameter], num_items: int,
               loss_fn: Callable[[torch.Tensor], torch.Tensor],
               args: argparse.Namespace, deadline: float, log: Log = print) -> list[float]:
    """AdamW over args.epochs passes of num_items items in shuffled batches of
    args.batch_size (loss_fn(item indices) -> loss), gradient clipping at 1, stopping after
    args.steps steps (if set) or at `deadline` (time.time()), whichever comes first. The
    learning rate follows a cosine to 0 over the steps that will run: the planned ones,
    or fewer when the measured step time says the deadline comes first (on a shared CPU it
    often does), so a budget-bound run still ends with a decayed rate.
    Returns the loss of every step."""
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    total_steps = args.epochs * math.ceil(num_items / args.batch_size)
    if args.steps:
        total_steps = min(total_steps, args.steps)
    horizon = float(total_steps)
    losses: list[float] = []
    t0 = time.time()
    for epoch in range(args.epochs):
        order = torch.randperm(num_items)
        for i in range(0, num_items, args.batch_size):
            now = time.time()
            if now > deadline or len(losses) >= total_steps:
                return losses
            if len(losses) >= 3:   # steps that fit before the deadline at the pace so far
                fits = len(losses) + (deadline - now) * len(losses) / (now - t0)
                horizon = min(float(total_steps), max(fits, len(losses) + 1.0))
            lr = args.lr * 0.5 * (1 + math.cos(math.pi * len(losses) / horizon))
            for g in opt.param_groups:
                g["lr"] = lr
            loss = loss_fn(order[i:i + args.batch_size])
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            losses.append(loss.item())
            if len(losses) % 10 == 0:
                log(f"epoch {epoch} step {len(losses)}/{horizon:.0f} kl {sum(losses[-10:]) / 10:.4f} "
                    f"lr {lr:.2e} {time.time() - t0:.0f} s")
    return losses


def add_distill_args(p: argparse.ArgumentParser, epochs: int, lr: float) -> None:
    """The flags train-draft and train-mtp share."""
    p.add_argument("--target", default="smollm2-135m")
    p.add_argument("--text", nargs="+", required=True, help="training text file(s)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--train-fraction", type=float, default=0.8,
                   help="train on this leading fraction of each file; the rest is held out")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--top-k", type=int, default=64, help="target probabilities kept per position")
    p.add_argument("--epochs", type=int, default=epochs)
    p.add_argument("--steps", type=int, default=0,
                   help="stop after this many optimizer steps (0: the epochs and the time budget decide)")
    p.add_argument("--lr", type=float, default=lr)
    p.add_argument("--time-budget", type=float, default=30.0, help="minutes, all included")
    p.add_argument("--reserve-s", type=float, default=120.0,
                   help="seconds kept for the final evaluation and saving")
    p.add_argument("--max-train-tokens", type=int, default=0, help="0 = all")
    p.add_argument("--eval-chunks", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
