"""A roofline model of one denoising step: what each op must move and compute, its floor on a GPU,
and what the kernel in this tree is expected to reach, with the reason.

``dgemma-bench --roofline [--quant nvfp4] [--dense-quant fp8] [--gpu h100|h200] [--fused-lm-head] [--steps N]
[--json]`` prints it. Every number here is arithmetic on the model's shapes and the device's datasheet rates,
not a measurement: ``floor`` is max(bytes / HBM bandwidth, FLOPs / tensor-core peak) and
``expected`` is floor / efficiency (or, for a one-CTA op, its latency if that is longer), where the
efficiency is the design's own estimate (from its tile and pipeline plan, the kernel headers and the
machine-code review in ../shared/docs/PERF.md), one line of reason each.
``--measured FILE`` puts measured per-op milliseconds (a JSON object ``{"per_op_ms": {op: ms}}``,
written by a GPU profiling run) beside the model; until a GPU run exists that column is empty.

Two variants of the LM head + sampler + self-conditioning product, as the CUDA backend has them: the
per-row path it runs by default (per canvas row: the logits GEMM with the softcap fused into f32 [n, V],
sample_canvas over them writing bf16 probabilities, the split-K product probs @ E) and the fused pass
(DGEMMA_CUDA_FUSED_LM_HEAD=1, kernels/sampler/lm_head_fused.cuh: one read of E; ``fused_lm_head=True``).
Kernel launches: decoder steps are CUDA graphs that survive a growing context and mixed batches (keyed on
the batch size, a power-of-two bucket of the context and whether any row keeps its self-conditioning state;
model/forward.h): in the steady state every step of a canvas of ``steps`` replays, and only a context
bucket's first two canvases launch steps from the host (``graph_steps``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import stat
from typing import Any

from dgemma_rt.tiny import ModelShape


@dataclasses.dataclass(frozen=True)
class Device:
    name: str
    hbm_tbps: float      # HBM bandwidth, TB/s
    bf16_tflops: float   # dense tensor-core peak
    fp8_tflops: float
    fp32_tflops: float   # CUDA cores (FFMA)
    launch_us: float     # a kernel launch without CUDA graphs, back to back on one stream (a CUTLASS GEMM's too:
    #                      the backend keeps its host-made Params, TMA descriptors included, by pointers and sizes)
    graph_node_us: float  # a kernel node of a replayed CUDA graph: no host call, the GPU's drain-and-ramp gap
    #                       between dependent kernels (an assumption, like launch_us: nothing measured yet)


# Issue 13's targets for one step at batch 1, canvas 256, 4,096 cached tokens (ms), by expert/dense format.
TARGETS_MS = {("h100", "nvfp4", "fp8"): 5.5, ("h200", "nvfp4", "fp8"): 4.5, ("h100", "none", "none"): 18.0}

DEVICES = {
    "h100": Device("H100 SXM", 3.35, 989.0, 1979.0, 67.0, 2.0, 0.5),
    "h200": Device("H200 SXM", 4.8, 989.0, 1979.0, 67.0, 2.0, 0.5),
}
SMS = 132  # both devices: what matmul_pick_split_k sizes its split-K for

# The fused LM head pass serves at most this many positions (the fallback's position list is in shared memory).
FUSED_LM_HEAD_MAX_POSITIONS = 3072

# nvfp4.cuh kW4A16WgmmaMinTokens: the tokens per expert from which the backend takes the wgmma W4A16 kernel.
W4A16_WGMMA_MIN_TOKENS = 48

# Bytes per weight as stored: NVFP4 = 4-bit codes + one E4M3 scale per 16; FP8 = E4M3 (+ per-channel scales).
WEIGHT_BYTES = {"bf16": 2.0, "fp8": 1.0, "nvfp4": 0.5 + 1.0 / 16}


@dataclasses.dataclass
class Op:
    name: str
    kernel: str           # where the kernel lives (or what is missing)
    count: int            # instances per step (layers)
    bytes: float          # HBM bytes per instance
    flops: float          # per instance
    unit: str             # which peak bounds the compute: "bf16", "fp8" or "fp32"
    efficiency: float     # expected fraction of the floor's rate
    reason: str
    launches: int = 1     # kernel launches per instance
    latency_us: float = 0.0  # least time per instance whatever its bytes (one CTA's serial phases)
    # Where a design's byte and tensor sides have different efficiencies (the W4A16 expert GEMM: its weight
    # stream, re-read once per token pass, and its MMA issue rate), `efficiency` is the byte side's, `reread`
    # the times the kernel reads its bytes, and compute_efficiency the tensor side's; expected is then the
    # slower side, and the table's efficiency column shows floor / expected.
    compute_efficiency: float | None = None
    reread: float = 1.0

    def _peak(self, d: Device) -> float:
        return {"bf16": d.bf16_tflops, "fp8": d.fp8_tflops, "fp32": d.fp32_tflops}[self.unit]

    def floor_ms(self, d: Device) -> float:
        return self.count * max(self.bytes / (d.hbm_tbps * 1e12), self.flops / (self._peak(d) * 1e12)) * 1e3

    def expected_ms(self, d: Device) -> float:
        if self.compute_efficiency is None:
            t = self.floor_ms(d) / self.efficiency
        else:
            t = self.count * max(self.reread * self.bytes / (d.hbm_tbps * 1e12) / self.efficiency,
                                 self.flops / (self._peak(d) * 1e12) / self.compute_efficiency) * 1e3
        return max(t, self.count * self.latency_us / 1e3)

    def effective_efficiency(self, d: Device) -> float:
        """floor / expected: the design's efficiency at this device's bound."""
        e = self.expected_ms(d)
        return self.floor_ms(d) / e if e > 0 else self.efficiency

    def bound(self, d: Device) -> str:
        peak = {"bf16": d.bf16_tflops, "fp8": d.fp8_tflops, "fp32": d.fp32_tflops}[self.unit]
        return "memory" if self.bytes / d.hbm_tbps >= self.flops / peak else "compute"


def pick_split_k(m: int, n: int, k: int, sms: int = SMS) -> int:
    """kernels/matmul/matmul.cu matmul_pick_split_k: parts of K for about one wave of 2 CTAs per SM."""
    bm = 32 if m <= 32 else 128
    tiles = -(-m // bm) * -(-n // 128)
    target = 2 * sms
    if tiles >= target:
        return 1
    return max(1, min(-(-target // tiles), k // 1024, 64))


def step_ops(shape: ModelShape, batch: int = 1, context: int = 4096, quant: str | None = None,
             dense_quant: str | None = None, host_f32: bool = False, fused_lm_head: bool = False) -> list[Op]:
    """The ops of one decoder step over `batch` canvases whose rows have `context` cached tokens.
    host_f32: the bytes the CPU backend moves instead, every weight (quantized ones dequantized at load),
    activation and KV entry float32; the kernels, efficiencies and reasons stay the GPU's.
    fused_lm_head: the fused LM head + sampler + self-conditioning pass (DGEMMA_CUDA_FUSED_LM_HEAD=1) instead
    of the backend's default per-row path; it serves at most FUSED_LM_HEAD_MAX_POSITIONS positions, past
    which the backend (and this model) takes the per-row path."""
    H, V, I = shape.hidden_size, shape.vocab_size, shape.intermediate_size
    E, k, Im = shape.num_experts, shape.top_k_experts, shape.moe_intermediate_size
    L = shape.canvas_length
    T = batch * L
    nh = shape.num_heads
    dense_fmt = dense_quant or "bf16"
    expert_fmt = quant or "bf16"
    wb, ab = WEIGHT_BYTES, 2.0  # activations travel as bf16
    if host_f32:
        wb, ab = {fmt: 4.0 for fmt in WEIGHT_BYTES}, 4.0
    n_full = sum(t == "full_attention" for t in shape.layer_types)
    n_slide = shape.num_layers - n_full
    dense_unit = "fp8" if dense_fmt == "fp8" else "bf16"

    def gemm(n: int, kk: int, fmt: str) -> tuple[float, float]:
        b = n * kk * wb[fmt] + T * (kk + n) * ab
        if fmt == "fp8" and not host_f32:
            b += 2 * T * kk  # W8A8: quantize_rows_fp8 writes the e4m3 activations, the GEMM reads them
        return b, 2.0 * T * n * kk

    # FP8 dense GEMMs are two launches each: quantize_rows_fp8, then the CUTLASS FP8 GEMM (cuda_backend gemm()).
    gl = 2 if dense_fmt == "fp8" else 1

    ops: list[Op] = []
    tiling = ("128x64 tiles in 2x1 clusters: the weight tile is TMA-multicast to both M tiles of a 256-token "
              "canvas, so L2 delivers each weight byte once; 2N/64 CTAs (64-128 at these N) keep HBM busy")
    gemm_eff, gemm_why = 0.7, "CUTLASS sm90 BF16, " + tiling
    if dense_fmt == "fp8":
        gemm_why = "CUTLASS sm90 FP8 W8A8, " + tiling
    elif dense_fmt == "nvfp4":
        gemm_eff, gemm_why = 0.11, "dense NVFP4 layers would run on the W4A16 path: no Hopper kernel for them yet"

    small = 0.5, "one CTA per token row, memory-bound elementwise pass"
    for kind, n_layers in (("sliding", n_slide), ("full", n_full)):
        if n_layers == 0:
            continue
        hd = shape.head_dim if kind == "sliding" else shape.global_head_dim
        kvh = shape.num_kv_heads if kind == "sliding" else shape.num_global_kv_heads
        k_eq_v = kind == "full"
        qkv_n = nh * hd + kvh * hd * (1 if k_eq_v else 2)
        b, f = gemm(qkv_n, H, dense_fmt)
        # Fused into the previous layer's ffn_combine_norm (its pass over x): the normed row's write only. The
        # first layer's input norm is a launch of its own, counted in the embed row.
        ops.append(Op(f"{kind}.input_norm", "kernels/layer/residual.cu", n_layers, T * H * ab, 3 * T * H, "fp32",
                      0.5, "the trailing norm of the previous layer's ffn_combine_norm: x is already in registers, "
                      "one more reduction and the bf16 row written", launches=0))
        # K=V layers: k and q GEMMs plus the copy of K into V (a cudaMemcpyAsync node); else k, v and q GEMMs.
        ops.append(Op(f"{kind}.qkv_proj", "kernels/gemm/sm90_gemm_bf16.cu", n_layers, b, f, dense_unit, gemm_eff,
                      gemm_why, launches=2 * gl + 1 if k_eq_v else 3 * gl))
        ops.append(Op(f"{kind}.qk_norm_rope", "kernels/layer/embed_rope.cu", n_layers, 2 * T * qkv_n * ab,
                      10 * T * qkv_n, "fp32", small[0], "q, k and v in one launch (head_norm_rope_qkv): one warp "
                      "per (token, head) row, memory-bound elementwise pass", launches=1))
        cached = context if kind == "full" else min(context, shape.sliding_window - 1)
        keys = cached + L
        kv_bytes = batch * cached * kvh * hd * 2 * ab + T * (2 * nh * hd + 2 * kvh * hd) * ab
        attn_flops = 4.0 * T * nh * hd * keys
        if kind == "sliding":
            eff, why = 0.3, ("sm90 wgmma, 2 warpgroups x 64 query rows (BM 128) x 64-key tiles, cp.async gathers "
                             "with shift-based slots; batch 1: 32 tiles x 4 split-KV parts = 128 CTAs, ~50% of "
                             "peak in the loop (softmax not overlapped, L2 ~40 MB of K/V re-reads), plus ~6 us "
                             "of fp32 partials and the combine (sm90_attention_kernel.cuh)")
        else:
            eff, why = 0.38, ("sm90 wgmma, 64 query rows per CTA with the 512 output dims split over 2 warpgroups "
                              "(FlashMLA-style, S partials exchanged in shared memory), 2 split-KV parts at "
                              "batch 1: 64 FLOP per L2 byte, so L2 (~6.5 TB/s, ~0.6 GB of K/V) bounds it near "
                              "40% of peak; 2-CTA K/V multicast is the next step (sm90_attention_kernel.cuh)")
        ops.append(Op(f"{kind}.attention", f"kernels/attention/attention_hd{hd}.cu", n_layers, kv_bytes, attn_flops,
                      "bf16", eff, why, launches=2))
        b, f = gemm(H, nh * hd, dense_fmt)
        ops.append(Op(f"{kind}.o_proj", "kernels/gemm/sm90_gemm_bf16.cu", n_layers, b, f, dense_unit, gemm_eff,
                      gemm_why, launches=gl))
        ops.append(Op(f"{kind}.residual_norm_add", "kernels/layer/residual.cu", n_layers, T * H * (8 + ab),
                      4 * T * H, "fp32", *small))

    layers = shape.num_layers
    ops.append(Op("pre_ffn_norms", "kernels/layer/residual.cu", layers, 2 * T * H * ab, 6 * T * H, "fp32", 0.5,
                  "the two trailing norms of residual_norm_add_norms (one pass: the updated x stays in registers, one "
                  "reduction, two bf16 rows written)", launches=0))
    b1, f1 = gemm(2 * I, H, dense_fmt)
    b2, f2 = gemm(H, I, dense_fmt)
    ops.append(Op("dense_mlp", "kernels/gemm/sm90_gemm_bf16.cu + moe_gelu_gate", layers, b1 + b2 + 2 * T * I * ab,
                  f1 + f2, dense_unit, gemm_eff, gemm_why, launches=2 * gl + 1))
    ops.append(Op("moe_router", "kernels/moe/router.cu", layers, E * H * wb["bf16"] + T * H * 4 * (E // 32) + T * E * 8,
                  2.0 * T * E * H, "fp32", 0.4,
                  "fp32 FFMA (routing needs fp32 logits), 8x32 CTA tiles: 128 CTAs at batch 1, 128 FFMA per 8 "
                  "conflict-free shared loads; the token tile is re-read once per 32-expert tile; a memset of the "
                  "tiles' completion counters first (they move with T)", launches=2))
    hit = E * (1.0 - (1.0 - k / E) ** T)  # experts that receive at least one token
    expert_weights = hit * 3 * Im * H
    expert_flops = 2.0 * T * k * 3 * Im * H
    slots = T * k
    sort_bytes = slots * (4 + 4 + 4) + E * 8  # topk ids in; perm_slot, inv out; counts, offsets
    sort_why = ("counting sort of T*k slots in one 1024-thread CTA (permute.cu: the multi-block sort starts at "
                "8,192 slots, prefill sizes; a decoder step's 2,048 stay on one block): latency, ~4 us of "
                "barrier-separated phases")
    if expert_fmt == "nvfp4":
        # W4A16 (Hopper): gate_up gathers its rows from x through perm_slot and finishes gelu(gate) * up in
        # registers: no xp copy written or read, no h [T*k, 2*Im] round trip. x (T*H, 1.4 MB at batch 1) is
        # read from HBM once; its k re-reads per row come from L2.
        ops.append(Op("moe_permute", "kernels/moe/permute.cu", layers, sort_bytes, slots, "fp32", 0.3,
                      sort_why + "; no gather (xp is not written on the NVFP4 path)", launches=1, latency_us=4.0))
        expert_bytes = expert_weights * wb[expert_fmt] + T * H * ab + slots * (Im + Im + H) * ab
        # The backend's kernel choice (nvfp4.cuh, W4A16Path::kAuto): wgmma from 48 tokens per expert on average.
        per_expert = slots / hit
        wgmma = per_expert >= W4A16_WGMMA_MIN_TOKENS
        passes = max(1, math.ceil(per_expert / (128 if wgmma else 64)))
        common = ("weights pre-shuffled at load into the MMA's A-fragment order: 16-byte loads, E2M1 decode by "
                  "5 LOP3 + 2 SHF + 2 IMAD.SHL per 8 weights, 2 CTAs/SM; token rows gathered from x through "
                  "perm_slot (no xp), re-read from L2; gelu-gate in the gate_up epilogue (Blackwell takes the "
                  "block-scaled NVFP4 GEMMs instead: not modelled)")
        if wgmma:
            eff, tensor_eff = 0.85, 0.7
            why = (f"W4A16 on wgmma (sm90_grouped_gemm_nvfp4_wgmma.cu) at ~{per_expert:.0f} tokens per expert: "
                   f"{passes} weight pass(es) of <= 128 tokens, 4 HGMMA.64xNx16 per stage and warpgroup with the "
                   "decoded weights as register A, ~145-165 instructions per 1024 weights and warp (its SASS); "
                   "tensor side ~0.7 of the wgmma peak (each warpgroup waits for its MMAs per stage, 4 per SM "
                   "interleave), byte side 0.85; " + common)
        else:
            eff, tensor_eff = 0.87, 0.5
            why = (f"W4A16 on mma.sync (grouped_gemm_nvfp4.cu) at ~{per_expert:.0f} tokens per expert: "
                   f"{passes} weight pass(es) of <= 64 tokens, 6-stage cp.async, ~116-161 instructions per "
                   "1024 weights and warp (its SASS), ~0.75x the byte time of issue at 16 tokens, so the weight "
                   "stream sets the pace (byte side 0.87); tensor side ~0.5 of the wgmma peak (mma.sync's "
                   "ceiling is ~2/3 of it, and the decode shares the issue slots); " + common)
        expert_extra = {"compute_efficiency": tensor_eff, "reread": float(passes)}
        kernel = ("kernels/nvfp4/sm90_grouped_gemm_nvfp4_wgmma.cu" if wgmma else "kernels/nvfp4/grouped_gemm_nvfp4.cu")
        expert_launches = 2
    else:
        # Sort, then the gather of T*k bf16 rows into xp (read x, write xp).
        ops.append(Op("moe_permute", "kernels/moe/permute.cu", layers, sort_bytes + slots * H * 2 * ab, slots * H,
                      "fp32", 0.3, sort_why + ", then a gather of T*k rows into xp", launches=2, latency_us=4.0))
        # xp read, h [T*k, 2 Im] written and read by moe_gelu_gate, act written and read, dn written.
        expert_bytes = expert_weights * wb[expert_fmt] + slots * (H + 2 * Im + 2 * Im + Im + Im + H) * ab
        eff, why = 0.85, ("CUTLASS sm90 grouped GEMM, swap-AB so weights fill the 128-row tile: streams weights "
                          "(byte side 0.85); gate_up, moe_gelu_gate, down (each grouped GEMM launches its setup "
                          "kernel too). Tensor side ~0.6 of the wgmma peak: a 32-token tile reads the 128-row "
                          "weight tile from shared memory for only 32 columns (shared-memory-bound wgmma), which "
                          "sets the pace from ~3 canvases on")
        kernel, expert_launches = "kernels/gemm/sm90_grouped_gemm_bf16.cu", 5
        expert_extra = {"compute_efficiency": 0.6}
    ops.append(Op("moe_experts", kernel, layers, expert_bytes, expert_flops, "bf16", eff, why,
                  launches=expert_launches, **expert_extra))
    ops.append(Op("moe_combine", "kernels/moe/combine.cu", layers, T * k * H * ab + T * H * ab, 2 * T * k * H, "fp32",
                  *small))
    ops.append(Op("ffn_combine", "kernels/layer/residual.cu", layers, T * H * (8 + 2 * ab), 12 * T * H, "fp32", *small))

    # Once per step. The embed row also carries the first layer's input norm's launch (the final norm is the
    # last layer's ffn_combine_norm).
    ops.append(Op("embed", "kernels/layer/embed_rope.cu", 1, T * H * (wb["bf16"] + 4), T * H, "fp32", *small,
                  launches=2))
    b1, f1 = gemm(2 * I, H, "bf16")
    b2, f2 = gemm(H, I, "bf16")
    # gather_rows, the pre-norm, gate_up, moe_gelu_gate, down, scatter_add_rows, the decoder-input norm.
    ops.append(Op("self_cond_mlp", "kernels/gemm/sm90_gemm_bf16.cu", 1, b1 + b2, f1 + f2, "bf16", 0.7,
                  "BF16 (the self-conditioning block stays full precision), CUTLASS sm90 " + tiling, launches=7))
    emb = V * H * wb["bf16"]
    if fused_lm_head and T <= FUSED_LM_HEAD_MAX_POSITIONS:
        # lm_head_fused.cuh: E streamed once for every position; the workspace holds S splits' soft partials
        # [S, T, H] f32 and per-64-entry chunk statistics [T, V/64] (16 bytes), written and read back.
        splits = max(1, 16 // max(1, T // 64))
        ws = splits * T * H * 4 + T * (V // 64) * 16
        ops.append(Op("lm_head_fused", "kernels/sampler/lm_head_fused.cu", 1, emb + T * H * ab + 2 * ws + T * 12,
                      4.0 * T * V * H, "bf16", 0.53,
                      "one pass over E in 8-CTA clusters: each 64-entry E tile loaded to shared memory once and used "
                      "for the logits and for probs @ E, no [T, V] tensor; compute-bound (2 GEMMs' FLOPs), mma.sync "
                      "at ~65% of peak plus two cluster barriers per tile: the header's 1.3-1.6 ms at 256 "
                      "positions on an H100 (+ resolve ~10 us; the exact-mass fallback rereads E per 16 flagged "
                      "positions: not modelled; an emulation flags ~half of random weights' flat positions, ~2 ms "
                      "more, and a trained model's rate is unmeasured)",
                      launches=4))
    else:
        rows, n = batch, L
        ops.append(Op("lm_head", "kernels/gemm/sm90_gemm_bf16_logits.cu", rows, emb + n * H * ab + n * V * 4,
                      2.0 * n * V * H, "bf16", 0.8,
                      "per canvas row, CUTLASS sm90 with the softcap as an epilogue visitor node, f32 logits [n, V] "
                      "out: 128x256 tiles in 2x1 clusters, each E tile TMA-multicast to the canvas's two M tiles, so "
                      "E comes from HBM once (at the 26B-A4B shape ~2.9 GB from L2; the mma.sync matmul's 128x128 "
                      "tiles: 5.9 GB, ~0.9 ms); byte side 0.8, tensor side ~0.75 of the wgmma peak, the slower sets "
                      "the time",
                      compute_efficiency=0.75))
        ops.append(Op("sample_canvas", "kernels/sampler/sample_canvas.cu", rows, n * V * (4 + 4 + 4 + 4 + 2),
                      10.0 * n * V, "fp32", 0.6,
                      "one 512-thread CTA per position over its 1 MB f32 row, 3 passes (logits / T in place; exp "
                      "sum; probabilities, entropy and bf16 probs out): ~256 MB of rows in flight > 50 MB L2, so "
                      "each pass goes to HBM; block barriers between passes, one wave of 256 CTAs",
                      launches=1))
        split = pick_split_k(n, H, V)
        ops.append(Op("soft_embedding", "kernels/matmul/matmul.cu split-K + layer/rows.cu scatter", rows,
                      emb + n * V * ab + 2 * split * n * H * 4 + 2 * n * H * ab, 2.0 * n * V * H, "bf16", 0.5,
                      f"probs (bf16 [n, V]) @ E * sqrt(H) as a split-K GEMM (K = V in {split} parts at n = {n}: "
                      f"one wave of 2 CTAs per SM, f32 partials summed in order): E read again from HBM (at the "
                      f"26B-A4B shape 5.9 GB of L2 tile traffic bounds it near 0.9 ms on an H100); skipped on a "
                      f"canvas's last step",
                      launches=3))
    ops.append(Op("accept_canvas", "host (runtime/scheduler.cpp end_step): no kernel in the step", 1, T * 20, T * 16,
                  "fp32", 0.05, "the engine accepts a canvas's tokens on the host after the step's one download",
                  launches=0))
    return ops


# The backend's ops (backend.h; the names Engine.take_profile() reports) -> the rows of step_ops() that
# model the work one op does in a decoder step ("{kind}." rows: every attention kind the model has), and
# what the rows leave out. None: no row models the op; the reason says why.
BACKEND_OP_ROWS: dict[str, tuple[list[str] | None, str | None]] = {
    "embed": (["embed"], "approximate: the row also counts the first layer's input norm's launch (not its bytes)"),
    "rmsnorm": (None, "the first layer's input norm, the self-conditioning pre_norm and the decoder-input norm (3 "
                "calls of [T, H] per step): launches in the embed row, bytes not modelled; the other norms are fused "
                "(residual_norm_add_norms, ffn_combine_norm)"),
    "linear": (["{kind}.qkv_proj", "{kind}.o_proj"], None),
    "copy": (None, "K=V layers copy K into V: not in the roofline"),
    "head_norm_rope": (["{kind}.qk_norm_rope"], "only outside the layers: they run head_norm_rope_qkv"),
    "head_norm_rope_qkv": (["{kind}.qk_norm_rope"], None),
    "kv_write": (None, "encoder passes only"),
    "attention": (["{kind}.attention"], None),
    "residual_norm_add": (["{kind}.residual_norm_add"], "only where no norm follows: the layers run the fused form"),
    "residual_norm_add_norms": (["{kind}.residual_norm_add", "pre_ffn_norms"], None),
    "ffn_combine_norm": (["ffn_combine", "{kind}.input_norm"],
                         "approximate: the last layer's trailing norm is the final norm, the first layer's input "
                         "norm a separate rmsnorm"),
    "mlp": (["dense_mlp", "self_cond_mlp"],
            "approximate: self_cond_mlp runs only on steps with a self-conditioning signal (not a canvas's first)"),
    "moe_router": (["moe_router"], None),
    "moe_experts": (["moe_permute", "moe_experts", "moe_combine"], None),
    "ffn_combine": (["ffn_combine"], "only where no norm follows: the layers run the fused form"),
    "gather_rows": (None, "the self-conditioning state's gather: not in the roofline"),
    "scatter_add_rows": (None, "the self-conditioning signal's scatter-add: not in the roofline"),
    "lm_head_sample": (["lm_head", "sample_canvas", "soft_embedding", "lm_head_fused"],
                       "approximate: the soft embedding is skipped on a canvas's last step"),
    "lm_head_logits": (None, "denoise_logits only, not a decoder step"),
    "soft_embedding": (None, "denoise_logits only (a decoder step's soft embedding is part of lm_head_sample)"),
}
# Rows no backend op runs: the engine accepts a canvas's tokens on the host.
HOST_ROWS = ["accept_canvas"]


def backend_op_bytes(ops: list[Op], backend_op: str) -> tuple[float | None, list[str], str | None]:
    """(HBM bytes per step, the rows summed, note) for a backend op; bytes None where no row models it."""
    rows, note = BACKEND_OP_ROWS.get(backend_op, (None, "unknown op: not in the roofline"))
    if rows is None:
        return None, [], note
    by_name = {op.name: op for op in ops}
    names = [r.replace("{kind}", kind) for r in rows for kind in (("sliding", "full") if "{kind}" in r else ("",))]
    names = [n for n in names if n in by_name]
    if not names:
        return None, [], "the model has none of its rows"
    return sum(by_name[n].count * by_name[n].bytes for n in names), names, note


def graph_steps(steps: int, canvases: int = 0) -> tuple[int, int]:
    """(steps that launch their kernels from the host, steps only replayed) over canvases of `steps` fixed
    steps (model/forward.h). A decoder step's CUDA graph is keyed on the batch size, a power-of-two bucket
    of the cached context and whether any row keeps its self-conditioning state (every step but a canvas's
    last), so it survives the context growing from canvas to canvas and rows at different steps. A
    signature's first step runs directly (sizing the scratch), its second is recorded into a graph (every
    launch made on the host while the GPU waits) and replayed, later ones are replayed: a bucket's first
    canvas launches its first, second and last steps from the host, its second canvas its last step, every
    later canvas none. canvases: the first `canvases` canvases of a bucket, counted from its first (totals
    over all of them); 0: one canvas of the steady state, where every step replays."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, not {steps}")
    if canvases < 0:
        raise ValueError(f"canvases must be >= 0, not {canvases}")
    if canvases == 0:
        return 0, steps
    seen = {False: 0, True: 0}  # the two signatures: keeps state (all but the last step) / the last step
    host = 0
    for _ in range(canvases):
        for s in range(steps):
            last = s == steps - 1
            seen[last] += 1
            host += seen[last] <= 2
    return host, canvases * steps - host


