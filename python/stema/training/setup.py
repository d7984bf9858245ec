"""Set-up and wrap-up that every trainer shares: output folder, saved config, device, seeds, the
process group under torchrun, model placement (FSDP2 / tensor parallel), data reports and the
final Hugging Face export.

A trainer's `run` is, in this order: `start_run` (checks that need no writing: the output folder
is free or resumable, a resumed checkpoint's settings fit, the model folders are complete, every
data record parses; then the folder and its config.yaml), then under `preparing(run)` the
tokenizer, the data (tokenized, at least one global batch) and only then the model, then `fit`.
Bad input thus stops the run before any model is loaded, and a new run that stops while preparing
leaves its output folder as it found it (absent or empty).
"""

from __future__ import annotations

import contextlib
import random
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch

from stema.config import to_yaml
from stema.distributed import World, close_world, init_world

from . import checkpoint
from .folder import (
    RunFolderError,
    check_output_dir,
    clear_folder,
    compare_settings,
    is_empty_folder,
    move_aside,
    run_settings,
    write_file,
)


@dataclass
class Run:
    command: str
    output_dir: Path
    device: torch.device
    world: World
    settings: dict = field(default_factory=dict)  # what each checkpoint records (`folder.run_settings`)
    was_empty: bool = False  # the output folder was absent or empty (or moved aside): `preparing` undoes it on failure
    new_folder: bool = False  # the output folder was absent (or moved aside): `preparing` removes it on failure

    @property
    def cache_dir(self) -> Path:
        """Where the built-in tiny model is written when model.path is 'tiny'."""
        return self.output_dir / "cache"

    @property
    def export_dir(self) -> Path:
        return self.output_dir / "hf"

    def say(self, message: str) -> None:
        if not self.world.is_main:
            return
        print(f"[stema {self.command}] {message}", file=sys.stderr, flush=True)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def start_run(config: Any, *, command: str, data_kind: str | None = None) -> Run:
    """Join the process group when launched by torchrun; check, writing nothing, that the output
    folder is free (or, with `trainer.resume`, that its checkpoint's settings fit this config),
    that the model folders are complete and that every record of the data (read as `data_kind`,
    `stema.data.formats.Kind`; None: not checked here) parses; then create the output folder
    (moving an old one aside under `trainer.overwrite`), save the resolved config beside the
    results (rank 0), seed, pick the device. The pipeline settings are checked first, before any
    process group. Errors are ConfigError, DataError or RunFolderError."""
    from stema.distributed.pipeline import check_pipeline_config
    from stema.models.loading import check_model_folders

    check_pipeline_config(config, command=command)

    world = init_world(config.distributed, role=command)
    trainer_cfg = config.trainer
    output_dir = Path(trainer_cfg.output_dir)
    run = Run(command=command, output_dir=output_dir, device=world.device, world=world)
    check_output_dir(output_dir, resume=trainer_cfg.resume, overwrite=trainer_cfg.overwrite)
    check_model_folders(config)
    if data_kind is not None:
        from stema.data.dataset import read_examples

        for split in ("train", "eval"):
            read_examples(config.data, kind=data_kind, split=split)
    run.settings = run_settings(config)
    applied = _check_resume(output_dir, run.settings) if trainer_cfg.resume else None
    run.new_folder = not output_dir.exists()
    run.was_empty = run.new_folder or is_empty_folder(output_dir)
    world.barrier()  # every rank has checked the folder before rank 0 moves it aside
    if world.is_main:
        moved = move_aside(output_dir) if applied is None and trainer_cfg.overwrite else None
        if moved is not None:
            run.new_folder = run.was_empty = True
            run.say(f"trainer.overwrite: moved the previous content of {output_dir} to {moved}")
        try:
            output_dir.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise RunFolderError(f"trainer.output_dir: cannot create {output_dir}: {error.strerror}") from None
        write_file(output_dir / "config.yaml", to_yaml(config))
    world.barrier()
    seed_everything(trainer_cfg.seed)
    stages = f" x {world.pp_size} pipeline stages" if world.pp_size > 1 else ""
    where = f", {world.world_size} processes ({world.dp_size} data x {world.tp_size} tensor parallel{stages})" if world.distributed else ""
    run.say(f"output in {output_dir}, device {world.device}{where}")
    if applied:
        run.say("settings changed since the checkpoint, applied on resume: " + "; ".join(applied))
    return run


def _check_resume(output_dir: Path, settings: dict) -> list[str] | None:
    """Changes that apply on resume from the newest checkpoint in `output_dir`; None when there is
    no checkpoint to resume (the run starts anew, metrics from step 0)."""
    checkpoints = checkpoint.list_checkpoints(output_dir / "checkpoints")
    if not checkpoints:
        return None
    folder = checkpoints[-1][1]
    saved = checkpoint.read_settings(folder)
    return compare_settings(saved, settings, where=folder) if saved else []


