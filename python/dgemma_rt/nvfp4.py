"""Quantized weights (NVFP4, and FP8 for the dense layers): the numpy reference quantizers and the
``dgemma-quantize`` command.

NVFP4 stores a weight ``W[..., K]`` as

- E2M1 values (sign, 2 exponent bits, 1 mantissa bit: 0, 0.5, 1, 1.5, 2, 3, 4, 6), packed two per
  byte along K, the even element in the low nibble: ``uint8 [..., K/2]``;
- one FP8 E4M3 scale per 16 consecutive elements along K: ``float8_e4m3 [..., K/16]``;
- one FP32 scale per tensor, or per expert for a stacked ``[E, N, K]`` expert tensor.

``W ~= e2m1 * e4m3_scale * global_scale``. Scale selection follows NVIDIA's recipe:
``global_scale = amax / (6 * 448)`` (per tensor / expert), each block's scale is
``amax_block / 6 / global_scale`` rounded to E4M3, and values are ``W / (scale * global_scale)``
rounded to the nearest E2M1 value, ties to even, saturating at 6.

Checkpoint layout (ours, and NVIDIA ModelOpt's for a ``<prefix>.weight``): the tensor ``T`` holds the
packed bytes (dtype ``U8``), ``T + "_scale"`` the block scales (``F8_E4M3``) and ``T + "_scale_2"``
the global scale(s) (``F32``). ModelOpt's ``input_scale`` (activation scale) is accepted and ignored:
the engine's activations stay in higher precision.

FP8 (the alternative for the dense layers: attention projections and dense MLP) stores E4M3 values
``float8_e4m3 [N, K]`` under the tensor's name and an FP32 scale per output channel ``[N]`` under
``T + "_scale"`` (the loader also takes ``[N, 1]``, compressed-tensors' channel-wise layout, and one
scale per tensor, ModelOpt's): ``W ~= e4m3 * scale[n]``, ``scale[n] = amax(W[n]) / 448``.
"""

from __future__ import annotations

import argparse
import json
import os
import mmap
import shutil
import signal
import stat
import struct
import tempfile
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

GROUP = 16
E2M1_VALUES = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0], dtype=np.float32)
E2M1_MAX = 6.0
E4M3_MAX = 448.0


# ---------------------------------------------------------------------------------------- E4M3
def e4m3_decode(codes: np.ndarray) -> np.ndarray:
    """FP8 E4M3 (fn: no infinities, 0x7f/0xff are NaN) codes to float32."""
    c = np.asarray(codes, dtype=np.uint8).astype(np.int32)
    sign = np.where(c & 0x80, -1.0, 1.0).astype(np.float32)
    exp = (c >> 3) & 0xF
    man = (c & 0x7).astype(np.float32)
    normal = np.ldexp(1.0 + man / 8.0, exp - 7).astype(np.float32)
    sub = np.ldexp(man / 8.0, -6).astype(np.float32)
    out = sign * np.where(exp == 0, sub, normal)
    return np.where((c & 0x7F) == 0x7F, np.float32(np.nan), out).astype(np.float32)


_E4M3_TABLE = e4m3_decode(np.arange(128, dtype=np.uint8))  # non-negative codes, ascending; 127 is NaN


def e4m3_encode(x: np.ndarray) -> np.ndarray:
    """float32 >= 0 to the nearest E4M3 code (ties to even), saturating at 448."""
    x = np.asarray(x, dtype=np.float32)
    if np.any(~np.isfinite(x)) or np.any(x < 0):
        raise ValueError("E4M3 scales must be finite and >= 0")
    table = _E4M3_TABLE[:127]  # 0 .. 448
    x = np.minimum(x, E4M3_MAX)
    hi = np.clip(np.searchsorted(table, x, side="left"), 0, 126)
    lo = np.maximum(hi - 1, 0)
    d_lo = x - table[lo]
    d_hi = table[hi] - x
    pick_hi = (d_hi < d_lo) | ((d_hi == d_lo) & (hi % 2 == 0))
    return np.where(pick_hi, hi, lo).astype(np.uint8)


# ---------------------------------------------------------------------------------------- E2M1
_ENCODE_CHUNK = 1 << 18  # elements per pass: the int64 temporaries stay in cache (~3x faster on experts)


def e2m1_encode(x: np.ndarray) -> np.ndarray:
    """float32 to 4-bit E2M1 codes (sign in bit 3), nearest value with ties to even, saturating at 6."""
    x = np.asarray(x, dtype=np.float32)
    if x.size > _ENCODE_CHUNK:
        flat, out = x.reshape(-1), np.empty(x.size, dtype=np.uint8)
        for i in range(0, x.size, _ENCODE_CHUNK):
            out[i : i + _ENCODE_CHUNK] = _e2m1_encode(flat[i : i + _ENCODE_CHUNK])
        return out.reshape(x.shape)
    return _e2m1_encode(x)


def _e2m1_encode(x: np.ndarray) -> np.ndarray:
    mag = np.minimum(np.abs(x), E2M1_MAX)
    hi = np.clip(np.searchsorted(E2M1_VALUES, mag, side="left"), 0, 7)
    lo = np.maximum(hi - 1, 0)
    d_lo = mag - E2M1_VALUES[lo]
    d_hi = E2M1_VALUES[hi] - mag
    pick_hi = (d_hi < d_lo) | ((d_hi == d_lo) & (hi % 2 == 0))
    code = np.where(pick_hi, hi, lo).astype(np.uint8)
    return np.where(np.signbit(x) & (code != 0), code | 8, code).astype(np.uint8)


