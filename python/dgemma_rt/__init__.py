"""dgemma_rt: an inference engine for DiffusionGemma (block diffusion on the Gemma 4 backbone)."""

import os as _os

# Idle OpenMP workers must not spin. libgomp spins up to GOMP_SPINCOUNT (300,000) iterations at every
# barrier before it sleeps: on a machine whose cores are busy with other work, a spinning worker takes
# the core that the thread it waits for needs, and a 3 s generate took 2 min. libgomp reads its
# settings once, when it is loaded, which is when _core is (a wheel's libgomp is its own copy, in
# dgemma_rt.libs): so a short spin count goes into the environment for that load only, and never over
# a user's own OMP_WAIT_POLICY / GOMP_SPINCOUNT.
_SPIN_COUNT = "1000"
_set_spin = not any(k in _os.environ for k in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT"))
if _set_spin:
    _os.environ["GOMP_SPINCOUNT"] = _SPIN_COUNT
try:
    from dgemma_rt._core import (CheckpointError, check_device, cpu_has_bf16_dot, cuda_compiled, cuda_device_count,
                                 cuda_status)
finally:
    if _set_spin:
        del _os.environ["GOMP_SPINCOUNT"]
from dgemma_rt.engine import (FREE, Engine, Event, GenerateOutput, KVCache, Request, RequestCancelled,
                              StopGeneration)

__version__ = "0.1.0"


def get_include() -> str:
    """Directory holding ``dgemma_rt/engine.h``, the embeddable C++ API (pass it with ``-I``)."""
    import os

    return os.path.join(os.path.dirname(__file__), "include")


def get_library_dir() -> str:
    """Directory holding ``libdgemma_core.a`` (link with ``-L<dir> -ldgemma_core -fopenmp -pthread``)."""
    import os

    return os.path.join(os.path.dirname(__file__), "lib")

__all__ = [
    "CheckpointError",
    "Engine",
    "FREE",
    "Event",
    "GenerateOutput",
    "KVCache",
    "Request",
    "RequestCancelled",
    "StopGeneration",
    "check_device",
    "cpu_has_bf16_dot",
    "cuda_compiled",
    "cuda_device_count",
    "cuda_status",
    "get_include",
    "get_library_dir",
    "__version__",
]
