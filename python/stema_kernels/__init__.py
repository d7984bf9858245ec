"""stema_kernels: STEMA's compiled hot-path kernels behind torch wrappers.

The compiled extension `_C` is torch-free; these wrappers check tensors (dtype, device, shape),
pass raw pointers on, and fall back to `stema_kernels.reference` where `_C` has no kernel for a
device.
"""

from . import reference
from ._dispatch import build_info
from .gae import discounted_returns, gae
from .logprobs import logprob_kl, token_logprobs
from .refit import PackRowsPlan, RefitPlan, pack_rows_, refit_
from .scheduler import Scheduler

__all__ = [
    "PackRowsPlan",
    "RefitPlan",
    "Scheduler",
    "build_info",
    "discounted_returns",
    "gae",
    "logprob_kl",
    "pack_rows_",
    "reference",
    "refit_",
    "token_logprobs",
]
