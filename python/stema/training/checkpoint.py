"""Atomic checkpoints: written to a temporary folder beside the target, then renamed into place,
so a crash never leaves a half-written checkpoint that resume would pick up. The weights and
optimizer go into a `torch.distributed.checkpoint` folder that every rank writes its shards to;
the rest (rank 0's) into one file, and the run's settings into `settings.json`.

Loading runs no code from the folder: the state file holds only tensors and plain values and is
read with `torch.load(weights_only=True)`, so a tampered file (a pickle that would call a function)
is refused with a `RunFolderError` before anything in it runs.
"""

from __future__ import annotations

import errno
import io
import json
import os
import pickle
import random
import re
import shutil
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch.distributed.checkpoint.api import CheckpointException

from .folder import SETTINGS_FILE, RunFolderError, write_file

CHECKPOINT_PATTERN = re.compile(r"^step-(\d{8})$")
STATE_FILE = "trainer_state.pt"  # rank 0's: lr schedule, sampler position, RNGs
SHARDED_DIR = "model_optimizer"  # torch.distributed.checkpoint folder: trainable weights, optimizer


def rng_state() -> dict:
    numpy_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": (numpy_state[0], numpy_state[1].tolist(), *numpy_state[2:]),
        "torch": torch.random.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), *rest))
    torch.random.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoint_dir(root: Path, step: int) -> Path:
    return Path(root) / f"step-{step:08d}"


def list_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every complete checkpoint under root, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = CHECKPOINT_PATTERN.match(child.name)
        if match and (child / STATE_FILE).is_file():
            found.append((int(match.group(1)), child))
    return sorted(found)


def save_checkpoint(
    root: Path,
    step: int,
    state: dict,
    *,
    keep: int,
    write_sharded: Callable[[Path], None] | None = None,
    world: Any = None,
    settings: dict | None = None,
) -> Path:
    """Write `state` (a dict of tensors, state_dicts and plain values, rank 0's) and the run's
    `settings` (JSON values; `stema.training.folder.run_settings`) as checkpoint `step`,
    atomically; then delete all but the newest `keep` checkpoints.

    `write_sharded(folder)` runs on every rank of `world` (a `stema.distributed.World`; None: one
    process) and writes the sharded weights and optimizer into `folder` inside the staging folder;
    the ranks must share the file system. Only rank 0 writes `state`, renames and prunes. A write
    that fails for want of space (or any OSError) removes the staging folder and raises a
    RunFolderError naming the folder and the reason.
    """
    root = Path(root)
    is_main = world is None or world.is_main
    target = checkpoint_dir(root, step)
    staging = root / f".tmp-{target.name}"  # the same name on every rank
    if is_main:
        root.mkdir(parents=True, exist_ok=True)
        if staging.exists():
            shutil.rmtree(staging)
        staging.mkdir()
    if world is not None:
        world.barrier()
    if write_sharded is not None:
        _write_sharded(write_sharded, staging)
    if world is not None:
        world.barrier()
    if is_main:
        buffer = io.BytesIO()
        torch.save(state, buffer)
        _write_or_discard(staging, STATE_FILE, buffer.getvalue())
        _write_or_discard(staging, SETTINGS_FILE, json.dumps({"step": step, "settings": settings or {}}, indent=1) + "\n")
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
        for _, old in list_checkpoints(root)[:-keep] if keep > 0 else []:
            shutil.rmtree(old)
    if world is not None:
        world.barrier()
    return target


def _write_or_discard(staging: Path, name: str, data: bytes | str) -> None:
    try:
        write_file(staging / name, data)
    except RunFolderError:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _write_sharded(write_sharded: Callable[[Path], None], staging: Path) -> None:
    """`write_sharded` into the staging folder; a failure to write (an OSError in the failure, or,
    as torch's zip writer reports a short write only as 'unexpected pos', a probe write into the
    staging folder that fails right after) removes the staging folder and becomes one
    RunFolderError line with the system's reason ('No space left on device')."""
    try:
        write_sharded(staging / SHARDED_DIR)
    except (Exception, CheckpointException) as failure:  # DCP's CheckpointException (a BaseException) wraps the writers' errors
        os_error = _os_error_in(failure) or _probe_write(staging)
        if os_error is None:
            raise
        shutil.rmtree(staging, ignore_errors=True)
        where = os_error.filename or staging / SHARDED_DIR
        reason = os_error.strerror or os.strerror(os_error.errno or errno.EIO)
        raise RunFolderError(f"{where}: cannot write the checkpoint: {reason}") from None


