"""Posed sequences as a robot sees them: drifting odometry, and the pose stream's errors over time.

Used by ``bench/bench_sequence.py`` (core-only and node replays) and the tracker tests.
No ROS here. Poses are [4, 4] float64 ``T_a_b``, metres; stamps integer nanoseconds.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from reloc_ros.geometry import invert, make_T, rotation_angle_deg, so3_exp, so3_log


@dataclass
class OdometryDrift:
    """A seeded odometry error model: biases that wander as random walks.

    translation: relative translation error (0.02 = 2 % of the distance travelled), as a
        bias in the body's x-y plane drawn once per run that then wanders.
    yaw_deg_per_m: yaw error per metre travelled about the body z axis (a bias of this
        size and random sign that wanders).
    wander: relative random-walk step of both biases per sqrt(metre) (0.05: a bias
        changes by about 5 % after 1 m and 40 % after 60 m, so the drift stays near the
        nominal ``translation`` / ``yaw_deg_per_m`` over a sequence instead of growing
        several-fold; a larger value is a worse odometry than the nominal one).
    """

    translation: float = 0.02
    yaw_deg_per_m: float = 1.0
    wander: float = 0.05
    seed: int = 0


def drifting_odometry(T_map_base: np.ndarray, drift: Optional[OdometryDrift] = None) -> np.ndarray:
    """Odometry of a true body path, corrupted by ``drift``.

    T_map_base: [N, 4, 4] true body poses in the map. Returns T_odom_base [N, 4, 4]: the
    odom frame starts at the first pose (``T_odom_base[0] = I``) and each true body-frame
    increment is corrupted by the current biases, so the error grows with distance.
    """
    d = drift or OdometryDrift()
    rng = np.random.default_rng(d.seed)
    T = np.asarray(T_map_base, dtype=np.float64)
    out = np.empty_like(T)
    out[0] = np.eye(4)
    ang = rng.uniform(0, 2 * np.pi)
    t_bias = d.translation * np.array([np.cos(ang), np.sin(ang), 0.0])
    yaw_bias = np.radians(d.yaw_deg_per_m) * rng.choice([-1.0, 1.0])
    for i in range(1, len(T)):
        inc = invert(T[i - 1]) @ T[i]  # true motion in the previous body frame
        dist = float(np.linalg.norm(inc[:3, 3]))
        t_err = t_bias * dist
        yaw_err = yaw_bias * dist
        # An odometry integrated at a high rate turns each step's translation by half the
        # step's heading error (the chord of a constant-rate turn), not by none of it.
        noisy = make_T(so3_exp([0.0, 0.0, yaw_err]) @ inc[:3, :3], so3_exp([0.0, 0.0, 0.5 * yaw_err]) @ inc[:3, 3] + t_err)
        out[i] = out[i - 1] @ noisy
        if dist > 0:
            step = d.wander * np.sqrt(dist)
            t_bias = t_bias + rng.normal(0, d.translation * step, 3) * np.array([1.0, 1.0, 0.0])
            yaw_bias = yaw_bias + rng.normal(0, np.radians(d.yaw_deg_per_m) * step)
    return out


# ---------------------------------------------------------------------------- replay policy


@dataclass
class FrameEvent:
    """What a newest-frame worker did with one frame of a replayed stream.

    action: 'localized', 'dropped' (replaced by a newer frame before the worker was free)
    or 'skipped' (throttled by ``max_rate``). start_ns / done_ns: sensor-clock times the
    localization started and finished (-1 unless localized; for 'skipped' both are the
    time the worker looked at the frame).
    """

    index: int
    action: str
    start_ns: int = -1
    done_ns: int = -1


def newest_frame_schedule(stamps_ns: Sequence[int], localize: Callable[[int, int], int],
                          max_rate: float = 0.0) -> List[FrameEvent]:
    """Emulate the node's worker on a stream whose frames arrive at their stamps.

    One worker localizes the newest frame that has arrived; frames that arrive while it is
    busy are replaced by newer ones (only the newest waiting frame is taken when it frees,
    the others are 'dropped'). With ``max_rate`` > 0 a frame whose stamp is less than
    1/max_rate after the last localized frame's stamp is 'skipped' (the node's throttle in
    image-stamp time). ``localize(index, start_ns)`` is called in time order for each frame
    taken and returns how long it took (ns). Returns one event per frame, in index order.
    """
    st = [int(s) for s in stamps_ns]
    if any(b < a for a, b in zip(st, st[1:])):
        raise ValueError("stamps must be non-decreasing")
    period = int(round(1e9 / max_rate)) if max_rate > 0 else 0
    events: List[FrameEvent] = []
    free: Optional[int] = None
    last: Optional[int] = None
    i = 0
    while i < len(st):
        if free is None or st[i] >= free:
            j, start = i, st[i]
        else:
            j = i
            while j + 1 < len(st) and st[j + 1] <= free:
                j += 1
            events.extend(FrameEvent(k, "dropped") for k in range(i, j))
            start = free
        if period and last is not None and st[j] - last < period:
            events.append(FrameEvent(j, "skipped", start, start))
            free, i = start, j + 1
            continue
        dur = int(localize(j, start))
        if dur < 0:
            raise ValueError(f"localize({j}) returned a negative duration {dur}")
        events.append(FrameEvent(j, "localized", start, start + dur))
        free, last, i = start + dur, st[j], j + 1
    return events


# ---------------------------------------------------------------------------- metrics


def body_errors(T_est: np.ndarray, T_gt: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Per-frame (position error m [N], rotation error deg [N]) of [N, 4, 4] poses; NaN where T_est is not finite."""
    T_est = np.asarray(T_est, dtype=np.float64)
    T_gt = np.asarray(T_gt, dtype=np.float64)
    n = len(T_gt)
    t = np.full(n, np.nan)
    r = np.full(n, np.nan)
    for i in range(n):
        if np.all(np.isfinite(T_est[i])):
            t[i] = float(np.linalg.norm(T_est[i, :3, 3] - T_gt[i, :3, 3]))
            r[i] = rotation_angle_deg(T_est[i, :3, :3], T_gt[i, :3, :3])
    return t, r


