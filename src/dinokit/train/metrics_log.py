"""The run's metrics: `metrics.jsonl` (one JSON row per log step, flushed as written), TensorBoard,
and the progress bar's short view of a row."""

import json
import math
from pathlib import Path

from dinokit.io import atomic_write


class MetricsLog:
    """Append rows {"iteration": i, ...} to `folder/metrics.jsonl` and TensorBoard scalars to
    `folder/tensorboard`. The run starts from iteration `resume_from` (0, or the checkpoint resumed): rows
    after it, written by an interrupted run (after its last checkpoint, or before its first one), are
    dropped first, as is a row cut short by a crash, so that the file reads as one uninterrupted run."""

    def __init__(self, folder: str | Path, tensorboard: bool = True, resume_from: int = 0) -> None:
        self.path = Path(folder) / "metrics.jsonl"
        if self.path.exists():
            kept = [row for row in parse_rows(self.path.read_text()) if row.get("iteration", 0) <= resume_from]
            text = "".join(json.dumps(row) + "\n" for row in kept)
            atomic_write(self.path, lambda tmp: Path(tmp).write_text(text))
        self.file = self.path.open("a")
        self.writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            board = Path(folder) / "tensorboard"
            purge = resume_from + 1 if board.exists() else None
            self.writer = SummaryWriter(str(board), purge_step=purge)

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
    return parse_rows(Path(path).read_text())


def parse_rows(text: str) -> list[dict]:
    """The rows of metrics.jsonl text, without a line cut short by a crash (e.g. a full disk)."""
    rows = []
    for line in text.splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def progress_postfix(row: dict) -> dict[str, str]:
    """The progress bar's short view of a metrics.jsonl row: loss, schedule values, health, speed."""
    return {
        "loss": f"{row['loss']:.3f}",
        "lr": f"{row['lr']:.3g}",
        "wd": f"{row['weight_decay']:.3g}",
        "mom": f"{row['momentum']:.4f}",
        "temp": f"{row['teacher_temp']:.3g}",
        "ent": f"{row['teacher_entropy']:.2f}",
        "spread": f"{row['cls_spread']:.2f}",
        "img_s": f"{row['img_per_s']:.1f}",
        "wait": f"{100 * row['data_wait']:.0f}%",
    }
