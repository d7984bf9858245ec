// CUDA kernels for fused token log-probs / entropy / KL (see stema/logprobs.h for the math).
//
// One row per block of kBlockThreads threads (or per warp when the vocabulary is small). Each
// thread keeps an online-softmax triple (max, sum exp, sum exp * shift) over the values it reads
// with 16-byte loads (after a scalar head up to 16-byte alignment, so any row stride works); the
// triples are merged with warp shuffles and, across warps, through shared memory. exp uses expf
// (full-precision; no fast-math intrinsics), and a running max of -inf is never used to rescale, so
// fully masked (-inf) stretches give exp(...) = 0 instead of NaN.
//
// Out-of-range labels (not ignore_index) cannot be reported without a host sync: such rows get NaN
// in every forward output and a NaN gradient row.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <sstream>
#include <stdexcept>

#include "stema/logprobs.h"

namespace stema::logprobs {
namespace {

constexpr int kBlockThreads = 256;
constexpr int kWarpSize = 32;
constexpr int kWarpsPerBlock = kBlockThreads / kWarpSize;
constexpr int kUnroll = 4;                   // 16-byte loads in flight per thread
constexpr int64_t kWarpRowMaxVocab = 4096;   // up to this vocabulary, one warp per row
constexpr int64_t kMaxBlocks = 1 << 20;      // rows beyond grid * rows-per-block loop (grid stride)
constexpr unsigned kFullMask = 0xffffffffu;

__device__ __forceinline__ float negative_infinity() { return -INFINITY; }

// ---- dtypes: scalar conversion and 16-byte vectors (uint4) of 4 or 8 values ----

template <DType D> struct CudaLogit;
template <> struct CudaLogit<DType::kFloat32> {
  using storage = float;
  static constexpr int kPerVector = 4;
  __device__ static float to_float(storage value) { return value; }
  __device__ static storage from_float(float value) { return value; }
  __device__ static void unpack(const uint4& raw, float (&out)[kPerVector]) {
    out[0] = __uint_as_float(raw.x);
    out[1] = __uint_as_float(raw.y);
    out[2] = __uint_as_float(raw.z);
    out[3] = __uint_as_float(raw.w);
  }
  __device__ static uint4 pack(const float (&in)[kPerVector]) {
    return make_uint4(__float_as_uint(in[0]), __float_as_uint(in[1]), __float_as_uint(in[2]), __float_as_uint(in[3]));
  }
};

__device__ __forceinline__ float2 pair_to_float2(__nv_bfloat162 pair) { return __bfloat1622float2(pair); }
__device__ __forceinline__ float2 pair_to_float2(__half2 pair) { return __half22float2(pair); }
__device__ __forceinline__ void float2_to_pair(float2 values, __nv_bfloat162& pair) { pair = __float22bfloat162_rn(values); }
__device__ __forceinline__ void float2_to_pair(float2 values, __half2& pair) { pair = __float22half2_rn(values); }

// 16-byte vectors of eight 16-bit floats, converted two at a time.
template <typename Pair>
struct PackedPairs {
  static constexpr int kPerVector = 8;
  __device__ static void unpack(const uint4& raw, float (&out)[kPerVector]) {
    const unsigned words[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      Pair pair;
      memcpy(&pair, &words[k], sizeof(pair));
      const float2 values = pair_to_float2(pair);
      out[2 * k] = values.x;
      out[2 * k + 1] = values.y;
    }
  }
  __device__ static uint4 pack(const float (&in)[kPerVector]) {
    unsigned words[4];
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      Pair pair;
      float2_to_pair(make_float2(in[2 * k], in[2 * k + 1]), pair);
      memcpy(&words[k], &pair, sizeof(pair));
    }
    return make_uint4(words[0], words[1], words[2], words[3]);
  }
};

template <>
struct CudaLogit<DType::kBFloat16> : PackedPairs<__nv_bfloat162> {
  using storage = __nv_bfloat16;
  __device__ static float to_float(storage value) { return __bfloat162float(value); }
  __device__ static storage from_float(float value) { return __float2bfloat16_rn(value); }
};
template <>
struct CudaLogit<DType::kFloat16> : PackedPairs<__half2> {
  using storage = __half;
  __device__ static float to_float(storage value) { return __half2float(value); }
  __device__ static storage from_float(float value) { return __float2half_rn(value); }
};

// ---- online softmax statistics ----

// Relative to the running max: sum_exp = sum exp(z - max), sum_exp_shift = sum exp(z - max) * (z - max)
// (z = -inf terms left out). lse = max + log(sum_exp); entropy = log(sum_exp) - sum_exp_shift / sum_exp.
struct OnlineStats {
  float max;
  float sum_exp;
  float sum_exp_shift;
};

__device__ __forceinline__ OnlineStats empty_stats() { return {negative_infinity(), 0.0f, 0.0f}; }

// Rescales `stats` to a new max >= stats.max; an empty state (max = -inf) just takes the new max.
__device__ __forceinline__ void raise_max(OnlineStats& stats, float new_max) {
  if (stats.max != negative_infinity()) {
    const float shift = stats.max - new_max;
    const float scale = expf(shift);
    stats.sum_exp_shift = scale * (stats.sum_exp_shift + shift * stats.sum_exp);
    stats.sum_exp *= scale;
  }
  stats.max = new_max;
}

template <bool kWithEntropy, int N>
__device__ __forceinline__ void accumulate(OnlineStats& stats, const float (&z)[N]) {
  float values_max = stats.max;
#pragma unroll
  for (int k = 0; k < N; ++k) values_max = fmaxf(values_max, z[k]);
  if (values_max > stats.max) raise_max(stats, values_max);
  if (stats.max == negative_infinity()) return;  // everything so far is -inf
#pragma unroll
  for (int k = 0; k < N; ++k) {
    const float shift = z[k] - stats.max;
    const float e = expf(shift);
    stats.sum_exp += e;
    // e = 0 where shift = -inf: select the shift, not the product (0 * -inf = NaN).
    if (kWithEntropy) stats.sum_exp_shift += (e > 0.0f ? shift : 0.0f) * e;
  }
}

__device__ __forceinline__ OnlineStats merge(OnlineStats a, OnlineStats b) {
  const float new_max = fmaxf(a.max, b.max);
  if (new_max == negative_infinity()) return a;  // both empty
  raise_max(a, new_max);
  raise_max(b, new_max);
  return {new_max, a.sum_exp + b.sum_exp, a.sum_exp_shift + b.sum_exp_shift};
}

__device__ __forceinline__ OnlineStats warp_merge(OnlineStats stats) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    OnlineStats other;
    other.max = __shfl_xor_sync(kFullMask, stats.max, offset);
    other.sum_exp = __shfl_xor_sync(kFullMask, stats.sum_exp, offset);
    other.sum_exp_shift = __shfl_xor_sync(kFullMask, stats.sum_exp_shift, offset);
    stats = merge(stats, other);
  }
  return stats;
}

