// MoE permute (see moe.cuh): a deterministic, stable counting sort of the T*k routed slots by expert,
// then a gather of the expert input rows into expert-major order, cast to bf16. Two sorts, same output:
//
// Single block: count per expert (shared-memory integer atomics: the counts do not depend on their
// order), exclusive scan to offsets, then the slots in chunks of 1024 in index order; inside a chunk a
// slot's rank among the slots of its expert comes from __match_any_sync within its warp plus the
// per-warp counts of the warps before it, so the result is the stable order whatever the timing.
//
// Multi block (prefill): the slots in chunks of kMbChunk, one block per chunk b, over a table
// tbl [E, B] (expert-major) in the workspace:
//   1 histogram  tbl[e, b] = number of slots of chunk b on expert e (shared integer atomics)
//   2 scan       one block: tbl <- its exclusive prefix sum in flat (e, b) order, so tbl[e, b] = all
//                slots of experts < e plus those of e in chunks < b: where chunk b's first e-slot goes;
//                counts/offsets read off tbl[e, 0].
//   3 rank       each block ranks its chunk stably, kMbThreads slots at a time, as the single-block sort
//                does (match_any + per-warp counts), with 8-bit per-warp counts and a 16-bit running
//                count per expert in shared memory (10 E bytes), touching only the experts it sees.
//   4 gather     as in the single-block path.
// Integers only, no global atomics: the same bits whatever the block order.
#include "kernels/common/bf16.cuh"
#include "kernels/kernel_plan.h"
#include "kernels/moe/moe.cuh"

