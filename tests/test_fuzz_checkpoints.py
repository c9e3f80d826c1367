"""Fuzzing the checkpoint loader as an attacker would: hundreds of corrupted checkpoints, each loaded in a
child process with a timeout and a memory cap (checkpoint_fuzz.Runner). Every case must end in
CheckpointError or load a checkpoint that is actually valid (and then generate); none may crash, hang or
exceed the cap.

Which safetensors files are valid is decided independently of the engine (checkpoint_fuzz.header_is_valid,
the format's rules in Python); config cases say what they expect. Deterministic: fixed seeds.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import struct
from typing import Any, Callable

import pytest

from checkpoint_fuzz import (
    MEMORY_CAP_BYTES,
    Runner,
    header_is_valid,
    read_raw,
    write_raw,
    write_small_checkpoint,
)

SEED = 20240611
ST = "model.safetensors"
GEN = {"max_new_tokens": 1, "max_denoising_steps": 1}
QUANT_STRIDE = 6  # every 6th case also runs with load-time quantization


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> tuple[str, dict[str, Any]]:
    path = str(tmp_path_factory.mktemp("fuzz") / "base")
    return path, write_small_checkpoint(path)


@pytest.fixture(scope="module")
def runner():
    r = Runner()
    yield r
    r.close()


class Case:
    """`says`: for an expected error, a part of its message, so that a case cannot pass by failing elsewhere."""

    def __init__(self, name: str, build: Callable[[str], None], expect: str, generate: bool = True, says: str = ""):
        self.name, self.build, self.expect, self.generate, self.says = name, build, expect, generate, says


def _file_is_valid(path: str, required: dict[str, Any]) -> bool:
    """The format's verdict on a (possibly corrupted) model.safetensors."""
    if not os.path.isfile(path):
        return False
    with open(path, "rb") as f:
        blob = f.read()
    if len(blob) < 8:
        return False
    n = struct.unpack("<Q", blob[:8])[0]
    if n > len(blob) - 8 or n > 100 << 20:
        return False
    return header_is_valid(blob[8 : 8 + n], len(blob) - 8 - n, required)


def _run_cases(runner: Runner, root: str, base_dir: str, required: dict[str, Any], cases: list[Case],
               kwargs: dict[str, Any] | None = None) -> None:
    failures, outcomes = [], {}
    for i, case in enumerate(cases):
        d = os.path.join(root, f"{i:04d}")
        shutil.copytree(base_dir, d, symlinks=True)
        case.build(d)
        expect = case.expect
        if expect == "oracle":
            expect = "load" if _file_is_valid(os.path.join(d, ST), required) else "error"
        res = runner.load(d, kwargs=kwargs, generate=GEN if case.generate and expect == "load" else None)
        got = res["outcome"]
        outcomes[got] = outcomes.get(got, 0) + 1
        ok = (got == "checkpoint_error" and expect == "error" and case.says in res["message"]) or (
            got == "loaded" and expect == "load")
        # A valid file whose weights hold NaN or Inf (bytes shifted under the header) loads as it is, but
        # cannot be quantized: with load-time quantization that is a CheckpointError saying so.
        quantizing = bool(kwargs) and ("quant" in kwargs or "dense_quant" in kwargs)
        ok |= quantizing and expect == "load" and got == "checkpoint_error" and "cannot be quantized" in res["message"]
        if not ok or res.get("maxrss", 0) > MEMORY_CAP_BYTES:
            failures.append(f"{case.name}: expected {expect}, got {got} ({res.get('type', '')}: {res['message'][:300]}; "
                            f"maxrss {res.get('maxrss', 0) >> 20} MB)")
        shutil.rmtree(d, ignore_errors=True)
    print(f"{len(cases)} cases: {outcomes}")
    assert not failures, f"{len(failures)} of {len(cases)} cases failed:\n" + "\n".join(failures[:60])


# ------------------------------------------------------------------------------------------------ safetensors
def _edit_raw(fn: Callable[[bytes], bytes]) -> Callable[[str], None]:
    def build(d: str) -> None:
        p = os.path.join(d, ST)
        with open(p, "rb") as f:
            blob = f.read()
        os.remove(p)  # copied files could be hard links one day: never write through them
        with open(p, "wb") as f:
            f.write(fn(blob))

    return build


def _flip(positions: list[int], values: list[int]) -> Callable[[bytes], bytes]:
    def fn(blob: bytes) -> bytes:
        b = bytearray(blob)
        for p, v in zip(positions, values):
            b[p] = v
        return bytes(b)

    return fn


