"""The run folder: one run's state, never mixed with another's.

- A new run (no `trainer.resume`) starts only in an absent or empty `trainer.output_dir`; with
  `trainer.overwrite` the old folder is first moved aside to `<output_dir>.old-<k>` (nothing is
  deleted). A folder that holds anything else is refused before anything is written.
- Every checkpoint carries the run's settings (`settings.json`: the config flattened to dotted keys,
  plus a fingerprint of the training data). Resume compares them with the new run's: a changed
  setting in `APPLY_ON_RESUME` applies and is reported, any other is refused, naming the keys.
- `metrics.jsonl` is cut back to the resumed checkpoint's step, so a resumed run logs each step once.
- Files are written whole or not at all, and a write that fails (no space left, read-only folder)
  stops the run with one line naming the file and the reason.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

SETTINGS_FILE = "settings.json"
METRICS_FILE = "metrics.jsonl"

# Settings that may change when a run resumes, and how each applies. Every other setting is part
# of the run's identity (the model, the data, the optimizer, the loss, the batch, the seed).
APPLY_ON_RESUME = {
    "trainer.max_steps": "the run trains up to the new step count; the learning rate continues from its value at the resumed step",
    "trainer.epochs": "as trainer.max_steps (the step count follows from the epochs)",
    "trainer.micro_batch_size": "memory only: micro-batches add up to the same global batch",
    "trainer.eval_every": "evaluation schedule from now on",
    "trainer.save_every": "checkpoint schedule from now on",
    "trainer.keep_checkpoints": "retention from the next checkpoint on",
    "trainer.log_every": "logging from now on",
    "trainer.progress_bar": "display only",
    "trainer.tensorboard": "logging only",
    "trainer.export_hf": "the final export",
    "trainer.resume": "this resume",
    "trainer.overwrite": "not read when resuming",
    "trainer.output_dir": "the folder (a moved run folder resumes)",
    "model.lora.merge_on_export": "the final export",
    "critic.lora.merge_on_export": "the final export",
    "model.gradient_checkpointing": "memory only: activations recomputed, the same gradients",
    "critic.gradient_checkpointing": "memory only: activations recomputed, the same gradients",
    "data.eval": "evaluation data",
    "data.builtin_eval_size": "evaluation data",
    "reward.eval_function": "evaluation reward",
    "spin.iterations": "self-play iterations (finished ones are not trained again)",
}
UNREPORTED = ("trainer.resume", "trainer.overwrite")  # how this run starts, not what it trains
# Checkpoints resume at any world size and any number of role workers (placement, not arithmetic).
APPLY_ON_RESUME_PREFIXES = ("distributed.", "roles.")


class RunFolderError(ValueError):
    """An output folder or checkpoint this run cannot use or write; the message names the path."""


def is_empty_folder(path: Path) -> bool:
    return path.is_dir() and not any(path.iterdir())


def check_output_dir(path: Path, *, resume: bool, overwrite: bool) -> None:
    """Refuse an output folder this run must not write into (nothing is written here): a file, or a
    folder holding anything while neither `trainer.resume` nor `trainer.overwrite` is set."""
    if path.exists() and not path.is_dir():
        raise RunFolderError(f"trainer.output_dir: {path} is a file, not a folder")
    if resume or overwrite or not path.exists() or is_empty_folder(path):
        return
    held = ", ".join(sorted(child.name for child in path.iterdir())[:5])
    raise RunFolderError(
        f"trainer.output_dir: {path} is not empty (holds {held}); set trainer.resume=true to continue the run in it, "
        f"trainer.overwrite=true to move it aside and start anew, or choose another folder"
    )


def move_aside(path: Path) -> Path | None:
    """Rename a non-empty folder to `<path>.old-<k>` (the first free k); the new name, or None
    when there was nothing to move."""
    if not path.exists() or is_empty_folder(path):
        return None
    k = 1
    while path.with_name(f"{path.name}.old-{k}").exists():
        k += 1
    target = path.with_name(f"{path.name}.old-{k}")
    try:
        os.rename(path, target)
    except OSError as error:
        raise RunFolderError(f"trainer.overwrite: cannot move {path} aside to {target}: {error.strerror}") from None
    return target


def write_file(path: Path, data: bytes | str) -> None:
    """Write `data` to `path` whole (through a temporary file renamed into place); an OSError
    (no space left on device, read-only file system) becomes a RunFolderError naming the file."""
    path = Path(path)
    staging = path.with_name(f".{path.name}.tmp")
    try:
        with open(staging, "wb") as file:
            file.write(data.encode("utf-8") if isinstance(data, str) else data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(staging, path)
    except OSError as error:
        with contextlib.suppress(OSError):
            staging.unlink(missing_ok=True)
        raise RunFolderError(f"{path}: cannot write: {error.strerror or error}") from None


def flatten(config: Any, prefix: str = "") -> dict[str, Any]:
    """A config dataclass (or dict) as {dotted key: leaf value}."""
    values = dataclasses.asdict(config) if dataclasses.is_dataclass(config) else config
    flat: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, dict) or dataclasses.is_dataclass(value):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def data_fingerprint(source: str) -> str:
    """sha256 over a data file's bytes (a folder: each file's relative path and bytes); '' for
    'builtin' or no data (the built-in task is fixed by its settings)."""
    if not source or source == "builtin":
        return ""
    path = Path(source)
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    digest = hashlib.sha256()
    for file in files:
        digest.update(str(file.relative_to(path) if path.is_dir() else file.name).encode())
        with open(file, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def run_settings(config: Any) -> dict[str, Any]:
    """What a checkpoint records of its run: the flattened config and the training data's fingerprint."""
    settings = flatten(config)
    data = getattr(config, "data", None)
    if data is not None:
        settings["data.train_sha256"] = data_fingerprint(data.train)
    return settings


