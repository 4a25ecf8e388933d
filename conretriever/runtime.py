"""Runtime: which processes and devices a command runs on; one set-up for every command.

``torchrun --nproc_per_node N -m conretriever <command> ...`` starts N processes (on any number
of nodes); plain ``python -m conretriever <command>`` is a world of one. :func:`init_distributed`
joins the process group torchrun describes (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``, NCCL on
GPUs, gloo on CPUs) and picks this process's device; ``train``, ``eval``, ``encode`` and
``mine`` all call it, and everything else asks :func:`rank` / :func:`world_size`, which are 0 / 1
when no group is initialised.

It is also the one home of three things every stage needs: this process's default device
(:func:`default_device`), "every rank runs as many forwards" (:func:`most_over_ranks`: under
FSDP each forward all-gathers weights, so a rank that stops early hangs the others) and the RNG
states (:func:`rng_state` / :func:`set_rng_state`, :func:`preserved_rng`).
"""

from __future__ import annotations

import os
import random
from contextlib import contextmanager
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
    device = torch.device("cuda", local_rank) if torch.cuda.is_available() else default_device()
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if (world > 1 or group_of_one) and not dist.is_initialized():
        if world == 1:
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(_free_port()))
            os.environ.setdefault("RANK", "0")
            os.environ.setdefault("WORLD_SIZE", "1")
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, device_id=device if backend == "nccl" else None)
    return DistInfo(rank=rank(), world_size=world_size(), local_rank=local_rank, device=device)


# oneDNN keeps up to this many compiled matrix-product kernels (its default: 1,024). A packed
# training step brings new shapes every step (the token count of its packed rows), so a full
# cache holds ~10 steps of kernels that never come back; in bf16 on the AMX Xeon (2026-12-06)
# the process grew from 5 to 10 GB over 120 recipe steps and its steps slowed from 5.2 s to
# ~8.6. One step reuses its shapes across the layers: 64 hold them. Measured over 40 steps of
# the recipe: 4.7 -> 5.5 GB at 64, 5.0 -> 8.3 GB at the default.
ONEDNN_CACHE_CAPACITY = "64"


def bound_kernel_cache() -> None:
    """Cap oneDNN's kernel cache for a training process, unless the user set
    ``ONEDNN_PRIMITIVE_CACHE_CAPACITY`` already. oneDNN reads the variable when it first builds
    a kernel, so this runs before the first matrix product of the process."""
    os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", ONEDNN_CACHE_CAPACITY)


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


def default_device() -> torch.device:
    """The current CUDA device where there is one (torchrun's ``LOCAL_RANK`` once
    :func:`init_distributed` set it), else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def most_over_ranks(*counts: int) -> tuple[int, ...]:
    """Each count's maximum over all ranks (the counts themselves in a world of one): how many
    forwards every rank must run so that none stops while the others still all-gather."""
    if not is_distributed():
        return tuple(int(c) for c in counts)
    device = default_device() if dist.get_backend() == "nccl" else torch.device("cpu")
    values = torch.tensor([int(c) for c in counts], dtype=torch.int64, device=device)
    dist.all_reduce(values, op=dist.ReduceOp.MAX)
    return tuple(int(v) for v in values.tolist())


def rng_state(torch_only: bool = False) -> dict:
    """Every RNG this process draws from: torch's CPU generator, the current CUDA device's, and
    (unless ``torch_only``) Python's ``random`` and numpy's global generator, as plain values
    (tensors, ints, lists) that ``torch.load(weights_only=True)`` reads back."""
    state: dict = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    if not torch_only:
        import numpy as np

        state["python"] = random.getstate()
        kind, keys, pos, has_gauss, gauss = np.random.get_state()
        state["numpy"] = [kind, keys.tolist(), int(pos), int(has_gauss), float(gauss)]
    return state


def set_rng_state(state: dict) -> None:
    """Restore what :func:`rng_state` captured; keys it lacks (a CUDA state on a CPU-only
    machine, numpy's in checkpoints written before it was saved) are left as they are."""
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    if "python" in state:
        python = state["python"]
        random.setstate((python[0], tuple(python[1]), python[2]))
    if "numpy" in state:
        import numpy as np

        kind, keys, pos, has_gauss, gauss = state["numpy"]
        np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))


@contextmanager
def preserved_rng():
    """Every RNG as it was before the block (evaluation during training must not move the
    training trajectory)."""
    state = rng_state()
    try:
        yield
    finally:
        set_rng_state(state)
