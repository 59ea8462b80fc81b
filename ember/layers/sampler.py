"""The batched sampler: one call turns a step's logits into one token per sequence.

Pipeline for each row, in order (each stage runs only when some row needs it):

1. ``min_tokens``: EOS and the stop token ids are masked while the output is shorter
   than ``min_tokens``.
2. Penalties, as in vLLM: the repetition penalty over prompt + output tokens (positive
   logits divided, negative ones multiplied), then the frequency and presence
   penalties over output tokens only.
3. Greedy rows take the argmax of these penalized logits.
4. Random rows: temperature, top-k, top-p, min-p, then a draw from the filtered
   distribution by the exponential race ``argmax(probs / E)``, ``E ~ Exp(1)``, which
   samples exactly from ``probs`` (up to scale) without renormalizing or a cumsum.

Ties at a top-k / top-p boundary: every token whose logit equals the boundary token's
logit is kept, so the kept set can be slightly larger than ``k`` (or than the smallest
set reaching ``top_p``). This makes the result independent of token order and of sort
stability (CUDA sorts are not stable).

Randomness: a row with its own ``torch.Generator`` draws its noise from that generator
only, a full vocabulary row per step, so a seeded request gets the same tokens whatever
else is in the batch and wherever it sits; rows without one share the default generator.

Logprobs are vLLM's default "raw logprobs": ``log_softmax`` of the model's logits
before any penalty, temperature or filter. They describe the model, not the sampling
distribution, and they are the same whatever sampling settings a request uses.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ember.sampling_params import SamplingParams


@dataclass
class SamplingRow:
    """What the sampler needs to know about one sequence in the batch.

    ``eos_token_ids`` is only used to enforce ``min_tokens`` (masked, together with
    ``stop_token_ids``, until the output reaches ``min_tokens``; not masked when
    ``ignore_eos`` is set).
    """

    params: SamplingParams
    prompt_token_ids: Sequence[int]
    output_token_ids: Sequence[int]
    generator: torch.Generator | None = None
    eos_token_ids: Sequence[int] = ()


@dataclass
class Penalties:
    """Penalty state for the rows that use a penalty (possibly a subset of the batch)."""

    rows: torch.Tensor | None  # [m] long indices into the batch; None = every row
    repetition: torch.Tensor  # [m] fp32
    frequency: torch.Tensor  # [m] fp32
    presence: torch.Tensor  # [m] fp32
    output_counts: torch.Tensor  # [m, vocab] fp32, occurrences of each token in the output
    seen: torch.Tensor | None  # [m, vocab] bool, in prompt or output; None if no repetition penalty


@dataclass
class SamplingBatch:
    """Per-step sampling state for a batch, built once per step by :meth:`build`.

    Per-row tensors are ``None`` when no row needs that stage, which is how the
    sampler skips it.
    """

    num_seqs: int
    vocab_size: int
    device: torch.device
    all_greedy: bool
    greedy_mask: torch.Tensor | None  # [num_seqs] bool; None when all rows are alike
    temperature: torch.Tensor | None  # [num_seqs] fp32, 1.0 on greedy rows
    top_k: torch.Tensor | None  # [num_seqs] long in [1, vocab], vocab = off
    max_top_k: int  # host copy of max(top_k), sizes the topk call
    top_p: torch.Tensor | None  # [num_seqs] fp32, 1.0 = off
    min_p: torch.Tensor | None  # [num_seqs] fp32, 0.0 = off
    penalties: Penalties | None
    banned: tuple[torch.Tensor, torch.Tensor] | None  # ([b] rows, [b] token ids) set to -inf
    seeded: list[tuple[int, torch.Generator]]  # random rows with their own generator
    logprob_rows: list[int]  # rows that asked for logprobs, ascending
    num_logprobs: list[int]  # top-N asked by each of logprob_rows
    logprob_index: torch.Tensor | None  # [len(logprob_rows)] long; None = every row

    @classmethod
    def build(
        cls, rows: Sequence[SamplingRow], vocab_size: int, device: torch.device | str
    ) -> SamplingBatch:
        """Gather the rows' parameters into device tensors, only those some row needs."""
        device = torch.device(device)
        n = len(rows)
        params = [r.params for r in rows]
        greedy = [p.greedy for p in params]
        all_greedy = all(greedy)
        random_params = [p for p, g in zip(params, greedy) if not g]

        # Greedy rows get neutral values whatever their params say.
        do_temperature = any(p.temperature != 1.0 for p in random_params)
        do_top_k = any(0 < p.top_k < vocab_size for p in random_params)
        do_top_p = any(p.top_p < 1.0 for p in random_params)
        do_min_p = any(p.min_p > 0.0 for p in random_params)
        columns: dict[str, list[float]] = {}
        if do_temperature:
            columns["temperature"] = [1.0 if g else p.temperature for p, g in zip(params, greedy)]
        if do_top_p:
            columns["top_p"] = [1.0 if g else p.top_p for p, g in zip(params, greedy)]
        if do_min_p:
            columns["min_p"] = [0.0 if g else p.min_p for p, g in zip(params, greedy)]
        float_params: dict[str, torch.Tensor] = {}
        if columns:
            # One host-to-device copy for all float parameters.
            packed = torch.tensor(list(columns.values()), dtype=torch.float32).to(device, non_blocking=True)
            float_params = dict(zip(columns, packed))  # name -> [num_seqs]

        top_k = None
        max_top_k = vocab_size
        if do_top_k:
            k_list = [
                vocab_size if g or not 0 < p.top_k < vocab_size else p.top_k
                for p, g in zip(params, greedy)
            ]
            max_top_k = max(k_list)
            top_k = torch.tensor(k_list, dtype=torch.long).to(device, non_blocking=True)

        greedy_mask = None
        if not all_greedy and any(greedy):
            greedy_mask = torch.tensor(greedy, dtype=torch.bool).to(device, non_blocking=True)

        logprob_rows = [i for i, p in enumerate(params) if p.logprobs is not None]
        logprob_index = None
        if logprob_rows and len(logprob_rows) < n:
            logprob_index = torch.tensor(logprob_rows, dtype=torch.long).to(device, non_blocking=True)

        return cls(
            num_seqs=n,
            vocab_size=vocab_size,
            device=device,
            all_greedy=all_greedy,
            greedy_mask=greedy_mask,
            temperature=float_params.get("temperature"),
            top_k=top_k,
            max_top_k=max_top_k,
            top_p=float_params.get("top_p"),
            min_p=float_params.get("min_p"),
            penalties=_build_penalties(rows, vocab_size, device),
            banned=_build_banned(rows, vocab_size, device),
            seeded=[
                (i, r.generator)
                for i, (r, g) in enumerate(zip(rows, greedy))
                if r.generator is not None and not g
            ],
            logprob_rows=logprob_rows,
            num_logprobs=[params[i].logprobs for i in logprob_rows],
            logprob_index=logprob_index,
        )

    @property
    def plain_greedy(self) -> bool:
        """All rows greedy with nothing to change their logits: a single argmax does."""
        return self.all_greedy and self.penalties is None and self.banned is None


