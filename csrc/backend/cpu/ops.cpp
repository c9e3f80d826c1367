#include "backend/cpu/ops.h"

#include <algorithm>
#include <cmath>

namespace dgemma::cpu {
namespace {

constexpr int kLanes = 16;

// Four dot products of x against w0..w3, with kLanes independent accumulators each so the
// compiler vectorises the inner loop.
inline void dot4(const float* __restrict x, const float* __restrict w0, const float* __restrict w1,
                 const float* __restrict w2, const float* __restrict w3, int K, float* out) {
  float a0[kLanes] = {}, a1[kLanes] = {}, a2[kLanes] = {}, a3[kLanes] = {};
  int k = 0;
  for (; k + kLanes <= K; k += kLanes) {
    for (int j = 0; j < kLanes; ++j) {
      const float xv = x[k + j];
      a0[j] += xv * w0[k + j];
      a1[j] += xv * w1[k + j];
      a2[j] += xv * w2[k + j];
      a3[j] += xv * w3[k + j];
    }
  }
  float s0 = 0, s1 = 0, s2 = 0, s3 = 0;
  for (int j = 0; j < kLanes; ++j) {
    s0 += a0[j];
    s1 += a1[j];
    s2 += a2[j];
    s3 += a3[j];
  }
  for (; k < K; ++k) {
    s0 += x[k] * w0[k];
    s1 += x[k] * w1[k];
    s2 += x[k] * w2[k];
    s3 += x[k] * w3[k];
  }
  out[0] = s0;
  out[1] = s1;
  out[2] = s2;
  out[3] = s3;
}

inline float dot1(const float* __restrict x, const float* __restrict w, int K) {
  float a[kLanes] = {};
  int k = 0;
  for (; k + kLanes <= K; k += kLanes)
    for (int j = 0; j < kLanes; ++j) a[j] += x[k + j] * w[k + j];
  float s = 0;
  for (int j = 0; j < kLanes; ++j) s += a[j];
  for (; k < K; ++k) s += x[k] * w[k];
  return s;
}

// Rows [m0, m1) x column block nb (4 columns of y).
inline void linear_tile(const float* x, const float* w, float* y, int m0, int m1, int n0, int N, int K) {
  if (n0 + 4 <= N) {
    const float* w0 = w + static_cast<size_t>(n0) * K;
    float r[4];
    for (int m = m0; m < m1; ++m) {
      dot4(x + static_cast<size_t>(m) * K, w0, w0 + K, w0 + 2 * K, w0 + 3 * K, K, r);
      float* yr = y + static_cast<size_t>(m) * N + n0;
      yr[0] = r[0];
      yr[1] = r[1];
      yr[2] = r[2];
      yr[3] = r[3];
    }
  } else {
    for (int n = n0; n < N; ++n)
      for (int m = m0; m < m1; ++m)
        y[static_cast<size_t>(m) * N + n] = dot1(x + static_cast<size_t>(m) * K, w + static_cast<size_t>(n) * K, K);
  }
}

}  // namespace

void linear(const float* x, const float* w, float* y, int M, int N, int K) {
  // Tiles of 4 weight rows x up to 64 input rows keep the weight rows in L1/L2 while x streams.
  const int nb = (N + 3) / 4;
  const int mt = 64;
  const int mb = (M + mt - 1) / mt;
  const long tiles = static_cast<long>(nb) * mb;
#pragma omp parallel for schedule(static)
  for (long t = 0; t < tiles; ++t) {
    const int bn = static_cast<int>(t % nb), bm = static_cast<int>(t / nb);
    linear_tile(x, w, y, bm * mt, std::min(M, (bm + 1) * mt), bn * 4, N, K);
  }
}

void linear_serial(const float* x, const float* w, float* y, int M, int N, int K) {
  for (int n0 = 0; n0 < N; n0 += 4) linear_tile(x, w, y, 0, M, n0, N, K);
}

void matmul_nn(const float* x, const float* w, float* y, int M, int N, int K) {
#pragma omp parallel for schedule(static)
  for (int m = 0; m < M; ++m) {
    float* yr = y + static_cast<size_t>(m) * N;
    std::fill(yr, yr + N, 0.0f);
    const float* xr = x + static_cast<size_t>(m) * K;
    for (int k = 0; k < K; ++k) {
      const float a = xr[k];
      if (a == 0.0f) continue;
      const float* wr = w + static_cast<size_t>(k) * N;
      for (int n = 0; n < N; ++n) yr[n] += a * wr[n];
    }
  }
}

void matvec_nn_serial(const float* x, const float* w, float* y, int N, int K) {
  std::fill(y, y + N, 0.0f);
  for (int k = 0; k < K; ++k) {
    const float a = x[k];
    if (a == 0.0f) continue;
    const float* wr = w + static_cast<size_t>(k) * N;
    for (int n = 0; n < N; ++n) y[n] += a * wr[n];
  }
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
