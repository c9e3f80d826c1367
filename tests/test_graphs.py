"""Captured decoder steps (CUDA graphs) proven on the CPU: an engine whose backend records each decoder
step's op calls the second time it sees the step's signature and replays them afterwards, exactly as a
CUDA graph would (the same pointers, shapes and host-side values; whatever the memory holds at replay
time). Its generations must equal the plain CPU backend's token for token, and its counters must show
that steps were really replayed. The recording backend refuses upload/download/allocate while
recording, so an upload left inside the op sequence fails these tests instead of silently replaying
stale inputs. (bindings/graph_recording_backend.h; the forward's side: model/forward.h.)"""

from __future__ import annotations

import threading

import numpy as np
import pytest

import dgemma_rt
from dgemma_rt import _core

# No early stopping: each canvas runs all its steps, so the graph reuse is predictable.
FIXED = dict(eos_token_id=[], adaptive_stopping=False)


def graph_engine(ckpt, **kwargs):
    native, counters = _core._testing.cpu_graph_engine(ckpt.path, **kwargs)
    return dgemma_rt.Engine._from_native(native, ckpt.path), counters


def prompt(ckpt, length, seed):
    return np.random.default_rng(seed).integers(3, ckpt.vocab_size, size=length).tolist()


def assert_same(a, b):
    assert len(a.sequences) == len(b.sequences)
    for x, y in zip(a.sequences, b.sequences):
        np.testing.assert_array_equal(x, y)
    assert a.steps_per_canvas == b.steps_per_canvas
    np.testing.assert_array_equal(a.tokens_per_forward, b.tokens_per_forward)


def assert_every_step_counted(engine, counters):
    """Each decoder pass either ran its ops directly or replayed a capture, and nothing else happened."""
    n, st = counters.as_dict(), engine.scheduler_stats()
    assert n["direct_steps"] + n["replays"] == st["decoder_passes"], (n, st)
    assert (st["captured_passes"], st["replayed_passes"]) == (n["captures"], n["replays"]), (n, st)
    assert n["aborted"] == 0 and n["held"] <= 16, n
    return n


def test_recording_backend_refuses_host_traffic_while_capturing(deep_ckpt):
    r = _core._testing.graph_recording_selftest(deep_ckpt.path)
    assert r["ran_while_capturing"] is False  # recorded, not run
    for what in ("upload", "download", "allocate"):
        assert r[what] is not None and f"{what} while capturing" in r[what], what
    assert r["replayed"] is True
    assert r["after_replay"] == [5.0, 6.0, 7.0, 8.0]  # the contents at replay time, not at capture time
    assert r["replay_unknown_key"] is False and r["replay_after_drop"] is False


def test_one_row_replays_every_step_after_the_second(deep_ckpt, engine_for):
    """One row, one canvas of 7 steps: steps 1-6 share a signature (the first step's missing
    self-conditioning signal is device memory, not a shape): 1 runs directly and sizes the scratch, 2
    is captured and replayed, 3-6 are replayed; step 7 (keeps no state) has a signature of its own and
    runs directly."""
    ids = [prompt(deep_ckpt, 9, 1)]
    kw = dict(max_new_tokens=deep_ckpt.canvas_length, max_denoising_steps=7, seed=5, **FIXED)
    want = engine_for(deep_ckpt).generate(ids, **kw)
    engine, counters = graph_engine(deep_ckpt)
    got = engine.generate(ids, **kw)
    assert_same(got, want)
    assert got.steps_per_canvas == [[7]]
    n = assert_every_step_counted(engine, counters)
    assert (n["direct_steps"], n["captures"], n["replays"], n["replay_misses"]) == (2, 1, 5, 1), n


def test_batch_of_rows_over_several_canvases(deep_ckpt, engine_for):
    """Several rows of one request, prompts from 1 to 4x the sliding window, four canvases each (a new
    signature per canvas: the cached lengths grow), self-conditioning on from each canvas's step 2."""
    window = deep_ckpt.sliding_window
    ids = [prompt(deep_ckpt, n, 10 + n) for n in (1, window - 1, window + 3, 4 * window + 1)]
    kw = dict(max_new_tokens=4 * deep_ckpt.canvas_length, max_denoising_steps=6, seed=21, **FIXED)
    want = engine_for(deep_ckpt).generate(ids, **kw)
    engine, counters = graph_engine(deep_ckpt)
    got = engine.generate(ids, **kw)
    assert_same(got, want)
    assert all(len(s) == 4 for s in got.steps_per_canvas)
    n = assert_every_step_counted(engine, counters)
    assert n["captures"] >= 4 and n["replays"] >= 4 * 3, n


