// GAE and discounted returns on the CPU: rows in parallel, one sequential reverse scan per row.
// The argument checks here are shared with the CUDA launchers (this file is always compiled).
#include "stema/gae.h"

#include <cmath>

namespace stema::gae {

namespace {

// Below this many elements (about 0.1 ms of work for one thread) waking the OpenMP team costs
// more than it saves.
constexpr int64_t kParallelMinElements = 1 << 16;

void check_unit_interval(double value, const char* name) {
  STEMA_CHECK(std::isfinite(value) && value >= 0.0 && value <= 1.0,
              name << " must be a finite number in [0, 1], got " << value);
}

void check_shape(int64_t batch, int64_t length) {
  STEMA_CHECK(batch >= 0 && length >= 0, "sizes must be non-negative, got [" << batch << ", " << length << "]");
}

void check_rows(const StridedRows& rows, bool has_work, const char* name) {
  STEMA_CHECK(rows.dtype != DType::kFloat64, name << ": dtype float64 is not supported (fp32, fp16, bf16)");
  STEMA_CHECK(rows.row_stride >= 0, name << ": row stride must be non-negative, got " << rows.row_stride);
  STEMA_CHECK(!has_work || rows.data != nullptr, name << ": null data pointer");
}

void check_mask(const MaskRows& mask, bool has_work) {
  STEMA_CHECK(mask.row_stride >= 0, "mask: row stride must be non-negative, got " << mask.row_stride);
  STEMA_CHECK(!has_work || mask.data != nullptr, "mask: null data pointer");
}

template <DType D>
const typename CpuScalar<D>::storage* row_of(const StridedRows& rows, int64_t row) {
  return static_cast<const typename CpuScalar<D>::storage*>(rows.data) + row * rows.row_stride;
}

// One row of GAE, scanning t = length - 1 .. 0 in the reference's fp32 operation order.
template <DType RewardD, DType ValueD>
void gae_row(const typename CpuScalar<RewardD>::storage* rewards, const typename CpuScalar<ValueD>::storage* values,
             const uint8_t* mask, int64_t length, float gamma, float trace_decay, float* advantages,
             float* returns) {
  float next_value = 0.0f;
  float next_advantage = 0.0f;
  for (int64_t t = length - 1; t >= 0; --t) {
    if (mask[t] == 0) {
      advantages[t] = 0.0f;
      returns[t] = 0.0f;
      continue;
    }
    const float value = CpuScalar<ValueD>::load(values[t]);
    const float delta = (CpuScalar<RewardD>::load(rewards[t]) + gamma * next_value) - value;
    next_advantage = delta + trace_decay * next_advantage;
    next_value = value;
    advantages[t] = next_advantage;
    returns[t] = next_advantage + value;
  }
}

// One row of discounted returns, scanning t = length - 1 .. 0.
template <DType RewardD>
void discounted_returns_row(const typename CpuScalar<RewardD>::storage* rewards, const uint8_t* mask, int64_t length,
                            float gamma, float* returns) {
  float running = 0.0f;
  for (int64_t t = length - 1; t >= 0; --t) {
    if (mask[t] == 0) {
      returns[t] = 0.0f;
      continue;
    }
    running = CpuScalar<RewardD>::load(rewards[t]) + gamma * running;
    returns[t] = running;
  }
}

}  // namespace

void check_args(const GaeArgs& args) {
  check_shape(args.batch, args.length);
  const bool has_work = args.batch > 0 && args.length > 0;
  check_rows(args.rewards, has_work, "rewards");
  check_rows(args.values, has_work, "values");
  check_mask(args.mask, has_work);
  check_unit_interval(args.gamma, "gamma");
  check_unit_interval(args.lam, "lam");
  STEMA_CHECK(!has_work || (args.advantages != nullptr && args.returns != nullptr), "null output pointer");
}

void check_args(const DiscountedReturnsArgs& args) {
  check_shape(args.batch, args.length);
  const bool has_work = args.batch > 0 && args.length > 0;
  check_rows(args.rewards, has_work, "rewards");
  check_mask(args.mask, has_work);
  check_unit_interval(args.gamma, "gamma");
  STEMA_CHECK(!has_work || args.returns != nullptr, "null output pointer");
}

void gae_cpu(const GaeArgs& args) {
  check_args(args);
  const int64_t batch = args.batch;
  const int64_t length = args.length;
  const float gamma = static_cast<float>(args.gamma);
  const float trace_decay = static_cast<float>(args.gamma * args.lam);
  dispatch_float(args.rewards.dtype, [&](auto reward_tag) {
    constexpr DType RewardD = decltype(reward_tag)::value;
    dispatch_float(args.values.dtype, [&](auto value_tag) {
      constexpr DType ValueD = decltype(value_tag)::value;
#pragma omp parallel for schedule(static) if (batch * length >= kParallelMinElements)
      for (int64_t row = 0; row < batch; ++row) {
        gae_row<RewardD, ValueD>(row_of<RewardD>(args.rewards, row), row_of<ValueD>(args.values, row),
                                 args.mask.data + row * args.mask.row_stride, length, gamma, trace_decay,
                                 args.advantages + row * length, args.returns + row * length);
      }
    });
  });
}

void discounted_returns_cpu(const DiscountedReturnsArgs& args) {
  check_args(args);
  const int64_t batch = args.batch;
  const int64_t length = args.length;
  const float gamma = static_cast<float>(args.gamma);
  dispatch_float(args.rewards.dtype, [&](auto reward_tag) {
    constexpr DType RewardD = decltype(reward_tag)::value;
#pragma omp parallel for schedule(static) if (batch * length >= kParallelMinElements)
    for (int64_t row = 0; row < batch; ++row) {
      discounted_returns_row<RewardD>(row_of<RewardD>(args.rewards, row), args.mask.data + row * args.mask.row_stride,
                                      length, gamma, args.returns + row * length);
    }
  });
}

}  // namespace stema::gae
