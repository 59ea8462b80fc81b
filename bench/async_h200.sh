#!/usr/bin/env bash
# The H200 run behind docs/BENCHMARKS.md's async-scheduling figures (one device call,
# dummy weights, carry .whl): GPU tests of async scheduling, batch-1 and batch-64 decode of
# the Llama-3.1-8B shape with async scheduling on and off in the same run (HF peer at
# batch 1), the per-phase host profile, and the quantized formats' decode speed.
source "$(dirname "$0")/h200_env.sh"   # $OUT, wheels, versions in $OUT/gpu.txt, $LLAMA
python3 -m pytest -q -p no:cacheprovider tests/test_gpu_async.py 2>&1 | tail -15 | tee "$OUT/gpu_async_tests.txt"
python3 bench/offline.py --mode decode $LLAMA --prompt-len 128 --output-len 512 --max-num-seqs 64 \
    --async-scheduling on --also-sync 2>&1 | grep -v Warning | tee "$OUT/decode_llama8b_async.txt"
python3 bench/offline.py --mode decode $LLAMA --prompt-len 128 --output-len 256 --max-num-seqs 64 --batch 64 \
    --async-scheduling on --also-sync --no-hf 2>&1 | grep -v Warning | tee -a "$OUT/decode_llama8b_async.txt"
if [ "${PROFILE:-1}" = 1 ]; then
  python3 bench/profile_step.py --model bench/configs/llama-3.1-8b/config.json --batch-sizes 1 64 \
      --layer-kernels triton --async-scheduling on off --profile-steps 2 2>&1 | grep -v Warning | tee "$OUT/profile_step_async.txt"
fi
if [ "${QUANT:-1}" = 1 ]; then
  python3 bench/quant_gpu.py --skip-kernels --out "$OUT/quant_e2e_async.json" 2>&1 | grep -v Warning | tee "$OUT/quant_e2e_async.txt"
fi