def _edit_header(fn: Callable[[dict], Any]) -> Callable[[str], None]:
    """fn edits the parsed header in place, or returns raw header bytes to write instead."""

    def build(d: str) -> None:
        p = os.path.join(d, ST)
        header, data = read_raw(p)
        h = json.loads(header)
        raw = fn(h)
        os.remove(p)
        write_raw(p, raw if isinstance(raw, bytes) else json.dumps(h).encode(), data)

    return build


def _deep(depth: int, leaf: str = "1") -> str:
    return "[" * depth + leaf + "]" * depth


def safetensors_cases(base_dir: str, required: dict[str, Any]) -> list[Case]:
    rng = random.Random(SEED)
    header, data = read_raw(os.path.join(base_dir, ST))
    hl, total = len(header), 8 + len(header) + len(data)
    names = sorted(required)
    a, b = names[3], names[7]  # two tensors to damage
    cases: list[Case] = []

    for cut in sorted({0, 1, 7, 8, 9, 8 + hl // 2, 8 + hl - 1, 8 + hl, 8 + hl + 1, 8 + hl + len(data) // 2,
                       total - 4, total - 1}):
        cases.append(Case(f"truncated to {cut} bytes", _edit_raw(lambda blob, c=cut: blob[:c]), "oracle"))
    for n in [0, 1, 2, hl - 8, hl - 1, hl + 1, hl + 8, total - 8, total - 7, 2**32 + hl, 2**63, 2**64 - 1,
              (100 << 20) + 1]:
        cases.append(Case(f"header length {n}",
                          _edit_raw(lambda blob, n=n: struct.pack("<Q", n % 2**64) + blob[8:]), "oracle"))
    for k in range(400):  # single byte changes anywhere in the length field or the header
        pos = rng.randrange(0, 8 + hl)
        cases.append(Case(f"header byte {pos} flip #{k}", _edit_raw(_flip([pos], [rng.randrange(256)])), "oracle"))
    for k in range(100):  # a few bytes at once
        pos = [rng.randrange(8, 8 + hl) for _ in range(rng.randrange(2, 6))]
        cases.append(Case(f"header bytes {pos} #{k}", _edit_raw(_flip(pos, [rng.randrange(256) for _ in pos])), "oracle"))
    for k in range(8):  # the data section: any bytes are valid weights
        pos = rng.randrange(8 + hl, total)
        cases.append(Case(f"data byte {pos}", _edit_raw(_flip([pos], [rng.randrange(256)])), "load"))

    def set_field(name: str, key: str, value: Any) -> Callable[[dict], None]:
        return lambda h: h[name].__setitem__(key, value)

    begin, end = json.loads(header)[a]["data_offsets"]
    b_begin, b_end = json.loads(header)[b]["data_offsets"]
    edits: dict[str, Callable[[dict], Any]] = {}
    for v in ["F16", "BF16", "I64", "f32", "", 5, None, True, ["F32"], "F32\u0000", "X" * 100000]:
        edits[f"dtype {str(v)[:20]!r}"] = set_field(a, "dtype", v)
    shape = json.loads(header)[a]["shape"]
    for v in [shape + [1], [1] + shape, [-1] + shape[1:], [float(shape[0])] + shape[1:], [True] + shape[1:],
              [2**62, 2**62], [2**64], [2**70, 0], [], [0] * 17, str(shape), None, {"0": 1}]:
        edits[f"shape {str(v)[:30]}"] = set_field(a, "shape", v)
    for v in [[end, begin], [-8, end], [float(begin), end], [begin], [begin, end, end], [begin, len(data) + 8],
              [str(begin), str(end)], [begin + 4, end + 4], [b_begin + 4, b_begin + 4 + (end - begin)],
              [2**64, 2**64 + (end - begin)], [True, end], None, "0-8"]:
        edits[f"data_offsets {str(v)[:30]}"] = set_field(a, "data_offsets", v)
    edits["entry is a string"] = lambda h: h.__setitem__(a, "F32")
    edits["entry without data_offsets"] = lambda h: h[a].pop("data_offsets")
    edits["entry with an extra key"] = set_field(a, "extra", {"x": [1, 2]})
    edits["required tensor renamed"] = lambda h: h.__setitem__(a + ".renamed", h.pop(a))
    edits["required tensor dropped"] = lambda h: h.pop(a)
    edits["extra tensor (ignored)"] = lambda h: h.__setitem__("unused.weight", dict(h[a]))
    edits["extra tensor, bad dtype"] = lambda h: h.__setitem__("unused.weight", {**h[a], "dtype": "Q4"})
    edits["metadata 1 MB string"] = lambda h: h.__setitem__("__metadata__", {"format": "pt", "x": "y" * (1 << 20)})
    edits["metadata not an object"] = lambda h: h.__setitem__("__metadata__", [1, 2, 3])
    edits["top level is an array"] = lambda h: json.dumps(list(h.items())).encode()
    edits["top level is a number"] = lambda h: b"12345678"
    edits["NaN offset"] = lambda h: json.dumps(h).replace(json.dumps(h[a]["data_offsets"]), f"[NaN, {end}]").encode()
    edits["tensor named twice"] = lambda h: ("{" + json.dumps(a) + ":" + json.dumps(h[a]) + ","
                                             + json.dumps(h)[1:]).encode()
    edits["tensor named twice, other offsets"] = lambda h: ("{" + json.dumps(a) + ":" + json.dumps(h[b]) + ","
                                                            + json.dumps(h)[1:]).encode()
    edits["a field of a tensor named twice"] = lambda h: json.dumps(h).replace(
        json.dumps(a) + ": {", json.dumps(a) + ': {"dtype": "BF16", ', 1).encode()
    # An empty tensor sorts between two that overlap: it hid the overlap from a check of neighbours.
    edits["overlap hidden by an empty tensor"] = lambda h: (
        h[a].__setitem__("data_offsets", [b_begin + 4, b_begin + 4 + (end - begin)]),
        h.__setitem__("zz.empty", {"dtype": "F32", "shape": [0], "data_offsets": [b_begin + 8, b_begin + 8]}))[-1]
    edits["empty tensor of a huge shape (fine)"] = lambda h: h.__setitem__(
        "unused.empty", {"dtype": "F32", "shape": [2**63 - 1, 0], "data_offsets": [0, 0]})
    edits["NUL and garbage after the JSON"] = lambda h: json.dumps(h).encode() + b"\x00{garbage"
    edits["metadata nested 70000 deep"] = lambda h: ('{"__metadata__": ' + _deep(70000) + "," + json.dumps(h)[1:]).encode()
    edits["entry nested 300000 deep"] = lambda h: ('{"junk": ' + _deep(300000) + "," + json.dumps(h)[1:]).encode()
    edits["metadata nested 50 deep (fine)"] = lambda h: ('{"__metadata__": {"x": ' + _deep(50) + "}," + json.dumps(h)[1:]).encode()
    edits["name not UTF-8"] = lambda h: json.dumps(h).encode().replace(a.encode(), a.encode()[:-3] + b"\xff\xfe\x80")
    edits["name with a lone surrogate"] = lambda h: json.dumps(h).replace(json.dumps(a), json.dumps(a[:-2] + "\ud800")).encode()
    edits["name with NUL"] = lambda h: h.__setitem__(a + "\u0000", h.pop(a))
    for name, fn in edits.items():
        cases.append(Case(f"header: {name}", _edit_header(fn), "oracle"))
    return cases


