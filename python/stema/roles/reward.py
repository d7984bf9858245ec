"""The reward role: sequence scores from the run's `reward` section, a reward function
(`reward.function`) or a trained reward model (`reward.model`), through `stema.rewards.Reward`."""

from __future__ import annotations

from typing import Any, Sequence

import torch

from stema.config import RewardSourceConfig

from .common import role_device


class RewardWorker:
    """Sequence scores from a reward function or a trained reward model (`stema.rewards.Reward`,
    the readout `stema rm` trains); reward functions are imported from `folder` (the controller's
    current folder) first."""

    def __init__(self, *, reward_cfg: RewardSourceConfig, dtype: str, cache_dir: str, folder: str | None = None):
        from stema.rewards import Reward

        self.reward = Reward.from_config(reward_cfg, dtype=dtype, device=role_device(), cache_dir=cache_dir, folder=folder)

    def ready(self) -> bool:
        return True

    def score(self, prompts: Sequence[Any], texts: Sequence[str], prompt_token_ids: Sequence[Sequence[int]],
              response_token_ids: Sequence[Sequence[int]], *, evaluation: bool = False, locations: Sequence[str] = ()) -> torch.Tensor:
        """`[B]` fp32 scores of the responses (`Reward.score`; `locations` name the prompts' data
        lines in a bad reward value's error)."""
        return self.reward.score(prompts, texts, prompt_token_ids, response_token_ids, evaluation=evaluation, locations=locations)
