#include "backend/cuda/cuda_backend.h"

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <sstream>
#include <vector>

#include "backend/cuda/device.h"
#include "backend/registry.h"
#include "common/check.h"
#include "common/nvfp4_format.h"
#include "kernels/attention/attention.cuh"
#include "kernels/init/random_fill.cuh"
#include "kernels/layer/layer.cuh"
#include "kernels/matmul/matmul.cuh"
#include "kernels/moe/moe.cuh"
#include "kernels/fp8/fp8.cuh"
#include "kernels/nvfp4/nvfp4.cuh"
#include "kernels/norm/rmsnorm.cuh"
#include "kernels/sampler/lm_head_fused.cuh"
#include "kernels/sampler/sampler.cuh"
#ifdef DGEMMA_WITH_CUTLASS
#include "kernels/gemm/gemm.cuh"
#include "kernels/gemm/params_cache.h"
#endif

namespace dgemma::cuda {
namespace {

using bf16 = __nv_bfloat16;

#define DG_CUDA(expr) check_cuda((expr), #expr, __FILE__, __LINE__)

void check_cuda(cudaError_t e, const char* what, const char* file, int line) {
  if (e == cudaSuccess) return;
  cudaGetLastError();  // clear a non-sticky error so the next call does not see it
  std::ostringstream o;
  o << "CUDA error in " << what << ": " << cudaGetErrorString(e) << " (" << file << ":" << line << ")";
  if (e == cudaErrorMemoryAllocation) throw ResourceError(o.str());
  throw Error(o.str());
}

// Makes `device` current for a scope. In destructors pass nothrow = true: freeing memory at exit
// (driver shutting down) must not throw out of a destructor.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device, bool nothrow = false) {
    if (cudaGetDevice(&prev_) != cudaSuccess) {
      cudaGetLastError();
      prev_ = -1;
    }
    if (prev_ == device) {
      prev_ = -1;
    } else if (nothrow) {
      if (cudaSetDevice(device) != cudaSuccess) cudaGetLastError();
    } else {
      DG_CUDA(cudaSetDevice(device));
    }
  }
  ~DeviceGuard() {
    if (prev_ >= 0) cudaSetDevice(prev_);
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int prev_ = -1;
};

// The backend's stream as its buffers see it: null once the backend is gone (its release() waited for
// the stream, so nothing is left queued), so a KV cache copied out after its engine needs no stream.
struct StreamHandle {
  std::mutex mu;
  cudaStream_t stream = nullptr;
};

// Device memory. Freed on its device; read/write are synchronous copies ordered on the backend's
// stream: the copy is queued behind the kernels that write what is read (or read what is
// overwritten), and waited for. Not cudaMemcpy: it runs on the legacy default stream, which a
// non-blocking stream does not wait for, and from pageable memory it may return before the DMA lands.
// Not a device-wide wait either: another engine on the GPU may be capturing a graph, which a wait on
// its stream would break. Never called on this backend's stream while it captures (load time, KV copies
// out between passes). Only once the backend is gone (no stream left) does a write wait for the whole
// device; nothing writes then today.
class DeviceBuffer final : public Buffer {
 public:
  DeviceBuffer(int device, void* p, size_t bytes, std::shared_ptr<MemoryCounter> counter,
               std::shared_ptr<StreamHandle> stream)
      : Buffer(p, bytes), device_(device), counter_(std::move(counter)), stream_(std::move(stream)) {
    counter_->add(bytes);
  }
  ~DeviceBuffer() override {
    DeviceGuard g(device_, /*nothrow=*/true);
    cudaFree(data());
    counter_->sub(bytes());
  }
  void read(size_t offset, size_t n, void* dst) const override {
    check_range(offset, n);
    copy(dst, static_cast<const char*>(data()) + offset, n, cudaMemcpyDeviceToHost);
  }
  void write(size_t offset, size_t n, const void* src) override {
    check_range(offset, n);
    copy(static_cast<char*>(data()) + offset, src, n, cudaMemcpyHostToDevice);
  }

 private:
  void copy(void* dst, const void* src, size_t n, cudaMemcpyKind kind) const {
    if (n == 0) return;
    DeviceGuard g(device_);
    std::lock_guard<std::mutex> lock(stream_->mu);
    if (stream_->stream) {
      DG_CUDA(cudaMemcpyAsync(dst, src, n, kind, stream_->stream));
      DG_CUDA(cudaStreamSynchronize(stream_->stream));
    } else {
      DG_CUDA(cudaMemcpy(dst, src, n, kind));
      if (kind == cudaMemcpyHostToDevice) DG_CUDA(cudaDeviceSynchronize());  // a pageable copy's DMA has landed
    }
  }

  int device_;
  std::shared_ptr<MemoryCounter> counter_;
  std::shared_ptr<StreamHandle> stream_;
};

std::string format_gib(double bytes) {
  std::ostringstream o;
  o.precision(bytes < 1e9 ? 1 : 2);
  o << std::fixed << (bytes < 1e9 ? bytes / 1048576.0 : bytes / 1073741824.0) << (bytes < 1e9 ? " MiB" : " GiB");
  return o.str();
}

uint16_t f32_to_bf16_bits(float f) {  // round to nearest even, NaN kept quiet
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40);
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

int parse_index(const std::string& device) {
  const size_t colon = device.find(':');
  return colon == std::string::npos ? 0 : std::stoi(device.substr(colon + 1));
}

size_t align256(size_t n) { return (n + 255) / 256 * 256; }

bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

template <typename T>
T* as(const Tensor& t) {
  return static_cast<T*>(t.data);
}

void expect(const Tensor& t, ScalarType dt, const char* op, const char* what) {
  DG_CHECK(t.dtype == dt && t.contiguous(), op << ": " << what << " must be contiguous " << scalar_name(dt) << " (got "
                                               << scalar_name(t.dtype) << ")");
}

class CudaBackend final : public Backend {
 public:
  CudaBackend(int device, const ModelConfig& cfg, const ModelWeights& w);
  ~CudaBackend() override;
  void release() noexcept;  // the stream, graphs, events and pinned staging (destructor, failed constructor)

  std::string name() const override { return "cuda"; }
  bool supports(Op op) const override { return op != Op::kCount; }
  ScalarType act_dtype() const override { return ScalarType::kBF16; }
  ScalarType kv_dtype() const override { return ScalarType::kBF16; }
  std::shared_ptr<Buffer> allocate(size_t bytes, const char* what) override;
  void upload(const Tensor& dst, const void* src) override;
  void download(void* dst, const Tensor& src) override;

  void embed(const Tensor& ids, const Tensor& out) override;
  void rmsnorm(const Tensor& x, WeightRef w, const Tensor& out, float eps) override;
  void linear(WeightRef w, const Tensor& x, const Tensor& y) override;
  void copy(const Tensor& src, const Tensor& dst) override;
  void head_norm_rope(const Tensor& x, WeightRef w, const Tensor& positions, const Tensor& inv_freq,
                      float eps) override;
  void head_norm_rope_qkv(const HeadNorm& q, const HeadNorm& k, const HeadNorm& v, const Tensor& positions,
                          const Tensor& inv_freq, float eps) override;
  void kv_write(const Tensor& k, const Tensor& v, const Tensor& slot, const Tensor& k_cache,
                const Tensor& v_cache) override;
  void attention(const AttentionArgs& a) override;
  void residual_norm_add(const Tensor& x, const Tensor& h, WeightRef w, float eps) override;
  void residual_norm_add_norms(const Tensor& x, const Tensor& h, WeightRef w, float eps, const NormOut& a,
                               const NormOut& b) override;
  void ffn_combine_norm(int layer, bool encoder, const Tensor& x, const Tensor& dense, const Tensor& moe, float eps,
                        const NormOut& next) override;
  void mlp(WeightRef mlp, const Tensor& x, const Tensor& out, const Tensor& scratch) override;
  void moe_router(int layer, const Tensor& x, const Tensor& topk_idx, const Tensor& topk_w, float eps) override;
  size_t moe_workspace_bytes(int tokens) const override;
  void moe_experts(int layer, const Tensor& x, const Tensor& topk_idx, const Tensor& topk_w, const Tensor& out,
                   const Tensor& workspace) override;
  void ffn_combine(int layer, bool encoder, const Tensor& x, const Tensor& dense, const Tensor& moe,
                   float eps) override;
  void gather_rows(const Tensor& src, const Tensor& index, const Tensor& dst) override;
  void scatter_add_rows(const Tensor& dst, const Tensor& src, const Tensor& index) override;
  void lm_head_sample(const SampleArgs& a) override;
  void lm_head_logits(const Tensor& x, const Tensor& logits) override;
  void soft_embedding(const Tensor& logits, const Tensor& out) override;

  // CUDA graphs: stream capture (thread-local mode, so another thread's CUDA calls are neither
  // captured nor refused) into one executable graph per key, launched on the stream.
  bool can_capture() const override { return graphs_enabled_; }
  void begin_capture() override;
  void end_capture(uint64_t key) override;
  void abort_capture() override;
  bool replay(uint64_t key) override;
  void drop_capture(uint64_t key) override;
  void drop_captures() override;

  // Profiling: a pooled cudaEvent pair recorded on the stream around each op (not while capturing),
  // resolved to elapsed times at the next download or take_profile, which wait for the stream anyway.
  bool can_profile() const override { return true; }
  void set_profiling(bool on) override { profiling_ = on; }
  bool profiling() const override { return profiling_; }
  std::vector<OpTime> take_profile() override;
  MemoryStats memory_stats() const override;

 private:
  class OpTimer;
  kernels::HeadNormRopeParams head_norm_params(const Tensor& x, WeightRef w, const Tensor& positions,
                                               const Tensor& inv_freq, float eps);
  // The residual kernels behind residual_norm_add(_norms) and ffn_combine(_norm), with their trailing norms.
  kernels::TrailingNorm<bf16> trailing(const NormOut& n, const Tensor& x, const char* op);
  void residual_norm_add_kernel(const Tensor& x, const Tensor& h, WeightRef w, float eps,
                                const kernels::TrailingNorm<bf16>& a, const kernels::TrailingNorm<bf16>& b);
  void ffn_combine_kernel(int layer, bool encoder, const Tensor& x, const Tensor& dense, const Tensor& moe, float eps,
                          const kernels::TrailingNorm<bf16>& next);
  cudaEvent_t take_event();
  void resolve_profile();  // the stream has been synchronised: every pending pair has completed
  // A weight on the device: bf16 matrices [rows, cols] (experts: [E * rows_per_expert, cols]),
  // float32 vectors.
  struct Vec {
    std::shared_ptr<Buffer> buf;
    const float* p = nullptr;
    int64_t n = 0;
  };
  struct Mat {
    std::shared_ptr<Buffer> buf;
    const bf16* p = nullptr;  // bf16 [rows, cols], or null when FP8
    const uint8_t* q = nullptr;  // FP8 (W8A8 GEMM): E4M3 codes [rows, cols] ...
    Vec scale;                   // ... and one scale per row
    int64_t rows = 0, cols = 0;
    bool fp8() const { return q != nullptr; }
  };
  // One MoE projection of every expert: bf16 [E * n, k], or NVFP4 with one global scale per expert,
  // either in the W4A16 GEMM's pre-shuffled layout [E, grouped_gemm_nvfp4_weight_bytes(n, k, gated)]
  // or, native (Blackwell block-scaled GEMM), as stored: codes [E, n, k/2] and the E4M3 block scales
  // in the MMA layout [E, nvfp4::sf_bytes(n, k/16)].
  struct Experts {
    Mat bf;
    std::shared_ptr<Buffer> w4, sf;
    const uint8_t* w4p = nullptr;  // W4A16: pre-shuffled; native: codes
    const uint8_t* sfp = nullptr;  // native only
    Vec global;
    int64_t n = 0, k = 0;
    bool native = false;
    bool nvfp4() const { return w4p != nullptr; }
  };
  // The MoE workspace's regions the native NVFP4 path quantizes the activations into.
  struct Nvfp4x4Scratch {
    uint8_t* q = nullptr;        // packed E2M1 [M, k/2]
    uint8_t* sf = nullptr;       // block scales in the MMA layout (quantize_act_nvfp4_sf_bytes)
    int32_t* starts = nullptr;   // [E + 1]
    float* global = nullptr;     // [1]
    void* ws = nullptr;          // the GEMM's workspace
    size_t ws_bytes = 0;
  };
  struct Layer {
    Mat q, k, v, o, mlp_gate_up, mlp_down, router;
    Experts experts_gate_up, experts_down;
    Vec q_norm, k_norm, input_norm, post_attn_norm, pre_ffn_norm, pre_ffn_norm2, post_ffn_norm, post_ffn_norm1,
        post_ffn_norm2, router_scale, per_expert_scale;
    float encoder_scalar = 1.f, decoder_scalar = 1.f;
  };
  // Scratch memory the ops keep between calls, grown on demand (never inside a pass's hot loop once
  // the largest pass has run).
  enum Scratch { kAttnWs, kRouterWs, kLogits, kProbs, kSoft, kSplitK, kOnes, kZeros, kDiscard, kFp8Act, kFusedHead, kNumScratch };