# ------------------------------------------------------------------------------------------------ JSON files
def _edit_json(file: str, fn: Callable[[dict], Any]) -> Callable[[str], None]:
    """fn edits the parsed JSON in place, or returns the text to write instead."""

    def build(d: str) -> None:
        p = os.path.join(d, file)
        with open(p) as f:
            obj = json.load(f)
        text = fn(obj)
        os.remove(p)
        with open(p, "w") as f:
            f.write(text if isinstance(text, str) else json.dumps(obj, indent=1))

    return build


def _set(path: str, value: Any) -> Callable[[dict], None]:
    def fn(obj: dict) -> None:
        *parents, key = path.split(".")
        for p in parents:
            obj = obj[p]
        if value is _DELETE:
            obj.pop(key, None)
        else:
            obj[key] = value

    return fn


_DELETE = object()


def _replace_file(file: str, how: str) -> Callable[[str], None]:
    def build(d: str) -> None:
        p = os.path.join(d, file)
        if os.path.lexists(p):
            os.remove(p)
        if how == "fifo":
            os.mkfifo(p)
        elif how == "dir":
            os.mkdir(p)
        elif how == "loop":
            os.symlink(os.path.basename(p), p)
        elif how == "dangling":
            os.symlink("nowhere.json", p)
        elif how == "device":
            os.symlink("/dev/zero", p)
        elif how == "empty":
            open(p, "w").close()
        elif how == "huge":
            with open(p, "wb") as f:
                f.truncate(17 << 20)  # sparse: 17 MB of NULs, over the 16 MB a JSON file may have
        elif how == "binary":
            with open(p, "wb") as f:
                f.write(bytes(range(256)) * 4)
        elif how != "missing":
            raise ValueError(how)

    return build


