"""The engine: requests in, tokens out, one `step()` at a time."""
from __future__ import annotations

import logging

import torch

from ember.cache.block_pool import BlockPool
from ember.cache.prefix import create_prefix_cache
from ember.config import EngineConfig, resolve_async_scheduling, resolve_device, resolve_dtype
from ember.engine.model_runner import LaunchedStep, ModelRunner
from ember.engine.output_processor import OutputProcessor
from ember.engine.request import Request
from ember.engine.scheduler import Scheduler, SchedulerOutput
from ember.models.loader import resolve_model
from ember.outputs import RequestOutput
from ember.sampling_params import SamplingParams
from ember.spec.speculator import Speculator

logger = logging.getLogger("ember")


class PromptTooLongError(ValueError):
    """The prompt cannot fit in the context (or the KV pool) with room for one new token."""


class Engine:
    def __init__(self, cfg: EngineConfig) -> None:
        self.cfg = cfg
        source = resolve_model(cfg.model, cfg.load_format, cfg.tokenizer, cfg.quantization,
                               cfg.quantize_lm_head)
        self.model_config = source.config
        self.tokenizer = source.tokenizer
        device = resolve_device(cfg.device)
        dtype = resolve_dtype(cfg.dtype, device)
        max_model_len = self._max_model_len(cfg)
        budget = cfg.max_num_batched_tokens or (8192 if device.type == "cuda" else 2048)
        self.runner = ModelRunner(cfg, source, device, dtype, max_model_len, budget)
        # Async scheduling (vLLM's --async-scheduling, SGLang's overlap scheduler): schedule
        # and launch step N + 1 before step N's tokens reach the host. Under `auto`, off on
        # the CPU (no overlap there). With speculation only steps without drafts run ahead.
        self.async_scheduling = resolve_async_scheduling(cfg.async_scheduling, device)
        self.in_flight: LaunchedStep | None = None
        # Speculative decoding (proposer `none` when off); spec_stats() reports on it. Its
        # networks load first, then the KV pool is sized with room for the per-slot state
        # the proposer keeps beside it, which it allocates last.
        self.speculator = Speculator(cfg.speculative_config, self)
        self.runner.allocate_kv_cache(self.speculator.proposer.bytes_per_token(dtype),
                                      self.speculator.verify_widths())
        self.speculator.proposer.allocate(self.runner)
        capacity = self.runner.num_blocks * cfg.block_size
        if capacity < max_model_len:
            if cfg.max_model_len is not None:
                raise ValueError(f"max_model_len {max_model_len} needs more KV cache than the "
                                 f"{capacity} tokens that fit; raise the KV memory or lower it")
            logger.warning("KV pool holds %d tokens; capping max_model_len from %d", capacity,
                           max_model_len)
            max_model_len = capacity
        self.max_model_len = max_model_len
        self.block_pool = BlockPool(self.runner.num_blocks)
        # prefix_cache.stats(): hit rate, evictions, cached tokens.
        self.prefix_cache = create_prefix_cache(cfg.prefix_cache, self.block_pool, cfg.block_size)
        self.scheduler = Scheduler(self.block_pool, cfg.block_size, cfg.max_num_seqs,
                                   budget, max_model_len, self.prefix_cache, cfg.scheduling_policy,
                                   self.speculator)
        self.output_processor = OutputProcessor(self.tokenizer, self.scheduler)
        self.eos_token_ids = frozenset(
            self.tokenizer.eos_token_ids if self.tokenizer is not None else source.config.eos_token_ids)
        logger.info("ember ready: %s on %s (%s), max_model_len %d, %d KV tokens",
                    source.config.architecture, device, dtype, max_model_len, capacity)

    def _max_model_len(self, cfg: EngineConfig) -> int:
        mc = self.model_config
        limit = mc.max_position_embeddings
        sliding = mc.hf_config.get("sliding_window")
        if sliding and sliding < limit:
            limit = sliding  # no sliding-window attention: stay within the window
        if cfg.max_model_len is None:
            return limit
        if cfg.max_model_len > limit:
            raise ValueError(f"max_model_len {cfg.max_model_len} exceeds the model's limit {limit}")
        return cfg.max_model_len

    # ---- requests -------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt_token_ids: list[int],
                    params: SamplingParams | None = None, prompt: str | None = None,
                    final_only: bool = False) -> None:
        """Queue a request. Raises PromptTooLongError / ValueError for input it cannot serve.
        `final_only`: step() reports it only when it finishes (no per-token outputs)."""
        params = params or SamplingParams()
        if request_id in self.output_processor.groups:
            raise ValueError(f"request id {request_id!r} is already in use")
        n_prompt = len(prompt_token_ids)
        if n_prompt == 0:
            raise ValueError("the prompt is empty")
        if n_prompt >= self.max_model_len:
            raise PromptTooLongError(
                f"the prompt has {n_prompt} tokens; this model's context is {self.max_model_len} "
                f"tokens, which must also hold at least one generated token")
        vocab = self.model_config.vocab_size
        if min(prompt_token_ids) < 0 or max(prompt_token_ids) >= vocab:
            raise ValueError(f"prompt token ids must be in [0, {vocab})")
        room = self.max_model_len - n_prompt
        max_tokens = room if params.max_tokens is None else min(params.max_tokens, room)
        children = []
        for i in range(params.n):
            gen = None
            if params.seed is not None:
                # Each of the n completions draws from its own seeded stream.
                gen = torch.Generator(device=self.runner.device).manual_seed(params.seed + i)
            rid = request_id if params.n == 1 else f"{request_id}#{i}"
            children.append(Request(rid, list(prompt_token_ids), params, max_tokens,
                                    self.eos_token_ids, generator=gen))
        self.output_processor.add(request_id, prompt, children, final_only)
        for r in children:
            self.scheduler.add(r)

    def abort_request(self, request_id: str) -> RequestOutput | None:
        """Stop a request now and free its KV blocks; returns its final output if it existed."""
        return self.output_processor.abort(request_id)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished() or self.in_flight is not None

    # ---- the loop -------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Schedule, draft and launch one forward; then apply the step before it (async
        scheduling: the host's work for one step overlaps the device's for the next) or
        this one, and report what changed. A step that drafts (k > 0) reads its requests'
        latest tokens: the step in flight is applied before it is scheduled."""
        k = self.speculator.plan(len(self.scheduler.running))
        outputs = self._apply(self.in_flight) if k and self.in_flight is not None else []
        batch = self.scheduler.schedule(k)
        launched = None if batch.empty else self._launch(batch)
        if self.in_flight is not None:
            outputs += self._apply(self.in_flight)
        self.in_flight = launched
        if launched is not None and not launched.deferred:
            outputs += self._apply(launched)
        return outputs

    def _launch(self, batch: SchedulerOutput) -> LaunchedStep:
        self.speculator.propose(batch)       # drafts into the room the scheduler left
        # One forward (prefill, decode and verify) and the sampler; deferred under async
        # scheduling, its pending inputs taken on the device from the step in flight.
        step = self.runner.launch(batch, self.in_flight, defer=self.async_scheduling)
        self.speculator.launched(step)
        return step

    def _apply(self, step: LaunchedStep) -> list[RequestOutput]:
        """Wait for a launched step's tokens, apply them, and turn them into outputs."""
        self.in_flight = None if step is self.in_flight else self.in_flight
        result = step.resolve()
        touched = self.scheduler.update(step.batch, result.sampled)
        self.speculator.observe(step.batch, result)
        return self.output_processor.process(touched, result)

    def spec_stats(self) -> dict:
        """Speculative decoding counters: acceptance per position, mean accepted length..."""
        return self.speculator.stats_dict()
