// Host side of attention.cuh: checks, the choice of kernel (sm90 wgmma on Hopper builds with CuTe,
// else the mma.sync one), the split-KV plan (attention_plan.h) and the launches. Included only by the
// attention_hd<D>.cu instantiation files.
#pragma once

#include <cuda_runtime.h>

#include <climits>
#include <cstdint>

#include "kernels/attention/attention.cuh"
#include "kernels/attention/attention_combine.cuh"
#include "kernels/attention/attention_plan.h"
#include "kernels/attention/sm80_attention_kernel.cuh"
#include "kernels/attention/sm90_attention_kernel.cuh"
#include "kernels/common/arch.h"
#include "kernels/kernel_plan.h"

namespace dgemma::kernels::attention_detail {

// Whether this build holds sm_90a code with CuTe and the current device is exactly 9.0 (common/arch.h).
inline bool sm90_kernel_usable() { return sm90_wgmma_usable(); }

inline bool valid_params(const AttentionParams& p, int head_dim) {
  if (p.head_dim != head_dim || p.num_kv_heads <= 0 || p.num_heads <= 0 || p.num_heads % p.num_kv_heads != 0 ||
      p.rows < 0 || p.max_count < 0 || !attention_plan::is_pow2(p.block_size) || p.max_blocks_per_row < 0 ||
      p.splits < 0 || p.max_cached < 0)
    return false;
  if (static_cast<long long>(p.max_count) * (p.num_heads / p.num_kv_heads) > INT_MAX || p.rows > 65535 ||
      static_cast<long long>(p.num_kv_heads) * attention_plan::kMaxSplits > 65535)
    return false;
  return true;
}

template <int D>
cudaError_t plan_launch(const AttentionParams& p, AttentionLaunchPlan* plan) {
  if (!plan || !valid_params(p, D)) return cudaErrorInvalidValue;
  plan->sm90 = !p.mma_sync && sm90_kernel_usable();
  const attention_plan::TileShape ts = plan->sm90 ? attention_plan::sm90_tiles(D) : attention_plan::sm80_tiles(D);
  plan->block_m = ts.block_m;
  plan->block_n = ts.block_n;
  int dev = 0, sms = 0;
  cudaError_t err = cudaGetDevice(&dev);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
  if (err != cudaSuccess) return err;
  const int G = p.num_heads / p.num_kv_heads;
  const long long m_tiles = (static_cast<long long>(p.max_count) * G + ts.block_m - 1) / ts.block_m;
  const long long base = m_tiles * p.num_kv_heads * p.rows;
  const int tiles = attention_plan::max_tiles(p.max_cached, p.max_count, attention_plan::log2_exact(ts.block_n));
  plan->splits = attention_plan::choose_splits(base, tiles, sms, p.splits);
  plan->workspace_bytes = attention_plan::workspace_bytes(plan->splits, p.rows, p.max_count, p.num_heads, D);
  return cudaSuccess;
}

template <class Kernel>
cudaError_t launch_kernel(Kernel kernel, dim3 grid, int threads, int smem, const AttnArgs& a, cudaStream_t stream) {
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  if (err != cudaSuccess) return err;
  kernel<<<grid, threads, smem, stream>>>(a);
  return cudaGetLastError();
}

template <int D>
cudaError_t forward(const AttentionParams& p, cudaStream_t stream) {
  AttentionLaunchPlan plan;
  if (!valid_params(p, D)) return cudaErrorInvalidValue;
  if (p.rows == 0 || p.max_count == 0) return cudaSuccess;
  auto misaligned = [](const void* ptr) { return (reinterpret_cast<uintptr_t>(ptr) & 15) != 0; };
  if (!p.q || !p.k_new || !p.v_new || !p.out || !p.block_table || !p.cache_first_pos || !p.cache_start ||
      !p.cache_len || !p.tok0 || !p.count || misaligned(p.q) || misaligned(p.k_new) || misaligned(p.v_new) ||
      misaligned(p.k_cache) || misaligned(p.v_cache) || misaligned(p.out) || misaligned(p.workspace))
    return cudaErrorInvalidValue;
  cudaError_t err = plan_launch<D>(p, &plan);
  if (err != cudaSuccess) return err;
  if (plan.splits > 1 && (!p.workspace || p.workspace_bytes < plan.workspace_bytes)) plan.splits = 1;

  AttnArgs a;
  a.p = p;
  a.lg_bs = attention_plan::log2_exact(p.block_size);
  a.splits = plan.splits;
  a.ws_o = plan.splits > 1 ? static_cast<float*>(p.workspace) : nullptr;
  a.ws_ml = plan.splits > 1
                ? reinterpret_cast<float2*>(a.ws_o + attention_plan::workspace_o_floats(plan.splits, p.rows, p.max_count,
                                                                                      p.num_heads, D))
                : nullptr;
  const int G = p.num_heads / p.num_kv_heads;
  const unsigned m_tiles = static_cast<unsigned>((static_cast<long long>(p.max_count) * G + plan.block_m - 1) / plan.block_m);
  const dim3 grid(m_tiles, static_cast<unsigned>(p.num_kv_heads * plan.splits), static_cast<unsigned>(p.rows));
  if (plan.sm90) {
    using Cfg = Sm90Config<D>;
    err = launch_kernel(sm90_attention_kernel<Cfg>, grid, Cfg::kThreads, Cfg::kSmemBytes, a, stream);
  } else {
    using Cfg = typename Sm80Tiles<D>::Cfg;
    err = launch_kernel(sm80_attention_kernel<Cfg>, grid, Cfg::kThreads, Cfg::kSmemBytes, a, stream);
  }
  if (err != cudaSuccess || plan.splits == 1) return err;
  attention_combine_kernel<D><<<dim3(static_cast<unsigned>(p.max_count), static_cast<unsigned>(p.rows)),
                                kCombineThreads, 0, stream>>>(a);
  return cudaGetLastError();
}

}  // namespace dgemma::kernels::attention_detail

namespace dgemma::kernels {

template <int kHeadDim>
cudaError_t attention_forward_hd(const AttentionParams& p, cudaStream_t stream) {
  return attention_detail::forward<kHeadDim>(p, stream);
}

template <int kHeadDim>
void attention_kernel_plans_hd(KernelPlans& out) {
  using namespace attention_detail;
  const std::string d = std::to_string(kHeadDim);
  using S90 = Sm90Config<kHeadDim>;
  using S80 = typename Sm80Tiles<kHeadDim>::Cfg;
  out.push_back({"sm90_attention_kernel<.*Sm90Config<" + d + ">", S90::kThreads, S90::kSmemBytes, S90::kCtasPerSm,
                 "Sm90Config::kCtasPerSm: operand panels of " + std::to_string(S90::kSmemBytes / 1024) +
                     " KB, 255 registers per thread"});
  out.push_back({"sm80_attention_kernel<.*AttnConfig<" + d + ",", S80::kThreads, S80::kSmemBytes, S80::kCtasPerSm,
                 "AttnConfig::kCtasPerSm: 128 output dims per warp in registers"});
  out.push_back({"attention_combine_kernel<" + d + ">", kCombineThreads, 0, kCombineCtasPerSm,
                 "kCombineCtasPerSm: half the SM's threads at <= 64 registers"});
}

template <int kHeadDim>
cudaError_t attention_launch_plan_hd(const AttentionParams& p, AttentionLaunchPlan* plan) {
  return attention_detail::plan_launch<kHeadDim>(p, plan);
}

}  // namespace dgemma::kernels
