#!/usr/bin/env python3
"""Check that a built dgemma_rt wheel holds what it should, without a GPU.

    python tools/check_wheel.py dist/dgemma_rt-*.whl [--cpu-only]

- the package: the Python modules, the native module, the C++ header, static library and embedding
  example, the console scripts;
- the native module needs no CUDA driver or runtime library to load (cudart is static; libcuda is
  opened only when a GPU is used) and no grafted library is libcuda/libcudart;
- the host code was built portable: no AVX/AVX-512 register in the engine core (libdgemma_core.a),
  which -march=native on an AVX machine would put there;
- unless --cpu-only: an ELF cubin for every CUDA source and every architecture (sm_90a, sm_100a,
  sm_120a; `cuobjdump -lelf`), and in each CUTLASS GEMM's cubin for its own architecture the CUTLASS
  kernel with that architecture's tensor-core instructions (`nvdisasm`): wgmma (HGMMA/QGMMA) on
  sm_90a, tcgen05 (UTC*MMA) on sm_100a, block-scaled mma (OMMA/QMMA) on sm_120a. A --cpu-only wheel
  must have no CUDA code at all.

cuobjdump and nvdisasm come from PATH, $CUDA_HOME/bin, or the nvidia-cuda-cuobjdump and
nvidia-cuda-nvdisasm wheels (pip install nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm). Prints a
report; exits 1 if anything is missing.
"""

from __future__ import annotations

import argparse
import glob
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections import defaultdict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARCHS = ("sm_90a", "sm_100a", "sm_120a")
# The tensor-core instructions of each architecture's CUTLASS mainloop, as nvdisasm spells them.
MMA = {
    "sm_90a": re.compile(r"\b[HQI]GMMA\b"),  # wgmma: bf16 (HGMMA), fp8 (QGMMA)
    "sm_100a": re.compile(r"\bUTC\w*MMA\b"),  # tcgen05.mma (UTCHMMA, UTCQMMA, UTCOMMA for fp4)
    "sm_120a": re.compile(r"\b[OQH]MMA\b"),  # mma.sync: bf16 (HMMA), block-scaled fp4/fp8 (OMMA.SF, QMMA.SF)
}
# The CUTLASS entry point every GEMM here instantiates (csrc/kernels/gemm/cutlass_launch.cuh).
CUTLASS_KERNEL = re.compile(r"_ZN6dgemma7kernels14cutlass_launch6kernelI\w*GemmUniversal\w*")
# Used when the source tree is not beside this script (a wheel checked on its own).
KNOWN_GEMMS = ("sm90_gemm_bf16", "sm90_gemm_fp8", "sm90_grouped_gemm_bf16", "sm100_grouped_gemm_nvfp4",
               "sm120_grouped_gemm_nvfp4")


class Report:
    def __init__(self) -> None:
        self.failures: list[str] = []

    def ok(self, msg: str) -> None:
        print(f"  ok    {msg}")

    def fail(self, msg: str) -> None:
        print(f"  FAIL  {msg}")
        self.failures.append(msg)

    def check(self, cond: bool, msg: str) -> bool:
        (self.ok if cond else self.fail)(msg)
        return cond


