// DiffusionGemma's forward, written once over a backend's op set (backend/backend.h): the encoder
// pass that extends the KV cache, the decoder step that denoises a canvas and samples it, and the
// decoder's raw logits (denoise_logits). Every backend runs this same sequence of ops; a backend
// supplies only the ops and the memory they run on.
//
// Memory the forward keeps in the backend:
//   - KV storage (KvStorage): per layer, K and V [num_blocks, block_size, kv_heads, head_dim] in the
//     backend's kv dtype for the block pool's blocks (runtime/kv_cache.h does the accounting).
//   - Self-conditioning state: per batch row slot, the soft embedding softmax(processed logits) @ E
//     * embed_scale of its previous step, act [canvas_length, H]; a row takes a slot when it is admitted
//     and gives it back when it leaves.
//   - A workspace holding one pass's activations (the buffer plan in forward.cpp), grown to the
//     largest pass so far.
//
// Captured decoder steps (CUDA graphs, backend.h "capture and replay"): step() first uploads every
// host array of the pass (token ids, positions, block tables, cache bounds, temperatures,
// uniforms, self-conditioning gather/scatter/soft indices), then runs an op sequence that reads
// only backend memory at addresses the step's signature fixes, then downloads the results. The
// signature holds everything that sequence bakes in besides memory contents: rows R, n, tokens T,
// max_count (= n), write_soft (false only when no row keeps its self-conditioning state: every row
// at its canvas's last step), each group's bucketed table width and max_cached, and the workspace,
// self-conditioning and KV addresses. Nothing in it follows a row's own progress:
//   - Context: a decoder pass bounds the full layers' block tables by the widest row's blocks
//     rounded up to a power of two (capped at the pool) and max_cached by all those blocks can
//     address; the sliding layers' by what a window can span (fixed). The ops read the true
//     lengths from device memory (the bounds only size grids and the split-KV plan), so a capture
//     serves every canvas while the context grows inside a bucket; crossing one makes new
//     signatures. The workspace plan holds the widest table the pool allows, so a crossing does
//     not grow the workspace.
//   - Self-conditioning: every token gathers its state row (index -1 where its canvas has no signal
//     yet: a zero row) and the scatter-add skips -1, so rows with and without a signal share one
//     sequence; which rows keep their state is soft_index, on the device.
// On a backend that can capture, a signature's first step runs the ops directly (sizing the
// backend's scratch), its second captures and replays them, later ones replay. So a request's
// first canvas in a bucket runs its first step and last step directly and captures its second;
// the second canvas captures its last step; from the third on every step replays. A continuous
// batch gets new signatures only when its row count or a bucket changes. Nothing may upload,
// download or allocate inside that sequence; new host-side inputs go into the signature or into
// backend memory uploaded before it. At most max_graphs() captures are kept (least recently used
// dropped): four per batch size up to max_batch_size (a step with and one without a row that keeps
// its state, in two context buckets while a row crosses from one to the next), at least 16; all
// are dropped when the workspace grows and when the Forward goes. A capture that throws fails its
// step with that error and turns capture off for this Forward. encode() and logits() are never
// captured.
//
// Profiling (backend.h "per-op profiling"): set_profiling picks the passes whose ops the backend
// times (decoder steps and denoise_logits, encoder passes, or both); the Forward switches the
// backend's profiling on and off at the start of each pass accordingly, and runs a profiled step's
// ops directly: no capture is made or replayed while the backend profiles.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <vector>

#include "backend/backend.h"
#include "model/config.h"
#include "runtime/kv_cache.h"

namespace dgemma {

// The backend memory behind a BlockPool's blocks. Shared by the engine and every KVCache taken from
// it, so a cache can still be copied out after its engine is gone.
class KvStorage {
 public:
  KvStorage(Backend& backend, const ModelConfig& cfg, const BlockPool& pool);

  struct Layer {
    std::shared_ptr<Buffer> k, v;
    Tensor k_view, v_view;  // [num_blocks, block_size, kv_heads, head_dim]
    int kv_heads = 0, head_dim = 0;
  };
  const Layer& layer(int l) const { return layers_[l]; }
  int block_size() const { return block_size_; }
  ScalarType dtype() const { return dtype_; }
  // Copies the given flat slots (block * block_size + offset) of a layer out as float32
  // [slots, kv_heads * head_dim].
  void read(int layer, const std::vector<int32_t>& slots, float* k, float* v) const;

