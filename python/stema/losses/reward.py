"""Reward-model losses: pairwise Bradley-Terry and multi-attribute regression."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import register_loss

IGNORE_LABEL = -100.0


@register_loss("bradley_terry")
def bradley_terry_loss(
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    *,
    num_pairs: int | torch.Tensor,
    margin: torch.Tensor | None = None,
    center_rewards_coefficient: float = 0.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Pairwise preference loss of a scalar reward model (Bradley & Terry 1952; Ouyang et al. 2022,
    https://arxiv.org/abs/2203.02155; margin as in Llama 2, https://arxiv.org/abs/2307.09288).

        loss = sum_i [ -log sigmoid(r_c[i] - r_r[i] - m[i]) + c * (r_c[i] + r_r[i])^2 ] / num_pairs

    chosen_rewards, rejected_rewards `[B]`; margin `[B]` or None (m = 0); c =
    center_rewards_coefficient (Eisenstein et al. 2023, https://arxiv.org/abs/2312.09244), as TRL's
    RewardTrainer. num_pairs: pairs in the whole global batch.
    Metrics (summed over micro-batches they are batch means): accuracy (r_c > r_r), margin
    (r_c - r_r), chosen_reward, rejected_reward.
    """
    chosen_rewards = chosen_rewards.float()
    rejected_rewards = rejected_rewards.float()
    difference = chosen_rewards - rejected_rewards
    shifted = difference if margin is None else difference - margin.float()
    per_pair = -F.logsigmoid(shifted)
    if center_rewards_coefficient:
        per_pair = per_pair + center_rewards_coefficient * (chosen_rewards + rejected_rewards).square()
    loss = per_pair.sum() / num_pairs
    metrics = {
        "accuracy": (difference > 0).float().sum() / num_pairs,
        "margin": difference.detach().sum() / num_pairs,
        "chosen_reward": chosen_rewards.detach().sum() / num_pairs,
        "rejected_reward": rejected_rewards.detach().sum() / num_pairs,
    }
    return loss, metrics


@register_loss("regression")
def regression_loss(
    predictions: torch.Tensor,
    labels: torch.Tensor,
    *,
    num_valid_labels: int | torch.Tensor,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Multi-attribute regression (SteerLM attribute model, Dong et al. 2023,
    https://arxiv.org/abs/2310.05344; NeMo-Aligner's regression reward model).

        loss = sum_{i,k: y[i,k] != -100} (f(x_i)_k - y[i,k])^2 / num_valid_labels

    predictions, labels `[B, K]`; labels of -100 mark attributes missing for that example.
    num_valid_labels: labels that are not -100 in the whole global batch.
    Metrics: `mse` (equal to the loss), `abs_error` (mean absolute error contribution).
    """
    valid = labels != IGNORE_LABEL
    error = torch.where(valid, predictions.float() - labels.float(), torch.zeros_like(predictions, dtype=torch.float32))
    loss = error.square().sum() / num_valid_labels
    return loss, {"mse": loss.detach(), "abs_error": error.detach().abs().sum() / num_valid_labels}
