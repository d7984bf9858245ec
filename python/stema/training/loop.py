"""The shared training loop.

Each optimizer step:
1. take the next global batch of examples from the seeded sampler (the same on every rank);
2. ask the algorithm for the batch's global denominators (valid tokens, pairs, ...);
3. take this data-parallel rank's contiguous slice of the batch and split it into micro-batches;
   for each, collate, compute `(loss, metrics)` with the global denominators, and backpropagate;
   the gradients are summed over ranks (`stema.distributed.parallelize`), so losses, metrics and
   gradients add up to exactly the full-batch values at any world size; with pipeline stages
   (`stema.distributed.pipeline`) the micro-batches go through the schedule together and the
   last stage computes each one's loss from its logits (`Algorithm.loss_from_logits`);
4. clip the gradient norm, step AdamW and the lr schedule;
5. sum the metrics over ranks; rank 0 logs (JSONL, TensorBoard, progress bar); evaluate and
   checkpoint on their schedules.

A checkpoint holds the trainable weights and optimizer (sharded, `torch.distributed.checkpoint`),
the lr schedule, rank 0's RNGs, the sampler's position and the run's settings, so `resume=true`
continues the same loss curve exactly, also at another world size. Resume refuses a checkpoint
whose settings differ from this run's except where a change can apply (`stema.training.folder`),
cuts `metrics.jsonl` back to the checkpoint's step, and, when the step count changed, continues
the learning rate from the value it had reached (`optim.continued_anchor`).
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

import torch

from stema.config import OptimConfig, TrainerConfig
from stema.distributed import World
from stema.distributed.checkpoint import load_model_optimizer, save_model_optimizer
from stema.distributed.parallelize import clip_grad_norm_, reshard, set_gradient_sync
from stema.distributed.pipeline import is_pipelined
from stema.models.loading import eval_mode

from . import checkpoint
from .folder import RunFolderError, compare_settings, flatten, truncate_metrics
from .logging import MetricsLogger, progress_bar
from .optim import build_optimizer, build_scheduler, continued_anchor, schedule_state
from .sampler import EpochSampler


class Algorithm(Protocol):
    """What a trainer plugs into the loop (one per algorithm: SFT, reward model, DPO, ...).

    An algorithm that trains on pipeline stages also has `loss_from_logits(logits, batch,
    denominators)`: the same `(loss, metrics)` as `loss`, from the model's logits `[N, T, V]`
    (the last stage's output)."""

    name: str

    def denominators(self, examples: Sequence[Any]) -> dict[str, int]:
        """Global counts (valid tokens, pairs, ...) of one global batch, before micro-batching."""

    def collate(self, examples: Sequence[Any]) -> dict[str, torch.Tensor]:
        """Tensors of one micro-batch (on the CPU; the loop moves them to the device)."""

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor], denominators: dict[str, int]):
        """`(loss, metrics)` of one micro-batch, divided by the global denominators."""

    def num_tokens(self, batch: dict[str, torch.Tensor]) -> int:
        """Tokens processed in this micro-batch (for tokens/s)."""

    def evaluate(self, model: torch.nn.Module, examples: Sequence[Any]) -> dict[str, float]:
        """Evaluation metrics over `examples` (called under no_grad, in eval mode)."""


@dataclass
class TrainResult:
    step: int
    train_metrics: dict[str, float] = field(default_factory=dict)
    eval_metrics: dict[str, float] = field(default_factory=dict)
    resumed_from: int | None = None


