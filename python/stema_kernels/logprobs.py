"""Fused token log-probs, entropy and KL over `[..., V]` logits, with autograd.

For z = logits / temperature (fp32) and a label y per position:

    logprob = z[y] - logsumexp(z)
    entropy = logsumexp(z) - sum_v softmax(z)_v * z_v        (z_v = -inf terms contribute 0)
    kl      = k1 | k2 | k3 of log_ratio = logprob - ref_logprob (`reference.kl_from_log_ratio`)

`reference.token_logprobs` and `reference.logprob_kl` are the specification. The compiled kernels
read each row of logits once (online max / sum-exp), so the forward pass allocates only `[N]`
fp32 outputs and saves the logits themselves, the labels and `[N]` statistics (logsumexp, and the
entropy when asked) for the backward pass, never an `[N, V]` fp32 copy. The backward pass
recomputes p = exp(z - logsumexp) and writes the gradient in the logits' dtype in one pass:

    d logprob / d logits_j = (onehot_j - p_j) / temperature
    d entropy / d logits_j = -p_j * (log p_j + entropy) / temperature

The kernels compute z as logits * (1 / temperature), within an ulp of the reference's division,
and accumulate the entropy from shifts z - max, which avoids the cancellation of the reference's
fp32 `lse - sum p z` (the two differ by up to ~1e-4 at V = 32000, the kernel being the closer to
float64).

Logits are read in place when the vocabulary dimension is contiguous and the leading dimensions
collapse to at most two strides (so `logits[:, :-1]` of `[B, T, V]` needs no copy); otherwise a
contiguous copy is made. Positions whose label is `ignore_index` give 0 and no gradient.

Labels outside [0, V) that are not `ignore_index`: on the CPU a ValueError; on CUDA the check
would need a host sync, so those positions get NaN in every output and a NaN gradient row.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import NamedTuple

import torch

from . import _dispatch, reference

KL_ESTIMATORS = reference.KL_ESTIMATORS
LABEL_DTYPES = (torch.int64, torch.int32)

# Codes of stema::logprobs::KlEstimator (csrc/include/stema/logprobs.h); 0 means no KL.
_KL_CODES = {"k1": 1, "k2": 2, "k3": 3}


def _kl_derivative(kl: str, log_ratio: torch.Tensor) -> torch.Tensor:
    """d kl / d log_ratio for Schulman's estimators: k1 -> 1, k2 -> log_ratio, k3 -> 1 - exp(-log_ratio)."""
    if kl == "k1":
        return torch.ones_like(log_ratio)
    if kl == "k2":
        return log_ratio
    return -torch.expm1(-log_ratio)


@dataclass(frozen=True)
class _RowLayout:
    """logits as [rows, vocab]: row r starts at element
    (r // rows_per_group) * group_stride + (r % rows_per_group) * row_stride."""

    rows: int
    vocab: int
    rows_per_group: int
    group_stride: int
    row_stride: int


def _collapse_leading(sizes: tuple[int, ...], strides: tuple[int, ...]) -> list[tuple[int, int]]:
    """Leading (size, stride) pairs with size-1 dims dropped and mergeable neighbours merged."""
    collapsed: list[tuple[int, int]] = []
    for size, stride in zip(sizes, strides):
        if size == 1:
            continue
        if collapsed and collapsed[-1][1] == stride * size:
            outer_size, _ = collapsed[-1]
            collapsed[-1] = (outer_size * size, stride)
        else:
            collapsed.append((size, stride))
    return collapsed


def _as_rows(logits: torch.Tensor) -> tuple[torch.Tensor, _RowLayout]:
    """`logits` (or a contiguous copy when the kernels cannot read it in place) and its row layout."""
    vocab = logits.shape[-1]
    rows = logits.numel() // vocab
    if logits.stride(-1) != 1 and vocab > 1:
        logits = logits.contiguous()
    leading = _collapse_leading(tuple(logits.shape[:-1]), tuple(logits.stride()[:-1]))
    if len(leading) > 2:
        logits = logits.contiguous()
        leading = [(rows, vocab)] if rows > 1 else []
    if len(leading) == 2:
        (_, group_stride), (rows_per_group, row_stride) = leading
        return logits, _RowLayout(rows, vocab, rows_per_group, group_stride, row_stride)
    row_stride = leading[0][1] if leading else vocab
    return logits, _RowLayout(rows, vocab, max(rows, 1), 0, row_stride)


