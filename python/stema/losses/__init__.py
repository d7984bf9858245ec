"""Losses: small pure functions registered by name, each returning `(loss, metrics)`.

Convention (explicit global denominators): a loss is a SUM over the examples it is given divided
by a denominator passed in by the caller, the count of valid tokens or sequences in the whole
global batch across micro-batches and data-parallel ranks. Summing the losses of the micro-batches
(and all-reducing the sum over ranks) then gives exactly the full-batch loss, whatever the
micro-batching. Every metric follows the same rule: it is a contribution, already divided by the
global denominator, so metrics are summed too.

Preference losses of the DPO family have their own registry and entry point,
`preference_loss(name, ...)` (see `stema.losses.preference`).
"""

from stema.registry import Registry

LOSSES: Registry = Registry("loss")
register_loss = LOSSES.register


def get_loss(name: str):
    """The loss function registered under `name`."""
    return LOSSES.get(name)


from . import advantages, ppo, preference, reward, sft  # noqa: E402  (registers the losses)
from .preference import (  # noqa: E402
    PREFERENCE_LOSSES,
    preference_loss,
    preference_loss_options,
    register_preference_loss,
    uses_reference,
)

__all__ = [
    "LOSSES",
    "PREFERENCE_LOSSES",
    "advantages",
    "get_loss",
    "ppo",
    "preference",
    "preference_loss",
    "preference_loss_options",
    "register_loss",
    "register_preference_loss",
    "reward",
    "sft",
    "uses_reference",
]
