"""Evaluation metrics (hloc conventions), JSON output and plots, on hand-computed cases."""
import json

import cv2
import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from reloc_ros.evaluation import (
    RECALL_THRESHOLDS,
    format_record,
    format_table,
    make_record,
    plot,
    recall_key,
    summarize,
    write_json,
)
from reloc_ros.types import InvalidInputError, LocalizationResult, Status


def _pose(t, rotvec_deg=(0.0, 0.0, 0.0)):
    T = np.eye(4)
    T[:3, :3] = Rotation.from_rotvec(np.radians(rotvec_deg)).as_matrix()
    T[:3, 3] = t
    return T


def _result(T_gt, dt_m, dr_deg, status=Status.OK, total_ms=50.0, cov_sigma=(0.01, 0.01)):
    """A result whose centre is dt_m off along x and whose rotation is dr_deg off about z."""
    T = T_gt.copy()
    T[:3, 3] += [dt_m, 0.0, 0.0]
    T[:3, :3] = Rotation.from_rotvec(np.radians([0, 0, dr_deg])).as_matrix() @ T[:3, :3]
    cov = np.diag([cov_sigma[0] ** 2] * 3 + [cov_sigma[1] ** 2] * 3)
    return LocalizationResult(status, T, cov, 0.8, "", [1, 2], [100, 80],
                              {"features": 10.0, "retrieval": 2.0, "total": total_ms}, "geometric")


def _records():
    gt = [_pose([i, 0.5 * i, 0.0], (0, 10 * i, 0)) for i in range(5)]
    results = [
        _result(gt[0], 0.004, 0.5, total_ms=40.0),                        # within 1 cm / 1 deg
        _result(gt[1], 0.04, 4.0, total_ms=60.0),                         # within 5 cm / 5 deg only
        _result(gt[2], 0.30, 1.0, Status.DEGENERATE, total_ms=80.0),      # within 50 cm / 5 deg
        _result(gt[3], 3.0, 9.0, total_ms=100.0),                         # within 5 m / 10 deg
        LocalizationResult(Status.NOT_LOCALIZED, message="no matches", timings_ms={"total": 20.0}),
    ]
    return [make_record(f"q{i}", g, r) for i, (g, r) in enumerate(zip(gt, results))]


def test_per_query_errors_and_unlocalized_convention():
    recs = _records()
    assert recs[0].translation_error_m == pytest.approx(0.004)
    assert recs[1].rotation_error_deg == pytest.approx(4.0)
    assert recs[4].translation_error_m == float("inf") and recs[4].rotation_error_deg == 180.0
    assert not recs[4].localized and recs[4].status == "not_localized"
    # NEES of a 4 cm error under a 1 cm isotropic sigma is 16.
    assert recs[1].nees_position == pytest.approx(16.0)
    assert recs[1].nees_rotation == pytest.approx((np.radians(4.0) / 0.01) ** 2, rel=1e-6)
    assert np.isnan(recs[4].nees_position)
    with pytest.raises(InvalidInputError):
        make_record("bad", np.full((4, 4), np.nan), LocalizationResult(Status.NOT_LOCALIZED))


def test_summary_recalls_medians_and_latencies():
    s = summarize(_records())
    assert s["n_queries"] == 5 and s["n_localized"] == 4
    assert s["n_degenerate"] == 1 and s["n_not_localized"] == 1 and s["n_error"] == 0
    # Medians over all 5 queries, the unlocalized one counting as inf / 180.
    assert s["median_translation_m"] == pytest.approx(0.30)
    assert s["median_rotation_deg"] == pytest.approx(4.0)
    assert s["median_translation_m_localized"] == pytest.approx((0.04 + 0.30) / 2)
    assert s["recall_1cm_1deg"] == pytest.approx(0.2)
    assert s["recall_5cm_5deg"] == pytest.approx(0.4)
    assert s["recall_25cm_2deg"] == pytest.approx(0.2)
    assert s["recall_50cm_5deg"] == pytest.approx(0.6)
    assert s["recall_5m_10deg"] == pytest.approx(0.8)
    assert {recall_key(t, r) for t, r in RECALL_THRESHOLDS} <= set(s)
    assert s["latency_ms_p50"] == pytest.approx(60.0)
    assert s["latency_ms_p90"] == pytest.approx(np.percentile([20, 40, 60, 80, 100], 90))
    assert s["stage_latency_ms"]["features"] == {"p50": 10.0, "p90": 10.0, "n": 4}
    table = format_table(s)
    assert "recall" in table and "features" in table and "p50" in table
    assert "not_localized" in format_record(4, _records()[4])


def test_median_is_infinite_when_most_queries_fail():
    gt = _pose([0, 0, 0])
    recs = [make_record("a", gt, _result(gt, 0.01, 0.1))] + [
        make_record(f"f{i}", gt, LocalizationResult(Status.ERROR, message="corrupt image")) for i in range(2)]
    s = summarize(recs)
    assert s["median_translation_m"] == float("inf") and s["median_rotation_deg"] == 180.0
    assert s["n_error"] == 2 and s["recall_5cm_5deg"] == pytest.approx(1 / 3)


def test_json_is_strict_and_complete(tmp_path):
    recs = _records()
    out = write_json(tmp_path / "sub" / "eval.json", summarize(recs), recs, {"map": "m"})
    doc = json.loads(out.read_text(), parse_constant=lambda c: pytest.fail(f"non-strict JSON constant {c}"))
    assert doc["summary"]["n_queries"] == 5 and doc["meta"]["map"] == "m"
    q = doc["queries"]
    assert len(q) == 5 and q[4]["translation_error_m"] is None and q[4]["T_est"] is None
    assert np.allclose(np.array(q[0]["T_gt"]), recs[0].T_gt)
    assert np.array(q[0]["covariance"]).shape == (6, 6)


def test_plot_writes_a_png(tmp_path):
    recs = _records()
    kf = np.stack([_pose([i + 0.5, 0.5 * i, 0.2], (0, 5 * i, 0)) for i in range(6)])
    out = plot(tmp_path / "eval.png", recs, kf, title="unit test")
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    assert img is not None and img.shape[0] > 300 and img.shape[1] > 800
    assert img.std() > 10  # something was drawn
    # No keyframes and nothing localized still plots.
    only_fail = [r for r in recs if not r.localized]
    assert plot(tmp_path / "empty.png", only_fail).read_bytes()[:4] == b"\x89PNG"
