#include <cuda_runtime.h>

#include <string>

#include "backend/cuda/device.h"

namespace dgemma::cuda {

int device_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky "no driver" error
    return 0;
  }
  return n;
}

namespace {

std::string cuda_version(int v) { return std::to_string(v / 1000) + "." + std::to_string(v % 1000 / 10); }

bool built_for(int arch) {
  constexpr int kArchList[] = {__CUDA_ARCH_LIST__};  // e.g. 900, 1000, 1200
  for (int a : kArchList)
    if (a == arch) return true;
  return false;
}

}  // namespace

bool has_code_for(int device) {
  cudaDeviceProp p{};
  if (cudaGetDeviceProperties(&p, device) != cudaSuccess) {
    cudaGetLastError();
    return false;
  }
  return built_for(p.major * 100 + p.minor * 10);
}

std::string status() {
  const std::string runtime = "CUDA " + cuda_version(CUDART_VERSION);
  int driver = 0;
  if (cudaDriverGetVersion(&driver) != cudaSuccess || driver == 0) {
    cudaGetLastError();
    return "no NVIDIA driver found (this build's " + runtime + " runtime needs driver R580 or newer)";
  }
  // Minor-version compatibility: a driver for CUDA 13.0 runs any 13.x runtime.
  if (driver / 1000 < CUDART_VERSION / 1000)
    return "the NVIDIA driver supports CUDA " + cuda_version(driver) + ", older than this build's " + runtime +
           ": install driver R580 or newer";
  int n = 0;
  cudaError_t err = cudaGetDeviceCount(&n);
  if (err != cudaSuccess) {
    cudaGetLastError();
    return std::string("no usable CUDA device: ") + cudaGetErrorString(err);
  }
  std::string out = std::to_string(n) + " CUDA device(s), driver for CUDA " + cuda_version(driver);
  for (int d = 0; d < n; ++d) {
    cudaDeviceProp p{};
    if (cudaGetDeviceProperties(&p, d) != cudaSuccess) {
      cudaGetLastError();
      continue;
    }
    const int arch = p.major * 100 + p.minor * 10;
    out += "; " + std::to_string(d) + ": " + p.name + " (sm_" + std::to_string(p.major) + std::to_string(p.minor) +
           (built_for(arch) ? ", code in this build)" : ", no code for it in this build)");
  }
  return out;
}

}  // namespace dgemma::cuda
