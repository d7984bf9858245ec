"""Preference losses of the DPO family, and KTO.

Paired losses are registered by name and called through one entry point:

    loss, metrics = preference_loss(
        "dpo", policy_chosen_logps=pc, policy_rejected_logps=pr, ref_chosen_logps=rc,
        ref_rejected_logps=rr, beta=0.1, num_pairs=64, label_smoothing=0.0)

Inputs are sequence log-probs `[B]` of the chosen and rejected completions (summed over completion
tokens, or averaged: the caller decides). A registered function maps them to per-pair losses `[B]`;
`preference_loss` sums those over the pairs and divides by `num_pairs`, the pairs in the whole
global batch (the package's explicit-denominator convention), adds the optional SFT term, and
returns the metrics every variant shares. Notation of the docstrings, per pair:

    D = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)
    G = eta * (chosen_reward - rejected_reward)        eta = gt_reward_scale (NeMo-Aligner)
    s = log sigmoid
"""

from __future__ import annotations

import inspect
from typing import Callable

import torch
import torch.nn.functional as F

from stema.registry import Registry

from . import register_loss

PREFERENCE_LOSSES: Registry = Registry("preference loss")
COMMON_INPUTS = ("policy_chosen_logps", "policy_rejected_logps", "ref_chosen_logps", "ref_rejected_logps", "beta")


def register_preference_loss(name: str, *, reference_free: bool = False) -> Callable:
    """Register a per-pair loss `f(*, policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
    ref_rejected_logps, beta, **its_options) -> [B]` under `name`. `reference_free` losses get None
    for the reference log-probs, so trainers load no reference model for them."""

    def add(function: Callable) -> Callable:
        function.reference_free = reference_free
        return PREFERENCE_LOSSES.register(name)(function)

    return add


def uses_reference(name: str) -> bool:
    """Whether the loss `name` compares the policy with a reference model."""
    return not PREFERENCE_LOSSES.get(name).reference_free


def preference_loss_options(name: str) -> tuple[str, ...]:
    """The options (keyword arguments beyond the common inputs) that the loss `name` takes."""
    parameters = inspect.signature(PREFERENCE_LOSSES.get(name)).parameters
    return tuple(key for key in parameters if key not in COMMON_INPUTS)


def _log_ratio_difference(policy_chosen, policy_rejected, ref_chosen, ref_rejected) -> torch.Tensor:
    """D `[B]` in fp32."""
    return (policy_chosen.float() - ref_chosen.float()) - (policy_rejected.float() - ref_rejected.float())


