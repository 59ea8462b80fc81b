#!/usr/bin/env bash
# One device call (carry .whl): the quantized kernels' GPU tests, the per-layer A/B of the
# decode GEMVs' weight-stream switches (splitk.FIXUP / PREFETCH / EVICT, by environment),
# and where a decode step's time goes for bf16 / FP8 / AWQ at batch 1 and 64.
source bench/h200_env.sh
timeout ${TEST_TIMEOUT:-200} python3 -m pytest -q -p no:cacheprovider tests/test_quant_kernels.py 2>&1 | tail -4 | tee "$OUT/test_quant_kernels.txt"
for v in "0 0 0" "1 0 0" "1 1 0" "1 0 1" "1 1 1"; do
  set -- $v
  rows="1"; [ "$v" = "1 1 1" ] && rows="1 16 64"
  echo "## EMBER_SPLITK_FIXUP=$1 EMBER_QUANT_PREFETCH=$2 EMBER_QUANT_EVICT=$3 rows $rows" | tee -a "$OUT/skinny_ab.txt"
  EMBER_SPLITK_FIXUP=$1 EMBER_QUANT_PREFETCH=$2 EMBER_QUANT_EVICT=$3 timeout 90 \
      python3 bench/skinny_gpu.py --rows $rows 2>&1 | grep -v '^{"check' | tee -a "$OUT/skinny_ab.txt" | grep "^|"
done
timeout ${PROFILE_TIMEOUT:-200} python3 bench/profile_step.py --batch-sizes 1 64 --layer-kernels triton \
    --quantization ${QUANTS:-bf16 fp8 awq} --steps 32 --profile-steps 3 2>&1 | grep -v "^{" | tee "$OUT/profile_quant.txt" | grep "^=="
