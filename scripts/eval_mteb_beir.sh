#!/usr/bin/env bash
# e5-style retrieval evaluation of one model on MTEB tasks and/or local BEIR folders.
#
#   bash scripts/eval_mteb_beir.sh MODEL [TASK_OR_DIR ...]
#
# MODEL: a folder written by `conretriever train` / Embedder.save, a HF id, or embedded:<name>.
# Each argument that is an existing directory is a local BEIR folder (corpus.jsonl, queries.jsonl,
# qrels/test.tsv; evaluated offline); anything else is an MTEB task name or a preset (beir15,
# small; mteb downloads those, so they need the internet). Default: the preset "small".
#
# Examples:
#   bash scripts/eval_mteb_beir.sh embedded:minilm ../shared/data/scifact
#   NPROC=8 bash scripts/eval_mteb_beir.sh runs/e5_mistral/final beir15
#
set -euo pipefail

# Variables (all optional):
OUTPUT_DIR="${OUTPUT_DIR:-eval_results}"  # <task>.json, summary.md, settings.json land here
BATCH_SIZE="${BATCH_SIZE:-}"              # most texts per forward (empty: the CLI's default)
NPROC="${NPROC:-1}"                       # >1: torchrun, one process per GPU, corpus sharded
EXTRA_ARGS="${EXTRA_ARGS:-}"              # passed through, e.g. "--max_queries 100 --no_cache"
MODEL_FLAG="${MODEL_FLAG:---model}"       # --base_model_of: the first argument is a run folder

if [[ $# -lt 1 ]]; then
  sed -n '2,12p' "$0" >&2
  exit 2
fi
model="$1"
shift
[[ $# -gt 0 ]] || set -- small

dirs=()
tasks=()
for arg in "$@"; do
  if [[ -d "$arg" ]]; then dirs+=("$arg"); else tasks+=("$arg"); fi
done

args=("$MODEL_FLAG" "$model" --output "$OUTPUT_DIR")
[[ -n "$BATCH_SIZE" ]] && args+=(--batch_size "$BATCH_SIZE")
[[ ${#dirs[@]} -gt 0 ]] && args+=(--beir_dir "${dirs[@]}")
[[ ${#tasks[@]} -gt 0 ]] && args+=(--tasks "${tasks[@]}")
# shellcheck disable=SC2206  # EXTRA_ARGS is meant to split into words
args+=($EXTRA_ARGS)

if [[ "$NPROC" -gt 1 ]]; then
  exec torchrun --nproc_per_node "$NPROC" -m conretriever eval "${args[@]}"
else
  exec conretriever eval "${args[@]}"
fi
