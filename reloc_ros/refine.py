"""Map refinement: bundle adjustment of keyframe poses and points, held to the input poses by priors.

Keyframe poses from a SLAM system or GNSS/INS are a little inconsistent with the images
(7-Scenes' KinectFusion poses: ~1 deg / several cm between frames 30-50 apart), and points
triangulated from them inherit it. ``refine_frames`` moves the poses to agree with the
images, then ``maps.build_map`` triangulates from the refined poses as usual.

Pipeline (``refine``):

1. SIFT features per frame (``features.SiftExtractor``, the same keypoints ``build_map``
   stores when both get the same ``FeatureConfig``; a shared ``feature_cache`` extracts once).
2. Pairs by pose: each frame with ``pairs_per_frame`` others whose optical axes are within
   ``max_view_angle_deg``, spread over distance ranks (near ones match reliably, far ones
   give wide baselines).
3. Matches (RootSIFT, ratio + mutual) verified by the *images only*: an essential matrix by
   LO-RANSAC at ``verify_px`` (PoseLib); the input poses are not used for inliers because they are the
   thing being corrected (a tight epipolar check under them rejects the very matches that
   would correct them). Only a loose gate under the input poses comes first: a match off
   its epipolar line by more than ``prior_gate_sigmas`` prior rotation stds can be no
   true match (repeated texture gives false pairs that fit an essential matrix of their
   own). The essential matrix's own rotation is not compared with the prior: on a planar
   scene it is ambiguous (18 deg off on exact rendered poses) while its inliers are right.
4. Tracks: union-find over all verified matches, so a point seen in k frames is one track
   of k observations (multi-view constraints, not pairwise). A track with two keypoints of
   one frame is inconsistent and dropped.
5. Points: multi-view DLT under the input poses, observations beyond ``init_max_reproj_px``
   dropped (loose: the input poses are off by a few pixels), minimum triangulation angle.
6. Bundle adjustment: Levenberg-Marquardt over (rotation, camera centre) per frame and every
   point, Schur complement on the points (cameras x cameras reduced system), a robust loss
   on each observation's reprojection error (iteratively reweighted), and a Gaussian prior
   on each frame's input pose. Then observations beyond ``outlier_px`` are removed and it is
   run again.

Why our own Schur-complement LM on numpy/scipy.sparse rather than pycolmap or pyceres: no
new dependency (scipy and PoseLib are required already), the problem is small (10^2-10^3
frames, 10^4-10^5 points; the reduced camera system is solved densely), and the robust
loss, the priors and their variance components are exactly what this module documents.
pyceres with Python cost functions would pay a Python call per residual; pycolmap would be
a new binary dependency for one function. scipy's least_squares applies a robust loss per
scalar residual, not per 2D observation, and does not expose the reduced camera matrix the
variance components need. Beyond a few thousand frames split the map into regions.

Priors (gauge and metric scale). Each frame contributes residuals
``log(R R0^T) / prior_rotation_std`` and ``(C - C0) / prior_position_std`` (R: world-to-camera
rotation, C: camera centre, 0: input). Images fix everything except a 7-dof similarity
(scale included); the priors of all frames together pin that similarity to the input
poses (a least-squares alignment to them: gauge and metric scale), while each frame can
still move by what its images demand. A frame without verified matches keeps its input pose.

Prior weights from the data (``estimate_prior_std``, default on). How good input poses are
depends on their source (KITTI's GNSS/INS agrees with its images to ~0.02 deg between
neighbours, 7-Scenes' KinectFusion to ~1-2 deg), so no fixed weight suits all. The
configured stds (1 deg, 5 cm: a generic SLAM keyframe) start the BA; then the variance
components of the three groups (pixels, prior rotations, prior positions) are estimated
from their residuals and redundancies (Foerstner), and the BA is re-run with them
(``variance_iterations`` times). Consistent input poses thereby get stiff priors and move
little; inconsistent ones get weak priors. Estimated stds are capped at 10x the configured
ones so the priors always hold the gauge.

Common rotation (``keep_common_rotation``, default on). A rotation shared by all frames in
the camera frame (R_wc = R0_wc B) is a calibration matter: a camera-to-body rotation or a
principal-point error looks exactly like it for distant points (KITTI: 0.19 deg pitch,
0.12 deg yaw, the same for every frame). Queries localized in the map, and a robot that
converts their poses to its body with the same calibration, share it; so it is reported
(``common_rotation_deg``) and taken out of the output poses, not "corrected".

Depth is not used: points come from the images only (for RGB-D frames the poses can be
refined the same way; depth points do not constrain this BA).

Units: poses are T_world_cam [4, 4] (camera-to-world, OpenCV axes, metres); pixels are
those of each frame's own image (undistorted keypoints, ideal pinhole with its K).
"""
from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

# poselib, scipy.sparse and scipy.linalg are imported where used: maps imports this module
# for RefineConfig, and every map build and node start would pay ~0.13 s for them
# (`python -X importtime -c 'import reloc_ros.maps'`: 0.26 s before, 0.13 s after).

from reloc_ros.features import FeatureConfig, SiftExtractor, match_descriptors, root_sift, undistort_keypoints
from reloc_ros.geometry import check_pose, project_to_so3, rotation_angle_deg, umeyama
from reloc_ros.types import InvalidInputError, PosedFrame

log = logging.getLogger("reloc_ros.refine")

LOSSES = ("cauchy", "huber", "linear")


