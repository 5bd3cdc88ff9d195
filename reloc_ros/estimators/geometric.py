"""Geometric pose estimation from local feature matches (no learned weights).

- ``pnp``: 2D-3D matches against the map's 3D points (from depth or triangulated from
  the known keyframe poses), P3P LO-RANSAC + bundle refinement (PoseLib), covariance
  from the reprojection Jacobian at the solution.
- ``essential``: per keyframe, the relative pose (rotation + translation direction,
  the same output as Reloc3r's network) by 5-point LO-RANSAC (PoseLib); the localizer
  fuses the pairs by motion averaging.
- ``auto`` (default): PnP when enough 2D-3D inliers exist, else the essential path.

PoseLib is used over OpenCV and pycolmap: its LO-RANSAC with minimal solvers and
non-linear refinement gives the most accurate poses of the three at the lowest cost,
and it is a small, pip-installable, actively maintained library (also used by
hloc/pycolmap internally for the same estimators).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Literal, Optional, Sequence

import numpy as np
import poselib

from reloc_ros.config import from_dict
from reloc_ros.estimators.base import Estimator, Query
from reloc_ros.features import match_descriptors, root_sift, undistort_keypoints
from reloc_ros.geometry import invert, make_T, rotation_angle_deg, skew
from reloc_ros.types import AbsoluteEstimate, Camera, EstimatorOutput, PairEstimate


@dataclass
class GeometricConfig:
    """Options of the geometric estimator.

    mode: 'auto' | 'pnp' | 'essential'.
    ratio: Lowe ratio for query-keyframe matching.
    mutual: also require mutual nearest neighbours in query-keyframe matching.
    pnp_max_reproj_px: RANSAC inlier threshold (pixels, query image).
    pnp_min_inliers: fewer PnP inliers than this -> no absolute estimate.
    essential_max_epipolar_px: RANSAC inlier threshold of the 5-point solver (pixels).
    essential_min_inliers: pairs with fewer inliers are dropped.
    min_pixel_sigma: floor (pixels) of the reprojection noise used for covariance, so a
        lucky tiny residual never yields an overconfident covariance.
    min_inlier_extent: smallest image fraction the inliers may span (the product of the
        5-95 percentile ranges of their u and v over the image width and height). A
        pose from a small patch is ill-conditioned (tilt trades against translation)
        and is the typical false positive on repeated texture, with a Jacobian
        covariance that looks confident; below this, a PnP pose is reported DEGENERATE
        and an essential-matrix pair is dropped. 0.03 is a patch about 1/6 of the
        image on each side.
    verify_max_rotation_deg: check a PnP pose against the 5-point relative poses to the
        ``verify_keyframes`` keyframes with the most PnP inliers, which use all 2D-2D
        matches and no map points. When at least two such pairs exist and every one
        disagrees with the PnP rotation by more than this, the map points must be wrong
        there (e.g. triangulated from inconsistent poses) and the pose is reported
        DEGENERATE. One pair alone never flags: with a few dozen matches a 5-point pose
        can itself be off by 10-20 deg. None disables the check. The 5-point rotation is
        good to ~1 deg and map inconsistency adds ~2 deg (7-Scenes), so 5 deg flags only
        gross errors.
    verify_keyframes: how many keyframes the check above uses.
    covariance_inflation: variance factor on the PnP covariance. The Jacobian model
        assumes independent pixel noise, but map points carry correlated errors (the
        keyframe poses and depth/triangulation they came from); without it the
        covariance was 10-30x too small in variance (median NEES 25-35 instead of ~2.4
        for 3 dof) on Strecha leave-one-out and KITTI, whose ground truth is sub-cm.
    """

    mode: Literal["auto", "pnp", "essential"] = "auto"
    ratio: float = 0.85
    mutual: bool = True
    pnp_max_reproj_px: float = 6.0
    pnp_min_inliers: int = 20
    essential_max_epipolar_px: float = 1.5
    essential_min_inliers: int = 20
    min_pixel_sigma: float = 0.5
    min_inlier_extent: float = 0.03
    verify_max_rotation_deg: Optional[float] = 5.0
    verify_keyframes: int = 2
    covariance_inflation: float = 10.0
    ransac_min_iterations: int = 100
    ransac_max_iterations: int = 10000

    def validate(self) -> None:
        if not 0.0 <= self.min_inlier_extent < 1.0:
            raise ValueError(f"min_inlier_extent must be in [0, 1), got {self.min_inlier_extent!r}")
        if self.verify_max_rotation_deg is not None and not self.verify_max_rotation_deg > 0:
            raise ValueError(f"verify_max_rotation_deg must be > 0 or None, got {self.verify_max_rotation_deg!r}")
        if self.verify_keyframes < 2:
            raise ValueError("verify_keyframes must be >= 2 (one pair alone never flags)")

    def ransac(self, **threshold) -> dict:
        """PoseLib RANSAC options. Its default of at least 1000 iterations costs ~0.3 s per
        relative pose on this CPU; LO-RANSAC's adaptive stopping is already conservative."""
        return {"min_iterations": self.ransac_min_iterations, "max_iterations": self.ransac_max_iterations,
                **threshold}


