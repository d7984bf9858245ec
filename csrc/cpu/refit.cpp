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
#include <vector>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#endif

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


// ---- Row-block packing (see PackRowsDescriptor in refit.h).
//
// Grouping each `pair` of adjacent columns into one unit of pair * sizeof(dst) bytes, a row
// block's packed image is the transpose of the block as a [block, cols / pair] matrix of units,
// taken unit-wise: 8 x 8 tiles of 4-byte units through AVX2 registers where the CPU has AVX2, a
// plain loop otherwise. A block to convert is first cast whole into a per-thread staging buffer
// (the flat refit's vectorized conversion loop), then transposed from there.

namespace {

constexpr std::int64_t kMaxPackBlock = 128;  // rows per block (oneDNN's blocks are 8 to 64)
constexpr std::int64_t kPairsDivide = 64;     // every pair divides this

template <typename Unit>
STEMA_REFIT_ALWAYS_INLINE void transpose_units_scalar(const Unit* __restrict__ in, std::int64_t in_stride,
                                                      Unit* __restrict__ out, std::int64_t out_stride,
                                                      std::int64_t rows, std::int64_t cols) {
  for (std::int64_t c = 0; c < cols; ++c) {
    for (std::int64_t r = 0; r < rows; ++r) out[c * out_stride + r] = in[r * in_stride + c];
  }
}

#if defined(STEMA_REFIT_AVX2)
// out[k][j] = in[j][k] for an 8 x 8 tile of 4-byte units (strides in units); `Stream`: with
// non-temporal stores (out and out_stride 32-byte aligned).
template <bool Stream>
__attribute__((target("avx2"), always_inline)) inline void transpose_8x8_u32(const std::uint32_t* in,
                                                                           std::int64_t in_stride,
                                                                           std::uint32_t* out,
                                                                           std::int64_t out_stride) {
  __m256 v[8];
  for (int k = 0; k < 8; ++k) v[k] = _mm256_loadu_ps(reinterpret_cast<const float*>(in + k * in_stride));
  const __m256 t0 = _mm256_unpacklo_ps(v[0], v[1]), t1 = _mm256_unpackhi_ps(v[0], v[1]);
  const __m256 t2 = _mm256_unpacklo_ps(v[2], v[3]), t3 = _mm256_unpackhi_ps(v[2], v[3]);
  const __m256 t4 = _mm256_unpacklo_ps(v[4], v[5]), t5 = _mm256_unpackhi_ps(v[4], v[5]);
  const __m256 t6 = _mm256_unpacklo_ps(v[6], v[7]), t7 = _mm256_unpackhi_ps(v[6], v[7]);
  const __m256 s0 = _mm256_shuffle_ps(t0, t2, 0x44), s1 = _mm256_shuffle_ps(t0, t2, 0xEE);
  const __m256 s2 = _mm256_shuffle_ps(t1, t3, 0x44), s3 = _mm256_shuffle_ps(t1, t3, 0xEE);
  const __m256 s4 = _mm256_shuffle_ps(t4, t6, 0x44), s5 = _mm256_shuffle_ps(t4, t6, 0xEE);
  const __m256 s6 = _mm256_shuffle_ps(t5, t7, 0x44), s7 = _mm256_shuffle_ps(t5, t7, 0xEE);
  const __m256 o[8] = {_mm256_permute2f128_ps(s0, s4, 0x20), _mm256_permute2f128_ps(s1, s5, 0x20),
                       _mm256_permute2f128_ps(s2, s6, 0x20), _mm256_permute2f128_ps(s3, s7, 0x20),
                       _mm256_permute2f128_ps(s0, s4, 0x31), _mm256_permute2f128_ps(s1, s5, 0x31),
                       _mm256_permute2f128_ps(s2, s6, 0x31), _mm256_permute2f128_ps(s3, s7, 0x31)};
  if (Stream) {
    for (int k = 0; k < 8; ++k) _mm256_stream_ps(reinterpret_cast<float*>(out + k * out_stride), o[k]);
  } else {
    for (int k = 0; k < 8; ++k) _mm256_storeu_ps(reinterpret_cast<float*>(out + k * out_stride), o[k]);
  }
}

// out[c][r] = in[r][c] for 4-byte units, rows and cols multiples of 8 handled in registers.
__attribute__((target("avx2"))) void transpose_u32_avx2(const std::uint32_t* in, std::int64_t in_stride,
                                                        std::uint32_t* out, std::int64_t out_stride,
                                                        std::int64_t rows, std::int64_t cols) {
  const std::int64_t rows8 = rows & ~std::int64_t{7};
  const std::int64_t cols8 = cols & ~std::int64_t{7};
  // Columns outer: each 8 x 8 tile continues the runs of its 8 output rows that the tile above it
  // (the previous 8 input rows) began, so whole output lines are written in quick succession: with
  // non-temporal stores (where aligned) they go to memory without being read first, as a large
  // memcpy's do. The caller fences (`_mm_sfence`) before anyone reads the output.
  const bool stream = reinterpret_cast<std::uintptr_t>(out) % 32 == 0 && out_stride % 8 == 0;
  for (std::int64_t c = 0; c < cols8; c += 8) {
    for (std::int64_t r = 0; r < rows8; r += 8) {
      if (stream) {
        transpose_8x8_u32<true>(in + r * in_stride + c, in_stride, out + c * out_stride + r, out_stride);
      } else {
        transpose_8x8_u32<false>(in + r * in_stride + c, in_stride, out + c * out_stride + r, out_stride);
      }
    }
    // rows past the last multiple of 8
    transpose_units_scalar(in + rows8 * in_stride + c, in_stride, out + c * out_stride + rows8, out_stride,
                           rows - rows8, 8);
  }
  transpose_units_scalar(in + cols8, in_stride, out + cols8 * out_stride, out_stride, rows, cols - cols8);
}
#endif

template <int Bytes> struct UnitOf;
template <> struct UnitOf<1> { using type = std::uint8_t; };
template <> struct UnitOf<2> { using type = std::uint16_t; };
template <> struct UnitOf<4> { using type = std::uint32_t; };
template <> struct UnitOf<8> { using type = std::uint64_t; };
template <> struct UnitOf<16> { struct type { std::uint64_t low, high; }; };

template <int Bytes>
void transpose_units(const void* in, std::int64_t in_stride, void* out, std::int64_t out_stride, std::int64_t rows,
                     std::int64_t cols) {
  using Unit = typename UnitOf<Bytes>::type;
#if defined(STEMA_REFIT_AVX2)
  if constexpr (Bytes == 4) {
    if (kCpuHasAvx2) {
      transpose_u32_avx2(static_cast<const std::uint32_t*>(in), in_stride, static_cast<std::uint32_t*>(out),
                         out_stride, rows, cols);
      return;
    }
  }
#endif
  transpose_units_scalar(static_cast<const Unit*>(in), in_stride, static_cast<Unit*>(out), out_stride, rows, cols);
}

// Transposes a [rows, cols] matrix of `unit_bytes` units (strides in units).
void transpose_any_units(int unit_bytes, const void* in, std::int64_t in_stride, void* out, std::int64_t out_stride,
                         std::int64_t rows, std::int64_t cols) {
  switch (unit_bytes) {
    case 1: transpose_units<1>(in, in_stride, out, out_stride, rows, cols); return;
    case 2: transpose_units<2>(in, in_stride, out, out_stride, rows, cols); return;
    case 4: transpose_units<4>(in, in_stride, out, out_stride, rows, cols); return;
    case 8: transpose_units<8>(in, in_stride, out, out_stride, rows, cols); return;
    case 16: transpose_units<16>(in, in_stride, out, out_stride, rows, cols); return;
    default: STEMA_CHECK(false, "pack_rows: unsupported unit of " << unit_bytes << " bytes");
  }
}

// Converts one row segment: `count` src elements -> dst elements (bits copied for one dtype).
void convert_row(const PackRowsDescriptor& d, const void* src, void* dst, std::int64_t count) {
  if (d.src_dtype == d.dst_dtype) {
    std::memcpy(dst, src, static_cast<std::size_t>(count * dtype_size(to_dtype(d.dst_dtype))));
    return;
  }
  dispatch_float(static_cast<DType>(d.src_dtype), [&](auto src_tag) {
    dispatch_float(static_cast<DType>(d.dst_dtype), [&](auto dst_tag) {
      convert_elements<decltype(src_tag)::value, decltype(dst_tag)::value>(src, dst, 0, count);
    });
  });
}

void pack_one_block(const PackRowsDescriptor& d, std::int64_t block_index) {
  const std::int64_t src_size = dtype_size(to_dtype(d.src_dtype));
  const std::int64_t dst_size = dtype_size(to_dtype(d.dst_dtype));
  const int unit_bytes = static_cast<int>(d.pair * dst_size);
  const std::int64_t first_row = block_index * d.block;
  const char* src = static_cast<const char*>(d.src) + first_row * d.cols * src_size;
  char* packed = static_cast<char*>(d.packed) + first_row * d.cols * dst_size;
  if (d.src_dtype == d.dst_dtype) {
    // The block as [block, cols / pair] units straight into its packed image.
    transpose_any_units(unit_bytes, src, d.cols / d.pair, packed, d.block, d.block, d.cols / d.pair);
    return;
  }
  // Converting: the block (contiguous in src) is converted in one call of the refit's vectorized
  // loop into this thread's staging buffer, then transposed from there as above.
  thread_local std::vector<char> staging;
  const std::int64_t count = d.block * d.cols;
  if (static_cast<std::int64_t>(staging.size()) < count * dst_size) staging.resize(static_cast<std::size_t>(count * dst_size));
  convert_row(d, src, staging.data(), count);
  transpose_any_units(unit_bytes, staging.data(), d.cols / d.pair, packed, d.block, d.block, d.cols / d.pair);
}

}  // namespace

