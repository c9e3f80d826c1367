"""The roofline model of a GPU step (dgemma_rt.roofline, dgemma-bench --roofline): its arithmetic
against the model's shapes and the figures in ../shared/docs/PERF.md."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

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


def test_target_verdict_compares_the_target_with_the_floor():
    fp4 = roofline.roofline(SHAPE, "h100", quant="nvfp4", dense_quant="fp8", fused_lm_head=True)
    bf16 = roofline.roofline(SHAPE, "h100")
    for r in (fp4, bf16):
        v = r["target_verdict"]
        assert v["floor_ms"] == r["total"]["floor_ms"]
        assert v["below_floor"] == (r["total"]["floor_ms"] > r["target_ms"])
        assert "moe_experts" in v["reason"]  # the largest floor is named
    # Issue 13's NVFP4 + FP8 target lies under the bytes the step must read at HBM bandwidth alone.
    assert fp4["target_verdict"]["below_floor"] and fp4["total"]["gbytes"] / 3.35 > fp4["target_ms"]
    assert not bf16["target_verdict"]["below_floor"]
    assert roofline.roofline(SHAPE, "h200", quant="nvfp4")["target_verdict"] == {"below_floor": False, "reason": ""}


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
    measured.write_text(json.dumps({"per_op_ms": {"moe_router": 0.25, "step": 12.5, "moe_ruoter": 1.0}}))
    cmd = [sys.executable, "-m", "dgemma_rt.bench", "--roofline", "--quant", "nvfp4", "--dense-quant", "fp8",
           "--gpu", "h200", "--measured", str(measured), "--json"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    r = json.loads(proc.stdout)
    assert r["device"] == "H200 SXM" and r["quant"] == "nvfp4" and r["dense_quant"] == "fp8"
    assert r["lm_head"] == "per-row" and r["graphs"]["steps_per_canvas"] == 16  # the defaults
    assert _op(r, "moe_router")["measured_ms"] == 0.25 and r["total"]["measured_ms"] == 12.5
    assert r["unmatched_measured"] == ["moe_ruoter"]  # a typo is shown, not dropped
    table = subprocess.run(cmd[:-1], capture_output=True, text=True, timeout=120)
    assert table.returncode == 0 and "moe_experts" in table.stdout and "target 4.5 ms" in table.stdout
    assert "measured ops with no row in this model: moe_ruoter" in table.stdout
    fused = subprocess.run(cmd + ["--fused-lm-head", "--steps", "12"], capture_output=True, text=True, timeout=120)
    assert fused.returncode == 0, fused.stderr
    f = json.loads(fused.stdout)
    assert f["lm_head"] == "fused" and f["graphs"]["replayed_steps"] == 12
    assert f["total"]["expected_ms"] < r["total"]["expected_ms"]


def test_measured_per_format_picks_the_bench_formats(tmp_path):
    """bench/kernels_gpu.py writes per_op_ms (BF16 experts and dense) and per_op_ms_by_format: --measured takes
    the entry of --quant / --dense-quant, else per_op_ms."""
    measured = tmp_path / "k.json"
    measured.write_text(json.dumps({"per_op_ms": {"moe_experts": 9.0, "moe_router": 0.3},
                                    "per_op_ms_by_format": {"none/none": {"moe_experts": 9.0, "moe_router": 0.3},
                                                            "nvfp4/none": {"moe_experts": 4.5, "moe_router": 0.3}}}))
    assert roofline.load_measured(str(measured)) == {"moe_experts": 9.0, "moe_router": 0.3}
    assert roofline.load_measured(str(measured), "nvfp4")["moe_experts"] == 4.5
    assert roofline.load_measured(str(measured), "nvfp4", "fp8")["moe_experts"] == 9.0  # no entry: per_op_ms
    cmd = [sys.executable, "-m", "dgemma_rt.bench", "--roofline", "--quant", "nvfp4", "--measured", str(measured),
           "--json"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert _op(json.loads(proc.stdout), "moe_experts")["measured_ms"] == 4.5


@pytest.mark.parametrize("content,words", [
    ("[1, 2]", "must hold a JSON object"),
    ('{"per_op_ms": [1]}', "no per_op_ms object"),
    ('{"per_op_ms": {"moe_experts": -5}}', "'moe_experts' must be a finite number"),
    ('{"per_op_ms": {"attention": NaN}}', "'attention' must be a finite number"),
    ('{"per_op_ms": {"attention": Infinity}}', "'attention' must be a finite number"),
    ('{"per_op_ms": {"x": "abc"}}', "'x' must be a finite number"),
    ('{"per_op_ms": {"x": true}}', "'x' must be a finite number"),
    ('{"per_op_ms": {"x": 1' + "0" * 400 + '}}', "'x' must be a finite number"),  # no float holds it
    ('{"per_op_ms_by_format": [], "per_op_ms": {}}', "per_op_ms_by_format must be an object"),
    ("{not json", "not valid JSON"),
    (b"\xff\xfe", "not valid JSON"),
])
def test_bad_measured_files_are_value_errors(tmp_path, content, words):
    measured = tmp_path / "m.json"
    if isinstance(content, bytes):
        measured.write_bytes(content)
    else:
        measured.write_text(content)
    with pytest.raises(ValueError, match=words):
        roofline.load_measured(str(measured))


def test_cli_refuses_bad_measured_files(tmp_path):
    """One line and exit code 2, never a traceback or a hang (a FIFO is not read)."""
    import os

    listed = tmp_path / "list.json"
    listed.write_text("[1, 2]")
    fifo = tmp_path / "fifo.json"
    os.mkfifo(fifo)
    for path, words in [(listed, "JSON object"), (fifo, "not a regular file"),
                        (tmp_path / "missing.json", f"--measured {tmp_path / 'missing.json'}: No such file")]:
        proc = subprocess.run([sys.executable, "-m", "dgemma_rt.bench", "--roofline", "--measured", str(path)],
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.startswith("error: ") and words in proc.stderr and "Traceback" not in proc.stderr
        assert proc.stdout == ""


def test_totals_are_sums_of_rows():
    for quant, dense, fused in ((None, None, False), ("nvfp4", "fp8", False), ("nvfp4", "fp8", True)):
        r = roofline.roofline(SHAPE, "h100", quant=quant, dense_quant=dense, fused_lm_head=fused)
        t, ops = r["total"], r["ops"]
        assert t["gbytes"] == pytest.approx(sum(o["gbytes"] for o in ops), abs=2e-3)
        assert t["floor_ms"] == pytest.approx(sum(o["floor_ms"] for o in ops), abs=2e-3)
        assert t["kernel_launches"] == sum(o["launches"] for o in ops)
        assert t["expected_ms"] == pytest.approx(sum(o["expected_ms"] for o in ops) + t["launch_overhead_ms"],
                                                 abs=2e-3)


def test_graphs_remove_most_launch_time():
    d = roofline.DEVICES["h100"]
    r = roofline.roofline(SHAPE, "h100", quant="nvfp4", dense_quant="fp8")  # --steps 16, the bench's default
    t, g = r["total"], r["graphs"]
    # The steady state: graphs survive the context growing from canvas to canvas, so every step replays.
    assert (g["steps_per_canvas"], g["canvases"], g["host_launched_steps"], g["replayed_steps"]) == (
        16, "steady state", 0, 16)
    assert t["launch_overhead_without_graphs_ms"] == pytest.approx(t["kernel_launches"] * d.launch_us / 1e3, abs=1e-3)
    assert t["launch_overhead_ms"] == pytest.approx(t["kernel_launches"] * d.graph_node_us / 1e3, abs=1e-3)
    assert 0 < t["launch_overhead_ms"] < 0.5 * t["launch_overhead_without_graphs_ms"]  # the nodes' gaps stay
    # A context bucket's first canvas: steps 1 (first sight), 2 (the capture) and 16 (the last step's first
    # sight) launch from the host; its second canvas captures its last step; later canvases only replay.
    assert roofline.graph_steps(16, 1) == (3, 13)
    assert roofline.graph_steps(16, 2) == (4, 28)
    assert roofline.graph_steps(16, 3) == (4, 44)
    first = roofline.roofline(SHAPE, "h100", quant="nvfp4", dense_quant="fp8", canvases=1)["total"]
    per_launch_us = (3 * d.launch_us + 13 * d.graph_node_us) / 16
    assert first["launch_overhead_ms"] == pytest.approx(first["kernel_launches"] * per_launch_us / 1e3, abs=1e-3)
    assert t["launch_overhead_ms"] < first["launch_overhead_ms"] < t["launch_overhead_without_graphs_ms"]
    # A bucket's first canvas too short to replay anything pays every launch.
    short = roofline.roofline(SHAPE, "h100", quant="nvfp4", dense_quant="fp8", steps=2, canvases=1)["total"]
    assert short["launch_overhead_ms"] == pytest.approx(short["launch_overhead_without_graphs_ms"], abs=1e-3)
    with pytest.raises(ValueError, match="steps"):
        roofline.roofline(SHAPE, "h100", steps=0)
    with pytest.raises(ValueError, match="canvases"):
        roofline.roofline(SHAPE, "h100", canvases=-1)


def test_fused_lm_head_is_cheaper_than_the_per_row_path():
    per_row = roofline.roofline(SHAPE, "h100", quant="nvfp4", dense_quant="fp8")
    fused = roofline.roofline(SHAPE, "h100", quant="nvfp4", dense_quant="fp8", fused_lm_head=True)
    assert per_row["lm_head"] == "per-row" and fused["lm_head"] == "fused"
    head_rows = ("lm_head", "sample_canvas", "soft_embedding")
    assert [o["op"] for o in per_row["ops"] if o["op"] in head_rows + ("lm_head_fused",)] == list(head_rows)
    assert [o["op"] for o in fused["ops"] if o["op"] in head_rows + ("lm_head_fused",)] == ["lm_head_fused"]
    emb_gb = SHAPE.vocab_size * SHAPE.hidden_size * 2 / 1e9
    f = _op(fused, "lm_head_fused")
    # One read of E (plus ~55 MB of workspace), the FLOPs of both products: compute-bound.
    assert emb_gb < f["gbytes"] < emb_gb * 1.05 and f["bound"] == "compute"
    both = _op(per_row, "lm_head")["gflop"] + _op(per_row, "soft_embedding")["gflop"]
    assert f["gflop"] == pytest.approx(both, abs=0.1)
    # The header's estimate: 1.3-1.6 ms at 256 positions on an H100.
    assert 1.3 <= f["expected_ms"] <= 1.6
    # The per-row path reads E twice (logits GEMM, probs @ E) and the f32 logits three more times.
    per_row_head = sum(_op(per_row, n)["expected_ms"] for n in head_rows)
    assert sum(_op(per_row, n)["gbytes"] for n in head_rows) > 2 * emb_gb + 1.0
    assert f["expected_ms"] < per_row_head
    assert fused["total"]["expected_ms"] < per_row["total"]["expected_ms"]
    assert fused["total"]["gbytes"] < per_row["total"]["gbytes"]
    # Per row of the batch: the per-row path repeats per canvas; the fused pass reads E once for all rows,
    # up to 3,072 positions (12 canvases), then the backend takes the per-row path.
    b4 = roofline.roofline(SHAPE, "h100", batch=4)
    assert _op(b4, "lm_head")["instances"] == 4
    b4f = roofline.roofline(SHAPE, "h100", batch=4, fused_lm_head=True)
    assert _op(b4f, "lm_head_fused")["gbytes"] < emb_gb * 1.2
    b13 = roofline.roofline(SHAPE, "h100", batch=13, fused_lm_head=True)
    assert b13["lm_head"] == "per-row" and _op(b13, "lm_head")["instances"] == 13


def test_nvfp4_experts_write_no_permuted_copy():
    bf16 = roofline.roofline(SHAPE, "h100")
    fp4 = roofline.roofline(SHAPE, "h100", quant="nvfp4")
    T, H, k = SHAPE.canvas_length, SHAPE.hidden_size, SHAPE.top_k_experts
    xp_gb = SHAPE.num_layers * T * k * H * 2 / 1e9
    # BF16: the gather reads x and writes xp; NVFP4 (W4A16): the sort only, the GEMM gathers through perm_slot.
    assert _op(bf16, "moe_permute")["gbytes"] >= 2 * xp_gb
    assert _op(fp4, "moe_permute")["gbytes"] < 0.01 * xp_gb
    assert _op(fp4, "moe_permute")["launches"] == SHAPE.num_layers
    assert _op(bf16, "moe_permute")["launches"] == 2 * SHAPE.num_layers
    planned = presets.weight_bytes(SHAPE, "nvfp4")["expert"] / 1e9
    # Activations: x once from HBM (its k re-reads per row from L2), act written and read, dn written.
    Im = SHAPE.moe_intermediate_size
    acts_gb = SHAPE.num_layers * (T * H + T * k * (2 * Im + H)) * 2 / 1e9
    assert _op(fp4, "moe_experts")["gbytes"] == pytest.approx(planned + acts_gb, rel=1e-3)


def test_w4a16_kernel_choice_follows_the_tokens_per_expert():
    """The backend's W4A16 choice (nvfp4.cuh kW4A16WgmmaMinTokens = 48): mma.sync at batch 1-2 (~16-32 tokens
    per expert, one 64-token pass, bound by the weight bytes); wgmma from batch 3 (one 128-token pass up to
    ~128 tokens per expert); at batch 8 the experts are tensor-bound and the wgmma design's efficiency on that
    side is what sets the time. mma.sync at batch 8 would stream each expert's weights twice."""
    by_batch = {b: _op(roofline.roofline(SHAPE, "h100", batch=b, quant="nvfp4"), "moe_experts") for b in (1, 2, 3, 8)}
    assert by_batch[1]["kernel"].endswith("/grouped_gemm_nvfp4.cu") and by_batch[1]["bound"] == "memory"
    assert by_batch[2]["kernel"].endswith("/grouped_gemm_nvfp4.cu")
    assert by_batch[3]["kernel"].endswith("/sm90_grouped_gemm_nvfp4_wgmma.cu")
    assert by_batch[8]["kernel"].endswith("/sm90_grouped_gemm_nvfp4_wgmma.cu") and by_batch[8]["bound"] == "compute"
    assert by_batch[1]["efficiency"] == pytest.approx(0.87)
    assert "1 weight pass" in by_batch[8]["reason"]
    # The per-batch cost grows slower than the work: 8x the tokens for < 2x the time of batch 1.
    assert by_batch[8]["expected_ms"] < 2 * by_batch[1]["expected_ms"]
    for op in by_batch.values():
        assert op["expected_ms"] >= op["floor_ms"] and 0 < op["efficiency"] <= 1
    header = (Path(__file__).resolve().parents[1] / "csrc/kernels/nvfp4/nvfp4.cuh").read_text()
    assert f"kW4A16WgmmaMinTokens = {roofline.W4A16_WGMMA_MIN_TOKENS};" in header
