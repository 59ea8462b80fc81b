"""Draft-model proposer: a smaller model with the target's vocabulary drafts k tokens.

KV layout and coverage: see ember.spec.drafting (the draft's own paged KV on the target's
block tables, shaped by its own layers' KV cache specs and read through its own attention
backend family; per request, how many leading tokens it has draft K/V for). A drafting
step first runs the draft over the tokens from its coverage up to the request's last token
(the catch-up: its prompt the first time, then usually the one or two tokens the last
step added), whose last row gives draft 0; then k - 1 single-token steps give the rest.
Steps where no request drafts (adaptive k = 0) cost nothing. After a verification the
valid part is min(coverage, num_computed_tokens): drafts the target accepted were fed to
the draft with the same tokens at the same positions, so their K/V stands; rejected ones
sit past num_computed_tokens and are recomputed.

Stale draft K/V (a cached prefix block some other request computed while its draft was
off) can only lower acceptance, never change the output: the verifier makes the output
the target's whatever the drafts are. New and preempted requests start at coverage 0.
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch

from ember.engine.model_runner import build_forward_batch
from ember.engine.scheduler import SchedulerOutput
from ember.models.loader import build_model, resolve_model
from ember.models.registry import attention_backend_for
from ember.spec.drafting import ProposerKV, draw_drafts
from ember.spec.proposer import Proposer

if TYPE_CHECKING:
    from ember.engine.engine import Engine
    from ember.engine.model_runner import ModelRunner
    from ember.spec.config import SpeculativeConfig

logger = logging.getLogger("ember")


class DraftModelProposer(Proposer):
    name = "draft"

    def __init__(self, cfg: SpeculativeConfig, engine: Engine) -> None:
        runner = engine.runner
        source = resolve_model(cfg.model)
        target_vocab = engine.model_config.vocab_size
        if source.config.vocab_size != target_vocab:
            raise ValueError(f"draft model vocabulary ({source.config.vocab_size}) differs from the "
                             f"target's ({target_vocab}); a draft must share the tokenizer")
        self.device = runner.device
        self.block_size = runner.block_size
        # Its own backend: the draft's architecture may read a different KV layout.
        self.backend = attention_backend_for(source.config, engine.cfg.attention_backend, self.device)
        self.model = build_model(source, self.backend, runner.device, runner.dtype, engine.cfg.seed,
                                 runner.layer_ops)
        self.name_and_layers = (cfg.model, source.config.num_hidden_layers)
        self.vocab_size = target_vocab

    def bytes_per_token(self, dtype: torch.dtype) -> int:
        return ProposerKV.bytes_per_token(self.model.attention_layers(), dtype)

    def allocate(self, runner: ModelRunner) -> None:
        self.kv = ProposerKV(self.model.attention_layers(), runner)
        logger.info("draft model %s: %d layers, KV %.1f MiB", *self.name_and_layers, self.kv.nbytes / 2**20)

    @torch.inference_mode()
    def propose(self, batch: SchedulerOutput) -> None:
        spec = [s for s in batch.scheduled if s.num_spec_slots > 0]
        if not spec:
            return
        # Catch-up forward over each drafting request's tokens the draft has not seen.
        starts = [self.kv.covered(s.request) for s in spec]
        spans = [s.request.token_ids[start:s.request.num_computed_tokens + s.num_new_tokens]
                 for s, start in zip(spec, starts)]
        order = sorted(range(len(spec)), key=lambda i: len(spans[i]) != 1)
        spec = [spec[i] for i in order]
        starts = [starts[i] for i in order]
        spans = [spans[i] for i in order]
        self.catch_up_tokens = sum(len(span) for span in spans)
        fb = build_forward_batch([(s.request.block_ids, start, span)
                                  for s, start, span in zip(spec, starts, spans)],
                                 self.block_size, self.device)
        self.backend.prepare(fb)
        hidden = self.model(fb.input_ids, fb.positions, fb)
        self.kv.forget_finished(batch.scheduled)
        logits = self.model.compute_logits(hidden[fb.logits_indices])
        tokens: list[list[int]] = [[] for _ in spec]
        probs: list[list[torch.Tensor]] = [[] for _ in spec]
        active = list(range(len(spec)))
        while True:
            draw_drafts(spec, active, logits, tokens, probs, self.vocab_size)
            active = [i for i in active if len(tokens[i]) < spec[i].num_spec_slots]
            if not active:
                break
            # One more draft for the requests with room left: feed the draft just made.
            seqs = []
            for i in active:
                r = spec[i].request
                pos = r.num_tokens - 1 + len(tokens[i])
                seqs.append((r.block_ids, pos, [tokens[i][-1]]))
            fb = build_forward_batch(seqs, self.block_size, self.device)
            self.backend.prepare(fb)
            hidden = self.model(fb.input_ids, fb.positions, fb)
            logits = self.model.compute_logits(hidden)
        for s, toks, ps in zip(spec, tokens, probs):
            s.spec_token_ids = toks
            s.spec_probs = torch.stack(ps)   # [k, vocab]
            # Fed: its own tokens and every draft but the last.
            self.kv.record(s.request, s.request.num_tokens + len(toks) - 1)