  void upload_weights(const ModelWeights& w);
  // fp8_gemm: the matrix is only ever a GEMM's weight (gemm()), so FP8 may stay FP8 for the W8A8 GEMM;
  // anything read directly through Mat::p (embedding, router, experts' bf16 form) is dequantized.
  Mat upload_mat(const std::vector<std::string>& names, int64_t rows, int64_t cols, bool fp8_gemm = false);
  Mat upload_fp8(const std::vector<const WeightSource*>& parts, int64_t rows, int64_t cols);
  Vec upload_vec(const std::string& name, int64_t n);
  Experts upload_experts(const std::string& name, int64_t n, int64_t k, bool gated);
  bool use_nvfp4x4(int64_t n, int64_t k);
  std::string check_nvfp4x4(int n, int k);
  cudaError_t launch_nvfp4x4(const kernels::GroupedGemmNvfp4x4Params& p);
  void gemm_nvfp4x4(const Experts& w, const bf16* x, size_t x_elems, const int32_t* gather, int gather_div,
                    const int32_t* offsets, int64_t m_total, bf16* y, const Nvfp4x4Scratch& s, int G);
  const Mat& matrix(WeightRef w) const;
  const float* norm_weight(WeightRef w) const;
  void* scratch(Scratch s, size_t bytes);
  void gemm(const Mat& w, const bf16* x, void* y, int64_t M, bool y_f32 = false, float alpha = 1.f,
            float softcap = 0.f);
  void grouped_gemm(const Experts& w, const bf16* a, bf16* d, const int32_t* offsets, int64_t m_total, void* ws,
                    size_t ws_bytes);
  size_t grouped_ws_bytes() const;
  void soft_rows(const float* logits_in_place, int64_t rows, bf16* probs, bf16* out, float* temperature,
                 const double* uniform, int32_t* token, int32_t* argmax, float* entropy, int canvas);
  void probs_times_embedding(const bf16* probs, int64_t rows, bf16* out);

  int device_;
  const ModelConfig& cfg_;
  const ModelWeights* weights_ = nullptr;  // while uploading
  cudaStream_t stream_ = nullptr;
  void* staging_ = nullptr;  // pinned host memory for uploads
  size_t staging_bytes_ = 0, staged_ = 0;
  bool cutlass_ = false;  // the CUTLASS sm_90a GEMMs run on this device
  // The CUTLASS GEMMs' prepared launches (kernels/gemm/params_cache.h): an encoder pass or an
  // uncaptured step that repeats a GEMM's pointers and sizes only launches it. Its entries go with
  // the backend, and with them every weight pointer they name.
#ifdef DGEMMA_WITH_CUTLASS
  kernels::ParamsCache gemm_params_;
#endif
  // NVFP4 experts on Blackwell: the block-scaled NVFP4 x NVFP4 grouped GEMM of this device (sm_100a on
  // compute capability 10.0, sm_120a on 12.0, builds with CUTLASS), else kNone and the W4A16 kernel.
  // Checked once at the first NVFP4 upload (check_nvfp4x4); a failure turns it off for good.
  enum class Nvfp4x4 { kNone, kSm100, kSm120 };
  Nvfp4x4 nvfp4x4_ = Nvfp4x4::kNone;
  // The W4A16 kernel: kAuto picks wgmma on Hopper from ~48 tokens per expert (nvfp4.cuh);
  // DGEMMA_CUDA_W4A16=mma or =wgmma forces one (debugging, the GPU check's comparisons).
  kernels::W4A16Path w4a16_path_ = kernels::W4A16Path::kAuto;
  bool nvfp4x4_checked_ = false, nvfp4x4_used_ = false;
  // Whether any layer's gate_up reads xp (bf16 experts) or writes h (bf16, Blackwell native): the W4A16
  // path does neither, and at prefill sizes the two are GBs of MoE workspace.
  bool moe_xp_ = false, moe_h_ = false;
  size_t nvfp4x4_ws_ = 0;  // the GEMM's workspace for E experts
  // The fused LM head + sampler + self-conditioning pass (one read of the tied embedding per step).
  // Opt-in with DGEMMA_CUDA_FUSED_LM_HEAD=1 until a GPU run has checked it against the per-row path
  // (tests/test_cuda_lm_head.py, tests/test_cuda_backend.py); Hopper and Blackwell datacenter only
  // (it needs 166 KB of shared memory per CTA, more than sm_120 has).
  bool fused_head_ = false;
  Mat embed_, lm_head_, sc_gate_up_, sc_down_;
  float embed_scale_ = 1.0f;  // ModelWeights::embed_scale: sqrt(H) in the model's dtype
  Vec final_norm_, sc_pre_norm_;
  std::vector<Layer> layers_;
  std::shared_ptr<Buffer> scratch_[kNumScratch];
  bool graphs_enabled_ = true;  // DGEMMA_CUDA_GRAPHS=0 turns capture off (debugging)
  bool capturing_ = false;
  std::map<uint64_t, cudaGraphExec_t> graphs_;
  std::shared_ptr<MemoryCounter> memory_ = std::make_shared<MemoryCounter>();
  std::shared_ptr<StreamHandle> stream_handle_ = std::make_shared<StreamHandle>();  // stream_, for buffers
  // Upload progress (ModelWeights::progress): tensors uploaded of the checkpoint's total.
  int uploaded_ = 0, upload_total_ = 0;
  void report_upload(int tensors);
  bool profiling_ = false;
  struct Timed {
    Op op;
    cudaEvent_t begin, end;
  };
  std::vector<Timed> timed_;          // recorded, not yet read back
  std::vector<cudaEvent_t> events_;  // free events
  OpProfile profile_;
  // Pending pairs past this many are read back at once (a wait in the middle of a long pass, e.g.
  // an encoder pass that downloads nothing): bounds the events held.
  static constexpr size_t kMaxPendingOps = 4096;
};

// Records the op's begin event when constructed and its end event when it goes, on the backend's
// stream; inert (one flag test) when not profiling or while capturing.
class CudaBackend::OpTimer {
 public:
  OpTimer(CudaBackend& be, Op op) : be_(be.profiling_ && !be.capturing_ ? &be : nullptr), op_(op) {
    if (!be_) return;
    DeviceGuard g(be_->device_);
    begin_ = be_->take_event();
    DG_CUDA(cudaEventRecord(begin_, be_->stream_));
  }
  ~OpTimer() {
    if (!be_) return;
    try {  // a failure here loses one sample; the op's own errors surface on their own
      DeviceGuard g(be_->device_);
      cudaEvent_t end = be_->take_event();
      be_->timed_.push_back({op_, begin_, end});
      DG_CUDA(cudaEventRecord(end, be_->stream_));
      if (be_->timed_.size() >= kMaxPendingOps) {
        DG_CUDA(cudaStreamSynchronize(be_->stream_));
        be_->resolve_profile();
      }
    } catch (...) {
    }
  }
  OpTimer(const OpTimer&) = delete;
  OpTimer& operator=(const OpTimer&) = delete;

 private:
  CudaBackend* be_;
  Op op_;
  cudaEvent_t begin_ = nullptr;
};

cudaEvent_t CudaBackend::take_event() {
  if (!events_.empty()) {
    cudaEvent_t e = events_.back();
    events_.pop_back();
    return e;
  }
  cudaEvent_t e = nullptr;
  DG_CUDA(cudaEventCreate(&e));  // timing enabled
  return e;
}

void CudaBackend::resolve_profile() {
  for (const Timed& t : timed_) {
    float ms = 0;
    if (cudaEventElapsedTime(&ms, t.begin, t.end) == cudaSuccess) profile_.add(t.op, ms * 1e-3);
    else cudaGetLastError();
    events_.push_back(t.begin), events_.push_back(t.end);
  }
  timed_.clear();
}

std::vector<OpTime> CudaBackend::take_profile() {
  DG_CHECK(!capturing_, "internal error: take_profile while capturing a CUDA graph");
  if (!timed_.empty()) {
    DeviceGuard g(device_);
    DG_CUDA(cudaStreamSynchronize(stream_));
    resolve_profile();
  }
  return profile_.take();
}

MemoryStats CudaBackend::memory_stats() const {
  MemoryStats m = memory_->stats();
  DeviceGuard g(device_);
  if (cudaMemGetInfo(&m.device_free, &m.device_total) != cudaSuccess) {
    cudaGetLastError();
    m.device_free = m.device_total = 0;
  }
  return m;
}

void CudaBackend::report_upload(int tensors) {
  uploaded_ += tensors;
  if (weights_ && weights_->progress)
    weights_->progress(ModelWeights::Phase::kUpload, std::min(uploaded_, upload_total_), upload_total_);
}

CudaBackend::CudaBackend(int device, const ModelConfig& cfg, const ModelWeights& w)
    : device_(device), cfg_(cfg), embed_scale_(w.embed_scale) {
  DeviceGuard g(device_);
  DG_CUDA(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking));
  stream_handle_->stream = stream_;
  // A throw below (a bad setting, out of memory while uploading) skips the destructor: release here.
  try {
    const char* graphs = std::getenv("DGEMMA_CUDA_GRAPHS");
    graphs_enabled_ = !(graphs && std::string(graphs) == "0");
#ifdef DGEMMA_WITH_CUTLASS
    cutlass_ = kernels::sm90_gemm_supported();
    // DGEMMA_CUDA_NVFP4=w4a16 keeps NVFP4 experts on the W4A16 kernel on Blackwell too (debugging, tests).
    const char* nvfp4_path = std::getenv("DGEMMA_CUDA_NVFP4");
    if (!(nvfp4_path && std::string(nvfp4_path) == "w4a16")) {
      if (kernels::sm100_nvfp4_supported()) nvfp4x4_ = Nvfp4x4::kSm100;
      else if (kernels::sm120_nvfp4_supported()) nvfp4x4_ = Nvfp4x4::kSm120;
    }
#endif
    if (const char* w4a16 = std::getenv("DGEMMA_CUDA_W4A16")) {
      const std::string v = w4a16;
      DG_REQUIRE(v == "auto" || v == "mma" || v == "wgmma", InvalidArgument,
                 "DGEMMA_CUDA_W4A16 must be auto, mma or wgmma, got '" << v << "'");
      if (v == "mma") w4a16_path_ = kernels::W4A16Path::kMmaSync;
      if (v == "wgmma") {
        DG_REQUIRE(kernels::grouped_gemm_nvfp4_wgmma_supported(), Unsupported,
                   "DGEMMA_CUDA_W4A16=wgmma: the wgmma W4A16 kernel needs a compute capability 9.0 GPU and a build "
                   "with sm_90a and CUTLASS");
        w4a16_path_ = kernels::W4A16Path::kWgmma;
      }
    }
    const char* fused = std::getenv("DGEMMA_CUDA_FUSED_LM_HEAD");
    cudaDeviceProp prop{};
    DG_CUDA(cudaGetDeviceProperties(&prop, device_));
    fused_head_ = fused && std::string(fused) == "1" && (prop.major == 9 || prop.major == 10);
    upload_weights(w);
  } catch (...) {
    release();
    throw;
  }
}

CudaBackend::~CudaBackend() { release(); }

