// In-place refit on the CPU: one OpenMP region over the chunks of all pairs, branchless
// conversion loops that the compiler vectorizes.
//
// Every conversion goes through float, as torch's copy_ does (c10::Half and c10::BFloat16 are
// built from float, so fp64 -> fp16/bf16 rounds to float first). Results are bit-identical to
// `dst.copy_(src)` for every value but NaN, whose payload bits torch itself sets differently in
// its vector and scalar paths; a NaN stays a NaN of the same sign here (the quiet bit set and the
// payload truncated, as the x86 F16C and AVX512-BF16 converters do).
#include "stema/refit.h"

#include <algorithm>
#include <cstring>

#include "stema/common.h"

#if defined(STEMA_WITH_OPENMP)
#include <omp.h>
#endif

namespace stema::refit {
namespace {

// ---- branchless element conversions: every case is computed and the result picked with bit
// masks, so loops over them vectorize (a ternary lets the compiler branch around the float ops,
// which it then may not speculate back under -ftrapping-math).

// All ones when `condition` holds, else zero.
inline std::uint32_t mask_if(bool condition) { return 0u - static_cast<std::uint32_t>(condition); }

inline std::uint32_t select(std::uint32_t mask, std::uint32_t if_set, std::uint32_t if_clear) {
  return (if_set & mask) | (if_clear & ~mask);
}

// float -> bf16, round to nearest even; NaN keeps its sign and top payload bits, quiet bit set.
inline std::uint16_t float_to_bf16_bits(float value) {
  const std::uint32_t bits = float_to_bits(value);
  const std::uint32_t rounded = (bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16;
  const std::uint32_t quiet_nan = (bits >> 16) | 0x0040u;
  const std::uint32_t is_nan = mask_if(static_cast<std::int32_t>(bits & 0x7fffffffu) > 0x7f800000);
  return static_cast<std::uint16_t>(select(is_nan, quiet_nan, rounded));
}

// float -> fp16, round to nearest even (F. Giesen's float_to_half_fast3_rtne, with masks).
inline std::uint16_t float_to_fp16_bits(float value) {
  const std::uint32_t bits = float_to_bits(value);
  const std::uint32_t sign = (bits >> 16) & 0x8000u;
  const std::uint32_t magnitude = bits & 0x7fffffffu;
  const std::int32_t signed_magnitude = static_cast<std::int32_t>(magnitude);
  // |value| >= 2^-14: rebias the exponent (127 -> 15) and round the mantissa to 10 bits; values
  // from 65520 up round to inf here.
  const std::uint32_t normal = (magnitude - (112u << 23) + 0xfffu + ((magnitude >> 13) & 1u)) >> 13;
  // |value| < 2^-14: adding 0.5f aligns the fp16 subnormal bits at the bottom of the mantissa and
  // the float adder rounds them to nearest even.
  const float half = bits_to_float(126u << 23);
  const std::uint32_t subnormal = float_to_bits(bits_to_float(magnitude) + half) - (126u << 23);
  // |value| >= 65536: inf, or NaN keeping its top payload bits with the quiet bit set.
  const std::uint32_t inf_or_nan =
      select(mask_if(signed_magnitude > 0x7f800000), 0x7e00u | ((magnitude >> 13) & 0x3ffu), 0x7c00u);
  const std::uint32_t finite = select(mask_if(signed_magnitude < (113 << 23)), subnormal, normal);
  return static_cast<std::uint16_t>(sign | select(mask_if(signed_magnitude >= (143 << 23)), inf_or_nan, finite));
}

// fp16 -> float, exact; a NaN gets the quiet bit. Subnormals are computed as mantissa * 2^-24, a
// product of normal floats, so it is right even when the CPU treats denormals as zero (DAZ).
inline float fp16_bits_to_float(std::uint16_t half_bits) {
  const std::uint32_t bits = half_bits;
  const std::uint32_t sign = (bits & 0x8000u) << 16;
  const std::uint32_t exponent = (bits >> 10) & 0x1fu;
  const std::uint32_t mantissa = bits & 0x3ffu;
  const std::uint32_t normal = ((bits & 0x7fffu) << 13) + (112u << 23);
  const std::uint32_t inf_or_nan = 0x7f800000u | (mantissa << 13) | (mask_if(mantissa != 0) & 0x00400000u);
  const std::uint32_t subnormal =
      float_to_bits(static_cast<float>(static_cast<std::int32_t>(mantissa)) * 5.9604644775390625e-08f);
  const std::uint32_t nonzero_exponent = select(mask_if(exponent == 0x1f), inf_or_nan, normal);
  return bits_to_float(sign | select(mask_if(exponent == 0), subnormal, nonzero_exponent));
}

// Storage type and float load/store of each dtype.
template <DType D> struct Element;
template <> struct Element<DType::kFloat32> {
  using type = float;
  static float load(float value) { return value; }
  static float store(float value) { return value; }
};
template <> struct Element<DType::kFloat64> {
  using type = double;
  static float load(double value) { return static_cast<float>(value); }
  static double store(float value) { return static_cast<double>(value); }
};
template <> struct Element<DType::kFloat16> {
  using type = std::uint16_t;
  static float load(std::uint16_t value) { return fp16_bits_to_float(value); }
  static std::uint16_t store(float value) { return float_to_fp16_bits(value); }
};
template <> struct Element<DType::kBFloat16> {
  using type = std::uint16_t;
  static float load(std::uint16_t value) { return bf16_to_float(value); }
  static std::uint16_t store(float value) { return float_to_bf16_bits(value); }
};

// The conversion loop is compiled twice on x86-64 with GCC or Clang: for the baseline ISA (SSE2,
// as the build sets no -march) and for AVX2, picked at run time. With 16-byte vectors the 16-bit
// rounding is compute bound at a third of the memory bandwidth of one core; with 32-byte vectors
// it keeps up. Both compile the same source, so they give the same bits.
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define STEMA_REFIT_AVX2 1
#define STEMA_REFIT_ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define STEMA_REFIT_ALWAYS_INLINE inline
#endif

template <DType Src, DType Dst>
STEMA_REFIT_ALWAYS_INLINE void convert_loop(const void* src, void* dst, std::int64_t begin, std::int64_t end) {
  using SrcType = typename Element<Src>::type;
  using DstType = typename Element<Dst>::type;
  const SrcType* __restrict__ in = static_cast<const SrcType*>(src) + begin;
  DstType* __restrict__ out = static_cast<DstType*>(dst) + begin;
  const std::int64_t length = end - begin;
  for (std::int64_t i = 0; i < length; ++i) {
    out[i] = Element<Dst>::store(Element<Src>::load(in[i]));
  }
}

template <DType Src, DType Dst>
void convert_baseline(const void* src, void* dst, std::int64_t begin, std::int64_t end) {
  convert_loop<Src, Dst>(src, dst, begin, end);
}

#if defined(STEMA_REFIT_AVX2)
template <DType Src, DType Dst>
__attribute__((target("avx2"))) void convert_avx2(const void* src, void* dst, std::int64_t begin, std::int64_t end) {
  convert_loop<Src, Dst>(src, dst, begin, end);
}

bool cpu_has_avx2() {
  __builtin_cpu_init();  // this may run before libgcc's own constructor has filled in the CPU model
  return __builtin_cpu_supports("avx2");
}

const bool kCpuHasAvx2 = cpu_has_avx2();
#endif

template <DType Src, DType Dst>
void convert_elements(const void* src, void* dst, std::int64_t begin, std::int64_t end) {
#if defined(STEMA_REFIT_AVX2)
  if (kCpuHasAvx2) {
    convert_avx2<Src, Dst>(src, dst, begin, end);
    return;
  }
#endif
  convert_baseline<Src, Dst>(src, dst, begin, end);
}

// Copies elements [begin, end) of one pair.
void refit_range(const RefitDescriptor& pair, std::int64_t begin, std::int64_t end) {
  if (pair.src_dtype == kRawBytes) {
    std::memcpy(static_cast<char*>(pair.dst) + begin, static_cast<const char*>(pair.src) + begin,
                static_cast<std::size_t>(end - begin));
    return;
  }
  dispatch_float(static_cast<DType>(pair.src_dtype), [&](auto src_tag) {
    dispatch_float(static_cast<DType>(pair.dst_dtype), [&](auto dst_tag) {
      convert_elements<decltype(src_tag)::value, decltype(dst_tag)::value>(pair.src, pair.dst, begin, end);
    });
  });
}

// Bytes per element of a dtype code; kRawBytes counts bytes. Throws on an unknown code.
int element_size(int dtype_code) { return dtype_code == kRawBytes ? 1 : dtype_size(to_dtype(dtype_code)); }

std::int64_t max_threads() {
#if defined(STEMA_WITH_OPENMP)
  return omp_get_max_threads();
#else
  return 1;
#endif
}

// Throws if two dst byte ranges intersect, or a src range intersects a dst range (the copy runs in
// parallel, and CUDA reads src through the read-only cache). Sorts the ranges by start and sweeps
// them, keeping the furthest end of the dst and of the src ranges seen so far: O(n log n).
void check_no_overlap(const RefitPairs& pairs) {
  struct Range {
    std::uintptr_t begin;
    std::uintptr_t end;
    std::size_t pair;
    bool is_dst;
  };
  std::vector<Range> ranges;
  ranges.reserve(2 * pairs.counts.size());
  for (std::size_t i = 0; i < pairs.counts.size(); ++i) {
    if (pairs.counts[i] == 0) continue;
    ranges.push_back({pairs.dst[i], pairs.dst[i] + pairs.counts[i] * element_size(pairs.dst_dtypes[i]), i, true});
    ranges.push_back({pairs.src[i], pairs.src[i] + pairs.counts[i] * element_size(pairs.src_dtypes[i]), i, false});
  }
  std::sort(ranges.begin(), ranges.end(), [](const Range& a, const Range& b) { return a.begin < b.begin; });
  Range furthest_dst{0, 0, 0, true};
  Range furthest_src{0, 0, 0, false};
  for (const Range& range : ranges) {
    if (range.is_dst) {
      STEMA_CHECK(range.begin >= furthest_dst.end, "refit pairs " << std::min(range.pair, furthest_dst.pair) << " and "
                                                                  << std::max(range.pair, furthest_dst.pair)
                                                                  << ": dst memory overlaps");
      STEMA_CHECK(range.begin >= furthest_src.end,
                  "refit pair " << furthest_src.pair << ": src memory overlaps the dst of pair " << range.pair);
      if (range.end > furthest_dst.end) furthest_dst = range;
    } else {
      STEMA_CHECK(range.begin >= furthest_dst.end,
                  "refit pair " << range.pair << ": src memory overlaps the dst of pair " << furthest_dst.pair);
      if (range.end > furthest_src.end) furthest_src = range;
    }
  }
}

}  // namespace

void check_pairs(const RefitPairs& pairs) {
  const std::size_t count = pairs.counts.size();
  STEMA_CHECK(pairs.dst.size() == count && pairs.src.size() == count && pairs.dst_dtypes.size() == count &&
                  pairs.src_dtypes.size() == count,
              "refit: dst, src, counts and dtype lists differ in length");
  for (std::size_t i = 0; i < count; ++i) {
    const int dst_dtype = pairs.dst_dtypes[i];
    const int src_dtype = pairs.src_dtypes[i];
    STEMA_CHECK((dst_dtype == kRawBytes) == (src_dtype == kRawBytes),
                "refit pair " << i << ": a raw byte copy needs kRawBytes for both dtypes");
    STEMA_CHECK(dst_dtype == kRawBytes || dst_dtype != src_dtype,
                "refit pair " << i << ": pairs of one dtype are copied as raw bytes (kRawBytes)");
    element_size(dst_dtype);  // throws on an unknown code
    element_size(src_dtype);
    STEMA_CHECK(pairs.counts[i] >= 0, "refit pair " << i << ": negative count " << pairs.counts[i]);
    STEMA_CHECK(pairs.counts[i] == 0 || (pairs.dst[i] != 0 && pairs.src[i] != 0),
                "refit pair " << i << ": null data pointer");
  }
  check_no_overlap(pairs);
}

std::int64_t describe_pairs(const RefitPairs& pairs, std::int64_t chunk_bytes, RefitDescriptor* table) {
  check_pairs(pairs);
  std::int64_t total_chunks = 0;
  for (std::size_t i = 0; i < pairs.counts.size(); ++i) {
    RefitDescriptor& descriptor = table[i];
    descriptor.dst = reinterpret_cast<void*>(pairs.dst[i]);
    descriptor.src = reinterpret_cast<const void*>(pairs.src[i]);
    descriptor.count = pairs.counts[i];
    descriptor.chunk_elements = chunk_bytes / element_size(pairs.src_dtypes[i]);
    descriptor.first_chunk = total_chunks;
    descriptor.dst_dtype = pairs.dst_dtypes[i];
    descriptor.src_dtype = pairs.src_dtypes[i];
    total_chunks += (descriptor.count + descriptor.chunk_elements - 1) / descriptor.chunk_elements;
  }
  return total_chunks;
}

void refit_cpu(const RefitDescriptor* table, std::int64_t count, std::int64_t total_chunks) {
  // A thread per kCpuChunkBytes of src at most: waking threads for a few KB costs more than it
  // saves (and on a busy machine a woken thread may wait a scheduler tick for a core).
  std::int64_t src_bytes = 0;
  for (std::int64_t i = 0; i < count; ++i) src_bytes += table[i].count * element_size(table[i].src_dtype);
  [[maybe_unused]] const int threads = static_cast<int>(std::clamp<std::int64_t>(src_bytes / kCpuChunkBytes, 1, max_threads()));
  // Chunks differ in cost (dtype pairs), so threads take them one at a time.
#if defined(STEMA_WITH_OPENMP)
#pragma omp parallel for num_threads(threads) schedule(dynamic, 1) if (threads > 1)
#endif
  for (std::int64_t chunk = 0; chunk < total_chunks; ++chunk) {
    const RefitDescriptor& pair = table[find_pair(table, count, chunk)];
    const std::int64_t begin = (chunk - pair.first_chunk) * pair.chunk_elements;
    const std::int64_t end = std::min(begin + pair.chunk_elements, pair.count);
    refit_range(pair, begin, end);
  }
}

}  // namespace stema::refit
