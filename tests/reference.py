"""Reference side of the parity tests: tiny random DiffusionGemma checkpoints and the transformers 5.23.0
implementation driven with the same keyed noise as the engine.

torch and transformers are imported lazily so that this module can be imported (and the tests skipped)
without them.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from dataclasses import dataclass, field
from typing import Any
from unittest import mock

import numpy as np

# 5 sliding + 1 full layer, window 8, canvas 16.
BASE_TEXT_CONFIG = dict(
    vocab_size=512,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=6,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    global_head_dim=32,
    num_global_key_value_heads=1,
    sliding_window=8,
    num_experts=8,
    top_k_experts=2,
    moe_intermediate_size=24,
    max_position_embeddings=4096,
)

# The vision tower is never run by the tests; keep it (and its position table) small.
VISION_CONFIG = dict(
    model_type="gemma4_vision",
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=1,
    num_attention_heads=2,
    num_key_value_heads=2,
    head_dim=16,
    position_embedding_size=64,
)


def build_config(*, canvas_length=16, image_token_id=None, **text_overrides):
    from transformers import DiffusionGemmaConfig

    text_config = {**BASE_TEXT_CONFIG, **text_overrides}
    cfg = DiffusionGemmaConfig(text_config=text_config, vision_config=dict(VISION_CONFIG), canvas_length=canvas_length)
    if image_token_id is not None:
        cfg.image_token_id = image_token_id
    return cfg


def _randomize_(
    model,
    seed: int,
    weight_std: float,
    embed_std: float,
    quiet_tokens=(),
    post_norm_scale=1.0,
    qk_norm_scale=1.0,
    router_std=None,
) -> None:
    """Gives every parameter and persistent buffer a random value.

    Norm weights are used as is by the RMSNorm (no `1 +`), so they are drawn around 1. The encoder's `layer_scalar`
    buffers are not tied to the decoder's and get their own values, which catches an engine that reads the wrong ones.
    `post_norm_scale` shrinks the sublayers' post norms so the canvas tokens keep some weight in the residual stream:
    with it, the argmax canvas can settle and the stable-and-confident stopping triggers under some settings.
    `qk_norm_scale` shrinks q/k norm weights: with softmax scaling 1.0, full-size ones make attention so sharp that
    float32 rounding grows to ~3e-4 in the logits; at 0.5 the float32 reference stays within ~4e-5 of float64, which
    leaves room for a 1e-4 tolerance and keeps near-ties (token flips between two correct engines) rare.
    `router_std` spreads the router logits: at the default init the top-k choice is nearly a coin toss (top-2 vs
    third logits within 1e-5 on ~1 routing in 6000), so float32 noise flips experts and the logits jump by O(10).
    `quiet_tokens` get near-zero embedding rows: their logit stays near 0, so they are never the argmax and the
    checkpoint's default EOS/pad ids never end a generation by chance.
    """
    import torch

    gen = torch.Generator().manual_seed(seed)

    def randn(shape):
        return torch.randn(shape, generator=gen, dtype=torch.float32)

    def rand(shape):
        return torch.rand(shape, generator=gen, dtype=torch.float32)

    persistent = set(model.state_dict().keys())
    with torch.no_grad():
        for name, p in model.named_parameters():  # tied parameters are listed once
            if name.endswith("norm.weight"):
                value = 1.0 + 0.2 * randn(p.shape)
                if ".post_" in name and "vision" not in name:
                    value *= post_norm_scale
                if ("q_norm" in name or "k_norm" in name) and "vision" not in name:
                    value *= qk_norm_scale
            elif name.endswith("router.scale") or name.endswith("per_expert_scale"):
                value = 0.5 + rand(p.shape)
            elif name.endswith("router.proj.weight") and router_std is not None:
                value = router_std * randn(p.shape)
            elif name.endswith("embed_tokens.weight"):
                value = embed_std * randn(p.shape)
                value[list(quiet_tokens)] *= 0.01
            else:
                value = weight_std * randn(p.shape)
            p.copy_(value.to(p.dtype))
        for name, b in model.named_buffers():
            if name not in persistent:
                continue  # rotary tables and embed_scale are derived from the config
            if name.endswith("layer_scalar"):
                b.copy_((0.5 + rand(b.shape)).to(b.dtype))
            elif "vision_tower" in name or "embed_vision" in name:
                continue  # clipping bounds and standardisation buffers of the unused vision tower
            else:
                raise AssertionError(f"unexpected persistent buffer {name}: decide how to randomize it")


def write_generation_config(path, *, eos_token_id="keep", pad_token_id="keep") -> None:
    """Writes generation_config.json with only the special tokens ("keep" leaves a field as is, None drops it)."""
    gc_path = os.path.join(path, "generation_config.json")
    data = {}
    if os.path.exists(gc_path):
        with open(gc_path) as f:
            kept = ("eos_token_id", "pad_token_id", "transformers_version")
            data = {k: v for k, v in json.load(f).items() if k in kept}
    for key, value in (("eos_token_id", eos_token_id), ("pad_token_id", pad_token_id)):
        if value is None:
            data.pop(key, None)
        elif value != "keep":
            data[key] = value
    with open(gc_path, "w") as f:
        json.dump(data, f, indent=2)


def make_reference_checkpoint(
    path,
    *,
    seed: int,
    dtype=None,
    max_shard_size=None,
    canvas_length: int = 16,
    image_token_id=None,
    eos_token_id=(1,),
    pad_token_id=0,
    weight_std: float = 0.15,
    embed_std: float = 1.0,
    quiet_tokens=(0, 1),
    post_norm_scale: float = 0.5,
    qk_norm_scale: float = 0.5,
    router_std: float = 4.0,
    **text_overrides,
):
    """Builds a random tiny DiffusionGemma, saves it under `path` and returns the reloaded float32 reference model.

    `dtype` is the storage dtype (default float32); `max_shard_size` (e.g. "200KB") writes a sharded checkpoint with
    model.safetensors.index.json. `eos_token_id`/`pad_token_id` go to generation_config.json (None leaves them out).
    """
    import torch
    from transformers import DiffusionGemmaForBlockDiffusion

    cfg = build_config(canvas_length=canvas_length, image_token_id=image_token_id, **text_overrides)
    torch.manual_seed(seed)
    model = DiffusionGemmaForBlockDiffusion(cfg).eval()
    _randomize_(model, seed, weight_std, embed_std, quiet_tokens, post_norm_scale, qk_norm_scale, router_std)
    if dtype is not None:
        model = model.to(dtype)
    save_kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(str(path), **save_kwargs)
    write_generation_config(
        path,
        eos_token_id=list(eos_token_id) if eos_token_id is not None else None,
        pad_token_id=pad_token_id,
    )
    return load_reference(path)


def load_reference(path):
    """The reference model in float32 (bf16 weights are upcast), eager attention, eval mode.

    The embedding scale keeps the checkpoint's dtype: transformers run on a bf16 checkpoint as it loads by default
    (dtype "auto": config.json's) scales the embeddings by `embed_scale.to(weight.dtype)`, i.e. bf16(sqrt(H)), and
    that rounding is part of what the model computes (the engine does the same: ModelWeights::embed_scale). A
    float32 upcast alone would use the unrounded sqrt(H); everything else is computed in float32.
    """
    import torch
    from transformers import DiffusionGemmaForBlockDiffusion

    model = DiffusionGemmaForBlockDiffusion.from_pretrained(
        str(path), dtype=torch.float32, attn_implementation="eager", experts_implementation="eager"
    )
    # sdpa crashes in the encoder on CPU in 5.23.0
    model.config._attn_implementation = "eager"
    model.config.text_config._attn_implementation = "eager"
    with open(os.path.join(str(path), "config.json")) as f:
        stored = getattr(torch, json.load(f).get("dtype") or "float32")
    with torch.no_grad():
        for module in model.modules():
            if isinstance(getattr(module, "embed_scale", None), torch.Tensor):
                module.embed_scale.copy_(module.embed_scale.to(stored).float())
    return model.eval()


class KeyedNoise:
    """Noise source shared by the engine and the reference (the `noise=` protocol of dgemma_rt.Engine.generate).

    Values depend only on (seed, canvas index, step index, kind, row, canvas width), never on how many calls came
    before, so an engine that skips work the reference does (dead rows, early exits) still sees the same values.
    The canvas index advances on a "canvas" call not directly preceded by a "uniform" call (a new canvas); each
    "uniform" call advances the step index; the "canvas" call after it (renoising) shares its step.

    Each row has its own stream (`row_offset + row`), so row r of a batch gets the same values as a batch-1 run made
    with `KeyedNoise(seed, vocab, row_offset=r)`: this lets ragged batches be checked row by row.
    """

    def __init__(self, seed: int, vocab_size: int, row_offset: int = 0):
        self.seed = int(seed)
        self.vocab_size = int(vocab_size)
        self.row_offset = int(row_offset)
        self.canvas = -1
        self.step = 0
        self._last_kind = None
        self.log: list[tuple[str, int, int, tuple[int, ...]]] = []

    def _rng(self, kind: str, row: int, width: int) -> np.random.Generator:
        key = f"{self.seed}/{self.canvas}/{self.step}/{kind}/{row}/{width}".encode()
        return np.random.Generator(np.random.PCG64(int.from_bytes(hashlib.sha256(key).digest()[:16], "little")))

    def __call__(self, kind: str, shape) -> np.ndarray:
        shape = tuple(int(s) for s in shape)
        if len(shape) != 2:
            raise ValueError(f"noise shape must be (batch, canvas_length), got {shape}")
        if kind == "canvas":
            if self._last_kind != "uniform":
                self.canvas += 1
                self.step = 0
        elif kind == "uniform":
            self.step += 1
        else:
            raise ValueError(f"unknown noise kind {kind!r}")
        self._last_kind = kind
        self.log.append((kind, self.canvas, self.step, shape))
        batch, width = shape
        rows = []
        for r in range(batch):
            rng = self._rng(kind, self.row_offset + r, width)
            if kind == "canvas":
                rows.append(rng.integers(0, self.vocab_size, size=width, dtype=np.int64))
            else:
                rows.append(rng.random(width, dtype=np.float64))
        return np.stack(rows) if rows else np.zeros(shape, np.int64 if kind == "canvas" else np.float64)


def inverse_cdf_sample(probs, u):
    """First index i with cumsum_double(probs)[i] > u * total, per row (the noise protocol's sampling rule)."""
    import torch

    cdf = probs.double().cumsum(-1)
    target = u.to(torch.float64).unsqueeze(-1) * cdf[:, -1:]
    idx = torch.searchsorted(cdf, target, right=True)
    return idx.clamp_(max=probs.shape[-1] - 1)


@dataclass
class ReferenceStep:
    argmax: np.ndarray  # [batch, canvas] the argmax canvas after the step (frozen rows keep theirs)
    live: np.ndarray  # [batch] bool: the row's decoder pass counts (not stopped, not finished)
    accepted: np.ndarray | None  # [batch, canvas] bool: the entropy-bound acceptance mask of this step
    stopped: np.ndarray  # [batch] bool: finished denoising after this step


@dataclass
class ReferenceRun:
    sequences: np.ndarray  # [batch, uncached prompt + new] int64
    tokens_per_forward: np.ndarray  # [batch] float64
    past_key_values: Any  # the reference DynamicCache, mutated in place by a later turn
    canvases: list[list[ReferenceStep]] = field(default_factory=list)  # per canvas, per step
    finished_before: list[np.ndarray] = field(default_factory=list)  # per canvas: rows finished in earlier canvases

    @property
    def steps_per_canvas(self) -> list[list[int]]:
        """Per row, per canvas: decoder passes counted by the reference (0 for rows finished earlier)."""
        batch = self.sequences.shape[0]
        return [[int(sum(s.live[r] for s in steps)) for steps in self.canvases] for r in range(batch)]

    def blocks(self, prompt_len: int, canvas_length: int) -> list[np.ndarray]:
        new = self.sequences[:, prompt_len:]
        return [new[:, i : i + canvas_length] for i in range(0, new.shape[1], canvas_length)]


def _to_tensor_ids(input_ids):
    import torch

    arr = np.asarray(input_ids, dtype=np.int64)
    if arr.ndim != 2:
        raise ValueError("the reference takes a rectangular [batch, seq] prompt")
    return torch.from_numpy(arr)


def reference_kwargs(**engine_kwargs) -> dict:
    """Maps dgemma_rt.Engine.generate keyword arguments onto transformers' generate arguments."""
    from transformers.models.diffusion_gemma.generation_diffusion_gemma import EntropyBoundSamplerConfig

    kw = dict(engine_kwargs)
    if "entropy_bound" in kw:
        kw["sampler_config"] = EntropyBoundSamplerConfig(entropy_bound=float(kw.pop("entropy_bound")))
    for name in ("t_min", "t_max", "confidence_threshold"):
        if name in kw and kw[name] is not None:
            kw[name] = float(kw[name])
    if not kw.pop("adaptive_stopping", True):
        kw["stability_threshold"] = None
        kw["confidence_threshold"] = None
    return kw


class EngineLogits:
    """Decoder logits from a dgemma_rt engine, its KV cache kept in step with the reference encoder's calls.

    Given to `reference_generate`, it makes a hybrid: transformers' generation loop on the engine's logits. Both sides
    then decide from the same numbers, so the comparison checks the engine's loop exactly, free of the near-ties that
    float32 rounding differences in the logits can flip. That holds while the engine's sampler arithmetic matches the
    reference's bit for bit: a temperature off by one ulp (e.g. `t_min + dt * ratio` contracted to an FMA) perturbs
    the self-conditioning input, and a long run can then drift apart at a near-tie. The entropies are the one place
    where it does not: the engine sums them in float64 (torch in float32, an ulp apart in most rows) and orders ties
    with a stable sort (torch.sort does not promise one), so two positions of exactly or nearly equal entropy astride
    the bound can flip. That needs identical logits at two positions; a model with position information does not
    give them (a fuzz found it only in configs whose RoPE rotates nothing).
    """

    def __init__(self, engine, state=None):
        self.engine = engine
        self.state = state

    def encode(self, input_ids: np.ndarray) -> None:
        self.state = self.engine.encode(input_ids, past_key_values=self.state)

    def logits(self, canvas: np.ndarray, self_conditioning_logits) -> np.ndarray:
        out = self.engine.denoise_logits(self.state, canvas, self_conditioning_logits=self_conditioning_logits)
        return np.asarray(out)


class ModelLogits:
    """Decoder logits from another reference model (e.g. `double_reference`), rounded to float32, plus optional
    Gaussian noise: used to check that a generation case has no near-ties at the float32 noise level."""

    def __init__(self, model, noise_std: float = 0.0, seed: int = 0):
        self.model = model
        self.cache = None
        self.noise_std = noise_std
        self.rng = np.random.default_rng(seed)

    def encode(self, input_ids: np.ndarray) -> None:
        self.cache = reference_encoder_kv(self.model, input_ids, cache=self.cache)

    def logits(self, canvas: np.ndarray, self_conditioning_logits) -> np.ndarray:
        out = reference_decoder_logits(self.model, self.cache, canvas, self_conditioning_logits).astype(np.float32)
        if self.noise_std:
            out += self.rng.normal(0.0, self.noise_std, size=out.shape).astype(np.float32)
        return out


def reference_generate(model, input_ids, noise, *, logits_source=None, **gen_kwargs) -> ReferenceRun:
    """Runs `model.generate` with `noise` in place of torch's RNG and records what happens at each step.

    `gen_kwargs` use the engine's names (entropy_bound, adaptive_stopping, ...); see `reference_kwargs`.
    With `logits_source` (EngineLogits, ModelLogits) the decoder's logits come from it instead of `model`; the
    reference encoder still runs, and the source is told every token it encodes.
    """
    import types

    import torch
    from transformers.models.diffusion_gemma import generation_diffusion_gemma as gdg

    canvas_length = model.config.canvas_length
    ids = _to_tensor_ids(input_ids)
    kwargs = reference_kwargs(**gen_kwargs)
    run_canvases: list[list[ReferenceStep]] = []
    finished_before: list[np.ndarray] = []
    state = {"finished": torch.zeros(ids.shape[0], dtype=torch.bool), "accepted": None}

    def initialize_canvas(self, batch_size, device):
        values = noise("canvas", (batch_size, self.canvas_length))
        return torch.from_numpy(np.ascontiguousarray(values, dtype=np.int64)).to(device)

    def multinomial(probs, num_samples, *args, **kw):
        assert num_samples == 1 and not args and not kw, "unexpected torch.multinomial call"
        rows = probs.shape[0]
        u = noise("uniform", (rows // canvas_length, canvas_length)).reshape(-1)
        return inverse_cdf_sample(probs, torch.from_numpy(np.asarray(u, dtype=np.float64))).view(rows, 1)

    orig_accept = gdg.EntropyBoundSampler.accept_canvas

    def accept_canvas(self, *args, **kw):
        out = orig_accept(self, *args, **kw)
        state["accepted"] = self.accepted_token_mask.clone()
        return out

    orig_prepare = model._prepare_denoiser_inputs
    orig_step = model._denoising_step
    orig_finalize = model._finalize_canvas

    def prepare_denoiser_inputs(*args, **kw):
        run_canvases.append([])
        finished_before.append(state["finished"].numpy().copy())
        return orig_prepare(*args, **kw)

    def denoising_step(*args, **kw):
        live = ~(kw["finished_denoising"].clone() | state["finished"])
        state["accepted"] = None
        out = orig_step(*args, **kw)
        _, argmax_canvas, _, finished_denoising = out
        accepted = state["accepted"]
        run_canvases[-1].append(
            ReferenceStep(
                argmax=argmax_canvas.numpy().copy(),
                live=live.numpy().copy(),
                accepted=None if accepted is None else accepted.numpy().copy(),
                stopped=finished_denoising.numpy().copy(),
            )
        )
        return out

    def finalize_canvas(*args, **kw):
        input_ids, finished = orig_finalize(*args, **kw)
        state["finished"] = finished.clone()
        return input_ids, finished

    with contextlib.ExitStack() as stack:
        stack.enter_context(mock.patch.object(gdg.EntropyBoundSampler, "initialize_canvas", initialize_canvas))
        stack.enter_context(mock.patch.object(gdg.EntropyBoundSampler, "accept_canvas", accept_canvas))
        stack.enter_context(mock.patch.object(gdg.torch, "multinomial", multinomial))
        stack.enter_context(mock.patch.object(model, "_prepare_denoiser_inputs", prepare_denoiser_inputs))
        stack.enter_context(mock.patch.object(model, "_denoising_step", denoising_step))
        stack.enter_context(mock.patch.object(model, "_finalize_canvas", finalize_canvas))
        if logits_source is not None:
            encoder = model.model.encoder
            orig_encoder_forward = encoder.forward
            orig_forward = model.forward
            busy = []  # the source may run this very model (ModelLogits with noise): let it through unpatched

            def encoder_forward(*args, **kw):
                out = orig_encoder_forward(*args, **kw)
                if not busy:
                    busy.append(1)
                    try:
                        logits_source.encode(kw["input_ids"].numpy())
                    finally:
                        busy.pop()
                return out

            def decoder_forward(*args, decoder_input_ids=None, self_conditioning_logits=None, **kw):
                if busy:
                    kw.update(decoder_input_ids=decoder_input_ids, self_conditioning_logits=self_conditioning_logits)
                    return orig_forward(*args, **kw)
                busy.append(1)
                try:
                    scl = None if self_conditioning_logits is None else self_conditioning_logits.float().numpy()
                    logits = logits_source.logits(decoder_input_ids.numpy(), scl)
                finally:
                    busy.pop()
                return types.SimpleNamespace(logits=torch.from_numpy(np.ascontiguousarray(logits, dtype=np.float32)))

            stack.enter_context(mock.patch.object(encoder, "forward", encoder_forward))
            stack.enter_context(mock.patch.object(model, "forward", decoder_forward))
        out = model.generate(ids, **kwargs)

    return ReferenceRun(
        sequences=out.sequences.numpy().astype(np.int64),
        tokens_per_forward=out.tokens_per_forward.numpy().astype(np.float64),
        past_key_values=out.past_key_values,
        canvases=run_canvases,
        finished_before=finished_before,
    )


def new_reference_cache(model):
    from transformers import DynamicCache

    return DynamicCache(config=model.config.get_text_config(decoder=True))


def reference_encoder_kv(model, input_ids, cache=None):
    """Encodes `input_ids` (the uncached tokens) into `cache` (a new DynamicCache by default) and returns it."""
    import torch

    ids = _to_tensor_ids(input_ids)
    if cache is None:
        cache = new_reference_cache(model)
    start = cache.get_seq_length()
    position_ids = torch.arange(start, start + ids.shape[1], dtype=torch.int32).unsqueeze(0)
    with torch.no_grad():
        model.model.encoder(input_ids=ids, past_key_values=cache, position_ids=position_ids)
    return cache


def cache_layer_kv(cache, layer: int, row: int) -> tuple[np.ndarray, np.ndarray]:
    """(K, V) of one row of a reference cache layer, float32 [num_kv_heads, n_retained, head_dim]."""
    lay = cache.layers[layer]
    return lay.keys[row].float().numpy().copy(), lay.values[row].float().numpy().copy()


def reference_decoder_logits(model, cache, canvas_ids, self_conditioning_logits=None) -> np.ndarray:
    """The decoder's soft-capped logits [batch, n, vocab] for `canvas_ids` after the cached prefix.

    float32 (float64 for a `double_reference` model). The decoder only reads the cache. `self_conditioning_logits`
    are the previous step's processed logits (the decoder applies the softmax itself).
    """
    import torch

    dtype = next(model.parameters()).dtype
    canvas = _to_tensor_ids(canvas_ids)
    start = cache.get_seq_length()
    position_ids = torch.arange(start, start + canvas.shape[1], dtype=torch.int32).unsqueeze(0)
    scl = None
    if self_conditioning_logits is not None:
        scl = torch.from_numpy(np.asarray(self_conditioning_logits, dtype=np.float32)).to(dtype)
    with torch.no_grad():
        out = model(
            input_ids=None,
            past_key_values=cache,
            decoder_input_ids=canvas,
            decoder_position_ids=position_ids,
            self_conditioning_logits=scl,
        )
    return out.logits.to(torch.float64 if dtype == torch.float64 else torch.float32).numpy().copy()


def make_prompt(seed: int, batch: int, length: int, vocab_size: int) -> np.ndarray:
    """Random prompt ids >= 8: 0 and 1 are the fixtures' quiet pad/EOS ids, 7 the image token of the image fixture."""
    return np.random.default_rng(seed).integers(8, vocab_size, size=(batch, length)).astype(np.int64)


def double_reference(model):
    """A float64 copy of a reference model, to measure how far float32 rounding alone moves its outputs."""
    import copy

    return copy.deepcopy(model).double().eval()


# ----------------------------------------------------------------------------------------------------------------
# checkpoint file surgery, for the loader tests


def copy_checkpoint(src: str, dst: str) -> str:
    import shutil

    shutil.copytree(src, dst)
    return dst


def edit_json(path: str, fn) -> None:
    """Rewrites a JSON file with `fn(data)` (which may edit in place and return None)."""
    with open(path) as f:
        data = json.load(f)
    result = fn(data)
    with open(path, "w") as f:
        json.dump(data if result is None else result, f, indent=2)


def read_safetensors_raw(path: str) -> tuple[dict, bytes]:
    """(header, data) of a safetensors file; data_offsets in the header are relative to `data`."""
    import struct

    with open(path, "rb") as f:
        raw = f.read()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def write_safetensors_raw(path: str, header: dict, data: bytes, *, header_len: int | None = None) -> None:
    """Writes a safetensors file as given, valid or not; `header_len` overrides the length field."""
    import struct

    blob = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob) if header_len is None else header_len))
        f.write(blob)
        f.write(data)


def resave_safetensors(path: str, fn) -> None:
    """Loads every tensor of a (float32) safetensors file, applies `fn(dict)` and saves it back validly."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(path)
    fn(tensors)
    save_file({k: v.contiguous() for k, v in tensors.items()}, path, metadata={"format": "pt"})


# ----------------------------------------------------------------------------------------------------------------
# comparisons shared by the tests

KV_ATOL = 1e-4
LOGITS_ATOL = 1e-4


def assert_cache_matches(engine_cache, ref_cache, num_layers, rows):
    assert list(engine_cache.seq_lengths) == [ref_cache.get_seq_length()] * rows
    for layer in range(num_layers):
        for row in range(rows):
            k, v = engine_cache.layer_kv(layer, row)
            k_ref, v_ref = cache_layer_kv(ref_cache, layer, row)
            for name, got, want in (("K", k, k_ref), ("V", v, v_ref)):
                got = np.asarray(got)
                assert got.dtype == np.float32, f"layer {layer} {name}: dtype {got.dtype}"
                assert got.shape == want.shape, f"layer {layer} row {row} {name}: shape {got.shape} != {want.shape}"
                err = float(np.max(np.abs(got - want))) if got.size else 0.0
                assert err <= KV_ATOL, f"layer {layer} row {row} {name}: max abs diff {err:.3g}"


def reference_logits(ckpt, ids, canvas, self_conditioning_logits=None):
    """(float32, float64) reference logits of `canvas` after the prompt `ids`."""
    return tuple(
        reference_decoder_logits(model, reference_encoder_kv(model, ids), canvas, self_conditioning_logits)
        for model in (ckpt.model, ckpt.model64)
    )


def assert_logits_close(got, want32, want64, what=""):
    """Within 1e-4 of the float64 reference, plus twice what float32 rounding alone costs the reference."""
    got = np.asarray(got)
    assert got.dtype == np.float32, f"{what}: dtype {got.dtype}"
    assert got.shape == want64.shape, f"{what}: shape {got.shape} != {want64.shape}"
    ref_noise = float(np.max(np.abs(want32 - want64)))
    err = float(np.max(np.abs(got - want64)))
    tol = LOGITS_ATOL + 2 * ref_noise
    assert err <= tol, (
        f"{what}: max abs diff to the float64 reference {err:.3g} > {tol:.3g} "
        f"(float32 reference: {ref_noise:.3g}; engine vs float32 reference: {np.max(np.abs(got - want32)):.3g})"
    )


def near_tie_free(model, model64, input_ids, noise_seed, *, noise_std=1.5e-5, draws=4, **gen_kwargs) -> bool:
    """Whether a reference generation survives logit changes of the size float32 rounding makes.

    Re-runs it on float64 logits and on logits with Gaussian noise (`noise_std`, about twice the spread measured
    between two correct float32 implementations of the tiny models); a case whose run changes has a near-tie in some
    argmax, sample or entropy-bound decision, and an exact comparison on it would fail for a correct engine. The
    run includes every step's argmax draft of the live rows, which the tests compare too (an intermediate draft can
    flip on a near-tie without changing the output).
    """
    vocab = model.config.text_config.vocab_size
    base = reference_generate(model, input_ids, KeyedNoise(noise_seed, vocab), **gen_kwargs)
    sources = [ModelLogits(model64)] + [ModelLogits(model, noise_std, seed) for seed in range(1, draws + 1)]
    for source in sources:
        run = reference_generate(model, input_ids, KeyedNoise(noise_seed, vocab), logits_source=source, **gen_kwargs)
        if not np.array_equal(run.sequences, base.sequences) or run.steps_per_canvas != base.steps_per_canvas:
            return False
        if not _same_drafts(run, base):
            return False
    return True


def _same_drafts(a: ReferenceRun, b: ReferenceRun) -> bool:
    if len(a.canvases) != len(b.canvases):
        return False
    for steps_a, steps_b in zip(a.canvases, b.canvases):
        if len(steps_a) != len(steps_b):
            return False
        for sa, sb in zip(steps_a, steps_b):
            live = sa.live & sb.live
            if not np.array_equal(sa.live, sb.live) or not np.array_equal(sa.argmax[live], sb.argmax[live]):
                return False
    return True
