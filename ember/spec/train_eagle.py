"""`ember train-eagle`: train an EAGLE-3 drafter (or, with --parallel, a P-EAGLE one) on
the target's own hidden states over a text.

1. Features. The target runs once over the training text (the first 80% of each file):
   per position its aux hidden states (the residual stream entering the drafter's low /
   middle / high layers, fp16) and its top-k next-token probabilities (the labels). They
   can be cached in a safetensors file (--features-cache) and reused by the other mode.
   With --self-distill the sequences are not the text but --prompt-len-token prefixes of it
   continued by the target's own greedy tokens (features collected while generating):
   what the verifier accepts is the target's argmax, so the inputs of the unrolled rows
   are then exactly the drafts that get accepted, in generated context like the drafter
   sees when it serves.
2. Draft vocabulary. The `draft_vocab_size` target tokens seen most often in the text and
   in the target's argmax predictions (ties: the lower id, i.e. the earlier BPE merge);
   d2t maps them back. The head starts as the target's (tied) head rows for them.
3. Training, teacher-forced on the text tokens t, with labels the target's distribution:
   for base position b the drafter's first row reads (t_{b+1}, fused_b) and predicts the
   target's distribution at b + 1 (the token after t_{b+1}).
   - EAGLE-3 (training-time test): `--ttt-steps S` unrolls the drafter as it drafts: row s
     of base b reads (t_{b+s}, the drafter's own o of row s - 1) at position b + s - 1 and
     predicts the target at b + s; it attends to the first rows of bases <= b (what the
     drafter's cache holds at inference) and to the rows 2..s of its own base (the drafts
     before it). Loss weights 0.8^(s-1).
   - P-EAGLE (--parallel, `--parallel-positions K`): rows 2..K of base b read the learned
     mask embedding and mask hidden state instead, at positions b + 1 .. b + K - 1, with the
     same attention pattern: the single pass the proposer runs. All rows in one forward.
   The loss is the cross-entropy against the target's top-k probabilities restricted to
   the draft vocabulary (renormalized). The target's embedding stays frozen (shared).
4. Output: a folder in the published EAGLE-3 layout (ember.spec.eagle) + train_log.json.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time
from typing import Any

import torch

from ember.config import ModelConfig
from ember.layers.linear import Linear
from ember.spec.distill import add_distill_args, chunks as split_chunks, load_target, read_split
from ember.spec.eagle import EagleConfig, EagleDrafter, default_aux_layers, save_eagle


# ---- features -------------------------------------------------------------------------------
@torch.no_grad()
def target_features(target, chunks: torch.Tensor, aux_layers: tuple[int, ...], batch: int,
                    top_k: int, log=print) -> dict[str, torch.Tensor]:
    """aux [n, L, n_aux * H] fp16, top-k next-token ids [n, L, k] int32 and probs fp16."""
    aux, ids, probs = [], [], []
    start = time.time()
    dev = next(target.parameters()).device
    for i in range(0, len(chunks), batch):
        out = target(chunks[i:i + batch].to(dev), output_hidden_states=True)
        # [0] = the embedding output, [j] = the stream entering layer j (aux layers are
        # below the last, whose entry transformers gives after the final norm).
        hs = out.hidden_states
        aux.append(torch.cat([hs[j] for j in aux_layers], -1).half().cpu())
        top = torch.softmax(out.logits.float(), -1).topk(top_k, dim=-1)
        ids.append(top.indices.int().cpu())
        probs.append(top.values.half().cpu())
        log(f"features {min(i + batch, len(chunks))}/{len(chunks)} chunks, {time.time() - start:.0f} s")
    return {"aux": torch.cat(aux), "ids": torch.cat(ids), "probs": torch.cat(probs), "tokens": chunks}


@torch.no_grad()
def greedy_features(target, prefixes: torch.Tensor, seq_len: int, aux_layers: tuple[int, ...], batch: int,
                    top_k: int, log=print) -> dict[str, torch.Tensor]:
    """Self-distillation: each prefix [n, P] continued by the target's own greedy tokens to
    seq_len, with the features of target_features over the whole sequence, collected while
    generating (the prefix in one forward, then one cached forward per new token), so no
    second pass over the text is needed. What the verifier accepts is the target's argmax,
    so these sequences are what the drafter sees at inference: generated context, and a
    next token that always equals the label's argmax."""
    n, p = prefixes.shape
    if not 0 < p < seq_len:
        raise ValueError(f"the prefix ({p} tokens) must be shorter than the sequence ({seq_len})")
    aux, ids, probs, tokens = [], [], [], []
    start = time.time()
    dev = next(target.parameters()).device
    for i in range(0, n, batch):
        seq = prefixes[i:i + batch].to(dev)
        out = target(seq, use_cache=True, output_hidden_states=True)
        parts = [(out.hidden_states, out.logits)]
        while True:
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)       # [b, 1]
            if seq.shape[1] == seq_len:
                break
            seq = torch.cat([seq, nxt], 1)
            out = target(nxt, cache=out.cache, use_cache=True, output_hidden_states=True)
            parts.append((out.hidden_states, out.logits))
        aux.append(torch.cat([torch.cat([hs[j] for j in aux_layers], -1) for hs, _ in parts], 1).half().cpu())
        top = torch.softmax(torch.cat([lg for _, lg in parts], 1).float(), -1).topk(top_k, dim=-1)
        ids.append(top.indices.int().cpu())
        probs.append(top.values.half().cpu())
        tokens.append(seq.cpu())
        log(f"greedy continuations {min(i + batch, n)}/{n}, {time.time() - start:.0f} s")
    return {"aux": torch.cat(aux), "ids": torch.cat(ids), "probs": torch.cat(probs), "tokens": torch.cat(tokens)}


