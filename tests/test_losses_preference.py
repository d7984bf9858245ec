"""Every preference loss and KTO against a value computed by hand from its formula (plain `math` on
the scalars), plus the shared metrics, the SFT term and the explicit-denominator convention."""

import math

import pytest
import torch

from stema.losses import PREFERENCE_LOSSES, get_loss, preference_loss, preference_loss_options, uses_reference

# Two pairs: sequence log-probs of the policy and the reference, and ground-truth rewards.
POLICY_CHOSEN = [-3.0, -7.5]
POLICY_REJECTED = [-4.0, -6.0]
REF_CHOSEN = [-3.5, -7.0]
REF_REJECTED = [-3.8, -6.4]
CHOSEN_REWARDS = [2.0, 0.5]
REJECTED_REWARDS = [-1.0, 1.5]
BETA = 0.3


def log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def log_ratio_difference(i: int) -> float:
    """D of pair i."""
    return (POLICY_CHOSEN[i] - REF_CHOSEN[i]) - (POLICY_REJECTED[i] - REF_REJECTED[i])


def inputs(**options):
    return dict(
        policy_chosen_logps=torch.tensor(POLICY_CHOSEN),
        policy_rejected_logps=torch.tensor(POLICY_REJECTED),
        ref_chosen_logps=torch.tensor(REF_CHOSEN),
        ref_rejected_logps=torch.tensor(REF_REJECTED),
        beta=BETA,
        num_pairs=2,
        **options,
    )


def rewards(scale: float = 1.0):
    return dict(chosen_rewards=torch.tensor(CHOSEN_REWARDS), rejected_rewards=torch.tensor(REJECTED_REWARDS), gt_reward_scale=scale)


def mean(values) -> float:
    return sum(values) / len(values)


def test_dpo_is_minus_log_sigmoid_of_beta_d():
    loss, _ = preference_loss("dpo", **inputs())
    expected = mean([-log_sigmoid(BETA * log_ratio_difference(i)) for i in range(2)])
    assert float(loss) == pytest.approx(expected, rel=1e-6)


def test_cdpo_label_smoothing_mixes_in_the_flipped_label():
    eps = 0.2
    loss, _ = preference_loss("dpo", **inputs(label_smoothing=eps))
    expected = mean(
        [-(1 - eps) * log_sigmoid(BETA * log_ratio_difference(i)) - eps * log_sigmoid(-BETA * log_ratio_difference(i)) for i in range(2)]
    )
    assert float(loss) == pytest.approx(expected, rel=1e-6)


def test_ipo_is_the_squared_distance_to_one_over_two_beta():
    loss, _ = preference_loss("ipo", **inputs())
    expected = mean([(log_ratio_difference(i) - 1 / (2 * BETA)) ** 2 for i in range(2)])
    assert float(loss) == pytest.approx(expected, rel=1e-6)


def test_rpo_sq_matches_the_reward_margin_scaled_by_eta():
    eta = 0.7
    loss, _ = preference_loss("rpo_sq", **inputs(**rewards(eta)))
    expected = mean(
        [(BETA * log_ratio_difference(i) - eta * (CHOSEN_REWARDS[i] - REJECTED_REWARDS[i])) ** 2 for i in range(2)]
    )
    assert float(loss) == pytest.approx(expected, rel=1e-6)


def test_rpo_backward_and_forward_kl_by_hand():
    eta = 1.5
    s = log_sigmoid
    backward, forward = [], []
    for i in range(2):
        bd = BETA * log_ratio_difference(i)
        g = eta * (CHOSEN_REWARDS[i] - REJECTED_REWARDS[i])
        backward.append(math.exp(s(g)) * (s(g) - s(bd)) + math.exp(s(-g)) * (s(-g) - s(-bd)))
        forward.append(math.exp(s(bd)) * (s(bd) - s(g)) + math.exp(s(-bd)) * (s(-bd) - s(-g)))
    loss_bwd, _ = preference_loss("rpo_bwd_kl", **inputs(**rewards(eta)))
    loss_fwd, _ = preference_loss("rpo_fwd_kl", **inputs(**rewards(eta)))
    assert float(loss_bwd) == pytest.approx(mean(backward), rel=1e-5)
    assert float(loss_fwd) == pytest.approx(mean(forward), rel=1e-5)
    assert float(loss_bwd) != pytest.approx(float(loss_fwd), rel=1e-3)  # the two directions differ here


def test_rpo_kl_losses_vanish_when_the_policy_margin_matches_the_reward_margin():
    # beta * D = G for every pair: both KLs are zero, and so is rpo_sq.
    difference = torch.tensor([0.6, -0.9])
    zeros = torch.zeros(2)
    for name in ("rpo_sq", "rpo_bwd_kl", "rpo_fwd_kl"):
        loss, _ = preference_loss(
            name, policy_chosen_logps=difference, policy_rejected_logps=zeros, ref_chosen_logps=zeros,
            ref_rejected_logps=zeros, beta=2.0, num_pairs=2, chosen_rewards=2.0 * difference, rejected_rewards=zeros,
        )
        assert float(loss) == pytest.approx(0.0, abs=1e-7), name


def test_simpo_is_reference_free_with_a_margin_gamma():
    gamma = 0.4
    assert not uses_reference("simpo") and uses_reference("dpo")
    loss, metrics = preference_loss("simpo", **inputs(simpo_gamma=gamma))
    expected = mean([-log_sigmoid(BETA * (POLICY_CHOSEN[i] - POLICY_REJECTED[i]) - gamma) for i in range(2)])
    assert float(loss) == pytest.approx(expected, rel=1e-6)
    # Rewards are beta * policy log-probs: the reference inputs are ignored.
    assert float(metrics["rewards/chosen"]) == pytest.approx(BETA * mean(POLICY_CHOSEN), rel=1e-6)
    no_reference, _ = preference_loss("simpo", **{**inputs(simpo_gamma=gamma), "ref_chosen_logps": None, "ref_rejected_logps": None})
    assert float(no_reference) == float(loss)


