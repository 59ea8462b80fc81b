"""The `triton` MLA backend on the CPU (Triton's interpreter): its latent-write kernel
against the torch reference with padding slots skipped; the whole backend (latent write,
`triton_mla.mla_decode` for decodes and absorbed chunks, SDPA for expanded ones) against
the torch backend; and a tiny DeepSeek-V3 through it against transformers."""
from __future__ import annotations

import pytest
import torch
from _triton_interpret import DEVICE
from conftest import random_prompts
from test_deepseek_v3 import BLOCK_SIZE, DIMS, _mla_batch, build_ckpt, hf_logits
from test_model_parity import ember_logits

from ember import LLM
from ember.attention.mla_backend import get_mla_backend
from ember.attention.mla_ref import write_latent_cache
from ember.attention.triton_latent_write import write_latent_cache_triton

pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_latent_write_matches_reference_and_skips_padding(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(0)
    cache = torch.randn((6, 4, 40), generator=g).to(dtype).to(DEVICE)
    # Views with a row stride, as the model passes them (slices of one GEMM output), in the
    # cache dtype (the interpreter rounds fp32 -> bf16 differently from torch).
    fused = torch.randn((5, 48), generator=g).to(dtype).to(DEVICE)
    c_kv, k_pe = fused[:, :32], fused[:, 32:40]
    slots = torch.tensor([3, 17, -1, 0, 23], device=DEVICE)
    expected = cache.clone()
    live = slots >= 0
    write_latent_cache(expected, c_kv[live], k_pe[live], slots[live])
    got = cache.clone()
    write_latent_cache_triton(got, c_kv, k_pe, slots)
    assert torch.equal(got, expected)   # -1 wrote nothing (the reference would wrap to the last slot)


@pytest.mark.parametrize("mode", ["auto", "absorbed"])
def test_triton_backend_matches_torch_backend(mode: str) -> None:
    """Two decodes, a chunk after a prefix, a fresh chunk (auto: the small chunk absorbed,
    the fresh one expanded; absorbed: every row through the Triton decode kernel)."""
    fb, cache, inputs = _mla_batch([9, 1, 23, 6], [1, 1, 5, 6], num_decodes=2, device=DEVICE)
    outs = []
    for name in ("torch", "triton"):
        backend = get_mla_backend(name, torch.device(DEVICE), DIMS, prefill_mode=mode)
        backend.prepare(fb)
        c = cache.clone()
        outs.append((backend.forward(**inputs, cache=c, fb=fb, scale=0.3), c))
        assert backend.name == name
    assert torch.equal(outs[0][1], outs[1][1])
    torch.testing.assert_close(outs[1][0], outs[0][0], atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(DEVICE == "cuda", reason="tests/test_deepseek_gpu.py runs the model on a GPU")
def test_model_through_triton_backend_matches_transformers(tmp_path_factory) -> None:
    pytest.importorskip("transformers", reason="transformers is the parity oracle")
    ckpt = build_ckpt("moe-8e-2groups", tmp_path_factory.mktemp("tiny_deepseek"), qk_rope_head_dim=16)
    llm = LLM(ckpt.path, num_kv_blocks=16, block_size=BLOCK_SIZE, dtype="float32",
              attention_backend="triton")
    assert llm.engine.runner.backend.name == "triton"
    (prompt,) = random_prompts([40], seed=11)
    got = ember_logits(llm, prompt, [30, 3, 1, 1, 5])
    torch.testing.assert_close(got, hf_logits(ckpt, prompt), atol=2e-4, rtol=1e-4)