INT_FIELDS = {  # text_config key: required? (head_dim is optional, but its default, 256, does not fit these weights)
    "vocab_size": True, "hidden_size": True, "intermediate_size": True, "num_hidden_layers": True,
    "num_attention_heads": True, "num_key_value_heads": True, "head_dim": True, "num_experts": True,
    "top_k_experts": True, "moe_intermediate_size": True, "sliding_window": False, "max_position_embeddings": False,
}


def config_cases(base_dir: str) -> list[Case]:
    with open(os.path.join(base_dir, "config.json")) as f:
        cfg = json.load(f)
    tc = cfg["text_config"]
    cases: list[Case] = []

    def add(name: str, fn: Callable[[dict], Any], expect: str, file: str = "config.json", generate: bool = True,
            says: str = ""):
        cases.append(Case(f"{file}: {name}", _edit_json(file, fn), expect, generate, says))

    for key, required in INT_FIELDS.items():
        v = tc[key]
        for bad in [2**31, 2**32 + v, 2**63, 2**64, -1, 0, -(10**18), 10**30, v + 0.5, float(v), True, False, str(v),
                    [v], {"v": v}]:
            add(f"{key}={str(bad)[:24]}", _set(f"text_config.{key}", bad), "error")
        add(f"{key}=null", _set(f"text_config.{key}", None), "error" if required else "load")
        add(f"{key} absent", _set(f"text_config.{key}", _DELETE), "error" if required else "load")
    for bad in [2**31, 0, -1, 8.0, True, "8", 1024]:  # 1024 > max_position_embeddings
        add(f"canvas_length={bad}", _set("canvas_length", bad), "error")
    add("canvas_length=4", _set("canvas_length", 4), "load")
    # Config values that drive memory: refused, or (within the cap) loaded without touching it.
    add("num_hidden_layers=10**7 without layer_types",
        lambda c: (c["text_config"].pop("layer_types"), c["text_config"].update(num_hidden_layers=10**7)), "error")
    add("head_dim=10**9", _set("text_config.head_dim", 10**9), "error")
    add("sliding_window=10**6", _set("text_config.sliding_window", 10**6), "error")
    add("sliding_window=2**24 in 2**24 positions",
        lambda c: c["text_config"].update(sliding_window=2**24, max_position_embeddings=2**24), "error")
    add("sliding_window=2**22 in 2**24 positions (fits the cap, untouched)",
        lambda c: c["text_config"].update(sliding_window=2**22, max_position_embeddings=2**24), "load")
    add("canvas_length=65536", lambda c: (c.update(canvas_length=65536),
                                          c["text_config"].update(max_position_embeddings=2**17)), "load", generate=False)
    add("sliding_window=1", _set("text_config.sliding_window", 1), "error")
    add("sliding_window=2", _set("text_config.sliding_window", 2), "load")
    add("sliding_window=256", _set("text_config.sliding_window", 256), "load")
    add("max_position_embeddings=2**24", _set("text_config.max_position_embeddings", 2**24), "load")
    # Floats: finite and in range.
    for key, bads, goods in [
        ("text_config.rms_norm_eps", [-1e-6, 0, 2, "1e-6", True], [1e-5, None]),
        # null would be no softcap; transformers always applies it
        ("text_config.final_logit_softcapping", [0, -30.0, "30", True, 1e309, None], [50.0, 30]),
        ("text_config.rope_parameters.sliding_attention.rope_theta", [0, -1.0, "1e4", True, None], [500.0, 10000]),
        ("text_config.rope_parameters.full_attention.rope_theta", [0.0, -5, [1e6], None], [1e5]),
        ("text_config.rope_parameters.full_attention.partial_rotary_factor", [-0.1, 1.5, "0.25"], [0.5, 1]),
        ("text_config.rope_parameters.sliding_attention.partial_rotary_factor", [0.5], [1.0]),
        ("text_config.rope_parameters.full_attention.factor", [0, -1.0], [2.0]),
    ]:
        for v in bads:
            add(f"{key}={str(v)[:20]}", _set(key, v), "error")
        for v in goods:
            add(f"{key}={v}", _set(key, v), "load")
    add("rms_norm_eps=1e400 (inf)", lambda c: json.dumps(c).replace('"rms_norm_eps": 1e-06', '"rms_norm_eps": 1e400'), "error")
    # Types and values elsewhere.
    for name, fn in {
        "model_type mamba": _set("model_type", "mamba"),
        "model_type absent": _set("model_type", _DELETE),
        "model_type 5": _set("model_type", 5),
        "text_config absent": _set("text_config", _DELETE),
        "text_config a list": _set("text_config", [1, 2]),
        "text_config a string": _set("text_config", "x" * 1000),
        "layer_types too short": _set("text_config.layer_types", ["full_attention"]),
        "layer_types unknown kind": _set("text_config.layer_types", ["sliding_attention", "chunked_attention"]),
        "layer_types not strings": _set("text_config.layer_types", [1, 2]),
        "layer_types a string": _set("text_config.layer_types", "full_attention"),
        "per_layer_config index past the layers": _set("text_config.per_layer_config", {"7": {"head_dim": 16}}),
        "per_layer_config head_dim 2**40": _set("text_config.per_layer_config", {"1": {"head_dim": 2**40}}),
        "per_layer_config head_dim odd": _set("text_config.per_layer_config", {"1": {"head_dim": 15}}),
        "per_layer_config kv heads true": _set("text_config.per_layer_config", {"1": {"num_key_value_heads": True}}),
        "per_layer_config entry a list": _set("text_config.per_layer_config", {"1": [16]}),
        "tie_word_embeddings 'yes'": _set("tie_word_embeddings", "yes"),
        "tie_word_embeddings false (untied encoder)": _set("tie_word_embeddings", False),
        "hidden_activation relu": _set("text_config.hidden_activation", "relu"),
        "attention_bias true": _set("text_config.attention_bias", True),
        "use_bidirectional_attention all": _set("text_config.use_bidirectional_attention", "all"),
        "image_token_id -5": _set("image_token_id", -5),
        "image_token_id 2**31": _set("image_token_id", 2**31),
        "rope_parameters entry a list": _set("text_config.rope_parameters.full_attention", [1]),
        # Not keyed by layer type (transformers refuses both; they were read as no rope_parameters at all)
        "rope_parameters flat": _set("text_config.rope_parameters", {"rope_type": "default", "rope_theta": 5000.0}),
        "rope_parameters a string": _set("text_config.rope_parameters", "junk"),
        "per_layer_config a list": _set("text_config.per_layer_config", [{"head_dim": 16}]),
        "config key written twice": lambda c: json.dumps(c).replace('"head_dim": 8', '"head_dim": 8, "head_dim": 16', 1),
        "NUL then garbage": lambda c: json.dumps(c) + "\u0000 x",
        "rope_type yarn": _set("text_config.rope_parameters.sliding_attention.rope_type", "yarn"),
        "top_k_experts > num_experts": _set("text_config.top_k_experts", 5),
        "kv heads not dividing heads": _set("text_config.num_attention_heads", 3),
        "top level a list": lambda c: "[1, 2, 3]",
        "not JSON": lambda c: '{"model_type": "diffusion_gemma", ',
        "trailing garbage": lambda c: json.dumps(c) + " x",
    }.items():
        add(name, fn, "error")
    # What transformers computes differently from what was read before, or refuses (it was run with defaults);
    # each with a part of the message it must be refused with.
    for name, fn, says in [
        ("rope_parameters legacy 'type' linear", lambda c: c["text_config"]["rope_parameters"].update(
            sliding_attention={"type": "linear", "factor": 4.0, "rope_theta": 10000.0}), "rope_type 'linear'"),
        ("rope_parameters entry without rope_theta",
         _set("text_config.rope_parameters.sliding_attention.rope_theta", _DELETE), "missing rope_theta"),
        ("rope_parameters without a full_attention entry", _set("text_config.rope_parameters.full_attention", _DELETE),
         "no entry for full_attention"),
        # transformers fills a missing entry value from outside rope_parameters (it ran with 10000 here)
        ("entry without rope_theta, rope_theta outside rope_parameters", lambda c: (
            c["text_config"]["rope_parameters"]["sliding_attention"].pop("rope_theta"),
            c["text_config"].update(rope_theta=500.0)), "missing rope_theta"),
        ("partial_rotary_factor outside rope_parameters, an entry without one",
         _set("text_config.partial_rotary_factor", 0.5), "partial_rotary_factor outside rope_parameters"),
        ("rope_scaling", _set("text_config.rope_scaling", {"rope_type": "linear", "factor": 2.0}), "rope_scaling"),
        ("is_causal false", _set("text_config.is_causal", False), "is_causal"),
        ("per_layer_config keyed by layer type", lambda c: c["text_config"]["per_layer_config"].update(
            full_attention={"head_dim": 16}), "bad per_layer_config entry 'full_attention'"),
        ("per_layer_config overriding rms_norm_eps", lambda c: c["text_config"]["per_layer_config"].update(
            {"0": {"rms_norm_eps": 1e-5}}), "unknown key 'rms_norm_eps'"),
        ("per_layer_config differing within full layers", lambda c: c["text_config"].update(
            layer_types=["full_attention"] * len(c["text_config"]["layer_types"])), "must agree within a type"),
    ]:
        add(name, fn, "error", says=says)
    add("rope_parameters legacy 'type' proportional", lambda c: c["text_config"]["rope_parameters"].update(
        full_attention={k if k != "rope_type" else "type": v
                         for k, v in c["text_config"]["rope_parameters"]["full_attention"].items()}), "load")
    add("is_causal true", _set("text_config.is_causal", True), "load")
    # Only filling in: with every entry complete, transformers ignores these (and saves rope_theta there itself)
    add("rope_theta outside a complete rope_parameters", _set("text_config.rope_theta", 500.0), "load")
    add("partial_rotary_factor outside a complete rope_parameters", lambda c: (
        c["text_config"]["rope_parameters"]["sliding_attention"].update(partial_rotary_factor=1.0),
        c["text_config"].update(partial_rotary_factor=0.5)), "load")
    add("canvas_length absent (256)", _set("canvas_length", _DELETE), "load", generate=False)
    add("canvas_length absent, 128 positions (the default 256 does not fit)", lambda c: (
        c.pop("canvas_length"), c["text_config"].update(max_position_embeddings=128, sliding_window=8)), "error",
        says="canvas_length 256 (the default)")
    add("unknown keys (ignored)", lambda c: c.update(foo={"bar": [1, 2, {"baz": None}]}), "load")
    add("reformatted", lambda c: json.dumps(c, indent=7, sort_keys=False), "load")
    # Deep nesting: refused before parsing (the recursive dump of a wrong-typed value segfaulted).
    add("head_dim nested 70000 deep", lambda c: json.dumps(c).replace('"head_dim": 8', '"head_dim": ' + _deep(70000)), "error")
    add("rope_parameters nested 300000 deep",
        lambda c: json.dumps(c).replace('"rope_parameters": {', '"rope_parameters": {"deep": ' + _deep(300000) + ", "), "error")
    add("unknown key nested 65 deep", lambda c: json.dumps(c)[:-1] + ', "x": ' + _deep(65) + "}", "error")
    add("unknown key nested 60 deep (fine)", lambda c: json.dumps(c)[:-1] + ', "x": ' + _deep(60) + "}", "load")
    for how in ["fifo", "dir", "loop", "dangling", "device", "empty", "huge", "binary", "missing"]:
        cases.append(Case(f"config.json: {how}", _replace_file("config.json", how), "error"))

    # generation_config.json
    gen_file = "generation_config.json"
    for name, fn in {
        "eos_token_id = vocab_size": _set("eos_token_id", 64),
        "eos_token_id [-1]": _set("eos_token_id", [-1]),
        "eos_token_id 2**31": _set("eos_token_id", 2**31),
        "eos_token_id true": _set("eos_token_id", True),
        "eos_token_id '1'": _set("eos_token_id", "1"),
        "eos_token_id 2000 ids": _set("eos_token_id", [1] * 2000),
        "pad_token_id 2**40": _set("pad_token_id", 2**40),
        "pad_token_id 0.0": _set("pad_token_id", 0.0),
        "max_denoising_steps 0": _set("max_denoising_steps", 0),
        "max_denoising_steps 2**31": _set("max_denoising_steps", 2**31),
        "max_new_tokens -5": _set("max_new_tokens", -5),
        "stability_threshold -1": _set("stability_threshold", -1),
        "stability_threshold 1.5": _set("stability_threshold", 1.5),
        "t_min -1": _set("t_min", -1),
        "t_max 'hot'": _set("t_max", "hot"),
        "confidence_threshold 0": _set("confidence_threshold", 0),
        "entropy_bound 0": _set("sampler_config.entropy_bound", 0),
        "top level a list": lambda c: "[]",
        "eos nested 70000 deep": lambda c: json.dumps(c).replace('"eos_token_id": [', '"eos_token_id": [' + _deep(70000) + ", "),
    }.items():
        add(name, fn, "error", file=gen_file)
    # transformers' DiffusionGemmaGenerationConfig refuses these, or computes differently (max_length)
    for name, fn, says in [
        ("temperature (not a DiffusionGemma setting)", _set("temperature", 0.7), "unknown key 'temperature'"),
        ("top_k (not a DiffusionGemma setting)", _set("top_k", 64), "unknown key 'top_k'"),
        ("max_length", _set("max_length", 40), "max_length is not supported"),
        ("sampler_config without _cls_name", _set("sampler_config._cls_name", _DELETE), "EntropyBoundSamplerConfig"),
        ("sampler_config without entropy_bound", _set("sampler_config.entropy_bound", _DELETE), "no entropy_bound"),
        ("sampler_config a number", _set("sampler_config", 0.5), "sampler_config must be an object"),
        ("sampler_config with an unknown key", _set("sampler_config.top_p", 0.9), "unknown key 'top_p'"),
        ("cache_implementation quantized", _set("cache_implementation", "quantized"), "'quantized'"),
    ]:
        add(name, fn, "error", file=gen_file, says=says)
    add("cache_implementation dynamic", _set("cache_implementation", "dynamic"), "load", file=gen_file)
    add("sampler_config null (the default bound)", _set("sampler_config", None), "load", file=gen_file)
    # stability_threshold is a step count: a huge one is valid, and costs nothing (the history is clamped).
    add("stability_threshold 2**31-1", _set("stability_threshold", 2**31 - 1), "load", file=gen_file)
    add("eos_token_id a single id", _set("eos_token_id", 1), "load", file=gen_file)
    for how in ["fifo", "dir", "loop", "dangling", "device", "huge", "binary"]:
        cases.append(Case(f"{gen_file}: {how}", _replace_file(gen_file, how), "error"))
    cases.append(Case(f"{gen_file}: missing (fine)", _replace_file(gen_file, "missing"), "load"))

    # model.safetensors as something else, and other *.safetensors files in the directory
    for how in ["fifo", "dir", "loop", "dangling", "device", "empty", "binary", "missing"]:
        cases.append(Case(f"{ST}: {how}", _replace_file(ST, how), "error"))
    cases.append(Case("extra x.safetensors FIFO", _replace_file("x.safetensors", "fifo"), "error"))
    cases.append(Case("extra x.safetensors symlink loop", _replace_file("x.safetensors", "loop"), "error"))
    return cases


