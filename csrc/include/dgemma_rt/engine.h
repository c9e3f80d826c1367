// dgemma_rt: the embeddable C++ API. One header, no Python: load a DiffusionGemma checkpoint, submit
// requests from any number of threads (they are batched continuously), receive each denoising
// step's draft, each committed canvas and the completion through callbacks, cancel, continue a
// conversation on its KV cache (KVCache), read stats.
//
//   dgemma_rt::Engine engine("/path/to/checkpoint");
//   dgemma_rt::SamplingParams p = engine.default_params();
//   p.max_new_tokens = 256;
//   dgemma_rt::Result r = engine.generate({2, 651, 1234}, p);   // blocking
//
//   dgemma_rt::Callbacks cb;
//   cb.on_step = [](const dgemma_rt::Draft& d) { /* d.tokens: canvas d.canvas after step d.step */ };
//   dgemma_rt::Request req = engine.submit(prompt, p, cb);      // returns at once
//   req.cancel();                                               // from any thread
//   dgemma_rt::Result r2 = req.result();                        // waits; throws if it failed
//
//   dgemma_rt::KVCache chat = engine.new_cache();              // multi-turn: each turn encodes
//   dgemma_rt::Result t1 = engine.generate(chat, turn1, p);    // only its own tokens
//
// Link with the static library the Python package installs (dgemma_rt/lib/libdgemma_core.a) and
// OpenMP (-fopenmp); see README "Embedding the C++ API".
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

namespace dgemma_rt {

// Every error the engine raises is a std::runtime_error with a readable message (bad checkpoint, bad
// argument, KV pool too small, cancelled), or std::bad_alloc when memory runs out. An exception thrown
// by one of your on_step/on_block callbacks fails its request, and result() rethrows it as thrown,
// except StopGeneration.
using Error = std::runtime_error;

// Thrown by an on_step/on_block callback to end its request early, as done (not failed or cancelled):
// the canvas being denoised is still finished and committed (thrown from on_block: the canvas just
// committed is the last). result() then returns normally, with Result::stopped set. Stop strings,
// token budgets.
struct StopGeneration : std::runtime_error {
  StopGeneration() : std::runtime_error("stopped by a callback") {}
  using std::runtime_error::runtime_error;
};

struct EngineOptions {
  std::string device = "cpu";   // "cpu", or "cuda" / "cuda:N" once dgemma::cuda::register_backend() ran
  int kv_cache_tokens = 16384;  // full-attention KV pool, in tokens, shared by all requests
  int max_batch_size = 8;       // requests (rows) denoised together
  int num_threads = 0;          // CPU threads (0: all cores, or OMP_NUM_THREADS)
  // How the CPU backend multiplies BF16 weights: "bf16" (the CPU's BF16 dot products where it has
  // AVX512-BF16, else as "stored"; results then depend on the CPU), "stored" (float32 arithmetic: the
  // float32 reference results on every CPU) or "float32" (expanded at load; the same results as
  // "stored"). Other devices ignore it. README "Weights on the CPU".
  std::string cpu_weights = "bf16";
};

// The sampler's parameters. Engine::default_params() fills them from the checkpoint's
// generation_config.json (and the reference's defaults).
struct SamplingParams {
  int max_new_tokens = 256;  // rounded up to whole canvases
  int max_denoising_steps = 48;
  double entropy_bound = 0.1;
  double t_min = 0.4;
  double t_max = 0.8;
  int stability_threshold = 1;
  double confidence_threshold = 0.005;
  std::vector<int> eos_token_id;
  std::optional<int> pad_token_id;
  uint64_t seed = 0;
  bool adaptive_stopping = true;  // false: every canvas runs exactly max_denoising_steps steps
  // Template canvases (infilling, fixed layouts): token ids laid over the new canvases in order,
  // kFreePosition where the engine generates; a locked position keeps its token (empty: none), even
  // after an EOS: then the free positions become pad and the locked ones stay, up to the last canvas
  // the template reaches (README "Templates and infilling").
  std::vector<int32_t> canvas_template;
  static constexpr int32_t kFreePosition = -1;
};

struct Draft {
  int canvas;                   // 0-based canvas index
  int step;                     // 1-based denoising step within the canvas
  std::vector<int32_t> tokens;  // argmax canvas after this step (canvas_length ids)
};

struct Block {
  int canvas;
  std::vector<int32_t> tokens;  // the committed canvas (after the first EOS: pad, but template-locked tokens stay)
};

enum class Status { kQueued, kRunning, kDone, kFailed, kCancelled };

struct Result {
  std::vector<int32_t> new_tokens;  // every committed canvas, as generated (pad after EOS, locked tokens kept)
  std::vector<int32_t> text_tokens;  // new tokens up to the first EOS/pad, cut at max_new_tokens
  // "stop": text_tokens end where the request stopped, at its first EOS or pad token (a pad the model
  // made or a template locked) or where a callback threw StopGeneration (`stopped`: the end of the
  // canvases committed), within max_new_tokens of the start or right after them; "length": text_tokens
  // were cut at max_new_tokens.
  std::string finish_reason;
  bool stopped = false;  // a callback ended the request with StopGeneration
  std::vector<int> steps_per_canvas;  // decoder passes spent on each canvas
  double tokens_per_forward = 0;
  double queue_s = 0, prefill_s = 0, denoise_s = 0, total_s = 0;
};

// Called on the engine's scheduler thread, between denoising steps: keep them short. Waiting for an
// unfinished request of the same engine inside them (wait(), result(), generate()) throws Error, since it
// could never end; submit() is fine, and so is letting go of the last reference to the Engine.
struct Callbacks {
  std::function<void(const Draft&)> on_step;
  std::function<void(const Block&)> on_block;
  // Once, when the request ends in any way (done, failed, cancelled), before result() returns.
  // What it throws is ignored.
  std::function<void(Status)> on_finish;
};

class Request {
 public:
  Request();
  uint64_t id() const;
  Status status() const;
  bool finished() const;
  void cancel();                        // leaves at the next step (or the queue, at once)
  void wait() const;
  bool wait_for(double seconds) const;  // true once finished
  Result result() const;                // waits; throws Error if it failed or was cancelled
                                        // (a callback's own exception as thrown)

