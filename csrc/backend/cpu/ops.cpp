#include "backend/cpu/ops.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "model/safetensors.h"

// The BF16 dot-product GEMM (WeightMat::bf16_dot): compiled for AVX512-BF16 only, called only where
// the CPU has it (tools/check_wheel.py allows wide registers in functions named *_avx512bf16).
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#include <immintrin.h>
#define DG_BF16_DOT 1
#define DG_AVX512BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx2,fma")))
#endif

// The GEMM's 16-lane vectors live in registers of inlined code only; no ABI crosses them.
#pragma GCC diagnostic ignored "-Wpsabi"

namespace dgemma::cpu {
namespace {

// The GEMMs (see ops.h): our own packed micro-kernel. A BLAS library (OpenBLAS, tried first) can only
// be batch-invariant here when every call has one fixed shape, so it ran on 16-row tiles and repacked
// its B operand (our weights) on every call: most of the time of the LM head and the self-conditioning
// product over the tied embedding. Here a task converts and packs a block of the weight once, for all
// the rows it serves. Every output element is one FMA (or multiply-add) chain over k = 0 .. K-1 in
// order, in one vector lane, whatever the tile, block, row or thread: the accumulators go to memory
// between K chunks as float32 and come back unchanged. So the results depend on neither the thread
// count, nor the batch, nor a row's place in it, nor the blocking below.
typedef float v16f __attribute__((vector_size(64)));
typedef float v16f_u __attribute__((vector_size(64), aligned(4), may_alias));  // unaligned loads, stores

// Rows of C per micro-tile (MR) and 16-float vectors per row (NV): C[MR, 16 * NV] stays in registers
// (16 zmm on AVX-512, 12 ymm on AVX2), the packed weights stream through 16 * NV floats per k.
template <int MR, int NV>
[[gnu::always_inline]] inline void micro_tile(const float* __restrict x, size_t ldx, const float* __restrict b, int kc,
                                              float* __restrict c, size_t ldc) {
  v16f acc[MR][NV];
#pragma GCC unroll 16
  for (int m = 0; m < MR; ++m)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) acc[m][v] = *reinterpret_cast<const v16f_u*>(c + m * ldc + v * 16);
  for (int k = 0; k < kc; ++k) {
    v16f bv[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) bv[v] = *reinterpret_cast<const v16f_u*>(b + (static_cast<size_t>(k) * NV + v) * 16);
#pragma GCC unroll 16
    for (int m = 0; m < MR; ++m) {
      const float a = x[m * ldx + k];
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[m][v] += a * bv[v];
    }
  }
#pragma GCC unroll 16
  for (int m = 0; m < MR; ++m)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) *reinterpret_cast<v16f_u*>(c + m * ldc + v * 16) = acc[m][v];
}

struct GemmArgs {
  const float* x;
  const WeightMat* w;
  float* y;
  int M, N, K;
  bool nt;
  const uint32_t* xb = nullptr;  // bf16_dot: x rounded to bf16, as pairs (k, k + 1), [M, (K + 1) / 2]
};

struct GemmScratch {
  std::vector<float> pack, c, row, xpad;
  std::vector<uint32_t> pack2;  // bf16_dot: packed weight pairs
};

constexpr int kKChunk = 256;  // k per packed block: [kKChunk, cols] floats stay in L2

// Packs W's block (columns [n0, n0 + cols), k in [k0, k0 + kc)) as panels of NR columns, [kc][NR] each,
// the columns past `cols` zero.
void pack_block(const GemmArgs& g, int n0, int cols, int k0, int kc, int NR, GemmScratch& s) {
  const int panels = (cols + NR - 1) / NR;
  float* pk = s.pack.data();
  if (cols % NR) std::fill(pk + static_cast<size_t>(panels - 1) * kc * NR, pk + static_cast<size_t>(panels) * kc * NR, 0.0f);
  if (g.nt) {  // W [N, K]: a row of W is a column of the panel
    s.row.resize(kc);
    for (int j = 0; j < cols; ++j) {
      g.w->to_f32(static_cast<int64_t>(n0 + j) * g.K + k0, kc, s.row.data());
      float* dst = pk + static_cast<size_t>(j / NR) * kc * NR + j % NR;
      for (int k = 0; k < kc; ++k) dst[static_cast<size_t>(k) * NR] = s.row[k];
    }
  } else {  // W [K, N]: a row of W is a row of the panels
    s.row.resize(cols);
    for (int k = 0; k < kc; ++k) {
      g.w->to_f32(static_cast<int64_t>(k0 + k) * g.N + n0, cols, s.row.data());
      for (int p = 0; p < panels; ++p) {
        const int n = std::min(NR, cols - p * NR);
        std::memcpy(pk + (static_cast<size_t>(p) * kc + k) * NR, s.row.data() + p * NR, n * sizeof(float));
      }
    }
  }
}

