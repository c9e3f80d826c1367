"""CUDA row moves (csrc/kernels/layer/rows.cu: gather_rows, scatter_rows, scatter_add_rows) against numpy.
Byte copies must be exact; scatter_add is one f32 add per element, so exact too. `shift` offsets the device
pointers to force the 4- and 2-byte copy paths. Skipped without a GPU."""

import numpy as np
import pytest

import dgemma_rt
from bf16_helpers import bf16_bits, bf16_to_f32

# The argument checks run wherever the module has CUDA compiled in (they return before touching a
# device); everything else needs a GPU.
pytestmark = pytest.mark.skipif(not hasattr(dgemma_rt._core, "cuda_ops"), reason="built without CUDA")
needs_gpu = pytest.mark.skipif(
    not hasattr(dgemma_rt._core, "cuda_ops") or dgemma_rt.cuda_device_count() == 0, reason="needs a CUDA GPU"
)


def ops():
    return dgemma_rt._core.cuda_ops


def _rows(rng, n, d, dtype):
    if dtype == np.uint16:
        return bf16_bits(rng.standard_normal((n, d)).astype(np.float32))
    return rng.standard_normal((n, d)).astype(dtype)


# d * itemsize: 2, 12 (4-byte path), 14 (2-byte path), 16, 48, 5632 bytes per row.
WIDTHS = [(1, np.uint16), (6, np.uint16), (7, np.uint16), (8, np.uint16), (24, np.uint16), (2816, np.uint16),
          (3, np.float32), (5, np.float32), (2816, np.float32)]


@needs_gpu
@pytest.mark.parametrize("d,dtype", WIDTHS)
@pytest.mark.parametrize("m,n_src", [(1, 1), (7, 13), (257, 300)])
@pytest.mark.parametrize("shift", [0, 2, 4])
def test_gather_rows(d, dtype, m, n_src, shift):
    rng = np.random.default_rng(m * 31 + d)
    src = _rows(rng, n_src, d, dtype)
    dst = _rows(rng, m, d, dtype)
    index = rng.integers(0, n_src, size=m).astype(np.int32)
    index[1::3] = -1  # rows zeroed (not [::3]: at m = 1 no row would be copied)
    got = ops().gather_rows(src, index, dst, shift=shift)
    want = np.zeros_like(dst)
    keep = index >= 0
    want[keep] = src[index[keep]]
    assert np.array_equal(got, want)


@needs_gpu
@pytest.mark.parametrize("d,dtype", WIDTHS)
@pytest.mark.parametrize("m,n_dst", [(1, 1), (7, 13), (257, 300)])
@pytest.mark.parametrize("shift", [0, 2])
def test_scatter_rows(d, dtype, m, n_dst, shift):
    rng = np.random.default_rng(m * 37 + d)
    src = _rows(rng, m, d, dtype)
    dst = _rows(rng, n_dst, d, dtype)
    index = rng.permutation(n_dst)[:m].astype(np.int32)
    index[1::4] = -1  # source rows skipped
    got = ops().scatter_rows(src, index, dst, shift=shift)
    want = dst.copy()
    keep = index >= 0
    want[index[keep]] = src[keep]
    assert np.array_equal(got, want)


@needs_gpu
@pytest.mark.parametrize("d", [1, 7, 8, 24, 2816, 2819])
@pytest.mark.parametrize("m,n_dst", [(1, 1), (7, 13), (257, 300)])
@pytest.mark.parametrize("shift", [0, 1])  # 1: one element off, so the 16-byte path is not taken
def test_scatter_add_rows(d, m, n_dst, shift):
    rng = np.random.default_rng(m * 41 + d)
    src = bf16_bits(rng.standard_normal((m, d)).astype(np.float32))
    dst = rng.standard_normal((n_dst, d)).astype(np.float32)
    index = rng.permutation(n_dst)[:m].astype(np.int32)
    index[2::5] = -1
    got = ops().scatter_add_rows(dst, src, index, shift=shift)
    want = dst.copy()
    keep = index >= 0
    want[index[keep]] += bf16_to_f32(src[keep])  # one f32 add per element, as the kernel does
    assert np.array_equal(got.view(np.uint32), want.view(np.uint32))


@pytest.mark.parametrize("op,m,size,bad", [
    ("gather", -1, 16, True), ("gather", 4, 3, True), ("gather", 4, -2, True), ("gather", 4, 16, True),
    ("gather", 0, 16, False), ("scatter", 4, 7, True), ("scatter", 0, 0, False), ("scatter", 2, 8, True),
    ("scatter_add", -1, 8, True), ("scatter_add", 3, -1, True), ("scatter_add", 3, 8, True),
    ("scatter_add", 0, 8, False),
])
def test_rows_reject_bad_sizes_and_null_pointers(op, m, size, bad):
    assert bool(ops().rows_rejects(op, m, size)) == bad
