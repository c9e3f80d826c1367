"""CUDA BF16 GEMM (csrc/kernels/matmul: matmul_bf16) against float64 numpy. Skipped without a GPU.

Bounds (STYLE.md): with small-integer inputs every product and partial sum is exact in the fp32
accumulator, so f32 outputs must equal the reference and bf16 outputs its round-to-nearest-even. With
random inputs the fp32 accumulation error is bounded relative to |x| @ |w| (2^-16: a few hundred f32
ulps, loose for any summation order), plus half a bf16 ulp (allowed 2^-8 relative) for bf16 outputs and
a few f32 ulps of tanhf with the softcap."""

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


def _bf16(a):
    b = bf16_bits(np.asarray(a, dtype=np.float32))
    return b, bf16_to_f32(b).astype(np.float64)


def _reference(x64, w64, w_kn, alpha, softcap, offsets=None):
    """float64 y and |x| @ |w| (the accumulation error scale); w64 grouped [G, N, K] with offsets."""
    if offsets is not None:
        M, N = x64.shape[0], w64.shape[1]
        y, mag = np.zeros((M, N)), np.zeros((M, N))
        for g in range(len(offsets) - 1):
            a, b = offsets[g], offsets[g + 1]
            y[a:b] = x64[a:b] @ w64[g].T
            mag[a:b] = np.abs(x64[a:b]) @ np.abs(w64[g]).T
    else:
        wt = w64 if w_kn else w64.T
        y, mag = x64 @ wt, np.abs(x64) @ np.abs(wt)
    y, mag = alpha * y, abs(alpha) * mag
    if softcap > 0:
        y = softcap * np.tanh(y / softcap)
    return y, mag


def _check(got, y_f32, ref, mag, softcap, what="", rel=2.0**-16):
    got = got.astype(np.float64) if y_f32 else bf16_to_f32(got).astype(np.float64)
    bound = rel * mag + 1e-30
    if softcap > 0:
        bound += 4 * 2.0**-24 * softcap
    if not y_f32:
        bound += 2.0**-8 * np.abs(ref)
    err = np.abs(got - ref)
    bad = ~(err <= bound)
    assert not bad.any(), f"{what}: {bad.sum()} of {bad.size} out of bound, max err {err.max():.3g}"


def _random(rng, M, N, K, w_kn, G=0):
    x, x64 = _bf16(rng.standard_normal((M, K)))
    shape = (G, N, K) if G else ((K, N) if w_kn else (N, K))
    w, w64 = _bf16(rng.standard_normal(shape) / np.sqrt(max(K, 1)))
    return x, x64, w, w64


M_SIZES = [1, 7, 33, 256]
NK_SIZES = [(1, 1), (8, 16), (13, 29), (131, 263), (200, 296), (128, 1000)]


@needs_gpu
@pytest.mark.parametrize("M", M_SIZES)
@pytest.mark.parametrize("N,K", NK_SIZES)
@pytest.mark.parametrize("w_kn", [False, True], ids=["TN", "NN"])
@pytest.mark.parametrize("y_f32", [True, False], ids=["f32", "bf16"])
def test_matmul_random(M, N, K, w_kn, y_f32):
    rng = np.random.default_rng(M * 1_000_003 + N * 1009 + K)
    x, x64, w, w64 = _random(rng, M, N, K, w_kn)
    got = ops().matmul_bf16(x, w, w_kn=w_kn, y_f32=y_f32)
    assert got.shape == (M, N) and got.dtype == (np.float32 if y_f32 else np.uint16)
    ref, mag = _reference(x64, w64, w_kn, 1.0, 0.0)
    _check(got, y_f32, ref, mag, 0.0, f"M={M} N={N} K={K} w_kn={w_kn}")


@needs_gpu
@pytest.mark.parametrize("M,N,K", [(1, 1, 1), (7, 13, 29), (33, 131, 263), (256, 136, 512), (5, 40, 4099)])
@pytest.mark.parametrize("w_kn", [False, True], ids=["TN", "NN"])
@pytest.mark.parametrize("split_k", [1, 3, 8])
def test_matmul_small_integers_exact(M, N, K, w_kn, split_k):
    """Integers in [-3, 3]: |sums| < 2^24, so every mode (split-K included) must be exact."""
    rng = np.random.default_rng(M + N + K + split_k)
    x = rng.integers(-3, 4, size=(M, K)).astype(np.float32)
    w = rng.integers(-3, 4, size=(K, N) if w_kn else (N, K)).astype(np.float32)
    ref = x.astype(np.float64) @ (w if w_kn else w.T).astype(np.float64)
    got = ops().matmul_bf16(bf16_bits(x), bf16_bits(w), w_kn=w_kn, y_f32=True, split_k=split_k)
    assert np.array_equal(got, ref.astype(np.float32))
    got = ops().matmul_bf16(bf16_bits(x), bf16_bits(w), w_kn=w_kn, y_f32=False, split_k=split_k)
    assert np.array_equal(got, bf16_bits(ref.astype(np.float32)))


@needs_gpu
@pytest.mark.parametrize("M,N,K", [(1, 96, 8192), (7, 131, 4099), (33, 200, 2048), (256, 64, 3000)])
@pytest.mark.parametrize("w_kn", [False, True], ids=["TN", "NN"])
@pytest.mark.parametrize("split_k", [1, 3, 8])
@pytest.mark.parametrize("softcap", [0.0, 3.0])
@pytest.mark.parametrize("y_f32", [True, False], ids=["f32", "bf16"])
def test_matmul_split_k_softcap(M, N, K, w_kn, split_k, softcap, y_f32):
    rng = np.random.default_rng(M * 7 + N * 11 + K * 13 + split_k)
    x, x64, w, w64 = _random(rng, M, N, K, w_kn)
    alpha = 0.75
    got = ops().matmul_bf16(x, w, w_kn=w_kn, y_f32=y_f32, alpha=alpha, softcap=softcap, split_k=split_k)
    ref, mag = _reference(x64, w64, w_kn, alpha, softcap)
    _check(got, y_f32, ref, mag, softcap, f"split_k={split_k}")


@needs_gpu
def test_matmul_self_conditioning_shape():
    """softmax @ E: K = a vocabulary (here 65536), E [K, N] ("NN"), split-K from the picker or 8.

    The bound is 2^-13 of |x| @ |w| rather than 2^-16: tensor cores add into the f32 accumulator with
    truncation (published measurements of mma on Volta to Hopper), so the error grows with the K of each
    split, and a desk emulation with round-toward-zero accumulation reached 0.92 of 2^-16 at split 8 (5.9x
    at split 1). A lost or doubled split part still shows: on this data each one puts at least 87% of the
    outputs outside the bound, the worst of them at least 36x (split 64) or 1900x (split 8) outside."""
    M, N, K = 4, 96, 65536
    rng = np.random.default_rng(5)
    logits = rng.standard_normal((M, K)) * 4
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    x, x64 = _bf16(p / p.sum(axis=1, keepdims=True))
    w, w64 = _bf16(rng.standard_normal((K, N)))
    ref, mag = _reference(x64, w64, True, 1.0, 0.0)
    for split_k in {max(1, ops().matmul_pick_split_k(M, N, K)), 8}:
        got = ops().matmul_bf16(x, w, w_kn=True, y_f32=True, split_k=split_k)
        _check(got, True, ref, mag, 0.0, f"split_k={split_k}", rel=2.0**-13)


@needs_gpu
def test_matmul_lm_head_softcap():
    """Logits: f32 out, final softcap 30, N not a multiple of the 128-column tile."""
    M, N, K = 33, 1000, 256
    rng = np.random.default_rng(6)
    x, x64, w, w64 = _random(rng, M, N, K, False)
    x, x64 = _bf16(x64 * 40)  # large logits, so the softcap bends them
    got = ops().matmul_bf16(x, w, y_f32=True, softcap=30.0)
    ref, mag = _reference(x64, w64, False, 1.0, 30.0)
    _check(got, True, ref, mag, 30.0)


