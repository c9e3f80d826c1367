"""Engine(cpu_weights="bf16"): BF16 weights multiplied with the CPU's BF16 dot products (AVX512-BF16).

Not the float32 bits, so the tests bound the error against the float32 mode of the same BF16
checkpoint, relative to a perturbation of known size, and check that it is still batch-invariant.
On a CPU without AVX512-BF16 the mode is "stored" (checked too).
"""

from __future__ import annotations

import shutil
import threading

import numpy as np
import pytest

import dgemma_rt
from dgemma_rt import _core, nvfp4
from dgemma_rt.tiny import make_tiny

needs_bf16 = pytest.mark.skipif(not _core.cpu_has_bf16_dot(), reason="this CPU has no AVX512-BF16")


@pytest.fixture(scope="module")
def bf16_dir(tmp_path_factory):
    """The tiny checkpoint with every tensor stored as BF16."""
    base = make_tiny(tmp_path_factory.mktemp("bf16_src"))
    dst = tmp_path_factory.mktemp("bf16_dst")
    shutil.rmtree(dst)
    shutil.copytree(base, dst)
    t, meta = nvfp4.read_safetensors(base / "model.safetensors")
    nvfp4.write_safetensors(dst / "model.safetensors", {k: ("BF16", a) for k, (_, a) in t.items()}, meta)
    return base, dst


