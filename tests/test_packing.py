"""Packed (padding-free) encoding gives the vectors of padded encoding.

On CPU the packed attention runs its exact per-text SDPA loop, so packed and padded vectors agree
to float32 rounding; the GPU test (marked ``gpu``) checks the varlen FlashAttention kernel in
bf16 against the padded path. Each test also proves the packed attention really ran (once per
layer per batch): transformers can detect packed rows from ``position_ids`` by itself, which
would make a silently ignored implementation look correct.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from conftest import make_decoder_dir, save_tiny_decoder

import conretriever.model.packing as packing
from conretriever.model.batching import token_budget_batches
from conretriever.model.embedder import Embedder

WORDS = "packed rows restart positions attention stays inside every text".split()


def _texts(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choices(WORDS, k=rng.choice([1, 2, 6, 15, 40]))) for _ in range(n)]


@pytest.fixture
def count_calls(monkeypatch):
    calls = []
    real = packing._packed_attention_forward

    def counting(*args, **kwargs):
        calls.append(args[1].shape[2])  # packed row length T
        return real(*args, **kwargs)

    monkeypatch.setattr(packing, "_packed_attention_forward", counting)
    return calls


def _windowed_gemma(path):
    """Gemma-3 with a 6-token sliding window: the windowed layers' band is exercised."""
    from transformers import AutoConfig, AutoModel

    make_decoder_dir(path, arch="gemma3")
    config = AutoConfig.from_pretrained(path)
    config.sliding_window = 6
    config.layer_types = ["sliding_attention", "full_attention"]
    torch.manual_seed(1)
    AutoModel.from_config(config, dtype=torch.float32).save_pretrained(path)
    return path


@pytest.mark.parametrize("arch", ["llama", "mistral", "gemma3-window"])
@pytest.mark.parametrize("pooling", ["last", "mean"])
def test_packed_equals_padded(tmp_path, arch, pooling, count_calls):
    path = tmp_path / arch
    folder = _windowed_gemma(path) if arch == "gemma3-window" else make_decoder_dir(path, arch)
    emb = Embedder.from_pretrained(folder, {"pooling": pooling}, device="cpu", dtype="float32")
    texts = _texts(25)
    padded = emb.encode(texts, role="passage", packed=False)
    assert not count_calls
    got = emb.encode(texts, role="passage", packed=True, max_tokens=400)
    np.testing.assert_allclose(got, padded, atol=1e-5, rtol=0)
    layers = emb.base_model.config.num_hidden_layers
    assert len(count_calls) % layers == 0 and len(count_calls) // layers >= 2  # several batches
    assert emb.base_model.config._attn_implementation == "sdpa"  # restored afterwards


def test_sliding_window_is_applied(tmp_path):
    """Without the band, a text longer than the window would see too far back: the windowed
    model's packed vector must differ from the same weights with the window removed."""
    folder = _windowed_gemma(tmp_path / "g")
    emb = Embedder.from_pretrained(folder, device="cpu", dtype="float32")
    long_text = [" ".join(WORDS * 3)]
    windowed = emb.encode(long_text, role="passage", packed=True)
    for layer in emb.base_model.layers:
        layer.self_attn.sliding_window = None
    unwindowed = emb.encode(long_text, role="passage", packed=True)
    assert np.abs(windowed - unwindowed).max() > 1e-3


def test_packed_batches_hold_the_real_token_budget(tiny_decoder, count_calls):
    emb = Embedder.from_pretrained(tiny_decoder, device="cpu")
    texts = _texts(40, seed=3)
    emb.encode(texts, role="passage", packed=True, max_tokens=300)
    lengths = [len(x) for x in emb.tokenize(texts, 512, padding=False)["input_ids"]]
    layers = emb.base_model.config.num_hidden_layers
    rows = count_calls[::layers]  # one packed row length per batch
    assert sum(rows) == sum(lengths)  # every real token once, no padding at all
    assert all(t <= 300 for t in rows)
    batches = token_budget_batches(lengths, 256, 300, packed=True)
    assert [sum(lengths[i] for i in b) for b in batches] == rows


