"""Tree verification in the engine, with an oracle proposer that hides the right
continuation among wrong siblings at random places in the tree: greedy output is
token-identical to plain decoding, the accepted path's K/V is moved into place (any slip
would change later tokens), logprobs are those of plain decoding, and rollbacks leak no
blocks (prefix cache, preemption); trees and chains and plain decodes share batches."""
from __future__ import annotations

import random

import pytest
from _spec_helpers import mixed_batch_params, record_step_kinds
from conftest import assert_no_leaks, random_prompts
from test_spec_decode import make_llm, run

from ember import SamplingParams
from ember.engine.scheduler import SchedulerOutput
from ember.spec.proposer import Proposer
from ember.spec.tree import DraftTree


class OracleTreeProposer(Proposer):
    """Per depth: the true next token (corrupted at error_rate) among 0-2 wrong siblings
    at a random rank, each wrong sibling with a wrong child of its own. Every other
    drafting request gets a chain instead (trees and chains in one batch)."""

    name = "oracle-tree"

    def __init__(self, reference: dict[tuple[int, ...], list[int]], error_rate: float,
                 seed: int = 0, chains_too: bool = False) -> None:
        self.reference, self.error_rate = reference, error_rate
        self.seed = seed
        self.chains_too = chains_too
        self.num_trees = 0

    def propose(self, batch: SchedulerOutput) -> None:
        for n, s in enumerate(batch.scheduled):
            if s.num_spec_slots == 0:
                continue
            r = s.request
            future = self.reference[tuple(r.prompt_token_ids)][r.num_output_tokens:]
            # Drafts that depend only on the request's state (not on the batch order), so
            # seeded runs are reproducible.
            self.rng = random.Random(hash((self.seed, tuple(r.token_ids))))
            wrong = lambda t: (t + self.rng.randint(1, 200)) % 256
            if self.chains_too and n % 2:
                s.spec_token_ids = future[:s.num_spec_slots]
                continue
            tokens, parents, depths = [], [], []
            parent = -1
            for d, true in enumerate(future):
                path_tok = true if self.rng.random() > self.error_rate else wrong(true)
                level = [(wrong(true), False) for _ in range(self.rng.randint(0, 2))] + [(path_tok, True)]
                self.rng.shuffle(level)
                if len(tokens) + 2 * len(level) - 1 > s.num_spec_slots:
                    break
                first = len(tokens)
                for t, _ in level:
                    tokens.append(t)
                    parents.append(parent)
                    depths.append(d + 1)
                path_node = first + [on for _, on in level].index(True)
                for node in range(first, first + len(level)):   # wrong siblings get a child
                    if node != path_node:
                        tokens.append(wrong(true))
                        parents.append(node)
                        depths.append(d + 2)
                parent = path_node
            if tokens:
                # Topological order: parents come first by construction.
                s.spec_tree = DraftTree(tokens, parents, depths, [0.0] * len(tokens))
                s.spec_token_ids = list(tokens)
                self.num_trees += 1


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    return random_prompts([3, 5, 9, 14, 20, 27, 33, 40], seed=5)


@pytest.fixture(scope="module")
def reference(tiny_llama, prompts) -> list[list[int]]:
    tokens, _ = run(make_llm(tiny_llama), prompts)
    return tokens


def tree_llm(tiny_llama, prompts, reference, error_rate, chains_too=False, **kw):
    llm = make_llm(tiny_llama, speculative_config={"method": "ngram", "num_speculative_tokens": 12,
                                                    "adaptive": False}, **kw)
    oracle = OracleTreeProposer({tuple(p): t for p, t in zip(prompts, reference)}, error_rate,
                                chains_too=chains_too)
    llm.engine.speculator.proposer = oracle
    return llm, oracle


@pytest.mark.parametrize("error_rate", [0.0, 0.3])
@pytest.mark.parametrize("engine_args", [{}, {"prefix_cache": "none"}, {"num_kv_blocks": 40},
                                         {"max_num_batched_tokens": 24}],
                         ids=["radix", "no-cache", "preempt", "small-budget"])
def test_tree_verification_is_greedy_identical(tiny_llama, prompts, reference, error_rate,
                                               engine_args) -> None:
    llm, oracle = tree_llm(tiny_llama, prompts, reference, error_rate, **engine_args)
    tokens, _ = run(llm, prompts)
    assert tokens == reference
    assert oracle.num_trees > 0
    stats = llm.engine.spec_stats()
    assert stats["num_accepted_tokens"] > 0
    if error_rate == 0.0:
        assert stats["mean_accepted_length"] > 2.5
    if "num_kv_blocks" in engine_args:
        assert llm.engine.scheduler.num_preemptions > 0
    assert_no_leaks(llm.engine)


def test_trees_chains_and_plain_decodes_in_one_batch(tiny_llama, prompts, reference) -> None:
    # A small token budget: later prompts still prefill while earlier ones speculate.
    llm, oracle = tree_llm(tiny_llama, prompts, reference, 0.2, chains_too=True,
                           max_num_batched_tokens=40)
    kinds_seen = record_step_kinds(
        llm, lambda s: "tree" if s.spec_tree is not None else "chain" if s.spec_token_ids else "plain")
    tokens, _ = run(llm, prompts, mixed_batch_params(len(prompts)))
    assert tokens == reference
    assert any({"tree", "chain"} <= k for k in kinds_seen)
    assert any({"tree", "plain"} <= k for k in kinds_seen)
    assert_no_leaks(llm.engine)


def test_tree_logprobs_and_stops_match_plain_decoding(tiny_llama, prompts, reference) -> None:
    stop = reference[3][11]
    params = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True, logprobs=2,
                            stop_token_ids=[stop], repetition_penalty=1.2)
    ref_tokens, ref_outs = run(make_llm(tiny_llama), prompts, params)
    llm, _ = tree_llm(tiny_llama, prompts, ref_tokens, 0.2)
    tokens, outs = run(llm, prompts, params)
    assert tokens == ref_tokens
    for o, r in zip(outs, ref_outs):
        assert o.outputs[0].finish_reason == r.outputs[0].finish_reason
        for d, rd, t in zip(o.outputs[0].logprobs, r.outputs[0].logprobs, o.outputs[0].token_ids):
            assert set(d) == set(rd)
            assert d[t].logprob == pytest.approx(rd[t].logprob, abs=1e-4)
    assert_no_leaks(llm.engine)


def test_seeded_sampling_with_trees_is_reproducible(tiny_llama, prompts, reference) -> None:
    params = [SamplingParams(temperature=0.9, top_k=20, seed=30 + i, max_tokens=16, ignore_eos=True)
              for i in range(len(prompts))]
    outs = []
    for order in (1, -1):
        llm, oracle = tree_llm(tiny_llama, prompts, reference, 0.0)
        tokens, _ = run(llm, prompts[::order], params[::order])
        outs.append(tokens[::order])
        assert oracle.num_trees > 0
        assert_no_leaks(llm.engine)
    assert outs[0] == outs[1]
