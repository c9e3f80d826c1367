"""CUDA NVFP4 kernels against the numpy reference (dgemma_rt.nvfp4).

The host-side checks (the kernels' rounding code and scale layout, run on the CPU) need only a build
with the CUDA sources; the kernels themselves need a GPU, the NVFP4 x NVFP4 GEMM a Blackwell one."""

import functools

import numpy as np
import pytest

import dgemma_rt
from bf16_helpers import bf16_bits, bf16_to_f32
from dgemma_rt import nvfp4
from nvfp4_cases import every_code_and_scale_case, offsets_of, random_case, reference, tolerance

pytestmark = pytest.mark.skipif(not hasattr(dgemma_rt._core, "cuda_ops"), reason="built without the CUDA sources")
needs_gpu = pytest.mark.skipif(not hasattr(dgemma_rt._core, "cuda_ops") or dgemma_rt.cuda_device_count() == 0,
                               reason="needs a CUDA GPU")


def ops():
    return dgemma_rt._core.cuda_ops


def _wgmma_supported() -> bool:
    o = getattr(dgemma_rt._core, "cuda_ops", None)
    return o is not None and dgemma_rt.cuda_device_count() > 0 and o.grouped_gemm_nvfp4_wgmma_supported()


# The W4A16 GEMM's two kernels on the same layout: mma.sync (64-token passes, any GPU) and wgmma (128-token
# passes, Hopper builds with sm_90a and CUTLASS).
PATHS = ["mma", pytest.param("wgmma", marks=pytest.mark.skipif(not _wgmma_supported(),
                                                               reason="needs a compute capability 9.0 GPU"))]


