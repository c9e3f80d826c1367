// The sm_90a attention kernel: wgmma (CuTe GMMA atoms) on 64-row query tiles, cp.async gathers of the
// paged K/V, split-KV. Contract: attention.cuh; tile, slot and split math: attention_plan.h.
//
// Shapes that matter (DiffusionGemma 26B-A4B): decoder step = 256 canvas tokens per row, batch 1..8,
// cached context 0..32k; encoder prefill = up to a few thousand causal tokens per row.
//   head_dim 256 (sliding layers): 16 heads over 8 KV heads (G = 2), window 1024, so at most
//     1023 + 256 keys per row;
//   head_dim 512 (full layers):    16 heads over 2 KV heads (G = 8), every cached key.
// The query tile packs the flattened rows f = token * G + head_in_group of one KV head, so a K/V tile
// in shared memory serves every query head of the group.
//
// CTA = 256 threads = two warpgroups (WG), one per (query tile, KV head x split part, row):
//   head_dim 256: BM = 128 query rows; WG w owns rows [64 w, 64 w + 64) and all 256 output dims.
//   head_dim 512: BM = 64 query rows; both WGs own the same 64 rows and split the output dims, WG w
//     has dims [256 w, 256 w + 256) (as FlashMLA splits its 512-dim V): a 64 x 512 fp32 accumulator
//     would need 256 registers per thread in one WG. S = Q K^T is split the same way: WG w computes
//     the partial over its 256 dims, the two partials are exchanged through shared memory and each
//     WG adds the other's to its own (a + b == b + a in IEEE arithmetic, so both hold bit-identical
//     S and softmax statistics), then O_w += P V[:, dims of w].
// So both head dims run one code shape per WG: S (64 x BN) = Q_w (64 x 256) K_w^T, SS wgmma
// m64n64k16 x 16; O_w (64 x 256) += P (64 x BN) V_w (BN x 256), RS wgmma m64n256k16 x 4 with P in
// registers (the fp32 S accumulator's register order is that of the bf16 A operand).
//
// Shared memory: operands as "panels" of (rows x 256 dims) bf16 in the K-major 128-byte-swizzle
// layout of GMMA (8 x 64 atoms; tile_to_shape(Layout_K_SW128_Atom, (rows, 256))), 1024-aligned;
// V is read through the transposed (MN-major) view of the same layout.
//   head_dim 256: Q 2 x 32 KB (row halves), K 32 KB, V 32 KB                      = 128 KB
//   head_dim 512: Q 2 x 32 KB (dim halves), K 2 x 32 KB, V 2 x 32 KB, S exchange 32 KB = 224 KB
// One CTA per SM; registers: O 128 + S 32 + P 16 per thread (+ addressing), budget 255.
//
// Pipeline per key tile j (BN = 64 keys), all 256 threads both load and compute:
//   issue V(j) | wait K(j) | S = Q K^T | [exchange S] | issue K(j+1) | mask, online softmax (exp2,
//   log2 domain), P = bf16 | wait V(j) | O += P V
// K(j+1) streams in behind softmax and PV(j), V(j) behind QK(j); cp.async zero-fills rows outside the
// row's keys; a proxy fence makes the cp.async writes visible to wgmma. Gathers: 8 threads per
// 128-byte segment of a key row, one slot computation (table load, shift, mask) per row per tile.
// Not done yet (the next steps if the GPU shows them worth it): warp specialisation with TMA and
// setmaxnreg, overlap of softmax with the other WG's wgmma (FA3 ping-pong), 2-CTA clusters that
// multicast K/V to halve the L2 traffic of head_dim 512.
//
// Expected (H100, batch 1, 4,096 cached tokens, per layer; python/dgemma_rt/roofline.py):
//   head_dim 256: 5.4 GFLOP, compute floor ~5.4 us. 4 m tiles x 8 KV heads x 4 split parts = 128 CTAs
//     (one wave), each 128 rows against ~320 keys. ~50% of the wgmma peak in the loop: the softmax does
//     not overlap the MMAs, QK's SS operands run near shared-memory bandwidth, and the 32 CTAs per split
//     re-read ~40 MB of K/V from L2 (128 FLOP per L2 byte) -> ~11 us; the fp32 partials (16 MB) and the
//     combine add ~6 us: ~18 us, efficiency ~0.3 (the mma.sync kernel: ~55 us).
//   head_dim 512: 36.5 GFLOP, floor ~37 us. 32 m tiles x 2 KV heads x 2 split parts = 128 CTAs; each
//     streams its KV head's K/V (2 KB per key) for only 64 rows: 64 FLOP per L2 byte, ~0.6 GB of L2
//     reads, so L2 (~6.5 TB/s) bounds it near 40% of the peak: ~97 us, efficiency ~0.38 (the 32-row
//     mma.sync tiles moved ~1.1 GB: ~200 us). Sharing K/V tiles between 2-4 CTAs of a cluster (TMA
//     multicast) is what would lift it toward the compute floor.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "kernels/attention/attention_common.cuh"