def test_sft_loss_weight_adds_the_chosen_negative_log_likelihood():
    weight = 0.25
    plain, _ = preference_loss("dpo", **inputs())
    with_sft, metrics = preference_loss("dpo", **inputs(sft_loss_weight=weight))
    assert float(with_sft) == pytest.approx(float(plain) + weight * mean([-x for x in POLICY_CHOSEN]), rel=1e-6)
    assert float(metrics["sft_nll"]) == pytest.approx(mean([-x for x in POLICY_CHOSEN]), rel=1e-6)


def test_metrics_are_the_implicit_rewards_margins_accuracy_and_logps():
    _, metrics = preference_loss("dpo", **inputs())
    chosen = [BETA * (POLICY_CHOSEN[i] - REF_CHOSEN[i]) for i in range(2)]
    rejected = [BETA * (POLICY_REJECTED[i] - REF_REJECTED[i]) for i in range(2)]
    assert float(metrics["rewards/chosen"]) == pytest.approx(mean(chosen), rel=1e-6)
    assert float(metrics["rewards/rejected"]) == pytest.approx(mean(rejected), rel=1e-6)
    assert float(metrics["rewards/margin"]) == pytest.approx(mean(chosen) - mean(rejected), rel=1e-6)
    assert float(metrics["rewards/accuracy"]) == mean([float(c > r) for c, r in zip(chosen, rejected)]) == 0.5
    assert float(metrics["logps/chosen"]) == pytest.approx(mean(POLICY_CHOSEN))
    assert float(metrics["logps/rejected"]) == pytest.approx(mean(POLICY_REJECTED))


def test_micro_batches_sum_to_the_full_batch_loss_and_metrics():
    full_loss, full_metrics = preference_loss("ipo", **inputs())
    parts = []
    for i in range(2):
        part = {key: (value[i : i + 1] if isinstance(value, torch.Tensor) else value) for key, value in inputs().items()}
        parts.append(preference_loss("ipo", **part))
    assert float(sum(loss for loss, _ in parts)) == pytest.approx(float(full_loss), rel=1e-6)
    for key, value in full_metrics.items():
        assert float(sum(metrics[key] for _, metrics in parts)) == pytest.approx(float(value), rel=1e-6), key


def test_dpo_gradient_raises_chosen_and_lowers_rejected():
    chosen = torch.tensor(POLICY_CHOSEN, requires_grad=True)
    rejected = torch.tensor(POLICY_REJECTED, requires_grad=True)
    loss, _ = preference_loss("dpo", **{**inputs(), "policy_chosen_logps": chosen, "policy_rejected_logps": rejected})
    loss.backward()
    assert (chosen.grad < 0).all() and (rejected.grad > 0).all()


def test_registry_names_options_and_errors():
    assert PREFERENCE_LOSSES.names() == ["dpo", "ipo", "rpo_bwd_kl", "rpo_fwd_kl", "rpo_sq", "simpo"]
    assert preference_loss_options("dpo") == ("label_smoothing",)
    assert preference_loss_options("rpo_sq") == ("chosen_rewards", "rejected_rewards", "gt_reward_scale")
    with pytest.raises(ValueError, match=r"unknown preference loss 'dpop' \(known: dpo, ipo"):
        preference_loss("dpop", **inputs())
    with pytest.raises(ValueError, match="needs the reference log-probs"):
        preference_loss("dpo", **{**inputs(), "ref_chosen_logps": None})


def test_kto_by_hand_with_weights_and_a_clamped_baseline():
    policy, ref = [-2.0, -5.0, -3.0], [-2.5, -4.0, -3.3]
    desirable = [True, False, True]
    beta, z0, w_d, w_u = 0.5, 0.2, 1.0, 1.5

    def sigmoid(x):
        return 1 / (1 + math.exp(-x))

    by_hand = []
    for p, r, good in zip(policy, ref, desirable):
        ratio = p - r
        by_hand.append(w_d * (1 - sigmoid(beta * (ratio - z0))) if good else w_u * (1 - sigmoid(beta * (z0 - ratio))))
    kto = get_loss("kto")
    options = dict(beta=beta, num_examples=3, num_desirable=2, num_undesirable=1, desirable_weight=w_d, undesirable_weight=w_u)
    loss, metrics = kto(torch.tensor(policy), torch.tensor(ref), torch.tensor(desirable), kl_baseline=z0, **options)
    assert float(loss) == pytest.approx(mean(by_hand), rel=1e-6)
    assert float(metrics["kl"]) == pytest.approx(z0)
    assert float(metrics["rewards/desirable"]) == pytest.approx(beta * mean([0.5, 0.3]), rel=1e-6)
    assert float(metrics["rewards/undesirable"]) == pytest.approx(beta * -1.0, rel=1e-6)
    # A negative KL estimate is clamped to 0, as in the paper and TRL.
    clamped, _ = kto(torch.tensor(policy), torch.tensor(ref), torch.tensor(desirable), kl_baseline=-3.0, **options)
    at_zero, _ = kto(torch.tensor(policy), torch.tensor(ref), torch.tensor(desirable), kl_baseline=0.0, **options)
    assert float(clamped) == float(at_zero)
