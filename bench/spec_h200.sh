#!/usr/bin/env bash
# Speculative decoding on the H200 with the real SmolLM2 (see bench/h200_run.sh for how the
# GGUF and the wheel travel; run this after its phase 2 has put the GGUF in /tmp/site).
#   DATA: the two text files (tinystories_sample.txt, wizard_of_oz.txt) carried with the run.
# 1. distil the 2-layer draft on the GPU (same recipe as on the CPU, whole 80% split, more epochs);
# 2. acceptance on held-out prompts + throughput at batch 1, 8, 64 vs no speculation.
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
DATA=${DATA:-"shared/data/tinystories_sample.txt shared/data/wizard_of_oz.txt"}
export PYTHONPATH=${PYTHONPATH:-/tmp/site:$PWD} PYTHONUNBUFFERED=1
python3 -m ember.cli train-draft --target smollm2-135m --text $DATA --out /tmp/draft-smollm2-2l \
    --num-layers 2 --epochs 8 --time-budget 8 --reserve-s 30 --device cuda 2>&1 | tee "$OUT/spec_train_draft_h200.txt"
python3 bench/spec_decode.py --device cuda --draft /tmp/draft-smollm2-2l --data $DATA \
    --num-quality-prompts 64 --quality-output-len 128 --output-len 128 --batch-sizes 1,8,64 \
    --speed-modes adaptive,fixed --out "$OUT/spec_decode_h200.json" 2>&1 | tee "$OUT/spec_decode_h200.txt"
