// Device side of attention.cuh; included only by the attention_hd<D>.cu instantiation files.
//
// CTA = (query tile, KV head, row). Query tile: kBlockM flattened query rows f = token * G + head_in_group
// (G = num_heads / num_kv_heads) of one KV head. Warps form a kWarpsM x kWarpsD grid: warp (wm, wd) owns
// query rows [16 wm, 16 wm + 16) and head dims [wd * kDimsPerWarp, (wd + 1) * kDimsPerWarp).
// Per key tile of kBlockN keys:
//   S_partial = Q[rows, dims of wd] K[tile, dims of wd]^T   (mma.sync m16n8k16, fp32)
//   S = sum over wd of S_partial, exchanged through shared memory (summed in the same order by every
//       warp, so the kWarpsD warps of a row group hold bit-identical S and softmax statistics)
//   mask, online softmax in the log2 domain, O[rows, dims of wd] += P (bf16) V[tile, dims of wd]
// K and V tiles are single-buffered with cp.async: V(j) loads during S(j), K(j+1) during softmax/PV(j).
// Shared memory rows are XOR-swizzled in 16-byte chunks (chunk ^ (row & 7)) so that ldmatrix is
// conflict-free. Fragment layouts are those of the PTX ISA for mma.m16n8k16 (.row.col).
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <climits>
#include <cmath>
#include <cstdint>

#include "kernels/attention/attention.cuh"

namespace dgemma::kernels::attention_detail {

template <int kHeadDim_, int kWarpsM_, int kBlockN_>
struct AttnConfig {
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kDimsPerWarp = kHeadDim < 128 ? kHeadDim : 128;
  static constexpr int kWarpsD = kHeadDim / kDimsPerWarp;
  static constexpr int kWarpsM = kWarpsM_;
  static constexpr int kBlockM = 16 * kWarpsM;
  static constexpr int kBlockN = kBlockN_;
  static constexpr int kThreads = 32 * kWarpsM * kWarpsD;
  static constexpr int kChunks = kHeadDim / 8;  // 16-byte chunks per bf16 row
  static constexpr int kTileElems = kBlockN * kHeadDim;
  static constexpr int kSFrag = kBlockN / 8 * 4;  // S accumulator floats per thread
  static constexpr int kExchFloats = kWarpsD > 1 ? kWarpsM * kWarpsD * kSFrag * 32 : 0;
  static constexpr int kSmemBytes = 2 * kTileElems * 2 + kExchFloats * 4;

  static_assert(kHeadDim % 64 == 0, "the swizzle needs a multiple of 8 chunks per row");
  static_assert(kHeadDim % kDimsPerWarp == 0 && kDimsPerWarp % 16 == 0, "head_dim split over warps");
  static_assert(kBlockN % 16 == 0, "key tile is a multiple of the mma k");
  static_assert(kThreads % kChunks == 0, "each thread copies one fixed chunk column");
  static_assert(kBlockN % (kThreads / kChunks) == 0 && kBlockM % (kThreads / kChunks) == 0,
                "tiles split evenly over the copy passes");
  static_assert(kBlockM <= 2 * kBlockN, "Q is staged in the K and V tile buffers");
  static_assert(kThreads <= 1024, "CTA size");
};

// Element offset of (row, 16-byte chunk) in a swizzled [rows, kHeadDim] bf16 tile.
template <int kHeadDim>
__device__ __forceinline__ int swz(int row, int chunk) {
  return row * kHeadDim + ((chunk ^ (row & 7)) << 3);
}

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte async copy; src_bytes = 0 writes zeros (src is then not read but must be a valid address).
__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_u32(smem)), "l"(gmem), "r"(src_bytes)
               : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* smem) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_u32(smem)));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* smem) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_u32(smem)));
}

// d += a * b, m16n8k16, bf16 inputs, fp32 accumulators.
__device__ __forceinline__ void mma_bf16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ uint32_t pack_bf16x2(float lo, float hi) {
  const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);  // .x (low 16 bits) = lo
  return *reinterpret_cast<const uint32_t*>(&v);
}

