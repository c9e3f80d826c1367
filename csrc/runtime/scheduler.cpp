#include "runtime/scheduler.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <iterator>
#include <numeric>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "common/check.h"

namespace dgemma {
namespace {

uint64_t mix(uint64_t x) {  // splitmix64 finaliser
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

uint64_t noise_key(uint64_t seed, uint64_t kind, int canvas, int step, int row) {
  uint64_t h = mix(seed ^ (kind << 56));
  h = mix(h ^ static_cast<uint64_t>(canvas));
  h = mix(h ^ static_cast<uint64_t>(step));
  return mix(h ^ static_cast<uint64_t>(row));
}

using Clock = std::chrono::steady_clock;
double seconds_since(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

}  // namespace

void SeededNoise::canvas(int canvas_index, int step, int batch, int length, int32_t* out) {
  for (int r = 0; r < batch; ++r) {
    const uint64_t k = noise_key(seed_, 1, canvas_index, step, r);
    for (int j = 0; j < length; ++j) {
      const uint64_t h = mix(k ^ static_cast<uint64_t>(j));
      out[static_cast<size_t>(r) * length + j] =
          static_cast<int32_t>((static_cast<unsigned __int128>(h) * static_cast<uint64_t>(vocab_)) >> 64);
    }
  }
}

void SeededNoise::uniform(int canvas_index, int step, int batch, int length, double* out) {
  for (int r = 0; r < batch; ++r) {
    const uint64_t k = noise_key(seed_, 2, canvas_index, step, r);
    for (int j = 0; j < length; ++j)
      out[static_cast<size_t>(r) * length + j] = static_cast<double>(mix(k ^ static_cast<uint64_t>(j)) >> 11) * 0x1.0p-53;
  }
}

void validate(const SamplerParams& p, const ModelConfig& cfg) {
  DG_REQUIRE(p.max_new_tokens > 0, InvalidArgument, "max_new_tokens must be a positive integer, got " << p.max_new_tokens);
  DG_REQUIRE(p.max_denoising_steps > 0, InvalidArgument,
             "max_denoising_steps must be a positive integer, got " << p.max_denoising_steps);
  DG_REQUIRE(std::isfinite(p.t_min) && p.t_min >= 0, InvalidArgument, "t_min must be a finite number >= 0, got " << p.t_min);
  DG_REQUIRE(std::isfinite(p.t_max) && p.t_max >= 0, InvalidArgument, "t_max must be a finite number >= 0, got " << p.t_max);
  DG_REQUIRE(p.t_max > p.t_min, InvalidArgument, "t_max must be > t_min, got t_max=" << p.t_max << " t_min=" << p.t_min);
  DG_REQUIRE(p.t_max <= kMaxTemperature, InvalidArgument,
             "t_max must be at most " << kMaxTemperature << " (temperatures are float32), got " << p.t_max);
  {
    // The first and last steps' temperatures, as Job::begin_step computes them (ratio 1 and 1 / N).
    const float highest = static_cast<float>(p.t_min) + static_cast<float>(p.t_max - p.t_min) * 1.0f;
    DG_REQUIRE(std::isfinite(highest), InvalidArgument,
               "the first denoising step's temperature t_min + (t_max - t_min) overflows float32 (t_min="
                   << p.t_min << " t_max=" << p.t_max << ")");
    const float ratio = 1.0f / static_cast<float>(p.max_denoising_steps);
    const float lowest = static_cast<float>(p.t_min) + static_cast<float>(p.t_max - p.t_min) * ratio;
    DG_REQUIRE(lowest >= kMinTemperature, InvalidArgument,
               "the last denoising step's temperature t_min + (t_max - t_min) / max_denoising_steps = "
                   << lowest << " is below " << kMinTemperature << ": logits / temperature would overflow float32");
  }
  DG_REQUIRE(std::isfinite(p.entropy_bound) && p.entropy_bound > 0, InvalidArgument,
             "entropy_bound must be a finite number > 0, got " << p.entropy_bound);
  DG_REQUIRE(p.stability_threshold >= 0, InvalidArgument,
             "stability_threshold must be an integer >= 0, got " << p.stability_threshold);
  DG_REQUIRE(std::isfinite(p.confidence_threshold) && p.confidence_threshold > 0, InvalidArgument,
             "confidence_threshold must be a finite number > 0, got " << p.confidence_threshold);
  for (int e : p.eos_token_id)
    DG_REQUIRE(e >= 0 && e < cfg.vocab_size, InvalidArgument,
               "eos_token_id " << e << " is outside the vocabulary [0, " << cfg.vocab_size << ")");
  if (p.pad_token_id)
    DG_REQUIRE(*p.pad_token_id >= 0 && *p.pad_token_id < cfg.vocab_size, InvalidArgument,
               "pad_token_id " << *p.pad_token_id << " is outside the vocabulary [0, " << cfg.vocab_size << ")");
}

// ---------------------------------------------------------------------------------------------
// Requests

RequestHandle::Status RequestHandle::status() const {
  std::lock_guard<std::mutex> lock(mu_);
  return status_;
}

bool RequestHandle::finished() const {
  const Status s = status();
  return s == Status::kDone || s == Status::kFailed || s == Status::kCancelled;
}

void RequestHandle::check_not_scheduler_thread() const {
  DG_REQUIRE(std::this_thread::get_id() != scheduler_thread_ || finished(), InvalidArgument,
             "cannot wait for a request inside a callback of the same engine "
             "(the callback runs on the thread that would have to finish it)");
}

void RequestHandle::wait() const {
  check_not_scheduler_thread();
  std::unique_lock<std::mutex> lock(mu_);
  cv_.wait(lock, [&] { return status_ != Status::kQueued && status_ != Status::kRunning; });
}

bool RequestHandle::wait_for(double seconds) const {
  check_not_scheduler_thread();
  std::unique_lock<std::mutex> lock(mu_);
  // Clamped: a huge timeout must not overflow the clock's integer nanoseconds.
  return cv_.wait_for(lock, std::chrono::duration<double>(std::min(std::max(0.0, seconds), 1e9)),
                      [&] { return status_ != Status::kQueued && status_ != Status::kRunning; });
}

const GenerateResult& RequestHandle::result() const {
  wait();
  std::lock_guard<std::mutex> lock(mu_);
  if (error_) std::rethrow_exception(error_);
  return result_;
}

std::exception_ptr RequestHandle::error() const {
  std::lock_guard<std::mutex> lock(mu_);
  return error_;
}

// One request's state: the reference's generate loop, cut at the points where the scheduler
// batches the forwards (encode what is not cached; one decoder pass per step).
struct Scheduler::Job {
  enum class Phase { kEncode, kDenoise, kDone };

  std::shared_ptr<RequestHandle> handle;
  GenerateRequest req;
  SeededNoise seeded;
  NoiseSource* noise;
  int B, L, V, N, max_canvases, thr;
  bool skip_finished;
  Phase phase = Phase::kEncode;
  bool prompt_encoded = false, have_sc = false;
  int c = 0, step = 1, n = 0;
  Clock::time_point t_submit, t_admit;
  int need_full = 0, need_sliding = 0;  // recomputed at admission
  bool counted_running = false;  // in stats_.running_requests / active_rows

  std::vector<char> finished_seq, finished_denoise, live_at_start;
  std::vector<int> passes, steps_now, active, order;
  std::vector<int32_t> canvas, argmax, fresh, sample;
  // Adaptive stopping: each row's previous argmax canvas, and for how many steps in a row (up to the
  // previous one) it has not changed. "The argmax equals each of the last thr argmaxes" is "it equals the
  // previous one, which has not changed for thr - 1 steps": O(L) per row, whatever thr is.
  std::vector<int32_t> prev_argmax;
  std::vector<int> same_run;
  std::vector<double> uni;
  std::vector<float> entropy;
  float temperature = 1.0f;
  std::vector<int32_t> lock;  // [B, L]: this canvas's locked token per position, kFree where free
  bool any_lock = false;      // this canvas has locked positions
  std::vector<int> sc_slots;  // per row, its self-conditioning state in the forward (while admitted)
  GenerateResult res;

  Job(GenerateRequest r, const ModelConfig& cfg)
      : req(std::move(r)), seeded(req.params.seed, cfg.vocab_size), noise(req.noise ? req.noise.get() : &seeded) {
    B = static_cast<int>(req.caches.size());
    L = cfg.canvas_length, V = cfg.vocab_size, N = req.params.max_denoising_steps;
    max_canvases = static_cast<int>((static_cast<long>(req.params.max_new_tokens) + L - 1) / L);
    // A canvas runs at most N steps, so its argmax can never have been stable for N or more
    // earlier steps: any threshold >= N never stops a canvas, exactly as N does. Clamping keeps
    // the count of stable steps below N, whatever the caller asked for.
    thr = std::min(req.params.stability_threshold, N);
    skip_finished = req.params.pad_token_id.has_value();
    finished_seq.assign(B, 0), finished_denoise.assign(B, 0), live_at_start.assign(B, 0);
    passes.assign(B, 0), steps_now.assign(B, 0), order.reserve(L);
    const size_t BL = static_cast<size_t>(B) * L;
    canvas.resize(BL), argmax.resize(BL), fresh.resize(BL), sample.resize(BL), uni.resize(BL), entropy.resize(BL);
    lock.assign(BL, SamplerParams::kFree);
    prev_argmax.resize(BL), same_run.assign(B, 0);
    res.new_tokens.resize(B);
    res.steps_per_canvas.resize(B);
  }

  // Sliding-window blocks row r can take from now on: its prompt, then every canvas but the last.
  int sliding_need(int r) const {
    const SeqCache& c = *req.caches[r];
    return std::max(0, c.sliding_blocks_peak(static_cast<int>(req.input_ids[r].size()), max_canvases - 1, L) -
                           c.sliding_blocks_held());
  }

  // KV blocks the whole request can need from now on (so it never fails halfway).
  void compute_needs(const BlockPool& pool) {
    need_full = need_sliding = 0;
    for (int r = 0; r < B; ++r) {
      const long final_len = req.caches[r]->length() + static_cast<long>(req.input_ids[r].size()) +
                             static_cast<long>(max_canvases - 1) * L;
      need_full += req.caches[r]->full_blocks_needed(static_cast<int>(final_len));
      need_sliding += sliding_need(r);
    }
    if (pool.total_blocks(0) == 0) need_full = 0;
    if (pool.total_blocks(1) == 0) need_sliding = 0;
  }

  void check_ids(const std::vector<int32_t>& ids) const {
    for (int32_t t : ids)
      DG_REQUIRE(t >= 0 && t < V, InvalidArgument, "noise source returned token id " << t << " outside [0, " << V << ")");
  }

  // The rows to encode before the next canvas: the prompt, then each live row's last canvas.
  void encode_inputs(std::vector<SeqCache*>& rows, std::vector<std::vector<int32_t>>& toks) const {
    for (int r = 0; r < B; ++r) {
      if (!prompt_encoded) {
        rows.push_back(req.caches[r]);
        toks.push_back(req.input_ids[r]);
      } else if (!(skip_finished && finished_seq[r])) {
        rows.push_back(req.caches[r]);
        toks.emplace_back(res.new_tokens[r].end() - L, res.new_tokens[r].end());
      }
    }
  }

  void start_canvas() {
    for (int r = 0; r < B; ++r) live_at_start[r] = !finished_seq[r];
    noise->canvas(c, 0, B, L, canvas.data());
    check_ids(canvas);
    // The template's locked tokens replace the random ones (the noise stream is drawn as without one).
    any_lock = false;
    std::fill(lock.begin(), lock.end(), SamplerParams::kFree);
    for (int r = 0; r < static_cast<int>(req.params.canvas_template.size()); ++r) {
      const std::vector<int32_t>& t = req.params.canvas_template[r];
      for (int j = 0; j < L; ++j) {
        const size_t at = static_cast<size_t>(c) * L + j;
        if (at >= t.size() || t[at] == SamplerParams::kFree) continue;
        lock[static_cast<size_t>(r) * L + j] = canvas[static_cast<size_t>(r) * L + j] = t[at];
        any_lock = true;
      }
    }
    argmax = canvas;
    std::fill(finished_denoise.begin(), finished_denoise.end(), 0);
    std::fill(steps_now.begin(), steps_now.end(), 0);
    std::fill(prev_argmax.begin(), prev_argmax.end(), -1);  // no step before a canvas's first
    std::fill(same_run.begin(), same_run.end(), 0);
    have_sc = false;
    step = 1, n = N;
    phase = Phase::kDenoise;
  }

  // The rows this step denoises, with the step's temperature and uniforms (drawn before the forward,
  // in the reference's order: this step's uniforms, then its renoising ids in end_step).
  void begin_step() {
    active.clear();
    for (int r = 0; r < B; ++r) {
      if (!finished_denoise[r] && !finished_seq[r]) passes[r]++, steps_now[r]++;
      if (!finished_denoise[r] && !(skip_finished && finished_seq[r])) active.push_back(r);
    }
    noise->uniform(c, step, B, L, uni.data());
    for (double u : uni)
      DG_REQUIRE(u >= 0.0 && u < 1.0, InvalidArgument, "noise source returned uniform " << u << " outside [0, 1)");
    // Temperature in float32 as the reference's LinearTemperatureScheduleLogitsProcessor computes it.
    const SamplerParams& p = req.params;
    const float ratio = static_cast<float>(n) / static_cast<float>(N);
    temperature = static_cast<float>(p.t_min) + static_cast<float>(p.t_max - p.t_min) * ratio;
  }

  // The decoder inputs of active row r.
  StepRow step_row(int r) const {
    StepRow s;
    s.cache = req.caches[r];
    s.canvas = canvas.data() + static_cast<size_t>(r) * L;
    s.temperature = temperature;
    s.uniform = uni.data() + static_cast<size_t>(r) * L;
    s.sc_slot = sc_slots.at(r);
    s.sc_valid = have_sc;
    s.keep_sc = n > 1;  // the last possible step of a canvas: no later step reads the state
    return s;
  }

  // Acceptance and stopping for this step from what the active rows sampled ([A, L] each); commits
  // the canvas when it is over. Returns the non-pad tokens committed.
  long end_step(const int32_t* tok, const int32_t* am, const float* ent) {
    const SamplerParams& p = req.params;
    const int A = static_cast<int>(active.size());
    if (A > 0) res.decoder_forwards++;
    noise->canvas(c, step, B, L, fresh.data());
    check_ids(fresh);
    for (int a = 0; a < A; ++a) {
      const size_t src = static_cast<size_t>(a) * L, dst = static_cast<size_t>(active[a]) * L;
      std::copy_n(tok + src, L, sample.begin() + dst);
      std::copy_n(am + src, L, argmax.begin() + dst);
      std::copy_n(ent + src, L, entropy.begin() + dst);
    }
    // Locked positions: their token is the sample, the argmax and the next step's input.
    if (any_lock)
      for (int r : active)
        for (size_t i = static_cast<size_t>(r) * L; i < static_cast<size_t>(r + 1) * L; ++i)
          if (lock[i] != SamplerParams::kFree) sample[i] = argmax[i] = canvas[i] = lock[i];
    for (int r : active) {
      const size_t base = static_cast<size_t>(r) * L;
      // Entropy-bound acceptance: accept the lowest-entropy positions while the sum of the
      // entropies before each stays within the bound (cumsum accumulates in float64 on the CPU).
      // Only free positions take part: a locked one is accepted by definition, and its entropy (the
      // model's uncertainty about a token it is not asked for) must not use up the free ones' budget.
      order.clear();
      for (int j = 0; j < L; ++j)
        if (lock[base + j] == SamplerParams::kFree) order.push_back(j);
      std::stable_sort(order.begin(), order.end(), [&](int x, int y) { return entropy[base + x] < entropy[base + y]; });
      double cum = 0;
      for (int j : order) {
        const float e = entropy[base + j];
        cum += e;
        const bool accept = static_cast<float>(cum) - e <= static_cast<float>(p.entropy_bound);
        canvas[base + j] = accept ? sample[base + j] : fresh[base + j];
      }
      if (order.empty()) {  // every position locked: nothing to denoise, the canvas is done after one step
        finished_denoise[r] = 1;
        continue;
      }
      if (p.adaptive_stopping) {
        const bool same = std::equal(argmax.begin() + base, argmax.begin() + base + L, prev_argmax.begin() + base);
        same_run[r] = same ? std::min(same_run[r], thr) + 1 : 0;  // earlier steps in a row with this argmax (capped)
        std::copy_n(argmax.begin() + base, L, prev_argmax.begin() + base);
        const bool stable = same_run[r] >= thr;
        // Confidence over the free positions.
        std::sort(order.begin(), order.end());  // summed in position order, as without a template
        float esum = 0;
        for (int j : order) esum += entropy[base + j];
        const bool confident = esum / static_cast<float>(order.size()) < p.confidence_threshold;
        if (stable && confident) finished_denoise[r] = 1;
      }
    }
    have_sc = true;
    notify(req.callbacks.on_step, argmax.data());  // Stopped: this canvas is still denoised to its end
    bool any_left = false;
    for (int r = 0; r < B; ++r) any_left |= !finished_denoise[r] && !(skip_finished && finished_seq[r]);
    ++step, --n;
    if (any_left && n >= 1) return 0;
    return commit_canvas();
  }

  // Commit the argmax canvas; EOS handling as the reference's _finalize_canvas.
  long commit_canvas() {
    const SamplerParams& p = req.params;
    std::vector<int32_t> block = argmax;
    std::vector<char> eos_now(B, 0);
    auto is_eos = [&](int32_t t) { return std::find(p.eos_token_id.begin(), p.eos_token_id.end(), t) != p.eos_token_id.end(); };
    for (int r = 0; r < B; ++r)
      for (int j = 0; j < L && !eos_now[r]; ++j) eos_now[r] = is_eos(block[static_cast<size_t>(r) * L + j]);
    long committed = 0;
    for (int r = 0; r < B; ++r) {
      int32_t* row = block.data() + static_cast<size_t>(r) * L;
      if (p.pad_token_id) {
        const int32_t pad = *p.pad_token_id;
        if (finished_seq[r]) {
          std::fill(row, row + L, pad);
        } else if (eos_now[r]) {
          bool seen = false;
          for (int j = 0; j < L; ++j) {
            const bool e = is_eos(row[j]);
            if (seen) row[j] = pad;
            seen |= e;
          }
        }
        // A template's locked tokens are never padded away: after a row's EOS its free positions
        // become pad, its locked ones keep their token (without a template nothing changes).
        if (any_lock)
          for (int j = 0; j < L; ++j) {
            const int32_t t = lock[static_cast<size_t>(r) * L + j];
            if (t != SamplerParams::kFree) row[j] = t;
          }
        committed += std::count_if(row, row + L, [&](int32_t t) { return t != pad; });
      } else {
        committed += L;
      }
      res.new_tokens[r].insert(res.new_tokens[r].end(), row, row + L);
      if (live_at_start[r]) res.steps_per_canvas[r].push_back(steps_now[r]);
      finished_seq[r] |= eos_now[r];
    }
    notify(req.callbacks.on_block, block.data());
    const bool all_done = std::all_of(finished_seq.begin(), finished_seq.end(), [](char f) { return f != 0; });
    if (all_done && !res.stopped) committed += commit_template_tail();
    if (all_done || res.stopped || c + 1 >= max_canvases) {
      phase = Phase::kDone;
    } else {
      ++c;
      phase = Phase::kEncode;
    }
    return committed;
  }

  // Every row has ended at EOS (with a pad token) but the template still locks positions in later
  // canvases: those canvases are committed without denoising, pad at the free positions and the
  // locked tokens in place, up to the last canvas the template reaches (within max_new_tokens).
  // Returns the non-pad tokens committed. Without a template it commits nothing.
  long commit_template_tail() {
    const SamplerParams& p = req.params;
    if (!p.pad_token_id || p.canvas_template.empty()) return 0;
    int last = c;  // the last canvas holding a locked position
    for (const std::vector<int32_t>& t : p.canvas_template)
      for (size_t at = static_cast<size_t>(c + 1) * L; at < t.size(); ++at)
        if (t[at] != SamplerParams::kFree) last = std::max(last, static_cast<int>(at / L));
    last = std::min(last, max_canvases - 1);
    long committed = 0;
    std::vector<int32_t> block(static_cast<size_t>(B) * L);
    for (int cc = c + 1; cc <= last; ++cc) {
      std::fill(block.begin(), block.end(), *p.pad_token_id);
      for (int r = 0; r < static_cast<int>(p.canvas_template.size()); ++r) {
        const std::vector<int32_t>& t = p.canvas_template[r];
        for (int j = 0; j < L; ++j) {
          const size_t at = static_cast<size_t>(cc) * L + j;
          if (at < t.size() && t[at] != SamplerParams::kFree) block[static_cast<size_t>(r) * L + j] = t[at];
        }
      }
      for (int r = 0; r < B; ++r) {
        const int32_t* row = block.data() + static_cast<size_t>(r) * L;
        committed += std::count_if(row, row + L, [&](int32_t t) { return t != *p.pad_token_id; });
        res.new_tokens[r].insert(res.new_tokens[r].end(), row, row + L);
      }
      c = cc;
      notify(req.callbacks.on_block, block.data());
      if (res.stopped) break;
    }
    return committed;
  }

  // Calls a callback with a [B, L] canvas. Stopped from it ends the request once the canvas being
  // denoised is committed; any other exception fails the request.
  void notify(const std::function<void(const int32_t*, int, int)>& fn, const int32_t* tokens) {
    if (!fn) return;
    try {
      fn(tokens, B, L);
    } catch (const Stopped&) {
      res.stopped = true;
    }
  }

  void finalize() {
    res.tokens_per_forward.resize(B);
    for (int r = 0; r < B; ++r) {
      long valid = static_cast<long>(res.new_tokens[r].size());
      if (req.params.pad_token_id)
        valid = std::count_if(res.new_tokens[r].begin(), res.new_tokens[r].end(),
                              [&](int32_t t) { return t != *req.params.pad_token_id; });
      res.tokens_per_forward[r] = passes[r] > 0 ? static_cast<double>(valid) / passes[r] : 0.0;
    }
    res.total_s = seconds_since(t_submit);
  }

  void release(Forward& forward, std::recursive_mutex& forward_mu) {
    for (int slot : sc_slots) forward.release_sc(slot);
    sc_slots.clear();
    for (SeqCache* c : req.caches) {
      c->release_reservation();
      if (!req.keep_cache) {
        // Under the forward lock, as every change of a claimed row: KVCache.layer_kv reads under it.
        std::lock_guard<std::recursive_mutex> lock(forward_mu);
        c->clear();
      }
      c->unclaim();
    }
  }
};

// ---------------------------------------------------------------------------------------------
// The scheduler

Scheduler::Scheduler(Forward& forward, const ModelConfig& cfg, std::shared_ptr<BlockPool> pool,
                     std::recursive_mutex& forward_mu, int max_rows, int num_threads)
    : forward_(forward), cfg_(cfg), pool_(std::move(pool)), forward_mu_(forward_mu), max_rows_(max_rows),
      num_threads_(num_threads) {
  DG_REQUIRE(max_rows > 0, InvalidArgument, "max_batch_size must be positive");
  DG_CHECK(forward.sc_slots() >= max_rows, "fewer self-conditioning slots than rows");
  thread_ = std::thread([this] { loop(); });
}

Scheduler::~Scheduler() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_ = true;
  }
  cv_.notify_all();
  if (thread_.joinable()) thread_.join();
}

std::shared_ptr<RequestHandle> Scheduler::submit(GenerateRequest req) {
  validate(req.params, cfg_);
  const int B = static_cast<int>(req.caches.size());
  const int L = cfg_.canvas_length;
  DG_REQUIRE(B > 0 && static_cast<int>(req.input_ids.size()) == B, InvalidArgument,
             "a request needs one cache row per input row (got " << B << " and " << req.input_ids.size() << ")");
  DG_REQUIRE(B <= max_rows_, InvalidArgument,
             "a batch of " << B << " rows is larger than max_batch_size " << max_rows_ << " (raise max_batch_size)");
  for (size_t r = 0; r < req.input_ids.size(); ++r) {
    DG_REQUIRE(!req.input_ids[r].empty(), InvalidArgument, "input_ids row " << r << " is empty");
    DG_REQUIRE(&req.caches[r]->pool() == pool_.get(), InvalidArgument, "this KVCache belongs to another Engine");
  }
  const long canvases = (static_cast<long>(req.params.max_new_tokens) + L - 1) / L;
  DG_REQUIRE(canvases * L <= cfg_.max_position_embeddings, InvalidArgument,
             "max_new_tokens " << req.params.max_new_tokens << " exceeds max_position_embeddings "
                               << cfg_.max_position_embeddings);
  if (!req.params.canvas_template.empty()) {
    DG_REQUIRE(static_cast<int>(req.params.canvas_template.size()) == B, InvalidArgument,
               "canvas_template has " << req.params.canvas_template.size() << " rows but input_ids has " << B);
    for (int r = 0; r < B; ++r) {
      const std::vector<int32_t>& t = req.params.canvas_template[r];
      DG_REQUIRE(static_cast<long>(t.size()) <= req.params.max_new_tokens, InvalidArgument,
                 "canvas_template row " << r << " has " << t.size() << " positions, more than max_new_tokens "
                                        << req.params.max_new_tokens);
      for (size_t j = 0; j < t.size(); ++j) {
        DG_REQUIRE(t[j] == SamplerParams::kFree || (t[j] >= 0 && t[j] < cfg_.vocab_size), InvalidArgument,
                   "canvas_template row " << r << " position " << j << " holds " << t[j]
                                          << ": a token id in [0, " << cfg_.vocab_size << ") or -1 (free)");
        // As in a prompt (Engine::check_input): a locked token is encoded into the cache with its canvas.
        DG_REQUIRE(!cfg_.image_token_id || t[j] != *cfg_.image_token_id, InvalidArgument,
                   "canvas_template row " << r << " position " << j << " holds the image token " << t[j]
                                          << ": this engine is text-only for now");
      }
    }
  }
  // Claim the rows before anything reads their state: a row in use (a running request, an encode on
  // another thread) is changed by its owner meanwhile, under the forward lock this thread does not
  // hold. A refused request leaves them free again.
  struct Claims {
    std::vector<SeqCache*> rows;
    size_t held = 0;
    bool kept = false;
    ~Claims() {
      if (!kept)
        for (size_t r = 0; r < held; ++r) rows[r]->unclaim();
    }
  } claims{req.caches};
  while (claims.held < claims.rows.size() && claims.rows[claims.held]->try_claim()) ++claims.held;
  DG_REQUIRE(claims.held == claims.rows.size(), InvalidArgument,
             "this KVCache is in use by another request that has not finished");
  for (int r = 0; r < B; ++r) {
    const long final_len = req.caches[r]->length() + static_cast<long>(req.input_ids[r].size()) + canvases * L;
    DG_REQUIRE(final_len <= cfg_.max_position_embeddings, InvalidArgument,
               "prompt plus " << canvases * L << " new tokens (" << final_len << ") exceeds max_position_embeddings "
                              << cfg_.max_position_embeddings);
  }
  auto job = std::make_unique<Job>(std::move(req), cfg_);
  job->compute_needs(*pool_);
  DG_REQUIRE(job->need_full <= pool_->total_blocks(0), ResourceError,
             "KV cache pool too small: this request needs " << static_cast<long>(job->need_full) * pool_->block_size()
                 << " tokens of full-attention cache but the pool holds "
                 << static_cast<long>(pool_->total_blocks(0)) * pool_->block_size() << "; raise kv_cache_tokens");
  DG_REQUIRE(job->need_sliding <= pool_->total_blocks(1), ResourceError,
             "KV cache pool too small for " << B << " rows of sliding-window cache; raise max_batch_size");
  job->t_submit = Clock::now();
  job->handle = std::make_shared<RequestHandle>();
  job->handle->scheduler_thread_ = thread_.get_id();
  auto handle = job->handle;
  bool stopping = false;
  {
    std::lock_guard<std::mutex> lock(mu_);
    stopping = stop_;
    if (!stopping) {
      handle->id_ = next_id_++;
      queue_.push_back(std::move(job));
      stats_.queued_requests = static_cast<int>(queue_.size());
    }
  }
  claims.kept = true;  // queued (or released just below): the job's release() unclaims them from here on
  if (stopping) {  // released outside mu_: the forward lock is never taken while mu_ is held
    job->release(forward_, forward_mu_);
    DG_THROW(Cancelled, "the engine is shutting down");
  }
  cv_.notify_all();
  return handle;
}

SchedulerStats Scheduler::stats() const {
  SchedulerStats st;
  {
    std::lock_guard<std::mutex> lock(mu_);
    st = stats_;
  }
  const Forward::GraphStats g = forward_.graph_stats();
  st.captured_passes = g.captured, st.replayed_passes = g.replayed, st.capture_failures = g.capture_failures;
  return st;
}

void Scheduler::finish(Job& job, std::exception_ptr error) {
  job.release(forward_, forward_mu_);
  job.finalize();
  job.phase = Job::Phase::kDone;
  RequestHandle::Status st = RequestHandle::Status::kDone;
  if (error) {
    st = RequestHandle::Status::kFailed;
    try {
      std::rethrow_exception(error);
    } catch (const Cancelled&) {
      st = RequestHandle::Status::kCancelled;
    } catch (...) {
    }
  }
  // What the caller gave us goes before the caller can see the end, so that once it has the result
  // nothing of the request is held here any more (its caches' blocks included).
  job.req.callbacks = GenerateCallbacks{};
  job.req.noise.reset();
  job.noise = &job.seeded;
  job.req.keep_alive.reset();
  job.req.caches.clear();
  if (job.req.on_done) {
    auto done = std::move(job.req.on_done);
    job.req.on_done = nullptr;
    try {
      done(st);
    } catch (...) {  // a failing notification must not take the scheduler down
    }
  }
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (st == RequestHandle::Status::kDone) stats_.completed++;
    if (st == RequestHandle::Status::kFailed) stats_.failed++;
    if (st == RequestHandle::Status::kCancelled) stats_.cancelled++;
    // Out of the running counts before the handle says it is over, so that stats read after
    // result() returned never show it running.
    if (job.counted_running) {
      stats_.running_requests--;
      stats_.active_rows -= job.B;
      job.counted_running = false;
    }
  }
  RequestHandle& h = *job.handle;
  {
    std::lock_guard<std::mutex> lock(h.mu_);
    h.status_ = st;
    h.error_ = error;
    if (!error) h.result_ = std::move(job.res);
  }
  h.cv_.notify_all();
}

