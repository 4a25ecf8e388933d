#!/usr/bin/env bash
# Synthetic data, step 2: one JSON example per request for every brainstormed task, then the
# training file $TRAIN_DIR/synthetic.jsonl (task "synthetic") for `conretriever train`.
#
#   bash scripts/generate_examples.sh          # offline default: embedded Gemma-3-270M, minutes
#   BASE_URL=http://127.0.0.1:8000/v1 bash scripts/generate_examples.sh   # a local vLLM/llama.cpp
#   BASE_URL=https://api.openai.com/v1 MODEL=gpt-4o-mini OPENAI_API_KEY=sk-... \
#       bash scripts/generate_examples.sh --concurrency 16 \
#       --price-per-1k-input 0.00015 --price-per-1k-output 0.0006
#
# Reads $OUT_DIR/tasks.jsonl from scripts/brainstorm_task.sh. Killed runs resume when the same
# command is run again. Extra arguments go to `conretriever generate`. With BASE_URL unset (or a
# model spec), the model is served in-process as in brainstorm_task.sh, with small counts, English
# only.
set -euo pipefail

BASE_URL="${BASE_URL:-embedded:gemma-3-270m}"      # OpenAI-compatible /v1 URL or model spec
MODEL="${MODEL:-local}"                             # model name the endpoint serves
OUT_DIR="${OUT_DIR:-synthetic_out}"                 # where tasks.jsonl and the logs live
TRAIN_DIR="${TRAIN_DIR:-$OUT_DIR/train}"            # gets synthetic.jsonl (and nothing else)
PYTHON="${PYTHON:-python}"
local_args=()
if [[ "$BASE_URL" != http://* && "$BASE_URL" != https://* ]]; then
  EXAMPLES_PER_TASK="${EXAMPLES_PER_TASK:-1}"
  CONCURRENCY="${CONCURRENCY:-1}"                   # one model in-process: one reply at a time
  local_args=(--json-mode schema --max-tokens 192 --languages English:1)
fi
EXAMPLES_PER_TASK="${EXAMPLES_PER_TASK:-4}"         # requests (examples) per task
CONCURRENCY="${CONCURRENCY:-4}"                     # parallel requests

exec "$PYTHON" -m conretriever generate \
    --base-url "$BASE_URL" --model "$MODEL" --output "$OUT_DIR" --train-dir "$TRAIN_DIR" \
    --examples-per-task "$EXAMPLES_PER_TASK" --concurrency "$CONCURRENCY" \
    "${local_args[@]}" "$@"
