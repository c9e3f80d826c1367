// W4A16 NVFP4 grouped GEMM on Hopper's wgmma, for experts with many tokens (contract: nvfp4.cuh;
// weight layout and decode: common/nvfp4_w4a16_layout.h, the same pre-shuffled weights as the
// mma.sync kernel in grouped_gemm_nvfp4.cu, whose header gives the design both share).
//
// Why a second kernel: the mma.sync kernel takes up to 64 tokens per pass and re-streams an expert's
// weights for each further pass; at 64 tokens a warp spends 161 instructions per 64-column stage, 32
// of them HMMA and 16 ldmatrix. From batch ~3 on (2,048 routed rows per canvas over 128 experts: 48+
// tokens per expert at 3 canvases, ~128 at 8) the step is bound by tensor work, not by weight bytes
// (26B-A4B at batch 8: ~195 GFLOP per layer against 428 MB of weights). Here:
//   - a pass holds up to 128 tokens (one weight stream for an expert of <= 128 tokens);
//   - each warpgroup (4 warps = 64 MMA rows, warp w's rows as in the mma.sync kernel) issues per stage
//     4 wgmma.m64nNk16 (N = 128, or 64 for a pass of <= 64 tokens) with its decoded weights as the
//     register A operand: wgmma's per-warp A fragment is mma.m16n8k16's, so the decode and the weight
//     layout are unchanged; both warpgroups read the same activation tile (B) from shared memory through
//     a K-major 128-byte-swizzle descriptor: L::act_chunk_offset's XOR layout is exactly CuTe's
//     Layout_K_SW128_Atom tiled over (N, 64) (checked on the host: wgmma_layout_mismatch()), so the
//     loader, the zero-fill of padding tokens and K tails, and the gather through perm_slot are shared;
//   - the fp32 C fragment gives each warp the mma.sync accumulator layout, so the epilogue (global
//     scale, gelu(gate) * up in registers) is shared too.
// Shared memory: 5 stages x (16 KB activation tile, 1024-aligned as the swizzle needs, + 4.5 KB weight
// unit) + the rows table = 106 KB: 2 CTAs per SM, 16 warps; registers <= 128 (64 accumulators at N = 128).
// Pipeline per stage: wait for its copies, proxy fence (cp.async writes -> the async proxy wgmma reads),
// barrier, issue the copies of stage t + 4 into the slot the previous stage's wgmma has finished with,
// decode the 4 k-steps' A fragments (as the mma.sync kernel), 4 wgmma, commit, wait. The wgmma wait
// per stage keeps A's registers and the slot safe; the other 3 warpgroups of the SM cover it.
//
// Expected (H100 SXM, per layer at 128 tokens per expert): per stage and warp ~60 decode/scale
// instructions + 1 wgmma per k-step instead of 32 HMMA + 16 LDSM + the same decode, and one weight
// stream instead of two: tensor-bound at ~80% of the wgmma peak (~0.25 ms) against ~0.35-0.4 ms for
// two mma.sync passes. Not yet run on a GPU.
#include "kernels/nvfp4/w4a16_common.cuh"
#include "kernels/nvfp4/w4a16_wgmma.h"

#include <sstream>

#include "kernels/common/arch.h"
#include "kernels/kernel_plan.h"

#if defined(DGEMMA_WITH_CUTLASS)
#include <cute/arch/mma_sm90.hpp>
#include <cute/atom/mma_traits_sm90_gmma.hpp>
#include <cute/tensor.hpp>
#endif

