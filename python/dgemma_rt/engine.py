"""Python face of the native engine: argument checking, numpy conversion and text helpers."""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from dgemma_rt import _core

_UNSET: Any = object()

# The reference's defaults (DiffusionGemmaGenerationConfig._get_default_generation_params); a
# checkpoint's generation_config.json overrides them, an explicit argument overrides both.
_SAMPLER_DEFAULTS = {
    "max_new_tokens": 256,
    "max_denoising_steps": 48,
    "entropy_bound": 0.1,
    "t_min": 0.4,
    "t_max": 0.8,
    "stability_threshold": 1,
    "confidence_threshold": 0.005,
}


class KVCache:
    """Per-row KV cache of the encoded prefix (the reference's ``past_key_values``).

    Its blocks go back to the engine's pool when the object is dropped.
    """

    def __init__(self, native: Any, engine: "Engine"):
        self._native = native
        self._config = engine.config

    @property
    def batch_size(self) -> int:
        return self._native.batch_size

    @property
    def seq_lengths(self) -> list[int]:
        """Tokens encoded so far, per row (the positions the next tokens start at)."""
        return list(self._native.seq_lengths)

    def layer_kv(self, layer: int, row: int) -> tuple[np.ndarray, np.ndarray]:
        """K and V of one layer and row as ``[num_kv_heads, tokens, head_dim]`` float32 arrays.

        Full-attention layers hold every token; sliding layers the last ``sliding_window - 1``.
        """
        k, v = self._native.layer_kv(layer, row)
        kvh = self._config["num_key_value_heads"][layer]
        hd = self._config["head_dims"][layer]
        shape = (k.shape[0], kvh, hd)
        return k.reshape(shape).transpose(1, 0, 2).copy(), v.reshape(shape).transpose(1, 0, 2).copy()


@dataclass
class GenerateOutput:
    """What ``Engine.generate`` returns."""

    #: prompt + new tokens per row: a 2-D int64 array when rows have equal length, else a list of 1-D arrays
    sequences: np.ndarray | list[np.ndarray]
    #: non-pad new tokens / decoder passes, per row
    tokens_per_forward: np.ndarray
    #: per row, the decoder passes spent on each canvas the row was still generating in
    steps_per_canvas: list[list[int]]
    #: the cache after this call (prompt and every committed canvas except the last)
    past_key_values: KVCache
    #: prefill_s, denoise_s, total_s, decoder_forwards, encoder_forwards
    timings: dict[str, float] = field(default_factory=dict)


def _as_rows(input_ids: Any, vocab_size: int) -> list[list[int]]:
    """Accepts a list of lists (rows may differ in length) or a 2-D integer array."""
    if isinstance(input_ids, np.ndarray):
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be 2-D [batch, tokens], got shape {input_ids.shape}")
        rows = list(input_ids)
    elif hasattr(input_ids, "numpy") and hasattr(input_ids, "ndim"):  # torch tensors, without importing torch
        return _as_rows(input_ids.detach().cpu().numpy() if hasattr(input_ids, "detach") else input_ids.numpy(), vocab_size)
    elif isinstance(input_ids, (list, tuple)):
        if len(input_ids) and all(isinstance(t, (int, np.integer)) for t in input_ids):
            raise ValueError("input_ids must be a batch: a list of lists of token ids (wrap a single prompt in [...])")
        rows = list(input_ids)
    else:
        raise ValueError(f"input_ids must be a list of lists or a 2-D numpy array, got {type(input_ids).__name__}")
    if not rows:
        raise ValueError("input_ids is an empty batch")
    out = []
    for r, row in enumerate(rows):
        arr = np.asarray(row)
        if arr.ndim != 1:
            raise ValueError(f"input_ids row {r} must be a flat sequence of token ids")
        if arr.size == 0:
            raise ValueError(f"input_ids row {r} is empty")
        if arr.dtype.kind not in "iu":
            raise ValueError(f"input_ids row {r} must hold integers, got dtype {arr.dtype}")
        lo, hi = int(arr.min()), int(arr.max())
        if lo < 0 or hi >= vocab_size:
            bad = lo if lo < 0 else hi
            raise ValueError(f"token id {bad} in row {r} is outside the vocabulary [0, {vocab_size})")
        out.append(arr.astype(np.int64).tolist())
    return out


def _check_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    return int(value)


