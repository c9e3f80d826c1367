"""The PEP 517 build backend: scikit-build-core, plus the CUTLASS headers for a CUDA build.

The CUTLASS GEMMs (csrc/kernels/gemm) need CUTLASS's headers. They come from the nvidia-cutlass
wheel, whose Python dependencies (cuda-python, scipy, networkx, ...: some 350 MB) a build does not
need, and a build requirement cannot be installed without its dependencies. So when the build will
compile CUDA code (DGEMMA_CUDA is not OFF and nvcc is found) and no CUTLASS include directory was
given, this backend downloads that one wheel with `pip download --no-deps` (the same index, proxy
and certificate settings as the pip that runs the build: pip reads its config files and PIP_*
variables), unpacks only its include folder into build/cutlass-<version>/ of the source tree (kept
for later builds) and passes it to CMake as DGEMMA_CUTLASS_INCLUDE. CMake then fails, rather than
leaving the GEMMs out, if the headers are still missing (DGEMMA_REQUIRE_CUTLASS, on by default).

Skipped when -Ccmake.define.DGEMMA_CUTLASS_INCLUDE=<dir> is given, when cutlass_library is
importable in the build environment (pip install nvidia-cutlass --no-deps, with
--no-build-isolation), or for -Ccmake.define.DGEMMA_CUDA=OFF.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import zipfile

from scikit_build_core import build as _skbuild
from scikit_build_core.build import (  # noqa: F401  (the hooks this backend does not change)
    build_sdist,
    get_requires_for_build_sdist,
    prepare_metadata_for_build_editable,
    prepare_metadata_for_build_wheel,
)

CUTLASS_VERSION = "4.2.0.0"  # csrc/kernels/gemm is written against CUTLASS 4.2 (CuTe, sm100/sm120 block scaling)
_INCLUDE_IN_WHEEL = "cutlass_library/source/include/"
_OFF = {"0", "off", "false", "no", "n", "ignore", "notfound"}


def _defines(config_settings) -> dict[str, str]:
    """The CMake definitions a build will see: CMAKE_ARGS, SKBUILD_CMAKE_DEFINE, then -Ccmake.define.X."""
    out: dict[str, str] = {}
    for arg in os.environ.get("CMAKE_ARGS", "").split():
        if arg.startswith("-D") and "=" in arg:
            key, value = arg[2:].split("=", 1)
            out[key.split(":", 1)[0]] = value
    for item in os.environ.get("SKBUILD_CMAKE_DEFINE", "").split(";"):
        if "=" in item:
            key, value = item.split("=", 1)
            out[key.split(":", 1)[0].strip()] = value.strip()
    for key, value in (config_settings or {}).items():
        if key.startswith("cmake.define.") and isinstance(value, str):
            out[key[len("cmake.define."):]] = value
    return out


def _find_nvcc(defines: dict[str, str]) -> str | None:
    """Where CMake's check_language(CUDA) would find nvcc (CUDACXX, PATH, the usual toolkit homes)."""
    for cand in (defines.get("CMAKE_CUDA_COMPILER"), os.environ.get("CUDACXX")):
        if cand:
            return cand if os.path.exists(cand) else shutil.which(cand)
    found = shutil.which("nvcc")
    if found:
        return found
    homes = [os.environ.get(v) for v in ("CUDAToolkit_ROOT", "CUDA_PATH", "CUDA_HOME")] + ["/usr/local/cuda"]
    for home in homes:
        if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
            return os.path.join(home, "bin", "nvcc")
    return None


def _cutlass_wanted(config_settings) -> bool:
    d = _defines(config_settings)
    if d.get("DGEMMA_CUDA", "ON").lower() in _OFF or d.get("DGEMMA_REQUIRE_CUTLASS", "ON").lower() in _OFF:
        return False
    if d.get("DGEMMA_CUTLASS_INCLUDE"):
        return False
    if importlib.util.find_spec("cutlass_library") is not None:
        return False  # CMake finds it in this environment
    return _find_nvcc(d) is not None


def _say(msg: str) -> None:
    print(f"dgemma_rt build: {msg}", file=sys.stderr, flush=True)


def _fetch_cutlass() -> str:
    """build/cutlass-<version>/.../include, downloaded and unpacked once; returns its absolute path."""
    root = os.path.abspath(os.path.join("build", f"cutlass-{CUTLASS_VERSION}"))
    include = os.path.join(root, _INCLUDE_IN_WHEEL)
    if os.path.isfile(os.path.join(include, "cutlass", "cutlass.h")):
        _say(f"CUTLASS {CUTLASS_VERSION} headers from {include}")
        return include
    wheels = os.path.abspath(os.path.join("build", "wheels"))
    _say(f"downloading the nvidia-cutlass=={CUTLASS_VERSION} wheel for its headers (no dependencies)")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
           "-q", "-d", wheels, f"nvidia-cutlass=={CUTLASS_VERSION}"]
    if subprocess.run(cmd).returncode != 0:
        raise RuntimeError(
            f"could not download nvidia-cutlass=={CUTLASS_VERSION} for the CUTLASS headers that the CUDA GEMMs need. "
            "Pass -Ccmake.define.DGEMMA_CUTLASS_INCLUDE=<dir holding cutlass/cutlass.h>, or build CPU-only with "
            "-Ccmake.define.DGEMMA_CUDA=OFF")
    whl = next(os.path.join(wheels, f) for f in sorted(os.listdir(wheels))
               if f.startswith(f"nvidia_cutlass-{CUTLASS_VERSION}-") and f.endswith(".whl"))
    tmp = root + ".partial"
    shutil.rmtree(tmp, ignore_errors=True)
    with zipfile.ZipFile(whl) as z:
        z.extractall(tmp, [n for n in z.namelist() if n.startswith(_INCLUDE_IN_WHEEL)])
    shutil.rmtree(root, ignore_errors=True)
    os.replace(tmp, root)  # complete or absent: an interrupted unpack is not mistaken for headers
    _say(f"CUTLASS {CUTLASS_VERSION} headers unpacked into {include}")
    return include


def _with_cutlass(config_settings):
    if not _cutlass_wanted(config_settings):
        return config_settings
    settings = dict(config_settings or {})
    settings["cmake.define.DGEMMA_CUTLASS_INCLUDE"] = _fetch_cutlass()
    return settings


def get_requires_for_build_wheel(config_settings=None):
    # pip itself, to download the one wheel: an isolated build environment has none of its own.
    extra = ["pip"] if _cutlass_wanted(config_settings) else []
    return _skbuild.get_requires_for_build_wheel(config_settings) + extra


def get_requires_for_build_editable(config_settings=None):
    extra = ["pip"] if _cutlass_wanted(config_settings) else []
    return _skbuild.get_requires_for_build_editable(config_settings) + extra


def build_wheel(wheel_directory, config_settings=None, metadata_directory=None):
    return _skbuild.build_wheel(wheel_directory, _with_cutlass(config_settings), metadata_directory)


def build_editable(wheel_directory, config_settings=None, metadata_directory=None):
    return _skbuild.build_editable(wheel_directory, _with_cutlass(config_settings), metadata_directory)
