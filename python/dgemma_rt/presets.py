"""Model shapes for random-weight benchmarks, and a fast writer of random checkpoints at those shapes.

The released model's weights cannot be downloaded here, and at a fixed step count the weights'
values do not change the speed, so benchmarks run random weights at the real shape
(``dgemma-bench --random-weights --preset 26b-a4b``). The writer stores every tensor directly in its
final format (BF16, or NVFP4 / FP8 codes with scales), drawn so that activations stay O(1) through
the layers, one safetensors shard per layer: no full-precision copy and no quantization pass.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import shutil
from typing import Any

import numpy as np

from dgemma_rt import nvfp4
from dgemma_rt.tiny import TINY, ModelShape, generation_config, model_config

# Bump when anything write_random_checkpoint or random_model_config writes changes, so cached copies are rebuilt.
RANDOM_FORMAT_VERSION = 2


def _layer_types(n: int, period: int = 6) -> tuple[str, ...]:
    """Gemma 4's pattern: every `period`-th layer full attention, the rest sliding; the last layer full."""
    return tuple("full_attention" if (i % period == period - 1 or i == n - 1) else "sliding_attention"
                 for i in range(n))


# The released DiffusionGemma 26B-A4B (../shared/docs/MODEL.md): 25.2B parameters, 3.8B active.
GEMMA_26B_A4B = ModelShape(
    vocab_size=262144, hidden_size=2816, intermediate_size=2112, layer_types=_layer_types(30),
    num_heads=16, num_kv_heads=8, head_dim=256, global_head_dim=512, num_global_kv_heads=2,
    num_experts=128, top_k_experts=8, moe_intermediate_size=704, sliding_window=1024,
    canvas_length=256, max_position_embeddings=262144,
)  # fmt: skip

# The released vocabulary and canvas on a tiny body: what scales with vocab x canvas (the LM head, the
# sampler, the self-conditioning input) at real size, cheap enough for the CPU.
WIDE_VOCAB = ModelShape(
    vocab_size=262144, hidden_size=64, intermediate_size=128, layer_types=("sliding_attention", "full_attention"),
    num_heads=2, num_kv_heads=1, head_dim=32, global_head_dim=64, num_global_kv_heads=1,
    num_experts=4, top_k_experts=2, moe_intermediate_size=32, sliding_window=64,
    canvas_length=256, max_position_embeddings=8192,
)  # fmt: skip

# The CPU benchmark shapes of issue 14 (dgemma-bench --peer transformers): a small model whose step is
# dominated by per-op overheads, and a medium one whose step is dominated by the GEMMs and the head.
CPU_SMALL = ModelShape(
    vocab_size=4096, hidden_size=256, intermediate_size=512, layer_types=_layer_types(6),
    num_heads=4, num_kv_heads=2, head_dim=64, global_head_dim=128, num_global_kv_heads=1,
    num_experts=16, top_k_experts=4, moe_intermediate_size=128, sliding_window=64,
    canvas_length=64, max_position_embeddings=8192,
)  # fmt: skip
CPU_MEDIUM = dataclasses.replace(CPU_SMALL, hidden_size=1024, vocab_size=32768, canvas_length=256)

PRESETS: dict[str, ModelShape] = {"tiny": TINY, "26b-a4b": GEMMA_26B_A4B, "wide-vocab": WIDE_VOCAB,
                                  "cpu-small": CPU_SMALL, "cpu-medium": CPU_MEDIUM}
EOS_IDS: dict[str, list[int]] = {"tiny": [1, 5], "26b-a4b": [1, 106, 50], "wide-vocab": [1, 106, 50],
                                 "cpu-small": [1, 106, 50], "cpu-medium": [1, 106, 50]}


