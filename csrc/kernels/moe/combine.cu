// MoE elementwise steps around the expert GEMMs (see moe.cuh): the GELU gate between gate_up and
// down, and the weighted, ordered combine of each token's expert outputs.
#include "kernels/common/bf16.cuh"
#include "kernels/kernel_plan.h"
#include "kernels/moe/moe.cuh"

namespace dgemma::kernels {
namespace {

constexpr int kMaxK = 32;
constexpr int kCombineThreads = 256;
constexpr int kCombineCtasPerSm = 4;  // half the SM's threads: <= 64 registers per thread

// Grid-stride over groups of V outputs (V = 8: one 16-byte load of gate and of up).
template <int V>
__global__ void __launch_bounds__(256) gelu_gate_kernel(const __nv_bfloat16* __restrict__ h,
                                                        __nv_bfloat16* __restrict__ act, int M, int I) {
  const int groups = I / V;
  const size_t n = static_cast<size_t>(M) * groups;
  for (size_t v = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x; v < n;
       v += static_cast<size_t>(gridDim.x) * blockDim.x) {
    const size_t r = v / groups;
    const int c = static_cast<int>(v % groups) * V;
    const __nv_bfloat16* gate = h + r * 2 * I + c;
    const __nv_bfloat16* up = gate + I;
    if constexpr (V == 8) {
      float g[8], u[8], o[8];
      unpack8(*reinterpret_cast<const uint4*>(gate), g);
      unpack8(*reinterpret_cast<const uint4*>(up), u);
#pragma unroll
      for (int j = 0; j < 8; ++j) o[j] = gelu_tanh(g[j]) * u[j];
      *reinterpret_cast<uint4*>(act + r * I + c) = pack8(o);
    } else {
      act[r * I + c] = __float2bfloat16(gelu_tanh(__bfloat162float(*gate)) * __bfloat162float(*up));
    }
  }
}

__device__ inline void store8(float* dst, const float f[8]) {
  *reinterpret_cast<float4*>(dst) = make_float4(f[0], f[1], f[2], f[3]);
  *reinterpret_cast<float4*>(dst + 4) = make_float4(f[4], f[5], f[6], f[7]);
}
__device__ inline void store8(__nv_bfloat16* dst, const float f[8]) { *reinterpret_cast<uint4*>(dst) = pack8(f); }
__device__ inline void store1(float* dst, float v) { *dst = v; }
__device__ inline void store1(__nv_bfloat16* dst, float v) { *dst = __float2bfloat16(v); }

// One block per token. Its slots are visited in ascending expert order; each weighted row is rounded
// to fp32 before it is added (__fmul_rn/__fadd_rn: no FMA contraction), as in CpuBackend::moe_experts.
template <typename To, bool kVec8>
__global__ void __launch_bounds__(kCombineThreads) combine_kernel(const MoeCombineParams<To> p) {
  __shared__ int rows[kMaxK];
  __shared__ float wts[kMaxK];
  const int t = blockIdx.x, k = p.k, H = p.H;
  const size_t s0 = static_cast<size_t>(t) * k;
  if (threadIdx.x < k) {
    const int me = threadIdx.x;
    const int e = p.topk_idx[s0 + me];
    int rank = 0;
    for (int j = 0; j < k; ++j) {
      const int ej = p.topk_idx[s0 + j];
      rank += (ej < e) || (ej == e && j < me);
    }
    rows[rank] = p.inv[s0 + me];
    wts[rank] = p.topk_w[s0 + me];
  }
  __syncthreads();
  To* out = p.out + static_cast<size_t>(t) * H;
  if constexpr (kVec8) {
    for (int c = threadIdx.x * 8; c < H; c += blockDim.x * 8) {
      float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
      for (int s = 0; s < k; ++s) {
        float f[8];
        unpack8(*reinterpret_cast<const uint4*>(p.dn + static_cast<size_t>(rows[s]) * H + c), f);
        const float w = wts[s];
#pragma unroll
        for (int j = 0; j < 8; ++j) acc[j] = __fadd_rn(acc[j], __fmul_rn(w, f[j]));
      }
      store8(out + c, acc);
    }
  } else {
    for (int c = threadIdx.x; c < H; c += blockDim.x) {
      float acc = 0.f;
      for (int s = 0; s < k; ++s)
        acc = __fadd_rn(acc, __fmul_rn(wts[s], __bfloat162float(p.dn[static_cast<size_t>(rows[s]) * H + c])));
      store1(out + c, acc);
    }
  }
}

bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15) == 0; }

int grid_for(size_t n, int threads) {
  const size_t blocks = (n + threads - 1) / threads;
  return static_cast<int>(blocks < 65536 ? blocks : 65536);
}

}  // namespace

cudaError_t moe_gelu_gate(const MoeGeluGateParams& p, cudaStream_t stream) {
  if (p.M < 0 || p.I <= 0) return cudaErrorInvalidValue;
  if (p.M == 0) return cudaSuccess;
  if (p.I % 8 == 0 && aligned16(p.h) && aligned16(p.act)) {
    gelu_gate_kernel<8><<<grid_for(static_cast<size_t>(p.M) * (p.I / 8), 256), 256, 0, stream>>>(p.h, p.act, p.M, p.I);
  } else {
    gelu_gate_kernel<1><<<grid_for(static_cast<size_t>(p.M) * p.I, 256), 256, 0, stream>>>(p.h, p.act, p.M, p.I);
  }
  return cudaGetLastError();
}

template <typename To>
cudaError_t moe_combine(const MoeCombineParams<To>& p, cudaStream_t stream) {
  if (p.T < 0 || p.H <= 0 || p.k < 1 || p.k > kMaxK) return cudaErrorInvalidValue;
  if (p.T == 0) return cudaSuccess;
  if (p.H % 8 == 0 && aligned16(p.dn) && aligned16(p.out))
    combine_kernel<To, true><<<p.T, kCombineThreads, 0, stream>>>(p);
  else
    combine_kernel<To, false><<<p.T, kCombineThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

void moe_combine_kernel_plans(KernelPlans& out) {
  out.push_back({"::combine_kernel<", kCombineThreads, 0, kCombineCtasPerSm,
                 "kCombineCtasPerSm: half the SM's threads at <= 64 registers"});
}

template cudaError_t moe_combine<float>(const MoeCombineParams<float>&, cudaStream_t);
template cudaError_t moe_combine<__nv_bfloat16>(const MoeCombineParams<__nv_bfloat16>&, cudaStream_t);

}  // namespace dgemma::kernels
