#!/usr/bin/env bash
# PDL on every Triton kernel of a decode layer (one device call, carry .whl): the kernel
# tests compiled and batch-1 Llama-3.1-8B decode with PDL on / off, twice, on one machine.
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
date -u | tee "$OUT/gpu.txt"
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_triton_layer_ops.py tests/test_gpu_async.py \
    tests/test_triton_kernels.py 2>&1 | tail -3 | tee "$OUT/gpu_tests.txt"
LLAMA="--model bench/configs/llama-3.1-8b/config.json --load-format dummy --max-model-len 4096"
for pdl in 1 0 1 0; do
  EMBER_PDL=$pdl python3 bench/offline.py --mode decode $LLAMA --prompt-len 128 --output-len 512 \
    --max-num-seqs 64 --async-scheduling on --no-hf 2>&1 | grep "ember:\|decode step\|of 4.8" | sed "s/^/[PDL=$pdl] /" | tee -a "$OUT/decode_pdl_all.txt"
done