void Scheduler::admit() {
  std::vector<std::unique_ptr<Job>> cancelled, refused;
  bool stopping = false;
  {
    std::lock_guard<std::mutex> lock(mu_);
    stopping = stop_;
    int rows = 0;
    for (const auto& j : running_) rows += j->B;
    for (auto it = queue_.begin(); it != queue_.end();) {
      if ((*it)->handle->cancel_requested() || stopping) {
        cancelled.push_back(std::move(*it));
        it = queue_.erase(it);
      } else {
        ++it;
      }
    }
    // First come, first served: the head waits for room rather than being overtaken.
    while (!queue_.empty()) {
      Job& j = *queue_.front();
      if (rows + j.B > max_rows_) break;
      j.compute_needs(*pool_);
      if (!pool_->reserve(j.need_full, j.need_sliding)) {
        if (running_.empty()) {  // nothing running will free blocks: waiting would be forever
          refused.push_back(std::move(queue_.front()));
          queue_.pop_front();
          continue;
        }
        break;
      }
      // Hand the reservation to the rows, each its own share.
      for (int r = 0; r < j.B; ++r) {
        SeqCache& c = *j.req.caches[r];
        const long final_len = c.length() + static_cast<long>(j.req.input_ids[r].size()) +
                               static_cast<long>(j.max_canvases - 1) * j.L;
        c.add_reservation(pool_->total_blocks(0) ? c.full_blocks_needed(static_cast<int>(final_len)) : 0,
                          pool_->total_blocks(1) ? j.sliding_need(r) : 0);
      }
      // Rows take their self-conditioning slots (the row bound above guarantees there are enough).
      for (int r = 0; r < j.B; ++r) j.sc_slots.push_back(forward_.acquire_sc());
      j.t_admit = Clock::now();
      j.res.queue_s = seconds_since(j.t_submit);
      {
        std::lock_guard<std::mutex> hl(j.handle->mu_);
        j.handle->status_ = RequestHandle::Status::kRunning;
      }
      rows += j.B;
      j.counted_running = true;
      running_.push_back(std::move(queue_.front()));
      queue_.pop_front();
    }
    stats_.queued_requests = static_cast<int>(queue_.size());
    stats_.running_requests = static_cast<int>(running_.size());
    stats_.active_rows = rows;
  }
  for (auto& j : cancelled)
    finish(*j, std::make_exception_ptr(Cancelled(stopping ? "the engine shut down before the request ran"
                                                       : "the request was cancelled before it started")));
  for (auto& j : refused) {
    // Refused only while nothing runs: every block not free is held by a cache no request is using.
    const long bs = pool_->block_size();
    const bool full_short = j->need_full > pool_->available_blocks(0);
    std::ostringstream msg;
    msg << "KV cache pool too small: this request needs " << static_cast<long>(j->need_full) * bs
        << " tokens of full-attention cache and " << j->need_sliding << " sliding-window blocks but only "
        << static_cast<long>(pool_->available_blocks(0)) * bs << " tokens and " << pool_->available_blocks(1)
        << " blocks are free; the rest (" << static_cast<long>(pool_->total_blocks(0) - pool_->available_blocks(0)) * bs
        << " tokens, " << pool_->total_blocks(1) - pool_->available_blocks(1)
        << " sliding blocks) is held by caches no request is running: kept results' past_key_values, "
           "Request objects and encode() caches. Drop those, or pass keep_cache=False, or raise "
        << (full_short ? "kv_cache_tokens" : "max_batch_size (the sliding pool holds that many rows at their peak)");
    finish(*j, std::make_exception_ptr(ResourceError(msg.str())));
  }
}

