"""Test helper, run as a script: the loop of test_training_loop (6 steps, a checkpoint every 2)
that SIGKILLs itself at one point of the checkpoint write of step 4 (or 6, for pruning).

    python tests/checkpoint_kill.py ROOT POINT [POINT ...]

For each POINT (one of KILL_POINTS) a forked child trains into ROOT/POINT and dies there by
SIGKILL (nothing is cleaned up, no finally runs); the script prints {point: signal that ended the
child} as JSON. Forking after one import keeps the start-up cost to one interpreter. The test then
resumes each folder and compares the loss curve with an uninterrupted run's."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
from pathlib import Path

from stema.training import checkpoint, folder, loop
from stema.training.logging import MetricsLogger

from test_training_loop import run

KILL_POINTS = (
    "staging-created",  # the staging folder exists, nothing in it
    "shards-written",  # weights and optimizer written, no state file
    "state-half-written",  # half of trainer_state.pt's bytes in its temporary file
    "state-written",  # trainer_state.pt in place, settings.json not yet
    "before-rename",  # the staging folder complete, not yet renamed
    "after-rename",  # the new checkpoint in place, the old ones not yet pruned
    "pruning",  # one file of the oldest checkpoint deleted, the rest still there
    "metrics-half-line",  # half of a metrics.jsonl record written
)
KILL_STEP = {"pruning": 6}  # retention (keep 2) first prunes when step 6 is saved


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def arm(point: str, step: int) -> None:
    """Patch the save sequence so that the process dies at `point` of checkpoint `step`."""
    staging_name = f".tmp-step-{step:08d}"
    real_write_file, real_replace, real_rmtree = folder.write_file, os.replace, shutil.rmtree
    real_save_sharded = loop.save_model_optimizer

    def save_sharded(target, model, optimizer):
        if target.parent.name == staging_name and point == "staging-created":
            die()
        real_save_sharded(target, model, optimizer)
        if target.parent.name == staging_name and point == "shards-written":
            die()

    def write_file(path, data):
        path = Path(path)
        if path.parent.name == staging_name and path.name == checkpoint.STATE_FILE and point == "state-half-written":
            path.with_name(f".{path.name}.tmp").write_bytes(data[: len(data) // 2])
            die()
        if path.parent.name == staging_name and path.name == folder.SETTINGS_FILE and point in ("state-written", "before-rename"):
            if point == "state-written":
                die()
            real_write_file(path, data)
            die()
        real_write_file(path, data)

    def replace(source, target, *args, **kwargs):
        real_replace(source, target, *args, **kwargs)
        if Path(source).name == staging_name and point == "after-rename":
            die()

    def rmtree(path, *args, **kwargs):
        path = Path(path)
        if point == "pruning" and checkpoint.CHECKPOINT_PATTERN.match(path.name):
            (path / checkpoint.STATE_FILE).unlink()
            die()
        real_rmtree(path, *args, **kwargs)

    real_log = MetricsLogger.log

    def log(self, split, step_logged, metrics):
        if point == "metrics-half-line" and split == "train" and step_logged == step:
            self._file.write('{"split": "train", "step": ')
            self._file.flush()
            die()
        real_log(self, split, step_logged, metrics)

    folder.write_file = checkpoint.write_file = write_file
    os.replace = replace
    shutil.rmtree = rmtree
    loop.save_model_optimizer = save_sharded
    MetricsLogger.log = log


def kill_at(point: str, out: Path) -> int:
    """Train into `out` in a forked child that dies at `point`; the signal that ended it (0: none)."""
    child = os.fork()
    if child == 0:
        try:
            arm(point, KILL_STEP.get(point, 4))
            run(out, dropout=0.2, save_every=2, eval_every=1)
        finally:
            os._exit(1)  # not killed: the point was never reached
    _, status = os.waitpid(child, 0)
    return os.WTERMSIG(status) if os.WIFSIGNALED(status) else 0


def main() -> None:
    root, points = Path(sys.argv[1]), sys.argv[2:]
    print(json.dumps({point: kill_at(point, root / point) for point in points}))


if __name__ == "__main__":
    main()
