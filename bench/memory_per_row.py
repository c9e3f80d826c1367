"""Host memory per extra batch row of a generate call, at the released vocabulary and canvas.

    python bench/memory_per_row.py [CKPT] [--batches 1,4] [--steps 2] [--json bench/results/NAME.json]

Runs dgemma-bench once per batch size, each in its own process, and compares the peak RSS of the
generate calls (the high-water mark is reset after loading; Linux). Without a checkpoint it uses
random weights at the `wide-vocab` preset: vocabulary 262,144 and canvas 256 on a tiny body, so
what scales with rows x canvas x vocab shows at full size.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

from dgemma_rt.cli import _positive_int, run_reporting_errors
from provenance import check_json_path, emit, provenance


def _batches(text: str) -> list[int]:
    try:
        levels = sorted({int(x) for x in text.split(",") if x.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"--batches takes comma-separated integers, got {text!r}") from None
    if len(levels) < 2 or levels[0] <= 0:
        raise argparse.ArgumentTypeError(f"--batches needs at least two positive sizes, got {text!r}")
    return levels


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", nargs="?", help="checkpoint dir (default: random weights, preset wide-vocab)")
    p.add_argument("--batches", type=_batches, default=[1, 4], help="batch sizes (default 1,4)")
    p.add_argument("--steps", type=_positive_int, default=2, help="denoising steps per canvas (default 2)")
    p.add_argument("--json", metavar="PATH",
                   help="write the results with their provenance to this file (default: print them)")
    args = p.parse_args(argv)
    check_json_path(args.json)
    source = [args.checkpoint] if args.checkpoint else ["--random-weights", "--preset", "wide-vocab"]
    runs = []
    for b in args.batches:
        cmd = [sys.executable, "-m", "dgemma_rt.bench", *source, "--batch", str(b), "--prompt-len", "8",
               "--new-tokens", "256", "--steps", str(args.steps), "--warmup", "0", "--json", "--no-progress"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            print(proc.stderr, file=sys.stderr)
            return 1
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        if r.get("generate_peak_rss_mib") is None:
            print("this platform cannot reset the peak RSS (/proc/self/clear_refs)", file=sys.stderr)
            return 1
        runs.append({k: r[k] for k in ("batch", "loaded_rss_mib", "generate_peak_rss_mib", "ms_per_step",
                                       "generated_tokens")})
        print(f"batch {b}: peak RSS while generating {r['generate_peak_rss_mib']:.1f} MiB "
              f"(after loading {r['loaded_rss_mib']:.1f} MiB)", file=sys.stderr)
    lo, hi = runs[0], runs[-1]
    per_row = (hi["generate_peak_rss_mib"] - lo["generate_peak_rss_mib"]) / (hi["batch"] - lo["batch"])
    print(f"{per_row:.1f} MiB of host memory per extra row", file=sys.stderr)
    result = {
        "benchmark": "memory_per_row",
        "checkpoint": args.checkpoint or "random weights, preset wide-vocab",
        "device": "cpu",
        "steps": args.steps,
        "runs": runs,
        "mib_per_extra_row": round(per_row, 2),
        **provenance("bench/memory_per_row.py", argv),
    }
    emit(result, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(run_reporting_errors(main))  # user errors (a bad checkpoint or --json path) in one line
