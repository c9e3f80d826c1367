"""Checkpoint loading (sharded, bf16, corrupt files), argument validation, reproducibility and KV pool accounting."""

from __future__ import annotations

import contextlib
import gc
import json
import os
import threading

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

import dgemma_rt  # noqa: E402  (a missing or broken engine must fail the run, not skip it)
from reference import (  # noqa: E402
    KeyedNoise,
    assert_logits_close,
    copy_checkpoint,
    edit_json,
    make_prompt,
    read_safetensors_raw,
    reference_logits,
    resave_safetensors,
    write_safetensors_raw,
)


def decoder_logits(engine, ckpt, seed=0):
    ids = make_prompt(seed, 2, 11, ckpt.vocab_size)
    canvas = np.random.default_rng(seed).integers(0, ckpt.vocab_size, size=(2, ckpt.canvas_length))
    return engine.denoise_logits(engine.encode(ids), canvas), (ids, canvas)


# ----------------------------------------------------------------------------------------------------------------
# well-formed checkpoints


def test_config_and_generation_defaults(engine_for, base_ckpt, deep_ckpt):
    for ckpt in (base_ckpt, deep_ckpt):
        engine = engine_for(ckpt)
        text = ckpt.model.config.text_config
        for key in ("vocab_size", "hidden_size", "num_hidden_layers", "sliding_window"):
            assert engine.config[key] == getattr(text, key), key
        assert list(engine.config["layer_types"]) == list(text.layer_types)
        assert engine.config["canvas_length"] == ckpt.canvas_length
        assert engine.generation_defaults["eos_token_id"] == [1]
        assert engine.generation_defaults["pad_token_id"] == 0
        assert engine.tokenizer is None


def test_generation_defaults_without_pad(engine_for, nopad_ckpt):
    assert engine_for(nopad_ckpt).generation_defaults["pad_token_id"] is None


def test_sharded_checkpoint_matches_single_file(engine_for, base_ckpt, sharded_ckpt):
    shards = [f for f in os.listdir(sharded_ckpt.path) if f.endswith(".safetensors")]
    assert len(shards) > 1
    got, (ids, canvas) = decoder_logits(engine_for(sharded_ckpt), sharded_ckpt)
    want, _ = decoder_logits(engine_for(base_ckpt), base_ckpt)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)
    assert_logits_close(got, *reference_logits(base_ckpt, ids, canvas), "sharded")


def test_rope_factor_only_scales_proportional_rope(tmp_path, base_ckpt):
    """transformers' default RoPE ignores `factor` (only the proportional one divides by it): the engine
    divided the sliding layers' frequencies by it too, and left parity without an error."""
    from transformers import AutoConfig

    path = copy_checkpoint(base_ckpt.path, str(tmp_path / "factor"))
    edit_json(os.path.join(path, "config.json"),
              lambda c: c["text_config"]["rope_parameters"]["sliding_attention"].update(factor=2.0))
    rope = AutoConfig.from_pretrained(path).text_config.rope_parameters["sliding_attention"]
    assert rope["rope_type"] == "default" and rope["factor"] == 2.0
    got, _ = decoder_logits(dgemma_rt.Engine(path, num_threads=2), base_ckpt)
    want, _ = decoder_logits(dgemma_rt.Engine(base_ckpt.path, num_threads=2), base_ckpt)
    np.testing.assert_array_equal(got, want)


def test_bf16_checkpoint(engine_for, base_ckpt, bf16_ckpt):
    # float32 arithmetic (the default multiplies BF16 weights with BF16 dot products: tests/test_cpu_bf16.py)
    got, (ids, canvas) = decoder_logits(engine_for(bf16_ckpt, cpu_weights="stored"), bf16_ckpt)
    assert_logits_close(got, *reference_logits(bf16_ckpt, ids, canvas), "bf16")
    # The fixture really is rounded: base's float32 weights give visibly different logits.
    base, _ = decoder_logits(engine_for(base_ckpt), base_ckpt)
    assert np.max(np.abs(got - base)) > 1e-3


