"""FP8 dense path (W8A8): activation quantization per token and the sm_90a GEMM, against the numpy
reference (dgemma_rt.nvfp4.quantize_fp8). The host check of the kernels' rounding needs only a build
with the CUDA sources; the kernels need a GPU, the GEMM an sm_90a one."""

import numpy as np
import pytest

import dgemma_rt
from bf16_helpers import bf16_bits, bf16_to_f32
from dgemma_rt import nvfp4

pytestmark = pytest.mark.skipif(not hasattr(dgemma_rt._core, "cuda_ops"), reason="built without the CUDA sources")
needs_gpu = pytest.mark.skipif(not hasattr(dgemma_rt._core, "cuda_ops") or dgemma_rt.cuda_device_count() == 0,
                               reason="needs a CUDA GPU")


def ops():
    return dgemma_rt._core.cuda_ops


def test_host_row_quantization_matches_numpy():
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((40, 300)) * rng.uniform(1e-4, 1e3, size=(40, 1))).astype(np.float32)
    x[0] = 0.0                        # all-zero row: scale 1, codes 0
    x[1, :5] = [-0.0, 1e-30, -1e-30, 5.0, -5.0]
    x[2] = np.float32(448.0)          # every value at the row's amax: code 0x7E
    x[3, 7] = np.nan                  # a NaN in a row: its scale NaN (the GEMM's row NaN), its codes 0
    q, s = ops().fp8_quantize_rows_host(x)
    finite = np.arange(len(x)) != 3
    ref_q, ref_s = nvfp4.quantize_fp8(x[finite])  # numpy's quantizer refuses NaN
    np.testing.assert_array_equal(s[finite], ref_s)
    np.testing.assert_array_equal(q[finite], ref_q)
    assert s[0] == 1.0 and not q[0].any() and (q[2] == 0x7E).all()
    assert np.isnan(s[3]) and not q[3].any()


@needs_gpu
def test_quantize_rows_fp8_propagates_nan():
    """A NaN anywhere in a row (first, last, in any warp) makes that row's scale NaN, and only that row's."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((6, 1000)).astype(np.float32)
    x[1, 0] = x[2, 999] = x[3, 517] = np.nan
    x[4, 255] = -np.nan
    q, s = ops().quantize_rows_fp8(bf16_bits(x))
    host_q, host_s = ops().fp8_quantize_rows_host(bf16_to_f32(bf16_bits(x)))
    assert np.isnan(s[1:5]).all() and np.isfinite(s[[0, 5]]).all()
    np.testing.assert_array_equal(s, host_s)  # NaN == NaN here
    np.testing.assert_array_equal(q, host_q)


@needs_gpu
@pytest.mark.parametrize("M,K", [(1, 16), (37, 2112), (256, 4096)])
def test_quantize_rows_fp8_matches_reference(M, K):
    rng = np.random.default_rng(M + K)
    xb = bf16_bits(rng.standard_normal((M, K)).astype(np.float32) * 3)
    q, s = ops().quantize_rows_fp8(xb)
    ref_q, ref_s = nvfp4.quantize_fp8(bf16_to_f32(xb))
    np.testing.assert_array_equal(s, ref_s)
    np.testing.assert_array_equal(q, ref_q)


needs_sm90 = pytest.mark.skipif(
    not hasattr(dgemma_rt._core, "cuda_ops") or not hasattr(dgemma_rt._core.cuda_ops, "gemm_fp8")
    or dgemma_rt.cuda_device_count() == 0 or tuple(dgemma_rt._core.cuda_ops.device_capability()) != (9, 0),
    reason="needs an sm_90 GPU and a build with CUTLASS")


@needs_sm90
@pytest.mark.parametrize("M,N,K", [(1, 8, 16), (256, 2816, 2112), (300, 4096, 2816), (77, 200, 48)])
def test_gemm_fp8_matches_reference(M, N, K):
    rng = np.random.default_rng(M + N + K)
    wq, ws = nvfp4.quantize_fp8((rng.standard_normal((N, K)) * K**-0.5).astype(np.float32))
    xq, xs = ops().quantize_rows_fp8(bf16_bits(rng.standard_normal((M, K)).astype(np.float32)))
    y = bf16_to_f32(ops().gemm_fp8(xq, xs, wq, ws)).astype(np.float64)
    xd = nvfp4.dequantize_fp8(xq, xs).astype(np.float64)
    wd = nvfp4.dequantize_fp8(wq, ws).astype(np.float64)
    ref = xd @ wd.T
    # bf16 output rounding, plus Hopper's FP8 tensor-core accumulation: products aligned to the largest
    # exponent in ~13-14 bits before CUTLASS promotes them to fp32 every 128 of K (DeepSeek-V3 3.5.2), so
    # the error scales with the sum of |products|, not with |ref|
    tol = 2.0**-8 * np.abs(ref) + 2.0**-10 * (np.abs(xd) @ np.abs(wd).T)
    assert np.all(np.abs(y - ref) <= tol), float(np.max(np.abs(y - ref) / tol))
    # That bound is ~4% of rms(ref) at K = 2816, blind to a systematic error such as a scale off by
    # 2^-7; in norm, a model of that accumulation (13 or 10 bits) stays near 2^-9.2 or 2^-8.7 of |ref|.
    rel = np.linalg.norm(y - ref) / np.linalg.norm(ref)
    assert rel <= 2.0**-8, rel


@needs_sm90
def test_gemm_fp8_small_integers_exact():
    rng = np.random.default_rng(3)
    M, N, K = 50, 64, 64
    # E4M3 codes of small integers (exact), power-of-two scales: every product and sum exact, |y| <= 2^8
    vals = np.array([-2, -1, 0, 1, 2], dtype=np.float32)
    x = rng.choice(vals, size=(M, K))
    w = rng.choice(vals, size=(N, K))
    xq, wq = nvfp4.e4m3_encode_signed(x), nvfp4.e4m3_encode_signed(w)
    xs = (2.0 ** rng.integers(-2, 3, size=M)).astype(np.float32)
    ws = (2.0 ** rng.integers(-2, 3, size=N)).astype(np.float32)
    y = bf16_to_f32(ops().gemm_fp8(xq, xs, wq, ws))
    np.testing.assert_array_equal(y, (x @ w.T) * xs[:, None] * ws[None, :])


def test_gemm_fp8_bad_shapes():
    if not hasattr(ops(), "gemm_fp8"):
        pytest.skip("built without CUTLASS")
    with pytest.raises(ValueError, match="shapes disagree"):
        ops().gemm_fp8(np.zeros((4, 32), np.uint8), np.ones(4, np.float32), np.zeros((8, 16), np.uint8),
                       np.ones(8, np.float32))
    with pytest.raises(ValueError, match="K % 16"):
        ops().gemm_fp8(np.zeros((4, 24), np.uint8), np.ones(4, np.float32), np.zeros((8, 24), np.uint8),
                       np.ones(8, np.float32))