 private:
  ScalarType dtype_;
  int block_size_;
  std::vector<Layer> layers_;
};

// One row of a decoder step.
struct StepRow {
  const SeqCache* cache = nullptr;
  const int32_t* canvas = nullptr;  // [n] token ids (validated)
  float temperature = 1.0f;
  const double* uniform = nullptr;  // [n] in [0, 1)
  int sc_slot = -1;                 // this row's self-conditioning slot (Forward::acquire_sc)
  bool sc_valid = false;            // false at a canvas's first step: the signal is exactly zero
  bool keep_sc = true;              // false when no later step will read the state (the last step)
};

// What a step returns per position, host arrays [rows * n].
struct StepOutput {
  int32_t* token = nullptr;
  int32_t* argmax = nullptr;
  float* entropy = nullptr;
};

class Forward {
 public:
  // sc_slots: rows that can hold self-conditioning state at once (the scheduler's max rows).
  Forward(const ModelConfig& cfg, Backend& backend, int sc_slots);
  ~Forward();
  Forward(const Forward&) = delete;
  Forward& operator=(const Forward&) = delete;

  Backend& backend() { return be_; }
  const ModelConfig& config() const { return cfg_; }

  // Allocates the KV storage for the pool's blocks (once, before the first pass).
  void allocate_kv(const BlockPool& pool);
  std::shared_ptr<const KvStorage> kv() const { return kv_; }

  // Encoder pass: appends tokens[r] (at positions cache length ...) to caches[r] for every row,
  // causal attention with sliding windows on sliding layers. Commits the caches on success and
  // leaves them untouched if it throws.
  void encode(const std::vector<SeqCache*>& caches, const std::vector<std::vector<int32_t>>& tokens);

  // Decoder step over n canvas tokens per row: bidirectional attention over each row's cache and
  // canvas, then the fused LM head + sampler, which also leaves each row's next self-conditioning
  // input in its slot. Only sampled token, argmax and entropy come back to the host.
  void step(const std::vector<StepRow>& rows, int n, const StepOutput& out);

  // The decoder's soft-capped logits [rows, n, vocab] (float32). sc_logits: empty, or per row null
  // (zero self-conditioning) or that row's processed logits [n, vocab] of a previous step.
  void logits(const std::vector<const SeqCache*>& caches, const int32_t* canvas, int n,
              const std::vector<const float*>& sc_logits, float* out);

  // Decoder steps captured, and run from a capture (the capturing step included), and captures that
  // failed (each turns capture off for this Forward; see run_ops). Thread-safe.
  struct GraphStats {
    long long captured = 0, replayed = 0, capture_failures = 0;
  };
  GraphStats graph_stats() const { return {captured_.load(), replayed_.load(), capture_failures_.load()}; }

  // Which passes the backend times from the next pass on (Unsupported when the backend cannot
  // profile and either is true). Call between passes (the engine holds its forward lock).
  void set_profiling(bool decoder, bool encoder);

  // Self-conditioning slots (thread-safe). acquire_sc throws ResourceError when all are taken.
  int acquire_sc();
  void release_sc(int slot);
  int sc_slots() const { return sc_slots_; }

 private:
  struct Pass;
  void check_supported(Op op) const;
  void upload_rows(Pass& p, const std::vector<const SeqCache*>& caches, const std::vector<int>& counts,
                   const std::vector<SeqCache*>* writes);
  void decoder_input(Pass& p, const Tensor& soft, const Tensor& scatter);
  void layers(Pass& p, bool encoder);
  void* workspace(size_t bytes);  // the pass workspace, grown to at least bytes
  // Runs ops (backend ops only) directly, or captured and replayed under sig (see the top).
  void run_ops(const std::vector<int64_t>& sig, const std::function<void()>& ops);
  void drop_graphs();

  const ModelConfig& cfg_;
  Backend& be_;
  ScalarType act_;
  std::shared_ptr<const KvStorage> kv_;
  std::vector<std::shared_ptr<Buffer>> inv_freq_;  // per layer, f32 [head_dim / 2]
  std::shared_ptr<Buffer> workspace_;

  size_t max_graphs() const { return std::max<size_t>(16, 4 * static_cast<size_t>(sc_slots_)); }
  struct Graph {
    uint64_t key = 0;        // the backend's name for the capture (unique per Forward)
    bool ran = false;        // ran directly once: the backend's scratch fits it
    uint64_t last_use = 0;
  };
  bool capture_ = false;  // the backend can capture
  std::map<std::vector<int64_t>, Graph> graphs_;  // by signature
  uint64_t next_graph_key_ = 1, graph_clock_ = 0;
  std::atomic<long long> captured_{0}, replayed_{0}, capture_failures_{0};
  bool profile_decoder_ = false, profile_encoder_ = false;

  int sc_slots_;
  std::shared_ptr<Buffer> sc_state_;  // act [sc_slots * canvas_length, H]
  std::mutex sc_mu_;
  std::vector<int> sc_free_;
};

}  // namespace dgemma
