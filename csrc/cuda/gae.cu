// GAE and discounted returns on CUDA: one reverse scan per row, in one of two layouts.
//
// Both outputs are one masked reverse affine recurrence per row, x <- delta_t + decay * x at the
// valid positions t (masked positions keep x and write 0), with
//   GAE:                delta_t = r_t + gamma * V_next(t) - V_t, decay = gamma * lam, out x and x + V_t
//   discounted returns: delta_t = r_t,                           decay = gamma,       out x
// * Thread per row (rows shorter than kWarpLayoutMinLength): the reference's sequential loop.
// * Warp per row (longer rows): the warp walks the row from its end in chunks of kChunkLength;
//   lane l owns kItemsPerLane consecutive positions of a chunk. V_next is a "next valid value"
//   lookup (ballot + shuffle, exact); each lane's positions compose to one affine map
//   x -> scale * x + offset, a shuffle suffix scan composes the maps of the later lanes, and each
//   lane then replays its own positions sequentially from the x that enters it. Only the x that
//   crosses lanes is computed by the composed maps, so results differ from the sequential loop by
//   fp32 rounding of that reassociation.
// The sequential steps round each multiply and add separately (__fmul_rn/__fadd_rn), as the
// reference's separate torch ops do; nvcc would otherwise contract them into FMAs.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <stdexcept>
#include <string>

#include "stema/gae.h"

