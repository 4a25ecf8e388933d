#!/usr/bin/env bash
# All GPU checks of issue #7 in one go: ~7 minutes on one H100 (80 GB), run from the repo root:
#
#     bash benchmarks/gpu_checks.sh
#
# Needs only torch, transformers and peft (the device machine has no mteb/datasets/faiss and no
# network): the models are random-initialised Mistral-7B shapes built on the GPU, no download.
# 1. encode: 2048 BEIR-like documents, given-order and length-sorted batches of 64 vs our
#    token-budget batches (8k/16k/32k tokens). REFERENCES.md: 11.6k / 26.0k / 31.8k real tok/s.
#    (~2 min: three 7B encodes of ~390k real tokens at 12-32k tok/s, plus model init.)
# 2. train: GradCache LoRA step, batch 256 (query 64 + doc <= 256 tokens), baseline chunk 32
#    padded full length with checkpointing (REFERENCES.md: 17.7 s/step, 4.6k tok/s, 19 GB), the
#    same chunks trimmed, and ours at 8k/32k tokens per chunk with checkpointing and 4k without
#    (REFERENCES.md: no checkpointing needs ~50 GB at 16 x 256 tokens, so 4096 is the safe size);
#    then --find-max-batch doubles the batch from 256 at the best of ours until OOM or 60 s.
#    (~4.5 min: 5 variants x 3 steps of 5-18 s each, plus model init and the doubling.)
# Each script appends a block to benchmarks/results.md; with $OUT set (the device runner), the
# file is copied there so the numbers come back.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true

copy_back() { if [ -n "${OUT:-}" ]; then cp benchmarks/results.md "$OUT/" || true; fi; }
trap copy_back EXIT

timeout 200 "$PY" benchmarks/encode_throughput.py --model-shape mistral-7b --n-docs 2048 \
    --batch-size 64 --max-tokens 8192,16384,32768
timeout 330 "$PY" benchmarks/train_throughput.py --model-shape mistral-7b --batch 256 \
    --chunk 32 --ours on:8192,on:32768,off:4096 --steps 2 --warmup 1 \
    --find-max-batch --time-budget-s 60
