"""bench/gpu_check.sh --dry-run: the wheels the GPU check carries install offline and resolve for the GPU
machine's Python 3.12 against what it already has, and every step's command exists (see docs/gpu-bringup.md).

Downloads the wheel set first (tools/gpu_wheels.sh, ~20 MB from PyPI, once: build/gpu-wheels is kept);
skipped only when PyPI cannot be reached and the wheels are not there yet.
"""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import shutil
import socket
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
WHEELS = ROOT / "build" / "gpu-wheels"


def _listed() -> list[str]:
    out = []
    for line in (ROOT / "tools" / "gpu_wheels.txt").read_text().splitlines():
        line = line.split("#", 1)[0].split()
        if line:
            name, version = line[0].split("==")
            out.append(f"{name.replace('-', '_')}-{version}-")
    return out


def _have_wheels() -> bool:
    names = [p.name for p in WHEELS.glob("*.whl")]
    return (WHEELS / "SOURCE_COMMIT").is_file() and all(any(n.startswith(w) for n in names) for w in _listed())


def _pypi_reachable() -> bool:
    try:
        socket.create_connection(("pypi.org", 443), timeout=5).close()
        return True
    except OSError:
        return False


def _env() -> dict[str, str]:
    # The interpreter running the tests, and its scripts (an installed dgemma-bench) first on PATH.
    env = dict(os.environ, PYTHON=sys.executable)
    env["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), env.get("PATH", "")])
    return env


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_gpu_check_dry_run():
    env = _env()
    if not _have_wheels():
        proc = subprocess.run(["bash", str(ROOT / "tools" / "gpu_wheels.sh")], env=env, capture_output=True,
                              text=True, timeout=300)
        if proc.returncode != 0 and not _pypi_reachable():
            pytest.skip("PyPI unreachable and build/gpu-wheels incomplete: cannot fetch the GPU check's wheels")
        assert proc.returncode == 0, proc.stdout + proc.stderr
    proc = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), "--dry-run"], env=env, capture_output=True,
                          text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "FAIL" not in out and "dry run: 0 problem(s)" in out, out
    # the resolution for the GPU machine: the carried wheels, the rest from what it has
    assert "transformers 5.23.0: carried" in out and "huggingface_hub 1.33.0: on the machine (stub)" in out, out
    # the plan names every step, in order
    # the peer last among the benchmarks: it is the first the budget cuts, and its failure costs nothing else
    steps = ["provenance", "wheels", "build", "tests", "kernels", "bench-bf16", "memcheck", "bench-nvfp4", "bench-peer",
             "results"]
    plan = out.split("== the plan", 1)[1].splitlines()[1:]
    assert [line.split()[0] for line in plan[: len(steps)]] == steps, out
    assert "90a-real" in out and "CMAKE_BUILD_PARALLEL_LEVEL=16" in out and "DGEMMA_CUTLASS_INCLUDE=" in out
    # the kernel microbenchmark: its dry run passed here, its step writes raw-kernels.json; the bf16 bench profiles
    if importlib.util.find_spec("torch") is not None:
        assert "ok:   bench/kernels_gpu.py --dry-run" in out, out
    else:
        assert "note: bench/kernels_gpu.py --dry-run not run" in out, out
    step = {line.split()[0]: line for line in plan[: len(steps)]}
    assert "bench/kernels_gpu.py --out $OUT/results/raw-kernels.json" in step["kernels"]
    assert "cap   90s  needs build" in step["kernels"]
    assert "--profile --gpu $GPU_KIND" in step["bench-bf16"] and "--profile" not in step["bench-nvfp4"]
    # modules, not console scripts (which need the interpreter's bin on PATH); JUnit beside the logs
    assert "-m dgemma_rt.bench" in step["bench-nvfp4"] and "-m dgemma_rt.cli make-tiny" in step["memcheck"]
    assert "dgemma-bench " not in out.split("== the plan", 1)[1] and "gpu_check_lib.py pytest-files 4 $WORK" in step["tests"]


