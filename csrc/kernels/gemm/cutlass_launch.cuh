// What every CUTLASS instantiation here shares: the arch-guarded __global__ that runs a CUTLASS 3.x
// kernel, the device checks, the prepared-launch cache (params_cache.h) and the launch of a dense
// "TN" GEMM (X [M, K] @ W [N, K]^T -> Y [M, N], all row-major). Include only from a .cu that
// instantiates CUTLASS kernels.
#pragma once

#include <cute/tensor.hpp>
#include <cutlass/cluster_launch.hpp>
#include <cutlass/cutlass.h>
#include <cutlass/device_kernel.h>
#include <cutlass/gemm/gemm.h>

#include <cstdint>
#include <initializer_list>
#include <mutex>
#include <vector>

#include "kernels/gemm/params_cache.h"
#include "kernels/kernel_plan.h"

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

// The occupancy plan of an instantiation (kernel_plan.h), from what its launch uses: CUTLASS's
// threads per CTA, its SharedStorageSize as dynamic shared memory and its MinBlocksPerMultiprocessor
// (the __launch_bounds__ above). `pattern` must match the kernel's name in its mangled form too:
// c++filt gives up on CUTLASS's longest names.
template <class GemmKernel>
KernelPlan kernel_plan(std::string pattern) {
  return {std::move(pattern), static_cast<int>(GemmKernel::MaxThreadsPerBlock),
          static_cast<long long>(GemmKernel::SharedStorageSize), static_cast<int>(GemmKernel::MinBlocksPerMultiprocessor),
          "CUTLASS MinBlocksPerMultiprocessor (__launch_bounds__); SharedStorageSize: the stage count fills the SM"};
}

// Whether this build holds code for `arch` (e.g. 1000 for sm_100a).
constexpr bool built_for(int arch) {
  constexpr int kArchList[] = {__CUDA_ARCH_LIST__};
  for (int a : kArchList)
    if (a == arch) return true;
  return false;
}

// The current device and what the launchers need of it. The attributes are read once per device
// (they cannot change while the process runs), so a launch costs one cudaGetDevice.
struct DeviceInfo {
  int device = 0, major = 0, minor = 0, sms = 0;
};

inline cudaError_t current_device(DeviceInfo* out) {
  int dev = 0;
  cudaError_t err = cudaGetDevice(&dev);
  if (err != cudaSuccess) return err;
  static std::mutex mu;
  static std::vector<DeviceInfo> known;  // by device index; sms == 0: not read yet
  {
    std::lock_guard<std::mutex> lock(mu);
    if (dev < static_cast<int>(known.size()) && known[dev].sms > 0) {
      *out = known[dev];
      return cudaSuccess;
    }
  }
  DeviceInfo d;
  d.device = dev;
  if ((err = cudaDeviceGetAttribute(&d.major, cudaDevAttrComputeCapabilityMajor, dev)) != cudaSuccess) return err;
  if ((err = cudaDeviceGetAttribute(&d.minor, cudaDevAttrComputeCapabilityMinor, dev)) != cudaSuccess) return err;
  if ((err = cudaDeviceGetAttribute(&d.sms, cudaDevAttrMultiProcessorCount, dev)) != cudaSuccess) return err;
  if (d.sms <= 0) return cudaErrorInvalidDevice;
  std::lock_guard<std::mutex> lock(mu);
  if (dev >= static_cast<int>(known.size())) known.resize(dev + 1);
  known[dev] = d;
  *out = d;
  return cudaSuccess;
}

// Whether the current device has exactly this compute capability ("a" code runs on no other).
inline bool device_is(int major, int minor) {
  DeviceInfo d;
  return current_device(&d) == cudaSuccess && d.major == major && d.minor == minor;
}

inline cudaError_t device_sms(int* dev, int* sms) {
  DeviceInfo d;
  const cudaError_t err = current_device(&d);
  if (err == cudaSuccess) *dev = d.device, *sms = d.sms;
  return err;
}

inline bool aligned(const void* p, uintptr_t a) { return (reinterpret_cast<uintptr_t>(p) % a) == 0; }

// The kernel function of an instantiation, as the key of its prepared launches.
template <class GemmKernel, int Arch>
const void* kernel_id() {
  return reinterpret_cast<const void*>(kernel<GemmKernel, Arch>);
}

