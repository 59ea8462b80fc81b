"""Adaptive speculation: k from measured acceptance and step cost, off at large batch;
and the acceptance statistics."""
from __future__ import annotations

from ember.spec.adaptive import AdaptiveK
from ember.spec.stats import SpecStats


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
    assert picks.count(1) == 3 and picks.count(0) == 27          # one probe per 10 steps
    # Accepted probes bring the estimate (and speculation) back.
    for _ in range(20):
        ctl.observe_acceptance(1, 1)
    assert ctl.choose(1) >= 2
    # Where even 90% acceptance would lose (compute-bound, large batch) it never probes.
    ctl = AdaptiveK(4, probe_every=10)
    feed(ctl, compute_bound, lambda b: 0.1 * b, accept_prob=0.0)
    assert all(ctl.choose(64) == 0 for _ in range(50))


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
