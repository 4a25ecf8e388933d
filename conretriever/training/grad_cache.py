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

The last chunk of step 1 is run with its graph and never replayed: no other forward runs between
it and its backward (right after step 2), so memory still holds one chunk's activations at a
time, and a step of ``N`` chunks costs ``2N - 1`` forwards instead of ``2N``.

The replay must reproduce step 1 exactly, so each chunk's RNG state (CPU and CUDA: dropout,
including LoRA dropout) is saved before its first forward and restored before its replay. Under
FSDP2 the gradient reduce-scatter is disabled for all replays but the last, so gradients are
synchronised once per step, not once per chunk. Each chunk is trimmed to its own longest
sequence (right padding), which saves compute when lengths vary.

Two ways to cut the batch into chunks (each a list of batch rows; :func:`plan_rows`):

* ``chunk_size`` rows per chunk, in the given order (the classic GradCache). A chunk's cost is
  rows x its LONGEST sequence, and with documents in random order that is nearly always the
  length limit, so most of a chunk of short documents is padding.
* ``chunk_tokens`` (a token budget): queries and documents are each sorted by length, longest
  first, and a chunk takes rows while its cost stays within the budget (and ``chunk_size`` rows,
  if also given). Chunks are then length-homogeneous and hold many short or few long rows, so
  activation memory stays about ``chunk_tokens`` tokens' worth whatever the lengths. The
  embeddings are put back in batch order before the loss, so the gradients are the same as
  with any other chunking (up to float rounding; the RNG replay still pairs each chunk with its
  own dropout). Under FSDP every rank must run the same number of chunks (each forward
  all-gathers weights), so a rank with fewer chunks halves its biggest ones until counts match.

And two ways to run a chunk through the model:

* **padded** (default): the chunk's rows right padded to its longest one; cost = rows x longest.
* **packed** (``packed=True``, decoders): the chunk's texts concatenated into ONE row with
  positions restarting per text and attention kept inside each text
  (``Embedder.forward_packed``, ``conretriever.model.packing``), so no compute goes to padding and
  the budget counts real tokens. Each text's embedding is the padded one's up to float rounding, so
  the gradients are too (tested in float64). The replay's backward also runs inside the packed
  attention context: activation checkpointing recomputes the attention during backward.

``chunk_size=0`` and ``chunk_tokens=0`` run the plain step (one forward and backward over the
whole batch), which is the reference the tests compare against.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
from torch import nn

from conretriever import runtime
from conretriever.model.batching import token_budget_batches
from conretriever.training.distributed import set_gradient_sync, world_size
from conretriever.training.loss import LossOutput

Batch = dict[str, torch.Tensor]  # input_ids, attention_mask (right padded)


class RandState:
    """torch's RNG states (CPU and current CUDA device) before a chunk's first forward, so its
    second forward draws the same dropout masks (``runtime.rng_state``)."""

    def __init__(self, device: torch.device):
        self.state = runtime.rng_state(torch_only=True)

    def restore(self) -> None:
        runtime.set_rng_state(self.state)


Chunk = dict  # padded: {"input_ids", "attention_mask"} [rows, longest]; packed: {"seqs": ids}


def plan_rows(
    lengths: list[int], chunk_size: int, chunk_tokens: int, packed: bool = False
) -> list[list[int]]:
    """Batch rows grouped into chunks (see the module docstring); every row exactly once.

    ``chunk_tokens > 0``: length-sorted groups within the token budget (padded cost = rows x
    longest, packed cost = the sum of lengths), at most ``chunk_size`` rows each when that is
    > 0. Else groups of ``chunk_size`` consecutive rows (all rows in one group when 0)."""
    n = len(lengths)
    if chunk_tokens > 0:
        return token_budget_batches(
            lengths, chunk_size if chunk_size > 0 else n, chunk_tokens, packed
        )
    size = chunk_size if chunk_size > 0 else max(n, 1)
    return [list(range(start, min(start + size, n))) for start in range(0, n, size)]


def split_to_count(groups: list[list[int]], count: int) -> list[list[int]]:
    """Halve the group with the most rows until there are ``count`` groups; rows keep their
    order, so the concatenation of the groups is unchanged."""
    groups = [list(g) for g in groups]
    while len(groups) < count:
        i = max(range(len(groups)), key=lambda j: len(groups[j]))
        if len(groups[i]) < 2:
            raise ValueError(f"cannot cut {len(groups)} one-row chunks into {count}")
        half = len(groups[i]) // 2
        groups[i : i + 1] = [groups[i][:half], groups[i][half:]]
    return groups


def make_chunk(batch: Batch, rows: list[int], packed: bool) -> Chunk:
    """The rows of a right-padded batch as one chunk: trimmed to the longest row (padded) or
    as unpadded id lists (packed)."""
    index = torch.tensor(rows, dtype=torch.long, device=batch["input_ids"].device)
    ids, mask = batch["input_ids"][index], batch["attention_mask"][index]
    lengths = mask.sum(dim=1).tolist()
    if packed:
        return {"seqs": [ids[i, :n].tolist() for i, n in enumerate(lengths)]}
    longest = max(lengths)
    return {"input_ids": ids[:, :longest], "attention_mask": mask[:, :longest]}


def _same_count_on_every_rank(
    q_groups: list[list[int]], d_groups: list[list[int]], device: torch.device
) -> tuple[list[list[int]], list[list[int]]]:
    """Token-budget chunk counts depend on each rank's lengths, but under FSDP every forward and
    backward all-gathers weights, so every rank must run as many as the others or the step
    hangs. Ranks hold equal row counts, so splitting chunks always gets there."""
    if world_size() == 1:
        return q_groups, d_groups
    q_count, d_count = runtime.most_over_ranks(len(q_groups), len(d_groups))
    return split_to_count(q_groups, q_count), split_to_count(d_groups, d_count)