def _probe_write(folder: Path, size: int = 1 << 16) -> OSError | None:
    """The OSError of writing `size` bytes into `folder` now (None if it can be written). A write
    that came up short filled the disk, so the probe, made before anything is cleaned up, fails too."""
    probe = folder / ".write-probe"
    try:
        with open(probe, "wb") as file:
            file.write(b"\0" * size)
            file.flush()
            os.fsync(file.fileno())
    except OSError as error:
        return error
    finally:
        probe.unlink(missing_ok=True)
    return None


def _os_error_in(failure: BaseException) -> OSError | None:
    """The first OSError in `failure`, its causes, or (DCP's CheckpointException) its per-rank failures."""
    pending, seen = [failure], set()
    while pending:
        error = pending.pop()
        if error is None or id(error) in seen:
            continue
        seen.add(id(error))
        if isinstance(error, OSError):
            return error
        pending.extend([error.__cause__, error.__context__])
        failures = getattr(error, "failures", None)
        if isinstance(failures, dict):
            pending.extend(value[0] if isinstance(value, tuple) else value for value in failures.values())
    return None


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles a `torch.distributed.checkpoint` `.metadata` file (DCP reads it with plain
    `pickle.load`) allowing only what DCP writes there: its metadata dataclasses and enums, torch
    sizes, dtypes and layouts, paths. Any other global is refused before it is imported or called."""

    MODULES = {"torch", "torch.serialization", "pathlib", "collections", "torch.distributed.checkpoint.metadata",
               "torch.distributed.checkpoint.filesystem", "torch.distributed.checkpoint.planner"}

    def find_class(self, module: str, name: str) -> Any:
        import collections
        import dataclasses
        import enum
        import pathlib

        if module in self.MODULES:
            value = super().find_class(module, name)
            plain = (torch.Size, torch.serialization._get_layout, pathlib.PosixPath, pathlib.PurePosixPath, collections.OrderedDict)
            if isinstance(value, (torch.dtype, torch.layout, torch.memory_format)) or any(value is kind for kind in plain):
                return value
            if module.startswith("torch.distributed.checkpoint") and isinstance(value, type) and (
                dataclasses.is_dataclass(value) or issubclass(value, enum.Enum)
            ):
                return value
        raise pickle.UnpicklingError(f"GLOBAL {module}.{name} is not allowed in checkpoint metadata")


def _check_sharded_metadata(folder: Path) -> None:
    """Refuse (RunFolderError) a sharded checkpoint whose `.metadata` would run code when DCP loads it."""
    path = Path(folder) / SHARDED_DIR / ".metadata"
    if not path.is_file():
        return
    try:
        with open(path, "rb") as file:
            _MetadataUnpickler(file).load()
    except pickle.UnpicklingError as error:
        raise RunFolderError(
            f"{path}: refused: it holds {error}, which stema never writes (a tampered or foreign file); nothing in it was run"
        ) from None
    except (EOFError, ValueError, TypeError, AttributeError) as error:
        raise RunFolderError(f"{path}: cannot read the checkpoint metadata: {error}") from None


def read_state(folder: Path) -> dict:
    """A checkpoint's state file, read without running code from it (`weights_only=True`), after
    checking that its sharded folder's metadata (read by DCP with plain pickle) holds nothing else."""
    _check_sharded_metadata(folder)
    path = Path(folder) / STATE_FILE
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        reason = str(error).strip().splitlines()
        detail = next((line.strip() for line in reason if "GLOBAL" in line or "Unsupported" in line), "objects other than tensors and plain values")
        raise RunFolderError(
            f"{path}: refused: it holds {detail.rstrip('.')}, which stema never writes (a tampered or foreign file); nothing in it was run"
        ) from None
    except (RuntimeError, EOFError, OSError) as error:
        raise RunFolderError(f"{path}: cannot read the checkpoint state: {str(error).splitlines()[0]}") from None


def read_settings(folder: Path) -> dict:
    """The settings a checkpoint was written with ({} for checkpoints written before they were recorded)."""
    path = Path(folder) / SETTINGS_FILE
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))["settings"]
    except (ValueError, KeyError, TypeError) as error:
        raise RunFolderError(f"{path}: unreadable checkpoint settings ({error})") from None


def load_latest_checkpoint(root: Path) -> tuple[int, dict] | None:
    checkpoints = list_checkpoints(root)
    if not checkpoints:
        return None
    step, folder = checkpoints[-1]
    return step, read_state(folder)
