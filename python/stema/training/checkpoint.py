"""Atomic checkpoints: written to a temporary folder beside the target, then renamed into place,
so a crash never leaves a half-written checkpoint that resume would pick up. The weights and
optimizer go into a `torch.distributed.checkpoint` folder that every rank writes its shards to;
the rest (rank 0's) into one file."""

from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

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
) -> Path:
    """Write `state` (a dict of state_dicts and plain values, rank 0's) as checkpoint `step`,
    atomically; then delete all but the newest `keep` checkpoints.

    `write_sharded(folder)` runs on every rank of `world` (a `stema.distributed.World`; None: one
    process) and writes the sharded weights and optimizer into `folder` inside the staging folder;
    the ranks must share the file system. Only rank 0 writes `state`, renames and prunes.
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
        write_sharded(staging / SHARDED_DIR)
    if world is not None:
        world.barrier()
    if is_main:
        torch.save(state, staging / STATE_FILE)
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
        for _, old in list_checkpoints(root)[:-keep] if keep > 0 else []:
            shutil.rmtree(old)
    if world is not None:
        world.barrier()
    return target


def load_latest_checkpoint(root: Path) -> tuple[int, dict] | None:
    checkpoints = list_checkpoints(root)
    if not checkpoints:
        return None
    step, folder = checkpoints[-1]
    return step, torch.load(folder / STATE_FILE, map_location="cpu", weights_only=False)