@register_preference_loss("dpo")
def dpo(*, policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta, label_smoothing: float = 0.0):
    """DPO, the sigmoid loss (Rafailov et al. 2023, https://arxiv.org/abs/2305.18290), with
    conservative label smoothing eps (cDPO, Mitchell 2023, https://ericmitchell.ai/cdpo.pdf):

        loss = -(1 - eps) * s(beta * D) - eps * s(-beta * D)          (eps = 0: -s(beta * D))

    As TRL's DPOTrainer loss_type="sigmoid" when eps = 0 (TRL 1.x applies no label smoothing to
    "sigmoid"; its "robust" loss is a different, unbiased-noise correction).
    """
    logits = beta * _log_ratio_difference(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    return -(1.0 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)


@register_preference_loss("ipo")
def ipo(*, policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta):
    """IPO (Azar et al. 2023, https://arxiv.org/abs/2310.12036, Eq. 17 with tau = beta):

        loss = (D - 1 / (2 * beta))^2

    TRL's loss_type="ipo" divides each log-ratio by its completion's token count first; that is
    this loss on token-averaged log-probs (`average_logprobs=True` in STEMA's config).
    """
    difference = _log_ratio_difference(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    return (difference - 1.0 / (2.0 * beta)).square()


def _ground_truth_margin(chosen_rewards, rejected_rewards, gt_reward_scale: float) -> torch.Tensor:
    """G `[B]` in fp32."""
    return gt_reward_scale * (chosen_rewards.float() - rejected_rewards.float())


@register_preference_loss("rpo_sq")
def rpo_sq(
    *, policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta,
    chosen_rewards, rejected_rewards, gt_reward_scale: float = 1.0,
):
    """Reward-aware preference optimization, squared distance (NeMo-Aligner's `rpo_sq`; Nemotron-4
    340B report, Adler et al. 2024, https://arxiv.org/abs/2406.11704, Sec. 3.2.3):

        loss = (beta * D - G)^2

    chosen_rewards, rejected_rewards `[B]`: the pairs' ground-truth rewards (e.g. from a reward model).
    """
    difference = _log_ratio_difference(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    return (beta * difference - _ground_truth_margin(chosen_rewards, rejected_rewards, gt_reward_scale)).square()


def _bernoulli_kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(Bernoulli(sigmoid(a)) || Bernoulli(sigmoid(b))) from log_p = a and log_q = b (logits):
    e^s(a) (s(a) - s(b)) + e^s(-a) (s(-a) - s(-b))."""
    return (
        torch.exp(F.logsigmoid(log_p)) * (F.logsigmoid(log_p) - F.logsigmoid(log_q))
        + torch.exp(F.logsigmoid(-log_p)) * (F.logsigmoid(-log_p) - F.logsigmoid(-log_q))
    )


@register_preference_loss("rpo_bwd_kl")
def rpo_bwd_kl(
    *, policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta,
    chosen_rewards, rejected_rewards, gt_reward_scale: float = 1.0,
):
    """Reward-aware preference optimization, backward KL (NeMo-Aligner's `rpo_bwd_kl`; Adler et al.
    2024, https://arxiv.org/abs/2406.11704): the KL from the ground-truth preference probability
    sigmoid(G) to the policy's sigmoid(beta * D):

        loss = e^s(G) (s(G) - s(beta D)) + e^s(-G) (s(-G) - s(-beta D))
    """
    difference = _log_ratio_difference(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    return _bernoulli_kl(_ground_truth_margin(chosen_rewards, rejected_rewards, gt_reward_scale), beta * difference)


@register_preference_loss("rpo_fwd_kl")
def rpo_fwd_kl(
    *, policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta,
    chosen_rewards, rejected_rewards, gt_reward_scale: float = 1.0,
):
    """Reward-aware preference optimization, forward KL (NeMo-Aligner's `rpo_fwd_kl`; Adler et al.
    2024, https://arxiv.org/abs/2406.11704): the KL from the policy's sigmoid(beta * D) to the
    ground-truth sigmoid(G):

        loss = e^s(beta D) (s(beta D) - s(G)) + e^s(-beta D) (s(-beta D) - s(-G))
    """
    difference = _log_ratio_difference(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    return _bernoulli_kl(beta * difference, _ground_truth_margin(chosen_rewards, rejected_rewards, gt_reward_scale))


@register_preference_loss("simpo", reference_free=True)
def simpo(*, policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta, simpo_gamma: float = 0.5):
    """SimPO (Meng et al. 2024, https://arxiv.org/abs/2405.14734, Eq. 6), reference-free:

        loss = -s(beta * (policy_chosen - policy_rejected) - gamma)

    The paper's log-probs are averaged over the completion tokens (`average_logprobs=True`);
    summed log-probs give its no-length-normalization ablation. The reference inputs are None.
    """
    difference = policy_chosen_logps.float() - policy_rejected_logps.float()
    return -F.logsigmoid(beta * difference - simpo_gamma)


def preference_loss(
    name: str,
    *,
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor | None,
    ref_rejected_logps: torch.Tensor | None,
    beta: float,
    num_pairs: int | torch.Tensor,
    sft_loss_weight: float = 0.0,
    **options,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The registered preference loss `name`, summed over the pairs and divided by `num_pairs`:

        loss = sum_i [ loss_name(i) - sft_loss_weight * policy_chosen_logps[i] ] / num_pairs

    The second term is the chosen responses' SFT loss (NeMo-Aligner's `sft_loss_weight`): their
    negative log-likelihood, per sequence (summed or token-averaged as the log-probs are).

    policy_*_logps, ref_*_logps `[B]`: sequence log-probs of the chosen and rejected completions
    (ref None for reference-free losses); beta: the KL-penalty strength; num_pairs: pairs in the
    whole global batch; options: the loss's own (`preference_loss_options(name)`).
    Metrics, each summed over the pairs / num_pairs (so micro-batches add up to batch means), with
    the implicit rewards r = beta * (policy - ref) (beta * policy when reference-free):
    `rewards/chosen`, `rewards/rejected`, `rewards/margin` (chosen - rejected), `rewards/accuracy`
    (chosen > rejected), `logps/chosen`, `logps/rejected`, and `sft_nll` when sft_loss_weight != 0.
    """
    function = PREFERENCE_LOSSES.get(name)
    reference_free = function.reference_free
    if not reference_free and (ref_chosen_logps is None or ref_rejected_logps is None):
        raise ValueError(f"preference loss {name!r} needs the reference log-probs")
    per_pair = function(
        policy_chosen_logps=policy_chosen_logps,
        policy_rejected_logps=policy_rejected_logps,
        ref_chosen_logps=None if reference_free else ref_chosen_logps,
        ref_rejected_logps=None if reference_free else ref_rejected_logps,
        beta=beta,
        **options,
    )
    chosen_nll = -policy_chosen_logps.float()
    if sft_loss_weight:
        per_pair = per_pair + sft_loss_weight * chosen_nll
    loss = per_pair.sum() / num_pairs

    with torch.no_grad():
        chosen_logratio = policy_chosen_logps.float() - (0.0 if reference_free else ref_chosen_logps.float())
        rejected_logratio = policy_rejected_logps.float() - (0.0 if reference_free else ref_rejected_logps.float())
        chosen_rewards, rejected_rewards = beta * chosen_logratio, beta * rejected_logratio
        metrics = {
            "rewards/chosen": chosen_rewards.sum() / num_pairs,
            "rewards/rejected": rejected_rewards.sum() / num_pairs,
            "rewards/margin": (chosen_rewards - rejected_rewards).sum() / num_pairs,
            "rewards/accuracy": (chosen_rewards > rejected_rewards).float().sum() / num_pairs,
            "logps/chosen": policy_chosen_logps.detach().float().sum() / num_pairs,
            "logps/rejected": policy_rejected_logps.detach().float().sum() / num_pairs,
        }
        if sft_loss_weight:
            metrics["sft_nll"] = chosen_nll.sum() / num_pairs
    return loss, metrics


@register_loss("kto")
def kto_loss(
    policy_logps: torch.Tensor,
    ref_logps: torch.Tensor,
    desirable: torch.Tensor,
    *,
    kl_baseline: float | torch.Tensor,
    beta: float,
    num_examples: int | torch.Tensor,
    num_desirable: int | torch.Tensor,
    num_undesirable: int | torch.Tensor,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """KTO on unpaired data (Ethayarajh et al. 2024, https://arxiv.org/abs/2402.01306, Eq. 7-8), as
    TRL's KTOTrainer loss_type="kto". With r = policy - ref and z0 = kl_baseline (a detached
    estimate of KL(policy || ref), clamped at 0, from mismatched prompt/completion pairs):

        desirable:    w_d * (1 - sigmoid(beta * (r - z0)))
        undesirable:  w_u * (1 - sigmoid(beta * (z0 - r)))
        loss = sum over examples / num_examples

    policy_logps, ref_logps `[B]`: sequence log-probs of the completions; desirable `[B]` bool.
    num_examples, num_desirable, num_undesirable: counts in the whole global batch.
    Metrics (contributions that sum to batch means): `rewards/desirable` and `logps/desirable`
    (means over desirable examples), the same for `undesirable`, `kl` (z0).
    """
    desirable = desirable.bool()
    log_ratio = policy_logps.float() - ref_logps.float()
    baseline = torch.as_tensor(kl_baseline, dtype=torch.float32, device=log_ratio.device).clamp(min=0).detach()
    desirable_losses = desirable_weight * (1.0 - torch.sigmoid(beta * (log_ratio - baseline)))
    undesirable_losses = undesirable_weight * (1.0 - torch.sigmoid(beta * (baseline - log_ratio)))
    loss = torch.where(desirable, desirable_losses, undesirable_losses).sum() / num_examples
    with torch.no_grad():
        rewards = beta * log_ratio
        logps = policy_logps.detach().float()
        metrics = {
            "rewards/desirable": rewards[desirable].sum() / max(1, int(num_desirable)),
            "rewards/undesirable": rewards[~desirable].sum() / max(1, int(num_undesirable)),
            "logps/desirable": logps[desirable].sum() / max(1, int(num_desirable)),
            "logps/undesirable": logps[~desirable].sum() / max(1, int(num_undesirable)),
            "kl": baseline * desirable.numel() / num_examples,
        }
    return loss, metrics
