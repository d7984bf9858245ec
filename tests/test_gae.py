"""stema_kernels.gae / discounted_returns against reference.py and a per-row Python-float loop.

The independent check compacts the valid positions of each row, runs the textbook recursion over
Python floats (double precision) and scatters the results back; the kernels must agree with it to
fp32 accuracy, and with the fp32 reference more tightly. Row lengths below 64 take the CUDA
kernel's thread-per-row layout, longer rows its warp-per-row layout (several chunks at T = 1000).
"""

from __future__ import annotations

import math

import pytest
import torch

import stema_kernels
from stema_kernels import _dispatch, reference

MASK_KINDS = ("right_padding", "left_padding", "gaps", "all_masked", "all_valid", "mixed_rows")
SHAPES = [(1, 1), (1, 50), (6, 37), (5, 64), (3, 300), (2, 1000)]
GAMMA_LAM = [
    pytest.param(1.0, 1.0, id="gamma1-lam1"),
    pytest.param(0.99, 0.95, id="gamma0.99-lam0.95"),
    pytest.param(0.9, 0.0, id="lam0-td"),
]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# Kernel vs the fp32 reference: only the CUDA warp layout's reassociation differs.
REFERENCE_REL_TOL = 1e-5
# Kernel vs the double-precision loop: fp32 rounding accumulated over up to 1000 steps.
PYTHON_LOOP_REL_TOL = 1e-4


def make_mask(kind: str, batch: int, length: int, generator: torch.Generator) -> torch.Tensor:
    """A bool [batch, length] mask of one padding layout."""
    positions = torch.arange(length)[None, :]
    lengths = torch.randint(0, length + 1, (batch, 1), generator=generator)
    if kind == "right_padding":
        return positions < lengths
    if kind == "left_padding":
        return positions >= length - lengths
    if kind == "gaps":
        return torch.rand(batch, length, generator=generator) < 0.7
    if kind == "all_masked":
        return torch.zeros(batch, length, dtype=torch.bool)
    if kind == "all_valid":
        return torch.ones(batch, length, dtype=torch.bool)
    if kind == "mixed_rows":  # all-masked, all-valid, gappy and padded rows in one batch
        rows = [
            torch.zeros(length, dtype=torch.bool),
            torch.ones(length, dtype=torch.bool),
            torch.rand(length, generator=generator) < 0.5,
            positions[0] >= length // 2,
        ]
        return torch.stack([rows[row % len(rows)] for row in range(batch)])
    raise AssertionError(kind)


