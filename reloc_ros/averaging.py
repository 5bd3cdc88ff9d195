"""Motion averaging: fuse per-keyframe relative poses of a query into one map pose.

Two methods:

- :func:`reloc3r_motion_averaging` is Reloc3r's own absolute-localisation step,
  reproduced exactly (element-wise median of scipy xyzw quaternions; least-squares
  intersection of the keyframe-to-query lines). It has no outlier handling and no
  notion of degeneracy; it exists for faithful comparison with the paper.
- :func:`robust_motion_averaging` is the default: rotation consensus, geodesic L1
  then L2 rotation averaging over the consensus set, robust ray intersection with
  angular residuals, degeneracy detection and a covariance derived from the
  residuals and the ray geometry.

Frames: ``T_world_kf`` are keyframe camera-to-world poses; ``T_kf_query`` maps query
camera points into the keyframe camera (Reloc3r's ``pose2`` with view1 = keyframe),
so its translation is the query camera centre in keyframe coordinates, known up to
scale unless the pair is marked metric. OpenCV camera axes, metres, radians.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np
from scipy.spatial.transform import Rotation

from reloc_ros.geometry import project_to_so3, so3_exp
from reloc_ros.types import InvalidInputError, Status

__all__ = [
    "AveragingConfig",
    "FusionResult",
    "reloc3r_motion_averaging",
    "robust_motion_averaging",
    "fuse_pair_estimates",
]


# --------------------------------------------------------------------------------------
# Reloc3r's exact method
# --------------------------------------------------------------------------------------


def reloc3r_motion_averaging(poses_db: np.ndarray, poses_q2d: np.ndarray) -> np.ndarray:
    """Reloc3r's absolute localisation from n relative poses (the authors' method exactly).

    poses_db: [n, 4, 4] database (keyframe) camera-to-world poses, metres.
    poses_q2d: [n, 4, 4] query-camera -> database-camera relative poses; only the
    direction of each translation matters.
    Returns the query camera-to-world pose [4, 4]: rotation is the L2-normalised
    element-wise median of the scipy (x, y, z, w) quaternions of ``R_db @ R_q2d``
    (no hemisphere alignment, as published); the centre is the least-squares point
    closest to the lines from each database centre along ``R_db @ t_q2d``, solved by a
    full (untruncated) SVD pseudo-inverse. Raises InvalidInputError on bad shapes or
    non-finite input; parallel lines make the pseudo-inverse blow up, as in the original.
    """
    db = np.asarray(poses_db, dtype=np.float64)
    q2d = np.asarray(poses_q2d, dtype=np.float64)
    if db.ndim != 3 or db.shape[1:] != (4, 4) or q2d.shape != db.shape or len(db) == 0:
        raise InvalidInputError(
            f"reloc3r_motion_averaging needs [n,4,4] poses with n >= 1, got {db.shape} and {q2d.shape}"
        )
    if not (np.all(np.isfinite(db)) and np.all(np.isfinite(q2d))):
        raise InvalidInputError("reloc3r_motion_averaging: non-finite pose")

    T_wq = db @ q2d
    quats = Rotation.from_matrix(T_wq[:, :3, :3]).as_quat()  # xyzw, scipy's sign choice
    q = np.median(quats, axis=0)
    q = q / np.linalg.norm(q)
    R = Rotation.from_quat(q).as_matrix()

    dirs = np.einsum("nij,nj->ni", db[:, :3, :3], q2d[:, :3, 3])
    A = np.eye(3)[None] - np.einsum("ni,nj->nij", dirs, dirs) / np.einsum("ni,ni->n", dirs, dirs)[:, None, None]
    b = np.einsum("nij,nj->ni", A, db[:, :3, 3])
    U, S, Vt = np.linalg.svd(A.reshape(-1, 3), full_matrices=False)
    centre = Vt.T @ ((U.T @ b.reshape(-1)) / S)

    out = np.eye(4)
    out[:3, :3] = R
    out[:3, 3] = centre
    return out


# --------------------------------------------------------------------------------------
# Robust default
# --------------------------------------------------------------------------------------


@dataclass
class AveragingConfig:
    """Tunables of :func:`robust_motion_averaging` (angles in degrees, lengths in metres).

    rotation_inlier_deg: a pair agrees with a rotation hypothesis when the geodesic
        angle between its implied query rotation and the hypothesis is below this.
    ray_inlier_deg: a pair agrees with a centre hypothesis when the angle between its
        predicted direction (keyframe -> query) and the direction to the centre is
        below this (for metric pairs: the distance to its predicted centre divided by
        its range, as an angle).
    min_consensus: pairs that must agree in rotation (capped at the number of usable
        pairs); fewer gives NOT_LOCALIZED, since then no two pairs confirm each other.
    min_triangulation_angle_deg: two rays closer to parallel than this do not propose
        a centre hypothesis (their intersection is numerically meaningless).
    degenerate_ray_angle_deg: the ray geometry is DEGENERATE when its effective
        triangulation angle (from the smallest/largest eigenvalue of the weighted
        ray normal matrix; equals the angle between two rays when there are two) is
        below this, e.g. collinear keyframes when driving straight.
    good_ray_angle_deg: effective triangulation angle at which geometry stops
        lowering the confidence.
    prior_rotation_sigma_deg, prior_ray_sigma_deg: per-pair noise assumed before
        looking at residuals; they are blended with the residual spread with
        ``prior_strength`` pseudo-observations so that a few residuals (or perfectly
        consistent ones) never give a zero covariance.
    prior_strength: pseudo-observations behind the two priors above (> 0).
    position_prior_sigma_m: std of a weak prior on the centre, around the weighted
        centroid of the agreeing keyframes; it bounds the variance along directions
        that the rays do not constrain (it never moves a well-constrained estimate,
        see ``null_eigen_ratio``).
    null_eigen_ratio: eigen-directions of the ray normal matrix below this fraction of
        the largest are taken from the prior instead of the (meaningless) least squares.
    min_range_m: floor on keyframe-to-query distances used to turn perpendicular
        offsets into angles (keeps a query next to a keyframe from dominating).
    weight_power: pair weights (e.g. inlier counts) are raised to this power;
        1 treats inlier counts as inverse variances, 0 ignores them.
    max_iterations: reweighting / inlier-update iterations for each stage.
    degenerate_max_confidence: confidence cap for DEGENERATE results.
    pair_correlation: assumed correlation (0..1) of the errors of pairs that share the
        query image (same query features, similar keyframe views, so their errors are
        largely common and averaging n of them does not divide the error by sqrt(n)).
        The fused covariance is inflated by the design effect 1 + (n_eff - 1) * rho;
        0 treats pairs as independent (right for synthetic independent noise, badly
        over-confident on real essential-matrix pairs), 1 gives the per-pair spread.
    """

    rotation_inlier_deg: float = 10.0
    ray_inlier_deg: float = 10.0
    min_consensus: int = 2
    min_triangulation_angle_deg: float = 2.0
    degenerate_ray_angle_deg: float = 5.0
    good_ray_angle_deg: float = 20.0
    prior_rotation_sigma_deg: float = 0.5
    prior_ray_sigma_deg: float = 0.5
    prior_strength: float = 1.0
    position_prior_sigma_m: float = 10.0
    null_eigen_ratio: float = 1e-9
    min_range_m: float = 0.05
    weight_power: float = 1.0
    max_iterations: int = 20
    degenerate_max_confidence: float = 0.25
    pair_correlation: float = 0.5

    def validate(self) -> None:
        """Raise ValueError naming the first out-of-range field."""
        positive = (
            "rotation_inlier_deg", "ray_inlier_deg", "min_triangulation_angle_deg",
            "degenerate_ray_angle_deg", "good_ray_angle_deg", "prior_rotation_sigma_deg",
            "prior_ray_sigma_deg", "position_prior_sigma_m", "null_eigen_ratio", "min_range_m",
        )
        for name in positive:
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                raise ValueError(f"AveragingConfig.{name} must be a finite number > 0, got {v!r}")
        for name in ("rotation_inlier_deg", "ray_inlier_deg", "min_triangulation_angle_deg",
                     "degenerate_ray_angle_deg", "good_ray_angle_deg"):
            if getattr(self, name) >= 180.0:
                raise ValueError(f"AveragingConfig.{name} must be < 180 degrees, got {getattr(self, name)!r}")
        if not (math.isfinite(self.prior_strength) and self.prior_strength > 0):
            raise ValueError(f"AveragingConfig.prior_strength must be > 0, got {self.prior_strength!r}")
        if not (math.isfinite(self.weight_power) and self.weight_power >= 0):
            raise ValueError(f"AveragingConfig.weight_power must be >= 0, got {self.weight_power!r}")
        if int(self.min_consensus) != self.min_consensus or self.min_consensus < 1:
            raise ValueError(f"AveragingConfig.min_consensus must be an integer >= 1, got {self.min_consensus!r}")
        if int(self.max_iterations) != self.max_iterations or self.max_iterations < 1:
            raise ValueError(f"AveragingConfig.max_iterations must be an integer >= 1, got {self.max_iterations!r}")
        if not (math.isfinite(self.pair_correlation) and 0.0 <= self.pair_correlation <= 1.0):
            raise ValueError(f"AveragingConfig.pair_correlation must be in [0, 1], got {self.pair_correlation!r}")
        if not (0.0 <= self.degenerate_max_confidence <= 1.0):
            raise ValueError(
                f"AveragingConfig.degenerate_max_confidence must be in [0, 1], got {self.degenerate_max_confidence!r}"
            )
        if self.null_eigen_ratio >= 1.0:
            raise ValueError(f"AveragingConfig.null_eigen_ratio must be < 1, got {self.null_eigen_ratio!r}")


@dataclass
class FusionResult:
    """Fused query pose from n relative pairs.

    T_world_cam: [4, 4] query camera-to-world, or None when NOT_LOCALIZED.
    covariance: [6, 6] over (x, y, z, rx, ry, rz) in the world frame, m^2 / rad^2,
        rotation as a left perturbation ``R = exp([drot]_x) R_est``; None when no pose.
        Translation and rotation blocks are estimated independently (off-diagonal
        blocks are zero).
    status: OK, DEGENERATE (a pose, but some direction is poorly constrained; the
        covariance is large along it) or NOT_LOCALIZED.
    confidence: 0..1. inlier_mask: [n] bool, pairs that agree with the fused pose in
        rotation and in direction (or position, for metric pairs).
    message: human-readable reason (always set unless OK).
    condition: diagnostics (plain floats/lists): ``normal_eigenvalues`` (ascending, of
        the weighted ray normal matrix sum w_i (I - d_i d_i^T) / sum w_i),
        ``effective_ray_angle_deg``, ``max_ray_angle_deg`` (largest angle between two
        inlier lines), ``weak_direction`` (world unit vector of the least constrained
        centre direction), ``rotation_sigma_deg``, ``ray_sigma_deg`` (per-pair noise
        estimates), ``position_sigma_m`` (sqrt of the covariance eigenvalues,
        ascending), ``cheirality_interval_m`` (when degenerate: length of the segment
        between keyframes on either side of the query along the weak direction), and
        the pair counts.
    """

    T_world_cam: Optional[np.ndarray]
    covariance: Optional[np.ndarray]
    status: Status
    confidence: float
    inlier_mask: np.ndarray
    message: str = ""
    condition: dict = field(default_factory=dict)


def _design_effect(n_eff: float, rho: float) -> float:
    """Variance factor of a mean of n_eff equally correlated errors (correlation rho)
    relative to independent ones: Var = sigma^2 / n * (1 + (n - 1) rho)."""
    return 1.0 + max(n_eff - 1.0, 0.0) * rho


def _vee_skew(R: np.ndarray) -> np.ndarray:
    """[m, 3]: vee((R - R^T) / 2) = sin(angle) * axis of rotations [m, 3, 3]."""
    return 0.5 * np.stack([R[:, 2, 1] - R[:, 1, 2], R[:, 0, 2] - R[:, 2, 0], R[:, 1, 0] - R[:, 0, 1]], axis=1)


def _rot_angles(R: np.ndarray) -> np.ndarray:
    """[m] rotation angles (rad) of [m, 3, 3] rotations; atan2 form, accurate at 0 and pi."""
    c = np.clip((np.trace(R, axis1=1, axis2=2) - 1.0) / 2.0, -1.0, 1.0)
    return np.arctan2(np.linalg.norm(_vee_skew(R), axis=1), c)


def _so3_log_batch(R: np.ndarray) -> np.ndarray:
    """[m, 3] rotation vectors (rad) of [m, 3, 3] rotations.

    Closed form (the residuals averaged here are small); scipy's general conversion
    only when some angle comes near pi, where the closed form loses the axis.
    """
    v = _vee_skew(R)
    s = np.linalg.norm(v, axis=1)
    th = np.arctan2(s, np.clip((np.trace(R, axis1=1, axis2=2) - 1.0) / 2.0, -1.0, 1.0))
    if np.any(th > 2.5):
        return Rotation.from_matrix(R).as_rotvec()
    scale = np.where(s > 1e-12, th / np.maximum(s, 1e-300), 1.0)
    return v * scale[:, None]


def _project_so3_batch(M: np.ndarray) -> np.ndarray:
    """Closest rotations (Frobenius) to [m, 3, 3] matrices."""
    U, _, Vt = np.linalg.svd(M)
    D = np.ones((len(M), 3))
    D[:, 2] = np.sign(np.linalg.det(U @ Vt))
    return (U * D[:, None, :]) @ Vt


def _pairwise_angles_deg(R: np.ndarray) -> np.ndarray:
    """[m, m] geodesic angles (deg) between rotations [m, 3, 3]."""
    rel = np.einsum("aji,bjk->abik", R, R)  # R_a^T R_b
    m = len(R)
    return np.degrees(_rot_angles(rel.reshape(-1, 3, 3))).reshape(m, m)


def _consensus_score(agree: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Inlier count first (one confident wrong pair must not beat several agreeing ones),
    weight share as tie-break. agree: [h, m] bool, w: [m]."""
    return agree.sum(axis=1) + 0.5 * (agree @ w) / max(w.sum(), 1e-300)


