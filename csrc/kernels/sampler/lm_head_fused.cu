// The fused LM head + sampler + self-conditioning pass; the design is in lm_head_fused.cuh.
#include "kernels/common/ptx.cuh"
#include <cooperative_groups.h>

#include <climits>
#include <cstdint>
#include <type_traits>

#include "kernels/kernel_plan.h"
#include "kernels/sampler/lm_head_fused.cuh"

namespace dgemma::kernels {
namespace {

namespace cg = cooperative_groups;

constexpr int kCluster = 8;   // CTAs per cluster = H slices
constexpr int kPosTile = 64;  // positions per cluster
constexpr int kVTile = 64;    // vocabulary entries per tile = per chunk of the token step
constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kTargetClusters = 16;  // 128 CTAs: one wave on an H100's 132 SMs
constexpr int kSplitCtasPerSm = 1;   // the streaming kernel's shared memory (166 KB at HC = 352) fills the SM
constexpr int kMaxPositions = 3072;  // the fallback's position list lives in shared memory
constexpr int kPad = 8;              // bf16 row padding: row strides are odd multiples of 16 bytes
constexpr unsigned kFull = 0xffffffffu;
static_assert(kWarps == kCluster, "the token step maps warp w to H slice w");
static_assert(kPosTile / kCluster == kWarps, "each CTA keeps the statistics of 8 positions, one per warp");

struct SplitStat {  // one (split, position): statistics relative to m
  float m;
  int32_t argmax;
  double s;  // sum expf(x - m)
  double t;  // sum expf(x - m) * (x - m)
  double pad;
};

struct PosStat {
  float m;
  float inv;
  int32_t flag;
  int32_t pad;
};

struct Layout {
  int S, ptiles, nch;
  size_t split_off, soft_off, chunk_off, pos_off, total;
};

__host__ __device__ inline size_t align_up(size_t v) { return (v + 255) & ~size_t(255); }

__host__ __device__ inline int splits_for(int P, int V) {
  const int ptiles = (P + kPosTile - 1) / kPosTile;
  const int tiles = (V + kVTile - 1) / kVTile;
  int S = kTargetClusters / ptiles;
  if (S < 1) S = 1;
  if (S > tiles) S = tiles;
  return S;
}

__host__ __device__ inline Layout layout(int P, int H, int V) {
  Layout l;
  l.S = splits_for(P, V);
  l.ptiles = (P + kPosTile - 1) / kPosTile;
  l.nch = (V + kVTile - 1) / kVTile;
  l.split_off = 0;
  l.soft_off = align_up(l.split_off + sizeof(SplitStat) * l.S * P);
  l.chunk_off = align_up(l.soft_off + sizeof(float) * size_t(l.S) * P * H);
  l.pos_off = align_up(l.chunk_off + sizeof(float4) * size_t(P) * l.nch);
  l.total = align_up(l.pos_off + sizeof(PosStat) * P);
  return l;
}

// ---- small device helpers ------------------------------------------------------------------

// Each output element of the MMA depends only on its row of A, its column of B and its own
// accumulator, so recomputing one row inside a mostly-zero tile gives the same bits as the full tile.
using ptx::cp_async16;
using ptx::cp_async_commit;
using ptx::cp_async_wait;
using ptx::smem_u32;
__device__ __forceinline__ void ldsm_x4(uint32_t (&r)[4], const void* p) { ptx::ldmatrix_x4(r, p); }
__device__ __forceinline__ void ldsm_x4_t(uint32_t (&r)[4], const void* p) { ptx::ldmatrix_x4_trans(r, p); }
__device__ __forceinline__ void ldsm_x2_t(uint32_t (&r)[2], const void* p) { ptx::ldmatrix_x2_trans(r, p); }
__device__ __forceinline__ void mma16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  ptx::mma_bf16_16816(d, a, b0, b1);
}

// The processed logit from the rank-ordered sum of the 8 partials. One function for every kernel,
// with explicit roundings, so the recomputations reproduce the first kernel's bits.
__device__ __forceinline__ float finish_logit(float raw, float cap, float temperature) {
  float l = raw;
  if (cap != 0.f) l = __fmul_rn(tanhf(__fdiv_rn(raw, cap)), cap);
  return __fdiv_rn(l, temperature);
}

// sample_canvas's rule (sampler.cuh); NaN gives none.
__device__ __forceinline__ uint64_t quantise(float prob) {
  return prob > 0.f ? __float2ull_rz(__fmul_rn(prob, 0x1p62f)) : 0ull;
}
__device__ __forceinline__ float prob_of(float x, float mx, float inv) { return __fmul_rn(expf(x - mx), inv); }
__device__ __forceinline__ bool better(float a, int ia, float b, int ib) { return a > b || (a == b && ia < ib); }

__device__ __forceinline__ double warp_sum(double v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(kFull, v, o);
  return v;
}
__device__ __forceinline__ float warp_max(float v) {
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(kFull, v, o));
  return v;
}
__device__ __forceinline__ void warp_argmax(float& v, int& i) {
  for (int o = 16; o > 0; o >>= 1) {
    const float ov = __shfl_xor_sync(kFull, v, o);
    const int oi = __shfl_xor_sync(kFull, i, o);
    if (better(ov, oi, v, i)) v = ov, i = oi;
  }
}
template <typename T>
__device__ __forceinline__ T warp_inclusive_scan(T v, int lane) {
  for (int o = 1; o < 32; o <<= 1) {
    const T n = __shfl_up_sync(kFull, v, o);
    if (lane >= o) v += n;
  }
  return v;
}