// Merges the statistics of the kWarpsPerRow warps that share a row; the result is valid in the
// row's first thread. Called by every thread of the block when kWarpsPerRow > 1.
template <int kWarpsPerRow>
__device__ __forceinline__ OnlineStats row_merge(OnlineStats stats, OnlineStats* warp_stats) {
  stats = warp_merge(stats);
  if constexpr (kWarpsPerRow > 1) {
    const int warp = threadIdx.x / kWarpSize;
    const int lane = threadIdx.x % kWarpSize;
    if (lane == 0) warp_stats[warp] = stats;
    __syncthreads();
    if (warp == 0) {
      stats = lane < kWarpsPerRow ? warp_stats[lane] : empty_stats();
      stats = warp_merge(stats);
    }
    __syncthreads();  // warp_stats is reused by the next row
  }
  return stats;
}

// ---- per-row traversal: scalar head to 16-byte alignment, unrolled vector body, scalar tail ----

template <DType D>
__device__ __forceinline__ int64_t elements_to_alignment(const typename CudaLogit<D>::storage* pointer,
                                                         int64_t vocab) {
  using storage = typename CudaLogit<D>::storage;
  const auto misalignment = static_cast<int64_t>(reinterpret_cast<uintptr_t>(pointer) % 16);
  const int64_t head = misalignment == 0 ? 0 : (16 - misalignment) / static_cast<int64_t>(sizeof(storage));
  return head < vocab ? head : vocab;
}

