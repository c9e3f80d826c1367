"""CUTLASS bf16 GEMMs (dense and grouped) against numpy (skipped without an sm_90 GPU).

Inputs are bf16 (uint16 bit patterns); the reference multiplies the same bf16 values in float64.
Two kinds of check: small-integer inputs, where the fp32 accumulator is exact and the bf16 output must
equal the correctly rounded product bit for bit (CUTLASS example 75 style), and random inputs, where
each output may differ from the exact product by its bf16 rounding plus a tiny accumulation term.
"""

import numpy as np
import pytest

import dgemma_rt
from bf16_helpers import bf16_bits, bf16_to_f32


def _ops():
    return getattr(dgemma_rt._core, "cuda_ops", None)


def _sm90():
    ops = _ops()
    if ops is None or dgemma_rt.cuda_device_count() == 0 or not hasattr(ops, "gemm_bf16_tn"):
        return False
    return tuple(ops.device_capability()) == (9, 0)


pytestmark = [
    pytest.mark.skipif(
        not hasattr(dgemma_rt._core, "cuda_ops") or dgemma_rt.cuda_device_count() == 0, reason="needs a CUDA GPU"
    ),
    pytest.mark.skipif(not _sm90(), reason="needs an sm_90 GPU and the CUTLASS GEMMs"),
]


def check_random(got_bits, ref, abs_ref):
    """|got - ref| <= half a bf16 ulp of ref (2^-8 |ref|) plus fp32 accumulation error."""
    got = bf16_to_f32(got_bits).astype(np.float64)
    bound = 2.0**-8 * np.abs(ref) * (1 + 1e-3) + 1e-5 * abs_ref + 1e-30
    bad = np.abs(got - ref) > bound
    assert not bad.any(), f"{bad.sum()} of {bad.size} outside the bound; worst {np.max(np.abs(got - ref) - bound)}"
    # And the bulk of the error must look like rounding, not like a systematic bias.
    rel = np.linalg.norm(got - ref) / max(np.linalg.norm(ref), 1e-30)
    assert rel < 5e-3, rel


SHAPES_NK = [(1408, 2816), (2816, 704), (8, 8), (24, 40), (136, 72)]
MS = [1, 3, 64, 129, 256]


@pytest.mark.parametrize("n,k", SHAPES_NK)
@pytest.mark.parametrize("m", MS)
def test_gemm_exact_small_integers(m, n, k):
    rng = np.random.default_rng(m * 7919 + n * 31 + k)
    x = rng.integers(-3, 4, size=(m, k)).astype(np.float32)
    w = rng.integers(-3, 4, size=(n, k)).astype(np.float32)
    got = _ops().gemm_bf16_tn(bf16_bits(x), bf16_bits(w))
    assert got.shape == (m, n) and got.dtype == np.uint16
    want = x.astype(np.float64) @ w.astype(np.float64).T  # integers below 2^24: exact in fp32 too
    np.testing.assert_array_equal(got, bf16_bits(want.astype(np.float32)))


@pytest.mark.parametrize("n,k", SHAPES_NK)
@pytest.mark.parametrize("m", MS)
def test_gemm_random(m, n, k):
    rng = np.random.default_rng(m * 104729 + n * 17 + k)
    xb = bf16_bits(rng.standard_normal((m, k)).astype(np.float32))
    wb = bf16_bits((rng.standard_normal((n, k)) / np.sqrt(k)).astype(np.float32))
    x, w = bf16_to_f32(xb).astype(np.float64), bf16_to_f32(wb).astype(np.float64)
    got = _ops().gemm_bf16_tn(xb, wb)
    check_random(got, x @ w.T, np.abs(x) @ np.abs(w).T)


@pytest.mark.parametrize("m,n,k", [(1, 8, 8), (129, 136, 72), (256, 2816, 704)])
def test_gemm_from_prepared_params(m, n, k):
    """A second launch with the same pointers and sizes runs from the cached Params (no TMA re-encode)
    and writes the same product as a freshly prepared one (the binding zeroes y between the two)."""
    rng = np.random.default_rng(m + n + k)
    x = rng.integers(-3, 4, size=(m, k)).astype(np.float32)
    w = rng.integers(-3, 4, size=(n, k)).astype(np.float32)
    got = _ops().gemm_bf16_tn(bf16_bits(x), bf16_bits(w), cached=True)
    np.testing.assert_array_equal(got, bf16_bits((x.astype(np.float64) @ w.astype(np.float64).T).astype(np.float32)))


