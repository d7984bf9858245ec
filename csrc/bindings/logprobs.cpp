// pybind11 bindings of the fused token log-prob / entropy / KL kernels (stema/logprobs.h).
//
// Pointers arrive as ints from tensor.data_ptr(); 0 stands for "not given" (entropy, ref_logprobs,
// kl_values, grad_entropy). python/stema_kernels/logprobs.py is the only intended caller.
#include <pybind11/pybind11.h>

#include <cstdint>

#include "registry.h"
#include "stema/logprobs.h"

namespace py = pybind11;

namespace {

using stema::bindings::as_ptr;
using namespace stema::logprobs;

RowLayout make_layout(int64_t rows, int64_t vocab, int64_t rows_per_group, int64_t group_stride, int64_t row_stride) {
  RowLayout layout;
  layout.rows = rows;
  layout.vocab = vocab;
  layout.rows_per_group = rows_per_group;
  layout.group_stride = group_stride;
  layout.row_stride = row_stride;
  return layout;
}

ForwardArgs make_forward_args(std::uintptr_t logits, int dtype, int64_t rows, int64_t vocab, int64_t rows_per_group,
                              int64_t group_stride, int64_t row_stride, std::uintptr_t labels, bool labels_int32,
                              int64_t ignore_index, float inv_temperature, std::uintptr_t logprobs,
                              std::uintptr_t logsumexp, std::uintptr_t entropy, std::uintptr_t ref_logprobs, int kl,
                              std::uintptr_t kl_values) {
  ForwardArgs args;
  args.logits = as_ptr<const void>(logits);
  args.logits_dtype = stema::to_dtype(dtype);
  args.layout = make_layout(rows, vocab, rows_per_group, group_stride, row_stride);
  args.labels = as_ptr<const void>(labels);
  args.labels_are_int32 = labels_int32;
  args.ignore_index = ignore_index;
  args.inv_temperature = inv_temperature;
  args.logprobs = as_ptr<float>(logprobs);
  args.logsumexp = as_ptr<float>(logsumexp);
  args.entropy = as_ptr<float>(entropy);
  args.ref_logprobs = as_ptr<const float>(ref_logprobs);
  args.kl = to_kl_estimator(kl);
  args.kl_values = as_ptr<float>(kl_values);
  return args;
}

BackwardArgs make_backward_args(std::uintptr_t logits, int dtype, int64_t rows, int64_t vocab, int64_t rows_per_group,
                                int64_t group_stride, int64_t row_stride, std::uintptr_t labels, bool labels_int32,
                                int64_t ignore_index, float inv_temperature, std::uintptr_t logsumexp,
                                std::uintptr_t entropy, std::uintptr_t grad_logprobs, std::uintptr_t grad_entropy,
                                std::uintptr_t grad_logits) {
  BackwardArgs args;
  args.logits = as_ptr<const void>(logits);
  args.logits_dtype = stema::to_dtype(dtype);
  args.layout = make_layout(rows, vocab, rows_per_group, group_stride, row_stride);
  args.labels = as_ptr<const void>(labels);
  args.labels_are_int32 = labels_int32;
  args.ignore_index = ignore_index;
  args.inv_temperature = inv_temperature;
  args.logsumexp = as_ptr<const float>(logsumexp);
  args.entropy = as_ptr<const float>(entropy);
  args.grad_logprobs = as_ptr<const float>(grad_logprobs);
  args.grad_entropy = as_ptr<const float>(grad_entropy);
  args.grad_logits = as_ptr<void>(grad_logits);
  return args;
}

// Keyword names shared by the CPU and CUDA bindings of each pass.
#define STEMA_LOGPROBS_LAYOUT_ARGS                                                                     \
  py::arg("logits"), py::arg("dtype"), py::arg("rows"), py::arg("vocab"), py::arg("rows_per_group"), \
      py::arg("group_stride"), py::arg("row_stride"), py::arg("labels"), py::arg("labels_int32"),    \
      py::arg("ignore_index"), py::arg("inv_temperature")
#define STEMA_LOGPROBS_FORWARD_ARGS                                                                   \
  STEMA_LOGPROBS_LAYOUT_ARGS, py::arg("logprobs"), py::arg("logsumexp"), py::arg("entropy"),          \
      py::arg("ref_logprobs"), py::arg("kl"), py::arg("kl_values")
#define STEMA_LOGPROBS_BACKWARD_ARGS                                                             \
  STEMA_LOGPROBS_LAYOUT_ARGS, py::arg("logsumexp"), py::arg("entropy"), py::arg("grad_logprobs"), \
      py::arg("grad_entropy"), py::arg("grad_logits")

}  // namespace

