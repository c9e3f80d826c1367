"""dgemma-bench's GPU paths on a machine without a GPU: in a subprocess, device "cuda" is registered to
the CPU's graph-recording backend (_testing.register_stand_in_backend), so the code the GPU check's
benchmark steps run (--device cuda with random weights made by the backend, CUDA-graph counters,
--profile --gpu, --quant nvfp4, the --peer transformers path with its config-only random model) runs
here as it will there, with the same options as bench/gpu_check.sh, at the tiny preset. The kernels
are the CPU's: this checks the Python and the engine around them, not a GPU."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

import dgemma_rt

# bench/gpu_check.sh's BENCH_SHAPE at the tiny preset
SHAPE = ["--random-weights", "--preset", "tiny", "--device", "cuda", "--batch", "1", "--prompt-len", "64",
         "--new-tokens", "64", "--steps", "4", "--fixed-steps", "--warmup", "1", "--runs", "1", "--json",
         "--no-progress"]

RUN = """
import sys
from dgemma_rt import _core, bench
_core._testing.register_stand_in_backend("cuda")
if sys.argv[1] in ("peer-on-cpu", "peer-interrupted"):  # transformers' side on the CPU, as if torch had put it on the GPU
    import torch
    torch.cuda.synchronize = lambda *a, **k: None
    init = bench.TransformersPeer.__init__
    def on_cpu(self, ckpt, device, *a, **k):
        init(self, ckpt, "cpu", *a, **k)
        self.device = device
    bench.TransformersPeer.__init__ = on_cpu
if sys.argv[1] == "peer-interrupted":  # the GPU check's time cap (SIGINT) arrives during the peer's runs
    import time
    def waits_for_sigint(self, record):
        open("peer-started", "w").close()
        time.sleep(300)
        raise AssertionError("no SIGINT arrived")
    bench.TransformersPeer.run = waits_for_sigint
sys.exit(bench.main(sys.argv[2:]))
"""


def _env(tmp_path):
    # the package this test imported (an installed wheel in CI), from a folder outside the source tree
    root = os.path.dirname(os.path.dirname(dgemma_rt.__file__))
    return dict(os.environ, DGEMMA_RT_CACHE=str(tmp_path / "cache"),
                PYTHONPATH=os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p))


def bench(tmp_path, *extra, mode="plain"):
    proc = subprocess.run([sys.executable, "-c", RUN, mode, *SHAPE, *extra], capture_output=True, text=True,
                          timeout=600, env=_env(tmp_path), cwd=str(tmp_path))
    return proc, (json.loads(proc.stdout) if proc.stdout.strip() else None)


def test_bf16_with_profile_as_the_gpu_check_runs_it(tmp_path):
    proc, r = bench(tmp_path, "--profile", "--gpu", "h100")
    assert proc.returncode == 0, proc.stderr
    assert r["device"] == "cuda" and r["random_weights"] is not None and r["quant"] == "none"
    assert not r["device_memory_is_host"] and r["peak_device_memory_mib"] > 0
    # graphs: captured, replayed, none failed (the recording backend has a GPU's capture semantics)
    assert r["captured_passes"] >= 1 and r["replayed_passes"] >= 1 and r["capture_failures"] == 0, r
    p = r["op_profile"]
    assert p["bandwidth_device"].startswith("H100") and p["ops"] and p["ms_per_step"] > 0, p
    assert r["tokens_per_s"] > 0 and r["ms_per_step"] > 0


def test_nvfp4_experts_made_by_the_backend(tmp_path):
    proc, r = bench(tmp_path, "--quant", "nvfp4")
    assert proc.returncode == 0, proc.stderr
    assert r["quant"] == "nvfp4" and r["device"] == "cuda" and r["tokens_per_s"] > 0


def test_peer_on_the_gpu_path(tmp_path):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    proc, r = bench(tmp_path, "--peer", "transformers", mode="peer-on-cpu")
    assert proc.returncode == 0, proc.stderr
    assert "peer_error" not in r and r["peer"] == "transformers", r
    assert r["peer_median_ms"] > 0 and r["speedup_vs_peer"] > 0 and len(r["peer_runs_ms"]) == 1
    assert r["engine_median_ms"] > 0 and "peer_experts_implementation" in r


def test_an_interrupted_peer_keeps_the_engine_numbers(tmp_path):
    """As the GPU check runs it: started with SIGINT ignored (a background job), then sent SIGINT by its
    time cap while the peer runs. bench.main takes SIGINT back, so the peer stops and the engine's
    numbers are printed with peer_error."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    proc = subprocess.Popen([sys.executable, "-c", RUN, "peer-interrupted", *SHAPE, "--peer", "transformers"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(tmp_path),
                            cwd=str(tmp_path),
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    try:
        deadline = time.monotonic() + 600
        while not (tmp_path / "peer-started").exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert (tmp_path / "peer-started").exists(), proc.communicate(timeout=60)[1]
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    r = json.loads(out) if out.strip() else None
    assert proc.returncode == 1 and "peer was interrupted" in err, err
    assert r["peer_error"].startswith("interrupted") and r["tokens_per_s"] > 0 and "peer_median_ms" not in r, r


def test_a_failing_peer_keeps_the_engine_numbers(tmp_path):
    """Here torch has no CUDA, so the peer fails as an out-of-memory or a transformers API change would:
    the engine's numbers are printed with peer_error, and the exit status says it failed."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    if torch.cuda.is_available():
        pytest.skip("torch has a GPU here: the peer would not fail")
    proc, r = bench(tmp_path, "--peer", "transformers")
    assert proc.returncode == 1 and "the transformers peer failed" in proc.stderr, proc.stderr
    assert r["peer_error"] and r["tokens_per_s"] > 0 and "peer_median_ms" not in r, r
