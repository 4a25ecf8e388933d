"""Helper for tests/test_objectives.py: the contrastive loss with a false-negative margin and
cross-device negatives on 2 gloo ranks, and the two similarity-distillation terms (the full KL
and its rest, every text's row), against the same global batch in one process.

usage: torchrun --nproc_per_node 2 loss_dist_check.py OUT_DIR
Writes rank<r>.json (loss, masked share, the gradient of this rank's queries, divided by the
world size as FSDP's average would; the same for the distillation terms under ``embed_``) and
single.json (the one-process reference, gradient rows split per rank).
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from conretriever import runtime
from conretriever.training.loss import LossSettings, contrastive_loss, training_loss

B, N_NEG, DIM, TAU, MARGIN = 2, 1, 6, 0.1, -0.1  # per rank; a negative margin masks some


def batch():
    g = torch.Generator().manual_seed(0)
    q = F.normalize(torch.randn(2 * B, DIM, generator=g, dtype=torch.float64), dim=-1)
    pos = F.normalize(torch.randn(2 * B, DIM, generator=g, dtype=torch.float64), dim=-1)
    neg = F.normalize(torch.randn(2 * B * N_NEG, DIM, generator=g, dtype=torch.float64), dim=-1)
    return q, pos, neg


def teacher():
    """A 5-dimensional teacher's unit vectors of the same queries, positives and negatives."""
    g = torch.Generator().manual_seed(1)
    return [F.normalize(torch.randn(n, 5, generator=g, dtype=torch.float64), dim=-1)
            for n in (2 * B, 2 * B, 2 * B * N_NEG)]  # fmt: skip


# the similarity terms alone (InfoNCE at weight 0), every text's row, the rest's too
DISTIL = LossSettings(temperature=TAU, contrastive_weight=0.0, embed_distil_model="t",
                      embed_distil_weight=0.7, embed_distil_temperature=0.2,
                      embed_distil_rows="all", embed_distil_rest_weight=0.3)  # fmt: skip


def main() -> None:
    out = Path(sys.argv[1])
    info = runtime.init_distributed()
    q, pos, neg = batch()
    r = info.rank
    local_q = q[r * B : (r + 1) * B].clone().requires_grad_()
    local_d = torch.cat([pos[r * B : (r + 1) * B], neg[r * B * N_NEG : (r + 1) * B * N_NEG]])
    result = contrastive_loss(local_q, local_d, TAU, false_negative_margin=MARGIN)
    result.backward_loss.backward()
    record = {"loss": float(result.loss), "masked_share": result.stats["masked_share"],
              "grad": (local_q.grad / info.world_size).tolist()}  # fmt: skip
    tq, tpos, tneg = teacher()
    local_t = (
        tq[r * B : (r + 1) * B],
        torch.cat([tpos[r * B : (r + 1) * B], tneg[r * B * N_NEG : (r + 1) * B * N_NEG]]),
    )
    distil_q = q[r * B : (r + 1) * B].clone().requires_grad_()
    distil = training_loss(distil_q, local_d, DISTIL, teacher_vectors=local_t)
    distil.backward_loss.backward()
    record["embed_loss"] = float(distil.loss)
    record["embed_grad"] = (distil_q.grad / info.world_size).tolist()
    (out / f"rank{r}.json").write_text(json.dumps(record))
    if r == 0:  # the same global batch in one process: [positives (all), negatives (all)]
        full_q = q.clone().requires_grad_()
        single = contrastive_loss(full_q, torch.cat([pos, neg]), TAU, cross_device=False,
                                  false_negative_margin=MARGIN)  # fmt: skip
        single.loss.backward()
        grads = full_q.grad
        one = dataclasses.replace(DISTIL, cross_device_negatives=False)
        distil_q = q.clone().requires_grad_()
        distil = training_loss(distil_q, torch.cat([pos, neg]), one,
                               teacher_vectors=(tq, torch.cat([tpos, tneg])))  # fmt: skip
        distil.backward_loss.backward()
        (out / "single.json").write_text(
            json.dumps(
                {
                    "loss": float(single.loss),
                    "masked_share": single.stats["masked_share"],
                    "grad": [grads[k * B : (k + 1) * B].tolist() for k in range(info.world_size)],
                    "embed_loss": float(distil.loss),
                    "embed_grad": [
                        distil_q.grad[k * B : (k + 1) * B].tolist() for k in range(info.world_size)
                    ],  # fmt: skip
                }
            )
        )
    runtime.cleanup()


if __name__ == "__main__":
    main()
