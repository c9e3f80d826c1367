"""Every backend op against the CPU backend's on the same inputs (ggml's test-backend-ops).

`dev` runs over ["cpu", "cuda"]: "cuda" skips unless a GPU is visible and this build registered the
cuda backend. cpu-vs-cpu proves only that the harness runs, so the CPU ops are also checked against
a few lines of numpy (the `*_numpy` tests), which tests the harness itself on CI.

Inputs: every activation (act dtype) and cache input is rounded to bf16 first, so a bf16 backend
and the f32 CPU backend see exactly the same values; the f32 residual stays f32.

Error bounds (`assert_close`): on an f32 backend, 1e-5 relative to the output's largest magnitude.
On a bf16 backend, two checks per output: DeepGEMM's calc_diff (1 - 2<x,y>/(|x|^2+|y|^2)) under a
per-op threshold, and elementwise |got - ref| <= k * 2^-8 * (|ref| + mean|ref|), i.e. k times the
error of rounding the CPU result to bf16, with k per op (BF16_TOL). The thresholds are first
estimates, set before a GPU run: loosen one only with a reason.

Index outputs (router top-k ids, argmax, sampled tokens) are compared exactly where the inputs
leave no near tie, and the ties are avoided by construction or masked, op by op:
- moe_router: tokens whose top-(k+1) router probabilities (numpy, from the same inputs) are closer
  than TIE_PROB apart are left out of the exact comparison (asserted to be a minority);
- lm_head_sample argmax: positions whose top-2 processed logits are closer than TIE_LOGIT are left
  out (likewise); sampled tokens: each uniform is put at the middle of the CDF interval of a token
  with probability >= 1 %, so no backend error short of a wrong result moves it to another token.
"""

from __future__ import annotations

import json
import os
import struct
import zlib

import numpy as np
import pytest

import dgemma_rt
from bf16_helpers import bf16_bits, bf16_to_f32
from dgemma_rt._core import BackendOps
from dgemma_rt.presets import write_random_checkpoint
from dgemma_rt.tiny import ModelShape

# Head sizes the CUDA attention kernels are built for (256 sliding, 512 full); GQA 4:2 on sliding
# layers, 4:1 and K=V on the full one; every width a multiple of 8 (bf16 GEMM rows); a window far
# shorter than the prompts below; top-3 of 8 experts.
SHAPE = ModelShape(
    vocab_size=512,
    hidden_size=256,
    intermediate_size=320,
    layer_types=("sliding_attention", "sliding_attention", "full_attention"),
    num_heads=4,
    num_kv_heads=2,
    head_dim=256,
    global_head_dim=512,
    num_global_kv_heads=1,
    num_experts=8,
    top_k_experts=3,
    moe_intermediate_size=128,
    sliding_window=7,
    canvas_length=16,
    max_position_embeddings=8192,
)
H, V, I = SHAPE.hidden_size, SHAPE.vocab_size, SHAPE.intermediate_size
L_SLIDE, L_SLIDE2, L_FULL = 0, 1, 2
# Layer scalars written over the checkpoint's ones, so that a backend mixing up the encoder's and
# the decoder's (or the layers') shows.
ENC_SCALAR = [0.75, 0.875, 1.5]
DEC_SCALAR = [1.25, 0.625, 0.5]

TS = [1, 7, 67]  # one token, a prime, more than 64
TIE_PROB = 2e-4  # the random router is soft: its top probabilities are ~0.005 apart
TIE_LOGIT = 2e-2

# op -> (calc_diff threshold, k): see the module docstring.
_ELEMENTWISE = (1e-5, 2)
_REDUCE = (1e-4, 8)
BF16_TOL = {
    "embed": _ELEMENTWISE,
    "rmsnorm": _ELEMENTWISE,
    "copy": (0.0, 0),
    "head_norm_rope": (2e-5, 3),
    "kv_write": (0.0, 0),
    "gather_rows": (0.0, 0),
    "scatter_add_rows": _ELEMENTWISE,
    "residual_norm_add": _ELEMENTWISE,
    "ffn_combine": (2e-5, 4),
    "residual_norm_add_norms": _ELEMENTWISE,
    "head_norm_rope_qkv": (2e-5, 3),
    "ffn_combine_norm": (2e-5, 4),
    "linear": _REDUCE,
    "attention": _REDUCE,
    "mlp": _REDUCE,
    "moe_router": _REDUCE,
    "moe_experts": _REDUCE,
    "lm_head_logits": _REDUCE,
    "lm_head_sample": _REDUCE,
    "soft_embedding": _REDUCE,
}


def rnd(x) -> np.ndarray:
    """Rounded to the nearest bf16 (as float32): exact in every act dtype."""
    return bf16_to_f32(bf16_bits(np.asarray(x, np.float32)))


def calc_diff(x, y) -> float:
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    denom = (x * x + y * y).sum()
    return 0.0 if denom == 0 else float(1 - 2 * (x * y).sum() / denom)


def assert_close(dev: BackendOps, op: str, got, ref, what: str = "", f32_rtol: float = 1e-5) -> None:
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    name = f"{op}{'.' + what if what else ''} on {dev.device}"
    assert got.shape == ref.shape, f"{name}: shape {got.shape} vs {ref.shape}"
    assert np.isfinite(got).all(), f"{name}: non-finite values"
    scale = max(float(np.abs(ref).max()), 1e-30)
    if dev.act_dtype == "f32" and dev.kv_dtype == "f32":
        np.testing.assert_allclose(got, ref, rtol=f32_rtol, atol=f32_rtol * scale, err_msg=name)
        return
    diff_max, k = BF16_TOL[op]
    d = calc_diff(got, ref)
    assert d <= diff_max, f"{name}: calc_diff {d:.3g} > {diff_max:.3g}"
    bound = k * 2.0**-8 * (np.abs(ref) + np.abs(ref).mean())
    err = np.abs(got - ref)
    worst = np.unravel_index(np.argmax(err - bound), err.shape)
    assert (err <= bound).all(), (f"{name}: |got - ref| = {err[worst]:.3g} > {bound[worst]:.3g} at {worst} "
                                  f"(got {got[worst]:.6g}, ref {ref[worst]:.6g})")


# ------------------------------------------------------------------------------------------ fixtures
def _read_safetensors(path: str) -> dict[str, np.ndarray]:
    with open(path, "rb") as f:
        data = f.read()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    out = {}
    for name, m in header.items():
        if name == "__metadata__":
            continue
        a, b = m["data_offsets"]
        raw = data[8 + n + a : 8 + n + b]
        if m["dtype"] == "BF16":
            arr = bf16_to_f32(np.frombuffer(raw, np.uint16))
        elif m["dtype"] == "F32":
            arr = np.frombuffer(raw, np.float32)
        else:
            raise AssertionError(f"{name}: unexpected dtype {m['dtype']}")
        out[name] = arr.reshape(m["shape"])
    return out


