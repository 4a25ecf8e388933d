"""Encoding throughput: our token-budget ``Embedder.encode`` against two plain baselines.

One run encodes the SAME documents three ways with the same model and the same forward
(``Embedder.forward``: backbone, pooling, normalisation); only the batching differs:

1. **given order**: fixed batches of ``--batch-size`` in corpus order, each padded to its longest
   document (what a plain DataLoader loop does; most of its compute is padding);
2. **length-sorted**: the same fixed batches after sorting by length (little padding);
3. **ours**: ``Embedder._encode_ids``, the batching half of ``Embedder.encode``: length-sorted
   batches of at most ``--max-tokens`` padded tokens (rows x longest length) each, or, packed
   (``--packed``; the default for decoders on a GPU), padding-free rows of at most
   ``--max-tokens`` real tokens with varlen attention (``conretriever.model.packing``).

Documents are BEIR-like: lognormal token lengths, median 150, sigma 0.8 (so ~64% of a
given-order batch of 64 is padding, as measured for REFERENCES.md), clipped to 16..512, with
random token ids. Printed per variant: real (non-padding) tokens/s, the padded fraction of the
compute, the fraction of the physical limit ``matmul peak FLOP/s / (2 x non-embedding params)``
real tokens/s (attention FLOPs are not counted; the peak is REFERENCES.md's 790 TFLOP/s on an
H100/H200, else a matmul measured here: bf16 on a GPU, fp32 on the CPU), peak memory (GPU:
allocated; CPU: process RSS, which includes the weights) and the ratio to each baseline. A block
is appended to ``benchmarks/results.md``.

    # CPU (2 cores, ~5 min): the real Gemma-3-270M from the local cache
    python benchmarks/encode_throughput.py --model embedded:gemma-3-270m
    # GPU (H100, ~2 min): a random-init Mistral-7B-shaped model (no download)
    python benchmarks/encode_throughput.py --model-shape mistral-7b --n-docs 2048
    # several GPUs: each rank encodes a contiguous slice; rank 0 reports the sum of tokens over
    # the slowest rank's time
    torchrun --nproc_per_node=8 benchmarks/encode_throughput.py --model-shape mistral-7b

Only torch, transformers, peft, numpy and ``conretriever.model.embedder`` are imported, so it runs
on the GPU machine (no mteb, datasets or faiss there). ``train_throughput.py`` imports the shared
helpers below (model shapes, lengths, memory meter, machine name, results file).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import threading
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from conretriever.model.embedder import Embedder, EmbedderSettings  # noqa: E402
from conretriever.precision import resolve_dtype, use_mixed_bf16  # noqa: E402

RESULTS = REPO / "benchmarks" / "results.md"
# Median 150 tokens and sigma 0.8 give the length profile behind REFERENCES.md (BEIR corpora:
# 90th percentile ~420 tokens, so a random batch of 64 nearly always holds a 512-token text).
MEDIAN_TOKENS, SIGMA = 150, 0.8


# ----- shared helpers (also used by train_throughput.py) ----------------------------------------
def model_config(shape: str):
    """A transformers config for a named shape; weights are random-initialised from it."""
    from transformers import Gemma3TextConfig, MistralConfig

    if shape == "mistral-7b":  # MistralConfig defaults ARE Mistral-7B: 4096 x 32, 14336, 8 kv
        return MistralConfig()
    if shape == "gemma-3-270m":  # the embedded model's config (hidden 640, 18 layers, 262k vocab)
        return Gemma3TextConfig(
            vocab_size=262144,
            hidden_size=640,
            intermediate_size=2048,
            num_hidden_layers=18,
            num_attention_heads=4,
            num_key_value_heads=1,
            head_dim=256,
            max_position_embeddings=32768,
            sliding_window=512,
        )
    if shape == "tiny-gemma":  # the embedded model's architecture (bidirectional attention) tiny
        return Gemma3TextConfig(
            vocab_size=1000,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=32,
            max_position_embeddings=2048,
            sliding_window=64,
        )
    if shape == "tiny":  # seconds on a CPU: for checking the script, not for numbers
        return MistralConfig(
            vocab_size=1000,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
    raise ValueError(f"unknown --model-shape {shape!r}")


def _id_tokenizer(vocab_size: int):
    """A word-level tokenizer over ids 0..3 (pad, bos, eos, unk) that appends EOS: the Embedder
    needs one for its special ids; the benchmarks feed token ids directly."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", special_tokens=[("<s>", 1), ("</s>", 2)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
    )


