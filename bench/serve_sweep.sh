#!/usr/bin/env bash
# Online rate sweep on the CPU: one ember server (SmolLM2), `ember bench serve` at several
# request rates. Usage: bash bench/serve_sweep.sh [rates...]   (default: 1 2 4)
set -euo pipefail
rates=${*:-1 2 4}
port=8765
ember serve --model smollm2-135m --max-model-len 1024 --port $port --uvicorn-log-level warning &
server=$!
trap 'kill $server 2>/dev/null; wait $server 2>/dev/null' EXIT
until curl -sf http://127.0.0.1:$port/health >/dev/null; do sleep 1; done
for r in $rates; do
  echo "=== request rate $r/s ==="
  ember bench serve --base-url http://127.0.0.1:$port --num-prompts 16 --request-rate "$r" \
      --input-len 64 --output-len 32 --seed 0
done
