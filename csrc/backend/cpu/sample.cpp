// The CPU sampler. Compiled with -ffp-contract=off (CMakeLists.txt): a multiply-add contracted to an
// FMA would round differently from the reference's float32 tensor ops.
#include <algorithm>
#include <cmath>

#include "backend/cpu/ops.h"
#include "backend/cpu/vec_math.h"

namespace dgemma::cpu {

DG_CPU_CLONES
void softcap_inplace(float* x, size_t n, float cap) {
  vec::map16(x, x, n, [cap](vec::v16f v) { return vec::vtanh(v / cap) * cap; });
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
    // p = 0 adds nothing, as in torch's Categorical (a -inf logit would give 0 * -inf = NaN).
    if (prob != 0.f) ent -= static_cast<double>(prob) * (processed[v] - lse);
  }
  const double target = u * cdf[V - 1];
  int32_t tok = static_cast<int32_t>(std::upper_bound(cdf, cdf + V, target) - cdf);
  tok = std::min(tok, V - 1);
  return {tok, am, static_cast<float>(ent)};
}

}  // namespace dgemma::cpu
