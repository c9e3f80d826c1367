#include "runtime/engine.h"

#include "backend/cpu/cpu_backend.h"
#include "common/check.h"

namespace dgemma {

namespace {

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

Engine::Engine(const std::string& dir, const EngineOptions& opts) {
  DG_REQUIRE(opts.device == "cpu", InvalidArgument,
             "device '" << opts.device << "' is not available: this build runs on the CPU only "
                        << "(the CUDA backend is not implemented yet)");
  DG_REQUIRE(opts.kv_cache_tokens > 0, InvalidArgument, "kv_cache_tokens must be positive");
  DG_REQUIRE(opts.max_batch_size > 0, InvalidArgument, "max_batch_size must be positive");
  cfg_ = load_model_config(dir);
  gen_ = load_generation_defaults(dir);
  weights_ = ModelWeights::load(dir, cfg_, opts.progress);
  backend_ = opts.make_backend ? opts.make_backend(cfg_, *weights_) : std::make_unique<CpuBackend>(cfg_, *weights_);
  DG_CHECK(backend_, "make_backend returned no backend");
  forward_ = std::make_unique<Forward>(cfg_, *backend_, opts.max_batch_size);
  const int B = opts.block_size;
  const int full_blocks = (opts.kv_cache_tokens + B - 1) / B;
  const int window_blocks = (cfg_.sliding_window - 1 + B - 1) / B + 1;
  const int sliding_blocks = opts.max_batch_size * 2 * window_blocks;
  pool_ = std::make_shared<BlockPool>(cfg_, B, full_blocks, sliding_blocks);
  forward_->allocate_kv(*pool_);
  scheduler_ = std::make_unique<Scheduler>(*forward_, cfg_, pool_, mu_, opts.max_batch_size, opts.num_threads);
}

std::shared_ptr<CacheSet> Engine::new_cache(int batch) const {
  auto c = std::make_shared<CacheSet>();
  c->storage = forward_->kv();
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
  check_free(cache);
  for (size_t r = 0; r < ids.size(); ++r)
    DG_REQUIRE(cache.rows[r]->length() + static_cast<long>(ids[r].size()) <= cfg_.max_position_embeddings,
               InvalidArgument, "row " << r << " would exceed max_position_embeddings " << cfg_.max_position_embeddings);
  std::lock_guard<std::recursive_mutex> lock(mu_);
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
  check_free(cache);
  std::vector<const SeqCache*> rows;
  for (const auto& r : cache.rows) {
    DG_REQUIRE(r->length() > 0, InvalidArgument, "the decoder needs an encoded prefix (call encode first)");
    rows.push_back(r.get());
  }
  std::vector<const float*> sc;
  if (sc_logits)
    for (size_t r = 0; r < rows.size(); ++r) sc.push_back(sc_logits + r * static_cast<size_t>(n) * cfg_.vocab_size);
  std::lock_guard<std::recursive_mutex> lock(mu_);
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