@dataclass
class RefineConfig:
    """Options of map refinement (``refine``, ``refine_frames``); pixel values are image pixels.

    features: local features (use the map's ``MapBuildConfig.features`` so keypoints agree).
    pairs_per_frame: other frames matched with each frame (chosen by pose, see module doc).
    max_view_angle_deg: paired frames' optical axes differ by at most this.
    verify_px: relative-pose LO-RANSAC threshold (PoseLib max epipolar error, pixels).
    min_pair_inliers: a pair with fewer verified matches is dropped.
    prior_gate_sigmas: before RANSAC, matches farther from the epipolar line of the input
        poses than this many prior rotation stds (at the focal length, pixels) are dropped.
    min_track_length: observations a track needs (2 = pairs allowed; longer tracks come
        from union-find over all pairs).
    init_max_reproj_px: observation kept for the initial triangulation under input poses
        only within this reprojection error (loose: input poses are a few pixels off).
    min_angle_deg: smallest largest-ray-angle of a track for its point to enter the BA.
    max_points: keep at most this many tracks (longest first) to bound time and memory.
    pixel_std: standard deviation of a keypoint (pixels), the unit of the robust loss.
    loss: robust loss per observation on its reprojection error: 'cauchy', 'huber', 'linear'.
    loss_scale_px: where the robust loss starts to down-weight (pixels).
    outlier_px: after each BA round, observations beyond this error are removed (the last
        round's removal only trims the returned points).
    prior_position_std_m: prior standard deviation of each camera centre (metres).
    prior_rotation_std_deg: prior standard deviation of each camera rotation (degrees).
    max_iterations: LM iterations per BA run; rounds: BA rounds (outliers removed between).
    estimate_prior_std: re-estimate the prior and pixel stds from the residuals (variance
        components, ``variance_iterations`` BA runs per round), starting from the values above;
        the prior stds are capped at 10x the configured ones. Off: the configured stds hold.
    keep_common_rotation: take the rotation common to all frames (camera frame) out of the
        refined poses (see the module docstring: it is a calibration matter the queries share).
    """

    features: FeatureConfig = field(default_factory=FeatureConfig)
    pairs_per_frame: int = 10
    max_view_angle_deg: float = 60.0
    verify_px: float = 1.0
    min_pair_inliers: int = 20
    prior_gate_sigmas: float = 3.0
    min_track_length: int = 2
    init_max_reproj_px: float = 8.0
    min_angle_deg: float = 1.0
    max_points: int = 200000
    pixel_std: float = 1.0
    loss: str = "cauchy"
    loss_scale_px: float = 2.0
    outlier_px: float = 4.0
    prior_position_std_m: float = 0.05
    prior_rotation_std_deg: float = 1.0
    max_iterations: int = 30
    rounds: int = 2
    estimate_prior_std: bool = True
    variance_iterations: int = 3
    keep_common_rotation: bool = True

    def validate(self) -> None:
        self.features.validate()
        if self.pairs_per_frame < 1:
            raise ValueError("refine.pairs_per_frame must be >= 1")
        if self.loss not in LOSSES:
            raise ValueError(f"refine.loss must be one of {LOSSES}, got {self.loss!r}")
        if self.min_track_length < 2:
            raise ValueError("refine.min_track_length must be >= 2")
        if self.min_pair_inliers < 8:
            raise ValueError("refine.min_pair_inliers must be >= 8 (five-point RANSAC needs a margin)")
        for name in ("verify_px", "init_max_reproj_px", "pixel_std", "loss_scale_px", "outlier_px",
                     "prior_position_std_m", "prior_rotation_std_deg", "max_view_angle_deg",
                     "prior_gate_sigmas"):
            v = getattr(self, name)
            if not (np.isfinite(v) and v > 0):
                raise ValueError(f"refine.{name} must be a positive number, got {v!r}")
        if self.min_angle_deg < 0:
            raise ValueError("refine.min_angle_deg must be >= 0")
        if min(self.max_points, self.max_iterations, self.rounds, self.variance_iterations) < 1:
            raise ValueError("refine.max_points, max_iterations, rounds and variance_iterations must be >= 1")


@dataclass
class RefineReport:
    """What refinement did. Distances in centimetres, angles in degrees, errors in pixels.

    moved_cm / moved_deg: per frame, camera-centre and rotation change (input -> refined).
    scale_correction: scale applied after the BA to fit its centres to the input ones in
        closed form (1 = the BA had converged along that gauge direction).
    common_rotation_deg: angle of the rotation common to all frames in the camera frame
        (images vs input; taken out of the output with ``keep_common_rotation``).
    scale_change: 1 / scale of the similarity that maps the refined camera centres best onto
        the input ones (the criterion of the position priors; 1 = metric scale kept).
        (A fit the other way round, input onto refined, reads lower by regression dilution
        when frames move independently: 0.980 on 7-Scenes for the same poses.)
    extent_ratio: RMS spread of the refined centres over that of the input ones.
    gauge_shift_cm: shift of the centres' mean.
    reproj_px_before / after: median reprojection error of the final observations under the
        input poses (points triangulated from them) and under the refined poses and points.
    variance_components: per BA run, the estimated stds (rotation_deg, position_m, pixel)
        and the prior groups' redundancies (see ``estimate_prior_std``).
    """

    num_frames: int = 0
    num_pairs: int = 0
    num_pairs_verified: int = 0
    num_frames_connected: int = 0
    num_tracks: int = 0
    num_observations: int = 0
    track_length_median: float = 0.0
    track_length_max: int = 0
    tracks_over_two_views: float = 0.0
    inconsistent_tracks: int = 0
    reproj_px_before: float = float("nan")
    reproj_px_after: float = float("nan")
    iterations: int = 0
    scale_correction: float = 1.0
    common_rotation_deg: float = 0.0
    variance_components: List[Dict[str, float]] = field(default_factory=list)
    moved_cm: List[float] = field(default_factory=list)
    moved_deg: List[float] = field(default_factory=list)
    scale_change: float = 1.0
    extent_ratio: float = 1.0
    gauge_shift_cm: float = 0.0
    seconds: Dict[str, float] = field(default_factory=dict)

    def summary(self) -> str:
        m, d = np.asarray(self.moved_cm), np.asarray(self.moved_deg)
        vc = self.variance_components[-1] if self.variance_components else None
        mv = (f"poses moved median {np.median(m):.2f} cm / {np.median(d):.3f} deg, max {m.max():.2f} cm / "
              f"{d.max():.3f} deg" if len(m) else "no poses")
        return (f"{self.num_frames} frames ({self.num_frames_connected} connected), {self.num_pairs_verified}/"
                f"{self.num_pairs} pairs verified, {self.num_tracks} tracks ({self.num_observations} observations, "
                f"length median {self.track_length_median:.0f} max {self.track_length_max}, "
                f"{100 * self.tracks_over_two_views:.0f} % over two views), reprojection median "
                f"{self.reproj_px_before:.2f} -> {self.reproj_px_after:.2f} px, {mv}; scale change "
                f"{self.scale_change:.5f}, gauge shift {self.gauge_shift_cm:.2f} cm, common rotation "
                f"{self.common_rotation_deg:.3f} deg, {self.iterations} LM iterations, "
                + (f"prior std estimated {vc['rotation_deg']:.3f} deg / {100 * vc['position_m']:.2f} cm, pixel "
                   f"{vc['pixel']:.2f}, " if vc else "")
                + f"{sum(self.seconds.values()):.1f} s")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        m, a = np.asarray(self.moved_cm), np.asarray(self.moved_deg)
        if len(m):
            d.update(moved_cm_median=float(np.median(m)), moved_cm_max=float(m.max()),
                     moved_deg_median=float(np.median(a)), moved_deg_max=float(a.max()))
        return d