# ------------------------------------------------------------------------------------------------ sharded
def _make_sharded(d: str) -> None:
    """model.safetensors split in two shards plus model.safetensors.index.json."""
    p = os.path.join(d, ST)
    header, data = read_raw(p)
    h = json.loads(header)
    names = sorted(k for k in h if k != "__metadata__")
    index = {"metadata": {}, "weight_map": {}}
    for shard, part in (("model-00001-of-00002.safetensors", names[::2]), ("model-00002-of-00002.safetensors", names[1::2])):
        sub, blobs, off = {}, [], 0
        for n in part:
            b, e = h[n]["data_offsets"]
            sub[n] = {**h[n], "data_offsets": [off, off + e - b]}
            blobs.append(data[b:e])
            off += e - b
            index["weight_map"][n] = shard
        write_raw(os.path.join(d, shard), json.dumps(sub).encode(), b"".join(blobs))
    os.remove(p)
    with open(os.path.join(d, "model.safetensors.index.json"), "w") as f:
        json.dump(index, f)


def sharded_cases() -> list[Case]:
    idx = "model.safetensors.index.json"
    shard = "model-00002-of-00002.safetensors"
    cases = [Case("sharded (valid)", lambda d: None, "load")]

    def add(name: str, fn: Callable[[str], None], expect: str = "error"):
        cases.append(Case(f"sharded: {name}", fn, expect))

    first = "model.decoder.embed_tokens.weight"
    for name, fn in {
        "weight_map missing": _set("weight_map", _DELETE),
        "weight_map a list": _set("weight_map", [1]),
        "shard name 5": lambda c: c["weight_map"].__setitem__(first, 5),
        "shard name ../x": lambda c: c["weight_map"].__setitem__(first, "../" + shard),
        "shard name a/b": lambda c: c["weight_map"].__setitem__(first, "a/" + shard),
        "shard name empty": lambda c: c["weight_map"].__setitem__(first, ""),
        "shard name with NUL": lambda c: c["weight_map"].__setitem__(first, shard + "\u0000x"),
        "shard name unknown": lambda c: c["weight_map"].__setitem__(first, "model-00042-of-00099.safetensors"),
        "tensor mapped to the wrong shard": lambda c: c["weight_map"].__setitem__(
            first, "model-00002-of-00002.safetensors" if c["weight_map"][first].startswith("model-00001") else
            "model-00001-of-00002.safetensors"),
        "nested 70000 deep": lambda c: json.dumps(c)[:-1] + ', "x": ' + _deep(70000) + "}",
        "not JSON": lambda c: '{"weight_map": ',
    }.items():
        add(name, _edit_json(idx, fn))
    for how in ["fifo", "dir", "loop", "device", "empty"]:
        add(f"index {how}", _replace_file(idx, how))
        add(f"shard {how}", _replace_file(shard, how))
    return cases


