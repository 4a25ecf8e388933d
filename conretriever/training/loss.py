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

**Score distillation** (``distil_weight`` > 0): rows carry teacher scores of their positive and
hard negatives; for each query the KL divergence ``KL(p_teacher || p_student)`` between the
teacher's softmax (``scores / distil_temperature``) and the student's (cosine / tau) over the
query's own candidates (its positive and its hard negatives: they travel with the query, so no
gather is needed). The teacher's temperature matters as much as the student's: a cosine teacher
(``conretriever mine --output_scores`` writes cosines) has scores a few hundredths apart, so at
a temperature of 1 its softmax is nearly uniform and the KL would pull the positive's score
down to the negatives'. The default (``distil_temperature`` none) is therefore the student's own
tau: the teacher's cosines are read on the scale the student is trained on. Each step logs the
teacher's mean entropy as a share of the uniform distribution's (``distil_teacher_entropy``, 1 =
uniform) and how often its top candidate is the labelled positive
(``distil_teacher_agreement``). Its backward is the local mean: FSDP's gradient average over
ranks makes it the global mean.

**Embedding distillation** (``embed_distil_weight`` > 0, teacher ``embed_distil_model``: any
embedder spec, e.g. ``embedded:minilm``): the teacher's vectors of every text the run's
batches will hold are computed before training (``training.teacher``), and the student is
matched to the teacher's *similarity structure*, which needs no projection between their
dimensions: for each query of the global batch, over every document of the global batch (the
in-batch, hard and cross-device candidates of InfoNCE),
``KL(softmax(T_i / t_t) || softmax(S_i / tau))`` with ``S = q d^T`` the student's cosines,
``T`` the teacher's, and ``t_t`` = ``embed_distil_temperature`` (none: tau). Like InfoNCE it
is computed on the gathered batch, the same value on every rank, and multiplied by ``world``
for backward. The teacher is never saved with the student: there is nothing to drop at
export. Two options widen what is matched:
``embed_distil_rows all`` matches every text's row (queries AND documents, against every other
text of the batch: query-query, document-document and both directions of query-document),
about 4x the pairs of the default ``queries`` rows for one hard negative; and
``embed_distil_objective mse`` replaces the KL by the squared difference of the raw cosines,
``mean_i sum_j (S_ij - T_ij)^2``: every pair counts, not only those near the top of a row's
softmax, so the student is taught the teacher's whole geometry (how similar two unrelated texts
are, too), which a sharp softmax of an easy batch hardly sees. Both are invariant to a rotation
of either space, so neither needs a projection.

