"""Process groups, FSDP2 sharding, and collectives that keep autograd.

Launch with ``torchrun --nproc_per_node N -m conretriever train ...`` for N processes, or plain
``python -m conretriever train`` for one. With more than one process every decoder layer is
sharded with FSDP2 (``torch.distributed.fsdp.fully_shard``): parameters, gradients and optimizer
state are split across ranks and gathered one layer at a time. The layer class is read from the
model (``_no_split_modules``, which every HF decoder declares), so users never name it. On GPU,
compute runs in bf16 (``MixedPrecisionPolicy``) while gradients are reduced in fp32; on CPU
(gloo) everything stays fp32, which is what lets CI test real sharded training.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed() -> DistInfo:
    """Join the torchrun process group if launched by torchrun; else a world of one."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, device_id=device if backend == "nccl" else None)
    rank = dist.get_rank() if dist.is_initialized() else 0
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, device=device)


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def cleanup() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


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
