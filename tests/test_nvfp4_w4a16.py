"""The W4A16 grouped GEMM's pre-shuffled weight layout and bit-trick decode, checked on the CPU.

The kernel (csrc/kernels/nvfp4/grouped_gemm_nvfp4.cu) cannot run here; what it computes from its weights
can: the decode formulas below are transcribed from csrc/common/nvfp4_w4a16_layout.h (the functions the
kernel runs), evaluated in numpy for every E2M1 code and every E4M3 scale against dgemma_rt.nvfp4; the
whole per-lane read path (offsets, decode, scale, bf16 product, A-fragment map) is emulated in numpy from
the shuffled bytes, and the C++ functions themselves run on the host through the bindings."""

import numpy as np
import pytest

import dgemma_rt
from dgemma_rt import nvfp4

has_cpp = pytest.mark.skipif(not hasattr(dgemma_rt._core, "cuda_ops"), reason="built without the CUDA sources")

MASK = 0x81C081C0


def rotr(x, r):
    x = np.asarray(x, dtype=np.uint64)
    return ((x >> r) | (x << (32 - r))) & 0xFFFFFFFF


def decode_word(y):
    """decode_word: one lane word -> A-fragment registers a0..a3 (bf16x2 bit patterns)."""
    y = np.asarray(y, dtype=np.uint64)
    return [y & MASK,
            (((y << 2) & 0x80C080C0) | (rotr(y, 6) & 0x01000100)) & 0xFFFFFFFF,
            (y << 6) & MASK,
            rotr(y, 4) & MASK]


def scale_pair(word, j):
    """scale_pair: the bf16x2 (rows gid, gid + 8) of scale * 2^119 at k-step j from scale word j // 2."""
    word = np.asarray(word, dtype=np.uint64)
    x = (word >> 4) if j & 1 else (word << 4) & 0xFFFFFFFF
    return (x & 0x0FF00FF0) | 0x70007000


def bf16_value(bits):
    return (np.asarray(bits, dtype=np.uint64).astype(np.uint32) << 16).view(np.float32)


def half(reg, h):
    return (np.asarray(reg, dtype=np.uint64) >> (16 * h)) & 0xFFFF


def test_word_bits_are_a_permutation():
    bits = [nvfp4.w4a16_word_bit(i, h, b) for i in range(4) for h in range(2) for b in range(4)]
    assert sorted(bits) == list(range(32))


def test_decode_formulas_move_each_word_bit_to_its_target():
    """Word bit q lands at exactly one bit of one register: the one word_bit says, with no other bit set."""
    for i in range(4):
        for h in range(2):
            for b in range(4):
                q = nvfp4.w4a16_word_bit(i, h, b)
                regs = decode_word(np.uint64(1) << np.uint64(q))
                target = 16 * h + (6 + b if b < 3 else 15)
                for r, v in enumerate(regs):
                    assert int(v) == (1 << target if r == i else 0), (i, h, b, q, r, hex(int(v)))


def word_of(codes):
    """codes[i][h] -> the lane word (the shuffle's packing of one fragment)."""
    w = 0
    for i in range(4):
        for h in range(2):
            for b in range(4):
                w |= ((int(codes[i][h]) >> b) & 1) << nvfp4.w4a16_word_bit(i, h, b)
    return w


@pytest.mark.parametrize("i,h", [(i, h) for i in range(4) for h in range(2)])
def test_every_e2m1_code_decodes_to_its_value_times_2_pow_minus_126(i, h):
    for c in range(16):
        codes = [[0, 0] for _ in range(4)]
        codes[i][h] = c
        regs = decode_word(word_of(codes))
        got = bf16_value(half(regs[i], h)).astype(np.float64)
        want = float(nvfp4.e2m1_decode(np.array([c]))[0]) * 2.0**-126  # code 1 (0.5): the bf16 subnormal 2^-127
        assert got == want and np.signbit(got) == bool(c & 8), (c, got, want)
        assert all(int(r) == 0 for k, r in enumerate(regs) if k != i) and int(half(regs[i], 1 - h)) == 0


def test_every_e4m3_scale_reencodes_and_decodes_exactly():
    codes = np.arange(127, dtype=np.uint8)  # every finite non-negative E4M3 code, subnormals and 448 included
    u = nvfp4.w4a16_scale_code(codes)
    np.testing.assert_array_equal(nvfp4.w4a16_scale_value(u), nvfp4.e4m3_decode(codes))
    assert u[0] == 0 and np.all(u[1:] > 0) and len(np.unique(u)) == 127
    for j in range(4):
        hi, lo = np.roll(u, 1), u  # any two scales: rows gid (low half) and gid + 8 (high half)
        word = np.zeros(127, np.uint64)
        word |= lo.astype(np.uint64) << np.uint64(8 * (2 * 0 + (j & 1)))
        word |= hi.astype(np.uint64) << np.uint64(8 * (2 * 1 + (j & 1)))
        s = scale_pair(word, j)
        for hh, src in ((0, lo), (1, hi)):
            got = bf16_value(half(s, hh)).astype(np.float64)
            want = nvfp4.w4a16_scale_value(src).astype(np.float64) * 2.0**119
            ok = src != 0  # a zero scale (its codes are zeroed at load) decodes to 2^97, never used
            np.testing.assert_array_equal(got[ok], want[ok])


