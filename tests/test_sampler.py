"""The batched sampler: exact small cases, penalties, seeding, distributions, logprobs."""

import math

import pytest
import torch

from _stats import chi2_pvalue

from ember.layers.sampler import (
    Sampler,
    SamplingBatch,
    SamplingRow,
    apply_penalties,
    compute_token_logprobs,
    make_generator,
    sample,
)
from ember.sampling_params import SamplingParams as SP

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def rows_of(params, n=1, prompt=(), output=(), generator=None):
    return [SamplingRow(params, list(prompt), list(output), generator) for _ in range(n)]


def run(logits, rows):
    batch = SamplingBatch.build(rows, logits.shape[-1], logits.device)
    return sample(logits, batch)


def counts_of(tokens, vocab):
    return torch.bincount(tokens.cpu(), minlength=vocab).double()


# --- exact small cases ------------------------------------------------------------


def test_all_greedy_is_a_single_argmax():
    torch.manual_seed(0)
    logits = torch.randn(7, 33, dtype=torch.bfloat16)
    rows = rows_of(SP(temperature=0.0), n=7)
    batch = SamplingBatch.build(rows, 33, "cpu")
    assert batch.plain_greedy
    out = sample(logits, batch)
    assert out.sampled_token_ids.dtype == torch.long
    assert torch.equal(out.sampled_token_ids, logits.float().argmax(-1))
    assert out.logprobs is None


def test_top_k_1_equals_greedy():
    torch.manual_seed(1)
    logits = torch.randn(64, 50) * 3
    out = run(logits, rows_of(SP(temperature=1.3, top_k=1), n=64))
    assert torch.equal(out.sampled_token_ids, logits.argmax(-1))


def test_top_p_that_keeps_exactly_one_token():
    logits = torch.log(torch.tensor([0.1, 0.6, 0.3])).repeat(2000, 1)
    out = run(logits, rows_of(SP(top_p=0.55), n=2000))
    assert (out.sampled_token_ids == 1).all()
    # Just above the top token's mass, the second token becomes reachable.
    out = run(logits, rows_of(SP(top_p=0.65), n=2000))
    assert set(out.sampled_token_ids.tolist()) == {1, 2}


def test_top_p_keeps_the_smallest_set_renormalized():
    probs = torch.tensor([0.05, 0.30, 0.02, 0.50, 0.13])
    logits = probs.log().repeat(20000, 1)
    torch.manual_seed(2)
    out = run(logits, rows_of(SP(top_p=0.7), n=20000))
    # Sorted: 0.50 (mass before 0), 0.30 (mass before 0.5 < 0.7) -> {3, 1}.
    expected = torch.tensor([0.0, 0.30, 0.0, 0.50, 0.0]) / 0.8
    observed = counts_of(out.sampled_token_ids, 5)
    assert observed[[0, 2, 4]].sum() == 0
    assert chi2_pvalue(observed, expected) > 1e-4


def test_top_p_with_ties_keeps_every_tied_token_whatever_the_order():
    base = torch.tensor([2.0, 1.0, 1.0, 0.0])
    p = torch.softmax(base, -1)  # ~[0.534, 0.197, 0.197, 0.072]
    for perm in ([0, 1, 2, 3], [3, 2, 1, 0], [1, 3, 0, 2]):
        logits = base[perm].repeat(6000, 1)
        torch.manual_seed(3)
        out = run(logits, rows_of(SP(top_p=0.6), n=6000))
        observed = counts_of(out.sampled_token_ids, 4)
        # The boundary falls inside the tie (mass before the first 1.0 is 0.534 < 0.6):
        # both tied tokens are kept, the 0.0 token never is.
        expected = torch.tensor([p[0], p[1], p[2], 0.0])[perm]
        assert chi2_pvalue(observed, expected / expected.sum()) > 1e-4


def test_top_k_with_top_p_combined():
    probs = torch.tensor([0.40, 0.25, 0.20, 0.10, 0.05])
    logits = probs.log().repeat(20000, 1)
    torch.manual_seed(4)
    out = run(logits, rows_of(SP(top_k=3, top_p=0.6), n=20000))
    # Top-k keeps [0.40, 0.25, 0.20] -> renormalized [0.47, 0.29, 0.24]; top-p 0.6 on
    # that keeps the first two (mass before the second is 0.47 < 0.6, before the third 0.76).
    expected = torch.tensor([0.40, 0.25, 0.0, 0.0, 0.0]) / 0.65
    observed = counts_of(out.sampled_token_ids, 5)
    assert observed[2:].sum() == 0
    assert chi2_pvalue(observed, expected) > 1e-4


