// The CUDA backend: the op set of backend/backend.h on one GPU, with bf16 activations and KV cache,
// the float32 residual stream, bf16 weights (converted from the checkpoint as stored: BF16 tensors
// are copied as they are, F32/F16 rounded, NVFP4/FP8 dequantized then rounded) and device memory
// for everything the forward keeps (KV storage, self-conditioning state, workspaces). Each op is a
// kernel of csrc/kernels on the backend's own stream; only upload/download touch the host, and
// download is the only synchronisation.
//
// CUDA graphs (backend.h "capture and replay"): the forward's decoder step is captured with
// cudaStreamBeginCapture (thread-local mode) on that stream and replayed with cudaGraphLaunch, one
// executable graph per key. While capturing, upload/download/allocate and any growth of op scratch
// throw an internal error; growing scratch outside a capture drops every graph (they point at the
// old buffer) and the forward captures again. DGEMMA_CUDA_GRAPHS=0 turns capture off.
//
// Which kernel runs an op:
//   linear, mlp GEMMs          CUTLASS sm_90a TMA/wgmma GEMM on Hopper builds with CUTLASS, when K and N
//                              are multiples of 8; else the mma.sync matmul (kernels/matmul), any arch
//   MoE experts                router -> permute -> grouped GEMM (CUTLASS sm_90a, else grouped matmul)
//                              -> gated GELU -> grouped GEMM -> combine. NVFP4 experts: the W4A16
//                              grouped GEMM (gated GELU fused), or on compute capability 10.0 / 12.0
//                              (sm_100a / sm_120a builds with CUTLASS) activations quantized to NVFP4
//                              and the block-scaled NVFP4 x NVFP4 grouped GEMMs; DGEMMA_CUDA_NVFP4=w4a16
//                              keeps W4A16 there too. W4A16 on Hopper: wgmma from ~48 tokens per expert
//                              (batch >= 3), mma.sync below; DGEMMA_CUDA_W4A16=mma|wgmma forces one
//   attention                  the tiled kernels for head_dim 256 / 512 (wgmma on sm_90a, mma.sync
//                              elsewhere, split-KV), the generic warp kernel for other head sizes
//   lm_head_sample             per row of the pass: logits [n, V] f32 (the CUTLASS logits GEMM with the
//                              softcap epilogue on Hopper, else the matmul with it fused), the sampler
//                              kernel (kernels/sampler: exact inverse-CDF rule, argmax, entropy, bf16
//                              probabilities), then probabilities @ E * embed_scale (split-K matmul) into
//                              the row's self-conditioning slots. Transient memory is one row's
//                              [n, V] logits and probabilities, whatever the batch (the fused
//                              single-pass kernel of issue 12 is the next step).
#pragma once

#include <memory>
#include <string>

#include "backend/backend.h"
#include "model/config.h"
#include "model/weights.h"

namespace dgemma::cuda {

// Why `device` ("cuda", "cuda:N") cannot run here, or "" when it can: no driver, a driver too old,
// no such device, or no machine code in this build for its architecture.
std::string probe(const std::string& device);

// The backend on that device; throws InvalidArgument with probe()'s reason when it cannot run, and
// ResourceError when the weights do not fit in its memory.
std::unique_ptr<Backend> make_backend(const std::string& device, const ModelConfig& cfg, const ModelWeights& w);

// Registers make_backend/probe for the device kind "cuda" (backend/registry.h). The Python module
// calls it at import; a C++ program that links dgemma_cuda calls it once before making an Engine.
void register_backend();

}  // namespace dgemma::cuda