__device__ __forceinline__ uint32_t load_pair(const __nv_bfloat16* row, int h, int H) {
  // Two bf16 at h, h + 1 (H even: both in or both out of range).
  return h < H ? *reinterpret_cast<const uint32_t*>(row + h) : 0u;
}

// Partial logits of 16 rows x (8 * NT) vocabulary columns v0 + [0, 8 NT) over H slice [h0, h0 + HC),
// operands from global memory (the recomputations). xa / xb: this lane's rows g and g + 8 (nullptr: a
// zero row). The same k16 chain per element as the first kernel's shared-memory path.
template <int HC, int NT>
__device__ __forceinline__ void partial_logits_global(float (&acc)[NT][4], const __nv_bfloat16* xa,
                                                      const __nv_bfloat16* xb, const __nv_bfloat16* emb, int v0,
                                                      int V, int h0, int H, int lane) {
  const int g = lane >> 2, t = lane & 3;
  const __nv_bfloat16* e[NT];
#pragma unroll
  for (int j = 0; j < NT; ++j) {
    acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.f;
    const int v = v0 + j * 8 + g;
    e[j] = v < V ? emb + size_t(v) * H : nullptr;
  }
#pragma unroll 2
  for (int k = 0; k < HC; k += 16) {
    const int h = h0 + k + 2 * t;
    uint32_t a[4];
    a[0] = xa ? load_pair(xa, h, H) : 0u;
    a[1] = xb ? load_pair(xb, h, H) : 0u;
    a[2] = xa ? load_pair(xa, h + 8, H) : 0u;
    a[3] = xb ? load_pair(xb, h + 8, H) : 0u;
#pragma unroll
    for (int j = 0; j < NT; ++j) {
      const uint32_t b0 = e[j] ? load_pair(e[j], h, H) : 0u;
      const uint32_t b1 = e[j] ? load_pair(e[j], h + 8, H) : 0u;
      mma16816(acc[j], a, b0, b1);
    }
  }
}

// ---- 1. the streaming kernel ----------------------------------------------------------------

template <int HC>
struct SplitSmem {
  static constexpr int kXStride = HC + kPad;  // bf16
  static constexpr int kPStride = kVTile + kPad;
  static constexpr int kPartStride = kVTile + 4;  // floats
  static constexpr size_t kX = size_t(kPosTile) * kXStride * 2;
  static constexpr size_t kE = size_t(kVTile) * kXStride * 2;  // one stage
  static constexpr size_t kPart = size_t(kPosTile) * kPartStride * 4;
  static constexpr size_t kPub = size_t(kWarps) * kPStride * 2;
  static constexpr size_t kPFull = size_t(kPosTile) * kPStride * 2;
  static constexpr size_t x_off = 0;
  static constexpr size_t e_off = x_off + kX;
  static constexpr size_t part_off = e_off + 2 * kE;
  static constexpr size_t pub_off = part_off + kPart;
  static constexpr size_t pubalpha_off = pub_off + kPub;
  static constexpr size_t pfull_off = pubalpha_off + 64;
  static constexpr size_t alpha_off = pfull_off + kPFull;
  static constexpr size_t bytes = alpha_off + kPosTile * 4;
};