def _inputs(seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(8, 2048, size=(2, 24)).tolist(), rng.integers(8, 2048, size=(2, 64)).astype(np.int32)


def _logits(path, mode, ids, canvas):
    e = dgemma_rt.Engine(path, num_threads=2, cpu_weights=mode)
    return e.denoise_logits(e.encode(ids), canvas).astype(np.float64)


def _logp(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _kl_agree(ref, other):
    a, b = _logp(ref), _logp(other)
    return float((np.exp(a) * (a - b)).sum(-1).mean()), float((ref.argmax(-1) == other.argmax(-1)).mean())


def test_bf16_mode_leaves_float32_weights_alone(bf16_dir):
    """Only BF16 tensors take the BF16 dot products: an F32 checkpoint gives the "stored" bits."""
    base, _ = bf16_dir
    ids, canvas = _inputs()
    np.testing.assert_array_equal(_logits(base, "bf16", ids, canvas), _logits(base, "stored", ids, canvas))


def test_bf16_mode_without_avx512_bf16_is_stored(bf16_dir):
    if _core.cpu_has_bf16_dot():
        pytest.skip("this CPU has AVX512-BF16")
    _, path = bf16_dir
    ids, canvas = _inputs()
    np.testing.assert_array_equal(_logits(path, "bf16", ids, canvas), _logits(path, "stored", ids, canvas))


@needs_bf16
def test_bf16_dot_logits_vs_float32(bf16_dir, tmp_path):
    """How far rounding the GEMMs' activations to bf16 moves the logits: bounded relative to the same
    checkpoint with its weights perturbed by Gaussian noise of bf16's rounding error (RMS 2^-9 / sqrt(3)
    relative), run in float32. The tiny model is random and very sensitive, so the bound is relative."""
    _, path = bf16_dir
    ids, canvas = _inputs()
    ref = _logits(path, "float32", ids, canvas)
    got = _logits(path, "bf16", ids, canvas)
    assert np.isfinite(got).all()
    assert not np.array_equal(ref, got)  # the BF16 units did run

    t, meta = nvfp4.read_safetensors(path / "model.safetensors")
    rng = np.random.default_rng(1)
    noisy = {}
    for k, (dt, a) in t.items():
        if a.ndim >= 2 and "router" not in k:
            a = a * (1 + rng.standard_normal(a.shape).astype(np.float32) * np.float32(2**-9 / np.sqrt(3)))
        noisy[k] = ("F32", a.astype(np.float32))
    noise_dir = tmp_path / "noise"
    shutil.copytree(path, noise_dir)
    nvfp4.write_safetensors(noise_dir / "model.safetensors", noisy, meta)
    noise = _logits(noise_dir, "float32", ids, canvas)

    kl_b, agree_b = _kl_agree(ref, got)
    kl_n, agree_n = _kl_agree(ref, noise)
    rel = np.abs(got - ref).max() / np.abs(ref).max()
    print(f"tiny model, BF16 dot products vs float32: mean KL {kl_b:.2e}, argmax agreement {agree_b:.3f}, "
          f"max |diff| / max |ref| {rel:.2e}; bf16-sized weight noise: mean KL {kl_n:.2e}, agreement {agree_n:.3f}")
    assert kl_b <= 1.5 * kl_n and agree_b >= 0.75 * agree_n
    assert agree_b > 0.2  # far above chance (1/2048)


def _bf16(x):
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    return (((u + 0x7FFF + ((u >> 16) & 1)) >> 16) << 16).astype(np.uint32).view(np.float32)


@needs_bf16
@pytest.mark.parametrize("rows", [1, 7, 13, 64])
@pytest.mark.parametrize("w", ["q_proj", "o_proj"])
def test_bf16_dot_linear_is_the_bf16_product(bf16_dir, w, rows):
    """The op itself: x rounded to bf16 times the BF16 weight, summed in float32: within float32
    accumulation error of the float64 product of the same bf16 values; row r the same bits at any M."""
    _, path = bf16_dir
    ops = _core.BackendOps(str(path), "cpu", cpu_weights="bf16")
    t, _ = nvfp4.read_safetensors(path / "model.safetensors")
    W = next(a for k, (_, a) in t.items() if k.endswith(f"layers.0.self_attn.{w}.weight"))
    x = np.random.default_rng(rows).standard_normal((rows, W.shape[1])).astype(np.float32)
    got = ops.linear(w, 0, x)
    want = _bf16(x).astype(np.float64) @ W.astype(np.float64).T
    scale = np.abs(_bf16(x)).astype(np.float64) @ np.abs(W.astype(np.float64)).T
    assert (np.abs(got - want) <= 1e-5 * scale + 1e-30).all()
    np.testing.assert_array_equal(ops.linear(w, 0, x[:1]), got[:1])


@needs_bf16
def test_bf16_dot_is_batch_invariant(bf16_dir):
    """Rows alone or batched, and concurrent requests, give the same bits in the BF16 mode too."""
    _, path = bf16_dir
    e = dgemma_rt.Engine(path, num_threads=2, max_batch_size=8, cpu_weights="bf16")
    ids, canvas = _inputs(3)
    both = e.denoise_logits(e.encode(ids), canvas)
    for r in range(2):
        one = e.denoise_logits(e.encode([ids[r]]), canvas[r:r + 1])
        np.testing.assert_array_equal(both[r:r + 1], one)

    rng = np.random.default_rng(5)
    jobs = [(rng.integers(8, 2048, size=5 + 3 * i).tolist(), dict(seed=100 + i, max_new_tokens=64,
                                                                  max_denoising_steps=4 + i)) for i in range(4)]
    solo = [e.generate([p], **kw).sequences for p, kw in jobs]
    results = [None] * len(jobs)
    barrier = threading.Barrier(len(jobs))

    def run(i):
        barrier.wait()
        results[i] = e.generate([jobs[i][0]], **jobs[i][1]).sequences

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    for a, b in zip(solo, results):
        np.testing.assert_array_equal(a, b)


@pytest.fixture(scope="module")
def odd_bf16_dir(tmp_path_factory):
    """A random BF16 checkpoint whose matrices have awkward shapes: odd K (81), N not a multiple of 16
    (114, 81, 38, 200), so the GEMM packs partial panels and a lone last pair."""
    import dataclasses

    from dgemma_rt import presets, tiny

    shape = dataclasses.replace(
        tiny.TINY, hidden_size=81, intermediate_size=200, num_heads=3, num_kv_heads=1, head_dim=38,
        global_head_dim=38, num_global_kv_heads=1, vocab_size=600, moe_intermediate_size=40, num_experts=4,
        top_k_experts=2, layer_types=("sliding_attention", "full_attention"))  # fmt: skip
    return presets.write_random_checkpoint(tmp_path_factory.mktemp("odd_bf16"), shape)


@needs_bf16
@pytest.mark.parametrize("which", ["tiny", "odd"])
def test_bf16_dot_row_alone_equals_row_in_any_call(bf16_dir, odd_bf16_dir, which):
    """Row r of a call of M rows has the bits of row r alone, for M = 1..9, 16, 64, 256 and the row at
    different places in the call: the GEMM's tiles of 1 to 8 rows, how many panels a tile takes at once
    and the packing change no result. Also through the MoE experts, whose GEMMs get as many rows as the
    batch routes to each expert."""
    path = bf16_dir[1] if which == "tiny" else odd_bf16_dir
    ops = _core.BackendOps(str(path), "cpu", cpu_weights="bf16")
    H, E, K = ops.config["hidden_size"], ops.config["num_experts"], ops.config["top_k_experts"]
    rng = np.random.default_rng(7)
    R = 296
    calls = {
        "q_proj 0": lambda x: ops.linear("q_proj", 0, x),
        "k_proj 1": lambda x: ops.linear("k_proj", 1, x),
        "mlp 0": lambda x: ops.mlp("mlp", 0, x),
        "lm_head": lambda x: ops.lm_head_logits(x),
    }
    xs = {name: rng.standard_normal((R, H)).astype(np.float32) for name in calls}
    o_in = ops.linear("q_proj", 0, xs["q_proj 0"][:1]).shape[1]  # heads x head_dim
    calls["o_proj 0"], xs["o_proj 0"] = (lambda x: ops.linear("o_proj", 0, x)), rng.standard_normal((R, o_in)).astype(np.float32)
    idx = np.stack([rng.permutation(E)[:K] for _ in range(R)]).astype(np.int32)
    wts = rng.random((R, K)).astype(np.float32)
    calls["moe_experts 1"] = lambda x, s=slice(None): ops.moe_experts(1, x, idx[s], wts[s])
    xs["moe_experts 1"] = rng.standard_normal((R, H)).astype(np.float32)
    for name, f in calls.items():
        x = xs[name]
        moe = name.startswith("moe")
        alone = np.concatenate([f(x[r : r + 1], slice(r, r + 1)) if moe else f(x[r : r + 1]) for r in range(R)])
        for m in (1, 2, 3, 4, 5, 6, 7, 8, 9, 16, 64, 256):
            r0 = (m * 37) % (R - m + 1)
            got = f(x[r0 : r0 + m], slice(r0, r0 + m)) if moe else f(x[r0 : r0 + m])
            np.testing.assert_array_equal(got, alone[r0 : r0 + m], err_msg=f"{name}, M={m}, rows from {r0}")
