"""The attention kernels' index math, checked on the CPU (no GPU needed).

kernels/attention/attention_plan.h holds everything the sm90 (wgmma) and sm80 (mma.sync) kernels compute about
which keys to read: the block-aligned key tiles (cached tiles, then new-token tiles), the slot of each tile row
through the block table (a shift and a mask), causal/window pruning, the split-KV part boundaries and the
split-count heuristic. The binding cuda_ops.attention_plan runs that header on the host and lists, CTA by CTA
and tile by tile, what each tile row is read from. This test checks it against

* a straightforward reference: every (query, key) pair a query may see is covered exactly once over all CTAs
  and split parts, nothing else is covered, and each row's source is the slot the division-based formula of
  the contract names (or the right new token);
* an independent numpy planner written from the design (so the design itself is checked where the module was
  built without CUDA);
* an emulation of the kernels' arithmetic in float32 driven by the plan: per tile S = Q K^T, masks, online
  softmax in the log2 domain, P rounded to bf16, split partials (O, max, sum) merged by the combine's
  formula in fixed order, against the float64 reference at the GPU test's tolerance.

What this cannot see: the MMA fragment layouts, the shared-memory swizzle, the cp.async/wgmma pipeline and its
barriers; those run only on a GPU (tests/test_cuda_attention.py).
"""

from __future__ import annotations

import numpy as np
import pytest

import dgemma_rt
from attention_cases import Case, Row, check, from_bf16, make_case, row_keys, visible
from bf16_helpers import bf16_bits as to_bf16

OPS = getattr(dgemma_rt._core, "cuda_ops", None)
needs_binding = pytest.mark.skipif(OPS is None or not hasattr(OPS, "attention_plan"),
                                   reason="module built without CUDA: no cuda_ops.attention_plan")

# Tile shapes: attention_plan.h's sm90_tiles / sm80_tiles (block_m, block_n).
TILES = {("sm90", 256): (128, 64), ("sm90", 512): (64, 64), ("sm80", 256): (64, 32), ("sm80", 512): (32, 32)}


# ---------------------------------------------------------------------------------------------------------------
# The design in numpy: an independent planner.


