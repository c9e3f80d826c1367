// _core.BackendOps(checkpoint_dir, device): one backend (make_backend) and each of its ops as a
// method, numpy in and numpy out, so that tests run the same inputs through "cpu" and any other
// device and compare (the ggml test-backend-ops pattern).
//
// Each call allocates backend memory for its tensors (zero-filled, so outputs an op leaves alone
// compare equal across backends), uploads the inputs in the dtype the op's contract names (act,
// kv, f32, f64 or i32), runs the op and downloads the outputs: float outputs come back as float32
// (bf16 widened exactly), index outputs as int32. Everything an op would follow (token ids, slots,
// block ids, row ranges) is checked on the host first: a bad call raises ValueError, never faults.
#include "bindings/backend_ops.h"

#include <pybind11/numpy.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cstring>
#include <memory>
#include <set>
#include <sstream>
#include <string>
#include <vector>

#include "backend/backend.h"
#include "backend/registry.h"
#include "common/check.h"
#include "model/config.h"
#include "model/weights.h"

namespace py = pybind11;

namespace dgemma::bindings {
namespace {

using Dims = std::vector<int64_t>;
constexpr int64_t kAny = -1;  // a dimension any size matches

float bf16_to_f32(uint16_t b) {
  const uint32_t u = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// Round to nearest even; NaN stays NaN (quiet).
uint16_t f32_to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40);
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

std::string dims_str(const Dims& d) {
  std::ostringstream s;
  s << "[";
  for (size_t i = 0; i < d.size(); ++i) {
    if (i) s << ", ";
    if (d[i] == kAny)
      s << "*";
    else
      s << d[i];
  }
  s << "]";
  return s.str();
}

int64_t product(const Dims& d) {
  int64_t n = 1;
  for (int64_t x : d) n *= x;
  return n;
}

// A host copy of a numpy argument: its shape and its values as f32, f64 or i32.
struct Host {
  Dims shape;
  ScalarType kind = ScalarType::kF32;
  std::vector<float> f;
  std::vector<double> d;
  std::vector<int32_t> i;
  int64_t numel() const { return product(shape); }
  int64_t dim(int k) const { return shape.at(k); }
};

// The array `obj` as `kind` (kF32/kF64: any real numbers; kI32: integers that fit), of `expect`
// dims (kAny: any size), with at least one element. `op` and `name` make the error message.
Host host(py::handle obj, ScalarType kind, const char* op, const char* name, const Dims& expect) {
  py::array a = py::array::ensure(obj);
  DG_REQUIRE(a, InvalidArgument, op << ": " << name << " must be an array");
  Host h;
  h.kind = kind;
  for (py::ssize_t k = 0; k < a.ndim(); ++k) h.shape.push_back(static_cast<int64_t>(a.shape(k)));
  bool ok = h.shape.size() == expect.size();
  for (size_t k = 0; ok && k < expect.size(); ++k) ok = expect[k] == kAny || expect[k] == h.shape[k];
  DG_REQUIRE(ok, InvalidArgument,
             op << ": " << name << " must have shape " << dims_str(expect) << ", got " << dims_str(h.shape));
  DG_REQUIRE(h.numel() > 0, InvalidArgument, op << ": " << name << " is empty (shape " << dims_str(h.shape) << ")");
  const char k = a.dtype().kind();
  if (kind == ScalarType::kI32) {
    DG_REQUIRE(k == 'i' || k == 'u', InvalidArgument,
               op << ": " << name << " must hold integers, got dtype " << py::str(a.dtype()).cast<std::string>());
    auto v = py::array_t<int64_t, py::array::c_style | py::array::forcecast>::ensure(a);
    DG_REQUIRE(v, InvalidArgument, op << ": " << name << " does not convert to int64");
    h.i.resize(static_cast<size_t>(h.numel()));
    for (int64_t n = 0; n < h.numel(); ++n) {
      const int64_t x = v.data()[n];
      DG_REQUIRE(x >= INT32_MIN && x <= INT32_MAX, InvalidArgument, op << ": " << name << " holds " << x << ", not an int32");
      h.i[static_cast<size_t>(n)] = static_cast<int32_t>(x);
    }
    return h;
  }
  DG_REQUIRE(k == 'f' || k == 'i' || k == 'u', InvalidArgument,
             op << ": " << name << " must hold real numbers, got dtype " << py::str(a.dtype()).cast<std::string>());
  if (kind == ScalarType::kF64) {
    auto v = py::array_t<double, py::array::c_style | py::array::forcecast>::ensure(a);
    h.d.assign(v.data(), v.data() + h.numel());
  } else {
    auto v = py::array_t<float, py::array::c_style | py::array::forcecast>::ensure(a);
    h.f.assign(v.data(), v.data() + h.numel());
  }
  return h;
}

// The host kind a backend dtype is converted from (bf16 from f32 values).
ScalarType host_kind(ScalarType dt) { return dt == ScalarType::kBF16 ? ScalarType::kF32 : dt; }

Tensor tensor_of(void* data, ScalarType dt, const Dims& dims) {
  DG_CHECK(!dims.empty() && dims.size() <= static_cast<size_t>(Tensor::kMaxDims), "tensor of " << dims.size() << " dims");
  Tensor t;
  t.data = data;
  t.dtype = dt;
  t.ndim = static_cast<int>(dims.size());
  int64_t s = 1;
  for (int k = t.ndim - 1; k >= 0; --k) {
    t.shape[k] = dims[k];
    t.stride[k] = s;
    s *= dims[k];
  }
  return t;
}

// The backend memory of one call: freed when the call returns.
class Call {
 public:
  explicit Call(Backend& be) : be_(be) {}

  // Zero-filled.
  Tensor alloc(ScalarType dt, const Dims& dims, const char* what) {
    const size_t bytes = static_cast<size_t>(product(dims)) * scalar_size(dt);
    auto buf = be_.allocate(std::max<size_t>(bytes, 1), what);
    bufs_.push_back(buf);
    Tensor t = tensor_of(buf->data(), dt, dims);
    std::vector<char> zero(bytes, 0);
    be_.upload(t, zero.data());
    return t;
  }

