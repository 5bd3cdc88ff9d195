"""The PnP covariance model of the geometric estimator (reloc_ros.estimators.geometric.pnp_covariance)
on simulated 2D-3D correspondences with known noise: no data files, a few seconds.

The model's three gains are fitted on the calibration room of bench/bench_covariance.py;
here each component is checked against the noise it describes, with the gains it
needs set explicitly where the simulation is the model itself (linear, Gaussian).
"""
import numpy as np
import poselib
import pytest

from reloc_ros.estimators.geometric import GeometricConfig, pnp_covariance
from reloc_ros.geometry import invert, make_T, so3_exp, so3_log
from reloc_ros.maps import POINT_DEPTH, POINT_TRIANGULATED

K = np.array([[525.0, 0, 319.5], [0, 525.0, 239.5], [0, 0, 1]])
CAM = {"model": "PINHOLE", "width": 640, "height": 480, "params": [525.0, 525.0, 319.5, 239.5]}
CHI2_3_MEDIAN, CHI2_3_95 = 2.366, 7.81
PIXEL_ONLY = dict(cov_keyframe_gain=0.0, cov_depth_field_gain=0.0, cov_common_mode=0.0)


def _project(T_world_cam, X):
    Xc = (X - T_world_cam[:3, 3]) @ T_world_cam[:3, :3]
    return (Xc[:, :2] / Xc[:, 2:3]) * K[0, 0] + K[:2, 2]


def _scene(rng, n=400, n_kf=4):
    """A query camera at the origin looking down +z, points 2-6 m away filling the image,
    seen by n_kf keyframes placed 0.3-0.6 m around the query."""
    T_q = make_T(so3_exp(rng.normal(0, 0.05, 3)), rng.normal(0, 0.05, 3))
    uv = rng.uniform([20, 20], [620, 460], (n, 2))
    z = rng.uniform(2.0, 6.0, n)
    Xc = np.concatenate([(uv - K[:2, 2]) / K[0, 0] * z[:, None], z[:, None]], axis=1)
    X = Xc @ T_q[:3, :3].T + T_q[:3, 3]
    T_kf = np.stack([make_T(so3_exp(rng.normal(0, 0.1, 3)), rng.uniform(-0.6, 0.6, 3) * [1, 0.5, 1])
                     for _ in range(n_kf)])
    kf = rng.integers(0, n_kf, n)
    return T_q, X, kf, T_kf


def _solve(x, X, T_init):
    """Least-squares PnP (no robust loss), as the model assumes, from a nearby start."""
    T_cw = invert(T_init)
    pose = poselib.CameraPose()
    pose.R, pose.t = T_cw[:3, :3], T_cw[:3, 3]
    pose, _ = poselib.refine_absolute_pose(x, X, pose, CAM, {"loss_type": "TRIVIAL", "max_iterations": 50})
    return invert(make_T(pose.R, pose.t))


def _nees(T_est, T_true, cov):
    ep = T_true[:3, 3] - T_est[:3, 3]
    er = so3_log(T_true[:3, :3] @ T_est[:3, :3].T)
    return float(ep @ np.linalg.solve(cov[:3, :3], ep)), float(er @ np.linalg.solve(cov[3:, 3:], er))


