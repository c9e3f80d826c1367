"""Regression tests for issue 11 (hardening): one or more per finding, on the built-in tiny checkpoint.

What could crash, hang or take gigabytes is loaded in a child process (checkpoint_fuzz.Runner); the rest
runs in process.
"""

from __future__ import annotations

import gc
import json
import os
import shutil
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

import dgemma_rt
from checkpoint_fuzz import Runner
from dgemma_rt.tiny import make_tiny

GEN = {"max_new_tokens": 1, "max_denoising_steps": 1}


def _python(code: str, *args: str) -> subprocess.CompletedProcess:
    """Runs code in a fresh interpreter that imports this test's dgemma_rt."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        p for p in (os.path.dirname(os.path.dirname(dgemma_rt.__file__)), os.environ.get("PYTHONPATH")) if p))
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=60, env=env)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> str:
    return str(make_tiny(tmp_path_factory.mktemp("hardening") / "tiny"))


@pytest.fixture(scope="module")
def engine(tiny_dir):
    return dgemma_rt.Engine(tiny_dir, num_threads=2)


@pytest.fixture(scope="module")
def runner():
    r = Runner()
    yield r
    r.close()


@pytest.fixture
def ckpt(tmp_path, tiny_dir):
    """A copy of the tiny checkpoint to spoil."""
    path = str(tmp_path / "ckpt")
    shutil.copytree(tiny_dir, path)
    return path


def _edit(path: str, file: str, fn) -> None:
    p = os.path.join(path, file)
    with open(p) as f:
        obj = json.load(f)
    text = fn(obj)
    with open(p, "w") as f:
        f.write(text if isinstance(text, str) else json.dumps(obj))


def _set_text_config(**kw):
    return lambda c: c["text_config"].update(kw)


def _deep(depth: int) -> str:
    return "[" * depth + "]" * depth


# ------------------------------------------------------------------------------------------ 1. deep nesting
@pytest.mark.parametrize("file,edit", [
    ("config.json", lambda c: json.dumps(c).replace('"hidden_size": 128', '"hidden_size": ' + _deep(70000))),
    ("config.json", lambda c: json.dumps(c).replace('"rope_parameters": {', '"rope_parameters": {"x": ' + _deep(300000) + ", ")),
    ("generation_config.json", lambda c: json.dumps(c).replace('"t_min": 0.4', '"t_min": ' + _deep(70000))),
], ids=["config_wrong_type", "rope_parameters", "generation_config"])
def test_deeply_nested_json_is_a_checkpoint_error(runner, ckpt, file, edit):
    _edit(ckpt, file, edit)
    res = runner.load(ckpt, kwargs={})
    assert res["outcome"] == "checkpoint_error", res
    assert file in res["message"] and "nests deeper" in res["message"]


# ------------------------------------------------------------------------------------------ 2. FIFOs
@pytest.mark.parametrize("file", ["config.json", "model.safetensors", "generation_config.json"])
def test_fifo_is_refused_without_blocking(runner, ckpt, file):
    os.remove(os.path.join(ckpt, file))
    os.mkfifo(os.path.join(ckpt, file))
    res = runner.load(ckpt, kwargs={}, timeout=10)
    assert res["outcome"] == "checkpoint_error", res
    assert file in res["message"] and "named pipe" in res["message"]


def test_tokenizer_files_are_refused_without_blocking(ckpt):
    """tokenizer_config.json as a FIFO, or nested too deep for Python's json: CheckpointError, no hang."""
    code = ("import dgemma_rt, sys\n"
            "try:\n"
            "    dgemma_rt.Engine(sys.argv[1]).tokenizer\n"
            "except dgemma_rt.CheckpointError as e:\n"
            "    print('CheckpointError', e)\n")
    cfg = os.path.join(ckpt, "tokenizer_config.json")
    os.remove(cfg)
    os.mkfifo(cfg)
    out = _python(code, ckpt)
    assert out.stdout.startswith("CheckpointError") and "not a regular file" in out.stdout, out
    os.remove(cfg)
    with open(cfg, "w") as f:
        f.write(_deep(100000))
    out = _python(code, ckpt)
    assert out.stdout.startswith("CheckpointError"), out


# ------------------------------------------------------------------------------------------ 3. memory from config values
def test_long_sliding_window_costs_no_resident_memory(runner, ckpt):
    # 3.9 GB of sliding KV pool at max_batch_size 8 (it was zero-filled at load): address space, not RSS.
    _edit(ckpt, "config.json", _set_text_config(sliding_window=100000, max_position_embeddings=131072))
    res = runner.load(ckpt, kwargs={"num_threads": 1}, generate={"max_new_tokens": 64, "max_denoising_steps": 2},
                      memory_cap=6 << 30)
    assert res["outcome"] == "loaded", res
    assert res["maxrss"] < 500 << 20, res


