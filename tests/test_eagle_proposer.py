"""The eagle and peagle proposers in the engine: greedy output token-identical to plain
decoding (chains and trees, a drafter trained briefly on the tiny target so drafts do get
accepted, and the real SmolLM2 with a random drafter), no block leaks after tree
rollbacks and preemptions, P-EAGLE's one-forward drafts equal to its one-row-at-a-time
definition, adaptive tree sizing, and config errors."""
from __future__ import annotations

import json
import os

import pytest
import torch
from _spec_helpers import force_k, steps_of_calls, steps_of_forwards
from conftest import TinyCheckpoint, assert_no_leaks, random_prompts
from test_spec_decode import make_llm, run

from ember import LLM, SamplingParams
from ember.config import ModelConfig
from ember.spec.eagle import EagleConfig, EagleDrafter, default_aux_layers, save_eagle
from ember.spec.train_eagle import draft_loss, draft_vocabulary, new_drafter, target_features

GREEDY = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)


def _corpus(sequences: list[list[int]], length: int) -> torch.Tensor:
    """Windows of `length` tokens, every 2 tokens, over each sequence."""
    return torch.tensor([seq[i:i + length] for seq in sequences
                         for i in range(0, len(seq) - length + 1, 2)])


def _train_tiny(tiny_llama: TinyCheckpoint, folder: str, parallel: bool, sequences: list[list[int]],
                steps: int = 150, layers: int = 1) -> str:
    """A drafter trained on the target's own greedy continuations of the test prompts, so
    that its drafts are right often (the engine paths of accepted drafts get exercised)."""
    target = tiny_llama.hf_model
    cfg = target.config.to_dict()
    cfg["architectures"] = ["LlamaForCausalLM"]
    chunks = _corpus(sequences, 16)
    feats = target_features(target, chunks, default_aux_layers(cfg["num_hidden_layers"]), 64, 8,
                            log=lambda *_: None)
    ids = draft_vocabulary(chunks, feats["ids"], 256, 200)   # a reduced vocabulary (d2t)
    vmap = torch.full((256,), -1, dtype=torch.long)
    vmap[ids] = torch.arange(len(ids))
    torch.manual_seed(0)
    d = new_drafter(target, cfg, ids, parallel, 3, seed=0, layers=layers)
    opt = torch.optim.AdamW([p for p in d.parameters() if p.requires_grad], lr=5e-3)
    for step in range(steps):
        idx = torch.randperm(len(chunks))[:32]
        loss, _ = draft_loss(d, {k: feats[k][idx] for k in ("tokens", "aux", "ids", "probs")}, vmap, 3, parallel)
        opt.zero_grad()
        loss.backward()
        opt.step()
    save_eagle(d.eval(), folder)
    return folder


@pytest.fixture(scope="module")
def prompts(tiny_llama) -> list[list[int]]:
    return random_prompts([3, 5, 9, 14, 20, 27, 33, 40], seed=5)


@pytest.fixture(scope="module")
def reference(tiny_llama, prompts) -> list[list[int]]:
    tokens, _ = run(make_llm(tiny_llama), prompts)
    return tokens


