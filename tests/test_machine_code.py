"""What the compiler made of the CUDA kernels, read from the built module without a GPU.

cuobjdump (the nvidia-cuda-cuobjdump / nvidia-cuda-nvdisasm wheels, a test extra) lists the sm_90a
machine code embedded in dgemma_rt._core. The hot kernels must not touch local memory (no spills, no
stack arrays: LDL/STL), must keep registers within their occupancy plan, and must use the tensor
cores their designs name: HGMMA/QGMMA (wgmma) in the CUTLASS GEMMs, HMMA (mma.sync) in attention. A
regression fails CI. Skipped when the module was built without CUDA or the tool is missing.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from dgemma_rt import _core

ARCH = "sm_90a"


def _cuobjdump() -> str | None:
    found = shutil.which("cuobjdump")
    if found:
        return found
    for base in sys.path:  # the nvidia-cuda-cuobjdump wheel: site-packages/nvidia/cu*/bin/cuobjdump
        for cand in sorted(Path(base, "nvidia").glob("cu*/bin/cuobjdump")) if os.path.isdir(base) else []:
            return str(cand)
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    cand = Path(home or "/usr/local/cuda", "bin", "cuobjdump")
    return str(cand) if cand.exists() else None


TOOL = _cuobjdump()
pytestmark = [
    pytest.mark.skipif(not _core.cuda_compiled(), reason="built without CUDA"),
    pytest.mark.skipif(TOOL is None, reason="cuobjdump not found (pip install nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm)"),
]


def _demangle(names: list[str]) -> dict[str, str]:
    filt = shutil.which("c++filt")
    if not filt:
        return {n: n for n in names}
    out = subprocess.run([filt], input="\n".join(names), capture_output=True, text=True, check=True).stdout.split("\n")
    return dict(zip(names, out))


@pytest.fixture(scope="module")
def kernels() -> dict[str, dict]:
    """Per sm_90a kernel (demangled name): registers, stack bytes and the opcodes of its SASS."""
    so = _core.__file__
    res = subprocess.run([TOOL, "-res-usage", "-arch", ARCH, so], capture_output=True, text=True, check=True).stdout
    usage: dict[str, dict] = {}
    for m in re.finditer(r"Function (\S+):\s*\n\s*REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", res):
        usage[m.group(1)] = {"reg": int(m.group(2)), "stack": int(m.group(3)), "shared": int(m.group(4)),
                             "local": int(m.group(5)), "ops": []}
    sass = subprocess.run([TOOL, "-sass", "-arch", ARCH, so], capture_output=True, text=True, check=True).stdout
    current = None
    for line in sass.splitlines():
        m = re.match(r"\s*Function : (\S+)", line)
        if m:
            current = usage.setdefault(m.group(1), {"reg": 0, "stack": 0, "shared": 0, "local": 0, "ops": []})
            continue
        m = re.match(r"\s*/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)", line)
        if m and current is not None:
            current["ops"].append(m.group(1))
    names = _demangle(list(usage))
    assert usage, "no sm_90a kernels found in " + so
    return {names[k]: v for k, v in usage.items()}


def _matching(kernels: dict[str, dict], pattern: str) -> dict[str, dict]:
    hits = {k: v for k, v in kernels.items() if re.search(pattern, k)}
    assert hits, f"no sm_90a kernel matches {pattern!r}"
    return hits


# (name pattern, register budget per thread from the kernel's occupancy plan, tensor-core opcode it must use)
HOT_KERNELS = [
    # Attention: 256 threads, one CTA per SM, so 255 registers is the hard cap; 128 output dims per warp in
    # registers, plus the per-CTA tile plan (attention_plan.h).
    (r"sm80_attention_kernel<.*AttnConfig<256,", 240, "HMMA"),
    (r"sm80_attention_kernel<.*AttnConfig<512,", 248, "HMMA"),
    (r"attention_combine_kernel<", 64, None),
    # 256 threads, 2 CTAs per SM (90 KB of shared tokens each at H = 2816): <= 128.
    (r"router_kernel<", 128, None),
    # The W4A16 expert GEMM (mma.sync m16n8k16).
    (r"grouped_gemm_nvfp4_kernel<", 128, "HMMA"),
    # The denoising sampler: 512 threads per position, <= 64 for one CTA per SM per 32K registers.
    (r"sample_canvas_kernel", 64, None),
    (r"combine_kernel<", 64, None),
    (r"gather_kernel<", 64, None),
]


@pytest.mark.parametrize("pattern,max_regs,mma", HOT_KERNELS, ids=[p for p, _, _ in HOT_KERNELS])
def test_hot_kernel_machine_code(kernels, pattern, max_regs, mma):
    for name, k in _matching(kernels, pattern).items():
        local = [op for op in k["ops"] if op in ("LDL", "STL")]
        assert not local and k["local"] == 0 and k["stack"] == 0, (
            f"{name}: local memory (spills or stack arrays): {len(local)} LDL/STL, stack {k['stack']} B")
        assert k["reg"] <= max_regs, f"{name}: {k['reg']} registers, budget {max_regs}"
        if mma:
            assert mma in k["ops"], f"{name}: no {mma} in its sm_90a code"


def test_cutlass_gemms_use_wgmma(kernels):
    # The Hopper GEMMs (their mainloops are MainloopSm90*; the Blackwell ones compile to empty stubs for sm_90a).
    # c++filt leaves CUTLASS's longest names mangled, so match either form.
    gemms = {k: v for k, v in _matching(kernels, r"cutlass_launch::kernel<|cutlass_launch6kernelI").items()
             if "MainloopSm90" in k}
    for name, k in gemms.items():
        # HGMMA: bf16 wgmma; QGMMA: its FP8 form.
        assert any(op in ("HGMMA", "QGMMA") for op in k["ops"]), f"{name[:160]}...: no wgmma in its sm_90a code"
        assert "LDL" not in k["ops"] and "STL" not in k["ops"], f"{name[:160]}...: local memory"
    # The dense BF16 and FP8 GEMMs and the grouped BF16 GEMM.
    assert len(gemms) == 3, sorted(gemms)


def test_router_main_loop_feeds_ffma_from_few_shared_loads(kernels):
    """The redesigned router: 4 expert rows x 8 tokens per lane, so FFMA far outnumber shared loads."""
    for name, k in _matching(kernels, r"router_kernel<.*, true>").items():
        ffma, lds = k["ops"].count("FFMA"), k["ops"].count("LDS")
        assert ffma >= 128, f"{name}: {ffma} FFMA: the 4x8 register tile is gone"
        assert ffma >= 2 * lds, f"{name}: {ffma} FFMA vs {lds} LDS"
