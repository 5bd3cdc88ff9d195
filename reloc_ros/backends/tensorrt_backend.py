"""TensorRT engines built from ONNX, cached on disk, and run on CUDA torch tensors.

Uses the ``tensorrt`` module (TensorRT 10/11) or, when only that is installed,
``tensorrt_rtx`` (TensorRT for RTX; ``pip install tensorrt-rtx-cu12-libs
tensorrt-rtx-cu12-bindings``). Either needs an NVIDIA GPU and a CUDA build of torch.

Precision: the network is parsed strongly typed when the module supports it, so an
fp16 engine comes from an ONNX graph exported in fp16 (the Reloc3r runner exports the
backbone in fp16 and keeps the pose head in float32). Older TensorRT without strong
typing gets the FP16 builder flag instead.

Cache: ``<cache_dir>/<stem>-<key>.engine`` where the key hashes the model hash, the
ONNX file's bytes, the GPU name and compute capability, the TensorRT module and
version, and the optimisation profile. A different GPU or TensorRT version therefore
never loads a stale engine.
"""
from __future__ import annotations

import hashlib
import importlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Dict, Mapping, Optional, Tuple, Union

from reloc_ros.backends.common import BackendError, BackendUnavailableError

if TYPE_CHECKING:  # pragma: no cover
    import torch

__all__ = ["import_tensorrt", "engine_cache_key", "build_engine", "TensorRTRunner", "gpu_identity"]

Shape = Tuple[int, ...]
# {input name: (min shape, opt shape, max shape)}
Profile = Mapping[str, Tuple[Shape, Shape, Shape]]


def import_tensorrt():
    """The TensorRT Python module: ``tensorrt`` if importable, else ``tensorrt_rtx``.

    Raises BackendUnavailableError naming both when neither imports (with each error).
    """
    errors = []
    for name in ("tensorrt", "tensorrt_rtx"):
        try:
            mod = importlib.import_module(name)
            # The PyPI 'tensorrt' stub imports but has no Builder until NVIDIA's wheel is installed.
            if hasattr(mod, "Builder"):
                return mod
            errors.append(f"{name}: imported but has no Builder (stub package)")
        except Exception as e:  # ImportError, or a missing libnvinfer raising OSError
            errors.append(f"{name}: {type(e).__name__}: {e}")
    raise BackendUnavailableError(
        "TensorRT backend unavailable: neither 'tensorrt' nor 'tensorrt_rtx' can be imported ("
        + "; ".join(errors)
        + "). Install TensorRT for your GPU, e.g. `pip install tensorrt-rtx-cu12-libs tensorrt-rtx-cu12-bindings`, "
        "or use backend='onnxruntime' / 'torch'."
    )


def gpu_identity(device_index: int = 0) -> str:
    """'<GPU name>-sm<major><minor>' of a CUDA device (BackendUnavailableError without CUDA)."""
    import torch

    if not torch.cuda.is_available():
        raise BackendUnavailableError(f"TensorRT needs a CUDA GPU; torch {torch.__version__} sees none")
    name = torch.cuda.get_device_name(device_index)
    major, minor = torch.cuda.get_device_capability(device_index)
    return f"{name}-sm{major}{minor}"