def preset(name: str, num_layers: int | None = None) -> ModelShape:
    """A preset's shape, optionally cut to its first ``num_layers`` layers (the last one made full attention)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
    shape = PRESETS[name]
    if num_layers is None:
        return shape
    if not isinstance(num_layers, int) or num_layers < 1:
        raise ValueError(f"num_layers must be a positive integer, got {num_layers!r}")
    types = list(shape.layer_types[:num_layers]) + ["sliding_attention"] * max(0, num_layers - shape.num_layers)
    types[-1] = "full_attention"
    return dataclasses.replace(shape, layer_types=tuple(types))


# ------------------------------------------------------------------------------------------------ shapes
@dataclasses.dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    kind: str  # "embed" | "norm" | "scalar" | "dense" | "router" | "expert" | "sc"


def tensor_specs(shape: ModelShape) -> list[TensorSpec]:
    """Every tensor of a checkpoint of this shape, under transformers' names (the tied LM head is not stored)."""
    h, i = shape.hidden_size, shape.intermediate_size
    d = "model.decoder."
    out = [TensorSpec(d + "embed_tokens.weight", (shape.vocab_size, h), "embed"),
           TensorSpec(d + "norm.weight", (h,), "norm"),
           TensorSpec(d + "self_conditioning.pre_norm.weight", (h,), "norm"),
           TensorSpec(d + "self_conditioning.gate_proj.weight", (i, h), "sc"),
           TensorSpec(d + "self_conditioning.up_proj.weight", (i, h), "sc"),
           TensorSpec(d + "self_conditioning.down_proj.weight", (h, i), "sc")]
    for layer, layer_type in enumerate(shape.layer_types):
        out.extend(layer_specs(shape, layer, layer_type))
    return out


def layer_specs(shape: ModelShape, layer: int, layer_type: str) -> list[TensorSpec]:
    h, i, im, e = shape.hidden_size, shape.intermediate_size, shape.moe_intermediate_size, shape.num_experts
    full = layer_type == "full_attention"
    hd = shape.global_head_dim if full else shape.head_dim
    kv = shape.num_global_kv_heads if full else shape.num_kv_heads
    p = f"model.decoder.layers.{layer}."
    specs = [TensorSpec(p + n + ".weight", (h,), "norm") for n in (
        "input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm",
        "post_feedforward_layernorm_1", "post_feedforward_layernorm_2", "pre_feedforward_layernorm_2")]
    specs.append(TensorSpec(p + "layer_scalar", (1,), "scalar"))
    a = p + "self_attn."
    specs.append(TensorSpec(a + "q_proj.weight", (shape.num_heads * hd, h), "dense"))
    specs.append(TensorSpec(a + "k_proj.weight", (kv * hd, h), "dense"))
    if not full:  # full layers take V from k_proj
        specs.append(TensorSpec(a + "v_proj.weight", (kv * hd, h), "dense"))
    specs.append(TensorSpec(a + "o_proj.weight", (h, shape.num_heads * hd), "dense"))
    specs.append(TensorSpec(a + "q_norm.weight", (hd,), "norm"))
    specs.append(TensorSpec(a + "k_norm.weight", (hd,), "norm"))
    specs.append(TensorSpec(p + "mlp.gate_proj.weight", (i, h), "dense"))
    specs.append(TensorSpec(p + "mlp.up_proj.weight", (i, h), "dense"))
    specs.append(TensorSpec(p + "mlp.down_proj.weight", (h, i), "dense"))
    specs.append(TensorSpec(p + "router.proj.weight", (e, h), "router"))
    specs.append(TensorSpec(p + "router.scale", (h,), "norm"))
    specs.append(TensorSpec(p + "router.per_expert_scale", (e,), "norm"))
    specs.append(TensorSpec(p + "experts.gate_up_proj", (e, 2 * im, h), "expert"))
    specs.append(TensorSpec(p + "experts.down_proj", (e, h, im), "expert"))
    return specs


def _format(kind: str, quant: str | None, dense_quant: str | None) -> str:
    if kind == "expert" and quant == "nvfp4":
        return "nvfp4"
    if kind == "dense" and dense_quant in ("nvfp4", "fp8"):
        return dense_quant
    return "f32" if kind in ("norm", "scalar") else "bf16"


