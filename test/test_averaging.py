"""Motion averaging: Reloc3r's exact method against its published fixture, and the robust
default on synthetic geometry with real math (outliers, degeneracy, covariance)."""
from pathlib import Path

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from reloc_ros.averaging import (
    AveragingConfig,
    fuse_pair_estimates,
    reloc3r_motion_averaging,
    robust_motion_averaging,
)
from reloc_ros.geometry import invert, pose_errors
from reloc_ros.types import InvalidInputError, PairEstimate, Status

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
FIXTURE = SHARED / "fixtures" / "reloc3r_motion_averaging_io.npz"


def _rot(rng, deg):
    """Random rotation of about ``deg`` degrees per axis (Gaussian rotation vector)."""
    return Rotation.from_rotvec(np.radians(deg) * rng.normal(size=3)).as_matrix()


def make_pairs(rng, n, noise_deg=0.0, centres=None, n_outliers=0, noise=None):
    """Query pose, keyframe poses [n,4,4] and noisy T_kf_query [n,4,4] with random scales.

    noise: optional pre-drawn [n, 2, 3] standard normal draws so two noise levels can
    share the same noise directions.
    """
    T_wq = np.eye(4)
    T_wq[:3, :3] = Rotation.random(random_state=rng).as_matrix()
    T_wq[:3, 3] = rng.normal(size=3)
    T_wk = np.tile(np.eye(4), (n, 1, 1))
    for i in range(n):
        T_wk[i, :3, :3] = Rotation.random(random_state=rng).as_matrix()
        T_wk[i, :3, 3] = T_wq[:3, 3] + (rng.normal(size=3) * 2.0 if centres is None else centres[i])
    T_kq = invert(T_wk) @ T_wq
    z = rng.normal(size=(n, 2, 3)) if noise is None else noise
    for i in range(n):
        T_kq[i, :3, :3] = Rotation.from_rotvec(np.radians(noise_deg) * z[i, 0]).as_matrix() @ T_kq[i, :3, :3]
        T_kq[i, :3, 3] = Rotation.from_rotvec(np.radians(noise_deg) * z[i, 1]).as_matrix() @ T_kq[i, :3, 3]
    for i in range(n_outliers):
        T_kq[i, :3, :3] = Rotation.random(random_state=rng).as_matrix()
        T_kq[i, :3, 3] = rng.normal(size=3)
    T_kq[:, :3, 3] *= rng.uniform(0.05, 20.0, size=(n, 1))  # direction-only: arbitrary scales
    return T_wq, T_wk, T_kq


# ---- Reloc3r's method -------------------------------------------------------------------


@pytest.mark.parametrize("n", [2, 5, 10])
def test_reloc3r_reproduces_published_fixture(n):
    if not FIXTURE.exists():
        pytest.skip(f"shared fixture {FIXTURE} not found (needs ../shared next to the repo)")
    data = np.load(FIXTURE, allow_pickle=False)
    out = reloc3r_motion_averaging(data[f"n{n}_poses_db"], data[f"n{n}_poses_q2d"])
    np.testing.assert_allclose(out, data[f"n{n}_out"], rtol=0, atol=1e-9)


def test_reloc3r_rejects_bad_input():
    with pytest.raises(InvalidInputError):
        reloc3r_motion_averaging(np.zeros((0, 4, 4)), np.zeros((0, 4, 4)))
    with pytest.raises(InvalidInputError):
        reloc3r_motion_averaging(np.tile(np.eye(4), (3, 1, 1)), np.tile(np.eye(4), (2, 1, 1)))
    bad = np.tile(np.eye(4), (2, 1, 1))
    bad[1, 0, 3] = np.nan
    with pytest.raises(InvalidInputError):
        reloc3r_motion_averaging(np.tile(np.eye(4), (2, 1, 1)), bad)


# ---- robust default -----------------------------------------------------------------------


def test_noise_free_pairs_are_recovered_exactly():
    rng = np.random.default_rng(1)
    T_wq, T_wk, T_kq = make_pairs(rng, 6)
    res = robust_motion_averaging(T_wk, T_kq, rng.uniform(20, 300, 6))
    assert res.status is Status.OK
    t_err, r_err = pose_errors(res.T_world_cam, T_wq)
    assert t_err < 1e-9 and r_err < 1e-7
    assert res.inlier_mask.all()
    # Perfect agreement still gives a real, positive-definite covariance (from the priors).
    eig = np.linalg.eigvalsh(res.covariance)
    assert np.all(eig > 0) and np.all(np.isfinite(eig))
    assert 0.5 < res.confidence <= 1.0


