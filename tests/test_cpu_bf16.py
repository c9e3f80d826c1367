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
