"""CUDA-graph shapes for speculative verify steps (ember.engine.cuda_graph), on the CPU:
the graph runner with `capture_graphs=False` replays by running the model on its static
buffers, so the inputs path (static copies, padding, per-sequence tree masks through the
tree kernel, the aux rows an EAGLE drafter reads) runs under the Triton interpreter.
The EAGLE drafter's graphed forwards (ember.spec.draft_graphs: the catch-up, P-EAGLE's with
its mask rows, EAGLE tree levels) likewise. Greedy output
through them equals plain decoding for chains and trees."""
from __future__ import annotations

import pytest
import torch
from test_eagle_proposer import drafters, prompts, reference, spec  # noqa: F401  (fixtures)
from test_spec_decode import make_llm, run

from ember import SamplingParams
from ember.engine.cuda_graph import CudaGraphRunner
from ember.engine.forward_batch import ForwardBatch
from ember.spec.draft_graphs import DrafterGraphs


def _attach_static_runner(llm) -> CudaGraphRunner:
    """Give the engine a graph runner that replays eagerly (no GPU needed)."""
    eng = llm.engine
    r = eng.runner
    gr = CudaGraphRunner(r.model, r.backend, 8, eng.max_model_len, r.block_size,
                         eng.model_config.hidden_size, r.dtype, r.device,
                         eng.speculator.verify_widths(), r.max_num_batched_tokens, capture_graphs=False)
    gr.capture()
    r.graph_runner = gr
    prop = eng.speculator.proposer
    if hasattr(prop, "drafter"):
        prop.graphs = DrafterGraphs(prop.drafter, prop.aux, prop.backend, r, prop.max_k, prop.parallel,
                                    prop.tree, capture_graphs=False)
    return gr


@pytest.mark.parametrize("method,tree", [("eagle", None), ("peagle", {"top_k": 3, "budget": 7}),
                                         ("eagle", {"top_k": 2, "budget": 6}),
                                         ("peagle-deep", {"top_k": 3, "budget": 7})])
def test_verify_through_static_buffers_is_greedy_identical(tiny_llama, drafters, prompts, reference,  # noqa: F811
                                                           method, tree) -> None:
    params = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
    make = lambda: make_llm(tiny_llama, attention_backend="triton", max_num_seqs=8,  # noqa: E731
                            speculative_config=spec(method, drafters[method], k=3, tree=tree))
    eager = make()
    run(eager, prompts[:3], params)
    llm = make()
    gr = _attach_static_runner(llm)
    if method.startswith("peagle"):   # its mask rows come from the catch-up's (graphed) forward only
        llm.engine.speculator.proposer._mask_rows = None
    widths = llm.engine.speculator.verify_widths()
    assert widths == ((4,) if tree is None else (llm.engine.speculator.slots_for(3) + 1,))
    tokens, _ = run(llm, prompts[:3], params)
    assert tokens == [ref[:10] for ref in reference[:3]]
    # The same drafts as the eager drafter's: the same acceptance, position by position.
    assert llm.engine.spec_stats() == eager.engine.spec_stats()
    verify = {k: n for k, n in gr.num_replays.items() if k[1] > 1}
    # Verify steps ran through the static buffers, padded (3 requests -> 4 rows).
    assert sum(verify.values()) > 0, gr.num_replays
    assert any(bs > 1 for bs, _, _ in verify)
    assert llm.engine.spec_stats()["num_accepted_tokens"] > 0
    # The drafter's catch-up (P-EAGLE: with its mask rows) ran through theirs.
    graphs = llm.engine.speculator.proposer.graphs
    assert sum(graphs.catch_up.num_replays.values()) > 0
    if method == "eagle" and tree is not None:   # and an EAGLE tree's levels through theirs
        assert sum(graphs.levels.num_replays.values()) > 0


def test_key_for_runs_only_uniform_widths(tiny_llama) -> None:
    llm = make_llm(tiny_llama, attention_backend="triton")
    r = llm.engine.runner
    gr = CudaGraphRunner(r.model, r.backend, 4, 64, r.block_size, 64, r.dtype, r.device,
                         (3, 5, (2, 6)), 12, capture_graphs=False)
    gr.capture()
    assert gr.shapes == ((1, 1), (2, 6), (3, 3), (5, 5))
    assert (4, 3, 3) in gr.batches and (2, 5, 5) in gr.batches and (4, 5, 5) not in gr.batches  # 20 > 12 tokens

    def batch(widths: list[int], masks: list | None = None) -> ForwardBatch:
        qsl = [0]
        for w in widths:
            qsl.append(qsl[-1] + w)
        t, s = qsl[-1], len(widths)
        return ForwardBatch(torch.zeros(t, dtype=torch.long), torch.zeros(t, dtype=torch.long),
                            torch.zeros(t, dtype=torch.long), qsl, torch.full((s,), 9),
                            [9] * s, torch.zeros((s, 3), dtype=torch.int32),
                            sum(w == 1 for w in widths), torch.zeros(s, dtype=torch.long), 4, attn_masks=masks)
    assert gr.key_for(batch([1, 1, 1])) == (4, 1, 1)
    assert gr.key_for(batch([3, 3, 3])) == (4, 3, 3)
    assert gr.key_for(batch([5])) == (1, 5, 5)
    wide = torch.ones((2, 6), dtype=torch.bool)
    assert gr.key_for(batch([2, 2], [wide, wide])) == (2, 2, 6)   # a drafter's tree level
    assert gr.key_for(batch([2, 2], [wide, None])) is None         # one sequence unmasked
    assert gr.key_for(batch([5, 5, 5])) is None          # over the token cap
    assert gr.key_for(batch([3, 5])) is None             # mixed widths
    assert gr.key_for(batch([1, 3, 3])) is None          # a decode among verifies
    assert gr.key_for(batch([4, 4])) is None             # not a captured width
    assert gr.key_for(batch([3, 3], [None, torch.ones((3, 4), dtype=torch.bool)])) is None  # a wider mask


@pytest.mark.skipif(not torch.cuda.is_available(), reason="captures real CUDA graphs")
@pytest.mark.parametrize("method,tree", [("eagle", None), ("peagle", {"top_k": 3, "budget": 7}),
                                         ("eagle", {"top_k": 2, "budget": 6})])
def test_captured_verify_and_drafter_graphs_are_greedy_identical(tiny_llama, drafters, prompts,  # noqa: F811
                                                                  reference, method, tree) -> None:
    llm = make_llm(tiny_llama, max_num_seqs=8, speculative_config=spec(method, drafters[method], k=3, tree=tree))
    gr = llm.engine.runner.graph_runner
    assert gr is not None and gr.capture_graphs
    tokens, _ = run(llm, prompts, SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True))
    assert tokens == [ref[:16] for ref in reference]
    assert sum(n for (_, q, _), n in gr.num_replays.items() if q > 1) > 0
    assert sum(llm.engine.speculator.proposer.graphs.catch_up.num_replays.values()) > 0
    assert llm.engine.spec_stats()["num_accepted_tokens"] > 0
