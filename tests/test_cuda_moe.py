"""CUDA MoE kernels (router, permute, GELU gate, combine, and moe_forward end to end) against numpy.

The router and permute must match numpy exactly (indices, ties broken by the lower expert), the combine
bit for bit (it adds fp32-rounded weighted rows in ascending expert order, like CpuBackend::moe_experts), and
moe_forward must be as close to a float64 port of the CPU MoE (moe_router + moe_experts, bf16-rounded weights) as the same
port is when it rounds to bf16 where the GPU path does. Skipped without a GPU; moe_forward also needs
sm_90 (its expert GEMMs are the CUTLASS grouped GEMM).
"""

import numpy as np
import pytest

import dgemma_rt
from bf16_helpers import bf16_bits, bf16_to_f32

pytestmark = pytest.mark.skipif(
    not hasattr(dgemma_rt._core, "cuda_ops") or dgemma_rt.cuda_device_count() == 0, reason="needs a CUDA GPU"
)


def ops():
    return dgemma_rt._core.cuda_ops


def _sm90_moe_forward():
    o = getattr(dgemma_rt._core, "cuda_ops", None)
    if o is None or dgemma_rt.cuda_device_count() == 0 or not hasattr(o, "moe_forward"):
        return False
    return tuple(o.device_capability()) == (9, 0)


def bf16_round(x):
    """float64/32 -> the nearest bf16 value, as float64 (the value a bf16 buffer would hold)."""
    return bf16_to_f32(bf16_bits(np.asarray(x, dtype=np.float32))).astype(np.float64)


def gelu_tanh(x):
    return 0.5 * x * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x**3)))


# ---------------------------------------------------------------------------------------------------
# Router


def router_probs(x, proj_unique, expert_map, scale, eps):
    """Softmax probabilities in float64. Logits are computed once per distinct router row and then
    expanded, so experts with identical rows tie exactly (as they do on the GPU)."""
    x64 = np.asarray(x, dtype=np.float64)
    h = x64.shape[1]
    rx = x64 / np.sqrt(np.mean(x64 * x64, axis=1, keepdims=True) + eps) * scale.astype(np.float64) * h**-0.5
    logits = (rx @ proj_unique.T)[:, expert_map]
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    return p / p.sum(axis=1, keepdims=True)


def router_select(p, k, pes):
    idx = np.argsort(-p, axis=1, kind="stable")[:, :k]  # stable: ties keep the lower expert first
    top = np.take_along_axis(p, idx, axis=1)
    return idx.astype(np.int32), top / top.sum(axis=1, keepdims=True) * pes.astype(np.float64)[idx]


def clear_tokens(p, k, rel=1e-5):
    """Tokens whose first k+1 probabilities are either exact ties or apart by more than fp32 noise:
    on those the GPU's order must equal the reference's."""
    s = -np.sort(-p, axis=1)[:, : min(k + 1, p.shape[1])]
    d = s[:, :-1] - s[:, 1:]
    near = (d > 0) & (d < rel * s[:, :1])
    return ~near.any(axis=1)


def make_router_inputs(rng, t, h, e, n_unique=None, x_scale=2.0, proj_scale=3.0):
    n_unique = e if n_unique is None else n_unique
    x = (rng.standard_normal((t, h)) * x_scale).astype(np.float32)
    proj_u = bf16_round(rng.standard_normal((n_unique, h)) * proj_scale)
    expert_map = np.arange(e) if n_unique == e else rng.integers(0, n_unique, size=e)
    scale = (1 + 0.2 * rng.standard_normal(h)).astype(np.float32)
    pes = (1 + 0.2 * rng.standard_normal(e)).astype(np.float32)
    return x, proj_u, expert_map, scale, pes


