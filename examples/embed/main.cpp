// Embedding dgemma_rt in a C++ program, no Python: load a checkpoint, run several requests from
// several threads at once (the engine batches them), watch their drafts, cancel one, read stats,
// fill in a template, hold a two-turn conversation on one KV cache.
//
//   dgemma-embed-example CHECKPOINT [--requests N] [--max-new-tokens M] [--steps S]
//
// Prints one JSON object per line: each request's prompt and result, the cancelled request, the
// engine's counters. Exit status 0 on success, 1 on an error (message on stderr), 2 on bad usage.
#include <dgemma_rt/engine.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <iostream>
#include <mutex>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

namespace {

std::string json_ids(const std::vector<int32_t>& ids) {
  std::ostringstream o;
  o << '[';
  for (size_t i = 0; i < ids.size(); ++i) o << (i ? "," : "") << ids[i];
  o << ']';
  return o.str();
}

std::string json_str(const std::string& s) {
  std::string o = "\"";
  for (char c : s) {
    if (c == '"' || c == '\\') o += '\\';
    if (static_cast<unsigned char>(c) >= 0x20) o += c;
  }
  return o + "\"";
}

const char* status_name(dgemma_rt::Status s) {
  switch (s) {
    case dgemma_rt::Status::kQueued: return "queued";
    case dgemma_rt::Status::kRunning: return "running";
    case dgemma_rt::Status::kDone: return "done";
    case dgemma_rt::Status::kFailed: return "failed";
    case dgemma_rt::Status::kCancelled: return "cancelled";
  }
  return "?";
}

int positive(const char* flag, const char* value) {
  char* end = nullptr;
  const long v = std::strtol(value, &end, 10);
  if (!*value || *end || v <= 0 || v > 1 << 20) {
    std::cerr << flag << " needs a positive integer, got '" << value << "'\n";
    std::exit(2);
  }
  return static_cast<int>(v);
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2 || std::string(argv[1]) == "--help") {
    std::cerr << "usage: " << argv[0] << " CHECKPOINT [--requests N] [--max-new-tokens M] [--steps S]\n";
    return 2;
  }
  const std::string checkpoint = argv[1];
  int requests = 4, max_new_tokens = 64, steps = 8;
  for (int i = 2; i < argc; i += 2) {
    const std::string flag = argv[i];
    int* target = flag == "--requests" ? &requests
                  : flag == "--max-new-tokens" ? &max_new_tokens
                  : flag == "--steps" ? &steps
                  : nullptr;
    if (!target) {
      std::cerr << "unknown option " << flag << "\n";
      return 2;
    }
    if (i + 1 >= argc) {
      std::cerr << flag << " needs a value\n";
      return 2;
    }
    *target = positive(argv[i], argv[i + 1]);
  }

