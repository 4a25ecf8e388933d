"""Ours against the tools users would pick instead, on the same work, side by side.

    python benchmarks/peers.py                      # every comparison below, CPU
    python benchmarks/peers.py --only encode --repeats 5
    python benchmarks/peers.py --device cuda        # on a GPU machine (no mteb there: eval skips)

Each comparison runs ours and the peer interleaved (ours, peer, ours, peer, ...), ``--repeats``
times each, and reports the medians as one line,
``peer <name>: ours <X> s, <peer> <Y> s, ratio <Y/X>x``, then one table. Appended to
``benchmarks/results.md`` with the machine.

* ``encode-minilm`` / ``encode-gemma``: ``--passages`` mixed-length SciFact abstracts (the first
  N of ``../shared/data/scifact``; seeded synthetic passages when it is absent) through
  ``Embedder.encode`` and through ``SentenceTransformer.encode`` (its defaults, which sort by
  length), same model folder, same dtype (``--dtype``), same maximum length; the largest absolute
  difference between the two sets of vectors is printed, and the lowest cosine between a text's
  two vectors (each renormalised: the peer normalises in bf16 when the model runs in it).
  Gemma-3-270M goes through our exported folder (which sentence-transformers loads with
  last-token pooling and our EOS rule).
* ``eval``: a whole ``conretriever eval`` (its own process, corpus cache off) against mteb 2.x +
  sentence-transformers (its own process: ``mteb.evaluate`` of the ``SentenceTransformer`` on the
  same local BEIR folder, through ``local_mteb_task``), all-MiniLM-L6-v2 on SciFact, both in
  ``--dtype``; both nDCG@10 are printed.
* ``first-load``: the embedded Gemma GGUF's first load (the one-off dequantisation into the
  cache, in its own process with an empty cache folder) against a load of the cached copy; the
  same first load through transformers' own GGUF conversion is timed too (the baseline our
  conversion replaces: ``model/gguf_checkpoint.py``).

* ``train-step``: one GradCache step (LoRA r16 on every linear layer, 16 queries, one hard
  negative each, InfoNCE at tau 0.05 = scale 20, fp32, mini-batches of ``--step_tokens`` tokens)
  against sentence-transformers' ``CachedMultipleNegativesRankingLoss`` with its token
  mini-batching (``mini_batch_num_tokens``), same exported Gemma-3-270M folder, same LoRA, same
  16 rows of ``training_data/demo`` (queries carry our e5 prompt as text, so both tokenize the
  same strings). Each side runs in its own process: a warm-up step, then the timed step
  (forward, backward, optimizer); the first-step losses are printed and must agree to 1e-4
  (LoRA's B starts at zero, so step 1 is the same maths on the same weights).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCIFACT = REPO.parent / "shared" / "data" / "scifact"
COMPARISONS = ("train-step", "encode-minilm", "encode-gemma", "eval", "first-load")
STEP_ROWS = 16  # queries a training step (each with its positive and one hard negative)


def passages(n: int) -> list[str]:
    """``n`` mixed-length passages: SciFact abstracts (title + text), else seeded word salad."""
    corpus = SCIFACT / "corpus.jsonl"
    if corpus.exists():
        out = []
        with open(corpus, encoding="utf-8") as handle:
            for line in handle:
                row = json.loads(line)
                out.append(f"{row.get('title', '')} {row['text']}".strip())
                if len(out) == n:
                    break
        return out
    rng = random.Random(0)
    words = "retrieval dense vector model query passage claim evidence protein cell".split()
    return [" ".join(rng.choice(words) for _ in range(rng.randint(5, 300))) for _ in range(n)]


def run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    """A subprocess that must succeed; its stderr's tail when it does not."""
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, **kwargs)
    if done.returncode:
        raise SystemExit(f"peers: {' '.join(cmd[:4])}... failed:\n{done.stderr[-3000:]}")
    return done


def interleaved(ours, peer, repeats: int) -> tuple[float, float, object, object]:
    """Median seconds of ``ours()`` and ``peer()``, run alternately; their last results."""
    mine, theirs, a, b = [], [], None, None
    for _ in range(repeats):
        tic = time.perf_counter()
        a = ours()
        mine.append(time.perf_counter() - tic)
        tic = time.perf_counter()
        b = peer()
        theirs.append(time.perf_counter() - tic)
    return statistics.median(mine), statistics.median(theirs), a, b


