"""A sweep of bad inputs across every command: each gets exit status 2 and ONE line,
``conretriever <command>: error: ...``, naming the flag, file, line or field, with no traceback.

``{w}`` in a case is the workspace folder the fixture fills with good and bad files; ``{dec}``
and ``{enc}`` are tiny random-init decoder/encoder folders.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conretriever.cli import main as cli

GOOD_ROW = {"query": "a question", "positive": ["a passage"], "negative": ["another"]}


def _jsonl(path: Path, rows: list) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    w = tmp_path_factory.mktemp("bad_inputs")
    _jsonl(w / "good" / "nq.jsonl", [GOOD_ROW] * 16)
    _jsonl(w / "malformed" / "nq.jsonl", ['{"query": "a", '])
    _jsonl(w / "no_query" / "nq.jsonl", [{"positive": ["p"]}])
    _jsonl(w / "empty_positive" / "nq.jsonl", [{"query": "q", "positive": []}])
    _jsonl(w / "int_positive" / "nq.jsonl", [{"query": "q", "positive": 7}])
    _jsonl(w / "typo_key" / "nq.jsonl", [{**GOOD_ROW, "instrucion": "x"}])
    _jsonl(w / "unknown_task" / "mytask.jsonl", [GOOD_ROW])
    _jsonl(w / "tiny" / "nq.jsonl", [GOOD_ROW] * 3)
    (w / "bad.yaml").write_text("train: [unclosed\n")
    (w / "unknown.yaml").write_text("train:\n  learning_rte: 1e-4\n")
    (w / "list.yaml").write_text("- 1\n- 2\n")
    beir = w / "beir"
    (beir / "qrels").mkdir(parents=True)
    _jsonl(beir / "corpus.jsonl", [{"_id": "d1", "text": "a document"}])
    _jsonl(beir / "queries.jsonl", [{"_id": "q1", "text": "a query"}])
    (beir / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq1\td1\tmaybe\n")
    (w / "texts.txt").write_text("one\ntwo\n")
    (w / "synth").mkdir()
    (w / "afile").write_text("a file where a folder should be\n")
    # yaml.safe_load refuses language-specific tags; the refusal must be one line, not a crash
    (w / "tag.yaml").write_text('train:\n  seed: !!python/object/apply:os.system ["echo hi"]\n')
    (w / "tag_tasks.yaml").write_text('nq:\n  weight: !!python/object/apply:os.system ["x"]\n')
    (w / "empty_model").mkdir()
    (w / "not_a_model").mkdir()
    (w / "not_a_model" / "config.json").write_text("{}\n")  # no model_type: not loadable
    return w


CASES = [
    # train: every knob validated up front
    ("train", ["--learning_rate", "-1"], "--learning_rate: must be > 0, got -1.0"),
    ("train", ["--learning_rate", "nan"], "--learning_rate: must be a finite number"),
    ("train", ["--temperature", "0"], "--temperature: must be > 0, got 0.0"),
    ("train", ["--temperature", "nan"], "--temperature: must be a finite number"),
    ("train", ["--max_grad_norm", "nan"], "--max_grad_norm: must be a finite number"),
    ("train", ["--per_device_train_batch_size", "0"],
     "--per_device_train_batch_size: must be >= 1"),
    ("train", ["--save_total_limit", "0"], "or -1 to keep every checkpoint, got 0"),
    ("train", ["--save_total_limit", "-2"], "--save_total_limit: must be >= -1"),
    ("train", ["--logging_steps", "0"], "--logging_steps: must be >= 1, got 0"),
    ("train", ["--num_train_epochs", "0"], "--num_train_epochs: must be > 0"),
    ("train", ["--max_steps", "0"], "--max_steps: 0 would train nothing"),
    ("train", ["--report_to", "wandb"], "'wandb' is not allowed; use one of tensorboard, none"),
    ("train", ["--dtype", "float8"], "--dtype: 'float8' is not allowed"),
    ("train", ["--mixed_precision", "fp16"], "--mixed_precision: 'fp16' is not allowed"),
    ("train", ["--lr_scheduler", "step"], "--lr_scheduler: 'step' is not allowed"),
    ("train", ["--query_max_length", "0"], "--query_max_length: must be >= 1, got 0"),
    ("train", ["--pooling", "max"], "--pooling: 'max' is not allowed; use one of last, mean, cls"),
    ("train", ["--lora_dropout", "1.5"], "--lora_dropout: must be <= 0.9"),
    ("train", ["--lora_r", "0"], "--lora_r: must be >= 1"),
    ("train", ["--use_lora", "maybe"], "--use_lora: expected true or false, got 'maybe'"),
    ("train", ["--resume", "maybe"], "'maybe' is not allowed; use one of false, true, force"),
    ("train", ["--chunk_size", "-1"], "--chunk_size: must be >= 0"),
    ("train", ["--n_hard_negative", "-1"], "--n_hard_negative: must be >= 0"),
    ("train", ["--learning_rat", "1e-4"], "(did you mean '--learning_rate'?)"),
    ("train", ["--config", "{w}/missing.yaml"], "missing.yaml: cannot read config"),
    ("train", ["--config", "{w}/bad.yaml"], "bad.yaml:2: not valid YAML"),
    ("train", ["--config", "{w}/unknown.yaml"],
     "unknown.yaml: train.learning_rte: unknown key (did you mean 'learning_rate'?)"),
    ("train", ["--config", "{w}/list.yaml"], "the top level must be a mapping"),
    ("train", ["--train_data", "{w}/nowhere"], "nowhere: training data not found"),
    ("train", ["--train_data", "{w}/malformed"], "malformed/nq.jsonl:1: malformed JSON"),
    ("train", ["--train_data", "{w}/no_query"], "no_query/nq.jsonl:1: field 'query': missing"),
    ("train", ["--train_data", "{w}/empty_positive"], "nq.jsonl:1: field 'positive': empty"),
    ("train", ["--train_data", "{w}/int_positive"],
     "field 'positive': expected a string or a list of strings"),
    ("train", ["--train_data", "{w}/typo_key"],
     "field 'instrucion': unknown key (did you mean 'instruction'?)"),
    ("train", ["--train_data", "{w}/unknown_task"],
     "field 'instruction': missing, and task 'mytask' has no registry entry"),
    ("train", ["--train_data", "{w}/tiny"], "no full batch of 4 rows can be formed"),
    ("train", ["--model_name_or_path", "/nonexistent/model"], "model path not found"),
    ("train", ["--model_name_or_path", "embedded:nope"], "unknown embedded model 'embedded:nope'"),
    ("train", ["--model_name_or_path", "{enc}", "--packed", "true"],
     "--packed true needs a decoder"),
    ("train", ["--model_name_or_path", "{w}/empty_model"], "no config.json; not a model directory"),
    ("train", ["--model_name_or_path", "{w}/not_a_model"],
     "not_a_model: cannot load it as a model"),
    ("train", ["--use_lora", "true", "--lora_target_modules", "nosuchproj"],
     "--lora_target_modules: nosuchproj: no such module in LlamaModel; its linear modules are "
     "down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj"),
    ("train", ["--use_lora", "true", "--lora_target_modules", "q_proj,norm"],
     "--lora_target_modules q_proj,norm: Target module"),  # peft's own refusal, one line
    ("train", ["--use_lora", "true", "--lora_top_layers", "5"],
     "--lora_top_layers 5: LlamaModel has only 2 layers (layers); use 0 (every layer) or at "
     "most 2"),
    ("train", ["--keep_layers", "3"],
     "--keep_layers 3: LlamaModel has 2 layers (layers); use 0 (all) or 1 to 2"),
    ("train", ["--use_lora", "true", "--keep_layers", "1", "--lora_top_layers", "2"],
     "--lora_top_layers 2: LlamaModel has only 1 layers (layers)"),
    ("train", ["--use_lora", "true", "--freeze_embeddings", "true"],
     "--freeze_embeddings applies to full fine-tuning (--use_lora false)"),
    ("train", ["--use_lora", "false", "--lora_top_layers", "1"],
     "--lora_top_layers 1: applies to a LoRA adapter, and --use_lora is false"),
    ("train", ["--config", "{w}/tag.yaml"],
     "tag.yaml:2: YAML tag !!python/object/apply:os.system is not allowed"),
    ("train", ["--task_config", "{w}/tag_tasks.yaml"],
     "tag_tasks.yaml:2: YAML tag !!python/object/apply:os.system is not allowed"),
    ("train", ["--output_dir", "{w}/afile"], "--output {w}/afile: is a file, not a folder"),
    ("train", ["--output_dir", "{w}/afile/run"],
     "--output {w}/afile/run: {w}/afile is a file, not a folder"),
    ("train", ["--eval_data", "{w}/beir,{w}/good"], "holds a comma; give several items"),
    # eval
    ("eval", ["--beir_dir", "{w}/beir"], "--model is required"),
    ("eval", ["--model", "x"], "give --tasks and/or --beir_dir"),
    ("eval", ["--model", "x", "--beir_dir", "{w}/nowhere"], "nowhere: not a directory"),
    ("eval", ["--model", "x", "--beir_dir", "{w}/beir", "--batch_size", "0"],
     "--batch_size: must be >= 1"),
    ("eval", ["--model", "x", "--beir_dir", "{w}/beir", "--engine", "faiss"],
     "--engine: 'faiss' is not allowed; use one of native, mteb"),
    ("eval", ["--model", "x", "--beir_dir", "{w}/beir"],
     "beir/qrels/test.tsv:2: malformed qrels line"),
    ("eval", ["--model", "x", "--beir_dir", "{w}/beir", "--output_dir", "{w}/afile"],
     "--output {w}/afile: is a file, not a folder"),
    ("eval", ["--model", "x", "--beir_dir", "{w}/beir,{w}/beir"],
     "--beir_dir: '{w}/beir,{w}/beir' holds a comma; give several items separated by spaces"),

    # mine
    ("mine", ["--model", "x", "--data", "d", "--corpus", "c", "--out", "o", "--window", "0-3"],
     "--window: '0-3' needs 1 <= LO <= HI"),
    ("mine", ["--model", "x", "--data", "d", "--corpus", "c", "--out", "o", "--window", "ab"],
     "--window: 'ab' is not LO-HI"),
    ("mine", ["--model", "x", "--data", "d", "--corpus", "c"], "--output is required"),
    ("mine", ["--model", "x", "--data", "d", "--corpus", "c", "--out", "{w}/afile/m.jsonl"],
     "--output {w}/afile/m.jsonl: {w}/afile is a file, not a folder"),
    ("mine", ["--model", "x", "--data", "d", "--corpus", "c", "--out", "{w}/synth"],
     "--output {w}/synth: is a folder, not a file"),
    ("mine", ["--model", "x", "--data", "d", "--corpus", "c", "--out", "o", "--pick", "best"],
     "--pick: 'best' is not allowed; use one of random, top"),
    ("mine", ["--model", "x", "--data", "{w}/good/nq.jsonl", "--corpus", "{w}/nowhere",
              "--out", "{w}/mined.jsonl"], "nowhere: corpus not found"),
    # convert
    ("convert", ["--dataset", "x.jsonl"], "--dataset and --output are both needed"),
    ("convert", ["--dataset", "x", "--out", "o", "--layout", "weird"],
     "--layout: 'weird' is not allowed"),
    ("convert", ["--dataset", "{w}/malformed/nq.jsonl", "--out", "{w}/conv", "--no_progress"],
     "malformed/nq.jsonl:1: malformed JSON"),
    ("convert", ["--dataset", "{w}/nowhere.jsonl", "--out", "{w}/conv"],
     "nowhere.jsonl: no such file or folder"),
    ("convert", ["--dataset", "{w}/good/nq.jsonl", "--out", "{w}/afile"],
     "--output {w}/afile: is a file, not a folder"),
    # decontaminate
    ("decontaminate", ["--data", "{w}/good"], "--eval_dirs is required"),
    ("decontaminate", ["--data", "{w}/good", "--eval_dir", "{w}/beir", "--drop"],
     "--drop needs --out"),
    ("decontaminate", ["--data", "{w}/good", "--eval_dir", "{w}/beir", "--fields", "title"],
     "--fields: 'title' is not allowed; use one of query, positive, negative"),
    ("decontaminate", ["--data", "{w}/good", "--eval_dir", "{w}/beir", "--report",
                       "{w}/afile/r.json"], "--report {w}/afile/r.json: {w}/afile is a file"),
    # cloze
    ("cloze", ["--output", "{w}/c.jsonl"], "--data is required"),
    ("cloze", ["--data", "{w}/malformed", "--output", "{w}/c.jsonl"],
     "malformed/nq.jsonl:1: malformed JSON"),
    ("cloze", ["--data", "{w}/good", "--output", "{w}/afile/c.jsonl"],
     "--output {w}/afile/c.jsonl: {w}/afile is a file, not a folder"),
    ("cloze", ["--data", "{w}/good", "--output", "{w}/afile"],
     "output {w}/afile already exists; pass --overwrite"),
    ("cloze", ["--data", "{w}/good", "--output", "{w}/c.jsonl", "--min_words", "9",
               "--max_words", "3"], "--min_words 9 is above --max_words 3"),
    ("cloze", ["--data", "{w}/good", "--output", "{w}/c.jsonl", "--keep_sentence", "2"],
     "--keep_sentence: must be <= 1, got 2.0"),
    # encode
    ("encode", ["--model", "x", "--input", "{w}/none.txt", "--output", "{w}/v.npy"],
     "none.txt: cannot read"),
    ("encode", ["--model", "x", "--input", "{w}/texts.txt", "--output", "o", "--role", "doc"],
     "--role: 'doc' is not allowed; use one of query, passage"),
    ("encode", ["--model", "{w}/not_a_model", "--input", "{w}/texts.txt", "--output", "v.npy"],
     "not_a_model: cannot load it as a model"),
    ("encode", ["--model", "x", "--input", "{w}/texts.txt", "--output", "{w}/afile/v.npy"],
     "--output {w}/afile/v.npy: {w}/afile is a file, not a folder"),
    # compare, report, average
    ("compare", ["{w}/nowhere"], "nowhere: no evaluation results"),
    # average
    ("average", ["{w}/good", "--output", "{w}/avg"], "give at least two model folders, got 1"),
    ("average", ["{w}/good", "{w}/beir", "--output", "{w}/avg"],
     "good: no model.safetensors (not a saved model folder)"),
    ("average", ["{w}/good", "{w}/beir", "--output", "{w}/avg", "--weights", "1"],
     "--weights: 1 weights for 2 model folders"),
    # train: the recipe's options
    ("train", ["--embed_distil_weight", "1"], "needs --embed_distil_model"),
    ("train", ["--embed_distil_vector_weight", "1"], "needs --embed_distil_model"),
    ("train", ["--bidirectional", "true"], "has no bidirectional attention option"),
    ("train", ["--distil_temperature", "0"], "--distil_temperature: must be > 0"),
    ("compare", ["{w}/nowhere", "--output", "{w}/afile/t.md"],
     "--output {w}/afile/t.md: {w}/afile is a file, not a folder"),
    ("compare", ["{w}/nowhere", "--plot", "{w}/synth"], "--plot {w}/synth: is a folder"),
    ("report", ["{w}/nowhere", "--out", "{w}/afile"],
     "--output {w}/afile: is a file, not a folder"),
    ("average", ["{dec}", "{dec}", "--output", "{w}/afile"],
     "--output {w}/afile: is a file, not a folder"),
    # synthetic data
    ("brainstorm", ["--families", "poetry"],
     "--families: 'poetry' is not allowed; use one of all, short-long"),
    ("brainstorm", ["--bitext_pairs", "English"], "expected SRC-TGT items"),
    ("brainstorm", ["--concurrency", "0"], "--concurrency: must be >= 1"),
    ("brainstorm", ["--out_dir", "{w}/afile"], "--output {w}/afile: is a file, not a folder"),
    ("brainstorm", ["--bitext_pairs", "English-French,German"], "expected SRC-TGT items"),
    ("generate", ["--out_dir", "{w}/afile"], "--output {w}/afile: is a file, not a folder"),
    ("generate", ["--examples_per_task", "0"], "--examples_per_task: must be >= 1"),
    ("generate", ["--languages", "English:-1"], "weights > 0"),
    ("generate", ["--out_dir", "{w}/synth"],
     "tasks.jsonl: no task file; run `conretriever brainstorm`"),
    ("generate", ["--timeout", "0"], "--timeout: must be > 0"),
    ("serve-llm", ["--port", "70000"], "--port: must be <= 65535"),
]  # fmt: skip


def test_the_sweep_is_wide():
    assert len(CASES) >= 40
    assert len({c for c, _, _ in CASES}) >= 10  # every command but convert-synthetic's twin


@pytest.mark.parametrize(("command", "argv", "message"), CASES, ids=[c[2][:40] for c in CASES])
def test_bad_input(workspace, tiny_decoder, tiny_encoder, tmp_path, capsys, monkeypatch,
                   command, argv, message):  # fmt: skip
    monkeypatch.chdir(tmp_path)
    fill = {"w": workspace, "dec": tiny_decoder, "enc": tiny_encoder}
    argv = [a.format(**fill) for a in argv]
    if command == "train":  # a valid run around the one bad value
        base = [
            "--model_name_or_path",
            str(tiny_decoder),
            "--train_data",
            str(workspace / "good"),
            "--output_dir",
            str(tmp_path / "run"),
            "--per_device_train_batch_size",
            "4",
            "--max_steps",
            "1",
            "--report_to",
            "none",
        ]
        argv = base + argv  # later flags win
    assert cli([command, *argv]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [x for x in err.splitlines() if x.startswith(f"conretriever {command}: error: ")]
    assert len(lines) == 1, err
    assert message.format(**fill) in lines[0], lines[0]
    assert (workspace / "afile").read_text() == "a file where a folder should be\n"  # untouched


# ----- the output location fails: read-only, full disk ------------------------------------------
def _refuse_writes(monkeypatch, root: Path, code: int, only=lambda p: True) -> None:
    """Every write-mode open and mkdir of a path under ``root`` (for which ``only(path)``) fails
    with ``OSError(code)``, as a read-only mount (EACCES) or a full disk (ENOSPC) would. chmod
    cannot simulate this: tests may run as root, whom a 0o500 folder does not stop."""
    import builtins
    import errno
    import io
    import os

    root = root.resolve()

    def hit(file) -> bool:
        if not isinstance(file, str | bytes | os.PathLike):
            return False  # a file descriptor
        path = Path(os.fsdecode(file)).resolve()
        return (path == root or root in path.parents) and only(path)

    def fail(file):
        raise OSError(code, os.strerror(code), os.fsdecode(file))

    real_open, real_os_open, real_mkdir = builtins.open, os.open, os.mkdir

    def fake_open(file, mode="r", *args, **kwargs):
        if any(c in mode for c in "wax+") and hit(file):
            fail(file)
        return real_open(file, mode, *args, **kwargs)

    def fake_os_open(file, flags, *args, **kwargs):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT) and hit(file):
            fail(file)
        return real_os_open(file, flags, *args, **kwargs)

    def fake_mkdir(path, *args, **kwargs):
        if hit(path) and not Path(path).exists():
            fail(path)
        return real_mkdir(path, *args, **kwargs)

    assert code in (errno.EACCES, errno.ENOSPC)
    monkeypatch.setattr(builtins, "open", fake_open)
    monkeypatch.setattr(io, "open", fake_open)
    monkeypatch.setattr(os, "open", fake_os_open)
    monkeypatch.setattr(os, "mkdir", fake_mkdir)


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


OUTPUT_CASES = [  # command, argv, the output folder ({out}), the flag named
    ("train", ["--output_dir", "{out}"], "--output"),
    ("convert", ["--dataset", "{w}/good/nq.jsonl", "--out", "{out}", "--overwrite"], "--output"),
    ("brainstorm", ["--out_dir", "{out}", "--families", "bitext"], "--output"),
    ("generate", ["--out_dir", "{out}"], "--output"),
    ("eval", ["--model", "{enc}", "--beir_dir", "{w}/beir", "--output_dir", "{out}"],
     "--output"),
    ("encode", ["--model", "{enc}", "--input", "{w}/texts.txt", "--output", "{out}/v.npy"],
     "--output"),
    ("mine", ["--model", "{enc}", "--data", "{w}/good/nq.jsonl", "--corpus", "{w}/texts.txt",
              "--out", "{out}/mined.jsonl"], "--output"),
    ("average", ["{dec}", "{dec}", "--output", "{out}/avg"], "--output"),
    ("compare", ["{w}/nowhere", "--output", "{out}/table.md"], "--output"),
    ("report", ["{w}/nowhere", "--out", "{out}"], "--output"),
    ("decontaminate", ["--data", "{w}/good", "--eval_dir", "{w}/beir", "--report",
                       "{out}/r.json"], "--report"),
]  # fmt: skip


@pytest.mark.parametrize("reason", ["not writable (permission denied)", "disk full"])
@pytest.mark.parametrize(("command", "argv", "flag"), OUTPUT_CASES,
                         ids=[c[0] for c in OUTPUT_CASES])  # fmt: skip
def test_unusable_output_location(workspace, tiny_decoder, tiny_encoder, tmp_path, capsys,
                                  monkeypatch, command, argv, flag, reason):  # fmt: skip
    import errno

    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("already here\n")
    before = _tree(out)
    fill = {"w": workspace, "dec": tiny_decoder, "enc": tiny_encoder, "out": out}
    argv = [a.format(**fill) for a in argv]
    if command == "train":
        argv = ["--model_name_or_path", str(tiny_decoder), "--train_data",
                str(workspace / "good"), "--per_device_train_batch_size", "4", "--max_steps",
                "1", "--report_to", "none", *argv]  # fmt: skip
    code = errno.EACCES if reason.startswith("not writable") else errno.ENOSPC
    _refuse_writes(monkeypatch, out, code)
    assert cli([command, *argv]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [x for x in err.splitlines() if x.startswith(f"conretriever {command}: error: ")]
    assert len(lines) == 1, err
    assert f"{flag} {out}" in lines[0] and f"cannot write in {out}: {reason}" in lines[0], lines
    monkeypatch.undo()
    assert _tree(out) == before  # nothing already there lost, nothing half-written added


def test_disk_full_mid_write_keeps_the_old_file(workspace, tmp_path, capsys, monkeypatch):
    """The folder is writable (the up-front check passes) but the disk fills while the new
    output is written: one line naming the file, and the old output is intact (it is replaced
    by a rename, only once the new one is whole)."""
    import errno

    out = tmp_path / "table.md"
    out.write_text("the previous table\n")
    results = tmp_path / "eval"
    results.mkdir()
    (results / "nq.json").write_text(json.dumps({"task": "nq", "metrics": {"ndcg_at_10": 0.5}}))
    _refuse_writes(monkeypatch, tmp_path, errno.ENOSPC, only=lambda p: p.name.endswith(".tmp"))
    assert cli(["compare", str(results), "--output", str(out)]) == 2
    err = capsys.readouterr().err
    (line,) = [x for x in err.splitlines() if x.startswith("conretriever compare: error: ")]
    assert f"--output {out}: cannot write (at {tmp_path}/.table.md.tmp): disk full" in line
    assert out.read_text() == "the previous table\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eval", "table.md"]


def test_bare_os_error_is_one_line(monkeypatch, capsys):
    """The command layer's last resort: an OSError no command turned into a UserError."""
    import errno

    from conretriever.synth import brainstorm

    def boom(command):
        raise OSError(errno.ENOSPC, "No space left on device", "/somewhere/file")

    monkeypatch.setattr(brainstorm, "run", boom)
    assert cli(["brainstorm"]) == 2
    err = capsys.readouterr().err
    assert err == "conretriever brainstorm: error: /somewhere/file: disk full\n"


