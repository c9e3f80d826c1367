"""The multi-block moe_permute's arithmetic (kernels/moe/permute.cu) emulated in numpy, no GPU needed.

Histogram per chunk into an expert-major [E, B] table, one flat exclusive scan, then each chunk ranked
kMbThreads slots at a time: warp-local ranks (__match_any_sync), per-warp counts held in uint8, a
running count per expert in uint16 that only the last lane of an expert's last warp advances. The
result must be the single-block sort's: the stable order of the slots by expert, out-of-range ids
dropped. The chunk sizes are read from permute.cu, so the emulation follows the kernel.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

PERMUTE_CU = Path(__file__).resolve().parent.parent / "csrc" / "kernels" / "moe" / "permute.cu"


def _constant(name: str) -> int:
    m = re.search(rf"constexpr int {name} = (\d+);", PERMUTE_CU.read_text())
    assert m, f"{name} not found in {PERMUTE_CU}"
    return int(m.group(1))


CHUNK = _constant("kMbChunk")
THREADS = _constant("kMbThreads")
SCAN_THREADS = _constant("kScanThreads")
WARPS = THREADS // 32


def single_block_ref(flat: np.ndarray, e: int):
    """What the single-block sort writes: counts, offsets, and perm/inv of the valid slots (stable)."""
    valid = (flat >= 0) & (flat < e)
    slots = np.nonzero(valid)[0]
    perm = slots[np.argsort(flat[slots], kind="stable")].astype(np.int32)
    counts = np.bincount(flat[slots], minlength=e).astype(np.int32)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
    inv = np.full(flat.size, -1, np.int32)
    inv[perm] = np.arange(perm.size, dtype=np.int32)
    return counts, offsets, perm, inv


def scan_kernel(tbl: np.ndarray) -> tuple[np.ndarray, int]:
    """mb_scan_kernel: per-thread contiguous runs, an exclusive scan over their sums, then each run."""
    flat = tbl.ravel()  # expert-major: index e * B + b
    n = flat.size
    per = -(-n // SCAN_THREADS)
    out = np.empty_like(flat)
    run = 0
    for t in range(SCAN_THREADS):  # the shuffle scans give these prefixes exactly (integers)
        s0, s1 = min(n, t * per), min(n, t * per + per)
        seg = flat[s0:s1]
        out[s0:s1] = run + np.concatenate([[0], np.cumsum(seg)[:-1]]) if seg.size else seg
        run += int(seg.sum())
    return out.reshape(tbl.shape), run


def multi_block_emulated(flat: np.ndarray, e: int):
    n = flat.size
    nb = -(-n // CHUNK)
    ids = np.where((flat >= 0) & (flat < e), flat, -1)

    # Kernel 1: histograms.
    tbl = np.zeros((e, nb), np.int64)
    for b in range(nb):
        c = ids[b * CHUNK : (b + 1) * CHUNK]
        tbl[:, b] = np.bincount(c[c >= 0], minlength=e)

    # Kernel 2: flat scan; counts and offsets read off tbl[e, 0].
    tbl, total = scan_kernel(tbl)
    offsets = np.empty(e + 1, np.int64)
    offsets[:e] = tbl[:, 0] if nb else 0
    offsets[e] = total
    counts = np.diff(offsets)

    # Kernel 3: ranks, THREADS slots per step.
    perm = np.full(n, -1, np.int64)
    inv = np.full(n, -1, np.int64)
    lane = np.arange(32)
    lower = lane[None, :] < lane[:, None]  # [me, other]: other is a lower lane
    for b in range(nb):
        running = np.zeros(e, np.uint16)
        wcount = np.zeros((WARPS, e), np.uint8)
        c1 = min(n, (b + 1) * CHUNK)
        for base in range(b * CHUNK, c1, THREADS):
            i = base + np.arange(THREADS)
            ev = np.where(i < c1, ids[np.minimum(i, n - 1)], -1).reshape(WARPS, 32)
            same = ev[:, :, None] == ev[:, None, :]  # [warp, me, other]: __match_any_sync
            rank = (same & lower).sum(axis=2)
            size = same.sum(axis=2)
            higher = (same & ~lower & (lane[None, :] != lane[:, None])).any(axis=2)
            for w in range(WARPS):
                for l in range(32):
                    if ev[w, l] >= 0 and rank[w, l] == 0:
                        wcount[w, ev[w, l]] = size[w, l]
            updates = {}  # one writer per expert, else the kernel would race
            for w in range(WARPS):
                for l in range(32):
                    ex = int(ev[w, l])
                    if ex < 0:
                        continue
                    before = int(running[ex]) + int(wcount[:w, ex].sum())
                    pos = int(tbl[ex, b]) + before + int(rank[w, l])
                    slot = base + w * 32 + l
                    perm[pos], inv[slot] = slot, pos
                    if not higher[w, l] and not wcount[w + 1 :, ex].any():
                        assert ex not in updates, "two lanes would write running[e]"
                        updates[ex] = before + int(rank[w, l]) + 1
            for ex, v in updates.items():
                assert v < 1 << 16
                running[ex] = v
            wcount[:] = 0  # the leaders clear exactly the entries they set
    return counts.astype(np.int32), offsets.astype(np.int32), perm, inv


def routing(rng, t, k, e, kind):
    if kind == "distinct":
        return np.stack([rng.permutation(e)[:k] for _ in range(t)]).astype(np.int32)
    if kind == "one":
        return np.full((t, k), e - 1, np.int32)
    if kind == "few":  # most experts empty
        return rng.choice(np.array([0, e // 2, e - 1]), size=(t, k)).astype(np.int32)
    if kind == "skewed":  # runs of one expert longer than a warp and a chunk
        return np.minimum(rng.geometric(0.3, size=(t, k)) - 1, e - 1).astype(np.int32)
    if kind == "invalid":  # ids outside [0, E): dropped by both sorts
        return rng.integers(-3, e + 3, size=(t, k)).astype(np.int32)
    return rng.integers(0, e, size=(t, k)).astype(np.int32)


@pytest.mark.parametrize(
    "t,k,e,kind",
    [
        (1, 1, 4, "any"),
        (1, 8, 128, "distinct"),
        (37, 7, 4, "any"),  # 259 slots: one chunk, a partial second step
        (128, 8, 256, "distinct"),  # exactly one chunk
        (129, 8, 128, "distinct"),  # one chunk and 8 slots
        (997, 3, 128, "few"),  # prime T, empty experts
        (1000, 8, 256, "one"),  # every slot on the last expert
        (2049, 5, 4, "skewed"),
        (5000, 8, 128, "distinct"),  # 40,000 slots
        (333, 3, 4096, "any"),  # E past the single-block limit
        (700, 3, 16, "invalid"),
    ],
)
def test_multi_block_emulation_matches_single_block(t, k, e, kind):
    rng = np.random.default_rng(t * 7 + k * 131 + e)
    flat = routing(rng, t, k, e, kind).ravel()
    counts, offsets, perm, inv = multi_block_emulated(flat, e)
    want_counts, want_offsets, want_perm, want_inv = single_block_ref(flat, e)
    np.testing.assert_array_equal(counts, want_counts)
    np.testing.assert_array_equal(offsets, want_offsets)
    valid = int(want_offsets[-1])
    np.testing.assert_array_equal(perm[:valid], want_perm)
    assert (perm[valid:] == -1).all()  # rows past offsets[E] are never written
    np.testing.assert_array_equal(inv, want_inv)  # -1: a dropped slot's inv is never written


def test_kernel_limits_fit_the_emulated_types():
    assert CHUNK % THREADS == 0 and THREADS % 32 == 0
    assert CHUNK < 1 << 16  # running counts are uint16
