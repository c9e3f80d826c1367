// MoE router: scale-free RMSNorm, router projection, softmax, top-k, renormalisation (see moe.cuh).
//
// Shape of the work (26B-A4B, one step at batch 1): T = 256 tokens, H = 2816, E = 128, k = 8. The
// projection is 92 MFMA in fp32 over 0.7 MB of bf16 weights and 2.9 MB of f32 residual: ~1 us of
// either at H100 rates, so what matters is filling the GPU and feeding the FMAs from shared memory
// without bank conflicts.
//
// Grid (ceil(T / kTok), ceil(E / kExp)): a CTA takes kTok = 8 tokens x kExp = 32 experts, 128 CTAs at
// the real shape (was 64 CTAs of 4 tokens x all experts). Its 8 warps first normalise one token each
// into shared memory (f32, the CPU's order of operations), then each warp computes 4 experts x 8
// tokens at once: lane l reads 4 consecutive bf16 of each of its 4 weight rows (8-byte loads, a warp
// covers 128 consecutive elements: coalesced) and the matching float4 of each token's row in shared
// memory (a warp reads 512 consecutive bytes: conflict-free), 128 FMAs per 8 shared loads, so shared
// bandwidth and FP32 issue are balanced. Fixed-order reductions: deterministic.
// Fused top-k: the logits go to a [T, E] f32 workspace; the last CTA of a token tile to finish (a
// per-tile counter, the threadfence-reduction pattern) does softmax and top-k for its 8 tokens, one
// warp each (the launch zeroes the counters on the stream first).
#include <cmath>

#include "kernels/common/bf16.cuh"
#include "kernels/kernel_plan.h"
#include "kernels/moe/moe.cuh"

namespace dgemma::kernels {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kTok = 8;                 // tokens per CTA: one warp each in the norm and top-k phases
constexpr int kExpPerWarp = 4;          // expert rows a warp computes at once
constexpr int kExp = kWarps * kExpPerWarp;  // experts per CTA
constexpr int kMaxK = 32;               // top-k limit: one selection slot per lane
constexpr float kTaken = -2.0f;         // probabilities are >= 0 (NaN is stored as -1): marks a chosen expert
static_assert(kTok == kWarps, "one warp per token in the norm and top-k phases");
// The occupancy plan: two CTAs per SM at the released model's H = 2816 (90 KB of shared tokens each),
// so <= 128 registers per thread.
constexpr int kCtasPerSm = 2;

// Dynamic shared memory: the CTA's kTok tokens (H floats each), later their E probabilities.
size_t smem_bytes(int H, int E) { return sizeof(float) * kTok * static_cast<size_t>(H > E ? H : E); }

size_t align256(size_t n) { return (n + 255) / 256 * 256; }

__device__ __forceinline__ void unpack4(const uint2& raw, float f[4]) {
  const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&raw);
  const float2 a = __bfloat1622float2(h[0]), b = __bfloat1622float2(h[1]);
  f[0] = a.x, f[1] = a.y, f[2] = b.x, f[3] = b.y;
}

