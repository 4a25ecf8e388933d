"""A run's saved ``config.yaml``, read the same way whichever version of the toolkit wrote it.

Settings sometimes move between sections (the loss settings were fields of ``train`` until
they became the ``loss`` section). A saved config is read through :func:`upgrade_saved`, the one
place old layouts are mapped, by everything that reads one: ``--resume``'s comparison of
trajectories (``training.config.trajectory``), the model card and ``eval --base_model_of``.
It lives below every stage because all of them read saved runs.
"""

from __future__ import annotations

# Where settings of earlier versions now live: (old section, old key) -> (section, key). The loss
# settings were fields of ``train`` (two with a ``loss_`` prefix) until they became the ``loss``
# section; a saved config.yaml of such a run is read through :func:`upgrade_saved`.
MOVED = {
    ("train", "temperature"): ("loss", "temperature"),
    ("train", "cross_device_negatives"): ("loss", "cross_device_negatives"),
    ("train", "false_negative_margin"): ("loss", "false_negative_margin"),
    ("train", "loss_query_query"): ("loss", "query_query"),
    ("train", "loss_doc_doc"): ("loss", "doc_doc"),
    ("train", "matryoshka_dims"): ("loss", "matryoshka_dims"),
    ("train", "matryoshka_weights"): ("loss", "matryoshka_weights"),
    ("train", "contrastive_weight"): ("loss", "contrastive_weight"),
    ("train", "distil_weight"): ("loss", "distil_weight"),
    ("train", "distil_temperature"): ("loss", "distil_temperature"),
    ("train", "output_dir"): ("train", "output"),  # every command's output is --output now
}


def upgrade_saved(config: dict) -> dict:
    """A saved config dict (``config.yaml``) with every key where this version keeps it (see
    :data:`MOVED`); the one place old layouts are mapped."""
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in config.items()}
    for (old_section, old_key), (section, key) in MOVED.items():
        old = out.get(old_section)
        if isinstance(old, dict) and old_key in old:
            out.setdefault(section, {})[key] = old.pop(old_key)
    return out
