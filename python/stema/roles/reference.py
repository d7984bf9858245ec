"""The reference role: a frozen copy of the starting policy, whose log-probs the KL penalty compares
with the actor's (`roles.reference: copy`, or `cpu_offload` to keep it in CPU memory between calls;
with `lora` the actor is its own reference and this role is not started)."""

from __future__ import annotations

import dataclasses

import torch

from stema.config import LoraConfig, ModelConfig, TrainerConfig

from .common import policy_logprobs, role_device
from .groups import concat_rows, split_rows


class ReferenceWorker:
    """A frozen copy of the starting policy; with `offload` its weights stay in CPU memory and move
    to the device only for the duration of a call."""

    def __init__(self, *, model_cfg: ModelConfig, trainer_cfg: TrainerConfig, temperature: float, cache_dir: str, offload: bool):
        from stema.models.loading import load_policy

        reference_model_cfg = dataclasses.replace(model_cfg, lora=LoraConfig())
        self.model, _ = load_policy(reference_model_cfg, cache_dir=cache_dir)
        self.model.eval().requires_grad_(False)
        self.trainer_cfg, self.temperature = trainer_cfg, temperature
        self.device = role_device()
        self.offload = offload
        if not offload:
            self.model.to(self.device)

    def ready(self) -> bool:
        return True

    @split_rows(merge=concat_rows)
    @torch.no_grad()
    def logprobs(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """`[B, L]` fp32 log-probs of the response tokens under the reference."""
        if self.offload:
            self.model.to(self.device)
        try:
            return policy_logprobs(self.model, batch, trainer_cfg=self.trainer_cfg, temperature=self.temperature,
                                   device=self.device)
        finally:
            if self.offload:
                self.model.to("cpu")
