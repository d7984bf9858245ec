"""Test helper: a run folder as a run that died right after one of its checkpoints left it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from stema.training.checkpoint import list_checkpoints
from stema.training.logging import read_metrics


def died_after(run: Path, step: int, *, source: Path | None = None) -> Path:
    """Cut `run` back to what it held when it died right after its step-`step` checkpoint: later
    checkpoints removed, metrics.jsonl keeping the records up to `step`. With `source`, `run` is
    first given `source`'s checkpoints and metrics (a copy of another run, which stays whole)."""
    run = Path(run)
    if source is not None:
        shutil.copytree(Path(source) / "checkpoints", run / "checkpoints")
    for saved, folder in list_checkpoints(run / "checkpoints"):
        if saved > step:
            shutil.rmtree(folder)
    records = [record for record in read_metrics(source or run) if record["step"] <= step]
    (run / "metrics.jsonl").write_text("".join(json.dumps(record) + "\n" for record in records))
    return run
