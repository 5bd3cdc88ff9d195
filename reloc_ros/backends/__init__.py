"""Inference backends: PyTorch (fp32/fp16/bf16), ONNX Runtime, TensorRT.

- :mod:`reloc_ros.backends.common`: precision names, device checks, errors.
- :mod:`reloc_ros.backends.onnx_backend`: generic ONNX export with dynamic axes and an
  ONNX Runtime runner.
- :mod:`reloc_ros.backends.tensorrt_backend`: TensorRT engine builder from ONNX with an
  on-disk cache keyed by model hash, GPU and TensorRT version (``tensorrt`` or
  ``tensorrt_rtx``), and a runner on CUDA torch tensors.
- :mod:`reloc_ros.backends.reloc3r_runner`: the Reloc3r network behind one interface
  (encode images, decode K pairs) for each backend.

Heavy modules (torch, onnxruntime, tensorrt) are imported by the submodules only.
"""
from reloc_ros.backends.common import (
    BACKENDS,
    PRECISIONS,
    BackendError,
    BackendUnavailableError,
    resolve_device,
    resolve_dtype,
)

__all__ = [
    "BACKENDS",
    "PRECISIONS",
    "BackendError",
    "BackendUnavailableError",
    "resolve_device",
    "resolve_dtype",
]