namespace dgemma::kernels {
namespace w4a16_detail {
namespace {

constexpr int kMaxTokens = 128;  // tokens per pass: the wgmma N of a full pass
constexpr int kStages = 5;
constexpr int kActTileBytes = kMaxTokens * L::kActRowBytes;  // 16384: whole 1024-byte swizzle atoms
constexpr int kRowsBytes = kMaxTokens * 4;
constexpr int kAlignSlack = 1024;  // the dynamic shared memory base is aligned up to the swizzle atom
constexpr int kSmemBytes = kStages * (kActTileBytes + L::kUnitBytes) + kRowsBytes + kAlignSlack;  // 106,496
constexpr int kCtasPerSm = 2;
static_assert(kActTileBytes % 1024 == 0, "activation tiles stay 1024-aligned");
static_assert(kCtasPerSm * (kSmemBytes + 1024) <= 228 * 1024, "2 CTAs per SM on Hopper");

#if defined(DGEMMA_WITH_CUTLASS)
using Elem = cutlass::bfloat16_t;
template <int BN>
struct Wgmma {
  // B: BN tokens x 64 columns of the stage, K-major, 128-byte swizzle (8-row x 128-byte atoms down the rows).
  using ActTile = decltype(cute::tile_to_shape(cute::GMMA::Layout_K_SW128_Atom<Elem>{},
                                               cute::Shape<cute::Int<BN>, cute::Int<L::kKTile>>{}));
  // A (64 weight rows of one warpgroup) from registers, B from shared memory, fp32 C.
  using Tiled = decltype(cute::make_tiled_mma(
      cute::GMMA::rs_op_selector<Elem, Elem, float, cute::Shape<cute::_64, cute::Int<BN>, cute::Int<L::kKTile>>>()));
};

// Tokens t0 .. t0 + BN (those < m_end) of expert g against the CTA's 128 MMA rows, over all of K.
template <bool Gated, int BN>
__device__ __forceinline__ void wgmma_pass(const GroupedGemmNvfp4Params& p, const uint8_t* w_cta, int ktiles,
                                           uint8_t* act, uint8_t* wts, const int32_t* rows, int g, int t0,
                                           int m_end) {
  using namespace cute;
  using W = Wgmma<BN>;
  typename W::Tiled mma;
  auto thr = mma.get_thread_slice(threadIdx.x % 128);
  Tensor acc = partition_fragment_C(mma, Shape<_64, Int<BN>>{});                  // fp32, BN / 2 per thread
  Tensor a_frag = make_tensor<Elem>(partition_shape_A(mma, Shape<_64, Int<L::kKTile>>{}));  // 4 k-steps
  Tensor a32 = recast<uint32_t>(a_frag);
  static_assert(decltype(size(acc))::value == BN / 2, "C fragment");
  static_assert(decltype(size(a32))::value == 4 * L::kKSteps, "A fragment: 4 registers per k-step");
  clear(acc);

  StageLoader<BN> loader(p, w_cta, rows);
  auto load = [&](int s) { loader.load(p, wts + s * L::kUnitBytes, ptx::smem_u32(act + s * kActTileBytes)); };
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < ktiles) load(s);
    ptx::cp_async_commit();
  }
  int read = 0, write = kStages - 1;
  for (int t = 0; t < ktiles; ++t) {
    ptx::cp_async_wait<kStages - 2>();
    ptx::fence_proxy_async_shared();  // this thread's landed copies, visible to wgmma's async proxy
    __syncthreads();  // stage `read` landed for every thread; slot `write` (read by wgmma at t - 1, waited for) is free
    if (t + kStages - 1 < ktiles) load(write);
    ptx::cp_async_commit();

    const WarpWeights ww = warp_weights(wts + read * L::kUnitBytes);
#pragma unroll
    for (int j = 0; j < L::kKSteps; ++j) {
      uint32_t a[4];
      decode_kstep(ww, j, a);
#pragma unroll
      for (int i = 0; i < 4; ++i) a32(4 * j + i) = a[i];  // register i of k-step j (wgmma_layout_mismatch)
    }
    Tensor tB = thr.partition_fragment_B(
        make_tensor(make_smem_ptr(reinterpret_cast<Elem*>(act + read * kActTileBytes)), typename W::ActTile{}));
    warpgroup_fence_operand(a_frag);
    warpgroup_fence_operand(acc);
    warpgroup_arrive();
#pragma unroll
    for (int kb = 0; kb < L::kKSteps; ++kb) cute::gemm(mma, a_frag(_, _, kb), tB(_, _, kb), acc);
    warpgroup_commit_batch();
    warpgroup_wait<0>();
    warpgroup_fence_operand(acc);
    warpgroup_fence_operand(a_frag);
    read = read + 1 == kStages ? 0 : read + 1;
    write = write + 1 == kStages ? 0 : write + 1;
  }
  ptx::cp_async_wait<0>();
  store_outputs<Gated, BN / 8>(p, g, t0, m_end, [&](int n, int i) { return acc(4 * n + i); });
}
#endif

// grid (groups(N, gated), G), as the mma.sync kernel.
template <bool Gated>
__global__ void __launch_bounds__(kThreads, kCtasPerSm) grouped_gemm_nvfp4_wgmma_kernel(GroupedGemmNvfp4Params p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ == 900 && defined(DGEMMA_WITH_CUTLASS)
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  extern __shared__ uint8_t smem_raw[];
  uint8_t* act = smem_raw + ((1024u - (ptx::smem_u32(smem_raw) & 1023u)) & 1023u);
  uint8_t* wts = act + kStages * kActTileBytes;
  int32_t* rows = reinterpret_cast<int32_t*>(wts + kStages * L::kUnitBytes);
  const int g = blockIdx.y;
  const int m_begin = p.offsets[g], m_end = p.offsets[g + 1];
  if (m_begin >= m_end) return;  // an expert without tokens reads no weights
  const int ktiles = L::k_tiles(p.K);
  const uint8_t* w_cta = cta_weights(p, Gated, g);
  for (int t0 = m_begin; t0 < m_end; t0 += kMaxTokens) {
    __syncthreads();  // a previous pass is done with the rows table and the stages (one barrier: no live m_begin)
    fill_rows<kMaxTokens>(p, t0, m_end, rows);
    __syncthreads();
    if (m_end - t0 > 64)
      wgmma_pass<Gated, 128>(p, w_cta, ktiles, act, wts, rows, g, t0, m_end);
    else
      wgmma_pass<Gated, 64>(p, w_cta, ktiles, act, wts, rows, g, t0, m_end);
  }
#else
  __trap();  // plain sm_90 (no "a"): wgmma unavailable; the host launches this only where supported
#endif
#endif
}

}  // namespace