def build_embedder(args, device: torch.device, lora=None) -> Embedder:
    """``--model SPEC`` (real weights) or ``--model-shape`` (random init, built on ``device``).
    dtype auto: bf16 weights where bf16 is native (GPU, bf16 CPUs), else fp32."""
    dtype = resolve_dtype("auto", device)
    if args.model:
        return Embedder.from_pretrained(args.model, device=device, dtype=dtype, lora=lora)
    from transformers import AutoModel

    from conretriever.model.embedder import apply_lora

    config = model_config(args.model_shape)
    config.pad_token_id, config.bos_token_id, config.eos_token_id = 0, 1, 2
    config.use_cache = False
    torch.manual_seed(0)
    with device:  # initialise on the GPU directly: a 7B model in seconds, not minutes
        backbone = AutoModel.from_config(config, dtype=dtype, attn_implementation="sdpa")
    if lora is not None:
        backbone = apply_lora(backbone, lora)
    settings = EmbedderSettings.defaults_for(decoder=True)
    embedder = Embedder(backbone, _id_tokenizer(config.vocab_size), settings)
    return embedder.to(device)


def non_embedding_params(embedder: Embedder) -> int:
    """Parameters a token's forward multiplies through (embedding lookups are free)."""
    base = embedder.base_model
    emb = sum(p.numel() for p in base.get_input_embeddings().parameters())
    return sum(p.numel() for p in base.parameters()) - emb


def doc_lengths(n: int, low: int, high: int, seed: int = 0) -> list[int]:
    """BEIR-like token lengths: lognormal (median 150, sigma 0.8) clipped to [low, high]."""
    rng = np.random.default_rng(seed)
    raw = rng.lognormal(np.log(MEDIAN_TOKENS), SIGMA, size=n)
    return np.clip(np.round(raw), low, high).astype(int).tolist()


def random_ids(lengths: list[int], vocab: int, seed: int = 0) -> list[list[int]]:
    """Random token ids (avoiding the special ids 0..3), each sequence ending in EOS (id 2)."""
    rng = np.random.default_rng(seed + 1)
    return [rng.integers(4, vocab, size=n - 1).tolist() + [2] for n in lengths]


