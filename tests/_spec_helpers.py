"""Pieces the speculative-decoding tests share: the mixed-batch sampling parameters and a
recorder of what kinds of requests each engine step ran together."""
from __future__ import annotations

from typing import Callable

from ember import LLM, SamplingParams


def mixed_batch_params(n: int) -> list[SamplingParams]:
    """Greedy, 24 tokens each; every third request asks for prompt logprobs, which never
    speculates, so speculating and ordinary requests share steps."""
    return [SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True,
                           prompt_logprobs=1 if i % 3 == 0 else None) for i in range(n)]


def record_step_kinds(llm: LLM, kind: Callable) -> list[frozenset]:
    """Wrap the runner so each executed step appends the set of kind(s) of its scheduled
    requests; returns the list it fills."""
    seen: list[frozenset] = []
    launch = llm.engine.runner.launch

    def recording(batch, *args, **kwargs):
        seen.append(frozenset(kind(s) for s in batch.scheduled))
        return launch(batch, *args, **kwargs)
    llm.engine.runner.launch = recording
    return seen
