"""Training-step throughput: token-budget GradCache chunks against fixed padded chunks.

One run times full LoRA training steps (r=16 on all linear layers; GradCache forward without a
graph, loss, replay with backward; gradient clipping; AdamW) on the SAME batch with the same
model. Only the chunking differs:

1. **baseline**: fixed chunks of ``--chunk`` rows, every sequence padded to its full length
   (query 64, document 256 tokens): the seed repository's step, re-implemented here, and the
   setting of REFERENCES.md (H100, Mistral-7B, batch 256, chunk 32, checkpointing: 17.7 s/step);
2. **fixed, trimmed**: the training loop's step (``training.step.train_step``) with
   ``chunk_size=chunk``: the same chunks in batch order, each trimmed to its longest sequence
   (this repository before token budgets);
3. **ours**: ``train_step(chunk_tokens=T)``: queries and documents each sorted by length and cut
   into chunks of at most ``T`` tokens, for each ``checkpointing:T[:packed]`` in ``--ours``
   (``packed``: padding-free chunks, T real tokens). ``T = chunk x 256`` bounds activation memory
   like the baseline's chunks.

A batch is ``--batch`` queries of 64 tokens and ``--batch x (1 + --negatives)`` documents with
BEIR-like lengths (lognormal, median 150, clipped to 16..256), random token ids. Printed per
variant: seconds per step, real (non-padding) tokens/s, model-FLOPs utilisation ``tokens/s x 6 x
non-embedding params / matmul peak`` (forward without graph + forward + backward,
recomputation not counted: the convention behind REFERENCES.md's 25%), peak memory (GPU:
allocated; CPU: process RSS) and the ratio to the baseline. A block is appended to
``benchmarks/results.md``.

    # CPU (2 cores, ~4 min): the real Gemma-3-270M from the local cache
    python benchmarks/train_throughput.py --model embedded:gemma-3-270m
    # ... plus where the time goes (torch.profiler, top ops by self CPU time)
    python benchmarks/train_throughput.py --model embedded:gemma-3-270m --profile
    # GPU (H100, ~4 min): Mistral-7B shape, batch 256, then the largest batch that runs
    python benchmarks/train_throughput.py --model-shape mistral-7b --batch 256 --chunk 32 \\
        --ours on:8192,on:32768,off:4096 --find-max-batch --time-budget-s 90

Single process (one device): a training step's throughput per GPU does not depend on how many
GPUs share the batch, apart from the all-gathers of embeddings, which are tiny.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from encode_throughput import (  # noqa: E402
    REPO,
    RESULTS,
    PeakMemory,
    append_results,
    autocast,
    build_embedder,
    doc_lengths,
    machine,
    matmul_peak,
    non_embedding_params,
    random_ids,
    sync,
)

from conretriever.model.embedder import set_activation_checkpointing  # noqa: E402
from conretriever.model.settings import LoraSettings  # noqa: E402
from conretriever.training.grad_cache import RandState  # noqa: E402
from conretriever.training.loss import contrastive_loss  # noqa: E402
from conretriever.training.step import train_step  # noqa: E402

QUERY_TOKENS, DOC_TOKENS = 64, 256  # the E5-Mistral training lengths behind REFERENCES.md
TEMPERATURE = 0.02  # e5-mistral's tau; any value costs the same


def make_batch(lengths: list[int], width: int, vocab: int, seed: int) -> dict[str, torch.Tensor]:
    """Right-padded [n, width] ids + mask, as ``collate`` builds them."""
    seqs = random_ids(lengths, vocab, seed)
    ids = torch.zeros((len(seqs), width), dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, seq in enumerate(seqs):
        ids[row, : len(seq)] = torch.tensor(seq)
        mask[row, : len(seq)] = 1
    return {"input_ids": ids, "attention_mask": mask}


def make_inputs(batch: int, negatives: int, vocab: int, seed: int = 0):
    queries = make_batch([QUERY_TOKENS] * batch, QUERY_TOKENS, vocab, seed)
    docs_n = batch * (1 + negatives)
    docs = make_batch(doc_lengths(docs_n, 16, DOC_TOKENS, seed), DOC_TOKENS, vocab, seed + 7)
    return queries, docs


def baseline_step(model, queries, docs, loss_fn, chunk: int, device, amp) -> None:
    """GradCache as the seed repository runs it: fixed chunks, full-length padding, no trimming
    (same RNG replay as ours, so the two differ only in the chunk shapes)."""
    chunks = [
        {k: v[s : s + chunk] for k, v in part.items()}
        for part in (queries, docs)
        for s in range(0, part["input_ids"].shape[0], chunk)
    ]
    n_q = -(-queries["input_ids"].shape[0] // chunk)
    states, embs = [], []
    with torch.no_grad():
        for c in chunks:
            states.append(RandState(device))
            with amp():
                embs.append(model(c["input_ids"].to(device), c["attention_mask"].to(device)))
    q = torch.cat(embs[:n_q]).detach().requires_grad_()
    d = torch.cat(embs[n_q:]).detach().requires_grad_()
    loss_fn(q, d).backward_loss.backward()
    grads = list(q.grad.split(chunk)) + list(d.grad.split(chunk))
    for state, c, g in zip(states, chunks, grads, strict=True):
        state.restore()
        with amp():
            emb = model(c["input_ids"].to(device), c["attention_mask"].to(device))
        torch.dot(emb.flatten(), g.flatten().to(emb.dtype)).backward()


def extrapolate_max_batch(peaks: list[tuple[int, float]], device: torch.device) -> str:
    """Where GradCache's memory runs out, from the peaks measured at a few batch sizes.

    Chunk activations do not grow with the batch; what grows is per row (ids, embeddings and
    their gradients: linear) and the score matrix with its softmax and gradient (queries x
    documents: quadratic). A quadratic through the measured (batch, peak MiB) points, solved for
    95% of the device's memory, estimates the largest batch without running it."""
    import numpy as np

    b = np.array([p[0] for p in peaks], dtype=float)
    mib = np.array([p[1] for p in peaks], dtype=float)
    c2, c1, c0 = np.polyfit(b, mib, 2)
    c2 = max(c2, 0.0)  # noise can bend a near-flat curve downwards
    total = 0.95 * torch.cuda.get_device_properties(device).total_memory / 2**20
    if c2 > 0:
        limit = (-c1 + np.sqrt(c1 * c1 + 4 * c2 * (total - c0))) / (2 * c2)
    else:
        limit = (total - c0) / c1 if c1 > 0 else float("inf")
    return (
        f"- no OOM up to batch {int(b.max())}; peak MiB ~ {c0:,.0f} + {c1:.3f} b + {c2:.2e} b^2 "
        f"fits the measured points, so ~{limit:,.0f} rows would fill 95% of the "
        f"{total / 0.95 / 1024:.0f} GiB (extrapolated, not run)"
    )


