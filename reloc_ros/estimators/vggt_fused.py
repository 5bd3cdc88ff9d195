"""``vggt-fused``: the Reloc-VGGT multi-view fused estimator.

The query and its retrieved keyframes go through one Reloc-VGGT forward
(``reloc_ros.models.reloc_vggt``); the predicted cameras give the query pose either
directly in the map (``fusion='sim3'``: robust Sim(3) of the predicted keyframe poses
onto their known poses -> ``AbsoluteEstimate``) or as query-to-keyframe relative poses
for the localizer's motion averaging (``fusion='motion_averaging'`` -> ``PairEstimate``s,
translation direction only).

Weights are never downloaded: ``weights`` must point at a local checkpoint
(``facebook/VGGT-1B``'s ``model.pt`` or a safetensors copy, optionally with a trained
``pose_tokenizer.*``); random weights only with ``allow_random_weights=True`` (tests,
benchmarks).

Reference keyframe: the first keyframe of a query's list whose anchor (reference
keyframe and normalisation scale) is kept while the next queries still retrieve that
keyframe, so that keyframe pose tokens, and with them the ``cached`` keyframe states,
stay identical across consecutive queries.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Literal, Optional, Sequence, Tuple

import cv2
import numpy as np

import torch

from reloc_ros.backends.vggt_runner import RelocVGGTRunner
from reloc_ros.config import from_dict
from reloc_ros.estimators.base import Estimator, Query
from reloc_ros.models.reloc_vggt import (Sim3Config, build_reloc_vggt, encode_known_poses, predicted_T_ref_cam,
                                         relative_pairs, sim3_localize)
from reloc_ros.models.vggt import _IMAGENET_MEAN, _IMAGENET_STD, load_vggt_weights
from reloc_ros.types import AbsoluteEstimate, Camera, EstimatorOutput, InvalidInputError, PairEstimate

if TYPE_CHECKING:  # pragma: no cover
    from reloc_ros.maps import KeyframeMap

log = logging.getLogger("reloc_ros.estimators.vggt_fused")

__all__ = ["VGGTFusedConfig", "VGGTFusedEstimator", "network_size", "prepare_image", "prepared_intrinsics"]


@dataclass
class VGGTFusedConfig:
    """Options of the ``vggt-fused`` estimator.

    weights: local checkpoint path (VGGT-1B ``model.pt`` / ``.safetensors``); required
        unless ``allow_random_weights``.
    allow_random_weights: build with seeded random weights (tests and benchmarks only:
        the poses are meaningless).
    model_config: VGGT sizes, ``{}`` for VGGT-1B, or a fixture's ``config`` dict. Left
        empty with ``weights`` from ``reloc-train`` (``model.json`` beside the file), the
        trained architecture and tokenizer width are taken from that file.
    mask: global-attention mask 'dense' | 'star' | 'cached' (see docs/models_vggt.md).
    fusion: 'sim3' (AbsoluteEstimate) or 'motion_averaging' (PairEstimates for the
        localizer's robust motion averaging).
    image_width: network input width in pixels (multiple of 14; VGGT-1B was trained at 518).
        The height follows the query's aspect ratio, rounded to a multiple of 14 and at
        most ``image_width`` (taller images are centre-cropped, as VGGT's "crop" mode).
    max_keyframes: keyframes used per query (the first ones of the retrieval list).
    backend: 'torch' | 'onnxruntime' | 'tensorrt'. device: 'cpu' | 'cuda[:N]'.
    precision: 'fp32' | 'fp16' | 'bf16' (backbone; the camera head stays fp32).
    cache_capacity: keyframe states kept for the 'cached' mask.
    artifacts_dir: ONNX graphs / TensorRT engines (default: the map's cache dir).
    tokenizer_hidden: pose-tokenizer MLP width (must match a trained tokenizer's).
    seed: random-weight seed.
    sim3: Sim(3) alignment options (reloc_ros.models.reloc_vggt.Sim3Config).
    """

    weights: Optional[str] = None
    allow_random_weights: bool = False
    model_config: Dict[str, Any] = field(default_factory=dict)
    mask: Literal["dense", "star", "cached"] = "cached"
    fusion: Literal["sim3", "motion_averaging"] = "sim3"
    image_width: int = 518
    max_keyframes: int = 10
    backend: Literal["torch", "onnxruntime", "tensorrt"] = "torch"
    device: str = "cpu"
    precision: Literal["fp32", "fp16", "bf16"] = "fp32"
    cache_capacity: int = 32
    artifacts_dir: Optional[str] = None
    tokenizer_hidden: int = 256
    seed: int = 0
    sim3: Sim3Config = field(default_factory=Sim3Config)

    def validate(self) -> None:
        if self.weights is None and not self.allow_random_weights:
            raise ValueError("vggt-fused needs `weights` (a local VGGT checkpoint such as facebook/VGGT-1B's "
                             "model.pt; nothing is downloaded), or allow_random_weights=True for tests")
        if self.weights is not None and not Path(self.weights).is_file():
            raise ValueError(f"vggt-fused weights file {self.weights} does not exist")
        if self.image_width < 14 or self.image_width % 14:
            raise ValueError(f"image_width must be a positive multiple of 14, got {self.image_width}")
        if self.max_keyframes < 1:
            raise ValueError(f"max_keyframes must be >= 1, got {self.max_keyframes}")
        if self.cache_capacity < 0:
            raise ValueError(f"cache_capacity must be >= 0, got {self.cache_capacity}")
        self.sim3.validate()


def network_size(width: int, height: int, image_width: int = 518, patch: int = 14) -> Tuple[int, int]:
    """Network input (H, W) in pixels for a width x height image: W = image_width, H from
    the aspect ratio rounded to a multiple of ``patch``, capped at W (portrait images are
    then centre-cropped)."""
    h = int(round(height * image_width / width / patch)) * patch
    return max(patch, min(h, image_width)), image_width


def _crop_box(h: int, w: int, hw: Tuple[int, int]) -> Tuple[int, int, int, int]:
    """(x0, y0, crop width, crop height) of the centred crop of an h x w image to hw's aspect."""
    H, W = hw
    if w * H > h * W:  # too wide: crop columns
        cw, ch = max(1, int(round(h * W / H))), h
    else:
        cw, ch = w, max(1, int(round(w * H / W)))
    return (w - cw) // 2, (h - ch) // 2, cw, ch


def prepared_intrinsics(camera: Camera, hw: Tuple[int, int], image_hw: Optional[Tuple[int, int]] = None) -> np.ndarray:
    """Intrinsics [3, 3] (pixels) of an image after :func:`prepare_image` to hw = (H, W).

    camera: intrinsics of the original image; image_hw: its actual (h, w) when it differs
    from (camera.height, camera.width) (K is scaled to it first).
    """
    h, w = image_hw if image_hw is not None else (camera.height, camera.width)
    x0, y0, cw, ch = _crop_box(h, w, hw)
    K = np.asarray(camera.K, dtype=np.float64).copy()
    K[0] *= w / camera.width
    K[1] *= h / camera.height
    K[0, 2] -= x0
    K[1, 2] -= y0
    K[0] *= hw[1] / cw
    K[1] *= hw[0] / ch
    return K


def prepare_image(image: np.ndarray, camera: Camera, hw: Tuple[int, int]) -> Tuple[np.ndarray, np.ndarray]:
    """Centre-crop an image to the aspect ratio of hw = (H, W) and resize it to W x H
    (area averaging when shrinking, bicubic when enlarging).

    image: [h, w, 3] uint8 RGB or [h, w] grey. Returns (float32 [3, H, W] RGB in [0, 1],
    intrinsics [3, 3] of the result in pixels).
    """
    if not isinstance(image, np.ndarray) or image.ndim not in (2, 3) or image.size == 0 or image.dtype != np.uint8:
        raise InvalidInputError(f"image must be uint8 [H,W] or [H,W,3], got {getattr(image, 'shape', type(image))} "
                                f"{getattr(image, 'dtype', '')}")
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    if image.shape[2] != 3:
        raise InvalidInputError(f"image must have 3 channels, got {image.shape}")
    H, W = hw
    h, w = image.shape[:2]
    x0, y0, cw, ch = _crop_box(h, w, hw)
    crop = image[y0:y0 + ch, x0:x0 + cw]
    out = cv2.resize(crop, (W, H), interpolation=cv2.INTER_AREA if cw > W else cv2.INTER_CUBIC)
    return (np.ascontiguousarray(out.transpose(2, 0, 1), dtype=np.float32) / 255.0,
            prepared_intrinsics(camera, hw, (h, w)))


class VGGTFusedEstimator(Estimator):
    """Reloc-VGGT behind the estimator interface (see the module docstring).

    ``estimate(query, keyframe_ids, kmap)``: one network forward over the first
    ``max_keyframes`` keyframes and the query. Raises InvalidInputError for a bad query
    image or camera; returns an output with only a message when no pose can be formed.
    """

    name = "vggt-fused"

    def __init__(self, **options: Any) -> None:
        self.config: VGGTFusedConfig = from_dict(VGGTFusedConfig, options)
        cfg = self.config
        if cfg.weights is None:
            torch.manual_seed(cfg.seed)
            net = build_reloc_vggt(cfg.model_config, tokenizer_hidden=cfg.tokenizer_hidden,
                                   cache_capacity=cfg.cache_capacity)
            log.warning("vggt-fused runs with RANDOM weights (allow_random_weights): poses are meaningless")
        else:
            trained = _trained_meta(cfg.weights)
            if trained is not None and not cfg.model_config:
                # A reloc-train checkpoint carries its architecture in model.json beside it.
                cfg.model_config = dict(trained["arch"])
                cfg.tokenizer_hidden = int(trained["tokenizer_hidden"])
                log.info("vggt-fused: architecture from %s (trained at %s px, mask %s)",
                         Path(cfg.weights).parent / "model.json", trained.get("image_hw"), trained.get("mask"))
            net = build_reloc_vggt(cfg.model_config, device="meta", tokenizer_hidden=cfg.tokenizer_hidden,
                                   cache_capacity=cfg.cache_capacity)
            net = _materialize(net)
            chk = load_vggt_weights(net, cfg.weights, optional_prefixes=("pose_tokenizer.",))
            log.info("vggt-fused weights %s: %s", cfg.weights, chk.summary().splitlines()[0])
        self.net = net
        self._runner_args = dict(backend=cfg.backend, precision=cfg.precision, device=cfg.device, mask=cfg.mask,
                                 max_keyframes=max(cfg.max_keyframes, 1), cache_capacity=cfg.cache_capacity)
        self.runner: Optional[RelocVGGTRunner] = None
        if cfg.backend == "torch" or cfg.artifacts_dir:
            self.runner = RelocVGGTRunner(net, artifacts_dir=cfg.artifacts_dir, **self._runner_args)
        self._anchor: Optional[Tuple[int, float]] = None  # (reference keyframe id, scale in metres)
        self._map_key = ""

    def prepare(self, kmap: "KeyframeMap") -> None:
        self._map_key = str(Path(kmap.path).resolve())
        self._anchor = None
        if self.runner is None:
            self.runner = RelocVGGTRunner(self.net, artifacts_dir=kmap.cache_dir("vggt-fused"), **self._runner_args)

    def cache_info(self) -> Dict[str, int]:
        """Keyframe-state cache statistics of the active backend (entries, hits, misses, bytes)."""
        if self.runner is None:
            return {}
        return (self.runner.net.kv_cache if self.runner.backend == "torch" else self.runner.cache).info()

    def _choose_anchor(self, ids: List[int], T_world: np.ndarray) -> Tuple[List[int], float]:
        if self._anchor is None or self._anchor[0] not in ids:
            ref = ids[0]
            d = np.linalg.norm(T_world[ids, :3, 3] - T_world[ref, :3, 3], axis=1)
            d = d[np.array(ids) != ref]
            scale = float(d.mean()) if len(d) and d.mean() > 1e-9 else 1.0
            self._anchor = (ref, scale)
        ref, scale = self._anchor
        return [ref] + [i for i in ids if i != ref], scale

    def _forward(self, queries: Sequence[Query], keyframe_ids: Sequence[int], kmap: "KeyframeMap"
                 ) -> Tuple[List[int], Optional[np.ndarray], Dict[str, float]]:
        """One network forward over the first ``max_keyframes`` keyframes and the Q query
        views: (keyframe ids, reference first; predicted T_ref_cam [K+Q, 4, 4] or None when
        no keyframe was given; timings in ms)."""
        t0 = time.perf_counter()
        cfg = self.config
        if not queries:
            raise InvalidInputError("vggt-fused needs at least one query view")
        if self.runner is None or self._map_key != str(Path(kmap.path).resolve()):
            self.prepare(kmap)
        if self.runner.backend != "torch" and len(queries) > 1:
            raise InvalidInputError(f"several query views need the torch backend, not {self.runner.backend!r}")
        for q in queries:
            q.camera.validate()
            if not isinstance(q.image, np.ndarray) or q.image.ndim not in (2, 3):
                raise InvalidInputError(
                    f"query image must be [H,W] or [H,W,3], got {getattr(q.image, 'shape', type(q.image))}")
        ids = list(dict.fromkeys(int(i) for i in keyframe_ids))
        bad = [i for i in ids if not 0 <= i < kmap.num_keyframes]
        if bad:
            raise InvalidInputError(f"keyframe id {bad[0]} outside the map's {kmap.num_keyframes} keyframes")
        ids = ids[: cfg.max_keyframes]
        if not ids:
            return ids, None, {}
        T_world = kmap.T_world_cam
        ids, scale = self._choose_anchor(ids, T_world)
        img0 = queries[0].image
        hw = network_size(img0.shape[1], img0.shape[0], cfg.image_width, self.net.config.patch_size)
        views = np.stack([prepare_image(q.image, q.camera, hw)[0] for q in queries])
        # Keyframe intrinsics after the same crop/resize, without loading their images.
        kf_K = np.stack([prepared_intrinsics(kmap.cameras[i], hw) for i in ids])
        enc, _ = encode_known_poses(T_world[ids], kf_K, hw, scale=scale)

        def load(idx: Sequence[int]) -> torch.Tensor:
            return torch.from_numpy(np.stack([prepare_image(kmap.image(ids[j]), kmap.cameras[ids[j]], hw)[0]
                                              for j in idx]))

        keys = [(self._map_key, i) for i in ids]
        kf_src = load if cfg.mask == "cached" else load(range(len(ids)))[None]
        # one view keeps the single-query input [1, 3, H, W] every backend's graphs take
        q_in = torch.from_numpy(views[0])[None] if len(queries) == 1 else torch.from_numpy(views)[None]
        t1 = time.perf_counter()
        pose_enc = self.runner.predict(q_in, kf_src, torch.from_numpy(enc)[None], kf_keys=keys)
        t2 = time.perf_counter()
        return ids, predicted_T_ref_cam(pose_enc[0], hw), {"preprocess": (t1 - t0) * 1e3, "network": (t2 - t1) * 1e3}

    def _sim3(self, ids: List[int], T_ref_cam: np.ndarray, kmap: "KeyframeMap", timings: Dict[str, float]
              ) -> EstimatorOutput:
        """The query's pose from keyframes + one query row T_ref_cam [K+1, 4, 4] (robust Sim(3))."""
        t = time.perf_counter()
        res = sim3_localize(kmap.T_world_cam[ids], T_ref_cam, self.config.sim3)
        timings = {**timings, "fusion": (time.perf_counter() - t) * 1e3}
        if res.T_world_cam is None:
            return EstimatorOutput(message=f"vggt-fused: {res.message}", timings_ms=timings)
        used = [i for i, m in zip(ids, res.inlier_mask) if m]
        est = AbsoluteEstimate(res.T_world_cam, res.covariance, int(res.inlier_mask.sum()), used,
                               confidence=float(res.confidence))
        return EstimatorOutput(absolute=est, timings_ms=timings, message=res.message)

    def estimate(self, query: Query, keyframe_ids: Sequence[int], kmap: "KeyframeMap") -> EstimatorOutput:
        ids, T_ref_cam, timings = self._forward([query], keyframe_ids, kmap)
        if T_ref_cam is None:
            return EstimatorOutput(message="vggt-fused: no keyframes retrieved")
        if not np.all(np.isfinite(T_ref_cam)):
            return EstimatorOutput(message="vggt-fused: the network predicted non-finite poses", timings_ms=timings)
        if self.config.fusion == "motion_averaging":
            t = time.perf_counter()
            T_kf_q = relative_pairs(T_ref_cam)
            pairs = [PairEstimate(i, T_kf_q[j], 1.0, 0, False) for j, i in enumerate(ids)]
            timings["fusion"] = (time.perf_counter() - t) * 1e3
            return EstimatorOutput(pairs=pairs, timings_ms=timings)
        return self._sim3(ids, T_ref_cam, kmap, timings)

    def estimate_views(self, queries: Sequence[Query], keyframe_ids: Sequence[int], kmap: "KeyframeMap"
                       ) -> List[EstimatorOutput]:
        """Several views taken together (a rig capture's cameras) as one multi-view query:
        one forward over the keyframes and all Q views, each view attending to the others
        (every mask). Each view's camera pose comes from its own predicted row through the
        robust Sim(3) to the keyframes, as a single query's does. Returns one output per
        view (an absolute estimate, or only a message). Several views need the PyTorch
        backend (the exported ONNX / TensorRT graphs take one view): InvalidInputError."""
        ids, T_ref_cam, timings = self._forward(queries, keyframe_ids, kmap)
        if T_ref_cam is None:
            return [EstimatorOutput(message="vggt-fused: no keyframes retrieved") for _ in queries]
        K = len(ids)
        outs = []
        for v in range(len(queries)):
            T_v = np.concatenate([T_ref_cam[:K], T_ref_cam[K + v: K + v + 1]])
            if not np.all(np.isfinite(T_v)):
                outs.append(EstimatorOutput(message="vggt-fused: the network predicted non-finite poses",
                                            timings_ms=dict(timings)))
            else:
                outs.append(self._sim3(ids, T_v, kmap, dict(timings)))
        return outs


def _trained_meta(weights: str) -> Optional[Dict[str, Any]]:
    """model.json of a ``reloc-train`` checkpoint beside ``weights`` (None when absent or
    not a Reloc-VGGT training output)."""
    import json

    p = Path(weights).parent / "model.json"
    if not p.is_file():
        return None
    try:
        meta = json.loads(p.read_text())
    except ValueError:
        return None
    if not isinstance(meta, dict) or not str(meta.get("format", "")).startswith("reloc_ros.training"):
        return None
    return meta if meta.get("kind") == "reloc_vggt" else None


def _materialize(net):
    """Allocate a meta-built Reloc-VGGT on the CPU without random initialisation (the
    checkpoint overwrites every VGGT weight), restoring buffers and the tokenizer."""
    net = net.to_empty(device="cpu")
    agg = net.aggregator
    agg._mean.copy_(torch.tensor(_IMAGENET_MEAN).view(1, 1, 3, 1, 1))
    agg._std.copy_(torch.tensor(_IMAGENET_STD).view(1, 1, 3, 1, 1))
    net.pose_tokenizer.reset_parameters()
    return net
