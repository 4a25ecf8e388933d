"""One optimisation step: the exact large-batch gradient (GradCache), clipping, AdamW.

:func:`train_step` is what the training loop runs each step, and what
``benchmarks/train_throughput.py`` times, so the benchmark measures the real step.

A step whose loss or gradient norm is not finite (NaN or infinity: a learning rate that makes the
run diverge, a degenerate batch) updates nothing: its gradients are dropped before the optimizer
sees them, so no NaN ever reaches the weights, and the result says ``finite=False``. The loop
decides whether to stop (see ``max_bad_steps``).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from conretriever.training.grad_cache import grad_cache_step
from conretriever.training.loss import LossOutput


@dataclass
class StepResult:
    loss: float  # global mean loss (same on every rank)
    accuracy: float  # share of global queries whose positive scores highest
    grad_norm: float  # before clipping
    lr: float  # the rate this step used
    tokens: int  # real (non-padding) tokens of this rank's batch
    seconds: float
    finite: bool  # False: nothing was updated (see the module docstring)
    stats: dict = field(default_factory=dict)  # the objective's extras (masked_share, ...)


def _as_float(value) -> float:
    if hasattr(value, "full_tensor"):  # a DTensor norm under FSDP2
        value = value.full_tensor()
    return float(value)


def train_step(
    model: torch.nn.Module,
    batch: dict,
    objective: Callable[[torch.Tensor, torch.Tensor], LossOutput],
    optimizer: torch.optim.Optimizer,
    scheduler,
    *,
    params: list[torch.nn.Parameter],
    max_grad_norm: float,
    chunk_size: int,
    chunk_tokens: int = 0,
    packed: bool = False,
    device: torch.device | None = None,
    autocast: Callable = contextlib.nullcontext,
) -> StepResult:
    """Accumulate the batch's gradient of ``objective(q_emb, d_emb)`` (GradCache with
    ``chunk_size`` / ``chunk_tokens``, packed or padded), clip it to ``max_grad_norm``, step the
    optimizer (only when finite) and the scheduler. ``batch`` is ``collate``'s output."""
    tic = time.perf_counter()
    lr = optimizer.param_groups[0]["lr"]
    out = grad_cache_step(
        model,
        batch["query"],
        batch["doc"],
        objective,
        chunk_size,
        device or next(model.parameters()).device,
        autocast,
        chunk_tokens=chunk_tokens,
        packed=packed,
    )
    grad_norm = _as_float(torch.nn.utils.clip_grad_norm_(params, max_grad_norm))
    loss = float(out.loss)
    finite = math.isfinite(loss) and math.isfinite(grad_norm)
    if finite:
        optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    tokens = int(batch["query"]["attention_mask"].sum() + batch["doc"]["attention_mask"].sum())
    return StepResult(
        loss=loss,
        accuracy=out.accuracy,
        grad_norm=grad_norm,
        lr=lr,
        tokens=tokens,
        seconds=time.perf_counter() - tic,
        finite=finite,
        stats=dict(out.stats),
    )
