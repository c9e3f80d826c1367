"""Python face of the native engine: argument checking, numpy conversion and text helpers."""

from __future__ import annotations

import atexit
import math
import os
import queue
import threading
import time
import weakref
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from dgemma_rt import _core
from dgemma_rt.text import is_chat

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


#: The mask value of a canvas template: a free position, generated as usual.
FREE = -1


def _as_template(template: Any, rows: int, vocab: int, max_new_tokens: int) -> list[list[int]]:
    """A canvas template as one list per row (empty: no template for that row); [] for none."""
    if template is None:
        return []
    if isinstance(template, np.ndarray) and template.ndim == 2:
        per_row = list(template)
    elif isinstance(template, (list, tuple)):
        per_row = list(template)
    else:
        raise ValueError("canvas_template must be a 2-D integer array or a list of per-row sequences")
    if len(per_row) != rows:
        raise ValueError(f"canvas_template has {len(per_row)} rows but input_ids has {rows}")
    out = []
    for r, row in enumerate(per_row):
        if row is None:
            out.append([])
            continue
        try:
            arr = np.asarray(row)
        except (TypeError, ValueError):  # ragged nesting inside the row
            raise ValueError(f"canvas_template row {r} must be a 1-D sequence of integers") from None
        if arr.size == 0:
            out.append([])
            continue
        if arr.ndim != 1 or arr.dtype.kind not in "iu":
            raise ValueError(f"canvas_template row {r} must be a 1-D sequence of integers")
        if arr.size > max_new_tokens:
            raise ValueError(f"canvas_template row {r} has {arr.size} positions, more than max_new_tokens "
                             f"{max_new_tokens}")
        bad = (arr != FREE) & ((arr < 0) | (arr >= vocab))
        if bad.any():
            j = int(np.argmax(bad))
            raise ValueError(f"canvas_template row {r} position {j} holds {int(arr[j])}: a token id in [0, {vocab}) "
                             f"or {FREE} (free)")
        out.append([int(t) for t in arr])
    return out if any(out) else []


class KVCache:
    """Per-row KV cache of the encoded prefix (the reference's ``past_key_values``).

    Its blocks go back to the engine's pool when the object is dropped.
    """

    def __init__(self, native: Any, config: dict[str, Any]):
        self._native = native
        self._config = config

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
        layer = _check_int("layer", layer, 0, len(self._config["head_dims"]) - 1)
        row = _check_int("row", row, 0, self.batch_size - 1)
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
    #: the cache after this call (prompt and every committed canvas except the last); None with keep_cache=False
    past_key_values: KVCache | None
    #: queue_s, prefill_s, denoise_s, total_s, decoder_forwards, encoder_forwards
    timings: dict[str, float] = field(default_factory=dict)
    #: True when an on_step/on_block callback ended the request by raising ``StopGeneration``
    stopped: bool = False


#: Raised by ``Request.result()`` (and by ``generate`` on Ctrl-C) when a request was cancelled.
RequestCancelled = _core.RequestCancelled

#: Raised by an ``on_step`` / ``on_block`` callback to end its request early, as done: the canvas being
#: denoised is still finished and committed (raised from ``on_block``: the canvas just committed is the
#: last), and ``result()`` returns the output with ``stopped`` True. Stop strings, token budgets.
StopGeneration = _core.StopGeneration

#: The full-attention KV pool of an Engine made with kv_cache_tokens=None, in tokens.
DEFAULT_KV_CACHE_TOKENS = 16384

#: The largest max_batch_size an Engine takes, and the most rows one generate call takes (kMaxBatchSize).
MAX_BATCH_SIZE = 1024

# Requests that may still run. At interpreter exit they are cancelled and waited for while Python
# can still run their callbacks: a scheduler thread taking the GIL during finalization aborts the
# process ("terminate called without an active exception"). From then on, requests submitted from
# other threads than the main one are cancelled at their first callback (daemon threads: nobody
# waits for them); the main thread's, in a later atexit handler, run as usual.
_live_requests: "weakref.WeakSet[Request]" = weakref.WeakSet()


@atexit.register
def _cancel_live_requests() -> None:
    # From here on, what native threads let go of (callbacks, a callback's exception) is leaked rather
    # than freed with the GIL; a thread that was already freeing one gets the GIL while the waits below
    # release it, and the last loop waits for any still on its way (bounded: exit is never held up long).
    _core._python_exiting()
    natives = [n for n in (r._native for r in list(_live_requests)) if n is not None]
    for n in natives:
        n.cancel()
    for n in natives:
        try:
            n.wait(10.0)
        except BaseException:  # noqa: BLE001 - best effort at exit
            pass
    deadline = time.monotonic() + 1.0
    while _core._native_drops_in_flight() and time.monotonic() < deadline:
        time.sleep(0.001)


