"""Multi-camera rigs: localize a body (``base_link``) from all its cameras at once.

A rig is a set of named cameras, each with intrinsics and a fixed extrinsic
``T_base_cam`` (camera optical frame -> body frame, metres, OpenCV camera axes; in ROS
the TF ``base_link -> camera_i_optical_frame``). One *capture* is the set of images the
cameras took at (about) the same time; cameras may be missing from it, blank, or
unusable, and the rest still localize the body.

Geometric path (``estimator='geometric'``), what ``RigLocalizer.localize`` does:

1. every usable camera is checked (intrinsics valid, extrinsic a rigid transform,
   image of the camera's size); the others are excluded with a reason;
2. local features and retrieval run per camera (the map's FAISS index), and every
   camera is matched 2D-3D against its own retrieved keyframes; the keyframe sets are
   merged into one set of 2D-3D correspondences over all cameras;
3. the body pose is one generalized absolute pose (PoseLib generalized P3P LO-RANSAC +
   non-linear refinement over all cameras' reprojection errors), so a camera with a
   handful of matches still contributes and no single camera needs
   ``pnp_min_inliers`` of its own;
4. the covariance combines every camera's residual model (the variance components of
   ``estimators.geometric.pnp_covariance``, computed per camera and mapped to the body):
   with one camera it is exactly the single-camera PnP covariance moved to the body;
5. the DEGENERATE checks of the single-camera path, generalised: the inliers must span
   ``min_inlier_extent`` of some camera's image, or come from at least two cameras
   looking >= ``min_spread_angle_deg`` apart (patches seen in different directions
   constrain the body as a wide view does); the pose must agree with the 5-point
   relative rotations to the keyframes with most inliers (over all cameras);
6. without enough 2D-3D inliers (mode ``auto``) or in mode ``essential``: 5-point
   relative poses of every camera to its keyframes, turned into body-to-keyframe pairs
   and fused by the robust motion averaging (``averaging.fuse_pair_estimates``) with
   each keyframe shifted by the camera's lever arm (see ``_essential``).

Learned estimators (``reloc3r``, ``vggt-fused``): each camera is localized by the
single-camera ``Localizer`` and the body poses it implies are fused by an information-
weighted average with a chi-square gate (``fuse_body_poses``).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Dict, List, Literal, Optional, Sequence, Tuple

import numpy as np
import poselib

from reloc_ros.config import from_dict
from reloc_ros.estimators.base import Query
from reloc_ros.estimators.geometric import GeometricConfig, inlier_extent, pnp_covariance
from reloc_ros.features import match_descriptors, root_sift, undistort_keypoints
from reloc_ros.geometry import check_pose, invert, make_T, rotation_angle_deg, skew, so3_exp, so3_log
from reloc_ros.localizer import Localizer, LocalizerConfig, PosePrior
from reloc_ros.maps import KeyframeMap
from reloc_ros.types import Camera, InvalidInputError, LocalizationResult, PairEstimate, PosedFrame, Status

log = logging.getLogger("reloc_ros.rig")

__all__ = ["RigCamera", "Rig", "CameraView", "RigFrame", "RigConfig", "CameraReport", "RigLocalizationResult",
           "RigLocalizer", "fuse_body_poses", "body_to_camera_covariance", "camera_to_body_covariance"]

# chi-square 0.999 quantile, 6 dof: one good per-camera pose in a thousand is gated out.
_CHI2_6_999 = 22.458


# ------------------------------------------------------------------------- rig model


@dataclass
class RigCamera:
    """One camera of a rig.

    name: unique within the rig (e.g. 'front'; the node uses the camera's namespace).
    camera: intrinsics of the images this camera delivers.
    T_base_cam: [4, 4] camera optical frame -> body frame (metres).
    """

    name: str
    camera: Camera
    T_base_cam: np.ndarray

    def __post_init__(self) -> None:
        self.T_base_cam = np.asarray(self.T_base_cam, dtype=np.float64)

    def validate(self) -> None:
        """InvalidInputError naming the camera when its name, intrinsics or extrinsic is unusable."""
        if not isinstance(self.name, str) or not self.name:
            raise InvalidInputError(f"rig camera name must be a non-empty string, got {self.name!r}")
        try:
            self.camera.validate()
            self.T_base_cam = check_pose(self.T_base_cam, f"extrinsic T_base_cam of camera {self.name!r}")
        except InvalidInputError as e:
            raise InvalidInputError(f"camera {self.name!r}: {e}") from e


@dataclass
class Rig:
    """Named cameras with fixed extrinsics to the body frame; names are unique."""

    cameras: List[RigCamera]

    def validate(self) -> None:
        if not self.cameras:
            raise InvalidInputError("a rig needs at least one camera")
        names = [c.name for c in self.cameras]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise InvalidInputError(f"rig camera names must be unique, repeated: {dup}")
        for c in self.cameras:
            c.validate()

    @property
    def names(self) -> List[str]:
        return [c.name for c in self.cameras]

    def __getitem__(self, name: str) -> RigCamera:
        for c in self.cameras:
            if c.name == name:
                return c
        raise KeyError(f"no camera {name!r} in the rig (cameras: {self.names})")

    def capture(self, images: Dict[str, Optional[np.ndarray]]) -> List["CameraView"]:
        """One capture from {camera name: image}; the rig supplies intrinsics and extrinsics."""
        return [CameraView(n, img, self[n].camera, self[n].T_base_cam) for n, img in images.items()]


@dataclass
class CameraView:
    """One camera's image in a rig capture.

    image: [H, W, 3] uint8 RGB or [H, W] uint8, or None (the camera delivered nothing).
    camera: its intrinsics; T_base_cam: [4, 4] its extrinsic (None when TF had none).
    stamp: seconds, informative only (grouping by stamp is the caller's job).
    """

    name: str
    image: Optional[np.ndarray]
    camera: Optional[Camera] = None
    T_base_cam: Optional[np.ndarray] = None
    stamp: Optional[float] = None


@dataclass
class RigFrame(PosedFrame):
    """A PosedFrame taken by one camera of a rig: ``camera_id`` names it and
    ``T_world_base`` [4, 4] is the body pose at that moment (``T_world_cam`` =
    ``T_world_base @ T_base_cam``). ``maps.build_map`` stores both per keyframe."""

    camera_id: str = ""
    T_world_base: Optional[np.ndarray] = None


# --------------------------------------------------------------------- pose algebra


def _lever(T_world_base: np.ndarray, T_base_cam: np.ndarray) -> np.ndarray:
    """A [6, 6]: body perturbation (dc, dtheta) -> camera perturbation, both centre + left
    rotation in the world frame. The camera centre moves by dc + dtheta x a, a = R_wb t_bc."""
    a = T_world_base[:3, :3] @ T_base_cam[:3, 3]
    A = np.eye(6)
    A[:3, 3:] = -skew(a)
    return A


def body_to_camera_covariance(cov_base: np.ndarray, T_world_base: np.ndarray, T_base_cam: np.ndarray) -> np.ndarray:
    """[6, 6] covariance of T_world_cam from that of T_world_base (world frame, centre + left rotation)."""
    A = _lever(T_world_base, T_base_cam)
    return A @ cov_base @ A.T


def camera_to_body_covariance(cov_cam: np.ndarray, T_world_base: np.ndarray, T_base_cam: np.ndarray) -> np.ndarray:
    """[6, 6] covariance of T_world_base from that of one camera's T_world_cam."""
    Ai = np.linalg.inv(_lever(T_world_base, T_base_cam))
    C = Ai @ cov_cam @ Ai.T
    return 0.5 * (C + C.T)


def _pose_delta(T: np.ndarray, T_ref: np.ndarray) -> np.ndarray:
    """[6] (centre difference, rotation vector of R R_ref^T): T relative to T_ref in the
    covariance convention (world frame, left rotation)."""
    return np.r_[T[:3, 3] - T_ref[:3, 3], so3_log(T[:3, :3] @ T_ref[:3, :3].T)]


def _apply_delta(T_ref: np.ndarray, d: np.ndarray) -> np.ndarray:
    return make_T(so3_exp(d[3:]) @ T_ref[:3, :3], T_ref[:3, 3] + d[:3])


def fuse_body_poses(T_world_base: Sequence[np.ndarray], covariances: Sequence[np.ndarray],
                    gate_chi2: float = _CHI2_6_999) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Information-weighted average of n body-pose estimates, after a consensus gate.

    T_world_base: n [4, 4]; covariances: n [6, 6] (world frame, centre + left rotation).
    Two estimates agree when their difference has Mahalanobis distance <= ``gate_chi2``
    under the sum of their covariances. The largest set of estimates that agree with one
    of them (ties: the most information) is averaged in the tangent space of its most
    certain member, by Gauss-Newton. A greedy "drop the worst from the average of all"
    fails here: one wrong but confident camera pulls the average onto itself and the
    right ones are dropped. Returns (T [4, 4], covariance [6, 6], kept mask [n]). The
    estimates are treated as independent: cameras localized against one map share its
    errors, so the covariance may be optimistic by up to sqrt(n).
    """
    Ts = [np.asarray(T, np.float64) for T in T_world_base]
    Cs = [0.5 * (np.asarray(C, np.float64) + np.asarray(C, np.float64).T) for C in covariances]
    n = len(Ts)
    if n == 0:
        raise InvalidInputError("fuse_body_poses needs at least one estimate")
    Ws = [np.linalg.pinv(C) for C in Cs]
    agree = np.eye(n, dtype=bool)
    for i in range(n):
        for j in range(i + 1, n):
            e = _pose_delta(Ts[j], Ts[i])
            agree[i, j] = agree[j, i] = float(e @ np.linalg.pinv(Cs[i] + Cs[j]) @ e) <= gate_chi2
    info = np.array([np.trace(W) for W in Ws])
    best = max(range(n), key=lambda i: (int(agree[i].sum()), float(info[agree[i]].sum())))
    keep = agree[best].copy()
    idx = np.nonzero(keep)[0]
    ref = Ts[int(idx[np.argmax(info[idx])])]
    H = sum(Ws[i] for i in idx)
    for _ in range(3):  # re-linearise about the current average
        x = np.linalg.solve(H, sum(Ws[i] @ _pose_delta(Ts[i], ref) for i in idx))
        ref = _apply_delta(ref, x)
    C = np.linalg.inv(H)
    return ref, 0.5 * (C + C.T), keep


# -------------------------------------------------------------------------- results


@dataclass
class CameraReport:
    """What one camera of a capture contributed (diagnostics for the node and reloc-eval).

    state: 'used' (contributed inliers), 'no_inliers' (usable but nothing matched or no
    inlier), 'no_features' (blank or texture-less image), 'excluded' (unusable input:
    missing extrinsic, invalid intrinsics, wrong image size, unknown or repeated name).
    reason: why, when not 'used'. keyframe_ids: keyframes retrieved for it. matches:
    2D-3D matches (geometric path); inliers: its inliers of the rig pose; extent: the
    image fraction its inliers span (``geometric.inlier_extent``). warning: set when a
    used camera's matches fit the rig pose far worse than the others' (a wrong extrinsic
    or intrinsics shows so: its observations are then mostly outliers).
    """

    name: str
    state: str
    reason: str = ""
    features: int = 0
    keyframe_ids: List[int] = field(default_factory=list)
    matches: int = 0
    inliers: int = 0
    extent: float = 0.0
    rms_reprojection_px: float = float("nan")
    warning: str = ""


@dataclass
class RigLocalizationResult:
    """One result per rig capture.

    T_world_base: [4, 4] body-to-map pose (None unless OK / DEGENERATE).
    covariance: [6, 6] (x, y, z, rx, ry, rz) of the body in the map frame, m^2 / rad^2,
    rotation as a left perturbation (the ``LocalizationResult`` convention).
    cameras: one ``CameraReport`` per camera view of the capture, in capture order.
    keyframe_ids / inliers: the merged keyframes that hold inliers and their inlier counts.
    method: 'generalized_pnp', 'essential' or 'per_camera_fusion' (learned estimators).
    retrieval: 'global', 'prior' or 'prior+global' (as ``LocalizationResult.retrieval``).
    """

    status: Status
    T_world_base: Optional[np.ndarray] = None
    covariance: Optional[np.ndarray] = None
    confidence: float = 0.0
    message: str = ""
    cameras: List[CameraReport] = field(default_factory=list)
    keyframe_ids: List[int] = field(default_factory=list)
    inliers: List[int] = field(default_factory=list)
    timings_ms: Dict[str, float] = field(default_factory=dict)
    estimator: str = ""
    method: str = ""
    retrieval: str = "global"

    @property
    def localized(self) -> bool:
        return self.status in (Status.OK, Status.DEGENERATE) and self.T_world_base is not None

    @property
    def used_cameras(self) -> List[str]:
        return [c.name for c in self.cameras if c.state == "used"]

    def as_localization_result(self) -> LocalizationResult:
        """The same result as a ``LocalizationResult`` whose ``T_world_cam`` holds the
        *body* pose, for code that scores or publishes single poses (reloc_ros.evaluation,
        the node's fix path): the tracked frame is then base_link itself."""
        return LocalizationResult(self.status, self.T_world_base, self.covariance, self.confidence, self.message,
                                  list(self.keyframe_ids), list(self.inliers), dict(self.timings_ms),
                                  self.estimator)


# ------------------------------------------------------------------------ localizer


@dataclass
class RigConfig:
    """Options of rig localization (besides the ``LocalizerConfig`` it shares).

    min_spread_inliers: a camera counts towards the spread check below only with at
        least this many inliers.
    min_spread_angle_deg: when no camera's inliers span ``min_inlier_extent`` of its
        image, the pose is still well conditioned if two cameras that count look at least
        this far apart (angle between their optical axes): tilt no longer trades against
        translation when the patches are seen in different directions. 30 deg is half the
        demo camera's field of view.
    pnp_min_inliers: generalized-PnP inliers needed over the whole rig; None = the
        geometric estimator's ``pnp_min_inliers`` (same evidence as one camera needs).
    fusion_gate_chi2: per-camera fusion (learned estimators): Mahalanobis gate of a
        camera's body pose against the fused one (default: chi-square 6 dof, 0.999).
    extrinsic_rotation_std_deg, extrinsic_translation_std_m: calibration uncertainty of
        every camera's T_base_cam (per axis), added to the generalized-PnP covariance: an
        extrinsic error of camera i moves all its observations together, so it does not
        average down with its inlier count. 0 (default) adds nothing, as the single-camera
        path has no extrinsic; set them from the calibration report of the rig.
    method: 'auto' (generalized pose for the geometric estimator, the multi-view query
        for estimators that take several query views (``vggt-fused``), per-camera fusion
        for the others, e.g. ``reloc3r``), 'generalized' (geometric estimator only),
        'multi_view' (the capture's views as one query of the network; keyframes retrieved
        per camera and merged; each view's camera pose moved to the body and fused) or
        'per_camera' (any estimator: each camera localized alone, body poses fused).
    """

    min_spread_inliers: int = 6
    min_spread_angle_deg: float = 30.0
    pnp_min_inliers: Optional[int] = None
    fusion_gate_chi2: float = _CHI2_6_999
    extrinsic_rotation_std_deg: float = 0.0
    extrinsic_translation_std_m: float = 0.0
    method: Literal["auto", "generalized", "multi_view", "per_camera"] = "auto"

    def validate(self) -> None:
        if self.min_spread_inliers < 1:
            raise ValueError("rig.min_spread_inliers must be >= 1")
        if not 0.0 < self.min_spread_angle_deg < 180.0:
            raise ValueError("rig.min_spread_angle_deg must be in (0, 180)")
        if self.pnp_min_inliers is not None and self.pnp_min_inliers < 4:
            raise ValueError("rig.pnp_min_inliers must be >= 4 (or None)")
        if not self.fusion_gate_chi2 > 0:
            raise ValueError("rig.fusion_gate_chi2 must be > 0")
        if not (self.extrinsic_rotation_std_deg >= 0 and self.extrinsic_translation_std_m >= 0):
            raise ValueError("rig.extrinsic_rotation_std_deg and rig.extrinsic_translation_std_m must be >= 0")
        if self.method not in ("auto", "generalized", "multi_view", "per_camera"):
            raise ValueError(f"rig.method must be 'auto', 'generalized', 'multi_view' or 'per_camera', "
                             f"got {self.method!r}")

    @classmethod
    def from_dict(cls, data: Optional[dict]) -> "RigConfig":
        return from_dict(cls, data, "rig")


@dataclass
class _CamData:
    """Per-camera working state of one capture."""

    idx: int  # index in the capture (and in the reports)
    name: str
    camera: Camera
    T_base_cam: np.ndarray
    image: np.ndarray
    kp: np.ndarray = None  # undistorted keypoints [N, 2]
    root: np.ndarray = None  # RootSIFT [N, 128]
    kf_ids: np.ndarray = None  # keyframes of the current attempt
    near: np.ndarray = None  # keyframes near the prior
    glob: np.ndarray = None  # global retrieval


def _cam_dict(cam: Camera) -> dict:
    # same camera description as estimators.geometric's (private) _cam_dict
    K = cam.K
    return {"model": "PINHOLE", "width": cam.width, "height": cam.height,
            "params": [K[0, 0], K[1, 1], K[0, 2], K[1, 2]]}


def _pose_from_T(T: np.ndarray) -> "poselib.CameraPose":
    p = poselib.CameraPose()
    p.R = T[:3, :3]
    p.t = T[:3, 3]
    return p


def _ms(a: float, b: Optional[float] = None) -> float:
    return ((b if b is not None else time.perf_counter()) - a) * 1e3


def _jacobian_hessian(T_world_cam: np.ndarray, X: np.ndarray, K: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """(H = J^T J [6, 6], J [n, 2, 6]): Jacobian of the pixel reprojections of world points
    X [n, 3] w.r.t. the camera's centre and left rotation (world frame), the
    parametrization of ``geometric.pnp_covariance`` (reproduced: it builds J internally)."""
    R, c = T_world_cam[:3, :3], T_world_cam[:3, 3]
    d = X - c
    Xc = d @ R
    z = Xc[:, 2]
    Jp = np.zeros((len(X), 2, 3))
    Jp[:, 0, 0] = K[0, 0] / z
    Jp[:, 0, 2] = -K[0, 0] * Xc[:, 0] / z ** 2
    Jp[:, 1, 1] = K[1, 1] / z
    Jp[:, 1, 2] = -K[1, 1] * Xc[:, 1] / z ** 2
    JX = Jp @ R.T
    J = np.concatenate([-JX, np.cross(JX, d[:, None, :])], axis=2)
    return np.einsum("nik,nil->kl", J, J), J


def _reprojection(T_world_cam: np.ndarray, X: np.ndarray, x: np.ndarray, K: np.ndarray) -> np.ndarray:
    Xc = (X - T_world_cam[:3, 3]) @ T_world_cam[:3, :3]
    uv = Xc[:, :2] / Xc[:, 2:3] * [K[0, 0], K[1, 1]] + K[:2, 2]
    return uv - x


class RigLocalizer:
    """Localizes rig captures (several cameras, one body pose) against one keyframe map.

    Reuses a single-camera ``Localizer`` for features, retrieval and (learned
    estimators) per-camera estimates, so a rig and a single camera share one loaded map,
    one configuration and the same thread limits: pass ``localizer`` to share one that
    exists (e.g. the node's), else one is built from ``kmap`` and ``config``.
    """

    def __init__(self, kmap: KeyframeMap, config: Optional[LocalizerConfig] = None,
                 rig_config: Optional[RigConfig] = None, rig: Optional[Rig] = None,
                 localizer: Optional[Localizer] = None):
        if localizer is not None and (localizer.kmap is not kmap
                                      or (config is not None and config != localizer.config)):
            raise ValueError("RigLocalizer: a shared localizer must hold the same map and configuration")
        self.localizer = localizer or Localizer(kmap, config)
        self.config = self.localizer.config
        self.rig_config = rig_config or RigConfig()
        self.rig_config.validate()
        self.rig = rig
        if rig is not None:
            rig.validate()
        self.kmap = kmap
        self.geometric = self.config.estimator == "geometric"
        if self.rig_config.method == "generalized" and not self.geometric:
            raise ValueError(f"rig.method 'generalized' needs the geometric estimator, not {self.config.estimator!r}")
        self.generalized = self.geometric and self.rig_config.method != "per_camera"
        takes_views = hasattr(self.localizer.estimator, "estimate_views")
        if self.rig_config.method == "multi_view" and not takes_views:
            raise ValueError(f"rig.method 'multi_view' needs an estimator that takes several query views "
                             f"(vggt-fused), not {self.config.estimator!r}")
        self.multi_view = takes_views and self.rig_config.method in ("auto", "multi_view")
        from reloc_ros.averaging import AveragingConfig

        self.averaging = from_dict(AveragingConfig, self.config.averaging, "averaging")
        self.gcfg: GeometricConfig = from_dict(GeometricConfig, self.config.estimator_options if self.geometric
                                               else {}, "geometric")

    @classmethod
    def from_map(cls, map_path, config: Optional[LocalizerConfig] = None, rig_config: Optional[RigConfig] = None,
                 rig: Optional[Rig] = None) -> "RigLocalizer":
        return cls(KeyframeMap.load(map_path), config, rig_config, rig)

    # ------------------------------------------------------------------------------
    def localize(self, capture: Sequence[CameraView], prior: Optional[PosePrior] = None) -> RigLocalizationResult:
        """Estimate T_world_base from one capture (never raises for bad camera input).

        capture: one ``CameraView`` per camera that delivered something; a view without
        ``camera`` / ``T_base_cam`` takes them from the rig given at construction, if any.
        prior: optional ``PosePrior`` of the *body* (T_world_base and its covariance);
        each camera's retrieval then looks near the camera pose it implies first.
        """
        t0 = time.perf_counter()
        timings: Dict[str, float] = {}
        name = self.config.estimator
        reports: List[CameraReport] = []
        cams: List[_CamData] = []
        seen = set()
        for i, view in enumerate(capture):
            rep, cd = self._check_view(i, view, seen)
            reports.append(rep)
            if cd is not None:
                cams.append(cd)
        timings["check"] = _ms(t0)

        def done(res: RigLocalizationResult) -> RigLocalizationResult:
            res.cameras = reports
            res.estimator = name
            res.timings_ms = {**timings, **res.timings_ms, "total": _ms(t0)}
            return res

        if not cams:
            why = "; ".join(f"{r.name}: {r.reason}" for r in reports) or "empty capture"
            return done(RigLocalizationResult(Status.ERROR, message=f"no usable camera in the capture ({why})"))
        if self.multi_view:
            return done(self._multi_view(cams, reports, prior, timings))
        if not self.generalized:
            return done(self._per_camera(cams, reports, prior, timings))

        t1 = time.perf_counter()
        feats_ok = []
        for cd in cams:
            try:
                feats = self.localizer.extractor(cd.image)
            except InvalidInputError as e:  # an image the extractor cannot read: this camera only
                reports[cd.idx].state, reports[cd.idx].reason = "excluded", str(e)
                continue
            reports[cd.idx].features = len(feats)
            if len(feats) < 8:
                reports[cd.idx].state, reports[cd.idx].reason = "no_features", f"only {len(feats)} local features"
                continue
            cd.kp = undistort_keypoints(feats.keypoints, cd.camera).astype(np.float64)
            cd.root = root_sift(feats.descriptors)
            cd.near, cd.glob = self._retrieve(cd, feats, prior)
            feats_ok.append(cd)
        timings["features+retrieval"] = _ms(t1)
        if not feats_ok:
            return done(RigLocalizationResult(Status.NOT_LOCALIZED, message="no camera of the capture has features"))
        # As the single-camera Localizer: with a prior, the keyframes near it first (a
        # camera with none near uses global retrieval), then, if that does not localize,
        # global retrieval for every camera.
        attempts = [("global", [cd.glob for cd in feats_ok])]
        if prior is not None and any(len(cd.near) for cd in feats_ok):
            first = ("prior", [cd.near if len(cd.near) else cd.glob for cd in feats_ok])
            differs = any(set(a.tolist()) - set(b.tolist()) for a, b in zip(attempts[0][1], first[1]))
            attempts = [first] + (attempts if self.config.prior_fallback and differs else [])
        res = None
        for n, (how, ids) in enumerate(attempts):
            for cd, k in zip(feats_ok, ids):
                cd.kf_ids = k
                rep = reports[cd.idx]
                rep.keyframe_ids, rep.state, rep.reason = [int(i) for i in k], "no_inliers", ""
                rep.matches = rep.inliers = 0
                rep.extent, rep.rms_reprojection_px, rep.warning = 0.0, float("nan"), ""
            res = self._attempt(feats_ok, reports, timings if n == 0 else {})
            res.retrieval = how if n == 0 else "prior+global"
            if res.localized:
                break
        return done(res)

    def _attempt(self, cams: List[_CamData], reports: List[CameraReport],
                 timings: Dict[str, float]) -> RigLocalizationResult:
        """One estimate from the keyframes in ``cd.kf_ids``: generalized PnP, then (mode
        auto) the essential-matrix fallback."""
        res = None
        if self.gcfg.mode in ("auto", "pnp"):
            res = self._generalized_pnp(cams, reports, timings)
            if res.localized or self.gcfg.mode == "pnp":
                return res
        ess = self._essential(cams, reports, timings)
        if res is not None and not ess.localized:
            ess.message = f"{res.message}; essential fallback: {ess.message}"
        return ess

    # ------------------------------------------------------------------------------
    def _check_view(self, i: int, view: CameraView, seen: set) -> Tuple[CameraReport, Optional[_CamData]]:
        name = getattr(view, "name", None)
        rep = CameraReport(str(name), "excluded")
        if not isinstance(name, str) or not name:
            rep.reason = f"camera name must be a non-empty string, got {name!r}"
            return rep, None
        if name in seen:
            rep.reason = "camera appears twice in the capture"
            return rep, None
        seen.add(name)
        camera, T = view.camera, view.T_base_cam
        if self.rig is not None and (camera is None or T is None):
            try:
                rc = self.rig[name]
            except KeyError as e:
                rep.reason = str(e).strip("'\"")
                return rep, None
            camera = camera if camera is not None else rc.camera
            T = T if T is not None else rc.T_base_cam
        img = view.image
        try:
            if camera is None:
                raise InvalidInputError("no camera intrinsics (CameraInfo)")
            if T is None:
                raise InvalidInputError("no extrinsic T_base_cam (TF base -> camera missing)")
            rc = RigCamera(name, camera, T)
            rc.validate()
            if img is None:
                raise InvalidInputError("no image")
            if not isinstance(img, np.ndarray) or img.ndim not in (2, 3) or img.size == 0 or img.dtype != np.uint8:
                raise InvalidInputError(f"image must be [H,W] or [H,W,3] uint8, got "
                                        f"{getattr(img, 'shape', type(img))} {getattr(img, 'dtype', '')}")
            h, w = img.shape[:2]
            if (w, h) != (camera.width, camera.height):
                raise InvalidInputError(f"image is {w}x{h} but the camera says {camera.width}x{camera.height}")
        except InvalidInputError as e:
            rep.reason = str(e)
            return rep, None
        rep.state = "no_inliers"
        return rep, _CamData(i, name, rc.camera, rc.T_base_cam, img)

    @staticmethod
    def _camera_prior(prior: Optional[PosePrior], cd: _CamData) -> Optional[PosePrior]:
        """The camera's PosePrior implied by a body prior (None when none or malformed)."""
        if prior is None:
            return None
        T_b = np.asarray(prior.T_world_cam, np.float64)
        C_b = np.asarray(prior.covariance, np.float64)
        if T_b.shape != (4, 4) or C_b.shape != (6, 6):
            return None
        return PosePrior(T_b @ cd.T_base_cam, body_to_camera_covariance(C_b, T_b, cd.T_base_cam))

    def _retrieve(self, cd: _CamData, feats, prior: Optional[PosePrior]) -> Tuple[np.ndarray, np.ndarray]:
        """(keyframes near the camera's prior [<= top_k], global top_k) for one camera."""
        desc = self.localizer.descriptor.describe(feats)
        near = np.zeros(0, np.int64)
        cam_prior = self._camera_prior(prior, cd)
        if cam_prior is not None:
            near = self.localizer.keyframes_near(cam_prior, desc)
        glob, _ = self.kmap.index.search(desc, self.config.top_k)
        return np.asarray(near, np.int64), np.asarray(glob, np.int64)

    # -- generalized absolute pose ----------------------------------------------------
    def _generalized_pnp(self, cams: List[_CamData], reports: List[CameraReport],
                         timings: Dict[str, float]) -> RigLocalizationResult:
        cfg, gcfg, kmap = self.rig_config, self.gcfg, self.kmap
        min_inl = cfg.pnp_min_inliers or gcfg.pnp_min_inliers
        t0 = time.perf_counter()
        per: List[Tuple[_CamData, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []
        for cd in cams:
            xs, Xs, kfs, srcs, qis = [], [], [], [], []
            for k in map(int, cd.kf_ids):
                m = match_descriptors(cd.root, kmap.root_descriptors(k, with_points_only=True), gcfg.ratio,
                                      gcfg.mutual)
                if not len(m):
                    continue
                pi = kmap.point_index(k)[m[:, 1]]
                P = kmap.points3d(k)[pi]
                ok = np.isfinite(P[:, 0])
                xs.append(cd.kp[m[ok, 0]])
                Xs.append(P[ok].astype(np.float64))
                kfs.append(np.full(int(ok.sum()), k))
                srcs.append(kmap.point_sources(k)[pi[ok]])
                qis.append(m[ok, 0])
            n = int(sum(len(a) for a in xs))
            reports[cd.idx].matches = n
            if n:
                per.append((cd, np.concatenate(xs), np.concatenate(Xs), np.concatenate(kfs), np.concatenate(srcs),
                            np.concatenate(qis)))
            else:
                reports[cd.idx].reason = "no 2D-3D matches"
        timings["matching"] = _ms(t0)
        n_all = sum(len(p[1]) for p in per)
        if n_all < max(min_inl, 4):
            return RigLocalizationResult(Status.NOT_LOCALIZED, method="generalized_pnp",
                                         message=f"only {n_all} 2D-3D matches over {len(cams)} cameras "
                                                 f"(need {min_inl})")
        t1 = time.perf_counter()
        # PoseLib's generalized camera: camera_ext maps rig (body) points to camera i, i.e.
        # T_cam_base, and the returned pose maps world to rig: T_base_world.
        pose, info = poselib.estimate_generalized_absolute_pose(
            [p[1] for p in per], [p[2] for p in per], [_pose_from_T(invert(p[0].T_base_cam)) for p in per],
            [_cam_dict(p[0].camera) for p in per], gcfg.ransac(max_reproj_error=gcfg.pnp_max_reproj_px),
            {"loss_scale": 1.0})
        timings["pnp"] = _ms(t1)
        inl = [np.asarray(m, bool) for m in info["inliers"]]
        ni = int(sum(m.sum() for m in inl))
        if ni < min_inl:
            for p, m in zip(per, inl):
                reports[p[0].idx].inliers = int(m.sum())
            return RigLocalizationResult(Status.NOT_LOCALIZED, method="generalized_pnp",
                                         message=f"generalized PnP found {ni} inliers of {n_all} matches "
                                                 f"(need {min_inl})")
        T_world_base = invert(make_T(pose.R, pose.t))
        t2 = time.perf_counter()
        cov, rms_all = self._rig_covariance(T_world_base, per, inl, reports)
        timings["covariance"] = _ms(t2)

        # Degeneracy, generalised from the single camera's patch rule.
        used = [(p[0], m) for p, m in zip(per, inl) if m.sum() > 0]
        kf_counts: Dict[int, int] = {}
        best_pairs: List[Tuple[int, _CamData, int]] = []  # (inliers, camera, keyframe)
        for p, m in zip(per, inl):
            cd, rep = p[0], reports[p[0].idx]
            rep.inliers = int(m.sum())
            if not rep.inliers:
                rep.reason = rep.reason or "no inlier of the rig pose"
                continue
            rep.state, rep.reason = "used", ""
            rep.extent = inlier_extent(p[1][m], cd.camera.width, cd.camera.height)
            ks, cs = np.unique(p[3][m], return_counts=True)
            for k, c in zip(ks, cs):
                kf_counts[int(k)] = kf_counts.get(int(k), 0) + int(c)
                best_pairs.append((int(c), cd, int(k)))
        ratio_all = ni / max(n_all, 1)
        for p, m in zip(per, inl):
            rep = reports[p[0].idx]
            # 50 matches: a camera with fewer has too few for its ratio to mean anything.
            if len(m) >= 50 and m.mean() < 0.25 * ratio_all:
                rep.warning = (f"only {m.mean():.0%} of its {len(m)} matches fit the rig pose (rig: {ratio_all:.0%}): "
                               "check its extrinsic and intrinsics")
        reasons = []
        spread = self._spread_reason([(cd, reports[cd.idx]) for cd, _ in used], T_world_base)
        if spread:
            reasons.append(spread)
        elif gcfg.verify_max_rotation_deg is not None:
            t3 = time.perf_counter()
            best_pairs.sort(key=lambda t: -t[0])
            verify = self._verify_rotation(T_world_base, [(cd, k) for _, cd, k in best_pairs[: gcfg.verify_keyframes]])
            timings["verify"] = _ms(t3)
            if verify:
                reasons.append(verify)
        kf_ids = sorted(kf_counts, key=lambda k: -kf_counts[k])
        return self._finish(T_world_base, cov, ni, reasons, kf_ids, [kf_counts[k] for k in kf_ids],
                            "generalized_pnp", rms_all)

    def _rig_covariance(self, T_world_base, per, inl, reports) -> Tuple[np.ndarray, float]:
        """Body covariance from every camera's inliers: cov = H^-1 M H^-1 with
        H = sum A_i^T H_i A_i and M = sum A_i^T M_i A_i, where H_i, M_i are camera i's
        information and 'meat' (J^T V J) of ``geometric.pnp_covariance`` (M_i = H_i C_i H_i)
        and A_i maps the body perturbation to camera i's. Cameras are independent (their
        pixel noise, keyframes and common-mode errors differ).

        A camera with fewer inliers than one camera needs on its own (``pnp_min_inliers``)
        cannot identify its own variance components: with a dozen points from one
        keyframe the rigid keyframe error and the camera pose are indistinguishable, and
        the moment estimates blew up to kilometres of position std. Such a camera gets
        the pixel noise pooled over the rig's residuals plus its common-mode error
        (``cov_common_mode``), i.e. no map-error component. For a camera with enough
        inliers the residuals are those of the rig fit, which absorbs less of its
        keyframe errors than its own pose would: its components come out larger than in
        the single-camera path, i.e. conservative."""
        gcfg = self.gcfg
        blocks, r2, nres = [], 0.0, 0
        for p, m in zip(per, inl):
            if m.sum() == 0:
                continue
            cd, x, X, kf, src, qi = p[0], p[1][m], p[2][m], p[3][m], p[4][m], p[5][m]
            T_wc = T_world_base @ cd.T_base_cam
            r = _reprojection(T_wc, X, x, cd.camera.K)
            r2 += float(np.sum(r ** 2))
            nres += r.size
            reports[cd.idx].rms_reprojection_px = float(np.sqrt(np.mean(r ** 2)))
            blocks.append((cd, T_wc, x, X, kf, src, qi))
        s2_pool = max(r2 / max(nres - 6, 1), gcfg.min_pixel_sigma ** 2)
        H = np.zeros((6, 6))
        M = np.zeros((6, 6))
        for cd, T_wc, x, X, kf, src, qi in blocks:
            Hc, Jc = _jacobian_hessian(T_wc, X, cd.camera.K)
            if len(x) >= max(gcfg.pnp_min_inliers, 6):
                pc = pnp_covariance(T_wc, X, x, cd.camera.K, kf, src, self.kmap.T_world_cam, gcfg, query_index=qi)
                Mc = Hc @ pc.covariance @ Hc
            else:
                Jsum = Jc.sum(axis=0)  # [2, 6]: one pixel offset of every observation of this camera
                Mc = s2_pool * (Hc + gcfg.cov_common_mode ** 2 * Jsum.T @ Jsum)
            # Extrinsic error: a perturbation of camera i's pose (its centre and rotation, the
            # parametrization of J) shared by all its observations: meat L S L^T, L = J^T J.
            ext = np.r_[np.full(3, self.rig_config.extrinsic_translation_std_m ** 2),
                        np.full(3, np.radians(self.rig_config.extrinsic_rotation_std_deg) ** 2)]
            if ext.any():
                Mc = Mc + Hc @ np.diag(ext) @ Hc
            A = _lever(T_world_base, cd.T_base_cam)
            H += A.T @ Hc @ A
            M += A.T @ Mc @ A
        Hi = np.linalg.pinv(H)
        C = Hi @ M @ Hi
        return 0.5 * (C + C.T), float(np.sqrt(r2 / max(nres, 1)))

    def _spread_reason(self, used: List[Tuple[_CamData, CameraReport]], T_world_base: np.ndarray) -> str:
        """'' when the inliers constrain the body well, else why not (see RigConfig)."""
        cfg, ext = self.rig_config, self.gcfg.min_inlier_extent
        if any(rep.extent >= ext for _, rep in used):
            return ""
        axes = [cd.T_base_cam[:3, 2] for cd, rep in used if rep.inliers >= cfg.min_spread_inliers]
        for i in range(len(axes)):
            for j in range(i + 1, len(axes)):
                if np.degrees(np.arccos(np.clip(axes[i] @ axes[j], -1, 1))) >= cfg.min_spread_angle_deg:
                    return ""
        best = max((rep.extent for _, rep in used), default=0.0)
        return (f"rig inliers span at most {best:.1%} of a camera image (min_inlier_extent {ext:.1%}) and no two "
                f"cameras with >= {cfg.min_spread_inliers} inliers look {cfg.min_spread_angle_deg:g}+ deg apart")

    def _relative(self, cd: _CamData, k: int) -> Optional[PairEstimate]:
        """5-point relative pose of camera ``cd`` to keyframe k (as geometric's ``_pairs``,
        reproduced: that method is private to the estimator)."""
        gcfg, kmap = self.gcfg, self.kmap
        m = match_descriptors(cd.root, kmap.root_descriptors(k), gcfg.ratio, gcfg.mutual)
        if len(m) < max(gcfg.essential_min_inliers, 5):
            return None
        x_kf = kmap.features(k).keypoints[m[:, 1]].astype(np.float64)
        pose, info = poselib.estimate_relative_pose(
            cd.kp[m[:, 0]], x_kf, _cam_dict(cd.camera), _cam_dict(kmap.cameras[k]),
            gcfg.ransac(max_epipolar_error=gcfg.essential_max_epipolar_px), {})
        ni = int(info["num_inliers"])
        inl = np.asarray(info["inliers"], bool)
        if ni < gcfg.essential_min_inliers or \
                inlier_extent(cd.kp[m[inl, 0]], cd.camera.width, cd.camera.height) < gcfg.min_inlier_extent:
            return None
        return PairEstimate(k, make_T(pose.R, pose.t), weight=float(ni), inliers=ni, metric=False)

    def _verify_rotation(self, T_world_base: np.ndarray, pairs: List[Tuple[_CamData, int]]) -> str:
        """As the single-camera check: '' unless >= 2 relative poses exist and all disagree."""
        gcfg = self.gcfg
        angles, used = [], []
        for cd, k in pairs:
            pe = self._relative(cd, k)
            if pe is None:
                continue
            R_wc = T_world_base[:3, :3] @ cd.T_base_cam[:3, :3]
            angles.append(rotation_angle_deg(pe.T_kf_query[:3, :3], self.kmap.T_world_cam[k][:3, :3].T @ R_wc))
            used.append(f"{cd.name}:{k}")
        if len(angles) < 2 or min(angles) <= gcfg.verify_max_rotation_deg:
            return ""
        return (f"rig rotation disagrees by {min(angles):.1f}+ deg with the 5-point relative poses {used} "
                f"(verify_max_rotation_deg {gcfg.verify_max_rotation_deg:g}): map points unreliable here")

    def _finish(self, T, cov, inliers: int, reasons: List[str], kf_ids, kf_inliers, method: str,
                rms: float) -> RigLocalizationResult:
        """Status, confidence and the DEGENERATE covariance floor, as ``Localizer._fuse``."""
        lcfg = self.config
        std = float(np.sqrt(max(np.linalg.eigvalsh(cov[:3, :3]).max(), 0.0)))
        conf = inliers / (inliers + 30.0) / (1.0 + (std / lcfg.max_position_std_m) ** 2)
        ill = bool(reasons)
        if std > lcfg.max_position_std_m:
            reasons = reasons + [f"position std {std:.2f} m exceeds {lcfg.max_position_std_m} m"]
        if ill:
            conf = min(conf, self.averaging.degenerate_max_confidence)
            cov = cov + np.diag(np.r_[np.full(3, lcfg.max_position_std_m ** 2),
                                      np.full(3, np.radians(lcfg.ill_conditioned_rotation_std_deg) ** 2)])
        status = Status.DEGENERATE if reasons else Status.OK
        msg = "; ".join(reasons) or f"{inliers} inliers, rms {rms:.2f} px"
        return RigLocalizationResult(status, T, cov, float(conf), msg, keyframe_ids=list(kf_ids),
                                     inliers=list(kf_inliers), method=method)

    # -- essential-matrix fallback ----------------------------------------------------
    def _essential(self, cams: List[_CamData], reports: List[CameraReport],
                   timings: Dict[str, float]) -> RigLocalizationResult:
        """Relative poses of every camera to its keyframes, fused into one body pose.

        A pair (camera i, keyframe k) gives R_k_ci and the direction t of camera i's centre
        in keyframe k. The body-to-keyframe rotation is R_k_ci R_ci_b; the body centre lies
        on the same ray from a *virtual* keyframe centre c_k - R_wb t_bc_i (moving both ends
        by the lever arm keeps the direction). So the robust motion averaging of the single-
        camera path fuses the rig as it is, after one pass that fixes R_wb (the rotation
        average does not depend on the keyframe centres).
        """
        from reloc_ros.averaging import fuse_pair_estimates

        t0 = time.perf_counter()
        pairs, owners, T_kf = [], [], []
        for cd in cams:
            n = 0
            for k in map(int, cd.kf_ids):
                pe = self._relative(cd, k)
                if pe is None:
                    continue
                T_kb = pe.T_kf_query.copy()
                T_kb[:3, :3] = pe.T_kf_query[:3, :3] @ cd.T_base_cam[:3, :3].T
                pairs.append(PairEstimate(len(pairs), T_kb, pe.weight, pe.inliers, False))
                owners.append((cd, k))
                T_kf.append(self.kmap.T_world_cam[k])
                n += pe.inliers
            if n:
                reports[cd.idx].state, reports[cd.idx].reason, reports[cd.idx].inliers = "used", "", n
        timings["relative_pose"] = _ms(t0)
        if not pairs:
            return RigLocalizationResult(Status.NOT_LOCALIZED, method="essential",
                                         message="no camera-keyframe pair with enough 5-point inliers")
        acfg = self.averaging
        T_kf = np.stack(T_kf)
        fr = fuse_pair_estimates(pairs, T_kf, acfg)
        if fr.T_world_cam is not None:
            R_wb = fr.T_world_cam[:3, :3]
            T_v = T_kf.copy()
            for j, (cd, _) in enumerate(owners):
                T_v[j, :3, 3] -= R_wb @ cd.T_base_cam[:3, 3]
            fr = fuse_pair_estimates(pairs, T_v, acfg)
        timings["fusion"] = _ms(t0) - timings["relative_pose"]
        used = [(o, p) for o, p, m in zip(owners, pairs, fr.inlier_mask) if m]
        for cd in cams:  # cameras whose pairs were all rejected by the fusion
            if reports[cd.idx].state == "used" and not any(o[0] is cd for o, _ in used):
                reports[cd.idx].state, reports[cd.idx].reason = "no_inliers", "its pairs disagree with the rig pose"
        res = RigLocalizationResult(fr.status, fr.T_world_cam, fr.covariance, float(fr.confidence), fr.message,
                                    [o[1] for o, _ in used], [p.inliers for _, p in used], method="essential")
        return res

    # -- learned estimators taking several query views: the capture as one query ---------
    def _multi_view(self, cams: List[_CamData], reports: List[CameraReport], prior: Optional[PosePrior],
                    timings: Dict[str, float]) -> RigLocalizationResult:
        t0 = time.perf_counter()
        ranked: List[List[int]] = []
        views, who = [], []
        for cd in cams:
            rep = reports[cd.idx]
            try:
                feats = self.localizer.extractor(cd.image)
            except InvalidInputError as e:
                rep.state, rep.reason = "excluded", str(e)
                continue
            rep.features = len(feats)
            if len(feats) < 8:  # retrieval needs local features; the network still sees the view
                ranked.append([])
            else:
                near, glob = self._retrieve(cd, feats, prior)
                ranked.append([int(k) for k in np.concatenate([near, glob])])
            rep.keyframe_ids = ranked[-1][: self.config.top_k]
            views.append(Query(cd.image, cd.camera, feats))
            who.append(cd)
        # the cameras' keyframe lists interleaved by rank: every camera contributes its best
        kf: List[int] = []
        for r in range(max((len(x) for x in ranked), default=0)):
            for x in ranked:
                if r < len(x) and x[r] not in kf:
                    kf.append(x[r])
        kf = kf[: self.config.top_k]
        timings["retrieval"] = _ms(t0)
        if not views or not kf:
            return RigLocalizationResult(Status.NOT_LOCALIZED, method="multi_view",
                                         message="no keyframe retrieved for any camera")
        t1 = time.perf_counter()
        try:
            outs = self.localizer.estimator.estimate_views(views, kf, self.kmap)
        except InvalidInputError as e:
            return RigLocalizationResult(Status.ERROR, method="multi_view", message=str(e))
        timings["estimator"] = _ms(t1)
        Ts, Cs, used, confs = [], [], [], []
        for cd, out in zip(who, outs):
            rep = reports[cd.idx]
            a = out.absolute
            if a is None or a.covariance is None:
                rep.state, rep.reason = "no_inliers", out.message or "no pose for this view"
                continue
            T_wb = a.T_world_cam @ invert(cd.T_base_cam)
            Ts.append(T_wb)
            Cs.append(camera_to_body_covariance(a.covariance, T_wb, cd.T_base_cam))
            used.append(cd)
            confs.append(float(a.confidence))
            rep.inliers = int(a.inliers)
        if not Ts:
            return RigLocalizationResult(Status.NOT_LOCALIZED, method="multi_view",
                                         message="no view got a pose: " + "; ".join(
                                             f"{r.name}: {r.reason}" for r in reports if r.reason))
        T, C, keep = fuse_body_poses(Ts, Cs, self.rig_config.fusion_gate_chi2)
        for i, cd in enumerate(used):
            rep = reports[cd.idx]
            if keep[i]:
                rep.state, rep.reason = "used", ""
            else:
                rep.state, rep.reason = "no_inliers", "its body pose disagrees with the other views (chi-square gate)"
        kept = [i for i in range(len(used)) if keep[i]]
        return RigLocalizationResult(Status.OK, T, C, float(max(confs[i] for i in kept)),
                                     f"{len(kept)} of {len(views)} views of one multi-view query fused",
                                     keyframe_ids=kf, inliers=[reports[used[i].idx].inliers for i in kept],
                                     method="multi_view")

    # -- learned estimators: per-camera estimates fused --------------------------------
    def _per_camera(self, cams: List[_CamData], reports: List[CameraReport], prior: Optional[PosePrior],
                    timings: Dict[str, float]) -> RigLocalizationResult:
        t0 = time.perf_counter()
        Ts, Cs, who, results = [], [], [], []
        for cd in cams:
            r = self.localizer.localize(cd.image, cd.camera, self._camera_prior(prior, cd))
            rep = reports[cd.idx]
            rep.keyframe_ids = [int(k) for k in r.keyframe_ids]
            rep.inliers = int(sum(r.inliers))
            if not r.localized or r.covariance is None:
                rep.state, rep.reason = ("no_features" if "local features" in r.message else "no_inliers"), r.message
                continue
            T_wb = r.T_world_cam @ invert(cd.T_base_cam)
            Ts.append(T_wb)
            Cs.append(camera_to_body_covariance(r.covariance, T_wb, cd.T_base_cam))
            who.append(cd)
            results.append(r)
        timings["per_camera"] = _ms(t0)
        if not Ts:
            return RigLocalizationResult(Status.NOT_LOCALIZED, method="per_camera_fusion",
                                         message="no camera localized: " + "; ".join(
                                             f"{r.name}: {r.reason}" for r in reports if r.reason))
        ok = [i for i, r in enumerate(results) if r.status == Status.OK]
        pick = ok if ok else list(range(len(Ts)))  # DEGENERATE ones only when nothing better exists
        T, C, keep = fuse_body_poses([Ts[i] for i in pick], [Cs[i] for i in pick], self.rig_config.fusion_gate_chi2)
        kept = [pick[j] for j in np.nonzero(keep)[0]]
        for i, cd in enumerate(who):
            rep = reports[cd.idx]
            if i in kept:
                rep.state, rep.reason = "used", ""
            else:
                rep.state = "no_inliers"
                rep.reason = ("its pose was DEGENERATE" if i not in pick
                              else "its body pose disagrees with the other cameras (chi-square gate)")
        status = Status.OK if ok else Status.DEGENERATE
        conf = float(max(results[i].confidence for i in kept))
        kf = [k for i in kept for k in results[i].keyframe_ids]
        inl = [v for i in kept for v in results[i].inliers]
        msg = f"{len(kept)} of {len(Ts)} per-camera poses fused" if ok else \
            "only DEGENERATE per-camera poses: " + "; ".join(results[i].message for i in kept)
        return RigLocalizationResult(status, T, C, conf, msg, keyframe_ids=kf, inliers=inl,
                                     method="per_camera_fusion")

    # -- single camera, for comparison ------------------------------------------------
    def localize_camera(self, view: CameraView, prior: Optional[PosePrior] = None) -> RigLocalizationResult:
        """The single-camera pipeline on one view, its pose moved to the body frame
        (what the rig must not do worse than when all other cameras are blank).
        prior: optional ``PosePrior`` of the body, as in ``localize``."""
        rep, cd = self._check_view(0, view, set())
        if cd is None:
            return RigLocalizationResult(Status.ERROR, message=f"{rep.name}: {rep.reason}", cameras=[rep],
                                         estimator=self.config.estimator)
        r = self.localizer.localize(cd.image, cd.camera, self._camera_prior(prior, cd))
        out = RigLocalizationResult(r.status, message=r.message, confidence=r.confidence,
                                    keyframe_ids=list(r.keyframe_ids), inliers=list(r.inliers),
                                    timings_ms=dict(r.timings_ms), estimator=r.estimator, method="single_camera",
                                    cameras=[rep])
        if r.localized:
            out.T_world_base = r.T_world_cam @ invert(cd.T_base_cam)
            out.covariance = camera_to_body_covariance(r.covariance, out.T_world_base, cd.T_base_cam)
            rep.state, rep.inliers = "used", int(sum(r.inliers))
        return out
