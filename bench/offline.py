"""Offline benchmarks with a peer in the same run: ember vs Hugging Face transformers.

  decode:      greedy decode of --output-len tokens after a --prompt-len prompt, --batch
               requests at once (1 by default; the HF peer runs them at --hf-batch-size)
  throughput:  the nano-vllm protocol: --num-requests requests, input and output lengths
               uniform in [--min-len, --max-len], random token ids, seed 0, EOS ignored.
               The HF peer runs the same requests with `generate` at --hf-batch-size
               (1 = its batch-1 throughput; padding makes larger batches do extra work,
               which we do not count as output).

--llamacpp adds llama.cpp (llama-cpp-python, the CPU peer) on the same GGUF and requests,
one request at a time (its batch-1 rate); it only applies to a GGUF model.

Examples (CPU):
  python bench/offline.py --mode decode --model smollm2-135m --prompt-len 128 --output-len 128 --llamacpp
  python bench/offline.py --mode throughput --model smollm2-135m --num-requests 32 --min-len 64 --max-len 256
"""
from __future__ import annotations

import argparse
import gc
import json
import platform
import random
import sys
import time

import torch

from ember import LLM, SamplingParams
from gpu_timing import graph_replay_ms
from ember.config import resolve_device, resolve_dtype


def requests(args: argparse.Namespace, vocab: int) -> list[tuple[list[int], int]]:
    rng = random.Random(args.seed)
    out = []
    for _ in range(args.num_requests):
        n_in = rng.randint(args.min_len, args.max_len)
        n_out = rng.randint(args.min_len, args.max_len) if args.output_len is None else args.output_len
        out.append(([rng.randrange(vocab) for _ in range(n_in)], n_out))
    return out


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def run_ember(llm: LLM, reqs: list[tuple[list[int], int]], device: torch.device) -> float:
    prompts = [{"prompt_token_ids": ids} for ids, _ in reqs]
    params = [SamplingParams(temperature=0, ignore_eos=True, max_tokens=n) for _, n in reqs]
    sync(device)
    t = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    sync(device)
    elapsed = time.perf_counter() - t
    got = sum(len(o.outputs[0].token_ids) for o in outs)
    assert got == sum(n for _, n in reqs), "ember produced a different number of tokens"
    return elapsed


def load_hf(model: str, dtype: torch.dtype, device: torch.device, load_format: str):
    import os
    from transformers import AutoConfig, AutoModelForCausalLM
    from ember.models.loader import SHORT_NAMES
    if model.lower() in SHORT_NAMES:
        from ember.models.smollm2 import find_smollm2_gguf
        model = find_smollm2_gguf()
    if model.endswith(".gguf"):
        m = AutoModelForCausalLM.from_pretrained(os.path.dirname(model), gguf_file=os.path.basename(model),
                                                 dtype=dtype)
    elif load_format == "dummy":
        cfg = AutoConfig.from_pretrained(model if os.path.isdir(model) else os.path.dirname(model))
        with torch.device(device):  # random init where it runs: 8B values on the CPU take minutes
            m = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    else:
        m = AutoModelForCausalLM.from_pretrained(model, dtype=dtype)
    return m.to(device).eval()


