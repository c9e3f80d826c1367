"""Helpers of bench/gpu_check.sh (standard library only: they run before anything is installed).

  stubs MANIFEST DIR          metadata-only wheels for what the GPU machine already has (tools/gpu_machine.txt)
  options FILE                the --options a module's argparse parsers declare (read from the source, not imported)
  cutlass WHEEL DEST          unpack the CUTLASS include tree of the nvidia-cutlass wheel into DEST; print its path
  check-report REPORT WHEELS  pip's --report: every distribution comes from WHEELS or a stub; list what installs
  results OUT [WORK]          add provenance to each raw dgemma-bench JSON and name it for bench/results/
  summary OUT [WORK]          $OUT/summary.json and summary.md from the steps' records (WORK: where
                              provenance.json and steps.jsonl are; default OUT)
  pytest-files JOBS WORK FILE...
                              each test file in a pytest process of its own, JOBS at a time (a device fault
                              leaves its process's CUDA context unusable: it then costs one file, not every test
                              after it); JUnit as WORK/junit-gpu-<file>.xml, whole outputs in WORK/logs/tests/

The prebuilt dgemma_rt wheel (tools/gpu_wheels.sh --prebuild; docs/gpu-bringup.md):
  source-hash ROOT [--git]    sha256 of the source files the wheel is built from (--git: fail unless they are
                              exactly git's tracked files there, so that the GPU machine, which has no .git and
                              walks the folders, hashes the same list)
  stamp WHEEL ROOT ARCH OUT [KEY=VALUE...]
                              write the wheel's stamp (commit, source hash, architectures, sha256, extras)
  prebuilt WHEELS ROOT ARCH [--install]
                              is there a prebuilt wheel in WHEELS for this checkout's sources and ARCH? (a later
                              commit that changed none of the sources still matches)
                              exit 0 (usable), 1 (present but stale or damaged), 2 (none); --install: then install
                              it into this Python (pip --no-deps --no-index) and verify it, exit 0 only if both did
  verify-install [ARCH]       the installed dgemma_rt: CUDA compiled, from this Python's prefix, with machine code
                              for ARCH (cuobjdump, where there is one) and for every visible GPU (cuda_status)
"""

from __future__ import annotations

import ast
import base64
import datetime
import hashlib
import json
import os
import pathlib
import platform
import re
import shutil
import subprocess
import sys
import time
import zipfile
from typing import Any

_INCLUDE_IN_WHEEL = "cutlass_library/source/include/"


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


def read_manifest(path: str) -> list[tuple[str, str]]:
    out = []
    for line in pathlib.Path(path).read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, version = line.split("==")
            out.append((name.strip(), version.strip()))
    return out


def stubs(manifest: str, dest: str) -> None:
    """One py3-none-any wheel per manifest line (python itself left out), holding only its metadata."""
    d = pathlib.Path(dest)
    d.mkdir(parents=True, exist_ok=True)
    for name, version in read_manifest(manifest):
        if name == "python":
            continue
        dist = f"{_norm(name)}-{version}"
        files = {
            f"{dist}.dist-info/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
                                          "Summary: stub for a package the GPU machine already has\n",
            f"{dist}.dist-info/WHEEL": "Wheel-Version: 1.0\nGenerator: gpu_check\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
        }
        record = []
        for fname, text in files.items():
            digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=").decode()
            record.append(f"{fname},sha256={digest},{len(text.encode())}")
        record.append(f"{dist}.dist-info/RECORD,,")
        files[f"{dist}.dist-info/RECORD"] = "\n".join(record) + "\n"
        with zipfile.ZipFile(d / f"{dist}-py3-none-any.whl", "w") as z:
            for fname, text in files.items():
                z.writestr(fname, text)


