"""Engine(random_weights=seed): weights made at config.json's shape without reading a checkpoint."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest

import dgemma_rt
from dgemma_rt.tiny import make_tiny


@pytest.fixture(scope="module")
def config_only(tmp_path_factory):
    """A directory with the tiny model's config.json and nothing else."""
    src = make_tiny(tmp_path_factory.mktemp("tiny") / "ckpt")
    out = tmp_path_factory.mktemp("config-only")
    shutil.copy(os.path.join(src, "config.json"), out / "config.json")
    return str(out)


def _run(engine):
    return engine.generate([[5, 6, 7, 8]], max_new_tokens=8, max_denoising_steps=4, seed=1, eos_token_id=None)


def test_random_weights_need_no_safetensors(config_only):
    a = dgemma_rt.Engine(config_only, random_weights=3)
    assert a.num_parameters > 0
    out = _run(a)
    assert out.sequences.shape[1] > 4
    # The same seed is the same model, in another engine; another seed is another model.
    np.testing.assert_array_equal(_run(dgemma_rt.Engine(config_only, random_weights=3)).sequences, out.sequences)
    b = dgemma_rt.Engine(config_only, random_weights=4)
    state = a.encode([[5, 6, 7, 8]]), b.encode([[5, 6, 7, 8]])
    canvas = np.arange(a.config["canvas_length"])[None] % 50
    la = a.denoise_logits(state[0], canvas)
    lb = b.denoise_logits(state[1], canvas)
    assert np.isfinite(la).all() and not np.allclose(la, lb)


def test_without_random_weights_the_checkpoint_is_required(config_only):
    with pytest.raises(dgemma_rt.CheckpointError):
        dgemma_rt.Engine(config_only)


@pytest.mark.parametrize("seed", [-1, 2**64, 1.5, True, "7"])
def test_bad_seeds(config_only, seed):
    with pytest.raises(ValueError, match="random_weights"):
        dgemma_rt.Engine(config_only, random_weights=seed)


def test_dense_quantization_needs_a_checkpoint(config_only):
    with pytest.raises(ValueError, match="random_weights"):
        dgemma_rt.Engine(config_only, random_weights=1, dense_quant="fp8")


def test_random_nvfp4_experts(config_only):
    """quant='nvfp4' with random_weights: the experts are synthetic NVFP4 as a quantized checkpoint
    stores them (what the GPU benchmark of the 26B-A4B shape runs without writing 15 GB)."""
    a = dgemma_rt.Engine(config_only, random_weights=3, quant="nvfp4")
    b = dgemma_rt.Engine(config_only, random_weights=3)
    ids = [[5, 6, 7, 8]]
    canvas = np.arange(a.config["canvas_length"])[None] % 50
    la = a.denoise_logits(a.encode(ids), canvas)
    lb = b.denoise_logits(b.encode(ids), canvas)
    assert np.isfinite(la).all() and not np.allclose(la, lb)
    np.testing.assert_array_equal(_run(a).sequences, _run(dgemma_rt.Engine(config_only, random_weights=3,
                                                                           quant="nvfp4")).sequences)


def test_bench_random_config_is_config_only(tmp_path, monkeypatch):
    """dgemma-bench --random-weights on a GPU reads no checkpoint: the cached directory holds the
    preset's config.json and generation_config.json only, and the engine makes the weights."""
    from dgemma_rt import bench

    monkeypatch.setenv("DGEMMA_RT_CACHE", str(tmp_path))
    path = bench.random_config("tiny", 2)
    assert sorted(os.listdir(path)) == ["config.json", "generation_config.json"]
    engine = dgemma_rt.Engine(path, random_weights=0)
    assert engine.config["num_hidden_layers"] == 2
    assert _run(engine).sequences.shape[0] == 1
