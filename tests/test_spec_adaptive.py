"""Adaptive speculation: k from measured acceptance and step cost, off at large batch;
step timing under async scheduling (the pipeline's transitions charged to drafting steps);
and the acceptance statistics."""
from __future__ import annotations

from ember.spec import step_clock
from ember.spec.adaptive import AdaptiveK
from ember.spec.stats import SpecStats
from ember.spec.step_clock import StepClock


def feed(ctl: AdaptiveK, cost, draft_cost, accept_prob: float, k: int = 4, n: int = 400) -> None:
    """Synthetic history: steps of many sizes timed by `cost(tokens)`, draft steps by
    `draft_cost(batch)`, and verifications accepting each draft with accept_prob."""
    for i in range(n):
        tokens = 1 + (i * 37) % 300
        ctl.observe_step(tokens, cost(tokens), speculative=i % 2 == 1)
        batch = 1 + (i * 13) % 64
        ctl.observe_draft(batch, draft_cost(batch))
        # Deterministic acceptance pattern with the right frequency per position.
        accepted = 0
        while accepted < k and ((i * 7919 + accepted * 104729) % 1000) / 1000 < accept_prob:
            accepted += 1
        ctl.observe_acceptance(k, accepted)


def memory_bound(tokens: int) -> float:      # a GPU-like step: flat until ~256 tokens
    return 10.0 + 0.01 * tokens


def compute_bound(tokens: int) -> float:     # a CPU-like step: cost per token dominates
    return 2.0 + 1.0 * tokens


def test_speculates_fully_at_batch_1_when_forward_cost_is_flat() -> None:
    ctl = AdaptiveK(4)
    feed(ctl, memory_bound, lambda b: 0.2 + 0.01 * b, accept_prob=0.9)
    assert ctl.choose(1) == 4
    assert 0.8 < ctl.accept[0] < 0.97


def test_off_at_large_batch_when_forward_is_compute_bound() -> None:
    ctl = AdaptiveK(4)
    feed(ctl, compute_bound, lambda b: 0.1 * b, accept_prob=0.7)
    assert ctl.choose(64) == 0
    # At batch 1 the fixed cost still dominates: some speculation pays.
    assert ctl.choose(1) >= 1


def test_off_when_drafts_are_never_accepted() -> None:
    ctl = AdaptiveK(4)
    feed(ctl, memory_bound, lambda b: 1.0, accept_prob=0.0)
    assert all(ctl.choose(b) == 0 for b in (1, 8, 64))


def test_k_shrinks_as_batch_grows() -> None:
    ctl = AdaptiveK(4)
    feed(ctl, lambda t: 10.0 + 0.2 * t, lambda b: 0.5 + 0.02 * b, accept_prob=0.75)
    ks = [ctl.choose(b) for b in (1, 8, 32, 64, 256)]
    assert ks == sorted(ks, reverse=True) and ks[0] > ks[-1] and ks[-1] == 0


def test_expected_tokens_and_stats() -> None:
    ctl = AdaptiveK(3, prior_acceptance=0.5)
    assert ctl.expected_tokens(0) == 1.0
    assert ctl.expected_tokens(3) == 1 + 0.5 + 0.25 + 0.125
    st = SpecStats()
    st.record(3, 3, 4)
    st.record(3, 1, 2)
    st.record(2, 0, 1)
    d = st.as_dict()
    assert d["num_draft_tokens"] == 8 and d["num_accepted_tokens"] == 4
    assert d["acceptance_rate"] == 0.5
    assert d["acceptance_rate_per_position"] == [2 / 3, 1 / 3, 1 / 2]
    assert d["mean_accepted_length"] == 7 / 3


