// Which backend runs a device name ("cpu", "cuda", "cuda:1"). The CPU backend is always there; other
// backends live in libraries the core does not link (the CUDA backend in dgemma_cuda), so they
// register themselves: the Python module does it at import when it was built with CUDA, and a C++
// program that links dgemma_cuda calls dgemma::cuda::register_backend() once.
#pragma once

#include <functional>
#include <memory>
#include <string>

#include "backend/backend.h"
#include "model/config.h"
#include "model/weights.h"

namespace dgemma {

// device: the full name ("cuda:1"); the factory parses what follows the kind.
using BackendFactory =
    std::function<std::unique_ptr<Backend>(const std::string& device, const ModelConfig&, const ModelWeights&)>;

// Says why a device name cannot run here ("no NVIDIA driver found", "device 3 of 1"), or "" when it
// can; asked before anything is loaded.
using BackendProbe = std::function<std::string(const std::string& device)>;

// Registers (or replaces) the factory for a device kind ("cuda"). host_weights: the backend computes on
// the weights' host views (a CPU-based backend), so the engine loads them; a GPU backend reads the
// checkpoint's tensors as stored and keeps its own copy.
void register_backend(const std::string& kind, BackendFactory factory, BackendProbe probe = {},
                      bool host_weights = false);
bool backend_registered(const std::string& kind);
bool backend_uses_host_weights(const std::string& kind);

// The kind of a device name: what comes before ':' ("cuda:1" -> "cuda").
std::string device_kind(const std::string& device);

// Throws InvalidArgument when no backend runs this device name (before anything is loaded): an
// unknown kind, a malformed index, a kind this build or program did not register, or what the
// backend's probe reports (no driver, no such device).
void check_device(const std::string& device);

// Makes the backend for a device name; what the backend's constructor throws (no GPU, out of
// memory) passes through. cpu_bf16_dot: CpuBackend's bf16_dot (no default here: EngineOptions and
// BackendOps each hold theirs).
std::unique_ptr<Backend> make_backend(const std::string& device, const ModelConfig& cfg, const ModelWeights& w,
                                      bool cpu_bf16_dot);

}  // namespace dgemma
