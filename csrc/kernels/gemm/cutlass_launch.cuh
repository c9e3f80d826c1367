// What every CUTLASS instantiation here shares: the arch-guarded __global__ that runs a CUTLASS 3.x
// kernel, the device checks, and the launch of a dense "TN" GEMM (X [M, K] @ W [N, K]^T -> Y [M, N],
// all row-major). Include only from a .cu that instantiates CUTLASS kernels.
#pragma once

#include <cute/tensor.hpp>
#include <cutlass/cluster_launch.hpp>
#include <cutlass/cutlass.h>
#include <cutlass/device_kernel.h>
#include <cutlass/gemm/gemm.h>

#include <cstdint>

namespace dgemma::kernels::cutlass_launch {

// The kernel body exists only in the pass for `Arch` (900, 1000, 1200) with its "a" features; other
// passes get an empty kernel, never launched (the host checks the device first), and a build for
// the plain arch (no "a") traps instead of silently writing nothing.
template <class GemmKernel, int Arch>
__global__ void __launch_bounds__(GemmKernel::MaxThreadsPerBlock, GemmKernel::MinBlocksPerMultiprocessor)
    kernel(CUTLASS_GRID_CONSTANT const typename GemmKernel::Params params) {
#if defined(__CUDA_ARCH__)
#if defined(__CUDA_ARCH_FEAT_SM90_ALL) || defined(__CUDA_ARCH_FEAT_SM100_ALL) || defined(__CUDA_ARCH_FEAT_SM120_ALL)
  constexpr bool kArchFeatures = true;
#else
  constexpr bool kArchFeatures = false;
#endif
  if constexpr (Arch == __CUDA_ARCH__ && kArchFeatures) {
    extern __shared__ char smem[];
    GemmKernel op;
    op(params, smem);
  } else if constexpr (Arch == __CUDA_ARCH__) {
    __trap();
  }
#endif
}

// Whether this build holds code for `arch` (e.g. 1000 for sm_100a).
constexpr bool built_for(int arch) {
  constexpr int kArchList[] = {__CUDA_ARCH_LIST__};
  for (int a : kArchList)
    if (a == arch) return true;
  return false;
}

// Whether the current device has exactly this compute capability ("a" code runs on no other).
inline bool device_is(int major, int minor) {
  int dev = 0, ma = 0, mi = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) return false;
  if (cudaDeviceGetAttribute(&ma, cudaDevAttrComputeCapabilityMajor, dev) != cudaSuccess) return false;
  if (cudaDeviceGetAttribute(&mi, cudaDevAttrComputeCapabilityMinor, dev) != cudaSuccess) return false;
  return ma == major && mi == minor;
}

inline cudaError_t device_sms(int* dev, int* sms) {
  cudaError_t err = cudaGetDevice(dev);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(sms, cudaDevAttrMultiProcessorCount, *dev);
  return err;
}

inline bool aligned(const void* p, uintptr_t a) { return (reinterpret_cast<uintptr_t>(p) % a) == 0; }

// Launches `Arch`'s kernel for prepared params: a plain launch for 1x1x1 clusters, a cluster launch
// (cudaLaunchKernelEx through CUTLASS's launcher) when the kernel's cluster shape is larger.
template <class GemmKernel, int Arch>
cudaError_t launch(const typename GemmKernel::Params& params, cudaStream_t stream) {
  constexpr int smem = GemmKernel::SharedStorageSize;
  auto* fn = kernel<GemmKernel, Arch>;
  cudaError_t err = cudaFuncSetAttribute(fn, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  if (err != cudaSuccess) return err;
  using Cluster = typename GemmKernel::DispatchPolicy::ClusterShape;
  const dim3 cluster(cute::size<0>(Cluster{}), cute::size<1>(Cluster{}), cute::size<2>(Cluster{}));
  if (cluster.x * cluster.y * cluster.z == 1) {
    fn<<<GemmKernel::get_grid_shape(params), GemmKernel::get_block_shape(), smem, stream>>>(params);
    return cudaGetLastError();
  }
  const cutlass::ClusterLaunchParams lp{GemmKernel::get_grid_shape(params), GemmKernel::get_block_shape(), cluster,
                                        smem, stream};
  if (cutlass::launch_kernel_on_cluster(lp, reinterpret_cast<const void*>(fn), params) != cutlass::Status::kSuccess)
    return cudaErrorLaunchFailure;
  return cudaGetLastError();
}

// A dense TN GEMM whose operand pointers and epilogue arguments the caller has set in `args`: fills
// the problem shape, the row-major strides and the hardware info, then checks, initialises (no
// workspace: persistent data-parallel scheduler, TMA epilogue) and launches `Arch`'s kernel.
template <class GemmKernel, int Arch>
cudaError_t launch_dense_tn(typename GemmKernel::Arguments& args, int M, int N, int K, cudaStream_t stream) {
  int dev = 0, sms = 0;
  cudaError_t err = device_sms(&dev, &sms);
  if (err != cudaSuccess) return err;
  typename GemmKernel::StrideA sa{};  // (K, _1, 0): rows of X
  typename GemmKernel::StrideB sb{};  // (K, _1, 0): rows of W
  typename GemmKernel::StrideD sd{};  // (N, _1, 0): rows of Y
  cute::get<0>(sa) = K;
  cute::get<0>(sb) = K;
  cute::get<0>(sd) = N;
  args.mode = cutlass::gemm::GemmUniversalMode::kGemm;
  args.problem_shape = cute::make_shape(M, N, K, 1);
  args.mainloop.dA = sa;
  args.mainloop.dB = sb;
  args.epilogue.ptr_C = nullptr;
  args.epilogue.dC = sd;
  args.epilogue.dD = sd;
  args.hw_info.device_id = dev;
  args.hw_info.sm_count = sms;

  if (!GemmKernel::can_implement(args)) return cudaErrorInvalidValue;
  if (GemmKernel::get_workspace_size(args) != 0) return cudaErrorNotSupported;
  if (GemmKernel::initialize_workspace(args, nullptr, stream) != cutlass::Status::kSuccess) return cudaErrorUnknown;
  const typename GemmKernel::Params params = GemmKernel::to_underlying_arguments(args, nullptr);

  return launch<GemmKernel, Arch>(params, stream);
}

}  // namespace dgemma::kernels::cutlass_launch
