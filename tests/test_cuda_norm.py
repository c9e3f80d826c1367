"""CUDA RMSNorm against numpy (skipped without a GPU)."""

import numpy as np
import pytest

import dgemma_rt

pytestmark = pytest.mark.skipif(
    not hasattr(dgemma_rt._core, "cuda_ops") or dgemma_rt.cuda_device_count() == 0, reason="needs a CUDA GPU"
)


def rmsnorm_ref(x, w, eps):
    x64 = x.astype(np.float64)
    y = x64 / np.sqrt(np.mean(x64 * x64, axis=-1, keepdims=True) + eps)
    return y * w if w is not None else y


@pytest.mark.parametrize("rows,dim", [(1, 1), (3, 7), (17, 256), (5, 2816), (2, 4099)])
@pytest.mark.parametrize("with_weight", [True, False])
def test_rmsnorm_f32(rows, dim, with_weight):
    rng = np.random.default_rng(rows * 1000 + dim)
    x = rng.standard_normal((rows, dim)).astype(np.float32) * 3
    w = (1 + 0.2 * rng.standard_normal(dim)).astype(np.float32) if with_weight else None
    got = dgemma_rt._core.cuda_ops.rmsnorm_f32(x, w, 1e-6)
    np.testing.assert_allclose(got, rmsnorm_ref(x, w, 1e-6), rtol=2e-5, atol=2e-6)
