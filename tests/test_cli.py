"""The pure-Python layer: the tiny checkpoint, the tokenizer, and the dgemma-rt / dgemma-bench commands."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

import dgemma_rt
from dgemma_rt import tiny
from dgemma_rt.text import Tokenizer

CHAT_PROMPT = "<bos><start_of_turn>user\nWhy is the sky blue?<end_of_turn>\n<start_of_turn>model\n"


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> pathlib.Path:
    return tiny.make_tiny(tmp_path_factory.mktemp("tiny") / "ckpt")


def _package_path(env: dict[str, str] | None = None) -> str:
    """PYTHONPATH for a subprocess that imports the same dgemma_rt as this test, installed or not."""
    import dgemma_rt

    package_root = str(pathlib.Path(dgemma_rt.__file__).resolve().parent.parent)
    return os.pathsep.join(p for p in (package_root, (os.environ if env is None else env).get("PYTHONPATH")) if p)


def _run(module: str, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full_env = dict(os.environ if env is None else env)
    full_env["PYTHONPATH"] = _package_path(env)
    return subprocess.run(
        [sys.executable, "-m", module, *args], capture_output=True, text=True, env=full_env, timeout=300
    )


# ---------------------------------------------------------------------------------------------- make_tiny


def test_make_tiny_is_deterministic(tmp_path, tiny_dir):
    again = tiny.make_tiny(tmp_path / "again")
    other = tiny.make_tiny(tmp_path / "other", seed=1)
    for name in tiny.FILES:
        assert (again / name).read_bytes() == (tiny_dir / name).read_bytes(), name
    assert (other / "model.safetensors").read_bytes() != (tiny_dir / "model.safetensors").read_bytes()
    assert (other / "tokenizer.json").read_bytes() == (tiny_dir / "tokenizer.json").read_bytes()
    assert sorted(p.name for p in tiny_dir.iterdir()) == sorted(tiny.FILES)


def test_make_tiny_shapes(tiny_dir):
    from safetensors.numpy import load_file

    cfg = json.loads((tiny_dir / "config.json").read_text())
    tc = cfg["text_config"]
    assert cfg["model_type"] == "diffusion_gemma" and tc["model_type"] == "diffusion_gemma_text"
    assert tc["layer_types"] == ["sliding_attention"] * 5 + ["full_attention"]
    assert tc["per_layer_config"] == {"5": {"head_dim": 64, "num_key_value_heads": 1}}
    w = load_file(str(tiny_dir / "model.safetensors"))
    assert all(a.dtype == np.float32 for a in w.values())
    assert w["model.decoder.embed_tokens.weight"].shape == (2048, 128)
    assert w["model.decoder.layers.0.self_attn.v_proj.weight"].shape == (64, 128)
    assert "model.decoder.layers.5.self_attn.v_proj.weight" not in w
    assert w["model.decoder.layers.5.self_attn.q_proj.weight"].shape == (256, 128)
    assert w["model.decoder.layers.5.self_attn.k_proj.weight"].shape == (64, 128)
    assert w["model.decoder.layers.3.experts.gate_up_proj"].shape == (16, 128, 128)
    assert w["model.decoder.layers.3.experts.down_proj"].shape == (16, 128, 64)
    assert w["model.encoder.language_model.layers.5.layer_scalar"].shape == (1,)


def test_make_tiny_loads_in_transformers(tiny_dir):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from safetensors.numpy import load_file
    from transformers.models.diffusion_gemma.generation_diffusion_gemma import DiffusionGemmaGenerationConfig

    # config.json is byte for byte what transformers writes for this config.
    config = transformers.DiffusionGemmaConfig.from_pretrained(tiny_dir)
    assert config.to_json_string() == (tiny_dir / "config.json").read_text()
    gen = DiffusionGemmaGenerationConfig.from_pretrained(tiny_dir)
    assert gen.eos_token_id == tiny.EOS_IDS and gen.pad_token_id == tiny.PAD_ID
    assert gen.sampler_config.entropy_bound == 0.1

    model, info = transformers.DiffusionGemmaForBlockDiffusion.from_pretrained(tiny_dir, output_loading_info=True)
    assert [k for k in info["missing_keys"] if ".vision_tower." not in k and ".embed_vision." not in k] == []
    assert not info["unexpected_keys"] and not info["mismatched_keys"]
    state = model.state_dict()
    for name, value in load_file(str(tiny_dir / "model.safetensors")).items():
        assert torch.equal(state[name], torch.from_numpy(value)), name
    # The encoder shares the decoder's weights.
    assert torch.equal(
        state["model.encoder.language_model.layers.2.mlp.up_proj.weight"],
        state["model.decoder.layers.2.mlp.up_proj.weight"],
    )

    model.config._attn_implementation = "eager"
    model.config.text_config._attn_implementation = "eager"
    torch.manual_seed(0)
    out = model.generate(torch.tensor([[2, 10, 11, 12]]), max_new_tokens=8, max_denoising_steps=2)
    assert out.sequences.shape == (1, 4 + tiny.CANVAS_LENGTH)


def test_make_tiny_loads_in_engine(tiny_dir):
    import dgemma_rt

    engine = dgemma_rt.Engine(tiny_dir)
    assert engine.config["vocab_size"] == 2048
    assert engine.config["num_hidden_layers"] == 6
    assert engine.config["canvas_length"] == tiny.CANVAS_LENGTH
    assert list(engine.generation_defaults["eos_token_id"]) == tiny.EOS_IDS
    assert engine.generation_defaults["pad_token_id"] == tiny.PAD_ID
    assert engine.tokenizer is not None and engine.tokenizer.vocab_size == 2048
    out = engine.generate([[2, 10, 11, 12]], max_new_tokens=8, max_denoising_steps=2)
    assert out.sequences.shape == (1, 4 + tiny.CANVAS_LENGTH)


def test_checkpoint_directory_name_not_utf8(tmp_path, tiny_dir):
    """A directory whose name is not valid UTF-8 loads as str (surrogate escapes), bytes or Path, tokenizer too."""
    import shutil

    import dgemma_rt

    raw = os.path.join(os.fsencode(tmp_path), b"ckpt-\xff\xfe")
    name = os.fsdecode(raw)
    shutil.copytree(tiny_dir, name)
    want = None
    for arg in (name, raw, pathlib.Path(name)):
        engine = dgemma_rt.Engine(arg)
        assert engine.path == name
        assert engine.tokenizer is not None and engine.tokenizer.vocab_size == 2048
        out = engine.generate([[2, 10, 11, 12]], max_new_tokens=8, max_denoising_steps=2, seed=3)
        want = out.sequences if want is None else want
        np.testing.assert_array_equal(out.sequences, want)
    dgemma_rt._core.check_checkpoint(name)
    with pytest.raises(dgemma_rt.CheckpointError, match=r"ckpt-\\xff\\xfe-missing does not exist"):
        dgemma_rt.Engine(name + "-missing")
    with pytest.raises(ValueError, match="path must be a str, bytes or os.PathLike, got int"):
        dgemma_rt._core.Engine(3)


# ---------------------------------------------------------------------------------------------- tokenizer


def test_tokenizer_round_trip(tiny_dir):
    tok = Tokenizer.from_dir(tiny_dir)
    assert tok is not None and tok.vocab_size == 2048
    for i, name in enumerate(tiny.SPECIAL_TOKENS):
        assert tok.token_to_id(name) == i
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (2, 1, 0)
    for text in ["Hello! How are you today?", "  spaces\nand\ttabs", "Ünïcödé 日本語 🙂 3.14"]:
        ids = tok.encode(text)
        assert ids[0] == tok.bos_token_id and max(ids) < 2048
        assert tok.encode(text, add_special_tokens=False) == ids[1:]
        assert tok.decode(ids) == text
        assert tok.decode(np.asarray([ids])) == text
        assert tok.decode(ids, skip_special_tokens=False) == "<bos>" + text


def test_chat_template(tiny_dir):
    tok = Tokenizer.from_dir(tiny_dir)
    chat = [{"role": "user", "content": "Why is the sky blue?"}]
    assert tok.render_chat_template(chat) == CHAT_PROMPT
    ids = tok.apply_chat_template(chat)
    assert ids[:2] == [tiny.BOS_ID, tiny.START_OF_TURN_ID] and ids.count(tiny.BOS_ID) == 1
    assert tok.decode(ids, skip_special_tokens=False) == CHAT_PROMPT
    assert tok.render_chat_template(chat, add_generation_prompt=False).endswith("<end_of_turn>\n")
    multi = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": [{"type": "text", "text": "More?"}]},
    ]
    assert tok.render_chat_template(multi) == (
        "<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\nHello!<end_of_turn>\n"
        "<start_of_turn>user\nMore?<end_of_turn>\n<start_of_turn>model\n"
    )
    with pytest.raises(ValueError, match="alternate"):
        tok.apply_chat_template([{"role": "assistant", "content": "x"}])


def test_chat_template_matches_transformers(tiny_dir):
    transformers = pytest.importorskip("transformers")
    ours = Tokenizer.from_dir(tiny_dir)
    theirs = transformers.AutoTokenizer.from_pretrained(tiny_dir)
    chat = [{"role": "user", "content": "Why is the sky blue?"}, {"role": "assistant", "content": "Air."}]
    for add in (True, False):
        assert ours.apply_chat_template(chat[:1], add) == theirs.apply_chat_template(
            chat[:1], add_generation_prompt=add, tokenize=True, return_dict=False
        )
    assert ours.apply_chat_template(chat, False) == theirs.apply_chat_template(chat, tokenize=True, return_dict=False)
    assert ours.encode("Hello world") == theirs.encode("Hello world")


@pytest.mark.parametrize("spoil,at", [
    (lambda t: t.__setitem__("normalizer", {"type": "Precompiled", "precompiled_charsmap": "AAAA"}), "load"),
    (lambda t: t["post_processor"].update(single=[{"SpecialToken": {"id": "<nope>", "type_id": 0}},
                                                  {"Sequence": {"id": "A", "type_id": 0}}]), "encode"),
])
def test_tokenizer_that_makes_the_rust_side_panic(tmp_path, tiny_dir, spoil, at):
    """A Rust panic in tokenizers is a BaseException (pyo3's PanicException): it escaped every handler. At load
    it is a CheckpointError; at encode (the file loads, the text is fine) a RuntimeError, not the caller's fault."""
    from dgemma_rt.text import Tokenizer

    for name in tiny.FILES:
        (tmp_path / name).write_bytes((tiny_dir / name).read_bytes())
    tok = json.loads((tmp_path / "tokenizer.json").read_text())
    spoil(tok)
    (tmp_path / "tokenizer.json").write_text(json.dumps(tok))
    if at == "load":
        with pytest.raises(dgemma_rt.CheckpointError, match="cannot read .*tokenizer.json"):
            Tokenizer.from_dir(tmp_path)
    else:
        with pytest.raises(RuntimeError, match="the checkpoint's tokenizer failed to encode"):
            Tokenizer.from_dir(tmp_path).encode("hello")


def test_tokenizer_without_template(tmp_path, tiny_dir):
    assert Tokenizer.from_dir(tmp_path) is None
    (tmp_path / "tokenizer.json").write_bytes((tiny_dir / "tokenizer.json").read_bytes())
    tok = Tokenizer.from_dir(tmp_path)
    assert tok is not None and tok.encode("Hi")[0] == tiny.BOS_ID
    with pytest.raises(ValueError, match="no chat template"):
        tok.apply_chat_template([{"role": "user", "content": "Hi"}])
    # transformers 5 keeps the template in its own file.
    (tmp_path / "chat_template.jinja").write_text("{{ bos_token }}{{ messages[0]['content'] }}")
    assert Tokenizer.from_dir(tmp_path).render_chat_template([{"role": "user", "content": "Hi"}]) == "Hi"


# ---------------------------------------------------------------------------------------------- commands


@pytest.mark.parametrize("chat", [False, True])
def test_cli_generate(tiny_dir, chat):
    args = ["generate", str(tiny_dir), "--prompt", "Why is the sky blue?", "--steps", "2", "--max-new-tokens", "8"]
    proc = _run("dgemma_rt.cli", *args, *(["--chat"] if chat else []))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.endswith("\n") and proc.stdout.strip()
    assert "Traceback" not in proc.stderr


def test_cli_generate_leaves_unset_values_to_the_checkpoint(monkeypatch, tiny_dir):
    """--steps and --max-new-tokens left out: the checkpoint's generation_config.json decides (generate()'s
    own defaults without one), not the CLI's; --device reaches the Engine."""
    import dgemma_rt
    from dgemma_rt import cli

    seen = {}

    class FakeEngine:
        tokenizer = object()

        def __init__(self, path, **kw):
            seen["engine"] = kw

        def generate_text(self, prompt, **kw):
            seen["generate"] = kw
            return "text"

    monkeypatch.setattr(dgemma_rt, "Engine", FakeEngine)
    assert cli.main(["generate", str(tiny_dir), "--prompt", "hi"]) == 0
    assert seen["generate"] == {"seed": 0} and seen["engine"]["device"] == "cpu"
    assert cli.main(["generate", str(tiny_dir), "--prompt", "hi", "--steps", "3", "--max-new-tokens", "64",
                     "--device", "cuda:1"]) == 0
    assert seen["generate"] == {"seed": 0, "max_denoising_steps": 3, "max_new_tokens": 64}
    assert seen["engine"]["device"] == "cuda:1"


def test_cli_generate_sampler_options_and_stdin(monkeypatch, tiny_dir):
    """The sampler flags reach generate() by their names, only when given; --prompt - reads standard input."""
    import io

    import dgemma_rt
    from dgemma_rt import cli

    seen = {}

    class FakeEngine:
        tokenizer = object()

        def __init__(self, path, **kw):
            pass

        def generate_text(self, prompt, **kw):
            seen.update(prompt=prompt, kw=kw)
            return "text"

    monkeypatch.setattr(dgemma_rt, "Engine", FakeEngine)
    monkeypatch.setattr("sys.stdin", io.StringIO("line one\nline two\n"))
    assert cli.main(["generate", str(tiny_dir), "--prompt", "-", "--t-min", "0.2", "--t-max", "0.5",
                     "--entropy-bound", "0.3", "--fixed-steps"]) == 0
    assert seen["prompt"] == "line one\nline two"
    assert seen["kw"] == {"seed": 0, "t_min": 0.2, "t_max": 0.5, "entropy_bound": 0.3, "adaptive_stopping": False}


def test_cli_generate_bad_sampler_value_is_named(tiny_dir):
    proc = _run("dgemma_rt.cli", "generate", str(tiny_dir), "--prompt", "hi", "--t-min", "-1", "--steps", "2")
    assert proc.returncode == 2 and "t_min" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    proc = _run("dgemma_rt.cli", "generate", str(tiny_dir), "--prompt", "hi", "--t-max", "hot")
    assert proc.returncode == 2 and "--t-max" in proc.stderr, proc.stderr


def test_cli_serve_passes_the_device(monkeypatch, tiny_dir):
    server = pytest.importorskip("dgemma_rt.server")
    from dgemma_rt import cli

    seen = {}
    monkeypatch.setattr(server, "serve", lambda checkpoint, **kw: seen.update(kw))
    assert cli.main(["serve", str(tiny_dir), "--device", "cuda"]) == 0 and seen["device"] == "cuda"
    assert cli.main(["serve", str(tiny_dir)]) == 0 and seen["device"] == "cpu"


def test_cli_generate_cpu_weights(tiny_dir):
    """--cpu-weights reaches the Engine: the tiny checkpoint is F32, which every mode multiplies in float32."""
    args = ["generate", str(tiny_dir), "--prompt", "Why is the sky blue?", "--steps", "2", "--max-new-tokens", "8"]
    texts = []
    for mode in ("bf16", "stored"):
        proc = _run("dgemma_rt.cli", *args, "--cpu-weights", mode)
        assert proc.returncode == 0, proc.stderr
        texts.append(proc.stdout)
    assert texts[0] == texts[1]
    proc = _run("dgemma_rt.cli", *args, "--cpu-weights", "bfloat16")
    assert proc.returncode == 2 and "--cpu-weights" in proc.stderr


def test_cli_make_tiny(tmp_path, tiny_dir):
    proc = _run("dgemma_rt.cli", "make-tiny", str(tmp_path / "t"))
    assert proc.returncode == 0, proc.stderr
    for name in tiny.FILES:
        assert (tmp_path / "t" / name).read_bytes() == (tiny_dir / name).read_bytes()


def test_cli_make_tiny_never_overwrites_another_checkpoint(tmp_path, tiny_dir):
    """A non-empty directory that holds no tiny checkpoint is refused untouched (it used to be overwritten
    file by file); a tiny checkpoint is rewritten; a file is named as one."""
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text('{"model_type": "diffusion_gemma"}')
    (other / "notes.txt").write_text("mine")
    proc = _run("dgemma_rt.cli", "make-tiny", str(other))
    assert proc.returncode == 2 and "is not empty (config.json, notes.txt)" in proc.stderr, proc.stderr
    assert sorted(p.name for p in other.iterdir()) == ["config.json", "notes.txt"]
    assert (other / "config.json").read_text() == '{"model_type": "diffusion_gemma"}'
    # the tiny checkpoint's own files, with another config: refused too
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    (mixed / "config.json").write_text("{}")
    (mixed / "model.safetensors").write_bytes(b"x")
    assert _run("dgemma_rt.cli", "make-tiny", str(mixed)).returncode == 2
    assert (mixed / "model.safetensors").read_bytes() == b"x"
    again = tmp_path / "again"
    assert _run("dgemma_rt.cli", "make-tiny", str(again), "--seed", "1").returncode == 0
    proc = _run("dgemma_rt.cli", "make-tiny", str(again))
    assert proc.returncode == 0, proc.stderr
    assert (again / "model.safetensors").read_bytes() == (tiny_dir / "model.safetensors").read_bytes()
    proc = _run("dgemma_rt.cli", "make-tiny", str(again / "config.json"))
    assert proc.returncode == 2 and "exists and is not a directory" in proc.stderr, proc.stderr
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    proc = _run("dgemma_rt.cli", "make-tiny", str(tmp_path / "dangling"))
    assert proc.returncode == 2 and "exists and is not a directory" in proc.stderr, proc.stderr


def test_cli_make_tiny_refuses_an_empty_path(tmp_path):
    """`make-tiny "$UNSET"` wrote the checkpoint into the current directory."""
    proc = subprocess.run([sys.executable, "-m", "dgemma_rt.cli", "make-tiny", ""], capture_output=True, text=True,
                          cwd=tmp_path, env=dict(os.environ, PYTHONPATH=_package_path()),
                          timeout=120)
    assert proc.returncode == 2 and "empty string" in proc.stderr and not list(tmp_path.iterdir())


def test_cli_generate_user_errors(tmp_path, tiny_dir):
    """--chat without a template and a prompt that is not Unicode are named as the options they are."""
    (tmp_path / "t").mkdir()
    for name in tiny.FILES:
        (tmp_path / "t" / name).write_bytes((tiny_dir / name).read_bytes())
    config = json.loads((tmp_path / "t" / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (tmp_path / "t" / "tokenizer_config.json").write_text(json.dumps(config))
    proc = _run("dgemma_rt.cli", "generate", str(tmp_path / "t"), "--prompt", "hi", "--chat")
    assert proc.returncode == 2 and "has no chat template" in proc.stderr and "drop --chat" in proc.stderr
    proc = _run("dgemma_rt.cli", "generate", str(tiny_dir), "--prompt", "a\udcffb", "--chat")
    assert proc.returncode == 2 and "--prompt is not valid Unicode" in proc.stderr and "position 1" in proc.stderr
    # No tokenizer: said before the load (the weights here are not even readable, so a load would fail first)
    (tmp_path / "t" / "tokenizer.json").unlink()
    (tmp_path / "t" / "model.safetensors").write_bytes(b"not safetensors")
    proc = _run("dgemma_rt.cli", "generate", str(tmp_path / "t"), "--prompt", "hi")
    assert proc.returncode == 2 and "has no tokenizer.json" in proc.stderr, proc.stderr


def test_cli_generate_to_a_closed_pipe(tiny_dir):
    """The reader went away: no error message, SIGPIPE's exit status (it printed "error: [Errno 32]")."""
    args = ["generate", str(tiny_dir), "--prompt", "hi", "--steps", "1", "--max-new-tokens", "8"]
    read, write = os.pipe()
    os.close(read)
    proc = subprocess.run([sys.executable, "-m", "dgemma_rt.cli", *args], stdout=write, stderr=subprocess.PIPE,
                          text=True, env=dict(os.environ, PYTHONPATH=_package_path()), timeout=120)
    os.close(write)
    assert (proc.returncode, proc.stderr) == (141, ""), proc.stderr


def test_cli_generate_shows_progress_on_a_terminal(monkeypatch, capsys, tiny_dir):
    """On a terminal, a bar of canvases and the step within the canvas (nothing otherwise); the text is as
    without it."""
    from dgemma_rt import cli

    args = ["generate", str(tiny_dir), "--prompt", "hi", "--steps", "2", "--max-new-tokens", "128"]
    assert cli.main(args) == 0
    plain = capsys.readouterr()
    assert plain.err == ""
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    assert cli.main(args) == 0
    shown = capsys.readouterr()
    assert shown.out == plain.out and "generating" in shown.err and "canvas" in shown.err, shown.err


def test_serve_ray_without_ray_says_so_once(monkeypatch, capsys):
    """The hint came twice (ray_serve's ImportError inside the CLI's); now once, with the module that is missing."""
    from dgemma_rt import cli

    monkeypatch.setitem(sys.modules, "ray", None)  # import ray fails, installed or not
    monkeypatch.delitem(sys.modules, "dgemma_rt.ray_serve", raising=False)
    monkeypatch.delattr(dgemma_rt, "ray_serve", raising=False)  # `from dgemma_rt import` would take it
    assert cli.main(["serve", "some/ckpt", "--ray"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: dgemma-rt serve --ray needs Ray Serve: pip install 'dgemma_rt[ray]' ("), err
    assert err.count("pip install") == 1, err


def test_bench_shows_the_step_within_the_canvas_on_a_terminal(monkeypatch, capsys, tiny_dir):
    """dgemma-bench's bar moved only per canvas: a large model's canvas (minutes on the CPU) showed nothing."""
    from dgemma_rt import bench

    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    assert bench.main([str(tiny_dir), "--prompt-len", "8", "--new-tokens", "32", "--steps", "2", "--runs", "1",
                       "--warmup", "0", "--json"]) == 0
    err = capsys.readouterr().err
    assert "canvas" in err and "step 1" in err, err


def test_cli_generate_escapes_control_characters_on_a_terminal(monkeypatch, capsys, tiny_dir):
    """Random weights write any bytes: on a terminal, escape sequences are shown, not obeyed."""
    import io

    from dgemma_rt import cli
    from dgemma_rt.text import Tokenizer

    class FakeEngine:
        def __init__(self, path, **kw):
            self.tokenizer = Tokenizer.from_dir(tiny_dir)

        def generate_text(self, prompt, **kw):
            return "red\x1b[31m\tok\nline\x07\x9b"

    monkeypatch.setattr(dgemma_rt, "Engine", FakeEngine)
    for tty, want in ((True, "red\\x1b[31m\tok\nline\\x07\\x9b\n"), (False, "red\x1b[31m\tok\nline\x07\x9b\n")):
        out = io.StringIO()
        out.isatty = lambda tty=tty: tty
        monkeypatch.setattr(sys, "stdout", out)
        assert cli.main(["generate", str(tiny_dir), "--prompt", "hi"]) == 0
        assert out.getvalue() == want


@pytest.mark.parametrize("make_dir", [False, True])
def test_cli_bad_checkpoint(tmp_path, make_dir):
    path = tmp_path / "nope"
    if make_dir:
        path.mkdir()
        (path / "config.json").write_text("{not json")
    proc = _run("dgemma_rt.cli", "generate", str(path), "--prompt", "hi")
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: ") and "Traceback" not in proc.stderr
    assert proc.stdout == ""


@pytest.mark.parametrize("port", ["70000", "-1", "http"])
def test_cli_serve_checks_the_port(tiny_dir, port):
    proc = _run("dgemma_rt.cli", "serve", str(tiny_dir), "--port", port)
    assert proc.returncode == 2, proc.stderr
    assert "argument --port" in proc.stderr and "Traceback" not in proc.stderr


def test_cli_generate_needs_tokenizer(tmp_path, tiny_dir):
    for name in ("config.json", "generation_config.json", "model.safetensors"):
        (tmp_path / name).write_bytes((tiny_dir / name).read_bytes())
    proc = _run("dgemma_rt.cli", "generate", str(tmp_path), "--prompt", "hi", "--steps", "1")
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: ") and "tokenizer" in proc.stderr


BENCH_KEYS = {
    "checkpoint", "tiny", "batch", "prompt_len", "new_tokens", "steps", "fixed_steps", "threads", "seed",
    "warmup", "runs", "kv_cache_tokens", "device", "dgemma_rt_version", "python", "platform", "machine",
    "cpu_count", "load_s", "tokens_per_s", "ms_per_step", "ms_per_canvas", "steps_per_canvas",
    "tokens_per_forward", "prefill_ms", "denoise_ms", "total_ms", "wall_ms", "generated_tokens", "canvases",
    "decoder_forwards", "encoder_forwards", "captured_passes", "replayed_passes", "capture_failures", "peak_rss_mib", "quant", "dense_quant", "random_weights", "preset", "num_layers", "weight_bytes",
    "loaded_rss_mib", "generate_peak_rss_mib", "template_free_fraction", "peer",
    "peak_device_memory_mib", "live_device_memory_mib", "device_memory_is_host", "cpu_weights", "cpu_bf16_dot",
    "load_avg",
}  # fmt: skip


def test_bench_json(tmp_path):
    env = dict(os.environ, DGEMMA_RT_CACHE=str(tmp_path / "cache"))
    args = ["--prompt-len", "16", "--new-tokens", "64", "--steps", "2", "--json"]
    proc = _run("dgemma_rt.bench", *args, env=env)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)  # stdout holds the JSON object and nothing else
    assert set(result) == BENCH_KEYS  # op_profile only with --profile (tests/test_profile.py)
    assert result["peak_device_memory_mib"] >= result["live_device_memory_mib"] > 0
    assert result["tiny"] is True and result["device"] == "cpu" and result["fixed_steps"] is True
    # The default multiplies BF16 weights with BF16 dot products where the CPU has them, and says whether it does.
    assert result["cpu_weights"] == "bf16" and result["cpu_bf16_dot"] is dgemma_rt.cpu_has_bf16_dot()
    assert len(result["load_avg"]) == 3
    for key in ("tokens_per_s", "ms_per_step", "ms_per_canvas", "prefill_ms", "total_ms", "peak_rss_mib",
                "loaded_rss_mib", "generate_peak_rss_mib"):
        assert result[key] > 0, key
    # Fixed steps, EOS ignored: one canvas of exactly two decoder passes.
    assert (result["canvases"], result["decoder_forwards"], result["steps_per_canvas"]) == (1, 2, 2.0)
    assert result["captured_passes"] == result["replayed_passes"] == result["capture_failures"] == 0  # never captures
    assert 0 < result["generated_tokens"] <= 64
    assert result["tokens_per_forward"] == pytest.approx(result["generated_tokens"] / 2)

    # The cached tiny checkpoint is reused, not rebuilt.
    ckpt = pathlib.Path(result["checkpoint"])
    assert ckpt.parent == tmp_path / "cache"
    stamp = (ckpt / "model.safetensors").stat().st_mtime_ns
    proc = _run("dgemma_rt.bench", *args, "--warmup", "0", env=env)
    assert proc.returncode == 0, proc.stderr
    assert (ckpt / "model.safetensors").stat().st_mtime_ns == stamp


def test_bench_peer_transformers(tmp_path):
    """--peer transformers times transformers on the same checkpoint and steps and reports the ratio."""
    pytest.importorskip("transformers")
    env = dict(os.environ, DGEMMA_RT_CACHE=str(tmp_path / "cache"))
    proc = _run("dgemma_rt.bench", "--prompt-len", "16", "--new-tokens", "32", "--steps", "2", "--runs", "2",
                "--warmup", "0", "--peer", "transformers", "--json", env=env)
    assert proc.returncode == 0, proc.stderr
    r = json.loads(proc.stdout)
    assert r["peer"] == "transformers" and len(r["peer_run_details"]) == 2
    kept = [d["ms"] for d in r["peer_run_details"] if d not in r["peer_excluded_runs"]]
    assert kept == r["peer_runs_ms"] and kept
    # Pad tokens sampled by the random model lower tokens_per_forward, so the implied steps are >= the fixed 2.
    assert all(d["implied_steps_per_canvas"] >= 2.0 for d in r["peer_run_details"])
    assert r["speedup_vs_peer"] == pytest.approx(r["peer_median_ms"] / r["engine_median_ms"])


@pytest.mark.parametrize("argv,words", [
    (["--roofline", "some/ckpt"], "a checkpoint does not apply"),
    (["--roofline", "--peer", "transformers", "--profile"], "--peer, --profile do not apply"),
    (["--roofline", "--adaptive"], "--adaptive does not apply"),
    # every option a run reads: they were accepted and ignored
    (["--roofline", "--runs", "5", "--device", "cuda", "--seed", "3", "--random-weights", "--new-tokens", "64"],
     "--new-tokens, --device, --random-weights, --seed, --runs do not apply"),
    (["--measured", "m.json"], "--measured goes with --roofline"),
    (["--fused-lm-head", "--context", "100"], "--fused-lm-head, --context go with --roofline"),
    (["--preset", "wide-vocab"], "--preset goes with --random-weights"),
    (["--gpu", "h200"], "--gpu goes with --roofline, or with --profile on --device cuda"),
    (["--gpu", "h200", "--profile"], "--gpu goes with --roofline"),
])
def test_bench_refuses_the_other_modes_options(argv, words, capsys):
    """Options of the roofline model and of a run are refused in the other mode, not silently ignored."""
    from dgemma_rt import bench

    assert bench.main(argv) == 2
    assert words in capsys.readouterr().err


@pytest.mark.parametrize("argv,words", [
    (["bench", "--batch", "1025"], "argument --batch: at most 1024 rows, got 1025"),
    (["bench", "--threads", "100000"], "argument --threads: at most "),
    (["cli", "serve", "ckpt", "--max-batch-size", "5000"], "argument --max-batch-size: at most 1024 rows"),
    (["cli", "generate", "ckpt", "--threads", "100000"], "argument --threads: at most "),
])
def test_cli_options_past_the_engines_limits_are_named(argv, words, capsys):
    """An option past what the Engine takes is refused as that option, before anything is loaded (it was
    the Engine's parameter, max_batch_size or num_threads, that the error named)."""
    from dgemma_rt import _core, bench, cli
    from dgemma_rt.engine import MAX_BATCH_SIZE

    with pytest.raises(SystemExit) as e:
        (bench.main if argv[0] == "bench" else cli.main)(argv[1:])
    assert e.value.code == 2
    assert words in capsys.readouterr().err
    assert MAX_BATCH_SIZE == 1024 and _core.thread_limit() < 100000
    with pytest.raises(ValueError, match="max_batch_size"):  # the limit is the Engine's own
        dgemma_rt.Engine("no/such/dir", max_batch_size=MAX_BATCH_SIZE + 1)


@pytest.mark.parametrize("script", ["concurrency.py", "memory_per_row.py"])
def test_bench_scripts_check_the_json_path_first(tmp_path, script):
    """A --json path that cannot be written failed with a traceback after the whole benchmark had run."""
    bench_dir = pathlib.Path(__file__).resolve().parent.parent / "bench"
    env = dict(os.environ, PYTHONPATH=_package_path())
    for path, words in ((tmp_path / "no" / "x.json", "does not exist"), (tmp_path, "is a directory")):
        proc = subprocess.run([sys.executable, str(bench_dir / script), "--json", str(path)], capture_output=True,
                              text=True, env=env, timeout=120)
        assert proc.returncode == 2 and proc.stderr.startswith("error: --json") and words in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("fails_in", ["init", "run"])
def test_bench_peer_failing_on_the_cpu_keeps_the_engine_numbers(tmp_path, monkeypatch, capsys, fails_in):
    """A transformers peer that does not fit this transformers (its constructor or a run raises) is a
    peer_error beside the engine's numbers, with exit status 1, as on the GPU: not a traceback."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from dgemma_rt import bench

    class FakePeer:
        version, dtype, threads, experts_implementation, steps_per_canvas = "fake", "bfloat16", 1, None, None

        def __init__(self, *a, **k):
            if fails_in == "init":
                raise TypeError("__init__() got an unexpected keyword argument 'experts_implementation'")
            self.calls, self.runs_s, self.run_details, self.excluded = 0, [], [], []

        def run(self, record):
            self.calls += 1
            if self.calls == 2:
                raise AttributeError("'Output' object has no attribute 'tokens_per_forward'")
            if record:
                self.runs_s.append(1.0)

    monkeypatch.setattr(bench, "TransformersPeer", FakePeer)
    monkeypatch.setenv("DGEMMA_RT_CACHE", str(tmp_path / "cache"))
    rc = bench.main(["--prompt-len", "16", "--new-tokens", "32", "--steps", "2", "--runs", "2", "--warmup", "1",
                     "--peer", "transformers", "--json", "--no-progress"])
    out, err = capsys.readouterr()
    r = json.loads(out)
    assert rc == 1 and "the transformers peer failed" in err and "Traceback" not in err
    assert r["tokens_per_s"] > 0 and r["new_tokens"] > 0
    assert r["peer_error"].startswith("TypeError" if fails_in == "init" else "AttributeError")
    assert "speedup_vs_peer" not in r


def test_bench_peer_leaves_out_runs_that_stopped_early():
    """A transformers run that generated fewer canvases than asked did less work: not timed in. One whose
    tokens_per_forward implies more steps (sampled pad tokens are not counted) is the same work."""
    torch = pytest.importorskip("torch")
    from dgemma_rt.bench import TransformersPeer

    class Out:
        def __init__(self, new, valid, forwards):
            self.sequences = torch.zeros((1, 4 + new), dtype=torch.long)
            self.tokens_per_forward = torch.tensor([valid / forwards])

    class Model:
        config = type("C", (), {"canvas_length": 8})()

        def __init__(self, outs):
            self.outs = outs

        def generate(self, *_a, **_k):
            return self.outs.pop(0)

    peer = TransformersPeer.__new__(TransformersPeer)
    peer.torch, peer.device, peer.steps, peer.new_tokens = torch, "cpu", 3, 13
    peer.input_ids, peer.generation_config = torch.zeros((1, 4), dtype=torch.long), None
    peer.runs_s, peer.steps_per_canvas, peer.run_details, peer.excluded = [], None, [], []
    # Two canvases (13 tokens round up to 16); pads sampled (14 of 16 counted); one canvas only.
    peer.model = Model([Out(16, 16, 6), Out(16, 14, 6), Out(8, 8, 3)])
    for _ in range(3):
        peer.run(record=True)
    assert len(peer.runs_s) == 2 and len(peer.run_details) == 3
    assert [d["new_tokens"] for d in peer.excluded] == [8]
    assert [d["implied_steps_per_canvas"] for d in peer.run_details] == [3.0, 3.429, 3.0]


def test_bench_template(tiny_dir):
    proc = _run("dgemma_rt.bench", str(tiny_dir), "--prompt-len", "8", "--new-tokens", "64", "--steps", "2",
                "--template", "0.25", "--warmup", "0", "--json")
    assert proc.returncode == 0, proc.stderr
    r = json.loads(proc.stdout)
    assert r["template_free_fraction"] == 0.25 and r["decoder_forwards"] == 2
    proc = _run("dgemma_rt.bench", str(tiny_dir), "--template", "0")
    assert proc.returncode == 2 and "(0, 1]" in proc.stderr


def test_bench_quant_nvfp4(tiny_dir):
    proc = _run("dgemma_rt.bench", str(tiny_dir), "--prompt-len", "8", "--new-tokens", "8", "--steps", "1",
                "--warmup", "0", "--quant", "nvfp4", "--dense-quant", "fp8", "--json")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    r = json.loads(proc.stdout)
    assert r["quant"] == "nvfp4" and r["dense_quant"] == "fp8"
    proc = _run("dgemma_rt.bench", str(tiny_dir), "--quant", "int3")
    assert proc.returncode != 0 and "--quant" in proc.stderr


def test_bench_random_weights(tmp_path, monkeypatch):
    monkeypatch.setenv("DGEMMA_RT_CACHE", str(tmp_path / "cache"))
    args = ("--random-weights", "--preset", "tiny", "--num-layers", "2", "--prompt-len", "8", "--new-tokens", "8",
            "--steps", "1", "--warmup", "0", "--quant", "nvfp4", "--json")
    proc = _run("dgemma_rt.bench", *args)
    assert proc.returncode == 0, proc.stderr
    r = json.loads(proc.stdout)
    assert r["random_weights"] and r["preset"] == "tiny" and r["num_layers"] == 2 and not r["tiny"]
    from dgemma_rt import presets

    # the plan, plus the encoder's copies of the two layer_scalar values (stored apart by transformers)
    assert r["weight_bytes"] == presets.weight_bytes(presets.preset("tiny", 2), "nvfp4")["total"] + 2 * 4
    # built once into the cache, reused by the next run
    (ck,) = (tmp_path / "cache").iterdir()
    stamp = (ck / "model-layer000.safetensors").stat().st_mtime_ns
    assert _run("dgemma_rt.bench", *args).returncode == 0
    assert (ck / "model-layer000.safetensors").stat().st_mtime_ns == stamp
    proc = _run("dgemma_rt.bench", str(tmp_path), "--random-weights")
    assert proc.returncode != 0 and "not both" in proc.stderr
    proc = _run("dgemma_rt.bench", "--num-layers", "2")
    assert proc.returncode != 0 and "--random-weights" in proc.stderr


def test_bench_device(tmp_path, tiny_dir):
    """--device goes to the Engine; a device this build cannot run is refused before a random checkpoint
    (tens of GB at the released shape) is written."""
    proc = _run("dgemma_rt.bench", str(tiny_dir), "--device", "cpu", "--prompt-len", "8", "--new-tokens", "8",
                "--steps", "1", "--warmup", "0", "--json")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["device"] == "cpu"
    env = dict(os.environ, DGEMMA_RT_CACHE=str(tmp_path / "cache"))
    proc = _run("dgemma_rt.bench", "--random-weights", "--preset", "tiny", "--device", "tpu", env=env)
    assert proc.returncode != 0 and "unknown device 'tpu'" in proc.stderr
    import dgemma_rt

    try:
        dgemma_rt.check_device("cuda")
    except ValueError as e:  # no CUDA backend or GPU here: refused with the engine's reason, nothing written
        proc = _run("dgemma_rt.bench", "--random-weights", "--preset", "tiny", "--device", "cuda", env=env)
        assert proc.returncode != 0 and str(e) in proc.stderr
    assert not (tmp_path / "cache").exists()


def test_bench_refuses_what_the_cpu_cannot_hold():
    from dgemma_rt import bench, presets

    # Weights as stored: 26B-A4B in BF16 is ~50 GB, with NVFP4 experts ~17.7 GB.
    with pytest.raises(ValueError, match="--num-layers"):
        bench.check_cpu_memory(presets.preset("26b-a4b"), avail=24 * 2**30)
    bench.check_cpu_memory(presets.preset("26b-a4b"), avail=24 * 2**30, quant="nvfp4")
    bench.check_cpu_memory(presets.preset("26b-a4b", 1), avail=24 * 2**30)  # ~2.9 GB: fits
    with pytest.raises(ValueError, match="as stored"):
        bench.check_cpu_memory(presets.preset("26b-a4b", 1), avail=2**30, stored_bytes=2 * 2**30)


def test_bench_roofline_lm_head_variants():
    # The model only (no checkpoint, no run): the default is the per-row LM head path the backend runs by
    # default; --fused-lm-head models DGEMMA_CUDA_FUSED_LM_HEAD=1.
    runs = {}
    for extra in ((), ("--fused-lm-head",)):
        proc = _run("dgemma_rt.bench", "--roofline", "--quant", "nvfp4", "--dense-quant", "fp8", "--json", *extra)
        assert proc.returncode == 0, proc.stderr
        runs[bool(extra)] = json.loads(proc.stdout)
    assert runs[False]["lm_head"] == "per-row" and runs[True]["lm_head"] == "fused"
    assert {o["op"] for o in runs[True]["ops"]} & {"lm_head", "sample_canvas", "soft_embedding"} == set()
    assert runs[True]["total"]["expected_ms"] < runs[False]["total"]["expected_ms"]


def test_bench_table(tiny_dir):
    proc = _run("dgemma_rt.bench", str(tiny_dir), "--prompt-len", "8", "--new-tokens", "8", "--steps", "1",
                "--warmup", "0", "--adaptive")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "tokens/s" in proc.stdout and "ms/step" in proc.stdout


def test_bench_tiny_cache_rebuilds_incomplete(tmp_path, monkeypatch, tiny_dir):
    from dgemma_rt import bench

    monkeypatch.setenv("DGEMMA_RT_CACHE", str(tmp_path))
    path = bench.tiny_checkpoint()
    assert path.parent == tmp_path and path.name.endswith(f"-{tiny.TINY_FORMAT_VERSION}")
    (path / "model.safetensors").unlink()  # as if a build was interrupted
    assert bench.tiny_checkpoint() == path
    for name in tiny.FILES:
        assert (path / name).read_bytes() == (tiny_dir / name).read_bytes()
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


def test_bench_prompts_avoid_image_token():
    from dgemma_rt.bench import random_prompts

    ids = random_prompts({"vocab_size": 8, "image_token_id": 5}, batch=2, length=500, seed=0)
    assert ids.shape == (2, 500) and set(np.unique(ids)) == {3, 4, 6, 7}