// kVec4: H % 4 == 0 and router_proj 8-byte aligned (vector loads); otherwise one element per lane.
template <typename Tx, bool kVec4>
__global__ void __launch_bounds__(kThreads) router_kernel(const MoeRouterParams<Tx> p, float* logits,
                                                          uint32_t* tile_done, float root) {
  extern __shared__ float4 smem4[];
  float* smem = reinterpret_cast<float*>(smem4);
  float* xs = smem;  // [kTok, H]: normalised, scaled tokens; later [kTok, E] probabilities
  __shared__ int sel_idx[kTok][kMaxK];
  __shared__ float sel_p[kTok][kMaxK];
  __shared__ bool last;

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int t0 = blockIdx.x * kTok, e0 = blockIdx.y * kExp;
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

  // 2. Logits of this CTA's experts: warp w takes e0 + w * kExpPerWarp + {0..3}, all kTok tokens.
  {
    const int eb = e0 + warp * kExpPerWarp;
    const __nv_bfloat16* wr[kExpPerWarp];
#pragma unroll
    for (int u = 0; u < kExpPerWarp; ++u) wr[u] = p.router_proj + static_cast<size_t>(min(eb + u, E - 1)) * H;
    float acc[kExpPerWarp][kTok];
#pragma unroll
    for (int u = 0; u < kExpPerWarp; ++u)
#pragma unroll
      for (int j = 0; j < kTok; ++j) acc[u][j] = 0.f;
    if constexpr (kVec4) {
      for (int i = lane * 4; i < H; i += 32 * 4) {
        float w[kExpPerWarp][4];
#pragma unroll
        for (int u = 0; u < kExpPerWarp; ++u) unpack4(__ldg(reinterpret_cast<const uint2*>(wr[u] + i)), w[u]);
#pragma unroll
        for (int j = 0; j < kTok; ++j) {
          const float4 xv = *reinterpret_cast<const float4*>(xs + j * H + i);
#pragma unroll
          for (int u = 0; u < kExpPerWarp; ++u) {
            acc[u][j] += w[u][0] * xv.x;
            acc[u][j] += w[u][1] * xv.y;
            acc[u][j] += w[u][2] * xv.z;
            acc[u][j] += w[u][3] * xv.w;
          }
        }
      }
    } else {
      for (int i = lane; i < H; i += 32) {
        float w[kExpPerWarp];
#pragma unroll
        for (int u = 0; u < kExpPerWarp; ++u) w[u] = __bfloat162float(wr[u][i]);
#pragma unroll
        for (int j = 0; j < kTok; ++j) {
          const float xv = xs[j * H + i];
#pragma unroll
          for (int u = 0; u < kExpPerWarp; ++u) acc[u][j] += w[u] * xv;
        }
      }
    }
#pragma unroll
    for (int u = 0; u < kExpPerWarp; ++u) {
#pragma unroll
      for (int j = 0; j < kTok; ++j) {
        float a = acc[u][j];
        for (int o = 16; o > 0; o >>= 1) a += __shfl_xor_sync(0xffffffffu, a, o);
        if (lane == 0 && j < nt && eb + u < E) logits[static_cast<size_t>(t0 + j) * E + eb + u] = a;
      }
    }
  }

  // 3. The last CTA of this token tile does the softmax and top-k of its tokens.
  __threadfence();  // this CTA's logits are visible to whichever CTA finishes the tile
  __syncthreads();
  if (threadIdx.x == 0) last = atomicAdd(&tile_done[blockIdx.x], 1u) == gridDim.y - 1;
  __syncthreads();
  if (!last) return;
  __threadfence();
  float* probs = smem;  // [kTok, E]
  for (int i = threadIdx.x; i < nt * E; i += kThreads) probs[i] = __ldcg(logits + static_cast<size_t>(t0) * E + i);
  __syncthreads();

  // One warp per token: softmax in fp32, then k rounds of arg-max (higher probability, then lower index).
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

template <typename Tx, bool kVec4>
cudaError_t launch(const MoeRouterParams<Tx>& p, cudaStream_t stream) {
  const size_t smem = smem_bytes(p.H, p.E);
  auto kernel = router_kernel<Tx, kVec4>;
  // Always raised, not only when the dynamic size alone passes 48 KiB: the kernel's ~2 KB of static shared
  // memory counts against the same default limit (H = 1536 asks for 48 KiB dynamic + static and would fail).
  const cudaError_t attr = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                                static_cast<int>(smem));
  if (attr != cudaSuccess) return attr;
  const float root = static_cast<float>(std::pow(static_cast<double>(p.H), -0.5));
  const dim3 grid((p.T + kTok - 1) / kTok, (p.E + kExp - 1) / kExp);
  char* ws = static_cast<char*>(p.workspace);
  float* logits = reinterpret_cast<float*>(ws);
  uint32_t* tile_done = reinterpret_cast<uint32_t*>(ws + align256(static_cast<size_t>(p.T) * p.E * sizeof(float)));
  // The counters sit after the logits, so their offset moves with T: a call with another T finds the
  // previous call's logits there. Zeroed here, on the stream (a memset node when captured), so the
  // workspace needs no initialisation and any T may follow any other.
  const cudaError_t err = cudaMemsetAsync(tile_done, 0, grid.x * sizeof(uint32_t), stream);
  if (err != cudaSuccess) return err;
  kernel<<<grid, kThreads, smem, stream>>>(p, logits, tile_done, root);
  return cudaGetLastError();
}

}  // namespace

void moe_router_kernel_plans(KernelPlans& out) {
  out.push_back({"router_kernel<", kThreads, static_cast<long long>(smem_bytes(plan_shapes::kHidden, plan_shapes::kExperts)),
                 kCtasPerSm, "kCtasPerSm: two CTAs' shared tokens per SM at H = 2816"});
}

size_t moe_router_workspace_bytes(int T, int E) {
  if (T <= 0 || E <= 0) return 0;
  return align256(static_cast<size_t>(T) * E * sizeof(float)) + align256(((T + kTok - 1) / kTok) * sizeof(uint32_t));
}

template <typename Tx>
cudaError_t moe_router(const MoeRouterParams<Tx>& p, cudaStream_t stream) {
  if (p.T < 0 || p.H <= 0 || p.E <= 0 || p.k < 1 || p.k > p.E || p.k > kMaxK) return cudaErrorInvalidValue;
  if (p.T == 0) return cudaSuccess;
  if (!p.workspace) return cudaErrorInvalidValue;
  const bool vec4 = p.H % 4 == 0 && (reinterpret_cast<uintptr_t>(p.router_proj) & 7) == 0;
  return vec4 ? launch<Tx, true>(p, stream) : launch<Tx, false>(p, stream);
}

template cudaError_t moe_router<float>(const MoeRouterParams<float>&, cudaStream_t);
template cudaError_t moe_router<__nv_bfloat16>(const MoeRouterParams<__nv_bfloat16>&, cudaStream_t);

}  // namespace dgemma::kernels
