"""ConRetriever: turn decoder LLMs into dense retrievers, the E5-Mistral way.

The public entry point is :class:`Embedder` (``conretriever.model.embedder``). It is imported lazily
so that ``import conretriever`` stays cheap and has no side effects (no torch import, no logging
configuration) until something is actually used.
"""

__all__ = ["Embedder"]
__version__ = "0.1.0"


def __getattr__(name: str):
    if name == "Embedder":
        from conretriever.model.embedder import Embedder

        return Embedder
    raise AttributeError(f"module 'conretriever' has no attribute {name!r}")
