"""Per-request sampling parameters, shaped like vLLM's ``SamplingParams``.

Field names, defaults and meanings follow vLLM so that code written against vLLM's
offline API runs unchanged. ``__post_init__`` validates every field and normalizes a
few of them (``stop`` and ``stop_token_ids`` become lists, ``top_k=0`` becomes ``-1``,
and greedy requests get neutral top-k / top-p / min-p, as vLLM does).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

# A temperature below this is treated as greedy decoding (vLLM uses the same bound).
SAMPLING_EPS = 1e-5


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass
class SamplingParams:
    """How to sample the tokens of one request.

    Attributes:
        n: number of completions to return for the prompt.
        temperature: logits are divided by it; below ``1e-5`` means greedy (argmax).
        top_p: keep the smallest set of most likely tokens whose probability mass is
            at least ``top_p``; 1.0 disables it.
        top_k: keep the ``top_k`` most likely tokens; ``-1`` (or ``0``) disables it.
        min_p: drop tokens whose probability is below ``min_p`` times the most likely
            token's probability; 0.0 disables it.
        presence_penalty: subtracted once from the logit of every token that already
            appears in the output (not the prompt); in [-2, 2].
        frequency_penalty: subtracted from a token's logit once per occurrence in the
            output (not the prompt); in [-2, 2].
        repetition_penalty: tokens seen in the prompt or output have positive logits
            divided by it and negative logits multiplied by it; 1.0 disables it.
        seed: if set, this request draws its randomness from its own generator, so it
            gets the same tokens whatever else is batched with it.
        stop: strings that end generation when they appear in the output text.
        stop_token_ids: token ids that end generation.
        include_stop_str_in_output: keep the matched stop string in the output text.
        ignore_eos: do not stop at the end-of-sequence token.
        max_tokens: most tokens to generate; ``None`` means up to the context length.
        min_tokens: fewest tokens to generate before EOS or a stop token may be sampled.
        logprobs: number of top log-probabilities to return per generated token
            (the sampled token's own log-probability is always returned as well).
        prompt_logprobs: number of top log-probabilities to return per prompt token.
        skip_special_tokens: drop special tokens when detokenizing.
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    max_tokens: int | None = 16
    min_tokens: int = 0
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True

    def __post_init__(self) -> None:
        self._normalize()
        self._validate()
        if self.greedy:
            # Filtering cannot change an argmax; neutral values keep greedy rows off
            # the sampler's sorting paths.
            self.top_p = 1.0
            self.top_k = -1
            self.min_p = 0.0

    def _normalize(self) -> None:
        if self.stop is None:
            self.stop = []
        elif isinstance(self.stop, str):
            self.stop = [self.stop]
        else:
            self.stop = list(self.stop)
        self.stop_token_ids = [] if self.stop_token_ids is None else list(self.stop_token_ids)
        if self.top_k == 0:
            self.top_k = -1
        self.temperature = float(self.temperature) if _is_number(self.temperature) else self.temperature
        self.top_p = float(self.top_p) if _is_number(self.top_p) else self.top_p
        self.min_p = float(self.min_p) if _is_number(self.min_p) else self.min_p

    def _validate(self) -> None:
        if not _is_int(self.n) or self.n < 1:
            raise ValueError(f"n must be an integer >= 1, got {self.n!r}.")
        _check_number("temperature", self.temperature)
        if self.temperature < 0.0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}.")
        _check_number("top_p", self.top_p)
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}.")
        if not _is_int(self.top_k) or self.top_k < -1:
            raise ValueError(
                f"top_k must be an integer >= 1, or -1 / 0 to disable it, got {self.top_k!r}."
            )
        _check_number("min_p", self.min_p)
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}.")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            _check_number(name, value)
            if not -2.0 <= value <= 2.0:
                raise ValueError(f"{name} must be in [-2, 2], got {value}.")
        _check_number("repetition_penalty", self.repetition_penalty)
        if not self.repetition_penalty > 0.0:
            raise ValueError(
                f"repetition_penalty must be > 0, got {self.repetition_penalty}."
            )
        if self.seed is not None and not _is_int(self.seed):
            raise ValueError(f"seed must be an integer or None, got {self.seed!r}.")
        if self.max_tokens is not None and (not _is_int(self.max_tokens) or self.max_tokens < 1):
            raise ValueError(f"max_tokens must be an integer >= 1 or None, got {self.max_tokens!r}.")
        if not _is_int(self.min_tokens) or self.min_tokens < 0:
            raise ValueError(f"min_tokens must be an integer >= 0, got {self.min_tokens!r}.")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(
                f"min_tokens ({self.min_tokens}) must be <= max_tokens ({self.max_tokens})."
            )
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and (not _is_int(value) or value < 0):
                raise ValueError(f"{name} must be an integer >= 0 or None, got {value!r}.")
        for s in self.stop:
            if not isinstance(s, str) or not s:
                raise ValueError(f"stop must hold non-empty strings, got {s!r}.")
        for t in self.stop_token_ids:
            if not _is_int(t) or t < 0:
                raise ValueError(f"stop_token_ids must hold integers >= 0, got {t!r}.")

    @property
    def greedy(self) -> bool:
        """True when the request decodes greedily (temperature below ``1e-5``)."""
        return self.temperature < SAMPLING_EPS


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_number(name: str, value: object) -> None:
    if not _is_number(value) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}.")
