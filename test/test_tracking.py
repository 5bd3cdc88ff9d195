"""PoseTracker: fusion of per-frame fixes through drifting odometry (reloc_ros.tracking).

A simulated robot drives a loop; odometry drifts (reloc_ros.sequence.drifting_odometry);
fixes are the true pose plus seeded Gaussian noise of the covariance they carry. Errors
are measured against the exact true poses.
"""
import math

import numpy as np
import pytest

from reloc_ros.geometry import make_T, so3_exp
from reloc_ros.sequence import OdometryDrift, drifting_odometry
from reloc_ros.tracking import Fix, PoseTracker, TrackerConfig, TrackState, pose_difference, pose_plus
from reloc_ros.types import Status

SIG_P, SIG_R = 0.05, math.radians(1.0)
COV = np.diag([SIG_P ** 2] * 3 + [SIG_R ** 2] * 3)
NS = 1_000_000_000


def _loop(n=200, rate=10.0, speed=1.0):
    """[n, 4, 4] body poses on a 6 m-radius circle at ``speed`` m/s, with stamps (ns)."""
    t = np.arange(n) / rate
    ang = speed * t / 6.0
    T = np.stack([make_T(so3_exp([0, 0, a + np.pi / 2]), [6 * np.cos(a), 6 * np.sin(a), 0.1 * np.sin(ti)])
                  for a, ti in zip(ang, t)])
    return T, (t * NS).astype(np.int64) + 5 * NS


def _noisy(T, rng, scale=1.0):
    return pose_plus(T, rng.normal(0, 1, 6) * np.r_[[SIG_P] * 3, [SIG_R] * 3] * scale)


def _err(T_a, T_b):
    return float(np.linalg.norm(T_a[:3, 3] - T_b[:3, 3]))


def test_pose_algebra_roundtrip():
    rng = np.random.default_rng(0)
    T = make_T(so3_exp(rng.normal(size=3)), rng.normal(size=3))
    d = rng.normal(size=6) * 0.1
    np.testing.assert_allclose(pose_difference(pose_plus(T, d), T), d, atol=1e-12)


def test_fused_error_averages_down_and_outliers_never_apply():
    T, stamps = _loop()
    odom = drifting_odometry(T, OdometryDrift(seed=1))
    rng = np.random.default_rng(2)
    tr = PoseTracker(TrackerConfig())
    raw, fused, outliers_applied = [], [], 0
    for i in range(len(T)):
        outlier = i % 17 == 9  # a confident fix 1 m / 10 deg off, as a repeated-texture false match gives
        z = pose_plus(T[i], np.r_[1.0, 0.0, 0.0, 0.0, 0.0, math.radians(10)]) if outlier else _noisy(T[i], rng)
        d = tr.update(Fix(int(stamps[i]), z, COV), odom[i])
        outliers_applied += outlier and d.applied
        raw.append(_err(z, T[i]))
        pred = tr.predict(int(stamps[i]), odom[i])
        if pred is not None and i > 20:
            fused.append(_err(pred[0], T[i]))
    assert tr.state == TrackState.TRACKING
    assert outliers_applied == 0
    assert tr.stats.rejected >= 11
    assert tr.stats.reinitialisations == 0
    assert np.median(fused) < 0.6 * np.median(raw)
    assert max(fused) < 0.15  # no outlier ever moved the state


def test_initialisation_needs_two_agreeing_fixes():
    T, stamps = _loop(10)
    odom = drifting_odometry(T, OdometryDrift(seed=3))
    tr = PoseTracker()
    wrong = pose_plus(T[0], np.r_[3.0, 0, 0, 0, 0, 0])
    assert tr.update(Fix(int(stamps[0]), wrong, COV), odom[0]).action == "candidate"
    assert tr.predict(int(stamps[0]), odom[0]) is None  # nothing to publish yet
    d = tr.update(Fix(int(stamps[1]), T[1], COV), odom[1])
    assert d.action == "candidate" and tr.state == TrackState.UNINITIALISED  # disagrees with the first
    d = tr.update(Fix(int(stamps[2]), T[2], COV), odom[2])
    assert d.action == "initialised"
    assert _err(tr.predict(int(stamps[2]), odom[2])[0], T[2]) < 0.1
    # one confident fix initialises only when configured to
    tr1 = PoseTracker(TrackerConfig(init_single_confidence=0.9))
    assert tr1.update(Fix(int(stamps[0]), T[0], COV, confidence=0.95), odom[0]).action == "initialised"


