// Float32 building blocks of the CPU reference backend. All are deterministic: each output element
// is computed by one thread in a fixed order, so results do not depend on the thread count, nor on
// which other rows share the call.
#pragma once

#include <cstddef>
#include <cstdint>

#include "model/weights.h"

// Runtime dispatch for our own hot loops (GEMM micro-kernel, attention, soft-cap, GELU): GCC/Clang build an
// x86-64-v4 (AVX-512), an x86-64-v3 (AVX2 + FMA) and a baseline copy of the function and pick one
// at load time, so a portable build still uses the wide units where the CPU has them. The copies
// round alike but for FMA contraction (none in the sources compiled with -ffp-contract=off: the
// soft-cap and the GELU give the same bits everywhere). Off with DGEMMA_NATIVE_ARCH (already built
// for this CPU).
#if defined(__x86_64__) && defined(__GNUC__) && !defined(DGEMMA_NATIVE_ARCH_BUILD) && !defined(__clang__)
#define DG_CPU_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define DG_CPU_CLONES
#endif

namespace dgemma::cpu {

// The GEMMs are our own packed micro-kernel (ops.cpp; x86-64-v4/v3/baseline copies picked at load
// time): each output element is one multiply-add chain over k = 0 .. K-1 in order, in one vector lane,
// whatever the thread count, the batch composition, the row's place in it or the blocking (tests/
// test_batching.py checks the batch invariance end to end). A task converts and packs a block of the
// weight once for all the rows it serves. Not a BLAS library: batch invariance needs one fixed call
// shape, and OpenBLAS (which ran here before) then repacked each weight for every 16-row call, having
// no pre-packed GEMM API: twice slower on the medium model (bench/results/cpu-peer-*.json).

// A weight matrix as the GEMMs read it: float32 in memory, or a checkpoint tensor as stored (BF16, F16,
// NVFP4, FP8, elements [begin, begin + rows * cols) of src in row-major order) that the GEMM converts
// to float32 one block (up to 256 k x 128 columns) at a time into a per-thread scratch. Both kinds give
// the same bits: the kernel sees the same float32 values (the conversion is exact for BF16/F16, and is
// WeightSource::to_f32 for NVFP4/FP8).
//
// bf16_dot (only for a BF16 tensor as stored, read in place): multiply with the CPU's BF16 dot products
// (AVX512-BF16 vdpbf16ps) where it has them: the activations are rounded to bf16 (nearest even) and
// each output is one chain of pair dot products over k = 0 .. K-1, in one lane, float32 accumulation;
// as batch-invariant as the float32 path, but not its bits. On a CPU without AVX512-BF16 the flag is
// ignored (the float32 path).
struct WeightMat {
  const float* f32 = nullptr;         // row-major float32, or null: read src
  const WeightSource* src = nullptr;
  int64_t begin = 0;                  // first element in src (an expert's slice of a stacked tensor)
  bool bf16_dot = false;
  // The matrix at element offset `elems` (an expert of a stacked tensor).
  WeightMat at(int64_t elems) const {
    return f32 ? WeightMat{f32 + elems, nullptr, 0} : WeightMat{nullptr, src, begin + elems, bf16_dot};
  }
  // The stored BF16 elements from `begin`, or null when the matrix is not a BF16 tensor read in place.
  const uint16_t* bf16() const;
  // Elements [i, i + n) as float32 (copied or converted).
  void to_f32(int64_t i, int64_t n, float* out) const;
};

// y[M, N] = x[M, K] @ w[N, K]^T  (nn.Linear layout). Tiles spread over the OpenMP threads.
void linear(const float* x, const WeightMat& w, float* y, int M, int N, int K);
// Same, single-threaded (for use inside an outer parallel loop), same results.
void linear_serial(const float* x, const WeightMat& w, float* y, int M, int N, int K);
// y[M, N] = x[M, K] @ w[K, N]. Tiles spread over the OpenMP threads.
void matmul_nn(const float* x, const WeightMat& w, float* y, int M, int N, int K);
inline void linear(const float* x, const float* w, float* y, int M, int N, int K) { linear(x, WeightMat{w}, y, M, N, K); }

// y = x * (mean(x^2) + eps)^-0.5 [* weight], per row of `dim`. weight may be null. y may alias x.
void rmsnorm(const float* x, const float* weight, float* y, size_t rows, int dim, float eps);

// out[i] = gelu_tanh(gate[i]) * up[i], gelu_pytorch_tanh's formula with a vectorised tanhf within a few ulp
// of libm's that rounds alike on every CPU (vec_math.h, activations.cpp). out may alias gate or up.
// Threads over chunks of a large n; call it inside a parallel region only with small n.
void gelu_mul(const float* gate, const float* up, float* out, size_t n);

// Rotate-half RoPE in place on x[tokens, heads, head_dim] with per-token positions.
void rope(float* x, int tokens, int heads, int head_dim, const int32_t* positions, const float* inv_freq);

// x[i] = tanh(x[i] / cap) * cap (the final logit soft-cap), with a vectorised tanhf within a few ulp of
// libm's that rounds alike on every CPU (sample.cpp).
void softcap_inplace(float* x, size_t n, float cap);

// Whether this CPU runs the bf16_dot GEMMs (AVX512-BF16); without it they take the float32 path.
bool has_bf16_dot();

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