def line(name: str, peer: str, ours_s: float, peer_s: float, extra: str = "") -> dict:
    ratio = peer_s / ours_s
    print(f"peer {name}: ours {ours_s:.2f} s, {peer} {peer_s:.2f} s, ratio {ratio:.2f}x"
          + (f" ({extra})" if extra else ""), flush=True)  # fmt: skip
    return {"name": name, "peer": peer, "ours_s": ours_s, "peer_s": peer_s, "ratio": ratio,
            "extra": extra}  # fmt: skip


def encode(name: str, spec: str, args, texts: list[str]) -> dict:
    import numpy as np
    import torch
    from sentence_transformers import SentenceTransformer

    from conretriever.model.embedder import Embedder
    from conretriever.model.specs import resolve_model

    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    with tempfile.TemporaryDirectory() as tmp:
        folder = resolve_model(spec)
        if spec == "embedded:gemma-3-270m":  # an exported folder: what sentence-transformers loads
            Embedder.from_pretrained(spec, {"doc_max_length": args.max_length},
                                     dtype="float32").save(Path(tmp) / "gemma")  # fmt: skip
            folder = str(Path(tmp) / "gemma")
        ours = Embedder.from_pretrained(folder, {"doc_max_length": args.max_length}, dtype=dtype,
                                        device=args.device)  # fmt: skip
        st = SentenceTransformer(folder, device=args.device, model_kwargs={"dtype": dtype})
        st.max_seq_length = args.max_length
        ours_s, peer_s, a, b = interleaved(
            lambda: ours.encode(texts, role="passage", show_progress=False),
            lambda: st.encode(
                texts, batch_size=32, normalize_embeddings=True, convert_to_numpy=True
            ),  # fmt: skip
            args.repeats,
        )
    a, b = np.asarray(a, dtype=np.float32), np.asarray(b, dtype=np.float32)
    diff = float(np.abs(a - b).max())
    # The peer normalises in the model's dtype (bf16 lengths 0.998-1.004): compare directions.
    a, b = (x / np.linalg.norm(x, axis=1, keepdims=True) for x in (a, b))
    lowest = float((a * b).sum(axis=1).min())
    extra = (f"{len(texts)} passages, {args.dtype}, max abs difference {diff:.2e}, "
             f"lowest cosine {lowest:.5f}")  # fmt: skip
    return line(name, "sentence-transformers", ours_s, peer_s, extra)


PEER_STEP = """
import json, sys, time, torch
from peft import LoraConfig, get_peft_model
from sentence_transformers import SentenceTransformer
from sentence_transformers.sentence_transformer.losses import CachedMultipleNegativesRankingLoss
folder, data, tokens = sys.argv[1], sys.argv[2], int(sys.argv[3])
rows = [json.loads(x) for x in open(data)]
torch.manual_seed(0)
model = SentenceTransformer(folder, device="cpu")
model.max_seq_length = 512
lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear")
model[0].model = get_peft_model(model[0].model, lora)  # transformers' add_adapter wants peft 0.22
model.train()
loss_fn = CachedMultipleNegativesRankingLoss(model, scale=20.0, mini_batch_num_tokens=tokens)
params = [p for p in model.parameters() if p.requires_grad]
opt = torch.optim.AdamW(params, lr=1e-4)
columns = ([r["formatted_query"] for r in rows], [r["positive"][0] for r in rows],
           [r["negative"][0] for r in rows])
out = []
for _ in range(2):
    tic = time.perf_counter()
    features = [model.tokenize(list(c)) for c in columns]
    loss = loss_fn(features, None)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    opt.zero_grad()
    out.append((loss.item(), time.perf_counter() - tic))
print(json.dumps({"loss": out[0][0], "seconds": out[1][1]}))
"""


