"""Gradient cache: a contrastive step over a large batch in bounded memory.

A contrastive loss couples every query with every document of the batch, so the batch cannot be
split into independent micro-batches the usual way. GradCache (Gao et al. 2021) splits the
computation instead, in three steps:

1. **Embed without a graph.** Run the model over the batch in chunks of ``chunk_size`` sequences
   under ``torch.no_grad()`` and keep only the embeddings: memory is one chunk's activations.
2. **Loss and its gradient w.r.t. the embeddings.** Treat the (small) embedding matrices as leaf
   tensors, compute the full-batch loss (including cross-device negatives), and backpropagate to
   get ``dL/de`` for every embedding ``e``. No model weights are involved yet.
3. **Replay chunk by chunk.** Re-run each chunk WITH a graph and backpropagate the cached
   ``dL/de`` through it (``backward`` of ``sum(e * dL/de)``). By the chain rule the accumulated
   parameter gradients equal those of one full-batch backward.

The replay must reproduce step 1 exactly, so each chunk's RNG state (CPU and CUDA: dropout,
including LoRA dropout) is saved before its first forward and restored before its replay. Under
FSDP2 the gradient reduce-scatter is disabled for all replays but the last, so gradients are
synchronised once per step, not once per chunk. Each chunk is trimmed to its own longest
sequence (right padding), which saves compute when lengths vary.

Two ways to cut the batch into chunks:

* ``chunk_size`` rows per chunk, in the given order (the classic GradCache). A chunk's cost is
  rows x its LONGEST sequence, and with documents in random order that is nearly always the
  length limit, so most of a chunk of short documents is padding.
* ``chunk_tokens`` (a budget of padded tokens = rows x longest length): queries and documents
  are each sorted by length, longest first, and a chunk takes rows while ``rows x longest``
  stays within the budget (and ``chunk_size`` rows, if also given). Chunks are then
  length-homogeneous (little padding) and hold many short or few long rows, so activation
  memory stays about ``chunk_tokens`` tokens' worth whatever the lengths. The embeddings are
  put back in batch order before the loss, so the gradients are the same as with any other
  chunking (up to float rounding; the RNG replay still pairs each chunk with its own dropout).
  Under FSDP every rank must run the same number of chunks (each forward all-gathers weights),
  so a rank with fewer chunks halves its biggest ones until the counts match.

``chunk_size=0`` and ``chunk_tokens=0`` run the plain step (one forward and backward over the
whole batch), which is the reference the tests compare against.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
from torch import nn

from conretriever.distributed import set_gradient_sync, world_size
from conretriever.loss import LossOutput
from conretriever.modeling import _token_budget_batches

Batch = dict[str, torch.Tensor]  # input_ids, attention_mask (right padded)


class RandState:
    """The RNG state of the CPU and the current CUDA device, captured and restorable."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state(self.cuda, self.device)


def split_chunks(batch: Batch, chunk_size: int) -> list[Batch]:
    """Chunks of rows, each trimmed to its longest sequence (inputs must be right padded)."""
    n = batch["input_ids"].shape[0]
    size = chunk_size if chunk_size > 0 else n
    chunks = []
    for start in range(0, n, size):
        mask = batch["attention_mask"][start : start + size]
        length = int(mask.sum(dim=1).max())
        chunks.append(
            {
                "input_ids": batch["input_ids"][start : start + size, :length],
                "attention_mask": mask[:, :length],
            }
        )
    return chunks


def split_chunks_by_tokens(
    batch: Batch, chunk_tokens: int, max_rows: int = 0
) -> tuple[list[Batch], torch.Tensor]:
    """Length-sorted chunks of at most ``chunk_tokens`` padded tokens (rows x longest length)
    and at most ``max_rows`` rows (0: no limit), each trimmed to its longest sequence.

    Returns the chunks and ``order``, the [n] int64 row indices in chunk order: concatenating
    the chunks' rows gives ``batch`` rows ``order`` (right padding required).
    """
    lengths = batch["attention_mask"].sum(dim=1).tolist()
    n = len(lengths)
    groups = _token_budget_batches(lengths, max_rows if max_rows > 0 else n, chunk_tokens)
    chunks = []
    for rows in groups:
        index = torch.tensor(rows, dtype=torch.long, device=batch["input_ids"].device)
        length = max(lengths[i] for i in rows)
        chunks.append(
            {
                "input_ids": batch["input_ids"][index, :length],
                "attention_mask": batch["attention_mask"][index, :length],
            }
        )
    return chunks, torch.tensor([i for rows in groups for i in rows], dtype=torch.long)


def _trim(chunk: Batch) -> Batch:
    length = int(chunk["attention_mask"].sum(dim=1).max())
    return {k: v[:, :length] for k, v in chunk.items()}


