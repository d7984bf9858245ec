"""What several role workers share: their device, moving a batch there, placing a trainable role
model on its world (FSDP2, or pipeline stages), their policy's log-probs, and the Hugging Face
export of a (possibly sharded) role model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from stema.config import DistributedConfig, PPOAlgorithmConfig, TrainerConfig
from stema.distributed import World
from stema.distributed.pipeline import is_pipelined
from stema.models.loading import eval_mode
from stema.training.loop import autocast_context

from .experience import model_inputs


def role_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def on_device(device: torch.device, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {key: value.to(device) for key, value in batch.items()}


def place_role_model(model: torch.nn.Module, world: World, distributed_cfg: DistributedConfig, *, trainer_cfg: TrainerConfig,
                     ppo_cfg: PPOAlgorithmConfig, sequences: int, length: int) -> torch.nn.Module:
    """A trainable role's model on its world: sharded by FSDP2 (`place_on_world`), or with
    `distributed.pp_size > 1` this rank's pipeline stages, each minibatch of the `sequences` rollout
    rows run as `ppo_pipeline_microbatches` micro-batches, rows right-padded to `length` tokens."""
    from stema.distributed.role_model import place_on_world

    if distributed_cfg.pp_size == 1:
        return place_on_world(model, world, distributed_cfg)
    from stema.distributed.pipeline import place_pipeline
    from stema.training.ppo_update import ppo_pipeline_microbatches

    microbatches = ppo_pipeline_microbatches(
        sequences=sequences, minibatch_size=ppo_cfg.minibatch_size, micro_batch_size=trainer_cfg.micro_batch_size,
        dp_size=world.dp_size, pp_size=world.pp_size, interleaved=distributed_cfg.pp_schedule == "interleaved_1f1b",
    )
    return place_pipeline(model, world, distributed_cfg, microbatches=microbatches, length=length)


def stage_rows(model: torch.nn.Module, batch: dict[str, torch.Tensor], *, trainer_cfg: TrainerConfig, device: torch.device,
               output_of) -> torch.Tensor:
    """`output_of(outputs, micro_batch)` `[rows, length]` of the batch's rows through a model's
    pipeline stages without gradients, `trainer_cfg.micro_batch_size` rows at a time, cut back to
    the batch's width: `[B, L]` on the CPU (every rank of the pipeline group gets them)."""
    micro, inputs = trainer_cfg.micro_batch_size, model_inputs(batch)
    width = inputs["input_ids"].shape[1]
    chunks = [on_device(device, {key: value[start : start + micro] for key, value in inputs.items()})
              for start in range(0, len(inputs["input_ids"]), micro)]
    with eval_mode(model), autocast_context(trainer_cfg, device):
        outputs = model.pipeline.forward_only(chunks, output_of=lambda out, chunk: output_of(out, chunk).float().cpu())
    return torch.cat(outputs)[:, :width]


def export_model(model: torch.nn.Module, tokenizer: Any, world: World, path: str, *, merge_lora: bool) -> str:
    """The model exported to `path` in Hugging Face format; a sharded model is gathered first (a
    collective) and rank 0 writes it (the other ranks return '')."""
    from stema.models.loading import export_hf

    if world.distributed:
        from stema.distributed.checkpoint import unsharded_copy

        model = unsharded_copy(model)
        if model is None:
            return ""
    return str(export_hf(model, tokenizer, Path(path), merge_lora=merge_lora))


def policy_logprobs(model: torch.nn.Module, batch: dict[str, torch.Tensor], *, trainer_cfg: TrainerConfig, temperature: float,
                    device: torch.device) -> torch.Tensor:
    """`[B, L]` fp32 CPU log-probs of the response tokens (action layout) under `model` at `temperature`,
    `trainer_cfg.micro_batch_size` rows per forward."""
    from stema.training.logprobs import completion_token_logprobs, logits_token_logprobs

    if is_pipelined(model):
        return stage_rows(model, batch, trainer_cfg=trainer_cfg, device=device,
                          output_of=lambda logits, chunk: logits_token_logprobs(logits, chunk, temperature=temperature)[0])
    with eval_mode(model):
        outputs = []
        micro = trainer_cfg.micro_batch_size
        inputs = model_inputs(batch)
        for start in range(0, len(inputs["input_ids"]), micro):
            chunk = on_device(device, {key: value[start : start + micro] for key, value in inputs.items()})
            with autocast_context(trainer_cfg, device):
                logprobs, _ = completion_token_logprobs(model, chunk, temperature=temperature)
            outputs.append(logprobs.float().cpu())
        return torch.cat(outputs)
