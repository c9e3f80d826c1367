// The CPU sampler. Compiled with -ffp-contract=off (CMakeLists.txt): a multiply-add contracted to an
// FMA would round differently from the reference's float32 tensor ops.
#include <algorithm>
#include <cmath>

#include "backend/cpu/ops.h"

// The 16-lane vectors below live in registers of inlined code only; no ABI crosses them.
#pragma GCC diagnostic ignored "-Wpsabi"

namespace dgemma::cpu {
namespace {

typedef float v16f __attribute__((vector_size(64)));
typedef int32_t v16i __attribute__((vector_size(64)));
typedef float v16f_u __attribute__((vector_size(64), aligned(4), may_alias));

// expf over 16 lanes for tanh (Cephes' polynomial, within about 1 ulp of libm's): IEEE adds and multiplies only
// (this file does not contract them), so every clone and every lane rounds alike.
[[gnu::always_inline]] inline v16f vexp(v16f x) {
  const v16i under = x < -87.3365f;  // e^x below the smallest normal float: 0, as libm's (denormals aside)
  x = x > 88.3762626647949f ? v16f{} + 88.3762626647949f : x;
  x = x < -87.3365f ? v16f{} - 87.3365f : x;
  v16f n = x * 1.44269504088896341f + 12582912.0f;  // round to nearest: 1.5 * 2^23
  n = n - 12582912.0f;
  v16f r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  const v16f z = r * r;
  v16f y = r * 1.9875691500E-4f + 1.3981999507E-3f;
  y = y * r + 8.3334519073E-3f;
  y = y * r + 4.1665795894E-2f;
  y = y * r + 1.6666665459E-1f;
  y = y * r + 5.0000001201E-1f;
  y = y * z + r + 1.0f;
  const v16i e = (__builtin_convertvector(n, v16i) + 127) << 23;
  y = y * reinterpret_cast<v16f>(e);  // 2^n: the bits as a float
  return under ? v16f{} : y;
}

// tanhf over 16 lanes: Cephes' odd polynomial below 0.625, 1 - 2 / (e^2|z| + 1) above.
[[gnu::always_inline]] inline v16f vtanh(v16f z) {
  const v16f a = z < 0.0f ? -z : z;
  const v16f zz = z * z;
  v16f p = zz * -5.70498872745E-3f + 2.06390887954E-2f;
  p = p * zz - 5.37397155531E-2f;
  p = p * zz + 1.33314422036E-1f;
  p = p * zz - 3.33332819422E-1f;
  p = p * zz * z + z;
  v16f t = 1.0f - 2.0f / (vexp(a + a) + 1.0f);
  t = z < 0.0f ? -t : t;
  return a < 0.625f ? p : t;
}

// out[i] = f(in[i]) for n values, 16 at a time (the tail through a padded copy, same code).
template <typename F>
[[gnu::always_inline]] inline void map16(const float* in, float* out, size_t n, F f) {
  size_t i = 0;
  for (; i + 16 <= n; i += 16) *reinterpret_cast<v16f_u*>(out + i) = f(*reinterpret_cast<const v16f_u*>(in + i));
  if (i < n) {
    float t[16] = {};
    for (size_t j = i; j < n; ++j) t[j - i] = in[j];
    const v16f r = f(*reinterpret_cast<const v16f_u*>(t));
    for (size_t j = i; j < n; ++j) out[j] = r[j - i];
  }
}

}  // namespace

DG_CPU_CLONES
void softcap_inplace(float* x, size_t n, float cap) {
  map16(x, x, n, [cap](v16f v) { return vtanh(v / cap) * cap; });
}

// Inverse-CDF sampling in float64 over float32 probabilities, entropy as
// torch.distributions.Categorical computes it.
Sampled sample_position(const float* raw, int V, float temperature, double u, float* processed, float* probs,
                        double* cdf) {
  float mx = -INFINITY;
  int32_t am = 0;
  for (int v = 0; v < V; ++v) processed[v] = raw[v] / temperature;
  for (int v = 0; v < V; ++v)
    if (processed[v] > mx) mx = processed[v], am = v;
  // libm's expf: a vectorised exp one ulp off it (in 1 value of ~2000) already flips sampled tokens
  // against the reference on test_parity's hybrid cases.
  for (int v = 0; v < V; ++v) probs[v] = std::exp(processed[v] - mx);
  double sum = 0;
  for (int v = 0; v < V; ++v) sum += probs[v];
  const float inv = 1.0f / static_cast<float>(sum);
  const float lse = mx + std::log(static_cast<float>(sum));
  double c = 0, ent = 0;
  for (int v = 0; v < V; ++v) {
    const float prob = probs[v] * inv;
    probs[v] = prob;
    c += prob;
    cdf[v] = c;
    ent -= static_cast<double>(prob) * (processed[v] - lse);
  }
  const double target = u * cdf[V - 1];
  int32_t tok = static_cast<int32_t>(std::upper_bound(cdf, cdf + V, target) - cdf);
  tok = std::min(tok, V - 1);
  return {tok, am, static_cast<float>(ent)};
}

}  // namespace dgemma::cpu
