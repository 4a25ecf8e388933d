"""Prompts and sampling for the E5 synthetic-data recipe (Wang et al. 2024, arXiv 2401.00368).

E5-Mistral's synthetic data comes from a two-step conversation with an LLM:

1. **Brainstorm.** For each task family the LLM is shown a few seed tasks and asked for a list of
   new task descriptions ("Given a legal question, retrieve ..."). Sampling varies per request
   (a different subset of seeds, a different temperature) so that requests do not repeat each
   other. STS and bitext have no brainstorm: their task is fixed ("Retrieve semantically similar
   text."; one task per language pair).
2. **Generate.** For every task, the LLM writes one JSON example at a time. Each request draws
   its own attributes (query type, query length, clarity, difficulty, document length, language)
   from the paper's option lists, which is where most of the diversity comes from.

The six families and what one example becomes in training (``query -> positive / negative``):

=============  =======================================  =========================================
family         step-2 JSON keys                         training row
=============  =======================================  =========================================
short-long     user_query, positive_document,           query -> positive / hard negative
short-short    hard_negative_document                   (the paper asks short-short and long-long
long-long                                               for no negative; we ask for one so every
                                                        row carries a hard negative)
long-short     input_text, label, misleading_label      text -> label / misleading label
sts            S1, S2, S3 (S1~S2 close, S1~S3 farther)  S1 -> S2 / S3
bitext         S1 (source), S2 good / S3 poor           S1 -> S2 / S3
               translation
=============  =======================================  =========================================

The instruction of every training row is the task description itself, which is how E5 trains on
synthetic data (``Instruct: {task}\\nQuery: {query}``). The prompt wording is ours; the structure,
the keys and the option lists follow the paper. Everything here is pure: sampling takes an explicit
``random.Random`` so a request id always maps to the same prompt (that is what makes resume exact).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from importlib import resources

FAMILIES = ("short-long", "long-short", "short-short", "long-long", "sts", "bitext")
BRAINSTORMED = ("short-long", "long-short", "short-short", "long-long")

# The paper's option lists (section 3.1 and appendix prompts).
QUERY_TYPES = ("extremely long-tail", "long-tail", "common")
QUERY_LENGTHS = ("less than 5 words", "5 to 15 words", "at least 10 words")
CLARITY = ("clear", "understandable with some effort", "ambiguous")
DIFFICULTY = ("high school", "college", "PhD")
NUM_WORDS = (50, 100, 200, 300, 400, 500)
# STS and bitext use an easier difficulty ladder and explicit 1-5 similarity targets.
PAIR_DIFFICULTY = ("elementary school", "high school", "college")
UNITS = ("sentence", "phrase", "passage")
HIGH_SCORES = (4, 4.5, 5)
LOW_SCORES = (2.5, 3, 3.5)

# The paper draws the language from the XLM-R list "giving more weight to high-resource
# languages". These weights are ours: English gets half the mass because most evaluation
# (BEIR) is English; the rest is spread over widely spoken languages roughly by web size.
DEFAULT_LANGUAGES: dict[str, float] = {
    "English": 50.0, "Chinese": 5.0, "Spanish": 5.0, "French": 4.0, "German": 4.0,
    "Japanese": 3.0, "Russian": 3.0, "Portuguese": 3.0, "Italian": 2.0, "Korean": 2.0,
    "Arabic": 2.0, "Hindi": 2.0, "Dutch": 2.0, "Polish": 2.0, "Turkish": 2.0,
    "Vietnamese": 2.0, "Indonesian": 2.0, "Swedish": 1.0, "Thai": 1.0, "Swahili": 1.0,
}  # fmt: skip

# Step-2 JSON keys per family, in the order (query, positive, negative).
FIELDS: dict[str, tuple[str, str, str]] = {
    "short-long": ("user_query", "positive_document", "hard_negative_document"),
    "short-short": ("user_query", "positive_document", "hard_negative_document"),
    "long-long": ("user_query", "positive_document", "hard_negative_document"),
    "long-short": ("input_text", "label", "misleading_label"),
    "sts": ("S1", "S2", "S3"),
    "bitext": ("S1", "S2", "S3"),
}

_BRAINSTORM_KIND = {
    "short-long": (
        "text retrieval tasks in which a short query is used to find long documents",
        "- Say what the query is and what documents should be retrieved for it.\n"
        "- Keep each task broad enough to allow many different queries.",
    ),
    "long-short": (
        "text classification tasks in which a long input text receives a short label",
        "- Say what the input text is and which labels are possible.\n"
        "- Prefer tasks whose labels are a small, well defined set.",
    ),
    "short-short": (
        "text matching tasks in which both the query and the target are short "
        "(a phrase, or one or two sentences)",
        "- Say what the query is and what the matching target is.\n"
        "- Both sides must stay short; avoid tasks that need whole documents.",
    ),
    "long-long": (
        "text matching tasks in which both the query and the target are long documents",
        "- Say what the query document is and what the matching documents are.\n"
        "- Both sides should be several paragraphs long.",
    ),
}


@dataclass(frozen=True)
class Task:
    """One task description; bitext tasks also carry their language pair."""

    family: str
    text: str
    source_language: str = ""
    target_language: str = ""


def load_seed_file(family: str) -> dict:
    """The shipped seed file of a family (``seed_tasks/{family}.json``), validated."""
    if family not in FAMILIES:
        raise ValueError(f"unknown task family {family!r}; expected one of {FAMILIES}")
    name = f"seed_tasks/{family}.json"
    data = json.loads(resources.files("conretriever.synth").joinpath(name).read_text("utf-8"))
    key = "pairs" if family == "bitext" else "tasks"
    items = data.get(key) if isinstance(data, dict) else None
    if not items or not isinstance(items, list):
        raise ValueError(f"{name}: field {key!r} must be a non-empty list")
    return data


def fixed_tasks(family: str) -> list[Task]:
    """Tasks that need no brainstorm: the STS task and one bitext task per language pair."""
    data = load_seed_file(family)
    if family == "sts":
        return [Task("sts", text) for text in data["tasks"]]
    if family == "bitext":
        return [bitext_task(src, tgt) for src, tgt in data["pairs"]]
    raise ValueError(f"family {family!r} is brainstormed, it has no fixed tasks")


def bitext_task(src: str, tgt: str) -> Task:
    text = f"Given a sentence in {src}, retrieve its translation in {tgt}."
    return Task("bitext", text, source_language=src, target_language=tgt)


def brainstorm_messages(family: str, examples: list[str], n_tasks: int) -> list[dict]:
    """Step-1 chat messages: ask for ``n_tasks`` new task descriptions of one family."""
    kind, guidelines = _BRAINSTORM_KIND[family]
    shown = "\n".join(f"- {e}" for e in examples)
    prompt = (
        f"Think up a list of useful {kind}.\n\n"
        f"A few examples of the kind of task we mean:\n{shown}\n\n"
        f"Guidelines:\n{guidelines}\n"
        "- Write each task as one sentence, in English, different from the examples.\n\n"
        f'Reply with a JSON object {{"tasks": [...]}} whose list holds {n_tasks} strings, '
        "one distinct task each. Output only that JSON, with no explanation. Be creative."
    )
    return [{"role": "user", "content": prompt}]


def sample_language(rng: random.Random, languages: dict[str, float]) -> str:
    names = sorted(languages)  # sorted: the draw must not depend on dict insertion order
    return rng.choices(names, weights=[languages[n] for n in names], k=1)[0]


def sample_attributes(task: Task, rng: random.Random, languages: dict[str, float]) -> dict:
    """Draw the step-2 attributes of one request (the paper's knobs for diversity)."""
    f = task.family
    if f in ("sts", "bitext"):
        attrs = {
            "unit": rng.choice(UNITS),
            "high_score": rng.choice(HIGH_SCORES),
            "low_score": rng.choice(LOW_SCORES),
            "difficulty": rng.choice(PAIR_DIFFICULTY),
        }
        if f == "sts":
            attrs["language"] = sample_language(rng, languages)
        return attrs
    attrs = {"language": sample_language(rng, languages)}
    if f == "short-long":
        attrs["query_type"] = rng.choice(QUERY_TYPES)
        attrs["query_length"] = rng.choice(QUERY_LENGTHS)
    if f in ("short-long", "long-short"):
        attrs["clarity"] = rng.choice(CLARITY)
        attrs["num_words"] = rng.choice(NUM_WORDS)
        attrs["difficulty"] = rng.choice(DIFFICULTY)
    return attrs


def reply_schema(family: str | None) -> dict:
    """JSON schema of a reply: step 2's three string fields, or step 1's task list (None).
    ``minLength`` / ``minItems`` state what the validators accept (a task is a sentence), which
    schema-following servers (llama.cpp, our local server) then respect."""
    if family is None:
        item = {"type": "string", "minLength": 24}
        props = {"tasks": {"type": "array", "items": item, "minItems": 2}}
    else:
        props = {name: {"type": "string", "minLength": 2} for name in FIELDS[family]}
    return {"type": "object", "properties": props, "required": list(props)}


_JSON_ONLY = "Output only the JSON object, with no explanation or extra text. Be creative."


def _retrieval_prompt(task: Task, a: dict) -> str:
    f = task.family
    q, pos, neg = FIELDS[f]
    if f == "short-long":
        shape = (
            f'- "{q}" should be {a["query_type"]}, {a["query_length"]}, {a["clarity"]}, '
            "and about a topic of your choice.\n"
            f"- Each document should have at least {a['num_words']} words.\n"
            f"- Understanding the query and documents needs {a['difficulty']} education.\n"
        )
    elif f == "short-short":
        shape = "- All three texts must be short: a phrase or at most two sentences.\n"
    else:
        shape = "- All three texts must be long documents of at least 300 words.\n"
    return (
        f"Your retrieval task: {task.text}\n"
        "Write one example for this task as a JSON object with exactly these keys:\n"
        f'- "{q}": a query that fits the task.\n'
        f'- "{pos}": a text that the task should retrieve for the query.\n'
        f'- "{neg}": a text that looks relevant to the query but serves it worse.\n'
        f"Guidelines:\n{shape}"
        "- Write the documents independently of the query; do not copy the query into them.\n"
        f'- "{neg}" may hold useful information, but less of it than "{pos}".\n'
        "- Never explain inside a text why it is or is not relevant.\n"
        f"- Write every value in {a['language']}.\n{_JSON_ONLY}"
    )


def _classification_prompt(task: Task, a: dict) -> str:
    return (
        f"Your text classification task: {task.text}\n"
        "Write one example for this task as a JSON object with exactly these keys:\n"
        '- "input_text": a text to classify.\n'
        '- "label": the correct label for it.\n'
        '- "misleading_label": a label that is valid for the task but wrong for this text.\n'
        "Guidelines:\n"
        f'- "input_text" has at least {a["num_words"]} words, is {a["clarity"]}, and needs '
        f"{a['difficulty']} education to understand.\n"
        '- Do not mention either label inside "input_text".\n'
        f"- Write every value in {a['language']}.\n{_JSON_ONLY}"
    )


def _sts_prompt(task: Task, a: dict) -> str:
    unit = a["unit"]
    return (
        f"Write three {unit}s in {a['language']} that differ in meaning by degrees, as a JSON "
        'object with exactly the keys "S1", "S2" and "S3" (string values).\n'
        "Similarity is scored from 1 (unrelated) to 5 (same meaning).\n"
        f"- S1 and S2 should score {a['high_score']}.\n"
        f"- S1 and S3 should score {a['low_score']}.\n"
        f"- All three {unit}s share some words.\n"
        f"- They need {a['difficulty']} education to understand; pick any topic.\n{_JSON_ONLY}"
    )


def _bitext_prompt(task: Task, a: dict) -> str:
    unit, src, tgt = a["unit"], task.source_language, task.target_language
    return (
        f"Write one {unit} in {src} and two translations of it into {tgt} of different "
        'quality, as a JSON object with exactly the keys "S1" (the original), "S2" and "S3" '
        "(string values).\n"
        "Translation quality is scored from 1 (wrong) to 5 (perfect).\n"
        f"- S2 as a translation of S1 should score {a['high_score']}.\n"
        f"- S3 as a translation of S1 should score {a['low_score']}.\n"
        f"- The {unit} needs {a['difficulty']} education to understand; pick any topic.\n"
        f"{_JSON_ONLY}"
    )


_PROMPTS = {
    "short-long": _retrieval_prompt,
    "short-short": _retrieval_prompt,
    "long-long": _retrieval_prompt,
    "long-short": _classification_prompt,
    "sts": _sts_prompt,
    "bitext": _bitext_prompt,
}


def generate_messages(task: Task, a: dict) -> list[dict]:
    """Step-2 chat messages: ask for one JSON example of ``task`` with attributes ``a``."""
    if task.family not in _PROMPTS:
        raise ValueError(f"unknown task family {task.family!r}")
    return [{"role": "user", "content": _PROMPTS[task.family](task, a)}]
