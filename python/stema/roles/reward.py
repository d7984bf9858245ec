"""The reward role: sequence scores from a reward function (`reward.function`) or a trained reward
model (`reward.model`)."""

from __future__ import annotations

from typing import Any, Sequence

import torch

from stema.config import PPORewardConfig

from .common import role_device


class RewardWorker:
    """Sequence scores from a reward function or a trained reward model (`reward.function` /
    `reward.model`)."""

    def __init__(self, *, reward_cfg: PPORewardConfig, cache_dir: str):
        from stema.rewards import load_reward_function

        self.function = load_reward_function(reward_cfg.function) if reward_cfg.function else None
        self.eval_function = load_reward_function(reward_cfg.eval_function, field="reward.eval_function") if reward_cfg.eval_function else None
        self.scorer = None
        if reward_cfg.model:
            from stema.config import ModelConfig
            from stema.models.loading import load_reward_model
            from stema.rewards import RewardModelScorer

            model, _ = load_reward_model(ModelConfig(path=reward_cfg.model), num_labels=1, cache_dir=cache_dir)
            model.to(role_device()).eval().requires_grad_(False)
            self.scorer = RewardModelScorer(model, micro_batch_size=reward_cfg.micro_batch_size)

    def ready(self) -> bool:
        return True

    def score(self, prompts: Sequence[Any], texts: Sequence[str], prompt_token_ids: Sequence[Sequence[int]],
              response_token_ids: Sequence[Sequence[int]], *, evaluation: bool = False) -> torch.Tensor:
        """`[B]` fp32 scores of the responses (texts for a function, token ids for a model); with
        `evaluation`, by `reward.eval_function` when one is set."""
        function = self.eval_function if evaluation and self.eval_function is not None else self.function
        if function is not None:
            from stema.rewards import score_with_function

            return score_with_function(function, prompts, texts)
        return self.scorer.score(prompt_token_ids, response_token_ids)
