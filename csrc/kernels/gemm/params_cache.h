// Prepared launches of the CUTLASS GEMMs: the kernel Params that CUTLASS's to_underlying_arguments
// makes on the host (TMA descriptors encoded with cuTensorMapEncode, tile scheduler set up, problem
// checked by can_implement), kept by the key they were made from, so that a call with the same
// arguments only launches. Plain C++ (no CUDA): the CUDA backend owns one (its entries go with it),
// the kernels' params structs carry a pointer to it (null: prepare every call, as before).
//
// Why an entry may outlive the buffers its pointers name: a launcher keys its Params by every input
// they are made from (kernels/gemm/cutlass_launch.cuh, each launcher says which), and by nothing
// else, so a buffer freed and another allocated at the same address for the same shape gets
// byte-identical Params; none holds a per-call workspace or device array the key does not name.
// Bounded (LRU) so that activation pointers that keep changing cannot grow it without limit.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include <memory>
#include <stdexcept>

#include "common/lru_cache.h"

namespace dgemma::kernels {

struct LaunchKey {
  const void* kernel = nullptr;  // the __global__ launched: one per CUTLASS instantiation, so one Params type
  int device = -1;
  std::array<const void*, 6> ptrs{};  // every pointer the Params are made from (operands, scales, workspace)
  std::array<int64_t, 4> dims{};      // every size they are made from (M, N, K; G)

  LaunchKey() = default;
  LaunchKey(const void* kernel_, int device_, std::initializer_list<const void*> p, std::initializer_list<int64_t> d)
      : kernel(kernel_), device(device_) {
    if (p.size() > ptrs.size() || d.size() > dims.size()) throw std::logic_error("LaunchKey: too many fields");
    size_t i = 0;
    for (const void* v : p) ptrs[i++] = v;
    i = 0;
    for (int64_t v : d) dims[i++] = v;
  }
  friend bool operator==(const LaunchKey& a, const LaunchKey& b) {
    return a.kernel == b.kernel && a.device == b.device && a.ptrs == b.ptrs && a.dims == b.dims;
  }
};

struct LaunchKeyHash {
  size_t operator()(const LaunchKey& k) const {
    uint64_t h = 1469598103934665603ull;  // FNV-1a over the fields' values
    auto mix = [&h](uint64_t v) {
      for (int i = 0; i < 8; ++i) h = (h ^ ((v >> (8 * i)) & 0xff)) * 1099511628211ull;
    };
    mix(reinterpret_cast<uintptr_t>(k.kernel));
    mix(static_cast<uint64_t>(k.device));
    for (const void* p : k.ptrs) mix(reinterpret_cast<uintptr_t>(p));
    for (int64_t d : k.dims) mix(static_cast<uint64_t>(d));
    return static_cast<size_t>(h);
  }
};

class ParamsCache {
 public:
  // A pass of the released model runs ~250 distinct GEMM launches (7 per layer, the LM head and
  // self-conditioning), more with each distinct activation shape; a Params is ~0.5-1 KB.
  static constexpr size_t kDefaultCapacity = 2048;
  explicit ParamsCache(size_t capacity = kDefaultCapacity) : lru_(capacity) {}

  // `Params` must be the type of key.kernel's parameter (the launchers in cutlass_launch.cuh
  // guarantee it: the kernel function fixes the type).
  template <class Params>
  bool find(const LaunchKey& key, Params* out) {
    std::shared_ptr<const void> v;
    if (!lru_.find(key, &v)) return false;
    *out = *static_cast<const Params*>(v.get());
    return true;
  }
  template <class Params>
  void insert(const LaunchKey& key, const Params& params) {
    lru_.insert(key, std::shared_ptr<const void>(std::make_shared<const Params>(params)));
  }
  void clear() { lru_.clear(); }
  size_t size() const { return lru_.size(); }
  size_t capacity() const { return lru_.capacity(); }

 private:
  LruCache<LaunchKey, std::shared_ptr<const void>, LaunchKeyHash> lru_;
};

}  // namespace dgemma::kernels
