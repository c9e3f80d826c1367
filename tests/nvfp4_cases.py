"""Inputs and the reference of the W4A16 grouped GEMM, shared by its GPU tests (test_cuda_nvfp4.py)
and by the host emulation of its warp program (test_nvfp4_w4a16.py), so both check the same cases."""

from __future__ import annotations

import numpy as np

from bf16_helpers import bf16_bits, bf16_to_f32
from dgemma_rt import nvfp4


def reference(x_bits, packed, scales, gscale, offsets):
    """float64 of (dequantized fp32 weights) against the bf16 inputs, per expert."""
    x = bf16_to_f32(x_bits).astype(np.float64)
    w = nvfp4.dequantize(packed, scales, gscale).astype(np.float64)
    y = np.zeros((x.shape[0], w.shape[1]))
    for g in range(w.shape[0]):
        y[offsets[g]:offsets[g + 1]] = x[offsets[g]:offsets[g + 1]] @ w[g].T
    return y


def offsets_of(counts) -> np.ndarray:
    return np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)


def random_case(counts, N, K):
    """Random quantized experts [G, N, K] and bf16 tokens grouped by counts: (x, packed, scales, gscale, offsets)."""
    rng = np.random.default_rng(sum(counts) + N + K)
    G = len(counts)
    offsets = offsets_of(counts)
    w = (rng.standard_normal((G, N, K)) * rng.uniform(0.01, 3, size=(G, 1, 1))).astype(np.float32)
    packed, scales, gscale = nvfp4.quantize(w, per_leading=True)
    x = bf16_bits(rng.standard_normal((int(offsets[-1]), K)).astype(np.float32))
    return x, packed, scales, gscale, offsets


def tolerance(ref, K):
    """bf16 output rounding (2^-8 relative) plus fp32 accumulation in another order."""
    return 2.0**-8 * np.abs(ref) + 1e-5 * np.sqrt(K) * np.abs(ref).max(initial=1.0)


def every_code_and_scale_case():
    """All 16 E2M1 codes under subnormal, middle and maximal E4M3 scales and a negative scale; each row keeps
    to one scale class so every partial sum is exact in fp32. (x, packed, scales, gscale, offsets)."""
    rng = np.random.default_rng(5)
    G, N, K = 2, 48, 64
    offsets = offsets_of([7, 20])
    codes = rng.integers(0, 16, size=(G, N, K)).astype(np.uint8)
    codes[0, 0, :16] = np.arange(16)  # every code once in one block
    classes = [np.arange(1, 8), np.array([0x30, 0x38, 0x3C, 0x40, 0xB8]), np.array([0x78, 0x7D, 0x7E])]
    scales = np.zeros((G, N, K // 16), np.uint8)
    for n in range(N):
        cl = classes[n % 3]
        scales[:, n] = cl[rng.integers(0, len(cl), size=(G, K // 16))]
    gscale = np.array([1.0, 0.25], dtype=np.float32)
    x = bf16_bits(rng.integers(-1, 2, size=(int(offsets[-1]), K)).astype(np.float32))
    return x, nvfp4.pack(codes), scales, gscale, offsets
