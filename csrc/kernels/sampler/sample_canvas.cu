#include <climits>
#include <cstdint>

#include "kernels/kernel_plan.h"
#include "kernels/sampler/sampler.cuh"

namespace dgemma::kernels {
namespace {

constexpr int kThreads = 512;
constexpr int kWarps = kThreads / 32;
constexpr int kCtasPerSm = 2;  // two positions per SM: <= 64 registers per thread
// The vocabulary is cut into segments of kRows rows of 32 consecutive entries; warp w owns
// segments w, w + kWarps, ... in every pass, so each load is a coalesced 128-byte row and every
// element is read back by the thread that wrote it.
constexpr int kRows = 8;
constexpr int kSeg = kRows * 32;
constexpr unsigned kFull = 0xffffffffu;
static_assert(kSampleMaxVocab % kSeg == 0, "segments must tile the largest vocabulary");

// Dynamic shared memory: one 64-bit mass per segment (<= 32 KiB at kSampleMaxVocab).
size_t seg_sum_bytes(int vocab) { return static_cast<size_t>((vocab + kSeg - 1) / kSeg) * sizeof(uint64_t); }

// Probabilities quantised to multiples of 2^-62 so that CDF sums are exact integers (p <= 1, and
// sum p <= 1 + a few float ulps, so sum q stays far below 2^64). NaN gives none, whatever the
// conversion would do with it.
__device__ __forceinline__ uint64_t quantise(float prob) { return prob > 0.f ? __float2ull_rz(prob * 0x1p62f) : 0ull; }

// One expression for the probability everywhere it is needed, so every pass sees the same bits.
__device__ __forceinline__ float prob_of(float x, float mx, float inv) { return expf(x - mx) * inv; }

__device__ __forceinline__ bool better(float a, int ia, float b, int ib) { return a > b || (a == b && ia < ib); }

// Block-wide reductions. Every thread gets the same value; the summation order is fixed, so the
// results are deterministic. `scratch` is reused: each ends with a barrier before it returns.
__device__ __forceinline__ double block_sum(double v, double* scratch) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(kFull, v, o);
  if ((threadIdx.x & 31) == 0) scratch[threadIdx.x >> 5] = v;
  __syncthreads();
  double t = 0;
  for (int w = 0; w < kWarps; ++w) t += scratch[w];
  __syncthreads();
  return t;
}

__device__ __forceinline__ void block_argmax(float& v, int& i, float* sv, int* si) {
  for (int o = 16; o > 0; o >>= 1) {
    const float ov = __shfl_xor_sync(kFull, v, o);
    const int oi = __shfl_xor_sync(kFull, i, o);
    if (better(ov, oi, v, i)) v = ov, i = oi;
  }
  if ((threadIdx.x & 31) == 0) sv[threadIdx.x >> 5] = v, si[threadIdx.x >> 5] = i;
  __syncthreads();
  v = sv[0], i = si[0];
  for (int w = 1; w < kWarps; ++w)
    if (better(sv[w], si[w], v, i)) v = sv[w], i = si[w];
  __syncthreads();
}

__device__ __forceinline__ uint64_t warp_inclusive_scan(uint64_t v, int lane) {
  for (int o = 1; o < 32; o <<= 1) {
    const uint64_t n = __shfl_up_sync(kFull, v, o);
    if (lane >= o) v += n;
  }
  return v;
}

// Exclusive scan over the block (exact: integers); total gets the sum over all threads.
__device__ __forceinline__ uint64_t block_exclusive_scan(uint64_t v, uint64_t& total, uint64_t* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const uint64_t incl = warp_inclusive_scan(v, lane);
  if (lane == 31) scratch[warp] = incl;
  __syncthreads();
  uint64_t before = 0, all = 0;
  for (int w = 0; w < kWarps; ++w) {
    if (w < warp) before += scratch[w];
    all += scratch[w];
  }
  __syncthreads();
  total = all;
  return before + incl - v;
}

__global__ void __launch_bounds__(kThreads, kCtasPerSm) sample_canvas_kernel(const SampleCanvasParams p) {
  extern __shared__ uint64_t seg_sum[];  // [segments]: sum of q over each segment
  __shared__ double s_dbl[kWarps];
  __shared__ uint64_t s_u64[kWarps];
  __shared__ float s_flt[kWarps];
  __shared__ int s_int[kWarps];
  __shared__ int s_sel;
  __shared__ uint64_t s_rem;

  const int pos = blockIdx.x;
  const int row = pos / p.canvas_length;
  if (p.active != nullptr && p.active[row] == 0) return;  // uniform over the block

  const int V = p.vocab;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int segs = (V + kSeg - 1) / kSeg;
  const size_t off = static_cast<size_t>(pos) * V;
  const float* raw = p.logits + off;  // may alias x: no __restrict__, no read-only loads
  float* x = p.processed + off;
  const float temperature = p.temperature[row];
  if (tid == 0) s_sel = -1;

  // Pass 1: processed = raw / temperature; max and the first index holding it. A thread meets its
  // elements in increasing order, so a strict > keeps the first.
  float mx = -INFINITY;
  int am = INT_MAX;
  for (int s = warp; s < segs; s += kWarps) {
    const int base = s * kSeg + lane;
    float v[kRows];
#pragma unroll
    for (int r = 0; r < kRows; ++r) v[r] = base + r * 32 < V ? raw[base + r * 32] : 0.f;
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      const int i = base + r * 32;
      if (i < V) {
        const float y = v[r] / temperature;
        x[i] = y;
        if (y > mx) mx = y, am = i;
      }
    }
  }
  block_argmax(mx, am, s_flt, s_int);
  if (am == INT_MAX) am = 0;  // nothing above -inf: the CPU keeps index 0

