"""`ember train-eagle`: train an EAGLE-3 drafter (or, with --parallel, a P-EAGLE one) on
the target's own hidden states over a text.

1. Features. The target runs over the training sequences (by default chunks of the first
   80% of each text file): per position its aux hidden states (the residual stream
   entering the drafter's low / middle / high layers, fp16) and its top-k next-token
   probabilities (the labels). They can be cached in a safetensors file (--features-cache)
   and reused by the other mode (or by a run started with --features-only).
   With --self-distill the sequences are not the text but --prompt-len-token prefixes of it
   continued by the target's own tokens (greedy, or a fraction sampled at
   --distill-temperature): what the verifier accepts is the target's argmax, so the inputs
   of the unrolled rows are then the drafts that get accepted, in generated context like
   the drafter sees when it serves. Two generators: `hf` (the transformers target with its
   KV cache, features collected while generating: no second pass, the CPU's choice) and
   `engine` (ember's own engine, continuous batching and CUDA graphs, then one
   teacher-forced pass for the features: the GPU's choice).
2. Draft vocabulary. The `draft_vocab_size` target tokens seen most often in the training
   sequences and in the target's argmax predictions (ties: the lower id, i.e. the earlier
   BPE merge); d2t maps them back. The head starts as the target's (tied) head rows.
3. Training, teacher-forced on the sequence tokens t, with labels the target's
   distribution: for base position b the drafter's first row reads (t_{b+1}, fused_b) and
   predicts the target's distribution at b + 1 (the token after t_{b+1}).
   - EAGLE-3 (training-time test): `--ttt-steps S` unrolls the drafter as it drafts: row s
     of base b reads (t_{b+s}, the drafter's own o of row s - 1) at position b + s - 1 and
     predicts the target at b + s; it attends to the first rows of bases <= b (what the
     drafter's cache holds at inference) and to the rows 2..s of its own base (the drafts
     before it).
   - P-EAGLE (--parallel, `--parallel-positions K`): rows 2..K of base b read the learned
     mask embedding and mask hidden state instead, at positions b + 1 .. b + K - 1, with the
     same attention pattern: the single pass the proposer runs. All rows in one forward.
   Row s's loss weight is --loss-decay^(s-1) (0.8).
   `--draft-layers N` trains a deeper drafter (P-EAGLE's published ones have 4), and
   `--init-from DIR` starts from another drafter's tensors (a trained EAGLE-3 drafter's
   fc, first layer and head for a P-EAGLE one), keeping its draft vocabulary.
   The loss is the cross-entropy against the target's top-k probabilities restricted to
   the draft vocabulary (renormalized). The target's embedding stays frozen (shared).
   On CUDA the target runs in bf16, the drafter keeps fp32 master weights under bf16
   autocast, the features stay on the GPU, and the loop reads nothing back from the GPU
   except every --log-every steps.
4. Output: a folder in the published EAGLE-3 layout (ember.spec.eagle) + train_log.json.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import inspect
import json
import math
import os
import time
from typing import Any, Callable

import torch

from ember.config import ModelConfig
from ember.layers.linear import Linear
from ember.spec.distill import add_distill_args, chunks as split_chunks, load_target, read_split
from ember.spec.eagle import EagleConfig, EagleDrafter, default_aux_layers, load_eagle, save_eagle

FEATURE_KEYS = ("tokens", "aux", "ids", "probs")


# ---- devices --------------------------------------------------------------------------------
def autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA (fp32 master weights stay fp32); nothing on the CPU, whose
    bf16 matmuls are no faster and whose published figures are fp32."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def sync(device: torch.device) -> None:
    """Wait for the GPU, so wall-clock readings cover the work queued before them."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _model_device(model) -> torch.device:
    return next(model.parameters()).device