def test_gemm_rejects_misaligned():
    x = np.zeros((4, 12), np.uint16)
    with pytest.raises(ValueError, match="multiples of 8"):
        _ops().gemm_bf16_tn(x, np.zeros((16, 12), np.uint16))
    with pytest.raises(ValueError, match="multiples of 8"):
        _ops().gemm_bf16_tn(np.zeros((4, 16), np.uint16), np.zeros((12, 16), np.uint16))


# ---- the LM head's logits GEMM (f32 out, softcap epilogue)

def finish_ref(acc, alpha, softcap):
    """kernels/matmul finish() in float64: v * alpha, then softcap * tanh(v / softcap)."""
    v = acc * alpha
    return softcap * np.tanh(v / softcap) if softcap > 0 else v


@pytest.mark.parametrize("m,n,k", [(1, 8, 8), (3, 136, 72), (256, 2048, 2816), (129, 264, 40)])
def test_logits_exact_small_integers(m, n, k):
    """No softcap, alpha 1: integer products are exact in the fp32 accumulator and in the f32 output."""
    rng = np.random.default_rng(m * 13 + n + k)
    x = rng.integers(-3, 4, size=(m, k)).astype(np.float32)
    w = rng.integers(-3, 4, size=(n, k)).astype(np.float32)
    got = _ops().gemm_bf16_tn_logits(bf16_bits(x), bf16_bits(w))
    assert got.shape == (m, n) and got.dtype == np.float32
    np.testing.assert_array_equal(got, (x.astype(np.float64) @ w.astype(np.float64).T).astype(np.float32))


@pytest.mark.parametrize("alpha,softcap", [(1.0, 30.0), (0.5, 0.0), (1.0, 0.25)])
@pytest.mark.parametrize("cached", [False, True])
def test_logits_softcap_against_numpy_and_matmul(alpha, softcap, cached):
    """Random bf16 inputs at a canvas-like shape: within fp32 accumulation and tanhf error of the float64
    reference, and close to the mma.sync matmul's logits (the kernel it replaces in the LM head)."""
    rng = np.random.default_rng(int(softcap * 4) + int(alpha * 8) + cached)
    m, n, k = 256, 1024, 2816
    xb = bf16_bits(rng.standard_normal((m, k)).astype(np.float32))
    wb = bf16_bits((rng.standard_normal((n, k)) * 2 / np.sqrt(k)).astype(np.float32))
    x, w = bf16_to_f32(xb).astype(np.float64), bf16_to_f32(wb).astype(np.float64)
    got = _ops().gemm_bf16_tn_logits(xb, wb, alpha=alpha, softcap=softcap, cached=cached).astype(np.float64)
    ref = finish_ref(x @ w.T, alpha, softcap)
    scale = finish_ref(np.abs(x) @ np.abs(w).T, abs(alpha), 0.0)
    assert np.all(np.abs(got - ref) <= 1e-5 * scale + 4e-6 * np.abs(ref) + 1e-6)
    if hasattr(_ops(), "matmul_bf16"):
        mm = np.asarray(_ops().matmul_bf16(xb, wb, alpha=alpha, softcap=softcap, y_f32=True), np.float64)
        assert np.all(np.abs(got - mm) <= 2e-5 * scale + 8e-6 * np.abs(ref) + 2e-6)


def test_logits_rejects_bad_arguments():
    with pytest.raises(ValueError, match="softcap"):
        _ops().gemm_bf16_tn_logits(np.zeros((4, 16), np.uint16), np.zeros((8, 16), np.uint16), softcap=-1.0)
    with pytest.raises(ValueError, match="multiples of 8"):
        _ops().gemm_bf16_tn_logits(np.zeros((4, 12), np.uint16), np.zeros((8, 12), np.uint16))


def grouped_ref(a, w, offsets):
    out = np.zeros((a.shape[0], w.shape[1]))
    for g in range(w.shape[0]):
        lo, hi = offsets[g], offsets[g + 1]
        out[lo:hi] = a[lo:hi] @ w[g].T
    return out


def offsets_from_counts(counts):
    return np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)