def test_gpu_check_dry_run_names_a_missing_wheel(tmp_path):
    """An incomplete wheel folder fails the dry run and names what is missing (no download needed)."""
    (tmp_path / "SOURCE_COMMIT").write_text("0" * 40 + "\n")
    env = dict(_env(), GPU_WHEELS=str(tmp_path))
    proc = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), "--dry-run"], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode != 0
    assert "FAIL: transformers==5.23.0 missing" in proc.stdout and "tools/gpu_wheels.sh" in proc.stdout


def test_results_and_summary_carry_the_kernels_json(tmp_path):
    """The results step names raw-kernels.json for bench/results/ with the provenance; the summary gives its
    target verdicts (made-up numbers: no GPU here)."""
    (tmp_path / "results").mkdir()
    (tmp_path / "provenance.json").write_text(json.dumps({
        "git_commit": "a" * 40, "git_dirty": False, "device": "NVIDIA H100 80GB HBM3", "driver": "580.1"}))
    cmd = "cd / && python3 bench/kernels_gpu.py --out $OUT/results/raw-kernels.json"
    (tmp_path / "steps.jsonl").write_text(json.dumps({"name": "kernels", "status": "ok", "rc": 0, "seconds": 31.0,
                                                      "timeout_s": 90, "command": cmd, "note": ""}) + "\n")
    (tmp_path / "results" / "raw-kernels.json").write_text(json.dumps({
        "kernels": {"moe_router": {"ms": 0.05}, "lm_head": {"ms": 0.9}},
        "sections": {"attention": {"status": "ok"}, "dense_gemms": {"status": "failed"}},
        "targets": {
            "moe_experts_nvfp4_within_1.25x_of_weight_bytes": {"ms": 0.15, "ratio": 1.1, "meets": True},
            "attention_hd512_faster_than_sdpa": {"ms": 0.2, "sdpa_ms": 0.3, "sdpa_backend": "EFFICIENT_ATTENTION",
                                                 "meets": True}},
        "per_op_ms": {"moe_router": 1.5}}))
    lib = [sys.executable, str(ROOT / "bench" / "gpu_check_lib.py")]
    assert subprocess.run([*lib, "results", str(tmp_path)], capture_output=True, timeout=60).returncode == 0
    r = json.loads((tmp_path / "results" / "h100-kernels.json").read_text())
    assert r["git_commit"] == "a" * 40 and r["command"] == cmd and r["per_op_ms"] == {"moe_router": 1.5}
    assert not (tmp_path / "results" / "raw-kernels.json").exists()
    proc = subprocess.run([*lib, "summary", str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    md = (tmp_path / "summary.md").read_text()
    assert "h100-kernels.json: attention hd512 0.200 ms vs SDPA (EFFICIENT_ATTENTION) 0.300 ms" in md, md
    assert "moe_experts_nvfp4 0.150 ms = 1.10x its weight bytes at HBM bandwidth (target 1.25x: meets)" in md, md
    assert "moe_router 0.050 ms" in md and "FAILED sections: dense_gemms" in md, md


@pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None, reason="needs bash, timeout")
def test_gpu_check_run_keeps_what_it_measured_when_a_step_overruns(tmp_path):
    """The check itself (not the dry run) on this CPU machine, with dgemma-bench faked through PYTHON: the
    NVFP4 benchmark answers, the peer hangs past the budget. The peer is stopped, the results step still
    gives the NVFP4 JSON its provenance, and with --pack $OUT holds at most 7 files at every step (the
    device tool brings back 8), the logs in gpu-check.tar.gz."""
    fake = tmp_path / "python"
    fake.write_text(f"""#!/bin/bash
if [ "$1" = -m ] && [ "$2" = dgemma_rt.bench ]; then
  case " $* " in
    *" --quant nvfp4 "*) echo '{{"tokens_per_s": 2.5, "ms_per_step": 3.0, "prefill_ms": 4.0}}'; exit 0 ;;
    *) trap 'echo interrupted >&2; exit 130' INT; sleep 300 & wait; exit 1 ;;
  esac
fi
find "$OUT" -type f 2>/dev/null | wc -l >> "{tmp_path}/out-files"
exec {sys.executable} "$@"
""")
    fake.chmod(0o755)
    out = tmp_path / "out"
    work = tmp_path / "work"
    env = dict(_env(), PYTHON=str(fake), OUT=str(out), GPU_CHECK_BUDGET_S="58", GPU_CHECK_WORK=str(work),
               GPU_CHECK_STEPS="bench-nvfp4,bench-peer,results")
    proc = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), "--pack"], env=env, capture_output=True,
                          text=True, timeout=240)
    log = proc.stdout + proc.stderr
    if "adding the wheels and build steps" in log:
        pytest.skip("dgemma_rt does not import in this interpreter: the check would install it first")
    steps = {s["name"]: s for s in map(json.loads, (work / "steps.jsonl").read_text().splitlines())}
    assert steps["bench-nvfp4"]["status"] == "ok", log
    assert steps["bench-peer"]["status"] == "timeout" and steps["bench-peer"]["seconds"] < 60, log
    assert steps["results"]["status"] == "ok", log  # however late: its time is reserved
    r = json.loads((out / "results" / "gpu-26b-a4b-nvfp4.json").read_text())
    assert r["tokens_per_s"] == 2.5 and r["git_commit"] and "--quant nvfp4" in r["command"], r
    files = [p for p in out.rglob("*") if p.is_file()]
    assert len(files) <= 7 and {"gpu-check.tar.gz", "summary.json", "summary.md"} <= {p.name for p in files}, files
    assert max(int(n) for n in (tmp_path / "out-files").read_text().split()) <= 7
    import tarfile

    with tarfile.open(out / "gpu-check.tar.gz") as t:
        names = t.getnames()
    assert "logs/bench-peer.log" in names and "steps.jsonl" in names and "provenance.json" in names, names
    summary = json.loads((out / "summary.json").read_text())
    assert summary["ok"] is False and summary["results"] == ["gpu-26b-a4b-nvfp4.json"], summary