  try {
    dgemma_rt::EngineOptions options;
    options.max_batch_size = requests + 1;
    dgemma_rt::Engine engine(checkpoint, options);
    const dgemma_rt::ModelInfo info = engine.info();

    // Prompts: 12 valid token ids per request (ids below 8 are special tokens in small checkpoints).
    std::vector<std::vector<int32_t>> prompts(requests);
    for (int r = 0; r < requests; ++r)
      for (int k = 0; k < 12; ++k)
        prompts[r].push_back(8 + static_cast<int32_t>((r * 7919L + k * 104729L) % (info.vocab_size - 8)));

    // A request to cancel once it has taken its first step; it denoises for long otherwise.
    dgemma_rt::SamplingParams long_params = engine.default_params();
    long_params.max_new_tokens = info.canvas_length;
    long_params.max_denoising_steps = 100000;
    long_params.adaptive_stopping = false;
    std::atomic<int> victim_steps{0};
    dgemma_rt::Callbacks victim_cb;
    victim_cb.on_step = [&](const dgemma_rt::Draft&) { victim_steps++; };
    dgemma_rt::Request victim = engine.submit(prompts[0], long_params, victim_cb);

    // The requests, each from its own thread, all at once.
    std::mutex out_mu;
    std::vector<std::string> lines(requests);
    std::vector<std::thread> threads;
    std::atomic<bool> failed{false};
    for (int r = 0; r < requests; ++r) {
      threads.emplace_back([&, r] {
        try {
          dgemma_rt::SamplingParams p = engine.default_params();
          p.max_new_tokens = max_new_tokens;
          p.max_denoising_steps = steps;
          p.seed = static_cast<uint64_t>(r);
          int drafts = 0, blocks = 0;
          dgemma_rt::Status finished_as = dgemma_rt::Status::kQueued;
          dgemma_rt::Callbacks cb;
          cb.on_step = [&](const dgemma_rt::Draft&) { ++drafts; };
          cb.on_block = [&](const dgemma_rt::Block&) { ++blocks; };
          cb.on_finish = [&](dgemma_rt::Status s) { finished_as = s; };
          dgemma_rt::Request req = engine.submit(prompts[r], p, cb);
          const dgemma_rt::Result res = req.result();
          int total_steps = 0;
          for (int s : res.steps_per_canvas) total_steps += s;
          std::ostringstream o;
          o << "{\"request\":" << r << ",\"seed\":" << r << ",\"prompt\":" << json_ids(prompts[r])
            << ",\"new_tokens\":" << json_ids(res.new_tokens) << ",\"text_tokens\":" << json_ids(res.text_tokens)
            << ",\"finish_reason\":\"" << res.finish_reason << "\",\"steps\":" << total_steps
            << ",\"drafts\":" << drafts << ",\"blocks\":" << blocks << ",\"status\":\"" << status_name(req.status())
            << "\",\"on_finish\":\"" << status_name(finished_as) << "\"}";
          std::lock_guard<std::mutex> lock(out_mu);
          lines[r] = o.str();
        } catch (const std::exception& e) {
          std::lock_guard<std::mutex> lock(out_mu);
          std::cerr << "request " << r << " failed: " << e.what() << "\n";
          failed = true;
        }
      });
    }

    while (victim_steps.load() == 0 && !victim.finished())
      std::this_thread::sleep_for(std::chrono::milliseconds(1));
    victim.cancel();
    std::string victim_error;
    try {
      victim.result();
    } catch (const dgemma_rt::Error& e) {
      victim_error = e.what();
    }
    for (auto& t : threads) t.join();
    if (failed) return 1;
    for (const auto& l : lines) std::cout << l << "\n";
    std::cout << "{\"cancelled\":\"" << status_name(victim.status()) << "\",\"steps_before_cancel\":"
              << (victim_steps.load() > 0 ? "true" : "false") << ",\"error\":" << json_str(victim_error) << "}\n";

    const dgemma_rt::Stats s = engine.stats();
    std::cout << "{\"stats\":{\"completed\":" << s.completed << ",\"cancelled\":" << s.cancelled
              << ",\"decoder_passes\":" << s.decoder_passes << ",\"row_steps\":" << s.row_steps
              << ",\"kv_blocks_free\":" << s.kv_blocks_free << ",\"kv_blocks_total\":" << s.kv_blocks_total << "}}\n";

    // A template canvas (infilling): the last 8 positions of the canvas locked to a fixed ending, the
    // rest generated around it. EOS stopping is off so that the whole middle is denoised (with it on, an
    // early EOS would pad the free positions after it, but never the locked ending).
    dgemma_rt::SamplingParams ip = engine.default_params();
    ip.max_new_tokens = info.canvas_length;
    ip.max_denoising_steps = steps;
    ip.seed = 99;
    ip.eos_token_id.clear();
    ip.canvas_template.assign(info.canvas_length, dgemma_rt::SamplingParams::kFreePosition);
    for (int j = 0; j < 8; ++j) ip.canvas_template[info.canvas_length - 8 + j] = 8 + j;
    const dgemma_rt::Result ir = engine.submit(prompts[0], ip).result();
    std::cout << "{\"infill\":{\"prompt\":" << json_ids(prompts[0]) << ",\"seed\":99,\"template\":"
              << json_ids(ip.canvas_template) << ",\"new_tokens\":" << json_ids(ir.new_tokens) << "}}\n";

    // A bad template is refused by submit() with a clear error: a locked id outside the vocabulary.
    ip.canvas_template[3] = info.vocab_size;
    std::string bad_template;
    try {
      engine.submit(prompts[0], ip);
    } catch (const dgemma_rt::Error& e) {
      bad_template = e.what();
    }
    std::cout << "{\"bad_template\":" << json_str(bad_template) << "}\n";

    // A conversation of two turns on one KVCache: the second turn encodes only its own tokens, the
    // first turn's last canvas (which the cache does not hold yet) and the user's next message.
    dgemma_rt::KVCache chat = engine.new_cache();
    dgemma_rt::SamplingParams cp = engine.default_params();
    cp.max_new_tokens = 2 * info.canvas_length;
    cp.max_denoising_steps = steps;
    cp.eos_token_id.clear();  // both canvases of each turn run
    cp.seed = 5;
    const dgemma_rt::Result t1 = engine.generate(chat, prompts[0], cp);
    const int after_turn1 = chat.tokens();
    std::vector<int32_t> turn2(t1.new_tokens.end() - info.canvas_length, t1.new_tokens.end());
    turn2.insert(turn2.end(), prompts.back().begin(), prompts.back().end());
    cp.seed = 6;
    const dgemma_rt::Result t2 = engine.generate(chat, turn2, cp);
    std::cout << "{\"chat\":{\"turn1_prompt\":" << json_ids(prompts[0]) << ",\"turn1\":" << json_ids(t1.new_tokens)
              << ",\"after_turn1\":" << after_turn1 << ",\"turn2_prompt\":" << json_ids(turn2)
              << ",\"turn2\":" << json_ids(t2.new_tokens) << ",\"after_turn2\":" << chat.tokens() << "}}\n";
    return 0;
  } catch (const dgemma_rt::Error& e) {
    std::cerr << "error: " << e.what() << "\n";
    return 1;
  }
}
