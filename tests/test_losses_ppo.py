"""PPO losses, KL controllers and advantage estimators against hand-written references."""

import math

import pytest
import torch

import stema_kernels.reference as kref
from stema.losses import get_loss
from stema.losses.advantages import ADVANTAGES, AdvantageInputs, estimate_advantages, informative_rows, needs_critic, whiten
from stema.losses.ppo import AdaptiveKLController, FixedKLController, kl_controller, ppo_policy_loss, ppo_value_loss


def random_batch(seed=0, batch=4, length=7):
    generator = torch.Generator().manual_seed(seed)
    logprobs = -torch.rand(batch, length, generator=generator) * 3
    old = logprobs + 0.3 * torch.randn(batch, length, generator=generator)
    ref = logprobs + 0.2 * torch.randn(batch, length, generator=generator)
    advantages = torch.randn(batch, length, generator=generator)
    mask = torch.rand(batch, length, generator=generator) > 0.3
    return logprobs, old, ref, advantages, mask


def loop_policy_loss(logprobs, old, advantages, mask, clip):
    total, count = 0.0, 0
    for b in range(logprobs.shape[0]):
        for t in range(logprobs.shape[1]):
            if mask[b, t]:
                ratio = math.exp(logprobs[b, t] - old[b, t])
                a = float(advantages[b, t])
                total += -min(ratio * a, min(max(ratio, 1 - clip), 1 + clip) * a)
                count += 1
    return total / count


def test_policy_loss_equals_the_clipped_surrogate_written_as_a_loop():
    logprobs, old, _, advantages, mask = random_batch()
    loss, metrics = ppo_policy_loss(logprobs, old, advantages, mask, clip_ratio=0.2, num_tokens=int(mask.sum()))
    assert float(loss) == pytest.approx(loop_policy_loss(logprobs, old, advantages, mask, 0.2), rel=1e-5)
    ratio = torch.exp(logprobs - old)[mask]
    adv = advantages[mask]
    clipped = ((adv > 0) & (ratio > 1.2)) | ((adv < 0) & (ratio < 0.8))
    assert float(metrics["clipfrac"]) == pytest.approx(float(clipped.float().mean()), abs=1e-6)
    assert get_loss("ppo_policy") is ppo_policy_loss


def test_policy_loss_micro_batches_sum_to_the_full_batch_with_kl_and_entropy():
    logprobs, old, ref, advantages, mask = random_batch(seed=1, batch=6)
    entropy = torch.rand(logprobs.shape)
    options = dict(clip_ratio=0.2, num_tokens=int(mask.sum()), kl_coef=0.1, kl_estimator="k3", entropy_coef=0.01)
    full, full_metrics = ppo_policy_loss(logprobs, old, advantages, mask, ref_logprobs=ref, entropy=entropy, **options)
    parts = [ppo_policy_loss(logprobs[i:i + 2], old[i:i + 2], advantages[i:i + 2], mask[i:i + 2], ref_logprobs=ref[i:i + 2],
                             entropy=entropy[i:i + 2], **options) for i in range(0, 6, 2)]
    torch.testing.assert_close(sum(loss for loss, _ in parts), full)
    for key in ("pg_loss", "kl_loss", "entropy", "clipfrac"):
        torch.testing.assert_close(sum(metrics[key] for _, metrics in parts), full_metrics[key])
    kl = kref.kl_from_log_ratio(logprobs - ref, "k3")[mask].mean()
    expected = full_metrics["pg_loss"] + 0.1 * kl - 0.01 * entropy[mask].mean()
    torch.testing.assert_close(full, expected)


def test_policy_gradient_points_up_the_advantage_inside_the_clip_and_vanishes_outside():
    logprobs = torch.tensor([[-1.0, -1.0]], requires_grad=True)
    old = torch.tensor([[-1.0, -1.5]])  # ratio 1 (inside) and e^0.5 ~ 1.65 (clipped for A > 0)
    advantages = torch.tensor([[1.0, 1.0]])
    loss, _ = ppo_policy_loss(logprobs, old, advantages, torch.ones(1, 2, dtype=torch.bool), clip_ratio=0.2, num_tokens=2)
    loss.backward()
    assert logprobs.grad[0, 0] == pytest.approx(-0.5)
    assert logprobs.grad[0, 1] == 0.0


def test_value_loss_clips_around_the_old_values():
    values = torch.tensor([[1.0, 0.0, 2.0]])
    old = torch.tensor([[0.0, 0.0, 0.0]])
    returns = torch.tensor([[1.0, 1.0, 0.0]])
    mask = torch.tensor([[True, True, True]])
    loss, metrics = ppo_value_loss(values, old, returns, mask, value_clip=0.5, num_tokens=3)
    # token 0: max((1-1)^2, (0.5-1)^2) = 0.25; token 1: max(1, 1) = 1; token 2: max(4, 0.25) = 4
    assert float(loss) == pytest.approx(0.5 * (0.25 + 1 + 4) / 3)
    assert float(metrics["vf_clipfrac"]) == pytest.approx(1 / 3)
    unclipped, _ = ppo_value_loss(values, old, returns, mask, value_clip=0.0, num_tokens=3)
    assert float(unclipped) == pytest.approx(0.5 * (0 + 1 + 4) / 3)


