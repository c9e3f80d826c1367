// The engine: a loaded model, its backend and its KV block pool. Usable from C++ without Python.
#pragma once

#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "backend/backend.h"
#include "model/config.h"
#include "model/weights.h"
#include "runtime/kv_cache.h"
#include "runtime/scheduler.h"

namespace dgemma {

struct EngineOptions {
  std::string device = "cpu";
  int kv_cache_tokens = 16384;  // full-attention cache, in tokens, shared by all rows and live caches
  int max_batch_size = 8;       // rows whose sliding-window cache fits at once
  int block_size = 16;
  ModelWeights::Progress progress;
};

// A batch of per-row caches (what the Python API calls a KVCache / past_key_values).
struct CacheSet {
  std::vector<std::unique_ptr<SeqCache>> rows;
  std::vector<SeqCache*> ptrs() const;
};

class Engine {
 public:
  Engine(const std::string& dir, const EngineOptions& opts);

  const ModelConfig& config() const { return cfg_; }
  const GenerationDefaults& generation_defaults() const { return gen_; }
  size_t num_parameters() const { return weights_->num_parameters; }
  const BlockPool& pool() const { return *pool_; }

  std::shared_ptr<CacheSet> new_cache(int batch) const;
  // Validates ids (range, image tokens, emptiness) and throws InvalidArgument.
  void check_input(const std::vector<std::vector<int32_t>>& ids) const;

  void encode(CacheSet& cache, const std::vector<std::vector<int32_t>>& ids);
  // logits [rows, n, vocab]
  void decode(const CacheSet& cache, const std::vector<int32_t>& canvas, int n, const float* sc_logits, float* logits);
  GenerateResult generate(CacheSet& cache, const std::vector<std::vector<int32_t>>& ids, const SamplerParams& params,
                          NoiseSource* noise, const GenerateCallbacks& callbacks);

 private:
  ModelConfig cfg_;
  GenerationDefaults gen_;
  std::unique_ptr<ModelWeights> weights_;
  std::unique_ptr<Backend> backend_;
  std::shared_ptr<BlockPool> pool_;
  std::recursive_mutex mu_;  // one forward at a time per engine (re-entrant for callbacks)
};

}  // namespace dgemma
