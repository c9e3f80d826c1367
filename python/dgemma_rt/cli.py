"""`dgemma-rt`: make the tiny checkpoint, generate text from a checkpoint, serve it over HTTP."""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Callable, Sequence
from typing import Any


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _batch_size(text: str) -> int:
    from dgemma_rt.engine import MAX_BATCH_SIZE

    value = _positive_int(text)
    if value > MAX_BATCH_SIZE:
        raise argparse.ArgumentTypeError(f"at most {MAX_BATCH_SIZE} rows, got {value}")
    return value


def _thread_count(text: str) -> int:
    from dgemma_rt import _core

    value = _positive_int(text)
    limit = _core.thread_limit()
    if value > limit:
        raise argparse.ArgumentTypeError(f"at most {limit} on this machine (4 per CPU, and never fewer than 16), got {value}")
    return value


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {value}")
    return value


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port number, got {text!r}") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"expected a port number in [0, 65535], got {value}")
    return value


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text}")
    return value


CPU_WEIGHTS_HELP = ("CPU GEMMs for BF16 weights: bf16 (default: the CPU's BF16 dot products where it has "
                    "AVX512-BF16, else as stored), stored (float32 arithmetic on the weights as stored: the "
                    "float32 reference results) or float32 (expanded at load, same results as stored)")

DEVICE_HELP = ("cpu (default), or cuda / cuda:N where this build has the CUDA backend and a GPU it has code for "
               "(not yet run on a GPU: see the README's status)")

# C0 controls other than tab and newline, DEL and C1 controls: shown escaped on a terminal.
_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f]")

_RAY_ONLY = ("replicas", "max_replicas", "gpus_per_replica", "cpus_per_replica", "ray_address")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dgemma-rt", description="DiffusionGemma inference engine.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    tiny = sub.add_parser("make-tiny", help="write the built-in tiny random checkpoint")
    tiny.add_argument("dir", metavar="DIR", help="output directory: new, empty, or a tiny checkpoint to rewrite "
                      "(created if needed)")
    tiny.add_argument("--seed", type=_non_negative_int, default=0, help="weight seed (default 0)")
    tiny.set_defaults(func=_cmd_make_tiny)

    gen = sub.add_parser("generate", help="generate text from a prompt")
    gen.add_argument("checkpoint", metavar="CKPT", help="checkpoint directory (with tokenizer.json)")
    gen.add_argument("--prompt", required=True,
                     help="the prompt text; '-' reads it from standard input (one trailing newline dropped)")
    gen.add_argument("--chat", action="store_true", help="wrap the prompt as a user turn of the chat template")
    gen.add_argument("--max-new-tokens", type=_positive_int, default=None,
                     help="whole canvases (default: the checkpoint's generation_config.json, else 256)")
    gen.add_argument("--steps", type=_positive_int, default=None,
                     help="max denoising steps per canvas (default: the checkpoint's generation_config.json, else 48)")
    gen.add_argument("--seed", type=_non_negative_int, default=0, help="sampling seed (default 0)")
    sampler = gen.add_argument_group("sampler (default: the checkpoint's generation_config.json, else the reference's)")
    sampler.add_argument("--t-min", type=float, default=None, help="temperature of the last denoising step (0.4)")
    sampler.add_argument("--t-max", type=float, default=None, help="temperature of the first denoising step (0.8)")
    sampler.add_argument("--entropy-bound", type=float, default=None,
                         help="entropy a step may accept in all (0.1; more accepts more tokens per step)")
    sampler.add_argument("--fixed-steps", action="store_true",
                         help="run every canvas for exactly --steps steps (no adaptive stopping)")
    gen.add_argument("--threads", type=_thread_count, default=None, help="CPU threads (default: all cores)")
    gen.add_argument("--device", default="cpu", help=DEVICE_HELP)
    gen.add_argument("--cpu-weights", choices=["bf16", "stored", "float32"], default="bf16", help=CPU_WEIGHTS_HELP)
    gen.set_defaults(func=_cmd_generate)

    srv = sub.add_parser("serve", help="serve a checkpoint over an OpenAI-compatible HTTP API")
    srv.add_argument("checkpoint", metavar="CKPT", help="checkpoint directory (with tokenizer.json)")
    srv.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    srv.add_argument("--port", type=_port, default=8000, help="port (default 8000; 0: any free port)")
    srv.add_argument("--model-name", default=None, help="model id clients send (default: the checkpoint dir's name)")
    srv.add_argument("--max-queue", type=_non_negative_int, default=64,
                     help="requests that may wait while every worker is busy; more get 429 (default 64)")
    srv.add_argument("--kv-cache-tokens", type=_positive_int, default=None, help="KV pool size in tokens (default 16384)")
    srv.add_argument("--max-batch-size", type=_batch_size, default=8,
                     help="requests denoised together in one batch (default 8)")
    srv.add_argument("--threads", type=_thread_count, default=None, help="CPU threads (default: all cores)")
    srv.add_argument("--device", default="cpu", help=DEVICE_HELP + "; with --ray, on every replica")
    srv.add_argument("--cpu-weights", choices=["bf16", "stored", "float32"], default="bf16", help=CPU_WEIGHTS_HELP)
    srv.add_argument("--max-request-tokens", type=_positive_int, default=8192,
                     help="largest max_tokens a request may ask for (default 8192; more is a 400)")
    srv.add_argument("--max-request-steps", type=_positive_int, default=256,
                     help="largest max_denoising_steps / stability_threshold a request may ask for (default 256)")
    ray = srv.add_argument_group("Ray Serve (pip install 'dgemma_rt[ray]'; see the README's Serving section)")
    ray.add_argument("--ray", action="store_true",
                     help="serve replicas on Ray Serve (a local Ray instance unless --ray-address)")
    ray.add_argument("--replicas", type=_positive_int, default=None, help="replicas, one Engine each (default 1)")
    ray.add_argument("--max-replicas", type=_positive_int, default=None,
                     help="autoscale on ongoing requests between --replicas and this many")
    ray.add_argument("--gpus-per-replica", type=_non_negative_float, default=None, help="default 0")
    ray.add_argument("--cpus-per-replica", type=_non_negative_float, default=None,
                     help="default 1 (also the engine's threads on CPU replicas unless --threads)")
    ray.add_argument("--ray-address", default=None,
                     help="join a running Ray cluster ('auto', or ray://host:10001) instead of starting one")
    srv.set_defaults(func=_cmd_serve)
    return parser


