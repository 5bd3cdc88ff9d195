"""REP-105 frame bookkeeping: camera estimate -> base pose and covariance, map->odom."""
import numpy as np
from scipy.spatial.transform import Rotation

from reloc_ros.geometry import invert, make_T, so3_exp
from reloc_ros.ros.frames import camera_to_body, covariance_is_usable, map_to_odom


def _mount():
    R_base_opt = np.array([[0.0, 0.0, 1.0], [-1.0, 0.0, 0.0], [0.0, -1.0, 0.0]])
    return make_T(so3_exp([0, 0.2, 0.1]) @ R_base_opt, [0.3, -0.1, 1.1])


def test_body_pose_is_camera_pose_times_mount_inverse():
    T_map_cam = make_T(so3_exp([0.4, -0.3, 1.0]), [2.0, 1.0, 1.4])
    T_base_cam = _mount()
    T_map_base, _ = camera_to_body(T_map_cam, np.eye(6) * 1e-4, T_base_cam)
    np.testing.assert_allclose(T_map_base @ T_base_cam, T_map_cam, atol=1e-12)


def test_covariance_propagation_matches_monte_carlo():
    rng = np.random.default_rng(3)
    T_map_cam = make_T(so3_exp([0.4, -0.3, 1.0]), [2.0, 1.0, 1.4])
    T_base_cam = _mount()
    s = np.sqrt([1e-4] * 3 + [1e-5] * 3)
    A = rng.normal(size=(6, 6)) * s[:, None]
    cov_cam = A @ A.T / 6.0
    T_map_base, cov_base = camera_to_body(T_map_cam, cov_cam, T_base_cam)
    n = 40000
    d = rng.multivariate_normal(np.zeros(6), cov_cam, size=n)
    t_cb = invert(T_base_cam)[:3, 3]
    # The ROS convention: position perturbed in the map frame, rotation on the left.
    R_c = Rotation.from_rotvec(d[:, 3:]).as_matrix() @ T_map_cam[:3, :3]
    p_b = T_map_cam[:3, 3] + d[:, :3] + R_c @ t_cb
    R_b = R_c @ invert(T_base_cam)[:3, :3]
    samples = np.concatenate([p_b - T_map_base[:3, 3],
                              Rotation.from_matrix(R_b @ T_map_base[:3, :3].T).as_rotvec()], 1)
    emp = np.cov(samples.T)
    scale = np.sqrt(np.outer(np.diag(cov_base), np.diag(cov_base)))
    assert np.max(np.abs(emp - cov_base) / scale) < 0.05
    # Without correlations, rotation uncertainty times the ~1 m lever arm adds to the position's.
    diag = np.diag([1e-4] * 3 + [1e-5] * 3)
    _, cov_diag = camera_to_body(T_map_cam, diag, T_base_cam)
    lever = np.linalg.norm(invert(T_base_cam)[:3, 3])
    assert np.trace(cov_diag[:3, :3]) > np.trace(diag[:3, :3]) + 1e-5 * lever**2


def test_map_to_odom_composes_back_to_the_estimate():
    T_map_base = make_T(so3_exp([0.0, 0.0, 0.7]), [3.0, -2.0, 0.0])
    T_odom_base = make_T(so3_exp([0.0, 0.02, 0.3]), [1.0, 0.5, 0.01])
    T_map_odom = map_to_odom(T_map_base, T_odom_base)
    np.testing.assert_allclose(T_map_odom @ T_odom_base, T_map_base, atol=1e-12)


def test_covariance_usability():
    assert covariance_is_usable(np.diag([1e-4] * 3 + [1e-5] * 3))
    assert not covariance_is_usable(None)
    assert not covariance_is_usable(np.zeros((6, 6)))
    assert not covariance_is_usable(np.full((6, 6), np.nan))
    assert not covariance_is_usable(np.diag([1.0, 1.0, -1.0, 1.0, 1.0, 1.0]))
    bad = np.eye(6)
    bad[0, 1] = 0.5
    assert not covariance_is_usable(bad)
    assert not covariance_is_usable(np.eye(3))
