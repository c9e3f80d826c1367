"""Session fixtures: tiny random checkpoints built once with transformers, plus their float32 reference models."""

from __future__ import annotations

import os
import signal
import sys
from dataclasses import dataclass
from typing import Any

import pytest

# A process started in the background without job control inherits SIGINT ignored, and the GPU check
# stops a step with SIGINT so that pytest still writes its JUnit file and summary: take it back.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

sys.path.insert(0, os.path.dirname(__file__))

SEED = 1234


def pytest_report_header(config):
    import dgemma_rt

    return f"dgemma_rt {dgemma_rt.__version__} from {os.path.dirname(dgemma_rt.__file__)} (CUDA compiled: {dgemma_rt.cuda_compiled()})"


def pytest_sessionstart(session):
    # .ci/run tests the installed wheel: DGEMMA_RT_EXPECT_PREFIX is its venv, and a dgemma_rt imported
    # from anywhere else (the source tree's python/) would make the run test something else.
    prefix = os.environ.get("DGEMMA_RT_EXPECT_PREFIX")
    if prefix:
        import dgemma_rt

        where = os.path.realpath(dgemma_rt.__file__)
        if not where.startswith(os.path.realpath(prefix) + os.sep):
            raise pytest.UsageError(f"dgemma_rt imported from {where}, not from the installed package under {prefix}")

# 7 layers, full attention at 3 and 6, different head sizes and KV head counts on sliding and full layers,
# partial rotary 0.25 of 24 (3 rotated angle pairs), a canvas that is not a power of two.
DEEP_OVERRIDES = dict(
    vocab_size=384,
    hidden_size=48,
    intermediate_size=80,
    num_hidden_layers=7,
    layer_types=["sliding_attention"] * 3 + ["full_attention"] + ["sliding_attention"] * 2 + ["full_attention"],
    num_attention_heads=4,
    num_key_value_heads=4,
    head_dim=8,
    global_head_dim=24,
    num_global_key_value_heads=2,
    sliding_window=6,
    num_experts=6,
    top_k_experts=3,
    moe_intermediate_size=16,
)


@dataclass
class Checkpoint:
    name: str
    path: str
    model: Any  # the float32 transformers reference, eager attention
    _model64: Any = None

    @property
    def model64(self):
        """The reference in float64 (built on first use)."""
        if self._model64 is None:
            from reference import double_reference

            self._model64 = double_reference(self.model)
        return self._model64

    @property
    def vocab_size(self) -> int:
        return self.model.config.text_config.vocab_size

    @property
    def canvas_length(self) -> int:
        return self.model.config.canvas_length

    @property
    def sliding_window(self) -> int:
        return self.model.config.text_config.sliding_window

    @property
    def num_layers(self) -> int:
        return self.model.config.text_config.num_hidden_layers


def _build(tmp_path_factory, name, **kwargs) -> Checkpoint:
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    # One thread: the tiny reference barely gains from two, and idle OpenMP workers would compete with the engine's.
    torch.set_num_threads(1)
    from reference import make_reference_checkpoint

    path = str(tmp_path_factory.mktemp(name))
    model = make_reference_checkpoint(path, seed=kwargs.pop("seed", SEED), **kwargs)
    return Checkpoint(name, path, model)


@pytest.fixture(scope="session")
def base_ckpt(tmp_path_factory) -> Checkpoint:
    return _build(tmp_path_factory, "base")


@pytest.fixture(scope="session")
def deep_ckpt(tmp_path_factory) -> Checkpoint:
    # Softer attention than base: at 0.5 this model's generations are full of near-ties (see near_tie_free).
    return _build(tmp_path_factory, "deep", canvas_length=12, seed=SEED + 1, qk_norm_scale=0.35, **DEEP_OVERRIDES)


@pytest.fixture(scope="session")
def bf16_ckpt(tmp_path_factory) -> Checkpoint:
    import torch

    # Same seed as base: the weights are base's rounded to bf16 (hidden 64: the sqrt(H) embedding scale is exact in
    # bf16; bf16_h48_ckpt is the case where it is not).
    return _build(tmp_path_factory, "bf16", dtype=torch.bfloat16)


@pytest.fixture(scope="session")
def bf16_h48_ckpt(tmp_path_factory) -> Checkpoint:
    import torch

    # Hidden 48: sqrt(48) = 6.9282 is 6.9375 in bf16, the scale transformers gives a bf16 checkpoint's embeddings
    # (as with the released model: sqrt(2816) = 53.07 is 53.0 in bf16).
    return _build(tmp_path_factory, "bf16_h48", dtype=torch.bfloat16, hidden_size=48)


@pytest.fixture(scope="session")
def sharded_ckpt(tmp_path_factory) -> Checkpoint:
    ckpt = _build(tmp_path_factory, "sharded", max_shard_size="300KB")
    assert os.path.exists(os.path.join(ckpt.path, "model.safetensors.index.json"))
    return ckpt


@pytest.fixture(scope="session")
def image_ckpt(tmp_path_factory, base_ckpt) -> Checkpoint:
    """Base weights with image_token_id = 7, inside the vocabulary."""
    from reference import copy_checkpoint, edit_json

    path = copy_checkpoint(base_ckpt.path, str(tmp_path_factory.mktemp("image") / "ckpt"))
    edit_json(os.path.join(path, "config.json"), lambda c: c.update(image_token_id=7))
    return Checkpoint("image", path, base_ckpt.model)


@pytest.fixture(scope="session")
def nopad_ckpt(tmp_path_factory, base_ckpt) -> Checkpoint:
    """Base weights whose generation_config.json has no pad_token_id: finished rows keep being denoised."""
    from reference import copy_checkpoint, load_reference, write_generation_config

    path = copy_checkpoint(base_ckpt.path, str(tmp_path_factory.mktemp("nopad") / "ckpt"))
    write_generation_config(path, pad_token_id=None)
    return Checkpoint("nopad", path, load_reference(path))


@pytest.fixture(scope="session")
def engine_for():
    """engine_for(ckpt, **kwargs) -> a dgemma_rt.Engine, cached per (checkpoint, kwargs) for the session."""
    import dgemma_rt

    cache = {}

    def get(ckpt: Checkpoint, **kwargs):
        key = (ckpt.path, tuple(sorted(kwargs.items())))
        if key not in cache:
            cache[key] = dgemma_rt.Engine(ckpt.path, **kwargs)
        return cache[key]

    yield get
    cache.clear()
