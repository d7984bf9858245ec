"""Load-balanced rollout scheduler: hands prompts out to data-parallel rollout workers.

A static equal split of the prompts waits for the slowest worker; here workers pull batches as
they finish and, when their own share runs out, take work from whichever worker is furthest
behind (NeMo-Aligner hands out rollout work dynamically for the same reason). The state and the
policy live in C++ (`_C.SchedulerCpu`, csrc/include/stema/scheduler.h) behind one mutex, and the
calls release the GIL, so many Python worker threads can share one scheduler. There is no CUDA
version: the scheduler runs on the host. Specification: `stema_kernels.reference.Scheduler`.
"""

from __future__ import annotations

import operator

import torch

from ._dispatch import _C


class Scheduler:
    """Thread-safe scheduler of items (prompts) with expected costs over rollout workers.

    Policy (ties always go to the lower index, so results are deterministic for a given
    sequence of calls):

    1. At construction the items, sorted by cost highest first, are dealt by greedy
       longest-processing-time: each item goes to the share with the least total cost so far,
       so every worker starts with a share of about equal total cost.
    2. `next(worker)` returns up to `max_batch` item indices from the worker's own share,
       highest cost first.
    3. When that share is empty the worker steals: it takes up to `max_batch` of the
       highest-cost items left in the share of the most loaded other worker, where
       load = remaining cost of the share / that worker's speed (its expected time to finish).
    4. When every share is empty, `next` returns None. Each item is handed out exactly once.

    Speed (cost units per second) is a cumulative ratio: the cost handed to a worker up to its
    last `report`, divided by the seconds it has reported. A worker with no measurement yet is
    assumed to run at the mean measured speed of the others (1 when nobody has reported), so
    before any report stealing goes by remaining cost alone.

    Args:
        costs: expected cost of each item (e.g. prompt length + max new tokens), finite and
            >= 0: a sequence of numbers or a 1-D tensor/array. Items are 0 .. len(costs) - 1.
        num_workers: number of rollout workers, >= 1.
        max_batch: largest number of items one `next` call returns, >= 1.
    """

    def __init__(self, costs, *, num_workers: int, max_batch: int):
        cost_values = _costs_as_float64(costs)
        self._core = _C.SchedulerCpu(
            cost_values.data_ptr(),
            cost_values.numel(),
            num_workers=operator.index(num_workers),
            max_batch=operator.index(max_batch),
        )

    def next(self, worker: int) -> list[int] | None:
        """Up to `max_batch` item indices for `worker`, or None when all items are handed out."""
        return self._core.next(operator.index(worker))

    def report(self, worker: int, seconds: float) -> None:
        """Record that `worker` spent `seconds` on the items handed to it since its last report."""
        self._core.report(operator.index(worker), float(seconds))

    def stats(self) -> dict:
        """A consistent snapshot of the scheduler.

        Per-worker lists (index = worker): `items_handed`, `cost_handed`, `seconds_reported`,
        `speed` (the estimate in use), `items_stolen` (items it took from other shares).
        Totals: `items`, `handed`, `remaining`, `steals` (steal batches), `total_cost`,
        `remaining_cost`, and `balance` = max / mean over workers of cost_handed / speed
        (expected busy time; 1.0 is perfect), None while no cost has been handed out.
        """
        return self._core.stats()

    @property
    def remaining(self) -> int:
        """Number of items not handed out yet."""
        return self._core.remaining

    @property
    def num_items(self) -> int:
        return self._core.num_items

    @property
    def num_workers(self) -> int:
        return self._core.num_workers

    @property
    def max_batch(self) -> int:
        return self._core.max_batch

    def __len__(self) -> int:
        return self.remaining

    def __repr__(self) -> str:
        return (
            f"Scheduler(num_items={self.num_items}, num_workers={self.num_workers}, "
            f"max_batch={self.max_batch}, remaining={self.remaining})"
        )


def _costs_as_float64(costs) -> torch.Tensor:
    """`costs` as a contiguous 1-D float64 CPU tensor (the C++ scheduler copies it)."""
    try:
        values = torch.as_tensor(costs, dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError) as error:
        raise TypeError(f"costs: expected a 1-D sequence or tensor of numbers ({error})") from None
    if values.dim() != 1:
        raise ValueError(f"costs must be 1-D, got shape {tuple(values.shape)}")
    return values.detach().cpu().contiguous()
