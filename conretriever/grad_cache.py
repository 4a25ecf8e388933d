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

``chunk_size=0`` runs the plain step (one forward and backward over the whole batch), which is
the reference the tests compare against.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
from torch import nn

from conretriever.distributed import set_gradient_sync
from conretriever.loss import LossOutput

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
) -> LossOutput:
    """Accumulate into ``.grad`` the gradient of ``loss_fn(model(queries), model(docs))``.

    ``autocast`` is a context factory (e.g. bf16 autocast on GPU). Returns the loss output; the
    caller clips and steps the optimizer.
    """
    if chunk_size <= 0:  # the plain step
        set_gradient_sync(model, True)
        q = _embed(model, queries, device, autocast)
        d = _embed(model, docs, device, autocast)
        out = loss_fn(q, d)
        out.backward_loss.backward()
        return out

    chunks = [("q", c) for c in split_chunks(queries, chunk_size)]
    chunks += [("d", c) for c in split_chunks(docs, chunk_size)]
    # 1. embed every chunk without a graph, remembering the RNG state it started from
    states, embs = [], []
    with torch.no_grad():
        for _, chunk in chunks:
            states.append(RandState(device))
            embs.append(_embed(model, chunk, device, autocast))
    # 2. loss on the detached embeddings; its backward stops at them
    n_q = sum(1 for kind, _ in chunks if kind == "q")
    q_all = torch.cat(embs[:n_q]).detach().requires_grad_()
    d_all = torch.cat(embs[n_q:]).detach().requires_grad_()
    out = loss_fn(q_all, d_all)
    out.backward_loss.backward()
    grads = list(q_all.grad.split([e.shape[0] for e in embs[:n_q]]))
    grads += list(d_all.grad.split([e.shape[0] for e in embs[n_q:]]))
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
