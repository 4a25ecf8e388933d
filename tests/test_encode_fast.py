"""Token-budget encoding gives the vectors of one-text-at-a-time encoding, in input order.

``Embedder.encode`` sorts texts by length and batches them by a padded-token budget; these tests
pin that the batching is invisible in the output (fp32 on CPU: within 1e-6 of encoding each text
alone with no padding at all) and that the batches really respect the budget.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from conftest import make_decoder_dir

from conretriever.model.batching import token_budget_batches
from conretriever.model.embedder import Embedder, _pad_right

WORDS = "retrieval dense vector query passage model token batch budget sort length".split()


def _texts(n: int, seed: int = 0) -> list[str]:
    """Texts of very different lengths (1 to 60 words), in shuffled order."""
    rng = random.Random(seed)
    return [" ".join(rng.choices(WORDS, k=rng.choice([1, 2, 5, 12, 30, 60]))) for _ in range(n)]


def _alone(emb: Embedder, text: str) -> np.ndarray:
    """Reference: one text, no padding, no mask; pooled by hand (eval mode: no dropout)."""
    emb.eval()
    ids = emb.tokenize([text], emb.settings.doc_max_length, padding=False)["input_ids"][0]
    with torch.no_grad():
        hidden = emb.backbone(input_ids=torch.tensor([ids])).last_hidden_state[0]
    mode = emb.settings.pooling
    vec = hidden[-1] if mode == "last" else hidden[0] if mode == "cls" else hidden.mean(0)
    return torch.nn.functional.normalize(vec.float(), dim=-1).numpy()


@pytest.fixture(scope="module")
def gemma_dir(tmp_path_factory):
    return make_decoder_dir(tmp_path_factory.mktemp("tiny_gemma3"), arch="gemma3")


@pytest.mark.parametrize("max_tokens,batch_size", [(64, 256), (200, 4), (None, 3), (10**6, 256)])
def test_encode_equals_one_text_at_a_time(tiny_decoder, max_tokens, batch_size):
    emb = Embedder.from_pretrained(tiny_decoder, device="cpu", dtype="float32")
    texts = _texts(23)
    got = emb.encode(texts, role="passage", batch_size=batch_size, max_tokens=max_tokens)
    ref = np.stack([_alone(emb, t) for t in texts])  # input order: row i is text i
    assert got.dtype == np.float32 and got.shape == (23, emb.dim)
    np.testing.assert_allclose(got, ref, atol=1e-6, rtol=0)


@pytest.mark.parametrize("fixture", ["gemma_dir", "tiny_encoder"])
def test_other_architectures_and_pooling(request, fixture):
    """Gemma-3 (sliding-window layers) with last-token pooling; BERT with mean pooling, whose
    absolute positions would break under left padding."""
    emb = Embedder.from_pretrained(request.getfixturevalue(fixture), device="cpu")
    texts = _texts(17, seed=1)
    got = emb.encode(texts, role="passage", max_tokens=96)
    ref = np.stack([_alone(emb, t) for t in texts])
    np.testing.assert_allclose(got, ref, atol=1e-6, rtol=0)


def test_float64_is_exact_to_rounding(tiny_decoder):
    emb = Embedder.from_pretrained(tiny_decoder, device="cpu", dtype="float64")
    texts = _texts(12, seed=2)
    got = emb._encode_ids(
        emb.tokenize(texts, 512, padding=False)["input_ids"], batch_size=8, max_tokens=128
    )
    ref = np.stack([_alone(emb, t) for t in texts])
    np.testing.assert_allclose(got, ref, atol=1e-7, rtol=0)  # float32 output of float64 math


def test_batches_respect_the_token_budget(tiny_decoder):
    """Watch the backbone's inputs: each batch is padded only to its own longest text, holds at
    most max_tokens padded tokens and batch_size rows, and short texts share bigger batches."""
    emb = Embedder.from_pretrained(tiny_decoder, device="cpu")
    texts = _texts(40, seed=3)
    lengths = sorted(
        (len(x) for x in emb.tokenize(texts, 512, padding=False)["input_ids"]), reverse=True
    )
    shapes = []
    hook = emb.backbone.register_forward_pre_hook(
        lambda mod, args, kwargs: shapes.append(kwargs["attention_mask"].clone()),
        with_kwargs=True,
    )
    try:
        emb.encode(texts, role="passage", batch_size=16, max_tokens=300)
    finally:
        hook.remove()
    assert sum(m.shape[0] for m in shapes) == len(texts)
    seen = 0
    for mask in shapes:
        rows, width = mask.shape
        assert int(mask.sum(1).max()) == width  # no padding beyond the batch's longest text
        assert rows <= 16 and (rows * width <= 300 or rows == 1)
        assert mask.sum(1).tolist() == lengths[seen : seen + rows]  # longest first
        seen += rows
    assert shapes[-1].shape[0] > shapes[0].shape[0]  # short texts: more per batch


@pytest.mark.parametrize("dtype, budget", [(torch.float32, 1024), (torch.bfloat16, 4096)])
def test_the_auto_budget_on_a_cpu_follows_the_weights_dtype(tiny_decoder, dtype, budget):
    """bf16 matrix products pay a fixed cost per call on a CPU, so bf16 weights get bigger
    batches than fp32 ones: a batch fills up to the budget and no further."""
    emb = Embedder.from_pretrained(tiny_decoder, device="cpu", dtype=dtype)
    texts = ["abcdefghij klmnopqrst uvwxyz"] * 600  # 600 texts of one length
    length = len(emb.tokenize(texts[:1], 512, padding=False)["input_ids"][0])
    rows = []
    hook = emb.backbone.register_forward_pre_hook(
        lambda mod, args, kwargs: rows.append(kwargs["input_ids"].shape[0]), with_kwargs=True
    )
    try:
        emb.encode(texts, role="passage", batch_size=1000)
    finally:
        hook.remove()
    assert rows[0] == budget // length


def testtoken_budget_batches_cover_every_index_once():
    rng = random.Random(0)
    lengths = [rng.randint(1, 100) for _ in range(500)]
    batches = token_budget_batches(lengths, max_sequences=32, max_tokens=1000)
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(500))
    assert [lengths[i] for i in flat] == sorted(lengths, reverse=True)
    for b in batches:
        assert len(b) <= 32 and (len(b) * lengths[b[0]] <= 1000 or len(b) == 1)
    # a text longer than the budget still gets encoded, alone
    assert token_budget_batches([5, 2000, 5], 8, 1000) == [[1], [0, 2]]
    with pytest.raises(ValueError):
        token_budget_batches([1], 0, 10)


def test_pad_right():
    ids, mask = _pad_right([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0]]
    assert mask.tolist() == [[1, 1, 1], [1, 0, 0]]


def test_empty_and_single_string(tiny_decoder):
    emb = Embedder.from_pretrained(tiny_decoder, device="cpu")
    assert emb.encode([], role="passage").shape == (0, emb.dim)
    np.testing.assert_allclose(
        emb.encode("two words", role="passage")[0], _alone(emb, "two words"), atol=1e-6
    )