template <int HC>
__global__ void __launch_bounds__(kThreads, kSplitCtasPerSm) lm_head_split_kernel(const LmHeadSampleParams p) {
  using L = SplitSmem<HC>;
  constexpr int NT = HC / 16;  // n8 tiles of a warp's half of the slice in the soft GEMM
  extern __shared__ __align__(16) unsigned char smem[];
  __nv_bfloat16* Xs = reinterpret_cast<__nv_bfloat16*>(smem + L::x_off);
  __nv_bfloat16* Es = reinterpret_cast<__nv_bfloat16*>(smem + L::e_off);
  float* part = reinterpret_cast<float*>(smem + L::part_off);
  __nv_bfloat16* pub = reinterpret_cast<__nv_bfloat16*>(smem + L::pub_off);
  float* pub_alpha = reinterpret_cast<float*>(smem + L::pubalpha_off);
  __nv_bfloat16* Pf = reinterpret_cast<__nv_bfloat16*>(smem + L::pfull_off);
  float* alpha = reinterpret_cast<float*>(smem + L::alpha_off);

  cg::cluster_group cluster = cg::this_cluster();
  const int r = static_cast<int>(cluster.block_rank());
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int g = lane >> 2, t4 = lane & 3;
  const int P = p.P, H = p.H, V = p.V;
  const int pos0 = blockIdx.y * kPosTile;
  const int split = blockIdx.z, S = gridDim.z;
  const int tiles_all = (V + kVTile - 1) / kVTile;
  const int tile_begin = static_cast<int>(static_cast<long long>(split) * tiles_all / S);
  const int tile_end = static_cast<int>(static_cast<long long>(split + 1) * tiles_all / S);
  const int h0 = r * HC;
  const Layout lay = layout(P, H, V);
  unsigned char* ws = static_cast<unsigned char*>(p.workspace);

  // X slice, then the first E tile.
  for (int c = tid; c < kPosTile * (HC / 8); c += kThreads) {
    const int row = c / (HC / 8), col = (c % (HC / 8)) * 8;
    const bool ok = pos0 + row < P && h0 + col < H;
    cp_async16(Xs + row * L::kXStride + col, ok ? p.x + size_t(pos0 + row) * H + h0 + col : p.x, ok);
  }
  auto load_e = [&](int tile, int stage) {
    __nv_bfloat16* dst = Es + size_t(stage) * kVTile * L::kXStride;
    const int v0 = tile * kVTile;
    for (int c = tid; c < kVTile * (HC / 8); c += kThreads) {
      const int row = c / (HC / 8), col = (c % (HC / 8)) * 8;
      const bool ok = v0 + row < V && h0 + col < H;
      cp_async16(dst + row * L::kXStride + col, ok ? p.emb + size_t(v0 + row) * H + h0 + col : p.emb, ok);
    }
  };
  if (tile_begin < tile_end) load_e(tile_begin, 0);
  cp_async_commit();

  // Statistics of position (pos0 + 8 r + warp), kept by lane (lanes share m_run).
  const int my_pos = pos0 + kWarps * r + warp;
  const bool my_valid = my_pos < P;
  const float temperature = my_valid ? p.temperature[my_pos / p.n] : 1.f;
  float m_run = -INFINITY;
  double s_l = 0, t_l = 0;
  float best = -INFINITY;
  int best_i = INT_MAX;
  float4* chunk_ws = reinterpret_cast<float4*>(ws + lay.chunk_off) + size_t(my_pos) * lay.nch;

  float acc[NT][4];
#pragma unroll
  for (int j = 0; j < NT; ++j) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.f;
  const int wm = warp >> 1, wn = warp & 1;  // logits: 16 rows x 32 cols; soft: 16 rows x HC/2 cols

  for (int tile = tile_begin; tile < tile_end; ++tile) {
    const int stage = (tile - tile_begin) & 1;
    if (tile + 1 < tile_end) load_e(tile + 1, stage ^ 1);
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();
    const __nv_bfloat16* E = Es + size_t(stage) * kVTile * L::kXStride;

    // Partial logits over this CTA's H slice.
    {
      float lg[4][4];
#pragma unroll
      for (int j = 0; j < 4; ++j) lg[j][0] = lg[j][1] = lg[j][2] = lg[j][3] = 0.f;
#pragma unroll 2
      for (int k = 0; k < HC; k += 16) {
        uint32_t a[4];
        ldsm_x4(a, Xs + (wm * 16 + (lane & 15)) * L::kXStride + k + (lane >> 4) * 8);
#pragma unroll
        for (int j = 0; j < 4; j += 2) {
          uint32_t b[4];
          const int n = wn * 32 + j * 8 + (lane & 7) + (lane >> 4) * 8;
          ldsm_x4(b, E + n * L::kXStride + k + ((lane >> 3) & 1) * 8);
          mma16816(lg[j], a, b[0], b[1]);
          mma16816(lg[j + 1], a, b[2], b[3]);
        }
      }
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int col = wn * 32 + j * 8 + 2 * t4;
        *reinterpret_cast<float2*>(part + (wm * 16 + g) * L::kPartStride + col) = make_float2(lg[j][0], lg[j][1]);
        *reinterpret_cast<float2*>(part + (wm * 16 + g + 8) * L::kPartStride + col) =
            make_float2(lg[j][2], lg[j][3]);
      }
    }
    cluster.sync();

    // This CTA's 8 positions: rank-ordered sum of the partials, softcap, temperature, statistics.
    {
      const int row = kWarps * r + warp, col = 2 * lane;
      const int v = tile * kVTile + col;
      float2 raw = *cluster.map_shared_rank(reinterpret_cast<float2*>(part + row * L::kPartStride + col), 0);
#pragma unroll
      for (int q = 1; q < kCluster; ++q) {
        const float2 o = *cluster.map_shared_rank(reinterpret_cast<float2*>(part + row * L::kPartStride + col), q);
        raw.x = __fadd_rn(raw.x, o.x);
        raw.y = __fadd_rn(raw.y, o.y);
      }
      float x0 = finish_logit(raw.x, p.softcap, temperature);
      float x1 = finish_logit(raw.y, p.softcap, temperature);
      if (!my_valid || v >= V) x0 = -INFINITY;
      if (!my_valid || v + 1 >= V) x1 = -INFINITY;
      const float mt = warp_max(fmaxf(x0, x1));
      const float m_new = fmaxf(m_run, mt);
      float p0 = 0.f, p1 = 0.f, a_f = 1.f;
      if (m_new != -INFINITY) {
        if (m_run == -INFINITY) {
          s_l = 0, t_l = 0, a_f = 0.f;
        } else {
          const double ad = exp(static_cast<double>(m_run) - static_cast<double>(m_new));
          t_l = ad * (t_l + (static_cast<double>(m_run) - m_new) * s_l);
          s_l = ad * s_l;
          a_f = static_cast<float>(ad);
        }
        p0 = expf(x0 - m_new);
        p1 = expf(x1 - m_new);
        s_l += static_cast<double>(p0) + static_cast<double>(p1);
        if (p0 > 0.f) t_l += static_cast<double>(p0) * (static_cast<double>(x0) - m_new);
        if (p1 > 0.f) t_l += static_cast<double>(p1) * (static_cast<double>(x1) - m_new);
        m_run = m_new;
      }
      if (x0 > best) best = x0, best_i = v;  // a lane meets its entries in increasing order
      if (x1 > best) best = x1, best_i = v + 1;
      // The chunk's own statistics, for the token step's estimates.
      double cs = 0, ca = 0;
      if (mt != -INFINITY) {
        const float e0 = expf(x0 - mt), e1 = expf(x1 - mt);
        cs = static_cast<double>(e0) + e1;
        if (e0 > 0.f) ca += static_cast<double>(e0) * (static_cast<double>(mt) - x0);
        if (e1 > 0.f) ca += static_cast<double>(e1) * (static_cast<double>(mt) - x1);
      }
      cs = warp_sum(cs);
      ca = warp_sum(ca);
      if (lane == 0 && my_valid) chunk_ws[tile] = make_float4(mt, static_cast<float>(cs), static_cast<float>(ca), 0.f);
      *reinterpret_cast<__nv_bfloat162*>(pub + warp * L::kPStride + col) = __floats2bfloat162_rn(p0, p1);
      if (lane == 0) pub_alpha[warp] = a_f;
    }
    cluster.sync();

    // Gather the 64 x 64 p tile and the rescale factors from the 8 ranks.
    {
      const int q = tid >> 5, i = tid & 31;
      const __nv_bfloat16* src = cluster.map_shared_rank(pub, q);
#pragma unroll
      for (int c = 0; c < 2; ++c) {
        const int idx = i * 2 + c, row = idx >> 3, seg = (idx & 7) * 8;
        *reinterpret_cast<uint4*>(Pf + (q * kWarps + row) * L::kPStride + seg) =
            *reinterpret_cast<const uint4*>(src + row * L::kPStride + seg);
      }
      if (tid < kPosTile) alpha[tid] = *cluster.map_shared_rank(pub_alpha + (tid & 7), tid >> 3);
    }
    __syncthreads();

    // acc[64, slice] = acc * alpha + p E[tile, slice].
    {
      const float alo = alpha[wm * 16 + g], ahi = alpha[wm * 16 + g + 8];
#pragma unroll
      for (int j = 0; j < NT; ++j) acc[j][0] *= alo, acc[j][1] *= alo, acc[j][2] *= ahi, acc[j][3] *= ahi;
#pragma unroll
      for (int k = 0; k < kVTile; k += 16) {
        uint32_t a[4];
        ldsm_x4(a, Pf + (wm * 16 + (lane & 15)) * L::kPStride + k + (lane >> 4) * 8);
        const int ncol0 = wn * (HC / 2);
#pragma unroll
        for (int j = 0; j + 1 < NT; j += 2) {
          uint32_t b[4];
          ldsm_x4_t(b, E + (k + (lane & 7) + ((lane >> 3) & 1) * 8) * L::kXStride + ncol0 + j * 8 + (lane >> 4) * 8);
          mma16816(acc[j], a, b[0], b[1]);
          mma16816(acc[j + 1], a, b[2], b[3]);
        }
        if constexpr (NT % 2 == 1) {
          uint32_t b[2];
          ldsm_x2_t(b, E + (k + (lane & 15)) * L::kXStride + ncol0 + (NT - 1) * 8);
          mma16816(acc[NT - 1], a, b[0], b[1]);
        }
      }
    }
    __syncthreads();  // E stage and Pf are rewritten next tile
  }
  cp_async_wait<0>();
  cluster.sync();  // no CTA leaves while another may still read its shared memory

  // Write this split's statistics and soft partials.
  if (my_valid) {
    double s = warp_sum(s_l), t = warp_sum(t_l);
    warp_argmax(best, best_i);
    if (lane == 0) {
      SplitStat st;
      st.m = m_run, st.argmax = best_i, st.s = s, st.t = t, st.pad = 0;
      reinterpret_cast<SplitStat*>(ws + lay.split_off)[size_t(split) * P + my_pos] = st;
    }
  }
  float* soft_part = reinterpret_cast<float*>(ws + lay.soft_off) + size_t(split) * P * H;