def split_to_count(chunks: list[Batch], count: int) -> list[Batch]:
    """Halve the chunk with the most rows until there are ``count`` chunks; rows keep their
    order (so the ``order`` of :func:`split_chunks_by_tokens` stays valid) and each new chunk is
    trimmed to its own longest sequence."""
    chunks = list(chunks)
    while len(chunks) < count:
        i = max(range(len(chunks)), key=lambda j: chunks[j]["input_ids"].shape[0])
        rows = chunks[i]["input_ids"].shape[0]
        if rows < 2:
            raise ValueError(f"cannot cut {len(chunks)} one-row chunks into {count}")
        half = rows // 2
        chunks[i : i + 1] = [
            _trim({k: v[:half] for k, v in chunks[i].items()}),
            _trim({k: v[half:] for k, v in chunks[i].items()}),
        ]
    return chunks


def _same_count_on_every_rank(
    q_chunks: list[Batch], d_chunks: list[Batch], device: torch.device
) -> tuple[list[Batch], list[Batch]]:
    """Token-budget chunk counts depend on each rank's lengths, but under FSDP every forward and
    backward all-gathers weights, so every rank must run as many as the others or the step
    hangs. Ranks hold equal row counts, so splitting chunks always gets there."""
    if world_size() == 1:
        return q_chunks, d_chunks
    counts = torch.tensor([len(q_chunks), len(d_chunks)], device=device)
    torch.distributed.all_reduce(counts, op=torch.distributed.ReduceOp.MAX)
    return split_to_count(q_chunks, int(counts[0])), split_to_count(d_chunks, int(counts[1]))


def _plan(batch: Batch, chunk_size: int, chunk_tokens: int) -> tuple[list[Batch], torch.Tensor]:
    if chunk_tokens > 0:
        return split_chunks_by_tokens(batch, chunk_tokens, chunk_size)
    return split_chunks(batch, chunk_size), torch.arange(batch["input_ids"].shape[0])


def _embed(model: nn.Module, chunk: Batch, device: torch.device, autocast) -> torch.Tensor:
    with autocast():
        return model(chunk["input_ids"].to(device), chunk["attention_mask"].to(device))


def grad_cache_step(
    model: nn.Module,
    queries: Batch,
    docs: Batch,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], LossOutput],
    chunk_size: int,
    device: torch.device,
    autocast: Callable = contextlib.nullcontext,
    chunk_tokens: int = 0,
) -> LossOutput:
    """Accumulate into ``.grad`` the gradient of ``loss_fn(model(queries), model(docs))``.

    ``chunk_size``: rows per chunk, or with ``chunk_tokens > 0`` the most rows per chunk (0: no
    limit); ``chunk_tokens``: padded tokens per chunk, rows length-sorted (see module doc); both
    0: the plain step. ``autocast`` is a context factory (e.g. bf16 autocast on GPU). Returns
    the loss output; the caller clips and steps the optimizer.
    """
    if chunk_size <= 0 and chunk_tokens <= 0:  # the plain step
        set_gradient_sync(model, True)
        q = _embed(model, queries, device, autocast)
        d = _embed(model, docs, device, autocast)
        out = loss_fn(q, d)
        out.backward_loss.backward()
        return out

    q_chunks, q_order = _plan(queries, chunk_size, chunk_tokens)
    d_chunks, d_order = _plan(docs, chunk_size, chunk_tokens)
    if chunk_tokens > 0:
        q_chunks, d_chunks = _same_count_on_every_rank(q_chunks, d_chunks, device)
    chunks = [("q", c) for c in q_chunks] + [("d", c) for c in d_chunks]
    # 1. embed every chunk without a graph, remembering the RNG state it started from
    states, embs = [], []
    with torch.no_grad():
        for _, chunk in chunks:
            states.append(RandState(device))
            embs.append(_embed(model, chunk, device, autocast))
    # 2. loss on the detached embeddings; its backward stops at them
    n_q = sum(1 for kind, _ in chunks if kind == "q")
    # The leaves hold rows in chunk order; the loss sees them in batch order (argsort(order) is
    # the inverse permutation), and autograd routes dL/de back to chunk order through the index.
    q_leaf = torch.cat(embs[:n_q]).detach().requires_grad_()
    d_leaf = torch.cat(embs[n_q:]).detach().requires_grad_()
    q_back = torch.argsort(q_order).to(q_leaf.device)
    d_back = torch.argsort(d_order).to(d_leaf.device)
    out = loss_fn(q_leaf[q_back], d_leaf[d_back])
    out.backward_loss.backward()
    grads = list(q_leaf.grad.split([e.shape[0] for e in embs[:n_q]]))
    grads += list(d_leaf.grad.split([e.shape[0] for e in embs[n_q:]]))
    # 3. replay each chunk with a graph and push the cached gradient through it
    after = RandState(device)
    for i, (_, chunk) in enumerate(chunks):
        set_gradient_sync(model, i == len(chunks) - 1)
        states[i].restore()
        emb = _embed(model, chunk, device, autocast)
        torch.dot(emb.flatten(), grads[i].flatten().to(emb.dtype)).backward()
    after.restore()  # leave the RNG where a single pass would have left it
    return LossOutput(
        loss=out.loss.detach(), backward_loss=out.backward_loss.detach(), accuracy=out.accuracy
    )
