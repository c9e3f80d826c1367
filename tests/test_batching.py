"""Continuous batching: many requests share decoder passes, each gets exactly what it gets alone.

Runs on the built-in tiny checkpoint (no torch needed): canvas 64, vocab 2048.
"""

from __future__ import annotations

import gc
import threading
import time

import numpy as np
import pytest

import dgemma_rt
from dgemma_rt.tiny import make_tiny

# One canvas, few steps, no EOS stopping: every request does a known amount of work.
FIXED = dict(max_new_tokens=64, max_denoising_steps=6, eos_token_id=[], adaptive_stopping=False)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny(tmp_path_factory.mktemp("tiny_batching"))


@pytest.fixture(scope="module")
def engine(tiny_dir):
    return dgemma_rt.Engine(tiny_dir, max_batch_size=8, num_threads=2)


def prompt(seed: int, length: int = 12) -> list[int]:
    return np.random.default_rng(seed).integers(8, 2048, size=length).tolist()


def pool_is_full(engine) -> bool:
    gc.collect()
    s = engine.kv_pool_stats()
    return s["full_free"] == s["full_total"] and s["sliding_free"] == s["sliding_total"]


def test_concurrent_generate_matches_solo(engine):
    jobs = [(prompt(i, 5 + 3 * i), dict(seed=100 + i, max_new_tokens=64 * (1 + i % 2), max_denoising_steps=5 + i))
            for i in range(6)]
    solo = [engine.generate([p], **kw) for p, kw in jobs]
    before = engine.scheduler_stats()
    results = [None] * len(jobs)
    errors = []
    barrier = threading.Barrier(len(jobs))

    def run(i):
        try:
            barrier.wait()
            p, kw = jobs[i]
            results[i] = engine.generate([p], **kw)
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors
    for a, b in zip(solo, results):
        np.testing.assert_array_equal(a.sequences, b.sequences)
        assert a.steps_per_canvas == b.steps_per_canvas
        np.testing.assert_array_equal(a.tokens_per_forward, b.tokens_per_forward)
    after = engine.scheduler_stats()
    passes = after["decoder_passes"] - before["decoder_passes"]
    rows = after["row_steps"] - before["row_steps"]
    # Sequentially these requests take sum(steps) passes; batched, passes carry several rows.
    assert rows == sum(sum(r.steps_per_canvas[0]) for r in solo)
    assert passes < rows, (passes, rows)
    del solo, results, a, b
    assert pool_is_full(engine)


def test_batch_rows_stay_in_lock_step_under_concurrency(engine):
    """A multi-row call keeps the reference's batch semantics (and its noise) while others run."""
    batch = [prompt(50, 9), prompt(51, 9)]
    alone = engine.generate(batch, seed=3, max_new_tokens=128, max_denoising_steps=7)
    other = engine.submit([prompt(52, 20)], seed=4, **FIXED)
    together = engine.generate(batch, seed=3, max_new_tokens=128, max_denoising_steps=7)
    other.result()
    np.testing.assert_array_equal(alone.sequences, together.sequences)
    assert alone.steps_per_canvas == together.steps_per_canvas


def test_a_callback_may_cancel_its_request(engine):
    """RequestCancelled raised by on_step / on_block ends the request at once as cancelled (any other
    exception fails it): result() raises it with the callback's message, the engine counts a cancellation."""
    before = engine.scheduler_stats()
    steps = []

    def stop_at_3(draft):
        steps.append(draft)
        if len(steps) == 3:
            raise dgemma_rt.RequestCancelled("enough drafts")

    req = engine.submit([prompt(2)], on_step=stop_at_3, seed=1, max_new_tokens=128, max_denoising_steps=8,
                        adaptive_stopping=False)
    with pytest.raises(dgemma_rt.RequestCancelled, match="enough drafts"):
        req.result()
    after = engine.scheduler_stats()
    assert req.status == "cancelled" and len(steps) == 3
    assert (after["cancelled"] - before["cancelled"], after["failed"] - before["failed"]) == (1, 0)


