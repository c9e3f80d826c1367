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


def assert_every_step_counted(engine, counters, bound=16):
    """Each decoder pass either ran its ops directly or replayed a capture, and nothing else happened;
    at most `bound` captures are held (the Forward's max_graphs())."""
    n, st = counters.as_dict(), engine.scheduler_stats()
    assert n["direct_steps"] + n["replays"] == st["decoder_passes"], (n, st)
    assert (st["captured_passes"], st["replayed_passes"]) == (n["captures"], n["replays"]), (n, st)
    assert n["aborted"] == 0 and n["held"] <= bound, n
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
    """Several rows of one request, prompts from 1 to 4x the sliding window, four canvases each (the
    cached lengths grow: a new signature only where the widest row's blocks cross a power of two),
    self-conditioning on from each canvas's step 2."""
    window = deep_ckpt.sliding_window
    ids = [prompt(deep_ckpt, n, 10 + n) for n in (1, window - 1, window + 3, 4 * window + 1)]
    kw = dict(max_new_tokens=4 * deep_ckpt.canvas_length, max_denoising_steps=6, seed=21, **FIXED)
    want = engine_for(deep_ckpt).generate(ids, **kw)
    engine, counters = graph_engine(deep_ckpt)
    got = engine.generate(ids, **kw)
    assert_same(got, want)
    assert all(len(s) == 4 for s in got.steps_per_canvas)
    n = assert_every_step_counted(engine, counters)
    # 25 -> 61 cached in the widest row: 2 blocks (bucket 2) on the first canvas, 3-4 (bucket 4) on the
    # others. Captured: bucket 2's steps with state, bucket 4's steps with state and its last step.
    assert (n["direct_steps"], n["captures"], n["replays"]) == (4, 3, 20), n


def pass_letter(before, after):
    """What one decoder pass did, from the counters around it: D ran its ops directly, C captured them
    (and replayed the capture), R only replayed."""
    d = tuple(after[k] - before[k] for k in ("direct_steps", "captures", "replays"))
    return {(1, 0, 0): "D", (0, 1, 1): "C", (0, 0, 1): "R"}[d]


def step_trace(engine, counters, ids, **kw):
    """Generates and returns (output, one pass_letter per decoder pass), read from the counters in
    on_step, which runs on the scheduler thread right after each pass."""
    trace, last = [], [counters.as_dict()]

    def on_step(_draft):
        n = counters.as_dict()
        trace.append(pass_letter(last[0], n))
        last[0] = n

    out = engine.generate(ids, on_step=on_step, **kw)
    return out, "".join(trace)


def canvases(trace, steps):
    return [trace[i:i + steps] for i in range(0, len(trace), steps)]


def test_growing_context_replays_every_step_of_later_canvases(deep_ckpt, engine_for):
    """One request, five canvases of 6 steps over a growing context (70 -> 118 cached tokens: 5 to 8
    blocks of 16, across three block boundaries, inside one power-of-two bucket). Each step shape is
    captured once (the steps that keep their self-conditioning state on the first canvas, the last
    step on the second, as a signature's first sight runs directly) and replayed on every later
    canvas: from the third canvas on no step launches anything from the host. Tokens equal the plain
    backend's, which runs the same ops one by one."""
    L, steps = deep_ckpt.canvas_length, 6
    ids = [prompt(deep_ckpt, 70, 31)]
    kw = dict(max_new_tokens=5 * L, max_denoising_steps=steps, seed=8, **FIXED)
    want = engine_for(deep_ckpt).generate(ids, **kw)
    engine, counters = graph_engine(deep_ckpt)
    got, trace = step_trace(engine, counters, ids, **kw)
    assert_same(got, want)
    assert got.steps_per_canvas == [[steps] * 5]
    assert canvases(trace, steps) == ["DCRRRD", "RRRRRC", "RRRRRR", "RRRRRR", "RRRRRR"], trace
    n = assert_every_step_counted(engine, counters)
    assert (n["captures"], n["replays"], n["dropped"]) == (2, 28, 0), n