@pytest.mark.parametrize("edit,words", [
    (_set_text_config(sliding_window=10**6), ["sliding_window", "max_position_embeddings"]),
    (_set_text_config(sliding_window=10**6, max_position_embeddings=2**24), ["sliding_window", "single batch row"]),
    (_set_text_config(head_dim=10**9), ["head_dim"]),
    (lambda c: (c["text_config"].pop("layer_types"), c["text_config"].update(num_hidden_layers=10**7)),
     ["num_hidden_layers"]),
], ids=["window_past_positions", "window_past_memory", "head_dim", "num_hidden_layers"])
def test_config_values_are_checked_before_allocating(runner, ckpt, edit, words):
    _edit(ckpt, "config.json", edit)
    res = runner.load(ckpt, kwargs={})  # under a 1 GB cap: refused before anything large is allocated
    assert res["outcome"] == "checkpoint_error", res
    assert all(w in res["message"] for w in words), res
    assert res["maxrss"] < 300 << 20 and res["seconds"] < 5, res


def test_pool_options_are_checked_against_memory(tiny_dir):
    with pytest.raises(ValueError, match="kv_cache_tokens 2147483647 .* need"):
        dgemma_rt.Engine(tiny_dir, kv_cache_tokens=2**31 - 1)
    with pytest.raises(ValueError, match="kv_cache_tokens"):
        dgemma_rt.Engine(tiny_dir, kv_cache_tokens=2**31)
    with pytest.raises(ValueError, match="max_batch_size"):
        dgemma_rt.Engine(tiny_dir, max_batch_size=10**6)


# ------------------------------------------------------------------------------------------ 4. exception types
def test_checkpoint_file_as_symlink_loop_or_directory(ckpt):
    os.remove(os.path.join(ckpt, "config.json"))
    os.mkdir(os.path.join(ckpt, "config.json"))
    with pytest.raises(dgemma_rt.CheckpointError, match="config.json is a directory"):
        dgemma_rt.Engine(ckpt)
    os.rmdir(os.path.join(ckpt, "config.json"))
    os.symlink("config.json", os.path.join(ckpt, "config.json"))
    with pytest.raises(dgemma_rt.CheckpointError, match="symbolic links"):
        dgemma_rt.Engine(ckpt)
    loop = os.path.join(os.path.dirname(ckpt), "loop")
    os.symlink("loop", loop)
    with pytest.raises(dgemma_rt.CheckpointError, match="symbolic links"):
        dgemma_rt.Engine(loop)


def test_undecodable_bytes_in_a_header_give_a_readable_checkpoint_error(ckpt):
    p = os.path.join(ckpt, "model.safetensors")
    with open(p, "rb") as f:
        blob = bytearray(f.read())
    at = blob.index(b"model.decoder.norm.weight")
    blob[at + 6 : at + 9] = b"\xff\xc3\x28"  # not UTF-8
    with open(p, "wb") as f:
        f.write(blob)
    with pytest.raises(dgemma_rt.CheckpointError) as info:
        dgemma_rt.Engine(ckpt)
    assert "model.safetensors" in str(info.value) and "\\x" in str(info.value)


# ------------------------------------------------------------------------------------------ 5. exact types and ranges
@pytest.mark.parametrize("key,value,words", [
    ("hidden_size", 2**32 + 128, "outside the supported range"),
    ("max_position_embeddings", -(10**18), "outside the supported range"),
    ("top_k_experts", True, "must be an integer, got true"),
    ("hidden_size", 128.7, "must be an integer, got 128.7"),
    ("hidden_size", 128.0, "must be an integer"),
    ("vocab_size", "2048", "must be an integer"),
    ("rms_norm_eps", -1e-6, "finite number in (0, 1]"),
    ("rms_norm_eps", 0, "finite number in (0, 1]"),
    ("final_logit_softcapping", 0, "final_logit_softcapping"),
    ("sliding_window", 0, "outside the supported range"),
])
def test_config_types_and_ranges(ckpt, key, value, words):
    _edit(ckpt, "config.json", _set_text_config(**{key: value}))
    with pytest.raises(dgemma_rt.CheckpointError) as info:
        dgemma_rt.Engine(ckpt)
    assert key in str(info.value) and words in str(info.value), info.value


@pytest.mark.parametrize("theta", [0, -10000.0])
def test_rope_theta_must_be_positive(ckpt, theta):
    _edit(ckpt, "config.json", lambda c: c["text_config"]["rope_parameters"]["sliding_attention"].update(rope_theta=theta))
    with pytest.raises(dgemma_rt.CheckpointError, match="rope_theta"):
        dgemma_rt.Engine(ckpt)


