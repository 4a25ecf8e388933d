"""GradCache gives the same gradients and updated weights as the plain full-batch step."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import randomize_lora_b

from conretriever.model.embedder import Embedder, LoraSettings, is_activation_checkpointing
from conretriever.training.grad_cache import (
    RandState,
    grad_cache_step,
    make_chunk,
    plan_rows,
    split_to_count,
)
from conretriever.training.loss import contrastive_loss

QUERIES = [f"query number {i} about {w}" for i, w in enumerate("abcdefgh")]
DOCS = [f"document {i} talks about {w} at length" for i, w in enumerate("abcdefgh")]
NEGS = [f"unrelated text {i} {w}" for i, w in enumerate("zyxwvuts")]


def _model(tiny_decoder, lora: bool) -> Embedder:
    torch.manual_seed(0)
    emb = Embedder.from_pretrained(
        tiny_decoder,
        device="cpu",
        dtype=torch.float64,
        lora=LoraSettings(r=4, alpha=8, dropout=0.0) if lora else None,
    )
    if lora:
        randomize_lora_b(emb)
    emb.train()
    return emb


def _batches(emb: Embedder):
    q = emb.tokenize(QUERIES, 32)
    d = emb.tokenize(DOCS + NEGS, 48)  # positives then one hard negative per query
    ids = torch.arange(len(DOCS) + len(NEGS))
    return q, d, ids


def _step(emb: Embedder, chunk_size: int):
    q, d, ids = _batches(emb)
    opt = torch.optim.AdamW([p for p in emb.parameters() if p.requires_grad], lr=1e-3)
    out = grad_cache_step(
        emb, q, d, lambda a, b: contrastive_loss(a, b, 0.05, ids), chunk_size, torch.device("cpu")
    )
    grads = {n: p.grad.clone() for n, p in emb.named_parameters() if p.requires_grad}
    opt.step()
    weights = {n: p.detach().clone() for n, p in emb.named_parameters() if p.requires_grad}
    return out, grads, weights


@pytest.mark.parametrize("lora", [True, False])
def test_grad_cache_equals_full_batch_step(tiny_decoder, lora):
    ref_model = _model(tiny_decoder, lora)
    cached_model = copy.deepcopy(ref_model)
    ref_out, ref_grads, ref_weights = _step(ref_model, chunk_size=0)
    out, grads, weights = _step(cached_model, chunk_size=2)
    assert torch.allclose(out.loss, ref_out.loss, atol=1e-10)
    assert len(grads) > 0 and all(g.abs().sum() > 0 for g in grads.values())
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(weights[name], ref_weights[name], atol=1e-6, rtol=1e-6)


def test_last_chunk_keeps_its_graph_and_is_not_replayed(tiny_decoder, monkeypatch):
    """N chunks cost 2N - 1 forwards: the last chunk's first forward keeps its graph, and the
    gradients still equal the full-batch step's (checked above with the same chunking)."""
    emb = _model(tiny_decoder, lora=True)
    calls = []
    forward = emb.forward
    monkeypatch.setattr(emb, "forward", lambda *a, **k: calls.append(1) or forward(*a, **k))
    _step(emb, chunk_size=2)  # 8 queries and 16 documents: 4 + 8 chunks
    assert len(calls) == 2 * 12 - 1


def test_chunks_are_trimmed_to_their_longest_sequence(tiny_decoder):
    emb = _model(tiny_decoder, lora=False)
    batch = emb.tokenize(["a", "b", "a much longer text here", "c"], 64)
    lengths = batch["attention_mask"].sum(1).tolist()
    groups = plan_rows(lengths, chunk_size=2, chunk_tokens=0)
    assert groups == [[0, 1], [2, 3]]
    chunks = [make_chunk(batch, g, packed=False) for g in groups]
    assert chunks[0]["input_ids"].shape[1] == max(lengths[:2])
    assert chunks[1]["input_ids"].shape[1] == max(lengths[2:])


