"""Data: every file format the pipeline reads or writes, and what turns files into batches.

``tasks`` is the task registry (weights, instructions, the e5-mistral evaluation instructions);
``training`` reads task files into validated examples and plans and collates batches; ``beir``
is the one reader of BEIR folders; ``sources`` and ``convert`` turn other datasets into task
files; ``decontam`` finds training rows that overlap evaluation data. (Mining hard negatives
runs an embedder and a search: it is ``conretriever.retrieval.mining``.)
"""
