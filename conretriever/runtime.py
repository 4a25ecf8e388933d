"""Runtime: which processes and devices a command runs on; one set-up for every command.

``torchrun --nproc_per_node N -m conretriever <command> ...`` starts N processes (on any number
of nodes); plain ``python -m conretriever <command>`` is a world of one. :func:`init_distributed`
joins the process group torchrun describes (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``, NCCL on
GPUs, gloo on CPUs) and picks this process's device; ``train``, ``eval``, ``encode`` and
``mine`` all call it, and everything else asks :func:`rank` / :func:`world_size`, which are 0 / 1
when no group is initialised.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(group_of_one: bool = False) -> DistInfo:
    """Join the torchrun process group if launched by torchrun; else a world of one.
    ``group_of_one``: initialise a process group even for one process (FSDP2 needs one: the
    ``--fsdp true`` switch that shards at world size 1, to run the multi-GPU code path on one
    device); without torchrun's variables it listens on a free loopback port."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if (world > 1 or group_of_one) and not dist.is_initialized():
        if world == 1:
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(_free_port()))
            os.environ.setdefault("RANK", "0")
            os.environ.setdefault("WORLD_SIZE", "1")
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, device_id=device if backend == "nccl" else None)
    return DistInfo(rank=rank(), world_size=world_size(), local_rank=local_rank, device=device)


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def cleanup(synchronize: bool = True) -> None:
    """Leave the process group. ``synchronize`` (a normal exit) waits for every rank first: a
    rank that tears gloo's connections down while a peer still uses them makes that peer abort
    ("terminate called without an active exception"). After an error, ranks may be in different
    collectives, so no barrier then."""
    if is_distributed():
        if synchronize:
            dist.barrier()
        dist.destroy_process_group()