#if defined(DGEMMA_WITH_CUTLASS)
#include <cute/arch/mma_sm90.hpp>
#include <cute/atom/mma_traits_sm90_gmma.hpp>
#include <cute/tensor.hpp>
#endif

namespace dgemma::kernels::attention_detail {

template <int kHeadDim_>
struct Sm90Config {
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr bool kSplitDims = kHeadDim == 512;  // the two WGs share rows and split the output dims
  static constexpr int kBlockM = attention_plan::sm90_tiles(kHeadDim).block_m;
  static constexpr int kBlockN = attention_plan::sm90_tiles(kHeadDim).block_n;
  static constexpr int kThreads = 256;
  static constexpr int kCtasPerSm = 1;  // the shared-memory plan below fills the SM
  static constexpr int kPanelDims = 256;
  static constexpr int kQPanels = 2;
  static constexpr int kKvPanels = kHeadDim / kPanelDims;
  static constexpr int kQPanelElems = 64 * kPanelDims;
  static constexpr int kKvPanelElems = kBlockN * kPanelDims;
  static constexpr int kSFrag = kBlockN / 2;  // S accumulator floats per thread (64 x BN over 128 threads)
  static constexpr int kQBytes = kQPanels * kQPanelElems * 2;
  static constexpr int kKvBytes = kKvPanels * kKvPanelElems * 2;
  static constexpr int kXBytes = kSplitDims ? 2 * kSFrag * 128 * 4 : 0;
  static constexpr int kSmemBytes = kQBytes + 2 * kKvBytes + kXBytes + 1024;  // + slack to align to 1024

  static_assert(kHeadDim == 256 || kHeadDim == 512, "head_dim");
  static_assert(kBlockM == (kSplitDims ? 64 : 128), "64 rows per WG");
  static_assert(kBlockN == 64, "the S tile is one m64n64 wgmma per k-step");
  // The opt-in limit (227 KB) also holds the 1 KB ptxas reserves in every CTA (.nv.shared.reserved.0).
  static_assert(kSmemBytes + 1024 <= 227 * 1024, "shared memory per CTA");
};

// The element offset of chunk pc (16 bytes, pc < 32) of row r in a (rows x 256) K-major SW128 panel:
// the 64-dim column group pc / 8 is a block of rows x 128 bytes; inside it the chunk index is XORed
// with r % 8. This is what the CuTe layout tile_to_shape(Layout_K_SW128_Atom<bf16>, (rows, 256))
// computes (checked against CuTe when this was written).
template <int kRows>
__device__ __forceinline__ int panel_offset(int r, int group, int chunk_in_group) {
  return group * (kRows * 64) + r * 64 + ((chunk_in_group ^ (r & 7)) << 3);
}

#if defined(DGEMMA_WITH_CUTLASS)
namespace sm90 {
using namespace cute;
using Elem = cutlass::bfloat16_t;

template <int BN>
struct Mma {
  using PanelQ = decltype(tile_to_shape(GMMA::Layout_K_SW128_Atom<Elem>{}, Shape<_64, _256>{}));
  using PanelKV = decltype(tile_to_shape(GMMA::Layout_K_SW128_Atom<Elem>{}, Shape<Int<BN>, _256>{}));
  using PanelVt = decltype(composition(PanelKV{}, make_layout(Shape<_256, Int<BN>>{}, GenRowMajor{})));
  using QK = decltype(make_tiled_mma(GMMA::ss_op_selector<Elem, Elem, float, Shape<_64, Int<BN>, _256>>()));
  using PV = decltype(make_tiled_mma(
      GMMA::rs_op_selector<Elem, Elem, float, Shape<_64, _256, Int<BN>>, GMMA::Major::K, GMMA::Major::MN>()));
};

// C = A B (zero_init) or C += A B over the whole K extent, issued and waited for by one warpgroup.
template <bool kZeroInit, class TiledMma, class TA, class TB, class TC>
__device__ __forceinline__ void wg_gemm(TiledMma& mma, TA& a, const TB& b, TC& c) {
  constexpr bool kRs = !cute::is_base_of<GMMA::DescriptorIterator, typename TiledMma::FrgTypeA>::value;
  if constexpr (kRs) warpgroup_fence_operand(a);
  warpgroup_fence_operand(c);
  warpgroup_arrive();
  mma.accumulate_ = kZeroInit ? GMMA::ScaleOut::Zero : GMMA::ScaleOut::One;
  CUTE_UNROLL
  for (int k = 0; k < size<2>(a); ++k) {
    cute::gemm(mma, a(_, _, k), b(_, _, k), c);
    mma.accumulate_ = GMMA::ScaleOut::One;
  }
  warpgroup_commit_batch();
  warpgroup_wait<0>();
  warpgroup_fence_operand(c);
  if constexpr (kRs) warpgroup_fence_operand(a);
}
}  // namespace sm90
#endif

__device__ __forceinline__ void fence_proxy_async_shared() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
#endif
}