def spread_prefixes(ids: torch.Tensor, n: int, length: int) -> torch.Tensor:
    """n windows of `length` tokens [n, length], evenly spaced over the token stream ids [N]."""
    if ids.numel() < length:
        raise ValueError(f"{ids.numel()} training tokens cannot give a {length}-token prefix")
    starts = torch.linspace(0, ids.numel() - length, n).long()
    return torch.stack([ids[s:s + length] for s in starts.tolist()])


def draft_vocabulary(tokens: torch.Tensor, ids: torch.Tensor, vocab: int, size: int) -> torch.Tensor:
    """The `size` target ids seen most (text tokens + the target's argmax), sorted by id."""
    if size >= vocab:
        return torch.arange(vocab)
    counts = torch.bincount(tokens.flatten().long(), minlength=vocab)
    counts += torch.bincount(ids[..., 0].flatten().long(), minlength=vocab)
    # Rank by count, then by id (BPE ids: earlier merges are the more common tokens).
    order = sorted(range(vocab), key=lambda t: (-int(counts[t]), t))[:size]
    return torch.tensor(sorted(order))


# ---- the drafter ----------------------------------------------------------------------------
def new_drafter(target, hf_config: dict[str, Any], draft_ids: torch.Tensor, parallel: bool,
                positions: int, seed: int) -> EagleDrafter:
    """A drafter shaped like one target layer. The head starts as the target's rows for
    the draft vocabulary, fc as the identity on the highest aux layer's stream (measured on
    SmolLM2: twice the held-out agreement after 40 steps of a random fc), the final norm
    at one (the target's norm weights on the untrained stream give logits so peaked that
    the first steps are wasted), the rest small random, so the fused target state
    dominates the residual stream at first."""
    tcfg = ModelConfig.from_dict(hf_config)
    cfg = dict(hf_config)
    cfg.update(num_hidden_layers=1, draft_vocab_size=len(draft_ids), target_hidden_size=tcfg.hidden_size,
               eagle_aux_hidden_state_layer_ids=list(default_aux_layers(tcfg.num_hidden_layers)),
               parallel_drafting=parallel, parallel_positions=positions if parallel else 0,
               architectures=["LlamaForCausalLMEagle3"])
    for k in ("quantization_config", "tie_word_embeddings", "torch_dtype", "dtype"):
        cfg.pop(k, None)
    ecfg = EagleConfig.from_dict(cfg, tcfg)
    torch.manual_seed(seed)
    drafter = EagleDrafter(ecfg)
    with torch.no_grad():
        for name, p in drafter.named_parameters():
            if p.dim() == 1:
                p.fill_(1.0 if "norm" in name else 0.0)
            else:
                p.normal_(0.0, 0.02)
        head = target.lm_head.weight if target.lm_head is not None else target.model.embed_tokens.weight
        drafter.lm_head.weight.copy_(head[draft_ids])
        h = ecfg.hidden_size
        if ecfg.target_hidden_size == h:
            drafter.fc.weight[:, -h:] += torch.eye(h)
        drafter.d2t.copy_(draft_ids - torch.arange(len(draft_ids)))
        if parallel:
            drafter.mask_embed.normal_(0.0, 0.02)
            drafter.mask_hidden.normal_(0.0, 0.02)
    drafter.share_embedding(target.model.embed_tokens)
    for m in drafter.modules():   # ember's Linear holds frozen weights by default
        if isinstance(m, Linear):
            m.weight.requires_grad_(True)
    return drafter