void Scheduler::run_encodes() {
  std::vector<Job*> jobs;
  std::vector<SeqCache*> rows;
  std::vector<std::vector<int32_t>> toks;
  for (auto& j : running_) {
    if (j->phase != Job::Phase::kEncode) continue;
    const size_t before = rows.size();
    j->encode_inputs(rows, toks);
    if (rows.size() > before) jobs.push_back(j.get());
    else j->prompt_encoded = true;  // every row already finished: nothing to add to the caches
  }
  if (!rows.empty()) {
    try {
      std::lock_guard<std::recursive_mutex> lock(forward_mu_);
      forward_.encode(rows, toks);
    } catch (...) {
      for (Job* j : jobs) finish(*j, std::current_exception());
      return;
    }
    std::lock_guard<std::mutex> lock(mu_);
    stats_.encoder_passes++;
  }
  for (Job* j : jobs) {
    j->res.encoder_forwards++;
    if (!j->prompt_encoded) j->res.prefill_s = seconds_since(j->t_admit);
    j->prompt_encoded = true;
  }
  for (auto& j : running_) {
    if (j->phase != Job::Phase::kEncode) continue;
    try {
      j->start_canvas();
    } catch (...) {
      finish(*j, std::current_exception());
    }
  }
}

void Scheduler::run_step() {
  std::vector<Job*> jobs;
  std::vector<StepRow> rows;
  std::vector<size_t> offset;
  const int L = cfg_.canvas_length;
  for (auto& j : running_) {
    if (j->phase != Job::Phase::kDenoise) continue;
    try {
      j->begin_step();
    } catch (...) {
      finish(*j, std::current_exception());
      continue;
    }
    jobs.push_back(j.get());
    offset.push_back(rows.size());
    for (int r : j->active) rows.push_back(j->step_row(r));
  }
  if (jobs.empty()) return;
  const auto t0 = Clock::now();
  const size_t P = rows.size() * static_cast<size_t>(L);
  std::vector<int32_t> token(P), argmax(P);
  std::vector<float> entropy(P);
  if (!rows.empty()) {
    try {
      std::lock_guard<std::recursive_mutex> lock(forward_mu_);
      forward_.step(rows, L, StepOutput{token.data(), argmax.data(), entropy.data()});
    } catch (...) {
      for (Job* j : jobs) finish(*j, std::current_exception());
      return;
    }
  }
  const double decode_s = seconds_since(t0);
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (!rows.empty()) stats_.decoder_passes++;
    stats_.row_steps += static_cast<long long>(rows.size());
  }
  for (size_t i = 0; i < jobs.size(); ++i) {
    Job& j = *jobs[i];
    const auto t1 = Clock::now();
    long committed = 0;
    const size_t at = offset[i] * L;
    try {
      committed = j.end_step(token.data() + at, argmax.data() + at, entropy.data() + at);
    } catch (...) {
      finish(j, std::current_exception());
      continue;
    }
    j.res.denoise_s += decode_s + seconds_since(t1);
    if (committed) {
      std::lock_guard<std::mutex> lock(mu_);
      stats_.committed_tokens += committed;
    }
    if (j.phase == Job::Phase::kDone) finish(j, nullptr);
  }
}