cudaError_t launch_wgmma(const GroupedGemmNvfp4Params& p, cudaStream_t stream) {
  if (!grouped_gemm_nvfp4_wgmma_supported()) return cudaErrorNotSupported;
  const dim3 grid(L::groups(p.N, p.gated), p.G);
  const auto kernel = p.gated ? grouped_gemm_nvfp4_wgmma_kernel<true> : grouped_gemm_nvfp4_wgmma_kernel<false>;
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmemBytes);
  if (err != cudaSuccess) return err;
  kernel<<<grid, kThreads, kSmemBytes, stream>>>(p);
  return cudaGetLastError();
}

std::string wgmma_layout_mismatch() {
#if defined(DGEMMA_WITH_CUTLASS)
  using namespace cute;
  std::ostringstream o;
  auto check = [&](auto bn) {
    constexpr int BN = decltype(bn)::value;
    using Tiled = typename Wgmma<BN>::Tiled;
    // A: (thread, value) -> m + 64 k of the 64 x 16 atom; value = half + 2 * register.
    const auto la = typename Tiled::Atom::LayoutA_TV{};
    for (int t = 0; t < 128 && o.tellp() == 0; ++t)
      for (int v = 0; v < 8; ++v) {
        const int lane = t % 32, i = v / 2, h = v % 2;
        const int m = 16 * (t / 32) + L::frag_row(lane, i), k = L::frag_k(lane, i, h);
        if (static_cast<int>(la(t, v)) != m + 64 * k) {
          o << "A (N = " << BN << "): thread " << t << " value " << v << " is element " << la(t, v)
            << " of the 64x16 tile, the decode writes (" << m << ", " << k << ")";
          break;
        }
      }
    // C: (thread, value) -> m + 64 n; value 4 n8 + i is the mma.sync accumulator acc[n8][i].
    const auto lc = typename Tiled::Atom::LayoutC_TV{};
    for (int t = 0; t < 128 && o.tellp() == 0; ++t)
      for (int v = 0; v < BN / 2; ++v) {
        const int lane = t % 32, i = v % 4;
        const int m = 16 * (t / 32) + L::acc_row(lane, i), n = 8 * (v / 4) + L::acc_col(lane, i);
        if (static_cast<int>(lc(t, v)) != m + 64 * n) {
          o << "C (N = " << BN << "): thread " << t << " value " << v << " is element " << lc(t, v)
            << ", the epilogue reads (" << m << ", " << n << ")";
          break;
        }
      }
    // B: the activation tile's byte offset of (token r, column c) against the loader's. A GMMA smem layout's
    // swizzle acts on the byte address (smem_ptr_flag; cute/pointer_swizzle.hpp), here of a 1024-aligned tile.
    const auto tile = typename Wgmma<BN>::ActTile{};
    const auto swizzle = get_swizzle_portion(tile);
    const auto plain = get_nonswizzle_portion(tile);
    for (int r = 0; r < BN && o.tellp() == 0; ++r)
      for (int c = 0; c < L::kKTile; ++c) {
        const int at = static_cast<int>(swizzle(2 * static_cast<int>(plain(r, c))));
        const int want = L::act_chunk_offset(r, c / 8) + 2 * (c % 8);
        if (at != want) {
          o << "B (N = " << BN << "): token " << r << " column " << c << " is at byte " << at
            << " in CuTe's layout, the loader writes byte " << want;
          break;
        }
      }
  };
  check(Int<64>{});
  check(Int<128>{});
  return o.str();
#else
  return "no CuTe (built without the CUTLASS headers)";
#endif
}

}  // namespace w4a16_detail

bool grouped_gemm_nvfp4_wgmma_supported() { return sm90_wgmma_usable(); }

void w4a16_wgmma_kernel_plans(KernelPlans& out) {
  out.push_back({"grouped_gemm_nvfp4_wgmma_kernel<", w4a16_detail::kThreads, w4a16_detail::kSmemBytes,
                 w4a16_detail::kCtasPerSm,
                 "kCtasPerSm (__launch_bounds__): 4 warpgroups per SM cover each one's wait for its wgmma"});
}

}  // namespace dgemma::kernels