def test_gross_outliers_are_rejected_while_reloc3r_is_pulled_off():
    rng = np.random.default_rng(7)
    T_wq, T_wk, T_kq = make_pairs(rng, 10, noise_deg=0.5, n_outliers=3)
    res = robust_motion_averaging(T_wk, T_kq, np.full(10, 100.0))
    assert res.status is Status.OK
    np.testing.assert_array_equal(res.inlier_mask, [False] * 3 + [True] * 7)
    t_err, r_err = pose_errors(res.T_world_cam, T_wq)
    t_r3, r_r3 = pose_errors(reloc3r_motion_averaging(T_wk, T_kq), T_wq)
    assert t_err < 0.05 and r_err < 1.0
    assert t_r3 > 10 * t_err and t_r3 > 0.2
    # The reported covariance is consistent with the actual error (within ~4 sigma).
    e = res.T_world_cam[:3, 3] - T_wq[:3, 3]
    assert e @ np.linalg.solve(res.covariance[:3, :3], e) < 16.0


def test_match_quality_weights_pull_toward_the_better_pairs():
    rng = np.random.default_rng(3)
    T_wq, T_wk, T_kq = make_pairs(rng, 6)
    noisy = T_kq.copy()
    for i in range(3):  # three pairs with a 4 deg rotation bias (still inliers)
        noisy[i, :3, :3] = Rotation.from_rotvec(np.radians([4.0, 0, 0])).as_matrix() @ noisy[i, :3, :3]
    even = robust_motion_averaging(T_wk, noisy, np.ones(6))
    favour_good = robust_motion_averaging(T_wk, noisy, np.array([1, 1, 1, 50, 50, 50.0]))
    assert pose_errors(favour_good.T_world_cam, T_wq)[1] < 0.3 * pose_errors(even.T_world_cam, T_wq)[1]


def test_translation_scale_of_each_pair_does_not_matter():
    rng = np.random.default_rng(11)
    T_wq, T_wk, T_kq = make_pairs(rng, 8, noise_deg=1.0, n_outliers=2)
    rescaled = T_kq.copy()
    rescaled[:, :3, 3] *= rng.uniform(0.01, 100.0, size=(8, 1))
    a = robust_motion_averaging(T_wk, T_kq, np.full(8, 50.0))
    b = robust_motion_averaging(T_wk, rescaled, np.full(8, 50.0))
    np.testing.assert_allclose(a.T_world_cam, b.T_world_cam, atol=1e-9)
    np.testing.assert_allclose(a.covariance, b.covariance, rtol=1e-6, atol=1e-15)
    np.testing.assert_array_equal(a.inlier_mask, b.inlier_mask)


def test_collinear_keyframes_are_degenerate_with_large_variance_along_the_line():
    rng = np.random.default_rng(5)
    line = np.array([0.2, 0.1, 1.0]) / np.linalg.norm([0.2, 0.1, 1.0])
    # Driving straight: keyframes behind and ahead of the query on one line.
    centres = [s * line for s in (-7.2, -4.8, -2.4, 2.4, 4.8)]
    T_wq, T_wk, T_kq = make_pairs(rng, 5, noise_deg=0.3, centres=centres)
    res = robust_motion_averaging(T_wk, T_kq, np.full(5, 100.0))
    assert res.status is Status.DEGENERATE
    assert res.confidence <= AveragingConfig().degenerate_max_confidence
    assert "near-parallel" in res.message
    lam, V = np.linalg.eigh(res.covariance[:3, :3])
    assert abs(V[:, -1] @ line) > 0.99
    assert lam[-1] > 1e3 * lam[0]
    assert abs(np.asarray(res.condition["weak_direction"]) @ line) > 0.99
    assert res.condition["effective_ray_angle_deg"] < 5.0
    # The estimate is still the best available: on the line and between the keyframes
    # that bracket the query, not garbage.
    x = res.T_world_cam[:3, 3] - T_wq[:3, 3]
    assert np.linalg.norm(x - (x @ line) * line) < 0.1
    assert abs(x @ line) < 1.2  # the keyframes at -2.4 and +2.4 bracket the query


def test_single_ray_is_degenerate_and_no_rays_is_not_silent():
    rng = np.random.default_rng(2)
    T_wq, T_wk, T_kq = make_pairs(rng, 1)
    res = robust_motion_averaging(T_wk, T_kq, [10.0])
    assert res.status is Status.DEGENERATE
    lam, V = np.linalg.eigh(res.covariance[:3, :3])
    ray = T_wk[0, :3, :3] @ T_kq[0, :3, 3]
    assert abs(V[:, -1] @ ray / np.linalg.norm(ray)) > 0.99 and lam[-1] > 1e3 * lam[0]
    assert pose_errors(res.T_world_cam, T_wq)[1] < 1e-7  # rotation is still exact


