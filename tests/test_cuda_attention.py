"""CUDA fused paged attention against a float64 numpy reference (skipped without a GPU).

The reference runs on the bf16 inputs dequantised to float64. The kernel's error is bounded by twice the
error of rounding the reference output to bf16 plus 1e-3 of the largest visible value (P is rounded to
bf16 before P V, as in FlashAttention-2). Cache slots a row must not read hold NaN, and the binding fills
the output and the split-KV workspace with NaN first, so a wrong gather, a token left unwritten or a
partial the combine reads but no CTA wrote fails the test. On an H100/H200 built with CUTLASS the sm90
(wgmma) kernel runs, elsewhere the mma.sync one; both go through the split-KV paths below, and where the
wgmma kernel runs every case runs on the mma.sync one too (it ships for Blackwell and builds without
CUTLASS, so a Hopper run is its check as well).
"""

from __future__ import annotations

import numpy as np
import pytest

import dgemma_rt
from attention_cases import Row, check, make_case, reference

pytestmark = pytest.mark.skipif(
    not hasattr(dgemma_rt._core, "cuda_ops") or dgemma_rt.cuda_device_count() == 0, reason="needs a CUDA GPU"
)

BLOCK = 16


def kernels():
    """The attention kernels this device runs: the default, plus the mma.sync one where wgmma is the default."""
    sm90 = dgemma_rt._core.cuda_ops.attention_launch_plan(1, 256, 2, 1, 64, 0)["sm90"]
    return ["auto", "mma"] if sm90 else ["auto"]


def run(c, splits=0):
    ref = reference(c)  # once: at the real shapes the float64 reference costs more than the kernels
    for kernel in kernels():
        check(c, dgemma_rt._core.cuda_ops.attention(*c.args(), splits=splits, kernel=kernel), ref=ref)


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


def plan(c, splits=0):
    T, H, D = c.q.shape
    max_cached = int(max([0] + [int(l - s) for l, s in zip(c.cache_len, c.cache_start)]))
    return dgemma_rt._core.cuda_ops.attention_launch_plan(len(c.count), D, H, c.k_new.shape[1], int(c.count.max()),
                                                         max_cached, splits, BLOCK)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"hd{s[0]}-h{s[1]}-kv{s[2]}")
@pytest.mark.parametrize("splits", [1, 2, 3, 16])
@pytest.mark.parametrize("causal,window", [(False, 0), (True, 0), (True, 20)])
def test_split_kv(shape, splits, causal, window):
    """Forced split counts, including more parts than some CTAs have tiles (empty parts), on ragged rows."""
    D, H, KVH = shape
    if causal and window > 0:
        rows = [Row(133, 50, 133 - (window - 1)), Row(0, 0), Row(0, 9), Row(300, 23, 300 - (window - 1))]
    else:
        rows = [Row(133, 50), Row(0, 0), Row(0, 9), Row(300, 23, 60 if not causal else 0)]
    c = make_case(D + splits + 3 * causal + window, rows, D, H, KVH, causal=causal, window=window,
                  reverse_tokens=True)
    assert plan(c, splits)["splits"] == splits
    run(c, splits)


# The real shapes: 16 query heads, a 256-token canvas, the cached contexts that matter (sliding layers see at
# most window - 1 = 1023 cached keys).
@pytest.mark.parametrize("head_dim,kv_heads", [(256, 8), (512, 2)], ids=["hd256-kv8", "hd512-kv2"])
@pytest.mark.parametrize("context", [0, 1, 1023, 1024, 5000])
@pytest.mark.parametrize("splits", [1, 0])
def test_real_shapes(head_dim, kv_heads, context, splits):
    start = max(0, context - 1023) if head_dim == 256 else 0
    c = make_case(context + head_dim + splits, [Row(context, 256, start)], head_dim, 16, kv_heads)
    if splits == 0 and dgemma_rt._core.cuda_ops.attention_launch_plan(1, head_dim, 16, kv_heads, 256, 1, 0)["sm90"]:
        # Batch 1 leaves SMs idle on an H100/H200: the automatic choice splits (attention_plan::choose_splits).
        assert plan(c)["splits"] > 1
    run(c, splits)


@pytest.mark.parametrize("head_dim,kv_heads", [(256, 8), (512, 2)], ids=["hd256-kv8", "hd512-kv2"])
@pytest.mark.parametrize("splits", [1, 4])
def test_bitwise_deterministic(head_dim, kv_heads, splits):
    """Two runs of the same call give the same bits: fixed tiles, fixed split boundaries, fixed-order combine."""
    c = make_case(11, [Row(2000 if head_dim == 512 else 1023, 256, 0), Row(77, 100)], head_dim, 16, kv_heads)
    a = dgemma_rt._core.cuda_ops.attention(*c.args(), splits=splits)
    b = dgemma_rt._core.cuda_ops.attention(*c.args(), splits=splits)
    assert np.array_equal(a, b)
    check(c, a)


@pytest.mark.parametrize("block", [1, 8, 64, 256])
def test_block_sizes(block):
    """Any power-of-two block size: slots come from shifts, tiles span several blocks or share one."""
    c = make_case(block, [Row(300, 40, 17), Row(90, 7)], 256, 4, 2, block=block)
    run(c)
    c = make_case(block + 1, [Row(200, 80, 200 - 39)], 512, 8, 1, causal=True, window=40, block=block)
    run(c, 3)


def test_block_size_must_be_a_power_of_two():
    c = make_case(0, [Row(30, 4)], 256, 2, 1, block=12)
    with pytest.raises(Exception, match="power of two"):
        dgemma_rt._core.cuda_ops.attention(*c.args())
