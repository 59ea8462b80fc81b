"""Timing a captured CUDA graph: the one measurement several GPU benchmarks share."""
from __future__ import annotations

from typing import Callable

import torch


def capture(fn: Callable[[], object], calls: int, warmup: int = 3) -> torch.cuda.CUDAGraph:
    """A CUDA graph of `calls` back-to-back calls of fn, captured after `warmup` calls on a
    side stream (Triton compiles, tuners and cuBLAS heuristics run there, not in the graph)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    return graph


def graph_replay_ms(graph: torch.cuda.CUDAGraph, reps: int) -> float:
    """Milliseconds per replay of `graph`, averaged over `reps` back-to-back replays after
    one warm replay (CUDA events, so host launch time is not counted)."""
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps
