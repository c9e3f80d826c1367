"""CUDA per-layer kernels (csrc/kernels/layer) against float64 numpy ports of the CPU backend
(the CPU ops in cpu_backend.cpp, ops.cpp rmsnorm / rope). Skipped without a GPU."""

import numpy as np
import pytest

import dgemma_rt
from bf16_helpers import bf16_bits as to_bf16, bf16_to_f32 as from_bf16

pytestmark = pytest.mark.skipif(
    not hasattr(dgemma_rt._core, "cuda_ops") or dgemma_rt.cuda_device_count() == 0, reason="needs a CUDA GPU"
)

EPS = 1e-6


def ops():
    return dgemma_rt._core.cuda_ops


def rms64(x, w=None):
    x = np.asarray(x, dtype=np.float64)
    y = x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + EPS)
    return y * np.asarray(w, dtype=np.float64) if w is not None else y


def inv_freq_for(kind, head_dim):
    """csrc/model/config.cpp inv_freq_for, float32 like the reference: 'default' (theta 1e4, full head)
    or 'proportional' (theta 1e6, partial_rotary_factor 0.25: zeros after the first head_dim/8 pairs)."""
    inv = np.zeros(head_dim // 2, dtype=np.float32)
    if kind == "default":
        i = np.arange(head_dim // 2)
        inv[:] = np.float32(1.0) / np.power(np.float32(1e4), (2 * i).astype(np.float32) / np.float32(head_dim))
    else:
        angles = int(np.floor(0.25 * head_dim / 2.0))
        i = np.arange(angles)
        inv[:angles] = np.float32(1.0) / np.power(np.float32(1e6), (2 * i).astype(np.float32) / np.float32(head_dim))
    return inv


def rope64(y, positions, inv_freq):
    """ops.cpp rope on [T, heads, hd] float64; the angle is formed in float32 as the reference does."""
    half = y.shape[-1] // 2
    ang = (positions.astype(np.float32)[:, None] * inv_freq[None, :]).astype(np.float64)  # [T, half]
    cs, sn = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]
    a, b = y[..., :half], y[..., half:]
    return np.concatenate([a * cs - b * sn, b * cs + a * sn], axis=-1)


def assert_bf16_close(got_u16, ref64, what):
    """Bound: bf16 rounding of the output (half an ulp = 2^-9 relative, allowed 2^-8) plus a small
    absolute term for float32 arithmetic before the rounding."""
    got = from_bf16(got_u16).astype(np.float64)
    err = np.abs(got - ref64)
    bound = 2.0**-8 * np.abs(ref64) + 1e-4 * max(1.0, float(np.max(np.abs(ref64))))
    bad = err > bound
    assert not bad.any(), f"{what}: {bad.sum()} of {bad.size} out of bound, max err {err.max():.3g}"


# ---------------------------------------------------------------- embedding


@pytest.mark.parametrize("T", [1, 5, 256])
@pytest.mark.parametrize("H", [64, 100, 2816])
@pytest.mark.parametrize("out_bf16", [False, True])
def test_embed_tokens(T, H, out_bf16):
    rng = np.random.default_rng(T * 7919 + H)
    V = 301
    table = to_bf16(rng.standard_normal((V, H)).astype(np.float32) * 0.05)
    ids = rng.integers(0, V, size=T).astype(np.int32)
    ids[0] = V - 1
    if T > 1:
        ids[-1] = 0
    scale = float(np.float32(np.sqrt(H)))
    want = from_bf16(table)[ids] * np.float32(scale)  # float32 product, as e[c] * scale on the CPU
    got = ops().embed_tokens(table, ids, scale, out_bf16)
    if out_bf16:
        assert got.dtype == np.uint16
        np.testing.assert_array_equal(got, to_bf16(want))
    else:
        assert got.dtype == np.float32
        np.testing.assert_array_equal(got, want)


def test_embed_tokens_rejects_bad_id():
    table = to_bf16(np.ones((4, 8), np.float32))
    with pytest.raises(Exception):
        ops().embed_tokens(table, np.array([0, 4], np.int32), 1.0)


# ---------------------------------------------------------------- q/k norm + RoPE, v_norm

NORM_SHAPES = [(1, 1, 16), (5, 3, 256), (256, 2, 512), (5, 16, 256), (7, 1, 512), (256, 8, 16)]


@pytest.mark.parametrize("T,heads,hd", NORM_SHAPES)
@pytest.mark.parametrize("kind", ["default", "proportional"])
def test_qk_norm_rope(T, heads, hd, kind):
    rng = np.random.default_rng(T * 131 + heads * 17 + hd + (kind == "default"))
    x = to_bf16(rng.standard_normal((T, heads, hd)).astype(np.float32) * 4 + 0.5)
    w = (1 + 0.3 * rng.standard_normal(hd)).astype(np.float32)
    pos = rng.integers(0, 131072, size=T).astype(np.int32)
    pos[0] = 0
    if T > 2:
        pos[1] = 1
    inv = inv_freq_for(kind, hd)
    got = ops().head_norm_rope(x, w, pos, inv, EPS)
    ref = rope64(rms64(from_bf16(x), w), pos, inv)
    assert_bf16_close(got, ref, "qk_norm_rope")
    if kind == "proportional":  # pairs with inv_freq == 0 are only normalised
        n = hd // 8
        rest = np.r_[n : hd // 2, hd // 2 + n : hd]
        np.testing.assert_array_equal(
            got[..., rest], ops().head_norm_rope(x, w, None, None, EPS)[..., rest]
        )


@pytest.mark.parametrize("T,heads,hd", NORM_SHAPES + [(3, 2, 7)])
def test_v_norm(T, heads, hd):
    rng = np.random.default_rng(T * 13 + heads * 5 + hd)
    v = to_bf16(rng.standard_normal((T, heads, hd)).astype(np.float32) * 20)
    got = ops().v_norm(v, EPS)
    assert_bf16_close(got, rms64(from_bf16(v)), "v_norm")
    # Same as head_norm_rope with everything off.
    np.testing.assert_array_equal(got, ops().head_norm_rope(v, None, None, None, EPS))


@pytest.mark.parametrize("T,heads,hd", [(5, 3, 256), (1, 1, 16)])
def test_head_norm_weight_only(T, heads, hd):
    rng = np.random.default_rng(hd + T)
    x = to_bf16(rng.standard_normal((T, heads, hd)).astype(np.float32))
    w = (1 + 0.3 * rng.standard_normal(hd)).astype(np.float32)
    assert_bf16_close(ops().head_norm_rope(x, w, None, None, EPS), rms64(from_bf16(x), w), "norm")


# ---------------------------------------------------------------- KV cache write


@pytest.mark.parametrize(
    "T,kvh,hd,num_blocks,block_size",
    [(1, 1, 16, 3, 16), (5, 2, 256, 4, 16), (256, 1, 512, 20, 16), (7, 3, 10, 2, 8), (37, 2, 256, 5, 16)],
)
def test_kv_cache_write(T, kvh, hd, num_blocks, block_size):
    rng = np.random.default_rng(T + kvh * 3 + hd)
    num_slots = num_blocks * block_size
    k = rng.integers(0, 65535, size=(T, kvh, hd), dtype=np.uint16)
    v = rng.integers(0, 65535, size=(T, kvh, hd), dtype=np.uint16)
    kc = rng.integers(0, 65535, size=(num_blocks, block_size, kvh, hd), dtype=np.uint16)
    vc = rng.integers(0, 65535, size=(num_blocks, block_size, kvh, hd), dtype=np.uint16)
    slots = rng.choice(num_slots, size=T, replace=False).astype(np.int32)
    slots[2::3] = -1  # skipped tokens
    if T > 1:
        slots[1] = num_slots  # out of range: skipped, never written
    got_k, got_v = ops().kv_cache_write(k, v, kc, vc, slots)
    want_k, want_v = kc.reshape(num_slots, kvh, hd).copy(), vc.reshape(num_slots, kvh, hd).copy()
    for t, s in enumerate(slots):
        if 0 <= s < num_slots:
            want_k[s], want_v[s] = k[t], v[t]
    np.testing.assert_array_equal(got_k.reshape(num_slots, kvh, hd), want_k)
    np.testing.assert_array_equal(got_v.reshape(num_slots, kvh, hd), want_v)
    assert (slots >= 0).any()


# ---------------------------------------------------------------- residual stream


def _rows(rng, T, H, scale, as_bf16):
    a = (rng.standard_normal((T, H)) * scale).astype(np.float32)
    return (to_bf16(a), from_bf16(to_bf16(a))) if as_bf16 else (a, a)


@pytest.mark.parametrize("T", [1, 5, 256])
@pytest.mark.parametrize("H", [64, 333, 2816])
@pytest.mark.parametrize("h_bf16", [False, True])
def test_residual_norm_add(T, H, h_bf16):
    rng = np.random.default_rng(T * 3 + H + h_bf16)
    x = (rng.standard_normal((T, H)) * 10).astype(np.float32)
    h, h_vals = _rows(rng, T, H, 7.0, h_bf16)
    w = (1 + 0.2 * rng.standard_normal(H)).astype(np.float32)
    got = ops().residual_norm_add(x, h, w, EPS)
    ref = x.astype(np.float64) + rms64(h_vals, w)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("T", [1, 5, 256])
@pytest.mark.parametrize("H", [64, 333, 2816])
@pytest.mark.parametrize("dense_bf16,moe_bf16", [(False, False), (True, True), (True, False), (False, True)])
def test_ffn_combine(T, H, dense_bf16, moe_bf16):
    rng = np.random.default_rng(T * 11 + H + 2 * dense_bf16 + moe_bf16)
    x = (rng.standard_normal((T, H)) * 10).astype(np.float32)
    dense, d = _rows(rng, T, H, 50.0, dense_bf16)
    moe, m = _rows(rng, T, H, 0.3, moe_bf16)
    w1, w2, w = ((1 + 0.2 * rng.standard_normal(H)).astype(np.float32) for _ in range(3))
    scalar = 0.7
    got = ops().ffn_combine(x, dense, moe, w1, w2, w, EPS, scalar)
    ref = (x.astype(np.float64) + rms64(rms64(d, w1) + rms64(m, w2), w)) * np.float64(np.float32(scalar))
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("shape", [(1,), (5,), (3, 1001), (4, 262147)])
def test_softcap(shape):
    rng = np.random.default_rng(sum(shape))
    y = rng.uniform(-300, 300, size=shape).astype(np.float32)
    cap = 30.0
    got = ops().softcap(y, cap)
    assert got.shape == y.shape
    np.testing.assert_allclose(got, np.tanh(y.astype(np.float64) / cap) * cap, rtol=1e-6, atol=1e-5)