def roofline(shape: ModelShape, device: str = "h100", batch: int = 1, context: int = 4096, quant: str | None = None,
             dense_quant: str | None = None, measured: dict[str, float] | None = None, fused_lm_head: bool = False,
             steps: int = 16, canvases: int = 0) -> dict[str, Any]:
    """The model of one decoder step; launch overhead averaged over canvases of `steps` steps (CUDA graphs,
    graph_steps: the steady state by default, or a context bucket's first `canvases` canvases)."""
    if device not in DEVICES:
        raise ValueError(f"unknown device {device!r}; choose from {', '.join(DEVICES)}")
    d = DEVICES[device]
    ops = step_ops(shape, batch, context, quant, dense_quant, fused_lm_head=fused_lm_head)
    measured = measured or {}
    rows = []
    for op in ops:
        rows.append({
            "op": op.name, "kernel": op.kernel, "instances": op.count, "launches": op.count * op.launches,
            "gbytes": round(op.count * op.bytes / 1e9, 4), "gflop": round(op.count * op.flops / 1e9, 2),
            "bound": op.bound(d), "floor_ms": round(op.floor_ms(d), 4),
            "efficiency": round(op.effective_efficiency(d), 3),
            "expected_ms": round(op.expected_ms(d), 4), "measured_ms": measured.get(op.name), "reason": op.reason,
        })
    launches = sum(op.count * op.launches for op in ops)
    host_steps, replayed = graph_steps(steps, canvases)
    ungraphed_ms = launches * d.launch_us / 1e3
    launch_ms = launches * (host_steps * d.launch_us + replayed * d.graph_node_us) / (host_steps + replayed) / 1e3
    fused = fused_lm_head and batch * shape.canvas_length <= FUSED_LM_HEAD_MAX_POSITIONS
    floor = sum(op.floor_ms(d) for op in ops)
    target = TARGETS_MS.get((device, quant or "none", dense_quant or "none"))
    expected = sum(op.expected_ms(d) for op in ops)
    return {
        "device": d.name, "hbm_tbps": d.hbm_tbps, "batch": batch, "context": context, "canvas": shape.canvas_length,
        "quant": quant or "none", "dense_quant": dense_quant or "none",
        "lm_head": "fused" if fused else "per-row",
        "ops": rows,
        "total": {
            "gbytes": round(sum(op.count * op.bytes for op in ops) / 1e9, 3),
            "tflop": round(sum(op.count * op.flops for op in ops) / 1e12, 3),
            "floor_ms": round(floor, 3),
            "kernel_launches": launches,
            "launch_overhead_ms": round(launch_ms, 3),
            "launch_overhead_without_graphs_ms": round(ungraphed_ms, 3),
            "expected_ms": round(expected + launch_ms, 3),
            "measured_ms": measured.get("step"),
        },
        # Measured names this model has no row for (a typo, another format's op): shown, not dropped.
        "unmatched_measured": sorted(set(measured) - {op.name for op in ops} - {"step"}),
        "graphs": {
            "steps_per_canvas": steps, "canvases": canvases or "steady state", "host_launched_steps": host_steps,
            "replayed_steps": replayed, "launch_us": d.launch_us, "graph_node_us": d.graph_node_us,
            "reason": "decoder steps are CUDA graphs keyed on the batch size, a power-of-two bucket of the context "
                      "and whether any row keeps its self-conditioning state, so they survive a growing context "
                      "and mixed batches (model/forward.h); a bucket's first canvas launches 3 steps from the host "
                      "(a signature's first sight, its capture while the GPU waits, the last step's first sight), "
                      "its second 1 (the last step's capture), later canvases none. Left in the steady state: the "
                      f"GPU's gap between dependent kernel nodes of a replay (assumed {d.graph_node_us} us)",
        },
        "target_ms": target,
        "target_verdict": target_verdict(target, floor, ops, d),
        "note": "arithmetic on shapes and datasheet rates, not a measurement; efficiencies are the kernels' "
                "design estimates (see each reason)",
    }