def main(argv: list[str] | None = None) -> int:
    cuda = torch.cuda.is_available()
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help="a model spec, e.g. embedded:gemma-3-270m")
    parser.add_argument("--model-shape", default="tiny", help="mistral-7b | gemma-3-270m | tiny")
    parser.add_argument("--batch", type=int, default=256 if cuda else 16, help="queries/step")
    parser.add_argument("--negatives", type=int, default=0, help="hard negatives per query")
    parser.add_argument("--chunk", type=int, default=32 if cuda else 4, help="baseline rows")
    parser.add_argument(
        "--ours",
        default=None,
        help="ours: comma list of checkpointing:chunk_tokens[:packed], e.g. "
        "on:8192,off:4096,on:8192:packed (default on:T,off:T with T = chunk x 256)",
    )
    parser.add_argument("--steps", type=int, default=2 if cuda else 1, help="timed steps")
    parser.add_argument("--warmup", type=int, default=1 if cuda else 0, help="untimed steps")
    parser.add_argument("--find-max-batch", action="store_true", help="GPU: double the batch")
    parser.add_argument("--time-budget-s", type=float, default=90, help="for --find-max-batch")
    parser.add_argument("--profile", action="store_true", help="profile one step of ours")
    parser.add_argument("--results", default=str(RESULTS))
    args = parser.parse_args(argv)
    if args.find_max_batch and not cuda:
        parser.error("--find-max-batch needs a GPU (CPU memory is not the limit there)")

    device = torch.device("cuda" if cuda else "cpu")
    tic = time.perf_counter()
    lora = LoraSettings(r=16, alpha=32, dropout=0.1, target_modules="all-linear")
    embedder = build_embedder(args, device, lora=lora)
    load_s = time.perf_counter() - tic
    embedder.train()
    vocab = embedder.base_model.config.vocab_size
    params = non_embedding_params(embedder)
    peak = matmul_peak(device)
    trainable = [p for p in embedder.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4, fused=cuda)

    def loss_fn(q, d):
        return contrastive_loss(q, d, TEMPERATURE)

    def amp():
        return autocast(device)

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)

    def step(kind: str, queries, docs, chunk_tokens: int = 0, packed: bool = False) -> None:
        if kind == "baseline":
            baseline_step(embedder, queries, docs, loss_fn, args.chunk, device, amp)
            torch.nn.utils.clip_grad_norm_(trainable, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return
        # the training loop's own step (conretriever.training.step.train_step)
        train_step(
            embedder,
            {"query": queries, "doc": docs},
            loss_fn,
            optimizer,
            scheduler,
            params=trainable,
            max_grad_norm=1.0,
            chunk_size=args.chunk if kind == "trimmed" else 0,
            chunk_tokens=chunk_tokens,
            packed=packed,
            device=device,
            autocast=amp,
        )

    def timed(kind, ckpt, queries, docs, tokens, steps, warmup, packed=False):
        set_activation_checkpointing(embedder.base_model, ckpt)
        with PeakMemory(device) as mem:
            for _ in range(warmup):
                step(kind, queries, docs, tokens, packed)
            sync(device)
            start = time.perf_counter()
            for _ in range(steps):
                step(kind, queries, docs, tokens, packed)
            sync(device)
            seconds = (time.perf_counter() - start) / steps
        return seconds, mem.mib

    full = args.chunk * DOC_TOKENS
    spec = args.ours or f"on:{full},off:{full}"
    ours = [
        (p[0] == "on", int(p[1]), len(p) > 2 and p[2] == "packed")
        for p in (item.split(":") for item in spec.split(",") if item)
    ]
    variants = [
        (f"baseline: fixed {args.chunk} rows, full-length padding, ckpt on", "baseline", True, 0,
         False),
        (f"fixed {args.chunk} rows, trimmed per chunk, ckpt on", "trimmed", True, 0, False),
    ] + [
        (f"ours: {'packed' if p else 'sorted'}, <= {t} tokens/chunk, ckpt {'on' if c else 'off'}",
         "ours", c, t, p)
        for c, t, p in ours
    ]  # fmt: skip

    queries, docs = make_inputs(args.batch, args.negatives, vocab)
    real = int(queries["attention_mask"].sum() + docs["attention_mask"].sum())
    if not cuda:  # untimed: first-call costs (oneDNN primitives, allocator) on a tiny batch
        small_q, small_d = make_inputs(2, 0, vocab, seed=3)
        step("ours", small_q, small_d, 512)
    rows = []
    for name, kind, ckpt, tokens, packed in variants:
        try:
            seconds, mib = timed(kind, ckpt, queries, docs, tokens, args.steps, args.warmup, packed)
        except torch.OutOfMemoryError:
            rows.append((name, None, None, None))
            print(f"{name:55s} OOM", flush=True)
            optimizer.zero_grad(set_to_none=True)
            gc.collect()
            torch.cuda.empty_cache()
            continue
        rows.append((name, seconds, real / seconds, mib))
        print(f"{name:55s} {seconds:8.2f} s/step {real / seconds:9.1f} real tok/s", flush=True)

    ran = [r for r in rows[2:] if r[1] is not None]
    best = max(ran, key=lambda r: r[2]) if ran else None
    best_cfg = ours[[r[0] for r in rows[2:]].index(best[0])] if best else None

    profile_text = ""
    if args.profile and best_cfg:
        from torch.profiler import ProfilerActivity, profile

        set_activation_checkpointing(embedder.base_model, best_cfg[0])
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        with profile(activities=acts) as prof:
            step("ours", queries, docs, best_cfg[1], best_cfg[2])
        sort = "self_cuda_time_total" if cuda else "self_cpu_time_total"
        profile_text = prof.key_averages().table(
            sort_by=sort, row_limit=15, max_name_column_width=40
        )
        print(profile_text)

    max_batch_lines = []
    if args.find_max_batch and best_cfg:
        set_activation_checkpointing(embedder.base_model, best_cfg[0])
        batch, started = args.batch, time.perf_counter()
        last_s = best[1]
        peaks = [(args.batch, best[3])]  # (batch, peak MiB) for the extrapolation below
        oom = False
        while True:
            left = args.time_budget_s - (time.perf_counter() - started)
            if 2 * last_s > left:  # the next (doubled) step would not fit the time budget
                max_batch_lines.append(f"- stopped at the time budget ({args.time_budget_s} s)")
                break
            batch *= 2
            q2, d2 = make_inputs(batch, args.negatives, vocab, seed=batch)
            tok2 = int(q2["attention_mask"].sum() + d2["attention_mask"].sum())
            try:
                last_s, mib = timed("ours", best_cfg[0], q2, d2, best_cfg[1], 1, 0)
            except torch.OutOfMemoryError:
                max_batch_lines.append(f"- batch {batch}: OOM")
                oom = True
                break
            peaks.append((batch, mib))
            max_batch_lines.append(
                f"- batch {batch}: {last_s:.2f} s/step, {tok2 / last_s:,.0f} real tok/s, "
                f"peak {mib:,.0f} MiB"
            )
            print(max_batch_lines[-1], flush=True)
            del q2, d2
        if not oom and len(peaks) >= 3:
            max_batch_lines.append(extrapolate_max_batch(peaks, device))

    cmd = "python " + " ".join([os.path.relpath(__file__, REPO), *(argv or sys.argv[1:])])
    base_tps = rows[0][2]
    lines = [
        f"## train_throughput ({time.strftime('%Y-%m-%d %H:%M')})",
        f"- machine: {machine(device)}",
        f"- command: `{cmd}`",
        f"- model: {args.model or f'random-init {args.model_shape} shape'}, "
        f"{params / 1e6:.1f}M non-embedding params, {next(embedder.parameters()).dtype}, "
        f"LoRA r=16 all-linear ({sum(p.numel() for p in trainable) / 1e6:.2f}M trainable); "
        f"loaded in {load_s:.1f} s",
        f"- batch: {args.batch} queries x {QUERY_TOKENS} tokens + "
        f"{args.batch * (1 + args.negatives)} documents (median {150}, <= {DOC_TOKENS} "
        f"tokens): {real} real tokens/step; {args.steps} timed steps after {args.warmup} warm-up",
        f"- MFU = real tok/s x 6 x params / matmul peak ({peak / 1e12:.2f} TFLOP/s)",
        "",
        "| variant | s/step | real tok/s | MFU | peak MiB | vs baseline |",
        "|---|---|---|---|---|---|",
    ]
    for name, seconds, tps, mib in rows:
        if seconds is None:
            lines.append(f"| {name} | OOM | | | | |")
            continue
        ratio = f"{tps / base_tps:.2f}x" if base_tps else "n/a"
        mfu = 100 * tps * 6 * params / peak
        lines.append(f"| {name} | {seconds:.2f} | {tps:,.0f} | {mfu:.1f}% | {mib:,.0f} | {ratio} |")
    if best and base_tps:
        lines += ["", f"Best of ours ({best[0]}): {best[2] / base_tps:.2f}x the baseline."]
    if max_batch_lines:
        lines += ["", f"Largest batch (ours, ckpt {best_cfg[0]}, {best_cfg[1]} tokens/chunk):"]
        lines += max_batch_lines
    if profile_text:
        lines += ["", "Profile of one step of the best 'ours' variant:", "```", profile_text, "```"]
    text = "\n".join(lines)
    print("\n" + text)
    append_results(text, Path(args.results))
    with contextlib.suppress(Exception):
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
