#!/usr/bin/env bash
# Same-machine A/B of a speculative step's host cost: bench/profile_spec_step.py (dummy
# SmolLM2-shape weights, random drafters) under an older engine tree and the current one,
# alternating, in one device call (machines differ by more than the change measured).
#   git archive <old commit> ember bench tests | tar -x -C .devrun/old
#   cp bench/profile_spec_step.py .devrun/old/bench/      # the same script on both sides
#   then on the device, carrying .whl and .devrun/old:  bash bench/ab_spec_host_h200.sh
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl 2>/dev/null
ARGS=${ARGS:---batch-sizes 1 8 --variants none peagle-tree-k5 --tree-budget 24 --steps 60 --profile-steps 3}
for i in 1 2; do
  for side in old new; do
    dir=$PWD; [ $side = old ] && dir=$PWD/.devrun/old
    echo "=== $side, run $i"
    (cd "$dir" && PYTHONPATH=/tmp/site:$dir timeout 150 python3 bench/profile_spec_step.py $ARGS 2>&1 \
        | grep "^## \|device ms\|syncs/step")
  done
done
