"""Load-balanced rollout scheduler: policy, parity with the Python reference, threads, errors."""

from __future__ import annotations

import random
import threading
import time

import numpy as np
import pytest
import torch

import stema_kernels
from stema_kernels import reference

IMPLEMENTATIONS = [
    pytest.param(stema_kernels.Scheduler, id="kernel"),
    pytest.param(reference.Scheduler, id="reference"),
]


def drain(scheduler, worker: int) -> list[list[int]]:
    """Every batch `worker` gets until next() returns None."""
    batches = []
    while (batch := scheduler.next(worker)) is not None:
        batches.append(batch)
    return batches


def lpt_shares(costs: list[float], num_workers: int) -> list[list[int]]:
    """Greedy LPT written plainly (no heap): highest cost first, each to the lightest share."""
    order = sorted(range(len(costs)), key=lambda item: (-costs[item], item))
    shares: list[list[int]] = [[] for _ in range(num_workers)]
    totals = [0.0] * num_workers
    for item in order:
        lightest = min(range(num_workers), key=lambda worker: (totals[worker], worker))
        shares[lightest].append(item)
        totals[lightest] += costs[item]
    return shares


# ---- policy on hand-computed cases ----------------------------------------------------------


@pytest.mark.parametrize("make", IMPLEMENTATIONS)
def test_lpt_shares_highest_first_then_steal(make):
    # LPT over [5, 4, 3, 3, 2, 1] and 2 workers: 5->w0, 4->w1, 3(#2)->w1 (4 < 5),
    # 3(#3)->w0 (5 < 7), 2->w0 (8 vs 7: w1), 1->w0 (8 < 9). Shares: w0 [0, 3, 5], w1 [1, 2, 4].
    scheduler = make([5, 4, 3, 3, 2, 1], num_workers=2, max_batch=2)
    assert len(scheduler) == 6
    assert scheduler.next(0) == [0, 3]
    assert scheduler.next(1) == [1, 2]
    assert scheduler.next(0) == [5]
    assert scheduler.remaining == 1
    assert scheduler.next(0) == [4]  # own share empty: steals w1's last item
    assert scheduler.next(1) is None
    assert scheduler.next(0) is None
    stats = scheduler.stats()
    assert stats["items_handed"] == [4, 2]
    assert stats["cost_handed"] == [11.0, 7.0]
    assert stats["items_stolen"] == [1, 0]
    assert stats["steals"] == 1
    assert (stats["items"], stats["handed"], stats["remaining"]) == (6, 6, 0)
    assert (stats["total_cost"], stats["remaining_cost"]) == (18.0, 0.0)
    assert stats["balance"] == pytest.approx(11.0 / 9.0)


def eight_then_ones(make, *, max_batch: int = 1):
    # Shares of 3 workers: w0 [0, 3, 6], w1 [1, 4, 7], w2 [2, 5, 8]; costs [8, 1, 1] each.
    return make([8, 8, 8, 1, 1, 1, 1, 1, 1], num_workers=3, max_batch=max_batch)


@pytest.mark.parametrize("make", IMPLEMENTATIONS)
def test_steals_from_largest_remaining_cost_before_any_report(make):
    scheduler = eight_then_ones(make)
    assert drain_own_share(scheduler, 0) == [[0], [3], [6]]
    assert scheduler.next(2) == [2]  # w2 has 2 left, w1 still 10
    assert scheduler.next(0) == [1]  # all speeds equal: the largest remaining cost is w1's
    assert scheduler.stats()["items_stolen"] == [1, 0, 0]


def drain_own_share(scheduler, worker: int) -> list[list[int]]:
    return [scheduler.next(worker) for _ in range(3)]


@pytest.mark.parametrize("make", IMPLEMENTATIONS)
def test_steals_from_largest_remaining_time_after_reports(make):
    scheduler = eight_then_ones(make)
    drain_own_share(scheduler, 0)
    scheduler.report(0, 0.1)  # 10 cost in 0.1 s: speed 100
    assert scheduler.next(2) == [2]
    scheduler.report(2, 8.0)  # 8 cost in 8 s: speed 1
    # w1 has not reported: assumed the mean measured speed (100 + 1) / 2 = 50.5.
    assert scheduler.stats()["speed"] == pytest.approx([100.0, 50.5, 1.0])
    # Loads: w1 10 / 50.5 = 0.2 s, w2 2 / 1 = 2 s. By cost w1 would be robbed; by time, w2.
    assert scheduler.next(0) == [5]
    stats = scheduler.stats()
    assert stats["items_stolen"] == [1, 0, 0]
    assert stats["seconds_reported"] == [0.1, 0.0, 8.0]
    # balance: busy = cost / speed = [11/100, 0/50.5, 8/1]; max / mean.
    busy = [11 / 100, 0.0, 8.0]
    assert stats["balance"] == pytest.approx(max(busy) / (sum(busy) / 3))