**Decoupled similarity distillation** (``embed_distil_rest_weight`` > 0, same teacher and rows):
the KL above is dominated by each row's top text once the teacher is sure of it (on the
recipe's SQuAD batches the teacher's softmax at tau keeps 0.1-3% of the uniform entropy): it is
then nearly one-hot, a second InfoNCE, and how the teacher orders the *other* texts (which
unrelated text is nearer, the knowledge it was trained for) is multiplied by the tiny mass it
leaves them. Decoupled knowledge distillation (Zhao et al., 2022) splits the classic KL into the
target's part and the rest's and weights the rest on its own. Here: each row loses the column
of the teacher's nearest text (its own positive or query, where the teacher agrees with the
labels) and every column the teacher scores as high (a copy of that text elsewhere in the
batch: it would take the whole rest target), both softmaxes are renormalised over the
remaining columns, and the loss is
``KL(softmax(T_rest / t_t) || softmax(S_rest / tau))``, averaged over rows; the top text is
left to InfoNCE and the full KL. Its gradient is that of the KL on the kept columns, zero on the
dropped one. Logged: ``embed_rest_kl`` and ``embed_rest_entropy`` (the rest target's entropy
as a share of the uniform's: how much it says).

**Vector distillation** (``embed_distil_vector_weight`` > 0, same teacher): every text of the
batch, query or document, is matched to the teacher's own vector of it, not only to its
similarities with the batch's other texts. The two spaces differ in size (640 dimensions for
Gemma-3-270M, 384 for all-MiniLM-L6-v2), so a learned linear map ``W`` (student dimension ->
teacher dimension, no bias) carries the student's unit vector ``s`` over, and the loss is the
mean over texts of ``1 - cos(W s, t)``. Where a batch's similarity rows say little once the
teacher's softmax is nearly one-hot (an easy batch: the teacher's entropy is ~1% of uniform on
the recipe's data), this term hands the student the teacher's whole vector of every text:
hundreds of numbers per text instead of about one bit per row, and, through ``W``, one map
shared by every batch (Jasper/Stella distil through such a map too). ``W`` lives on the model
as ``distil_projection``: it is trained with the adapters, saved in checkpoints (a resume
continues it) and left out of every exported folder (it is not part of the retriever: the
saved model encodes exactly as before). It is single-process only (an FSDP run is refused:
the sharded model's forward never runs ``W``). Its backward is the local mean.

The total is ``contrastive_weight * InfoNCE + distil_weight * KL_scores +
embed_distil_weight * KL_similarities + embed_distil_rest_weight * KL_rest +
embed_distil_vector_weight * (1 - cos)``.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from conretriever.errors import ConfigError
from conretriever.options import opt
from conretriever.training.distributed import all_gather_no_grad, all_gather_with_grad, world_size

EMBED_DISTIL_ROWS = ("queries", "all")  # the rows of similarity matching
EMBED_DISTIL_OBJECTIVES = ("kl", "mse")


@dataclass
class LossOutput:
    loss: torch.Tensor  # global mean loss (same value on every rank), for logging
    backward_loss: torch.Tensor  # what to call backward() on (see the module docstring)
    accuracy: float  # fraction of global queries whose positive scores highest
    stats: dict = field(default_factory=dict)  # e.g. masked_share, distil_kl (for metrics)


@dataclass
class LossSettings:
    """What the objective is: the ``loss`` section of a run config (flags: ``--temperature``,
    ``--distil_weight``, ...; see the module docstring for each term)."""

    temperature: float = opt(
        0.02, gt=0, help="tau, a divisor: logits = cosine / tau (scale 1 / tau)"
    )
    cross_device_negatives: bool = opt(True, help="every rank's documents are negatives too")
    false_negative_margin: float | None = opt(
        None, help="mask candidates scoring above the positive + MARGIN (Qwen3-Embedding: 0.1)"
    )
    query_query: bool = opt(
        False, aliases=("loss_query_query",), help="other queries as negatives too (GTE)"
    )
    doc_doc: bool = opt(
        False, aliases=("loss_doc_doc",), help="other documents seen from the positive too"
    )
    matryoshka_dims: list[int] = opt(
        default_factory=list, ge=1, help="also train these leading dims (e.g. 64 128 256 512)"
    )
    matryoshka_weights: list[float] = opt(
        default_factory=list, ge=0, help="one per matryoshka dim (default 1 each; full dim: 1)"
    )
    contrastive_weight: float = opt(1.0, ge=0, help="weight of InfoNCE in the total")
    distil_weight: float = opt(
        0.0, ge=0, help="weight of the KL to teacher scores (rows need pos_scores/neg_scores)"
    )
    distil_temperature: float | None = opt(
        None, gt=0, help="teacher scores' softmax temperature; none: tau (right for cosines)"
    )
    embed_distil_model: str | None = opt(
        None, help="teacher embedder spec for embedding distillation (e.g. embedded:minilm)"
    )
    embed_distil_weight: float = opt(
        0.0, ge=0, help="weight of the KL to the teacher's in-batch similarities"
    )
    embed_distil_doc_max_length: int = opt(
        0,
        ge=0,
        help="document tokens the teacher reads (appended EOS included); 0: the teacher's own "
        "limit. The student's --doc_max_length makes the teacher judge what the student sees",
    )
    embed_distil_temperature: float | None = opt(
        None, gt=0, help="teacher similarities' softmax temperature; none: tau"
    )
    embed_distil_rows: str = opt(
        "queries",
        choices=EMBED_DISTIL_ROWS,
        help="queries: each query vs every document; all: every text vs every other text",
    )
    embed_distil_objective: str = opt(
        "kl",
        choices=EMBED_DISTIL_OBJECTIVES,
        help="kl: of the rows' softmaxes; mse: squared cosine differences, summed over a row",
    )

    embed_distil_rest_weight: float = opt(
        0.0,
        ge=0,
        help="weight of the similarity KL over each row's other texts, the teacher's nearest "
        "left out (decoupled distillation: the teacher's order of the rest, however sure it is "
        "of its top text)",
    )

    embed_distil_vector_weight: float = opt(
        0.0,
        ge=0,
        help="weight of 1 - cos(W s, t): each text's vector mapped by a learned W "
        "(student dim -> teacher dim, not exported) against the teacher's",
    )

    embed_distil_projection_lr: float | None = opt(
        None,
        gt=0,
        help="learning rate of vector distillation's learned map (none: the run's); "
        "it starts random, so it may want more than the adapters",
    )

    def validate(self) -> None:
        if self.matryoshka_weights and len(self.matryoshka_weights) != len(self.matryoshka_dims):
            raise ConfigError(
                f"--matryoshka_weights: {len(self.matryoshka_weights)} weights for "
                f"{len(self.matryoshka_dims)} --matryoshka_dims"
            )
        if (
            self.contrastive_weight == 0
            and self.distil_weight == 0
            and (self.embed_distil_weight == 0)
            and (self.embed_distil_rest_weight == 0)
            and (self.embed_distil_vector_weight == 0)
        ):
            raise ConfigError("--contrastive_weight and every distillation weight are 0: no loss")
        for name in ("embed_distil_weight", "embed_distil_rest_weight",
                     "embed_distil_vector_weight"):  # fmt: skip
            if getattr(self, name) > 0 and not self.embed_distil_model:
                raise ConfigError(
                    f"--{name} > 0 needs --embed_distil_model (a teacher embedder spec, "
                    "e.g. embedded:minilm)"
                )

    @property
    def needs_teacher_vectors(self) -> bool:
        """Whether a term of the loss reads the teacher's vectors of the batch's texts."""
        return (self.embed_distil_weight > 0 or self.embed_distil_rest_weight > 0
                or self.embed_distil_vector_weight > 0)  # fmt: skip

    @property
    def score_teacher_temperature(self) -> float:
        return self.distil_temperature or self.temperature

    @property
    def embed_teacher_temperature(self) -> float:
        return self.embed_distil_temperature or self.temperature


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


def teacher_stats(teacher_logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """How informative a teacher's target is: its mean entropy as a share of the uniform
    distribution's (1: uniform, it teaches nothing; 0: one-hot) and the share of rows whose
    highest-scored candidate is the labelled positive."""
    with torch.no_grad():
        log_p = F.log_softmax(teacher_logits.double(), dim=1)
        entropy = -(log_p.exp() * log_p).sum(1) / math.log(teacher_logits.shape[1])
        agree = (teacher_logits.argmax(dim=1) == labels).double().mean()
    return {"entropy": float(entropy.mean()), "agreement": float(agree)}


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


def similarity_rows(
    q: torch.Tensor,
    d: torch.Tensor,
    teacher_q: torch.Tensor,
    teacher_d: torch.Tensor,
    teacher_temperature: float,
    cross_device: bool = True,
    rows: str = "queries",
) -> tuple[torch.Tensor, torch.Tensor, dict, int]:
    """The student's and the teacher's rows of cosines that embedding distillation matches (see
    the module docstring), by :func:`similarity_match` and :func:`rest_distillation`.

    ``q`` [B, dim] / ``d`` [B * (1 + n), dim]: the student's local unit vectors, laid out as in
    :func:`contrastive_loss`; ``teacher_q`` [B, dim_t] / ``teacher_d``: the teacher's unit vectors
    of the same texts (any ``dim_t``), gathered across ranks with the student's. ``rows``:
    ``queries``: each query's row of cosines to every document, [Q, D]; ``all``: every text's
    row (queries and documents) to every other text of the batch, itself left out,
    [N, N - 1]. Returns (student rows, teacher rows, the teacher's stats over the query rows'
    softmax at ``teacher_temperature``, the world size the loss is multiplied by for backward)."""
    world = world_size() if cross_device else 1
    b, docs_per_rank = q.shape[0], d.shape[0]
    if world > 1:
        q, d = all_gather_with_grad(q), all_gather_with_grad(d)
        teacher_q, teacher_d = all_gather_no_grad(teacher_q), all_gather_no_grad(teacher_d)
    dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    q, d = q.to(dtype), d.to(dtype)
    teacher_q, teacher_d = teacher_q.to(q), teacher_d.to(q)
    query_rows = teacher_q @ teacher_d.T  # the teacher's query-document cosines
    stats = teacher_stats(query_rows / teacher_temperature,
                          _labels(q.shape[0], b, docs_per_rank, q.device))  # fmt: skip
    if rows != "all":
        return q @ d.T, query_rows, stats, world
    student_x, teacher_x = torch.cat([q, d]), torch.cat([teacher_q, teacher_d])
    student, teacher = student_x @ student_x.T, teacher_x @ teacher_x.T
    keep = ~torch.eye(student.shape[0], dtype=torch.bool, device=q.device)
    # every row loses its diagonal: [N, N - 1]
    student, teacher = student[keep].view(len(keep), -1), teacher[keep].view(len(keep), -1)
    return student, teacher, stats, world


def similarity_match(student: torch.Tensor, teacher: torch.Tensor, objective: str,
                     temperature: float, teacher_temperature: float) -> torch.Tensor:  # fmt: skip
    """Mean over rows of KL(softmax(teacher / t_t) || softmax(student / tau)) (``kl``), or of
    the squared cosine differences summed over a row (``mse``)."""
    if objective == "mse":
        return (student - teacher).pow(2).sum(1).mean()
    target = F.log_softmax(teacher / teacher_temperature, dim=1)
    return F.kl_div(F.log_softmax(student / temperature, dim=1), target, log_target=True,
                    reduction="batchmean")  # fmt: skip


TIE = 1e-6  # teacher cosines this close to a row's highest are the same text (a copy)


def rest_distillation(student: torch.Tensor, teacher: torch.Tensor, temperature: float,
                      teacher_temperature: float) -> tuple[torch.Tensor, float]:  # fmt: skip
    """Decoupled similarity distillation (see the module docstring): the KL of the rows of
    :func:`similarity_rows` once each row has lost the column of the teacher's highest cosine
    (and any column within ``TIE`` of it), both softmaxes renormalised over the rest (masked,
    so rows may keep different numbers of columns). Returns (the loss summed over rows and
    divided by their number, rows with fewer than two kept columns adding 0; the rest target's
    mean entropy as a share of the uniform's over each row's kept columns, over the rows that
    have two or more)."""
    keep = teacher < teacher.max(dim=1, keepdim=True).values - TIE
    kept = keep.sum(1)
    taught = kept >= 2  # one kept text is a certain target: nothing to teach
    if not bool(taught.any()):
        warnings.warn(
            "embed_distil_rest_weight: no similarity row keeps two texts besides the teacher's "
            "nearest (a batch this small has no rest to teach): the term is 0",
            stacklevel=2,
        )
        return student.sum() * 0, 0.0
    floor = torch.finfo(student.dtype).min
    log_s = (student / temperature).masked_fill(~keep, floor).log_softmax(1)
    log_t = (teacher.to(student) / teacher_temperature).masked_fill(~keep, floor).log_softmax(1)
    p_t = log_t.exp()
    per_row = (p_t * (log_t - log_s)).masked_fill(~keep, 0).sum(1).masked_fill(~taught, 0)
    with torch.no_grad():
        spread = -(p_t * log_t).masked_fill(~keep, 0).sum(1)[taught].double()
        entropy = float((spread / kept[taught].double().log()).mean())
    return per_row.sum() / len(per_row), entropy


def vector_distillation(
    q: torch.Tensor,
    d: torch.Tensor,
    teacher_q: torch.Tensor,
    teacher_d: torch.Tensor,
    projection: torch.nn.Module,
) -> torch.Tensor:
    """Mean over this rank's texts (queries ``q`` [B, dim], then documents ``d``) of
    ``1 - cos(W s, t)``: ``W`` = ``projection`` (dim -> dim_t), ``t`` the teacher's unit vector
    of the same text (``teacher_q`` [B, dim_t], ``teacher_d``). Computed in the projection's
    dtype (float32, or float64 in the tests)."""
    weight = projection.weight
    student = torch.cat([q, d]).to(weight.dtype)
    teacher = torch.cat([teacher_q, teacher_d]).to(weight.dtype)
    mapped = F.normalize(projection(student), dim=-1)
    return (1 - (mapped * teacher).sum(-1)).mean()


def _global_mean(value: torch.Tensor) -> float:
    shown = value.detach().clone()
    if world_size() > 1:
        torch.distributed.all_reduce(shown)
        shown /= world_size()
    return float(shown)


def training_loss(q, d, settings: LossSettings, doc_text_ids=None, teacher=None,
                  teacher_vectors=None, projection=None) -> LossOutput:  # fmt: skip
    """The run's objective on one batch's embeddings (see the module docstring).
    ``teacher``: [B, 1 + n] scores (score distillation); ``teacher_vectors``: the teacher's
    (query, document) vectors of the batch's texts (embedding distillation); ``projection``:
    the learned map of vector distillation (the model's ``distil_projection``)."""
    s = settings
    contrastive = dict(temperature=s.temperature, doc_text_ids=doc_text_ids,
                       cross_device=s.cross_device_negatives,
                       false_negative_margin=s.false_negative_margin,
                       query_query=s.query_query, doc_doc=s.doc_doc)  # fmt: skip
    if s.matryoshka_dims:
        out = matryoshka_loss(q, d, s.matryoshka_dims, s.matryoshka_weights, **contrastive)
    else:
        out = contrastive_loss(q, d, **contrastive)
    loss, backward = out.loss * s.contrastive_weight, out.backward_loss * s.contrastive_weight
    if s.distil_weight > 0:
        if teacher is None:
            raise ValueError("distil_weight > 0 needs teacher scores in the batch")
        t_t = s.score_teacher_temperature
        kl = distillation_kl(q, d, teacher, s.temperature, t_t)
        shown = _global_mean(kl)
        labels = torch.zeros(teacher.shape[0], dtype=torch.long)
        for key, value in teacher_stats(teacher / t_t, labels).items():
            out.stats[f"distil_teacher_{key}"] = round(value, 4)
        out.stats["distil_kl"] = round(shown, 6)
        loss = loss + s.distil_weight * shown
        backward = backward + s.distil_weight * kl  # local mean: FSDP averages over ranks
    if s.embed_distil_weight > 0 or s.embed_distil_rest_weight > 0:
        if teacher_vectors is None:
            raise ValueError("embedding distillation needs the teacher's vectors of the batch")
        t_t = s.embed_teacher_temperature
        student, teacher_rows, stats, world = similarity_rows(
            q, d, *teacher_vectors, t_t, cross_device=s.cross_device_negatives,
            rows=s.embed_distil_rows)  # fmt: skip
        out.stats.update({f"embed_teacher_{k}": round(v, 4) for k, v in stats.items()})
        if s.embed_distil_weight > 0:
            kl = similarity_match(student, teacher_rows, s.embed_distil_objective, s.temperature,
                                  t_t)  # fmt: skip
            out.stats["embed_kl"] = round(float(kl.detach()), 6)
            loss = loss + s.embed_distil_weight * kl.detach()
            backward = backward + s.embed_distil_weight * (kl * world)
        if s.embed_distil_rest_weight > 0:
            rest, entropy = rest_distillation(student, teacher_rows, s.temperature, t_t)
            out.stats["embed_rest_kl"] = round(float(rest.detach()), 6)
            out.stats["embed_rest_entropy"] = round(entropy, 4)
            loss = loss + s.embed_distil_rest_weight * rest.detach()
            backward = backward + s.embed_distil_rest_weight * (rest * world)
    if s.embed_distil_vector_weight > 0:
        if teacher_vectors is None or projection is None:
            raise ValueError("embed_distil_vector_weight > 0 needs the teacher's vectors of the "
                             "batch and the model's distil_projection")  # fmt: skip
        distance = vector_distillation(q, d, *teacher_vectors, projection)
        shown = _global_mean(distance)
        out.stats["embed_vec_cos"] = round(1 - shown, 6)
        loss = loss + s.embed_distil_vector_weight * shown
        backward = backward + s.embed_distil_vector_weight * distance
    return LossOutput(loss, backward, out.accuracy, out.stats)