def test_pack_and_pool_layout():
    ids, positions, cu, longest = packing.pack([[5, 6, 7], [8], [9, 10]])
    assert ids.tolist() == [[5, 6, 7, 8, 9, 10]]
    assert positions.tolist() == [[0, 1, 2, 0, 0, 1]]
    assert cu.tolist() == [0, 3, 4, 6] and cu.dtype == torch.int32 and longest == 3
    hidden = torch.arange(12, dtype=torch.float32).view(6, 2)
    assert packing.pool_packed(hidden, cu, "last").tolist() == [[4, 5], [6, 7], [10, 11]]
    assert packing.pool_packed(hidden, cu, "cls").tolist() == [[0, 1], [6, 7], [8, 9]]
    assert packing.pool_packed(hidden, cu, "mean").tolist() == [[2, 3], [6, 7], [9, 10]]
    with pytest.raises(ValueError, match="empty"):
        packing.pack([[1], []])


def test_encoders_refuse_packing(tiny_encoder):
    emb = Embedder.from_pretrained(tiny_encoder, device="cpu")
    assert not emb.packing_default()
    with pytest.raises(ValueError, match="decoder"):
        emb.encode(["a text"], role="passage", packed=True)


def test_attention_implementation_restored_after_an_error(tiny_decoder):
    emb = Embedder.from_pretrained(tiny_decoder, device="cpu")
    with pytest.raises(ValueError):
        emb.forward_packed([[1, 5, 2], []])
    with pytest.raises(RuntimeError, match="boom"), packing.packed_attention(emb.base_model):
        assert emb.base_model.config._attn_implementation == packing.ATTN_NAME
        raise RuntimeError("boom")
    assert emb.base_model.config._attn_implementation == "sdpa"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_varlen_kernel_matches_padded_in_bf16(tmp_path, count_calls):
    from transformers import MistralConfig

    save_tiny_decoder(
        tmp_path,
        MistralConfig,
        hidden_size=512,
        intermediate_size=1024,
        num_hidden_layers=4,
        num_attention_heads=8,
    )
    emb = Embedder.from_pretrained(tmp_path, device="cuda", dtype="bfloat16")
    assert emb.packing_default()  # the fast path is what users get on a GPU
    texts = _texts(64, seed=5)
    padded = emb.encode(texts, role="passage", packed=False)
    packed = emb.encode(texts, role="passage", max_tokens=2048)
    assert count_calls  # the varlen path ran
    cos = (padded * packed).sum(1)
    diff = np.abs(padded - packed).max()
    print(f"bf16 packed vs padded: max |diff| {diff:.2e}, min cos {cos.min():.6f}")
    assert cos.min() > 0.999
    np.testing.assert_allclose(packed, padded, atol=1e-2, rtol=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_varlen_kernel_matches_padded_for_a_gemma3_shape_in_bf16(tmp_path, count_calls):
    """The embedded model's attention shape through the varlen kernel: head_dim 256, 4 query
    heads over 1 key/value head, query_pre_attn_scalar scaling, and a sliding window shorter
    than the longest texts (so the kernel's window is exercised, unlike Gemma-3-270M's 512)."""
    from transformers import Gemma3TextConfig

    save_tiny_decoder(
        tmp_path,
        Gemma3TextConfig,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=256,
        query_pre_attn_scalar=256,
        sliding_window=24,
    )
    emb = Embedder.from_pretrained(tmp_path, device="cuda", dtype="bfloat16")
    assert emb.packing_default()
    texts = _texts(64, seed=7)
    padded = emb.encode(texts, role="passage", packed=False)
    packed = emb.encode(texts, role="passage", max_tokens=2048)
    assert count_calls
    cos = (padded * packed).sum(1)
    print(f"gemma3 bf16 packed vs padded: min cos {cos.min():.6f}")
    assert cos.min() > 0.999


def test_softcapped_attention_is_not_packed(tmp_path):
    """Gemma-2 soft-caps attention logits, which the varlen kernel does not: never packed by
    default, and asking for it fails loudly instead of returning wrong vectors."""
    from transformers import Gemma2Config

    save_tiny_decoder(tmp_path, Gemma2Config, head_dim=8)
    emb = Embedder.from_pretrained(tmp_path, device="cpu")
    assert not packing.packable(emb.base_model.config) and not emb.packing_default()
    with pytest.raises(NotImplementedError, match="packed=False"):
        emb.encode(["a text"], role="passage", packed=True)
