// The gated GELU of the MLP and the MoE experts. Compiled with -ffp-contract=off (CMakeLists.txt), as
// vec_math.h requires: the same bits on every CPU.
#include <algorithm>

#include "backend/cpu/ops.h"
#include "backend/cpu/vec_math.h"

namespace dgemma::cpu {
namespace {

// No OpenMP inside: GCC outlines a parallel region's body into a function of its own, which
// target_clones does not copy (it would run the baseline code on every CPU).
DG_CPU_CLONES
void gelu_mul_serial(const float* gate, const float* up, float* out, size_t n) {
  vec::map16(gate, up, out, n, [](vec::v16f g, vec::v16f u) { return vec::vgelu_tanh(g) * u; });
}

}  // namespace

void gelu_mul(const float* gate, const float* up, float* out, size_t n) {
  constexpr size_t kChunk = 16384;  // elementwise: any split gives the same bits
  if (n <= 4 * kChunk) {  // most calls (the experts' rows, inside their own parallel loop): no team to start
    gelu_mul_serial(gate, up, out, n);
    return;
  }
  const long chunks = static_cast<long>((n + kChunk - 1) / kChunk);
#pragma omp parallel for schedule(static)
  for (long c = 0; c < chunks; ++c) {
    const size_t i = static_cast<size_t>(c) * kChunk;
    gelu_mul_serial(gate + i, up + i, out + i, std::min(kChunk, n - i));
  }
}

}  // namespace dgemma::cpu