  // Pass 2: the softmax denominator, float64 over float32 terms.
  double sum = 0;
  for (int s = warp; s < segs; s += kWarps) {
    const int base = s * kSeg + lane;
    float v[kRows];
#pragma unroll
    for (int r = 0; r < kRows; ++r) v[r] = base + r * 32 < V ? x[base + r * 32] : -INFINITY;
#pragma unroll
    for (int r = 0; r < kRows; ++r) sum += static_cast<double>(expf(v[r] - mx));
  }
  sum = block_sum(sum, s_dbl);
  const float sumf = static_cast<float>(sum);
  const float inv = 1.0f / sumf;
  const float lse = mx + logf(sumf);

  // Pass 3: probabilities (optional bf16 copy), entropy, and each segment's quantised mass.
  double ent = 0;
  for (int s = warp; s < segs; s += kWarps) {
    const int base = s * kSeg + lane;
    float v[kRows];
#pragma unroll
    for (int r = 0; r < kRows; ++r) v[r] = base + r * 32 < V ? x[base + r * 32] : 0.f;
    uint64_t q = 0;
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      const int i = base + r * 32;
      if (i < V) {
        const float prob = prob_of(v[r], mx, inv);
        q += quantise(prob);
        // p = 0 adds nothing (-inf logits would make 0 * -inf = NaN); NaN still propagates.
        if (prob != 0.f) ent -= static_cast<double>(prob) * static_cast<double>(v[r] - lse);
        if (p.probs != nullptr) p.probs[off + i] = __float2bfloat16_rn(prob);
      }
    }
    for (int o = 16; o > 0; o >>= 1) q += __shfl_xor_sync(kFull, q, o);
    if (lane == 0) seg_sum[s] = q;
  }
  ent = block_sum(ent, s_dbl);  // its barriers also publish seg_sum

  // Inverse CDF: thread t owns a contiguous run of segments; an exact exclusive scan of the runs'
  // masses finds the one segment with cum_before <= T < cum_before + mass.
  const int per = (segs + kThreads - 1) / kThreads;
  const int first = min(segs, tid * per), last = min(segs, first + per);
  uint64_t mine = 0;
  for (int s = first; s < last; ++s) mine += seg_sum[s];
  uint64_t total = 0;
  uint64_t run = block_exclusive_scan(mine, total, s_u64);
  if (total > 0) {
    const double u = p.uniform[pos];
    uint64_t target = u > 0 ? __double2ull_rz(u * static_cast<double>(total)) : 0;
    if (target >= total) target = total - 1;
    for (int s = first; s < last; ++s) {
      const uint64_t next = run + seg_sum[s];
      if (target >= run && target < next) s_sel = s, s_rem = target - run;
      run = next;
    }
  }
  __syncthreads();

  if (warp == 0) {
    const int s = s_sel;
    int tok = V - 1;  // no mass at all (non-finite logits): the CPU's clamp
    if (s >= 0) {
      // Within the segment: row by row, an exact warp scan finds the first entry whose running
      // mass exceeds the remainder. rem < the segment's mass, so some row always holds it.
      const uint64_t rem = s_rem;
      const int base = s * kSeg + lane;
      uint64_t q[kRows];
#pragma unroll
      for (int r = 0; r < kRows; ++r) q[r] = base + r * 32 < V ? quantise(prob_of(x[base + r * 32], mx, inv)) : 0;
      uint64_t acc = 0;
      bool found = false;
#pragma unroll
      for (int r = 0; r < kRows; ++r) {
        const uint64_t incl = warp_inclusive_scan(q[r], lane);
        const uint64_t row_mass = __shfl_sync(kFull, incl, 31);
        if (!found && acc + row_mass > rem) {  // warp-uniform
          const unsigned hit = __ballot_sync(kFull, acc + incl > rem);
          tok = s * kSeg + r * 32 + __ffs(hit) - 1;
          found = true;
        }
        acc += row_mass;
      }
    }
    if (lane == 0) {
      p.token[pos] = tok;
      p.argmax[pos] = am;
      p.entropy[pos] = static_cast<float>(ent);
    }
  }
}

}  // namespace

cudaError_t sample_canvas(const SampleCanvasParams& p, cudaStream_t stream) {
  if (p.rows < 0 || p.canvas_length < 0) return cudaErrorInvalidValue;
  if (p.rows == 0 || p.canvas_length == 0) return cudaSuccess;
  if (p.vocab < 1 || p.vocab > kSampleMaxVocab) return cudaErrorInvalidValue;
  if (!p.logits || !p.processed || !p.temperature || !p.uniform || !p.token || !p.argmax || !p.entropy)
    return cudaErrorInvalidValue;
  const long long positions = static_cast<long long>(p.rows) * p.canvas_length;
  if (positions > INT_MAX) return cudaErrorInvalidValue;
  const size_t smem = seg_sum_bytes(p.vocab);
  sample_canvas_kernel<<<static_cast<unsigned>(positions), kThreads, smem, stream>>>(p);
  return cudaGetLastError();
}

void sample_canvas_kernel_plans(KernelPlans& out) {
  out.push_back({"sample_canvas_kernel", kThreads, static_cast<long long>(seg_sum_bytes(plan_shapes::kVocab)), kCtasPerSm,
                 "kCtasPerSm (__launch_bounds__): two positions per SM"});
}

}  // namespace dgemma::kernels
