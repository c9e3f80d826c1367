"""`dgemma-bench`: generation throughput on random prompts.

Without a checkpoint it benches the built-in tiny model, built once into a cache directory. With
--fixed-steps (the default) every canvas runs exactly --steps denoising steps and EOS is ignored, so
each run does the same work: batch rows x ceil(new_tokens / canvas_length) canvases x steps.
"""

from __future__ import annotations

import argparse
import gc
import copy
import json
import math
import os
import pathlib
import platform
import shutil
import signal
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from dgemma_rt.cli import _batch_size, _non_negative_int, _positive_int, _thread_count, _version, run_reporting_errors
from dgemma_rt.engine import DEFAULT_KV_CACHE_TOKENS  # the pool the engine allocates when not told otherwise


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dgemma-bench",
        description="Benchmark dgemma_rt generation on random prompts (default: the built-in tiny checkpoint).",
    )
    p.add_argument("checkpoint", nargs="?", metavar="CKPT", help="checkpoint dir (default: the cached tiny model)")
    p.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    p.add_argument("--batch", type=_batch_size, default=1, help="rows per generate call (default 1)")
    p.add_argument("--prompt-len", type=_positive_int, default=128, help="random prompt tokens per row (default 128)")
    p.add_argument("--new-tokens", type=_positive_int, default=256, help="max_new_tokens (default 256)")
    p.add_argument("--steps", type=_positive_int, default=16, help="max denoising steps per canvas (default 16)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument(
        "--fixed-steps",
        dest="fixed_steps",
        action="store_true",
        default=True,
        help="run every canvas for exactly --steps steps and ignore EOS (default)",
    )
    mode.add_argument(
        "--adaptive",
        dest="fixed_steps",
        action="store_false",
        help="adaptive stopping and the checkpoint's EOS ids, as in real use",
    )
    p.add_argument("--threads", type=_thread_count, default=None, help="CPU threads (default: all cores)")
    p.add_argument("--device", default="cpu",
                   help="where the engine (and --peer) runs: cpu, or cuda / cuda:N where built with CUDA (default cpu); "
                        "checked before any checkpoint is built or loaded")
    p.add_argument("--peer", choices=["transformers"], default=None,
                   help="also time transformers' DiffusionGemmaForBlockDiffusion (eager; float32 on the CPU, bf16 on "
                        "a GPU; same checkpoint, prompts, new tokens, fixed steps and thread count), alternating "
                        "run by run with the engine, and report the ratio (needs torch and transformers)")
    p.add_argument("--quant", choices=["none", "nvfp4"], default="none",
                   help="nvfp4: quantize the MoE experts at load (on the CPU they run dequantized; default none)")
    p.add_argument("--dense-quant", choices=["none", "nvfp4", "fp8"], default="none",
                   help="also quantize the attention projections and dense MLP at load (default none)")
    p.add_argument("--cpu-weights", choices=["bf16", "stored", "float32"], default="bf16",
                   help="Engine(cpu_weights=...) on the CPU: bf16 (default: BF16 dot products where the CPU has "
                        "AVX512-BF16, else as stored; the JSON's cpu_bf16_dot says which), stored (float32 "
                        "arithmetic, the float32 reference results) or float32 (expanded at load)")
    p.add_argument("--random-weights", action="store_true",
                   help="bench random weights at a preset's shape (--preset) instead of a checkpoint; written once "
                        "into the cache, directly in the --quant / --dense-quant formats")
    p.add_argument("--preset", choices=["26b-a4b", "wide-vocab", "tiny", "cpu-small", "cpu-medium"], default=None,
                   help="shape for --random-weights and --roofline (default 26b-a4b, the released model; wide-vocab: its "
                        "vocabulary and canvas on a tiny body; cpu-small / cpu-medium: the CPU benchmark shapes)")
    p.add_argument("--num-layers", type=_positive_int, default=None,
                   help="with --random-weights or --roofline: the preset's first N layers, the last made full "
                        "attention (a larger N adds sliding layers; default: all)")
    p.add_argument("--kv-cache-tokens", type=_positive_int, default=None, help="KV pool size (default: fits the run)")
    p.add_argument("--seed", type=_non_negative_int, default=0, help="prompt and sampling seed (default 0)")
    p.add_argument("--warmup", type=_non_negative_int, default=1, help="untimed runs first (default 1)")
    p.add_argument("--runs", type=_positive_int, default=1, help="timed runs, results summed (default 1)")
    p.add_argument("--template", type=_fraction, default=None, metavar="FREE_FRACTION",
                   help="generate into a template canvas: each new position free with this probability, the "
                        "others locked to random tokens (measures steps per canvas and tokens/s with templates)")
    p.add_argument("--roofline", action="store_true",
                   help="print the roofline model of one GPU step at --preset's shape (--batch, --quant, "
                        "--dense-quant, --gpu, --context, --fused-lm-head; launch overhead of a canvas of --steps "
                        "steps in the steady state, every step a CUDA graph replay) instead of running anything")
    p.add_argument("--fused-lm-head", action="store_true",
                   help="with --roofline: model the fused LM head + sampler + self-conditioning pass "
                        "(DGEMMA_CUDA_FUSED_LM_HEAD=1) instead of the backend's default per-row path")
    p.add_argument("--profile", action="store_true",
                   help="after the timed runs, one more run with per-op profiling of its decoder steps (CUDA events "
                        "on a GPU, the host clock on the CPU; no CUDA graphs): op_profile in the JSON, each op's ms "
                        "per step, share of the step and achieved bandwidth against the roofline's bytes")
    p.add_argument("--gpu", choices=["h100", "h200"], default=None,
                   help="with --roofline: the device; with --profile on cuda: whose HBM bandwidth the achieved "
                        "bandwidth is a fraction of (default h100)")
    p.add_argument("--context", type=_positive_int, default=None,
                   help="with --roofline: cached tokens per row (default 4096)")
    p.add_argument("--measured", metavar="JSON", default=None,
                   help="with --roofline: measured per-op times ({\"per_op_ms\": {op: ms}}) to show beside the model")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (default: on when stderr is a TTY)")
    return p


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text!r}") from None
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {value}")
    return value


