"""CUDA NVFP4 W4A16 grouped GEMM against the numpy reference (dgemma_rt.nvfp4). Skipped without a GPU."""

import numpy as np
import pytest

import dgemma_rt
from bf16_helpers import bf16_bits, bf16_to_f32
from dgemma_rt import nvfp4

pytestmark = pytest.mark.skipif(
    not hasattr(dgemma_rt._core, "cuda_ops") or dgemma_rt.cuda_device_count() == 0, reason="needs a CUDA GPU"
)


def ops():
    return dgemma_rt._core.cuda_ops


def reference(x_bits, packed, scales, gscale, offsets):
    """float64 of (dequantized fp32 weights) against the bf16 inputs, per expert."""
    x = bf16_to_f32(x_bits).astype(np.float64)
    w = nvfp4.dequantize(packed, scales, gscale).astype(np.float64)
    y = np.zeros((x.shape[0], w.shape[1]))
    for g in range(w.shape[0]):
        a, b = offsets[g], offsets[g + 1]
        y[a:b] = x[a:b] @ w[g].T
    return y


@pytest.mark.parametrize("counts,N,K", [
    ([0, 1, 70, 0, 33], 72, 48),     # empty experts, one token, M not a multiple of the 32-token tile, N tail
    ([5, 0, 0, 0], 64, 2816),        # the real model's K
    ([0, 0, 129], 200, 16),          # every token on one expert, one k-step
])
def test_grouped_gemm_nvfp4_matches_reference(counts, N, K):
    rng = np.random.default_rng(sum(counts) + N + K)
    G = len(counts)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
    w = (rng.standard_normal((G, N, K)) * rng.uniform(0.01, 3, size=(G, 1, 1))).astype(np.float32)
    packed, scales, gscale = nvfp4.quantize(w, per_leading=True)
    x = bf16_bits(rng.standard_normal((int(offsets[-1]), K)).astype(np.float32))
    y = bf16_to_f32(ops().grouped_gemm_nvfp4(x, packed, scales, gscale, offsets)).astype(np.float64)
    ref = reference(x, packed, scales, gscale, offsets)
    # bf16 output rounding (2^-8 relative) plus fp32 accumulation in another order
    tol = 2.0**-8 * np.abs(ref) + 1e-5 * np.sqrt(K) * np.abs(ref).max(initial=1.0)
    assert np.all(np.abs(y - ref) <= tol)


def test_grouped_gemm_nvfp4_small_integers_exact():
    rng = np.random.default_rng(7)
    G, N, K = 3, 40, 32  # |sums| <= 32 * 6 = 192: integers bf16 holds exactly
    counts = [9, 0, 40]
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
    codes = rng.integers(0, 16, size=(G, N, K)).astype(np.uint8)
    codes[(codes & 7) == 1] &= 0xE  # no 0.5: every weight an integer in [-6, 6]
    codes[(codes & 7) == 3] &= 0xE  # no 1.5
    packed = nvfp4.pack(codes)
    scales = np.full((G, N, K // 16), 0x38, dtype=np.uint8)  # E4M3 1.0
    gscale = np.array([1.0, 0.5, 0.25], dtype=np.float32)
    x = bf16_bits(rng.integers(-1, 2, size=(int(offsets[-1]), K)).astype(np.float32))
    y = bf16_to_f32(ops().grouped_gemm_nvfp4(x, packed, scales, gscale, offsets)).astype(np.float64)
    np.testing.assert_array_equal(y, reference(x, packed, scales, gscale, offsets))


def test_grouped_gemm_nvfp4_bad_shapes():
    x = np.zeros((4, 24), dtype=np.uint16)
    with pytest.raises(ValueError, match="multiple of 16"):
        ops().grouped_gemm_nvfp4(x, np.zeros((1, 8, 12), np.uint8), np.zeros((1, 8, 1), np.uint8),
                                 np.ones(1, np.float32), np.array([0, 4], np.int32))
    x = np.zeros((4, 32), dtype=np.uint16)
    with pytest.raises(ValueError, match="offsets"):
        ops().grouped_gemm_nvfp4(x, np.zeros((1, 8, 16), np.uint8), np.zeros((1, 8, 2), np.uint8),
                                 np.ones(1, np.float32), np.array([0, 3], np.int32))
