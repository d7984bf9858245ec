"""Benchmark: refit_ / RefitPlan.apply against torch's copy_ (one big copy, and a Python loop).

The pairs are the 200 weights of a 20-layer GPT-style decoder with hidden size d (per layer: two
norm vectors [d], qkv [3d, d] and its bias [3d], out [d, d] and bias [d], up [4d, d] and bias
[4d], down [d, 4d] and bias [d]): a few large matrices and many small vectors. fp32 src (the
trainer) -> bf16 dst (the generation engine). Sizes: CPU d = 320 (99 MB of fp32), CUDA
d = 1024 (1 GB of fp32, a 250M-parameter model), quick d = 16 (260 KB). Baselines, timed in the
same process:
  (a) ONE `copy_` of the same number of elements (one fp32 buffer into one bf16 buffer): the
      bandwidth a refit could reach at best. Goal: refit reaches 0.8 of its GB/s.
  (b) the Python loop `for d, s in zip(dst, src): d.copy_(s)` (reference.refit_). Goal: faster.
GB/s counts the bytes read plus the bytes written.

    pytest benchmarks/bench_refit.py          # pytest-benchmark timings (CPU)
    python benchmarks/bench_refit.py [--device cuda] [--quick]
"""

from __future__ import annotations

import argparse

import torch

from stema_kernels import RefitPlan, reference, refit_
from common import best_seconds, device_label

LAYERS = 20
HIDDEN = {"cpu": 320, "cuda": 1024}
QUICK_HIDDEN = 16
PYTEST_HIDDEN = 128
COPY_GOAL = 0.8
LOOP_GOAL = 1.0


def decoder_shapes(hidden: int) -> list[tuple[int, ...]]:
    """The 10 weight shapes per layer of a GPT-style decoder with biases, for LAYERS layers."""
    d = hidden
    layer = [(d,), (3 * d, d), (3 * d,), (d, d), (d,), (d,), (4 * d, d), (4 * d,), (d, 4 * d), (d,)]
    return layer * LAYERS


def make_pairs(hidden: int, device: str, seed: int = 0):
    """(bf16 dst buffers, fp32 src weights) of decoder_shapes(hidden)."""
    generator = torch.Generator().manual_seed(seed)
    shapes = decoder_shapes(hidden)
    src = [torch.randn(shape, generator=generator).to(device) for shape in shapes]
    dst = [torch.empty(shape, dtype=torch.bfloat16, device=device) for shape in shapes]
    return dst, src


def row(*, case: str, metric: str, stema: float, baseline: float, higher_is_better: bool, goal: float,
        baseline_name: str, device: str) -> dict:
    ratio = stema / baseline if higher_is_better else baseline / stema
    return {
        "benchmark": "refit",
        "case": case,
        "metric": metric,
        "stema": stema,
        "baseline": baseline,
        "ratio": ratio,
        "higher_is_better": higher_is_better,
        "goal": goal,
        "met": ratio >= goal,
        "baseline_name": baseline_name,
        "device": device_label(device),
    }


def measure(*, device: str = "cpu", quick: bool = False) -> list[dict]:
    """refit_ and RefitPlan.apply vs one big copy_ (GB/s) and vs a loop of copy_ (ms)."""
    hidden = QUICK_HIDDEN if quick else HIDDEN["cuda" if device.startswith("cuda") else "cpu"]
    repeats = 3 if quick else 10
    dst, src = make_pairs(hidden, device)
    elements = sum(tensor.numel() for tensor in src)
    one_src = torch.randn(elements, device=device)
    one_dst = torch.empty(elements, dtype=torch.bfloat16, device=device)
    plan = RefitPlan(dst, src)
    traffic_gb = (one_src.nbytes + one_dst.nbytes) / 1e9

    def timed(fn) -> float:
        return best_seconds(fn, device=device, repeats=repeats)

    refit_seconds = timed(lambda: refit_(dst, src))
    plan_seconds = timed(plan.apply)
    one_copy_seconds = timed(lambda: one_dst.copy_(one_src))
    loop_seconds = timed(lambda: reference.refit_(dst, src))

    case = f"{len(src)} tensors, {elements * 4 / 1e6:.1f} MB fp32 -> bf16 (d={hidden})"
    common = {"device": device}
    return [
        row(case=f"refit_ vs one copy_, {case}", metric="GB/s", stema=traffic_gb / refit_seconds,
            baseline=traffic_gb / one_copy_seconds, higher_is_better=True, goal=COPY_GOAL,
            baseline_name="one copy_ of all elements", **common),
        row(case=f"RefitPlan.apply vs one copy_, {case}", metric="GB/s", stema=traffic_gb / plan_seconds,
            baseline=traffic_gb / one_copy_seconds, higher_is_better=True, goal=COPY_GOAL,
            baseline_name="one copy_ of all elements", **common),
        row(case=f"refit_ vs loop of copy_, {case}", metric="time_ms", stema=1e3 * refit_seconds,
            baseline=1e3 * loop_seconds, higher_is_better=False, goal=LOOP_GOAL,
            baseline_name="Python loop of dst.copy_(src)", **common),
        row(case=f"RefitPlan.apply vs loop of copy_, {case}", metric="time_ms", stema=1e3 * plan_seconds,
            baseline=1e3 * loop_seconds, higher_is_better=False, goal=LOOP_GOAL,
            baseline_name="Python loop of dst.copy_(src)", **common),
    ]


# ---- pytest-benchmark (CPU, d = PYTEST_HIDDEN: 200 tensors, 16 MB of fp32) ----

def _pytest_pairs():
    return make_pairs(PYTEST_HIDDEN, "cpu")


def test_refit_stema(benchmark):
    dst, src = _pytest_pairs()
    benchmark(refit_, dst, src)


def test_refit_plan_apply_stema(benchmark):
    dst, src = _pytest_pairs()
    benchmark(RefitPlan(dst, src).apply)


def test_refit_loop_of_copy(benchmark):
    dst, src = _pytest_pairs()
    benchmark(reference.refit_, dst, src)


def test_refit_one_big_copy(benchmark):
    dst, src = _pytest_pairs()
    elements = sum(tensor.numel() for tensor in src)
    one_src = torch.randn(elements)
    one_dst = torch.empty(elements, dtype=torch.bfloat16)
    benchmark(one_dst.copy_, one_src)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    for result in measure(device=args.device, quick=args.quick):
        print(
            f"{result['case']} | {result['metric']}: stema {result['stema']:.3f} | "
            f"{result['baseline_name']} {result['baseline']:.3f} | x{result['ratio']:.2f} "
            f"(goal {result['goal']}, met={result['met']}) | {result['device']}"
        )


if __name__ == "__main__":
    main()
