"""Machine-code budgets of the W4A16 NVFP4 grouped GEMM (csrc/kernels/nvfp4/grouped_gemm_nvfp4.cu),
checked without a GPU: the file is compiled for sm_90a with CMake's flags and its SASS read with
cuobjdump. Skips when nvcc or cuobjdump is missing (the test extras install cuobjdump's wheel).
tests/test_machine_code.py checks every hot kernel of the built module (spills, registers, its tensor-core
opcode); this test holds the expert GEMM's main loops to the instruction budget of its design.

The budgets come from the design in the kernel's header: per 64-column stage and warp, 4 k-steps of
decode (5 LOP3 + 2 SHF + 2 IMAD.SHL), scale pair (2), 4 HMUL2.BF16, one ldmatrix per 16 tokens and NT
HMMAs, plus the stage's copies and ring bookkeeping. A regression (an unrolled-away decode, an
arithmetic E2M1 conversion, spills, a lost ldmatrix) shows up as a count over budget."""

import re
from pathlib import Path

import pytest

from sass_tools import ROOT, compile_cubin, find_tool, innermost_loops_with, resource_usage, sass

SOURCE = ROOT / "csrc/kernels/nvfp4/grouped_gemm_nvfp4.cu"

pytestmark = pytest.mark.skipif(not (find_tool("nvcc") and find_tool("cuobjdump")),
                                reason="needs nvcc and cuobjdump (pip install nvidia-cuda-cuobjdump)")

K_STEPS = 4                 # mma k-steps per stage (64 columns)
DECODE_ALU = 5 + 2 + 2      # per k-step: LOP3, SHF (rotations), scale pair (LOP3 + shift)
OVERHEAD = 64               # per stage: barrier, wait, weight/activation copies, stage ring, loop
REGS = 128                  # 2 CTAs of 256 threads per SM (65536 registers)


