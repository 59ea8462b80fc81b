"""Perplexity with a sliding window: windows of `window` tokens every `stride` tokens,
each scoring only the tokens no earlier window scored (so every token after the first is
scored once, with at least window - stride tokens of context once the text is long enough).
Every token is predicted from inside one window, never across a window boundary."""
from __future__ import annotations

import argparse
import math
import time
from dataclasses import dataclass

import torch

from ember.eval.forward import sequence_logits


@dataclass
class PerplexityResult:
    ppl: float
    nll: float           # mean negative log-likelihood (nats / token)
    tokens_scored: int
    seconds: float


def read_split(path: str, split_start: float = 0.0, split_end: float = 1.0) -> str:
    """The characters of a text file between two fractions of its length (0.8-1.0 = the
    last 20%, 0-0.8 = the calibration part)."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    return text[int(len(text) * split_start):int(len(text) * split_end)]


def perplexity(llm, token_ids: list[int], window: int = 1024, stride: int = 512) -> PerplexityResult:
    if not 0 < stride < window:
        # Each window must hold at least one token of context for its first scored token.
        raise ValueError("need 0 < stride < window")
    if len(token_ids) < 2:
        raise ValueError("need at least two tokens to score")
    start_time = time.perf_counter()
    nll_sum, scored, prev_end = 0.0, 0, 1   # token 0 has no prediction
    begin = 0
    while prev_end < len(token_ids):
        end = min(begin + window, len(token_ids))
        chunk = token_ids[begin:end]
        # Predict tokens [prev_end, end) from the logits one position earlier.
        rows = torch.arange(prev_end - 1 - begin, end - 1 - begin)
        logits = sequence_logits(llm, chunk, rows)
        targets = torch.tensor(chunk[prev_end - begin:], device=logits.device)
        nll_sum += torch.nn.functional.cross_entropy(logits, targets, reduction="sum").item()
        scored += len(targets)
        prev_end = end
        begin += stride
    nll = nll_sum / scored
    return PerplexityResult(math.exp(nll), nll, scored, time.perf_counter() - start_time)


def add_ppl_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--text", required=True, help="a UTF-8 text file")
    p.add_argument("--window", type=int, default=1024)
    p.add_argument("--stride", type=int, default=512)
    p.add_argument("--split-start", type=float, default=0.0,
                   help="evaluate from this fraction of the file (0.8 = the last 20%%)")
    p.add_argument("--split-end", type=float, default=1.0)
    p.add_argument("--max-tokens", type=int, default=None, help="score at most this many tokens")


def cmd_ppl(args: argparse.Namespace) -> None:
    from ember.cli import engine_kwargs
    from ember.llm import LLM
    kw = engine_kwargs(args)
    kw["max_model_len"] = max(kw.get("max_model_len") or 0, args.window + 1)
    llm = LLM(args.model, **kw)
    tok = llm.get_tokenizer()
    if tok is None:
        raise ValueError("perplexity on a text needs the model's tokenizer")
    ids = tok.encode(read_split(args.text, args.split_start, args.split_end), add_special_tokens=False)
    if args.max_tokens:
        ids = ids[:args.max_tokens + 1]
    r = perplexity(llm, ids, args.window, args.stride)
    q = llm.engine.model_config.quantization
    print(f"model {args.model} quantization {q.method if q else 'none'} text {args.text} "
          f"[{args.split_start:.2f}, {args.split_end:.2f}] window {args.window} stride {args.stride}: "
          f"{r.tokens_scored} tokens scored, ppl {r.ppl:.4f} (nll {r.nll:.4f}) in {r.seconds:.1f} s")