def _bytes(spec: TensorSpec, fmt: str) -> int:
    n = int(np.prod(spec.shape))
    rows = n // spec.shape[-1]
    if fmt == "nvfp4":  # packed values, an E4M3 scale per 16, an F32 global per expert (or per tensor)
        return n // 2 + n // nvfp4.GROUP + 4 * (spec.shape[0] if spec.kind == "expert" else 1)
    if fmt == "fp8":  # E4M3 values and an F32 scale per row
        return n + 4 * rows
    return n * (4 if fmt == "f32" else 2)


def weight_bytes(shape: ModelShape, quant: str | None = None, dense_quant: str | None = None) -> dict[str, int]:
    """Bytes of the weights as stored (and as a GPU holds them), per kind of tensor and in total; also
    the parameter count. Arithmetic on the shapes: a plan, not a measurement."""
    out: dict[str, int] = {}
    params = 0
    for spec in tensor_specs(shape):
        out[spec.kind] = out.get(spec.kind, 0) + _bytes(spec, _format(spec.kind, quant, dense_quant))
        params += int(np.prod(spec.shape))
    out["total"] = sum(out.values())
    out["parameters"] = params
    return out


def kv_cache_bytes(shape: ModelShape, context: int, dtype_bytes: int = 2) -> int:
    """K and V of `context` tokens: every token on full layers, the last sliding_window - 1 on sliding ones."""
    total = 0
    for t in shape.layer_types:
        if t == "full_attention":
            total += context * 2 * shape.num_global_kv_heads * shape.global_head_dim * dtype_bytes
        else:
            total += min(context, shape.sliding_window - 1) * 2 * shape.num_kv_heads * shape.head_dim * dtype_bytes
    return total