def test_top_k_still_applies_when_another_row_uses_top_p():
    # Row 0 has top-k only, but row 1 sends the whole batch down the sort + top-p path.
    base = torch.tensor([0.0, 0.1, 0.2, 0.3, 0.4])
    logits = base.repeat(4000, 1)
    rows = [SamplingRow(SP(top_k=2) if i % 2 == 0 else SP(top_p=0.5), [], []) for i in range(4000)]
    tokens = run(logits, rows).sampled_token_ids
    assert set(tokens[0::2].tolist()) == {3, 4}
    assert set(tokens[1::2].tolist()) == {2, 3, 4}


def test_top_k_filters_to_the_k_most_likely_renormalized():
    torch.manual_seed(5)
    base = torch.randn(12) * 1.5
    logits = base.repeat(20000, 1)
    out = run(logits, rows_of(SP(top_k=4, temperature=0.8), n=20000))
    keep = torch.topk(base, 4).indices
    expected = torch.zeros(12)
    expected[keep] = torch.softmax(base[keep] / 0.8, -1)
    assert chi2_pvalue(counts_of(out.sampled_token_ids, 12), expected) > 1e-4


def test_min_p_drops_tokens_below_the_scaled_max():
    probs = torch.tensor([0.12, 0.50, 0.08, 0.30])
    logits = probs.log().repeat(20000, 1)
    torch.manual_seed(6)
    out = run(logits, rows_of(SP(min_p=0.2), n=20000))
    # Threshold 0.2 * 0.5 = 0.1: 0.08 goes, 0.12 stays.
    expected = torch.tensor([0.12, 0.50, 0.0, 0.30]) / 0.92
    observed = counts_of(out.sampled_token_ids, 4)
    assert observed[2] == 0
    assert chi2_pvalue(observed, expected) > 1e-4


@pytest.mark.parametrize("params", [SP(top_k=1000), SP(top_k=5), SP(top_p=1.0), SP(top_k=-1, min_p=0.0)])
def test_no_op_filters_keep_the_full_distribution(params):
    torch.manual_seed(7)
    base = torch.randn(5)
    logits = base.repeat(20000, 1)
    out = run(logits, rows_of(params, n=20000))
    assert chi2_pvalue(counts_of(out.sampled_token_ids, 5), torch.softmax(base, -1)) > 1e-4


def test_top_k_of_vocab_size_or_more_builds_no_top_k_stage():
    batch = SamplingBatch.build(rows_of(SP(top_k=5)) + rows_of(SP(top_k=900)), 5, "cpu")
    assert batch.top_k is None
    batch = SamplingBatch.build(rows_of(SP(top_k=3)) + rows_of(SP(top_k=900)), 5, "cpu")
    assert batch.top_k.tolist() == [3, 5]


def test_filters_with_logits_already_minus_inf():
    logits = torch.tensor([[0.0, float("-inf"), 1.0, float("-inf")]]).repeat(3000, 1)
    out = run(logits, rows_of(SP(top_k=3, top_p=0.99, min_p=0.01), n=3000))
    assert set(out.sampled_token_ids.tolist()) == {0, 2}


# --- penalties -----------------------------------------------------------------------


def test_penalties_match_hand_computation():
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0, -2.0, 1.0]])
    params = SP(repetition_penalty=2.0, frequency_penalty=0.5, presence_penalty=0.25)
    batch = SamplingBatch.build(
        [SamplingRow(params, prompt_token_ids=[0, 1, 0], output_token_ids=[3, 4, 3])], 6, "cpu"
    )
    got = apply_penalties(logits, batch.penalties)
    expected = torch.tensor(
        [[
            2.0 / 2,  # prompt only, positive: divided; no frequency/presence (prompt)
            -1.0 * 2,  # prompt only, negative: multiplied
            0.5,  # unseen
            3.0 / 2 - 0.5 * 2 - 0.25,  # output twice
            -2.0 * 2 - 0.5 * 1 - 0.25,  # output once, negative
            1.0,  # unseen
        ]]
    )
    torch.testing.assert_close(got, expected)


