// The block-diffusion generate loop (the reference's DiffusionGemmaGenerationMixin.generate), native,
// with continuous batching: every request is a job whose rows run in lock step exactly as the
// reference's batched generate does (encode what is not cached, denoise a canvas with the linear
// temperature schedule, entropy-bound acceptance, renoising, stable-and-confident stopping, commit
// the argmax canvas, repeat), and one scheduler thread runs the denoising steps of every admitted
// job in shared decoder passes. Jobs join and leave between steps; each keeps its own canvas, step
// counter, temperature schedule, stopping state and KV blocks.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <exception>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <thread>
#include <vector>

#include "model/config.h"
#include "model/forward.h"
#include "runtime/kv_cache.h"

namespace dgemma {

struct SamplerParams {
  int max_new_tokens = 256;
  int max_denoising_steps = 48;
  double entropy_bound = 0.1;
  double t_min = 0.4;
  double t_max = 0.8;
  int stability_threshold = 1;
  double confidence_threshold = 0.005;
  std::vector<int> eos_token_id;  // empty: no EOS stopping
  std::optional<int> pad_token_id;
  uint64_t seed = 0;
  bool adaptive_stopping = true;
  // Template canvases: empty, or per row a sequence laid over that row's new canvases in order
  // (position c * canvas_length + j of the sequence is position j of canvas c), kFree where the
  // position is denoised as usual, a token id where it is locked to that token. A locked position
  // holds its token from the first step and in the committed canvas, is never renoised, counts as
  // accepted and is left out of the entropy-bound budget and of the confidence mean (see
  // Job::end_step). Rows may have templates of different lengths (an empty one: no template).
  // EOS stopping never pads a locked position: after a row's first EOS its free positions become
  // pad and its locked ones keep their tokens, and the canvases the template reaches are committed
  // even when every row has ended (without denoising; Job::commit_canvas, commit_template_tail).
  std::vector<std::vector<int32_t>> canvas_template;
  static constexpr int32_t kFree = -1;
};

// Throws InvalidArgument for what the reference's validate() rejects (and a bit more).
void validate(const SamplerParams& p, const ModelConfig& cfg);

// Randomness of the sampler. The default is counter-based (keyed by seed, canvas, step, row and
// position), so a seed gives the same output on every run, from any thread, alone or batched
// with other requests.
class NoiseSource {
 public:
  virtual ~NoiseSource() = default;
  // New canvas / renoise ids in [0, vocab): out[batch * length].
  virtual void canvas(int canvas_index, int step, int batch, int length, int32_t* out) = 0;
  // Uniforms in [0, 1) for inverse-CDF sampling: out[batch * length].
  virtual void uniform(int canvas_index, int step, int batch, int length, double* out) = 0;
};

class SeededNoise final : public NoiseSource {
 public:
  SeededNoise(uint64_t seed, int vocab) : seed_(seed), vocab_(vocab) {}
  void canvas(int canvas_index, int step, int batch, int length, int32_t* out) override;
  void uniform(int canvas_index, int step, int batch, int length, double* out) override;

 private:
  uint64_t seed_;
  int vocab_;
};

// Either may throw Stopped to end the request, done, with the canvas it is on as its last.
struct GenerateCallbacks {
  // Each denoising step's argmax canvas [batch, canvas_length].
  std::function<void(const int32_t*, int, int)> on_step;
  // Each committed canvas after EOS/pad handling [batch, canvas_length].
  std::function<void(const int32_t*, int, int)> on_block;
};

struct GenerateResult {
  std::vector<std::vector<int32_t>> new_tokens;     // per row: the committed canvases
  std::vector<double> tokens_per_forward;           // per row
  std::vector<std::vector<int>> steps_per_canvas;   // per row: decoder passes for each canvas it was live in
  // queue_s: submitted -> admitted; prefill_s: admitted -> prompt encoded; denoise_s: the decoder
  // steps this request took part in (shared with the other rows of those passes); total_s: submitted -> done.
  double queue_s = 0, prefill_s = 0, denoise_s = 0, total_s = 0;
  int decoder_forwards = 0, encoder_forwards = 0;
  bool stopped = false;  // a callback ended the request (Stopped)
};

enum class RequestStatus { kQueued, kRunning, kDone, kFailed, kCancelled };

// One generate call: rows (one SeqCache each, possibly holding earlier turns) and their uncached tokens.
struct GenerateRequest {
  std::vector<SeqCache*> caches;
  std::shared_ptr<void> keep_alive;  // owner of the caches, held until the request is done
  std::vector<std::vector<int32_t>> input_ids;
  SamplerParams params;
  std::shared_ptr<NoiseSource> noise;  // null: SeededNoise(params.seed)
  GenerateCallbacks callbacks;         // called on the scheduler thread, between steps
  // When the request ends, with how, just before its handle says so (scheduler thread).
  std::function<void(RequestStatus)> on_done;
  bool keep_cache = true;              // false: the caches are cleared (blocks back to the pool) at the end
};

// The caller's side of a submitted request.
class RequestHandle {
 public:
  using Status = RequestStatus;

