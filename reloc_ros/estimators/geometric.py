"""Geometric pose estimation from local feature matches (no learned weights).

- ``pnp``: 2D-3D matches against the map's 3D points (from depth or triangulated from
  the known keyframe poses), P3P LO-RANSAC + bundle refinement (PoseLib), covariance
  from the reprojection Jacobian at the solution with variance components estimated
  from the inlier residuals (``pnp_covariance``).
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
from dataclasses import dataclass, field
from typing import Dict, Literal, Optional, Sequence

import numpy as np
import poselib

from reloc_ros.config import from_dict
from reloc_ros.estimators.base import Estimator, Query
from reloc_ros.features import match_descriptors, root_sift, undistort_keypoints
from reloc_ros.geometry import invert, make_T, rotation_angle_deg
from reloc_ros.maps import POINT_DEPTH, POINT_TRIANGULATED
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
    min_pixel_sigma: floor (pixels) of the per-observation reprojection noise of the
        covariance; only a guard against a near-zero residual (exact synthetic data
        gives ~0.35 px), the noise itself is estimated from the inlier residuals.
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
    pnp_refine_sigmas: after LO-RANSAC, the pose is refined once more on its inliers with
        a Cauchy loss whose scale is this many robust standard deviations (1.4826 x the
        median absolute residual coordinate) of those inliers' residuals. 2.385 is the
        textbook Cauchy constant with 95 % efficiency under Gaussian noise, not a fitted
        value; PoseLib's own refinement uses a fixed 1 px scale whatever the noise. 0
        disables. Rendered room with depth (exact ground truth): 0.12 -> 0.09 mm
        (docs/RESULTS.md, issue 13).
    cov_keyframe_gain, cov_depth_field_gain, cov_common_mode: the three constants of
        the PnP covariance model (``pnp_covariance``), fitted together on ONE
        calibration set, the rendered calibration room of bench/bench_covariance.py
        (texture seed 23, its own trajectories; exact maps and maps whose keyframes are
        ~3.5 mm/0.05 deg and ~1 cm/0.3 deg off, with depth noise), by
        ``bench/bench_covariance.py --fit``; no set the covariance is reported on was
        used. cov_keyframe_gain: variance factor on the estimated rigid error of the
        keyframes that depth points come from; cov_depth_field_gain: variance factor on
        the estimated relative depth error field of triangulated points (large: their
        errors are shared by the neighbouring keyframes they were triangulated with, so
        the query sees little of them); cov_common_mode: standard deviation of an error
        common to all observations (detector and camera-model bias), as a fraction of
        the residual standard deviation.
    """

    mode: Literal["auto", "pnp", "essential"] = "auto"
    ratio: float = 0.85
    mutual: bool = True
    pnp_max_reproj_px: float = 6.0
    pnp_min_inliers: int = 20
    essential_max_epipolar_px: float = 1.5
    essential_min_inliers: int = 20
    min_pixel_sigma: float = 0.1
    min_inlier_extent: float = 0.03
    verify_max_rotation_deg: Optional[float] = 5.0
    verify_keyframes: int = 2
    cov_keyframe_gain: float = 1.26
    cov_depth_field_gain: float = 63.1
    cov_common_mode: float = 0.35
    ransac_min_iterations: int = 100
    ransac_max_iterations: int = 10000
    pnp_refine_sigmas: float = 2.385

    def validate(self) -> None:
        if not 0.0 <= self.min_inlier_extent < 1.0:
            raise ValueError(f"min_inlier_extent must be in [0, 1), got {self.min_inlier_extent!r}")
        if self.verify_max_rotation_deg is not None and not self.verify_max_rotation_deg > 0:
            raise ValueError(f"verify_max_rotation_deg must be > 0 or None, got {self.verify_max_rotation_deg!r}")
        if not self.pnp_refine_sigmas >= 0:
            raise ValueError(f"pnp_refine_sigmas must be >= 0 (0 = off), got {self.pnp_refine_sigmas!r}")
        if self.verify_keyframes < 2:
            raise ValueError("verify_keyframes must be >= 2 (one pair alone never flags)")
        for name in ("min_pixel_sigma", "cov_keyframe_gain", "cov_depth_field_gain", "cov_common_mode"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)!r}")

    def ransac(self, **threshold) -> dict:
        """PoseLib RANSAC options. Its default of at least 1000 iterations costs ~0.3 s per
        relative pose on this CPU; LO-RANSAC's adaptive stopping is already conservative."""
        return {"min_iterations": self.ransac_min_iterations, "max_iterations": self.ransac_max_iterations,
                **threshold}


