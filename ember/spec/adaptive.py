"""Adaptive speculation: choose k each step so that speculation is never slower than none.

Two online estimates drive the choice:

- acceptance: an EMA of the conditional acceptance a_j = P(draft j accepted | drafts
  before it accepted), per draft position. With alpha_j = a_1 ... a_j, a speculating
  request expects E(k) = 1 + alpha_1 + ... + alpha_k tokens per step.
- cost: a step's time as a + b * (tokens in the forward), fitted by exponentially
  weighted least squares on the steps the engine has run, separately for steps without
  drafts (prefill chunks, plain decode) and with drafts, plus the proposer's measured
  time per draft step as c + d * batch.

For a batch of B decoding requests, k maximises B * E(k) / (t(B (k + 1)) + k t_draft(B))
(for a tree of depth k, B (k + 1) becomes B (budget(k) + 1), and k t_draft the proposer's
forwards for it).
Speculation runs only when the best k beats k = 0 by a margin; otherwise it is off. It
is also off until a step without drafts of about the batch's size has been timed: the
plain step's cost is what speculation must beat, a line fitted on much smaller steps
extrapolates it badly (its slope is mostly noise), and a wrong estimate would never be
corrected, since plain steps are not timed while speculating. At
large batch the forward is compute-bound (b * B dominates), so the extra k * B verify
tokens cost about what they gain and k falls to 0; at batch 1 a forward costs about the
same for 1 or k + 1 tokens and speculation wins whenever drafts get accepted. While off,
a rare probe keeps the acceptance estimate current (see `probe_every`): at the k that
would pay best if drafts were good, so every position's acceptance gets measured (a
one-draft probe could never show that a deep tree pays where a shallow one does not);
and while on, a rare step without drafts keeps the plain step's cost current. The
acceptance average weighs its first observations as a plain mean (the prior counts as
one), so a few probes replace the prior rather than nudge it.

What a step costs is its share of the engine's wall time: the interval between the end of
the previous step's apply and the end of its own (ember.spec.step_clock), so both fits
count everything the loop does per step, scheduling and outputs included. Under async
scheduling a plain step's steady interval is the pipelined cost (its host work hidden
behind the device's), while a drafting step runs synchronously: the step in flight is
applied first (the pipeline drains) and the steps after it start the pipeline again. The
intervals of those transitions differ from a plain step's cost by what leaving the
pipeline cost; that difference is added to the drafting step's cost (`observe_applied`),
so the comparison is between what a plain step costs when none drafts and everything a
drafting step costs.
"""
from __future__ import annotations

from typing import Callable


class _LinearFit:
    """Exponentially weighted least squares fit y = a + b x."""

    def __init__(self, decay: float, prior_a: float, prior_b: float, min_spread: float = 0.0) -> None:
        self.decay = decay
        self.min_spread = min_spread   # past its data, the slope is trusted once x spans this
        self.s = [0.0] * 5   # sum w, w x, w y, w x^2, w x y
        self.prior = (prior_a, prior_b)
        self.x_min, self.x_max = float("inf"), 0.0   # the range of x observed

    def add(self, x: float, y: float) -> None:
        s = [v * self.decay for v in self.s]
        self.s = [s[0] + 1, s[1] + x, s[2] + y, s[3] + x * x, s[4] + x * y]
        self.x_min, self.x_max = min(self.x_min, x), max(self.x_max, x)

    def coef(self) -> tuple[float, float]:
        w, sx, sy, sxx, sxy = self.s
        if w < 1e-9:
            return self.prior
        var = sxx / w - (sx / w) ** 2
        if var <= 1e-9 * max(1.0, (sx / w) ** 2):
            # One batch size seen so far: keep the prior's slope ratio, scaled to the data.
            a0, b0 = self.prior
            mean_x, mean_y = sx / w, sy / w
            scale = mean_y / max(a0 + b0 * mean_x, 1e-12)
            return a0 * scale, b0 * scale
        b = (sxy / w - (sx / w) * (sy / w)) / var
        b = max(b, 0.0)
        return max(sy / w - b * sx / w, 0.0), b

    @property
    def has_data(self) -> bool:
        return self.s[0] > 1e-9

    def __call__(self, x: float) -> float:
        a, b = self.coef()
        if self.has_data and x > self.x_max and self.x_max - self.x_min < self.min_spread:
            # Past x observed only within a few tokens: the prior's shape from the largest
            # x observed instead of their slope.
            a0, b0 = self.prior
            return (a + b * self.x_max) * (a0 + b0 * x) / (a0 + b0 * self.x_max)
        return a + b * x