template <DType D, int kRowThreads, bool kWithEntropy>
__device__ OnlineStats summarize_row(const typename CudaLogit<D>::storage* row, int64_t vocab,
                                     float inv_temperature, int thread) {
  using Logit = CudaLogit<D>;
  constexpr int kPerVector = Logit::kPerVector;
  OnlineStats stats = empty_stats();
  const int64_t head = elements_to_alignment<D>(row, vocab);
  for (int64_t i = thread; i < head; i += kRowThreads) {
    const float z[1] = {Logit::to_float(row[i]) * inv_temperature};
    accumulate<kWithEntropy>(stats, z);
  }
  const int64_t vectors = (vocab - head) / kPerVector;
  const uint4* body = reinterpret_cast<const uint4*>(row + head);
  int64_t v = thread;
  for (; v + (kUnroll - 1) * kRowThreads < vectors; v += kUnroll * kRowThreads) {
    uint4 raw[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) raw[u] = __ldg(body + v + u * kRowThreads);
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      float z[kPerVector];
      Logit::unpack(raw[u], z);
#pragma unroll
      for (int k = 0; k < kPerVector; ++k) z[k] *= inv_temperature;
      accumulate<kWithEntropy>(stats, z);
    }
  }
  for (; v < vectors; v += kRowThreads) {
    float z[kPerVector];
    Logit::unpack(__ldg(body + v), z);
#pragma unroll
    for (int k = 0; k < kPerVector; ++k) z[k] *= inv_temperature;
    accumulate<kWithEntropy>(stats, z);
  }
  for (int64_t i = head + vectors * kPerVector + thread; i < vocab; i += kRowThreads) {
    const float z[1] = {Logit::to_float(row[i]) * inv_temperature};
    accumulate<kWithEntropy>(stats, z);
  }
  return stats;
}

__device__ __forceinline__ int64_t row_offset(const RowLayout& layout, int64_t row) {
  return (row / layout.rows_per_group) * layout.group_stride + (row % layout.rows_per_group) * layout.row_stride;
}

__device__ __forceinline__ float kl_estimate(KlEstimator kl, float log_ratio) {
  switch (kl) {
    case KlEstimator::kK1: return log_ratio;
    case KlEstimator::kK2: return 0.5f * (log_ratio * log_ratio);
    case KlEstimator::kK3: return expm1f(-log_ratio) + log_ratio;
    case KlEstimator::kNone: break;
  }
  return 0.0f;
}

// Rows are spread over row groups (a warp or the whole block), grid-stride.
template <int kWarpsPerRow>
struct RowGroups {
  static constexpr int kRowThreads = kWarpsPerRow * kWarpSize;
  static constexpr int kRowsPerBlock = kBlockThreads / kRowThreads;
  __device__ static int thread() { return threadIdx.x % kRowThreads; }
  __device__ static int64_t first_row() {
    return static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.x / kRowThreads;
  }
  __device__ static int64_t row_step() { return static_cast<int64_t>(gridDim.x) * kRowsPerBlock; }
};

template <DType D, typename Label, int kWarpsPerRow, bool kWithEntropy>
__global__ void __launch_bounds__(kBlockThreads) forward_kernel(ForwardArgs args) {
  using Logit = CudaLogit<D>;
  using Groups = RowGroups<kWarpsPerRow>;
  __shared__ OnlineStats warp_stats[kWarpsPerBlock];
  const auto* logits = static_cast<const typename Logit::storage*>(args.logits);
  const auto* labels = static_cast<const Label*>(args.labels);
  const int thread = Groups::thread();
  for (int64_t row = Groups::first_row(); row < args.layout.rows; row += Groups::row_step()) {
    const int64_t label = static_cast<int64_t>(labels[row]);
    const bool ignored = label == args.ignore_index;
    const bool in_range = label >= 0 && label < args.layout.vocab;
    if (ignored || !in_range) {  // the same for every thread of the row group
      if (thread == 0) {
        const float value = ignored ? 0.0f : NAN;
        args.logprobs[row] = value;
        args.logsumexp[row] = value;
        if (kWithEntropy) args.entropy[row] = value;
        if (args.kl != KlEstimator::kNone) args.kl_values[row] = value;
      }
      continue;
    }
    const auto* row_logits = logits + row_offset(args.layout, row);
    OnlineStats stats =
        summarize_row<D, Groups::kRowThreads, kWithEntropy>(row_logits, args.layout.vocab, args.inv_temperature, thread);
    stats = row_merge<kWarpsPerRow>(stats, warp_stats);
    if (thread == 0) {
      const float log_sum_exp = logf(stats.sum_exp);
      const float logsumexp = stats.max + log_sum_exp;
      const float logprob = Logit::to_float(row_logits[label]) * args.inv_temperature - logsumexp;
      args.logprobs[row] = logprob;
      args.logsumexp[row] = logsumexp;
      if (kWithEntropy) args.entropy[row] = log_sum_exp - stats.sum_exp_shift / stats.sum_exp;
      if (args.kl != KlEstimator::kNone) {
        args.kl_values[row] = kl_estimate(args.kl, logprob - args.ref_logprobs[row]);
      }
    }
  }
}

