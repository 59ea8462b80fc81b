"""DeepSeek-V3 on a CUDA GPU (skipped elsewhere): the Triton MLA backend (latent write,
MLA decode kernel, absorbed chunks) and Triton MoE experts, with CUDA graphs, against the
torch reference and transformers; and the V2-Lite shapes on dummy weights."""
from __future__ import annotations

import os

import pytest
import torch
from conftest import random_prompts
from test_deepseek_v3 import build_ckpt
from test_model_parity import hf_greedy

from ember import LLM, SamplingParams

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
V2_LITE = os.path.join(os.path.dirname(__file__), "..", "bench", "configs", "deepseek-v2-lite", "config.json")
PROMPTS = random_prompts([3, 9, 17, 40, 70, 100], seed=5)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    pytest.importorskip("transformers")
    pytest.importorskip("ember.attention.triton_mla", reason="the Triton MLA decode kernel is not merged")
    # The Triton MLA kernel takes power-of-two R and P of at least 16.
    return build_ckpt("moe-16e-4groups-yarn", tmp_path_factory.mktemp("deepseek_gpu"),
                      qk_rope_head_dim=16)


def _greedy(path: str, dtype: str, backend: str, eager: bool, n: int, **kw) -> list[list[int]]:
    llm = LLM(path, dtype=dtype, attention_backend=backend, layer_kernels=backend,
              enforce_eager=eager, max_model_len=256, num_kv_blocks=256, max_num_seqs=8, **kw)
    outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS],
                        SamplingParams(temperature=0, max_tokens=n, ignore_eos=True), use_tqdm=False)
    del llm
    torch.cuda.empty_cache()
    return [o.outputs[0].token_ids for o in outs]


def test_triton_graphs_match_torch_and_transformers_fp32(ckpt) -> None:
    ref = _greedy(ckpt.path, "float32", "torch", True, 24)
    assert ref == [hf_greedy(ckpt.hf_model, p, 24) for p in PROMPTS]
    assert _greedy(ckpt.path, "float32", "triton", False, 24) == ref
    # Small chunks after a prefix take the absorbed path through the Triton decode kernel.
    assert _greedy(ckpt.path, "float32", "triton", False, 24, max_num_batched_tokens=6) == ref


def test_triton_graphs_match_eager_bf16(ckpt) -> None:
    eager = _greedy(ckpt.path, "bfloat16", "triton", True, 16)
    assert _greedy(ckpt.path, "bfloat16", "triton", False, 16) == eager


def test_v2_lite_shapes_run_on_dummy_weights() -> None:
    pytest.importorskip("ember.attention.triton_mla", reason="the Triton MLA decode kernel is not merged")
    llm = LLM(V2_LITE, load_format="dummy", dtype="bfloat16", max_model_len=2048, max_num_seqs=16)
    runner = llm.engine.runner
    assert runner.graph_runner is not None
    assert tuple(runner.kv_caches[0].shape[1:]) == (runner.block_size, 512 + 64)
    outs = llm.generate([{"prompt_token_ids": p} for p in random_prompts([5, 300, 1000], seed=1)],
                        SamplingParams(temperature=0, max_tokens=32, ignore_eos=True), use_tqdm=False)
    assert all(len(o.outputs[0].token_ids) == 32 for o in outs)
