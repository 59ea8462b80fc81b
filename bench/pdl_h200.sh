#!/usr/bin/env bash
# The H200 run behind docs/BENCHMARKS.md's PDL / argmax / FP8-autotune figures (one device
# call, dummy weights, carry .whl): the kernel tests compiled (PDL chain in a graph, argmax,
# every FP8 GEMV tile), batch-1 decode of the Llama-3.1-8B shape with PDL on and off in the
# same call (HF peer once), and the quantized formats' kernels and decode speed.
source "$(dirname "$0")/h200_env.sh"   # $OUT, wheels, versions in $OUT/gpu.txt, $LLAMA
python3 -m pytest -q -p no:cacheprovider tests/test_triton_layer_ops.py tests/test_gpu_async.py \
    tests/test_triton_kernels.py "tests/test_quant_kernels.py" -k "not nvfp4 and not int4" 2>&1 | tail -8 | tee "$OUT/gpu_tests.txt"
for pdl in ${PDL_RUNS:-1 0}; do
  extra="--no-hf"; [ "$pdl" = 1 ] && extra="--also-sync"; [ "${HF_ONCE:-}" = done ] && extra="--no-hf"; HF_ONCE=done
  EMBER_PDL=$pdl python3 bench/offline.py --mode decode $LLAMA --prompt-len 128 --output-len 512 --max-num-seqs 64 \
      --async-scheduling on $extra 2>&1 | grep -v Warning | sed "s/^/[EMBER_PDL=$pdl] /" | tee -a "$OUT/decode_llama8b_pdl.txt"
done
python3 bench/quant_gpu.py --kernel-methods bf16 fp8 --e2e-methods ${E2E:-bf16 fp8 awq nvfp4} \
    --out "$OUT/quant_pdl.json" 2>&1 | grep -v "Warning\|^{" | tee "$OUT/quant_pdl.txt"
