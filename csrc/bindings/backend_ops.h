// _core.BackendOps: every op of backend/backend.h on numpy arrays, for any device a backend is
// registered for (ggml's test-backend-ops). Compiled into every build, CPU-only ones included.
#pragma once

#include <pybind11/pybind11.h>

namespace dgemma::bindings {

void bind_backend_ops(pybind11::module_& m);

}  // namespace dgemma::bindings