#pragma unroll
  for (int j = 0; j < NT; ++j) {
    const int h = h0 + wn * (HC / 2) + j * 8 + 2 * t4;
    const int ra = pos0 + wm * 16 + g, rb = ra + 8;
    if (h < H) {
      if (ra < P) *reinterpret_cast<float2*>(soft_part + size_t(ra) * H + h) = make_float2(acc[j][0], acc[j][1]);
      if (rb < P) *reinterpret_cast<float2*>(soft_part + size_t(rb) * H + h) = make_float2(acc[j][2], acc[j][3]);
    }
  }
}

// ---- 2./4. merge and draw -------------------------------------------------------------------

struct Merged {
  float M, inv;
  int32_t argmax;
  double sum, ent;
};

__device__ __forceinline__ Merged merge_splits(const SplitStat* st, int S, int P, int pos) {
  Merged r;
  float M = -INFINITY;
  int am = INT_MAX;
  for (int s = 0; s < S; ++s) M = fmaxf(M, st[size_t(s) * P + pos].m);
  // First argmax: splits are in increasing vocabulary order, so the first split reaching M wins.
  for (int s = 0; s < S; ++s) {
    const SplitStat& a = st[size_t(s) * P + pos];
    if (a.m == M && a.argmax != INT_MAX) {
      am = a.argmax;
      break;
    }
  }
  double sum = 0, mom = 0;
  if (M != -INFINITY) {
    for (int s = 0; s < S; ++s) {
      const SplitStat& a = st[size_t(s) * P + pos];
      if (a.m == -INFINITY) continue;
      const double d = static_cast<double>(a.m) - M, w = exp(d);
      sum += a.s * w;
      mom += w * (a.t + d * a.s);
    }
  }
  r.M = M;
  r.argmax = am == INT_MAX ? 0 : am;
  r.sum = sum;
  const float sumf = static_cast<float>(sum);
  r.inv = 1.0f / sumf;
  // The CPU op's entropy, sum_v p_v (lse - x_v) with p_v = e_v * inv and lse = M + logf(sum) rounded to
  // float: that rounding (up to half an ulp of |M|, ~4e-6 at |M| ~ 190) shifts every term alike, so it is
  // kept, not computed away in double: inv ((lse - M) sum - sum_v e_v (x_v - M)), mom being the last sum.
  const float lse = __fadd_rn(M, logf(sumf));
  r.ent = sum > 0 ? static_cast<double>(r.inv) * ((static_cast<double>(lse) - M) * sum - mom) : 0.0;
  return r;
}

