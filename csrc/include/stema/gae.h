// Generalized advantage estimation and discounted returns: one reverse scan per sequence.
//
// Both are masked reverse linear recurrences over the valid positions t of each row of a
// [batch, length] batch (masked positions are skipped and produce 0):
//   GAE (Schulman et al. 2016, https://arxiv.org/abs/1506.02438), V after the last valid token 0:
//     delta_t = r_t + gamma * V_next(t) - V_t
//     A_t = delta_t + (gamma * lam) * A_next(t)
//     returns_t = A_t + V_t
//   discounted returns (REINFORCE): G_t = r_t + gamma * G_next(t)
// python/stema_kernels/reference.py (gae, discounted_returns) is the specification. Arithmetic is
// fp32 in the reference's order: gamma and gamma * lam are formed in double and rounded to float
// once, as torch does with a Python-float scalar.
#pragma once

#include <cstdint>

#include "stema/common.h"

namespace stema::gae {

// A [batch, length] input with unit column stride and `row_stride` elements between rows (a row
// stride of 0 broadcasts one row). dtype: fp32, fp16 or bf16.
struct StridedRows {
  const void* data;
  DType dtype;
  int64_t row_stride;
};

// A [batch, length] mask of bytes (torch.bool, uint8 or int8): nonzero marks a valid token.
struct MaskRows {
  const uint8_t* data;
  int64_t row_stride;
};

struct GaeArgs {
  int64_t batch;
  int64_t length;
  StridedRows rewards;
  StridedRows values;
  MaskRows mask;
  double gamma;       // discount, in [0, 1]
  double lam;         // GAE lambda, in [0, 1]
  float* advantages;  // output, contiguous [batch, length] fp32
  float* returns;     // output, contiguous [batch, length] fp32
};

struct DiscountedReturnsArgs {
  int64_t batch;
  int64_t length;
  StridedRows rewards;
  MaskRows mask;
  double gamma;    // discount, in [0, 1]
  float* returns;  // output, contiguous [batch, length] fp32
};

// Throw std::invalid_argument (STEMA_CHECK) on negative sizes or strides, an input dtype other
// than fp32, fp16 or bf16, gamma or lam outside [0, 1] or not finite, or a null pointer where
// there is work to do.
void check_args(const GaeArgs& args);
void check_args(const DiscountedReturnsArgs& args);

// CPU: rows in parallel (OpenMP), one sequential reverse scan per row.
void gae_cpu(const GaeArgs& args);
void discounted_returns_cpu(const DiscountedReturnsArgs& args);

// CUDA, on `stream` (a cudaStream_t) of the current device: a thread per row for short rows, a
// warp per row scanning chunks of the row for long ones. Defined only in CUDA builds.
void gae_cuda(const GaeArgs& args, void* stream);
void discounted_returns_cuda(const DiscountedReturnsArgs& args, void* stream);

}  // namespace stema::gae
