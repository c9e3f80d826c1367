"""Machine-code budgets of the CUTLASS-free BF16 GEMM (csrc/kernels/matmul/matmul.cu), checked without a GPU:
the file is compiled for sm_90a with CMake's flags and its SASS read with cuobjdump (tests/sass_tools.py).
Skips when nvcc or cuobjdump is missing.

The design (matmul.cu's header): per 32-deep k-tile and warp, MT x NT x 2 HMMA.16816 fed by (MT + NT / 2) x 2
ldmatrix.x4, the CTA's 16-byte cp.async copies (LDGSTS) of the next tile, one barrier. Warp tiles: 64 x 32
(BM 128: MT 4, NT 4) and 32 x 32 (BM 32: MT 2, NT 4). A lost ldmatrix, spills, or copies that fall back to
LDG + STS on the aligned path show up as counts off the design."""

import pytest

from sass_tools import ROOT, compile_cubin, find_tool, innermost_loops_with, resource_usage, sass

SOURCE = ROOT / "csrc/kernels/matmul/matmul.cu"

pytestmark = pytest.mark.skipif(not (find_tool("nvcc") and find_tool("cuobjdump")),
                                reason="needs nvcc and cuobjdump (pip install nvidia-cuda-cuobjdump)")

# Cfg<BM, ...> in the mangled name -> (MT, NT, cp.async chunks per thread per k-tile)
DESIGN = {"CfgILi128E": (4, 4, 2 + 2), "CfgILi32E": (2, 4, 1 + 4)}
REGS = 128
# Non-HMMA instructions per k-tile in the aligned main loops: ldmatrix, copies with their bounds and
# addresses, barrier, ring bookkeeping (now 111-139 across the four aligned kernels).
OTHER_BUDGET = 150


def _design(name):
    hits = [v for k, v in DESIGN.items() if k in name]
    assert len(hits) == 1, name
    return hits[0]


@pytest.fixture(scope="module")
def cubin(tmp_path_factory):
    return compile_cubin(SOURCE, tmp_path_factory.mktemp("sass"))


def test_no_spills_registers_within_occupancy(cubin):
    res = {n: r for n, r in resource_usage(cubin).items() if "matmul_bf16_kernel" in n}
    assert len(res) == 8, list(res)  # 2 tile configs x aligned/unaligned x TN/NN
    for name, r in res.items():
        assert r.local == 0 and r.stack == 0, (name, r)
        assert r.registers <= REGS, (name, r)


def test_main_loops_match_the_design(cubin):
    code = {n: c for n, c in sass(cubin).items() if "matmul_bf16_kernel" in n}
    assert len(code) == 8
    for name, c in code.items():
        assert not [i for i in c if i.base in ("LDL", "STL")], name
        mt, nt, chunks = _design(name)
        loops = innermost_loops_with(c, "HMMA")
        assert len(loops) == 1, (name, len(loops))
        lp = loops[0]
        assert lp.count("HMMA") == mt * nt * 2, (name, lp.mix())
        assert lp.count("LDSM") == (mt + nt // 2) * 2, (name, lp.mix())
        aligned = "ELb1ELb" in name  # template <Cfg, kAligned, kWKn>: Lb1 first is kAligned
        if aligned:
            assert lp.count("LDGSTS") == chunks and lp.count("LDG") == 0, (name, lp.mix())
            assert len(lp.body) - lp.count("HMMA") <= OTHER_BUDGET, (name, len(lp.body))
