"""Where the time of one decode step goes, at batch 1 and 64 (torch.profiler + host timers).

    PYTHONPATH=$PWD python3 bench/profile_step.py --model bench/configs/llama-3.1-8b/config.json \
        --batch-sizes 1 64 --layer-kernels torch triton

For each layer-kernel choice and batch size, on dummy weights in bf16:
(a) the step as the engine runs it (CUDA graphs on): wall time per step, GPU time of the
    captured forward alone, the host share (1 - forward / wall), and the host wall time of
    each engine phase (schedule, input prep, graph replay launch, logits + sampler + the
    one device sync, scheduler update, output processing);
(b) the same step eager under torch.profiler: device time by kernel, grouped into GEMMs,
    attention, KV write, the elementwise layer ops and the rest, with the launch count.
It also checks the fused layer kernels against torch at the model's real shapes.
"""
from __future__ import annotations

import argparse
import functools
import os
import sys
import time
from collections import defaultdict
from typing import Any, Callable

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402

from ember import LLM, SamplingParams  # noqa: E402
from gpu_timing import graph_replay_ms  # noqa: E402

PHASES = ("schedule", "prepare", "forward", "logits", "sampler", "resolve", "update", "process")


def start_decoding(llm: LLM, bs: int, prompt_len: int, prompts: list[list[int]] | None = None) -> None:
    """bs requests past their prefill, so every following step is a pure decode step; the
    prompts are random ids of prompt_len tokens, or the given ones (cycled)."""
    eng = llm.engine
    g = torch.Generator().manual_seed(0)
    vocab = eng.model_config.vocab_size
    for i in range(bs):
        ids = prompts[i % len(prompts)] if prompts else torch.randint(0, vocab, (prompt_len,), generator=g).tolist()
        eng.add_request(f"p{i}", ids, SamplingParams(temperature=0, ignore_eos=True, max_tokens=100_000))
    while any(r.num_computed_tokens < r.num_prompt_tokens for r in eng.scheduler.running) \
            or eng.scheduler.waiting:
        eng.step()
    for _ in range(3):
        eng.step()


def stop_all(llm: LLM, bs: int) -> None:
    for i in range(bs):
        llm.engine.abort_request(f"p{i}")


def timed(fn: Callable, name: str, acc: dict[str, float]) -> Callable:
    @functools.wraps(fn)
    def wrapper(*a: Any, **kw: Any) -> Any:
        t = time.perf_counter()
        try:
            return fn(*a, **kw)
        finally:
            acc[name] += time.perf_counter() - t
    return wrapper


def host_breakdown(llm: LLM, steps: int) -> dict[str, float]:
    """ms per step in each engine phase (host wall time; `resolve` is the wait for the
    step's tokens, the one sync of a step), plus the step's wall time."""
    import ember.engine.model_runner as model_runner
    eng, runner = llm.engine, llm.engine.runner
    acc: dict[str, float] = defaultdict(float)
    patched = [(eng.scheduler, "schedule"), (model_runner, "build_forward_batch"),
               (runner.model, "compute_logits"), (runner, "sampler"),
               (model_runner.LaunchedStep, "resolve"), (eng.scheduler, "update"),
               (eng.output_processor, "process")]
    if runner.graph_runner is not None:
        patched.append((runner.graph_runner, "run"))
    names = {"build_forward_batch": "prepare", "run": "forward", "compute_logits": "logits"}
    originals = [getattr(obj, attr) for obj, attr in patched]
    for (obj, attr), fn in zip(patched, originals):
        setattr(obj, attr, timed(fn, names.get(attr, attr), acc))
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(steps):
        eng.step()
    torch.cuda.synchronize()
    wall = time.perf_counter() - t
    for (obj, attr), fn in zip(patched, originals):
        setattr(obj, attr, fn)
    out = {k: 1e3 * v / steps for k, v in acc.items()}
    out["step"] = 1e3 * wall / steps
    return out


def graph_forward_ms(llm: LLM, bs: int, reps: int = 50) -> float | None:
    gr = llm.engine.runner.graph_runner
    if gr is None:
        return None
    return graph_replay_ms(gr.graphs[(next(s for s in gr.sizes if s >= bs), 1, 1)], reps)


def kernel_group(name: str) -> str:
    n = name.lower()
    if "decode" in n or "prefill" in n or "flash" in n:
        return "attention"
    if "kv_write" in n or "_write_kv" in n:
        return "kv write"
    if "sum_splits" in n:
        return "split-k reduce"
    if any(s in n for s in ("gemm", "gemv", "nvjet", "skinny", "int4", "fp8", "w4_", "cutlass", "sm90", "xmma", "cublas")):
        return "gemm"
    if any(s in n for s in ("rmsnorm", "rope", "silu")):
        return "layer ops (fused)"
    if any(s in n for s in ("elementwise", "reduce", "cat", "index", "copy", "fill", "pow", "mean",
                            "rsqrt", "mul", "add", "silu", "neg", "gather")):
        return "elementwise (torch)"
    return "other"


