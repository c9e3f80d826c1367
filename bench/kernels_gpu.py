"""Kernel microbenchmark at the released model's shapes (26B-A4B: batch 1, canvas 256, 4,096 cached tokens).

  python bench/kernels_gpu.py --out FILE        on a GPU (about 30-60 s on an H100/H200)
  python bench/kernels_gpu.py --dry-run         on any machine: builds every input (on torch's meta device) and
                                                checks that every binding it calls is in dgemma_rt._core

Each kernel runs through the launch-only entry points of dgemma_rt._core.cuda_ops (csrc/bindings/
cuda_launch.cpp: device pointers of torch tensors allocated once, torch's current stream; the numpy test
entry points copy their operands on every call). Timing: torch.cuda.Event around each launch, a few
warm-up calls, the median of --reps; before each timed call a 256 MiB buffer is zeroed so that no operand
is served from L2 (50 MiB) by the call before (a decoder step streams ~15-50 GB past it between two
calls of one kernel at the same layer).

Sections (each guarded: a failure is recorded and the others still run; exit code 1 if any failed):
  attention     head_dim 512 (full layers: 16 q heads, 2 KV heads, K=V, 4,096 cached keys) and head_dim 256
                (sliding: 16 q heads, 8 KV heads, window 1,024: 1,023 cached keys), a decoder pass of 256
                tokens over a paged cache (16-token blocks in shuffled order), against
                torch.nn.functional.scaled_dot_product_attention on the same shapes with dense, contiguous
                K/V (a favour to it), bf16, enable_gqa; the backend torch picks is named, and every backend
                that accepts the shape is timed too
  moe_experts   the W4A16 NVFP4 grouped GEMMs at E=128, top-8, 2,048 routed slots (gate_up K=2816 N=2x704
                gathered from x and gated, down K=704 N=2816), time against the weight bytes at HBM
                bandwidth (issue 13: within 1.25x); at 8 canvases (16,384 slots) the mma.sync and the wgmma
                kernels side by side (Hopper); the CUTLASS BF16 grouped GEMMs (+ gelu-gate) likewise
  moe_router    T=256, E=128, H=2816, float32 x (the backend's residual stream)
  lm_head       logits GEMM V=262144, H=2816, M=256 (CUTLASS sm90 with the softcap epilogue node, float32
                out; and the mma.sync matmul beside it) and the self-conditioning product probs @ E (split-K)
  dense_gemms   the CUTLASS BF16 GEMMs of the attention projections and the dense MLP at M=256
  lm_head_fused the fused LM head + sampler + soft embedding (DGEMMA_CUDA_FUSED_LM_HEAD=1) on flat and on
                peaked logits, with the number of positions its exact fallback drew (not in per_op_ms: the
                roofline's default step has the per-row LM head)

The JSON holds the device, driver, commit, per kernel ms / bytes / FLOPs / GB/s / TFLOP/s, the target
verdicts, and per_op_ms keyed by the roofline's op names (python/dgemma_rt/roofline.py, per instance x
its count per step), for ``dgemma-bench --roofline [--quant nvfp4] --gpu h100 --measured FILE``:
per_op_ms is BF16 experts and dense layers; per_op_ms_by_format["<experts>/<dense>"] has each format
(the FP8-dense entries leave out the dense GEMMs, which are timed in BF16 only).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import pathlib
import platform
import signal
import statistics
import subprocess
import sys
import time
import traceback
from typing import Any, Callable

ROOT = pathlib.Path(__file__).resolve().parent.parent

BATCH, CANVAS, CONTEXT, BLOCK = 1, 256, 4096, 16
SOFTCAP = 30.0  # Gemma's final_logit_softcapping: any value > 0 takes the same epilogue
EXPERT_TARGET = 1.25  # issue 13: the expert GEMM within 1.25x of its bytes at HBM bandwidth
FLUSH_BYTES = 256 << 20

# HBM bandwidth (TB/s) and dense BF16 tensor-core peak (TFLOP/s) by device name (first match wins).
DEVICE_RATES = [("H200", 4.8, 989.0), ("H100 NVL", 3.9, 835.0), ("H100 PCIe", 2.0, 756.0), ("H100", 3.35, 989.0)]


def device_rates(name: str) -> tuple[float | None, float | None]:
    for key, tbps, tflops in DEVICE_RATES:
        if key.lower() in name.lower():
            return tbps, tflops
    return None, None


@dataclasses.dataclass
class Kernel:
    name: str
    bytes: float  # HBM bytes one call must move (operands read once, outputs written once)
    flops: float
    run: Callable[[], None] | None  # one call on torch's current stream; None in a dry run
    shapes: dict[str, Any]
    note: str = ""
    weight_bytes: float | None = None  # the expert GEMMs: the part the 1.25x target counts
    observe: Callable[[], dict[str, Any]] | None = None  # after timing: what one more call reports (GPU only)


class Ctx:
    """Allocates on the GPU, or on torch's meta device in a dry run (shapes only, no memory, no launches)."""

    def __init__(self, torch, ops, dry: bool):
        self.torch, self.ops, self.dry = torch, ops, dry
        self.device = "meta" if dry else "cuda"
        self.gen = None if dry else torch.Generator(device="cuda").manual_seed(0)
        self.stream = 0 if dry else torch.cuda.current_stream().cuda_stream

    def randn(self, shape, dtype, std=1.0):
        t = self.torch.empty(shape, dtype=dtype, device=self.device)
        return t if self.dry else t.normal_(0.0, std, generator=self.gen)

    def empty(self, shape, dtype):
        return self.torch.empty(shape, dtype=dtype, device=self.device)

    def rand(self, shape, dtype):
        t = self.torch.empty(shape, dtype=dtype, device=self.device)
        return t if self.dry else t.uniform_(0.0, 1.0, generator=self.gen)

    def zeros(self, shape, dtype):
        return self.torch.zeros(shape, dtype=dtype, device=self.device)

    def nvfp4_bytes(self, shape):
        """Pre-shuffled NVFP4 weights as random bytes in [0x30, 0x3f]: as E4M3 scales 0.5-1.9, as E2M1 codes any
        value; no NaN anywhere, whichever bytes the layout makes scales (the time does not depend on the values)."""
        t = self.torch.empty(shape, dtype=self.torch.uint8, device=self.device)
        return t if self.dry else t.random_(0x30, 0x40, generator=self.gen)

    def host(self, t):
        """A CPU tensor (indices, offsets) moved to the device."""
        return t.to(self.device)

    def size(self, name: str, fallback: int, *args) -> int:
        """A workspace size from the binding; the fallback in a dry run (sizes that ask the device)."""
        return fallback if self.dry else int(getattr(self.ops, name)(*args))

    @staticmethod
    def p(t) -> int:
        return t.data_ptr()


