"""Loading untrusted checkpoints in child processes: a small checkpoint to corrupt, safetensors helpers,
an independent validity check for safetensors headers, and a runner that loads each case in a forked
child under a memory cap (RLIMIT_AS) and a timeout.

The runner is a "zygote": one fresh Python process that imports dgemma_rt once and forks a child per
case, so a case costs milliseconds instead of an interpreter start, and whatever a case does (crash,
hang, runaway memory) stays in its own process. ``python checkpoint_fuzz.py --zygote`` runs it.
"""

from __future__ import annotations

import json
import os
import select
import struct
import subprocess
import sys
import time
from typing import Any

import numpy as np

# Small enough that a copy per case is cheap (~40 KB), with both layer kinds and every tensor kind.
SMALL_SHAPE = dict(
    vocab_size=64, hidden_size=16, intermediate_size=32, layer_types=("sliding_attention", "full_attention"),
    num_heads=2, num_kv_heads=1, head_dim=8, global_head_dim=16, num_global_kv_heads=1, num_experts=4,
    top_k_experts=2, moe_intermediate_size=8, sliding_window=8, canvas_length=8, max_position_embeddings=256,
)

# What a child may use: above what the zygote already maps (Python, numpy, the engine library).
MEMORY_CAP_BYTES = 1 << 30
# Loading this checkpoint takes milliseconds; a case that takes this long is hung.
CASE_TIMEOUT_S = 20.0
# Engine options for the cases: small pools, so that what a config asks for dominates.
LOAD_KWARGS = {"max_batch_size": 1, "kv_cache_tokens": 256, "num_threads": 1}

DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1, "I16": 2, "U16": 2,
               "F16": 2, "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8, "C64": 8}


# ------------------------------------------------------------------------------------------------ files
def write_safetensors(path: str, tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None) -> None:
    """float32 tensors, names sorted, data contiguous, header padded to 8 bytes (as the reference writer does)."""
    header: dict[str, Any] = {}
    if metadata is not None:
        header["__metadata__"] = metadata
    blobs, offset = [], 0
    for name in sorted(tensors):
        a = np.ascontiguousarray(tensors[name], dtype=np.float32)
        header[name] = {"dtype": "F32", "shape": list(a.shape), "data_offsets": [offset, offset + a.nbytes]}
        blobs.append(a.tobytes())
        offset += a.nbytes
    write_raw(path, json.dumps(header, separators=(",", ":")).encode(), b"".join(blobs))


def write_raw(path: str, header: bytes, data: bytes, header_len: int | None = None) -> None:
    header = header + b" " * (-len(header) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header) if header_len is None else header_len % 2**64))
        f.write(header)
        f.write(data)


def read_raw(path: str) -> tuple[bytes, bytes]:
    """(header bytes, data bytes) of a well-formed safetensors file."""
    with open(path, "rb") as f:
        blob = f.read()
    n = struct.unpack("<Q", blob[:8])[0]
    return blob[8 : 8 + n], blob[8 + n :]


def write_small_checkpoint(path: str, seed: int = 0) -> dict[str, tuple[str, list[int]]]:
    """The fuzz base: SMALL_SHAPE with random float32 weights in one model.safetensors.

    Returns name -> (dtype, shape) of the tensors a valid checkpoint must hold: all but the layer
    scalars, which may be missing (they keep their initial value 1, in the reference too).
    """
    from dgemma_rt import presets, tiny

    shape = tiny.ModelShape(**SMALL_SHAPE)
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(tiny.model_config(shape), f, indent=2, sort_keys=True)
    gen = tiny.generation_config()
    with open(os.path.join(path, "generation_config.json"), "w") as f:
        json.dump(gen, f, indent=2, sort_keys=True)
    rng = np.random.default_rng(seed)
    tensors = {s.name: (0.1 * rng.standard_normal(s.shape)).astype(np.float32) for s in presets.tensor_specs(shape)}
    write_safetensors(os.path.join(path, "model.safetensors"), tensors, {"format": "pt"})
    return {name: ("F32", list(a.shape)) for name, a in tensors.items() if not name.endswith(".layer_scalar")}


# ------------------------------------------------------------------------------------------------ oracle
def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")  # Python's json takes NaN and Infinity; the format does not


