"""The model: what turns text into a vector.

``specs`` resolves what a user names (hub id, folder, GGUF, ``embedded:...``) into a folder;
``settings`` holds what besides the weights decides a vector; ``prompts`` puts instructions
into query text; ``embedder`` is the :class:`Embedder` (backbone + pooling + optional LoRA, and
batched encoding); ``packing`` runs padding-free forwards; ``export`` writes and reads a saved
model folder (which also loads in sentence-transformers).
"""
