"""Evaluation of localization results as the papers report them, and plots.

Per query: camera-centre error (metres) and rotation error (degrees) against the ground
truth ``T_world_cam``; a query that is not localized counts as (inf, 180 deg), so it
fails every recall threshold and pulls the medians up (hloc's convention: medians over
all queries). Recalls are fractions 0..1 of all queries with error strictly below both
thresholds.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, List, Optional, Sequence, Tuple

import numpy as np

from reloc_ros.geometry import is_rigid, pose_errors, so3_log
from reloc_ros.types import InvalidInputError, LocalizationResult, Status

__all__ = [
    "RECALL_THRESHOLDS",
    "QueryRecord",
    "make_record",
    "summarize",
    "recall_key",
    "format_record",
    "format_table",
    "write_json",
    "plot",
]

# (metres, degrees): hloc's 7-Scenes / Cambridge thresholds plus the Aachen ones.
RECALL_THRESHOLDS: Tuple[Tuple[float, float], ...] = (
    (0.01, 1.0), (0.02, 2.0), (0.03, 3.0), (0.05, 5.0), (0.25, 2.0), (0.5, 5.0), (5.0, 10.0),
)

# 99.7 % quantile of chi-square with 3 degrees of freedom ("within 3 sigma" in 3D).
_CHI2_3DOF_997 = 14.16


def recall_key(t_m: float, r_deg: float) -> str:
    """JSON key of a recall threshold, e.g. (0.05, 5) -> 'recall_5cm_5deg', (5, 10) -> 'recall_5m_10deg'."""
    t = f"{t_m * 100:g}cm" if t_m < 1.0 else f"{t_m:g}m"
    return f"recall_{t}_{r_deg:g}deg"


@dataclass
class QueryRecord:
    """One evaluated query.

    T_gt, T_est: [4, 4] camera-to-world (T_est None when not localized).
    translation_error_m: camera-centre distance (inf when not localized).
    rotation_error_deg: geodesic angle (180 when not localized).
    covariance: [6, 6] as in LocalizationResult (m^2, rad^2), or None.
    nees_position / nees_rotation: e^T C^-1 e of the position error (world frame) and
    of the left rotation error log(R_gt R_est^T) under the reported covariance blocks
    (expected ~3 when the covariance is calibrated), NaN without a covariance.
    timings_ms: per-stage wall times (at least 'total').
    """

    name: str
    status: str
    T_gt: np.ndarray
    T_est: Optional[np.ndarray]
    translation_error_m: float
    rotation_error_deg: float
    confidence: float = 0.0
    covariance: Optional[np.ndarray] = None
    nees_position: float = float("nan")
    nees_rotation: float = float("nan")
    timings_ms: dict = field(default_factory=dict)
    keyframe_ids: list = field(default_factory=list)
    inliers: list = field(default_factory=list)
    message: str = ""
    estimator: str = ""

    @property
    def localized(self) -> bool:
        return self.T_est is not None

    def to_json(self) -> dict:
        """Plain-JSON dict (lists for matrices; non-finite numbers become null)."""
        return _jsonable({
            "name": self.name,
            "status": self.status,
            "localized": self.localized,
            "translation_error_m": self.translation_error_m,
            "rotation_error_deg": self.rotation_error_deg,
            "confidence": self.confidence,
            "nees_position": self.nees_position,
            "nees_rotation": self.nees_rotation,
            "T_gt": self.T_gt,
            "T_est": self.T_est,
            "covariance": self.covariance,
            "timings_ms": self.timings_ms,
            "keyframe_ids": self.keyframe_ids,
            "inliers": self.inliers,
            "message": self.message,
            "estimator": self.estimator,
        })


def _nees(err: np.ndarray, cov: np.ndarray) -> float:
    try:
        return float(err @ np.linalg.solve(cov, err))
    except np.linalg.LinAlgError:
        return float("nan")


def make_record(name: str, T_gt: np.ndarray, result: LocalizationResult) -> QueryRecord:
    """Score one LocalizationResult against its ground truth T_gt [4, 4] (camera-to-world).

    Errors come from reloc_ros.geometry.pose_errors: centre distance in metres and
    rotation angle in degrees; an unlocalized result gives (inf, 180).
    Raises InvalidInputError when T_gt is not a finite rigid transform.
    """
    T_gt = np.asarray(T_gt, dtype=np.float64)
    if not is_rigid(T_gt, 1e-3):
        raise InvalidInputError(f"ground truth pose of {name!r} is not a finite rigid transform")
    T_est = None
    if result.localized and np.all(np.isfinite(result.T_world_cam)):
        T_est = np.asarray(result.T_world_cam, dtype=np.float64)
    t_err, r_err = pose_errors(T_est, T_gt)
    cov = None if result.covariance is None else np.asarray(result.covariance, dtype=np.float64)
    nees_p = nees_r = float("nan")
    if T_est is not None and cov is not None and cov.shape == (6, 6) and np.all(np.isfinite(cov)):
        nees_p = _nees(T_gt[:3, 3] - T_est[:3, 3], cov[:3, :3])
        nees_r = _nees(so3_log(T_gt[:3, :3] @ T_est[:3, :3].T), cov[3:, 3:])
    status = result.status.value if isinstance(result.status, Status) else str(result.status)
    return QueryRecord(
        name=name, status=status, T_gt=T_gt, T_est=T_est,
        translation_error_m=t_err, rotation_error_deg=r_err,
        confidence=float(result.confidence), covariance=cov,
        nees_position=nees_p, nees_rotation=nees_r,
        timings_ms={k: float(v) for k, v in (result.timings_ms or {}).items()},
        keyframe_ids=[int(k) for k in result.keyframe_ids],
        inliers=[int(k) for k in result.inliers],
        message=result.message, estimator=result.estimator,
    )


def _pct(values: Sequence[float], q: float) -> float:
    v = np.asarray([x for x in values if np.isfinite(x)], dtype=np.float64)
    return float(np.percentile(v, q)) if len(v) else float("nan")


def summarize(records: Sequence[QueryRecord]) -> dict:
    """Aggregate metrics over all queries.

    Keys: n_queries, n_localized, n_degenerate, n_not_localized, n_error;
    median_translation_m, median_rotation_deg (over all queries, unlocalized = inf/180);
    median_translation_m_localized, median_rotation_deg_localized (localized only);
    recall_<t>_<r>deg for RECALL_THRESHOLDS (fractions 0..1 of all queries), e.g.
    recall_5cm_5deg, recall_25cm_2deg, recall_50cm_5deg, recall_5m_10deg;
    latency_ms_p50 / latency_ms_p90 of the 'total' stage; stage_latency_ms
    {stage: {p50, p90, n}}; mean_confidence; covariance calibration of localized
    queries: nees_position_median / nees_rotation_median (about 2.37 when calibrated,
    the chi-square(3) median) and within_3sigma_position / within_3sigma_rotation
    (fraction with NEES below the 99.7 % quantile).
    """
    n = len(records)
    t = np.array([r.translation_error_m for r in records], dtype=np.float64)
    rdeg = np.array([r.rotation_error_deg for r in records], dtype=np.float64)
    loc = np.array([r.localized for r in records], dtype=bool)
    statuses = [r.status for r in records]
    out: dict = {
        "n_queries": n,
        "n_localized": int(loc.sum()),
        "n_degenerate": statuses.count(Status.DEGENERATE.value),
        "n_not_localized": statuses.count(Status.NOT_LOCALIZED.value),
        "n_error": statuses.count(Status.ERROR.value),
        "median_translation_m": float(np.median(t)) if n else float("nan"),
        "median_rotation_deg": float(np.median(rdeg)) if n else float("nan"),
        "median_translation_m_localized": float(np.median(t[loc])) if loc.any() else float("nan"),
        "median_rotation_deg_localized": float(np.median(rdeg[loc])) if loc.any() else float("nan"),
    }
    for tm, rd in RECALL_THRESHOLDS:
        out[recall_key(tm, rd)] = float(np.mean((t < tm) & (rdeg < rd))) if n else 0.0

    totals = [r.timings_ms.get("total", float("nan")) for r in records]
    out["latency_ms_p50"] = _pct(totals, 50)
    out["latency_ms_p90"] = _pct(totals, 90)
    stages: List[str] = []
    for r in records:
        stages.extend(k for k in r.timings_ms if k not in stages)
    out["stage_latency_ms"] = {
        s: {
            "p50": _pct([r.timings_ms.get(s, float("nan")) for r in records], 50),
            "p90": _pct([r.timings_ms.get(s, float("nan")) for r in records], 90),
            "n": int(sum(1 for r in records if s in r.timings_ms)),
        }
        for s in stages
    }
    out["mean_confidence"] = float(np.mean([r.confidence for r in records])) if n else float("nan")
    nees_p = np.array([r.nees_position for r in records if r.localized and np.isfinite(r.nees_position)])
    nees_r = np.array([r.nees_rotation for r in records if r.localized and np.isfinite(r.nees_rotation)])
    out["nees_position_median"] = float(np.median(nees_p)) if len(nees_p) else float("nan")
    out["nees_rotation_median"] = float(np.median(nees_r)) if len(nees_r) else float("nan")
    out["within_3sigma_position"] = float(np.mean(nees_p < _CHI2_3DOF_997)) if len(nees_p) else float("nan")
    out["within_3sigma_rotation"] = float(np.mean(nees_r < _CHI2_3DOF_997)) if len(nees_r) else float("nan")
    return out


def _fmt_len(m: float) -> str:
    if not np.isfinite(m):
        return "inf"
    return f"{m * 100:.1f} cm" if abs(m) < 1.0 else f"{m:.2f} m"


def format_record(i: int, rec: QueryRecord) -> str:
    """One line per query: index, name, status, errors, confidence, total latency."""
    rot = f"{rec.rotation_error_deg:.2f} deg" if rec.localized else "-"
    tt = rec.timings_ms.get("total", float("nan"))
    line = (f"[{i:4d}] {rec.name:<28s} {rec.status:<13s} t_err {_fmt_len(rec.translation_error_m):>9s}  "
            f"R_err {rot:>10s}  conf {rec.confidence:.2f}  {tt:7.1f} ms")
    if rec.status != Status.OK.value and rec.message:
        line += f"  ({rec.message[:90]})"
    return line


def format_table(summary: dict) -> str:
    """Human-readable table of a summary() dict (medians, recalls, latencies)."""
    s = summary
    lines = [
        f"queries {s['n_queries']}   localized {s['n_localized']}   degenerate {s['n_degenerate']}   "
        f"not localized {s['n_not_localized']}   error {s['n_error']}",
        f"median error (all queries)     {_fmt_len(s['median_translation_m']):>9s}  {s['median_rotation_deg']:.3f} deg",
        f"median error (localized only)  {_fmt_len(s['median_translation_m_localized']):>9s}  "
        f"{s['median_rotation_deg_localized']:.3f} deg",
        "recall  " + "  ".join(
            f"({recall_key(tm, rd)[7:].replace('_', ',')}) {100 * s[recall_key(tm, rd)]:.1f}%"
            for tm, rd in RECALL_THRESHOLDS),
        f"latency total  p50 {s['latency_ms_p50']:.1f} ms   p90 {s['latency_ms_p90']:.1f} ms",
    ]
    for stage, v in s.get("stage_latency_ms", {}).items():
        if stage != "total":
            lines.append(f"  {stage:<28s} p50 {v['p50']:8.1f} ms   p90 {v['p90']:8.1f} ms")
    lines.append(
        f"confidence mean {s['mean_confidence']:.2f}   covariance NEES median position "
        f"{s['nees_position_median']:.2f} rotation {s['nees_rotation_median']:.2f} (calibrated ~2.37)")
    return "\n".join(lines)


def _jsonable(obj):
    """Numpy -> python; non-finite floats -> None (strict JSON has no inf/NaN)."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if isinstance(obj, (np.bool_, bool)):
        return bool(obj)
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        v = float(obj)
        return v if math.isfinite(v) else None
    if isinstance(obj, Status):
        return obj.value
    return obj


