// Attention-side layer kernels: token embedding, per-head norm + RoPE, paged KV-cache write.
#include <cstdint>

#include "kernels/common/bf16.cuh"
#include "kernels/layer/layer.cuh"

namespace dgemma::kernels {
namespace {

constexpr int kThreads = 256;

bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

__device__ __forceinline__ void store8(float* dst, const float f[8]) {
  reinterpret_cast<float4*>(dst)[0] = make_float4(f[0], f[1], f[2], f[3]);
  reinterpret_cast<float4*>(dst)[1] = make_float4(f[4], f[5], f[6], f[7]);
}
__device__ __forceinline__ void store8(__nv_bfloat16* dst, const float f[8]) {
  *reinterpret_cast<uint4*>(dst) = pack8(f);
}

// One block per token. kVec: hidden % 8 == 0 and 16-byte aligned base pointers, so every 8-element
// chunk is a 16-byte load from the table and one (bf16) or two (float) 16-byte stores.
template <typename To, bool kVec>
__global__ void __launch_bounds__(kThreads) embed_kernel(EmbedParams<To> p) {
  const size_t t = blockIdx.x;
  const __nv_bfloat16* e = p.table + static_cast<size_t>(p.ids[t]) * p.hidden;
  To* o = p.out + t * p.hidden;
  if constexpr (kVec) {
    for (int c = threadIdx.x * 8; c < p.hidden; c += kThreads * 8) {
      float f[8];
      unpack8(*reinterpret_cast<const uint4*>(e + c), f);
#pragma unroll
      for (int u = 0; u < 8; ++u) f[u] *= p.scale;
      store8(o + c, f);
    }
  } else {
    for (int c = threadIdx.x; c < p.hidden; c += kThreads) o[c] = from_f<To>(to_f(e[c]) * p.scale);
  }
}

// One (token, head) row of one tensor, by one warp. Lane j owns the elements i and i + half for
// i = j, j + 32, ..., so the in-place rotation never reads an element another lane writes. The row is
// read twice (sum of squares, then transform); the second read hits L1.
__device__ __forceinline__ void head_norm_rope_row(const HeadNormRopeParams& p, int64_t row, int lane) {
  __nv_bfloat16* xr = p.x + row * p.head_dim;
  const int d = p.head_dim;

  float ss = 0.f;
  for (int i = lane; i < d; i += 32) {
    const float v = to_f(xr[i]);
    ss += v * v;
  }
  for (int o = 16; o > 0; o >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, o);
  const float inv = rsqrtf(ss / d + p.eps);

  if (!p.positions) {
    for (int i = lane; i < d; i += 32) {
      float v = to_f(xr[i]) * inv;
      if (p.weight) v *= p.weight[i];
      xr[i] = from_f<__nv_bfloat16>(v);
    }
    return;
  }
  const int half = d / 2;
  const float pos = static_cast<float>(p.positions[row / p.heads]);
  for (int i = lane; i < half; i += 32) {
    float a = to_f(xr[i]) * inv, b = to_f(xr[i + half]) * inv;
    if (p.weight) {
      a *= p.weight[i];
      b *= p.weight[i + half];
    }
    // Accurate sincosf, not __sincosf: angles reach ~1e5 rad at long contexts.
    float sn, cs;
    sincosf(pos * p.inv_freq[i], &sn, &cs);
    xr[i] = from_f<__nv_bfloat16>(a * cs - b * sn);
    xr[i + half] = from_f<__nv_bfloat16>(b * cs + a * sn);
  }
}

// Up to three tensors in one launch (a layer's q, k and v): warp w of the grid takes row w of the
// concatenation, the tensor whose rows [begin, end) hold it. kThreads / 32 rows per block.
struct HeadNormRopeSet {
  HeadNormRopeParams t[kHeadNormRopeMaxTensors];
  int64_t end[kHeadNormRopeMaxTensors];  // cumulative rows
  int n;
};

__global__ void __launch_bounds__(kThreads) head_norm_rope_kernel(HeadNormRopeSet s) {
  int64_t row = static_cast<int64_t>(blockIdx.x) * (kThreads / 32) + (threadIdx.x >> 5);
  if (row >= s.end[s.n - 1]) return;  // whole warps exit together: the shuffles stay full-warp
  // Constant indices only: a kernel parameter indexed at run time would be copied to local memory.
  if (row < s.end[0]) {
    head_norm_rope_row(s.t[0], row, threadIdx.x & 31);
  } else if (row < s.end[1]) {
    head_norm_rope_row(s.t[1], row - s.end[0], threadIdx.x & 31);
  } else {
    head_norm_rope_row(s.t[2], row - s.end[1], threadIdx.x & 31);
  }
}

// One block per token; k and v rows copied with 16-byte moves when kVec (row_elems % 8 == 0, aligned).
template <bool kVec>
__global__ void __launch_bounds__(kThreads) kv_cache_write_kernel(KvCacheWriteParams p) {
  const size_t t = blockIdx.x;
  const int32_t s = p.slot[t];
  if (s < 0 || s >= p.num_slots) return;
  const size_t src = t * p.row_elems, dst = static_cast<size_t>(s) * p.row_elems;
  if constexpr (kVec) {
    const int n = p.row_elems / 8;
    const uint4* k = reinterpret_cast<const uint4*>(p.k + src);
    const uint4* v = reinterpret_cast<const uint4*>(p.v + src);
    uint4* kc = reinterpret_cast<uint4*>(p.k_cache + dst);
    uint4* vc = reinterpret_cast<uint4*>(p.v_cache + dst);
    for (int i = threadIdx.x; i < n; i += kThreads) {
      kc[i] = k[i];
      vc[i] = v[i];
    }
  } else {
    for (int i = threadIdx.x; i < p.row_elems; i += kThreads) {
      p.k_cache[dst + i] = p.k[src + i];
      p.v_cache[dst + i] = p.v[src + i];
    }
  }
}

}  // namespace

template <typename To>
cudaError_t embed_tokens(const EmbedParams<To>& p, cudaStream_t stream) {
  if (p.tokens <= 0 || p.hidden <= 0) return cudaSuccess;
  if (p.hidden % 8 == 0 && aligned16(p.table) && aligned16(p.out))
    embed_kernel<To, true><<<p.tokens, kThreads, 0, stream>>>(p);
  else
    embed_kernel<To, false><<<p.tokens, kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

cudaError_t head_norm_rope_multi(const HeadNormRopeParams* ps, int n, cudaStream_t stream) {
  if (n < 0 || n > kHeadNormRopeMaxTensors || (n > 0 && !ps)) return cudaErrorInvalidValue;
  HeadNormRopeSet s{};
  int64_t rows = 0;
  for (int i = 0; i < n; ++i) {
    const HeadNormRopeParams& p = ps[i];
    if (p.tokens <= 0 || p.heads <= 0 || p.head_dim <= 0) continue;  // nothing to do for this one
    if (!p.x || (p.positions && (!p.inv_freq || p.head_dim % 2 != 0))) return cudaErrorInvalidValue;
    rows += static_cast<int64_t>(p.tokens) * p.heads;
    s.t[s.n] = p;
    s.end[s.n++] = rows;
  }
  if (s.n == 0) return cudaSuccess;
  for (int i = s.n; i < kHeadNormRopeMaxTensors; ++i) s.end[i] = rows;  // the kernel's tests stay in range
  constexpr int kRowsPerBlock = kThreads / 32;
  const int64_t blocks = (rows + kRowsPerBlock - 1) / kRowsPerBlock;
  if (blocks > 0x7fffffff) return cudaErrorInvalidValue;
  head_norm_rope_kernel<<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(s);
  return cudaGetLastError();
}

cudaError_t head_norm_rope(const HeadNormRopeParams& p, cudaStream_t stream) { return head_norm_rope_multi(&p, 1, stream); }

cudaError_t kv_cache_write(const KvCacheWriteParams& p, cudaStream_t stream) {
  if (p.tokens <= 0 || p.row_elems <= 0) return cudaSuccess;
  if (p.row_elems % 8 == 0 && aligned16(p.k) && aligned16(p.v) && aligned16(p.k_cache) && aligned16(p.v_cache))
    kv_cache_write_kernel<true><<<p.tokens, kThreads, 0, stream>>>(p);
  else
    kv_cache_write_kernel<false><<<p.tokens, kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

template cudaError_t embed_tokens<float>(const EmbedParams<float>&, cudaStream_t);
template cudaError_t embed_tokens<__nv_bfloat16>(const EmbedParams<__nv_bfloat16>&, cudaStream_t);

}  // namespace dgemma::kernels