def _embed(model: nn.Module, chunk: Chunk, device: torch.device, autocast) -> torch.Tensor:
    with autocast():
        if "seqs" in chunk:
            return model(packed_ids=chunk["seqs"])
        return model(chunk["input_ids"].to(device), chunk["attention_mask"].to(device))


def _packed_context(model: nn.Module, packed: bool):
    if not packed:
        return contextlib.nullcontext()
    from conretriever.model.packing import packed_attention

    return packed_attention(model.base_model)


def _push(model: nn.Module, emb: torch.Tensor, grad: torch.Tensor, sync: bool, packed: bool):
    """Backpropagate the cached ``dL/de`` through a chunk's graph (``backward`` of
    ``sum(e * dL/de)``); ``sync``: this backward reduces the gradient across ranks."""
    set_gradient_sync(model, sync)
    with _packed_context(model, packed):
        torch.dot(emb.flatten(), grad.flatten().to(emb.dtype)).backward()


def grad_cache_step(
    model: nn.Module,
    queries: Batch,
    docs: Batch,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], LossOutput],
    chunk_size: int,
    device: torch.device,
    autocast: Callable = contextlib.nullcontext,
    chunk_tokens: int = 0,
    packed: bool = False,
) -> LossOutput:
    """Accumulate into ``.grad`` the gradient of ``loss_fn(model(queries), model(docs))``.

    ``queries``/``docs``: right-padded ``input_ids`` + ``attention_mask``. ``chunk_size``: rows
    per chunk, or with ``chunk_tokens > 0`` the most rows per chunk (0: no limit);
    ``chunk_tokens``: tokens per chunk (padded or, with ``packed``, real), rows length-sorted;
    both 0: the plain step. ``packed``: padding-free chunks (decoders; see the module doc).
    ``autocast`` is a context factory (e.g. bf16 autocast). Returns the loss output; the caller
    clips and steps the optimizer.
    """
    q_lengths = queries["attention_mask"].sum(dim=1).tolist()
    d_lengths = docs["attention_mask"].sum(dim=1).tolist()
    if chunk_size <= 0 and chunk_tokens <= 0:  # the plain step
        set_gradient_sync(model, True)
        with _packed_context(model, packed):
            q = _embed(
                model, make_chunk(queries, list(range(len(q_lengths))), packed), device, autocast
            )
            d = _embed(
                model, make_chunk(docs, list(range(len(d_lengths))), packed), device, autocast
            )
            out = loss_fn(q, d)
            out.backward_loss.backward()
        return LossOutput(out.loss.detach(), out.backward_loss.detach(), out.accuracy, out.stats)

    q_groups = plan_rows(q_lengths, chunk_size, chunk_tokens, packed)
    d_groups = plan_rows(d_lengths, chunk_size, chunk_tokens, packed)
    if chunk_tokens > 0:
        q_groups, d_groups = _same_count_on_every_rank(q_groups, d_groups, device)
    chunks = [make_chunk(queries, g, packed) for g in q_groups]
    chunks += [make_chunk(docs, g, packed) for g in d_groups]
    # 1. embed every chunk without a graph, remembering the RNG state it started from; the last
    # chunk keeps its graph instead (no forward runs between it and its backward, so memory
    # holds one chunk's activations at a time, as in a replay), and is never replayed
    states, embs = [], []
    with torch.no_grad():
        for chunk in chunks[:-1]:
            states.append(RandState(device))
            embs.append(_embed(model, chunk, device, autocast))
    with _packed_context(model, packed):
        kept = _embed(model, chunks[-1], device, autocast)
    embs.append(kept.detach())
    # 2. loss on the detached embeddings; its backward stops at them
    n_q = len(q_groups)
    # The leaves hold rows in chunk order; the loss sees them in batch order (argsort(order) is
    # the inverse permutation), and autograd routes dL/de back to chunk order through the index.
    q_leaf = torch.cat(embs[:n_q]).detach().requires_grad_()
    d_leaf = torch.cat(embs[n_q:]).detach().requires_grad_()
    q_back = torch.argsort(torch.tensor([i for g in q_groups for i in g])).to(q_leaf.device)
    d_back = torch.argsort(torch.tensor([i for g in d_groups for i in g])).to(d_leaf.device)
    out = loss_fn(q_leaf[q_back], d_leaf[d_back])
    out.backward_loss.backward()
    grads = list(q_leaf.grad.split([e.shape[0] for e in embs[:n_q]]))
    grads += list(d_leaf.grad.split([e.shape[0] for e in embs[n_q:]]))
    # 3. the kept chunk's backward, then each other chunk replayed with a graph; the gradient is
    # synchronised across ranks (FSDP) on the last backward only
    _push(model, kept, grads[-1], sync=len(chunks) == 1, packed=packed)
    after = RandState(device)
    for i, chunk in enumerate(chunks[:-1]):
        states[i].restore()
        with _packed_context(model, packed):
            emb = _embed(model, chunk, device, autocast)
        _push(model, emb, grads[i], sync=i == len(chunks) - 2, packed=packed)
    after.restore()  # leave the RNG where a single pass would have left it
    return LossOutput(
        loss=out.loss.detach(),
        backward_loss=out.backward_loss.detach(),
        accuracy=out.accuracy,
        stats=out.stats,
    )
