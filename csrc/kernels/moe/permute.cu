// MoE permute (see moe.cuh): a deterministic, stable counting sort of the T*k routed slots by expert
// in one block, then a gather of the expert input rows into expert-major order, cast to bf16.
//
// Sort: count per expert (shared-memory integer atomics: the counts do not depend on their order),
// exclusive scan to offsets, then the slots in chunks of 1024 in index order; inside a chunk a
// slot's rank among the slots of its expert comes from __match_any_sync within its warp plus the
// per-warp counts of the warps before it, so the result is the stable order whatever the timing.
#include "kernels/common/bf16.cuh"
#include "kernels/moe/moe.cuh"

namespace dgemma::kernels {
namespace {

constexpr int kSortThreads = 1024;
constexpr int kSortWarps = kSortThreads / 32;
constexpr int kMaxExperts = 256;  // shared memory: (3E + 1 + 32E) ints <= 36 KB

__global__ void __launch_bounds__(kSortThreads)
    sort_kernel(const int32_t* __restrict__ idx, int n, int E, int32_t* __restrict__ counts_out,
                int32_t* __restrict__ offsets_out, int32_t* __restrict__ perm, int32_t* __restrict__ inv) {
  __shared__ int counts[kMaxExperts];
  __shared__ int offsets[kMaxExperts + 1];
  __shared__ int running[kMaxExperts];
  __shared__ int wcount[kSortWarps * kMaxExperts];
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;

  for (int e = tid; e < E; e += kSortThreads) counts[e] = 0, running[e] = 0;
  __syncthreads();
  for (int i = tid; i < n; i += kSortThreads) {
    const int e = idx[i];
    if (e >= 0 && e < E) atomicAdd(&counts[e], 1);  // out-of-range ids are dropped, never written through
  }
  __syncthreads();

  // Exclusive scan by warp 0: lane l sums a contiguous run of experts, then a shuffle scan.
  if (warp == 0) {
    const int per = (E + 31) / 32;
    const int e0 = min(E, lane * per), e1 = min(E, e0 + per);
    int local = 0;
    for (int e = e0; e < e1; ++e) local += counts[e];
    int incl = local;
    for (int o = 1; o < 32; o <<= 1) {
      const int v = __shfl_up_sync(0xffffffffu, incl, o);
      if (lane >= o) incl += v;
    }
    int run = incl - local;
    for (int e = e0; e < e1; ++e) {
      offsets[e] = run;
      run += counts[e];
    }
    if (lane == 31) offsets[E] = incl;
  }
  __syncthreads();
  for (int e = tid; e < E; e += kSortThreads) {
    counts_out[e] = counts[e];
    offsets_out[e] = offsets[e];
  }
  if (tid == 0) offsets_out[E] = offsets[E];

  for (int base = 0; base < n; base += kSortThreads) {
    for (int j = tid; j < kSortWarps * E; j += kSortThreads) wcount[j] = 0;
    __syncthreads();
    const int i = base + tid;
    int e = i < n ? idx[i] : -1;
    if (e >= E) e = -1;
    const unsigned peers = __match_any_sync(0xffffffffu, e);
    const int rank = __popc(peers & ((1u << lane) - 1u));
    if (e >= 0 && rank == 0) wcount[warp * E + e] = __popc(peers);
    __syncthreads();
    if (e >= 0) {
      int before = running[e];
      for (int w = 0; w < warp; ++w) before += wcount[w * E + e];
      const int pos = offsets[e] + before + rank;
      perm[pos] = i;
      inv[i] = pos;
    }
    __syncthreads();
    for (int x = tid; x < E; x += kSortThreads) {
      int s = 0;
      for (int w = 0; w < kSortWarps; ++w) s += wcount[w * E + x];
      running[x] += s;
    }
    // The next chunk's zeroing of wcount waits for these sums.
    __syncthreads();
  }
}


__device__ inline uint4 load8_bf16(const float* src) {
  const float4 a = *reinterpret_cast<const float4*>(src);
  const float4 b = *reinterpret_cast<const float4*>(src + 4);
  uint4 out;
  __nv_bfloat162* h = reinterpret_cast<__nv_bfloat162*>(&out);
  h[0] = __floats2bfloat162_rn(a.x, a.y);
  h[1] = __floats2bfloat162_rn(a.z, a.w);
  h[2] = __floats2bfloat162_rn(b.x, b.y);
  h[3] = __floats2bfloat162_rn(b.z, b.w);
  return out;
}
__device__ inline uint4 load8_bf16(const __nv_bfloat16* src) { return *reinterpret_cast<const uint4*>(src); }

// One block per permuted row: xp[r, :] = bf16(x[perm[r] / k, :]).
template <typename Tx, bool kVec8>
__global__ void __launch_bounds__(128) gather_kernel(const Tx* __restrict__ x, const int32_t* __restrict__ perm,
                                                     __nv_bfloat16* __restrict__ xp, int n, int k, int H) {
  const size_t r = blockIdx.x;
  const int slot = perm[r];
  if (slot < 0 || slot >= n) return;  // a row left unset by out-of-range expert ids: never read through
  const Tx* src = x + static_cast<size_t>(slot / k) * H;
  __nv_bfloat16* dst = xp + r * H;
  if constexpr (kVec8) {
    for (int c = threadIdx.x * 8; c < H; c += blockDim.x * 8)
      *reinterpret_cast<uint4*>(dst + c) = load8_bf16(src + c);
  } else {
    for (int c = threadIdx.x; c < H; c += blockDim.x) dst[c] = __float2bfloat16(to_f(src[c]));
  }
}

bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15) == 0; }

}  // namespace

template <typename Tx>
cudaError_t moe_permute(const MoePermuteParams<Tx>& p, cudaStream_t stream) {
  if (p.T < 0 || p.H <= 0 || p.E <= 0 || p.E > kMaxExperts || p.k < 1) return cudaErrorInvalidValue;
  const long long n = static_cast<long long>(p.T) * p.k;
  if (n > (1ll << 30)) return cudaErrorInvalidValue;
  // Counts and offsets are written even for T = 0 (all zero), so the grouped GEMM sees empty groups.
  sort_kernel<<<1, kSortThreads, 0, stream>>>(p.topk_idx, static_cast<int>(n), p.E, p.expert_counts,
                                               p.expert_offsets, p.perm_slot, p.inv);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess || n == 0) return err;
  const bool vec8 = p.H % 8 == 0 && aligned16(p.x) && aligned16(p.xp);
  if (vec8)
    gather_kernel<Tx, true><<<static_cast<unsigned>(n), 128, 0, stream>>>(p.x, p.perm_slot, p.xp, static_cast<int>(n), p.k, p.H);
  else
    gather_kernel<Tx, false><<<static_cast<unsigned>(n), 128, 0, stream>>>(p.x, p.perm_slot, p.xp, static_cast<int>(n), p.k, p.H);
  return cudaGetLastError();
}

template cudaError_t moe_permute<float>(const MoePermuteParams<float>&, cudaStream_t);
template cudaError_t moe_permute<__nv_bfloat16>(const MoePermuteParams<__nv_bfloat16>&, cudaStream_t);

}  // namespace dgemma::kernels