# ------------------------------------------------------------------------------------------------ tests
def test_fuzz_safetensors(tmp_path, base, runner):
    base_dir, required = base
    _run_cases(runner, str(tmp_path), base_dir, required, safetensors_cases(base_dir, required))


def test_fuzz_configs(tmp_path, base, runner):
    base_dir, required = base
    _run_cases(runner, str(tmp_path), base_dir, required, config_cases(base_dir))


def test_fuzz_sharded(tmp_path, base, runner):
    base_dir, required = base
    sharded = str(tmp_path / "sharded-base")
    shutil.copytree(base_dir, sharded)
    _make_sharded(sharded)
    _run_cases(runner, str(tmp_path / "cases"), sharded, required, sharded_cases())


def test_fuzz_checkpoint_path(tmp_path, base, runner):
    """The checkpoint path itself: missing, a file, a FIFO, a symlink loop, a device."""
    base_dir, _ = base
    os.mkfifo(tmp_path / "fifo")
    os.symlink("loop", tmp_path / "loop")
    for path in [tmp_path / "missing", os.path.join(base_dir, "config.json"), tmp_path / "fifo", tmp_path / "loop",
                 "/dev/null"]:
        res = runner.load(str(path))
        assert res["outcome"] == "checkpoint_error", (path, res)
    os.symlink(base_dir, tmp_path / "link")
    assert runner.load(str(tmp_path / "link"), generate=GEN)["outcome"] == "loaded"


