// Synthetic weights for benchmarks at a real shape without a checkpoint (ModelWeights::random): value i
// of a tensor is offset + amplitude * (2u - 1), u in [0, 1) the top 24 bits of splitmix64(seed + i *
// golden ratio), computed with one correctly rounded fma. Host and device code share this header, so
// the CPU backend's float32 values and the CUDA backend's (rounded to bf16 after the same float) are
// the same model: random-weight runs can be compared across backends.
#pragma once

#include <cmath>
#include <cstdint>

#ifdef __CUDACC__
#define DG_HOST_DEVICE __host__ __device__
#else
#define DG_HOST_DEVICE
#endif

namespace dgemma::random_weights {

DG_HOST_DEVICE inline uint64_t splitmix64(uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

DG_HOST_DEVICE inline float value(uint64_t seed, uint64_t i, float amplitude, float offset) {
  const uint32_t bits = static_cast<uint32_t>(splitmix64(seed + i * 0x9e3779b97f4a7c15ull) >> 40);
  const float centred = static_cast<float>(bits) * (2.0f / 16777216.0f) - 1.0f;  // exact: 24-bit grid
#ifdef __CUDA_ARCH__
  return __fmaf_rn(amplitude, centred, offset);
#else
  return std::fma(amplitude, centred, offset);
#endif
}

// Synthetic NVFP4 (random experts in the stored format): E2M1 code of element i (all 16 codes), and
// the E4M3 block scale of block j: 0x30 + 0..7, i.e. 0.5 .. 0.9375 (never zero or NaN). The value is
// e2m1(code) * e4m3(scale) * global, global = amplitude / 6 (so |value| stays under ~amplitude).
DG_HOST_DEVICE inline uint32_t nvfp4_code(uint64_t seed, uint64_t i) {
  return static_cast<uint32_t>(splitmix64(seed + i * 0x9e3779b97f4a7c15ull) >> 60);
}
DG_HOST_DEVICE inline uint32_t nvfp4_scale(uint64_t seed, uint64_t j) {
  return 0x30u + static_cast<uint32_t>(splitmix64(~seed + j * 0x9e3779b97f4a7c15ull) >> 61);
}

// The seed of one tensor: FNV-1a of its name, mixed with the model's seed.
inline uint64_t tensor_seed(uint64_t model_seed, const char* name) {
  uint64_t h = 0xcbf29ce484222325ull;
  for (const char* c = name; *c; ++c) h = (h ^ static_cast<unsigned char>(*c)) * 0x100000001b3ull;
  return splitmix64(h ^ splitmix64(model_seed));
}

}  // namespace dgemma::random_weights