// What a CTA needs to find its row's keys: key index k in [0, n_keys) is cached position
// cache_start + k for k < n_cached, else new token k - n_cached of the row.
struct RowKeys {
  const __nv_bfloat16* cache;  // k_cache or v_cache
  const __nv_bfloat16* fresh;  // k_new or v_new
  const int32_t* blocks;       // this row's block table
  int n_cached, n_keys;
  int rel0;                    // cache_start - cache_first_pos
  int tok0, kv_head;
};

// Copies keys [k0, k0 + kBlockN) of K or V (one KV head) into a swizzled smem tile; zeros past n_keys.
template <class Cfg>
__device__ __forceinline__ void load_kv_tile(__nv_bfloat16* tile, const RowKeys& rk, const AttentionParams& p,
                                             int k0) {
  constexpr int kRowsPerPass = Cfg::kThreads / Cfg::kChunks;
  const int chunk = threadIdx.x % Cfg::kChunks;
  const size_t token_stride = static_cast<size_t>(p.num_kv_heads) * Cfg::kHeadDim;
  const size_t head_off = static_cast<size_t>(rk.kv_head) * Cfg::kHeadDim + chunk * 8;
#pragma unroll
  for (int i = 0; i < Cfg::kBlockN / kRowsPerPass; ++i) {
    const int r = threadIdx.x / Cfg::kChunks + i * kRowsPerPass;
    const int key = k0 + r;
    const __nv_bfloat16* src = rk.fresh;  // any valid address for the zero-fill case
    int bytes = 0;
    if (key < rk.n_cached) {
      const int rel = rk.rel0 + key;
      const int blk = __ldg(rk.blocks + rel / p.block_size);
      const size_t slot = static_cast<size_t>(blk) * p.block_size + rel % p.block_size;
      src = rk.cache + slot * token_stride + head_off;
      bytes = 16;
    } else if (key < rk.n_keys) {
      src = rk.fresh + static_cast<size_t>(rk.tok0 + key - rk.n_cached) * token_stride + head_off;
      bytes = 16;
    }
    cp_async_16(tile + swz<Cfg::kHeadDim>(r, chunk), src, bytes);
  }
}