def _make_output(
    config: dict[str, Any], rows: list[list[int]], res: dict[str, Any], past: KVCache | None, keep_cache: bool = True
) -> GenerateOutput:
    seqs = [np.asarray(p + n, dtype=np.int64) for p, n in zip(rows, res["new_tokens"])]
    sequences: np.ndarray | list[np.ndarray] = seqs
    if len({len(s) for s in seqs}) == 1:
        sequences = np.stack(seqs)
    cache = past if past is not None else KVCache(res["past_key_values"], config) if keep_cache else None
    return GenerateOutput(
        sequences=sequences,
        tokens_per_forward=np.asarray(res["tokens_per_forward"], dtype=np.float64),
        steps_per_canvas=[list(s) for s in res["steps_per_canvas"]],
        past_key_values=cache,
        timings=dict(res["timings"]),
        stopped=bool(res["stopped"]),
    )


@dataclass
class Event:
    """What iterating a :class:`Request` yields.

    ``kind`` is ``"step"`` (``canvas`` is the argmax draft of the current canvas after denoising
    step ``step``), ``"block"`` (``canvas`` is a committed canvas, after EOS/pad handling) or
    ``"done"`` (``output`` holds the :class:`GenerateOutput`). ``canvas`` is ``[batch, canvas_length]``.
    """

    kind: str
    canvas_index: int
    step: int = 0
    canvas: np.ndarray | None = None
    output: GenerateOutput | None = None


class Request:
    """A request running in the engine's scheduler (see :meth:`Engine.submit`).

    Iterate it for :class:`Event` s as they happen (not one submitted with ``events=False``: iterating
    that is a ValueError), ``cancel()`` it from any thread, or wait for ``result()``. Iteration ends
    with the ``"done"`` event, or raises the request's error (``RequestCancelled`` if it was
    cancelled). Ctrl-C while an iteration waits for the next event cancels the request, as it does
    in ``result()``. Every method may be called from any thread:
    each ``result()`` returns the same output (or raises the same error); several threads iterating
    the same request share its events (each event goes to one of them) and every iteration ends.
    """

    def __init__(self, engine: "Engine", rows: list[list[int]], past_key_values: "KVCache | None", keep_cache: bool,
                 events: bool = True):
        # No reference to the engine: callbacks that outlive it must not keep it alive.
        self._config = engine.config
        self._rows = rows
        self._past = past_key_values
        self._keep_cache = keep_cache
        self._events: queue.SimpleQueue = queue.SimpleQueue()
        self._keep_events = events
        self._canvas_index = 0
        self._step = 0
        self._native: Any = None
        self._id = 0
        self._final_status = "queued"
        self._output: GenerateOutput | None = None
        self._error: BaseException | None = None
        self._ended = False
        self._lock = threading.Lock()  # the handoff of the native result in result()

    # called on the scheduler thread
    def _on_step(self, draft: np.ndarray) -> None:
        self._step += 1
        if self._keep_events:
            self._events.put(Event("step", self._canvas_index, self._step, draft))

    def _on_block(self, block: np.ndarray) -> None:
        if self._keep_events:
            self._events.put(Event("block", self._canvas_index, self._step, block))
        self._canvas_index += 1
        self._step = 0

    def _on_done(self) -> None:
        if self._keep_events:
            self._events.put(None)

    @property
    def id(self) -> int:
        return self._id

    @property
    def status(self) -> str:
        """``queued``, ``running``, ``done``, ``failed`` or ``cancelled``."""
        native = self._native  # read once: result() in another thread may let go of it
        return native.status if native is not None else self._final_status

    @property
    def done(self) -> bool:
        native = self._native
        return native.done if native is not None else True

    def cancel(self) -> None:
        """Drops the request at the next denoising step (at once if it has not started).

        Its KV blocks go back to the pool; ``result()`` then raises ``RequestCancelled``.
        """
        native = self._native
        if native is not None:
            native.cancel()

    def wait(self, timeout: float | None = None) -> bool:
        """Waits until the request has ended; False if ``timeout`` seconds passed first."""
        timeout = _check_timeout(timeout)
        native = self._native
        return native.wait(timeout) if native is not None else True

    def result(self, timeout: float | None = None) -> GenerateOutput:
        """The :class:`GenerateOutput`, once done; raises the request's error if it failed."""
        timeout = _check_timeout(timeout)
        native = self._native
        if native is not None:
            if timeout is not None and not native.wait(timeout):
                raise TimeoutError(f"request {self.id} did not finish within {timeout} s")
            if not native.wait(0):
                # Still running: wait here (Ctrl-C cancels it). Errors of the waiting itself, such
                # as waiting inside one of the engine's own callbacks, leave the request as it is.
                try:
                    native.wait()
                except KeyboardInterrupt:
                    native.cancel()
                    raise
            # One thread turns the native result into the output; the others find it (or its error).
            with self._lock:
                native = self._native
                if native is not None:
                    # Let go of the native handle once it has ended: an error raised by one of this
                    # request's callbacks refers (through its traceback) back to this object, a cycle
                    # through native code that the garbage collector could not see.
                    try:
                        self._output = _make_output(self._config, self._rows, native.result(), self._past,
                                                    self._keep_cache)
                        self._final_status = "done"
                    except BaseException as e:
                        self._error = e
                        self._final_status = native.status
                    finally:
                        self._native = None  # after _final_status: status never goes back to "queued"
                        native = None  # the raised error's traceback holds this frame
                        # The output has the caches it returns. Re-raising the error below puts this frame
                        # (self) into its traceback: a cycle only the garbage collector ends, which must not
                        # keep a KVCache passed in (and its blocks) until it runs.
                        self._past = None

        if self._error is not None:
            raise self._error
        return self._output

    def __iter__(self):
        # Events are handed out once (with several iterating threads, each to one of them); a second
        # iteration only gets the end.
        if not self._keep_events:
            raise ValueError("this request keeps no events to iterate (submitted with events=False)")
        while not self._ended:
            native = self._native  # None once result() let go of it: then the request has ended
            if self._events.empty() and native is not None and not native.done and native.in_callback():
                # The events come from the thread this callback runs on: waiting would be forever.
                raise ValueError(
                    "cannot iterate a request inside an on_step/on_block callback of the same engine "
                    "(the callback runs on the thread that would have to produce the events)"
                )
            try:
                ev = self._events.get()
            except KeyboardInterrupt:  # Ctrl-C while waiting for the next event cancels, as in result()
                self.cancel()
                raise
            if ev is None:
                self._ended = True
                self._events.put(None)  # the end, for every other thread iterating this request
                break
            yield ev
        out = self.result()
        yield Event("done", self._canvas_index, 0, None, out)


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
        try:
            arr = np.asarray(row)
        except (TypeError, ValueError):  # ragged nesting inside the row
            raise ValueError(f"input_ids row {r} must be a flat sequence of token ids") from None
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


