"""Async scheduling on a CUDA GPU (skipped elsewhere): the same tokens as synchronous
scheduling with CUDA graphs and the Triton kernels, and a decode step's launch never makes
the host wait for the device (the point of it), with speculation configured too (steps
where k = 0, the hidden-state hook included)."""
from __future__ import annotations

import os

import pytest
import torch
from _spec_helpers import force_k, random_mtp_tensors

from conftest import TinyCheckpoint, random_prompts
from ember import LLM, SamplingParams
from ember.config import ModelConfig
from ember.spec.mtp import save_mtp_checkpoint

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def make_llm(ckpt: TinyCheckpoint, mode: str, **kw) -> LLM:
    return LLM(ckpt.path, dtype="bfloat16", async_scheduling=mode, max_model_len=256,
               num_kv_blocks=256, max_num_seqs=16, **kw)


def params(n: int) -> list[SamplingParams]:
    return [SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True) if i % 2 else
            SamplingParams(temperature=0.8, top_k=20, top_p=0.9, seed=i, max_tokens=33, ignore_eos=True)
            for i in range(n)]


def test_async_matches_sync_on_gpu(tiny_llama) -> None:
    prompts = [{"prompt_token_ids": p} for p in random_prompts([5, 17, 33, 8, 21, 12], seed=3)]
    ref = make_llm(tiny_llama, "off").generate(prompts, params(len(prompts)), use_tqdm=False)
    llm = make_llm(tiny_llama, "on")
    assert llm.engine.runner.graph_runner is not None
    got = llm.generate(prompts, params(len(prompts)), use_tqdm=False)
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in ref]


def strict_decode_launches(llm: LLM) -> list[bool]:
    """torch's sync debug mode raises on any synchronizing call (a blocking copy, .item(),
    .tolist() of a device tensor) made while a pure decode step without drafts is
    launched; returns, per such launch, whether it was deferred."""
    runner = llm.engine.runner
    launch = runner.launch
    checked = []

    def strict_launch(batch, previous=None, defer=False):
        if batch.spec_k == 0 and all(s.num_query_tokens == 1 for s in batch.scheduled):
            torch.cuda.set_sync_debug_mode("error")
            try:
                step = launch(batch, previous, defer)
            finally:
                torch.cuda.set_sync_debug_mode("default")
            checked.append(step.deferred)
            return step
        return launch(batch, previous, defer)
    runner.launch = strict_launch
    return checked


def test_decode_launch_never_waits_for_the_device(tiny_llama) -> None:
    llm = make_llm(tiny_llama, "on")
    checked = strict_decode_launches(llm)
    prompts = [{"prompt_token_ids": p} for p in random_prompts([7, 9, 30, 4], seed=5)]
    llm.generate(prompts, params(len(prompts)), use_tqdm=False)
    assert len(checked) >= 30 and all(checked)


@pytest.mark.parametrize("method", ["ngram", "mtp"])
def test_speculation_at_k0_never_waits_for_the_device(tiny_llama, tmp_path, method) -> None:
    """Speculation configured, k = 0 on most steps (forced): those steps launch without a
    sync, the MTP's hidden-state hook included, and the tokens are synchronous
    speculation's."""
    if method == "ngram":
        spec = {"method": "ngram", "num_speculative_tokens": 3}
    else:
        config = ModelConfig.from_file(os.path.join(tiny_llama.path, "config.json"))
        save_mtp_checkpoint(str(tmp_path / "mtp"), random_mtp_tensors(tiny_llama, seed=7), config)
        spec = {"method": "mtp", "num_speculative_tokens": 3, "model": str(tmp_path / "mtp")}
    prompts = [{"prompt_token_ids": p} for p in random_prompts([7, 9, 30, 4], seed=5)]
    pattern = [0, 0, 0, 0, 0, 2]
    ref_llm = make_llm(tiny_llama, "off", speculative_config=spec)
    force_k(ref_llm, pattern)
    ref = ref_llm.generate(prompts, params(len(prompts)), use_tqdm=False)
    llm = make_llm(tiny_llama, "on", speculative_config=spec)
    force_k(llm, pattern)
    checked = strict_decode_launches(llm)
    got = llm.generate(prompts, params(len(prompts)), use_tqdm=False)
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in ref]
    assert len(checked) >= 20 and all(checked)