def random_template(config: dict[str, Any], batch: int, length: int, free_fraction: float, seed: int) -> np.ndarray:
    """[batch, length]: each position free (-1) with probability free_fraction, else a random token id."""
    rng = np.random.default_rng(seed + 1)
    vocab = int(config["vocab_size"])
    t = rng.integers(min(8, vocab - 1), vocab, size=(batch, length))
    t[rng.random((batch, length)) < free_fraction] = -1
    return t


def cache_root() -> pathlib.Path:
    env = os.environ.get("DGEMMA_RT_CACHE")
    if env:
        return pathlib.Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (pathlib.Path(xdg).expanduser() if xdg else pathlib.Path.home() / ".cache") / "dgemma_rt"


def _cached_checkpoint(path: pathlib.Path, files: Sequence[str], build: Any) -> pathlib.Path:
    """``path`` if it holds every one of ``files``, else built there by ``build(tmp_dir)``: beside the target
    and renamed, so a concurrent or interrupted run never sees half a checkpoint."""

    def complete() -> bool:
        return all((path / f).is_file() for f in files)

    if complete():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f"{path.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        build(tmp)
        if not complete():
            shutil.rmtree(path, ignore_errors=True)  # an incomplete leftover
            try:
                os.rename(tmp, path)
            except OSError:
                if not complete():  # a real error, not a lost race to a complete copy
                    raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def tiny_checkpoint() -> pathlib.Path:
    """The cached tiny checkpoint, built on first use."""
    from dgemma_rt.tiny import FILES, TINY_FORMAT_VERSION, make_tiny

    return _cached_checkpoint(cache_root() / f"tiny-{_version()}-{TINY_FORMAT_VERSION}", FILES, make_tiny)


def random_checkpoint(name: str, num_layers: int | None, quant: str | None, dense_quant: str | None, seed: int,
                      progress: bool) -> pathlib.Path:
    """The cached random-weight checkpoint of a preset (dgemma_rt.presets), built on first use."""
    from dgemma_rt import presets

    shape = presets.preset(name, num_layers)
    key = f"random-{name}-L{shape.num_layers}-{quant or 'bf16'}-{dense_quant or 'bf16'}-s{seed}"
    path = cache_root() / f"{key}-{_version()}-{presets.RANDOM_FORMAT_VERSION}"

    def build(tmp: pathlib.Path) -> None:
        presets.write_random_checkpoint(tmp, shape, quant, dense_quant, seed=seed, progress=progress,
                                        eos_ids=presets.EOS_IDS.get(name))

    return _cached_checkpoint(path, ["config.json", "model.safetensors.index.json"], build)


def random_config(name: str, num_layers: int | None) -> pathlib.Path:
    """A cached directory holding only a preset's config.json and generation_config.json: with
    Engine(random_weights=seed) the weights are made where the backend keeps them (on a GPU, in device
    memory, in seconds), so no checkpoint is written."""
    from dgemma_rt import presets

    shape = presets.preset(name, num_layers)
    path = cache_root() / f"config-{name}-L{shape.num_layers}-{_version()}-{presets.RANDOM_FORMAT_VERSION}"

    def build(tmp: pathlib.Path) -> None:
        tmp.mkdir(parents=True)
        config = presets.random_model_config(shape)
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        gen = presets.generation_config()
        if presets.EOS_IDS.get(name) is not None:
            gen["eos_token_id"] = list(presets.EOS_IDS[name])
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2, sort_keys=True) + "\n")

    return _cached_checkpoint(path, ["config.json", "generation_config.json"], build)


def checkpoint_shape(ckpt: pathlib.Path) -> Any:
    """The ModelShape a checkpoint's config.json describes, or None when it cannot be read (the engine
    reports checkpoint problems itself)."""
    from dgemma_rt.tiny import ModelShape

    text = _read_json(ckpt / "config.json").get("text_config")
    if not isinstance(text, dict):
        return None
    try:
        per_layer = [v for v in (text.get("per_layer_config") or {}).values() if isinstance(v, dict)]
        full = per_layer[0] if per_layer else {}
        return ModelShape(
            global_head_dim=int(full.get("head_dim", text["head_dim"])),
            num_global_kv_heads=int(full.get("num_key_value_heads", text["num_key_value_heads"])),
            vocab_size=int(text["vocab_size"]), hidden_size=int(text["hidden_size"]),
            intermediate_size=int(text["intermediate_size"]), layer_types=tuple(text["layer_types"]),
            num_heads=int(text["num_attention_heads"]), num_kv_heads=int(text["num_key_value_heads"]),
            head_dim=int(text["head_dim"]), num_experts=int(text["num_experts"]),
            moe_intermediate_size=int(text["moe_intermediate_size"]),
        )  # fmt: skip
    except (KeyError, TypeError, ValueError, AttributeError):
        return None


def available_memory() -> int | None:
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return None


def _cpu_has_bf16_dot() -> bool:
    from dgemma_rt import _core

    return bool(_core.cpu_has_bf16_dot())