@dataclass
class RefineResult:
    """Refined poses and the BA's points.

    T_world_cam: [N, 4, 4] refined poses (input order); with ``keep_common_rotation`` the
    rotation common to all frames is taken out (the input's camera calibration kept).
    T_world_cam_images: [N, 4, 4] the BA's poses as the images have them (with the common
    rotation); ``points`` [P, 3] (world metres) are consistent with these.
    obs_frame / obs_keypoint / obs_point: [O] the observations kept (frame index, keypoint
    index within that frame's features, point index). keypoints: per frame [Ni, 2]
    undistorted pixels (the features the observations index).
    """

    T_world_cam: np.ndarray
    points: np.ndarray
    obs_frame: np.ndarray
    obs_keypoint: np.ndarray
    obs_point: np.ndarray
    keypoints: List[np.ndarray]
    report: RefineReport
    T_world_cam_images: Optional[np.ndarray] = None

    def points_per_frame(self) -> List[np.ndarray]:
        """Per frame [Ni, 3] float32: the BA point of each keypoint, NaN where it has none.

        Indexed like the frame's keypoints, i.e. like ``build_map``'s per-keyframe points when
        it extracts with the same FeatureConfig (or is given the same ``feature_cache``).
        """
        out = [np.full((len(k), 3), np.nan, np.float32) for k in self.keypoints]
        for f in range(len(out)):
            s = self.obs_frame == f
            out[f][self.obs_keypoint[s]] = self.points[self.obs_point[s]]
        return out


# ----------------------------------------------------------------------------- helpers


def _so3_exp(w: np.ndarray) -> np.ndarray:
    """Batched rotation matrices [..., 3, 3] of rotation vectors w [..., 3]."""
    th = np.linalg.norm(w, axis=-1)[..., None, None]
    K = np.zeros(w.shape[:-1] + (3, 3))
    K[..., 0, 1], K[..., 0, 2], K[..., 1, 2] = -w[..., 2], w[..., 1], -w[..., 0]
    K[..., 1, 0], K[..., 2, 0], K[..., 2, 1] = w[..., 2], -w[..., 1], w[..., 0]
    small = th < 1e-8
    ths = np.where(small, 1.0, th)
    a = np.where(small, 1.0, np.sin(ths) / ths)
    b = np.where(small, 0.5, (1 - np.cos(ths)) / ths**2)
    return np.eye(3) + a * K + b * (K @ K)


def _so3_log(R: np.ndarray) -> np.ndarray:
    """Batched rotation vectors [..., 3] of rotations [..., 3, 3] (angles below ~179 deg)."""
    c = np.clip((np.trace(R, axis1=-2, axis2=-1) - 1) / 2, -1, 1)
    th = np.arccos(c)
    v = np.stack([R[..., 2, 1] - R[..., 1, 2], R[..., 0, 2] - R[..., 2, 0], R[..., 1, 0] - R[..., 0, 1]], -1)
    s = np.sin(th)
    f = np.where(th < 1e-8, 0.5, th / (2 * np.where(th < 1e-8, 1.0, s)))
    return v * f[..., None]


class _UnionFind:
    def __init__(self, n: int):
        self.parent = np.arange(n)

    def find(self, a: int) -> int:
        p = self.parent
        root = a
        while p[root] != root:
            root = p[root]
        while p[a] != root:
            p[a], a = root, p[a]
        return root

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


def _select_pairs(T: np.ndarray, cfg: RefineConfig) -> List[Tuple[int, int]]:
    """Unordered frame pairs (i < j): per frame, candidates within the view angle, spread over distance."""
    c, z = T[:, :3, 3], T[:, :3, 2]
    pairs = set()
    for i in range(len(T)):
        ang = np.degrees(np.arccos(np.clip(z @ z[i], -1, 1)))
        cand = np.nonzero((ang < cfg.max_view_angle_deg) & (np.arange(len(T)) != i))[0]
        if len(cand) > cfg.pairs_per_frame:
            cand = cand[np.argsort(np.linalg.norm(c[cand] - c[i], axis=1))]
            cand = cand[np.unique(np.round(np.linspace(0, len(cand) - 1, cfg.pairs_per_frame)).astype(int))]
        pairs.update((min(i, int(j)), max(i, int(j))) for j in cand)
    return sorted(pairs)