class AdaptiveK:
    """Per-step choice of the number of draft tokens k in [0, k_max]."""

    def __init__(self, k_max: int, margin: float = 1.1, ema: float = 0.03,
                 prior_acceptance: float = 0.6, probe_every: int = 64,
                 slots: Callable[[int], int] = lambda k: k,
                 forwards: Callable[[int], int] = lambda k: k, retime_steps: int = 1) -> None:
        self.k_max = k_max
        # A step of k drafts (a tree: of depth k) costs slots(k) verified tokens per request
        # and forwards(k) proposer forwards (a chain: k and k; an EAGLE tree: its node
        # budget and k - 1 levels; P-EAGLE: one forward for every position).
        self.slots, self.forwards = slots, forwards
        # Acceptance is only measured while speculating: after probe_every steps off, one
        # step drafts a single token if drafts as good as 90% acceptance would pay at this
        # batch size (so at most 1/probe_every of steps pay for a probe, and never where
        # even good drafts lose), letting a recovered acceptance turn speculation back on.
        self.probe_every = probe_every
        self.steps_off = 0
        # Likewise plain steps are only timed while off: after probe_every steps on, one
        # step goes without drafts, so a plain cost timed under other conditions (another
        # load on a shared machine, a warm-up at another batch size) cannot keep
        # speculation on for good. Under async scheduling that takes 3 plain steps in a
        # row (the pipeline refills, one steady step, it drains): `retime_steps`.
        self.steps_on = 0
        self.retime_steps = retime_steps
        self.retime_left = 0
        self.margin = margin
        # Per request verdict: one sample of a noisy 0/1 outcome. At 0.1 the average's
        # swings crossed the on/off line at batch 1, and once off it learns only from
        # probes (tests/test_spec_adaptive.py, the noise test); 0.03 halves in ~23 verdicts.
        self.ema = ema
        self.accept = [prior_acceptance] * k_max   # conditional acceptance per position
        self._seen = [1] * k_max                   # observations per position (the prior: one)
        # Prior shapes (rescaled to the first measurements): a step of x tokens costs
        # 1 + x / 64 units, a draft step for B requests 0.2 + B / 256.
        # Steps with drafts and steps without are fitted apart: they may run differently
        # (on CUDA a plain decode step replays a CUDA graph, a verify step runs eagerly).
        # The plain fit's slope is trusted past its data only once its steps span 8 tokens:
        # batch-1 and -2 decode steps differ by noise, and that slope, stretched to a
        # 49-token verify as its lower bound, said 25 ms where 1.1 was true (the H200).
        self.target = _LinearFit(0.97, 1.0, 1.0 / 64, min_spread=8)   # steps without drafts
        self.target_spec = _LinearFit(0.97, 1.0, 1.0 / 64)   # steps with drafts
        self.draft = _LinearFit(0.97, 0.2, 1.0 / 256)
        self.plain_max_tokens = 0   # the largest step without drafts timed so far
        self.last_k = 0
        # observe_applied: a drafting step's (tokens, seconds) until the step after it
        # shows whether the pipeline refilled, and the pipeline transitions' extra cost so
        # far, for the next drafting step (None: some was not measurable).
        self._held: tuple[int, float] | None = None
        self._entry: float | None = 0.0

    def expected_tokens(self, k: int, accept: list[float] | None = None) -> float:
        total, alpha = 1.0, 1.0
        for j in range(k):
            alpha *= (accept or self.accept)[j]
            total += alpha
        return total

    def choose(self, batch_size: int) -> int:
        if batch_size <= 0 or 2 * self.plain_max_tokens < batch_size or self.retime_left > 0:
            # Plain steps of this size not timed yet (this one will be), or re-timing them.
            self.retime_left = max(0, self.retime_left - 1)
            self.last_k = 0
            return 0
        plain = self.target
        spec = self.target_spec if self.target_spec.has_data else plain
        base = batch_size / max(plain(batch_size), 1e-12)
        best_k, best = 0, base * self.margin
        for k in range(1, self.k_max + 1):
            rate = batch_size * self.expected_tokens(k) / self._step_cost(batch_size, k, plain, spec)
            if rate > best:
                best_k, best = k, rate
        if best_k > 0:
            self.steps_off = 0
            self.steps_on += 1
            if self.steps_on >= self.probe_every:
                self.steps_on = 0
                self.retime_left = self.retime_steps - 1
                best_k = 0
        else:
            self.steps_on = 0
            self.steps_off += 1
            if self.steps_off >= self.probe_every:
                # Probe at the k that would pay best with drafts accepted 90% of the time and
                # verify tokens at a plain step's price, if any would: never where even good
                # drafts lose (a compute-bound forward), and not kept off for good by a
                # verify-cost fit that a few early drafting steps made steep.
                good = [0.9] * self.k_max
                rates = [batch_size * self.expected_tokens(k, good) / self._probe_cost(batch_size, k)
                         for k in range(1, self.k_max + 1)]
                probe = max(range(self.k_max), key=lambda i: rates[i])
                if rates[probe] > base * self.margin:
                    self.steps_off = 0
                    best_k = probe + 1
        self.last_k = best_k
        return best_k

    def _step_cost(self, batch_size: int, k: int, plain: _LinearFit, spec: _LinearFit) -> float:
        # A verify step of x tokens costs at least a plain step of x tokens: the plain fit
        # (timed at every batch size served) bounds a verify fit that has seen one batch
        # size only (hundreds of batch-1 drafting steps make it flat, and extrapolated to
        # batch 64 it priced 1,600 verify tokens like 25).
        x = batch_size * (self.slots(k) + 1)
        t = max(spec(x), plain(x)) + self.forwards(k) * self._draft_step(batch_size, plain)
        return max(t, 1e-12)

    def _probe_cost(self, batch_size: int, k: int) -> float:
        """A probe's price: where verify steps this large were timed, what they cost (a
        CPU's 49-token verify at ten plain steps: no more probes); where not, a plain step
        of as many tokens (a probe is how the cost gets measured)."""
        x = batch_size * (self.slots(k) + 1)
        measured = self.target_spec.has_data and self.target_spec.x_max >= x
        return self._step_cost(batch_size, k, self.target, self.target_spec if measured else self.target)

    def _draft_step(self, batch_size: int, target: _LinearFit) -> float:
        """Seconds per draft step; before any is measured, a tenth of a target step (the
        priors are in arbitrary units, the target fit is in seconds once steps ran)."""
        if self.draft.has_data:
            return self.draft(batch_size)
        return 0.1 * target(batch_size)

    def observe_acceptance(self, num_drafts: int, num_accepted: int) -> None:
        """Update a_j for the positions this verification reached."""
        for j in range(min(num_drafts, num_accepted + 1)):
            hit = 1.0 if j < num_accepted else 0.0
            self._seen[j] += 1
            self.accept[j] += max(self.ema, 1.0 / self._seen[j]) * (hit - self.accept[j])

    def observe_step(self, num_tokens: int, seconds: float, speculative: bool = False) -> None:
        (self.target_spec if speculative else self.target).add(num_tokens, seconds)
        if not speculative:
            self.plain_max_tokens = max(self.plain_max_tokens, num_tokens)

    def observe_applied(self, num_tokens: int | None, seconds: float | None, speculative: bool,
                        steady: bool) -> None:
        """One applied step's interval (ember.spec.step_clock): num_tokens in its forward if
        every request decoded (None: another regime, not fitted), seconds (a drafting step's
        without its proposer's time; None: not timed), and whether the interval was steady.
        Steady plain steps go to the plain fit. A drafting step goes to its fit with the
        extra cost of the transitions next to it (interval minus the plain fit's estimate):
        those before it (the pipeline drained) and the one after it (it refilled), so it
        is held until the next step is applied; without a measurable transition cost it is
        left out."""
        timed = num_tokens is not None and seconds is not None
        if speculative:
            self._release(0.0)   # a drafting step after it: no refill to charge
            if timed and steady and self._entry is not None:
                self._held = (num_tokens, seconds + self._entry)
            self._entry = 0.0
            return
        if steady:
            self._release(0.0)
            self._entry = 0.0
            if timed:
                self.observe_step(num_tokens, seconds)
            return
        extra = seconds - self.target(num_tokens) if timed and self.target.has_data else None
        if self._held is not None:
            self._release(extra)
        elif self._entry is not None:
            self._entry = None if extra is None else self._entry + extra

    def _release(self, extra: float | None) -> None:
        """Fit the held drafting step with `extra` seconds added (None: leave it out)."""
        if self._held is not None and extra is not None:
            tokens, seconds = self._held
            self.observe_step(tokens, seconds + extra, speculative=True)
        self._held = None

    def observe_draft(self, batch_size: int, seconds_per_step: float) -> None:
        self.draft.add(batch_size, seconds_per_step)