def test_rng_replay_reproduces_dropout(tiny_decoder):
    torch.manual_seed(0)
    emb = Embedder.from_pretrained(
        tiny_decoder, device="cpu", lora=LoraSettings(r=4, alpha=8, dropout=0.5)
    )
    randomize_lora_b(emb, std=0.5)
    emb.train()
    batch = emb.tokenize(QUERIES, 32)
    state = RandState(torch.device("cpu"))
    first = emb(batch["input_ids"], batch["attention_mask"])
    second = emb(batch["input_ids"], batch["attention_mask"])
    assert not torch.allclose(first, second)  # dropout is really active
    state.restore()
    replay = emb(batch["input_ids"], batch["attention_mask"])
    torch.testing.assert_close(replay, first)


def test_false_negative_masking_and_accuracy():
    torch.manual_seed(0)
    q = torch.nn.functional.normalize(torch.randn(2, 8, dtype=torch.float64), dim=-1)
    other = torch.nn.functional.normalize(torch.randn(1, 8, dtype=torch.float64), dim=-1)
    # docs: [pos 0, pos 1, negative of query 0 (= a copy of pos 0), negative of query 1]
    d = torch.cat([q, q[:1], other])
    ids = torch.tensor([10, 11, 10, 12])
    masked = contrastive_loss(q, d, 0.02, ids)
    unmasked = contrastive_loss(q, d, 0.02, None)
    assert masked.loss < unmasked.loss and masked.accuracy == 1.0
    logits = (q @ d.T) / 0.02
    logits[0, 2] = float("-inf")
    expected = torch.nn.functional.cross_entropy(logits, torch.tensor([0, 1]))
    torch.testing.assert_close(masked.loss, expected)


def test_grad_cache_with_activation_checkpointing_and_dropout(tiny_decoder):
    """Checkpointed layers recompute in backward; with RNG replay the gradients still equal
    those of the same cached step without checkpointing (dropout active in both)."""

    def run(checkpointing: bool):
        torch.manual_seed(0)
        emb = Embedder.from_pretrained(
            tiny_decoder,
            device="cpu",
            dtype=torch.float64,
            lora=LoraSettings(r=4, alpha=8, dropout=0.3),
            gradient_checkpointing=checkpointing,
        )
        randomize_lora_b(emb)
        emb.train()
        assert is_activation_checkpointing(emb.base_model) == checkpointing
        torch.manual_seed(1)
        _, grads, _ = _step(emb, chunk_size=2)
        return grads

    plain, checkpointed = run(False), run(True)
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize("lora", [True, False])
def test_token_budget_chunks_equal_full_batch_step(tiny_decoder, lora):
    """Length-sorted chunks under a padded-token budget (rows reordered, chunks of different
    sizes) still give the full-batch gradients: the embeddings are put back in batch order."""
    queries = [f"q {i} " + "word " * (i % 5 * 3) for i in range(8)]
    docs = [f"d {i} " + "text " * ((i * 7) % 11) for i in range(16)]
    ref_model = _model(tiny_decoder, lora)
    emb = copy.deepcopy(ref_model)
    q, d = ref_model.tokenize(queries, 64), ref_model.tokenize(docs, 96)
    ids = torch.arange(len(docs))
    groups = plan_rows(d["attention_mask"].sum(1).tolist(), chunk_size=5, chunk_tokens=120)
    chunks = [make_chunk(d, g, packed=False) for g in groups]
    order = [i for g in groups for i in g]
    assert sorted(order) == list(range(len(docs)))  # every row exactly once
    assert len({c["input_ids"].shape[0] for c in chunks}) > 1  # uneven chunks
    assert order != sorted(order)  # rows really were reordered
    assert all(c["input_ids"].numel() <= 120 or c["input_ids"].shape[0] == 1 for c in chunks)

    def grads(model, **chunking):
        grad_cache_step(
            model,
            q,
            d,
            lambda a, b: contrastive_loss(a, b, 0.05, ids),
            device=torch.device("cpu"),
            **chunking,
        )
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    ref = grads(ref_model, chunk_size=0)
    got = grads(emb, chunk_size=5, chunk_tokens=120)
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], atol=1e-6, rtol=1e-6)