def test_kidnapped_robot_reinitialises_from_agreeing_fixes():
    T, stamps = _loop(120)
    odom = drifting_odometry(T, OdometryDrift(seed=4))
    # at frame 60 the robot is carried 4 m away: odometry does not see it
    jump = make_T(so3_exp([0, 0, 0.8]), [4.0, -2.0, 0.0])
    T_true = np.array([T[i] if i < 60 else jump @ T[i] for i in range(len(T))])
    rng = np.random.default_rng(5)
    tr = PoseTracker()
    actions = [tr.update(Fix(int(stamps[i]), _noisy(T_true[i], rng), COV), odom[i]).action for i in range(len(T))]
    assert actions[60] == "rejected" and "reinitialised" in actions[60:64]
    assert tr.stats.reinitialisations == 1
    assert _err(tr.predict(int(stamps[-1]), odom[-1])[0], T_true[-1]) < 0.1


def test_degenerate_and_bad_fixes_are_ignored_unless_allowed():
    T, stamps = _loop(4)
    tr = PoseTracker()
    assert tr.update(Fix(int(stamps[0]), T[0], COV, Status.DEGENERATE), np.eye(4)).action == "ignored"
    nan = T[1].copy()
    nan[0, 3] = np.nan
    assert tr.update(Fix(int(stamps[1]), nan, COV), np.eye(4)).action == "ignored"
    assert tr.update(Fix(int(stamps[1]), T[1], np.zeros((6, 6))), np.eye(4)).action == "ignored"
    assert tr.update(Fix(int(stamps[1]), T[1], COV, confidence=0.1), np.eye(4)).action == "candidate"
    assert tr.stats.ignored == 3
    tr2 = PoseTracker(TrackerConfig(fuse_degenerate=True, min_confidence=0.5))
    assert tr2.update(Fix(int(stamps[0]), T[0], COV, Status.DEGENERATE), np.eye(4)).action == "candidate"
    assert tr2.update(Fix(int(stamps[1]), T[0], COV, confidence=0.2), np.eye(4)).action == "ignored"


def test_without_odometry_the_prior_grows_with_time():
    T, stamps = _loop(60, rate=5.0, speed=0.5)
    rng = np.random.default_rng(6)
    tr = PoseTracker(odometry=False)
    errs = []
    for i in range(len(T)):
        tr.update(Fix(int(stamps[i]), _noisy(T[i], rng), COV), None)
        pred = tr.predict(int(stamps[i]), None)
        if pred is not None:
            errs.append(_err(pred[0], T[i]))
    assert tr.state == TrackState.TRACKING and tr.stats.rejected <= 2
    assert np.median(errs) < 0.1
    s0 = tr.position_std(int(stamps[-1]))
    assert tr.position_std(int(stamps[-1]) + 10 * NS) > 3 * s0  # constant-position prior widens


def test_hint_plus_one_agreeing_fix_initialises_and_time_jump_resets():
    T, stamps = _loop(5)
    tr = PoseTracker()
    rough = np.diag([0.5 ** 2] * 3 + [math.radians(15) ** 2] * 3)
    assert tr.add_hint(int(stamps[0]), pose_plus(T[0], np.r_[0.3, 0, 0, 0, 0, 0.1]), rough).action == "candidate"
    assert tr.update(Fix(int(stamps[0]), T[0], COV), np.eye(4)).action == "initialised"
    assert tr.add_hint(0, T[0], np.zeros((6, 6))).action == "ignored"
    d = tr.update(Fix(int(stamps[0]) - 5 * NS, T[0], COV), np.eye(4))
    assert d.action == "reset" and tr.state == TrackState.UNINITIALISED


def test_lost_after_timeout_then_reinitialises_like_at_start():
    T, stamps = _loop(5)
    tr = PoseTracker(TrackerConfig(lost_timeout_s=2.0))
    for i in range(2):
        tr.update(Fix(int(stamps[i]), T[i], COV), np.eye(4))
    assert tr.state == TrackState.TRACKING
    far = pose_plus(T[2], np.r_[5.0, 0, 0, 0, 0, 0])
    tr.update(Fix(int(stamps[2]) + 3 * NS, far, COV), np.eye(4))
    assert tr.state == TrackState.LOST and tr.T_map_odom is not None  # kept for TF continuity
    assert tr.update(Fix(int(stamps[2]) + 4 * NS, far, COV), np.eye(4)).action == "initialised"


@pytest.mark.parametrize("bad", [{"gate_quantile": 1.0}, {"window": 0}, {"kidnap_fixes": 1},
                                 {"odom_translation_drift": -1.0}, {"min_confidence": 2.0}])
def test_config_validation(bad):
    from reloc_ros.config import from_dict

    with pytest.raises(ValueError, match=next(iter(bad))):
        from_dict(TrackerConfig, bad)