def _trials(make, n_trials, config, seed=0):
    """[n_trials, 2] position/rotation NEES; make(rng) -> (T_true, X_map, x_obs, kw)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n_trials):
        T_true, X, x, kw = make(rng)
        T = _solve(x, X, T_true)
        out.append(_nees(T, T_true, pnp_covariance(T, X, x, K, config=config, **kw).covariance))
    return np.array(out)


def test_independent_pixel_noise_gives_chi_square_nees():
    """Exact map points, Gaussian pixel noise of known sigma: NEES follows chi-square(3)."""
    def make(rng):
        T_q, X, kf, T_kf = _scene(rng)
        x = _project(T_q, X) + rng.normal(0, 0.7, (len(X), 2))
        return T_q, X, x, dict(keyframe=kf, source=np.full(len(X), POINT_DEPTH), T_world_kf=T_kf)

    nees = _trials(make, 150, GeometricConfig(**PIXEL_ONLY))
    for v in nees.T:  # mean 3 (sd 0.2 over 150), median 2.37, 95 % below 7.81
        assert 2.4 < v.mean() < 3.7
        assert 1.7 < np.median(v) < 3.1
        assert 0.88 < np.mean(v < CHI2_3_95) <= 1.0
    # the fitted gains stay calibrated on an exact map: the map components are ~0 there
    nees_default = _trials(make, 60, GeometricConfig(), seed=1)
    assert 1.0 < np.median(nees_default[:, 0]) < CHI2_3_MEDIAN * 1.6


def test_residual_variance_is_estimated_not_assumed():
    rng = np.random.default_rng(3)
    T_q, X, kf, T_kf = _scene(rng)
    noise = rng.normal(0, 1.0, (len(X), 2))
    covs, sig = [], []
    for sigma in (0.3, 0.6, 1.2):
        pc = pnp_covariance(T_q, X, _project(T_q, X) + sigma * noise, K, config=GeometricConfig(**PIXEL_ONLY))
        covs.append(np.trace(pc.covariance[:3, :3]))
        sig.append(pc.sigma2["pixel"] + pc.sigma2["query"])
    # at the true pose the residuals are the noise itself: variance ~ sigma^2, covariance ~ sigma^2
    np.testing.assert_allclose(np.sqrt(sig), [0.3, 0.6, 1.2], rtol=0.1)
    np.testing.assert_allclose(np.array(covs) / covs[0], [1, 4, 16], rtol=1e-6)


def test_a_query_keypoint_matched_in_several_keyframes_counts_once():
    """Each query keypoint matched in 3 keyframes gives 3 pairs with one shared pixel error:
    3x the pairs, the same information. Without the grouping the covariance would be 3x
    too small in variance."""
    rng = np.random.default_rng(4)
    T_q, X, kf, T_kf = _scene(rng, n=300)
    x = _project(T_q, X) + rng.normal(0, 0.8, (len(X), 2))
    cfg = GeometricConfig(**PIXEL_ONLY)
    single = pnp_covariance(T_q, X, x, K, query_index=np.arange(300), config=cfg).covariance
    X3, x3, q3 = np.tile(X, (3, 1)), np.tile(x, (3, 1)), np.tile(np.arange(300), 3)
    grouped = pnp_covariance(T_q, X3, x3, K, query_index=q3, config=cfg).covariance
    naive = pnp_covariance(T_q, X3, x3, K, query_index=np.arange(900), config=cfg).covariance
    np.testing.assert_allclose(grouped, single, rtol=0.02, atol=1e-12)
    assert np.trace(naive) == pytest.approx(np.trace(single) / 3, rel=0.02)

    # with pixel noise shared by the duplicates the grouped covariance is calibrated
    def make(rng):
        T_q, X, kf, T_kf = _scene(rng, n=150)
        x = _project(T_q, X) + rng.normal(0, 0.7, (len(X), 2))
        # the same point in two keyframes, each with its own 2 mm error
        Xd = np.concatenate([X + rng.normal(0, 0.002, X.shape), X + rng.normal(0, 0.002, X.shape)])
        return T_q, Xd, np.tile(x, (2, 1)), dict(query_index=np.tile(np.arange(150), 2))

    nees = _trials(make, 100, cfg, seed=5)
    assert 2.2 < nees[:, 0].mean() < 3.9 and 2.2 < nees[:, 1].mean() < 3.9


def _rigid_keyframe_errors(rng, T_kf, kf, X, sig_t, sig_r):
    """Move each keyframe's points as its pose error would (rigid, about the keyframe)."""
    Xe = X.copy()
    for k in range(len(T_kf)):
        m = kf == k
        dT = make_T(so3_exp(rng.normal(0, sig_r, 3)), rng.normal(0, sig_t, 3))
        Tn = T_kf[k] @ dT
        Xe[m] = ((X[m] - T_kf[k][:3, 3]) @ T_kf[k][:3, :3]) @ Tn[:3, :3].T + Tn[:3, 3]
    return Xe


def test_keyframe_pose_errors_are_seen_in_the_residuals_and_widen_the_covariance():
    """Depth points of 5 keyframes whose poses are off by 6 mm and 0.09 deg per axis (points
    4 m away move ~6 mm either way): the pose error is centimetres while the residuals
    look like a few px of independent noise. The pixel-only model is badly overconfident;
    the keyframe component, estimated from the same residuals, is calibrated."""
    def make(rng):
        T_q, X, kf, T_kf = _scene(rng, n=500, n_kf=5)
        Xm = _rigid_keyframe_errors(rng, T_kf, kf, X, 0.006, np.radians(0.09))
        x = _project(T_q, X) + rng.normal(0, 0.5, (len(X), 2))
        return T_q, Xm, x, dict(keyframe=kf, source=np.full(len(X), POINT_DEPTH), T_world_kf=T_kf)

    cfg = GeometricConfig(cov_keyframe_gain=1.0, cov_depth_field_gain=0.0, cov_common_mode=0.0)
    nees = _trials(make, 60, cfg, seed=6)
    assert 1.2 < np.median(nees[:, 0]) < 4.5 and 1.2 < np.median(nees[:, 1]) < 4.5
    pixel_only = _trials(make, 60, GeometricConfig(**PIXEL_ONLY), seed=6)
    assert np.median(pixel_only[:, 0]) > 20 and np.median(pixel_only[:, 1]) > 20

    # the variance estimate finds the keyframe error, and nothing on an exact map
    rng = np.random.default_rng(7)
    T_q, X, kf, T_kf = _scene(rng, n=500, n_kf=5)
    x = _project(T_q, X) + rng.normal(0, 0.5, (len(X), 2))
    kw = dict(keyframe=kf, source=np.full(len(X), POINT_DEPTH), T_world_kf=T_kf)
    exact = pnp_covariance(_solve(x, X, T_q), X, x, K, **kw)
    Xm = _rigid_keyframe_errors(rng, T_kf, kf, X, 0.006, np.radians(0.09))
    noisy = pnp_covariance(_solve(x, Xm, T_q), Xm, x, K, **kw)
    assert np.sqrt(noisy.sigma2["keyframe"]) > 0.002  # metres, per axis (6 mm simulated)
    assert np.sqrt(exact.sigma2["keyframe"]) < 0.001
    assert np.trace(noisy.covariance[:3, :3]) > 10 * np.trace(exact.covariance[:3, :3])


