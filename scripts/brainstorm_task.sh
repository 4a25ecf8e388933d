#!/usr/bin/env bash
# Synthetic data, step 1: brainstorm task descriptions for the E5 task families.
#
#   bash scripts/brainstorm_task.sh            # offline default: embedded Gemma-3-270M, ~1 min
#   BASE_URL=http://127.0.0.1:8000/v1 bash scripts/brainstorm_task.sh     # a local vLLM/llama.cpp
#   BASE_URL=https://api.openai.com/v1 MODEL=gpt-4o OPENAI_API_KEY=sk-... \
#       bash scripts/brainstorm_task.sh --concurrency 8
#
# With BASE_URL unset (or set to a model spec instead of a URL), the model is served in-process
# on a loopback port (conretriever/synth/local_llm.py) and the run uses small counts so that it
# ends in about a minute on a 2-core CPU: the plumbing is real, a 270M base model's text is not.
# Writes $OUT_DIR/tasks.jsonl (plus brainstorm.jsonl, brainstorm.rejects.jsonl, usage.jsonl).
# Rerunning the same command resumes: finished requests are skipped. Any extra arguments go to
# `conretriever brainstorm` (see `python -m conretriever brainstorm --help`).
set -euo pipefail

BASE_URL="${BASE_URL:-embedded:gemma-3-270m}"      # OpenAI-compatible /v1 URL or model spec
MODEL="${MODEL:-local}"                             # model name the endpoint serves
OUT_DIR="${OUT_DIR:-synthetic_out}"                 # logs, tasks.jsonl
FAMILIES="${FAMILIES:-all}"                         # or e.g. "short-long,sts,bitext"
PYTHON="${PYTHON:-python}"
local_args=()
if [[ "$BASE_URL" != http://* && "$BASE_URL" != https://* ]]; then
  REQUESTS_PER_FAMILY="${REQUESTS_PER_FAMILY:-1}"
  TASKS_PER_REQUEST="${TASKS_PER_REQUEST:-3}"
  # the schema makes the local server write the JSON and the model only its strings
  local_args=(--json-mode schema --max-tokens 96 --concurrency 1)
fi
REQUESTS_PER_FAMILY="${REQUESTS_PER_FAMILY:-4}"     # brainstorm requests per family
TASKS_PER_REQUEST="${TASKS_PER_REQUEST:-20}"        # tasks asked for in each request

exec "$PYTHON" -m conretriever brainstorm \
    --base-url "$BASE_URL" --model "$MODEL" --output "$OUT_DIR" --families "$FAMILIES" \
    --requests-per-family "$REQUESTS_PER_FAMILY" --tasks-per-request "$TASKS_PER_REQUEST" \
    "${local_args[@]}" "$@"
