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
    args = dict(num_kv_blocks=256, block_size=4, dtype="float32", max_model_len=128)
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


def random_mtp_tensors(target: TinyCheckpoint, seed: int) -> dict[str, torch.Tensor]:
    """One MTP layer's tensors (names inside the layer): a random decoder layer, norms away
    from 1 so that each one matters, a random eh_proj."""
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer
    torch.manual_seed(seed)
    cfg = target.config
    h = cfg.hidden_size
    layer = LlamaDecoderLayer(cfg, layer_idx=0)
    for w in layer.parameters():
        w.data.normal_(0.0, 0.1) if w.dim() == 2 else w.data.uniform_(0.5, 1.5)
    tensors = {k: v.detach().clone() for k, v in layer.state_dict().items()}
    for name in ("enorm", "hnorm", "shared_head.norm"):
        tensors[f"{name}.weight"] = torch.empty(h).uniform_(0.5, 1.5)
    tensors["eh_proj.weight"] = torch.randn(h, 2 * h) * 0.1
    return tensors


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
    """x = eh_proj(cat(enorm(embed(t_{i+1})), hnorm(h_i))), transformers' Llama decoder layer
    (causal over the pairs so far, RoPE at the pair's index), shared_head.norm, the target's
    head; h_i is the target's output after its final norm."""

    def __init__(self, target: TinyCheckpoint, tensors: dict[str, torch.Tensor]) -> None:
        from transformers.models.llama.modeling_llama import LlamaDecoderLayer
        self.hf = target.hf_model
        self.eps = target.config.rms_norm_eps
        self.t = tensors
        self.layer = LlamaDecoderLayer(target.config, layer_idx=0).eval()
        self.layer.load_state_dict({k: v for k, v in tensors.items()
                                    if k.startswith(("self_attn.", "mlp.", "input_", "post_"))})

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
        h = self.target_hidden(seq[:n - 1])
        nxt, prev, out = list(seq[1:n]), h, []
        for d in [None] + own[:-1]:
            if d is not None:
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
    request's tokens: its K/V and kept output are right after prefill chunks, accepted and
    rejected drafts, and recomputation after preemption."""
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


def test_batch_mixes_mtp_and_ordinary_requests(tiny_llama, prompts, reference, mtp_dir) -> None:
    llm = make_llm(tiny_llama, speculative_config=mtp_config(mtp_dir, 2),
                   max_num_batched_tokens=24)
    mixed = []
    execute = llm.engine.runner.execute

    def recording(batch):
        mixed.append({bool(s.spec_token_ids) for s in batch.scheduled} == {True, False})
        return execute(batch)
    llm.engine.runner.execute = recording
    # Chunked prefills (small budget) and prompt-logprobs requests do not speculate; the
    # others do, in the same batches.
    params = [SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True,
                             prompt_logprobs=1 if i % 3 == 0 else None) for i in range(len(prompts))]
    tokens, _ = run(llm, prompts, params)
    assert tokens == reference
    assert any(mixed)
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