namespace stema::gae {

namespace {

constexpr int kWarpSize = 32;
constexpr unsigned kFullWarp = 0xffffffffu;
constexpr int kItemsPerLane = 8;
constexpr int64_t kChunkLength = kWarpSize * kItemsPerLane;
constexpr int64_t kWarpLayoutMinLength = 64;
constexpr int kThreadsPerBlock = 256;
constexpr int kWarpsPerBlock = kThreadsPerBlock / kWarpSize;
// Grid-stride loops cover any batch; more blocks than this add nothing on one GPU.
constexpr int64_t kMaxBlocks = 65535;

// One row-scan problem as the kernels see it (typed by the template arguments).
struct ScanArgs {
  int64_t batch;
  int64_t length;
  const void* rewards;
  int64_t rewards_row_stride;
  const void* values;  // GAE only
  int64_t values_row_stride;
  const uint8_t* mask;
  int64_t mask_row_stride;
  float gamma;         // discount of V_next in delta (GAE only)
  float decay;         // gamma * lam (GAE) or gamma (discounted returns)
  float* scanned;      // advantages (GAE) or discounted returns
  float* returns;      // advantages + values (GAE only)
};

__device__ __forceinline__ float load_float(const float* p) { return *p; }
__device__ __forceinline__ float load_float(const __half* p) { return __half2float(*p); }
__device__ __forceinline__ float load_float(const __nv_bfloat16* p) { return __bfloat162float(*p); }

// delta + decay * x with two roundings (the reference's order).
__device__ __forceinline__ float recur(float delta, float decay, float x) { return __fadd_rn(delta, __fmul_rn(decay, x)); }

// GAE's delta_t = (r_t + gamma * V_next) - V_t with separate roundings.
__device__ __forceinline__ float td_residual(float reward, float gamma, float next_value, float value) {
  return __fsub_rn(__fadd_rn(reward, __fmul_rn(gamma, next_value)), value);
}

template <typename RewardT, typename ValueT, bool kWithValues>
__global__ void scan_thread_per_row_kernel(ScanArgs args) {
  const int64_t row_step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; row < args.batch; row += row_step) {
    const RewardT* rewards = static_cast<const RewardT*>(args.rewards) + row * args.rewards_row_stride;
    const ValueT* values = kWithValues ? static_cast<const ValueT*>(args.values) + row * args.values_row_stride : nullptr;
    const uint8_t* mask = args.mask + row * args.mask_row_stride;
    float* scanned = args.scanned + row * args.length;
    float* returns = kWithValues ? args.returns + row * args.length : nullptr;
    float next_value = 0.0f;
    float x = 0.0f;
    for (int64_t t = args.length - 1; t >= 0; --t) {
      // Load before testing the mask, so that the three loads are in flight together.
      const bool valid = mask[t] != 0;
      const float reward = load_float(rewards + t);
      const float value = kWithValues ? load_float(values + t) : 0.0f;
      if (!valid) {
        scanned[t] = 0.0f;
        if constexpr (kWithValues) returns[t] = 0.0f;
        continue;
      }
      if constexpr (kWithValues) {
        x = recur(td_residual(reward, args.gamma, next_value, value), args.decay, x);
        next_value = value;
        returns[t] = __fadd_rn(x, value);
      } else {
        x = recur(reward, args.decay, x);
      }
      scanned[t] = x;
    }
  }
}

// Composes lane maps x -> scale * x + offset over lanes l, l+1, ..., 31 (lane 31's map applied
// first): on return lane l holds the composition of its own map with those of all later lanes.
__device__ __forceinline__ void suffix_compose(int lane, float& scale, float& offset) {
#pragma unroll
  for (int distance = 1; distance < kWarpSize; distance *= 2) {
    const float later_scale = __shfl_down_sync(kFullWarp, scale, distance);
    const float later_offset = __shfl_down_sync(kFullWarp, offset, distance);
    if (lane + distance < kWarpSize) {
      offset = scale * later_offset + offset;
      scale = scale * later_scale;
    }
  }
}

template <typename RewardT, typename ValueT, bool kWithValues>
__global__ void scan_warp_per_row_kernel(ScanArgs args) {
  const int lane = static_cast<int>(threadIdx.x) % kWarpSize;
  const int64_t row_step = static_cast<int64_t>(gridDim.x) * kWarpsPerBlock;
  // `row` is the same for the whole warp, so every lane reaches every __*_sync below.
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarpSize; row < args.batch;
       row += row_step) {
    const RewardT* rewards = static_cast<const RewardT*>(args.rewards) + row * args.rewards_row_stride;
    const ValueT* values = kWithValues ? static_cast<const ValueT*>(args.values) + row * args.values_row_stride : nullptr;
    const uint8_t* mask = args.mask + row * args.mask_row_stride;
    float* scanned = args.scanned + row * args.length;
    float* returns = kWithValues ? args.returns + row * args.length : nullptr;
    // x and V at the first valid position after the current chunk (0 after the row's end).
    float carry_x = 0.0f;
    float carry_value = 0.0f;
    for (int64_t chunk_end = args.length; chunk_end > 0; chunk_end -= kChunkLength) {
      // This lane's positions: lane_start .. lane_start + kItemsPerLane - 1 (< chunk_end; may be < 0).
      const int64_t lane_start = chunk_end - kChunkLength + static_cast<int64_t>(lane) * kItemsPerLane;
      float reward[kItemsPerLane];
      float value[kItemsPerLane];
      bool valid[kItemsPerLane];
#pragma unroll
      for (int j = 0; j < kItemsPerLane; ++j) {
        const int64_t t = lane_start + j;
        const bool in_row = t >= 0;
        valid[j] = in_row && mask[t] != 0;
        reward[j] = in_row ? load_float(rewards + t) : 0.0f;
        value[j] = 0.0f;
        if constexpr (kWithValues) value[j] = in_row ? load_float(values + t) : 0.0f;
      }

      // V_next entering this lane: the value at the first valid position of the nearest later
      // lane that has one, else the carry from the chunk after this one.
      float next_value = carry_value;
      if constexpr (kWithValues) {
        bool lane_has_valid = false;
        float lane_first_value = 0.0f;
#pragma unroll
        for (int j = kItemsPerLane - 1; j >= 0; --j) {
          if (valid[j]) {
            lane_has_valid = true;
            lane_first_value = value[j];
          }
        }
        const unsigned lanes_with_valid = __ballot_sync(kFullWarp, lane_has_valid);
        const unsigned later_lanes = lane == kWarpSize - 1 ? 0u : lanes_with_valid & (kFullWarp << (lane + 1));
        const int source_lane = later_lanes != 0u ? __ffs(static_cast<int>(later_lanes)) - 1 : lane;
        const float later_first_value = __shfl_sync(kFullWarp, lane_first_value, source_lane);
        if (later_lanes != 0u) next_value = later_first_value;
      }

      // delta at each valid position and this lane's composed map x -> scale * x + offset.
      float delta[kItemsPerLane];
      float scale = 1.0f;
      float offset = 0.0f;
#pragma unroll
      for (int j = kItemsPerLane - 1; j >= 0; --j) {
        delta[j] = 0.0f;
        if (valid[j]) {
          if constexpr (kWithValues) {
            delta[j] = td_residual(reward[j], args.gamma, next_value, value[j]);
            next_value = value[j];
          } else {
            delta[j] = reward[j];
          }
          scale = __fmul_rn(args.decay, scale);
          offset = recur(delta[j], args.decay, offset);
        }
      }

      // x entering this lane = (maps of lanes lane+1 .. 31)(carry_x).
      suffix_compose(lane, scale, offset);
      const float later_scale = __shfl_down_sync(kFullWarp, scale, 1);
      const float later_offset = __shfl_down_sync(kFullWarp, offset, 1);
      float x = lane == kWarpSize - 1 ? carry_x : later_scale * carry_x + later_offset;

#pragma unroll
      for (int j = kItemsPerLane - 1; j >= 0; --j) {
        const int64_t t = lane_start + j;
        if (t < 0) continue;
        if (valid[j]) {
          x = recur(delta[j], args.decay, x);
          scanned[t] = x;
          if constexpr (kWithValues) returns[t] = __fadd_rn(x, value[j]);
        } else {
          scanned[t] = 0.0f;
          if constexpr (kWithValues) returns[t] = 0.0f;
        }
      }
      // Lane 0 now holds x and V_next at the chunk's first valid position (or what entered it).
      carry_x = __shfl_sync(kFullWarp, x, 0);
      if constexpr (kWithValues) carry_value = __shfl_sync(kFullWarp, next_value, 0);
    }
  }
}