def _device_guard(device: torch.device):
    """Makes `device` current for a CUDA launch (the stream handle belongs to it)."""
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def _layout_kwargs(rows: torch.Tensor, layout: _RowLayout, labels: torch.Tensor, *, inv_temperature: float,
                   ignore_index: int) -> dict:
    return {
        "logits": rows.data_ptr(),
        "dtype": _dispatch.dtype_code(rows, "logits"),
        "rows": layout.rows,
        "vocab": layout.vocab,
        "rows_per_group": layout.rows_per_group,
        "group_stride": layout.group_stride,
        "row_stride": layout.row_stride,
        "labels": labels.data_ptr(),
        "labels_int32": labels.dtype == torch.int32,
        "ignore_index": ignore_index,
        "inv_temperature": inv_temperature,
    }


def _pointer(tensor: torch.Tensor | None) -> int:
    return 0 if tensor is None else tensor.data_ptr()


class _ForwardOutputs(NamedTuple):
    logprobs: torch.Tensor  # [N] fp32
    logsumexp: torch.Tensor  # [N] fp32, saved for backward
    entropy: torch.Tensor | None  # [N] fp32 when asked
    kl: torch.Tensor | None  # [N] fp32 when a KL estimator is given


def _run_forward(rows: torch.Tensor, layout: _RowLayout, labels: torch.Tensor, *, inv_temperature: float,
                 ignore_index: int, with_entropy: bool, ref_logprobs: torch.Tensor | None,
                 kl_code: int) -> _ForwardOutputs:
    """One kernel pass over the rows; labels and ref_logprobs are flat [N] (ref in fp32)."""
    logprobs = torch.empty(layout.rows, dtype=torch.float32, device=rows.device)
    logsumexp = torch.empty_like(logprobs)
    entropy = torch.empty_like(logprobs) if with_entropy else None
    kl_values = torch.empty_like(logprobs) if kl_code else None
    if layout.rows > 0:
        kwargs = _layout_kwargs(rows, layout, labels, inv_temperature=inv_temperature, ignore_index=ignore_index)
        kwargs.update(logprobs=logprobs.data_ptr(), logsumexp=logsumexp.data_ptr(), entropy=_pointer(entropy),
                      ref_logprobs=_pointer(ref_logprobs), kl=kl_code, kl_values=_pointer(kl_values))
        if rows.device.type == "cuda":
            with _device_guard(rows.device):
                _dispatch._C.logprobs_forward_cuda(**kwargs, stream=_dispatch.stream_handle(rows.device))
        else:
            _dispatch._C.logprobs_forward_cpu(**kwargs)
    return _ForwardOutputs(logprobs, logsumexp, entropy, kl_values)


def _run_backward(rows: torch.Tensor, layout: _RowLayout, labels: torch.Tensor, *, inv_temperature: float,
                  ignore_index: int, logsumexp: torch.Tensor, grad_logprobs: torch.Tensor,
                  entropy: torch.Tensor | None, grad_entropy: torch.Tensor | None) -> torch.Tensor:
    """Gradient w.r.t. the rows as a contiguous [N, V] tensor in the logits' dtype."""
    grad_logits = torch.empty(layout.rows, layout.vocab, dtype=rows.dtype, device=rows.device)
    if layout.rows > 0:
        kwargs = _layout_kwargs(rows, layout, labels, inv_temperature=inv_temperature, ignore_index=ignore_index)
        kwargs.update(logsumexp=logsumexp.data_ptr(), entropy=_pointer(entropy),
                      grad_logprobs=grad_logprobs.data_ptr(), grad_entropy=_pointer(grad_entropy),
                      grad_logits=grad_logits.data_ptr())
        if rows.device.type == "cuda":
            with _device_guard(rows.device):
                _dispatch._C.logprobs_backward_cuda(**kwargs, stream=_dispatch.stream_handle(rows.device))
        else:
            _dispatch._C.logprobs_backward_cpu(**kwargs)
    return grad_logits