# ---- features -------------------------------------------------------------------------------
@torch.no_grad()
def target_features(target, chunks: torch.Tensor, aux_layers: tuple[int, ...], batch: int,
                    top_k: int, log=print, store: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """One teacher-forced pass over chunks [n, L]: aux [n, L, n_aux * H] fp16, top-k
    next-token ids [n, L, k] int32 and probs fp16, tokens; all kept on `store` (the GPU
    when training there: no copy back, no sync per batch). On CUDA under bf16 autocast."""
    aux, ids, probs = [], [], []
    start = time.time()
    dev = _model_device(target)
    for i in range(0, len(chunks), batch):
        with autocast(dev):
            out = target(chunks[i:i + batch].to(dev), output_hidden_states=True, use_cache=False)
        a, top_i, top_p = _position_features(out.hidden_states, out.logits, aux_layers, top_k)
        aux.append(a.to(store))
        ids.append(top_i.to(store))
        probs.append(top_p.to(store))
        if (i // batch) % 20 == 0 or i + batch >= len(chunks):
            log(f"features {min(i + batch, len(chunks))}/{len(chunks)} chunks, {time.time() - start:.0f} s")
    return {"aux": torch.cat(aux), "ids": torch.cat(ids), "probs": torch.cat(probs), "tokens": chunks.to(store)}


def _position_features(hidden_states, logits: torch.Tensor, aux_layers: tuple[int, ...],
                       top_k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """transformers' hidden_states ([0] = the embedding output, [j] = the stream entering
    layer j; the aux layers are below the last, whose entry comes after the final norm) and
    logits [b, l, V] -> (aux [b, l, n_aux * H] fp16, top-k ids int32, top-k probs fp16)."""
    aux = torch.cat([hidden_states[j] for j in aux_layers], -1).half()
    top = torch.softmax(logits.float(), -1).topk(top_k, dim=-1)
    return aux, top.indices.int(), top.values.half()


def sampled_rows(n: int, fraction: float) -> torch.Tensor:
    """Which of n sequences are sampled rather than greedy [n] bool: a `fraction` of them,
    spread evenly (row i iff floor((i + 1) f) > floor(i f))."""
    f = min(max(fraction, 0.0), 1.0)
    i = torch.arange(n, dtype=torch.float64)
    return torch.floor((i + 1) * f) > torch.floor(i * f)


def _cache_key(model) -> str:
    """The keyword (and output field) of transformers' KV cache: `cache` in recent releases,
    `past_key_values` before. Passing the wrong one is not an error (forward takes
    **kwargs): the cache would silently be dropped and every step see one token."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _next_tokens(logits: torch.Tensor, sampled: torch.Tensor, temperature: float,
                 gen: torch.Generator | None) -> torch.Tensor:
    """logits [b, V] -> next tokens [b, 1]: argmax, or for the `sampled` rows a draw at
    `temperature`."""
    nxt = logits.argmax(-1, keepdim=True)
    if temperature > 0 and bool(sampled.any()):
        draw = torch.multinomial(torch.softmax(logits.float() / temperature, -1), 1, generator=gen)
        nxt = torch.where(sampled[:, None], draw, nxt)
    return nxt


@torch.no_grad()
def greedy_features(target, prefixes: torch.Tensor, seq_len: int, aux_layers: tuple[int, ...], batch: int,
                    top_k: int, log=print, temperature: float = 0.0, sampled_fraction: float = 1.0,
                    seed: int = 0, store: torch.device | str = "cpu",
                    budget_s: float = 0.0) -> dict[str, torch.Tensor]:
    """Self-distillation with the transformers target: each prefix [n, P] continued by the
    target's own tokens to seq_len (greedy; with temperature > 0 a `sampled_fraction` of
    the rows sampled), with the features of target_features over the whole sequence,
    collected while generating (the prefix in one forward, then one cached forward per new
    token; only the aux streams and the top-k are kept per step), so no second pass over
    the text is needed. Greedy rows are what the verifier accepts: generated context, and
    a next token that always equals the label's argmax. With budget_s > 0, only the
    batches started within budget_s seconds (the leading rows)."""
    n, p = prefixes.shape
    if not 0 < p < seq_len:
        raise ValueError(f"the prefix ({p} tokens) must be shorter than the sequence ({seq_len})")
    aux, ids, probs, tokens = [], [], [], []
    start = time.time()
    dev = _model_device(target)
    key = _cache_key(target)
    gen = torch.Generator(device=dev).manual_seed(seed) if temperature > 0 else None
    rows = sampled_rows(n, sampled_fraction if temperature > 0 else 0.0)
    for i in range(0, n, batch):
        if budget_s > 0 and i > 0 and time.time() - start > budget_s:
            break
        seq = prefixes[i:i + batch].to(dev)
        sampled = rows[i:i + batch].to(dev)
        with autocast(dev):
            out = target(seq, use_cache=True, output_hidden_states=True)
        parts = [_position_features(out.hidden_states, out.logits, aux_layers, top_k)]
        while seq.shape[1] < seq_len:
            nxt = _next_tokens(out.logits[:, -1], sampled, temperature, gen)   # [b, 1]
            seq = torch.cat([seq, nxt], 1)
            with autocast(dev):
                out = target(nxt, use_cache=True, output_hidden_states=True, **{key: getattr(out, key)})
            parts.append(_position_features(out.hidden_states, out.logits, aux_layers, top_k))
        aux.append(torch.cat([a for a, _, _ in parts], 1).to(store))
        ids.append(torch.cat([x for _, x, _ in parts], 1).to(store))
        probs.append(torch.cat([x for _, _, x in parts], 1).to(store))
        tokens.append(seq.to(store))
        log(f"continuations (transformers) {min(i + batch, n)}/{n}, {time.time() - start:.0f} s")
    return {"aux": torch.cat(aux), "ids": torch.cat(ids), "probs": torch.cat(probs), "tokens": torch.cat(tokens)}


def engine_continuations(model: str, prefixes: torch.Tensor, seq_len: int, device: torch.device,
                         temperature: float = 0.0, sampled_fraction: float = 1.0, seed: int = 0,
                         max_num_seqs: int = 512, gpu_memory_utilization: float = 0.3,
                         budget_s: float = 0.0, log=print) -> torch.Tensor:
    """Self-distillation with ember's engine (continuous batching, CUDA graphs on the GPU):
    each prefix [n, P] continued to seq_len by the target, greedy or (a `sampled_fraction`
    of the rows, when temperature > 0) sampled. Returns tokens [n', seq_len] on the CPU:
    all rows, or with budget_s > 0 the leading rows whose rounds (4 x max_num_seqs
    prompts each) started within budget_s seconds (the first round always runs). The
    features come from one teacher-forced pass afterwards. The engine is released before returning, so its KV
    pool does not sit beside the training."""
    from ember import LLM, SamplingParams
    n, p = prefixes.shape
    if not 0 < p < seq_len:
        raise ValueError(f"the prefix ({p} tokens) must be shorter than the sequence ({seq_len})")
    start = time.time()
    llm = LLM(model, device=device.type, max_model_len=seq_len + 16, max_num_seqs=max_num_seqs,
              gpu_memory_utilization=gpu_memory_utilization, seed=seed)
    rows = sampled_rows(n, sampled_fraction if temperature > 0 else 0.0).tolist()
    # No seed per request: the sampler would draw each seeded row's noise with its own
    # kernel every step. The shared generator, seeded here, is as reproducible for the
    # same prompts and settings (the engine schedules deterministically).
    torch.manual_seed(seed)
    params = [SamplingParams(temperature=temperature if s else 0.0, max_tokens=seq_len - p, ignore_eos=True)
              for s in rows]
    log(f"engine ready in {time.time() - start:.0f} s; generating up to {n} x {seq_len - p} tokens")
    prompts = prefixes.tolist()
    new: list[list[int]] = []
    round_size = 4 * max_num_seqs   # enough to keep the batch full, small enough to stop on time
    gen_start = time.time()
    while len(new) < n and not (new and budget_s > 0 and time.time() - start > budget_s):
        i = len(new)
        outs = llm.generate([{"prompt_token_ids": row} for row in prompts[i:i + round_size]],
                            params[i:i + round_size], use_tqdm=False)
        new += [o.outputs[0].token_ids for o in outs]
        rate = len(new) * (seq_len - p) / max(time.time() - gen_start, 1e-6)
        log(f"engine continuations {len(new)}/{n}, {time.time() - start:.0f} s ({rate:.0f} new tokens/s)")
    bad = [i for i, t in enumerate(new) if len(t) != seq_len - p]
    if bad:
        raise RuntimeError(f"{len(bad)} continuations have the wrong length (e.g. row {bad[0]}: {len(new[bad[0]])})")
    del llm
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    log(f"engine continuations {len(new)} x {seq_len - p} tokens ({sum(rows[:len(new)])} sampled at "
        f"T={temperature}) in {time.time() - start:.0f} s")
    return torch.cat([prefixes[:len(new)], torch.tensor(new, dtype=prefixes.dtype)], 1)


def spread_prefixes(ids: torch.Tensor, n: int, length: int) -> torch.Tensor:
    """n windows of `length` tokens [n, length], evenly spaced over the token stream ids [N]."""
    if ids.numel() < length:
        raise ValueError(f"{ids.numel()} training tokens cannot give a {length}-token prefix")
    starts = torch.linspace(0, ids.numel() - length, n).long()
    return ids[starts[:, None] + torch.arange(length)]


def draft_vocabulary(tokens: torch.Tensor, ids: torch.Tensor, vocab: int, size: int) -> torch.Tensor:
    """The `size` target ids seen most (sequence tokens + the target's argmax), sorted by id."""
    if size >= vocab:
        return torch.arange(vocab)
    counts = torch.bincount(tokens.flatten().long(), minlength=vocab).cpu()
    counts += torch.bincount(ids[..., 0].flatten().long(), minlength=vocab).cpu()
    # Rank by count, then by id (BPE ids: earlier merges are the more common tokens); a
    # stable sort keeps equal counts in id order.
    order = torch.sort(-counts, stable=True).indices[:size]
    return order.sort().values


# ---- the drafter ----------------------------------------------------------------------------
def new_drafter(target, hf_config: dict[str, Any], draft_ids: torch.Tensor, parallel: bool,
                positions: int, seed: int, layers: int = 1) -> EagleDrafter:
    """A drafter of `layers` layers shaped like the target's. The head starts as the
    target's rows for the draft vocabulary, fc as the identity on the highest aux layer's
    stream (measured on SmolLM2: twice the held-out agreement after 40 steps of a random
    fc), the final norm at one (the target's norm weights on the untrained stream give
    logits so peaked that the first steps are wasted), the layers after the first as the
    identity (their output projections zero), the rest small random, so the fused target
    state dominates the residual stream at first. Built on the CPU in fp32 (draft_ids may
    live anywhere); move it to the training device afterwards."""
    draft_ids = draft_ids.cpu()
    tcfg = ModelConfig.from_dict(hf_config)
    cfg = dict(hf_config)
    cfg.update(num_hidden_layers=layers, draft_vocab_size=len(draft_ids), target_hidden_size=tcfg.hidden_size,
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
        for layer in drafter.more_layers:   # start as the identity on the stream
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        if target.lm_head is not None and not hasattr(target.lm_head, "weight"):
            raise ValueError("EAGLE training starts its head from the target's full-precision "
                             "LM head; this target's head is quantized (--quantize-lm-head)")
        head = target.lm_head.weight if target.lm_head is not None else target.model.embed_tokens.weight
        drafter.lm_head.weight.copy_(head[draft_ids.to(head.device)])
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


def step_attentions(drafter: EagleDrafter, batch: int, length: int) -> list[StepAttention]:
    """One StepAttention per drafter layer (each layer keeps its own rows' K/V)."""
    return [StepAttention(batch, length, a.scale) for a in drafter.attention_layers()]


def draft_loss(drafter: EagleDrafter, batch: dict[str, torch.Tensor], vocab_map: torch.Tensor,
               steps: int, parallel: bool, decay: float = 0.8) -> tuple[torch.Tensor, torch.Tensor]:
    """The unrolled (or parallel) objective on one batch; returns (loss, accuracy per row s
    [steps], detached): accuracy = the drafter's argmax equals the target's. Nothing here
    reads a value back to the host (slices, not boolean masks), so on the GPU a training
    step queues without waiting."""
    tokens, aux = batch["tokens"], batch["aux"]
    b, l = tokens.shape
    attend = step_attentions(drafter, b, l)
    base = torch.arange(l, device=tokens.device)
    hidden = drafter.fuse(aux.reshape(b * l, -1).to(drafter.fc.weight.dtype))
    total, accs, weight_sum = 0.0, [], 0.0
    for s in range(1, steps + 1):
        # Row s of base b: position b + s - 1, input token t_{b+s}, label at b + s; the
        # bases b < l - s have a label inside the sequence.
        shift = torch.clamp(base + s, max=l - 1)
        if s > 1 and parallel:
            embeds = drafter.mask_embed.expand(b * l, -1)
            hidden = drafter.mask_hidden.expand(b * l, -1)
        else:
            embeds = drafter.embed(tokens[:, shift].reshape(-1))
        positions = (base + s - 1).repeat(b)
        o = drafter(embeds, hidden, positions, attend)
        n = l - s
        logits = drafter.compute_logits(o.view(b, l, -1)[:, :n].reshape(b * n, -1)).view(b, n, -1)
        lab_ids = vocab_map[batch["ids"][:, s:].long()]                  # [B, n, k] draft ids or -1
        lab_p = batch["probs"][:, s:].float() * (lab_ids >= 0)
        lab_p = lab_p / lab_p.sum(-1, keepdim=True).clamp(min=1e-6)
        logq = torch.log_softmax(logits, -1).gather(-1, lab_ids.clamp(min=0))
        w = decay ** (s - 1)
        total = total + w * -(lab_p * logq).sum(-1).mean()
        weight_sum += w
        top = batch["ids"][:, s:, 0].long()
        accs.append((drafter.to_target_ids(logits.detach().argmax(-1)) == top).float().mean())
        hidden = o
    return total / weight_sum, torch.stack(accs)


# ---- the loop -------------------------------------------------------------------------------
def _feature_source(args, train_ids: torch.Tensor) -> torch.Tensor:
    """What the features are computed over: text chunks [n, seq_len] of train_ids [N], or
    (--self-distill) the text prefixes [n, prompt_len] to continue: spread evenly over the
    text, then in a fixed shuffled order, so that the leading rows a generation budget
    leaves still cover all of it."""
    n_max = max(1, (args.max_train_tokens or train_ids.numel()) // args.seq_len)
    if args.self_distill:
        order = torch.randperm(n_max, generator=torch.Generator().manual_seed(12345))
        return spread_prefixes(train_ids, n_max, args.prompt_len)[order]
    return split_chunks(train_ids, args.seq_len)[:n_max]


def _cache_meta(args, aux_layers: tuple[int, ...]) -> dict[str, torch.Tensor]:
    """What besides the source tokens decides the features (checked when a cache is reused)."""
    sd = args.self_distill
    sampling = sd and args.distill_temperature > 0   # the fraction means nothing when greedy
    return {"aux_layers": torch.tensor(aux_layers),
            "prompt_len": torch.tensor(args.prompt_len if sd else 0),
            "temperature": torch.tensor(float(args.distill_temperature) if sampling else 0.0),
            "sampled_fraction": torch.tensor(float(args.distill_sampled_fraction) if sampling else 0.0),
            "top_k": torch.tensor(args.top_k)}


def _cache_fits(f: dict[str, torch.Tensor], source: torch.Tensor, args,
                meta: dict[str, torch.Tensor]) -> bool:
    """Whether cached features `f` were computed from `source` with these settings (for
    self-distillation: from its leading rows, all that a generation budget allowed)."""
    toks = f["tokens"]
    if args.self_distill:
        m = len(toks)
        same = (toks.shape[1] == args.seq_len and 0 < m <= len(source)
                and torch.equal(toks[:, :args.prompt_len], source[:m]))
    else:
        same = torch.equal(toks, source)
    defaults = {"prompt_len": 0, "temperature": 0.0, "sampled_fraction": 0.0, "top_k": f["ids"].shape[-1]}
    for k, v in meta.items():
        got = f.get(k, torch.tensor(defaults.get(k, -1)))
        if got.shape != v.shape or not torch.allclose(got.double(), v.double()):
            return False
    return same


def _compute_features(args, target, source: torch.Tensor, aux_layers: tuple[int, ...],
                      device: torch.device, log) -> dict[str, torch.Tensor]:
    """Features over text chunks, or over the self-distilled continuations of the prefixes
    (the generator --generator picks; `auto`: the engine on CUDA, transformers on the CPU;
    if the engine fails, transformers takes over rather than losing the run)."""
    if not args.self_distill:
        return target_features(target, source, aux_layers, args.feature_batch, args.top_k, log, store=device)
    gen = args.generator if args.generator != "auto" else ("engine" if device.type == "cuda" else "hf")
    if gen == "engine":
        try:
            tokens = engine_continuations(args.target, source, args.seq_len, device, args.distill_temperature,
                                          args.distill_sampled_fraction, args.seed, args.generate_batch,
                                          args.engine_memory, args.generate_budget, log)
            return target_features(target, tokens, aux_layers, args.feature_batch, args.top_k, log, store=device)
        except Exception as e:   # noqa: BLE001 - any engine failure: fall back, say so
            log(f"engine generation failed ({type(e).__name__}: {e}); generating with transformers")
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return greedy_features(target, source, args.seq_len, aux_layers, args.generate_batch, args.top_k, log,
                           args.distill_temperature, args.distill_sampled_fraction, args.seed, store=device,
                           budget_s=args.generate_budget)


def _features(args, target, train_ids: torch.Tensor, aux_layers: tuple[int, ...], device: torch.device,
              log) -> dict[str, torch.Tensor]:
    """The training features (on `device`), from --features-cache when it holds the same
    ones, else computed (and then written there)."""
    from safetensors.torch import load_file, save_file
    source = _feature_source(args, train_ids)
    meta = _cache_meta(args, aux_layers)
    path = args.features_cache
    if path and os.path.isfile(path):
        start = time.time()
        feats = load_file(path)
        if _cache_fits(feats, source, args, meta):
            log(f"features from {path} ({time.time() - start:.0f} s)")
            return {k: feats[k].to(device) for k in FEATURE_KEYS}
        log(f"{path} holds other features; recomputing")
    feats = _compute_features(args, target, source, aux_layers, device, log)
    if path:
        start = time.time()
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"   # a reader never sees a half-written cache, nor two writers one file
        save_file({**{k: feats[k].contiguous().cpu() for k in FEATURE_KEYS}, **meta}, tmp)
        os.replace(tmp, path)
        log(f"features cached in {path} ({os.path.getsize(path) / 2 ** 30:.2f} GiB, {time.time() - start:.0f} s)")
    return feats


def warm_start(drafter: EagleDrafter, init: EagleDrafter, log) -> None:
    """Copy into `drafter` every tensor of `init` with the same name and shape (e.g. an
    EAGLE-3 drafter's fc, layer, norm and head into a P-EAGLE one, whose mask state and
    further layers keep their fresh start). Build `drafter` with `init`'s draft vocabulary."""
    mine = drafter.state_dict()
    copied = []
    with torch.no_grad():
        for name, t in init.state_dict().items():
            if name in mine and mine[name].shape == t.shape:
                mine[name].copy_(t)
                copied.append(name)
    fresh = [n for n in mine if n not in copied]
    log(f"warm start: {len(copied)} tensors copied; fresh: {', '.join(fresh) or 'none'}")


def _lr(args, step: int, frac: float) -> float:
    """Linear warmup over --warmup steps, then a cosine to 0 at frac = 1 (the planned steps,
    or the deadline when only a time budget bounds the run)."""
    return args.lr * min(1.0, (step + 1) / args.warmup) * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0)))


def heldout_features(args, target, held_ids: torch.Tensor, aux_layers: tuple[int, ...],
                     device: torch.device) -> dict[str, torch.Tensor]:
    """The held-out set (held_ids [N]: the held-out text of every file), --eval-chunks
    sequences spread over it (not its first ones). `--heldout text`: chunks of the text.
    `--heldout greedy`: --prompt-len-token prefixes of it continued greedily by the target
    to --seq-len, what a greedy acceptance run drafts against: a draft position s > 1 is
    judged after the target's own argmax tokens, not after the text's."""
    if args.heldout == "greedy":
        prefixes = spread_prefixes(held_ids, args.eval_chunks, args.prompt_len)
        return greedy_features(target, prefixes, args.seq_len, aux_layers, args.feature_batch, args.top_k,
                               lambda *_: None, store=device)
    held = split_chunks(held_ids, args.seq_len)
    held = held[torch.linspace(0, len(held) - 1, min(args.eval_chunks, len(held))).long()]
    return target_features(target, held, aux_layers, args.feature_batch, args.top_k, lambda *_: None,
                           store=device)


def _evaluate(drafter: EagleDrafter, held: dict[str, torch.Tensor], vocab_map: torch.Tensor, steps: int,
              args, device: torch.device) -> list[float]:
    """Held-out teacher-forced agreement with the target's argmax per draft position."""
    drafter.eval()
    n = len(held["tokens"])
    accs = []
    with torch.no_grad(), autocast(device):
        for i in range(0, n, args.batch_size):
            idx = torch.arange(i, min(i + args.batch_size, n), device=held["tokens"].device)
            accs.append(draft_loss(drafter, _batch(held, idx, device), vocab_map, steps, args.parallel)[1])
    drafter.train()
    return torch.stack(accs).mean(0).tolist()


def train(args: argparse.Namespace, log=print) -> dict[str, Any]:
    t0 = time.time()
    torch.manual_seed(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True   # the fp32 parts outside autocast
    # Frozen, fp32 (its forwards run under bf16 autocast on CUDA: casting the model instead
    # would also round transformers' RoPE inv_freq buffer to bf16).
    target, tokenizer, tcfg = load_target(args.target)
    target.to(device)
    if tokenizer is None:
        raise ValueError("the target has no tokenizer; train-eagle needs text")
    hf_config = tcfg.hf_config
    aux_layers = default_aux_layers(tcfg.num_hidden_layers)
    enc = lambda held: torch.tensor([t for p in args.text
                                     for t in tokenizer.encode(read_split(p, args.train_fraction, held))])
    feats = _features(args, target, enc(False), aux_layers, device, log)
    chunks = feats["tokens"]
    kind = (f"{args.prompt_len}-token text prefixes + the target's own tokens "
            f"(T={args.distill_temperature}, sampled fraction {args.distill_sampled_fraction})"
            if args.self_distill else "text")
    log(f"{chunks.numel()} training tokens in {len(chunks)} sequences ({kind}), {time.time() - t0:.0f} s")
    if args.features_only:
        return {"features_only": True, "train_tokens": int(chunks.numel()), "sequences": len(chunks),
                "features_cache": args.features_cache, "seconds": time.time() - t0}
    held_feats = heldout_features(args, target, enc(True), aux_layers, device)
    held = held_feats["tokens"]
    init = load_eagle(args.init_from, tcfg) if args.init_from else None
    draft_ids = (init.to_target_ids(torch.arange(init.config.draft_vocab_size)) if init is not None
                 else draft_vocabulary(chunks, feats["ids"], tcfg.vocab_size, args.draft_vocab_size))
    vocab_map = torch.full((tcfg.vocab_size,), -1, dtype=torch.long)
    vocab_map[draft_ids] = torch.arange(len(draft_ids))
    vocab_map = vocab_map.to(device)
    cover = (vocab_map[held_feats["ids"][..., 0].long()] >= 0).float().mean().item()
    log(f"draft vocabulary {len(draft_ids)}: covers {cover:.1%} of the target's held-out argmax tokens; "
        f"{held.numel()} held-out tokens")

    steps = args.parallel_positions if args.parallel else args.ttt_steps
    drafter = new_drafter(target, hf_config, draft_ids, args.parallel, args.parallel_positions,
                          args.seed, args.draft_layers)
    if init is not None:
        warm_start(drafter, init, log)
    drafter.to(device)
    params = [p for p in drafter.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0, betas=(0.9, 0.95),
                            fused=device.type == "cuda")
    before = _evaluate(drafter, held_feats, vocab_map, steps, args, device)
    log(f"held-out agreement per draft position before training: {_fmt(before)}")
    best = _BestWeights(drafter, before)

    def checkpoint(step: int) -> None:
        accs = _evaluate(drafter, held_feats, vocab_map, steps, args, device)
        log(f"step {step}: held-out agreement {_fmt(accs)}" + (" (best so far)" if best.offer(accs, step) else ""))

    losses, step, epoch, elapsed = _train_steps(drafter, opt, params, feats, vocab_map, steps, args, device,
                                                deadline=t0 + args.time_budget * 60 - args.reserve_s, log=log,
                                                checkpoint=checkpoint if args.eval_every else None)
    after = _evaluate(drafter, held_feats, vocab_map, steps, args, device)
    log(f"held-out agreement per draft position after training: {_fmt(after)}")
    best_step = step
    if args.eval_every and not best.offer(after, step) and best.step > 0:
        after, best_step = best.restore(), best.step
        log(f"kept the weights of step {best_step} (held-out agreement {_fmt(after)})")
    drafter.eval()
    if args.save_dtype == "bfloat16":   # half the size (trained in fp32 all the same)
        drafter.to(torch.bfloat16)
    save_eagle(drafter, args.out)
    report = {"target": args.target, "text": args.text, "mode": "peagle" if args.parallel else "eagle3",
              "rows_trained": steps, "layers": args.draft_layers, "init_from": args.init_from,
              "train_fraction": args.train_fraction,
              "train_tokens": int(chunks.numel()), "self_distill": args.self_distill,
              "prompt_len": args.prompt_len if args.self_distill else 0,
              "distill_temperature": args.distill_temperature if args.self_distill else 0.0,
              "distill_sampled_fraction": args.distill_sampled_fraction if args.self_distill else 0.0,
              "heldout": args.heldout, "device": str(device),
              "batch_size": args.batch_size, "lr": args.lr, "steps": step, "epochs": epoch,
              "train_seconds": elapsed, "draft_vocab_size": len(draft_ids), "draft_vocab_heldout_coverage": cover,
              "final_loss": sum(losses[-10:]) / max(len(losses[-10:]), 1),
              "heldout_agreement_before": before, "heldout_agreement_after": after, "kept_step": best_step,
              "seconds": time.time() - t0, "threads": torch.get_num_threads()}
    with open(os.path.join(args.out, "train_log.json"), "w") as f:
        json.dump({**report, "loss_curve": losses}, f, indent=1)
    return report


def _train_steps(drafter: EagleDrafter, opt: torch.optim.Optimizer, params: list[torch.nn.Parameter],
                 feats: dict[str, torch.Tensor], vocab_map: torch.Tensor, steps: int, args,
                 device: torch.device, deadline: float, log: Callable[[str], None],
                 checkpoint: Callable[[int], None] | None = None) -> tuple[list[float], int, int, float]:
    """AdamW steps over shuffled batches until --steps, --epochs or `deadline` (time.time()).
    Losses and accuracies stay on the device and are read back every --log-every steps
    (one synchronization then), so the host queues steps ahead of the GPU; `checkpoint`
    (held-out evaluation) runs every --eval-every steps. Returns (the loss of every step,
    steps, epochs, seconds of training)."""
    n = len(feats["tokens"])
    bs = min(args.batch_size, n)
    total_steps = args.steps or 10 ** 9
    pending: list[torch.Tensor] = []     # losses not yet read back
    losses: list[float] = []
    accs = torch.zeros(steps)
    step, epoch = 0, 0
    sync(device)
    start = time.time()
    while step < total_steps and epoch < args.epochs and time.time() < deadline:
        order = torch.randperm(n, device=feats["tokens"].device)
        for i in range(0, n - bs + 1, bs):
            if step >= total_steps or time.time() > deadline:
                break
            frac = step / total_steps if args.steps else (time.time() - start) / max(deadline - start, 1e-3)
            for g in opt.param_groups:
                g["lr"] = _lr(args, step, frac)
            with autocast(device):
                loss, accs = draft_loss(drafter, _batch(feats, order[i:i + bs], device), vocab_map, steps,
                                        args.parallel, args.loss_decay)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            pending.append(loss.detach())
            step += 1
            if step % args.log_every == 0:
                losses += torch.stack(pending).float().tolist()   # the one sync per log interval
                pending.clear()
                window = losses[-args.log_every:]
                log(f"epoch {epoch} step {step} loss {sum(window) / len(window):.3f} train agreement "
                    f"{_fmt(accs.tolist())} lr {_lr(args, step - 1, frac):.1e} "
                    f"{(time.time() - start) / step * 1e3:.0f} ms/step")
            if checkpoint is not None and step % args.eval_every == 0:
                checkpoint(step)
        epoch += 1
    if pending:
        losses += torch.stack(pending).float().tolist()
    sync(device)
    return losses, step, epoch, time.time() - start


class _BestWeights:
    """The drafter's weights at its best held-out agreement (mean over draft positions) so
    far: many epochs over a few million tokens can overfit, and the time budget decides
    how many there are."""

    def __init__(self, drafter: EagleDrafter, accs: list[float]) -> None:
        self.drafter, self.score, self.accs, self.step = drafter, sum(accs) / len(accs), accs, 0
        self.state: dict[str, torch.Tensor] | None = None

    def offer(self, accs: list[float], step: int) -> bool:
        """Keep a copy of the current weights if `accs` beats the best; True if it did."""
        score = sum(accs) / len(accs)
        if score <= self.score:
            return False
        self.score, self.accs, self.step = score, accs, step
        self.state = {k: v.detach().clone() for k, v in self.drafter.state_dict().items()}
        return True

    def restore(self) -> list[float]:
        """Load the kept weights back; returns their held-out agreement."""
        if self.state is not None:
            self.drafter.load_state_dict(self.state)
        return self.accs


def _batch(feats: dict[str, torch.Tensor], idx: torch.Tensor,
           device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """Rows idx of the features, on `device` (a no-op copy when they already live there)."""
    idx = idx.to(feats["tokens"].device)
    return {k: feats[k][idx].to(device, non_blocking=True) for k in FEATURE_KEYS}


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
    p.add_argument("--draft-layers", type=int, default=1,
                   help="decoder layers of the drafter (AWS's P-EAGLE drafters have 4; P-EAGLE runs them "
                        "once per step, EAGLE once per draft)")
    p.add_argument("--init-from", default=None,
                   help="a drafter folder to start from: every tensor of the same name and shape is "
                        "copied (e.g. a trained EAGLE-3 drafter into a P-EAGLE one), and its draft "
                        "vocabulary is used")
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--loss-decay", type=float, default=0.8,
                   help="loss weight of draft position s is decay^(s-1) (1: all positions alike)")
    p.add_argument("--log-every", type=int, default=10, help="steps between log lines (and GPU reads)")
    p.add_argument("--eval-every", type=int, default=0,
                   help="steps between held-out evaluations; the best weights are kept (0: never)")
    p.add_argument("--heldout", choices=("text", "greedy"), default="text",
                   help="the held-out agreement's sequences: chunks of the held-out text, or its "
                        "--prompt-len prefixes continued greedily by the target (what greedy acceptance "
                        "measures against)")
    p.add_argument("--feature-batch", type=int, default=8, help="sequences per teacher-forced target forward")
    p.add_argument("--features-cache", default=None,
                   help="safetensors file for the target's features (reused when it matches)")
    p.add_argument("--features-only", action="store_true",
                   help="compute (or check) the features and the cache, then stop: data for later runs")
    p.add_argument("--self-distill", action="store_true",
                   help="train on text prefixes continued by the target's own tokens (what the verifier "
                        "accepts) instead of on the text; --max-train-tokens / --seq-len of them")
    p.add_argument("--prompt-len", type=int, default=64, help="text prefix per sequence (--self-distill)")
    p.add_argument("--generate-batch", type=int, default=32,
                   help="sequences generated together (--self-distill; the engine's max_num_seqs)")
    p.add_argument("--generator", choices=("auto", "engine", "hf"), default="auto",
                   help="who continues the prefixes: ember's engine or the transformers target "
                        "(auto: the engine on CUDA, transformers on the CPU)")
    p.add_argument("--engine-memory", type=float, default=0.3,
                   help="the engine's gpu_memory_utilization while generating (--generator engine)")
    p.add_argument("--generate-budget", type=float, default=0.0,
                   help="seconds for generating continuations (--self-distill; 0: all of them); the "
                        "prefixes are in a fixed shuffled order, so a cut keeps the text covered")
    p.add_argument("--save-dtype", choices=("float32", "bfloat16"), default="float32",
                   help="the saved drafter's weights (bfloat16: half the size)")
    p.add_argument("--distill-temperature", type=float, default=0.0,
                   help="sample continuations at this temperature (0: all greedy)")
    p.add_argument("--distill-sampled-fraction", type=float, default=1.0,
                   help="with --distill-temperature > 0: the fraction of sequences sampled (the rest greedy)")
    p.add_argument("--threads", type=int, default=0,
                   help="torch threads (0: torch's default; 1 is faster on a CPU shared with other jobs)")
    p.set_defaults(func=lambda a: print(json.dumps(train(a), indent=1)))
