// CUDA device discovery. Safe to call on machines without a driver: reports zero devices.
#pragma once

#include <string>

namespace dgemma::cuda {

int device_count();

// Whether this build holds machine code for that device's architecture (false for a bad index).
bool has_code_for(int device);

// One line for people: no driver, a driver too old for this build's CUDA runtime (linked
// statically, so the driver is all a machine needs), or the devices and whether this build has
// machine code for each.
std::string status();

}  // namespace dgemma::cuda
