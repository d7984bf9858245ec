"""Advantage estimators for PPO-style training, registered by name: `gae`, `reinforce`, `rloo`, `grpo`.

Every estimator takes the same `AdvantageInputs` and returns `(advantages, returns)`, both fp32
`[B, T]` and 0 outside the response mask. `returns` are the critic's regression targets; they are
None for the estimators that use no critic.

Token layout: column t of every `[B, T]` tensor is the action "emit token t + 1" (the convention of
`stema.training.logprobs.completion_token_logprobs`): `mask[b, t]` is True where token t + 1 of row
b is a generated token, `values[b, t]` is the critic's value of the state that action is taken in,
and `token_rewards[b, t]` its reward (the sequence score sits at the last action; a KL penalty in
the reward adds a term at every action).

    adv, ret = estimate_advantages("grpo", inputs)        # registered name -> function
    @register_advantage("my_estimator", needs_critic=False)
    def my_estimator(inputs: AdvantageInputs) -> tuple[torch.Tensor, torch.Tensor | None]: ...
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

import stema_kernels
from stema.registry import Registry


@dataclass(frozen=True)
class AdvantageInputs:
    """What an estimator may use.

    token_rewards: `[B, T]` fp32 reward of each action (0 outside the mask).
    mask: `[B, T]` bool, the generated tokens' actions.
    values: `[B, T]` fp32 critic values, or None when the run has no critic.
    group_ids: `[B]` int64: rows with the same id are samples of the same prompt (RLOO, GRPO).
    gamma, lam: discount and GAE lambda.
    eps: added to the group standard deviation (GRPO).
    """

    token_rewards: torch.Tensor
    mask: torch.Tensor
    values: torch.Tensor | None
    group_ids: torch.Tensor
    gamma: float = 1.0
    lam: float = 0.95
    eps: float = 1e-6


Estimator = Callable[[AdvantageInputs], tuple[torch.Tensor, torch.Tensor | None]]
ADVANTAGES: Registry[Estimator] = Registry("advantage estimator")
_NEEDS_CRITIC: dict[str, bool] = {}


def register_advantage(name: str, *, needs_critic: bool) -> Callable[[Estimator], Estimator]:
    """Register an estimator under `name`; `needs_critic` says whether it reads `values`."""

    def add(function: Estimator) -> Estimator:
        ADVANTAGES.register(name)(function)
        _NEEDS_CRITIC[name] = needs_critic
        return function

    return add


def needs_critic(name: str) -> bool:
    """Whether the estimator registered as `name` uses a critic (value model)."""
    ADVANTAGES.get(name)  # a clear error for unknown names
    return _NEEDS_CRITIC[name]


def estimate_advantages(name: str, inputs: AdvantageInputs) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`(advantages, returns)` of the estimator registered as `name`."""
    if needs_critic(name) and inputs.values is None:
        raise ValueError(f"advantage estimator {name!r} needs critic values")
    return ADVANTAGES.get(name)(inputs)


def sequence_scores(inputs: AdvantageInputs) -> torch.Tensor:
    """`[B]`: each row's undiscounted sum of token rewards (its score, plus any KL terms)."""
    return (inputs.token_rewards * inputs.mask).sum(-1)