// y[m0:m1, n0:n1] of the product.
template <int MR, int NV>
[[gnu::always_inline]] inline void gemm_task_impl(const GemmArgs& g, int m0, int m1, int n0, int n1, GemmScratch& s) {
  constexpr int NR = 16 * NV;
  const int cols = n1 - n0, rows = m1 - m0, panels = (cols + NR - 1) / NR;
  const int rows_pad = (rows + MR - 1) / MR * MR;
  const size_t ldc = static_cast<size_t>(panels) * NR;
  s.c.assign(static_cast<size_t>(rows_pad) * ldc, 0.0f);
  s.pack.resize(static_cast<size_t>(std::min(kKChunk, g.K)) * ldc);
  s.xpad.resize(static_cast<size_t>(MR) * kKChunk);
  for (int k0 = 0; k0 < g.K; k0 += kKChunk) {
    const int kc = std::min(kKChunk, g.K - k0);
    pack_block(g, n0, cols, k0, kc, NR, s);
    for (int mt = 0; mt < rows; mt += MR) {
      const float* xa = g.x + static_cast<size_t>(m0 + mt) * g.K + k0;
      size_t ldx = g.K;
      if (mt + MR > rows) {  // the last partial micro-tile: its rows padded with zeros
        std::fill(s.xpad.begin(), s.xpad.end(), 0.0f);
        for (int r = 0; r < rows - mt; ++r)
          std::memcpy(s.xpad.data() + static_cast<size_t>(r) * kc, xa + static_cast<size_t>(r) * g.K, kc * sizeof(float));
        xa = s.xpad.data(), ldx = kc;
      }
      for (int p = 0; p < panels; ++p)
        micro_tile<MR, NV>(xa, ldx, s.pack.data() + static_cast<size_t>(p) * kc * NR, kc,
                           s.c.data() + static_cast<size_t>(mt) * ldc + p * NR, ldc);
    }
  }
  for (int r = 0; r < rows; ++r)
    std::memcpy(g.y + static_cast<size_t>(m0 + r) * g.N + n0, s.c.data() + static_cast<size_t>(r) * ldc,
                cols * sizeof(float));
}

#ifdef DG_BF16_DOT
// GCC 12's AVX-512 shuffle intrinsics pass _mm512_undefined_epi32() as their unused merge source, which
// -Wmaybe-uninitialized reports once they are inlined (a known false positive).
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
// The bf16_dot micro-tile: C[MR, P * 16 * NV] += X[MR, 2 * kp] @ B, with X and B as bf16 pairs (k, k + 1)
// in 32-bit words; B is P consecutive packed panels, each [kp][16 * NV] pairs, `pstride` words apart.
// vdpbf16ps adds both products of a pair to a lane's accumulator, so each output is one chain over the
// pairs in order, whatever MR and P: a tile of few rows (MR < 8) takes more panels at once (P > 1) to
// keep enough independent chains in flight, and gives the same bits as an 8-row tile.
template <int MR, int NV, int P>
__attribute__((always_inline)) DG_AVX512BF16 inline void micro_tile_bf16(const uint32_t* __restrict x, size_t ldx,
                                                                       const uint32_t* __restrict b, size_t pstride,
                                                                       int kp, float* __restrict c, size_t ldc) {
  constexpr int NR = 16 * NV;
  __m512 acc[MR][P * NV];
#pragma GCC unroll 16
  for (int m = 0; m < MR; ++m)
#pragma GCC unroll 8
    for (int v = 0; v < P * NV; ++v) acc[m][v] = _mm512_loadu_ps(c + m * ldc + v * 16);
  for (int p = 0; p < kp; ++p) {
    __m512bh bv[P * NV];
#pragma GCC unroll 8
    for (int v = 0; v < P * NV; ++v)
      bv[v] = (__m512bh)_mm512_loadu_si512(b + (v / NV) * pstride + static_cast<size_t>(p) * NR + (v % NV) * 16);
#pragma GCC unroll 16
    for (int m = 0; m < MR; ++m) {
      const __m512bh a = (__m512bh)_mm512_set1_epi32(static_cast<int>(x[m * ldx + p]));
#pragma GCC unroll 8
      for (int v = 0; v < P * NV; ++v) acc[m][v] = _mm512_dpbf16_ps(acc[m][v], a, bv[v]);
    }
  }
#pragma GCC unroll 16
  for (int m = 0; m < MR; ++m)
#pragma GCC unroll 8
    for (int v = 0; v < P * NV; ++v) _mm512_storeu_ps(c + m * ldc + v * 16, acc[m][v]);
}

