"""The training objective: InfoNCE over in-batch, hard and cross-device negatives, and the
ingredients of the strongest recent recipes (each off by default).

**InfoNCE.** For query ``q_i`` with positive document ``d_i+``::

    L = mean_i  -log( exp(s(q_i, d_i+) / tau) / sum_j exp(s(q_i, d_j) / tau) )

where ``s`` is the cosine similarity (embeddings are L2-normalised) and ``tau`` the temperature,
a DIVISOR: logits = cos / tau, i.e. scale = 1 / tau (e5-mistral: tau = 0.02, scale 50). The
candidates ``d_j`` are every document of every rank: all positives (in-batch negatives for the
other queries) and all hard negatives.

**Cross-device negatives and exact gradients.** Each rank holds ``B`` queries and
``B * (1 + n)`` documents. Queries AND documents are all-gathered (the local slice keeps its
autograd graph, the other ranks' slices are constants) and every rank computes the SAME global
loss over all ``world * B`` queries; its gradient with respect to this rank's embeddings is
exactly this rank's share of the one-big-batch gradient. FSDP/DDP average gradients over ranks
(divide by ``world``), so the loss used for backward is multiplied by ``world``: after
averaging, the parameter gradient equals the single-device gradient of one batch of
``world * B`` queries.

**False negatives.** Two masks remove candidates from a query's softmax: a document whose text
equals the query's own positive (``mask_ids``, anywhere in the global batch), and, with
``false_negative_margin`` m (Qwen3-Embedding's trainer uses 0.1), any candidate whose
similarity exceeds the positive's by more than m: ``s(q_i, d_j) > s(q_i, d_i+) + m``. The share
of candidates the margin masks is reported each step.

**More negatives in the denominator** (GTE / Qwen3-Embedding's improved InfoNCE, off by default):
``query_query`` adds the other queries ``s(q_i, q_j)``, ``doc_doc`` the other documents seen from
the positive, ``s(d_i+, d_j)``; the margin mask applies to them too.

**Matryoshka** (``matryoshka_dims``): the InfoNCE loss is the weighted sum over the full
embedding and its first ``k`` dimensions, re-normalised, for each ``k``: one forward, every
prefix trained to be an embedding of its own.

**Distillation** (``distil_weight`` > 0): rows carry teacher scores of their positive and hard
negatives; for each query the KL divergence ``KL(p_teacher || p_student)`` between the
teacher's softmax (``scores / distil_temperature``) and the student's (cosine / tau) over the
query's own candidates (its positive and its hard negatives: they travel with the query, so no
gather is needed). Its backward is the local mean: FSDP's gradient average over ranks makes it
the global mean. The total is ``contrastive_weight * InfoNCE + distil_weight * KL``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from conretriever.training.distributed import all_gather_no_grad, all_gather_with_grad, world_size


@dataclass
class LossOutput:
    loss: torch.Tensor  # global mean loss (same value on every rank), for logging
    backward_loss: torch.Tensor  # what to call backward() on (see the module docstring)
    accuracy: float  # fraction of global queries whose positive scores highest
    stats: dict = field(default_factory=dict)  # e.g. masked_share, distil_kl (for metrics)


@dataclass(frozen=True)
class LossSettings:
    """What the objective is; built from the run config by the training loop."""

    temperature: float = 0.02
    cross_device: bool = True
    false_negative_margin: float | None = None
    query_query: bool = False
    doc_doc: bool = False
    matryoshka_dims: tuple[int, ...] = ()
    matryoshka_weights: tuple[float, ...] = ()
    contrastive_weight: float = 1.0
    distil_weight: float = 0.0
    distil_temperature: float = 1.0


def _labels(n_queries: int, b: int, docs_per_rank: int, device) -> torch.Tensor:
    rank_of_query = torch.arange(n_queries, device=device) // b
    return rank_of_query * docs_per_rank + torch.arange(n_queries, device=device) % b


def contrastive_loss(
    q: torch.Tensor,
    d: torch.Tensor,
    temperature: float,
    doc_text_ids: torch.Tensor | None = None,
    cross_device: bool = True,
    false_negative_margin: float | None = None,
    query_query: bool = False,
    doc_doc: bool = False,
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
    n = q.shape[0]
    rows = torch.arange(n, device=q.device)
    labels = _labels(n, b, docs_per_rank, q.device)
    cos = q @ d.T  # [world * B, world * B * (1 + n)]
    blocks = [cos]  # the candidate columns: documents, then other queries, then d+ vs documents
    masks = [torch.zeros_like(cos, dtype=torch.bool)]
    if doc_text_ids is not None:
        doc_text_ids = doc_text_ids.to(q.device)
        same = doc_text_ids[None, :] == doc_text_ids[labels][:, None]
        same[rows, labels] = False
        masks[0] |= same
    if query_query:
        blocks.append(q @ q.T)
        masks.append(torch.eye(n, dtype=torch.bool, device=q.device))
    if doc_doc:
        blocks.append(d[labels] @ d.T)
        dd_mask = masks[0].clone()  # documents with the positive's text
        dd_mask[rows, labels] = True  # and the positive itself
        masks.append(dd_mask)
    stats = {}
    if false_negative_margin is not None:
        with torch.no_grad():
            positive = cos[rows, labels][:, None]
            over = [blk.detach() > positive + false_negative_margin for blk in blocks]
            over[0][rows, labels] = False
            masked = sum(int((o & ~m).sum()) for o, m in zip(over, masks, strict=True))
            candidates = sum(int((~m).sum()) for m in masks) - n  # the positives are no candidates
            stats["masked_share"] = masked / max(1, candidates)
        masks = [m | o for m, o in zip(masks, over, strict=True)]
    logits = torch.cat(blocks, 1) / temperature
    mask = torch.cat(masks, 1)
    logits = logits.masked_fill(mask, torch.finfo(logits.dtype).min)
    loss = F.cross_entropy(logits, labels)
    with torch.no_grad():
        accuracy = (logits[:, : cos.shape[1]].argmax(dim=1) == labels).float().mean().item()
    return LossOutput(loss=loss, backward_loss=loss * world, accuracy=accuracy, stats=stats)


def _unit_prefix(x: torch.Tensor, k: int) -> torch.Tensor:
    return F.normalize(x[:, :k], p=2, dim=-1)


def matryoshka_loss(q, d, dims, weights, **contrastive) -> LossOutput:
    """InfoNCE on the full embedding plus ``weights[i]`` x InfoNCE on its first ``dims[i]``
    dimensions (re-normalised); accuracy and stats are the full embedding's."""
    full = contrastive_loss(q, d, **contrastive)
    loss, backward = full.loss, full.backward_loss
    for k, w in zip(dims, weights or [1.0] * len(dims), strict=True):
        part = contrastive_loss(_unit_prefix(q, k), _unit_prefix(d, k), **contrastive)
        loss = loss + w * part.loss
        backward = backward + w * part.backward_loss
        full.stats[f"loss_dim{k}"] = round(float(part.loss.detach()), 6)
    return LossOutput(loss, backward, full.accuracy, full.stats)


