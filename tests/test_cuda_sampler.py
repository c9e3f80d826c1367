"""CUDA denoising sampler (sample_canvas, accept_canvas) against numpy mirrors of the CPU scheduler
(csrc/backend/cpu/sample.cpp: sample_position; csrc/runtime/scheduler.cpp: the acceptance / stopping code).
Skipped without a GPU."""

import numpy as np
import pytest

import dgemma_rt
from bf16_helpers import bf16_bits, bf16_to_f32

pytestmark = pytest.mark.skipif(
    not hasattr(dgemma_rt._core, "cuda_ops") or dgemma_rt.cuda_device_count() == 0, reason="needs a CUDA GPU"
)

U_TOP = 1.0 - 2.0**-53  # the largest uniform the engine's noise source yields


def ops():
    return dgemma_rt._core.cuda_ops


# ---------------------------------------------------------------------------------------------
# sample_canvas


def sample_ref(raw, temperature, uniform, L):
    """sample_position for every row of raw [P, V], vectorised; float32 where the CPU uses float."""
    P, V = raw.shape
    t = np.repeat(temperature, L).astype(np.float32)[:, None]
    x = raw / t
    mx = x.max(axis=1, keepdims=True)
    am = np.argmax(x, axis=1).astype(np.int32)  # first index of the max
    e = np.exp(x - mx)
    s = np.sum(e.astype(np.float64), axis=1, keepdims=True)
    inv = np.float32(1) / s.astype(np.float32)
    lse = mx + np.log(s.astype(np.float32))
    prob = e * inv
    cdf = np.cumsum(prob.astype(np.float64), axis=1)
    with np.errstate(invalid="ignore"):  # p = 0 terms add nothing, also at a -inf logit (0 * -inf)
        terms = np.where(prob != 0, prob.astype(np.float64) * (x - lse).astype(np.float64), 0.0)
    ent = (-np.sum(terms, axis=1)).astype(np.float32)
    total = cdf[:, -1]
    target = uniform * total
    tok = np.array([np.searchsorted(cdf[i], target[i], side="right") for i in range(P)])
    clamped = tok >= V
    tok = np.minimum(tok, V - 1)
    # Distance from the target to the edges of the chosen token's CDF interval: where it is tiny, the
    # GPU's float32 probabilities (expf differs from the CPU's by an ulp or two: ~4e-7 relative) or
    # its 2^-62 quantisation may legitimately pick a neighbour.
    rows = np.arange(P)
    upper = cdf[rows, tok] - target
    lower = np.where(tok > 0, target - cdf[rows, np.maximum(tok - 1, 0)], np.inf)
    decidable = (np.minimum(upper, lower) > 1e-6 * total) & ~clamped
    return dict(x=x, prob=prob, tok=tok.astype(np.int32), am=am, ent=ent, lse=lse[:, 0], decidable=decidable)


SHARPNESS = ["flat", "medium", "peaked", "onehot"]