template <class Cfg>
__global__ void __launch_bounds__(Cfg::kThreads, Cfg::kCtasPerSm) sm90_attention_kernel(const AttnArgs a) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ == 900 && defined(DGEMMA_WITH_CUTLASS)
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using namespace cute;
  using Elem = sm90::Elem;
  using M = sm90::Mma<Cfg::kBlockN>;
  constexpr int D = Cfg::kHeadDim, BM = Cfg::kBlockM, BN = Cfg::kBlockN;
  constexpr int kLgBN = attention_plan::log2_exact(BN);
  constexpr int kSF = Cfg::kSFrag;
  const AttentionParams& p = a.p;

  extern __shared__ unsigned char smem_raw[];
  unsigned char* smem = smem_raw + ((1024u - (smem_u32(smem_raw) & 1023u)) & 1023u);
  __nv_bfloat16* sQ = reinterpret_cast<__nv_bfloat16*>(smem);
  __nv_bfloat16* sK = sQ + Cfg::kQPanels * Cfg::kQPanelElems;
  __nv_bfloat16* sV = sK + Cfg::kKvPanels * Cfg::kKvPanelElems;
  float* sX = reinterpret_cast<float*>(sV + Cfg::kKvPanels * Cfg::kKvPanelElems);  // head_dim 512: S partials

  const int row = blockIdx.z, split = blockIdx.y % a.splits, kv_head = blockIdx.y / a.splits;
  const int G = p.num_heads / p.num_kv_heads;
  const RowCtx rc = row_ctx(p, row);
  attention_plan::CtaWork w;
  if (!attention_plan::cta_work(rc.rk, G, BM, kLgBN, p.causal, p.window, blockIdx.x, split, a.splits, w)) return;
  const bool causal = p.causal;
  const int window = causal ? p.window : 0;

  // ---- gathers: Q once, K(j0) ----
  // Q row r, chunk seg + 8 k: head_dim 512 -> panel k / 4 (dims), head_dim 256 -> panel r / 64 (rows).
  load_q_tile<BM, D, Cfg::kThreads>(p, rc.tok0, kv_head, G, w.f0, w.f_end, [&](int r, int k, int seg) {
    const int panel = Cfg::kSplitDims ? k / 4 : r / 64, pr = Cfg::kSplitDims ? r : r % 64;
    return sQ + panel * Cfg::kQPanelElems + panel_offset<64>(pr, k % 4, seg);
  });
  cp_async_commit();
  // Built where used: the pointers stay in the kernel-parameter bank instead of registers.
  auto src_k = [&] { return KvSrc{p.k_cache, p.k_new, rc.blocks, a.lg_bs, rc.tok0, kv_head, p.num_kv_heads}; };
  auto src_v = [&] { return KvSrc{p.v_cache, p.v_new, rc.blocks, a.lg_bs, rc.tok0, kv_head, p.num_kv_heads}; };
  auto tile_dst = [](__nv_bfloat16* base) {
    return [base](int i, int k, int seg) {
      return base + (k / 4) * Cfg::kKvPanelElems + panel_offset<BN>(i, k % 4, seg);
    };
  };
  if (w.j0 < w.j1) load_key_tile<BN, D, Cfg::kThreads>(attention_plan::key_tile(rc.rk, w.span, w.j0, kLgBN), src_k(),
                                                       tile_dst(sK));
  cp_async_commit();

  // ---- this warpgroup's operands ----
  const int wg = threadIdx.x / 128, wt = threadIdx.x % 128;
  const int kv_panel = Cfg::kSplitDims ? wg : 0;
  Tensor tQ = make_tensor(make_smem_ptr(reinterpret_cast<Elem*>(sQ + wg * Cfg::kQPanelElems)), typename M::PanelQ{});
  Tensor tK = make_tensor(make_smem_ptr(reinterpret_cast<Elem*>(sK + kv_panel * Cfg::kKvPanelElems)),
                          typename M::PanelKV{});
  Tensor tVt = make_tensor(make_smem_ptr(reinterpret_cast<Elem*>(sV + kv_panel * Cfg::kKvPanelElems)),
                           typename M::PanelVt{});
  typename M::QK mma_qk;
  auto thr_qk = mma_qk.get_thread_slice(wt);
  Tensor tSrQ = thr_qk.partition_fragment_A(tQ);  // smem descriptors
  Tensor tSrK = thr_qk.partition_fragment_B(tK);
  Tensor tSrS = partition_fragment_C(mma_qk, Shape<_64, Int<BN>>{});  // fp32, kSF per thread
  typename M::PV mma_pv;
  auto thr_pv = mma_pv.get_thread_slice(wt);
  Tensor tOrV = thr_pv.partition_fragment_B(tVt);
  Tensor tOrO = partition_fragment_C(mma_pv, Shape<_64, _256>{});                 // fp32, 128 per thread
  Tensor tOrP = make_tensor<Elem>(partition_shape_A(mma_pv, Shape<_64, Int<BN>>{}));  // bf16, kSF per thread
  static_assert(decltype(size(tSrS))::value == kSF && decltype(size(tOrP))::value == kSF, "S and P fragments");
  clear(tOrO);

  // Accumulator element i of thread wt sits at row 16 (wt / 32) + (wt % 32) / 4 + 8 ((i / 2) % 2),
  // column 8 (i / 4) + 2 (wt % 4) + i % 2 (the GMMA C layout; the bf16 A layout of P has the same
  // register order). rr = (i / 2) % 2 picks one of the thread's two rows.
  const int lr0 = 16 * (wt >> 5) + ((wt & 31) >> 2);
  const int row_base = w.f0 + (Cfg::kSplitDims ? 0 : 64 * wg);
  int q_pos[2];
