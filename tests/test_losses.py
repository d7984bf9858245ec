"""Losses against values computed by hand from their formulas, and the micro-batching invariance
that the explicit global denominators exist for."""

import math

import pytest
import torch

from stema.losses import LOSSES, get_loss


def test_registry_lists_known_losses_on_a_bad_name():
    assert {"sft", "bradley_terry", "regression"} <= set(LOSSES.names())
    with pytest.raises(ValueError, match=r"unknown loss 'nope' \(known: .*bradley_terry"):
        get_loss("nope")


def test_sft_loss_is_masked_token_mean_over_the_global_denominator():
    logprobs = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -4.0, 0.0]])
    mask = torch.tensor([[0, 1, 1], [1, 1, 0]])
    loss, metrics = get_loss("sft")(logprobs, mask, num_valid_tokens=4)
    assert loss.item() == pytest.approx((2.0 + 3.0 + 0.5 + 4.0) / 4)
    assert metrics["nll"].item() == pytest.approx(loss.item())


def test_sft_micro_batches_sum_to_the_full_batch_loss():
    torch.manual_seed(0)
    logprobs = -torch.rand(6, 5)
    mask = (torch.rand(6, 5) > 0.3).long()
    total = int(mask.sum())
    full, _ = get_loss("sft")(logprobs, mask, num_valid_tokens=total)
    parts = sum(get_loss("sft")(logprobs[i : i + 2], mask[i : i + 2], num_valid_tokens=total)[0] for i in range(0, 6, 2))
    assert parts.item() == pytest.approx(full.item(), abs=1e-7)


def test_bradley_terry_by_hand_with_margin_and_centering():
    chosen = torch.tensor([2.0, 0.0])
    rejected = torch.tensor([1.0, 1.0])
    margin = torch.tensor([0.5, 0.0])

    def neg_log_sigmoid(x):
        return math.log1p(math.exp(-x))

    loss, metrics = get_loss("bradley_terry")(chosen, rejected, num_pairs=2, margin=margin, center_rewards_coefficient=0.1)
    expected = (neg_log_sigmoid(0.5) + 0.1 * 9.0 + neg_log_sigmoid(-1.0) + 0.1 * 1.0) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert metrics["accuracy"].item() == pytest.approx(0.5)
    assert metrics["margin"].item() == pytest.approx(0.0)
    assert metrics["chosen_reward"].item() == pytest.approx(1.0)


def test_bradley_terry_gradient_pushes_chosen_up():
    chosen = torch.tensor([0.0], requires_grad=True)
    rejected = torch.tensor([0.0], requires_grad=True)
    loss, _ = get_loss("bradley_terry")(chosen, rejected, num_pairs=1)
    loss.backward()
    assert chosen.grad.item() == pytest.approx(-0.5) and rejected.grad.item() == pytest.approx(0.5)


def test_regression_ignores_missing_labels():
    predictions = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])
    labels = torch.tensor([[2.0, -100.0, 1.0], [-100.0, -100.0, 4.0]])
    loss, metrics = get_loss("regression")(predictions, labels, num_valid_labels=3)
    assert loss.item() == pytest.approx((1.0 + 4.0 + 16.0) / 3)
    assert metrics["abs_error"].item() == pytest.approx((1.0 + 2.0 + 4.0) / 3)