def _build_penalties(
    rows: Sequence[SamplingRow], vocab_size: int, device: torch.device
) -> Penalties | None:
    idx = [
        i
        for i, r in enumerate(rows)
        if r.params.repetition_penalty != 1.0
        or r.params.frequency_penalty != 0.0
        or r.params.presence_penalty != 0.0
    ]
    if not idx:
        return None
    m = len(idx)
    sub = [rows[i] for i in idx]
    values = torch.tensor(
        [
            [r.params.repetition_penalty for r in sub],
            [r.params.frequency_penalty for r in sub],
            [r.params.presence_penalty for r in sub],
        ],
        dtype=torch.float32,
    ).to(device, non_blocking=True)  # [3, m]

    out_tokens, out_rows = _flatten([r.output_token_ids for r in sub], device)
    output_counts = torch.zeros((m, vocab_size), dtype=torch.float32, device=device)
    output_counts.view(-1).scatter_add_(
        0, out_rows * vocab_size + out_tokens, torch.ones_like(out_tokens, dtype=torch.float32)
    )

    seen = None
    if any(r.params.repetition_penalty != 1.0 for r in sub):
        # Only rows with a repetition penalty need their prompt scanned.
        prompts = [
            r.prompt_token_ids if r.params.repetition_penalty != 1.0 else () for r in sub
        ]
        prompt_tokens, prompt_rows = _flatten(prompts, device)
        seen = output_counts > 0
        seen.view(-1)[prompt_rows * vocab_size + prompt_tokens] = True

    return Penalties(
        rows=None if m == len(rows) else torch.tensor(idx, dtype=torch.long).to(device, non_blocking=True),
        repetition=values[0],
        frequency=values[1],
        presence=values[2],
        output_counts=output_counts,
        seen=seen,
    )


