// Float32 building blocks of the CPU reference backend. All are deterministic: each output element
// is computed by one thread in a fixed order, so results do not depend on the thread count.
#pragma once

#include <cstddef>
#include <cstdint>

namespace dgemma::cpu {

// y[M, N] = x[M, K] @ w[N, K]^T  (nn.Linear layout). Parallel over N and M.
void linear(const float* x, const float* w, float* y, int M, int N, int K);
// Same, single-threaded (for use inside an outer parallel loop).
void linear_serial(const float* x, const float* w, float* y, int M, int N, int K);
// y[M, N] = x[M, K] @ w[K, N]. Parallel over M.
void matmul_nn(const float* x, const float* w, float* y, int M, int N, int K);
// y[N] = x[K] @ w[K, N], single-threaded, the same arithmetic as one row of matmul_nn.
void matvec_nn_serial(const float* x, const float* w, float* y, int N, int K);

// y = x * (mean(x^2) + eps)^-0.5 [* weight], per row of `dim`. weight may be null. y may alias x.
void rmsnorm(const float* x, const float* weight, float* y, size_t rows, int dim, float eps);

float gelu_tanh(float x);
// out[i] = gelu_tanh(gate[i]) * up[i]
void gelu_mul(const float* gate, const float* up, float* out, size_t n);

// Rotate-half RoPE in place on x[tokens, heads, head_dim] with per-token positions.
void rope(float* x, int tokens, int heads, int head_dim, const int32_t* positions, const float* inv_freq);

// Softmax over a row in place, float32 as torch computes it (max-subtracted exp, scaled by 1/sum).
void softmax_inplace(float* x, int n);

// What sampling one canvas position yields.
struct Sampled {
  int32_t token;
  int32_t argmax;
  float entropy;
};
// The sampler for one position (the rule of SampleArgs in backend/backend.h), rounding as the
// reference's float32 tensor ops do (sample.cpp is compiled without FMA contraction).
// raw: soft-capped logits [V]. Scratch and outputs [V]: processed = raw / temperature, probs =
// softmax(processed) (bit-identical to softmax_inplace(processed)), cdf.
Sampled sample_position(const float* raw, int V, float temperature, double u, float* processed, float* probs,
                        double* cdf);

}  // namespace dgemma::cpu