def _average_rotations(R: np.ndarray, w: np.ndarray, R0: np.ndarray, iters: int) -> np.ndarray:
    """Weighted geodesic L1 median (Weiszfeld) from R0, then the weighted Karcher mean.

    The median removes the pull of any residual outlier; the L2 mean on its neighbourhood
    is the efficient estimate for the remaining, roughly Gaussian, noise.
    """
    Rc = R0
    for _ in range(iters):
        v = _so3_log_batch(np.einsum("nij,kj->nik", R, Rc))  # left residuals, R_i = exp(v_i) Rc
        nv = np.maximum(np.linalg.norm(v, axis=1), 1e-9)
        step = (w / nv) @ v / np.sum(w / nv)
        Rc = so3_exp(step) @ Rc
        if np.linalg.norm(step) < 1e-10:
            break
    for _ in range(iters):
        v = _so3_log_batch(np.einsum("nij,kj->nik", R, Rc))
        step = w @ v / w.sum()
        Rc = so3_exp(step) @ Rc
        if np.linalg.norm(step) < 1e-13:
            break
    return project_to_so3(Rc)


def _ray_residuals(x: np.ndarray, c: np.ndarray, d: np.ndarray, p: np.ndarray, metric: np.ndarray,
                   min_range: float) -> np.ndarray:
    """Angular residual (rad) of each pair for centre x [3] (-> [m]) or centres [h, 3] (-> [h, m]).

    Direction pairs: angle between d_i and x - c_i (pi when x is behind the keyframe,
    which is how cheirality is enforced). Metric pairs: |x - p_i| / range_i.
    A centre on top of a keyframe has no defined direction and gets 0.
    """
    X = np.atleast_2d(x)
    v = X[:, None, :] - c[None]
    rng = np.linalg.norm(v, axis=2)
    cos = np.einsum("hni,ni->hn", v, d) / np.maximum(rng, 1e-300)
    ang = np.where(rng > 1e-12, np.arccos(np.clip(cos, -1.0, 1.0)), 0.0)
    if np.any(metric):
        r_pred = np.maximum(np.linalg.norm(p - c, axis=1), min_range)
        ang = np.where(metric[None], np.linalg.norm(X[:, None, :] - p[None], axis=2) / r_pred, ang)
    return ang if np.ndim(x) == 2 else ang[0]