def distillation_kl(q: torch.Tensor, d: torch.Tensor, teacher: torch.Tensor, temperature: float,
                    distil_temperature: float) -> torch.Tensor:  # fmt: skip
    """Mean over local queries of KL(softmax(teacher / T_t) || softmax(student / tau)), the
    student's scores being each query's own candidates: its positive ``d[i]`` and its
    negatives ``d[B + i*n : B + (i+1)*n]``; ``teacher``: [B, 1 + n] in that order."""
    b, n = q.shape[0], teacher.shape[1] - 1
    if q.dtype != torch.float64:
        q, d = q.float(), d.float()
    own = torch.cat([d[:b, None, :], d[b:].view(b, n, -1)], 1)  # [B, 1 + n, dim]
    student = torch.einsum("bd,bkd->bk", q, own) / temperature
    target = F.log_softmax(teacher.to(student) / distil_temperature, dim=1)
    return F.kl_div(F.log_softmax(student, dim=1), target, log_target=True, reduction="batchmean")


def training_loss(q, d, settings: LossSettings, doc_text_ids=None, teacher=None) -> LossOutput:
    """The run's objective on one batch's embeddings (see the module docstring)."""
    s = settings
    contrastive = dict(temperature=s.temperature, doc_text_ids=doc_text_ids,
                       cross_device=s.cross_device, false_negative_margin=s.false_negative_margin,
                       query_query=s.query_query, doc_doc=s.doc_doc)  # fmt: skip
    if s.matryoshka_dims:
        out = matryoshka_loss(q, d, s.matryoshka_dims, s.matryoshka_weights, **contrastive)
    else:
        out = contrastive_loss(q, d, **contrastive)
    loss, backward = out.loss * s.contrastive_weight, out.backward_loss * s.contrastive_weight
    if s.distil_weight > 0:
        if teacher is None:
            raise ValueError("distil_weight > 0 needs teacher scores in the batch")
        kl = distillation_kl(q, d, teacher, s.temperature, s.distil_temperature)
        shown = kl.detach().clone()
        if world_size() > 1:
            torch.distributed.all_reduce(shown)
            shown /= world_size()
        out.stats["distil_kl"] = round(float(shown), 6)
        loss = loss + s.distil_weight * shown
        backward = backward + s.distil_weight * kl  # local mean: FSDP averages over ranks
    return LossOutput(loss, backward, out.accuracy, out.stats)