def make_batch(batch: int, length: int, mask_kind: str, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    rewards = torch.randn(batch, length, generator=generator)
    values = torch.randn(batch, length, generator=generator)
    return rewards, values, make_mask(mask_kind, batch, length, generator)


def python_gae(rewards, values, mask, *, gamma, lam):
    """(advantages, returns) float64: the textbook recursion over each row's valid tokens."""
    batch, length = rewards.shape
    advantages = [[0.0] * length for _ in range(batch)]
    returns = [[0.0] * length for _ in range(batch)]
    for row, (row_rewards, row_values, row_mask) in enumerate(
        zip(rewards.double().tolist(), values.double().tolist(), mask.bool().tolist())
    ):
        valid = [t for t in range(length) if row_mask[t]]
        r = [row_rewards[t] for t in valid]
        v = [row_values[t] for t in valid]
        advantage = 0.0
        for i in reversed(range(len(valid))):
            next_value = v[i + 1] if i + 1 < len(valid) else 0.0
            delta = r[i] + gamma * next_value - v[i]
            advantage = delta + gamma * lam * advantage
            advantages[row][valid[i]] = advantage
            returns[row][valid[i]] = advantage + v[i]
    return torch.tensor(advantages, dtype=torch.float64), torch.tensor(returns, dtype=torch.float64)


def python_discounted_returns(rewards, mask, *, gamma):
    """Returns float64: G_i = r_i + gamma * G_{i+1} over each row's valid tokens."""
    batch, length = rewards.shape
    returns = [[0.0] * length for _ in range(batch)]
    for row, (row_rewards, row_mask) in enumerate(zip(rewards.double().tolist(), mask.bool().tolist())):
        running = 0.0
        for t in reversed([t for t in range(length) if row_mask[t]]):
            running = row_rewards[t] + gamma * running
            returns[row][t] = running
    return torch.tensor(returns, dtype=torch.float64)


def reward_to_go(rewards: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """sum over valid s >= t of r_s at valid t (0 elsewhere), in float64."""
    masked = rewards.double() * mask
    return masked.flip(1).cumsum(1).flip(1) * mask


def assert_close_scaled(actual: torch.Tensor, expected: torch.Tensor, rel: float) -> None:
    """|actual - expected| <= rel * max(1, max |expected|) elementwise, compared in float64 on CPU.

    Scaled by the row's largest magnitude because a recurrence's rounding error follows the size of
    the running sums, not of each (possibly near-zero) output.
    """
    actual = actual.detach().cpu().double()
    expected = expected.detach().cpu().double()
    assert actual.shape == expected.shape
    scale = max(1.0, expected.abs().max().item()) if expected.numel() else 1.0
    torch.testing.assert_close(actual, expected, rtol=0.0, atol=rel * scale)


def assert_zero_where_masked(output: torch.Tensor, mask: torch.Tensor) -> None:
    assert torch.all(output.cpu()[~mask.cpu().bool()] == 0)


@pytest.mark.parametrize(("gamma", "lam"), GAMMA_LAM)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("mask_kind", MASK_KINDS)
def test_gae_matches_reference_and_python_loop(device, mask_kind, shape, gamma, lam):
    rewards, values, mask = make_batch(*shape, mask_kind)
    advantages, returns = stema_kernels.gae(
        rewards.to(device), values.to(device), mask.to(device), gamma=gamma, lam=lam
    )
    assert advantages.dtype == returns.dtype == torch.float32
    assert advantages.shape == returns.shape == shape
    assert advantages.device.type == returns.device.type == device

    ref_advantages, ref_returns = reference.gae(rewards, values, mask, gamma=gamma, lam=lam)
    assert_close_scaled(advantages, ref_advantages, REFERENCE_REL_TOL)
    assert_close_scaled(returns, ref_returns, REFERENCE_REL_TOL)
    loop_advantages, loop_returns = python_gae(rewards, values, mask, gamma=gamma, lam=lam)
    assert_close_scaled(advantages, loop_advantages, PYTHON_LOOP_REL_TOL)
    assert_close_scaled(returns, loop_returns, PYTHON_LOOP_REL_TOL)
    assert_zero_where_masked(advantages, mask)
    assert_zero_where_masked(returns, mask)


@pytest.mark.parametrize("gamma", [1.0, 0.99, 0.0])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("mask_kind", MASK_KINDS)
def test_discounted_returns_matches_reference_and_python_loop(device, mask_kind, shape, gamma):
    rewards, _, mask = make_batch(*shape, mask_kind)
    returns = stema_kernels.discounted_returns(rewards.to(device), mask.to(device), gamma=gamma)
    assert returns.dtype == torch.float32 and returns.shape == shape

    assert_close_scaled(returns, reference.discounted_returns(rewards, mask, gamma=gamma), REFERENCE_REL_TOL)
    assert_close_scaled(returns, python_discounted_returns(rewards, mask, gamma=gamma), PYTHON_LOOP_REL_TOL)
    assert_zero_where_masked(returns, mask)


@pytest.mark.parametrize("shape", [(4, 20), (3, 300)], ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("values_dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rewards_dtype", DTYPES, ids=str)
def test_gae_16_bit_and_mixed_dtypes_accumulate_in_fp32(device, rewards_dtype, values_dtype, shape):
    rewards, values, mask = make_batch(*shape, "gaps", seed=1)
    rewards, values = rewards.to(rewards_dtype), values.to(values_dtype)
    advantages, returns = stema_kernels.gae(
        rewards.to(device), values.to(device), mask.to(device), gamma=0.99, lam=0.95
    )
    assert advantages.dtype == returns.dtype == torch.float32

    # The 16-bit inputs are read exactly and everything after is fp32, as in the reference.
    ref_advantages, ref_returns = reference.gae(rewards, values, mask, gamma=0.99, lam=0.95)
    assert_close_scaled(advantages, ref_advantages, REFERENCE_REL_TOL)
    assert_close_scaled(returns, ref_returns, REFERENCE_REL_TOL)
    loop_advantages, loop_returns = python_gae(rewards, values, mask, gamma=0.99, lam=0.95)
    assert_close_scaled(advantages, loop_advantages, PYTHON_LOOP_REL_TOL)
    assert_close_scaled(returns, loop_returns, PYTHON_LOOP_REL_TOL)


@pytest.mark.parametrize("shape", [(4, 20), (3, 300)], ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("rewards_dtype", DTYPES, ids=str)
def test_discounted_returns_dtypes(device, rewards_dtype, shape):
    rewards, _, mask = make_batch(*shape, "right_padding", seed=2)
    rewards = rewards.to(rewards_dtype)
    returns = stema_kernels.discounted_returns(rewards.to(device), mask.to(device), gamma=0.97)
    assert returns.dtype == torch.float32
    assert_close_scaled(returns, reference.discounted_returns(rewards, mask, gamma=0.97), REFERENCE_REL_TOL)
    assert_close_scaled(returns, python_discounted_returns(rewards, mask, gamma=0.97), PYTHON_LOOP_REL_TOL)


@pytest.mark.parametrize("length", [37, 1000])
def test_undiscounted_returns_are_reward_to_go(device, length):
    # With gamma = lam = 1 the value terms telescope: GAE's returns are the sum of the rewards of
    # the valid tokens from t on, whatever the values, and equal discounted_returns(gamma=1).
    rewards, values, mask = make_batch(4, length, "gaps", seed=3)
    _, returns = stema_kernels.gae(rewards.to(device), values.to(device), mask.to(device), gamma=1.0, lam=1.0)
    returns_to_go = stema_kernels.discounted_returns(rewards.to(device), mask.to(device), gamma=1.0)
    assert_close_scaled(returns, reward_to_go(rewards, mask), PYTHON_LOOP_REL_TOL)
    assert_close_scaled(returns_to_go, reward_to_go(rewards, mask), PYTHON_LOOP_REL_TOL)


@pytest.mark.parametrize("shape", [(2000, 5), (300, 129)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_many_rows_span_several_blocks(device, shape):
    rewards, values, mask = make_batch(*shape, "mixed_rows", seed=4)
    advantages, returns = stema_kernels.gae(
        rewards.to(device), values.to(device), mask.to(device), gamma=0.99, lam=0.95
    )
    ref_advantages, ref_returns = reference.gae(rewards, values, mask, gamma=0.99, lam=0.95)
    assert_close_scaled(advantages, ref_advantages, REFERENCE_REL_TOL)
    assert_close_scaled(returns, ref_returns, REFERENCE_REL_TOL)


@pytest.mark.parametrize("shape", [(0, 5), (3, 0), (0, 0)])
def test_empty_batches_give_empty_outputs(device, shape):
    rewards = torch.empty(shape, device=device)
    mask = torch.empty(shape, dtype=torch.bool, device=device)
    advantages, returns = stema_kernels.gae(rewards, rewards, mask, gamma=0.99, lam=0.95)
    discounted = stema_kernels.discounted_returns(rewards, mask, gamma=0.99)
    for output in (advantages, returns, discounted):
        assert output.shape == shape and output.dtype == torch.float32 and output.device.type == device


def test_strided_expanded_and_non_bool_masks(device):
    # values[:, :-1] of a [B, T + 1] tensor (row stride T + 1), a transposed rewards tensor
    # (column stride != 1), a mask broadcast from one row (row stride 0), int64 and float masks.
    batch, length = 5, 70
    rewards, values, mask = make_batch(batch, length, "gaps", seed=5)
    values_with_bootstrap = torch.cat([values, torch.randn(batch, 1)], dim=1).to(device)
    transposed_rewards = rewards.t().contiguous().to(device).t()
    shared_mask = mask[:1].to(device).expand(batch, length)
    ref_advantages, ref_returns = reference.gae(rewards, values, mask[:1].expand(batch, length), gamma=0.9, lam=0.8)
    advantages, returns = stema_kernels.gae(
        transposed_rewards, values_with_bootstrap[:, :-1], shared_mask, gamma=0.9, lam=0.8
    )
    assert_close_scaled(advantages, ref_advantages, REFERENCE_REL_TOL)
    assert_close_scaled(returns, ref_returns, REFERENCE_REL_TOL)

    ref_advantages, ref_returns = reference.gae(rewards, values, mask, gamma=0.9, lam=0.8)
    for mask_dtype in (torch.int64, torch.float32, torch.uint8):
        advantages, returns = stema_kernels.gae(
            rewards.to(device), values.to(device), mask.to(device, mask_dtype), gamma=0.9, lam=0.8
        )
        assert_close_scaled(advantages, ref_advantages, REFERENCE_REL_TOL)
        assert_close_scaled(returns, ref_returns, REFERENCE_REL_TOL)
        discounted = stema_kernels.discounted_returns(rewards.to(device), mask.to(device, mask_dtype), gamma=0.9)
        assert_close_scaled(discounted, reference.discounted_returns(rewards, mask, gamma=0.9), REFERENCE_REL_TOL)


def test_gae_outputs_are_separate_contiguous_tensors(device):
    # Both outputs come from one [2, B, T] allocation: each must still be a contiguous [B, T]
    # tensor of its own, and writing one must leave the other alone.
    rewards, values, mask = make_batch(4, 33, "gaps", seed=8)
    advantages, returns = stema_kernels.gae(rewards.to(device), values.to(device), mask.to(device), gamma=0.99, lam=0.95)
    assert advantages.shape == returns.shape == (4, 33)
    assert advantages.is_contiguous() and returns.is_contiguous()
    _, ref_returns = reference.gae(rewards, values, mask, gamma=0.99, lam=0.95)
    advantages.fill_(7.0)
    assert_close_scaled(returns, ref_returns, REFERENCE_REL_TOL)
    returns.zero_()
    assert torch.equal(advantages.cpu(), torch.full((4, 33), 7.0))


def test_inputs_that_require_grad_give_outputs_that_do_not(device):
    rewards, values, mask = make_batch(3, 40, "right_padding", seed=6)
    rewards = rewards.to(device).requires_grad_()
    values = values.to(device).requires_grad_()
    advantages, returns = stema_kernels.gae(rewards, values, mask.to(device), gamma=0.99, lam=0.95)
    discounted = stema_kernels.discounted_returns(rewards, mask.to(device), gamma=0.99)
    assert not advantages.requires_grad and not returns.requires_grad and not discounted.requires_grad
    ref_advantages, _ = reference.gae(rewards.detach().cpu(), values.detach().cpu(), mask, gamma=0.99, lam=0.95)
    assert_close_scaled(advantages, ref_advantages, REFERENCE_REL_TOL)


def test_devices_without_a_kernel_fall_back_to_the_reference(monkeypatch):
    rewards, values, mask = make_batch(3, 40, "gaps", seed=7)
    monkeypatch.setattr(_dispatch, "has_kernel", lambda device: False)
    advantages, returns = stema_kernels.gae(rewards.requires_grad_(), values, mask, gamma=0.99, lam=0.95)
    discounted = stema_kernels.discounted_returns(rewards, mask, gamma=0.99)
    ref_advantages, ref_returns = reference.gae(rewards.detach(), values, mask, gamma=0.99, lam=0.95)
    assert torch.equal(advantages, ref_advantages) and torch.equal(returns, ref_returns)
    assert torch.equal(discounted, reference.discounted_returns(rewards.detach(), mask, gamma=0.99))
    assert not advantages.requires_grad and not discounted.requires_grad


def _valid_inputs():
    rewards, values, mask = make_batch(2, 6, "gaps")
    return rewards, values, mask


@pytest.mark.parametrize(
    ("bad_input", "error", "match"),
    [
        (lambda r, v, m: (r, v[:, :5], m), ValueError, r"values has shape \(2, 5\) but rewards has shape \(2, 6\)"),
        (lambda r, v, m: (r, v, m[:1]), ValueError, r"mask has shape \(1, 6\)"),
        (lambda r, v, m: (r[None], v[None], m[None]), ValueError, r"rewards must be 2-D \[B, T\], got shape \(1, 2, 6\)"),
        (lambda r, v, m: (r[0], v[0], m[0]), ValueError, r"rewards must be 2-D"),
        (lambda r, v, m: (r.long(), v, m), ValueError, r"rewards: dtype torch.int64 is not supported"),
        (lambda r, v, m: (r, v.double(), m), ValueError, r"values: dtype torch.float64 is not supported"),
        (lambda r, v, m: (r.tolist(), v, m), TypeError, r"rewards: expected a torch.Tensor, got list"),
    ],
    ids=["values-shape", "mask-shape", "3-d", "1-d", "int-rewards", "fp64-values", "not-a-tensor"],
)
def test_gae_rejects_bad_tensors(bad_input, error, match):
    rewards, values, mask = bad_input(*_valid_inputs())
    with pytest.raises(error, match=match):
        stema_kernels.gae(rewards, values, mask, gamma=0.99, lam=0.95)


@pytest.mark.parametrize(
    ("gamma", "lam", "error", "match"),
    [
        (1.5, 0.95, ValueError, r"gamma must be a finite number in \[0, 1\], got 1.5"),
        (-0.1, 0.95, ValueError, r"gamma must be a finite number in \[0, 1\]"),
        (math.nan, 0.95, ValueError, r"gamma must be a finite number"),
        (0.99, math.inf, ValueError, r"lam must be a finite number"),
        (0.99, 1.01, ValueError, r"lam must be a finite number in \[0, 1\], got 1.01"),
        (True, 0.95, TypeError, r"gamma: expected a real number, got bool"),
        ("0.9", 0.95, TypeError, r"gamma: expected a real number, got str"),
    ],
)
def test_gae_rejects_bad_gamma_and_lam(gamma, lam, error, match):
    rewards, values, mask = _valid_inputs()
    with pytest.raises(error, match=match):
        stema_kernels.gae(rewards, values, mask, gamma=gamma, lam=lam)


def test_discounted_returns_rejects_bad_arguments():
    rewards, _, mask = _valid_inputs()
    with pytest.raises(ValueError, match=r"mask has shape \(2, 5\) but rewards has shape \(2, 6\)"):
        stema_kernels.discounted_returns(rewards, mask[:, :5], gamma=0.9)
    with pytest.raises(ValueError, match=r"rewards must be 2-D"):
        stema_kernels.discounted_returns(rewards[None], mask[None], gamma=0.9)
    with pytest.raises(ValueError, match=r"gamma must be a finite number in \[0, 1\], got 2.0"):
        stema_kernels.discounted_returns(rewards, mask, gamma=2.0)


def test_compiled_kernels_check_their_arguments():
    # The wrappers check first; _C's own checks guard direct callers.
    rewards, values, mask = _valid_inputs()
    advantages = torch.empty_like(rewards)
    args = dict(
        rewards=rewards.data_ptr(), rewards_dtype=0, rewards_row_stride=6,
        values=values.data_ptr(), values_dtype=0, values_row_stride=6,
        mask=mask.data_ptr(), mask_row_stride=6, batch=2, length=6, gamma=0.99, lam=0.95,
        advantages=advantages.data_ptr(), returns=advantages.data_ptr(),
    )  # fmt: skip
    with pytest.raises(ValueError, match=r"gamma must be a finite number in \[0, 1\], got 1.5"):
        _dispatch._C.gae_cpu(**{**args, "gamma": 1.5})
    with pytest.raises(ValueError, match=r"sizes must be non-negative"):
        _dispatch._C.gae_cpu(**{**args, "batch": -1})
    with pytest.raises(ValueError, match=r"mask: null data pointer"):
        _dispatch._C.gae_cpu(**{**args, "mask": 0})
    with pytest.raises(ValueError, match=r"unknown dtype code 7"):
        _dispatch._C.gae_cpu(**{**args, "values_dtype": 7})
    with pytest.raises(ValueError, match=r"rewards: dtype float64 is not supported"):
        _dispatch._C.discounted_returns_cpu(
            rewards=rewards.data_ptr(), rewards_dtype=3, rewards_row_stride=6, mask=mask.data_ptr(),
            mask_row_stride=6, batch=2, length=6, gamma=0.9, returns=advantages.data_ptr(),
        )  # fmt: skip


@pytest.mark.cuda
def test_gae_rejects_inputs_on_different_devices():
    rewards, values, mask = _valid_inputs()
    with pytest.raises(ValueError, match=r"mask is on cpu but rewards is on cuda:0"):
        stema_kernels.gae(rewards.cuda(), values.cuda(), mask, gamma=0.99, lam=0.95)
    with pytest.raises(ValueError, match=r"mask is on cpu but rewards is on cuda:0"):
        stema_kernels.discounted_returns(rewards.cuda(), mask, gamma=0.99)