@pytest.mark.parametrize("make", IMPLEMENTATIONS)
def test_ties_go_to_the_lower_index(make):
    # Equal costs: LPT deals items in index order to workers in index order, round after round.
    scheduler = make([3.0] * 6, num_workers=3, max_batch=1)
    assert [scheduler.next(2), scheduler.next(2)] == [[2], [5]]
    assert scheduler.next(2) == [0]  # w0 and w1 both have 6 left: the lower index is robbed
    assert scheduler.next(2) == [1]  # now w1 (6) is ahead of w0 (3)
    assert scheduler.next(1) == [4]
    assert scheduler.next(1) == [3]


@pytest.mark.parametrize("make", IMPLEMENTATIONS)
def test_speed_is_cumulative_cost_over_seconds_since_reports(make):
    scheduler = make([4, 4, 2, 2], num_workers=1, max_batch=1)
    scheduler.next(0)
    scheduler.next(0)
    scheduler.report(0, 2.0)  # 8 cost in 2 s
    assert scheduler.stats()["speed"] == [4.0]
    scheduler.next(0)
    scheduler.report(0, 2.0)  # 10 cost in 4 s
    assert scheduler.stats()["speed"] == [2.5]
    scheduler.report(0, 1.0)  # no new cost: 10 cost in 5 s
    assert scheduler.stats()["speed"] == [2.0]


@pytest.mark.parametrize("make", IMPLEMENTATIONS)
def test_zero_cost_items_are_handed_out_and_stolen(make):
    # Every total stays 0, so LPT's tie rule deals all three to w0; w1 starts empty.
    scheduler = make([0.0, 0.0, 0.0], num_workers=2, max_batch=2)
    assert scheduler.next(1) == [0, 1]  # w0's share has load 0 but still holds items
    assert scheduler.next(0) == [2]
    assert scheduler.next(0) is None
    assert scheduler.next(1) is None
    stats = scheduler.stats()
    assert stats["items_stolen"] == [0, 2]
    assert stats["balance"] is None


@pytest.mark.parametrize("make", IMPLEMENTATIONS)
def test_no_items(make):
    scheduler = make([], num_workers=3, max_batch=2)
    assert len(scheduler) == 0
    assert scheduler.next(2) is None
    stats = scheduler.stats()
    assert stats["items_handed"] == [0, 0, 0]
    assert stats["balance"] is None


@pytest.mark.parametrize(
    "costs",
    [
        pytest.param([3, 1, 2, 2], id="list-int"),
        pytest.param((0.5, 2.25, 2.25), id="tuple-float"),
        pytest.param(torch.tensor([1.5, 0.1, 7.0, 2.0], dtype=torch.float32), id="tensor-fp32"),
        pytest.param(torch.arange(9, dtype=torch.int64) % 4, id="tensor-int64"),
        pytest.param(torch.rand(12, 2, dtype=torch.float64)[:, 1], id="tensor-strided"),
        pytest.param(np.array([2.0, 9.0, 4.0]), id="numpy"),
    ],
)
def test_cost_inputs_match_reference(costs):
    kernel = stema_kernels.Scheduler(costs, num_workers=2, max_batch=2)
    spec = reference.Scheduler(costs, num_workers=2, max_batch=2)
    for worker in (1, 1, 0, 1, 0, 0, 1):
        assert kernel.next(worker) == spec.next(worker)
    assert kernel.stats() == spec.stats()


# ---- random call sequences: parity with the reference and the policy checked independently ----


def random_costs(rng: random.Random, num_items: int, *, integer: bool) -> list[float]:
    if integer:  # small integers: many ties, zeros, exact sums
        return [float(rng.randint(0, 5)) for _ in range(num_items)]
    return [rng.choice([0.0, rng.lognormvariate(0.0, 1.0)]) for _ in range(num_items)]


def random_calls(rng: random.Random, num_workers: int, num_items: int):
    """(kind, worker, seconds) calls: mostly next, some reports; enough to hand out everything.

    Each worker first takes a batch and reports a random time for it, so speeds differ from the
    start; then workers ask for work at very different rates, so shares run out at different
    times and the busy workers steal often.
    """
    for worker in range(num_workers):
        yield "next", worker, None
        yield "report", worker, rng.uniform(0.01, 3.0)
    rates = [rng.random() ** 2 + 0.01 for _ in range(num_workers)]
    for _ in range(4 * num_items + 10):
        if rng.random() < 0.3:
            yield "report", rng.randrange(num_workers), rng.choice([0.0, rng.uniform(0.01, 3.0)])
        else:
            (worker,) = rng.choices(range(num_workers), weights=rates)
            yield "next", worker, None


