"""A pytest plugin (``-p stand_in_cuda``, with tests/ on PYTHONPATH) that runs the backend-level GPU tests
on a machine without a GPU: device "cuda" becomes the CPU's graph-recording backend
(``_testing.register_stand_in_backend``) and ``cuda_compiled()`` / ``cuda_device_count()`` say yes, so
tests/test_cuda_backend.py and the "cuda" half of tests/test_backend_ops.py run their own code (inputs,
references, bounds, the engine's calls) end to end. The numbers are the CPU's, so this finds bugs in the
tests and the code around the kernels, not in the kernels. Tests that check what only the real backend
does (its environment variables, skipping without a GPU) skip under it: ``STAND_IN`` is set.
tests/test_stand_in_cuda.py runs it in CI."""

from __future__ import annotations

import os

import dgemma_rt
from dgemma_rt import _core

_core._testing.register_stand_in_backend("cuda")
dgemma_rt.cuda_compiled = lambda: True
dgemma_rt.cuda_device_count = lambda: 1
os.environ["DGEMMA_TEST_CUDA_STAND_IN"] = "1"
