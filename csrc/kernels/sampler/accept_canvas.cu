#include <cstdint>

#include "kernels/sampler/sampler.cuh"

namespace dgemma::kernels {
namespace {

constexpr int kMaxL = kAcceptMaxCanvas;

// blockDim.x: a power of two >= max(L, 32); one thread per (padded) canvas position.
__global__ void __launch_bounds__(kMaxL) accept_canvas_kernel(const AcceptCanvasParams p) {
  __shared__ float key[kMaxL];
  __shared__ int idx[kMaxL];
  __shared__ float ent[kMaxL];
  __shared__ unsigned char accept[kMaxL];
  __shared__ float s_esum;

  const int row = blockIdx.x;
  if (p.active != nullptr && p.active[row] == 0) return;  // uniform over the block
  const int L = p.canvas_length, n = blockDim.x, tid = threadIdx.x;
  const size_t base = static_cast<size_t>(row) * L;

  // Padding sorts last: +inf and an index past every real one.
  const float e = tid < L ? p.entropy[base + tid] : INFINITY;
  key[tid] = e;
  idx[tid] = tid;
  ent[tid] = e;
  accept[tid] = 0;  // only NaN entropies (no total order) could leave a position unwritten below
  __syncthreads();

  // Bitonic sort by (entropy, index) ascending: the stable sort by entropy the CPU does.
  for (int k = 2; k <= n; k <<= 1) {
    for (int j = k >> 1; j > 0; j >>= 1) {
      const int other = tid ^ j;
      if (other > tid) {
        const float a = key[tid], b = key[other];
        const int ia = idx[tid], ib = idx[other];
        const bool a_after_b = b < a || (b == a && ib < ia);
        if (a_after_b == ((tid & k) == 0)) {
          key[tid] = b, key[other] = a;
          idx[tid] = ib, idx[other] = ia;
        }
      }
      __syncthreads();
    }
  }

  // The running sums must round exactly as the CPU's sequential loops do, so one thread walks them:
  // float64 cumsum over sorted entropies, float32 sum over the row in index order.
  if (tid == 0) {
    const float bound = static_cast<float>(p.entropy_bound);
    double cum = 0;
    float esum = 0.f;
    for (int k = 0; k < L; ++k) {
      const float ek = key[k];
      cum += static_cast<double>(ek);
      accept[idx[k]] = static_cast<float>(cum) - ek <= bound;
      esum += ent[k];
    }
    s_esum = esum;
  }
  __syncthreads();
  if (tid < L) p.canvas[base + tid] = accept[tid] ? p.sampled[base + tid] : p.fresh[base + tid];

  if (p.adaptive_stopping) {
    const int thr = p.stability_threshold;
    int same = 1;
    if (thr > 0 && tid < L) {
      // history[k][row][j] at k * rows * L + row * L + j; k = 0 is the oldest.
      const size_t stride = static_cast<size_t>(p.rows) * L;
      int32_t* h = p.history + base + tid;
      const int32_t am = p.argmax[base + tid];
      for (int k = 0; k < thr; ++k) {
        const int32_t v = h[k * stride];
        same &= v == am;
        if (k > 0) h[(k - 1) * stride] = v;
      }
      h[(thr - 1) * stride] = am;
    }
    const bool stable = __syncthreads_and(same) != 0;
    if (tid == 0 && stable && static_cast<double>(s_esum / static_cast<float>(L)) < p.confidence_threshold)
      p.finished[row] = 1;
  }
}

}  // namespace

cudaError_t accept_canvas(const AcceptCanvasParams& p, cudaStream_t stream) {
  if (p.rows < 0 || p.canvas_length < 1 || p.canvas_length > kMaxL || p.stability_threshold < 0)
    return cudaErrorInvalidValue;
  if (p.rows == 0) return cudaSuccess;
  if (!p.entropy || !p.sampled || !p.fresh || !p.canvas) return cudaErrorInvalidValue;
  if (p.adaptive_stopping && (!p.finished || (p.stability_threshold > 0 && (!p.history || !p.argmax))))
    return cudaErrorInvalidValue;
  int threads = 32;
  while (threads < p.canvas_length) threads <<= 1;
  accept_canvas_kernel<<<p.rows, threads, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace dgemma::kernels
