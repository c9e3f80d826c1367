// Which device code this build holds and which GPU is current: the host-side choice of the sm_90a
// wgmma kernels (attention, the W4A16 grouped GEMM). Their bodies are compiled only for sm_90a and only
// with the CuTe headers (DGEMMA_WITH_CUTLASS); __CUDA_ARCH_LIST__ says 900 for sm_90 and sm_90a alike,
// and CMake builds Hopper as 90a (a plain sm_90 build would trap in those kernels). nvcc translation
// units only (__CUDA_ARCH_LIST__).
#pragma once

#include <cuda_runtime.h>

namespace dgemma::kernels {

// Whether this build holds device code for `arch` (e.g. 900, 1000).
constexpr bool built_for_arch(int arch) {
  constexpr int kArchList[] = {__CUDA_ARCH_LIST__};
  for (int a : kArchList)
    if (a == arch) return true;
  return false;
}

// The sm_90a wgmma kernels can run: built with CuTe and for sm_90, and the current device is exactly 9.0.
inline bool sm90_wgmma_usable() {
#if defined(DGEMMA_WITH_CUTLASS)
  if (!built_for_arch(900)) return false;
  int dev = 0, major = 0, minor = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) return false;
  if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) != cudaSuccess) return false;
  if (cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev) != cudaSuccess) return false;
  return major == 9 && minor == 0;
#else
  return false;
#endif
}

}  // namespace dgemma::kernels