def budget(nt):
    """Non-HMMA instructions per stage: decode 9 + IMAD.SHL 2 + HMUL2 4 + weight/scale loads 0.5
    + ldmatrix ceil(NT/2) per k-step, plus the overhead."""
    return K_STEPS * (9 + 2 + 4 + 0.5 + max(1, nt // 2)) + OVERHEAD


@pytest.fixture(scope="module")
def cubin(tmp_path_factory):
    return compile_cubin(SOURCE, tmp_path_factory.mktemp("sass"))


@pytest.fixture(scope="module")
def kernels(cubin):
    code = sass(cubin)
    found = {name: c for name, c in code.items() if "grouped_gemm_nvfp4_kernel" in name}
    assert len(found) == 2, list(code)  # the plain and the gated instantiation
    return found


def test_no_spills_registers_within_occupancy(cubin):
    res = {n: r for n, r in resource_usage(cubin).items() if "grouped_gemm_nvfp4_kernel" in n}
    assert len(res) == 2
    for name, r in res.items():
        assert r.local == 0 and r.stack == 0, (name, r)
        assert r.registers <= REGS, (name, r)
        assert r.shared <= 1024, (name, r)  # all tiles are dynamic shared memory (the kernel's kSmemBytes)


def test_no_local_memory_instructions(kernels):
    for name, code in kernels.items():
        local = [i for i in code if i.base in ("LDL", "STL")]
        assert not local, (name, local[:4])


@pytest.mark.parametrize("gated", [False, True])
def test_main_loops_within_instruction_budget(kernels, gated):
    code = next(c for n, c in kernels.items() if ("ILb1E" in n) == gated)
    loops = innermost_loops_with(code, "HMMA")
    by_nt = {}
    for lp in loops:
        stages = sum(1 for i in lp.body if i.op.startswith("LDS.128"))  # one 16-byte weight load per stage
        assert stages >= 1, "a main loop without its 16-byte weight load"
        by_nt[lp.count("HMMA") // (K_STEPS * stages)] = (lp, stages)
    assert sorted(by_nt) == [1, 2, 4, 8], sorted(by_nt)  # one main loop per token-tile width
    report = []
    for nt, (lp, stages) in sorted(by_nt.items()):
        mix = lp.mix()
        n, mma = len(lp.body), mix["HMMA"]
        report.append(f"NT={nt}: {n / stages:.0f} instructions per stage, {n / mma:.1f} per HMMA, "
                      f"{dict(mix.most_common(8))}")
        assert all(i.op.startswith("HMMA.16816.F32.BF16") for i in lp.body if i.base == "HMMA")
        assert (n - mma) / stages <= budget(nt), report[-1]
        assert mix["HMUL2"] == 4 * K_STEPS * stages, report[-1]                 # the scales, one per register
        assert mix["LOP3"] <= ((5 + 1) * K_STEPS + 4) * stages, report[-1]      # decode + scale pairs
        assert mix["LDSM"] == K_STEPS * max(1, nt // 2) * stages, report[-1]    # B fragments from shared memory
        assert mix["BAR"] == stages and mix["LDGSTS"] >= stages, report[-1]     # a barrier and copies per stage
        for slow in ("F2F", "I2F", "MUFU", "LDG", "LDL"):                      # no arithmetic decode, no direct loads
            assert mix[slow] == 0, (slow, report[-1])
    print("\n".join(report))


def test_hmma_outside_the_loops_is_absent(kernels):
    """Every HMMA sits in a main loop (the epilogue and the prologue hold none)."""
    for name, code in kernels.items():
        loops = innermost_loops_with(code, "HMMA")
        inside = {i.addr for lp in loops for i in lp.body if i.base == "HMMA"}
        outside = [i for i in code if i.base == "HMMA" and i.addr not in inside]
        assert not outside, (name, outside[:3])


def test_build_flags_match_cmake():
    """The test compiles with the flags CMake gives the CUDA sources."""
    text = (ROOT / "CMakeLists.txt").read_text()
    assert re.search(r"--expt-relaxed-constexpr -lineinfo", text)


# ---- the wgmma kernel (sm90_grouped_gemm_nvfp4_wgmma.cu), read from the built module: it needs the CuTe
# headers the build found.

def _wgmma_budget(bn):
    """Instructions per stage and warp: the same decode and scales as the mma.sync kernel (no ldmatrix, 4
    HGMMA instead of the HMMA), the stage's copies (2 weight chunks + bn / 32 activation chunks, each with its
    pointer step) and the overhead of the ring, the barrier, the proxy fence and the wgmma fence/commit/wait."""
    return K_STEPS * (9 + 2 + 4) + 2 + 4 + 8 * (2 + bn // 32) + 64


@pytest.fixture(scope="module")
def wgmma_kernels():
    from dgemma_rt import _core
    if not _core.cuda_compiled():
        pytest.skip("built without CUDA")
    code = sass(Path(_core.__file__), arch="sm_90a")
    found = {name: c for name, c in code.items() if "grouped_gemm_nvfp4_wgmma_kernel" in name}
    assert len(found) == 2, sorted(n for n in code if "nvfp4" in n)  # the plain and the gated instantiation
    if not any(i.base == "HGMMA" for c in found.values() for i in c):
        pytest.skip("built without the CuTe headers: the wgmma kernel is empty")
    return found


@pytest.mark.parametrize("gated", [False, True])
def test_wgmma_main_loops_within_instruction_budget(wgmma_kernels, gated):
    code = next(c for n, c in wgmma_kernels.items() if ("ILb1E" in n) == gated)
    by_n = {}
    for lp in innermost_loops_with(code, "HGMMA"):
        assert lp.count("HGMMA") == K_STEPS, "one HGMMA per k-step of a stage"
        widths = {re.match(r"HGMMA\.64x(\d+)x16", i.op + i.args).group(1) for i in lp.body if i.base == "HGMMA"}
        assert len(widths) == 1, widths
        by_n[int(widths.pop())] = lp
    assert sorted(by_n) == [64, 128], sorted(by_n)  # one main loop per pass width
    for bn, lp in sorted(by_n.items()):
        mix = lp.mix()
        report = f"N={bn}: {len(lp.body)} instructions per stage, {dict(mix.most_common(8))}"
        print(report)
        assert len(lp.body) <= _wgmma_budget(bn), report
        assert lp.count("LDS") >= 1 and not lp.count("LDSM") and not lp.count("HMMA"), report