void CudaBackend::release() noexcept {
  DeviceGuard g(device_, /*nothrow=*/true);
  if (capturing_) {  // abort_capture, without its throwing guard
    capturing_ = false;
    cudaGraph_t graph = nullptr;
    cudaStreamEndCapture(stream_, &graph);
    if (graph) cudaGraphDestroy(graph);
  }
  if (stream_) cudaStreamSynchronize(stream_);
  {
    std::lock_guard<std::mutex> lock(stream_handle_->mu);  // buffers that outlive the backend: no stream
    stream_handle_->stream = nullptr;
  }
  for (auto& [key, exec] : graphs_) cudaGraphExecDestroy(exec);
  graphs_.clear();
  for (const Timed& t : timed_) cudaEventDestroy(t.begin), cudaEventDestroy(t.end);
  timed_.clear();
  for (cudaEvent_t e : events_) cudaEventDestroy(e);
  events_.clear();
  if (stream_) cudaStreamDestroy(stream_);
  stream_ = nullptr;
  if (staging_) cudaFreeHost(staging_);
  staging_ = nullptr;
}

std::shared_ptr<Buffer> CudaBackend::allocate(size_t bytes, const char* what) {
  DG_CHECK(!capturing_, "internal error: allocating the " << what << " while capturing a CUDA graph");
  DeviceGuard g(device_);
  void* p = nullptr;
  const cudaError_t e = cudaMalloc(&p, std::max<size_t>(bytes, 1));
  if (e != cudaSuccess) {
    cudaGetLastError();
    size_t free_b = 0, total_b = 0;
    cudaMemGetInfo(&free_b, &total_b);
    DG_THROW(ResourceError, "out of GPU memory: the " << what << " needs " << format_gib(double(bytes)) << " but GPU "
                                                      << device_ << " has " << format_gib(double(free_b)) << " free of "
                                                      << format_gib(double(total_b)) << " (" << cudaGetErrorString(e)
                                                      << ")");
  }
  return std::make_shared<DeviceBuffer>(device_, p, bytes, memory_, stream_handle_);
}

// Uploads go through a pinned staging buffer, so each is a truly asynchronous copy queued behind the
// pass's kernels (a copy from pageable memory would make the host wait). The staging space is reused
// after every download, which synchronises the stream: every copy staged before it has run.
void CudaBackend::upload(const Tensor& dst, const void* src) {
  // Captured, the copy would read the staging buffer again at every replay, long after it was reused.
  DG_CHECK(!capturing_, "internal error: upload while capturing a CUDA graph");
  DG_CHECK(dst.contiguous(), "upload into a strided tensor");
  const size_t n = dst.bytes();
  if (n == 0) return;
  DeviceGuard g(device_);
  const size_t need = align256(n);
  if (staged_ + need > staging_bytes_) {
    DG_CUDA(cudaStreamSynchronize(stream_));  // what was staged has been copied
    staged_ = 0;
    if (need > staging_bytes_) {
      if (staging_) cudaFreeHost(staging_);
      staging_ = nullptr;
      staging_bytes_ = std::max<size_t>(need, size_t{4} << 20);
      DG_CUDA(cudaMallocHost(&staging_, staging_bytes_));
    }
  }
  char* at = static_cast<char*>(staging_) + staged_;
  std::memcpy(at, src, n);
  staged_ += need;
  DG_CUDA(cudaMemcpyAsync(dst.data, at, n, cudaMemcpyHostToDevice, stream_));
}

void CudaBackend::download(void* dst, const Tensor& src) {
  DG_CHECK(!capturing_, "internal error: download while capturing a CUDA graph");
  DG_CHECK(src.contiguous(), "download of a strided tensor");
  DeviceGuard g(device_);
  if (src.bytes() > 0) DG_CUDA(cudaMemcpyAsync(dst, src.data, src.bytes(), cudaMemcpyDeviceToHost, stream_));
  DG_CUDA(cudaStreamSynchronize(stream_));  // also where a failed kernel of the pass reports
  staged_ = 0;
  if (!timed_.empty()) resolve_profile();
}

// ---------------------------------------------------------------------------------------------
// CUDA graphs

void CudaBackend::begin_capture() {
  DG_CHECK(graphs_enabled_ && !capturing_, "internal error: begin_capture " << (capturing_ ? "twice" : "with graphs off"));
  DeviceGuard g(device_);
  DG_CUDA(cudaStreamBeginCapture(stream_, cudaStreamCaptureModeThreadLocal));
  capturing_ = true;
}

void CudaBackend::end_capture(uint64_t key) {
  DG_CHECK(capturing_, "internal error: end_capture without begin_capture");
  DeviceGuard g(device_);
  capturing_ = false;
  cudaGraph_t graph = nullptr;
  DG_CUDA(cudaStreamEndCapture(stream_, &graph));  // fails when a captured call was invalid
  cudaGraphExec_t exec = nullptr;
  const cudaError_t e = cudaGraphInstantiate(&exec, graph, 0);
  cudaGraphDestroy(graph);
  DG_CUDA(e);
  drop_capture(key);
  graphs_[key] = exec;
}

void CudaBackend::abort_capture() {
  if (!capturing_) return;
  DeviceGuard g(device_);
  capturing_ = false;
  cudaGraph_t graph = nullptr;
  cudaStreamEndCapture(stream_, &graph);  // an invalidated capture returns an error and no graph
  if (graph) cudaGraphDestroy(graph);
  cudaGetLastError();
}

bool CudaBackend::replay(uint64_t key) {
  DG_CHECK(!capturing_, "internal error: replay while capturing a CUDA graph");
  auto it = graphs_.find(key);
  if (it == graphs_.end()) return false;
  DeviceGuard g(device_);
  DG_CUDA(cudaGraphLaunch(it->second, stream_));
  return true;
}

// An executable graph still running is freed when it completes (cudaGraphExecDestroy).
void CudaBackend::drop_capture(uint64_t key) {
  auto it = graphs_.find(key);
  if (it == graphs_.end()) return;
  DeviceGuard g(device_);
  cudaGraphExecDestroy(it->second);
  graphs_.erase(it);
}

void CudaBackend::drop_captures() {
  DeviceGuard g(device_);
  for (auto& [key, exec] : graphs_) cudaGraphExecDestroy(exec);
  graphs_.clear();
}

// ---------------------------------------------------------------------------------------------
// Weights

CudaBackend::Mat CudaBackend::upload_mat(const std::vector<std::string>& names, int64_t rows, int64_t cols,
                                         bool fp8_gemm) {
  std::vector<const WeightSource*> parts;
  for (const std::string& name : names) parts.push_back(&weights_->source(name));

  const bool all_fp8 = std::all_of(parts.begin(), parts.end(), [](const WeightSource* s) {
    return !s->synthetic() && s->format == WeightSource::Format::kFp8;
  });
  // FP8 dense layers run on the W8A8 GEMM (sm_90a, CUTLASS); elsewhere they are dequantized to bf16.
  if (fp8_gemm && all_fp8 && cutlass_ && cols % 16 == 0 && rows % 8 == 0) {
    Mat m = upload_fp8(parts, rows, cols);
    report_upload(static_cast<int>(names.size()));
    return m;
  }
  Mat m;
  m.rows = rows, m.cols = cols;
  m.buf = allocate(static_cast<size_t>(rows * cols) * 2, "weights");
  m.p = static_cast<const bf16*>(m.buf->data());
  constexpr int64_t kChunk = int64_t{1} << 22;  // elements per staged copy
  std::vector<uint16_t> bits;
  std::vector<float> f32;
  int64_t offset = 0;
  for (const std::string& name : names) {
    const WeightSource& s = weights_->source(name);
    const int64_t n = s.numel();
    DG_CHECK(offset + n <= rows * cols, "weight '" << name << "' overflows its device matrix");
    if (s.synthetic()) {  // made on the device: the values the host would compute, rounded to bf16
      DG_CUDA(kernels::fill_random(const_cast<bf16*>(m.p) + offset, n, s.seed, 0, s.amplitude, s.offset, stream_));
      offset += n;
      continue;
    }
    for (int64_t b = 0; b < n; b += kChunk) {
      const int64_t c = std::min(kChunk, n - b);
      const void* src;
      if (s.format == WeightSource::Format::kFloat && s.tensor->dtype == DType::BF16) {
        src = s.tensor->data + 2 * b;  // as stored
      } else {
        f32.resize(c), bits.resize(c);
        s.to_f32(b, c, f32.data());
        for (int64_t i = 0; i < c; ++i) bits[i] = f32_to_bf16_bits(f32[i]);
        src = bits.data();
      }
      m.buf->write(static_cast<size_t>(offset + b) * 2, static_cast<size_t>(c) * 2, src);
    }
    offset += n;
  }
  DG_CHECK(offset == rows * cols, "device matrix of " << rows << " x " << cols << " filled with " << offset);
  report_upload(static_cast<int>(names.size()));
  return m;
}

// FP8 weights as stored: E4M3 codes (the loader refused NaN codes) and one scale
// per output row (a per-tensor scale repeated).
CudaBackend::Mat CudaBackend::upload_fp8(const std::vector<const WeightSource*>& parts, int64_t rows, int64_t cols) {
  Mat m;
  m.rows = rows, m.cols = cols;
  m.buf = allocate(static_cast<size_t>(rows * cols), "weights");
  m.q = static_cast<const uint8_t*>(m.buf->data());
  std::vector<float> scales;
  size_t offset = 0;
  for (const WeightSource* s : parts) {
    const TensorRef& t = *s->tensor;
    m.buf->write(offset, t.nbytes, t.data);
    offset += t.nbytes;
    const int64_t part_rows = s->numel() / cols;
    const size_t sn = s->scale->nbytes / 4;
    for (int64_t r = 0; r < part_rows; ++r) {
      float v;
      std::memcpy(&v, s->scale->data + 4 * (sn == 1 ? 0 : static_cast<size_t>(r)), 4);
      scales.push_back(v);
    }
  }
  DG_CHECK(static_cast<int64_t>(offset) == rows * cols && static_cast<int64_t>(scales.size()) == rows,
           "FP8 matrix of " << rows << " x " << cols);
  m.scale.n = rows;
  m.scale.buf = allocate(scales.size() * 4, "weights");
  m.scale.buf->write(0, scales.size() * 4, scales.data());
  m.scale.p = static_cast<const float*>(m.scale.buf->data());
  return m;
}