def _check_float(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValueError(f"{name} must be a number, got {value!r}")
    return float(value)


class Engine:
    """A DiffusionGemma model loaded for inference.

    Args:
        path: a Hugging Face DiffusionGemma checkpoint directory.
        device: ``"cpu"`` (the CUDA backend is not implemented yet).
        kv_cache_tokens: size of the full-attention KV pool in tokens, shared by every row and
            every live ``KVCache``.
        max_batch_size: rows whose sliding-window cache fits in the pool at once.
        num_threads: CPU threads (default: all cores, or ``OMP_NUM_THREADS``).
        progress: show a progress bar while loading weights.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        device: str = "cpu",
        kv_cache_tokens: int | None = None,
        max_batch_size: int = 8,
        num_threads: int | None = None,
        progress: bool = False,
    ):
        path = os.fspath(path)
        if device != "cpu":
            raise ValueError(
                f"device {device!r} is not available: dgemma_rt runs on the CPU only for now "
                "(the CUDA backend is work in progress)"
            )
        kv = 16384 if kv_cache_tokens is None else _check_int("kv_cache_tokens", kv_cache_tokens)
        if kv <= 0:
            raise ValueError(f"kv_cache_tokens must be positive, got {kv}")
        mbs = _check_int("max_batch_size", max_batch_size)
        if mbs <= 0:
            raise ValueError(f"max_batch_size must be positive, got {mbs}")
        threads = 0 if num_threads is None else _check_int("num_threads", num_threads)
        if threads < 0:
            raise ValueError(f"num_threads must be >= 0, got {threads}")

        bar = None
        callback = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(desc="loading weights", unit="tensor", leave=False)

            def callback(done: int, total: int) -> None:
                bar.total = total
                bar.n = done
                bar.refresh()

        try:
            self._native = _core.Engine(path, device, kv, mbs, threads, callback)
        finally:
            if bar is not None:
                bar.close()
        self.path = path
        self.device = device
        self.config: dict[str, Any] = self._native.config
        self.generation_defaults: dict[str, Any] = self._native.generation_defaults
        self._tokenizer = _UNSET
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ introspection
    @property
    def num_parameters(self) -> int:
        return self._native.num_parameters

    def kv_pool_stats(self) -> dict[str, int]:
        return dict(self._native.kv_pool_stats())

    @property
    def tokenizer(self):
        """The checkpoint's tokenizer (``tokenizer.json``), or None."""
        if self._tokenizer is _UNSET:
            from dgemma_rt.text import Tokenizer

            self._tokenizer = Tokenizer.from_dir(self.path)
        return self._tokenizer

    # ------------------------------------------------------------------ low level
    def encode(self, input_ids: Any, past_key_values: KVCache | None = None) -> KVCache:
        """Runs the encoder over ``input_ids`` (appending to ``past_key_values`` if given)."""
        rows = _as_rows(input_ids, self.config["vocab_size"])
        native = None if past_key_values is None else past_key_values._native
        if native is not None and native.batch_size != len(rows):
            raise ValueError(f"past_key_values has {native.batch_size} rows but input_ids has {len(rows)}")
        cache = self._native.encode(rows, native)
        return past_key_values if past_key_values is not None else KVCache(cache, self)

    def denoise_logits(
        self, state: KVCache, canvas_ids: Any, self_conditioning_logits: np.ndarray | None = None
    ) -> np.ndarray:
        """One decoder pass: soft-capped float32 logits ``[batch, n, vocab]`` for ``canvas_ids``."""
        if not isinstance(state, KVCache):
            raise ValueError("state must be the KVCache returned by encode()")
        canvas = np.asarray(canvas_ids)
        if canvas.ndim != 2 or canvas.dtype.kind not in "iu":
            raise ValueError(f"canvas_ids must be a 2-D integer array [batch, n], got {canvas.dtype} {canvas.shape}")
        if canvas.size and (canvas.min() < 0 or canvas.max() >= self.config["vocab_size"]):
            raise ValueError(f"canvas_ids must lie in [0, {self.config['vocab_size']})")
        sc = None
        if self_conditioning_logits is not None:
            sc = np.ascontiguousarray(self_conditioning_logits, dtype=np.float32)
        return self._native.denoise_logits(state._native, canvas.astype(np.int32), sc)

    # ------------------------------------------------------------------ generation
    def generate(
        self,
        input_ids: Any,
        max_new_tokens: int = _UNSET,
        max_denoising_steps: int = _UNSET,
        entropy_bound: float = _UNSET,
        t_min: float = _UNSET,
        t_max: float = _UNSET,
        stability_threshold: int = _UNSET,
        confidence_threshold: float = _UNSET,
        eos_token_id: int | Sequence[int] | None = _UNSET,
        pad_token_id: int | None = _UNSET,
        seed: int = 0,
        on_step: Callable[[np.ndarray], None] | None = None,
        on_block: Callable[[np.ndarray], None] | None = None,
        noise: Callable[[str, tuple[int, int]], Any] | None = None,
        past_key_values: KVCache | None = None,
        adaptive_stopping: bool = True,
    ) -> GenerateOutput:
        """Block-diffusion generation, token for token what transformers' ``generate`` computes.

        ``input_ids`` are the tokens not yet in ``past_key_values``. New tokens come in whole
        canvases of ``canvas_length``; after the first EOS of a row its tokens become
        ``pad_token_id``. ``eos_token_id`` / ``pad_token_id`` default to the checkpoint's
        generation config. ``adaptive_stopping=False`` runs every canvas for exactly
        ``max_denoising_steps`` steps (for benchmarks).
        """
        rows = _as_rows(input_ids, self.config["vocab_size"])
        g = self.generation_defaults

        def pick(name: str, value: Any) -> Any:
            if value is not _UNSET:
                return value
            return g.get(name) if g.get(name) is not None else _SAMPLER_DEFAULTS[name]

        params = {
            "max_new_tokens": _check_int("max_new_tokens", pick("max_new_tokens", max_new_tokens)),
            "max_denoising_steps": _check_int("max_denoising_steps", pick("max_denoising_steps", max_denoising_steps)),
            "entropy_bound": _check_float("entropy_bound", pick("entropy_bound", entropy_bound)),
            "t_min": _check_float("t_min", pick("t_min", t_min)),
            "t_max": _check_float("t_max", pick("t_max", t_max)),
            "stability_threshold": _check_int("stability_threshold", pick("stability_threshold", stability_threshold)),
            "confidence_threshold": _check_float(
                "confidence_threshold", pick("confidence_threshold", confidence_threshold)
            ),
            "seed": _check_int("seed", seed),
            "adaptive_stopping": bool(adaptive_stopping),
        }
        if params["seed"] < 0 or params["seed"] >= 2**64:
            raise ValueError(f"seed must be in [0, 2**64), got {seed}")
        eos = g.get("eos_token_id") if eos_token_id is _UNSET else eos_token_id
        if eos is None:
            eos = []
        elif isinstance(eos, (int, np.integer)):
            eos = [int(eos)]
        params["eos_token_id"] = [_check_int("eos_token_id", e) for e in eos]
        pad = g.get("pad_token_id") if pad_token_id is _UNSET else pad_token_id
        params["pad_token_id"] = None if pad is None else _check_int("pad_token_id", pad)
        for name, fn in (("on_step", on_step), ("on_block", on_block), ("noise", noise)):
            if fn is not None and not callable(fn):
                raise ValueError(f"{name} must be callable")
        native_cache = None
        if past_key_values is not None:
            if not isinstance(past_key_values, KVCache):
                raise ValueError("past_key_values must be a KVCache from an earlier generate() or encode()")
            if past_key_values.batch_size != len(rows):
                raise ValueError(f"past_key_values has {past_key_values.batch_size} rows but input_ids has {len(rows)}")
            native_cache = past_key_values._native

        res = self._native.generate(rows, params, noise, on_step, on_block, native_cache)
        seqs = [np.asarray(p + n, dtype=np.int64) for p, n in zip(rows, res["new_tokens"])]
        sequences: np.ndarray | list[np.ndarray] = seqs
        if len({len(s) for s in seqs}) == 1:
            sequences = np.stack(seqs)
        cache = past_key_values if past_key_values is not None else KVCache(res["past_key_values"], self)
        return GenerateOutput(
            sequences=sequences,
            tokens_per_forward=np.asarray(res["tokens_per_forward"], dtype=np.float64),
            steps_per_canvas=[list(s) for s in res["steps_per_canvas"]],
            past_key_values=cache,
            timings=dict(res["timings"]),
        )

    def generate_text(self, prompt: str | list[dict] | list[str] | list[list[dict]], **kwargs: Any) -> str | list[str]:
        """Text in, text out: a string, a chat (list of {"role", "content"} dicts), or a list of either.

        Chats go through the checkpoint's chat template. Returns the new text up to the first EOS.
        """
        tok = self.tokenizer
        if tok is None:
            raise ValueError(f"{self.path} has no tokenizer.json: pass token ids to generate() instead")
        single = isinstance(prompt, str) or (
            isinstance(prompt, list) and prompt and isinstance(prompt[0], dict)
        )
        prompts = [prompt] if single else list(prompt)
        if not prompts:
            raise ValueError("no prompt given")
        ids = [tok.apply_chat_template(p) if isinstance(p, list) else tok.encode(p) for p in prompts]
        out = self.generate(ids, **kwargs)
        eos = kwargs.get("eos_token_id", self.generation_defaults.get("eos_token_id")) or []
        eos = {eos} if isinstance(eos, int) else set(eos)
        pad = kwargs.get("pad_token_id", self.generation_defaults.get("pad_token_id"))
        texts = []
        for p, seq in zip(ids, out.sequences):
            new = []
            for t in list(seq[len(p):]):
                if t in eos or (pad is not None and t == pad):
                    break
                new.append(int(t))
            texts.append(tok.decode(new))
        return texts[0] if single else texts