void check_launch(const char* kernel) {
  const cudaError_t error = cudaGetLastError();
  if (error != cudaSuccess) {
    throw std::runtime_error(std::string("stema: ") + kernel + " launch failed: " + cudaGetErrorString(error));
  }
}

int blocks_for(int64_t work_items, int64_t items_per_block) {
  return static_cast<int>(std::min(kMaxBlocks, (work_items + items_per_block - 1) / items_per_block));
}

template <typename RewardT, typename ValueT, bool kWithValues>
void launch_scan(const ScanArgs& args, cudaStream_t stream) {
  if (args.length >= kWarpLayoutMinLength) {
    scan_warp_per_row_kernel<RewardT, ValueT, kWithValues>
        <<<blocks_for(args.batch, kWarpsPerBlock), kThreadsPerBlock, 0, stream>>>(args);
    check_launch("scan_warp_per_row_kernel");
  } else {
    scan_thread_per_row_kernel<RewardT, ValueT, kWithValues>
        <<<blocks_for(args.batch, kThreadsPerBlock), kThreadsPerBlock, 0, stream>>>(args);
    check_launch("scan_thread_per_row_kernel");
  }
}

// Calls fn(T{}) with T the CUDA storage type of `dtype` (check_args has ruled out fp64).
template <typename Fn>
void dispatch_cuda_float(DType dtype, Fn&& fn) {
  switch (dtype) {
    case DType::kFloat32: fn(float{}); return;
    case DType::kFloat16: fn(__half{}); return;
    case DType::kBFloat16: fn(__nv_bfloat16{}); return;
    case DType::kFloat64: break;
  }
  throw std::invalid_argument(std::string("stema: unsupported dtype ") + dtype_name(dtype));
}

}  // namespace

void gae_cuda(const GaeArgs& args, void* stream) {
  check_args(args);
  if (args.batch == 0 || args.length == 0) return;
  const ScanArgs scan{args.batch,
                      args.length,
                      args.rewards.data,
                      args.rewards.row_stride,
                      args.values.data,
                      args.values.row_stride,
                      args.mask.data,
                      args.mask.row_stride,
                      static_cast<float>(args.gamma),
                      static_cast<float>(args.gamma * args.lam),
                      args.advantages,
                      args.returns};
  dispatch_cuda_float(args.rewards.dtype, [&](auto reward_tag) {
    dispatch_cuda_float(args.values.dtype, [&](auto value_tag) {
      launch_scan<decltype(reward_tag), decltype(value_tag), true>(scan, static_cast<cudaStream_t>(stream));
    });
  });
}

void discounted_returns_cuda(const DiscountedReturnsArgs& args, void* stream) {
  check_args(args);
  if (args.batch == 0 || args.length == 0) return;
  const ScanArgs scan{args.batch,
                      args.length,
                      args.rewards.data,
                      args.rewards.row_stride,
                      nullptr,
                      0,
                      args.mask.data,
                      args.mask.row_stride,
                      static_cast<float>(args.gamma),
                      static_cast<float>(args.gamma),
                      args.returns,
                      nullptr};
  dispatch_cuda_float(args.rewards.dtype, [&](auto reward_tag) {
    launch_scan<decltype(reward_tag), float, false>(scan, static_cast<cudaStream_t>(stream));
  });
}

}  // namespace stema::gae
