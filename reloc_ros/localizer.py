"""The per-query pipeline: features -> retrieval -> estimator -> fusion -> LocalizationResult.

This is the one entry point the ROS node and ``reloc-eval`` call. It never raises for
bad image content: a corrupt image, a camera that does not fit it, or a query with no
matches gives a result with status ERROR / NOT_LOCALIZED and a message.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Literal, Optional

import numpy as np

from reloc_ros.config import from_dict
from reloc_ros.estimators import Query, create
from reloc_ros.features import FeatureConfig, SiftExtractor
from reloc_ros.maps import KeyframeMap
from reloc_ros.retrieval import RetrievalConfig, create_descriptor
from reloc_ros.types import Camera, InvalidInputError, LocalizationResult, RelocError, Status

log = logging.getLogger("reloc_ros.localizer")


@dataclass
class LocalizerConfig:
    """Options of the localizer (the node's and reloc-eval's configuration).

    estimator: 'geometric' | 'reloc3r' | 'vggt-fused'.
    estimator_options: the estimator's own options (see its config dataclass).
    top_k: keyframes retrieved per query. 5 keeps the geometric path near its latency
        target on a 2-core CPU (matching cost is linear in it); raise it for maps with
        many near-duplicate or weakly overlapping keyframes.
    fusion: motion averaging of relative estimates: 'robust' (default; outlier
        rejection, degeneracy detection, covariance) or 'reloc3r' (the paper's median).
    averaging: options of the robust averaging (reloc_ros.averaging.AveragingConfig).
    features: query feature options; None = the map's build options (recommended).
    query_image_scale: query images are extracted at this fraction of the size the
        map's images were (after the ``max_image_size`` cap). 1.0 (the map's scale): it
        halved the error on the rendered room and cut it by a fifth to a quarter on KITTI
        and Strecha against 0.75 (bench/bench_core.py); 0.75 costs about 30 % less
        per query on 640x480 (SIFT doubles the image for its first octave, so extraction
        cost grows with pixels) where latency matters more than millimetres.
    max_position_std_m: a pose whose largest position standard deviation exceeds this
        is reported DEGENERATE (published only if confidence allows).
    ill_conditioned_rotation_std_deg: when the estimator distrusts its own absolute pose
        (``AbsoluteEstimate.ill_conditioned``: inliers in a small patch, or a rotation
        the 2D-2D geometry contradicts), its Jacobian covariance still looks confident;
        the localizer adds max_position_std_m^2 per position axis and this angle^2 per
        rotation axis, so a filter that receives the DEGENERATE pose does not trust it
        (PnP poses flagged so on 7-Scenes were 0.18-1.75 m / 2.6-36 deg off).
    prior_sigma, prior_min_radius_m, prior_max_angle_deg, prior_max_candidates: with a
        ``PosePrior`` (a tracked prediction or an operator hint), retrieval first ranks
        only keyframes whose centre lies within max(prior_min_radius_m, prior_sigma x the
        prior's largest position std) of the prior and whose optical axis is within
        prior_max_angle_deg (+ prior_sigma x its rotation std) of the prior's, at most the
        prior_max_candidates nearest (a k-d tree over keyframe centres: the cost does not
        grow with the map).
    prior_fallback: when the prior-guided attempt does not localize, retry with global
        retrieval (a wrong prior must not stop relocalization).
    """

    estimator: str = "geometric"
    estimator_options: Dict[str, Any] = field(default_factory=dict)
    top_k: int = 5
    fusion: Literal["robust", "reloc3r"] = "robust"
    averaging: Dict[str, Any] = field(default_factory=dict)
    features: Optional[FeatureConfig] = None
    query_image_scale: float = 1.0
    max_position_std_m: float = 0.5
    ill_conditioned_rotation_std_deg: float = 10.0
    prior_sigma: float = 3.0
    prior_min_radius_m: float = 1.0
    prior_max_angle_deg: float = 75.0
    prior_max_candidates: int = 200
    prior_fallback: bool = True

    def validate(self) -> None:
        from reloc_ros.estimators import available

        if self.estimator not in available():
            raise ValueError(f"estimator must be one of {available()}, got {self.estimator!r}")
        if self.top_k < 1:
            raise ValueError("top_k must be >= 1")
        if self.features is not None:
            self.features.validate()
        if not 0.1 <= self.query_image_scale <= 1.0:
            raise ValueError("query_image_scale must be in [0.1, 1]")  # as features.image_scale
        if not self.max_position_std_m > 0 or not self.ill_conditioned_rotation_std_deg > 0:
            raise ValueError("max_position_std_m and ill_conditioned_rotation_std_deg must be > 0")
        if not (self.prior_sigma > 0 and self.prior_min_radius_m >= 0 and 0 < self.prior_max_angle_deg <= 180):
            raise ValueError("prior_sigma must be > 0, prior_min_radius_m >= 0, prior_max_angle_deg in (0, 180]")
        if self.prior_max_candidates < 1:
            raise ValueError("prior_max_candidates must be >= 1")

    @classmethod
    def from_dict(cls, data: Optional[dict]) -> "LocalizerConfig":
        return from_dict(cls, data, "localizer")


@dataclass
class PosePrior:
    """Where the query camera probably is: a tracked prediction or an operator's hint.

    T_world_cam: [4, 4] camera-to-map. covariance: [6, 6] (x, y, z, rx, ry, rz) in the map
    frame, m^2 / rad^2 (the ``AbsoluteEstimate`` convention).
    """

    T_world_cam: np.ndarray
    covariance: np.ndarray


class Localizer:
    """Localizes query images against one loaded keyframe map."""

    def __init__(self, kmap: KeyframeMap, config: Optional[LocalizerConfig] = None):
        self.config = config or LocalizerConfig()
        self.config.validate()
        self.kmap = kmap
        build = kmap.manifest.get("build_config", {})
        fcfg = self.config.features or from_dict(FeatureConfig, build.get("features", {}), "features")
        fcfg = dataclasses.replace(fcfg, image_scale=self.config.query_image_scale)
        self.extractor = SiftExtractor(fcfg)
        self.descriptor = create_descriptor(from_dict(RetrievalConfig, build.get("retrieval", {}), "retrieval"))
        self.descriptor.load_state(kmap.descriptor_state)
        self.estimator = create(self.config.estimator, self.config.estimator_options)
        self.estimator.prepare(kmap)
        from reloc_ros.averaging import AveragingConfig

        self._averaging_config = from_dict(AveragingConfig, self.config.averaging, "averaging")
        from scipy.spatial import cKDTree

        self._centres = cKDTree(kmap.T_world_cam[:, :3, 3])

    @classmethod
    def from_map(cls, map_path: str | Path, config: Optional[LocalizerConfig] = None) -> "Localizer":
        """Load the map at ``map_path`` (MapError on failure) and set up the estimator."""
        return cls(KeyframeMap.load(map_path), config)

    # ------------------------------------------------------------------------------
    def localize(self, image: np.ndarray, camera: Camera, prior: Optional[PosePrior] = None) -> LocalizationResult:
        """Estimate T_world_cam of ``image`` ([H,W,3] uint8 RGB or [H,W] uint8) seen by ``camera``.

        prior: optional ``PosePrior``; retrieval then looks near it first (see
        LocalizerConfig.prior_*). ``result.retrieval`` says what was used: 'global',
        'prior', or 'prior+global' (the prior-guided attempt failed and global retrieval
        was tried).
        """
        t0 = time.perf_counter()
        timings: Dict[str, float] = {}
        name = self.config.estimator
        try:
            _check_query(image, camera)
            feats = self.extractor(image)
        except InvalidInputError as e:
            return LocalizationResult(Status.ERROR, message=str(e), estimator=name,
                                      timings_ms={"total": _ms(t0)})
        t1 = time.perf_counter()
        timings["features"] = _ms(t0, t1)
        if len(feats) < 8:
            return LocalizationResult(Status.NOT_LOCALIZED, message=f"only {len(feats)} local features in the query",
                                      estimator=name, timings_ms={**timings, "total": _ms(t0)})
        desc = self.descriptor.describe(feats)
        near = self.keyframes_near(prior, desc) if prior is not None else None
        res = None
        if near is not None and len(near):
            timings["retrieval.prior"] = _ms(t1)
            res = self._estimate(image, camera, feats, near, timings, time.perf_counter())
            res.retrieval = "prior"
            if res.localized or not self.config.prior_fallback:
                res.timings_ms["total"] = _ms(t0)
                return res
        t2 = time.perf_counter()
        ids, _ = self.kmap.index.search(desc, self.config.top_k)
        timings["retrieval"] = _ms(t2)
        if res is not None and set(ids.tolist()) <= set(near.tolist()):
            res.timings_ms["total"] = _ms(t0)
            return res  # global retrieval would try the same keyframes again
        out = self._estimate(image, camera, feats, ids, timings, time.perf_counter())
        out.retrieval = "global" if res is None else "prior+global"
        out.timings_ms["total"] = _ms(t0)
        return out

    def keyframes_near(self, prior: PosePrior, descriptor: Optional[np.ndarray] = None) -> np.ndarray:
        """Keyframe ids [<= top_k] near ``prior`` (see LocalizerConfig.prior_*), best first.

        Ranked by global-descriptor similarity when ``descriptor`` [D] is given, else by
        distance. Empty when no keyframe is near or the prior is not finite.
        """
        cfg = self.config
        T = np.asarray(prior.T_world_cam, dtype=np.float64)
        C = np.asarray(prior.covariance, dtype=np.float64)
        if T.shape != (4, 4) or C.shape != (6, 6) or not (np.all(np.isfinite(T)) and np.all(np.isfinite(C))):
            return np.zeros(0, np.int64)
        pos_std = float(np.sqrt(max(np.linalg.eigvalsh(0.5 * (C[:3, :3] + C[:3, :3].T)).max(), 0.0)))
        rot_std = float(np.sqrt(max(np.linalg.eigvalsh(0.5 * (C[3:, 3:] + C[3:, 3:].T)).max(), 0.0)))
        radius = max(cfg.prior_min_radius_m, cfg.prior_sigma * pos_std)
        k = min(cfg.prior_max_candidates, self.kmap.num_keyframes)
        dist, ids = self._centres.query(T[:3, 3], k=k, distance_upper_bound=radius)
        ids = np.atleast_1d(ids)[np.isfinite(np.atleast_1d(dist))].astype(np.int64)
        if not len(ids):
            return ids
        max_angle = np.radians(min(cfg.prior_max_angle_deg + np.degrees(cfg.prior_sigma * rot_std), 180.0))
        cos = self.kmap.T_world_cam[ids, :3, 2] @ T[:3, 2]
        ids = ids[cos >= np.cos(max_angle) - 1e-9]
        if descriptor is not None and len(ids) > cfg.top_k:
            sims = self.kmap.global_descriptors[ids] @ np.asarray(descriptor, dtype=np.float32).ravel()
            ids = ids[np.argsort(-sims, kind="stable")]
        return ids[:cfg.top_k]

    def _estimate(self, image, camera, feats, ids: np.ndarray, timings: Dict[str, float],
                  t2: float) -> LocalizationResult:
        """Estimator + fusion for one set of keyframes; fills the stage timings."""
        name = self.config.estimator
        timings = dict(timings)
        try:
            out = self.estimator.estimate(Query(image, camera, feats), [int(i) for i in ids], self.kmap)
        except RelocError as e:  # e.g. a learned backend refusing this input
            return LocalizationResult(Status.ERROR, message=f"{name}: {e}", estimator=name, timings_ms=timings)
        t3 = time.perf_counter()
        timings["estimate"] = timings.get("estimate", 0.0) + _ms(t2, t3)
        for key, v in out.timings_ms.items():
            timings[f"estimate.{key}"] = v
        res = self._fuse(out)
        timings["fusion"] = _ms(t3)
        res.timings_ms = timings
        res.estimator = name
        return res

    def _fuse(self, out) -> LocalizationResult:
        abs_est = out.absolute
        if abs_est is not None:
            std = float(np.sqrt(max(np.linalg.eigvalsh(abs_est.covariance[:3, :3]).max(), 0.0)))
            # Inliers saturate the confidence (unless the estimator has its own measure);
            # a large position uncertainty pulls it down.
            base = abs_est.confidence if abs_est.confidence is not None else abs_est.inliers / (abs_est.inliers + 30.0)
            conf = base / (1.0 + (std / self.config.max_position_std_m) ** 2)
            reasons = [abs_est.ill_conditioned] if abs_est.ill_conditioned else []
            if std > self.config.max_position_std_m:
                reasons.append(f"position std {std:.2f} m exceeds {self.config.max_position_std_m} m")
            status = Status.DEGENERATE if reasons else Status.OK
            cov = abs_est.covariance
            if abs_est.ill_conditioned:
                conf = min(conf, self._averaging_config.degenerate_max_confidence)
                floor = np.r_[np.full(3, self.config.max_position_std_m ** 2),
                              np.full(3, np.radians(self.config.ill_conditioned_rotation_std_deg) ** 2)]
                cov = cov + np.diag(floor)
            msg = "; ".join(reasons)
            return LocalizationResult(status, abs_est.T_world_cam, cov, float(conf), msg,
                                      list(abs_est.keyframe_ids), [abs_est.inliers])
        pairs = out.pairs
        if not pairs:
            return LocalizationResult(Status.NOT_LOCALIZED, message=out.message or "no usable keyframe pairs")
        from reloc_ros.averaging import fuse_pair_estimates, reloc3r_motion_averaging

        # The robust fusion also supplies the uncertainty, status and pair inliers for
        # the paper's median variant, which has no uncertainty model of its own.
        fr = fuse_pair_estimates(pairs, self.kmap.T_world_cam, self._averaging_config)
        used = [p for p, m in zip(pairs, fr.inlier_mask) if m]
        res = LocalizationResult(fr.status, fr.T_world_cam, fr.covariance, float(fr.confidence), fr.message,
                                 [p.keyframe_id for p in used], [p.inliers for p in used])
        if self.config.fusion == "reloc3r" and res.localized:
            T_world_kf = self.kmap.T_world_cam[[p.keyframe_id for p in pairs]]
            res.T_world_cam = reloc3r_motion_averaging(T_world_kf, np.stack([p.T_kf_query for p in pairs]))
            res.keyframe_ids = [p.keyframe_id for p in pairs]
            res.inliers = [p.inliers for p in pairs]
        return res


def _ms(a: float, b: Optional[float] = None) -> float:
    return ((b if b is not None else time.perf_counter()) - a) * 1e3


def _check_query(image: np.ndarray, camera: Camera) -> None:
    if not isinstance(image, np.ndarray) or image.ndim not in (2, 3) or image.size == 0:
        raise InvalidInputError(f"query image must be [H,W] or [H,W,C], got {getattr(image, 'shape', type(image))}")
    camera.validate()
    h, w = image.shape[:2]
    if (w, h) != (camera.width, camera.height):
        raise InvalidInputError(f"image is {w}x{h} but the camera says {camera.width}x{camera.height}")
