"""The GPU peer's random model (bench._random_model_on), checked on the CPU: built straight on a device,
transformers' DiffusionGemma is two full copies until post_init ties the encoder to the decoder (~100 GB
at the 26B-A4B shape: more than an H100 holds). The meta-device build must give the same model a plain
build does (tied weights, the same buffers, parameters initialised like transformers does) with memory
for one copy only."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from dgemma_rt import bench, presets  # noqa: E402


def _config(tmp_path):
    shape = presets.preset("tiny")  # the same model class as 26b-a4b, so the same construction and ties
    (tmp_path / "config.json").write_text(json.dumps(presets.model_config(shape)))
    config = transformers.AutoConfig.from_pretrained(str(tmp_path))
    config._attn_implementation = "eager"
    config.text_config._attn_implementation = "eager"
    return config


def test_random_peer_model_is_a_plain_build_with_one_copy_of_each_weight(tmp_path):
    from transformers import DiffusionGemmaForBlockDiffusion

    config = _config(tmp_path)
    torch.manual_seed(0)
    ours = bench._random_model_on(torch, DiffusionGemmaForBlockDiffusion, config, "cpu", torch.bfloat16)
    torch.manual_seed(0)
    plain = DiffusionGemmaForBlockDiffusion._from_config(config, dtype=torch.bfloat16)
    enc, dec = ours.model.encoder.language_model, ours.model.decoder
    assert enc.layers[0].experts.gate_up_proj is dec.layers[0].experts.gate_up_proj  # tied, not copied
    assert ours.lm_head.weight is dec.embed_tokens.weight
    # every tie of the plain build holds, and there is no other storage: one copy of each weight
    ptrs = {p.data_ptr() for _, p in ours.named_parameters(remove_duplicate=False)}
    assert len(ptrs) == len(list(plain.parameters()))
    names = dict(ours.named_parameters())
    assert names.keys() == dict(plain.named_parameters()).keys()
    for n, p in plain.named_parameters():
        q = names[n]
        assert q.device.type == "cpu" and q.dtype == p.dtype and q.shape == p.shape, n
        a, b = q.detach().float(), p.detach().float()
        assert torch.isfinite(a).all(), n
        # the same initialisation: constants exactly, random tensors in distribution
        if b.numel() > 1 and float(b.std()) > 0:
            assert abs(float(a.std()) - float(b.std())) <= 0.1 * float(b.std()), n
            assert abs(float(a.mean()) - float(b.mean())) <= 0.1 * float(b.std()) + 1e-6, n
        else:
            np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=n)
    bufs = dict(ours.named_buffers())
    for n, b in plain.named_buffers():
        np.testing.assert_array_equal(bufs[n].float().numpy(), b.float().numpy(), err_msg=n)