def test_kl_controllers():
    fixed = FixedKLController(0.1)
    fixed.update(5.0, 64)
    assert fixed.value == 0.1
    adaptive = kl_controller(0.1, target=2.0, horizon=1000)
    assert isinstance(adaptive, AdaptiveKLController)
    adaptive.update(4.0, 100)  # error clipped to +0.2
    assert adaptive.value == pytest.approx(0.1 * (1 + 0.2 * 100 / 1000))
    adaptive.update(1.5, 100)  # error -0.25 clipped to -0.2
    assert adaptive.value == pytest.approx(0.1 * 1.02 * (1 - 0.02))
    state = adaptive.state_dict()
    other = kl_controller(0.5, target=2.0, horizon=1000)
    other.load_state_dict(state)
    assert other.value == adaptive.value


def inputs(values=None, seed=0, groups=(0, 0, 0, 1, 1, 1)):
    generator = torch.Generator().manual_seed(seed)
    batch, length = len(groups), 6
    mask = torch.zeros(batch, length, dtype=torch.bool)
    for row in range(batch):
        mask[row, 1 : 2 + row % 4] = True
    rewards = torch.randn(batch, length, generator=generator) * mask
    if values is True:
        values = torch.randn(batch, length, generator=generator)
    return AdvantageInputs(token_rewards=rewards, mask=mask, values=values, group_ids=torch.tensor(groups), gamma=0.9, lam=0.8)


def test_estimators_are_registered_with_their_critic_needs():
    assert set(ADVANTAGES.names()) >= {"gae", "reinforce", "rloo", "grpo"}
    assert needs_critic("gae") and not needs_critic("grpo") and not needs_critic("rloo") and not needs_critic("reinforce")
    with pytest.raises(ValueError, match="needs critic values"):
        estimate_advantages("gae", inputs())
    with pytest.raises(ValueError, match="unknown advantage estimator 'ppo2'"):
        estimate_advantages("ppo2", inputs())


def test_gae_and_reinforce_match_the_reference_scans():
    given = inputs(values=True)
    advantages, returns = estimate_advantages("gae", given)
    ref_adv, ref_ret = kref.gae(given.token_rewards, given.values, given.mask, gamma=0.9, lam=0.8)
    torch.testing.assert_close(advantages, ref_adv)
    torch.testing.assert_close(returns, ref_ret)
    reinforce, none = estimate_advantages("reinforce", given)
    assert none is None
    torch.testing.assert_close(reinforce, kref.discounted_returns(given.token_rewards, given.mask, gamma=0.9))


def test_rloo_and_grpo_by_hand():
    given = inputs()
    scores = (given.token_rewards * given.mask).sum(-1)
    rloo, _ = estimate_advantages("rloo", given)
    grpo, _ = estimate_advantages("grpo", given)
    for row in range(6):
        group = [r for r in range(6) if given.group_ids[r] == given.group_ids[row]]
        others = [float(scores[r]) for r in group if r != row]
        expected_rloo = float(scores[row]) - sum(others) / len(others)
        values = torch.tensor([float(scores[r]) for r in group])
        expected_grpo = (float(scores[row]) - float(values.mean())) / (float(values.std()) + 1e-6)
        assert torch.allclose(rloo[row][given.mask[row]], torch.tensor(expected_rloo), atol=1e-5)
        assert torch.allclose(grpo[row][given.mask[row]], torch.tensor(expected_grpo), atol=1e-5)
        assert bool((rloo[row][~given.mask[row]] == 0).all()) and bool((grpo[row][~given.mask[row]] == 0).all())
    with pytest.raises(ValueError, match="at least 2 samples"):
        estimate_advantages("grpo", inputs(groups=(0, 1, 1, 2, 2, 2)))


def test_informative_rows_are_the_groups_whose_scores_differ():
    scores = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.5, 0.5, 0.5])
    groups = torch.tensor([4, 4, 7, 7, 1, 1, 9, 9, 9])  # any ids; groups need not be sorted
    assert informative_rows(scores, groups).tolist() == [2, 3]
    # Every group uniform: nothing informative; the advantages there are zero too.
    assert informative_rows(torch.ones(4), torch.tensor([0, 0, 1, 1])).tolist() == []
    mask = torch.ones(9, 2, dtype=torch.bool)
    rewards = torch.zeros(9, 2)
    rewards[:, -1] = scores
    grpo, _ = estimate_advantages("grpo", AdvantageInputs(token_rewards=rewards, mask=mask, values=None, group_ids=groups))
    uninformative = [row for row in range(9) if row not in (2, 3)]
    assert bool((grpo[uninformative] == 0).all()) and bool((grpo[[2, 3]] != 0).all())


def test_whiten_normalizes_over_masked_positions_only():
    values = torch.tensor([[1.0, 2.0, 100.0], [3.0, 4.0, -50.0]])
    mask = torch.tensor([[True, True, False], [True, True, False]])
    whitened = whiten(values, mask)
    assert float(whitened[mask].mean()) == pytest.approx(0.0, abs=1e-6)
    assert float(whitened[mask].std()) == pytest.approx(1.0, abs=1e-4)
    assert bool((whitened[~mask] == 0).all())
