"""Fused token log-probs (`stema_kernels.token_logprobs`) against plain PyTorch.

Baseline: `torch.log_softmax(logits.float(), -1).gather(-1, labels[:, None]).squeeze(-1)`, the
TRL / OpenRLHF way, which materializes `[N, V]` fp32 log-probs (and, for bf16 logits, an fp32
copy of the logits first).

`measure()` reports, per dtype (fp32, bf16) at N = 8192, V = 32000 (quick: N = 64, V = 1000):
- forward time and forward + backward time (best of k on the CPU, median of CUDA-event timings
  on a GPU); ratio = baseline_time / stema_time, goal 1.5 on the CPU, 2.0 on CUDA;
- peak extra memory of the forward (bytes allocated beyond the inputs, outputs included);
  ratio = baseline / stema, goal 4.
  CPU: each variant runs in a fresh interpreter (this file run as a script), which warms the
  variant up on a tiny input (so libraries and thread pools are loaded), resets the resident-set
  high-water mark (writing "5" to /proc/self/clear_refs), runs the forward once and reports
  VmHWM after minus VmRSS before. The children run with a fixed glibc mmap threshold (64 KiB) so
  that tensors from 64 KiB up get fresh pages; RSS cannot see smaller allocations served from heap
  pages that are already resident, so each figure is at least the bytes of the `[N]` fp32 tensors
  the call is known to allocate (stema: log-probs and logsumexp; baseline: log-probs). With quick=True the
  interpreters run concurrently (memory figures do not depend on timing), one after the other
  otherwise (the full-size ones hold gigabytes each).
  CUDA: torch.cuda.max_memory_allocated() after reset_peak_memory_stats(), minus the memory
  allocated before the call.
- on CUDA, the forward's achieved bandwidth (bytes of logits read / time) as a fraction of the
  bandwidth of a device-to-device copy measured in the same run ((read + write bytes) / time);
  goal 0.7.

Run `python benchmarks/bench_logprobs.py [--device cuda] [--quick]` to print the rows, or
`pytest benchmarks/bench_logprobs.py` for the pytest-benchmark timings.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time

import pytest
import torch

from stema_kernels import token_logprobs

BENCHMARK = "logprobs"
FULL_SHAPE = (8192, 32000)
QUICK_SHAPE = (64, 1000)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
SPEED_GOALS = {"cpu": 1.5, "cuda": 2.0}
MEMORY_GOAL = 4.0
BANDWIDTH_GOAL = 0.7
BASELINE_NAME = "torch.log_softmax(logits.float(), -1).gather(-1, labels[:, None])"
COPY_NAME = "device-to-device copy (read + write bytes / time)"


def baseline_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(logits.float(), -1).gather(-1, labels[:, None]).squeeze(-1)


def stema_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return token_logprobs(logits, labels)


VARIANTS = {"stema": stema_logprobs, "baseline": baseline_logprobs}


def make_inputs(rows: int, vocab: int, dtype: torch.dtype, device: str, *, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    logits = (torch.randn(rows, vocab, generator=generator) * 2.0).to(dtype)
    labels = torch.randint(0, vocab, (rows,), generator=generator)
    return logits.to(device), labels.to(device)


# ---- timing ----


def _time_cpu(fn, *, repeats: int) -> float:
    """Best of `repeats` wall times in seconds, after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def _time_cuda(fn, *, repeats: int) -> float:
    """Median of `repeats` CUDA-event timings in seconds, after warm-up calls."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def _forward_backward(variant, logits, labels, upstream):
    def run():
        leaf = logits.detach().requires_grad_(True)
        variant(leaf, labels).backward(upstream)
        return leaf.grad

    return run


# ---- peak extra memory ----


def _proc_status_bytes(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def _known_allocation_bytes(variant: str, rows: int) -> int:
    """Bytes of the [N] fp32 tensors a forward call certainly allocates (see the module docstring)."""
    tensors = 2 if variant == "stema" else 1
    return tensors * rows * 4


def peak_extra_bytes_in_this_process(variant: str, dtype_name: str, rows: int, vocab: int) -> int:
    """Peak RSS growth of one forward call of `variant` (CPU), in bytes."""
    fn = VARIANTS[variant]
    fn(*make_inputs(4, 64, DTYPES[dtype_name], "cpu", seed=1))  # loads kernels, starts thread pools
    logits, labels = make_inputs(rows, vocab, DTYPES[dtype_name], "cpu")
    gc.collect()
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")  # reset VmHWM to the current VmRSS
    before = _proc_status_bytes("VmRSS")
    output = fn(logits, labels)
    peak = _proc_status_bytes("VmHWM")
    del output, logits, labels
    return max(peak - before, _known_allocation_bytes(variant, rows))


def _cpu_peak_extra_bytes(jobs: list[tuple[str, str]], rows: int, vocab: int, *, concurrent: bool) -> dict:
    """{(variant, dtype): bytes}, each measured by a fresh interpreter running this file."""
    # A fixed glibc mmap threshold gives every tensor of 64 KiB or more fresh pages, which RSS sees;
    # glibc otherwise raises the threshold as large blocks are freed and serves such tensors from
    # heap pages that are already resident.
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(path for path in sys.path if path),
               MALLOC_MMAP_THRESHOLD_=str(64 * 1024))

    def start(variant: str, dtype: str) -> subprocess.Popen:
        command = [sys.executable, os.path.abspath(__file__), "--peak-extra-bytes", variant, dtype, str(rows),
                   str(vocab)]
        return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def finish(child: subprocess.Popen) -> int:
        stdout, stderr = child.communicate()
        if child.returncode != 0:
            raise RuntimeError(f"peak-memory child {child.args} failed:\n{stderr}")
        return int(stdout.strip().splitlines()[-1])

    if concurrent:
        children = {job: start(*job) for job in jobs}
        return {job: finish(child) for job, child in children.items()}
    return {job: finish(start(*job)) for job in jobs}


def _cuda_peak_extra_bytes(fn, logits, labels) -> int:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    output = fn(logits, labels)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    del output
    return peak


def _copy_bandwidth(nbytes: int) -> float:
    """Bytes per second of a device-to-device copy of `nbytes` (read + write)."""
    source = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    destination = torch.empty_like(source)
    seconds = _time_cuda(lambda: destination.copy_(source), repeats=20)
    return 2 * nbytes / seconds


# ---- rows ----


def _row(case, metric, stema, baseline, *, ratio, higher_is_better, goal, baseline_name, device):
    return {
        "benchmark": BENCHMARK,
        "case": case,
        "metric": metric,
        "stema": float(stema),
        "baseline": float(baseline),
        "ratio": float(ratio),
        "higher_is_better": higher_is_better,
        "goal": goal,
        "met": None if goal is None else bool(ratio >= goal),
        "baseline_name": baseline_name,
        "device": device,
    }


def measure(*, device: str = "cpu", quick: bool = False) -> list[dict]:
    """STEMA vs the plain-PyTorch baseline: forward / forward+backward time, peak extra memory,
    and on CUDA the forward's bandwidth fraction (see the module docstring)."""
    rows, vocab = QUICK_SHAPE if quick else FULL_SHAPE
    on_cuda = device.startswith("cuda")
    timer = _time_cuda if on_cuda else _time_cpu
    repeats = (20 if on_cuda else 10) if quick else (20 if on_cuda else 3)
    speed_goal = SPEED_GOALS["cuda" if on_cuda else "cpu"]
    results = []
    cpu_memory = {}
    if not on_cuda:
        jobs = [(variant, dtype) for dtype in DTYPES for variant in VARIANTS]
        cpu_memory = _cpu_peak_extra_bytes(jobs, rows, vocab, concurrent=quick)

    for dtype_name, dtype in DTYPES.items():
        case = f"N={rows} V={vocab} {dtype_name}"
        logits, labels = make_inputs(rows, vocab, dtype, device)
        upstream = torch.randn(rows, device=device)

        seconds = {name: timer(lambda fn=fn: fn(logits, labels), repeats=repeats) for name, fn in VARIANTS.items()}
        results.append(_row(case, "forward time (ms)", seconds["stema"] * 1e3, seconds["baseline"] * 1e3,
                            ratio=seconds["baseline"] / seconds["stema"], higher_is_better=False,
                            goal=speed_goal, baseline_name=BASELINE_NAME, device=device))
        both = {name: timer(_forward_backward(fn, logits, labels, upstream), repeats=repeats)
                for name, fn in VARIANTS.items()}
        results.append(_row(case, "forward+backward time (ms)", both["stema"] * 1e3, both["baseline"] * 1e3,
                            ratio=both["baseline"] / both["stema"], higher_is_better=False,
                            goal=speed_goal, baseline_name=BASELINE_NAME, device=device))

        if on_cuda:
            memory = {name: _cuda_peak_extra_bytes(fn, logits, labels) for name, fn in VARIANTS.items()}
        else:
            memory = {name: cpu_memory[(name, dtype_name)] for name in VARIANTS}
        results.append(_row(case, "forward peak extra memory (bytes)", memory["stema"], memory["baseline"],
                            ratio=memory["baseline"] / memory["stema"], higher_is_better=False,
                            goal=MEMORY_GOAL, baseline_name=BASELINE_NAME, device=device))

        if on_cuda:
            achieved = logits.numel() * logits.element_size() / seconds["stema"]
            peak = _copy_bandwidth(logits.numel() * logits.element_size())
            results.append(_row(case, "forward bandwidth (GB/s)", achieved / 1e9, peak / 1e9,
                                ratio=achieved / peak, higher_is_better=True, goal=BANDWIDTH_GOAL,
                                baseline_name=COPY_NAME, device=device))
        del logits, labels
    return results


# ---- pytest-benchmark ----

BENCH_SHAPE = (512, 32000)


@pytest.fixture(scope="module", params=list(DTYPES), ids=list(DTYPES))
def bench_inputs(request):
    return make_inputs(*BENCH_SHAPE, DTYPES[request.param], "cpu")


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_forward(benchmark, bench_inputs, variant):
    logits, labels = bench_inputs
    benchmark(VARIANTS[variant], logits, labels)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_forward_backward(benchmark, bench_inputs, variant):
    logits, labels = bench_inputs
    upstream = torch.randn(logits.shape[0])
    benchmark(_forward_backward(VARIANTS[variant], logits, labels, upstream))


def _main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--peak-extra-bytes", nargs=4, metavar=("VARIANT", "DTYPE", "ROWS", "VOCAB"),
                        help="(internal) print the peak extra bytes of one forward call")
    args = parser.parse_args()
    if args.peak_extra_bytes:
        variant, dtype_name, rows, vocab = args.peak_extra_bytes
        print(peak_extra_bytes_in_this_process(variant, dtype_name, int(rows), int(vocab)))
        return
    for row in measure(device=args.device, quick=args.quick):
        print(json.dumps(row))


if __name__ == "__main__":
    _main()
