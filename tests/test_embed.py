"""The embeddable C++ API: the example program (built and installed by CMake) and a program built
here against the installed header and static library, both checked against the Python engine."""

from __future__ import annotations

import json
import os
import re
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
    # Two turns on one KVCache, against the Python engine continuing its past_key_values.
    chat = next(l for l in lines if "chat" in l)["chat"]
    L = engine.config["canvas_length"]
    turn = dict(max_new_tokens=2 * L, max_denoising_steps=STEPS, eos_token_id=None)
    o1 = engine.generate([chat["turn1_prompt"]], seed=5, **turn)
    assert chat["turn1"] == [int(t) for t in o1.sequences[0][len(chat["turn1_prompt"]):]]
    assert chat["after_turn1"] == o1.past_key_values.seq_lengths[0] == len(chat["turn1_prompt"]) + L
    assert chat["turn2_prompt"][:L] == chat["turn1"][-L:]
    o2 = engine.generate([chat["turn2_prompt"]], seed=6, past_key_values=o1.past_key_values, **turn)
    assert chat["turn2"] == [int(t) for t in o2.sequences[0][len(chat["turn2_prompt"]):]]
    assert chat["after_turn2"] == o2.past_key_values.seq_lengths[0] == chat["after_turn1"] + len(chat["turn2_prompt"]) + L


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
    for args, said in ((["--bogus"], "unknown option --bogus"), (["--steps"], "--steps needs a value")):
        p = subprocess.run([binary, tiny_dir, *args], capture_output=True, text=True, timeout=60)
        assert (p.returncode, p.stderr.strip()) == (2, said), p.stderr  # --bogus was "needs a value"


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


def _run_program(source: str, tiny_dir: str, tmp_path) -> str:
    """Builds a C++ program against the installed header and library, runs it on the checkpoint, and
    returns what it printed."""
    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if not cxx:
        pytest.skip("no C++ compiler")
    src = tmp_path / "program.cpp"
    src.write_text(source)
    binary = str(tmp_path / "program")
    cmd = [cxx, "-std=c++17", "-O1", str(src), "-I", dgemma_rt.get_include(), "-L", dgemma_rt.get_library_dir(),
           "-ldgemma_core", "-fopenmp", "-pthread", "-o", binary]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    p = subprocess.run([binary, tiny_dir], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, (p.returncode, p.stdout, p.stderr)
    return p.stdout


def test_callback_edges_of_the_installed_api(tiny_dir, tmp_path):
    out = _run_program(CALLBACK_EDGES, tiny_dir, tmp_path)
    assert "refused: generate() cannot be called inside a callback of the same engine" in out, out
    assert "stopped: 64 new tokens, stop, 1" in out, out
    assert "requests: 2 completed, 0 running, 0 queued" in out, out
    assert "last reference dropped in a callback: 64 new tokens" in out, out


CACHE_EDGES = r"""
#include <atomic>
#include <chrono>
#include <cstdio>
#include <string>
#include <thread>
#include "dgemma_rt/engine.h"

template <class F>
std::string refusal(F fn) {
  try {
    fn();
    return "not refused";
  } catch (const dgemma_rt::Error& e) {
    return e.what();
  }
}

int main(int argc, char** argv) {
  dgemma_rt::EngineOptions o;
  o.num_threads = 1;
  dgemma_rt::KVCache kept;
  {
    dgemma_rt::Engine a(argv[1], o), b(argv[1], o);
    dgemma_rt::SamplingParams p = a.default_params();
    p.max_new_tokens = a.info().canvas_length, p.max_denoising_steps = 3;
    std::printf("empty: %s\n", refusal([&] { a.submit(dgemma_rt::KVCache(), {2, 5, 6}, p); }).c_str());
    dgemma_rt::KVCache c = a.new_cache();
    std::printf("other engine: %s\n", refusal([&] { b.submit(c, {2, 5, 6}, p); }).c_str());
    // A turn that runs until cancelled; a second turn on the same cache meanwhile is refused.
    dgemma_rt::SamplingParams lp = p;
    lp.max_denoising_steps = 100000, lp.adaptive_stopping = false;
    std::atomic<int> seen{-1};
    dgemma_rt::Callbacks cb;
    cb.on_step = [&](const dgemma_rt::Draft&) {
      if (seen < 0) seen = c.tokens();
    };
    dgemma_rt::Request r = a.submit(c, {2, 5, 6}, lp, cb);
    std::printf("in use: %s\n", refusal([&] { a.submit(c, {7}, p); }).c_str());
    while (seen < 0) std::this_thread::sleep_for(std::chrono::milliseconds(1));
    r.cancel();
    std::printf("cancelled: %s\n", refusal([&] { r.result(); }).c_str());
    std::printf("after the cancelled turn: %d cached, %d seen in its step\n", c.tokens(), seen.load());
    const dgemma_rt::Result next = a.generate(c, {9, 10}, p);  // the conversation goes on
    std::printf("next turn: %zu new tokens, %d cached\n", next.new_tokens.size(), c.tokens());
    const dgemma_rt::Stats s = a.stats();
    std::printf("pool: %d of %d blocks free\n", s.kv_blocks_free, s.kv_blocks_total);
    kept = c;
  }
  std::printf("after the engines: %d cached\n", kept.tokens());
  kept = dgemma_rt::KVCache();
  std::printf("empty handle: %d cached\n", kept.tokens());
  return 0;
}
"""


def test_kv_cache_edges_of_the_installed_api(tiny_dir, tmp_path):
    """Multi-turn through the C++ API: what it refuses, a cancelled turn's cache, a cache outliving its engine."""
    out = _run_program(CACHE_EDGES, tiny_dir, tmp_path)
    assert "empty: empty KVCache (not made by Engine::new_cache)" in out, out
    assert "other engine: this KVCache belongs to another Engine" in out, out
    assert "in use: this KVCache is in use by another request that has not finished" in out, out
    assert "cancelled: " in out and "cancelled: not refused" not in out, out
    # The cancelled turn had encoded its prompt before its first step; the cache keeps it, and the next
    # turn adds its own two tokens (its one canvas is the last, not encoded).
    assert "after the cancelled turn: 3 cached, 3 seen in its step" in out, out
    assert "next turn: 64 new tokens, 5 cached" in out, out
    free, total = map(int, re.search(r"pool: (\d+) of (\d+) blocks free", out).groups())
    assert free == total - 1, out  # the conversation's one block; the cancelled turn's reservation went back
    assert "after the engines: 5 cached" in out, out
    assert "empty handle: 0 cached" in out, out
