"""Reading the machine code of a kernel without a GPU: compile one .cu file to an sm_90a cubin with nvcc
and take it apart with cuobjdump (resource usage, SASS). Used by the machine-code tests (test_sass_*.py);
every helper returns None when a tool is missing so the tests can skip cleanly."""

from __future__ import annotations

import collections
import dataclasses
import importlib.util
import os
import re
import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# The flags CMake gives every CUDA source (CMakeLists.txt), for one architecture.
NVCC_FLAGS = ["-std=c++17", "--expt-relaxed-constexpr", "-lineinfo", "-O3", f"-I{ROOT / 'csrc'}"]


def find_tool(name: str) -> str | None:
    """`name` on PATH, in $CUDA_HOME/bin, /usr/local/cuda/bin, or in the nvidia-cuda-* wheels
    (nvidia/cu*/bin or nvidia/cuda_*/bin, where `pip install nvidia-cuda-cuobjdump` puts it)."""
    found = shutil.which(name)
    if found:
        return found
    dirs = [Path(os.environ[v]) / "bin" for v in ("CUDA_HOME", "CUDA_PATH") if os.environ.get(v)]
    dirs.append(Path("/usr/local/cuda/bin"))
    spec = importlib.util.find_spec("nvidia")
    if spec and spec.submodule_search_locations:
        for loc in spec.submodule_search_locations:
            dirs += sorted(Path(loc).glob("*/bin"))
    for d in dirs:
        if (d / name).is_file() and os.access(d / name, os.X_OK):
            return str(d / name)
    return None


def compile_cubin(source: Path, out_dir: Path, arch: str = "sm_90a", defines: tuple[str, ...] = ()) -> Path:
    nvcc = find_tool("nvcc")
    assert nvcc, "nvcc not found"
    cubin = out_dir / (source.stem + f".{arch}.cubin")
    cmd = [nvcc, f"-arch={arch}", "-cubin", *NVCC_FLAGS, *(f"-D{d}" for d in defines), "-o", str(cubin), str(source)]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    return cubin


@dataclasses.dataclass
class Resources:
    registers: int
    stack: int
    local: int
    shared: int


def resource_usage(cubin: Path) -> dict[str, Resources]:
    """Per kernel (mangled name): registers, stack frame, local memory and static shared memory."""
    out = subprocess.run([find_tool("cuobjdump"), "--dump-resource-usage", str(cubin)], check=True,
                         capture_output=True, text=True).stdout
    res, name = {}, None
    for line in out.splitlines():
        m = re.search(r"Function (\S+):", line)
        if m:
            name = m.group(1)
            continue
        m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", line)
        if m and name:
            res[name] = Resources(int(m.group(1)), int(m.group(2)), int(m.group(4)), int(m.group(3)))
    return res


@dataclasses.dataclass
class Instr:
    addr: int
    pred: str
    op: str       # opcode with its modifiers, e.g. HMMA.16816.F32.BF16
    args: str

    @property
    def base(self) -> str:
        return self.op.split(".")[0]


_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_.]*)\s*([^;]*);")


def sass(cubin: Path, arch: str | None = None) -> dict[str, list[Instr]]:
    """Per kernel (mangled name): its instructions in address order. arch (e.g. "sm_90a"): only that
    architecture's code, for a binary that holds several (the built module)."""
    cmd = [find_tool("cuobjdump"), "-sass", *(["-arch", arch] if arch else []), str(cubin)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    funcs, cur = {}, None
    for line in out.splitlines():
        m = re.search(r"Function : (\S+)", line)
        if m:
            cur = funcs.setdefault(m.group(1), [])
            continue
        m = _LINE.search(line)
        if m and cur is not None:
            cur.append(Instr(int(m.group(1), 16), (m.group(2) or "").strip(), m.group(3), m.group(4).strip()))
    return funcs


@dataclasses.dataclass
class Loop:
    start: int
    end: int                # address of the backward branch
    body: list[Instr]

    def count(self, *bases: str) -> int:
        return sum(1 for i in self.body if i.base in bases)

    def mix(self) -> collections.Counter:
        return collections.Counter(i.base for i in self.body)


def loops(code: list[Instr]) -> list[Loop]:
    """Every backward branch's range [target, branch], innermost first (by length)."""
    found = []
    for ins in code:
        if ins.base == "BRA":
            m = re.search(r"0x([0-9a-f]+)", ins.args)
            if m and int(m.group(1), 16) < ins.addr:
                tgt = int(m.group(1), 16)
                found.append(Loop(tgt, ins.addr, [i for i in code if tgt <= i.addr <= ins.addr]))
    return sorted(found, key=lambda lp: len(lp.body))


def innermost_loops_with(code: list[Instr], opcode: str) -> list[Loop]:
    """The loops holding `opcode` that hold no smaller loop holding it (the main loops)."""
    with_op = [lp for lp in loops(code) if lp.count(opcode)]
    return [lp for lp in with_op
            if not any(o is not lp and lp.start <= o.start and o.end <= lp.end for o in with_op)]