def _cam_dict(cam: Camera) -> dict:
    K = cam.K
    return {"model": "PINHOLE", "width": cam.width, "height": cam.height,
            "params": [K[0, 0], K[1, 1], K[0, 2], K[1, 2]]}


def _residuals(R: np.ndarray, t: np.ndarray, X: np.ndarray, x: np.ndarray, K: np.ndarray) -> np.ndarray:
    """Reprojection residuals [N, 2] (pixels) of world points X [N, 3] observed at x [N, 2]
    under the world-to-camera pose (R, t)."""
    Xc = X @ np.asarray(R).T + np.asarray(t)
    return Xc[:, :2] / Xc[:, 2:3] * [K[0, 0], K[1, 1]] + [K[0, 2], K[1, 2]] - x


def inlier_extent(x: np.ndarray, width: int, height: int) -> float:
    """Image fraction spanned by pixels x [N, 2]: product of the 5-95 percentile ranges
    of u and v over width and height (0..1; robust to a few stray points)."""
    if len(x) < 2:
        return 0.0
    lo, hi = np.percentile(x, [5, 95], axis=0)
    return float((hi[0] - lo[0]) / width * (hi[1] - lo[1]) / height)


@dataclass
class PnPCovariance:
    """A PnP pose covariance and the variance components it was built from.

    covariance: [6, 6] (centre xyz, rotation xyz; world frame, left rotation perturbation).
    rms_px: rms reprojection residual of the inliers (pixels).
    sigma2: estimated variance of each component (see ``pnp_covariance``): 'pixel' and
        'query' (px^2), 'keyframe' (m^2), 'depth_field' (relative depth^2), and
        'residual' (px^2, the a-posteriori variance factor r^T r / (2n - 6)).
    parts: the component's contribution to the 6x6 pose covariance at unit gain
        (already scaled by its estimated variance), for refitting the gains.
    """

    covariance: np.ndarray
    rms_px: float
    sigma2: Dict[str, float] = field(default_factory=dict)
    parts: Dict[str, np.ndarray] = field(default_factory=dict)
    n_keyframes: int = 0

    def combine(self, keyframe_gain: float, depth_field_gain: float, common_mode: float) -> np.ndarray:
        """The covariance under other gains (what ``GeometricConfig.cov_*`` set)."""
        gains = {"pixel": 1.0, "query": 1.0, "keyframe": keyframe_gain, "depth_field": depth_field_gain,
                 "common": common_mode ** 2}
        cov = sum(gains[k] * v for k, v in self.parts.items())
        return 0.5 * (cov + cov.T)