// Exact q_v of chunk c for one position, via the same arithmetic as the first kernel; warp w
// computes H slice w. Writes q [kVTile] into shared memory.
template <int HC>
__device__ __forceinline__ void chunk_q(const LmHeadSampleParams& p, int pos, int c, float M, float inv, float* part /*[8][64]*/,
                        uint64_t* q) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t4 = lane & 3;
  float lg[8][4];
  const int v0 = c * kVTile;
  partial_logits_global<HC, 8>(lg, g == 0 ? p.x + size_t(pos) * p.H : nullptr, nullptr, p.emb, v0, p.V, warp * HC,
                               p.H, lane);
  if (g == 0) {
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      part[warp * kVTile + j * 8 + 2 * t4] = lg[j][0];
      part[warp * kVTile + j * 8 + 2 * t4 + 1] = lg[j][1];
    }
  }
  __syncthreads();
  if (threadIdx.x < kVTile) {
    const int col = threadIdx.x, v = v0 + col;
    float raw = part[col];
    for (int w = 1; w < kCluster; ++w) raw = __fadd_rn(raw, part[w * kVTile + col]);
    const float temperature = p.temperature[pos / p.n];
    const float x = finish_logit(raw, p.softcap, temperature);
    q[col] = v < p.V ? quantise(prob_of(x, M, inv)) : 0;
  }
  __syncthreads();
}