# ------------------------------------------------------------------ the prebuilt wheel's stamp (no real build)

LIB = [sys.executable, str(ROOT / "bench" / "gpu_check_lib.py")]
FAKE = "dgemma_rt-0.1.0-cp312-cp312-manylinux_2_35_x86_64.whl"


def _git(root, *args):
    env = dict(os.environ, GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t", GIT_COMMITTER_NAME="t",
               GIT_COMMITTER_EMAIL="t@t")
    return subprocess.run(["git", "-C", str(root), *args], env=env, capture_output=True, text=True,
                          check=True).stdout.strip()


def _fake_checkout(tmp_path):
    """A git checkout holding the files the wheel is built from, and a carried folder with a fake wheel
    stamped (by the real `stamp` command) for its commit."""
    root, wheels = tmp_path / "src", tmp_path / "wheels"
    for rel, text in {"CMakeLists.txt": "project(x)\n", "pyproject.toml": "[project]\n", "csrc/a.cu": "int a;\n",
                      "python/dgemma_rt/__init__.py": "", "tools/build_backend/b.py": "", "README.md": "r\n"}.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    (root / ".gitignore").write_text("__pycache__/\n*.so\n/python/dgemma_rt/lib/\n")
    _git(root, "init", "-q")
    _git(root, "add", "-A")
    _git(root, "commit", "-q", "-m", "one")
    wheels.mkdir()
    (wheels / FAKE).write_bytes(b"not really a wheel")
    proc = subprocess.run([*LIB, "stamp", str(wheels / FAKE), str(root), "90a-real",
                           str(wheels / "dgemma_rt-prebuilt.json"), "platform_tag=manylinux_2_35_x86_64"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return root, wheels


def _status(wheels, root, arch="90a-real"):
    proc = subprocess.run([*LIB, "prebuilt", str(wheels), str(root), arch], capture_output=True, text=True,
                          timeout=60)
    return proc.returncode, proc.stdout + proc.stderr


needs_git = pytest.mark.skipif(shutil.which("git") is None, reason="needs git")


@needs_git
def test_prebuilt_stamp_matches_its_commit_and_sources(tmp_path):
    root, wheels = _fake_checkout(tmp_path)
    stamp = json.loads((wheels / "dgemma_rt-prebuilt.json").read_text())
    assert stamp["commit"] == _git(root, "rev-parse", "HEAD") and stamp["wheel"] == FAKE
    assert stamp["platform_tag"] == "manylinux_2_35_x86_64" and stamp["cuda_architectures"] == "90a-real"
    rc, out = _status(wheels, root)
    assert rc == 0 and "matches the checkout" in out, out
    # files git ignores (bytecode, a development .so, CMake's installs into the package) change nothing
    (root / "python/dgemma_rt/__pycache__").mkdir()
    (root / "python/dgemma_rt/__pycache__/x.cpython-312.pyc").write_bytes(b"x")
    (root / "python/dgemma_rt/_core.so").write_bytes(b"x")
    (root / "python/dgemma_rt/lib").mkdir()
    (root / "python/dgemma_rt/lib/libdgemma_core.a").write_bytes(b"x")
    assert _status(wheels, root)[0] == 0
    assert subprocess.run([*LIB, "source-hash", str(root), "--git"], capture_output=True, timeout=60).returncode == 0
    # another architecture than the build step asks for
    rc, out = _status(wheels, root, "90a-real;100a-real")
    assert rc == 1 and "this build asks for 90a-real;100a-real" in out, out


@needs_git
def test_prebuilt_stamp_is_stale_after_a_commit_or_an_edit(tmp_path):
    root, wheels = _fake_checkout(tmp_path)
    (root / "csrc/a.cu").write_text("int a = 1;\n")
    rc, out = _status(wheels, root)
    assert rc == 1 and "uncommitted changes (git)" in out, out
    _git(root, "commit", "-qam", "two")
    rc, out = _status(wheels, root)
    assert rc == 1 and out.startswith("stale: ") and _git(root, "rev-parse", "HEAD")[:12] in out, out
    # a later commit that leaves the wheel's sources alone (docs, tests) keeps the wheel usable, and says so
    root2, wheels2 = _fake_checkout(tmp_path / "docs-only")
    (root2 / "README.md").write_text("docs\n")
    _git(root2, "add", "README.md")
    _git(root2, "commit", "-qm", "docs")
    rc, out = _status(wheels2, root2)
    assert rc == 0 and "matches the checkout's sources" in out and _git(root2, "rev-parse", "HEAD")[:12] in out, out
    # the stamp refuses a dirty tree
    (root / "csrc/a.cu").write_text("int a = 2;\n")
    proc = subprocess.run([*LIB, "stamp", str(wheels / FAKE), str(root), "90a-real", str(tmp_path / "s.json")],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "uncommitted changes" in proc.stderr and not (tmp_path / "s.json").exists()


@needs_git
def test_prebuilt_stamp_without_git_uses_source_commit_and_the_source_hash(tmp_path):
    """The GPU machine has no .git: the commit is the carried SOURCE_COMMIT, and the source hash catches what
    changed after the stamp."""
    root, wheels = _fake_checkout(tmp_path)
    commit = _git(root, "rev-parse", "HEAD")
    shutil.rmtree(root / ".git")
    rc, out = _status(wheels, root)
    assert rc == 1 and "stale" in out and "no .git and no SOURCE_COMMIT" in out, out
    (wheels / "SOURCE_COMMIT").write_text(commit + "\n")
    rc, out = _status(wheels, root)
    assert rc == 0, out
    (wheels / "SOURCE_COMMIT").write_text(commit + " dirty\n")
    rc, out = _status(wheels, root)
    assert rc == 1 and "uncommitted changes" in out and "SOURCE_COMMIT" in out, out
    (wheels / "SOURCE_COMMIT").write_text(commit + "\n")
    (root / "README.md").write_text("not a source of the wheel\n")
    assert _status(wheels, root)[0] == 0
    (root / "csrc/new.cu").write_text("int b;\n")  # a file added after the stamp
    rc, out = _status(wheels, root)
    assert rc == 1 and "the sources differ" in out, out
    (root / "csrc/new.cu").unlink()
    (root / "pyproject.toml").write_text("[project]\nname = 'x'\n")  # an edit after the stamp
    rc, out = _status(wheels, root)
    assert rc == 1 and "the sources differ" in out, out


@needs_git
def test_prebuilt_damaged_or_absent(tmp_path):
    root, wheels = _fake_checkout(tmp_path)
    (wheels / FAKE).write_bytes(b"another wheel")
    rc, out = _status(wheels, root)
    assert rc == 1 and "sha256 differs" in out, out
    (wheels / FAKE).unlink()
    rc, out = _status(wheels, root)
    assert rc == 1 and "the folder holds []" in out, out
    (wheels / "dgemma_rt-prebuilt.json").unlink()
    rc, out = _status(wheels, root)
    assert rc == 2 and "no prebuilt dgemma_rt wheel" in out, out


@needs_git
def test_prebuilt_install_refuses_what_does_not_match_and_names_a_refused_tag(tmp_path):
    """--install (the build step): a mismatch never reaches pip; a wheel whose tag pip refuses is named so.
    No real wheel: the cp39 tag is never this Python's (the package needs 3.10+), so pip installs nothing."""
    root, wheels = _fake_checkout(tmp_path)
    (root / "csrc/a.cu").write_text("int a = 3;\n")
    _git(root, "commit", "-qam", "two")
    proc = subprocess.run([*LIB, "prebuilt", str(wheels), str(root), "90a-real", "--install"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and proc.stdout.startswith("[build] not using a prebuilt wheel: stale: "), proc.stdout
    assert "Processing" not in proc.stdout
    odd = "dgemma_rt-0.1.0-cp39-cp39-manylinux_2_35_x86_64.whl"
    (wheels / FAKE).rename(wheels / odd)
    proc = subprocess.run([*LIB, "stamp", str(wheels / odd), str(root), "90a-real",
                           str(wheels / "dgemma_rt-prebuilt.json"), "platform_tag=manylinux_2_35_x86_64"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    env = dict(os.environ, PIP_CONFIG_FILE=os.devnull, PIP_NO_INDEX="1")
    proc = subprocess.run([*LIB, "prebuilt", str(wheels), str(root), "90a-real", "--install"], env=env,
                          capture_output=True, text=True, timeout=120)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out
    assert "[build] pip refuses the platform tag of " + odd in out and "not using the prebuilt wheel" in out, out


@needs_git
def test_gpu_check_dry_run_reports_a_stale_prebuilt_wheel(tmp_path):
    """The dry run says whether the build step will install the carried wheel or compile (incomplete wheel
    set: it fails on that, fast, but still reports the prebuilt wheel)."""
    root, wheels = _fake_checkout(tmp_path)  # stamped for another checkout than this repository
    env = dict(_env(), GPU_WHEELS=str(wheels))
    proc = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), "--dry-run"], env=env, capture_output=True,
                          text=True, timeout=300)
    assert "stale prebuilt wheel, the build step will compile from source: " in proc.stdout, proc.stdout
    for f in wheels.iterdir():
        f.unlink()
    proc = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), "--dry-run"], env=env, capture_output=True,
                          text=True, timeout=300)
    assert "note: no prebuilt dgemma_rt wheel in " in proc.stdout and "the build step compiles from source" \
        in proc.stdout, proc.stdout


# ------------------------------------------------------------------ the tests step: one pytest process per file

def _test_files(tmp_path):
    files = {"test_a_pass.py": "def test_one():\n    pass\n\ndef test_two():\n    pass\n",
             "test_b_fail.py": "import pytest\n\ndef test_ok():\n    pass\n\ndef test_bad():\n    assert 1 == 2\n\n"
                               "@pytest.mark.skip(reason='no GPU')\ndef test_skipped():\n    pass\n",
             "test_c_pass.py": "def test_three():\n    pass\n"}
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    return [str(tmp_path / n) for n in files]


def test_pytest_files_runs_each_file_alone_and_totals_them(tmp_path):
    """A failing file fails the step but not the others (a device fault costs one file); the last line (the
    step's note) totals the JUnit files and names the failing file."""
    work = tmp_path / "work"
    proc = subprocess.run([*LIB, "pytest-files", "2", str(work), *_test_files(tmp_path)], capture_output=True,
                          text=True, timeout=240, cwd=tmp_path)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out
    last = out.strip().splitlines()[-1]
    assert last.startswith("[tests] 3 of 3 files in ") and ": 6 tests, 1 failed, 0 errors, 1 skipped; " \
        "failing files: test_b_fail" in last, out
    assert "FAILED test_b_fail.py::test_bad" in out, out
    for stem in ("test_a_pass", "test_b_fail", "test_c_pass"):
        assert (work / f"junit-gpu-{stem}.xml").is_file() and (work / "logs" / "tests" / f"{stem}.log").is_file()


@pytest.mark.skipif(not hasattr(os, "killpg"), reason="needs process groups")
def test_pytest_files_interrupted_keeps_the_reports(tmp_path):
    """SIGINT to the group (the step's timeout): the running file writes its JUnit, the queued ones are named."""
    import signal
    import time

    started = tmp_path / "started"
    (tmp_path / "test_a_slow.py").write_text(
        "# the largest file: run first\n" + "#" * 400 + "\nimport pathlib, time\n\ndef test_done():\n    pass\n\n"
        f"def test_slow():\n    pathlib.Path({str(started)!r}).touch()\n    time.sleep(120)\n")
    files = [str(tmp_path / "test_a_slow.py"), *_test_files(tmp_path)]
    work = tmp_path / "work"
    proc = subprocess.Popen([*LIB, "pytest-files", "1", str(work), *files], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, cwd=tmp_path, start_new_session=True)
    try:
        deadline = time.time() + 120
        while not started.exists() and time.time() < deadline:
            time.sleep(0.2)
        assert started.exists()
        os.killpg(proc.pid, signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode != 0, out
    assert "not run (interrupted)" in out and "(interrupted)" in out.strip().splitlines()[-1], out
    assert (work / "junit-gpu-test_a_slow.xml").is_file(), out
    assert "1 of 4 files" in out.strip().splitlines()[-1], out


@pytest.mark.skipif(not hasattr(os, "killpg"), reason="needs process groups")
def test_pytest_files_grace_is_one_deadline_for_all(tmp_path):
    """Files that ignore SIGINT are killed together after one grace period (not one each, which outlasted
    timeout's -k 15 and lost the lines naming them), and the last line still totals what ran."""
    import signal
    import time

    for name in ("test_x_stuck.py", "test_y_stuck.py"):
        (tmp_path / name).write_text(
            "import pathlib, signal, time\n\ndef test_stuck():\n    signal.signal(signal.SIGINT, signal.SIG_IGN)\n"
            f"    pathlib.Path({str(tmp_path)!r}, {name!r} + '.started').touch()\n    time.sleep(120)\n")
    work = tmp_path / "work"
    proc = subprocess.Popen([*LIB, "pytest-files", "2", str(work), str(tmp_path / "test_x_stuck.py"),
                             str(tmp_path / "test_y_stuck.py")], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, cwd=tmp_path, start_new_session=True)
    try:
        deadline = time.time() + 120
        while len(list(tmp_path.glob("*.started"))) < 2 and time.time() < deadline:
            time.sleep(0.2)
        t0 = time.time()
        os.killpg(proc.pid, signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
        waited = time.time() - t0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert waited < 14, (waited, out)
    assert "test_x_stuck.py: exit 137" in out and "test_y_stuck.py: exit 137" in out, out
    assert out.strip().splitlines()[-1].startswith("[tests] 2 of 2 files"), out
