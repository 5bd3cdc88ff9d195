"""reloc_ros.sequence: drifting odometry, the newest-frame replay policy and the pose-stream metrics.

Exact synthetic inputs: every expected number below is worked out by hand.
"""
import math

import numpy as np
import pytest

from reloc_ros.geometry import invert, make_T, so3_exp
from reloc_ros.sequence import (OdometryDrift, RawFix, body_errors, drifting_odometry, error_stats,
                                newest_frame_schedule, odometry_only, pose_nees, sequence_metrics, tf_jumps)

MS = 1_000_000


def _line(n, step=0.1):
    """[n, 4, 4] body poses moving along map x by ``step`` m per frame, no rotation."""
    return np.stack([make_T(np.eye(3), [step * i, 0.0, 0.0]) for i in range(n)])


def _tx(x, y=0.0, z=0.0, yaw=0.0):
    return make_T(so3_exp([0.0, 0.0, yaw]), [x, y, z])


def test_drifting_odometry_without_drift_is_the_true_relative_motion_and_is_seeded():
    T = np.stack([_tx(i * 0.3, 0.1 * i * i, 0.0, 0.2 * i) for i in range(6)])
    odom = drifting_odometry(T, OdometryDrift(translation=0.0, yaw_deg_per_m=0.0, seed=1))
    for i in range(6):
        np.testing.assert_allclose(odom[i], invert(T[0]) @ T[i], atol=1e-12)
    a = drifting_odometry(T, OdometryDrift(seed=4))
    np.testing.assert_array_equal(a, drifting_odometry(T, OdometryDrift(seed=4)))
    assert not np.allclose(a, drifting_odometry(T, OdometryDrift(seed=5)))


def test_newest_frame_schedule_drops_frames_that_arrive_while_busy():
    stamps = [0, 33 * MS, 66 * MS, 100 * MS, 133 * MS]
    calls = []

    def localize(i, start):
        calls.append((i, start))
        return 50 * MS

    ev = newest_frame_schedule(stamps, localize)
    # 0 runs 0..50; 1 (arrived 33) is the newest at 50 and runs 50..100; 2 (66) is replaced by
    # 3 (arrived exactly at 100) which runs 100..150; 4 (133) waits and runs 150..200.
    assert [(e.index, e.action, e.start_ns, e.done_ns) for e in ev] == [
        (0, "localized", 0, 50 * MS), (1, "localized", 50 * MS, 100 * MS), (2, "dropped", -1, -1),
        (3, "localized", 100 * MS, 150 * MS), (4, "localized", 150 * MS, 200 * MS)]
    assert calls == [(0, 0), (1, 50 * MS), (3, 100 * MS), (4, 150 * MS)]


def test_newest_frame_schedule_throttles_in_stamp_time():
    stamps = [k * 25 * MS for k in range(9)]  # 40 Hz, localized at most 10 Hz, instantly
    ev = newest_frame_schedule(stamps, lambda i, s: 0, max_rate=10.0)
    assert [e.action for e in ev] == ["localized", "skipped", "skipped", "skipped", "localized",
                                      "skipped", "skipped", "skipped", "localized"]
    with pytest.raises(ValueError):
        newest_frame_schedule([2, 1], lambda i, s: 0)


def test_body_errors_stats_jumps_and_odometry_only():
    gt = _line(4)
    est = gt.copy()
    est[1] = _tx(0.1 + 0.03, 0.04)  # 5 cm off
    est[2] = gt[2] @ make_T(so3_exp([0.0, 0.0, math.radians(2.0)]), [0, 0, 0])
    est[3] = np.nan
    t, r = body_errors(est, gt)
    np.testing.assert_allclose(t[:3], [0.0, 0.05, 0.0], atol=1e-12)
    np.testing.assert_allclose(r[:3], [0.0, 0.0, 2.0], atol=1e-9)
    assert np.isnan(t[3]) and np.isnan(r[3])
    s = error_stats([1.0, 3.0, np.nan, 2.0], scale=100.0)
    assert s["n"] == 3 and s["median"] == 200.0 and s["max"] == 300.0 and s["p95"] == pytest.approx(290.0)

    # A correction that rotates 90 deg about the odom origin, 2 m from the body: the body moves
    # by 2 * sqrt(2) m, while map->odom's own translation does not change at all.
    odom = np.stack([_tx(2.0), _tx(2.0), _tx(2.0)])
    M = np.stack([np.full((4, 4), np.nan), np.eye(4), _tx(0.0, yaw=math.pi / 2)])
    jt, jr = tf_jumps(M, odom)
    assert np.isnan(jt[0]) and np.isnan(jt[1])
    assert jt[2] == pytest.approx(2 * math.sqrt(2)) and jr[2] == pytest.approx(90.0)

    # odometry 10 % short: one perfect correction at frame 1, then odometry alone
    odom = np.stack([_tx(0.09 * i) for i in range(4)])
    oo = odometry_only(gt, odom, 1)
    assert np.all(np.isnan(oo[0]))
    ot, _ = body_errors(oo, gt)
    np.testing.assert_allclose(ot[1:], [0.0, 0.01, 0.02], atol=1e-12)