@functools.lru_cache(maxsize=4)
def _experts(G, N, K, seed):
    """Random NVFP4 experts [G, N, K] (packed, scales, gscale), made once per shape and seed: quantizing
    2816-wide experts in numpy is most of these tests' time, and each shape runs on every path."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((G, N, K), dtype=np.float32) * np.float32(K**-0.5)
    return nvfp4.quantize(w, per_leading=True)




@needs_gpu
@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("G,N,K", [(3, 72, 48), (2, 24, 16), (1, 1408, 2816), (2, 2816, 704), (4, 200, 80)])
def test_device_shuffle_equals_host_shuffle(G, N, K, gated):
    """The CUDA backend shuffles NVFP4 experts on the device at load: byte for byte the host layout,
    negative and zero scales included."""
    if gated and N % 2:
        pytest.skip("gated needs an even N")
    rng = np.random.default_rng(G * N + K)
    w = (rng.standard_normal((G, N, K)) * rng.uniform(0.01, 3, size=(G, 1, 1))).astype(np.float32)
    packed, scales, _ = nvfp4.quantize(w, per_leading=True)
    scales = scales.copy()
    scales.reshape(-1)[::7] |= 0x80  # negative scales: their sign moves into the codes
    scales.reshape(-1)[::11] = 0     # zero scales: their codes become +0
    host = ops().nvfp4_shuffle_w4a16(packed, scales, gated)
    device = ops().nvfp4_shuffle_w4a16_device(packed, scales, gated)
    np.testing.assert_array_equal(device, host)


@needs_gpu
@pytest.mark.parametrize("counts,N,K", [
    ([0, 1, 70, 0, 33], 72, 48),     # empty experts, one token, M not a multiple of the 32-token tile, N tail
    ([5, 0, 0, 0], 64, 2816),        # the real model's K
    ([0, 0, 129], 200, 16),          # every token on one expert, one k-step
    # the real down projection (N = 2816, K = 704: 11 k-tiles, fewer than the pipeline's stages twice over)
    # with 0, 1, 15, 17, 64 and 65 tokens (64 + 1: a second pass) and 130 (three passes)
    ([0, 1, 15, 17, 64, 65, 130], 2816, 704),
    ([16, 1, 0, 33], 1408, 2816),    # the real gate_up weights, not gated: 16 = two n8 tiles, 33 = five
    ([3, 9], 24, 48),                # N not a multiple of 16, K not a multiple of 64 (zero-filled tail)
    # wgmma's passes: 128 (one full N = 128 pass), 129 and 200 (a full pass, then N = 64 / N = 128), 257
    ([128, 0, 129, 200, 257, 7], 2816, 704),
])
@pytest.mark.parametrize("path", PATHS)
def test_grouped_gemm_nvfp4_matches_reference(counts, N, K, path):
    x, packed, scales, gscale, offsets = random_case(counts, N, K)
    y = bf16_to_f32(ops().grouped_gemm_nvfp4(x, packed, scales, gscale, offsets, path=path)).astype(np.float64)
    ref = reference(x, packed, scales, gscale, offsets)
    assert np.all(np.abs(y - ref) <= tolerance(ref, K))


@needs_gpu
@pytest.mark.parametrize("path", PATHS)
def test_grouped_gemm_nvfp4_small_integers_exact(path):
    rng = np.random.default_rng(7)
    G, N, K = 3, 40, 32  # |sums| <= 32 * 6 = 192: integers bf16 holds exactly
    counts = [9, 0, 140]  # 140: two passes on either kernel
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
    codes = rng.integers(0, 16, size=(G, N, K)).astype(np.uint8)
    codes[(codes & 7) == 1] &= 0xE  # no 0.5: every weight an integer in [-6, 6]
    codes[(codes & 7) == 3] &= 0xE  # no 1.5
    packed = nvfp4.pack(codes)
    scales = np.full((G, N, K // 16), 0x38, dtype=np.uint8)  # E4M3 1.0
    gscale = np.array([1.0, 0.5, 0.25], dtype=np.float32)
    x = bf16_bits(rng.integers(-1, 2, size=(int(offsets[-1]), K)).astype(np.float32))
    y = bf16_to_f32(ops().grouped_gemm_nvfp4(x, packed, scales, gscale, offsets, path=path)).astype(np.float64)
    np.testing.assert_array_equal(y, reference(x, packed, scales, gscale, offsets))


@needs_gpu
@pytest.mark.parametrize("path", PATHS)
def test_grouped_gemm_nvfp4_every_code_and_scale_exact(path):
    """All 16 E2M1 codes (0.5 included: it passes through HMUL2.BF16 as the bf16 subnormal 2^-127) under
    subnormal, middle and maximal E4M3 scales and a negative scale; each row keeps to one scale class so
    every partial sum is exact in fp32 (<= 14 significant bits), and the output is exactly the bf16
    rounding of the exact product."""
    x, packed, scales, gscale, offsets = every_code_and_scale_case()
    y = ops().grouped_gemm_nvfp4(x, packed, scales, gscale, offsets, path=path)
    ref = reference(x, packed, scales, gscale, offsets)
    assert np.array_equal(ref.astype(np.float32).astype(np.float64), ref)  # the reference is exact in fp32
    np.testing.assert_array_equal(y, bf16_bits(ref.astype(np.float32)))
    gated = ops().grouped_gemm_nvfp4(x, packed, scales, gscale, offsets, gated=True, path=path)
    np.testing.assert_array_equal(gated, ops().moe_gelu_gate(y))


@needs_gpu
@pytest.mark.parametrize("counts,I,K", [([0, 1, 70, 0, 33], 36, 48), ([16] * 8, 704, 2816),
                                        ([0, 1, 15, 17, 64, 65, 150], 704, 2816)])
@pytest.mark.parametrize("path", PATHS)
def test_grouped_gemm_nvfp4_gated_equals_gemm_then_gelu_gate(counts, I, K, path):
    """The fused gate_up GEMM + gelu_tanh(gate) * up is bit-identical to the GEMM followed by moe_gelu_gate."""
    rng = np.random.default_rng(I + K)
    G = len(counts)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
    packed, scales, gscale = _experts(G, 2 * I, K, I + K)
    x = bf16_bits(rng.standard_normal((int(offsets[-1]), K)).astype(np.float32))
    h = ops().grouped_gemm_nvfp4(x, packed, scales, gscale, offsets, path=path)
    fused = ops().grouped_gemm_nvfp4(x, packed, scales, gscale, offsets, gated=True, path=path)
    assert fused.shape == (int(offsets[-1]), I)
    np.testing.assert_array_equal(fused, ops().moe_gelu_gate(h))


@needs_gpu
@pytest.mark.parametrize("gated,T,k,G,I,K", [(False, 37, 4, 6, 40, 64), (True, 37, 4, 6, 40, 64),
                                             (True, 256, 8, 16, 704, 2816)])  # a canvas, top-8, real gate_up
@pytest.mark.parametrize("path", PATHS)
def test_grouped_gemm_nvfp4_gather_equals_permuted_input(gated, T, k, G, I, K, path):
    """Reading the unpermuted expert input through perm_slot // k is bit-identical to the GEMM on the
    permuted copy moe_permute would write."""
    rng = np.random.default_rng(17)
    experts = np.stack([rng.permutation(G)[:k] for _ in range(T)])            # [T, k] distinct per token
    slots = np.arange(T * k)
    perm_slot = slots[np.argsort(experts.reshape(-1), kind="stable")].astype(np.int32)  # expert-major order
    offsets = np.concatenate([[0], np.cumsum(np.bincount(experts.reshape(-1), minlength=G))]).astype(np.int32)
    xe = bf16_bits(rng.standard_normal((T, K)).astype(np.float32))
    packed, scales, gscale = _experts(G, 2 * I, K, 17)
    unfused = ops().grouped_gemm_nvfp4(xe[perm_slot // k], packed, scales, gscale, offsets, gated=gated, path=path)
    fused = ops().grouped_gemm_nvfp4(xe, packed, scales, gscale, offsets, gated=gated, gather=perm_slot, gather_div=k,
                                     path=path)
    np.testing.assert_array_equal(fused, unfused)


@needs_gpu
@pytest.mark.skipif(not _wgmma_supported(), reason="needs a compute capability 9.0 GPU")
@pytest.mark.parametrize("gated", [False, True])
def test_grouped_gemm_nvfp4_paths_agree_at_batch_sizes(gated):
    """The two kernels on routed rows of 1, 3 and 8 canvases at the real gate_up/down shapes (8 of the 128
    experts, their share of the rows): both within the bf16 bound of the reference, and 'auto' is one of them."""
    rng = np.random.default_rng(23)
    N, K = (1408, 2816) if gated else (2816, 704)
    packed, scales, gscale = _experts(8, N, K, 23)  # one set of experts; the routed rows change
    for canvases in (1, 3, 8):
        counts = rng.poisson(canvases * 256 * 8 / 128, size=8).tolist()
        offsets = offsets_of(counts)
        x = bf16_bits(rng.standard_normal((int(offsets[-1]), K), dtype=np.float32))
        out = {p: ops().grouped_gemm_nvfp4(x, packed, scales, gscale, offsets, gated=gated, path=p)
               for p in ("mma", "wgmma", "auto")}
        assert any(np.array_equal(out["auto"], out[p]) for p in ("mma", "wgmma"))
        if not gated:
            ref = reference(x, packed, scales, gscale, offsets)
            for p in ("mma", "wgmma"):
                y = bf16_to_f32(out[p]).astype(np.float64)
                assert np.all(np.abs(y - ref) <= tolerance(ref, K)), (canvases, p)
        else:
            a, b = bf16_to_f32(out["mma"]).astype(np.float64), bf16_to_f32(out["wgmma"]).astype(np.float64)
            assert np.all(np.abs(a - b) <= 2.0**-6 * np.abs(a) + 1e-3 * np.abs(a).max(initial=1.0)), canvases


def test_wgmma_layouts_are_the_kernels():
    """Host-side, no GPU: CuTe's layouts for the wgmma W4A16 kernel's operands (the register A fragment per
    warp, the K-major 128-byte-swizzle activation tile, the fp32 C fragment) are the decode's fragment map,
    the loader's L::act_chunk_offset and the shared epilogue's accumulator map, for N = 64 and 128."""
    assert ops().w4a16_wgmma_layout_mismatch() == ""


def test_grouped_gemm_nvfp4_path_errors():
    x = np.zeros((4, 32), dtype=np.uint16)
    args = (x, np.zeros((1, 8, 16), np.uint8), np.zeros((1, 8, 2), np.uint8), np.ones(1, np.float32),
            np.array([0, 4], np.int32))
    with pytest.raises(ValueError, match="path must be"):
        ops().grouped_gemm_nvfp4(*args, path="tensor-cores")
    if not _wgmma_supported():
        with pytest.raises(NotImplementedError, match="compute capability 9.0"):
            ops().grouped_gemm_nvfp4(*args, path="wgmma")


def test_grouped_gemm_nvfp4_bad_shapes():
    x = np.zeros((4, 24), dtype=np.uint16)
    with pytest.raises(ValueError, match="multiple of 16"):
        ops().grouped_gemm_nvfp4(x, np.zeros((1, 8, 12), np.uint8), np.zeros((1, 8, 1), np.uint8),
                                 np.ones(1, np.float32), np.array([0, 4], np.int32))
    with pytest.raises(ValueError, match="outside x"):
        ops().grouped_gemm_nvfp4(np.zeros((2, 16), np.uint16), np.zeros((1, 8, 8), np.uint8),
                                 np.zeros((1, 8, 1), np.uint8), np.ones(1, np.float32), np.array([0, 3], np.int32),
                                 gather=np.array([0, 4, 5], np.int32), gather_div=2)
    with pytest.raises(ValueError, match="even N"):
        ops().grouped_gemm_nvfp4(np.zeros((4, 32), np.uint16), np.zeros((1, 7, 16), np.uint8),
                                 np.zeros((1, 7, 2), np.uint8), np.ones(1, np.float32), np.array([0, 4], np.int32),
                                 gated=True)
    x = np.zeros((4, 32), dtype=np.uint16)
    with pytest.raises(ValueError, match="offsets"):
        ops().grouped_gemm_nvfp4(x, np.zeros((1, 8, 16), np.uint8), np.zeros((1, 8, 2), np.uint8),
                                 np.ones(1, np.float32), np.array([0, 3], np.int32))


# ------------------------------------------------------------------------------------------------
# Host side: the rounding code and the scale layout the kernels run, checked on the CPU.

def e4m3_probe_values():
    """Every E4M3 value, the midpoints between neighbours (ties), values just off them, and beyond 448."""
    v = nvfp4.e4m3_decode(np.arange(127, dtype=np.uint8)).astype(np.float64)
    mid = (v[:-1] + v[1:]) / 2
    probes = np.concatenate([v, mid, mid * (1 + 2.0**-20), mid * (1 - 2.0**-20), [448.0, 460.0, 464.0, 500.0, 1e30]])
    return probes.astype(np.float32)


def test_host_e4m3_rounding_matches_numpy():
    x = e4m3_probe_values()
    np.testing.assert_array_equal(ops().nvfp4_encode_host(x, "e4m3"), nvfp4.e4m3_encode(x))
    rng = np.random.default_rng(3)
    x = np.exp(rng.uniform(-12, 7, size=20000)).astype(np.float32)
    np.testing.assert_array_equal(ops().nvfp4_encode_host(x, "e4m3"), nvfp4.e4m3_encode(x))
    with pytest.raises(ValueError, match="finite"):
        ops().nvfp4_encode_host(np.array([np.nan], np.float32), "e4m3")


def test_host_e2m1_rounding_matches_numpy():
    v = nvfp4.E2M1_VALUES.astype(np.float64)
    mid = (v[:-1] + v[1:]) / 2
    mag = np.concatenate([v, mid, mid + 1e-4, mid - 1e-4, [5.99, 6.01, 7.0, 100.0]])
    x = np.concatenate([mag, -mag, [-0.0, -0.1]]).astype(np.float32)
    np.testing.assert_array_equal(ops().nvfp4_encode_host(x, "e2m1"), nvfp4.e2m1_encode(x))
    x = np.random.default_rng(4).uniform(-8, 8, size=20000).astype(np.float32)
    np.testing.assert_array_equal(ops().nvfp4_encode_host(x, "e2m1"), nvfp4.e2m1_encode(x))


@pytest.mark.parametrize("scale", [1.0, 1e-6, 3e4])
def test_host_block_quantization_matches_numpy(scale):
    rng = np.random.default_rng(int(scale * 7) + 1)
    x = (rng.standard_normal((33, 176)) * scale).astype(np.float32)
    x[0] = 0.0                       # an all-zero row: zero scales, zero codes
    x[1, :16] = scale * 1e-3         # a block far below the tensor's amax: subnormal / zero E4M3 scales
    x[2, 16:32] = -np.abs(x).max()   # a block at the tensor's amax: scale saturates at 448
    packed, scales, g = nvfp4.quantize(x)
    assert ops().nvfp4_global_scale(float(np.abs(x).max())) == g
    p2, s2 = ops().nvfp4_quantize_host(x, float(g))
    np.testing.assert_array_equal(s2, scales)
    np.testing.assert_array_equal(p2, packed)


def test_blackwell_arch_query():
    arch = ops().nvfp4_blackwell_arch()
    assert arch in (None, "sm_100a", "sm_120a")
    if dgemma_rt.cuda_device_count() == 0:
        assert arch is None


@pytest.mark.parametrize("rows,K", [(1, 16), (37, 48), (128, 64), (129, 704), (300, 2816)])
def test_scale_layout_matches_cutlass(rows, K):
    ours = ops().nvfp4_sf_offsets(rows, K)
    np.testing.assert_array_equal(ours, nvfp4.sf_offsets(rows, K // 16))
    if hasattr(ops(), "grouped_gemm_nvfp4x4"):  # a build with the CUTLASS headers
        np.testing.assert_array_equal(ours, ops().nvfp4_sf_offsets(rows, K, cutlass_layout=True))
    # one byte per scale, all inside the padded tensor
    assert len(np.unique(ours)) == ours.size and ours.max() < nvfp4.sf_bytes(rows, K // 16)


def _weight_scales(G, rows, kb, seed):
    # nonzero codes, so a zero in the output is padding; 0x80 (-0) and large codes included
    return np.random.default_rng(seed).integers(1, 256, size=(G, rows, kb)).astype(np.uint8)


@pytest.mark.parametrize("G,rows,kb", [(1, 1, 1), (2, 37, 3), (3, 128, 4), (2, 129, 44), (1, 1408, 176),
                                       (2, 2816, 44)])
def test_swizzle_scales_step_matches_numpy(G, rows, kb):
    """The device swizzle kernel's per-thread step (nvfp4::swizzle_scale) run on the host over every
    thread index: each writes a distinct byte (checked inside), and the result is swizzle_scales'."""
    scales = _weight_scales(G, rows, kb, G * rows + kb)
    np.testing.assert_array_equal(ops().nvfp4_swizzle_scales(scales), nvfp4.swizzle_scales(scales))