// MoE experts: NVFP4 as stored either stays as stored with its block scales put into the MMA layout
// on the device (Blackwell, use_nvfp4x4), or goes to the W4A16 layout by a device shuffle; the stored
// codes and scales pass through device memory once. Anything else becomes bf16 [E * n, k].
CudaBackend::Experts CudaBackend::upload_experts(const std::string& name, int64_t n, int64_t k, bool gated) {
  const WeightSource& s = weights_->source(name);
  const int64_t E = cfg_.num_experts;
  Experts x;
  x.n = n, x.k = k;
  if (s.format != WeightSource::Format::kNvfp4 || k % 16 != 0) {
    x.bf = upload_mat({name}, E * n, k);
    return x;
  }
  const size_t code_bytes = static_cast<size_t>(E * n * k / 2), scale_bytes = static_cast<size_t>(E * n * k / 16);
  bool unsigned_scales = true;  // the block-scaled MMAs read UE4M3: a negative scale needs the W4A16 kernel
  if (!s.synthetic()) {  // (the loader refused NaN scales)
    const TensorRef& sc = *s.scale;
    for (size_t i = 0; i < sc.nbytes && unsigned_scales; ++i) unsigned_scales = !(sc.data[i] & 0x80);
  }
  x.native = unsigned_scales && use_nvfp4x4(n, k);
  auto scales = allocate(scale_bytes, "NVFP4 staging");
  std::shared_ptr<Buffer> packed;
  if (x.native) {
    x.w4 = allocate(code_bytes, "weights");  // the codes stay as stored
    packed = x.w4;
    x.sf = allocate(nvfp4::sf_bytes(static_cast<int>(n), static_cast<int>(k / 16)) * E, "weights");
    x.sfp = static_cast<const uint8_t*>(x.sf->data());
  } else {
    x.w4 = allocate(kernels::grouped_gemm_nvfp4_weight_bytes(static_cast<int>(n), static_cast<int>(k), gated) * E,
                    "weights");
    packed = allocate(code_bytes, "NVFP4 staging");
  }
  x.w4p = static_cast<const uint8_t*>(x.w4->data());
  if (s.synthetic()) {  // random experts made on the device, in the stored form
    DG_CUDA(kernels::fill_random_nvfp4(static_cast<uint8_t*>(packed->data()), static_cast<uint8_t*>(scales->data()),
                                       E * n * k, s.seed, stream_));
  } else {
    packed->write(0, code_bytes, s.tensor->data);
    scales->write(0, scale_bytes, s.scale->data);
  }
  if (x.native) {
    DG_CUDA(kernels::swizzle_scales_nvfp4(static_cast<const uint8_t*>(scales->data()), static_cast<int>(E),
                                          static_cast<int>(n), static_cast<int>(k / 16), const_cast<uint8_t*>(x.sfp),
                                          stream_));
    nvfp4x4_used_ = true;
  } else {
    DG_CUDA(kernels::shuffle_w4a16(static_cast<const uint8_t*>(packed->data()),
                                   static_cast<const uint8_t*>(scales->data()), static_cast<int>(E),
                                   static_cast<int>(n), static_cast<int>(k), gated, const_cast<uint8_t*>(x.w4p),
                                   stream_));
  }
  DG_CUDA(cudaStreamSynchronize(stream_));  // before the staging buffers go
  std::vector<float> global(E, s.amplitude / 6.0f);  // synthetic: common/random_weights.h
  if (!s.synthetic()) {
    const size_t gn = s.global_scale->nbytes / 4;
    for (int64_t e = 0; e < E; ++e)
      std::memcpy(&global[e], s.global_scale->data + 4 * (gn == 1 ? 0 : static_cast<size_t>(e)), 4);
  }
  x.global.n = E;
  x.global.buf = allocate(global.size() * 4, "weights");
  x.global.buf->write(0, global.size() * 4, global.data());
  x.global.p = static_cast<const float*>(x.global.buf->data());
  report_upload(1);
  return x;
}

// Whether an NVFP4 projection [E, n, k] runs on the block-scaled GEMM: this device has one, the shape
// suits its TMA rows (k % 32, n % 8; the released model's 2816 / 704 / 1408 do), and the load-time
// check of both MoE shapes passed. The check runs once; if a launch fails or its result is off, it
// says so on stderr and every projection of this backend takes the W4A16 kernel.
bool CudaBackend::use_nvfp4x4(int64_t n, int64_t k) {
  auto fits = [](int64_t n_, int64_t k_) { return n_ > 0 && k_ > 0 && k_ % 32 == 0 && n_ % 8 == 0; };
  if (nvfp4x4_ == Nvfp4x4::kNone || !fits(n, k)) return false;
  if (!nvfp4x4_checked_) {
    nvfp4x4_checked_ = true;
    const int64_t H = cfg_.hidden_size, Im = cfg_.moe_intermediate_size;
    std::string why;
    for (const auto& [cn, ck] : {std::pair<int64_t, int64_t>{2 * Im, H}, {H, Im}})  // gate_up, down
      if (why.empty() && fits(cn, ck)) why = check_nvfp4x4(static_cast<int>(cn), static_cast<int>(ck));
#ifdef DGEMMA_WITH_CUTLASS
    if (why.empty()) {
      nvfp4x4_ws_ = align256(nvfp4x4_ == Nvfp4x4::kSm100 ? kernels::grouped_gemm_nvfp4_sm100_workspace_size(cfg_.num_experts)
                                                         : kernels::grouped_gemm_nvfp4_sm120_workspace_size(cfg_.num_experts));
    }
#endif
    if (!why.empty()) {
      std::fprintf(stderr, "dgemma_rt: NVFP4 experts fall back to the W4A16 kernel on GPU %d: the %s block-scaled "
                           "NVFP4 GEMM failed its load-time check (%s)\n",
                   device_, nvfp4x4_ == Nvfp4x4::kSm100 ? "sm_100a" : "sm_120a", why.c_str());
      nvfp4x4_ = Nvfp4x4::kNone;
      return false;
    }
  }
  return true;
}

cudaError_t CudaBackend::launch_nvfp4x4(const kernels::GroupedGemmNvfp4x4Params& p) {
#ifdef DGEMMA_WITH_CUTLASS
  if (nvfp4x4_ == Nvfp4x4::kSm100) return kernels::grouped_gemm_nvfp4_sm100(p, stream_, &gemm_params_);
  if (nvfp4x4_ == Nvfp4x4::kSm120) return kernels::grouped_gemm_nvfp4_sm120(p, stream_, &gemm_params_);
#endif
  return cudaErrorNotSupported;
}

// The block-scaled GEMM of shape [n, k] on 2 random experts (1 and 130 tokens: an empty tail, a second
// 128-row scale tile) against the W4A16 kernel on the same weights: "" when it launches and agrees
// within what NVFP4 activations explain, else why not. calc_diff of a GEMM with NVFP4-quantized
// activations is ~5e-3 (numpy, any K); a wrong scale layout or operand gives ~1.
std::string CudaBackend::check_nvfp4x4(int n, int k) {
  constexpr int G = 2, M = 131;
  const int32_t offsets_h[G + 1] = {0, 1, M};
  const float global_h[G] = {1.0f, 0.5f};
  const int kb = k / 16;
  std::vector<uint16_t> x_h(static_cast<size_t>(M) * k);
  uint64_t st = 0x9E3779B97F4A7C15ull;
  for (uint16_t& v : x_h) {  // uniform in [-1, 1)
    st = st * 6364136223846793005ull + 1442695040888963407ull;
    v = f32_to_bf16_bits(static_cast<float>(st >> 40) / 8388608.0f - 1.0f);
  }
  auto buf = [&](size_t bytes) { return allocate(bytes, "NVFP4 GEMM check"); };
  auto u8 = [](const std::shared_ptr<Buffer>& b) { return static_cast<uint8_t*>(b->data()); };
  auto packed = buf(static_cast<size_t>(G) * n * k / 2), scales = buf(static_cast<size_t>(G) * n * kb);
  auto sf = buf(nvfp4::sf_bytes(n, kb) * G), w4 = buf(kernels::grouped_gemm_nvfp4_weight_bytes(n, k, false) * G);
  auto global = buf(sizeof(global_h)), offsets = buf(sizeof(offsets_h)), x = buf(x_h.size() * 2);
  auto y_ref = buf(static_cast<size_t>(M) * n * 2), y = buf(static_cast<size_t>(M) * n * 2);
  auto q = buf(static_cast<size_t>(M) * k / 2), q_sf = buf(kernels::quantize_act_nvfp4_sf_bytes(M, G, k));
  auto starts = buf(4 * (G + 1)), a_global = buf(4);
  size_t ws_bytes = 0;
#ifdef DGEMMA_WITH_CUTLASS
  ws_bytes = nvfp4x4_ == Nvfp4x4::kSm100 ? kernels::grouped_gemm_nvfp4_sm100_workspace_size(G)
                                         : kernels::grouped_gemm_nvfp4_sm120_workspace_size(G);
#endif
  auto ws = buf(ws_bytes);
  global->write(0, sizeof(global_h), global_h);
  offsets->write(0, sizeof(offsets_h), offsets_h);
  x->write(0, x_h.size() * 2, x_h.data());
  DG_CUDA(kernels::fill_random_nvfp4(u8(packed), u8(scales), static_cast<int64_t>(G) * n * k, 12, stream_));
  DG_CUDA(kernels::shuffle_w4a16(u8(packed), u8(scales), G, n, k, false, u8(w4), stream_));
  DG_CUDA(kernels::swizzle_scales_nvfp4(u8(scales), G, n, kb, u8(sf), stream_));
  kernels::GroupedGemmNvfp4Params r;
  r.x = static_cast<const bf16*>(x->data()), r.w = u8(w4), r.w_global = static_cast<const float*>(global->data());
  r.offsets = static_cast<const int32_t*>(offsets->data()), r.y = static_cast<bf16*>(y_ref->data());
  r.G = G, r.N = n, r.K = k;
  DG_CUDA(kernels::grouped_gemm_nvfp4(r, stream_));
  DG_CUDA(cudaStreamSynchronize(stream_));

  Nvfp4x4Scratch scr;
  scr.q = u8(q), scr.sf = u8(q_sf), scr.starts = static_cast<int32_t*>(starts->data());
  scr.global = static_cast<float*>(a_global->data()), scr.ws = ws->data(), scr.ws_bytes = ws_bytes;
  Experts w;
  w.w4p = u8(packed), w.sfp = u8(sf), w.global.p = static_cast<const float*>(global->data()), w.n = n, w.k = k;
  std::string why;
  try {
    gemm_nvfp4x4(w, r.x, x_h.size(), nullptr, 1, r.offsets, M, static_cast<bf16*>(y->data()), scr, G);
    DG_CUDA(cudaStreamSynchronize(stream_));
  } catch (const Error& e) {
    why = e.what();
  }
  if (!why.empty()) {
    // An error the context survives (a refused launch) leaves the GPU usable; a fault inside a kernel
    // does not, and nothing can run after it.
    if (cudaDeviceSynchronize() != cudaSuccess)
      DG_THROW(Error, "the NVFP4 block-scaled GEMM's load-time check broke the CUDA context: " << why);
    return why;
  }
  std::vector<uint16_t> a(static_cast<size_t>(M) * n), b(a.size());
  y_ref->read(0, a.size() * 2, a.data());
  y->read(0, b.size() * 2, b.data());
  double ab = 0, aa = 0, bb = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    uint32_t ua = static_cast<uint32_t>(a[i]) << 16, ub = static_cast<uint32_t>(b[i]) << 16;
    float fa, fb;
    std::memcpy(&fa, &ua, 4);
    std::memcpy(&fb, &ub, 4);
    ab += double(fa) * fb, aa += double(fa) * fa, bb += double(fb) * fb;
  }
  const double diff = aa + bb > 0 ? 1 - 2 * ab / (aa + bb) : 0.0;
  if (!(diff < 2e-2)) {
    std::ostringstream o;
    o << "n = " << n << ", k = " << k << ": calc_diff " << diff << " against the W4A16 kernel, expected < 2e-2";
    return o.str();
  }
  return "";
}

// y = x @ W_g^T with both operands NVFP4 (Blackwell): the activations' global scale from x itself (the
// gathered rows are copies of x's rows, so x's amax is theirs), x quantized into the activation scale
// layout (through gather when given), then the block-scaled grouped GEMM. G experts (E by default).
void CudaBackend::gemm_nvfp4x4(const Experts& w, const bf16* x, size_t x_elems, const int32_t* gather, int gather_div,
                               const int32_t* offsets, int64_t m_total, bf16* y, const Nvfp4x4Scratch& s, int G) {
  DG_CUDA(kernels::act_global_scale_nvfp4(x, x_elems, s.global, stream_));
  kernels::QuantizeActNvfp4Params qp;
  qp.x = x, qp.offsets = offsets, qp.global = s.global, qp.q = s.q, qp.sf = s.sf, qp.sf_starts = s.starts;
  qp.Mtot = static_cast<int>(m_total), qp.G = G, qp.K = static_cast<int>(w.k);
  qp.gather = gather, qp.gather_div = gather_div;
  DG_CUDA(kernels::quantize_act_nvfp4(qp, stream_));
  kernels::GroupedGemmNvfp4x4Params p;
  p.a = s.q, p.a_sf = s.sf, p.a_sf_starts = s.starts, p.a_global = s.global;
  p.w = w.w4p, p.w_sf = w.sfp, p.w_global = w.global.p, p.offsets = offsets, p.y = y;
  p.G = G, p.N = static_cast<int>(w.n), p.K = static_cast<int>(w.k);
  p.workspace = s.ws, p.workspace_bytes = s.ws_bytes;
  DG_CUDA(launch_nvfp4x4(p));
}

