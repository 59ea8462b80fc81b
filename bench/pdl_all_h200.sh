#!/usr/bin/env bash
# PDL on every Triton kernel of a decode layer (one device call, carry .whl): the kernel
# tests compiled and batch-1 Llama-3.1-8B decode with PDL on / off, twice, on one machine.
source "$(dirname "$0")/h200_env.sh"   # $OUT, wheels, versions in $OUT/gpu.txt, $LLAMA
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_triton_layer_ops.py tests/test_gpu_async.py \
    tests/test_triton_kernels.py 2>&1 | tail -3 | tee "$OUT/gpu_tests.txt"
for pdl in 1 0 1 0; do
  EMBER_PDL=$pdl python3 bench/offline.py --mode decode $LLAMA --prompt-len 128 --output-len 512 \
    --max-num-seqs 64 --async-scheduling on --no-hf 2>&1 | grep "ember:\|decode step\|of 4.8" | sed "s/^/[PDL=$pdl] /" | tee -a "$OUT/decode_pdl_all.txt"
done