@needs_gpu
@pytest.mark.parametrize("G,rows,kb", [(2, 37, 3), (3, 129, 44), (4, 1408, 176), (3, 2816, 44)])
def test_device_swizzle_scales_equals_numpy(G, rows, kb):
    """The CUDA backend puts NVFP4 expert scales into the MMA layout on the device at load (Blackwell):
    byte for byte dgemma_rt.nvfp4.swizzle_scales, padding included (the output starts as 0xAB)."""
    scales = _weight_scales(G, rows, kb, rows)
    np.testing.assert_array_equal(ops().nvfp4_swizzle_scales(scales, device=True), nvfp4.swizzle_scales(scales))


# ------------------------------------------------------------------------------------------------
# GPU: activation quantization (any GPU) and the NVFP4 x NVFP4 grouped GEMM (sm_100a / sm_120a).

def act_reference(x_bits, offsets, global_scale):
    """numpy: packed values, and per row its scales, for activations quantized with one global scale."""
    x = bf16_to_f32(x_bits)
    blocks = x.reshape(x.shape[0], -1, 16)
    sc = nvfp4.e4m3_encode(np.abs(blocks).max(axis=-1) / np.float32(6.0) / np.float32(global_scale))
    denom = (nvfp4.e4m3_decode(sc) * np.float32(global_scale))[..., None]
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.where(denom > 0, blocks / denom, np.float32(0.0))
    return nvfp4.pack(nvfp4.e2m1_encode(q.reshape(x.shape))), sc


