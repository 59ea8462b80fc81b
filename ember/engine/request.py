"""A request's state as the engine sees it: phase-free, counted in computed tokens."""
from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from ember.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Request:
    """`token_ids` is prompt + output so far; `num_computed_tokens` of them have K/V in the cache.

    There is no prefill/decode phase: a step computes some of the tokens not yet computed,
    and when it reaches the last one the sampler appends a new token.
    """

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    max_tokens: int                       # resolved against the context length
    eos_token_ids: frozenset[int] = frozenset()
    token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    # Async scheduling: a step is scheduled before the previous one's tokens reach the
    # host. Tokens a launched, not yet applied step computes, and tokens it samples (still
    # on the device); both are 0 between steps when scheduling is synchronous.
    num_inflight_tokens: int = 0
    num_pending_samples: int = 0
    block_ids: list[int] = field(default_factory=list)
    status: RequestStatus = RequestStatus.WAITING
    finish_reason: str | None = None      # "stop" | "length" | "abort"
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it
    generator: torch.Generator | None = None
    logprobs: list[dict[int, Any]] | None = None         # per output token (when asked)
    prompt_logprobs: list[dict[int, Any] | None] | None = None
    cumulative_logprob: float = 0.0
    num_preemptions: int = 0
    num_cached_tokens: int | None = None  # prompt tokens found in the prefix cache at first admission
    prefix_handle: Any = None             # the prefix-cache path this request holds locked
    num_overtaken: int = 0                # later arrivals admitted before it (cache-aware scheduling)
    arrival_time: float = field(default_factory=time.monotonic)
    first_token_time: float | None = None

    def __post_init__(self) -> None:
        if not self.token_ids:
            self.token_ids = list(self.prompt_token_ids)
        if self.params.logprobs is not None:
            self.logprobs = []
        if self.params.prompt_logprobs is not None:
            self.prompt_logprobs = [None]  # the first prompt token has no context to score it

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def samples_without_history(self) -> bool:
        """Its next token can be drawn, and the step applied later, without the host
        knowing its latest tokens: no penalties or min_tokens read the output, and no
        logprobs need bringing back. Async scheduling runs ahead only over such requests."""
        p = self.params
        return (p.repetition_penalty == 1.0 and p.frequency_penalty == 0.0
                and p.presence_penalty == 0.0 and self.num_output_tokens >= p.min_tokens
                and p.logprobs is None and p.prompt_logprobs is None)

    @property
    def finished(self) -> bool:
        return self.status is RequestStatus.FINISHED

    def check_stop(self, token: int, max_model_len: int) -> None:
        """Decide whether the token just appended ends the request."""
        p = self.params
        if self.num_output_tokens >= p.min_tokens:
            if token in (p.stop_token_ids or ()):
                self.finish("stop", token)
                return
            if not p.ignore_eos and token in self.eos_token_ids:
                self.finish("stop")
                return
        if self.num_output_tokens >= self.max_tokens or self.num_tokens >= max_model_len:
            self.finish("length")

    def finish(self, reason: str, stop_reason: int | str | None = None) -> None:
        self.status = RequestStatus.FINISHED
        self.finish_reason = reason
        self.stop_reason = stop_reason