def test_bf16_weights_as_stored_match_float32_mode(engine_for, bf16_ckpt):
    """The CPU backend reads BF16 matrices from the map and converts them per tile inside the GEMMs
    (cpu_weights="stored"); "float32" expands them at load. Same GEMM calls, same bits."""
    stored, _ = decoder_logits(engine_for(bf16_ckpt, cpu_weights="stored"), bf16_ckpt)
    expanded, _ = decoder_logits(engine_for(bf16_ckpt, cpu_weights="float32"), bf16_ckpt)
    np.testing.assert_array_equal(stored, expanded)
    kw = dict(max_new_tokens=2 * bf16_ckpt.canvas_length, max_denoising_steps=4, seed=3)
    a = engine_for(bf16_ckpt, cpu_weights="stored").generate([[5, 6, 7]], **kw).sequences
    b = engine_for(bf16_ckpt, cpu_weights="float32").generate([[5, 6, 7]], **kw).sequences
    np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="cpu_weights"):
        engine_for(bf16_ckpt, cpu_weights="bfloat16")


# ----------------------------------------------------------------------------------------------------------------
# corrupt checkpoints: CheckpointError naming what is wrong, never a crash

ST = "model.safetensors"
WEIGHT = "model.decoder.layers.1.mlp.up_proj.weight"
K_PROJ = "model.decoder.layers.2.self_attn.k_proj.weight"


def _rm(name):
    return lambda d: os.remove(os.path.join(d, name))


def _write(name, text):
    def apply(d):
        with open(os.path.join(d, name), "w") as f:
            f.write(text)

    return apply


def _raw(edit):
    """Edits (header, data) of model.safetensors; `edit` returns (header, data, header_len or None)."""

    def apply(d):
        header, data, header_len = edit(*read_safetensors_raw(os.path.join(d, ST)))
        write_safetensors_raw(os.path.join(d, ST), header, data, header_len=header_len)

    return apply


def _truncate(d):
    path = os.path.join(d, ST)
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(size - 1000)


def _header_too_long(header, data):
    blob_len = len(json.dumps(header).encode())
    return header, data, 8 + blob_len + len(data) + 100


def _header_not_json(d):
    path = os.path.join(d, ST)
    with open(path, "r+b") as f:
        n = int.from_bytes(f.read(8), "little")
        f.write(b"!" * n)


def _offsets_outside(header, data):
    begin, end = header[WEIGHT]["data_offsets"]
    header[WEIGHT]["data_offsets"] = [len(data) - 8, len(data) - 8 + (end - begin)]
    return header, data, None


def _overlap(header, data):
    names = sorted(k for k in header if k != "__metadata__")
    a, b = names[0], names[1]
    start = header[a]["data_offsets"][0] + 4  # b now starts inside a
    header[b]["data_offsets"] = [start, start + _nbytes(header[b])]
    return header, data, None


def _nbytes(info):
    return int(np.prod(info["shape"])) * {"F32": 4, "BF16": 2, "F16": 2}[info["dtype"]]


def _size_mismatch(header, data):
    header[WEIGHT]["dtype"] = "BF16"  # same offsets: the byte range is twice what shape x dtype says
    return header, data, None


def _resave(fn):
    return lambda d: resave_safetensors(os.path.join(d, ST), fn)


def _transpose_k_proj(t):
    t[K_PROJ] = t[K_PROJ].t()  # same element count, wrong shape


def _drop_weight(t):
    del t[WEIGHT]


def _int64_weight(t):
    import torch

    t[WEIGHT] = t[WEIGHT].to(torch.int64)


def _model_type(d):
    edit_json(os.path.join(d, "config.json"), lambda c: c.update(model_type="mamba_mix"))


def _empty_file(d):
    open(os.path.join(d, ST), "wb").close()


CORRUPT_SINGLE = {
    # name: (corruption, words of which the message must contain one)
    "missing_config": (_rm("config.json"), ["config.json"]),
    "config_not_json": (_write("config.json", '{"model_type": "diffusion_gemma", '), ["config.json"]),
    "unknown_model_type": (_model_type, ["mamba_mix"]),
    "missing_safetensors": (_rm(ST), ["safetensors"]),
    "empty_safetensors": (_empty_file, [ST]),
    "truncated": (_truncate, [ST]),
    "header_longer_than_file": (_raw(_header_too_long), [ST]),
    "header_not_json": (_header_not_json, [ST]),
    "offsets_outside_file": (_raw(_offsets_outside), [ST, WEIGHT]),
    "overlapping_tensors": (_raw(_overlap), [ST, "overlap"]),
    "byte_size_mismatch": (_raw(_size_mismatch), [ST, WEIGHT]),
    "wrong_shape": (_resave(_transpose_k_proj), [K_PROJ]),
    "missing_tensor": (_resave(_drop_weight), [WEIGHT]),
    "unsupported_dtype": (_resave(_int64_weight), [WEIGHT, "I64"]),
}


