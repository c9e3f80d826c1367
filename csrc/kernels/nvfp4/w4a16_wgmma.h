// Host entry points of the sm_90a wgmma W4A16 grouped GEMM (sm90_grouped_gemm_nvfp4_wgmma.cu), for
// grouped_gemm_nvfp4's path choice and the tests.
#pragma once

#include <string>

#include "kernels/nvfp4/nvfp4.cuh"

namespace dgemma::kernels::w4a16_detail {

// Launches the wgmma kernel (cudaErrorNotSupported where grouped_gemm_nvfp4_wgmma_supported() is
// false). The caller has checked the params.
cudaError_t launch_wgmma(const GroupedGemmNvfp4Params& p, cudaStream_t stream);

// Evaluated on the host with CuTe: whether the wgmma operands' CuTe layouts are the ones the kernel
// feeds them in (the decoded weights' register A fragment = mma.m16n8k16's per warp, the activation
// tile's K-major 128-byte-swizzle layout = L::act_chunk_offset, the fp32 C fragment = the mma.sync
// accumulator the epilogue reads). "" when they agree, else the first mismatch; "no CuTe" in builds
// without the CUTLASS headers.
std::string wgmma_layout_mismatch();

}  // namespace dgemma::kernels::w4a16_detail