def total_steps(trainer_cfg: TrainerConfig, num_examples: int) -> int:
    if trainer_cfg.max_steps > 0:
        return trainer_cfg.max_steps
    return trainer_cfg.epochs * (num_examples // trainer_cfg.global_batch_size)


def autocast_context(trainer_cfg: TrainerConfig, device: torch.device):
    """bf16 autocast on GPU under 'auto' (or anywhere under 'bf16'); fp32 otherwise."""
    use_bf16 = trainer_cfg.precision == "bf16" or (trainer_cfg.precision == "auto" and device.type == "cuda")
    if not use_bf16:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {key: value.to(device) if isinstance(value, torch.Tensor) else value for key, value in batch.items()}


def evaluate_sums(model: torch.nn.Module, algorithm: Algorithm, examples: Sequence[Any], *, micro_batch_size: int) -> dict[str, float]:
    """Loss and metrics of `examples` taken as ONE global batch: each micro-batch is scored with the
    whole set's denominators and the results are summed (the losses' convention), so the values
    are exact means over the set. Call under no_grad (run_evaluation does). A model on pipeline
    stages scores the micro-batches through its stages (`Pipeline.forward_only`; every rank
    gets the sums)."""
    device = next(model.parameters()).device
    denominators = algorithm.denominators(examples)
    batches = [to_device(algorithm.collate(examples[start : start + micro_batch_size]), device)
               for start in range(0, len(examples), micro_batch_size)]

    def scored(loss, metrics) -> dict[str, float]:
        return {key: float(value) for key, value in {"loss": loss, **metrics}.items()}

    if is_pipelined(model):
        scores = model.pipeline.forward_only(
            batches, output_of=lambda logits, batch: scored(*algorithm.loss_from_logits(logits, batch, denominators))
        )
    else:
        scores = [scored(*algorithm.loss(model, batch, denominators)) for batch in batches]
    totals: dict[str, float] = {}
    for batch_scores in scores:
        for key, value in batch_scores.items():
            totals[key] = totals.get(key, 0.0) + value
    return totals


def run_evaluation(model: torch.nn.Module, algorithm: Algorithm, examples: Sequence[Any]) -> dict[str, float]:
    """Evaluation in eval mode, under no_grad, with the RNG forked so that evaluating (even with
    sampling) never changes the training run's random stream: resume stays exact."""
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with eval_mode(model), torch.no_grad(), torch.random.fork_rng(devices=devices):
        return algorithm.evaluate(model, examples)


def resume_point(checkpoint_root: Path, settings: dict, *, resume: bool) -> tuple[int, dict] | None:
    """(step, state) of the checkpoint to resume from, None to start at step 0. Refuses (a
    RunFolderError) a checkpoint whose settings this run cannot take over, and a new run into a
    folder that already holds checkpoints (retention would mix the two runs)."""
    checkpoints = checkpoint.list_checkpoints(checkpoint_root)
    if not checkpoints:
        return None
    if not resume:
        raise RunFolderError(
            f"trainer.output_dir: {checkpoint_root} holds another run's checkpoints; set trainer.resume=true "
            "to continue it, or choose another folder"
        )
    step, folder = checkpoints[-1]
    saved = checkpoint.read_settings(folder)
    if saved:
        compare_settings(saved, settings, where=folder)
    return step, checkpoint.read_state(folder)


def accumulate_gradients(model: torch.nn.Module, algorithm: Algorithm, batches: list[dict[str, Any]],
                         denominators: dict[str, int], *, context: Callable) -> dict[str, float]:
    """Forward and backward of each micro-batch in turn, gradients accumulated (reduced over the
    data-parallel ranks in the last backward only); the summed loss and metrics."""
    totals: dict[str, float] = {}
    for index, batch in enumerate(batches):
        set_gradient_sync(model, index == len(batches) - 1)
        with context():
            loss, metrics = algorithm.loss(model, batch, denominators)
        loss.backward()
        totals["loss"] = totals.get("loss", 0.0) + loss.item()
        for key, value in metrics.items():
            totals[key] = totals.get(key, 0.0) + float(value)
    return totals


def train(
    *,
    model: torch.nn.Module,
    algorithm: Algorithm,
    train_examples: Sequence[Any],
    eval_examples: Sequence[Any] | None,
    trainer_cfg: TrainerConfig,
    optim_cfg: OptimConfig,
    shuffle: bool = True,
    world: World | None = None,
    settings: dict | None = None,
    say: Callable[[str], None] | None = None,
) -> TrainResult:
    """Run the loop described in the module docstring on this rank of `world` (default: one
    process); returns the last step's metrics (summed over ranks, the same on every rank).

    `settings` (`stema.training.folder.run_settings`; default: the trainer and optim configs,
    flattened) go into every checkpoint and are compared on resume; `say` reports the resume."""
    world = world or World(role=algorithm.name)
    output_dir = Path(trainer_cfg.output_dir)
    checkpoint_root = output_dir / "checkpoints"
    device = next(model.parameters()).device
    steps = total_steps(trainer_cfg, len(train_examples))
    if steps < 1:
        raise ValueError(
            f"nothing to train: {len(train_examples)} examples give no full global batch of "
            f"{trainer_cfg.global_batch_size} (set trainer.max_steps or add data)"
        )
    pipeline = model.pipeline if is_pipelined(model) else None
    if pipeline is None and trainer_cfg.global_batch_size % (trainer_cfg.micro_batch_size * world.dp_size):
        raise ValueError(
            f"trainer.global_batch_size ({trainer_cfg.global_batch_size}) must be a multiple of trainer.micro_batch_size "
            f"({trainer_cfg.micro_batch_size}) x data-parallel ranks ({world.dp_size})"
        )
    per_rank = trainer_cfg.global_batch_size // world.dp_size

    settings = settings if settings is not None else flatten({"trainer": trainer_cfg, "optim": optim_cfg})
    found = resume_point(checkpoint_root, settings, resume=trainer_cfg.resume)

    torch.manual_seed(trainer_cfg.seed)
    sampler = EpochSampler(len(train_examples), batch_size=trainer_cfg.global_batch_size, seed=trainer_cfg.seed, shuffle=shuffle)
    reshard(model)  # the optimizer must hold the shards, also after no-grad forwards before training
    optimizer = build_optimizer(model, optim_cfg)
    step = 0
    result = TrainResult(step=0)
    anchor = None
    if found is not None:
        step, state = found
        anchor = continued_anchor(state.get("schedule"), step=step, total_steps=steps, cfg=optim_cfg)
    scheduler = build_scheduler(optimizer, optim_cfg, total_steps=steps, anchor=anchor)
    if found is not None:
        load_model_optimizer(checkpoint.checkpoint_dir(checkpoint_root, step) / checkpoint.SHARDED_DIR, model, optimizer)
        scheduler.load_state_dict(state["scheduler"])
        sampler.load_state_dict(state["sampler"])
        checkpoint.set_rng_state(state["rng"])
        result.resumed_from = step
        if say is not None:
            say(f"resumed from step {step} of {steps}")

    def save(at_step: int) -> None:
        checkpoint.save_checkpoint(
            checkpoint_root,
            at_step,
            {
                "scheduler": scheduler.state_dict(),
                "sampler": sampler.state_dict(),
                "rng": checkpoint.rng_state(),
                "schedule": schedule_state(total_steps=steps, anchor=anchor),
                "algorithm": algorithm.name,
                "world_size": world.world_size,
            },
            keep=trainer_cfg.keep_checkpoints,
            write_sharded=lambda folder: save_model_optimizer(folder, model, optimizer),
            world=world,
            settings=settings,
        )

    if world.is_main:
        truncate_metrics(output_dir, step, final=step >= steps)
    logger = MetricsLogger(output_dir, tensorboard=trainer_cfg.tensorboard, resumed_step=step) if world.is_main else None
    bar = progress_bar(steps, step, enabled=trainer_cfg.progress_bar and world.is_main, description=algorithm.name)
    micro_size = per_rank // pipeline.microbatches if pipeline is not None else trainer_cfg.micro_batch_size
    model.train()
    try:
        while step < steps:
            started = time.perf_counter()
            examples = [train_examples[index] for index in sampler.next_batch()]
            denominators = algorithm.denominators(examples)
            mine = examples[world.dp_rank * per_rank : (world.dp_rank + 1) * per_rank]
            batches = [to_device(algorithm.collate(mine[start : start + micro_size]), device)
                       for start in range(0, len(mine), micro_size)]
            if pipeline is None:
                totals = accumulate_gradients(model, algorithm, batches, denominators,
                                              context=lambda: autocast_context(trainer_cfg, device))
            else:
                totals = world.sum_over_pipeline(pipeline.train_step(
                    batches, loss_of=lambda logits, batch: algorithm.loss_from_logits(logits, batch, denominators),
                    context=autocast_context(trainer_cfg, device),
                ))
            tokens = sum(algorithm.num_tokens(batch) for batch in batches)
            totals = world.sum_over_data_parallel({**totals, "tokens": tokens})
            if optim_cfg.max_grad_norm > 0:
                pipeline_group = world.mesh["pp"].get_group() if pipeline is not None else None
                totals["grad_norm"] = clip_grad_norm_([p for p in model.parameters() if p.requires_grad], optim_cfg.max_grad_norm,
                                                      pipeline_group=pipeline_group)
            totals["lr"] = scheduler.get_last_lr()[0]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            world.mark(step)

            elapsed = time.perf_counter() - started
            totals.update(tokens_per_s=totals["tokens"] / max(elapsed, 1e-9), epoch=sampler.epoch)
            result.train_metrics = totals
            if logger is not None and (step % max(1, trainer_cfg.log_every) == 0 or step == steps):
                logger.log("train", step, totals)
            bar.update(1)
            bar.set_postfix(loss=f"{totals['loss']:.4f}", tok_s=f"{totals['tokens_per_s']:.0f}")

            if eval_examples and trainer_cfg.eval_every > 0 and step % trainer_cfg.eval_every == 0 and step < steps:
                evaluation = run_evaluation(model, algorithm, eval_examples)
                if logger is not None:
                    logger.log("eval", step, evaluation)
            if trainer_cfg.save_every > 0 and step % trainer_cfg.save_every == 0 and step < steps:
                save(step)
        if eval_examples:
            result.eval_metrics = run_evaluation(model, algorithm, eval_examples)
            if logger is not None:
                logger.log("eval", step, result.eval_metrics)
        save(step)
    finally:
        bar.close()
        if logger is not None:
            logger.close()
    result.step = step
    return result
