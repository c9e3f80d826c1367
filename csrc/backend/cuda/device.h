// CUDA device discovery. Safe to call on machines without a driver: reports zero devices.
#pragma once

namespace dgemma::cuda {

int device_count();

}  // namespace dgemma::cuda
