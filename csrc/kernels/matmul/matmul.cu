// matmul_bf16 (contract in matmul.cuh). One CTA computes a BM x 128 tile of y (or of one split-K part)
// with mma.sync m16n8k16; warps own 64 x 32 (BM 128, 8 warps) or 32 x 32 (BM 32, 4 warps) sub-tiles.
// Shared tiles are 32 columns of K deep, 16-byte chunks XOR-swizzled so that every ldmatrix phase hits 8
// distinct bank groups without padding (3 stages of 16 KB fit the 48 KB of static shared memory):
//   k-contiguous tile (x; w when [N, K]): row r of 64 B, chunk c (of 4) at  r * 64  + ((c ^ ((r >> 1) & 3)) << 4)
//   n-contiguous tile (w when [K, N]):    row k of 256 B, chunk c (of 16) at k * 256 + ((c ^ (k & 7)) << 4)
// The second is read with ldmatrix.trans, so both layouts feed the same mma B fragments.
#include "kernels/common/ptx.cuh"
#include <cstdint>

#include "kernels/common/bf16.cuh"
#include "kernels/kernel_plan.h"
#include "kernels/matmul/matmul.cuh"

namespace dgemma::kernels {
namespace {

constexpr int kBK = 32;      // K per stage: two mma k-steps
constexpr int kStages = 3;   // cp.async ring: two tiles in flight while one is computed
constexpr int kMaxGroups = 4096;
constexpr int kMaxSplit = 256;
constexpr int kReduceThreads = 256;
// Occupancy plan of the split-K reduce: 4 CTAs (half the SM's threads) resident, so <= 64 registers.
constexpr int kReduceCtasPerSm = 4;

template <int BM_, int WARPS_M, int WARPS_N, int MIN_BLOCKS>
struct Cfg {
  static constexpr int BM = BM_, BN = 128;
  static constexpr int kWarpsM = WARPS_M, kWarpsN = WARPS_N, kWarps = WARPS_M * WARPS_N;
  static constexpr int kThreads = 32 * kWarps, kMinBlocks = MIN_BLOCKS;
  static constexpr int WM = BM / WARPS_M, WN = BN / WARPS_N;  // warp tile
  static constexpr int MT = WM / 16, NT = WN / 8;              // mma tiles per warp
  static constexpr int kABytes = BM * kBK * 2, kBBytes = BN * kBK * 2, kStageBytes = kABytes + kBBytes;
  static constexpr int kSmemBytes = kStages * kStageBytes;
  static constexpr int kAChunks = BM * kBK / 8, kBChunks = BN * kBK / 8;  // 16-byte chunks per tile
  static_assert(kWarpsM * WM == BM && kWarpsN * WN == BN, "warps tile the CTA tile");
  static_assert(WM % 16 == 0 && WN % 16 == 0, "warp tile: whole m16 tiles and pairs of n8 tiles");
  static_assert(kAChunks % kThreads == 0 && kBChunks % kThreads == 0, "every thread copies whole chunks");
  static_assert(kSmemBytes <= 48 * 1024, "static shared memory");
  static_assert(2 + kWarps <= kABytes / 4, "the group lookup's scratch lives in stage 0");
};
using CfgLarge = Cfg<128, 2, 4, 2>;  // 256 threads, 2 CTAs per SM: <= 128 registers
using CfgSmall = Cfg<32, 1, 4, 4>;   // 128 threads, for M <= 32 rows per tile (decode, small groups)

struct Args {
  const __nv_bfloat16* x;
  const __nv_bfloat16* w;
  void* y;
  float* ws;                // split-K partials [split, M, N], or null
  const int32_t* offsets;   // grouped, or null
  int M, N, K, G, split;
  float alpha, softcap;
  bool y_f32, pair_ok;      // pair_ok: N even and y aligned for 2-element stores
};

using ptx::cp_async16;
using ptx::cp_async_commit;
using ptx::cp_async_wait;
using ptx::ldmatrix_x4;
using ptx::ldmatrix_x4_trans;
using ptx::mma_bf16_16816;
using ptx::smem_u32;

// Byte offsets in the swizzled tiles (see the file comment).
__device__ __forceinline__ uint32_t off_k(int r, int c) { return r * 64 + ((c ^ ((r >> 1) & 3)) << 4); }
__device__ __forceinline__ uint32_t off_n(int k, int c) { return k * 256 + ((c ^ (k & 7)) << 4); }

// 8 consecutive bf16 of a row from index i, zeros from `valid` on (the unaligned path).
__device__ __forceinline__ uint4 load8(const __nv_bfloat16* row, int64_t i, int valid) {
  const unsigned short* p = reinterpret_cast<const unsigned short*>(row) + i;
  uint32_t h[8];
#pragma unroll
  for (int e = 0; e < 8; ++e) h[e] = e < valid ? __ldg(p + e) : 0u;
  return make_uint4(h[0] | (h[1] << 16), h[2] | (h[3] << 16), h[4] | (h[5] << 16), h[6] | (h[7] << 16));
}

__device__ __forceinline__ float finish(float v, float alpha, float softcap) {
  v *= alpha;
  if (softcap > 0.f) v = softcap * tanhf(v / softcap);
  return v;
}

// One k-tile (kBK columns of K from k0) of x rows [0, mrows) and w rows/columns [0, ncols) into a stage.
// xa: x at the tile's first row; wb: w at the tile's first output column (row of [N, K], column of [K, N]).
template <class C, bool kAligned, bool kWKn>
__device__ __forceinline__ void load_stage(uint8_t* st, const __nv_bfloat16* xa, const __nv_bfloat16* wb, int mrows,
                                           int ncols, int k0, const Args& a) {
  const uint32_t sa = smem_u32(st), sb = sa + C::kABytes;
#pragma unroll
  for (int i = 0; i < C::kAChunks / C::kThreads; ++i) {
    const int c = threadIdx.x + i * C::kThreads, r = c >> 2, kc = c & 3, gk = k0 + kc * 8;
    const int valid = r < mrows ? min(8, a.K - gk) : 0;
    if constexpr (kAligned) {
      cp_async16(sa + off_k(r, kc), valid > 0 ? xa + static_cast<int64_t>(r) * a.K + gk : a.x, valid > 0 ? 16 : 0);
    } else {
      *reinterpret_cast<uint4*>(st + off_k(r, kc)) = load8(xa, static_cast<int64_t>(r) * a.K + gk, valid);
    }
  }
#pragma unroll
  for (int i = 0; i < C::kBChunks / C::kThreads; ++i) {
    const int c = threadIdx.x + i * C::kThreads;
    if constexpr (!kWKn) {  // [N, K]: like x
      const int r = c >> 2, kc = c & 3, gk = k0 + kc * 8;
      const int valid = r < ncols ? min(8, a.K - gk) : 0;
      if constexpr (kAligned) {
        cp_async16(sb + off_k(r, kc), valid > 0 ? wb + static_cast<int64_t>(r) * a.K + gk : a.w, valid > 0 ? 16 : 0);
      } else {
        *reinterpret_cast<uint4*>(st + C::kABytes + off_k(r, kc)) =
            load8(wb, static_cast<int64_t>(r) * a.K + gk, valid);
      }
    } else {  // [K, N]: rows of K, 16 chunks of 8 columns
      const int kr = c >> 4, nc = c & 15, gk = k0 + kr;
      const int valid = gk < a.K ? min(8, ncols - nc * 8) : 0;
      if constexpr (kAligned) {
        cp_async16(sb + off_n(kr, nc), valid > 0 ? wb + static_cast<int64_t>(gk) * a.N + nc * 8 : a.w,
                   valid > 0 ? 16 : 0);
      } else {
        *reinterpret_cast<uint4*>(st + C::kABytes + off_n(kr, nc)) =
            load8(wb, static_cast<int64_t>(gk) * a.N + nc * 8, valid);
      }
    }
  }
}

template <class C, bool kWKn>
__device__ __forceinline__ void compute_stage(const uint8_t* st, float (&acc)[C::MT][C::NT][4], int wm, int wn,
                                              int lane) {
  const uint32_t sa = smem_u32(st), sb = sa + C::kABytes;
#pragma unroll
  for (int ks = 0; ks < kBK / 16; ++ks) {
    uint32_t af[C::MT][4], bf[C::NT][2];
#pragma unroll
    for (int mt = 0; mt < C::MT; ++mt)
      ldmatrix_x4(af[mt], sa + off_k(wm * C::WM + mt * 16 + (lane & 15), ks * 2 + (lane >> 4)));
#pragma unroll
    for (int np = 0; np < C::NT / 2; ++np) {
      uint32_t r[4];
      if constexpr (!kWKn)
        ldmatrix_x4(r, sb + off_k(wn * C::WN + np * 16 + (lane & 7) + ((lane >> 4) << 3), ks * 2 + ((lane >> 3) & 1)));
      else
        ldmatrix_x4_trans(r, sb + off_n(ks * 16 + (lane & 7) + (((lane >> 3) & 1) << 3),
                                        (wn * C::WN + np * 16) / 8 + (lane >> 4)));
      bf[2 * np][0] = r[0], bf[2 * np][1] = r[1], bf[2 * np + 1][0] = r[2], bf[2 * np + 1][1] = r[3];
    }
#pragma unroll
    for (int mt = 0; mt < C::MT; ++mt)
#pragma unroll
      for (int nt = 0; nt < C::NT; ++nt) mma_bf16_16816(acc[mt][nt], af[mt], bf[nt][0], bf[nt][1]);
  }
}

// Grouped mode: which group and row tile CTA blockIdx.x computes. A block-wide scan of the per-group
// tile counts, kThreads groups at a time; the scratch sits in stage 0 (free until the first load).
// Returns false (for the whole CTA) when the CTA has no tile.
template <class C>
__device__ __forceinline__ bool find_group_tile(const Args& a, uint8_t* smem, int& group, int& tile) {
  int* s = reinterpret_cast<int*>(smem);  // s[0] group, s[1] tile, s[2 + warp] warp totals
  const int t = blockIdx.x, lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (threadIdx.x == 0) s[0] = -1;
  __syncthreads();
  int base = 0;  // tiles of the groups before this chunk
  for (int g0 = 0; g0 < a.G; g0 += C::kThreads) {
    const int g = g0 + threadIdx.x;
    const int n = g < a.G ? (a.offsets[g + 1] - a.offsets[g] + C::BM - 1) / C::BM : 0;
    int incl = n;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const int v = __shfl_up_sync(0xffffffffu, incl, o);
      if (lane >= o) incl += v;
    }
    if (lane == 31) s[2 + warp] = incl;
    __syncthreads();
    int before = 0, total = 0;
#pragma unroll
    for (int w = 0; w < C::kWarps; ++w) {
      const int v = s[2 + w];
      before += w < warp ? v : 0;
      total += v;
    }
    const int start = base + before + incl - n;
    if (n > 0 && t >= start && t < start + n) s[0] = g, s[1] = t - start;
    base += total;
    __syncthreads();
    if (base > t) break;  // base is the same in every thread
  }
  group = s[0];
  tile = s[1];
  __syncthreads();  // everyone has read s before the first load overwrites it
  return group >= 0;
}

template <class C, bool kAligned, bool kWKn>
__global__ void __launch_bounds__(C::kThreads, C::kMinBlocks) matmul_bf16_kernel(const Args a) {
  __shared__ __align__(128) uint8_t smem[C::kSmemBytes];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int wm = warp / C::kWarpsN, wn = warp % C::kWarpsN;

  int row0 = blockIdx.x * C::BM, row_end = a.M;
  const __nv_bfloat16* w = a.w;
  if (a.G > 0) {
    int g, tile;
    if (!find_group_tile<C>(a, smem, g, tile)) return;
    row0 = a.offsets[g] + tile * C::BM;
    row_end = a.offsets[g + 1];
    w += static_cast<int64_t>(g) * a.N * a.K;
  }
  const int col0 = blockIdx.y * C::BN;
  const int mrows = min(C::BM, row_end - row0), ncols = min(C::BN, a.N - col0);
  const __nv_bfloat16* xa = a.x + static_cast<int64_t>(row0) * a.K;
  const __nv_bfloat16* wb = kWKn ? w + col0 : w + static_cast<int64_t>(col0) * a.K;

  const int ktiles = (a.K + kBK - 1) / kBK, per = (ktiles + a.split - 1) / a.split;
  const int kt0 = blockIdx.z * per, nk = max(0, min(ktiles, kt0 + per) - kt0);

  float acc[C::MT][C::NT][4];
#pragma unroll
  for (int mt = 0; mt < C::MT; ++mt)
#pragma unroll
    for (int nt = 0; nt < C::NT; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[mt][nt][e] = 0.f;

#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < nk) load_stage<C, kAligned, kWKn>(smem + s * C::kStageBytes, xa, wb, mrows, ncols, (kt0 + s) * kBK, a);
    cp_async_commit();
  }
  int read = 0, write = kStages - 1;  // stage indices
  for (int i = 0; i < nk; ++i) {
    cp_async_wait<kStages - 2>();
    __syncthreads();  // tile i landed for all threads; stage `write` (computed at i - 1) is free
    if (i + kStages - 1 < nk)
      load_stage<C, kAligned, kWKn>(smem + write * C::kStageBytes, xa, wb, mrows, ncols,
                                    (kt0 + i + kStages - 1) * kBK, a);
    cp_async_commit();
    compute_stage<C, kWKn>(smem + read * C::kStageBytes, acc, wm, wn, lane);
    read = read == kStages - 1 ? 0 : read + 1;
    write = write == kStages - 1 ? 0 : write + 1;
  }
  cp_async_wait<0>();

  // Epilogue straight from the accumulators: c0, c1 at (row, col), (row, col + 1); c2, c3 eight rows down.
  float* part = a.ws ? a.ws + static_cast<int64_t>(blockIdx.z) * a.M * a.N : nullptr;
#pragma unroll
  for (int mt = 0; mt < C::MT; ++mt)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int r = wm * C::WM + mt * 16 + (lane >> 2) + h * 8;
      if (r >= mrows) continue;
      const int64_t row_off = static_cast<int64_t>(row0 + r) * a.N;
#pragma unroll
      for (int nt = 0; nt < C::NT; ++nt) {
        const int c = wn * C::WN + nt * 8 + (lane & 3) * 2;
        if (c >= ncols) continue;
        const int64_t o = row_off + col0 + c;
        float v0 = acc[mt][nt][2 * h], v1 = acc[mt][nt][2 * h + 1];
        const bool two = c + 1 < ncols;
        if (part) {
          if (two && a.pair_ok) {
            *reinterpret_cast<float2*>(part + o) = make_float2(v0, v1);
          } else {
            part[o] = v0;
            if (two) part[o + 1] = v1;
          }
          continue;
        }
        v0 = finish(v0, a.alpha, a.softcap);
        v1 = finish(v1, a.alpha, a.softcap);
        if (a.y_f32) {
          float* y = static_cast<float*>(a.y);
          if (two && a.pair_ok) {
            *reinterpret_cast<float2*>(y + o) = make_float2(v0, v1);
          } else {
            y[o] = v0;
            if (two) y[o + 1] = v1;
          }
        } else {
          __nv_bfloat16* y = static_cast<__nv_bfloat16*>(a.y);
          if (two && a.pair_ok) {
            *reinterpret_cast<__nv_bfloat162*>(y + o) = __floats2bfloat162_rn(v0, v1);
          } else {
            y[o] = __float2bfloat16(v0);
            if (two) y[o + 1] = __float2bfloat16(v1);
          }
        }
      }
    }
}

