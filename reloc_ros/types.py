"""Value types shared by every part of the core library.

Conventions (everywhere in reloc_ros unless a name says otherwise):
- Poses are 4x4 float64 rigid transforms ``T_a_b`` mapping points in frame ``b`` to
  frame ``a``; ``T_world_cam`` is camera-to-world, OpenCV camera axes (x right, y down,
  z forward), metres.
- Images are ``[H, W, 3]`` uint8 RGB or ``[H, W]`` uint8 grey; depth is ``[H, W]``
  float32 metres with 0 (or non-finite) meaning invalid.
- Intrinsics ``K`` are 3x3 pixels, for the image they travel with.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Optional

import numpy as np


class RelocError(Exception):
    """Base class of the errors the library raises for bad input (clear message, no crash)."""


class InvalidInputError(RelocError):
    """An image, camera or pose given to the library is unusable (corrupt, NaN, wrong size)."""


# Distortion vector lengths OpenCV accepts (cv2.undistortPoints / projectPoints):
# (k1, k2, p1, p2[, k3[, k4, k5, k6[, s1, s2, s3, s4[, tx, ty]]]]).
OPENCV_DIST_LENGTHS = (4, 5, 8, 12, 14)

# |K[0, 1]| / fx below this is float noise from a calibration tool, not skew: over a
# 10k-pixel-wide image it moves a point by at most 0.01 px.
_SKEW_RTOL = 1e-6


@dataclass
class Camera:
    """Pinhole camera with optional OpenCV distortion.

    K: [3, 3] intrinsics in pixels, ``[[fx, 0, cx], [0, fy, cy], [0, 0, 1]]`` (no skew).
    width, height: image size in pixels.
    dist: OpenCV distortion coefficients (k1, k2, p1, p2[, k3...]), 4, 5, 8, 12 or 14 of
    them, or None; an all-zero vector of any length means no distortion and becomes None.
    """

    K: np.ndarray
    width: int
    height: int
    dist: Optional[np.ndarray] = None

    def __post_init__(self) -> None:
        self.K = np.asarray(self.K, dtype=np.float64).reshape(3, 3)
        self.width = int(self.width)
        self.height = int(self.height)
        if self.dist is not None:
            self.dist = np.asarray(self.dist, dtype=np.float64).ravel()
            if not np.any(self.dist):
                self.dist = None

    def validate(self) -> None:
        """Raise InvalidInputError when the intrinsics cannot describe a real camera.

        Checked: finite K with positive focal lengths and the pinhole form (bottom row
        0 0 1, no skew: every projection in reloc_ros uses fx, fy, cx, cy only, so a skewed
        K would bias every pose silently), a positive image size, the principal point
        inside the image (cx in [0, width], cy in [0, height]; outside almost always means
        K belongs to another resolution), and finite distortion of a length OpenCV accepts
        (else cv2.undistortPoints raises deep inside the estimator).
        """
        K = self.K
        if not np.all(np.isfinite(K)) or K[0, 0] <= 0 or K[1, 1] <= 0:
            raise InvalidInputError(f"invalid camera intrinsics K={K.tolist()}")
        if K[1, 0] != 0 or K[2, 0] != 0 or K[2, 1] != 0 or abs(K[2, 2] - 1.0) > 1e-9:
            raise InvalidInputError(
                f"camera intrinsics K={K.tolist()} are not of the pinhole form [[fx, s, cx], [0, fy, cy], [0, 0, 1]]"
            )
        if abs(K[0, 1]) > _SKEW_RTOL * K[0, 0]:
            raise InvalidInputError(
                f"camera intrinsics have skew K[0,1]={K[0, 1]:g}; the pinhole model of reloc_ros ignores skew, "
                "so poses would be biased (calibrate with zero skew, OpenCV's default)"
            )
        if self.width <= 0 or self.height <= 0:
            raise InvalidInputError(f"invalid camera size {self.width}x{self.height}")
        cx, cy = K[0, 2], K[1, 2]
        if not (0.0 <= cx <= self.width and 0.0 <= cy <= self.height):
            raise InvalidInputError(
                f"principal point ({cx:g}, {cy:g}) px lies outside the {self.width}x{self.height} image "
                "(are K and the image size of the same resolution?)"
            )
        if self.dist is not None:
            d = self.dist
            if not np.all(np.isfinite(d)):
                raise InvalidInputError(f"camera distortion coefficients are not finite: {d.tolist()}")
            if d.size not in OPENCV_DIST_LENGTHS:
                raise InvalidInputError(
                    f"camera distortion has {d.size} coefficients; OpenCV accepts "
                    f"{', '.join(map(str, OPENCV_DIST_LENGTHS))} "
                    "(k1, k2, p1, p2[, k3[, k4, k5, k6[, s1..s4[, tx, ty]]]])"
                )

    def scaled(self, sx: float, sy: Optional[float] = None) -> "Camera":
        """The same camera for an image resized by (sx, sy) (pixel-corner convention)."""
        sy = sx if sy is None else sy
        K = self.K.copy()
        K[0, :] *= sx
        K[1, :] *= sy
        return Camera(K, round(self.width * sx), round(self.height * sy), self.dist)


@dataclass
class PosedFrame:
    """One posed image of a dataset or a map.

    image: [H, W, 3] uint8 RGB (or [H, W] grey). T_world_cam: [4, 4] camera-to-world.
    camera: intrinsics of ``image``. depth: [Hd, Wd] float32 metres or None, seen by
    ``depth_camera`` whose pose relative to the colour camera is ``T_cam_depth``
    (identity when the depth is registered to the colour image).
    stamp: seconds (bags, TUM) or None.
    """

    name: str
    image: np.ndarray
    T_world_cam: np.ndarray
    camera: Camera
    depth: Optional[np.ndarray] = None
    depth_camera: Optional[Camera] = None
    T_cam_depth: Optional[np.ndarray] = None
    stamp: Optional[float] = None


class Status(str, enum.Enum):
    """Outcome of one localization query."""

    OK = "ok"  # localized, geometry well conditioned
    DEGENERATE = "degenerate"  # a pose exists but some direction is poorly constrained
    NOT_LOCALIZED = "not_localized"  # no trustworthy pose (too few matches/inliers, no keyframes)
    ERROR = "error"  # bad input (corrupt image, bad camera); nothing estimated


@dataclass
class PairEstimate:
    """Relative pose of the query with respect to one keyframe.

    T_kf_query: [4, 4] maps query-camera points into the keyframe camera (Reloc3r's
    ``pose2`` with view1 = keyframe, view2 = query). When ``metric`` is False only the
    direction of the translation is meaningful.
    weight: >= 0 quality (e.g. inlier count); 0 means unusable.
    """

    keyframe_id: int
    T_kf_query: np.ndarray
    weight: float = 1.0
    inliers: int = 0
    metric: bool = False


@dataclass
class AbsoluteEstimate:
    """A query pose estimated directly in the map frame (e.g. PnP against map points).

    T_world_cam: [4, 4]. inliers: supporting correspondences (PnP) or keyframes
    (Sim(3) alignment). covariance: [6, 6] over (x, y, z, rx, ry, rz) in the world
    frame, metres^2 / radians^2, rotation as a left perturbation
    ``R = exp([drot]_x) R_est`` (the ROS PoseWithCovariance convention).
    ill_conditioned: why the estimator distrusts its own solution (e.g. inliers in a
    small image patch); empty when it does not. The localizer reports such a pose
    DEGENERATE with capped confidence.
    """

    T_world_cam: np.ndarray
    covariance: np.ndarray
    inliers: int
    keyframe_ids: list = field(default_factory=list)
    rms_reprojection_px: float = float("nan")
    confidence: Optional[float] = None  # 0..1 when the estimator has its own measure
    ill_conditioned: str = ""


@dataclass
class EstimatorOutput:
    """What an estimator returns for one query: relative pairs, an absolute pose, or both."""

    pairs: list = field(default_factory=list)  # list[PairEstimate]
    absolute: Optional[AbsoluteEstimate] = None
    timings_ms: dict = field(default_factory=dict)
    message: str = ""


@dataclass
class LocalizationResult:
    """One result per query: the only thing the node and the evaluator read.

    T_world_cam: [4, 4] camera-to-world (None unless status is OK or DEGENERATE).
    covariance: [6, 6] (x, y, z, rx, ry, rz) in the world frame, m^2 / rad^2, derived
    from the estimate (never constant, never all zeros when a pose is given).
    confidence: 0..1. message: human-readable reason, always set when not OK.
    keyframe_ids: map keyframes used; inliers: inlier count per used keyframe (same order).
    timings_ms: per-stage wall time ("retrieval", "features", "estimate", "fusion", "total").
    retrieval: how keyframes were chosen: 'global', 'prior' (near a pose prior) or
    'prior+global' (the prior-guided attempt failed, global retrieval followed).
    """

    status: Status
    T_world_cam: Optional[np.ndarray] = None
    covariance: Optional[np.ndarray] = None
    confidence: float = 0.0
    message: str = ""
    keyframe_ids: list = field(default_factory=list)
    inliers: list = field(default_factory=list)
    timings_ms: dict = field(default_factory=dict)
    estimator: str = ""
    retrieval: str = "global"

    @property
    def localized(self) -> bool:
        return self.status in (Status.OK, Status.DEGENERATE) and self.T_world_cam is not None
