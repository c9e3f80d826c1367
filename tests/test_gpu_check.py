"""bench/gpu_check.sh --dry-run: the wheels the GPU check carries install offline and resolve for the GPU
machine's Python 3.12 against what it already has, and every step's command exists (see docs/gpu-bringup.md).

Downloads the wheel set first (tools/gpu_wheels.sh, ~20 MB from PyPI, once: build/gpu-wheels is kept);
skipped only when PyPI cannot be reached and the wheels are not there yet.
"""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import shutil
import socket
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
WHEELS = ROOT / "build" / "gpu-wheels"


def _listed() -> list[str]:
    out = []
    for line in (ROOT / "tools" / "gpu_wheels.txt").read_text().splitlines():
        line = line.split("#", 1)[0].split()
        if line:
            name, version = line[0].split("==")
            out.append(f"{name.replace('-', '_')}-{version}-")
    return out


def _have_wheels() -> bool:
    names = [p.name for p in WHEELS.glob("*.whl")]
    return (WHEELS / "SOURCE_COMMIT").is_file() and all(any(n.startswith(w) for n in names) for w in _listed())


def _pypi_reachable() -> bool:
    try:
        socket.create_connection(("pypi.org", 443), timeout=5).close()
        return True
    except OSError:
        return False


def _env() -> dict[str, str]:
    # The interpreter running the tests, and its scripts (an installed dgemma-bench) first on PATH.
    env = dict(os.environ, PYTHON=sys.executable)
    env["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), env.get("PATH", "")])
    return env


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_gpu_check_dry_run():
    env = _env()
    if not _have_wheels():
        proc = subprocess.run(["bash", str(ROOT / "tools" / "gpu_wheels.sh")], env=env, capture_output=True,
                              text=True, timeout=300)
        if proc.returncode != 0 and not _pypi_reachable():
            pytest.skip("PyPI unreachable and build/gpu-wheels incomplete: cannot fetch the GPU check's wheels")
        assert proc.returncode == 0, proc.stdout + proc.stderr
    proc = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), "--dry-run"], env=env, capture_output=True,
                          text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "FAIL" not in out and "dry run: 0 problem(s)" in out, out
    # the resolution for the GPU machine: the carried wheels, the rest from what it has
    assert "transformers 5.23.0: carried" in out and "huggingface_hub 1.33.0: on the machine (stub)" in out, out
    # the plan names every step, in order
    steps = ["provenance", "wheels", "build", "tests", "kernels", "memcheck", "bench-bf16", "bench-peer", "bench-nvfp4",
             "results"]
    plan = out.split("== the plan", 1)[1].splitlines()[1:]
    assert [line.split()[0] for line in plan[: len(steps)]] == steps, out
    assert "90a-real" in out and "CMAKE_BUILD_PARALLEL_LEVEL=16" in out and "DGEMMA_CUTLASS_INCLUDE=" in out
    # the kernel microbenchmark: its dry run passed here, its step writes raw-kernels.json; the bf16 bench profiles
    if importlib.util.find_spec("torch") is not None:
        assert "ok:   bench/kernels_gpu.py --dry-run" in out, out
    else:
        assert "note: bench/kernels_gpu.py --dry-run not run" in out, out
    step = {line.split()[0]: line for line in plan[: len(steps)]}
    assert "bench/kernels_gpu.py --out $OUT/results/raw-kernels.json" in step["kernels"]
    assert "cap   90s  needs build" in step["kernels"]
    assert "--profile --gpu $GPU_KIND" in step["bench-bf16"] and "--profile" not in step["bench-nvfp4"]


def test_gpu_check_dry_run_names_a_missing_wheel(tmp_path):
    """An incomplete wheel folder fails the dry run and names what is missing (no download needed)."""
    (tmp_path / "SOURCE_COMMIT").write_text("0" * 40 + "\n")
    env = dict(_env(), GPU_WHEELS=str(tmp_path))
    proc = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), "--dry-run"], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode != 0
    assert "FAIL: transformers==5.23.0 missing" in proc.stdout and "tools/gpu_wheels.sh" in proc.stdout


def test_results_and_summary_carry_the_kernels_json(tmp_path):
    """The results step names raw-kernels.json for bench/results/ with the provenance; the summary gives its
    target verdicts (made-up numbers: no GPU here)."""
    (tmp_path / "results").mkdir()
    (tmp_path / "provenance.json").write_text(json.dumps({
        "git_commit": "a" * 40, "git_dirty": False, "device": "NVIDIA H100 80GB HBM3", "driver": "580.1"}))
    cmd = "cd / && python3 bench/kernels_gpu.py --out $OUT/results/raw-kernels.json"
    (tmp_path / "steps.jsonl").write_text(json.dumps({"name": "kernels", "status": "ok", "rc": 0, "seconds": 31.0,
                                                      "timeout_s": 90, "command": cmd, "note": ""}) + "\n")
    (tmp_path / "results" / "raw-kernels.json").write_text(json.dumps({
        "kernels": {"moe_router": {"ms": 0.05}, "lm_head": {"ms": 0.9}},
        "sections": {"attention": {"status": "ok"}, "dense_gemms": {"status": "failed"}},
        "targets": {
            "moe_experts_nvfp4_within_1.25x_of_weight_bytes": {"ms": 0.15, "ratio": 1.1, "meets": True},
            "attention_hd512_faster_than_sdpa": {"ms": 0.2, "sdpa_ms": 0.3, "sdpa_backend": "EFFICIENT_ATTENTION",
                                                 "meets": True}},
        "per_op_ms": {"moe_router": 1.5}}))
    lib = [sys.executable, str(ROOT / "bench" / "gpu_check_lib.py")]
    assert subprocess.run([*lib, "results", str(tmp_path)], capture_output=True, timeout=60).returncode == 0
    r = json.loads((tmp_path / "results" / "h100-kernels.json").read_text())
    assert r["git_commit"] == "a" * 40 and r["command"] == cmd and r["per_op_ms"] == {"moe_router": 1.5}
    assert not (tmp_path / "results" / "raw-kernels.json").exists()
    proc = subprocess.run([*lib, "summary", str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    md = (tmp_path / "summary.md").read_text()
    assert "h100-kernels.json: attention hd512 0.200 ms vs SDPA (EFFICIENT_ATTENTION) 0.300 ms" in md, md
    assert "moe_experts_nvfp4 0.150 ms = 1.10x its weight bytes at HBM bandwidth (target 1.25x: meets)" in md, md
    assert "moe_router 0.050 ms" in md and "FAILED sections: dense_gemms" in md, md
