"""Quality benchmark: does training help? SciFact nDCG@10 before and after fine-tuning.

    python benchmarks/quality.py                       # configs/squad_gemma_cpu.yaml (~40 min CPU)
    python benchmarks/quality.py --max_steps 20        # any training flag overrides the config

1. Evaluate the untrained model (embedded Gemma-3-270M, last-token pooling, e5 prompts) on a BEIR
   folder (default ../shared/data/scifact, zero-shot: SciFact data is never trained on).
2. Train it with the config (default: SQuAD v1.1 with BM25 hard negatives, LoRA, GradCache).
3. Evaluate the exported model the same way (same lengths, instruction, dtype) and print both.
A row is appended to benchmarks/results.md with the machine, the command and the numbers.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def evaluate(spec: str, beir_dir: str, qlen: int, dlen: int, dtype: str) -> tuple[dict, float]:
    from conretriever.evaluation.evaluate import evaluate_beir_dir
    from conretriever.model.embedder import Embedder

    tic = time.perf_counter()
    lengths = {"query_max_length": qlen, "doc_max_length": dlen}
    model = Embedder.from_pretrained(spec, lengths, dtype=dtype)
    metrics = evaluate_beir_dir(model, beir_dir, batch_size=32, cache_dir=None)
    return metrics, time.perf_counter() - tic


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=str(REPO / "configs" / "squad_gemma_cpu.yaml"))
    parser.add_argument("--eval-dir", default=str(REPO.parent / "shared" / "data" / "scifact"))
    parser.add_argument(
        "--eval-dtype", default="auto", help="encode dtype of both models (auto: bf16 if native)"
    )
    parser.add_argument("--results", default=str(REPO / "benchmarks" / "results.md"))
    args, train_flags = parser.parse_known_args()
    os.chdir(REPO)  # config paths (../shared/data/..., outputs/...) are relative to the repo

    from conretriever.training.config import parse_config
    from conretriever.training.loop import train

    cfg = parse_config(["--config", args.config, *train_flags])
    if not Path(args.eval_dir).exists():
        print(f"{args.eval_dir}: evaluation folder not found", file=sys.stderr)
        return 2
    qlen, dlen = cfg.model.embedder.query_max_length, cfg.model.embedder.doc_max_length
    base, base_s = evaluate(cfg.model.model_name_or_path, args.eval_dir, qlen, dlen,
                            args.eval_dtype)  # fmt: skip
    print(f"untrained: nDCG@10 {100 * base['ndcg_at_10']:.2f} ({base_s:.0f} s)", flush=True)
    tic = time.perf_counter()
    result = train(cfg)
    train_s = time.perf_counter() - tic
    tuned, tuned_s = evaluate(result["final"], args.eval_dir, qlen, dlen, args.eval_dtype)
    name = Path(args.eval_dir).name
    rows = [
        f"| {label} | {100 * m['ndcg_at_10']:.2f} | {100 * m['recall_at_100']:.2f} | "
        f"{100 * m['mrr_at_10']:.2f} |"
        for label, m in (("untrained", base), ("trained", tuned))
    ]
    table = "\n".join(["| model | nDCG@10 | R@100 | MRR@10 |", "|---|---|---|---|", *rows])
    print(f"\n{name} ({cfg.model.model_name_or_path}, eval {args.eval_dtype}):\n{table}")
    steps = result["last"].get("step")
    record = (
        f"\n## quality: {name} before/after training ({time.strftime('%Y-%m-%d')})\n"
        f"machine: {platform.machine()}, {os.cpu_count()} CPU cores, no GPU; "
        f"command: `python benchmarks/quality.py {' '.join(sys.argv[1:])}`\n"
        f"training: {cfg.data.train_data}, {steps} steps x batch "
        f"{cfg.train.per_device_train_batch_size}, {train_s / 60:.1f} min; "
        f"eval {base_s / 60:.1f} + {tuned_s / 60:.1f} min\n\n{table}\n"
    )
    with open(args.results, "a") as handle:
        handle.write(record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