def _constraint_matrices(d: np.ndarray, metric: np.ndarray) -> np.ndarray:
    """[m, 3, 3]: I - d d^T for direction pairs (perpendicular offset), I for metric ones."""
    A = np.eye(3)[None] - np.einsum("ni,nj->nij", d, d)
    A[metric] = np.eye(3)
    return A


def _solve_centre(A: np.ndarray, q: np.ndarray, omega: np.ndarray, x_prior: np.ndarray,
                  null_ratio: float) -> np.ndarray:
    """argmin_x sum omega_i |A_i (x - q_i)|^2, with directions the data do not fix taken
    from x_prior (minimum-distance-to-prior solution of a truncated eigen-system)."""
    H = np.einsum("n,nij->ij", omega, A)
    g = np.einsum("n,nij,nj->i", omega, A, q)
    lam, V = np.linalg.eigh(H)
    good = lam > null_ratio * max(lam[-1], 1e-300)
    Vg = V[:, good]
    return x_prior + Vg @ ((Vg.T @ (g - H @ x_prior)) / lam[good])


def _centre_hypotheses(c: np.ndarray, d: np.ndarray, p: np.ndarray, metric: np.ndarray,
                       min_angle_deg: float) -> list:
    """Candidate centres: the midpoint of closest approach of every two non-parallel rays
    that meet in front of both keyframes, and the point of every metric pair."""
    hyps = [p[i] for i in np.flatnonzero(metric)]
    i, j = np.triu_indices(len(c), k=1)
    if len(i) == 0:
        return hyps
    # Closest points c_i + s d_i and c_j + t d_j of two lines (unit directions).
    b = np.einsum("ni,ni->n", d[i], d[j])
    r = c[j] - c[i]
    e1 = np.einsum("ni,ni->n", d[i], r)
    e2 = np.einsum("ni,ni->n", d[j], r)
    den = 1.0 - b**2
    ok = den > math.sin(math.radians(min_angle_deg)) ** 2
    den = np.where(ok, den, 1.0)
    s = (e1 - b * e2) / den
    t = (b * e1 - e2) / den
    ok &= (s > 0) & (t > 0)
    mid = 0.5 * (c[i] + s[:, None] * d[i] + c[j] + t[:, None] * d[j])
    return hyps + list(mid[ok])