 private:
  friend class Engine;
  struct State;
  std::shared_ptr<State> state_;
};

// A conversation's KV cache (the Python API's KVCache): the tokens encoded so far, in the engine's KV
// pool, so that the next turn encodes only its own tokens. Engine::new_cache() makes an empty one;
// each submit()/generate() given it encodes its prompt after what the cache holds and extends the
// cache in place, also when the request fails or is cancelled (it then holds what that request
// encoded before it stopped; that cannot be undone, so a turn that must be retryable starts from a
// fresh cache). The cache holds the prompt and every committed canvas except the last (the reference
// never encodes the last canvas), and none from the canvas that holds an EOS on (a template's
// locked canvases after it neither): it holds the first tokens() - tokens_before - prompt.size()
// tokens of Result::new_tokens, and the next turn's prompt starts with the rest (without a
// template: the last ModelInfo::canvas_length tokens). One request at a time may use a cache
// (submit() refuses a second while the first has not finished); copies share it, and its blocks go
// back to the pool when the last copy is gone, even after the Engine is.
class KVCache {
 public:
  KVCache();  // empty: refused by submit(); Engine::new_cache() makes a usable one
  // Tokens encoded so far (the position the next prompt starts at); 0 for an empty handle.
  int tokens() const;
  explicit operator bool() const { return static_cast<bool>(state_); }

 private:
  friend class Engine;
  struct State;
  std::shared_ptr<State> state_;
};

struct Stats {
  int queued_requests = 0, running_requests = 0, active_rows = 0;
  long long decoder_passes = 0, row_steps = 0, committed_tokens = 0;
  long long completed = 0, failed = 0, cancelled = 0;
  int kv_blocks_total = 0, kv_blocks_free = 0, kv_block_size = 0;  // full-attention pool
};

struct ModelInfo {
  int vocab_size = 0, canvas_length = 0, num_layers = 0, hidden_size = 0, max_position_embeddings = 0;
  size_t num_parameters = 0;
};

class Engine {
 public:
  // Loads and validates the checkpoint (config.json, model.safetensors[.index.json]); throws Error.
  explicit Engine(const std::string& checkpoint_dir, const EngineOptions& options = {});
  // Cancels what is still running. Inside one of its own callbacks (the last std::shared_ptr let go
  // there) the engine stops on a thread of its own, after that callback returns.
  ~Engine();
  Engine(const Engine&) = delete;
  Engine& operator=(const Engine&) = delete;

  ModelInfo info() const;
  SamplingParams default_params() const;

  // Queues one request (prompt token ids) and returns at once; throws Error for one that can
  // never run (bad ids or parameters, larger than the KV pool).
  Request submit(const std::vector<int32_t>& prompt, const SamplingParams& params, Callbacks callbacks = {});
  // submit() and wait.
  Result generate(const std::vector<int32_t>& prompt, const SamplingParams& params);

  // Multi-turn: an empty KVCache of this engine, and submit()/generate() continuing one (prompt: the
  // tokens not yet in the cache). A cache of another Engine, or an empty handle, is refused (Error).
  KVCache new_cache() const;
  Request submit(const KVCache& cache, const std::vector<int32_t>& prompt, const SamplingParams& params,
                 Callbacks callbacks = {});
  Result generate(const KVCache& cache, const std::vector<int32_t>& prompt, const SamplingParams& params);

  Stats stats() const;

 private:
  Request submit_with(const KVCache::State* cache, const std::vector<int32_t>& prompt, const SamplingParams& params,
                      Callbacks callbacks);
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace dgemma_rt