@pytest.fixture(scope="module")
def drafters(tiny_llama, prompts, reference, tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("eagle")
    seqs = [p + r for p, r in zip(prompts, reference)]
    return {"eagle": _train_tiny(tiny_llama, str(root / "eagle"), False, seqs),
            "peagle": _train_tiny(tiny_llama, str(root / "peagle"), True, seqs),
            # P-EAGLE with two layers (AWS's published drafters have four): every layer's cache
            "peagle-deep": _train_tiny(tiny_llama, str(root / "peagle-deep"), True, seqs, layers=2)}


def spec(method: str, model: str, k: int = 3, tree: dict | None = None, adaptive: bool = False) -> dict:
    """A speculative config; `method` may name a drafter variant ("peagle-deep" is peagle)."""
    method = method.split("-")[0]
    cfg = {"method": method, "model": model, "num_speculative_tokens": k, "adaptive": adaptive}
    if tree is not None:
        cfg["tree"] = tree
    return cfg


CASES = [("eagle", None), ("eagle", {"top_k": 3, "budget": 9}), ("peagle", None),
         ("peagle", {"top_k": 3, "budget": 9}), ("peagle", {"top_k": 3, "budget": 9, "device_greedy": False}),
         ("peagle-deep", {"top_k": 3, "budget": 9})]
# peagle trees of greedy requests are built and verified on the device unless device_greedy is off
CASE_IDS = ["eagle-chain", "eagle-tree", "peagle-chain", "peagle-device-tree", "peagle-host-tree",
            "peagle-2-layers-tree"]


@pytest.mark.parametrize("method,tree", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("engine_args", [{}, {"num_kv_blocks": 40, "prefix_cache": "radix"},
                                         {"num_kv_blocks": 40, "prefix_cache": "none"}],
                         ids=["roomy", "preempt-radix", "preempt-no-cache"])
def test_greedy_identical_and_no_leaks(tiny_llama, drafters, prompts, reference, method, tree,
                                       engine_args) -> None:
    llm = make_llm(tiny_llama, speculative_config=spec(method, drafters[method], tree=tree), **engine_args)
    tokens, _ = run(llm, prompts)
    assert tokens == reference
    stats = llm.engine.spec_stats()
    assert stats["num_accepted_tokens"] > 0, stats
    if engine_args:
        assert llm.engine.scheduler.num_preemptions > 0
    assert_no_leaks(llm.engine)


def _row1_drafts(tiny_llama: TinyCheckpoint, folder: str, seq: list[int]) -> list[int]:
    """The drafter's greedy first draft at every length of seq, teacher-forced (the training
    computation): entry b is its argmax for the pair (t_{b+1}, fc(aux_b)) over the cache of
    every earlier pair, i.e. its guess of token b + 2."""
    from ember.models.loader import resolve_model
    from ember.spec.eagle import load_eagle
    from ember.spec.train_eagle import step_attentions
    target = tiny_llama.hf_model
    d = load_eagle(folder, resolve_model(tiny_llama.path).config)
    d.share_embedding(target.model.embed_tokens)
    t = torch.tensor([seq])
    f = target_features(target, t, d.config.aux_layers, 1, 1, log=lambda *_: None)
    n = t.shape[1]
    with torch.no_grad():   # row 1 at every base: (t_{b+1}, fc(aux_b))
        o = d(d.embed(t[0, 1:]), d.fuse(f["aux"][0, :n - 1].float()), torch.arange(n - 1),
              step_attentions(d, 1, n - 1))
        return d.to_target_ids(d.compute_logits(o).argmax(-1)).tolist()


def test_k1_acceptance_is_the_teacher_forced_agreement(tiny_llama, drafters, prompts, reference) -> None:
    """With k = 1 and greedy decoding, a draft is the drafter's argmax for the pair
    (t_{N-1}, fc(aux_{N-2})) over the cache of every earlier pair: exactly its first
    training row at base N - 2 on the final sequence. So the engine must accept exactly
    where that row's argmax is the target's next token: a check of the catch-up's pairs,
    positions, aux layers and draft vocabulary against the training computation."""
    expected = 0
    for p, out in zip(prompts, reference):
        draft = _row1_drafts(tiny_llama, drafters["eagle"], p + out)   # draft[b] guesses token b + 2
        j = 1   # outputs so far: the prefill step sampled one, without drafts
        while j < len(out):
            if len(out) - j - 1 == 0:   # the last token: no room for a draft
                j += 1
            elif draft[len(p) + j - 2] == out[j]:
                expected += 1
                j += 2
            else:
                j += 1
    llm = make_llm(tiny_llama, speculative_config=spec("eagle", drafters["eagle"], k=1))
    tokens, _ = run(llm, prompts)
    assert tokens == reference
    got = llm.engine.spec_stats()["num_accepted_tokens"]
    assert expected > 10 and got == expected


def test_k1_drafts_after_steps_off_are_the_teacher_forced_ones(tiny_llama, drafters, prompts, reference) -> None:
    """k forced to 0 on most steps: a request that drafts again catches up over every token
    since it last drafted (from the aux rows the hook kept), and its draft is still the
    teacher-forced row-1 argmax at its length."""
    llm = make_llm(tiny_llama, speculative_config=spec("eagle", drafters["eagle"], k=1))
    force_k(llm, [0, 0, 1, 0, 0, 0, 1, 1, 0])
    proposer = llm.engine.speculator.proposer
    made, gaps = [], []
    propose = proposer.propose

    def recording(batch):
        gaps.extend(s.request.num_computed_tokens - proposer.kv.covered(s.request)
                    for s in batch.scheduled if s.num_spec_slots and proposer.kv.covered(s.request))
        propose(batch)
        made.extend((tuple(s.request.prompt_token_ids), s.request.num_tokens, s.spec_token_ids[0])
                    for s in batch.scheduled if s.spec_token_ids)
    proposer.propose = recording
    tokens, _ = run(llm, prompts)
    assert tokens == reference
    assert len(made) > 20 and max(gaps) > 2   # a verification of one draft makes at most 2 valid
    rows = {tuple(p): _row1_drafts(tiny_llama, drafters["eagle"], p + out) for p, out in zip(prompts, reference)}
    assert [d for _, _, d in made] == [rows[p][n - 2] for p, n, _ in made]
    assert llm.engine.spec_stats()["num_accepted_tokens"] > 5
    assert_no_leaks(llm.engine)


@pytest.mark.parametrize("method,tree", CASES, ids=CASE_IDS)
def test_steps_without_drafts_run_no_drafter_forward(tiny_llama, drafters, prompts, reference, method,
                                                     tree) -> None:
    """With k forced to 0 on most steps, those steps never reach the proposer and run no
    drafter forward; drafting resumes with a catch-up, and the output stays the target's."""
    llm = make_llm(tiny_llama, speculative_config=spec(method, drafters[method], tree=tree),
                   num_kv_blocks=40, prefix_cache="radix")
    ctl = force_k(llm, [0, 0, 0, 3, 0, 2, 0, 0, 0, 0, 1])
    proposer = llm.engine.speculator.proposer
    forwards = steps_of_forwards(proposer.drafter, ctl)
    proposes = steps_of_calls(proposer, "propose", ctl)
    tokens, _ = run(llm, prompts)
    assert tokens == reference
    off = {i for i, k in enumerate(ctl.ks) if k == 0}
    assert len(off) >= 10 and len(ctl.ks) - len(off) >= 5
    assert not off & set(forwards) and not off & set(proposes)
    assert len(set(forwards)) >= 4
    assert llm.engine.spec_stats()["num_accepted_tokens"] > 0
    assert llm.engine.scheduler.num_preemptions > 0
    assert_no_leaks(llm.engine)


def test_trees_accept_more_than_chains(tiny_llama, drafters, prompts, reference) -> None:
    lengths = {}
    for name, tree in [("chain", None), ("tree", {"top_k": 4, "budget": 16})]:
        llm = make_llm(tiny_llama, speculative_config=spec("eagle", drafters["eagle"], k=4, tree=tree))
        tokens, _ = run(llm, prompts)
        assert tokens == reference
        lengths[name] = llm.engine.spec_stats()["mean_accepted_length"]
    assert lengths["tree"] >= lengths["chain"]


def test_sampling_is_reproducible_and_mixes_with_plain_requests(tiny_llama, drafters, prompts) -> None:
    params = [SamplingParams(temperature=0.8, top_p=0.95, seed=40 + i, max_tokens=16, ignore_eos=True,
                             prompt_logprobs=1 if i % 3 == 0 else None) for i in range(len(prompts))]
    for method, tree in CASES:
        cfg = spec(method, drafters[method], tree=tree)
        a, _ = run(make_llm(tiny_llama, speculative_config=cfg), prompts, params)
        llm = make_llm(tiny_llama, speculative_config=cfg)
        b, _ = run(llm, prompts[::-1], params[::-1])
        assert a == b[::-1], method
        assert llm.engine.spec_stats()["num_draft_tokens"] > 0
        assert_no_leaks(llm.engine)


@pytest.mark.parametrize("key", ["peagle", "peagle-deep"], ids=["1-layer", "2-layers"])
def test_peagle_one_forward_equals_one_row_at_a_time(tiny_llama, drafters, prompts, reference, key) -> None:
    """All k drafts from the catch-up's one forward (the k - 1 mask rows after the pairs)
    vs the catch-up, then each mask row in its own forward (the definition): the same
    drafts every step, hence the same outputs and statistics."""
    from ember.spec.eagle_proposer import PEagleProposer

    def sequential(self, spec_reqs, counts):
        d = self.drafter
        outs = []
        for s, c in zip(spec_reqs, counts):
            for j in range(c):
                seqs = [(s.request.block_ids, s.request.num_tokens - 1 + j, [0])]
                outs.append(self._forward(seqs, d.mask_embed[None], d.mask_hidden[None]))
        return torch.cat(outs)

    results = []
    for variant in ("batched", "sequential"):
        llm = make_llm(tiny_llama, speculative_config=spec("peagle", drafters[key], k=4))
        proposer = llm.engine.speculator.proposer
        assert isinstance(proposer, PEagleProposer)
        drafts = []
        propose = proposer.propose

        def recording(batch, propose=propose, drafts=drafts):
            propose(batch)
            drafts.append([list(s.spec_token_ids) for s in batch.scheduled])
        proposer.propose = recording
        if variant == "sequential":
            proposer.fused = False
            proposer._mask_rows = sequential.__get__(proposer)
        else:   # the catch-up's forward gives the mask rows: none of their own
            proposer._mask_rows = None
        tokens, _ = run(llm, prompts)
        assert tokens == reference
        results.append(drafts)
    assert results[0] == results[1]
    assert any(len(d) == 4 for step in results[0] for d in step)


@pytest.mark.parametrize("tree", [None, {"top_k": 3, "budget": 9}], ids=["chain", "tree"])
def test_peagle_mask_rows_get_their_own_forward_after_a_long_catch_up(tiny_llama, drafters, prompts,
                                                                      reference, tree) -> None:
    """With a small token budget, a catch-up after steps without drafts runs in several
    forwards; P-EAGLE's mask rows then take a forward of their own (else they ride in the
    catch-up's). Both happen in one run, and the output is the target's."""
    llm = make_llm(tiny_llama, speculative_config=spec("peagle", drafters["peagle"], k=3, tree=tree),
                   max_num_batched_tokens=16)
    ctl = force_k(llm, [0, 0, 0, 0, 0, 3, 3, 0, 0, 0, 0, 0, 0, 3])
    proposer = llm.engine.speculator.proposer
    drafting = steps_of_calls(proposer, "propose", ctl)
    own = steps_of_calls(proposer, "_mask_rows", ctl)
    tokens, _ = run(llm, prompts)
    assert tokens == reference
    assert own and set(drafting) - set(own)   # some steps each way
    assert llm.engine.spec_stats()["num_accepted_tokens"] > 0
    assert_no_leaks(llm.engine)


@pytest.mark.parametrize("method", ["eagle", "peagle"])
def test_trees_are_the_per_node_reference_on_the_drafters_log_probs(tiny_llama, drafters, prompts, reference,
                                                                    method, monkeypatch) -> None:
    """The proposer scores every request's fed nodes of a depth with one top_children (P-EAGLE:
    the roots and every mask row with one); rebuilt one node at a time by the per-node
    reference builder from the same log q rows, every tree is the same, bit for bit."""
    from test_tree import PerNodeTreeBuilder

    from ember.spec import eagle_proposer
    from ember.spec.tree import top_children
    calls: list[list[torch.Tensor]] = []   # this step's top_children inputs
    drafting: list[list] = []               # this step's drafting requests, in the proposer's order

    def recording_top_children(top_k, *logq, token_ids=None):
        # The rows as the per-node reference sees them: over the target's vocabulary (the
        # proposer ranks the draft vocabulary's columns and maps them to tokens on the host).
        calls.append([x.clone() if token_ids is None else
                      x.new_full((x.shape[0], 256), float("-inf")).index_copy_(1, torch.from_numpy(token_ids), x)
                      for x in logq])
        return top_children(top_k, *logq, token_ids=token_ids)

    def recording_catch_up(*args, **kw):
        out = catch_up(*args, **kw)
        drafting.append(out[0])
        return out
    catch_up = eagle_proposer.catch_up
    monkeypatch.setattr(eagle_proposer, "top_children", recording_top_children)
    monkeypatch.setattr(eagle_proposer, "catch_up", recording_catch_up)
    # A small step budget leaves some requests fewer slots: trees of every depth. (Greedy
    # P-EAGLE trees are built on the device unless asked not to: test_device_tree has those.)
    llm = make_llm(tiny_llama, speculative_config=spec(method, drafters[method],
                                                       tree={"top_k": 3, "budget": 9, "device_greedy": False}),
                   max_num_batched_tokens=24)
    proposer = llm.engine.speculator.proposer
    propose, checked, depths = proposer.propose, [0], set()

    def checking(batch):
        calls.clear()
        drafting.clear()
        propose(batch)
        if not drafting[0]:
            return
        spec_reqs = drafting[0]
        shapes = [proposer.tree.for_room(s.num_spec_slots) for s in spec_reqs]   # (depth, budget)
        ref = [PerNodeTreeBuilder(row, 3) for row in calls[0][0]]
        if method == "eagle":
            for level, (logq,) in enumerate(calls[1:], start=2):
                at = 0
                for r, (depth, _) in zip(ref, shapes):
                    fed = r.to_feed() if depth >= level else []
                    if fed:
                        r.expand(fed, logq[at:at + len(fed)])
                        at += len(fed)
                assert at == logq.shape[0]
        else:
            assert len(calls) == 1
            at = 0
            for r, (depth, _) in zip(ref, shapes):
                for level in range(depth - 1):   # depth level + 2 reads mask row level
                    fed = r.to_feed()
                    if fed:
                        r.expand(fed, calls[0][1][at + level].expand(len(fed), -1))
                at += depth - 1
        for s, r, (depth, budget) in zip(spec_reqs, ref, shapes):
            assert s.spec_tree == r.finish(budget)[0]
            checked[0] += 1
            depths.add(s.spec_tree.max_depth)
    proposer.propose = checking
    tokens, _ = run(llm, prompts)
    assert tokens == reference
    assert checked[0] > 50 and {1, 3} <= depths, (checked, depths)


def test_peagle_greedy_trees_are_verified_on_the_device(tiny_llama, drafters, prompts, reference) -> None:
    """Greedy P-EAGLE trees of one shape take the device path (tree chosen, verified and
    moved on the device; ember.spec.device_tree) in every drafting step; with a sampled
    request in the batch the step goes to the host verifier. Output is the target's, no
    block leaks, drafts accepted (so accepted paths were moved into place)."""
    llm = make_llm(tiny_llama, speculative_config=spec("peagle", drafters["peagle"], k=4,
                                                       tree={"top_k": 3, "budget": 12}))
    runner = llm.engine.runner
    ctl = force_k(llm, [4] * 1000)
    layouts = []
    inner = runner._verify_device_trees
    runner._verify_device_trees = lambda *a: (layouts.append(a[-1]), inner(*a))
    on_device = steps_of_calls(runner, "_verify_device_trees", ctl)
    on_host = steps_of_calls(runner, "_verify_trees", ctl)
    tokens, _ = run(llm, prompts)
    assert tokens == reference
    assert len(on_device) > 10 and not on_host
    assert set(layouts) == {True, False}   # steps of [B, N + 1] rows, and steps in another order
    stats = llm.engine.spec_stats()
    assert stats["num_accepted_tokens"] > 0, stats
    assert_no_leaks(llm.engine)
    # One sampled request among greedy ones: those steps verify on the host.
    sampled = SamplingParams(temperature=0.8, seed=1, max_tokens=24, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts[:3]], [GREEDY, sampled, GREEDY],
                        use_tqdm=False)
    assert [outs[0].outputs[0].token_ids, outs[2].outputs[0].token_ids] == [reference[0], reference[2]]
    assert on_host
    assert_no_leaks(llm.engine)


def test_adaptive_leaves_each_shapes_first_drafting_step_out_of_its_cost_fits(tiny_llama, drafters, prompts,
                                                                             reference) -> None:
    """A new (k, batch) shape's first drafting step compiles and captures (on the H200 tens of
    ms): fitted, it kept adaptive P-EAGLE off at batch 1 for good. A slow first propose per
    shape (0.3 s here) must reach neither the draft-cost fit nor the step-cost fit."""
    import time
    llm = make_llm(tiny_llama, speculative_config=spec("peagle", drafters["peagle"], k=3,
                                                       tree={"top_k": 3, "budget": 9}, adaptive=True))
    sp = llm.engine.speculator
    ctl, prop = sp.controller, sp.proposer
    seen, timed = set(), []
    inner_propose, inner_draft, inner_applied = prop.propose, ctl.observe_draft, ctl.observe_applied

    def slow_first(batch):
        key = (batch.spec_k, sum(1 for s in batch.scheduled if s.num_spec_slots > 0))
        slow = key not in seen and key[1] > 0   # a drafting step of a new shape
        seen.add(key)
        if slow:
            time.sleep(0.3)
        out = inner_propose(batch)
        if slow:   # as after a short catch-up (a new k on the GPU), which the draft fit takes
            prop.catch_up_tokens = 0
        return out
    prop.propose = slow_first
    ctl.observe_draft = lambda b, secs: (timed.append(secs), inner_draft(b, secs))
    ctl.observe_applied = lambda n, secs, *a: (timed.append(secs or 0.0), inner_applied(n, secs, *a))
    tokens, _ = run(llm, prompts)
    assert tokens == reference
    assert any(d for _, d in seen) and sp.stats.num_spec_steps > 0
    assert timed and max(timed) < 0.3, max(timed)


def test_adaptive_sizes_trees_down_to_off(tiny_llama, drafters, prompts, reference) -> None:
    llm = make_llm(tiny_llama, speculative_config=spec("eagle", drafters["eagle"], k=4,
                                                       tree={"top_k": 3, "budget": 12}, adaptive=True))
    tokens, _ = run(llm, prompts)
    assert tokens == reference
    sp = llm.engine.speculator
    assert sp.proposer.slots_for(4) == 12 and sp.proposer.slots_for(2) == 6
    # The catch-up (which gives depth 1) and one forward per further depth.
    assert sp.proposer.forwards_for(4) == 4 and sp.proposer.forwards_for(1) == 1
    # On this CPU a verify token costs about a target token: the controller weighs the
    # tree's 12 + 1 tokens per request against its expected gain and often turns it off.
    hist = llm.engine.spec_stats()["k_histogram"]
    assert sum(hist.values()) > 0
    assert_no_leaks(llm.engine)


def test_config_errors(tiny_llama, drafters, tmp_path) -> None:
    with pytest.raises(ValueError, match="not a P-EAGLE drafter"):
        make_llm(tiny_llama, speculative_config=spec("peagle", drafters["eagle"]))
    with pytest.raises(ValueError, match="tree"):
        make_llm(tiny_llama, speculative_config={"method": "ngram", "tree": {"top_k": 2}})
    with pytest.raises(ValueError, match="tree"):
        make_llm(tiny_llama, speculative_config=spec("eagle", drafters["eagle"], tree={"width": 2}))
    with pytest.raises(ValueError, match="needs \"model\""):
        make_llm(tiny_llama, speculative_config={"method": "eagle"})


def test_a_tree_budget_beyond_the_expansion_is_reported(caplog) -> None:
    """Depth 3, top-3 trees hold at most 3 + 2 * 9 = 21 nodes: a budget of 24 says so."""
    from ember.spec.config import SpeculativeConfig
    with caplog.at_level("WARNING", logger="ember"):
        cfg = SpeculativeConfig.parse({"method": "peagle", "model": "x", "num_speculative_tokens": 3,
                                       "tree": {"top_k": 3, "budget": 24}})
    assert cfg.tree.budget_for(3) == 21 and "at most 21 nodes" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="ember"):
        SpeculativeConfig.parse({"method": "peagle", "model": "x", "num_speculative_tokens": 5,
                                 "tree": {"top_k": 3, "budget": 24}})
    assert "nodes" not in caplog.text


