#!/usr/bin/env bash
# Train an LLM retriever with GradCache contrastive learning, then evaluate it e5-style.
#
#   bash scripts/train_eval_llm_retriever.sh [extra conretriever-train flags ...]
#
# With no arguments: the CPU demo (configs/demo.yaml): LoRA-tune the embedded Gemma-3-270M on
# training_data/demo, evaluate the untrained model, the trained one and a reference model
# (all-MiniLM-L6-v2) on eval_data/demo, and print them side by side. The real reproduction is a
# config plus processes, e.g.
#   CONFIG=configs/e5_mistral_7b.yaml NPROC=8 EVAL_DATA="beir15" \
#     bash scripts/train_eval_llm_retriever.sh --train_data training_data/e5
#
# Variables (all optional; nothing else is read from the environment):
#   CONFIG      run config YAML                                  (default configs/demo.yaml)
#   NPROC       processes; >1 launches torchrun with FSDP2         (default 1)
#   OUTPUT_DIR  run folder: checkpoints, metrics, final/, eval_*/  (default outputs/<config name>,
#               started afresh on every run; a folder you name is never overwritten: pass
#               --overwrite_output_dir true or --resume true for it)
#   EVAL_DATA   BEIR folders and/or MTEB task names or presets   (default eval_data/demo)
#   EVAL_BASE   1 = also evaluate the untrained model, side by side (default 1; 0 skips)
#   REFERENCE   a model evaluated the same way, as a reference row (default embedded:minilm;
#               empty skips)
#   EVAL_NPROC  processes for evaluation (corpus encoding sharded) (default 1)
# Extra arguments go to `conretriever train` and override the config (--learning_rate 1e-4 ...).
set -euo pipefail
cd "$(dirname "$0")/.."

CONFIG="${CONFIG:-configs/demo.yaml}"
NPROC="${NPROC:-1}"
EVAL_DATA="${EVAL_DATA:-eval_data/demo}"
EVAL_BASE="${EVAL_BASE:-1}"
REFERENCE="${REFERENCE-embedded:minilm}"
EVAL_NPROC="${EVAL_NPROC:-1}"
fresh=()
if [[ -z "${OUTPUT_DIR:-}" ]]; then
  OUTPUT_DIR="outputs/$(basename "$CONFIG" .yaml)"
  fresh=(--overwrite_output_dir true)
  echo "== $OUTPUT_DIR is this script's own folder: starting it afresh (set OUTPUT_DIR to keep runs)"
fi

train_args=(train --config "$CONFIG" --output "$OUTPUT_DIR" "${fresh[@]}" "$@")
start=$(date +%s)
echo "== train: $CONFIG -> $OUTPUT_DIR ($NPROC process(es))"
if [[ "$NPROC" -gt 1 ]]; then
  torchrun --nproc_per_node "$NPROC" -m conretriever "${train_args[@]}"
else
  python -m conretriever "${train_args[@]}"
fi
echo "== trained in $(( $(date +%s) - start )) s"

# shellcheck disable=SC2206  # EVAL_DATA is a space-separated list on purpose
eval_targets=($EVAL_DATA)
[[ ${#eval_targets[@]} -gt 0 ]] || exit 0
echo "== evaluate the trained model on: ${EVAL_DATA}"
OUTPUT_DIR="$OUTPUT_DIR/eval_trained" NPROC="$EVAL_NPROC" EXTRA_ARGS="--overwrite" \
  bash scripts/eval_mteb_beir.sh "$OUTPUT_DIR/final" "${eval_targets[@]}"
runs=("trained=$OUTPUT_DIR/eval_trained")
if [[ "$EVAL_BASE" == "1" ]]; then
  # --base_model_of: the run's base model, with the settings (lengths, prompts, pooling) its
  # final/ model was trained with
  echo "== evaluate the untrained base model the same way"
  OUTPUT_DIR="$OUTPUT_DIR/eval_base" NPROC="$EVAL_NPROC" EXTRA_ARGS="--overwrite" \
    MODEL_FLAG=--base_model_of bash scripts/eval_mteb_beir.sh "$OUTPUT_DIR" "${eval_targets[@]}"
  runs=("untrained=$OUTPUT_DIR/eval_base" "${runs[@]}")
fi
if [[ -n "$REFERENCE" ]]; then
  # The reference model's own settings (lengths, prompts) apply: it is not our training run.
  echo "== evaluate the reference model ($REFERENCE) on the same data"
  OUTPUT_DIR="$OUTPUT_DIR/eval_reference" NPROC="$EVAL_NPROC" EXTRA_ARGS="--overwrite" \
    bash scripts/eval_mteb_beir.sh "$REFERENCE" "${eval_targets[@]}"
  runs+=("$REFERENCE (reference)=$OUTPUT_DIR/eval_reference")
fi
echo "== results (x100)"
python -m conretriever compare "${runs[@]}" --output "$OUTPUT_DIR/comparison.md" \
  --plot "$OUTPUT_DIR/report/comparison.png"
python -m conretriever report "$OUTPUT_DIR" --output "$OUTPUT_DIR/report"
echo "== done in $(( $(date +%s) - start )) s; model: $OUTPUT_DIR/final (card: README.md)," \
  "plots: $OUTPUT_DIR/report/"