def _flat_fp32(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.reshape(-1).to(torch.float32).contiguous()


def _forward_pass(logits: torch.Tensor, labels: torch.Tensor, *, inv_temperature: float, ignore_index: int,
                  with_entropy: bool = False, flat_ref: torch.Tensor | None = None, kl: str | None = None):
    """(rows, layout, flat labels, outputs) of one forward kernel pass over `logits` [..., V]."""
    rows, layout = _as_rows(logits)
    flat_labels = labels.reshape(-1).contiguous()
    outputs = _run_forward(rows, layout, flat_labels, inv_temperature=inv_temperature, ignore_index=ignore_index,
                           with_entropy=with_entropy, ref_logprobs=flat_ref,
                           kl_code=0 if kl is None else _KL_CODES[kl])
    return rows, layout, flat_labels, outputs


def _token_outputs(outputs: _ForwardOutputs, shape: torch.Size, with_entropy: bool):
    logprobs = outputs.logprobs.view(shape)
    return (logprobs, outputs.entropy.view(shape)) if with_entropy else logprobs


def _needs_grad(logits: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and logits.requires_grad


class _TokenLogprobsFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, inv_temperature, ignore_index, with_entropy):
        rows, layout, flat_labels, outputs = _forward_pass(
            logits, labels, inv_temperature=inv_temperature, ignore_index=ignore_index, with_entropy=with_entropy)
        ctx.save_for_backward(rows, flat_labels, outputs.logsumexp, outputs.entropy)
        ctx.layout, ctx.logits_shape = layout, logits.shape
        ctx.inv_temperature, ctx.ignore_index = inv_temperature, ignore_index
        return _token_outputs(outputs, labels.shape, with_entropy)

    @staticmethod
    def backward(ctx, grad_logprobs, grad_entropy=None):
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None
        rows, flat_labels, logsumexp, entropy = ctx.saved_tensors
        grad_logits = _run_backward(
            rows, ctx.layout, flat_labels, inv_temperature=ctx.inv_temperature, ignore_index=ctx.ignore_index,
            logsumexp=logsumexp, grad_logprobs=_flat_fp32(grad_logprobs), entropy=entropy,
            grad_entropy=None if grad_entropy is None else _flat_fp32(grad_entropy))
        return grad_logits.view(ctx.logits_shape), None, None, None, None


class _LogprobKlFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, flat_ref, kl, inv_temperature, ignore_index):
        rows, layout, flat_labels, outputs = _forward_pass(
            logits, labels, inv_temperature=inv_temperature, ignore_index=ignore_index, flat_ref=flat_ref, kl=kl)
        ctx.save_for_backward(rows, flat_labels, outputs.logsumexp, outputs.logprobs, flat_ref)
        ctx.layout, ctx.logits_shape, ctx.kl = layout, logits.shape, kl
        ctx.inv_temperature, ctx.ignore_index = inv_temperature, ignore_index
        return outputs.logprobs.view(labels.shape), outputs.kl.view(labels.shape)

    @staticmethod
    def backward(ctx, grad_logprobs, grad_kl):
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None, None
        rows, flat_labels, logsumexp, logprobs, flat_ref = ctx.saved_tensors
        # Both outputs depend on the logits only through logprob: fold the KL's grad into it ([N]).
        log_ratio = logprobs - flat_ref
        total_grad_logprobs = _flat_fp32(grad_logprobs) + _flat_fp32(grad_kl) * _kl_derivative(ctx.kl, log_ratio)
        grad_logits = _run_backward(
            rows, ctx.layout, flat_labels, inv_temperature=ctx.inv_temperature, ignore_index=ctx.ignore_index,
            logsumexp=logsumexp, grad_logprobs=total_grad_logprobs.contiguous(), entropy=None, grad_entropy=None)
        return grad_logits.view(ctx.logits_shape), None, None, None, None, None


