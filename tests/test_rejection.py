"""The speculative verifier: exact small cases, then statistics that the emitted tokens
follow the target distribution for random p and q (with and without top-k / top-p)."""
from __future__ import annotations

import pytest
import torch

from _stats import chi2_pvalue

from ember.layers.sampler import SamplingBatch, SamplingRow, sampling_probs
from ember.sampling_params import SamplingParams as SP
from ember.spec.rejection import greedy_verify, rejection_sample

V = 8


def one_hot(i: int, n: int = V) -> torch.Tensor:
    return torch.nn.functional.one_hot(torch.tensor(i), n).float()


# ---- exact cases ------------------------------------------------------------------------
def test_greedy_target_is_exact_match_then_argmax() -> None:
    p = torch.stack([one_hot(3), one_hot(5), one_hot(1), one_hot(7)])[None]  # [1, 4, V]
    out = rejection_sample(p, torch.tensor([[3, 5, 1]]), [3], None, [None])
    assert out.token_ids == [[3, 5, 1, 7]] and out.num_accepted == [3]   # all + bonus
    out = rejection_sample(p, torch.tensor([[3, 4, 1]]), [3], None, [None])
    assert out.token_ids == [[3, 5]] and out.num_accepted == [1]         # corrected at 1
    out = rejection_sample(p, torch.tensor([[0, 5, 1]]), [3], None, [None])
    assert out.token_ids == [[3]] and out.num_accepted == [0]


def test_greedy_verify_equals_the_rule_on_one_hot_targets() -> None:
    """The host shortcut for greedy batches against rejection_sample (drafts padded to K,
    with and without a draft distribution)."""
    g = torch.Generator().manual_seed(3)
    for _ in range(30):
        b, k = 4, 3
        best = torch.randint(0, 3, (b, k + 1), generator=g)
        p = torch.nn.functional.one_hot(best, V).float()                     # [B, K+1, V]
        n = torch.randint(0, k + 1, (b,), generator=g).tolist()
        drafts = torch.randint(0, 3, (b, k), generator=g)
        q = torch.softmax(torch.randn(b, k, V, generator=g), -1)
        fast = greedy_verify(best.tolist(), [drafts[i, :n[i]].tolist() for i in range(b)])
        for dq in (None, q):
            assert rejection_sample(p, drafts, n, dq, [None] * b) == fast


def test_greedy_target_with_draft_distribution() -> None:
    # Even where q puts its mass elsewhere, a one-hot p gives argmax exactly.
    p = torch.stack([one_hot(2), one_hot(6)])[None]
    q = torch.full((1, 1, V), 1.0 / V)
    for _ in range(20):
        out = rejection_sample(p, torch.tensor([[2]]), [1], q, [None])
        assert out.token_ids == [[2, 6]]
        out = rejection_sample(p, torch.tensor([[4]]), [1], q, [None])
        assert out.token_ids == [[2]]


def test_p_equal_q_accepts_everything() -> None:
    torch.manual_seed(0)
    p = torch.softmax(torch.randn(50, 4, V), -1)
    drafts = torch.multinomial(p[:, :3].reshape(-1, V), 1).view(50, 3)
    out = rejection_sample(p, drafts, [3] * 50, p[:, :3].clone(), [None] * 50)
    assert out.num_accepted == [3] * 50
    assert all(t[:3] == d for t, d in zip(out.token_ids, drafts.tolist()))


def test_draft_with_zero_target_probability_is_always_replaced() -> None:
    torch.manual_seed(0)
    p = torch.softmax(torch.randn(200, 2, V), -1)
    p[:, 0, 4] = 0.0
    p[:, 0] /= p[:, 0].sum(-1, keepdim=True)
    out = rejection_sample(p, torch.full((200, 1), 4), [1] * 200, None, [None] * 200)
    assert out.num_accepted == [0] * 200
    assert all(len(t) == 1 and t[0] != 4 for t in out.token_ids)


def test_padding_and_no_drafts() -> None:
    p = torch.stack([torch.stack([one_hot(1), one_hot(2), one_hot(3)]),
                     torch.stack([one_hot(5), one_hot(6), one_hot(7)])])  # [2, 3, V]
    drafts = torch.tensor([[1, 2], [6, 6]])
    out = rejection_sample(p, drafts, [1, 0], None, [None, None])
    # Row 0 verifies only its first draft, then takes the bonus from position 1.
    assert out.token_ids == [[1, 2], [5]]
    assert out.num_accepted == [1, 0]


