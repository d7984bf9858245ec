"""Rollout scheduler: makespan of workers of unequal speed, STEMA's scheduler vs a static split.

Setup: 4 rollout workers, one 3x slower (slowdown [1, 1, 1, 3]); 256 prompts whose expected costs
are drawn from a skewed (log-normal) distribution with a fixed seed; batches of at most 4. A
worker handles a batch in sum(cost) * slowdown * unit seconds.

- threads: each worker is a Python thread that calls next(), sleeps for its batch and reports
  the time; STEMA's Scheduler against a static split (items dealt round-robin into equal shares,
  each worker processing its own share). Sleeping needs no CPU, so a busy machine hardly matters.
- simulation: the same policy in simulated time, without sleeping: a discrete-event loop that
  calls the real C++ Scheduler's next() and report() in simulated-time order. No thread-timing
  noise; the makespan is in cost units.

The ideal makespan is total_cost * unit / sum(1 / slowdown), the time if the work were perfectly
divisible. Rows: ideal / stema (goal 0.909: within 10% of ideal) and static / stema (goal: > 1).
A last row times the scheduler calls themselves: draining 20k items through the C++ scheduler
against the pure-Python reference.

Run the pytest-benchmark timings with `pytest benchmarks/bench_scheduler.py`; `measure()` gives
the side-by-side rows.
"""

from __future__ import annotations

import heapq
import random
import statistics
import threading
import time

from stema_kernels import Scheduler, reference

SLOWDOWN = (1.0, 1.0, 1.0, 3.0)
MAX_BATCH = 4
IDEAL_TO_STEMA_GOAL = 1 / 1.10
STATIC_TO_STEMA_GOAL = 1.0


def skewed_costs(num_items: int, *, seed: int = 0) -> list[float]:
    """Log-normal costs (median 1, a long tail of expensive prompts), reproducible by seed."""
    rng = random.Random(seed)
    return [rng.lognormvariate(0.0, 0.8) for _ in range(num_items)]


def ideal_makespan(costs: list[float], slowdown: tuple[float, ...], unit: float) -> float:
    """Makespan if the work were perfectly divisible: all workers busy until the same instant."""
    return sum(costs) * unit / sum(1.0 / s for s in slowdown)


def round_robin_shares(num_items: int, num_workers: int) -> list[list[int]]:
    """The static baseline's split: item i to worker i % num_workers."""
    return [list(range(worker, num_items, num_workers)) for worker in range(num_workers)]


def run_workers(work, num_workers: int) -> float:
    """Seconds from the moment all `work(worker)` threads are released until the last one ends."""
    start = threading.Barrier(num_workers + 1)

    def run(worker: int) -> None:
        start.wait()
        work(worker)

    threads = [threading.Thread(target=run, args=(worker,)) for worker in range(num_workers)]
    for thread in threads:
        thread.start()
    start.wait()
    began = time.perf_counter()
    for thread in threads:
        thread.join()
    return time.perf_counter() - began


def threaded_stema_makespan(costs: list[float], slowdown: tuple[float, ...], unit: float) -> float:
    scheduler = Scheduler(costs, num_workers=len(slowdown), max_batch=MAX_BATCH)

    def work(worker: int) -> None:
        while (batch := scheduler.next(worker)) is not None:
            began = time.perf_counter()
            time.sleep(sum(costs[item] for item in batch) * slowdown[worker] * unit)
            scheduler.report(worker, time.perf_counter() - began)

    return run_workers(work, len(slowdown))


def threaded_static_makespan(costs: list[float], slowdown: tuple[float, ...], unit: float) -> float:
    shares = round_robin_shares(len(costs), len(slowdown))

    def work(worker: int) -> None:
        share = shares[worker]
        for first in range(0, len(share), MAX_BATCH):
            batch = share[first : first + MAX_BATCH]
            time.sleep(sum(costs[item] for item in batch) * slowdown[worker] * unit)

    return run_workers(work, len(slowdown))


def simulated_stema_makespan(costs: list[float], slowdown: tuple[float, ...]) -> float:
    """Discrete-event run of the real C++ Scheduler, in cost units (unit = 1).

    Events are (time a worker becomes free, worker, seconds of the batch it just finished); at
    each, in time order (ties: lower worker first), the worker reports that batch and asks for
    the next one. The makespan is when the last batch ends.
    """
    scheduler = Scheduler(costs, num_workers=len(slowdown), max_batch=MAX_BATCH)
    free_at = [(0.0, worker, None) for worker in range(len(slowdown))]
    makespan = 0.0
    while free_at:
        now, worker, finished_seconds = heapq.heappop(free_at)
        if finished_seconds is not None:
            scheduler.report(worker, finished_seconds)
        batch = scheduler.next(worker)
        if batch is None:
            makespan = max(makespan, now)
            continue
        seconds = sum(costs[item] for item in batch) * slowdown[worker]
        heapq.heappush(free_at, (now + seconds, worker, seconds))
    return makespan


def simulated_static_makespan(costs: list[float], slowdown: tuple[float, ...]) -> float:
    shares = round_robin_shares(len(costs), len(slowdown))
    return max(sum(costs[item] for item in share) * s for share, s in zip(shares, slowdown))


