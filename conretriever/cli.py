"""Command line: ``conretriever <command> [flags]`` (also ``python -m conretriever``).

One command layer for every command. A command is a settings dataclass (the options, with their
defaults and checks) and a ``run(settings) -> int`` function, both named in :data:`COMMANDS`;
:func:`main` parses the flags (plus an optional ``--config`` YAML) into the dataclass with
``conretriever.options``, runs it, and handles errors one way:

* the project's own errors (``conretriever.errors.UserError``: bad flags, bad data, a refused
  output) print ``conretriever <command>: error: <message>`` and exit with status 2, with no
  traceback (``--debug`` or ``CONRETRIEVER_DEBUG=1`` shows it); under torchrun only rank 0
  prints;
* Ctrl-C exits with 130 after one line.

The target modules are imported only when their command runs, so ``conretriever brainstorm``
never pays for torch and ``conretriever train`` never imports mteb or openai.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
from dataclasses import dataclass


@dataclass(frozen=True)
class Command:
    settings: str  # "module:Class"
    run: str  # "module:function"
    help: str


COMMANDS: dict[str, Command] = {
    "train": Command(
        "conretriever.training.config:TrainSettings",
        "conretriever.training.loop:main",
        "contrastive training of a retriever (python, or torchrun for many processes)",
    ),
    "eval": Command(
        "conretriever.evaluation.evaluate:EvalSettings",
        "conretriever.evaluation.evaluate:run",
        "e5-style BEIR/MTEB retrieval evaluation",
    ),
    "encode": Command(
        "conretriever.retrieval.encode_file:EncodeSettings",
        "conretriever.retrieval.encode_file:run",
        "encode a text/JSONL file to a .npy matrix",
    ),
    "mine": Command(
        "conretriever.retrieval.mining:MineSettings",
        "conretriever.retrieval.mining:run",
        "mine hard negatives with any embedder",
    ),
    "decontaminate": Command(
        "conretriever.data.decontam:DecontamSettings",
        "conretriever.data.decontam:run",
        "report (and drop) training rows that overlap evaluation data",
    ),
    "convert": Command(
        "conretriever.data.convert:ConvertSettings",
        "conretriever.data.convert:run",
        "Hugging Face / BEIR / MS MARCO-style datasets -> training JSONL",
    ),
    "cloze": Command(
        "conretriever.data.cloze:ClozeSettings",
        "conretriever.data.cloze:run",
        "inverse-cloze training pairs (sentence -> its passage) from unlabelled passages",
    ),
    "average": Command(
        "conretriever.model.average:AverageSettings",
        "conretriever.model.average:run",
        "average the weights of saved model folders (checkpoint averaging, model merging)",
    ),
    "compare": Command(
        "conretriever.evaluation.compare:CompareSettings",
        "conretriever.evaluation.compare:run",
        "side-by-side table (and bar chart) of eval output folders",
    ),
    "report": Command(
        "conretriever.evaluation.plots:ReportSettings",
        "conretriever.evaluation.plots:run",
        "training and evaluation curves of run folders (PNG)",
    ),
    "brainstorm": Command(
        "conretriever.synth.brainstorm:BrainstormSettings",
        "conretriever.synth.brainstorm:run",
        "synthetic data step 1: retrieval task ideas from an LLM",
    ),
    "generate": Command(
        "conretriever.synth.generate:GenerateSettings",
        "conretriever.synth.generate:run",
        "synthetic data step 2: (query, positive, hard negative) examples",
    ),
    "convert-synthetic": Command(
        "conretriever.synth.generate:ConvertSyntheticSettings",
        "conretriever.synth.generate:run_convert",
        "synthetic examples -> training JSONL (generate does it at the end)",
    ),
    "serve-llm": Command(
        "conretriever.synth.local_llm:ServeSettings",
        "conretriever.synth.local_llm:run",
        "OpenAI-compatible chat server for a local model (synthetic data offline)",
    ),
}


def _usage() -> str:
    lines = ["usage: conretriever <command> [flags]   (conretriever <command> --help)", ""]
    width = max(len(c) for c in COMMANDS)
    lines += [f"  {name.ljust(width)}  {c.help}" for name, c in COMMANDS.items()]
    return "\n".join(lines)


def _load(target: str):
    module_name, attr = target.split(":")
    return getattr(importlib.import_module(module_name), attr)


def _quiet_library_bars() -> None:
    """In a log file, the tqdm bars of transformers, the hub and gguf are carriage-return noise;
    our own progress (``conretriever.progress``) writes plain lines there instead. tqdm and the
    hub read these variables when they are imported, which happens after this point."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TQDM_DISABLE", "1")


def _is_rank0() -> bool:
    return os.environ.get("RANK", "0") == "0"


def _os_error_line(err: OSError) -> str:
    """``<file>: <reason>`` on one line for an OSError (``ConnectionError`` included)."""
    from conretriever.files import os_reason

    if err.errno is not None:
        reason = os_reason(err)
    else:  # e.g. a ConnectionError carrying only a message
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
    return f"{os.fsdecode(err.filename)}: {reason}" if err.filename else reason


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = os.environ.get("CONRETRIEVER_DEBUG", "") not in ("", "0")
    if "--debug" in argv:
        debug = True
        argv.remove("--debug")
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"conretriever: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    if not sys.stderr.isatty():
        _quiet_library_bars()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    from conretriever.errors import UserError
    from conretriever.options import parse

    command = COMMANDS[name]
    try:
        settings = parse(_load(command.settings), rest, prog=f"conretriever {name}",
                         description=command.help)  # fmt: skip
        return int(_load(command.run)(settings) or 0)
    except UserError as err:
        if debug:
            raise
        if _is_rank0():
            print(f"conretriever {name}: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # the last resort (see the module docstring)
        if debug:
            raise
        if _is_rank0():
            print(f"conretriever {name}: error: {_os_error_line(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"conretriever {name}: interrupted", file=sys.stderr)
        return 130
