"""Resident memory of the CPU backend with the weights kept as stored vs expanded to float32.

For each Engine(cpu_weights=...) mode, a fresh process loads a random-weight checkpoint of a preset
(bf16 by default, written once into dgemma-bench's cache) and reads /proc/self/status after the load
and after one encode + denoising pass (which touches every weight): VmRSS, and its anonymous (our
allocations) and file-backed (pages of the checkpoint's memory map) parts. Writes JSON.

    python bench/cpu_weights_memory.py --preset cpu-medium --out bench/results/cpu-weights-memory.json
"""

from __future__ import annotations

import argparse
import json
import pathlib
import subprocess
import sys

CHILD = r"""
import json, sys
import numpy as np
import dgemma_rt

def status():
    out = {}
    for line in open("/proc/self/status"):
        k, _, v = line.partition(":")
        if k in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
            out[k] = int(v.split()[0]) * 1024
    return out

path, mode = sys.argv[1], sys.argv[2]
before = status()
e = dgemma_rt.Engine(path, num_threads=2, cpu_weights=mode, kv_cache_tokens=1024, max_batch_size=1)
loaded = status()
vocab, canvas = e.config["vocab_size"], e.config["canvas_length"]
rng = np.random.default_rng(0)
e.denoise_logits(e.encode(rng.integers(3, vocab, size=(1, 32)).tolist()),
                 rng.integers(3, vocab, size=(1, canvas)).astype(np.int32))
print(json.dumps({"before": before, "loaded": loaded, "after_step": status()}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="cpu-medium")
    ap.add_argument("--num-layers", type=int, default=None)
    ap.add_argument("--quant", choices=["nvfp4"], default=None)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    from dgemma_rt import bench

    ckpt = bench.random_checkpoint(args.preset, args.num_layers, args.quant, None, 0, False)
    result = {"preset": args.preset, "num_layers": args.num_layers, "quant": args.quant or "bf16",
              "checkpoint_weight_bytes": bench.checkpoint_weight_bytes(ckpt), "modes": {}}
    for mode in ("stored", "float32"):
        r = subprocess.run([sys.executable, "-c", CHILD, str(ckpt), mode], capture_output=True, text=True, check=True)
        result["modes"][mode] = json.loads(r.stdout.strip().splitlines()[-1])
    for mode, m in result["modes"].items():
        gb = {k: round(v / 2**20, 1) for k, v in m["after_step"].items()}
        print(f"{mode:8s} after load VmRSS {m['loaded']['VmRSS'] / 2**20:8.1f} MiB; after a step (MiB): {gb}")
    s, f = (result["modes"][m]["after_step"]["VmRSS"] for m in ("stored", "float32"))
    result["rss_ratio_stored_over_float32_after_step"] = round(s / f, 3)
    print(f"checkpoint tensors {result['checkpoint_weight_bytes'] / 2**20:.1f} MiB; "
          f"VmRSS stored / float32 after a step: {s / f:.3f}")
    if args.out:
        pathlib.Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