def _rigid_mask(T: np.ndarray, tol: float = 1e-3) -> np.ndarray:
    """[n] bool: finite rigid transforms among [n, 4, 4] (batched geometry.is_rigid)."""
    fin = np.all(np.isfinite(T.reshape(len(T), -1)), axis=1)
    Tf = np.where(fin[:, None, None], T, np.eye(4))
    R = Tf[:, :3, :3]
    orth = np.abs(np.einsum("nji,njk->nik", R, R) - np.eye(3)).max(axis=(1, 2)) <= tol
    det = np.abs(np.linalg.det(R) - 1.0) < tol
    last = np.abs(Tf[:, 3] - np.array([0.0, 0.0, 0.0, 1.0])).max(axis=1) <= tol
    return fin & orth & det & last


def _not_localized(n: int, message: str, condition: dict) -> FusionResult:
    return FusionResult(None, None, Status.NOT_LOCALIZED, 0.0, np.zeros(n, dtype=bool), message, condition)


def _check_inputs(T_world_kf, T_kf_query, weights, metric):
    Twk = np.asarray(T_world_kf, dtype=np.float64)
    Tkq = np.asarray(T_kf_query, dtype=np.float64)
    if Twk.ndim != 3 or Twk.shape[1:] != (4, 4):
        raise InvalidInputError(f"T_world_kf must be [n,4,4], got {Twk.shape}")
    n = len(Twk)
    if Tkq.shape != (n, 4, 4):
        raise InvalidInputError(f"T_kf_query must be [{n},4,4] like T_world_kf, got {Tkq.shape}")
    w = np.ones(n) if weights is None else np.asarray(weights, dtype=np.float64).reshape(-1)
    if w.shape != (n,):
        raise InvalidInputError(f"weights must be [{n}], got {np.shape(weights)}")
    if np.any(w[np.isfinite(w)] < 0):
        raise InvalidInputError(f"weights must be >= 0, got {w.tolist()}")
    mt = np.zeros(n, dtype=bool) if metric is None else np.asarray(metric, dtype=bool).reshape(-1)
    if mt.shape != (n,):
        raise InvalidInputError(f"metric mask must be [{n}], got {np.shape(metric)}")
    bad = np.flatnonzero(~_rigid_mask(Twk))
    if len(bad):
        raise InvalidInputError(f"T_world_kf{bad.tolist()} not finite rigid transforms")
    return Twk, Tkq, w, mt