def tool(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    dirs = [os.path.join(os.environ[v], "bin") for v in ("CUDA_HOME", "CUDA_PATH") if os.environ.get(v)]
    try:  # the nvidia-cuda-cuobjdump / -nvdisasm wheels: nvidia/cu13/bin (or nvidia/cuda_*/bin)
        import nvidia  # namespace package

        for base in nvidia.__path__:
            dirs += glob.glob(os.path.join(base, "*", "bin"))
    except ImportError:
        pass
    dirs.append("/usr/local/cuda/bin")
    for d in dirs:
        if os.access(os.path.join(d, name), os.X_OK):
            return os.path.join(d, name)
    return None


def run(cmd: list[str], cwd: str | None = None) -> str:
    p = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({p.returncode}): {p.stderr.strip()[-2000:]}")
    return p.stdout


def needed(path: str) -> list[str]:
    out = run(["readelf", "-d", "-W", path])
    return re.findall(r"\(NEEDED\)\s+Shared library: \[([^\]]+)\]", out)


def cuda_sources() -> list[str] | None:
    """The stems of the CUDA sources CMake compiles (CMakeLists.txt's globs), or None without the tree."""
    if not os.path.isdir(os.path.join(ROOT, "csrc", "kernels")):
        return None
    files = glob.glob(os.path.join(ROOT, "csrc", "backend", "cuda", "*.cu"))
    files += glob.glob(os.path.join(ROOT, "csrc", "kernels", "*", "*.cu"))
    return sorted(os.path.basename(f)[:-3] for f in files)


def gemm_sources() -> list[str]:
    files = glob.glob(os.path.join(ROOT, "csrc", "kernels", "gemm", "*.cu"))
    return sorted(os.path.basename(f)[:-3] for f in files) or list(KNOWN_GEMMS)


def functions(sass: str) -> dict[str, list[str]]:
    """nvdisasm output split into {mangled function name: its instruction lines}."""
    funcs: dict[str, list[str]] = {}
    cur: list[str] | None = None
    for line in sass.splitlines():
        m = re.match(r"^\s*\.text\.(\S+):\s*$", line)
        if m:
            cur = funcs.setdefault(m.group(1), [])
        elif cur is not None and re.search(r"/\*[0-9a-f]{4,}\*/", line):
            cur.append(line)
        elif line.startswith("\t.section") or line.startswith(".section"):
            cur = None
    return funcs


def short(mangled: str) -> str:
    """A readable tag for a CUTLASS kernel: its mainloop and MMA atom, not its 3 kB mangled name
    (where a source name is spelled <length><name>)."""

    def named(pattern: str, start: int = 0) -> str | None:
        for m in re.finditer(r"(\d+)(" + pattern + r")", mangled[start:]):
            digits = m.group(1)
            for k in range(len(digits), 0, -1):  # the length is the digits' tail ("SM904GMMA": SM90, 4GMMA)
                n = int(digits[-k:])
                if n <= 200 and mangled[start + m.start(2):][:n].isidentifier():
                    name = mangled[start + m.start(2):start + m.start(2) + n]
                    if re.fullmatch(pattern + r"\w*", name):
                        return name
        return None

    mainloop = named(r"Mainloop\w+")
    at = mangled.find("MMA_Atom")
    atom = named(r"(?:SM\d+_)?MMA_\w+|SM\d+_\d+x\w+", at) if at >= 0 else None
    return " / ".join(p for p in (mainloop, atom) if p) or mangled[:80]


# The copies GCC's target_clones makes (DG_CPU_CLONES in csrc/backend/cpu/ops.h): called through an
# ifunc resolver only on CPUs that have their instructions, so they may use them; and the AVX512-BF16
# functions of ops.cpp (named *_avx512bf16), called only where __builtin_cpu_supports says so.
_CLONE = re.compile(r"\.arch_x86_64_v[34]\b|_avx512bf16")


def wide_register_uses(asm: str) -> tuple[int, int]:
    """(AVX/AVX-512 register uses outside target_clones copies, uses inside them) in objdump -d output."""
    outside = inside = 0
    in_clone = False
    for line in asm.splitlines():
        m = re.match(r"^[0-9a-f]+ <(.+)>:$", line)
        if m:
            in_clone = bool(_CLONE.search(m.group(1)))
            continue
        n = len(re.findall(r"%[yz]mm\d", line))
        if in_clone:
            inside += n
        else:
            outside += n
    return outside, inside


def check_package(rep: Report, names: list[str]) -> str | None:
    print("package contents:")
    core = [n for n in names if re.fullmatch(r"dgemma_rt/_core\.[^/]*\.so", n)]
    rep.check(len(core) == 1, f"native module: {core[0] if core else 'missing'}")
    for path in ("dgemma_rt/__init__.py", "dgemma_rt/engine.py", "dgemma_rt/cli.py", "dgemma_rt/bench.py",
                 "dgemma_rt/server.py", "dgemma_rt/include/dgemma_rt/engine.h", "dgemma_rt/lib/libdgemma_core.a",
                 "dgemma_rt/bin/dgemma-embed-example"):
        rep.check(path in names, path)
    return core[0] if core else None


def check_host(rep: Report, z: zipfile.ZipFile, tmp: str, core: str) -> str:
    print("host code:")
    so = z.extract(core, tmp)
    libs = [n for n in z.namelist() if n.startswith("dgemma_rt.libs/") and ".so" in n]
    for lib in libs:
        z.extract(lib, tmp)
    deps = needed(so)
    rep.check(not any(re.match(r"lib(cuda|cudart|nvrtc)\b", d) for d in deps),
              f"_core needs no CUDA library to load (NEEDED: {', '.join(deps)})")
    for lib in libs:
        rep.check(not re.match(r"dgemma_rt\.libs/lib(cuda|cudart)\b", lib), f"grafted: {os.path.basename(lib)}")
    a = z.extract("dgemma_rt/lib/libdgemma_core.a", tmp) if "dgemma_rt/lib/libdgemma_core.a" in z.namelist() else None
    if a and shutil.which("objdump"):
        asm = run(["objdump", "-d", "--no-show-raw-insn", a])
        wide, clones = wide_register_uses(asm)
        rep.check(wide == 0, f"portable host code: {wide} AVX/AVX-512 register uses in libdgemma_core.a outside "
                             "the runtime-dispatched copies (none unless built with DGEMMA_NATIVE_ARCH=ON or -march "
                             f"flags); {clones} in x86-64-v3/v4 copies picked by CPU at load time")
    return so


def check_cuda(rep: Report, so: str, tmp: str, archs: tuple[str, ...]) -> None:
    cuobjdump, nvdisasm = tool("cuobjdump"), tool("nvdisasm")
    if not (cuobjdump and nvdisasm):
        rep.fail("cuobjdump/nvdisasm not found (pip install nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm)")
        return
    print(f"CUDA code ({cuobjdump}):")
    listing = subprocess.run([cuobjdump, "-lelf", so], capture_output=True, text=True).stdout
    cubins = re.findall(r"ELF file\s+\d+:\s+(\S+)\.(sm_\w+)\.cubin", listing)
    by_arch: dict[str, set[str]] = defaultdict(set)
    for stem, arch in cubins:
        by_arch[arch].add(stem)
    ptx = re.findall(r"PTX file", subprocess.run([cuobjdump, "-lptx", so], capture_output=True, text=True).stdout)
    print(f"        {len(cubins)} cubins: " + ", ".join(f"{a} {len(by_arch[a])}" for a in sorted(by_arch))
          + f"; {len(ptx)} PTX")
    expected = cuda_sources()
    for arch in archs:
        have = by_arch.get(arch, set())
        if expected is None:
            rep.check(bool(have), f"{arch}: {len(have)} cubins")
        else:
            missing = sorted(set(expected) - have)
            rep.check(not missing, f"{arch}: a cubin for each of the {len(expected)} CUDA sources"
                                   + (f" (missing: {', '.join(missing)})" if missing else ""))
    extra = sorted(set(by_arch) - set(archs))
    rep.check(not extra, f"no other architectures{' (found: ' + ', '.join(extra) + ')' if extra else ''}")

    print("CUTLASS GEMM kernels (nvdisasm):")
    if not cubins:
        rep.fail("no CUDA code in the module: built without nvcc or with DGEMMA_CUDA=OFF? (--cpu-only for that)")
        return
    xdir = os.path.join(tmp, "cubins")
    os.makedirs(xdir)
    run([cuobjdump, "-xelf", "all", so], cwd=xdir)
    for stem in gemm_sources():
        m = re.match(r"sm(\d+)_", stem)
        arch = f"sm_{m.group(1)}a" if m else None
        if arch not in archs:
            rep.fail(f"{stem}: no architecture in its name (smNN_...)")
            continue
        cubin = os.path.join(xdir, f"{stem}.{arch}.cubin")
        if not os.path.exists(cubin):
            rep.fail(f"{stem}: no {arch} cubin (CUTLASS headers missing at build time?)")
            continue
        funcs = functions(run([nvdisasm, "-c", cubin]))
        kernels = {name: body for name, body in funcs.items() if CUTLASS_KERNEL.match(name)}
        if not kernels:
            rep.fail(f"{stem}.{arch}: no CUTLASS kernel (functions: {len(funcs)})")
            continue
        for name, body in kernels.items():
            n_mma = sum(1 for line in body if MMA[arch].search(line))
            ops = sorted({m.group(0) for line in body for m in [MMA[arch].search(line)] if m})
            rep.check(n_mma > 0, f"{stem}.{arch}: {short(name)}: {len(body)} instructions, "
                                 f"{n_mma} tensor-core MMA ({' '.join(ops) or 'none'})")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("wheel")
    ap.add_argument("--cpu-only", action="store_true", help="the wheel of a DGEMMA_CUDA=OFF build: no CUDA code")
    ap.add_argument("--archs", default=",".join(ARCHS))
    args = ap.parse_args()
    archs = tuple(a for a in args.archs.split(",") if a)
    rep = Report()
    name = os.path.basename(args.wheel)
    tag = name[:-4].split("-")[-1] if name.endswith(".whl") else "?"
    print(f"{name}: {os.path.getsize(args.wheel) / 2**20:.1f} MiB, platform tag {tag}")
    with zipfile.ZipFile(args.wheel) as z, tempfile.TemporaryDirectory() as tmp:
        names = z.namelist()
        core = check_package(rep, names)
        if core:
            so = check_host(rep, z, tmp, core)
            info = z.getinfo(core)
            print(f"        {core}: {info.file_size / 2**20:.1f} MiB ({info.compress_size / 2**20:.1f} MiB compressed)")
            if args.cpu_only:
                cuobjdump = tool("cuobjdump")
                if cuobjdump:
                    listing = subprocess.run([cuobjdump, "-lelf", so], capture_output=True, text=True).stdout
                    rep.check("cubin" not in listing, "CPU-only: no CUDA code in the module")
            else:
                check_cuda(rep, so, tmp, archs)
    if rep.failures:
        print(f"check_wheel: {len(rep.failures)} problem(s)")
        return 1
    print("check_wheel: all good")
    return 0


if __name__ == "__main__":
    sys.exit(main())
