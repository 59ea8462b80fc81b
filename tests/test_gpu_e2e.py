"""End to end on a CUDA GPU (skipped elsewhere): the Triton kernels (attention and the fused
layer ops) with CUDA graphs give the same greedy tokens as the all-torch reference on the
real SmolLM2."""
from __future__ import annotations

import pytest
import torch

from ember import LLM, SamplingParams

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

PROMPTS = [
    "The capital of France is",
    "Write a short poem about the sea.",
    "def fibonacci(n):",
    "Three reasons to learn a new language are",
    "Once upon a time, in a small village,",
    "The difference between a list and a tuple in Python is",
]


@pytest.fixture(scope="module")
def smollm2_path() -> str:
    try:
        from ember.models.smollm2 import find_smollm2_gguf
        return find_smollm2_gguf()
    except FileNotFoundError as e:
        pytest.skip(str(e))


def _greedy(path: str, dtype: str, backend: str, eager: bool, n: int) -> list[list[int]]:
    llm = LLM(path, dtype=dtype, attention_backend=backend, layer_kernels=backend, enforce_eager=eager,
              max_model_len=1024, num_kv_blocks=512, max_num_seqs=16)
    outs = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=n, ignore_eos=True),
                        use_tqdm=False)
    del llm
    torch.cuda.empty_cache()
    return [o.outputs[0].token_ids for o in outs]


def test_triton_graphs_match_torch_fp32(smollm2_path: str) -> None:
    ref = _greedy(smollm2_path, "float32", "torch", True, 48)
    got = _greedy(smollm2_path, "float32", "triton", False, 48)
    assert got == ref


def test_triton_graphs_match_eager_bf16(smollm2_path: str) -> None:
    eager = _greedy(smollm2_path, "bfloat16", "triton", True, 32)
    graphs = _greedy(smollm2_path, "bfloat16", "triton", False, 32)
    assert graphs == eager


def test_triton_matches_torch_bf16_prefix(smollm2_path: str) -> None:
    # bf16 rounding differs between kernels; near-ties may flip late tokens, so compare a prefix.
    ref = _greedy(smollm2_path, "bfloat16", "torch", True, 16)
    got = _greedy(smollm2_path, "bfloat16", "triton", False, 16)
    same = sum(r == g for r, g in zip(ref, got))
    assert same >= len(PROMPTS) - 1, (ref, got)


@pytest.mark.parametrize("method,tree", [("eagle", None), ("eagle", {"top_k": 3, "budget": 10}),
                                         ("peagle", {"top_k": 3, "budget": 10})])
def test_eagle_chains_and_trees_greedy_identical_fp32(smollm2_path: str, tmp_path, method, tree) -> None:
    """EAGLE / P-EAGLE through the Triton backend (tree kernel, CUDA graphs capturing the
    aux hidden states): greedy output identical to plain decoding. The drafter is
    $EMBER_EAGLE_DIR / $EMBER_PEAGLE_DIR when set (trained: real acceptance), else random."""
    import os

    from test_eagle_proposer import _random_drafter_for

    from ember.models.loader import resolve_model
    folder = os.environ.get("EMBER_PEAGLE_DIR" if method == "peagle" else "EMBER_EAGLE_DIR")
    if not folder:
        folder = _random_drafter_for(resolve_model(smollm2_path).config, str(tmp_path / "d"), 4096,
                                     parallel=method == "peagle")
    ref = _greedy(smollm2_path, "float32", "triton", False, 48)
    spec = {"method": method, "model": folder, "num_speculative_tokens": 3, "adaptive": False}
    if tree is not None:
        spec["tree"] = tree
    llm = LLM(smollm2_path, dtype="float32", max_model_len=1024, num_kv_blocks=512, max_num_seqs=16,
              speculative_config=spec)
    outs = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=48, ignore_eos=True), use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == ref
    assert llm.engine.spec_stats()["num_draft_tokens"] > 0