// Gradient of one value: inv_temperature * (g_logprob * (onehot - p) - g_entropy * p * (log p + H)),
// with the inv_temperature already folded into the two scaled grads.
struct GradientTerms {
  float logsumexp;
  float entropy;
  float scaled_grad_logprob;
  float scaled_grad_entropy;
  float inv_temperature;
};

template <bool kWithEntropy>
__device__ __forceinline__ float value_gradient(const GradientTerms& terms, float logit, bool is_label) {
  const float log_p = logit * terms.inv_temperature - terms.logsumexp;
  const float p = expf(log_p);
  float gradient = terms.scaled_grad_logprob * ((is_label ? 1.0f : 0.0f) - p);
  // p = 0 (z = -inf) contributes nothing; log p would make 0 * -inf = NaN.
  if (kWithEntropy) gradient -= (p > 0.0f ? log_p + terms.entropy : 0.0f) * p * terms.scaled_grad_entropy;
  return gradient;
}

template <DType D, int kRowThreads, bool kWithEntropy>
__device__ void gradient_row(const typename CudaLogit<D>::storage* row, typename CudaLogit<D>::storage* grad_row,
                             int64_t vocab, int64_t label, const GradientTerms& terms, int thread) {
  using Logit = CudaLogit<D>;
  constexpr int kPerVector = Logit::kPerVector;
  const int64_t head = elements_to_alignment<D>(row, vocab);
  // 16-byte loads and stores need the input and output rows equally misaligned; else all scalar.
  const bool vectorize = head == elements_to_alignment<D>(grad_row, vocab);
  const int64_t scalar_end = vectorize ? head : vocab;
  for (int64_t i = thread; i < scalar_end; i += kRowThreads) {
    grad_row[i] = Logit::from_float(value_gradient<kWithEntropy>(terms, Logit::to_float(row[i]), i == label));
  }
  if (!vectorize) return;
  const int64_t vectors = (vocab - head) / kPerVector;
  const uint4* body = reinterpret_cast<const uint4*>(row + head);
  uint4* grad_body = reinterpret_cast<uint4*>(grad_row + head);
  for (int64_t v = thread; v < vectors; v += kRowThreads) {
    float values[kPerVector];
    Logit::unpack(__ldg(body + v), values);
    const int64_t first = head + v * kPerVector;
#pragma unroll
    for (int k = 0; k < kPerVector; ++k) values[k] = value_gradient<kWithEntropy>(terms, values[k], first + k == label);
    grad_body[v] = Logit::pack(values);
  }
  for (int64_t i = head + vectors * kPerVector + thread; i < vocab; i += kRowThreads) {
    grad_row[i] = Logit::from_float(value_gradient<kWithEntropy>(terms, Logit::to_float(row[i]), i == label));
  }
}

template <DType D, typename Label, int kWarpsPerRow, bool kWithEntropy>
__global__ void __launch_bounds__(kBlockThreads) backward_kernel(BackwardArgs args) {
  using Logit = CudaLogit<D>;
  using Groups = RowGroups<kWarpsPerRow>;
  const auto* logits = static_cast<const typename Logit::storage*>(args.logits);
  auto* grad_logits = static_cast<typename Logit::storage*>(args.grad_logits);
  const auto* labels = static_cast<const Label*>(args.labels);
  const int thread = Groups::thread();
  const int64_t vocab = args.layout.vocab;
  for (int64_t row = Groups::first_row(); row < args.layout.rows; row += Groups::row_step()) {
    const int64_t label = static_cast<int64_t>(labels[row]);
    auto* grad_row = grad_logits + row * vocab;
    if (label == args.ignore_index || label < 0 || label >= vocab) {
      const auto fill = Logit::from_float(label == args.ignore_index ? 0.0f : NAN);
      for (int64_t i = thread; i < vocab; i += Groups::kRowThreads) grad_row[i] = fill;
      continue;
    }
    GradientTerms terms;
    terms.logsumexp = args.logsumexp[row];
    terms.entropy = kWithEntropy ? args.entropy[row] : 0.0f;
    terms.scaled_grad_logprob = args.grad_logprobs[row] * args.inv_temperature;
    terms.scaled_grad_entropy = kWithEntropy ? args.grad_entropy[row] * args.inv_temperature : 0.0f;
    terms.inv_temperature = args.inv_temperature;
    gradient_row<D, Groups::kRowThreads, kWithEntropy>(logits + row_offset(args.layout, row), grad_row, vocab, label,
                                                       terms, thread);
  }
}