// C[MR, panels * 16 * NV] += X @ (all the block's panels): P panels at a time, then one by one.
template <int MR, int NV, int P>
__attribute__((always_inline)) DG_AVX512BF16 inline void row_tile_bf16(const uint32_t* x, size_t ldx, const uint32_t* pk,
                                                                     int panels, int kp, float* c, size_t ldc) {
  constexpr int NR = 16 * NV;
  const size_t pstride = static_cast<size_t>(kp) * NR;
  int p = 0;
  for (; p + P <= panels; p += P) micro_tile_bf16<MR, NV, P>(x, ldx, pk + p * pstride, pstride, kp, c + p * NR, ldc);
  for (; p < panels; ++p) micro_tile_bf16<MR, NV, 1>(x, ldx, pk + p * pstride, pstride, kp, c + p * NR, ldc);
}

// Transposes a 16 x 16 block of 32-bit words in registers: r[i][j] -> r[j][i].
__attribute__((always_inline)) DG_AVX512BF16 inline void transpose16_epi32(__m512i r[16]) {
  __m512i t[16], u[16];
#pragma GCC unroll 8
  for (int i = 0; i < 8; ++i) {  // 2 x 2 blocks of words
    t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
  }
  // u[4 g + c], 128-bit lane L: column 4 L + c of rows 4 g .. 4 g + 3
#pragma GCC unroll 4
  for (int g = 0; g < 4; ++g) {
    const __m512i *lo = t + 4 * g, *hi = t + 4 * g + 2;
    u[4 * g + 0] = _mm512_unpacklo_epi64(lo[0], hi[0]);
    u[4 * g + 1] = _mm512_unpackhi_epi64(lo[0], hi[0]);
    u[4 * g + 2] = _mm512_unpacklo_epi64(lo[1], hi[1]);
    u[4 * g + 3] = _mm512_unpackhi_epi64(lo[1], hi[1]);
  }
#pragma GCC unroll 4
  for (int c = 0; c < 4; ++c) {  // the 4 x 4 blocks of 128-bit lanes u[4 g + c], g = 0..3, transposed
    const __m512i a = _mm512_shuffle_i32x4(u[c], u[4 + c], 0x88), b = _mm512_shuffle_i32x4(u[c], u[4 + c], 0xdd);
    const __m512i d = _mm512_shuffle_i32x4(u[8 + c], u[12 + c], 0x88), e = _mm512_shuffle_i32x4(u[8 + c], u[12 + c], 0xdd);
    r[c] = _mm512_shuffle_i32x4(a, d, 0x88);
    r[4 + c] = _mm512_shuffle_i32x4(b, e, 0x88);
    r[8 + c] = _mm512_shuffle_i32x4(a, d, 0xdd);
    r[12 + c] = _mm512_shuffle_i32x4(b, e, 0xdd);
  }
}