def machine(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (torch {torch.__version__})"
    cpu = platform.processor() or "cpu"
    with open("/proc/cpuinfo") as handle:
        for line in handle:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return f"{cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads (CPU)"


# REFERENCES.md's measured bf16 matmul peak of an H100; the H200 has the same compute units.
# Using it (not this run's own measurement) keeps "% of limit" comparable with that table.
H100_BF16_PEAK = 790e12


def matmul_peak(device: torch.device) -> float:
    """Peak matmul FLOP/s: 790e12 on an H100/H200; otherwise measured in the auto dtype,
    8192^3 on a GPU, 1024^3 on the CPU (about a second)."""
    if device.type == "cuda" and any(
        k in torch.cuda.get_device_name(device) for k in ("H100", "H200")
    ):
        return H100_BF16_PEAK
    n = 8192 if device.type == "cuda" else 1024
    dtype = resolve_dtype("auto", device)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    best = 0.0
    for _ in range(5):
        sync(device)
        tic = time.perf_counter()
        for _ in range(3):
            a @ b
        sync(device)
        best = max(best, 3 * 2 * n**3 / (time.perf_counter() - tic))
    return best


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class PeakMemory:
    """Peak memory in MiB inside a ``with`` block: GPU allocated bytes, or on CPU the process
    RSS sampled every 5 ms (so it includes the weights and the allocator's cache)."""

    def __init__(self, device: torch.device):
        self.device, self.mib, self._stop = device, 0.0, threading.Event()

    def _rss(self) -> float:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

    def _watch(self) -> None:
        while not self._stop.wait(0.005):
            self.mib = max(self.mib, self._rss())

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self.mib = self._rss()
            self._thread = threading.Thread(target=self._watch, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            self.mib = torch.cuda.max_memory_allocated(self.device) / 2**20
        else:
            self._stop.set()
            self._thread.join()
            self.mib = max(self.mib, self._rss())


def setup_device() -> tuple[torch.device, int, int]:
    """(device, rank, world): under torchrun, one process group and one GPU per rank."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    cuda = torch.cuda.is_available()
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world > 1:
        torch.distributed.init_process_group("nccl" if cuda else "gloo")
    return device, rank, world


def reduce(value: float, op: str, world: int) -> float:
    """Sum or max of a number over ranks (the identity in one process)."""
    if world == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64)
    if torch.distributed.get_backend() == "nccl":
        t = t.cuda()
    red = torch.distributed.ReduceOp.SUM if op == "sum" else torch.distributed.ReduceOp.MAX
    torch.distributed.all_reduce(t, red)
    return float(t.item())


def append_results(text: str, path: Path = RESULTS) -> None:
    """Append (never rewrite): other benchmarks add their own blocks to the same file."""
    if not path.exists():
        path.write_text("# Benchmark results (appended by the scripts in benchmarks/)\n")
    with open(path, "a") as handle:
        handle.write("\n" + text.rstrip() + "\n")


# ----- the encode baselines ----------------------------------------------------------------------
def _pad(seqs: list[list[int]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.zeros((len(seqs), width), dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, seq in enumerate(seqs):
        ids[row, : len(seq)] = torch.tensor(seq)
        mask[row, : len(seq)] = 1
    return ids.to(device), mask.to(device)


def autocast(device: torch.device):
    """bf16 autocast where bf16 is native (``mixed_precision: auto``), else nothing."""
    if use_mixed_bf16("auto", device):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


@torch.no_grad()
def encode_fixed(embedder: Embedder, ids: list[list[int]], batch: int, sort: bool) -> np.ndarray:
    """The plain loop: fixed batches, each padded to its longest sequence; sorted or not."""
    order = sorted(range(len(ids)), key=lambda i: -len(ids[i])) if sort else range(len(ids))
    order = list(order)
    out = np.zeros((len(ids), embedder.dim), np.float32)
    device = embedder.device
    embedder.eval()
    for start in range(0, len(order), batch):
        idx = order[start : start + batch]
        input_ids, mask = _pad([ids[i] for i in idx], device)
        with autocast(device):
            out[idx] = embedder(input_ids, mask).float().cpu().numpy()
    return out


def profile(embedder: Embedder, config: tuple[bool, int], ids, max_batch: int) -> str:
    """Top operators by self device time (CPU time without a GPU) of one encode call."""
    from torch.profiler import ProfilerActivity, profile

    packed, budget = config
    cuda = embedder.device.type == "cuda"
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=acts) as prof:
        embedder._encode_ids(ids, max_batch, budget, packed=packed)
        sync(embedder.device)
    sort = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=sort, row_limit=15, max_name_column_width=40)


def padded_tokens(lengths: list[int], batches: list[list[int]]) -> int:
    return sum(len(b) * max(lengths[i] for i in b) for b in batches)


def main(argv: list[str] | None = None) -> int:
    from conretriever.model.batching import token_budget_batches

    cuda = torch.cuda.is_available()
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help="a model spec, e.g. embedded:gemma-3-270m")
    parser.add_argument("--model-shape", default="tiny", help="mistral-7b | gemma-3-270m | tiny")
    parser.add_argument("--n-docs", type=int, default=2048 if cuda else 256)
    parser.add_argument("--batch-size", type=int, default=64, help="baselines' fixed batch")
    parser.add_argument(
        "--max-tokens",
        # GPUs want big batches (REFERENCES.md: 8k-32k best); a CPU core is busy at a few hundred
        # tokens, so there small budgets win by padding less (256 docs: 4% at 2k, 23% at 16k).
        default="8192,16384,32768" if cuda else "2048,4096,16384",
        help="ours: padded-token budgets to try, comma separated",
    )
    parser.add_argument("--max-batch", type=int, default=512, help="ours: most rows per batch")
    parser.add_argument(
        "--packed",
        choices=["auto", "on", "off", "both"],
        default="auto",
        help="ours: padding-free packed batches (auto: as Embedder.encode decides, i.e. on for "
        "decoders on a GPU); both: time padded and packed budgets",
    )
    parser.add_argument("--max-length", type=int, default=512, help="longest document, tokens")
    parser.add_argument(
        "--profile", action="store_true", help="profile the best of ours on 256 documents"
    )
    parser.add_argument("--results", default=str(RESULTS))
    args = parser.parse_args(argv)

    device, rank, world = setup_device()
    tic = time.perf_counter()
    embedder = build_embedder(args, device)
    load_s = time.perf_counter() - tic
    vocab = embedder.base_model.config.vocab_size
    all_lengths = doc_lengths(args.n_docs, 16, args.max_length)
    all_ids = random_ids(all_lengths, vocab)
    lo, hi = args.n_docs * rank // world, args.n_docs * (rank + 1) // world
    ids, lengths = all_ids[lo:hi], all_lengths[lo:hi]
    params = non_embedding_params(embedder)
    peak = matmul_peak(device)
    # real tokens/s if every FLOP of every rank were a useful matmul FLOP
    limit = world * peak / (2 * params)

    budgets = [int(x) for x in args.max_tokens.split(",") if x]
    variants = [
        ("given order, fixed batch", lambda: encode_fixed(embedder, ids, args.batch_size, False)),
        ("length-sorted, fixed batch", lambda: encode_fixed(embedder, ids, args.batch_size, True)),
    ]
    modes = {
        "auto": [embedder.packing_default()],
        "on": [True],
        "off": [False],
        "both": [False, True],
    }[args.packed]
    ours = [(packed, budget) for packed in modes for budget in budgets]
    for packed, budget in ours:
        label = f"packed, <= {budget} real" if packed else f"sorted, <= {budget} padded"
        variants.append(
            (
                f"ours: {label} tokens/batch",
                lambda b=budget, p=packed: embedder._encode_ids(ids, args.max_batch, b, packed=p),
            )
        )
    order = list(range(len(ids)))
    fixed = [order[s : s + args.batch_size] for s in range(0, len(ids), args.batch_size)]
    by_len = sorted(order, key=lambda i: -lengths[i])
    pads = [
        padded_tokens(lengths, fixed),
        padded_tokens(
            lengths, [by_len[s : s + args.batch_size] for s in range(0, len(ids), args.batch_size)]
        ),
    ] + [
        sum(lengths)
        if packed
        else padded_tokens(lengths, token_budget_batches(lengths, args.max_batch, b))
        for packed, b in ours
    ]

    # Warm-up (kernel selection, allocator, oneDNN primitives) for every path: a batch's worth on
    # a GPU; on a CPU a few documents suffice, and more would cost as much as a timed variant.
    warm = ids[: min(len(ids), 2 * args.batch_size if cuda else 8)]
    encode_fixed(embedder, warm, args.batch_size, False)
    for packed in modes:
        embedder._encode_ids(warm, args.max_batch, budgets[0] if budgets else None, packed=packed)

    real = reduce(sum(lengths), "sum", world)
    rows, vectors = [], []
    for (name, run), pad in zip(variants, pads, strict=True):
        if world > 1:
            torch.distributed.barrier()
        with PeakMemory(device) as mem:
            sync(device)
            start = time.perf_counter()
            vectors.append(run())
            sync(device)
            seconds = reduce(time.perf_counter() - start, "max", world)
        mib = reduce(mem.mib, "max", world)
        pad_frac = 1 - sum(lengths) / pad
        rows.append((name, seconds, real / seconds, pad_frac, mib))
        if rank == 0:
            print(f"{name:40s} {real / seconds:10.1f} real tok/s  {seconds:7.2f} s", flush=True)
    if rank != 0:
        torch.distributed.destroy_process_group()
        return 0

    diff = max(float(np.abs(v - vectors[0]).max()) for v in vectors[1:])
    lowest_cos = min(float((v * vectors[0]).sum(1).min()) for v in vectors[1:])
    base_given, base_sorted = rows[0][2], rows[1][2]
    best = max(rows[2:], key=lambda r: r[2]) if rows[2:] else rows[1]
    cmd = "python " + " ".join([os.path.relpath(__file__, REPO), *(argv or sys.argv[1:])])
    if world > 1:
        cmd = f"torchrun --nproc_per_node={world} {cmd.removeprefix('python ')}"
    model_name = args.model or f"random-init {args.model_shape} shape"
    lines = [
        f"## encode_throughput ({time.strftime('%Y-%m-%d %H:%M')})",
        f"- machine: {machine(device)}" + (f" x {world} processes" if world > 1 else ""),
        f"- command: `{cmd}`",
        f"- model: {model_name}, {params / 1e6:.1f}M non-embedding params, "
        f"{next(embedder.parameters()).dtype}; loaded in {load_s:.1f} s",
        f"- documents: {args.n_docs}, lognormal lengths median {MEDIAN_TOKENS} sigma {SIGMA}, "
        f"clipped 16..{args.max_length}: {int(real)} real tokens",
        f"- limit: {world} x matmul peak {peak / 1e12:.2f} TFLOP/s / (2 x params) = "
        f"{limit:,.0f} tok/s",
        "",
        "| variant | seconds | real tok/s | % of limit | padding | peak MiB | vs given "
        "| vs sorted |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, seconds, tps, pad_frac, mib in rows:
        lines.append(
            f"| {name} | {seconds:.2f} | {tps:,.0f} | {100 * tps / limit:.1f}% | "
            f"{100 * pad_frac:.0f}% | "
            f"{mib:,.0f} | {tps / base_given:.2f}x | {tps / base_sorted:.2f}x |"
        )
    lines += [
        "",
        f"Best of ours ({best[0]}): {best[2] / base_given:.2f}x the given-order baseline, "
        f"{best[2] / base_sorted:.2f}x the length-sorted baseline. Largest difference between "
        f"the variants' vectors: {diff:.2e} (lowest cosine to the given-order baseline's: "
        f"{lowest_cos:.6f}).",
    ]
    if args.profile and rows[2:]:
        lines += [
            "",
            f"Profile of {best[0]} on 256 documents:",
            "```",
            profile(
                embedder, ours[[r[0] for r in rows[2:]].index(best[0])], ids[:256], args.max_batch
            ),
            "```",
        ]
    text = "\n".join(lines)
    print("\n" + text)
    append_results(text, Path(args.results))
    if world > 1:
        torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