class StepAttention:
    """Dense attention for the unrolled training rows of a [B, L] batch.

    Row s of base b (s = 1 is the first row) sees the first rows of bases <= b (causal)
    and rows 2..s of base b itself: what the drafter's KV cache holds when it drafts.
    Call with row 1's q/k/v first, then rows 2, 3, ... in order."""

    def __init__(self, batch: int, length: int, scale: float) -> None:
        self.b, self.l, self.scale = batch, length, scale
        self.first: tuple[torch.Tensor, torch.Tensor] | None = None   # K, V of row 1 [B, L, h, d]
        self.own: list[tuple[torch.Tensor, torch.Tensor]] = []          # rows 2.. of the same base

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q: [B*L, heads, d]; k, v: [B*L, kv_heads, d] -> [B*L, heads, d]."""
        heads, d = q.shape[1], q.shape[2]
        rep = heads // k.shape[1]
        q = q.view(self.b, self.l, heads, d)
        k = k.view(self.b, self.l, -1, d).repeat_interleave(rep, 2)
        v = v.view(self.b, self.l, -1, d).repeat_interleave(rep, 2)
        if self.first is None:
            self.first = (k, v)
        else:
            self.own.append((k, v))
        k1, v1 = self.first
        causal = torch.einsum("bqhd,bkhd->bhqk", q, k1) * self.scale           # [B, h, L, L]
        causal = causal.masked_fill(~torch.ones(self.l, self.l, dtype=torch.bool, device=q.device).tril(),
                                    float("-inf"))
        diag = [torch.einsum("bqhd,bqhd->bhq", q, km)[..., None] * self.scale for km, _ in self.own]
        w = torch.cat([causal] + diag, dim=-1).softmax(-1)                      # [B, h, L, L + s - 1]
        out = torch.einsum("bhqk,bkhd->bqhd", w[..., :self.l], v1)
        for j, (_, vm) in enumerate(self.own):
            out = out + w[..., self.l + j].permute(0, 2, 1)[..., None] * vm
        return out.reshape(self.b * self.l, heads, d)


def draft_loss(drafter: EagleDrafter, batch: dict[str, torch.Tensor], vocab_map: torch.Tensor,
               steps: int, parallel: bool, decay: float = 0.8) -> tuple[torch.Tensor, list[float]]:
    """The unrolled (or parallel) objective on one batch; returns (loss, accuracy per row s):
    accuracy = the drafter's argmax equals the target's."""
    tokens, aux = batch["tokens"], batch["aux"].float()
    b, l = tokens.shape
    attend = StepAttention(b, l, drafter.midlayer.self_attn.attn.scale)
    base = torch.arange(l, device=tokens.device)
    hidden = drafter.fuse(aux.view(b * l, -1))
    total, accs, weight_sum = 0.0, [], 0.0
    for s in range(1, steps + 1):
        # Row s of base b: position b + s - 1, input token t_{b+s}, label at b + s.
        shift = torch.clamp(base + s, max=l - 1)
        if s > 1 and parallel:
            embeds = drafter.mask_embed.expand(b * l, -1)
            hidden = drafter.mask_hidden.expand(b * l, -1)
        else:
            embeds = drafter.embed(tokens[:, shift].reshape(-1))
        positions = (base + s - 1).repeat(b)
        o = drafter(embeds, hidden, positions, attend)
        valid = (base + s <= l - 1)                                   # [L]
        logits = drafter.compute_logits(o.view(b, l, -1)[:, valid])   # [B, n, draft_vocab]
        lab_ids = vocab_map[batch["ids"][:, shift[valid]].long()]     # [B, n, k] draft ids or -1
        lab_p = batch["probs"][:, shift[valid]].float() * (lab_ids >= 0)
        lab_p = lab_p / lab_p.sum(-1, keepdim=True).clamp(min=1e-6)
        logq = torch.log_softmax(logits, -1).gather(-1, lab_ids.clamp(min=0))
        w = decay ** (s - 1)
        total = total + w * -(lab_p * logq).sum(-1).mean()
        weight_sum += w
        top = batch["ids"][:, shift[valid], 0].long()
        accs.append((drafter.to_target_ids(logits.argmax(-1)) == top).float().mean().item())
        hidden = o
    return total / weight_sum, accs


# ---- the loop -------------------------------------------------------------------------------
def _features(args, target, train_ids: torch.Tensor, aux_layers: tuple[int, ...],
              log) -> dict[str, torch.Tensor]:
    """The training features: over text chunks of train_ids [N], or (--self-distill) over
    text prefixes continued by the target's greedy tokens; from --features-cache when it
    holds the same ones."""
    from safetensors.torch import load_file, save_file
    n_max = max(1, (args.max_train_tokens or train_ids.numel()) // args.seq_len)
    if args.self_distill:
        source = spread_prefixes(train_ids, n_max, args.prompt_len)
        compute = lambda: greedy_features(target, source, args.seq_len, aux_layers, args.generate_batch,
                                          args.top_k, log)
        same = lambda f: (f["tokens"].shape == (len(source), args.seq_len)
                          and torch.equal(f["tokens"][:, :args.prompt_len], source))
    else:
        source = split_chunks(train_ids, args.seq_len)[:n_max]
        compute = lambda: target_features(target, source, aux_layers, args.batch_size, args.top_k, log)
        same = lambda f: torch.equal(f["tokens"], source)
    prompt_len = args.prompt_len if args.self_distill else 0
    path = args.features_cache
    if path and os.path.isfile(path):
        feats = load_file(path)
        if (same(feats) and feats["aux_layers"].tolist() == list(aux_layers)
                and int(feats.get("prompt_len", torch.tensor(0))) == prompt_len):
            log(f"features from {path}")
            return feats
        log(f"{path} holds other features; recomputing")
    feats = compute()
    if path:
        save_file(dict(feats, aux_layers=torch.tensor(aux_layers), prompt_len=torch.tensor(prompt_len)), path)
    return feats


def train(args: argparse.Namespace, log=print) -> dict[str, Any]:
    t0 = time.time()
    torch.manual_seed(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    target, tokenizer, tcfg = load_target(args.target)   # frozen
    target.to(device)
    if tokenizer is None:
        raise ValueError("the target has no tokenizer; train-eagle needs text")
    hf_config = tcfg.hf_config
    aux_layers = default_aux_layers(tcfg.num_hidden_layers)
    enc = lambda held: torch.tensor([t for p in args.text
                                     for t in tokenizer.encode(read_split(p, args.train_fraction, held))])
    # Held-out chunks spread over the held-out text (every file), not its first ones.
    held = split_chunks(enc(True), args.seq_len)
    held = held[torch.linspace(0, len(held) - 1, min(args.eval_chunks, len(held))).long()]
    feats = _features(args, target, enc(False), aux_layers, log)
    chunks = feats["tokens"]
    kind = f"{args.prompt_len}-token text prefixes + the target's greedy tokens" if args.self_distill else "text"
    log(f"{chunks.numel()} training tokens in {len(chunks)} chunks ({kind}); {held.numel()} held-out tokens")
    held_feats = target_features(target, held, aux_layers, args.batch_size, args.top_k, lambda *_: None)
    draft_ids = draft_vocabulary(chunks, feats["ids"], tcfg.vocab_size, args.draft_vocab_size)
    vocab_map = torch.full((tcfg.vocab_size,), -1, dtype=torch.long)
    vocab_map[draft_ids] = torch.arange(len(draft_ids))
    vocab_map = vocab_map.to(device)
    cover = (vocab_map[held_feats["ids"][..., 0].long().to(device)] >= 0).float().mean().item()
    log(f"draft vocabulary {len(draft_ids)}: covers {cover:.1%} of the target's held-out argmax tokens")

    steps = args.parallel_positions if args.parallel else args.ttt_steps
    drafter = new_drafter(target, hf_config, draft_ids.to(device), args.parallel, args.parallel_positions,
                          args.seed).to(device)
    params = [p for p in drafter.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0, betas=(0.9, 0.95))

    def evaluate() -> list[float]:
        drafter.eval()
        with torch.no_grad():
            accs = [draft_loss(drafter, _batch(held_feats, torch.arange(i, min(i + args.batch_size, len(held))), device),
                               vocab_map, steps, args.parallel)[1] for i in range(0, len(held), args.batch_size)]
        drafter.train()
        return [sum(a[s] for a in accs) / len(accs) for s in range(steps)]

    before = evaluate()
    log(f"held-out agreement per draft position before training: {_fmt(before)}")
    deadline = t0 + args.time_budget * 60 - args.reserve_s
    total_steps = args.steps or 10 ** 9
    losses: list[float] = []
    step, epoch = 0, 0
    start_train = time.time()
    while step < total_steps and epoch < args.epochs and time.time() < deadline:
        order = torch.randperm(len(chunks))
        for i in range(0, len(chunks) - args.batch_size + 1, args.batch_size):
            if step >= total_steps or time.time() > deadline:
                break
            # Cosine decay over the planned steps, or over the time left when only a
            # time budget bounds the run.
            frac = step / total_steps if args.steps else (time.time() - start_train) / max(deadline - start_train, 1)
            lr = args.lr * (min(1.0, (step + 1) / args.warmup) * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0))))
            for g in opt.param_groups:
                g["lr"] = lr
            loss, accs = draft_loss(drafter, _batch(feats, order[i:i + args.batch_size], device), vocab_map,
                                    steps, args.parallel)
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            losses.append(loss.item())
            step += 1
            if step % 10 == 0:
                log(f"epoch {epoch} step {step} loss {sum(losses[-10:]) / 10:.3f} train agreement "
                    f"{_fmt(accs)} lr {lr:.1e} {time.time() - t0:.0f} s")
        epoch += 1
    after = evaluate()
    log(f"held-out agreement per draft position after training: {_fmt(after)}")
    drafter.eval()
    save_eagle(drafter, args.out)
    report = {"target": args.target, "text": args.text, "mode": "peagle" if args.parallel else "eagle3",
              "rows_trained": steps, "train_fraction": args.train_fraction,
              "train_tokens": int(chunks.numel()), "self_distill": args.self_distill,
              "prompt_len": args.prompt_len if args.self_distill else 0, "steps": step, "epochs": epoch,
              "draft_vocab_size": len(draft_ids), "draft_vocab_heldout_coverage": cover,
              "final_loss": sum(losses[-10:]) / max(len(losses[-10:]), 1),
              "heldout_agreement_before": before, "heldout_agreement_after": after,
              "seconds": time.time() - t0, "threads": torch.get_num_threads()}
    with open(os.path.join(args.out, "train_log.json"), "w") as f:
        json.dump({**report, "loss_curve": losses}, f, indent=1)
    return report


def _batch(feats: dict[str, torch.Tensor], idx: torch.Tensor,
           device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    return {k: feats[k][idx].to(device) for k in ("tokens", "aux", "ids", "probs")}


def _fmt(xs: list[float]) -> str:
    return " / ".join(f"{x:.3f}" for x in xs)


def add_train_eagle_parser(sub) -> None:
    p = sub.add_parser("train-eagle", help="train an EAGLE-3 (or --parallel: P-EAGLE) drafter")
    add_distill_args(p, epochs=1000, lr=2e-3)   # the time budget (or --steps) ends training
    p.set_defaults(batch_size=4, top_k=32, reserve_s=60.0)
    p.add_argument("--parallel", action="store_true", help="P-EAGLE: train mask positions for one-pass drafting")
    p.add_argument("--parallel-positions", type=int, default=4, help="draft positions per pass (P-EAGLE)")
    p.add_argument("--ttt-steps", type=int, default=3, help="unrolled draft steps in training (EAGLE-3)")
    p.add_argument("--draft-vocab-size", type=int, default=8192)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--features-cache", default=None,
                   help="safetensors file for the target's features (reused when it matches)")
    p.add_argument("--self-distill", action="store_true",
                   help="train on text prefixes continued by the target's own greedy tokens (what the "
                        "verifier accepts) instead of on the text; --max-train-tokens / --seq-len of them")
    p.add_argument("--prompt-len", type=int, default=64, help="text prefix per sequence (--self-distill)")
    p.add_argument("--generate-batch", type=int, default=32,
                   help="sequences generated together (--self-distill)")
    p.add_argument("--threads", type=int, default=0,
                   help="torch threads (0: torch's default; 1 is faster on a CPU shared with other jobs)")
    p.set_defaults(func=lambda a: print(json.dumps(train(a), indent=1)))