def robust_motion_averaging(
    T_world_kf: np.ndarray,
    T_kf_query: np.ndarray,
    weights: Optional[np.ndarray] = None,
    config: Optional[AveragingConfig] = None,
    metric: Optional[np.ndarray] = None,
) -> FusionResult:
    """Robustly fuse n relative poses of a query into its camera-to-world pose.

    T_world_kf: [n, 4, 4] keyframe camera-to-world poses (metres).
    T_kf_query: [n, 4, 4] query camera -> keyframe camera; the translation is the
        query centre in keyframe coordinates, direction only unless ``metric[i]``.
    weights: [n] >= 0 pair quality (e.g. inlier counts); 0 or non-finite drops a pair.
        None means equal weights.
    config: AveragingConfig (defaults when None). metric: [n] bool or None.

    Rotation: every pair implies ``R_world_query = R_world_kf @ R_kf_query``; the
    hypothesis agreed with by most pairs (within ``rotation_inlier_deg``) selects the
    consensus set, averaged by a weighted geodesic L1 median then an L2 mean.
    Centre: each consensus pair casts a ray from its keyframe centre along
    ``R_world_kf @ t_kf_query``; ray-pair intersections are scored by how many rays pass
    within ``ray_inlier_deg``; the best is refined by iteratively reweighted least
    squares on perpendicular offsets divided by range (i.e. angular residuals), with
    the inlier set re-evaluated each iteration.
    Covariance: translation = inv(H / s2 + I / prior^2) with the ray normal matrix
    H = sum_i w_i A_i / range_i^2 (A_i = I - d_i d_i^T) and s2 the angular residual
    variance per unit weight (both shrunk toward the configured priors); rotation =
    pooled isotropic spread of the inlier rotations about the estimate / n_eff.
    A pose whose centre is poorly constrained (fewer than two rays, or near-parallel
    rays) is returned with status DEGENERATE, confidence <= degenerate_max_confidence
    and a covariance that is large along ``condition['weak_direction']``.
    Raises InvalidInputError on wrong shapes, negative weights or a non-rigid keyframe
    pose; an unusable pair (NaN, not a rotation) is only excluded.
    """
    cfg = config or AveragingConfig()
    cfg.validate()
    Twk, Tkq, w_in, metric_in = _check_inputs(T_world_kf, T_kf_query, weights, metric)
    n = len(Twk)
    cond: dict = {"n_pairs": n}

    # ---- usable pairs --------------------------------------------------------------
    usable = np.isfinite(w_in) & (w_in > 0) & _rigid_mask(Tkq)
    cond["n_usable"] = int(usable.sum())
    if not usable.any():
        return _not_localized(n, f"no usable pair among {n} (zero weight, NaN or non-rigid relative pose)", cond)
    idx = np.flatnonzero(usable)
    w = w_in[idx] ** cfg.weight_power
    w = w / w.max()
    R_wk = _project_so3_batch(Twk[idx, :3, :3])
    R_kq = _project_so3_batch(Tkq[idx, :3, :3])
    R_cand = R_wk @ R_kq
    m = len(idx)

    # ---- rotation: consensus, then L1 -> L2 averaging ------------------------------
    ang = _pairwise_angles_deg(R_cand)
    agree = ang < cfg.rotation_inlier_deg
    best = int(np.argmax(_consensus_score(agree, w)))
    need = min(cfg.min_consensus, m)
    if agree[best].sum() < need:
        return _not_localized(
            n, f"no rotation consensus: at most {int(agree[best].sum())} of {m} pairs agree within "
               f"{cfg.rotation_inlier_deg} deg (need {need})", cond)
    rot_in = agree[best].copy()
    R_est = R_cand[best]
    for _ in range(3):
        R_est = _average_rotations(R_cand[rot_in], w[rot_in], R_est, cfg.max_iterations)
        res_deg = np.degrees(_rot_angles(np.einsum("nij,kj->nik", R_cand, R_est)))
        new_in = res_deg < cfg.rotation_inlier_deg
        if new_in.sum() < need:  # averaging moved off the consensus; keep the consensus set
            break
        if np.array_equal(new_in, rot_in):
            break
        rot_in = new_in
    cond["n_rotation_inliers"] = int(rot_in.sum())

    # Left residuals of the inlier rotations give the rotation spread. One pooled
    # per-axis variance (3 (n - 1) degrees of freedom) instead of a full 3x3 sample
    # covariance, which from a handful of pairs would be badly over-confident along
    # some axis; shrunk toward the prior so that identical rotations never give zero.
    v_rot = _so3_log_batch(np.einsum("nij,kj->nik", R_cand[rot_in], R_est))
    wr = w[rot_in]
    n_eff_r = wr.sum() ** 2 / np.sum(wr**2)
    ss_r = n_eff_r * float((wr / wr.sum()) @ np.sum(v_rot**2, axis=1))
    s0r = math.radians(cfg.prior_rotation_sigma_deg)
    var_r = (ss_r + 3.0 * cfg.prior_strength * s0r**2) / (3.0 * max(n_eff_r - 1.0, 0.0) + 3.0 * cfg.prior_strength)
    cov_rot = var_r * _design_effect(n_eff_r, cfg.pair_correlation) / n_eff_r * np.eye(3)
    cond["rotation_sigma_deg"] = float(math.degrees(math.sqrt(var_r)))

    # ---- centre: rays from the rotation-consensus keyframes ------------------------
    t_kq = Tkq[idx, :3, 3]
    t_norm = np.linalg.norm(t_kq, axis=1)
    mt = metric_in[idx]
    has_dir = t_norm > 1e-12
    ray_ok = rot_in & (has_dir | mt)
    c_all = Twk[idx, :3, 3]
    d_all = np.zeros((m, 3))
    d_all[has_dir] = np.einsum("nij,nj->ni", R_wk[has_dir], t_kq[has_dir] / t_norm[has_dir, None])
    p_all = c_all + np.einsum("nij,nj->ni", R_wk, t_kq)

    ri = np.flatnonzero(ray_ok)
    return _fuse_centre(cfg, n, idx, w, rot_in, R_est, cov_rot, ri, c_all, d_all, p_all, mt, cond)