void check_launch(const char* what) {
  const cudaError_t error = cudaGetLastError();
  if (error != cudaSuccess) {
    std::ostringstream message;
    message << "stema: logprobs " << what << " kernel launch failed: " << cudaGetErrorString(error);
    throw std::runtime_error(message.str());
  }
}

template <int kWarpsPerRow>
unsigned grid_blocks(int64_t rows) {
  constexpr int64_t rows_per_block = RowGroups<kWarpsPerRow>::kRowsPerBlock;
  const int64_t blocks = (rows + rows_per_block - 1) / rows_per_block;
  return static_cast<unsigned>(blocks < kMaxBlocks ? blocks : kMaxBlocks);
}

// Calls fn(dtype tag, label type tag, entropy flag) with compile-time values for the runtime ones.
template <typename Fn>
void dispatch_kernel(DType dtype, bool labels_are_int32, bool with_entropy, Fn&& fn) {
  auto with_label = [&](auto dtype_tag) {
    auto with_flag = [&](auto label_tag) {
      if (with_entropy) {
        fn(dtype_tag, label_tag, std::true_type{});
      } else {
        fn(dtype_tag, label_tag, std::false_type{});
      }
    };
    if (labels_are_int32) {
      with_flag(static_cast<int32_t*>(nullptr));
    } else {
      with_flag(static_cast<int64_t*>(nullptr));
    }
  };
  switch (dtype) {
    case DType::kFloat32: return with_label(DTypeTag<DType::kFloat32>{});
    case DType::kFloat16: return with_label(DTypeTag<DType::kFloat16>{});
    case DType::kBFloat16: return with_label(DTypeTag<DType::kBFloat16>{});
    case DType::kFloat64: break;
  }
  throw std::invalid_argument("stema: logprobs CUDA kernels take float32, float16 or bfloat16 logits");
}

}  // namespace

void forward_cuda(const ForwardArgs& args, void* stream) {
  check_forward_args(args);
  if (args.layout.rows == 0) return;
  const auto cuda_stream = static_cast<cudaStream_t>(stream);
  dispatch_kernel(args.logits_dtype, args.labels_are_int32, args.entropy != nullptr,
                  [&](auto dtype_tag, auto* label_tag, auto with_entropy) {
                    constexpr DType D = decltype(dtype_tag)::value;
                    using Label = std::remove_pointer_t<decltype(label_tag)>;
                    constexpr bool kWithEntropy = decltype(with_entropy)::value;
                    if (args.layout.vocab <= kWarpRowMaxVocab) {
                      forward_kernel<D, Label, 1, kWithEntropy>
                          <<<grid_blocks<1>(args.layout.rows), kBlockThreads, 0, cuda_stream>>>(args);
                    } else {
                      forward_kernel<D, Label, kWarpsPerBlock, kWithEntropy>
                          <<<grid_blocks<kWarpsPerBlock>(args.layout.rows), kBlockThreads, 0, cuda_stream>>>(args);
                    }
                  });
  check_launch("forward");
}

void backward_cuda(const BackwardArgs& args, void* stream) {
  check_backward_args(args);
  if (args.layout.rows == 0) return;
  const auto cuda_stream = static_cast<cudaStream_t>(stream);
  dispatch_kernel(args.logits_dtype, args.labels_are_int32, args.grad_entropy != nullptr,
                  [&](auto dtype_tag, auto* label_tag, auto with_entropy) {
                    constexpr DType D = decltype(dtype_tag)::value;
                    using Label = std::remove_pointer_t<decltype(label_tag)>;
                    constexpr bool kWithEntropy = decltype(with_entropy)::value;
                    if (args.layout.vocab <= kWarpRowMaxVocab) {
                      backward_kernel<D, Label, 1, kWithEntropy>
                          <<<grid_blocks<1>(args.layout.rows), kBlockThreads, 0, cuda_stream>>>(args);
                    } else {
                      backward_kernel<D, Label, kWarpsPerBlock, kWithEntropy>
                          <<<grid_blocks<kWarpsPerBlock>(args.layout.rows), kBlockThreads, 0, cuda_stream>>>(args);
                    }
                  });
  check_launch("backward");
}

}  // namespace stema::logprobs
