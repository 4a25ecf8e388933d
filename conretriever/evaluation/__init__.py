"""Evaluation: e5-style retrieval scores on BEIR folders and MTEB tasks, and reports of runs.

``evaluate`` runs a model on BEIR folders (offline) or MTEB tasks (``mteb_bridge``) and writes
per-task results; ``metrics`` computes MTEB's retrieval metrics in numpy; ``report`` compares
evaluation folders side by side.
"""
