"""The forward over the backend's op set: what the engine does with an incomplete backend, the
backend-owned KV storage and self-conditioning slots. (Numerical parity lives in test_parity.py.)"""

from __future__ import annotations

import gc
import threading
import time

import numpy as np
import pytest

import dgemma_rt
from dgemma_rt import _core


def _engine_without(ckpt, ops):
    return dgemma_rt.Engine._from_native(_core._testing.cpu_engine_without(ckpt.path, ops), ckpt.path)


def test_backend_missing_a_forward_op_is_refused_at_load(base_ckpt):
    with pytest.raises(NotImplementedError, match="cpu backend cannot run this model: it does not implement the "
                                                  "'moe_experts' op"):
        _core._testing.cpu_engine_without(base_ckpt.path, ["moe_experts"])
    with pytest.raises(ValueError, match="cannot be turned off"):
        _core._testing.cpu_engine_without(base_ckpt.path, ["no_such_op"])


def test_backend_missing_the_logits_ops_still_generates(base_ckpt, engine_for):
    ids = [[2, 11, 12, 13, 14]]
    partial = _engine_without(base_ckpt, ["lm_head_logits", "soft_embedding"])
    full = engine_for(base_ckpt)
    a = partial.generate(ids, max_new_tokens=8, max_denoising_steps=3, seed=3)
    b = full.generate(ids, max_new_tokens=8, max_denoising_steps=3, seed=3)
    np.testing.assert_array_equal(a.sequences, b.sequences)
    state = partial.encode(ids)
    canvas = np.zeros((1, 4), dtype=np.int32)
    with pytest.raises(NotImplementedError, match="does not implement the 'lm_head_logits' op"):
        partial.denoise_logits(state, canvas)
    sc_only = _engine_without(base_ckpt, ["soft_embedding"])
    state = sc_only.encode(ids)
    vocab = sc_only.config["vocab_size"]
    assert sc_only.denoise_logits(state, canvas).shape == (1, 4, vocab)
    with pytest.raises(NotImplementedError, match="'soft_embedding'"):
        sc_only.denoise_logits(state, canvas, self_conditioning_logits=np.zeros((1, 4, vocab), np.float32))


def test_kv_cache_copies_out_after_its_engine_is_gone(base_ckpt):
    engine = dgemma_rt.Engine(base_ckpt.path)
    ids = [[2] + list(range(20, 60))]
    state = engine.encode(ids)
    want = [state.layer_kv(layer, 0) for layer in range(engine.config["num_hidden_layers"])]
    del engine
    gc.collect()
    for layer, (k, v) in enumerate(want):
        k2, v2 = state.layer_kv(layer, 0)
        np.testing.assert_array_equal(k, k2)
        np.testing.assert_array_equal(v, v2)


def test_kv_cache_copies_out_between_passes_while_generating(base_ckpt):
    """layer_kv takes the engine's forward lock (on a GPU its copy waits for the engine's stream, which
    a pass being captured as a graph must not see), with the GIL released while it waits: from another
    thread during a generation, and from the scheduler thread's on_step callbacks (which run between
    passes, outside the lock), it returns what it returns when nothing runs. A cache that a running
    request uses is refused: the request grows it, and frees its blocks outside the lock when it ends."""
    engine = dgemma_rt.Engine(base_ckpt.path)
    state = engine.encode([[2] + list(range(20, 60))])
    want = [state.layer_kv(layer, 0) for layer in range(engine.config["num_hidden_layers"])]
    in_callback, refused = [], []
    running = threading.Event()
    other = engine.encode([[2, 7, 8, 9]])

    def on_step(_draft):
        in_callback.append(state.layer_kv(0, 0))
        try:
            other.layer_kv(0, 0)  # the cache this request is growing
        except ValueError as e:
            refused.append(str(e))
        running.set()
        time.sleep(0.01)

    kw = dict(max_new_tokens=2 * base_ckpt.canvas_length, max_denoising_steps=6, seed=1, eos_token_id=[],
              adaptive_stopping=False)
    job = threading.Thread(target=lambda: engine.generate([[30, 31, 32]], past_key_values=other, on_step=on_step,
                                                          **kw))
    job.start()
    assert running.wait(60)
    got = [[state.layer_kv(layer, 0) for layer in range(len(want))] for _ in range(5)]  # while it runs
    job.join(120)
    assert not job.is_alive() and len(in_callback) == 12
    assert len(refused) == 12 and all("in use by a request" in e for e in refused), refused
    for k, v in in_callback:
        np.testing.assert_array_equal(k, want[0][0])
        np.testing.assert_array_equal(v, want[0][1])
    for rep in got:
        for (k, v), (wk, wv) in zip(rep, want):
            np.testing.assert_array_equal(k, wk)
            np.testing.assert_array_equal(v, wv)
    other.layer_kv(0, 0)  # free again once the request has finished
    assert other.seq_lengths[0] > 4  # which grew it
    # layer_kv claims a cache only for its copy: both serve a request again
    for cache in (state, other):
        engine.generate([[5]], past_key_values=cache, **dict(kw, max_new_tokens=1))


def test_kv_cache_read_beside_encode_and_denoise_logits(base_ckpt):
    """layer_kv from one thread while another encodes into and decodes on the same cache: both wait for the
    forward lock, neither is refused."""
    engine = dgemma_rt.Engine(base_ckpt.path)
    state = engine.encode([[2] + list(range(20, 60))])
    layers = engine.config["num_hidden_layers"]
    stop, errors = threading.Event(), []

    def reader():
        try:
            while not stop.is_set():
                for layer in range(layers):
                    state.layer_kv(layer, 0)
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    t = threading.Thread(target=reader)
    t.start()
    try:
        for i in range(40):
            engine.denoise_logits(state, [[3] * 4])
            if i % 4 == 0:
                engine.encode([[3]], past_key_values=state)
    finally:
        stop.set()
        t.join(60)
    assert not errors and state.seq_lengths == [41 + 10]


def test_self_conditioning_slots_are_returned(base_ckpt):
    """One slot per row of max_batch_size: requests that finish, fail or are cancelled give theirs back."""
    engine = dgemma_rt.Engine(base_ckpt.path, max_batch_size=2)
    ids = [[2, 30, 31], [2, 40, 41]]
    first = engine.generate(ids, max_new_tokens=8, max_denoising_steps=4, seed=1, keep_cache=False)
    for _ in range(3):
        engine.generate(ids, max_new_tokens=8, max_denoising_steps=4, seed=1, keep_cache=False)
    req = engine.submit(ids, max_new_tokens=64, max_denoising_steps=48, adaptive_stopping=False, keep_cache=False)
    req.cancel()
    with pytest.raises(dgemma_rt.RequestCancelled):
        req.result(timeout=60)

    def bad_noise(kind, shape):
        raise RuntimeError("noise failed")

    with pytest.raises(RuntimeError, match="noise failed"):
        engine.generate(ids, max_new_tokens=8, noise=bad_noise, keep_cache=False)
    again = engine.generate(ids, max_new_tokens=8, max_denoising_steps=4, seed=1, keep_cache=False)
    np.testing.assert_array_equal(first.sequences, again.sequences)