template <class Cfg>
__global__ void __launch_bounds__(Cfg::kThreads, 1) attention_kernel(const AttentionParams p) {
  constexpr int D = Cfg::kHeadDim, BM = Cfg::kBlockM, BN = Cfg::kBlockN, DW = Cfg::kDimsPerWarp;
  constexpr int kWarpsD = Cfg::kWarpsD;
  constexpr int kNT = BN / 8;   // S n-tiles (8 keys each)
  constexpr int kDT = DW / 8;   // O n-tiles (8 dims each)
  constexpr int kQK = DW / 16;  // k-steps of Q K^T over this warp's dims
  const float kNegInf = -INFINITY;

  extern __shared__ __align__(128) unsigned char smem_raw[];
  __nv_bfloat16* sK = reinterpret_cast<__nv_bfloat16*>(smem_raw);
  __nv_bfloat16* sV = sK + Cfg::kTileElems;
  float* sX = reinterpret_cast<float*>(sV + Cfg::kTileElems);  // S partials exchange
  __nv_bfloat16* sQ = sK;                                       // Q staging, before the key loop

  const int row = blockIdx.z, kv_head = blockIdx.y;
  const int G = p.num_heads / p.num_kv_heads;
  const int count = p.count[row];
  const int f0 = blockIdx.x * BM;  // first flattened query row of this tile
  const int f_end = count * G;
  if (f0 >= f_end) return;  // whole CTA: this row has fewer tokens than the grid allows for

  const int tok0 = p.tok0[row];
  const int cache_len = p.cache_len[row], cache_start = p.cache_start[row];
  RowKeys rk;
  rk.n_cached = cache_len > cache_start ? cache_len - cache_start : 0;
  rk.n_keys = rk.n_cached + count;
  rk.rel0 = rk.n_cached > 0 ? cache_start - p.cache_first_pos[row] : 0;
  rk.blocks = p.block_table + static_cast<size_t>(row) * p.max_blocks_per_row;
  rk.tok0 = tok0;
  rk.kv_head = kv_head;

  // Query token t (position cache_len + t) sees key k iff k <= n_cached + t and, with a window W,
  // k > n_cached + t - W. Key range of the whole tile:
  const int t_first = f0 / G;
  const int t_last = (min(f_end, f0 + BM) - 1) / G;
  const bool causal = p.causal;
  const int window = causal ? p.window : 0;
  int k_begin = 0, k_end = rk.n_keys;
  if (causal) {
    k_end = min(rk.n_keys, rk.n_cached + t_last + 1);
    if (window > 0) k_begin = max(0, rk.n_cached + t_first - window + 1);
  }
  const int n_tiles = k_end > k_begin ? (k_end - k_begin + BN - 1) / BN : 0;

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int wm = warp / kWarpsD, wd = warp % kWarpsD;
  const int g = lane >> 2, tq = lane & 3;  // mma fragment row group / column pair
  const int dim0 = wd * DW;

  // ---- Q tile -> smem -> registers (A fragments for this warp's rows and dims) ----
  {
    constexpr int kRowsPerPass = Cfg::kThreads / Cfg::kChunks;
    const int chunk = threadIdx.x % Cfg::kChunks;
#pragma unroll
    for (int i = 0; i < BM / kRowsPerPass; ++i) {
      const int r = threadIdx.x / Cfg::kChunks + i * kRowsPerPass;
      const int f = f0 + r;
      const __nv_bfloat16* src = p.q;
      int bytes = 0;
      if (f < f_end) {
        const int t = f / G, h = kv_head * G + f % G;
        src = p.q + (static_cast<size_t>(tok0 + t) * p.num_heads + h) * D + chunk * 8;
        bytes = 16;
      }
      cp_async_16(sQ + swz<D>(r, chunk), src, bytes);
    }
    cp_async_commit();
    cp_async_wait<0>();
    __syncthreads();
  }
  uint32_t qf[kQK][4];
#pragma unroll
  for (int kk = 0; kk < kQK; ++kk)
    ldmatrix_x4(qf[kk], sQ + swz<D>(16 * wm + (lane & 15), (dim0 + 16 * kk) / 8 + (lane >> 4)));
  __syncthreads();  // the Q staging area becomes the K/V tiles

  // Per-thread query rows (g and g + 8 of the warp's 16): token index, for the mask.
  int q_tok[2];
#pragma unroll
  for (int rr = 0; rr < 2; ++rr) q_tok[rr] = (f0 + 16 * wm + g + 8 * rr) / G;

  float o[kDT][4];
#pragma unroll
  for (int i = 0; i < kDT; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.f;
  float m_run[2] = {kNegInf, kNegInf}, l_run[2] = {0.f, 0.f};
  const float scale_log2 = p.scale * 1.4426950408889634f;

  RowKeys rk_k = rk, rk_v = rk;
  rk_k.cache = p.k_cache, rk_k.fresh = p.k_new;
  rk_v.cache = p.v_cache, rk_v.fresh = p.v_new;

  if (n_tiles > 0) load_kv_tile<Cfg>(sK, rk_k, p, k_begin);
  cp_async_commit();

  for (int j = 0; j < n_tiles; ++j) {
    const int k0 = k_begin + j * BN;
    load_kv_tile<Cfg>(sV, rk_v, p, k0);
    cp_async_commit();
    cp_async_wait<1>();  // K(j) has landed; V(j) may still be in flight
    __syncthreads();

    // ---- S = Q K^T over this warp's dims ----
    float s[kNT][4];
#pragma unroll
    for (int i = 0; i < kNT; ++i) s[i][0] = s[i][1] = s[i][2] = s[i][3] = 0.f;
#pragma unroll
    for (int kk = 0; kk < kQK; ++kk) {
#pragma unroll
      for (int nn = 0; nn < kNT / 2; ++nn) {
        uint32_t b[4];
        ldmatrix_x4(b, sK + swz<D>(16 * nn + (lane & 7) + ((lane >> 4) << 3), (dim0 + 16 * kk) / 8 + ((lane >> 3) & 1)));
        mma_bf16(s[2 * nn], qf[kk], b[0], b[1]);
        mma_bf16(s[2 * nn + 1], qf[kk], b[2], b[3]);
      }
    }
    if constexpr (kWarpsD > 1) {
      float* mine = sX + ((wm * kWarpsD + wd) * Cfg::kSFrag) * 32 + lane;
#pragma unroll
      for (int i = 0; i < kNT; ++i)
#pragma unroll
        for (int e = 0; e < 4; ++e) mine[(4 * i + e) * 32] = s[i][e];
      __syncthreads();  // also: every warp is done reading K(j)
      const float* grp = sX + (wm * kWarpsD * Cfg::kSFrag) * 32 + lane;
#pragma unroll
      for (int i = 0; i < kNT; ++i)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          float acc = grp[(4 * i + e) * 32];
#pragma unroll
          for (int w = 1; w < kWarpsD; ++w) acc += grp[(w * Cfg::kSFrag + 4 * i + e) * 32];
          s[i][e] = acc;
        }
    } else {
      __syncthreads();  // every warp is done reading K(j)
    }
    if (j + 1 < n_tiles) load_kv_tile<Cfg>(sK, rk_k, p, k0 + BN);
    cp_async_commit();

    // ---- scale and mask (keys past the row's end; causal / window) ----
    // CTA-uniform test: is every key of this tile visible to every query row of the tile?
    const bool full_tile = k0 + BN <= rk.n_keys &&
                           (!causal || (k0 + BN - 1 <= rk.n_cached + t_first &&
                                        (window <= 0 || k0 > rk.n_cached + t_last - window)));
#pragma unroll
    for (int i = 0; i < kNT; ++i)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        float v = s[i][e] * scale_log2;
        if (!full_tile) {
          const int key = k0 + 8 * i + 2 * tq + (e & 1);
          const int lim = rk.n_cached + q_tok[e >> 1];
          bool vis = key < rk.n_keys;
          if (causal) vis = vis && key <= lim && (window <= 0 || key > lim - window);
          if (!vis) v = kNegInf;
        }
        s[i][e] = v;
      }

    // ---- online softmax (log2 domain); rows g (rr = 0) and g + 8 (rr = 1) ----
#pragma unroll
    for (int rr = 0; rr < 2; ++rr) {
      float mx = kNegInf;
#pragma unroll
      for (int i = 0; i < kNT; ++i) mx = fmaxf(mx, fmaxf(s[i][2 * rr], s[i][2 * rr + 1]));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
      const float m_new = fmaxf(m_run[rr], mx);
      const float base = m_new == kNegInf ? 0.f : m_new;  // a row with nothing visible yet: avoid inf - inf
      const float alpha = exp2f(m_run[rr] - base);
      m_run[rr] = m_new;
      float sum = 0.f;
#pragma unroll
      for (int i = 0; i < kNT; ++i) {
        s[i][2 * rr] = exp2f(s[i][2 * rr] - base);
        s[i][2 * rr + 1] = exp2f(s[i][2 * rr + 1] - base);
        sum += s[i][2 * rr] + s[i][2 * rr + 1];
      }
      l_run[rr] = l_run[rr] * alpha + sum;  // this thread's columns only; quad-reduced at the end
#pragma unroll
      for (int i = 0; i < kDT; ++i) {
        o[i][2 * rr] *= alpha;
        o[i][2 * rr + 1] *= alpha;
      }
    }

    // P as bf16 A fragments: k-step kk covers S n-tiles 2kk and 2kk + 1.
    uint32_t pa[kNT / 2][4];
#pragma unroll
    for (int kk = 0; kk < kNT / 2; ++kk) {
      pa[kk][0] = pack_bf16x2(s[2 * kk][0], s[2 * kk][1]);
      pa[kk][1] = pack_bf16x2(s[2 * kk][2], s[2 * kk][3]);
      pa[kk][2] = pack_bf16x2(s[2 * kk + 1][0], s[2 * kk + 1][1]);
      pa[kk][3] = pack_bf16x2(s[2 * kk + 1][2], s[2 * kk + 1][3]);
    }

    cp_async_wait<1>();  // V(j) has landed; K(j + 1) may still be in flight
    __syncthreads();

    // ---- O += P V over this warp's dims ----
#pragma unroll
    for (int kk = 0; kk < kNT / 2; ++kk) {
#pragma unroll
      for (int nd = 0; nd < kDT / 2; ++nd) {
        uint32_t b[4];
        ldmatrix_x4_trans(b, sV + swz<D>(16 * kk + (lane & 7) + (((lane >> 3) & 1) << 3), (dim0 + 16 * nd) / 8 + (lane >> 4)));
        mma_bf16(o[2 * nd], pa[kk], b[0], b[1]);
        mma_bf16(o[2 * nd + 1], pa[kk], b[2], b[3]);
      }
    }
    __syncthreads();  // V(j) and the exchange buffer are free for the next tile
  }
  cp_async_wait<0>();

  // ---- normalise and store ----