// Packs the BF16 weight's block (columns [n0, n0 + cols), k in [k0, k0 + kc)) as panels of NR columns,
// [kp][NR] pairs each; the pair past an odd kc and the columns past `cols` zero. Only moves bits: the
// in-register transpose of W [N, K]'s 16 x 16 blocks of pairs (most of the work at few rows) packs the
// same words as the scalar loop.
DG_AVX512BF16 void pack_block_avx512bf16(const GemmArgs& g, const uint16_t* w, int n0, int cols, int k0, int kc, int NR,
                                   GemmScratch& s) {
  const int panels = (cols + NR - 1) / NR, kp = (kc + 1) / 2;
  uint32_t* pk = s.pack2.data();
  if (cols % NR) std::fill(pk + static_cast<size_t>(panels - 1) * kp * NR, pk + static_cast<size_t>(panels) * kp * NR, 0u);
  if (g.nt) {  // W [N, K]: a pair is two neighbours in a row of W
    const int cols16 = NR % 16 == 0 ? cols / 16 * 16 : 0, kp16 = kc / 2 / 16 * 16;
    for (int j0 = 0; j0 < cols16; j0 += 16) {
      uint32_t* dst = pk + static_cast<size_t>(j0 / NR) * kp * NR + j0 % NR;
      const uint16_t* wr = w + static_cast<size_t>(n0 + j0) * g.K + k0;
      for (int p0 = 0; p0 < kp16; p0 += 16) {
        __m512i r[16];
#pragma GCC unroll 16
        for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_si512(wr + static_cast<size_t>(i) * g.K + 2 * p0);
        transpose16_epi32(r);
#pragma GCC unroll 16
        for (int i = 0; i < 16; ++i) _mm512_storeu_si512(dst + static_cast<size_t>(p0 + i) * NR, r[i]);
      }
    }
    for (int j = 0; j < cols; ++j) {  // what the blocks left: the pairs past kp16, the columns past cols16
      const uint16_t* wr = w + static_cast<size_t>(n0 + j) * g.K + k0;
      uint32_t* dst = pk + static_cast<size_t>(j / NR) * kp * NR + j % NR;
      for (int p = j < cols16 ? kp16 : 0; p < kc / 2; ++p) {
        uint32_t v;
        std::memcpy(&v, wr + 2 * p, 4);
        dst[static_cast<size_t>(p) * NR] = v;
      }
      if (kc % 2) dst[static_cast<size_t>(kp - 1) * NR] = wr[kc - 1];
    }
  } else {  // W [K, N]: a pair is two rows of W
    for (int p = 0; p < kp; ++p) {
      const uint16_t* lo = w + static_cast<size_t>(k0 + 2 * p) * g.N + n0;
      const uint16_t* hi = 2 * p + 1 < kc ? lo + g.N : nullptr;
      for (int c = 0; c < cols; ++c)
        pk[(static_cast<size_t>(c / NR) * kp + p) * NR + c % NR] = lo[c] | (hi ? static_cast<uint32_t>(hi[c]) << 16 : 0u);
    }
  }
}

// y[m0:m1, n0:n1] of the bf16_dot product: gemm_task_impl with bf16 pairs, the last rows (fewer than MR)
// in a tile of their own height instead of a zero-padded one.
DG_AVX512BF16 void gemm_task_8x32_avx512bf16(const GemmArgs& g, int m0, int m1, int n0, int n1, GemmScratch& s) {
  constexpr int MR = 8, NV = 2, NR = 16 * NV;
  const uint16_t* w = g.w->bf16();
  const int cols = n1 - n0, rows = m1 - m0, panels = (cols + NR - 1) / NR;
  const size_t ldc = static_cast<size_t>(panels) * NR, ldx = static_cast<size_t>(g.K + 1) / 2;
  s.c.assign(static_cast<size_t>(rows) * ldc, 0.0f);
  s.pack2.resize(static_cast<size_t>(std::min(kKChunk, g.K) + 1) / 2 * ldc);
  for (int k0 = 0; k0 < g.K; k0 += kKChunk) {  // kKChunk is even: chunks start on a pair
    const int kc = std::min(kKChunk, g.K - k0), kp = (kc + 1) / 2;
    pack_block_avx512bf16(g, w, n0, cols, k0, kc, NR, s);
    const uint32_t* pk = s.pack2.data();
    for (int mt = 0; mt < rows; mt += MR) {
      const uint32_t* xa = g.xb + static_cast<size_t>(m0 + mt) * ldx + k0 / 2;
      float* c = s.c.data() + static_cast<size_t>(mt) * ldc;
      switch (std::min(MR, rows - mt)) {
        case 8: row_tile_bf16<8, NV, 1>(xa, ldx, pk, panels, kp, c, ldc); break;
        case 7: row_tile_bf16<7, NV, 1>(xa, ldx, pk, panels, kp, c, ldc); break;
        case 6: row_tile_bf16<6, NV, 1>(xa, ldx, pk, panels, kp, c, ldc); break;
        case 5: row_tile_bf16<5, NV, 1>(xa, ldx, pk, panels, kp, c, ldc); break;
        case 4: row_tile_bf16<4, NV, 2>(xa, ldx, pk, panels, kp, c, ldc); break;
        case 3: row_tile_bf16<3, NV, 2>(xa, ldx, pk, panels, kp, c, ldc); break;
        case 2: row_tile_bf16<2, NV, 2>(xa, ldx, pk, panels, kp, c, ldc); break;
        default: row_tile_bf16<1, NV, 4>(xa, ldx, pk, panels, kp, c, ldc); break;
      }
    }
  }
  for (int r = 0; r < rows; ++r)
    std::memcpy(g.y + static_cast<size_t>(m0 + r) * g.N + n0, s.c.data() + static_cast<size_t>(r) * ldc,
                cols * sizeof(float));
}
#pragma GCC diagnostic pop
#endif

