// The mma.sync attention kernel (sm_80-class tensor cores): the fallback where the sm_90a wgmma kernel
// does not run (sm_100a, sm_120a, builds without CUTLASS/CuTe headers). Contract: attention.cuh; tile
// and split math: attention_plan.h (tiles sm80_tiles(D)).
//
// CTA = (query tile, KV head x split part, row). Query tile: kBlockM flattened query rows
// f = token * G + head_in_group (G = num_heads / num_kv_heads) of one KV head, so each K/V tile
// serves every query head of the group. Warps form a kWarpsM x kWarpsD grid: warp (wm, wd) owns query
// rows [16 wm, 16 wm + 16) and head dims [wd * kDimsPerWarp, (wd + 1) * kDimsPerWarp), so the fp32
// output accumulator of head_dim 512 fits in registers. Per key tile of kBlockN keys:
//   S_partial = Q[rows, dims of wd] K[tile, dims of wd]^T   (mma.sync m16n8k16, fp32)
//   S = sum over wd of S_partial, exchanged through shared memory (summed in the same order by every
//       warp, so the kWarpsD warps of a row group hold bit-identical S and softmax statistics)
//   mask, online softmax in the log2 domain, O[rows, dims of wd] += P (bf16) V[tile, dims of wd]
// K and V tiles are single-buffered with cp.async: V(j) loads during S(j), K(j+1) during softmax/PV(j).
// Shared memory rows are XOR-swizzled in 16-byte chunks (chunk ^ (row & 7)) so that ldmatrix is
// conflict-free. Fragment layouts are those of the PTX ISA for mma.m16n8k16 (.row.col).
#pragma once

#include "kernels/common/ptx.cuh"
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "kernels/attention/attention_common.cuh"

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
  static constexpr int kCtasPerSm = 1;  // the output accumulator takes up to 255 registers per thread
  static constexpr int kTileElems = kBlockN * kHeadDim;
  static constexpr int kSFrag = kBlockN / 8 * 4;  // S accumulator floats per thread
  static constexpr int kExchFloats = kWarpsD > 1 ? kWarpsM * kWarpsD * kSFrag * 32 : 0;
  static constexpr int kSmemBytes = 2 * kTileElems * 2 + kExchFloats * 4;

  static_assert(kHeadDim % 64 == 0, "the swizzle needs a multiple of 8 chunks per row");
  static_assert(kHeadDim % kDimsPerWarp == 0 && kDimsPerWarp % 16 == 0, "head_dim split over warps");
  static_assert(kBlockN % 16 == 0 && (kBlockN & (kBlockN - 1)) == 0, "key tile: a power of two, multiple of the mma k");
  static_assert(kBlockM <= 2 * kBlockN, "Q is staged in the K and V tile buffers");
  static_assert(kThreads <= 1024, "CTA size");
  static_assert(attention_plan::sm80_tiles(kHeadDim).block_m == kBlockM &&
                    attention_plan::sm80_tiles(kHeadDim).block_n == kBlockN,
                "attention_plan::sm80_tiles describes this config to the host");
};

// Element offset of (row, 16-byte chunk) in a swizzled [rows, kHeadDim] bf16 tile.
template <int kHeadDim>
__device__ __forceinline__ int swz(int row, int chunk) {
  return row * kHeadDim + ((chunk ^ (row & 7)) << 3);
}

using ptx::ldmatrix_x4;
using ptx::ldmatrix_x4_trans;
__device__ __forceinline__ void mma_bf16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  ptx::mma_bf16_16816(d, a, b0, b1);
}

