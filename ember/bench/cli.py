"""`ember bench ...` subcommands. Imported by `ember`'s parser, so it imports nothing
optional at the top."""
from __future__ import annotations

import argparse


def add_bench_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser("bench", help="benchmarks")
    sub = p.add_subparsers(dest="bench_command", required=True)
    from ember.bench.serve import add_serve_bench_args, cmd_bench_serve

    s = sub.add_parser("serve", help="online load against a running OpenAI-compatible server "
                                     "(Poisson arrivals; TTFT / TPOT / ITL percentiles)")
    add_serve_bench_args(s)
    s.set_defaults(func=cmd_bench_serve)
    return p
