"""bench/kernels_gpu.py --dry-run: every kernel's inputs build at the 26B-A4B shapes (on torch's meta device),
every binding it calls is in a CUDA build of dgemma_rt._core, and its per-op block names the roofline's ops.
The timed run needs a GPU: bench/gpu_check.sh runs it (its "kernels" step), not pytest."""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import pytest

import dgemma_rt
from dgemma_rt import presets, roofline

pytest.importorskip("torch")

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "kernels_gpu.py"


def _module():
    spec = importlib.util.spec_from_file_location("kernels_gpu", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["kernels_gpu"] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def test_dry_run(tmp_path):
    out = tmp_path / "kernels.json"
    # The package this test imported (an installed wheel in CI, not the source tree without its _core).
    package_root = os.path.dirname(os.path.dirname(dgemma_rt.__file__))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (package_root, os.environ.get("PYTHONPATH")) if p))
    proc = subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--out", str(out)], capture_output=True,
                          text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    r = json.loads(out.read_text())
    assert r["dry_run"] and r["ok"] and r["complete"], r
    assert all(s["status"] == "ok" for s in r["sections"].values()), r["sections"]
    assert not any(p.name.endswith(".tmp") for p in out.parent.iterdir())  # written whole, through a temporary
    assert list(r["sections"]) == ["attention", "moe_experts", "moe_router", "lm_head", "dense_gemms", "lm_head_fused"]
    b = r["bindings"]
    if dgemma_rt.cuda_compiled():
        assert b["checked"] and b["missing"] == [], b
    else:
        assert not b["checked"] and "without CUDA" in b["note"]
    k = r["kernels"]
    for name in ("attention_hd512", "attention_hd256", "sdpa_hd512", "sdpa_hd256", "moe_experts_nvfp4",
                 "moe_experts_bf16", "moe_router", "lm_head", "lm_head_fused", "lm_head_fused_peaked"):
        assert name in k and k[name]["bytes"] > 0, name
    # the released model's shapes
    a = k["attention_hd512"]["shapes"]
    assert a["q"] == [256, 16, 512] and a["kv_heads"] == 2 and a["cached_keys"] == 4096
    s = k["attention_hd256"]["shapes"]
    assert s["q"] == [256, 16, 256] and s["kv_heads"] == 8 and s["cached_keys"] == 1023
    assert r["sdpa"]["hd512"]["shapes"]["k"] == [1, 2, 4096 + 256, 512]
    g = k["moe_gate_up_nvfp4"]["shapes"]
    assert (g["G"], g["N"], g["K"], g["gated"]) == (128, 1408, 2816, True)
    assert g["routing"]["slots"] == 2048 and g["routing"]["top_k"] == 8
    assert (k["moe_down_nvfp4"]["shapes"]["N"], k["moe_down_nvfp4"]["shapes"]["K"]) == (2816, 704)
    assert k["moe_router"]["shapes"] == {"T": 256, "H": 2816, "E": 128, "k": 8, "x": "float32"}
    lm = k["lm_head"]["shapes"]
    assert (lm["M"], lm["N"], lm["K"]) == (256, 262144, 2816)
    # the per-op block: roofline op names with the roofline's counts (nothing timed in a dry run)
    ops = {op.name: op.count for op in roofline.step_ops(presets.preset("26b-a4b"), 1, 4096, "nvfp4")}
    how = r["per_op"]["ops"]
    assert how["moe_experts"]["count"] == 30 and how["full.attention"]["count"] == 5
    assert how["sliding.attention"]["count"] == 25 and set(how) <= set(ops)
    assert set(r["per_op_ms_by_format"]) == {"none/none", "nvfp4/none", "none/fp8", "nvfp4/fp8"}
    assert r["per_op_ms"] == {}


