"""Plain-PyTorch references for every kernel in stema_kernels.

Each function here is the specification its kernel is tested against, and the fallback when the
compiled extension has no kernel for a tensor's device. They are written for clarity, not speed:
they materialize `[N, V]` fp32 tensors and loop over time in Python, as TRL and OpenRLHF do.
"""

from __future__ import annotations

import torch

KL_ESTIMATORS = ("k1", "k2", "k3")


def token_logprobs(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
):
    """log p(label) under softmax(logits / temperature), in fp32.

    logits `[..., V]`, labels `[...]` -> logprobs `[...]` (and entropy `[...]` if asked), where
    logprob = z[label] - logsumexp(z), z = logits / temperature, and
    entropy = logsumexp(z) - sum_v softmax(z)_v * z_v (terms with z_v = -inf contribute 0).
    Positions whose label is `ignore_index` give 0 (and no gradient).
    """
    z = logits.float() / temperature  # [..., V] fp32
    valid = labels != ignore_index
    safe_labels = torch.where(valid, labels, torch.zeros_like(labels)).long()
    lse = torch.logsumexp(z, dim=-1)  # [...]
    picked = z.gather(-1, safe_labels.unsqueeze(-1)).squeeze(-1)
    logprobs = torch.where(valid, picked - lse, torch.zeros_like(lse))
    if not return_entropy:
        return logprobs
    probs = torch.softmax(z, dim=-1)
    finite_z = torch.where(torch.isfinite(z), z, torch.zeros_like(z))
    entropy = lse - (probs * finite_z).sum(-1)
    entropy = torch.where(valid, entropy, torch.zeros_like(entropy))
    return logprobs, entropy


def kl_from_log_ratio(log_ratio: torch.Tensor, kl: str) -> torch.Tensor:
    """Schulman's estimators of KL(policy || reference) from log_ratio = log pi - log pi_ref.

    With r = pi_ref / pi = exp(-log_ratio) (http://joschu.net/blog/kl-approx.html):
    k1 = -log r = log_ratio; k2 = (log r)^2 / 2; k3 = (r - 1) - log r.
    """
    if kl == "k1":
        return log_ratio
    if kl == "k2":
        return 0.5 * log_ratio.square()
    if kl == "k3":
        return torch.expm1(-log_ratio) + log_ratio
    raise ValueError(f"kl must be one of {KL_ESTIMATORS}, got {kl!r}")


def logprob_kl(
    logits: torch.Tensor,
    labels: torch.Tensor,
    ref_logprobs: torch.Tensor,
    *,
    kl: str = "k3",
    temperature: float = 1.0,
    ignore_index: int = -100,
):
    """(logprobs, kl) `[...]`, fp32: token log-probs and a per-token KL(policy || reference).

    ref_logprobs `[...]` are the reference model's log-probs of the same labels; they receive no
    gradient. Ignored positions give 0 in both outputs.
    """
    if kl not in KL_ESTIMATORS:
        raise ValueError(f"kl must be one of {KL_ESTIMATORS}, got {kl!r}")
    logprobs = token_logprobs(logits, labels, temperature=temperature, ignore_index=ignore_index)
    valid = labels != ignore_index
    log_ratio = logprobs - ref_logprobs.detach().float()
    kl_values = torch.where(valid, kl_from_log_ratio(log_ratio, kl), torch.zeros_like(logprobs))
    return logprobs, kl_values


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, *, gamma: float, lam: float):
    """Generalized advantage estimation (Schulman et al. 2016, https://arxiv.org/abs/1506.02438).

    rewards, values, mask `[B, T]`; mask marks valid response tokens (left or right padding, or
    any gaps: masked positions are skipped). Over the valid positions t of a row, in order,
        delta_t = r_t + gamma * V_{next(t)} - V_t    (V after the last valid token is 0)
        A_t = delta_t + gamma * lam * A_{next(t)}
        returns_t = A_t + V_t
    Returns (advantages, returns), fp32 `[B, T]`, 0 at masked positions. The loop over T is the
    one TRL and OpenRLHF run, made mask aware.
    """
    rewards = rewards.float()
    values = values.float()
    valid = mask.bool()
    batch, length = rewards.shape
    advantages = torch.zeros_like(rewards)
    last_advantage = rewards.new_zeros(batch)
    next_value = rewards.new_zeros(batch)
    for t in reversed(range(length)):
        valid_t = valid[:, t]
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        advantage_t = delta + gamma * lam * last_advantage
        last_advantage = torch.where(valid_t, advantage_t, last_advantage)
        next_value = torch.where(valid_t, values[:, t], next_value)
        advantages[:, t] = torch.where(valid_t, advantage_t, torch.zeros_like(advantage_t))
    returns = torch.where(valid, advantages + values, torch.zeros_like(advantages))
    return advantages, returns


def discounted_returns(rewards: torch.Tensor, mask: torch.Tensor, *, gamma: float) -> torch.Tensor:
    """G_t = r_t + gamma * G_{next(t)} over the valid positions of each row (REINFORCE).

    rewards, mask `[B, T]` -> returns fp32 `[B, T]`, 0 at masked positions.
    """
    rewards = rewards.float()
    valid = mask.bool()
    batch, length = rewards.shape
    returns = torch.zeros_like(rewards)
    running = rewards.new_zeros(batch)
    for t in reversed(range(length)):
        valid_t = valid[:, t]
        value_t = rewards[:, t] + gamma * running
        running = torch.where(valid_t, value_t, running)
        returns[:, t] = torch.where(valid_t, value_t, torch.zeros_like(value_t))
    return returns


def refit_(dst: list[torch.Tensor], src: list[torch.Tensor]) -> None:
    """Copy each src tensor into its dst in place, casting dtype: a Python loop of `copy_`."""
    for destination, source in zip(dst, src, strict=True):
        destination.copy_(source)