def _read_checkpoint(path) -> dict[str, np.ndarray]:
    """Every tensor of a checkpoint directory, by name."""
    out = {}
    for f in sorted(os.listdir(path)):
        if f.endswith(".safetensors"):
            out.update(_read_safetensors(os.path.join(path, f)))
    return out


def _set_f32(path: str, name: str, value: float) -> None:
    """Overwrites a 1-element F32 tensor in place."""
    with open(path, "r+b") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        m = json.loads(f.read(n))[name]
        assert m["dtype"] == "F32" and m["data_offsets"][1] - m["data_offsets"][0] == 4
        f.seek(8 + n + m["data_offsets"][0])
        f.write(struct.pack("<f", value))


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> str:
    path = write_random_checkpoint(tmp_path_factory.mktemp("backend_ops") / "ckpt", SHAPE, seed=7)
    weight_map = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]
    for layer in range(SHAPE.num_layers):
        for name, value in ((f"model.decoder.layers.{layer}.layer_scalar", DEC_SCALAR[layer]),
                            (f"model.encoder.language_model.layers.{layer}.layer_scalar", ENC_SCALAR[layer])):
            _set_f32(str(path / weight_map[name]), name, value)
    return str(path)


@pytest.fixture(scope="module")
def weights(ckpt) -> dict[str, np.ndarray]:
    return _read_checkpoint(ckpt)


@pytest.fixture(scope="module")
def ref(ckpt) -> BackendOps:
    return BackendOps(ckpt, "cpu")


def _cuda_unavailable() -> str:
    if dgemma_rt.cuda_device_count() == 0:
        return "no CUDA device visible"
    return BackendOps.unavailable("cuda")


@pytest.fixture(scope="module", params=["cpu", "cuda"])
def dev(request, ckpt) -> BackendOps:
    if request.param == "cuda":
        why = _cuda_unavailable()
        if why:
            pytest.skip(why)
    return BackendOps(ckpt, request.param)


def need(dev: BackendOps, op: str) -> None:
    if not dev.supports(op):
        pytest.skip(f"the {dev.name} backend does not implement {op}")


def rng_for(*key) -> np.random.Generator:
    """A generator seeded by the test's parameters: the same inputs on every run and every device."""
    return np.random.default_rng(zlib.crc32(repr(key).encode()))


def layer_of(ref: BackendOps, layer: int) -> dict:
    return ref.config["layers"][layer]


# ------------------------------------------------------------------------------------------ numpy
EPS = 1e-6


def np_rmsnorm(x, w=None, eps=EPS):
    x = np.asarray(x, np.float64)
    y = x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)
    return y * w if w is not None else y


def np_rope(x, positions, inv_freq):
    """Rotate-half RoPE with the angle rounded to f32 as the CPU backend computes it."""
    half = x.shape[-1] // 2
    ang = (positions.astype(np.float32)[:, None] * inv_freq[None, :].astype(np.float32)).astype(np.float64)
    cs, sn = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]
    a, b = x[..., :half], x[..., half:]
    return np.concatenate([a * cs - b * sn, b * cs + a * sn], axis=-1)


def gelu_tanh(x):
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))


def lw(weights, layer, name):
    return weights[f"model.decoder.layers.{layer}.{name}"].astype(np.float64)