CudaBackend::Vec CudaBackend::upload_vec(const std::string& name, int64_t n) {
  const WeightSource& s = weights_->source(name);
  DG_CHECK(s.numel() == n, "weight '" << name << "' has " << s.numel() << " values, expected " << n);
  Vec v;
  v.n = n;
  v.buf = allocate(static_cast<size_t>(n) * 4, "weights");
  v.p = static_cast<const float*>(v.buf->data());
  if (s.synthetic()) {
    DG_CUDA(kernels::fill_random(const_cast<float*>(v.p), n, s.seed, 0, s.amplitude, s.offset, stream_));
  } else {
    std::vector<float> f(n);
    s.to_f32(0, n, f.data());
    v.buf->write(0, static_cast<size_t>(n) * 4, f.data());
  }
  report_upload(1);
  return v;
}

void CudaBackend::upload_weights(const ModelWeights& w) {
  weights_ = &w;
  const int64_t H = cfg_.hidden_size, V = cfg_.vocab_size, I = cfg_.intermediate_size;
  const int64_t E = cfg_.num_experts, Im = cfg_.moe_intermediate_size, nh = cfg_.num_heads;
  // Everything the weights take in their device formats, decided as upload_mat and upload_experts
  // decide it (NVFP4 experts ~4.5 bits, FP8 projections the W8A8 GEMM takes 1 byte, the rest bf16,
  // NVFP4 dense layers included, vectors f32), plus the largest NVFP4 projection's staged codes and
  // scales, alive while it is shuffled: against what the GPU has free, one clear error instead of an
  // allocation failing half way.
  double need = 0, staging = 0;
  for (const auto& [name, src] : w.sources()) {
    const double n = static_cast<double>(src.numel());
    const int64_t rows = src.shape.size() == 2 ? src.shape[0] : 0, cols = src.shape.back();
    const bool projection = name.size() >= 12 && name.compare(name.size() - 12, 12, "_proj.weight") == 0;
    if (src.shape.size() == 1) {
      need += 4 * n;
    } else if (src.format == WeightSource::Format::kNvfp4 && src.shape.size() == 3 && cols % 16 == 0) {
      need += n * (0.5 + 1.0 / 16);
      staging = std::max(staging, n * (0.5 + 1.0 / 16));
    } else if (!src.synthetic() && src.format == WeightSource::Format::kFp8 && cutlass_ && projection &&
               cols % 16 == 0 && rows % 8 == 0) {
      need += n;
    } else {
      need += 2 * n;
    }
  }
  need += staging;
  size_t free_b = 0, total_b = 0;
  DG_CUDA(cudaMemGetInfo(&free_b, &total_b));
  DG_REQUIRE(need <= double(free_b), ResourceError,
             "the model's weights need " << format_gib(need) << " on the GPU but GPU " << device_ << " has "
                                         << format_gib(double(free_b)) << " free of " << format_gib(double(total_b)));

  uploaded_ = 0;
  upload_total_ = static_cast<int>(w.sources().size());
  auto g = [](const char* s) { return ModelWeights::global_name(s); };
  embed_ = upload_mat({g("embed_tokens.weight")}, V, H);
  lm_head_ = embed_;  // tied (config.cpp refuses untied checkpoints)
  final_norm_ = upload_vec(g("norm.weight"), H);
  sc_pre_norm_ = upload_vec(g("self_conditioning.pre_norm.weight"), H);
  sc_gate_up_ = upload_mat({g("self_conditioning.gate_proj.weight"), g("self_conditioning.up_proj.weight")}, 2 * I, H, true);
  sc_down_ = upload_mat({g("self_conditioning.down_proj.weight")}, H, I, true);
  layers_.resize(cfg_.num_layers);
  for (int l = 0; l < cfg_.num_layers; ++l) {
    const LayerSpec& ls = cfg_.layers[l];
    Layer& L = layers_[l];
    auto n = [l](const char* s) { return ModelWeights::layer_name(l, s); };
    const int64_t hd = ls.head_dim, kv = ls.num_kv_heads;
    L.q = upload_mat({n("self_attn.q_proj.weight")}, nh * hd, H, true);
    L.k = upload_mat({n("self_attn.k_proj.weight")}, kv * hd, H, true);
    if (!ls.k_eq_v) L.v = upload_mat({n("self_attn.v_proj.weight")}, kv * hd, H, true);
    L.o = upload_mat({n("self_attn.o_proj.weight")}, H, nh * hd, true);
    L.q_norm = upload_vec(n("self_attn.q_norm.weight"), hd);
    L.k_norm = upload_vec(n("self_attn.k_norm.weight"), hd);
    L.input_norm = upload_vec(n("input_layernorm.weight"), H);
    L.post_attn_norm = upload_vec(n("post_attention_layernorm.weight"), H);
    L.pre_ffn_norm = upload_vec(n("pre_feedforward_layernorm.weight"), H);
    L.pre_ffn_norm2 = upload_vec(n("pre_feedforward_layernorm_2.weight"), H);
    L.post_ffn_norm = upload_vec(n("post_feedforward_layernorm.weight"), H);
    L.post_ffn_norm1 = upload_vec(n("post_feedforward_layernorm_1.weight"), H);
    L.post_ffn_norm2 = upload_vec(n("post_feedforward_layernorm_2.weight"), H);
    L.mlp_gate_up = upload_mat({n("mlp.gate_proj.weight"), n("mlp.up_proj.weight")}, 2 * I, H, true);
    L.mlp_down = upload_mat({n("mlp.down_proj.weight")}, H, I, true);
    L.router = upload_mat({n("router.proj.weight")}, E, H);
    L.router_scale = upload_vec(n("router.scale"), H);
    L.per_expert_scale = upload_vec(n("router.per_expert_scale"), E);
    L.experts_gate_up = upload_experts(n("experts.gate_up_proj"), 2 * Im, H, /*gated=*/true);
    L.experts_down = upload_experts(n("experts.down_proj"), H, Im, /*gated=*/false);
    moe_xp_ = moe_xp_ || !L.experts_gate_up.nvfp4();
    moe_h_ = moe_h_ || !L.experts_gate_up.nvfp4() || L.experts_gate_up.native;
    L.encoder_scalar = w.layers[l].encoder_layer_scalar;
    L.decoder_scalar = w.layers[l].decoder_layer_scalar;
  }
  DG_CUDA(cudaStreamSynchronize(stream_));  // the random fills
  uploaded_ = upload_total_;  // sources uploaded as another's copy (a tied LM head) count as done
  report_upload(0);
  weights_ = nullptr;                          // the checkpoint is not read again
}

const CudaBackend::Mat& CudaBackend::matrix(WeightRef w) const {
  switch (w.id) {
    case W::kQProj: return layers_.at(w.layer).q;
    case W::kKProj: return layers_.at(w.layer).k;
    case W::kVProj: {
      const Mat& m = layers_.at(w.layer).v;
      DG_CHECK(m.p || m.fp8(), "layer " << w.layer << " has no v_proj (K=V layer)");  // FP8: no bf16 copy
      return m;
    }
    case W::kOProj: return layers_.at(w.layer).o;
    default: DG_THROW(Error, "weight " << static_cast<int>(w.id) << " is not a projection matrix");
  }
}

const float* CudaBackend::norm_weight(WeightRef w) const {
  switch (w.id) {
    case W::kNone: return nullptr;
    case W::kFinalNorm: return final_norm_.p;
    case W::kScPreNorm: return sc_pre_norm_.p;
    case W::kInputNorm: return layers_.at(w.layer).input_norm.p;
    case W::kPostAttnNorm: return layers_.at(w.layer).post_attn_norm.p;
    case W::kPreFfnNorm: return layers_.at(w.layer).pre_ffn_norm.p;
    case W::kPreFfnNorm2: return layers_.at(w.layer).pre_ffn_norm2.p;
    case W::kQNorm: return layers_.at(w.layer).q_norm.p;
    case W::kKNorm: return layers_.at(w.layer).k_norm.p;
    default: DG_THROW(Error, "weight " << static_cast<int>(w.id) << " is not a norm weight");
  }
}

void* CudaBackend::scratch(Scratch s, size_t bytes) {
  std::shared_ptr<Buffer>& b = scratch_[s];
  if (!b || b->bytes() < bytes) {
    // A capture cannot allocate, and its graph would point at the buffer this frees: the forward runs
    // every op sequence uncaptured before it captures it, and that run grows scratch.
    DG_CHECK(!capturing_, "internal error: op scratch " << static_cast<int>(s) << " would grow from "
                                                        << (b ? b->bytes() : 0) << " to " << bytes
                                                        << " bytes while capturing a CUDA graph");
    DG_CUDA(cudaStreamSynchronize(stream_));  // the old buffer may still be in use by queued work
    if (b) drop_captures();                   // they point at the old buffer
    b.reset();
    b = allocate(bytes, "op scratch");
  }
  return b->data();
}

// ---------------------------------------------------------------------------------------------
// GEMMs

void CudaBackend::gemm(const Mat& w, const bf16* x, void* y, int64_t M, bool y_f32, float alpha, float softcap) {
  if (M == 0) return;
  const int64_t N = w.rows, K = w.cols;
#ifdef DGEMMA_WITH_CUTLASS
  if (w.fp8()) {  // W8A8: the activations quantized per token, then the FP8 GEMM with both scales
    DG_CHECK(!y_f32 && alpha == 1.f && softcap == 0.f && M <= INT_MAX, "FP8 GEMM with a float32 epilogue");
    uint8_t* xq = static_cast<uint8_t*>(scratch(kFp8Act, align256(static_cast<size_t>(M * K)) + 4 * M));
    float* xs = reinterpret_cast<float*>(xq + align256(static_cast<size_t>(M * K)));
    kernels::QuantizeRowsFp8Params qp;
    qp.x = x, qp.q = xq, qp.scale = xs, qp.M = static_cast<int>(M), qp.K = static_cast<int>(K);
    DG_CUDA(kernels::quantize_rows_fp8(qp, stream_));
    kernels::GemmFp8Params p;
    p.x = xq, p.x_scale = xs, p.w = w.q, p.w_scale = w.scale.p, p.y = static_cast<bf16*>(y);
    p.M = static_cast<int>(M), p.N = static_cast<int>(N), p.K = static_cast<int>(K);
    p.cache = &gemm_params_;
    DG_CUDA(kernels::gemm_fp8_tn(p, stream_));
    return;
  }
#endif
#ifdef DGEMMA_WITH_CUTLASS
  if (cutlass_ && y_f32 && K % 8 == 0 && N % 8 == 0 && M <= INT_MAX && aligned16(x) && aligned16(w.p) &&
      aligned16(y)) {  // the LM head's logits
    kernels::GemmLogitsParams p;
    p.x = x, p.w = w.p, p.y = static_cast<float*>(y);
    p.M = static_cast<int>(M), p.N = static_cast<int>(N), p.K = static_cast<int>(K);
    p.alpha = alpha, p.softcap = softcap, p.cache = &gemm_params_;
    DG_CUDA(kernels::gemm_bf16_tn_logits(p, stream_));
    return;
  }
  if (cutlass_ && !y_f32 && alpha == 1.f && softcap == 0.f && K % 8 == 0 && N % 8 == 0 && M <= INT_MAX &&
      aligned16(x) && aligned16(w.p) && aligned16(y)) {
    kernels::GemmBf16Params p;
    p.x = x, p.w = w.p, p.y = static_cast<bf16*>(y);
    p.M = static_cast<int>(M), p.N = static_cast<int>(N), p.K = static_cast<int>(K);
    p.cache = &gemm_params_;
    DG_CUDA(kernels::gemm_bf16_tn(p, stream_));
    return;
  }
#endif
  kernels::MatmulParams p;
  p.x = x, p.w = w.p, p.y = y, p.y_f32 = y_f32;
  p.M = M, p.N = N, p.K = K;
  p.alpha = alpha, p.softcap = softcap;
  DG_CUDA(kernels::matmul_bf16(p, stream_));
}

// The grouped GEMMs' workspace: the bf16 one's (Hopper) or the NVFP4 block-scaled one's (Blackwell).
size_t CudaBackend::grouped_ws_bytes() const {
  size_t bytes = nvfp4x4_used_ ? nvfp4x4_ws_ : 0;
#ifdef DGEMMA_WITH_CUTLASS
  if (cutlass_) bytes = std::max(bytes, align256(kernels::grouped_gemm_bf16_tn_workspace_size(cfg_.num_experts)));
#endif
  return bytes;
}