def _verify_pair(x1: np.ndarray, x2: np.ndarray, K1: np.ndarray, K2: np.ndarray, T_w1: np.ndarray,
                 T_w2: np.ndarray, cfg: RefineConfig) -> Optional[np.ndarray]:
    """Inlier mask of matches x1 <-> x2 (pixels) of frames with input poses T_w1, T_w2, or None.

    First a loose gate under the input poses: a match farther from its epipolar line than a
    ``prior_gate_sigmas`` rotation error would move it (``_gate_px``) cannot be a true match
    for any plausible pose error (this removes repeated-texture false pairs, which an
    essential matrix of their own would accept). Then a relative pose by LO-RANSAC at
    ``verify_px`` from the images alone decides the inliers.
    """
    if len(x1) < cfg.min_pair_inliers:
        return None
    gate = _sampson(_fundamental(K1, T_w1, K2, T_w2), x1, x2) <= _gate_px(K1, K2, cfg)
    if gate.sum() < cfg.min_pair_inliers:
        return None
    # PoseLib LO-RANSAC (5-point, the project's robust estimator): on 27 KITTI pairs 1.35x
    # faster than OpenCV's findEssentialMat at the same threshold, with 1.4 % more inliers.
    # Keypoints are already undistorted.
    cams = [{"model": "PINHOLE", "width": 0, "height": 0, "params": [K[0, 0], K[1, 1], K[0, 2], K[1, 2]]}
            for K in (K1, K2)]
    import poselib

    _, info = poselib.estimate_relative_pose(x1[gate].astype(np.float64), x2[gate].astype(np.float64), cams[0],
                                             cams[1], {"max_epipolar_error": cfg.verify_px, "min_iterations": 100,
                                                       "max_iterations": 2000}, {})
    mask = np.asarray(info.get("inliers", []), bool)
    if mask.shape != (int(gate.sum()),):
        return None
    inl = np.zeros(len(x1), bool)
    inl[np.nonzero(gate)[0][mask]] = True
    return inl if inl.sum() >= cfg.min_pair_inliers else None


def _gate_px(K1: np.ndarray, K2: np.ndarray, cfg: RefineConfig) -> float:
    """Epipolar gate (pixels) under the input poses: ``prior_gate_sigmas`` prior rotation stds at the focal length."""
    f = max(K1[0, 0], K1[1, 1], K2[0, 0], K2[1, 1])
    return max(4 * cfg.verify_px, cfg.prior_gate_sigmas * np.radians(cfg.prior_rotation_std_deg) * f)


def _fundamental(K1: np.ndarray, T_w1: np.ndarray, K2: np.ndarray, T_w2: np.ndarray) -> np.ndarray:
    """F with x2^T F x1 = 0 for pixels of cameras 1 and 2 (camera-to-world poses)."""
    T21 = np.linalg.inv(T_w2) @ T_w1
    t = T21[:3, 3]
    tx = np.array([[0, -t[2], t[1]], [t[2], 0, -t[0]], [-t[1], t[0], 0]])
    return np.linalg.inv(K2).T @ tx @ T21[:3, :3] @ np.linalg.inv(K1)


def _sampson(F: np.ndarray, x1: np.ndarray, x2: np.ndarray) -> np.ndarray:
    h1 = np.concatenate([x1, np.ones((len(x1), 1))], 1)
    h2 = np.concatenate([x2, np.ones((len(x2), 1))], 1)
    Fx1, Ftx2 = h1 @ F.T, h2 @ F
    num = np.sum(h2 * Fx1, axis=1) ** 2
    return np.sqrt(num / np.maximum(Fx1[:, 0] ** 2 + Fx1[:, 1] ** 2 + Ftx2[:, 0] ** 2 + Ftx2[:, 1] ** 2, 1e-12))


