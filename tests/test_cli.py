"""One command layer: every command's help, flag spellings, defaults and errors behave alike."""

from __future__ import annotations

import ast
import dataclasses
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conretriever.cli import COMMANDS, _load, main
from conretriever.options import build_parser, options, sections

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_help_names_the_command_and_lists_every_option_with_its_default(name, capsys):
    with pytest.raises(SystemExit) as done:
        main([name, "--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith(f"usage: conretriever {name}")
    for o in options(_load(COMMANDS[name].settings)):
        assert (o.flag if not o.meta["positional"] else o.name.upper()) in text or (
            o.meta["metavar"] and o.meta["metavar"] in text
        ), o.name
    assert text.count("(default:") + text.count("(required") >= len(
        [o for o in options(_load(COMMANDS[name].settings)) if not o.meta["positional"]]
    )


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_flag_takes_both_spellings(name):
    cls = _load(COMMANDS[name].settings)
    parser = build_parser(cls, prog=name)
    strings = {s for action in parser._actions for s in action.option_strings}
    for o in options(cls):
        if o.meta["positional"]:
            continue
        assert f"--{o.name}" in strings
        if "_" in o.name:
            assert f"--{o.name.replace('_', '-')}" in strings, o.name


def test_every_settings_class_has_one_suffix():
    """A command's settings and each of their sections are ``...Settings`` classes (no
    ``Config``, ``Command`` or ``Args``), so one name pattern finds them all."""
    for name, command in COMMANDS.items():
        for cls in sections(_load(command.settings)).values():
            assert cls.__name__.endswith("Settings"), (name, cls.__name__)


OUTPUT_SPELLINGS = ("output", "out", "output_dir", "out_dir")


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_command_names_its_output_output_and_takes_the_old_spellings(name, tmp_path):
    """One spelling, ``--output``, in every command that writes; ``--out``, ``--output_dir`` and
    ``--out_dir`` (what commands used before) parse to the same field."""
    cls = _load(COMMANDS[name].settings)
    names = {o.name: o for o in options(cls)}
    assert not set(names) & set(OUTPUT_SPELLINGS[1:]), name  # no command keeps an old name
    if "output" not in names:
        return
    parser = build_parser(cls, prog=name)
    positional = ["a=b"] if any(o.meta["positional"] for o in names.values()) else []
    for spelling in OUTPUT_SPELLINGS:
        for flag in {f"--{spelling}", f"--{spelling.replace('_', '-')}"}:
            parsed = parser.parse_known_args([*positional, flag, str(tmp_path / "x")])[0]
            assert parsed.output == str(tmp_path / "x"), (name, flag)


def _script_defaults(path: Path) -> dict[str, str]:
    """VAR -> default of every ``VAR="${VAR:-default}"`` line of a shell script."""
    found = {}
    for m in re.finditer(r'^(\w+)="\$\{\1:?-([^}]*)\}"', path.read_text(), re.M):
        found[m.group(1)] = m.group(2)
    return found


# Script variables that set a CLI option: (script, variable) -> (command, option)
SCRIPT_OPTIONS = {
    ("eval_mteb_beir.sh", "BATCH_SIZE"): ("eval", "batch_size"),
    ("eval_mteb_beir.sh", "OUTPUT_DIR"): ("eval", "output"),
    ("brainstorm_task.sh", "OUT_DIR"): ("brainstorm", "output"),
    ("generate_examples.sh", "OUT_DIR"): ("generate", "output"),
}


@pytest.mark.parametrize(("script", "var"), sorted(SCRIPT_OPTIONS))
def test_script_defaults_agree_with_the_cli(script, var):
    """A script either leaves an option to the CLI's default (empty) or states the same one."""
    command, option = SCRIPT_OPTIONS[(script, var)]
    default = _script_defaults(REPO / "scripts" / script)[var]
    cls = _load(COMMANDS[command].settings)
    (o,) = [o for o in options(cls) if o.name == option]
    assert default == "" or default == str(o.default()), (script, var, default, o.default())


def test_python_defaults_are_the_cli_defaults():
    """Settings built in Python (no flags) equal the parsed empty command line, for commands
    whose options all have defaults: one place for every default."""
    from conretriever.options import parse

    for name in ("train", "compare", "brainstorm", "generate", "convert-synthetic", "serve-llm"):
        cls = _load(COMMANDS[name].settings)
        if any(o.required for o in options(cls)):
            continue
        assert parse(cls, [], prog=name) == cls(), name


BAD = {
    "train": ["--learning_rate", "-1"],
    "eval": ["--model", "x", "--beir_dir", "/nonexistent/folder"],
    "encode": ["--model", "x", "--input", "/nonexistent.txt", "--output", "/tmp/never.npy"],
    "mine": ["--model", "x", "--data", "d.jsonl", "--corpus", "c", "--out", "o", "--window",
             "0-3"],
    "decontaminate": ["--data", "/nonexistent.jsonl"],
    "convert": ["--dataset", "x.jsonl"],
    "average": ["/nonexistent/model", "--output", "/tmp/never_averaged"],
    "cloze": ["--data", "/nonexistent.jsonl", "--output", "/tmp/never_cloze.jsonl"],
    "compare": ["/nonexistent/eval_folder"],
    "report": ["/nonexistent/run"],
    "brainstorm": ["--families", "poetry"],
    "generate": ["--examples_per_task", "0"],
    "convert-synthetic": ["--out_dir", "/nonexistent/synthetic"],
    "serve-llm": ["--port", "70000"],
}  # fmt: skip


def test_every_command_is_in_the_bad_input_table():
    assert set(BAD) == set(COMMANDS)


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_input_is_one_line_exit_2_no_traceback(name, tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "conretriever", name, *BAD[name]],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    lines = [x for x in proc.stderr.splitlines() if x.strip()]
    assert "Traceback" not in proc.stderr
    assert lines[-1].startswith(f"conretriever {name}: error: ") or lines[-1].startswith(
        f"usage: conretriever {name}"
    ), proc.stderr
    assert len([x for x in lines if "error:" in x]) == 1


def test_debug_shows_the_traceback(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "conretriever", "compare", "/nonexistent", "--debug"],
        capture_output=True, text=True, timeout=60, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode != 0 and "Traceback" in proc.stderr


def _imports(path: Path, modules: set[str]) -> set[str]:
    """Project modules imported by ``path``; ``from pkg import mod`` counts as ``pkg.mod``."""
    tree = ast.parse(path.read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            subs = {f"{node.module}.{a.name}" for a in node.names} & modules
            found |= subs or {node.module}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
    return {m for m in found if m.startswith("conretriever")}


def _module_name(path: Path) -> str:
    rel = path.relative_to(REPO).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def test_no_import_cycles_and_groups_import_one_way():
    """Every import, at any depth (lazy ones included), from a lower stage to a higher one is
    an error; so is any cycle between modules."""
    files = sorted((REPO / "conretriever").rglob("*.py"))
    names = {_module_name(p) for p in files}
    graph = {_module_name(p): _imports(p, names) for p in files}
    order = ["core", "model", "data", "retrieval", "evaluation", "training", "synth", "cli"]

    def stage(module: str) -> str:
        parts = module.split(".")
        if len(parts) > 1 and parts[1] in order:
            return parts[1]
        if module in ("conretriever.cli", "conretriever.__main__"):
            return "cli"
        return "core"

    upward = []
    for module, deps in graph.items():
        for dep in deps:
            if dep in graph and order.index(stage(dep)) > order.index(stage(module)):
                if stage(module) != "core" or module == "conretriever":  # core's lazy public face
                    upward.append(f"{module} -> {dep}")
                elif module != "conretriever":
                    upward.append(f"{module} -> {dep}")
    allowed = {"conretriever -> conretriever.model.embedder"}  # the lazy public Embedder
    assert sorted(set(upward) - allowed) == []

    seen, stack, cycles = set(), [], []

    def visit(node):
        if node in stack:
            cycles.append(stack[stack.index(node) :] + [node])
            return
        if node in seen:
            return
        seen.add(node)
        stack.append(node)
        for dep in graph.get(node, ()):
            if dep in graph:
                visit(dep)
        stack.pop()

    for node in graph:
        visit(node)
    assert cycles == []


def test_no_function_over_60_lines():
    long = []
    for path in sorted((REPO / "conretriever").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                body = [
                    n
                    for n in node.body
                    if not (
                        isinstance(n, ast.Expr)
                        and isinstance(getattr(n, "value", None), ast.Constant)
                    )
                ]
                length = node.end_lineno - (body[0].lineno if body else node.lineno) + 1
                if length > 60:
                    long.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name} ({length})")
    assert long == []


def test_settings_dataclasses_hold_every_command_option():
    for name, command in COMMANDS.items():
        assert dataclasses.is_dataclass(_load(command.settings)), name