def error_stats(values: Sequence[float], scale: float = 1.0) -> Dict[str, float]:
    """{'n', 'median', 'p95', 'max'} of the finite values times ``scale`` (NaN statistics when none)."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)] * scale
    if not len(v):
        return {"n": 0, "median": float("nan"), "p95": float("nan"), "max": float("nan")}
    return {"n": int(len(v)), "median": float(np.median(v)), "p95": float(np.percentile(v, 95)),
            "max": float(v.max())}


def tf_jumps(T_map_odom: np.ndarray, T_odom_base: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """How far each frame-to-frame change of the map->odom correction moves the body.

    T_map_odom: [N, 4, 4] correction in use at each frame (NaN rows: none). T_odom_base:
    [N, 4, 4] odometry. Element i is the displacement (m, deg) of the body pose at frame i
    between the old correction (frame i-1) and the new one (frame i):
    ``T_map_odom[i-1] @ T_odom_base[i]`` vs ``T_map_odom[i] @ T_odom_base[i]``. This is the
    jump a TF consumer sees; the change of map->odom's own translation would also count a
    rotation about the far-away odom origin. NaN for i = 0 and where either is missing.
    """
    M = np.asarray(T_map_odom, dtype=np.float64)
    O = np.asarray(T_odom_base, dtype=np.float64)
    n = len(M)
    t = np.full(n, np.nan)
    r = np.full(n, np.nan)
    for i in range(1, n):
        if np.all(np.isfinite(M[i - 1])) and np.all(np.isfinite(M[i])):
            a, b = M[i - 1] @ O[i], M[i] @ O[i]
            t[i] = float(np.linalg.norm(a[:3, 3] - b[:3, 3]))
            r[i] = rotation_angle_deg(a[:3, :3], b[:3, :3])
    return t, r


def odometry_only(T_map_base: np.ndarray, T_odom_base: np.ndarray, start: int) -> np.ndarray:
    """[N, 4, 4] body poses from the true map->odom at frame ``start`` and odometry alone.

    ``T_map_base[start] @ inv(T_odom_base[start]) @ T_odom_base[i]`` for i >= start, NaN
    before: what a robot would believe with one perfect fix at ``start`` and no more.
    """
    T = np.asarray(T_map_base, dtype=np.float64)
    O = np.asarray(T_odom_base, dtype=np.float64)
    out = np.full_like(T, np.nan)
    M = T[start] @ invert(O[start])
    for i in range(start, len(T)):
        out[i] = M @ O[i]
    return out


def pose_nees(T_est: np.ndarray, covariance: np.ndarray, T_gt: np.ndarray) -> Tuple[float, float]:
    """(position NEES, rotation NEES) of one body pose estimate under its [6, 6] covariance.

    The error is ``T_gt = T_est (+) delta`` in the tracker's convention (position
    difference in the map frame, rotation as a left perturbation), so a calibrated
    covariance gives chi-square(3) values (median 2.37). NaN when not computable.
    """
    T_est = np.asarray(T_est, dtype=np.float64)
    T_gt = np.asarray(T_gt, dtype=np.float64)
    C = np.asarray(covariance, dtype=np.float64)
    if not (np.all(np.isfinite(T_est)) and np.all(np.isfinite(C)) and C.shape == (6, 6)):
        return float("nan"), float("nan")
    dp = T_gt[:3, 3] - T_est[:3, 3]
    dr = so3_log(T_gt[:3, :3] @ T_est[:3, :3].T)
    out = []
    for e, S in ((dp, C[:3, :3]), (dr, C[3:, 3:])):
        try:
            out.append(float(e @ np.linalg.solve(S, e)))
        except np.linalg.LinAlgError:
            out.append(float("nan"))
    return out[0], out[1]


@dataclass
class RawFix:
    """One per-frame localization result of a replay, in the body frame.

    index: frame. status: 'ok' / 'degenerate'. foreign: the frame showed another place.
    action: the tracker's decision ('accepted', 'rejected', 'ignored', 'candidate',
    'initialised', 'reinitialised'; '' when unknown). T_fused / cov_fused: the fused body
    pose at this frame's stamp right after the fix (what ``~/pose`` publishes), if any.
    """

    index: int
    T_map_base: np.ndarray
    covariance: Optional[np.ndarray] = None
    status: str = "ok"
    foreign: bool = False
    action: str = ""
    done_ns: int = -1
    T_fused: Optional[np.ndarray] = None
    cov_fused: Optional[np.ndarray] = None


APPLIED = ("accepted", "initialised", "reinitialised")
CHI2_3DOF_95 = 7.815


def sequence_metrics(stamps_ns: Sequence[int], T_map_base: np.ndarray, T_odom_base: np.ndarray,
                     T_map_odom: np.ndarray, fixes: Sequence[RawFix], foreign: Optional[Sequence[bool]] = None,
                     fused_cov: Optional[np.ndarray] = None, max_error_m: float = 0.25,
                     max_error_deg: float = 5.0, jump_m: float = 0.10) -> Dict[str, object]:
    """Errors of a replayed pose stream over time against ground truth.

    stamps_ns [N]; T_map_base [N, 4, 4] true body poses; T_odom_base [N, 4, 4] the
    odometry the localizer was given; T_map_odom [N, 4, 4] the correction a TF consumer
    had at each frame's stamp (NaN rows: none yet); fixes: the raw results; foreign [N]:
    frames that showed another place (one contiguous block at most); fused_cov [N, 6, 6]:
    covariance of the fused body pose at each frame (NaN rows: unknown).

    Returns a JSON-able dict (lengths in metres, angles in degrees, times in seconds):
    'tf' (error of map->odom o odom->base at every frame from the first with a TF),
    'frames_over' (fraction over ``max_error_m`` or ``max_error_deg``, missing TF counts),
    'jumps' (``tf_jumps``), 'raw' / 'raw_ok' (raw fixes of non-foreign frames), 'fused_at_fix'
    (TF error at those frames) and 'fused_after_fix' (the fused pose right after each),
    'ratio' (fused TF median / raw median), 'fixes' (counts per action, foreign ones),
    'odometry_only' (from the true correction at the first TF frame), 'nees', and
    'foreign_block' (TF error growth over the block, the odometry drift over it, and the
    growth bound: that drift plus the correction's rotation error at the block start times
    the distance the body moved from there).
    """
    st = np.asarray(stamps_ns, dtype=np.int64)
    n = len(st)
    T_gt = np.asarray(T_map_base, dtype=np.float64)
    O = np.asarray(T_odom_base, dtype=np.float64)
    M = np.asarray(T_map_odom, dtype=np.float64)
    fmask = np.zeros(n, bool) if foreign is None else np.asarray(foreign, bool)
    has = np.array([np.all(np.isfinite(M[i])) for i in range(n)])
    fused = np.full_like(T_gt, np.nan)
    for i in np.flatnonzero(has):
        fused[i] = M[i] @ O[i]
    t_err, r_err = body_errors(fused, T_gt)
    out: Dict[str, object] = {"frames": n, "duration_s": float((st[-1] - st[0]) * 1e-9) if n else 0.0}
    first = int(np.argmax(has)) if has.any() else -1
    out["first_tf_frame"] = first
    out["time_to_first_tf_s"] = float((st[first] - st[0]) * 1e-9) if first >= 0 else float("nan")
    after = np.arange(n) >= first if first >= 0 else np.zeros(n, bool)
    out["frames_without_tf_after_first"] = int(np.sum(after & ~has))
    out["tf"] = {"t_m": error_stats(t_err[after]), "r_deg": error_stats(r_err[after])}
    over = after & (~has | (t_err > max_error_m) | (r_err > max_error_deg))
    out["frames_over"] = {"max_error_m": max_error_m, "max_error_deg": max_error_deg, "count": int(over.sum()),
                          "fraction": float(over.sum() / max(after.sum(), 1)),
                          "over_m": int(np.sum(after & has & (t_err > max_error_m))),
                          "over_deg": int(np.sum(after & has & (r_err > max_error_deg)))}
    jt, jr = tf_jumps(M, O)
    out["jumps"] = {"max_m": float(np.nanmax(jt)) if np.isfinite(jt).any() else float("nan"),
                    "max_deg": float(np.nanmax(jr)) if np.isfinite(jr).any() else float("nan"),
                    "threshold_m": jump_m, "count_over": int(np.sum(jt > jump_m))}

    good = [f for f in fixes if not f.foreign]
    raw_t = np.array([np.linalg.norm(f.T_map_base[:3, 3] - T_gt[f.index, :3, 3]) for f in good])
    raw_r = np.array([rotation_angle_deg(f.T_map_base[:3, :3], T_gt[f.index, :3, :3]) for f in good])
    ok = np.array([f.status == "ok" for f in good], bool)
    out["raw"] = {"t_m": error_stats(raw_t), "r_deg": error_stats(raw_r)}
    out["raw_ok"] = {"t_m": error_stats(raw_t[ok] if len(ok) else []),
                     "r_deg": error_stats(raw_r[ok] if len(ok) else [])}
    idx = np.array([f.index for f in good], dtype=np.int64)
    out["fused_at_fix"] = {"t_m": error_stats(t_err[idx] if len(idx) else []),
                           "r_deg": error_stats(r_err[idx] if len(idx) else [])}
    after_fix = [(f.T_fused, T_gt[f.index]) for f in good if f.T_fused is not None]
    if after_fix:
        at, ar = body_errors(np.stack([a for a, _ in after_fix]), np.stack([b for _, b in after_fix]))
    else:
        at = ar = np.zeros(0)
    out["fused_after_fix"] = {"t_m": error_stats(at), "r_deg": error_stats(ar)}
    med_raw = out["raw"]["t_m"]["median"]
    out["ratio_fused_to_raw_median"] = float(out["tf"]["t_m"]["median"] / med_raw) if med_raw > 0 else float("nan")

    actions: Dict[str, int] = {}
    for f in fixes:
        actions[f.action or "unknown"] = actions.get(f.action or "unknown", 0) + 1
    foreign_fixes = [f for f in fixes if f.foreign]
    out["fixes"] = {"raw": len(fixes), "ok": sum(f.status == "ok" for f in fixes),
                    "degenerate": sum(f.status == "degenerate" for f in fixes), "actions": actions,
                    "accepted": sum(f.action in APPLIED for f in fixes),
                    "rejected": actions.get("rejected", 0), "ignored": actions.get("ignored", 0),
                    "foreign": len(foreign_fixes), "foreign_ok": sum(f.status == "ok" for f in foreign_fixes),
                    "foreign_accepted": sum(f.action in APPLIED for f in foreign_fixes)}

    if first >= 0:
        oo_t, oo_r = body_errors(odometry_only(T_gt, O, first), T_gt)
        out["odometry_only"] = {"from_frame": first, "t_m": error_stats(oo_t), "r_deg": error_stats(oo_r),
                                "final_t_m": float(oo_t[-1]), "final_r_deg": float(oo_r[-1])}
    nees_p = np.full(n, np.nan)
    nees_r = np.full(n, np.nan)
    if fused_cov is not None:
        C = np.asarray(fused_cov, dtype=np.float64)
        for i in np.flatnonzero(has):
            nees_p[i], nees_r[i] = pose_nees(fused[i], C[i], T_gt[i])
    out["nees"] = _nees_summary(nees_p, nees_r)
    fa = [pose_nees(f.T_fused, f.cov_fused, T_gt[f.index]) for f in good
          if f.T_fused is not None and f.cov_fused is not None]
    out["nees_after_fix"] = _nees_summary(np.array([a for a, _ in fa]), np.array([b for _, b in fa]))

    if fmask.any():
        s = int(np.argmax(fmask))
        e = int(n - np.argmax(fmask[::-1]))  # one past the last foreign frame
        block = np.arange(s, min(e + 1, n))  # the first frame after the block still shows the block's state
        oo_t, oo_r = body_errors(odometry_only(T_gt, O, s), T_gt)
        fb: Dict[str, object] = {"start": s, "stop": e, "frames": e - s,
                                 "distance_m": float(np.sum(np.linalg.norm(np.diff(T_gt[s:e + 1, :3, 3], axis=0),
                                                                           axis=1))) if e > s else 0.0,
                                 "odometry_drift_max_m": float(np.nanmax(oo_t[block])),
                                 "odometry_drift_max_deg": float(np.nanmax(oo_r[block])),
                                 "odometry_drift_end_m": float(oo_t[block[-1]])}
        if has[s]:
            # A held correction whose rotation is off by theta moves the body's error by up to
            # theta x (distance from where it was held) on top of the odometry drift.
            lever = np.linalg.norm(T_gt[block, :3, 3] - T_gt[s, :3, 3], axis=1)
            fb["rotation_lever_m"] = float(np.max(np.radians(r_err[s]) * lever))
            fb["tf_growth_bound_m"] = fb["odometry_drift_max_m"] + fb["rotation_lever_m"]
            fb.update(tf_error_start_m=float(t_err[s]), tf_error_max_m=float(np.nanmax(t_err[block])),
                      tf_error_end_m=float(t_err[block[-1]]),
                      tf_growth_max_m=float(np.nanmax(t_err[block]) - t_err[s]),
                      tf_growth_end_m=float(t_err[block[-1]] - t_err[s]),
                      tf_error_start_deg=float(r_err[s]), tf_error_max_deg=float(np.nanmax(r_err[block])))
            fb["growth_within_drift"] = bool(fb["tf_growth_max_m"] <= fb["odometry_drift_max_m"] + 1e-9)
            fb["growth_within_bound"] = bool(fb["tf_growth_max_m"] <= fb["tf_growth_bound_m"] + 1e-9)
        out["foreign_block"] = fb
    out["per_frame"] = {"t_s": ((st - st[0]) * 1e-9).tolist() if n else [], "tf_t_m": t_err.tolist(),
                        "tf_r_deg": r_err.tolist(), "jump_m": jt.tolist(), "nees_position": nees_p.tolist(),
                        "nees_rotation": nees_r.tolist(), "foreign": fmask.tolist()}
    return out


def _nees_summary(p: np.ndarray, r: np.ndarray) -> Dict[str, float]:
    p = p[np.isfinite(p)]
    r = r[np.isfinite(r)]
    med = lambda v: float(np.median(v)) if len(v) else float("nan")  # noqa: E731
    within = lambda v: float(np.mean(v <= CHI2_3DOF_95)) if len(v) else float("nan")  # noqa: E731
    return {"n": int(len(p)), "position_median": med(p), "rotation_median": med(r),
            "position_within_95": within(p), "rotation_within_95": within(r)}


def estimate_metrics(T_est: np.ndarray, covariance: np.ndarray, T_gt: np.ndarray) -> Dict[str, object]:
    """Errors and NEES of k pose estimates with covariances ([k, 4, 4], [k, 6, 6]) against truth [k, 4, 4].

    E.g. every ``~/pose`` message (the fused pose at each processed frame). Returns
    {'t_m', 'r_deg' (``error_stats``), 'nees' (position/rotation median, fraction within
    the chi-square(3) 95 % bound 7.81)}.
    """
    T_est = np.asarray(T_est, dtype=np.float64).reshape(-1, 4, 4)
    C = np.asarray(covariance, dtype=np.float64).reshape(-1, 6, 6)
    T_gt = np.asarray(T_gt, dtype=np.float64).reshape(-1, 4, 4)
    t, r = body_errors(T_est, T_gt) if len(T_gt) else (np.zeros(0), np.zeros(0))
    nees = np.array([pose_nees(a, c, g) for a, c, g in zip(T_est, C, T_gt)]).reshape(-1, 2)
    return {"t_m": error_stats(t), "r_deg": error_stats(r), "nees": _nees_summary(nees[:, 0], nees[:, 1])}
