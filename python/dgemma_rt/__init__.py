"""dgemma_rt: an inference engine for DiffusionGemma (block diffusion on the Gemma 4 backbone)."""

from dgemma_rt._core import CheckpointError, cuda_compiled, cuda_device_count
from dgemma_rt.engine import Engine, Event, GenerateOutput, KVCache, Request, RequestCancelled

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "Engine",
    "Event",
    "GenerateOutput",
    "KVCache",
    "Request",
    "RequestCancelled",
    "cuda_compiled",
    "cuda_device_count",
    "__version__",
]
