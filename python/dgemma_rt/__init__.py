"""dgemma_rt: an inference engine for DiffusionGemma (block diffusion on the Gemma 4 backbone)."""

from dgemma_rt._core import CheckpointError, check_device, cuda_compiled, cuda_device_count, cuda_status
from dgemma_rt.engine import FREE, Engine, Event, GenerateOutput, KVCache, Request, RequestCancelled

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
    "check_device",
    "cuda_compiled",
    "cuda_device_count",
    "cuda_status",
    "get_include",
    "get_library_dir",
    "__version__",
]
