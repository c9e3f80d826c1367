// The public C++ API (include/dgemma_rt/engine.h) over the runtime's Engine and Scheduler.
#include "dgemma_rt/engine.h"

#include <algorithm>
#include <atomic>
#include <thread>

#include "common/check.h"
#include "runtime/engine.h"
#include "runtime/scheduler.h"

namespace dgemma_rt {

namespace {

Status to_public(dgemma::RequestHandle::Status s) {
  switch (s) {
    case dgemma::RequestHandle::Status::kQueued: return Status::kQueued;
    case dgemma::RequestHandle::Status::kRunning: return Status::kRunning;
    case dgemma::RequestHandle::Status::kDone: return Status::kDone;
    case dgemma::RequestHandle::Status::kFailed: return Status::kFailed;
    case dgemma::RequestHandle::Status::kCancelled: return Status::kCancelled;
  }
  return Status::kFailed;
}

dgemma::SamplerParams to_internal(const SamplingParams& p) {
  dgemma::SamplerParams s;
  s.max_new_tokens = p.max_new_tokens;
  s.max_denoising_steps = p.max_denoising_steps;
  s.entropy_bound = p.entropy_bound;
  s.t_min = p.t_min;
  s.t_max = p.t_max;
  s.stability_threshold = p.stability_threshold;
  s.confidence_threshold = p.confidence_threshold;
  s.eos_token_id = p.eos_token_id;
  s.pad_token_id = p.pad_token_id;
  s.seed = p.seed;
  s.adaptive_stopping = p.adaptive_stopping;
  static_assert(SamplingParams::kFreePosition == dgemma::SamplerParams::kFree, "one mask value");
  if (!p.canvas_template.empty()) s.canvas_template = {p.canvas_template};
  return s;
}

}  // namespace

struct Request::State {
  std::shared_ptr<dgemma::RequestHandle> handle;
  SamplingParams params;
};

Request::Request() = default;

uint64_t Request::id() const { return state_ ? state_->handle->id() : 0; }

Status Request::status() const {
  DG_REQUIRE(state_, InvalidArgument, "empty Request (not returned by Engine::submit)");
  return to_public(state_->handle->status());
}

bool Request::finished() const { return state_ && state_->handle->finished(); }

void Request::cancel() {
  if (state_) state_->handle->cancel();
}

void Request::wait() const {
  DG_REQUIRE(state_, InvalidArgument, "empty Request (not returned by Engine::submit)");
  state_->handle->wait();
}

bool Request::wait_for(double seconds) const {
  DG_REQUIRE(state_, InvalidArgument, "empty Request (not returned by Engine::submit)");
  return state_->handle->wait_for(seconds);
}

Result Request::result() const {
  DG_REQUIRE(state_, InvalidArgument, "empty Request (not returned by Engine::submit)");
  const dgemma::GenerateResult& r = state_->handle->result();
  const SamplingParams& p = state_->params;
  Result out;
  out.new_tokens = r.new_tokens.at(0);
  out.steps_per_canvas = r.steps_per_canvas.at(0);
  out.tokens_per_forward = r.tokens_per_forward.at(0);
  out.queue_s = r.queue_s, out.prefill_s = r.prefill_s, out.denoise_s = r.denoise_s, out.total_s = r.total_s;
  // Text: up to the first EOS (or pad), at most max_new_tokens.
  bool hit = false;
  for (int32_t t : out.new_tokens) {
    const bool stop = std::find(p.eos_token_id.begin(), p.eos_token_id.end(), t) != p.eos_token_id.end() ||
                      (p.pad_token_id && t == *p.pad_token_id);
    if (stop) {
      hit = true;
      break;
    }
    out.text_tokens.push_back(t);
  }
  const bool fits = static_cast<int>(out.text_tokens.size()) <= p.max_new_tokens;
  out.stopped = r.stopped;
  out.finish_reason = (hit || r.stopped) && fits ? "stop" : "length";
  if (!fits) out.text_tokens.resize(p.max_new_tokens);
  return out;
}

struct KVCache::State {
  std::shared_ptr<dgemma::CacheSet> set;  // one row
};

KVCache::KVCache() = default;

int KVCache::tokens() const { return state_ ? state_->set->rows.at(0)->length() : 0; }

struct Engine::Impl {
  std::unique_ptr<dgemma::Engine> engine;
};

Engine::Engine(const std::string& checkpoint_dir, const EngineOptions& options) : impl_(std::make_unique<Impl>()) {
  dgemma::EngineOptions o;
  o.device = options.device;
  o.kv_cache_tokens = options.kv_cache_tokens;
  o.max_batch_size = options.max_batch_size;
  o.num_threads = options.num_threads;
  DG_REQUIRE(options.num_threads >= 0, InvalidArgument, "num_threads must be >= 0");
  const std::string& cw = options.cpu_weights;
  DG_REQUIRE(cw == "bf16" || cw == "stored" || cw == "float32", InvalidArgument,
             "cpu_weights must be 'bf16', 'stored' or 'float32', got '" << cw << "'");
  o.cpu_weights = cw == "float32" ? dgemma::CpuWeights::kFloat32
                  : cw == "stored" ? dgemma::CpuWeights::kAsStored
                                   : dgemma::CpuWeights::kBf16Dot;
  impl_->engine = std::make_unique<dgemma::Engine>(checkpoint_dir, o);
}

Engine::~Engine() {
  if (!impl_ || !impl_->engine) return;
  if (dgemma::Scheduler::on_any_scheduler_thread()) {
    // The last owner let go inside a callback, on a scheduler thread (perhaps this engine's own, which
    // cannot join itself, and which still has the request to finish): the engine stops on a thread of
    // its own, which waits for that one.
    std::thread([e = std::move(impl_->engine)]() mutable { e.reset(); }).detach();
    return;
  }
  impl_->engine.reset();
}

ModelInfo Engine::info() const {
  const dgemma::ModelConfig& c = impl_->engine->config();
  ModelInfo m;
  m.vocab_size = c.vocab_size;
  m.canvas_length = c.canvas_length;
  m.num_layers = c.num_layers;
  m.hidden_size = c.hidden_size;
  m.max_position_embeddings = c.max_position_embeddings;
  m.num_parameters = impl_->engine->num_parameters();
  return m;
}

SamplingParams Engine::default_params() const {
  const dgemma::GenerationDefaults& g = impl_->engine->generation_defaults();
  SamplingParams p;  // the reference's defaults, then the checkpoint's generation_config.json
  if (g.max_new_tokens) p.max_new_tokens = *g.max_new_tokens;
  if (g.max_denoising_steps) p.max_denoising_steps = *g.max_denoising_steps;
  if (g.entropy_bound) p.entropy_bound = *g.entropy_bound;
  if (g.t_min) p.t_min = *g.t_min;
  if (g.t_max) p.t_max = *g.t_max;
  if (g.stability_threshold) p.stability_threshold = *g.stability_threshold;
  if (g.confidence_threshold) p.confidence_threshold = *g.confidence_threshold;
  if (g.eos_token_id) p.eos_token_id = *g.eos_token_id;
  p.pad_token_id = g.pad_token_id;
  return p;
}

Request Engine::submit(const std::vector<int32_t>& prompt, const SamplingParams& params, Callbacks callbacks) {
  return submit_with(nullptr, prompt, params, std::move(callbacks));
}

Request Engine::submit(const KVCache& cache, const std::vector<int32_t>& prompt, const SamplingParams& params,
                       Callbacks callbacks) {
  DG_REQUIRE(cache.state_, InvalidArgument, "empty KVCache (not made by Engine::new_cache)");
  return submit_with(cache.state_.get(), prompt, params, std::move(callbacks));
}

KVCache Engine::new_cache() const {
  KVCache c;
  c.state_ = std::make_shared<KVCache::State>();
  c.state_->set = impl_->engine->new_cache(1);
  return c;
}

Request Engine::submit_with(const KVCache::State* cache, const std::vector<int32_t>& prompt,
                            const SamplingParams& params, Callbacks callbacks) {
  // Canvas/step counters shared by the callbacks (called one at a time, on the scheduler thread).
  struct Position {
    int canvas = 0, step = 0;
  };
  auto pos = std::make_shared<Position>();
  dgemma::GenerateCallbacks cb;
  const int L = impl_->engine->config().canvas_length;
  // StopGeneration becomes the core's Stopped (it ends the request as done).
  auto call = [](const auto& fn, const auto& arg) {
    try {
      fn(arg);
    } catch (const StopGeneration& e) {
      throw dgemma::Stopped(e.what());
    }
  };
  cb.on_step = [pos, L, call, fn = std::move(callbacks.on_step)](const int32_t* d, int, int) {
    ++pos->step;
    if (fn) call(fn, Draft{pos->canvas, pos->step, std::vector<int32_t>(d, d + L)});
  };
  cb.on_block = [pos, L, call, fn = std::move(callbacks.on_block)](const int32_t* d, int, int) {
    const int canvas = pos->canvas++;
    pos->step = 0;
    if (fn) call(fn, Block{canvas, std::vector<int32_t>(d, d + L)});
  };
  auto state = std::make_shared<Request::State>();
  state->params = params;
  std::function<void(dgemma::RequestHandle::Status)> on_done;
  if (callbacks.on_finish)
    on_done = [fn = std::move(callbacks.on_finish)](dgemma::RequestHandle::Status st) { fn(to_public(st)); };
  // Without a cache of the caller's, the request's blocks go back to the pool as it ends.
  const bool keep_cache = cache != nullptr;
  state->handle = impl_->engine->submit(cache ? cache->set : nullptr, {prompt}, to_internal(params), nullptr,
                                        std::move(cb), std::move(on_done), keep_cache);
  Request r;
  r.state_ = std::move(state);
  return r;
}

Result Engine::generate(const std::vector<int32_t>& prompt, const SamplingParams& params) {
  // Before submitting: a request nobody can wait for would run on, holding a row and KV blocks.
  DG_REQUIRE(!impl_->engine->on_scheduler_thread(), InvalidArgument,
             "generate() cannot be called inside a callback of the same engine (use submit())");
  return submit(prompt, params).result();
}

Result Engine::generate(const KVCache& cache, const std::vector<int32_t>& prompt, const SamplingParams& params) {
  DG_REQUIRE(!impl_->engine->on_scheduler_thread(), InvalidArgument,
             "generate() cannot be called inside a callback of the same engine (use submit())");
  return submit(cache, prompt, params).result();
}

Stats Engine::stats() const {
  const dgemma::SchedulerStats s = impl_->engine->scheduler_stats();
  const dgemma::BlockPool& pool = impl_->engine->pool();
  Stats out;
  out.queued_requests = s.queued_requests, out.running_requests = s.running_requests, out.active_rows = s.active_rows;
  out.decoder_passes = s.decoder_passes, out.row_steps = s.row_steps, out.committed_tokens = s.committed_tokens;
  out.completed = s.completed, out.failed = s.failed, out.cancelled = s.cancelled;
  out.kv_blocks_total = pool.total_blocks(0);
  out.kv_blocks_free = pool.free_blocks(0);
  out.kv_block_size = pool.block_size();
  return out;
}

}  // namespace dgemma_rt