# ------------------------------------------------------------------------------------------------ writer
class _Draw:
    """Fast random values: slices of one pre-drawn pool (values repeat; speed does not depend on them)."""

    def __init__(self, seed: int):
        self.rng = np.random.default_rng(seed)
        self.pool = self.rng.standard_normal(1 << 22).astype(np.float32)

    def normal(self, shape: tuple[int, ...], std: float, mean: float = 0.0) -> np.ndarray:
        n = int(np.prod(shape))
        start = int(self.rng.integers(0, self.pool.size))
        reps = -(-(start + n) // self.pool.size)
        flat = np.tile(self.pool, reps)[start:start + n] if reps > 1 else self.pool[start:start + n]
        return (mean + std * flat).reshape(shape).astype(np.float32)

    def bytes(self, shape: tuple[int, ...]) -> np.ndarray:
        return self.rng.integers(0, 256, size=shape, dtype=np.uint8)


# E2M1 codes drawn uniformly have an RMS of sqrt(mean(v^2)) over {0, .5, 1, 1.5, 2, 3, 4, 6}.
_E2M1_RMS = float(np.sqrt(np.mean(nvfp4.E2M1_VALUES**2)))


def _random_tensor(draw: _Draw, spec: TensorSpec, fmt: str) -> dict[str, tuple[str, np.ndarray]]:
    shape, k = spec.shape, spec.shape[-1]
    # 1/sqrt(fan_in) keeps activations O(1) through the layers; for the embedding (fan_in = hidden) it
    # also gives O(1) rows after the sqrt(hidden) scaling and O(1) logits from the tied LM head.
    std = k**-0.5
    if fmt == "nvfp4":
        packed = draw.bytes(shape[:-1] + (k // 2,))
        # block scales 0.5 .. 1.875 (E4M3 codes 0x30 .. 0x3F)
        scales = (0x30 + (draw.bytes(shape[:-1] + (k // nvfp4.GROUP,)) & 0x0F)).astype(np.uint8)
        glob = np.float32(std / (_E2M1_RMS * 1.2))
        g = np.full(shape[0] if spec.kind == "expert" else (), glob, dtype=np.float32)
        return {spec.name: ("U8", packed), spec.name + "_scale": ("F8_E4M3", scales), spec.name + "_scale_2": ("F32", g)}
    if fmt == "fp8":
        # sign, exponent 6 or 7, any mantissa: +-[0.5, 2)
        codes = (draw.bytes(shape) & np.uint8(0x8F)) | np.uint8(0x30)
        scale = np.full(shape[:-1], np.float32(std / 1.1), dtype=np.float32)
        return {spec.name: ("F8_E4M3", codes), spec.name + "_scale": ("F32", scale)}
    if spec.kind == "scalar":
        return {spec.name: ("F32", np.ones(shape, np.float32))}
    if spec.kind == "norm":
        return {spec.name: ("F32", draw.normal(shape, 0.1, mean=1.0))}
    return {spec.name: ("BF16", draw.normal(shape, std))}


def random_model_config(shape: ModelShape) -> dict[str, Any]:
    """config.json of a random checkpoint: its matrices are BF16 (as the released model's), so its dtype says
    bfloat16, which is what transformers loads it in by default and what the embedding scale is rounded to."""
    return {**model_config(shape), "dtype": "bfloat16"}


def write_random_checkpoint(out: str | os.PathLike, shape: ModelShape, quant: str | None = None,
                            dense_quant: str | None = None, seed: int = 0, progress: bool = False,
                            eos_ids: list[int] | None = None) -> pathlib.Path:
    """Writes a random checkpoint of ``shape`` into ``out``: BF16 matrices and F32 norms, the MoE experts
    in NVFP4 with ``quant="nvfp4"``, the dense layers in NVFP4 or FP8 with ``dense_quant``. One shard per
    layer plus one for the rest, and model.safetensors.index.json, written last."""
    if quant not in (None, "nvfp4"):
        raise ValueError(f"quant must be None or 'nvfp4', got {quant!r}")
    if dense_quant not in (None, "nvfp4", "fp8"):
        raise ValueError(f"dense_quant must be None, 'nvfp4' or 'fp8', got {dense_quant!r}")
    out = pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    need = weight_bytes(shape, quant, dense_quant)["total"]
    free = shutil.disk_usage(out).free
    if need > free:
        raise ValueError(f"a random checkpoint of this shape takes {need / 1e9:.1f} GB; {out} has {free / 1e9:.1f} GB free")
    cfg = random_model_config(shape)
    if quant or dense_quant:
        cfg["quantization_config"] = {"quant_method": "nvfp4" if quant or dense_quant == "nvfp4" else "fp8",
                                      "group_size": nvfp4.GROUP, "producer": "dgemma_rt.presets (random weights)"}
    gen = generation_config()
    if eos_ids is not None:
        gen["eos_token_id"] = list(eos_ids)
    (out / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2, sort_keys=True) + "\n")

    draw = _Draw(seed)
    groups: list[tuple[str, list[TensorSpec]]] = [("model-rest.safetensors",
                                                   [s for s in tensor_specs(shape) if ".layers." not in s.name])]
    for layer, t in enumerate(shape.layer_types):
        groups.append((f"model-layer{layer:03d}.safetensors", layer_specs(shape, layer, t)))
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(groups), desc="writing random weights", unit="shard")
    weight_map: dict[str, str] = {}
    for fname, specs in groups:
        tensors: dict[str, tuple[str, np.ndarray]] = {}
        for spec in specs:
            tensors.update(_random_tensor(draw, spec, _format(spec.kind, quant, dense_quant)))
        if fname != "model-rest.safetensors":  # the encoder's layer_scalar buffer, saved apart by transformers
            layer = int(fname[len("model-layer"):-len(".safetensors")])
            tensors[f"model.encoder.language_model.layers.{layer}.layer_scalar"] = ("F32", np.ones(1, np.float32))
        nvfp4.write_safetensors(out / fname, tensors, {"format": "pt"})
        weight_map.update({name: fname for name in tensors})
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    index = {"metadata": {"total_size": sum((out / f).stat().st_size for f, _ in groups)}, "weight_map": weight_map}
    tmp = out / "model.safetensors.index.json.tmp"
    tmp.write_text(json.dumps(index, indent=2) + "\n")
    os.replace(tmp, out / "model.safetensors.index.json")
    return out
