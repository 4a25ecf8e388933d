"""The packed attention's CPU path, forward and backward: ours against the slicing loop it replaced.

On a CPU (or in fp32) the packed row's attention runs one SDPA call per text
(``model.packing._packed_attention_forward``). Until 2026-12-06 each text's queries, keys and
values were cut from the packed ``[T, H, D]`` tensors by slicing; the backward of every slice
writes its gradient into a zero-filled tensor of the whole row's size, so a batch of n texts
moves n x T x H x D floats per layer and tensor. Ours splits the row once (its backward is one
concatenation). This benchmark times both on the same tensors, interleaved, and checks that
they agree:

    python benchmarks/packed_attention.py   # Gemma-3-270M's attention, the CPU recipe's batch

The default shapes are Gemma-3-270M's attention (4 query heads, 1 key-value head, head size 256)
over 18 layers, and a batch like the CPU recipe's step (``configs/gemma_270m_cpu.yaml``): 16
queries of 16-64 tokens and 16 documents of 128 tokens in one packed row. Printed: the median
seconds of a forward + backward through every layer for each, their ratio, and the largest
difference of outputs and gradients. A block is appended to ``benchmarks/results.md``.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

from encode_throughput import RESULTS, append_results, machine  # noqa: E402

from conretriever.model.packing import _packed_attention_forward  # noqa: E402


def slicing_loop(module, query, key, value, attention_mask, scaling=None, **kwargs):
    """The baseline: the CPU path before 2026-12-06 (per-text slices written into one output)."""
    cu = kwargs["cu_seq_lens_q"]
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))
    if k.shape[1] != q.shape[1]:
        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    out = torch.empty_like(q)
    bounds = cu.tolist()
    for start, end in zip(bounds[:-1], bounds[1:], strict=True):
        qs, ks, vs = (t[start:end].transpose(0, 1) for t in (q, k, v))
        res = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scaling)
        out[start:end] = res.transpose(0, 1)
    return out.unsqueeze(0), None


class _Layer(torch.nn.Module):
    is_causal = True


def _inputs(lengths: list[int], layers: int, heads: int, kv_heads: int, dim: int, seed: int):
    generator = torch.Generator().manual_seed(seed)
    total = sum(lengths)
    shapes = [(1, heads, total, dim), (1, kv_heads, total, dim), (1, kv_heads, total, dim)]
    return [[torch.randn(s, generator=generator) for s in shapes] for _ in range(layers)]


def _run(fn, inputs, cu: torch.Tensor, max_len: int, scaling: float):
    """Forward + backward through every layer's attention; (seconds, outputs, gradients)."""
    leaves = [[t.clone().requires_grad_() for t in layer] for layer in inputs]
    module = _Layer()
    tic = time.perf_counter()
    outs = [fn(module, *layer, None, scaling=scaling, cu_seq_lens_q=cu, max_length_q=max_len)[0]
            for layer in leaves]  # fmt: skip
    loss = sum((o * o).sum() for o in outs)
    loss.backward()
    seconds = time.perf_counter() - tic
    return seconds, [o.detach() for o in outs], [t.grad for layer in leaves for t in layer]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--queries", type=int, default=16, help="query texts in the row")
    parser.add_argument("--docs", type=int, default=16, help="document texts in the row")
    parser.add_argument("--doc_tokens", type=int, default=128)
    parser.add_argument("--layers", type=int, default=18)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--results", default=None, help="default: benchmarks/results.md")
    args = parser.parse_args()
    rng = random.Random(0)
    lengths = [rng.randint(16, 64) for _ in range(args.queries)] + [args.doc_tokens] * args.docs
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(torch.tensor(lengths, dtype=torch.int32), 0)
    heads, kv_heads, dim = 4, 1, 256  # Gemma-3-270M
    inputs = _inputs(lengths, args.layers, heads, kv_heads, dim, seed=0)
    variants = {"ours": _packed_attention_forward, "slicing loop": slicing_loop}
    times: dict[str, list[float]] = {name: [] for name in variants}
    results = {}
    for fn in variants.values():  # untimed: the first SDPA calls of a process set kernels up
        _run(fn, inputs[:1], cu, max(lengths), dim**-0.5)
    for _ in range(args.repeats):  # interleaved: a slow moment of the machine hits both
        for name, fn in variants.items():
            seconds, outs, grads = _run(fn, inputs, cu, max(lengths), dim**-0.5)
            times[name].append(seconds)
            results[name] = (outs, grads)
    ours_out, ours_grad = results["ours"]
    base_out, base_grad = results["slicing loop"]
    out_diff = max((a - b).abs().max().item() for a, b in zip(ours_out, base_out, strict=True))
    grad_diff = max((a - b).abs().max().item() for a, b in zip(ours_grad, base_grad, strict=True))
    ours, base = (statistics.median(times[n]) for n in variants)
    where = machine(torch.device("cpu"))
    lines = [
        f"## packed attention, CPU path ({time.strftime('%Y-%m-%d')}, {where}, "
        f"capability {torch.backends.cpu.get_cpu_capability()})",
        "",
        f"{len(lengths)} texts ({sum(lengths)} tokens) in one row, {args.layers} layers of "
        f"{heads} query / {kv_heads} key-value heads of {dim}; forward + backward, median of "
        f"{args.repeats}, interleaved (`python benchmarks/packed_attention.py`)",
        "",
        f"packed attention: ours {ours:.3f} s, slicing loop {base:.3f} s, ratio {base / ours:.2f}x",
        f"max abs difference: outputs {out_diff:.2e}, gradients {grad_diff:.2e}",
    ]
    text = "\n".join(lines)
    print(text)
    append_results(text, Path(args.results) if args.results else RESULTS)
    return 0


if __name__ == "__main__":
    sys.exit(main())
