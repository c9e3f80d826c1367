"""What a stored benchmark result says about where it came from: commit, command, machine."""

from __future__ import annotations

import datetime
import json
import os
import sys
import platform
import subprocess
from pathlib import Path


def provenance(script: str, argv: list[str]) -> dict:
    root = Path(__file__).resolve().parent.parent

    def git(*a: str) -> str:
        r = subprocess.run(["git", "-C", str(root), *a], capture_output=True, text=True)
        return r.stdout.strip()

    cpu = "unknown"
    try:
        cpu = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                         capture_output=True, text=True) if _has("nvidia-smi") else None
    return {
        "git_commit": git("rev-parse", "HEAD"),
        "git_dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
        "command": " ".join(["python", script, *argv]),
        "cpu_model": cpu,
        "cpu_count": os.cpu_count(),
        "gpu": gpu.stdout.strip() if gpu is not None and gpu.returncode == 0 else "none",
        "platform": platform.platform(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def _has(cmd: str) -> bool:
    from shutil import which

    return which(cmd) is not None


def check_json_path(path: str | None) -> None:
    """ValueError for a --json PATH that cannot be written, before the benchmark runs (not after it,
    with its result lost)."""
    if not path:
        return
    p = Path(path)
    if p.is_dir():
        raise ValueError(f"--json {path}: is a directory")
    if not p.parent.is_dir():
        raise ValueError(f"--json {path}: folder {p.parent} does not exist")
    if not os.access(p.parent, os.W_OK) or (p.exists() and not os.access(p, os.W_OK)):
        raise ValueError(f"--json {path}: not writable")


def emit(result: dict, path: str | None) -> None:
    """Writes the result as JSON to path (and names it on stderr), or prints it."""
    text = json.dumps(result, indent=2) + "\n"
    if path:
        Path(path).write_text(text)
        print(path, file=sys.stderr)
    else:
        sys.stdout.write(text)
