// pybind11 bindings: the only place that knows about Python.
#include <pybind11/functional.h>
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <climits>
#include <cxxabi.h>
#include <cstring>
#include <thread>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "backend/cpu/cpu_backend.h"
#include "backend/cpu/ops.h"
#include "bindings/backend_ops.h"
#include "bindings/graph_recording_backend.h"
#include "backend/registry.h"
#include "common/check.h"
#include "kernels/gemm/params_cache.h"
#include "runtime/engine.h"

#ifdef DGEMMA_WITH_CUDA
#include "backend/cuda/cuda_backend.h"
#include "backend/cuda/device.h"
#include "bindings/cuda_ops.h"
#include "kernels/kernel_plan.h"

std::vector<dgemma::bindings::CudaOpBinder>& dgemma::bindings::cuda_op_binders() {
  static std::vector<CudaOpBinder> binders;
  return binders;
}
#endif

namespace py = pybind11;
using namespace dgemma;

namespace {

int max_threads() {
#ifdef _OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}

// The thread count at import (all cores, or OMP_NUM_THREADS): what an engine without an explicit
// num_threads uses, even after another engine set a different count on the same thread.
const int kDefaultThreads = max_threads();

void set_threads(int n) {
#ifdef _OPENMP
  omp_set_num_threads(n > 0 ? n : kDefaultThreads);  // per calling thread, not process-wide
#endif
}

// Set by the Python layer's atexit hook (_core._python_exiting), before the interpreter finalizes; the
// hook then waits for the drops already past the check (g_dropping) to take the GIL and finish.
std::atomic<bool> g_python_exiting{false};
std::atomic<int> g_dropping{0};

// The interpreter itself is finalizing (after every atexit hook).
bool interpreter_finalizing() {
#if PY_VERSION_HEX >= 0x030D0000
  return Py_IsFinalizing() != 0;
#else
  return _Py_IsFinalizing() != 0;
#endif
}

bool py_finalizing() { return g_python_exiting.load() || interpreter_finalizing(); }

// Python's main thread (threading.main_thread()), recorded at import.
unsigned long g_main_thread = 0;
bool on_main_thread() { return PyThread_get_thread_ident() == g_main_thread; }

// Once the interpreter finalizes, taking the GIL back ends any thread but the main one (pthread_exit:
// a forced unwind, which through a noexcept destructor such as py::gil_scoped_release's, or an
// object's dealloc, is std::terminate). A daemon thread inside a native call when the main thread
// returned aborted the process that way. Such a Python thread waits here for the process to end
// instead, as Python 3.14 itself makes it wait. Not before finalization (the atexit hooks): a thread
// parked then would keep whatever locks it holds from a later hook.
[[noreturn]] void park_forever() {
  for (;;) std::this_thread::sleep_for(std::chrono::hours(1));
}
void park_if_finalizing() {
  if (interpreter_finalizing() && !on_main_thread()) park_forever();
}

// py::gil_scoped_release, but a thread that would take the GIL back while the interpreter finalizes
// is parked: before it tries, or, where finalization began while it waited for the GIL, when the
// interpreter ends it (the forced unwind is caught here, never let through the frames above).
class ReleaseGil {
 public:
  ReleaseGil() : state_(PyEval_SaveThread()) {}
  ~ReleaseGil() {
    park_if_finalizing();
    try {
      PyEval_RestoreThread(state_);
    } catch (abi::__forced_unwind&) {
      park_forever();
    }
  }
  ReleaseGil(const ReleaseGil&) = delete;
  ReleaseGil& operator=(const ReleaseGil&) = delete;

 private:
  PyThreadState* state_;
};

// Before the scheduler thread calls a request's Python callback: a scheduler thread waiting for the
// GIL when the interpreter finalizes aborts the process (its forced unwind cannot be caught there
// and resumed). Once dgemma_rt's atexit hook has run, a request submitted from any thread but the
// main one is cancelled instead (its submitter is a daemon thread: nobody waits for it, and it may
// still run when finalization begins); the main thread's requests, which it waits for itself, go on
// until finalization.
bool python_callbacks_refused(bool from_main) {
  return interpreter_finalizing() || (g_python_exiting.load() && !from_main);
}
void refuse_if_python_exiting(bool from_main) {
  if (python_callbacks_refused(from_main)) throw Cancelled("the Python interpreter is exiting");
}

// Deleter of Python things that native threads may own: dropped with the GIL, wherever the last
// owner is. Not once Python is exiting: a thread other than the main one that waits for the GIL while
// the interpreter finalizes is ended mid-unwind (std::terminate, "terminate called without an active
// exception"), so what is left then is leaked instead (the process is going away). The atexit hook
// raises the flag before finalization, then waits until no drop that passed the check is left: the
// count goes up before the check, the flag before the hook reads the count (both sequentially
// consistent), so every drop either sees the flag or is waited for.
template <typename T>
void drop_with_gil(T* p) {
  g_dropping.fetch_add(1);
  struct Counted {
    ~Counted() { g_dropping.fetch_sub(1); }
  } counted;
  if (!Py_IsInitialized() || py_finalizing()) return;
  py::gil_scoped_acquire gil;
  delete p;
}

// A Python object that native threads may own.
using PyRef = std::shared_ptr<py::object>;
PyRef hold(py::object o) { return PyRef(new py::object(std::move(o)), drop_with_gil<py::object>); }

// A Python exception raised by a callback on the scheduler thread. The request keeps it until the
// caller's result() raises it again (the translator below restores the original exception), and the
// last owner may be the scheduler thread at interpreter exit: held as a PyRef is, with its message
// taken while the GIL is held.
class PyCallbackError final : public std::exception {
 public:
  explicit PyCallbackError(py::error_already_set&& e)
      : msg_(e.what()), err_(new py::error_already_set(std::move(e)), drop_with_gil<py::error_already_set>) {}
  const char* what() const noexcept override { return msg_.c_str(); }
  // Sets the callback's exception (type, value, traceback) as the current Python error: as often as
  // result() is asked (error_already_set::restore() refuses a second time). With the GIL.
  void restore() const {
    PyErr_Restore(err_->type().inc_ref().ptr(), err_->value().inc_ref().ptr(), err_->trace().inc_ref().ptr());
  }
  // For the garbage collector (tp_traverse of the request that holds this error): the exception's
  // traceback holds the callback's frames, which often refer back to that request.
  int visit(visitproc visit, void* arg) const {
    Py_VISIT(err_->type().ptr());
    Py_VISIT(err_->value().ptr());
    Py_VISIT(err_->trace().ptr());
    return 0;
  }

 private:
  std::string msg_;
  std::shared_ptr<py::error_already_set> err_;
};

// Visits the Python objects of `error` when it is a callback's exception (tp_traverse).
int visit_callback_error(const std::exception_ptr& error, visitproc visit, void* arg) {
  if (!error) return 0;
  try {
    std::rethrow_exception(error);
  } catch (const PyCallbackError& e) {
    return e.visit(visit, arg);
  } catch (...) {
  }
  return 0;
}

// dgemma_rt.RequestCancelled and dgemma_rt.StopGeneration, once the module has made them.
PyObject* g_request_cancelled = nullptr;
PyObject* g_stop_generation = nullptr;

// Runs f (which calls Python, with the GIL held) so that a Python exception leaves as a PyCallbackError,
// except RequestCancelled, which cancels the request (its status is "cancelled", not "failed"), and, from
// an on_step/on_block callback (`callback`), StopGeneration, which ends it as done (Stopped).
template <typename F>
auto calling_python(F&& f, bool callback = false) -> decltype(f()) {
  try {
    return f();
  } catch (py::error_already_set& e) {
    if (g_request_cancelled && e.matches(g_request_cancelled)) {
      std::string why = py::str(e.value());
      throw Cancelled(why.empty() ? "cancelled by a callback" : why);
    }
    if (g_stop_generation && e.matches(g_stop_generation)) {
      DG_REQUIRE(callback, InvalidArgument,
                 "StopGeneration was raised outside on_step/on_block (only those callbacks may end a request that way)");
      throw Stopped(py::str(e.value()));
    }
    throw PyCallbackError(std::move(e));
  }
}

// Calls a Python noise callable from native code (with the GIL) and checks what it returns.
class PyNoise final : public NoiseSource {
 public:
  explicit PyNoise(py::function fn) : fn_(hold(std::move(fn))), from_main_(on_main_thread()) {}
  void canvas(int, int, int batch, int length, int32_t* out) override {
    refuse_if_python_exiting(from_main_);
    py::gil_scoped_acquire gil;
    auto arr = calling_python([&] { return fetch("canvas", batch, length); });
    if (!py::isinstance<py::array>(arr) || !(arr.dtype().kind() == 'i' || arr.dtype().kind() == 'u'))
      DG_THROW(InvalidArgument, "noise('canvas', ...) must return integer token ids");
    auto ids = py::array_t<int64_t, py::array::c_style | py::array::forcecast>::ensure(arr);
    for (py::ssize_t i = 0; i < ids.size(); ++i) {
      const int64_t v = ids.data()[i];
      DG_REQUIRE(v >= 0 && v <= INT32_MAX, InvalidArgument, "noise('canvas', ...) returned token id " << v);
      out[i] = static_cast<int32_t>(v);
    }
  }
  void uniform(int, int, int batch, int length, double* out) override {
    refuse_if_python_exiting(from_main_);
    py::gil_scoped_acquire gil;
    auto arr = calling_python([&] { return fetch("uniform", batch, length); });
    auto u = py::array_t<double, py::array::c_style | py::array::forcecast>::ensure(arr);
    DG_REQUIRE(u, InvalidArgument, "noise('uniform', ...) must return floats");
    std::memcpy(out, u.data(), sizeof(double) * static_cast<size_t>(batch) * length);
  }

 private:
  py::array fetch(const char* kind, int batch, int length) {
    py::object res = (*fn_)(kind, py::make_tuple(batch, length));
    DG_REQUIRE(!res.is_none(), InvalidArgument,
               "noise('" << kind << "', (" << batch << ", " << length << ")) returned None, not an array");
    py::array arr = py::module_::import("numpy").attr("asarray")(res);
    DG_REQUIRE(arr.ndim() == 2 && arr.shape(0) == batch && arr.shape(1) == length, InvalidArgument,
               "noise('" << kind << "', (" << batch << ", " << length << ")) returned an array of shape "
                         << std::string(py::str(py::tuple(py::module_::import("numpy").attr("shape")(arr))))
                         << ", not (" << batch << ", " << length << ")");
    return arr;
  }
  PyRef fn_;
  bool from_main_;  // made (submitted) on Python's main thread
};

py::array_t<int32_t> canvas_array(const int32_t* data, int batch, int length) {
  py::array_t<int32_t> a({batch, length});
  std::memcpy(a.mutable_data(), data, sizeof(int32_t) * static_cast<size_t>(batch) * length);
  return a;
}

py::dict config_dict(const ModelConfig& c) {
  py::dict d;
  d["vocab_size"] = c.vocab_size;
  d["hidden_size"] = c.hidden_size;
  d["intermediate_size"] = c.intermediate_size;
  d["num_hidden_layers"] = c.num_layers;
  d["num_attention_heads"] = c.num_heads;
  d["num_experts"] = c.num_experts;
  d["top_k_experts"] = c.top_k_experts;
  d["moe_intermediate_size"] = c.moe_intermediate_size;
  d["sliding_window"] = c.sliding_window;
  d["max_position_embeddings"] = c.max_position_embeddings;
  d["canvas_length"] = c.canvas_length;
  d["rms_norm_eps"] = c.rms_norm_eps;
  d["final_logit_softcapping"] = c.final_logit_softcapping ? py::object(py::float_(*c.final_logit_softcapping)) : py::none();
  d["image_token_id"] = c.image_token_id ? py::object(py::int_(*c.image_token_id)) : py::none();
  d["layer_types"] = c.layer_types;
  py::list heads, kv;
  for (const auto& l : c.layers) heads.append(l.head_dim), kv.append(l.num_kv_heads);
  d["head_dims"] = heads;
  d["num_key_value_heads"] = kv;
  return d;
}

template <typename T>
py::object opt(const std::optional<T>& v) {
  return v ? py::cast(*v) : py::none();
}

py::dict defaults_dict(const GenerationDefaults& g) {
  py::dict d;
  d["eos_token_id"] = opt(g.eos_token_id);
  d["pad_token_id"] = opt(g.pad_token_id);
  d["bos_token_id"] = opt(g.bos_token_id);
  d["max_new_tokens"] = opt(g.max_new_tokens);
  d["max_denoising_steps"] = opt(g.max_denoising_steps);
  d["entropy_bound"] = opt(g.entropy_bound);
  d["t_min"] = opt(g.t_min);
  d["t_max"] = opt(g.t_max);
  d["stability_threshold"] = opt(g.stability_threshold);
  d["confidence_threshold"] = opt(g.confidence_threshold);
  return d;
}

// Stops an engine (cancelling what still runs) and frees it: the deleter of PyEngine's engine.
void stop_engine(Engine* p) {
  auto stop = [p] {
    if (Scheduler::on_any_scheduler_thread()) {
      // The last reference went away inside a callback, on a scheduler thread (perhaps this
      // engine's own, which cannot join itself): stop the engine from a thread of its own.
      std::thread([p] { delete p; }).detach();
      return;
    }
    delete p;
  };
  if (PyGILState_Check()) {
    // Stopping the scheduler may run callbacks of requests still in flight, which need the GIL.
    ReleaseGil release;
    stop();
  } else {
    stop();
  }
}

struct PyEngine {
  int threads = 0;
  void set(std::unique_ptr<Engine> e) { engine_ = std::shared_ptr<Engine>(e.release(), stop_engine); }
  // The engine, or "closed" (RuntimeError). A call that releases the GIL holds the copy it got: a
  // close() on another thread meanwhile never frees the engine under it (the last copy stops it).
  std::shared_ptr<Engine> get() const {
    DG_REQUIRE(engine_, Error, "this Engine is closed");
    return engine_;
  }
  bool closed() const { return !engine_; }
  // Stops the engine now: queued and running requests end as cancelled, its memory is freed (KVCaches
  // still referenced keep the KV storage they point into). Idempotent.
  void close() { std::shared_ptr<Engine>(std::move(engine_)).reset(); }
  ~PyEngine() { close(); }

 private:
  std::shared_ptr<Engine> engine_;
};

// A submitted request as Python sees it: the native handle plus the caches it writes.
struct PyRequest {
  std::shared_ptr<RequestHandle> handle;
  std::shared_ptr<CacheSet> cache;
};

// A Python int in [lo, hi] as an int, or ValueError naming the parameter (never pybind's
// "Unable to cast" for values that do not fit a C int).
int int_arg(py::handle v, const char* name, long long lo = INT32_MIN, long long hi = INT32_MAX) {
  DG_REQUIRE(PyLong_Check(v.ptr()) && !PyBool_Check(v.ptr()), InvalidArgument,
             name << " must be an integer, got " << printable(py::str(py::type::of(v).attr("__name__")).cast<std::string>()));
  int overflow = 0;
  const long long x = PyLong_AsLongLongAndOverflow(v.ptr(), &overflow);
  if (x == -1 && PyErr_Occurred()) throw py::error_already_set();
  DG_REQUIRE(overflow == 0 && x >= lo && x <= hi, InvalidArgument,
             name << " must be in [" << lo << ", " << hi << "], got "
                  << printable(py::str(v).cast<std::string>(), 40));
  return static_cast<int>(x);
}

// A file system path as the OS spells it (str, bytes or os.PathLike, through os.fsencode), so a
// directory whose name is not valid UTF-8 (a str with surrogate escapes) loads like any other.
std::string fs_path(py::handle v, const char* name) {
  DG_REQUIRE(PyUnicode_Check(v.ptr()) || PyBytes_Check(v.ptr()) || PyObject_HasAttrString(v.ptr(), "__fspath__"),
             InvalidArgument,
             name << " must be a str, bytes or os.PathLike, got "
                  << printable(py::str(py::type::of(v).attr("__name__")).cast<std::string>()));
  return py::module_::import("os").attr("fsencode")(v).cast<std::string>();
}

SamplerParams sampler_params(const py::dict& p) {
  SamplerParams sp;
  sp.max_new_tokens = int_arg(p["max_new_tokens"], "max_new_tokens", 1);
  sp.max_denoising_steps = int_arg(p["max_denoising_steps"], "max_denoising_steps", 1);
  sp.entropy_bound = p["entropy_bound"].cast<double>();
  sp.t_min = p["t_min"].cast<double>();
  sp.t_max = p["t_max"].cast<double>();
  sp.stability_threshold = int_arg(p["stability_threshold"], "stability_threshold", 0);
  sp.confidence_threshold = p["confidence_threshold"].cast<double>();
  for (py::handle e : py::list(p["eos_token_id"])) sp.eos_token_id.push_back(int_arg(e, "eos_token_id", 0));
  if (!p["pad_token_id"].is_none()) sp.pad_token_id = int_arg(p["pad_token_id"], "pad_token_id", 0);
  sp.seed = p["seed"].cast<uint64_t>();
  sp.adaptive_stopping = p["adaptive_stopping"].cast<bool>();
  if (p.contains("canvas_template")) sp.canvas_template = p["canvas_template"].cast<std::vector<std::vector<int32_t>>>();
  return sp;
}

std::function<void(const int32_t*, int, int)> canvas_callback(const py::object& fn) {
  if (fn.is_none()) return {};
  PyRef ref = hold(fn);
  return [ref, from_main = on_main_thread()](const int32_t* d, int b, int l) {
    refuse_if_python_exiting(from_main);
    py::gil_scoped_acquire gil;
    calling_python([&] { (*ref)(canvas_array(d, b, l)); }, /*callback=*/true);
  };
}

py::dict result_dict(const GenerateResult& r, const std::shared_ptr<CacheSet>& cache) {
  py::dict out;
  out["new_tokens"] = r.new_tokens;
  out["tokens_per_forward"] = r.tokens_per_forward;
  out["steps_per_canvas"] = r.steps_per_canvas;
  out["stopped"] = r.stopped;
  py::dict t;
  t["queue_s"] = r.queue_s;
  t["prefill_s"] = r.prefill_s;
  t["denoise_s"] = r.denoise_s;
  t["total_s"] = r.total_s;
  t["decoder_forwards"] = r.decoder_forwards;
  t["encoder_forwards"] = r.encoder_forwards;
  out["timings"] = t;
  out["past_key_values"] = cache;
  return out;
}

// Waits without holding the GIL, but wakes up to let Ctrl-C cancel the request.
void wait_interruptibly(RequestHandle& h) {
  ReleaseGil release;
  while (!h.wait_for(0.05)) {
    park_if_finalizing();
    py::gil_scoped_acquire gil;
    if (PyErr_CheckSignals() != 0) {
      h.cancel();
      throw py::error_already_set();
    }
  }
}

// The CPU backend with some ops declared unsupported: what an incomplete backend looks like to the
// engine (tests of its error messages).
class CpuBackendWithout final : public CpuBackend {
 public:
  CpuBackendWithout(const ModelConfig& cfg, const ModelWeights& w, std::vector<Op> off)
      : CpuBackend(cfg, w), off_(std::move(off)) {}
  bool supports(Op op) const override { return !is_off(op) && CpuBackend::supports(op); }
  void moe_experts(int layer, const Tensor& x, const Tensor& idx, const Tensor& w, const Tensor& out,
                   const Tensor& ws) override {
    if (is_off(Op::kMoeExperts)) unsupported(Op::kMoeExperts);
    CpuBackend::moe_experts(layer, x, idx, w, out, ws);
  }
  void lm_head_logits(const Tensor& x, const Tensor& logits) override {
    if (is_off(Op::kLmHeadLogits)) unsupported(Op::kLmHeadLogits);
    CpuBackend::lm_head_logits(x, logits);
  }
  void soft_embedding(const Tensor& logits, const Tensor& out) override {
    if (is_off(Op::kSoftEmbedding)) unsupported(Op::kSoftEmbedding);
    CpuBackend::soft_embedding(logits, out);
  }
  static constexpr Op kCanTurnOff[] = {Op::kMoeExperts, Op::kLmHeadLogits, Op::kSoftEmbedding};

 private:
  bool is_off(Op op) const { return std::find(off_.begin(), off_.end(), op) != off_.end(); }
  std::vector<Op> off_;
};

const char* status_name(RequestHandle::Status s) {
  switch (s) {
    case RequestHandle::Status::kQueued: return "queued";
    case RequestHandle::Status::kRunning: return "running";
    case RequestHandle::Status::kDone: return "done";
    case RequestHandle::Status::kFailed: return "failed";
    case RequestHandle::Status::kCancelled: return "cancelled";
  }
  return "unknown";
}

}  // namespace

PYBIND11_MODULE(_core, m) {
  m.doc() = "dgemma_rt native core";
#ifdef DGEMMA_WITH_CUDA
  cuda::register_backend();  // device="cuda" / "cuda:N" (refused with the reason where no GPU can run it)
#endif
  static py::exception<CheckpointError> checkpoint_error(m, "CheckpointError", PyExc_ValueError);
  static py::exception<Cancelled> cancelled_error(m, "RequestCancelled", PyExc_RuntimeError);
  g_request_cancelled = cancelled_error.ptr();
  // Never raised by the engine: a callback raises it (see calling_python); an Exception, not an error.
  static py::exception<Stopped> stop_generation(m, "StopGeneration", PyExc_Exception);
  g_stop_generation = stop_generation.ptr();
  g_main_thread = py::module_::import("threading").attr("main_thread")().attr("ident").cast<unsigned long>();
  py::register_exception_translator([](std::exception_ptr p) {
    // Messages may quote bytes from a file: decoded leniently, never a UnicodeDecodeError instead.
    auto set = [](PyObject* type, const char* msg) {
      PyObject* text = PyUnicode_DecodeUTF8(msg, static_cast<Py_ssize_t>(std::strlen(msg)), "backslashreplace");
      if (!text) {
        PyErr_Clear();
        text = PyUnicode_FromString("(undecodable message)");
      }
      PyErr_SetObject(type, text);
      Py_XDECREF(text);
    };
    try {
      if (p) std::rethrow_exception(p);
    } catch (const PyCallbackError& e) {
      e.restore();  // the callback's own exception, traceback included
    } catch (const CheckpointError& e) {
      set(checkpoint_error.ptr(), e.what());
    } catch (const Cancelled& e) {
      set(cancelled_error.ptr(), e.what());
    } catch (const InvalidArgument& e) {
      set(PyExc_ValueError, e.what());
    } catch (const ResourceError& e) {
      set(PyExc_RuntimeError, e.what());
    } catch (const Unsupported& e) {
      set(PyExc_NotImplementedError, e.what());
    } catch (const Error& e) {
      set(PyExc_RuntimeError, e.what());
    }
  });

  m.def("check_checkpoint", [](py::object path_arg, const std::string& device, py::object kv_cache_tokens,
                               py::object max_batch_size, py::object num_threads) {
    const std::string path = fs_path(path_arg, "path");
    EngineOptions o;
    o.device = device;
    o.kv_cache_tokens = int_arg(kv_cache_tokens, "kv_cache_tokens", 1);
    o.max_batch_size = int_arg(max_batch_size, "max_batch_size", 1);
    o.num_threads = int_arg(num_threads, "num_threads", 0);
    ReleaseGil release;
    check_checkpoint(path, o);
  }, py::arg("path"), py::arg("device") = "cpu", py::arg("kv_cache_tokens") = 16384, py::arg("max_batch_size") = 8,
     py::arg("num_threads") = 0,
     "Everything Engine(path, ...) checks before it reads a weight (config, generation config, memory, "
     "safetensors headers, tensor names, dtypes and shapes), loading nothing. Raises CheckpointError.");
  m.def("max_threads", &max_threads, "OpenMP threads available to the CPU backend");
  m.def("thread_limit", &max_num_threads, "The largest num_threads an Engine accepts");
  m.def("cuda_compiled", []() {
#ifdef DGEMMA_WITH_CUDA
    return true;
#else
    return false;
#endif
  });
  m.def("cuda_device_count", []() {
#ifdef DGEMMA_WITH_CUDA
    return cuda::device_count();
#else
    return 0;
#endif
  }, "Number of CUDA devices visible (0 without a driver or when CUDA was not compiled)");
  m.def("cpu_has_bf16_dot", &cpu::has_bf16_dot,
        "Whether this CPU runs Engine(cpu_weights='bf16')'s BF16 dot products (AVX512-BF16, the default); "
        "without them that mode is 'stored'.");
  m.def("_python_exiting", [] { g_python_exiting.store(true); },
        "Called by dgemma_rt's atexit hook: from now on Python objects that native threads let go of are leaked, "
        "not freed (a thread waiting for the GIL while the interpreter finalizes would abort the process)");
  m.def("_native_drops_in_flight", [] { return g_dropping.load(); },
        "Native threads freeing a Python object right now (the atexit hook waits for them after _python_exiting)");
  m.def("cuda_status", []() -> std::string {
#ifdef DGEMMA_WITH_CUDA
    return cuda::status();
#else
    return "this dgemma_rt was built without CUDA (DGEMMA_CUDA=OFF or no nvcc at build time)";
#endif
  }, "What CUDA sees, in one line: the driver, the devices, whether this build has code for them");
  m.def("check_device", [](const std::string& device) { check_device(device); }, py::arg("device"),
        "Raises ValueError when no backend of this build runs the device name ('cpu', 'cuda', 'cuda:N'): "
        "the check Engine makes before loading anything, for callers that prepare work first");
#ifdef DGEMMA_WITH_CUDA
  auto ops = m.def_submodule("cuda_ops", "CUDA kernels' test entry points: numpy in, numpy out");
  for (auto bind : dgemma::bindings::cuda_op_binders()) bind(ops);
#endif

  py::class_<CacheSet, std::shared_ptr<CacheSet>>(m, "KVCache")
      .def_property_readonly("batch_size", [](const CacheSet& c) { return c.rows.size(); })
      .def_property_readonly("seq_lengths", [](const CacheSet& c) {
        std::vector<int> v;
        for (const auto& r : c.rows) v.push_back(r->length());
        return v;
      })
      .def("layer_kv", [](const CacheSet& c, int layer, int row) {
        std::vector<float> k, v;
        int n = 0;
        {
          ReleaseGil release;  // it waits for the engine's pass, whose callbacks take the GIL
          c.layer_kv(layer, row, k, v, n);
        }
        const auto& L = c.storage->layer(layer);
        const size_t tf = static_cast<size_t>(L.kv_heads) * L.head_dim;
        py::array_t<float> ka({static_cast<size_t>(n), tf}), va({static_cast<size_t>(n), tf});
        std::copy(k.begin(), k.end(), ka.mutable_data());  // not memcpy: an empty layer's data() is null
        std::copy(v.begin(), v.end(), va.mutable_data());
        return py::make_tuple(ka, va);
      }, py::arg("layer"), py::arg("row"));

  py::class_<PyEngine>(m, "Engine")
      .def(py::init([](py::object path_arg, const std::string& device, py::object kv_cache_tokens,
                       py::object max_batch_size, py::object num_threads, py::object progress,
                       py::object random_weights, bool random_nvfp4_experts,
                       const std::string& cpu_weights) {
             const std::string path = fs_path(path_arg, "path");
             EngineOptions o;
             o.device = device;
             DG_REQUIRE(cpu_weights == "stored" || cpu_weights == "float32" || cpu_weights == "bf16", InvalidArgument,
                        "cpu_weights must be 'stored', 'float32' or 'bf16', got '" << printable(cpu_weights) << "'");
             o.cpu_weights = cpu_weights == "float32" ? CpuWeights::kFloat32
                             : cpu_weights == "bf16"  ? CpuWeights::kBf16Dot
                                                      : CpuWeights::kAsStored;
             if (!random_weights.is_none()) {
               DG_REQUIRE(PyLong_Check(random_weights.ptr()) && !PyBool_Check(random_weights.ptr()), InvalidArgument,
                          "random_weights must be None or an integer seed");
               const unsigned long long seed = PyLong_AsUnsignedLongLong(random_weights.ptr());
               if (PyErr_Occurred()) {
                 PyErr_Clear();
                 DG_THROW(InvalidArgument, "random_weights must be a seed in [0, 2**64)");
               }
               o.random_weights = seed;
             }
             DG_REQUIRE(!random_nvfp4_experts || o.random_weights, InvalidArgument,
                        "random_nvfp4_experts goes with random_weights");
             o.random_nvfp4_experts = random_nvfp4_experts;
             o.kv_cache_tokens = int_arg(kv_cache_tokens, "kv_cache_tokens", 1);
             o.max_batch_size = int_arg(max_batch_size, "max_batch_size", 1);
             o.num_threads = int_arg(num_threads, "num_threads", 0);
             validate(o);  // before set_threads: a refused count must not stay set on this thread
             if (!progress.is_none()) {
               // Called as progress(phase, done, total), phase "read" (the checkpoint) or "upload"
               // (the weights to the backend's device). Held so the last copy goes with the GIL.
               PyRef fn = hold(progress);
               o.progress = [fn](ModelWeights::Phase phase, int done, int total) {
                 park_if_finalizing();  // (on the thread that makes the engine, the GIL released)
                 py::gil_scoped_acquire gil;
                 try {
                   (*fn)(phase == ModelWeights::Phase::kUpload ? "upload" : "read", done, total);
                 } catch (abi::__forced_unwind&) {
                   // The interpreter finalized while the callback ran, and ends this (daemon) thread:
                   // unwinding would run gil's destructor, which gives up the GIL this thread no
                   // longer holds, the finalizing thread's (a crash there).
                   park_forever();
                 }
               };
             }
             auto e = std::make_unique<PyEngine>();
             e->threads = o.num_threads;
             ReleaseGil release;
             set_threads(o.num_threads);
             e->set(std::make_unique<Engine>(path, o));
             return e;
           }),
           py::arg("path"), py::arg("device") = "cpu", py::arg("kv_cache_tokens") = 16384,
           py::arg("max_batch_size") = 8, py::arg("num_threads") = 0, py::arg("progress") = py::none(),
           py::arg("random_weights") = py::none(), py::arg("random_nvfp4_experts") = false,
           py::arg("cpu_weights") = "bf16")
      .def_property_readonly("config", [](const PyEngine& e) { return config_dict(e.get()->config()); })
      .def_property_readonly("generation_defaults",
                             [](const PyEngine& e) { return defaults_dict(e.get()->generation_defaults()); })
      .def_property_readonly("num_parameters", [](const PyEngine& e) { return e.get()->num_parameters(); })
      .def("kv_pool_stats", [](const PyEngine& e) {
        const std::shared_ptr<Engine> engine = e.get();
        const BlockPool& p = engine->pool();
        py::dict d;
        // Reserved: free blocks promised to admitted requests, which only those may take (read with the free
        // count, so that it never exceeds it).
        const BlockPool::Counts full = p.counts(0), sliding = p.counts(1);
        d["full_total"] = p.total_blocks(0);
        d["full_free"] = full.free;
        d["sliding_total"] = p.total_blocks(1);
        d["sliding_free"] = sliding.free;
        d["full_reserved"] = full.reserved;
        d["sliding_reserved"] = sliding.reserved;
        d["block_size"] = p.block_size();
        return d;
      })
      .def("new_cache", [](const PyEngine& e, int batch) { return e.get()->new_cache(batch); })
      .def("encode", [](PyEngine& e, const std::vector<std::vector<int32_t>>& ids, std::shared_ptr<CacheSet> cache) {
        const std::shared_ptr<Engine> engine = e.get();
        if (!cache) cache = engine->new_cache(static_cast<int>(ids.size()));
        {
          ReleaseGil release;
          set_threads(e.threads);
          engine->encode(*cache, ids);
        }
        return cache;
      }, py::arg("input_ids"), py::arg("cache") = nullptr)
      .def("denoise_logits", [](PyEngine& e, std::shared_ptr<CacheSet> cache,
                                py::array_t<int32_t, py::array::c_style | py::array::forcecast> canvas,
                                py::object sc) {
        const std::shared_ptr<Engine> engine = e.get();
        DG_REQUIRE(cache, InvalidArgument, "denoise_logits needs the KVCache from encode()");
        DG_REQUIRE(canvas.ndim() == 2, InvalidArgument, "canvas_ids must be 2-D [batch, n]");
        const int B = static_cast<int>(canvas.shape(0)), n = static_cast<int>(canvas.shape(1));
        const int V = engine->config().vocab_size;
        DG_REQUIRE(B == static_cast<int>(cache->rows.size()), InvalidArgument,
                   "canvas_ids has " << B << " rows but the cache has " << cache->rows.size());
        py::array_t<float, py::array::c_style | py::array::forcecast> sc_arr;
        const float* sc_ptr = nullptr;
        if (!sc.is_none()) {
          sc_arr = py::array_t<float, py::array::c_style | py::array::forcecast>::ensure(sc);
          DG_REQUIRE(sc_arr && sc_arr.ndim() == 3 && sc_arr.shape(0) == B && sc_arr.shape(1) == n && sc_arr.shape(2) == V,
                     InvalidArgument, "self_conditioning_logits must be float32 [" << B << ", " << n << ", " << V << "]");
          sc_ptr = sc_arr.data();
        }
        std::vector<int32_t> ids(canvas.data(), canvas.data() + canvas.size());
        py::array_t<float> out({B, n, V});
        float* optr = out.mutable_data();
        {
          ReleaseGil release;
          set_threads(e.threads);
          engine->decode(*cache, ids, n, sc_ptr, optr);
        }
        return out;
      }, py::arg("cache"), py::arg("canvas_ids"), py::arg("self_conditioning_logits") = py::none())
      .def_property_readonly("max_batch_size", [](const PyEngine& e) { return e.get()->max_batch_size(); })
      .def("close", &PyEngine::close,
           "Stops the engine now (queued and running requests end as cancelled) and frees its memory")
      .def_property_readonly("closed", &PyEngine::closed)
      .def("in_callback", [](const PyEngine& e) { return e.get()->on_scheduler_thread(); },
           "True on this engine's scheduler thread (inside on_step/on_block callbacks)")
      .def("scheduler_stats", [](const PyEngine& e) {
        const SchedulerStats st = e.get()->scheduler_stats();
        py::dict d;
        d["queued_requests"] = st.queued_requests;
        d["running_requests"] = st.running_requests;
        d["active_rows"] = st.active_rows;
        d["decoder_passes"] = st.decoder_passes;
        d["encoder_passes"] = st.encoder_passes;
        d["row_steps"] = st.row_steps;
        d["committed_tokens"] = st.committed_tokens;
        d["completed"] = st.completed;
        d["failed"] = st.failed;
        d["cancelled"] = st.cancelled;
        d["captured_passes"] = st.captured_passes;
        d["replayed_passes"] = st.replayed_passes;
        d["capture_failures"] = st.capture_failures;
        return d;
      })
      .def("set_profiling", [](PyEngine& e, bool decoder, bool encoder) {
        const std::shared_ptr<Engine> engine = e.get();
        ReleaseGil release;
        engine->set_profiling(decoder, encoder);
      }, py::arg("decoder"), py::arg("encoder") = false)
      .def("take_profile", [](PyEngine& e) {
        const std::shared_ptr<Engine> engine = e.get();
        std::vector<OpTime> prof;
        {
          ReleaseGil release;
          prof = engine->take_profile();
        }
        py::list out;
        for (const OpTime& t : prof) {
          py::dict d;
          d["op"] = op_name(t.op);
          d["calls"] = t.calls;
          d["seconds"] = t.seconds;
          out.append(d);
        }
        return out;
      })
      .def("memory_stats", [](const PyEngine& e) {
        const MemoryStats m = e.get()->memory_stats();
        py::dict d;
        d["live_bytes"] = m.live_bytes;
        d["peak_bytes"] = m.peak_bytes;
        d["allocations"] = m.allocations;
        if (m.device_total) {
          d["device_free_bytes"] = m.device_free;
          d["device_total_bytes"] = m.device_total;
        }
        return d;
      })
      .def("submit", [](PyEngine& e, const std::vector<std::vector<int32_t>>& ids, py::dict p, py::object noise,
                        py::object on_step, py::object on_block, py::object on_done, std::shared_ptr<CacheSet> cache,
                        bool keep_cache) {
        const SamplerParams sp = sampler_params(p);
        std::shared_ptr<NoiseSource> py_noise;
        if (!noise.is_none()) py_noise = std::make_shared<PyNoise>(noise.cast<py::function>());
        GenerateCallbacks cb;
        cb.on_step = canvas_callback(on_step);
        cb.on_block = canvas_callback(on_block);
        std::function<void(RequestStatus)> done;
        if (!on_done.is_none()) {
          PyRef ref = hold(on_done);
          done = [ref, from_main = on_main_thread()](RequestStatus) {
            if (python_callbacks_refused(from_main)) return;
            py::gil_scoped_acquire gil;
            try {
              (*ref)();
            } catch (py::error_already_set& err) {
              err.discard_as_unraisable("dgemma_rt request on_done callback");
            }
          };
        }
        const std::shared_ptr<Engine> engine = e.get();
        if (!cache) cache = engine->new_cache(static_cast<int>(ids.size()));
        PyRequest req;
        req.cache = cache;
        {
          ReleaseGil release;
          req.handle = engine->submit(cache, ids, sp, py_noise, std::move(cb), std::move(done), keep_cache);
        }
        return req;
      }, py::arg("input_ids"), py::arg("params"), py::arg("noise") = py::none(), py::arg("on_step") = py::none(),
         py::arg("on_block") = py::none(), py::arg("on_done") = py::none(), py::arg("cache") = nullptr,
         py::arg("keep_cache") = true);

  dgemma::bindings::bind_backend_ops(m);

  auto testing = m.def_submodule("_testing", "hooks for the test suite");
  testing.def("cpu_gelu_mul", [](py::array_t<float, py::array::c_style | py::array::forcecast> gate,
                                 py::array_t<float, py::array::c_style | py::array::forcecast> up) {
    DG_REQUIRE(gate.size() == up.size(), InvalidArgument, "cpu_gelu_mul: gate and up differ in size");
    py::array_t<float> out(gate.size());
    cpu::gelu_mul(gate.data(), up.data(), out.mutable_data(), static_cast<size_t>(gate.size()));
    return out;
  }, py::arg("gate"), py::arg("up"), "The CPU backend's gated GELU, gelu_tanh(gate) * up, flattened (float32)");
  testing.def("cpu_engine_without", [](const std::string& path, const std::vector<std::string>& ops) {
    std::vector<Op> off;
    for (const std::string& name : ops) {
      const Op* hit = nullptr;
      for (const Op& op : CpuBackendWithout::kCanTurnOff)
        if (name == op_name(op)) hit = &op;
      DG_REQUIRE(hit, InvalidArgument, "op '" << name << "' cannot be turned off by this hook");
      off.push_back(*hit);
    }
    EngineOptions o;
    o.make_backend = [off](const ModelConfig& cfg, const ModelWeights& w) {
      return std::make_unique<CpuBackendWithout>(cfg, w, off);
    };
    auto e = std::make_unique<PyEngine>();
    ReleaseGil release;
    e->set(std::make_unique<Engine>(path, o));
    return e;
  }, py::arg("path"), py::arg("ops"),
     "An engine on the CPU backend with the given ops (moe_experts, lm_head_logits, soft_embedding) unsupported");

  // Captured decoder steps on the CPU (bindings/graph_recording_backend.h): an engine whose backend
  // records and replays op sequences as a CUDA graph would, and its counters.
  py::class_<bindings::GraphCounters, std::shared_ptr<bindings::GraphCounters>>(testing, "GraphCounters")
      .def("as_dict", [](const bindings::GraphCounters& c) {
        py::dict d;
        d["captures"] = c.captures.load();
        d["aborted"] = c.aborted.load();
        d["replays"] = c.replays.load();
        d["replay_misses"] = c.replay_misses.load();
        d["replayed_ops"] = c.replayed_ops.load();
        d["direct_steps"] = c.direct_steps.load();
        d["dropped"] = c.dropped.load();
        d["held"] = c.held.load();
        return d;
      })
      .def("fail_next_captures", [](bindings::GraphCounters& c, int n) { c.fail_captures = n; }, py::arg("n"),
           "The backend's next n end_capture calls fail (after recording the whole sequence)");
  testing.def("cpu_graph_engine", [](const std::string& path, py::object max_batch_size, py::object kv_cache_tokens,
                                     py::object num_threads) {
    EngineOptions o;
    o.max_batch_size = int_arg(max_batch_size, "max_batch_size", 1);
    o.kv_cache_tokens = int_arg(kv_cache_tokens, "kv_cache_tokens", 1);
    o.num_threads = int_arg(num_threads, "num_threads", 0);
    validate(o);
    auto counters = std::make_shared<bindings::GraphCounters>();
    o.make_backend = [counters](const ModelConfig& cfg, const ModelWeights& w) {
      return std::make_unique<bindings::GraphRecordingBackend>(cfg, w, counters);
    };
    auto e = std::make_unique<PyEngine>();
    e->threads = o.num_threads;
    {
      ReleaseGil release;
      e->set(std::make_unique<Engine>(path, o));
    }
    return py::make_tuple(py::cast(std::move(e)), counters);
  }, py::arg("path"), py::arg("max_batch_size") = 8, py::arg("kv_cache_tokens") = 16384, py::arg("num_threads") = 0,
     "(engine, counters): an engine on the CPU backend whose decoder steps are captured and replayed with CUDA "
     "graph semantics (recorded op calls re-run on new memory contents)");
  testing.def("register_stand_in_backend", [](const std::string& kind) {
    // For this process, device `kind` ("cuda") runs on the graph-recording CPU backend: the Python code a
    // GPU run takes (dgemma-bench's device paths, the peer's, the profile's) runs on a machine without one.
    // Tests call it in a subprocess; there is no undo.
    DG_REQUIRE(kind != "cpu", InvalidArgument, "the cpu backend is not replaced");
    register_backend(
        kind,
        [](const std::string&, const ModelConfig& cfg, const ModelWeights& w) {
          return std::unique_ptr<Backend>(
              std::make_unique<bindings::GraphRecordingBackend>(cfg, w, std::make_shared<bindings::GraphCounters>()));
        },
        {}, /*host_weights=*/true);
  }, py::arg("kind"), "Device `kind` runs on the CPU's graph-recording backend in this process (tests)");
  testing.def("graph_recording_selftest", [](const std::string& path) {
    // The recording backend on its own: what it refuses while capturing, and that a capture replays
    // its calls on the memory's contents at replay time.
    const ModelConfig cfg = load_model_config(path);
    const std::unique_ptr<ModelWeights> w = ModelWeights::load(path, cfg, {});
    auto counters = std::make_shared<bindings::GraphCounters>();
    bindings::GraphRecordingBackend be(cfg, *w, counters);
    py::dict out;
    auto src = be.allocate(4 * sizeof(float), "test");
    auto dst = be.allocate(4 * sizeof(float), "test");
    const Tensor ts = Tensor::of(static_cast<float*>(src->data()), {4});
    const Tensor td = Tensor::of(static_cast<float*>(dst->data()), {4});
    const float a[4] = {1, 2, 3, 4}, b[4] = {5, 6, 7, 8}, zero[4] = {0, 0, 0, 0};
    be.upload(ts, a);
    be.upload(td, zero);
    be.begin_capture();
    be.copy(ts, td);
    float got[4];
    dst->read(0, sizeof got, got);
    out["ran_while_capturing"] = got[0] != 0.f;
    auto refused = [&](const char* what, const std::function<void()>& f) {
      try {
        f();
        out[what] = py::none();
      } catch (const Error& e) {
        out[what] = std::string(e.what());
      }
    };
    refused("upload", [&] { be.upload(ts, b); });
    refused("download", [&] { be.download(got, ts); });
    refused("allocate", [&] { be.allocate(16, "test"); });
    be.end_capture(7);
    be.upload(ts, b);
    out["replayed"] = be.replay(7);
    be.download(got, td);
    out["after_replay"] = std::vector<float>(got, got + 4);
    out["replay_unknown_key"] = be.replay(8);
    be.drop_captures();
    out["replay_after_drop"] = be.replay(7);
    return out;
  }, py::arg("path"));

  // kernels/gemm/params_cache.h on the CPU: keys are (kernel, device, pointers, sizes) given as
  // integers, and an integer stands in for a kernel's Params.
  struct FakeParams {
    int64_t value = 0;
    unsigned char tma[512] = {};  // the bulk of a real Params: TMA descriptors
  };
  auto key_of = [](uintptr_t kernel, int device, const std::vector<uintptr_t>& ptrs, const std::vector<int64_t>& dims) {
    kernels::LaunchKey k(reinterpret_cast<const void*>(kernel), device, {}, {});
    DG_REQUIRE(ptrs.size() <= k.ptrs.size() && dims.size() <= k.dims.size(), InvalidArgument, "too many key fields");
    for (size_t i = 0; i < ptrs.size(); ++i) k.ptrs[i] = reinterpret_cast<const void*>(ptrs[i]);
    for (size_t i = 0; i < dims.size(); ++i) k.dims[i] = dims[i];
    return k;
  };
  py::class_<kernels::ParamsCache>(testing, "ParamsCache")
      .def(py::init<size_t>(), py::arg("capacity") = kernels::ParamsCache::kDefaultCapacity)
      .def("insert", [key_of](kernels::ParamsCache& c, uintptr_t kernel, int device, const std::vector<uintptr_t>& ptrs,
                              const std::vector<int64_t>& dims, int64_t value) {
        FakeParams p;
        p.value = value;
        c.insert(key_of(kernel, device, ptrs, dims), p);
      }, py::arg("kernel"), py::arg("device"), py::arg("ptrs"), py::arg("dims"), py::arg("value"))
      .def("find", [key_of](kernels::ParamsCache& c, uintptr_t kernel, int device, const std::vector<uintptr_t>& ptrs,
                            const std::vector<int64_t>& dims) -> py::object {
        FakeParams p;
        if (!c.find(key_of(kernel, device, ptrs, dims), &p)) return py::none();
        return py::int_(p.value);
      }, py::arg("kernel"), py::arg("device"), py::arg("ptrs"), py::arg("dims"))
      .def("clear", &kernels::ParamsCache::clear)
      .def("__len__", &kernels::ParamsCache::size)
      .def_property_readonly("capacity", &kernels::ParamsCache::capacity)
      .def("hammer", [](kernels::ParamsCache& c, int threads, int iters, int keys) {
        // Threads inserting and finding overlapping keys at once; a key's value is a function of
        // the key, so any other value found means a torn or misfiled entry. Returns that count.
        std::atomic<int64_t> wrong{0};
        ReleaseGil release;
        std::vector<std::thread> pool;
        for (int t = 0; t < threads; ++t)
          pool.emplace_back([&, t] {
            uint64_t st = 0x9E3779B97F4A7C15ull * static_cast<uint64_t>(t + 1);
            for (int i = 0; i < iters; ++i) {
              st = st * 6364136223846793005ull + 1442695040888963407ull;
              const int64_t k = static_cast<int64_t>((st >> 33) % static_cast<uint64_t>(keys));
              const kernels::LaunchKey key(reinterpret_cast<const void*>(uintptr_t{16}), 0,
                                           {reinterpret_cast<const void*>(static_cast<uintptr_t>(k * 256))}, {k, 7});
              FakeParams p;
              if (c.find(key, &p)) {
                if (p.value != 3 * k + 1 || p.tma[511] != static_cast<unsigned char>(k)) ++wrong;
              } else {
                p.value = 3 * k + 1;
                std::memset(p.tma, static_cast<int>(k & 0xff), sizeof p.tma);
                c.insert(key, p);
              }
            }
          });
        for (auto& th : pool) th.join();
        return wrong.load();
      }, py::arg("threads"), py::arg("iters"), py::arg("keys"));

#ifdef DGEMMA_WITH_CUDA
  ops.attr("ParamsCache") = testing.attr("ParamsCache");  // what cuda_ops' launch_* entry points take
  testing.def("kernel_plans", [] {
    py::list out;
    for (const kernels::KernelPlan& k : kernels::kernel_plans()) {
      py::dict d;
      d["kernel"] = k.kernel;
      d["threads"] = k.threads;
      d["dynamic_smem"] = k.dynamic_smem;
      d["ctas_per_sm"] = k.ctas_per_sm;
      d["why"] = k.why;
      out.append(d);
    }
    return out;
  }, "The CUDA kernels' occupancy plans (kernels/kernel_plan.h): kernel (a re pattern over the sm_90a kernel "
     "names), threads per CTA, dynamic_smem bytes per CTA at the released model's shapes, ctas_per_sm, why");
#endif

  // A request whose callback raised holds that exception until result() raises it again, and the
  // exception's traceback holds the callback's frames, which usually refer back to the Python Request
  // that holds this one: a cycle through native code. Dropped without result(), it kept the request and
  // its KV blocks forever, unless the garbage collector can see this edge; so the type takes part in GC.
  py::class_<PyRequest>(m, "Request", py::custom_type_setup([](PyHeapTypeObject* heap_type) {
                          PyTypeObject* type = &heap_type->ht_type;
                          type->tp_flags |= Py_TPFLAGS_HAVE_GC;
                          type->tp_traverse = [](PyObject* self, visitproc visit, void* arg) -> int {
                            Py_VISIT(Py_TYPE(self));
                            if (!py::detail::is_holder_constructed(self)) return 0;
                            const PyRequest& r = py::cast<const PyRequest&>(py::handle(self));
                            return r.handle ? visit_callback_error(r.handle->error(), visit, arg) : 0;
                          };
                          // No tp_clear: the cycle is broken by clearing the Python objects in it (the
                          // Request's __dict__ lets go of this one, and its destructor of the error).
                        }))
      .def_property_readonly("id", [](const PyRequest& r) { return r.handle->id(); })
      .def_property_readonly("status", [](const PyRequest& r) { return status_name(r.handle->status()); })
      .def_property_readonly("done", [](const PyRequest& r) { return r.handle->finished(); })
      .def("cancel", [](PyRequest& r) { r.handle->cancel(); })
      .def("in_callback", [](const PyRequest& r) { return r.handle->on_scheduler_thread(); },
           "True on the scheduler thread of this request's engine (inside any of its callbacks)")
      .def("wait", [](PyRequest& r, py::object timeout) {
        if (timeout.is_none()) {
          wait_interruptibly(*r.handle);
          return true;
        }
        const double t = timeout.cast<double>();
        ReleaseGil release;
        return r.handle->wait_for(t);
      }, py::arg("timeout") = py::none())
      .def("result", [](PyRequest& r) {
        wait_interruptibly(*r.handle);
        return result_dict(r.handle->result(), r.cache);
      });

}