def _broadcast(per_sequence: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """`[B]` -> `[B, T]`: the sequence's value at every action, 0 outside the mask."""
    return per_sequence[:, None] * mask


@register_advantage("gae", needs_critic=True)
def gae(inputs: AdvantageInputs) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized advantage estimation (Schulman et al. 2016, https://arxiv.org/abs/1506.02438),
    through the `stema_kernels.gae` reverse scan:

        delta_t = r_t + gamma * V_{t+1} - V_t,   A_t = delta_t + gamma * lam * A_{t+1},   R_t = A_t + V_t
    """
    return stema_kernels.gae(inputs.token_rewards, inputs.values, inputs.mask, gamma=inputs.gamma, lam=inputs.lam)


@register_advantage("reinforce", needs_critic=False)
def reinforce(inputs: AdvantageInputs) -> tuple[torch.Tensor, None]:
    """REINFORCE (Williams 1992): A_t = G_t = sum_{k >= t} gamma^(k - t) r_k, the reward-to-go,
    through the `stema_kernels.discounted_returns` scan; no baseline (whitening can centre it)."""
    return stema_kernels.discounted_returns(inputs.token_rewards, inputs.mask, gamma=inputs.gamma), None


def _group_index(group_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(each row's group as 0..G-1 `[B]`, the number of groups G)."""
    _, inverse = torch.unique(group_ids, return_inverse=True)
    return inverse, int(inverse.max()) + 1


def _group_statistics(scores: torch.Tensor, group_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per row: (count, sum, sum of squares) of the scores of its group, each `[B]`."""
    inverse, groups = _group_index(group_ids)
    count = torch.zeros(groups).index_add_(0, inverse, torch.ones_like(scores))
    total = torch.zeros(groups).index_add_(0, inverse, scores)
    squares = torch.zeros(groups).index_add_(0, inverse, scores * scores)
    return count[inverse], total[inverse], squares[inverse]


def informative_rows(scores: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    """Indices (int64, ascending) of the rows whose group's scores are not all equal: the groups
    with a nonzero group-relative advantage (RLOO, GRPO)."""
    scores = scores.float().cpu()
    inverse, groups = _group_index(group_ids.cpu())
    low = torch.full((groups,), float("inf")).scatter_reduce(0, inverse, scores, reduce="amin")
    high = torch.full((groups,), float("-inf")).scatter_reduce(0, inverse, scores, reduce="amax")
    return torch.nonzero(high[inverse] > low[inverse]).flatten()


@register_advantage("rloo", needs_critic=False)
def rloo(inputs: AdvantageInputs) -> tuple[torch.Tensor, None]:
    """REINFORCE leave-one-out (Ahmadian et al. 2024, https://arxiv.org/abs/2402.14740): with k
    samples of a prompt and scores S_i, A_i = S_i - mean_{j != i} S_j = k / (k - 1) (S_i - mean_j S_j),
    the same for every action of sample i. Needs k >= 2 samples of every prompt."""
    scores = sequence_scores(inputs).float().cpu()
    count, total, _ = _group_statistics(scores, inputs.group_ids.cpu())
    if bool((count < 2).any()):
        raise ValueError("rloo needs at least 2 samples of every prompt (rollout.samples_per_prompt >= 2)")
    advantages = scores - (total - scores) / (count - 1)
    return _broadcast(advantages.to(inputs.mask.device), inputs.mask.float()), None


@register_advantage("grpo", needs_critic=False)
def grpo(inputs: AdvantageInputs) -> tuple[torch.Tensor, None]:
    """GRPO (Shao et al. 2024, https://arxiv.org/abs/2402.03300), outcome supervision: with the
    scores S of a prompt's k samples, A_i = (S_i - mean(S)) / (std(S) + eps) at every action of
    sample i (std with Bessel's correction, as in the paper's code and TRL). Needs k >= 2."""
    scores = sequence_scores(inputs).float().cpu()
    count, total, squares = _group_statistics(scores, inputs.group_ids.cpu())
    if bool((count < 2).any()):
        raise ValueError("grpo needs at least 2 samples of every prompt (rollout.samples_per_prompt >= 2)")
    mean = total / count
    variance = ((squares - count * mean * mean) / (count - 1)).clamp(min=0.0)
    advantages = (scores - mean) / (variance.sqrt() + inputs.eps)
    return _broadcast(advantages.to(inputs.mask.device), inputs.mask.float()), None


def whiten(values: torch.Tensor, mask: torch.Tensor, *, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """`values` `[B, T]` normalized to unit variance (and zero mean with `shift_mean`) over the
    masked positions; 0 outside the mask."""
    selected = values[mask]
    if selected.numel() < 2:
        return values * mask
    mean, std = selected.mean(), selected.std()
    whitened = (values - mean) / (std + eps) if shift_mean else values / (std + eps)
    return whitened * mask
