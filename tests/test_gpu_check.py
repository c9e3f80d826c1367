"""bench/gpu_check.sh --dry-run: the wheels the GPU check carries install offline and resolve for the GPU
machine's Python 3.12 against what it already has, and every step's command exists (see docs/gpu-bringup.md).

Downloads the wheel set first (tools/gpu_wheels.sh, ~20 MB from PyPI, once: build/gpu-wheels is kept);
skipped only when PyPI cannot be reached and the wheels are not there yet.
"""

from __future__ import annotations

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
    steps = ["provenance", "wheels", "build", "tests", "memcheck", "bench-bf16", "bench-peer", "bench-nvfp4", "results"]
    plan = out.split("== the plan", 1)[1].splitlines()[1:]
    assert [line.split()[0] for line in plan[: len(steps)]] == steps, out
    assert "90a-real" in out and "CMAKE_BUILD_PARALLEL_LEVEL=16" in out and "DGEMMA_CUTLASS_INCLUDE=" in out


def test_gpu_check_dry_run_names_a_missing_wheel(tmp_path):
    """An incomplete wheel folder fails the dry run and names what is missing (no download needed)."""
    (tmp_path / "SOURCE_COMMIT").write_text("0" * 40 + "\n")
    env = dict(_env(), GPU_WHEELS=str(tmp_path))
    proc = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), "--dry-run"], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode != 0
    assert "FAIL: transformers==5.23.0 missing" in proc.stdout and "tools/gpu_wheels.sh" in proc.stdout