def _cam_dict(cam: Camera) -> dict:
    K = cam.K
    return {"model": "PINHOLE", "width": cam.width, "height": cam.height,
            "params": [K[0, 0], K[1, 1], K[0, 2], K[1, 2]]}


def inlier_extent(x: np.ndarray, width: int, height: int) -> float:
    """Image fraction spanned by pixels x [N, 2]: product of the 5-95 percentile ranges
    of u and v over width and height (0..1; robust to a few stray points)."""
    if len(x) < 2:
        return 0.0
    lo, hi = np.percentile(x, [5, 95], axis=0)
    return float((hi[0] - lo[0]) / width * (hi[1] - lo[1]) / height)


def pnp_covariance(T_world_cam: np.ndarray, X: np.ndarray, x: np.ndarray, K: np.ndarray,
                   min_sigma_px: float = 0.5) -> tuple:
    """6x6 covariance of a PnP pose from inlier 2D-3D pairs.

    X: [N, 3] world points (metres); x: [N, 2] observed pixels; K: [3, 3].
    Returns (cov [6, 6] over (centre xyz, rotation xyz) in the world frame with the
    rotation as a left perturbation R = exp([d]x) R_world_cam, rms reprojection px).
    cov = sigma^2 (J^T J)^-1 with sigma^2 the residual variance (2N - 6 dof).
    """
    R = T_world_cam[:3, :3]
    c = T_world_cam[:3, 3]
    d = X - c
    Xc = d @ R  # R^T (X - c), row-wise
    z = Xc[:, 2]
    fx, fy = K[0, 0], K[1, 1]
    u = fx * Xc[:, 0] / z + K[0, 2]
    v = fy * Xc[:, 1] / z + K[1, 2]
    r = np.concatenate([u - x[:, 0], v - x[:, 1]])
    n = len(X)
    dof = max(2 * n - 6, 1)
    sigma2 = max(float(r @ r) / dof, min_sigma_px**2)
    # d(u,v)/d Xc
    Jp = np.zeros((n, 2, 3))
    Jp[:, 0, 0] = fx / z
    Jp[:, 0, 2] = -fx * Xc[:, 0] / z**2
    Jp[:, 1, 1] = fy / z
    Jp[:, 1, 2] = -fy * Xc[:, 1] / z**2
    # d Xc / d centre = -R^T ; d Xc / d theta = R^T [X - c]_x
    Jc = -R.T
    Jt = np.einsum("ij,njk->nik", R.T, np.stack([skew(di) for di in d]))
    J = np.concatenate([Jp @ Jc, np.einsum("nij,njk->nik", Jp, Jt)], axis=2).reshape(2 * n, 6)
    JtJ = J.T @ J
    cov = sigma2 * np.linalg.pinv(JtJ)
    return 0.5 * (cov + cov.T), float(np.sqrt(np.mean(r**2)))