def np_attention(case):
    q, kn, vn, kc, vc = (case[k].astype(np.float64) for k in ("q", "k_new", "v_new", "k_cache", "v_cache"))
    T, nh, hd = q.shape
    kvh = kn.shape[1]
    bs = kc.shape[1]
    out = np.zeros_like(q)
    for r in range(len(case["tok0"])):
        first, start, ln = case["cache_first_pos"][r], case["cache_start"][r], case["cache_len"][r]
        t0, n = case["tok0"][r], case["count"][r]
        pos = list(range(start, ln))
        slots = [case["block_table"][r][(p - first) // bs] * bs + (p - first) % bs for p in pos]
        keys = np.concatenate([kc.reshape(-1, kvh, hd)[slots], kn[t0 : t0 + n]])
        vals = np.concatenate([vc.reshape(-1, kvh, hd)[slots], vn[t0 : t0 + n]])
        kpos = np.array(pos + list(range(ln, ln + n)))
        for i in range(n):
            qpos = ln + i
            vis = np.ones(len(kpos), bool)
            if case["causal"]:
                vis &= kpos <= qpos
                if case["window"] > 0:
                    vis &= kpos > qpos - case["window"]
            for h in range(nh):
                g = h // (nh // kvh)
                s = keys[:, g] @ q[t0 + i, h] * case["scale"]
                s = np.where(vis, s, -np.inf)
                p = np.exp(s - s.max())
                p /= p.sum()
                out[t0 + i, h] = p @ vals[:, g]
    return out


# ------------------------------------------------------------------------------------------ basics
def test_device_properties(ref, dev):
    assert ref.name == "cpu" and ref.act_dtype == "f32" and ref.kv_dtype == "f32"
    assert dev.act_dtype in ("f32", "bf16") and dev.kv_dtype in ("f32", "bf16")
    assert set(BackendOps.op_names()) == set(BF16_TOL)
    assert all(ref.supports(op) for op in BackendOps.op_names())
    cfg = dev.config
    assert cfg["hidden_size"] == H and [l["k_eq_v"] for l in cfg["layers"]] == [False, False, True]
    assert BackendOps.unavailable("cpu") == ""
    assert "unknown device" in BackendOps.unavailable("tpu")


# ------------------------------------------------------------------------------------------ per op
@pytest.mark.parametrize("T", TS)
def test_embed(ref, dev, T):
    need(dev, "embed")
    ids = rng_for("embed", T).integers(0, V, T)
    ids[0] = V - 1
    assert_close(dev, "embed", dev.embed(ids), ref.embed(ids))


RMSNORM_CASES = [
    # (weight, layer, D, x_dtype, out_dtype, inplace)
    ("input_norm", 1, H, "f32", "act", False),
    ("final_norm", -1, H, "f32", "act", False),
    ("sc_pre_norm", -1, H, "act", "act", True),
    (None, -1, H, "f32", "f32", True),  # the decoder input's unscaled norm, x in place
    ("q_norm", L_FULL, 512, "act", "f32", False),
    (None, -1, 24, "act", "act", False),
]


@pytest.mark.parametrize("T", TS)
@pytest.mark.parametrize("w,layer,D,x_dtype,out_dtype,inplace", RMSNORM_CASES)
def test_rmsnorm(ref, dev, T, w, layer, D, x_dtype, out_dtype, inplace):
    need(dev, "rmsnorm")
    x = rng_for("rmsnorm", T, D).standard_normal((T, D)).astype(np.float32) * 3
    if x_dtype == "act":
        x = rnd(x)
    kw = dict(w=w, layer=layer, x_dtype=x_dtype, out_dtype=out_dtype, inplace=inplace)
    assert_close(dev, "rmsnorm", dev.rmsnorm(x, **kw), ref.rmsnorm(x, **kw))


LINEAR_CASES = [("q_proj", L_SLIDE), ("k_proj", L_FULL), ("v_proj", L_SLIDE2), ("o_proj", L_FULL), ("o_proj", L_SLIDE)]


@pytest.mark.parametrize("T", TS)
@pytest.mark.parametrize("w,layer", LINEAR_CASES)
def test_linear(ref, dev, T, w, layer):
    need(dev, "linear")
    k = H if w != "o_proj" else SHAPE.num_heads * layer_of(ref, layer)["head_dim"]
    x = rnd(rng_for("linear", T, w, layer).standard_normal((T, k)))
    assert_close(dev, "linear", dev.linear(w, layer, x), ref.linear(w, layer, x))


@pytest.mark.parametrize("dtype", ["act", "f32", "i32", "kv"])
def test_copy(ref, dev, dtype):
    need(dev, "copy")
    rng = rng_for("copy", dtype)
    x = rng.integers(-1000, 1000, (13, 4, 24)) if dtype == "i32" else rnd(rng.standard_normal((13, 4, 24)))
    got = dev.copy(x, dtype=dtype)
    np.testing.assert_array_equal(got, ref.copy(x, dtype=dtype))
    np.testing.assert_array_equal(got, x)


HNR_CASES = [
    # (weight, layer, rope): q on a sliding layer (default RoPE), k on the full one (partial
    # rotary: 3/4 of the pairs at zero frequency), V's unscaled norm without RoPE.
    ("q_norm", L_SLIDE, True),
    ("k_norm", L_FULL, True),
    (None, L_FULL, False),
]


@pytest.mark.parametrize("T", TS)
@pytest.mark.parametrize("w,layer,rope", HNR_CASES)
def test_head_norm_rope(ref, dev, T, w, layer, rope):
    need(dev, "head_norm_rope")
    spec = layer_of(ref, layer)
    heads = SHAPE.num_heads if w == "q_norm" else spec["num_kv_heads"]
    rng = rng_for("hnr", T, layer)
    x = rnd(rng.standard_normal((T, heads, spec["head_dim"])) * 2)
    pos = np.sort(rng.integers(0, 6000, T)).astype(np.int32) if rope else None
    kw = dict(w=w, layer=layer if w else -1, positions=pos)
    if rope:
        kw["layer"] = layer
    assert_close(dev, "head_norm_rope", dev.head_norm_rope(x, **kw), ref.head_norm_rope(x, **kw))


@pytest.mark.parametrize("layer", [L_SLIDE, L_FULL])
def test_kv_write(ref, dev, layer):
    need(dev, "kv_write")
    spec = layer_of(ref, layer)
    kvh, hd, nb, bs = spec["num_kv_heads"], spec["head_dim"], 6, 16
    rng = rng_for("kv_write", layer)
    T = 37
    k, v = (rnd(rng.standard_normal((T, kvh, hd))) for _ in range(2))
    kc, vc = (rnd(rng.standard_normal((nb, bs, kvh, hd))) for _ in range(2))
    slot = rng.permutation(nb * bs)[:T].astype(np.int32)
    slot[::5] = -1  # skipped tokens
    got, want = dev.kv_write(k, v, slot, kc, vc), ref.kv_write(k, v, slot, kc, vc)
    for g, w_ in zip(got, want):
        np.testing.assert_array_equal(g, w_)  # bf16-exact inputs: a copy must be exact in any kv dtype
    keep = slot >= 0
    np.testing.assert_array_equal(want[0].reshape(nb * bs, kvh, hd)[slot[keep]], k[keep])


# Attention cases: rows as (cached_len, count, extra_cache), where extra_cache keeps that many
# positions before the sliding window in the cache (the encoder must mask them).
ATTN_CASES = {
    "decoder_sliding_gqa": dict(layer=L_SLIDE, causal=False, rows=[(40, 13, 0), (5, 13, 0), (23, 13, 0)]),
    "decoder_full_kv1": dict(layer=L_FULL, causal=False, rows=[(50, 16, 0), (0, 16, 0)]),
    "decoder_one_token": dict(layer=L_SLIDE2, causal=False, rows=[(19, 1, 0)]),
    "encoder_prompt_longer_than_window": dict(layer=L_SLIDE, causal=True, rows=[(0, 67, 0)]),
    "encoder_window_cached": dict(layer=L_SLIDE2, causal=True, rows=[(37, 16, 9), (20, 5, 0)]),
    "encoder_full": dict(layer=L_FULL, causal=True, rows=[(33, 13, 0), (0, 1, 0)]),
    "decoder_scaled": dict(layer=L_SLIDE, causal=False, rows=[(31, 7, 0)], scale=0.0625),
}


def make_attention_case(ref: BackendOps, name: str, block_size: int = 16) -> dict:
    c = ATTN_CASES[name]
    spec = layer_of(ref, c["layer"])
    nh, kvh, hd = SHAPE.num_heads, spec["num_kv_heads"], spec["head_dim"]
    window = SHAPE.sliding_window if c["causal"] and spec["sliding"] else 0
    scale = c.get("scale", 1.0)
    rng = rng_for("attention", name)
    firsts, starts, lens, tok0s, counts, tables = [], [], [], [], [], []
    t = 0
    needed = []
    for cached, count, extra in c["rows"]:
        start = max(0, cached - (SHAPE.sliding_window - 1) - extra) if spec["sliding"] else 0
        first = start // block_size * block_size
        nblocks = -(-(cached - first) // block_size)
        firsts.append(first), starts.append(start), lens.append(cached), tok0s.append(t), counts.append(count)
        needed.append(nblocks)
        t += count + (1 if name == "decoder_sliding_gqa" else 0)  # a token no row owns: its output stays zero
    T = t
    nb = sum(needed) + 3
    perm = rng.permutation(nb)
    maxb = max(max(needed), 1) + 1
    at = 0
    for n in needed:
        row = np.zeros(maxb, np.int32)
        row[:n] = perm[at : at + n]
        at += n
        tables.append(row)
    # Scores of O(1) at scale 1 (the model's q and k are RMS-normed; here their product is kept tame).
    s = hd**-0.25 if scale == 1.0 else 1.0
    return dict(
        q=rnd(rng.standard_normal((T, nh, hd)) * s),
        k_new=rnd(rng.standard_normal((T, kvh, hd)) * s),
        v_new=rnd(rng.standard_normal((T, kvh, hd))),
        k_cache=rnd(rng.standard_normal((nb, block_size, kvh, hd)) * s),
        v_cache=rnd(rng.standard_normal((nb, block_size, kvh, hd))),
        block_table=np.stack(tables),
        cache_first_pos=np.array(firsts, np.int32),
        cache_start=np.array(starts, np.int32),
        cache_len=np.array(lens, np.int32),
        tok0=np.array(tok0s, np.int32),
        count=np.array(counts, np.int32),
        causal=c["causal"],
        window=window,
        scale=scale,
    )


@pytest.mark.parametrize("name", list(ATTN_CASES))
def test_attention(ref, dev, name):
    need(dev, "attention")
    case = make_attention_case(ref, name)
    assert_close(dev, "attention", dev.attention(**case), ref.attention(**case))


@pytest.mark.parametrize("T", TS)
def test_residual_norm_add(ref, dev, T):
    need(dev, "residual_norm_add")
    rng = rng_for("rna", T)
    x = rng.standard_normal((T, H)).astype(np.float32)
    h = rnd(rng.standard_normal((T, H)) * 4)
    kw = dict(w="post_attn_norm", layer=L_SLIDE2)
    assert_close(dev, "residual_norm_add", dev.residual_norm_add(x, h, **kw), ref.residual_norm_add(x, h, **kw))


@pytest.mark.parametrize("T", TS)
@pytest.mark.parametrize("w,layer", [("mlp", L_FULL), ("sc_mlp", -1)])
def test_mlp(ref, dev, T, w, layer):
    need(dev, "mlp")
    x = rnd(rng_for("mlp", T, w).standard_normal((T, H)))
    assert_close(dev, "mlp", dev.mlp(w, layer, x), ref.mlp(w, layer, x))


def router_probs(weights, layer, x):
    rx = np_rmsnorm(x) * lw(weights, layer, "router.scale") * H**-0.5
    logits = rx @ lw(weights, layer, "router.proj.weight").T
    p = np.exp(logits - logits.max(-1, keepdims=True))
    return p / p.sum(-1, keepdims=True)


@pytest.mark.parametrize("T", TS)
def test_moe_router(ref, dev, weights, T):
    need(dev, "moe_router")
    K = SHAPE.top_k_experts
    x = rng_for("router", T).standard_normal((T, H)).astype(np.float32)
    (gi, gw), (ri, rw) = dev.moe_router(L_SLIDE2, x), ref.moe_router(L_SLIDE2, x)
    p = np.sort(router_probs(weights, L_SLIDE2, x), axis=-1)[:, ::-1][:, : K + 1]
    clear = (np.diff(-p, axis=-1) > TIE_PROB).all(-1)  # no near tie among the top k + 1
    assert clear.sum() >= max(1, T // 2), "too many near ties in the router test inputs"
    np.testing.assert_array_equal(gi[clear], ri[clear])
    assert_close(dev, "moe_router", gw[clear], rw[clear], "topk_w")


def test_moe_router_token_counts_shrinking_and_growing(ref, dev, weights):
    """One backend, calls with falling and rising T: each call's scratch holds what the previous call
    (another T) left there, so nothing may depend on its contents (the CUDA router's tile counters
    once sat where an earlier, larger call had written logits)."""
    need(dev, "moe_router")
    K = SHAPE.top_k_experts
    for i, T in enumerate((300, 67, 2, 129, 300, 256)):
        x = rng_for("router-seq", i, T).standard_normal((T, H)).astype(np.float32)
        (gi, gw), (ri, rw) = dev.moe_router(L_SLIDE2, x), ref.moe_router(L_SLIDE2, x)
        p = np.sort(router_probs(weights, L_SLIDE2, x), axis=-1)[:, ::-1][:, : K + 1]
        clear = (np.diff(-p, axis=-1) > TIE_PROB).all(-1)
        assert clear.sum() >= max(1, T // 2), "too many near ties in the router test inputs"
        np.testing.assert_array_equal(gi[clear], ri[clear], err_msg=f"T = {T}")
        assert_close(dev, "moe_router", gw[clear], rw[clear], f"topk_w at T = {T}")


@pytest.mark.parametrize("T", TS)
def test_moe_experts(ref, dev, T):
    need(dev, "moe_experts")
    rng = rng_for("experts", T)
    x = rnd(rng.standard_normal((T, H)))
    idx = np.stack([rng.permutation(SHAPE.num_experts)[: SHAPE.top_k_experts] for _ in range(T)]).astype(np.int32)
    w = rng.dirichlet(np.ones(SHAPE.top_k_experts), T).astype(np.float32) * 1.1
    assert_close(dev, "moe_experts", dev.moe_experts(L_FULL, x, idx, w), ref.moe_experts(L_FULL, x, idx, w))


@pytest.mark.parametrize("T", TS)
@pytest.mark.parametrize("encoder", [True, False])
def test_ffn_combine(ref, dev, T, encoder):
    need(dev, "ffn_combine")
    rng = rng_for("combine", T, encoder)
    x = rng.standard_normal((T, H)).astype(np.float32)
    dense, moe = rnd(rng.standard_normal((T, H)) * 3), rnd(rng.standard_normal((T, H)) * 0.5)
    assert_close(dev, "ffn_combine", dev.ffn_combine(L_SLIDE, encoder, x, dense, moe),
                 ref.ffn_combine(L_SLIDE, encoder, x, dense, moe))


@pytest.mark.parametrize("T", TS)
def test_residual_norm_add_norms(ref, dev, T):
    """The residual add and the two pre-FFN norms in one pass: against the reference's three ops, and on
    the device against the device's own three ops (a fused kernel must give what its parts give)."""
    need(dev, "residual_norm_add_norms")
    rng = rng_for("rnan", T)
    x = rng.standard_normal((T, H)).astype(np.float32)
    h = rnd(rng.standard_normal((T, H)) * 4)
    got = dev.residual_norm_add_norms(x, h, L_SLIDE2)
    x2 = ref.residual_norm_add(x, h, w="post_attn_norm", layer=L_SLIDE2)
    want = (x2, ref.rmsnorm(x2, "pre_ffn_norm", L_SLIDE2), ref.rmsnorm(x2, "pre_ffn_norm2", L_SLIDE2))
    for g, w in zip(got, want):
        assert_close(dev, "residual_norm_add_norms", g, w)
    parts_x = dev.residual_norm_add(x, h, w="post_attn_norm", layer=L_SLIDE2)
    np.testing.assert_array_equal(got[0], parts_x)
    np.testing.assert_array_equal(got[1], dev.rmsnorm(parts_x, "pre_ffn_norm", L_SLIDE2, out_dtype="act"))
    np.testing.assert_array_equal(got[2], dev.rmsnorm(parts_x, "pre_ffn_norm2", L_SLIDE2, out_dtype="act"))


@pytest.mark.parametrize("T", TS)
@pytest.mark.parametrize("next_w,next_layer", [("input_norm", L_FULL), ("final_norm", -1)])
def test_ffn_combine_norm(ref, dev, T, next_w, next_layer):
    need(dev, "ffn_combine_norm")
    rng = rng_for("combine_norm", T, next_w)
    x = rng.standard_normal((T, H)).astype(np.float32)
    dense, moe = rnd(rng.standard_normal((T, H)) * 3), rnd(rng.standard_normal((T, H)) * 0.5)
    got_x, got = dev.ffn_combine_norm(L_SLIDE2, False, x, dense, moe, next_w=next_w, next_layer=next_layer)
    x2 = ref.ffn_combine(L_SLIDE2, False, x, dense, moe)
    assert_close(dev, "ffn_combine_norm", got_x, x2)
    assert_close(dev, "ffn_combine_norm", got, ref.rmsnorm(x2, next_w, next_layer))
    parts_x = dev.ffn_combine(L_SLIDE2, False, x, dense, moe)
    np.testing.assert_array_equal(got_x, parts_x)
    np.testing.assert_array_equal(got, dev.rmsnorm(parts_x, next_w, next_layer, out_dtype="act"))


@pytest.mark.parametrize("T", TS)
@pytest.mark.parametrize("layer,with_q", [(L_SLIDE, True), (L_FULL, True), (L_FULL, False)])
def test_head_norm_rope_qkv(ref, dev, T, layer, with_q):
    """A layer's q, k and v normed (and q, k rotated) in one op: against the reference's three
    head_norm_rope calls, and on the device against its own three calls bit for bit."""
    need(dev, "head_norm_rope_qkv")
    cfg = ref.config["layers"][layer]
    hd, kvh, nh = cfg["head_dim"], cfg["num_kv_heads"], ref.config["num_heads"]
    rng = rng_for("hnr_qkv", T, layer, with_q)
    q = rnd(rng.standard_normal((T, nh, hd)) * 2) if with_q else None
    k, v = rnd(rng.standard_normal((T, kvh, hd))), rnd(rng.standard_normal((T, kvh, hd)) * 3)
    pos = rng.integers(0, 5000, T).astype(np.int32)
    got = dev.head_norm_rope_qkv(q, k, v, layer, pos)
    want = (ref.head_norm_rope(q, "q_norm", layer, positions=pos) if with_q else None,
            ref.head_norm_rope(k, "k_norm", layer, positions=pos), ref.head_norm_rope(v))
    for g, w in zip(got, want):
        if w is None:
            assert g is None
        else:
            assert_close(dev, "head_norm_rope_qkv", g, w)
    parts = (dev.head_norm_rope(q, "q_norm", layer, positions=pos) if with_q else None,
             dev.head_norm_rope(k, "k_norm", layer, positions=pos), dev.head_norm_rope(v))
    for g, w in zip(got, parts):
        if w is not None:
            np.testing.assert_array_equal(g, w)


def test_fused_norm_ops_refuse_bad_weights(ref):
    x = np.zeros((3, H), np.float32)
    with pytest.raises(ValueError, match="not a norm"):
        ref.residual_norm_add_norms(x, x, L_SLIDE, wa="q_proj")
    with pytest.raises(ValueError, match="no weight named"):
        ref.residual_norm_add_norms(x, x, L_SLIDE, wb="pre_ffn_norm_3")
    with pytest.raises(ValueError, match="global weight"):
        ref.ffn_combine_norm(L_SLIDE, False, x, x, x, next_w="final_norm", next_layer=1)
    with pytest.raises(ValueError, match="x must be|shape"):
        ref.residual_norm_add_norms(x, np.zeros((4, H), np.float32), L_SLIDE)


@pytest.mark.parametrize("dtype", ["act", "f32", "i32"])
def test_gather_rows(ref, dev, dtype):
    need(dev, "gather_rows")
    rng = rng_for("gather", dtype)
    src = rng.integers(-99, 99, (29, 40)) if dtype == "i32" else rnd(rng.standard_normal((29, 40)))
    index = rng.integers(0, 29, 67).astype(np.int32)  # repeats allowed
    index[::5] = -1  # zero rows
    got = dev.gather_rows(src, index, dtype=dtype)
    np.testing.assert_array_equal(got, ref.gather_rows(src, index, dtype=dtype))


@pytest.mark.parametrize("M", [1, 13, 67])
def test_scatter_add_rows(ref, dev, M):
    need(dev, "scatter_add_rows")
    rng = rng_for("scatter", M)
    dst = rng.standard_normal((80, H)).astype(np.float32)
    src = rnd(rng.standard_normal((M, H)))
    index = rng.permutation(80)[:M].astype(np.int32)
    index[1::3] = -1  # rows skipped
    assert_close(dev, "scatter_add_rows", dev.scatter_add_rows(dst, src, index), ref.scatter_add_rows(dst, src, index))


def np_logits(weights, x):
    E = weights["model.decoder.embed_tokens.weight"].astype(np.float64)
    return 30.0 * np.tanh((np.asarray(x, np.float64) @ E.T) / 30.0)


def sample_inputs(ref: BackendOps, name, rows: int, n: int, peaky: bool = False):
    """x, temperature and mid-bin uniforms (see the module docstring) for lm_head_sample."""
    rng = rng_for("sample", name, rows, n)
    T = rows * n
    x = rng.standard_normal((T, H))
    if peaky:  # some positions close to an embedding row: confident, low-entropy distributions
        x[::3] *= 4
    x = rnd(x)
    temp = rng.uniform(0.4, 0.8, rows).astype(np.float32)
    raw = ref.lm_head_logits(x).astype(np.float32)
    uniform = np.empty(T)
    for t in range(T):
        proc = raw[t] / temp[t // n]
        p = np.exp(proc - proc.max())
        p /= p.sum()
        cdf = np.cumsum(p)
        v = rng.choice(np.flatnonzero(p >= 0.01))
        uniform[t] = ((cdf[v - 1] if v else 0.0) + cdf[v]) / 2 / cdf[-1]
    return x, temp, uniform, raw


SAMPLE_CASES = {"one": (1, 1), "canvas16_x3": (3, 16), "prime": (1, 67), "rows_of_7": (5, 7)}


@pytest.mark.parametrize("name", list(SAMPLE_CASES))
def test_lm_head_sample(ref, dev, name):
    need(dev, "lm_head_sample")
    rows, n = SAMPLE_CASES[name]
    T = rows * n
    x, temp, uniform, raw = sample_inputs(ref, name, rows, n, peaky=True)
    rng = rng_for("soft_index", name)
    S = T + 3
    soft_index = np.full(T, -1, np.int32)
    pick = rng.permutation(T)[: max(1, T - T // 3)]
    soft_index[pick] = rng.permutation(S)[: len(pick)]
    soft = rnd(rng.standard_normal((S, H)))  # rows not named keep these values
    g = dev.lm_head_sample(x, n, temp, uniform, soft_index, soft)
    r = ref.lm_head_sample(x, n, temp, uniform, soft_index, soft)
    proc = np.sort(raw / np.repeat(temp, n)[:, None], axis=-1)
    clear = proc[:, -1] - proc[:, -2] > TIE_LOGIT
    assert clear.sum() >= max(1, T // 2), "too many near ties in the sampler test inputs"
    np.testing.assert_array_equal(g["argmax"][clear], r["argmax"][clear])
    np.testing.assert_array_equal(g["token"], r["token"])
    assert_close(dev, "lm_head_sample", g["entropy"], r["entropy"], "entropy")
    assert_close(dev, "lm_head_sample", g["soft"], r["soft"], "soft")


@pytest.mark.parametrize("T", TS)
def test_lm_head_logits(ref, dev, T):
    need(dev, "lm_head_logits")
    x = rnd(rng_for("logits", T).standard_normal((T, H)) * 3)
    assert_close(dev, "lm_head_logits", dev.lm_head_logits(x), ref.lm_head_logits(x))


@pytest.mark.parametrize("S", TS)
def test_soft_embedding(ref, dev, S):
    need(dev, "soft_embedding")
    logits = rng_for("soft", S).standard_normal((S, V)).astype(np.float32) * 2
    assert_close(dev, "soft_embedding", dev.soft_embedding(logits), ref.soft_embedding(logits))


# ------------------------------------------------------------------------------------------ CPU vs numpy
# These test the harness (uploads, layouts, argument order) and the CPU reference itself.
def _close(got, want, rtol=1e-5, what=""):
    want = np.asarray(want, np.float64)
    np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * max(np.abs(want).max(), 1e-30), err_msg=what)


def test_embed_numpy(ref, weights):
    ids = np.array([0, 5, V - 1, 5])
    _close(ref.embed(ids), weights["model.decoder.embed_tokens.weight"][ids].astype(np.float64) * np.sqrt(H))


@pytest.mark.parametrize("w,layer", [(None, -1), ("pre_ffn_norm2", L_FULL), ("k_norm", L_SLIDE)])
def test_rmsnorm_numpy(ref, weights, w, layer):
    D = 256 if w != "k_norm" else layer_of(ref, layer)["head_dim"]
    x = rng_for("rms_np", layer).standard_normal((13, D)).astype(np.float32)
    names = {"pre_ffn_norm2": "pre_feedforward_layernorm_2.weight", "k_norm": "self_attn.k_norm.weight"}
    wv = lw(weights, layer, names[w]) if w else None
    _close(ref.rmsnorm(x, w=w, layer=layer), np_rmsnorm(x, wv))
    _close(ref.rmsnorm(x, w=w, layer=layer, inplace=True, out_dtype="f32"), np_rmsnorm(x, wv))


@pytest.mark.parametrize("w,layer", [("q_proj", L_SLIDE), ("v_proj", L_SLIDE2), ("o_proj", L_FULL)])
def test_linear_numpy(ref, weights, w, layer):
    W = lw(weights, layer, f"self_attn.{w}.weight")
    x = rng_for("lin_np", w).standard_normal((7, W.shape[1])).astype(np.float32)
    _close(ref.linear(w, layer, x), x.astype(np.float64) @ W.T, rtol=1e-5)


@pytest.mark.parametrize("layer,w", [(L_SLIDE, "q_norm"), (L_FULL, "k_norm")])
def test_head_norm_rope_numpy(ref, weights, layer, w):
    spec = layer_of(ref, layer)
    hd = spec["head_dim"]
    inv = np.asarray(spec["inv_freq"], np.float32)
    if not spec["sliding"]:  # proportional RoPE: only the first quarter of the pairs rotate
        assert (inv[hd // 8 :] == 0).all() and (inv[: hd // 8] > 0).all()
    rng = rng_for("hnr_np", layer)
    x = rng.standard_normal((11, 3, hd)).astype(np.float32)
    pos = rng.integers(0, 5000, 11).astype(np.int32)
    want = np_rope(np_rmsnorm(x, lw(weights, layer, f"self_attn.{w}.weight")), pos, inv)
    _close(ref.head_norm_rope(x, w=w, layer=layer, positions=pos), want, rtol=2e-5)
    # explicit inv_freq, no weight, no rope
    _close(ref.head_norm_rope(x, positions=pos, inv_freq=inv), np_rope(np_rmsnorm(x), pos, inv), rtol=2e-5)
    _close(ref.head_norm_rope(x), np_rmsnorm(x))


@pytest.mark.parametrize("name", ["decoder_sliding_gqa", "decoder_full_kv1", "encoder_prompt_longer_than_window",
                                  "encoder_window_cached", "decoder_scaled"])
def test_attention_numpy(ref, name):
    case = make_attention_case(ref, name)
    got = ref.attention(**case)
    _close(got, np_attention(case), rtol=2e-5)
    if name == "decoder_sliding_gqa":
        assert (got[13] == 0).all()  # the token no row owns


def test_kv_gather_scatter_numpy(ref):
    rng = rng_for("gs_np")
    src = rng.standard_normal((9, 5)).astype(np.float32)
    index = np.array([8, 0, 0, 3], np.int32)
    np.testing.assert_array_equal(ref.gather_rows(src, index), src[index])
    # -1: a row with nothing to gather is exactly zero (the decoder's rows without a self-conditioning signal)
    gathered = ref.gather_rows(src, np.array([-1, 2, -1], np.int32))
    np.testing.assert_array_equal(gathered, np.stack([np.zeros(5), src[2], np.zeros(5)]))
    assert not np.signbit(gathered[0]).any()
    dst = rng.standard_normal((9, 5)).astype(np.float32)
    sidx = np.array([4, 1, 7], np.int32)
    want = dst.copy()
    want[sidx] += src[:3]
    np.testing.assert_array_equal(ref.scatter_add_rows(dst, src[:3], sidx), want)
    # -1 skips its row (repeated -1 is fine); the rows not named keep their bits, -0.0 included
    dst[0, 0] = -0.0
    sidx = np.array([-1, 5, -1], np.int32)
    want = dst.copy()
    want[5] += src[1]
    got = ref.scatter_add_rows(dst, src[:3], sidx)
    np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))


def test_moe_router_numpy(ref, weights):
    K = SHAPE.top_k_experts
    x = rng_for("router_np").standard_normal((29, H)).astype(np.float32) * 2
    idx, w = ref.moe_router(L_FULL, x)
    p = router_probs(weights, L_FULL, x)
    order = np.argsort(-p, axis=-1, kind="stable")[:, :K]
    np.testing.assert_array_equal(idx, order)
    top = np.take_along_axis(p, order, -1)
    want = top / top.sum(-1, keepdims=True) * lw(weights, L_FULL, "router.per_expert_scale")[order]
    _close(w, want, rtol=1e-5)


def test_ffn_combine_numpy(ref, weights):
    rng = rng_for("combine_np")
    x = rng.standard_normal((5, H)).astype(np.float32)
    d, m = rng.standard_normal((5, H)).astype(np.float32), rng.standard_normal((5, H)).astype(np.float32)
    w1, w2, w = (lw(weights, L_FULL, f"post_feedforward_layernorm{s}.weight") for s in ("_1", "_2", ""))
    inner = np_rmsnorm(np_rmsnorm(d, w1) + np_rmsnorm(m, w2), w)
    for encoder, scalar in ((True, ENC_SCALAR[L_FULL]), (False, DEC_SCALAR[L_FULL])):
        _close(ref.ffn_combine(L_FULL, encoder, x, d, m), (x + inner) * scalar)


def test_mlp_numpy(ref, weights):
    x = rng_for("mlp_np").standard_normal((7, H)).astype(np.float32)
    p = "model.decoder.self_conditioning."
    g, u, dn = (weights[p + f"{n}_proj.weight"].astype(np.float64) for n in ("gate", "up", "down"))
    x64 = x.astype(np.float64)
    _close(ref.mlp("sc_mlp", -1, x), (gelu_tanh(x64 @ g.T) * (x64 @ u.T)) @ dn.T, rtol=1e-4)


def test_lm_head_sample_numpy(ref, weights):
    rows, n = 2, 16
    x, temp, uniform, _ = sample_inputs(ref, "numpy", rows, n, peaky=True)
    T = rows * n
    soft_index = np.arange(T, dtype=np.int32)[::-1].copy()
    soft_index[::4] = -1
    out = ref.lm_head_sample(x, n, temp, uniform, soft_index, np.zeros((T, H), np.float32))
    proc = np_logits(weights, x) / np.repeat(temp, n)[:, None].astype(np.float64)
    p = np.exp(proc - proc.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    srt = np.sort(proc, axis=-1)
    clear = srt[:, -1] - srt[:, -2] > 1e-4
    np.testing.assert_array_equal(out["argmax"][clear], proc.argmax(-1)[clear])
    cdf = np.cumsum(p, axis=-1)
    want_tok = np.minimum((cdf < (uniform * cdf[:, -1])[:, None]).sum(-1), V - 1)
    np.testing.assert_array_equal(out["token"], want_tok)
    _close(out["entropy"], -(p * np.log(p)).sum(-1), rtol=1e-4)
    E = weights["model.decoder.embed_tokens.weight"].astype(np.float64)
    want_soft = np.zeros((T, H))
    named = soft_index >= 0
    want_soft[soft_index[named]] = (p[named] @ E) * np.sqrt(H)
    _close(out["soft"], want_soft, rtol=1e-4)
    # soft_embedding is the same softmax @ E * sqrt(H) from processed logits
    _close(ref.soft_embedding(proc.astype(np.float32)), (p @ E) * np.sqrt(H), rtol=1e-4)
    _close(ref.lm_head_logits(x), np_logits(weights, x), rtol=1e-5)


@pytest.mark.parametrize("device,config_dtype,want", [
    ("cpu", "bfloat16", 6.9375), ("cpu", None, 6.9375), ("cpu", "float32", 6.928203), ("cpu", "float16", 6.9296875),
    ("cuda", "bfloat16", 6.9375),  # the CUDA backend takes the same ModelWeights::embed_scale
])
def test_embedding_scale_is_sqrt_h_in_the_model_dtype(tmp_path, device, config_dtype, want):
    """Token embeddings, the self-conditioning product and the sampler's soft rows are scaled by sqrt(H) rounded
    to the dtype transformers loads the model in by default: config.json's dtype, else (no dtype there) the
    embedding's own, here BF16. At H = 48 that is 6.9375 in bf16, 6.9297 in float16 and 6.9282 in float32.

    The scale is fitted by least squares over many values. On the CPU the fit is exact to ~1e-9; a GPU rounds
    probabilities and outputs to bf16 (half an ulp, up to 0.2% each), which the fit averages over flat-ish
    distributions to well under the 0.07% that separates the candidates."""
    if device == "cuda" and _cuda_unavailable():
        pytest.skip(_cuda_unavailable())
    import dataclasses

    shape = dataclasses.replace(SHAPE, hidden_size=48)
    path = write_random_checkpoint(tmp_path / "h48", shape, seed=11)
    config = json.loads((path / "config.json").read_text())
    config.pop("dtype")
    if config_dtype is not None:
        config["dtype"] = config_dtype
    (path / "config.json").write_text(json.dumps(config))
    E = _read_checkpoint(path)["model.decoder.embed_tokens.weight"].astype(np.float64)
    ops = BackendOps(str(path), device)

    def fitted(got, base):
        got, base = np.asarray(got, np.float64).ravel(), np.asarray(base, np.float64).ravel()
        return float(got @ base / (base @ base))

    def softmax(z):
        q = np.exp(z - z.max(-1, keepdims=True))
        return q / q.sum(-1, keepdims=True)

    ids = np.arange(V, dtype=np.int32)[::-1].copy()
    scales = {"embed": fitted(ops.embed(ids), E[ids])}
    rng = np.random.default_rng(5)
    logits = rng.standard_normal((40, V)).astype(np.float32)
    scales["soft_embedding"] = fitted(ops.soft_embedding(logits.copy()), softmax(logits.astype(np.float64)) @ E)
    T = 32
    x = rnd(rng.standard_normal((T, 48)))
    out = ops.lm_head_sample(x, 16, np.ones(2, np.float32), rng.uniform(0.1, 0.9, T), np.arange(T, dtype=np.int32),
                             np.zeros((T, 48), np.float32))
    scales["lm_head_sample soft"] = fitted(out["soft"], softmax(ops.lm_head_logits(x).astype(np.float64)) @ E)
    tol = 1e-6 if device == "cpu" else 3e-4  # bf16's 6.9375 lies 1.1e-3 from float16's, 1.3e-3 from float32's
    for what, got in scales.items():
        assert abs(got - want) < tol * want, f"{what}: scale {got:.7f}, want {want} (config dtype {config_dtype})"


def test_bf16_upload_rounds_to_nearest_even(ref):
    """The harness's f32 -> bf16 upload and bf16 -> f32 download (the path every act input takes on a GPU),
    run through the CPU's dtype-blind copy and gather_rows."""
    rng = rng_for("bf16_path")
    x = rng.standard_normal((5, 64)).astype(np.float32) * 100
    # ties to even (0x3F808000 -> 0x3F80, 0x3F818000 -> 0x3F82), infinities, the largest finite float
    x[0, :5] = np.array([0x3F808000, 0x3F818000, 0x7F800000, 0xFF800000, 0x7F7FFFFF], np.uint32).view(np.float32)
    np.testing.assert_array_equal(ref.copy(x, dtype="bf16"), rnd(x))
    np.testing.assert_array_equal(ref.gather_rows(x, np.array([4, 0], np.int32), dtype="bf16"), rnd(x)[[4, 0]])
    x[1, 0] = np.nan
    assert np.isnan(ref.copy(x, dtype="bf16")[1, 0])


# ------------------------------------------------------------------------------------------ bad calls
def test_bad_shapes_raise(ref):
    x = np.zeros((3, H), np.float32)
    bad = [
        lambda: ref.embed(np.array([V])),  # id out of range
        lambda: ref.embed(np.zeros((2, 2), np.int32)),
        lambda: ref.embed(np.array([0.5])),  # not integers
        lambda: ref.rmsnorm(np.zeros((3, H + 1), np.float32), w="final_norm"),
        lambda: ref.rmsnorm(x, w="final_norm", layer=0),  # global weight with a layer
        lambda: ref.rmsnorm(x, w="input_norm"),  # per-layer weight without one
        lambda: ref.rmsnorm(x, w="input_norm", layer=SHAPE.num_layers),
        lambda: ref.rmsnorm(x, w="no_such_norm", layer=0),
        lambda: ref.rmsnorm(x, x_dtype="f64"),  # x is f32 or act
        lambda: ref.rmsnorm(x, out_dtype="f16"),
        lambda: ref.rmsnorm(np.zeros((0, H), np.float32)),  # empty
        lambda: ref.linear("q_proj", 0, np.zeros((3, H - 8), np.float32)),
        lambda: ref.linear("v_proj", L_FULL, x),  # K=V layer: no v_proj
        lambda: ref.linear("mlp", 0, x),
        lambda: ref.head_norm_rope(np.zeros((3, 4, 256), np.float32), w="q_norm", layer=L_FULL),  # hd 512 there
        lambda: ref.head_norm_rope(np.zeros((3, 4, 256), np.float32), positions=np.zeros(2, np.int32), layer=0),
        lambda: ref.head_norm_rope(np.zeros((3, 4, 256), np.float32), inv_freq=np.zeros(128, np.float32)),
        lambda: ref.head_norm_rope(np.zeros((1, 1, 4096), np.float32), positions=np.zeros(1, np.int32),
                                   inv_freq=np.zeros(2048, np.float32)),  # past the CPU's RoPE buffer
        lambda: ref.head_norm_rope(np.zeros((1, 1, 6), np.float32), positions=np.zeros(1, np.int32),
                                   inv_freq=np.zeros(2, np.float32)),  # inv_freq is [head_dim / 2]
        lambda: ref.kv_write(np.zeros((2, 2, 8), np.float32), np.zeros((2, 2, 8), np.float32),
                             np.array([0, 64], np.int32), np.zeros((4, 16, 2, 8), np.float32),
                             np.zeros((4, 16, 2, 8), np.float32)),  # slot past the cache
        lambda: ref.kv_write(np.zeros((2, 2, 8), np.float32), np.zeros((2, 2, 8), np.float32),
                             np.array([3, 3], np.int32), np.zeros((4, 16, 2, 8), np.float32),
                             np.zeros((4, 16, 2, 8), np.float32)),  # repeated slot
        lambda: ref.mlp("mlp", 0, np.zeros((3, H + 1), np.float32)),
        lambda: ref.mlp("q_proj", 0, x),
        lambda: ref.moe_router(SHAPE.num_layers, x),
        lambda: ref.moe_experts(0, x, np.full((3, 3), SHAPE.num_experts, np.int32), np.ones((3, 3), np.float32)),
        lambda: ref.moe_experts(0, x, np.zeros((3, 3), np.int32), np.ones((3, 3), np.float32)),  # repeated expert
        lambda: ref.moe_experts(0, x, np.zeros((3, 2), np.int32), np.ones((3, 2), np.float32)),
        lambda: ref.ffn_combine(0, True, x, np.zeros((2, H), np.float32), x),
        lambda: ref.gather_rows(np.zeros((4, 3), np.float32), np.array([4], np.int32)),
        lambda: ref.gather_rows(np.zeros((4, 3), np.float32), np.array([-2], np.int32)),
        lambda: ref.scatter_add_rows(np.zeros((4, 3), np.float32), np.zeros((1, 3), np.float32), np.array([-2])),
        lambda: ref.gather_rows(np.zeros((4, 3), np.float32), np.array([0], np.int32), dtype="int8"),
        lambda: ref.scatter_add_rows(np.zeros((4, 3), np.float32), np.zeros((2, 3), np.float32), np.array([1, 1])),
        lambda: ref.scatter_add_rows(np.zeros((4, 3), np.float32), np.zeros((2, 4), np.float32), np.array([0, 1])),
        lambda: ref.lm_head_sample(x, 2, np.ones(1, np.float32), np.zeros(3)),  # n does not divide T
        lambda: ref.lm_head_sample(x, 3, np.ones(1, np.float32), np.ones(3)),  # uniform 1.0
        lambda: ref.lm_head_sample(x, 3, np.zeros(1, np.float32), np.zeros(3)),  # temperature 0
        lambda: ref.lm_head_sample(x, 3, np.ones(1, np.float32), np.zeros(3), np.array([0, 5, -1], np.int32),
                                   np.zeros((2, H), np.float32)),  # soft_index past soft
        lambda: ref.lm_head_sample(x, 3, np.ones(1, np.float32), np.zeros(3), np.array([1, 1, -1], np.int32)),
        lambda: ref.lm_head_logits(np.zeros((3, H - 1), np.float32)),
        lambda: ref.soft_embedding(np.zeros((3, V + 1), np.float32)),
        lambda: ref.supports("no_such_op"),
    ]
    for i, call in enumerate(bad):
        with pytest.raises(ValueError):
            call()
            pytest.fail(f"bad call #{i} did not raise")


def test_constructor_errors(ckpt, tmp_path):
    for device in ("tpu", "cpu:1", "cuda:x"):
        with pytest.raises(ValueError, match="device"):
            BackendOps(ckpt, device)
    if _cuda_unavailable():
        with pytest.raises(ValueError, match="not available"):
            BackendOps(ckpt, "cuda")
    with pytest.raises(ValueError):  # CheckpointError
        BackendOps(str(tmp_path), "cpu")


def test_bad_attention_raises(ref):
    good = make_attention_case(ref, "decoder_sliding_gqa")
    ref.attention(**good)
    edits = {
        "k_new": lambda c: c["k_new"][:, :1].repeat(3, axis=1),  # 4 heads over 3 kv heads
        "v_new": lambda c: c["v_new"][:-1],
        "k_cache": lambda c: c["k_cache"][..., :-8],
        "cache_len": lambda c: c["cache_len"] + 64,  # past the block table
        "cache_start": lambda c: c["cache_len"] + 1,
        "cache_first_pos": lambda c: c["cache_start"] + 1,
        "block_table": lambda c: np.full_like(c["block_table"], len(c["k_cache"])),  # block ids past the pool
        "tok0": lambda c: c["tok0"] + 100,
        "count": lambda c: c["count"] + 2,  # rows overlap
        "window": lambda c: -1,
    }
    for key, edit in edits.items():
        case = dict(good)
        case[key] = edit(good)
        with pytest.raises(ValueError):
            ref.attention(**case)
            pytest.fail(f"attention with a bad {key} did not raise")


def test_cuda_skips_cleanly():
    why = _cuda_unavailable()
    if dgemma_rt.cuda_device_count() == 0 or not dgemma_rt.cuda_compiled():
        assert why


class _FakeBf16:
    device, act_dtype, kv_dtype = "fake-bf16", "bf16", "bf16"


@pytest.mark.parametrize("op", ["rmsnorm", "linear", "attention", "kv_write"])
def test_bf16_bounds(op):
    """The bf16 bounds accept the CPU result rounded to bf16 and reject a 2 % error (tests assert_close)."""
    ref = rng_for("bounds", op).standard_normal((67, 256)) * 3
    diff_max, k = BF16_TOL[op]
    assert_close(_FakeBf16(), op, rnd(ref), rnd(ref))
    if k:
        assert_close(_FakeBf16(), op, rnd(ref), ref)
    with pytest.raises(AssertionError):
        assert_close(_FakeBf16(), op, ref * 1.02, ref)