// d[o_g : o_g+1] = a[o_g : o_g+1] @ W_g^T for the experts g (bf16 experts; NVFP4 ones go through
// moe_experts' fused W4A16 calls).
void CudaBackend::grouped_gemm(const Experts& w, const bf16* a, bf16* d, const int32_t* offsets, int64_t m_total,
                               void* ws, size_t ws_bytes) {
  const int E = cfg_.num_experts;
  const int64_t n = w.n, k = w.k;
#ifdef DGEMMA_WITH_CUTLASS
  if (cutlass_ && n % 8 == 0 && k % 8 == 0 && aligned16(a) && aligned16(d)) {
    kernels::GroupedGemmBf16Params p;
    p.a = a, p.w = w.bf.p, p.d = d, p.offsets = offsets;
    p.G = E, p.N = static_cast<int>(n), p.K = static_cast<int>(k);
    p.workspace = ws, p.workspace_bytes = ws_bytes;
    p.cache = &gemm_params_;
    DG_CUDA(kernels::grouped_gemm_bf16_tn(p, stream_));
    return;
  }
#endif
  kernels::MatmulParams p;
  p.x = a, p.w = w.bf.p, p.y = d;
  p.M = m_total, p.N = n, p.K = k;
  p.offsets = offsets, p.G = E;
  DG_CUDA(kernels::matmul_bf16(p, stream_));
}

// ---------------------------------------------------------------------------------------------
// Ops

void CudaBackend::embed(const Tensor& ids, const Tensor& out) {
  const OpTimer timer(*this, Op::kEmbed);
  expect(ids, ScalarType::kI32, "embed", "ids");
  expect(out, ScalarType::kF32, "embed", "out");
  const int H = cfg_.hidden_size;
  DG_CHECK(out.rows() == ids.numel() && out.cols() == H, "embed: out shape");
  DeviceGuard g(device_);
  kernels::EmbedParams<float> p;
  p.table = embed_.p, p.ids = as<int32_t>(ids), p.out = as<float>(out);
  p.tokens = static_cast<int>(ids.numel()), p.hidden = H;
  p.scale = embed_scale_;
  DG_CUDA(kernels::embed_tokens(p, stream_));
}

void CudaBackend::rmsnorm(const Tensor& x, WeightRef w, const Tensor& out, float eps) {
  const OpTimer timer(*this, Op::kRmsNorm);
  DG_CHECK(x.contiguous() && out.contiguous() && x.rows() == out.rows() && x.cols() == out.cols(), "rmsnorm: shapes");
  const float* wt = norm_weight(w);
  const int64_t rows = x.rows();
  const int dim = static_cast<int>(x.cols());
  DeviceGuard g(device_);
  const bool xf = x.dtype == ScalarType::kF32, yf = out.dtype == ScalarType::kF32;
  DG_CHECK((xf || x.dtype == ScalarType::kBF16) && (yf || out.dtype == ScalarType::kBF16), "rmsnorm: dtypes");
  cudaError_t e;
  if (xf && yf) e = kernels::rmsnorm_mixed<float, float>(as<float>(x), wt, as<float>(out), rows, dim, eps, stream_);
  else if (xf) e = kernels::rmsnorm_mixed<float, bf16>(as<float>(x), wt, as<bf16>(out), rows, dim, eps, stream_);
  else if (yf) e = kernels::rmsnorm_mixed<bf16, float>(as<bf16>(x), wt, as<float>(out), rows, dim, eps, stream_);
  else e = kernels::rmsnorm_mixed<bf16, bf16>(as<bf16>(x), wt, as<bf16>(out), rows, dim, eps, stream_);
  DG_CUDA(e);
}

void CudaBackend::linear(WeightRef w, const Tensor& x, const Tensor& y) {
  const OpTimer timer(*this, Op::kLinear);
  expect(x, ScalarType::kBF16, "linear", "x");
  expect(y, ScalarType::kBF16, "linear", "y");
  const Mat& m = matrix(w);
  DG_CHECK(x.cols() == m.cols && y.cols() == m.rows && x.rows() == y.rows(), "linear: shapes");
  DeviceGuard g(device_);
  gemm(m, as<bf16>(x), y.data, x.rows());
}

void CudaBackend::copy(const Tensor& src, const Tensor& dst) {
  const OpTimer timer(*this, Op::kCopy);
  DG_CHECK(src.dtype == dst.dtype && src.numel() == dst.numel() && src.contiguous() && dst.contiguous(), "copy: shapes");
  DeviceGuard g(device_);
  if (src.bytes() > 0) DG_CUDA(cudaMemcpyAsync(dst.data, src.data, src.bytes(), cudaMemcpyDeviceToDevice, stream_));
}

kernels::HeadNormRopeParams CudaBackend::head_norm_params(const Tensor& x, WeightRef w, const Tensor& positions,
                                                          const Tensor& inv_freq, float eps) {
  expect(x, ScalarType::kBF16, "head_norm_rope", "x");
  DG_CHECK(x.ndim == 3 && positions.empty() == inv_freq.empty(), "head_norm_rope: shapes");
  kernels::HeadNormRopeParams p;
  p.x = as<bf16>(x), p.weight = norm_weight(w);
  p.positions = positions.empty() ? nullptr : as<int32_t>(positions);
  p.inv_freq = inv_freq.empty() ? nullptr : as<float>(inv_freq);
  p.tokens = static_cast<int>(x.dim(0)), p.heads = static_cast<int>(x.dim(1)), p.head_dim = static_cast<int>(x.dim(2));
  p.eps = eps;
  return p;
}

void CudaBackend::head_norm_rope(const Tensor& x, WeightRef w, const Tensor& positions, const Tensor& inv_freq,
                                 float eps) {
  const OpTimer timer(*this, Op::kHeadNormRope);
  const kernels::HeadNormRopeParams p = head_norm_params(x, w, positions, inv_freq, eps);
  DeviceGuard g(device_);
  DG_CUDA(kernels::head_norm_rope(p, stream_));
}

void CudaBackend::head_norm_rope_qkv(const HeadNorm& q, const HeadNorm& k, const HeadNorm& v,
                                     const Tensor& positions, const Tensor& inv_freq, float eps) {
  const OpTimer timer(*this, Op::kHeadNormRopeQkv);
  kernels::HeadNormRopeParams ps[kernels::kHeadNormRopeMaxTensors];
  int n = 0;
  for (const HeadNorm* t : {&q, &k, &v})
    if (t->x.data)
      ps[n++] = head_norm_params(t->x, t->w, t->rope ? positions : Tensor{}, t->rope ? inv_freq : Tensor{}, eps);
  DeviceGuard g(device_);
  DG_CUDA(kernels::head_norm_rope_multi(ps, n, stream_));
}

void CudaBackend::kv_write(const Tensor& k, const Tensor& v, const Tensor& slot, const Tensor& k_cache,
                           const Tensor& v_cache) {
  const OpTimer timer(*this, Op::kKvWrite);
  expect(k, ScalarType::kBF16, "kv_write", "k");
  expect(v, ScalarType::kBF16, "kv_write", "v");
  expect(k_cache, ScalarType::kBF16, "kv_write", "k_cache");
  expect(v_cache, ScalarType::kBF16, "kv_write", "v_cache");
  expect(slot, ScalarType::kI32, "kv_write", "slot");
  DG_CHECK(k.ndim == 3 && k_cache.ndim == 4 && slot.numel() == k.dim(0), "kv_write: shapes");
  DeviceGuard g(device_);
  kernels::KvCacheWriteParams p;
  p.k = as<bf16>(k), p.v = as<bf16>(v), p.k_cache = as<bf16>(k_cache), p.v_cache = as<bf16>(v_cache);
  p.slot = as<int32_t>(slot), p.tokens = static_cast<int>(k.dim(0));
  p.row_elems = static_cast<int>(k.dim(1) * k.dim(2));
  p.num_slots = k_cache.dim(0) * k_cache.dim(1);
  DG_CUDA(kernels::kv_cache_write(p, stream_));
}

void CudaBackend::attention(const AttentionArgs& a) {
  const OpTimer timer(*this, Op::kAttention);
  expect(a.q, ScalarType::kBF16, "attention", "q");
  DG_CHECK(a.q.ndim == 3 && a.k_new.ndim == 3 && a.k_cache.ndim == 4, "attention: shapes");
  DeviceGuard g(device_);
  kernels::AttentionParams p;
  p.q = as<bf16>(a.q), p.k_new = as<bf16>(a.k_new), p.v_new = as<bf16>(a.v_new);
  p.k_cache = as<bf16>(a.k_cache), p.v_cache = as<bf16>(a.v_cache);
  p.block_table = as<int32_t>(a.block_table), p.cache_first_pos = as<int32_t>(a.cache_first_pos);
  p.cache_start = as<int32_t>(a.cache_start), p.cache_len = as<int32_t>(a.cache_len);
  p.tok0 = as<int32_t>(a.tok0), p.count = as<int32_t>(a.count), p.out = as<bf16>(a.out);
  p.rows = static_cast<int>(a.tok0.numel());
  p.num_heads = static_cast<int>(a.q.dim(1)), p.num_kv_heads = static_cast<int>(a.k_new.dim(1));
  p.head_dim = static_cast<int>(a.q.dim(2));
  p.block_size = static_cast<int>(a.k_cache.dim(1)), p.max_blocks_per_row = static_cast<int>(a.block_table.dim(1));
  p.max_count = a.max_count, p.max_cached = a.max_cached;
  p.causal = a.causal, p.window = a.window, p.scale = a.scale;
  // The tiled kernels take power-of-two KV blocks (shift-based slots); the engine allows any block size
  // (EngineOptions::block_size), which then takes the generic kernel.
  const bool pow2_blocks = (p.block_size & (p.block_size - 1)) == 0;
  if ((p.head_dim == 256 || p.head_dim == 512) && pow2_blocks) {
    const size_t ws = kernels::attention_workspace_bytes(p);
    if (ws > 0) p.workspace = scratch(kAttnWs, ws), p.workspace_bytes = ws;
    DG_CUDA(kernels::attention_forward(p, stream_));
  } else {
    DG_CUDA(kernels::attention_forward_generic(p, stream_));
  }
}

// A fused op's trailing norm (NormOut) as the kernels take it: bf16 [T, H] like x's rows.
kernels::TrailingNorm<bf16> CudaBackend::trailing(const NormOut& n, const Tensor& x, const char* op) {
  if (!n.out.data) return {};
  expect(n.out, ScalarType::kBF16, op, "norm out");
  DG_CHECK(n.out.rows() == x.rows() && n.out.cols() == x.cols(), op << ": norm out shape");
  return {as<bf16>(n.out), norm_weight(n.w)};
}

void CudaBackend::residual_norm_add(const Tensor& x, const Tensor& h, WeightRef w, float eps) {
  const OpTimer timer(*this, Op::kResidualNormAdd);
  residual_norm_add_kernel(x, h, w, eps, {}, {});
}

void CudaBackend::residual_norm_add_norms(const Tensor& x, const Tensor& h, WeightRef w, float eps, const NormOut& a,
                                          const NormOut& b) {
  const OpTimer timer(*this, Op::kResidualNormAddNorms);
  DG_CHECK(!b.out.data || (b.out.data != h.data && b.out.data != a.out.data), "residual_norm_add_norms: b.out aliases");
  residual_norm_add_kernel(x, h, w, eps, trailing(a, x, "residual_norm_add_norms"),
                           trailing(b, x, "residual_norm_add_norms"));
}

void CudaBackend::residual_norm_add_kernel(const Tensor& x, const Tensor& h, WeightRef w, float eps,
                                           const kernels::TrailingNorm<bf16>& a, const kernels::TrailingNorm<bf16>& b) {
  expect(x, ScalarType::kF32, "residual_norm_add", "x");
  expect(h, ScalarType::kBF16, "residual_norm_add", "h");
  DG_CHECK(x.rows() == h.rows() && x.cols() == h.cols(), "residual_norm_add: shapes");
  DeviceGuard g(device_);
  kernels::ResidualNormAddParams<bf16> p;
  p.x = as<float>(x), p.h = as<bf16>(h), p.weight = norm_weight(w);
  p.tokens = static_cast<int>(x.rows()), p.hidden = static_cast<int>(x.cols()), p.eps = eps;
  p.a = a, p.b = b;
  DG_CUDA(kernels::residual_norm_add(p, stream_));
}

