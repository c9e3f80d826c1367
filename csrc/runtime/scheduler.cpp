#include "runtime/scheduler.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <numeric>

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

// What sampling one canvas position yields.
struct Sampled {
  int32_t token;
  int32_t argmax;
  float entropy;
};

// raw: soft-capped logits; writes processed = raw / temperature (the next step's self-conditioning
// input). Inverse-CDF sampling in float64 over float32 probabilities, entropy as
// torch.distributions.Categorical computes it.
Sampled sample_position(const float* raw, float* processed, int V, float temperature, double u,
                        std::vector<float>& ex, std::vector<double>& cdf) {
  float mx = -INFINITY;
  int32_t am = 0;
  for (int v = 0; v < V; ++v) {
    const float p = raw[v] / temperature;
    processed[v] = p;
    if (p > mx) mx = p, am = v;
  }
  float* e = ex.data();
  for (int v = 0; v < V; ++v) e[v] = std::exp(processed[v] - mx);
  double sum = 0;
  for (int v = 0; v < V; ++v) sum += e[v];
  const float inv = 1.0f / static_cast<float>(sum);
  const float lse = mx + std::log(static_cast<float>(sum));
  double c = 0, ent = 0;
  for (int v = 0; v < V; ++v) {
    const float prob = e[v] * inv;
    c += prob;
    cdf[v] = c;
    ent -= static_cast<double>(prob) * (processed[v] - lse);
  }
  const double target = u * cdf[V - 1];
  int32_t tok = static_cast<int32_t>(std::upper_bound(cdf.begin(), cdf.begin() + V, target) - cdf.begin());
  tok = std::min(tok, V - 1);
  return {tok, am, static_cast<float>(ent)};
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
  DG_REQUIRE(std::isfinite(p.t_min) && p.t_min >= 0, InvalidArgument, "t_min must be >= 0, got " << p.t_min);
  DG_REQUIRE(std::isfinite(p.t_max) && p.t_max >= 0, InvalidArgument, "t_max must be >= 0, got " << p.t_max);
  DG_REQUIRE(p.t_max > p.t_min, InvalidArgument, "t_max must be > t_min, got t_max=" << p.t_max << " t_min=" << p.t_min);
  DG_REQUIRE(std::isfinite(p.entropy_bound) && p.entropy_bound > 0, InvalidArgument,
             "entropy_bound must be > 0, got " << p.entropy_bound);
  DG_REQUIRE(p.stability_threshold >= 0, InvalidArgument,
             "stability_threshold must be an integer >= 0, got " << p.stability_threshold);
  DG_REQUIRE(std::isfinite(p.confidence_threshold) && p.confidence_threshold > 0, InvalidArgument,
             "confidence_threshold must be > 0, got " << p.confidence_threshold);
  for (int e : p.eos_token_id)
    DG_REQUIRE(e >= 0 && e < cfg.vocab_size, InvalidArgument,
               "eos_token_id " << e << " is outside the vocabulary [0, " << cfg.vocab_size << ")");
  if (p.pad_token_id)
    DG_REQUIRE(*p.pad_token_id >= 0 && *p.pad_token_id < cfg.vocab_size, InvalidArgument,
               "pad_token_id " << *p.pad_token_id << " is outside the vocabulary [0, " << cfg.vocab_size << ")");
}