class GeometricEstimator(Estimator):
    name = "geometric"

    def __init__(self, **options):
        self.config: GeometricConfig = from_dict(GeometricConfig, options, "geometric")

    def estimate(self, query: Query, keyframe_ids: Sequence[int], kmap) -> EstimatorOutput:
        cfg = self.config
        timings = {}
        feats = query.features
        q_kp = undistort_keypoints(feats.keypoints, query.camera)
        q_root = root_sift(feats.descriptors)
        out = EstimatorOutput(timings_ms=timings)
        if cfg.mode in ("auto", "pnp"):
            # 2D-3D matching only against keypoints that have a 3D point: fewer
            # candidates, so it is cheaper and the ratio test is not diluted.
            t0 = time.perf_counter()
            matches3d = {}
            for k in map(int, keyframe_ids):
                m = match_descriptors(q_root, kmap.root_descriptors(k, with_points_only=True), cfg.ratio, cfg.mutual)
                matches3d[k] = np.stack([m[:, 0], kmap.point_index(k)[m[:, 1]]], axis=1)
            timings["matching"] = (time.perf_counter() - t0) * 1e3
            t1 = time.perf_counter()
            out.absolute, out.message, best_kfs = self._pnp(q_kp, query.camera, matches3d, kmap)
            timings["pnp"] = (time.perf_counter() - t1) * 1e3
            if out.absolute is not None and not out.absolute.ill_conditioned \
                    and cfg.verify_max_rotation_deg is not None:
                t1 = time.perf_counter()
                out.absolute.ill_conditioned = self._verify_rotation(
                    q_kp, q_root, query.camera, out.absolute, best_kfs[: cfg.verify_keyframes], kmap)
                timings["verify"] = (time.perf_counter() - t1) * 1e3
            if out.absolute is not None or cfg.mode == "pnp":
                return out
        t1 = time.perf_counter()
        matches = {int(k): match_descriptors(q_root, kmap.root_descriptors(int(k)), cfg.ratio, cfg.mutual)
                   for k in keyframe_ids}
        timings["matching_2d2d"] = (time.perf_counter() - t1) * 1e3
        t1 = time.perf_counter()
        out.pairs = self._pairs(q_kp, query.camera, matches, kmap)
        timings["relative_pose"] = (time.perf_counter() - t1) * 1e3
        if not out.pairs:
            out.message = (out.message + "; " if out.message else "") + "no keyframe pair with enough inliers"
        return out

    def _pnp(self, q_kp, camera, matches, kmap):
        cfg = self.config
        xs, Xs, kf_of = [], [], []
        for k, m in matches.items():
            if len(m) == 0:
                continue
            P = kmap.points3d(k)[m[:, 1]]
            ok = np.isfinite(P[:, 0])
            xs.append(q_kp[m[ok, 0]])
            Xs.append(P[ok])
            kf_of.append(np.full(int(ok.sum()), k))
        n = int(sum(len(x) for x in xs))
        if n < max(cfg.pnp_min_inliers, 4):
            return None, f"only {n} 2D-3D matches (need {cfg.pnp_min_inliers})", []
        x = np.concatenate(xs).astype(np.float64)
        X = np.concatenate(Xs).astype(np.float64)
        kf_of = np.concatenate(kf_of)
        pose, info = poselib.estimate_absolute_pose(
            x, X, _cam_dict(camera), cfg.ransac(max_reproj_error=cfg.pnp_max_reproj_px), {"loss_scale": 1.0})
        inl = np.asarray(info["inliers"], bool)
        ni = int(inl.sum())
        if ni < cfg.pnp_min_inliers:
            return None, f"PnP found {ni} inliers of {n} matches (need {cfg.pnp_min_inliers})", []
        T_cam_world = make_T(pose.R, pose.t)
        T_world_cam = invert(T_cam_world)
        cov, rms = pnp_covariance(T_world_cam, X[inl], x[inl], camera.K, cfg.min_pixel_sigma)
        cov = cov * cfg.covariance_inflation
        used, per_kf = np.unique(kf_of[inl], return_counts=True)
        extent = inlier_extent(x[inl], camera.width, camera.height)
        weak = (f"PnP inliers span {extent:.1%} of the image (min_inlier_extent {cfg.min_inlier_extent:.1%})"
                if extent < cfg.min_inlier_extent else "")
        est = AbsoluteEstimate(T_world_cam, cov, ni, [int(k) for k in used], rms, ill_conditioned=weak)
        return est, "", [int(k) for k in used[np.argsort(-per_kf, kind="stable")]]

    def _verify_rotation(self, q_kp, q_root, camera, est: AbsoluteEstimate, keyframes, kmap) -> str:
        """'' when the PnP rotation agrees with a 5-point relative rotation to one of
        ``keyframes`` (or fewer than two pairs can judge), else the reason it does not."""
        cfg = self.config
        matches = {k: match_descriptors(q_root, kmap.root_descriptors(k), cfg.ratio, cfg.mutual) for k in keyframes}
        pairs = self._pairs(q_kp, camera, matches, kmap)
        R_world_query = est.T_world_cam[:3, :3]
        angles = [rotation_angle_deg(p.T_kf_query[:3, :3], kmap.T_world_cam[p.keyframe_id][:3, :3].T @ R_world_query)
                  for p in pairs]
        if len(angles) < 2 or min(angles) <= cfg.verify_max_rotation_deg:
            return ""
        return (f"PnP rotation disagrees by {min(angles):.1f}+ deg with the 5-point relative poses to keyframes "
                f"{[p.keyframe_id for p in pairs]} (verify_max_rotation_deg {cfg.verify_max_rotation_deg:g}): "
                "map points unreliable here")

    def _pairs(self, q_kp, camera, matches, kmap):
        cfg = self.config
        pairs = []
        for k, m in matches.items():
            if len(m) < max(cfg.essential_min_inliers, 5):
                continue
            kf_cam = kmap.cameras[k]
            x_kf = kmap.features(k).keypoints[m[:, 1]].astype(np.float64)
            pose, info = poselib.estimate_relative_pose(
                q_kp[m[:, 0]].astype(np.float64), x_kf, _cam_dict(camera), _cam_dict(kf_cam),
                cfg.ransac(max_epipolar_error=cfg.essential_max_epipolar_px), {})
            ni = int(info["num_inliers"])
            inl = np.asarray(info["inliers"], bool)
            if ni < cfg.essential_min_inliers or \
                    inlier_extent(q_kp[m[inl, 0]], camera.width, camera.height) < cfg.min_inlier_extent:
                continue
            # poselib: X_kf = R X_query + t, i.e. exactly T_kf_query (t has unit norm)
            pairs.append(PairEstimate(k, make_T(pose.R, pose.t), weight=float(ni), inliers=ni, metric=False))
        return pairs