// y = finish(sum over parts s = 0, 1, ... of ws[s]), elementwise over M * N.
__global__ void __launch_bounds__(kReduceThreads) splitk_reduce_kernel(const float* __restrict__ ws, void* y, bool y_f32,
                                                                       int64_t mn, int split, float alpha, float softcap) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kReduceThreads + threadIdx.x; i < mn;
       i += static_cast<int64_t>(gridDim.x) * kReduceThreads) {
    float s = 0.f;
    for (int p = 0; p < split; ++p) s += ws[p * mn + i];
    const float v = finish(s, alpha, softcap);
    if (y_f32)
      static_cast<float*>(y)[i] = v;
    else
      static_cast<__nv_bfloat16*>(y)[i] = __float2bfloat16(v);
  }
}

bool small_tiles(int64_t M, int G) { return M <= int64_t{32} * (G > 0 ? G : 1); }

template <class C, bool kAligned, bool kWKn>
cudaError_t launch(const Args& a, cudaStream_t stream) {
  const int64_t mtiles = (a.M + C::BM - 1) / C::BM + a.G;
  const dim3 grid(static_cast<unsigned>(mtiles), static_cast<unsigned>((a.N + C::BN - 1) / C::BN),
                  static_cast<unsigned>(a.split));
  matmul_bf16_kernel<C, kAligned, kWKn><<<grid, C::kThreads, 0, stream>>>(a);
  return cudaGetLastError();
}

