"""The fused LoRA forward (conretriever.model.lora) computes what peft's forward computes."""

from __future__ import annotations

import pytest
import torch
from conftest import make_decoder_dir, randomize_lora_b
from peft.tuners.lora.layer import Linear as LoraLinear

from conretriever.model.embedder import Embedder

TEXTS = ["a short one", "a somewhat longer text about proteins and cells", "x"]


def _lora_layers(embedder: Embedder) -> list[LoraLinear]:
    return [m for m in embedder.modules() if isinstance(m, LoraLinear)]


def _peft_forward(embedder: Embedder) -> None:
    """Back to peft's own forward on every adapted layer (the fused one is an instance
    attribute; the class keeps peft's)."""
    for layer in _lora_layers(embedder):
        del layer.forward


def _embed_and_grads(embedder: Embedder, seed: int) -> tuple[torch.Tensor, dict]:
    batch = embedder.tokenize(TEXTS, 32)
    torch.manual_seed(seed)  # the same dropout masks on both sides
    emb = embedder(batch["input_ids"], batch["attention_mask"])
    (emb * torch.linspace(-1, 1, emb.numel()).view_as(emb).to(emb.dtype)).sum().backward()
    grads = {n: p.grad.clone() for n, p in embedder.named_parameters() if p.grad is not None}
    embedder.zero_grad(set_to_none=True)
    return emb.detach(), grads


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_the_fused_forward_gives_peft_vectors_and_gradients(tmp_path, monkeypatch, arch, dropout):
    path = make_decoder_dir(tmp_path / arch, arch)
    model = Embedder.from_pretrained(
        path, lora={"r": 4, "alpha": 8, "dropout": dropout}, dtype=torch.float64, device="cpu"
    )
    randomize_lora_b(model)
    model.train()
    layers = _lora_layers(model)
    assert layers and all("forward" in vars(layer) for layer in layers)

    peft_calls = []
    peft_forward = LoraLinear.forward
    monkeypatch.setattr(
        LoraLinear, "forward", lambda *a, **k: peft_calls.append(1) or peft_forward(*a, **k)
    )
    fused, fused_grads = _embed_and_grads(model, seed=3)
    assert not peft_calls  # every adapted layer took the fused path
    _peft_forward(model)
    reference, reference_grads = _embed_and_grads(model, seed=3)
    assert len(peft_calls) == len(layers)

    torch.testing.assert_close(fused, reference, rtol=0, atol=1e-12)
    assert fused_grads.keys() == reference_grads.keys()
    assert any("lora_A" in n for n in fused_grads) and any("lora_B" in n for n in fused_grads)
    for name, grad in reference_grads.items():
        assert grad.abs().max() > 0, name
        torch.testing.assert_close(fused_grads[name], grad, rtol=1e-9, atol=1e-12, msg=name)


def test_merged_or_disabled_adapters_keep_peft_behaviour(tmp_path):
    """Outside the plain case the layer runs peft's forward: merged weights are not added twice,
    and a disabled adapter adds nothing."""
    path = make_decoder_dir(tmp_path / "llama")
    base = Embedder.from_pretrained(path, dtype=torch.float64, device="cpu").eval()
    model = Embedder.from_pretrained(
        path, lora={"r": 4, "alpha": 8, "dropout": 0.0}, dtype=torch.float64, device="cpu"
    ).eval()
    randomize_lora_b(model)
    batch = model.tokenize(TEXTS, 32)
    with torch.no_grad():
        plain = base(batch["input_ids"], batch["attention_mask"])
        adapted = model(batch["input_ids"], batch["attention_mask"])
        assert (adapted - plain).abs().max() > 1e-3  # the adapter changes the vectors
        with model.backbone.disable_adapter():
            torch.testing.assert_close(
                model(batch["input_ids"], batch["attention_mask"]), plain, rtol=0, atol=1e-12
            )
        model.backbone.merge_adapter()
        merged = model(batch["input_ids"], batch["attention_mask"])
    torch.testing.assert_close(merged, adapted, rtol=0, atol=1e-10)


def test_under_bf16_autocast_the_fused_forward_matches_peft_to_bf16_rounding(tmp_path):
    path = make_decoder_dir(tmp_path / "gemma3", "gemma3")
    model = Embedder.from_pretrained(
        path, lora={"r": 4, "alpha": 8, "dropout": 0.0}, dtype=torch.float32, device="cpu"
    )
    randomize_lora_b(model)
    batch = model.tokenize(TEXTS, 32)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        fused = model(batch["input_ids"], batch["attention_mask"])
        _peft_forward(model)
        reference = model(batch["input_ids"], batch["attention_mask"])
    cosines = (fused * reference).sum(-1)  # unit vectors
    assert cosines.min() > 0.999
