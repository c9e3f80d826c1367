"""The roofline model of a GPU step (dgemma_rt.roofline, dgemma-bench --roofline): its arithmetic
against the model's shapes and the figures in ../shared/docs/PERF.md."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from dgemma_rt import presets, roofline

SHAPE = presets.GEMMA_26B_A4B


def _op(r, name):
    return next(o for o in r["ops"] if o["op"] == name)


def test_flops_match_the_model():
    r = roofline.roofline(SHAPE, "h100")
    # PERF.md: ~2.65 TFLOP per step at batch 1, canvas 256, 4k context: dense 0.85, experts 0.73, LM head 0.38,
    # self-conditioning soft embedding 0.38, attention 0.32.
    assert r["total"]["tflop"] == pytest.approx(2.65, rel=0.02)
    dense = sum(_op(r, n)["gflop"] for n in ("sliding.qkv_proj", "sliding.o_proj", "full.qkv_proj", "full.o_proj",
                                             "dense_mlp"))
    assert dense / 1e3 == pytest.approx(0.85, rel=0.02)
    assert _op(r, "moe_experts")["gflop"] / 1e3 == pytest.approx(0.73, rel=0.02)
    assert _op(r, "lm_head")["gflop"] / 1e3 == pytest.approx(0.38, rel=0.02)
    attn = _op(r, "sliding.attention")["gflop"] + _op(r, "full.attention")["gflop"]
    assert attn / 1e3 == pytest.approx(0.32, rel=0.02)


def test_weight_bytes_agree_with_the_checkpoint_plan():
    for quant in (None, "nvfp4"):
        r = roofline.roofline(SHAPE, "h100", quant=quant)
        planned = presets.weight_bytes(SHAPE, quant)["expert"]
        # At 256 tokens x top-8 every expert is hit; the op also moves its activations (7% of the NVFP4 weights).
        assert planned / 1e9 <= _op(r, "moe_experts")["gbytes"] <= 1.1 * planned / 1e9
    bf16, fp4 = roofline.roofline(SHAPE, "h100"), roofline.roofline(SHAPE, "h100", quant="nvfp4", dense_quant="fp8")
    assert fp4["total"]["gbytes"] < bf16["total"]["gbytes"] / 2
    h200 = roofline.roofline(SHAPE, "h200", quant="nvfp4", dense_quant="fp8")
    assert h200["total"]["floor_ms"] < fp4["total"]["floor_ms"]  # more bandwidth, same compute
    assert fp4["target_ms"] == 5.5 and h200["target_ms"] == 4.5 and bf16["target_ms"] == 18.0


def test_every_op_is_justified():
    r = roofline.roofline(SHAPE, "h100", quant="nvfp4", dense_quant="fp8")
    for o in r["ops"]:
        assert 0 < o["efficiency"] <= 1 and o["reason"] and o["kernel"], o["op"]
        assert o["expected_ms"] >= o["floor_ms"] > 0 or o["op"] == "accept_canvas"
        assert o["measured_ms"] is None  # no GPU run has measured anything yet
    assert r["total"]["expected_ms"] >= r["total"]["floor_ms"] + r["total"]["launch_overhead_ms"] - 1e-9
    with pytest.raises(ValueError, match="unknown device"):
        roofline.roofline(SHAPE, "a100")


def test_cli_prints_it_with_measured_times(tmp_path):
    measured = tmp_path / "m.json"
    measured.write_text(json.dumps({"per_op_ms": {"moe_router": 0.25, "step": 12.5}}))
    cmd = [sys.executable, "-m", "dgemma_rt.bench", "--roofline", "--quant", "nvfp4", "--dense-quant", "fp8",
           "--gpu", "h200", "--measured", str(measured), "--json"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    r = json.loads(proc.stdout)
    assert r["device"] == "H200 SXM" and r["quant"] == "nvfp4" and r["dense_quant"] == "fp8"
    assert _op(r, "moe_router")["measured_ms"] == 0.25 and r["total"]["measured_ms"] == 12.5
    table = subprocess.run(cmd[:-1], capture_output=True, text=True, timeout=120)
    assert table.returncode == 0 and "moe_experts" in table.stdout and "target 4.5 ms" in table.stdout