@pytest.mark.parametrize("key,value", [("eos_token_id", [1, 2048]), ("pad_token_id", 2**31), ("max_denoising_steps", 0),
                                       ("stability_threshold", -1), ("t_min", "low"), ("t_max", 1e39)])
def test_generation_config_types_and_ranges(ckpt, key, value):
    _edit(ckpt, "generation_config.json", lambda c: c.update({key: value}))
    with pytest.raises(dgemma_rt.CheckpointError, match=key):
        dgemma_rt.Engine(ckpt)


# ------------------------------------------------------------------------------------------ 7. stability_threshold
@pytest.mark.parametrize("steps", [3, 10**7])
def test_huge_stability_threshold_allocates_no_history(runner, tiny_dir, steps):
    # [threshold, rows, canvas] of history was 2.5 GB at 10**7, then at most max_denoising_steps deep (which
    # may be as large: 10**7 steps, here ended after one by a template that locks every position); now it is
    # one canvas per row and a count, whatever both are.
    res = runner.load(tiny_dir, kwargs={"num_threads": 1},
                      generate={"max_new_tokens": 64, "max_denoising_steps": steps, "stability_threshold": 2**31 - 1,
                                "canvas_template": [[5] * 64]})
    assert res["outcome"] == "loaded", res
    assert res["maxrss"] < 300 << 20, res


def test_stability_threshold_beyond_the_steps_changes_nothing(engine):
    ids = [[2, 17, 33, 64, 99]]
    kw = dict(max_new_tokens=128, max_denoising_steps=5, seed=3, confidence_threshold=100.0)
    outs = [engine.generate(ids, stability_threshold=t, **kw) for t in (5, 6, 10**7, 2**31 - 1)]
    for o in outs[1:]:
        np.testing.assert_array_equal(o.sequences, outs[0].sequences)
        assert o.steps_per_canvas == outs[0].steps_per_canvas


# ------------------------------------------------------------------------------------------ 8. lone surrogates
def test_lone_surrogate_is_a_value_error(engine):
    with pytest.raises(ValueError, match="not valid Unicode"):
        engine.generate_text("x\ud800y", **GEN)
    with pytest.raises(ValueError, match="not valid Unicode"):
        engine.generate_text([{"role": "user", "content": "x\udc00y"}], **GEN)
    with pytest.raises(ValueError, match="not valid Unicode"):
        engine.tokenizer.encode("\ud800")


def test_generate_text_takes_text_chats_or_lists_of_them(engine):
    """A dict was iterated as its keys (two prompts, "role" and "content"); a tuple chat is a chat."""
    msg = {"role": "user", "content": "Why is the sky blue?"}
    chat = engine.generate_text([msg], **GEN)
    assert isinstance(chat, str) and engine.generate_text((msg,), **GEN) == chat
    both = engine.generate_text([(msg,), "hi"], **GEN)  # a batch: row 0 draws the noise a single row does
    assert len(both) == 2 and both[0] == chat and all(isinstance(t, str) for t in both)
    for prompt, words in [(msg, "got dict"), (None, "got NoneType"), (5, "got int"), (b"hi", "got bytes"),
                          ([msg, "hi"], "prompt 0 must be .* got one message dict outside a list"),
                          (["hi", [msg, 3]], "prompt 1 must be"), ([], "no prompt given"),
                          (["hi", []], "prompt 1 must be .* got an empty chat")]:
        with pytest.raises(ValueError, match=words):
            engine.generate_text(prompt, **GEN)
    # messages that an iterator gave were used up by the check, and the chat rendered without them
    with pytest.raises(ValueError, match="messages must be a list"):
        engine.tokenizer.render_chat_template(m for m in [msg])
    with pytest.raises(ValueError, match="messages is empty"):
        engine.tokenizer.render_chat_template([])


def test_a_failing_chat_template_is_a_value_error(tiny_dir):
    """Whatever the checkpoint's template raises while rendering (it is the checkpoint's code) is a
    ValueError naming it, as a syntax error is: the server's 400, the CLI's error line."""
    from dgemma_rt.text import Tokenizer

    tok = Tokenizer.from_dir(tiny_dir)
    for source, words in [("{{ 1 // 0 }}", "ZeroDivisionError"), ("{{ range(10**9) | list }}", "OverflowError"),
                          ("{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}", "RecursionError"),
                          ("{{ raise_exception('no system role') }}", "no system role"), ("{% if %}", "TemplateSyntaxError")]:
        tok.chat_template = source
        with pytest.raises(ValueError, match=f"chat template failed: .*{words}"):
            tok.apply_chat_template([{"role": "user", "content": "hi"}])


