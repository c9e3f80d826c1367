#include "model/forward.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <cstdint>
#include <iostream>

#include "common/check.h"

namespace dgemma {
namespace {

constexpr size_t kAlign = 256;  // every planned buffer starts on a 256-byte boundary

size_t round_up(size_t n) { return (n + kAlign - 1) / kAlign * kAlign; }

float bf16_bits_to_f32(uint16_t h) {
  const uint32_t bits = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

// Lays out a pass's tensors in one workspace: add() them all, then place() them at a base pointer.
class Planner {
 public:
  void add(Tensor& t, ScalarType dtype, std::initializer_list<int64_t> dims) {
    t = Tensor::of(nullptr, dtype, dims);
    entries_.push_back({&t, bytes_});
    bytes_ += round_up(t.bytes());
  }
  size_t bytes() const { return bytes_; }
  void place(void* base) {
    for (auto& e : entries_) e.t->data = static_cast<char*>(base) + e.offset;
  }

 private:
  struct Entry {
    Tensor* t;
    size_t offset;
  };
  std::vector<Entry> entries_;
  size_t bytes_ = 0;
};

// A decoder pass's bounds on a group's rows: the block table's width and max_cached, the bound of
// cache_len - cache_start (AttentionArgs). A captured step bakes them in, so they are coarse and
// move only rarely while the context grows: full layers take the widest row's blocks rounded up to
// a power of two (capped at the pool: no row holds more) and all those blocks can address; sliding
// layers take what a window can ever span, fixed for the pool. blocks: the widest row's blocks.
// reserve: the width the workspace plan holds for the table, the widest it can get, so that a
// bucket's crossing does not grow the workspace (which would drop every capture).
struct DecoderBounds {
  int max_blocks, max_cached, reserve;
};
DecoderBounds decoder_bounds(const BlockPool& pool, int group, int blocks) {
  const int B = pool.block_size();
  if (group == BlockPool::kSliding) {
    const int keep = std::max(pool.sliding_window() - 1, 0);  // cache_start = max(0, len - keep)
    const int width = std::max({blocks, 1, (keep + B - 1) / B + 1});
    return {width, keep, width};
  }
  int b = 1;
  while (b < blocks) b *= 2;
  const int width = std::max(blocks, std::min(b, pool.total_blocks(group)));
  return {width, width * B, std::max(width, pool.total_blocks(group))};
}

// A contiguous view of the first elements of a planned buffer under another shape.
Tensor prefix(const Tensor& buf, std::initializer_list<int64_t> dims) {
  Tensor t = Tensor::of(buf.data, buf.dtype, dims);
  DG_CHECK(t.numel() <= buf.numel(), "a view of " << t.numel() << " elements in a buffer of " << buf.numel());
  return t;
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// KV storage

KvStorage::KvStorage(Backend& backend, const ModelConfig& cfg, const BlockPool& pool)
    : dtype_(backend.kv_dtype()), block_size_(pool.block_size()) {
  layers_.resize(cfg.num_layers);
  for (int l = 0; l < cfg.num_layers; ++l) {
    Layer& L = layers_[l];
    L.kv_heads = cfg.layers[l].num_kv_heads;
    L.head_dim = cfg.layers[l].head_dim;
    const int64_t blocks = pool.total_blocks(pool.group_of(l));
    Tensor shape = Tensor::of(nullptr, dtype_, {blocks, block_size_, L.kv_heads, L.head_dim});
    L.k = backend.allocate(shape.bytes(), "KV cache");
    L.v = backend.allocate(shape.bytes(), "KV cache");
    L.k_view = shape;
    L.k_view.data = L.k->data();
    L.v_view = shape;
    L.v_view.data = L.v->data();
  }
}

void KvStorage::read(int layer, const std::vector<int32_t>& slots, float* k, float* v) const {
  const Layer& L = layers_.at(layer);
  const size_t tf = static_cast<size_t>(L.kv_heads) * L.head_dim;
  const size_t es = scalar_size(dtype_);
  std::vector<uint8_t> tmp;
  // Runs of consecutive slots are one copy each.
  for (size_t i = 0; i < slots.size();) {
    size_t j = i + 1;
    while (j < slots.size() && slots[j] == slots[j - 1] + 1) ++j;
    const size_t n = (j - i) * tf, off = static_cast<size_t>(slots[i]) * tf * es;
    for (int which = 0; which < 2; ++which) {
      const Buffer& buf = which == 0 ? *L.k : *L.v;
      float* dst = (which == 0 ? k : v) + i * tf;
      if (dtype_ == ScalarType::kF32) {
        buf.read(off, n * es, dst);
      } else {
        DG_CHECK(dtype_ == ScalarType::kBF16, "KV cache dtype " << scalar_name(dtype_));
        tmp.resize(n * es);
        buf.read(off, n * es, tmp.data());
        const uint16_t* src = reinterpret_cast<const uint16_t*>(tmp.data());
        for (size_t e = 0; e < n; ++e) dst[e] = bf16_bits_to_f32(src[e]);
      }
    }
    i = j;
  }
}

// ---------------------------------------------------------------------------------------------
// One pass: its rows, the host-side index arrays and the planned tensors.

struct Forward::Pass {
  int T = 0, R = 0, S = 0;
  int max_count = 0;
  std::vector<int32_t> ids, positions, tok0, count;
  struct Group {
    std::vector<int32_t> table, first_pos, start, len, slot;
    int max_blocks = 1;
    int max_cached = 0;
    int reserve = 1;  // the table's width in the workspace plan (>= max_blocks)
    Tensor table_t, first_pos_t, start_t, len_t, slot_t;
  } group[2];
  Tensor ids_t, positions_t, tok0_t, count_t;
  Tensor x, h, h1, h2, h3, q, att, k, v, mlp_scratch, topk_idx, topk_w, moe_ws;
  // decoder step
  Tensor temperature, uniform, token, argmax, entropy, soft_index, gather, scatter;
  Tensor step_out;  // i32 [3, T]: token | argmax | entropy (f32 bits), one download per step
};

Forward::Forward(const ModelConfig& cfg, Backend& backend, int sc_slots)
    : cfg_(cfg), be_(backend), act_(backend.act_dtype()), sc_slots_(sc_slots) {
  DG_REQUIRE(sc_slots > 0, InvalidArgument, "max_batch_size must be positive");
  for (Op op : {Op::kEmbed, Op::kRmsNorm, Op::kLinear, Op::kCopy, Op::kHeadNormRope, Op::kKvWrite, Op::kAttention,
                Op::kResidualNormAdd, Op::kMlp, Op::kMoeRouter, Op::kMoeExperts, Op::kFfnCombine, Op::kGatherRows,
                Op::kScatterAddRows, Op::kLmHeadSample, Op::kResidualNormAddNorms, Op::kFfnCombineNorm,
                Op::kHeadNormRopeQkv})
    check_supported(op);
  for (int l = 0; l < cfg.num_layers; ++l) {
    const std::vector<float>& f = cfg.layers[l].inv_freq;
    inv_freq_.push_back(be_.allocate(f.size() * sizeof(float), "RoPE frequencies"));
    be_.upload(Tensor::of(static_cast<float*>(inv_freq_.back()->data()), {static_cast<int64_t>(f.size())}), f.data());
  }
  const Tensor sc = Tensor::of(nullptr, act_, {static_cast<int64_t>(sc_slots) * cfg.canvas_length, cfg.hidden_size});
  sc_state_ = be_.allocate(sc.bytes(), "self-conditioning state");
  for (int s = sc_slots - 1; s >= 0; --s) sc_free_.push_back(s);
  capture_ = be_.can_capture();
}

void Forward::check_supported(Op op) const {
  DG_REQUIRE(be_.supports(op), Unsupported,
             "the " << be_.name() << " backend cannot run this model: it does not implement the '" << op_name(op)
                    << "' op");
}

void Forward::set_profiling(bool decoder, bool encoder) {
  if (decoder || encoder)
    DG_REQUIRE(be_.can_profile(), Unsupported, "the " << be_.name() << " backend cannot profile its ops");
  profile_decoder_ = decoder, profile_encoder_ = encoder;
  if (!decoder && !encoder) be_.set_profiling(false);
}

void Forward::allocate_kv(const BlockPool& pool) {
  DG_CHECK(!kv_, "KV storage allocated twice");
  kv_ = std::make_shared<KvStorage>(be_, cfg_, pool);
}

int Forward::acquire_sc() {
  std::lock_guard<std::mutex> lock(sc_mu_);
  DG_REQUIRE(!sc_free_.empty(), ResourceError, "all " << sc_slots_ << " self-conditioning slots are in use");
  const int s = sc_free_.back();
  sc_free_.pop_back();
  return s;
}

void Forward::release_sc(int slot) {
  std::lock_guard<std::mutex> lock(sc_mu_);
  DG_CHECK(slot >= 0 && slot < sc_slots_ && std::find(sc_free_.begin(), sc_free_.end(), slot) == sc_free_.end(),
           "releasing self-conditioning slot " << slot);
  sc_free_.push_back(slot);
}

Forward::~Forward() { drop_graphs(); }

void Forward::drop_graphs() {
  if (graphs_.empty()) return;
  graphs_.clear();
  be_.drop_captures();
}

void* Forward::workspace(size_t bytes) {
  if (!workspace_ || workspace_->bytes() < bytes) {
    drop_graphs();       // they point into the old workspace
    workspace_.reset();  // give the old one back first
    workspace_ = be_.allocate(bytes, "forward workspace");
  }
  return workspace_->data();
}

// Builds the rows' index arrays (positions, per-group block tables and, for the encoder, write
// slots), plans every tensor of the pass in the workspace and uploads the index arrays.
void Forward::upload_rows(Pass& p, const std::vector<const SeqCache*>& caches, const std::vector<int>& counts,
                          const std::vector<SeqCache*>* writes) {
  const int H = cfg_.hidden_size, I = cfg_.intermediate_size, K = cfg_.top_k_experts;
  p.R = static_cast<int>(caches.size());
  p.T = 0;
  for (int r = 0; r < p.R; ++r) {
    p.tok0.push_back(p.T);
    p.count.push_back(counts[r]);
    p.max_count = std::max(p.max_count, counts[r]);
    for (int j = 0; j < counts[r]; ++j) p.positions.push_back(caches[r]->length() + j);
    p.T += counts[r];
  }
  SeqCache::BlockTable bt;
  for (int g = 0; g < 2; ++g) {
    Pass::Group& G = p.group[g];
    std::vector<SeqCache::BlockTable> tables(p.R);
    for (int r = 0; r < p.R; ++r) {
      caches[r]->table(g, tables[r]);
      G.max_blocks = std::max(G.max_blocks, static_cast<int>(tables[r].blocks.size()));
    }
    // Decoder passes take coarse bounds (decoder_bounds), the encoder exact ones. Padding entries
    // (block 0, a valid block) are never read for a key.
    const DecoderBounds bounds = decoder_bounds(caches[0]->pool(), g, G.max_blocks);
    if (!writes) G.max_blocks = bounds.max_blocks;
    G.reserve = writes ? G.max_blocks : bounds.reserve;
    G.table.assign(static_cast<size_t>(p.R) * G.max_blocks, 0);
    for (int r = 0; r < p.R; ++r) {
      std::copy(tables[r].blocks.begin(), tables[r].blocks.end(), G.table.begin() + static_cast<size_t>(r) * G.max_blocks);
      G.first_pos.push_back(tables[r].first_pos);
      G.start.push_back(tables[r].start);
      G.len.push_back(tables[r].length);
      G.max_cached = std::max(G.max_cached, tables[r].length - tables[r].start);
    }
    if (!writes) {
      DG_CHECK(G.max_cached <= bounds.max_cached, "a row's cached keys exceed its table's bound");
      G.max_cached = bounds.max_cached;
    }
    if (writes) {
      const bool present = std::any_of(cfg_.layers.begin(), cfg_.layers.end(),
                                       [&](const LayerSpec& s) { return (s.sliding ? 1 : 0) == g; });
      for (int r = 0; r < p.R; ++r)
        for (int j = 0; j < counts[r]; ++j)
          G.slot.push_back(present ? (*writes)[r]->write_slot(g, caches[r]->length() + j) : -1);
    }
  }

  int qw = 1, kw = 1;
  for (const LayerSpec& s : cfg_.layers) {
    qw = std::max(qw, cfg_.num_heads * s.head_dim);
    kw = std::max(kw, s.num_kv_heads * s.head_dim);
  }
  const int64_t T = p.T, R = p.R;
  Planner plan;
  plan.add(p.ids_t, ScalarType::kI32, {T});
  plan.add(p.positions_t, ScalarType::kI32, {T});
  plan.add(p.tok0_t, ScalarType::kI32, {R});
  plan.add(p.count_t, ScalarType::kI32, {R});
  for (Pass::Group& G : p.group) {
    plan.add(G.table_t, ScalarType::kI32, {R, G.reserve});
    plan.add(G.first_pos_t, ScalarType::kI32, {R});
    plan.add(G.start_t, ScalarType::kI32, {R});
    plan.add(G.len_t, ScalarType::kI32, {R});
    if (writes) plan.add(G.slot_t, ScalarType::kI32, {T});
  }
  plan.add(p.x, ScalarType::kF32, {T, H});
  plan.add(p.h, act_, {T, H});
  plan.add(p.h1, act_, {T, H});
  plan.add(p.h2, act_, {T, H});
  plan.add(p.h3, act_, {T, H});
  plan.add(p.q, act_, {T, qw});
  plan.add(p.att, act_, {T, qw});
  plan.add(p.k, act_, {T, kw});
  plan.add(p.v, act_, {T, kw});
  plan.add(p.mlp_scratch, act_, {T, 3 * static_cast<int64_t>(I)});
  plan.add(p.topk_idx, ScalarType::kI32, {T, K});
  plan.add(p.topk_w, ScalarType::kF32, {T, K});
  plan.add(p.moe_ws, ScalarType::kI32, {static_cast<int64_t>((be_.moe_workspace_bytes(p.T) + 3) / 4)});
  if (!writes) {  // decoder
    plan.add(p.temperature, ScalarType::kF32, {R});
    plan.add(p.uniform, ScalarType::kF64, {T});
    plan.add(p.step_out, ScalarType::kI32, {3, T});
    plan.add(p.soft_index, ScalarType::kI32, {T});
    plan.add(p.gather, ScalarType::kI32, {T});
    plan.add(p.scatter, ScalarType::kI32, {T});
  }
  plan.place(workspace(plan.bytes()));
  for (Pass::Group& G : p.group) G.table_t = prefix(G.table_t, {R, G.max_blocks});
  if (!writes) {
    int32_t* out = static_cast<int32_t*>(p.step_out.data);
    p.token = Tensor::of(out, {T});
    p.argmax = Tensor::of(out + T, {T});
    p.entropy = Tensor::of(reinterpret_cast<float*>(out + 2 * T), {T});
  }

  be_.upload(p.positions_t, p.positions.data());
  be_.upload(p.tok0_t, p.tok0.data());
  be_.upload(p.count_t, p.count.data());
  for (Pass::Group& G : p.group) {
    be_.upload(G.table_t, G.table.data());
    be_.upload(G.first_pos_t, G.first_pos.data());
    be_.upload(G.start_t, G.start.data());
    be_.upload(G.len_t, G.len.data());
    if (writes) be_.upload(G.slot_t, G.slot.data());
  }
}

// The decoder layers leave p.h = rmsnorm(x) * final_norm (the last layer's ffn_combine_norm applies it);
// the encoder's last layer only writes the cache. Each layer's input norm comes from the previous
// layer's ffn_combine_norm, and the pre-FFN norms from residual_norm_add_norms: one pass over the
// residual per update.
void Forward::layers(Pass& p, bool encoder) {
  const int T = p.T, nh = cfg_.num_heads;
  const float eps = static_cast<float>(cfg_.rms_norm_eps);
  be_.rmsnorm(p.x, weight(W::kInputNorm, 0), p.h, eps);
  for (int l = 0; l < cfg_.num_layers; ++l) {
    const LayerSpec& ls = cfg_.layers[l];
    const int g = ls.sliding ? BlockPool::kSliding : BlockPool::kFull;
    const int hd = ls.head_dim, kvh = ls.num_kv_heads;
    const Pass::Group& G = p.group[g];
    const KvStorage::Layer& kv = kv_->layer(l);
    const Tensor inv_freq = Tensor::of(static_cast<float*>(inv_freq_[l]->data()), {static_cast<int64_t>(ls.inv_freq.size())});
    const Tensor k = prefix(p.k, {T, kvh, hd}), v = prefix(p.v, {T, kvh, hd});
    const Tensor k2 = k.view({T, kvh * hd}), v2 = v.view({T, kvh * hd});

    be_.linear(weight(W::kKProj, l), p.h, k2);
    if (ls.k_eq_v)
      be_.copy(k2, v2);  // K=V layers: V is v_norm of the raw k projection
    else
      be_.linear(weight(W::kVProj, l), p.h, v2);
    const bool need_output = !(encoder && l == cfg_.num_layers - 1);  // the encoder's last layer only feeds the cache
    const Tensor q = prefix(p.q, {T, nh, hd}), att = prefix(p.att, {T, nh, hd});
    if (need_output) be_.linear(weight(W::kQProj, l), p.h, q.view({T, nh * hd}));
    be_.head_norm_rope_qkv({need_output ? q : Tensor{}, weight(W::kQNorm, l), true}, {k, weight(W::kKNorm, l), true},
                           {v, WeightRef{}, false}, p.positions_t, inv_freq, eps);
    if (need_output) {
      AttentionArgs a;
      a.q = q, a.k_new = k, a.v_new = v, a.out = att;
      a.k_cache = kv.k_view, a.v_cache = kv.v_view;
      a.block_table = G.table_t, a.cache_first_pos = G.first_pos_t, a.cache_start = G.start_t, a.cache_len = G.len_t;
      a.tok0 = p.tok0_t, a.count = p.count_t, a.max_count = p.max_count, a.max_cached = G.max_cached;
      a.causal = encoder;
      a.window = encoder && ls.sliding ? cfg_.sliding_window : 0;
      a.scale = 1.0f;
      be_.attention(a);
    }
    if (encoder) be_.kv_write(k, v, G.slot_t, kv.k_view, kv.v_view);
    if (!need_output) break;

    be_.linear(weight(W::kOProj, l), att.view({T, nh * hd}), p.h);
    // Dense MLP and MoE both read the residual x (normed: h for the MLP, h3 for the experts); their
    // normalised sum is added back.
    be_.residual_norm_add_norms(p.x, p.h, weight(W::kPostAttnNorm, l), eps, {weight(W::kPreFfnNorm, l), p.h},
                                {weight(W::kPreFfnNorm2, l), p.h3});
    be_.mlp(weight(W::kMlp, l), p.h, p.h1, p.mlp_scratch);
    be_.moe_router(l, p.x, p.topk_idx, p.topk_w, eps);
    be_.moe_experts(l, p.h3, p.topk_idx, p.topk_w, p.h2, p.moe_ws);
    const bool last = l + 1 == cfg_.num_layers;
    be_.ffn_combine_norm(l, encoder, p.x, p.h1, p.h2, eps,
                         {last ? weight(W::kFinalNorm) : weight(W::kInputNorm, l + 1), p.h});
  }
}

void Forward::encode(const std::vector<SeqCache*>& caches, const std::vector<std::vector<int32_t>>& tokens) {
  DG_CHECK(caches.size() == tokens.size(), "rows");
  DG_CHECK(kv_, "KV storage not allocated");
  if (caches.empty()) return;
  be_.set_profiling(profile_encoder_);
  std::vector<int> counts;
  for (const auto& t : tokens) counts.push_back(static_cast<int>(t.size()));
  size_t prepared = 0;
  try {
    for (; prepared < caches.size(); ++prepared) caches[prepared]->prepare(counts[prepared]);
    Pass p;
    std::vector<const SeqCache*> read(caches.begin(), caches.end());
    upload_rows(p, read, counts, &caches);
    for (const auto& row : tokens) p.ids.insert(p.ids.end(), row.begin(), row.end());
    be_.upload(p.ids_t, p.ids.data());
    be_.embed(p.ids_t, p.x);
    layers(p, /*encoder=*/true);
  } catch (...) {
    for (size_t r = 0; r < prepared; ++r) caches[r]->abort();
    throw;
  }
  for (auto* c : caches) c->commit();
}

// Self-conditioning (decoder input): soft [S, H] holds soft embeddings and scatter [S] (uploaded
// before) the token of x each one belongs to, or -1 for a row of soft that belongs to none (step():
// every token has a row, -1 where its canvas has no signal yet); pre_norm -> gated MLP -> added to
// the token embeddings, then RMSNorm without scale. Tokens without a signal get exactly nothing
// added. Ops only: it may run inside a capture.
void Forward::decoder_input(Pass& p, const Tensor& soft, const Tensor& scatter) {
  const float eps = static_cast<float>(cfg_.rms_norm_eps);
  const int64_t S = soft.dim(0);
  if (S > 0) {
    const Tensor sig = p.h2.slice(0, S);
    be_.rmsnorm(soft, weight(W::kScPreNorm), soft, eps);
    be_.mlp(weight(W::kScMlp), soft, sig, p.mlp_scratch.slice(0, S));
    be_.scatter_add_rows(p.x, sig, scatter);
  }
  be_.rmsnorm(p.x, WeightRef{}, p.x, eps);
}

// The decoder step in two halves: everything that touches the host (index arrays built, planned and
// uploaded; the results downloaded) around an op sequence that reads only backend memory at
// addresses fixed by the step's signature, so that a backend may capture the sequence once and
// replay it on later steps of the same shape (run_ops).
void Forward::step(const std::vector<StepRow>& rows, int n, const StepOutput& out) {
  DG_CHECK(kv_, "KV storage not allocated");
  if (rows.empty()) return;
  be_.set_profiling(profile_decoder_);
  const int L = cfg_.canvas_length, H = cfg_.hidden_size;
  DG_CHECK(n == L, "a step denoises whole canvases (" << n << " vs " << L << ")");
  std::vector<const SeqCache*> caches;
  for (const StepRow& r : rows) caches.push_back(r.cache);
  Pass p;
  upload_rows(p, caches, std::vector<int>(rows.size(), n), nullptr);
  std::vector<float> temperature;
  std::vector<double> uniform;
  // Per token: where its self-conditioning state is kept (soft_index), read from (gather) and where
  // its signal goes (scatter); -1 where the row keeps no state (its last step) or has no signal yet
  // (its canvas's first step). Every token has a gather row, so rows with and without a signal share
  // one op sequence: a -1 gathers a zero row, whose signal is skipped by the scatter.
  std::vector<int32_t> soft_index, gather, scatter;
  bool write_soft = false;
  for (size_t r = 0; r < rows.size(); ++r) {
    const StepRow& row = rows[r];
    write_soft = write_soft || row.keep_sc;
    DG_CHECK(row.sc_slot >= 0 && row.sc_slot < sc_slots_, "self-conditioning slot " << row.sc_slot);
    p.ids.insert(p.ids.end(), row.canvas, row.canvas + n);
    uniform.insert(uniform.end(), row.uniform, row.uniform + n);
    temperature.push_back(row.temperature);
    for (int j = 0; j < n; ++j) {
      const int32_t state_row = row.sc_slot * L + j;
      soft_index.push_back(row.keep_sc ? state_row : -1);
      gather.push_back(row.sc_valid ? state_row : -1);
      scatter.push_back(row.sc_valid ? static_cast<int32_t>(r) * n + j : -1);
    }
  }
  be_.upload(p.ids_t, p.ids.data());
  be_.upload(p.temperature, temperature.data());
  be_.upload(p.uniform, uniform.data());
  be_.upload(p.soft_index, soft_index.data());
  be_.upload(p.gather, gather.data());
  be_.upload(p.scatter, scatter.data());

  // What the op sequence below bakes in besides the contents of backend memory: every shape (R, n,
  // T and each group's bucketed table width), the host-side bounds and flags ops read while they are
  // recorded (max_count, the bucketed max_cached, write_soft) and the addresses (the plan's base, the
  // self-conditioning state, the KV storage). Equal signatures give the same op calls. Nothing here
  // follows a row's own progress: which rows have a signal or keep their state is device memory.
  std::vector<int64_t> sig = {p.R, n, p.T, p.max_count, write_soft ? 1 : 0};
  for (const Pass::Group& G : p.group) sig.insert(sig.end(), {G.max_blocks, G.max_cached});
  for (const void* a : {p.ids_t.data, sc_state_->data(), kv_->layer(0).k_view.data})
    sig.push_back(static_cast<int64_t>(reinterpret_cast<uintptr_t>(a)));

  const Tensor state = Tensor::of(sc_state_->data(), act_, {static_cast<int64_t>(sc_slots_) * L, H});
  run_ops(sig, [&] {
    be_.embed(p.ids_t, p.x);
    const Tensor soft = p.h1;
    be_.gather_rows(state, p.gather, soft);
    decoder_input(p, soft, p.scatter);
    layers(p, /*encoder=*/false);  // leaves p.h = the final norm of x
    SampleArgs a;
    a.x = p.h, a.n = n, a.temperature = p.temperature, a.uniform = p.uniform;
    a.token = p.token, a.argmax = p.argmax, a.entropy = p.entropy;
    a.soft = state, a.soft_index = p.soft_index, a.write_soft = write_soft;
    be_.lm_head_sample(a);
  });
  // One download, so a step waits on the backend once.
  std::vector<int32_t> host(static_cast<size_t>(3) * p.T);
  be_.download(host.data(), p.step_out);
  std::memcpy(out.token, host.data(), sizeof(int32_t) * p.T);
  std::memcpy(out.argmax, host.data() + p.T, sizeof(int32_t) * p.T);
  std::memcpy(out.entropy, host.data() + 2 * p.T, sizeof(float) * p.T);
}

// First sight of a signature: the ops run as they are (sizing every scratch buffer the backend
// needs for them). Second: they are captured, then replayed. Later: replayed. A backend that
// dropped the capture (its scratch grew) gets it captured again.
void Forward::run_ops(const std::vector<int64_t>& sig, const std::function<void()>& ops) {
  if (!capture_ || be_.profiling()) {  // a replayed step would not be timed op by op
    ops();
    return;
  }
  auto it = graphs_.find(sig);
  if (it == graphs_.end()) {
    if (graphs_.size() >= max_graphs()) {
      auto lru = std::min_element(graphs_.begin(), graphs_.end(),
                                  [](const auto& a, const auto& b) { return a.second.last_use < b.second.last_use; });
      be_.drop_capture(lru->second.key);
      graphs_.erase(lru);
    }
    it = graphs_.emplace(sig, Graph{next_graph_key_++, false, 0}).first;
  }
  Graph& g = it->second;
  g.last_use = ++graph_clock_;
  if (!g.ran) {
    ops();
    g.ran = true;
    return;
  }
  if (be_.replay(g.key)) {
    replayed_++;
    return;
  }
  // A capture that fails is a bug (something in the sequence would allocate, synchronise or touch
  // the host, or a launch is not capturable). Nothing of the sequence has run: a capture records, it
  // does not execute. So the step runs its ops directly, as on a step's first sight, and so does every
  // later step of this Forward: slower, never wrong. The failure is reported once on stderr and counted
  // (graph_stats, scheduler_stats()["capture_failures"], the bench JSON). An error that is not about
  // capturing comes back from the direct run and fails the step.
  try {
    be_.begin_capture();
    ops();
    be_.end_capture(g.key);
  } catch (const std::exception& e) {
    be_.abort_capture();
    capture_ = false;
    drop_graphs();
    capture_failures_++;
    std::cerr << "dgemma_rt: capturing a decoder step as a graph on the " << be_.name()
              << " backend failed; steps run op by op from now on: " << e.what() << std::endl;
    ops();
    return;
  }
  captured_++;
  DG_CHECK(be_.replay(g.key), "the " << be_.name() << " backend lost a capture it had just made");
  replayed_++;
}

void Forward::logits(const std::vector<const SeqCache*>& caches, const int32_t* canvas, int n,
                     const std::vector<const float*>& sc_logits, float* out) {
  DG_CHECK(kv_, "KV storage not allocated");
  if (caches.empty()) return;
  check_supported(Op::kLmHeadLogits);
  be_.set_profiling(profile_decoder_);
  const int R = static_cast<int>(caches.size()), V = cfg_.vocab_size;
  DG_CHECK(sc_logits.empty() || static_cast<int>(sc_logits.size()) == R, "one self-conditioning pointer per row");
  Pass p;
  upload_rows(p, caches, std::vector<int>(R, n), nullptr);
  p.ids.assign(canvas, canvas + static_cast<size_t>(R) * n);
  be_.upload(p.ids_t, p.ids.data());
  std::vector<int32_t> scatter;
  for (int r = 0; r < static_cast<int>(sc_logits.size()); ++r)
    if (sc_logits[r])
      for (int j = 0; j < n; ++j) scatter.push_back(r * n + j);
  const int64_t S = static_cast<int64_t>(scatter.size());
  be_.upload(p.scatter.slice(0, S), scatter.data());
  be_.embed(p.ids_t, p.x);

  const Tensor soft = p.h1.slice(0, S);
  if (S > 0) {
    check_supported(Op::kSoftEmbedding);
    // The caller's logits, packed: only the rows that have a signal.
    auto buf = be_.allocate(static_cast<size_t>(S) * V * sizeof(float), "self-conditioning logits");
    const Tensor lg = Tensor::of(static_cast<float*>(buf->data()), {S, V});
    int64_t row = 0;
    for (int r = 0; r < R; ++r) {
      if (!sc_logits.empty() && sc_logits[r]) {
        be_.upload(lg.slice(row, n), sc_logits[r]);
        row += n;
      }
    }
    be_.soft_embedding(lg, soft);
  }
  decoder_input(p, soft, p.scatter.slice(0, S));
  layers(p, /*encoder=*/false);  // leaves p.h = the final norm of x
  auto buf = be_.allocate(static_cast<size_t>(p.T) * V * sizeof(float), "logits");
  const Tensor lg = Tensor::of(static_cast<float*>(buf->data()), {static_cast<int64_t>(p.T), V});
  be_.lm_head_logits(p.h, lg);
  be_.download(out, lg);
}

}  // namespace dgemma