#pragma unroll
  for (int rr = 0; rr < 2; ++rr) {
    float l = l_run[rr];
    l += __shfl_xor_sync(0xffffffffu, l, 1);
    l += __shfl_xor_sync(0xffffffffu, l, 2);
    const float inv = l > 0.f ? 1.f / l : 0.f;
    const int f = f0 + 16 * wm + g + 8 * rr;
    if (f >= f_end) continue;
    const int t = f / G, h = kv_head * G + f % G;
    __nv_bfloat16* dst = p.out + (static_cast<size_t>(tok0 + t) * p.num_heads + h) * D + dim0 + 2 * tq;
#pragma unroll
    for (int i = 0; i < kDT; ++i)
      *reinterpret_cast<__nv_bfloat162*>(dst + 8 * i) =
          __floats2bfloat162_rn(o[i][2 * rr] * inv, o[i][2 * rr + 1] * inv);
  }
}

template <class Cfg>
cudaError_t launch_attention(const AttentionParams& p, cudaStream_t stream) {
  if (p.head_dim != Cfg::kHeadDim || p.num_kv_heads <= 0 || p.num_heads <= 0 || p.num_heads % p.num_kv_heads != 0 ||
      p.rows < 0 || p.max_count < 0 || p.block_size <= 0 || p.max_blocks_per_row < 0)
    return cudaErrorInvalidValue;
  if (p.rows == 0 || p.max_count == 0) return cudaSuccess;
  auto misaligned = [](const void* ptr) { return (reinterpret_cast<uintptr_t>(ptr) & 15) != 0; };
  if (!p.q || !p.k_new || !p.v_new || !p.out || !p.block_table || !p.cache_first_pos || !p.cache_start ||
      !p.cache_len || !p.tok0 || !p.count || misaligned(p.q) || misaligned(p.k_new) || misaligned(p.v_new) ||
      misaligned(p.k_cache) || misaligned(p.v_cache) || misaligned(p.out))
    return cudaErrorInvalidValue;
  const int G = p.num_heads / p.num_kv_heads;
  const long long m_tiles = (static_cast<long long>(p.max_count) * G + Cfg::kBlockM - 1) / Cfg::kBlockM;
  if (static_cast<long long>(p.max_count) * G > INT_MAX || p.num_kv_heads > 65535 || p.rows > 65535)
    return cudaErrorInvalidValue;
  auto kernel = attention_kernel<Cfg>;
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Cfg::kSmemBytes);
  if (err != cudaSuccess) return err;
  const dim3 grid(static_cast<unsigned>(m_tiles), static_cast<unsigned>(p.num_kv_heads), static_cast<unsigned>(p.rows));
  kernel<<<grid, Cfg::kThreads, Cfg::kSmemBytes, stream>>>(p);
  return cudaGetLastError();
}

// Tile choice per head_dim (see the header comment of attention_hd<D>.cu).
template <int kHeadDim>
struct AttnTiles;
template <>
struct AttnTiles<256> {
  using Cfg = AttnConfig<256, 4, 32>;  // BM 64 x 2 warps over dims, BN 32: 256 threads, 48 KB smem
};
template <>
struct AttnTiles<512> {
  using Cfg = AttnConfig<512, 2, 32>;  // BM 32 x 4 warps over dims, BN 32: 256 threads, 80 KB smem
};

}  // namespace dgemma::kernels::attention_detail

namespace dgemma::kernels {

template <int kHeadDim>
cudaError_t attention_forward_hd(const AttentionParams& p, cudaStream_t stream) {
  return attention_detail::launch_attention<typename attention_detail::AttnTiles<kHeadDim>::Cfg>(p, stream);
}

}  // namespace dgemma::kernels
