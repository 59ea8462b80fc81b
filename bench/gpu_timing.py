"""Timing a captured CUDA graph: the one measurement several GPU benchmarks share."""
from __future__ import annotations

import torch


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
