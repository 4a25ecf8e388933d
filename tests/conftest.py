"""Shared fixtures: tiny random-init decoders and encoders built from a config (no download).

The tokenizer is a character-level WordPiece (every lowercase word splits into letters), so any
test text tokenizes without unknown tokens and lengths are predictable.
"""

from __future__ import annotations

import os
import string
import sys
from pathlib import Path

import pytest
import torch

# Scripts run by tests call `python` / `conretriever`: make them this interpreter's, as an
# activated venv would, and never wait on a model hub we cannot reach.
os.environ["PATH"] = os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# "auto" precision depends on the CPU (conretriever.precision); tests must not. float32 on every
# machine; the precision tests set the detection themselves.
os.environ["CONRETRIEVER_CPU_BF16"] = "0"

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
if not SHARED_DATA.exists():  # CI clones the repo next to a copy of shared/
    SHARED_DATA = Path(os.environ.get("CONRETRIEVER_SHARED_DATA", "/work/shared/data"))

SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]


def randomize_lora_b(embedder, std: float = 0.1) -> None:
    """Draw LoRA's B matrices from N(0, std): peft starts them at 0, which makes the gradient of
    every A zero and hides dropout on LoRA's input, so tests of LoRA gradients would be trivial."""
    with torch.no_grad():
        for name, p in embedder.named_parameters():
            if "lora_B" in name:
                p.normal_(0, std)


def make_tokenizer(bos: bool = True):
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    chars = list(string.ascii_lowercase + string.digits + ".,:?!'-")
    vocab = SPECIALS + chars + ["##" + c for c in chars]
    tok = Tokenizer(
        models.WordPiece(
            {w: i for i, w in enumerate(vocab)}, unk_token="<unk>", max_input_chars_per_word=100
        )
    )
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece()
    if bos:
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
    )


def save_tiny_decoder(
    path: Path, config_class, seed: int = 0, padding_side: str = "right", **sizes
):
    """A random-init decoder of ``config_class`` with the character tokenizer, saved to ``path``;
    ``sizes`` override the tiny defaults (hidden 32, 2 layers, 4 heads, 2 kv heads)."""
    from transformers import AutoModel

    tokenizer = make_tokenizer()
    tokenizer.padding_side = padding_side
    kwargs = dict(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    kwargs.update(sizes)
    torch.manual_seed(seed)
    AutoModel.from_config(config_class(**kwargs), dtype=torch.float32).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def make_decoder_dir(path: Path, arch: str = "llama", seed: int = 0, padding_side: str = "right"):
    from transformers import Gemma3TextConfig, LlamaConfig, MistralConfig

    config_class, sizes = {
        "llama": (LlamaConfig, {}),
        "mistral": (MistralConfig, {}),
        "gemma3": (Gemma3TextConfig, {"head_dim": 8}),
    }[arch]
    return save_tiny_decoder(path, config_class, seed, padding_side, **sizes)


def make_encoder_dir(path: Path, seed: int = 0):
    from transformers import AutoModel, BertConfig, BertTokenizerFast

    chars = list(string.ascii_lowercase + string.digits + ".,:?!'-")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + chars + ["##" + c for c in chars]
    (path / "vocab").mkdir(parents=True, exist_ok=True)
    vocab_file = path / "vocab" / "vocab.txt"
    vocab_file.write_text("\n".join(vocab) + "\n")
    tokenizer = BertTokenizerFast(vocab_file=str(vocab_file))
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=128,
    )
    torch.manual_seed(seed)
    AutoModel.from_config(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_decoder(tmp_path_factory) -> Path:
    return make_decoder_dir(tmp_path_factory.mktemp("tiny_llama"))


@pytest.fixture(scope="session")
def tiny_encoder(tmp_path_factory) -> Path:
    return make_encoder_dir(tmp_path_factory.mktemp("tiny_bert"))


@pytest.fixture
def shared_data() -> Path:
    if not (SHARED_DATA / "scifact" / "corpus.jsonl").exists():
        pytest.skip("shared data folder not present")
    return SHARED_DATA
