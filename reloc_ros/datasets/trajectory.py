"""Trajectory helpers shared by the time-stamped readers (TUM, bags): pose interpolation
at image stamps and keyframe selection by distance and angle travelled."""
from __future__ import annotations

from typing import List, Optional, Tuple

import numpy as np

from reloc_ros.geometry import rotation_angle_deg


def interpolate_poses(t_query: np.ndarray, t_samples: np.ndarray, T_samples: np.ndarray,
                      max_gap: float, max_dt: Optional[float] = None, seconds_per_unit: float = 1.0
                      ) -> Tuple[np.ndarray, np.ndarray, List[Optional[str]]]:
    """Poses at ``t_query`` from samples: linear in translation, SLERP in rotation.

    t_query: [M] times; t_samples: [S] strictly increasing times in the same unit
    (seconds or integer nanoseconds); T_samples: [S, 4, 4] rigid transforms.
    A query is answered only between two samples at most ``max_gap`` apart (or exactly
    at a sample) and, when ``max_dt`` is given, with the nearer sample within
    ``max_dt``. Nothing is extrapolated. seconds_per_unit: only for the reasons' text
    (1e-9 for nanoseconds).

    Returns (T [M, 4, 4] (NaN where unanswered), ok [M] bool, reason [M] (None when ok)).
    """
    t_q = np.asarray(t_query)
    t_s = np.asarray(t_samples)
    T_s = np.asarray(T_samples, dtype=np.float64).reshape(-1, 4, 4)
    M, S = len(t_q), len(t_s)
    out = np.full((M, 4, 4), np.nan)
    ok = np.zeros(M, dtype=bool)
    reasons: List[Optional[str]] = [None] * M
    if S == 0:
        return out, ok, ["no pose samples"] * M
    if S > 1 and np.any(np.diff(t_s) <= 0):
        raise ValueError("interpolate_poses: sample times must be strictly increasing")
    i0 = np.searchsorted(t_s, t_q, side="right") - 1
    exact = (i0 >= 0) & (t_s[np.clip(i0, 0, S - 1)] == t_q)
    out[exact] = T_s[i0[exact]]
    ok[exact] = True
    inner = ~exact & (i0 >= 0) & (i0 < S - 1)
    for m in np.flatnonzero(~exact & ~inner):
        reasons[m] = "before the first pose sample" if i0[m] < 0 else "after the last pose sample"
    idx = np.flatnonzero(inner)
    if len(idx):
        a, b = i0[idx], i0[idx] + 1
        t0, t1, t = t_s[a], t_s[b], t_q[idx]
        gap = (t1 - t0).astype(np.float64)
        near = np.minimum(t - t0, t1 - t).astype(np.float64)
        good = gap <= max_gap
        if max_dt is not None:
            good &= near <= max_dt
        for m, g, n, fine in zip(idx, gap, near, good):
            if not fine:
                u = seconds_per_unit
                if g > max_gap:
                    reasons[m] = f"pose samples around it are {g * u:.6g} s apart (max_gap {max_gap * u:.6g} s)"
                else:
                    reasons[m] = f"nearest pose sample is {n * u:.6g} s away (max_dt {max_dt * u:.6g} s)"
        idx, a, b, t0, t, gap = idx[good], a[good], b[good], t0[good], t[good], gap[good]
        if len(idx):
            # imported here: scipy.spatial costs ~0.3 s at start-up, and every map build
            # imports this module while only bags interpolate
            from scipy.spatial.transform import Rotation

            alpha = (t - t0).astype(np.float64) / gap
            R0 = Rotation.from_matrix(T_s[a, :3, :3])
            R1 = Rotation.from_matrix(T_s[b, :3, :3])
            rel = (R0.inv() * R1).as_rotvec()
            R = R0 * Rotation.from_rotvec(alpha[:, None] * rel)
            T = np.zeros((len(idx), 4, 4))
            T[:, :3, :3] = R.as_matrix()
            T[:, :3, 3] = (1 - alpha)[:, None] * T_s[a, :3, 3] + alpha[:, None] * T_s[b, :3, 3]
            T[:, 3, 3] = 1.0
            out[idx] = T
            ok[idx] = True
    return out, ok, reasons


def select_keyframes(T_world_cam: np.ndarray, min_dist: float, min_angle_deg: float) -> List[int]:
    """Indices of keyframes along a trajectory [N, 4, 4] (camera-to-world, metres).

    The first frame is a keyframe; a later frame becomes one when its camera centre is
    at least ``min_dist`` metres from the last keyframe's or its orientation differs by
    at least ``min_angle_deg`` degrees. Measured from the last keyframe (not summed along
    the path), so standing still or jittering adds no keyframes.
    """
    T = np.asarray(T_world_cam, dtype=np.float64)
    if len(T) == 0:
        return []
    keep = [0]
    last = T[0]
    for i in range(1, len(T)):
        d = float(np.linalg.norm(T[i, :3, 3] - last[:3, 3]))
        if d >= min_dist or rotation_angle_deg(last[:3, :3], T[i, :3, :3]) >= min_angle_deg:
            keep.append(i)
            last = T[i]
    return keep
