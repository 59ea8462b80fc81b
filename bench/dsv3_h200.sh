#!/usr/bin/env bash
# The DeepSeek (MLA + MoE) H200 runs behind docs/BENCHMARKS.md, in two back-to-back calls
# of the device tool (each call is capped at 10 minutes):
#   phase 1: GPU tests (MLA kernel and backend, Triton MoE, DeepSeek e2e), then batch-1
#            decode at DeepSeek-V2-Lite shape with HF transformers in the same run
#   phase 2: batch-64 (with HF at batch 64) and batch-256 decode, the MLA kernel tile sweep
set -uo pipefail
phase=$1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
CFG=bench/configs/deepseek-v2-lite/config.json
common="--model $CFG --load-format dummy --prompt-len 128 --output-len 256 --max-model-len 2048"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu_$phase.txt"
date -u | tee -a "$OUT/gpu_$phase.txt"
if [ "$phase" = 1 ]; then
  timeout 200 python3 -m pytest -q -p no:cacheprovider tests/test_deepseek_gpu.py tests/test_mla_triton.py \
      tests/test_triton_mla.py tests/test_triton_moe.py tests/test_quant_kernels.py 2>&1 | tail -15 | tee "$OUT/dsv3_gpu_tests.txt"
  timeout 300 python3 bench/offline.py --mode decode $common --batch 1 --max-num-seqs 1 2>&1 \
      | grep -v Warning | tee "$OUT/dsv3_decode_b1.txt"
else
  timeout 200 python3 bench/offline.py --mode decode $common --batch 64 --max-num-seqs 64 --hf-batch-size 64 2>&1 \
      | grep -v Warning | tee "$OUT/dsv3_decode_b64.txt"
  timeout 150 python3 bench/offline.py --mode decode $common --batch 256 --max-num-seqs 256 --no-hf 2>&1 \
      | grep -v Warning | tee "$OUT/dsv3_decode_b256.txt"
  timeout 120 python3 bench/mla_gpu.py --quick --sweep --skip-correctness --out "$OUT/mla_sweep.json" 2>&1 \
      | tail -40 > "$OUT/mla_sweep.txt"; tail -25 "$OUT/mla_sweep.txt"
fi
