"""The embeddable C++ API: the example program (built and installed by CMake) and a program built
here against the installed header and static library, both checked against the Python engine."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest

import dgemma_rt
from dgemma_rt.tiny import make_tiny

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE_SRC = os.path.join(ROOT, "examples", "embed", "main.cpp")
PACKAGE = os.path.dirname(dgemma_rt.__file__)
STEPS, NEW_TOKENS, REQUESTS = 5, 128, 3


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return str(make_tiny(tmp_path_factory.mktemp("tiny_embed")))


def _run(binary: str, tiny_dir: str) -> list[dict]:
    env = dict(os.environ, OMP_NUM_THREADS="2")
    p = subprocess.run([binary, tiny_dir, "--requests", str(REQUESTS), "--max-new-tokens", str(NEW_TOKENS),
                        "--steps", str(STEPS)], capture_output=True, text=True, timeout=120, env=env)
    assert p.returncode == 0, p.stderr
    return [json.loads(line) for line in p.stdout.splitlines()]


def _check(lines: list[dict], tiny_dir: str) -> None:
    reqs = [l for l in lines if "request" in l]
    assert [r["request"] for r in reqs] == list(range(REQUESTS))
    engine = dgemma_rt.Engine(tiny_dir, num_threads=2)
    g = engine.generation_defaults
    stop = set(g["eos_token_id"]) | {g["pad_token_id"]}
    for r in reqs:
        out = engine.generate([r["prompt"]], seed=r["seed"], max_new_tokens=NEW_TOKENS, max_denoising_steps=STEPS)
        new = [int(t) for t in out.sequences[0][len(r["prompt"]):]]
        assert r["new_tokens"] == new  # the C++ program and Python get the same tokens for the same seed
        text = []
        for t in new:
            if t in stop:
                break
            text.append(t)
        assert r["text_tokens"] == text[:NEW_TOKENS]
        assert r["steps"] == sum(out.steps_per_canvas[0]) == r["drafts"]
        assert r["blocks"] == len(new) // engine.config["canvas_length"]
        assert r["status"] == r["on_finish"] == "done"
        assert r["finish_reason"] in ("stop", "length")
    cancelled = next(l for l in lines if "cancelled" in l)
    assert cancelled["cancelled"] == "cancelled" and cancelled["steps_before_cancel"] is True
    assert "cancelled" in cancelled["error"]
    stats = next(l for l in lines if "stats" in l)["stats"]
    assert stats["completed"] == REQUESTS and stats["cancelled"] == 1
    assert stats["kv_blocks_free"] == stats["kv_blocks_total"]  # every request gave its blocks back
    assert stats["row_steps"] > stats["decoder_passes"]  # the threads' requests were batched
    infill = next(l for l in lines if "infill" in l)["infill"]
    want = engine.generate([infill["prompt"]], seed=infill["seed"], max_new_tokens=len(infill["template"]),
                           max_denoising_steps=STEPS, eos_token_id=None, canvas_template=[infill["template"]])
    assert infill["new_tokens"] == [int(t) for t in want.sequences[0][len(infill["prompt"]):]]
    assert infill["new_tokens"][-8:] == infill["template"][-8:] == list(range(8, 16))
    bad = next(l for l in lines if "bad_template" in l)["bad_template"]  # checked by the C++ submit path
    assert f"canvas_template row 0 position 3 holds {engine.config['vocab_size']}" in bad, bad


def test_installed_example(tiny_dir):
    binary = os.path.join(PACKAGE, "bin", "dgemma-embed-example")
    assert os.path.exists(binary), f"{binary} is missing: the package was built with DGEMMA_BUILD_EXAMPLES=OFF?"
    _check(_run(binary, tiny_dir), tiny_dir)


def test_example_errors(tiny_dir):
    binary = os.path.join(PACKAGE, "bin", "dgemma-embed-example")
    p = subprocess.run([binary, os.path.join(tiny_dir, "missing")], capture_output=True, text=True, timeout=60)
    assert p.returncode == 1 and "does not exist" in p.stderr
    p = subprocess.run([binary, tiny_dir, "--steps", "0"], capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and "--steps" in p.stderr


def test_build_against_installed_api(tiny_dir, tmp_path):
    """What a user does: compile their own program with the installed header and library."""
    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if not cxx:
        pytest.skip("no C++ compiler")
    header = os.path.join(dgemma_rt.get_include(), "dgemma_rt", "engine.h")
    lib = os.path.join(dgemma_rt.get_library_dir(), "libdgemma_core.a")
    assert os.path.exists(header) and os.path.exists(lib)
    binary = str(tmp_path / "embed")
    cmd = [cxx, "-std=c++17", "-O1", EXAMPLE_SRC, "-I", dgemma_rt.get_include(), "-L", dgemma_rt.get_library_dir(),
           "-ldgemma_core", "-fopenmp", "-pthread", "-o", binary]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    _check(_run(binary, tiny_dir), tiny_dir)


CALLBACK_EDGES = r"""
#include <cstdio>
#include <memory>
#include <string>
#include "dgemma_rt/engine.h"