def test_a_callback_may_stop_its_request(engine):
    """StopGeneration raised by on_block ends the request after that canvas, and raised by on_step after the
    canvas it is on (denoised to its end): done, counted as completed, the output exactly the first canvases
    of the full run with the cache those canvases leave. Raised anywhere else it fails the request."""
    kw = dict(seed=7, max_new_tokens=4 * 64, max_denoising_steps=5, eos_token_id=[], adaptive_stopping=False)
    p = prompt(3)
    full = engine.generate([p], **kw)
    two = engine.generate([p], **dict(kw, max_new_tokens=2 * 64))
    assert not full.stopped and not two.stopped
    two_lengths = two.past_key_values.seq_lengths
    # The next turn after a 2-canvas run (it extends two's cache).
    nxt = dict(seed=8, max_new_tokens=64, max_denoising_steps=3, eos_token_id=[])
    b = engine.generate([two.sequences[0][-64:].tolist()], past_key_values=two.past_key_values, **nxt)
    before = engine.scheduler_stats()
    blocks, steps = [], []

    def stop_after_2(block):
        blocks.append(block)
        if len(blocks) == 2:
            raise dgemma_rt.StopGeneration

    def stop_in_canvas_1(draft):
        steps.append(draft)
        if len(steps) == 5 + 2:  # the second canvas's second step
            raise dgemma_rt.StopGeneration("this canvas is the last")

    for cb in (dict(on_block=stop_after_2), dict(on_step=stop_in_canvas_1)):
        req = engine.submit([p], **cb, **kw)
        out = req.result()
        assert out.stopped and req.status == "done"
        np.testing.assert_array_equal(out.sequences[0], full.sequences[0][: len(p) + 2 * 64])
        assert out.steps_per_canvas == [[5, 5]]
        assert out.past_key_values.seq_lengths == two_lengths
        # The returned cache continues as any other: the next turn sees exactly what a 2-canvas run leaves.
        a = engine.generate([out.sequences[0][-64:].tolist()], past_key_values=out.past_key_values, **nxt)
        np.testing.assert_array_equal(a.sequences, b.sequences)
    assert len(blocks) == 2 and len(steps) == 10
    after = engine.scheduler_stats()
    assert [after[k] - before[k] for k in ("completed", "cancelled", "failed")] == [4, 0, 0]

    def noise(kind, shape):
        raise dgemma_rt.StopGeneration

    with pytest.raises(ValueError, match="StopGeneration was raised outside on_step/on_block"):
        engine.generate([p], noise=noise, **kw)
    del full, two, out, a, b, req
    assert pool_is_full(engine)


def test_submit_without_events(engine):
    """events=False (generate() and the server): the callbacks run, nothing is queued for an iteration that
    never comes (each step's draft stayed queued until the request was dropped), and iterating says so."""
    seen = []
    kw = dict(seed=5, max_new_tokens=128, max_denoising_steps=4, eos_token_id=[], adaptive_stopping=False)
    req = engine.submit([prompt(1)], events=False, on_step=seen.append, **kw)
    out = req.result()
    assert len(seen) == 8 and req._events.empty()
    np.testing.assert_array_equal(out.sequences, engine.submit([prompt(1)], **kw).result().sequences)
    with pytest.raises(ValueError, match="events=False"):
        list(req)


def test_submit_events_and_result(engine):
    req = engine.submit([prompt(1)], seed=5, max_new_tokens=128, max_denoising_steps=4, eos_token_id=[],
                        adaptive_stopping=False)
    events = list(req)
    kinds = [e.kind for e in events]
    assert kinds == (["step"] * 4 + ["block"]) * 2 + ["done"]
    assert [e.step for e in events if e.kind == "step"] == [1, 2, 3, 4] * 2
    assert [e.canvas_index for e in events if e.kind == "block"] == [0, 1]
    out = events[-1].output
    assert out is req.result()
    assert [e.kind for e in req] == ["done"]  # events are handed out once
    assert req.status == "done" and req.done
    blocks = np.concatenate([e.canvas for e in events if e.kind == "block"], axis=1)
    np.testing.assert_array_equal(out.sequences[:, 12:], blocks)
    # The committed canvas is the last step's draft.
    np.testing.assert_array_equal(events[3].canvas, events[4].canvas)
    assert out.timings["queue_s"] >= 0 and out.timings["total_s"] >= out.timings["denoise_s"]


def test_cancel_mid_canvas_frees_the_pool(engine):
    assert pool_is_full(engine)
    req = engine.submit([prompt(2)], seed=1, max_new_tokens=640, max_denoising_steps=40, eos_token_id=[],
                        adaptive_stopping=False)
    seen = 0
    with pytest.raises(dgemma_rt.RequestCancelled):
        for ev in req:
            seen += 1
            if seen == 3:
                req.cancel()
    assert req.status == "cancelled"
    assert seen < 40  # stopped within the first canvas
    with pytest.raises(dgemma_rt.RequestCancelled):
        req.result()
    del req
    assert pool_is_full(engine)