def e2m1_decode(codes: np.ndarray) -> np.ndarray:
    c = np.asarray(codes, dtype=np.uint8)
    v = E2M1_VALUES[c & 7]
    return np.where(c & 8, -v, v).astype(np.float32)


def pack(codes: np.ndarray) -> np.ndarray:
    """4-bit codes [..., K] to bytes [..., K/2]: element 2i in the low nibble, 2i+1 in the high one."""
    c = np.asarray(codes, dtype=np.uint8)
    return (c[..., 0::2] | (c[..., 1::2] << 4)).astype(np.uint8)


def unpack(packed: np.ndarray) -> np.ndarray:
    p = np.asarray(packed, dtype=np.uint8)
    out = np.empty(p.shape[:-1] + (2 * p.shape[-1],), dtype=np.uint8)
    out[..., 0::2] = p & 0xF
    out[..., 1::2] = p >> 4
    return out


# ---------------------------------------------------------------------------------------- tensors
def quantize(w: np.ndarray, per_leading: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """W [..., K] -> (packed uint8 [..., K/2], block scales E4M3 codes [..., K/16], global scale float32).

    ``per_leading``: one global scale per index of the first dimension (stacked experts), else one.
    """
    w = np.asarray(w, dtype=np.float32)
    if w.ndim < 1 or w.shape[-1] % GROUP:
        raise ValueError(f"NVFP4 needs the last dimension to be a multiple of {GROUP}, got shape {w.shape}")
    if not np.all(np.isfinite(w)):
        raise ValueError("cannot quantize a tensor holding NaN or Inf")
    if per_leading:
        amax = np.abs(w.reshape(w.shape[0], -1)).max(axis=1)
    else:
        amax = np.array([np.abs(w).max() if w.size else 0.0], dtype=np.float32)
    gscale = (amax / np.float32(E2M1_MAX * E4M3_MAX)).astype(np.float32)
    gscale = np.where(gscale > 0, gscale, np.float32(1.0)).astype(np.float32)  # all-zero tensor: any scale
    g = gscale.reshape((-1,) + (1,) * (w.ndim - 1)) if per_leading else gscale.reshape((1,) * w.ndim)
    blocks = w.reshape(w.shape[:-1] + (w.shape[-1] // GROUP, GROUP))
    bamax = np.abs(blocks).max(axis=-1)
    scale_codes = e4m3_encode(bamax / np.float32(E2M1_MAX) / g)
    scale = e4m3_decode(scale_codes)
    denom = (scale * g)[..., None]
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.where(denom > 0, blocks / denom, np.float32(0.0))
    codes = e2m1_encode(q.reshape(w.shape))
    return pack(codes), scale_codes, gscale if per_leading else gscale.reshape(())


def dequantize(packed: np.ndarray, scale_codes: np.ndarray, gscale: np.ndarray) -> np.ndarray:
    """The exact float32 weights an NVFP4 tensor stands for: (e2m1 * e4m3) * global, in that order."""
    vals = e2m1_decode(unpack(packed))
    scale = e4m3_decode(scale_codes)
    gs = np.asarray(gscale, dtype=np.float32)
    if gs.ndim == 1 and gs.size > 1:
        gs = gs.reshape((-1,) + (1,) * (vals.ndim - 1))
    per_elem = np.repeat(scale, GROUP, axis=-1)
    return ((vals * per_elem) * gs).astype(np.float32)


# ---------------------------------------------------------------------------------------- FP8
def e4m3_encode_signed(x: np.ndarray) -> np.ndarray:
    """float32 to E4M3 codes with the sign in bit 7: nearest (ties to even), saturating at +-448."""
    x = np.asarray(x, dtype=np.float32)
    if not np.all(np.isfinite(x)):
        raise ValueError("cannot quantize a tensor holding NaN or Inf")
    codes = e4m3_encode(np.abs(x))
    return np.where(np.signbit(x) & (codes != 0), codes | 0x80, codes).astype(np.uint8)


def quantize_fp8(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """W [..., K] -> (E4M3 codes [..., K], float32 scale per row [...]): ``scale = amax(row) / 448``."""
    w = np.asarray(w, dtype=np.float32)
    if w.ndim < 1:
        raise ValueError("FP8 quantization needs at least one dimension")
    if not np.all(np.isfinite(w)):
        raise ValueError("cannot quantize a tensor holding NaN or Inf")
    amax = np.abs(w).max(axis=-1) if w.shape[-1] else np.zeros(w.shape[:-1], np.float32)
    scale = (amax / np.float32(E4M3_MAX)).astype(np.float32)
    scale = np.where(scale > 0, scale, np.float32(1.0)).astype(np.float32)  # all-zero row: any scale
    return e4m3_encode_signed(w / scale[..., None]), scale


def dequantize_fp8(codes: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """The exact float32 weights an FP8 tensor stands for: e4m3 * scale (one per row, or one)."""
    s = np.asarray(scale, dtype=np.float32)
    vals = e4m3_decode(codes)
    if s.size == 1:
        return (vals * s.reshape(())).astype(np.float32)
    return (vals * s.reshape(vals.shape[:-1] + (1,))).astype(np.float32)


# ---------------------------------------------------------------------------------------- MMA scale layout
SF_TILE_ROWS = 128  # rows of one block-scale atom
SF_TILE_COLS = 4    # block scales (of 16 elements) per atom row


def sf_offsets(rows: int, kblocks: int) -> np.ndarray:
    """Byte offset of every block scale ``[rows, kblocks]`` in the layout Blackwell's block-scaled MMAs
    read (CUTLASS ``Sm1xxBlockScaledConfig``, K-major): atoms of 128 rows x 4 scales (512 bytes), ordered
    along K first; inside an atom, row ``r`` and column ``c`` at ``(r % 32) * 16 + (r // 32) * 4 + c``."""
    r = np.arange(rows, dtype=np.int64)[:, None]
    c = np.arange(kblocks, dtype=np.int64)[None, :]
    atoms_k = -(-kblocks // SF_TILE_COLS)
    atom = (r // SF_TILE_ROWS) * atoms_k + c // SF_TILE_COLS
    return atom * 512 + (r % 32) * 16 + ((r % SF_TILE_ROWS) // 32) * 4 + c % SF_TILE_COLS


def sf_bytes(rows: int, kblocks: int) -> int:
    """Bytes of the MMA scale layout of ``rows x kblocks`` scales (rows padded to 128, columns to 4)."""
    return -(-rows // SF_TILE_ROWS) * SF_TILE_ROWS * (-(-kblocks // SF_TILE_COLS) * SF_TILE_COLS)


def swizzle_scales(scales: np.ndarray) -> np.ndarray:
    """Row-major block scales ``[..., rows, kblocks]`` to the MMA layout ``[..., sf_bytes(rows, kblocks)]``,
    the padding zero (a finite scale: the MMA multiplies it by zero-filled data)."""
    s = np.asarray(scales, dtype=np.uint8)
    if s.ndim < 2:
        raise ValueError(f"block scales must be [..., rows, K/16], got shape {s.shape}")
    rows, kblocks = s.shape[-2:]
    lead = s.shape[:-2]
    flat = s.reshape((-1, rows * kblocks))
    out = np.zeros((flat.shape[0], sf_bytes(rows, kblocks)), dtype=np.uint8)
    out[:, sf_offsets(rows, kblocks).reshape(-1)] = flat
    return out.reshape(lead + (out.shape[-1],))


# ---------------------------------------------------------------------------------------- W4A16 kernel layout
# The pre-shuffled layout the Hopper W4A16 grouped GEMM reads (csrc/common/nvfp4_w4a16_layout.h holds the
# full description and the C++ twin of these functions; the two are checked byte for byte). One expert is
# groups x k_tiles units of 4608 bytes: 8 MMA row blocks of 16 rows x 64 columns, per lane of each warp 4
# words of 8 E2M1 codes in its mma.m16n8k16 A-fragment order, then the 64 re-encoded block scales.
W4A16_WARPS = 8
W4A16_KTILE = 64
W4A16_UNIT_BYTES = W4A16_WARPS * (512 + 64)
W4A16_ACC_SCALE = 128.0  # the kernel's decoded products carry 2^-7


def w4a16_word_bit(i: int, h: int, b: int) -> int:
    """Bit of the lane word holding code bit ``b`` (0 = mantissa, 1-2 = exponent, 3 = sign) of A-fragment
    register ``i`` (a0..a3), half ``h``."""
    t = 16 * h + (6 + b if b < 3 else 15)
    if i == 0:
        return t
    if i == 1:
        return (t + 6) % 32 if b == 2 else t - 2
    if i == 2:
        return t - 6
    return (t + 4) % 32


def w4a16_sizes(N: int, K: int, gated: bool) -> tuple[int, int, int]:
    """(groups of 128 MMA rows, k-tiles of 64, bytes of one expert)."""
    blocks = -(-(N // 2) // 8) if gated else -(-N // 16)
    groups = -(-blocks // W4A16_WARPS)
    ktiles = -(-K // W4A16_KTILE)
    return groups, ktiles, groups * ktiles * W4A16_UNIT_BYTES


def _w4a16_mma_rows(N: int, gated: bool) -> np.ndarray:
    """The weight row behind each MMA row (block-major, 16 per block), -1 for padding."""
    groups, _, _ = w4a16_sizes(N, 16, gated)
    m = np.arange(groups * W4A16_WARPS * 16)
    b, r = m // 16, m % 16
    if gated:
        half = N // 2
        f = 8 * b + (r & 7)
        return np.where(f < half, np.where(r < 8, f, half + f), -1)
    return np.where(m < N, m, -1)


def w4a16_scale_code(codes: np.ndarray) -> np.ndarray:
    """Non-negative E4M3 scale codes to the kernel's scale byte ``((e + 22) << 3) | m`` of 2^e * (1 + m/8)."""
    c = np.asarray(codes, dtype=np.uint8) & 0x7F
    frac, ex = np.frexp(e4m3_decode(c).astype(np.float64))  # v = frac * 2^ex, frac in [0.5, 1)
    m = np.rint((2 * frac - 1) * 8).astype(np.int64)
    u = ((ex - 1 + 22) << 3) | m
    return np.where(c == 0, 0, u).astype(np.uint8)


def w4a16_scale_value(u: np.ndarray) -> np.ndarray:
    """The scale a kernel scale byte stands for (0 for 0)."""
    u = np.asarray(u, dtype=np.int64)
    v = np.ldexp(1.0 + (u & 7) / 8.0, (u >> 3) - 22)
    return np.where(u == 0, 0.0, v).astype(np.float32)


def _w4a16_canonical(codes: np.ndarray, scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The same weights with non-negative scales: a negative scale's sign moves into its 16 values, a zero
    scale zeroes them, and zero values are +0."""
    if np.any((scales & 0x7F) == 0x7F):
        raise ValueError("NVFP4 block scales must not be NaN")
    per = np.repeat(scales, GROUP, axis=-1)
    c = np.where((per & 0x80) != 0, codes ^ 8, codes)
    c = np.where(((per & 0x7F) == 0) | ((codes & 7) == 0), 0, c).astype(np.uint8)
    return c, (scales & 0x7F).astype(np.uint8)


def shuffle_w4a16(packed: np.ndarray, scales: np.ndarray, gated: bool = False) -> np.ndarray:
    """NVFP4 experts (packed codes ``[G, N, K/2]``, E4M3 block scales ``[G, N, K/16]``) to the W4A16
    kernel's layout ``uint8 [G, bytes]``. ``gated``: gate_up weights (``N = 2I``, gate rows first), laid
    out so the kernel pairs each gate row with its up row. Done once, at load."""
    packed = np.asarray(packed, dtype=np.uint8)
    scales = np.asarray(scales, dtype=np.uint8)
    if packed.ndim != 3 or scales.ndim != 3:
        raise ValueError("packed must be [G, N, K/2] and scales [G, N, K/16]")
    G, N, K = packed.shape[0], packed.shape[1], packed.shape[2] * 2
    if K % GROUP or scales.shape != (G, N, K // GROUP) or (gated and N % 2):
        raise ValueError(f"bad shapes {packed.shape}, {scales.shape} (gated={gated})")
    codes, sc = _w4a16_canonical(unpack(packed), scales)
    groups, kt, nbytes = w4a16_sizes(N, K, gated)
    rows = _w4a16_mma_rows(N, gated)
    R, Kp = rows.size, kt * W4A16_KTILE
    cm = np.zeros((G, R, Kp), np.uint8)
    cm[:, rows >= 0, :K] = codes[:, rows[rows >= 0]]
    # [G, C, W, rh, gid, KT, J, kh, tig, h] -> [G, C, KT, W, gid, tig, J, kh, rh, h]: register i = 2 kh + rh
    cm = cm.reshape(G, groups, W4A16_WARPS, 2, 8, kt, 4, 2, 4, 2).transpose(0, 1, 5, 2, 4, 8, 6, 7, 3, 9)
    cm = cm.reshape(G, groups, kt, W4A16_WARPS, 32, 4, 4, 2).astype(np.uint32)
    words = np.zeros(cm.shape[:6], np.uint32)
    for i in range(4):
        for h in range(2):
            for b in range(4):
                words |= ((cm[..., i, h] >> b) & 1) << np.uint32(w4a16_word_bit(i, h, b))
    um = np.zeros((G, R, kt * 4), np.uint8)
    um[:, rows >= 0, : K // GROUP] = w4a16_scale_code(sc)[:, rows[rows >= 0]]
    # [G, C, W, hi, gid, KT, jh, jl] -> [G, C, KT, W, gid, jh, hi, jl]: byte 4 (j // 2) + 2 hi + (j % 2)
    um = um.reshape(G, groups, W4A16_WARPS, 2, 8, kt, 2, 2).transpose(0, 1, 5, 2, 4, 6, 3, 7)
    unit = np.concatenate([words.astype("<u4").view(np.uint8).reshape(G, groups, kt, -1),
                           um.reshape(G, groups, kt, -1)], axis=-1)
    return np.ascontiguousarray(unit.reshape(G, nbytes))


def unshuffle_w4a16(shuffled: np.ndarray, N: int, K: int, gated: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """The inverse of shuffle_w4a16: (packed ``[G, N, K/2]``, scales ``[G, N, K/16]``), canonical (non-negative
    scales, values of zero-scale blocks zero): the same weights as the tensors that were shuffled."""
    groups, kt, nbytes = w4a16_sizes(N, K, gated)
    s = np.asarray(shuffled, dtype=np.uint8)
    if s.ndim != 2 or s.shape[1] != nbytes:
        raise ValueError(f"shuffled must be [G, {nbytes}]")
    G = s.shape[0]
    unit = s.reshape(G, groups, kt, W4A16_UNIT_BYTES)
    words = np.ascontiguousarray(unit[..., : W4A16_WARPS * 512]).view("<u4").reshape(G, groups, kt, W4A16_WARPS, 32, 4)
    cm = np.zeros(words.shape + (4, 2), np.uint8)
    for i in range(4):
        for h in range(2):
            for b in range(4):
                cm[..., i, h] |= (((words >> np.uint32(w4a16_word_bit(i, h, b))) & 1) << b).astype(np.uint8)
    cm = cm.reshape(G, groups, kt, W4A16_WARPS, 8, 4, 4, 2, 2, 2).transpose(0, 1, 3, 8, 4, 2, 6, 7, 5, 9)
    cm = cm.reshape(G, -1, kt * W4A16_KTILE)
    um = unit[..., W4A16_WARPS * 512 :].reshape(G, groups, kt, W4A16_WARPS, 8, 2, 2, 2).transpose(0, 1, 3, 6, 4, 2, 5, 7)
    um = um.reshape(G, -1, kt * 4)
    rows = _w4a16_mma_rows(N, gated)
    codes = np.zeros((G, N, K), np.uint8)
    codes[:, rows[rows >= 0]] = cm[:, rows >= 0, :K]
    u = np.zeros((G, N, K // GROUP), np.uint8)
    u[:, rows[rows >= 0]] = um[:, rows >= 0, : K // GROUP]
    return pack(codes), e4m3_encode(w4a16_scale_value(u))


# ---------------------------------------------------------------------------------------- safetensors I/O
# Every dtype the format defines (tensors the engine does not read are copied as they are); the
# 8-bit float and BOOL tensors as their raw bytes.
_DTYPES = {"F32": (np.float32, 4), "F16": (np.float16, 2), "BF16": (None, 2), "U8": (np.uint8, 1),
           "F8_E4M3": (np.uint8, 1), "F8_E5M2": (np.uint8, 1), "F8_E8M0": (np.uint8, 1), "BOOL": (np.uint8, 1),
           "I8": (np.int8, 1), "I16": (np.int16, 2), "U16": (np.uint16, 2), "I32": (np.int32, 4),
           "U32": (np.uint32, 4), "I64": (np.int64, 8), "U64": (np.uint64, 8), "F64": (np.float64, 8),
           "C64": (np.complex64, 8)}


# The native loader's limits (csrc/model/files.h), for the files this module reads itself.
MAX_JSON_BYTES = 16 << 20           # config.json
MAX_INDEX_BYTES = 64 << 20          # model.safetensors.index.json
MAX_HEADER_BYTES = 100 << 20        # a safetensors header
MAX_JSON_DEPTH = 64


def _checkpoint_error(path: Any, reason: str) -> Exception:
    from dgemma_rt._core import CheckpointError

    return CheckpointError(f"{os.fspath(path)}: {reason}")


def _open_regular(path: str | os.PathLike) -> tuple[int, int]:
    """A read-only descriptor of a regular file and its size; anything else (a FIFO, device, socket,
    directory, missing file or symlink loop) is a CheckpointError, and opening never blocks."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        raise _checkpoint_error(path, f"cannot open: {e.strerror or e}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise _checkpoint_error(path, "not a regular file")
        return fd, st.st_size
    except BaseException:
        os.close(fd)
        raise


def _json_depth_ok(text: bytes, limit: int = MAX_JSON_DEPTH) -> bool:
    """False when brackets outside strings nest deeper than ``limit`` (checked before parsing)."""
    depth, in_str, esc = 0, False, False
    # Fast path: a text without that many opening brackets cannot nest that deep.
    if text.count(b"[") + text.count(b"{") <= limit:
        return True
    for c in text:
        if in_str:
            if esc:
                esc = False
            elif c == 0x5C:  # backslash
                esc = True
            elif c == 0x22:
                in_str = False
        elif c == 0x22:
            in_str = True
        elif c in (0x5B, 0x7B):
            depth += 1
            if depth > limit:
                return False
        elif c in (0x5D, 0x7D):
            depth -= 1
    return True


def _parse_json(text: bytes, what: Any) -> Any:
    if not _json_depth_ok(text):
        raise _checkpoint_error(what, f"JSON nested deeper than {MAX_JSON_DEPTH} levels")
    try:
        return json.loads(text.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise _checkpoint_error(what, f"not UTF-8 text (byte {e.start})") from None
    except RecursionError:
        raise _checkpoint_error(what, "JSON nested too deeply") from None
    except ValueError as e:
        raise _checkpoint_error(what, f"invalid JSON: {e}") from None


def read_json_file(path: str | os.PathLike, max_bytes: int = MAX_JSON_BYTES) -> Any:
    """A checkpoint's JSON file under the native loader's rules (regular file, bounded size and depth)."""
    fd, size = _open_regular(path)
    try:
        if size > max_bytes:
            raise _checkpoint_error(path, f"{size} bytes, more than the {max_bytes} allowed")
        with os.fdopen(fd, "rb", closefd=False) as f:
            text = f.read(max_bytes + 1)
    finally:
        os.close(fd)
    return _parse_json(text, path)


def read_safetensors_header(path: str | os.PathLike) -> tuple[list[tuple[str, str, list[int]]], dict[str, str]]:
    """(name, dtype string, shape) of each tensor in file order, and the metadata: the header only,
    checked as ``read_safetensors`` checks it, no tensor data read."""
    fd, size = _open_regular(path)
    try:
        entries, meta, _, _ = _read_header(fd, size, path)
        return [(name, dt, shape) for name, dt, shape, _ in entries], meta
    finally:
        os.close(fd)


def read_safetensors(path: str | os.PathLike) -> tuple[dict[str, tuple[str, np.ndarray]], dict[str, str]]:
    """name -> (dtype string, array; BF16 as float32, F8_E4M3 as raw codes), and the metadata.

    The file must be a regular file with a valid header (sizes, dtypes, shapes and offsets inside
    the data, as the native loader requires); anything else is a CheckpointError naming the file
    and the reason. The data is memory-mapped, not read as a whole.
    """
    fd, size = _open_regular(path)
    try:
        entries, meta, base, data_len = _read_header(fd, size, path)
        out = {}
        mm = mmap.mmap(fd, 0, access=mmap.ACCESS_READ) if data_len else None
        try:
            for name, dt, shape, (a, b) in entries:
                raw = mm[base + a : base + b] if mm is not None else b""
                if dt == "BF16":
                    arr = (np.frombuffer(raw, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)
                else:
                    arr = np.frombuffer(raw, dtype=_DTYPES[dt][0]).copy()
                out[name] = (dt, arr.reshape(shape))
        finally:
            if mm is not None:
                mm.close()
        return out, meta
    finally:
        os.close(fd)


def _read_header(fd: int, size: int, path: str | os.PathLike) -> tuple[list[Any], dict[str, str], int, int]:
    """The checked header of the open file ``fd``: entries (name, dtype, shape, data_offsets), the
    metadata, where the data starts and how long it is."""
    if size < 8:
        raise _checkpoint_error(path, f"not a safetensors file ({size} bytes)")
    with os.fdopen(fd, "rb", closefd=False) as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n > MAX_HEADER_BYTES or n > size - 8:
            raise _checkpoint_error(path, f"header length {n} is larger than the file ({size} bytes) "
                                          f"or the {MAX_HEADER_BYTES}-byte limit")
        raw_header = f.read(n)
    header = _parse_json(raw_header, f"{os.fspath(path)}: header")
    if not isinstance(header, dict):
        raise _checkpoint_error(path, "the header is not a JSON object")
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict):
        raise _checkpoint_error(path, "__metadata__ is not a JSON object")
    base, data_len = 8 + n, size - 8 - n
    entries = []
    spans = []
    for name, info in header.items():
        where = f"tensor {name!r}"
        if not isinstance(info, dict):
            raise _checkpoint_error(path, f"{where}: not a JSON object")
        dt, shape, offs = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if not isinstance(dt, str) or dt not in _DTYPES:
            raise _checkpoint_error(path, f"{where} has unsupported dtype {str(dt)[:32]!r}")
        if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
            raise _checkpoint_error(path, f"{where}: shape must be a list of non-negative integers")
        if (not isinstance(offs, list) or len(offs) != 2 or not all(type(o) is int and o >= 0 for o in offs)
                or offs[0] > offs[1] or offs[1] > data_len):
            raise _checkpoint_error(path, f"{where}: data_offsets must be [begin, end] inside the "
                                          f"{data_len} bytes of data")
        count = 1
        for d in shape:
            count *= d
        if count * _DTYPES[dt][1] != offs[1] - offs[0]:
            raise _checkpoint_error(path, f"{where}: shape {shape} of {dt} needs {count * _DTYPES[dt][1]} "
                                          f"bytes but data_offsets span {offs[1] - offs[0]}")
        entries.append((name, dt, shape, offs))
        if offs[1] > offs[0]:
            spans.append((offs[0], offs[1], name))
    spans.sort()
    for (a0, a1, an), (b0, _, bn) in zip(spans, spans[1:]):
        if b0 < a1:
            raise _checkpoint_error(path, f"tensors {an!r} and {bn!r} overlap")
    return entries, meta, base, data_len


def write_safetensors(path: str | os.PathLike, tensors: dict[str, tuple[str, np.ndarray]],
                      metadata: dict[str, str] | None = None) -> None:
    header: dict[str, Any] = {"__metadata__": metadata} if metadata else {}
    blobs, offset = [], 0
    for name, (dt, arr) in tensors.items():
        if dt == "BF16":
            b = (np.ascontiguousarray(arr, dtype=np.float32).view(np.uint32) >> 16).astype(np.uint16).tobytes()
        else:
            b = np.ascontiguousarray(arr, dtype=_DTYPES[dt][0]).tobytes()
        header[name] = {"dtype": dt, "shape": list(np.shape(arr)), "data_offsets": [offset, offset + len(b)]}
        blobs.append(b)
        offset += len(b)
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    tmp = Path(f"{path}.tmp")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h)
        for b in blobs:
            f.write(b)
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------- checkpoints
_DENSE_SUFFIXES = tuple(f"self_attn.{p}_proj.weight" for p in "qkvo") + tuple(
    f"mlp.{p}_proj.weight" for p in ("gate", "up", "down"))


def is_expert_weight(name: str) -> bool:
    return name.endswith(("experts.gate_up_proj", "experts.down_proj"))


def is_dense_weight(name: str) -> bool:
    """The layers' attention projections and dense MLP (not embeddings, LM head, router or self-conditioning)."""
    return ".layers." in name and name.endswith(_DENSE_SUFFIXES)


def _quant_format(name: str, dt: str, shape: Sequence[int], dense: str | None, experts: bool) -> str | None:
    """How ``quantize_checkpoint`` stores a tensor: ``"nvfp4"``, ``"fp8"``, or None (copied as it is)."""
    if dt not in ("F32", "BF16", "F16"):  # stored quantized already
        return None
    expert = experts and is_expert_weight(name) and len(shape) == 3
    linear = dense is not None and is_dense_weight(name) and len(shape) == 2
    if linear and dense == "fp8":
        return "fp8"
    if (expert or linear) and shape[-1] % GROUP == 0:
        return "nvfp4"
    return None


def _checkpoint_files(src: Path) -> tuple[list[Path], dict[str, Any] | None]:
    """The safetensors files the engine reads (those the index names, else every *.safetensors) and the index."""
    index_path = src / "model.safetensors.index.json"
    src_index = read_json_file(index_path, MAX_INDEX_BYTES) if os.path.lexists(index_path) else None
    if src_index is not None:
        files = sorted({src / f for f in src_index["weight_map"].values()})
    else:
        files = sorted(src.glob("*.safetensors"))
    if not files:
        raise _checkpoint_error(src, "holds no *.safetensors files")
    return files, src_index


def quantize_plan(src: str | os.PathLike, dense: str | None = None, experts: bool = True) -> list[str]:
    """The tensors ``quantize_checkpoint(src, ..., dense=dense, experts=experts)`` would quantize, from the
    safetensors headers alone: empty when there is nothing to do (the weights are stored quantized already, or
    are not in shapes the format takes)."""
    return _plan(_checkpoint_files(Path(src))[0], dense, experts)[0]


def _plan(files: list[Path], dense: str | None, experts: bool) -> tuple[list[str], set[str]]:
    """quantize_plan's tensors, and the names of every tensor in ``files``."""
    entries = [e for f in files for e in read_safetensors_header(f)[0]]
    return [name for name, dt, shape in entries if _quant_format(name, dt, shape, dense, experts) is not None], {
        e[0] for e in entries}


def quantize_checkpoint(src: str | os.PathLike, dst: str | os.PathLike, progress: bool = False,
                        dense: bool | str | None = None, experts: bool = True,
                        check: Any = None) -> list[str]:
    """Writes a quantized copy of ``src`` to ``dst``: the MoE experts in NVFP4 (unless ``experts`` is
    false) and, with ``dense`` (``"nvfp4"``, ``"fp8"``; ``True`` means ``"nvfp4"``), the attention
    projections and the dense MLP too; everything else as it was.

    Before anything is read, ``src`` goes through the native loader's checks (``check(path)`` if
    given, else ``_core.check_checkpoint`` with one batch row): anything wrong with the checkpoint
    is a ``dgemma_rt.CheckpointError`` naming the file and the reason, as ``Engine(src)`` would raise.

    Returns the names of the quantized tensors. A checkpoint with nothing to quantize (its weights are
    stored quantized already, or not in shapes the format takes; see ``quantize_plan``) is a ValueError,
    before anything is written.
    """
    dense = "nvfp4" if dense is True else (dense or None)
    if dense not in (None, "nvfp4", "fp8"):
        raise ValueError(f"dense must be None, 'nvfp4' or 'fp8', got {dense!r}")
    if not experts and dense is None:
        raise ValueError("nothing to quantize: experts=False and no dense format")
    if not os.fspath(dst):
        raise ValueError("the destination is empty: name the directory to write")
    src, dst = Path(src), Path(dst)
    # The native loader's checks first, reading headers only: files that are not regular files,
    # corrupt or oversized headers and JSON, and configs that imply more memory than this process
    # may use fail here with a CheckpointError, before anything is read or written.
    from dgemma_rt import _core

    if check is not None:
        check(os.fspath(src))
    else:
        _core.check_checkpoint(os.fspath(src), "cpu", 1, 1, 0)
    if src.resolve() == dst.resolve():
        raise ValueError("the destination must differ from the source")
    # A new or empty directory only: files left in one (another checkpoint's index and shards) would
    # be loaded with, or instead of, the new ones.
    if os.path.lexists(dst) and not dst.is_dir():
        raise ValueError(f"{dst} exists and is not a directory")
    if dst.is_dir() and any(dst.iterdir()):
        raise ValueError(f"{dst} is not empty: quantize into a new or empty directory")
    files, src_index = _checkpoint_files(src)
    plan, names = _plan(files, dense, experts)
    if not plan:
        what = " and ".join((["the MoE experts"] if experts else []) + ([f"the dense layers ({dense})"] if dense else []))
        raise ValueError(f"nothing to quantize in {os.fspath(src)}: {what} are not stored as floating point "
                         "(quantized already?), or are not in the expected shapes")
    # The loader ignores a scale beside a floating-point weight; copied, it would replace the one computed here.
    stray = sorted(n + s for n in plan for s in ("_scale", "_scale_2") if n + s in names)
    if stray:
        raise ValueError(f"{os.fspath(src)} holds {stray[0]!r} beside the floating-point tensor it would be the "
                         f"scale of ({len(stray)} such tensors; left over from another quantization?): remove them "
                         "before quantizing")
    # Written into a hidden partial directory and moved into place when complete (config.json last), so a
    # failed or interrupted run (a full disk, Ctrl-C, SIGTERM) leaves no checkpoint that loads. An existing
    # (empty) dst holds it, so the moves stay on its filesystem (a mount point) and need no rights on its
    # parent; a new dst is the partial directory itself, renamed.
    final = dst
    inside = final.is_dir()
    if inside:
        dst = Path(tempfile.mkdtemp(prefix=".partial-", dir=final))
    else:
        final.parent.mkdir(parents=True, exist_ok=True)
        dst = Path(tempfile.mkdtemp(prefix=f".{final.name}.partial-", dir=final.parent))
        # mkdtemp makes it 0700; renamed into place it is the checkpoint, which gets a new directory's mode
        # (0777 less the umask) so that a server or a shared volume's other users can read it. The setgid bit
        # a shared volume's directory passes on (files then get its group) is kept, as mkdir keeps it.
        dst.chmod((0o777 & ~_umask()) | (dst.stat().st_mode & stat.S_ISGID))
    try:
        done = _quantize_into(src, dst, files, src_index, progress, dense, experts)
        if not inside:
            os.rename(dst, final)  # refused if a non-empty final appeared meanwhile, instead of mixing two runs
        else:
            for f in sorted(dst.iterdir(), key=lambda f: f.name == "config.json"):
                os.replace(f, final / f.name)
            dst.rmdir()
    finally:
        shutil.rmtree(dst, ignore_errors=True)
    return done


def _umask() -> int:
    """The process's umask, read without setting it (os.umask would change it for every thread meanwhile)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return 0o022


def _quantize_into(src: Path, dst: Path, files: list[Path], src_index: dict[str, Any] | None, progress: bool,
                   dense: str | None, experts: bool) -> list[str]:
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(files), desc="quantizing", unit="file")
    done: list[str] = []
    index: dict[str, str] = {}
    for f in files:
        tensors, meta = read_safetensors(f)
        out: dict[str, tuple[str, np.ndarray]] = {}
        for name, (dt, arr) in tensors.items():
            fmt = _quant_format(name, dt, arr.shape, dense, experts)
            if fmt is not None and not np.all(np.isfinite(arr)):
                raise _checkpoint_error(f, f"tensor {name!r} holds NaN or Inf: it cannot be quantized")
            if fmt == "fp8":
                codes, scale = quantize_fp8(arr)
                out[name] = ("F8_E4M3", codes)
                out[name + "_scale"] = ("F32", scale)
                done.append(name)
            elif fmt == "nvfp4":
                packed, scales, gscale = quantize(arr, per_leading=arr.ndim == 3)
                out[name] = ("U8", packed)
                out[name + "_scale"] = ("F8_E4M3", scales)
                out[name + "_scale_2"] = ("F32", gscale)
                done.append(name)
            else:
                out[name] = (dt, arr)
        write_safetensors(dst / f.name, out, meta)
        index.update({name: f.name for name in out})
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    for other in src.iterdir():
        # Regular files only (is_file() follows symlinks and is False for FIFOs and devices).
        if other.is_file() and other.suffix != ".safetensors" and other.name != "model.safetensors.index.json":
            shutil.copy2(other, dst / other.name)
    if src_index is not None:
        src_index["weight_map"] = index
        (dst / "model.safetensors.index.json").write_text(json.dumps(src_index, indent=2) + "\n")
    cfg = read_json_file(src / "config.json")
    # What this pass did (tensors stored quantized already were copied), and what a first pass of ours did.
    parts = ((["moe_experts"] if any(is_expert_weight(n) for n in done) else [])
             + ([f"dense_{dense}"] if dense and any(is_dense_weight(n) for n in done) else []))
    # A second pass over a copy of ours (FP8 dense layers added to NVFP4 experts) keeps what the first did.
    before = cfg.get("quantization_config")
    if isinstance(before, dict) and before.get("producer") == "dgemma-quantize":
        parts = sorted(set(parts) | set(str(before.get("quantized", "")).split("+")) - {""})
    cfg["quantization_config"] = {"quant_method": "nvfp4" if "moe_experts" in parts or "dense_nvfp4" in parts
                                  else "fp8",
                                  "group_size": GROUP, "quantized": "+".join(parts),
                                  "producer": "dgemma-quantize"}
    (dst / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    return done


def _interrupt(*_: Any) -> None:
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="dgemma-quantize",
                                description="Write a quantized copy of a DiffusionGemma checkpoint: the MoE "
                                            "experts in NVFP4, optionally the dense layers in NVFP4 or FP8.")
    p.add_argument("src", help="BF16/F16/F32 checkpoint directory")
    p.add_argument("dst", help="output directory")
    p.add_argument("--dense", nargs="?", const="nvfp4", choices=["nvfp4", "fp8"], default=None,
                   help="also quantize the attention projections and the dense MLP: NVFP4 (the default when "
                        "given without a value) or FP8 with one scale per output channel")
    p.add_argument("--no-experts", action="store_true", help="leave the MoE experts as they are")
    args = p.parse_args(argv)
    from dgemma_rt.cli import run_reporting_errors

    def command() -> int:
        names = quantize_checkpoint(args.src, args.dst, progress=sys.stderr.isatty(), dense=args.dense,
                                    experts=not args.no_experts)
        print(f"quantized {len(names)} tensors into {args.dst}")
        return 0

    # SIGTERM (a job scheduler, docker stop) cleans up as Ctrl-C does: no partial directory left behind.
    if threading.current_thread() is not threading.main_thread():
        return run_reporting_errors(command)
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        return run_reporting_errors(command)
    finally:
        signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
