"""Prefix cache benchmark: ember with --prefix-cache radix vs none, in the same run.

Scenarios (random token ids, greedy, EOS ignored, every request of a scenario submitted at once):
  shared     --num-requests requests; --num-prefixes distinct --prefix-len-token prefixes
             (a system prompt), each request one of them plus a unique --suffix-len suffix;
             --output-len new tokens. Throughput and mean TTFT.
  multiturn  --sessions chats x --turns turns: turn 1 is a --first-len message, each later turn
             appends the previous answer (--output-len tokens) and a new --user-len message;
             the sessions of one turn run as one batch. Prefill tokens saved, end-to-end speedup.
  noreuse    the shape of `shared` but every prompt unique: the cache's overhead.

One engine serves both variants: before each run the scheduler is given a fresh cache of
that kind (exactly what Engine builds for --prefix-cache radix|none; the KV pool and
weights are the same), so each run starts cold. Variants are interleaved, each run
--repeats times; the best (shortest) run of each is reported.

Examples:
  CPU:  python bench/prefix_cache.py --num-requests 32 --prefix-len 512 --output-len 32 \\
            --sessions 8 --turns 4 --first-len 256 --user-len 64 --threads 1
  H200: python bench/prefix_cache.py --model bench/configs/llama-3.1-8b/config.json \\
            --load-format dummy --max-model-len 8192    (defaults: 256 requests, 2k prefixes)
"""
from __future__ import annotations

import argparse
import json
import platform
import random
import sys
import time
from dataclasses import asdict, dataclass

import torch

from ember import LLM, SamplingParams
from ember.cache.prefix import create_prefix_cache
from ember.cli import add_engine_args, engine_kwargs

VARIANTS = ("none", "radix")


@dataclass
class Run:
    scenario: str
    variant: str
    seconds: float
    requests: int
    prompt_tokens: int
    cached_tokens: int       # prompt tokens served from the cache
    output_tokens: int
    mean_ttft_s: float
    evicted_blocks: int
    scheduler_s: float       # host time in Scheduler.schedule + update (where the cache works)
    steps: int

    @property
    def output_tok_s(self) -> float:
        return self.output_tokens / self.seconds

    @property
    def prefill_tokens(self) -> int:
        return self.prompt_tokens - self.cached_tokens


def use_prefix_cache(llm: LLM, name: str) -> None:
    """Give the idle engine a fresh, empty cache of this kind (what Engine does for
    --prefix-cache name); the old cache's blocks go back to the pool first."""
    eng = llm.engine
    assert not eng.has_unfinished_requests()
    eng.prefix_cache.reset()
    assert eng.block_pool.num_free == eng.block_pool.num_blocks
    eng.prefix_cache = create_prefix_cache(name, eng.block_pool, eng.cfg.block_size)
    eng.scheduler.prefix_cache = eng.prefix_cache


class SchedulerTimer:
    """Accumulates the time spent in the scheduler: the cache's whole host-side cost
    (matching, inserting, evicting, ordering) is paid there."""

    def __init__(self, llm: LLM) -> None:
        self.seconds, self.steps = 0.0, 0
        sched = llm.engine.scheduler
        schedule, update = sched.schedule, sched.update

        def timed_schedule():
            t = time.perf_counter()
            out = schedule()
            self.seconds += time.perf_counter() - t
            self.steps += 1
            return out

        def timed_update(out, sampled):
            t = time.perf_counter()
            touched = update(out, sampled)
            self.seconds += time.perf_counter() - t
            return touched
        sched.schedule, sched.update = timed_schedule, timed_update

    def take(self) -> tuple[float, int]:
        out = (self.seconds, self.steps)
        self.seconds, self.steps = 0.0, 0
        return out


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def generate(llm: LLM, prompts: list[list[int]], n_out: int):
    params = SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=n_out)
    sync()
    t = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    sync()
    return outs, time.perf_counter() - t


def summarize(scenario: str, variant: str, llm: LLM, outs_seconds: list, timer: SchedulerTimer) -> Run:
    outs = [o for batch, _ in outs_seconds for o in batch]
    ttfts = [o.metrics["first_token_time"] - o.metrics["arrival_time"] for o in outs]
    return Run(scenario, variant, sum(s for _, s in outs_seconds), len(outs),
               sum(len(o.prompt_token_ids) for o in outs), sum(o.num_cached_tokens for o in outs),
               sum(len(o.outputs[0].token_ids) for o in outs), sum(ttfts) / len(ttfts),
               llm.engine.prefix_cache.stats().evicted_blocks, *timer.take())