template <class Cfg>
__global__ void __launch_bounds__(Cfg::kThreads, Cfg::kCtasPerSm) sm80_attention_kernel(const AttnArgs a) {
  constexpr int D = Cfg::kHeadDim, BM = Cfg::kBlockM, BN = Cfg::kBlockN, DW = Cfg::kDimsPerWarp;
  constexpr int kWarpsD = Cfg::kWarpsD;
  constexpr int kNT = BN / 8;   // S n-tiles (8 keys each)
  constexpr int kDT = DW / 8;   // O n-tiles (8 dims each)
  constexpr int kQK = DW / 16;  // k-steps of Q K^T over this warp's dims
  constexpr int kLgBN = attention_plan::log2_exact(BN);
  const float kNegInf = -INFINITY;
  const AttentionParams& p = a.p;

  extern __shared__ __align__(128) unsigned char smem_raw[];
  __nv_bfloat16* sK = reinterpret_cast<__nv_bfloat16*>(smem_raw);
  __nv_bfloat16* sV = sK + Cfg::kTileElems;
  float* sX = reinterpret_cast<float*>(sV + Cfg::kTileElems);  // S partials exchange
  __nv_bfloat16* sQ = sK;                                       // Q staging, before the key loop

  const int row = blockIdx.z, split = blockIdx.y % a.splits, kv_head = blockIdx.y / a.splits;
  const int G = p.num_heads / p.num_kv_heads;
  const RowCtx rc = row_ctx(p, row);
  attention_plan::CtaWork w;
  if (!attention_plan::cta_work(rc.rk, G, BM, kLgBN, p.causal, p.window, blockIdx.x, split, a.splits, w))
    return;  // whole CTA: this row has fewer tokens than the grid allows for
  const bool causal = p.causal;
  const int window = causal ? p.window : 0;

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int wm = warp / kWarpsD, wd = warp % kWarpsD;
  const int g = lane >> 2, tq = lane & 3;  // mma fragment row group / column pair
  const int dim0 = wd * DW;

  // ---- Q tile -> smem -> registers (A fragments for this warp's rows and dims) ----
  load_q_tile<BM, D, Cfg::kThreads>(p, rc.tok0, kv_head, G, w.f0, w.f_end, [&](int r, int k, int seg) {
    return sQ + r * D + ((8 * k + (seg ^ (r & 7))) << 3);
  });
  cp_async_commit();
  cp_async_wait<0>();
  __syncthreads();
  uint32_t qf[kQK][4];
#pragma unroll
  for (int kk = 0; kk < kQK; ++kk)
    ldmatrix_x4(qf[kk], sQ + swz<D>(16 * wm + (lane & 15), (dim0 + 16 * kk) / 8 + (lane >> 4)));
  __syncthreads();  // the Q staging area becomes the K/V tiles

  // Per-thread query rows (g and g + 8 of the warp's 16): their positions, for the mask.
  int q_pos[2];
#pragma unroll
  for (int rr = 0; rr < 2; ++rr) q_pos[rr] = rc.rk.len + (w.f0 + 16 * wm + g + 8 * rr) / G;
  const int q_pos_first = rc.rk.len + w.t_first, q_pos_last = rc.rk.len + w.t_last;

  float o[kDT][4];
#pragma unroll
  for (int i = 0; i < kDT; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.f;
  float m_run[2] = {kNegInf, kNegInf}, l_run[2] = {0.f, 0.f};
  const float scale_log2 = p.scale * 1.4426950408889634f;

  // Built where used: the pointers stay in the kernel-parameter bank instead of registers.
  auto src_k = [&] { return KvSrc{p.k_cache, p.k_new, rc.blocks, a.lg_bs, rc.tok0, kv_head, p.num_kv_heads}; };
  auto src_v = [&] { return KvSrc{p.v_cache, p.v_new, rc.blocks, a.lg_bs, rc.tok0, kv_head, p.num_kv_heads}; };
  auto tile_dst = [](__nv_bfloat16* tile) {
    return [tile](int i, int k, int seg) { return tile + i * D + ((8 * k + (seg ^ (i & 7))) << 3); };
  };

  if (w.j0 < w.j1) load_key_tile<BN, D, Cfg::kThreads>(attention_plan::key_tile(rc.rk, w.span, w.j0, kLgBN), src_k(),
                                                       tile_dst(sK));
  cp_async_commit();

  for (int j = w.j0; j < w.j1; ++j) {
    const KeyTile kt = attention_plan::key_tile(rc.rk, w.span, j, kLgBN);
    load_key_tile<BN, D, Cfg::kThreads>(kt, src_v(), tile_dst(sV));
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
          for (int ww = 1; ww < kWarpsD; ++ww) acc += grp[(ww * Cfg::kSFrag + 4 * i + e) * 32];
          s[i][e] = acc;
        }
    } else {
      __syncthreads();  // every warp is done reading K(j)
    }
    if (j + 1 < w.j1)
      load_key_tile<BN, D, Cfg::kThreads>(attention_plan::key_tile(rc.rk, w.span, j + 1, kLgBN), src_k(), tile_dst(sK));
    cp_async_commit();

    // ---- scale and mask: keys outside the row's range, causal / window ----
    // CTA-uniform test: is every key of this tile visible to every query row of the tile?
    int lo_all, hi_all, unused;
    attention_plan::visible_range(kt, causal, window, q_pos_last, lo_all, unused);
    attention_plan::visible_range(kt, causal, window, q_pos_first, unused, hi_all);
    const bool full_tile = lo_all <= kt.pos0 && kt.pos0 + BN <= hi_all;
    int col_lo[2], col_hi[2];  // visible tile columns [col_lo, col_hi) of this thread's rows
#pragma unroll
    for (int rr = 0; rr < 2; ++rr) {
      attention_plan::visible_range(kt, causal, window, q_pos[rr], col_lo[rr], col_hi[rr]);
      col_lo[rr] -= kt.pos0, col_hi[rr] -= kt.pos0;
    }
#pragma unroll
    for (int i = 0; i < kNT; ++i)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        float v = s[i][e] * scale_log2;
        if (!full_tile) {
          const int col = 8 * i + 2 * tq + (e & 1), rr = e >> 1;
          if (col < col_lo[rr] || col >= col_hi[rr]) v = kNegInf;
        }
        s[i][e] = v;
      }

    // ---- online softmax (log2 domain); rows g (rr = 0) and g + 8 (rr = 1) ----