def make_logits(rng, P, V, sharpness):
    if sharpness == "flat":
        x = 0.1 * rng.standard_normal((P, V))
    elif sharpness == "medium":
        x = 3.0 * rng.standard_normal((P, V))
    elif sharpness == "peaked":
        x = 30.0 * np.tanh(10.0 * rng.standard_normal((P, V)) / 30.0)  # soft-capped
    else:  # one-hot-ish: everything on the soft-cap floor but one to three tokens
        x = np.full((P, V), -30.0)
        for i in range(P):
            k = rng.integers(1, 4)
            x[i, rng.integers(0, V, size=k)] = rng.uniform(5.0, 29.0, size=k)
        if V >= 3 and P >= 2:  # an exact tie for the max: argmax must be the first index
            x[1, V // 3] = x[1, 2 * V // 3] = 29.5
    return x.astype(np.float32)


SPECIAL_U = [0.0, U_TOP, 0.999999, 0.5, 1e-9]  # the first positions get these


def make_uniform(rng, P):
    u = rng.random(P)
    n = min(P, len(SPECIAL_U))
    u[:n] = SPECIAL_U[:n]
    return u


CASES = [(1, 3, 5), (7, 4, 16), (1000, 3, 33), (32768, 2, 16), (262144, 1, 16)]  # (V, rows, L)


@pytest.mark.parametrize("V,rows,L", CASES)
@pytest.mark.parametrize("sharpness", SHARPNESS)
@pytest.mark.parametrize("in_place", [True, False])
def test_sample_canvas(V, rows, L, sharpness, in_place):
    rng = np.random.default_rng(V * 7 + rows * 131 + L + SHARPNESS.index(sharpness) * 100003)
    P = rows * L
    raw = make_logits(rng, P, V, sharpness)
    temperature = np.array([0.4, 0.8, 0.55, 1.0, 0.37][:rows], dtype=np.float32)
    uniform = make_uniform(rng, P)
    active = np.ones(rows, dtype=np.int32)
    if rows > 1:
        active[-1] = 0
    want_probs = V <= 32768
    out = ops().sample_canvas(raw, temperature, uniform, active, in_place=in_place, want_probs=want_probs)
    proc, tok, am, ent = out[:4]

    pos_active = np.repeat(active != 0, L)
    on = np.flatnonzero(pos_active)
    ref = sample_ref(raw[on], temperature[active != 0], uniform[on], L)

    # Inactive rows: nothing written (the binding starts outputs at all-ones bytes).
    off = np.flatnonzero(~pos_active)
    if in_place:
        np.testing.assert_array_equal(proc[off].view(np.uint32), raw[off].view(np.uint32))
    else:
        assert (proc[off].view(np.uint32) == 0xFFFFFFFF).all()
    assert (tok[off] == -1).all() and (am[off] == -1).all() and np.isnan(ent[off]).all()

    # Processed logits: IEEE division, bit for bit; argmax exactly.
    np.testing.assert_array_equal(proc[on].view(np.uint32), ref["x"].view(np.uint32))
    np.testing.assert_array_equal(am[on], ref["am"])

    # Entropy: rtol 1e-5, plus what float32 logsumexp rounding allows (lse is rounded to float32, and
    # log(float(sum)) moves by an ulp of 1 when the sum's float rounding differs).
    atol = 2 * np.spacing(np.abs(ref["lse"]).astype(np.float32)) + 2.5e-7
    err = np.abs(ent[on].astype(np.float64) - ref["ent"])
    assert (err <= 1e-5 * np.abs(ref["ent"]) + atol).all(), f"entropy error {err.max()}"

    # Sampled tokens: exactly, where the target is not within 1e-6 of the chosen interval's edges.
    dec = ref["decidable"]
    bad = np.flatnonzero(dec & (tok[on] != ref["tok"]))
    assert bad.size == 0, f"tokens differ at {bad[:10]}: got {tok[on][bad[:10]]}, want {ref['tok'][bad[:10]]}"
    assert ((tok[on] >= 0) & (tok[on] < V)).all()
    # Skips must stay rare among the random uniforms (the special ones sit on edges by design); flat
    # distributions over a big vocabulary have intervals of ~1/V, so a 2e-6 window skips ~2e-6 * V.
    plain = on >= len(SPECIAL_U)
    max_skip = 0.75 if sharpness == "flat" and V >= 32768 else 0.25
    skipped = int((~dec[plain]).sum())
    assert skipped <= max_skip * plain.sum() + 1, f"{skipped} of {plain.sum()} positions skipped"
    # Never a token the reference gives (numerically) no mass.
    assert (ref["prob"][np.arange(on.size), tok[on]] > 0).all()

    if want_probs:
        probs = out[4]
        assert (probs[off] == 0xFFFF).all()
        want = ref["prob"]
        got = bf16_to_f32(probs[on])
        assert (np.abs(got - want) <= (2.0**-8 + 1e-6) * want + 1e-37).all()
        assert np.mean(probs[on] == bf16_bits(want)) > 0.99


@pytest.mark.parametrize("V", [1, 7, 1000, 4099])
def test_sample_canvas_uniform_edges(V):
    """u = 0 takes the first token, u = 1 - 2^-53 the last, whenever every token has real mass."""
    rng = np.random.default_rng(V)
    raw = np.concatenate([np.zeros((2, V)), rng.standard_normal((2, V))]).astype(np.float32)
    temperature = np.array([0.7, 0.45], dtype=np.float32)
    uniform = np.array([0.0, U_TOP, 0.0, U_TOP])
    _, tok, _, _ = ops().sample_canvas(raw, temperature, uniform, None)
    np.testing.assert_array_equal(tok, [0, V - 1, 0, V - 1])


def test_sample_canvas_tiny_masses_and_non_finite_rows():
    """The ends of the float range. Tokens below the 2^-62 quantum are never drawn: at u = 0 the first
    token of p >= 2^-62 (sampler.cuh; the CPU's float64 CDF takes e^-50 / 5 and the subnormal e^-100
    there, one draw in 2^53). A -inf logit has no mass and adds nothing to the entropy; a row without
    mass (NaN) takes the CPU's clamp to V - 1 with a NaN entropy."""
    inf, nan = np.inf, np.nan
    raw = np.array(
        [
            [0, 50, 50, 50, 50, 50],
            [-100, -100, -100, -100, -100, 0],
            [-inf, 1, -inf, 2, -inf, 0.5],
            [-inf, 1, -inf, 2, -inf, 0.5],
            [nan] * 6,
        ],
        dtype=np.float32,
    )
    temperature = np.ones(len(raw), dtype=np.float32)
    uniform = np.array([0.0, 0.0, 0.0, 0.5, 0.3])
    _, tok, am, ent = ops().sample_canvas(raw, temperature, uniform, None)
    ref = sample_ref(raw[:4], temperature[:4], uniform[:4], 1)
    np.testing.assert_array_equal(ref["tok"][:2], [0, 0])  # the CPU's rule
    np.testing.assert_array_equal(tok[:4], [1, 5, 1, ref["tok"][3]])
    np.testing.assert_array_equal(tok[2:4], ref["tok"][2:4])
    np.testing.assert_array_equal(am[:4], ref["am"])
    assert np.isfinite(ent[:4]).all()
    np.testing.assert_allclose(ent[:4], ref["ent"], rtol=1e-5, atol=1e-6)
    assert tok[4] == raw.shape[1] - 1 and np.isnan(ent[4])


def test_sample_canvas_flat_quantiles():
    """Equal logits: token = floor(u * V) away from the interval edges, for many u at once."""
    V, L = 1000, 512
    raw = np.full((L, V), 3.25, dtype=np.float32)
    rng = np.random.default_rng(5)
    uniform = (rng.integers(0, V, size=L) + rng.uniform(0.01, 0.99, size=L)) / V
    _, tok, am, ent = ops().sample_canvas(raw, np.array([0.6], dtype=np.float32), uniform, None)
    np.testing.assert_array_equal(tok, np.floor(uniform * V).astype(np.int32))
    assert (am == 0).all()
    np.testing.assert_allclose(ent, np.log(V), rtol=1e-5)


def test_sample_canvas_deterministic():
    rng = np.random.default_rng(11)
    rows, L, V = 2, 64, 32768
    raw = make_logits(rng, rows * L, V, "medium")
    temperature = np.array([0.5, 0.75], dtype=np.float32)
    uniform = rng.random(rows * L)
    a = ops().sample_canvas(raw, temperature, uniform, None, want_probs=True)
    b = ops().sample_canvas(raw, temperature, uniform, None, want_probs=True)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(np.asarray(x).view(np.uint8), np.asarray(y).view(np.uint8))


def test_sample_canvas_rejects_bad_shapes():
    with pytest.raises(Exception):
        ops().sample_canvas(np.zeros((6, 4), np.float32), np.ones(4, np.float32), np.zeros(6), None)
    with pytest.raises(Exception):  # vocabulary above kSampleMaxVocab
        ops().sample_canvas(np.zeros((1, (1 << 20) + 1), np.float32), np.ones(1, np.float32), np.zeros(1), None)


# ---------------------------------------------------------------------------------------------
# accept_canvas


def accept_ref(entropy, sampled, fresh, argmax, history, active, bound, thr, conf, adaptive, canvas, finished):
    """The CPU's loop over active rows, operation for operation."""
    canvas, history, finished = canvas.copy(), history.copy(), finished.copy()
    rows, L = entropy.shape
    bound32 = np.float32(bound)
    for r in range(rows):
        if not active[r]:
            continue
        cum = 0.0
        for j in np.argsort(entropy[r], kind="stable"):
            e = entropy[r, j]
            cum += float(e)
            canvas[r, j] = sampled[r, j] if np.float32(cum) - e <= bound32 else fresh[r, j]
        if adaptive:
            stable = True
            if thr > 0:
                stable = all((history[k, r] == argmax[r]).all() for k in range(thr))
                history[: thr - 1, r] = history[1:thr, r].copy()
                history[thr - 1, r] = argmax[r]
            esum = np.float32(0)
            for j in range(L):
                esum = np.float32(esum + entropy[r, j])
            if stable and float(esum / np.float32(L)) < conf:
                finished[r] = 1
    return canvas, history, finished


def make_accept_case(rng, rows, L, thr):
    # Entropies from a small set (many ties, so the stable order matters at the acceptance edge),
    # then some continuous ones; rows 0 and 1 are all-tied; tiny entropies make rows confident.
    levels = np.array([0.0, 1e-4, 0.003, 0.01, 0.01, 0.02, 0.05, 0.1, 0.5, 2.0], dtype=np.float32)
    entropy = rng.choice(levels, size=(rows, L)).astype(np.float32)
    cont = rng.random((rows, L)) < 0.3
    entropy[cont] = rng.exponential(0.05, size=cont.sum()).astype(np.float32)
    entropy[0] = np.float32(0.01)
    if rows > 1:
        entropy[1] = np.float32(1e-4)
    for r in (1, 3, 4, 5, 8):
        if r < rows:
            entropy[r] = rng.choice(levels[:3], size=L)  # confident rows
    vocab = 262144
    sampled = rng.integers(0, vocab, size=(rows, L), dtype=np.int32)
    fresh = rng.integers(0, vocab, size=(rows, L), dtype=np.int32)
    argmax = rng.integers(0, vocab, size=(rows, L), dtype=np.int32)
    history = np.broadcast_to(argmax, (thr, rows, L)).copy()
    for r in range(rows):  # a third stays stable, a third differs in one entry, a third is random
        if thr == 0:
            continue
        if r % 3 == 1:
            history[rng.integers(0, thr), r, rng.integers(0, L)] += 1
        elif r % 3 == 2:
            history[:, r] = rng.integers(0, vocab, size=(thr, L))
    active = (rng.random(rows) < 0.75).astype(np.int32)
    active[0] = 1
    if rows > 3:  # row 3 is stable and confident; row 0 is neither; row 2 is skipped
        active[2], active[3] = 0, 1
    canvas = rng.integers(0, vocab, size=(rows, L), dtype=np.int32)
    finished = (rng.random(rows) < 0.2).astype(np.int32)
    finished[0] = 0
    if rows > 3:
        finished[3] = 0
    return entropy, sampled, fresh, argmax, history, active, canvas, finished


@pytest.mark.parametrize("L", [1, 16, 256, 1000, 1024])
@pytest.mark.parametrize("thr", [0, 1, 2])
@pytest.mark.parametrize("bound", [0.1, 0.05, 1.0])
@pytest.mark.parametrize("adaptive", [True, False])
def test_accept_canvas(L, thr, bound, adaptive):
    rng = np.random.default_rng(L * 10 + thr + int(bound * 100) * 1000 + adaptive)
    rows = 9
    entropy, sampled, fresh, argmax, history, active, canvas, finished = make_accept_case(rng, rows, L, thr)
    conf = 0.005
    got = ops().accept_canvas(entropy, sampled, fresh, argmax, history, active, bound, thr, conf, adaptive,
                              canvas=canvas, finished=finished)
    want = accept_ref(entropy, sampled, fresh, argmax, history, active, bound, thr, conf, adaptive, canvas, finished)
    for name, g, w in zip(["canvas", "history", "finished"], got, want):
        np.testing.assert_array_equal(g, w, err_msg=name)
    # The case must exercise both outcomes.
    acc = (want[0] == sampled) & (want[0] != fresh)
    on = active != 0
    assert acc[on].any()
    if L > 1 and (bound < 1.0 or L >= 256):
        assert (~acc[on]).any()
    if adaptive and L >= 16:
        newly = (want[2] == 1) & (finished == 0)
        assert newly.any() and (on & (want[2] == 0)).any()


def test_accept_canvas_defaults():
    """Without starting values: inactive rows' canvas stays -1, finished stays 0."""
    rng = np.random.default_rng(3)
    rows, L = 3, 16
    entropy, sampled, fresh, argmax, history, _, _, _ = make_accept_case(rng, rows, L, 1)
    active = np.array([1, 0, 1], dtype=np.int32)
    canvas, hist, fin = ops().accept_canvas(entropy, sampled, fresh, argmax, history, active, 0.1, 1, 0.005, True)
    want = accept_ref(entropy, sampled, fresh, argmax, history, active, 0.1, 1, 0.005, True,
                      np.full((rows, L), -1, np.int32), np.zeros(rows, np.int32))
    np.testing.assert_array_equal(canvas, want[0])
    np.testing.assert_array_equal(hist, want[1])
    np.testing.assert_array_equal(fin, want[2])
    assert (canvas[1] == -1).all()


def test_accept_canvas_edge_of_bound():
    """Equal entropies whose float32 running sum lands exactly on the bound: 0.25 * k is exact, so
    position 4 has cum - e == 1.0 == bound (accepted) and position 5 has 1.25 (rejected)."""
    L = 16
    entropy = np.full((1, L), 0.25, dtype=np.float32)
    sampled = np.arange(L, dtype=np.int32)[None]
    fresh = sampled + 100
    argmax = sampled.copy()
    history = np.zeros((1, 1, L), np.int32)
    canvas, _, _ = ops().accept_canvas(entropy, sampled, fresh, argmax, history, None, 1.0, 1, 0.005, True)
    np.testing.assert_array_equal(canvas[0], np.where(np.arange(L) <= 4, sampled[0], fresh[0]))


def sorted_slack(entropy_row, cum_dtype=np.float64):
    """float32(cum) - e along the stable entropy order, as the CPU computes it (cum in float64)."""
    cum, out = cum_dtype(0), []
    for j in np.argsort(entropy_row, kind="stable"):
        cum = cum_dtype(cum + cum_dtype(entropy_row[j]))
        out.append(np.float32(cum) - entropy_row[j])
    return np.array(out, dtype=np.float32)


@pytest.mark.parametrize("L", [16, 256, 1000])
def test_accept_canvas_rounding_edges(L):
    """Bounds and thresholds set to exactly the values the CPU's sums produce: a float32 cumsum, another
    summation order or a double mean each flip these decisions."""
    rng = np.random.default_rng(L)
    rows = 2
    entropy = rng.exponential(0.013, size=(rows, L)).astype(np.float32)
    sampled = rng.integers(0, 1000, size=(rows, L), dtype=np.int32)
    fresh = sampled + 1000
    argmax = sampled.copy()
    history = np.zeros((0, rows, L), np.int32)
    slack = sorted_slack(entropy[0])
    # Bounds at the positions where a float32 cumsum would decide otherwise, plus exact slack values.
    differ = np.flatnonzero(sorted_slack(entropy[0], np.float32) != slack)
    assert differ.size > 0
    alt = sorted_slack(entropy[0], np.float32)
    bounds = [min(slack[k], alt[k]) for k in differ[:: max(1, differ.size // 4)]]
    bounds += [slack[L // 3], slack[L // 2], slack[L - 2]]
    for bound in map(float, bounds):
        got = ops().accept_canvas(entropy, sampled, fresh, argmax, history, None, bound, 0, 1.0, False)
        want = accept_ref(entropy, sampled, fresh, argmax, history, np.ones(rows), bound, 0, 1.0, False,
                          np.zeros((rows, L), np.int32), np.zeros(rows, np.int32))
        np.testing.assert_array_equal(got[0], want[0])
    esum = np.float32(0)
    for j in range(L):
        esum = np.float32(esum + entropy[0, j])
    mean = np.float32(esum / np.float32(L))
    for conf, fin in ((float(np.nextafter(mean, np.float32(1))), 1), (float(mean), 0)):
        got = ops().accept_canvas(entropy[:1], sampled[:1], fresh[:1], argmax[:1], history[:, :1], None, 0.1, 0,
                                  conf, True)
        assert got[2][0] == fin, (conf, fin)
