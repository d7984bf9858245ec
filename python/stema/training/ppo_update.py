"""PPO's update of a trainable role model (the actor's policy, the critic's value model): minibatch
passes with gradient accumulation, over one rank's block of the rollout batch's rows.

    updater = PPOUpdater(model, optim_cfg, total_steps=100, max_grad_norm=1.0, world=world)
    metrics = updater.update(rows=row_block, action_mask=mask, epochs=1, minibatch_size=0,
                             micro_batch_size=4, seed=step, micro_loss=loss_of_rows)

The role workers (`stema.roles.actor`, `stema.roles.critic`) give it their loss; the controller's
loop is `stema.trainers.ppo`.

A model on pipeline stages (`stema.distributed.pipeline`) runs each minibatch as one schedule step
of a fixed number of micro-batches of `micro_batch_size` rows (`ppo_pipeline_microbatches`: enough
for the most rows of a minibatch that one data-parallel rank can hold), the rows a rank lacks
filled with copies of its first row whose loss mask is 0; the loss (`StageLoss`) is computed on the
last stage from its outputs, with the same global token denominator.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch

from stema.config import OptimConfig
from stema.distributed import World
from stema.distributed.blocks import RowBlock, row_blocks
from stema.distributed.parallelize import clip_grad_norm_, set_gradient_sync
from stema.distributed.pipeline import is_pipelined
from stema.distributed.role_model import gathered_state, load_gathered_state, rank_part
from stema.training.optim import build_optimizer, build_scheduler, continued_anchor, schedule_state


def ppo_pipeline_microbatches(*, sequences: int, minibatch_size: int, micro_batch_size: int, dp_size: int, pp_size: int,
                              interleaved: bool) -> int:
    """Micro-batches per minibatch on pipeline stages: the most rows of a minibatch that one
    data-parallel rank can hold (its whole block, or the whole minibatch) in `micro_batch_size`
    rows each, rounded up to a multiple of pp_size for the interleaved schedule."""
    most_rows = min(minibatch_size or sequences, math.ceil(sequences / dp_size))
    count = math.ceil(most_rows / micro_batch_size)
    return math.ceil(count / pp_size) * pp_size if interleaved else count


def stage_micro_batch(tensors: dict[str, torch.Tensor], part: torch.Tensor, *, rows: int, device: torch.device) -> dict[str, torch.Tensor]:
    """The rows `part` of `tensors` (every one `[B, ...]`, `action_mask` among them) as one pipeline
    micro-batch of exactly `rows` rows on `device`: missing rows are copies of row 0 (the schedule's
    shapes are fixed) and `loss_mask` `[rows, L]` (float) is the action mask, 0 on those copies."""
    index = torch.cat([part, part.new_zeros(rows - len(part))]).to(device)
    valid = (torch.arange(rows, device=device) < len(part)).unsqueeze(1)  # [rows, 1]
    batch = {key: value.to(device)[index] for key, value in tensors.items()}
    batch["loss_mask"] = (batch.pop("action_mask").bool() & valid).float()
    return batch


@dataclass(frozen=True)
class StageLoss:
    """A role's loss on pipeline stages.

    Attributes:
        tensors: this rank's `[B, ...]` rows: the model inputs, `action_mask` and the loss's
            per-token inputs (old log-probs, advantages, returns, ...).
        loss_of: `(outputs, batch, num_tokens)` -> (loss, metrics), from the last stage's outputs
            (logits `[rows, T, V]` or values `[rows, T, 1]`) and one `stage_micro_batch` of `tensors`.
        context: what the schedule step runs in (autocast).
    """

    tensors: dict[str, torch.Tensor]
    loss_of: Callable[[torch.Tensor, dict[str, torch.Tensor], int], tuple[torch.Tensor, dict]]
    context: Any


class PPOUpdater:
    """A trainable model with its AdamW and lr schedule, updated by PPO's minibatch passes.

    One `update` call is one PPO step: `epochs` passes over the rollout batch's rows in seeded
    random order, one optimizer step per minibatch of `minibatch_size` rows, each minibatch in
    micro-batches whose losses use the minibatch's token count as the denominator (so micro-batching
    does not change the result); the lr schedule steps once per PPO step.

    In a role group each rank holds one block of the rows (`RowBlock`, the split of
    `stema.distributed.blocks.row_blocks`). Every rank draws the same global order; a rank runs the
    minibatch's rows that it holds; the denominator is the minibatch's token count over all ranks;
    FSDP2 sums the ranks' gradients, so a step equals the one-process step. Every rank makes as
    many micro-batch passes as the rank with the most rows of the minibatch (a rank with none left
    runs one of its rows with weight 0), since each pass is a collective of the sharded model.
    """

    def __init__(self, model: torch.nn.Module, optim_cfg: OptimConfig, *, total_steps: int, max_grad_norm: float, world: World):
        self.model = model
        self.world = world
        self.optim_cfg, self.total_steps, self.anchor = optim_cfg, total_steps, None
        self.optimizer = build_optimizer(model, optim_cfg)
        self.scheduler = build_scheduler(self.optimizer, optim_cfg, total_steps=total_steps)
        self.max_grad_norm = max_grad_norm

    def _row_tokens(self, action_mask: torch.Tensor, rows: RowBlock) -> torch.Tensor:
        """`[total]` action tokens of every row of the global batch (this rank knows its block)."""
        counts = torch.zeros(rows.total, dtype=torch.int64, device=self.world.device)
        counts[rows.start : rows.stop] = action_mask.sum(-1).to(self.world.device)
        if self.world.dp_size > 1:
            import torch.distributed as dist

            dist.all_reduce(counts, group=self.world.mesh["dp"].get_group())
        return counts.cpu()

    def update(self, *, rows: RowBlock, action_mask: torch.Tensor, epochs: int, minibatch_size: int, micro_batch_size: int,
               seed: int, micro_loss: Callable[[torch.Tensor, int], tuple[torch.Tensor, dict]],
               stage_loss: StageLoss | None = None) -> dict[str, float]:
        """Metrics averaged over the optimizer steps (each a sum of micro-batch contributions over
        the ranks); `action_mask` is this rank's `[rows, L]`, `micro_loss` takes this rank's row
        indices and the global denominator; a model on pipeline stages uses `stage_loss` instead."""
        blocks = row_blocks(rows.total, self.world.dp_size)
        if blocks[self.world.dp_rank] != rows:
            raise ValueError(f"{self.world.describe()}: got rows {rows}, expected {blocks[self.world.dp_rank]}")
        row_tokens = self._row_tokens(action_mask, rows)
        generator = torch.Generator().manual_seed(seed)
        minibatch_size = minibatch_size or rows.total
        sums: dict[str, float] = {}
        steps = 0
        self.model.train()
        for _ in range(epochs):
            order = torch.randperm(rows.total, generator=generator)
            for start in range(0, rows.total, minibatch_size):
                minibatch = order[start : start + minibatch_size]
                num_tokens = max(1, int(row_tokens[minibatch].sum()))
                mine = minibatch[(minibatch >= rows.start) & (minibatch < rows.stop)] - rows.start  # in draw order
                if is_pipelined(self.model):
                    totals = self._stage_step(mine, stage_loss, micro_batch_size=micro_batch_size, num_tokens=num_tokens)
                else:
                    passes = max(math.ceil(int(((minibatch >= b.start) & (minibatch < b.stop)).sum()) / micro_batch_size)
                                 for b in blocks)
                    totals = self._accumulate(mine, micro_loss, passes=passes, micro_batch_size=micro_batch_size,
                                              num_tokens=num_tokens)
                totals = self.world.sum_over_data_parallel(totals)
                if self.max_grad_norm > 0:
                    parameters = [p for p in self.model.parameters() if p.requires_grad]
                    pipeline_group = self.world.mesh["pp"].get_group() if is_pipelined(self.model) else None
                    totals["grad_norm"] = float(clip_grad_norm_(parameters, self.max_grad_norm, pipeline_group=pipeline_group))
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                for key, value in totals.items():
                    sums[key] = sums.get(key, 0.0) + value
                steps += 1
        metrics = {key: value / steps for key, value in sums.items()}
        metrics["lr"] = self.scheduler.get_last_lr()[0]
        self.scheduler.step()
        return metrics

    def _accumulate(self, mine: torch.Tensor, micro_loss: Callable, *, passes: int, micro_batch_size: int,
                    num_tokens: int) -> dict[str, float]:
        """Forward and backward of this rank's rows `mine` in `passes` micro-batches (gradients
        reduced in the last); the summed loss and metrics."""
        totals: dict[str, float] = {}
        for index in range(passes):
            part = mine[index * micro_batch_size : (index + 1) * micro_batch_size]
            set_gradient_sync(self.model, index == passes - 1)
            loss, metrics = micro_loss(part if len(part) else torch.zeros(1, dtype=torch.int64), num_tokens)
            if not len(part):  # a pass only to join the other ranks' collectives
                loss, metrics = loss * 0.0, {key: value * 0.0 for key, value in metrics.items()}
            loss.backward()
            for key, value in {"loss": loss.detach(), **metrics}.items():
                totals[key] = totals.get(key, 0.0) + float(value)
        return totals

    def _stage_step(self, mine: torch.Tensor, stage_loss: StageLoss, *, micro_batch_size: int, num_tokens: int) -> dict[str, float]:
        """This rank's rows `mine` through the pipeline schedule as its fixed number of
        micro-batches (module docstring); the loss and metrics summed over the stages."""
        pipeline = self.model.pipeline
        if len(mine) > pipeline.microbatches * micro_batch_size:
            raise ValueError(f"{self.world.describe()}: {len(mine)} rows of a minibatch do not fit {pipeline.microbatches} "
                             f"pipeline micro-batches of {micro_batch_size}")
        batches = [stage_micro_batch(stage_loss.tensors, mine[index * micro_batch_size : (index + 1) * micro_batch_size],
                                     rows=micro_batch_size, device=self.world.device)
                   for index in range(pipeline.microbatches)]
        totals = pipeline.train_step(batches, loss_of=lambda outputs, batch: stage_loss.loss_of(outputs, batch, num_tokens),
                                     context=stage_loss.context)
        return self.world.sum_over_pipeline(totals)

    def state_dict(self) -> dict:
        """The model's trainable weights and the optimizer state keyed by parameter name (whole
        tensors on the CPU; a sharded model's gathered on rank 0: a collective), and the schedule.
        The same layout at every world size, so a checkpoint taken with N workers resumes with M."""
        return {**gathered_state(self.model, self.optimizer), "scheduler": self.scheduler.state_dict(),
                "schedule": schedule_state(total_steps=self.total_steps, anchor=self.anchor)}

    def load_state_dict(self, state: dict) -> None:
        """Resume from `state`; a run whose step count changed continues its lr from the value it
        had reached (`optim.continued_anchor`). The schedule is rebuilt before the optimizer state
        is loaded, which restores the lr the optimizer holds."""
        check_trainable_names(self.model, rank_part(self.model, state)["model"])
        self.anchor = continued_anchor(state.get("schedule"), step=state["scheduler"]["last_epoch"], total_steps=self.total_steps,
                                       cfg=self.optim_cfg)
        self.scheduler = build_scheduler(self.optimizer, self.optim_cfg, total_steps=self.total_steps, anchor=self.anchor)
        load_gathered_state(self.model, self.optimizer, state)
        self.scheduler.load_state_dict(state["scheduler"])


def check_trainable_names(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Refuse a checkpoint that lacks one of the role's trainable parameters or holds a weight the
    model does not have (tied weights appear under each of their names)."""
    missing = {name for name, parameter in model.named_parameters() if parameter.requires_grad} - set(state)
    unexpected = set(state) - set(model.state_dict())
    if missing or unexpected:
        raise ValueError(
            f"the checkpoint does not match the role's trainable parameters (missing {sorted(missing)[:5]}, "
            f"unexpected {sorted(unexpected)[:5]}): resume needs the same model and LoRA settings"
        )