def drain_with_reports(scheduler) -> None:
    """Round-robin over the workers: next() then report(), until every worker gets None."""
    active = list(range(scheduler.num_workers))
    while active:
        for worker in list(active):
            if scheduler.next(worker) is None:
                active.remove(worker)
            else:
                scheduler.report(worker, 1e-3)


def time_drain(make, costs: list[float], *, num_workers: int, repeats: int) -> float:
    """Median seconds to build a scheduler over `costs` and drain it (after one warm-up)."""
    timings = []
    for _ in range(repeats + 1):
        began = time.perf_counter()
        drain_with_reports(make(costs, num_workers=num_workers, max_batch=MAX_BATCH))
        timings.append(time.perf_counter() - began)
    return statistics.median(timings[1:])


def makespan_rows(
    case: str, unit: str, *, stema: float, ideal: float, static: float, device: str
) -> list[dict]:
    """The two makespan rows of one setup: against the ideal, and against the static split."""
    ideal_ratio = ideal / stema
    static_ratio = static / stema
    return [
        {
            "benchmark": "scheduler",
            "case": case,
            "metric": f"makespan ({unit}), ratio ideal / stema",
            "stema": stema,
            "baseline": ideal,
            "ratio": ideal_ratio,
            "higher_is_better": True,
            "goal": IDEAL_TO_STEMA_GOAL,
            "met": ideal_ratio >= IDEAL_TO_STEMA_GOAL,
            "baseline_name": "ideal (perfectly divisible work)",
            "device": device,
        },
        {
            "benchmark": "scheduler",
            "case": case,
            "metric": f"makespan ({unit}), ratio static / stema",
            "stema": stema,
            "baseline": static,
            "ratio": static_ratio,
            "higher_is_better": True,
            "goal": STATIC_TO_STEMA_GOAL,
            "met": static_ratio > STATIC_TO_STEMA_GOAL,
            "baseline_name": "static round-robin split",
            "device": device,
        },
    ]


def measure(*, device: str = "cpu", quick: bool = False) -> list[dict]:
    """Side-by-side rows (see the module docstring).

    The scheduler runs on the host whatever device the rollouts use, so it is measured once,
    under device="cpu"; other devices give no rows.
    """
    if device != "cpu":
        return []
    num_items = 256
    ideal_seconds = 0.05 if quick else 0.5
    repeats = 1 if quick else 3
    costs = skewed_costs(num_items)
    unit = ideal_seconds * sum(1.0 / s for s in SLOWDOWN) / sum(costs)
    workers = (
        f"{len(SLOWDOWN)} workers (one 3x slower), {num_items} log-normal costs, "
        f"max_batch {MAX_BATCH}"
    )
    stema = statistics.median(
        threaded_stema_makespan(costs, SLOWDOWN, unit) for _ in range(repeats)
    )
    # One static run: its makespan is ~2x STEMA's, far from the goal of 1x, and a median of
    # several would only make the whole measurement longer.
    static = threaded_static_makespan(costs, SLOWDOWN, unit)
    rows = makespan_rows(
        f"{workers}, threads",
        "s",
        stema=stema,
        ideal=ideal_makespan(costs, SLOWDOWN, unit),
        static=static,
        device=device,
    )
    rows += makespan_rows(
        f"{workers}, simulated",
        "cost units",
        stema=simulated_stema_makespan(costs, SLOWDOWN),
        ideal=ideal_makespan(costs, SLOWDOWN, 1.0),
        static=simulated_static_makespan(costs, SLOWDOWN),
        device=device,
    )

    drain_items = 2_000 if quick else 20_000
    drain_costs = skewed_costs(drain_items, seed=1)
    stema_drain = time_drain(Scheduler, drain_costs, num_workers=8, repeats=repeats)
    python_drain = time_drain(reference.Scheduler, drain_costs, num_workers=8, repeats=repeats)
    rows.append(
        {
            "benchmark": "scheduler",
            "case": f"{drain_items} items, 8 workers, max_batch {MAX_BATCH}, one thread",
            "metric": "time (s) to build and drain with next + report",
            "stema": stema_drain,
            "baseline": python_drain,
            "ratio": python_drain / stema_drain,
            "higher_is_better": True,
            "goal": None,
            "met": None,
            "baseline_name": "pure-Python reference.Scheduler",
            "device": device,
        }
    )
    return rows


# ---- pytest-benchmark ------------------------------------------------------------------------

DRAIN_COSTS = skewed_costs(20_000, seed=1)


def build_and_drain(make) -> None:
    drain_with_reports(make(DRAIN_COSTS, num_workers=8, max_batch=MAX_BATCH))


def test_drain_stema(benchmark):
    benchmark(build_and_drain, Scheduler)


def test_drain_python_reference(benchmark):
    benchmark(build_and_drain, reference.Scheduler)


def test_simulated_makespan_stema(benchmark):
    makespan = benchmark(simulated_stema_makespan, skewed_costs(256), SLOWDOWN)
    assert makespan < simulated_static_makespan(skewed_costs(256), SLOWDOWN)


if __name__ == "__main__":
    for row in measure(quick=False):
        print(row)
