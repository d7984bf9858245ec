"""Tensor checks and the hand-over from torch tensors to the torch-free `_C` kernels.

`_C` takes raw data pointers, sizes, strides, dtype codes and a CUDA stream handle. This module
turns tensors into those arguments and decides, per call, whether a compiled kernel serves the
tensor's device or the plain-PyTorch reference must (ARCHITECTURE.md: the reference is the
fallback when `_C` lacks a device).
"""

from __future__ import annotations

import torch

try:
    from . import _C
except ImportError as error:  # pragma: no cover - only hit on a broken install
    raise ImportError(
        "stema_kernels._C, the compiled extension, could not be imported. Install the package "
        "with `pip install .` (or `pip install -e .`) from the repository root so that CMake "
        f"builds it. Original error: {error}"
    ) from error

# Must match stema::DType in csrc/include/stema/common.h.
DTYPE_CODES: dict[torch.dtype, int] = {
    torch.float32: 0,
    torch.float16: 1,
    torch.bfloat16: 2,
    torch.float64: 3,
}
KERNEL_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def dtype_code(tensor: torch.Tensor, name: str) -> int:
    """The `_C` dtype code of `tensor`, or a ValueError naming the argument."""
    try:
        return DTYPE_CODES[tensor.dtype]
    except KeyError:
        supported = ", ".join(str(d) for d in DTYPE_CODES)
        raise ValueError(f"{name}: dtype {tensor.dtype} is not supported (expected one of {supported})") from None


def check_tensor(value: object, name: str) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(value).__name__}")
    return value


def check_float(tensor: torch.Tensor, name: str, dtypes=KERNEL_FLOAT_DTYPES) -> None:
    if tensor.dtype not in dtypes:
        allowed = ", ".join(str(d) for d in dtypes)
        raise ValueError(f"{name}: dtype {tensor.dtype} is not supported (expected one of {allowed})")


def check_same_device(*named: tuple[str, torch.Tensor]) -> torch.device:
    first_name, first = named[0]
    for name, tensor in named[1:]:
        if tensor.device != first.device:
            raise ValueError(f"{name} is on {tensor.device} but {first_name} is on {first.device}")
    return first.device


def has_kernel(device: torch.device) -> bool:
    """True when `_C` has compiled kernels for `device` (CPU always; CUDA when built with nvcc)."""
    if device.type == "cpu":
        return True
    if device.type == "cuda":
        return bool(_C.has_cuda)
    return False


def stream_handle(device: torch.device) -> int:
    """The raw cudaStream_t of torch's current stream on `device`, as an int (0 on CPU)."""
    if device.type != "cuda":
        return 0
    return torch.cuda.current_stream(device).cuda_stream


def build_info() -> dict:
    """What this build of `_C` contains: cpu, cuda, cuda_archs, cuda_version, openmp, compiler."""
    return dict(_C.build_info())