# ------------------------------------------------------------------------------------------ 9. integers >= 2**31
@pytest.mark.parametrize("name", ["max_new_tokens", "max_denoising_steps", "stability_threshold", "pad_token_id",
                                  "eos_token_id", "seed"])
@pytest.mark.parametrize("value", [2**31, 2**64, -(2**63)])
def test_huge_integer_arguments_are_value_errors_naming_them(engine, name, value):
    if name == "seed" and value == 2**31:
        return  # a valid seed
    with pytest.raises(ValueError, match=name):
        engine.generate([[2, 3, 4]], **{name: value})


def test_native_layer_checks_integers_too(engine):
    """What the Python layer checks, the native one checks again (for other callers of _core)."""
    base = engine._params({"max_new_tokens": 1, "max_denoising_steps": 1})
    for name, value in [("max_new_tokens", 2**31), ("max_denoising_steps", 2**40), ("stability_threshold", -(2**40)),
                        ("pad_token_id", 2**31), ("max_new_tokens", True)]:
        with pytest.raises(ValueError, match=name):
            engine._native.submit([[2, 3, 4]], {**base, name: value})
    with pytest.raises(ValueError, match="eos_token_id"):
        engine._native.submit([[2, 3, 4]], {**base, "eos_token_id": [1, 2**33]})
    with pytest.raises(ValueError, match="kv_cache_tokens"):
        dgemma_rt._core.Engine(engine.path, "cpu", 2**31, 8, 0, None)