uint16_t round_bf16(float f) {  // nearest even; NaN stays NaN
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40);
  return static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

// One copy per instruction set, picked at run time (the tile shape follows the register file).
using GemmTask = void (*)(const GemmArgs&, int, int, int, int, GemmScratch&);
struct GemmIsa {
  GemmTask task;
  int mr, nr;
};

// Two tile shapes, each in DG_CPU_CLONES copies: 8 x 32 for AVX-512's 32 zmm registers, 6 x 16 for
// AVX2's 16 ymm (and the baseline).
DG_CPU_CLONES
void gemm_task_8x32(const GemmArgs& g, int m0, int m1, int n0, int n1, GemmScratch& s) {
  gemm_task_impl<8, 2>(g, m0, m1, n0, n1, s);
}
DG_CPU_CLONES
void gemm_task_6x16(const GemmArgs& g, int m0, int m1, int n0, int n1, GemmScratch& s) {
  gemm_task_impl<6, 1>(g, m0, m1, n0, n1, s);
}
bool cpu_has_bf16_dot() {
#ifdef DG_BF16_DOT
  static const bool has = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512bf16") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  }();
  return has;
#else
  return false;
#endif
}

GemmIsa gemm_isa() {
  static const GemmIsa isa = [] {
#if defined(__x86_64__) && defined(__GNUC__)
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f")) return GemmIsa{gemm_task_8x32, 8, 32};
#endif
    return GemmIsa{gemm_task_6x16, 6, 16};
  }();
  return isa;
}

// y[M, N] = x[M, K] @ (nt ? w[N, K]^T : w[K, N]) as tasks of (row group, column block), each packing its
// block once for all its rows. The split only balances the threads: it changes no result (see above).
void gemm(const float* x, const WeightMat& w, float* y, int M, int N, int K, bool nt, bool parallel) {
  if (M <= 0 || N <= 0) return;
  if (K <= 0) {
    std::fill(y, y + static_cast<size_t>(M) * N, 0.0f);
    return;
  }
  GemmIsa isa = gemm_isa();
  std::vector<uint32_t> xb;  // bf16_dot: x rounded to bf16 pairs, once for all tasks
#ifdef DG_BF16_DOT
  if (w.bf16_dot && w.bf16() && cpu_has_bf16_dot()) {
    isa = GemmIsa{gemm_task_8x32_avx512bf16, 8, 32};
    const size_t kp = (static_cast<size_t>(K) + 1) / 2;
    xb.assign(static_cast<size_t>(M) * kp, 0u);
    uint16_t* xh = reinterpret_cast<uint16_t*>(xb.data());
    for (int m = 0; m < M; ++m)
      for (int k = 0; k < K; ++k) xh[m * 2 * kp + k] = round_bf16(x[static_cast<size_t>(m) * K + k]);
  }
#endif
  int threads = 1;
#ifdef _OPENMP
  if (parallel) threads = omp_get_max_threads();
#endif
  // Columns: blocks of up to 128 (the C block of a task stays in L2), narrower when there would be too
  // few tasks for the threads. Rows: all in one group (packing amortised over them) unless that still
  // leaves threads idle, or there are over 256 of them.
  auto round_up = [](int v, int m) { return (v + m - 1) / m * m; };
  int nb = std::min(round_up(N, isa.nr), 128);
  if (threads > 1) nb = std::min(nb, std::max(isa.nr, round_up((N + 2 * threads - 1) / (2 * threads), isa.nr)));
  const int blocks = (N + nb - 1) / nb;
  int rg = std::min(M, 256);
  if (blocks < threads) rg = std::min(rg, std::max(isa.mr, round_up((M + threads - 1) / threads, isa.mr)));
  const int groups = (M + rg - 1) / rg;
  const GemmArgs g{x, &w, y, M, N, K, nt, xb.empty() ? nullptr : xb.data()};
  const long n = static_cast<long>(groups) * blocks;
  auto task = [&](long t, GemmScratch& s) {
    const int gi = static_cast<int>(t / blocks), bi = static_cast<int>(t % blocks);
    isa.task(g, gi * rg, std::min(M, (gi + 1) * rg), bi * nb, std::min(N, (bi + 1) * nb), s);
  };
  if (threads > 1 && n > 1) {
#pragma omp parallel
    {
      GemmScratch s;
#pragma omp for schedule(dynamic, 1)
      for (long t = 0; t < n; ++t) task(t, s);
    }
  } else {
    static thread_local GemmScratch s;
    for (long t = 0; t < n; ++t) task(t, s);
  }
}

}  // namespace