def test_products_are_exact_bf16_for_every_code_and_scale():
    """(e2m1 * 2^-126) * (scale * 2^119) is exactly e2m1 * scale * 2^-7 and a bf16 (HMUL2.BF16 cannot
    round it), for all 16 x 126 pairs; x 2^7 it is the numpy dequantization."""
    vals = np.array([bf16_value(half(decode_word(word_of([[c, 0], [0, 0], [0, 0], [0, 0]]))[0], 0))
                     for c in range(16)], dtype=np.float32)
    u = nvfp4.w4a16_scale_code(np.arange(1, 127, dtype=np.uint8))
    s = bf16_value(((u.astype(np.uint64) << 4) | 0x7000)).astype(np.float32)
    prod = vals[:, None] * s[None, :]  # float32: exact (<= 6 significant bits, no underflow)
    exact = vals.astype(np.float64)[:, None] * s.astype(np.float64)[None, :]
    np.testing.assert_array_equal(prod.astype(np.float64), exact)
    assert np.all(prod.view(np.uint32) & 0xFFFF == 0)  # representable in bf16
    nz = prod != 0
    assert np.abs(prod[nz]).min() >= 2.0**-126  # normal: no flush-to-zero can touch it
    ref = nvfp4.e2m1_decode(np.arange(16, dtype=np.uint8))[:, None] * nvfp4.e4m3_decode(np.arange(1, 127, dtype=np.uint8))[None, :]
    np.testing.assert_array_equal(prod * np.float32(nvfp4.W4A16_ACC_SCALE), ref.astype(np.float32))