@needs_gpu
@pytest.mark.parametrize("offsets", [
    [0, 0, 5, 5, 40, 41, 41],          # empty groups first, between and last; small tiles (M <= 32 G)
    [0, 300],                          # one group
    [0, 130, 130, 257, 300],           # rows crossing 128-row tiles; large tiles
    [0, 0, 0, 1],
], ids=["empty-groups", "one-group", "tile-crossing", "leading-empty"])
@pytest.mark.parametrize("N,K", [(24, 64), (131, 263)])
@pytest.mark.parametrize("y_f32", [True, False], ids=["f32", "bf16"])
def test_matmul_grouped(offsets, N, K, y_f32):
    G, M = len(offsets) - 1, offsets[-1]
    rng = np.random.default_rng(G * 100 + M + N + K)
    x, x64, w, w64 = _random(rng, M, N, K, False, G=G)
    off = np.asarray(offsets, dtype=np.int32)
    got = ops().matmul_bf16(x, w, y_f32=y_f32, softcap=2.0, offsets=off)
    ref, mag = _reference(x64, w64, False, 1.0, 2.0, offsets=offsets)
    _check(got, y_f32, ref, mag, 2.0, f"offsets={offsets}")


@needs_gpu
def test_matmul_grouped_many_groups():
    """More groups than the lookup scans in one pass (256 threads), most of them empty."""
    G, N, K = 1000, 16, 40
    rng = np.random.default_rng(9)
    counts = np.where(rng.random(G) < 0.1, rng.integers(1, 40, size=G), 0)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
    M = int(offsets[-1])
    x, x64, w, w64 = _random(rng, M, N, K, False, G=G)
    got = ops().matmul_bf16(x, w, y_f32=True, offsets=offsets)
    ref, mag = _reference(x64, w64, False, 1.0, 0.0, offsets=list(offsets))
    _check(got, True, ref, mag, 0.0)


@needs_gpu
def test_matmul_deterministic():
    rng = np.random.default_rng(10)
    x, _, w, _ = _random(rng, 33, 200, 5000, True)
    a = ops().matmul_bf16(x, w, w_kn=True, y_f32=True, split_k=8)
    b = ops().matmul_bf16(x, w, w_kn=True, y_f32=True, split_k=8)
    assert np.array_equal(a.view(np.uint32), b.view(np.uint32))


@needs_gpu
def test_matmul_pick_split_k():
    # Output tiles that fill the device, or a short K: no split.
    assert ops().matmul_pick_split_k(4096, 4096, 4096) == 1
    assert ops().matmul_pick_split_k(4, 96, 512) == 1
    s = ops().matmul_pick_split_k(4, 2816, 262144)
    assert 1 < s <= 64


def test_matmul_workspace_bytes():  # host arithmetic: runs without a GPU
    assert ops().matmul_workspace_bytes(4, 2816, 12) == 12 * 4 * 2816 * 4
    assert ops().matmul_workspace_bytes(4, 2816, 1) == 0
    assert ops().matmul_workspace_bytes(0, 2816, 8) == 0


@needs_gpu
@pytest.mark.parametrize("kw,bad", [
    (dict(M=4, N=8, K=8), False),
    (dict(M=0, N=8, K=8, null_x=True), False),       # empty: a no-op
    (dict(M=-1, N=8, K=8), True),
    (dict(M=4, N=8, K=-8), True),
    (dict(M=4, N=8, K=8, null_x=True), True),
    (dict(M=4, N=8, K=8, split_k=0), True),
    (dict(M=4, N=8, K=8, split_k=300), True),
    (dict(M=4, N=8, K=8, split_k=2), True),           # no workspace
    (dict(M=4, N=8, K=8, split_k=2, workspace_bytes=255), True),
    (dict(M=4, N=8, K=8, split_k=2, workspace_bytes=256), False),
    (dict(M=4, N=8, K=8, G=2, w_kn=True), True),
    (dict(M=4, N=8, K=8, G=2, split_k=2, workspace_bytes=256), True),
    (dict(M=4, N=8, K=8, G=4097), True),
    (dict(M=4, N=8, K=8, G=2), False),
])
def test_matmul_rejects_bad_params(kw, bad):
    assert ops().matmul_bf16_rejects(**kw) == bad
