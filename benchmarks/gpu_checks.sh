#!/usr/bin/env bash
# All GPU checks in one go: ~6-7 minutes on one H100 (80 GB), run from the repo root:
#
#     bash benchmarks/gpu_checks.sh
#
# Needs only torch (>= 2.10 for the varlen attention kernel), transformers, peft and pytest (the
# device machine has no mteb/datasets/faiss and no network): models are random-initialised
# Mistral-7B shapes built on the GPU, no download.
# 0. tests marked gpu: the varlen FlashAttention packed path against the padded path in bf16.
# 1. encode: 2048 BEIR-like documents, given-order and length-sorted batches of 64 (the
#    baselines; REFERENCES.md: 11.6k / 26.0k real tok/s) vs ours: token-budget padded batches and
#    padding-free packed batches at 16k and 32k tokens. (~2.5 min)
# 2. train: GradCache LoRA step, batch 256 (query 64 + doc <= 256 tokens), baseline chunk 32
#    padded to full length with checkpointing (REFERENCES.md: 17.7 s/step, 4.6k tok/s, 19 GB),
#    the same chunks trimmed, and ours at 16k tokens per chunk with checkpointing and 4k without
#    (REFERENCES.md: no checkpointing needs ~50 GB at 16 x 256 tokens, so 4096 is the safe
#    size); then --find-max-batch doubles the batch at the best of ours within 75 s and
#    extrapolates the memory curve to the largest batch. (~4 min)
# Every part runs even if an earlier one failed; the exit status is the first failure's. Each
# benchmark appends a block to benchmarks/results.md; with $OUT set (the device runner), that
# file and the logs are copied there so the numbers come back.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
SHAPE=${SHAPE:-mistral-7b}  # tiny: a dry run of this script on any machine
LOGS=${OUT:-/tmp}
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$PY" -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"

copy_back() { if [ -n "${OUT:-}" ]; then cp benchmarks/results.md "$OUT/" || true; fi; }
trap copy_back EXIT

status=0
# run LOG CMD...: the command's output to the screen and $LOGS/LOG; a failure is remembered
run() {
  local log=$1
  shift
  "$@" 2>&1 | tee "$LOGS/$log"
  local rc=${PIPESTATUS[0]}
  if [ "$rc" -ne 0 ]; then
    echo "!! failed ($rc): $*"
    [ "$status" -ne 0 ] || status=$rc
  fi
}

run gpu_tests.log timeout 90 "$PY" -m pytest -q -p no:cacheprovider -m gpu -s tests/test_packing.py
run encode.log timeout 200 "$PY" benchmarks/encode_throughput.py --model-shape "$SHAPE" \
    --n-docs 2048 --batch-size 64 --max-tokens 16384,32768 --packed both
run train.log timeout 300 "$PY" benchmarks/train_throughput.py --model-shape "$SHAPE" \
    --batch 256 --chunk 32 --ours on:16384,off:4096 --steps 2 --warmup 1 \
    --find-max-batch --time-budget-s 75
exit "$status"
