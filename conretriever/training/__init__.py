"""Training: contrastive learning of an embedder, on one process or many (torchrun + FSDP2).

``config`` describes a run; ``loss`` is InfoNCE over in-batch, hard and cross-device
negatives; ``grad_cache`` computes the exact large-batch gradient in bounded memory;
``distributed`` shards the model (FSDP2) and gathers embeddings with gradient; ``loop`` is the
training loop with checkpoints, resume and metrics.
"""
