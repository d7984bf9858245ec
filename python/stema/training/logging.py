"""Metrics to JSONL (always) and TensorBoard (when installed), plus the progress bar."""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path


class MetricsLogger:
    """Appends one JSON object per log call to `metrics.jsonl`; mirrors scalars to TensorBoard.
    A run resumed at `resumed_step` tells TensorBoard to purge the older event files' records of
    later steps (`purge_step`), as `folder.truncate_metrics` cuts metrics.jsonl back."""

    def __init__(self, output_dir: Path, *, tensorboard: bool, resumed_step: int = 0):
        self.path = Path(output_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open("a")
        self._writer = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                SummaryWriter = None
            if SummaryWriter is not None:
                self._writer = SummaryWriter(str(Path(output_dir) / "tensorboard"), purge_step=resumed_step + 1 if resumed_step else None)

    def log(self, split: str, step: int, metrics: dict[str, float]) -> None:
        record = {"split": split, "step": step, "time": round(time.time(), 3)}
        record.update({key: _plain(value) for key, value in metrics.items()})
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._writer is not None:
            for key, value in metrics.items():
                if isinstance(value, (int, float)) and math.isfinite(value):
                    self._writer.add_scalar(f"{split}/{key}", value, step)

    def close(self) -> None:
        self._file.close()
        if self._writer is not None:
            self._writer.close()


def _plain(value):
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float):
        return round(value, 7) if math.isfinite(value) else str(value)
    return value


def read_metrics(output_dir: Path, split: str | None = None) -> list[dict]:
    """The records of `metrics.jsonl`, optionally of one split ('train', 'eval')."""
    path = Path(output_dir) / "metrics.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in records if split is None or r["split"] == split]


def progress_bar(total: int, initial: int, *, enabled: bool, description: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, desc=description, file=sys.stderr, dynamic_ncols=True)