def test_depth_field_of_triangulated_points():
    """Triangulated points whose depth is off by a smooth per-keyframe field (a few %):
    the component sees it; on exact points it stays ~0; its gain scales its share."""
    rng = np.random.default_rng(8)
    T_q, X, kf, T_kf = _scene(rng, n=500, n_kf=4)
    x = _project(T_q, X) + rng.normal(0, 0.5, (len(X), 2))
    src = np.full(len(X), POINT_TRIANGULATED)
    Xm = X.copy()
    for k in range(4):
        m = kf == k
        d = X[m] - T_kf[k][:3, 3]
        xk = d @ T_kf[k][:3, :3]
        a, b, c = rng.normal(0, 0.02, 3)
        eps = a + b * xk[:, 0] / xk[:, 2] + c * xk[:, 1] / xk[:, 2]
        Xm[m] = X[m] + eps[:, None] * d
    kw = dict(keyframe=kf, source=src, T_world_kf=T_kf)
    exact = pnp_covariance(_solve(x, X, T_q), X, x, K, **kw)
    noisy = pnp_covariance(_solve(x, Xm, T_q), Xm, x, K, **kw)
    assert np.sqrt(noisy.sigma2["depth_field"]) > 0.005 > np.sqrt(exact.sigma2["depth_field"])
    assert "keyframe" not in noisy.parts  # no depth points: no rigid keyframe component
    a = np.trace(noisy.combine(1.0, 1.0, 0.0))
    b = np.trace(noisy.combine(1.0, 10.0, 0.0))
    part = np.trace(noisy.parts["depth_field"])
    assert b - a == pytest.approx(9 * part, rel=1e-9) and part > 0


def test_covariance_is_a_valid_6x6_and_matches_its_gains():
    rng = np.random.default_rng(9)
    T_q, X, kf, T_kf = _scene(rng, n=200, n_kf=3)
    src = np.where(rng.random(len(X)) < 0.5, POINT_DEPTH, POINT_TRIANGULATED)
    Xm = _rigid_keyframe_errors(rng, T_kf, kf, X, 0.004, 0.002)
    x = _project(T_q, X) + rng.normal(0, 0.6, (len(X), 2))
    T = _solve(x, Xm, T_q)
    cfg = GeometricConfig()
    pc = pnp_covariance(T, Xm, x, K, kf, src, T_kf, cfg)
    C = pc.covariance
    assert C.shape == (6, 6) and np.all(np.isfinite(C)) and np.allclose(C, C.T)
    assert np.all(np.linalg.eigvalsh(C) > 0)
    np.testing.assert_allclose(C, pc.combine(cfg.cov_keyframe_gain, cfg.cov_depth_field_gain, cfg.cov_common_mode))
    assert set(pc.parts) == {"pixel", "query", "keyframe", "depth_field", "common"}
    # the order of the correspondences does not matter
    p = rng.permutation(len(X))
    C2 = pnp_covariance(T, Xm[p], x[p], K, kf[p], src[p], T_kf, cfg).covariance
    np.testing.assert_allclose(C2, C, rtol=1e-8, atol=1e-15)
    # the common-mode term only adds (mostly rotation about the image axes)
    more = pnp_covariance(T, Xm, x, K, kf, src, T_kf, GeometricConfig(cov_common_mode=1.0)).covariance
    assert np.all(np.linalg.eigvalsh(more - C) > -1e-15) and np.trace(more[3:, 3:]) > np.trace(C[3:, 3:])


def test_the_floor_guards_a_zero_residual():
    rng = np.random.default_rng(10)
    T_q, X, kf, T_kf = _scene(rng, n=50)
    pc = pnp_covariance(T_q, X, _project(T_q, X), K, config=GeometricConfig(min_pixel_sigma=0.1))
    assert pc.sigma2["pixel"] + pc.sigma2["query"] == pytest.approx(0.01)
    assert np.all(np.linalg.eigvalsh(pc.covariance) > 0)


@pytest.mark.parametrize("field_name", ["cov_keyframe_gain", "cov_depth_field_gain", "cov_common_mode",
                                        "min_pixel_sigma"])
def test_config_rejects_negative_constants(field_name):
    with pytest.raises(ValueError, match=field_name):
        GeometricConfig(**{field_name: -1.0}).validate()
