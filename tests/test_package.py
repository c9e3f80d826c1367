"""The installed package itself: what the wheel must carry, and what CUDA looks like from it."""

from __future__ import annotations

import os

import pytest

import dgemma_rt
from dgemma_rt.tiny import make_tiny


def test_embedding_files_are_installed():
    assert os.path.isfile(os.path.join(dgemma_rt.get_include(), "dgemma_rt", "engine.h"))
    assert os.path.isfile(os.path.join(dgemma_rt.get_library_dir(), "libdgemma_core.a"))
    example = os.path.join(os.path.dirname(dgemma_rt.__file__), "bin", "dgemma-embed-example")
    assert os.access(example, os.X_OK)


def test_cuda_status_is_one_readable_line():
    status = dgemma_rt.cuda_status()
    assert isinstance(status, str) and status and "\n" not in status
    if not dgemma_rt.cuda_compiled():
        assert "without CUDA" in status
    elif dgemma_rt.cuda_device_count() == 0:
        assert "driver" in status or "no usable CUDA device" in status
    else:
        assert "CUDA device(s)" in status


@pytest.mark.skipif(dgemma_rt.cuda_device_count() > 0, reason="a GPU is present")
def test_cuda_device_without_a_gpu_is_refused_with_the_reason(tmp_path):
    ckpt = make_tiny(tmp_path / "tiny")
    with pytest.raises(ValueError, match="not available") as e:
        dgemma_rt.Engine(ckpt, device="cuda")
    if dgemma_rt.cuda_compiled():
        assert dgemma_rt.cuda_status() in str(e.value)  # names what is missing: the driver or a device
    else:
        assert "no cuda backend" in str(e.value)


@pytest.mark.parametrize("device", ["tpu", "cpu:0", "cuda:x", "cuda:", "cuda:-1", 3])
def test_malformed_device_names_are_refused(tmp_path, device):
    ckpt = make_tiny(tmp_path / "tiny")
    with pytest.raises(ValueError, match="device") as e:
        dgemma_rt.Engine(ckpt, device=device)
    if str(device).startswith("cuda:"):
        assert "non-negative integer" in str(e.value)


def test_cuda_host_code_compiles_without_cutlass(tmp_path):
    """A CUDA build with DGEMMA_REQUIRE_CUTLASS=OFF and no CUTLASS headers leaves the GEMM kernels out, and
    the backend's host code must compile without DGEMMA_WITH_CUTLASS. CI's builds always have CUTLASS, so
    nothing else compiles it that way (a member of a CUTLASS-only type once broke that build)."""
    import glob
    import shutil
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sources = sorted(glob.glob(os.path.join(root, "csrc", "backend", "cuda", "*.cpp")))
    if not sources:
        pytest.skip("no source tree")
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("needs nvcc (its CUDA headers)")
    for src in sources:
        p = subprocess.run([nvcc, "-std=c++17", "-I", os.path.join(root, "csrc"), "-DDGEMMA_WITH_CUDA=1", "-c", src,
                            "-o", str(tmp_path / "host.o")], capture_output=True, text=True, timeout=600)
        assert p.returncode == 0, f"{os.path.relpath(src, root)}:\n{p.stderr[-4000:]}"
