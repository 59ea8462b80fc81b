"""MTP self-speculation: the module against a plain-torch rendering of its definition, the
proposer's drafts against that reference step by step (its KV and hidden-state hook under
acceptance, rollback, chunked prefill and preemption), greedy output identical to plain
decoding, DeepSeek-naming round trips, and train-mtp on a tiny model."""
from __future__ import annotations

import json
import os
import random

import pytest
import torch
from _spec_helpers import (
    force_k,
    mixed_batch_params,
    random_mtp_tensors,
    record_step_kinds,
    steps_of_calls,
    steps_of_forwards,
)
from conftest import EOS, TinyCheckpoint, assert_no_leaks, random_prompts

from ember import LLM, SamplingParams
from ember.config import ModelConfig
from ember.engine.model_runner import build_forward_batch
from ember.engine.scheduler import SchedulerOutput
from ember.spec.mtp import MTPProposer, save_mtp_checkpoint
from ember.spec.proposer import Proposer

GREEDY = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
LENGTHS = [3, 5, 9, 14, 20, 27, 33, 40]


def make_llm(ckpt: TinyCheckpoint, **kw) -> LLM:
    args = {"num_kv_blocks": 256, "block_size": 4, "dtype": "float32", "max_model_len": 128}
    args.update(kw)
    return LLM(ckpt.path, **args)


def mtp_config(model: str | None, k: int = 3, adaptive: bool = False) -> dict:
    cfg = {"method": "mtp", "num_speculative_tokens": k, "adaptive": adaptive}
    if model is not None:
        cfg["model"] = model
    return cfg


def run(llm: LLM, prompts: list[list[int]], params=GREEDY):
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    assert all(o.finished for o in outs)
    return [o.outputs[0].token_ids for o in outs], outs


@pytest.fixture(scope="module")
def mtp_tensors(tiny_llama: TinyCheckpoint) -> dict[str, torch.Tensor]:
    return random_mtp_tensors(tiny_llama, seed=7)


@pytest.fixture(scope="module")
def mtp_dir(tiny_llama, mtp_tensors, tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("mtp") / "mtp")
    save_mtp_checkpoint(path, mtp_tensors, ModelConfig.from_file(os.path.join(tiny_llama.path, "config.json")))
    return path