void CudaBackend::mlp(WeightRef mlp, const Tensor& x, const Tensor& out, const Tensor& scratch_t) {
  const OpTimer timer(*this, Op::kMlp);
  expect(x, ScalarType::kBF16, "mlp", "x");
  expect(out, ScalarType::kBF16, "mlp", "out");
  expect(scratch_t, ScalarType::kBF16, "mlp", "scratch");
  const Mat* gate_up;
  const Mat* down;
  if (mlp.id == W::kScMlp) {
    gate_up = &sc_gate_up_, down = &sc_down_;
  } else {
    DG_CHECK(mlp.id == W::kMlp, "mlp: weight " << static_cast<int>(mlp.id));
    gate_up = &layers_.at(mlp.layer).mlp_gate_up, down = &layers_.at(mlp.layer).mlp_down;
  }
  const int64_t T = x.rows(), I = cfg_.intermediate_size;
  DG_CHECK(x.cols() == cfg_.hidden_size && out.rows() == T && scratch_t.numel() >= 3 * T * I, "mlp: shapes");
  if (T == 0) return;
  DeviceGuard g(device_);
  bf16* h = as<bf16>(scratch_t);  // [T, 2I]: gate | up
  bf16* act = h + 2 * T * I;      // [T, I]
  gemm(*gate_up, as<bf16>(x), h, T);
  kernels::MoeGeluGateParams gp;
  gp.h = h, gp.act = act, gp.M = static_cast<int>(T), gp.I = static_cast<int>(I);
  DG_CUDA(kernels::moe_gelu_gate(gp, stream_));
  gemm(*down, act, out.data, T);
}

void CudaBackend::moe_router(int layer, const Tensor& x, const Tensor& topk_idx, const Tensor& topk_w, float eps) {
  const OpTimer timer(*this, Op::kMoeRouter);
  expect(x, ScalarType::kF32, "moe_router", "x");
  expect(topk_idx, ScalarType::kI32, "moe_router", "topk_idx");
  expect(topk_w, ScalarType::kF32, "moe_router", "topk_w");
  const Layer& L = layers_.at(layer);
  const int T = static_cast<int>(x.rows()), E = cfg_.num_experts;
  if (T == 0) return;
  DeviceGuard g(device_);
  kernels::MoeRouterParams<float> p;
  p.x = as<float>(x), p.router_proj = L.router.p, p.router_scale = L.router_scale.p;
  p.per_expert_scale = L.per_expert_scale.p, p.topk_idx = as<int32_t>(topk_idx), p.topk_w = as<float>(topk_w);
  p.workspace = scratch(kRouterWs, kernels::moe_router_workspace_bytes(T, E));
  p.T = T, p.H = cfg_.hidden_size, p.E = E, p.k = cfg_.top_k_experts, p.eps = eps;
  DG_CUDA(kernels::moe_router(p, stream_));
}

namespace moe_ws {
// The MoE workspace's layout for T tokens (offsets in bytes, each 256-aligned). xp / h: the permuted
// input rows and the ungated gate_up output, if any layer's path uses them (else empty). nvfp4x4: room
// for the native NVFP4 path's quantized activations (gate_up's and then down's input, one after the
// other in the same regions), their scales, per-expert first scale tiles and global scale.
struct Layout {
  size_t counts, offsets, perm_slot, inv, permute, xp, h, act, dn, gemm, q, q_sf, q_starts, q_global, total;
};
Layout layout(int T, int E, int k, int H, int Im, size_t gemm_ws, bool xp, bool h, bool nvfp4x4) {
  Layout o{};
  const size_t M = static_cast<size_t>(T) * k;
  size_t at = 0;
  auto put = [&](size_t bytes) {
    const size_t here = at;
    at += align256(bytes);
    return here;
  };
  o.counts = put(4 * static_cast<size_t>(E));
  o.offsets = put(4 * static_cast<size_t>(E + 1));
  o.perm_slot = put(4 * M);
  o.inv = put(4 * M);
  o.permute = put(kernels::moe_permute_workspace_bytes(T, E, k));  // the multi-block sort's [E, blocks] table
  o.xp = put(xp ? 2 * M * H : 0);
  o.h = put(h ? 2 * M * 2 * Im : 0);
  o.act = put(2 * M * Im);
  o.dn = put(2 * M * H);
  o.gemm = put(gemm_ws);
  const int kmax = std::max(H, Im);
  o.q = put(nvfp4x4 ? M * static_cast<size_t>(kmax) / 2 : 0);
  o.q_sf = put(nvfp4x4 ? kernels::quantize_act_nvfp4_sf_bytes(static_cast<int>(M), E, kmax) : 0);
  o.q_starts = put(nvfp4x4 ? 4 * static_cast<size_t>(E + 1) : 0);
  o.q_global = put(nvfp4x4 ? 4 : 0);
  o.total = at;
  return o;
}
}  // namespace moe_ws

size_t CudaBackend::moe_workspace_bytes(int tokens) const {
  // The layout counts the T * top_k routed rows in int: the permute's own bound, checked before it is sized.
  DG_REQUIRE(static_cast<int64_t>(tokens) * cfg_.top_k_experts <= (int64_t{1} << 30), InvalidArgument,
             "moe_experts: " << tokens << " tokens x top_k " << cfg_.top_k_experts << " routed rows, more than 2^30");
  DeviceGuard g(device_);  // the grouped GEMM's workspace depends on this device's SM count
  return moe_ws::layout(tokens, cfg_.num_experts, cfg_.top_k_experts, cfg_.hidden_size, cfg_.moe_intermediate_size,
                        grouped_ws_bytes(), moe_xp_, moe_h_, nvfp4x4_used_)
             .total +
         256;  // room to align the base
}

void CudaBackend::moe_experts(int layer, const Tensor& x, const Tensor& topk_idx, const Tensor& topk_w,
                              const Tensor& out, const Tensor& workspace) {
  const OpTimer timer(*this, Op::kMoeExperts);
  expect(x, ScalarType::kBF16, "moe_experts", "x");
  expect(out, ScalarType::kBF16, "moe_experts", "out");
  const Layer& L = layers_.at(layer);
  const int T = static_cast<int>(x.rows()), E = cfg_.num_experts, k = cfg_.top_k_experts, H = cfg_.hidden_size;
  const int Im = cfg_.moe_intermediate_size;
  if (T == 0) return;
  DeviceGuard g(device_);  // before the layout: the grouped GEMM's workspace depends on this device's SM count
  const moe_ws::Layout lo = moe_ws::layout(T, E, k, H, Im, grouped_ws_bytes(), moe_xp_, moe_h_, nvfp4x4_used_);
  DG_CHECK(workspace.bytes() >= lo.total + 256, "moe_experts: workspace of " << workspace.bytes() << " bytes");
  char* base = reinterpret_cast<char*>(align256(reinterpret_cast<uintptr_t>(workspace.data)));
  auto i32 = [&](size_t off) { return reinterpret_cast<int32_t*>(base + off); };
  auto b16 = [&](size_t off) { return reinterpret_cast<bf16*>(base + off); };
  const int64_t M = static_cast<int64_t>(T) * k;

  const Experts& gate_up = L.experts_gate_up;
  const Experts& down = L.experts_down;
  kernels::MoePermuteParams<bf16> pp;
  pp.topk_idx = as<int32_t>(topk_idx), pp.x = as<bf16>(x);
  pp.expert_counts = i32(lo.counts), pp.expert_offsets = i32(lo.offsets), pp.perm_slot = i32(lo.perm_slot);
  // The NVFP4 gate_up paths (W4A16 GEMM, native activation quantizer) gather their rows through
  // perm_slot themselves: no xp then.
  pp.inv = i32(lo.inv), pp.xp = gate_up.nvfp4() ? nullptr : b16(lo.xp), pp.workspace = base + lo.permute;
  pp.T = T, pp.H = H, pp.E = E, pp.k = k;
  DG_CUDA(kernels::moe_permute(pp, stream_));

  Nvfp4x4Scratch nq;
  nq.q = reinterpret_cast<uint8_t*>(base + lo.q), nq.sf = reinterpret_cast<uint8_t*>(base + lo.q_sf);
  nq.starts = i32(lo.q_starts), nq.global = reinterpret_cast<float*>(base + lo.q_global);
  nq.ws = base + lo.gemm, nq.ws_bytes = grouped_ws_bytes();
  if (gate_up.native) {
    // Blackwell: x quantized to NVFP4 through perm_slot, the block-scaled GEMM into h [M, 2 Im] (it is
    // not gated), then gelu_tanh(gate) * up.
    gemm_nvfp4x4(gate_up, as<bf16>(x), static_cast<size_t>(T) * H, i32(lo.perm_slot), k, i32(lo.offsets), M, b16(lo.h),
                 nq, E);
    kernels::MoeGeluGateParams gp;
    gp.h = b16(lo.h), gp.act = b16(lo.act), gp.M = static_cast<int>(M), gp.I = Im;
    DG_CUDA(kernels::moe_gelu_gate(gp, stream_));
  } else if (gate_up.nvfp4()) {
    // W4A16: the gate_up GEMM gathers its rows from x through perm_slot (xp is not read) and finishes
    // gelu_tanh(gate) * up in registers; then the down GEMM.
    kernels::GroupedGemmNvfp4Params g1;
    g1.x = as<bf16>(x), g1.w = gate_up.w4p, g1.w_global = gate_up.global.p;
    g1.offsets = i32(lo.offsets), g1.y = b16(lo.act);
    g1.G = E, g1.N = 2 * Im, g1.K = H, g1.gated = true;
    g1.gather = i32(lo.perm_slot), g1.gather_div = k;
    g1.expected_rows = static_cast<int>(M), g1.path = w4a16_path_;  // auto: wgmma from ~48 tokens per expert
    DG_CUDA(kernels::grouped_gemm_nvfp4(g1, stream_));
  } else {
    grouped_gemm(L.experts_gate_up, b16(lo.xp), b16(lo.h), i32(lo.offsets), M, base + lo.gemm, grouped_ws_bytes());
    kernels::MoeGeluGateParams gp;
    gp.h = b16(lo.h), gp.act = b16(lo.act), gp.M = static_cast<int>(M), gp.I = Im;
    DG_CUDA(kernels::moe_gelu_gate(gp, stream_));
  }
  if (down.native) {
    gemm_nvfp4x4(down, b16(lo.act), static_cast<size_t>(M) * Im, nullptr, 1, i32(lo.offsets), M, b16(lo.dn), nq, E);
  } else if (down.nvfp4()) {
    kernels::GroupedGemmNvfp4Params g2;
    g2.x = b16(lo.act), g2.w = down.w4p, g2.w_global = down.global.p;
    g2.offsets = i32(lo.offsets), g2.y = b16(lo.dn);
    g2.G = E, g2.N = H, g2.K = Im, g2.expected_rows = static_cast<int>(M), g2.path = w4a16_path_;
    DG_CUDA(kernels::grouped_gemm_nvfp4(g2, stream_));
  } else {
    grouped_gemm(L.experts_down, b16(lo.act), b16(lo.dn), i32(lo.offsets), M, base + lo.gemm, grouped_ws_bytes());
  }

  kernels::MoeCombineParams<bf16> cp;
  cp.dn = b16(lo.dn), cp.topk_idx = as<int32_t>(topk_idx), cp.topk_w = as<float>(topk_w), cp.inv = i32(lo.inv);
  cp.out = as<bf16>(out), cp.T = T, cp.H = H, cp.k = k;
  DG_CUDA(kernels::moe_combine(cp, stream_));
}

void CudaBackend::ffn_combine(int layer, bool encoder, const Tensor& x, const Tensor& dense, const Tensor& moe,
                              float eps) {
  const OpTimer timer(*this, Op::kFfnCombine);
  ffn_combine_kernel(layer, encoder, x, dense, moe, eps, {});
}