@pytest.mark.parametrize(
    "t,h,e,k,n_unique,x_bf16",
    [
        (1, 7, 5, 5, 5, False),  # k = E, odd H (scalar loads)
        (13, 100, 33, 3, 33, False),  # H not a multiple of 8
        (64, 2816, 128, 8, 128, False),  # the real router
        (256, 2816, 128, 8, 128, False),  # one real step: 32 token tiles x 4 expert tiles
        (9, 66, 130, 8, 130, False),  # H % 4 != 0 (scalar loads), E over 5 expert tiles, T over 2 token tiles
        (64, 2816, 128, 8, 128, True),  # bf16 residual
        (37, 256, 32, 8, 11, False),  # 32 experts over 11 distinct rows: ties everywhere
        (5, 64, 16, 4, 1, False),  # every expert identical: top-k = 0..k-1
        (3, 1536, 128, 8, 128, False),  # 48 KiB of dynamic shared memory + the static arrays: needs the opt-in
    ],
)
def test_router(t, h, e, k, n_unique, x_bf16):
    rng = np.random.default_rng(t * 1000 + h + e)
    x, proj_u, expert_map, scale, pes = make_router_inputs(rng, t, h, e, n_unique)
    if x_bf16:
        xb = bf16_bits(x)
        x = bf16_to_f32(xb)
    proj = proj_u[expert_map]
    got_idx, got_w = ops().moe_router(xb if x_bf16 else x, bf16_bits(proj.astype(np.float32)), scale, pes, k, 1e-6)
    assert got_idx.shape == (t, k) and got_idx.dtype == np.int32 and got_w.shape == (t, k)
    p = router_probs(x, proj_u, expert_map, scale, 1e-6)
    want_idx, want_w = router_select(p, k, pes)
    ok = clear_tokens(p, k)
    assert ok.mean() >= 0.9, "test data: too many near ties"
    np.testing.assert_array_equal(got_idx[ok], want_idx[ok])
    np.testing.assert_allclose(got_w[ok], want_w[ok], rtol=1e-4, atol=1e-7)
    if n_unique == 1:
        np.testing.assert_array_equal(got_idx, np.tile(np.arange(k, dtype=np.int32), (t, 1)))
    # Wherever the order is not pinned, the GPU still picks k distinct valid experts.
    assert all(len(set(r)) == k for r in got_idx.tolist()) and got_idx.min() >= 0 and got_idx.max() < e


