"""NVFP4: the numpy reference quantizer, dgemma-quantize, and the engine's dequantizing loader."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys

import numpy as np
import pytest

import dgemma_rt
from dgemma_rt import nvfp4
from dgemma_rt.tiny import make_tiny

E2M1 = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]


def test_e2m1_round_to_nearest_even_and_saturation():
    cases = {0.0: 0.0, 0.2: 0.0, 0.25: 0.0, 0.26: 0.5, 0.75: 1.0, 1.25: 1.0, 1.75: 2.0, 2.5: 2.0, 3.5: 4.0,
             5.0: 4.0, 5.01: 6.0, 6.0: 6.0, 7.0: 6.0, 1e9: 6.0}
    for x, want in cases.items():
        for sign in (1, -1):
            got = nvfp4.e2m1_decode(nvfp4.e2m1_encode(np.float32(sign * x)))
            assert got == sign * want, (sign * x, got)
    # every representable value survives a round trip, both signs
    vals = np.array(E2M1 + [-v for v in E2M1[1:]], dtype=np.float32)
    np.testing.assert_array_equal(nvfp4.e2m1_decode(nvfp4.e2m1_encode(vals)), vals)


def test_e4m3_codes():
    codes = np.arange(256, dtype=np.uint8)
    vals = nvfp4.e4m3_decode(codes)
    assert np.isnan(vals[0x7F]) and np.isnan(vals[0xFF])
    assert vals[0x7E] == 448.0 and vals[1] == 2.0**-9 and vals[0x08] == 2.0**-6
    pos = codes[:0x7F]
    np.testing.assert_array_equal(nvfp4.e4m3_encode(nvfp4.e4m3_decode(pos)), pos)
    assert nvfp4.e4m3_decode(nvfp4.e4m3_encode(np.float32(1000.0))) == 448.0  # saturates
    # ties go to the even code: 1 + 1/16 lies halfway between 1 (0x38) and 1.125 (0x39)
    assert nvfp4.e4m3_encode(np.float32(1.0625)) == 0x38
    with pytest.raises(ValueError):
        nvfp4.e4m3_encode(np.float32(np.inf))


def test_pack_nibble_order():
    codes = np.array([[1, 2, 3, 15]], dtype=np.uint8)
    packed = nvfp4.pack(codes)
    np.testing.assert_array_equal(packed, [[0x21, 0xF3]])
    np.testing.assert_array_equal(nvfp4.unpack(packed), codes)


def test_quantize_error_and_special_inputs():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((4, 8, 64)).astype(np.float32) * np.array([1e-3, 1, 10, 300], dtype=np.float32)[:, None, None]
    packed, scales, g = nvfp4.quantize(w, per_leading=True)
    assert packed.shape == (4, 8, 32) and scales.shape == (4, 8, 4) and g.shape == (4,)
    deq = nvfp4.dequantize(packed, scales, g)
    # Each block's error is within half an E2M1 step at the block's scale, plus the scale's own rounding.
    blocks = w.reshape(4, 8, 4, 16)
    bmax = np.abs(blocks).max(-1, keepdims=True)
    err = np.abs(deq.reshape(blocks.shape) - blocks)
    assert np.all(err <= bmax * (1 / 6 + 1 / 16) + 1e-12)
    assert np.mean(err) < 0.1 * np.mean(np.abs(blocks))
    # exact for representable values: with amax = 6 * 448 * 2^-10 the global scale is 2^-10, the block
    # scale 448 and every value an E2M1 one
    exact = np.array([[0, 0.5, 1, 1.5, 2, 3, 4, 6, -6, -4, -3, -2, -1.5, -1, -0.5, 0]], dtype=np.float32)
    exact = exact * np.float32(448 * 2**-10)
    p, s, gg = nvfp4.quantize(exact)
    assert gg == 2**-10 and np.all(nvfp4.e4m3_decode(s) == 448)
    np.testing.assert_array_equal(nvfp4.dequantize(p, s, gg), exact)
    # zeros stay zeros, a zero tensor too
    z = np.zeros((2, 32), dtype=np.float32)
    np.testing.assert_array_equal(nvfp4.dequantize(*nvfp4.quantize(z)), z)
    for bad in (np.nan, np.inf, -np.inf):
        x = np.ones((1, 16), dtype=np.float32)
        x[0, 3] = bad
        with pytest.raises(ValueError, match="NaN or Inf"):
            nvfp4.quantize(x)
    with pytest.raises(ValueError, match="multiple of 16"):
        nvfp4.quantize(np.ones((2, 24), dtype=np.float32))


@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory):
    base = make_tiny(tmp_path_factory.mktemp("nvfp4_src"))
    quant = tmp_path_factory.mktemp("nvfp4_dst")
    names = nvfp4.quantize_checkpoint(base, quant)
    return base, quant, names


def _deq_checkpoint(base, quant, dst):
    """base with every NVFP4 tensor of quant replaced by its numpy dequantization, as F32."""
    shutil.copytree(base, dst)
    q, _ = nvfp4.read_safetensors(quant / "model.safetensors")
    src, meta = nvfp4.read_safetensors(base / "model.safetensors")
    out = {}
    for name, (dt, arr) in src.items():
        if q[name][0] == "U8" and name + "_scale" in q:
            out[name] = ("F32", nvfp4.dequantize(q[name][1], q[name + "_scale"][1], q[name + "_scale_2"][1]))
        elif q[name][0] == "F8_E4M3":
            out[name] = ("F32", nvfp4.dequantize_fp8(q[name][1], q[name + "_scale"][1]))
        else:
            out[name] = (dt, arr)
    nvfp4.write_safetensors(dst / "model.safetensors", out, meta)
    return dst


def test_quantized_checkpoint_layout(tiny_pair):
    base, quant, names = tiny_pair
    assert names and all(nvfp4.is_expert_weight(n) for n in names)
    q, _ = nvfp4.read_safetensors(quant / "model.safetensors")
    for n in names:
        assert q[n][0] == "U8" and q[n + "_scale"][0] == "F8_E4M3" and q[n + "_scale_2"][0] == "F32"
    assert json.loads((quant / "config.json").read_text())["quantization_config"]["quant_method"] == "nvfp4"
    assert (quant / "tokenizer.json").is_file()
    size = lambda d: sum(f.stat().st_size for f in d.glob("*.safetensors"))  # noqa: E731
    assert size(quant) < size(base)


def test_engine_dequantizes_exactly_like_the_reference(tiny_pair, tmp_path):
    base, quant, _ = tiny_pair
    deq = _deq_checkpoint(base, quant, tmp_path / "deq")
    a = dgemma_rt.Engine(quant, num_threads=2)
    b = dgemma_rt.Engine(deq, num_threads=2)
    ids = [[12, 500, 77, 1900, 33]]
    canvas = np.array([[7 + i for i in range(64)]], dtype=np.int32)
    la = a.denoise_logits(a.encode(ids), canvas)
    lb = b.denoise_logits(b.encode(ids), canvas)
    np.testing.assert_array_equal(la, lb)
    kw = dict(max_new_tokens=128, max_denoising_steps=8, seed=3)
    np.testing.assert_array_equal(a.generate(ids, **kw).sequences, b.generate(ids, **kw).sequences)


def test_nvfp4_vs_full_precision_logits(tiny_pair, tmp_path):
    """How far 4-bit experts move the model: reported, and bounded.

    The tiny model has random weights and is very sensitive (even BF16 experts move it visibly), so
    the bound is relative: NVFP4 must do no worse than Gaussian noise of the same RMS as NVFP4's
    error (~9.5% of the weights' RMS) added to the experts.
    """
    base, quant, _ = tiny_pair
    src, meta = nvfp4.read_safetensors(base / "model.safetensors")
    q, _ = nvfp4.read_safetensors(quant / "model.safetensors")
    rng = np.random.default_rng(1)
    noisy = {}
    for name, (dt, arr) in src.items():
        if nvfp4.is_expert_weight(name):
            deq = nvfp4.dequantize(q[name][1], q[name + "_scale"][1], q[name + "_scale_2"][1])
            rms = np.sqrt(np.mean((deq - arr) ** 2))
            assert rms < 0.11 * np.sqrt(np.mean(arr**2))
            arr = arr + rng.standard_normal(arr.shape).astype(np.float32) * np.float32(rms)
        noisy[name] = (dt, arr)
    noise_dir = tmp_path / "noise"
    shutil.copytree(base, noise_dir)
    nvfp4.write_safetensors(noise_dir / "model.safetensors", noisy, meta)

    ids = rng.integers(8, 2048, size=(2, 24)).tolist()
    canvas = rng.integers(8, 2048, size=(2, 64)).astype(np.int32)

    def logits(path):
        e = dgemma_rt.Engine(path, num_threads=2)
        return e.denoise_logits(e.encode(ids), canvas).astype(np.float64)

    def logp(x):
        x = x - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))

    ref = logits(base)

    def compare(path):
        other = logits(path)
        a, b = logp(ref), logp(other)
        return float((np.exp(a) * (a - b)).sum(-1).mean()), float((ref.argmax(-1) == other.argmax(-1)).mean())

    kl_q, agree_q = compare(quant)
    kl_n, agree_n = compare(noise_dir)
    print(f"tiny model, experts NVFP4 vs F32: mean KL {kl_q:.3f}, argmax agreement {agree_q:.3f}; "
          f"same-RMS Gaussian noise: mean KL {kl_n:.3f}, agreement {agree_n:.3f}")
    assert kl_q <= 1.5 * kl_n and agree_q >= 0.75 * agree_n
    assert agree_q > 0.2  # far above chance (1/2048)


def _expect_checkpoint_error(src, tmp_path, edit, words):
    """A copy of checkpoint ``src`` with its tensors changed by ``edit`` must fail to load, naming ``words``."""
    d = tmp_path / f"b{len(list(tmp_path.iterdir()))}"
    shutil.copytree(src, d)
    t, meta = nvfp4.read_safetensors(d / "model.safetensors")
    edit(t)
    nvfp4.write_safetensors(d / "model.safetensors", t, meta)
    with pytest.raises(dgemma_rt.CheckpointError) as e:
        dgemma_rt.Engine(d)
    for w in words:
        assert w in str(e.value)


def test_corrupt_nvfp4_checkpoints(tiny_pair, tmp_path):
    _, quant, names = tiny_pair
    name = names[0]

    def broken(edit, words):
        _expect_checkpoint_error(quant, tmp_path, edit, words)

    broken(lambda t: t.pop(name + "_scale_2"), ["_scale_2"])
    broken(lambda t: t.__setitem__(name + "_scale", ("F8_E4M3", t[name + "_scale"][1][..., :-1])), ["block scales"])
    broken(lambda t: t.__setitem__(name, ("U8", t[name][1][..., :-1])), ["packed"])
    broken(lambda t: t.__setitem__(name + "_scale_2", ("F32", np.array([np.nan] * t[name + "_scale_2"][1].size,
                                                                     dtype=np.float32))), ["not finite"])
    nan_scales = lambda t: t.__setitem__(name + "_scale", ("F8_E4M3", np.full_like(t[name + "_scale"][1], 0x7F)))  # noqa: E731
    broken(nan_scales, ["NaN"])


def test_dgemma_quantize_cli(tmp_path):
    src = make_tiny(tmp_path / "src")
    r = subprocess.run([sys.executable, "-m", "dgemma_rt.nvfp4", str(src), str(tmp_path / "dst")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "quantized 12 tensors" in r.stdout
    # a new directory's mode, as make-tiny's (it was mkdtemp's 0700: unreadable to a server run as another user)
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE((tmp_path / "dst").stat().st_mode) == 0o777 & ~mask
    shared = tmp_path / "shared"  # a shared volume's directory passes its group on: setgid stays
    shared.mkdir()
    shared.chmod(0o2775)
    r = subprocess.run([sys.executable, "-m", "dgemma_rt.nvfp4", str(src), str(shared / "q")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert stat.S_IMODE((shared / "q").stat().st_mode) == (0o777 & ~mask) | stat.S_ISGID
    r = subprocess.run([sys.executable, "-m", "dgemma_rt.nvfp4", str(tmp_path / "nope"), str(tmp_path / "x")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "does not exist" in r.stderr and "Traceback" not in r.stderr


def test_quantize_writes_a_whole_checkpoint_or_nothing(tiny_pair, tmp_path, monkeypatch):
    """Only into a new or empty directory (an old index and shards left in one were loaded instead of the
    new weights), never into "" (the current directory), and a failed run leaves nothing behind."""
    base, quant, _ = tiny_pair
    used = tmp_path / "used"
    shutil.copytree(quant, used)
    (used / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {}}))
    for dst, words in ((used, "not empty"), ("", "destination is empty"), (used / "config.json", "not a directory")):
        with pytest.raises(ValueError, match=words):
            nvfp4.quantize_checkpoint(base, dst)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert nvfp4.quantize_checkpoint(base, empty) and (empty / "config.json").exists()

    def disk_full(path, *a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(nvfp4, "write_safetensors", disk_full)
    for dst in (tmp_path / "new", tmp_path / "empty2"):
        if dst.name == "empty2":
            dst.mkdir()
        with pytest.raises(OSError, match="No space"):
            nvfp4.quantize_checkpoint(base, dst)
        assert not dst.exists() or not any(dst.iterdir())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "empty2", "used"]  # no .partial left
    assert not any((tmp_path / "empty2").iterdir())


def test_dgemma_quantize_sigterm_leaves_nothing(tiny_pair, tmp_path):
    """SIGTERM mid-run (a job scheduler, docker stop) cleans up as Ctrl-C does."""
    import signal
    import time

    base, _, _ = tiny_pair
    code = ("import sys, time\n"
            "from dgemma_rt import nvfp4\n"
            "real = nvfp4.write_safetensors\n"
            "def slow(*a, **k):\n"
            "    print('writing', flush=True)\n"
            "    time.sleep(60)\n"
            "nvfp4.write_safetensors = slow\n"
            "sys.exit(nvfp4.main(sys.argv[1:]))\n")
    proc = subprocess.Popen([sys.executable, "-c", code, str(base), str(tmp_path / "out")], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline() == "writing\n"
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130 and "interrupted" in err, (proc.returncode, err)
    assert list(tmp_path.iterdir()) == []


def test_quantize_at_load_time(tiny_pair):
    base, quant, _ = tiny_pair
    a = dgemma_rt.Engine(base, quant="nvfp4", num_threads=2)
    b = dgemma_rt.Engine(quant, num_threads=2)
    kw = dict(max_new_tokens=64, max_denoising_steps=6, seed=5)
    np.testing.assert_array_equal(a.generate([[40, 41, 42]], **kw).sequences, b.generate([[40, 41, 42]], **kw).sequences)
    assert a.tokenizer is not None  # still read from the original directory
    with pytest.raises(ValueError, match="quant"):
        dgemma_rt.Engine(base, quant="int4")


def test_quantize_refuses_a_stray_scale(tiny_pair, tmp_path):
    """A `<weight>_scale` beside a floating-point weight (ignored by the loader) was copied over the scale just
    computed: a checkpoint with wrong weights that loaded without an error."""
    base, _, _ = tiny_pair
    src = tmp_path / "src"
    shutil.copytree(base, src)
    tensors, meta = nvfp4.read_safetensors(src / "model.safetensors")
    name = next(n for n in nvfp4.quantize_plan(src) if n.endswith("gate_up_proj"))
    tensors[name + "_scale"] = ("F32", np.ones(4, np.float32))
    nvfp4.write_safetensors(src / "model.safetensors", tensors, meta)
    dgemma_rt.Engine(src, num_threads=1)  # loads: the stray tensor is unused
    with pytest.raises(ValueError, match=f"holds '{name}_scale' beside the floating-point tensor"):
        nvfp4.quantize_checkpoint(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_requantizing_a_quantized_checkpoint(tiny_pair, tmp_path, monkeypatch):
    """Nothing left to quantize is an error before anything is written (dgemma-quantize printed "quantized 0
    tensors" and made a copy); Engine(quant=...) loads such a checkpoint as it is; a second pass that does
    quantize something keeps the first pass's entry in quantization_config."""
    base, quant, _ = tiny_pair
    assert nvfp4.quantize_plan(quant) == [] and len(nvfp4.quantize_plan(base)) == 12
    with pytest.raises(ValueError, match=r"nothing to quantize .*\(quantized already\?\)"):
        nvfp4.quantize_checkpoint(quant, tmp_path / "again")
    r = subprocess.run([sys.executable, "-m", "dgemma_rt.nvfp4", str(quant), str(tmp_path / "again")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "nothing to quantize" in r.stderr and "quantized 0" not in r.stdout, r
    assert list(tmp_path.iterdir()) == []

    both = tmp_path / "both"
    names = nvfp4.quantize_checkpoint(quant, both, dense="fp8")
    assert names and all(nvfp4.is_dense_weight(n) for n in names)
    cfg = json.loads((both / "config.json").read_text())["quantization_config"]
    assert cfg["quantized"] == "dense_fp8+moe_experts" and cfg["quant_method"] == "nvfp4"

    def no_copy(*a, **k):
        raise AssertionError("copied a checkpoint that needs no quantizing")

    monkeypatch.setattr(nvfp4, "quantize_checkpoint", no_copy)
    a = dgemma_rt.Engine(quant, quant="nvfp4", num_threads=2)
    b = dgemma_rt.Engine(quant, num_threads=2)
    kw = dict(max_new_tokens=64, max_denoising_steps=4, seed=5)
    np.testing.assert_array_equal(a.generate([[40, 41, 42]], **kw).sequences, b.generate([[40, 41, 42]], **kw).sequences)
    assert a.quant == "nvfp4" and a.path == str(quant)


def test_dense_projections_behind_a_flag(tiny_pair, tmp_path):
    base, _, _ = tiny_pair
    dst = tmp_path / "dense"
    names = nvfp4.quantize_checkpoint(base, dst, dense=True)
    src, _ = nvfp4.read_safetensors(base / "model.safetensors")
    want = {n for n in src if nvfp4.is_dense_weight(n) or nvfp4.is_expert_weight(n)}
    assert set(names) == want and any(n.endswith("self_attn.q_proj.weight") for n in names)
    assert not any("embed_tokens" in n or "router" in n or "self_conditioning" in n for n in names)
    # The engine loads 2-D NVFP4 tensors (one global scale each) exactly as the reference dequantizes them.
    deq = _deq_checkpoint(base, dst, tmp_path / "deq")
    a, b = dgemma_rt.Engine(dst, num_threads=2), dgemma_rt.Engine(deq, num_threads=2)
    ids = [[30, 31, 32, 33]]
    canvas = np.arange(100, 164, dtype=np.int32)[None]
    np.testing.assert_array_equal(a.denoise_logits(a.encode(ids), canvas), b.denoise_logits(b.encode(ids), canvas))


def test_fp8_rounding_and_per_channel_scales():
    x = np.array([0.0, -0.0, 1.0, -1.0, 448.0, -448.0, 500.0, -1e9, 1.0625, -1.0625, 2.0**-9, 2.0**-10],
                 dtype=np.float32)
    codes = nvfp4.e4m3_encode_signed(x)
    # -0 -> +0; saturation at +-448; 1.0625 is halfway between 1 and 1.125: ties to the even code (1.0);
    # 2^-9 is the smallest subnormal, 2^-10 a tie between it and zero: to zero (even)
    np.testing.assert_array_equal(nvfp4.e4m3_decode(codes),
                                  [0, 0, 1, -1, 448, -448, 448, -448, 1, -1, 2.0**-9, 0])
    assert codes[1] == 0 and codes[11] == 0
    rng = np.random.default_rng(5)
    w = (rng.standard_normal((24, 80)) * rng.uniform(1e-3, 10, size=(24, 1))).astype(np.float32)
    w[3] = 0.0
    q, scale = nvfp4.quantize_fp8(w)
    assert q.dtype == np.uint8 and q.shape == w.shape and scale.shape == (24,)
    amax = np.abs(w).max(-1)
    np.testing.assert_array_equal(scale, np.where(amax > 0, amax / np.float32(448), 1).astype(np.float32))
    deq = nvfp4.dequantize_fp8(q, scale)
    np.testing.assert_array_equal(deq[3], 0)
    # E4M3 keeps 3 mantissa bits: within 2^-4 relative in its normal range (|v| >= 2^-6 of the scale)
    normal = np.abs(w) >= scale[:, None] * 2.0**-6
    assert np.all(np.abs(deq - w)[normal] <= np.abs(w)[normal] * 2.0**-4)
    assert np.all(np.abs(deq - w)[~normal] <= scale[:, None].repeat(80, 1)[~normal] * 2.0**-10)
    # every row's largest magnitude is exactly representable: +-448 * scale
    np.testing.assert_array_equal(np.abs(nvfp4.e4m3_decode(q)).max(-1)[amax > 0], 448)
    with pytest.raises(ValueError, match="NaN or Inf"):
        nvfp4.quantize_fp8(np.array([[1.0, np.inf]], np.float32))


@pytest.fixture(scope="module")
def fp8_dense(tiny_pair, tmp_path_factory):
    base, _, _ = tiny_pair
    dst = tmp_path_factory.mktemp("fp8_dense")
    return dst, nvfp4.quantize_checkpoint(base, dst, dense="fp8", experts=False)


def test_quantization_config_says_what_was_done(fp8_dense, tmp_path):
    """NVFP4 experts over FP8 dense layers: the dense layers, stored quantized, stay FP8, and the label says so."""
    src, _ = fp8_dense
    names = nvfp4.quantize_checkpoint(src, tmp_path / "both", dense="nvfp4")
    assert names and all(nvfp4.is_expert_weight(n) for n in names)
    cfg = json.loads((tmp_path / "both" / "config.json").read_text())["quantization_config"]
    assert cfg["quantized"] == "dense_fp8+moe_experts" and cfg["quant_method"] == "nvfp4", cfg


@pytest.mark.parametrize("kind", ["experts", "fp8_dense", "nvfp4_dense"])
def test_quantized_weights_as_stored_match_float32_mode(tiny_pair, fp8_dense, tmp_path, kind):
    """On the CPU, NVFP4 and FP8 weights stay packed in the map and are dequantized per tile inside the
    GEMMs (cpu_weights="stored"); "float32" dequantizes them at load. Same values, same BLAS calls."""
    base, quant, _ = tiny_pair
    if kind == "experts":
        path = quant
    elif kind == "fp8_dense":
        path = fp8_dense[0]
    else:
        path = tmp_path / "nvfp4_dense"
        nvfp4.quantize_checkpoint(base, path, dense="nvfp4")
    ids = [[40, 41, 42, 43], [7, 8]]
    canvas = np.random.default_rng(0).integers(8, 2048, size=(2, 64)).astype(np.int32)
    out = []
    for mode in ("stored", "float32"):
        e = dgemma_rt.Engine(path, num_threads=2, cpu_weights=mode)
        out.append((e.denoise_logits(e.encode(ids), canvas),
                    e.generate([[40, 41, 42]], max_new_tokens=64, max_denoising_steps=4, seed=1).sequences))
    np.testing.assert_array_equal(out[0][0], out[1][0])
    np.testing.assert_array_equal(out[0][1], out[1][1])


def test_fp8_dense_checkpoint_loads_exactly_like_the_reference(tiny_pair, fp8_dense, tmp_path):
    base, _, _ = tiny_pair
    dst, names = fp8_dense
    src, meta = nvfp4.read_safetensors(base / "model.safetensors")
    assert set(names) == {n for n in src if nvfp4.is_dense_weight(n)}
    q, _ = nvfp4.read_safetensors(dst / "model.safetensors")
    for n in names:
        assert q[n][0] == "F8_E4M3" and q[n + "_scale"][0] == "F32" and q[n + "_scale"][1].shape == (src[n][1].shape[0],)
    cfg = json.loads((dst / "config.json").read_text())["quantization_config"]
    assert cfg["quant_method"] == "fp8" and cfg["quantized"] == "dense_fp8"
    deq = _deq_checkpoint(base, dst, tmp_path / "deq")
    a, b = dgemma_rt.Engine(dst, num_threads=2), dgemma_rt.Engine(deq, num_threads=2)
    ids = [[30, 31, 32, 33]]
    canvas = np.arange(100, 164, dtype=np.int32)[None]
    ref = b.denoise_logits(b.encode(ids), canvas)
    np.testing.assert_array_equal(a.denoise_logits(a.encode(ids), canvas), ref)
    # the other scale layouts the loader takes: [N, 1] (compressed-tensors) and one per tensor (ModelOpt)
    for variant in ("column", "tensor"):
        d = tmp_path / variant
        shutil.copytree(dst, d)
        t, m = nvfp4.read_safetensors(d / "model.safetensors")
        for n in names:
            codes = t[n][1]
            if variant == "column":
                t[n + "_scale"] = ("F32", t[n + "_scale"][1][:, None])
            else:
                full = nvfp4.dequantize_fp8(codes, t[n + "_scale"][1])
                one = np.float32(np.abs(full).max() / 448)
                t[n] = ("F8_E4M3", nvfp4.e4m3_encode_signed(full / one))
                t[n + "_scale"] = ("F32", np.array(one, dtype=np.float32))
        nvfp4.write_safetensors(d / "model.safetensors", t, m)
        e = dgemma_rt.Engine(d, num_threads=2)
        f = _deq_checkpoint(base, d, tmp_path / f"{variant}-deq")
        e2 = dgemma_rt.Engine(f, num_threads=2)
        np.testing.assert_array_equal(e.denoise_logits(e.encode(ids), canvas), e2.denoise_logits(e2.encode(ids), canvas))


def test_fp8_dense_vs_full_precision(tiny_pair, fp8_dense, tmp_path):
    """How far FP8 dense layers move the model: reported, and bounded.

    The random tiny model is very sensitive to its attention projections (BF16-rounding them alone
    gives a mean KL of ~0.4), so the bounds are relative: FP8 must do no worse than Gaussian noise of
    the same RMS as its error (~2.6% of the weights' RMS), and better than NVFP4 dense layers.
    """
    base, _, _ = tiny_pair
    dst, names = fp8_dense
    src, meta = nvfp4.read_safetensors(base / "model.safetensors")
    q, _ = nvfp4.read_safetensors(dst / "model.safetensors")
    rng = np.random.default_rng(2)
    noisy = {}
    for name, (dt, arr) in src.items():
        if name in names:
            deq = nvfp4.dequantize_fp8(q[name][1], q[name + "_scale"][1])
            rms = np.sqrt(np.mean((deq - arr) ** 2))
            assert rms < 0.04 * np.sqrt(np.mean(arr**2))
            arr = arr + rng.standard_normal(arr.shape).astype(np.float32) * np.float32(rms)
        noisy[name] = (dt, arr)
    shutil.copytree(base, tmp_path / "noise")
    nvfp4.write_safetensors(tmp_path / "noise" / "model.safetensors", noisy, meta)
    nvfp4.quantize_checkpoint(base, tmp_path / "nvfp4", dense="nvfp4", experts=False)

    ids = rng.integers(8, 2048, size=(2, 24)).tolist()
    canvas = rng.integers(8, 2048, size=(2, 64)).astype(np.int32)

    def logp(path):
        e = dgemma_rt.Engine(path, num_threads=2)
        x = e.denoise_logits(e.encode(ids), canvas).astype(np.float64)
        x = x - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))

    ref = logp(base)

    def compare(path):
        b = logp(path)
        return float((np.exp(ref) * (ref - b)).sum(-1).mean()), float((ref.argmax(-1) == b.argmax(-1)).mean())

    kl_f, agree_f = compare(dst)
    kl_n, agree_n = compare(tmp_path / "noise")
    kl_4, agree_4 = compare(tmp_path / "nvfp4")
    print(f"tiny model, dense layers FP8 vs F32: mean KL {kl_f:.3f}, argmax agreement {agree_f:.3f}; "
          f"same-RMS Gaussian noise: {kl_n:.3f}, {agree_n:.3f}; dense NVFP4: {kl_4:.3f}, {agree_4:.3f}")
    assert kl_f <= 1.5 * kl_n and agree_f >= 0.75 * agree_n
    assert kl_f < kl_4


def test_corrupt_fp8_checkpoints(fp8_dense, tmp_path):
    dst, names = fp8_dense
    name = names[0]

    def broken(edit, words):
        _expect_checkpoint_error(dst, tmp_path, edit, words)

    broken(lambda t: t.pop(name + "_scale"), ["FP8", "no scale"])
    broken(lambda t: t.__setitem__(name + "_scale", ("F32", t[name + "_scale"][1][:-1])), ["one per row"])
    broken(lambda t: t.__setitem__(name + "_scale", ("BF16", t[name + "_scale"][1])), ["must be F32"])
    broken(lambda t: t.__setitem__(name, ("F8_E4M3", t[name][1][:-1])), ["shape"])
    nan_scale = lambda t: t.__setitem__(name + "_scale", ("F32", np.full_like(t[name + "_scale"][1], np.inf)))  # noqa: E731
    broken(nan_scale, ["not finite"])
    nan_codes = lambda t: t.__setitem__(name, ("F8_E4M3", np.full_like(t[name][1], 0xFF)))  # noqa: E731
    broken(nan_codes, ["NaN"])


def test_fp8_dense_cli_and_load_time(tiny_pair, fp8_dense, tmp_path):
    base, _, _ = tiny_pair
    dst, names = fp8_dense
    r = subprocess.run([sys.executable, "-m", "dgemma_rt.nvfp4", str(base), str(tmp_path / "both"), "--dense", "fp8"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert f"quantized {12 + len(names)} tensors" in r.stdout
    q, _ = nvfp4.read_safetensors(tmp_path / "both" / "model.safetensors")
    assert q[names[0]][0] == "F8_E4M3" and any(v[0] == "U8" for v in q.values())
    r = subprocess.run([sys.executable, "-m", "dgemma_rt.nvfp4", str(base), str(tmp_path / "x"), "--dense", "int8"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "invalid choice" in r.stderr
    a = dgemma_rt.Engine(base, dense_quant="fp8", num_threads=2)
    b = dgemma_rt.Engine(dst, num_threads=2)
    kw = dict(max_new_tokens=64, max_denoising_steps=6, seed=5)
    np.testing.assert_array_equal(a.generate([[40, 41, 42]], **kw).sequences,
                                  b.generate([[40, 41, 42]], **kw).sequences)
    assert a.dense_quant == "fp8" and a.quant is None
    with pytest.raises(ValueError, match="dense_quant"):
        dgemma_rt.Engine(base, dense_quant="int8")
    with pytest.raises(ValueError, match="nothing to quantize"):
        nvfp4.quantize_checkpoint(base, tmp_path / "y", experts=False)


@pytest.mark.parametrize("rows,kblocks", [(1, 1), (37, 3), (128, 4), (129, 44), (256, 176)])
def test_swizzle_scales_places_every_scale_once_and_zero_pads(rows, kblocks):
    rng = np.random.default_rng(rows * kblocks)
    scales = rng.integers(1, 127, size=(2, rows, kblocks)).astype(np.uint8)  # nonzero: padding is told apart
    out = nvfp4.swizzle_scales(scales)
    assert out.shape == (2, nvfp4.sf_bytes(rows, kblocks))
    assert out.shape[1] == -(-rows // 128) * 128 * (-(-kblocks // 4) * 4)
    offs = nvfp4.sf_offsets(rows, kblocks)
    for e in range(2):
        np.testing.assert_array_equal(out[e][offs], scales[e])
    assert np.count_nonzero(out) == scales.size
    # the atom's inner order: rows 0..31 step 16 bytes, the four 32-row quarters 4 bytes, columns 1 byte
    if rows >= 128 and kblocks > 4:
        assert offs[1, 0] == 16 and offs[32, 0] == 4 and offs[0, 1] == 1 and offs[0, 4] == 512
    with pytest.raises(ValueError, match="rows"):
        nvfp4.swizzle_scales(np.zeros(4, np.uint8))
