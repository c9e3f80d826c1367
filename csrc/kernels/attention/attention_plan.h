// The index math of the attention kernels, shared by the device code and the host: which key tiles a
// CTA reads, where each tile row comes from (a cache slot through the block table, or a new token),
// how a CTA's tiles are split over split-KV parts, and how many parts to use. Plain C++ with no CUDA
// dependency, so that the host can enumerate exactly what the kernels will read
// (cuda_ops.attention_plan, tests/test_attention_plan.py) without a GPU.
//
// Key tiles. A row's keys are its cached positions [start, len) and its new tokens at positions
// len + u, u in [0, count). They are cut into tiles of BN = 2^lg_bn keys that are pure (one source
// each) and aligned:
//   cached tile c: the block-table-relative positions [c * BN, (c + 1) * BN) (relative to
//                  cache_first_pos, which is block-aligned), i.e. positions first + c * BN + i;
//   new tile n:    new tokens [n * BN, (n + 1) * BN), i.e. positions len + n * BN + i.
// Rows of a tile outside the row's keys (before cache_start, past cache_len, past count) are
// zero-filled and masked. Because the block size is a power of two, tile row i's slot is
// (table[rel >> lg_bs] << lg_bs) | (rel & (block_size - 1)): one table load, a shift and a mask per
// row and per tile, no division (the old kernel divided by block_size for every 16-byte chunk).
//
// Causal / window pruning: a CTA's query tokens [t_first, t_last] see key positions
// (len + t_first - window, len + t_last]; tiles wholly outside are not visited.
//
// Split-KV: a CTA's tile list (cached tiles, then new tiles: n_tiles in all) is cut into `splits`
// contiguous parts, part s = [s * n_tiles / splits, (s + 1) * n_tiles / splits): fixed boundaries
// that depend only on the row's sizes and the split count, never on timing; the combine reads the
// parts in the order s = 0, 1, ...
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define DG_ATTN_HD __host__ __device__ __forceinline__
#else
#define DG_ATTN_HD inline
#endif