def scenario_shared(llm: LLM, args, rng: random.Random, unique: bool) -> list[list[int]]:
    vocab = llm.engine.model_config.vocab_size
    rand = lambda n: [rng.randrange(vocab) for _ in range(n)]  # noqa: E731
    prefixes = [rand(args.prefix_len) for _ in range(args.num_prefixes)]
    prompts = []
    for i in range(args.num_requests):
        prefix = rand(args.prefix_len) if unique else prefixes[i % args.num_prefixes]
        prompts.append(prefix + rand(args.suffix_len))
    rng.shuffle(prompts)
    return prompts


def run_multiturn(llm: LLM, args, variant: str, timer: SchedulerTimer) -> Run:
    rng = random.Random(args.seed + 1)
    vocab = llm.engine.model_config.vocab_size
    history = [[rng.randrange(vocab) for _ in range(args.first_len)] for _ in range(args.sessions)]
    batches = []
    for turn in range(args.turns):
        if turn:
            history = [h + [rng.randrange(vocab) for _ in range(args.user_len)] for h in history]
        outs, seconds = generate(llm, history, args.output_len)
        batches.append((outs, seconds))
        history = [h + o.outputs[0].token_ids for h, o in zip(history, outs)]
    return summarize("multiturn", variant, llm, batches, timer)


def best(runs: list[Run], scenario: str, variant: str) -> Run:
    return min((r for r in runs if r.scenario == scenario and r.variant == variant), key=lambda r: r.seconds)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_engine_args(ap)   # --prefix-cache is ignored: both variants run
    ap.add_argument("--scenarios", default="shared,multiturn,noreuse")
    ap.add_argument("--num-requests", type=int, default=256)
    ap.add_argument("--num-prefixes", type=int, default=4)
    ap.add_argument("--prefix-len", type=int, default=2048)
    ap.add_argument("--suffix-len", type=int, default=64)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--sessions", type=int, default=32)
    ap.add_argument("--turns", type=int, default=6)
    ap.add_argument("--first-len", type=int, default=1024)
    ap.add_argument("--user-len", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--json", default=None, help="also write every run here")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    llm = LLM(args.model, **engine_kwargs(args))
    scenarios = args.scenarios.split(",")
    cpu = platform.processor() or platform.machine()
    dev = torch.cuda.get_device_name() if torch.cuda.is_available() else cpu
    print(f"# prefix cache benchmark: {args.model} on {dev}, torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}, block size {args.block_size}, "
          f"{llm.engine.block_pool.num_blocks} KV blocks", flush=True)
    print("# " + " ".join(sys.argv), flush=True)
    generate(llm, [[1] * 32], 4)   # warm-up
    timer = SchedulerTimer(llm)

    runs: list[Run] = []
    for rep in range(args.repeats):
        for scenario in scenarios:
            # Alternate which variant goes first, so drift in machine load hits both.
            for variant in (VARIANTS if rep % 2 == 0 else VARIANTS[::-1]):
                use_prefix_cache(llm, variant)
                timer.take()
                if scenario == "multiturn":
                    run = run_multiturn(llm, args, variant, timer)
                else:
                    prompts = scenario_shared(llm, args, random.Random(args.seed), scenario == "noreuse")
                    run = summarize(scenario, variant, llm, [generate(llm, prompts, args.output_len)], timer)
                runs.append(run)
                print(json.dumps({**asdict(run), "output_tok_s": round(run.output_tok_s, 2),
                                  "repeat": rep}), flush=True)

    print("\n| scenario | variant | best s | output tok/s | mean TTFT s | prompt tok | "
          "prefilled tok | hit rate | evicted blocks | scheduler ms/step |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for scenario in scenarios:
        for variant in VARIANTS:
            r = best(runs, scenario, variant)
            print(f"| {scenario} | {variant} | {r.seconds:.2f} | {r.output_tok_s:.1f} | {r.mean_ttft_s:.2f} | "
                  f"{r.prompt_tokens} | {r.prefill_tokens} | {r.cached_tokens / r.prompt_tokens:.1%} | "
                  f"{r.evicted_blocks} | {1e3 * r.scheduler_s / r.steps:.3f} |")
    print()
    for scenario in scenarios:
        on, off = best(runs, scenario, "radix"), best(runs, scenario, "none")
        line = f"{scenario}: radix vs none: {off.seconds / on.seconds:.2f}x end-to-end"
        if scenario != "noreuse":
            line += (f", TTFT {off.mean_ttft_s / on.mean_ttft_s:.2f}x lower, prefill tokens saved "
                     f"{1 - on.prefill_tokens / off.prefill_tokens:.1%}")
        else:
            line += (f" (wall time {on.seconds / off.seconds - 1:+.1%}; scheduler time per step "
                     f"{1e3 * on.scheduler_s / on.steps:.3f} vs {1e3 * off.scheduler_s / off.steps:.3f} ms)")
        print(line)
    if args.json:
        with open(args.json, "w") as f:
            json.dump([asdict(r) for r in runs], f, indent=1)


if __name__ == "__main__":
    main()