#pragma unroll
    for (int rr = 0; rr < 2; ++rr) {
      float v[2 * kNT];
#pragma unroll
      for (int i = 0; i < kNT; ++i) v[2 * i] = s[i][2 * rr], v[2 * i + 1] = s[i][2 * rr + 1];
      const float alpha = online_softmax_row(v, m_run[rr], l_run[rr]);
#pragma unroll
      for (int i = 0; i < kNT; ++i) s[i][2 * rr] = v[2 * i], s[i][2 * rr + 1] = v[2 * i + 1];
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

  // ---- normalise and store (or store the split-KV partial) ----
#pragma unroll
  for (int rr = 0; rr < 2; ++rr) {
    const float l = quad_sum(l_run[rr]);
    const float inv = l > 0.f ? 1.f / l : 0.f;
    const OutRow orow = out_row(p, row, rc.tok0, kv_head, G, w.f0 + 16 * wm + g + 8 * rr, w.f_end, D);
    if (!orow.valid) continue;
#pragma unroll
    for (int i = 0; i < kDT; ++i) store_pair(a, orow, split, dim0 + 8 * i + 2 * tq, o[i][2 * rr], o[i][2 * rr + 1], inv);
    if (a.splits > 1 && wd == 0 && tq == 0) store_stats(a, orow, split, m_run[rr], l);
  }
}

// Tile choice per head_dim (attention_plan::sm80_tiles).
template <int kHeadDim>
struct Sm80Tiles;
template <>
struct Sm80Tiles<256> {
  using Cfg = AttnConfig<256, 4, 32>;  // BM 64 x 2 warps over dims, BN 32: 256 threads, 48 KB smem
};
template <>
struct Sm80Tiles<512> {
  using Cfg = AttnConfig<512, 2, 32>;  // BM 32 x 4 warps over dims, BN 32: 256 threads, 80 KB smem
};

}  // namespace dgemma::kernels::attention_detail