def test_cancel_while_queued(tiny_dir):
    eng = dgemma_rt.Engine(tiny_dir, max_batch_size=1, num_threads=1)
    long = eng.submit([prompt(3)], seed=1, max_new_tokens=64, max_denoising_steps=200, eos_token_id=[],
                      adaptive_stopping=False)
    queued = eng.submit([prompt(4)], seed=1, **FIXED)
    assert queued.status == "queued"
    queued.cancel()
    assert queued.wait(timeout=10)
    assert queued.status == "cancelled"
    assert long.status in ("running", "queued")
    long.cancel()
    with pytest.raises(dgemma_rt.RequestCancelled):
        long.result(timeout=30)


def test_rows_bounded_by_max_batch_size(tiny_dir):
    eng = dgemma_rt.Engine(tiny_dir, max_batch_size=2, num_threads=1)
    seen = []

    def watch(_draft):
        seen.append(eng.scheduler_stats()["active_rows"])

    reqs = [eng.submit([prompt(10 + i)], seed=i, on_step=watch, **FIXED) for i in range(5)]
    outs = [r.result(timeout=120) for r in reqs]
    assert max(seen) == 2
    assert len(outs) == 5
    with pytest.raises(ValueError, match="max_batch_size"):
        eng.submit([prompt(1), prompt(2), prompt(3)], **FIXED)


def test_admission_waits_for_kv_blocks_and_refuses_what_never_fits(tiny_dir):
    # 256 tokens of full-attention cache = 16 blocks; a 12-token prompt + 3 canvases needs 9 of them.
    eng = dgemma_rt.Engine(tiny_dir, kv_cache_tokens=256, num_threads=1)
    order = []

    def tag(name):
        return lambda _draft: order.append(name)

    kw = dict(max_new_tokens=192, max_denoising_steps=3, eos_token_id=[], adaptive_stopping=False, keep_cache=False)
    a = eng.submit([prompt(20)], seed=1, on_step=tag("a"), **kw)
    b = eng.submit([prompt(21)], seed=2, on_step=tag("b"), **kw)
    out_a = a.result(timeout=60)
    out_b = b.result(timeout=60)
    # b had to wait until a was done (never over-committed), then ran to completion.
    assert order == ["a"] * 9 + ["b"] * 9
    assert out_b.timings["queue_s"] > 0
    assert out_a.past_key_values is None
    assert pool_is_full(eng)
    with pytest.raises(RuntimeError, match="KV cache pool too small"):
        eng.submit([prompt(22)], max_new_tokens=512, **{k: v for k, v in kw.items() if k != "max_new_tokens"})


def test_caches_held_elsewhere_refuse_a_waiting_request_instead_of_hanging(tiny_dir):
    eng = dgemma_rt.Engine(tiny_dir, kv_cache_tokens=256, num_threads=1)
    kw = dict(max_new_tokens=192, max_denoising_steps=2, eos_token_id=[], adaptive_stopping=False)
    kept = eng.generate([prompt(30)], seed=1, **kw)  # its cache keeps 9 blocks
    with pytest.raises(RuntimeError, match="KV cache pool too small") as e:
        eng.generate([prompt(31)], seed=1, **kw)
    assert "held by caches no request is running" in str(e.value) and "raise kv_cache_tokens" in str(e.value)
    del kept
    eng.generate([prompt(31)], seed=1, **kw)


def test_kept_caches_and_the_sliding_pool(tiny_dir):
    """The sliding pool holds, per batch row, a running row's peak and one kept cache's window. A result
    still referenced used to refuse the next request at max_batch_size=1 (`out = generate()` twice): every
    request reserved two windows, and the pool held exactly that. Past what it holds, the refusal says what
    holds the pool (it said "raise kv_cache_tokens / max_batch_size" with the full pool nearly empty)."""
    eng = dgemma_rt.Engine(tiny_dir, max_batch_size=1, num_threads=1)
    kw = dict(max_new_tokens=64, max_denoising_steps=1)
    out = eng.generate([prompt(32)], **kw)
    out = eng.generate([prompt(33)], **kw)  # the first result is still referenced meanwhile
    kept = [out]
    with pytest.raises(RuntimeError, match="KV cache pool too small") as e:
        for i in range(10):  # caches of a window each
            kept.append(eng.generate([prompt(34 + i, 3 * eng.config["sliding_window"])], **kw))
    assert len(kept) >= 2, len(kept)
    msg = str(e.value)
    assert "held by caches no request is running" in msg and "keep_cache=False" in msg, msg
    assert "raise max_batch_size" in msg and "kv_cache_tokens" not in msg, msg
    del kept, out
    gc.collect()
    assert pool_is_full(eng)
    eng.generate([prompt(33)], **kw)