def test_unusable_input_gives_not_localized_or_a_clear_error():
    rng = np.random.default_rng(4)
    T_wq, T_wk, T_kq = make_pairs(rng, 4)
    res = robust_motion_averaging(T_wk, T_kq, np.zeros(4))
    assert res.status is Status.NOT_LOCALIZED and res.T_world_cam is None and "no usable pair" in res.message

    # Two pairs that disagree wildly in rotation: neither confirms the other.
    bad = T_kq[:2].copy()
    bad[1, :3, :3] = _rot(rng, 60.0) @ bad[1, :3, :3]
    res = robust_motion_averaging(T_wk[:2], bad, [1.0, 1.0])
    assert res.status is Status.NOT_LOCALIZED and "consensus" in res.message

    # A NaN pair is dropped, the rest still localizes.
    nan = T_kq.copy()
    nan[0, 0, 0] = np.nan
    res = robust_motion_averaging(T_wk, nan, np.ones(4))
    assert res.status is Status.OK and not res.inlier_mask[0] and res.inlier_mask[1:].all()
    assert pose_errors(res.T_world_cam, T_wq)[0] < 1e-9

    with pytest.raises(InvalidInputError):
        robust_motion_averaging(T_wk, T_kq[:3], np.ones(4))
    with pytest.raises(InvalidInputError):
        robust_motion_averaging(T_wk, T_kq, np.array([1.0, -1.0, 1.0, 1.0]))
    broken_kf = T_wk.copy()
    broken_kf[2, :3, :3] *= 2.0
    with pytest.raises(InvalidInputError):
        robust_motion_averaging(broken_kf, T_kq, np.ones(4))


def test_covariance_shrinks_with_less_noise():
    traces = []
    for noise in (3.0, 0.3):
        rng = np.random.default_rng(9)  # same geometry and noise directions, scaled
        draws = np.random.default_rng(10).normal(size=(10, 2, 3))
        T_wq, T_wk, T_kq = make_pairs(rng, 10, noise_deg=noise, noise=draws)
        res = robust_motion_averaging(T_wk, T_kq, np.full(10, 100.0))
        assert res.status is Status.OK
        traces.append((np.trace(res.covariance[:3, :3]), np.trace(res.covariance[3:, 3:])))
    (t_hi, r_hi), (t_lo, r_lo) = traces
    assert t_lo < 0.3 * t_hi and r_lo < 0.3 * r_hi


def test_metric_pairs_fix_the_centre_without_triangulation():
    rng = np.random.default_rng(6)
    T_wq, T_wk, T_kq = make_pairs(rng, 1)
    T_kq_metric = invert(T_wk) @ T_wq  # true metric translation
    res = robust_motion_averaging(T_wk, T_kq_metric, [5.0], metric=[True])
    assert res.status is Status.OK
    assert pose_errors(res.T_world_cam, T_wq)[0] < 1e-9


def test_fuse_pair_estimates_matches_array_call():
    rng = np.random.default_rng(8)
    T_wq, T_wk, T_kq = make_pairs(rng, 5, noise_deg=0.5)
    all_kf = np.concatenate([np.tile(np.eye(4), (3, 1, 1)), T_wk])  # map with 8 keyframes
    pairs = [PairEstimate(keyframe_id=3 + i, T_kf_query=T_kq[i], weight=40.0 + i, inliers=40 + i) for i in range(5)]
    a = fuse_pair_estimates(pairs, all_kf)
    b = robust_motion_averaging(T_wk, T_kq, 40.0 + np.arange(5))
    np.testing.assert_allclose(a.T_world_cam, b.T_world_cam, atol=1e-12)
    with pytest.raises(InvalidInputError):
        fuse_pair_estimates([PairEstimate(keyframe_id=99, T_kf_query=np.eye(4))], all_kf)
    assert fuse_pair_estimates([], all_kf).status is Status.NOT_LOCALIZED


@pytest.mark.parametrize("field,value", [("rotation_inlier_deg", 0.0), ("ray_inlier_deg", 200.0),
                                         ("min_consensus", 0), ("prior_strength", 0.0),
                                         ("degenerate_max_confidence", 1.5), ("weight_power", -1.0)])
def test_config_rejects_out_of_range_values(field, value):
    with pytest.raises(ValueError, match=field):
        AveragingConfig(**{field: value}).validate()


def test_covariance_is_calibrated_for_independent_pair_noise():
    """With independent 1 deg pair noise (pair_correlation=0 states exactly that), the
    normalised squared errors of position and rotation average about 3 (chi-square, 3 dof)."""
    from reloc_ros.geometry import so3_log

    rng = np.random.default_rng(12)
    cfg = AveragingConfig(pair_correlation=0.0, prior_rotation_sigma_deg=1.0, prior_ray_sigma_deg=1.0)
    nees_t, nees_r = [], []
    for _ in range(60):
        T_wq, T_wk, T_kq = make_pairs(rng, 8, noise_deg=1.0)
        res = robust_motion_averaging(T_wk, T_kq, np.full(8, 100.0), cfg)
        e = res.T_world_cam[:3, 3] - T_wq[:3, 3]
        r = so3_log(T_wq[:3, :3] @ res.T_world_cam[:3, :3].T)
        nees_t.append(e @ np.linalg.solve(res.covariance[:3, :3], e))
        nees_r.append(r @ np.linalg.solve(res.covariance[3:, 3:], r))
    assert 1.5 < np.mean(nees_t) < 6.0 and 1.5 < np.mean(nees_r) < 6.0
    # The default (pairs sharing a query are correlated) is more conservative, never less.
    res = robust_motion_averaging(T_wk, T_kq, np.full(8, 100.0))
    assert np.trace(res.covariance) > np.trace(robust_motion_averaging(T_wk, T_kq, np.full(8, 100.0), cfg).covariance)
