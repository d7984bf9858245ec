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


def exact_match_reward(prompts, completions, **kwargs) -> list[float]:
    """The built-in task's exact-match reward in TRL's reward-function form (conversational
    completions): what STEMA's `reward.function=builtin` computes."""
    from stema.data import builtin

    return [builtin.reward(prompt, completion[0]["content"]) for prompt, completion in zip(prompts, completions)]


def trl_grpo_config(output_dir, *, prompts: int, samples: int, new_tokens: int, steps: int, lr: float, beta: float, seed: int, **extra):
    """TRL's `GRPOConfig` in STEMA's GRPO settings on the CPU: `prompts` x `samples` sequences per
    optimizer step (one step per generation batch), temperature 1, constant lr without warm-up,
    gradient clipping at 1.0, k3 KL with coefficient `beta` in the loss, token-level loss over the
    batch (`bnpo`, STEMA's denominator), fp32, no checkpoints or reports; `extra` adds or replaces."""
    from trl import GRPOConfig

    settings = dict(
        output_dir=str(output_dir), per_device_train_batch_size=prompts * samples, num_generations=samples,
        max_completion_length=new_tokens, temperature=1.0, max_steps=steps, learning_rate=lr, lr_scheduler_type="constant",
        warmup_steps=0, max_grad_norm=1.0, beta=beta, loss_type="bnpo", num_iterations=1, bf16=False, use_cpu=True,
        logging_steps=1, save_strategy="no", report_to=[], disable_tqdm=True, seed=seed, dataloader_num_workers=0,
    )
    return GRPOConfig(**{**settings, **extra})
