"""`dgemma-bench`: generation throughput on random prompts.

Without a checkpoint it benches the built-in tiny model, built once into a cache directory. With
--fixed-steps (the default) every canvas runs exactly --steps denoising steps and EOS is ignored, so
each run does the same work: batch rows x ceil(new_tokens / canvas_length) canvases x steps.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import platform
import shutil
import sys
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from dgemma_rt.cli import _non_negative_int, _positive_int, _version, run_reporting_errors

# The full-attention pool the engine allocates when not told otherwise.
_DEFAULT_KV_TOKENS = 16384


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dgemma-bench",
        description="Benchmark dgemma_rt generation on random prompts (default: the built-in tiny checkpoint).",
    )
    p.add_argument("checkpoint", nargs="?", metavar="CKPT", help="checkpoint dir (default: the cached tiny model)")
    p.add_argument("--batch", type=_positive_int, default=1, help="rows per generate call (default 1)")
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
    p.add_argument("--threads", type=_positive_int, default=None, help="CPU threads (default: all cores)")
    p.add_argument("--quant", choices=["none", "nvfp4"], default="none",
                   help="nvfp4: quantize the MoE experts at load (on the CPU they run dequantized; default none)")
    p.add_argument("--dense-quant", choices=["none", "nvfp4", "fp8"], default="none",
                   help="also quantize the attention projections and dense MLP at load (default none)")
    p.add_argument("--kv-cache-tokens", type=_positive_int, default=None, help="KV pool size (default: fits the run)")
    p.add_argument("--seed", type=_non_negative_int, default=0, help="prompt and sampling seed (default 0)")
    p.add_argument("--warmup", type=_non_negative_int, default=1, help="untimed runs first (default 1)")
    p.add_argument("--runs", type=_positive_int, default=1, help="timed runs, results summed (default 1)")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (default: on when stderr is a TTY)")
    return p


def cache_root() -> pathlib.Path:
    env = os.environ.get("DGEMMA_RT_CACHE")
    if env:
        return pathlib.Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (pathlib.Path(xdg).expanduser() if xdg else pathlib.Path.home() / ".cache") / "dgemma_rt"


def tiny_checkpoint() -> pathlib.Path:
    """The cached tiny checkpoint, built on first use."""
    from dgemma_rt.tiny import FILES, TINY_FORMAT_VERSION, make_tiny

    path = cache_root() / f"tiny-{_version()}-{TINY_FORMAT_VERSION}"

    def complete() -> bool:
        return all((path / f).is_file() for f in FILES)

    if complete():
        return path
    # Build beside the target and rename, so a concurrent or interrupted run never sees half a checkpoint.
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f"{path.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    make_tiny(tmp)
    if not complete():
        shutil.rmtree(path, ignore_errors=True)  # an incomplete leftover
        try:
            os.rename(tmp, path)
        except OSError:
            if not complete():  # a real error, not a lost race to a complete copy
                raise
    shutil.rmtree(tmp, ignore_errors=True)
    return path


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


def peak_rss_mib() -> float | None:
    try:
        import resource
    except ImportError:  # Windows
        return None
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports KiB, macOS bytes.
    return rss / (1024 * 1024) if sys.platform == "darwin" else rss / 1024


def run(args: argparse.Namespace) -> dict[str, Any]:
    import dgemma_rt

    progress = not args.no_progress and sys.stderr.isatty()
    ckpt = pathlib.Path(args.checkpoint) if args.checkpoint else tiny_checkpoint()

    # Size the KV pool for the run: the prompt plus every committed canvas but the last, per row.
    kv_tokens = args.kv_cache_tokens
    if kv_tokens is None:
        canvas = _read_json(ckpt / "config.json").get("canvas_length") or 256
        canvases = math.ceil(args.new_tokens / canvas)
        needed = args.batch * (args.prompt_len + canvases * canvas)
        kv_tokens = max(_DEFAULT_KV_TOKENS, needed)

    t0 = time.perf_counter()
    engine = dgemma_rt.Engine(
        ckpt,
        num_threads=args.threads,
        kv_cache_tokens=kv_tokens,
        max_batch_size=max(8, args.batch),
        progress=progress,
        quant=None if args.quant == "none" else args.quant,
        dense_quant=None if args.dense_quant == "none" else args.dense_quant,
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

    def generate(desc: str) -> tuple[Any, float]:
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=max_canvases, desc=desc, unit="canvas", file=sys.stderr, leave=False)
        try:
            start = time.perf_counter()
            out = engine.generate(prompts, on_block=(lambda _block: bar.update(1)) if bar else None, **gen_kwargs)
            return out, time.perf_counter() - start
        finally:
            if bar is not None:
                bar.close()

    for i in range(args.warmup):
        out, _ = generate(f"warmup {i + 1}/{args.warmup}")
        del out  # hands its KV blocks back before the next run

    totals = {"prefill_s": 0.0, "denoise_s": 0.0, "total_s": 0.0, "decoder_forwards": 0, "encoder_forwards": 0}
    wall_s = 0.0
    new_tokens = 0
    canvases = 0
    steps: list[int] = []
    tpf: list[float] = []
    for i in range(args.runs):
        out, wall = generate(f"run {i + 1}/{args.runs}")
        wall_s += wall
        for key in totals:
            totals[key] += out.timings[key]
        for row, seq in enumerate(out.sequences):
            new = np.asarray(seq[args.prompt_len :])
            new_tokens += int(new.size if pad is None else np.count_nonzero(new != pad))
            steps.extend(out.steps_per_canvas[row])
        canvases += max(len(s) for s in out.steps_per_canvas)
        tpf.extend(float(x) for x in out.tokens_per_forward)
        del out

    forwards = max(int(totals["decoder_forwards"]), 1)
    return {
        "checkpoint": str(ckpt),
        "tiny": args.checkpoint is None,
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
        "device": "cpu",
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
        "peak_rss_mib": peak_rss_mib(),
    }


def format_report(r: dict[str, Any]) -> str:
    mode = "fixed" if r["fixed_steps"] else "adaptive"
    threads = r["threads"] if r["threads"] is not None else "auto"
    rss = f"{r['peak_rss_mib']:.1f} MiB" if r["peak_rss_mib"] is not None else "n/a"
    rows = [
        (
            "dgemma_rt",
            f"{r['dgemma_rt_version']} on {r['device']}, {r['machine']}, {r['cpu_count']} CPUs, Python {r['python']}",
        ),
        ("checkpoint", f"{'tiny: ' if r['tiny'] else ''}{r['checkpoint']} (loaded in {r['load_s']:.2f} s)"),
        (
            "workload",
            f"batch {r['batch']}, prompt {r['prompt_len']}, new {r['new_tokens']}, "
            f"steps {r['steps']} ({mode}), threads {threads}, seed {r['seed']}, runs {r['runs']}, "
            f"quant {r.get('quant', 'none')}, dense quant {r.get('dense_quant', 'none')}",
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
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def command() -> int:
        result = run(args)
        print(json.dumps(result) if args.json else format_report(result))
        return 0

    return run_reporting_errors(command)


if __name__ == "__main__":
    sys.exit(main())
