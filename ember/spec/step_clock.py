"""Wall time per applied step, for the adaptive controller (ember.spec.adaptive).

A step's time is the interval from the end of the previous step's apply to the end of its
own (Engine._apply), so the intervals add up to the engine's wall time whatever runs in
them: scheduling, drafting, launching, the forward, the wait for tokens, the outputs.
That holds with and without async scheduling; what an interval holds differs:

- In steady state it holds exactly one launch: a synchronous step's own (its forward and
  sampling run inside it), or, for a deferred step under async scheduling, its
  successor's, deferred too (the host prepares step N + 1 while the device runs N). Such
  an interval is what the step costs as the loop runs: it is `steady`.
- Around a synchronous step in a stream of deferred ones (a drafting step, or a plain step
  that needs its history) the pipeline drains and refills: the deferred step before it is
  applied with no launch in its interval (short: the synchronous step's preparation falls
  in its own interval, with the device idle), the first deferred step after it holds two
  launches (long: the host prepares two steps before the device is busy again). These
  intervals are not what a plain step costs; what they differ by is the price of leaving
  the pipeline, which the controller charges to the drafting step beside them
  (AdaptiveK.observe_applied).
"""
from __future__ import annotations

import time
from collections import deque


class StepClock:
    """Times applied steps and tells steady intervals from pipeline transitions. Steps are
    applied in launch order (Engine.step)."""

    def __init__(self) -> None:
        self._last: float | None = None   # end of the last apply; None: nothing to time from
        self._applies = 0
        # Per launched step not yet applied: (deferred at launch, applies before its launch).
        self._pending: deque[tuple[bool, int]] = deque()
        self._since: list[bool] = []      # launches since the last apply: deferred or not

    def restart(self) -> None:
        """Time nothing before now (the engine was idle: the gap is no step's cost)."""
        self._last = None

    def launched(self, deferred: bool) -> None:
        self._pending.append((deferred, self._applies))
        self._since.append(deferred)

    def applied(self) -> tuple[float | None, bool]:
        """The step launched first and not yet applied has been applied: the interval since
        the last apply (None after a restart) and whether it is steady (see the module)."""
        now = time.perf_counter()
        seconds = None if self._last is None else now - self._last
        deferred, applies_before = self._pending.popleft()
        if deferred:   # launched before the last apply; since then, its successor ran ahead
            steady = applies_before < self._applies and self._since == [True]
        else:          # launched after the last apply, and nothing else since
            steady = applies_before == self._applies and self._since == [False]
        self._last, self._applies, self._since = now, self._applies + 1, []
        return seconds, steady
