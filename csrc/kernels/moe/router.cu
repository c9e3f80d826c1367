// MoE router: scale-free RMSNorm, router projection, softmax, top-k, renormalisation (see moe.cuh).
// A block routes kTok tokens so each router weight row is read once per kTok tokens: the normalised
// tokens sit in shared memory, each warp computes the logits of a strided set of experts for all of
// them, then one warp per token does softmax and top-k.
#include <cmath>

#include "kernels/common/bf16.cuh"
#include "kernels/moe/moe.cuh"

namespace dgemma::kernels {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kTok = 4;     // tokens per block (<= kWarps)
constexpr int kMaxK = 32;   // top-k limit: one selection slot per lane
constexpr float kTaken = -2.0f;  // probabilities are >= 0 (NaN is stored as -1): marks a chosen expert



template <typename Tx, bool kVec8>
__global__ void __launch_bounds__(kThreads) router_kernel(const MoeRouterParams<Tx> p, float root) {
  extern __shared__ float smem[];
  float* xs = smem;                  // [kTok, H]: normalised, scaled tokens
  float* probs = smem + kTok * p.H;  // [kTok, E]: logits, then probabilities
  __shared__ int sel_idx[kTok][kMaxK];
  __shared__ float sel_p[kTok][kMaxK];

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int t0 = blockIdx.x * kTok;
  const int nt = min(kTok, p.T - t0);
  const int H = p.H, E = p.E;

  // 1. One warp per token: x * (mean(x^2) + eps)^-0.5, then * router_scale * H^-0.5 (the CPU's order).
  if (warp < nt) {
    const Tx* xr = p.x + static_cast<size_t>(t0 + warp) * H;
    float ss = 0.f;
    for (int i = lane; i < H; i += 32) {
      const float v = to_f(xr[i]);
      ss += v * v;
    }
    for (int o = 16; o > 0; o >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, o);
    const float inv = rsqrtf(ss / H + p.eps);
    float* xw = xs + warp * H;
    for (int i = lane; i < H; i += 32) xw[i] = ((to_f(xr[i]) * inv) * p.router_scale[i]) * root;
  }
  __syncthreads();

  // 2. Logits: warp w takes experts w, w + kWarps, ...; lanes split H; fixed-order reductions.
  for (int e = warp; e < E; e += kWarps) {
    const __nv_bfloat16* wr = p.router_proj + static_cast<size_t>(e) * H;
    float acc[kTok];
#pragma unroll
    for (int j = 0; j < kTok; ++j) acc[j] = 0.f;
    if constexpr (kVec8) {
      for (int i = lane * 8; i < H; i += 32 * 8) {
        float f[8];
        unpack8(*reinterpret_cast<const uint4*>(wr + i), f);
#pragma unroll
        for (int j = 0; j < kTok; ++j) {
          if (j < nt) {
            const float* xv = xs + j * H + i;
#pragma unroll
            for (int u = 0; u < 8; ++u) acc[j] += f[u] * xv[u];
          }
        }
      }
    } else {
      for (int i = lane; i < H; i += 32) {
        const float f = __bfloat162float(wr[i]);
#pragma unroll
        for (int j = 0; j < kTok; ++j)
          if (j < nt) acc[j] += f * xs[j * H + i];
      }
    }
#pragma unroll
    for (int j = 0; j < kTok; ++j) {
      float a = acc[j];
      for (int o = 16; o > 0; o >>= 1) a += __shfl_xor_sync(0xffffffffu, a, o);
      if (lane == 0 && j < nt) probs[j * E + e] = a;
    }
  }
  __syncthreads();

  // 3. One warp per token: softmax in fp32, then k rounds of arg-max (higher probability, then lower index).
  if (warp < nt) {
    float* pr = probs + warp * E;
    float mx = -INFINITY;
    for (int e = lane; e < E; e += 32) mx = fmaxf(mx, pr[e]);
    for (int o = 16; o > 0; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
    float sum = 0.f;
    for (int e = lane; e < E; e += 32) {
      const float v = expf(pr[e] - mx);
      pr[e] = v;
      sum += v;
    }
    // Butterfly sums: every lane ends with the same bits (fp addition commutes).
    for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
    const float inv = 1.0f / sum;
    for (int e = lane; e < E; e += 32) {
      const float v = pr[e] * inv;
      pr[e] = (v == v) ? v : -1.0f;  // NaN input: keep the selection total and the indices valid
    }
    __syncwarp();
    for (int s = 0; s < p.k; ++s) {
      float bp = -INFINITY;
      int be = E;
      for (int e = lane; e < E; e += 32) {
        const float v = pr[e];
        if (v != kTaken && (v > bp || (v == bp && e < be))) bp = v, be = e;
      }
      for (int o = 16; o > 0; o >>= 1) {
        const float ob = __shfl_xor_sync(0xffffffffu, bp, o);
        const int oe = __shfl_xor_sync(0xffffffffu, be, o);
        if (ob > bp || (ob == bp && oe < be)) bp = ob, be = oe;
      }
      if (lane == 0) {
        sel_idx[warp][s] = be;
        sel_p[warp][s] = bp;
        pr[be] = kTaken;
      }
      __syncwarp();
    }
    if (lane == 0) {
      float s = 0.f;
      for (int j = 0; j < p.k; ++j) s += sel_p[warp][j];
      const size_t o = static_cast<size_t>(t0 + warp) * p.k;
      for (int j = 0; j < p.k; ++j) {
        const int e = sel_idx[warp][j];
        p.topk_idx[o + j] = e;
        p.topk_w[o + j] = (sel_p[warp][j] / s) * p.per_expert_scale[e];
      }
    }
  }
}

template <typename Tx, bool kVec8>
cudaError_t launch(const MoeRouterParams<Tx>& p, cudaStream_t stream) {
  const size_t smem = sizeof(float) * kTok * (static_cast<size_t>(p.H) + p.E);
  auto kernel = router_kernel<Tx, kVec8>;
  if (smem > 48 * 1024) {
    const cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                                 static_cast<int>(smem));
    if (err != cudaSuccess) return err;
  }
  const float root = static_cast<float>(std::pow(static_cast<double>(p.H), -0.5));
  kernel<<<(p.T + kTok - 1) / kTok, kThreads, smem, stream>>>(p, root);
  return cudaGetLastError();
}

}  // namespace

template <typename Tx>
cudaError_t moe_router(const MoeRouterParams<Tx>& p, cudaStream_t stream) {
  static_assert(kTok <= kWarps, "one warp per token in the softmax phase");
  if (p.T < 0 || p.H <= 0 || p.E <= 0 || p.k < 1 || p.k > p.E || p.k > kMaxK) return cudaErrorInvalidValue;
  if (p.T == 0) return cudaSuccess;
  const bool vec8 = p.H % 8 == 0 && (reinterpret_cast<uintptr_t>(p.router_proj) & 15) == 0;
  return vec8 ? launch<Tx, true>(p, stream) : launch<Tx, false>(p, stream);
}

template cudaError_t moe_router<float>(const MoeRouterParams<float>&, cudaStream_t);
template cudaError_t moe_router<__nv_bfloat16>(const MoeRouterParams<__nv_bfloat16>&, cudaStream_t);

}  // namespace dgemma::kernels
