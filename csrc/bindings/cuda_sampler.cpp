// Test entry points for kernels/sampler.
#include <cuda_bf16.h>

#include "bindings/cuda_ops.h"
#include "kernels/sampler/sampler.cuh"

namespace py = pybind11;

namespace dgemma::bindings {
namespace {

// Outputs start as all-ones bytes (-1 ints, NaN floats, 0xFFFF bf16), so a test can see that
// inactive rows were left alone.
template <typename T>
DeviceBuffer<T> filled(size_t n) {
  DeviceBuffer<T> b(n);
  if (n) DG_CUDA_CHECK(cudaMemset(b.get(), 0xFF, n * sizeof(T)));
  return b;
}

// logits f32 [P, V], temperature f32 [rows], uniform f64 [P], active i32 [rows] or None.
// Returns (processed f32 [P, V], token i32 [P], argmax i32 [P], entropy f32 [P]) and, with
// want_probs, probs as bf16 bits (uint16 [P, V]). in_place: processed overwrites the logits
// buffer (the aliasing the engine uses), so inactive rows keep their raw logits there.
py::tuple sample_canvas(CArray<float> logits, CArray<float> temperature, CArray<double> uniform, py::object active,
                        bool in_place, bool want_probs) {
  DG_REQUIRE(logits.ndim() == 2, InvalidArgument, "logits must be 2-D [positions, vocab]");
  DG_REQUIRE(temperature.ndim() == 1 && temperature.shape(0) > 0, InvalidArgument, "temperature must be [rows]");
  const int P = static_cast<int>(logits.shape(0)), V = static_cast<int>(logits.shape(1));
  const int rows = static_cast<int>(temperature.shape(0));
  DG_REQUIRE(P % rows == 0, InvalidArgument, "positions " << P << " is not a multiple of rows " << rows);
  DG_REQUIRE(uniform.ndim() == 1 && uniform.shape(0) == P, InvalidArgument, "uniform must be [positions]");
  DeviceBuffer<int32_t> dact;
  if (!active.is_none()) {
    auto a = CArray<int32_t>::ensure(active);
    DG_REQUIRE(a && a.ndim() == 1 && a.shape(0) == rows, InvalidArgument, "active must be int32 [rows]");
    dact = DeviceBuffer<int32_t>::from(a);
  }
  auto dlogits = DeviceBuffer<float>::from(logits);
  auto dtemp = DeviceBuffer<float>::from(temperature);
  auto duni = DeviceBuffer<double>::from(uniform);
  DeviceBuffer<float> dproc;
  if (!in_place) dproc = filled<float>(static_cast<size_t>(P) * V);
  DeviceBuffer<__nv_bfloat16> dprobs;
  if (want_probs) dprobs = filled<__nv_bfloat16>(static_cast<size_t>(P) * V);
  auto dtok = filled<int32_t>(P), dam = filled<int32_t>(P);
  auto dent = filled<float>(P);

  kernels::SampleCanvasParams p;
  p.logits = dlogits.get();
  p.processed = in_place ? dlogits.get() : dproc.get();
  p.probs = dprobs.get();
  p.temperature = dtemp.get();
  p.uniform = duni.get();
  p.active = dact.get();
  p.token = dtok.get();
  p.argmax = dam.get();
  p.entropy = dent.get();
  p.rows = rows;
  p.canvas_length = P / rows;
  p.vocab = V;
  DG_CUDA_CHECK(kernels::sample_canvas(p, nullptr));
  DG_CUDA_CHECK(cudaDeviceSynchronize());

  py::array_t<float> proc({P, V});
  (in_place ? dlogits : dproc).copy_to(proc.mutable_data());
  py::array_t<int32_t> tok(P), am(P);
  py::array_t<float> ent(P);
  dtok.copy_to(tok.mutable_data());
  dam.copy_to(am.mutable_data());
  dent.copy_to(ent.mutable_data());
  if (!want_probs) return py::make_tuple(proc, tok, am, ent);
  py::array_t<uint16_t> probs({P, V});
  dprobs.copy_to(probs.mutable_data());
  return py::make_tuple(proc, tok, am, ent, probs);
}

// entropy f32 [rows, L]; sampled, fresh, argmax i32 [rows, L]; history i32 [threshold, rows, L];
// active i32 [rows] or None. canvas (i32 [rows, L]) and finished (i32 [rows]) give the starting
// values (default: -1 everywhere, zeros). Returns (canvas, history, finished).
py::tuple accept_canvas(CArray<float> entropy, CArray<int32_t> sampled, CArray<int32_t> fresh, CArray<int32_t> argmax,
                        CArray<int32_t> history, py::object active, double entropy_bound, int stability_threshold,
                        double confidence_threshold, bool adaptive, py::object canvas, py::object finished) {
  DG_REQUIRE(entropy.ndim() == 2, InvalidArgument, "entropy must be 2-D [rows, canvas_length]");
  const int rows = static_cast<int>(entropy.shape(0)), L = static_cast<int>(entropy.shape(1));
  for (const auto* a : {&sampled, &fresh, &argmax})
    DG_REQUIRE(a->ndim() == 2 && a->shape(0) == rows && a->shape(1) == L, InvalidArgument,
               "sampled, fresh and argmax must be [rows, canvas_length] like entropy");
  DG_REQUIRE(stability_threshold >= 0, InvalidArgument, "stability_threshold must be >= 0");
  DG_REQUIRE(history.ndim() == 3 && history.shape(1) == rows && history.shape(2) == L, InvalidArgument,
             "history must be [threshold, rows, canvas_length]");
  DG_REQUIRE(!adaptive || stability_threshold == 0 || history.shape(0) == stability_threshold, InvalidArgument,
             "history must hold stability_threshold canvases");
  DeviceBuffer<int32_t> dact;
  if (!active.is_none()) {
    auto a = CArray<int32_t>::ensure(active);
    DG_REQUIRE(a && a.ndim() == 1 && a.shape(0) == rows, InvalidArgument, "active must be int32 [rows]");
    dact = DeviceBuffer<int32_t>::from(a);
  }
  DeviceBuffer<int32_t> dcanvas;
  if (canvas.is_none()) {
    dcanvas = filled<int32_t>(static_cast<size_t>(rows) * L);
  } else {
    auto c = CArray<int32_t>::ensure(canvas);
    DG_REQUIRE(c && c.ndim() == 2 && c.shape(0) == rows && c.shape(1) == L, InvalidArgument,
               "canvas must be int32 [rows, canvas_length]");
    dcanvas = DeviceBuffer<int32_t>::from(c);
  }
  DeviceBuffer<int32_t> dfin;
  if (finished.is_none()) {
    dfin = DeviceBuffer<int32_t>(rows);
    if (rows) DG_CUDA_CHECK(cudaMemset(dfin.get(), 0, rows * sizeof(int32_t)));
  } else {
    auto f = CArray<int32_t>::ensure(finished);
    DG_REQUIRE(f && f.ndim() == 1 && f.shape(0) == rows, InvalidArgument, "finished must be int32 [rows]");
    dfin = DeviceBuffer<int32_t>::from(f);
  }
  auto dent = DeviceBuffer<float>::from(entropy);
  auto dsam = DeviceBuffer<int32_t>::from(sampled), dfresh = DeviceBuffer<int32_t>::from(fresh);
  auto dam = DeviceBuffer<int32_t>::from(argmax), dhist = DeviceBuffer<int32_t>::from(history);

  kernels::AcceptCanvasParams p;
  p.entropy = dent.get();
  p.sampled = dsam.get();
  p.fresh = dfresh.get();
  p.argmax = dam.get();
  p.active = dact.get();
  p.canvas = dcanvas.get();
  p.history = dhist.get();
  p.finished = dfin.get();
  p.rows = rows;
  p.canvas_length = L;
  p.entropy_bound = entropy_bound;
  p.stability_threshold = stability_threshold;
  p.confidence_threshold = confidence_threshold;
  p.adaptive_stopping = adaptive;
  DG_CUDA_CHECK(kernels::accept_canvas(p, nullptr));
  DG_CUDA_CHECK(cudaDeviceSynchronize());

  py::array_t<int32_t> out_canvas({rows, L}), out_fin(rows);
  py::array_t<int32_t> out_hist(std::vector<py::ssize_t>(history.shape(), history.shape() + 3));
  dcanvas.copy_to(out_canvas.mutable_data());
  dhist.copy_to(out_hist.mutable_data());
  dfin.copy_to(out_fin.mutable_data());
  return py::make_tuple(out_canvas, out_hist, out_fin);
}

RegisterCudaOps reg([](py::module_& m) {
  m.def("sample_canvas", &sample_canvas, py::arg("logits"), py::arg("temperature"), py::arg("uniform"),
        py::arg("active") = py::none(), py::arg("in_place") = true, py::arg("want_probs") = false);
  m.def("accept_canvas", &accept_canvas, py::arg("entropy"), py::arg("sampled"), py::arg("fresh"),
        py::arg("argmax"), py::arg("history"), py::arg("active") = py::none(), py::arg("entropy_bound") = 0.1,
        py::arg("stability_threshold") = 1, py::arg("confidence_threshold") = 0.005, py::arg("adaptive") = true,
        py::arg("canvas") = py::none(), py::arg("finished") = py::none());
});

}  // namespace
}  // namespace dgemma::bindings