# ----- list options: a comma inside one item --------------------------------------------------
def test_bitext_pairs_split_on_commas(tmp_path, monkeypatch):
    """``--bitext_pairs English-French,German-English`` made ONE task whose target language
    was "French,German-English"; language names hold no comma, so it is two pairs now."""
    monkeypatch.chdir(tmp_path)
    argv = ["brainstorm", "--out_dir", str(tmp_path), "--families", "bitext", "--bitext_pairs"]
    assert cli([*argv, "English-French,German-English"]) == 0
    rows = [json.loads(x) for x in (tmp_path / "tasks.jsonl").read_text().splitlines()]
    pairs = [(r["source_language"], r["target_language"]) for r in rows]
    assert pairs == [("English", "French"), ("German", "English")]
    (tmp_path / "tasks.jsonl").unlink()
    assert cli([*argv, "English-French", "German-English", "--retry_rejects"]) == 0  # same
    again = [json.loads(x) for x in (tmp_path / "tasks.jsonl").read_text().splitlines()]
    assert [(r["source_language"], r["target_language"]) for r in again] == pairs


def test_every_list_option_declares_its_comma_rule():
    """Each list option of every command has a comma rule, and a list of free strings with no
    declared rule refuses commas (so a new option cannot fall into the bitext trap)."""
    from conretriever.cli import COMMANDS, _load
    from conretriever.options import comma_rule, options

    rules = {}
    for name, command in COMMANDS.items():
        for o in options(_load(command.settings)):
            if (rule := comma_rule(o)) is not None:
                rules[f"{name} {o.flag}"] = rule
    assert rules["brainstorm --bitext_pairs"] == "split"
    assert rules["brainstorm --families"] == "split" and rules["decontaminate --fields"] == "split"
    assert rules["eval --tasks"] == "split" and rules["train --matryoshka_dims"] == "split"
    assert rules["eval --beir_dir"] == "path" and rules["report runs"] == "path"
    assert rules["compare runs"] == "keep"
    assert "refuse" not in rules.values(), rules  # every str list chose deliberately