@pytest.mark.parametrize("seed", range(8))
def test_random_sequences_match_reference(seed):
    rng = random.Random(seed)
    num_workers, max_batch = rng.randint(1, 6), rng.randint(1, 4)
    num_items = rng.randint(0, 80)
    costs = random_costs(rng, num_items, integer=seed % 2 == 0)
    kernel = stema_kernels.Scheduler(costs, num_workers=num_workers, max_batch=max_batch)
    spec = reference.Scheduler(costs, num_workers=num_workers, max_batch=max_batch)
    for kind, worker, seconds in random_calls(rng, num_workers, num_items):
        if kind == "next":
            assert kernel.next(worker) == spec.next(worker)
        else:
            kernel.report(worker, seconds)
            spec.report(worker, seconds)
        assert kernel.remaining == spec.remaining
    for worker in range(num_workers):
        assert drain(kernel, worker) == drain(spec, worker)
    kernel_stats, spec_stats = kernel.stats(), spec.stats()
    assert kernel_stats.keys() == spec_stats.keys()
    for key, value in spec_stats.items():
        assert kernel_stats[key] == pytest.approx(value, rel=1e-12), key


class PolicyModel:
    """Follows a scheduler's answers and checks each against the policy, from its own state."""

    def __init__(self, costs: list[float], num_workers: int, max_batch: int):
        self.costs, self.max_batch = costs, max_batch
        self.left = [list(share) for share in lpt_shares(costs, num_workers)]
        self.pending = [0.0] * num_workers
        self.reported = [0.0] * num_workers
        self.seconds = [0.0] * num_workers
        self.handed: list[int] = []

    def speeds(self) -> list[float]:
        measured = [c / s if c > 0 and s > 0 else None for c, s in zip(self.reported, self.seconds)]
        known = [speed for speed in measured if speed is not None]
        assumed = sum(known) / len(known) if known else 1.0
        return [assumed if speed is None else speed for speed in measured]

    def check_next(self, worker: int, batch: list[int] | None) -> None:
        if not self.left[worker]:
            loads = {
                other: sum(self.costs[item] for item in share) / speed
                for other, (share, speed) in enumerate(zip(self.left, self.speeds()))
                if share and other != worker
            }
            if not loads:
                assert batch is None, "nothing is left, so next() must return None"
                return
            source = max(loads, key=lambda other: (loads[other], -other))
        else:
            source = worker
        share = self.left[source]
        assert batch == share[: self.max_batch], f"worker {worker} should take from share {source}"
        del share[: len(batch)]
        self.handed.extend(batch)
        self.pending[worker] += sum(self.costs[item] for item in batch)

    def report(self, worker: int, seconds: float) -> None:
        self.reported[worker] += self.pending[worker]
        self.pending[worker] = 0.0
        self.seconds[worker] += seconds


@pytest.mark.parametrize("make", IMPLEMENTATIONS)
@pytest.mark.parametrize("seed", range(6))
def test_random_sequences_follow_the_policy(make, seed):
    rng = random.Random(100 + seed)
    num_workers, max_batch = rng.randint(3, 6), rng.randint(1, 4)
    costs = random_costs(rng, rng.randint(1, 80), integer=True)
    scheduler = make(costs, num_workers=num_workers, max_batch=max_batch)
    model = PolicyModel(costs, num_workers, max_batch)
    for kind, worker, seconds in random_calls(rng, num_workers, len(costs)):
        if kind == "next":
            model.check_next(worker, scheduler.next(worker))
        else:
            scheduler.report(worker, seconds)
            model.report(worker, seconds)
    for worker in range(num_workers):
        model.check_next(worker, scheduler.next(worker))
    assert sorted(model.handed) == list(range(len(costs)))


# ---- threads --------------------------------------------------------------------------------


