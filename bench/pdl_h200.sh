#!/usr/bin/env bash
# The H200 run behind docs/BENCHMARKS.md's PDL / argmax / FP8-autotune figures (one device
# call, dummy weights, carry .whl): the kernel tests compiled (PDL chain in a graph, argmax,
# every FP8 GEMV tile), batch-1 decode of the Llama-3.1-8B shape with PDL on and off in the
# same call (HF peer once), and the quantized formats' kernels and decode speed.
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
  date -u; } | tee "$OUT/gpu.txt"
python3 -m pytest -q -p no:cacheprovider tests/test_triton_layer_ops.py tests/test_gpu_async.py \
    tests/test_triton_kernels.py "tests/test_quant_kernels.py" -k "not nvfp4 and not int4" 2>&1 | tail -8 | tee "$OUT/gpu_tests.txt"
LLAMA="--model bench/configs/llama-3.1-8b/config.json --load-format dummy --max-model-len 4096"
for pdl in ${PDL_RUNS:-1 0}; do
  extra="--no-hf"; [ "$pdl" = 1 ] && extra="--also-sync"; [ "${HF_ONCE:-}" = done ] && extra="--no-hf"; HF_ONCE=done
  EMBER_PDL=$pdl python3 bench/offline.py --mode decode $LLAMA --prompt-len 128 --output-len 512 --max-num-seqs 64 \
      --async-scheduling on $extra 2>&1 | grep -v Warning | sed "s/^/[EMBER_PDL=$pdl] /" | tee -a "$OUT/decode_llama8b_pdl.txt"
done
python3 bench/quant_gpu.py --kernel-methods bf16 fp8 --e2e-methods ${E2E:-bf16 fp8 awq nvfp4} \
    --out "$OUT/quant_pdl.json" 2>&1 | grep -v "Warning\|^{" | tee "$OUT/quant_pdl.txt"