# ------------------------------------------------------------------------------------------ 10. re-entrancy
def _in_thread(fn, timeout=60):
    out = {}

    def run():
        try:
            out["value"] = fn()
        except BaseException as e:  # noqa: BLE001
            out["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(timeout)
    assert not t.is_alive(), "deadlocked"
    return out


def test_iterating_a_request_inside_its_own_callback_is_an_error(engine):
    seen = []

    def on_step(draft):
        seen.append(draft)
        list(req)  # would wait for events only this thread can produce

    def go():
        nonlocal req
        req = engine.submit([[2, 3, 4]], on_step=on_step, max_new_tokens=64, max_denoising_steps=3)
        return req.result()

    req = None
    out = _in_thread(go)
    assert isinstance(out.get("error"), ValueError) and "callback" in str(out["error"]), out
    assert len(seen) == 1


def test_waiting_on_another_request_inside_a_callback_is_an_error(engine):
    errors = []
    other = engine.submit([[5, 6, 7]], max_new_tokens=64 * 4, max_denoising_steps=20, stability_threshold=20)

    def on_step(draft):
        for wait in (lambda: list(other), other.result, lambda: other.wait(1.0)):
            try:
                wait()
            except ValueError as e:
                errors.append(e)

    try:
        out = _in_thread(lambda: engine.generate([[2, 3, 4]], on_step=on_step, **GEN))
        assert "error" not in out, out
        assert len(errors) == 3, errors
    finally:
        other.cancel()
        with pytest.raises(dgemma_rt.RequestCancelled):
            other.result()


# ------------------------------------------------------------------------------------------ 11. smaller
def test_thread_count_is_capped(tiny_dir):
    with pytest.raises(ValueError, match="num_threads"):
        dgemma_rt.Engine(tiny_dir, num_threads=1000)
    with pytest.raises(ValueError, match="num_threads"):
        dgemma_rt.Engine(tiny_dir, num_threads=2**31)
    limit = dgemma_rt._core.thread_limit()
    assert limit >= 16
    dgemma_rt.Engine(tiny_dir, num_threads=limit)


def test_stats_are_settled_once_result_returned(engine):
    for i in range(10):
        req = engine.submit([[2, 3, 4 + i]], **GEN)
        if i % 3 == 2:
            req.cancel()
        try:
            req.result()
        except dgemma_rt.RequestCancelled:
            pass
        stats = engine.scheduler_stats()
        assert stats["running_requests"] == 0 and stats["active_rows"] == 0, (i, stats)
    gc.collect()


@pytest.mark.parametrize("failing", ["on_step", "noise"])
def test_failed_requests_nobody_reads_do_not_deadlock_stats(tiny_dir, failing):
    """The scheduler thread destroyed finished requests under its lock; the last copy of a failed callback's
    exception is freed with the GIL, which a thread asking scheduler_stats() held while it waited for that lock."""
    bad = ("on_step=lambda d: (_ for _ in ()).throw(ValueError('x'))" if failing == "on_step"
           else "noise=lambda kind, shape: (_ for _ in ()).throw(ValueError('x'))")
    code = ("import dgemma_rt, sys, threading, time\n"
            "e = dgemma_rt.Engine(sys.argv[1], num_threads=1, max_batch_size=4)\n"
            "stop = []\n"
            "def poll():\n"
            "    while not stop:\n"
            "        e.scheduler_stats()\n"
            "threading.Thread(target=poll, daemon=True).start()\n"
            "t0 = time.time()\n"
            "while time.time() - t0 < 3:\n"
            f"    e.submit([[2, 5, 6]], {bad}, max_new_tokens=16, max_denoising_steps=2)\n"
            "    time.sleep(0.001)\n"
            "stop.append(1)\n"
            "print('failed', e.scheduler_stats()['failed'] > 0)\n")
    p = subprocess.run([sys.executable, "-c", code, str(tiny_dir)], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and p.stdout == "failed True\n", (p.returncode, p.stdout, p.stderr[-2000:])


# Leaving Python used to abort the process ("terminate called without an active exception") when a native
# thread took the GIL during finalization: (script, runs, what it prints).
EXIT_CASES = {
    # a request (and its Python callback) still running
    "request_running": ("import dgemma_rt, sys, time\n"
                        "e = dgemma_rt.Engine(sys.argv[1], num_threads=1)\n"
                        "r = e.submit([[2, 3, 4]], max_new_tokens=256, max_denoising_steps=20, stability_threshold=20,\n"
                        "             on_step=lambda d: None)\n"
                        "time.sleep(0.3)\n", 3, ""),
    # A callback's exception is kept by its request until result() raises it again (the callback's own,
    # traceback included), and the scheduler thread may drop the last copy while Python finalizes: about
    # half the runs aborted.
    "callback_raised": ("import dgemma_rt, sys, traceback\n"
                        "e = dgemma_rt.Engine(sys.argv[1], num_threads=1)\n"
                        "def bad(draft):\n"
                        "    raise KeyError('from the callback')\n"
                        "try:\n"
                        "    e.generate([[2, 3]], max_new_tokens=64, max_denoising_steps=3, on_step=bad)\n"
                        "except KeyError as ex:\n"
                        "    print('caught', ex, [f.name for f in traceback.extract_tb(ex.__traceback__)][-1])\n",
                        8, "caught 'from the callback' bad\n"),
    # Daemon threads inside native calls (GIL released) when the main thread returns: taking the GIL back
    # during finalization ended them through py::gil_scoped_release's noexcept destructor (every run aborted),
    # and through an Engine's dealloc (engines made and dropped in a loop, about 1 run in 5).
    "daemon_threads_in_native_calls": (
        "import dgemma_rt, sys, threading, time\n"
        "e = dgemma_rt.Engine(sys.argv[1], num_threads=1)\n"
        "def loop(call):\n"
        "    while True:\n"
        "        try:\n"
        "            call()\n"
        "        except Exception:\n"
        "            pass\n"
        "calls = [lambda: e.encode([[5, 6] * 50]),\n"
        "         lambda: e.generate([[5, 6]], max_new_tokens=64, max_denoising_steps=2, on_step=lambda d: None),\n"
        "         lambda: dgemma_rt.Engine(sys.argv[1], num_threads=1, progress=lambda *a: None)]\n"
        "for call in calls + calls:\n"
        "    threading.Thread(target=loop, args=(call,), daemon=True).start()\n"
        "time.sleep(0.5)\n", 6, ""),
    # An atexit handler registered before the import runs after dgemma_rt's hook: its requests still run
    # their callbacks (they were all cancelled, and iterating one hung), ...
    "generate_in_a_later_atexit_handler": (
        "import atexit, sys\n"
        "def late():\n"
        "    print(eng.generate([[2, 3]], max_new_tokens=4, max_denoising_steps=2).sequences.shape)\n"
        "    print([ev.kind for ev in eng.submit([[2, 3]], max_new_tokens=4, max_denoising_steps=2)][-2:])\n"
        "atexit.register(late)\n"
        "import dgemma_rt\n"
        "eng = dgemma_rt.Engine(sys.argv[1], num_threads=1)\n", 1,
        "(1, 66)\n['block', 'done']\n"),
    # ... and a daemon thread is not parked before finalization, holding a lock such a handler needs.
    "daemon_thread_lets_go_of_its_locks": (
        "import atexit, sys, threading, time\n"
        "lock = threading.Lock()\n"
        "def late():\n"
        "    with lock:\n"
        "        print('got the lock')\n"
        "atexit.register(late)\n"
        "import dgemma_rt\n"
        "eng = dgemma_rt.Engine(sys.argv[1], num_threads=1)\n"
        "def worker():\n"
        "    with lock:\n"
        "        try:\n"
        "            eng.generate([[5, 6]], max_new_tokens=512, max_denoising_steps=128, adaptive_stopping=False)\n"
        "        except dgemma_rt.RequestCancelled:\n"
        "            pass\n"
        "threading.Thread(target=worker, daemon=True).start()\n"
        "time.sleep(0.5)\n", 2, "got the lock\n"),
}


@pytest.mark.parametrize("case", list(EXIT_CASES))
def test_exit_is_clean(tiny_dir, case):
    code, runs, printed = EXIT_CASES[case]
    for _ in range(runs):
        out = _python(code, str(tiny_dir))
        assert out.returncode == 0 and out.stdout == printed, out


# ------------------------------------------------------------------------------------------ load-time quantization
# Engine(path, quant=...) and dgemma-quantize read the checkpoint in Python (nvfp4.quantize_checkpoint): they
# go through the native loader's checks first and raise the same CheckpointError, naming the file.
QUANT = [{"quant": "nvfp4"}, {"dense_quant": "fp8"}]


def _quantize_cli(src: str, dst: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        p for p in (os.path.dirname(os.path.dirname(dgemma_rt.__file__)), os.environ.get("PYTHONPATH")) if p))
    return subprocess.run([sys.executable, "-m", "dgemma_rt.nvfp4", src, dst], capture_output=True, text=True,
                          timeout=60, env=env)


@pytest.mark.parametrize("file", ["config.json", "model.safetensors", "generation_config.json"])
@pytest.mark.parametrize("quant", QUANT, ids=["quant", "dense_quant"])
def test_fifo_is_refused_by_load_time_quantization(runner, ckpt, file, quant):
    os.remove(os.path.join(ckpt, file))
    os.mkfifo(os.path.join(ckpt, file))
    res = runner.load(ckpt, kwargs={"num_threads": 1, **quant}, timeout=10)
    assert res["outcome"] == "checkpoint_error", res
    assert file in res["message"] and "named pipe" in res["message"], res


@pytest.mark.parametrize("file", ["config.json", "model.safetensors"])
def test_fifo_is_refused_by_dgemma_quantize(ckpt, tmp_path, file):
    os.remove(os.path.join(ckpt, file))
    os.mkfifo(os.path.join(ckpt, file))
    r = _quantize_cli(ckpt, str(tmp_path / "out"))  # the 60 s timeout would raise if it blocked
    assert r.returncode == 2 and file in r.stderr and "named pipe" in r.stderr, r
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "out").exists()  # refused before anything was written