def test_same_cache_twice_at_once_is_refused(engine):
    first = engine.generate([prompt(40)], seed=1, **FIXED)
    cache = first.past_key_values
    running = engine.submit([prompt(41, 3)], seed=1, past_key_values=cache, max_new_tokens=64,
                            max_denoising_steps=100, eos_token_id=[], adaptive_stopping=False)
    with pytest.raises(ValueError, match="in use"):
        engine.submit([prompt(42, 3)], past_key_values=cache, **FIXED)
    with pytest.raises(ValueError, match="in use"):
        engine.encode([prompt(42, 3)], past_key_values=cache)
    # The rows are claimed before their length is read (the running request changes it meanwhile): a
    # prompt too long for what the cache holds is refused as in use, not by that unsynchronised length.
    max_pos, canvas = engine.config["max_position_embeddings"], engine.config["canvas_length"]
    too_long = max_pos - canvas - cache.seq_lengths[0] + 1
    with pytest.raises(ValueError, match="in use"):
        engine.submit([prompt(43, too_long)], past_key_values=cache, **{**FIXED, "max_new_tokens": canvas})
    running.cancel()
    with pytest.raises(dgemma_rt.RequestCancelled):
        running.result()
    # Free again once the request ended.
    engine.generate([prompt(42, 3)], past_key_values=cache, **FIXED)


def test_generate_inside_a_callback_is_an_error_not_a_deadlock(engine):
    def nested(_draft):
        engine.generate([prompt(60)], **FIXED)

    with pytest.raises(ValueError, match="callback"):
        engine.generate([prompt(61)], on_step=nested, **FIXED)


def test_dropping_the_engine_cancels_what_runs(tiny_dir):
    eng = dgemma_rt.Engine(tiny_dir, num_threads=1)
    req = eng.submit([prompt(70)], max_new_tokens=64, max_denoising_steps=10_000, eos_token_id=[],
                     adaptive_stopping=False)
    while req.status == "queued":
        time.sleep(0.01)
    del eng
    gc.collect()
    with pytest.raises(dgemma_rt.RequestCancelled, match="shut down"):
        req.result(timeout=30)


def test_engine_dropped_by_its_own_callback(tiny_dir):
    """The last reference to an engine may go away on its scheduler thread; nothing hangs or crashes."""
    holder = {"engine": dgemma_rt.Engine(tiny_dir, num_threads=1)}
    done = threading.Event()

    def drop(_block):
        holder.pop("engine", None)
        done.set()

    req = holder["engine"].submit([prompt(80)], on_block=drop, **FIXED)
    assert done.wait(timeout=60)
    req.result(timeout=60)


def _maps_of(path) -> int:
    """Memory mappings of this process that name files under ``path`` (the checkpoint's weights)."""
    with open("/proc/self/maps") as f:
        return sum(str(path) in line for line in f)


def test_close_frees_the_engine_now(tiny_dir):
    """close() stops the engine while references remain: running and queued requests end as cancelled,
    the weights are unmapped, later calls say it is closed, and results made before stay readable."""
    eng = dgemma_rt.Engine(tiny_dir, num_threads=1)
    kept = eng.generate([prompt(90)], max_new_tokens=64, max_denoising_steps=2)
    running = eng.submit([prompt(91)], max_new_tokens=64, max_denoising_steps=10_000, eos_token_id=[],
                         adaptive_stopping=False)
    queued = eng.submit([prompt(92)] * eng.max_batch_size, **FIXED)  # waits: the rows are taken
    while running.status == "queued":
        time.sleep(0.01)
    mapped = _maps_of(tiny_dir)
    assert not eng.closed and mapped > 0
    eng.close()
    assert eng.closed and _maps_of(tiny_dir) < mapped
    for req in (running, queued):
        with pytest.raises(dgemma_rt.RequestCancelled, match="shut down"):
            req.result(timeout=30)
    for call in (lambda: eng.generate([prompt(93)]), lambda: eng.submit([prompt(93)]), lambda: eng.encode([prompt(93)]),
                 eng.scheduler_stats, eng.kv_pool_stats, lambda: eng.denoise_logits(kept.past_key_values, [[5]])):
        with pytest.raises(RuntimeError, match="this Engine is closed"):
            call()
    assert kept.past_key_values.layer_kv(0, 0)[0].shape[1] == kept.past_key_values.seq_lengths[0] == 12
    eng.close()  # twice: nothing
    with dgemma_rt.Engine(tiny_dir, num_threads=1) as eng2:
        assert eng2.generate([prompt(94)], **FIXED).sequences.shape[1] > 12
    assert eng2.closed