namespace {
thread_local bool t_scheduler_thread = false;
}

bool Scheduler::on_any_scheduler_thread() { return t_scheduler_thread; }

void Scheduler::loop() {
  t_scheduler_thread = true;
#ifdef _OPENMP
  if (num_threads_ > 0) omp_set_num_threads(num_threads_);
#endif
  for (;;) {
    bool stopping = false;
    {
      std::unique_lock<std::mutex> lock(mu_);
      cv_.wait(lock, [&] { return stop_ || !queue_.empty() || !running_.empty(); });
      if (stop_ && queue_.empty() && running_.empty()) return;
      stopping = stop_;
    }
    admit();
    for (auto& j : running_)
      if (j->phase != Job::Phase::kDone && (stopping || j->handle->cancel_requested()))
        finish(*j, std::make_exception_ptr(Cancelled(stopping ? "the engine shut down while the request ran"
                                                           : "the request was cancelled")));
    run_encodes();
    run_step();
    // Finished jobs are destroyed after mu_ is let go: a job may hold the last reference to its handle,
    // whose error may be a Python callback's exception, freed with the GIL; and a thread holding the GIL
    // may be waiting for mu_ (stats()).
    std::vector<std::unique_ptr<Job>> ended;
    {
      std::lock_guard<std::mutex> lock(mu_);
      const auto done = std::stable_partition(running_.begin(), running_.end(),
                                              [](const std::unique_ptr<Job>& j) { return j->phase != Job::Phase::kDone; });
      std::move(done, running_.end(), std::back_inserter(ended));
      running_.erase(done, running_.end());
      int rows = 0;
      for (const auto& j : running_) rows += j->B;
      stats_.running_requests = static_cast<int>(running_.size());
      stats_.active_rows = rows;
    }
  }
}

}  // namespace dgemma
