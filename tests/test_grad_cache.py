"""GradCache gives the same gradients and updated weights as the plain full-batch step."""

from __future__ import annotations

import copy

import pytest
import torch

from conretriever.grad_cache import RandState, grad_cache_step, split_chunks
from conretriever.loss import contrastive_loss
from conretriever.modeling import Embedder, LoraSettings

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
    if lora:  # B = 0 at init would make LoRA gradients trivial for A
        with torch.no_grad():
            for name, p in emb.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.1)
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


def test_chunks_are_trimmed_to_their_longest_sequence(tiny_decoder):
    emb = _model(tiny_decoder, lora=False)
    batch = emb.tokenize(["a", "b", "a much longer text here", "c"], 64)
    chunks = split_chunks(batch, 2)
    lengths = batch["attention_mask"].sum(1).tolist()
    assert chunks[0]["input_ids"].shape[1] == max(lengths[:2])
    assert chunks[1]["input_ids"].shape[1] == max(lengths[2:])


def test_rng_replay_reproduces_dropout(tiny_decoder):
    torch.manual_seed(0)
    emb = Embedder.from_pretrained(
        tiny_decoder, device="cpu", lora=LoraSettings(r=4, alpha=8, dropout=0.5)
    )
    with torch.no_grad():  # B = 0 at init would hide the dropout on LoRA's input
        for name, p in emb.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
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
        with torch.no_grad():
            for name, p in emb.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.1)
        emb.train()
        assert emb.base_model.is_gradient_checkpointing == checkpointing
        torch.manual_seed(1)
        _, grads, _ = _step(emb, chunk_size=2)
        return grads

    plain, checkpointed = run(False), run(True)
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], atol=1e-9, rtol=1e-9)