def test_pose_nees_in_the_tracker_convention():
    T_est = _tx(1.0, 2.0, yaw=0.3)
    C = np.diag([0.01, 0.04, 0.09, 1e-4, 1e-4, 4e-4])
    T_gt = make_T(so3_exp([0.0, 0.0, 0.02]) @ T_est[:3, :3], T_est[:3, 3] + [0.1, 0.2, 0.0])
    p, r = pose_nees(T_est, C, T_gt)
    assert p == pytest.approx(0.1 ** 2 / 0.01 + 0.2 ** 2 / 0.04)  # 1 + 1
    assert r == pytest.approx(0.02 ** 2 / 4e-4)  # 1
    assert all(math.isnan(v) for v in pose_nees(np.full((4, 4), np.nan), C, T_gt))


def test_sequence_metrics_on_a_hand_built_stream():
    n = 10
    stamps = [k * 100 * MS for k in range(n)]
    gt = _line(n)
    odom = np.stack([_tx(0.09 * i) for i in range(n)])  # odometry 10 % short, odom frame = map at frame 0
    true_M = np.stack([gt[i] @ invert(odom[i]) for i in range(n)])
    M = true_M.copy()
    M[:2] = np.nan  # no TF before the first fix
    M[2:6] = true_M[2]  # correction from frame 2 held: error grows by 1 cm a frame
    M[6:] = true_M[6] @ _tx(0.3)  # then a correction 30 cm off (a jump), held
    foreign = np.zeros(n, bool)
    foreign[3:5] = True
    fixes = [RawFix(2, gt[2] @ _tx(0.04), status="ok", action="initialised"),
             RawFix(3, _tx(5.0), status="ok", foreign=True, action="rejected"),
             RawFix(6, gt[6] @ _tx(0.02), status="ok", action="accepted", T_fused=gt[6]),
             RawFix(8, gt[8] @ _tx(0.0, 0.06), status="degenerate", action="ignored")]
    m = sequence_metrics(stamps, gt, odom, M, fixes, foreign)
    assert m["first_tf_frame"] == 2 and m["time_to_first_tf_s"] == pytest.approx(0.2)
    assert m["frames_without_tf_after_first"] == 0
    # TF errors from frame 2: 0, 1, 2, 3 cm (odometry falls short 1 cm a frame), then the correction
    # 30 cm ahead, the shortfall eating into it again
    tf_t = np.array(m["per_frame"]["tf_t_m"])
    np.testing.assert_allclose(tf_t[2:6], [0.0, 0.01, 0.02, 0.03], atol=1e-12)
    np.testing.assert_allclose(tf_t[6:], [0.3, 0.29, 0.28, 0.27], atol=1e-12)
    assert m["tf"]["t_m"]["n"] == 8 and m["tf"]["t_m"]["max"] == pytest.approx(0.30)
    assert m["frames_over"]["count"] == 4 and m["frames_over"]["fraction"] == pytest.approx(0.5)
    # the jump at frame 6: the old correction puts the body 4 cm short, the new one 30 cm long
    assert m["jumps"]["max_m"] == pytest.approx(0.34) and m["jumps"]["count_over"] == 1
    # raw fixes of non-foreign frames: 4, 2, 6 cm; the TF at their frames 0, 30, 28 cm
    assert m["raw"]["t_m"]["median"] == pytest.approx(0.04) and m["raw"]["t_m"]["n"] == 3
    assert m["raw_ok"]["t_m"]["n"] == 2 and m["raw_ok"]["t_m"]["median"] == pytest.approx(0.03)
    assert m["fused_at_fix"]["t_m"]["median"] == pytest.approx(0.28)
    assert m["fused_after_fix"]["t_m"]["n"] == 1 and m["fused_after_fix"]["t_m"]["max"] == pytest.approx(0.0)
    assert m["ratio_fused_to_raw_median"] == pytest.approx(0.15 / 0.04)  # median of 0..3, 27..30 cm
    f = m["fixes"]
    assert (f["raw"], f["accepted"], f["rejected"], f["ignored"]) == (4, 2, 1, 1)
    assert f["foreign"] == 1 and f["foreign_accepted"] == 0 and f["degenerate"] == 1
    # odometry alone from the true correction at frame 2: 1 cm a frame
    assert m["odometry_only"]["final_t_m"] == pytest.approx(0.07)
    fb = m["foreign_block"]
    assert (fb["start"], fb["stop"], fb["frames"]) == (3, 5, 2)
    # over frames 3..5: TF error 1 -> 3 cm (growth 2 cm), odometry from the truth at 3: 0 -> 2 cm
    assert fb["tf_growth_max_m"] == pytest.approx(0.02) and fb["odometry_drift_max_m"] == pytest.approx(0.02)
    assert fb["growth_within_drift"] and fb["distance_m"] == pytest.approx(0.2)
    assert fb["rotation_lever_m"] == 0.0 and fb["growth_within_bound"]