@pytest.mark.parametrize("max_batch", [1, 3, 8])
def test_many_threads_hand_out_every_item_exactly_once(max_batch):
    num_items, num_threads, num_workers = 20_000, 12, 8
    costs = torch.rand(num_items, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    scheduler = stema_kernels.Scheduler(costs, num_workers=num_workers, max_batch=max_batch)
    start = threading.Barrier(num_threads)
    received: list[list[int]] = [[] for _ in range(num_threads)]
    last_answers: list[object] = [0] * num_threads

    def hammer(thread: int) -> None:
        worker = thread % num_workers  # some workers are served by two threads at once
        start.wait()
        while (batch := scheduler.next(worker)) is not None:
            assert 1 <= len(batch) <= max_batch
            received[thread].extend(batch)
            if len(received[thread]) % 64 < max_batch:
                scheduler.report(worker, 1e-3)
        last_answers[thread] = scheduler.next(worker)

    threads = [threading.Thread(target=hammer, args=(thread,)) for thread in range(num_threads)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    everything = [item for items in received for item in items]
    assert len(everything) == num_items, "an item was handed out twice or lost"
    assert sorted(everything) == list(range(num_items))
    assert last_answers == [None] * num_threads
    stats = scheduler.stats()
    assert (stats["handed"], stats["remaining"], len(scheduler)) == (num_items, 0, 0)
    assert sum(stats["items_handed"]) == num_items
    assert sum(stats["cost_handed"]) == pytest.approx(costs.sum().item())


def test_slow_worker_gets_less_work_than_fast_ones():
    # 4 worker threads; worker 3 takes 3x as long per unit of cost. Each sleeps for its batch
    # (sleeping needs no CPU, so a busy machine hardly matters) and reports the time it took.
    # Ideal: the slow worker does 1/10 of the cost, each fast one 3/10 (the slow one ends up
    # with ~1/3 of a fast one's cost; the test asks only for < 0.6).
    slowdown = [1.0, 1.0, 1.0, 3.0]
    costs = [float(c) for c in random.Random(7).choices([1, 2, 3], k=120)]
    unit = 0.5 * sum(1 / s for s in slowdown) / sum(costs)  # ideal makespan 0.5 s
    scheduler = stema_kernels.Scheduler(costs, num_workers=4, max_batch=2)
    start = threading.Barrier(len(slowdown))

    def work(worker: int) -> None:
        start.wait()
        while (batch := scheduler.next(worker)) is not None:
            began = time.perf_counter()
            time.sleep(sum(costs[item] for item in batch) * slowdown[worker] * unit)
            scheduler.report(worker, time.perf_counter() - began)

    threads = [threading.Thread(target=work, args=(worker,)) for worker in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    stats = scheduler.stats()
    assert stats["remaining"] == 0
    cost_handed, speed = stats["cost_handed"], stats["speed"]
    assert all(cost > 0 for cost in cost_handed), "every worker thread made progress"
    assert cost_handed[3] < 0.6 * min(cost_handed[:3])
    assert speed[3] < 0.6 * min(speed[:3])
    assert stats["steals"] > 0, "fast workers finished their shares and took the slow one's work"


# ---- errors ---------------------------------------------------------------------------------


@pytest.mark.parametrize("make", IMPLEMENTATIONS)
@pytest.mark.parametrize(
    ("costs", "kwargs", "error", "match"),
    [
        ([1.0, -0.5], {}, ValueError, r"costs must be finite and >= 0, got costs\[1\] = -0.5"),
        ([float("nan")], {}, ValueError, r"costs must be finite and >= 0, got costs\[0\]"),
        ([1.0, float("inf")], {}, ValueError, r"costs must be finite and >= 0, got costs\[1\]"),
        ([[1.0, 2.0]], {}, ValueError, r"costs must be 1-D, got shape \(1, 2\)"),
        (3.0, {}, ValueError, r"costs must be 1-D, got shape \(\)"),
        (["a", "b"], {}, TypeError, r"costs: expected a 1-D sequence or tensor of numbers"),
        ([1.0], {"num_workers": 0}, ValueError, r"num_workers must be >= 1, got 0"),
        ([1.0], {"max_batch": 0}, ValueError, r"max_batch must be >= 1, got 0"),
        ([1.0], {"max_batch": 1.5}, TypeError, r"integer"),
    ],
)
def test_bad_construction(make, costs, kwargs, error, match):
    arguments = {"num_workers": 2, "max_batch": 2} | kwargs
    with pytest.raises(error, match=match):
        make(costs, **arguments)


@pytest.mark.parametrize("make", IMPLEMENTATIONS)
def test_bad_worker_and_seconds(make):
    scheduler = make([1.0, 2.0], num_workers=2, max_batch=1)
    for worker in (-1, 2):
        with pytest.raises(ValueError, match=rf"worker must be in \[0, 2\), got {worker}"):
            scheduler.next(worker)
        with pytest.raises(ValueError, match=rf"worker must be in \[0, 2\), got {worker}"):
            scheduler.report(worker, 1.0)
    for seconds in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match=r"seconds must be finite and >= 0"):
            scheduler.report(0, seconds)
    assert scheduler.remaining == 2, "failed calls hand nothing out"