namespace dgemma::kernels::attention_plan {

constexpr int kMaxSplits = 16;

DG_ATTN_HD constexpr int imin(int a, int b) { return a < b ? a : b; }
DG_ATTN_HD constexpr int imax(int a, int b) { return a > b ? a : b; }
DG_ATTN_HD constexpr bool is_pow2(int v) { return v > 0 && (v & (v - 1)) == 0; }
DG_ATTN_HD constexpr int log2_exact(int v) {  // v a power of two
  int lg = 0;
  while ((1 << lg) < v) ++lg;
  return lg;
}

// Tile shapes of the two kernels (their configs static_assert against these).
struct TileShape {
  int block_m;  // flattened query rows (token, head in the GQA group) per CTA
  int block_n;  // keys per tile
};
// sm90: wgmma, two warpgroups (head_dim 256: 64 rows each; head_dim 512: both on the same 64 rows,
// 256 output dims each).
constexpr TileShape sm90_tiles(int head_dim) { return head_dim == 512 ? TileShape{64, 64} : TileShape{128, 64}; }
// sm80: the mma.sync fallback (sm_100a / sm_120a, or a build without CUTLASS).
constexpr TileShape sm80_tiles(int head_dim) { return head_dim == 512 ? TileShape{32, 32} : TileShape{64, 32}; }

// One row's keys.
struct RowKeys {
  int first;     // cache_first_pos: block table entry 0 starts here
  int start;     // cache_start: first visible cached position
  int len;       // cache_len: cached positions end here; new token u sits at len + u
  int count;     // new tokens
  int n_cached;  // len - start, or 0
};
DG_ATTN_HD RowKeys row_keys(int first, int start, int len, int count) {
  RowKeys rk{first, start, len, count, len > start ? len - start : 0};
  return rk;
}

// A CTA's key tiles: cached tiles c in [c_begin, c_end), then new tiles n in [n_begin, n_end).
struct TileSpan {
  int c_begin, c_end, n_begin, n_end;
};
DG_ATTN_HD int span_tiles(const TileSpan& s) { return (s.c_end - s.c_begin) + (s.n_end - s.n_begin); }

// Tiles holding a key visible to some query token in [t_first, t_last].
DG_ATTN_HD TileSpan key_tiles(const RowKeys& rk, int lg_bn, bool causal, int window, int t_first, int t_last) {
  const int w = causal ? window : 0;
  TileSpan s{0, 0, 0, 0};
  if (rk.n_cached > 0) {
    int lo = rk.start;  // cached positions are all < len <= any query position: only the window trims them
    if (w > 0) lo = imax(lo, rk.len + t_first - w + 1);
    if (lo < rk.len) {
      s.c_begin = (lo - rk.first) >> lg_bn;
      s.c_end = ((rk.len - 1 - rk.first) >> lg_bn) + 1;
    }
  }
  int u_lo = 0, u_hi = rk.count;  // new tokens
  if (causal) {
    u_hi = imin(u_hi, t_last + 1);
    if (w > 0) u_lo = imax(0, t_first - w + 1);
  }
  if (u_lo < u_hi) {
    s.n_begin = u_lo >> lg_bn;
    s.n_end = ((u_hi - 1) >> lg_bn) + 1;
  }
  return s;
}

// Tile j of a span.
struct KeyTile {
  bool cached;
  int idx0;    // cached: table-relative position of tile row 0 (c * BN); new: new-token index of row 0
  int pos0;    // position of tile row 0
  int lo, hi;  // positions [lo, hi) of the tile hold keys of the row (rows outside: zero-filled)
};
DG_ATTN_HD KeyTile key_tile(const RowKeys& rk, const TileSpan& s, int j, int lg_bn) {
  const int bn = 1 << lg_bn, nc = s.c_end - s.c_begin;
  KeyTile t;
  t.cached = j < nc;
  if (t.cached) {
    t.idx0 = (s.c_begin + j) << lg_bn;
    t.pos0 = rk.first + t.idx0;
    t.lo = imax(rk.start, t.pos0);
    t.hi = imin(rk.len, t.pos0 + bn);
  } else {
    t.idx0 = (s.n_begin + j - nc) << lg_bn;
    t.pos0 = rk.len + t.idx0;
    t.lo = t.pos0;
    t.hi = rk.len + imin(rk.count, t.idx0 + bn);
  }
  return t;
}

// Cache slot of table-relative position rel, block_size = 2^lg_bs.
DG_ATTN_HD int64_t cache_slot(const int32_t* row_blocks, int rel, int lg_bs) {
#if defined(__CUDA_ARCH__)
  const int32_t blk = __ldg(row_blocks + (rel >> lg_bs));
#else
  const int32_t blk = row_blocks[rel >> lg_bs];
#endif
  return (static_cast<int64_t>(blk) << lg_bs) | (rel & ((1 << lg_bs) - 1));
}

// Key positions [lo, hi) of tile t visible to the query at position q_pos.
DG_ATTN_HD void visible_range(const KeyTile& t, bool causal, int window, int q_pos, int& lo, int& hi) {
  lo = t.lo;
  hi = t.hi;
  if (causal) {
    hi = imin(hi, q_pos + 1);
    if (window > 0) lo = imax(lo, q_pos - window + 1);
  }
}

// Split part s of n_tiles tiles: [j0, j1).
DG_ATTN_HD void split_range(int n_tiles, int split, int splits, int& j0, int& j1) {
  j0 = split * n_tiles / splits;  // split <= 16: no overflow below 2^27 tiles
  j1 = (split + 1) * n_tiles / splits;
}

// What CTA (m_tile, split) of a row computes. Flattened query row f = token * G + head_in_group.
struct CtaWork {
  int f0, f_end;         // rows [f0, min(f0 + block_m, f_end))
  int t_first, t_last;   // their tokens
  TileSpan span;         // every tile the rows can see
  int j0, j1;            // this split's part of span
};
// false: the row has no query rows for this m tile (the CTA exits).
DG_ATTN_HD bool cta_work(const RowKeys& rk, int group, int block_m, int lg_bn, bool causal, int window, int m_tile,
                         int split, int splits, CtaWork& w) {
  w.f0 = m_tile * block_m;
  w.f_end = rk.count * group;
  if (w.f0 >= w.f_end) return false;
  w.t_first = w.f0 / group;
  w.t_last = (imin(w.f_end, w.f0 + block_m) - 1) / group;
  w.span = key_tiles(rk, lg_bn, causal, window, w.t_first, w.t_last);
  split_range(span_tiles(w.span), split, splits, w.j0, w.j1);
  return true;
}

// Upper bound of a row's tile count, from host-side bounds of its cached keys and new tokens (a
// cached range may straddle one extra tile boundary).
inline int max_tiles(int max_cached, int max_count, int lg_bn) {
  const int bn = 1 << lg_bn;
  const int cached = max_cached > 0 ? (max_cached + bn - 1) / bn + 1 : 0;
  return cached + (max_count + bn - 1) / bn;
}

// Split-KV parts for a grid of base_ctas CTAs (rows x KV heads x m tiles) on `sms` SMs. A forced
// count (> 0) is used as is (up to kMaxSplits). Otherwise: no split when the grid already fills
// ~80% of the SMs; else the smallest count whose wave efficiency (CTAs / (waves * SMs)) is within
// 85% of the best, with at least 2 tiles per part.
inline int choose_splits(long long base_ctas, int tiles, int sms, int forced) {
  if (forced > 0) return imin(forced, kMaxSplits);
  if (base_ctas <= 0 || sms <= 0 || base_ctas * 5 >= static_cast<long long>(sms) * 4) return 1;
  const int limit = imin(kMaxSplits, imax(1, tiles / 2));
  auto eff = [&](int s) {
    const long long n = base_ctas * s, waves = (n + sms - 1) / sms;
    return static_cast<double>(n) / static_cast<double>(waves * sms);
  };
  double best = 0.0;
  for (int s = 1; s <= limit; ++s)
    if (eff(s) > best) best = eff(s);
  for (int s = 1; s <= limit; ++s)
    if (eff(s) >= 0.85 * best) return s;
  return 1;
}

// Split-KV workspace: fp32 partial outputs [splits][rows * max_count * heads][head_dim], then the
// per-query (max, sum) pairs [splits][rows * max_count * heads] of float2.
inline size_t workspace_o_floats(int splits, int rows, int max_count, int heads, int head_dim) {
  return static_cast<size_t>(splits) * rows * max_count * heads * head_dim;
}
inline size_t workspace_bytes(int splits, int rows, int max_count, int heads, int head_dim) {
  if (splits <= 1) return 0;
  return (workspace_o_floats(splits, rows, max_count, heads, head_dim) +
          static_cast<size_t>(splits) * rows * max_count * heads * 2) * sizeof(float);
}

}  // namespace dgemma::kernels::attention_plan