template <int HC, bool kExact>
__global__ void __launch_bounds__(kThreads) lm_head_resolve_kernel(const LmHeadSampleParams p) {
  __shared__ float s_part[kCluster * kVTile];
  __shared__ uint64_t s_q[kVTile];
  __shared__ double s_d[2][kWarps];
  __shared__ uint64_t s_u[kWarps];
  __shared__ int s_sel;
  __shared__ double s_before, s_rpre;
  __shared__ uint64_t s_rem;
  __shared__ Merged s_m;
  __shared__ float s_w[64];

  const int pos = blockIdx.x, tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int P = p.P, H = p.H, V = p.V;
  const Layout lay = layout(P, H, V);
  unsigned char* ws = static_cast<unsigned char*>(p.workspace);
  PosStat* ps = reinterpret_cast<PosStat*>(ws + lay.pos_off) + pos;
  if (kExact && ps->flag == 0) return;
  const SplitStat* st = reinterpret_cast<const SplitStat*>(ws + lay.split_off);
  if (tid == 0) {
    s_m = merge_splits(st, lay.S, P, pos);
    s_sel = -1;
  }
  __syncthreads();
  const Merged m = s_m;
  const double u = p.uniform[pos];

  if (!kExact) {
    if (tid == 0) {
      p.argmax[pos] = m.argmax;
      p.entropy[pos] = static_cast<float>(m.ent);
      ps->m = m.M, ps->inv = m.inv, ps->flag = 0, ps->pad = 0;
    }
    const int si = p.soft_index ? p.soft_index[pos] : -1;
    if (si >= 0 && p.soft != nullptr) {
      for (int s = tid; s < lay.S; s += kThreads) {
        const float ms = st[size_t(s) * P + pos].m;
        s_w[s] = ms == -INFINITY ? 0.f : static_cast<float>(exp(static_cast<double>(ms) - m.M));
      }
      __syncthreads();
      const float scale = static_cast<float>(static_cast<double>(p.soft_scale) * __drcp_rn(m.sum));
      const float* sp = reinterpret_cast<const float*>(ws + lay.soft_off);
      for (int h = tid; h < H; h += kThreads) {
        float a = 0.f;
        for (int s = 0; s < lay.S; ++s) a = __fadd_rn(a, __fmul_rn(sp[(size_t(s) * P + pos) * H + h], s_w[s]));
        p.soft[size_t(si) * H + h] = __float2bfloat16_rn(a * scale);
      }
    }
  }

  // Chunk masses: a contiguous run of chunks per thread.
  const int nch = lay.nch;
  const int per = (nch + kThreads - 1) / kThreads;
  const int first = min(nch, tid * per), last = min(nch, first + per);
  const float4* cst = reinterpret_cast<const float4*>(ws + lay.chunk_off) + size_t(pos) * nch;
  const uint64_t* cq = reinterpret_cast<const uint64_t*>(cst);  // exact masses: one uint64 per float4 slot
  int token = V - 1;
  bool certain = true;

  if (kExact) {
    uint64_t mine = 0;
    for (int c = first; c < last; ++c) mine += cq[2 * c];
    const uint64_t incl = warp_inclusive_scan<uint64_t>(mine, lane);
    if (lane == 31) s_u[warp] = incl;
    __syncthreads();
    uint64_t before = 0, total = 0;
    for (int w = 0; w < kWarps; ++w) {
      if (w < warp) before += s_u[w];
      total += s_u[w];
    }
    before += incl - mine;
    if (total > 0) {
      uint64_t target = u > 0 ? __double2ull_rz(u * static_cast<double>(total)) : 0;
      if (target >= total) target = total - 1;
      for (int c = first; c < last; ++c) {
        const uint64_t next = before + cq[2 * c];
        if (target >= before && target < next) s_sel = c, s_rem = target - before;
        before = next;
      }
    }
    __syncthreads();
    const int c = s_sel;
    if (c >= 0) {
      chunk_q<HC>(p, pos, c, m.M, m.inv, s_part, s_q);
      if (warp == 0) {
        const uint64_t q0 = s_q[2 * lane], q1 = s_q[2 * lane + 1];
        const uint64_t inc = warp_inclusive_scan<uint64_t>(q0 + q1, lane);
        const uint64_t rem = s_rem;
        const unsigned hit = __ballot_sync(kFull, inc > rem);  // the first lane whose pair passes rem
        const int l = __ffs(hit) - 1;
        const uint64_t inc_l = __shfl_sync(kFull, inc, l), q1_l = __shfl_sync(kFull, q1, l);
        token = c * kVTile + 2 * l + (inc_l - q1_l > rem ? 0 : 1);
      }
    }
    if (tid == 0) {
      p.token[pos] = token;
      if (p.fallback) p.fallback[pos] = 1;
    }
    return;
  }

  // Estimates Q_c = 2^62 inv s_c exp(m_c - M) and error radii R_c (rigorous, with a factor 2 to spare):
  // per term, expf is within 2 ulp on both sides (4 * 2^-23), the float subtractions add
  // |x - M| 2^-24 <= (|x - m_c| + |m_c - M|) 2^-24, the float sums/products stored and the multiply
  // by inv a few 2^-24, trunc < 1 per term.
  const double K = 0x1p62 * static_cast<double>(m.inv);
  double mq = 0, mr = 0;
  for (int c = first; c < last; ++c) {
    const float4 f = cst[c];
    if (f.x == -INFINITY || m.M == -INFINITY) continue;
    const double d = static_cast<double>(m.M) - f.x;
    const double w = K * exp(-d);
    mq += w * f.y;
    mr += 2.0 * w * (f.y * (8 * 0x1p-23 + d * 0x1p-24) + 2.0 * f.z * 0x1p-24) + 2.0 * kVTile;
  }
  double iq = warp_inclusive_scan<double>(mq, lane), ir = warp_inclusive_scan<double>(mr, lane);
  if (lane == 31) s_d[0][warp] = iq, s_d[1][warp] = ir;
  __syncthreads();
  double bq = 0, br = 0, tq = 0, tr = 0;
  for (int w = 0; w < kWarps; ++w) {
    if (w < warp) bq += s_d[0][w], br += s_d[1][w];
    tq += s_d[0][w], tr += s_d[1][w];
  }
  bq += iq - mq, br += ir - mr;
  const double target = u * tq;
  // The crossing chunk: the last chunk with mass whose estimated cum-before is <= target (cum-before
  // is monotone). Each thread proposes its own last one; the block takes the largest index.
  int cand = -1;
  double cb = 0, crp = 0;
  {
    double before = bq, rb = br;
    for (int c = first; c < last; ++c) {
      const float4 f = cst[c];
      double qc = 0, rc = 0;
      if (f.x != -INFINITY && m.M != -INFINITY) {
        const double d = static_cast<double>(m.M) - f.x;
        const double w = K * exp(-d);
        qc = w * f.y;
        rc = 2.0 * w * (f.y * (8 * 0x1p-23 + d * 0x1p-24) + 2.0 * f.z * 0x1p-24) + 2.0 * kVTile;
      }
      if (qc > 0 && before <= target) cand = c, cb = before, crp = rb;
      before += qc, rb += rc;
    }
  }
  int best = cand;
  for (int o = 16; o > 0; o >>= 1) best = max(best, __shfl_xor_sync(kFull, best, o));
  if (lane == 0) reinterpret_cast<int*>(s_u)[warp] = best;
  __syncthreads();
  int sel = -1;
  for (int w = 0; w < kWarps; ++w) sel = max(sel, reinterpret_cast<int*>(s_u)[w]);
  if (cand == sel && sel >= 0) s_before = cb, s_rpre = crp;
  __syncthreads();

  if (sel >= 0 && tq > 0) {
    chunk_q<HC>(p, pos, sel, m.M, m.inv, s_part, s_q);
    if (warp == 0) {
      // The offset of the target inside the chunk is rem = target - before, known to within U.
      const double rem = target - s_before;
      const double U = s_rpre + u * tr + 2.0 + (s_before + target) * 0x1p-50;
      const uint64_t q0 = s_q[2 * lane], q1 = s_q[2 * lane + 1];
      const uint64_t inc = warp_inclusive_scan<uint64_t>(q0 + q1, lane);
      const double lo0 = static_cast<double>(inc - q0 - q1), hi0 = static_cast<double>(inc - q1);
      const double lo1 = hi0, hi1 = static_cast<double>(inc);
      const bool ok0 = q0 > 0 && lo0 <= rem - U && rem + U < hi0;
      const bool ok1 = q1 > 0 && lo1 <= rem - U && rem + U < hi1;
      const unsigned hit = __ballot_sync(kFull, ok0 || ok1);
      if (hit) {
        const int l = __ffs(hit) - 1;
        const bool first_of_pair = __shfl_sync(kFull, ok0, l);
        token = sel * kVTile + 2 * l + (first_of_pair ? 0 : 1);
      } else {
        certain = false;
      }
    }
  } else if (tq > 0) {
    certain = false;
  }
  if (tid == 0) {
    if (certain) p.token[pos] = token;
    ps->flag = certain ? 0 : 1;
    if (p.fallback) p.fallback[pos] = certain ? 0 : 1;
  }
}

