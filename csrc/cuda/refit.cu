// In-place refit on CUDA: one launch copies every pair, each block taking whole chunks.
//
// A block finds the pair that owns its chunk by binary search over the descriptors' first_chunk,
// then converts the chunk with 16-byte loads and stores (8 elements per thread per step) when both
// buffers are 16-byte aligned, element by element otherwise. Conversions use the intrinsics that
// torch's own copy_ uses (c10::Half / c10::BFloat16 wrap __float2half / __float2bfloat16 and are
// built from float, so fp64 -> fp16/bf16 goes through float), so results are bit-identical to
// `dst.copy_(src)`, NaNs included.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <stdexcept>
#include <string>

#include "stema/common.h"
#include "stema/refit.h"

namespace stema::refit {
namespace {

constexpr int kThreads = 256;
constexpr int kVector = 8;            // elements per thread per step of the aligned path
constexpr std::int64_t kMaxBlocks = 1 << 16;  // more chunks than this are taken grid-stride

void check_cuda(cudaError_t status, const char* what) {
  if (status != cudaSuccess) {
    throw std::runtime_error(std::string("stema: refit: ") + what + ": " + cudaGetErrorString(status));
  }
}

// Makes `device_index` current for a launch (the stream belongs to it) and restores the previous one.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device_index) : device_(device_index) {
    check_cuda(cudaGetDevice(&previous_), "cudaGetDevice");
    if (previous_ != device_) check_cuda(cudaSetDevice(device_), "cudaSetDevice");
  }
  ~DeviceGuard() {
    if (previous_ != device_) cudaSetDevice(previous_);
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int device_;
  int previous_ = 0;
};

// Storage type and float load/store of each dtype, with the conversions torch's copy_ uses.
template <DType D> struct Element;
template <> struct Element<DType::kFloat32> {
  using type = float;
  __device__ static float load(float value) { return value; }
  __device__ static float store(float value) { return value; }
};
template <> struct Element<DType::kFloat64> {
  using type = double;
  __device__ static float load(double value) { return static_cast<float>(value); }
  __device__ static double store(float value) { return static_cast<double>(value); }
};
template <> struct Element<DType::kFloat16> {
  using type = unsigned short;
  __device__ static float load(unsigned short value) { return __half2float(__ushort_as_half(value)); }
  __device__ static unsigned short store(float value) { return __half_as_ushort(__float2half(value)); }
};
template <> struct Element<DType::kBFloat16> {
  using type = unsigned short;
  __device__ static float load(unsigned short value) { return __bfloat162float(__ushort_as_bfloat16(value)); }
  __device__ static unsigned short store(float value) { return __bfloat16_as_ushort(__float2bfloat16(value)); }
};

// Loads and stores through the global-memory path. The table kernel reads its data pointers from
// memory, where the compiler cannot tell they are global and would emit generic accesses. The
// read-only (non-coherent) load is safe: the Python side refuses a src that overlaps any dst.
template <typename T>
__device__ __forceinline__ T load_global(const T* address) {
  return __ldg(address);
}
template <typename T>
__device__ __forceinline__ void store_global(T* address, T value) {
  __stwb(address, value);
}

// kVector elements moved as 16-byte loads/stores (one for 16-bit, two for fp32, four for fp64).
template <typename T>
struct alignas(16) Pack {
  T values[kVector];
};
template <typename T>
union PackBits {
  Pack<T> pack;
  uint4 words[sizeof(Pack<T>) / 16];
};

template <typename T>
__device__ __forceinline__ Pack<T> load_pack(const T* address) {
  PackBits<T> bits;
#pragma unroll
  for (int k = 0; k < static_cast<int>(sizeof(Pack<T>) / 16); ++k) {
    bits.words[k] = load_global(reinterpret_cast<const uint4*>(address) + k);
  }
  return bits.pack;
}

template <typename T>
__device__ __forceinline__ void store_pack(T* address, const Pack<T>& pack) {
  PackBits<T> bits;
  bits.pack = pack;
#pragma unroll
  for (int k = 0; k < static_cast<int>(sizeof(Pack<T>) / 16); ++k) {
    store_global(reinterpret_cast<uint4*>(address) + k, bits.words[k]);
  }
}

template <DType Src, DType Dst>
__device__ void convert_range(const RefitDescriptor& pair, std::int64_t begin, std::int64_t end) {
  using SrcType = typename Element<Src>::type;
  using DstType = typename Element<Dst>::type;
  const SrcType* src = static_cast<const SrcType*>(pair.src);
  DstType* dst = static_cast<DstType*>(pair.dst);
  // begin is a multiple of chunk_elements (a multiple of kVector), so aligned bases keep every
  // pack aligned.
  const bool aligned = ((reinterpret_cast<std::uintptr_t>(src) | reinterpret_cast<std::uintptr_t>(dst)) % 16) == 0;
  std::int64_t scalar_begin = begin;
  if (aligned) {
    const std::int64_t vector_end = begin + (end - begin) / kVector * kVector;
    for (std::int64_t i = begin + static_cast<std::int64_t>(threadIdx.x) * kVector; i < vector_end;
         i += kThreads * kVector) {
      const Pack<SrcType> in = load_pack(src + i);
      Pack<DstType> out;
#pragma unroll
      for (int k = 0; k < kVector; ++k) out.values[k] = Element<Dst>::store(Element<Src>::load(in.values[k]));
      store_pack(dst + i, out);
    }
    scalar_begin = vector_end;
  }
  for (std::int64_t i = scalar_begin + threadIdx.x; i < end; i += kThreads) {
    store_global(dst + i, Element<Dst>::store(Element<Src>::load(load_global(src + i))));
  }
}

// Bytes [begin, end) in units of `Unit` (both bases aligned to it), then the odd tail bytes.
template <typename Unit>
__device__ void copy_units(const RefitDescriptor& pair, std::int64_t begin, std::int64_t end) {
  constexpr std::int64_t kUnit = sizeof(Unit);
  const unsigned char* src = static_cast<const unsigned char*>(pair.src);
  unsigned char* dst = static_cast<unsigned char*>(pair.dst);
  const std::int64_t unit_end = begin + (end - begin) / kUnit * kUnit;
#pragma unroll 4
  for (std::int64_t i = begin + static_cast<std::int64_t>(threadIdx.x) * kUnit; i < unit_end; i += kThreads * kUnit) {
    store_global(reinterpret_cast<Unit*>(dst + i), load_global(reinterpret_cast<const Unit*>(src + i)));
  }
  for (std::int64_t i = unit_end + threadIdx.x; i < end; i += kThreads) store_global(dst + i, load_global(src + i));
}

// A same-dtype pair: the widest unit (16 down to 1 bytes) that both addresses are aligned to.
__device__ void copy_bytes(const RefitDescriptor& pair, std::int64_t begin, std::int64_t end) {
  const std::uintptr_t misalignment =
      (reinterpret_cast<std::uintptr_t>(pair.src) | reinterpret_cast<std::uintptr_t>(pair.dst)) % 16;
  if (misalignment == 0) {
    copy_units<uint4>(pair, begin, end);
  } else if (misalignment % 8 == 0) {
    copy_units<uint2>(pair, begin, end);
  } else if (misalignment % 4 == 0) {
    copy_units<unsigned int>(pair, begin, end);
  } else if (misalignment % 2 == 0) {
    copy_units<unsigned short>(pair, begin, end);
  } else {
    copy_units<unsigned char>(pair, begin, end);
  }
}

template <DType Src>
__device__ void convert_from(const RefitDescriptor& pair, std::int64_t begin, std::int64_t end) {
  switch (static_cast<DType>(pair.dst_dtype)) {
    case DType::kFloat32: convert_range<Src, DType::kFloat32>(pair, begin, end); break;
    case DType::kFloat16: convert_range<Src, DType::kFloat16>(pair, begin, end); break;
    case DType::kBFloat16: convert_range<Src, DType::kBFloat16>(pair, begin, end); break;
    case DType::kFloat64: convert_range<Src, DType::kFloat64>(pair, begin, end); break;
  }
}

// Copies elements [begin, end) of one pair (describe_pairs has checked its dtype codes).
__device__ void refit_range(const RefitDescriptor& pair, std::int64_t begin, std::int64_t end) {
  if (pair.src_dtype == kRawBytes) {
    copy_bytes(pair, begin, end);
    return;
  }
  switch (static_cast<DType>(pair.src_dtype)) {
    case DType::kFloat32: convert_from<DType::kFloat32>(pair, begin, end); break;
    case DType::kFloat16: convert_from<DType::kFloat16>(pair, begin, end); break;
    case DType::kBFloat16: convert_from<DType::kBFloat16>(pair, begin, end); break;
    case DType::kFloat64: convert_from<DType::kFloat64>(pair, begin, end); break;
  }
}

// Runs chunks [chunk_begin, chunk_end), owned by the `count` descriptors at `table`, grid-stride.
__device__ void run_chunks(const RefitDescriptor* table, std::int64_t count, std::int64_t chunk_begin,
                           std::int64_t chunk_end) {
  for (std::int64_t chunk = chunk_begin + blockIdx.x; chunk < chunk_end; chunk += gridDim.x) {
    const RefitDescriptor pair = table[find_pair(table, count, chunk)];
    const std::int64_t begin = (chunk - pair.first_chunk) * pair.chunk_elements;
    const std::int64_t end = min(begin + pair.chunk_elements, pair.count);
    refit_range(pair, begin, end);
  }
}

// Descriptors passed by value; __grid_constant__ lets the blocks read them in place in the
// parameter bank instead of copying the array to local memory.
template <int Capacity>
struct RefitBatch {
  std::int64_t chunk_begin;
  std::int64_t chunk_end;
  std::int64_t count;
  RefitDescriptor descriptors[Capacity];
};
static_assert(sizeof(RefitBatch<kMaxDescriptorsPerLaunch>) <= 32764, "kernel parameters are limited to 32764 bytes");

template <int Capacity>
__global__ void __launch_bounds__(kThreads) refit_batch_kernel(const __grid_constant__ RefitBatch<Capacity> batch) {
  run_chunks(batch.descriptors, batch.count, batch.chunk_begin, batch.chunk_end);
}

__global__ void __launch_bounds__(kThreads)
    refit_table_kernel(const RefitDescriptor* __restrict__ table, std::int64_t count, std::int64_t total_chunks) {
  run_chunks(table, count, 0, total_chunks);
}

unsigned int block_count(std::int64_t chunks) { return static_cast<unsigned int>(std::min(chunks, kMaxBlocks)); }

// One launch for host_table[first, first + count): the smallest parameter block that holds them.
template <int Capacity>
void launch_batch(const RefitDescriptor* host_table, std::int64_t first, std::int64_t count, std::int64_t chunk_begin,
                  std::int64_t chunk_end, cudaStream_t stream) {
  RefitBatch<Capacity> batch;
  batch.chunk_begin = chunk_begin;
  batch.chunk_end = chunk_end;
  batch.count = count;
  std::copy(host_table + first, host_table + first + count, batch.descriptors);
  refit_batch_kernel<Capacity><<<block_count(chunk_end - chunk_begin), kThreads, 0, stream>>>(batch);
  check_cuda(cudaGetLastError(), "refit_batch_kernel launch");
}

}  // namespace

