"""Timing and labelling shared by the benchmarks (not a benchmark itself: no `measure`)."""

from __future__ import annotations

import time

import torch

import stema_kernels


def best_seconds(fn, *, device: str, repeats: int, warmup: int = 2) -> float:
    """Best wall time of fn() over `repeats` runs after `warmup` runs (CUDA: synchronized).

    Best-of-k rather than the median: on a shared CPU an OpenMP team can wait a whole scheduler
    tick (4 ms) for a core, which says nothing about either implementation.
    """

    def synchronize() -> None:
        if device.startswith("cuda"):
            torch.cuda.synchronize(device)

    for _ in range(warmup):
        fn()
    synchronize()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        synchronize()
        times.append(time.perf_counter() - start)
    return min(times)


def device_label(device: str) -> str:
    """The device as recorded in result rows: the GPU's name, or the CPU's thread counts."""
    if device.startswith("cuda"):
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return f"cpu ({torch.get_num_threads()} torch threads, {stema_kernels.build_info()['openmp_max_threads']} OpenMP)"


def trl_step_timer():
    """A transformers `TrainerCallback` that records the time of the train start and of every
    optimizer-step end; its `step_seconds()` are the seconds between consecutive ones."""
    from transformers import TrainerCallback

    class StepTimes(TrainerCallback):
        def __init__(self):
            self.marks: list[float] = []

        def on_train_begin(self, args, state, control, **kwargs):
            self.marks.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kwargs):
            self.marks.append(time.perf_counter())

        def step_seconds(self) -> list[float]:
            return [later - earlier for earlier, later in zip(self.marks, self.marks[1:])]

    return StepTimes()
