"""CUDA fused paged attention against a float64 numpy reference (skipped without a GPU).

The reference runs on the bf16 inputs dequantised to float64. The kernel's error is bounded by twice the
error of rounding the reference output to bf16 plus 1e-3 of the largest visible value (P is rounded to
bf16 before P V, as in FlashAttention-2). Cache slots a row must not read hold NaN, and the binding fills
the output with NaN first, so a wrong gather or a token left unwritten fails the test.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest

import dgemma_rt
from bf16_helpers import bf16_bits as to_bf16, bf16_to_f32


def from_bf16(b) -> np.ndarray:
    return bf16_to_f32(b).astype(np.float64)


pytestmark = pytest.mark.skipif(
    not hasattr(dgemma_rt._core, "cuda_ops") or dgemma_rt.cuda_device_count() == 0, reason="needs a CUDA GPU"
)

BLOCK = 16
NAN_BF16 = np.uint16(0x7FC0)


@dataclass
class Row:
    cache_len: int  # cached tokens end (exclusive); new tokens start here
    count: int  # new tokens
    cache_start: int = 0  # first visible cached position (sliding layers: cache_len - (window - 1))


@dataclass
class Case:
    q: np.ndarray  # uint16 [T, H, D]
    k_new: np.ndarray  # uint16 [T, KVH, D]
    v_new: np.ndarray
    k_cache: np.ndarray  # uint16 [blocks, BLOCK, KVH, D]
    v_cache: np.ndarray
    block_table: np.ndarray  # int32 [rows, max_blocks]
    cache_first_pos: np.ndarray  # int32 [rows]
    cache_start: np.ndarray
    cache_len: np.ndarray
    tok0: np.ndarray
    count: np.ndarray
    causal: bool
    window: int
    scale: float

    def args(self):
        return (self.q, self.k_new, self.v_new, self.k_cache, self.v_cache, self.block_table, self.cache_first_pos,
                self.cache_start, self.cache_len, self.tok0, self.count, self.causal, self.window, self.scale)


def make_case(seed, rows, head_dim, heads, kv_heads, causal=False, window=0, scale=1.0, q_std=None,
              reverse_tokens=False) -> Case:
    """Random inputs. Scores q.k have a std of about 1.5 by default (q_std = 1.5 / sqrt(head_dim))."""
    rng = np.random.default_rng(seed)
    D = head_dim
    counts = [r.count for r in rows]
    T = sum(counts)
    # Rows' tokens back to back; optionally in reverse row order, so tok0 is not a running sum over rows.
    order = list(reversed(range(len(rows)))) if reverse_tokens else list(range(len(rows)))
    tok0 = [0] * len(rows)
    t = 0
    for r in order:
        tok0[r] = t
        t += rows[r].count
    q_std = 1.5 / np.sqrt(D) if q_std is None else q_std
    q = to_bf16(rng.standard_normal((T, heads, D)) * q_std)
    k_new = to_bf16(rng.standard_normal((T, kv_heads, D)))
    v_new = to_bf16(rng.standard_normal((T, kv_heads, D)))

    # Blocks per row: from the block holding cache_start (cache_first_pos) to cache_len, handed out from a
    # shuffled pool with a few spare blocks; every slot a row must not see holds NaN.
    first = [(r.cache_start // BLOCK) * BLOCK for r in rows]
    nblk = [(r.cache_len - f + BLOCK - 1) // BLOCK if r.cache_len > r.cache_start else 0 for r, f in zip(rows, first)]
    total = sum(nblk) + 3
    perm = rng.permutation(total)
    max_blocks = max(nblk + [1])
    table = np.full((len(rows), max_blocks), -1, np.int32)
    k_cache = np.full((total, BLOCK, kv_heads, D), NAN_BF16, np.uint16)
    v_cache = np.full((total, BLOCK, kv_heads, D), NAN_BF16, np.uint16)
    used = 0
    for i, r in enumerate(rows):
        for b in range(nblk[i]):
            table[i, b] = perm[used]
            used += 1
        for pos in range(r.cache_start, r.cache_len):
            rel = pos - first[i]
            blk, off = table[i, rel // BLOCK], rel % BLOCK
            k_cache[blk, off] = to_bf16(rng.standard_normal((kv_heads, D)))
            v_cache[blk, off] = to_bf16(rng.standard_normal((kv_heads, D)))
    i32 = lambda a: np.asarray(a, dtype=np.int32)  # noqa: E731
    return Case(q, k_new, v_new, k_cache, v_cache, table, i32(first), i32([r.cache_start for r in rows]),
                i32([r.cache_len for r in rows]), i32(tok0), i32(counts), causal, window, scale)


def reference(c: Case):
    """float64 attention over the dequantised inputs; returns (out [T, H, D], max |V| over visible keys)."""
    T, H, D = c.q.shape
    KVH = c.k_new.shape[1]
    G = H // KVH
    q, kn, vn = from_bf16(c.q), from_bf16(c.k_new), from_bf16(c.v_new)
    kc, vc = from_bf16(c.k_cache), from_bf16(c.v_cache)
    out = np.zeros((T, H, D))
    vmax = 0.0
    for r in range(len(c.count)):
        n, t0 = int(c.count[r]), int(c.tok0[r])
        if n == 0:
            continue
        start, length, first = int(c.cache_start[r]), int(c.cache_len[r]), int(c.cache_first_pos[r])
        cpos = np.arange(start, length)
        blk = c.block_table[r, (cpos - first) // BLOCK]
        off = (cpos - first) % BLOCK
        K = np.concatenate([kc[blk, off], kn[t0:t0 + n]])  # [L, KVH, D]
        V = np.concatenate([vc[blk, off], vn[t0:t0 + n]])
        kpos = np.concatenate([cpos, length + np.arange(n)])
        qpos = length + np.arange(n)
        Kh, Vh = np.repeat(K, G, axis=1), np.repeat(V, G, axis=1)  # [L, H, D]: query head h reads KV head h // G
        s = np.einsum("nhd,lhd->hnl", q[t0:t0 + n], Kh) * c.scale
        vis = np.ones((n, len(kpos)), bool)
        if c.causal:
            vis = kpos[None, :] <= qpos[:, None]
            if c.window > 0:
                vis &= kpos[None, :] > qpos[:, None] - c.window
        s = np.where(vis[None], s, -np.inf)
        s -= s.max(axis=-1, keepdims=True)
        p = np.exp(s)
        p /= p.sum(axis=-1, keepdims=True)
        out[t0:t0 + n] = np.einsum("hnl,lhd->nhd", p, Vh)
        vmax = max(vmax, float(np.abs(V).max()))
    return out, vmax


def check(c: Case, got_bits: np.ndarray):
    ref, vmax = reference(c)
    assert got_bits.shape == c.q.shape and got_bits.dtype == np.uint16
    got = from_bf16(got_bits)
    err = np.max(np.abs(got - ref)) if ref.size else 0.0
    round_err = np.max(np.abs(from_bf16(to_bf16(ref)) - ref)) if ref.size else 0.0
    tol = 2 * round_err + 1e-3 * vmax
    assert err <= tol, f"max abs error {err:.3g} > tolerance {tol:.3g} (bf16 rounding of the reference {round_err:.3g})"


def run(c: Case):
    check(c, dgemma_rt._core.cuda_ops.attention(*c.args()))


# (head_dim, heads, kv_heads): GQA ratios 2 and 8 at both head sizes (few heads keeps the reference cheap).
SHAPES = [(256, 4, 2), (256, 8, 1), (512, 4, 2), (512, 8, 1)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"hd{s[0]}-h{s[1]}-kv{s[2]}")
@pytest.mark.parametrize("cache_len", [0, 1, 17, 300])
@pytest.mark.parametrize("canvas", [1, 7, 64, 256])
def test_decoder(shape, cache_len, canvas):
    D, H, KVH = shape
    c = make_case(cache_len * 1000 + canvas + D, [Row(cache_len, canvas)], D, H, KVH)
    run(c)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"hd{s[0]}-h{s[1]}-kv{s[2]}")
@pytest.mark.parametrize("cache_len,window", [(300, 100), (1040, 1024), (40, 6)])
def test_decoder_sliding_cache(shape, cache_len, window):
    """Sliding layers: the canvas sees the last window - 1 cached tokens, from inside the row's first block."""
    D, H, KVH = shape
    start = max(0, cache_len - (window - 1))
    assert start % BLOCK != 0
    c = make_case(cache_len + D, [Row(cache_len, 64, start)], D, H, KVH)
    run(c)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"hd{s[0]}-h{s[1]}-kv{s[2]}")
