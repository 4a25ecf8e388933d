"""FSDP2 sharding, and collectives that keep autograd.

The process group itself is set up by ``conretriever.runtime`` (one set-up for every command).
With more than one process every decoder layer is sharded with FSDP2
(``torch.distributed.fsdp.fully_shard``): parameters, gradients and optimizer state are split across
ranks and gathered one layer at a time. The layer class is read from the model
(``_no_split_modules``, which every HF decoder declares), so users never name it. On GPU, compute
runs in bf16 (``MixedPrecisionPolicy``) while gradients are reduced in fp32; on CPU (gloo)
everything stays fp32, which is what lets CI test real sharded training.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from conretriever.runtime import rank, world_size


def all_gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` from all ranks along dim 0; only the local slice carries gradient.

    All ranks must pass the same shape (fixed per-device batch and negatives guarantee it).
    """
    parts = [torch.empty_like(x) for _ in range(world_size())]
    dist.all_gather(parts, x.detach().contiguous())
    parts[rank()] = x
    return torch.cat(parts, dim=0)


def all_gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    parts = [torch.empty_like(x) for _ in range(world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=0)


def decoder_layer_classes(model: nn.Module) -> set[type]:
    """The transformer block classes to shard one by one, found from the model itself."""
    names: set[str] = set()
    for module in model.modules():
        names.update(getattr(module, "_no_split_modules", None) or [])
    classes = {type(m) for m in model.modules() if type(m).__name__ in names}
    if not classes:
        raise ValueError(
            f"{type(model).__name__}: no _no_split_modules layer class found to shard; "
            "this architecture cannot be wrapped automatically"
        )
    return classes


def shard_model(model: nn.Module, device: torch.device, bf16: bool) -> nn.Module:
    """FSDP2: shard each decoder layer, then the root (embeddings, final norm, LoRA leftovers)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = (
        MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        if bf16
        else MixedPrecisionPolicy()
    )
    layer_classes = tuple(decoder_layer_classes(model))
    for module in list(model.modules()):
        if isinstance(module, layer_classes):
            fully_shard(module, mp_policy=mp)
    fully_shard(model, mp_policy=mp)
    return model


def set_gradient_sync(model: nn.Module, enabled: bool) -> None:
    """FSDP2: skip (False) or perform (True) the gradient reduce-scatter in the next backward.
    GradCache runs several backwards per step; only the last one should communicate."""
    setter = getattr(model, "set_requires_gradient_sync", None)
    if setter is not None:
        setter(enabled)