def _assert_checkpoint_error(path, words):
    assert issubclass(dgemma_rt.CheckpointError, ValueError)
    with pytest.raises(dgemma_rt.CheckpointError) as info:
        dgemma_rt.Engine(path)
    msg = str(info.value).lower()
    assert any(w.lower() in msg for w in words), f"message should name one of {words}: {info.value}"


@pytest.mark.parametrize("case", list(CORRUPT_SINGLE))
def test_corrupt_checkpoint(tmp_path, base_ckpt, case):
    corrupt, words = CORRUPT_SINGLE[case]
    path = copy_checkpoint(base_ckpt.path, str(tmp_path / "ckpt"))
    corrupt(path)
    _assert_checkpoint_error(path, words)


def test_config_errors_name_the_checkpoint(tmp_path, base_ckpt):
    """An error about config.json / generation_config.json contents gives the whole path (it said only
    "config.json: ...", which names no checkpoint when a server or a script loads several)."""
    path = copy_checkpoint(base_ckpt.path, str(tmp_path / "ckpt"))
    _model_type(path)
    with pytest.raises(dgemma_rt.CheckpointError) as info:
        dgemma_rt.Engine(path)
    assert str(info.value).startswith(os.path.join(path, "config.json") + ": model_type is 'mamba_mix'"), info.value
    path = copy_checkpoint(base_ckpt.path, str(tmp_path / "ckpt2"))
    edit_json(os.path.join(path, "config.json"), lambda c: c["text_config"].update(hidden_size="x"))
    with pytest.raises(dgemma_rt.CheckpointError) as info:
        dgemma_rt.Engine(path)
    assert str(info.value).startswith(os.path.join(path, "config.json") + " text_config: 'hidden_size'"), info.value
    path = copy_checkpoint(base_ckpt.path, str(tmp_path / "ckpt3"))
    with open(os.path.join(path, "generation_config.json"), "w") as f:
        json.dump({"eos_token_id": -5}, f)
    with pytest.raises(dgemma_rt.CheckpointError) as info:
        dgemma_rt.Engine(path)
    assert str(info.value).startswith(os.path.join(path, "generation_config.json") + ": 'eos_token_id'"), info.value
    path = copy_checkpoint(base_ckpt.path, str(tmp_path / "ckpt4"))  # checked outside the config parser
    def huge(c):
        c["text_config"].update(vocab_size=2**24, max_position_embeddings=2**20)
        c["canvas_length"] = 2**16

    edit_json(os.path.join(path, "config.json"), huge)
    with pytest.raises(dgemma_rt.CheckpointError) as info:
        dgemma_rt.Engine(path)
    assert str(info.value).startswith(os.path.join(path, "config.json") + " asks for more memory"), info.value


def _shard_names(d):
    with open(os.path.join(d, "model.safetensors.index.json")) as f:
        return sorted(set(json.load(f)["weight_map"].values()))


def _remove_a_shard(d):
    os.remove(os.path.join(d, _shard_names(d)[1]))


def _index_names_unknown_shard(d):
    def edit(index):
        index["weight_map"][WEIGHT] = "model-00042-of-00099.safetensors"

    edit_json(os.path.join(d, "model.safetensors.index.json"), edit)


CORRUPT_SHARDED = {
    "missing_shard": (_remove_a_shard, None),
    "index_names_unknown_shard": (_index_names_unknown_shard, ["model-00042-of-00099.safetensors"]),
    "index_not_json": (_write("model.safetensors.index.json", "{\"weight_map\": "), ["index"]),
}


@pytest.mark.parametrize("case", list(CORRUPT_SHARDED))
def test_corrupt_sharded_checkpoint(tmp_path, sharded_ckpt, case):
    corrupt, words = CORRUPT_SHARDED[case]
    path = copy_checkpoint(sharded_ckpt.path, str(tmp_path / "ckpt"))
    if words is None:
        words = [_shard_names(path)[1]]
    corrupt(path)
    _assert_checkpoint_error(path, words)


# ----------------------------------------------------------------------------------------------------------------
# bad generate arguments: ValueError, and nothing leaks from the KV pool


@pytest.fixture
def guarded_engine(engine_for, base_ckpt):
    """An engine of its own whose KV pool must be full again after each test."""
    engine = engine_for(base_ckpt, max_batch_size=4)
    gc.collect()
    before = engine.kv_pool_stats()
    assert before["full_free"] == before["full_total"] and before["sliding_free"] == before["sliding_total"]
    yield engine
    gc.collect()
    assert engine.kv_pool_stats() == before