  // The host array converted to dt (f32 data to f32/bf16, f64 to f64, i32 to i32).
  Tensor in(const Host& h, ScalarType dt, const char* what) { return in(h, dt, h.shape, what); }
  Tensor in(const Host& h, ScalarType dt, const Dims& dims, const char* what) {
    DG_CHECK(product(dims) == h.numel(), "upload of " << h.numel() << " elements as " << dims_str(dims));
    Tensor t = alloc(dt, dims, what);
    switch (dt) {
      case ScalarType::kF32:
        DG_CHECK(h.kind == ScalarType::kF32, "f32 upload of a " << scalar_name(h.kind) << " array");
        be_.upload(t, h.f.data());
        break;
      case ScalarType::kBF16: {
        DG_CHECK(h.kind == ScalarType::kF32, "bf16 upload of a " << scalar_name(h.kind) << " array");
        std::vector<uint16_t> b(h.f.size());
        for (size_t n = 0; n < b.size(); ++n) b[n] = f32_to_bf16(h.f[n]);
        be_.upload(t, b.data());
        break;
      }
      case ScalarType::kF64:
        DG_CHECK(h.kind == ScalarType::kF64, "f64 upload of a " << scalar_name(h.kind) << " array");
        be_.upload(t, h.d.data());
        break;
      case ScalarType::kI32:
        DG_CHECK(h.kind == ScalarType::kI32, "i32 upload of a " << scalar_name(h.kind) << " array");
        be_.upload(t, h.i.data());
        break;
    }
    return t;
  }

  // float32 for f32 and bf16, float64 for f64, int32 for i32; the tensor's shape.
  py::array out(const Tensor& t) {
    std::vector<py::ssize_t> shape(t.shape.begin(), t.shape.begin() + t.ndim);
    const size_t n = static_cast<size_t>(t.numel());
    switch (t.dtype) {
      case ScalarType::kF32: {
        py::array_t<float> a(shape);
        be_.download(a.mutable_data(), t);
        return std::move(a);
      }
      case ScalarType::kBF16: {
        std::vector<uint16_t> b(n);
        be_.download(b.data(), t);
        py::array_t<float> a(shape);
        for (size_t k = 0; k < n; ++k) a.mutable_data()[k] = bf16_to_f32(b[k]);
        return std::move(a);
      }
      case ScalarType::kF64: {
        py::array_t<double> a(shape);
        be_.download(a.mutable_data(), t);
        return std::move(a);
      }
      case ScalarType::kI32: {
        py::array_t<int32_t> a(shape);
        be_.download(a.mutable_data(), t);
        return std::move(a);
      }
    }
    return py::none();
  }

 private:
  Backend& be_;
  std::vector<std::shared_ptr<Buffer>> bufs_;
};

struct WeightName {
  const char* name;
  W id;
  bool per_layer;
};
// The names of backend.h's W ids (kPostAttnNorm -> "post_attn_norm").
constexpr WeightName kWeights[] = {
    {"final_norm", W::kFinalNorm, false}, {"sc_pre_norm", W::kScPreNorm, false}, {"sc_mlp", W::kScMlp, false},
    {"input_norm", W::kInputNorm, true},  {"post_attn_norm", W::kPostAttnNorm, true},
    {"pre_ffn_norm", W::kPreFfnNorm, true}, {"pre_ffn_norm2", W::kPreFfnNorm2, true},
    {"q_norm", W::kQNorm, true},          {"k_norm", W::kKNorm, true},
    {"q_proj", W::kQProj, true},          {"k_proj", W::kKProj, true},
    {"v_proj", W::kVProj, true},          {"o_proj", W::kOProj, true},
    {"mlp", W::kMlp, true},
};

std::vector<std::string> op_names() {
  std::vector<std::string> v;
  for (int k = 0; k < static_cast<int>(Op::kCount); ++k) v.emplace_back(op_name(static_cast<Op>(k)));
  return v;
}

class BackendOps {
 public:
  // cpu_weights (the CPU backend only): "float32" (default: every matrix expanded at load), "stored"
  // or "bf16", as Engine(cpu_weights=...).
  BackendOps(const std::string& dir, const std::string& device, const std::string& cpu_weights = "float32")
      : device_(device) {
    check_device(device);  // before loading anything
    DG_REQUIRE(cpu_weights == "stored" || cpu_weights == "float32" || cpu_weights == "bf16", InvalidArgument,
               "cpu_weights must be 'stored', 'float32' or 'bf16', got '" << cpu_weights << "'");
    cfg_ = load_model_config(dir);
    w_ = ModelWeights::load(dir, cfg_, {}, cpu_weights == "float32" ? HostF32::kAll : HostF32::kWhereFree);
    be_ = make_backend(device, cfg_, *w_, cpu_weights == "bf16");
  }

  static std::string unavailable(const std::string& device) {
    try {
      check_device(device);
    } catch (const InvalidArgument& e) {
      return e.what();
    }
    return "";
  }

  Backend& be() { return *be_; }
  const ModelConfig& cfg() const { return cfg_; }
  const std::string& device() const { return device_; }

  py::dict config() const {
    py::dict d;
    d["vocab_size"] = cfg_.vocab_size;
    d["hidden_size"] = cfg_.hidden_size;
    d["intermediate_size"] = cfg_.intermediate_size;
    d["num_layers"] = cfg_.num_layers;
    d["num_heads"] = cfg_.num_heads;
    d["num_experts"] = cfg_.num_experts;
    d["top_k_experts"] = cfg_.top_k_experts;
    d["moe_intermediate_size"] = cfg_.moe_intermediate_size;
    d["sliding_window"] = cfg_.sliding_window;
    d["rms_norm_eps"] = cfg_.rms_norm_eps;
    d["final_logit_softcapping"] =
        cfg_.final_logit_softcapping ? py::object(py::float_(*cfg_.final_logit_softcapping)) : py::none();
    py::list layers;
    for (const auto& l : cfg_.layers) {
      py::dict ld;
      ld["sliding"] = l.sliding;
      ld["head_dim"] = l.head_dim;
      ld["num_kv_heads"] = l.num_kv_heads;
      ld["k_eq_v"] = l.k_eq_v;
      ld["inv_freq"] = py::array_t<float>(static_cast<py::ssize_t>(l.inv_freq.size()), l.inv_freq.data());
      layers.append(ld);
    }
    d["layers"] = layers;
    return d;
  }