def test_close_inside_a_callback_and_beside_a_running_encode(tiny_dir):
    eng = dgemma_rt.Engine(tiny_dir, num_threads=1)
    with pytest.raises(dgemma_rt.RequestCancelled):
        eng.generate([prompt(95)], max_new_tokens=128, max_denoising_steps=3, on_step=lambda draft: eng.close())
    assert eng.closed
    # Another thread inside encode() holds the engine until its call returns; its next call is refused.
    eng = dgemma_rt.Engine(tiny_dir, num_threads=1)
    started, errors = threading.Event(), []

    def encode_forever():
        try:
            while True:
                started.set()
                eng.encode([prompt(96, 200)])
        except RuntimeError as e:
            errors.append(str(e))

    t = threading.Thread(target=encode_forever)
    t.start()
    assert started.wait(30)
    eng.close()
    t.join(60)
    assert not t.is_alive() and errors == ["this Engine is closed"]


def test_bad_submit_arguments(engine):
    with pytest.raises(TypeError, match="unexpected"):
        engine.submit([prompt(1)], temperature=0.5)
    with pytest.raises(ValueError):
        engine.submit([prompt(1)], max_new_tokens=0)
    with pytest.raises(ValueError):
        engine.submit([[5, 99999]])
    with pytest.raises(ValueError):
        engine.submit([prompt(1)], on_step=3)
    assert pool_is_full(engine)


@pytest.mark.parametrize("returns,words", [(None, r"returned None, not an array"),
                                           (np.zeros(3), r"returned an array of shape \(3,\), not \(1, ")])
def test_noise_returning_the_wrong_thing_says_what_it_returned(engine, returns, words):
    with pytest.raises(ValueError, match=words):
        engine.generate([prompt(3)], noise=lambda kind, shape: returns, **FIXED)


@pytest.mark.parametrize("kwargs,words", [
    # an int past float's range was an OverflowError; inf passed Python and got "must be >= 0, got inf"
    ({"entropy_bound": 10**400}, "entropy_bound must be a finite number"),
    ({"t_max": 10**5000}, "t_max must be a finite number, got an integer of 16610 bits"),  # past str()'s limit
    ({"t_min": float("inf")}, "t_min must be a finite number"),
    ({"confidence_threshold": float("nan")}, "confidence_threshold must be a finite number"),
    # flags were bool()ed: 'no' and [] were taken as True and False
    ({"adaptive_stopping": "no"}, "adaptive_stopping must be True or False"),
    ({"adaptive_stopping": []}, "adaptive_stopping must be True or False"),
    ({"keep_cache": "no"}, "keep_cache must be True or False"),
    ({"events": 1}, "events must be True or False"),
    # ragged nesting inside a row surfaced numpy's "inhomogeneous shape" error
    ({"input_ids": [[1, [2]]]}, "input_ids row 0 must be a flat sequence"),
    ({"canvas_template": [[1, [2]]]}, "canvas_template row 0 must be a 1-D sequence"),
    ({"past_key_values": dgemma_rt.KVCache(None, {})}, "got a KVCache holding no cache"),
])
def test_bad_arguments_are_value_errors_naming_them(engine, kwargs, words):
    kw = {"input_ids": [prompt(2)], **FIXED, **kwargs}
    with pytest.raises(ValueError, match=words):
        engine.submit(kw.pop("input_ids"), **kw)
    assert engine.submit([prompt(2)], adaptive_stopping=np.bool_(False), keep_cache=False,
                         **{k: v for k, v in FIXED.items() if k != "adaptive_stopping"}).result(timeout=60)