# ---- a plain-torch rendering of the definition -------------------------------------------
class ReferenceMTP:
    """x = eh_proj(cat(enorm(embed(t_{i+1})), hnorm(h_i))), a transformers decoder layer
    (causal over the pairs so far, RoPE at the pair's index), shared_head.norm, the target's
    head; h_i is the target's output after its final norm.

    `tensors` are the MTP's own (enorm, hnorm, eh_proj, shared_head.norm); `layer` is the
    block as a transformers decoder layer of the target's type (default: a Llama layer
    loaded from `tensors`)."""

    def __init__(self, target: TinyCheckpoint, tensors: dict[str, torch.Tensor],
                 layer: torch.nn.Module | None = None) -> None:
        from transformers.models.llama.modeling_llama import LlamaDecoderLayer
        self.hf = target.hf_model
        self.eps = target.config.rms_norm_eps
        self.t = tensors
        if layer is None:
            layer = LlamaDecoderLayer(target.config, layer_idx=0)
            layer.load_state_dict({k: v for k, v in tensors.items()
                                   if k.startswith(("self_attn.", "mlp.", "input_", "post_"))})
        self.layer = layer.eval()

    def norm(self, x: torch.Tensor, name: str) -> torch.Tensor:
        return self.t[f"{name}.weight"] * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)

    @torch.no_grad()
    def target_hidden(self, ids: list[int]) -> torch.Tensor:
        return self.hf.model(torch.tensor([ids])).last_hidden_state[0]   # [L, H], after the final norm

    @torch.no_grad()
    def __call__(self, next_ids: list[int], prev: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Pairs 0..T-1 -> (o [T, H], logits [T, vocab])."""
        e = self.hf.model.embed_tokens(torch.tensor(next_ids))
        x = torch.cat([self.norm(e, "enorm"), self.norm(prev, "hnorm")], -1) @ self.t["eh_proj.weight"].T
        pos = torch.arange(len(next_ids))[None]
        cos_sin = self.hf.model.rotary_emb(x[None], pos)
        o = self.layer(x[None], position_embeddings=cos_sin, position_ids=pos)[0]
        return o, self.hf.lm_head(self.norm(o, "shared_head.norm"))

    def drafts(self, seq: list[int], n: int, own: list[int]) -> list[int]:
        """The greedy chain the MTP should draft when the request holds seq[:n], chaining
        through the drafts `own` it actually made (so each position is checked on its own)."""
        nxt, prev = list(seq[1:n]), self.target_hidden(seq[:n - 1])
        o, logits = self(nxt, prev)
        out = [int(logits[-1].argmax())]
        for d in own[:-1]:
            nxt.append(d)
            prev = torch.cat([prev, o[-1:]])
            o, logits = self(nxt, prev)
            out.append(int(logits[-1].argmax()))
        return out


def test_module_matches_the_definition(tiny_llama, mtp_tensors, mtp_dir) -> None:
    llm = make_llm(tiny_llama, speculative_config=mtp_config(mtp_dir))
    mtp = llm.engine.speculator.proposer.mtp
    ref = ReferenceMTP(tiny_llama, mtp_tensors)
    seq = random_prompts([12], seed=3)[0]
    h = ref.target_hidden(seq)
    runner = llm.engine.runner
    fb = build_forward_batch([(list(range(4)), 0, seq[1:])], runner.block_size, runner.device)
    runner.backend.prepare(fb)
    with torch.inference_mode():
        o = mtp(fb.input_ids, fb.positions, h[:-1], fb)
        logits = mtp.compute_logits(o)
    ref_o, ref_logits = ref(seq[1:], h[:-1])
    torch.testing.assert_close(o, ref_o, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(logits, ref_logits, atol=1e-4, rtol=1e-4)


# ---- the proposer in the engine ----------------------------------------------------------
@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    return random_prompts(LENGTHS, seed=5)


@pytest.fixture(scope="module")
def reference(tiny_llama, prompts) -> list[list[int]]:
    tokens, _ = run(make_llm(tiny_llama), prompts)
    return tokens


@pytest.mark.parametrize("k", [1, 2, 3])
def test_greedy_mtp_is_token_identical(tiny_llama, prompts, reference, mtp_dir, k) -> None:
    llm = make_llm(tiny_llama, speculative_config=mtp_config(mtp_dir, k))
    tokens, _ = run(llm, prompts)
    assert tokens == reference
    stats = llm.engine.spec_stats()
    assert stats["num_draft_tokens"] > 0
    assert len(stats["acceptance_rate_per_position"]) == k
    assert_no_leaks(llm.engine)


def test_only_a_proposer_that_reads_hidden_states_gets_the_hook(tiny_llama, mtp_dir) -> None:
    for spec in (None, {"method": "ngram"}):
        assert make_llm(tiny_llama, speculative_config=spec).engine.runner.hidden_states_hook is None
    llm = make_llm(tiny_llama, speculative_config=mtp_config(mtp_dir))
    assert llm.engine.runner.hidden_states_hook == llm.engine.speculator.proposer.observe_hidden_states


class RecordingOracle(Proposer):
    """Runs the MTP proposer, records the drafts it made (request, its length then, drafts),
    then replaces them with the known continuation corrupted at random: steps accept all,
    some or none, so the MTP's hidden-state hook sees every kind of step."""

    name = "recording-oracle"
    needs_hidden_states = True

    def __init__(self, inner: MTPProposer, reference: dict[tuple[int, ...], list[int]],
                 error_rate: float) -> None:
        self.inner = inner
        self.reference = reference
        self.error_rate = error_rate
        self.rng = random.Random(0)
        self.records: list[tuple[tuple[int, ...], int, list[int]]] = []

    def observe_hidden_states(self, step) -> None:
        self.inner.observe_hidden_states(step)

    def propose(self, batch: SchedulerOutput) -> None:
        self.inner.propose(batch)
        for s in batch.scheduled:
            if not s.spec_token_ids:
                continue
            r = s.request
            self.records.append((tuple(r.prompt_token_ids), r.num_tokens, list(s.spec_token_ids)))
            future = self.reference[tuple(r.prompt_token_ids)][r.num_output_tokens:]
            s.spec_token_ids = [t if self.rng.random() > self.error_rate else (t + 1) % 256
                                for t in future[:len(s.spec_token_ids)]]
            s.spec_probs = None


@pytest.mark.parametrize("engine_args", [{}, {"max_num_batched_tokens": 16},
                                         {"num_kv_blocks": 40, "prefix_cache": "radix"},
                                         {"num_kv_blocks": 40, "prefix_cache": "none"}],
                         ids=["roomy", "chunked-prefill", "preempt-radix", "preempt-no-cache"])
def test_drafts_follow_the_reference_through_accepts_and_rollbacks(
        tiny_llama, prompts, reference, mtp_tensors, mtp_dir, engine_args) -> None:
    """Every draft chain the MTP makes equals the reference computed from scratch on the
    request's tokens: its K/V and its catch-up (from the kept hidden rows) are right after
    prefill chunks, accepted and rejected drafts, and recomputation after preemption."""
    llm = make_llm(tiny_llama, speculative_config=mtp_config(mtp_dir, 3), **engine_args)
    oracle = RecordingOracle(llm.engine.speculator.proposer,
                             {tuple(p): t for p, t in zip(prompts, reference)}, error_rate=0.3)
    llm.engine.speculator.proposer = oracle
    tokens, _ = run(llm, prompts)
    assert tokens == reference
    stats = llm.engine.spec_stats()
    assert 0.3 < stats["acceptance_rate"] < 0.95
    if "num_kv_blocks" in engine_args:
        assert llm.engine.scheduler.num_preemptions > 0
    ref = ReferenceMTP(tiny_llama, mtp_tensors)
    full = {tuple(p): p + t for p, t in zip(prompts, reference)}
    checked = 0
    for prompt, n, drafts in oracle.records[::3]:   # a third of them keeps the test fast
        assert drafts == ref.drafts(full[prompt], n, drafts), (len(prompt), n)
        checked += 1
    assert checked > 20
    assert_no_leaks(llm.engine)


@pytest.mark.parametrize("engine_args", [{}, {"num_kv_blocks": 40, "prefix_cache": "radix"},
                                         {"max_num_batched_tokens": 16}],
                         ids=["roomy", "preempt-radix", "small-budget"])
def test_steps_without_drafts_run_no_mtp_forward(tiny_llama, prompts, reference, mtp_tensors, mtp_dir,
                                                 engine_args) -> None:
    """k forced to 0 on most steps: those steps never reach the proposer (no propose call,
    no MTP forward; the hook only keeps hidden rows). A step that drafts again first
    catches up over every token since the request last drafted, and its drafts still
    equal the reference computed from scratch; the output is the target's. With a small
    token budget, catch-ups longer than it run in several forwards."""
    llm = make_llm(tiny_llama, speculative_config=mtp_config(mtp_dir, 3), **engine_args)
    ctl = force_k(llm, [0, 0, 0, 2, 0, 3, 0, 0, 0, 0, 1])
    proposer = llm.engine.speculator.proposer
    forwards = steps_of_forwards(proposer.mtp, ctl)
    catch_up_forwards = steps_of_calls(proposer, "_catch_up_forward", ctl)
    gaps = []   # per drafting request after its first draft: the tokens it catches up over
    propose = proposer.propose

    def recording(batch):
        gaps.extend(s.request.num_computed_tokens - proposer.kv.covered(s.request)
                    for s in batch.scheduled if s.num_spec_slots and proposer.kv.covered(s.request))
        propose(batch)
    proposer.propose = recording
    oracle = RecordingOracle(proposer, {tuple(p): t for p, t in zip(prompts, reference)}, error_rate=0.3)
    llm.engine.speculator.proposer = oracle
    proposes = steps_of_calls(oracle, "propose", ctl)
    tokens, _ = run(llm, prompts)
    assert tokens == reference
    off = {i for i, k in enumerate(ctl.ks) if k == 0}
    assert len(off) >= 10 and len(ctl.ks) - len(off) >= 5
    assert not off & set(forwards) and not off & set(proposes)
    assert len(set(forwards)) >= 4 and len(oracle.records) > 20
    # Drafting resumed after steps off: catch-ups longer than one verification (<= 4 tokens).
    assert max(gaps) > 4
    if "num_kv_blocks" in engine_args:
        assert llm.engine.scheduler.num_preemptions > 0
    # One catch-up forward per drafting step, unless it exceeds the token budget.
    several = len(catch_up_forwards) - len(set(catch_up_forwards))
    assert several > 0 if "max_num_batched_tokens" in engine_args else several == 0
    ref = ReferenceMTP(tiny_llama, mtp_tensors)
    full = {tuple(p): p + t for p, t in zip(prompts, reference)}
    for prompt, n, drafts in oracle.records:
        assert drafts == ref.drafts(full[prompt], n, drafts), (len(prompt), n)
    assert_no_leaks(llm.engine)


def test_catch_up_reads_the_hidden_rows_of_a_cached_prefix(tiny_llama, mtp_tensors, mtp_dir) -> None:
    """A request whose prompt starts with another's, admitted after that one finished,
    takes the cached blocks: the target never computes their tokens for it, and its first
    catch-up reads the hidden rows the first request left there. Its drafts equal the
    reference's."""
    a = random_prompts([37], seed=11)[0]
    b = a[:29] + random_prompts([9], seed=12)[0][1:]
    plain = make_llm(tiny_llama)
    ref_tokens = [run(plain, [p])[0][0] for p in (a, b)]
    llm = make_llm(tiny_llama, speculative_config=mtp_config(mtp_dir, 2), prefix_cache="radix")
    oracle = RecordingOracle(llm.engine.speculator.proposer,
                             {tuple(a): ref_tokens[0], tuple(b): ref_tokens[1]}, error_rate=0.3)
    llm.engine.speculator.proposer = oracle
    assert run(llm, [a])[0] == [ref_tokens[0]]
    tokens, outs = run(llm, [b])
    assert tokens == [ref_tokens[1]] and outs[0].num_cached_tokens >= 24
    ref = ReferenceMTP(tiny_llama, mtp_tensors)
    records = [r for r in oracle.records if r[0] == tuple(b)]
    assert len(records) > 5
    for prompt, n, drafts in records:
        assert drafts == ref.drafts(b + ref_tokens[1], n, drafts), n
    assert_no_leaks(llm.engine)


def test_batch_mixes_mtp_and_ordinary_requests(tiny_llama, prompts, reference, mtp_dir) -> None:
    llm = make_llm(tiny_llama, speculative_config=mtp_config(mtp_dir, 2),
                   max_num_batched_tokens=24)
    kinds = record_step_kinds(llm, lambda s: bool(s.spec_token_ids))
    # Chunked prefills (small budget) and prompt-logprobs requests do not speculate; the
    # others do, in the same batches.
    tokens, _ = run(llm, prompts, mixed_batch_params(len(prompts)))
    assert tokens == reference
    assert frozenset({True, False}) in kinds
    assert_no_leaks(llm.engine)


def test_stops_inside_a_step(tiny_llama, prompts, reference, mtp_dir) -> None:
    stop = reference[2][9]
    params = SamplingParams(temperature=0.0, max_tokens=19, stop_token_ids=[stop, EOS])
    ref, ref_outs = run(make_llm(tiny_llama), prompts, params)
    tokens, outs = run(make_llm(tiny_llama, speculative_config=mtp_config(mtp_dir, 3)), prompts, params)
    assert tokens == ref
    assert [o.outputs[0].finish_reason for o in outs] == [o.outputs[0].finish_reason for o in ref_outs]


def test_seeded_sampling_is_reproducible(tiny_llama, prompts, mtp_dir) -> None:
    params = [SamplingParams(temperature=0.8, top_p=0.9, seed=10 + i, max_tokens=16, ignore_eos=True)
              for i in range(len(prompts))]
    a, _ = run(make_llm(tiny_llama, speculative_config=mtp_config(mtp_dir)), prompts, params)
    llm = make_llm(tiny_llama, speculative_config=mtp_config(mtp_dir))
    b, _ = run(llm, prompts[::-1], params[::-1])   # other order, other batch neighbours
    assert a == b[::-1]
    assert llm.engine.spec_stats()["num_draft_tokens"] > 0
    assert_no_leaks(llm.engine)


# ---- DeepSeek-V3 naming ----------------------------------------------------------------
def assert_loaded(mtp, tensors: dict[str, torch.Tensor]) -> None:
    """Every tensor of the layer sits where ember's module keeps it (q/k/v and gate/up
    in their merged layers)."""
    t = tensors
    a = "self_attn."
    expect = {
        "enorm.weight": t["enorm.weight"], "hnorm.weight": t["hnorm.weight"],
        "eh_proj.weight": t["eh_proj.weight"], "shared_head.norm.weight": t["shared_head.norm.weight"],
        "block.layer.self_attn.qkv_proj.weight": torch.cat([t[a + "q_proj.weight"], t[a + "k_proj.weight"],
                                                            t[a + "v_proj.weight"]]),
        "block.layer.self_attn.o_proj.weight": t[a + "o_proj.weight"],
        "block.layer.mlp.gate_up_proj.weight": torch.cat([t["mlp.gate_proj.weight"], t["mlp.up_proj.weight"]]),
        "block.layer.mlp.down_proj.weight": t["mlp.down_proj.weight"],
        "block.layer.input_layernorm.weight": t["input_layernorm.weight"],
        "block.layer.post_attention_layernorm.weight": t["post_attention_layernorm.weight"],
    }
    params = dict(mtp.named_parameters())
    assert set(params) == set(expect)
    for name, want in expect.items():
        assert torch.equal(params[name], want), name


def test_deepseek_naming_round_trips(tiny_llama, mtp_tensors, tmp_path) -> None:
    """A folder in DeepSeek-V3's MTP naming, with the embedding and head copies it carries,
    loads into the module tensor for tensor; so does a target checkpoint carrying its own
    MTP layer (`model` omitted), and the target itself then ignores that layer."""
    import shutil

    from safetensors.torch import load_file
    cfg = ModelConfig.from_file(os.path.join(tiny_llama.path, "config.json"))
    hf = tiny_llama.hf_model
    with_copies = dict(mtp_tensors, **{"embed_tokens.weight": hf.model.embed_tokens.weight.detach(),
                                       "shared_head.head.weight": hf.lm_head.weight.detach()})
    folder = str(tmp_path / "mtp")
    save_mtp_checkpoint(folder, with_copies, cfg)
    names = set(load_file(os.path.join(folder, "model.safetensors")))
    assert names == {f"model.layers.{cfg.num_hidden_layers}.{n}" for n in with_copies}
    assert_loaded(make_llm(tiny_llama, speculative_config=mtp_config(folder)).engine.speculator.proposer.mtp,
                  mtp_tensors)

    own = str(tmp_path / "target-with-mtp")
    shutil.copytree(tiny_llama.path, own)
    shutil.copy(os.path.join(folder, "model.safetensors"), os.path.join(own, "mtp.safetensors"))
    with open(os.path.join(own, "config.json")) as f:
        hf_cfg = json.load(f)
    with open(os.path.join(own, "config.json"), "w") as f:
        json.dump(dict(hf_cfg, num_nextn_predict_layers=1), f)
    llm = LLM(own, num_kv_blocks=256, block_size=4, dtype="float32", max_model_len=128,
              speculative_config=mtp_config(None, 2))
    assert_loaded(llm.engine.speculator.proposer.mtp, mtp_tensors)
    prompts = random_prompts([7, 12], seed=2)
    ref, _ = run(make_llm(tiny_llama), prompts)
    tokens, _ = run(llm, prompts)
    assert tokens == ref

    with pytest.raises(ValueError, match="needs \"model\""):
        make_llm(tiny_llama, speculative_config=mtp_config(None))
    # A layer for another model's shape is refused before anything is loaded.
    bad = str(tmp_path / "bad")
    save_mtp_checkpoint(bad, mtp_tensors, ModelConfig.from_dict(dict(hf_cfg, hidden_size=32)))
    with pytest.raises(ValueError, match="hidden_size"):
        make_llm(tiny_llama, speculative_config=mtp_config(bad))


# ---- train-mtp --------------------------------------------------------------------------
def test_trainer_module_is_the_definition(tiny_llama) -> None:
    from ember.spec.train_mtp import TrainableMTP
    torch.manual_seed(0)
    module = TrainableMTP(tiny_llama.hf_model)
    ref = ReferenceMTP(tiny_llama, {k: v.detach() for k, v in module.layer_tensors().items()})
    seq = random_prompts([10], seed=4)[0]
    h = ref.target_hidden(seq)
    with torch.no_grad():
        o = module(torch.tensor([seq[1:]]), h[None, :-1])[0]
        logits = module.logits(o)
    ref_o, ref_logits = ref(seq[1:], h[:-1])
    torch.testing.assert_close(o, ref_o, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=1e-5)
    # Initialised from the target: its last layer and its final norm.
    last = tiny_llama.hf_model.model.layers[-1]
    assert torch.equal(module.block.mlp.up_proj.weight, last.mlp.up_proj.weight)
    assert torch.equal(module.shared_head_norm.weight, tiny_llama.hf_model.model.norm.weight)


def test_training_lowers_the_loss(tiny_llama) -> None:
    import argparse
    import copy

    from ember.spec.distill import teacher_topk, topk_kl, train_loop
    from ember.spec.train_mtp import TrainableMTP, pairs
    target = copy.deepcopy(tiny_llama.hf_model).requires_grad_(False)   # frozen, as load_target leaves it
    before = {k: v.clone() for k, v in target.state_dict().items()}
    g = torch.Generator().manual_seed(0)
    chunks = torch.randint(3, 256, (8, 32), generator=g)
    ids, probs, hidden = teacher_topk(target, chunks, batch=4, top_k=16, log=lambda *_: None,
                                      keep_hidden=True)
    assert hidden.shape == (8, 32, target.config.hidden_size)
    torch.manual_seed(0)
    mtp = TrainableMTP(target)

    def loss(idx: torch.Tensor) -> torch.Tensor:
        nxt, prev, t_ids, t_probs = pairs(chunks[idx], hidden[idx], ids[idx], probs[idx])
        return topk_kl(mtp.logits(mtp(nxt, prev)), t_ids, t_probs)
    args = argparse.Namespace(lr=3e-3, epochs=15, batch_size=4, steps=0)
    losses = train_loop(list(mtp.parameters()), len(chunks), loss, args, deadline=float("inf"),
                        log=lambda *_: None)
    assert len(losses) == 30
    assert sum(losses[-3:]) < 0.7 * sum(losses[:3])
    assert all(torch.equal(v, before[k]) for k, v in target.state_dict().items())


def test_train_mtp_cli_end_to_end(tmp_path) -> None:
    """`ember train-mtp` on a tiny Llama with a tokenizer: the saved folder loads as a
    proposer, and greedy output with it is the target's."""
    from _gguf_helpers import _CORPUS, tiny_bpe
    from transformers import LlamaConfig, LlamaForCausalLM

    from ember.cli import main
    tok = tiny_bpe()
    target = str(tmp_path / "target")
    cfg = LlamaConfig(vocab_size=tok.get_vocab_size(), hidden_size=32, intermediate_size=64,
                      num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                      max_position_embeddings=256, initializer_range=0.1, tie_word_embeddings=True)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(target, safe_serialization=True)
    tok.save(os.path.join(target, "tokenizer.json"))
    text = tmp_path / "text.txt"
    text.write_text(" ".join(_CORPUS) * 8)
    out = str(tmp_path / "mtp")
    main(["train-mtp", "--target", target, "--text", str(text), "--out", out, "--seq-len", "32",
          "--batch-size", "4", "--epochs", "4", "--steps", "6", "--lr", "3e-3", "--eval-chunks", "2", "--top-k", "8"])
    with open(os.path.join(out, "train_log.json")) as f:
        log = json.load(f)
    assert log["steps"] == 6 and log["kl_curve"][-1] < log["kl_curve"][0]
    with open(os.path.join(out, "config.json")) as f:
        assert json.load(f)["num_hidden_layers"] == 2
    llm = LLM(target, num_kv_blocks=128, block_size=4, dtype="float32", max_model_len=128,
              speculative_config=mtp_config(out, 2))
    plain = LLM(target, num_kv_blocks=128, block_size=4, dtype="float32", max_model_len=128)
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    prompts = ["The quick brown fox", "Numbers 1234567890 and"]
    got = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    want = [o.outputs[0].token_ids for o in plain.generate(prompts, params, use_tqdm=False)]
    assert got == want
    assert llm.engine.spec_stats()["num_draft_tokens"] > 0


# ---- end to end under sampling -----------------------------------------------------------
def test_sampled_tokens_follow_the_target_end_to_end(tmp_path) -> None:
    """A tiny target with an 8-token vocabulary, so that a random MTP's draft distribution
    overlaps the target's and drafts are both accepted and rejected: over many seeded
    requests, the second token (verified against draft 0) and the third (draft 1, chained,
    or the correction / bonus) must follow the target's distributions given the first,
    computed independently with transformers."""
    from _stats import chi2_pvalue
    from transformers import LlamaConfig, LlamaForCausalLM

    from ember.layers.sampler import SamplingBatch, SamplingRow, sampling_probs
    cfg = LlamaConfig(vocab_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                      initializer_range=0.3, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    torch.manual_seed(0)
    hf = LlamaForCausalLM(cfg).eval()
    path = str(tmp_path / "target")
    hf.save_pretrained(path, safe_serialization=True)
    target = TinyCheckpoint("vocab8", path, cfg, hf)
    save_mtp_checkpoint(str(tmp_path / "mtp"), random_mtp_tensors(target, seed=1),
                        ModelConfig.from_file(os.path.join(path, "config.json")))
    prompt = [1, 5, 3, 7, 4]
    n = 1200
    params = [SamplingParams(temperature=1.0, max_tokens=4, ignore_eos=True, seed=100 + i) for i in range(n)]
    llm = LLM(path, num_kv_blocks=1024, block_size=4, dtype="float32", max_model_len=32,
              speculative_config=mtp_config(str(tmp_path / "mtp"), 2))
    tokens, _ = run(llm, [prompt] * n, params)
    stats = llm.engine.spec_stats()
    assert 0.2 < stats["acceptance_rate"] < 0.95
    assert stats["acceptance_rate_per_position"][1] > 0.05

    def p_next(ids: list[int]) -> torch.Tensor:
        with torch.no_grad():
            logits = hf(torch.tensor([ids])).logits[0, -1:]
        row = SamplingRow(SamplingParams(temperature=1.0), prompt, ids[len(prompt):])
        return sampling_probs(logits, SamplingBatch.build([row], 8, "cpu"))[0].double()
    t1 = int(torch.bincount(torch.tensor([t[0] for t in tokens])).argmax())
    given = [t for t in tokens if t[0] == t1]
    assert len(given) > 300
    p2 = p_next(prompt + [t1])
    p3 = sum(p2[t2] * p_next(prompt + [t1, t2]) for t2 in range(8))
    for pos, p in ((1, p2), (2, p3)):
        counts = torch.bincount(torch.tensor([t[pos] for t in given]), minlength=8).double()
        assert chi2_pvalue(counts, p) > 1e-4, pos


# ---- a DeepSeek-V3 target carrying its own MTP layer -------------------------------------
def test_deepseek_v3_target_with_its_own_mtp_layer(tmp_path) -> None:
    """A tiny DeepSeek-V3 (MLA, MoE) checkpoint with an MTP layer (MLA + MoE block) as
    `model.layers.{num_hidden_layers}.*`: with `model` omitted the proposer builds the block
    from the target, its drafts follow a transformers rendering step by step, and greedy
    output is the target's."""
    import shutil

    from safetensors.torch import save_file
    from test_deepseek_v3 import _split_fused_experts, build_ckpt
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import (
        DeepseekV3DecoderLayer,
    )
    ckpt = build_ckpt("moe-8e-2groups", tmp_path)   # 2 layers, MoE from layer 1
    cfg = ckpt.hf_model.config
    n, h = cfg.num_hidden_layers, cfg.hidden_size
    torch.manual_seed(11)
    layer = DeepseekV3DecoderLayer(cfg, layer_idx=n).eval()   # MoE, as layer n of V3 is
    with torch.no_grad():
        for name, w in layer.named_parameters():
            w.normal_(0.0, 0.1) if w.dim() >= 2 else w.uniform_(0.5, 1.5)
        layer.mlp.gate.e_score_correction_bias.normal_(0.0, 0.1)
    own = {f"{name}.weight": torch.empty(h).uniform_(0.5, 1.5)
           for name in ("enorm", "hnorm", "shared_head.norm")}
    own["eh_proj.weight"] = torch.randn(h, 2 * h) * 0.1
    tensors = {**own, **{k: v.detach().clone() for k, v in layer.state_dict().items()},
               "embed_tokens.weight": ckpt.hf_model.model.embed_tokens.weight.detach(),
               "shared_head.head.weight": ckpt.hf_model.lm_head.weight.detach()}
    folder = str(tmp_path / "v3-with-mtp")
    shutil.copytree(ckpt.path, folder)
    save_file({f"model.layers.{n}.{k}": v.contiguous() for k, v in tensors.items()},
              os.path.join(folder, "mtp.safetensors"))
    _split_fused_experts(os.path.join(folder, "mtp.safetensors"))   # experts one by one, as released
    with open(os.path.join(folder, "config.json")) as f:
        hf_cfg = json.load(f)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(dict(hf_cfg, num_nextn_predict_layers=1), f)

    prompts = random_prompts([6, 11, 17], seed=9)
    kw = {"num_kv_blocks": 64, "block_size": 8, "dtype": "float32"}
    plain = LLM(folder, **kw)
    llm = LLM(folder, speculative_config=mtp_config(None, 2), **kw)
    ref_tokens, _ = run(plain, prompts)
    oracle = RecordingOracle(llm.engine.speculator.proposer,
                             {tuple(p): t for p, t in zip(prompts, ref_tokens)}, error_rate=0.3)
    llm.engine.speculator.proposer = oracle
    tokens, _ = run(llm, prompts)
    assert tokens == ref_tokens
    ref = ReferenceMTP(TinyCheckpoint("v3", ckpt.path, cfg, ckpt.hf_model), own, layer)
    full = {tuple(p): p + t for p, t in zip(prompts, ref_tokens)}
    for prompt, length, drafts in oracle.records:
        assert drafts == ref.drafts(full[prompt], length, drafts), (len(prompt), length)
    assert len(oracle.records) > 10
    assert_no_leaks(llm.engine)
    # And without the oracle: the MTP's own drafts, verified.
    tokens, _ = run(LLM(folder, speculative_config=mtp_config(None, 2), **kw), prompts)
    assert tokens == ref_tokens


def test_dummy_weights_get_a_random_mtp_layer(tmp_path) -> None:
    """A config with num_nextn_predict_layers and --load-format dummy (GPU benchmarks at
    real shapes): the MTP layer is random too, and the output is still the target's."""
    from test_deepseek_v3 import build_ckpt
    ckpt = build_ckpt("moe-8e-2groups", tmp_path)
    with open(os.path.join(ckpt.path, "config.json")) as f:
        cfg = json.load(f)
    config = tmp_path / "config.json"
    config.write_text(json.dumps(dict(cfg, num_nextn_predict_layers=1)))
    kw = {"load_format": "dummy", "num_kv_blocks": 32, "block_size": 8, "dtype": "float32"}
    prompts = random_prompts([9, 14], seed=1)
    want, _ = run(LLM(str(config), **kw), prompts)
    llm = LLM(str(config), speculative_config=mtp_config(None, 2), **kw)
    got, _ = run(llm, prompts)
    assert got == want
    assert llm.engine.spec_stats()["num_draft_tokens"] > 0
