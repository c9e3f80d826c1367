#include "backend/cpu/ops.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <mutex>
#include <vector>

// scipy-openblas32's header: its symbols are prefixed scipy_, so they cannot
// clash with another BLAS in the process (numpy's, torch's).
#include <cblas.h>

namespace dgemma::cpu {
namespace {

// Weight rows per BLAS call of an x @ W^T: about 128 KiB of weights (stays in L2 while row tiles
// stream), a multiple of 16. A function of the weight's shape only.
int col_block_nt(int N, int K) {
  int nb = static_cast<int>((128 * 1024 / sizeof(float)) / static_cast<size_t>(std::max(K, 1)));
  nb = std::max(16, std::min(256, nb / 16 * 16));
  return std::min(nb, N);
}

// y[M, N] = x[M, K] @ (nt ? w[N, K]^T : w[K, N]) as (row tile, column block) BLAS calls of one shape
// (see ops.h). Each call computes the tile transposed, C[kRowTile, cols] column-major: the tile's rows
// then run along BLAS's M, the dimension its micro-kernels vectorise, where every row of a full
// micro-tile goes through the same instructions (along N, OpenBLAS's Haswell kernel rounds columns
// 6-11 of its 12 differently). The last partial row tile goes through a zero-padded copy.
// A weight read as stored is converted a column block at a time (the block's rows of W for x @ W^T,
// its [K, cols] strip for x @ W), once per call: a task is then a column block and all row tiles.
void gemm(const float* x, const WeightMat& w, float* y, int M, int N, int K, bool nt, bool parallel) {
  if (M <= 0 || N <= 0) return;
  if (K <= 0) {
    std::fill(y, y + static_cast<size_t>(M) * N, 0.0f);
    return;
  }
  blas_single_threaded();
  const int nb = nt ? col_block_nt(N, K) : std::min(N, 64);
  const int tiles = (M + kRowTile - 1) / kRowTile, blocks = (N + nb - 1) / nb;
  const int full = M / kRowTile, tail = M - full * kRowTile;
  std::vector<float> apad;
  if (tail) {
    apad.assign(static_cast<size_t>(kRowTile) * K, 0.0f);
    std::memcpy(apad.data(), x + static_cast<size_t>(full) * kRowTile * K, static_cast<size_t>(tail) * K * sizeof(float));
  }
  const bool stored = w.f32 == nullptr;
  // One BLAS call: row tile `tile` against the block at column n0 whose weights are at wb (leading
  // dimension ldb: K for x @ W^T, N or cols for x @ W).
  auto call = [&](int tile, int n0, int cols, const float* wb, int ldb, std::vector<float>& ct) {
    const float* a = tile == full ? apad.data() : x + static_cast<size_t>(tile) * kRowTile * K;
    ct.resize(static_cast<size_t>(kRowTile) * nb);
    float* c = ct.data();
    if (nt)  // C = x_tile[kRowTile, K] @ W[n0:n0+cols, :]^T
      scipy_cblas_sgemm(CblasColMajor, CblasTrans, CblasNoTrans, kRowTile, cols, K, 1.0f, a, K, wb, ldb, 0.0f, c,
                        kRowTile);
    else  // C = x_tile[kRowTile, K] @ W[:, n0:n0+cols]
      scipy_cblas_sgemm(CblasColMajor, CblasTrans, CblasTrans, kRowTile, cols, K, 1.0f, a, K, wb, ldb, 0.0f, c,
                        kRowTile);
    const int rows = tile == full ? tail : kRowTile;
    float* yt = y + static_cast<size_t>(tile) * kRowTile * N + n0;
    for (int r = 0; r < rows; ++r)
      for (int j = 0; j < cols; ++j) yt[static_cast<size_t>(r) * N + j] = c[static_cast<size_t>(j) * kRowTile + r];
  };
  auto task = [&](long t, std::vector<float>& ct, std::vector<float>& wt) {
    if (!stored) {
      const int tile = static_cast<int>(t / blocks), n0 = static_cast<int>(t % blocks) * nb;
      const int cols = std::min(nb, N - n0);
      call(tile, n0, cols, nt ? w.f32 + static_cast<size_t>(n0) * K : w.f32 + n0, nt ? K : N, ct);
      return;
    }
    const int n0 = static_cast<int>(t) * nb, cols = std::min(nb, N - n0);
    wt.resize(static_cast<size_t>(K) * cols);
    if (nt) {
      w.to_f32(static_cast<int64_t>(n0) * K, static_cast<int64_t>(cols) * K, wt.data());
    } else {
      for (int k = 0; k < K; ++k) w.to_f32(static_cast<int64_t>(k) * N + n0, cols, wt.data() + static_cast<size_t>(k) * cols);
    }
    for (int tile = 0; tile < tiles; ++tile) call(tile, n0, cols, wt.data(), nt ? K : cols, ct);
  };
  const long n = stored ? blocks : static_cast<long>(tiles) * blocks;
  if (parallel && n > 1) {
#pragma omp parallel
    {
      std::vector<float> ct, wt;
#pragma omp for schedule(dynamic, 1)
      for (long t = 0; t < n; ++t) task(t, ct, wt);
    }
  } else {
    std::vector<float> ct, wt;
    for (long t = 0; t < n; ++t) task(t, ct, wt);
  }
}

}  // namespace

void blas_single_threaded() {
  static std::once_flag once;
  std::call_once(once, [] { scipy_openblas_set_num_threads(1); });
}

void WeightMat::to_f32(int64_t i, int64_t n, float* out) const {
  if (f32)
    std::memcpy(out, f32 + i, static_cast<size_t>(n) * sizeof(float));
  else
    src->to_f32(begin + i, n, out);
}

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

float gelu_tanh(float x) {
  const float k = 0.7978845608028654f;  // sqrt(2/pi)
  return 0.5f * x * (1.0f + std::tanh(k * (x + 0.044715f * x * x * x)));
}

void gelu_mul(const float* gate, const float* up, float* out, size_t n) {
#pragma omp parallel for schedule(static) if (n > 65536)
  for (size_t i = 0; i < n; ++i) out[i] = gelu_tanh(gate[i]) * up[i];
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