// The Params of `key`: from `cache` when it holds them; else made by make(&params) (a cudaError_t),
// the kernel's dynamic shared memory allowed on this device, and kept (cache may be null). `make`
// must read nothing but what `key` names: a hit hands back what an earlier make produced.
template <class GemmKernel, int Arch, class Make>
cudaError_t prepare(ParamsCache* cache, const LaunchKey& key, Make&& make, typename GemmKernel::Params* params) {
  if (cache && cache->find(key, params)) return cudaSuccess;
  cudaError_t err = make(params);
  if (err != cudaSuccess) return err;
  err = cudaFuncSetAttribute(kernel<GemmKernel, Arch>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                             static_cast<int>(GemmKernel::SharedStorageSize));
  if (err != cudaSuccess) return err;
  if (cache) cache->insert(key, *params);
  return cudaSuccess;
}

// Launches `Arch`'s kernel for prepared params (prepare() has allowed its shared memory): a plain
// launch for 1x1x1 clusters, a cluster launch (cudaLaunchKernelEx through CUTLASS's launcher) when
// the kernel's cluster shape is larger.
template <class GemmKernel, int Arch>
cudaError_t launch(const typename GemmKernel::Params& params, cudaStream_t stream) {
  constexpr int smem = GemmKernel::SharedStorageSize;
  auto* fn = kernel<GemmKernel, Arch>;
  using Cluster = typename GemmKernel::DispatchPolicy::ClusterShape;
  const dim3 cluster(cute::size<0>(Cluster{}), cute::size<1>(Cluster{}), cute::size<2>(Cluster{}));
  if (cluster.x * cluster.y * cluster.z == 1) {
    fn<<<GemmKernel::get_grid_shape(params), GemmKernel::get_block_shape(), smem, stream>>>(params);
    return cudaGetLastError();
  }
  const cutlass::ClusterLaunchParams lp{GemmKernel::get_grid_shape(params), GemmKernel::get_block_shape(), cluster,
                                        smem, stream};
  if (cutlass::launch_kernel_on_cluster(lp, reinterpret_cast<const void*>(fn), params) != cutlass::Status::kSuccess) {
    // A refused launch (cluster shape, an attribute), not a kernel fault: the runtime's own error when
    // it left one, never cudaErrorLaunchFailure (which reads as a crashed kernel and a lost context).
    const cudaError_t e = cudaGetLastError();
    return e != cudaSuccess ? e : cudaErrorInvalidConfiguration;
  }
  return cudaGetLastError();
}

// A dense TN GEMM whose operand pointers and epilogue arguments the caller has set in `args`: fills
// the problem shape, the row-major strides and the hardware info, then checks, initialises (no
// workspace: persistent data-parallel scheduler, TMA epilogue) and launches `Arch`'s kernel.
//
// The Params are made from A, B, D, M, N, K, the device and the epilogue's fusion arguments, so
// those are their key: `epilogue_ptrs` lists every pointer the caller set in args.epilogue.thread
// (none for D = acc); scalars there are either constants of the instantiation (alpha 1, beta 0) or
// packed into `epilogue_scalars` (any 64 bits that differ whenever they do), which joins the key. No
// workspace, no per-call device memory: nothing else goes in.
template <class GemmKernel, int Arch>
cudaError_t launch_dense_tn(typename GemmKernel::Arguments& args, std::initializer_list<const void*> epilogue_ptrs,
                            int M, int N, int K, ParamsCache* cache, cudaStream_t stream,
                            int64_t epilogue_scalars = 0) {
  DeviceInfo dev;
  cudaError_t err = current_device(&dev);
  if (err != cudaSuccess) return err;
  LaunchKey key(kernel_id<GemmKernel, Arch>(), dev.device, {args.mainloop.ptr_A, args.mainloop.ptr_B,
                                                            args.epilogue.ptr_D}, {M, N, K, epilogue_scalars});
  if (epilogue_ptrs.size() > key.ptrs.size() - 3) return cudaErrorInvalidValue;
  size_t i = 3;
  for (const void* p : epilogue_ptrs) key.ptrs[i++] = p;

  typename GemmKernel::Params params{};
  err = prepare<GemmKernel, Arch>(cache, key, [&](typename GemmKernel::Params* out) {
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
    args.hw_info.device_id = dev.device;
    args.hw_info.sm_count = dev.sms;
    if (!GemmKernel::can_implement(args)) return cudaErrorInvalidValue;
    if (GemmKernel::get_workspace_size(args) != 0) return cudaErrorNotSupported;
    if (GemmKernel::initialize_workspace(args, nullptr, stream) != cutlass::Status::kSuccess) return cudaErrorUnknown;
    *out = GemmKernel::to_underlying_arguments(args, nullptr);
    return cudaSuccess;
  }, &params);
  if (err != cudaSuccess) return err;
  return launch<GemmKernel, Arch>(params, stream);
}

}  // namespace dgemma::kernels::cutlass_launch
