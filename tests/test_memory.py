"""Host memory per batch row at the released vocabulary (262,144) and canvas (256).

The decoder step keeps everything vocabulary-sized inside the backend's fused LM head + sampler,
which works through a fixed number of positions at a time: an extra row costs its activations, its
self-conditioning state ([canvas, hidden]) and its sampler state, not [canvas, vocab] float arrays
(768 MiB per row before). Measured by dgemma-bench as the peak RSS of the generate calls (the
high-water mark is reset after loading) in separate processes, batch 4 against batch 1.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from dgemma_rt import presets

MAX_MIB_PER_ROW = 32

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self (Linux)")


@pytest.fixture(scope="module")
def wide_vocab(tmp_path_factory):
    return presets.write_random_checkpoint(tmp_path_factory.mktemp("wide-vocab") / "ckpt", presets.WIDE_VOCAB,
                                           eos_ids=[1])


def _bench(ckpt, batch: int) -> dict:
    # Two fixed steps: the second reads the self-conditioning state the first left in the backend.
    cmd = [sys.executable, "-m", "dgemma_rt.bench", str(ckpt), "--batch", str(batch), "--prompt-len", "8",
           "--new-tokens", "256", "--steps", "2", "--warmup", "0", "--json", "--no-progress"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_host_memory_per_extra_row_is_bounded(wide_vocab):
    one, four = _bench(wide_vocab, 1), _bench(wide_vocab, 4)
    assert one["generated_tokens"] == 256 and four["generated_tokens"] == 4 * 256
    per_row = (four["generate_peak_rss_mib"] - one["generate_peak_rss_mib"]) / 3
    print(f"peak RSS while generating: batch 1 {one['generate_peak_rss_mib']:.0f} MiB, batch 4 "
          f"{four['generate_peak_rss_mib']:.0f} MiB (after load {one['loaded_rss_mib']:.0f} MiB): "
          f"{per_row:.1f} MiB per extra row")
    assert per_row <= MAX_MIB_PER_ROW