  uint64_t id() const { return id_; }
  Status status() const;
  bool finished() const;
  // Asks the scheduler to drop the request at the next step boundary (or at once if still queued).
  // Its KV reservation goes back to the pool; the caches keep the tokens committed so far.
  void cancel() { cancel_.store(true); }
  bool cancel_requested() const { return cancel_.load(); }
  // Waiting from inside a callback of the same engine throws InvalidArgument (it could never end).
  void wait() const;
  bool wait_for(double seconds) const;  // true once finished
  // Waits, then returns the result or rethrows the request's error (Cancelled when cancelled).
  const GenerateResult& result() const;
  // The request's error once it has ended (null while it runs and after a success). Never waits for
  // more than the handle's own lock.
  std::exception_ptr error() const;
  // True on the scheduler thread of the engine that runs this request (inside its callbacks),
  // where waiting for any unfinished request of that engine could never end.
  bool on_scheduler_thread() const { return std::this_thread::get_id() == scheduler_thread_; }

 private:
  friend class Scheduler;
  void check_not_scheduler_thread() const;
  uint64_t id_ = 0;
  std::thread::id scheduler_thread_;
  mutable std::mutex mu_;
  mutable std::condition_variable cv_;
  Status status_ = Status::kQueued;
  GenerateResult result_;
  std::exception_ptr error_;
  std::atomic<bool> cancel_{false};
};

struct SchedulerStats {
  int queued_requests = 0, running_requests = 0, active_rows = 0;
  long long decoder_passes = 0, encoder_passes = 0;  // shared forwards run so far
  long long row_steps = 0;                           // rows denoised, summed over passes
  long long committed_tokens = 0;                    // non-pad tokens committed
  long long completed = 0, failed = 0, cancelled = 0;
  // Decoder passes captured as a graph, and run from one (the capturing pass included): the rest
  // launched their ops one by one (model/forward.h; 0 on a backend that cannot capture). A failed
  // capture turns capturing off for the engine (its step runs op by op).
  long long captured_passes = 0, replayed_passes = 0, capture_failures = 0;
};

class Scheduler {
 public:
  // forward_mu is held around every forward pass (the engine's direct encode/decode take it too).
  // max_rows bounds the rows denoised together (each holds one of the forward's self-conditioning
  // slots while admitted); num_threads sets the scheduler thread's OpenMP threads (0: the process
  // default).
  Scheduler(Forward& forward, const ModelConfig& cfg, std::shared_ptr<BlockPool> pool, std::recursive_mutex& forward_mu,
            int max_rows, int num_threads);
  ~Scheduler();  // fails what is still queued or running with Cancelled and joins the thread
  Scheduler(const Scheduler&) = delete;
  Scheduler& operator=(const Scheduler&) = delete;

  // Checks the request (throws InvalidArgument / ResourceError for one that can never run) and queues it.
  std::shared_ptr<RequestHandle> submit(GenerateRequest req);
  SchedulerStats stats() const;
  int max_rows() const { return max_rows_; }
  // True inside callbacks: waiting for a request there would wait for the thread doing the waiting.
  bool on_scheduler_thread() const { return std::this_thread::get_id() == thread_.get_id(); }
  // True on the thread of any engine's scheduler (where dropping the last reference to an engine
  // would make it join itself).
  static bool on_any_scheduler_thread();

 private:
  struct Job;
  void loop();
  void admit();
  void run_encodes();
  void run_step();
  void finish(Job& job, std::exception_ptr error);

  Forward& forward_;
  const ModelConfig& cfg_;
  std::shared_ptr<BlockPool> pool_;
  std::recursive_mutex& forward_mu_;
  const int max_rows_;
  const int num_threads_;

  mutable std::mutex mu_;  // queue_, running counters, stats_, stop_
  std::condition_variable cv_;
  std::deque<std::unique_ptr<Job>> queue_;
  std::vector<std::unique_ptr<Job>> running_;  // only touched by the scheduler thread
  SchedulerStats stats_;
  uint64_t next_id_ = 1;
  bool stop_ = false;
  std::thread thread_;
};

}  // namespace dgemma