GOOD = [[10, 11, 12, 13]]

BAD_ARGUMENTS = {
    "negative_id": ([[10, -1, 12]], {}),
    "id_equal_to_vocab": ([[10, 512, 12]], {}),
    "id_in_second_row": ([[10, 11], [12, 100000]], {}),
    "empty_prompt": ([[]], {}),
    "empty_row": ([[10, 11], []], {}),
    "empty_batch": ([], {}),
    "three_dim_array": (np.full((1, 2, 3), 10, dtype=np.int64), {}),
    "max_new_tokens_zero": (GOOD, dict(max_new_tokens=0)),
    "max_new_tokens_negative": (GOOD, dict(max_new_tokens=-16)),
    "max_denoising_steps_zero": (GOOD, dict(max_denoising_steps=0)),
    "t_min_negative": (GOOD, dict(t_min=-0.1)),
    "t_max_equal_t_min": (GOOD, dict(t_min=0.5, t_max=0.5)),
    "t_max_below_t_min": (GOOD, dict(t_min=0.6, t_max=0.5)),
    # float32 temperatures: 1e39 became inf (logits / inf = 0: an all-pad answer), and a last step at
    # 1e-37 overflowed logits / T
    "t_max_past_float32": (GOOD, dict(t_max=1e39)),
    "last_temperature_overflows_logits": (GOOD, dict(t_min=0.0, t_max=4e-37)),
    "first_temperature_overflows_float32": (GOOD, dict(t_min=1.1064783119657174e38, t_max=3.4028234663852886e38)),
    "entropy_bound_zero": (GOOD, dict(entropy_bound=0.0)),
    "entropy_bound_negative": (GOOD, dict(entropy_bound=-1.0)),
    "confidence_threshold_zero": (GOOD, dict(confidence_threshold=0.0)),
    "stability_threshold_negative": (GOOD, dict(stability_threshold=-1)),
    "max_new_tokens_past_max_positions": (GOOD, dict(max_new_tokens=2**31 - 1)),
    "max_new_tokens_not_an_int": (GOOD, dict(max_new_tokens=1.5)),
}


@pytest.mark.parametrize("case", list(BAD_ARGUMENTS))
def test_bad_arguments(guarded_engine, case):
    ids, kwargs = BAD_ARGUMENTS[case]
    kwargs = dict(kwargs)
    with pytest.raises(ValueError):
        guarded_engine.generate(ids, max_denoising_steps=kwargs.pop("max_denoising_steps", 4), **kwargs)


def test_encode_takes_at_most_1024_rows(guarded_engine):
    """encode runs all of a cache's rows in one pass (so does denoise_logits on it): past 1024 (the attention
    grids end at 65535) a ValueError, not a CUDA launch error."""
    with pytest.raises(ValueError, match="1025 rows: one call takes 1 to 1024 rows"):
        guarded_engine.encode([[10, 11]] * 1025)


def test_cache_of_another_engine_is_refused(guarded_engine, base_ckpt):
    import dgemma_rt

    other = dgemma_rt.Engine(base_ckpt.path)
    cache = other.encode(GOOD)
    with pytest.raises(ValueError, match="another Engine"):
        guarded_engine.generate(GOOD, past_key_values=cache, max_new_tokens=4, max_denoising_steps=2)
    with pytest.raises(ValueError, match="another Engine"):
        guarded_engine.denoise_logits(cache, np.zeros((1, 4), dtype=np.int64))


def test_image_token_in_prompt(engine_for, image_ckpt):
    engine = engine_for(image_ckpt)
    with pytest.raises(ValueError):
        engine.generate([[10, 7, 12]], max_new_tokens=16, max_denoising_steps=2)
    out = engine.generate([[10, 8, 12]], max_new_tokens=16, max_denoising_steps=2)
    assert np.asarray(out.sequences).shape == (1, 3 + image_ckpt.canvas_length)
    # Nor through a template's locked positions (infill's suffix): a locked canvas is encoded into the cache.
    L = image_ckpt.canvas_length
    with pytest.raises(ValueError, match="canvas_template row 0 position 2 holds the image token 7"):
        engine.generate([[10, 8, 12]], max_new_tokens=2 * L, max_denoising_steps=2, canvas_template=[[-1, -1, 7]])
    with pytest.raises(ValueError, match="image token 7"):
        engine.infill([10, 8], [9, 7], max_middle_tokens=4, max_denoising_steps=2)