def _corrupt_header(ckpt: str, how: str) -> None:
    p = os.path.join(ckpt, "model.safetensors")
    with open(p, "rb") as f:
        blob = bytearray(f.read())
    n = int.from_bytes(blob[:8], "little")
    if how == "utf8":
        at = blob.index(b"model.decoder.norm.weight")
        blob[at + 6 : at + 9] = b"\xff\xc3\x28"
    elif how == "key":  # a tensor entry without "dtype"
        at = blob.index(b'"dtype"', 8)
        blob[at + 1 : at + 6] = b"xtype"
    elif how == "deep":  # nested 100000 levels deep, where Python's json would recurse
        deep = b'{"x":' + b"[" * 100000 + b"]" * 100000 + b","
        blob = blob[:8] + deep + blob[9 : 8 + n] + blob[8 + n :]
        blob[:8] = (n + len(deep) - 1).to_bytes(8, "little")
    elif how == "length":
        blob[:8] = (2**63).to_bytes(8, "little")
    with open(p, "wb") as f:
        f.write(blob)


CORRUPT = ["utf8", "key", "deep", "length"]


@pytest.mark.parametrize("how", CORRUPT)
def test_corrupt_header_under_load_time_quantization(ckpt, how):
    _corrupt_header(ckpt, how)
    for quant in QUANT:
        with pytest.raises(dgemma_rt.CheckpointError, match="model.safetensors"):
            dgemma_rt.Engine(ckpt, num_threads=1, **quant)


@pytest.mark.parametrize("how", CORRUPT)
def test_corrupt_header_in_dgemma_quantize(ckpt, tmp_path, how):
    _corrupt_header(ckpt, how)
    r = _quantize_cli(ckpt, str(tmp_path / "out"))
    assert r.returncode == 2 and "model.safetensors" in r.stderr and "Traceback" not in r.stderr, r