void refit_cuda(const RefitDescriptor* host_table, std::int64_t count, std::int64_t total_chunks, int device_index,
                std::uintptr_t stream_handle) {
  if (total_chunks == 0) return;
  DeviceGuard device(device_index);
  const auto stream = reinterpret_cast<cudaStream_t>(stream_handle);
  for (std::int64_t first = 0; first < count; first += kMaxDescriptorsPerLaunch) {
    const std::int64_t batch_count = std::min<std::int64_t>(kMaxDescriptorsPerLaunch, count - first);
    const std::int64_t chunk_begin = host_table[first].first_chunk;
    const std::int64_t chunk_end =
        first + batch_count < count ? host_table[first + batch_count].first_chunk : total_chunks;
    if (chunk_end == chunk_begin) continue;  // only empty pairs in this batch
    if (batch_count <= 16) {
      launch_batch<16>(host_table, first, batch_count, chunk_begin, chunk_end, stream);
    } else if (batch_count <= 128) {
      launch_batch<128>(host_table, first, batch_count, chunk_begin, chunk_end, stream);
    } else {
      launch_batch<kMaxDescriptorsPerLaunch>(host_table, first, batch_count, chunk_begin, chunk_end, stream);
    }
  }
}

void refit_table_cuda(const RefitDescriptor* device_table, std::int64_t count, std::int64_t total_chunks,
                      int device_index, std::uintptr_t stream_handle) {
  if (total_chunks == 0) return;
  DeviceGuard device(device_index);
  const auto stream = reinterpret_cast<cudaStream_t>(stream_handle);
  refit_table_kernel<<<block_count(total_chunks), kThreads, 0, stream>>>(device_table, count, total_chunks);
  check_cuda(cudaGetLastError(), "refit_table_kernel launch");
}

}  // namespace stema::refit