GenerateResult generate(Backend& backend, const ModelConfig& cfg, const std::vector<SeqCache*>& caches,
                        const std::vector<std::vector<int32_t>>& input_ids, const SamplerParams& params,
                        NoiseSource& noise, const GenerateCallbacks& callbacks) {
  validate(params, cfg);
  const auto t_start = Clock::now();
  const int B = static_cast<int>(caches.size());
  const int L = cfg.canvas_length, V = cfg.vocab_size, N = params.max_denoising_steps;
  DG_REQUIRE(B > 0 && static_cast<int>(input_ids.size()) == B, InvalidArgument, "empty batch");
  for (const auto& row : input_ids) DG_REQUIRE(!row.empty(), InvalidArgument, "empty prompt");
  const long canvases_asked = (static_cast<long>(params.max_new_tokens) + L - 1) / L;
  DG_REQUIRE(canvases_asked * L <= cfg.max_position_embeddings, InvalidArgument,
             "max_new_tokens " << params.max_new_tokens << " exceeds max_position_embeddings "
                               << cfg.max_position_embeddings);
  const int max_canvases = static_cast<int>(canvases_asked);

  // Admission: everything this call can need must fit in the pool now, so it never fails halfway.
  {
    const BlockPool& pool = caches[0]->pool();
    long full = 0, sliding = 0;
    for (int r = 0; r < B; ++r) {
      const long final_len =
          caches[r]->length() + static_cast<long>(input_ids[r].size()) + static_cast<long>(max_canvases - 1) * L;
      DG_REQUIRE(final_len + L <= cfg.max_position_embeddings, InvalidArgument,
                 "prompt plus " << static_cast<long>(max_canvases) * L << " new tokens (" << final_len + L
                                << ") exceeds max_position_embeddings " << cfg.max_position_embeddings);
      full += caches[r]->full_blocks_needed(static_cast<int>(final_len));
      sliding += caches[r]->sliding_blocks_peak();
    }
    if (pool.total_blocks(0) > 0)
      DG_REQUIRE(full <= pool.free_blocks(0), ResourceError,
                 "KV cache pool too small: this request needs " << full * pool.block_size()
                     << " more tokens of full-attention cache but only " << pool.free_blocks(0) * pool.block_size()
                     << " are free; raise kv_cache_tokens (or drop old results/caches)");
    if (pool.total_blocks(1) > 0)
      DG_REQUIRE(sliding <= pool.free_blocks(1), ResourceError,
                 "KV cache pool too small for " << B << " rows of sliding-window cache; raise max_batch_size "
                                                << "(or drop old results/caches)");
  }

  GenerateResult res;
  res.new_tokens.resize(B);
  res.steps_per_canvas.resize(B);

  backend.encode(caches, input_ids);
  res.encoder_forwards++;
  res.prefill_s = seconds_since(t_start);

  // With a pad token, rows that already finished produce only pad, so they are not denoised any
  // more. Without one, the reference keeps generating them and so do we.
  const bool skip_finished = params.pad_token_id.has_value();
  const int thr = params.stability_threshold;
  std::vector<char> finished_seq(B, 0), finished_denoise(B, 0);
  std::vector<int> passes(B, 0), steps_now(B, 0);
  std::vector<int32_t> canvas(static_cast<size_t>(B) * L), argmax(static_cast<size_t>(B) * L);
  std::vector<int32_t> fresh(static_cast<size_t>(B) * L), sample(static_cast<size_t>(B) * L);
  std::vector<int32_t> history(static_cast<size_t>(std::max(thr, 1)) * B * L);
  std::vector<double> uni(static_cast<size_t>(B) * L);
  std::vector<float> entropy(static_cast<size_t>(B) * L);
  std::vector<float> sc(static_cast<size_t>(B) * L * V);  // processed logits per row, kept across steps
  std::vector<float> logits;
  std::vector<int32_t> active_canvas;
  std::vector<float> active_sc;
  std::vector<int> order(L);

  auto check_ids = [&](const std::vector<int32_t>& ids) {
    for (int32_t t : ids)
      DG_REQUIRE(t >= 0 && t < V, InvalidArgument, "noise source returned token id " << t << " outside [0, " << V << ")");
  };

  for (int c = 0; c < max_canvases; ++c) {
    if (c > 0) {
      std::vector<SeqCache*> rows;
      std::vector<std::vector<int32_t>> toks;
      for (int r = 0; r < B; ++r) {
        if (skip_finished && finished_seq[r]) continue;
        rows.push_back(caches[r]);
        toks.emplace_back(res.new_tokens[r].end() - L, res.new_tokens[r].end());
      }
      if (!rows.empty()) {
        backend.encode(rows, toks);
        res.encoder_forwards++;
      }
    }
    std::vector<char> live_at_start(B);
    for (int r = 0; r < B; ++r) live_at_start[r] = !finished_seq[r];

    noise.canvas(c, 0, B, L, canvas.data());
    check_ids(canvas);
    argmax = canvas;
    std::fill(finished_denoise.begin(), finished_denoise.end(), 0);
    std::fill(steps_now.begin(), steps_now.end(), 0);
    std::fill(history.begin(), history.end(), -1);
    bool have_sc = false;

    for (int step = 1, n = N; n >= 1; --n, ++step) {
      std::vector<int> active;
      for (int r = 0; r < B; ++r) {
        if (!finished_denoise[r] && !finished_seq[r]) passes[r]++, steps_now[r]++;
        if (!finished_denoise[r] && !(skip_finished && finished_seq[r])) active.push_back(r);
      }
      const auto t_step = Clock::now();
      const int A = static_cast<int>(active.size());
      if (A > 0) {
        active_canvas.resize(static_cast<size_t>(A) * L);
        logits.resize(static_cast<size_t>(A) * L * V);
        for (int a = 0; a < A; ++a)
          std::copy_n(canvas.begin() + static_cast<size_t>(active[a]) * L, L, active_canvas.begin() + static_cast<size_t>(a) * L);
        const float* sc_in = nullptr;
        if (have_sc) {
          active_sc.resize(static_cast<size_t>(A) * L * V);
          for (int a = 0; a < A; ++a)
            std::copy_n(sc.begin() + static_cast<size_t>(active[a]) * L * V, static_cast<size_t>(L) * V,
                        active_sc.begin() + static_cast<size_t>(a) * L * V);
          sc_in = active_sc.data();
        }
        std::vector<const SeqCache*> ro;
        for (int r : active) ro.push_back(caches[r]);
        backend.decode(ro, active_canvas.data(), L, sc_in, logits.data());
        res.decoder_forwards++;
      }
      noise.uniform(c, step, B, L, uni.data());
      for (double u : uni)
        DG_REQUIRE(u >= 0.0 && u < 1.0, InvalidArgument, "noise source returned uniform " << u << " outside [0, 1)");
      noise.canvas(c, step, B, L, fresh.data());
      check_ids(fresh);

      // Temperature in float32 as the reference's LinearTemperatureScheduleLogitsProcessor computes it.
      const float ratio = static_cast<float>(n) / static_cast<float>(N);
      const float temperature =
          static_cast<float>(params.t_min) + static_cast<float>(params.t_max - params.t_min) * ratio;
      const long positions = static_cast<long>(A) * L;
#pragma omp parallel
      {
        std::vector<double> cdf(V);
        std::vector<float> ex(V);
#pragma omp for schedule(static)
        for (long i = 0; i < positions; ++i) {
          const int a = static_cast<int>(i / L), j = static_cast<int>(i % L), r = active[a];
          const size_t rj = static_cast<size_t>(r) * L + j;
          const Sampled s = sample_position(logits.data() + static_cast<size_t>(i) * V, sc.data() + rj * V, V,
                                            temperature, uni[rj], ex, cdf);
          sample[rj] = s.token;
          argmax[rj] = s.argmax;
          entropy[rj] = s.entropy;
        }
      }
      for (int r : active) {
        const size_t base = static_cast<size_t>(r) * L;
        // Entropy-bound acceptance: accept the lowest-entropy positions while the sum of the
        // entropies before each stays within the bound (cumsum accumulates in float64 on the CPU).
        std::iota(order.begin(), order.end(), 0);
        std::stable_sort(order.begin(), order.end(),
                         [&](int x, int y) { return entropy[base + x] < entropy[base + y]; });
        double cum = 0;
        for (int j : order) {
          const float e = entropy[base + j];
          cum += e;
          const bool accept = static_cast<float>(cum) - e <= static_cast<float>(params.entropy_bound);
          canvas[base + j] = accept ? sample[base + j] : fresh[base + j];
        }
        if (params.adaptive_stopping) {
          bool stable = true;
          if (thr > 0) {
            for (int k = 0; k < thr && stable; ++k)
              stable = std::equal(argmax.begin() + base, argmax.begin() + base + L,
                                  history.begin() + (static_cast<size_t>(k) * B + r) * L);
            for (int k = 0; k + 1 < thr; ++k)
              std::copy_n(history.begin() + (static_cast<size_t>(k + 1) * B + r) * L, L,
                          history.begin() + (static_cast<size_t>(k) * B + r) * L);
            std::copy_n(argmax.begin() + base, L, history.begin() + (static_cast<size_t>(thr - 1) * B + r) * L);
          }
          float esum = 0;
          for (int j = 0; j < L; ++j) esum += entropy[base + j];
          const bool confident = esum / static_cast<float>(L) < params.confidence_threshold;
          if (stable && confident) finished_denoise[r] = 1;
        }
      }
      have_sc = true;
      res.denoise_s += seconds_since(t_step);
      if (callbacks.on_step) callbacks.on_step(argmax.data(), B, L);
      bool any_left = false;
      for (int r = 0; r < B; ++r) any_left |= !finished_denoise[r] && !(skip_finished && finished_seq[r]);
      if (!any_left) break;
    }

    // Commit the argmax canvas; EOS handling as the reference's _finalize_canvas.
    std::vector<int32_t> block = argmax;
    std::vector<char> eos_now(B, 0);
    for (int r = 0; r < B; ++r)
      for (int j = 0; j < L && !eos_now[r]; ++j)
        eos_now[r] = std::find(params.eos_token_id.begin(), params.eos_token_id.end(),
                               block[static_cast<size_t>(r) * L + j]) != params.eos_token_id.end();
    for (int r = 0; r < B; ++r) {
      int32_t* row = block.data() + static_cast<size_t>(r) * L;
      if (params.pad_token_id) {
        const int32_t pad = *params.pad_token_id;
        if (finished_seq[r]) {
          std::fill(row, row + L, pad);
        } else if (eos_now[r]) {
          bool seen = false;
          for (int j = 0; j < L; ++j) {
            const bool is_eos =
                std::find(params.eos_token_id.begin(), params.eos_token_id.end(), row[j]) != params.eos_token_id.end();
            if (seen) row[j] = pad;
            seen |= is_eos;
          }
        }
      }
      res.new_tokens[r].insert(res.new_tokens[r].end(), row, row + L);
      if (live_at_start[r]) res.steps_per_canvas[r].push_back(steps_now[r]);
      finished_seq[r] |= eos_now[r];
    }
    if (callbacks.on_block) callbacks.on_block(block.data(), B, L);
    if (std::all_of(finished_seq.begin(), finished_seq.end(), [](char f) { return f != 0; })) break;
  }

  res.tokens_per_forward.resize(B);
  for (int r = 0; r < B; ++r) {
    long valid = static_cast<long>(res.new_tokens[r].size());
    if (params.pad_token_id)
      valid = std::count_if(res.new_tokens[r].begin(), res.new_tokens[r].end(),
                            [&](int32_t t) { return t != *params.pad_token_id; });
    res.tokens_per_forward[r] = passes[r] > 0 ? static_cast<double>(valid) / passes[r] : 0.0;
  }
  res.total_s = seconds_since(t_start);
  return res;
}

}  // namespace dgemma
