"""Command line: ``conretriever <command> [flags]``.

Each command lives in the module that owns its work and exposes ``main(argv) -> int``; this file
only dispatches, importing the target lazily so that ``conretriever synth`` never pays for torch
and ``conretriever train`` never imports mteb or openai.
"""

from __future__ import annotations

import importlib
import os
import sys

# command -> ("module:function", one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("conretriever.train:main", "contrastive training (python or torchrun)"),
    "eval": ("conretriever.evaluate:main", "e5-style BEIR/MTEB retrieval evaluation"),
    "encode": ("conretriever.modeling:encode_main", "encode a text/JSONL file to a .npy matrix"),
    "brainstorm": ("conretriever.synth.brainstorm:main", "synthetic data step 1: task ideas"),
    "generate": ("conretriever.synth.generate:main", "synthetic data step 2: examples"),
    "convert-synthetic": (
        "conretriever.synth.generate:convert_main",
        "synthetic examples -> training JSONL",
    ),
    "serve-llm": (
        "conretriever.synth.local_llm:main",
        "OpenAI-compatible chat server for a local model (synthetic data offline)",
    ),
    "compare": ("conretriever.report:compare_main", "side-by-side table of eval output folders"),
    "convert": ("conretriever.convert:main", "Hugging Face / BEIR datasets -> training JSONL"),
    "mine": ("conretriever.mining:main", "mine hard negatives with any Embedder"),
    "decontaminate": ("conretriever.mining:decontaminate_main", "training/eval overlap report"),
}


def _usage() -> str:
    lines = ["usage: conretriever <command> [flags]   (conretriever <command> --help)", ""]
    width = max(len(c) for c in COMMANDS)
    lines += [f"  {cmd.ljust(width)}  {help_}" for cmd, (_, help_) in COMMANDS.items()]
    return "\n".join(lines)


def _quiet_library_bars() -> None:
    """In a log file, the tqdm bars of transformers, the hub and gguf are carriage-return noise;
    our own progress (``conretriever.progress``) writes plain lines there instead. tqdm and the
    hub read these variables when they are imported, which happens after this point."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TQDM_DISABLE", "1")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"conretriever: unknown command {command!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    if not sys.stderr.isatty():
        _quiet_library_bars()
    module_name, func_name = COMMANDS[command][0].split(":")
    func = getattr(importlib.import_module(module_name), func_name)
    return int(func(rest) or 0)