def _version() -> str:
    import dgemma_rt

    return str(getattr(dgemma_rt, "__version__", "unknown"))


def _cmd_make_tiny(args: argparse.Namespace) -> int:
    from dgemma_rt.tiny import make_tiny

    if not args.dir:  # "" (an unset shell variable) would be the current directory
        raise ValueError("the output directory is an empty string")
    path = make_tiny(args.dir, seed=args.seed)
    print(f"wrote tiny checkpoint to {path}", file=sys.stderr)
    return 0


def _progress(engine: Any, args: argparse.Namespace, kwargs: dict[str, Any]) -> Any:
    """A bar of committed canvases with the current canvas's denoising step (a large model on the CPU takes
    minutes); it adds the callbacks that drive it to kwargs. Ends early when the text reaches its EOS."""
    from tqdm import tqdm

    new = args.max_new_tokens or engine.generation_defaults.get("max_new_tokens") or 256
    canvas = int(engine.config["canvas_length"])
    bar = tqdm(total=-(-new // canvas), desc="generating", unit="canvas", file=sys.stderr, leave=False)
    step = 0

    def on_step(draft: Any) -> None:
        nonlocal step
        step += 1
        bar.set_postfix_str(f"step {step}")

    def on_block(block: Any) -> None:
        nonlocal step
        step = 0
        bar.update(1)

    kwargs.update(on_step=on_step, on_block=on_block)
    return bar


def _cmd_generate(args: argparse.Namespace) -> int:
    import dgemma_rt
    from dgemma_rt.text import check_text, lacks_tokenizer

    if args.prompt == "-":  # before loading: a pipe that fails, fails at once
        text_in = sys.stdin.read()
        args.prompt = text_in[:-1] if text_in.endswith("\n") else text_in
    no_tokenizer = f"{args.checkpoint} has no tokenizer.json; `dgemma-rt generate` needs one to read the prompt"
    # Before the load (minutes for a large checkpoint): what the load cannot change.
    check_text(args.prompt, "--prompt")  # before the chat template, whose text the position would count in
    if lacks_tokenizer(args.checkpoint):
        raise ValueError(no_tokenizer)
    engine = dgemma_rt.Engine(args.checkpoint, device=args.device, num_threads=args.threads,
                              cpu_weights=args.cpu_weights)
    tok = engine.tokenizer
    if tok is None:
        raise ValueError(no_tokenizer)
    if args.chat and tok.chat_template is None:
        raise ValueError(f"{args.checkpoint} has no chat template (tokenizer_config.json, chat_template.jinja): "
                         "drop --chat")
    prompt: str | list[dict[str, str]] = [{"role": "user", "content": args.prompt}] if args.chat else args.prompt
    kwargs = {"seed": args.seed}  # the rest: the checkpoint's generation_config.json, else generate()'s defaults
    if args.max_new_tokens is not None:
        kwargs["max_new_tokens"] = args.max_new_tokens
    if args.steps is not None:
        kwargs["max_denoising_steps"] = args.steps
    for name in ("t_min", "t_max", "entropy_bound"):  # range-checked by generate(), which names them
        if getattr(args, name) is not None:
            kwargs[name] = getattr(args, name)
    if args.fixed_steps:
        kwargs["adaptive_stopping"] = False
    bar = _progress(engine, args, kwargs) if sys.stderr.isatty() else None
    try:
        text = engine.generate_text(prompt, **kwargs)
    finally:
        if bar is not None:
            bar.close()
    # Random-weight checkpoints produce any bytes; never fail on a terminal that cannot show them, and
    # never send it control sequences (escape codes) from the model's text.
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(errors="replace")
    if sys.stdout.isatty():
        text = _CONTROL.sub(lambda m: repr(m.group())[1:-1], text)
    print(text, flush=True)  # flushed here: a closed pipe is reported by run_reporting_errors
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    if args.ray:
        return _cmd_serve_ray(args)
    given = [f"--{name.replace('_', '-')}" for name in _RAY_ONLY if getattr(args, name) is not None]
    if given:
        raise ValueError(f"{', '.join(given)} only apply with --ray")
    try:
        from dgemma_rt.server import serve
    except ImportError as e:
        raise ValueError(f"dgemma-rt serve needs the web stack: pip install 'dgemma_rt[serve]' ({e})") from None
    serve(
        args.checkpoint,
        host=args.host,
        port=args.port,
        model_name=args.model_name,
        max_queue=args.max_queue,
        kv_cache_tokens=args.kv_cache_tokens,
        max_batch_size=args.max_batch_size,
        device=args.device,
        num_threads=args.threads,
        cpu_weights=args.cpu_weights,
        max_request_tokens=args.max_request_tokens,
        max_request_steps=args.max_request_steps,
    )
    return 0


def _cmd_serve_ray(args: argparse.Namespace) -> int:
    try:
        from dgemma_rt import ray_serve
    except ImportError as e:
        # ray_serve's own message already gives the hint and names the missing module (e.__cause__)
        why = e.__cause__ if e.__cause__ is not None else e
        raise ValueError(f"dgemma-rt serve --ray needs Ray Serve: pip install 'dgemma_rt[ray]' ({why})") from None
    replicas = 1 if args.replicas is None else args.replicas
    if args.max_replicas is not None and args.max_replicas < replicas:
        raise ValueError(f"--max-replicas {args.max_replicas} is below --replicas {replicas}")
    if args.max_queue == 0:
        raise ValueError("--max-queue 0 is not available with --ray: Serve's queue holds at least 1 request")
    ray_serve._check_replica_device(args.device, args.gpus_per_replica or 0)
    ray_serve.run(
        args.checkpoint,
        host=args.host,
        port=args.port,
        address=args.ray_address,
        model_name=args.model_name,
        replicas=replicas,
        max_replicas=args.max_replicas,
        num_gpus=args.gpus_per_replica or 0,
        num_cpus=1 if args.cpus_per_replica is None else args.cpus_per_replica,
        max_batch_size=args.max_batch_size,
        max_queued_requests=args.max_queue,
        kv_cache_tokens=args.kv_cache_tokens,
        device=args.device,
        num_threads=args.threads,
        cpu_weights=args.cpu_weights,
        max_request_tokens=args.max_request_tokens,
        max_request_steps=args.max_request_steps,
    )
    return 0


def run_reporting_errors(command: Callable[[], int]) -> int:
    """Runs a command; user errors (bad path, bad checkpoint, bad arguments) get one line, not a traceback."""
    import dgemma_rt

    try:
        return int(command())
    except BrokenPipeError:  # the reader went away (`| head`): quietly, as other command-line tools
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit's flush
        except (OSError, ValueError):
            pass
        return 128 + 13  # SIGPIPE's status
    except (dgemma_rt.CheckpointError, ValueError, RuntimeError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_reporting_errors(lambda: args.func(args))


if __name__ == "__main__":
    sys.exit(main())