def _no_key_twice(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        raise ValueError("a key written twice in one object")  # ambiguous: which value is meant?
    return obj


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def header_is_valid(header: bytes, data_size: int, required: dict[str, tuple[str, list[int]]]) -> bool:
    """Whether a safetensors header is well formed (by the format, checked here in Python, independently of
    the engine) and still describes every tensor of `required` with the same dtype and shape."""
    try:
        text = header.decode("utf-8")
        top = json.loads(text, object_pairs_hook=_no_key_twice, parse_constant=_reject_constant)
    except (ValueError, RecursionError):
        return False  # not JSON, or a key written twice in one object (a tensor, or a field of one)
    if not isinstance(top, dict):
        return False
    try:
        json.dumps(top, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return False  # a lone surrogate escape ("\\ud800"): not valid Unicode
    ranges = []
    for name, info in top.items():
        if name == "__metadata__":
            continue
        if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= set(info):
            return False
        dtype, shape, offs = info["dtype"], info["shape"], info["data_offsets"]
        if not isinstance(dtype, str) or dtype not in DTYPE_BYTES:
            return False
        if not isinstance(shape, list) or len(shape) > 16 or not all(_is_int(d) and d >= 0 for d in shape):
            return False
        if not isinstance(offs, list) or len(offs) != 2 or not all(_is_int(o) and o >= 0 for o in offs):
            return False
        begin, end = offs
        if not begin <= end <= data_size or int(np.prod(shape, dtype=object)) * DTYPE_BYTES[dtype] != end - begin:
            return False
        if end > begin:
            ranges.append((begin, end))
    ranges.sort()
    if any(b[0] < a[1] for a, b in zip(ranges, ranges[1:])):
        return False
    for name, (dtype, shape) in required.items():
        info = top.get(name)
        if not isinstance(info, dict) or info["dtype"] != dtype or info["shape"] != shape:
            return False
    return True


# ------------------------------------------------------------------------------------------------ runner
class Runner:
    """Loads checkpoints in forked children of a zygote process (see the module docstring)."""

    def __init__(self) -> None:
        import dgemma_rt

        package_root = os.path.dirname(os.path.dirname(os.path.abspath(dgemma_rt.__file__)))
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
        env.update(OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")
        self.proc = subprocess.Popen(
            [sys.executable, "-u", os.path.abspath(__file__), "--zygote"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, text=True, bufsize=1,
        )
        ready = self._read_line(60)
        assert ready == "ready", f"zygote did not start: {ready!r}"

    def _read_line(self, timeout: float) -> str:
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            raise AssertionError("the zygote stopped answering")
        line = self.proc.stdout.readline()
        if not line:
            raise AssertionError(f"the zygote died (exit code {self.proc.poll()})")
        return line.strip()

    def load(self, path: str, kwargs: dict[str, Any] | None = None, generate: dict[str, Any] | None = None,
             timeout: float = CASE_TIMEOUT_S, memory_cap: int = MEMORY_CAP_BYTES) -> dict[str, Any]:
        """Loads `path` in a child; with `generate`, also runs engine.generate([[2, 3, 4]], **generate).

        Returns {"outcome": "loaded" | "checkpoint_error" | "other_error" | "timeout" | "crash", "message",
        "type", "maxrss" (bytes, children that ended normally), "seconds"}.
        """
        case = {"path": path, "kwargs": dict(LOAD_KWARGS if kwargs is None else kwargs), "generate": generate,
                "timeout": timeout, "memory_cap": memory_cap}
        self.proc.stdin.write(json.dumps(case) + "\n")
        self.proc.stdin.flush()
        return json.loads(self._read_line(timeout + 30))

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _child(case: dict[str, Any], out_fd: int) -> None:
    import resource

    import dgemma_rt

    t0 = time.monotonic()
    result: dict[str, Any]
    try:
        used = int(open("/proc/self/statm").read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
        cap = used + case["memory_cap"]
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
        engine = dgemma_rt.Engine(case["path"], **case["kwargs"])
        if case["generate"] is not None:
            out = engine.generate([[2, 3, 4]], **case["generate"])
            assert np.asarray(out.sequences).shape[0] == 1
        result = {"outcome": "loaded", "message": ""}
    except dgemma_rt.CheckpointError as e:
        result = {"outcome": "checkpoint_error", "message": str(e)[:600]}
    except BaseException as e:  # noqa: BLE001 - reported to the test, which decides
        result = {"outcome": "other_error", "type": type(e).__name__, "message": str(e)[:600]}
    result["maxrss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    result["seconds"] = time.monotonic() - t0
    os.write(out_fd, json.dumps(result).encode())


def _zygote() -> None:
    import signal

    import dgemma_rt  # noqa: F401  (imported once, inherited by every child)

    print("ready", flush=True)
    for line in sys.stdin:
        case = json.loads(line)
        r, w = os.pipe()
        t0 = time.monotonic()
        pid = os.fork()
        if pid == 0:
            os.close(r)
            try:
                _child(case, w)
            finally:
                os._exit(0)
        os.close(w)
        status = None
        chunks = []
        os.set_blocking(r, False)
        while status is None:
            try:
                while chunk := os.read(r, 65536):
                    chunks.append(chunk)
            except BlockingIOError:
                pass
            done, st = os.waitpid(pid, os.WNOHANG)
            if done:
                status = st
            elif time.monotonic() - t0 > case["timeout"]:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                break
            else:
                time.sleep(0.002)
        os.set_blocking(r, True)
        chunks.append(os.read(r, 1 << 20) if status is not None else b"")
        os.close(r)
        seconds = time.monotonic() - t0
        if status is None:
            result = {"outcome": "timeout", "message": f"killed after {case['timeout']} s"}
        elif os.WIFSIGNALED(status):
            result = {"outcome": "crash", "message": f"killed by signal {signal.Signals(os.WTERMSIG(status)).name}"}
        else:
            try:
                result = json.loads(b"".join(chunks))
            except ValueError:
                result = {"outcome": "crash", "message": f"exited with status {os.WEXITSTATUS(status)} and no result"}
        result.setdefault("seconds", seconds)
        print(json.dumps(result), flush=True)


if __name__ == "__main__" and sys.argv[1:] == ["--zygote"]:
    _zygote()