def test_router_shared_memory_opt_in_first_launch():
    """H = 1536: 48 KiB of dynamic shared memory plus the kernel's static arrays, over the default limit only
    with both counted. In a fresh process, where no earlier launch (the H = 2816 cases above) has raised the
    kernel's limit already, so the launch itself must."""
    import subprocess
    import sys

    code = (
        "import numpy as np, dgemma_rt\n"
        "rng = np.random.default_rng(0)\n"
        "x = rng.standard_normal((3, 1536)).astype(np.float32)\n"
        "proj = ((rng.standard_normal((128, 1536)) * 3).astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)\n"
        "idx, w = dgemma_rt._core.cuda_ops.moe_router(x, proj, np.ones(1536, np.float32), np.ones(128, np.float32),"
        " 8, 1e-6)\n"
        "assert idx.shape == (3, 8) and 0 <= idx.min() and idx.max() < 128, idx\n"
        "print('ok')\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]


def test_router_ties_at_the_boundary():
    """Experts 3, 5 and 6 share the top row: with k = 2 the lower two (3, 5) win, 6 loses."""
    h, e = 64, 8
    rng = np.random.default_rng(1)
    proj = rng.standard_normal((e, h)) * 0.1
    top_row = np.abs(rng.standard_normal(h)) * 5
    proj[[3, 5, 6]] = top_row
    x = np.abs(rng.standard_normal((4, h))).astype(np.float32) + 1  # positive: the shared row dominates
    scale = np.ones(h, np.float32)
    pes = np.arange(1, e + 1, dtype=np.float32)
    idx, w = ops().moe_router(x, bf16_bits(proj.astype(np.float32)), scale, pes, 2, 1e-6)
    np.testing.assert_array_equal(idx, np.tile(np.array([3, 5], np.int32), (4, 1)))
    np.testing.assert_allclose(w, np.tile(np.array([0.5 * 4, 0.5 * 6], np.float32), (4, 1)), rtol=1e-6)


# ---------------------------------------------------------------------------------------------------
# Permute


def permute_ref(idx, x_bits, k, e):
    flat = idx.ravel()
    perm = np.argsort(flat, kind="stable").astype(np.int32)
    counts = np.bincount(flat, minlength=e).astype(np.int32)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
    inv = np.empty_like(perm)
    inv[perm] = np.arange(perm.size, dtype=np.int32)
    return counts, offsets, perm, inv, x_bits[perm // k]


@pytest.mark.parametrize(
    "t,k,e,h,kind,x_bf16",
    [
        (1, 8, 128, 2816, "distinct", False),
        (3, 2, 5, 13, "any", True),  # H not a multiple of 8
        (256, 8, 128, 2816, "distinct", False),  # one denoising step
        (256, 8, 128, 64, "distinct", True),
        (1000, 8, 128, 24, "distinct", False),  # 8000 slots: several 1024-slot chunks
        (300, 1, 256, 16, "one", False),  # every token on expert 7
        (77, 4, 16, 40, "any", True),  # repeats inside a token are allowed here
        (2000, 8, 128, 24, "distinct", True),  # 16,000 slots: 'auto' takes the multi-block sort
        (150, 3, 4096, 8, "any", False),  # E past the single-block limit
    ],
)
@pytest.mark.parametrize("path", ["auto", "single", "multi"])
def test_permute(t, k, e, h, kind, x_bf16, path):
    if path == "single" and e > 256:
        pytest.skip("the single-block sort takes E <= 256")
    rng = np.random.default_rng(t * 31 + k * 7 + e + h)
    idx = permute_routing(rng, t, k, e, kind)
    x = rng.standard_normal((t, h)).astype(np.float32)
    xb = bf16_bits(x)
    counts, offsets, perm, inv, xp = ops().moe_permute(idx, xb if x_bf16 else x, e, path)
    want = permute_ref(idx, xb, k, e)
    for name, g, w in zip(["counts", "offsets", "perm_slot", "inv", "xp"], [counts, offsets, perm, inv, xp], want):
        assert g.shape == w.shape, name
        np.testing.assert_array_equal(g, w, err_msg=name)


def permute_routing(rng, t, k, e, kind):
    if kind == "distinct":
        return np.stack([rng.permutation(e)[:k] for _ in range(t)]).astype(np.int32)
    if kind == "one":
        return np.full((t, k), min(7, e - 1), np.int32)
    if kind == "few":  # most experts empty
        return rng.choice(np.array([0, e // 2, e - 1]), size=(t, k)).astype(np.int32)
    if kind == "skewed":  # runs of one expert longer than a warp and a chunk
        return np.minimum(rng.geometric(0.3, size=(t, k)) - 1, e - 1).astype(np.int32)
    return rng.integers(0, e, size=(t, k)).astype(np.int32)


@pytest.mark.parametrize(
    "t,k",
    [(1, 1), (1, 8), (3, 1), (33, 1), (128, 8), (129, 8), (257, 4), (1023, 1), (1025, 1), (997, 7), (4096, 1),
     (1031, 8), (5000, 8), (40000, 1), (4999, 8)],
)
@pytest.mark.parametrize("e", [4, 128, 256])
@pytest.mark.parametrize("kind", ["any", "few", "one", "skewed"])
def test_permute_multi_block_matches_single_block(t, k, e, kind):
    """The two sorts bit for bit, without the gather (xp None), T*k from 1 to 40,000."""
    rng = np.random.default_rng(t * 17 + k * 5 + e + len(kind))
    idx = permute_routing(rng, t, k, e, kind)
    x = np.zeros((t, 1), np.float32)  # not read without the gather
    single = ops().moe_permute(idx, x, e, "single", False)
    multi = ops().moe_permute(idx, x, e, "multi", False)
    assert single[4] is None and multi[4] is None
    want = permute_ref(idx, bf16_bits(x), k, e)
    for name, s, m, w in zip(["counts", "offsets", "perm_slot", "inv"], single[:4], multi[:4], want[:4]):
        np.testing.assert_array_equal(m, s, err_msg=name)
        np.testing.assert_array_equal(m, w, err_msg=name)


@pytest.mark.parametrize("path", ["single", "multi"])
def test_permute_no_tokens(path):
    counts, offsets, perm, inv, xp = ops().moe_permute(np.zeros((0, 8), np.int32), np.zeros((0, 16), np.float32), 128, path)
    assert (counts == 0).all() and (offsets == 0).all() and perm.size == 0 and inv.size == 0 and xp.shape == (0, 16)


# ---------------------------------------------------------------------------------------------------
# GELU gate


@pytest.mark.parametrize("m,i", [(1, 704), (5, 13), (2048, 704), (3, 8)])
def test_gelu_gate(m, i):
    rng = np.random.default_rng(m + i)
    hb = bf16_bits((rng.standard_normal((m, 2 * i)) * 1.5).astype(np.float32))
    got = ops().moe_gelu_gate(hb)
    assert got.shape == (m, i) and got.dtype == np.uint16
    h = bf16_to_f32(hb).astype(np.float64)
    gate, up = h[:, :i], h[:, i:]
    ref = gelu_tanh(gate) * up
    # bf16 rounding of an fp32 value: half a bf16 ulp, plus fp32 tanh error near gelu's flat tail.
    bound = 2.0**-8 * np.abs(ref) * (1 + 1e-3) + 1e-6 * np.abs(gate) * np.abs(up) + 1e-30
    diff = np.abs(bf16_to_f32(got) - ref)
    assert (diff <= bound).all(), np.max(diff - bound)


# ---------------------------------------------------------------------------------------------------
# Combine


def combine_ref_f32(dn_bits, idx, w, inv):
    """The GPU's arithmetic exactly: fp32 products, added in ascending expert order from 0."""
    t, k = idx.shape
    dn = bf16_to_f32(dn_bits)
    out = np.zeros((t, dn.shape[1]), np.float32)
    for ti in range(t):
        acc = np.zeros(dn.shape[1], np.float32)
        for s in np.argsort(idx[ti], kind="stable"):
            acc = acc + np.float32(w[ti, s]) * dn[inv[ti * k + s]]
        out[ti] = acc
    return out


@pytest.mark.parametrize("t,k,e,h", [(1, 8, 128, 2816), (7, 1, 4, 64), (256, 8, 128, 2816), (9, 3, 10, 13)])
@pytest.mark.parametrize("out_bf16", [False, True])
def test_combine(t, k, e, h, out_bf16):
    rng = np.random.default_rng(t * 13 + k + h)
    idx = np.stack([rng.permutation(e)[:k] for _ in range(t)]).astype(np.int32)
    w = rng.random((t, k)).astype(np.float32)
    inv = rng.permutation(t * k).astype(np.int32)
    dn = bf16_bits(rng.standard_normal((t * k, h)).astype(np.float32))
    got = ops().moe_combine(dn, idx, w, inv, out_bf16)
    want = combine_ref_f32(dn, idx, w, inv)
    if out_bf16:
        assert got.dtype == np.uint16
        np.testing.assert_array_equal(got, bf16_bits(want))
    else:
        assert got.dtype == np.float32
        np.testing.assert_array_equal(got, want)


# ---------------------------------------------------------------------------------------------------
# moe_forward: the CPU MoE (CpuBackend::moe_router + moe_experts) ported to numpy


def moe_ref(x, proj_u, expert_map, router_scale, pes, ln2, gate_up, down, k, eps, emulate_bf16):
    """The CPU MoE in float64 with the given (bf16-valued) weights. With emulate_bf16 the expert
    input, gate_up output, GELU output and down output are rounded to bf16 where the GPU stores them."""
    t, h = x.shape
    e, i2, _ = gate_up.shape
    im = i2 // 2
    p = router_probs(x, proj_u, expert_map, router_scale, eps)
    idx, w = router_select(p, k, pes)
    x64 = x.astype(np.float64)
    xe = x64 / np.sqrt(np.mean(x64 * x64, axis=1, keepdims=True) + eps) * ln2.astype(np.float64)
    rnd = bf16_round if emulate_bf16 else (lambda a: a)
    xe = rnd(xe)
    slot_out = np.zeros((t * k, h))
    flat = idx.ravel()
    for ei in range(e):
        slots = np.nonzero(flat == ei)[0]
        if slots.size == 0:
            continue
        gu = rnd(xe[slots // k] @ gate_up[ei].T)
        act = rnd(gelu_tanh(gu[:, :im]) * gu[:, im:])
        dn = rnd(act @ down[ei].T)
        slot_out[slots] = dn * w.ravel()[slots, None]
    out = np.zeros((t, h))
    for ti in range(t):
        for s in np.argsort(idx[ti], kind="stable"):
            out[ti] += slot_out[ti * k + s]
    return out, p


@pytest.mark.skipif(not _sm90_moe_forward(), reason="moe_forward needs an sm_90 GPU and the CUTLASS grouped GEMM")
@pytest.mark.parametrize(
    "t,h,e,k,im",
    [
        (5, 64, 8, 2, 32),
        (37, 256, 16, 4, 48),
        (256, 512, 128, 8, 128),  # many experts, some empty
        (256, 2816, 8, 4, 704),  # the real H and I, ~128 tokens per expert (8 experts keep the reference fast)
    ],
)
def test_moe_forward(t, h, e, k, im):
    rng = np.random.default_rng(t + h + e + k + im)
    x, proj_u, expert_map, router_scale, pes = make_router_inputs(rng, t, h, e)
    ln2 = (1 + 0.1 * rng.standard_normal(h)).astype(np.float32)
    gate_up = bf16_round(rng.standard_normal((e, 2 * im, h), dtype=np.float32) / np.float32(np.sqrt(h)))
    down = bf16_round(rng.standard_normal((e, h, im), dtype=np.float32) / np.float32(np.sqrt(im)))
    args = (x, proj_u, expert_map, router_scale, pes, ln2, gate_up, down, k, 1e-6)
    ref, p = moe_ref(*args, emulate_bf16=False)
    emu, _ = moe_ref(*args, emulate_bf16=True)
    # A token's output depends only on its own routing: leave out the few whose top-k boundary is a
    # near tie that fp32 may resolve either way.
    ok = clear_tokens(p, k)
    assert ok.mean() >= 0.9, "test data: too many near ties"
    got = ops().moe_forward(
        x,
        bf16_bits(proj_u[expert_map].astype(np.float32)),
        router_scale,
        pes,
        ln2,
        bf16_bits(gate_up.astype(np.float32)),
        bf16_bits(down.astype(np.float32)),
        k,
        1e-6,
    )
    assert got.shape == (t, h) and got.dtype == np.float32
    got, ref, emu = got[ok], ref[ok], emu[ok]
    err_emu = np.abs(emu - ref)
    err_got = np.abs(got - ref)
    scale = np.max(np.abs(ref))
    assert err_emu.max() > 0  # the bound below is not vacuous
    assert err_got.max() <= 2 * err_emu.max() + 1e-5 * scale, (err_got.max(), err_emu.max())
    assert np.linalg.norm(got - ref) <= 2 * np.linalg.norm(emu - ref) + 1e-6 * np.linalg.norm(ref)