def test_fuzz_load_time_quantization(tmp_path, base, runner):
    """A deterministic slice of the cases above loaded with quant="nvfp4" (and dense_quant="fp8"): the quantizer
    reads the checkpoint in Python, after the native loader's checks, so every case ends the same way as without
    quantization: CheckpointError, or a checkpoint that loads. Bounded to well under 30 s."""
    import time

    from checkpoint_fuzz import LOAD_KWARGS

    base_dir, required = base
    t0 = time.monotonic()
    st, cfg = safetensors_cases(base_dir, required), config_cases(base_dir)
    sharded = str(tmp_path / "sharded-base")
    shutil.copytree(base_dir, sharded)
    _make_sharded(sharded)
    _run_cases(runner, str(tmp_path / "st"), base_dir, required, st[::QUANT_STRIDE], {**LOAD_KWARGS, "quant": "nvfp4"})
    _run_cases(runner, str(tmp_path / "cfg"), base_dir, required, cfg[::QUANT_STRIDE],
               {**LOAD_KWARGS, "quant": "nvfp4", "dense_quant": "fp8"})
    _run_cases(runner, str(tmp_path / "sh"), sharded, required, sharded_cases()[::2], {**LOAD_KWARGS, "quant": "nvfp4"})
    assert time.monotonic() - t0 < 30


def test_the_oracle_knows_a_valid_file(base):
    base_dir, required = base
    assert _file_is_valid(os.path.join(base_dir, ST), required)
    header, data = read_raw(os.path.join(base_dir, ST))
    assert not header_is_valid(header[:-8], len(data), required)
    assert not header_is_valid(header, len(data) - 1, required)
