#!/usr/bin/env bash
# One device call (carry .whl), 2026-11-30 (twelfth session): the decoder GEMV's and the
# skinny kernel's scale/zero prefetch, Triton-pipelined GEMV tiles (STAGES) and x pairs
# loaded in the word tile's layout (x-direct), and skinny tiles with four stages:
# GPU tests of those kernels, per-layer times with the skinny scale prefetch off and on
# (EMBER_SKINNY_SZ_AHEAD), then every GEMV tile at one row and every skinny tile at 64 rows.
source bench/h200_env.sh
timeout ${TEST_TIMEOUT:-200} python3 -m pytest -q -p no:cacheprovider tests/test_quant_kernels.py \
    -k "${TEST_K:-int4_decoder or nvfp4_decoder or int4_skinny}" 2>&1 | tail -4 | tee "$OUT/tests.txt"
for a in 0 1; do
  echo "## EMBER_SKINNY_SZ_AHEAD=$a" | tee -a "$OUT/skinny_ab.txt"
  EMBER_SKINNY_SZ_AHEAD=$a timeout 120 python3 bench/skinny_gpu.py --rows ${AB_ROWS:-16 64} 2>&1 \
      | grep -v '^{"check' | tee -a "$OUT/skinny_ab.txt" | grep "^|"
done
timeout ${SWEEP_TIMEOUT:-240} python3 bench/skinny_gpu.py --rows 1 64 --configs --skinny-configs 2>&1 \
    | grep -v '^{"check' | tee "$OUT/sweep.txt" | grep "^|\|^# int4"
