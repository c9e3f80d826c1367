"""Paged-attention test cases and their float64 reference, shared by the GPU test (test_cuda_attention.py)
and the CPU emulation of the kernels' index math (test_attention_plan.py).

A case holds bf16 inputs (uint16 bit patterns) for kernels/attention's contract (attention.cuh): rows of new
tokens, a paged K/V cache with a shuffled block table, per-row cache ranges. Every cache slot a row must not
read holds NaN, so a wrong gather shows up as NaN in the output.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from bf16_helpers import bf16_bits as to_bf16, bf16_to_f32

NAN_BF16 = np.uint16(0x7FC0)


def from_bf16(b) -> np.ndarray:
    return bf16_to_f32(b).astype(np.float64)


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
    k_cache: np.ndarray  # uint16 [blocks, block, KVH, D]
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

    @property
    def block(self) -> int:
        return self.k_cache.shape[1]

    def args(self):
        return (self.q, self.k_new, self.v_new, self.k_cache, self.v_cache, self.block_table, self.cache_first_pos,
                self.cache_start, self.cache_len, self.tok0, self.count, self.causal, self.window, self.scale)


def make_case(seed, rows, head_dim, heads, kv_heads, causal=False, window=0, scale=1.0, q_std=None,
              reverse_tokens=False, block=16, spare_blocks=3, fill=True) -> Case:
    """Random inputs. Scores q.k have a std of about 1.5 by default (q_std = 1.5 / sqrt(head_dim)).

    Rows' tokens lie back to back, optionally in reverse row order (tok0 is then not a running sum). Each row's
    blocks, from the one holding cache_start to cache_len, come from a shuffled pool with spare blocks.
    fill=False leaves the visible cache slots at zero (for index-only tests that never read values).
    """
    rng = np.random.default_rng(seed)
    D = head_dim
    counts = [r.count for r in rows]
    T = sum(counts)
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

    first = [(r.cache_start // block) * block for r in rows]
    nblk = [(r.cache_len - f + block - 1) // block if r.cache_len > r.cache_start else 0 for r, f in zip(rows, first)]
    total = sum(nblk) + spare_blocks
    perm = rng.permutation(total)
    max_blocks = max(nblk + [1])
    table = np.full((len(rows), max_blocks), -1, np.int32)
    k_cache = np.full((total, block, kv_heads, D), NAN_BF16, np.uint16)
    v_cache = np.full((total, block, kv_heads, D), NAN_BF16, np.uint16)
    used = 0
    for i, r in enumerate(rows):
        for b in range(nblk[i]):
            table[i, b] = perm[used]
            used += 1
        n = r.cache_len - r.cache_start
        if n <= 0:
            continue
        rel = np.arange(r.cache_start, r.cache_len) - first[i]
        blk, off = table[i, rel // block], rel % block
        if fill:
            k_cache[blk, off] = to_bf16(rng.standard_normal((n, kv_heads, D)))
            v_cache[blk, off] = to_bf16(rng.standard_normal((n, kv_heads, D)))
        else:
            k_cache[blk, off] = 0
            v_cache[blk, off] = 0
    i32 = lambda a: np.asarray(a, dtype=np.int32)  # noqa: E731
    return Case(q, k_new, v_new, k_cache, v_cache, table, i32(first), i32([r.cache_start for r in rows]),
                i32([r.cache_len for r in rows]), i32(tok0), i32(counts), causal, window, scale)


def row_keys(c: Case, r: int):
    """Row r's keys: positions, cache slots (-1 for new tokens) and token indices (-1 for cached keys)."""
    n, t0 = int(c.count[r]), int(c.tok0[r])
    start, length, first = int(c.cache_start[r]), int(c.cache_len[r]), int(c.cache_first_pos[r])
    cpos = np.arange(start, length)
    rel = cpos - first
    slots = c.block_table[r, rel // c.block].astype(np.int64) * c.block + rel % c.block
    pos = np.concatenate([cpos, length + np.arange(n)])
    slot = np.concatenate([slots, np.full(n, -1)])
    token = np.concatenate([np.full(len(cpos), -1), t0 + np.arange(n)])
    return pos, slot, token


def visible(c: Case, r: int, kpos: np.ndarray) -> np.ndarray:
    """[count, len(kpos)]: which of row r's keys each of its queries sees."""
    n, length = int(c.count[r]), int(c.cache_len[r])
    qpos = length + np.arange(n)
    vis = np.ones((n, len(kpos)), bool)
    if c.causal:
        vis = kpos[None, :] <= qpos[:, None]
        if c.window > 0:
            vis &= kpos[None, :] > qpos[:, None] - c.window
    return vis


def reference(c: Case):
    """float64 attention over the dequantised inputs; returns (out [T, H, D], max |V| over visible keys)."""
    T, H, D = c.q.shape
    KVH = c.k_new.shape[1]
    G = H // KVH
    q, kn, vn = from_bf16(c.q), from_bf16(c.k_new), from_bf16(c.v_new)
    kc = from_bf16(c.k_cache).reshape(-1, KVH, D)
    vc = from_bf16(c.v_cache).reshape(-1, KVH, D)
    out = np.zeros((T, H, D))
    vmax = 0.0
    for r in range(len(c.count)):
        n, t0 = int(c.count[r]), int(c.tok0[r])
        if n == 0:
            continue
        kpos, slot, token = row_keys(c, r)
        cached = slot >= 0
        K = np.concatenate([kc[slot[cached]], kn[token[~cached]]])  # [L, KVH, D]
        V = np.concatenate([vc[slot[cached]], vn[token[~cached]]])
        Kh, Vh = np.repeat(K, G, axis=1), np.repeat(V, G, axis=1)  # [L, H, D]: query head h reads KV head h // G
        # Batched matmuls (BLAS on any numpy; einsum only gets there with optimize on numpy >= 2.4).
        s = np.matmul(q[t0:t0 + n].transpose(1, 0, 2), Kh.transpose(1, 2, 0)) * c.scale  # [H, n, L]
        s = np.where(visible(c, r, kpos)[None], s, -np.inf)
        s -= s.max(axis=-1, keepdims=True)
        p = np.exp(s)
        p /= p.sum(axis=-1, keepdims=True)
        out[t0:t0 + n] = np.matmul(p, Vh.transpose(1, 0, 2)).transpose(1, 0, 2)  # [H, n, D] -> [n, H, D]
        vmax = max(vmax, float(np.abs(V).max()))
    return out, vmax


def check(c: Case, got_bits: np.ndarray, rows_only: bool = False, ref=None):
    """The kernel's error must stay within twice the bf16 rounding of the reference plus 1e-3 of max |V| (P is
    rounded to bf16 before P V, as in FlashAttention). Tokens of no row are ignored when rows_only. ref:
    reference(c), when the caller checks several outputs of one case."""
    ref, vmax = ref if ref is not None else reference(c)
    assert got_bits.shape == c.q.shape and got_bits.dtype == np.uint16
    got = from_bf16(got_bits)
    if rows_only:
        mask = np.zeros(len(got), bool)
        for r in range(len(c.count)):
            mask[int(c.tok0[r]):int(c.tok0[r]) + int(c.count[r])] = True
        got, ref = got[mask], ref[mask]
    err = np.max(np.abs(got - ref)) if ref.size else 0.0
    round_err = np.max(np.abs(from_bf16(to_bf16(ref)) - ref)) if ref.size else 0.0
    tol = 2 * round_err + 1e-3 * vmax
    assert err <= tol, f"max abs error {err:.3g} > tolerance {tol:.3g} (bf16 rounding of the reference {round_err:.3g})"
