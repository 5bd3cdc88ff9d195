"""ONNX export (dynamic axes) and an ONNX Runtime runner.

Export uses the TorchScript-based exporter (``dynamo=False``): it needs no extra
package and keeps named dynamic axes, e.g. the number of keyframes K.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Dict, Mapping, Optional, Sequence, Union

import numpy as np

from reloc_ros.backends.common import BackendError, BackendUnavailableError

__all__ = ["export_onnx", "OnnxRunner", "DEFAULT_OPSET"]

DEFAULT_OPSET = 17  # LayerNormalization is a native op from 17; TensorRT 10 parses it


def export_onnx(
    module,
    args: Sequence,
    path: Union[str, Path],
    input_names: Sequence[str],
    output_names: Sequence[str],
    dynamic_axes: Optional[Mapping[str, Mapping[int, str]]] = None,
    opset: int = DEFAULT_OPSET,
    check: bool = True,
) -> Path:
    """Export ``module(*args)`` to an ONNX file.

    args: example torch tensors (their dtypes fix the graph's input types).
    dynamic_axes: {tensor name: {axis: symbolic name}}, e.g. {'feat_kf': {0: 'K'}}.
    Weights are stored inside the file (single file up to 2 GB; larger models get an
    external-data file next to it). Returns the path. Raises BackendError on failure.
    """
    import torch

    import shutil
    import tempfile

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Export into a private folder: models over 2 GB come out as many external-data
    # files, which are then gathered into one '<name>.data' next to the graph.
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".onnx-export-") as tmpdir:
        tmp = Path(tmpdir) / "model.onnx"
        try:
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")  # tracer warnings on shape-derived Python ints
                torch.onnx.export(
                    module,
                    tuple(args),
                    str(tmp),
                    input_names=list(input_names),
                    output_names=list(output_names),
                    dynamic_axes={k: dict(v) for k, v in (dynamic_axes or {}).items()},
                    opset_version=opset,
                    do_constant_folding=True,
                    dynamo=False,
                )
        except Exception as e:
            raise BackendError(f"ONNX export of {type(module).__name__} failed: {e}") from e
        import onnx

        if len(list(Path(tmpdir).iterdir())) == 1:
            shutil.move(str(tmp), str(path))
        else:
            model = onnx.load(str(tmp))
            onnx.save_model(model, str(path), save_as_external_data=True, location=path.name + ".data")
    if check:
        onnx.checker.check_model(str(path))
    return path


class OnnxRunner:
    """Runs an ONNX file with ONNX Runtime.

    providers: ORT execution providers; default CUDA when ORT has it and ``device`` is
    'cuda', else CPU. threads: intra-op threads (0 = ORT default).
    ``run({name: np.ndarray}) -> {output name: np.ndarray}``.
    """

    def __init__(
        self,
        path: Union[str, Path],
        device: str = "cpu",
        providers: Optional[Sequence[str]] = None,
        threads: int = 0,
    ) -> None:
        try:
            import onnxruntime as ort
        except ImportError as e:  # pragma: no cover - onnxruntime is a dependency
            raise BackendUnavailableError("onnxruntime is not installed (pip install onnxruntime)") from e
        if providers is None:
            avail = ort.get_available_providers()
            if str(device).startswith("cuda"):
                if "CUDAExecutionProvider" not in avail:
                    raise BackendUnavailableError(
                        f"ONNX Runtime on device {device!r} needs onnxruntime-gpu; providers here: {avail}"
                    )
                providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
            else:
                providers = ["CPUExecutionProvider"]
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            so.intra_op_num_threads = int(threads)
        try:
            self.session = ort.InferenceSession(str(path), sess_options=so, providers=list(providers))
        except Exception as e:
            raise BackendError(f"ONNX Runtime cannot load {path}: {e}") from e
        self.path = Path(path)
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]
        self._input_types = {i.name: i.type for i in self.session.get_inputs()}

    def run(self, feeds: Mapping[str, np.ndarray]) -> Dict[str, np.ndarray]:
        """Run the graph; inputs are cast to the graph's declared dtypes."""
        missing = set(self.input_names) - set(feeds)
        if missing:
            raise BackendError(f"missing ONNX inputs {sorted(missing)}; graph takes {self.input_names}")
        cast = {}
        for name in self.input_names:
            arr = np.asarray(feeds[name])
            want = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64}.get(
                self._input_types[name]
            )
            cast[name] = np.ascontiguousarray(arr.astype(want, copy=False) if want else arr)
        outs = self.session.run(self.output_names, cast)
        return dict(zip(self.output_names, outs))
