#include "backend/registry.h"

#include <map>
#include <mutex>

#include "backend/cpu/cpu_backend.h"
#include "common/check.h"

namespace dgemma {
namespace {

std::mutex& registry_mu() {
  static std::mutex mu;
  return mu;
}
struct Entry {
  BackendFactory factory;
  BackendProbe probe;
  bool host_weights = false;
};
// Never destroyed, as safetensors_dtype_bytes's table: an Engine may still be made on another thread
// while the process runs its exit-time destructors.
std::map<std::string, Entry>& registry() {
  static auto& r = *new std::map<std::string, Entry>;
  return r;
}

}  // namespace

void register_backend(const std::string& kind, BackendFactory factory, BackendProbe probe, bool host_weights) {
  DG_CHECK(kind != "cpu" && factory, "registering backend '" << kind << "'");
  std::lock_guard<std::mutex> lock(registry_mu());
  registry()[kind] = Entry{std::move(factory), std::move(probe), host_weights};
}

bool backend_registered(const std::string& kind) {
  if (kind == "cpu") return true;
  std::lock_guard<std::mutex> lock(registry_mu());
  return registry().count(kind) > 0;
}

bool backend_uses_host_weights(const std::string& kind) {
  if (kind == "cpu") return true;
  std::lock_guard<std::mutex> lock(registry_mu());
  auto it = registry().find(kind);
  return it != registry().end() && it->second.host_weights;
}

std::string device_kind(const std::string& device) { return device.substr(0, device.find(':')); }

void check_device(const std::string& device) {
  const std::string kind = device_kind(device);
  DG_REQUIRE(kind == "cpu" || kind == "cuda", InvalidArgument,
             "unknown device '" << printable(device, 40) << "': use \"cpu\", \"cuda\" or \"cuda:N\"");
  if (kind == "cpu") {
    DG_REQUIRE(device == "cpu", InvalidArgument, "device '" << printable(device, 40) << "': the CPU has no index");
    return;
  }
  const size_t colon = device.find(':');
  if (colon != std::string::npos) {
    const std::string idx = device.substr(colon + 1);
    bool digits = !idx.empty();
    for (char c : idx) digits = digits && c >= '0' && c <= '9';
    DG_REQUIRE(digits, InvalidArgument, "device '" << printable(device, 40) << "': the index must be a non-negative integer, as in \"cuda:1\"");
    DG_REQUIRE(idx.size() <= 4, InvalidArgument, "device '" << printable(device, 40) << "': no GPU has that index");
  }
  BackendProbe probe;
  {
    std::lock_guard<std::mutex> lock(registry_mu());
    auto it = registry().find(kind);
    DG_REQUIRE(it != registry().end(), InvalidArgument,
               "device '" << printable(device, 40) << "' is not available: this build of dgemma_rt has no " << kind
                          << " backend (built without nvcc, or with DGEMMA_CUDA=OFF)");
    probe = it->second.probe;
  }
  const std::string why = probe ? probe(device) : std::string();
  DG_REQUIRE(why.empty(), InvalidArgument, "device '" << printable(device, 40) << "' is not available: " << why);
}

std::unique_ptr<Backend> make_backend(const std::string& device, const ModelConfig& cfg, const ModelWeights& w,
                                      bool cpu_bf16_dot) {
  check_device(device);
  const std::string kind = device_kind(device);
  if (kind == "cpu") return std::make_unique<CpuBackend>(cfg, w, cpu_bf16_dot);
  BackendFactory f;
  {
    std::lock_guard<std::mutex> lock(registry_mu());
    f = registry().at(kind).factory;
  }
  auto be = f(device, cfg, w);
  DG_CHECK(be, "the " << kind << " backend factory returned no backend");
  return be;
}

}  // namespace dgemma
