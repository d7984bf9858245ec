// Load-balanced rollout scheduler: hands prompts (items) out to data-parallel rollout workers.
//
// The scheduler runs on the host, beside the Python threads or processes that drive the
// generation engines, so it is CPU code only: there is no csrc/cuda/scheduler.cu and none is
// needed. Python reference with the same policy: stema_kernels.reference.Scheduler.
//
// Policy (ties are always broken towards the lower index, so a single-threaded sequence of calls
// gives the same assignments here and in the Python reference):
//   1. Construction. Items are sorted by cost, highest first, and dealt one at a time by greedy
//      longest-processing-time (LPT): each item goes to the share with the least total cost so
//      far. Every worker starts with a share of about the same total cost, highest cost first.
//   2. next(worker) hands out up to max_batch items from the front of the worker's own share,
//      that is its highest-cost items first.
//   3. When the worker's own share is empty it steals: it takes up to max_batch items from the
//      front (highest cost first) of the share of the most loaded other worker, where
//        load(w) = remaining cost of share w / speed(w),
//      the expected time that worker still needs. A share that still holds items of cost 0 can be
//      stolen from too (its load is 0).
//   4. When every share is empty, next() returns nothing (Python None): all items are handed out.
// Each item is handed out exactly once.
//
// Speed estimate (cost units per second), a cumulative ratio:
//   speed(w) = cost handed to w up to its last report / seconds reported by w.
// report(worker, seconds) credits the worker with all cost handed to it since its previous report.
// A cumulative ratio needs no tuning constant and weighs every second of measurement equally; it
// adapts slowly when a worker's speed drifts, which rollout engines of fixed size rarely do. A
// worker without a measurement (no cost credited or no seconds reported yet) is assumed to run at
// the mean measured speed of the others, or at 1 when nobody has a measurement; so before any
// report all speeds are equal and stealing goes by remaining cost alone.
//
// Thread safety: one std::mutex guards all state. A call holds it for O(max_batch) work, plus
// O(num_workers) when it steals or reports, and allocates nothing while holding it.
#pragma once

#include <cstdint>
#include <mutex>
#include <optional>
#include <vector>

namespace stema {

// What one worker has done so far.
struct SchedulerWorkerStats {
  int64_t items_handed = 0;       // items handed to this worker, its own and stolen ones
  double cost_handed = 0.0;       // their total cost
  double seconds_reported = 0.0;  // sum of the seconds it reported
  double speed = 1.0;             // the speed estimate the scheduler uses for it (cost units / s)
  int64_t items_stolen = 0;       // items it took from other workers' shares
};

// A consistent snapshot of the whole scheduler.
struct SchedulerStats {
  std::vector<SchedulerWorkerStats> workers;
  int64_t items = 0;            // items the scheduler was built with
  int64_t handed = 0;           // items handed out so far
  int64_t remaining = 0;        // items not handed out yet
  int64_t steals = 0;           // steal batches, all workers together
  double total_cost = 0.0;      // cost of all items
  double remaining_cost = 0.0;  // cost of the items not handed out yet
  // max / mean over workers of cost_handed / speed (expected busy seconds); 1 is perfect balance.
  // NaN when the mean is 0 (nothing with a cost handed out yet).
  double balance = 0.0;
};

class Scheduler {
 public:
  // costs[i] >= 0 (finite) is the expected cost of item i; num_workers >= 1; max_batch >= 1.
  // Throws std::invalid_argument on bad values.
  Scheduler(const double* costs, int64_t num_items, int64_t num_workers, int64_t max_batch);

  // Up to max_batch item indices for `worker` (policy above), or nullopt when all are handed out.
  std::optional<std::vector<int64_t>> next(int64_t worker);

  // Credits `worker` with the cost handed to it since its last report, done in `seconds` (>= 0).
  void report(int64_t worker, double seconds);

  SchedulerStats stats() const;

  int64_t remaining() const;
  int64_t num_items() const { return static_cast<int64_t>(costs_.size()); }
  int64_t num_workers() const { return static_cast<int64_t>(shares_.size()); }
  int64_t max_batch() const { return max_batch_; }

 private:
  // One worker's share of the items, highest cost first, consumed from the front.
  struct Share {
    std::vector<int64_t> items;
    std::vector<double> cost_from;  // cost_from[k] = cost of items[k:] (no running subtraction)
    size_t front = 0;               // items[front:] are not handed out yet

    bool empty() const { return front == items.size(); }
    double remaining_cost() const { return cost_from[front]; }
  };

  // Per-worker bookkeeping; speed is recomputed for every worker on each report.
  struct WorkerState {
    SchedulerWorkerStats stats;
    double cost_reported = 0.0;  // cost credited by reports
    double cost_pending = 0.0;   // cost handed since the last report
  };

  void check_worker(int64_t worker) const;
  // The other worker whose share has items and the largest load; -1 when all are empty. Locked.
  int64_t most_loaded_other(int64_t worker) const;
  // Moves up to max_batch items from the front of `share` into `batch`, charging `worker`. Locked.
  void take_front(Share& share, int64_t worker, std::vector<int64_t>& batch);
  // cost credited / seconds reported when both are > 0 and the ratio is finite, else 0. Locked.
  double measured_speed(int64_t worker) const;
  // Recomputes every worker's speed estimate from the reports (policy above). Locked.
  void update_speeds();

  std::vector<double> costs_;
  int64_t max_batch_;
  double total_cost_ = 0.0;
  std::vector<Share> shares_;
  std::vector<WorkerState> workers_;
  int64_t handed_ = 0;
  int64_t steals_ = 0;
  mutable std::mutex mutex_;
};

}  // namespace stema