def test_crossing_a_context_bucket_captures_each_step_shape_once_more(deep_ckpt, engine_for):
    """Eight rows, twelve canvases of 3 steps from 3-token prompts: the full layers' tables grow from 1
    block to 9, through the buckets 1, 2, 4, 8 and 16. Each crossing gives each step shape one new
    signature, seen once directly and captured once (buckets 2 and 16 last one canvas: their last
    step is never captured); in between every step replays. The decoder passes are the largest
    here and the last crossing widens 8 rows' tables by 256 bytes, yet no capture is dropped: the
    workspace holds the widest block table the pool allows from the start. The sliding layers' bounds
    never move."""
    L, steps = deep_ckpt.canvas_length, 3
    ids = [prompt(deep_ckpt, 3, 32 + r) for r in range(8)]
    kw = dict(max_new_tokens=12 * L, max_denoising_steps=steps, seed=9, **FIXED)
    want = engine_for(deep_ckpt).generate(ids, **kw)
    engine, counters = graph_engine(deep_ckpt)
    got, trace = step_trace(engine, counters, ids, **kw)
    assert_same(got, want)
    assert canvases(trace, steps) == [
        "DCD", "RRC",                       # 3, 15 cached: 1 block
        "DCD",                              # 27: 2 blocks
        "DCD", "RRC", "RRR",                # 39 .. 63: 3-4 blocks (bucket 4)
        "DCD", "RRC", "RRR", "RRR", "RRR",  # 75 .. 123: 5-8 blocks (bucket 8)
        "DCD",                              # 135: 9 blocks (bucket 16)
    ], trace
    n = assert_every_step_counted(engine, counters)
    assert (n["captures"], n["held"], n["dropped"]) == (8, 8, 0), n


def test_mixed_continuous_batch_replays(deep_ckpt, engine_for):
    """Requests join a running one at different steps, so most passes mix rows with and without a
    self-conditioning signal and rows that keep their state with rows at their last step, over
    different context lengths. None of that is in a step's signature: once the batch is stable, its
    passes replay, and every request gets exactly what it gets alone."""
    L = deep_ckpt.canvas_length
    jobs = {
        "a": ([prompt(deep_ckpt, 40, 41)], dict(max_new_tokens=6 * L, max_denoising_steps=6, seed=1)),
        "b": ([prompt(deep_ckpt, 5, 42), prompt(deep_ckpt, 23, 43)], dict(max_new_tokens=4 * L, max_denoising_steps=6, seed=2)),
        "c": ([prompt(deep_ckpt, 12, 44)], dict(max_new_tokens=3 * L, max_denoising_steps=6, seed=3)),
    }
    plain = engine_for(deep_ckpt)
    want = {k: plain.generate(ids, **kw, **FIXED) for k, (ids, kw) in jobs.items()}

    engine, counters = graph_engine(deep_ckpt, max_batch_size=4)
    reqs, errors, passes = {}, [], []
    lock = threading.Lock()
    triggers = {("a", 3): ["b"], ("a", 8): ["c"]}  # b from a's pass 4, c from its pass 9 (canvas 2, step 3)

    def start(name):
        ids, kw = jobs[name]
        seen = [0]

        def on_step(_draft):
            seen[0] += 1
            if name == "a":
                passes.append(counters.as_dict())
            try:
                for other in triggers.get((name, seen[0]), []):
                    start(other)
            except BaseException as e:  # pragma: no cover - reported below
                errors.append(e)

        with lock:
            reqs[name] = engine.submit(ids, on_step=on_step, **kw, **FIXED)

    start("a")
    for name in "abc":
        with lock:
            req = reqs[name]
        assert_same(req.result(), want[name])
    assert not errors
    n = assert_every_step_counted(engine, counters)
    # One letter per pass (every pass has a's row; b's and c's rows run inside a's passes). A new
    # signature comes only with a new batch size or context bucket, never with the rows' steps.
    zero = dict(direct_steps=0, captures=0, replays=0)
    trace = "".join(pass_letter(before, after) for before, after in zip([zero] + passes, passes))
    assert trace == ("DCR"               # a alone (1 row, 40 cached: bucket 4)
                     + "DCRRR"           # + b (3 rows): b's first step has no signal; a's last keeps no state
                     + "DC" + "R" * 8    # + c (4 rows): each canvas starts and ends at another pass
                     + "DC" + "R" * 6    # a's 4th canvas: 76 cached, 5 blocks (bucket 8)
                     + "D"               # c leaves: 3 rows
                     + "DCD" + "R" * 5 + "C"), trace  # b leaves: a alone; its last steps a shape of their own
    assert (n["captures"], n["replays"], engine.scheduler_stats()["decoder_passes"]) == (6, 29, 36), n


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
    """Each batch size has signatures of its own (two per context bucket: steps that keep their state
    and the last step). The bound is four per batch size up to max_batch_size, at least 16: every
    batch size up to 9 keeps its captures; past the bound the least recently used go."""
    plain = engine_for(deep_ckpt, max_batch_size=9)
    engine, counters = graph_engine(deep_ckpt, max_batch_size=9)
    kw = dict(max_new_tokens=2 * deep_ckpt.canvas_length, max_denoising_steps=3, seed=6, **FIXED)
    for rows in range(9, 0, -1):  # the largest pass first: the workspace never grows (that drops them all)
        ids = [prompt(deep_ckpt, 3 + r, 9 + r) for r in range(rows)]
        assert_same(engine.generate(ids, **kw), plain.generate(ids, **kw))
    n = assert_every_step_counted(engine, counters, bound=36)
    assert n["captures"] >= 18 and n["dropped"] == 0 and n["held"] == n["captures"], n

    # Two rows at most: 16 captures held. Prompts of other lengths put the rows in other context buckets,
    # two signatures per batch size each, until more than 16 exist (longest first, as above).
    plain = engine_for(deep_ckpt, max_batch_size=2)
    engine, counters = graph_engine(deep_ckpt, max_batch_size=2)
    for length in (270, 140, 70, 40, 20, 3):
        for rows in (2, 1):
            ids = [prompt(deep_ckpt, length + r, length + r) for r in range(rows)]
            assert_same(engine.generate(ids, **kw), plain.generate(ids, **kw))
    n = assert_every_step_counted(engine, counters)
    assert n["captures"] > 16 and n["held"] <= 16 and n["dropped"] >= n["captures"] - 16, n


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