def _random_drafter_for(config: ModelConfig, folder: str, draft_vocab: int, parallel: bool = False) -> str:
    """A random EAGLE-3 (or P-EAGLE) drafter shaped for `config` (greedy identity needs no skill)."""
    cfg = dict(config.hf_config)
    cfg.update(num_hidden_layers=1, draft_vocab_size=draft_vocab, architectures=["LlamaForCausalLMEagle3"],
               parallel_drafting=parallel, parallel_positions=4 if parallel else 0)
    ecfg = EagleConfig.from_dict(cfg, config)
    torch.manual_seed(0)
    d = EagleDrafter(ecfg)
    with torch.no_grad():
        for name, p in d.named_parameters():
            p.copy_(torch.ones_like(p) if "norm" in name else torch.randn_like(p) * 0.02)
        d.d2t.copy_(torch.arange(draft_vocab) * 3)   # draft id i -> target id 4 i
    save_eagle(d, folder)
    return folder


def test_real_smollm2_tree_greedy_identical(smollm2_llm, tmp_path) -> None:
    prompt = "Once upon a time, in a small village by the sea, there lived"
    params = SamplingParams(temperature=0.0, max_tokens=24)
    ref = smollm2_llm.generate([prompt], params, use_tqdm=False)[0].outputs[0]
    folder = _random_drafter_for(smollm2_llm.engine.model_config, str(tmp_path / "d"), 4096)
    with open(os.path.join(folder, "config.json")) as f:
        assert json.load(f)["eagle_aux_hidden_state_layer_ids"] == [2, 15, 27]
    for method, tree in [("eagle", {"top_k": 2, "budget": 6}), ("eagle", None)]:
        llm = LLM("smollm2-135m", max_model_len=256,
                  speculative_config=spec(method, folder, k=3, tree=tree))
        out = llm.generate([prompt], params, use_tqdm=False)[0].outputs[0]
        assert out.token_ids == ref.token_ids and out.text == ref.text
        assert llm.engine.spec_stats()["num_draft_tokens"] > 0
        assert_no_leaks(llm.engine)


