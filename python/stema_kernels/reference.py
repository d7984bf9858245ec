"""Plain-PyTorch references for every kernel in stema_kernels.

Each function here is the specification its kernel is tested against, and the fallback when the
compiled extension has no kernel for a tensor's device. They are written for clarity, not speed:
they materialize `[N, V]` fp32 tensors and loop over time in Python, as TRL and OpenRLHF do.
"""

from __future__ import annotations

import heapq
import math
import operator
import threading

import torch

KL_ESTIMATORS = ("k1", "k2", "k3")


def token_logprobs(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
):
    """log p(label) under softmax(logits / temperature), in fp32.

    logits `[..., V]`, labels `[...]` -> logprobs `[...]` (and entropy `[...]` if asked), where
    logprob = z[label] - logsumexp(z), z = logits / temperature, and
    entropy = logsumexp(z) - sum_v softmax(z)_v * z_v (terms with z_v = -inf contribute 0).
    Positions whose label is `ignore_index` give 0 (and no gradient).
    """
    z = logits.float() / temperature  # [..., V] fp32
    valid = labels != ignore_index
    safe_labels = torch.where(valid, labels, torch.zeros_like(labels)).long()
    lse = torch.logsumexp(z, dim=-1)  # [...]
    picked = z.gather(-1, safe_labels.unsqueeze(-1)).squeeze(-1)
    logprobs = torch.where(valid, picked - lse, torch.zeros_like(lse))
    if not return_entropy:
        return logprobs
    probs = torch.softmax(z, dim=-1)
    finite_z = torch.where(torch.isfinite(z), z, torch.zeros_like(z))
    entropy = lse - (probs * finite_z).sum(-1)
    entropy = torch.where(valid, entropy, torch.zeros_like(entropy))
    return logprobs, entropy


def kl_from_log_ratio(log_ratio: torch.Tensor, kl: str) -> torch.Tensor:
    """Schulman's estimators of KL(policy || reference) from log_ratio = log pi - log pi_ref.

    With r = pi_ref / pi = exp(-log_ratio) (http://joschu.net/blog/kl-approx.html):
    k1 = -log r = log_ratio; k2 = (log r)^2 / 2; k3 = (r - 1) - log r.
    """
    if kl == "k1":
        return log_ratio
    if kl == "k2":
        return 0.5 * log_ratio.square()
    if kl == "k3":
        return torch.expm1(-log_ratio) + log_ratio
    raise ValueError(f"kl must be one of {KL_ESTIMATORS}, got {kl!r}")


def logprob_kl(
    logits: torch.Tensor,
    labels: torch.Tensor,
    ref_logprobs: torch.Tensor,
    *,
    kl: str = "k3",
    temperature: float = 1.0,
    ignore_index: int = -100,
):
    """(logprobs, kl) `[...]`, fp32: token log-probs and a per-token KL(policy || reference).

    ref_logprobs `[...]` are the reference model's log-probs of the same labels; they receive no
    gradient. Ignored positions give 0 in both outputs.
    """
    if kl not in KL_ESTIMATORS:
        raise ValueError(f"kl must be one of {KL_ESTIMATORS}, got {kl!r}")
    logprobs = token_logprobs(logits, labels, temperature=temperature, ignore_index=ignore_index)
    valid = labels != ignore_index
    log_ratio = logprobs - ref_logprobs.detach().float()
    kl_values = torch.where(valid, kl_from_log_ratio(log_ratio, kl), torch.zeros_like(logprobs))
    return logprobs, kl_values


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, *, gamma: float, lam: float):
    """Generalized advantage estimation (Schulman et al. 2016, https://arxiv.org/abs/1506.02438).

    rewards, values, mask `[B, T]`; mask marks valid response tokens (left or right padding, or
    any gaps: masked positions are skipped). Over the valid positions t of a row, in order,
        delta_t = r_t + gamma * V_{next(t)} - V_t    (V after the last valid token is 0)
        A_t = delta_t + gamma * lam * A_{next(t)}
        returns_t = A_t + V_t
    Returns (advantages, returns), fp32 `[B, T]`, 0 at masked positions. The loop over T is the
    one TRL and OpenRLHF run, made mask aware.
    """
    rewards = rewards.float()
    values = values.float()
    valid = mask.bool()
    batch, length = rewards.shape
    advantages = torch.zeros_like(rewards)
    last_advantage = rewards.new_zeros(batch)
    next_value = rewards.new_zeros(batch)
    for t in reversed(range(length)):
        valid_t = valid[:, t]
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        advantage_t = delta + gamma * lam * last_advantage
        last_advantage = torch.where(valid_t, advantage_t, last_advantage)
        next_value = torch.where(valid_t, values[:, t], next_value)
        advantages[:, t] = torch.where(valid_t, advantage_t, torch.zeros_like(advantage_t))
    returns = torch.where(valid, advantages + values, torch.zeros_like(advantages))
    return advantages, returns