def test_split_to_count_keeps_rows_and_order(tiny_decoder):
    emb = _model(tiny_decoder, lora=False)
    batch = emb.tokenize(DOCS + NEGS, 48)
    groups = plan_rows(batch["attention_mask"].sum(1).tolist(), 0, chunk_tokens=10_000)
    assert len(groups) == 1
    split = split_to_count(groups, 5)
    assert len(split) == 5
    assert [i for g in split for i in g] == groups[0]  # same rows, same order
    for g in split:  # each piece trimmed to its own longest row
        c = make_chunk(batch, g, packed=False)
        assert int(c["attention_mask"].sum(1).max()) == c["input_ids"].shape[1]
    with pytest.raises(ValueError):
        split_to_count(split, len(DOCS + NEGS) + 1)


def test_token_budget_chunk_counts_match_across_ranks(tiny_decoder, monkeypatch):
    """Pretend another rank needs more chunks (as with other lengths under FSDP): this rank
    splits its chunks to match, and the gradients still equal the full-batch step's."""
    import conretriever.training.grad_cache as gc

    ref_model = _model(tiny_decoder, lora=True)
    emb = copy.deepcopy(ref_model)
    q, d, ids = _batches(ref_model)
    n_forwards = []
    monkeypatch.setattr(gc, "world_size", lambda: 2)
    monkeypatch.setattr(gc.runtime, "most_over_ranks", lambda *counts: tuple(c + 3 for c in counts))
    hook = emb.register_forward_pre_hook(lambda *a: n_forwards.append(1))

    def loss(a, b):
        return contrastive_loss(a, b, 0.05, ids)

    grad_cache_step(emb, q, d, loss, 0, torch.device("cpu"), chunk_tokens=200)
    hook.remove()
    monkeypatch.undo()
    plain_chunks = sum(
        len(plan_rows(b["attention_mask"].sum(1).tolist(), 0, chunk_tokens=200)) for b in (q, d)
    )
    # embed + replay, 3 more chunks per side; the last chunk is embedded once
    assert len(n_forwards) == 2 * (plain_chunks + 6) - 1
    grad_cache_step(ref_model, q, d, loss, 0, torch.device("cpu"))
    for (name, p), (_, r) in zip(emb.named_parameters(), ref_model.named_parameters(), strict=True):
        if p.requires_grad:
            torch.testing.assert_close(p.grad, r.grad, atol=1e-6, rtol=1e-6, msg=name)


@pytest.mark.parametrize("lora", [True, False])
@pytest.mark.parametrize(
    "chunking",
    [{"chunk_size": 0}, {"chunk_size": 3}, {"chunk_size": 4, "chunk_tokens": 90}],
    ids=["plain", "rows", "token-budget"],
)
def test_packed_step_equals_padded_step(tiny_decoder, lora, chunking, monkeypatch):
    """Packed (padding-free) chunks give the padded full-batch step's gradients (float64)."""
    import conretriever.model.packing as packing

    queries = [f"q {i} " + "word " * (i % 4 * 3) for i in range(6)]
    docs = [f"d {i} " + "text " * ((i * 5) % 9) for i in range(12)]
    ref_model = _model(tiny_decoder, lora)
    emb = copy.deepcopy(ref_model)
    q, d = ref_model.tokenize(queries, 64), ref_model.tokenize(docs, 64)
    ids = torch.arange(len(docs))
    calls = []
    original = packing._packed_attention_forward
    monkeypatch.setattr(
        packing, "_packed_attention_forward", lambda *a, **k: calls.append(1) or original(*a, **k)
    )

    def grads(model, **kwargs):
        out = grad_cache_step(
            model,
            q,
            d,
            lambda a, b: contrastive_loss(a, b, 0.05, ids),
            device=torch.device("cpu"),
            **kwargs,
        )
        return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    ref_out, ref = grads(ref_model, chunk_size=0)
    assert not calls
    out, got = grads(emb, packed=True, **chunking)
    assert calls  # the packed attention really ran
    torch.testing.assert_close(out.loss, ref_out.loss, atol=1e-9, rtol=1e-9)
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], atol=1e-6, rtol=1e-6, msg=name)