def _cheirality_interval(x: np.ndarray, e: np.ndarray, c: np.ndarray, d: np.ndarray) -> tuple:
    """Interval (lo, hi) of s such that x + s e is in front of every ray roughly along e.

    With (near-)collinear rays the least squares cannot place the centre along the line,
    but the ray signs can: the query is ahead of keyframes whose rays point along +e and
    behind those pointing along -e. Bounds may be infinite; lo >= hi means the rays
    contradict each other.
    """
    a = d @ e
    b = np.einsum("ni,ni->n", d, x[None] - c)
    along = np.abs(a) > 0.5
    bounds = -b[along] / a[along]
    pos = a[along] > 0
    lo = float(bounds[pos].max()) if pos.any() else -np.inf
    hi = float(bounds[~pos].min()) if (~pos).any() else np.inf
    return lo, hi


def _weak_direction_bracket(x: np.ndarray, e: np.ndarray, c: np.ndarray, d: np.ndarray,
                            min_range: float) -> np.ndarray:
    """Move x along the unconstrained direction e into the cheirality interval when it is
    outside: to its midpoint between keyframes on both sides, or, with keyframes on one
    side only, half their typical spacing beyond the last one."""
    lo, hi = _cheirality_interval(x, e, c, d)
    if lo < 0.0 < hi or lo >= hi or (np.isinf(lo) and np.isinf(hi)):
        return x
    if np.isfinite(lo) and np.isfinite(hi):
        return x + 0.5 * (lo + hi) * e
    proj = np.sort((c - x[None]) @ e)
    gap = float(np.median(np.diff(proj))) if len(proj) > 1 else 0.0
    margin = max(0.5 * gap, min_range)
    return x + (lo + margin if np.isfinite(lo) else hi - margin) * e


def _ray_geometry(d: np.ndarray, mtr: np.ndarray, wi: np.ndarray) -> tuple:
    """Eigen-decomposition of the weighted normal matrix sum w_i A_i / sum w_i of the
    given (inlier) pairs and its effective triangulation angle in degrees."""
    A = _constraint_matrices(d, mtr)
    M = np.einsum("n,nij->ij", wi / wi.sum(), A)
    lam, V = np.linalg.eigh(M)
    ratio = float(np.clip(lam[0] / max(lam[-1], 1e-300), 0.0, 1.0))
    # For two lines at angle a the ratio is sin^2(a/2); beyond 90 deg everything is well
    # constrained, so cap there.
    eff = min(90.0, math.degrees(2.0 * math.asin(math.sqrt(ratio))))
    return lam, V, eff


def _robust_centre(cfg: AveragingConfig, c, d, p, mtr, wc) -> tuple:
    """Consensus over ray-pair intersections, then IRLS on angular residuals.

    Returns (x [3], inlier mask over the given rays)."""
    tau = math.radians(cfg.ray_inlier_deg)
    A = _constraint_matrices(d, mtr)
    q = np.where(mtr[:, None], p, c)

    def residuals(x):
        return _ray_residuals(x, c, d, p, mtr, cfg.min_range_m)

    hyps = _centre_hypotheses(c, d, p, mtr, cfg.min_triangulation_angle_deg)
    ray_in = np.zeros(len(c), dtype=bool)
    if hyps:
        agree = residuals(np.asarray(hyps)) < tau
        x = hyps[int(np.argmax(_consensus_score(agree, wc)))]
        ray_in = residuals(x) < tau
    if not ray_in.any():
        # No two rays cross at a usable angle (or nothing agrees): start from all of them.
        ray_in = np.ones(len(c), dtype=bool)
        x = _solve_centre(A, q, wc, (wc @ c) / wc.sum(), cfg.null_eigen_ratio)
    for _ in range(cfg.max_iterations):
        rng = np.maximum(np.linalg.norm(x[None] - c, axis=1), cfg.min_range_m)
        # Dividing perpendicular offsets by range makes every residual an angle: a far
        # keyframe with the same direction error must not pull harder than a near one.
        omega = np.where(ray_in, wc / rng**2, 0.0)
        prior_pt = (wc[ray_in] @ c[ray_in]) / wc[ray_in].sum()
        x_new = _solve_centre(A, q, omega, prior_pt, cfg.null_eigen_ratio)
        if not (mtr & ray_in).any():
            _, V, eff = _ray_geometry(d[ray_in], mtr[ray_in], wc[ray_in])
            if eff < cfg.degenerate_ray_angle_deg:
                # A centre on the wrong side of a keyframe makes that ray look reversed
                # (180 deg) rather than wrong, so the interval is taken over every ray
                # whose *line* agrees, whatever its sign.
                v = x_new[None] - c
                cos_line = np.abs(np.einsum("ni,ni->n", v, d)) / np.maximum(np.linalg.norm(v, axis=1), 1e-300)
                sel = ~mtr & (cos_line > math.cos(tau))
                if sel.any():
                    x_new = _weak_direction_bracket(x_new, V[:, 0], c[sel], d[sel], cfg.min_range_m)
        new_in = residuals(x_new) < tau
        moved = float(np.linalg.norm(x_new - x))
        x = x_new
        if not new_in.any():
            break
        if np.array_equal(new_in, ray_in) and moved <= 1e-12 * (1.0 + float(np.linalg.norm(x))):
            break
        ray_in = new_in
    return x, residuals(x) < tau