def numpy_plan(c: Case, kernel: str, splits: int) -> dict:
    T, H, D = c.q.shape
    KVH = c.k_new.shape[1]
    G = H // KVH
    BM, BN = TILES[(kernel, D)]
    bs = c.block
    W = c.window if c.causal else 0
    max_count = int(c.count.max()) if len(c.count) else 0
    m_tiles = -(-max_count * G // BM)
    ctas = []
    for r in range(len(c.count)):
        first, start, length = int(c.cache_first_pos[r]), int(c.cache_start[r]), int(c.cache_len[r])
        count, t0 = int(c.count[r]), int(c.tok0[r])
        for y in range(KVH * splits):
            split, kv = y % splits, y // splits
            for x in range(m_tiles):
                f0, f_end = x * BM, count * G
                if f0 >= f_end:
                    continue
                t_first, t_last = f0 // G, (min(f_end, f0 + BM) - 1) // G
                tiles = []  # (cached, first table-relative position or new index)
                if length > start:
                    lo = start if W <= 0 else max(start, length + t_first - W + 1)
                    if lo < length:
                        tiles += [(True, cc * BN) for cc in range((lo - first) // BN, (length - 1 - first) // BN + 1)]
                u_lo, u_hi = 0, count
                if c.causal:
                    u_hi = min(u_hi, t_last + 1)
                    if W > 0:
                        u_lo = max(0, t_first - W + 1)
                if u_lo < u_hi:
                    tiles += [(False, n * BN) for n in range(u_lo // BN, (u_hi - 1) // BN + 1)]
                n = len(tiles)
                j0, j1 = split * n // splits, (split + 1) * n // splits
                pos = np.zeros((j1 - j0, BN), np.int64)
                slot = np.full((j1 - j0, BN), -1, np.int64)
                token = np.full((j1 - j0, BN), -1, np.int64)
                lo_a, hi_a = np.zeros(j1 - j0, np.int32), np.zeros(j1 - j0, np.int32)
                for jj, (cached, idx0) in enumerate(tiles[j0:j1]):
                    p = (first if cached else length) + idx0 + np.arange(BN)
                    lo, hi = (max(start, p[0]), min(length, p[0] + BN)) if cached else (p[0], length + min(count, idx0 + BN))
                    ok = (p >= lo) & (p < hi)
                    pos[jj], lo_a[jj], hi_a[jj] = p, lo, hi
                    rel = p[ok] - first
                    if cached:
                        slot[jj, ok] = c.block_table[r, rel // bs].astype(np.int64) * bs + rel % bs
                    else:
                        token[jj, ok] = t0 + p[ok] - length
                ctas.append(dict(row=r, kv_head=kv, m_tile=x, split=split, f0=f0, f_end=f_end, t_first=t_first,
                                 t_last=t_last, n_tiles=n, j0=j0, j1=j1, pos=pos, slot=slot, token=token, lo=lo_a,
                                 hi=hi_a))
    return dict(block_m=BM, block_n=BN, splits=splits, ctas=ctas)


def kernel_plan(c: Case, kernel: str, splits: int) -> dict:
    T, H, D = c.q.shape
    return OPS.attention_plan(D, H, c.k_new.shape[1], c.block, c.block_table, c.cache_first_pos, c.cache_start,
                              c.cache_len, c.tok0, c.count, c.causal, c.window, splits, kernel)


def best_plan(c: Case, kernel: str, splits: int) -> dict:
    """The kernels' own plan where the binding exists, else the numpy design."""
    return kernel_plan(c, kernel, splits) if OPS is not None and hasattr(OPS, "attention_plan") else \
        numpy_plan(c, kernel, splits)


# ---------------------------------------------------------------------------------------------------------------
# Cases: awkward shapes. (rows, head_dim, heads, kv_heads, causal, window, block)

D256, D512 = (256, 4, 2), (512, 8, 1)


def cases():
    out = []

    def add(name, rows, shape, causal=False, window=0, block=16, reverse=False):
        out.append(pytest.param((rows, shape, causal, window, block, reverse), id=name))

    for shape, tag in ((D256, "hd256"), (D512, "hd512")):
        add(f"{tag}-one-key", [Row(0, 1)], shape)
        add(f"{tag}-one-cached-one-new", [Row(1, 1)], shape)
        add(f"{tag}-decoder-many-blocks", [Row(1000, 37)], shape)
        add(f"{tag}-decoder-sliding-unaligned-start", [Row(1040, 64, 1040 - 1023)], shape)
        add(f"{tag}-encoder-one-token", [Row(0, 1)], shape, causal=True)
        add(f"{tag}-encoder-prompt-longer-than-window", [Row(0, 300, 0)], shape, causal=True, window=128)
        add(f"{tag}-encoder-trimmed-cache-window", [Row(150, 200, 150 - 127)], shape, causal=True, window=128)
        add(f"{tag}-encoder-tiny-window", [Row(30, 37, 30 - 4)], shape, causal=True, window=5)
        add(f"{tag}-encoder-causal-no-window", [Row(45, 170)], shape, causal=True)
        add(f"{tag}-ragged-rows", [Row(33, 50), Row(0, 0), Row(0, 9), Row(100, 23, 60), Row(129, 1)], shape,
            reverse=True)
        add(f"{tag}-ragged-rows-causal-window", [Row(33, 50, 14), Row(0, 0), Row(0, 9), Row(100, 23, 81)], shape,
            causal=True, window=20, reverse=True)
    for block in (1, 4, 32, 64, 128, 256):
        add(f"block{block}-decoder", [Row(300, 20, 7), Row(75, 5)], D256, block=block)
        add(f"block{block}-encoder", [Row(70, 90, 70 - 39)], D512, causal=True, window=40, block=block)
    return out


CASES = cases()


def build(params, seed=0, fill=True):
    rows, (D, H, KVH), causal, window, block, reverse = params
    return make_case(seed + D + block, rows, D, H, KVH, causal=causal, window=window, reverse_tokens=reverse,
                     block=block, fill=fill)


# ---------------------------------------------------------------------------------------------------------------
# Structure: the plan covers exactly the visible (query, key) pairs, from the right sources.


def check_coverage(c: Case, plan: dict):
    T, H, D = c.q.shape
    KVH = c.k_new.shape[1]
    G = H // KVH
    BM, splits = plan["block_m"], plan["splits"]
    W = c.window if c.causal else 0
    seen = {}
    parts = {}
    for cta in plan["ctas"]:
        r, kv = cta["row"], cta["kv_head"]
        length, count = int(c.cache_len[r]), int(c.count[r])
        kpos, kslot, ktoken = row_keys(c, r)
        index = np.full(int(kpos.max()) + 2 if len(kpos) else 1, -1)  # key position -> key index
        index[kpos] = np.arange(len(kpos))
        cov = seen.setdefault((r, kv), np.zeros((count * G, len(kpos)), np.int32))
        parts.setdefault((r, kv, cta["m_tile"]), []).append((cta["split"], cta["j0"], cta["j1"], cta["n_tiles"]))
        f = np.arange(cta["f0"], min(cta["f0"] + BM, cta["f_end"]))
        qpos = length + f // G
        for jj in range(cta["j1"] - cta["j0"]):
            pos, slot, token = cta["pos"][jj], cta["slot"][jj], cta["token"][jj]
            lo, hi = int(cta["lo"][jj]), int(cta["hi"][jj])
            has = (slot >= 0) | (token >= 0)
            assert not np.any((slot >= 0) & (token >= 0))
            assert np.array_equal(has, (pos >= lo) & (pos < hi)), "tile rows outside [lo, hi) must be zero-filled"
            p = pos[has]
            k = np.where((p >= 0) & (p < len(index)), index[np.clip(p, 0, len(index) - 1)], -1)
            assert np.all(k >= 0), f"row {r}: a tile reads positions that are not its keys: {p[k < 0]}"
            # The source is the one the contract's division formula names.
            assert np.array_equal(slot[has], kslot[k]) and np.array_equal(token[has], ktoken[k]), f"row {r}: sources"
            lo_q = np.full(len(f), lo)
            hi_q = np.full(len(f), hi)
            if c.causal:  # the kernels' visible_range
                hi_q = np.minimum(hi_q, qpos + 1)
                if W > 0:
                    lo_q = np.maximum(lo_q, qpos - W + 1)
            vis = (p[None, :] >= lo_q[:, None]) & (p[None, :] < hi_q[:, None])
            cov[np.ix_(f, k)] += vis  # a tile's positions are distinct
    for r in range(len(c.count)):
        count = int(c.count[r])
        if count == 0:
            continue
        kpos, _, _ = row_keys(c, r)
        want = np.repeat(visible(c, r, kpos), G, axis=0).astype(np.int32)  # flattened rows f = t * G + g
        for kv in range(KVH):
            got = seen.get((r, kv), np.zeros_like(want))
            assert np.array_equal(got, want), (
                f"row {r} kv head {kv}: {int((got > want).sum())} pairs read twice or not visible, "
                f"{int((got < want).sum())} visible pairs missed")
    for key, ps in parts.items():  # split parts: contiguous, in order, balanced, covering [0, n_tiles)
        ps.sort()
        assert [s for s, _, _, _ in ps] == list(range(splits)), key
        n = ps[0][3]
        assert ps[0][1] == 0 and ps[-1][2] == n and all(a[2] == b[1] for a, b in zip(ps, ps[1:])), key
        sizes = [j1 - j0 for _, j0, j1, _ in ps]
        assert max(sizes) - min(sizes) <= 1, key


@pytest.mark.parametrize("kernel", ["sm90", "sm80"])
@pytest.mark.parametrize("splits", [1, 3])
@pytest.mark.parametrize("params", CASES)
def test_plan_reads_every_visible_key_once(params, splits, kernel):
    c = build(params, fill=False)
    check_coverage(c, best_plan(c, kernel, splits))


@pytest.mark.parametrize("kernel", ["sm90", "sm80"])
@pytest.mark.parametrize("splits", [1, 2, 5, 16])
@pytest.mark.parametrize("params", CASES)
@needs_binding
def test_kernel_plan_is_the_designed_plan(params, splits, kernel):
    """The C++ plan the kernels run equals the numpy design, CTA by CTA and tile row by tile row."""
    c = build(params, fill=False)
    got, want = kernel_plan(c, kernel, splits), numpy_plan(c, kernel, splits)
    assert (got["block_m"], got["block_n"], got["splits"]) == (want["block_m"], want["block_n"], want["splits"])
    assert len(got["ctas"]) == len(want["ctas"])
    key = lambda d: (d["row"], d["kv_head"], d["split"], d["m_tile"])  # noqa: E731
    for g, w in zip(sorted(got["ctas"], key=key), sorted(want["ctas"], key=key)):
        for k, v in w.items():
            assert np.array_equal(np.asarray(g[k]), np.asarray(v)), f"{key(w)}: {k}"


@pytest.mark.parametrize("kernel", ["sm90", "sm80"])
@pytest.mark.parametrize(
    "head_dim,kv_heads,context,causal",
    [(256, 8, 1023, False), (512, 2, 5000, False), (512, 2, 0, False), (256, 8, 1040, True)])
def test_model_shapes_read_every_visible_key_once(head_dim, kv_heads, context, causal, kernel):
    """DiffusionGemma's shapes: a 256-token canvas (decoder) or prompt chunk (encoder, sliding window 1024)
    over a long cache, 16 query heads, the split counts the heuristic picks at batch 1 and more."""
    window = 1024 if causal else 0
    start = max(0, context - 1023) if head_dim == 256 else 0
    c = make_case(context + head_dim, [Row(context, 256, start)], head_dim, 16, kv_heads, causal=causal,
                  window=window, fill=False)
    for splits in (1, 4):
        check_coverage(c, best_plan(c, kernel, splits))


# ---------------------------------------------------------------------------------------------------------------
# Numerics: the kernels' arithmetic, emulated in float32 along the plan.

LOG2E = np.float32(1.4426950408889634)


def bf16_round(x: np.ndarray) -> np.ndarray:
    return from_bf16(to_bf16(x)).astype(np.float32)


def emulate(c: Case, plan: dict) -> np.ndarray:
    """What the kernels compute, tile by tile, for every CTA of `plan`; then the combine when split."""
    T, H, D = c.q.shape
    KVH = c.k_new.shape[1]
    G = H // KVH
    BM, splits = plan["block_m"], plan["splits"]
    W = c.window if c.causal else 0
    q = from_bf16(c.q).astype(np.float32)
    kn, vn = from_bf16(c.k_new).astype(np.float32), from_bf16(c.v_new).astype(np.float32)
    kc = from_bf16(c.k_cache).astype(np.float32).reshape(-1, KVH, D)
    vc = from_bf16(c.v_cache).astype(np.float32).reshape(-1, KVH, D)
    scale_log2 = np.float32(c.scale) * LOG2E
    out = np.full((T, H, D), np.nan, np.float32)  # the binding NaN-fills the output and the workspace
    max_count = int(c.count.max())
    ws_o = np.full((splits, len(c.count), max_count, H, D), np.nan, np.float32)
    ws_ml = np.full((splits, len(c.count), max_count, H, 2), np.nan, np.float32)
    for cta in plan["ctas"]:
        r, kv, s = cta["row"], cta["kv_head"], cta["split"]
        t0, length = int(c.tok0[r]), int(c.cache_len[r])
        f = np.arange(cta["f0"], min(cta["f0"] + BM, cta["f_end"]))
        t, h = f // G, kv * G + f % G
        qpos = length + t
        Q = q[t0 + t, h]
        m = np.full(len(f), -np.inf, np.float32)
        l = np.zeros(len(f), np.float32)
        O = np.zeros((len(f), D), np.float32)
        for jj in range(cta["j1"] - cta["j0"]):
            pos, slot, token = cta["pos"][jj], cta["slot"][jj], cta["token"][jj]
            K = np.zeros((len(pos), D), np.float32)
            V = np.zeros((len(pos), D), np.float32)
            K[slot >= 0], V[slot >= 0] = kc[slot[slot >= 0], kv], vc[slot[slot >= 0], kv]
            K[token >= 0], V[token >= 0] = kn[token[token >= 0], kv], vn[token[token >= 0], kv]
            S = (Q @ K.T) * scale_log2
            lo_q = np.full(len(f), int(cta["lo"][jj]))
            hi_q = np.full(len(f), int(cta["hi"][jj]))
            if c.causal:
                hi_q = np.minimum(hi_q, qpos + 1)
                if W > 0:
                    lo_q = np.maximum(lo_q, qpos - W + 1)
            S = np.where((pos[None, :] >= lo_q[:, None]) & (pos[None, :] < hi_q[:, None]), S, -np.inf)
            m_new = np.maximum(m, S.max(axis=1))
            base = np.where(m_new == -np.inf, np.float32(0), m_new)
            alpha = np.exp2(m - base)
            P = np.exp2(S - base[:, None])
            l = l * alpha + P.sum(axis=1)
            O = O * alpha[:, None] + bf16_round(P) @ V
            m = m_new
        if splits == 1:
            inv = np.where(l > 0, 1 / np.where(l > 0, l, 1), 0).astype(np.float32)
            out[t0 + t, h] = bf16_round(O * inv[:, None])
        else:
            ws_o[s, r, t, h] = O
            ws_ml[s, r, t, h, 0], ws_ml[s, r, t, h, 1] = m, l
    if splits > 1:  # attention_combine.cuh, parts in order
        for r in range(len(c.count)):
            n, t0 = int(c.count[r]), int(c.tok0[r])
            if n == 0:
                continue
            mm, ll, oo = ws_ml[:, r, :n, :, 0], ws_ml[:, r, :n, :, 1], ws_o[:, r, :n]
            M = mm.max(axis=0)
            wgt = np.where(mm == -np.inf, np.float32(0), np.exp2(mm - M[None]))
            L = (wgt * ll).sum(axis=0)
            acc = (wgt[..., None] * oo).sum(axis=0)
            inv = np.where(L > 0, 1 / np.where(L > 0, L, 1), 0).astype(np.float32)
            out[t0:t0 + n] = bf16_round(acc * inv[..., None])
    return to_bf16(out)


NUMERIC = [p for p in CASES if "block1-" not in p.id and "block4-" not in p.id]


@pytest.mark.parametrize("kernel", ["sm90", "sm80"])
@pytest.mark.parametrize("splits", [1, 2, 7])
@pytest.mark.parametrize("params", NUMERIC)
def test_emulated_kernel_matches_reference(params, splits, kernel):
    c = build(params, seed=1)
    check(c, emulate(c, best_plan(c, kernel, splits)), rows_only=True)


def test_emulated_model_shape_with_split():
    """Head_dim 512 at the real GQA ratio with a cache spanning many non-contiguous blocks, split 4 ways."""
    c = make_case(7, [Row(700, 64), Row(130, 16)], 512, 16, 2)
    check(c, emulate(c, best_plan(c, "sm90", 4)), rows_only=True)


# ---------------------------------------------------------------------------------------------------------------
# The split-count heuristic (attention_plan::choose_splits), on the model's shapes.


@needs_binding
def test_split_choice_on_the_model_shapes():
    sms = 132  # H100 SXM

    def splits(head_dim, kv_heads, batch, context, kernel="sm90"):
        bm, bn = TILES[(kernel, head_dim)]
        cached = min(context, 1023) if head_dim == 256 else context
        base = batch * kv_heads * (-(-256 * 16 // kv_heads // bm))
        return OPS.attention_choose_splits(base, OPS.attention_max_tiles(cached, 256, int(np.log2(bn))), sms)

    # Sliding layers at batch 1: 32 CTAs -> 4 parts = 128 CTAs, one wave; full layers: 64 CTAs -> 2 parts.
    assert splits(256, 8, 1, 4096) == 4
    assert splits(512, 2, 1, 4096) == 2
    assert splits(512, 2, 1, 32768) == 2
    # Batch 4 and up fill the machine without splitting.
    assert splits(256, 8, 4, 4096) == 1 and splits(512, 2, 2, 4096) == 1 and splits(512, 2, 8, 32768) == 1
    # Short contexts: at least two tiles per part.
    assert splits(256, 8, 1, 0) == 2 and splits(512, 2, 1, 0) == 2
    # A forced count is used as is, up to 16.
    assert OPS.attention_choose_splits(1000, 100, sms, 3) == 3
    assert OPS.attention_choose_splits(1, 100, sms, 99) == 16