def test_python_safetensors_reader_follows_the_loader_rules(ckpt, tmp_path):
    """nvfp4.read_safetensors on its own (no native check first): CheckpointError for every bad file."""
    from dgemma_rt import nvfp4

    p = os.path.join(ckpt, "model.safetensors")
    tensors, _ = nvfp4.read_safetensors(p)
    assert tensors
    for how in CORRUPT:
        d = tmp_path / how
        d.mkdir()
        shutil.copy(p, d / "model.safetensors")
        _corrupt_header(str(d), how)
        with pytest.raises(dgemma_rt.CheckpointError, match="model.safetensors"):
            nvfp4.read_safetensors(d / "model.safetensors")
    os.mkfifo(tmp_path / "fifo.safetensors")
    with pytest.raises(dgemma_rt.CheckpointError, match="not a regular file"):
        nvfp4.read_safetensors(tmp_path / "fifo.safetensors")
    with pytest.raises(dgemma_rt.CheckpointError, match="JSON nested deeper"):
        (tmp_path / "deep.json").write_text(_deep(100))
        nvfp4.read_json_file(tmp_path / "deep.json")


def test_quantization_checks_memory_before_reading(runner, ckpt):
    _edit(ckpt, "config.json", _set_text_config(sliding_window=10**6, max_position_embeddings=2**24))
    res = runner.load(ckpt, kwargs={"quant": "nvfp4"})
    assert res["outcome"] == "checkpoint_error" and "single batch row" in res["message"], res
    assert res["seconds"] < 5, res


# ------------------------------------------------------------------------------------------ KVCache.layer_kv
def test_layer_kv_checks_its_arguments(engine):
    state = engine.encode([[2, 3, 4]])
    layers = engine.config["num_hidden_layers"]
    k, v = state.layer_kv(layers - 1, 0)
    assert k.shape[1] == 3 and v.shape == k.shape
    for layer, row, name in [(layers, 0, "layer"), (-1, 0, "layer"), (2**31, 0, "layer"), (0, 1, "row"),
                             (0, -1, "row"), (0, 2**40, "row"), (True, 0, "layer"), (0, 0.0, "row"),
                             (np.int64(0), "0", "row")]:
        with pytest.raises(ValueError, match=name):
            state.layer_kv(layer, row)
    np.testing.assert_array_equal(state.layer_kv(np.int64(0), np.int32(0))[0], state.layer_kv(0, 0)[0])


def test_denoise_logits_stops_at_max_position_embeddings(engine):
    """The canvas goes after the cached tokens, at positions the model has: as encode checks its tokens,
    denoise_logits checks the canvas's (before, any n ran, for as long as it took)."""
    limit = engine.config["max_position_embeddings"]
    state = engine.encode([[3] * (limit - 8)])
    assert engine.denoise_logits(state, [[3] * 8]).shape[1] == 8  # the last 8 positions
    for n in (9, 300000):
        with pytest.raises(ValueError, match="max_position_embeddings"):
            engine.denoise_logits(state, [[3] * n])
    with pytest.raises(ValueError, match="max_position_embeddings"):
        engine.encode([[3] * 9], past_key_values=state)


# ------------------------------------------------------------------------------------------ Request from many threads
def _long_request(engine, **kw):
    """A request that runs for a while: 20 canvases of 20 steps that never stop early."""
    return engine.submit([[2, 3, 4]], max_new_tokens=64 * 20, max_denoising_steps=20, stability_threshold=20, **kw)


def test_concurrent_result_calls_get_the_same_output(engine):
    """result() from several threads at once (and list(req) beside them): one hands the native result over,
    every caller gets the same output, and so does a later call."""
    for _ in range(3):
        req = engine.submit([[2, 3, 4]], max_new_tokens=64, max_denoising_steps=3)
        start = threading.Barrier(5)

        def get():
            start.wait()
            return req.result()

        def iterate():
            start.wait()
            return list(req)[-1].output

        threads_out: list = [None] * 5

        def run(i, fn):
            try:
                threads_out[i] = fn()
            except BaseException as e:  # noqa: BLE001
                threads_out[i] = e

        threads = [threading.Thread(target=run, args=(i, fn), daemon=True)
                   for i, fn in enumerate([get] * 4 + [iterate])]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not any(t.is_alive() for t in threads), "deadlocked"
        assert all(isinstance(o, dgemma_rt.GenerateOutput) for o in threads_out), threads_out
        assert all(o is threads_out[0] for o in threads_out)
        assert req.result() is threads_out[0] and req.status == "done"


def test_concurrent_result_calls_share_the_error(engine):
    req = _long_request(engine)
    req.cancel()
    errors: list = []

    def get():
        try:
            req.result()
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=get, daemon=True) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(errors) == 3 and all(isinstance(e, dgemma_rt.RequestCancelled) for e in errors), errors
    with pytest.raises(dgemma_rt.RequestCancelled):
        req.result()
    assert req.status == "cancelled"