STEMA_REGISTER_BINDINGS(m) {
  m.def(
      "logprobs_forward_cpu",
      [](std::uintptr_t logits, int dtype, int64_t rows, int64_t vocab, int64_t rows_per_group, int64_t group_stride,
         int64_t row_stride, std::uintptr_t labels, bool labels_int32, int64_t ignore_index, float inv_temperature,
         std::uintptr_t logprobs, std::uintptr_t logsumexp, std::uintptr_t entropy, std::uintptr_t ref_logprobs,
         int kl, std::uintptr_t kl_values) {
        forward_cpu(make_forward_args(logits, dtype, rows, vocab, rows_per_group, group_stride, row_stride, labels,
                                      labels_int32, ignore_index, inv_temperature, logprobs, logsumexp, entropy,
                                      ref_logprobs, kl, kl_values));
      },
      "Per-row log p(label), logsumexp and optionally entropy and KL of [rows, vocab] logits (CPU).",
      STEMA_LOGPROBS_FORWARD_ARGS, py::call_guard<py::gil_scoped_release>());
  m.def(
      "logprobs_backward_cpu",
      [](std::uintptr_t logits, int dtype, int64_t rows, int64_t vocab, int64_t rows_per_group, int64_t group_stride,
         int64_t row_stride, std::uintptr_t labels, bool labels_int32, int64_t ignore_index, float inv_temperature,
         std::uintptr_t logsumexp, std::uintptr_t entropy, std::uintptr_t grad_logprobs, std::uintptr_t grad_entropy,
         std::uintptr_t grad_logits) {
        backward_cpu(make_backward_args(logits, dtype, rows, vocab, rows_per_group, group_stride, row_stride, labels,
                                        labels_int32, ignore_index, inv_temperature, logsumexp, entropy,
                                        grad_logprobs, grad_entropy, grad_logits));
      },
      "Gradient of the log-probs (and entropy) w.r.t. the logits, written as contiguous [rows, vocab] (CPU).",
      STEMA_LOGPROBS_BACKWARD_ARGS, py::call_guard<py::gil_scoped_release>());
#if defined(STEMA_WITH_CUDA)
  m.def(
      "logprobs_forward_cuda",
      [](std::uintptr_t logits, int dtype, int64_t rows, int64_t vocab, int64_t rows_per_group, int64_t group_stride,
         int64_t row_stride, std::uintptr_t labels, bool labels_int32, int64_t ignore_index, float inv_temperature,
         std::uintptr_t logprobs, std::uintptr_t logsumexp, std::uintptr_t entropy, std::uintptr_t ref_logprobs,
         int kl, std::uintptr_t kl_values, std::uintptr_t stream) {
        forward_cuda(make_forward_args(logits, dtype, rows, vocab, rows_per_group, group_stride, row_stride, labels,
                                       labels_int32, ignore_index, inv_temperature, logprobs, logsumexp, entropy,
                                       ref_logprobs, kl, kl_values),
                     as_ptr<void>(stream));
      },
      "CUDA forward on `stream`; an out-of-range label gives NaN outputs on its row (no host sync).",
      STEMA_LOGPROBS_FORWARD_ARGS, py::arg("stream"), py::call_guard<py::gil_scoped_release>());
  m.def(
      "logprobs_backward_cuda",
      [](std::uintptr_t logits, int dtype, int64_t rows, int64_t vocab, int64_t rows_per_group, int64_t group_stride,
         int64_t row_stride, std::uintptr_t labels, bool labels_int32, int64_t ignore_index, float inv_temperature,
         std::uintptr_t logsumexp, std::uintptr_t entropy, std::uintptr_t grad_logprobs, std::uintptr_t grad_entropy,
         std::uintptr_t grad_logits, std::uintptr_t stream) {
        backward_cuda(make_backward_args(logits, dtype, rows, vocab, rows_per_group, group_stride, row_stride, labels,
                                         labels_int32, ignore_index, inv_temperature, logsumexp, entropy,
                                         grad_logprobs, grad_entropy, grad_logits),
                      as_ptr<void>(stream));
      },
      "CUDA backward on `stream`; an out-of-range label gives a NaN gradient row.",
      STEMA_LOGPROBS_BACKWARD_ARGS, py::arg("stream"), py::call_guard<py::gil_scoped_release>());
#endif
}
