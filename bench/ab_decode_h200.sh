#!/usr/bin/env bash
# A/B on one H200 (one device call): batch-1 Llama-3.1-8B decode with PDL on/off and decode
# splits of 256/64 tokens, plus the FP8 GEMV tests and FP8 vs bf16 kernels and decode.
source "$(dirname "$0")/h200_env.sh"   # $OUT, wheels, versions in $OUT/gpu.txt, $LLAMA
python3 -m pytest -q -p no:cacheprovider tests/test_quant_kernels.py -k fp8 2>&1 | tail -2 | tee "$OUT/fp8_tests.txt"
for v in "1 256" "0 256" "1 64" "0 64" "1 256" "1 64"; do set -- $v
  EMBER_PDL=$1 EMBER_DECODE_SPLIT_TOKENS=$2 python3 bench/offline.py --mode decode $LLAMA --prompt-len 128 --output-len 512 \
    --max-num-seqs 64 --async-scheduling on --no-hf 2>&1 | grep "ember:\|decode step\|roofline\|of 4.8" | sed "s/^/[PDL=$1 split_tokens=$2] /" | tee -a "$OUT/ab_decode.txt"
done
python3 bench/quant_gpu.py --kernel-methods bf16 fp8 --e2e-methods bf16 fp8 --out "$OUT/quant_fp8.json" 2>&1 | grep -v "Warning\|^{\|tokenizer" | tee "$OUT/quant_fp8.txt"
