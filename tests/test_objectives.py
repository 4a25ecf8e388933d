"""Training objectives, checked against hand-computed values: distillation (KL to teacher
scores), Matryoshka, false-negative masking by score, extra negatives in the denominator, and
positive-aware mining."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import randomize_lora_b

from conretriever.errors import ConfigError
from conretriever.training.grad_cache import grad_cache_step
from conretriever.training.loss import (
    LossSettings,
    contrastive_loss,
    distillation_kl,
    matryoshka_loss,
    training_loss,
)

REPO = Path(__file__).resolve().parents[1]


def unit(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g, dtype=torch.float64), dim=-1)


def test_kl_gradient_equals_the_analytic_gradient():
    b, n, dim, tau, t_t = 3, 2, 8, 0.05, 0.7
    q = unit(b, dim).requires_grad_()
    d = unit(b * (1 + n), dim, seed=1)
    teacher = torch.randn(b, 1 + n, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    kl = distillation_kl(q, d, teacher, tau, t_t)
    kl.backward()
    own = torch.cat([d[:b, None], d[b:].view(b, n, dim)], 1)  # each query's candidates
    student = torch.einsum("bd,bkd->bk", q.detach(), own) / tau
    p_s, p_t = student.softmax(1), (teacher / t_t).softmax(1)
    expected_kl = (p_t * (p_t.log() - p_s.log())).sum(1).mean()
    torch.testing.assert_close(kl.detach(), expected_kl, atol=1e-12, rtol=1e-12)
    # dKL/ds = (p_s - p_t) / B ; ds/dq = candidates / tau
    analytic = torch.einsum("bk,bkd->bd", (p_s - p_t) / b, own) / tau
    torch.testing.assert_close(q.grad, analytic, atol=1e-12, rtol=1e-10)


def test_matryoshka_loss_is_the_sum_of_per_dimension_losses():
    q, d = unit(4, 16), unit(8, 16, seed=3)
    out = matryoshka_loss(q, d, (4, 8), (0.5, 2.0), temperature=0.05, cross_device=False)
    full = contrastive_loss(q, d, 0.05, cross_device=False).loss
    parts = [
        contrastive_loss(F.normalize(q[:, :k], dim=-1), F.normalize(d[:, :k], dim=-1), 0.05,
                         cross_device=False).loss
        for k in (4, 8)
    ]  # fmt: skip
    torch.testing.assert_close(out.loss, full + 0.5 * parts[0] + 2.0 * parts[1])


def _manual_ce(cos: torch.Tensor, labels: torch.Tensor, masked: torch.Tensor, tau: float):
    logits = (cos / tau).masked_fill(masked, float("-inf"))
    return F.cross_entropy(logits, labels)


def test_score_mask_removes_exactly_the_candidates_above_the_margin():
    q, d = unit(3, 6), unit(6, 6, seed=4)
    margin, tau = -0.05, 0.1  # a negative margin: some candidates surely exceed it
    cos = q @ d.T
    labels = torch.arange(3)
    above = cos > cos[labels, labels][:, None] + margin
    above[labels, labels] = False
    assert 0 < int(above.sum()) < above.numel() - 3  # the test masks some, not all
    out = contrastive_loss(q, d, tau, cross_device=False, false_negative_margin=margin)
    torch.testing.assert_close(out.loss, _manual_ce(cos, labels, above, tau))
    assert out.stats["masked_share"] == pytest.approx(int(above.sum()) / (3 * 6 - 3))


def test_query_query_and_doc_doc_terms_by_hand():
    q, d = unit(3, 5), unit(6, 5, seed=5)
    tau = 0.2
    out = contrastive_loss(q, d, tau, cross_device=False, query_query=True, doc_doc=True)
    labels = torch.arange(3)
    qq = (q @ q.T).masked_fill(torch.eye(3, dtype=torch.bool), float("-inf"))
    dd = d[labels] @ d.T
    dd[labels, labels] = float("-inf")
    logits = torch.cat([q @ d.T, qq, dd], 1) / tau
    torch.testing.assert_close(out.loss, F.cross_entropy(logits, labels))


def _model(tiny_decoder):
    from conretriever.model.embedder import Embedder
    from conretriever.model.settings import LoraSettings

    torch.manual_seed(0)
    emb = Embedder.from_pretrained(tiny_decoder, device="cpu", dtype=torch.float64,
                                   lora=LoraSettings(r=4, alpha=8, dropout=0.0))  # fmt: skip
    randomize_lora_b(emb)
    emb.train()
    return emb


@pytest.mark.parametrize("margin", [None, 0.0])
def test_grad_cache_with_distillation_and_matryoshka_equals_the_plain_step(tiny_decoder, margin):
    ref = _model(tiny_decoder)
    cached = copy.deepcopy(ref)
    queries = [f"query {i} about {w}" for i, w in enumerate("abcdef")]
    docs = [f"document {i} on {w}" for i, w in enumerate("abcdef")]
    negs = [f"other text {i}" for i in range(6)]
    q, d = ref.tokenize(queries, 32), ref.tokenize(docs + negs, 32)
    teacher = torch.randn(6, 2, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    settings = LossSettings(
        temperature=0.05,
        cross_device_negatives=False,
        false_negative_margin=margin,
        matryoshka_dims=(8, 16),
        distil_weight=0.7,
        distil_temperature=0.5,
    )

    def loss(a, b):
        return training_loss(a, b, settings, None, teacher)

    def grads(model, chunk):
        out = grad_cache_step(model, q, d, loss, chunk, torch.device("cpu"))
        return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    out_ref, g_ref = grads(ref, 0)
    out, g = grads(cached, 2)
    torch.testing.assert_close(out.loss, out_ref.loss, atol=1e-9, rtol=1e-9)
    assert "distil_kl" in out.stats and all(v.abs().sum() > 0 for v in g.values())
    for name in g_ref:
        torch.testing.assert_close(g[name], g_ref[name], atol=1e-6, rtol=1e-6, msg=name)


@pytest.mark.slow
def test_score_mask_and_similarity_terms_with_cross_device_negatives_on_two_ranks(tmp_path):
    script = Path(__file__).with_name("loss_dist_check.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                "--master_port", str(29800 + os.getpid() % 1000)]  # fmt: skip
    subprocess.run([*torchrun, str(script), str(tmp_path)], check=True, env=env, timeout=120)
    single = json.loads((tmp_path / "single.json").read_text())
    for rank in (0, 1):
        got = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert got["loss"] == pytest.approx(single["loss"], abs=1e-12)
        assert got["masked_share"] == pytest.approx(single["masked_share"], abs=1e-12)
        np.testing.assert_allclose(got["grad"], single["grad"][rank], atol=1e-12)
        # the similarity terms: the global batch's value on every rank, its gradient averaged
        assert got["embed_loss"] == pytest.approx(single["embed_loss"], abs=1e-12)
        assert single["embed_loss"] > 0
        np.testing.assert_allclose(got["embed_grad"], single["embed_grad"][rank], atol=1e-12)


def test_saved_matryoshka_model_truncates_like_sentence_transformers(tiny_decoder, tmp_path):
    st = pytest.importorskip("sentence_transformers")
    from conretriever.model.embedder import Embedder

    texts = ["a first text", "and the second one", "three"]
    model = Embedder.from_pretrained(tiny_decoder, {"truncate_dim": 16}, device="cpu",
                                     dtype="float32")  # fmt: skip
    ours = model.encode(texts, role="passage")
    assert ours.shape == (3, 16) and np.allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-6)
    folder = model.save(tmp_path / "m")
    saved = json.loads((folder / "config_sentence_transformers.json").read_text())
    assert saved["truncate_dim"] == 16
    for theirs_model in (
        st.SentenceTransformer(str(folder), device="cpu"),
        st.SentenceTransformer(str(folder), device="cpu", truncate_dim=16),
    ):
        # sentence-transformers truncates after its Normalize module: normalise again to compare
        theirs = theirs_model.encode(texts, normalize_embeddings=True)
        np.testing.assert_allclose(theirs, ours, atol=1e-5)
    full = Embedder.from_pretrained(folder, {"truncate_dim": 0}, device="cpu", dtype="float32")
    assert full.encode(texts, role="passage").shape == (3, full.dim)
    # the command line: the saved model's 16 dims, and an explicit --truncate_dim 8
    (tmp_path / "texts.txt").write_text("\n".join(texts) + "\n")
    for flags, want in (([], ours), (["--truncate_dim", "8"], None)):
        out = tmp_path / f"v{len(flags)}.npy"
        cmd = [sys.executable, "-m", "conretriever", "encode", "--model", str(folder),
               "--input", str(tmp_path / "texts.txt"), "--output", str(out), "--dtype", "float32",
               *flags]  # fmt: skip
        subprocess.run(cmd, check=True, capture_output=True)
        got = np.load(out)
        if want is None:  # the first 8 of the full vector, re-normalised
            want = full.encode(texts, role="passage")[:, :8]
            want = want / np.linalg.norm(want, axis=1, keepdims=True)
        np.testing.assert_allclose(got, want, atol=1e-5)


def _scored_rows(n=16):
    rows = []
    for i in range(n):
        rows.append({"query": f"question {i}", "positive": [f"answer {i}"],
                     "negative": [f"wrong {i}", f"other {i}"], "pos_scores": [0.9],
                     "neg_scores": [0.2, 0.1]})  # fmt: skip
    return rows


def test_distillation_trains_and_refuses_rows_without_scores(tiny_decoder, tmp_path, capsys):
    from conretriever.cli import main as cli

    data = tmp_path / "data"
    data.mkdir()
    rows = _scored_rows()
    (data / "nq.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    base = ["train", "--model_name_or_path", str(tiny_decoder), "--train_data", str(data),
            "--per_device_train_batch_size", "4", "--max_steps", "2", "--report_to", "none",
            "--distil_weight", "0.5", "--chunk_size", "2"]  # fmt: skip
    assert cli([*base, "--output_dir", str(tmp_path / "ok")]) == 0
    metrics = [json.loads(x) for x in (tmp_path / "ok" / "metrics.jsonl").read_text().splitlines()]
    assert all("distil_kl" in r and r["distil_kl"] >= 0 for r in metrics)
    rows[5] = {k: v for k, v in rows[5].items() if k != "neg_scores"}
    (data / "nq.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert cli([*base, "--output_dir", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err
    assert "nq.jsonl:6: field 'neg_scores': --distil_weight needs teacher scores" in err


def test_score_fields_are_validated(tmp_path):
    from conretriever.data.training import parse_row

    errors: list[str] = []
    parse_row({"query": "q", "positive": ["p"], "negative": ["n"], "neg_scores": [1, 2]}, "f:1",
              "t", errors)  # fmt: skip
    parse_row({"query": "q", "positive": ["p"], "scores": [1, "x"]}, "f:2", "t", errors)
    ok = parse_row({"query": "q", "positive": ["p"], "negative": ["n", "m"],
                    "scores": [0.9, 0.1, 0.2]}, "f:3", "t", errors)  # fmt: skip
    assert errors == ["f:1: field 'neg_scores': 2 scores for 1 texts",
                      "f:2: field 'scores': expected a list of finite numbers"]  # fmt: skip
    assert ok.pos_scores == (0.9,) and ok.neg_scores == (0.1, 0.2)


def test_positive_aware_mining_rules_and_teacher_scores(tiny_encoder, tmp_path):
    from conretriever.data.training import read_task_file
    from conretriever.model.embedder import Embedder
    from conretriever.retrieval.mining import MineSettings, mine

    corpus = [{"_id": str(i), "text": f"passage number {i} about topic {i % 4}"} for i in range(40)]
    (tmp_path / "corpus.jsonl").write_text("".join(json.dumps(r) + "\n" for r in corpus))
    rows = [{"query": f"topic {i % 4} question {i}", "positive": [f"passage number {i} about "
             f"topic {i % 4}"]} for i in range(6)]  # fmt: skip
    (tmp_path / "nq.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    embedder = Embedder.from_pretrained(tiny_encoder, device="cpu")

    def run(**kw):
        out = tmp_path / f"mined_{len(list(tmp_path.glob('mined_*')))}.jsonl"
        settings = MineSettings(
            model="x",
            data=tmp_path / "nq.jsonl",
            corpus=str(tmp_path / "corpus.jsonl"),
            output=out,
            window="1-20",
            n_negatives=20,
            dedup_threshold=1.01,
            progress=False,
            **kw,
        )
        return mine(settings, embedder=embedder), out  # fmt: skip

    plain, plain_out = run(output_scores=True)
    ratio, _ = run(max_score_ratio=0.95)
    margin, _ = run(margin=0.05)
    assert plain.dropped_score_ratio == 0 and plain.dropped_margin == 0
    assert ratio.dropped_score_ratio > 0 and margin.dropped_margin > 0
    assert ratio.negatives_written == plain.negatives_written - ratio.dropped_score_ratio
    assert margin.negatives_written == plain.negatives_written - margin.dropped_margin
    # the written teacher scores are the embedder's cosines
    mined = read_task_file(plain_out)
    ex = mined[0]
    q = embedder.encode(
        [ex.query],
        role="query",
        instruction=ex.instruction
        or "Given a question, retrieve Wikipedia passages that answer the question",
    )
    negs = embedder.encode(list(ex.negatives), role="passage")
    np.testing.assert_allclose(np.array(ex.neg_scores), (negs @ q.T).ravel(), atol=1e-5)
    # --min_negatives: a row left with fewer negatives is not written, and is counted
    assert plain.per_row == {19: len(rows)}  # 20 ranks minus the positive
    kept, kept_out = run(min_negatives=19)
    assert kept.rows_left_out == 0 and len(read_task_file(kept_out)) == len(rows)
    none, none_out = run(min_negatives=20)
    assert none.rows_left_out == len(rows) and none.negatives_written == 0
    assert none_out.read_text() == ""
    with pytest.raises(ConfigError, match="--min_negatives 21 is more than --n_negatives 20"):
        MineSettings(model="x", data=tmp_path / "nq.jsonl", corpus="self", output=tmp_path / "o",
                     n_negatives=20, min_negatives=21).validate()  # fmt: skip
