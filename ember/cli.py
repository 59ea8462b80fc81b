"""`ember` command line: generate, chat, serve, bench, train-draft, train-mtp, train-eagle."""
from __future__ import annotations

import argparse
import logging
import sys
import time
from typing import Any

from ember.sampling_params import SamplingParams


def add_engine_args(p: argparse.ArgumentParser) -> None:
    """Engine flags, named as in vLLM."""
    p.add_argument("--model", default="smollm2-135m",
                   help="HF model folder, .gguf file, config.json (with --load-format dummy) or smollm2-135m")
    p.add_argument("--tokenizer", default=None, help="tokenizer folder, if not the model's")
    p.add_argument("--dtype", default="auto", help="auto (bf16 on CUDA, fp32 on CPU), float32, bfloat16, float16")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--load-format", default="auto", choices=["auto", "safetensors", "gguf", "dummy"])
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int, default=None)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    p.add_argument("--kv-cache-memory", type=float, default=None, help="GiB for the KV pool on the CPU")
    p.add_argument("--attention-backend", default="auto", choices=["auto", "torch", "triton"])
    p.add_argument("--layer-kernels", default="auto", choices=["auto", "torch", "triton"],
                   help="RMSNorm, RoPE and SiLU-mul: fused Triton kernels (auto: on CUDA) or torch")
    p.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs for decode steps")
    p.add_argument("--async-scheduling", default="auto", choices=["auto", "on", "off"],
                   help="schedule the next step while the device runs this one (auto: on CUDA; "
                        "with speculation, steps that draft run synchronously)")
    p.add_argument("--prefix-cache", default="radix", choices=["radix", "none"],
                   help="reuse the KV cache of shared prompt prefixes (RadixAttention) or not")
    p.add_argument("--scheduling-policy", default="lpm", choices=["lpm", "fcfs"],
                   help="lpm: admit the longest cached prefix first (bounded, never starves); fcfs")
    p.add_argument("--quantization", default=None,
                   choices=["none", "awq", "smoothquant", "nvfp4", "fp8"],
                   help="quantize a full-precision model on load (round to nearest; calibrated "
                        "checkpoints come from `ember quantize`); default: as the checkpoint says")
    p.add_argument("--quantize-lm-head", action="store_true",
                   help="quantize the LM head too (off by default, as in most quantized checkpoints)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--speculative-config", default=None,
                   help='speculative decoding as JSON, e.g. \'{"method": "ngram", "num_speculative_tokens": 3}\' '
                        'or \'{"method": "draft", "model": DIR, "num_speculative_tokens": 3}\' '
                        '(method "mtp": DIR from ember train-mtp); '
                        '"adaptive": false keeps k fixed')


def engine_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    return dict(dtype=args.dtype, device=args.device, load_format=args.load_format,
                tokenizer=args.tokenizer, max_model_len=args.max_model_len,
                max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                block_size=args.block_size, gpu_memory_utilization=args.gpu_memory_utilization,
                kv_cache_memory=args.kv_cache_memory, attention_backend=args.attention_backend,
                layer_kernels=args.layer_kernels,
                enforce_eager=args.enforce_eager, async_scheduling=args.async_scheduling,
                prefix_cache=args.prefix_cache, scheduling_policy=args.scheduling_policy,
                seed=args.seed, speculative_config=args.speculative_config,
                quantization=args.quantization, quantize_lm_head=args.quantize_lm_head)


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=-1)
    p.add_argument("--sampling-seed", type=int, default=None)


def _sampling(args: argparse.Namespace) -> SamplingParams:
    return SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature,
                          top_p=args.top_p, top_k=args.top_k, seed=args.sampling_seed)


def _stream_answer(llm, prompt, params: SamplingParams) -> str:
    """Print tokens as they come; report throughput on stderr."""
    start, text = time.perf_counter(), ""
    for delta in llm.stream(prompt, params):
        text += delta
        print(delta, end="", flush=True)
    print(flush=True)
    elapsed = time.perf_counter() - start
    n = llm.last_stream_tokens
    print(f"[{n} tokens in {elapsed:.2f} s: {n / elapsed:.1f} tok/s]", file=sys.stderr)
    return text


def cmd_generate(args: argparse.Namespace) -> None:
    from ember.llm import LLM
    llm = LLM(args.model, **engine_kwargs(args))
    prompt = llm.apply_chat_template([{"role": "user", "content": args.prompt}]) if args.chat else args.prompt
    _stream_answer(llm, prompt, _sampling(args))


def cmd_chat(args: argparse.Namespace) -> None:
    from ember.llm import LLM
    llm = LLM(args.model, **engine_kwargs(args))
    history: list[dict[str, str]] = []
    if args.system:
        history.append({"role": "system", "content": args.system})
    print("ember chat: type a message, or /exit to quit, /reset to clear the history.", file=sys.stderr)
    while True:
        try:
            line = input("> ").strip()
        except EOFError:
            break
        if line in ("/exit", "/quit"):
            break
        if line == "/reset":
            history = history[:1] if args.system else []
            continue
        if not line:
            continue
        history.append({"role": "user", "content": line})
        answer = _stream_answer(llm, llm.apply_chat_template(history), _sampling(args))
        history.append({"role": "assistant", "content": answer})


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ember", description="a small LLM inference engine")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="complete one prompt, streaming")
    add_engine_args(g)
    _add_sampling_args(g)
    g.add_argument("prompt")
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    g.set_defaults(func=cmd_generate)

    c = sub.add_parser("chat", help="interactive chat, streaming")
    add_engine_args(c)
    _add_sampling_args(c)
    c.add_argument("--system", default=None, help="a system message")
    c.set_defaults(func=cmd_chat)

    # Their optional dependencies (fastapi, uvicorn, httpx) load only when they run.
    e = sub.add_parser("eval", help="evaluate a model")
    esub = e.add_subparsers(dest="eval_command", required=True)
    from ember.eval.ppl import add_ppl_args, cmd_ppl
    ppl = esub.add_parser("ppl", help="perplexity on a text file with a sliding window")
    add_engine_args(ppl)
    add_ppl_args(ppl)
    ppl.set_defaults(func=cmd_ppl)

    from ember.quant.cli import add_quantize_parser
    add_quantize_parser(sub)

    from ember.bench.cli import add_bench_parser
    from ember.server.cli import add_serve_parser
    from ember.spec.train_draft import add_train_draft_parser
    from ember.spec.train_eagle import add_train_eagle_parser
    from ember.spec.train_mtp import add_train_mtp_parser
    add_serve_parser(sub)
    add_bench_parser(sub)
    add_train_draft_parser(sub)
    add_train_mtp_parser(sub)
    add_train_eagle_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        args.func(args)
    except (ValueError, FileNotFoundError, ImportError) as e:
        print(f"ember: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
