// The engine: a loaded model, its backend and its KV block pool. Usable from C++ without Python.
#pragma once

#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include "backend/backend.h"
#include "model/config.h"
#include "model/forward.h"
#include "model/weights.h"
#include "runtime/kv_cache.h"
#include "runtime/scheduler.h"

namespace dgemma {

// How the CPU backend keeps the weight matrices. kAsStored: as the checkpoint stores them, read from its
// memory map and converted to float32 per tile inside the GEMMs (a BF16 checkpoint takes half the
// memory of float32, NVFP4 experts about a seventh). kFloat32: expanded to float32 once at load (more
// memory, no per-call conversion). Both give the same results; F32 checkpoints are used in place from
// the map either way. kBf16Dot: as stored, and the BF16 matrices (all but the MoE router) multiplied
// with the CPU's BF16 dot products (AVX512-BF16) on activations rounded to bf16: about twice as fast,
// not the float32 bits (cpu::WeightMat::bf16_dot); kAsStored on a CPU without AVX512-BF16. kBf16Dot is
// the default (issue 14: BF16 weights on the CPU's BF16 units where it has them); kAsStored is the
// float32 reference the parity tests pin. Other backends ignore it.
enum class CpuWeights : uint8_t { kAsStored, kFloat32, kBf16Dot };

struct EngineOptions {
  std::string device = "cpu";
  CpuWeights cpu_weights = CpuWeights::kBf16Dot;
  int kv_cache_tokens = 16384;  // full-attention cache, in tokens, shared by all rows and live caches
  int max_batch_size = 8;       // rows whose sliding-window cache fits at once
  int block_size = 16;
  int num_threads = 0;          // CPU threads of the scheduler thread (0: all cores / OMP_NUM_THREADS)
  ModelWeights::Progress progress;
  // A seed: random weights at config.json's shape instead of reading any safetensors
  // (ModelWeights::random; benchmarks at a real shape without a checkpoint on disk).
  std::optional<uint64_t> random_weights;
  bool random_nvfp4_experts = false;  // with random_weights: the MoE experts in synthetic NVFP4
  // Makes the backend (default: the CPU backend for device "cpu"). For embedders and tests that bring
  // their own op set; the engine checks that it implements every op the forward needs.
  std::function<std::unique_ptr<Backend>(const ModelConfig&, const ModelWeights&)> make_backend;
};

// Limits of the options (checked by validate(), before anything is loaded).
constexpr int kMaxBatchSize = 1024;
// The most CPU threads an engine may use: 4 per CPU available to the process, at least 16.
// More only oversubscribes the cores, and thousands can make the OpenMP runtime abort.
int max_num_threads();
// Throws InvalidArgument naming the option that is out of range.
void validate(const EngineOptions& opts);
// What the Engine constructor checks before it reads a weight, without loading anything: the
// options, config.json and generation_config.json, the memory the config and the options imply,
// the safetensors headers, and every tensor's presence, dtype and shape. Throws what the
// constructor would (CheckpointError for the checkpoint, InvalidArgument for the options). For
// tools that read a checkpoint another way first (load-time quantization).
void check_checkpoint(const std::string& dir, const EngineOptions& opts);

// A batch of per-row caches (what the Python API calls a KVCache / past_key_values): block ids in
// the engine's pool, and the backend storage they point into.
struct CacheSet {
  std::vector<std::unique_ptr<SeqCache>> rows;
  std::shared_ptr<const KvStorage> storage;
  // The engine's forward lock: layer_kv copies out between passes, never during one (a GPU backend's
  // copy waits for the engine's stream, which a pass being captured as a graph must not see). Kept
  // alive here, so a cache still copies out after its engine is gone.
  std::shared_ptr<std::recursive_mutex> forward_mutex;
  std::vector<SeqCache*> ptrs() const;
  // K and V of one layer and row as float32 [tokens, kv_heads * head_dim] (copied out of the
  // backend's storage): every cached token on full layers, the window on sliding layers. Refused
  // (InvalidArgument) while a request that has not finished uses the row.
  void layer_kv(int layer, int row, std::vector<float>& k, std::vector<float>& v, int& tokens) const;
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
  // Queues a request with the continuous-batching scheduler and returns at once. cache: the rows'
  // caches (their earlier turns), held until the request ends; noise: null for the seeded default.
  std::shared_ptr<RequestHandle> submit(std::shared_ptr<CacheSet> cache, const std::vector<std::vector<int32_t>>& ids,
                                        const SamplerParams& params, std::shared_ptr<NoiseSource> noise = nullptr,
                                        GenerateCallbacks callbacks = {}, std::function<void(RequestStatus)> on_done = {},
                                        bool keep_cache = true);
  // submit() and wait: many threads may call it at once, and their requests share decoder passes.
  GenerateResult generate(std::shared_ptr<CacheSet> cache, const std::vector<std::vector<int32_t>>& ids,
                          const SamplerParams& params, std::shared_ptr<NoiseSource> noise = nullptr,
                          GenerateCallbacks callbacks = {});
  SchedulerStats scheduler_stats() const { return scheduler_->stats(); }
  int max_batch_size() const { return scheduler_->max_rows(); }

  // Per-op profiling (backend.h): from the next pass on, the backend times the ops of decoder steps
  // (decoder) and of encoder passes (encoder); take_profile() hands out the totals since the last
  // take. Throws Unsupported when the backend cannot profile. Profiled steps run without CUDA graphs.
  void set_profiling(bool decoder, bool encoder = false);
  std::vector<OpTime> take_profile();
  // What the backend has allocated (weights on a GPU, KV cache, workspaces), live and at its peak.
  MemoryStats memory_stats() const { return backend_->memory_stats(); }
  bool on_scheduler_thread() const { return scheduler_->on_scheduler_thread(); }

 private:
  ModelConfig cfg_;
  GenerationDefaults gen_;
  std::unique_ptr<ModelWeights> weights_;
  std::unique_ptr<Backend> backend_;
  std::unique_ptr<Forward> forward_;
  std::shared_ptr<BlockPool> pool_;
  std::shared_ptr<std::recursive_mutex> mu_ = std::make_shared<std::recursive_mutex>();  // one forward at a time
  std::unique_ptr<Scheduler> scheduler_;  // last: stopped before what it uses goes
};

}  // namespace dgemma
