"""Atomic checkpoints: written to a temporary folder beside the target, then renamed into place,
so a crash never leaves a half-written checkpoint that resume would pick up."""

from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

CHECKPOINT_PATTERN = re.compile(r"^step-(\d{8})$")
STATE_FILE = "trainer_state.pt"


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


def save_checkpoint(root: Path, step: int, state: dict, *, keep: int) -> Path:
    """Write `state` (a dict of state_dicts and plain values) as checkpoint `step`, atomically;
    then delete all but the newest `keep` checkpoints."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    target = checkpoint_dir(root, step)
    staging = root / f".tmp-{target.name}-{os.getpid()}"
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir()
    torch.save(state, staging / STATE_FILE)
    if target.exists():
        shutil.rmtree(target)
    os.replace(staging, target)
    for _, old in list_checkpoints(root)[:-keep] if keep > 0 else []:
        shutil.rmtree(old)
    return target


def load_latest_checkpoint(root: Path) -> tuple[int, dict] | None:
    checkpoints = list_checkpoints(root)
    if not checkpoints:
        return None
    step, folder = checkpoints[-1]
    return step, torch.load(folder / STATE_FILE, map_location="cpu", weights_only=False)
