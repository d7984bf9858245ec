// pybind11 bindings of the load-balanced rollout scheduler (CPU only; see stema/scheduler.h).
//
// Bound as a class, `_C.SchedulerCpu`, because the scheduler is state shared between calls; the
// Python wrapper is stema_kernels.scheduler.Scheduler. next/report/stats release the GIL while
// they run (and while they wait for the scheduler's mutex), so Python worker threads that call
// them do not serialize on the GIL as well.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cmath>
#include <cstdint>

#include "registry.h"
#include "stema/scheduler.h"

namespace py = pybind11;

namespace {

// The stats() dict: one list per per-worker field, then the totals.
py::dict stats_to_dict(const stema::SchedulerStats& stats) {
  py::list items_handed, cost_handed, seconds_reported, speed, items_stolen;
  for (const stema::SchedulerWorkerStats& worker : stats.workers) {
    items_handed.append(worker.items_handed);
    cost_handed.append(worker.cost_handed);
    seconds_reported.append(worker.seconds_reported);
    speed.append(worker.speed);
    items_stolen.append(worker.items_stolen);
  }
  py::dict out;
  out["items_handed"] = items_handed;
  out["cost_handed"] = cost_handed;
  out["seconds_reported"] = seconds_reported;
  out["speed"] = speed;
  out["items_stolen"] = items_stolen;
  out["items"] = stats.items;
  out["handed"] = stats.handed;
  out["remaining"] = stats.remaining;
  out["steals"] = stats.steals;
  out["total_cost"] = stats.total_cost;
  out["remaining_cost"] = stats.remaining_cost;
  out["balance"] = std::isnan(stats.balance) ? py::none() : py::cast(stats.balance);
  return out;
}

}  // namespace

STEMA_REGISTER_BINDINGS(m) {
  using stema::Scheduler;
  py::class_<Scheduler>(m, "SchedulerCpu",
                        "Thread-safe load-balanced rollout scheduler. Use stema_kernels.Scheduler.")
      .def(py::init([](std::uintptr_t costs_ptr, int64_t num_items, int64_t num_workers,
                       int64_t max_batch) {
             return new Scheduler(stema::bindings::as_ptr<const double>(costs_ptr), num_items,
                                  num_workers, max_batch);
           }),
           py::arg("costs_ptr"), py::arg("num_items"), py::kw_only(), py::arg("num_workers"),
           py::arg("max_batch"),
           "costs_ptr: address of num_items contiguous float64 costs (copied).")
      .def("next", &Scheduler::next, py::arg("worker"), py::call_guard<py::gil_scoped_release>(),
           "Up to max_batch item indices for `worker`, or None when all are handed out.")
      .def("report", &Scheduler::report, py::arg("worker"), py::arg("seconds"),
           py::call_guard<py::gil_scoped_release>(),
           "Credits `worker` with the cost handed to it since its last report, done in `seconds`.")
      .def(
          "stats",
          [](const Scheduler& self) {
            // Snapshot without the GIL (it takes the mutex), then build the dict with it.
            stema::SchedulerStats snapshot;
            {
              py::gil_scoped_release release;
              snapshot = self.stats();
            }
            return stats_to_dict(snapshot);
          },
          "Per-worker lists and totals (see stema_kernels.Scheduler.stats).")
      .def_property_readonly("remaining", &Scheduler::remaining)
      .def_property_readonly("num_items", &Scheduler::num_items)
      .def_property_readonly("num_workers", &Scheduler::num_workers)
      .def_property_readonly("max_batch", &Scheduler::max_batch);
}