def target_verdict(target: float | None, floor: float, ops: list[Op], d: Device) -> dict[str, Any]:
    """Whether a target lies below the step's floor (every op at its own roofline, no launch cost): then
    no kernel design of these ops reaches it, only fewer bytes or FLOPs do (other formats, fused passes).
    The reason names the ops with the largest floors."""
    if target is None:
        return {"below_floor": False, "reason": ""}
    below = floor > target
    top = sorted(ops, key=lambda o: o.floor_ms(d), reverse=True)[:3]
    parts = ", ".join(f"{o.name} {o.floor_ms(d):.2f} ms ({o.bound(d)})" for o in top)
    reason = (f"the floor of its bytes and FLOPs at {d.name} rates is {floor:.2f} ms, "
              + (f"above the target's {target} ms" if below else
                 f"so the target asks for {floor / target:.0%} of the roofline over the whole step")
              + f"; largest floors: {parts}")
    return {"below_floor": below, "floor_ms": round(floor, 3), "reason": reason}


def load_measured(path: str, quant: str | None = None, dense_quant: str | None = None) -> dict[str, float]:
    """{op: ms} from a JSON with a per_op_ms object; where it also has per_op_ms_by_format (bench/kernels_gpu.py:
    keys "<experts>/<dense>", e.g. "nvfp4/none"), the entry for these formats instead."""
    # A FIFO or a device would block or never end: only regular files are read (a missing one: OSError).
    if not stat.S_ISREG(os.stat(path).st_mode):
        raise ValueError(f"{path} is not a regular file")
    with open(path, "rb") as f:
        try:
            data = json.loads(f.read())
        except (ValueError, RecursionError) as e:  # bad JSON or UTF-8, or nesting too deep
            raise ValueError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object with a per_op_ms object, got {type(data).__name__}")
    by_format = data.get("per_op_ms_by_format", {})
    if not isinstance(by_format, dict):
        raise ValueError(f"{path}: per_op_ms_by_format must be an object")
    per_op = by_format.get(f"{quant or 'none'}/{dense_quant or 'none'}", data.get("per_op_ms"))
    if not isinstance(per_op, dict):
        raise ValueError(f"{path} has no per_op_ms object")
    out = {}
    for k, v in per_op.items():
        try:
            ok = not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(float(v)) and v >= 0
        except OverflowError:  # an integer no float holds
            ok = False
        if not ok:
            raise ValueError(f"{path}: per_op_ms {k!r} must be a finite number of milliseconds >= 0, got {v!r}")
        out[str(k)] = float(v)
    return out


