"""Names and checks shared by every backend."""
from __future__ import annotations

from reloc_ros.types import RelocError

BACKENDS = ("torch", "onnxruntime", "tensorrt")
PRECISIONS = ("fp32", "fp16", "bf16")

# Max abs difference of raw network outputs against PyTorch fp32 that the tests and
# the benchmark accept per precision (fp16/bf16 keep a float32 pose head).
TOLERANCE = {"fp32": 1e-4, "fp16": 5e-2, "bf16": 1e-1}


class BackendError(RelocError):
    """A backend failed on valid input (export, engine build, runtime)."""


class BackendUnavailableError(BackendError):
    """The requested backend, device or precision is not available on this machine."""


def resolve_dtype(precision: str):
    """torch dtype of a precision name ('fp32' | 'fp16' | 'bf16')."""
    import torch

    table = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    if precision not in table:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    return table[precision]


def resolve_device(device: str):
    """torch.device for 'cpu', 'cuda' or 'cuda:N'; BackendUnavailableError when CUDA is absent."""
    import torch

    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise BackendUnavailableError(f"device {device!r} requested but torch {torch.__version__} sees no CUDA GPU")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda[:N]', got {device!r}")
    return dev