def _moment_solve(A: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Variance components from the moment equations A s = b, none negative.

    A component whose estimate comes out negative (it explains nothing) is set to zero
    and its own equation dropped, then the others are re-solved from theirs (the usual
    truncation of ANOVA estimators). Keeping its equation in a least-squares compromise
    instead would bias the others: with pure pixel noise, the pixel variance came out
    ~15 % low. Column 0 (the independent noise) is never dropped.
    """
    active = list(range(A.shape[1]))
    while True:
        sub = np.linalg.lstsq(A[np.ix_(active, active)], b[active], rcond=None)[0]
        neg = [i for i, v in zip(active, sub) if v < 0 and i != 0]
        if not neg:
            s = np.zeros(A.shape[1])
            s[active] = np.maximum(sub, 0.0)
            return s
        active.remove(min(neg, key=lambda i: sub[active.index(i)]))


def pnp_covariance(T_world_cam: np.ndarray, X: np.ndarray, x: np.ndarray, K: np.ndarray,
                   keyframe: Optional[np.ndarray] = None, source: Optional[np.ndarray] = None,
                   T_world_kf: Optional[np.ndarray] = None, config: Optional[GeometricConfig] = None,
                   query_index: Optional[np.ndarray] = None) -> PnPCovariance:
    """6x6 covariance of a PnP pose from its inlier 2D-3D pairs, with variance components.

    X: [N, 3] world points (metres); x: [N, 2] observed pixels; K: [3, 3].
    keyframe: [N] keyframe index of each map point, source: [N] maps.POINT_* of each,
    T_world_kf: [M, 4, 4] keyframe poses (indexed by keyframe), query_index: [N] query
    keypoint of each pair (a query keypoint matched in several keyframes gives several
    pairs). Without keyframe/source/T_world_kf only the pixel components are modelled.

    The pose is the least-squares solution, so cov = H^-1 (J^T V J) H^-1 with
    H = J^T J and V the covariance of the residual vector r (2N), modelled as a sum of
    variance components, each ``s2_j U_j U_j^T``:

    - 'pixel': independent noise of every pair (U = I);
    - 'query': noise shared by the pairs of one query keypoint (U: indicator per query
      keypoint), so duplicated keypoints do not count as independent;
    - 'keyframe': a rigid displacement of all depth points of one keyframe (6 columns
      per keyframe: its pose error moves them together);
    - 'depth_field': a relative depth error of the triangulated points of one keyframe,
      affine over its image, ``dX = (a + b x_n + c y_n)(X - c_kf)`` (3 columns per
      keyframe: triangulation from imperfect poses errs mostly along the keyframe's
      rays, smoothly over the image).

    The variances are estimated per query from the inlier residuals by the method of
    moments (E[r^T U_a U_a^T r] = sum_j s2_j |U_a^T P U_j|_F^2 with P the residual
    projector), so they adapt to the map: ~0 map components on an exact map, large ones
    on a map whose keyframes disagree. The part of a keyframe error that the pose
    absorbs leaves no residual; ``cov_keyframe_gain`` and ``cov_depth_field_gain`` say
    how much larger the whole is than what the residuals reveal, and a 'common' error
    shared by all observations (a pixel offset of the whole image: detector bias,
    camera model; invisible in residuals) has standard deviation ``cov_common_mode``
    times the residual standard deviation. Those three constants are fitted on the
    calibration set of bench/bench_covariance.py, nowhere else.
    """
    cfg = config or GeometricConfig()
    R = T_world_cam[:3, :3]
    c = T_world_cam[:3, 3]
    n = len(X)
    d = X - c
    Xc = d @ R  # R^T (X - c), row-wise
    z = Xc[:, 2]
    fx, fy = K[0, 0], K[1, 1]
    r = np.stack([fx * Xc[:, 0] / z + K[0, 2] - x[:, 0], fy * Xc[:, 1] / z + K[1, 2] - x[:, 1]], axis=1)  # [n, 2]
    Jp = np.zeros((n, 2, 3))  # d(u, v) / d Xc
    Jp[:, 0, 0] = fx / z
    Jp[:, 0, 2] = -fx * Xc[:, 0] / z ** 2
    Jp[:, 1, 1] = fy / z
    Jp[:, 1, 2] = -fy * Xc[:, 1] / z ** 2
    JX = Jp @ R.T  # d(u, v) / d X (world)
    # d Xc / d centre = -R^T ; d Xc / d theta = R^T [X - c]_x
    J = np.concatenate([-JX, np.cross(JX, d[:, None, :])], axis=2)  # [n, 2, 6]; a [d]_x = (a x d)^T
    H = np.einsum("nik,nil->kl", J, J)
    Hi = np.linalg.pinv(H)
    N = 2 * n
    s2_res = float(np.sum(r ** 2)) / max(N - 6, 1)

    # Pairs of one query keypoint (its duplicates in several keyframes).
    qid = np.unique(x, axis=0, return_inverse=True)[1].ravel() if query_index is None else \
        np.unique(np.asarray(query_index), return_inverse=True)[1].ravel()
    nq = int(qid.max()) + 1 if n else 0
    counts = np.bincount(qid, minlength=nq).astype(np.float64)
    order = np.argsort(qid, kind="stable")
    starts = np.concatenate([[0], np.cumsum(counts[:-1])]).astype(np.int64)

    def group_sum(a: np.ndarray) -> np.ndarray:  # [n, 2, ...] -> [nq, 2, ...] (every group is non-empty)
        return np.add.reduceat(a[order], starts, axis=0)

    blocks: Dict[str, list] = {}  # map component -> per-keyframe (rows, [m, 2, w] columns)
    n_kf = 0
    if keyframe is not None and source is not None and T_world_kf is not None and n:
        ids, slot = np.unique(np.asarray(keyframe), return_inverse=True)
        slot = slot.ravel()
        source = np.asarray(source)
        n_kf = len(ids)
        Tk = np.asarray(T_world_kf, np.float64)[ids]
        dk = X - Tk[slot, :3, 3]  # from the keyframe centre (world)
        xk = np.einsum("nij,ni->nj", Tk[slot, :3, :3], dk)  # in keyframe camera coordinates
        for name, src_val in (("keyframe", POINT_DEPTH), ("depth_field", POINT_TRIANGULATED)):
            m = source == src_val
            m &= np.bincount(slot[m], minlength=n_kf)[slot] >= 3  # keyframes with a few such points
            if not m.any():
                continue
            used, col = np.unique(slot[m], return_inverse=True)
            if name == "keyframe":  # rigid: d X = R_k (dt + dw x x_k), rotation scaled by the median range
                JXR = np.einsum("nij,njk->nik", JX[m], Tk[slot[m], :3, :3])
                rng = np.array([np.median(np.linalg.norm(dk[m][col == j], axis=1)) for j in range(len(used))])
                rot = -np.cross(JXR, xk[m][:, None, :]) / np.maximum(rng[col], 1e-3)[:, None, None]
                cols = np.concatenate([JXR, rot], axis=2)
            else:  # relative depth field: d X = (a + b x_n + c y_n) (X - c_k)
                zk = np.where(np.abs(xk[m, 2]) > 1e-9, xk[m, 2], 1e-9)
                g = np.einsum("nij,nj->ni", JX[m], dk[m])
                cols = g[:, :, None] * np.stack([np.ones(len(zk)), xk[m, 0] / zk, xk[m, 1] / zk], axis=1)[:, None, :]
            rows = np.nonzero(m)[0]
            blocks[name] = [(rows[col == j], cols[col == j]) for j in range(len(used))]

    # Method of moments on E[|U_a^T r|^2] = sum_j s2_j |U_a^T P U_j|_F^2, P = I - J H^-1 J^T,
    # with |S - L_a H^-1 L_b^T|_F^2 = |S|^2 - 2 <L_a^T S L_b, H^-1> + tr(L_a^T L_a H^-1 L_b^T L_b H^-1)
    # for S = U_a^T U_b and L = U^T J. A map component is a list of per-keyframe blocks on
    # disjoint rows, so every product stays small (no large threaded BLAS call).
    names = ["pixel", "query", *blocks]
    Lq3 = group_sum(J)  # [nq, 2, 6]
    L = {"pixel": J.reshape(N, 6), "query": Lq3.reshape(2 * nq, 6)}  # U^T J
    Ut_r = {"pixel": r.reshape(-1), "query": group_sum(r).reshape(-1)}
    norm2 = {"pixel": float(N), "query": float(N)}  # |U|_F^2
    znorm2, LqZUL, LSL = {}, {}, {}  # |Z^T U|^2, L_q^T Z^T U L, sum_b L_b^T (U_b^T U_b) L_b
    for name, bl in blocks.items():
        Ls, Us, gram2, lzu, lsl, zn = [], [], 0.0, [], np.zeros((6, 6)), 0.0
        for rows, B in bl:
            B2 = B.reshape(-1, B.shape[2])
            Lb = np.einsum("mw,mk->wk", B2, J[rows].reshape(-1, 6))
            Gb = np.einsum("mw,mv->wv", B2, B2)
            Ls.append(Lb)
            Us.append(np.einsum("mw,m->w", B2, r[rows].reshape(-1)))
            gram2 += float(np.sum(Gb ** 2))
            lsl += Lb.T @ Gb @ Lb
            lzu.append(np.einsum("mk,mw->kw", Lq3[qid[rows]].reshape(-1, 6), B2))
            g, inv = np.unique(qid[rows], return_inverse=True)  # rows of one query keypoint sum up
            zb = np.zeros((len(g), 2, B.shape[2]))
            np.add.at(zb, inv.ravel(), B)
            zn += float(np.sum(zb ** 2))
        L[name] = np.concatenate(Ls, axis=0)
        Ut_r[name] = np.concatenate(Us)
        norm2[name] = float(sum(np.sum(B ** 2) for _, B in bl))
        znorm2[name] = zn
        LqZUL[name] = np.concatenate(lzu, axis=1) @ L[name]
        LSL[name] = (gram2, lsl)
    LtL = {k: np.einsum("mk,ml->kl", v, v) for k, v in L.items()}

    def fro2(S2: float, LaSLb: np.ndarray, a: str, b: str) -> float:
        return S2 - 2.0 * float(np.sum(LaSLb * Hi)) + float(np.trace(LtL[a] @ Hi @ LtL[b] @ Hi))

    A = np.zeros((len(names), len(names)))
    for i, a in enumerate(names):
        for j in range(i, len(names)):
            b = names[j]
            if a == "pixel":  # U_a = I
                val = (N - 6.0) if b == "pixel" else norm2[b] - float(np.trace(Hi @ LtL[b]))
            elif a == "query" and b == "query":
                D = np.repeat(counts, 2)
                val = fro2(float(np.sum(D ** 2)), np.einsum("mk,m,ml->kl", L["query"], D, L["query"]), a, b)
            elif a == "query":
                val = fro2(znorm2[b], LqZUL[b], a, b)
            elif a == b:
                val = fro2(LSL[a][0], LSL[a][1], a, b)
            else:  # two map components never share a row: U_a^T U_b = 0
                val = fro2(0.0, np.zeros((6, 6)), a, b)
            A[i, j] = A[j, i] = val
    rhs = np.array([float(Ut_r[k] @ Ut_r[k]) for k in names])
    s2 = dict(zip(names, _moment_solve(A, rhs)))
    floor = cfg.min_pixel_sigma ** 2
    if s2["pixel"] + s2["query"] < floor:
        s2["pixel"] = floor - s2["query"]
    Jsum = J.sum(axis=0)  # [2, 6]: the pose's response to one pixel offset of every observation
    meats = {"pixel": s2["pixel"] * H, "query": s2["query"] * LtL["query"],
             **{k: s2[k] * LtL[k] for k in blocks}, "common": s2_res * (Jsum.T @ Jsum)}
    parts = {k: Hi @ M @ Hi for k, M in meats.items()}
    s2["residual"] = s2_res
    pc = PnPCovariance(np.zeros((6, 6)), float(np.sqrt(np.mean(r ** 2))) if n else float("nan"),
                       {k: float(v) for k, v in s2.items()}, parts, n_kf)
    pc.covariance = pc.combine(cfg.cov_keyframe_gain, cfg.cov_depth_field_gain, cfg.cov_common_mode)
    return pc


class GeometricEstimator(Estimator):
    name = "geometric"

    def __init__(self, **options):
        self.config: GeometricConfig = from_dict(GeometricConfig, options, "geometric")
        # The decomposition behind the last PnP covariance (diagnostics; what
        # bench/bench_covariance.py --fit refits the constants from). None before the first.
        self.last_pnp_covariance: Optional[PnPCovariance] = None
        # Per-stage counts of the last ``estimate`` call (diagnostics for
        # ``bench/bench_core.py --stages``; references to arrays already computed, no copies):
        # query_features, matches_per_kf {kf: 2D-3D matches}, pnp_matches, pnp_inliers,
        # inliers_per_kf {kf: n}, and the inliers' query pixels 'inlier_x' [n, 2] (undistorted)
        # and world points 'inlier_X' [n, 3].
        self.last_stats: Dict[str, object] = {}

    def estimate(self, query: Query, keyframe_ids: Sequence[int], kmap) -> EstimatorOutput:
        cfg = self.config
        timings = {}
        feats = query.features
        q_kp = undistort_keypoints(feats.keypoints, query.camera)
        q_root = root_sift(feats.descriptors)
        out = EstimatorOutput(timings_ms=timings)
        self.last_stats = stats = {"query_features": len(q_kp)}
        if cfg.mode in ("auto", "pnp"):
            # 2D-3D matching only against keypoints that have a 3D point: fewer
            # candidates, so it is cheaper and the ratio test is not diluted.
            t0 = time.perf_counter()
            matches3d = {}
            for k in map(int, keyframe_ids):
                m = match_descriptors(q_root, kmap.root_descriptors(k, with_points_only=True), cfg.ratio, cfg.mutual)
                matches3d[k] = np.stack([m[:, 0], kmap.point_index(k)[m[:, 1]]], axis=1)
            timings["matching"] = (time.perf_counter() - t0) * 1e3
            stats["matches_per_kf"] = {k: len(m) for k, m in matches3d.items()}
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
        xs, Xs, kf_of, srcs, qis = [], [], [], [], []
        for k, m in matches.items():
            if len(m) == 0:
                continue
            P = kmap.points3d(k)[m[:, 1]]
            ok = np.isfinite(P[:, 0])
            xs.append(q_kp[m[ok, 0]])
            Xs.append(P[ok])
            kf_of.append(np.full(int(ok.sum()), k))
            srcs.append(kmap.point_sources(k)[m[ok, 1]])
            qis.append(m[ok, 0])
        n = int(sum(len(x) for x in xs))
        if n < max(cfg.pnp_min_inliers, 4):
            return None, f"only {n} 2D-3D matches (need {cfg.pnp_min_inliers})", []
        x = np.concatenate(xs).astype(np.float64)
        X = np.concatenate(Xs).astype(np.float64)
        kf_of = np.concatenate(kf_of)
        src = np.concatenate(srcs)
        qi = np.concatenate(qis)
        pose, info = poselib.estimate_absolute_pose(
            x, X, _cam_dict(camera), cfg.ransac(max_reproj_error=cfg.pnp_max_reproj_px), {"loss_scale": 1.0})
        inl = np.asarray(info["inliers"], bool)
        ni = int(inl.sum())
        if cfg.pnp_refine_sigmas > 0 and ni >= 6:
            # PoseLib refined with a fixed 1 px Cauchy scale (~7x the median residual on exact
            # data, ~2x on KITTI); refit with the scale at the noise actually observed.
            r = _residuals(pose.R, pose.t, X[inl], x[inl], camera.K)
            sigma = 1.4826 * float(np.median(np.abs(r)))  # robust per-coordinate std (MAD)
            pose, _ = poselib.refine_absolute_pose(x[inl], X[inl], pose, _cam_dict(camera),
                                                   {"loss_type": "CAUCHY",
                                                    "loss_scale": max(cfg.pnp_refine_sigmas * sigma, 1e-3)})
        kf_in, n_in = np.unique(kf_of[inl], return_counts=True)
        self.last_stats.update(pnp_matches=n, pnp_inliers=ni, inlier_x=x[inl], inlier_X=X[inl],
                               inliers_per_kf=dict(zip(kf_in.tolist(), n_in.tolist())))
        if ni < cfg.pnp_min_inliers:
            return None, f"PnP found {ni} inliers of {n} matches (need {cfg.pnp_min_inliers})", []
        T_cam_world = make_T(pose.R, pose.t)
        T_world_cam = invert(T_cam_world)
        pc = pnp_covariance(T_world_cam, X[inl], x[inl], camera.K, kf_of[inl], src[inl], kmap.T_world_cam,
                            cfg, query_index=qi[inl])
        self.last_pnp_covariance = pc
        cov, rms = pc.covariance, pc.rms_px
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