def test_a_failed_capture_runs_the_step_op_by_op_from_then_on(deep_ckpt, engine_for, capfd):
    """A capture that fails (a real one can: something in the sequence is not capturable) loses nothing:
    nothing of the recorded sequence ran, so the step runs its ops directly and later steps do too, with
    one line on stderr and the failure counted; the tokens are those of the plain CPU backend."""
    ids = [prompt(deep_ckpt, 9, 14)]
    kw = dict(max_new_tokens=2 * deep_ckpt.canvas_length, max_denoising_steps=6, seed=8, **FIXED)
    want = engine_for(deep_ckpt).generate(ids, **kw)
    engine, counters = graph_engine(deep_ckpt)
    counters.fail_next_captures(1)
    got = engine.generate(ids, **kw)
    assert_same(got, want)
    n, st = counters.as_dict(), engine.scheduler_stats()
    assert (n["aborted"], n["captures"], n["replays"], n["held"]) == (1, 0, 0, 0), n
    assert n["direct_steps"] == st["decoder_passes"] == 12, (n, st)
    assert (st["capture_failures"], st["captured_passes"], st["replayed_passes"]) == (1, 0, 0), st
    err = capfd.readouterr().err
    assert err.count("capturing a decoder step as a graph") == 1 and "injected capture failure" in err, err
    assert_same(engine.generate(ids, **kw), want)  # capturing stays off: no second attempt
    assert counters.as_dict()["aborted"] == 1 and engine.scheduler_stats()["capture_failures"] == 1


def test_plain_cpu_backend_never_captures(deep_ckpt, engine_for):
    engine = engine_for(deep_ckpt)
    engine.generate([prompt(deep_ckpt, 4, 13)], max_new_tokens=deep_ckpt.canvas_length, max_denoising_steps=6, **FIXED)
    st = engine.scheduler_stats()
    assert st["decoder_passes"] > 0 and st["captured_passes"] == st["replayed_passes"] == 0