def check_cpu_memory(shape: Any, avail: int | None = None, quant: str | None = None, dense_quant: str | None = None,
                     stored_bytes: int | None = None) -> None:
    """Refuses, before anything is written or loaded, a model the CPU backend cannot hold. It keeps the
    weights as the checkpoint stores them (Engine(cpu_weights="bf16" or "stored"): the memory map's pages, BF16 or
    NVFP4 / FP8 in the --quant / --dense-quant formats) and converts them per tile, so it needs about the
    checkpoint's tensor bytes (``stored_bytes`` when the checkpoint exists, else the preset's plan).
    ``avail``: bytes of memory available (default: the system's MemAvailable)."""
    from dgemma_rt import presets

    avail = available_memory() if avail is None else avail
    if shape is None or avail is None:
        return
    need = stored_bytes if stored_bytes is not None else presets.weight_bytes(shape, quant, dense_quant)["total"]
    if need > 0.9 * avail:
        raise ValueError(
            f"the CPU backend keeps the weights as stored: this model needs ~{need / 1e9:.1f} GB and "
            f"{avail / 1e9:.1f} GB are available (bench fewer layers: --random-weights --num-layers N, "
            f"or --quant nvfp4)")


def _read_json(path: pathlib.Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}  # the engine reports checkpoint problems itself
    return data if isinstance(data, dict) else {}


def random_prompts(config: dict[str, Any], batch: int, length: int, seed: int) -> np.ndarray:
    """Uniform ids in [3, vocab) but the image token (the engine rejects it in text-only prompts)."""
    vocab = int(config["vocab_size"])
    image = config.get("image_token_id")
    allowed = np.setdiff1d(np.arange(3, vocab), [image] if isinstance(image, int) else [])
    if allowed.size == 0:
        raise ValueError(f"vocabulary of {vocab} ids has no ordinary tokens to build prompts from")
    rng = np.random.default_rng(seed)
    return allowed[rng.integers(0, allowed.size, size=(batch, length))].astype(np.int64)


