"""Frame bookkeeping for the node (REP-105): camera estimate -> base pose, covariance, map->odom.

Pure numpy, no ROS. Poses are [4, 4] float64 ``T_a_b`` (frame b -> frame a), metres.
Covariances are [6, 6] over (x, y, z, rx, ry, rz) expressed in the map frame, m^2 and
rad^2, rotation as a left perturbation ``R = exp([drot]_x) R_est`` (the
geometry_msgs/PoseWithCovariance convention, fixed axes of the header frame).
"""
from __future__ import annotations

from typing import Tuple

import numpy as np

from reloc_ros.geometry import invert, skew


def camera_to_body(T_map_cam: np.ndarray, cov_cam: np.ndarray, T_body_cam: np.ndarray
                   ) -> Tuple[np.ndarray, np.ndarray]:
    """Pose and covariance of a rigidly attached body (e.g. base_link) from the camera's.

    T_map_cam: [4, 4] camera(optical)-to-map estimate. cov_cam: [6, 6] its covariance.
    T_body_cam: [4, 4] camera-to-body mounting (base_link -> camera optical TF).
    Returns (T_map_body [4, 4], cov_body [6, 6]), both in the map frame.

    With ``R_c' = exp(dθ) R_c`` and ``p_c' = p_c + dp``, the body origin
    ``p_b = p_c + R_c t_cb`` moves by ``dp + dθ x (R_c t_cb)`` and the body rotation by the
    same ``dθ``, so ``J = [[I, -[R_c t_cb]x], [0, I]]`` and ``cov_body = J cov_cam J^T``.
    """
    T_cam_body = invert(T_body_cam)
    T_map_body = np.asarray(T_map_cam, dtype=np.float64) @ T_cam_body
    lever = T_map_cam[:3, :3] @ T_cam_body[:3, 3]  # camera centre -> body origin, map axes
    J = np.eye(6)
    J[:3, 3:] = -skew(lever)
    cov = J @ np.asarray(cov_cam, dtype=np.float64) @ J.T
    return T_map_body, 0.5 * (cov + cov.T)


def map_to_odom(T_map_base: np.ndarray, T_odom_base: np.ndarray) -> np.ndarray:
    """REP-105 map->odom from the map->base estimate and odom->base at the same stamp.

    Returns T_map_odom [4, 4] such that ``T_map_odom @ T_odom_base == T_map_base``.
    """
    return np.asarray(T_map_base, dtype=np.float64) @ invert(T_odom_base)


def floor_covariance(cov: np.ndarray, min_position_std: float, min_rotation_std: float) -> np.ndarray:
    """A [6, 6] covariance whose diagonal is at least min_position_std^2 (m^2) per position
    axis and min_rotation_std^2 (rad^2) per rotation axis.

    Operator hints (RViz '2D Pose Estimate') carry zeros for z, roll and pitch; read
    literally, they would claim those are known exactly. Non-finite entries become the floor.
    """
    c = np.asarray(cov, dtype=np.float64).reshape(6, 6).copy()
    c[~np.isfinite(c)] = 0.0
    c = 0.5 * (c + c.T)
    floor = np.r_[np.full(3, min_position_std ** 2), np.full(3, min_rotation_std ** 2)]
    d = np.diag(c)
    add = np.maximum(floor - d, 0.0)
    return c + np.diag(add)


def covariance_is_usable(cov) -> bool:
    """True for a finite, symmetric, positive semi-definite, not-all-zero [6, 6] covariance."""
    if cov is None:
        return False
    c = np.asarray(cov, dtype=np.float64)
    if c.shape != (6, 6) or not np.all(np.isfinite(c)) or not np.any(c):
        return False
    if not np.allclose(c, c.T, atol=1e-9 + 1e-6 * np.abs(c).max()):
        return False
    return bool(np.min(np.linalg.eigvalsh(0.5 * (c + c.T))) >= -1e-9 * max(np.abs(c).max(), 1.0))