@pytest.mark.parametrize(
    "cache_len,count,window",
    [
        (0, 1, 0),
        (0, 37, 0),
        (0, 200, 0),
        (45, 70, 0),
        (0, 37, 5),  # prompt longer than the window
        (30, 37, 5),  # cached prefix trimmed to window - 1 tokens
        (0, 300, 128),
        (150, 200, 128),
    ],
)
def test_encoder(shape, cache_len, count, window):
    D, H, KVH = shape
    start = max(0, cache_len - (window - 1)) if window > 0 else 0
    c = make_case(cache_len * 7 + count + window + D, [Row(cache_len, count, start)], D, H, KVH, causal=True,
                  window=window)
    run(c)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"hd{s[0]}-h{s[1]}-kv{s[2]}")
@pytest.mark.parametrize("causal,window", [(False, 0), (True, 0), (True, 20)])
def test_batch_of_rows(shape, causal, window):
    """Rows with different cache lengths and token counts (one with none), tokens in reverse row order."""
    D, H, KVH = shape
    if causal and window > 0:
        rows = [Row(33, 50, 33 - (window - 1)), Row(0, 0), Row(0, 9), Row(100, 23, 100 - (window - 1))]
    elif causal:
        rows = [Row(33, 50), Row(0, 0), Row(0, 9), Row(100, 23)]
    else:
        rows = [Row(33, 50), Row(0, 0), Row(0, 9), Row(100, 23, 60)]
    c = make_case(D + 3 * causal + window, rows, D, H, KVH, causal=causal, window=window, reverse_tokens=True)
    run(c)