// ---- 3. exact chunk masses of the flagged positions -----------------------------------------

size_t exact_mass_smem(int P) { return sizeof(int) * static_cast<size_t>(P); }  // the flagged positions

template <int HC>
__global__ void __launch_bounds__(kThreads) lm_head_exact_mass_kernel(const LmHeadSampleParams p) {
  extern __shared__ int s_list[];  // [P]
  __shared__ float s_part[kCluster][16][kVTile + 1];
  __shared__ int s_count;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, g = lane >> 2;
  const int P = p.P, H = p.H, V = p.V;
  const Layout lay = layout(P, H, V);
  unsigned char* ws = static_cast<unsigned char*>(p.workspace);
  const PosStat* ps = reinterpret_cast<const PosStat*>(ws + lay.pos_off);
  if (warp == 0) {
    int count = 0;
    for (int b = 0; b < P; b += 32) {
      const bool f = b + lane < P && ps[b + lane].flag != 0;
      const unsigned m = __ballot_sync(kFull, f);
      if (f) s_list[count + __popc(m & ((1u << lane) - 1))] = b + lane;
      count += __popc(m);
    }
    if (lane == 0) s_count = count;
  }
  __syncthreads();
  const int count = s_count;
  if (count == 0) return;
  uint64_t* cq = reinterpret_cast<uint64_t*>(ws + lay.chunk_off);

  for (int b = 0; b < count; b += 16) {
    const __nv_bfloat16* xa = b + g < count ? p.x + size_t(s_list[b + g]) * H : nullptr;
    const __nv_bfloat16* xb = b + g + 8 < count ? p.x + size_t(s_list[b + g + 8]) * H : nullptr;
    for (int c = blockIdx.x; c < lay.nch; c += gridDim.x) {
      const int v0 = c * kVTile;
      float lg[8][4];
      partial_logits_global<HC, 8>(lg, xa, xb, p.emb, v0, V, warp * HC, H, lane);
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        const int col = j * 8 + 2 * (lane & 3);
        s_part[warp][g][col] = lg[j][0], s_part[warp][g][col + 1] = lg[j][1];
        s_part[warp][g + 8][col] = lg[j][2], s_part[warp][g + 8][col + 1] = lg[j][3];
      }
      __syncthreads();
      // 16 threads per row, 4 columns each.
      const int row = tid >> 4, sub = tid & 15;
      uint64_t qs = 0;
      const bool rv = b + row < count;
      const int pos = rv ? s_list[b + row] : 0;
      if (rv) {
        const float temperature = p.temperature[pos / p.n];
        const float M = ps[pos].m, inv = ps[pos].inv;
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const int col = sub * 4 + i;
          if (v0 + col >= V) continue;
          float raw = s_part[0][row][col];
          for (int w = 1; w < kCluster; ++w) raw = __fadd_rn(raw, s_part[w][row][col]);
          qs += quantise(prob_of(finish_logit(raw, p.softcap, temperature), M, inv));
        }
      }
      for (int o = 8; o > 0; o >>= 1) qs += __shfl_xor_sync(kFull, qs, o);
      if (rv && sub == 0) cq[2 * (size_t(pos) * lay.nch + c)] = qs;
      __syncthreads();
    }
  }
}