def test_sequence_metrics_nees_uses_the_fused_covariance():
    n = 3
    gt = _line(n)
    odom = np.stack([_tx(0.1 * i) for i in range(n)])
    M = np.stack([_tx(0.02), _tx(0.0, 0.04), np.full((4, 4), np.nan)])
    cov = np.stack([np.diag([1e-4, 1e-4, 1e-4, 1e-6, 1e-6, 1e-6])] * n)
    m = sequence_metrics([0, 1, 2], gt, odom, M, [], None, fused_cov=cov)
    assert m["nees"]["n"] == 2
    np.testing.assert_allclose(m["per_frame"]["nees_position"][:2], [4.0, 16.0])
    assert m["nees"]["position_median"] == pytest.approx(10.0) and m["nees"]["position_within_95"] == 0.5
    assert m["frames_without_tf_after_first"] == 1 and "foreign_block" not in m


def test_estimate_metrics_and_the_rotation_lever_of_a_held_correction():
    from reloc_ros.sequence import estimate_metrics

    gt = _line(2)
    est = np.stack([_tx(0.02), _tx(0.1, 0.04)])
    cov = np.stack([np.diag([1e-4] * 3 + [1e-6] * 3)] * 2)
    m = estimate_metrics(est, cov, gt)
    assert m["t_m"]["median"] == pytest.approx(0.03) and m["nees"]["position_median"] == pytest.approx(10.0)
    assert m["nees"]["rotation_median"] == 0.0 and estimate_metrics(est[:0], cov[:0], gt[:0])["t_m"]["n"] == 0

    # A correction 1 deg off in yaw, held over a foreign block (frames 1..4, then frame 5) while the
    # body drives 0.4 m from frame 1: with perfect odometry the TF error grows, bounded by 0.4 m x 1 deg.
    n = 6
    gt = _line(n)
    odom = gt.copy()  # perfect odometry, odom = map
    M = np.stack([_tx(0.0, yaw=math.radians(1.0))] * n)
    foreign = np.zeros(n, bool)
    foreign[1:5] = True
    fb = sequence_metrics(np.arange(n), gt, odom, M, [], foreign)["foreign_block"]
    assert fb["odometry_drift_max_m"] == pytest.approx(0.0, abs=1e-12)
    assert fb["tf_growth_max_m"] > 0 and not fb["growth_within_drift"]
    assert fb["rotation_lever_m"] == pytest.approx(0.4 * math.radians(1.0), rel=1e-3)
    assert fb["tf_growth_max_m"] <= fb["tf_growth_bound_m"] + 1e-12 and fb["growth_within_bound"]