void WeightMat::to_f32(int64_t i, int64_t n, float* out) const {
  if (f32)
    std::memcpy(out, f32 + i, static_cast<size_t>(n) * sizeof(float));
  else
    src->to_f32(begin + i, n, out);
}

const uint16_t* WeightMat::bf16() const {
  if (f32 || !src || src->synthetic() || src->format != WeightSource::Format::kFloat || src->tensor->dtype != DType::BF16)
    return nullptr;
  return reinterpret_cast<const uint16_t*>(src->tensor->data) + begin;
}

bool has_bf16_dot() { return cpu_has_bf16_dot(); }

void linear(const float* x, const WeightMat& w, float* y, int M, int N, int K) { gemm(x, w, y, M, N, K, true, true); }

void linear_serial(const float* x, const WeightMat& w, float* y, int M, int N, int K) {
  gemm(x, w, y, M, N, K, true, false);
}

void matmul_nn(const float* x, const WeightMat& w, float* y, int M, int N, int K) {
  gemm(x, w, y, M, N, K, false, true);
}

void rmsnorm(const float* x, const float* weight, float* y, size_t rows, int dim, float eps) {
#pragma omp parallel for schedule(static) if (rows * dim > 16384)
  for (size_t r = 0; r < rows; ++r) {
    const float* xr = x + r * dim;
    float* yr = y + r * dim;
    double ss = 0;
    for (int i = 0; i < dim; ++i) ss += static_cast<double>(xr[i]) * xr[i];
    const float ms = static_cast<float>(ss / dim) + eps;
    const float inv = std::pow(ms, -0.5f);
    if (weight)
      for (int i = 0; i < dim; ++i) yr[i] = (xr[i] * inv) * weight[i];
    else
      for (int i = 0; i < dim; ++i) yr[i] = xr[i] * inv;
  }
}

void rope(float* x, int tokens, int heads, int head_dim, const int32_t* positions, const float* inv_freq) {
  const int half = head_dim / 2;
#pragma omp parallel for schedule(static) if (static_cast<long>(tokens) * heads * head_dim > 65536)
  for (int t = 0; t < tokens; ++t) {
    const float pos = static_cast<float>(positions[t]);
    float cs[1024], sn[1024];  // head_dim/2 <= 1024 is checked by the backend
    for (int i = 0; i < half; ++i) {
      const float f = pos * inv_freq[i];
      cs[i] = std::cos(f);
      sn[i] = std::sin(f);
    }
    for (int h = 0; h < heads; ++h) {
      float* v = x + (static_cast<size_t>(t) * heads + h) * head_dim;
      for (int i = 0; i < half; ++i) {
        const float a = v[i], b = v[i + half];
        v[i] = a * cs[i] - b * sn[i];
        v[i + half] = b * cs[i] + a * sn[i];
      }
    }
  }
}

void softmax_inplace(float* x, int n) {
  float mx = x[0];
  for (int i = 1; i < n; ++i) mx = std::max(mx, x[i]);
  for (int i = 0; i < n; ++i) x[i] = std::exp(x[i] - mx);
  double sum = 0;
  for (int i = 0; i < n; ++i) sum += x[i];
  const float inv = 1.0f / static_cast<float>(sum);
  for (int i = 0; i < n; ++i) x[i] *= inv;
}

}  // namespace dgemma::cpu
