#include <cuda_runtime.h>

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

}  // namespace dgemma::cuda
