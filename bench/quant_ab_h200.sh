#!/usr/bin/env bash
# One device call (carry .whl): the quantized kernels' GPU tests, the per-layer kernels
# with split-K partials summed in-kernel or by the reduce kernel (EMBER_SPLITK_FIXUP), and
# where a decode step's time goes for bf16 / FP8 / AWQ at batch 1 and 64.
# (bench/results/h200_2026-11-29f_skinny_ab.txt came from this script at commit 3930263,
# which also switched FP8/INT4 GEMV prefetch and evict-first loads by environment.)
source bench/h200_env.sh
timeout ${TEST_TIMEOUT:-200} python3 -m pytest -q -p no:cacheprovider tests/test_quant_kernels.py 2>&1 | tail -4 | tee "$OUT/test_quant_kernels.txt"
for f in 0 1; do
  echo "## EMBER_SPLITK_FIXUP=$f" | tee -a "$OUT/skinny_ab.txt"
  EMBER_SPLITK_FIXUP=$f timeout 120 python3 bench/skinny_gpu.py --rows ${ROWS:-1 16 64} 2>&1 \
      | grep -v '^{"check' | tee -a "$OUT/skinny_ab.txt" | grep "^|"
done
timeout ${PROFILE_TIMEOUT:-200} python3 bench/profile_step.py --batch-sizes 1 64 --layer-kernels triton \
    --quantization ${QUANTS:-bf16 fp8 awq} --steps 32 --profile-steps 3 2>&1 | grep -v "^{" | tee "$OUT/profile_quant.txt" | grep "^=="
