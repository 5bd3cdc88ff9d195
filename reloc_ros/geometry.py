"""Rigid-body geometry helpers: SE(3)/SO(3), Sim(3) alignment, pose validation, errors.

All poses are [4, 4] float64 ``T_a_b`` (frame b -> frame a), metres, radians unless a
name says degrees.
"""
from __future__ import annotations

from typing import Optional, Tuple

import numpy as np

from reloc_ros.types import InvalidInputError


def is_rigid(T: np.ndarray, tol: float = 1e-4) -> bool:
    """True when T is a finite [4, 4] rigid transform (orthonormal R, det +1, last row 0001)."""
    T = np.asarray(T, dtype=np.float64)
    if T.shape != (4, 4) or not np.all(np.isfinite(T)):
        return False
    R = T[:3, :3]
    return (
        np.allclose(R.T @ R, np.eye(3), atol=tol)
        and abs(np.linalg.det(R) - 1.0) < tol
        and np.allclose(T[3], [0, 0, 0, 1], atol=tol)
    )


def check_pose(T: np.ndarray, what: str = "pose", tol: float = 1e-3) -> np.ndarray:
    """Return T as float64 with R re-orthonormalised; raise InvalidInputError if unusable."""
    T = np.asarray(T, dtype=np.float64)
    if T.shape == (3, 4):
        T = np.vstack([T, [0, 0, 0, 1]])
    if not is_rigid(T, tol):
        raise InvalidInputError(f"{what} is not a finite rigid transform: {np.array2string(T, precision=4)}")
    out = T.copy()
    out[:3, :3] = project_to_so3(T[:3, :3])
    return out


def project_to_so3(M: np.ndarray) -> np.ndarray:
    """Closest rotation (Frobenius) to a [3, 3] matrix."""
    U, _, Vt = np.linalg.svd(M)
    D = np.diag([1.0, 1.0, np.sign(np.linalg.det(U @ Vt))])
    return U @ D @ Vt


def make_T(R: np.ndarray, t: np.ndarray) -> np.ndarray:
    """[4, 4] from R [3, 3] and t [3]."""
    T = np.eye(4)
    T[:3, :3] = R
    T[:3, 3] = np.ravel(t)
    return T


def invert(T: np.ndarray) -> np.ndarray:
    """Inverse of a rigid [.., 4, 4] transform (batched)."""
    T = np.asarray(T, dtype=np.float64)
    R = T[..., :3, :3]
    t = T[..., :3, 3:]
    out = np.zeros_like(T)
    Rt = np.swapaxes(R, -1, -2)
    out[..., :3, :3] = Rt
    out[..., :3, 3:] = -Rt @ t
    out[..., 3, 3] = 1.0
    return out


def skew(v: np.ndarray) -> np.ndarray:
    x, y, z = np.ravel(v)
    return np.array([[0, -z, y], [z, 0, -x], [-y, x, 0]], dtype=np.float64)


def so3_exp(w: np.ndarray) -> np.ndarray:
    """Rotation matrix of rotation vector w [3] (radians)."""
    w = np.asarray(w, dtype=np.float64).ravel()
    th = np.linalg.norm(w)
    K = skew(w)
    if th < 1e-12:
        return np.eye(3) + K
    return np.eye(3) + np.sin(th) / th * K + (1 - np.cos(th)) / th**2 * (K @ K)


def so3_log(R: np.ndarray) -> np.ndarray:
    """Rotation vector [3] (radians) of R [3, 3]."""
    from scipy.spatial.transform import Rotation

    return Rotation.from_matrix(project_to_so3(np.asarray(R, dtype=np.float64))).as_rotvec()


def rotation_angle_deg(R_a: np.ndarray, R_b: np.ndarray) -> float:
    """Angle of R_a^T R_b in degrees (robust near 0 and 180)."""
    R = np.asarray(R_a, dtype=np.float64).T @ np.asarray(R_b, dtype=np.float64)
    c = np.clip((np.trace(R) - 1.0) / 2.0, -1.0, 1.0)
    s = np.linalg.norm([R[2, 1] - R[1, 2], R[0, 2] - R[2, 0], R[1, 0] - R[0, 1]]) / 2.0
    return float(np.degrees(np.arctan2(s, c)))


def pose_errors(T_est: Optional[np.ndarray], T_gt: np.ndarray) -> Tuple[float, float]:
    """(camera-centre error in metres, rotation error in degrees) of two T_world_cam.

    A missing estimate gives (inf, 180).
    """
    if T_est is None or not np.all(np.isfinite(T_est)):
        return float("inf"), 180.0
    t_err = float(np.linalg.norm(T_est[:3, 3] - T_gt[:3, 3]))
    return t_err, rotation_angle_deg(T_est[:3, :3], T_gt[:3, :3])


def angle_between_deg(a: np.ndarray, b: np.ndarray) -> float:
    """Angle between two vectors [3] in degrees (direction error of translations)."""
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    if na < 1e-12 or nb < 1e-12:
        return 180.0
    return float(np.degrees(np.arccos(np.clip(np.dot(a, b) / (na * nb), -1.0, 1.0))))


def umeyama(src: np.ndarray, dst: np.ndarray, with_scale: bool = True,
            weights: Optional[np.ndarray] = None) -> Tuple[float, np.ndarray, np.ndarray]:
    """Least-squares similarity dst ~ s * R @ src + t (Umeyama 1991).

    src, dst: [N, 3] points (N >= 3 non-collinear for a unique R; N >= 2 gives s, t).
    weights: [N] >= 0 or None. Returns (s, R [3, 3], t [3]).
    """
    src = np.asarray(src, dtype=np.float64)
    dst = np.asarray(dst, dtype=np.float64)
    w = np.ones(len(src)) if weights is None else np.asarray(weights, dtype=np.float64)
    w = w / max(w.sum(), 1e-12)
    mu_s = w @ src
    mu_d = w @ dst
    xs = src - mu_s
    xd = dst - mu_d
    cov = (xd * w[:, None]).T @ xs
    U, S, Vt = np.linalg.svd(cov)
    D = np.eye(3)
    if np.linalg.det(U) * np.linalg.det(Vt) < 0:
        D[2, 2] = -1
    R = U @ D @ Vt
    var_s = float(w @ np.sum(xs**2, axis=1))
    s = float(np.trace(np.diag(S) @ D) / var_s) if (with_scale and var_s > 1e-18) else 1.0
    t = mu_d - s * R @ mu_s
    return s, R, t


def camera_centers(T_world_cam: np.ndarray) -> np.ndarray:
    """[N, 3] camera centres of [N, 4, 4] camera-to-world poses."""
    return np.asarray(T_world_cam)[..., :3, 3]