namespace dgemma::kernels {
namespace {

constexpr int kSortThreads = 1024;
constexpr int kSortWarps = kSortThreads / 32;
constexpr int kMaxExperts = 256;  // shared memory: (3E + 1 + 32E) ints <= 36 KB

// Multi-block path. tests/test_permute_algorithm.py reads these three from this file.
constexpr int kMbChunk = 1024;      // slots per block (fits the 16-bit running counts)
constexpr int kMbThreads = 256;     // slots ranked per step
constexpr int kMbMaxExperts = 4096;  // rank kernel: 10 E bytes of shared memory <= 40 KB
constexpr int kMbWarps = kMbThreads / 32;
constexpr int kScanThreads = 1024;
// moe_permute switches to the multi-block sort from this many slots (a decoder step, 256 x 8, stays on
// one block; a guess until bench/ measures the crossover).
constexpr int kMultiBlockMinSlots = 8192;
static_assert(kMbChunk % kMbThreads == 0 && kMbChunk <= 65535, "chunk counts are 16-bit");
static_assert(kMbThreads % 32 == 0 && kMbThreads >= 32, "whole warps");
constexpr int kGatherThreads = 128;
// Occupancy plan: the multi-block kernels keep 4 CTAs (half the SM's threads) resident, the gather 8,
// so <= 64 registers per thread; the single-block sort and scan launch 1024 threads with <= 64 registers.
constexpr int kMbCtasPerSm = 4;
constexpr int kGatherCtasPerSm = 8;

// Dynamic shared memory of the multi-block kernels for E experts.
size_t mb_histogram_smem(int E) { return static_cast<size_t>(E) * sizeof(int); }
size_t mb_rank_smem(int E) { return ((2 * static_cast<size_t>(E) + 15) & ~size_t{15}) + static_cast<size_t>(kMbWarps) * E; }

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

// Kernel 1: tbl[e * B + b] = slots of chunk b on expert e.
__global__ void __launch_bounds__(kMbThreads)
    mb_histogram_kernel(const int32_t* __restrict__ idx, int n, int E, int B, int32_t* __restrict__ tbl) {
  extern __shared__ int hist[];  // [E]
  const int tid = threadIdx.x, b = blockIdx.x;
  for (int e = tid; e < E; e += kMbThreads) hist[e] = 0;
  __syncthreads();
  const int c1 = min(n, (b + 1) * kMbChunk);
  for (int i = b * kMbChunk + tid; i < c1; i += kMbThreads) {
    const int e = idx[i];
    if (e >= 0 && e < E) atomicAdd(&hist[e], 1);
  }
  __syncthreads();
  for (int e = tid; e < E; e += kMbThreads) tbl[e * B + b] = hist[e];
}

// Kernel 2, one block: the flat exclusive scan of tbl [E * B] in place, then counts and offsets.
// Thread t owns a contiguous run of the table; a shuffle scan over warps, then over warp totals.
__global__ void __launch_bounds__(kScanThreads)
    mb_scan_kernel(int32_t* tbl, int E, int B, int32_t* __restrict__ counts_out, int32_t* __restrict__ offsets_out) {
  __shared__ int warp_incl[kScanThreads / 32];
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int N = E * B, per = (N + kScanThreads - 1) / kScanThreads;
  const int s0 = min(N, tid * per), s1 = min(N, s0 + per);
  int local = 0;
  for (int j = s0; j < s1; ++j) local += tbl[j];
  int incl = local;
  for (int o = 1; o < 32; o <<= 1) {
    const int v = __shfl_up_sync(0xffffffffu, incl, o);
    if (lane >= o) incl += v;
  }
  if (lane == 31) warp_incl[warp] = incl;
  __syncthreads();
  if (warp == 0) {
    int w = warp_incl[lane];
    for (int o = 1; o < 32; o <<= 1) {
      const int v = __shfl_up_sync(0xffffffffu, w, o);
      if (lane >= o) w += v;
    }
    warp_incl[lane] = w;
  }
  __syncthreads();
  int run = incl - local + (warp > 0 ? warp_incl[warp - 1] : 0);
  for (int j = s0; j < s1; ++j) {
    const int c = tbl[j];
    tbl[j] = run;
    run += c;
  }
  const int total = warp_incl[kScanThreads / 32 - 1];
  __syncthreads();  // the block's global writes above are visible to the block after this
  for (int e = tid; e < E; e += kScanThreads) {
    const int off = B > 0 ? tbl[e * B] : 0;
    const int next = e + 1 < E && B > 0 ? tbl[(e + 1) * B] : total;
    offsets_out[e] = off;
    counts_out[e] = next - off;
  }
  if (tid == 0) offsets_out[E] = total;
}

// Kernel 3: block b ranks chunk b, kMbThreads slots per step in index order. A slot lands at
// tbl[e, b] (scanned) + running[e] (its expert's slots in earlier steps of this chunk) + the counts of
// e in the warps before its own + its rank inside its warp. Only the experts seen are updated: the
// last lane of e's last warp advances running[e], each warp's leader of e clears its count.
__global__ void __launch_bounds__(kMbThreads)
    mb_rank_kernel(const int32_t* __restrict__ idx, int n, int E, int B, const int32_t* __restrict__ tbl,
                   int32_t* __restrict__ perm, int32_t* __restrict__ inv) {
  extern __shared__ __align__(16) unsigned char mb_smem[];
  const int run_bytes = (2 * E + 15) & ~15;
  uint16_t* running = reinterpret_cast<uint16_t*>(mb_smem);  // [E]
  uint8_t* wcount = mb_smem + run_bytes;                     // [kMbWarps, E], each <= 32
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, b = blockIdx.x;
  const int words = (run_bytes + kMbWarps * E + 3) / 4;
  for (int j = tid; j < words; j += kMbThreads) reinterpret_cast<uint32_t*>(mb_smem)[j] = 0;
  __syncthreads();

  const int c1 = min(n, (b + 1) * kMbChunk);
  for (int base = b * kMbChunk; base < c1; base += kMbThreads) {  // uniform over the block
    const int i = base + tid;
    int e = i < c1 ? idx[i] : -1;
    if (e < 0 || e >= E) e = -1;
    const unsigned peers = __match_any_sync(0xffffffffu, e);
    const int rank = __popc(peers & ((1u << lane) - 1u));
    const bool leader = rank == 0, last = (peers >> lane) == 1u;
    if (e >= 0 && leader) wcount[warp * E + e] = static_cast<uint8_t>(__popc(peers));
    __syncthreads();
    int next = -1;
    if (e >= 0) {
      int before = running[e];
      for (int w = 0; w < warp; ++w) before += wcount[w * E + e];
      const int pos = tbl[e * B + b] + before + rank;
      perm[pos] = i;
      inv[i] = pos;
      if (last) {
        bool later = false;
        for (int w = warp + 1; w < kMbWarps; ++w) later |= wcount[w * E + e] != 0;
        if (!later) next = before + rank + 1;
      }
    }
    __syncthreads();
    if (next >= 0) running[e] = static_cast<uint16_t>(next);
    if (e >= 0 && leader) wcount[warp * E + e] = 0;
    __syncthreads();  // the next step's counts wait for the clearing
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
__global__ void __launch_bounds__(kGatherThreads) gather_kernel(const Tx* __restrict__ x, const int32_t* __restrict__ perm,
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


template <typename Tx>
cudaError_t launch_gather(const MoePermuteParams<Tx>& p, long long n, cudaStream_t stream) {
  if (p.xp == nullptr || n == 0) return cudaSuccess;
  const bool vec8 = p.H % 8 == 0 && aligned16(p.x) && aligned16(p.xp);
  if (vec8)
    gather_kernel<Tx, true><<<static_cast<unsigned>(n), kGatherThreads, 0, stream>>>(p.x, p.perm_slot, p.xp, static_cast<int>(n), p.k, p.H);
  else
    gather_kernel<Tx, false><<<static_cast<unsigned>(n), kGatherThreads, 0, stream>>>(p.x, p.perm_slot, p.xp, static_cast<int>(n), p.k, p.H);
  return cudaGetLastError();
}

long long mb_blocks(long long n) { return (n + kMbChunk - 1) / kMbChunk; }

}  // namespace

void moe_permute_kernel_plans(KernelPlans& out) {
  const int E = plan_shapes::kExperts;
  const char* why = "kMbCtasPerSm: half the SM's threads at <= 64 registers";
  out.push_back({"::sort_kernel\\(", kSortThreads, 0, 1, "one CTA (grid 1) of 1024 threads"});
  out.push_back({"::mb_scan_kernel\\(", kScanThreads, 0, 1, "one CTA (grid 1) of 1024 threads"});
  out.push_back({"::mb_histogram_kernel\\(", kMbThreads, static_cast<long long>(mb_histogram_smem(E)), kMbCtasPerSm, why});
  out.push_back({"::mb_rank_kernel\\(", kMbThreads, static_cast<long long>(mb_rank_smem(E)), kMbCtasPerSm, why});
  out.push_back({"gather_kernel<", kGatherThreads, 0, kGatherCtasPerSm,
                 "kGatherCtasPerSm: half the SM's threads at <= 64 registers"});
}

size_t moe_permute_workspace_bytes(int T, int E, int k) {
  if (T <= 0 || E <= 0 || k <= 0) return 0;
  return static_cast<size_t>(E) * static_cast<size_t>(mb_blocks(static_cast<long long>(T) * k)) * sizeof(int32_t);
}

template <typename Tx>
cudaError_t moe_permute_single_block(const MoePermuteParams<Tx>& p, cudaStream_t stream) {
  if (p.T < 0 || p.E <= 0 || p.E > kMaxExperts || p.k < 1) return cudaErrorInvalidValue;
  if (p.xp != nullptr && p.H <= 0) return cudaErrorInvalidValue;
  const long long n = static_cast<long long>(p.T) * p.k;
  if (n > (1ll << 30)) return cudaErrorInvalidValue;
  // Counts and offsets are written even for T = 0 (all zero), so the grouped GEMM sees empty groups.
  sort_kernel<<<1, kSortThreads, 0, stream>>>(p.topk_idx, static_cast<int>(n), p.E, p.expert_counts,
                                               p.expert_offsets, p.perm_slot, p.inv);
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  return launch_gather(p, n, stream);
}

template <typename Tx>
cudaError_t moe_permute_multi_block(const MoePermuteParams<Tx>& p, cudaStream_t stream) {
  if (p.T < 0 || p.E <= 0 || p.E > kMbMaxExperts || p.k < 1) return cudaErrorInvalidValue;
  if (p.xp != nullptr && p.H <= 0) return cudaErrorInvalidValue;
  const long long n = static_cast<long long>(p.T) * p.k;
  if (n > 0 && p.workspace == nullptr) return cudaErrorInvalidValue;  // T = 0 needs 0 bytes
  const long long B = mb_blocks(n);
  if (n > (1ll << 30) || B * p.E > (1ll << 30)) return cudaErrorInvalidValue;  // int indices into tbl
  int32_t* tbl = static_cast<int32_t*>(p.workspace);
  const int nb = static_cast<int>(B), ni = static_cast<int>(n);
  if (nb > 0) {
    mb_histogram_kernel<<<nb, kMbThreads, mb_histogram_smem(p.E), stream>>>(p.topk_idx, ni, p.E, nb, tbl);
    if (const cudaError_t err = cudaGetLastError(); err != cudaSuccess) return err;
  }
  // Counts and offsets are written even for T = 0, as in the single-block path.
  mb_scan_kernel<<<1, kScanThreads, 0, stream>>>(tbl, p.E, nb, p.expert_counts, p.expert_offsets);
  if (const cudaError_t err = cudaGetLastError(); err != cudaSuccess) return err;
  if (nb > 0) {
    mb_rank_kernel<<<nb, kMbThreads, mb_rank_smem(p.E), stream>>>(p.topk_idx, ni, p.E, nb, tbl, p.perm_slot, p.inv);
    if (const cudaError_t err = cudaGetLastError(); err != cudaSuccess) return err;
  }
  return launch_gather(p, n, stream);
}

template <typename Tx>
cudaError_t moe_permute(const MoePermuteParams<Tx>& p, cudaStream_t stream) {
  const long long n = static_cast<long long>(p.T) * p.k;
  if (p.E > kMaxExperts || (p.workspace != nullptr && n >= kMultiBlockMinSlots)) return moe_permute_multi_block(p, stream);
  return moe_permute_single_block(p, stream);
}

#define DG_INSTANTIATE_PERMUTE(Tx)                                                                   \
  template cudaError_t moe_permute<Tx>(const MoePermuteParams<Tx>&, cudaStream_t);                  \
  template cudaError_t moe_permute_single_block<Tx>(const MoePermuteParams<Tx>&, cudaStream_t);     \
  template cudaError_t moe_permute_multi_block<Tx>(const MoePermuteParams<Tx>&, cudaStream_t);
DG_INSTANTIATE_PERMUTE(float)
DG_INSTANTIATE_PERMUTE(__nv_bfloat16)
#undef DG_INSTANTIATE_PERMUTE

}  // namespace dgemma::kernels