@needs_gpu
@pytest.mark.parametrize("counts,K", [([3, 0, 130, 1], 48), ([0, 0, 5], 2816), ([256], 704)])
def test_quantize_act_matches_reference(counts, K):
    rng = np.random.default_rng(len(counts) + K)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
    x = bf16_bits(rng.standard_normal((int(offsets[-1]), K)).astype(np.float32) * 5)
    q, sf, starts, g = ops().quantize_act_nvfp4(x, offsets)
    amax = float(np.abs(bf16_to_f32(x)).max())
    assert g == pytest.approx(ops().nvfp4_global_scale(amax), rel=0, abs=0)
    ref_q, ref_sc = act_reference(x, offsets, g)
    np.testing.assert_array_equal(q, ref_q)
    kb = K // 16
    tiles = np.concatenate([[0], np.cumsum([-(-c // 128) for c in counts])])
    np.testing.assert_array_equal(starts, tiles)
    tile_bytes = 128 * (-(-kb // 4) * 4)
    for gi, c in enumerate(counts):
        region = sf[tiles[gi] * tile_bytes:]
        rows = ref_sc[offsets[gi]:offsets[gi + 1]]
        np.testing.assert_array_equal(region[nvfp4.sf_offsets(c, kb)], rows)
        # everything else of the group's tiles is zero: the columns padding K/16 to 4, and the rows
        # padding its last 128-row tile (the binding fills the buffer with 0xFF first)
        every = nvfp4.sf_offsets(-(-c // 128) * 128, -(-kb // 4) * 4)
        mask = np.ones(every.shape, bool)
        mask[:c, :kb] = False
        assert not region[every[mask]].any(), "nonzero padding scales"
    # a static global scale is used as given
    q2, _, _, g2 = ops().quantize_act_nvfp4(x, offsets, global_scale=g * 2)
    assert g2 == np.float32(g * 2)
    np.testing.assert_array_equal(q2, act_reference(x, offsets, np.float32(g * 2))[0])


@needs_gpu
@pytest.mark.parametrize("T,k,G,K", [(37, 4, 6, 64), (256, 8, 16, 2816)])
def test_quantize_act_gather_equals_permuted_input(T, k, G, K):
    """The backend's gate_up input: x [T, K] quantized through perm_slot // k equals quantizing the
    permuted copy, and the global scale from x is the permuted copy's (its rows are x's)."""
    rng = np.random.default_rng(T)
    experts = np.stack([rng.permutation(G)[:k] for _ in range(T)])
    perm_slot = np.arange(T * k)[np.argsort(experts.reshape(-1), kind="stable")].astype(np.int32)
    offsets = np.concatenate([[0], np.cumsum(np.bincount(experts.reshape(-1), minlength=G))]).astype(np.int32)
    x = bf16_bits(rng.standard_normal((T, K)).astype(np.float32) * 3)
    want = ops().quantize_act_nvfp4(x[perm_slot // k], offsets)
    got = ops().quantize_act_nvfp4(x, offsets, gather=perm_slot, gather_div=k)
    for a, b in zip(got[:3], want[:3]):
        np.testing.assert_array_equal(a, b)
    assert got[3] == want[3]


needs_blackwell = pytest.mark.skipif(
    not hasattr(dgemma_rt._core, "cuda_ops") or dgemma_rt.cuda_device_count() == 0
    or not hasattr(dgemma_rt._core.cuda_ops, "grouped_gemm_nvfp4x4")
    or dgemma_rt._core.cuda_ops.nvfp4_blackwell_arch() is None,
    reason="needs a Blackwell GPU (sm_100a / sm_120a) and a build with CUTLASS")


def nvfp4x4(x_bits, packed, scales, gscale, offsets, a_global=None):
    """Quantizes x on the GPU, then runs the block-scaled grouped GEMM; also returns the float64 reference
    of the same quantized operands."""
    q, sf, starts, g = ops().quantize_act_nvfp4(x_bits, offsets, global_scale=a_global)
    y = bf16_to_f32(ops().grouped_gemm_nvfp4x4(q, sf, starts, g, packed, nvfp4.swizzle_scales(scales), gscale,
                                                offsets)).astype(np.float64)
    _, a_sc = act_reference(x_bits, offsets, g)
    a = nvfp4.dequantize(q, a_sc, np.float32(g)).astype(np.float64)
    wd = nvfp4.dequantize(packed, scales, gscale).astype(np.float64)
    ref = np.zeros((a.shape[0], wd.shape[1]))
    for e in range(wd.shape[0]):
        ref[offsets[e]:offsets[e + 1]] = a[offsets[e]:offsets[e + 1]] @ wd[e].T
    return y, ref


@needs_blackwell
@pytest.mark.parametrize("counts,N,K", [
    ([0, 1, 70, 0, 33], 136, 64),    # empty experts, one token, partial tiles in every dimension
    ([5, 0, 0, 300], 256, 2816),     # the real model's K, an expert past two token tiles
    ([0, 0, 129], 1408, 704),        # every token on one expert; the real gate_up / down shapes
])
def test_grouped_gemm_nvfp4x4_matches_reference(counts, N, K):
    rng = np.random.default_rng(sum(counts) + N + K)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
    w = (rng.standard_normal((len(counts), N, K)) * rng.uniform(0.01, 3, size=(len(counts), 1, 1))).astype(np.float32)
    x = bf16_bits(rng.standard_normal((int(offsets[-1]), K)).astype(np.float32))
    y, ref = nvfp4x4(x, *nvfp4.quantize(w, per_leading=True), offsets)
    tol = 2.0**-8 * np.abs(ref) + 1e-5 * np.sqrt(K) * np.abs(ref).max(initial=1.0)
    assert np.all(np.abs(y - ref) <= tol)


@needs_blackwell
def test_grouped_gemm_nvfp4x4_small_integers_exact():
    rng = np.random.default_rng(11)
    counts, N, K = [9, 0, 40], 64, 32
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
    codes = rng.integers(0, 16, size=(3, N, K)).astype(np.uint8)
    codes[(codes & 7) == 1] &= 0xE  # no 0.5 and no 1.5: integer weights in [-6, 6]
    codes[(codes & 7) == 3] &= 0xE
    scales = np.full((3, N, K // 16), 0x38, dtype=np.uint8)  # E4M3 1.0
    gscale = np.array([1.0, 0.5, 0.25], dtype=np.float32)
    # activations in {-1, 0, 1} with a 3 in every block and global scale 2^-8: every block scale is 128,
    # exact, and the values quantize to themselves; |sums| <= 216, exact in bf16
    x = rng.integers(-1, 2, size=(int(offsets[-1]), K)).astype(np.float32)
    x[:, ::16] = 3.0
    y, ref = nvfp4x4(bf16_bits(x), nvfp4.pack(codes), scales, gscale, offsets, a_global=2.0**-8)
    np.testing.assert_array_equal(ref[:9], x[:9] @ nvfp4.e2m1_decode(codes[0]).T)  # the reference is exact
    np.testing.assert_array_equal(y, ref)


@needs_gpu
def test_nvfp4x4_bad_arguments():
    x = np.zeros((4, 48), dtype=np.uint16)
    with pytest.raises(ValueError, match="offsets"):
        ops().quantize_act_nvfp4(x, np.array([0, 3], np.int32))
    with pytest.raises(ValueError, match="global scale"):
        ops().quantize_act_nvfp4(x, np.array([0, 4], np.int32), global_scale=float("nan"))
    if hasattr(ops(), "grouped_gemm_nvfp4x4"):
        with pytest.raises(ValueError, match="K % 32"):
            ops().grouped_gemm_nvfp4x4(np.zeros((4, 24), np.uint8), np.zeros(512, np.uint8), np.zeros(2, np.int32),
                                       1.0, np.zeros((1, 8, 24), np.uint8), np.zeros((1, 512), np.uint8),
                                       np.ones(1, np.float32), np.array([0, 4], np.int32))
