"""Benchmark: stema_kernels.gae / discounted_returns against the Python loops over T they replace.

Baselines, timed in the same process on the same inputs:
  (a) reference.gae and reference.discounted_returns: the mask-aware loops (the specification);
  (b) `trl_style_gae`: the unmasked loop that TRL's PPOTrainer and OpenRLHF run (below).
Sizes: B = 256 rows of T = 1024 tokens, right padded (quick: B = 8, T = 32). Goal: 50x.

    pytest benchmarks/bench_gae.py          # pytest-benchmark timings (CPU)
    python benchmarks/bench_gae.py [--device cuda] [--quick]
"""

from __future__ import annotations

import argparse

import torch

import stema_kernels
from stema_kernels import reference
from common import best_seconds, device_label

GAMMA = 0.99
LAM = 0.95
GOAL = 50.0
FULL_SIZE = (256, 1024)
QUICK_SIZE = (8, 32)


def trl_style_gae(rewards: torch.Tensor, values: torch.Tensor, *, gamma: float, lam: float):
    """(advantages, returns): the unmasked GAE loop of TRL and OpenRLHF.

    In the spirit of TRL's PPOTrainer ("6. compute advantages and returns" in
    trl/trainer/ppo_trainer.py) and OpenRLHF's `get_advantages_and_returns`
    (openrlhf/trainer/ppo_utils/experience_maker.py): padding is handled outside the loop by
    zeroing rewards and values, so the loop itself ignores the mask.
    """
    length = rewards.shape[1]
    lastgaelam = 0
    advantages_reversed = []
    for t in reversed(range(length)):
        nextvalues = values[:, t + 1] if t < length - 1 else 0.0
        delta = rewards[:, t] + gamma * nextvalues - values[:, t]
        lastgaelam = delta + gamma * lam * lastgaelam
        advantages_reversed.append(lastgaelam)
    advantages = torch.stack(advantages_reversed[::-1], dim=1)
    returns = advantages + values
    return advantages, returns


def make_inputs(batch: int, length: int, device: str = "cpu", seed: int = 0):
    """fp32 rewards and values `[B, T]` and a right-padding bool mask with random lengths."""
    generator = torch.Generator().manual_seed(seed)
    rewards = torch.randn(batch, length, generator=generator)
    values = torch.randn(batch, length, generator=generator)
    lengths = torch.randint(length // 4, length + 1, (batch, 1), generator=generator)
    mask = torch.arange(length)[None, :] < lengths
    return rewards.to(device), values.to(device), mask.to(device)


def time_row(*, benchmark: str, case: str, stema_fn, baseline_fn, baseline_name: str, device: str, repeats: int):
    """One result row: best-of-k milliseconds of STEMA and the baseline, and their ratio."""
    stema_ms = 1e3 * best_seconds(stema_fn, device=device, repeats=repeats)
    baseline_ms = 1e3 * best_seconds(baseline_fn, device=device, repeats=repeats)
    ratio = baseline_ms / stema_ms
    return {
        "benchmark": benchmark,
        "case": case,
        "metric": "time_ms",
        "stema": stema_ms,
        "baseline": baseline_ms,
        "ratio": ratio,
        "higher_is_better": False,
        "goal": GOAL,
        "met": ratio >= GOAL,
        "baseline_name": baseline_name,
        "device": device_label(device),
    }


def measure(*, device: str = "cpu", quick: bool = False) -> list[dict]:
    """STEMA vs the Python loops over T: GAE (vs both baselines) and discounted returns."""
    batch, length = QUICK_SIZE if quick else FULL_SIZE
    repeats = 3 if quick else 9
    rewards, values, mask = make_inputs(batch, length, device)
    # TRL and OpenRLHF zero the padding before their loop; that is not timed here.
    masked_rewards, masked_values = rewards * mask, values * mask
    case = f"B={batch} T={length} fp32, right padded"
    return [
        time_row(
            benchmark="gae",
            case=case,
            stema_fn=lambda: stema_kernels.gae(rewards, values, mask, gamma=GAMMA, lam=LAM),
            baseline_fn=lambda: trl_style_gae(masked_rewards, masked_values, gamma=GAMMA, lam=LAM),
            baseline_name="TRL/OpenRLHF unmasked loop over T",
            device=device,
            repeats=repeats,
        ),
        time_row(
            benchmark="gae",
            case=case,
            stema_fn=lambda: stema_kernels.gae(rewards, values, mask, gamma=GAMMA, lam=LAM),
            baseline_fn=lambda: reference.gae(rewards, values, mask, gamma=GAMMA, lam=LAM),
            baseline_name="reference.gae (mask-aware loop over T)",
            device=device,
            repeats=repeats,
        ),
        time_row(
            benchmark="discounted_returns",
            case=case,
            stema_fn=lambda: stema_kernels.discounted_returns(rewards, mask, gamma=GAMMA),
            baseline_fn=lambda: reference.discounted_returns(rewards, mask, gamma=GAMMA),
            baseline_name="reference.discounted_returns (mask-aware loop over T)",
            device=device,
            repeats=repeats,
        ),
    ]


# ---- pytest-benchmark (CPU, full size) ----


def _full_inputs():
    return make_inputs(*FULL_SIZE)


def test_gae_stema(benchmark):
    rewards, values, mask = _full_inputs()
    benchmark(stema_kernels.gae, rewards, values, mask, gamma=GAMMA, lam=LAM)


def test_gae_reference_loop(benchmark):
    rewards, values, mask = _full_inputs()
    benchmark(reference.gae, rewards, values, mask, gamma=GAMMA, lam=LAM)


def test_gae_trl_style_loop(benchmark):
    rewards, values, mask = _full_inputs()
    benchmark(trl_style_gae, rewards * mask, values * mask, gamma=GAMMA, lam=LAM)


def test_discounted_returns_stema(benchmark):
    rewards, _, mask = _full_inputs()
    benchmark(stema_kernels.discounted_returns, rewards, mask, gamma=GAMMA)


def test_discounted_returns_reference_loop(benchmark):
    rewards, _, mask = _full_inputs()
    benchmark(reference.discounted_returns, rewards, mask, gamma=GAMMA)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    for row in measure(device=args.device, quick=args.quick):
        print(
            f"{row['benchmark']:>18} | {row['case']} | stema {row['stema']:.4f} ms | "
            f"{row['baseline_name']} {row['baseline']:.3f} ms | x{row['ratio']:.1f} "
            f"(goal {row['goal']:.0f}, met={row['met']}) | {row['device']}"
        )


if __name__ == "__main__":
    main()
