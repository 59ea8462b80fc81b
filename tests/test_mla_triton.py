"""The `triton` MLA backend on the CPU (Triton's interpreter): its latent-write kernel
against the torch reference, padding slots skipped, and its decode path wired to
`ember.attention.triton_mla.mla_decode` with the step's split count."""
from __future__ import annotations

import sys
import types

import pytest
import torch
from _triton_interpret import DEVICE
from test_deepseek_v3 import DIMS, _mla_batch

from ember.attention.mla_backend import get_mla_backend
from ember.attention.mla_ref import mla_decode_ref, write_latent_cache
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


def test_triton_backend_decodes_through_triton_mla(monkeypatch) -> None:
    """Until the kernel lands, a stand-in `ember.attention.triton_mla` module checks the call:
    the backend must import `mla_decode` from there and pass the split count it chose."""
    calls = []

    def mla_decode(q_nope, q_rope, cache, block_tables, seq_lens, scale, out=None, num_splits=None):
        calls.append(num_splits)
        return mla_decode_ref(q_nope, q_rope, cache, block_tables, seq_lens, scale, out)

    monkeypatch.setitem(sys.modules, "ember.attention.triton_mla",
                        types.SimpleNamespace(mla_decode=mla_decode))
    fb, cache, inputs = _mla_batch([9, 1, 23, 6], [1, 1, 5, 6], num_decodes=2)
    outs = []
    for name in ("torch", "triton"):
        backend = get_mla_backend(name, None, DIMS, prefill_mode="auto")
        backend.prepare(fb)
        c = cache.clone()
        outs.append((backend.forward(**inputs, cache=c, fb=fb, scale=0.3), c))
    assert calls == [fb.attn_metadata.num_splits] and calls[0] >= 1
    assert torch.equal(outs[0][1], outs[1][1])
    torch.testing.assert_close(outs[1][0], outs[0][0], atol=1e-5, rtol=1e-5)