def test_kv_pool_leaves_room_for_the_proposers_per_slot_state(tiny_llama, drafters) -> None:
    # The drafter's own K/V and the target rows it reads are one more row per pool slot:
    # the pool is sized with them counted, so all of it fits the KV memory asked for (the
    # CPU's explicit budget; on CUDA the same sizing starts from the card's free memory).
    from ember.cache.kv_spec import kv_bytes_per_token
    budget = 2 ** 20
    sized = {}
    for method in ("none", "eagle"):
        cfg = None if method == "none" else spec("eagle", drafters["eagle"])
        llm = LLM(tiny_llama.path, block_size=4, dtype="float32", max_model_len=64, device="cpu",
                  kv_cache_memory=budget / 2 ** 30, speculative_config=cfg)
        runner, proposer = llm.engine.runner, llm.engine.speculator.proposer
        target = runner.num_blocks * 4 * kv_bytes_per_token(runner.model.attention_layers(), torch.float32)
        beside = 0 if method == "none" else proposer.kv.nbytes + proposer.aux.nbytes
        assert target + beside <= budget
        assert beside == runner.num_blocks * 4 * proposer.bytes_per_token(torch.float32)
        sized[method] = (runner.num_blocks, beside)
    assert sized["eagle"][1] > 0 and sized["eagle"][0] < sized["none"][0]