template <class C>
cudaError_t launch_cfg(const Args& a, bool aligned, bool w_kn, cudaStream_t stream) {
  if (aligned) return w_kn ? launch<C, true, true>(a, stream) : launch<C, true, false>(a, stream);
  return w_kn ? launch<C, false, true>(a, stream) : launch<C, false, false>(a, stream);
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

}  // namespace

size_t matmul_workspace_bytes(const MatmulParams& p) {
  if (p.split_k <= 1 || p.M <= 0 || p.N <= 0) return 0;
  return static_cast<size_t>(p.split_k) * static_cast<size_t>(p.M) * static_cast<size_t>(p.N) * sizeof(float);
}

cudaError_t matmul_bf16(const MatmulParams& p, cudaStream_t stream) {
  constexpr int64_t kMax = int64_t{1} << 31;
  if (p.M < 0 || p.N < 0 || p.K < 0 || p.M >= kMax || p.N >= kMax || p.K >= kMax) return cudaErrorInvalidValue;
  if (p.split_k < 1 || p.split_k > kMaxSplit || p.G < 0) return cudaErrorInvalidValue;
  if (p.G > 0 && (p.w_kn || p.split_k > 1 || p.G > kMaxGroups || !p.offsets)) return cudaErrorInvalidValue;
  if ((p.N + 127) / 128 > 65535) return cudaErrorInvalidValue;
  if (p.M == 0 || p.N == 0) return cudaSuccess;
  if (!p.x || !p.w || !p.y) return cudaErrorInvalidValue;
  const size_t ws = matmul_workspace_bytes(p);
  if (ws && (!p.workspace || p.workspace_bytes < ws)) return cudaErrorInvalidValue;

  Args a{};
  a.x = p.x, a.w = p.w, a.y = p.y, a.offsets = p.G > 0 ? p.offsets : nullptr;
  a.ws = p.split_k > 1 ? static_cast<float*>(p.workspace) : nullptr;
  a.M = static_cast<int>(p.M), a.N = static_cast<int>(p.N), a.K = static_cast<int>(p.K);
  a.G = p.G, a.split = p.split_k, a.alpha = p.alpha, a.softcap = p.softcap, a.y_f32 = p.y_f32;
  const size_t out_align = a.ws || p.y_f32 ? 8 : 4;
  a.pair_ok = p.N % 2 == 0 && reinterpret_cast<uintptr_t>(a.ws ? a.ws : p.y) % out_align == 0;
  const bool aligned = p.K % 8 == 0 && (!p.w_kn || p.N % 8 == 0) && aligned16(p.x) && aligned16(p.w);

  cudaError_t err = small_tiles(p.M, p.G) ? launch_cfg<CfgSmall>(a, aligned, p.w_kn, stream)
                                          : launch_cfg<CfgLarge>(a, aligned, p.w_kn, stream);
  if (err != cudaSuccess || !a.ws) return err;
  const int64_t mn = p.M * p.N, want = (mn + kReduceThreads - 1) / kReduceThreads;
  splitk_reduce_kernel<<<static_cast<int>(want < 65536 ? want : 65536), kReduceThreads, 0, stream>>>(
      a.ws, p.y, p.y_f32, mn, p.split_k, p.alpha, p.softcap);
  return cudaGetLastError();
}