def _triangulate(P: np.ndarray, x: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """DLT of tracks: P [T, L, 3, 4] projection matrices, x [T, L, 2] pixels, valid [T, L] -> [T, 3]."""
    w = valid[..., None].astype(np.float64)
    A = np.concatenate([(x[..., 0:1] * P[..., 2, :] - P[..., 0, :]) * w,
                        (x[..., 1:2] * P[..., 2, :] - P[..., 1, :]) * w], axis=1)
    A /= np.maximum(np.linalg.norm(A, axis=2, keepdims=True), 1e-12)
    Xh = np.linalg.svd(A)[2][:, -1, :]
    return Xh[:, :3] / np.where(np.abs(Xh[:, 3:]) < 1e-12, 1e-12, Xh[:, 3:])


def _project(R: np.ndarray, C: np.ndarray, K: np.ndarray, X: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Per observation: pixels [O, 2] and camera-frame points [O, 3] (R [O,3,3] world-to-camera)."""
    Xc = np.einsum("oij,oj->oi", R, X - C)
    z = np.where(np.abs(Xc[:, 2]) < 1e-9, 1e-9, Xc[:, 2])
    uv = np.stack([K[:, 0, 0] * Xc[:, 0] / z + K[:, 0, 2], K[:, 1, 1] * Xc[:, 1] / z + K[:, 1, 2]], 1)
    return uv, Xc


def _robust(s2: np.ndarray, loss: str, c: float) -> Tuple[np.ndarray, np.ndarray]:
    """(rho(s^2), weight = rho'(s^2)) of squared normalised residuals s2, loss scale c (same unit)."""
    if loss == "linear":
        return s2, np.ones_like(s2)
    if loss == "huber":
        s = np.sqrt(s2)
        big = s > c
        return np.where(big, 2 * c * s - c * c, s2), np.where(big, c / np.maximum(s, 1e-12), 1.0)
    return c * c * np.log1p(s2 / (c * c)), 1.0 / (1.0 + s2 / (c * c))  # cauchy


# ------------------------------------------------------------------------ bundle adjustment


class _Coupling:
    """The camera-point block W [6n, 3m] of the normal equations, one 6x3 block per observation.

    Kept as block-sparse rows (BSR) sorted by camera, so W V^-1 (V block diagonal) has the
    same pattern and is formed blockwise without a general sparse product.
    """

    def __init__(self, blocks: np.ndarray, cam: np.ndarray, pt: np.ndarray, n: int, m: int):
        self.order = np.lexsort((pt, cam))
        self.pt = pt[self.order]
        self.indptr = np.searchsorted(cam[self.order], np.arange(n + 1)).astype(np.int64)
        self.shape = (6 * n, 3 * m)
        self.blocks = blocks[self.order]
        import scipy.sparse as sp

        self.mat = sp.bsr_matrix((self.blocks, self.pt, self.indptr), shape=self.shape)
        self.T = self.mat.T

    def __matmul__(self, x):
        return self.mat @ x

    def times_block_diag(self, D: np.ndarray):
        """W @ blockdiag(D) for D [m, 3, 3], a scipy.sparse.bsr_matrix."""
        import scipy.sparse as sp

        return sp.bsr_matrix((np.einsum("oij,ojk->oik", self.blocks, D[self.pt]), self.pt, self.indptr),
                             shape=self.shape)


class _BA:
    """Robust LM bundle adjustment with pose priors (see module docstring).

    sr / st / spx: current prior rotation std (rad), prior position std (m) and pixel std;
    ``estimate_variances`` updates them from the residuals (variance components).
    """

    def __init__(self, R0: np.ndarray, C0: np.ndarray, K: np.ndarray, cfg: RefineConfig):
        self.R0, self.C0, self.K, self.cfg = R0, C0, K, cfg
        self.sr = np.radians(cfg.prior_rotation_std_deg)
        self.st = cfg.prior_position_std_m
        self.spx = cfg.pixel_std

    def cost(self, R, C, X, cam, pt, uv) -> Tuple[float, np.ndarray, np.ndarray]:
        """(total cost, residuals [O, 2] in pixels, robust weights [O])."""
        proj, _ = _project(R[cam], C[cam], self.K[cam], X[pt])
        e = proj - uv
        s2 = np.sum(e * e, 1) / self.spx**2
        rho, w = _robust(s2, self.cfg.loss, self.cfg.loss_scale_px / self.spx)
        rp = self._prior_res(R, C)
        return float(rho.sum() + np.sum(rp * rp)), e, w

    def _prior_res(self, R, C) -> np.ndarray:
        rr = _so3_log(np.einsum("nij,nkj->nik", R, self.R0)) / self.sr
        return np.concatenate([rr, (C - self.C0) / self.st], 1)

    def _normal(self, R, C, X, cam, pt, e, w):
        """Blocks of the (robustly weighted) normal equations: U [n,6,6], gc [n,6], V [m,3,3], gp [m,3], W sparse."""
        n, m = len(R), len(X)
        # Jacobians of the pixel residual: Xc = R (X - C); rotation as a left perturbation.
        _, Xc = _project(R[cam], C[cam], self.K[cam], X[pt])
        z = Xc[:, 2]
        fx, fy = self.K[cam, 0, 0], self.K[cam, 1, 1]
        Jproj = np.zeros((len(cam), 2, 3))
        Jproj[:, 0, 0], Jproj[:, 0, 2] = fx / z, -fx * Xc[:, 0] / z**2
        Jproj[:, 1, 1], Jproj[:, 1, 2] = fy / z, -fy * Xc[:, 1] / z**2
        skewXc = np.zeros((len(cam), 3, 3))
        skewXc[:, 0, 1], skewXc[:, 0, 2], skewXc[:, 1, 2] = -Xc[:, 2], Xc[:, 1], -Xc[:, 0]
        skewXc[:, 1, 0], skewXc[:, 2, 0], skewXc[:, 2, 1] = Xc[:, 2], -Xc[:, 1], Xc[:, 0]
        Rc = R[cam]
        Jc = np.concatenate([-Jproj @ skewXc, -Jproj @ Rc], axis=2)  # [O, 2, 6]
        Jp = Jproj @ Rc  # [O, 2, 3]
        sw = np.sqrt(w / self.spx**2)[:, None, None]
        Jc, Jp, es = Jc * sw, Jp * sw, e * sw[:, :, 0]
        U = np.zeros((n, 6, 6))
        np.add.at(U, cam, np.einsum("oki,okj->oij", Jc, Jc))
        gc = np.zeros((n, 6))
        np.add.at(gc, cam, np.einsum("oki,ok->oi", Jc, es))
        V = np.zeros((m, 3, 3))
        np.add.at(V, pt, np.einsum("oki,okj->oij", Jp, Jp))
        gp = np.zeros((m, 3))
        np.add.at(gp, pt, np.einsum("oki,ok->oi", Jp, es))
        Wo = np.einsum("oki,okj->oij", Jc, Jp)  # [O, 6, 3]
        # Priors: residual log(R R0^T)/sr (Jacobian ~ I/sr for the small deviations a prior
        # allows) and (C - C0)/st.
        rp = self._prior_res(R, C)
        prior_w = np.concatenate([np.full(3, 1 / self.sr), np.full(3, 1 / self.st)])
        U[:, np.arange(6), np.arange(6)] += prior_w**2
        gc += rp * prior_w
        return U, gc, V, gp, _Coupling(Wo, cam, pt, n, m)

    @staticmethod
    def _schur(U, V, W: "_Coupling", lam):
        """Damped reduced camera matrix S [6n, 6n], V^-1 blocks [m, 3, 3] and W V^-1 (sparse)."""
        import scipy.linalg

        Ud = U.copy()
        Ud[:, np.arange(6), np.arange(6)] *= 1 + lam
        Vd = V.copy()
        Vd[:, np.arange(3), np.arange(3)] = Vd[:, np.arange(3), np.arange(3)] * (1 + lam) + 1e-9
        Vinv = np.linalg.inv(Vd)
        WVi = W.times_block_diag(Vinv)
        S = scipy.linalg.block_diag(*Ud) - (WVi @ W.T).toarray()
        return S, Vinv, WVi

    def run(self, R, C, X, cam, pt, uv) -> Tuple[np.ndarray, np.ndarray, np.ndarray, int]:
        import scipy.linalg

        n, m = len(R), len(X)
        lam = 1e-3
        cost, e, w = self.cost(R, C, X, cam, pt, uv)
        it = 0
        for it in range(1, self.cfg.max_iterations + 1):
            U, gc, V, gp, W = self._normal(R, C, X, cam, pt, e, w)
            while True:
                S, Vinv, WVi = self._schur(U, V, W, lam)
                try:
                    dc = scipy.linalg.solve(S, -gc.ravel() + WVi @ gp.ravel(), assume_a="pos")
                except (np.linalg.LinAlgError, ValueError):
                    dc = None
                if dc is not None:
                    dp = -np.einsum("mij,mj->mi", Vinv, gp + (W.T @ dc).reshape(m, 3))
                    dc = dc.reshape(n, 6)
                    Rn = _so3_exp(dc[:, :3]) @ R
                    Cn, Xn = C + dc[:, 3:], X + dp
                    cn, en, wn = self.cost(Rn, Cn, Xn, cam, pt, uv)
                    if cn < cost:
                        rel = (cost - cn) / max(cost, 1e-12)
                        R, C, X, cost, e, w = Rn, Cn, Xn, cn, en, wn
                        lam = max(lam / 3, 1e-7)
                        break
                lam *= 10
                if lam > 1e8:
                    return R, C, X, it
            if rel < 1e-7 or np.abs(dc).max() < 1e-10:
                break
        return R, C, X, it

    def estimate_variances(self, R, C, X, cam, pt, uv) -> Dict[str, float]:
        """Variance components of the three groups (pixels, prior rotations, prior positions).

        Each group's new variance is its weighted squared residuals over its redundancy
        (Foerstner 1979): for a prior group, redundancy = sum over frames of (dof - tr(P Sigma)),
        with Sigma the frames' marginal covariance (the inverse of the reduced camera matrix);
        the pixel group gets the rest of the total redundancy. A frame the images pin down
        contributes its full prior residual; a direction only the prior fixes contributes none.
        Returns the estimated stds (deg, m, px) before bounding.
        """
        import scipy.linalg

        n = len(R)
        _, e, w = self.cost(R, C, X, cam, pt, uv)
        U, _, V, _, W = self._normal(R, C, X, cam, pt, e, w)
        S, _, _ = self._schur(U, V, W, 0.0)
        try:
            Sig = scipy.linalg.inv(S)
        except (np.linalg.LinAlgError, ValueError):
            return {}
        d = np.diag(Sig).reshape(n, 6)
        rp = self._prior_res(R, C)
        red_r = max(3 * n - np.sum(d[:, :3]) / self.sr**2, 1e-3)
        red_t = max(3 * n - np.sum(d[:, 3:]) / self.st**2, 1e-3)
        red_px = max(2 * len(cam) - 3 * len(X) - (6 * n - red_r - red_t), 1.0)
        var_r = self.sr**2 * np.sum(rp[:, :3] ** 2) / red_r
        var_t = self.st**2 * np.sum(rp[:, 3:] ** 2) / red_t
        var_px = np.sum(w * np.sum(e * e, 1)) / red_px
        return {"rotation_deg": float(np.degrees(np.sqrt(var_r))), "position_m": float(np.sqrt(var_t)),
                "pixel": float(np.sqrt(var_px)), "redundancy_rotation": float(red_r),
                "redundancy_position": float(red_t)}


# ------------------------------------------------------------------------------- public


def refine(frames: Sequence[PosedFrame], config: Optional[RefineConfig] = None,
           feature_cache: Optional[dict] = None) -> RefineResult:
    """Refine the poses of posed frames and triangulate their tracks by bundle adjustment.

    frames: at least two PosedFrames (image, camera, T_world_cam [4, 4] camera-to-world).
    feature_cache: optional dict name -> features.Features shared with ``build_map`` (the same
    dict can be passed to it so features are extracted once); filled here.
    Returns a RefineResult (refined T_world_cam in input order, points, observations, report).
    Raises InvalidInputError for fewer than two frames, a non-rigid pose, a bad camera or
    duplicate names; ValueError for a bad config.
    """
    cfg = config or RefineConfig()
    cfg.validate()
    if len(frames) < 2:
        raise InvalidInputError(f"refinement needs at least two posed frames, got {len(frames)}")
    t0 = time.perf_counter()
    rep = RefineReport(num_frames=len(frames))
    extractor = SiftExtractor(cfg.features)
    T0, Ks, kps, roots, names = [], [], [], [], []
    for i in range(len(frames)):
        fr = frames[i]
        T0.append(check_pose(fr.T_world_cam, f"pose of {fr.name}"))
        fr.camera.validate()
        feats = feature_cache.get(fr.name) if feature_cache is not None else None
        if feats is None:
            feats = extractor(fr.image)
            if feature_cache is not None:
                feature_cache[fr.name] = feats
        kps.append(undistort_keypoints(feats.keypoints, fr.camera).astype(np.float64))
        roots.append(root_sift(feats.descriptors))
        Ks.append(np.asarray(fr.camera.K, np.float64))
        names.append(fr.name)
    if len(set(names)) != len(names):
        raise InvalidInputError("frame names must be unique (they key the feature cache)")
    T0 = np.stack(T0)
    K = np.stack(Ks)
    n = len(frames)
    t1 = time.perf_counter()

    # Pairs, matches verified by the images, tracks by union-find.
    offs = np.concatenate([[0], np.cumsum([len(k) for k in kps])]).astype(np.int64)
    uf = _UnionFind(int(offs[-1]))
    pairs = _select_pairs(T0, cfg)
    rep.num_pairs = len(pairs)
    connected = np.zeros(n, bool)
    for i, j in pairs:
        m = match_descriptors(roots[i], roots[j], cfg.features.ratio, cfg.features.mutual)
        inl = _verify_pair(kps[i][m[:, 0]], kps[j][m[:, 1]], K[i], K[j], T0[i], T0[j], cfg) if len(m) else None
        if inl is None:
            continue
        rep.num_pairs_verified += 1
        connected[[i, j]] = True
        for a, b in m[inl]:
            uf.union(int(offs[i] + a), int(offs[j] + b))
    rep.num_frames_connected = int(connected.sum())
    t2 = time.perf_counter()
    roots_all = np.array([uf.find(k) for k in range(int(offs[-1]))]) if offs[-1] else np.zeros(0, int)
    node_frame = np.repeat(np.arange(n), np.diff(offs))
    node_kp = np.arange(int(offs[-1])) - offs[node_frame]
    sizes = np.bincount(roots_all, minlength=len(roots_all)) if len(roots_all) else np.zeros(0, int)
    in_track = sizes[roots_all] >= 2 if len(roots_all) else np.zeros(0, bool)
    tr_root, tr_frame, tr_kp = roots_all[in_track], node_frame[in_track], node_kp[in_track]
    order = np.lexsort((tr_frame, tr_root))
    tr_root, tr_frame, tr_kp = tr_root[order], tr_frame[order], tr_kp[order]
    # A track holding two keypoints of one frame joined two different points: drop it.
    same = (tr_root[1:] == tr_root[:-1]) & (tr_frame[1:] == tr_frame[:-1])
    bad_roots = np.unique(tr_root[1:][same])
    rep.inconsistent_tracks = len(bad_roots)
    dup = np.isin(tr_root, bad_roots)
    tr_root, tr_frame, tr_kp = tr_root[~dup], tr_frame[~dup], tr_kp[~dup]
    uniq, tid, tlen = np.unique(tr_root, return_inverse=True, return_counts=True)
    keep_t = tlen >= cfg.min_track_length
    if keep_t.sum() > cfg.max_points:
        keep_t &= tlen >= np.sort(tlen)[::-1][cfg.max_points - 1]
        keep_t[np.nonzero(keep_t)[0][cfg.max_points:]] = False
    sel = keep_t[tid]
    tid = np.cumsum(keep_t)[tid[sel]] - 1
    obs_f, obs_k = tr_frame[sel], tr_kp[sel]
    obs_uv = np.array([kps[f][k] for f, k in zip(obs_f, obs_k)]).reshape(-1, 2)
    num_t = int(keep_t.sum())

    # Initial points under the input poses.
    R_wc0 = T0[:, :3, :3]
    Rcw0 = np.swapaxes(R_wc0, 1, 2)
    C0 = T0[:, :3, 3].copy()
    P = K @ np.concatenate([Rcw0, -Rcw0 @ C0[:, :, None]], 2)
    X, valid_obs = _init_points(P, C0, obs_f, obs_uv, tid, num_t, cfg)
    t3 = time.perf_counter()

    R, C = Rcw0.copy(), C0.copy()
    cam, pt, uv, okp = obs_f[valid_obs], tid[valid_obs], obs_uv[valid_obs], obs_k[valid_obs]
    ba = _BA(Rcw0, C0, K, cfg)
    for rnd in range(cfg.rounds):
        X, cam, pt, uv, okp = _keep_observed_points(X, cam, pt, uv, okp)
        if len(cam) == 0:
            break
        for _ in range(cfg.variance_iterations if cfg.estimate_prior_std else 1):
            R, C, X, its = ba.run(R, C, X, cam, pt, uv)
            rep.iterations += its
            if cfg.estimate_prior_std:
                est = ba.estimate_variances(R, C, X, cam, pt, uv)
                if not est:
                    break
                rep.variance_components.append(est)
                ba.sr = np.radians(np.clip(est["rotation_deg"], 1e-4, 10 * cfg.prior_rotation_std_deg))
                ba.st = float(np.clip(est["position_m"], 1e-5, 10 * cfg.prior_position_std_m))
                ba.spx = float(np.clip(est["pixel"], 0.05, 10.0))
        proj, Xc = _project(R[cam], C[cam], K[cam], X[pt])
        good = (np.linalg.norm(proj - uv, axis=1) <= cfg.outlier_px) & (Xc[:, 2] > 0)
        cam, pt, uv, okp = cam[good], pt[good], uv[good], okp[good]
    X, cam, pt, uv, okp = _keep_observed_points(X, cam, pt, uv, okp)
    t4 = time.perf_counter()

    # Scale and translation are not observed by the images: set them so the refined centres
    # fit the input centres best (least squares), keeping the input's metric scale and
    # position. Only the priors pull LM along this gauge direction; the closed form makes
    # sure it ends there (the image cost does not change). Measured corrections on the
    # shared splits were below 1e-6 (the LM had converged), so this is a guard.
    if n >= 2:
        cm, c0m = C.mean(0), C0.mean(0)
        den = float(np.sum((C - cm) ** 2))
        s_fit = float(np.sum((C0 - c0m) * (C - cm)) / den) if den > 1e-12 else 1.0
        if np.isfinite(s_fit) and s_fit > 0:
            rep.scale_correction = s_fit
            C = c0m + s_fit * (C - cm)
            X = c0m + s_fit * (X - cm)
    T_img = T0.copy()
    T_img[:, :3, :3] = np.swapaxes(R, 1, 2)
    T_img[:, :3, 3] = C
    # Rotation common to all frames in the camera frame: R_wc = R0_wc B (chordal mean).
    B = project_to_so3(np.mean(np.einsum("nji,njk->nik", R_wc0, T_img[:, :3, :3]), axis=0))
    rep.common_rotation_deg = rotation_angle_deg(np.eye(3), B)
    T = T_img.copy()
    if cfg.keep_common_rotation:
        T[:, :3, :3] = T_img[:, :3, :3] @ B.T
    if len(cam):
        proj, _ = _project(R[cam], C[cam], K[cam], X[pt])
        rep.reproj_px_after = float(np.median(np.linalg.norm(proj - uv, axis=1)))
        # "before": the same observations, points re-triangulated under the input poses
        Xb, vb = _init_points(P, C0, cam, uv, pt, len(X), dataclasses.replace(cfg, init_max_reproj_px=1e9,
                                                                                   min_angle_deg=0.0))
        pb, _ = _project(Rcw0[cam], C0[cam], K[cam], Xb[pt])
        rep.reproj_px_before = float(np.median(np.linalg.norm(pb - uv, axis=1)))
        lens = np.bincount(pt)
        rep.num_tracks, rep.num_observations = len(X), len(cam)
        rep.track_length_median = float(np.median(lens))
        rep.track_length_max = int(lens.max())
        rep.tracks_over_two_views = float(np.mean(lens > 2))
    rep.moved_cm = [float(100 * np.linalg.norm(C[i] - C0[i])) for i in range(n)]
    rep.moved_deg = [rotation_angle_deg(T0[i][:3, :3], T[i][:3, :3]) for i in range(n)]
    if n >= 3:
        s, _, _ = umeyama(C, C0, with_scale=True)
        rep.scale_change = float(1.0 / s)
        rep.extent_ratio = float(np.sqrt(np.sum((C - C.mean(0)) ** 2) / max(np.sum((C0 - C0.mean(0)) ** 2), 1e-18)))
    rep.gauge_shift_cm = float(100 * np.linalg.norm(C.mean(0) - C0.mean(0)))
    rep.seconds = {"features": round(t1 - t0, 2), "matching": round(t2 - t1, 2), "tracks": round(t3 - t2, 2),
                   "bundle_adjustment": round(t4 - t3, 2)}
    log.info("refined %d frames: %s", n, rep.summary())
    return RefineResult(T, X.astype(np.float64), cam, okp, pt, kps, rep, T_img)


def _init_points(P: np.ndarray, C: np.ndarray, obs_f: np.ndarray, obs_uv: np.ndarray, tid: np.ndarray,
                 num_t: int, cfg: RefineConfig) -> Tuple[np.ndarray, np.ndarray]:
    """DLT of every track under the projection matrices P [N, 3, 4]; (points [T, 3], observation mask [O]).

    Observations beyond ``init_max_reproj_px`` are dropped (three passes), as are points
    behind a camera, with fewer than two observations, or under ``min_angle_deg``.
    """
    if num_t == 0:
        return np.zeros((0, 3)), np.zeros(len(obs_f), bool)
    order = np.argsort(tid, kind="stable")
    lens = np.bincount(tid, minlength=num_t)
    L = int(lens.max())
    start = np.concatenate([[0], np.cumsum(lens)[:-1]])
    slot = np.arange(len(order)) - start[tid[order]]
    Ps = np.zeros((num_t, L, 3, 4))
    xs = np.zeros((num_t, L, 2))
    valid = np.zeros((num_t, L), bool)
    cs = np.zeros((num_t, L, 3))
    t_o, s_o = tid[order], slot
    Ps[t_o, s_o] = P[obs_f[order]]
    xs[t_o, s_o] = obs_uv[order]
    valid[t_o, s_o] = True
    cs[t_o, s_o] = C[obs_f[order]]
    for _ in range(3):
        X = _triangulate(Ps, xs, valid)
        Xh = np.concatenate([X, np.ones((num_t, 1))], 1)
        p = np.einsum("tlij,tj->tli", Ps, Xh)
        z = np.where(np.abs(p[..., 2]) < 1e-12, 1e-12, p[..., 2])
        err = np.linalg.norm(p[..., :2] / z[..., None] - xs, axis=2)
        bad = valid & ((err > cfg.init_max_reproj_px) | (p[..., 2] <= 0))
        if not bad.any():
            break
        # drop only the worst observation per track per pass, so one bad view does not take the others
        worst = np.argmax(np.where(bad, err + 1e6 * (p[..., 2] <= 0), -1), axis=1)
        has = bad.any(1)
        valid[np.nonzero(has)[0], worst[has]] = False
    X = _triangulate(Ps, xs, valid)
    Xh = np.concatenate([X, np.ones((num_t, 1))], 1)
    p = np.einsum("tlij,tj->tli", Ps, Xh)
    z = np.where(np.abs(p[..., 2]) < 1e-12, 1e-12, p[..., 2])
    err = np.linalg.norm(p[..., :2] / z[..., None] - xs, axis=2)
    valid &= (err <= cfg.init_max_reproj_px) & (p[..., 2] > 0)
    rays = X[:, None, :] - cs
    rays /= np.maximum(np.linalg.norm(rays, axis=2, keepdims=True), 1e-12)
    cosm = np.einsum("tad,tbd->tab", rays, rays)
    cosm = np.where(valid[:, :, None] & valid[:, None, :], cosm, 1.0)
    angle = np.degrees(np.arccos(np.clip(cosm.min(axis=(1, 2)), -1, 1)))
    good_t = (valid.sum(1) >= 2) & (angle >= cfg.min_angle_deg) & np.all(np.isfinite(X), 1)
    valid &= good_t[:, None]
    obs_ok = np.zeros(len(obs_f), bool)
    obs_ok[order] = valid[t_o, s_o]
    return X, obs_ok


def _keep_observed_points(X: np.ndarray, cam: np.ndarray, pt: np.ndarray, uv: np.ndarray, okp: np.ndarray):
    """Drop points [M, 3] seen fewer than twice and their observations (frame index, point
    index, pixel [.., 2], keypoint index), and renumber the points that stay."""
    ok = np.bincount(pt, minlength=len(X))[pt] >= 2
    cam, pt, uv, okp = cam[ok], pt[ok], uv[ok], okp[ok]
    alive = np.unique(pt)
    remap = np.full(len(X), -1)
    remap[alive] = np.arange(len(alive))
    return X[alive], cam, remap[pt], uv, okp


def refine_frames(frames: Sequence[PosedFrame], config: Optional[RefineConfig] = None,
                  feature_cache: Optional[dict] = None) -> Tuple[List[PosedFrame], RefineReport]:
    """Frames with refined T_world_cam (copies; images shared) and the report; see ``refine``.

    Pass the result to ``maps.build_map`` (with the same ``feature_cache`` to reuse features):
    it triangulates its points from the refined poses.
    """
    res = refine(frames, config, feature_cache)
    out = [dataclasses.replace(frames[i], T_world_cam=res.T_world_cam[i].copy()) for i in range(len(frames))]
    return out, res.report
