"""N-gram drafting (prompt lookup): continue the sequence the way it continued the last
time its final n tokens appeared. Free to run, strong on text that repeats its input
(summaries, code edits, extraction), useless on free generation."""
from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from ember.engine.scheduler import SchedulerOutput
from ember.spec.proposer import Proposer


def ngram_lookup(tokens: list[int], k: int, n_min: int, n_max: int) -> list[int]:
    """Up to k tokens that followed the most recent earlier occurrence of the longest
    suffix of `tokens` of length in [n_min, n_max]; [] when none occurs."""
    arr = np.asarray(tokens, dtype=np.int64)
    size = len(arr)
    for n in range(min(n_max, size - 1), n_min - 1, -1):
        suffix = arr[size - n:]
        # Windows starting at 0 .. size-1-n: all end before the suffix's last token, so
        # each match has at least one token after it.
        windows = sliding_window_view(arr[:size - 1], n)  # [size - n, n]
        hits = np.flatnonzero((windows == suffix).all(axis=1))
        if hits.size:
            start = int(hits[-1]) + n
            return arr[start:start + k].tolist()
    return []


class NgramProposer(Proposer):
    name = "ngram"

    def __init__(self, n_min: int, n_max: int) -> None:
        self.n_min, self.n_max = n_min, n_max

    def propose(self, batch: SchedulerOutput) -> None:
        for s in batch.scheduled:
            if s.num_spec_slots > 0:
                s.spec_token_ids = ngram_lookup(s.request.token_ids, s.num_spec_slots,
                                                self.n_min, self.n_max)
                s.spec_probs = None
