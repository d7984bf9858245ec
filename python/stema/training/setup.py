"""Set-up and wrap-up that every trainer shares: output folder, saved config, device, seeds, the
process group under torchrun, model placement (FSDP2 / tensor parallel), data reports and the
final Hugging Face export."""

from __future__ import annotations

import random
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from stema.config import to_yaml
from stema.distributed import World, close_world, init_world


@dataclass
class Run:
    command: str
    output_dir: Path
    device: torch.device
    world: World

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


def start_run(config: Any, *, command: str) -> Run:
    """Join the process group when launched by torchrun, create the output folder, save the
    resolved config beside the results (rank 0), seed, pick the device."""
    world = init_world(config.distributed, role=command)
    output_dir = Path(config.trainer.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    if world.is_main:
        (output_dir / "config.yaml").write_text(to_yaml(config))
    seed_everything(config.trainer.seed)
    run = Run(command=command, output_dir=output_dir, device=world.device, world=world)
    where = f", {world.world_size} processes ({world.dp_size} data x {world.tp_size} tensor parallel)" if world.distributed else ""
    run.say(f"output in {output_dir}, device {world.device}{where}")
    return run


def place_model(run: Run, config: Any, model: torch.nn.Module) -> torch.nn.Module:
    """`model` on the run's device; under torchrun with several processes, sharded by
    `stema.distributed.parallelize` as `config.distributed` asks (call it on every model the
    ranks share: the policy, a frozen reference): `distributed.role_model.place_on_world`, which
    places LoRA models too and refuses them with tensor parallel. (`rs` and `spin` refuse LoRA
    under several processes when they build their engine's refitter:
    `stema.rollout.bucketed.engine_refitter`.)"""
    from stema.distributed.role_model import place_on_world

    return place_on_world(model, run.world, config.distributed)


def report_data(run: Run, split: str, examples: list, report: Any) -> None:
    """Print how many examples were kept and how over-long ones were handled (never silent)."""
    run.say(f"{split} data: {len(examples)} examples; {report.summary()}")
    if not examples:
        raise ValueError(f"{split} data: no example is left after length handling ({report.summary()})")


def load_splits(run: Run, data_cfg: Any, tokenizer: Any, load: Callable) -> tuple[list, list | None]:
    """(train examples, eval examples or None) through one of `stema.data`'s loaders, each reported."""
    train_examples, train_report = load(data_cfg, tokenizer, "train")
    report_data(run, "train", train_examples, train_report)
    if not data_cfg.eval:
        return train_examples, None
    eval_examples, eval_report = load(data_cfg, tokenizer, "eval")
    report_data(run, "eval", eval_examples, eval_report)
    return train_examples, eval_examples


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
        )
        export_model(run, config, model, tokenizer)
    if close:
        close_world(run.world)
    summary = f"done after {result.step} steps; last train loss {result.train_metrics.get('loss', float('nan')):.4f}"
    run.say(summary + (f"; eval {result.eval_metrics}" if result.eval_metrics else ""))
    return result
