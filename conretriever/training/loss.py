"""InfoNCE over in-batch, hard and cross-device negatives.

For query ``q_i`` with positive document ``d_i+``, the loss is the cross-entropy of picking the
positive among every candidate document in the (global) batch::

    L = mean_i  -log( exp(s(q_i, d_i+) / tau) / sum_j exp(s(q_i, d_j) / tau) )

where ``s`` is the cosine similarity (embeddings are L2-normalised) and ``tau`` the temperature,
a DIVISOR: logits = cos / tau, i.e. scale = 1 / tau (e5-mistral: tau = 0.02, scale 50). The
candidates ``d_j`` are every document of every rank: all positives (in-batch negatives for the
other queries) and all hard negatives.

Cross-device negatives and exact gradients. Each rank holds ``B`` queries and ``B * (1 + n)``
documents. We all-gather queries AND documents (the local slice keeps its autograd graph, the
other ranks' slices are constants) and every rank computes the SAME global loss over all
``world * B`` queries. The gradient of that loss with respect to this rank's embeddings is then
exactly this rank's share of the one-big-batch gradient. FSDP/DDP average gradients over ranks
(divide by ``world``), so the loss used for backward is multiplied by ``world``: after averaging,
the parameter gradient equals the single-device gradient of one batch of ``world * B`` queries.
(Gathering only documents and keeping local queries, as many implementations do, silently drops
the other ranks' queries' gradient with respect to the local documents.)

False negatives. With ``mask_ids`` (a hash of each document's text), a document whose text equals
the query's own positive, anywhere in the global batch, is removed from that query's softmax:
duplicates of a positive are not negatives.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from conretriever.training.distributed import all_gather_no_grad, all_gather_with_grad, world_size


@dataclass
class LossOutput:
    loss: torch.Tensor  # global mean loss (same value on every rank), for logging
    backward_loss: torch.Tensor  # loss * world: what to call backward() on (see docstring)
    accuracy: float  # fraction of global queries whose positive scores highest


def contrastive_loss(
    q: torch.Tensor,
    d: torch.Tensor,
    temperature: float,
    doc_text_ids: torch.Tensor | None = None,
    cross_device: bool = True,
) -> LossOutput:
    """``q``: [B, dim] local queries; ``d``: [B * (1 + n), dim] local documents laid out as
    ``[positives (B), negatives of query 0 (n), negatives of query 1 (n), ...]``."""
    world = world_size() if cross_device else 1
    b = q.shape[0]
    if d.shape[0] % b:
        raise ValueError(f"documents ({d.shape[0]}) must be a multiple of queries ({b})")
    docs_per_rank = d.shape[0]
    if world > 1:
        q = all_gather_with_grad(q)
        d = all_gather_with_grad(d)
        if doc_text_ids is not None:
            doc_text_ids = all_gather_no_grad(doc_text_ids)
    if q.dtype != torch.float64:  # fp32 at least; float64 stays (exactness tests)
        q, d = q.float(), d.float()
    logits = (q @ d.T) / temperature  # [world * B, world * B * (1 + n)]
    n_queries = q.shape[0]
    rank_of_query = torch.arange(n_queries, device=q.device) // b
    labels = rank_of_query * docs_per_rank + torch.arange(n_queries, device=q.device) % b
    if doc_text_ids is not None:
        doc_text_ids = doc_text_ids.to(q.device)
        same_text = doc_text_ids[None, :] == doc_text_ids[labels][:, None]
        same_text[torch.arange(n_queries, device=q.device), labels] = False
        logits = logits.masked_fill(same_text, torch.finfo(logits.dtype).min)
    loss = F.cross_entropy(logits, labels)
    with torch.no_grad():
        accuracy = (logits.argmax(dim=1) == labels).float().mean().item()
    return LossOutput(loss=loss, backward_loss=loss * world, accuracy=accuracy)