def options(path: str) -> None:
    """Prints each option string passed to add_argument / add_parser in a module's source."""
    tree = ast.parse(pathlib.Path(path).read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in (
                "add_argument", "add_parser"):
            for a in node.args:
                if isinstance(a, ast.Constant) and isinstance(a.value, str):
                    found.add(a.value)
    print("\n".join(sorted(found)))


def cutlass(wheel: str, dest: str) -> None:
    root = pathlib.Path(dest)
    include = root / _INCLUDE_IN_WHEEL
    if not (include / "cutlass" / "cutlass.h").is_file():
        tmp = root.with_name(root.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        with zipfile.ZipFile(wheel) as z:
            z.extractall(tmp, [n for n in z.namelist() if n.startswith(_INCLUDE_IN_WHEEL)])
        shutil.rmtree(root, ignore_errors=True)
        os.replace(tmp, root)
    if not (include / "cutlass" / "cutlass.h").is_file() or not (include / "cute" / "tensor.hpp").is_file():
        sys.exit(f"{wheel} holds no CUTLASS include tree")
    print(include.resolve())


def check_report(report: str, wheels: str) -> None:
    """Every distribution pip chose comes from the carried folder or a stub, and none twice."""
    carried = {p.name for p in pathlib.Path(wheels).glob("*.whl")}
    data = json.loads(pathlib.Path(report).read_text())
    seen = {}
    for item in data.get("install", []):
        meta = item["metadata"]
        name = _norm(meta["name"])
        fname = item["download_info"]["url"].rsplit("/", 1)[-1]
        if name in seen:
            sys.exit(f"two versions of {name} in the resolution")
        seen[name] = (meta["version"], "carried" if fname in carried else "on the machine (stub)")
    for name, (version, where) in sorted(seen.items()):
        print(f"  {name} {version}: {where}")


def _gpu_tag(device: str) -> str:
    m = re.search(r"\b([A-Z]\d{2,4}[A-Z]*)\b", device)
    return m.group(1).lower() if m else "gpu"


def results(out: str, work: str | None = None) -> None:
    """results/raw-NAME.json (dgemma-bench's --json) -> results/<gpu>-NAME.json with the provenance. WORK:
    where provenance.json and steps.jsonl are (default OUT; --pack keeps them out of OUT)."""
    o = pathlib.Path(out)
    w = pathlib.Path(work or out)
    prov = json.loads((w / "provenance.json").read_text())
    tag = _gpu_tag(prov.get("device", ""))
    steps = [json.loads(line) for line in (w / "steps.jsonl").read_text().splitlines() if line.strip()]
    for raw in sorted((o / "results").glob("raw-*.json")):
        name = raw.stem[len("raw-"):]
        try:
            result = json.loads(raw.read_text())
        except ValueError:  # the step failed (its log says why): nothing to keep
            raw.unlink()
            continue
        # the exact command: the step's, which wrote this file
        command = next((s["command"] for s in steps if f"/{raw.name}" in s["command"]), None)
        result.update(
            git_commit=prov["git_commit"], git_dirty=prov["git_dirty"], gpu=prov["device"],
            gpu_driver=prov["driver"], command=command, check_summary="summary.json of the same run",
            date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            source="bench/gpu_check.sh",
        )  # fmt: skip
        target = o / "results" / f"{tag}-{name}.json"
        target.write_text(json.dumps(result, indent=2) + "\n")
        raw.unlink()
        print(target)


def kernels_summary(j: dict) -> str:
    """One line of bench/kernels_gpu.py's JSON: the issue-13 targets and the sections that failed."""
    def ms(v):
        return "-" if v is None else f"{v:.3f} ms"

    t = j.get("targets", {})
    parts = []
    for hd in (512, 256):
        a = t.get(f"attention_hd{hd}_faster_than_sdpa", {})
        if a:
            parts.append(f"attention hd{hd} {ms(a.get('ms'))} vs SDPA ({a.get('sdpa_backend')}) "
                         f"{ms(a.get('sdpa_ms'))}")
    for name in ("moe_experts_nvfp4", "moe_experts_bf16"):
        e = next((v for k, v in t.items() if k.startswith(name + "_within")), {})
        if e.get("ratio") is not None:
            target = f" (target 1.25x: {'meets' if e['meets'] else 'misses'})" if "nvfp4" in name else ""
            parts.append(f"{name} {ms(e.get('ms'))} = {e['ratio']:.2f}x its weight bytes at HBM bandwidth{target}")
    k = j.get("kernels", {})
    for name in ("moe_router", "lm_head"):
        if k.get(name, {}).get("ms") is not None:
            parts.append(f"{name} {ms(k[name]['ms'])}")
    failed = [s for s, v in j.get("sections", {}).items() if v.get("status") != "ok"]
    if failed:
        parts.append("FAILED sections: " + ", ".join(failed))
    return "; ".join(parts) or "no kernel timed"


def summary(out: str, work: str | None = None) -> None:
    """OUT/summary.json and summary.md; WORK as for results."""
    o = pathlib.Path(out)
    w = pathlib.Path(work or out)
    prov = json.loads((w / "provenance.json").read_text())
    steps = []
    for line in (w / "steps.jsonl").read_text().splitlines():
        if line.strip():
            steps.append(json.loads(line))
    ok = all(s["status"] in ("ok", "skipped") for s in steps)
    doc = dict(prov, ok=ok, total_s=round(sum(s["seconds"] for s in steps), 1), steps=steps,
               results=sorted(p.name for p in (o / "results").glob("*.json")))
    (o / "summary.json").write_text(json.dumps(doc, indent=2) + "\n")
    lines = [f"# GPU check: {prov['device']} (driver {prov['driver']}), commit {prov['git_commit']}"
             f"{' (dirty)' if prov['git_dirty'] else ''}", "",
             "| step | status | seconds | note |", "| --- | --- | --- | --- |"]
    for s in steps:
        lines.append(f"| {s['name']} | {s['status']} | {s['seconds']:.1f} | {s.get('note', '')[:160]} |")
    for r in doc["results"]:
        try:
            j = json.loads((o / "results" / r).read_text())
            if "kernels" in j:
                lines.append(f"\n{r}: {kernels_summary(j)}")
                continue
            lines.append(f"\n{r}: {j.get('tokens_per_s', 0):.1f} tok/s, {j.get('ms_per_step', 0):.2f} ms/step, "
                         f"prefill {j.get('prefill_ms', 0):.1f} ms")
        except (ValueError, TypeError, KeyError, AttributeError):
            pass
    (o / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


# ------------------------------------------------------------------------------ the GPU tests

def _junit_counts(path: pathlib.Path) -> dict[str, int] | None:
    import xml.etree.ElementTree as ET

    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return None
    suites = [root] if root.tag == "testsuite" else root.findall("testsuite")
    return {k: sum(int(x.get(k, 0)) for x in suites) for k in ("tests", "failures", "errors", "skipped")}


def pytest_files(jobs: str, work: str, *files: str) -> None:
    """Runs each of ``files`` in a pytest process of its own, ``jobs`` at a time; exits with the worst status.

    An illegal address or a trap leaves the CUDA context of its process unusable, so in one pytest run every
    test after a faulting one fails too and says nothing. Per file, a fault costs that file. Each file's whole
    output goes to WORK/logs/tests/<file>.log; this prints a line per file as it ends, then its failures (pytest's
    short summary), and last the totals from the JUnit files (the step's note). SIGINT (the step's timeout)
    reaches the children too (the same process group): they write their reports, and this waits for them.
    """
    n_jobs = max(1, int(jobs))
    w = pathlib.Path(work)
    logs = w / "logs" / "tests"
    logs.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    threads = str(max(1, (os.cpu_count() or 1) // n_jobs))  # the numpy references of n_jobs processes at once
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        env.setdefault(var, threads)
    # The largest files first (the backend's end-to-end tests): a rough guess at the longest-running.
    queue = sorted(files, key=lambda f: -os.path.getsize(f))
    running: dict[str, tuple[subprocess.Popen[bytes], float, Any]] = {}
    status: dict[str, int] = {}
    t0 = time.time()

    def stem(f: str) -> str:
        return pathlib.Path(f).stem

    def start(f: str) -> None:
        log = open(logs / f"{stem(f)}.log", "wb")
        cmd = [sys.executable, "-m", "pytest", "-v", "-rfEs", "--durations=10", "-p", "no:cacheprovider",
               f"--junitxml={w / f'junit-gpu-{stem(f)}.xml'}", f]
        running[f] = (subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env), time.time(), log)

    def finish(f: str, rc: int) -> None:
        proc, began, log = running.pop(f)
        log.close()
        rc = 128 - rc if rc < 0 else rc  # killed by signal N: 128 + N, as a shell says it
        status[f] = rc
        text = (logs / f"{stem(f)}.log").read_text(errors="replace").splitlines()
        print(f"[tests] {f}: exit {rc} after {time.time() - began:.1f}s (log: logs/tests/{stem(f)}.log)", flush=True)
        tail = next((i for i, line in enumerate(text) if "short test summary info" in line), None)
        for line in text[tail:] if tail is not None else text[-3:]:
            print(f"    {line}", flush=True)

    interrupted = False
    try:
        while queue or running:
            while queue and len(running) < n_jobs:
                start(queue.pop(0))
            for f in list(running):
                rc = running[f][0].poll()
                if rc is not None:
                    finish(f, rc)
            time.sleep(0.2)
    except KeyboardInterrupt:
        interrupted = True
        grace = time.time() + 10  # one deadline for all, inside timeout's -k 15: pytest writes its report
        for f in list(running):
            try:
                rc = running[f][0].wait(timeout=max(0.0, grace - time.time()))
            except subprocess.TimeoutExpired:
                running[f][0].kill()
                rc = running[f][0].wait()
            finish(f, rc)
    for f in queue:
        print(f"[tests] {f}: not run (interrupted)", flush=True)
    totals = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    missing = []
    for f in status:
        c = _junit_counts(w / f"junit-gpu-{stem(f)}.xml")
        if c is None:
            missing.append(stem(f))
            continue
        for k in totals:
            totals[k] += c[k]
    bad = [stem(f) for f, rc in status.items() if rc not in (0, 5)]  # 5: no tests collected
    worst = max((rc for rc in status.values() if rc not in (0, 5)), default=0)
    print(f"[tests] {len(status)} of {len(files)} files in {time.time() - t0:.0f}s"
          f"{' (interrupted)' if interrupted else ''}: {totals['tests']} tests, {totals['failures']} failed, "
          f"{totals['errors']} errors, {totals['skipped']} skipped"
          + (f"; failing files: {', '.join(bad)}" if bad else "")
          + (f"; no JUnit from: {', '.join(missing)}" if missing else ""), flush=True)
    sys.exit(130 if interrupted and not worst else worst)


# ------------------------------------------------------------------------------ the prebuilt wheel

STAMP = "dgemma_rt-prebuilt.json"  # beside the wheel in the carried folder
# What the wheel is built from (pyproject.toml's wheel.packages, CMakeLists.txt's sources and installs; the
# examples are off), and what .gitignore keeps out of those folders (the GPU machine gets git's files only).
SOURCE_PATHS = ("CMakeLists.txt", "pyproject.toml", "csrc", "python/dgemma_rt", "tools/build_backend")
_SKIP_DIRS = {"__pycache__", ".pytest_cache"}
_SKIP_TOP = {"python/dgemma_rt/bin", "python/dgemma_rt/lib", "python/dgemma_rt/include"}


def _source_files(root: pathlib.Path) -> list[str]:
    out = []
    for top in SOURCE_PATHS:
        p = root / top
        if p.is_file() or p.is_symlink():
            out.append(top)
            continue
        for d, dirs, files in os.walk(p):
            rel = pathlib.Path(d).relative_to(root).as_posix()
            dirs[:] = sorted(x for x in dirs if x not in _SKIP_DIRS and not x.endswith(".egg-info")
                             and f"{rel}/{x}" not in _SKIP_TOP)
            out += [f"{rel}/{f}" for f in files if not f.endswith((".so", ".pyc"))]
    return sorted(out)


def source_hash_of(root: str | pathlib.Path) -> tuple[str, list[str]]:
    root = pathlib.Path(root)
    h = hashlib.sha256()
    files = _source_files(root)
    for rel in files:
        p = root / rel
        data = os.readlink(p).encode() if p.is_symlink() else p.read_bytes()
        h.update(f"{rel}\0{len(data)}\0".encode())
        h.update(data)
    return h.hexdigest(), files


def source_hash(root: str, *flags: str) -> None:
    digest, files = source_hash_of(root)
    if "--git" in flags:
        tracked = subprocess.run(["git", "-C", root, "ls-files", "--", *SOURCE_PATHS], capture_output=True,
                                 text=True, check=True).stdout.split()
        extra, missing = sorted(set(files) - set(tracked)), sorted(set(tracked) - set(files))
        if extra or missing:
            sys.exit(f"the source hash would not match on the GPU machine: files git does not track: {extra[:5]}, "
                     f"tracked files the hash leaves out: {missing[:5]}")
    print(digest)


def _sha256(path: pathlib.Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _git_state(root: str | pathlib.Path) -> tuple[str, bool] | None:
    """(HEAD, tracked files modified) of a git checkout, None where there is no git or no .git."""
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True)
        if head.returncode != 0:
            return None
        st = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                            capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return head.stdout.strip(), bool(st.stdout.strip())


def checkout_commit(root: str | pathlib.Path, wheels: str | pathlib.Path) -> tuple[str, bool, str]:
    """(commit, dirty, where from): git where there is a .git, else the carried folder's SOURCE_COMMIT."""
    state = _git_state(root)
    if state is not None:
        return state[0], state[1], "git"
    p = pathlib.Path(wheels) / "SOURCE_COMMIT"
    try:
        words = p.read_text().split()
    except OSError:
        return "unknown", False, "no .git and no SOURCE_COMMIT"
    return (words[0] if words else "unknown"), "dirty" in words[1:], str(p)


def stamp(wheel: str, root: str, arch: str, out: str, *extra: str) -> None:
    w = pathlib.Path(wheel)
    state = _git_state(root)
    if state is None:
        sys.exit(f"{root} is no git checkout: a prebuilt wheel must name the commit it was built from")
    commit, dirty = state
    if dirty:
        sys.exit(f"{root} has uncommitted changes: commit them first (a prebuilt wheel is stamped with its commit)")
    doc = {"wheel": w.name, "sha256": _sha256(w), "bytes": w.stat().st_size, "commit": commit,
           "source_sha256": source_hash_of(root)[0], "cuda_architectures": arch,
           "built": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    for kv in extra:
        k, _, v = kv.partition("=")
        doc[k] = v
    pathlib.Path(out).write_text(json.dumps(doc, indent=2) + "\n")
    print(json.dumps(doc, indent=2))


def prebuilt_status(wheels: str | pathlib.Path, root: str | pathlib.Path, arch: str) -> tuple[int, str, dict]:
    """(0 usable / 1 stale or damaged / 2 none, one line saying why, the stamp)."""
    wheels = pathlib.Path(wheels)
    found = sorted(wheels.glob("dgemma_rt-*.whl"))
    sp = wheels / STAMP
    if not found and not sp.exists():
        return 2, f"no prebuilt dgemma_rt wheel in {wheels}", {}
    try:
        st = json.loads(sp.read_text())
    except (OSError, ValueError) as e:
        return 1, f"prebuilt wheel(s) {[p.name for p in found]} without a readable {STAMP}: {e}", {}
    w = wheels / str(st.get("wheel", ""))
    if len(found) != 1 or found[0] != w:
        return 1, f"{STAMP} names {st.get('wheel')}, the folder holds {[p.name for p in found]}", st
    if _sha256(w) != st.get("sha256"):
        return 1, f"{w.name} is not the wheel {STAMP} was written for (sha256 differs)", st
    commit, dirty, where = checkout_commit(root, wheels)
    short = str(st.get("commit", "?"))[:12]
    if dirty:
        return 1, f"the checkout has uncommitted changes ({where}): {w.name} was built from the commit {short}", st
    if commit == "unknown":  # nothing names the checkout's commit: the results could not say what ran
        return 1, f"stale: {w.name} was built from {short}, the checkout's commit is unknown ({where})", st
    digest = source_hash_of(root)[0]
    if st.get("source_sha256") != digest:
        if st.get("commit") != commit:
            return 1, f"stale: {w.name} was built from {short}, the checkout is {commit[:12]} ({where})", st
        return 1, (f"the sources differ from those {w.name} was built from (commit {short}): edited after the "
                   f"stamp, or files added under {', '.join(SOURCE_PATHS)}"), st
    if st.get("cuda_architectures") != arch:
        return 1, f"{w.name} has code for {st.get('cuda_architectures')}, this build asks for {arch}", st
    if st.get("commit") != commit:  # a later commit that changed nothing the wheel is built from (docs, tests)
        return 0, (f"{w.name} matches the checkout's sources and {arch} (built from {short}, the checkout is "
                   f"{commit[:12]}, {where}: nothing under {', '.join(SOURCE_PATHS)} changed)"), st
    return 0, f"{w.name} matches the checkout (commit {short}, sources, {arch})", st


def verify_install(arch: str = "90a-real") -> None:
    """Runs in a fresh interpreter from / (not the checkout) and exits non-zero with the reason."""
    code = r"""
import os, subprocess, shutil, sys
import dgemma_rt
from dgemma_rt import _core
print("[verify] dgemma_rt", dgemma_rt.__file__)
status = dgemma_rt.cuda_status()
print("[verify] cuda_status():", status)
if not dgemma_rt.cuda_compiled():
    sys.exit("dgemma_rt was built without CUDA")
if not os.path.realpath(dgemma_rt.__file__).startswith(os.path.realpath(sys.prefix) + os.sep):
    sys.exit(f"dgemma_rt is imported from {dgemma_rt.__file__}, outside this Python's prefix {sys.prefix}")
if dgemma_rt.cuda_device_count() > 0 and ("no code for it" in status or "code in this build" not in status):
    sys.exit("no machine code in this build for the GPU: " + status)
want = sys.argv[1]
cuobjdump = shutil.which("cuobjdump")
if cuobjdump:
    elf = subprocess.run([cuobjdump, "--list-elf", _core.__file__], capture_output=True, text=True).stdout
    archs = sorted({w.split(".")[-2] for w in elf.split() if w.endswith(".cubin")})
    print("[verify] cuobjdump --list-elf:", len(elf.splitlines()), "cubins for", " ".join(archs))
    for a in want.replace("-real", "").split(";"):
        if "sm_" + a not in archs:
            sys.exit(f"{_core.__file__} has no sm_{a} machine code (cuobjdump: {' '.join(archs) or 'none'})")
else:
    print("[verify] no cuobjdump here: the machine code was not listed")
"""
    r = subprocess.run([sys.executable, "-c", code, arch], cwd="/")
    if r.returncode != 0:
        sys.exit(r.returncode)


def prebuilt(wheels: str, root: str, arch: str, *flags: str) -> None:
    rc, why, st = prebuilt_status(wheels, root, arch)
    if "--install" not in flags:
        print(why)
        if rc == 0:
            for k in ("platform_tag", "glibc_max", "python", "built"):
                if k in st:
                    print(f"  {k}: {st[k]}")
        sys.exit(rc)
    if rc != 0:
        print(f"[build] not using a prebuilt wheel: {why}")
        sys.exit(rc)
    w = pathlib.Path(wheels) / st["wheel"]
    t = time.time()
    r = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "--no-cache-dir",
                        "--force-reinstall", "--disable-pip-version-check", str(w)],
                       capture_output=True, text=True)
    sys.stdout.write(r.stdout + r.stderr)
    if r.returncode != 0:
        if "is not a supported wheel on this platform" in r.stdout + r.stderr:
            libc = " ".join(platform.libc_ver())
            print(f"[build] pip refuses the platform tag of {w.name} here ({libc or 'libc unknown'}, "
                  f"Python {platform.python_version()}): tag {st.get('platform_tag', '?')}, "
                  f"needs glibc {st.get('glibc_max', '?')}")
        print(f"[build] not using the prebuilt wheel: pip install failed (exit {r.returncode})")
        sys.exit(1)
    r = subprocess.run([sys.executable, os.path.abspath(__file__), "verify-install", arch])
    if r.returncode != 0:
        print("[build] not using the prebuilt wheel: installed, but the check of the installed package failed")
        subprocess.run([sys.executable, "-m", "pip", "uninstall", "-y", "-q", "dgemma_rt"])
        sys.exit(1)
    print(f"[build] path: prebuilt wheel {w.name} (commit {st['commit'][:12]}, {arch}), installed and checked in "
          f"{time.time() - t:.1f}s: no compile")


def main(argv: list[str]) -> None:
    cmds = {"stubs": stubs, "options": options, "cutlass": cutlass, "check-report": check_report,
            "results": results, "summary": summary, "source-hash": source_hash, "stamp": stamp,
            "prebuilt": prebuilt, "verify-install": verify_install, "pytest-files": pytest_files}
    if not argv or argv[0] not in cmds:
        sys.exit(__doc__)
    cmds[argv[0]](*argv[1:])


if __name__ == "__main__":
    main(sys.argv[1:])
