"""PPO losses (Schulman et al. 2017, https://arxiv.org/abs/1707.06347) and KL-penalty controllers.

Shapes: every tensor is `[B, T]` in the action layout of `stema.losses.advantages` (column t is the
action "emit token t + 1"); `mask` marks generated tokens. Token-level means use the explicit
global denominator `num_tokens` (masked actions in the whole minibatch, across micro-batches and
ranks), so summing micro-batch losses gives exactly the minibatch loss (see `stema.losses`).
"""

from __future__ import annotations

import math

import torch

from stema_kernels.reference import kl_from_log_ratio

from . import register_loss


@register_loss("ppo_policy")
def ppo_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip_ratio: float,
    num_tokens: int,
    ref_logprobs: torch.Tensor | None = None,
    kl_coef: float = 0.0,
    kl_estimator: str = "k3",
    entropy: torch.Tensor | None = None,
    entropy_coef: float = 0.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped surrogate objective, with an optional KL penalty and entropy bonus in the loss:

        ratio_t = exp(logprobs_t - old_logprobs_t)
        pg_t    = -min(ratio_t A_t, clip(ratio_t, 1 - clip_ratio, 1 + clip_ratio) A_t)
        loss    = sum_t mask_t (pg_t + kl_coef * KL_t - entropy_coef * H_t) / num_tokens

    KL_t is Schulman's estimator (`k1`, `k2`, `k3`) of KL(policy || reference) from
    log_ratio = logprobs - ref_logprobs (GRPO's choice is k3); H_t the policy's entropy at t.
    Metrics (each summed over tokens / num_tokens, so micro-batches add up): pg_loss, clipfrac
    (fraction of tokens whose ratio was clipped), approx_kl (k3 of the new vs old policy), and
    kl_loss / entropy when used. `old_logprobs` None: this forward is the policy the rollout was
    scored under (one epoch, one minibatch), so old = logprobs.detach() and the ratio is 1 with
    the gradient of logprobs.
    """
    mask = mask.float()
    log_ratio = logprobs - (logprobs.detach() if old_logprobs is None else old_logprobs)
    ratio = torch.exp(log_ratio)
    unclipped = ratio * advantages
    clipped = torch.clamp(ratio, 1.0 - clip_ratio, 1.0 + clip_ratio) * advantages
    pg = -torch.minimum(unclipped, clipped)
    loss = (pg * mask).sum() / num_tokens
    metrics = {
        "pg_loss": loss.detach(),
        "clipfrac": ((clipped < unclipped).float() * mask).sum() / num_tokens,
        "approx_kl": (kl_from_log_ratio(log_ratio.detach(), "k3") * mask).sum() / num_tokens,
    }
    if ref_logprobs is not None and kl_coef:
        kl = kl_from_log_ratio(logprobs - ref_logprobs, kl_estimator)
        kl_loss = (kl * mask).sum() / num_tokens
        loss = loss + kl_coef * kl_loss
        metrics["kl_loss"] = kl_loss.detach()
    if entropy is not None:
        entropy_mean = (entropy * mask).sum() / num_tokens
        metrics["entropy"] = entropy_mean.detach()
        if entropy_coef:
            loss = loss - entropy_coef * entropy_mean
    return loss, metrics


@register_loss("ppo_value")
def ppo_value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    *,
    value_clip: float,
    num_tokens: int,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped value loss (PPO2's, as in NeMo-Aligner and TRL):

        v_clip_t = old_values_t + clip(values_t - old_values_t, -value_clip, value_clip)
        loss     = 0.5 * sum_t mask_t max((values_t - R_t)^2, (v_clip_t - R_t)^2) / num_tokens

    `value_clip <= 0` turns clipping off (plain squared error). Metrics: vf_loss, vf_clipfrac.
    """
    mask = mask.float()
    unclipped = (values - returns) ** 2
    if value_clip > 0:
        clipped_values = old_values + torch.clamp(values - old_values, -value_clip, value_clip)
        clipped = (clipped_values - returns) ** 2
        per_token = torch.maximum(unclipped, clipped)
        clipfrac = ((clipped > unclipped).float() * mask).sum() / num_tokens
    else:
        per_token = unclipped
        clipfrac = torch.zeros((), device=values.device)
    loss = 0.5 * (per_token * mask).sum() / num_tokens
    return loss, {"vf_loss": loss.detach(), "vf_clipfrac": clipfrac}


class FixedKLController:
    """A constant KL coefficient."""

    def __init__(self, coef: float):
        self.value = coef

    def update(self, observed_kl: float, num_samples: int) -> None:
        """Nothing to adapt."""

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = state["value"]


class AdaptiveKLController:
    """Adaptive KL coefficient of Ziegler et al. 2019 (https://arxiv.org/abs/1909.08593), section 2.2:

        e = clip(observed_kl / target - 1, -0.2, 0.2);   coef <- coef * (1 + e * n / horizon)

    after each step with n samples, which drives the per-sequence KL toward `target`.
    """

    def __init__(self, coef: float, *, target: float, horizon: int):
        if target <= 0 or horizon <= 0:
            raise ValueError(f"adaptive KL needs target > 0 and horizon > 0, got {target} and {horizon}")
        self.value = coef
        self.target = target
        self.horizon = horizon

    def update(self, observed_kl: float, num_samples: int) -> None:
        if not math.isfinite(observed_kl):
            return
        error = max(-0.2, min(0.2, observed_kl / self.target - 1.0))
        self.value *= 1.0 + error * num_samples / self.horizon

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = state["value"]


def kl_controller(coef: float, *, target: float | None, horizon: int) -> FixedKLController | AdaptiveKLController:
    """Adaptive toward `target` when a target is given, else fixed at `coef`."""
    if target is None:
        return FixedKLController(coef)
    return AdaptiveKLController(coef, target=target, horizon=horizon)