def _fuse_centre(cfg: AveragingConfig, n: int, idx, w, rot_in, R_est, cov_rot, ri, c_all, d_all, p_all,
                 mt_all, cond: dict) -> FusionResult:
    """Centre estimation, degeneracy, covariance and confidence (second half of
    robust_motion_averaging)."""
    c, d, p, mtr, wc = c_all[ri], d_all[ri], p_all[ri], mt_all[ri], w[ri]
    sigma_p2 = cfg.position_prior_sigma_m**2
    reasons = []

    if len(ri):
        x, ray_in = _robust_centre(cfg, c, d, p, mtr, wc)
        if not ray_in.any():
            cond["n_ray_inliers"] = 0
            return _not_localized(
                n, f"rotation agrees ({int(rot_in.sum())} pairs) but no consistent ray intersection: no ray "
                   f"passes within {cfg.ray_inlier_deg} deg of the least-squares centre", cond)
    else:
        ray_in = np.zeros(0, dtype=bool)
        x = (w[rot_in] @ c_all[rot_in]) / w[rot_in].sum()

    n_rays = int(ray_in.sum())
    n_metric = int((mtr & ray_in).sum())
    cond["n_ray_inliers"] = n_rays
    degenerate = False
    if n_rays == 0:
        # Rotation only (e.g. pure-rotation pairs): the centre is the keyframes' centroid.
        cov_t = sigma_p2 * np.eye(3)
        cond.update(normal_eigenvalues=[0.0, 0.0, 0.0], effective_ray_angle_deg=0.0, max_ray_angle_deg=0.0,
                    weak_direction=[1.0, 0.0, 0.0], ray_sigma_deg=float("nan"))
        s_ray_deg = cfg.prior_ray_sigma_deg
        eff = 0.0
        degenerate = True
        reasons.append("no pair gives a translation direction; centre set to the keyframes' centroid")
    else:
        ci, di, mi, wi = c[ray_in], d[ray_in], mtr[ray_in], wc[ray_in]
        qi = np.where(mi[:, None], p[ray_in], ci)
        A = _constraint_matrices(di, mi)
        lam, V, eff = _ray_geometry(di, mi, wi)
        dir_only = di[~mi]
        max_angle = 0.0
        if len(dir_only) > 1:
            cosm = np.abs(dir_only @ dir_only.T)
            max_angle = float(np.degrees(np.arccos(np.clip(cosm.min(), 0.0, 1.0))))
        rng = np.maximum(np.linalg.norm(x[None] - ci, axis=1), cfg.min_range_m)
        wn = wi / wi.mean()
        H = np.einsum("n,nij->ij", wn / rng**2, A)
        u = np.einsum("nij,nj->ni", A, x[None] - qi) / rng[:, None]  # angular residual vectors (rad)
        ssr = float(wn @ np.sum(u**2, axis=1))
        dof = max(int(2 * (n_rays - n_metric) + 3 * n_metric - 3), 0)
        s0 = math.radians(cfg.prior_ray_sigma_deg)
        denom = dof + cfg.prior_strength
        s2 = (ssr + cfg.prior_strength * s0**2) / denom if denom > 0 else s0**2
        s2 = max(s2, 1e-30)
        s_ray_deg = math.degrees(math.sqrt(s2))  # per-pair angular noise
        s2 = s2 * _design_effect(float(wi.sum() ** 2 / np.sum(wi**2)), cfg.pair_correlation)
        cov_t = np.linalg.inv(H / s2 + np.eye(3) / sigma_p2)
        bracket = None
        if n_metric == 0 and eff < cfg.degenerate_ray_angle_deg:
            # Along the weak direction the rays barely inform the least squares, but their
            # signs bound the centre between keyframes on either side: fuse that interval
            # as a measurement (mean its midpoint, variance width^2 / 12 of a uniform).
            e = np.linalg.eigh(cov_t)[1][:, -1]
            lo, hi = _cheirality_interval(x, e, ci[~mi], di[~mi])
            if np.isfinite(lo) and np.isfinite(hi) and lo < hi:
                bracket = (e, (hi - lo) ** 2 / 12.0)
                gain = cov_t @ e / (e @ cov_t @ e + bracket[1])
                x = x + gain * 0.5 * (lo + hi)
                cov_t = cov_t - np.outer(gain, e @ cov_t)
                cond["cheirality_interval_m"] = float(hi - lo)
        # An uncertain centre means uncertain ranges, and the metric size of an angular
        # error grows with range: inflate the ranges by the largest position variance once
        # (negligible when well constrained; keeps the across-line variance honest when not).
        rng2 = np.linalg.norm(x[None] - ci, axis=1) ** 2 + float(np.linalg.eigvalsh(cov_t)[-1])
        H = np.einsum("n,nij->ij", wn / np.maximum(rng2, cfg.min_range_m**2), A)
        cov_t = np.linalg.inv(H / s2 + np.eye(3) / sigma_p2)
        if bracket is not None:
            e, var_b = bracket
            cov_t = cov_t - np.outer(cov_t @ e, e @ cov_t) / (e @ cov_t @ e + var_b)
        cond.update(normal_eigenvalues=[float(v) for v in lam], effective_ray_angle_deg=float(eff),
                    max_ray_angle_deg=max_angle, weak_direction=[float(v) for v in V[:, 0]],
                    ray_sigma_deg=float(s_ray_deg))
        if n_rays - n_metric < 2 and n_metric == 0:
            degenerate = True
            reasons.append(f"only {n_rays} usable ray: the centre along it is unconstrained")
        elif eff < cfg.degenerate_ray_angle_deg:
            degenerate = True
            reasons.append(
                f"near-parallel rays (effective triangulation angle {eff:.2f} deg < "
                f"{cfg.degenerate_ray_angle_deg} deg): the centre along {np.round(V[:, 0], 3).tolist()} "
                f"is poorly constrained")

    cov = np.zeros((6, 6))
    cov[:3, :3] = 0.5 * (cov_t + cov_t.T)
    cov[3:, 3:] = 0.5 * (cov_rot + cov_rot.T)
    cond["position_sigma_m"] = [float(v) for v in np.sqrt(np.clip(np.linalg.eigvalsh(cov[:3, :3]), 0, None))]

    # Pair-level inlier mask: rotation agrees and, when the pair has a ray, the ray agrees.
    mask_u = rot_in.copy()
    ray_flag = np.ones(len(idx), dtype=bool)
    ray_flag[ri] = ray_in
    mask_u &= ray_flag
    inlier_mask = np.zeros(n, dtype=bool)
    inlier_mask[idx] = mask_u
    cond["n_inliers"] = int(mask_u.sum())

    f_inl = float(w[mask_u].sum() / w.sum())
    k = int(mask_u.sum())
    f_count = k / (k + 1.0)
    f_geom = min(1.0, eff / cfg.good_ray_angle_deg)
    s_rot_deg = cond["rotation_sigma_deg"]
    f_noise = math.exp(-0.5 * (s_rot_deg / cfg.rotation_inlier_deg) ** 2 - 0.5 * (s_ray_deg / cfg.ray_inlier_deg) ** 2)
    confidence = f_inl * f_count * f_geom * f_noise
    status = Status.DEGENERATE if degenerate else Status.OK
    if degenerate:
        confidence = min(confidence, cfg.degenerate_max_confidence)

    T = np.eye(4)
    T[:3, :3] = R_est
    T[:3, 3] = x
    msg = "; ".join(reasons)
    if not msg:
        msg = (f"{k}/{n} pairs agree (rotation sigma {s_rot_deg:.2f} deg, ray sigma {s_ray_deg:.2f} deg, "
               f"effective ray angle {eff:.1f} deg)")
    return FusionResult(T, cov, status, float(np.clip(confidence, 0.0, 1.0)), inlier_mask, msg, cond)