template <int HC>
cudaError_t launch(const LmHeadSampleParams& p, cudaStream_t stream) {
  const Layout lay = layout(p.P, p.H, p.V);
  constexpr size_t smem = SplitSmem<HC>::bytes;
  cudaError_t e = cudaFuncSetAttribute(lm_head_split_kernel<HC>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                       static_cast<int>(smem));
  if (e != cudaSuccess) return e;
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(kCluster, lay.ptiles, lay.S);
  cfg.blockDim = dim3(kThreads);
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeClusterDimension;
  attr[0].val.clusterDim.x = kCluster;
  attr[0].val.clusterDim.y = 1;
  attr[0].val.clusterDim.z = 1;
  cfg.attrs = attr;
  cfg.numAttrs = 1;
  e = cudaLaunchKernelEx(&cfg, lm_head_split_kernel<HC>, p);
  if (e != cudaSuccess) return e;
  lm_head_resolve_kernel<HC, false><<<p.P, kThreads, 0, stream>>>(p);
  if ((e = cudaGetLastError()) != cudaSuccess) return e;
  const int grid = lay.nch < 264 ? lay.nch : 264;
  lm_head_exact_mass_kernel<HC><<<grid, kThreads, exact_mass_smem(p.P), stream>>>(p);
  if ((e = cudaGetLastError()) != cudaSuccess) return e;
  lm_head_resolve_kernel<HC, true><<<p.P, kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace

void lm_head_kernel_plans(KernelPlans& out) {
  auto split = [&out](auto hc) {
    constexpr int HC = decltype(hc)::value;
    out.push_back({"lm_head_split_kernel<" + std::to_string(HC) + ">", kThreads,
                   static_cast<long long>(SplitSmem<HC>::bytes), kSplitCtasPerSm,
                   "kSplitCtasPerSm (__launch_bounds__): the E tiles' shared memory; 8-CTA clusters"});
  };
  split(std::integral_constant<int, 16>{});
  split(std::integral_constant<int, 64>{});
  split(std::integral_constant<int, 352>{});  // H = 2816
  out.push_back({"lm_head_resolve_kernel<", kThreads, 0, 1, "one CTA per position, nothing shared between CTAs"});
  out.push_back({"lm_head_exact_mass_kernel<", kThreads, static_cast<long long>(exact_mass_smem(kMaxPositions)), 1,
                 "grid-stride over chunks, nothing shared between CTAs; shared list at the largest P"});
}

int lm_head_sample_splits(int P, int V) { return splits_for(P, V); }

size_t lm_head_sample_workspace_bytes(int P, int H, int V) { return layout(P, H, V).total; }

cudaError_t lm_head_sample_fused(const LmHeadSampleParams& p, cudaStream_t stream) {
  if (p.P < 0) return cudaErrorInvalidValue;
  if (p.P == 0) return cudaSuccess;
  if (p.H < 8 || p.H % 8 != 0 || p.H > kLmHeadMaxHidden || p.V < 1 || p.n < 1 || p.P % p.n != 0)
    return cudaErrorInvalidValue;
  if (p.P > kMaxPositions) return cudaErrorInvalidValue;
  if (!p.x || !p.emb || !p.temperature || !p.uniform || !p.token || !p.argmax || !p.entropy || !p.workspace)
    return cudaErrorInvalidValue;
  if (p.workspace_bytes < lm_head_sample_workspace_bytes(p.P, p.H, p.V)) return cudaErrorInvalidValue;
  // H slice width per cluster rank: the smallest instantiated multiple of 16 with 8 * HC >= H.
  if (p.H <= 8 * 16) return launch<16>(p, stream);
  if (p.H <= 8 * 64) return launch<64>(p, stream);
  return launch<352>(p, stream);
}

}  // namespace dgemma::kernels