def applies_on_resume(key: str) -> bool:
    return key in APPLY_ON_RESUME or key.startswith(APPLY_ON_RESUME_PREFIXES)


def compare_settings(saved: dict[str, Any], current: dict[str, Any], *, where: Path) -> list[str]:
    """The changes from `saved` to `current` that apply on resume ('key: old -> new'); a
    RunFolderError naming every other changed key. Keys that only one side has (settings added or removed between stema
    versions) are not compared."""
    current = json.loads(json.dumps(current))  # as the checkpoint holds them (tuples as lists)
    # A key only one side knows comes from another stema version's config, not from this run.
    changed = [key for key in sorted(set(saved) & set(current)) if saved[key] != current[key]]
    refused = [key for key in changed if not applies_on_resume(key)]
    if refused:
        shown = "; ".join(f"{key}: {_short(saved[key])} in the checkpoint, now {_short(current[key])}" for key in refused[:6])
        more = f" (and {len(refused) - 6} more)" if len(refused) > 6 else ""
        raise RunFolderError(
            f"trainer.resume: {where} was written by a run with other settings, which cannot change on resume: {shown}{more}; "
            f"resume with the same settings, or start a new run (another trainer.output_dir, or trainer.overwrite=true)"
        )
    return [f"{key}: {_short(saved[key])} -> {_short(current[key])}" for key in changed if key not in UNREPORTED]


def _short(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


def truncate_metrics(output_dir: Path, step: int, *, final: bool = False) -> None:
    """Keep the records of `metrics.jsonl` up to `step` (all of them with step <= `step`, none when
    `step` is 0); a torn last line from a killed write is dropped too. With `final` (`step` is the
    run's last, whose final evaluation the resumed run logs again) the eval records of `step` go
    too. Rewritten atomically."""
    path = Path(output_dir) / METRICS_FILE
    if not path.exists():
        return
    kept = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if not isinstance(record, dict) or step == 0 or record.get("step", step + 1) > step:
            continue
        if not (final and record["step"] == step and record.get("split") == "eval"):
            kept.append(line + "\n")
    write_file(path, "".join(kept))


def clear_folder(path: Path, *, existed: bool) -> None:
    """Undo a run that stopped before training: remove `path` (or, when it `existed` empty
    before the run, what the run put in it)."""
    if not path.is_dir():
        return
    if not existed:
        shutil.rmtree(path, ignore_errors=True)
        return
    for child in path.iterdir():
        if child.is_dir():
            shutil.rmtree(child, ignore_errors=True)
        else:
            child.unlink(missing_ok=True)