def test_penalties_only_touch_their_rows_and_change_greedy_choice():
    logits = torch.tensor([[1.0, 3.0, 2.9], [1.0, 3.0, 2.9], [1.0, 3.0, 2.9]])
    before = logits.clone()
    rows = [
        SamplingRow(SP(temperature=0.0), [1], [1]),
        SamplingRow(SP(temperature=0.0, frequency_penalty=0.2), [1], [1]),
        SamplingRow(SP(temperature=0.0, repetition_penalty=1.1), [1], []),
    ]
    batch = SamplingBatch.build(rows, 3, "cpu")
    assert batch.penalties.rows.tolist() == [1, 2]
    assert not batch.plain_greedy
    out = sample(logits, batch)
    assert out.sampled_token_ids.tolist() == [1, 2, 2]
    assert torch.equal(logits, before)  # the caller's logits are not modified


def test_presence_and_frequency_ignore_prompt_tokens():
    logits = torch.tensor([[3.0, 2.5]])
    rows = [SamplingRow(SP(temperature=0.0, presence_penalty=2.0, frequency_penalty=2.0), [0, 0, 0], [])]
    assert sample(logits, SamplingBatch.build(rows, 2, "cpu")).sampled_token_ids.item() == 0
    rows = [SamplingRow(SP(temperature=0.0, presence_penalty=2.0, frequency_penalty=2.0), [], [0])]
    assert sample(logits, SamplingBatch.build(rows, 2, "cpu")).sampled_token_ids.item() == 1


def test_min_tokens_masks_eos_and_stop_tokens():
    logits = torch.tensor([[0.0, 5.0, 4.0, 1.0]])  # 1 = EOS, 2 = a stop token

    def pick(output, params):
        row = SamplingRow(params, [0], output, eos_token_ids=[1])
        return sample(logits, SamplingBatch.build([row], 4, "cpu")).sampled_token_ids.item()

    params = SP(temperature=0.0, min_tokens=2, stop_token_ids=[2])
    assert pick([3], params) == 3
    assert pick([3, 3], params) == 1
    assert pick([3], SP(temperature=0.0, min_tokens=2, stop_token_ids=[2], ignore_eos=True)) == 1
    assert pick([3], SP(temperature=0.0, min_tokens=2)) == 2


# --- randomness ----------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
def test_temperature_follows_softmax_of_scaled_logits(device):
    n, temperature = 40000, 0.6
    base = torch.tensor([1.0, 0.2, -0.5, 0.8, -1.5, 0.0])
    logits = base.to(device).repeat(n, 1)
    torch.manual_seed(8)
    out = run(logits, rows_of(SP(temperature=temperature), n=n))
    observed = counts_of(out.sampled_token_ids, 6)
    assert chi2_pvalue(observed, torch.softmax(base / temperature, -1)) > 1e-4
    # The same test rejects a sampler that got the temperature slightly wrong.
    assert chi2_pvalue(observed, torch.softmax(base / 0.66, -1)) < 1e-6
    assert chi2_pvalue(observed, torch.softmax(base, -1)) < 1e-6


@pytest.mark.parametrize("device", DEVICES)
def test_seeded_rows_follow_the_distribution(device):
    n = 3000
    base = torch.tensor([0.5, -0.3, 1.2, 0.0])
    logits = base.to(device).repeat(n, 1)
    rows = [SamplingRow(SP(temperature=1.5, seed=s), [], [], make_generator(s, device)) for s in range(n)]
    out = run(logits, rows)
    assert chi2_pvalue(counts_of(out.sampled_token_ids, 4), torch.softmax(base / 1.5, -1)) > 1e-4


def _seeded_run(device, seed, position, batch_size, steps=6, vocab=2000):
    """Tokens of one seeded row over several steps, placed at `position` in a busy batch."""
    gen_logits = torch.Generator().manual_seed(99)
    step_logits = [torch.randn(vocab, generator=gen_logits) for _ in range(steps)]
    others = [
        SP(temperature=0.0),
        SP(temperature=0.7, top_k=20),
        SP(top_p=0.8, seed=5),
        SP(min_p=0.05),
        SP(temperature=1.2, repetition_penalty=1.3),
        SP(seed=77),
        SP(frequency_penalty=0.4, logprobs=2),
    ]
    mine = SP(temperature=0.9, seed=seed)
    rows = []
    for i in range(batch_size):
        if i == position:
            rows.append(SamplingRow(mine, [1, 2], [], make_generator(seed, device)))
        else:
            p = others[(i + position) % len(others)]
            gen = make_generator(p.seed, device) if p.seed is not None else None
            rows.append(SamplingRow(p, [3], [], gen))
    tokens = []
    for step in range(steps):
        noise = torch.randn(batch_size, vocab, generator=gen_logits)
        logits = noise.to(device)
        logits[position] = step_logits[step].to(device)
        token = run(logits, rows)
        for i, r in enumerate(rows):
            r.output_token_ids.append(int(token.sampled_token_ids[i]))
        tokens.append(int(token.sampled_token_ids[position]))
    return tokens


