// Vectorised float32 math over 16 lanes for the CPU backend's elementwise ops (the logit soft-cap in
// sample.cpp, the gated GELU in activations.cpp), with one rule: every CPU gives the same bits.
// IEEE adds, multiplies, divides, compares and exact conversions only, which round alike in every lane
// of every DG_CPU_CLONES copy (AVX-512, AVX2, SSE2), provided no multiply-add is contracted to an FMA
// (the x86-64-v3/v4 copies have FMA): include this header only from a source file compiled with
// -ffp-contract=off (CMakeLists.txt). tests/test_cpu_elementwise.py compiles it once per instruction
// set and compares the bits.
#pragma once

#include <cstddef>
#include <cstdint>

// The 16-lane vectors live in registers of inlined code only; no ABI crosses them.
#pragma GCC diagnostic ignored "-Wpsabi"

namespace dgemma::cpu::vec {

typedef float v16f __attribute__((vector_size(64)));
typedef int32_t v16i __attribute__((vector_size(64)));
typedef float v16f_u __attribute__((vector_size(64), aligned(4), may_alias));  // unaligned loads, stores

// expf over 16 lanes for tanh (Cephes' polynomial, within about 1 ulp of libm's).
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

// tanhf over 16 lanes: Cephes' odd polynomial below 0.625, 1 - 2 / (e^2|z| + 1) above. +-inf give +-1,
// NaN gives NaN, -0 gives -0, as libm's.
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

// gelu_pytorch_tanh: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), the formula of the scalar code it
// replaced, in the same order (so the same bits but for tanh's last ulps). +inf gives +inf, -inf NaN
// (-inf * 0, as the scalar formula), large negative x -0.
[[gnu::always_inline]] inline v16f vgelu_tanh(v16f x) {
  const float k = 0.7978845608028654f;  // sqrt(2/pi)
  return 0.5f * x * (1.0f + vtanh(k * (x + 0.044715f * x * x * x)));
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

// out[i] = f(a[i], b[i]) for n values, likewise. out may alias a or b.
template <typename F>
[[gnu::always_inline]] inline void map16(const float* a, const float* b, float* out, size_t n, F f) {
  size_t i = 0;
  for (; i + 16 <= n; i += 16)
    *reinterpret_cast<v16f_u*>(out + i) =
        f(*reinterpret_cast<const v16f_u*>(a + i), *reinterpret_cast<const v16f_u*>(b + i));
  if (i < n) {
    float ta[16] = {}, tb[16] = {};
    for (size_t j = i; j < n; ++j) ta[j - i] = a[j], tb[j - i] = b[j];
    const v16f r = f(*reinterpret_cast<const v16f_u*>(ta), *reinterpret_cast<const v16f_u*>(tb));
    for (size_t j = i; j < n; ++j) out[j] = r[j - i];
  }
}

}  // namespace dgemma::cpu::vec