  bool supports(const std::string& op) const {
    for (int k = 0; k < static_cast<int>(Op::kCount); ++k)
      if (op == op_name(static_cast<Op>(k))) return be_->supports(static_cast<Op>(k));
    DG_THROW(InvalidArgument, "no op named '" << printable(op, 40) << "'");
  }

  // "act", "kv", "f32", "f64", "bf16", "i32" -> the dtype.
  ScalarType dtype(const std::string& s, const char* op) const {
    if (s == "act") return be_->act_dtype();
    if (s == "kv") return be_->kv_dtype();
    if (s == "f32") return ScalarType::kF32;
    if (s == "f64") return ScalarType::kF64;
    if (s == "bf16") return ScalarType::kBF16;
    if (s == "i32") return ScalarType::kI32;
    DG_THROW(InvalidArgument, op << ": dtype must be one of act, kv, f32, f64, bf16, i32; got '" << printable(s, 20) << "'");
  }

  float eps(py::object e) const { return e.is_none() ? static_cast<float>(cfg_.rms_norm_eps) : e.cast<float>(); }

  void check_layer(int layer, const char* op) const {
    DG_REQUIRE(layer >= 0 && layer < cfg_.num_layers, InvalidArgument,
               op << ": layer must be in [0, " << cfg_.num_layers << "), got " << layer);
  }

  // A weight name (or None) as a WeightRef, checked against the layer argument.
  WeightRef weight(py::object name, int layer, const char* op) const {
    if (name.is_none()) return WeightRef{};
    const std::string s = py::str(name).cast<std::string>();
    for (const auto& w : kWeights) {
      if (s != w.name) continue;
      if (w.per_layer) {
        check_layer(layer, op);
        return WeightRef{w.id, layer};
      }
      DG_REQUIRE(layer == -1, InvalidArgument, op << ": '" << s << "' is a global weight; leave layer at -1");
      return WeightRef{w.id, -1};
    }
    DG_THROW(InvalidArgument, op << ": no weight named '" << printable(s, 40) << "'");
  }

  // Size of the vector a norm weight scales (H, or the layer's head_dim for q_norm / k_norm).
  int64_t norm_size(WeightRef w, const char* op) const {
    switch (w.id) {
      case W::kFinalNorm:
      case W::kScPreNorm:
      case W::kInputNorm:
      case W::kPostAttnNorm:
      case W::kPreFfnNorm:
      case W::kPreFfnNorm2: return cfg_.hidden_size;
      case W::kQNorm:
      case W::kKNorm: return cfg_.layers[w.layer].head_dim;
      default: break;
    }
    DG_THROW(InvalidArgument, op << ": the weight is not a norm");
  }

  // [N, K] of a projection.
  std::pair<int64_t, int64_t> matrix_shape(WeightRef w) const {
    const LayerSpec& l = cfg_.layers.at(w.layer);
    const int64_t H = cfg_.hidden_size, q = int64_t{cfg_.num_heads} * l.head_dim, kv = int64_t{l.num_kv_heads} * l.head_dim;
    switch (w.id) {
      case W::kQProj: return {q, H};
      case W::kKProj: return {kv, H};
      case W::kVProj:
        DG_REQUIRE(!l.k_eq_v, InvalidArgument, "linear: layer " << w.layer << " has no v_proj (V comes from k_proj)");
        return {kv, H};
      case W::kOProj: return {H, q};
      default: break;
    }
    DG_THROW(InvalidArgument, "linear: the weight is not a projection (q_proj, k_proj, v_proj, o_proj)");
  }