def write_json(path: str | Path, summary: dict, records: Iterable[QueryRecord], meta: Optional[dict] = None) -> Path:
    """Write {'summary', 'queries', 'meta'} as strict JSON (inf/NaN written as null:
    a null median or error means infinite, i.e. not localized)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {"summary": _jsonable(summary), "queries": [r.to_json() for r in records], "meta": _jsonable(meta or {})}
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1, allow_nan=False))
    tmp.replace(path)
    return path


def _top_axes(poses: np.ndarray) -> Tuple[int, int]:
    """The two world axes of a top view, from [N, 4, 4] camera-to-world poses.

    Cameras are mostly held upright, so the mean camera y axis (OpenCV: down) points
    along the world's vertical; the world axis closest to it is dropped. When the
    cameras disagree on "down" (mean shorter than 0.5), the two axes of largest extent.
    """
    if len(poses) == 0:
        return 0, 1
    down = poses[:, :3, 1].mean(axis=0)
    if np.linalg.norm(down) > 0.5:
        keep = [k for k in range(3) if k != int(np.argmax(np.abs(down)))]
        return keep[0], keep[1]
    ext = np.ptp(poses[:, :3, 3], axis=0)
    a, b = sorted(np.argsort(-ext)[:2])
    return int(a), int(b)


def plot(path: str | Path, records: Sequence[QueryRecord], T_world_kf: Optional[np.ndarray] = None,
         title: str = "") -> Path:
    """Write a PNG: top view and error CDFs.

    Left: map keyframe centres (grey, with their viewing directions), ground truth
    (green), estimates (blue OK / orange DEGENERATE) joined to their ground truth by
    red lines, unlocalized ground truths as black crosses; the view drops the world axis
    closest to the cameras' mean "down" direction (metres). Right: cumulative fraction of all queries below a
    translation error (m, log scale) and a rotation error (deg, log scale); unlocalized
    queries never enter, so the curves end at the localized fraction.
    T_world_kf: [N, 4, 4] keyframe camera-to-world poses or None.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import NullFormatter

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig = Figure(figsize=(15, 5.2), dpi=100)
    FigureCanvasAgg(fig)
    gs = fig.add_gridspec(1, 3, width_ratios=[1.5, 1, 1])
    ax = fig.add_subplot(gs[0])
    gt = np.array([r.T_gt[:3, 3] for r in records]).reshape(-1, 3)
    kf = np.zeros((0, 3)) if T_world_kf is None else np.asarray(T_world_kf)[:, :3, 3].reshape(-1, 3)
    all_poses = [r.T_gt for r in records] + ([] if T_world_kf is None else list(np.asarray(T_world_kf)))
    i, j = _top_axes(np.asarray(all_poses).reshape(-1, 4, 4))
    names = "xyz"
    if len(kf):
        ax.scatter(kf[:, i], kf[:, j], s=10, c="0.6", label=f"map keyframes ({len(kf)})", zorder=1)
        span = float(np.max(np.ptp(np.vstack([kf, gt]), axis=0))) or 1.0
        z = np.asarray(T_world_kf)[:, :3, 2]
        ax.quiver(kf[:, i], kf[:, j], z[:, i], z[:, j], color="0.75", angles="xy", scale_units="xy",
                  scale=1.0 / (0.04 * span), width=0.002, zorder=1)
    ax.scatter(gt[:, i], gt[:, j], s=14, c="tab:green", label="ground truth", zorder=2)
    for status, color in ((Status.OK.value, "tab:blue"), (Status.DEGENERATE.value, "tab:orange")):
        sel = [r for r in records if r.localized and r.status == status]
        if not sel:
            continue
        est = np.array([r.T_est[:3, 3] for r in sel])
        g = np.array([r.T_gt[:3, 3] for r in sel])
        for a, b in zip(est, g):
            ax.plot([a[i], b[i]], [a[j], b[j]], "-", c="tab:red", lw=0.8, zorder=3)
        ax.scatter(est[:, i], est[:, j], s=14, c=color, label=f"estimate {status} ({len(sel)})", zorder=4)
    miss = np.array([r.T_gt[:3, 3] for r in records if not r.localized]).reshape(-1, 3)
    if len(miss):
        ax.scatter(miss[:, i], miss[:, j], s=30, c="k", marker="x", label=f"not localized ({len(miss)})", zorder=5)
    ax.set_xlabel(f"world {names[i]} [m]")
    ax.set_ylabel(f"world {names[j]} [m]")
    ax.set_aspect("equal", adjustable="datalim")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    ax.set_title("top view")

    n = max(len(records), 1)
    for k, (key, unit, marks) in enumerate((("translation_error_m", "m", (0.02, 0.05, 0.25)),
                                            ("rotation_error_deg", "deg", (1.0, 2.0, 5.0)))):
        axc = fig.add_subplot(gs[k + 1])
        err = np.sort([getattr(r, key) for r in records if r.localized])
        if len(err):
            lo = max(float(err[err > 0].min()) if np.any(err > 0) else 1e-6, 1e-6)
            x = np.maximum(err, lo)
            axc.step(np.concatenate([[lo], x]), np.arange(len(x) + 1) / n, where="post", c="tab:blue")
            axc.set_xscale("log")
            axc.xaxis.set_minor_formatter(NullFormatter())  # minor labels overlap on short ranges
        for mk in marks:
            axc.axvline(mk, c="0.7", ls="--", lw=0.8)
        axc.set_ylim(0, 1.02)
        axc.set_xlabel(f"{key.split('_')[0]} error [{unit}]")
        axc.set_ylabel("fraction of queries")
        axc.grid(alpha=0.3, which="both")
        axc.set_title(f"{key.split('_')[0]} error CDF")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, format="png")
    return path