def format_table(r: dict[str, Any]) -> str:
    head = (f"roofline of one step on {r['device']} ({r['hbm_tbps']} TB/s): batch {r['batch']}, canvas "
            f"{r['canvas']}, context {r['context']}, experts {r['quant']}, dense {r['dense_quant']}, "
            f"LM head {r['lm_head']}")
    lines = [head, f"{'op':<26}{'x':>4}{'GB':>9}{'GFLOP':>9}  {'bound':<8}{'floor ms':>9}{'eff':>6}"
             f"{'expected':>10}{'measured':>10}"]
    for o in r["ops"]:
        m = f"{o['measured_ms']:.3f}" if o["measured_ms"] is not None else "-"
        lines.append(f"{o['op']:<26}{o['instances']:>4}{o['gbytes']:>9.3f}{o['gflop']:>9.1f}  {o['bound']:<8}"
                     f"{o['floor_ms']:>9.3f}{o['efficiency']:>6.2f}{o['expected_ms']:>10.3f}{m:>10}")
    t = r["total"]
    g = r["graphs"]
    lines.append(f"{'launch overhead':<26}{t['kernel_launches']:>4} launches {'':>26}{t['launch_overhead_ms']:>10.3f}"
                 f"  ({g['replayed_steps']} of {g['host_launched_steps'] + g['replayed_steps']} steps replayed as "
                 f"CUDA graphs; "
                 f"{t['launch_overhead_without_graphs_ms']:.3f} ms without)")
    if r.get("unmatched_measured"):
        lines.append(f"measured ops with no row in this model: {', '.join(r['unmatched_measured'])}")
    m = f"{t['measured_ms']:.3f}" if t["measured_ms"] is not None else "-"
    lines.append(f"{'step':<30}{t['gbytes']:>9.2f}{t['tflop'] * 1e3:>9.0f}  {'':<8}{t['floor_ms']:>9.3f}{'':>6}"
                 f"{t['expected_ms']:>10.3f}{m:>10}")
    if r.get("target_ms") is not None:
        verdict = "meets" if t["expected_ms"] <= r["target_ms"] else "misses"
        lines.append(f"target {r['target_ms']} ms: the model of today's kernels {verdict} it")
        tv = r["target_verdict"]
        lines.append(f"  {'below the floor, no design of these ops reaches it' if tv['below_floor'] else 'above the floor'}: {tv['reason']}")
    lines.append("reasons (the kernels' designs; figures written out in them are the 26B-A4B shape's at batch 1, "
                 "the table's columns are this shape's):")
    lines.extend(f"  {o['op']}: {o['reason']}" for o in r["ops"])
    lines.append(f"  launch overhead: {g['reason']}")
    lines.append(r["note"])
    return "\n".join(lines)
