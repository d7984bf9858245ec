// Shared definitions of the torch-free kernels: dtype codes, 16-bit float conversions, errors.
//
// Kernels receive raw pointers, sizes, strides and one of these dtype codes; the Python side
// (python/stema_kernels/_dispatch.py) maps torch dtypes to the same numbers. Keep both in step.
#pragma once

#include <cstdint>
#include <cstring>
#include <sstream>
#include <stdexcept>
#include <string>
#include <type_traits>

namespace stema {

enum class DType : int {
  kFloat32 = 0,
  kFloat16 = 1,
  kBFloat16 = 2,
  kFloat64 = 3,
};

inline const char* dtype_name(DType dtype) {
  switch (dtype) {
    case DType::kFloat32: return "float32";
    case DType::kFloat16: return "float16";
    case DType::kBFloat16: return "bfloat16";
    case DType::kFloat64: return "float64";
  }
  return "unknown";
}

inline int dtype_size(DType dtype) {
  switch (dtype) {
    case DType::kFloat32: return 4;
    case DType::kFloat16: return 2;
    case DType::kBFloat16: return 2;
    case DType::kFloat64: return 8;
  }
  return 0;
}

inline DType to_dtype(int code) {
  if (code < 0 || code > 3) {
    std::ostringstream msg;
    msg << "stema: unknown dtype code " << code;
    throw std::invalid_argument(msg.str());
  }
  return static_cast<DType>(code);
}

// Invalid arguments become Python ValueError through pybind11.
#define STEMA_CHECK(cond, ...)                                              \
  do {                                                                      \
    if (!(cond)) {                                                          \
      std::ostringstream stema_check_msg_;                                  \
      stema_check_msg_ << "stema: " << __VA_ARGS__;                         \
      throw std::invalid_argument(stema_check_msg_.str());                  \
    }                                                                       \
  } while (0)

// ---- 16-bit floats on the CPU (bit exact with torch's conversions: round to nearest even) ----

inline float bits_to_float(uint32_t bits) {
  float value;
  std::memcpy(&value, &bits, sizeof(value));
  return value;
}

inline uint32_t float_to_bits(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof(bits));
  return bits;
}

inline float bf16_to_float(uint16_t bits) { return bits_to_float(static_cast<uint32_t>(bits) << 16); }

inline uint16_t float_to_bf16(float value) {
  uint32_t bits = float_to_bits(value);
  if ((bits & 0x7fffffffu) > 0x7f800000u) {  // NaN: keep it quiet, keep the sign
    return static_cast<uint16_t>((bits >> 16) | 0x0040u);
  }
  uint32_t rounding_bias = 0x7fffu + ((bits >> 16) & 1u);
  return static_cast<uint16_t>((bits + rounding_bias) >> 16);
}

inline float fp16_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exponent = (h >> 10) & 0x1fu;
  uint32_t mantissa = h & 0x3ffu;
  if (exponent == 0) {
    if (mantissa == 0) return bits_to_float(sign);
    // subnormal: value = mantissa * 2^-24
    float value = static_cast<float>(mantissa) * 5.9604644775390625e-08f;
    return sign ? -value : value;
  }
  if (exponent == 0x1f) return bits_to_float(sign | 0x7f800000u | (mantissa << 13));
  return bits_to_float(sign | ((exponent + 112u) << 23) | (mantissa << 13));
}

inline uint16_t float_to_fp16(float value) {
  const uint32_t bits = float_to_bits(value);
  const uint16_t sign = static_cast<uint16_t>((bits >> 16) & 0x8000u);
  const uint32_t abs_bits = bits & 0x7fffffffu;
  if (abs_bits > 0x7f800000u) return static_cast<uint16_t>(sign | 0x7e00u);  // NaN
  if (abs_bits >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);  // overflow -> inf
  if (abs_bits < 0x38800000u) {
    // result is subnormal or zero: round abs/2^-24 to nearest even integer
    const float magnitude = bits_to_float(abs_bits);
    const float scaled = magnitude * 16777216.0f;  // 2^24, exact
    uint32_t integer = static_cast<uint32_t>(scaled);
    const float fraction = scaled - static_cast<float>(integer);
    if (fraction > 0.5f || (fraction == 0.5f && (integer & 1u))) ++integer;
    return static_cast<uint16_t>(sign | integer);
  }
  // normal: rebias exponent and round mantissa to 10 bits, nearest even
  uint32_t rebased = abs_bits - (112u << 23);
  const uint32_t rounding_bias = 0xfffu + ((rebased >> 13) & 1u);
  rebased += rounding_bias;
  return static_cast<uint16_t>(sign | (rebased >> 13));
}

// Typed load/store in float for the CPU kernels.
template <DType D> struct CpuScalar;
template <> struct CpuScalar<DType::kFloat32> {
  using storage = float;
  static float load(storage v) { return v; }
  static storage store(float v) { return v; }
};
template <> struct CpuScalar<DType::kFloat64> {
  using storage = double;
  static float load(storage v) { return static_cast<float>(v); }
  static storage store(float v) { return static_cast<double>(v); }
};
template <> struct CpuScalar<DType::kFloat16> {
  using storage = uint16_t;
  static float load(storage v) { return fp16_to_float(v); }
  static storage store(float v) { return float_to_fp16(v); }
};
template <> struct CpuScalar<DType::kBFloat16> {
  using storage = uint16_t;
  static float load(storage v) { return bf16_to_float(v); }
  static storage store(float v) { return float_to_bf16(v); }
};

// Calls fn(DTypeTag<D>{}) for the runtime dtype; inside, `constexpr DType D = decltype(tag)::value;`.
template <DType D>
using DTypeTag = std::integral_constant<DType, D>;

template <typename Fn>
decltype(auto) dispatch_float(DType dtype, Fn&& fn) {
  switch (dtype) {
    case DType::kFloat32: return fn(DTypeTag<DType::kFloat32>{});
    case DType::kFloat16: return fn(DTypeTag<DType::kFloat16>{});
    case DType::kBFloat16: return fn(DTypeTag<DType::kBFloat16>{});
    case DType::kFloat64: return fn(DTypeTag<DType::kFloat64>{});
  }
  throw std::invalid_argument("stema: unsupported dtype");
}

}  // namespace stema
