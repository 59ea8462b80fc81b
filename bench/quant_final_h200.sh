#!/usr/bin/env bash
# One device call (carry .whl): the quantized kernels' GPU tests, per-layer kernel times
# at 1-256 rows, and the end-to-end decode figures (bench/quant_gpu.py) for each format.
# Knobs: TEST_K (pytest -k), ROWS, SKINNY_ARGS (e.g. --skinny-configs), E2E (formats).
source bench/h200_env.sh
timeout ${TEST_TIMEOUT:-200} python3 -m pytest -q -p no:cacheprovider tests/test_quant_kernels.py ${TEST_K:+-k "$TEST_K"} 2>&1 | tail -4 | tee "$OUT/test_quant_kernels.txt"
timeout ${SKINNY_TIMEOUT:-120} python3 bench/skinny_gpu.py --rows ${ROWS:-1 16 64 128 256} ${SKINNY_ARGS:-} 2>&1 | grep -v '^{"check' | tee "$OUT/skinny.txt" | grep "^|\|^# int4-skinny"
timeout ${E2E_TIMEOUT:-330} python3 bench/quant_gpu.py --skip-kernels --e2e-budget-s 260 \
    --e2e-methods ${E2E:-bf16 awq fp8 nvfp4} --out "$OUT/quant_e2e.json" 2>&1 | tee "$OUT/quant_e2e.txt" | grep "^|"
