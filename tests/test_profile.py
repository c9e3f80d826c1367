"""Per-op profiling, the backend's memory accounting and the phased load progress (issue 12), on the CPU
backend: the machinery the CUDA backend shares (its events and device numbers need a GPU)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

import dgemma_rt
from dgemma_rt import _core
from dgemma_rt.engine import _LoadBar

FIXED = dict(eos_token_id=[], adaptive_stopping=False)
# Every op a generate call runs: the decoder step's, plus kv_write in encoder passes.
DECODER_OPS = {"embed", "gather_rows", "rmsnorm", "mlp", "scatter_add_rows", "linear", "copy", "head_norm_rope",
               "attention", "residual_norm_add", "moe_router", "moe_experts", "ffn_combine", "lm_head_sample"}


def prompt(ckpt, length, seed):
    return np.random.default_rng(seed).integers(3, ckpt.vocab_size, size=length).tolist()


def test_profile_covers_every_op_and_fits_in_the_steps(deep_ckpt):
    engine = dgemma_rt.Engine(deep_ckpt.path, kv_cache_tokens=512)
    engine.profile(True)
    out = engine.generate([prompt(deep_ckpt, 9, 1)], max_new_tokens=deep_ckpt.canvas_length, max_denoising_steps=4,
                          seed=3, **FIXED)
    prof = {p["op"]: p for p in engine.take_profile()}
    assert set(prof) == DECODER_OPS  # decoder steps only: no kv_write
    steps = out.timings["decoder_forwards"]
    assert steps == 4
    layers = deep_ckpt.num_layers
    assert prof["lm_head_sample"]["calls"] == steps and prof["embed"]["calls"] == steps
    assert prof["attention"]["calls"] == steps * layers and prof["moe_experts"]["calls"] == steps * layers
    assert all(p["seconds"] > 0 for p in prof.values())
    # Op times are inside the steps' time.
    assert sum(p["seconds"] for p in prof.values()) <= out.timings["denoise_s"]
    assert engine.take_profile() == []  # taken

    engine.profile(True, encoder=True)
    engine.generate([prompt(deep_ckpt, 9, 2)], max_new_tokens=deep_ckpt.canvas_length, max_denoising_steps=2, seed=3,
                    **FIXED)
    assert set(p["op"] for p in engine.take_profile()) == DECODER_OPS | {"kv_write"}
    engine.profile(False)


def test_profiling_off_records_nothing(deep_ckpt, engine_for):
    engine = engine_for(deep_ckpt)
    engine.take_profile()
    engine.generate([prompt(deep_ckpt, 5, 1)], max_new_tokens=8, max_denoising_steps=2, **FIXED)
    assert engine.take_profile() == []
    engine.profile(True)
    engine.profile(False)
    engine.generate([prompt(deep_ckpt, 5, 1)], max_new_tokens=8, max_denoising_steps=2, **FIXED)
    assert engine.take_profile() == []


def test_profiled_steps_match_and_are_not_captured(deep_ckpt, engine_for):
    """On the recording backend (CUDA-graph semantics) a profiled step runs its ops directly: the same
    tokens, no capture made or replayed; capture resumes once profiling is off."""
    kw = dict(max_new_tokens=deep_ckpt.canvas_length, max_denoising_steps=5, seed=5, **FIXED)
    ids = [prompt(deep_ckpt, 9, 1)]
    want = engine_for(deep_ckpt).generate(ids, **kw)
    native, counters = _core._testing.cpu_graph_engine(deep_ckpt.path)
    engine = dgemma_rt.Engine._from_native(native, deep_ckpt.path)
    engine.profile(True)
    got = engine.generate(ids, **kw)
    np.testing.assert_array_equal(got.sequences[0], want.sequences[0])
    st = engine.scheduler_stats()
    assert (st["captured_passes"], st["replayed_passes"]) == (0, 0)
    assert {p["op"] for p in engine.take_profile()} == DECODER_OPS
    engine.profile(False)
    again = engine.generate(ids, **kw)
    np.testing.assert_array_equal(again.sequences[0], want.sequences[0])
    assert engine.scheduler_stats()["replayed_passes"] > 0
    assert engine.take_profile() == []


def test_memory_stats_count_the_backends_allocations(deep_ckpt):
    small = dgemma_rt.Engine(deep_ckpt.path, kv_cache_tokens=256, max_batch_size=1)
    big = dgemma_rt.Engine(deep_ckpt.path, kv_cache_tokens=8192, max_batch_size=1)
    for e in (small, big):
        m = e.memory_stats()
        assert m["peak_bytes"] >= m["live_bytes"] > 0 and m["allocations"] > 0
        assert "device_total_bytes" not in m  # no device on the CPU
    assert big.memory_stats()["live_bytes"] > small.memory_stats()["live_bytes"]
    # The KV pool grows by kv_cache_tokens: 2 (K, V) x float32 x the full layers' kv_heads * head_dim.
    cfg = small.config
    per_token = sum(2 * 4 * h * d for t, h, d in zip(cfg["layer_types"], cfg["num_key_value_heads"], cfg["head_dims"])
                    if t == "full_attention")
    grew = big.memory_stats()["live_bytes"] - small.memory_stats()["live_bytes"]
    assert grew >= per_token * (8192 - 256)
    before = small.memory_stats()
    small.generate([prompt(deep_ckpt, 9, 1)], max_new_tokens=8, max_denoising_steps=2, **FIXED)
    after = small.memory_stats()  # the pass workspace
    assert after["peak_bytes"] >= after["live_bytes"] >= before["live_bytes"]
    assert after["allocations"] > before["allocations"]


def test_progress_reports_the_read_phase_on_the_cpu(deep_ckpt):
    """The CPU backend computes on what was read: the callback sees the read phase to its end and no
    upload (a GPU backend adds ("upload", done, total) after it)."""
    seen = []
    _core.Engine(deep_ckpt.path, "cpu", 256, 1, 0, lambda *a: seen.append(a), None)
    assert seen and {s[0] for s in seen} == {"read"}
    done = [s[1] for s in seen]
    assert done == sorted(done) and seen[-1][1] == seen[-1][2] > 0


class _FakeBar:
    def __init__(self):
        self.desc, self.total, self.n, self.refreshes, self.closed = None, None, 0, 0, False

    def set_description(self, desc, refresh=True):
        self.desc = desc

    def refresh(self):
        self.refreshes += 1

    def close(self):
        self.closed = True


def test_load_bar_names_each_phase():
    bar = _LoadBar("cuda:1", _FakeBar())
    bar.update("read", 1, 10)
    assert (bar.bar.desc, bar.bar.n, bar.bar.total) == ("loading weights", 1, 10)
    bar.update("read", 10, 10)
    bar.update("upload", 3, 7)
    assert (bar.bar.desc, bar.bar.n, bar.bar.total) == ("uploading weights to cuda:1", 3, 7)
    assert bar.phases == ["read", "upload"]
    bar.close()
    assert bar.bar.closed


def test_engine_progress_bar_runs(deep_ckpt, monkeypatch):
    pytest.importorskip("tqdm")
    made = []
    real = _LoadBar.__init__

    def spy(self, device, bar=None):
        real(self, device, _FakeBar())
        made.append(self)

    monkeypatch.setattr(_LoadBar, "__init__", spy)
    dgemma_rt.Engine(deep_ckpt.path, kv_cache_tokens=256, max_batch_size=1, progress=True)
    assert made and made[0].phases == ["read"] and made[0].bar.closed
    assert made[0].bar.n == made[0].bar.total > 0


def test_bench_profile_json(base_ckpt):
    cmd = [sys.executable, "-m", "dgemma_rt.bench", base_ckpt.path, "--prompt-len", "8", "--new-tokens", "8",
           "--steps", "2", "--warmup", "0", "--profile", "--json", "--no-progress"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    assert r["peak_device_memory_mib"] >= r["live_device_memory_mib"] > 0 and r["device_memory_is_host"]
    prof = r["op_profile"]
    assert prof["decoder_steps"] == 2 and prof["bandwidth_device"] is None
    ops = {o["op"]: o for o in prof["ops"]}
    assert set(ops) == DECODER_OPS
    assert prof["ops_ms_per_step"] <= prof["ms_per_step"]
    assert abs(sum(o["share_of_step"] for o in ops.values()) - prof["ops_ms_per_step"] / prof["ms_per_step"]) < 1e-9
    assert ops["moe_experts"]["roofline_rows"] == ["moe_permute", "moe_experts", "moe_combine"]
    assert ops["moe_experts"]["achieved_gbps"] > 0 and ops["moe_experts"]["bandwidth_fraction"] == "n/a"
    for name in ("copy", "gather_rows", "scatter_add_rows"):  # no roofline row: said so, no bytes invented
        assert ops[name]["gbytes_per_step"] is None and ops[name]["achieved_gbps"] is None and ops[name]["note"]
    assert "op_profile" not in json.loads(subprocess.run(
        [c for c in cmd if c != "--profile"], capture_output=True, text=True, timeout=600).stdout.splitlines()[-1])