 private:
  std::string device_;
  ModelConfig cfg_;  // the backend keeps references to cfg_ and *w_: declared before be_
  std::unique_ptr<ModelWeights> w_;
  std::unique_ptr<Backend> be_;
};

void check_index_range(const Host& h, int64_t lo, int64_t hi, const char* op, const char* name) {
  for (int32_t v : h.i)
    DG_REQUIRE(v >= lo && v < hi, InvalidArgument, op << ": " << name << " holds " << v << ", outside [" << lo << ", " << hi << ")");
}

void check_distinct(const Host& h, const char* op, const char* name) {
  std::set<int32_t> seen;
  for (int32_t v : h.i)
    if (v >= 0) DG_REQUIRE(seen.insert(v).second, InvalidArgument, op << ": " << name << " repeats " << v);
}

py::array embed(BackendOps& o, py::handle ids_) {
  const char* op = "embed";
  const ModelConfig& c = o.cfg();
  Host ids = host(ids_, ScalarType::kI32, op, "ids", {kAny});
  check_index_range(ids, 0, c.vocab_size, op, "ids");
  Call call(o.be());
  Tensor ids_t = call.in(ids, ScalarType::kI32, "ids");
  Tensor out = call.alloc(ScalarType::kF32, {ids.dim(0), c.hidden_size}, "out");
  o.be().embed(ids_t, out);
  return call.out(out);
}

py::array rmsnorm(BackendOps& o, py::handle x_, py::object w_, int layer, py::object eps, const std::string& x_dtype,
                  const std::string& out_dtype, bool inplace) {
  const char* op = "rmsnorm";
  const WeightRef w = o.weight(w_, layer, op);
  const int64_t D = w.id == W::kNone ? kAny : o.norm_size(w, op);
  Host x = host(x_, ScalarType::kF32, op, "x", {kAny, D});
  const ScalarType xt = o.dtype(x_dtype, op), ot = o.dtype(out_dtype, op);
  DG_REQUIRE((xt == ScalarType::kF32 || xt == o.be().act_dtype()) && (ot == ScalarType::kF32 || ot == o.be().act_dtype()),
             InvalidArgument, op << ": x and out are f32 or act");
  DG_REQUIRE(!inplace || xt == ot, InvalidArgument, op << ": in place needs x_dtype == out_dtype");
  Call call(o.be());
  Tensor xd = call.in(x, xt, "x");
  Tensor out = inplace ? xd : call.alloc(ot, x.shape, "out");
  o.be().rmsnorm(xd, w, out, o.eps(eps));
  return call.out(out);
}

py::array linear(BackendOps& o, const std::string& wname, int layer, py::handle x_) {
  const char* op = "linear";
  const WeightRef w = o.weight(py::str(wname), layer, op);
  DG_REQUIRE(w.layer >= 0, InvalidArgument, op << ": '" << wname << "' is not a projection");
  const auto [N, K] = o.matrix_shape(w);
  Host x = host(x_, ScalarType::kF32, op, "x", {kAny, K});
  const ScalarType act = o.be().act_dtype();
  Call call(o.be());
  Tensor xd = call.in(x, act, "x");
  Tensor y = call.alloc(act, {x.dim(0), N}, "y");
  o.be().linear(w, xd, y);
  return call.out(y);
}

py::array copy(BackendOps& o, py::handle x_, const std::string& dtype) {
  const char* op = "copy";
  const ScalarType dt = o.dtype(dtype, op);
  py::array a = py::array::ensure(x_);
  DG_REQUIRE(a && a.ndim() >= 1 && a.ndim() <= Tensor::kMaxDims, InvalidArgument,
             op << ": x must be an array of 1 to " << Tensor::kMaxDims << " dimensions");
  Host x = host(a, host_kind(dt), op, "x", Dims(static_cast<size_t>(a.ndim()), kAny));
  Call call(o.be());
  Tensor src = call.in(x, dt, "src");
  Tensor dst = call.alloc(dt, x.shape, "dst");
  o.be().copy(src, dst);
  return call.out(dst);
}

py::array head_norm_rope(BackendOps& o, py::handle x_, py::object w_, int layer, py::object positions_,
                         py::object inv_freq_, py::object eps) {
  const char* op = "head_norm_rope";
  const WeightRef w = o.weight(w_, layer, op);
  DG_REQUIRE(w.id == W::kNone || w.id == W::kQNorm || w.id == W::kKNorm, InvalidArgument,
             op << ": the weight is q_norm, k_norm or None");
  const int64_t hd = w.id == W::kNone ? kAny : o.norm_size(w, op);
  Host x = host(x_, ScalarType::kF32, op, "x", {kAny, kAny, hd});
  const int64_t T = x.dim(0), HD = x.dim(2);
  DG_REQUIRE(inv_freq_.is_none() || !positions_.is_none(), InvalidArgument, op << ": inv_freq without positions");
  Host pos, inv;
  if (!positions_.is_none()) {
    DG_REQUIRE(HD % 2 == 0 && HD <= 2048, InvalidArgument,
               op << ": RoPE needs an even head_dim of at most 2048 (the CPU backend's limit), got " << HD);
    pos = host(positions_, ScalarType::kI32, op, "positions", {T});
    check_index_range(pos, 0, INT32_MAX, op, "positions");
    if (inv_freq_.is_none()) {
      DG_REQUIRE(layer >= 0, InvalidArgument, op << ": positions without inv_freq need a layer (its inv_freq is used)");
      o.check_layer(layer, op);
      const auto& f = o.cfg().layers[layer].inv_freq;
      DG_REQUIRE(static_cast<int64_t>(f.size()) == HD / 2, InvalidArgument,
                 op << ": layer " << layer << " has head_dim " << 2 * f.size() << ", x has " << HD);
      inv.kind = ScalarType::kF32;
      inv.shape = {HD / 2};
      inv.f = f;
    } else {
      inv = host(inv_freq_, ScalarType::kF32, op, "inv_freq", {HD / 2});
    }
  }
  const ScalarType act = o.be().act_dtype();
  Call call(o.be());
  Tensor xd = call.in(x, act, "x");
  Tensor pt, it;
  if (!positions_.is_none()) {
    pt = call.in(pos, ScalarType::kI32, "positions");
    it = call.in(inv, ScalarType::kF32, "inv_freq");
  }
  o.be().head_norm_rope(xd, w, pt, it, o.eps(eps));
  return call.out(xd);
}

// A layer's (q, k, v) after head_norm_rope_qkv: q and k normed with its q_norm / k_norm and RoPE'd at
// positions with its inv_freq, v scale-free normed; q None: k and v only (the encoder's last layer).
py::tuple head_norm_rope_qkv(BackendOps& o, py::object q_, py::handle k_, py::handle v_, int layer,
                             py::handle positions_, py::object eps) {
  const char* op = "head_norm_rope_qkv";
  o.check_layer(layer, op);
  const LayerSpec& ls = o.cfg().layers[layer];
  const int64_t hd = ls.head_dim, kvh = ls.num_kv_heads;
  Host k = host(k_, ScalarType::kF32, op, "k", {kAny, kvh, hd});
  Host v = host(v_, ScalarType::kF32, op, "v", k.shape);
  Host q;
  if (!q_.is_none()) q = host(q_, ScalarType::kF32, op, "q", {k.dim(0), o.cfg().num_heads, hd});
  Host pos = host(positions_, ScalarType::kI32, op, "positions", {k.dim(0)});
  check_index_range(pos, 0, INT32_MAX, op, "positions");
  Host inv;
  inv.kind = ScalarType::kF32;
  inv.shape = {hd / 2};
  inv.f = ls.inv_freq;
  const ScalarType act = o.be().act_dtype();
  Call call(o.be());
  Tensor qt = q_.is_none() ? Tensor{} : call.in(q, act, "q");
  Tensor kt = call.in(k, act, "k"), vt = call.in(v, act, "v");
  Tensor pt = call.in(pos, ScalarType::kI32, "positions"), it = call.in(inv, ScalarType::kF32, "inv_freq");
  o.be().head_norm_rope_qkv({qt, weight(W::kQNorm, layer), true}, {kt, weight(W::kKNorm, layer), true},
                            {vt, WeightRef{}, false}, pt, it, o.eps(eps));
  return py::make_tuple(q_.is_none() ? py::object(py::none()) : py::object(call.out(qt)), call.out(kt), call.out(vt));
}

py::tuple kv_write(BackendOps& o, py::handle k_, py::handle v_, py::handle slot_, py::handle kc_, py::handle vc_) {
  const char* op = "kv_write";
  Host kc = host(kc_, ScalarType::kF32, op, "k_cache", {kAny, kAny, kAny, kAny});
  Host vc = host(vc_, ScalarType::kF32, op, "v_cache", kc.shape);
  Host k = host(k_, ScalarType::kF32, op, "k", {kAny, kc.dim(2), kc.dim(3)});
  Host v = host(v_, ScalarType::kF32, op, "v", k.shape);
  Host slot = host(slot_, ScalarType::kI32, op, "slot", {k.dim(0)});
  const int64_t slots = kc.dim(0) * kc.dim(1);
  for (int32_t s : slot.i)
    DG_REQUIRE(s < slots, InvalidArgument, op << ": slot " << s << " outside the cache's " << slots << " slots");
  check_distinct(slot, op, "slot");
  const ScalarType act = o.be().act_dtype(), kvt = o.be().kv_dtype();
  Call call(o.be());
  Tensor kt = call.in(k, act, "k"), vt = call.in(v, act, "v"), st = call.in(slot, ScalarType::kI32, "slot");
  Tensor kct = call.in(kc, kvt, "k_cache"), vct = call.in(vc, kvt, "v_cache");
  o.be().kv_write(kt, vt, st, kct, vct);
  return py::make_tuple(call.out(kct), call.out(vct));
}

py::array attention(BackendOps& o, py::handle q_, py::handle kn_, py::handle vn_, py::handle kc_, py::handle vc_,
                    py::handle table_, py::handle first_, py::handle start_, py::handle len_, py::handle tok0_,
                    py::handle count_, bool causal, int window, float scale) {
  const char* op = "attention";
  Host q = host(q_, ScalarType::kF32, op, "q", {kAny, kAny, kAny});
  const int64_t T = q.dim(0), NH = q.dim(1), HD = q.dim(2);
  Host kn = host(kn_, ScalarType::kF32, op, "k_new", {T, kAny, HD});
  const int64_t KVH = kn.dim(1);
  DG_REQUIRE(NH % KVH == 0, InvalidArgument, op << ": " << NH << " query heads are not a multiple of " << KVH << " kv heads");
  Host vn = host(vn_, ScalarType::kF32, op, "v_new", kn.shape);
  Host kc = host(kc_, ScalarType::kF32, op, "k_cache", {kAny, kAny, KVH, HD});
  Host vc = host(vc_, ScalarType::kF32, op, "v_cache", kc.shape);
  const int64_t NB = kc.dim(0), BS = kc.dim(1);
  Host table = host(table_, ScalarType::kI32, op, "block_table", {kAny, kAny});
  const int64_t R = table.dim(0), MB = table.dim(1);
  Host first = host(first_, ScalarType::kI32, op, "cache_first_pos", {R});
  Host start = host(start_, ScalarType::kI32, op, "cache_start", {R});
  Host len = host(len_, ScalarType::kI32, op, "cache_len", {R});
  Host tok0 = host(tok0_, ScalarType::kI32, op, "tok0", {R});
  Host count = host(count_, ScalarType::kI32, op, "count", {R});
  DG_REQUIRE(window >= 0, InvalidArgument, op << ": window must be >= 0");
  int max_count = 0, max_cached = 0;
  std::vector<char> owned(static_cast<size_t>(T), 0);
  for (int64_t r = 0; r < R; ++r) {
    const int64_t f = first.i[r], s = start.i[r], l = len.i[r], t0 = tok0.i[r], n = count.i[r];
    DG_REQUIRE(n >= 0 && t0 >= 0 && t0 + n <= T, InvalidArgument,
               op << ": row " << r << " owns tokens [" << t0 << ", " << t0 + n << "), outside [0, " << T << ")");
    for (int64_t t = t0; t < t0 + n; ++t) {
      DG_REQUIRE(!owned[t], InvalidArgument, op << ": token " << t << " belongs to two rows");
      owned[t] = 1;
    }
    DG_REQUIRE(s >= 0 && s <= l, InvalidArgument, op << ": row " << r << " has cache_start " << s << " > cache_len " << l);
    if (l > s) {
      DG_REQUIRE(f >= 0 && f <= s, InvalidArgument,
                 op << ": row " << r << " has cache_first_pos " << f << " outside [0, cache_start = " << s << "]");
      DG_REQUIRE((l - 1 - f) / BS < MB, InvalidArgument,
                 op << ": row " << r << "'s block table (" << MB << " blocks) is too short for position " << l - 1);
      for (int64_t b = (s - f) / BS; b <= (l - 1 - f) / BS; ++b) {
        const int32_t id = table.i[static_cast<size_t>(r * MB + b)];
        DG_REQUIRE(id >= 0 && id < NB, InvalidArgument, op << ": row " << r << " names block " << id << " of " << NB);
      }
    }
    max_count = std::max<int>(max_count, static_cast<int>(n));
    max_cached = std::max<int>(max_cached, static_cast<int>(l - s));
  }
  const ScalarType act = o.be().act_dtype(), kvt = o.be().kv_dtype();
  Call call(o.be());
  AttentionArgs a;
  a.q = call.in(q, act, "q");
  a.k_new = call.in(kn, act, "k_new");
  a.v_new = call.in(vn, act, "v_new");
  a.out = call.alloc(act, q.shape, "out");
  a.k_cache = call.in(kc, kvt, "k_cache");
  a.v_cache = call.in(vc, kvt, "v_cache");
  a.block_table = call.in(table, ScalarType::kI32, "block_table");
  a.cache_first_pos = call.in(first, ScalarType::kI32, "cache_first_pos");
  a.cache_start = call.in(start, ScalarType::kI32, "cache_start");
  a.cache_len = call.in(len, ScalarType::kI32, "cache_len");
  a.tok0 = call.in(tok0, ScalarType::kI32, "tok0");
  a.count = call.in(count, ScalarType::kI32, "count");
  a.max_count = max_count;
  a.max_cached = max_cached;  // as the forward passes it: the CUDA backend's split-KV choice reads it
  a.causal = causal;
  a.window = window;
  a.scale = scale;
  o.be().attention(a);
  return call.out(a.out);
}

py::array residual_norm_add(BackendOps& o, py::handle x_, py::handle h_, py::object w_, int layer, py::object eps) {
  const char* op = "residual_norm_add";
  const WeightRef w = o.weight(w_, layer, op);
  const int64_t H = o.cfg().hidden_size;
  DG_REQUIRE(w.id == W::kNone || o.norm_size(w, op) == H, InvalidArgument, op << ": the weight must be an [H] norm");
  Host x = host(x_, ScalarType::kF32, op, "x", {kAny, H});
  Host h = host(h_, ScalarType::kF32, op, "h", x.shape);
  Call call(o.be());
  Tensor xt = call.in(x, ScalarType::kF32, "x"), ht = call.in(h, o.be().act_dtype(), "h");
  o.be().residual_norm_add(xt, ht, w, o.eps(eps));
  return call.out(xt);
}

py::array mlp(BackendOps& o, const std::string& wname, int layer, py::handle x_) {
  const char* op = "mlp";
  const WeightRef w = o.weight(py::str(wname), layer, op);
  DG_REQUIRE(w.id == W::kMlp || w.id == W::kScMlp, InvalidArgument, op << ": the weight is 'mlp' (with a layer) or 'sc_mlp'");
  const int64_t H = o.cfg().hidden_size, I = o.cfg().intermediate_size;
  Host x = host(x_, ScalarType::kF32, op, "x", {kAny, H});
  const ScalarType act = o.be().act_dtype();
  Call call(o.be());
  Tensor xt = call.in(x, act, "x");
  Tensor out = call.alloc(act, x.shape, "out");
  // [T, 3 * I]: room for a backend that keeps gate, up and the activation apart (the CPU uses 2 * I).
  Tensor scratch = call.alloc(act, {x.dim(0), 3 * I}, "scratch");
  o.be().mlp(w, xt, out, scratch);
  return call.out(out);
}

py::tuple moe_router(BackendOps& o, int layer, py::handle x_, py::object eps) {
  const char* op = "moe_router";
  o.check_layer(layer, op);
  const int64_t H = o.cfg().hidden_size, K = o.cfg().top_k_experts;
  Host x = host(x_, ScalarType::kF32, op, "x", {kAny, H});
  Call call(o.be());
  Tensor xt = call.in(x, ScalarType::kF32, "x");
  Tensor idx = call.alloc(ScalarType::kI32, {x.dim(0), K}, "topk_idx");
  Tensor wt = call.alloc(ScalarType::kF32, {x.dim(0), K}, "topk_w");
  o.be().moe_router(layer, xt, idx, wt, o.eps(eps));
  return py::make_tuple(call.out(idx), call.out(wt));
}

py::array moe_experts(BackendOps& o, int layer, py::handle x_, py::handle idx_, py::handle w_) {
  const char* op = "moe_experts";
  o.check_layer(layer, op);
  const int64_t H = o.cfg().hidden_size, K = o.cfg().top_k_experts, E = o.cfg().num_experts;
  Host x = host(x_, ScalarType::kF32, op, "x", {kAny, H});
  const int64_t T = x.dim(0);
  Host idx = host(idx_, ScalarType::kI32, op, "topk_idx", {T, K});
  Host w = host(w_, ScalarType::kF32, op, "topk_w", {T, K});
  check_index_range(idx, 0, E, op, "topk_idx");
  for (int64_t t = 0; t < T; ++t) {
    std::set<int32_t> seen(idx.i.begin() + t * K, idx.i.begin() + (t + 1) * K);
    DG_REQUIRE(static_cast<int64_t>(seen.size()) == K, InvalidArgument, op << ": token " << t << " names an expert twice");
  }
  const ScalarType act = o.be().act_dtype();
  Call call(o.be());
  Tensor xt = call.in(x, act, "x");
  Tensor it = call.in(idx, ScalarType::kI32, "topk_idx"), wt = call.in(w, ScalarType::kF32, "topk_w");
  Tensor out = call.alloc(act, x.shape, "out");
  const size_t ws = o.be().moe_workspace_bytes(static_cast<int>(T));
  Tensor work = call.alloc(ScalarType::kF32, {static_cast<int64_t>(std::max<size_t>((ws + 3) / 4, 1))}, "workspace");
  o.be().moe_experts(layer, xt, it, wt, out, work);
  return call.out(out);
}

// A fused op's trailing norm weight: an [H] norm (or none), per layer or global as its name says.
WeightRef hidden_norm(BackendOps& o, py::object name, int layer, const char* op) {
  const WeightRef w = o.weight(name, layer, op);
  DG_REQUIRE(w.id == W::kNone || o.norm_size(w, op) == o.cfg().hidden_size, InvalidArgument,
             op << ": a trailing norm's weight must be an [H] norm");
  return w;
}

// (x, a, b): x after the residual add, a = rmsnorm(x) * wa written over h (the fused op's aliasing), b.
py::tuple residual_norm_add_norms(BackendOps& o, py::handle x_, py::handle h_, int layer, py::object wa_,
                                  py::object wb_, py::object eps) {
  const char* op = "residual_norm_add_norms";
  const WeightRef w = o.weight(py::str("post_attn_norm"), layer, op);
  const WeightRef wa = hidden_norm(o, wa_, layer, op), wb = hidden_norm(o, wb_, layer, op);
  const int64_t H = o.cfg().hidden_size;
  Host x = host(x_, ScalarType::kF32, op, "x", {kAny, H});
  Host h = host(h_, ScalarType::kF32, op, "h", x.shape);
  const ScalarType act = o.be().act_dtype();
  Call call(o.be());
  Tensor xt = call.in(x, ScalarType::kF32, "x"), ht = call.in(h, act, "h");
  Tensor bt = call.alloc(act, x.shape, "b");
  o.be().residual_norm_add_norms(xt, ht, w, o.eps(eps), {wa, ht}, {wb, bt});
  return py::make_tuple(call.out(xt), call.out(ht), call.out(bt));
}

// ffn_combine (fused = false: x) or ffn_combine_norm (fused: (x, out = rmsnorm(x) * next_w)).
py::object ffn_combine_call(BackendOps& o, const char* op, bool fused, int layer, bool encoder, py::handle x_,
                            py::handle dense_, py::handle moe_, py::object next_w_, int next_layer, py::object eps) {
  o.check_layer(layer, op);
  const WeightRef nw = fused ? hidden_norm(o, next_w_, next_layer, op) : WeightRef{};
  const int64_t H = o.cfg().hidden_size;
  Host x = host(x_, ScalarType::kF32, op, "x", {kAny, H});
  Host dense = host(dense_, ScalarType::kF32, op, "dense", x.shape);
  Host moe = host(moe_, ScalarType::kF32, op, "moe", x.shape);
  const ScalarType act = o.be().act_dtype();
  Call call(o.be());
  Tensor xt = call.in(x, ScalarType::kF32, "x");
  Tensor dt = call.in(dense, act, "dense"), mt = call.in(moe, act, "moe");
  if (!fused) {
    o.be().ffn_combine(layer, encoder, xt, dt, mt, o.eps(eps));
    return call.out(xt);
  }
  Tensor out = call.alloc(act, x.shape, "out");
  o.be().ffn_combine_norm(layer, encoder, xt, dt, mt, o.eps(eps), {nw, out});
  return py::make_tuple(call.out(xt), call.out(out));
}

py::object ffn_combine(BackendOps& o, int layer, bool encoder, py::handle x_, py::handle dense_, py::handle moe_,
                       py::object eps) {
  return ffn_combine_call(o, "ffn_combine", false, layer, encoder, x_, dense_, moe_, py::none(), -1, eps);
}

// (x, out): x after ffn_combine, out = rmsnorm(x) * next_w.
py::object ffn_combine_norm(BackendOps& o, int layer, bool encoder, py::handle x_, py::handle dense_, py::handle moe_,
                            py::object next_w, int next_layer, py::object eps) {
  return ffn_combine_call(o, "ffn_combine_norm", true, layer, encoder, x_, dense_, moe_, next_w, next_layer, eps);
}

py::array gather_rows(BackendOps& o, py::handle src_, py::handle index_, const std::string& dtype) {
  const char* op = "gather_rows";
  const ScalarType dt = o.dtype(dtype, op);
  Host src = host(src_, host_kind(dt), op, "src", {kAny, kAny});
  Host index = host(index_, ScalarType::kI32, op, "index", {kAny});
  check_index_range(index, -1, src.dim(0), op, "index");  // -1: a zero row
  Call call(o.be());
  Tensor st = call.in(src, dt, "src"), it = call.in(index, ScalarType::kI32, "index");
  Tensor dst = call.alloc(dt, {index.dim(0), src.dim(1)}, "dst");
  o.be().gather_rows(st, it, dst);
  return call.out(dst);
}

py::array scatter_add_rows(BackendOps& o, py::handle dst_, py::handle src_, py::handle index_) {
  const char* op = "scatter_add_rows";
  Host dst = host(dst_, ScalarType::kF32, op, "dst", {kAny, kAny});
  Host src = host(src_, ScalarType::kF32, op, "src", {kAny, dst.dim(1)});
  Host index = host(index_, ScalarType::kI32, op, "index", {src.dim(0)});
  check_index_range(index, -1, dst.dim(0), op, "index");  // -1: row skipped
  check_distinct(index, op, "index");
  Call call(o.be());
  Tensor dt = call.in(dst, ScalarType::kF32, "dst"), st = call.in(src, o.be().act_dtype(), "src");
  Tensor it = call.in(index, ScalarType::kI32, "index");
  o.be().scatter_add_rows(dt, st, it);
  return call.out(dt);
}

py::dict lm_head_sample(BackendOps& o, py::handle x_, int n, py::handle temp_, py::handle uni_, py::object sidx_,
                        py::object soft_) {
  const char* op = "lm_head_sample";
  const int64_t H = o.cfg().hidden_size;
  Host x = host(x_, ScalarType::kF32, op, "x", {kAny, H});
  const int64_t T = x.dim(0);
  DG_REQUIRE(n > 0 && T % n == 0, InvalidArgument, op << ": n = " << n << " does not divide the " << T << " positions");
  Host temp = host(temp_, ScalarType::kF32, op, "temperature", {T / n});
  for (float t : temp.f) DG_REQUIRE(t > 0, InvalidArgument, op << ": temperature " << t << " is not positive");
  Host uni = host(uni_, ScalarType::kF64, op, "uniform", {T});
  for (double u : uni.d) DG_REQUIRE(u >= 0 && u < 1, InvalidArgument, op << ": uniform " << u << " outside [0, 1)");
  Host sidx;
  if (sidx_.is_none()) {
    sidx.kind = ScalarType::kI32;
    sidx.shape = {T};
    sidx.i.assign(static_cast<size_t>(T), -1);
  } else {
    sidx = host(sidx_, ScalarType::kI32, op, "soft_index", {T});
  }
  check_distinct(sidx, op, "soft_index");
  int64_t S = 1;
  for (int32_t s : sidx.i) S = std::max<int64_t>(S, int64_t{s} + 1);
  Host soft;
  if (soft_.is_none()) {
    soft.kind = ScalarType::kF32;
    soft.shape = {S, H};
    soft.f.assign(static_cast<size_t>(S * H), 0.0f);
  } else {
    soft = host(soft_, ScalarType::kF32, op, "soft", {kAny, H});
  }
  check_index_range(sidx, INT32_MIN, soft.dim(0), op, "soft_index");
  const ScalarType act = o.be().act_dtype();
  Call call(o.be());
  SampleArgs a;
  a.x = call.in(x, act, "x");
  a.n = n;
  a.temperature = call.in(temp, ScalarType::kF32, "temperature");
  a.uniform = call.in(uni, ScalarType::kF64, "uniform");
  a.token = call.alloc(ScalarType::kI32, {T}, "token");
  a.argmax = call.alloc(ScalarType::kI32, {T}, "argmax");
  a.entropy = call.alloc(ScalarType::kF32, {T}, "entropy");
  a.soft = call.in(soft, act, "soft");
  a.soft_index = call.in(sidx, ScalarType::kI32, "soft_index");
  o.be().lm_head_sample(a);
  py::dict d;
  d["token"] = call.out(a.token);
  d["argmax"] = call.out(a.argmax);
  d["entropy"] = call.out(a.entropy);
  d["soft"] = call.out(a.soft);
  return d;
}

py::array lm_head_logits(BackendOps& o, py::handle x_) {
  const char* op = "lm_head_logits";
  Host x = host(x_, ScalarType::kF32, op, "x", {kAny, o.cfg().hidden_size});
  Call call(o.be());
  Tensor xt = call.in(x, o.be().act_dtype(), "x");
  Tensor logits = call.alloc(ScalarType::kF32, {x.dim(0), o.cfg().vocab_size}, "logits");
  o.be().lm_head_logits(xt, logits);
  return call.out(logits);
}

py::array soft_embedding(BackendOps& o, py::handle logits_) {
  const char* op = "soft_embedding";
  Host logits = host(logits_, ScalarType::kF32, op, "logits", {kAny, o.cfg().vocab_size});
  Call call(o.be());
  Tensor lt = call.in(logits, ScalarType::kF32, "logits");
  Tensor out = call.alloc(o.be().act_dtype(), {logits.dim(0), o.cfg().hidden_size}, "out");
  o.be().soft_embedding(lt, out);
  return call.out(out);
}

}  // namespace

void bind_backend_ops(py::module_& m) {
  using py::arg;
  const auto none = py::none();
  py::class_<BackendOps>(m, "BackendOps",
                         "A backend's ops on numpy arrays (backend/backend.h): inputs are uploaded in the dtype the "
                         "op's contract names, float outputs come back as float32 (bf16 widened), indices as int32")
      .def(py::init<const std::string&, const std::string&, const std::string&>(), arg("checkpoint_dir"),
           arg("device") = "cpu", arg("cpu_weights") = "float32")
      .def_static("unavailable", &BackendOps::unavailable, arg("device"),
                  "Why no backend runs this device name here, or '' when one does")
      .def_static("op_names", &op_names, "Every op of backend.h, in its order")
      .def_property_readonly("device", &BackendOps::device)
      .def_property_readonly("name", [](BackendOps& o) { return o.be().name(); })
      .def_property_readonly("act_dtype", [](BackendOps& o) { return std::string(scalar_name(o.be().act_dtype())); })
      .def_property_readonly("kv_dtype", [](BackendOps& o) { return std::string(scalar_name(o.be().kv_dtype())); })
      .def_property_readonly("config", &BackendOps::config)
      .def("supports", &BackendOps::supports, arg("op"))
      .def("moe_workspace_bytes", [](BackendOps& o, int tokens) { return o.be().moe_workspace_bytes(tokens); },
           arg("tokens"))
      .def("embed", &embed, arg("ids"))
      .def("rmsnorm", &rmsnorm, arg("x"), arg("w") = none, arg("layer") = -1, arg("eps") = none,
           arg("x_dtype") = "f32", arg("out_dtype") = "act", arg("inplace") = false)
      .def("linear", &linear, arg("w"), arg("layer"), arg("x"))
      .def("copy", &copy, arg("x"), arg("dtype") = "act")
      .def("head_norm_rope", &head_norm_rope, arg("x"), arg("w") = none, arg("layer") = -1, arg("positions") = none,
           arg("inv_freq") = none, arg("eps") = none)
      .def("head_norm_rope_qkv", &head_norm_rope_qkv, arg("q"), arg("k"), arg("v"), arg("layer"), arg("positions"),
           arg("eps") = none, "(q, k, v) of a layer after head_norm_rope_qkv (q None: k and v only)")
      .def("kv_write", &kv_write, arg("k"), arg("v"), arg("slot"), arg("k_cache"), arg("v_cache"))
      .def("attention", &attention, arg("q"), arg("k_new"), arg("v_new"), arg("k_cache"), arg("v_cache"),
           arg("block_table"), arg("cache_first_pos"), arg("cache_start"), arg("cache_len"), arg("tok0"),
           arg("count"), arg("causal") = false, arg("window") = 0, arg("scale") = 1.0f)
      .def("residual_norm_add", &residual_norm_add, arg("x"), arg("h"), arg("w") = "post_attn_norm",
           arg("layer") = -1, arg("eps") = none)
      .def("mlp", &mlp, arg("w"), arg("layer"), arg("x"))
      .def("moe_router", &moe_router, arg("layer"), arg("x"), arg("eps") = none)
      .def("moe_experts", &moe_experts, arg("layer"), arg("x"), arg("topk_idx"), arg("topk_w"))
      .def("ffn_combine", &ffn_combine, arg("layer"), arg("encoder"), arg("x"), arg("dense"), arg("moe"),
           arg("eps") = none)
      .def("residual_norm_add_norms", &residual_norm_add_norms, arg("x"), arg("h"), arg("layer"),
           arg("wa") = "pre_ffn_norm", arg("wb") = "pre_ffn_norm2", arg("eps") = none,
           "(x, a, b): residual_norm_add, then a = rmsnorm(x) * wa (written over h) and b = rmsnorm(x) * wb")
      .def("ffn_combine_norm", &ffn_combine_norm, arg("layer"), arg("encoder"), arg("x"), arg("dense"), arg("moe"),
           arg("next_w") = "input_norm", arg("next_layer") = -1, arg("eps") = none,
           "(x, out): ffn_combine, then out = rmsnorm(x) * next_w (next_layer: its layer, -1 for a global norm)")
      .def("gather_rows", &gather_rows, arg("src"), arg("index"), arg("dtype") = "act")
      .def("scatter_add_rows", &scatter_add_rows, arg("dst"), arg("src"), arg("index"))
      .def("lm_head_sample", &lm_head_sample, arg("x"), arg("n"), arg("temperature"), arg("uniform"),
           arg("soft_index") = none, arg("soft") = none)
      .def("lm_head_logits", &lm_head_logits, arg("x"))
      .def("soft_embedding", &soft_embedding, arg("logits"));
}

}  // namespace dgemma::bindings