@pytest.mark.parametrize("device", DEVICES)
def test_same_seed_same_tokens_whatever_the_batch(device):
    alone = _seeded_run(device, seed=1234, position=0, batch_size=1)
    in_batch = _seeded_run(device, seed=1234, position=5, batch_size=8)
    elsewhere = _seeded_run(device, seed=1234, position=2, batch_size=8)
    other_seed = _seeded_run(device, seed=4321, position=0, batch_size=1)
    assert alone == in_batch == elsewhere
    assert alone != other_seed  # a different seed really gives different tokens
    assert len(set(alone)) > 1  # the generator advances between steps


def test_unseeded_rows_use_the_default_generator():
    logits = torch.zeros(16, 1000)
    rows = rows_of(SP(), n=16)
    torch.manual_seed(11)
    first = run(logits, rows).sampled_token_ids
    torch.manual_seed(11)
    again = run(logits, rows).sampled_token_ids
    torch.manual_seed(12)
    other = run(logits, rows).sampled_token_ids
    assert torch.equal(first, again) and not torch.equal(first, other)


def test_mixed_greedy_and_random_rows():
    torch.manual_seed(13)
    logits = torch.randn(6, 40, dtype=torch.bfloat16)
    rows = [
        SamplingRow(SP(temperature=0.0), [], []),
        SamplingRow(SP(temperature=5.0, top_k=30), [], []),
        SamplingRow(SP(temperature=0.0), [], []),
        SamplingRow(SP(top_p=0.9), [], []),
        SamplingRow(SP(temperature=1e-6), [], []),
        SamplingRow(SP(min_p=0.1), [], []),
    ]
    batch = SamplingBatch.build(rows, 40, "cpu")
    assert batch.greedy_mask.tolist() == [True, False, True, False, True, False]
    out = Sampler()(logits, batch)
    greedy = logits.float().argmax(-1)
    assert out.sampled_token_ids[[0, 2, 4]].tolist() == greedy[[0, 2, 4]].tolist()


def test_shape_mismatch_raises():
    batch = SamplingBatch.build(rows_of(SP(), n=2), 10, "cpu")
    with pytest.raises(ValueError, match="shape"):
        sample(torch.zeros(3, 10), batch)


# --- logprobs --------------------------------------------------------------------------


def test_logprobs_are_raw_with_vllm_ranks():
    torch.manual_seed(14)
    logits = torch.randn(5, 30) * 2
    rows = [
        SamplingRow(SP(temperature=0.5, repetition_penalty=1.5, logprobs=3), [0, 1], [2]),
        SamplingRow(SP(), [], []),
        SamplingRow(SP(temperature=0.0, logprobs=0), [], []),
        SamplingRow(SP(temperature=2.0, top_k=10, logprobs=5), [], []),
        SamplingRow(SP(logprobs=1), [], []),
    ]
    out = run(logits, rows)
    assert out.logprob_rows == [0, 2, 3, 4]
    raw = torch.log_softmax(logits, -1)
    per_row = out.row_logprobs()
    assert per_row[1] is None
    for i, k in zip([0, 2, 3, 4], [3, 0, 5, 1]):
        entry = per_row[i]
        token = int(out.sampled_token_ids[i])
        assert entry.token_id == token
        assert math.isclose(entry.logprob, raw[i, token].item(), rel_tol=1e-5)
        assert entry.rank == 1 + int((raw[i] > raw[i, token]).sum())
        top = torch.topk(raw[i], k)
        assert entry.top_token_ids == top.indices.tolist()
        assert torch.allclose(torch.tensor(entry.top_logprobs), top.values)
    assert per_row[2].rank == 1  # greedy picks the top raw token


def test_compute_token_logprobs_ranks_ties_and_wide_top():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0], [1.0, 1.0, 0.0, -1.0]])
    result = compute_token_logprobs(logits, torch.tensor([2, 0]), num_top=10)
    assert result.ranks.tolist() == [3, 2]  # ties share the worse rank, as in vLLM
    assert result.top_token_ids.shape == (2, 4)  # num_top is capped at the vocabulary
    torch.testing.assert_close(result.logprobs, torch.log_softmax(logits, -1)[[0, 1], [2, 0]])
    rows = result.to_rows([1, 0])
    assert rows[0].top_token_ids == [1] and rows[1].top_token_ids == []