def emulate(shuffled, N, K, gated):
    """numpy: every lane's reads and decode, placed by the mma.m16n8k16 A-fragment map -> e2m1 * scale."""
    groups, kt, nbytes = nvfp4.w4a16_sizes(N, K, gated)
    G = shuffled.shape[0]
    unit = shuffled.reshape(G, groups, kt, nvfp4.W4A16_UNIT_BYTES)
    lane = np.arange(32)
    words = np.ascontiguousarray(unit[..., :4096]).view("<u4").reshape(G, groups, kt, 8, 32, 4).astype(np.uint64)
    sw = np.ascontiguousarray(unit[..., 4096:]).view("<u4").reshape(G, groups, kt, 8, 8, 2).astype(np.uint64)
    sw = sw[:, :, :, :, lane // 4, :]  # lane group gid = lane // 4 reads 8 bytes at 8 * gid
    out = np.full((G, N, K), np.nan, np.float32)
    hits = np.zeros((G, N, K), np.int64)
    rows = nvfp4._w4a16_mma_rows(N, gated).reshape(groups, 8, 16)
    for j in range(4):
        regs = decode_word(words[..., j])
        s = scale_pair(sw[..., j // 2], j)
        for i in range(4):
            for h in range(2):
                v = bf16_value(half(regs[i], h)) * bf16_value(half(s, i & 1))  # [G, C, KT, W, 32]
                assert np.all(v.view(np.uint32) & 0xFFFF == 0)
                r = lane // 4 + 8 * (i & 1)
                kk = 2 * (lane % 4) + h + 8 * (i >> 1)
                n = rows[:, :, r]                                  # [C, W, 32]
                k = 64 * np.arange(kt)[:, None] + 16 * j + kk      # [KT, 32]
                nb = np.broadcast_to(n[:, None, :, :], (groups, kt, 8, 32))
                kb = np.broadcast_to(k[None, :, None, :], (groups, kt, 8, 32))
                ok = (nb >= 0) & (kb < K)
                assert np.all(v[:, ~ok] == 0)                     # padding decodes to zero
                val = v[:, ok] * np.float32(nvfp4.W4A16_ACC_SCALE)
                out[:, nb[ok], kb[ok]] = val
                np.add.at(hits, (slice(None), nb[ok], kb[ok]), 1)
    assert np.all(hits == 1)
    return out


SHAPES = [(2, 72, 48, False), (1, 40, 96, True), (3, 17, 16, False), (2, 18, 80, True), (1, 2816, 704, False)]


def random_nvfp4(rng, G, N, K):
    """Random codes and scales, with the cases the shuffle canonicalises: negative, zero and subnormal scales."""
    codes = rng.integers(0, 16, size=(G, N, K)).astype(np.uint8)
    scales = rng.integers(0, 127, size=(G, N, K // 16)).astype(np.uint8)
    scales[..., ::3] = rng.integers(0, 8, size=scales[..., ::3].shape)      # subnormal and zero scales
    scales[..., 1::4] |= 0x80                                               # negative scales
    return nvfp4.pack(codes), scales


@pytest.mark.parametrize("G,N,K,gated", SHAPES)
def test_shuffle_round_trip_and_emulated_reads(G, N, K, gated):
    rng = np.random.default_rng(G * 1000 + N + K)
    packed, scales = random_nvfp4(rng, G, N, K)
    ref = nvfp4.dequantize(packed, scales, np.ones(G, np.float32))
    sh = nvfp4.shuffle_w4a16(packed, scales, gated)
    assert sh.shape == (G, nvfp4.w4a16_sizes(N, K, gated)[2])
    p2, s2 = nvfp4.unshuffle_w4a16(sh, N, K, gated)
    np.testing.assert_array_equal(nvfp4.dequantize(p2, s2, np.ones(G, np.float32)), ref)
    np.testing.assert_array_equal(emulate(sh, N, K, gated), ref)
    # quantizer output is canonical already: the round trip returns it unchanged
    w = rng.standard_normal((G, N, K)).astype(np.float32)
    qp, qs, _ = nvfp4.quantize(w, per_leading=True)
    p3, s3 = nvfp4.unshuffle_w4a16(nvfp4.shuffle_w4a16(qp, qs, gated), N, K, gated)
    np.testing.assert_array_equal(p3, qp)
    np.testing.assert_array_equal(s3, qs)


def test_real_shapes_cost_exactly_4_5_bits_per_weight():
    assert nvfp4.w4a16_sizes(2 * 704, 2816, True) == (11, 44, 2 * 704 * 2816 * 9 // 16)
    assert nvfp4.w4a16_sizes(2816, 704, False) == (22, 11, 2816 * 704 * 9 // 16)


def test_shuffle_refuses_nan_scales():
    packed, scales = np.zeros((1, 16, 8), np.uint8), np.full((1, 16, 1), 0x38, np.uint8)
    scales[0, 3, 0] = 0x7F
    with pytest.raises(ValueError, match="NaN"):
        nvfp4.shuffle_w4a16(packed, scales)


# ---- the C++ functions the kernel runs, on the host

@has_cpp
@pytest.mark.parametrize("G,N,K,gated", SHAPES)
def test_cpp_shuffle_matches_numpy(G, N, K, gated):
    rng = np.random.default_rng(N * K + G)
    packed, scales = random_nvfp4(rng, G, N, K)
    np.testing.assert_array_equal(dgemma_rt._core.cuda_ops.nvfp4_shuffle_w4a16(packed, scales, gated),
                                  nvfp4.shuffle_w4a16(packed, scales, gated))


@has_cpp
@pytest.mark.parametrize("G,N,K,gated", SHAPES + [(1, 2 * 704, 2816, True)])
def test_cpp_kernel_read_path_reproduces_the_matrix(G, N, K, gated):
    """The kernel's offsets, decode_word, scale_pair, fragment and row maps (the C++ functions, run on the
    host) read back exactly e2m1 * scale of every weight, each once."""
    rng = np.random.default_rng(G + N + K)
    packed, scales = random_nvfp4(rng, G, N, K)
    ops = dgemma_rt._core.cuda_ops
    got = ops.nvfp4_emulate_w4a16(ops.nvfp4_shuffle_w4a16(packed, scales, gated), N, K, gated)
    np.testing.assert_array_equal(got, nvfp4.dequantize(packed, scales, np.ones(G, np.float32)))


@has_cpp
def test_cpp_shuffle_refuses_nan_scales():
    scales = np.full((1, 16, 1), 0x38, np.uint8)
    scales[0, 5, 0] = 0xFF
    with pytest.raises(ValueError, match="NaN"):
        dgemma_rt._core.cuda_ops.nvfp4_shuffle_w4a16(np.zeros((1, 16, 8), np.uint8), scales)


# ---- the whole warp program (activation tiles, ldmatrix addresses, MMAs, epilogue) emulated on the host

from nvfp4_cases import every_code_and_scale_case, random_case, tolerance  # noqa: E402
from nvfp4_cases import reference as gemm_reference  # noqa: E402


def emulate_gemm(x, packed, scales, gscale, offsets, gated=False, gather=None, gather_div=1):
    ops = dgemma_rt._core.cuda_ops
    N, K = packed.shape[1], packed.shape[2] * 2
    return ops.nvfp4_emulate_w4a16_gemm(x, ops.nvfp4_shuffle_w4a16(packed, scales, gated), gscale, offsets, N, K,
                                        gated, gather, gather_div)


@has_cpp
@pytest.mark.parametrize("counts,N,K", [
    ([0, 1, 15, 17, 64, 65, 130], 72, 48),  # empty, one token, n8 tile edges, a second and a third pass
    ([3, 9], 24, 80),                       # N not a multiple of 16, K not a multiple of 64
    ([5, 33], 2816, 128),                   # the down projection's N
])
def test_emulated_gemm_matches_reference(counts, N, K):
    from bf16_helpers import bf16_to_f32
    x, packed, scales, gscale, offsets = random_case(counts, N, K)
    y = bf16_to_f32(emulate_gemm(x, packed, scales, gscale, offsets)).astype(np.float64)
    ref = gemm_reference(x, packed, scales, gscale, offsets)
    assert np.all(np.abs(y - ref) <= tolerance(ref, K))


@has_cpp
def test_emulated_gemm_every_code_and_scale_exact():
    """The GPU test's inputs (test_cuda_nvfp4.py): every partial sum exact in fp32, so y is exactly the bf16
    rounding of the exact product."""
    from bf16_helpers import bf16_bits
    x, packed, scales, gscale, offsets = every_code_and_scale_case()
    ref = gemm_reference(x, packed, scales, gscale, offsets)
    assert np.array_equal(ref.astype(np.float32).astype(np.float64), ref)
    np.testing.assert_array_equal(emulate_gemm(x, packed, scales, gscale, offsets), bf16_bits(ref.astype(np.float32)))


@has_cpp
@pytest.mark.parametrize("counts,I,K", [([0, 1, 15, 17, 64, 65], 36, 48), ([16, 40], 704, 64)])
def test_emulated_gated_gemm_is_gelu_gate_of_the_gemm(counts, I, K):
    from bf16_helpers import bf16_bits, bf16_to_f32
    rng = np.random.default_rng(I + K)
    G = len(counts)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
    w = (rng.standard_normal((G, 2 * I, K)) * K**-0.5).astype(np.float32)
    packed, scales, gscale = nvfp4.quantize(w, per_leading=True)
    x = bf16_bits(rng.standard_normal((int(offsets[-1]), K)).astype(np.float32))
    h = bf16_to_f32(emulate_gemm(x, packed, scales, gscale, offsets)).astype(np.float64)
    fused = bf16_to_f32(emulate_gemm(x, packed, scales, gscale, offsets, gated=True)).astype(np.float64)
    gate, up = h[:, :I], h[:, I:]
    want = 0.5 * gate * (1 + np.tanh(0.7978845608028654 * (gate + 0.044715 * gate**3))) * up
    np.testing.assert_allclose(fused, want, rtol=2.0**-7, atol=1e-6)


@has_cpp
@pytest.mark.parametrize("gated", [False, True])
def test_emulated_gather_equals_permuted_input(gated):
    rng = np.random.default_rng(17)
    T, k, G, I, K = 37, 4, 6, 40, 64
    experts = np.stack([rng.permutation(G)[:k] for _ in range(T)])
    perm_slot = np.arange(T * k)[np.argsort(experts.reshape(-1), kind="stable")].astype(np.int32)
    offsets = np.concatenate([[0], np.cumsum(np.bincount(experts.reshape(-1), minlength=G))]).astype(np.int32)
    from bf16_helpers import bf16_bits
    xe = bf16_bits(rng.standard_normal((T, K)).astype(np.float32))
    w = (rng.standard_normal((G, 2 * I, K)) * K**-0.5).astype(np.float32)
    packed, scales, gscale = nvfp4.quantize(w, per_leading=True)
    unfused = emulate_gemm(xe[perm_slot // k], packed, scales, gscale, offsets, gated)
    fused = emulate_gemm(xe, packed, scales, gscale, offsets, gated, perm_slot, k)
    np.testing.assert_array_equal(fused, unfused)


@has_cpp
def test_shared_memory_accesses_are_conflict_free():
    """cp.async writes (8 consecutive chunks of a token row per 128-byte wavefront) and each ldmatrix phase
    (8 lanes' 16-byte rows) touch 8 different 16-byte bank groups."""
    chunks, ldsm = dgemma_rt._core.cuda_ops.nvfp4_w4a16_smem_offsets()
    assert sorted(chunks.reshape(-1)) == list(range(0, 64 * 128, 16))  # a permutation of the tile's chunks
    assert all(len(set((chunks[r] // 16) % 8)) == 8 for r in range(64))
    for j in range(4):
        for np_ in range(4):
            for phase in range(4):
                rows = ldsm[j, np_, 8 * phase: 8 * phase + 8]
                assert len(set((rows // 16) % 8)) == 8, (j, np_, phase, rows)