def engine_cache_key(
    model_hash: str,
    onnx_path: Union[str, Path],
    gpu: str,
    trt_name: str,
    trt_version: str,
    profile: Optional[Profile] = None,
    precision: str = "fp16",
) -> str:
    """Hex key (20 chars) identifying an engine build; any input change gives a new key."""
    h = hashlib.blake2b(digest_size=10)
    h.update(json.dumps([model_hash, gpu, trt_name, trt_version, precision], sort_keys=True).encode())
    h.update(json.dumps({k: [list(s) for s in v] for k, v in sorted((profile or {}).items())}).encode())
    with open(onnx_path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def build_engine(
    onnx_path: Union[str, Path],
    cache_dir: Union[str, Path],
    model_hash: str,
    profile: Optional[Profile] = None,
    precision: str = "fp16",
    workspace_gb: float = 4.0,
    device_index: int = 0,
) -> Path:
    """Build (or reuse from ``cache_dir``) a serialized TensorRT engine for an ONNX file.

    profile: {input name: (min, opt, max) shapes} for the dynamic axes (e.g. K from 1
    to 20). precision: 'fp16' (graph exported in fp16) or 'fp32'. Returns the engine path.
    Raises BackendUnavailableError without TensorRT/GPU, BackendError when parsing or
    building fails (with the parser's messages).
    """
    trt = import_tensorrt()
    gpu = gpu_identity(device_index)
    key = engine_cache_key(model_hash, onnx_path, gpu, trt.__name__, getattr(trt, "__version__", "?"), profile, precision)
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    out = cache_dir / f"{Path(onnx_path).stem}-{key}.engine"
    if out.is_file() and out.stat().st_size > 0:
        return out
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    strongly = hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED")
    if strongly:
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        msgs = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise BackendError(f"TensorRT ({trt.__name__} {getattr(trt, '__version__', '?')}) cannot parse {onnx_path}: {msgs}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * (1 << 30)))
    if precision == "fp16" and not strongly and hasattr(trt.BuilderFlag, "FP16"):
        config.set_flag(trt.BuilderFlag.FP16)
    if profile:
        prof = builder.create_optimization_profile()
        for name, (mn, opt, mx) in profile.items():
            prof.set_shape(name, tuple(mn), tuple(opt), tuple(mx))
        config.add_optimization_profile(prof)
    blob = builder.build_serialized_network(network, config)
    if blob is None:
        raise BackendError(f"TensorRT engine build failed for {onnx_path} on {gpu} (see the TensorRT log above)")
    tmp = out.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        f.write(bytes(blob))
    tmp.replace(out)
    return out


class TensorRTRunner:
    """Runs a serialized engine on CUDA torch tensors (inputs/outputs stay on the GPU).

    ``run({name: torch.Tensor}) -> {output name: torch.Tensor}``; inputs are cast to the
    engine's input dtypes, dynamic shapes are set per call.
    """

    def __init__(self, engine_path: Union[str, Path], device_index: int = 0) -> None:
        import torch

        self.trt = import_tensorrt()
        gpu_identity(device_index)
        self.device = torch.device("cuda", device_index)
        logger = self.trt.Logger(self.trt.Logger.WARNING)
        self.runtime = self.trt.Runtime(logger)
        with open(engine_path, "rb") as f:
            self.engine = self.runtime.deserialize_cuda_engine(f.read())
        if self.engine is None:
            raise BackendError(f"cannot deserialize TensorRT engine {engine_path}")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        mode = self.trt.TensorIOMode.INPUT
        self.input_names = [n for n in names if self.engine.get_tensor_mode(n) == mode]
        self.output_names = [n for n in names if self.engine.get_tensor_mode(n) != mode]

    def _torch_dtype(self, name: str):
        import torch

        dt = self.engine.get_tensor_dtype(name)
        table = {
            self.trt.DataType.FLOAT: torch.float32,
            self.trt.DataType.HALF: torch.float16,
            self.trt.DataType.INT32: torch.int32,
            self.trt.DataType.INT64: torch.int64,
        }
        if hasattr(self.trt.DataType, "BF16"):
            table[self.trt.DataType.BF16] = torch.bfloat16
        return table[dt]

    def run(self, feeds: Mapping[str, "torch.Tensor"]) -> Dict[str, "torch.Tensor"]:
        import torch

        keep = {}
        for name in self.input_names:
            t = feeds[name].to(self.device, self._torch_dtype(name)).contiguous()
            keep[name] = t
            self.context.set_input_shape(name, tuple(t.shape))
            self.context.set_tensor_address(name, t.data_ptr())
        outs = {}
        for name in self.output_names:
            shape = tuple(self.context.get_tensor_shape(name))
            outs[name] = torch.empty(shape, dtype=self._torch_dtype(name), device=self.device)
            self.context.set_tensor_address(name, outs[name].data_ptr())
        stream = torch.cuda.current_stream(self.device)
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise BackendError("TensorRT execution failed")
        stream.synchronize()
        return outs