def _build_banned(
    rows: Sequence[SamplingRow], vocab_size: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(row, token) pairs to mask: stop tokens and EOS of rows still below min_tokens."""
    banned_lists: list[list[int]] = []
    for r in rows:
        p = r.params
        if len(r.output_token_ids) < p.min_tokens:
            eos = [] if p.ignore_eos else list(r.eos_token_ids)
            # An id outside the vocabulary can never be sampled: nothing to mask.
            banned_lists.append([t for t in p.stop_token_ids + eos if t < vocab_size])
        else:
            banned_lists.append([])
    if not any(banned_lists):
        return None
    tokens, row_ids = _flatten(banned_lists, device)
    return row_ids, tokens


def _flatten(
    lists: Sequence[Sequence[int]], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenate token lists; returns (tokens [t], row index of each token [t])."""
    lengths = [len(x) for x in lists]
    # np.fromiter is ~3x faster than torch.tensor on a long Python list.
    flat = np.fromiter(itertools.chain.from_iterable(lists), dtype=np.int64, count=sum(lengths))
    tokens = torch.from_numpy(flat)
    row_ids = torch.repeat_interleave(torch.arange(len(lists)), torch.tensor(lengths))
    return tokens.to(device, non_blocking=True), row_ids.to(device, non_blocking=True)


@dataclass
class RowLogprobs:
    """Logprobs of one scored token, as host Python values."""

    token_id: int
    logprob: float
    rank: int  # 1-based rank of token_id among the vocabulary
    top_token_ids: list[int]  # most likely tokens, descending
    top_logprobs: list[float]


@dataclass
class TokenLogprobs:
    """Logprobs of a batch of scored tokens, as device tensors."""

    token_ids: torch.Tensor  # [m] long
    logprobs: torch.Tensor  # [m] fp32
    ranks: torch.Tensor  # [m] long, 1-based
    top_token_ids: torch.Tensor  # [m, num_top] long
    top_logprobs: torch.Tensor  # [m, num_top] fp32

    def to_rows(self, num_top: Sequence[int] | None = None) -> list[RowLogprobs]:
        """Copy to the host (one sync); row i keeps its first ``num_top[i]`` top entries."""
        token_ids = self.token_ids.tolist()
        logprobs = self.logprobs.tolist()
        ranks = self.ranks.tolist()
        top_ids = self.top_token_ids.tolist()
        top_lps = self.top_logprobs.tolist()
        width = self.top_token_ids.shape[1]
        if num_top is None:
            num_top = [width] * len(token_ids)
        return [
            RowLogprobs(token_ids[i], logprobs[i], ranks[i], top_ids[i][:k], top_lps[i][:k])
            for i, k in enumerate(num_top)
        ]


def compute_token_logprobs(
    logits: torch.Tensor,  # [n, vocab]
    token_ids: torch.Tensor,  # [n] long
    num_top: int,
) -> TokenLogprobs:
    """Raw logprob and rank of ``token_ids`` under ``logits``, plus the top ``num_top``.

    The rank is vLLM's: the number of vocabulary entries whose logprob is at least the
    token's own, so the most likely token has rank 1 and ties share the worse rank.
    Also used for prompt logprobs (pass the logits of positions 0..n-2 and the prompt
    tokens 1..n-1).
    """
    logprobs = torch.log_softmax(logits.float(), dim=-1)  # [n, vocab]
    token_ids = token_ids.long()
    token_logprobs = logprobs.gather(1, token_ids[:, None])  # [n, 1]
    ranks = (logprobs >= token_logprobs).sum(dim=-1)  # [n]
    top = torch.topk(logprobs, min(num_top, logprobs.shape[-1]), dim=-1)
    return TokenLogprobs(
        token_ids=token_ids,
        logprobs=token_logprobs.squeeze(1),
        ranks=ranks,
        top_token_ids=top.indices,
        top_logprobs=top.values,
    )


@dataclass
class SamplerOutput:
    """What one sampler call returns.

    ``logprobs`` holds one entry per row that asked for logprobs, in the order of
    ``logprob_rows`` (batch indices); its top entries are padded to the largest N in
    the batch, ``num_logprobs`` says how many each row asked for.
    """

    sampled_token_ids: torch.Tensor  # [num_seqs] long
    logprobs: TokenLogprobs | None = None
    logprob_rows: list[int] | None = None
    num_logprobs: list[int] | None = None

    def row_logprobs(self) -> list[RowLogprobs | None]:
        """Per batch row: its logprobs on the host, or None if it asked for none."""
        n = self.sampled_token_ids.shape[0]
        result: list[RowLogprobs | None] = [None] * n
        if self.logprobs is not None:
            for i, entry in zip(self.logprob_rows, self.logprobs.to_rows(self.num_logprobs)):
                result[i] = entry
        return result


def apply_penalties(logits: torch.Tensor, penalties: Penalties) -> torch.Tensor:
    """Repetition, then frequency and presence penalties (vLLM's order); out of place.

    logits: [num_seqs, vocab] fp32. Returns a new [num_seqs, vocab] tensor.
    """
    sub = logits if penalties.rows is None else logits[penalties.rows]  # [m, vocab]
    if penalties.seen is not None:
        rep = penalties.repetition[:, None]  # [m, 1]
        penalized = torch.where(sub > 0, sub / rep, sub * rep)
        sub = torch.where(penalties.seen, penalized, sub)
    counts = penalties.output_counts  # [m, vocab]
    sub = (
        sub
        - penalties.frequency[:, None] * counts
        - penalties.presence[:, None] * (counts > 0).float()
    )
    if penalties.rows is None:
        return sub
    return logits.index_copy(0, penalties.rows, sub)


def apply_top_k_top_p(
    logits: torch.Tensor,  # [num_seqs, vocab] fp32
    top_k: torch.Tensor | None,  # [num_seqs] long in [1, vocab]
    max_top_k: int,
    top_p: torch.Tensor | None,  # [num_seqs] fp32 in (0, 1]
) -> torch.Tensor:
    """Set logits outside the top-k, then outside the top-p set, to -inf (out of place).

    Top-p keeps the smallest prefix of the (top-k filtered) distribution whose mass is
    at least ``top_p``, always at least the top token; ``top_p == 1`` keeps everything.
    Ties with a boundary token are kept (see the module docstring).
    """
    neg_inf = logits.new_full((), float("-inf"))
    if top_p is None:
        assert top_k is not None
        top_values = torch.topk(logits, max_top_k, dim=-1).values  # [num_seqs, max_top_k]
        kth = top_values.gather(1, (top_k - 1)[:, None])  # [num_seqs, 1]
        return torch.where(logits < kth, neg_inf, logits)

    sorted_logits = torch.sort(logits, dim=-1, descending=True).values  # [num_seqs, vocab]
    if top_k is not None:
        kth = sorted_logits.gather(1, (top_k - 1)[:, None])  # [num_seqs, 1]
        sorted_logits = torch.where(sorted_logits < kth, neg_inf, sorted_logits)
    sorted_probs = torch.softmax(sorted_logits, dim=-1)  # [num_seqs, vocab]
    mass_before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs  # exclusive cumsum
    keep = (mass_before < top_p[:, None]).sum(dim=-1).clamp_(min=1)  # [num_seqs]
    boundary = sorted_logits.gather(1, (keep - 1)[:, None])  # [num_seqs, 1]
    # Rounding in the cumsum must not drop tail tokens when top_p is exactly 1.
    boundary = torch.where(top_p[:, None] >= 1.0, neg_inf, boundary)
    if top_k is not None:
        boundary = torch.maximum(boundary, kth)
    return torch.where(logits < boundary, neg_inf, logits)


def _filtered_probs(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """Temperature, top-k / top-p, then min-p: the random rows' sampling distribution,
    not renormalized after min-p.

    logits: [num_seqs, vocab] fp32, penalized. Returns [num_seqs, vocab] fp32.
    """
    if batch.temperature is not None:
        logits = logits / batch.temperature[:, None]
    if batch.top_k is not None or batch.top_p is not None:
        logits = apply_top_k_top_p(logits, batch.top_k, batch.max_top_k, batch.top_p)
    probs = torch.softmax(logits, dim=-1)  # [num_seqs, vocab]
    if batch.min_p is not None:
        threshold = batch.min_p[:, None] * probs.amax(dim=-1, keepdim=True)  # [num_seqs, 1]
        probs = probs.masked_fill(probs < threshold, 0.0)
    return probs


def _sample_random(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """Temperature, top-k / top-p, min-p, then one exponential-race draw per row.

    logits: [num_seqs, vocab] fp32, penalized. Returns [num_seqs] long.
    """
    probs = _filtered_probs(logits, batch)
    # argmax(p / E) with E ~ Exp(1) i.i.d. picks token i with probability p_i / sum(p),
    # so neither renormalization after filtering nor a cumsum is needed.
    noise = torch.empty_like(probs).exponential_()  # [num_seqs, vocab]
    for row, generator in batch.seeded:
        noise[row].exponential_(generator=generator)
    noise.clamp_(min=torch.finfo(noise.dtype).tiny)  # never divide by zero
    return (probs / noise).argmax(dim=-1)


def greedy_tokens(logits: torch.Tensor) -> torch.Tensor:
    """[rows, vocab] -> [rows] long: each row's argmax, as plain greedy sampling takes it."""
    if logits.is_cuda:   # a two-pass Triton argmax: torch's reduces a row in one block
        from ember.layers.triton_argmax import greedy_argmax
        return greedy_argmax(logits)
    return logits.argmax(dim=-1)


def sample(logits: torch.Tensor, batch: SamplingBatch) -> SamplerOutput:
    """Sample one token per row of ``logits`` ([num_seqs, vocab], any float dtype).

    The caller's logits are never modified. Work is done in fp32.
    """
    if logits.shape != (batch.num_seqs, batch.vocab_size):
        raise ValueError(
            f"logits have shape {tuple(logits.shape)}, the batch expects "
            f"({batch.num_seqs}, {batch.vocab_size})."
        )
    if batch.plain_greedy:
        sampled = greedy_tokens(logits)
    else:
        x = logits.float()  # [num_seqs, vocab]
        if batch.banned is not None:
            x = x.index_put(batch.banned, x.new_full((), float("-inf")))
        if batch.penalties is not None:
            x = apply_penalties(x, batch.penalties)
        if batch.all_greedy:
            sampled = x.argmax(dim=-1)
        else:
            sampled = _sample_random(x, batch)
            if batch.greedy_mask is not None:
                sampled = torch.where(batch.greedy_mask, x.argmax(dim=-1), sampled)

    if not batch.logprob_rows:
        return SamplerOutput(sampled_token_ids=sampled)
    rows = batch.logprob_index
    raw = logits if rows is None else logits[rows]
    tokens = sampled if rows is None else sampled[rows]
    return SamplerOutput(
        sampled_token_ids=sampled,
        logprobs=compute_token_logprobs(raw, tokens, max(batch.num_logprobs)),
        logprob_rows=batch.logprob_rows,
        num_logprobs=batch.num_logprobs,
    )


def sampling_probs(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """The exact distribution :func:`sample` draws each row's token from, normalized.

    logits: [num_seqs, vocab], any float dtype. Returns [num_seqs, vocab] fp32. Greedy rows
    are one-hot at the argmax :func:`sample` would pick (same penalties, same tie-break),
    so a verifier that treats every row as a distribution is exact for greedy rows too.
    """
    if logits.shape != (batch.num_seqs, batch.vocab_size):
        raise ValueError(
            f"logits have shape {tuple(logits.shape)}, the batch expects "
            f"({batch.num_seqs}, {batch.vocab_size})."
        )
    x = logits.float()  # [num_seqs, vocab]
    if batch.banned is not None:
        x = x.index_put(batch.banned, x.new_full((), float("-inf")))
    if batch.penalties is not None:
        x = apply_penalties(x, batch.penalties)
    one_hot = torch.zeros_like(x).scatter_(1, x.argmax(dim=-1, keepdim=True), 1.0)
    if batch.all_greedy:
        return one_hot
    probs = _filtered_probs(x, batch)
    probs = probs / probs.sum(dim=-1, keepdim=True)
    if batch.greedy_mask is not None:
        probs = torch.where(batch.greedy_mask[:, None], one_hot, probs)
    return probs


class Sampler(torch.nn.Module):
    """Module wrapper around :func:`sample`, for model runners that hold one."""

    def forward(self, logits: torch.Tensor, batch: SamplingBatch) -> SamplerOutput:
        return sample(logits, batch)


def make_generator(seed: int, device: torch.device | str) -> torch.Generator:
    """A generator for a seeded request; it must live on the device of the logits."""
    generator = torch.Generator(device=torch.device(device))
    generator.manual_seed(seed)
    return generator
