"""What a run reports: ``metrics.jsonl`` (always, strict JSON) and TensorBoard (``report_to``).

One JSON object per logged step: ``step``, ``epoch``, ``loss``, ``accuracy`` (in-batch top-1),
``lr``, ``grad_norm`` (before clipping), ``tokens_per_s`` (real tokens, all ranks), ``step_s``,
``peak_mem_mb``; evaluation rows add ``eval/<task>/<metric>`` keys. A value that is not a finite
number is written as ``null``, so every line parses as JSON. Only rank 0 writes. On resume, rows
past the checkpoint's step are dropped, so the file reads like one uninterrupted run.
"""

from __future__ import annotations

import json
import logging
import resource
from pathlib import Path

import torch

from conretriever.files import strict_json

log = logging.getLogger("conretriever.train")


class RunLog:
    def __init__(self, out: Path, enabled: bool, tensorboard: bool, resume_step: int):
        self.enabled = enabled
        self.path = out / "metrics.jsonl"
        self.writer = None
        if not enabled:
            return
        if self.path.exists():
            rows = []
            for line in self.path.read_text().splitlines():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    continue  # a line cut by a kill: the resumed run writes it again
            keep = [r for r in rows if isinstance(r, dict) and r.get("step", 0) <= resume_step]
            self.path.write_text("".join(json.dumps(r) + "\n" for r in keep))
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(out / "tensorboard"), purge_step=resume_step + 1)
            except ImportError:
                log.warning("tensorboard is not installed; metrics go to metrics.jsonl only")

    def log(self, row: dict, prefix: str = "train") -> None:
        if not self.enabled:
            return
        row = strict_json(row)
        with open(self.path, "a") as handle:
            handle.write(json.dumps(row, allow_nan=False) + "\n")
        if self.writer:
            for key, value in row.items():
                if key != "step" and isinstance(value, int | float) and value is not None:
                    name = key if "/" in key else f"{prefix}/{key}"
                    self.writer.add_scalar(name, value, row["step"])

    def close(self) -> None:
        if self.writer:
            self.writer.close()


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