def checkpoint_weight_bytes(ckpt: pathlib.Path) -> int:
    """Bytes of the tensors in the checkpoint's safetensors files (headers left out), as stored."""
    total = 0
    for f in sorted(ckpt.glob("*.safetensors")):
        with open(f, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
        total += f.stat().st_size - 8 - n
    return total


def peak_rss_mib() -> float | None:
    try:
        import resource
    except ImportError:  # Windows
        return None
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports KiB, macOS bytes.
    return rss / (1024 * 1024) if sys.platform == "darwin" else rss / 1024


def _status_mib(key: str) -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def reset_peak_rss() -> bool:
    """Resets the process's RSS high-water mark to its current RSS (Linux); False where it cannot."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _random_model_on(torch: Any, cls: Any, config: Any, device: str, dtype: Any) -> Any:
    """``cls._from_config(config)`` with random weights made on ``device``, each tied weight once.

    Built directly on a device, the model is two full copies until post_init ties the encoder's
    language model to the decoder (~100 GB at the 26B-A4B shape, more than an H100 holds). So the
    parameters are made on the meta device (buffers as usual: RoPE frequencies, scalars), then each
    distinct one is allocated on ``device`` once, shared by every module that holds it, and the model's
    own initialisation runs again on the real memory (its modules' "initialised" marks cleared)."""
    register = torch.nn.Module.register_parameter

    def on_meta(module: Any, name: str, param: Any) -> None:
        register(module, name, param)
        p = module._parameters.get(name)
        if p is not None and p.device.type != "meta":
            module._parameters[name] = type(p)(p.to("meta"), requires_grad=p.requires_grad)

    torch.nn.Module.register_parameter = on_meta
    try:
        model = cls._from_config(config, dtype=dtype)
    finally:
        torch.nn.Module.register_parameter = register
    made: dict[int, Any] = {}
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if p is not None:
                if id(p) not in made:
                    made[id(p)] = torch.nn.Parameter(torch.empty_like(p, device=device), requires_grad=p.requires_grad)
                module._parameters[name] = made[id(p)]
    model = model.to(device)
    for module in model.modules():
        module.__dict__.pop("_is_hf_initialized", None)
    with torch.no_grad():
        model.init_weights()
    return model


class TransformersPeer:
    """transformers' DiffusionGemmaForBlockDiffusion on the same checkpoint and prompts, for --peer: eager
    attention and experts (sdpa crashes in 5.23.0's encoder), float32 on the CPU with the engine's thread
    count, bf16 on a GPU; every canvas runs exactly ``steps`` steps and EOS is ignored, as the engine's
    fixed-step runs do."""

    def __init__(self, ckpt: pathlib.Path, device: str, threads: int | None, prompts: np.ndarray, new_tokens: int,
                 steps: int):
        try:
            import torch
            import transformers
            from transformers import DiffusionGemmaForBlockDiffusion
        except ImportError as e:
            raise ValueError(f"--peer transformers needs torch and transformers ({e})") from None
        self.torch = torch
        self.version = transformers.__version__
        on_gpu = device != "cpu"
        self.dtype = "bfloat16" if on_gpu else "float32"
        self.threads = threads or os.cpu_count() or 1
        torch.set_num_threads(self.threads)
        verbosity = transformers.logging.get_verbosity()
        transformers.logging.set_verbosity_error()  # random checkpoints have no vision tower: not worth a report
        try:
            if any(ckpt.glob("*.safetensors")):
                model = DiffusionGemmaForBlockDiffusion.from_pretrained(
                    str(ckpt), dtype=getattr(torch, self.dtype), attn_implementation="eager",
                    experts_implementation="eager")
            else:  # a config-only directory (--random-weights on a GPU): random init, on the device
                config = transformers.AutoConfig.from_pretrained(str(ckpt))
                config._attn_implementation = "eager"
                config.text_config._attn_implementation = "eager"
                model = _random_model_on(torch, DiffusionGemmaForBlockDiffusion, config, device,
                                         getattr(torch, self.dtype))
                gen_path = ckpt / "generation_config.json"
                if gen_path.is_file():
                    model.generation_config = type(model.generation_config).from_pretrained(str(ckpt))
        finally:
            transformers.logging.set_verbosity(verbosity)
        model.config._attn_implementation = "eager"
        model.config.text_config._attn_implementation = "eager"
        # None: transformers' default for the device (grouped_mm where torch has it), not eager
        self.experts_implementation = getattr(model.config.get_text_config(), "_experts_implementation", None)
        self.model = model.to(device).eval()
        self.device = device
        self.input_ids = torch.from_numpy(np.ascontiguousarray(prompts, dtype=np.int64)).to(device)
        gc = copy.deepcopy(model.generation_config)
        gc.max_new_tokens = new_tokens
        gc.max_denoising_steps = steps
        gc.eos_token_id = None
        gc.stability_threshold = None
        gc.confidence_threshold = None
        gc.return_dict_in_generate = True
        self.generation_config = gc
        self.steps = steps
        self.new_tokens = new_tokens
        self.runs_s: list[float] = []
        self.steps_per_canvas: float | None = None
        # Per timed run: its new tokens and the steps per canvas its tokens_per_forward implies. That
        # figure overstates the steps when the run sampled pad tokens (transformers counts generated
        # tokens without pads; a random model samples them: 2.17 implied for 2 fixed steps), so it is
        # kept for reading only. A run that stopped canvases early (a random model's sampled token
        # ended it: 64 of 128 new tokens in half the time) did less work than the engine's fixed run:
        # it is left out of runs_s and listed in `excluded`.
        self.run_details: list[dict[str, Any]] = []
        self.excluded: list[dict[str, Any]] = []

    def run(self, record: bool) -> float:
        torch = self.torch
        with torch.no_grad():
            if self.device != "cpu":
                torch.cuda.synchronize()
            start = time.perf_counter()
            out = self.model.generate(self.input_ids, generation_config=self.generation_config)
            if self.device != "cpu":
                torch.cuda.synchronize()
            elapsed = time.perf_counter() - start
        # Same work as the engine's fixed-step run: every canvas ran `steps` decoder passes.
        tpf = float(out.tokens_per_forward.float().mean())
        new = out.sequences.shape[1] - self.input_ids.shape[1]
        canvas = self.model.config.canvas_length
        self.steps_per_canvas = (new / tpf) / math.ceil(new / canvas) if tpf > 0 else None
        if record:
            spc = None if self.steps_per_canvas is None else round(self.steps_per_canvas, 3)
            detail = {"ms": 1000.0 * elapsed, "new_tokens": int(new), "implied_steps_per_canvas": spc}
            self.run_details.append(detail)
            # transformers fills whole canvases (new may round up to one): the same work is the same canvases.
            if math.ceil(new / canvas) == math.ceil(self.new_tokens / canvas):
                self.runs_s.append(elapsed)
            else:
                self.excluded.append(detail)
        return elapsed


def run(args: argparse.Namespace) -> dict[str, Any]:
    import dgemma_rt

    progress = not args.no_progress and sys.stderr.isatty()
    quant = None if args.quant == "none" else args.quant
    dense_quant = None if args.dense_quant == "none" else args.dense_quant
    # Refuse a device this build cannot run before writing a random checkpoint (tens of GB at 26b-a4b).
    dgemma_rt.check_device(args.device)
    on_cpu = args.device == "cpu"
    random_seed = None  # Engine(random_weights=...): weights made by the backend, none read
    if args.random_weights:
        if args.checkpoint:
            raise ValueError("give either a checkpoint or --random-weights, not both")
        from dgemma_rt import presets

        if on_cpu:
            check_cpu_memory(presets.preset(args.preset, args.num_layers), quant=quant, dense_quant=dense_quant)
        if not on_cpu and dense_quant is None:
            # Made on the device from the config alone (NVFP4 experts too): no checkpoint on disk.
            ckpt = random_config(args.preset, args.num_layers)
            random_seed = args.seed
        else:
            ckpt = random_checkpoint(args.preset, args.num_layers, quant, dense_quant, args.seed, progress)
            quant = dense_quant = None  # written in those formats already
    else:
        if args.num_layers is not None:
            raise ValueError("--num-layers goes with --random-weights")
        ckpt = pathlib.Path(args.checkpoint) if args.checkpoint else tiny_checkpoint()

    # Size the KV pool for the run: the prompt plus every committed canvas but the last, per row.
    kv_tokens = args.kv_cache_tokens
    if kv_tokens is None:
        canvas = _read_json(ckpt / "config.json").get("canvas_length") or 256
        canvases = math.ceil(args.new_tokens / canvas)
        needed = args.batch * (args.prompt_len + canvases * canvas)
        kv_tokens = max(DEFAULT_KV_CACHE_TOKENS, needed)

    if on_cpu:  # the CPU backend reads the weights from the map as stored; a GPU's live on the device
        check_cpu_memory(checkpoint_shape(ckpt), stored_bytes=None if (quant or dense_quant) else
                         checkpoint_weight_bytes(ckpt), quant=quant, dense_quant=dense_quant)
    t0 = time.perf_counter()
    engine = dgemma_rt.Engine(
        ckpt,
        random_weights=random_seed,
        device=args.device,
        num_threads=args.threads,
        kv_cache_tokens=kv_tokens,
        max_batch_size=max(8, args.batch),
        progress=progress,
        quant=quant,
        dense_quant=dense_quant,
        cpu_weights=args.cpu_weights,
    )
    load_s = time.perf_counter() - t0

    config = engine.config
    canvas_length = int(config["canvas_length"])
    max_canvases = math.ceil(args.new_tokens / canvas_length)
    prompts = random_prompts(config, args.batch, args.prompt_len, args.seed)
    pad = engine.generation_defaults.get("pad_token_id")
    gen_kwargs: dict[str, Any] = {
        "max_new_tokens": args.new_tokens,
        "max_denoising_steps": args.steps,
        "seed": args.seed,
        "adaptive_stopping": not args.fixed_steps,
    }
    if args.fixed_steps:
        gen_kwargs["eos_token_id"] = None
    if args.template is not None:
        gen_kwargs["canvas_template"] = random_template(config, args.batch, max_canvases * canvas_length, args.template,
                                                        args.seed)

    def generate(desc: str) -> tuple[Any, float]:
        bar, callbacks = None, {}
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=max_canvases, desc=desc, unit="canvas", file=sys.stderr, leave=False)
            # The canvas being denoised shows its step (a large model's canvas takes minutes on the CPU); the
            # bar is redrawn at most twice a second, so a fast GPU step pays one counter increment.
            state = {"step": 0, "shown": 0.0}

            def on_step(_draft: Any) -> None:
                state["step"] += 1
                now = time.monotonic()
                if now - state["shown"] >= 0.5:
                    state["shown"] = now
                    bar.set_postfix_str(f"step {state['step']}")

            def on_block(_block: Any) -> None:
                state["step"] = 0
                bar.set_postfix_str("", refresh=False)  # the last canvas's step is not this one's
                bar.update(1)

            callbacks = {"on_step": on_step, "on_block": on_block}
        try:
            start = time.perf_counter()
            out = engine.generate(prompts, **callbacks, **gen_kwargs)
            return out, time.perf_counter() - start
        finally:
            if bar is not None:
                bar.close()

    peer = None
    # On the CPU the two alternate run by run, so both see the same machine load. A GPU is not shared,
    # and the engine and the peer may not fit in its memory together (two bf16 copies of the 26B-A4B
    # are ~100 GB): there the peer is made and timed after the engine is gone.
    peer_after = args.peer is not None and args.device != "cpu"
    if args.peer:
        if not args.fixed_steps or args.template is not None:
            raise ValueError("--peer times fixed-step runs without templates (drop --adaptive / --template)")
        try:  # a usage error, said before the engine's runs (the peer's own failures come after them)
            import torch  # noqa: F401
            from transformers import DiffusionGemmaForBlockDiffusion  # noqa: F401
        except ImportError as e:
            raise ValueError(f"--peer transformers needs torch and transformers ({e})") from None
    # A peer that fails (an API change in transformers, out of memory) is reported beside the engine's
    # numbers as peer_error, not in place of them (the exit status still says it failed).
    peer_error = None

    def peer_failed(e: Exception) -> None:
        nonlocal peer_error
        peer_error = f"{type(e).__name__}: {e}"
        print(f"dgemma-bench: the transformers peer failed: {peer_error}", file=sys.stderr)

    def peer_run(record: bool) -> None:
        if peer is not None and peer_error is None:
            try:
                peer.run(record=record)
            except Exception as e:
                peer_failed(e)

    if args.peer and not peer_after:
        try:
            peer = TransformersPeer(ckpt, args.device, args.threads, prompts, args.new_tokens, args.steps)
        except Exception as e:
            peer_failed(e)

    for i in range(args.warmup):
        out, _ = generate(f"warmup {i + 1}/{args.warmup}")
        del out  # hands its KV blocks back before the next run
        peer_run(record=False)

    # The generate calls' own peak, apart from loading's (which converts weights and can peak higher).
    loaded_rss = _status_mib("VmRSS")
    peak_reset = reset_peak_rss()

    totals = {"prefill_s": 0.0, "denoise_s": 0.0, "total_s": 0.0, "decoder_forwards": 0, "encoder_forwards": 0}
    wall_s = 0.0
    new_tokens = 0
    canvases = 0
    steps: list[int] = []
    tpf: list[float] = []
    engine_runs_s: list[float] = []
    graphs_before = engine.scheduler_stats()
    for i in range(args.runs):
        out, wall = generate(f"run {i + 1}/{args.runs}")
        wall_s += wall
        engine_runs_s.append(wall)
        peer_run(record=True)  # alternately, so both see the same machine load
        for key in totals:
            totals[key] += out.timings[key]
        for row, seq in enumerate(out.sequences):
            new = np.asarray(seq[args.prompt_len :])
            new_tokens += int(new.size if pad is None else np.count_nonzero(new != pad))
            steps.extend(out.steps_per_canvas[row])
        canvases += max(len(s) for s in out.steps_per_canvas)
        tpf.extend(float(x) for x in out.tokens_per_forward)
        del out

    num_layers = int(engine.config["num_hidden_layers"])
    graphs_after = engine.scheduler_stats()
    op_profile = None
    if args.profile:
        engine.profile(True)  # decoder steps only: the per-step breakdown
        out, _ = generate("profiled run")
        engine.profile(False)
        op_profile = profile_report(engine.take_profile(), out.timings, engine.config, args)
        del out
    memory_fields = memory_report(engine.memory_stats(), on_cpu)
    # Decoder passes of the measured runs captured as / replayed from a CUDA graph (0 on the CPU).
    graph_fields = {k: int(graphs_after[k] - graphs_before[k]) for k in ("captured_passes", "replayed_passes")}
    # Failed captures over the engine's life (warm-up included): any turns graphs off for good.
    graph_fields["capture_failures"] = int(graphs_after.get("capture_failures", 0))
    if peer_after:
        del engine
        gc.collect()  # the engine's device memory goes back before the peer takes its own
        # The engine's numbers are measured by now: a peer that fails (out of memory, an API change in
        # transformers) or is interrupted (the GPU check's time cap sends SIGINT) is reported beside
        # them instead of discarding them.
        try:
            peer = TransformersPeer(ckpt, args.device, args.threads, prompts, args.new_tokens, args.steps)
            for _ in range(args.warmup):
                peer.run(record=False)
            for _ in range(args.runs):
                peer.run(record=True)
        except KeyboardInterrupt:
            peer_error = "interrupted before its timed runs ended"
            print(f"dgemma-bench: the transformers peer was {peer_error}", file=sys.stderr)
        except Exception as e:
            peer_failed(e)

    forwards = max(int(totals["decoder_forwards"]), 1)
    peer_fields: dict[str, Any] = {"peer": args.peer}
    if peer is not None and not peer.runs_s and peer_error is None:
        peer_error = f"every timed transformers run stopped early ({peer.excluded}): no ratio to report"
    if peer_error is not None:
        peer_fields["peer_error"] = peer_error
    if peer is not None:
        peer_fields.update({"peer_version": peer.version, "peer_dtype": peer.dtype, "peer_threads": peer.threads,
                            "peer_experts_implementation": peer.experts_implementation,
                            "peer_run_details": peer.run_details, "peer_excluded_runs": peer.excluded})
    if peer is not None and peer.runs_s and peer_error is None:  # a failed peer's runs so far: no ratio
        engine_ms = 1000.0 * float(np.median(engine_runs_s))
        peer_ms = 1000.0 * float(np.median(peer.runs_s))
        peer_fields.update({
            "peer_steps_per_canvas": peer.steps_per_canvas,
            "engine_runs_ms": [1000.0 * t for t in engine_runs_s],
            "peer_runs_ms": [1000.0 * t for t in peer.runs_s],
            "engine_median_ms": engine_ms,
            "peer_median_ms": peer_ms,
            "speedup_vs_peer": peer_ms / engine_ms if engine_ms > 0 else None,
        })
    return {
        **peer_fields,
        "checkpoint": str(ckpt),
        "tiny": args.checkpoint is None and not args.random_weights,
        "batch": args.batch,
        "prompt_len": args.prompt_len,
        "new_tokens": args.new_tokens,
        "steps": args.steps,
        "fixed_steps": args.fixed_steps,
        "threads": args.threads,
        "seed": args.seed,
        "warmup": args.warmup,
        "runs": args.runs,
        "kv_cache_tokens": kv_tokens,
        "quant": args.quant,
        "dense_quant": args.dense_quant,
        "template_free_fraction": args.template,
        "random_weights": args.random_weights,
        "preset": args.preset if args.random_weights else None,
        "num_layers": num_layers,
        "weight_bytes": checkpoint_weight_bytes(ckpt),
        "device": args.device,
        "cpu_weights": args.cpu_weights,
        # Whether cpu_weights="bf16" runs on the BF16 units here (AVX512-BF16), or as "stored".
        "cpu_bf16_dot": _cpu_has_bf16_dot(),
        # The machine's load while it ran (1, 5, 15 min): CPU timings on a shared machine need it.
        "load_avg": [round(v, 2) for v in os.getloadavg()] if hasattr(os, "getloadavg") else None,
        "dgemma_rt_version": _version(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "load_s": load_s,
        "tokens_per_s": new_tokens / totals["total_s"] if totals["total_s"] > 0 else 0.0,
        "ms_per_step": 1000.0 * totals["denoise_s"] / forwards,
        "ms_per_canvas": 1000.0 * totals["denoise_s"] / max(canvases, 1),
        "steps_per_canvas": float(np.mean(steps)) if steps else 0.0,
        "tokens_per_forward": float(np.mean(tpf)) if tpf else 0.0,
        "prefill_ms": 1000.0 * totals["prefill_s"],
        "denoise_ms": 1000.0 * totals["denoise_s"],
        "total_ms": 1000.0 * totals["total_s"],
        "wall_ms": 1000.0 * wall_s,
        "generated_tokens": new_tokens,
        "canvases": canvases,
        "decoder_forwards": int(totals["decoder_forwards"]),
        "encoder_forwards": int(totals["encoder_forwards"]),
        **graph_fields,
        **memory_fields,
        **({"op_profile": op_profile} if op_profile is not None else {}),
        "peak_rss_mib": peak_rss_mib(),
        "loaded_rss_mib": loaded_rss,
        "generate_peak_rss_mib": _status_mib("VmHWM") if peak_reset else None,
    }


def memory_report(stats: dict[str, int], on_cpu: bool) -> dict[str, Any]:
    """The backend's allocations (Engine.memory_stats) for the JSON: on a GPU its device memory (weights,
    KV cache, workspaces) and what cudaMemGetInfo says the whole device uses; on the CPU its host
    allocations (KV cache, workspaces; the float32 weights are the loader's and not counted)."""
    mib = 1024.0 * 1024.0
    fields: dict[str, Any] = {
        "peak_device_memory_mib": stats["peak_bytes"] / mib,
        "live_device_memory_mib": stats["live_bytes"] / mib,
        "device_memory_is_host": on_cpu,
    }
    if "device_total_bytes" in stats:
        fields["device_used_mib"] = (stats["device_total_bytes"] - stats["device_free_bytes"]) / mib
        fields["device_total_mib"] = stats["device_total_bytes"] / mib
    return fields


def _roofline_shape(config: dict[str, Any]) -> Any:
    """The roofline's ModelShape of the engine's model (its config as the engine read it)."""
    from dgemma_rt.tiny import ModelShape

    types = tuple(config["layer_types"])
    hd, kvh = list(config["head_dims"]), list(config["num_key_value_heads"])
    sliding = [i for i, t in enumerate(types) if t != "full_attention"]
    full = [i for i, t in enumerate(types) if t == "full_attention"]
    s, f = (sliding or full)[0], (full or sliding)[0]
    return ModelShape(
        vocab_size=int(config["vocab_size"]), hidden_size=int(config["hidden_size"]),
        intermediate_size=int(config["intermediate_size"]), layer_types=types,
        num_heads=int(config["num_attention_heads"]), num_kv_heads=kvh[s], head_dim=hd[s],
        global_head_dim=hd[f], num_global_kv_heads=kvh[f], num_experts=int(config["num_experts"]),
        top_k_experts=int(config["top_k_experts"]), moe_intermediate_size=int(config["moe_intermediate_size"]),
        sliding_window=int(config["sliding_window"]), canvas_length=int(config["canvas_length"]),
        max_position_embeddings=int(config["max_position_embeddings"]),
    )  # fmt: skip


def profile_report(profile: list[dict[str, Any]], timings: dict[str, Any], config: dict[str, Any],
                   args: argparse.Namespace) -> dict[str, Any]:
    """op_profile: the profiled run's per-op time per decoder step beside the roofline's bytes for the
    bench's shape, batch, mean context and precision (float32 everywhere on the CPU)."""
    from dgemma_rt import roofline

    on_cpu = args.device == "cpu"
    steps = max(int(timings["decoder_forwards"]), 1)
    step_ms = 1000.0 * float(timings["denoise_s"]) / steps
    canvas = int(config["canvas_length"])
    canvases = math.ceil(args.new_tokens / canvas)
    # Cached tokens per row, averaged over the canvases (attention's bytes grow linearly with it).
    context = int(round(args.prompt_len + canvas * (canvases - 1) / 2))
    quant = None if args.quant == "none" else args.quant
    dense_quant = None if args.dense_quant == "none" else args.dense_quant
    # The CUDA backend takes the fused LM head pass only when DGEMMA_CUDA_FUSED_LM_HEAD=1 (and the GPU allows it).
    fused = not on_cpu and os.environ.get("DGEMMA_CUDA_FUSED_LM_HEAD") == "1"
    rows = roofline.step_ops(_roofline_shape(config), args.batch, context, quant, dense_quant, host_f32=on_cpu,
                             fused_lm_head=fused)
    device = None if on_cpu else roofline.DEVICES[args.gpu]
    ops = []
    for p in profile:
        ms = 1000.0 * float(p["seconds"]) / steps
        nbytes, names, note = roofline.backend_op_bytes(rows, p["op"])
        entry: dict[str, Any] = {
            "op": p["op"], "calls_per_step": p["calls"] / steps, "ms_per_step": ms,
            "share_of_step": ms / step_ms if step_ms > 0 else None, "roofline_rows": names,
            "gbytes_per_step": None if nbytes is None else nbytes / 1e9, "achieved_gbps": None,
            "bandwidth_fraction": None,
        }
        if nbytes is not None and ms > 0:
            entry["achieved_gbps"] = nbytes / (ms / 1000.0) / 1e9
            entry["bandwidth_fraction"] = ("n/a" if device is None
                                           else entry["achieved_gbps"] / (device.hbm_tbps * 1000.0))
        if note:
            entry["note"] = note
        ops.append(entry)
    ops_ms = sum(o["ms_per_step"] for o in ops)
    return {
        "run": "one run after the timed ones; its decoder steps profiled, without CUDA graphs",
        "timer": "host clock per op" if on_cpu else "CUDA events around each op on the backend's stream",
        "decoder_steps": steps,
        "ms_per_step": step_ms,
        "ops_ms_per_step": ops_ms,
        # Host work of the step (uploads, the download, bookkeeping) and, on a GPU, launch gaps.
        "unattributed_ms_per_step": step_ms - ops_ms,
        "roofline_context": context,
        "roofline_precision": "float32 weights, activations and KV (the CPU backend)" if on_cpu
                              else f"experts {args.quant}, dense {args.dense_quant}, bf16 activations and KV",
        "bandwidth_device": None if device is None else device.name,
        "bandwidth_tbps": None if device is None else device.hbm_tbps,
        "roofline_rows_without_op": roofline.HOST_ROWS,
        "ops": ops,
    }


def format_report(r: dict[str, Any]) -> str:
    mode = "fixed" if r["fixed_steps"] else "adaptive"
    threads = r["threads"] if r["threads"] is not None else "auto"
    rss = f"{r['peak_rss_mib']:.1f} MiB" if r["peak_rss_mib"] is not None else "n/a"
    if r.get("generate_peak_rss_mib") is not None:
        rss += f" (while generating {r['generate_peak_rss_mib']:.1f} MiB, after loading {r['loaded_rss_mib']:.1f} MiB)"
    rows = [
        (
            "dgemma_rt",
            f"{r['dgemma_rt_version']} on {r['device']}, {r['machine']}, {r['cpu_count']} CPUs, Python {r['python']}",
        ),
        ("checkpoint", f"{'tiny: ' if r['tiny'] else ''}"
                       f"{'random ' + r['preset'] + ', ' + str(r['num_layers']) + ' layers: ' if r.get('random_weights') else ''}"
                       f"{r['checkpoint']} ({r.get('weight_bytes', 0) / 1e9:.2f} GB of weights, loaded in {r['load_s']:.2f} s)"),
        (
            "workload",
            (f"cpu_weights {r['cpu_weights']} "
             f"({'BF16 dot products' if r['cpu_weights'] == 'bf16' and r.get('cpu_bf16_dot') else 'float32 GEMMs'}), "
             if r.get("device", "cpu") == "cpu" and r.get("cpu_weights") else "") +
            f"batch {r['batch']}, prompt {r['prompt_len']}, new {r['new_tokens']}, "
            f"steps {r['steps']} ({mode}), threads {threads}, seed {r['seed']}, runs {r['runs']}, "
            f"quant {r.get('quant', 'none')}, dense quant {r.get('dense_quant', 'none')}"
            + (f", template {r['template_free_fraction']:.0%} free" if r.get("template_free_fraction") else ""),
        ),
        ("throughput", f"{r['tokens_per_s']:.1f} tokens/s ({r['generated_tokens']} tokens)"),
        (
            "denoise",
            f"{r['ms_per_step']:.2f} ms/step, {r['ms_per_canvas']:.1f} ms/canvas, "
            f"{r['steps_per_canvas']:.2f} steps/canvas, {r['tokens_per_forward']:.2f} tokens/forward",
        ),
        ("prefill", f"{r['prefill_ms']:.2f} ms"),
        ("total", f"{r['total_ms']:.1f} ms (wall {r['wall_ms']:.1f} ms)"),
        ("peak RSS", rss),
        ("backend memory", f"peak {r['peak_device_memory_mib']:.1f} MiB, live {r['live_device_memory_mib']:.1f} MiB"
                           + (" (host)" if r.get("device_memory_is_host") else "")
                           + (f"; device uses {r['device_used_mib']:.0f} of {r['device_total_mib']:.0f} MiB"
                              if r.get("device_used_mib") is not None else "")),
    ]
    prof = r.get("op_profile")
    if prof:
        rows.append(("profiled step", f"{prof['ms_per_step']:.2f} ms, ops {prof['ops_ms_per_step']:.2f} ms "
                                      f"({prof['timer']})"))
        for o in sorted(prof["ops"], key=lambda o: -o["ms_per_step"]):
            bw = ""
            if o["achieved_gbps"] is not None:
                frac = o["bandwidth_fraction"]
                bw = f", {o['achieved_gbps']:.1f} GB/s" + (f" ({frac:.0%} of peak)" if isinstance(frac, float) else "")
            share = o["share_of_step"] or 0.0
            rows.append((f"  {o['op']}", f"{o['ms_per_step']:.3f} ms/step, {share:.0%}{bw}"))
    if r.get("peer_error"):
        rows.append(("vs " + r["peer"], f"no comparison: {r['peer_error']}"))
    elif r.get("peer"):
        rows.append((
            "vs " + r["peer"],
            f"{r['speedup_vs_peer']:.2f}x: engine {r['engine_median_ms']:.1f} ms, {r['peer']} {r['peer_version']} "
            f"({r['peer_dtype']}, {r['peer_threads']} threads) {r['peer_median_ms']:.1f} ms per generate call "
            f"(medians of {r['runs']} alternating runs)",
        ))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


# What --roofline reads; any other option given with it is refused.
_ROOFLINE_OPTIONS = {"roofline", "preset", "num_layers", "batch", "steps", "quant", "dense_quant", "gpu", "context",
                     "fused_lm_head", "measured", "json", "no_progress"}


def _given(parser: argparse.ArgumentParser, args: argparse.Namespace, skip: set[str]) -> list[str]:
    """The options (by their first flag, or the positional's name) that differ from their defaults, outside skip."""
    names: list[str] = []
    for a in parser._actions:
        value = getattr(args, a.dest, None)
        if a.dest in skip or a.default == argparse.SUPPRESS or value == a.default:  # --help, --version
            continue
        if a.nargs == 0 and value != a.const:  # the other flag of a pair sharing this dest (--fixed-steps/--adaptive)
            continue
        name = a.option_strings[0] if a.option_strings else "a checkpoint"
        if name not in names:
            names.append(name)
    return names


def _verb(names: list[str], one: str, many: str) -> str:
    return f"{', '.join(names)} {one if len(names) == 1 else many}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # Started in the background without job control, SIGINT arrives ignored; a time cap that sends it
    # (bench/gpu_check.sh) must still end the peer with the engine's numbers printed.
    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)

    def command() -> int:
        # Options of the other mode are refused, not silently ignored.
        if args.roofline:
            given = _given(parser, args, _ROOFLINE_OPTIONS)
            if given:
                raise ValueError(f"--roofline models --preset's shape and runs nothing: "
                                 f"{_verb(given, 'does', 'do')} not apply")
        else:
            given = [name for name, on in (("--measured", args.measured), ("--fused-lm-head", args.fused_lm_head),
                                           ("--context", args.context is not None)) if on]
            if given:
                raise ValueError(f"{_verb(given, 'goes', 'go')} with --roofline")
            if args.preset is not None and not args.random_weights:
                raise ValueError("--preset goes with --random-weights (or --roofline)")
            if args.gpu is not None and not (args.profile and args.device.startswith("cuda")):
                raise ValueError("--gpu goes with --roofline, or with --profile on --device cuda")
        args.gpu = args.gpu or "h100"
        args.preset = args.preset or "26b-a4b"
        args.context = args.context or 4096
        if args.roofline:
            from dgemma_rt import presets, roofline

            quant = None if args.quant == "none" else args.quant
            dense_quant = None if args.dense_quant == "none" else args.dense_quant
            try:
                measured = roofline.load_measured(args.measured, quant, dense_quant) if args.measured else None
            except OSError as e:  # named as the option it came from ("[Errno 2] No such file" said nothing of it)
                raise ValueError(f"--measured {args.measured}: {e.strerror or e}") from None
            r = roofline.roofline(presets.preset(args.preset, args.num_layers), args.gpu, args.batch, args.context,
                                  quant, dense_quant, measured, fused_lm_head=args.fused_lm_head, steps=args.steps)
            print(json.dumps(r) if args.json else roofline.format_table(r))
            return 0
        result = run(args)
        print(json.dumps(result) if args.json else format_report(result))
        return 1 if result.get("peer_error") else 0  # the engine's numbers are printed either way

    return run_reporting_errors(command)


if __name__ == "__main__":
    sys.exit(main())
