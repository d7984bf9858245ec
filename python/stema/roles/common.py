"""What several role workers share: their device, moving a batch there, their policy's log-probs,
and the Hugging Face export of a (possibly sharded) role model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from stema.config import TrainerConfig
from stema.distributed import World
from stema.models.loading import eval_mode
from stema.training.loop import autocast_context

from .experience import model_inputs


def role_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def on_device(device: torch.device, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {key: value.to(device) for key, value in batch.items()}


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
    from stema.training.logprobs import completion_token_logprobs

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
