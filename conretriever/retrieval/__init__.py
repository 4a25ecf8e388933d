"""Retrieval: encode a corpus once (cached on disk, sharded over ranks) and search it.

Used by evaluation (``conretriever.evaluation``) and by hard-negative mining
(``conretriever.retrieval.mining``), so both rank documents the same way.
"""