@contextlib.contextmanager
def preparing(run: Run) -> Iterator[None]:
    """Wrap a trainer's steps between `start_run` and training (tokenizer, data, models): when one
    fails, an output folder that was absent or empty is put back so (removed, or emptied), and
    bad input leaves nothing behind. A folder that held anything is left alone."""
    try:
        yield
    except BaseException:
        if run.was_empty and run.world.is_main:
            clear_folder(run.output_dir, existed=not run.new_folder)
        raise


def place_model(run: Run, config: Any, model: torch.nn.Module) -> torch.nn.Module:
    """`model` on the run's device; under torchrun with several processes, sharded by
    `stema.distributed.parallelize` as `config.distributed` asks (call it on every model the
    ranks share: the policy, a frozen reference): `distributed.role_model.place_on_world`, which
    places LoRA models too and refuses them with tensor parallel. (`rs` and `spin` refuse LoRA
    under several processes when they build their engine's refitter:
    `stema.rollout.bucketed.engine_refitter`.) With `distributed.pp_size > 1`, this rank's
    pipeline stages of the model (`stema.distributed.pipeline.place_pipeline`)."""
    from stema.distributed.role_model import place_on_world

    if run.world.pp_size > 1:
        from stema.distributed.pipeline import pipeline_microbatches, place_pipeline

        return place_pipeline(model, run.world, config.distributed, length=config.data.max_length,
                              microbatches=pipeline_microbatches(config.distributed, config.trainer, dp_size=run.world.dp_size))

    return place_on_world(model, run.world, config.distributed)


def report_data(run: Run, split: str, examples: list, report: Any) -> None:
    """Print how many examples were kept and how over-long ones were handled (never silent)."""
    from stema.data.errors import DataError

    run.say(f"{split} data: {len(examples)} examples; {report.summary()}")
    if not examples:
        raise DataError(f"data.{split}: no example is left after length handling ({report.summary()})")


def load_splits(run: Run, data_cfg: Any, tokenizer: Any, load: Callable, *, batch_size: int | None = None) -> tuple[list, list | None]:
    """(train examples, eval examples or None) through one of `stema.data`'s loaders, each
    reported; a DataError when the training examples left fill no global batch of `batch_size`."""
    from stema.data.errors import DataError

    train_examples, train_report = load(data_cfg, tokenizer, "train")
    report_data(run, "train", train_examples, train_report)
    if batch_size is not None and len(train_examples) < batch_size:
        raise DataError(
            f"data.train: {data_cfg.train}: {len(train_examples)} usable examples are fewer than one global batch "
            f"(trainer.global_batch_size={batch_size}); {train_report.summary()}"
        )
    if not data_cfg.eval:
        return train_examples, None
    eval_examples, eval_report = load(data_cfg, tokenizer, "eval")
    report_data(run, "eval", eval_examples, eval_report)
    return train_examples, eval_examples


def prepare_data(run: Run, config: Any, load: Callable) -> tuple[Any, list, list | None]:
    """(tokenizer of `config.model`, train examples, eval examples or None) through `load`, the
    training examples filling at least one global batch: all of it before any model is loaded."""
    from stema.models.loading import load_tokenizer, resolve_model_path

    tokenizer = load_tokenizer(resolve_model_path(config.model, cache_dir=run.cache_dir))
    train_examples, eval_examples = load_splits(run, config.data, tokenizer, load, batch_size=config.trainer.global_batch_size)
    return tokenizer, train_examples, eval_examples


def export_model(run: Run, config: Any, model: Any, tokenizer: Any) -> Path | None:
    """The final Hugging Face export (`<output_dir>/hf`), when `trainer.export_hf` is on."""
    if not config.trainer.export_hf:
        return None
    from stema.models.loading import export_hf

    if run.world.distributed:
        from stema.distributed.checkpoint import unsharded_copy

        model = unsharded_copy(model)  # the whole model on rank 0, None elsewhere
    path = None
    if run.world.is_main:
        path = export_hf(model, tokenizer, run.export_dir, merge_lora=config.model.lora.merge_on_export)
        run.say(f"exported the model to {path}")
    run.world.barrier()
    return path


def fit(run: Run, config: Any, *, model: Any, tokenizer: Any, algorithm: Any, train_examples: list, eval_examples: list | None,
        close: bool = True):
    """Train with the shared loop under `config.trainer`/`config.optim`, export, and say how it
    ended; then leave the process group (with `close=False` the caller keeps it for more
    collectives, e.g. SPIN's next iteration, and calls `close_world` itself). A failed or
    timed-out collective stops the run with an error naming the role and rank
    (`stema.distributed.CollectiveError`)."""
    from .loop import train

    with run.world.failures_named():
        result = train(
            model=model,
            algorithm=algorithm,
            train_examples=train_examples,
            eval_examples=eval_examples,
            trainer_cfg=config.trainer,
            optim_cfg=config.optim,
            shuffle=config.data.shuffle,
            world=run.world,
            settings=run.settings or None,
            say=run.say,
        )
        export_model(run, config, model, tokenizer)
    if close:
        close_world(run.world)
    summary = f"done after {result.step} steps; last train loss {result.train_metrics.get('loss', float('nan')):.4f}"
    run.say(summary + (f"; eval {result.eval_metrics}" if result.eval_metrics else ""))
    return result