def test_verify_steps_slower_than_plain_steps_turn_speculation_off() -> None:
    """On CUDA, plain decode replays a graph and verify runs eagerly: the controller must
    compare against the measured plain step, not extrapolate from verify steps."""
    ctl = AdaptiveK(4)
    for i in range(200):
        b = 1 + i % 16
        ctl.observe_step(b, 1.0 + 0.01 * b, speculative=False)           # graph replay
        ctl.observe_step(b * 4, 5.0 + 0.01 * b * 4, speculative=True)    # eager, 5x overhead
        ctl.observe_draft(b, 0.1)
        ctl.observe_acceptance(4, 2)
    assert ctl.choose(1) == 0


def test_probes_after_a_long_off_stretch_only_where_drafts_could_pay() -> None:
    ctl = AdaptiveK(4, probe_every=10)
    feed(ctl, memory_bound, lambda b: 0.2, accept_prob=0.0)    # drafts useless so far
    picks = [ctl.choose(1) for _ in range(30)]
    assert picks.count(4) == 3 and picks.count(0) == 27          # one probe per 10 steps, at the k that pays best
    # Accepted probes bring the estimate (and speculation) back.
    for _ in range(20):
        ctl.observe_acceptance(4, 4)
    assert ctl.choose(1) >= 2
    # Where even 90% acceptance would lose (compute-bound, large batch) it never probes.
    ctl = AdaptiveK(4, probe_every=10)
    feed(ctl, compute_bound, lambda b: 0.1 * b, accept_prob=0.0)
    assert all(ctl.choose(64) == 0 for _ in range(50))


def accepted_batch1_steps(ctl: AdaptiveK, steps: int, spec_seconds: float | None = None) -> list[int]:
    """ctl.choose(1) for `steps` steps with a drafter whose every draft is accepted; with
    spec_seconds each drafting step is also timed at that. Returns the k of each step."""
    picks = []
    for _ in range(steps):
        k = ctl.choose(1)
        picks.append(k)
        if k:
            if spec_seconds is not None:
                ctl.observe_step(ctl.slots(k) + 1, spec_seconds, speculative=True)
            ctl.observe_acceptance(k, k)
    return picks


def test_a_few_deep_probes_turn_a_costly_but_accurate_tree_on() -> None:
    """Batch 1 on a GPU: a verify step costs 3.2 plain steps (drafter, tree, host work), so
    only a deep tree whose drafts are mostly right pays. Off at first (the 0.6 prior says
    it would not); the probes draft at the depth that would pay and, accepted, turn
    speculation on within a few probes (a one-draft probe never measures the depths
    that decide it)."""
    ctl = AdaptiveK(5, probe_every=8)
    for _ in range(20):
        ctl.observe_step(1, 1.0)
    for _ in range(5):
        ctl.observe_step(25, 3.2, speculative=True)
        ctl.observe_draft(1, 0.05)
    picks = accepted_batch1_steps(ctl, 8 * 6)
    assert picks[0] == 0 and picks[7] == 5          # off, then a probe at the full depth
    assert picks[-8:] == [5] * 8 or picks[-8:].count(5) == 7, picks   # on (one re-timing step in probe_every)


def test_a_steep_early_verify_fit_does_not_stop_the_probes() -> None:
    """Batch 1: two early drafting steps timed 2.5 s at 11 tokens and 4.0 s at 16 (noise: a
    GPU verify costs about the same at either) give the verify fit a slope that prices a
    25-token tree at 6.7 s, and their drafts did poorly. Probes are still decided at plain
    prices, so one comes, at the full depth; timed at what it costs (2.2 s) and accepted,
    a few of them turn speculation on."""
    ctl = AdaptiveK(5, probe_every=8, slots=lambda k: 5 * k)
    for _ in range(20):
        ctl.observe_step(1, 1.0)
    ctl.observe_step(11, 2.5, speculative=True)
    ctl.observe_step(16, 4.0, speculative=True)
    ctl.observe_draft(1, 0.2)
    ctl.observe_acceptance(3, 0)
    picks = accepted_batch1_steps(ctl, 8 * 8, spec_seconds=2.2)
    assert picks[0] == 0 and picks[7] == 5, picks
    assert picks[-8:].count(5) >= 7, picks