class BadNoise(KeyedNoise):
    """KeyedNoise with one kind of output spoiled."""

    def __init__(self, kind, spoil, vocab_size=512):
        super().__init__(0, vocab_size)
        self.kind, self.spoil = kind, spoil

    def __call__(self, kind, shape):
        values = super().__call__(kind, shape)
        return self.spoil(values) if kind == self.kind else values


BAD_NOISE = {
    "canvas_wide": ("canvas", lambda v: np.zeros((v.shape[0], v.shape[1] + 1), np.int64)),
    "canvas_1d": ("canvas", lambda v: v.reshape(-1)),
    "canvas_id_equal_to_vocab": ("canvas", lambda v: np.full_like(v, 512)),
    "canvas_id_negative": ("canvas", lambda v: np.full_like(v, -3)),
    "uniform_short": ("uniform", lambda v: v[:, :-1]),
    "uniform_above_one": ("uniform", lambda v: v + 1.5),
    "uniform_negative": ("uniform", lambda v: v - 2.0),
}


@pytest.mark.parametrize("case", list(BAD_NOISE))
def test_bad_noise(guarded_engine, case):
    kind, spoil = BAD_NOISE[case]
    with pytest.raises(ValueError):
        guarded_engine.generate([[10, 11, 12], [13, 14, 15]], max_new_tokens=32, max_denoising_steps=3,
                                noise=BadNoise(kind, spoil))


def test_kv_pool_too_small(base_ckpt):
    engine = dgemma_rt.Engine(base_ckpt.path, kv_cache_tokens=64)
    with pytest.raises(RuntimeError, match="kv_cache_tokens"):
        engine.generate(make_prompt(1, 2, 300, base_ckpt.vocab_size), max_new_tokens=16, max_denoising_steps=2)
    gc.collect()
    stats = engine.kv_pool_stats()
    assert stats["full_free"] == stats["full_total"]
    out = engine.generate([[10, 11, 12]], max_new_tokens=16, max_denoising_steps=2)  # still usable
    assert np.asarray(out.sequences).shape == (1, 3 + base_ckpt.canvas_length)


# ----------------------------------------------------------------------------------------------------------------
# reproducibility, callbacks, KV pool


SMALL = dict(max_new_tokens=32, max_denoising_steps=6)


def _same(a, b):
    np.testing.assert_array_equal(np.asarray(a.sequences), np.asarray(b.sequences))
    np.testing.assert_array_equal(a.tokens_per_forward, b.tokens_per_forward)
    assert a.steps_per_canvas == b.steps_per_canvas


def test_seeded_generation_is_reproducible(engine_for, base_ckpt):
    engine = engine_for(base_ckpt)
    ids = make_prompt(3, 2, 6, base_ckpt.vocab_size)
    first = engine.generate(ids, seed=5, **SMALL)
    _same(first, engine.generate(ids, seed=5, **SMALL))

    result = {}

    def work():
        try:
            result["out"] = engine.generate(ids, seed=5, **SMALL)
        except BaseException as e:  # surfaced below
            result["error"] = e

    worker = threading.Thread(target=work)
    worker.start()
    worker.join()
    assert "error" not in result, result.get("error")
    _same(first, result["out"])

    other = engine.generate(ids, seed=6, **SMALL)
    assert not np.array_equal(np.asarray(first.sequences), np.asarray(other.sequences))


def test_output_types(engine_for, base_ckpt):
    out = engine_for(base_ckpt).generate(make_prompt(4, 2, 5, base_ckpt.vocab_size), seed=1, **SMALL)
    assert isinstance(out.sequences, np.ndarray) and out.sequences.dtype == np.int64
    assert out.sequences.shape == (2, 5 + 32)
    assert out.tokens_per_forward.dtype == np.float64 and out.tokens_per_forward.shape == (2,)
    assert len(out.steps_per_canvas) == 2 and all(len(r) >= 1 for r in out.steps_per_canvas)
    for key in ("prefill_s", "denoise_s", "total_s", "decoder_forwards", "encoder_forwards"):
        assert key in out.timings, key
    assert out.timings["decoder_forwards"] >= max(sum(r) for r in out.steps_per_canvas)
    assert out.past_key_values.batch_size == 2
    assert list(out.past_key_values.seq_lengths) == [5 + 16, 5 + 16]