void check_pack_rows(const PackRowsDescriptor* table, std::int64_t count) {
  STEMA_CHECK(count >= 0, "pack_rows: negative descriptor count " << count);
  for (std::int64_t i = 0; i < count; ++i) {
    const PackRowsDescriptor& d = table[i];
    to_dtype(d.src_dtype);  // throws on an unknown code
    to_dtype(d.dst_dtype);
    STEMA_CHECK(d.block >= 1 && d.block <= kMaxPackBlock && d.pair >= 1 && d.rows >= 0 && d.cols >= 0 &&
                    d.pair * dtype_size(to_dtype(d.dst_dtype)) <= 16,
                "pack_rows descriptor " << i << ": block " << d.block << ", pair " << d.pair << ", rows " << d.rows
                                        << ", cols " << d.cols << " (block 1 to " << kMaxPackBlock
                                        << ", pair >= 1 and a unit of pair elements at most 16 bytes)");
    STEMA_CHECK(d.rows % d.block == 0 && d.cols % d.pair == 0 && kPairsDivide % d.pair == 0,
                "pack_rows descriptor " << i << ": rows " << d.rows << " must be a multiple of block " << d.block
                                        << " and cols " << d.cols << " of pair " << d.pair << " (which divides "
                                        << kPairsDivide << ")");
    STEMA_CHECK(d.rows * d.cols == 0 || (d.packed != nullptr && d.src != nullptr),
                "pack_rows descriptor " << i << ": null data pointer");
  }
}