@torch.inference_mode()
def run_hf(model, reqs: list[tuple[list[int], int]], batch_size: int, device: torch.device,
           pad_id: int) -> float:
    """Static batches, left-padded; each batch runs to its longest requested output."""
    sync(device)
    t = time.perf_counter()
    for i in range(0, len(reqs), batch_size):
        chunk = reqs[i:i + batch_size]
        width = max(len(ids) for ids, _ in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for j, (p, _) in enumerate(chunk):
            ids[j, width - len(p):] = torch.tensor(p)
            mask[j, width - len(p):] = 1
        n = max(o for _, o in chunk)
        model.generate(ids.to(device), attention_mask=mask.to(device), max_new_tokens=n,
                       min_new_tokens=n, do_sample=False, pad_token_id=pad_id)
    sync(device)
    return time.perf_counter() - t


def run_llamacpp(gguf_path: str, reqs: list[tuple[list[int], int]], threads: int) -> float:
    """Greedy, one request at a time, exactly n tokens each (llama.cpp's raw generator does
    not stop at EOS by itself)."""
    from llama_cpp import Llama
    ctx = max(len(p) + n for p, n in reqs) + 8
    model = Llama(model_path=gguf_path, n_ctx=ctx, n_threads=threads, n_batch=512, verbose=False)
    warm = model.generate(reqs[0][0][:16], temp=0.0, top_k=1, reset=True)
    for _ in zip(range(4), warm):
        pass
    t = time.perf_counter()
    for prompt, n in reqs:
        for _ in zip(range(n), model.generate(prompt, temp=0.0, top_k=1, reset=True)):
            pass
    return time.perf_counter() - t


def weight_bytes(llm: LLM) -> int:
    return sum(p.numel() * p.element_size() for p in llm.engine.runner.model.parameters())


def batch1_bytes_per_token(llm: LLM) -> int:
    """Weight bytes one batch-1 decode step reads: every dense weight, and of a MoE layer's
    routed experts only the top-k it picks (k of E)."""
    hf = llm.engine.model_config.hf_config
    share = hf.get("num_experts_per_tok", 1) / hf.get("n_routed_experts", 1)
    total = 0
    for name, p in llm.engine.runner.model.named_parameters():
        routed = name.endswith(("experts.w13", "experts.w2"))
        total += p.numel() * p.element_size() * (share if routed else 1.0)
    return int(total)


def decode_step_breakdown(llm: LLM, prompt: list[int], steps: int = 64) -> dict[str, float]:
    """Wall time of a batch-1 decode step vs the GPU time of its captured forward alone;
    the difference is what the host adds (scheduling, input prep, logits, sampling, output)."""
    eng = llm.engine
    eng.add_request("breakdown", prompt, SamplingParams(temperature=0, ignore_eos=True, max_tokens=steps + 8))
    for _ in range(4):
        eng.step()  # prefill + warm decode
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(steps):
        eng.step()
    torch.cuda.synchronize()
    wall = (time.perf_counter() - t) / steps
    eng.abort_request("breakdown")
    gr = eng.runner.graph_runner
    out = {"step_ms": wall * 1e3}
    if gr is not None:
        fwd = graph_replay_ms(gr.graphs[(gr.sizes[0], 1, 1)], steps) / 1e3
        out.update(forward_ms=fwd * 1e3, host_share=max(0.0, 1 - fwd / wall))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mode", choices=["decode", "throughput"], default="throughput")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--load-format", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--num-requests", type=int, default=256)
    ap.add_argument("--min-len", type=int, default=100)
    ap.add_argument("--max-len", type=int, default=1024)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=None)
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--max-num-batched-tokens", type=int, default=None)
    ap.add_argument("--kv-cache-memory", type=float, default=None)
    ap.add_argument("--attention-backend", default="auto")
    ap.add_argument("--enforce-eager", action="store_true")
    ap.add_argument("--layer-kernels", default="auto")
    ap.add_argument("--max-model-len", type=int, default=None)
    ap.add_argument("--batch", type=int, default=1, help="decode mode: concurrent requests")
    ap.add_argument("--async-scheduling", default="auto", choices=["auto", "on", "off"])
    ap.add_argument("--also-sync", action="store_true",
                    help="run ember again with synchronous scheduling and report both")
    ap.add_argument("--hf-batch-size", type=int, default=1)
    ap.add_argument("--hf-num-requests", type=int, default=None,
                    help="run HF on only the first N requests (it is slow); its rate is per token")
    ap.add_argument("--no-hf", action="store_true")
    ap.add_argument("--llamacpp", action="store_true", help="also run llama.cpp on the same GGUF (CPU peer)")
    ap.add_argument("--llamacpp-num-requests", type=int, default=None)
    ap.add_argument("--roofline-tbs", type=float, default=4.8, help="HBM bandwidth for the %% of roofline")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.mode == "decode":
        args.num_requests, args.min_len, args.max_len = args.batch, args.prompt_len, args.prompt_len
        args.output_len = args.output_len or 128

    device = resolve_device(None)
    dtype = resolve_dtype(args.dtype, device)
    llm = LLM(args.model, dtype=args.dtype, load_format=args.load_format,
              max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
              kv_cache_memory=args.kv_cache_memory, attention_backend=args.attention_backend,
              layer_kernels=args.layer_kernels, enforce_eager=args.enforce_eager, max_model_len=args.max_model_len,
              async_scheduling=args.async_scheduling)
    vocab = llm.engine.model_config.vocab_size
    reqs = requests(args, vocab)
    n_out = sum(n for _, n in reqs)
    print(f"# {args.mode}: {len(reqs)} requests, {sum(len(i) for i, _ in reqs)} prompt tokens, "
          f"{n_out} output tokens; device {device}, dtype {dtype}, torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}, {platform.processor() or platform.machine()}")
    # Warm-up on other prompts of the measured lengths: Triton specializes kernels on
    # argument values (e.g. lengths divisible by 16), and a compile inside the timed run
    # would cost seconds. Different tokens, so the prefix cache gives the run nothing.
    warm = random.Random(args.seed + 1)
    run_ember(llm, [([warm.randrange(vocab) for _ in ids], 4) for ids, _ in reqs[:8]], device)
    t_ember = run_ember(llm, reqs, device)
    result = {"mode": args.mode, "ember_s": t_ember, "ember_tok_s": n_out / t_ember}
    print(f"ember: {n_out} tokens in {t_ember:.2f} s = {n_out / t_ember:.1f} output tok/s "
          f"(async scheduling {'on' if llm.engine.async_scheduling else 'off'})")
    if args.also_sync and llm.engine.async_scheduling:
        llm.engine.async_scheduling = False   # the engine is idle between runs
        t_sync = run_ember(llm, reqs, device)
        llm.engine.async_scheduling = True
        result.update(ember_sync_tok_s=n_out / t_sync, async_speedup=t_sync / t_ember)
        print(f"ember, synchronous scheduling: {n_out / t_sync:.1f} output tok/s; "
              f"async / sync {t_sync / t_ember:.3f}x")
    if args.mode == "decode" and device.type == "cuda" and args.batch == 1:
        # Each decode step reads every weight it uses once (the KV read is small at these
        # lengths); a MoE step reads only its chosen experts.
        step_bytes = batch1_bytes_per_token(llm)
        gbs = step_bytes * n_out / t_ember / 1e9
        result.update(weight_gb=weight_bytes(llm) / 1e9, step_read_gb=step_bytes / 1e9,
                      achieved_gbs=gbs, roofline_pct=100 * gbs / (args.roofline_tbs * 1e3))
        print(f"weights {result['weight_gb']:.2f} GB, read per step {result['step_read_gb']:.2f} GB "
              f"-> {gbs:.0f} GB/s = "
              f"{result['roofline_pct']:.1f}% of {args.roofline_tbs} TB/s")
        result.update(decode_step_breakdown(llm, reqs[0][0]))
        print(f"decode step {result['step_ms']:.2f} ms; captured forward "
              f"{result.get('forward_ms', float('nan')):.2f} ms; host share "
              f"{100 * result.get('host_share', float('nan')):.1f}%")
    if args.llamacpp:
        from ember.models.loader import SHORT_NAMES
        gguf = args.model
        if gguf.lower() in SHORT_NAMES:
            from ember.models.smollm2 import find_smollm2_gguf
            gguf = find_smollm2_gguf()
        lc_reqs = reqs[: args.llamacpp_num_requests] if args.llamacpp_num_requests else reqs
        lc_out = sum(n for _, n in lc_reqs)
        t_lc = run_llamacpp(gguf, lc_reqs, torch.get_num_threads())
        result.update(llamacpp_s=t_lc, llamacpp_tok_s=lc_out / t_lc,
                      ratio_vs_llamacpp=result["ember_tok_s"] / (lc_out / t_lc))
        print(f"llama.cpp (llama-cpp-python, batch 1, {torch.get_num_threads()} threads): {lc_out} tokens "
              f"in {t_lc:.2f} s = {lc_out / t_lc:.1f} output tok/s")
        print(f"ratio ember / llama.cpp: {result['ratio_vs_llamacpp']:.2f}x")
    if not args.no_hf:
        load_format = llm.engine.cfg.load_format
        eos = llm.engine.model_config.eos_token_ids
        del llm  # give the peer the memory ember's KV pool held
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        hf = load_hf(args.model, dtype, device, load_format)
        hf_reqs = reqs[: args.hf_num_requests] if args.hf_num_requests else reqs
        hf_out = sum(n for _, n in hf_reqs)
        pad = eos[0] if eos else 0
        run_hf(hf, [(reqs[0][0][:16], 8)], 1, device, pad)  # warm-up
        t_hf = run_hf(hf, hf_reqs, args.hf_batch_size, device, pad)
        hf_rate = hf_out / t_hf
        result.update(hf_s=t_hf, hf_tok_s=hf_rate, hf_batch_size=args.hf_batch_size,
                      ratio=result["ember_tok_s"] / hf_rate)
        print(f"HF transformers generate (batch {args.hf_batch_size}): {hf_out} tokens in {t_hf:.2f} s "
              f"= {hf_rate:.1f} output tok/s")
        print(f"ratio ember / HF: {result['ratio']:.2f}x")
    print(json.dumps(result))


if __name__ == "__main__":
    sys.exit(main())