def test_kv_pool_returns_to_full(guarded_engine, base_ckpt):
    engine = guarded_engine
    full = engine.kv_pool_stats()
    assert full["block_size"] > 0
    out = engine.generate(make_prompt(5, 2, 20, base_ckpt.vocab_size), seed=2, **SMALL)
    held = engine.kv_pool_stats()
    assert held["full_free"] < held["full_total"]
    del out
    gc.collect()
    assert engine.kv_pool_stats() == full

    state = engine.encode(make_prompt(6, 3, 9, base_ckpt.vocab_size))
    assert engine.kv_pool_stats()["full_free"] < full["full_total"]
    del state
    gc.collect()
    assert engine.kv_pool_stats() == full


class Boom(Exception):
    pass


def _free(engine):
    s = engine.kv_pool_stats()
    return s["full_free"] == s["full_total"] and s["sliding_free"] == s["sliding_total"]


def test_kv_pool_stats_show_reservations(guarded_engine, base_ckpt):
    """An admitted request reserves the blocks it can need: still in the free counts, and now shown apart."""
    engine = guarded_engine
    seen = []
    engine.generate(make_prompt(5, 1, 5, base_ckpt.vocab_size), on_step=lambda a: seen.append(engine.kv_pool_stats()),
                    max_new_tokens=3 * base_ckpt.canvas_length, max_denoising_steps=2)
    assert seen and seen[0]["full_reserved"] > 0, seen[0]
    assert all(s["full_reserved"] <= s["full_free"] and s["sliding_reserved"] <= s["sliding_free"] for s in seen)
    after = engine.kv_pool_stats()
    assert after["full_reserved"] == after["sliding_reserved"] == 0, after


@contextlib.contextmanager
def _gc_off():
    """No automatic collection: what is freed is freed by reference counting (or an explicit gc.collect())."""
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


@pytest.mark.parametrize("refers_back", [False, True])
def test_failed_request_dropped_unread_gives_its_blocks_back(guarded_engine, base_ckpt, refers_back):
    """A request whose callback raised, dropped without result(): the native request keeps the exception,
    whose traceback refers back to the Request. It held its KV blocks forever (127 such requests filled the
    tiny model's pool). Now there is no cycle unless the callback itself refers to the request, and the
    garbage collector sees the one through native code when it does."""
    engine = guarded_engine
    ids = make_prompt(3, 1, 5, base_ckpt.vocab_size)
    with _gc_off():
        for _ in range(3):
            holder = {}

            def hook(array, holder=holder):
                if refers_back:
                    holder["req"].cancel  # the callback's frame refers to the request, as user code may
                raise Boom("unread")

            req = engine.submit(ids, on_step=hook, **SMALL)
            holder["req"] = req if refers_back else None
            assert req.wait(60)
            del req, holder, hook
            if not refers_back:
                assert _free(engine)  # no cycle: freed on the spot
        if refers_back:
            assert not _free(engine)
            gc.collect()
            assert _free(engine)


def test_failed_request_on_a_past_cache_lets_go_of_it(guarded_engine, base_ckpt):
    """result() keeps the request's error and re-raises it, which puts its own frame into the traceback: a
    pure Python cycle that lived until the garbage collector ran, with the past_key_values passed in."""
    engine = guarded_engine
    ids = make_prompt(4, 1, 5, base_ckpt.vocab_size)
    with _gc_off():
        for _ in range(3):
            past = engine.encode(ids)
            req = engine.submit(ids, past_key_values=past, on_step=lambda a: (_ for _ in ()).throw(Boom("x")),
                                **SMALL)
            with pytest.raises(Boom):
                req.result()
            del req, past
            assert _free(engine)


@pytest.mark.parametrize("callback", ["on_step", "on_block"])
def test_exception_in_callback(guarded_engine, base_ckpt, callback):
    engine = guarded_engine
    ids = make_prompt(7, 2, 6, base_ckpt.vocab_size)
    clean = engine.generate(ids, seed=9, **SMALL)
    calls = []

    def hook(array):
        calls.append(array)
        if len(calls) == 2:
            raise Boom("from the callback")

    with pytest.raises(Boom):
        engine.generate(ids, seed=9, **{callback: hook}, **SMALL)
    assert len(calls) == 2
    # The engine is left usable and unchanged: the same request gives what the clean run gave.
    _same(clean, engine.generate(ids, seed=9, **SMALL))
    del clean
