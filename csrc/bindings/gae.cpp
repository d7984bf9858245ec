// Python bindings of the GAE and discounted-returns kernels (called by stema_kernels.gae).
#include <pybind11/pybind11.h>

#include <cstdint>

#include "registry.h"
#include "stema/gae.h"

namespace py = pybind11;

namespace stema::gae {
namespace {

using bindings::as_ptr;

GaeArgs make_gae_args(std::uintptr_t rewards, int rewards_dtype, int64_t rewards_row_stride, std::uintptr_t values,
                      int values_dtype, int64_t values_row_stride, std::uintptr_t mask, int64_t mask_row_stride,
                      int64_t batch, int64_t length, double gamma, double lam, std::uintptr_t advantages,
                      std::uintptr_t returns) {
  return GaeArgs{batch,
                 length,
                 StridedRows{as_ptr<const void>(rewards), to_dtype(rewards_dtype), rewards_row_stride},
                 StridedRows{as_ptr<const void>(values), to_dtype(values_dtype), values_row_stride},
                 MaskRows{as_ptr<const uint8_t>(mask), mask_row_stride},
                 gamma,
                 lam,
                 as_ptr<float>(advantages),
                 as_ptr<float>(returns)};
}

DiscountedReturnsArgs make_discounted_returns_args(std::uintptr_t rewards, int rewards_dtype, int64_t rewards_row_stride,
                                                   std::uintptr_t mask, int64_t mask_row_stride, int64_t batch,
                                                   int64_t length, double gamma, std::uintptr_t returns) {
  return DiscountedReturnsArgs{batch,
                               length,
                               StridedRows{as_ptr<const void>(rewards), to_dtype(rewards_dtype), rewards_row_stride},
                               MaskRows{as_ptr<const uint8_t>(mask), mask_row_stride},
                               gamma,
                               as_ptr<float>(returns)};
}

}  // namespace
}  // namespace stema::gae

STEMA_REGISTER_BINDINGS(m) {
  using namespace stema::gae;
  m.def(
      "gae_cpu",
      [](std::uintptr_t rewards, int rewards_dtype, int64_t rewards_row_stride, std::uintptr_t values,
         int values_dtype, int64_t values_row_stride, std::uintptr_t mask, int64_t mask_row_stride, int64_t batch,
         int64_t length, double gamma, double lam, std::uintptr_t advantages, std::uintptr_t returns) {
        gae_cpu(make_gae_args(rewards, rewards_dtype, rewards_row_stride, values, values_dtype, values_row_stride,
                              mask, mask_row_stride, batch, length, gamma, lam, advantages, returns));
      },
      py::kw_only(), py::arg("rewards"), py::arg("rewards_dtype"), py::arg("rewards_row_stride"), py::arg("values"),
      py::arg("values_dtype"), py::arg("values_row_stride"), py::arg("mask"), py::arg("mask_row_stride"),
      py::arg("batch"), py::arg("length"), py::arg("gamma"), py::arg("lam"), py::arg("advantages"),
      py::arg("returns"), py::call_guard<py::gil_scoped_release>(),
      "GAE over [batch, length] rows (unit column stride, given row strides; mask bytes, nonzero = valid) "
      "into contiguous fp32 advantages and returns.");
  m.def(
      "discounted_returns_cpu",
      [](std::uintptr_t rewards, int rewards_dtype, int64_t rewards_row_stride, std::uintptr_t mask,
         int64_t mask_row_stride, int64_t batch, int64_t length, double gamma, std::uintptr_t returns) {
        discounted_returns_cpu(make_discounted_returns_args(rewards, rewards_dtype, rewards_row_stride, mask,
                                                            mask_row_stride, batch, length, gamma, returns));
      },
      py::kw_only(), py::arg("rewards"), py::arg("rewards_dtype"), py::arg("rewards_row_stride"), py::arg("mask"),
      py::arg("mask_row_stride"), py::arg("batch"), py::arg("length"), py::arg("gamma"), py::arg("returns"),
      py::call_guard<py::gil_scoped_release>(),
      "Discounted returns over [batch, length] rows into contiguous fp32 returns.");
#if defined(STEMA_WITH_CUDA)
  m.def(
      "gae_cuda",
      [](std::uintptr_t rewards, int rewards_dtype, int64_t rewards_row_stride, std::uintptr_t values,
         int values_dtype, int64_t values_row_stride, std::uintptr_t mask, int64_t mask_row_stride, int64_t batch,
         int64_t length, double gamma, double lam, std::uintptr_t advantages, std::uintptr_t returns,
         std::uintptr_t stream) {
        gae_cuda(make_gae_args(rewards, rewards_dtype, rewards_row_stride, values, values_dtype, values_row_stride,
                               mask, mask_row_stride, batch, length, gamma, lam, advantages, returns),
                 as_ptr<void>(stream));
      },
      py::kw_only(), py::arg("rewards"), py::arg("rewards_dtype"), py::arg("rewards_row_stride"), py::arg("values"),
      py::arg("values_dtype"), py::arg("values_row_stride"), py::arg("mask"), py::arg("mask_row_stride"),
      py::arg("batch"), py::arg("length"), py::arg("gamma"), py::arg("lam"), py::arg("advantages"),
      py::arg("returns"), py::arg("stream"), py::call_guard<py::gil_scoped_release>(),
      "gae_cpu on CUDA device pointers, launched on `stream` (a cudaStream_t as an int) of the current device.");
  m.def(
      "discounted_returns_cuda",
      [](std::uintptr_t rewards, int rewards_dtype, int64_t rewards_row_stride, std::uintptr_t mask,
         int64_t mask_row_stride, int64_t batch, int64_t length, double gamma, std::uintptr_t returns,
         std::uintptr_t stream) {
        discounted_returns_cuda(make_discounted_returns_args(rewards, rewards_dtype, rewards_row_stride, mask,
                                                             mask_row_stride, batch, length, gamma, returns),
                                as_ptr<void>(stream));
      },
      py::kw_only(), py::arg("rewards"), py::arg("rewards_dtype"), py::arg("rewards_row_stride"), py::arg("mask"),
      py::arg("mask_row_stride"), py::arg("batch"), py::arg("length"), py::arg("gamma"), py::arg("returns"),
      py::arg("stream"), py::call_guard<py::gil_scoped_release>(),
      "discounted_returns_cpu on CUDA device pointers, launched on `stream` of the current device.");
#endif
}