@pytest.mark.parametrize("head_dim,kv_heads", [(256, 8), (512, 2)])
@pytest.mark.parametrize("causal", [False, True])
def test_model_shape(head_dim, kv_heads, causal):
    """DiffusionGemma's shapes: 16 query heads over 8 KV heads (hd 256) or 2 KV heads (hd 512), two rows."""
    rows = [Row(300, 256, 17), Row(20, 256)] if not causal else [Row(0, 200), Row(64, 130)]
    c = make_case(head_dim + causal, rows, head_dim, 16, kv_heads, causal=causal, window=128 if causal else 0)
    run(c)


@pytest.mark.parametrize("head_dim", [256, 512])
def test_scale(head_dim):
    """Unscaled unit-variance q with scale = head_dim^-0.5; then large scores (peaky softmax) at scale 1."""
    run(make_case(5, [Row(40, 33)], head_dim, 4, 2, scale=head_dim ** -0.5, q_std=1.0))
    run(make_case(6, [Row(40, 33)], head_dim, 4, 2, scale=1.0, q_std=8.0 / np.sqrt(head_dim)))


def test_unsupported_head_dim():
    c = make_case(0, [Row(0, 4)], 128, 2, 1)
    with pytest.raises(Exception):
        dgemma_rt._core.cuda_ops.attention(*c.args())
