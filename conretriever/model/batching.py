"""Batching by token budget: which texts go through one forward together.

A forward's cost is about its token count, not its text count, so batches are formed by a
TOKEN budget: texts sorted by length (longest first) and grouped while a batch's cost stays
within ``max_tokens``. A padded batch costs ``rows x its longest text`` (every row is padded to
it); a packed (padding-free) batch costs the sum of its lengths. After sorting, neighbours have
nearly equal lengths, so a padded batch wastes little on padding, and the work per forward stays
about constant: many short texts or a few long ones.

Used by ``Embedder.encode`` (encoding), GradCache's token-budget chunks
(``training.grad_cache``, ``--chunk_tokens``) and the throughput benchmarks.
"""

from __future__ import annotations

import torch


def auto_token_budget(device: torch.device, dtype: torch.dtype = torch.float32) -> int:
    """Tokens per encoding batch when the caller does not say: 16,384 on a GPU (big matmuls keep
    it busy); on a CPU 1,024 in fp32, where big batches are no faster and often slower (their
    activations spill out of the caches), and 4,096 in bf16 or fp16, whose oneDNN matrix
    products pay a fixed cost per call that small batches do not cover (the timings behind both:
    docs/evaluation.md, "Encoding speed on a CPU")."""
    if torch.device(device).type == "cuda":
        return 16384
    return 4096 if dtype in (torch.bfloat16, torch.float16) else 1024


def token_budget_batches(
    lengths: list[int], max_sequences: int, max_tokens: int | None, packed: bool = False
) -> list[list[int]]:
    """Group indices of sequences with ``lengths`` (tokens) into batches, longest first.

    A padded batch is padded to its first (longest) member, so its cost is
    ``len(batch) * lengths[0]`` tokens; a packed batch (``packed=True``) costs the sum of its
    lengths. A sequence joins the current batch while that cost stays within ``max_tokens`` and
    the batch has fewer than ``max_sequences`` members. A single sequence longer than the budget
    gets a batch of its own. Equal lengths keep their input order (stable sort).
    """
    if max_sequences < 1:
        raise ValueError(f"batch_size must be >= 1, got {max_sequences}")
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    current: list[int] = []
    total = 0  # real tokens in ``current``
    for i in order:
        if current:
            full = len(current) >= max_sequences
            cost = total + lengths[i] if packed else (len(current) + 1) * lengths[current[0]]
            if full or (bool(max_tokens) and cost > max_tokens):
                batches.append(current)
                current, total = [], 0
        current.append(i)
        total += lengths[i]
    if current:
        batches.append(current)
    return batches