def fuse_pair_estimates(pairs: Sequence, T_world_kf: np.ndarray,
                        config: Optional[AveragingConfig] = None) -> FusionResult:
    """robust_motion_averaging over ``PairEstimate``s.

    pairs: list of reloc_ros.types.PairEstimate (keyframe_id indexes ``T_world_kf``).
    T_world_kf: [N, 4, 4] camera-to-world poses of all map keyframes.
    Pair weights are ``PairEstimate.weight``; metric pairs keep their scale.
    """
    Tall = np.asarray(T_world_kf, dtype=np.float64)
    if Tall.ndim != 3 or Tall.shape[1:] != (4, 4):
        raise InvalidInputError(f"T_world_kf must be [N,4,4], got {Tall.shape}")
    ids = [int(pr.keyframe_id) for pr in pairs]
    bad = [i for i in ids if not 0 <= i < len(Tall)]
    if bad:
        raise InvalidInputError(f"pair keyframe ids {bad} outside the map's {len(Tall)} keyframes")
    if not ids:
        return _not_localized(0, "no pairs to fuse", {"n_pairs": 0})
    return robust_motion_averaging(
        Tall[ids],
        np.stack([np.asarray(pr.T_kf_query, dtype=np.float64) for pr in pairs]),
        np.array([float(pr.weight) for pr in pairs]),
        config,
        metric=np.array([bool(pr.metric) for pr in pairs]),
    )
