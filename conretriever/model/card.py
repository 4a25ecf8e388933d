"""The model card: ``README.md`` of a saved model folder, written from the run's own files.

Hugging Face's convention: YAML front matter (``library_name: sentence-transformers``,
``pipeline_tag: sentence-similarity``, ``base_model`` and ``license`` when the base model is
known, tags), then what a user needs: copy-paste usage for ``Embedder`` and for
``SentenceTransformer`` with the query prompt the model was trained with, the training recipe
(from the run's ``config.yaml``), the data (``tasks_resolved.json``: tasks, rows, weights,
instructions), and the evaluation results there are: those logged during training
(``metrics.jsonl``) and those of every ``conretriever eval`` of the folder
(``eval_results.json``, which :func:`record_eval` keeps and the card is rewritten from).
Nothing in the card is typed by hand.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import yaml

from conretriever.model.prompts import query_prefix

CARD = "README.md"
EVAL_FILE = "eval_results.json"
MARK = "conretriever"  # a tag: cards we wrote (and may rewrite) carry it
# Embedded specs -> the hub models they are, for base_model / license
KNOWN_BASES = {
    "embedded:gemma-3-270m": ("google/gemma-3-270m", "gemma"),
    "embedded:minilm": ("sentence-transformers/all-MiniLM-L6-v2", "apache-2.0"),
    "embedded:embeddinggemma-300m": ("google/embeddinggemma-300m", "gemma"),
    "mistralai/Mistral-7B-v0.1": ("mistralai/Mistral-7B-v0.1", "apache-2.0"),
}


def _read(path: Path, kind: str):
    try:
        text = path.read_text()
    except OSError:
        return None
    if kind == "yaml":
        return yaml.safe_load(text)
    if kind == "jsonl":
        rows = []
        for line in text.splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return rows
    return json.loads(text)


def _front_matter(base: str | None, lora: bool) -> dict:
    hub, license_ = KNOWN_BASES.get(base or "", (None, None))
    if hub is None and base and base.count("/") == 1 and not base.startswith((".", "/", "~")):
        hub = base  # looks like a hub id
    front = {"library_name": "sentence-transformers", "pipeline_tag": "sentence-similarity"}
    if hub:
        front["base_model"] = hub
    if license_:
        front["license"] = license_
    front["tags"] = ["sentence-transformers", "sentence-similarity", "feature-extraction",
                     "dense-retrieval", MARK] + (["lora"] if lora else [])  # fmt: skip
    return front


def _usage(folder: Path, settings: dict, instruction: str | None) -> list[str]:
    prefix = query_prefix(instruction, settings.get("prompt_format", "e5"),
                          settings.get("query_prompt"))  # fmt: skip
    shown = json.dumps(prefix)
    inst = json.dumps(instruction) if instruction else "None"
    return [
        "## Usage", "",
        "With ConRetriever (`pip install` this repository):", "",
        "```python", "from conretriever import Embedder", "",
        f'model = Embedder.from_pretrained("{folder}")',
        f'queries = model.encode(["how long to boil an egg"], role="query", instruction={inst})',
        'docs = model.encode(["Soft-boiled eggs need about six minutes."], role="passage")',
        "print(queries @ docs.T)  # cosine similarities (unit vectors)", "```", "",
        "With sentence-transformers (same vectors; queries take the prompt below, documents none):",
        "",
        "```python", "from sentence_transformers import SentenceTransformer", "",
        f'model = SentenceTransformer("{folder}")',
        f'queries = model.encode(["how long to boil an egg"], prompt={shown})',
        'docs = model.encode(["Soft-boiled eggs need about six minutes."])', "```", "",
        "For another task, put its instruction in the prompt the same way "
        f"(`{settings.get('prompt_format', 'e5')}` format).", "",
    ]  # fmt: skip


def _recipe(config: dict, settings: dict) -> list[str]:
    from conretriever.saved_config import upgrade_saved

    config = upgrade_saved(config)
    m, d, t = config.get("model", {}), config.get("data", {}), config.get("train", {})
    objective = config.get("loss", {})
    lora = m.get("lora", {})
    rows = [
        ("base model", f"{m.get('model_name_or_path')}" + (
            f" (its first {m['keep_layers']} transformer layers)" if m.get("keep_layers") else "")),
        ("fine-tuning", f"LoRA r={lora.get('r')}, alpha={lora.get('alpha')}, dropout="
         f"{lora.get('dropout')}, modules={lora.get('target_modules')}" if m.get("use_lora")
         else "full"),
        ("pooling / normalised", f"{settings.get('pooling')} / {settings.get('normalize')}"),
        ("lengths (query / document tokens)",
         f"{settings.get('query_max_length')} / {settings.get('doc_max_length')}" + (
             f" (trained on documents of {m['embedder']['doc_max_length']})"
             if m.get("saved_doc_max_length") and m.get("embedder", {}).get("doc_max_length")
             else "")),
        ("batch per device", t.get("per_device_train_batch_size")),
        ("hard negatives per query", d.get("n_hard_negative")),
        ("steps / epochs", f"{t.get('max_steps')} / {t.get('num_train_epochs')}"),
        ("learning rate, schedule, warmup",
         f"{t.get('learning_rate')}, {t.get('lr_scheduler')}, {t.get('warmup_steps')}"),
        ("temperature (logits = cos / tau)", objective.get("temperature")),
        ("GradCache chunk (rows / tokens)", f"{t.get('chunk_size')} / {t.get('chunk_tokens')}"),
        ("mixed precision", t.get("mixed_precision")),
        ("seed", t.get("seed")),
    ]  # fmt: skip
    return ["## Training", "", "| setting | value |", "|---|---|",
            *[f"| {k} | {v} |" for k, v in rows], ""]  # fmt: skip


def _data(tasks: dict) -> list[str]:
    lines = ["## Data", "", "| task | rows | weight | instruction |", "|---|---|---|---|"]
    for name, info in tasks.items():
        lines.append(f"| {name} | {info.get('rows')} | {info.get('weight')} | "
                     f"{info.get('instruction') or '(per row)'} |")  # fmt: skip
    return [*lines, ""]


def _evaluation(metrics_rows: list[dict], evals: dict, state: dict | None) -> list[str]:
    lines = ["## Evaluation", ""]
    during = [r for r in metrics_rows if any(k.startswith("eval/") for k in r)]
    if during:
        keys = sorted(k for k in during[-1] if k.startswith("eval/") and k.endswith("ndcg_at_10"))
        lines += ["During training (nDCG@10 x100 on the eval folders' subsets):", "",
                  "| step | " + " | ".join(k.split("/")[1] for k in keys) + " |",
                  "|---|" + "---|" * len(keys)]  # fmt: skip
        for r in during:
            lines.append(f"| {r['step']} | " + " | ".join(f"{100 * r[k]:.2f}" for k in keys) + " |")
        if state and state.get("best"):
            b = state["best"]
            lines.append(f"\nBest: step {b['step']}, {b['metric']} {100 * b['score']:.2f}.")
        lines.append("")
    if evals:
        lines += ["`conretriever eval` of this folder (x100):", "",
                  "| task | nDCG@10 | R@100 | MRR@10 | queries | date |",
                  "|---|---|---|---|---|---|"]  # fmt: skip
        for task, r in sorted(evals.items()):
            lines.append(
                f"| {task} | {100 * r['ndcg_at_10']:.2f} | {100 * r['recall_at_100']:.2f} "
                f"| {100 * r['mrr_at_10']:.2f} | {r.get('n_queries')} | {r.get('date')} |"
            )
        lines.append("")
    if not during and not evals:
        lines += ["Not evaluated yet (`conretriever eval --model <this folder> ...` adds it).", ""]
    return lines


def write_card(folder: Path, run_dir: Path | None = None) -> Path:
    """(Re)write ``folder/README.md`` from the folder's and the run's files."""
    folder = Path(folder)
    run_dir = Path(run_dir) if run_dir else None
    settings = _read(folder / "conretriever.json", "json") or {}
    config = (_read(run_dir / "config.yaml", "yaml") if run_dir else None) or {}
    tasks = (_read(run_dir / "tasks_resolved.json", "json") if run_dir else None) or {}
    metrics_rows = (_read(run_dir / "metrics.jsonl", "jsonl") if run_dir else None) or []
    state = _read(run_dir / "trainer_state.json", "json") if run_dir else None
    evals = _read(folder / EVAL_FILE, "json") or {}
    base = config.get("model", {}).get("model_name_or_path")
    instruction = next((t.get("instruction") for t in tasks.values() if t.get("instruction")),
                       settings.get("default_instruction"))  # fmt: skip
    front = _front_matter(base, bool(config.get("model", {}).get("use_lora")))
    name = run_dir.name if run_dir else folder.name
    lines = [
        "---", yaml.safe_dump(front, sort_keys=False).strip(), "---", "",
        f"# {name}", "",
        f"A dense retriever trained with ConRetriever{f' from `{base}`' if base else ''}: "
        f"{settings.get('pooling', '?')} pooling, L2-normalised vectors "
        f"(cosine = dot product); queries carry an instruction, documents do not.", "",
        *_usage(folder, settings, instruction),
        *(_recipe(config, settings) if config else []),
        *(_data(tasks) if tasks else []),
        *_evaluation(metrics_rows, evals, state),
        f"Card written by ConRetriever on {time.strftime('%Y-%m-%d')} from the run's files.", "",
    ]  # fmt: skip
    path = folder / CARD
    path.write_text("\n".join(lines))
    return path


def record_eval(folder: Path, results: list[dict], output_dir: str) -> None:
    """Add ``conretriever eval`` results to a saved model folder and rewrite its card (only for
    folders we wrote: a ``conretriever.json`` and no card, or a card we wrote)."""
    folder = Path(folder)
    card = folder / CARD
    if not (folder / "conretriever.json").exists():
        return
    if card.exists() and MARK not in card.read_text()[:2000]:
        return  # somebody else's card: leave it alone
    evals = _read(folder / EVAL_FILE, "json") or {}
    for r in results:
        m = r["metrics"]
        evals[r["task"]] = {k: m.get(k) for k in ("ndcg_at_10", "recall_at_100", "mrr_at_10",
                                                  "n_queries")}  # fmt: skip
        evals[r["task"]].update(date=time.strftime("%Y-%m-%d"), output_dir=output_dir)
    (folder / EVAL_FILE).write_text(json.dumps(evals, indent=2) + "\n")
    run_dir = folder.parent if (folder.parent / "config.yaml").exists() else None
    write_card(folder, run_dir)
