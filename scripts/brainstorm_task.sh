#!/usr/bin/env bash
# Synthetic data, step 1: brainstorm task descriptions for the E5 task families.
#
#   bash scripts/brainstorm_task.sh                       # local server on 127.0.0.1:8000
#   BASE_URL=https://api.openai.com/v1 MODEL=gpt-4o OPENAI_API_KEY=sk-... \
#       bash scripts/brainstorm_task.sh --concurrency 8
#
# Writes $OUT_DIR/tasks.jsonl (plus brainstorm.jsonl, brainstorm.rejects.jsonl, usage.jsonl).
# Rerunning the same command resumes: finished requests are skipped. Any extra arguments go to
# `conretriever brainstorm` (see `python -m conretriever brainstorm --help`).
set -euo pipefail

BASE_URL="${BASE_URL:-http://127.0.0.1:8000/v1}"   # any OpenAI-compatible /v1 endpoint
MODEL="${MODEL:-local}"                             # model name the endpoint serves
OUT_DIR="${OUT_DIR:-synthetic_out}"                 # logs, tasks.jsonl
FAMILIES="${FAMILIES:-all}"                         # or e.g. "short-long,sts,bitext"
REQUESTS_PER_FAMILY="${REQUESTS_PER_FAMILY:-4}"     # brainstorm requests per family
TASKS_PER_REQUEST="${TASKS_PER_REQUEST:-20}"        # tasks asked for in each request
PYTHON="${PYTHON:-python}"

exec "$PYTHON" -m conretriever brainstorm \
    --base-url "$BASE_URL" --model "$MODEL" --out-dir "$OUT_DIR" --families "$FAMILIES" \
    --requests-per-family "$REQUESTS_PER_FAMILY" --tasks-per-request "$TASKS_PER_REQUEST" \
    "$@"
