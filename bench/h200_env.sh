# Sourced by the bench/*_h200.sh scripts at the start of a device call (dummy-weight runs,
# carry .whl): $OUT for the results, the carried wheels on PYTHONPATH, the GPU and library
# versions in $OUT/gpu.txt, and $LLAMA, the Llama-3.1-8B shape's engine arguments.
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
  date -u; } | tee "$OUT/gpu.txt"
LLAMA="--model bench/configs/llama-3.1-8b/config.json --load-format dummy --max-model-len 4096"