#pragma unroll
  for (int rr = 0; rr < 2; ++rr) q_pos[rr] = rc.rk.len + (row_base + lr0 + 8 * rr) / G;
  const int q_pos_first = rc.rk.len + w.t_first, q_pos_last = rc.rk.len + w.t_last;
  const int col0 = 2 * (wt & 3);

  float m_run[2] = {-INFINITY, -INFINITY}, l_run[2] = {0.f, 0.f};
  const float scale_log2 = p.scale * 1.4426950408889634f;

  for (int j = w.j0; j < w.j1; ++j) {
    const KeyTile kt = attention_plan::key_tile(rc.rk, w.span, j, kLgBN);
    load_key_tile<BN, D, Cfg::kThreads>(kt, src_v(), tile_dst(sV));
    cp_async_commit();
    cp_async_wait<1>();  // Q and K(j) have landed; V(j) may be in flight
    fence_proxy_async_shared();
    __syncthreads();

    // ---- S = Q_w K_w^T ----
    sm90::wg_gemm<true>(mma_qk, tSrQ, tSrK, tSrS);
    if constexpr (Cfg::kSplitDims) {
      float* mine = sX + wg * kSF * 128 + wt;
#pragma unroll
      for (int i = 0; i < kSF; ++i) mine[i * 128] = tSrS(i);
    }
    __syncthreads();  // every WG is done reading K(j); the S partials are visible
    if (j + 1 < w.j1)
      load_key_tile<BN, D, Cfg::kThreads>(attention_plan::key_tile(rc.rk, w.span, j + 1, kLgBN), src_k(), tile_dst(sK));
    cp_async_commit();
    if constexpr (Cfg::kSplitDims) {
      const float* other = sX + (1 - wg) * kSF * 128 + wt;
#pragma unroll
      for (int i = 0; i < kSF; ++i) tSrS(i) = tSrS(i) + other[i * 128];
    }

    // ---- scale and mask: keys outside the row's range, causal / window ----
    int lo_all, hi_all, unused;
    attention_plan::visible_range(kt, causal, window, q_pos_last, lo_all, unused);
    attention_plan::visible_range(kt, causal, window, q_pos_first, unused, hi_all);
    const bool full_tile = lo_all <= kt.pos0 && kt.pos0 + BN <= hi_all;  // CTA-uniform
    int col_lo[2], col_hi[2];
#pragma unroll
    for (int rr = 0; rr < 2; ++rr) {
      attention_plan::visible_range(kt, causal, window, q_pos[rr], col_lo[rr], col_hi[rr]);
      col_lo[rr] -= kt.pos0, col_hi[rr] -= kt.pos0;
    }
    float v[2][kSF / 2];  // per row: this thread's columns, in register order
#pragma unroll
    for (int i = 0; i < kSF; ++i) {
      const int rr = (i >> 1) & 1, col = 8 * (i >> 2) + col0 + (i & 1);
      float x = tSrS(i) * scale_log2;
      if (!full_tile && (col < col_lo[rr] || col >= col_hi[rr])) x = -INFINITY;
      v[rr][(i >> 2) * 2 + (i & 1)] = x;
    }

    // ---- online softmax (log2 domain) ----
#pragma unroll
    for (int rr = 0; rr < 2; ++rr) {
      const float alpha = online_softmax_row(v[rr], m_run[rr], l_run[rr]);
#pragma unroll
      for (int i = 0; i < size(tOrO); ++i)
        if (((i >> 1) & 1) == rr) tOrO(i) *= alpha;
    }
    // P = bf16(S) in the A-operand register order (pairs of adjacent columns of one row).
    Tensor tOrP32 = recast<uint32_t>(tOrP);
#pragma unroll
    for (int i = 0; i < kSF; i += 2) {
      const int rr = (i >> 1) & 1, c = (i >> 2) * 2;
      tOrP32(i / 2) = pack_bf16x2(v[rr][c], v[rr][c + 1]);
    }

    cp_async_wait<1>();  // V(j) has landed; K(j + 1) may be in flight
    fence_proxy_async_shared();
    __syncthreads();

    // ---- O_w += P V_w ----
    sm90::wg_gemm<false>(mma_pv, tOrP, tOrV, tOrO);
    __syncthreads();  // V(j) and the exchange buffer are free for the next tile
  }
  cp_async_wait<0>();

  // ---- normalise and store (or store the split-KV partial) ----
  const int dim0 = Cfg::kSplitDims ? 256 * wg : 0;
#pragma unroll
  for (int rr = 0; rr < 2; ++rr) {
    const float l = quad_sum(l_run[rr]);
    const float inv = l > 0.f ? 1.f / l : 0.f;
    const OutRow orow = out_row(p, row, rc.tok0, kv_head, G, row_base + lr0 + 8 * rr, w.f_end, D);
    if (!orow.valid) continue;
#pragma unroll
    for (int i = 0; i < size(tOrO); i += 2)
      if (((i >> 1) & 1) == rr) store_pair(a, orow, split, dim0 + 8 * (i >> 2) + col0, tOrO(i), tOrO(i + 1), inv);
    if (a.splits > 1 && (wt & 3) == 0 && (!Cfg::kSplitDims || wg == 0)) store_stats(a, orow, split, m_run[rr], l);
  }
#else
  __trap();  // plain sm_90 (no "a"): wgmma unavailable; the host only launches this on sm_90a builds
#endif
#elif defined(__CUDA_ARCH__)
  __trap();  // another architecture's image (sm_100a, sm_120a): a wrong dispatch faults, never leaves out unwritten
#endif
}

}  // namespace dgemma::kernels::attention_detail
