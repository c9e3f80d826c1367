"""CUDA RMSNorm against numpy (skipped without a GPU)."""

import numpy as np
import pytest

import dgemma_rt

# The argument checks run wherever the module has CUDA compiled in (they return before touching a
# device); everything else needs a GPU.
pytestmark = pytest.mark.skipif(not hasattr(dgemma_rt._core, "cuda_ops"), reason="built without CUDA")
needs_gpu = pytest.mark.skipif(
    not hasattr(dgemma_rt._core, "cuda_ops") or dgemma_rt.cuda_device_count() == 0, reason="needs a CUDA GPU"
)


def rmsnorm_ref(x, w, eps):
    x64 = x.astype(np.float64)
    y = x64 / np.sqrt(np.mean(x64 * x64, axis=-1, keepdims=True) + eps)
    return y * w if w is not None else y


@needs_gpu
@pytest.mark.parametrize("rows,dim", [(1, 1), (3, 7), (17, 256), (5, 2816), (2, 4099)])
@pytest.mark.parametrize("with_weight", [True, False])
def test_rmsnorm_f32(rows, dim, with_weight):
    rng = np.random.default_rng(rows * 1000 + dim)
    x = rng.standard_normal((rows, dim)).astype(np.float32) * 3
    w = (1 + 0.2 * rng.standard_normal(dim)).astype(np.float32) if with_weight else None
    got = dgemma_rt._core.cuda_ops.rmsnorm_f32(x, w, 1e-6)
    np.testing.assert_allclose(got, rmsnorm_ref(x, w, 1e-6), rtol=2e-5, atol=2e-6)


# ---------------------------------------------------------------- rmsnorm_mixed (f32 weights, mixed dtypes)

from bf16_helpers import bf16_bits, bf16_to_f32  # noqa: E402


def _mixed_inputs(rows, dim, in_bf16, with_weight):
    rng = np.random.default_rng(rows * 7919 + dim)
    x = (rng.standard_normal((rows, dim)) * 3).astype(np.float32)
    w = (1 + 0.2 * rng.standard_normal(dim)).astype(np.float32) if with_weight else None
    if in_bf16:
        xb = bf16_bits(x)
        return xb, bf16_to_f32(xb), w
    return x, x, w


@needs_gpu
@pytest.mark.parametrize("rows,dim", [(1, 1), (3, 7), (17, 256), (5, 2816), (2, 4099), (300, 33)])
@pytest.mark.parametrize("in_bf16,out_bf16", [(False, False), (False, True), (True, False), (True, True)])
@pytest.mark.parametrize("with_weight", [True, False])
def test_rmsnorm_mixed(rows, dim, in_bf16, out_bf16, with_weight):
    x, xf, w = _mixed_inputs(rows, dim, in_bf16, with_weight)
    ref = rmsnorm_ref(xf, w, 1e-6)
    for in_place in ([False, True] if in_bf16 == out_bf16 else [False]):
        got = dgemma_rt._core.cuda_ops.rmsnorm_mixed(x, w, 1e-6, out_bf16=out_bf16, in_place=in_place)
        if out_bf16:
            # One bf16 rounding (half an ulp: 2^-9 relative, allowed 2^-8) over f32 statistics.
            got = bf16_to_f32(got).astype(np.float64)
            assert np.all(np.abs(got - ref) <= 2.0**-8 * np.abs(ref) + 1e-6), (rows, dim, in_place)
        else:
            # The f32 tree sum and rsqrtf: a few f32 ulps.
            np.testing.assert_allclose(got, ref, rtol=2e-5, atol=2e-6)


@needs_gpu
def test_rmsnorm_mixed_deterministic():
    x, _, w = _mixed_inputs(64, 2816, True, True)
    a = dgemma_rt._core.cuda_ops.rmsnorm_mixed(x, w, 1e-6, out_bf16=False)
    b = dgemma_rt._core.cuda_ops.rmsnorm_mixed(x, w, 1e-6, out_bf16=False)
    assert np.array_equal(a.view(np.uint32), b.view(np.uint32))


@pytest.mark.parametrize("rows,dim,bad", [(-1, 8, True), (4, 0, True), (4, -3, True), (0, 8, False)])
def test_rmsnorm_mixed_rejects_bad_sizes(rows, dim, bad):
    # Null pointers throughout: rows == 0 is a no-op that touches nothing, the rest fail validation.
    assert bool(dgemma_rt._core.cuda_ops.rmsnorm_mixed_rejects(rows, dim)) == bad
