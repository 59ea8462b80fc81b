"""Async scheduling on a CUDA GPU (skipped elsewhere): the same tokens as synchronous
scheduling with CUDA graphs and the Triton kernels, and a decode step's launch never makes
the host wait for the device (the point of it)."""
from __future__ import annotations

import pytest
import torch

from conftest import TinyCheckpoint, random_prompts
from ember import LLM, SamplingParams

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def make_llm(ckpt: TinyCheckpoint, mode: str) -> LLM:
    return LLM(ckpt.path, dtype="bfloat16", async_scheduling=mode, max_model_len=256,
               num_kv_blocks=256, max_num_seqs=16)


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


def test_decode_launch_never_waits_for_the_device(tiny_llama) -> None:
    """torch's sync debug mode raises on any synchronizing call (a blocking copy, .item(),
    .tolist() of a device tensor) made while a pure decode step is launched."""
    llm = make_llm(tiny_llama, "on")
    runner = llm.engine.runner
    launch = runner.launch
    checked = []

    def strict_launch(batch, previous=None, defer=False):
        if all(s.num_query_tokens == 1 for s in batch.scheduled):
            torch.cuda.set_sync_debug_mode("error")
            try:
                step = launch(batch, previous, defer)
            finally:
                torch.cuda.set_sync_debug_mode("default")
            checked.append(step.deferred)
            return step
        return launch(batch, previous, defer)
    runner.launch = strict_launch
    prompts = [{"prompt_token_ids": p} for p in random_prompts([7, 9, 30, 4], seed=5)]
    llm.generate(prompts, params(len(prompts)), use_tqdm=False)
    assert len(checked) >= 30 and all(checked)
