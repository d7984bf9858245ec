"""stema_kernels: STEMA's compiled hot-path kernels behind torch wrappers.

The compiled extension `_C` is torch-free; these wrappers check tensors (dtype, device, shape),
pass raw pointers on, and fall back to `stema_kernels.reference` where `_C` has no kernel for a
device.
"""

from . import reference
from ._dispatch import build_info
from .logprobs import logprob_kl, token_logprobs

__all__ = ["build_info", "logprob_kl", "reference", "token_logprobs"]
