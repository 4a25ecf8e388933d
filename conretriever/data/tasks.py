"""Tasks: what each training file is, how often it is sampled, and how instructions reach text.

A training task is one ``<task>.jsonl`` file. Its registry entry says

* ``weight``: how many times each row is sampled per epoch (2.0 = every row twice, 0.5 = a random
  half of the rows, drawn afresh each epoch);
* the instruction given to its queries: either written out, or built from a query type and a
  passage type as ``Given {query_type}, retrieve {passage_type}`` (the E5 convention).

Rows may carry their own ``instruction`` (synthetic data does: one task description per row),
which wins over the registry. Evaluation uses the official e5-mistral instruction for each
BEIR/MTEB task (``EVAL_INSTRUCTIONS``), so training and evaluation prompts come from one place.

Documents never get an instruction: the asymmetry (instructed queries, plain documents) lets one
document index serve every task.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from conretriever.errors import ConfigError
from conretriever.options import load_yaml


@dataclass(frozen=True)
class TaskSpec:
    name: str
    weight: float = 1.0
    query_type: str | None = None
    passage_type: str | None = None
    instruction_text: str | None = None

    @property
    def instruction(self) -> str | None:
        if self.instruction_text:
            return self.instruction_text
        if self.query_type and self.passage_type:
            return f"Given {self.query_type}, retrieve {self.passage_type}"
        return None


# The seed project's tasks (its training mix, after E5 Table 13). Weights: the seed sampled the
# large sets below 1 so the ~1.8M-row mix stays near one epoch of ~1M rows; keep them unless you
# change the mix. "synthetic" rows carry their own instruction, so it needs no query type.
BUILTIN_TASKS: dict[str, TaskSpec] = {
    t.name: t
    for t in [
        TaskSpec("synthetic", 1.0),
        TaskSpec("eli5", 0.1, "a question", "the highest voted answers from Reddit ELI5 forum"),
        TaskSpec(
            "hotpot_qa",
            0.5,
            "a multi-hop question",
            "documents that can help answer the question",
        ),
        TaskSpec("fever", 0.5, "a claim", "documents that support or refute the claim"),
        TaskSpec(
            "msmarco_passage",
            0.5,
            "a web search query",
            "relevant passages that answer the query",
        ),
        TaskSpec("nq", 1.0, "a question", "Wikipedia passages that answer the question"),
        TaskSpec("squad", 1.0, "a question", "Wikipedia passages that answer the question"),
        TaskSpec("triviaqa", 1.0, "a question", "Wikipedia passages that answer the question"),
        TaskSpec("fiqa", 1.0, "a financial question", "user replies that best answer the question"),
        TaskSpec(
            "quora_duplicate",
            0.5,
            "a question",
            "questions that are semantically equivalent to the given question",
        ),
        TaskSpec("demo", 1.0, "a web search query", "relevant passages that answer the query"),
        # Climate-FEVER claims (shared/data/train): evidence sentences as positives.
        TaskSpec(
            "climate_fever",
            1.0,
            "a claim about climate change",
            "documents that support or refute the claim",
        ),
    ]
}


# Official e5-mistral-7b-instruct evaluation instructions for BEIR / MTEB retrieval tasks.
_CQADUP = (
    "Given a question, retrieve detailed question descriptions from Stackexchange that are "
    "duplicates to the given question"
)
EVAL_INSTRUCTIONS: dict[str, str] = {
    "ArguAna": "Given a claim, find documents that refute the claim",
    "ClimateFEVER": "Given a claim about climate change, retrieve documents that support or "
    "refute the claim",
    "DBPedia": "Given a query, retrieve relevant entity descriptions from DBPedia",
    "FEVER": "Given a claim, retrieve documents that support or refute the claim",
    "FiQA2018": "Given a financial question, retrieve user replies that best answer the question",
    "HotpotQA": "Given a multi-hop question, retrieve documents that can help answer the question",
    "MSMARCO": "Given a web search query, retrieve relevant passages that answer the query",
    "NFCorpus": "Given a question, retrieve relevant documents that best answer the question",
    "NQ": "Given a question, retrieve Wikipedia passages that answer the question",
    "QuoraRetrieval": "Given a question, retrieve questions that are semantically equivalent to "
    "the given question",
    "SCIDOCS": "Given a scientific paper title, retrieve paper abstracts that are cited by the "
    "given paper",
    "SciFact": "Given a scientific claim, retrieve documents that support or refute the claim",
    "Touche2020": "Given a question, retrieve detailed and persuasive arguments that answer the "
    "question",
    "TRECCOVID": "Given a query on COVID-19, retrieve documents that answer the query",
    "CQADupstackRetrieval": _CQADUP,
}
for _sub in (
    "Android English Gaming Gis Mathematica Physics Programmers Stats Tex Unix Webmasters Wordpress"
).split():
    EVAL_INSTRUCTIONS[f"CQADupstack{_sub}Retrieval"] = _CQADUP

# Lower-case BEIR folder names (scifact, nfcorpus, ...) -> MTEB task name, for local folders.
BEIR_DIR_TO_TASK: dict[str, str] = {
    "arguana": "ArguAna",
    "climate-fever": "ClimateFEVER",
    "dbpedia-entity": "DBPedia",
    "fever": "FEVER",
    "fiqa": "FiQA2018",
    "hotpotqa": "HotpotQA",
    "msmarco": "MSMARCO",
    "nfcorpus": "NFCorpus",
    "nq": "NQ",
    "quora": "QuoraRetrieval",
    "scidocs": "SCIDOCS",
    "scifact": "SciFact",
    "webis-touche2020": "Touche2020",
    "trec-covid": "TRECCOVID",
    "cqadupstack": "CQADupstackRetrieval",
}

DEFAULT_EVAL_INSTRUCTION = "Given a query, retrieve relevant passages that answer the query"


def eval_instruction(task_or_dir: str) -> str:
    """The e5-mistral instruction for an MTEB task name or a BEIR folder name."""
    name = Path(task_or_dir).name
    if name in EVAL_INSTRUCTIONS:
        return EVAL_INSTRUCTIONS[name]
    task = BEIR_DIR_TO_TASK.get(name.lower())
    return EVAL_INSTRUCTIONS[task] if task else DEFAULT_EVAL_INSTRUCTION


class TaskRegistry:
    """Task name -> TaskSpec; built-ins plus optional YAML overrides."""

    def __init__(self, tasks: dict[str, TaskSpec] | None = None):
        self.tasks: dict[str, TaskSpec] = dict(BUILTIN_TASKS if tasks is None else tasks)

    @classmethod
    def load(cls, yaml_path: str | Path | None = None) -> TaskRegistry:
        """Built-ins, updated from a YAML of ``task: {weight, query_type, passage_type,
        instruction}`` entries (fields not given keep their built-in value)."""
        reg = cls()
        if yaml_path is None:
            return reg
        path = Path(yaml_path)
        raw = load_yaml(path, "task config") or {}
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: expected a mapping of task name -> settings")
        allowed = {"weight", "query_type", "passage_type", "instruction"}
        for name, entry in raw.items():
            entry = entry or {}
            if not isinstance(entry, dict) or set(entry) - allowed:
                bad = set(entry) - allowed if isinstance(entry, dict) else entry
                raise ConfigError(f"{path}: task {name!r}: unknown fields {bad}; use {allowed}")
            weight = entry.get("weight", reg.tasks.get(name, TaskSpec(name)).weight)
            if not isinstance(weight, int | float) or weight < 0:
                raise ConfigError(f"{path}: task {name!r}: weight must be a number >= 0")
            base = reg.tasks.get(name, TaskSpec(str(name)))
            reg.tasks[name] = replace(
                base,
                weight=float(weight),
                query_type=entry.get("query_type", base.query_type),
                passage_type=entry.get("passage_type", base.passage_type),
                instruction_text=entry.get("instruction", base.instruction_text),
            )
        return reg

    def weight(self, name: str) -> float:
        spec = self.tasks.get(name)
        return spec.weight if spec else 1.0

    def instruction(self, name: str) -> str | None:
        spec = self.tasks.get(name)
        return spec.instruction if spec else None