def group_counts(kind, g, rng):
    if kind == "random":
        return rng.integers(0, 40, size=g)
    if kind == "some_empty":
        c = rng.integers(0, 20, size=g)
        c[::3] = 0
        return c
    if kind == "one_token":
        c = np.zeros(g, np.int64)
        c[g // 2] = 1
        return c
    if kind == "all_on_one":
        c = np.zeros(g, np.int64)
        c[g - 1] = 300  # several 32-row tiles in one group, all others empty
        return c
    if kind == "moe_step":  # 256 tokens x top-8 over the experts
        return np.bincount(rng.integers(0, g, size=256 * 8), minlength=g)
    raise ValueError(kind)


GROUPED_CASES = [
    # (kind, G, N, K)
    ("random", 7, 24, 40),
    ("some_empty", 9, 136, 72),
    ("one_token", 5, 64, 16),
    ("all_on_one", 4, 40, 24),
    ("random", 8, 1408, 2816),
    ("moe_step", 32, 2816, 704),
    ("some_empty", 128, 1408, 256),
]


@pytest.mark.parametrize("kind,g,n,k", GROUPED_CASES)
def test_grouped_exact_small_integers(kind, g, n, k):
    rng = np.random.default_rng(g * 1000 + n + k)
    offsets = offsets_from_counts(group_counts(kind, g, rng))
    mtot = int(offsets[-1])
    a = rng.integers(-3, 4, size=(mtot, k)).astype(np.float32)
    w = rng.integers(-3, 4, size=(g, n, k)).astype(np.float32)
    got = _ops().grouped_gemm_bf16_tn(bf16_bits(a), bf16_bits(w), offsets)
    assert got.shape == (mtot, n) and got.dtype == np.uint16
    np.testing.assert_array_equal(got, bf16_bits(grouped_ref(a, w, offsets).astype(np.float32)))


@pytest.mark.parametrize("kind,g,n,k", [("some_empty", 9, 136, 72), ("moe_step", 32, 2816, 704)])
def test_grouped_from_prepared_params(kind, g, n, k):
    """As test_gemm_from_prepared_params, for the grouped GEMM: the setup kernel still runs per call."""
    rng = np.random.default_rng(g + n + k)
    offsets = offsets_from_counts(group_counts(kind, g, rng))
    mtot = int(offsets[-1])
    a = rng.integers(-3, 4, size=(mtot, k)).astype(np.float32)
    w = rng.integers(-3, 4, size=(g, n, k)).astype(np.float32)
    got = _ops().grouped_gemm_bf16_tn(bf16_bits(a), bf16_bits(w), offsets, cached=True)
    np.testing.assert_array_equal(got, bf16_bits(grouped_ref(a, w, offsets).astype(np.float32)))


@pytest.mark.parametrize("kind,g,n,k", GROUPED_CASES)
def test_grouped_random(kind, g, n, k):
    rng = np.random.default_rng(g * 7 + n * 3 + k)
    offsets = offsets_from_counts(group_counts(kind, g, rng))
    mtot = int(offsets[-1])
    ab = bf16_bits(rng.standard_normal((mtot, k)).astype(np.float32))
    wb = bf16_bits((rng.standard_normal((g, n, k)) / np.sqrt(k)).astype(np.float32))
    a, w = bf16_to_f32(ab).astype(np.float64), bf16_to_f32(wb).astype(np.float64)
    got = _ops().grouped_gemm_bf16_tn(ab, wb, offsets)
    check_random(got, grouped_ref(a, w, offsets), grouped_ref(np.abs(a), np.abs(w), offsets))


def test_grouped_all_empty():
    w = np.ones((3, 16, 8), np.uint16)
    got = _ops().grouped_gemm_bf16_tn(np.zeros((0, 8), np.uint16), w, np.zeros(4, np.int32))
    assert got.shape == (0, 16)


def test_grouped_repeatable():
    """Same inputs, same bits (no split-K or atomics)."""
    rng = np.random.default_rng(5)
    offsets = offsets_from_counts(group_counts("moe_step", 16, rng))
    ab = bf16_bits(rng.standard_normal((int(offsets[-1]), 256)).astype(np.float32))
    wb = bf16_bits(rng.standard_normal((16, 64, 256)).astype(np.float32))
    first = _ops().grouped_gemm_bf16_tn(ab, wb, offsets)
    np.testing.assert_array_equal(first, _ops().grouped_gemm_bf16_tn(ab, wb, offsets))