void pack_rows_cpu(const PackRowsDescriptor* table, std::int64_t count) {
  check_pack_rows(table, count);
  // Work units: the row blocks of all descriptors; first_block[i] is descriptor i's first unit.
  std::vector<std::int64_t> first_block(static_cast<std::size_t>(count) + 1, 0);
  std::int64_t src_bytes = 0;
  for (std::int64_t i = 0; i < count; ++i) {
    const PackRowsDescriptor& d = table[i];
    first_block[i + 1] = first_block[i] + (d.cols == 0 ? 0 : d.rows / d.block);
    src_bytes += d.rows * d.cols * dtype_size(to_dtype(d.src_dtype));
  }
  const std::int64_t total_blocks = first_block[count];
  [[maybe_unused]] const int threads = static_cast<int>(std::clamp<std::int64_t>(
      std::min(src_bytes / kCpuChunkBytes, total_blocks), 1, max_threads()));
#if defined(STEMA_WITH_OPENMP)
#pragma omp parallel for num_threads(threads) schedule(dynamic, 1) if (threads > 1)
#endif
  for (std::int64_t unit = 0; unit < total_blocks; ++unit) {
    const auto owner = std::upper_bound(first_block.begin(), first_block.end(), unit) - first_block.begin() - 1;
    pack_one_block(table[owner], unit - first_block[owner]);
#if defined(STEMA_REFIT_AVX2)
    _mm_sfence();  // the block's non-temporal stores are visible before the region ends
#endif
  }
}

}  // namespace stema::refit