def test_adaptive_scale_learns_optimistic_fix_covariances_and_stays_one_for_honest_ones():
    T, stamps = _loop(150)
    odom = drifting_odometry(T, OdometryDrift(seed=7))
    rng = np.random.default_rng(8)
    honest, optimistic = PoseTracker(), PoseTracker()
    rejected_fixed = PoseTracker(TrackerConfig(adaptive_window=0))
    for i in range(len(T)):
        z = _noisy(T[i], rng, scale=4.0)  # errors 4x the covariance's std (16x in variance)
        optimistic.update(Fix(int(stamps[i]), z, COV), odom[i])
        rejected_fixed.update(Fix(int(stamps[i]), z, COV), odom[i])
        honest.update(Fix(int(stamps[i]), _noisy(T[i], rng), COV), odom[i])
    assert honest.scale < 2.0
    assert 6.0 < optimistic.scale <= 25.0
    # the adapted gate keeps (almost) every fix; without it a good part is rejected
    assert optimistic.stats.rejected < 0.05 * len(T) < rejected_fixed.stats.rejected
    pred = optimistic.predict(int(stamps[-1]), odom[-1])
    assert _err(pred[0], T[-1]) < 0.15


def _odometry_with_bias(T, scale_error, yaw_deg_per_m):
    """Odometry of body path T [N, 4, 4] with a constant scale error and yaw rate per metre."""
    out = [np.eye(4)]
    for a, b in zip(T[:-1], T[1:]):
        inc = np.linalg.inv(a) @ b
        d = float(np.linalg.norm(inc[:3, 3]))
        yaw = math.radians(yaw_deg_per_m) * d
        out.append(out[-1] @ make_T(so3_exp([0, 0, yaw]) @ inc[:3, :3],
                                    (1 + scale_error) * (so3_exp([0, 0, yaw / 2]) @ inc[:3, 3])))
    return np.stack(out)


def test_odometry_bias_is_estimated_and_corrects_map_to_odom_between_fixes():
    # A car-like path: 1.2 m between frames, a fix every 3rd frame used 2 frames late,
    # as a slow localizer does on a vehicle.
    T, stamps = _loop(120, rate=10.0, speed=12.0)
    odom = _odometry_with_bias(T, 0.03, 1.0)
    cov = np.diag([0.01 ** 2] * 3 + [math.radians(0.05) ** 2] * 3)
    errs = {}
    for bias in (True, False):
        rng = np.random.default_rng(4)
        tr = PoseTracker(TrackerConfig(odom_bias=bias))
        e = []
        for i in range(len(T)):
            if i % 3 == 0:
                z = pose_plus(T[i], rng.normal(0, 1, 6) * np.sqrt(np.diag(cov)))
                assert tr.update(Fix(int(stamps[i]), z, cov), odom[i]).action != "rejected"
            if i >= 30 and i % 3 == 2:  # two frames after the last fix
                e.append(_err(tr.T_map_odom_at(int(stamps[i]), odom[i]) @ odom[i], T[i]))
        errs[bias] = float(np.median(e))
        if bias:
            # the scale error is along the direction of travel (body x on this path); the
            # truth is within 3 sigma of the estimate, and the estimate is not the prior's 0
            std = np.sqrt(np.diag(tr._Pb))
            true = np.r_[0.03, 0, 0, 0, 0, math.radians(1.0)]
            assert np.all(np.abs(tr.bias - true) < 3 * std), (tr.bias, std)
            assert tr.bias[0] > 0.015 and math.degrees(tr.bias[5]) > 0.5, tr.bias
        else:
            np.testing.assert_array_equal(tr.bias, 0.0)
            np.testing.assert_allclose(tr.T_map_odom_at(int(stamps[-1]), odom[-1]), tr.T_map_odom)
    assert errs[True] < 0.3 * errs[False], errs
    assert errs[True] < 0.03, errs


def test_odometry_bias_stays_near_zero_for_unbiased_odometry_and_a_standing_robot():
    T, stamps = _loop(150)
    rng = np.random.default_rng(5)
    tr = PoseTracker(TrackerConfig(odom_bias=True))
    for i in range(len(T)):
        tr.update(Fix(int(stamps[i]), _noisy(T[i], rng), COV), T[i])  # exact odometry, noisy fixes
    # consistent with zero given its own covariance (chi-square, 6 dof, 0.999)
    assert tr.bias @ np.linalg.solve(tr._Pb, tr.bias) < 22.5, (tr.bias, np.sqrt(np.diag(tr._Pb)))
    standing = PoseTracker(TrackerConfig(odom_bias=True))
    for i in range(40):
        standing.update(Fix(int(stamps[i]), _noisy(T[0], rng), COV), np.eye(4))
    np.testing.assert_allclose(standing.bias, 0.0, atol=1e-9)  # no travel: nothing to learn from