def test_continuous_batching_with_rows_joining_and_leaving(deep_ckpt, engine_for):
    """Requests join mid-canvas from callbacks (so rows of one pass are at different steps of different
    canvases), leave after one canvas or several, with different step counts: every pass's signature
    comes and goes, and each request still gets exactly what it gets alone on the plain backend."""
    L, window = deep_ckpt.canvas_length, deep_ckpt.sliding_window
    jobs = {
        "a": ([prompt(deep_ckpt, 3 * window, 1), prompt(deep_ckpt, 5, 2)], dict(max_new_tokens=3 * L, max_denoising_steps=6, seed=1)),
        "b": ([prompt(deep_ckpt, window + 2, 3)], dict(max_new_tokens=2 * L, max_denoising_steps=8, seed=2)),
        "c": ([prompt(deep_ckpt, 4, 4)], dict(max_new_tokens=L, max_denoising_steps=5, seed=3)),
        "d": ([prompt(deep_ckpt, 2 * window + 1, 5), prompt(deep_ckpt, 7, 6)], dict(max_new_tokens=2 * L, max_denoising_steps=7, seed=4)),
    }
    plain = engine_for(deep_ckpt)
    want = {k: plain.generate(ids, **kw, **FIXED) for k, (ids, kw) in jobs.items()}

    engine, counters = graph_engine(deep_ckpt, max_batch_size=6)
    reqs, errors = {}, []
    lock = threading.Lock()

    def start(name):
        ids, kw = jobs[name]
        with lock:
            reqs[name] = engine.submit(ids, on_step=joiner(name), **kw, **FIXED)

    # a's 4th step brings in b and c; b's 9th step (its second canvas) brings in d.
    triggers = {("a", 4): ["b", "c"], ("b", 9): ["d"]}

    def joiner(name):
        seen = [0]

        def on_step(_draft):
            seen[0] += 1
            try:
                for other in triggers.get((name, seen[0]), []):
                    start(other)
            except BaseException as e:  # pragma: no cover - reported below
                errors.append(e)

        return on_step

    start("a")
    for name in "abcd":  # each is submitted before the one before it ends
        with lock:
            req = reqs[name]
        assert_same(req.result(), want[name])
    assert not errors
    n = assert_every_step_counted(engine, counters)
    # Mixed passes change signature often (a row joins, commits a canvas or leaves), yet stretches of
    # equal passes get captured, and some captures are replayed again after the step that made them.
    assert n["captures"] >= 4 and n["replays"] > n["captures"], n


def test_growing_workspace_drops_captures_and_the_next_ones_still_match(deep_ckpt, engine_for):
    """A long prompt's encoder pass outgrows the workspace the captures point into: they are dropped
    and the next steps are captured again, on the new workspace."""
    plain = engine_for(deep_ckpt)
    engine, counters = graph_engine(deep_ckpt)
    kw = dict(max_new_tokens=deep_ckpt.canvas_length, max_denoising_steps=6, **FIXED)
    short, long = [prompt(deep_ckpt, 5, 7)], [prompt(deep_ckpt, 40 * deep_ckpt.sliding_window, 8)]
    assert_same(engine.generate(short, seed=1, **kw), plain.generate(short, seed=1, **kw))
    before = counters.as_dict()
    assert before["held"] > 0
    assert_same(engine.generate(long, seed=2, **kw), plain.generate(long, seed=2, **kw))
    assert_same(engine.generate(short, seed=3, **kw), plain.generate(short, seed=3, **kw))
    n = assert_every_step_counted(engine, counters)
    assert n["dropped"] >= before["held"] and n["captures"] > before["captures"], (before, n)


def test_captures_are_bounded(deep_ckpt, engine_for):
    """Each canvas has a signature of its own (its cached length): after more canvases than the bound,
    the least recently used captures go and at most 16 are held."""
    ids = [prompt(deep_ckpt, 3, 9)]
    kw = dict(max_new_tokens=20 * deep_ckpt.canvas_length, max_denoising_steps=4, seed=6, **FIXED)
    want = engine_for(deep_ckpt).generate(ids, **kw)
    engine, counters = graph_engine(deep_ckpt)
    assert_same(engine.generate(ids, **kw), want)
    n = assert_every_step_counted(engine, counters)
    assert n["captures"] >= 20 and n["held"] <= 16 and n["dropped"] >= n["captures"] - 16, n


def test_denoise_logits_is_never_captured(deep_ckpt, engine_for):
    """The raw-logits path shares the forward's decoder input with step(); it runs directly."""
    ids = [prompt(deep_ckpt, 11, 12)]
    canvas = np.random.default_rng(0).integers(0, deep_ckpt.vocab_size, size=(1, deep_ckpt.canvas_length))
    sc = np.random.default_rng(1).standard_normal((1, deep_ckpt.canvas_length, deep_ckpt.vocab_size)).astype(np.float32)
    plain = engine_for(deep_ckpt)
    engine, counters = graph_engine(deep_ckpt)
    for _ in range(3):
        np.testing.assert_array_equal(engine.denoise_logits(engine.encode(ids), canvas, self_conditioning_logits=sc),
                                      plain.denoise_logits(plain.encode(ids), canvas, self_conditioning_logits=sc))
    assert counters.as_dict()["captures"] == 0


def test_plain_cpu_backend_never_captures(deep_ckpt, engine_for):
    engine = engine_for(deep_ckpt)
    engine.generate([prompt(deep_ckpt, 4, 13)], max_new_tokens=deep_ckpt.canvas_length, max_denoising_steps=6, **FIXED)
    st = engine.scheduler_stats()
    assert st["decoder_passes"] > 0 and st["captured_passes"] == st["replayed_passes"] == 0