def discounted_returns(rewards: torch.Tensor, mask: torch.Tensor, *, gamma: float) -> torch.Tensor:
    """G_t = r_t + gamma * G_{next(t)} over the valid positions of each row (REINFORCE).

    rewards, mask `[B, T]` -> returns fp32 `[B, T]`, 0 at masked positions.
    """
    rewards = rewards.float()
    valid = mask.bool()
    batch, length = rewards.shape
    returns = torch.zeros_like(rewards)
    running = rewards.new_zeros(batch)
    for t in reversed(range(length)):
        valid_t = valid[:, t]
        value_t = rewards[:, t] + gamma * running
        running = torch.where(valid_t, value_t, running)
        returns[:, t] = torch.where(valid_t, value_t, torch.zeros_like(value_t))
    return returns


def refit_(dst: list[torch.Tensor], src: list[torch.Tensor]) -> None:
    """Copy each src tensor into its dst in place, casting dtype: a Python loop of `copy_`."""
    for destination, source in zip(dst, src, strict=True):
        destination.copy_(source)



def pack_rows(src: torch.Tensor, *, block: int, pair: int, dtype: torch.dtype) -> torch.Tensor:
    """src [rows, cols] cast to `dtype` in the row-block layout of `stema_kernels.pack_rows_`, flat:
    packed[b][c // pair][r][c % pair] = src[b * block + r][c]."""
    rows, cols = src.shape
    blocks = src.to(dtype).reshape(rows // block, block, cols // pair, pair)
    return blocks.permute(0, 2, 1, 3).contiguous().flatten()

# ---- load-balanced rollout scheduler ----------------------------------------------------------


class Scheduler:
    """Pure-Python specification of `stema_kernels.Scheduler` (same policy, same API).

    Hands items (prompts) with expected costs out to `num_workers` rollout workers:

    1. Construction: items sorted by cost, highest first, are dealt by greedy
       longest-processing-time: each to the share with the least total cost so far.
    2. `next(worker)`: up to `max_batch` items from the front of the worker's own share (its
       highest-cost items first).
    3. Own share empty: steal up to `max_batch` items from the front of the share (with items
       left) of the other worker with the largest load = remaining cost / speed.
    4. All shares empty: None.

    `report(worker, seconds)` credits the worker with the cost handed to it since its last
    report; speed = cost credited / seconds reported (cumulative). Workers without a measurement
    get the mean measured speed, or 1 when nobody has one. Ties go to the lower index throughout,
    so a single-threaded sequence of calls gives the same results as the C++ scheduler.
    """

    def __init__(self, costs, *, num_workers: int, max_batch: int):
        self._costs = _scheduler_costs(costs)
        num_workers, max_batch = operator.index(num_workers), operator.index(max_batch)
        if num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {num_workers}")
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        for item, cost in enumerate(self._costs):
            if not (math.isfinite(cost) and cost >= 0.0):
                raise ValueError(f"costs must be finite and >= 0, got costs[{item}] = {cost}")
        self.num_workers = num_workers
        self.max_batch = max_batch
        self._total_cost = 0.0
        for cost in self._costs:
            self._total_cost += cost
        self._shares = self._deal_lpt()
        self._cost_from = [self._suffix_costs(share) for share in self._shares]
        self._fronts = [0] * num_workers
        self._items_handed = [0] * num_workers
        self._cost_handed = [0.0] * num_workers
        self._seconds_reported = [0.0] * num_workers
        self._cost_reported = [0.0] * num_workers
        self._cost_pending = [0.0] * num_workers
        self._speed = [1.0] * num_workers
        self._items_stolen = [0] * num_workers
        self._handed = 0
        self._steals = 0
        self._lock = threading.Lock()

    def _deal_lpt(self) -> list[list[int]]:
        order = sorted(range(len(self._costs)), key=lambda item: -self._costs[item])  # stable
        shares: list[list[int]] = [[] for _ in range(self.num_workers)]
        lightest = [(0.0, worker) for worker in range(self.num_workers)]
        for item in order:
            total, worker = heapq.heappop(lightest)
            shares[worker].append(item)
            heapq.heappush(lightest, (total + self._costs[item], worker))
        return shares

    def _suffix_costs(self, share: list[int]) -> list[float]:
        """cost_from[k] = cost of share[k:], summed from the back (as the C++ scheduler does)."""
        cost_from = [0.0] * (len(share) + 1)
        for k in reversed(range(len(share))):
            cost_from[k] = self._costs[share[k]] + cost_from[k + 1]
        return cost_from

    def _remaining_cost(self, worker: int) -> float:
        return self._cost_from[worker][self._fronts[worker]]

    def _check_worker(self, worker: int) -> int:
        worker = operator.index(worker)
        if not 0 <= worker < self.num_workers:
            raise ValueError(f"worker must be in [0, {self.num_workers}), got {worker}")
        return worker

    def next(self, worker: int) -> list[int] | None:
        worker = self._check_worker(worker)
        with self._lock:
            source = worker
            if self._fronts[worker] == len(self._shares[worker]):
                source = self._most_loaded_other(worker)
                if source is None:
                    return None
            front = self._fronts[source]
            batch = self._shares[source][front : front + self.max_batch]
            self._fronts[source] = front + len(batch)
            cost = 0.0
            for item in batch:
                cost += self._costs[item]
            self._items_handed[worker] += len(batch)
            self._cost_handed[worker] += cost
            self._cost_pending[worker] += cost
            self._handed += len(batch)
            if source != worker:
                self._items_stolen[worker] += len(batch)
                self._steals += 1
            return batch

    def _most_loaded_other(self, worker: int) -> int | None:
        victim, victim_load = None, 0.0
        for other in range(self.num_workers):
            if other == worker or self._fronts[other] == len(self._shares[other]):
                continue
            load = self._remaining_cost(other) / self._speed[other]
            if victim is None or load > victim_load:
                victim, victim_load = other, load
        return victim

    def report(self, worker: int, seconds: float) -> None:
        worker = self._check_worker(worker)
        seconds = float(seconds)
        if not (math.isfinite(seconds) and seconds >= 0.0):
            raise ValueError(f"seconds must be finite and >= 0, got {seconds}")
        with self._lock:
            self._cost_reported[worker] += self._cost_pending[worker]
            self._cost_pending[worker] = 0.0
            self._seconds_reported[worker] += seconds
            measured = [0.0] * self.num_workers
            for other in range(self.num_workers):
                if self._cost_reported[other] > 0.0 and self._seconds_reported[other] > 0.0:
                    speed = self._cost_reported[other] / self._seconds_reported[other]
                    if math.isfinite(speed) and speed > 0.0:
                        measured[other] = speed
            known = [speed for speed in measured if speed > 0.0]
            measured_sum = 0.0
            for speed in known:
                measured_sum += speed
            assumed = measured_sum / len(known) if known else 1.0
            self._speed = [speed if speed > 0.0 else assumed for speed in measured]

    def stats(self) -> dict:
        with self._lock:
            busy = [cost / speed for cost, speed in zip(self._cost_handed, self._speed)]
            busy_sum = 0.0
            for seconds in busy:
                busy_sum += seconds
            busy_mean = busy_sum / self.num_workers
            remaining_cost = 0.0
            for worker in range(self.num_workers):
                remaining_cost += self._remaining_cost(worker)
            return {
                "items_handed": list(self._items_handed),
                "cost_handed": list(self._cost_handed),
                "seconds_reported": list(self._seconds_reported),
                "speed": list(self._speed),
                "items_stolen": list(self._items_stolen),
                "items": len(self._costs),
                "handed": self._handed,
                "remaining": len(self._costs) - self._handed,
                "steals": self._steals,
                "total_cost": self._total_cost,
                "remaining_cost": remaining_cost,
                "balance": max(busy) / busy_mean if busy_mean > 0.0 else None,
            }

    @property
    def remaining(self) -> int:
        with self._lock:
            return len(self._costs) - self._handed

    @property
    def num_items(self) -> int:
        return len(self._costs)

    def __len__(self) -> int:
        return self.remaining


def _scheduler_costs(costs) -> list[float]:
    """`costs` (a sequence of numbers, or a 1-D tensor or array) as a list of Python floats."""
    try:
        values = torch.as_tensor(costs, dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError) as error:
        raise TypeError(f"costs: expected a 1-D sequence or tensor of numbers ({error})") from None
    if values.dim() != 1:
        raise ValueError(f"costs must be 1-D, got shape {tuple(values.shape)}")
    return values.cpu().tolist()