def test_stays_on_where_the_mean_pays_despite_per_request_noise() -> None:
    """Batch 1, a depth-5 tree accepted 93 / 76 / 77 / 69 / 80% per position (conditional):
    3.9 tokens a step at 2.2 ms against plain steps of 0.86 ms, 1.6x with margin to spare.
    Each step gives one request's verdict, a noisy sample; an average that follows single
    samples too closely dips below the threshold now and then, and once off it learns
    only from a probe every 64 steps (the H200's interleaved runs: on for 20-50% of the
    steps). It must stay on nearly throughout."""
    import random
    rng = random.Random(0)
    accept = [0.93, 0.76, 0.77, 0.69, 0.8]
    ctl = AdaptiveK(5, slots=lambda k: min(24, max(k, -(-24 * k // 5))), forwards=lambda k: 1)
    on = 0
    for step in range(1500):
        k = ctl.choose(1)
        if k == 0:
            ctl.observe_step(1, 0.00086)
            continue
        on += step >= 300
        ctl.observe_step(ctl.slots(k) + 1, 0.0019 + 0.0000075 * (ctl.slots(k) + 1), speculative=True)
        ctl.observe_draft(1, 0.0003)
        n = 0
        while n < k and rng.random() < accept[n]:
            n += 1
        ctl.observe_acceptance(k, n)
    assert on >= 0.9 * 1200, on


TOP4_48 = dict(slots=lambda k: max(k, min(-(-48 * k // 6), 4 + (k - 1) * 16)), forwards=lambda k: min(k, 1))


def probe_run(ctl: AdaptiveK, steps: int, plain_s: float, verify_s: float) -> list[int]:
    """Batch-1 steps: plain ones timed at plain_s, drafting ones at verify_s with every
    draft accepted. Returns each step's k."""
    picks = []
    for _ in range(steps):
        k = ctl.choose(1)
        picks.append(k)
        if k:
            ctl.observe_step(ctl.slots(k) + 1, verify_s, speculative=True)
            ctl.observe_acceptance(k, k)
        else:
            ctl.observe_step(1, plain_s)
    return picks


def test_a_noisy_warm_up_slope_does_not_price_probes_out() -> None:
    """The H200, batch 1, depth-6 / 48-node trees (a 49-token verify at 2.5 ms, plain 1.07
    ms): the plain fit starts from warm-up steps of 1 and 2 tokens whose noise gives a
    slope of 0.5 ms a token, 25 ms at 49 tokens. Probes are priced no further out than the
    plain steps timed, so one comes at the full depth, and speculation turns on."""
    ctl = AdaptiveK(6, **TOP4_48)
    for _ in range(10):
        ctl.observe_step(1, 0.00107)
        ctl.observe_step(2, 0.00157)
    picks = probe_run(ctl, 300, 0.00107, 0.0025)
    assert 6 in picks[:80], picks[:80]
    assert picks[-50:].count(6) >= 45, picks[-50:]


def test_a_deep_probe_measured_dear_stops_the_probes() -> None:
    """A CPU, batch 1: plain steps 90 ms, a 49-token verify 0.9 s. One probe at the full
    depth (not measured yet, it is priced like a few plain tokens) shows it; the next
    probes are priced at what it cost, and there are none."""
    ctl = AdaptiveK(6, **TOP4_48)
    for _ in range(10):
        ctl.observe_step(1, 0.09)
        ctl.observe_step(2, 0.16)
    picks = probe_run(ctl, 640, 0.09, 0.9)
    assert sum(1 for k in picks if k) <= 2, [k for k in picks if k]


def test_batch_1_speculation_does_not_price_batch_64_verify_steps() -> None:
    """A server alternating batch 1 (a deep tree pays: verify 2.2 ms at 25 tokens, plain
    0.86 ms) and batch 64 (plain 1.6 ms; 1,600 verify tokens cost ~15 ms). Hundreds of
    batch-1 drafting steps leave the verify fit flat in tokens (lone probes of fewer
    tokens cost more, their pipeline transitions charged to them); at batch 64 the plain
    steps' own fit must keep it off."""
    ctl = AdaptiveK(5, slots=lambda k: min(24, max(k, -(-24 * k // 5))), forwards=lambda k: 1)
    for _ in range(30):
        ctl.observe_step(1, 0.00086)
        ctl.observe_step(64, 0.0016)
    for i in range(300):   # steady full trees, and now and then a lone shallow probe, which
        x = 25 if i % 10 else 4 + i % 20   # pays the pipeline's transitions: slope <= 0
        ctl.observe_step(x, 0.0022 if x == 25 else 0.0030, speculative=True)
        ctl.observe_draft(1, 0.0003)
        ctl.observe_acceptance(5, 4)
    assert ctl.choose(1) >= 4
    assert ctl.choose(64) == 0


def test_off_until_a_plain_step_of_about_the_batch_size_was_timed() -> None:
    """A CPU-like step costs 0.03 + 0.017 s a token (verify steps 0.1 s more). Plain steps
    timed only at 1 and 2 tokens, with noise that makes their line steep: extrapolated to
    16 tokens it says 1.05 s where a step costs 0.3 s, so verify steps look cheap beside
    it. The controller must time a plain step at this batch size before it speculates
    (while it speculates no plain step is timed, so it would never learn better), and
    then stay off: drafts accepted a third of the time do not pay here."""
    ctl = AdaptiveK(3)
    for _ in range(3):
        ctl.observe_step(1, 0.093)
        ctl.observe_step(2, 0.157)
        for tokens in (4, 8):
            ctl.observe_step(tokens, 0.13 + 0.017 * tokens, speculative=True)
        ctl.observe_draft(1, 0.016)
        ctl.observe_acceptance(3, 1)
    assert ctl.choose(16) == 0
    ctl.observe_step(16, 0.03 + 0.017 * 16)    # the plain step it chose: the true cost
    assert ctl.choose(16) == 0


def test_a_step_without_drafts_now_and_then_while_speculating() -> None:
    """Plain steps are timed only while off; speculating for good must not freeze their
    cost: one step in probe_every goes without drafts."""
    ctl = AdaptiveK(4, probe_every=10)
    feed(ctl, memory_bound, lambda b: 0.2 + 0.01 * b, accept_prob=0.9)
    picks = [ctl.choose(1) for _ in range(30)]
    assert picks.count(0) == 3 and all(k == 4 for k in picks if k)


def test_re_timing_under_async_scheduling_takes_three_plain_steps_in_a_row() -> None:
    """Under async scheduling a steady plain step needs one before and one after it (the
    pipeline refills, then drains): the step without drafts becomes three."""
    ctl = AdaptiveK(4, probe_every=10, retime_steps=3)
    feed(ctl, memory_bound, lambda b: 0.2 + 0.01 * b, accept_prob=0.9)
    picks = [ctl.choose(1) for _ in range(36)]
    assert picks.count(0) == 9 and all(k == 4 for k in picks if k)
    off = [i for i, k in enumerate(picks) if k == 0]
    assert off == [j + d for j in off[::3] for d in range(3)]   # in runs of three


# ---- step timing under async scheduling -------------------------------------------------------
class FakeClock:
    def __init__(self, monkeypatch) -> None:
        self.now = 0.0
        monkeypatch.setattr(step_clock.time, "perf_counter", lambda: self.now)


def test_step_clock_tells_steady_intervals_from_pipeline_transitions(monkeypatch) -> None:
    """Launches and applies in Engine.step's order. Steady: exactly one launch in the
    interval, the step's own for a synchronous step, the next deferred one's for a deferred
    step. A drain (no launch) and a refill (two) are transitions, as are the neighbours of a
    synchronous plain step inside a deferred stream."""
    fake = FakeClock(monkeypatch)
    clock = StepClock()
    got = []

    def apply() -> None:
        fake.now += 1.0
        got.append(clock.applied()[1])
    # Synchronous steps: launch, apply.
    for _ in range(3):
        clock.launched(False)
        apply()
    assert got == [True, True, True]
    got.clear()
    # Deferred stream: launch N + 1, then apply N; a drafting step drains (apply with no
    # launch), runs synchronously, and the stream restarts (launch, no apply; launch, apply).
    clock.launched(True)
    for _ in range(3):
        clock.launched(True)
        apply()
    apply()                                   # drained
    clock.launched(False)
    apply()                                   # the drafting step
    clock.launched(True)                      # refill: nothing to apply yet
    for _ in range(2):
        clock.launched(True)
        apply()
    assert got == [False, True, True, False, True, False, True]
    got.clear()
    # A synchronous plain step (penalties) launched while a deferred one is in flight.
    clock.launched(False)
    apply()                                   # the deferred one: its interval held a sync forward
    apply()                                   # the synchronous one: no launch in its interval
    clock.launched(True)
    for _ in range(2):
        clock.launched(True)
        apply()
    assert got == [False, False, False, True]
    apply()                                   # the last one in flight
    clock.restart()
    clock.launched(False)
    assert clock.applied() == (None, True)   # nothing timed across an idle gap


def plain_history(ctl: AdaptiveK) -> None:
    """Steady plain steps: 8 decoding requests, 1 s a step."""
    for _ in range(20):
        ctl.observe_applied(8, 1.0, speculative=False, steady=True)


def test_pipeline_transitions_count_against_speculation() -> None:
    """A k = 1 step for 8 requests takes 1.5 s (drafts included) against 1.0 s for a plain
    step, with acceptance 0.9: synchronously that pays (8 * 1.9 / 1.6 s > 1.1 * 8 / 1 s).
    Under async scheduling the step in flight was applied early (0.6 s instead of 1.0) and
    the pipeline refilled after it (1.9 s): 0.5 s more, charged to the drafting step, and
    then it does not pay."""
    sync, pipelined = AdaptiveK(1), AdaptiveK(1)
    for ctl in (sync, pipelined):
        plain_history(ctl)
        ctl.accept = [0.9]
    sync.observe_applied(16, 1.5, speculative=True, steady=True)
    sync.observe_applied(8, 1.0, speculative=False, steady=True)
    assert abs(sync.target_spec(16) - 1.5) < 1e-9 and sync.choose(8) == 1
    pipelined.observe_applied(8, 0.6, speculative=False, steady=False)   # drained
    pipelined.observe_applied(16, 1.5, speculative=True, steady=True)
    assert not pipelined.target_spec.has_data                             # held: refill unknown
    pipelined.observe_applied(8, 1.9, speculative=False, steady=False)   # refilled
    assert abs(pipelined.target_spec(16) - 2.0) < 1e-9 and pipelined.choose(8) == 0
    # The plain fit saw only steady steps.
    assert abs(pipelined.target(8) - 1.0) < 1e-9


def test_drafting_steps_in_a_row_pay_for_the_transitions_once() -> None:
    ctl = AdaptiveK(1)
    plain_history(ctl)
    ctl.observe_applied(8, 0.6, speculative=False, steady=False)   # drained: -0.4
    for _ in range(3):
        ctl.observe_applied(16, 1.5, speculative=True, steady=True)
    ctl.observe_applied(8, 1.9, speculative=False, steady=False)   # refilled: +0.9
    # 1.1 + 1.5 + 2.4, weighted by the fit's decay (0.97): the mean is about 1.67.
    w = [0.97 ** 2, 0.97, 1.0]
    mean = (w[0] * 1.1 + w[1] * 1.5 + w[2] * 2.4) / sum(w)
    assert abs(ctl.target_spec(16) - mean) < 1e-9
    # A transition whose cost cannot be measured (a prefill in it) leaves the step out.
    ctl = AdaptiveK(1)
    plain_history(ctl)
    ctl.observe_applied(None, 3.0, speculative=False, steady=False)
    ctl.observe_applied(16, 1.5, speculative=True, steady=True)
    ctl.observe_applied(8, 1.0, speculative=False, steady=True)
    assert not ctl.target_spec.has_data