def test_every_thread_iterating_a_request_ends(engine):
    req = engine.submit([[2, 3, 4]], max_new_tokens=128, max_denoising_steps=3)
    got: list[list] = [[], [], []]

    def consume(i):
        got[i] = list(req)

    threads = [threading.Thread(target=consume, args=(i,), daemon=True) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not any(t.is_alive() for t in threads), "an iteration never ended"
    # Each got the "done" event last; the other events went to one of them each.
    assert all(evs and evs[-1].kind == "done" for evs in got)
    blocks = sorted(e.canvas_index for evs in got for e in evs if e.kind == "block")
    assert blocks == [0, 1]
    assert list(req)[-1].output is req.result()  # a later iteration only gets the end


def test_ctrl_c_while_iterating_cancels_the_request(engine):
    """As Ctrl-C in result() does: the KeyboardInterrupt goes on, and the request is cancelled."""
    import signal

    if threading.current_thread() is not threading.main_thread():
        pytest.skip("signals reach the main thread only")
    main = threading.main_thread().ident
    steps = [0]

    def on_step(draft):  # the scheduler thread: the main thread waits for the next event meanwhile
        steps[0] += 1
        if steps[0] == 3:
            time.sleep(0.2)
            signal.pthread_kill(main, signal.SIGINT)
            time.sleep(0.2)

    req = _long_request(engine, on_step=on_step)
    with pytest.raises(KeyboardInterrupt):
        for _ in req:
            pass
    assert req.wait(30)
    assert req.status == "cancelled"
    with pytest.raises(dgemma_rt.RequestCancelled):
        req.result()


# ------------------------------------------------------------------------------------------ argument types
def test_integer_scalar_eos_token_id(engine):
    """Every integer scalar is an eos_token_id, in generate, generate_text and infill alike."""
    kw = dict(max_new_tokens=64, max_denoising_steps=2, seed=5)
    want_text = engine.generate_text("hello", eos_token_id=1, **kw)
    want_ids = engine.generate([[2, 3, 4]], eos_token_id=1, **kw).sequences
    want_middle = engine.infill([2, 3], [4], max_middle_tokens=8, eos_token_id=1, max_denoising_steps=2)
    for eos in (np.int64(1), np.int32(1), np.array(1), np.array([1])):
        assert engine.generate_text("hello", eos_token_id=eos, **kw) == want_text
        np.testing.assert_array_equal(engine.generate([[2, 3, 4]], eos_token_id=eos, **kw).sequences, want_ids)
        assert engine.infill([2, 3], [4], max_middle_tokens=8, eos_token_id=eos, max_denoising_steps=2) == want_middle
    for bad in (np.array(1.0), np.bool_(True), "1", np.array(2**40)):
        with pytest.raises(ValueError, match="eos_token_id"):
            engine.generate_text("hello", eos_token_id=bad, **kw)
    with pytest.raises(ValueError, match="eos_token_id"):
        engine.infill([2, 3], [4], eos_token_id=10**6)


def test_wrong_argument_types_are_value_errors_naming_them(engine):
    with pytest.raises(ValueError, match="past_key_values"):
        engine.encode([[2, 3]], past_key_values="x")
    req = engine.submit([[2, 3, 4]], **GEN)
    for bad in ("x", [1], True, float("nan"), -1):
        with pytest.raises(ValueError, match="timeout"):
            req.wait(bad)
        with pytest.raises(ValueError, match="timeout"):
            req.result(timeout=bad)
    assert req.wait(np.float32(30.0)) and req.result(timeout=30).sequences.shape[0] == 1


def test_a_callback_error_is_raised_by_every_native_result(engine):
    """The native handle raises the callback's own exception as often as it is asked (pybind11's
    error_already_set.restore() refuses a second time: an internal error instead)."""
    def bad(draft):
        raise KeyError("from the callback")

    req = engine.submit([[2, 3]], max_new_tokens=64, max_denoising_steps=2, on_step=bad)
    native = req._native
    assert native.wait(60)
    for _ in range(3):
        with pytest.raises(KeyError, match="from the callback"):
            native.result()
    with pytest.raises(KeyError, match="from the callback"):
        req.result()


def test_0d_integer_arrays_are_integers(engine):
    """A 0-d integer array (what indexing or reducing a numpy array gives) is an integer argument, as in
    eos_token_id; a 0-d float array is not."""
    kw = dict(max_new_tokens=64, max_denoising_steps=2, seed=3, pad_token_id=0)
    want = engine.generate([[2, 3, 4]], **kw).sequences
    got = engine.generate([[2, 3, 4]], max_new_tokens=np.array(64), max_denoising_steps=np.array(2, np.int32),
                          seed=np.array(3, np.uint64), pad_token_id=np.array(0)).sequences
    np.testing.assert_array_equal(got, want)
    with pytest.raises(ValueError, match="pad_token_id"):
        engine.generate([[2, 3, 4]], **dict(kw, pad_token_id=np.array(0.0)))
