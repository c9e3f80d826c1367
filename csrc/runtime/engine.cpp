#include "runtime/engine.h"

#include <algorithm>
#include <climits>
#include <cmath>
#include <thread>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "backend/registry.h"
#include "common/check.h"
#include "runtime/memory_limit.h"

namespace dgemma {

namespace {

// What the KV pools and the per-step buffers of a config and options take, in bytes, computed
// before any of it is allocated. The workspaces are an estimate of the largest buffers of a
// decoder pass over every row (logits, self-conditioning logits and probabilities per canvas
// position, plus the activations of a layer).
struct MemoryPlan {
  double full_pool = 0, sliding_pool = 0, workspace = 0;
  double one_row = 0;  // one row, one canvas of full cache: the least the config needs at all
  double sliding_one_row = 0, workspace_one_row = 0;
  long long full_blocks = 0, sliding_blocks = 0;
  double total() const { return full_pool + sliding_pool + workspace; }
};

MemoryPlan plan_memory(const ModelConfig& cfg, const EngineOptions& o) {
  MemoryPlan m;
  double full_tf = 0, sliding_tf = 0;  // floats per token over each group's layers
  for (const LayerSpec& l : cfg.layers) (l.sliding ? sliding_tf : full_tf) += double(l.num_kv_heads) * l.head_dim;
  const double B = o.block_size, L = cfg.canvas_length;
  const double per_token_full = 2 * 4 * full_tf, per_token_sliding = 2 * 4 * sliding_tf;  // K and V, float32
  m.full_blocks = (static_cast<long long>(o.kv_cache_tokens) + o.block_size - 1) / o.block_size;
  // Per batch row: a running row's peak while it commits a canvas (its kept window plus the canvas's
  // blocks, SeqCache::sliding_blocks_peak), and one more window for a cache kept after its call (a
  // result's past_key_values, an encode() cache). A single request always fits: a new turn's long
  // prompt on a kept cache peaks at two windows.
  const long long window_blocks = SeqCache::sliding_window_blocks(cfg.sliding_window, o.block_size);
  const long long canvas_blocks = std::min<long long>(window_blocks, (cfg.canvas_length + o.block_size - 1) / o.block_size);
  const long long sliding_row = 2 * window_blocks + canvas_blocks;
  m.sliding_blocks = sliding_tf > 0 ? static_cast<long long>(o.max_batch_size) * sliding_row : 0;
  m.full_pool = double(m.full_blocks) * B * per_token_full;
  m.sliding_pool = double(m.sliding_blocks) * B * per_token_sliding;
  int max_hd = 0;
  for (const LayerSpec& l : cfg.layers) max_hd = std::max(max_hd, l.head_dim);
  const double per_position = 4.0 * (3.0 * cfg.vocab_size + (2.0 * cfg.top_k_experts + 10) * cfg.hidden_size +
                                     2.0 * cfg.intermediate_size + 3.0 * cfg.top_k_experts * cfg.moe_intermediate_size +
                                     2.0 * cfg.num_heads * max_hd);
  m.workspace_one_row = L * per_position;
  m.workspace = o.max_batch_size * m.workspace_one_row;
  m.sliding_one_row = sliding_tf > 0 ? double(sliding_row) * B * per_token_sliding : 0;
  m.one_row = m.sliding_one_row + std::ceil(L / B) * B * per_token_full + m.workspace_one_row;
  return m;
}

void check_memory(const std::string& dir, const ModelConfig& cfg, const EngineOptions& o) {
  const MemoryPlan m = plan_memory(cfg, o);
  const MemoryLimit lim = memory_limit();
  const double limit = static_cast<double>(lim.bytes);
  DG_REQUIRE(m.one_row <= limit, CheckpointError,
             printable(dir, 400) << "/config.json asks for more memory than this process may use: "
                                 << "a single batch row needs "
                 << format_bytes(m.one_row) << " (sliding-window KV cache for sliding_window " << cfg.sliding_window
                 << ": " << format_bytes(m.sliding_one_row) << "; step buffers for canvas_length " << cfg.canvas_length
                 << " x vocab_size " << cfg.vocab_size << ": " << format_bytes(m.workspace_one_row) << ") but "
                 << lim.source << " allows " << format_bytes(limit));
  DG_REQUIRE(m.total() <= limit, InvalidArgument,
             "kv_cache_tokens " << o.kv_cache_tokens << " and max_batch_size " << o.max_batch_size << " need "
                 << format_bytes(m.total()) << " (full-attention KV pool " << format_bytes(m.full_pool)
                 << ", sliding-window KV pool " << format_bytes(m.sliding_pool) << " for sliding_window "
                 << cfg.sliding_window << ", step buffers " << format_bytes(m.workspace) << ") but " << lim.source
                 << " allows " << format_bytes(limit) << ": lower kv_cache_tokens or max_batch_size");
  // Slots (block * block_size + offset) are int32 in the caches and the kernels: a wrapped one is negative, and
  // the K/V write drops it without a fault.
  DG_REQUIRE(m.full_blocks * o.block_size <= INT_MAX && m.sliding_blocks * o.block_size <= INT_MAX, InvalidArgument,
             "kv_cache_tokens " << o.kv_cache_tokens << " / max_batch_size " << o.max_batch_size
                                << " give more KV slots than the pool can count (2^31 - 1)");
}

void check_owner(const CacheSet& cache, const BlockPool* pool) {
  for (const auto& r : cache.rows)
    DG_REQUIRE(&r->pool() == pool, InvalidArgument, "this KVCache belongs to another Engine");
}

void check_free(const CacheSet& cache) {
  for (const auto& r : cache.rows)
    DG_REQUIRE(!r->claimed(), InvalidArgument, "this KVCache is in use by a request that has not finished");
}

}  // namespace

std::vector<SeqCache*> CacheSet::ptrs() const {
  std::vector<SeqCache*> out;
  for (const auto& r : rows) out.push_back(r.get());
  return out;
}

void CacheSet::layer_kv(int layer, int row, std::vector<float>& k, std::vector<float>& v, int& tokens) const {
  DG_REQUIRE(row >= 0 && row < static_cast<int>(rows.size()), InvalidArgument, "row " << row << " out of range");
  const SeqCache& s = *rows[row];
  DG_REQUIRE(layer >= 0 && layer < s.pool().num_layers(), InvalidArgument, "layer " << layer << " out of range");
  std::unique_lock<std::recursive_mutex> lock;
  if (forward_mutex) lock = std::unique_lock<std::recursive_mutex>(*forward_mutex);
  // A running request owns the row: refused. One that claims it after this check changes it only under
  // the forward lock held here (its passes, and the clear() of a cache it does not keep).
  DG_REQUIRE(!s.claimed(), InvalidArgument, "this KVCache is in use by a request that has not finished");
  SeqCache::BlockTable t;
  const int group = s.pool().group_of(layer);
  s.table(group, t);
  std::vector<int32_t> slots;
  for (int pos = t.start; pos < t.length; ++pos) slots.push_back(s.slot(group, pos));
  const KvStorage::Layer& L = storage->layer(layer);
  const size_t tf = static_cast<size_t>(L.kv_heads) * L.head_dim;
  tokens = static_cast<int>(slots.size());
  k.resize(slots.size() * tf);
  v.resize(slots.size() * tf);
  storage->read(layer, slots, k.data(), v.data());
}

int max_num_threads() {
#ifdef _OPENMP
  const int procs = omp_get_num_procs();
#else
  const int procs = static_cast<int>(std::thread::hardware_concurrency());
#endif
  return std::max(16, 4 * std::max(1, procs));
}

void validate(const EngineOptions& opts) {
  if (!opts.make_backend) check_device(opts.device);
  DG_REQUIRE(opts.kv_cache_tokens > 0, InvalidArgument, "kv_cache_tokens must be positive, got " << opts.kv_cache_tokens);
  DG_REQUIRE(opts.max_batch_size > 0 && opts.max_batch_size <= kMaxBatchSize, InvalidArgument,
             "max_batch_size must be in [1, " << kMaxBatchSize << "], got " << opts.max_batch_size);
  DG_REQUIRE(opts.block_size > 0 && opts.block_size <= 4096, InvalidArgument, "block_size must be in [1, 4096]");
  const int max_threads = max_num_threads();
  DG_REQUIRE(opts.num_threads >= 0 && opts.num_threads <= max_threads, InvalidArgument,
             "num_threads must be in [0, " << max_threads << "] (0: all cores; at most 4 per CPU available, at least 16), got "
                                           << opts.num_threads);
}

void check_checkpoint(const std::string& dir, const EngineOptions& opts) {
  validate(opts);
  const ModelConfig cfg = load_model_config(dir);
  load_generation_defaults(dir, cfg.vocab_size);
  check_memory(dir, cfg, opts);
  ModelWeights::check(dir, cfg);
}

Engine::Engine(const std::string& dir, const EngineOptions& opts) {
  validate(opts);
  cfg_ = load_model_config(dir);
  gen_ = load_generation_defaults(dir, cfg_.vocab_size);
  check_memory(dir, cfg_, opts);  // before the weights, the pools and the workspaces take any of it
  // Only the CPU backend (and backends brought by the caller) compute on the host views; another
  // backend reads the checkpoint's tensors as stored and keeps its own copy.
  const bool on_host = opts.make_backend || backend_uses_host_weights(device_kind(opts.device));
  const HostF32 host = !on_host ? HostF32::kNone
                       : opts.cpu_weights == CpuWeights::kFloat32 ? HostF32::kAll
                                                                  : HostF32::kWhereFree;
  weights_ = opts.random_weights ? ModelWeights::random(cfg_, *opts.random_weights, host, opts.random_nvfp4_experts)
                                 : ModelWeights::load(dir, cfg_, opts.progress, host);
  weights_->progress = opts.progress;  // for the backend's upload phase
  backend_ = opts.make_backend ? opts.make_backend(cfg_, *weights_) : make_backend(opts.device, cfg_, *weights_,
                                                                                opts.cpu_weights == CpuWeights::kBf16Dot);
  weights_->progress = nullptr;        // not called again: the engine outlives the caller's callback
  DG_CHECK(backend_, "make_backend returned no backend");
  forward_ = std::make_unique<Forward>(cfg_, *backend_, opts.max_batch_size);
  const MemoryPlan plan = plan_memory(cfg_, opts);
  pool_ = std::make_shared<BlockPool>(cfg_, opts.block_size, static_cast<int>(plan.full_blocks),
                                      static_cast<int>(plan.sliding_blocks));
  forward_->allocate_kv(*pool_);
  scheduler_ = std::make_unique<Scheduler>(*forward_, cfg_, pool_, *mu_, opts.max_batch_size, opts.num_threads);
}

void Engine::set_profiling(bool decoder, bool encoder) {
  std::lock_guard<std::recursive_mutex> lock(*mu_);  // between passes
  forward_->set_profiling(decoder, encoder);
}

std::vector<OpTime> Engine::take_profile() {
  std::lock_guard<std::recursive_mutex> lock(*mu_);
  return backend_->take_profile();
}

std::shared_ptr<CacheSet> Engine::new_cache(int batch) const {
  // encode / denoise_logits run all of a cache's rows in one pass (the scheduler's batches stop at
  // max_batch_size); the attention kernels' grids take at most 65535 rows.
  DG_REQUIRE(batch >= 1 && batch <= kMaxBatchSize, InvalidArgument,
             "a batch of " << batch << " rows: one call takes 1 to " << kMaxBatchSize << " rows");
  auto c = std::make_shared<CacheSet>();
  c->storage = forward_->kv();
  c->forward_mutex = mu_;
  for (int i = 0; i < batch; ++i) c->rows.push_back(std::make_unique<SeqCache>(pool_));
  return c;
}

void Engine::check_input(const std::vector<std::vector<int32_t>>& ids) const {
  DG_REQUIRE(!ids.empty(), InvalidArgument, "input_ids is an empty batch");
  for (size_t r = 0; r < ids.size(); ++r) {
    DG_REQUIRE(!ids[r].empty(), InvalidArgument, "input_ids row " << r << " is empty");
    for (int32_t t : ids[r]) {
      DG_REQUIRE(t >= 0 && t < cfg_.vocab_size, InvalidArgument,
                 "token id " << t << " in row " << r << " is outside the vocabulary [0, " << cfg_.vocab_size << ")");
      DG_REQUIRE(!cfg_.image_token_id || t != *cfg_.image_token_id, InvalidArgument,
                 "row " << r << " contains the image token " << t << ": this engine is text-only for now");
    }
  }
}

void Engine::encode(CacheSet& cache, const std::vector<std::vector<int32_t>>& ids) {
  check_input(ids);
  DG_REQUIRE(cache.rows.size() == ids.size(), InvalidArgument,
             "the cache has " << cache.rows.size() << " rows but input_ids has " << ids.size());
  check_owner(cache, pool_.get());
  std::lock_guard<std::recursive_mutex> lock(*mu_);
  for (size_t r = 0; r < ids.size(); ++r)
    DG_REQUIRE(cache.rows[r]->length() + static_cast<long>(ids[r].size()) <= cfg_.max_position_embeddings,
               InvalidArgument, "row " << r << " would exceed max_position_embeddings " << cfg_.max_position_embeddings);
  // The rows are claimed while they grow, as a request claims its rows: a request submitted meanwhile
  // (it claims outside this lock) is refused instead of being admitted on a length that changes under it.
  // Taken under the lock, so a second encode on the same cache waits for this one, then claims.
  struct Claims {
    const CacheSet& cache;
    size_t n = 0;
    ~Claims() {
      for (size_t i = 0; i < n; ++i) cache.rows[i]->unclaim();
    }
  } claims{cache};
  while (claims.n < cache.rows.size() && cache.rows[claims.n]->try_claim()) ++claims.n;
  DG_REQUIRE(claims.n == cache.rows.size(), InvalidArgument, "this KVCache is in use by a request that has not finished");
  forward_->encode(cache.ptrs(), ids);
}

void Engine::decode(const CacheSet& cache, const std::vector<int32_t>& canvas, int n, const float* sc_logits,
                    float* logits) {
  DG_REQUIRE(n > 0 && canvas.size() == cache.rows.size() * static_cast<size_t>(n), InvalidArgument,
             "canvas must have shape [" << cache.rows.size() << ", n] with n > 0");
  for (int32_t t : canvas)
    DG_REQUIRE(t >= 0 && t < cfg_.vocab_size, InvalidArgument,
               "canvas token id " << t << " is outside the vocabulary [0, " << cfg_.vocab_size << ")");
  check_owner(cache, pool_.get());
  std::lock_guard<std::recursive_mutex> lock(*mu_);
  check_free(cache);  // under the lock, as in encode
  std::vector<const SeqCache*> rows;
  for (const auto& r : cache.rows) {
    DG_REQUIRE(r->length() > 0, InvalidArgument, "the decoder needs an encoded prefix (call encode first)");
    // The canvas sits at positions length() .. length() + n - 1, as encode's tokens would.
    DG_REQUIRE(r->length() + static_cast<long>(n) <= cfg_.max_position_embeddings, InvalidArgument,
               "a canvas of " << n << " after " << r->length() << " cached tokens would exceed max_position_embeddings "
                              << cfg_.max_position_embeddings);
    rows.push_back(r.get());
  }
  std::vector<const float*> sc;
  if (sc_logits)
    for (size_t r = 0; r < rows.size(); ++r) sc.push_back(sc_logits + r * static_cast<size_t>(n) * cfg_.vocab_size);
  forward_->logits(rows, canvas.data(), n, sc, logits);
}

std::shared_ptr<RequestHandle> Engine::submit(std::shared_ptr<CacheSet> cache,
                                              const std::vector<std::vector<int32_t>>& ids, const SamplerParams& params,
                                              std::shared_ptr<NoiseSource> noise, GenerateCallbacks callbacks,
                                              std::function<void(RequestStatus)> on_done, bool keep_cache) {
  check_input(ids);
  if (!cache) cache = new_cache(static_cast<int>(ids.size()));
  DG_REQUIRE(cache->rows.size() == ids.size(), InvalidArgument,
             "past_key_values has " << cache->rows.size() << " rows but input_ids has " << ids.size());
  check_owner(*cache, pool_.get());
  GenerateRequest req;
  req.caches = cache->ptrs();
  req.keep_alive = cache;
  req.input_ids = ids;
  req.params = params;
  req.noise = std::move(noise);
  req.callbacks = std::move(callbacks);
  req.on_done = std::move(on_done);
  req.keep_cache = keep_cache;
  return scheduler_->submit(std::move(req));
}

GenerateResult Engine::generate(std::shared_ptr<CacheSet> cache, const std::vector<std::vector<int32_t>>& ids,
                                const SamplerParams& params, std::shared_ptr<NoiseSource> noise,
                                GenerateCallbacks callbacks) {
  DG_REQUIRE(!scheduler_->on_scheduler_thread(), InvalidArgument,
             "generate() cannot be called inside an on_step/on_block callback of the same engine (use submit())");
  auto h = submit(std::move(cache), ids, params, std::move(noise), std::move(callbacks));
  return h->result();
}

}  // namespace dgemma