void CudaBackend::ffn_combine_norm(int layer, bool encoder, const Tensor& x, const Tensor& dense, const Tensor& moe,
                                   float eps, const NormOut& next) {
  const OpTimer timer(*this, Op::kFfnCombineNorm);
  DG_CHECK(next.out.data != dense.data && next.out.data != moe.data, "ffn_combine_norm: next.out aliases");
  ffn_combine_kernel(layer, encoder, x, dense, moe, eps, trailing(next, x, "ffn_combine_norm"));
}

void CudaBackend::ffn_combine_kernel(int layer, bool encoder, const Tensor& x, const Tensor& dense, const Tensor& moe,
                                     float eps, const kernels::TrailingNorm<bf16>& next) {
  expect(x, ScalarType::kF32, "ffn_combine", "x");
  expect(dense, ScalarType::kBF16, "ffn_combine", "dense");
  expect(moe, ScalarType::kBF16, "ffn_combine", "moe");
  const Layer& L = layers_.at(layer);
  DeviceGuard g(device_);
  kernels::FfnCombineParams<bf16, bf16> p;
  p.x = as<float>(x), p.dense = as<bf16>(dense), p.moe = as<bf16>(moe);
  p.w1 = L.post_ffn_norm1.p, p.w2 = L.post_ffn_norm2.p, p.w = L.post_ffn_norm.p;
  p.tokens = static_cast<int>(x.rows()), p.hidden = static_cast<int>(x.cols()), p.eps = eps;
  p.layer_scalar = encoder ? L.encoder_scalar : L.decoder_scalar;
  p.next = next;
  DG_CUDA(kernels::ffn_combine(p, stream_));
}

void CudaBackend::gather_rows(const Tensor& src, const Tensor& index, const Tensor& dst) {
  const OpTimer timer(*this, Op::kGatherRows);
  expect(index, ScalarType::kI32, "gather_rows", "index");
  DG_CHECK(src.dtype == dst.dtype && src.cols() == dst.cols() && dst.rows() == index.numel(), "gather_rows: shapes");
  DeviceGuard g(device_);
  DG_CUDA(kernels::gather_rows(src.data, as<int32_t>(index), dst.data, index.numel(),
                               static_cast<int64_t>(src.cols() * scalar_size(src.dtype)), stream_));
}

void CudaBackend::scatter_add_rows(const Tensor& dst, const Tensor& src, const Tensor& index) {
  const OpTimer timer(*this, Op::kScatterAddRows);
  expect(dst, ScalarType::kF32, "scatter_add_rows", "dst");
  expect(src, ScalarType::kBF16, "scatter_add_rows", "src");
  expect(index, ScalarType::kI32, "scatter_add_rows", "index");
  DG_CHECK(src.cols() == dst.cols() && src.rows() == index.numel(), "scatter_add_rows: shapes");
  DeviceGuard g(device_);
  DG_CUDA(kernels::scatter_add_rows(as<float>(dst), as<bf16>(src), as<int32_t>(index), index.numel(), src.cols(),
                                    stream_));
}

// probs [rows, V] bf16 @ E [V, H] * embed_scale -> out [rows, H] bf16: K = V is long, so split-K.
void CudaBackend::probs_times_embedding(const bf16* probs, int64_t rows, bf16* out) {
  const int64_t H = cfg_.hidden_size, V = cfg_.vocab_size;
  kernels::MatmulParams p;
  p.x = probs, p.w = embed_.p, p.y = out, p.w_kn = true;
  p.M = rows, p.N = H, p.K = V;
  p.alpha = embed_scale_;
  p.split_k = kernels::matmul_pick_split_k(rows, H, V);
  const size_t ws = kernels::matmul_workspace_bytes(p);
  if (ws > 0) p.workspace = scratch(kSplitK, ws), p.workspace_bytes = ws;
  DG_CUDA(kernels::matmul_bf16(p, stream_));
}

void CudaBackend::lm_head_sample(const SampleArgs& a) {
  const OpTimer timer(*this, Op::kLmHeadSample);
  expect(a.x, ScalarType::kBF16, "lm_head_sample", "x");
  expect(a.temperature, ScalarType::kF32, "lm_head_sample", "temperature");
  expect(a.uniform, ScalarType::kF64, "lm_head_sample", "uniform");
  expect(a.soft, ScalarType::kBF16, "lm_head_sample", "soft");
  expect(a.soft_index, ScalarType::kI32, "lm_head_sample", "soft_index");
  const int64_t T = a.x.rows(), H = cfg_.hidden_size, V = cfg_.vocab_size;
  const int n = a.n;
  DG_CHECK(a.x.cols() == H && n > 0 && T % n == 0 && a.temperature.numel() == T / n && a.uniform.numel() == T &&
               a.token.numel() == T && a.argmax.numel() == T && a.entropy.numel() == T && a.soft_index.numel() == T &&
               a.soft.cols() == H,
           "lm_head_sample: shapes");
  DG_REQUIRE(V <= kernels::kSampleMaxVocab, Unsupported,
             "the cuda backend samples vocabularies up to " << kernels::kSampleMaxVocab << " tokens, not " << V);
  DeviceGuard g(device_);
  const float cap = cfg_.final_logit_softcapping ? static_cast<float>(*cfg_.final_logit_softcapping) : 0.f;
  if (fused_head_ && T <= 3072 && H % 8 == 0 && H <= kernels::kLmHeadMaxHidden) {
    // One pass over the tied embedding for every row of the pass (kernels/sampler/lm_head_fused.cuh).
    kernels::LmHeadSampleParams fp;
    fp.x = as<bf16>(a.x), fp.emb = embed_.p;
    fp.P = static_cast<int>(T), fp.H = static_cast<int>(H), fp.V = static_cast<int>(V), fp.n = n;
    fp.softcap = cap, fp.temperature = as<float>(a.temperature), fp.uniform = as<double>(a.uniform);
    fp.token = as<int32_t>(a.token), fp.argmax = as<int32_t>(a.argmax), fp.entropy = as<float>(a.entropy);
    fp.soft = as<bf16>(a.soft), fp.soft_index = as<int32_t>(a.soft_index);
    fp.soft_scale = embed_scale_;
    fp.workspace_bytes = kernels::lm_head_sample_workspace_bytes(fp.P, fp.H, fp.V);
    fp.workspace = scratch(kFusedHead, fp.workspace_bytes);
    DG_CUDA(kernels::lm_head_sample_fused(fp, stream_));
    return;
  }
  float* logits = static_cast<float*>(scratch(kLogits, static_cast<size_t>(n) * V * 4));
  bf16* probs = static_cast<bf16*>(scratch(kProbs, static_cast<size_t>(n) * V * 2));
  bf16* soft = static_cast<bf16*>(scratch(kSoft, static_cast<size_t>(n) * H * 2));
  // One row of the pass at a time: the [n, V] buffers are the only vocabulary-sized memory.
  for (int64_t r = 0; r < T / n; ++r) {
    const int64_t t0 = r * n;
    gemm(lm_head_, as<bf16>(a.x) + t0 * H, logits, n, /*y_f32=*/true, 1.f, cap);
    kernels::SampleCanvasParams sp;
    sp.logits = logits, sp.processed = logits, sp.probs = probs;
    sp.temperature = as<float>(a.temperature) + r, sp.uniform = as<double>(a.uniform) + t0;
    sp.token = as<int32_t>(a.token) + t0, sp.argmax = as<int32_t>(a.argmax) + t0;
    sp.entropy = as<float>(a.entropy) + t0;
    sp.rows = 1, sp.canvas_length = n, sp.vocab = static_cast<int>(V);
    DG_CUDA(kernels::sample_canvas(sp, stream_));
    if (!a.write_soft) continue;  // no later step reads any row's state (soft_index masks the rest)
    probs_times_embedding(probs, n, soft);
    DG_CUDA(kernels::scatter_rows(soft, as<int32_t>(a.soft_index) + t0, a.soft.data, n, H * 2, stream_));
  }
}

void CudaBackend::lm_head_logits(const Tensor& x, const Tensor& logits) {
  const OpTimer timer(*this, Op::kLmHeadLogits);
  expect(x, ScalarType::kBF16, "lm_head_logits", "x");
  expect(logits, ScalarType::kF32, "lm_head_logits", "logits");
  DG_CHECK(x.cols() == cfg_.hidden_size && logits.rows() == x.rows() && logits.cols() == cfg_.vocab_size,
           "lm_head_logits: shapes");
  DeviceGuard g(device_);
  const float cap = cfg_.final_logit_softcapping ? static_cast<float>(*cfg_.final_logit_softcapping) : 0.f;
  gemm(lm_head_, as<bf16>(x), logits.data, x.rows(), /*y_f32=*/true, 1.f, cap);
}

void CudaBackend::soft_embedding(const Tensor& logits, const Tensor& out) {
  const OpTimer timer(*this, Op::kSoftEmbedding);
  expect(logits, ScalarType::kF32, "soft_embedding", "logits");
  expect(out, ScalarType::kBF16, "soft_embedding", "out");
  const int64_t S = logits.rows(), V = cfg_.vocab_size, H = cfg_.hidden_size;
  DG_CHECK(logits.cols() == V && out.rows() == S && out.cols() == H, "soft_embedding: shapes");
  if (S == 0) return;
  DeviceGuard g(device_);
  // The sampler kernel's softmax (temperature 1: processed == logits) gives the bf16 probabilities;
  // its token/argmax/entropy outputs are discarded. A canvas's rows at a time, as lm_head_sample does:
  // the probabilities share its [canvas, V] scratch, which must not grow to [S, V] (1 GiB at 8 rows of
  // the 26B model's canvas, and a growth drops every captured step).
  const int64_t chunk = std::min<int64_t>(S, std::max(1, cfg_.canvas_length));
  float* ones = static_cast<float*>(scratch(kOnes, static_cast<size_t>(chunk) * 4));
  const std::vector<float> host_ones(chunk, 1.f);
  upload(Tensor::of(ones, {chunk}), host_ones.data());
  double* zeros = static_cast<double*>(scratch(kZeros, static_cast<size_t>(chunk) * 8));
  DG_CUDA(cudaMemsetAsync(zeros, 0, static_cast<size_t>(chunk) * 8, stream_));
  char* discard = static_cast<char*>(scratch(kDiscard, static_cast<size_t>(chunk) * 12));
  bf16* probs = static_cast<bf16*>(scratch(kProbs, static_cast<size_t>(chunk) * V * 2));
  for (int64_t r0 = 0; r0 < S; r0 += chunk) {
    const int64_t rows = std::min(chunk, S - r0);
    kernels::SampleCanvasParams sp;
    sp.logits = sp.processed = as<float>(logits) + r0 * V;
    sp.probs = probs;
    sp.temperature = ones, sp.uniform = zeros;
    sp.token = reinterpret_cast<int32_t*>(discard), sp.argmax = reinterpret_cast<int32_t*>(discard + 4 * chunk);
    sp.entropy = reinterpret_cast<float*>(discard + 8 * chunk);
    sp.rows = static_cast<int>(rows), sp.canvas_length = 1, sp.vocab = static_cast<int>(V);
    DG_CUDA(kernels::sample_canvas(sp, stream_));
    probs_times_embedding(probs, rows, as<bf16>(out) + r0 * H);
  }
}

}  // namespace

std::string probe(const std::string& device) {
  const int n = device_count();
  if (n == 0) return status();
  const int index = parse_index(device);
  if (index >= n)
    return "there is no CUDA device " + std::to_string(index) + " (" + std::to_string(n) + " visible: " + status() + ")";
  if (!has_code_for(index)) return "this build has no machine code for that GPU: " + status();
  return "";
}

std::unique_ptr<Backend> make_backend(const std::string& device, const ModelConfig& cfg, const ModelWeights& w) {
  const std::string why = probe(device);
  DG_REQUIRE(why.empty(), InvalidArgument, "device '" << device << "' is not available: " << why);
  return std::make_unique<CudaBackend>(parse_index(device), cfg, w);
}

void register_backend() { dgemma::register_backend("cuda", make_backend, probe); }

}  // namespace dgemma::cuda
