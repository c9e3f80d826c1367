"""The backend-level GPU tests run in CI on a stand-in (tests/stand_in_cuda.py: device "cuda" is the CPU's
graph-recording backend), so a bug in those tests, their references or the engine code they drive shows
here rather than in the few minutes a GPU is lent. The first run found a test that built a ragged batch
where it meant one prompt."""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys

import dgemma_rt

TESTS = pathlib.Path(__file__).resolve().parent


def test_backend_level_gpu_tests_pass_on_the_stand_in(tmp_path):
    root = os.path.dirname(os.path.dirname(dgemma_rt.__file__))  # the package this test imported
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(TESTS), root, os.environ.get("PYTHONPATH"))
                                                      if p))
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "stand_in_cuda", "-p", "no:cacheprovider",
                           "-k", "cuda", str(TESTS / "test_cuda_backend.py"),
                           str(TESTS / "test_backend_ops.py")],
                          capture_output=True, text=True, timeout=1200, cwd=tmp_path, env=env)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    passed = int(re.search(r"(\d+) passed", out).group(1))
    assert passed >= 100, out[-2000:]  # the "cuda" cases really ran, not skipped
