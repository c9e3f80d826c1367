"""What the compiler made of the CUDA kernels, read from the built module without a GPU.

cuobjdump (the nvidia-cuda-cuobjdump / nvidia-cuda-nvdisasm wheels, a test extra) lists the sm_90a
machine code embedded in dgemma_rt._core. The hot kernels must not touch local memory (no spills, no
stack arrays: LDL/STL), must keep registers within their occupancy plan, and must use the tensor
cores their designs name: HGMMA/QGMMA (wgmma) in the CUTLASS GEMMs and the sm90 attention kernel, HMMA
(mma.sync) in its fallback. Every kernel with an occupancy plan (_core._testing.kernel_plans(), written next
to its launcher: threads, dynamic shared memory, CTAs per SM) must fit that many CTAs on a Hopper SM with the
registers and static shared memory the compiler gave it. A regression fails CI. Skipped when the module was
built without CUDA or the tool is missing.
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
            current["mnemonics"] = []
            continue
        m = re.match(r"\s*/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?(([A-Z][A-Z0-9_]*)[A-Za-z0-9_.]*)", line)
        if m and current is not None:
            current["ops"].append(m.group(2))
            current.setdefault("mnemonics", []).append(m.group(1))  # with modifiers: HGMMA.64x64x16.F32.BF16
    names = _demangle(list(usage))
    assert usage, "no sm_90a kernels found in " + so
    for k, v in usage.items():
        v["mangled"] = k
    return {names[k]: v for k, v in usage.items()}


def _matching(kernels: dict[str, dict], pattern: str, mangled: bool = False) -> dict[str, dict]:
    """Kernels whose demangled name (or, with mangled=True, either name) matches."""
    hits = {k: v for k, v in kernels.items() if re.search(pattern, k) or (mangled and re.search(pattern, v["mangled"]))}
    assert hits, f"no sm_90a kernel matches {pattern!r}"
    return hits


# (name pattern, register budget per thread from the kernel's occupancy plan, tensor-core opcode it must use)
HOT_KERNELS = [
    # Attention (kernels/attention): 256 threads, one CTA per SM (the shared-memory plan: 128 KB for head_dim
    # 256, 224 KB for 512), so 255 registers is the hard cap. sm90 (wgmma): the fp32 output accumulator is
    # 64 x 256 per warpgroup = 128 registers per thread plus S (32) and P (16); 512 adds the S exchange.
    (r"sm90_attention_kernel<.*Sm90Config<256>", 232, "HGMMA"),
    (r"sm90_attention_kernel<.*Sm90Config<512>", 248, "HGMMA"),
    # The mma.sync fallback (sm_100a/sm_120a, builds without CuTe): 128 output dims per warp in registers.
    (r"sm80_attention_kernel<.*AttnConfig<256,", 240, "HMMA"),
    (r"sm80_attention_kernel<.*AttnConfig<512,", 248, "HMMA"),
    (r"attention_combine_kernel<", 64, None),
    # 256 threads, 2 CTAs per SM (90 KB of shared tokens each at H = 2816): <= 128.
    (r"router_kernel<", 128, None),
    # The W4A16 expert GEMM (mma.sync m16n8k16), and its wgmma form for many tokens per expert (2 CTAs of 256
    # threads per SM: 64 of the 128 registers hold the 64 x 128 fp32 accumulator).
    (r"grouped_gemm_nvfp4_kernel<", 128, "HMMA"),
    (r"grouped_gemm_nvfp4_wgmma_kernel<", 128, "HGMMA"),
    # The denoising sampler: 512 threads per position, <= 64 for one CTA per SM per 32K registers.
    (r"sample_canvas_kernel", 64, None),
    (r"combine_kernel<", 64, None),
    (r"gather_kernel<", 64, None),
    # moe_permute: the 1024-thread sort and scan only launch with <= 64 registers; the multi-block
    # histogram and rank kernels (256 threads) keep several CTAs per SM with the same budget.
    (r"::sort_kernel\(", 64, None),
    (r"::mb_scan_kernel\(", 64, None),
    (r"::mb_histogram_kernel\(", 64, None),
    (r"::mb_rank_kernel\(", 64, None),
    # The CUTLASS-free BF16 GEMM (kernels/matmul, mma.sync): BM 128 with 256 threads at 2 CTAs per SM and BM 32
    # with 128 threads at 4 CTAs per SM both leave 128 registers (64 or 32 of them accumulators).
    (r"matmul_bf16_kernel<", 128, "HMMA"),
    (r"splitk_reduce_kernel", 64, None),
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


def test_no_kernel_of_ours_uses_local_memory(kernels):
    """Beyond the hot kernels: no kernel of this project (namespace dgemma::kernels, CUTLASS instantiations
    included) spills or keeps a stack array in its sm_90a code. A copy kernel once grew a 16-byte frame
    from an unrolled zero-fill nobody noticed (rows.cu)."""
    ours = {k: v for k, v in kernels.items() if "dgemma::kernels" in k or "dgemma7kernels" in k}
    assert len(ours) > 50, sorted(ours)
    # sincosf's exact range reduction (|x| > 105615: position x inv_freq at long contexts) keeps its
    # Payne-Hanek words on the stack, on that slow path only.
    allowed = {"head_norm_rope_kernel"}
    bad = {name[:160]: (v["stack"], sum(op in ("LDL", "STL") for op in v["ops"]))
           for name, v in ours.items() if v["stack"] or v["local"] or "LDL" in v["ops"] or "STL" in v["ops"]}
    bad = {name: v for name, v in bad.items() if not any(a in name for a in allowed)}
    assert not bad, f"kernels with local memory (stack bytes, LDL/STL count): {bad}"


def test_cutlass_gemms_use_wgmma(kernels):
    # The Hopper GEMMs (their mainloops are MainloopSm90*; the Blackwell ones compile to empty stubs for sm_90a).
    # c++filt leaves CUTLASS's longest names mangled, so match either form.
    gemms = {k: v for k, v in _matching(kernels, r"cutlass_launch::kernel<|cutlass_launch6kernelI").items()
             if "MainloopSm90" in k}
    for name, k in gemms.items():
        # HGMMA: bf16 wgmma; QGMMA: its FP8 form.
        assert any(op in ("HGMMA", "QGMMA") for op in k["ops"]), f"{name[:160]}...: no wgmma in its sm_90a code"
        assert "LDL" not in k["ops"] and "STL" not in k["ops"], f"{name[:160]}...: local memory"
    # The dense BF16, FP8 and logits (f32 out, softcap) GEMMs and the grouped BF16 GEMM.
    assert len(gemms) == 4, sorted(gemms)


def test_wgmma_is_not_serialized(kernels):
    """Where a subroutine call falls inside a wgmma pipeline (an assert left in by a build without NDEBUG, an
    IEEE division's slow path between issue and wait), ptxas serializes every wgmma of the kernel (warning
    C7510): each HGMMA then gets its own WARPGROUP.ARRIVE / DEPBAR pair. Ours issue several per wait."""
    wgmma = {k: v for k, v in kernels.items() if "HGMMA" in v["ops"] or "QGMMA" in v["ops"]}
    assert len(wgmma) >= 6, sorted(k[:80] for k in wgmma)  # attention x2, W4A16 x2, the CUTLASS GEMMs
    serialized = {}
    for name, k in wgmma.items():
        mmas = sum(op in ("HGMMA", "QGMMA") for op in k["ops"])
        waits = sum(m.startswith("WARPGROUP.DEPBAR") for m in k["mnemonics"])
        if waits >= mmas:
            serialized[name[:160]] = (mmas, waits)
    assert not serialized, f"wgmma kernels with a wait per wgmma (wgmma count, waits): {serialized}"


def test_router_main_loop_feeds_ffma_from_few_shared_loads(kernels):
    """The redesigned router: 4 expert rows x 8 tokens per lane, so FFMA far outnumber shared loads."""
    for name, k in _matching(kernels, r"router_kernel<.*, true>").items():
        ffma, lds = k["ops"].count("FFMA"), k["ops"].count("LDS")
        assert ffma >= 128, f"{name}: {ffma} FFMA: the 4x8 register tile is gone"
        assert ffma >= 2 * lds, f"{name}: {ffma} FFMA vs {lds} LDS"


def test_attention_sm90_main_loop_is_wgmma(kernels):
    """The sm90 attention kernel's key loop, per warpgroup and tile: S = Q K^T as 16 HGMMA.64x64x16 (K = 256
    dims of this warpgroup) and O += P V as 4 HGMMA.64x256x16 with P from registers and V transposed from
    shared memory; cp.async (LDGSTS) gathers made visible to wgmma by a proxy fence."""
    for name, k in _matching(kernels, r"sm90_attention_kernel<").items():
        mn = k["mnemonics"]
        qk = [m for m in mn if m.startswith("HGMMA.64x64x16.F32.BF16")]
        pv = [m for m in mn if m.startswith("HGMMA.64x256x16.F32.BF16")]
        assert len(qk) == 16 and len(pv) == 4, f"{name}: {len(qk)} QK and {len(pv)} PV HGMMA"
        assert mn.count("WARPGROUP.ARRIVE") == 2, name
        assert any(m.startswith("FENCE.VIEW.ASYNC.S") for m in mn), f"{name}: no proxy fence before wgmma"
        assert "LDGSTS" in k["ops"] and "HMMA" not in k["ops"], name


def test_w4a16_wgmma_kernel_is_wgmma_with_register_a(kernels):
    """The wgmma W4A16 GEMM: per pass width, 4 HGMMA (one per 16-column k-step of a stage) with the decoded
    weights as the register A operand (no 'gdesc' A: one descriptor, B's) at N = 128 and N = 64; cp.async
    (LDGSTS) tiles made visible to wgmma by a proxy fence; no mma.sync left."""
    for name, k in _matching(kernels, r"grouped_gemm_nvfp4_wgmma_kernel<").items():
        mn = k["mnemonics"]
        n128 = [m for m in mn if m.startswith("HGMMA.64x128x16.F32.BF16")]
        n64 = [m for m in mn if m.startswith("HGMMA.64x64x16.F32.BF16")]
        assert len(n128) == 4 and len(n64) == 4, f"{name}: {len(n128)} N=128 and {len(n64)} N=64 HGMMA"
        assert mn.count("WARPGROUP.ARRIVE") == 2, name
        assert any(m.startswith("FENCE.VIEW.ASYNC.S") for m in mn), f"{name}: no proxy fence before wgmma"
        assert "LDGSTS" in k["ops"] and "HMMA" not in k["ops"], name


def test_attention_paged_loop_has_no_division(kernels):
    """Slots come from shifts of a power-of-two block size (attention_plan.h): the integer divisions left are
    the CTA setup's token / GQA-group ones (each unsigned division emits one I2F.U32.RP; the old kernel
    divided by block_size for every 16-byte chunk: 24 in its head_dim-512 code)."""
    for name, k in _matching(kernels, r"(sm90|sm80)_attention_kernel<").items():
        divs = k["mnemonics"].count("I2F.U32.RP")
        assert divs <= 4, f"{name}: {divs} integer divisions"


# Hopper (compute capability 9.0) per-SM limits (CUDA C++ Programming Guide, "Technical Specifications per
# Compute Capability"; the occupancy calculator's allocation rules).
SM90_REGS_PER_SM = 65536
SM90_REG_UNIT_PER_WARP = 256  # registers are allocated per warp in units of 256
SM90_MAX_REGS_PER_THREAD = 255
SM90_SMEM_PER_SM = 228 * 1024
SM90_SMEM_PER_CTA = 227 * 1024  # the most one CTA may opt in to
SM90_RESERVED_SMEM_PER_CTA = 1024  # the system's share of every CTA's shared memory
SM90_THREADS_PER_SM = 2048
SM90_CTAS_PER_SM = 32

# A module without plans (built without CUDA, or before they existed) gives none: the coverage test fails.
PLANS = getattr(_core._testing, "kernel_plans", list)() if _core.cuda_compiled() else []


def _cta_footprint(k: dict, plan: dict) -> dict:
    """What one CTA of kernel k launched per plan takes from an SM."""
    warps = -(-plan["threads"] // 32)
    regs_per_warp = -(-k["reg"] * 32 // SM90_REG_UNIT_PER_WARP) * SM90_REG_UNIT_PER_WARP
    # ptxas (CUDA 12/13, sm_90) lays the system's 1 KB at the start of a kernel's .nv.shared section, so
    # cuobjdump's SHARED is 1024 + the static shared memory for a kernel that has one, and 0 otherwise.
    assert k["shared"] == 0 or k["shared"] >= SM90_RESERVED_SMEM_PER_CTA, (
        f"SHARED {k['shared']} < 1 KB: the toolkit no longer counts the reserved 1 KB in; fix _cta_footprint")
    static = max(k["shared"] - SM90_RESERVED_SMEM_PER_CTA, 0)
    return {"regs": regs_per_warp * warps, "static": static,
            "smem": static + plan["dynamic_smem"] + SM90_RESERVED_SMEM_PER_CTA}


@pytest.mark.parametrize("plan", PLANS, ids=[p["kernel"][:60] for p in PLANS])
def test_kernel_fits_its_occupancy_plan(kernels, plan):
    """ctas_per_sm CTAs of every kernel the plan names fit on one Hopper SM: registers (per warp, in units of
    256), shared memory (static + dynamic + the reserved 1 KB per CTA) and threads."""
    n, threads, dyn = plan["ctas_per_sm"], plan["threads"], plan["dynamic_smem"]
    assert 1 <= n <= SM90_CTAS_PER_SM and 1 <= threads <= 1024 and threads % 32 == 0, plan
    assert 0 <= dyn <= SM90_SMEM_PER_CTA, f"{plan['kernel']}: {dyn} B of dynamic shared memory per CTA"
    for name, k in _matching(kernels, plan["kernel"], mangled=True).items():
        f = _cta_footprint(k, plan)
        what = f"{name[:160]}: {n} CTA(s) per SM ({plan['why']})"
        assert k["reg"] <= SM90_MAX_REGS_PER_THREAD, what
        assert f["regs"] * n <= SM90_REGS_PER_SM, (
            f"{what}: {k['reg']} registers x {threads} threads = {f['regs']} per CTA, {f['regs'] * n} > {SM90_REGS_PER_SM}")
        assert f["static"] + dyn <= SM90_SMEM_PER_CTA, f"{what}: {f['static']} + {dyn} B of shared memory per CTA"
        assert f["smem"] * n <= SM90_SMEM_PER_SM, (
            f"{what}: {f['static']} static + {dyn} dynamic + 1024 reserved = {f['smem']} B per CTA, "
            f"{f['smem'] * n} > {SM90_SMEM_PER_SM}")
        assert threads * n <= SM90_THREADS_PER_SM, f"{what}: {threads} threads per CTA"


def test_hot_kernels_have_occupancy_plans(kernels):
    """Every kernel HOT_KERNELS holds to a register budget, and every Hopper CUTLASS GEMM, has an occupancy plan."""
    planned = set()
    for plan in PLANS:
        planned |= set(_matching(kernels, plan["kernel"], mangled=True))
    for pattern, _, _ in HOT_KERNELS:
        missing = sorted(set(_matching(kernels, pattern)) - planned)
        assert not missing, f"{pattern!r}: no occupancy plan for {missing}"
    gemms = _matching(kernels, r"cutlass_launch::kernel<|cutlass_launch6kernelI")
    missing = sorted(k[:160] for k in gemms if "MainloopSm90" in k and k not in planned)
    assert not missing, f"CUTLASS GEMMs without an occupancy plan: {missing}"