def test_a_path_with_a_comma_that_exists_is_kept(tmp_path):
    from conretriever.evaluation.evaluate import EvalSettings
    from conretriever.options import parse

    real = tmp_path / "a,b"
    real.mkdir()
    s = parse(EvalSettings, ["--model", "x", "--beir_dir", str(real)], prog="eval")
    assert s.beir_dir == [str(real)]


# ----- resume over damaged checkpoint shards -----------------------------------------------------
def test_resume_falls_back_over_damaged_shards(workspace, tiny_decoder, tmp_path, capsys, caplog):
    """A truncated shard (a copy or a disk that stopped half-way) is found from its size before
    anything is loaded; bytes damaged inside a shard surface from DCP's load (its
    ``CheckpointException`` is a ``BaseException``) and fall back the same way; with no
    usable checkpoint left, one line names the damaged ones instead of restarting at step 0."""
    import logging

    out = tmp_path / "run"
    argv = ["train", "--model_name_or_path", str(tiny_decoder), "--train_data",
            str(workspace / "good"), "--output_dir", str(out), "--per_device_train_batch_size",
            "4", "--max_steps", "3", "--save_steps", "1", "--save_total_limit", "-1",
            "--report_to", "none"]  # fmt: skip
    assert cli(argv) == 0
    shard2 = out / "checkpoint-2" / "state" / "__0_0.distcp"
    whole = shard2.read_bytes()
    shard2.write_bytes(whole[: len(whole) // 2])
    with caplog.at_level(logging.INFO):
        assert cli([*argv, "--resume", "true"]) == 0
    assert "checkpoint-2: cannot resume from it: state/__0_0.distcp is truncated" in caplog.text
    assert "resumed from" in caplog.text and "checkpoint-1 at step 1" in caplog.text

    caplog.clear()
    for name in ("checkpoint-1", "checkpoint-2"):  # same size, bad bytes (3 is the last step)
        shard = out / name / "state" / "__0_0.distcp"
        damaged = bytearray(shard.read_bytes())
        damaged[-200:] = bytes(200)
        shard.write_bytes(bytes(damaged))
    capsys.readouterr()
    with caplog.at_level(logging.WARNING):
        assert cli([*argv, "--resume", "true"]) == 2
    assert "checkpoint-2: cannot resume from it: RuntimeError" in caplog.text
    err = capsys.readouterr().err
    assert "Traceback" not in err
    (line,) = [x for x in err.splitlines() if x.startswith("conretriever train: error: ")]
    assert "no checkpoint of this run can be resumed from" in line
    assert "checkpoint-2, checkpoint-1" in line
