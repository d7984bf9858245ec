// Load-balanced rollout scheduler (policy and thread safety: csrc/include/stema/scheduler.h).
#include "stema/scheduler.h"

#include <algorithm>
#include <cmath>
#include <functional>
#include <numeric>
#include <queue>
#include <utility>

#include "stema/common.h"

namespace stema {

namespace {

// Item indices ordered by cost, highest first; equal costs keep the lower index first.
std::vector<int64_t> order_by_cost_descending(const std::vector<double>& costs) {
  std::vector<int64_t> order(costs.size());
  std::iota(order.begin(), order.end(), int64_t{0});
  std::stable_sort(order.begin(), order.end(),
                   [&costs](int64_t a, int64_t b) { return costs[a] > costs[b]; });
  return order;
}

}  // namespace

Scheduler::Scheduler(const double* costs, int64_t num_items, int64_t num_workers, int64_t max_batch)
    : max_batch_(max_batch) {
  STEMA_CHECK(num_workers >= 1, "num_workers must be >= 1, got " << num_workers);
  STEMA_CHECK(max_batch >= 1, "max_batch must be >= 1, got " << max_batch);
  STEMA_CHECK(num_items >= 0, "the number of costs must be >= 0, got " << num_items);
  STEMA_CHECK(num_items == 0 || costs != nullptr, "costs is a null pointer");
  costs_.assign(costs, costs + num_items);
  for (int64_t item = 0; item < num_items; ++item) {
    STEMA_CHECK(std::isfinite(costs_[item]) && costs_[item] >= 0.0,
                "costs must be finite and >= 0, got costs[" << item << "] = " << costs_[item]);
    total_cost_ += costs_[item];
  }

  // Greedy LPT: each item, highest cost first, to the share with the least total so far. The
  // heap's (total, worker) pairs order equal totals by the lower worker index.
  shares_.resize(num_workers);
  workers_.resize(num_workers);
  using Load = std::pair<double, int64_t>;
  std::priority_queue<Load, std::vector<Load>, std::greater<Load>> lightest;
  for (int64_t worker = 0; worker < num_workers; ++worker) lightest.push({0.0, worker});
  for (int64_t item : order_by_cost_descending(costs_)) {
    auto [total, worker] = lightest.top();
    lightest.pop();
    shares_[worker].items.push_back(item);
    lightest.push({total + costs_[item], worker});
  }
  for (Share& share : shares_) {
    share.cost_from.assign(share.items.size() + 1, 0.0);
    for (size_t k = share.items.size(); k-- > 0;) {
      share.cost_from[k] = costs_[share.items[k]] + share.cost_from[k + 1];
    }
  }
}

void Scheduler::check_worker(int64_t worker) const {
  STEMA_CHECK(worker >= 0 && worker < num_workers(),
              "worker must be in [0, " << num_workers() << "), got " << worker);
}

int64_t Scheduler::most_loaded_other(int64_t worker) const {
  int64_t victim = -1;
  double victim_load = 0.0;
  for (int64_t other = 0; other < num_workers(); ++other) {
    if (other == worker || shares_[other].empty()) continue;
    const double load = shares_[other].remaining_cost() / workers_[other].stats.speed;
    if (victim < 0 || load > victim_load) {
      victim = other;
      victim_load = load;
    }
  }
  return victim;
}

void Scheduler::take_front(Share& share, int64_t worker, std::vector<int64_t>& batch) {
  const size_t end = std::min(share.items.size(), share.front + static_cast<size_t>(max_batch_));
  batch.assign(share.items.begin() + share.front, share.items.begin() + end);
  share.front = end;
  double cost = 0.0;
  for (int64_t item : batch) cost += costs_[item];
  SchedulerWorkerStats& stats = workers_[worker].stats;
  stats.items_handed += static_cast<int64_t>(batch.size());
  stats.cost_handed += cost;
  workers_[worker].cost_pending += cost;
  handed_ += static_cast<int64_t>(batch.size());
}

std::optional<std::vector<int64_t>> Scheduler::next(int64_t worker) {
  check_worker(worker);
  std::vector<int64_t> batch;
  batch.reserve(static_cast<size_t>(std::min<int64_t>(max_batch_, num_items())));
  std::lock_guard<std::mutex> lock(mutex_);
  if (!shares_[worker].empty()) {
    take_front(shares_[worker], worker, batch);
    return batch;
  }
  const int64_t victim = most_loaded_other(worker);
  if (victim < 0) return std::nullopt;
  take_front(shares_[victim], worker, batch);
  workers_[worker].stats.items_stolen += static_cast<int64_t>(batch.size());
  steals_ += 1;
  return batch;
}

void Scheduler::report(int64_t worker, double seconds) {
  check_worker(worker);
  STEMA_CHECK(std::isfinite(seconds) && seconds >= 0.0,
              "seconds must be finite and >= 0, got " << seconds);
  std::lock_guard<std::mutex> lock(mutex_);
  WorkerState& state = workers_[worker];
  state.cost_reported += state.cost_pending;
  state.cost_pending = 0.0;
  state.stats.seconds_reported += seconds;
  update_speeds();
}

// A measured speed is a finite positive ratio of credited cost to reported seconds; 0 if none.
double Scheduler::measured_speed(int64_t worker) const {
  const WorkerState& state = workers_[worker];
  if (state.cost_reported <= 0.0 || state.stats.seconds_reported <= 0.0) return 0.0;
  const double speed = state.cost_reported / state.stats.seconds_reported;
  return std::isfinite(speed) ? speed : 0.0;
}

void Scheduler::update_speeds() {
  // Workers without a measured speed get the mean of the measured ones (1 when there are none).
  double measured_sum = 0.0;
  int64_t measured_count = 0;
  for (int64_t worker = 0; worker < num_workers(); ++worker) {
    const double speed = measured_speed(worker);
    if (speed > 0.0) {
      measured_sum += speed;
      measured_count += 1;
    }
  }
  const double assumed =
      measured_count > 0 ? measured_sum / static_cast<double>(measured_count) : 1.0;
  for (int64_t worker = 0; worker < num_workers(); ++worker) {
    const double speed = measured_speed(worker);
    workers_[worker].stats.speed = speed > 0.0 ? speed : assumed;
  }
}

SchedulerStats Scheduler::stats() const {
  SchedulerStats snapshot;
  snapshot.workers.reserve(workers_.size());
  std::lock_guard<std::mutex> lock(mutex_);
  for (const WorkerState& state : workers_) snapshot.workers.push_back(state.stats);
  snapshot.items = num_items();
  snapshot.handed = handed_;
  snapshot.remaining = num_items() - handed_;
  snapshot.steals = steals_;
  snapshot.total_cost = total_cost_;
  for (const Share& share : shares_) snapshot.remaining_cost += share.remaining_cost();
  double busy_max = 0.0;
  double busy_sum = 0.0;
  for (const SchedulerWorkerStats& worker : snapshot.workers) {
    const double busy = worker.cost_handed / worker.speed;
    busy_max = std::max(busy_max, busy);
    busy_sum += busy;
  }
  const double busy_mean = busy_sum / static_cast<double>(snapshot.workers.size());
  snapshot.balance = busy_mean > 0.0 ? busy_max / busy_mean : std::nan("");
  return snapshot;
}

int64_t Scheduler::remaining() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return num_items() - handed_;
}

}  // namespace stema
