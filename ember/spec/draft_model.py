"""Draft-model proposer: a smaller model with the target's vocabulary drafts k tokens.

KV layout: the draft keeps its own paged KV tensors (shaped for its own layers and
heads) but uses the target's block ids, block tables and slots. Rolling back rejected
drafts, preemption and the prefix cache then need nothing of their own: whatever the
scheduler does to a request's blocks applies to both caches at once.

That only works if both caches hold K/V for the same tokens, so every step the draft
first runs over exactly the request tokens the target computes in that step (prefill
chunks included): the "mirror" forward, whose last row of each speculating request
also gives draft 0. Then k - 1 single-token steps give drafts 1..k-1; the last draft is
never fed to the draft model, so when all k are accepted its K/V is missing from the
draft cache. `kv_lag = 1` tells the scheduler to count that token as not yet computed:
the next step recomputes it in both models (one extra query token, no bookkeeping).
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch

from ember.engine.model_runner import build_forward_batch
from ember.engine.scheduler import ScheduledRequest, SchedulerOutput
from ember.layers.sampler import SamplingBatch, SamplingRow, sampling_probs
from ember.models.loader import build_model, resolve_model
from ember.spec.proposer import Proposer
from ember.spec.rejection import sample_from

if TYPE_CHECKING:
    from ember.engine.engine import Engine
    from ember.spec.config import SpeculativeConfig

logger = logging.getLogger("ember")


class DraftModelProposer(Proposer):
    name = "draft"
    kv_lag = 1

    def __init__(self, cfg: "SpeculativeConfig", engine: "Engine") -> None:
        runner = engine.runner
        source = resolve_model(cfg.model)
        target_vocab = engine.model_config.vocab_size
        if source.config.vocab_size != target_vocab:
            raise ValueError(f"draft model vocabulary ({source.config.vocab_size}) differs from the "
                             f"target's ({target_vocab}); a draft must share the tokenizer")
        self.device = runner.device
        self.block_size = runner.block_size
        self.backend = runner.backend
        self.model = build_model(source, runner.backend, runner.device, runner.dtype, engine.cfg.seed)
        mc = source.config
        shape = (2, runner.num_blocks, self.block_size, mc.num_key_value_heads, mc.head_dim)
        self.kv_caches = [torch.zeros(shape, dtype=runner.dtype, device=self.device)
                          for _ in range(mc.num_hidden_layers)]
        for layer, cache in zip(self.model.attention_layers(), self.kv_caches):
            layer.kv_cache = cache
        self.vocab_size = target_vocab
        logger.info("draft model %s: %d layers, KV %.1f MiB", cfg.model, mc.num_hidden_layers,
                    sum(c.numel() * c.element_size() for c in self.kv_caches) / 2**20)

    @torch.inference_mode()
    def propose(self, batch: SchedulerOutput) -> None:
        # Mirror forward over the step's own tokens; its last rows give draft 0.
        order = sorted(batch.scheduled, key=lambda s: s.num_new_tokens != 1)
        fb = build_forward_batch(
            [(s.request.block_ids, s.request.num_computed_tokens,
              s.request.token_ids[s.request.num_computed_tokens:
                                  s.request.num_computed_tokens + s.num_new_tokens]) for s in order],
            self.block_size, self.device)
        self.backend.prepare(fb)
        hidden = self.model(fb.input_ids, fb.positions, fb)
        drafting = [i for i, s in enumerate(order) if s.num_spec_slots > 0]
        if not drafting:
            return
        spec = [order[i] for i in drafting]
        logits = self.model.compute_logits(hidden[fb.logits_indices[drafting]])
        tokens: list[list[int]] = [[] for _ in spec]
        probs: list[list[torch.Tensor]] = [[] for _ in spec]
        active = list(range(len(spec)))
        while True:
            self._sample(spec, active, logits, tokens, probs)
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

    def _sample(self, spec: list[ScheduledRequest], active: list[int], logits: torch.Tensor,
                tokens: list[list[int]], probs: list[list[torch.Tensor]]) -> None:
        """Draw the next draft of each active request from the draft's distribution
        under the request's own sampling settings (greedy stays greedy)."""
        rows = []
        for i in active:
            r = spec[i].request
            rows.append(SamplingRow(r.params, r.prompt_token_ids, r.output_token_ids + tokens[i],
                                    None, r.eos_token_ids))
        q = sampling_probs(logits[:, :self.vocab_size], SamplingBatch.build(rows, self.vocab_size, self.device))
        drawn = sample_from(q, [spec[i].request.generator for i in active]).tolist()
        for row, i in enumerate(active):
            tokens[i].append(drawn[row])
            probs[i].append(q[row])