def test_per_op_sums_kernels_times_counts():
    kg = _module()
    shape = presets.preset("26b-a4b")
    names = {n for names, _ in [*kg.PER_OP.values(), *kg.PER_OP_DENSE_BF16.values()] for n in names}
    names |= {n for v in kg.PER_OP_EXPERTS.values() for n in v}
    by_format, _ = kg.per_op(shape, {n: 1.0 for n in names})
    assert by_format["nvfp4/none"]["moe_experts"] == 30.0 and by_format["none/none"]["moe_experts"] == 30.0
    assert by_format["none/none"]["sliding.qkv_proj"] == 75.0  # q, k, v GEMMs x 25 layers
    assert by_format["none/none"]["full.attention"] == 5.0 and by_format["none/none"]["lm_head"] == 1.0
    assert "dense_mlp" not in by_format["nvfp4/fp8"]  # dense GEMMs are timed in BF16 only
    # a file dgemma-bench --roofline --measured reads, per format
    for quant in ("none", "nvfp4"):
        r = roofline.roofline(shape, "h100", quant=None if quant == "none" else quant,
                              measured=by_format[f"{quant}/none"])
        assert {o["op"] for o in r["ops"] if o["measured_ms"] is not None} == set(by_format[f"{quant}/none"])


def test_device_rates():
    kg = _module()
    assert kg.device_rates("NVIDIA H100 80GB HBM3") == (3.35, 989.0)
    assert kg.device_rates("NVIDIA H200")[0] == 4.8
    assert kg.device_rates("NVIDIA H100 PCIe")[0] == 2.0
    assert kg.device_rates("NVIDIA L4") == (None, None)


def test_verdicts_from_given_times():
    """The GPU path's arithmetic on made-up times: GB/s, the 1.25x ratio on weight bytes, SDPA comparison."""
    import torch

    kg = _module()
    shape = presets.preset("26b-a4b")
    ctx = kg.Ctx(torch, None, dry=True)
    kernels = {}
    for build, _ in kg.SECTIONS.values():
        for k in build(ctx, shape)[0]:
            kernels[k.name] = k
    tbps, tflops = kg.device_rates("NVIDIA H100 80GB HBM3")
    nv = kernels["moe_experts_nvfp4"]
    at_hbm = nv.weight_bytes / (tbps * 1e12) * 1e3  # ms
    times = {"moe_experts_nvfp4": 1.2 * at_hbm, "attention_hd512": 0.2, "sdpa_hd512": 0.3, "attention_hd256": 0.1}
    desc = {n: kg.describe(k, tbps, tflops, {"ms": times[n], "reps": 1} if n in times else None)
            for n, k in kernels.items()}
    d = desc["moe_experts_nvfp4"]
    assert abs(d["ratio_to_weight_bytes_at_hbm"] - 1.2) < 1e-9
    assert abs(d["achieved_gbps"] - nv.bytes / (times["moe_experts_nvfp4"] / 1e3) / 1e9) < 1e-6
    sdpa = {"hd512": {"picked": "EFFICIENT_ATTENTION", "default_ms": 0.3, "backends_ms": {"MATH": 2.0}}}
    v = kg.verdicts(desc, sdpa, tbps)
    assert v["moe_experts_nvfp4_within_1.25x_of_weight_bytes"]["meets"] is True
    assert v["moe_experts_bf16_within_1.25x_of_weight_bytes"]["meets"] is None  # not timed
    a = v["attention_hd512_faster_than_sdpa"]
    assert a["meets"] is True and abs(a["speedup"] - 1.5) < 1e-9 and a["sdpa_best_ms"] == 2.0
    assert v["attention_hd256_faster_than_sdpa"]["meets"] is None  # no SDPA time
    # nvfp4 weights: 4.5 bits per weight, every expert hit by 2,048 random slots
    assert nv.weight_bytes == 128 * (2 * 704 * 2816 + 2816 * 704) * 9 // 16


def test_commit_without_git_comes_from_the_wheels_stamp(tmp_path, monkeypatch):
    """The GPU machine gets the tree without .git (and maybe without git): the stamp tools/gpu_wheels.sh wrote."""
    kg = _module()
    monkeypatch.setattr(kg, "ROOT", tmp_path)  # not a repository
    (tmp_path / "w").mkdir()
    (tmp_path / "w" / "SOURCE_COMMIT").write_text("b" * 40 + " dirty\n")
    monkeypatch.setenv("GPU_WHEELS", str(tmp_path / "w"))
    assert kg.git_commit() == ("b" * 40, True)
    monkeypatch.setenv("PATH", str(tmp_path))  # no git at all
    (tmp_path / "w" / "SOURCE_COMMIT").write_text("c" * 40 + "\n")
    assert kg.git_commit() == ("c" * 40, False)