_INT32_MAX = 2**31 - 1


def _check_int(name: str, value: Any, lo: int | None = None, hi: int | None = None) -> int:
    """An exact integer (no bools, no floats; a 0-d integer array is one) in [lo, hi], or ValueError naming
    the parameter."""
    if isinstance(value, np.ndarray) and value.ndim == 0 and value.dtype.kind in "iu":
        value = value[()]
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    value = int(value)
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        lo_s = "-inf" if lo is None else str(lo)
        hi_s = "inf" if hi is None else str(hi)
        raise ValueError(f"{name} must be in [{lo_s}, {hi_s}], got {value}")
    return value


def _check_timeout(value: Any, name: str = "timeout") -> float | None:
    """None (no limit) or a number of seconds >= 0, or ValueError naming the parameter."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValueError(f"{name} must be a number of seconds or None, got {value!r}")
    value = float(value)
    if not value >= 0:
        raise ValueError(f"{name} must be >= 0 seconds, got {value}")
    return value


def _as_eos(value: Any, vocab: int) -> list[int]:
    """eos_token_id as a list: None, an integer (Python, numpy or a 0-d integer array) or a sequence of them."""
    if value is None:
        return []
    if isinstance(value, (list, tuple)) or (isinstance(value, np.ndarray) and value.ndim > 0):
        return [_check_int("eos_token_id", e, 0, vocab - 1) for e in value]
    if isinstance(value, (int, np.integer, np.ndarray)):  # _check_int takes 0-d integer arrays, refuses bools
        return [_check_int("eos_token_id", value, 0, vocab - 1)]
    raise ValueError(f"eos_token_id must be an integer, a list of integers or None, got {value!r}")


def _as_ids(name: str, value: Any, vocab: int) -> list[int]:
    """One flat sequence of token ids in [0, vocab), or ValueError naming ``name``."""
    if isinstance(value, (str, bytes, dict)) or value is None:
        raise ValueError(f"{name} must be a flat sequence of integer token ids, got {type(value).__name__}")
    if hasattr(value, "numpy") and hasattr(value, "ndim") and not isinstance(value, np.ndarray):  # torch tensors
        value = value.detach().cpu().numpy() if hasattr(value, "detach") else value.numpy()
    try:
        arr = np.asarray(value)
    except (TypeError, ValueError):  # ragged nesting
        raise ValueError(f"{name} must be a flat sequence of integer token ids") from None
    if arr.ndim != 1:
        raise ValueError(f"{name} must be a flat sequence of integer token ids, got shape {arr.shape}")
    if arr.size == 0:
        return []
    if arr.dtype.kind not in "iu":
        raise ValueError(f"{name} must hold integer token ids, got dtype {arr.dtype}")
    lo, hi = int(arr.min()), int(arr.max())
    if lo < 0 or hi >= vocab:
        raise ValueError(f"{name} token id {lo if lo < 0 else hi} is outside the vocabulary [0, {vocab})")
    return arr.astype(np.int64).tolist()


def _check_float(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValueError(f"{name} must be a number, got {value!r}")
    try:
        value = float(value)
    except OverflowError:  # an int past float's range, such as 10**400
        raise ValueError(f"{name} must be a finite number, got an integer of {int(value).bit_length()} bits") from None
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value}")
    return value


def _check_cache(cache: Any, name: str = "past_key_values") -> None:
    if not isinstance(cache, KVCache) or cache._native is None:
        what = type(cache).__name__ if not isinstance(cache, KVCache) else "a KVCache holding no cache"
        raise ValueError(f"{name} must be a KVCache from an earlier generate() or encode(), got {what}")


def _check_bool(name: str, value: Any) -> bool:
    """True or False (numpy's too): a flag given as 'no', 0.5 or [] is an error, not silently truthy."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    raise ValueError(f"{name} must be True or False, got {value!r}")


class _LoadBar:
    """The progress bar of Engine(progress=True): the native loader calls ``update(phase, done, total)``,
    phase ``"read"`` while the checkpoint is read, then ``"upload"`` while a GPU backend copies the
    weights to its device (the CPU backend computes on what was read: no upload phase)."""

    DESCRIPTIONS = {"read": "loading weights", "upload": "uploading weights to {device}"}

    def __init__(self, device: str, bar: Any = None):
        if bar is None:
            from tqdm.auto import tqdm

            bar = tqdm(desc=self.DESCRIPTIONS["read"], unit="tensor", leave=False)
        self.bar = bar
        self.device = device
        self.phase = "read"
        self.phases: list[str] = []  # in the order they began

    def update(self, phase: str, done: int, total: int) -> None:
        if not self.phases or phase != self.phase:
            self.phase = phase
            self.phases.append(phase)
            self.bar.set_description(self.DESCRIPTIONS.get(phase, phase).format(device=self.device), refresh=False)
        self.bar.total = total
        self.bar.n = done
        self.bar.refresh()

    def close(self) -> None:
        self.bar.close()


class Engine:
    """A DiffusionGemma model loaded for inference.

    Args:
        path: a Hugging Face DiffusionGemma checkpoint directory.
        device: ``"cpu"``, or ``"cuda"`` / ``"cuda:N"`` where this build has the CUDA backend and a
            GPU it has code for (``dgemma_rt.cuda_status()`` says what CUDA sees).
        kv_cache_tokens: size of the full-attention KV pool in tokens, shared by every row and
            every live ``KVCache``.
        max_batch_size: rows whose sliding-window cache fits in the pool at once.
        num_threads: CPU threads (None or 0: all cores, or ``OMP_NUM_THREADS``).
        progress: show a progress bar while loading weights (and, on a GPU, while uploading them).
        quant: ``None`` (weights as stored; NVFP4 / FP8 checkpoints from ``dgemma-quantize`` or
            ModelOpt are recognised by their tensors) or ``"nvfp4"``: quantize the MoE experts of a
            full-precision checkpoint at load time (through a temporary quantized copy).
        random_weights: a seed: no safetensors are read; the weights are random values at
            ``config.json``'s shape, made where the backend keeps them (on a GPU, in device memory).
            For benchmarks at a real shape: at a fixed step count the values do not change the speed.
            The same seed gives the same weights on every backend. With ``quant="nvfp4"`` the MoE
            experts are random NVFP4 (codes, block scales, global scales) as a quantized checkpoint
            stores them.
        dense_quant: ``None``, ``"nvfp4"`` or ``"fp8"`` (one scale per output channel): also quantize
            the attention projections and the dense MLP at load time. On the CPU quantized weights
            are dequantized to float32 (per tile, inside the GEMMs): the reference the GPU kernels
            are checked against.
        cpu_weights: how the CPU backend keeps and multiplies the weight matrices. ``"bf16"``
            (default): as the checkpoint stores them, read from its memory map, and the BF16 matrices
            (all but the MoE router) multiplied with the CPU's BF16 dot products (AVX512-BF16) on
            activations rounded to bf16: about twice as fast as float32, the same for a row alone or
            in any batch, but not the float32 results, so a BF16 checkpoint's output depends on whether
            the CPU has AVX512-BF16 (``dgemma_rt._core.cpu_has_bf16_dot()``; without it this mode is
            ``"stored"``). ``"stored"``: as stored (BF16, NVFP4, FP8), converted to float32 per tile
            inside the GEMMs and multiplied in float32: the float32 reference results on every CPU.
            ``"float32"``: expanded to float32 at load (twice the memory of a BF16 checkpoint, no
            per-call conversion), the same results as ``"stored"``. F32, NVFP4 and FP8 weights take
            the float32 path in every mode, and F32 checkpoints are used in place from the map. Other
            devices ignore it.
    """

    def __init__(
        self,
        path: str | bytes | os.PathLike,
        device: str = "cpu",
        kv_cache_tokens: int | None = None,
        max_batch_size: int = 8,
        num_threads: int | None = None,
        progress: bool = False,
        quant: str | None = None,
        dense_quant: str | None = None,
        random_weights: int | None = None,
        cpu_weights: str = "bf16",
    ):
        path = os.fsdecode(path)  # str (bytes the file system has that are not UTF-8: surrogate escapes)
        if cpu_weights not in ("stored", "float32", "bf16"):
            raise ValueError(f"cpu_weights must be 'stored', 'float32' or 'bf16', got {cpu_weights!r}")
        if quant not in (None, "nvfp4"):
            raise ValueError(f"quant must be None or 'nvfp4', got {quant!r}")
        if dense_quant not in (None, "nvfp4", "fp8"):
            raise ValueError(f"dense_quant must be None, 'nvfp4' or 'fp8', got {dense_quant!r}")
        seed = None if random_weights is None else _check_int("random_weights", random_weights, 0, 2**64 - 1)
        if seed is not None and dense_quant is not None:
            raise ValueError("random_weights makes float (or, with quant='nvfp4', NVFP4 expert) weights; "
                             "dense_quant needs a checkpoint")
        if not isinstance(device, str):
            raise ValueError(f"device must be a string such as 'cpu', 'cuda' or 'cuda:1', got {device!r}")
        # The native engine checks the same ranges, and what memory the pools would take.
        kv = DEFAULT_KV_CACHE_TOKENS if kv_cache_tokens is None else _check_int("kv_cache_tokens", kv_cache_tokens, 1, _INT32_MAX)
        mbs = _check_int("max_batch_size", max_batch_size, 1, MAX_BATCH_SIZE)
        threads = 0 if num_threads is None else _check_int("num_threads", num_threads, 0, _core.thread_limit())

        bar = None
        callback = None
        if progress:
            bar = _LoadBar(device)
            callback = bar.update

        tmp = None
        try:
            load_path = path
            if seed is None and (quant is not None or dense_quant is not None):
                import tempfile

                from dgemma_rt.nvfp4 import quantize_checkpoint, quantize_plan

                # What the native constructor checks (options, configs, memory, headers, tensors) before
                # the quantizer reads a byte of data: the same CheckpointError as without quant.
                def check(p: str) -> None:
                    _core.check_checkpoint(p, device, kv, mbs, threads)

                check(path)
                # A checkpoint stored in these formats already is loaded as it is, not copied.
                if quantize_plan(path, dense=dense_quant, experts=quant == "nvfp4"):
                    tmp = tempfile.TemporaryDirectory(prefix="dgemma-quant-")
                    quantize_checkpoint(path, tmp.name, progress=progress, dense=dense_quant,
                                        experts=quant == "nvfp4", check=check)
                    load_path = tmp.name
            self._native = _core.Engine(load_path, device, kv, mbs, threads, callback, seed,
                                        seed is not None and quant == "nvfp4", cpu_weights)
        finally:
            if bar is not None:
                bar.close()
            if tmp is not None:
                tmp.cleanup()  # the engine keeps what it mapped; nothing is read from the copy again
        self._attach(self._native, path, device, quant, dense_quant)

    def _attach(self, native: Any, path: str, device: str, quant: str | None = None,
                dense_quant: str | None = None) -> None:
        self._native = native
        self.path = path
        self.device = device
        self.quant = quant
        self.dense_quant = dense_quant
        self.config: dict[str, Any] = native.config
        self.generation_defaults: dict[str, Any] = native.generation_defaults
        self._tokenizer = _UNSET

    @classmethod
    def _from_native(cls, native: Any, path: str | os.PathLike, device: str = "cpu") -> "Engine":
        """Wraps a native engine made elsewhere (the test suite's backends without some ops)."""
        engine = cls.__new__(cls)
        engine._attach(native, os.fsdecode(path), device)
        return engine

    # ------------------------------------------------------------------ lifetime
    def close(self) -> None:
        """Stops the engine and frees its memory now, rather than when the last reference goes (a
        notebook's output history, a traceback or a callback may hold one for long).

        Queued and running requests end as cancelled (``result()`` raises ``RequestCancelled``), and
        every later call that needs the engine raises ``RuntimeError("this Engine is closed")``.
        KVCaches still referenced keep the KV storage they point into until they are dropped. Calls
        already running on other threads (``encode``, ``denoise_logits``) finish first; inside one of
        the engine's own callbacks it stops once that callback returns. Closing twice does nothing;
        ``with Engine(...) as engine:`` closes at the end of the block.
        """
        native = getattr(self, "_native", None)
        if native is not None:
            native.close()

    @property
    def closed(self) -> bool:
        native = getattr(self, "_native", None)
        return native is None or native.closed

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

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
        if past_key_values is not None:
            _check_cache(past_key_values)
        native = None if past_key_values is None else past_key_values._native
        if native is not None and native.batch_size != len(rows):
            raise ValueError(f"past_key_values has {native.batch_size} rows but input_ids has {len(rows)}")
        cache = self._native.encode(rows, native)
        return past_key_values if past_key_values is not None else KVCache(cache, self.config)

    def denoise_logits(
        self, state: KVCache, canvas_ids: Any, self_conditioning_logits: np.ndarray | None = None
    ) -> np.ndarray:
        """One decoder pass: soft-capped float32 logits ``[batch, n, vocab]`` for ``canvas_ids``."""
        _check_cache(state, "state")
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
    def _params(self, kw: dict[str, Any]) -> dict[str, Any]:
        g = self.generation_defaults

        def pick(name: str) -> Any:
            value = kw.get(name, _UNSET)
            if value is not _UNSET:
                return value
            return g.get(name) if g.get(name) is not None else _SAMPLER_DEFAULTS[name]

        # stability_threshold counts steps: values above max_denoising_steps can never be met
        # and behave like it (the engine keeps one previous argmax per row and a count, whatever it is).
        params = {
            "max_new_tokens": _check_int("max_new_tokens", pick("max_new_tokens"), 1, _INT32_MAX),
            "max_denoising_steps": _check_int("max_denoising_steps", pick("max_denoising_steps"), 1, _INT32_MAX),
            "entropy_bound": _check_float("entropy_bound", pick("entropy_bound")),
            "t_min": _check_float("t_min", pick("t_min")),
            "t_max": _check_float("t_max", pick("t_max")),
            "stability_threshold": _check_int("stability_threshold", pick("stability_threshold"), 0, _INT32_MAX),
            "confidence_threshold": _check_float("confidence_threshold", pick("confidence_threshold")),
            "seed": _check_int("seed", kw.get("seed", 0), 0, 2**64 - 1),
            "adaptive_stopping": _check_bool("adaptive_stopping", kw.get("adaptive_stopping", True)),
        }
        vocab = int(self.config["vocab_size"])
        eos = kw.get("eos_token_id", _UNSET)
        params["eos_token_id"] = _as_eos(g.get("eos_token_id") if eos is _UNSET else eos, vocab)
        pad = kw.get("pad_token_id", _UNSET)
        pad = g.get("pad_token_id") if pad is _UNSET else pad
        params["pad_token_id"] = None if pad is None else _check_int("pad_token_id", pad, 0, vocab - 1)
        return params

    def submit(
        self,
        input_ids: Any,
        *,
        on_step: Callable[[np.ndarray], None] | None = None,
        on_block: Callable[[np.ndarray], None] | None = None,
        noise: Callable[[str, tuple[int, int]], Any] | None = None,
        past_key_values: KVCache | None = None,
        keep_cache: bool = True,
        events: bool = True,
        **sampler: Any,
    ) -> Request:
        """Queues a generation request and returns its :class:`Request` handle at once.

        Takes the same arguments as :meth:`generate`. Requests from any number of threads are
        batched together: the scheduler admits a waiting request between denoising steps as soon
        as a row (``max_batch_size``) and its KV blocks are free, and every admitted request's
        rows share each decoder pass. Callbacks run on the scheduler thread between steps; keep
        them short. One that raises ``StopGeneration`` ends its request early as done (once the canvas
        being denoised is committed: raised from ``on_block``, the canvas just committed is the last;
        the output's ``stopped`` is True); one that raises ``RequestCancelled`` ends it at once as
        cancelled (``result()`` raises a ``RequestCancelled`` with its message); any other exception
        fails the request, and ``result()`` raises that very exception. ``keep_cache=False`` gives the
        request's KV blocks back to the pool the moment it ends (the output's ``past_key_values`` is
        then None): what a server wants. ``events=False`` keeps no step and block events for
        iterating the request (each step's draft would stay queued until the request is dropped):
        for callers that use the callbacks and ``result()`` only.
        """
        template = sampler.pop("canvas_template", None)
        unknown = set(sampler) - set(_SAMPLER_DEFAULTS) - {"eos_token_id", "pad_token_id", "seed", "adaptive_stopping"}
        if unknown:
            raise TypeError(f"unexpected keyword argument(s): {', '.join(sorted(unknown))}")
        rows = _as_rows(input_ids, self.config["vocab_size"])
        params = self._params(sampler)
        params["canvas_template"] = _as_template(template, len(rows), self.config["vocab_size"],
                                                 params["max_new_tokens"])
        for name, fn in (("on_step", on_step), ("on_block", on_block), ("noise", noise)):
            if fn is not None and not callable(fn):
                raise ValueError(f"{name} must be callable")
        keep_cache, events = _check_bool("keep_cache", keep_cache), _check_bool("events", events)
        native_cache = None
        if past_key_values is not None:
            _check_cache(past_key_values)
            if past_key_values.batch_size != len(rows):
                raise ValueError(f"past_key_values has {past_key_values.batch_size} rows but input_ids has {len(rows)}")
            native_cache = past_key_values._native
            if not keep_cache:
                raise ValueError("keep_cache=False would empty the past_key_values passed in; pass keep_cache=True")
        req = Request(self, rows, past_key_values, keep_cache, events)
        # The callbacks reach the request through a weak reference (req._on_done holds it until the end):
        # an exception a user callback raises is kept by the native request, with this frame in its
        # traceback, until result(); a strong reference here made a cycle through native code.
        ref = weakref.ref(req)

        def step_cb(draft: np.ndarray) -> None:
            r = ref()
            if r is not None:
                r._on_step(draft)
            r = None
            if on_step is not None:
                on_step(draft)

        def block_cb(block: np.ndarray) -> None:
            r = ref()
            if r is not None:
                r._on_block(block)
            r = None
            if on_block is not None:
                on_block(block)

        req._native = self._native.submit(rows, params, noise, step_cb, block_cb, req._on_done, native_cache,
                                          keep_cache)
        req._id = req._native.id
        _live_requests.add(req)
        return req

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
        keep_cache: bool = True,
        canvas_template: Any = None,
    ) -> GenerateOutput:
        """Block-diffusion generation, token for token what transformers' ``generate`` computes.

        ``input_ids`` are the tokens not yet in ``past_key_values``. New tokens come in whole
        canvases of ``canvas_length``; after the first EOS of a row its tokens become
        ``pad_token_id`` (except a ``canvas_template``'s locked positions, which keep their tokens).
        ``eos_token_id`` / ``pad_token_id`` default to the checkpoint's
        generation config. ``adaptive_stopping=False`` runs every canvas for exactly
        ``max_denoising_steps`` steps (for benchmarks).

        Thread-safe: calls from many threads run concurrently and share decoder passes (the rows
        of one call stay in lock step, as in the reference); a call's output does not depend on
        what else is running. Ctrl-C cancels the request. ``keep_cache=False`` frees the KV
        blocks at the end instead of returning them as ``past_key_values``. ``on_step`` gets each
        step's argmax draft, ``on_block`` each committed canvas (both ``[rows, canvas_length]``); either
        may raise ``StopGeneration`` to end the generation early (see :meth:`submit`).

        ``canvas_template``: per row a sequence of token ids laid over the new canvases in order, with
        ``FREE`` (-1) at the positions to generate (a 2-D array, or a list of sequences, empty or
        None for a row without one). Locked positions hold their token from the first step, are
        never renoised and are left out of the acceptance budget and the stopping statistics. EOS
        stopping never pads them: after a row's first EOS its free positions are pad and its locked
        ones keep their tokens, in every canvas the template reaches (committed without denoising once
        every row has ended). See the README's "Templates and infilling".
        """
        if self._native.in_callback():
            raise ValueError(
                "generate() cannot be called inside an on_step/on_block callback of the same engine "
                "(it would wait for the thread that runs the callback); use submit()"
            )
        sampler = {
            k: v
            for k, v in dict(
                max_new_tokens=max_new_tokens,
                max_denoising_steps=max_denoising_steps,
                entropy_bound=entropy_bound,
                t_min=t_min,
                t_max=t_max,
                stability_threshold=stability_threshold,
                confidence_threshold=confidence_threshold,
                eos_token_id=eos_token_id,
                pad_token_id=pad_token_id,
            ).items()
            if v is not _UNSET
        }
        req = self.submit(
            input_ids,
            on_step=on_step,
            on_block=on_block,
            noise=noise,
            past_key_values=past_key_values,
            keep_cache=keep_cache,
            events=False,  # nobody iterates it
            seed=seed,
            adaptive_stopping=adaptive_stopping,
            canvas_template=canvas_template,
            **sampler,
        )
        return req.result()

    def profile(self, enabled: bool = True, encoder: bool = False) -> None:
        """Per-op profiling from the next forward pass on: the backend times every op of the decoder
        steps (and of encoder passes, prompt prefill and canvas commits, with ``encoder=True``); on a
        GPU by CUDA events on its stream, read back when the step's results are, on the CPU by the
        host clock. Profiled steps run without CUDA graphs, so they are slower than unprofiled ones.
        ``take_profile()`` returns the totals. Raises where the backend cannot profile."""
        self._native.set_profiling(bool(enabled), bool(enabled) and bool(encoder))

    def take_profile(self) -> list[dict[str, Any]]:
        """Per-op totals since the last call, and resets them: ``[{"op", "calls", "seconds"}]`` in the
        backend's op order (``op``: the backend op's name, e.g. ``"moe_experts"``; ops not called left out)."""
        return [dict(d) for d in self._native.take_profile()]

    def memory_stats(self) -> dict[str, int]:
        """Memory the backend has allocated (weights on a GPU, KV cache, workspaces, scratch):
        ``live_bytes``, ``peak_bytes`` (the high-water mark since the engine was made) and
        ``allocations``; on a GPU also ``device_free_bytes`` / ``device_total_bytes`` (cudaMemGetInfo:
        the whole device, every process). The CPU backend's float32 weights are host memory the
        checkpoint loader owns and are not counted."""
        return dict(self._native.memory_stats())

    def scheduler_stats(self) -> dict[str, int]:
        """Queue depth, running requests, active rows and counters of the continuous batcher."""
        return dict(self._native.scheduler_stats())

    @property
    def max_batch_size(self) -> int:
        return self._native.max_batch_size

    def infill(self, prefix: Any, suffix: Any, max_middle_tokens: int = 64, **kwargs: Any) -> str | list[int]:
        """Generates the middle between ``prefix`` and ``suffix`` (fill in the middle).

        ``prefix`` is text, a chat (list of {"role", "content"} dicts, through the chat template) or
        token ids; ``suffix`` text or ids likewise. Plain text is raw text: it is encoded as it is
        (with the tokenizer's BOS), not through the chat template, even where the checkpoint has one
        (infilling continues a document; pass a chat to fill the middle of a chat reply, whose
        rendering with the generation prompt is then the prefix). The prefix is the prompt; the new
        canvases are a template whose locked positions hold the suffix so that it ends the last
        canvas, and whose free positions (at least ``max_middle_tokens``, up to whole canvases) are
        the middle. EOS stopping is off while generating (every free position is denoised around the
        suffix); the middle ends at its first EOS or pad token. Returns the middle's text, or its ids when ids were given.
        Other keyword arguments go to :meth:`generate`.
        """
        max_middle_tokens = _check_int("max_middle_tokens", max_middle_tokens)
        if max_middle_tokens <= 0:
            raise ValueError(f"max_middle_tokens must be positive, got {max_middle_tokens}")
        for name in ("canvas_template", "max_new_tokens"):
            if name in kwargs:
                raise TypeError(f"infill() builds {name} itself")
        vocab = int(self.config["vocab_size"])
        if isinstance(prefix, (list, tuple)) and not prefix:
            raise ValueError("infill() needs a non-empty prefix")
        chat = is_chat(prefix)
        text = isinstance(prefix, str) or chat
        tok = self.tokenizer if text else None
        if text:
            if tok is None:
                raise ValueError(f"{self.path} has no tokenizer.json: pass token ids to infill() instead")
            if not isinstance(suffix, str):
                raise ValueError("with a text prefix the suffix must be text too")
            prefix_ids = tok.apply_chat_template(prefix) if chat else tok.encode(prefix)
            suffix_ids = tok.encode(suffix, add_special_tokens=False)
        else:
            if isinstance(prefix, Mapping):
                raise ValueError('prefix is one message: a chat is a list of {"role", "content"} dicts')
            prefix_ids = _as_ids("prefix", prefix, vocab)
            if isinstance(suffix, str):
                raise ValueError("with a token-id prefix the suffix must be token ids too")
            suffix_ids = _as_ids("suffix", suffix, vocab)
        if not prefix_ids:
            raise ValueError("infill() needs a non-empty prefix")
        eos = set(_as_eos(kwargs.pop("eos_token_id", self.generation_defaults.get("eos_token_id")), vocab))
        canvas = int(self.config["canvas_length"])
        total = -(-(max_middle_tokens + len(suffix_ids)) // canvas) * canvas
        # What generate() would refuse, refused before the template of `total` positions is built.
        past = kwargs.get("past_key_values")
        cached = max(past.seq_lengths) if isinstance(past, KVCache) else 0
        max_pos = int(self.config["max_position_embeddings"])
        if cached + len(prefix_ids) + total > max_pos:
            raise ValueError(f"max_middle_tokens {max_middle_tokens}: prefix ({cached + len(prefix_ids)} tokens) plus "
                             f"{total} new tokens (the middle and the suffix's {len(suffix_ids)}, in whole canvases of "
                             f"{canvas}) exceeds max_position_embeddings {max_pos}")
        template = [FREE] * (total - len(suffix_ids)) + suffix_ids
        pad = kwargs.get("pad_token_id", self.generation_defaults.get("pad_token_id"))
        out = self.generate([prefix_ids], max_new_tokens=total, canvas_template=[template], eos_token_id=None,
                            **kwargs)
        middle = []
        for t in out.sequences[0][len(prefix_ids):len(prefix_ids) + total - len(suffix_ids)]:
            if int(t) in eos or (pad is not None and int(t) == pad):
                break
            middle.append(int(t))
        return tok.decode(middle) if tok is not None else middle

    def generate_text(self, prompt: str | list[dict] | list[str] | list[list[dict]], **kwargs: Any) -> str | list[str]:
        """Text in, text out: a string, a chat (list of {"role", "content"} dicts), or a list of either.

        Chats go through the checkpoint's chat template. Returns the new text up to the first EOS.
        """
        tok = self.tokenizer
        if tok is None:
            raise ValueError(f"{self.path} has no tokenizer.json: pass token ids to generate() instead")
        what = 'a str, a chat (a list of {"role", "content"} dicts)'
        single = isinstance(prompt, str) or is_chat(prompt)
        if single:
            prompts = [prompt]
        elif isinstance(prompt, (list, tuple)):
            prompts = list(prompt)
        else:
            raise ValueError(f"prompt must be {what} or a list of those, got {type(prompt).__name__}")
        if not prompts:
            raise ValueError("no prompt given")
        for i, p in enumerate(prompts):
            if not (isinstance(p, str) or is_chat(p)):
                got = ("one message dict outside a list" if isinstance(p, Mapping) else
                       "an empty chat" if isinstance(p, (list, tuple)) and not p else type(p).__name__)
                raise ValueError(f"prompt {i} must be {what}, got {got}")
        ids = [tok.encode(p) if isinstance(p, str) else tok.apply_chat_template(p) for p in prompts]
        out = self.generate(ids, **kwargs)
        eos = set(_as_eos(kwargs.get("eos_token_id", self.generation_defaults.get("eos_token_id")),
                          int(self.config["vocab_size"])))
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