def train_step(args) -> dict:
    """Ours vs sentence-transformers' CachedMultipleNegativesRankingLoss (see the docstring)."""
    from conretriever.model.embedder import Embedder

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        gemma = Embedder.from_pretrained("embedded:gemma-3-270m", dtype="float32")
        gemma.save(tmp / "gemma")
        rows = [json.loads(x) for x in (REPO / "training_data/demo/demo.jsonl").open()]
        rows = [r for r in rows if len(r["negative"]) >= 1][:STEP_ROWS]
        instruction = "Given a query, retrieve relevant passages that answer the query"
        formatted = gemma.format([r["query"] for r in rows], "query", instruction)
        (tmp / "data").mkdir()
        with (
            open(tmp / "data" / "demo.jsonl", "w") as ours_file,
            open(tmp / "peer.jsonl", "w") as peer_file,
        ):
            for r, q in zip(rows, formatted, strict=True):
                row = {"query": r["query"], "positive": r["positive"][:1],
                       "negative": r["negative"][:1], "instruction": instruction}  # fmt: skip
                ours_file.write(json.dumps(row) + "\n")
                peer_file.write(json.dumps({**row, "formatted_query": q}) + "\n")
        del gemma
        losses = {}

        def ours():
            run_dir = tmp / f"run{len(mine)}"
            cmd = [sys.executable, "-m", "conretriever", "train", "--model_name_or_path",
                   str(tmp / "gemma"), "--train_data", str(tmp / "data"), "--output", str(run_dir),
                   "--per_device_train_batch_size", str(STEP_ROWS), "--n_hard_negative", "1",
                   "--chunk_size", "0", "--chunk_tokens", str(args.step_tokens),
                   "--temperature", "0.05", "--mixed_precision", "no", "--max_steps", "2",
                   "--learning_rate", "1e-4", "--lora_r", "16", "--lora_alpha", "32",
                   "--lora_dropout", "0", "--query_max_length", "512", "--doc_max_length", "512",
                   "--report_to", "none", "--save_steps", "0", "--logging_steps", "1",
                   *shlex.split(args.ours_flags)]  # fmt: skip
            run(cmd)
            steps = [json.loads(x) for x in (run_dir / "metrics.jsonl").open() if '"step"' in x]
            losses.setdefault("ours", steps[0]["loss"])
            return steps[1]["step_s"]

        def peer():
            cmd = [sys.executable, "-c", PEER_STEP, str(tmp / "gemma"),
                   str(tmp / "peer.jsonl"), str(args.step_tokens)]  # fmt: skip
            done = run(cmd)
            result = json.loads(done.stdout.strip().splitlines()[-1])
            losses.setdefault("peer", result["loss"])
            return result["seconds"]

        mine, theirs = [], []
        for _ in range(args.repeats):  # the step times come from inside each process
            mine.append(ours())
            theirs.append(peer())
    ours_s, peer_s = statistics.median(mine), statistics.median(theirs)
    diff = abs(losses["ours"] - losses["peer"])
    extra = (f"first-step loss ours {losses['ours']:.6f}, sentence-transformers "
             f"{losses['peer']:.6f} (|diff| {diff:.1e})")  # fmt: skip
    if args.ours_flags:
        extra += f"; ours with {args.ours_flags}"
    return line("train-step", "sentence-transformers CMNRL", ours_s, peer_s, extra)


PEER_EVAL = """
import json, sys, mteb
from sentence_transformers import SentenceTransformer
from conretriever.data.beir import load_beir_dir
from conretriever.evaluation.mteb_bridge import local_mteb_task
from conretriever.model.specs import resolve_model
import torch
model = SentenceTransformer(resolve_model("embedded:minilm"), device=sys.argv[2],
                            model_kwargs={"dtype": getattr(torch, sys.argv[3])})
out = mteb.evaluate(model, [local_mteb_task(load_beir_dir(sys.argv[1]))], cache=None,
                    show_progress_bar=False)
result = out.task_results[0]
print(json.dumps(result.scores[next(iter(result.scores))][0]["ndcg_at_10"]))
"""


def evaluate(args) -> dict | None:
    if not SCIFACT.is_dir():
        print(f"peer eval: skipped ({SCIFACT} is absent)")
        return None
    try:
        import mteb  # noqa: F401
    except ImportError:
        print("peer eval: skipped (mteb is not installed)")
        return None
    scores = {}

    def ours():
        with tempfile.TemporaryDirectory() as tmp:
            cmd = [sys.executable, "-m", "conretriever", "eval", "--model", "embedded:minilm",
                   "--beir_dir", str(SCIFACT), "--output", tmp, "--cache", "false",
                   "--dtype", args.dtype, "--no_progress"]  # fmt: skip
            run(cmd)
            found = next(p for p in Path(tmp).glob("*.json") if p.name != "settings.json")
            result = json.loads(found.read_text())
            scores["ours"] = result["metrics"]["ndcg_at_10"]

    def peer():
        cmd = [sys.executable, "-c", PEER_EVAL, str(SCIFACT), args.device, args.dtype]
        done = run(cmd)
        scores["peer"] = json.loads(done.stdout.strip().splitlines()[-1])

    ours_s, peer_s, _, _ = interleaved(ours, peer, args.repeats)
    extra = (f"SciFact, all-MiniLM-L6-v2, {args.dtype}, nDCG@10 ours "
             f"{100 * scores['ours']:.2f}, mteb {100 * scores['peer']:.2f}")  # fmt: skip
    return line("eval", "mteb + sentence-transformers", ours_s, peer_s, extra)


