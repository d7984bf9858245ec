"""Generalized advantage estimation and discounted returns: one reverse scan per sequence.

`gae` and `discounted_returns` compute exactly `reference.gae` and `reference.discounted_returns`
(the specification; formulas in their docstrings) without the Python loop over T: the compiled
kernels scan each row once, skipping masked positions, so left or right padding and gaps inside a
row are handled alike. Inputs are `[B, T]`; outputs are fp32 `[B, T]` with 0 at masked positions.

These are plain computations, not differentiable ones: inputs that require grad are read through
`.detach()` and the outputs never require grad (PPO treats advantages and returns as constants).
"""

from __future__ import annotations

import math
import numbers

import torch

from . import _dispatch, reference
from ._dispatch import _C

# Mask dtypes the kernels read directly, one byte per token (nonzero = valid); any other dtype
# is turned into a bool mask with `mask != 0` first.
_BYTE_MASK_DTYPES = (torch.bool, torch.uint8, torch.int8)


def gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    *,
    gamma: float,
    lam: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages, returns), fp32 `[B, T]`: GAE over the valid tokens of each row.

    Over the valid positions t of a row, in order (V after the last valid token is 0):
        delta_t = r_t + gamma * V_next(t) - V_t
        A_t = delta_t + gamma * lam * A_next(t)
        returns_t = A_t + V_t
    rewards, values `[B, T]` fp32, bf16 or fp16 (their dtypes may differ); mask `[B, T]` bool or
    any integer or float 0/1 tensor, marking valid response tokens. gamma and lam in [0, 1].
    Advantages and returns are 0 at masked positions.
    """
    rewards = _dispatch.check_tensor(rewards, "rewards")
    values = _dispatch.check_tensor(values, "values")
    mask = _dispatch.check_tensor(mask, "mask")
    gamma = _check_unit_interval(gamma, "gamma")
    lam = _check_unit_interval(lam, "lam")
    _dispatch.check_float(rewards, "rewards")
    _dispatch.check_float(values, "values")
    batch, length = _check_same_2d_shape(("rewards", rewards), ("values", values), ("mask", mask))
    device = _dispatch.check_same_device(("rewards", rewards), ("values", values), ("mask", mask))
    rewards, values, mask = rewards.detach(), values.detach(), mask.detach()

    if not _dispatch.has_kernel(device):
        with torch.no_grad():
            return reference.gae(rewards, values, mask, gamma=gamma, lam=lam)

    advantages, returns = _paired_outputs(batch, length, device)
    if advantages.numel() == 0:
        return advantages, returns
    rewards = _with_unit_column_stride(rewards)
    values = _with_unit_column_stride(values)
    mask = _as_byte_mask(mask)
    kernel_args = dict(
        rewards=rewards.data_ptr(),
        rewards_dtype=_dispatch.dtype_code(rewards, "rewards"),
        rewards_row_stride=rewards.stride(0),
        values=values.data_ptr(),
        values_dtype=_dispatch.dtype_code(values, "values"),
        values_row_stride=values.stride(0),
        mask=mask.data_ptr(),
        mask_row_stride=mask.stride(0),
        batch=batch,
        length=length,
        gamma=gamma,
        lam=lam,
        advantages=advantages.data_ptr(),
        returns=returns.data_ptr(),
    )
    if device.type == "cuda":
        with torch.cuda.device(device):
            _C.gae_cuda(**kernel_args, stream=_dispatch.stream_handle(device))
    else:
        _C.gae_cpu(**kernel_args)
    return advantages, returns


def discounted_returns(rewards: torch.Tensor, mask: torch.Tensor, *, gamma: float) -> torch.Tensor:
    """Returns fp32 `[B, T]`: G_t = r_t + gamma * G_next(t) over the valid tokens of each row.

    rewards `[B, T]` fp32, bf16 or fp16; mask `[B, T]` as in `gae`; gamma in [0, 1]. The returns
    are 0 at masked positions (REINFORCE's reward-to-go when gamma = 1).
    """
    rewards = _dispatch.check_tensor(rewards, "rewards")
    mask = _dispatch.check_tensor(mask, "mask")
    gamma = _check_unit_interval(gamma, "gamma")
    _dispatch.check_float(rewards, "rewards")
    batch, length = _check_same_2d_shape(("rewards", rewards), ("mask", mask))
    device = _dispatch.check_same_device(("rewards", rewards), ("mask", mask))
    rewards, mask = rewards.detach(), mask.detach()

    if not _dispatch.has_kernel(device):
        with torch.no_grad():
            return reference.discounted_returns(rewards, mask, gamma=gamma)

    returns = torch.empty((batch, length), dtype=torch.float32, device=device)
    if returns.numel() == 0:
        return returns
    rewards = _with_unit_column_stride(rewards)
    mask = _as_byte_mask(mask)
    kernel_args = dict(
        rewards=rewards.data_ptr(),
        rewards_dtype=_dispatch.dtype_code(rewards, "rewards"),
        rewards_row_stride=rewards.stride(0),
        mask=mask.data_ptr(),
        mask_row_stride=mask.stride(0),
        batch=batch,
        length=length,
        gamma=gamma,
        returns=returns.data_ptr(),
    )
    if device.type == "cuda":
        with torch.cuda.device(device):
            _C.discounted_returns_cuda(**kernel_args, stream=_dispatch.stream_handle(device))
    else:
        _C.discounted_returns_cpu(**kernel_args)
    return returns


def _check_unit_interval(value: object, name: str) -> float:
    """`value` as a float, or an error unless it is a finite real number in [0, 1]."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}: expected a real number, got {type(value).__name__}")
    value = float(value)
    if not (math.isfinite(value) and 0.0 <= value <= 1.0):
        raise ValueError(f"{name} must be a finite number in [0, 1], got {value}")
    return value


def _check_same_2d_shape(*named: tuple[str, torch.Tensor]) -> tuple[int, int]:
    """The common `[B, T]` shape of the named tensors, or a ValueError naming the odd one."""
    for name, tensor in named:
        if tensor.dim() != 2:
            raise ValueError(f"{name} must be 2-D [B, T], got shape {tuple(tensor.shape)}")
    first_name, first = named[0]
    for name, tensor in named[1:]:
        if tensor.shape != first.shape:
            raise ValueError(
                f"{name} has shape {tuple(tensor.shape)} but {first_name} has shape {tuple(first.shape)}"
            )
    batch, length = first.shape
    return batch, length


def _paired_outputs(batch: int, length: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Two contiguous fp32 `[B, T]` outputs carved from one `[2, B, T]` allocation.

    One allocation instead of two is cheaper, and at the benchmark size (two 1 MiB outputs) it
    also stays in glibc's heap between calls: two separate 1 MiB blocks freed together exceed
    malloc's trim threshold, are handed back to the OS and page-fault again on the next call,
    which cost more (about 0.7 ms) than the kernel itself.
    """
    outputs = torch.empty((2, batch, length), dtype=torch.float32, device=device)
    return outputs[0], outputs[1]


def _with_unit_column_stride(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` itself when its rows are contiguous (any row stride, e.g. a slice), else a copy."""
    if tensor.shape[1] > 1 and tensor.stride(1) != 1:
        return tensor.contiguous()
    return tensor


def _as_byte_mask(mask: torch.Tensor) -> torch.Tensor:
    """A one-byte-per-token mask with unit column stride (nonzero = valid), as the kernels read."""
    if mask.dtype not in _BYTE_MASK_DTYPES:
        mask = mask != 0
    return _with_unit_column_stride(mask)