def test_seeded_rows_are_reproducible_whatever_the_batch() -> None:
    torch.manual_seed(1)
    p = torch.softmax(torch.randn(3, 3, V), -1)
    q = torch.softmax(torch.randn(3, 2, V), -1)
    drafts = torch.randint(0, V, (3, 2))
    gens = lambda: [torch.Generator().manual_seed(s) for s in (11, 12, 13)]
    a = rejection_sample(p, drafts, [2, 2, 2], q, gens())
    b = rejection_sample(p, drafts, [2, 2, 2], q, gens())
    assert a == b
    # Row 1 alone with its seed: same tokens as inside the batch.
    c = rejection_sample(p[1:2], drafts[1:2], [2], q[1:2], [torch.Generator().manual_seed(12)])
    assert c.token_ids[0] == a.token_ids[1]


# ---- statistics -------------------------------------------------------------------------
N = 40_000


def _target_and_draft(seed: int, params: SP) -> tuple[torch.Tensor, torch.Tensor]:
    """p [3, V] from random logits through the real sampler pipeline with params, and an
    unrelated q [2, V] (itself top-k filtered, so q has holes where p has mass)."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(3, V, generator=g) * 1.5
    rows = [SamplingRow(params, [], []) for _ in range(3)]
    p = sampling_probs(logits, SamplingBatch.build(rows, V, "cpu"))
    # A draft that roughly agrees with the target (as real drafts do), so long chains
    # get accepted often enough to test every position.
    q_logits = logits[:2] + torch.randn(2, V, generator=g)
    q_rows = [SamplingRow(SP(temperature=1.0, top_k=5), [], []) for _ in range(2)]
    q = sampling_probs(q_logits, SamplingBatch.build(q_rows, V, "cpu"))
    return p, q


@pytest.mark.parametrize("params", [SP(temperature=1.0), SP(temperature=0.7, top_p=0.8),
                                    SP(temperature=1.3, top_k=4), SP(temperature=1.0, top_k=6, top_p=0.9)],
                         ids=["plain", "top-p", "top-k", "top-k-p"])
@pytest.mark.parametrize("deterministic_q", [False, True], ids=["q", "one-hot-q"])
def test_emitted_tokens_follow_the_target(params: SP, deterministic_q: bool) -> None:
    p, q = _target_and_draft(hash((params.top_k, params.top_p)) % 1000, params)
    torch.manual_seed(7)
    if deterministic_q:
        # A fixed guess per position (what n-gram lookup does): q is one-hot at it.
        drafts = torch.tensor([[int(q[0].argmax()), int(q[1].argmax())]]).expand(N, 2)
        draft_probs = None
    else:
        drafts = torch.stack([torch.multinomial(q[j], N, replacement=True) for j in range(2)], 1)
        draft_probs = q[None].expand(N, 2, V)
    out = rejection_sample(p[None].expand(N, 3, V), drafts, [2] * N, draft_probs, [None] * N)
    first = torch.tensor([t[0] for t in out.token_ids])
    second = torch.tensor([t[1] for t in out.token_ids if len(t) > 1])
    third = torch.tensor([t[2] for t in out.token_ids if len(t) > 2])
    for j, toks in enumerate([first, second, third]):
        assert len(toks) > 500, j
        counts = torch.bincount(toks, minlength=V).double()
        tv = 0.5 * (counts / counts.sum() - p[j].double()).abs().sum()
        # Sampling noise of the TV distance is about sqrt(V / n) / 2 at most.
        assert tv < 2 * (V / len(toks)) ** 0.5, (j, tv)
        assert chi2_pvalue(counts, p[j]) > 1e-4, j


def test_statistical_check_detects_a_wrong_verifier(monkeypatch) -> None:
    """The check above must fail when the residual is p instead of max(p - q, 0)."""
    import ember.spec.rejection as rej
    p, q = _target_and_draft(3, SP(temperature=1.0))
    real = rej.sample_from
    calls = []

    def biased(probs, gens):  # resample from p (the plain target), a classic bug
        calls.append(1)
        return real(pfirst.expand_as(probs), gens)
    pfirst = p[0][None]
    monkeypatch.setattr(rej, "sample_from", biased)
    torch.manual_seed(7)
    drafts = torch.multinomial(q[0], N, replacement=True)[:, None]
    out = rej.rejection_sample(p[None, :2].expand(N, 2, V), drafts, [1] * N,
                               q[None, :1].expand(N, 1, V), [None] * N)
    first = torch.bincount(torch.tensor([t[0] for t in out.token_ids]), minlength=V).double()
    assert calls and chi2_pvalue(first, p[0]) < 1e-4