FIRST_LOAD = """
import sys, time
tic = time.perf_counter()
if sys.argv[1:] == ["transformers"]:  # the baseline: transformers' own GGUF conversion
    import conretriever.model.gguf_checkpoint as fast
    fast.FAST_ARCHITECTURES = ()
from conretriever.model.embedder import Embedder
Embedder.from_pretrained("embedded:gemma-3-270m", dtype="float32")
print(time.perf_counter() - tic)
"""


def first_load(args) -> dict:
    """Peer here is our own cached load: the figure is how much the one-off build costs."""

    def timed(cache: str, *how: str) -> float:
        env = {**os.environ, "CONRETRIEVER_CACHE": cache}
        done = run([sys.executable, "-c", FIRST_LOAD, *how], env=env)
        return float(done.stdout.strip().splitlines()[-1])

    firsts, cached, baseline = [], [], []
    for _ in range(args.repeats):
        with tempfile.TemporaryDirectory() as tmp:
            firsts.append(timed(tmp))
            cached.append(timed(tmp))
        with tempfile.TemporaryDirectory() as tmp:
            baseline.append(timed(tmp, "transformers"))
    first_s, cached_s = statistics.median(firsts), statistics.median(cached)
    hf_s = statistics.median(baseline)
    print(f"peer first-load: first load {first_s:.2f} s, cached load {cached_s:.2f} s, "
          f"first load by transformers' own GGUF conversion {hf_s:.2f} s "
          f"(goal: first load <= 15 s)", flush=True)  # fmt: skip
    return {
        "name": "first-load",
        "peer": "cached load",
        "ours_s": first_s,
        "peer_s": cached_s,
        "ratio": cached_s / first_s,
        "extra": f"GGUF dequantised into an empty cache; by transformers' own conversion "
        f"{hf_s:.2f} s",
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", action="append", choices=COMPARISONS, default=[])
    parser.add_argument("--repeats", type=int, default=3, help="runs of each side (median)")
    parser.add_argument("--passages", type=int, default=2000, help="passages for encode-minilm")
    parser.add_argument("--gemma_passages", type=int, default=2000, help="for encode-gemma")
    parser.add_argument("--step_tokens", type=int, default=2048, help="train-step mini-batch")
    parser.add_argument("--max_length", type=int, default=256, help="tokens a passage, both")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--ours_flags",
        default="",
        help="train-step: flags added to our `conretriever train` (e.g. '--packed false')",
    )
    parser.add_argument("--results", default=str(REPO / "benchmarks" / "results.md"))
    args = parser.parse_args()
    import torch

    chosen = args.only or list(COMPARISONS)
    rows = []
    if "train-step" in chosen:
        rows.append(train_step(args))
    if "encode-minilm" in chosen:
        rows.append(encode("encode-minilm", "embedded:minilm", args, passages(args.passages)))
    if "encode-gemma" in chosen:
        rows.append(encode("encode-gemma", "embedded:gemma-3-270m", args,
                           passages(args.gemma_passages)))  # fmt: skip
    if "eval" in chosen and (row := evaluate(args)):
        rows.append(row)
    if "first-load" in chosen:
        rows.append(first_load(args))
    cpu = torch.backends.cpu.get_cpu_capability() if args.device == "cpu" else args.device
    text = [
        f"\n## peers: ours vs the tools users would pick instead ({time.strftime('%Y-%m-%d')})",
        f"machine: {platform.machine()}, {os.cpu_count()} CPU cores ({cpu}), device "
        f"{args.device}; command: `python benchmarks/peers.py {' '.join(sys.argv[1:])}`; "
        f"median of {args.repeats} interleaved runs each",
        "",
        "| comparison | ours s | peer | peer s | ratio (peer / ours) | notes |",
        "|---|---|---|---|---|---|",
        *(f"| {r['name']} | {r['ours_s']:.2f} | {r['peer']} | {r['peer_s']:.2f} | "
          f"{r['ratio']:.2f}x | {r['extra']} |" for r in rows),
    ]  # fmt: skip
    print("\n".join(text))
    with open(args.results, "a") as handle:
        handle.write("\n".join(text) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