def _check_logits_and_labels(logits: object, labels: object) -> None:
    logits = _dispatch.check_tensor(logits, "logits")
    labels = _dispatch.check_tensor(labels, "labels")
    _dispatch.check_float(logits, "logits")
    if labels.dtype not in LABEL_DTYPES:
        raise ValueError(f"labels: dtype {labels.dtype} is not supported (expected torch.int64 or torch.int32)")
    if logits.dim() == 0 or logits.shape[-1] == 0:
        raise ValueError(f"logits: expected shape [..., V] with V > 0, got {tuple(logits.shape)}")
    if labels.shape != logits.shape[:-1]:
        raise ValueError(f"labels: shape {tuple(labels.shape)} must equal logits.shape[:-1] = "
                         f"{tuple(logits.shape[:-1])}")
    _dispatch.check_same_device(("logits", logits), ("labels", labels))


def _inverse_temperature(temperature: float) -> float:
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise TypeError(f"temperature: expected a number, got {type(temperature).__name__}")
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature}")
    return 1.0 / float(temperature)


def token_logprobs(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
):
    """log p(label) under softmax(logits / temperature), fp32, `[...]` from logits `[..., V]`.

    logits: fp32, bf16 or fp16; labels: int64 or int32 with shape logits.shape[:-1]. Returns the
    log-probs, or `(logprobs, entropy)` when `return_entropy`; both are differentiable w.r.t. the
    logits. Equal to `reference.token_logprobs` (see the module docstring for the kernel's
    contract on memory, strides and out-of-range labels).
    """
    _check_logits_and_labels(logits, labels)
    inv_temperature = _inverse_temperature(temperature)
    if not _dispatch.has_kernel(logits.device):
        return reference.token_logprobs(logits, labels, temperature=temperature, ignore_index=ignore_index,
                                        return_entropy=return_entropy)
    if not _needs_grad(logits):  # no graph to record: skip the autograd.Function overhead
        outputs = _forward_pass(logits, labels, inv_temperature=inv_temperature, ignore_index=int(ignore_index),
                                with_entropy=bool(return_entropy))[-1]
        return _token_outputs(outputs, labels.shape, bool(return_entropy))
    return _TokenLogprobsFunction.apply(logits, labels, inv_temperature, int(ignore_index), bool(return_entropy))


def logprob_kl(
    logits: torch.Tensor,
    labels: torch.Tensor,
    ref_logprobs: torch.Tensor,
    *,
    kl: str = "k3",
    temperature: float = 1.0,
    ignore_index: int = -100,
):
    """(logprobs, kl), fp32 `[...]`: token log-probs and a per-token KL(policy || reference).

    Both come from one kernel pass over the logits; kl is Schulman's k1, k2 or k3 of
    log_ratio = logprobs - ref_logprobs (`reference.kl_from_log_ratio`), 0 at ignored positions.
    Both outputs are differentiable w.r.t. the logits; ref_logprobs `[...]` (any float dtype)
    gets no gradient. Equal to `reference.logprob_kl`.
    """
    _check_logits_and_labels(logits, labels)
    if kl not in KL_ESTIMATORS:
        raise ValueError(f"kl must be one of {KL_ESTIMATORS}, got {kl!r}")
    ref_logprobs = _dispatch.check_tensor(ref_logprobs, "ref_logprobs")
    if not ref_logprobs.is_floating_point():
        raise ValueError(f"ref_logprobs: expected a floating-point tensor, got {ref_logprobs.dtype}")
    if ref_logprobs.shape != labels.shape:
        raise ValueError(f"ref_logprobs: shape {tuple(ref_logprobs.shape)} must equal labels.shape = "
                         f"{tuple(labels.shape)}")
    _dispatch.check_same_device(("logits", logits), ("ref_logprobs", ref_logprobs))
    inv_temperature = _inverse_temperature(temperature)
    if not _dispatch.has_kernel(logits.device):
        return reference.logprob_kl(logits, labels, ref_logprobs, kl=kl, temperature=temperature,
                                    ignore_index=ignore_index)
    flat_ref = _flat_fp32(ref_logprobs.detach())
    if not _needs_grad(logits):
        outputs = _forward_pass(logits, labels, inv_temperature=inv_temperature, ignore_index=int(ignore_index),
                                flat_ref=flat_ref, kl=kl)[-1]
        return outputs.logprobs.view(labels.shape), outputs.kl.view(labels.shape)
    return _LogprobKlFunction.apply(logits, labels, flat_ref, kl, inv_temperature, int(ignore_index))