void matmul_kernel_plans(KernelPlans& out) {
  // Shared memory is static (C::kSmemBytes, in the kernel's own resource usage).
  auto add = [&out](auto cfg) {
    using C = decltype(cfg);
    out.push_back({"matmul_bf16_kernel<.*Cfg<" + std::to_string(C::BM) + ", " + std::to_string(C::kWarpsM) + ", " +
                       std::to_string(C::kWarpsN) + ", " + std::to_string(C::kMinBlocks) + ">",
                   C::kThreads, 0, C::kMinBlocks, "Cfg::kMinBlocks (__launch_bounds__): loads in flight per SM"});
  };
  add(CfgLarge{});
  add(CfgSmall{});
  out.push_back({"splitk_reduce_kernel", kReduceThreads, 0, kReduceCtasPerSm,
                 "kReduceCtasPerSm: half the SM's threads at <= 64 registers"});
}

int matmul_pick_split_k(int64_t M, int64_t N, int64_t K) {
  int dev = 0, sms = 0;
  if (M <= 0 || N <= 0 || cudaGetDevice(&dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess || sms <= 0) {
    cudaGetLastError();  // leave no sticky error behind for the caller
    return 1;
  }
  const int64_t bm = small_tiles(M, 0) ? CfgSmall::BM : CfgLarge::BM;
  const int64_t tiles = (M + bm - 1) / bm * ((N + 127) / 128);
  const int64_t target = 2 * static_cast<int64_t>(sms);  // two CTAs per SM keep enough loads in flight
  if (tiles >= target) return 1;
  int64_t split = (target + tiles - 1) / tiles;
  split = split < K / 1024 ? split : K / 1024;
  split = split < 64 ? split : 64;
  return static_cast<int>(split > 1 ? split : 1);
}

}  // namespace dgemma::kernels