# ----------------------------------------------------------------------------------------------- sections
def section_attention(ctx: Ctx, shape) -> tuple[list[Kernel], dict[str, Any]]:
    torch = ctx.torch
    kernels, extra = [], {}
    T, nh = CANVAS * BATCH, shape.num_heads
    for kind, hd, kvh in (("full", shape.global_head_dim, shape.num_global_kv_heads),
                          ("sliding", shape.head_dim, shape.num_kv_heads)):
        cached = CONTEXT if kind == "full" else min(CONTEXT, shape.sliding_window - 1)
        start = CONTEXT - cached
        first = (start // BLOCK) * BLOCK
        nblocks = -(-(CONTEXT - first) // BLOCK)
        # Table width as model/forward.cpp's decoder_bounds sets it: full layers a power of two of the
        # blocks, sliding layers what a window can span (+1); max_cached likewise.
        width = 1 << (nblocks - 1).bit_length() if kind == "full" else max(nblocks, -(-cached // BLOCK) + 1)
        max_cached = width * BLOCK if kind == "full" else cached
        g = torch.Generator().manual_seed(hd)
        table = torch.zeros(1, width, dtype=torch.int32)
        table[0, :nblocks] = torch.randperm(nblocks, generator=g).to(torch.int32)  # a shuffled pool
        q = ctx.randn((T, nh, hd), torch.bfloat16, 1.5 / math.sqrt(hd))
        k_new, v_new = ctx.randn((T, kvh, hd), torch.bfloat16), ctx.randn((T, kvh, hd), torch.bfloat16)
        k_cache = ctx.randn((nblocks, BLOCK, kvh, hd), torch.bfloat16)
        # K=V layers: V is v_norm of the raw k projection, a tensor of its own in the cache as in the backend
        v_cache = ctx.randn((nblocks, BLOCK, kvh, hd), torch.bfloat16)
        out = ctx.empty((T, nh, hd), torch.bfloat16)
        rows = [ctx.host(torch.tensor([v], dtype=torch.int32)) for v in (first, start, CONTEXT, 0, T)]
        bt = ctx.host(table)
        plan = {} if ctx.dry else dict(ctx.ops.attention_launch_plan(BATCH, hd, nh, kvh, T, max_cached, 0, BLOCK))
        ws = ctx.empty((max(int(plan.get("workspace_bytes", 0)), 16),), torch.uint8)
        keys = cached + T
        nbytes = (BATCH * cached * kvh * hd * 2 + T * (2 * nh * hd + 2 * kvh * hd)) * 2
        flops = 4.0 * T * nh * hd * keys
        shapes = {"q": [T, nh, hd], "kv_heads": kvh, "cached_keys": cached, "keys": keys, "block_size": BLOCK,
                  "blocks": nblocks, "table_width": width, "max_cached": max_cached, "launch_plan": plan}

        def run(q=q, k_new=k_new, v_new=v_new, k_cache=k_cache, v_cache=v_cache, bt=bt, rows=rows, out=out,
                ws=ws, hd=hd, kvh=kvh, width=width, max_cached=max_cached, p=ctx.p):
            ctx.ops.launch_attention(p(q), p(k_new), p(v_new), p(k_cache), p(v_cache), p(bt), *(p(r) for r in rows),
                                     p(out), p(ws), ws.numel(), BATCH, nh, kvh, hd, BLOCK, width, T, max_cached,
                                     False, 0, 1.0, 0, ctx.stream)

        kernels.append(Kernel(f"attention_hd{hd}", nbytes, flops, None if ctx.dry else run, shapes,
                              f"{kind} layers: decoder pass (not causal), paged K/V, split-KV as the kernel picks"))

        # PyTorch SDPA on the same shapes: dense, contiguous K/V of every key (cached then new), [B, heads, L, D].
        qs = ctx.randn((BATCH, nh, T, hd), torch.bfloat16, 1.5 / math.sqrt(hd))
        ks, vs = ctx.randn((BATCH, kvh, keys, hd), torch.bfloat16), ctx.randn((BATCH, kvh, keys, hd), torch.bfloat16)
        sdpa_shapes = {"q": list(qs.shape), "k": list(ks.shape), "v": list(vs.shape), "enable_gqa": True,
                       "scale": 1.0, "is_causal": False}
        F = torch.nn.functional

        def sdpa(qs=qs, ks=ks, vs=vs):
            F.scaled_dot_product_attention(qs, ks, vs, scale=1.0, enable_gqa=True)

        kernels.append(Kernel(f"sdpa_hd{hd}", nbytes, flops, None if ctx.dry else sdpa, sdpa_shapes,
                              "torch SDPA, the backend torch picks (contiguous K/V: a favour to it)"))
        extra[f"sdpa_hd{hd}"] = {"qs": qs, "ks": ks, "vs": vs, "bytes": nbytes, "flops": flops, "shapes": sdpa_shapes}
    return kernels, extra


def sdpa_backends(torch, qs, ks, vs) -> tuple[str, dict[str, Callable[[], None]]]:
    """(the backend torch's dispatch picks for these inputs, a launcher per backend that accepts them)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    names = {int(b.value): n for n, b in SDPBackend.__members__.items()}
    try:
        chosen = names.get(int(torch._fused_sdp_choice(qs, ks, vs, None, 0.0, False, scale=1.0, enable_gqa=True)),
                           "unknown")
    except Exception as e:  # a private function: its signature may move
        chosen = f"unknown ({type(e).__name__}: {e})"
    F = torch.nn.functional
    runs = {}
    for n in ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH"):
        b = SDPBackend.__members__[n]

        def run(b=b):
            with sdpa_kernel([b]):
                F.scaled_dot_product_attention(qs, ks, vs, scale=1.0, enable_gqa=True)

        try:
            run()
            torch.cuda.synchronize()
            runs[n] = run
        except Exception:  # this backend does not take these inputs
            pass
    return chosen, runs


def routing(torch, shape, canvases=BATCH):
    """A random top-8 routing of `canvases` canvases: per-expert offsets and perm_slot (each permuted row's slot
    t*k + j, sorted by expert, stable), as moe_permute makes them."""
    T, E, k = CANVAS * canvases, shape.num_experts, shape.top_k_experts
    g = torch.Generator().manual_seed(13)
    idx = torch.rand(T, E, generator=g).topk(k, dim=1).indices.flatten()  # [T*k]: expert of slot t*k + j
    perm = torch.sort(idx, stable=True).indices.to(torch.int32)
    counts = torch.bincount(idx, minlength=E)
    offsets = torch.zeros(E + 1, dtype=torch.int32)
    offsets[1:] = torch.cumsum(counts, 0).to(torch.int32)
    return offsets, perm, counts


def section_moe_experts(ctx: Ctx, shape) -> tuple[list[Kernel], dict[str, Any]]:
    torch = ctx.torch
    T, H, E, k = CANVAS * BATCH, shape.hidden_size, shape.num_experts, shape.top_k_experts
    Im = shape.moe_intermediate_size
    slots = T * k
    offsets_h, perm_h, counts = routing(torch, shape)
    hit = int((counts > 0).sum())
    offsets, perm = ctx.host(offsets_h), ctx.host(perm_h)
    routed = {"experts": E, "top_k": k, "slots": slots, "experts_hit": hit,
              "tokens_per_expert": {"min": int(counts.min()), "max": int(counts.max()), "mean": slots / E}}
    kernels = []
    flops_gu, flops_dn = 2.0 * slots * 2 * Im * H, 2.0 * slots * H * Im
    p = ctx.p

    # W4A16 NVFP4 (Hopper's path): gate_up gathers x through perm_slot and finishes gelu(gate) * up; then down.
    wb_gu = ctx.size("grouped_gemm_nvfp4_weight_bytes", 2 * Im * H * 9 // 16, 2 * Im, H, True)
    wb_dn = ctx.size("grouped_gemm_nvfp4_weight_bytes", H * Im * 9 // 16, H, Im, False)
    x = ctx.randn((T, H), torch.bfloat16)
    w_gu, w_dn = ctx.nvfp4_bytes((E, wb_gu)), ctx.nvfp4_bytes((E, wb_dn))
    glob = ctx.zeros((E,), torch.float32)
    if not ctx.dry:
        glob.fill_(1.0 / 256)
    act = ctx.empty((slots, Im), torch.bfloat16)
    y = ctx.empty((slots, H), torch.bfloat16)

    def nv_gu():
        ctx.ops.launch_grouped_gemm_nvfp4(p(x), p(w_gu), p(glob), p(offsets), p(act), E, 2 * Im, H, True, p(perm), k,
                                          slots, "auto", ctx.stream)

    def nv_dn():
        ctx.ops.launch_grouped_gemm_nvfp4(p(act), p(w_dn), p(glob), p(offsets), p(y), E, H, Im, False, 0, 1,
                                          slots, "auto", ctx.stream)

    def nv_both():
        nv_gu()
        nv_dn()

    live = not ctx.dry
    gu_w, dn_w = hit * wb_gu, hit * wb_dn
    gu_b = gu_w + T * H * 2 + slots * Im * 2  # x read once (its k re-reads hit L2), act written
    dn_b = dn_w + slots * Im * 2 + slots * H * 2
    layout = {"nvfp4_bytes_per_expert": {"gate_up": wb_gu, "down": wb_dn}, "routing": routed}
    kernels += [
        Kernel("moe_gate_up_nvfp4", gu_b, flops_gu, nv_gu if live else None,
               {"G": E, "N": 2 * Im, "K": H, "gated": True, "gather": "perm_slot // 8", **layout}, weight_bytes=gu_w),
        Kernel("moe_down_nvfp4", dn_b, flops_dn, nv_dn if live else None, {"G": E, "N": H, "K": Im, **layout},
               weight_bytes=dn_w),
        Kernel("moe_experts_nvfp4", gu_b + dn_b, flops_gu + flops_dn, nv_both if live else None, layout,
               "gate_up + down, one layer's routed experts (the roofline's moe_experts, NVFP4 on Hopper)",
               weight_bytes=gu_w + dn_w),
    ]

    # W4A16 at 8 canvases (~128 tokens per expert): the mma.sync kernel (two 64-token passes, each streaming the
    # weights) against the wgmma one (one 128-token pass), on Hopper only.
    wgmma_ok = ctx.dry or bool(ctx.ops.grouped_gemm_nvfp4_wgmma_supported())
    if wgmma_ok:
        C8 = 8
        offsets8_h, perm8_h, counts8 = routing(torch, shape, C8)
        offsets8, perm8 = ctx.host(offsets8_h), ctx.host(perm8_h)
        T8, slots8 = CANVAS * C8, CANVAS * C8 * k
        hit8 = int((counts8 > 0).sum())
        x8 = ctx.randn((T8, H), torch.bfloat16)
        act8, y8 = ctx.empty((slots8, Im), torch.bfloat16), ctx.empty((slots8, H), torch.bfloat16)
        b8 = hit8 * (wb_gu + wb_dn) + T8 * H * 2 + slots8 * (Im * 2 + Im + H) * 2
        f8 = 2.0 * slots8 * 3 * Im * H
        info8 = {"canvases": C8, "slots": slots8, "experts_hit": hit8,
                 "tokens_per_expert": {"min": int(counts8.min()), "max": int(counts8.max()), "mean": slots8 / E}}
        for path in ("mma", "wgmma"):
            def both8(path=path):
                ctx.ops.launch_grouped_gemm_nvfp4(p(x8), p(w_gu), p(glob), p(offsets8), p(act8), E, 2 * Im, H, True,
                                                  p(perm8), k, slots8, path, ctx.stream)
                ctx.ops.launch_grouped_gemm_nvfp4(p(act8), p(w_dn), p(glob), p(offsets8), p(y8), E, H, Im, False, 0,
                                                  1, slots8, path, ctx.stream)

            kernels.append(Kernel(f"moe_experts_nvfp4_b8_{path}", b8, f8, both8 if live else None, {"path": path, **info8},
                                  "gate_up + down at 8 canvases, the W4A16 kernel forced to this path",
                                  weight_bytes=hit8 * (wb_gu + wb_dn)))

    # BF16: the CUTLASS grouped GEMMs on the permuted rows, gelu-gate between them.
    xp = ctx.randn((slots, H), torch.bfloat16)
    bw_gu, bw_dn = ctx.randn((E, 2 * Im, H), torch.bfloat16, 0.02), ctx.randn((E, H, Im), torch.bfloat16, 0.02)
    h = ctx.empty((slots, 2 * Im), torch.bfloat16)
    act2, dn = ctx.empty((slots, Im), torch.bfloat16), ctx.empty((slots, H), torch.bfloat16)
    ws = ctx.empty((max(ctx.size("grouped_gemm_bf16_tn_workspace_size", 1 << 20, E), 16),), torch.uint8)
    cache = None if ctx.dry else ctx.ops.ParamsCache()

    def bf_gu():
        ctx.ops.launch_grouped_gemm_bf16_tn(p(xp), p(bw_gu), p(offsets), p(h), E, 2 * Im, H, p(ws), ws.numel(), cache,
                                            ctx.stream)

    def bf_gelu():
        ctx.ops.launch_moe_gelu_gate(p(h), p(act2), slots, Im, ctx.stream)

    def bf_dn():
        ctx.ops.launch_grouped_gemm_bf16_tn(p(act2), p(bw_dn), p(offsets), p(dn), E, H, Im, p(ws), ws.numel(), cache,
                                            ctx.stream)

    def bf_all():
        bf_gu()
        bf_gelu()
        bf_dn()

    gw, dw = hit * 2 * Im * H * 2, hit * H * Im * 2
    bgu = gw + slots * (H + 2 * Im) * 2
    bgl = slots * (2 * Im + Im) * 2
    bdn = dw + slots * (Im + H) * 2
    kernels += [
        Kernel("moe_gate_up_bf16", bgu, flops_gu, bf_gu if live else None, {"G": E, "N": 2 * Im, "K": H},
               "CUTLASS sm90 grouped GEMM (its setup kernel included)", weight_bytes=gw),
        Kernel("moe_gelu_gate", bgl, 0.0, bf_gelu if live else None, {"M": slots, "I": Im}),
        Kernel("moe_down_bf16", bdn, flops_dn, bf_dn if live else None, {"G": E, "N": H, "K": Im},
               "CUTLASS sm90 grouped GEMM (its setup kernel included)", weight_bytes=dw),
        Kernel("moe_experts_bf16", bgu + bgl + bdn, flops_gu + flops_dn, bf_all if live else None, {"routing": routed},
               "gate_up + gelu-gate + down (the roofline's moe_experts with BF16 experts)", weight_bytes=gw + dw),
    ]
    return kernels, {}


def section_moe_router(ctx: Ctx, shape) -> tuple[list[Kernel], dict[str, Any]]:
    torch = ctx.torch
    T, H, E, k = CANVAS * BATCH, shape.hidden_size, shape.num_experts, shape.top_k_experts
    x = ctx.randn((T, H), torch.float32)
    proj = ctx.randn((E, H), torch.bfloat16, 0.02)
    scale, pes = ctx.randn((H,), torch.float32), ctx.randn((E,), torch.float32)
    idx, w = ctx.empty((T, k), torch.int32), ctx.empty((T, k), torch.float32)
    ws = ctx.empty((max(ctx.size("moe_router_workspace_bytes", 1 << 16, T, E), 16),), torch.uint8)  # any contents
    p = ctx.p

    def run():
        ctx.ops.launch_moe_router(p(x), p(proj), p(scale), p(pes), p(idx), p(w), p(ws), T, H, E, k, 1e-6, ctx.stream)

    return [Kernel("moe_router", E * H * 2 + T * H * 4 + T * k * 8, 2.0 * T * E * H, None if ctx.dry else run,
                   {"T": T, "H": H, "E": E, "k": k, "x": "float32"},
                   "bytes: router weights, x and the top-k once (the roofline also counts x's re-reads per "
                   "32-expert tile)")], {}


def section_lm_head(ctx: Ctx, shape) -> tuple[list[Kernel], dict[str, Any]]:
    torch = ctx.torch
    T, H, V = CANVAS * BATCH, shape.hidden_size, shape.vocab_size
    emb = ctx.randn((V, H), torch.bfloat16, 0.02)
    x = ctx.randn((T, H), torch.bfloat16)
    logits = ctx.empty((T, V), torch.float32)
    probs = ctx.randn((T, V), torch.bfloat16, 1e-4)
    soft = ctx.empty((T, H), torch.bfloat16)
    split = ctx.size("matmul_pick_split_k", 4, T, H, V)
    ws = ctx.empty((max(ctx.size("matmul_workspace_bytes", split * T * H * 4, T, H, split), 16),), torch.uint8)
    alpha = math.sqrt(H)
    p = ctx.p

    def head_mma():
        ctx.ops.launch_matmul_bf16(p(x), p(emb), p(logits), T, V, H, True, False, 1.0, SOFTCAP, 1, 0, 0, ctx.stream)

    cache = None if ctx.dry else ctx.ops.ParamsCache()

    def head():  # what the backend runs on Hopper
        ctx.ops.launch_gemm_bf16_tn_logits(p(x), p(emb), p(logits), T, V, H, 1.0, SOFTCAP, cache, ctx.stream)

    def soft_emb():
        ctx.ops.launch_matmul_bf16(p(probs), p(emb), p(soft), T, H, V, False, True, alpha, 0.0, split, p(ws),
                                   ws.numel(), ctx.stream)

    live = not ctx.dry
    return [
        Kernel("lm_head", V * H * 2 + T * H * 2 + T * V * 4, 2.0 * T * V * H, head if live else None,
               {"M": T, "N": V, "K": H, "out": "float32", "softcap": SOFTCAP},
               "the backend's per-row logits GEMM on Hopper (CUTLASS sm90, 128x256 tiles, softcap epilogue node)"),
        Kernel("lm_head_mma", V * H * 2 + T * H * 2 + T * V * 4, 2.0 * T * V * H, head_mma if live else None,
               {"M": T, "N": V, "K": H, "out": "float32", "softcap": SOFTCAP},
               "the same logits on the mma.sync matmul (the backend's path off Hopper)"),
        Kernel("soft_embedding", V * H * 2 + T * V * 2 + 2 * split * T * H * 4 + T * H * 2, 2.0 * T * V * H,
               soft_emb if live else None, {"M": T, "N": H, "K": V, "w_kn": True, "split_k": split},
               "probs @ E * sqrt(H), split-K (the scatter into the decoder input is not timed)"),
    ], {}


def section_lm_head_fused(ctx: Ctx, shape) -> tuple[list[Kernel], dict[str, Any]]:
    """The fused LM head + sampler + soft embedding (DGEMMA_CUDA_FUSED_LM_HEAD=1): one read of E for the logits,
    the draw and probs @ E. Its exact fallback rereads E per 16 positions whose draw its error radius cannot
    certify, and how many those are depends on how flat the distribution is (lm_head_fused.cuh), so it runs
    twice at t_max = 0.8: on hidden states like random weights' (logits of std ~1: flat, many positions
    flagged) and on 4x larger ones (std ~4: peaked, few flagged); the difference is the fallback's
    cost, and each reports how many positions took it. The last section: it has never run, and a fault in it
    must not cost the others their timings."""
    torch = ctx.torch
    T, H, V = CANVAS * BATCH, shape.hidden_size, shape.vocab_size
    emb = ctx.randn((V, H), torch.bfloat16, 0.02)
    splits = max(1, 16 // max(1, T // 64))
    ws_bytes = ctx.size("lm_head_sample_workspace_bytes", splits * T * H * 4 + T * (V // 64) * 16 + (1 << 20), T, H, V)
    ws = ctx.empty((ws_bytes,), torch.uint8)
    temperature = ctx.host(torch.full((1,), 0.8, dtype=torch.float32))  # one row of T positions
    uniform = ctx.rand((T,), torch.float64)
    soft_index = ctx.host(torch.arange(T, dtype=torch.int32))
    token, argmax, fallback = (ctx.empty((T,), torch.int32) for _ in range(3))
    entropy, soft = ctx.empty((T,), torch.float32), ctx.empty((T, H), torch.bfloat16)
    p = ctx.p
    kernels = []
    for name, scale, what in (("lm_head_fused", 1.0, "random weights' logits (std ~1)"),
                              ("lm_head_fused_peaked", 4.0, "logits of std ~4, peaked")):
        x = ctx.randn((T, H), torch.bfloat16, scale)

        def run(x=x):
            ctx.ops.launch_lm_head_sample_fused(p(x), p(emb), p(temperature), p(uniform), p(token), p(argmax),
                                                p(entropy), p(soft), p(soft_index), p(fallback), p(ws), ws_bytes,
                                                T, H, V, T, SOFTCAP, math.sqrt(H), ctx.stream)

        def observe(run=run) -> dict[str, Any]:
            fallback.fill_(-1)
            run()
            torch.cuda.synchronize()
            flagged = int((fallback == 1).sum())
            unwritten = int((fallback == -1).sum())
            return {"fallback_positions": flagged, "positions": T, "fallback_fraction": flagged / T,
                    "fallback_unwritten": unwritten}

        kernels.append(Kernel(name, V * H * 2 + T * H * 2 + 2 * ws_bytes + T * 12, 4.0 * T * V * H,
                              None if ctx.dry else run, {"P": T, "H": H, "V": V, "temperature": 0.8, "x_std": scale},
                              f"one pass over E for logits, draw and probs @ E, on {what}; the exact fallback's "
                              "extra reads of E are in the time, not in bytes",
                              observe=None if ctx.dry else observe))
    return kernels, {}


def section_dense_gemms(ctx: Ctx, shape) -> tuple[list[Kernel], dict[str, Any]]:
    torch = ctx.torch
    T, H, I, nh = CANVAS * BATCH, shape.hidden_size, shape.intermediate_size, shape.num_heads
    hs, hf = shape.head_dim, shape.global_head_dim
    gemms = {  # name: (N, K)
        "sliding_q_proj": (nh * hs, H), "sliding_k_proj": (shape.num_kv_heads * hs, H),
        "sliding_v_proj": (shape.num_kv_heads * hs, H), "sliding_o_proj": (H, nh * hs),
        "full_q_proj": (nh * hf, H), "full_k_proj": (shape.num_global_kv_heads * hf, H), "full_o_proj": (H, nh * hf),
        "mlp_gate_up": (2 * I, H), "mlp_down": (H, I),
    }
    xs = {K: ctx.randn((T, K), torch.bfloat16) for K in sorted({K for _, K in gemms.values()})}
    cache = None if ctx.dry else ctx.ops.ParamsCache()
    p = ctx.p
    kernels = []
    for name, (N, K) in gemms.items():
        w, y = ctx.randn((N, K), torch.bfloat16, 0.02), ctx.empty((T, N), torch.bfloat16)

        def run(x=xs[K], w=w, y=y, N=N, K=K):
            ctx.ops.launch_gemm_bf16_tn(p(x), p(w), p(y), T, N, K, cache, ctx.stream)

        kernels.append(Kernel(f"gemm_{name}", (N * K + T * (K + N)) * 2, 2.0 * T * N * K, None if ctx.dry else run,
                              {"M": T, "N": N, "K": K}, "CUTLASS sm90 bf16, prepared launches (ParamsCache)"))
    h, act = ctx.empty((T, 2 * I), torch.bfloat16), ctx.empty((T, I), torch.bfloat16)

    def gelu():
        ctx.ops.launch_moe_gelu_gate(p(h), p(act), T, I, ctx.stream)

    kernels.append(Kernel("mlp_gelu_gate", T * 3 * I * 2, 0.0, None if ctx.dry else gelu, {"M": T, "I": I}))
    return kernels, {}


SECTIONS: dict[str, tuple[Callable, list[str]]] = {  # name: (builder, the bindings it calls)
    "attention": (section_attention, ["attention_launch_plan", "launch_attention"]),
    "moe_experts": (section_moe_experts, ["grouped_gemm_nvfp4_weight_bytes", "launch_grouped_gemm_nvfp4",
                                          "grouped_gemm_nvfp4_wgmma_supported",
                                          "grouped_gemm_bf16_tn_workspace_size", "launch_grouped_gemm_bf16_tn",
                                          "launch_moe_gelu_gate", "ParamsCache"]),
    "moe_router": (section_moe_router, ["moe_router_workspace_bytes", "launch_moe_router"]),
    "lm_head": (section_lm_head, ["matmul_pick_split_k", "matmul_workspace_bytes", "launch_matmul_bf16",
                                  "launch_gemm_bf16_tn_logits", "ParamsCache"]),
    "dense_gemms": (section_dense_gemms, ["launch_gemm_bf16_tn", "launch_moe_gelu_gate", "ParamsCache"]),
    "lm_head_fused": (section_lm_head_fused, ["lm_head_sample_workspace_bytes", "launch_lm_head_sample_fused"]),
}

# The roofline's ops (roofline.step_ops names) as sums of kernels timed here, per instance; the note says
# what the op does that no kernel here times. Formats: "<experts>/<dense>" as dgemma-bench --quant / --dense-quant.
PER_OP = {
    "sliding.attention": (["attention_hd256"], None),
    "full.attention": (["attention_hd512"], None),
    "moe_router": (["moe_router"], None),
    "lm_head": (["lm_head"], None),
    "soft_embedding": (["soft_embedding"], "the matmul only: the scatter into the decoder input is not timed"),
}
PER_OP_EXPERTS = {"none": ["moe_experts_bf16"], "nvfp4": ["moe_experts_nvfp4"]}
PER_OP_DENSE_BF16 = {
    "sliding.qkv_proj": (["gemm_sliding_q_proj", "gemm_sliding_k_proj", "gemm_sliding_v_proj"], None),
    "full.qkv_proj": (["gemm_full_q_proj", "gemm_full_k_proj"], "K=V layers' copy of K into V not timed"),
    "sliding.o_proj": (["gemm_sliding_o_proj"], None),
    "full.o_proj": (["gemm_full_o_proj"], None),
    "dense_mlp": (["gemm_mlp_gate_up", "mlp_gelu_gate", "gemm_mlp_down"], None),
    "self_cond_mlp": (["gemm_mlp_gate_up", "mlp_gelu_gate", "gemm_mlp_down"],
                      "the GEMMs and gelu-gate only: its gathers, norm and scatter are not timed"),
}
FORMATS = [("none", "none"), ("nvfp4", "none"), ("none", "fp8"), ("nvfp4", "fp8")]


def per_op(shape, ms: dict[str, float]) -> tuple[dict[str, dict[str, float]], dict[str, Any]]:
    """per_op_ms_by_format and, per roofline op, the kernels summed, the count and the note."""
    from dgemma_rt import roofline

    by_format, how = {}, {}
    for quant, dense in FORMATS:
        ops = roofline.step_ops(shape, BATCH, CONTEXT, None if quant == "none" else quant,
                                None if dense == "none" else dense)
        counts = {op.name: op.count for op in ops}
        table = dict(PER_OP, moe_experts=(PER_OP_EXPERTS[quant], None))
        if dense == "none":
            table.update(PER_OP_DENSE_BF16)
        out = {}
        for op, (names, note) in table.items():
            if op not in counts:
                raise KeyError(f"roofline.step_ops has no op {op!r} (experts {quant}, dense {dense})")
            entry = how.setdefault(op, {"kernels": names, "count": counts[op], "note": note})
            if op == "moe_experts":
                entry["kernels"] = {f"experts {q}": n for q, n in PER_OP_EXPERTS.items()}
            if all(n in ms for n in names):
                out[op] = round(counts[op] * sum(ms[n] for n in names), 4)
        by_format[f"{quant}/{dense}"] = out
    return by_format, how


# ------------------------------------------------------------------------------------------------ timing
def time_ms(torch, run: Callable[[], None], flush, warmup: int, reps: int) -> dict[str, Any]:
    for _ in range(warmup):
        run()
    torch.cuda.synchronize()
    ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    for a, b in ev:
        flush.zero_()  # evicts the operands from L2; the launch below queues behind it, so no host gap is timed
        a.record()
        run()
        b.record()
    torch.cuda.synchronize()
    t = sorted(a.elapsed_time(b) for a, b in ev)
    return {"ms": statistics.median(t), "ms_min": t[0], "ms_max": t[-1], "reps": reps}


def describe(k: Kernel, tbps: float | None, tflops: float | None, timing: dict[str, Any] | None) -> dict[str, Any]:
    d: dict[str, Any] = {"bytes": int(k.bytes), "flops": k.flops, "shapes": k.shapes}
    if k.note:
        d["note"] = k.note
    if k.weight_bytes is not None:
        d["weight_bytes"] = int(k.weight_bytes)
    if timing:
        s = timing["ms"] / 1e3
        d.update(timing)
        d["achieved_gbps"] = k.bytes / s / 1e9
        d["achieved_tflops"] = k.flops / s / 1e12
        if tbps:
            d["hbm_fraction"] = d["achieved_gbps"] / (tbps * 1e3)
            d["bytes_at_hbm_ms"] = k.bytes / (tbps * 1e12) * 1e3
        if tflops and k.flops:
            d["bf16_peak_fraction"] = d["achieved_tflops"] / tflops
        if tbps and k.weight_bytes:
            d["weight_bytes_at_hbm_ms"] = k.weight_bytes / (tbps * 1e12) * 1e3
            d["ratio_to_weight_bytes_at_hbm"] = timing["ms"] / d["weight_bytes_at_hbm_ms"]
    return d


def verdicts(kernels: dict[str, dict[str, Any]], sdpa: dict[str, Any], tbps: float | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in ("moe_experts_nvfp4", "moe_gate_up_nvfp4", "moe_down_nvfp4", "moe_experts_bf16"):
        k = kernels.get(name, {})
        r = k.get("ratio_to_weight_bytes_at_hbm")
        out[f"{name}_within_{EXPERT_TARGET}x_of_weight_bytes"] = {
            "target": f"ms <= {EXPERT_TARGET} x weight bytes / HBM bandwidth ({tbps} TB/s)",
            "ratio": r, "meets": None if r is None else r <= EXPERT_TARGET,
            "ms": k.get("ms"), "weight_bytes_at_hbm_ms": k.get("weight_bytes_at_hbm_ms"),
        }
    mma, wgmma = (kernels.get(f"moe_experts_nvfp4_b8_{p}", {}).get("ms") for p in ("mma", "wgmma"))
    out["w4a16_wgmma_faster_than_mma_at_8_canvases"] = {
        "target": "the wgmma W4A16 kernel beats the mma.sync one where the backend picks it (Hopper, batch >= 3)",
        "mma_ms": mma, "wgmma_ms": wgmma, "meets": None if mma is None or wgmma is None else wgmma < mma,
    }
    for hd in (512, 256):
        ours, theirs = kernels.get(f"attention_hd{hd}", {}).get("ms"), sdpa.get(f"hd{hd}", {})
        pick = theirs.get("default_ms")
        best = min(theirs.get("backends_ms", {}).values(), default=None)
        out[f"attention_hd{hd}_faster_than_sdpa"] = {
            "target": "our paged kernel faster than torch SDPA (the backend torch picks) on the same shapes"
                      + (" (issue 13's target)" if hd == 512 else " (for information)"),
            "ms": ours, "sdpa_ms": pick, "sdpa_backend": theirs.get("picked"), "sdpa_best_ms": best,
            "speedup": None if not (ours and pick) else pick / ours,
            "meets": None if not (ours and pick) else ours < pick,
        }
    return out


# ------------------------------------------------------------------------------------------------ main
def gpu_info() -> tuple[str, str]:
    try:
        r = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                           capture_output=True, text=True, timeout=30)
        name, _, driver = r.stdout.strip().splitlines()[0].rpartition(",")
        return name.strip(), driver.strip()
    except (OSError, IndexError, subprocess.SubprocessError):
        return "", ""


def git_commit() -> tuple[str, bool | None]:
    """The commit, from git, or the stamp tools/gpu_wheels.sh leaves beside the wheels (no .git on the GPU machine)."""
    try:
        r = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True)
        if r.returncode == 0:
            d = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True)
            return r.stdout.strip(), bool(d.stdout.strip())
    except OSError:  # no git on the machine
        pass
    stamp = pathlib.Path(os.environ.get("GPU_WHEELS", ROOT / "build" / "gpu-wheels")) / "SOURCE_COMMIT"
    try:
        commit, *dirty = stamp.read_text().split()
        return commit, bool(dirty and dirty[0] not in ("0", "clean", ""))
    except (OSError, ValueError):
        return "unknown", None


def main(argv: list[str] | None = None) -> int:
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:  # a background job without job control: the
        signal.signal(signal.SIGINT, signal.default_int_handler)  # GPU check's time cap sends SIGINT
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", help="write the JSON here (default: stdout)")
    ap.add_argument("--dry-run", action="store_true", help="build every input on the meta device, check the bindings")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--only", help="comma list of sections (" + ",".join(SECTIONS) + ")")
    args = ap.parse_args(argv)
    t0 = time.time()

    import torch

    import dgemma_rt
    from dgemma_rt import presets

    shape = presets.preset("26b-a4b")
    commit, dirty = git_commit()
    name, driver = ("", "") if args.dry_run else gpu_info()
    if not args.dry_run and not name and torch.cuda.is_available():
        name = torch.cuda.get_device_name(0)
    tbps, tflops = device_rates(name)
    result: dict[str, Any] = {
        "kind": "kernel microbenchmark (bench/kernels_gpu.py)",
        "dry_run": args.dry_run,
        "preset": "26b-a4b", "batch": BATCH, "canvas": CANVAS, "context": CONTEXT,
        "device": name or None, "driver": driver or None, "hbm_tbps": tbps, "bf16_tflops": tflops,
        "torch": torch.__version__, "torch_cuda": torch.version.cuda,
        "git_commit": commit, "git_dirty": dirty, "host": platform.node(),
        "command": " ".join([sys.executable, *sys.argv]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "timing": {"timer": "torch.cuda.Event around each call, on torch's current stream", "warmup": args.warmup,
                   "reps": args.reps, "statistic": "median (min and max beside it)",
                   "l2": f"a {FLUSH_BYTES >> 20} MiB buffer zeroed before each timed call"},
        "sections": {}, "kernels": {}, "sdpa": {},
    }
    sections = list(SECTIONS) if not args.only else [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown:
        ap.error(f"unknown section(s) {', '.join(unknown)}")

    # The bindings: present in a CUDA build (whether or not a GPU is here); absent from a CPU-only build.
    ops = getattr(dgemma_rt._core, "cuda_ops", None)
    needed = sorted({b for s in sections for b in SECTIONS[s][1]})
    if ops is None:
        result["bindings"] = {"checked": False, "needed": needed,
                              "note": "dgemma_rt._core was built without CUDA (no cuda_ops): bindings not checked"}
    else:
        missing = [b for b in needed if not hasattr(ops, b)]
        result["bindings"] = {"checked": True, "needed": needed, "missing": missing}
    b = result["bindings"]
    said = b.get("note") or ("missing " + ", ".join(b["missing"]) if b["missing"] else "all present")
    print(f"[kernels] bindings: {said}", file=sys.stderr)

    failed = bool(result["bindings"].get("missing"))
    if not args.dry_run and (ops is None or not torch.cuda.is_available()):
        result["error"] = "needs a CUDA build of dgemma_rt and a GPU torch can see (use --dry-run elsewhere)"
        failed = True
        sections = []
    ctx = Ctx(torch, ops, args.dry_run)
    flush = None if args.dry_run else torch.empty(FLUSH_BYTES, dtype=torch.uint8, device="cuda")
    ms: dict[str, float] = {}

    def finish(done: bool) -> bool:
        """The per-op table and the verdicts from what has been timed so far; returns ok."""
        ok = not failed
        try:
            by_format, how = per_op(shape, ms)
            result["per_op_ms"] = by_format["none/none"]
            result["per_op_ms_by_format"] = by_format
            result["per_op"] = {"unit": "ms per step: the kernels' median x the op's count per step "
                                        "(roofline.step_ops)", "ops": how}
        except Exception as e:  # a renamed roofline op: the dry run (CI) fails here
            result["per_op_error"] = f"{type(e).__name__}: {e}"
            ok = False
        if not args.dry_run:
            result["targets"] = verdicts(result["kernels"], result["sdpa"], tbps)
        result["complete"] = done
        result["ok"] = ok and done
        result["seconds"] = round(time.time() - t0, 1)
        return result["ok"]

    def write() -> None:
        """--out rewritten after every section, so a hung kernel or the step's time cap (the GPU check
        kills this process) still leaves every timing taken before it; never a half-written file."""
        pathlib.Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        tmp = pathlib.Path(str(args.out) + ".tmp")
        tmp.write_text(json.dumps(result, indent=2) + "\n")
        tmp.replace(args.out)

    try:
        for s in sections:
            ts = time.time()
            status: dict[str, Any] = {"status": "ok"}
            result["sections"][s] = {"status": "running"}  # what a killed run was doing
            if args.out:
                finish(False)
                write()
            try:
                kernels, extra = SECTIONS[s][0](ctx, shape)
                for k in kernels:
                    timing, seen = None, {}
                    if not args.dry_run:
                        try:
                            timing = time_ms(torch, k.run, flush, args.warmup, args.reps)
                            ms[k.name] = timing["ms"]
                            if k.observe is not None:
                                seen = k.observe()
                        except Exception as e:
                            status = {"status": "failed", "error": f"{k.name}: {type(e).__name__}: {e}",
                                      "traceback": traceback.format_exc(limit=4)}
                            if not k.name.startswith("sdpa_"):
                                raise
                    result["kernels"][k.name] = {**describe(k, tbps, tflops, timing), **seen}
                for key, e in extra.items():  # SDPA: which backend torch picks, and each backend that takes the shape
                    hd = key.split("_hd")[1]
                    entry: dict[str, Any] = {"shapes": e["shapes"]}
                    if not args.dry_run:
                        picked, runs = sdpa_backends(torch, e["qs"], e["ks"], e["vs"])
                        entry["picked"], entry["default_ms"] = picked, ms.get(key)
                        entry["backends_ms"] = {}
                        for n, run in runs.items():
                            entry["backends_ms"][n] = time_ms(torch, run, flush, args.warmup, args.reps)["ms"]
                    result["sdpa"][f"hd{hd}"] = entry
                if not args.dry_run:
                    torch.cuda.synchronize()  # an asynchronous fault belongs to this section
            except Exception as e:
                status = {"status": "failed", "error": f"{type(e).__name__}: {e}",
                          "traceback": traceback.format_exc(limit=6)}
            status["seconds"] = round(time.time() - ts, 2)
            result["sections"][s] = status
            failed |= status["status"] != "ok"
            print(f"[kernels] {s}: {status['status']} ({status['seconds']} s) {status.get('error', '')}",
                  file=sys.stderr)
    except KeyboardInterrupt:  # SIGINT from the GPU check's timeout: keep what was measured
        result["interrupted"] = True
        failed = True
        print("[kernels] interrupted", file=sys.stderr)
    failed = not finish(not result.get("interrupted"))
    if args.out:
        write()
    else:
        sys.stdout.write(json.dumps(result, indent=2) + "\n")
    for k, v in result.get("targets", {}).items():
        verdict = "n/a" if v["meets"] is None else "meets" if v["meets"] else "misses"
        print(f"[kernels] {k}: {verdict}", file=sys.stderr)
    print(f"[kernels] {'dry run ' if args.dry_run else ''}{'ok' if not failed else 'FAILED'} in {result['seconds']} s",
          file=sys.stderr)
    return 0 if not failed else 1


if __name__ == "__main__":
    sys.exit(main())