def kernel_profile(llm: LLM, steps: int) -> tuple[dict[str, tuple[float, int]], list[tuple[str, float, int]]]:
    """Eager steps under torch.profiler: device ms per step by group and the top kernels."""
    from torch.profiler import ProfilerActivity, profile
    runner = llm.engine.runner
    gr, runner.graph_runner = runner.graph_runner, None  # eager: every kernel visible
    try:
        llm.engine.step()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(steps):
                llm.engine.step()
            torch.cuda.synchronize()
    finally:
        runner.graph_runner = gr
    groups: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    kernels = []
    for ev in prof.key_averages():
        dev_us = getattr(ev, "self_device_time_total", None)
        if dev_us is None:
            dev_us = ev.self_cuda_time_total
        if dev_us <= 0 or ev.device_type != torch.autograd.DeviceType.CUDA:
            continue
        g = groups[kernel_group(ev.key)]
        g[0] += dev_us / 1e3 / steps
        g[1] += ev.count / steps
        kernels.append((ev.key[:90], dev_us / 1e3 / steps, ev.count // steps))
    kernels.sort(key=lambda k: -k[1])
    return {k: (v[0], int(v[1])) for k, v in groups.items()}, kernels[:12]


def check_layer_ops_real_shapes(llm: LLM) -> None:
    """The fused kernels against torch at this model's shapes, bf16, on the GPU."""
    from ember.layers.layer_ops import TORCH_LAYER_OPS
    from ember.layers.triton_layer_ops import TritonLayerOps
    tri, mc, dev = TritonLayerOps(), llm.engine.model_config, torch.device("cuda")
    rotary = llm.engine.runner.model.model.rotary
    worst = 0.0
    for t in (1, 64, 4096):
        x = torch.randn(t, mc.hidden_size, device=dev, dtype=torch.bfloat16)
        r = torch.randn_like(x)
        w = torch.randn(mc.hidden_size, device=dev, dtype=torch.bfloat16)
        ref_n, ref_s = TORCH_LAYER_OPS.add_rms_norm(x, r, w, 1e-5)
        out_n, out_s = tri.add_rms_norm(x.clone(), r.clone(), w, 1e-5)
        assert torch.equal(out_s, ref_s), "residual sum differs"
        h, kvh, d = mc.num_attention_heads, mc.num_key_value_heads, mc.head_dim
        qkv = torch.randn(t, (h + 2 * kvh) * d, device=dev, dtype=torch.bfloat16)
        pos = torch.randint(0, rotary.cos.shape[0], (t,), device=dev)
        q, k = qkv[:, :h * d].view(t, h, d), qkv[:, h * d:(h + kvh) * d].view(t, kvh, d)
        ref_q, ref_k = TORCH_LAYER_OPS.rope(TORCH_LAYER_OPS.rope_step(rotary.cos, rotary.sin, pos), q, k)
        out_q, out_k = tri.rope(tri.rope_step(rotary.cos, rotary.sin, pos), q.clone(), k.clone())
        gu = torch.randn(t, 2 * mc.intermediate_size, device=dev, dtype=torch.bfloat16)
        pairs = [(out_n, ref_n), (out_q, ref_q), (out_k, ref_k),
                 (tri.silu_and_mul(gu), TORCH_LAYER_OPS.silu_and_mul(gu))]
        for out, ref in pairs:
            worst = max(worst, ((out.float() - ref.float()).abs() / (ref.float().abs() + 1e-2)).max().item())
    status = "OK" if worst < 1.6e-2 else "FAIL"
    print(f"fused layer ops vs torch at real shapes (T=1, 64, 4096): worst rel err {worst:.2e} {status}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="bench/configs/llama-3.1-8b/config.json")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 64])
    ap.add_argument("--layer-kernels", nargs="+", default=["torch", "triton"])
    ap.add_argument("--async-scheduling", nargs="+", default=["on"], choices=["on", "off"])
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--profile-steps", type=int, default=4)
    ap.add_argument("--quantization", nargs="+", default=["bf16"],
                    help="bf16 or quant methods / variants as in bench/quant_gpu.py (awq, fp8, awq-gemv, ...)")
    args = ap.parse_args()
    from quant_gpu import use_variant
    print(f"# {args.model}, dummy bf16 weights, {torch.cuda.get_device_name()}, torch {torch.__version__}")
    for q, lk, mode in [(q, lk, m) for q in args.quantization for lk in args.layer_kernels
                        for m in args.async_scheduling]:
        llm = LLM(args.model, load_format="dummy", dtype="bfloat16", max_model_len=4096,
                  max_num_seqs=max(args.batch_sizes), layer_kernels=lk, async_scheduling=mode,
                  quantization=use_variant(q), prefix_cache="none")
        if lk == "triton" and mode == args.async_scheduling[0]:
            check_layer_ops_real_shapes(llm)
        for bs in args.batch_sizes:
            start_decoding(llm, bs, args.prompt_len)
            host = host_breakdown(llm, args.steps)
            fwd = graph_forward_ms(llm, bs)
            groups, top = kernel_profile(llm, args.profile_steps)
            stop_all(llm, bs)
            share = 1 - fwd / host["step"] if fwd else float("nan")
            print(f"\n== {q}, layer kernels {lk}, async scheduling {mode}, batch {bs}: step {host['step']:.3f} ms = "
                  f"{bs * 1e3 / host['step']:.0f} tok/s; captured forward {fwd:.3f} ms; host share {100 * share:.1f}%")
            print("host wall per step (ms): " + ", ".join(f"{p} {host.get(p, 0):.3f}" for p in PHASES))
            total = sum(v[0] for v in groups.values())
            launches = sum(v[1] for v in groups.values())
            print(f"eager step on the device: {total:.3f} ms in {launches} kernel launches")
            for name, (ms, n) in sorted(groups.items(), key=lambda kv: -kv[1][0]):
                print(f"  {name:22s} {ms:8.3f} ms  {100 * ms / total:5.1f}%  {n:5d} launches")
            print("  top kernels:")
            for name, ms, n in top:
                print(f"    {ms:8.3f} ms  x{n:<4d} {name}")
        del llm
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
