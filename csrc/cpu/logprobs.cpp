// CPU kernels for fused token log-probs / entropy / KL (see stema/logprobs.h for the math).
//
// Rows are spread over OpenMP threads. Each row is read once, in chunks of kChunk values that stay
// in L1: a chunk is converted to fp32 and scaled by 1/temperature, its max is taken, the running
// (max, sum exp, sum exp * shift) triple is rescaled if the max grew, then the chunk's exp terms are
// added. Inner loops work on GCC/Clang vectors of kLanes floats (explicit lanes rather than
// auto-vectorization, which needs -ffast-math for reductions and gives up on the selects) with a
// branch-free exp; on x86-64 Linux with GCC the row functions are compiled for AVX-512, AVX2 and
// baseline x86-64 (target_clones) and the loader picks the best for the running CPU.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>

#include "stema/logprobs.h"

#if defined(__x86_64__) && defined(__linux__) && defined(__GNUC__) && !defined(__clang__)
#define STEMA_VECTOR_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define STEMA_VECTOR_CLONES
#endif

// The lane helpers pass 64-byte vectors by value; they are always inlined, so the ABI note GCC
// gives for such signatures in non-AVX code does not apply.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

namespace stema::logprobs {

KlEstimator to_kl_estimator(int code) {
  STEMA_CHECK(code >= 0 && code <= 3, "logprobs: unknown KL estimator code " << code << " (expected 0-3)");
  return static_cast<KlEstimator>(code);
}

namespace {

#define STEMA_INLINE inline __attribute__((always_inline))

constexpr int kLanes = 16;
constexpr int64_t kChunk = 1024;  // fp32 values per chunk: 4 KiB, a multiple of kLanes
// Below this many logits one thread is faster: waking a thread team costs more than the work.
constexpr int64_t kParallelMinElements = 1 << 18;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// ---- lanes: GCC/Clang vectors of 16 values (one AVX-512 register, two AVX2 or four SSE ones) ----
// Every helper below is written once for both `float` (row tails) and `FloatLanes` (row bodies),
// so the scalar and vector paths cannot disagree. Comparisons of lanes give lane masks and `?:`
// on them is a per-lane select, so nothing here branches per element.

using FloatLanes = float __attribute__((vector_size(kLanes * sizeof(float))));
using BitLanes = uint32_t __attribute__((vector_size(kLanes * sizeof(uint32_t))));
using HalfLanes = uint16_t __attribute__((vector_size(kLanes * sizeof(uint16_t))));

template <class F> struct LaneTypes;
template <> struct LaneTypes<float> {
  using Bits = uint32_t;
  using Half = uint16_t;
};
template <> struct LaneTypes<FloatLanes> {
  using Bits = BitLanes;
  using Half = HalfLanes;
};
template <class F> using BitsOf = typename LaneTypes<F>::Bits;
template <class F> using HalfOf = typename LaneTypes<F>::Half;

template <class To, class From>
STEMA_INLINE To reinterpret_lanes(const From& from) {
  static_assert(sizeof(To) == sizeof(From), "reinterpret_lanes keeps the size");
  To to;
  std::memcpy(&to, &from, sizeof(to));
  return to;
}

template <class T, class Scalar>
STEMA_INLINE T splat(Scalar value) {
  return T{} + value;
}

STEMA_INLINE uint32_t widen(uint16_t half) { return half; }
STEMA_INLINE BitLanes widen(HalfLanes half) { return __builtin_convertvector(half, BitLanes); }
STEMA_INLINE uint16_t narrow(uint32_t bits) { return static_cast<uint16_t>(bits); }
STEMA_INLINE HalfLanes narrow(BitLanes bits) { return __builtin_convertvector(bits, HalfLanes); }

template <class T>
STEMA_INLINE T load_unaligned(const void* source) {
  T value;
  std::memcpy(&value, source, sizeof(value));
  return value;
}

template <class T>
STEMA_INLINE void store_unaligned(void* destination, const T& value) {
  std::memcpy(destination, &value, sizeof(value));
}

// exp(x) for x <= 88 with about 1 ulp of error (Cephes expf: 2^n * polynomial on
// |r| <= ln2 / 2). Results below 2^-126 (x < kMinExpArgument, -inf included) are 0 and NaN stays
// NaN. n is rounded with the 1.5 * 2^23 trick, so that its bits can be read from the float
// without a float-to-int conversion (undefined for NaN in C++).
template <class F>
STEMA_INLINE F exp_lanes(F x) {
  constexpr float kMinExpArgument = -87.3365447505f;  // log(2^-126)
  constexpr float kLog2e = 1.44269504088896341f;
  constexpr float kRoundMagic = 12582912.0f;  // 1.5 * 2^23
  constexpr float kLn2Hi = 0.693359375f;
  constexpr float kLn2Lo = -2.12194440e-4f;
  const F shifted = x * kLog2e + kRoundMagic;
  const F n = shifted - kRoundMagic;
  F r = x - n * kLn2Hi;
  r = r - n * kLn2Lo;
  F poly = splat<F>(1.9875691500e-4f);
  poly = poly * r + 1.3981999507e-3f;
  poly = poly * r + 8.3334519073e-3f;
  poly = poly * r + 4.1665795894e-2f;
  poly = poly * r + 1.6666665459e-1f;
  poly = poly * r + 5.0000001201e-1f;
  poly = poly * (r * r) + r + 1.0f;
  // n + 127 as the exponent field: n sits in the low mantissa bits of `shifted`.
  const BitsOf<F> exponent = reinterpret_lanes<BitsOf<F>>(shifted) - float_to_bits(kRoundMagic) + 127u;
  const F value = poly * reinterpret_lanes<F>(exponent << 23);
  return x < splat<F>(kMinExpArgument) ? splat<F>(0.0f) : value;
}

template <class F>
STEMA_INLINE F bf16_to_float_lanes(HalfOf<F> half) {
  return reinterpret_lanes<F>(widen(half) << 16);
}

// Same results as stema::fp16_to_float.
template <class F>
STEMA_INLINE F fp16_to_float_lanes(HalfOf<F> half) {
  using Bits = BitsOf<F>;
  const Bits wide = widen(half);
  const Bits magnitude_bits = (wide & 0x7fffu) << 13;
  const Bits exponent = magnitude_bits & 0x0f800000u;
  Bits rebiased = magnitude_bits + (112u << 23);
  rebiased = exponent == splat<Bits>(0x0f800000u) ? rebiased + (112u << 23) : rebiased;  // inf, NaN
  const F subnormal = reinterpret_lanes<F>(rebiased + (1u << 23)) - bits_to_float(113u << 23);
  const F magnitude = exponent == splat<Bits>(0u) ? subnormal : reinterpret_lanes<F>(rebiased);
  return reinterpret_lanes<F>(reinterpret_lanes<Bits>(magnitude) | ((wide & 0x8000u) << 16));
}

// Same results as stema::float_to_bf16 (round to nearest even, NaN stays quiet).
template <class F>
STEMA_INLINE HalfOf<F> float_to_bf16_lanes(F value) {
  using Bits = BitsOf<F>;
  const Bits bits = reinterpret_lanes<Bits>(value);
  const Bits rounded = (bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16;
  const Bits quiet_nan = (bits >> 16) | 0x0040u;
  return narrow((bits & 0x7fffffffu) > splat<Bits>(0x7f800000u) ? quiet_nan : rounded);
}

// Same results as stema::float_to_fp16 (round to nearest even).
template <class F>
STEMA_INLINE HalfOf<F> float_to_fp16_lanes(F value) {
  using Bits = BitsOf<F>;
  const Bits bits = reinterpret_lanes<Bits>(value);
  const Bits sign = (bits >> 16) & 0x8000u;
  const Bits abs_bits = bits & 0x7fffffffu;
  const Bits inf_or_nan = abs_bits > splat<Bits>(0x7f800000u) ? splat<Bits>(0x7e00u) : splat<Bits>(0x7c00u);
  // Subnormal halves: adding 0.5 aligns the 10 mantissa bits at the bottom (the FPU rounds).
  const F subnormal_aligned = reinterpret_lanes<F>(abs_bits) + 0.5f;
  const Bits subnormal = reinterpret_lanes<Bits>(subnormal_aligned) - float_to_bits(0.5f);
  const Bits normal = (abs_bits + static_cast<uint32_t>(-(112 << 23)) + 0xfffu + ((abs_bits >> 13) & 1u)) >> 13;
  Bits result = abs_bits < splat<Bits>(113u << 23) ? subnormal : normal;
  result = abs_bits >= splat<Bits>(0x477ff000u) ? inf_or_nan : result;
  return narrow(sign | result);
}

// Loads and stores of one value (F = float) or kLanes values (F = FloatLanes) of a logits dtype.
template <DType D> struct Logit;
template <> struct Logit<DType::kFloat32> {
  using storage = float;
  template <class F> STEMA_INLINE static F load(const float* source) { return load_unaligned<F>(source); }
  template <class F> STEMA_INLINE static void store(float* destination, F value) { store_unaligned(destination, value); }
};
template <> struct Logit<DType::kBFloat16> {
  using storage = uint16_t;
  template <class F> STEMA_INLINE static F load(const uint16_t* source) {
    return bf16_to_float_lanes<F>(load_unaligned<HalfOf<F>>(source));
  }
  template <class F> STEMA_INLINE static void store(uint16_t* destination, F value) {
    store_unaligned(destination, float_to_bf16_lanes(value));
  }
};
template <> struct Logit<DType::kFloat16> {
  using storage = uint16_t;
  template <class F> STEMA_INLINE static F load(const uint16_t* source) {
    return fp16_to_float_lanes<F>(load_unaligned<HalfOf<F>>(source));
  }
  template <class F> STEMA_INLINE static void store(uint16_t* destination, F value) {
    store_unaligned(destination, float_to_fp16_lanes(value));
  }
};

STEMA_INLINE float lanes_max(FloatLanes lanes) {
  float result = lanes[0];
  for (int j = 1; j < kLanes; ++j) result = lanes[j] > result ? lanes[j] : result;
  return result;
}

STEMA_INLINE float lanes_sum(FloatLanes lanes) {
  float result = 0.0f;
  for (int j = 0; j < kLanes; ++j) result += lanes[j];
  return result;
}

// ---- per-row work ----

// z[0, count) = logits * inv_temperature in fp32, then -inf up to a multiple of kLanes (padding
// that adds nothing to any sum). Returns the padded count.
template <DType D>
STEMA_INLINE int64_t load_scaled_chunk(const typename Logit<D>::storage* source, int64_t count,
                                       float inv_temperature, float* z) {
  int64_t i = 0;
  for (; i + kLanes <= count; i += kLanes) {
    store_unaligned(z + i, Logit<D>::template load<FloatLanes>(source + i) * inv_temperature);
  }
  for (; i < count; ++i) z[i] = Logit<D>::template load<float>(source + i) * inv_temperature;
  const int64_t padded = (count + kLanes - 1) / kLanes * kLanes;
  for (; i < padded; ++i) z[i] = kNegInf;
  return padded;
}

template <DType D>
STEMA_INLINE void store_chunk(const float* values, int64_t count, typename Logit<D>::storage* destination) {
  int64_t i = 0;
  for (; i + kLanes <= count; i += kLanes) {
    Logit<D>::store(destination + i, load_unaligned<FloatLanes>(values + i));
  }
  for (; i < count; ++i) Logit<D>::store(destination + i, values[i]);
}

// Online softmax state of one row, relative to its running max:
// sum_exp = sum_v exp(z_v - max), sum_exp_shift = sum_v exp(z_v - max) * (z_v - max)
// (terms with z_v = -inf left out). Then lse = max + log(sum_exp) and
// entropy = log(sum_exp) - sum_exp_shift / sum_exp.
struct RowSummary {
  float max = kNegInf;
  float sum_exp = 0.0f;
  float sum_exp_shift = 0.0f;
};

template <DType D, bool kWithEntropy>
STEMA_VECTOR_CLONES RowSummary summarize_row(const typename Logit<D>::storage* row, int64_t vocab,
                                             float inv_temperature) {
  alignas(64) float z[kChunk];
  RowSummary summary;
  for (int64_t start = 0; start < vocab; start += kChunk) {
    const int64_t padded = load_scaled_chunk<D>(row + start, std::min(kChunk, vocab - start), inv_temperature, z);

    FloatLanes lane_max = splat<FloatLanes>(kNegInf);
    for (int64_t i = 0; i < padded; i += kLanes) {
      const FloatLanes values = load_unaligned<FloatLanes>(z + i);
      lane_max = values > lane_max ? values : lane_max;
    }
    const float chunk_max = lanes_max(lane_max);
    if (chunk_max > summary.max) {
      if (summary.max != kNegInf) {  // exp(-inf - -inf) would be NaN; an empty sum needs no rescale
        const float shift = summary.max - chunk_max;
        const float scale = std::exp(shift);
        summary.sum_exp_shift = scale * (summary.sum_exp_shift + shift * summary.sum_exp);
        summary.sum_exp *= scale;
      }
      summary.max = chunk_max;
    }
    if (summary.max == kNegInf) continue;  // every value so far is -inf

    FloatLanes lane_sum = {};
    FloatLanes lane_shift_sum = {};
    for (int64_t i = 0; i < padded; i += kLanes) {
      const FloatLanes shift = load_unaligned<FloatLanes>(z + i) - summary.max;
      const FloatLanes e = exp_lanes(shift);
      lane_sum += e;
      // e = 0 where shift = -inf: select the shift, not the product (0 * -inf = NaN).
      if constexpr (kWithEntropy) lane_shift_sum += (e > 0.0f ? shift : splat<FloatLanes>(0.0f)) * e;
    }
    summary.sum_exp += lanes_sum(lane_sum);
    if constexpr (kWithEntropy) summary.sum_exp_shift += lanes_sum(lane_shift_sum);
  }
  return summary;
}

// grad_row[v] = inv_temperature * (g_logprob * (onehot_v - p_v) - g_entropy * p_v * (log p_v + H))
template <DType D, bool kWithEntropy>
STEMA_VECTOR_CLONES void gradient_row(const typename Logit<D>::storage* row, typename Logit<D>::storage* grad_row,
                                      int64_t vocab, int64_t label, float inv_temperature, float logsumexp,
                                      float entropy, float grad_logprob, float grad_entropy) {
  alignas(64) float grad[kChunk];
  const float scaled_grad_logprob = grad_logprob * inv_temperature;
  const float scaled_grad_entropy = grad_entropy * inv_temperature;
  for (int64_t start = 0; start < vocab; start += kChunk) {
    const int64_t count = std::min(kChunk, vocab - start);
    const int64_t padded = load_scaled_chunk<D>(row + start, count, inv_temperature, grad);
    for (int64_t i = 0; i < padded; i += kLanes) {
      const FloatLanes log_p = load_unaligned<FloatLanes>(grad + i) - logsumexp;
      const FloatLanes p = exp_lanes(log_p);
      FloatLanes value = -scaled_grad_logprob * p;
      // p = 0 (z = -inf) contributes nothing; log p would make 0 * -inf = NaN.
      if constexpr (kWithEntropy) {
        value -= (p > 0.0f ? log_p + entropy : splat<FloatLanes>(0.0f)) * p * scaled_grad_entropy;
      }
      store_unaligned(grad + i, value);
    }
    if (label >= start && label < start + count) grad[label - start] += scaled_grad_logprob;
    store_chunk<D>(grad, count, grad_row + start);
  }
}

float kl_estimate(KlEstimator kl, float log_ratio) {
  switch (kl) {
    case KlEstimator::kK1: return log_ratio;
    case KlEstimator::kK2: return 0.5f * (log_ratio * log_ratio);
    case KlEstimator::kK3: return std::expm1(-log_ratio) + log_ratio;
    case KlEstimator::kNone: break;
  }
  return 0.0f;
}

int64_t read_label(const void* labels, bool labels_are_int32, int64_t row) {
  if (labels_are_int32) return static_cast<const int32_t*>(labels)[row];
  return static_cast<const int64_t*>(labels)[row];
}

void check_layout(const RowLayout& layout) {
  STEMA_CHECK(layout.rows >= 0, "logprobs: rows must be >= 0, got " << layout.rows);
  STEMA_CHECK(layout.vocab > 0, "logprobs: the vocabulary size must be > 0, got " << layout.vocab);
  STEMA_CHECK(layout.rows_per_group > 0, "logprobs: rows_per_group must be > 0, got " << layout.rows_per_group);
}

void check_dtype(DType dtype) {
  STEMA_CHECK(dtype == DType::kFloat32 || dtype == DType::kFloat16 || dtype == DType::kBFloat16,
              "logprobs: logits must be float32, float16 or bfloat16, got " << dtype_name(dtype));
}

// Throws before any output is written, so that no exception has to leave an OpenMP region.
void check_labels_in_range(const void* labels, bool labels_are_int32, int64_t rows, int64_t vocab,
                           int64_t ignore_index) {
  for (int64_t row = 0; row < rows; ++row) {
    const int64_t label = read_label(labels, labels_are_int32, row);
    STEMA_CHECK(label == ignore_index || (label >= 0 && label < vocab),
                "logprobs: label " << label << " at position " << row << " is outside [0, " << vocab
                                   << ") and is not ignore_index (" << ignore_index << ")");
  }
}

template <DType D, bool kWithEntropy>
void forward_rows(const ForwardArgs& args) {
  using storage = typename Logit<D>::storage;
  const RowLayout& layout = args.layout;
  const auto* logits = static_cast<const storage*>(args.logits);
  [[maybe_unused]] const bool use_threads = layout.rows * layout.vocab >= kParallelMinElements;
#if defined(STEMA_WITH_OPENMP)
#pragma omp parallel for schedule(static) if (use_threads)
#endif
  for (int64_t row = 0; row < layout.rows; ++row) {
    const int64_t label = read_label(args.labels, args.labels_are_int32, row);
    float logprob = 0.0f, logsumexp = 0.0f, entropy = 0.0f, kl = 0.0f;
    if (label != args.ignore_index) {
      const storage* row_logits = logits + layout.row_offset(row);
      const RowSummary summary = summarize_row<D, kWithEntropy>(row_logits, layout.vocab, args.inv_temperature);
      const float log_sum_exp = std::log(summary.sum_exp);
      logsumexp = summary.max + log_sum_exp;
      logprob = Logit<D>::template load<float>(row_logits + label) * args.inv_temperature - logsumexp;
      entropy = log_sum_exp - summary.sum_exp_shift / summary.sum_exp;
      if (args.kl != KlEstimator::kNone) kl = kl_estimate(args.kl, logprob - args.ref_logprobs[row]);
    }
    args.logprobs[row] = logprob;
    args.logsumexp[row] = logsumexp;
    if constexpr (kWithEntropy) args.entropy[row] = entropy;
    if (args.kl != KlEstimator::kNone) args.kl_values[row] = kl;
  }
}

template <DType D, bool kWithEntropy>
void backward_rows(const BackwardArgs& args) {
  using storage = typename Logit<D>::storage;
  const RowLayout& layout = args.layout;
  const auto* logits = static_cast<const storage*>(args.logits);
  auto* grad_logits = static_cast<storage*>(args.grad_logits);
  [[maybe_unused]] const bool use_threads = layout.rows * layout.vocab >= kParallelMinElements;
#if defined(STEMA_WITH_OPENMP)
#pragma omp parallel for schedule(static) if (use_threads)
#endif
  for (int64_t row = 0; row < layout.rows; ++row) {
    const int64_t label = read_label(args.labels, args.labels_are_int32, row);
    storage* grad_row = grad_logits + row * layout.vocab;
    if (label == args.ignore_index) {
      std::memset(grad_row, 0, sizeof(storage) * layout.vocab);
      continue;
    }
    const float entropy = kWithEntropy ? args.entropy[row] : 0.0f;
    const float grad_entropy = kWithEntropy ? args.grad_entropy[row] : 0.0f;
    gradient_row<D, kWithEntropy>(logits + layout.row_offset(row), grad_row, layout.vocab, label,
                                  args.inv_temperature, args.logsumexp[row], entropy, args.grad_logprobs[row],
                                  grad_entropy);
  }
}

// Calls fn(DTypeTag<D>{}, std::bool_constant<with_entropy>{}) for the runtime dtype and flag.
template <typename Fn>
void dispatch_logits(DType dtype, bool with_entropy, Fn&& fn) {
  check_dtype(dtype);
  dispatch_float(dtype, [&](auto tag) {
    constexpr DType D = decltype(tag)::value;
    if constexpr (D != DType::kFloat64) {
      if (with_entropy) {
        fn(tag, std::true_type{});
      } else {
        fn(tag, std::false_type{});
      }
    }
  });
}

}  // namespace

void check_forward_args(const ForwardArgs& args) {
  check_layout(args.layout);
  check_dtype(args.logits_dtype);
  STEMA_CHECK(std::isfinite(args.inv_temperature) && args.inv_temperature > 0.0f,
              "logprobs: 1 / temperature must be finite and > 0, got " << args.inv_temperature);
  STEMA_CHECK(args.kl == KlEstimator::kNone || (args.ref_logprobs != nullptr && args.kl_values != nullptr),
              "logprobs: a KL estimator needs ref_logprobs and an output for kl");
  if (args.layout.rows == 0) return;
  STEMA_CHECK(args.logits != nullptr && args.labels != nullptr && args.logprobs != nullptr &&
                  args.logsumexp != nullptr,
              "logprobs: null logits, labels, logprobs or logsumexp pointer");
}

void check_backward_args(const BackwardArgs& args) {
  check_layout(args.layout);
  check_dtype(args.logits_dtype);
  STEMA_CHECK(std::isfinite(args.inv_temperature) && args.inv_temperature > 0.0f,
              "logprobs: 1 / temperature must be finite and > 0, got " << args.inv_temperature);
  STEMA_CHECK(args.grad_entropy == nullptr || args.entropy != nullptr,
              "logprobs: grad_entropy needs the entropy saved by the forward pass");
  if (args.layout.rows == 0) return;
  STEMA_CHECK(args.logits != nullptr && args.labels != nullptr && args.logsumexp != nullptr &&
                  args.grad_logprobs != nullptr && args.grad_logits != nullptr,
              "logprobs: null logits, labels, logsumexp, grad_logprobs or grad_logits pointer");
}

void forward_cpu(const ForwardArgs& args) {
  check_forward_args(args);
  if (args.layout.rows == 0) return;
  check_labels_in_range(args.labels, args.labels_are_int32, args.layout.rows, args.layout.vocab, args.ignore_index);
  dispatch_logits(args.logits_dtype, args.entropy != nullptr, [&](auto tag, auto with_entropy) {
    forward_rows<decltype(tag)::value, decltype(with_entropy)::value>(args);
  });
}

void backward_cpu(const BackwardArgs& args) {
  check_backward_args(args);
  if (args.layout.rows == 0) return;
  check_labels_in_range(args.labels, args.labels_are_int32, args.layout.rows, args.layout.vocab, args.ignore_index);
  dispatch_logits(args.logits_dtype, args.grad_entropy != nullptr, [&](auto tag, auto with_entropy) {
    backward_rows<decltype(tag)::value, decltype(with_entropy)::value>(args);
  });
}

}  // namespace stema::logprobs
