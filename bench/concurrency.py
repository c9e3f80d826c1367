"""Throughput and latency against the number of concurrent clients (the continuous batcher).

    python bench/concurrency.py [CKPT] [--concurrency 1,2,4,8,16] [--json bench/results/NAME.json]

Each level starts C client threads that send requests back to back (closed loop) through
``Engine.submit``/``result``, until --requests-per-client requests each are done. Every request does
the same work (a random prompt, --new-tokens rounded up to whole canvases, exactly --steps steps
per canvas, EOS ignored), so the levels compare like with like. Latency is measured in the
client, from submit to result. Without a checkpoint it uses the cached built-in tiny model.
"""

from __future__ import annotations

import argparse
import math
import sys
import threading
import time

import numpy as np

import dgemma_rt
from dgemma_rt.bench import random_prompts, tiny_checkpoint
from dgemma_rt.cli import _positive_int, run_reporting_errors
from provenance import check_json_path, emit, provenance


def _levels(text: str) -> list[int]:
    try:
        levels = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--concurrency takes comma-separated integers, got {text!r}") from None
    if not levels or min(levels) <= 0:
        raise argparse.ArgumentTypeError(f"--concurrency levels must be positive integers, got {text!r}")
    return levels


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", nargs="?", help="checkpoint dir (default: the cached tiny model)")
    p.add_argument("--concurrency", type=_levels, default=[1, 2, 4, 8, 16], help="levels (default 1,2,4,8,16)")
    p.add_argument("--requests-per-client", type=_positive_int, default=3, help="requests per client (default 3)")
    p.add_argument("--prompt-len", type=_positive_int, default=32, help="prompt tokens (default 32)")
    p.add_argument("--new-tokens", type=_positive_int, default=64, help="max_new_tokens (default 64)")
    p.add_argument("--steps", type=_positive_int, default=16, help="denoising steps per canvas (default 16)")
    p.add_argument("--max-batch-size", type=_positive_int, default=None, help="default: the largest level")
    p.add_argument("--threads", type=_positive_int, default=None, help="CPU threads (default: all cores)")
    p.add_argument("--json", metavar="PATH",
                   help="write the results with their provenance to this file (default: print them)")
    return p.parse_args(argv)


def run_level(engine, config, clients: int, args, new_tokens: int, desc: str = "") -> dict:
    latencies: list[float] = []
    queue: list[float] = []
    errors: list[BaseException] = []
    lock = threading.Lock()
    start = threading.Barrier(clients + 1)
    # Made here, not in the clients: a client failing before the barrier would leave it waiting forever.
    prompts = [random_prompts(config, args.requests_per_client, args.prompt_len, seed=1000 * clients + c)
               for c in range(clients)]
    bar = None
    if desc and sys.stderr.isatty():
        from tqdm import tqdm

        bar = tqdm(total=clients * args.requests_per_client, desc=desc, unit="req", file=sys.stderr, leave=False)

    def client(c: int) -> None:
        try:
            start.wait()
            for i, ids in enumerate(prompts[c]):
                t0 = time.perf_counter()
                out = engine.submit([ids.tolist()], seed=c * 1000 + i, max_new_tokens=args.new_tokens,
                                    max_denoising_steps=args.steps, eos_token_id=[], adaptive_stopping=False,
                                    keep_cache=False).result()
                with lock:
                    latencies.append(time.perf_counter() - t0)
                    queue.append(out.timings["queue_s"])
                    if bar is not None:
                        bar.update(1)
        except BaseException as e:  # reported by the caller
            errors.append(e)

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    s0 = engine.scheduler_stats()
    start.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    s1 = engine.scheduler_stats()
    if bar is not None:
        bar.close()
    if errors:
        raise errors[0]
    n = len(latencies)
    lat = np.asarray(latencies) * 1000
    passes = s1["decoder_passes"] - s0["decoder_passes"]
    return {
        "concurrency": clients,
        "requests": n,
        "wall_s": round(wall, 4),
        "requests_per_s": round(n / wall, 3),
        "tokens_per_s": round(n * new_tokens / wall, 1),
        "latency_ms": {k: round(float(v), 1) for k, v in
                       (("mean", lat.mean()), ("p50", np.percentile(lat, 50)), ("p95", np.percentile(lat, 95)),
                        ("max", lat.max()))},
        "mean_queue_ms": round(1000 * float(np.mean(queue)), 1),
        "decoder_passes": passes,
        "rows_per_pass": round((s1["row_steps"] - s0["row_steps"]) / max(passes, 1), 2),
        "ms_per_pass": round(1000 * wall / max(passes, 1), 2),
    }


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    check_json_path(args.json)
    ckpt = args.checkpoint or str(tiny_checkpoint())
    engine = dgemma_rt.Engine(ckpt, max_batch_size=args.max_batch_size or max(args.concurrency),
                              num_threads=args.threads)
    config = engine.config
    new_tokens = math.ceil(args.new_tokens / config["canvas_length"]) * config["canvas_length"]
    run_level(engine, config, 1, argparse.Namespace(**{**vars(args), "requests_per_client": 1}), new_tokens)  # warm-up
    rows = []
    print(f"{'clients':>7} {'req':>4} {'req/s':>7} {'tok/s':>8} {'p50 ms':>8} {'p95 ms':>8} {'queue ms':>8} "
          f"{'rows/pass':>9} {'ms/pass':>8}", file=sys.stderr)
    for c in args.concurrency:
        r = run_level(engine, config, c, args, new_tokens, desc=f"{c} clients")
        rows.append(r)
        print(f"{c:>7} {r['requests']:>4} {r['requests_per_s']:>7} {r['tokens_per_s']:>8} "
              f"{r['latency_ms']['p50']:>8} {r['latency_ms']['p95']:>8} {r['mean_queue_ms']:>8} "
              f"{r['rows_per_pass']:>9} {r['ms_per_pass']:>8}", file=sys.stderr)
    result = {
        "benchmark": "concurrency",
        "checkpoint": args.checkpoint or "built-in tiny model (random weights)",
        "device": "cpu",
        "model": {k: config[k] for k in ("vocab_size", "hidden_size", "num_hidden_layers", "canvas_length")},
        "params": {"prompt_len": args.prompt_len, "new_tokens": new_tokens, "steps": args.steps,
                   "requests_per_client": args.requests_per_client, "max_batch_size": engine.max_batch_size,
                   "threads": args.threads or dgemma_rt._core.max_threads()},
        "levels": rows,
        **provenance("bench/concurrency.py", argv),
    }
    emit(result, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(run_reporting_errors(main))  # user errors (a bad checkpoint or --json path) in one line
