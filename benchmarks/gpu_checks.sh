#!/usr/bin/env bash
# All GPU checks in one go: ~8 minutes on one H100/H200, run from the repo root:
#
#     bash benchmarks/gpu_checks.sh
#
# Needs only torch (>= 2.10 for the varlen attention kernel), transformers, peft and pytest (the
# device machine has no mteb/datasets/faiss and no network): models are random-initialised
# Mistral-7B shapes built on the GPU, no download.
# 0. tests marked gpu: the varlen FlashAttention packed path against the padded path in bf16.
# 1. the real loop: `torchrun --nproc_per_node 1 -m conretriever train --fsdp true` (FSDP2 over
#    NCCL with the bf16 MixedPrecisionPolicy, even at world size 1) for 20 steps on a random-init
#    Mistral-7B shape with packed token-budget GradCache chunks, checkpoints at 10; then
#    `--resume true` from checkpoint-10 (steps 11-20 again: their losses are compared) and the
#    export. (~3 min)
# 2. encode: 2048 BEIR-like documents, given-order and length-sorted batches of 64 (the
#    baselines; REFERENCES.md: 11.6k / 26.0k real tok/s) vs ours: token-budget padded batches and
#    padding-free packed batches at 16k tokens. (~1.5 min)
# 3. train: GradCache LoRA step, batch 256 (query 64 + doc <= 256 tokens), baseline chunk 32
#    padded to full length with checkpointing (REFERENCES.md: 17.7 s/step, 4.6k tok/s, 19 GB),
#    the same chunks trimmed, and ours at 16k tokens per chunk with checkpointing, padded and
#    packed (the real loop's step, training.step.train_step). (~2.5 min)
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

WORK=${WORK:-/tmp/conretriever_gpu}
mkdir -p "$WORK"
run model.log timeout 120 "$PY" benchmarks/make_random_model.py --shape "$SHAPE" --output "$WORK/model"
loop=(-m conretriever train --model_name_or_path "$WORK/model" --fsdp true
      --train_data training_data/demo --output "$WORK/run" --max_steps 20 --save_steps 10
      --per_device_train_batch_size 64 --n_hard_negative 1 --chunk_size 0 --chunk_tokens 16384
      --packed true --query_max_length 64 --doc_max_length 256 --gradient_checkpointing true
      --report_to none --logging_steps 1)
run loop.log timeout 200 torchrun --nproc_per_node 1 "${loop[@]}" --overwrite_output_dir true
cp "$WORK/run/metrics.jsonl" "$LOGS/loop_metrics.jsonl" 2>/dev/null || true
run resume.log timeout 150 torchrun --nproc_per_node 1 "${loop[@]}" --resume true
cp "$WORK/run/metrics.jsonl" "$LOGS/resume_metrics.jsonl" 2>/dev/null || true
"$PY" - "$LOGS" <<'PYEOF' 2>&1 | tee "$LOGS/loop_summary.log"
import json, sys
from pathlib import Path
logs = Path(sys.argv[1])
def rows(name):
    p = logs / name
    return [json.loads(x) for x in p.read_text().splitlines()] if p.exists() else []
a, b = rows("loop_metrics.jsonl"), rows("resume_metrics.jsonl")
tail = [r for r in a if r["step"] > 10]
if tail:
    print("loop tokens/s (steps 11-20, median):", sorted(r["tokens_per_s"] for r in tail)[len(tail) // 2],
          "peak MiB:", max(r["peak_mem_mb"] for r in a))
pairs = [(x["loss"], y["loss"]) for x, y in zip(a, b) if x["step"] > 10 and x["step"] == y["step"]]
print("resume: steps 11-20 max |loss diff|:", max((abs(x - y) for x, y in pairs), default=None))
PYEOF
ls "$WORK/run/final" > "$LOGS/final_files.txt" 2>&1 || true

run encode.log timeout 150 "$PY" benchmarks/encode_throughput.py --model-shape "$SHAPE" \
    --n-docs 2048 --batch-size 64 --max-tokens 16384 --packed both
run train.log timeout 200 "$PY" benchmarks/train_throughput.py --model-shape "$SHAPE" \
    --batch 256 --chunk 32 --ours on:16384,on:16384:packed --steps 2 --warmup 1
exit "$status"
