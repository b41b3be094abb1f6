"""The run's metrics: `metrics.jsonl` (one JSON row per log step, flushed as written) and TensorBoard."""

import json
import math
from pathlib import Path

from dinokit.io import atomic_write


class MetricsLog:
    """Append rows {"iteration": i, ...} to `folder/metrics.jsonl` and TensorBoard scalars to
    `folder/tensorboard`. On resume from the checkpoint of iteration i, rows after i (written by the
    interrupted run after that checkpoint) are dropped first, so the file reads as one uninterrupted run."""

    def __init__(self, folder: str | Path, tensorboard: bool = True, resume_from: int | None = None) -> None:
        self.path = Path(folder) / "metrics.jsonl"
        if resume_from is not None and self.path.exists():
            kept = [
                line
                for line in self.path.read_text().splitlines()
                if line.strip() and json.loads(line).get("iteration", 0) <= resume_from
            ]
            atomic_write(self.path, lambda tmp: Path(tmp).write_text("".join(k + "\n" for k in kept)))
        self.file = self.path.open("a")
        self.writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            purge = resume_from + 1 if resume_from is not None else None
            self.writer = SummaryWriter(str(Path(folder) / "tensorboard"), purge_step=purge)

    def write(self, row: dict) -> None:
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}
        self.file.write(json.dumps(clean) + "\n")
        self.file.flush()
        if self.writer is not None:
            step = row["iteration"]
            for key, value in row.items():
                if key != "iteration" and isinstance(value, int | float) and not isinstance(value, bool):
                    self.writer.add_scalar(key, value, step)

    def close(self) -> None:
        self.file.close()
        if self.writer is not None:
            self.writer.close()


def read_metrics(path: str | Path) -> list[dict]:
    """Rows of a metrics.jsonl file."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
