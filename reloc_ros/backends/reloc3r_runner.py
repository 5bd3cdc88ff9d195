"""The Reloc3r network behind one interface for every backend.

Two stages, so that keyframe encoder tokens can be computed once at map build time:

- ``encode(img [B,3,H,W] in [-1,1]) -> tokens [B, N, enc_dim]`` (images in their own
  orientation; a portrait image is passed as portrait).
- ``pairs(feat_kf [K,N1,C], grid_kf, feat_q [1,N2,C], grid_q) -> (t [K,3], rot9 [K,9])``:
  decoder + pose head on K (keyframe, query) pairs in one batch, view1 = keyframe,
  view2 = query; the raw outputs of ``pose2`` (query -> keyframe). The SVD to SO(3)
  runs outside (``reloc_ros.models.reloc3r.raw_to_pose``).

Backends: 'torch' (fp32/fp16/bf16 on CPU or CUDA), 'onnxruntime' (fp32 graphs on CPU;
fp16 graphs with the CUDA provider), 'tensorrt' (fp16/fp32 engines on CUDA). ONNX files
and engines are written once under ``artifacts_dir`` with names keyed by the weights'
hash, the grid and the precision, and reused.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Dict, Optional, Tuple, Union

import torch
from torch import nn

from reloc_ros.backends.common import BACKENDS, PRECISIONS, BackendError, resolve_device, resolve_dtype
from reloc_ros.models.checkpoints import state_dict_hash
from reloc_ros.models.reloc3r import Reloc3rNet, patch_positions

log = logging.getLogger("reloc_ros.backends.reloc3r")

__all__ = ["Reloc3rRunner", "EncoderGraph", "PairsGraph", "FullGraph", "export_reloc3r_onnx"]

Grid = Tuple[int, int]


class EncoderGraph(nn.Module):
    """Exportable encoder: img [B,3,H,W] -> tokens [B, (H/16)(W/16), enc_dim] (after enc_norm)."""

    def __init__(self, net: Reloc3rNet) -> None:
        super().__init__()
        self.net = net

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        return self.net.encode_native(img)[0]


class PairsGraph(nn.Module):
    """Exportable decoder + head on token pairs for fixed patch grids.

    forward(feat_kf [K, h1*w1, C], feat_q [1|K, h2*w2, C]) -> (t [K,3], rot9 [K,9]) of
    pose2 (view 2 = query -> view 1 = keyframe), float32. K is dynamic.
    """

    def __init__(self, net: Reloc3rNet, grid_kf: Grid, grid_q: Grid) -> None:
        super().__init__()
        self.net = net
        self.grid_kf = tuple(grid_kf)
        self.grid_q = tuple(grid_q)

    def forward(self, feat_kf: torch.Tensor, feat_q: torch.Tensor):
        pos1 = patch_positions(*self.grid_kf, feat_kf.device).unsqueeze(0)
        pos2 = patch_positions(*self.grid_q, feat_q.device).unsqueeze(0)
        return self.net.pairs_raw(feat_kf, pos1, feat_q, pos2)


class FullGraph(nn.Module):
    """Exportable whole network (the authors' forward, both views in their own orientation).

    forward(img1 [K,3,H,W], img2 [K,3,H,W]) -> (t1, rot9_1, t2, rot9_2): raw head outputs
    of pose1 (1 -> 2) and pose2 (2 -> 1), [K,3] and [K,9], float32. K is dynamic.
    """

    def __init__(self, net: Reloc3rNet) -> None:
        super().__init__()
        self.net = net

    def forward(self, img1: torch.Tensor, img2: torch.Tensor):
        feat, pos = self.net.encode_native(torch.cat((img1, img2)))
        f1, f2 = feat.chunk(2)
        t2, r2, t1, r1 = self.net.pairs_raw(f1, pos[:1], f2, pos[:1], both=True)
        return t1, r1, t2, r2


def export_reloc3r_onnx(
    net: Reloc3rNet,
    kind: str,
    path: Union[str, Path],
    img_hw: Tuple[int, int] = (224, 224),
    grid_kf: Optional[Grid] = None,
    grid_q: Optional[Grid] = None,
    batch: int = 2,
) -> Path:
    """Export one Reloc3r graph to ONNX with a dynamic batch axis named 'K'.

    kind: 'encoder' (input 'img'), 'pairs' (inputs 'feat_kf' [K,..], 'feat_q' [1,..];
    outputs 't', 'rot9'), or 'full' (inputs 'img1', 'img2'; outputs 't1','rot9_1','t2','rot9_2').
    img_hw: example image size (H, W) for 'encoder'/'full' (the graph is exported for
    that size). grid_kf / grid_q: patch grids (h, w) for 'pairs' (default from img_hw).
    The graph's float dtype is the network's backbone dtype (fp16 after
    ``net.set_precision(torch.float16)``), the head always float32.
    """
    from reloc_ros.backends.onnx_backend import export_onnx

    # Trace with K >= 2 so that broadcasting one query over K keyframes is recorded as a
    # shape-dependent expand (a K = 1 trace would bake the broadcast away).
    batch = max(2, int(batch))
    dt = net.backbone_dtype
    dev = net.patch_embed.proj.weight.device
    p = net.config.patch_size
    H, W = img_hw
    grid_kf = tuple(grid_kf or (H // p, W // p))
    grid_q = tuple(grid_q or grid_kf)
    C = net.config.enc_embed_dim
    if kind == "encoder":
        args = (torch.zeros(batch, 3, H, W, dtype=dt, device=dev),)
        return export_onnx(EncoderGraph(net), args, path, ["img"], ["tokens"], {"img": {0: "K"}, "tokens": {0: "K"}})
    if kind == "pairs":
        args = (
            torch.zeros(batch, grid_kf[0] * grid_kf[1], C, dtype=dt, device=dev),
            torch.zeros(1, grid_q[0] * grid_q[1], C, dtype=dt, device=dev),
        )
        return export_onnx(
            PairsGraph(net, grid_kf, grid_q), args, path, ["feat_kf", "feat_q"], ["t", "rot9"],
            {"feat_kf": {0: "K"}, "t": {0: "K"}, "rot9": {0: "K"}},
        )
    if kind == "full":
        args = (torch.zeros(batch, 3, H, W, dtype=dt, device=dev), torch.zeros(batch, 3, H, W, dtype=dt, device=dev))
        outs = ["t1", "rot9_1", "t2", "rot9_2"]
        axes = {n: {0: "K"} for n in ["img1", "img2", *outs]}
        return export_onnx(FullGraph(net), args, path, ["img1", "img2"], outs, axes)
    raise ValueError(f"kind must be 'encoder', 'pairs' or 'full', got {kind!r}")


class Reloc3rRunner:
    """Runs a Reloc3r network's two stages on one backend.

    net: the network with its weights loaded (float32, CPU); the runner moves/casts it.
    backend: 'torch' | 'onnxruntime' | 'tensorrt'. precision: 'fp32' | 'fp16' | 'bf16'.
    device: 'cpu' or 'cuda[:N]'. artifacts_dir: where ONNX graphs / TensorRT engines are
    kept (required for 'onnxruntime' and 'tensorrt'). max_batch: largest K a TensorRT
    engine is built for. threads: ONNX Runtime intra-op threads (0 = default).
    Outputs are float32 CPU tensors.
    """

    def __init__(
        self,
        net: Reloc3rNet,
        backend: str = "torch",
        precision: str = "fp32",
        device: str = "cpu",
        artifacts_dir: Optional[Union[str, Path]] = None,
        model_hash: Optional[str] = None,
        max_batch: int = 32,
        threads: int = 0,
    ) -> None:
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        self.backend, self.precision = backend, precision
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(precision)
        if backend == "onnxruntime" and precision == "bf16":
            raise BackendError("ONNX Runtime runs Reloc3r in fp32 (CPU) or fp16 (CUDA provider), not bf16")
        if backend == "onnxruntime" and precision == "fp16" and self.device.type != "cuda":
            raise BackendError("fp16 ONNX graphs need the CUDA provider; use precision='fp32' on the CPU")
        if backend == "tensorrt" and precision == "bf16":
            raise BackendError("the TensorRT backend builds fp16 or fp32 engines")
        self.model_hash = model_hash or state_dict_hash(net.state_dict())
        self.max_batch = int(max_batch)
        self.threads = int(threads)
        self.artifacts_dir = Path(artifacts_dir) if artifacts_dir else None
        if backend != "torch" and self.artifacts_dir is None:
            raise ValueError(f"backend {backend!r} needs an artifacts_dir for its ONNX graphs / engines")
        if backend == "tensorrt":
            from reloc_ros.backends.tensorrt_backend import gpu_identity, import_tensorrt

            import_tensorrt()  # fail now, with the clear message, not at the first query
            gpu_identity(self.device.index or 0)
        net = net.eval()
        # The network used for tracing graphs stays on the CPU for ONNX Runtime
        # (export only); torch and TensorRT keep it on the target device.
        target = self.device if backend != "onnxruntime" else torch.device("cpu")
        export_dtype = self.dtype if backend != "onnxruntime" or precision == "fp16" else torch.float32
        self.net = net.to(target).set_precision(export_dtype)
        self._sessions: Dict[str, object] = {}

    # -- helpers
    @property
    def enc_dim(self) -> int:
        return self.net.config.enc_embed_dim

    def _artifact(self, stem: str) -> Path:
        assert self.artifacts_dir is not None
        self.artifacts_dir.mkdir(parents=True, exist_ok=True)
        return self.artifacts_dir / f"reloc3r-{self.model_hash}-{self.precision}-{stem}.onnx"

    def _session(self, kind: str, key: str, export_kwargs: dict):
        name = f"{kind}-{key}"
        sess = self._sessions.get(name)
        if sess is not None:
            return sess
        path = self._artifact(name)
        if not path.is_file():
            log.info("exporting Reloc3r %s graph to %s", kind, path)
            export_reloc3r_onnx(self.net, kind, path, **export_kwargs)
        if self.backend == "onnxruntime":
            from reloc_ros.backends.onnx_backend import OnnxRunner

            sess = OnnxRunner(path, device=str(self.device), threads=self.threads)
        else:
            from reloc_ros.backends.tensorrt_backend import TensorRTRunner, build_engine

            first = "img" if kind == "encoder" else "feat_kf"
            shape = _example_shape(kind, export_kwargs, self.enc_dim, self.net.config.patch_size)
            prof = {first: ((1, *shape[1:]), (min(10, self.max_batch), *shape[1:]), (self.max_batch, *shape[1:]))}
            engine = build_engine(path, self.artifacts_dir / "engines", self.model_hash, prof, self.precision,
                                  device_index=self.device.index or 0)
            sess = TensorRTRunner(engine, self.device.index or 0)
        self._sessions[name] = sess
        return sess

    # -- stages
    @torch.inference_mode()
    def encode(self, img: torch.Tensor) -> torch.Tensor:
        """Encoder tokens [B, N, enc_dim] (float32, CPU) of images [B,3,H,W] in [-1, 1]."""
        if self.backend == "torch":
            return self.net.encode_native(img.to(self.device, self.dtype))[0].float().cpu()
        H, W = img.shape[-2:]
        sess = self._session("encoder", f"{H}x{W}", {"img_hw": (H, W)})
        if self.backend == "onnxruntime":
            return torch.from_numpy(sess.run({"img": img.float().numpy()})["tokens"]).float()
        return sess.run({"img": img})["tokens"].float().cpu()

    @torch.inference_mode()
    def pairs(self, feat_kf: torch.Tensor, grid_kf: Grid, feat_q: torch.Tensor, grid_q: Grid):
        """Raw pose2 outputs (t [K,3], rot9 [K,9], float32 CPU) for K keyframes vs one query.

        feat_kf: [K, h1*w1, C] keyframe tokens; feat_q: [1, h2*w2, C] query tokens;
        grid_kf / grid_q: their patch grids (h, w).
        """
        K = feat_kf.shape[0]
        if feat_kf.shape[1] != grid_kf[0] * grid_kf[1] or feat_q.shape[1] != grid_q[0] * grid_q[1]:
            raise ValueError(f"token counts {feat_kf.shape[1]}, {feat_q.shape[1]} do not fit grids {grid_kf}, {grid_q}")
        if self.backend == "torch":
            dev, dt = self.device, self.dtype
            pos1 = patch_positions(*grid_kf, dev).unsqueeze(0)
            pos2 = patch_positions(*grid_q, dev).unsqueeze(0)
            t, r = self.net.pairs_raw(feat_kf.to(dev, dt), pos1, feat_q.to(dev, dt), pos2)
            return t.float().cpu(), r.float().cpu()
        if K > self.max_batch and self.backend == "tensorrt":
            outs = [self.pairs(feat_kf[i : i + self.max_batch], grid_kf, feat_q, grid_q) for i in range(0, K, self.max_batch)]
            return torch.cat([o[0] for o in outs]), torch.cat([o[1] for o in outs])
        key = f"{grid_kf[0]}x{grid_kf[1]}-{grid_q[0]}x{grid_q[1]}"
        sess = self._session("pairs", key, {"grid_kf": grid_kf, "grid_q": grid_q})
        if self.backend == "onnxruntime":
            out = sess.run({"feat_kf": feat_kf.float().numpy(), "feat_q": feat_q.float().numpy()})
            return torch.from_numpy(out["t"]).float(), torch.from_numpy(out["rot9"]).float()
        out = sess.run({"feat_kf": feat_kf, "feat_q": feat_q})
        return out["t"].float().cpu(), out["rot9"].float().cpu()


def _example_shape(kind: str, kw: dict, C: int, p: int) -> Tuple[int, ...]:
    if kind == "encoder":
        H, W = kw["img_hw"]
        return (1, 3, H, W)
    h, w = kw["grid_kf"]
    return (1, h * w, C)
