// Fused token log-probs, entropy and KL over [rows, vocab] logits (torch-free).
//
// For each row r with label y = labels[r] and z = logits[r, :] * inv_temperature (fp32):
//   lse      = logsumexp(z)                 (one pass, online max / sum-exp)
//   logprob  = z[y] - lse
//   entropy  = lse - sum_v softmax(z)_v * z_v      (terms with z_v = -inf contribute 0)
//   kl       = k1 | k2 | k3 of log_ratio = logprob - ref_logprobs[r]  (Schulman's estimators)
// Rows whose label equals ignore_index give 0 in every output and a zero gradient row.
// Backward, per row, in one pass that recomputes p = exp(z - lse):
//   dL/dlogits_j = inv_temperature * (g_logprob * (onehot_j - p_j) - g_entropy * p_j * (log p_j + H))
//
// The kernels read logits in place: row r starts at element
//   (r / rows_per_group) * group_stride + (r % rows_per_group) * row_stride
// so that views such as logits[:, :-1] (of [B, T, V] or [N, V + 1]) need no copy; the vocabulary
// dimension itself must be contiguous.
#pragma once

#include <cstdint>

#include "stema/common.h"

namespace stema::logprobs {

// Which KL estimator the forward pass writes in its epilogue (codes shared with logprobs.py).
enum class KlEstimator : int {
  kNone = 0,
  kK1 = 1,  // log_ratio
  kK2 = 2,  // log_ratio^2 / 2
  kK3 = 3,  // expm1(-log_ratio) + log_ratio
};

KlEstimator to_kl_estimator(int code);

// Where each row of the logits lives (element offsets, see the file comment).
struct RowLayout {
  int64_t rows = 0;
  int64_t vocab = 0;
  int64_t rows_per_group = 1;
  int64_t group_stride = 0;
  int64_t row_stride = 0;

  int64_t row_offset(int64_t row) const {
    return (row / rows_per_group) * group_stride + (row % rows_per_group) * row_stride;
  }
};

struct ForwardArgs {
  const void* logits = nullptr;
  DType logits_dtype = DType::kFloat32;
  RowLayout layout;
  const void* labels = nullptr;  // [rows], int64 or int32 (labels_are_int32)
  bool labels_are_int32 = false;
  int64_t ignore_index = -100;
  float inv_temperature = 1.0f;
  float* logprobs = nullptr;           // [rows] out
  float* logsumexp = nullptr;          // [rows] out, saved for the backward pass
  float* entropy = nullptr;            // [rows] out, or null: entropy not computed
  const float* ref_logprobs = nullptr; // [rows] in, needed when kl != kNone
  KlEstimator kl = KlEstimator::kNone;
  float* kl_values = nullptr;          // [rows] out when kl != kNone
};

struct BackwardArgs {
  const void* logits = nullptr;
  DType logits_dtype = DType::kFloat32;
  RowLayout layout;
  const void* labels = nullptr;
  bool labels_are_int32 = false;
  int64_t ignore_index = -100;
  float inv_temperature = 1.0f;
  const float* logsumexp = nullptr;       // [rows], from the forward pass
  const float* entropy = nullptr;         // [rows], needed when grad_entropy is given
  const float* grad_logprobs = nullptr;   // [rows]
  const float* grad_entropy = nullptr;    // [rows], or null: no entropy term
  void* grad_logits = nullptr;            // contiguous [rows, vocab] out, in logits_dtype
};

// Argument checks shared by the CPU and CUDA entry points (std::invalid_argument on failure).
void check_forward_args(const ForwardArgs& args);
void check_backward_args(const BackwardArgs& args);

// CPU (OpenMP over rows). Throws std::invalid_argument for a label outside [0, vocab) that is not
// ignore_index, before writing anything.
void forward_cpu(const ForwardArgs& args);
void backward_cpu(const BackwardArgs& args);

// CUDA, asynchronous on `stream` (a cudaStream_t). A label outside [0, vocab) that is not
// ignore_index cannot be reported without a host sync: its row gets NaN in every forward output
// and a NaN gradient row.
void forward_cuda(const ForwardArgs& args, void* stream);
void backward_cuda(const BackwardArgs& args, void* stream);

}  // namespace stema::logprobs