int main(int argc, char** argv) {
  dgemma_rt::EngineOptions o;
  o.num_threads = 1;
  dgemma_rt::SamplingParams p;
  {
    // generate() inside a callback is refused before it submits anything (it used to leave a request
    // running that nobody could wait for).
    dgemma_rt::Engine engine(argv[1], o);
    p = engine.default_params();
    p.max_new_tokens = 64, p.max_denoising_steps = 3;
    std::string refused;
    dgemma_rt::Callbacks cb;
    cb.on_step = [&](const dgemma_rt::Draft&) {
      if (!refused.empty()) return;
      try {
        engine.generate({2, 7}, p);
        refused = "not refused";
      } catch (const dgemma_rt::Error& e) {
        refused = e.what();
      }
    };
    engine.submit({2, 5, 6}, p, cb).result();
    // StopGeneration from on_block ends the request after that canvas, as done (counted completed).
    dgemma_rt::SamplingParams q = p;
    q.max_new_tokens = 192, q.eos_token_id.clear(), q.pad_token_id.reset();
    dgemma_rt::Callbacks stop;
    stop.on_block = [](const dgemma_rt::Block& b) {
      if (b.canvas == 0) throw dgemma_rt::StopGeneration();
    };
    const dgemma_rt::Result sr = engine.submit({2, 5, 6}, q, stop).result();
    std::printf("stopped: %zu new tokens, %s, %d\n", sr.new_tokens.size(), sr.finish_reason.c_str(), sr.stopped);
    const dgemma_rt::Stats s = engine.stats();
    std::printf("refused: %s\nrequests: %lld completed, %d running, %d queued\n", refused.c_str(), s.completed,
                s.running_requests, s.queued_requests);
  }
  // The last reference to the engine let go inside its own callback: it used to join its own scheduler
  // thread and abort ("Resource deadlock avoided").
  auto engine = std::make_shared<dgemma_rt::Engine>(argv[1], o);
  dgemma_rt::Callbacks cb;
  cb.on_step = [engine](const dgemma_rt::Draft&) { (void)engine->stats(); };
  dgemma_rt::Request r = engine->submit({2, 5, 6}, p, std::move(cb));
  engine.reset();
  std::printf("last reference dropped in a callback: %zu new tokens\n", r.result().new_tokens.size());
  return 0;
}
"""


def test_callback_edges_of_the_installed_api(tiny_dir, tmp_path):
    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if not cxx:
        pytest.skip("no C++ compiler")
    src = tmp_path / "edges.cpp"
    src.write_text(CALLBACK_EDGES)
    binary = str(tmp_path / "edges")
    cmd = [cxx, "-std=c++17", "-O1", str(src), "-I", dgemma_rt.get_include(), "-L", dgemma_rt.get_library_dir(),
           "-ldgemma_core", "-fopenmp", "-pthread", "-o", binary]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    p = subprocess.run([binary, tiny_dir], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, (p.returncode, p.stdout, p.stderr)
    assert "refused: generate() cannot be called inside a callback of the same engine" in p.stdout, p.stdout
    assert "stopped: 64 new tokens, stop, 1" in p.stdout, p.stdout
    assert "requests: 2 completed, 0 running, 0 queued" in p.stdout, p.stdout
    assert "last reference dropped in a callback: 64 new tokens" in p.stdout, p.stdout
