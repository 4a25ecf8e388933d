"""LLM-generated training data, the E5 recipe (arXiv 2401.00368); see docs/synthetic_data.md.

``prompts`` (families, prompts, attribute sampling) -> ``client`` (retrying OpenAI-compatible
client) -> ``run`` + ``store`` (resumable, append-only request logs) -> ``brainstorm`` (step 1,
task descriptions) -> ``generate`` (step 2, examples, and conversion to training JSONL).
Importing this package imports neither openai nor torch.
"""
