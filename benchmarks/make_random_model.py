"""A random-initialised model folder of a named shape, for checks that need the training loop on
real sizes without any download (the GPU machine has no model hub).

    python benchmarks/make_random_model.py --shape mistral-7b --output /tmp/mistral7b

Writes the backbone (``AutoModel``, bf16 on a GPU, fp32 on a CPU) built on the device, and a
character-level WordPiece tokenizer (every text tokenizes; ids far below any vocabulary size).
``--shape``: mistral-7b | gemma-3-270m | tiny (see ``encode_throughput.model_config``).
"""

from __future__ import annotations

import argparse
import string
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from encode_throughput import model_config  # noqa: E402


def char_tokenizer():
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    chars = list(string.ascii_lowercase + string.digits + ".,:?!'-")
    vocab = ["<pad>", "<s>", "</s>", "<unk>"] + chars + ["##" + c for c in chars]
    tok = Tokenizer(models.WordPiece({w: i for i, w in enumerate(vocab)}, unk_token="<unk>",
                                     max_input_chars_per_word=100))  # fmt: skip
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece()
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", unk_token="<unk>")  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", default="mistral-7b")
    parser.add_argument("--output", required=True)
    args = parser.parse_args()
    from transformers import AutoModel

    out = Path(args.output)
    if (out / "config.json").exists():
        print(f"{out}: exists")
        return 0
    config = model_config(args.shape)
    config.pad_token_id, config.bos_token_id, config.eos_token_id = 0, 1, 2
    cuda = torch.cuda.is_available()
    torch.manual_seed(0)
    with torch.device("cuda" if cuda else "cpu"):
        model = AutoModel.from_config(config, dtype=torch.bfloat16 if cuda else torch.float32)
    model.save_pretrained(out)
    char_tokenizer().save_pretrained(out)
    print(f"{out}: {sum(p.numel() for p in model.parameters()) / 1e9:.2f}B parameters")
    return 0


if __name__ == "__main__":
    sys.exit(main())
