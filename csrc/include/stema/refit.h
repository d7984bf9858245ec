// In-place refit: copy many (src -> dst) tensor pairs at once, casting dtype on the way.
//
// In PPO the generation engine keeps its own inference copy of the weights (another dtype, its own
// layout such as a fused QKV buffer). Each step the trainer's weights are copied into those
// buffers in place. Every pair is described by one RefitDescriptor; the whole refit is split into
// chunks of about the same number of bytes across all pairs, so that 200 small tensors and one
// huge tensor both spread over every CPU thread (one OpenMP region) or every SM (one launch).
#pragma once

#include <cstdint>
#include <vector>

#if defined(__CUDACC__)
#define STEMA_REFIT_HOST_DEVICE __host__ __device__
#else
#define STEMA_REFIT_HOST_DEVICE
#endif

namespace stema::refit {

// dtype code of a pair whose src and dst have the same dtype (any dtype, integers included): its
// `count` is a number of bytes, copied bit for bit.
constexpr int kRawBytes = -1;

// Bytes of src read per chunk: a CPU thread or a CUDA block takes one chunk at a time.
constexpr std::int64_t kCpuChunkBytes = 256 * 1024;
constexpr std::int64_t kCudaChunkBytes = 32 * 1024;

// One pair as the kernels see it. Both buffers are dense (contiguous) and do not overlap.
struct RefitDescriptor {
  void* dst;
  const void* src;
  std::int64_t count;           // elements, or bytes when both dtypes are kRawBytes
  std::int64_t chunk_elements;  // elements (bytes) per chunk, a multiple of 16
  std::int64_t first_chunk;     // index of this pair's first chunk among all chunks of the refit
  std::int32_t dst_dtype;       // stema::DType code or kRawBytes
  std::int32_t src_dtype;
};
static_assert(sizeof(RefitDescriptor) == 48, "the Python side sizes descriptor tables from this");

// Descriptors passed by value to one CUDA launch: 640 * 48 bytes plus a small header stay under the
// 32764 bytes of kernel parameters that CUDA 12.1+ allows on Volta and newer.
constexpr int kMaxDescriptorsPerLaunch = 640;

// The pairs of one refit as parallel arrays (what the bindings receive from Python).
struct RefitPairs {
  std::vector<std::uintptr_t> dst;
  std::vector<std::uintptr_t> src;
  std::vector<std::int64_t> counts;
  std::vector<int> dst_dtypes;
  std::vector<int> src_dtypes;
};

// Throws std::invalid_argument naming the pair for unknown dtype codes, negative counts, null
// pointers, and overlaps: no dst may overlap another dst or any src. O(n log n).
void check_pairs(const RefitPairs& pairs);

// check_pairs, then writes one descriptor per pair into `table` (room for pairs.counts.size()),
// chunking by `chunk_bytes` of src. Returns the number of chunks.
std::int64_t describe_pairs(const RefitPairs& pairs, std::int64_t chunk_bytes, RefitDescriptor* table);

// Index of the pair that owns chunk `chunk`: the last descriptor whose first_chunk <= chunk (pairs
// with no elements own no chunk and are skipped). Binary search over first_chunk, O(log count).
STEMA_REFIT_HOST_DEVICE inline std::int64_t find_pair(const RefitDescriptor* table, std::int64_t count,
                                                      std::int64_t chunk) {
  std::int64_t low = 0;
  std::int64_t high = count;  // first index whose first_chunk > chunk
  while (low < high) {
    const std::int64_t middle = low + (high - low) / 2;
    if (table[middle].first_chunk <= chunk) {
      low = middle + 1;
    } else {
      high = middle;
    }
  }
  return low - 1;
}

// Runs every chunk of `table` (described with kCpuChunkBytes) in one OpenMP parallel region.
void refit_cpu(const RefitDescriptor* table, std::int64_t count, std::int64_t total_chunks);

// ---- Row-block packing (CPU): refit straight into a GEMM library's prepacked weight layout.
//
// oneDNN prepacks a linear weight W [rows, cols] (rows = output features) for its CPU GEMMs into
// blocks of `block` rows; inside a block the columns come in groups of `pair` (1 for fp32, 2 for
// bf16's VNNI pairs), the rows of the block inner to each group:
//     packed[b][c / pair][r][c % pair] = W[b * block + r][c]        (r < block)
// One descriptor packs src into that layout, casting src_dtype -> dst_dtype as the refit does
// (bit-identical to converting with `refit_cpu` and then letting oneDNN reorder).
struct PackRowsDescriptor {
  void* packed;
  const void* src;              // row-major [rows, cols]
  std::int64_t rows;            // a multiple of block
  std::int64_t cols;            // a multiple of pair
  std::int64_t block;           // 1 to 128
  std::int64_t pair;
  std::int32_t dst_dtype;       // stema::DType codes (equal codes copy the bits)
  std::int32_t src_dtype;
};

// Throws std::invalid_argument naming the descriptor for bad sizes, codes or null pointers.
void check_pack_rows(const PackRowsDescriptor* table, std::int64_t count);
// Packs every descriptor (one OpenMP region over all row blocks of all descriptors).
void pack_rows_cpu(const PackRowsDescriptor* table, std::int64_t count);

#if defined(STEMA_WITH_CUDA)
// `host_table` (described with kCudaChunkBytes) is passed by value in the kernel parameters: one
// launch per kMaxDescriptorsPerLaunch pairs. Nothing is allocated.
void refit_cuda(const RefitDescriptor* host_table, std::int64_t count, std::int64_t total_chunks,
                int device_index, std::uintptr_t stream);

// `device_table` lives in device memory (a plan uploads it once): one launch for any count.
void refit_table_cuda(const RefitDescriptor* device_table, std::int64_t count, std::int64_t total_chunks,
                      int device_index, std::uintptr_t stream);
#endif

}  // namespace stema::refit
