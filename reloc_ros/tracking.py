"""Fusion of per-frame fixes over time, through odometry: the pose *stream* a robot consumes.

A relocalizer's single-frame fixes are noisy and, now and then, wrong with a confident
covariance. ``PoseTracker`` turns them into one state that only moves on evidence:

- the state is ``T_map_odom`` (REP-105) with a [6, 6] covariance and a ``TrackState``
  (uninitialised / tracking / lost);
- fixes arrive as ``Fix`` (``T_map_base`` at the image stamp, covariance, status,
  confidence) together with ``T_odom_base`` at the same stamp; each fix implies a
  ``T_map_odom`` measurement ``T_map_base @ inv(T_odom_base)``;
- **initialisation needs evidence**: two fixes (or a hint and a fix) that agree within
  their covariances once carried through odometry, or one fix above
  ``init_single_confidence``;
- **gating**: while tracking, a fix is accepted only when its squared Mahalanobis
  distance to the prediction is below the chi-square quantile (6 dof) ``gate_quantile``;
  rejected fixes are counted, never applied;
- **kidnapping**: ``kidnap_fixes`` consecutive rejected fixes that agree with each other
  re-initialise the state from them (``reinitialisations`` counts it);
- **estimate**: a robust (Huber), information-weighted average of the accepted fixes
  in a sliding window; older fixes are down-weighted by the odometry drift accumulated
  since them, and the result's covariance is inflated when the fixes disagree more than
  their covariances say (a-posteriori variance factor), so correlated fixes do not make
  it over-confident;
- **adaptive fix covariance**: a fix covariance that is too optimistic (map points with
  correlated errors, an inconsistent ground truth behind the map) would make the gate
  reject good fixes. The tracker scales every fix covariance by the variance factor
  ``s`` in [1, adaptive_max_scale] that brings the median normalised innovation of the
  last ``adaptive_window`` gated fixes to the chi-square (6 dof) median; a median is
  robust to a minority of wrong fixes, and the cap keeps far-off fixes rejected even when
  wrong fixes are the majority for a while;
- DEGENERATE fixes are ignored unless ``fuse_degenerate``;
- without odometry (``PoseTracker(odometry=False)``: the node's ``tf_mode map_to_base``)
  the same machinery runs with ``T_odom_base = I`` and a constant-position prior whose
  covariance grows with time (``no_odom_*_rate``).

No ROS here. Conventions: poses are [4, 4] float64 ``T_a_b`` (frame b -> frame a),
metres; covariances are [6, 6] over (x, y, z, rx, ry, rz), m^2 / rad^2, expressed in the
map frame, rotation as a left perturbation ``R' = exp([drot]x) R`` and position as
``p' = p + dp`` (the geometry_msgs/PoseWithCovariance convention used across reloc_ros).
Stamps are integer nanoseconds.
"""
from __future__ import annotations

import enum
import math
from collections import deque
from dataclasses import dataclass
from typing import Deque, Optional, Sequence, Tuple

import numpy as np

from reloc_ros.geometry import invert, skew, so3_exp, so3_log
from reloc_ros.types import Status


class TrackState(str, enum.Enum):
    """What the tracker's ``T_map_odom`` is worth."""

    UNINITIALISED = "uninitialised"  # no state: nothing may be published
    TRACKING = "tracking"  # state from agreeing fixes, kept through odometry
    LOST = "lost"  # state too old or too uncertain to gate with: re-initialises like at start


@dataclass
class TrackerConfig:
    """Options of ``PoseTracker`` (the node's ``tracker_options``).

    init_min_fixes: fixes (a hint counts as one) that must agree before the first state.
    init_single_confidence: one fix with a confidence above this initialises alone
        (default 1.0: never, confidences are <= 1).
    gate_quantile: chi-square (6 dof) quantile of the squared Mahalanobis gate; 0.999 is
        22.5, so a fix consistent with the state is rejected about once in a thousand.
    window: accepted fixes averaged into the state (sliding window).
    huber_k: Mahalanobis distance (sigma) beyond which a fix's weight falls as 1/d.
    kidnap_fixes: consecutive rejected fixes, each agreeing with the one before it, that
        re-initialise the state (consecutive pairs, because the odometry drift between
        the first and the last of them is the least known).
    adaptive_window / adaptive_max_scale / adaptive_min_samples: the adaptive fix
        covariance (module docstring): gated fixes used, the largest variance factor
        (25: fix position/rotation std at most 5x too optimistic), and the fewest gated
        fixes before it adapts. adaptive_window 0 turns it off.
    min_confidence: fixes below this confidence (0..1) never enter the state.
    fuse_degenerate: let DEGENERATE fixes enter the state (their covariance already says
        how little they are worth; off by default because the common DEGENERATE cause,
        a pose from a small image patch, is wrong more often than its covariance says).
    odom_translation_drift: odometry position error per metre travelled (0.02 = 2 %).
    odom_rotation_drift_deg_per_m: odometry rotation error per metre travelled; its effect
        on position (a heading error carried along the path, ``rate * d^2 / 2``) is
        added to the position drift.
    odom_rotation_drift_per_rad: odometry rotation error per radian turned (0.02 = 2 %).
    odom_position_rate / odom_rotation_rate_deg: random walk per sqrt(second) even with
        odometry (wheel slip while stopped, time offsets); small.
    no_odom_position_rate / no_odom_rotation_rate_deg: random walk per sqrt(second) of
        the constant-position prior without odometry: how far the body may move
        unobserved (1 m/sqrt(s): about 1.4 m of std after 2 s).
    lost_timeout_s: no accepted fix for this long (stamp time) -> LOST.
    lost_position_std_m: predicted position std above this -> LOST.
    time_jump_back_s: a stamp older than the newest by more than this (bag loop, sim
        restart) resets the tracker.
    odom_bias: estimate the odometry's systematic error online: a translation error and a
        rotation rate per metre travelled, body frame (a wheel radius, a misaligned
        odometry frame, a gyro bias), with a Kalman filter fed by each pair of consecutive
        accepted fixes (their relative pose against the odometry between them). Every
        pose carried through odometry (prediction, gate, window average, and the map->odom
        ``T_map_odom_at`` gives for the latest odometry, which the node sends on /tf) uses
        the corrected increments,
        and the estimate's uncertainty is added to the prediction's. The prior is
        zero-mean with the drift model's std (``odom_translation_drift``,
        ``odom_rotation_drift_deg_per_m``), so with little travel or noisy fixes the
        estimate stays near zero; the bias may change by that std over
        ``odom_bias_change_m`` metres of travel (a random walk). The drift model stays
        the odometry's random error (conservative: part of it is the bias now removed).
        Off by default: it pays on vehicles with a calibration error (KITTI with a 2 %,
        1 deg/m odometry: ~/pose 0.9 vs 2.1 cm), and costs where the fixes' own error
        is smooth and correlated along the path (7-Scenes' inconsistent ground truth
        looks like an odometry bias to it: fused/raw 1.04 vs 0.96). docs/RESULTS.md.
    """

    init_min_fixes: int = 2
    init_single_confidence: float = 1.0
    gate_quantile: float = 0.999
    window: int = 10
    huber_k: float = 2.0
    kidnap_fixes: int = 3
    adaptive_window: int = 20
    adaptive_max_scale: float = 25.0
    adaptive_min_samples: int = 5
    min_confidence: float = 0.0
    fuse_degenerate: bool = False
    odom_translation_drift: float = 0.02
    odom_rotation_drift_deg_per_m: float = 1.0
    odom_rotation_drift_per_rad: float = 0.02
    odom_position_rate: float = 0.002
    odom_rotation_rate_deg: float = 0.05
    no_odom_position_rate: float = 1.0
    no_odom_rotation_rate_deg: float = 30.0
    lost_timeout_s: float = 60.0
    lost_position_std_m: float = 2.0
    time_jump_back_s: float = 1.0
    odom_bias: bool = False
    odom_bias_change_m: float = 100.0

    def validate(self) -> None:
        """Raise ValueError naming the first unusable option."""
        if self.init_min_fixes < 1:
            raise ValueError(f"init_min_fixes must be >= 1, got {self.init_min_fixes}")
        if not 0.0 < self.gate_quantile < 1.0:
            raise ValueError(f"gate_quantile must be in (0, 1), got {self.gate_quantile}")
        if self.window < 1:
            raise ValueError(f"window must be >= 1, got {self.window}")
        if self.kidnap_fixes < 2:
            raise ValueError(f"kidnap_fixes must be >= 2 (one fix never re-initialises), got {self.kidnap_fixes}")
        if not 0.0 <= self.min_confidence <= 1.0:
            raise ValueError(f"min_confidence must be in [0, 1], got {self.min_confidence}")
        for name in ("init_single_confidence", "huber_k", "odom_translation_drift", "odom_rotation_drift_deg_per_m",
                     "odom_rotation_drift_per_rad", "odom_position_rate", "odom_rotation_rate_deg",
                     "no_odom_position_rate", "no_odom_rotation_rate_deg", "lost_timeout_s",
                     "lost_position_std_m", "time_jump_back_s"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")
        if self.huber_k <= 0 or self.lost_position_std_m <= 0:
            raise ValueError("huber_k and lost_position_std_m must be > 0")
        if self.adaptive_window < 0 or self.adaptive_min_samples < 1:
            raise ValueError("adaptive_window must be >= 0 and adaptive_min_samples >= 1")
        if not (math.isfinite(self.adaptive_max_scale) and self.adaptive_max_scale >= 1.0):
            raise ValueError(f"adaptive_max_scale must be >= 1, got {self.adaptive_max_scale}")
        if not (math.isfinite(self.odom_bias_change_m) and self.odom_bias_change_m > 0):
            raise ValueError(f"odom_bias_change_m must be > 0, got {self.odom_bias_change_m}")
        if not isinstance(self.odom_bias, bool):
            raise ValueError(f"odom_bias must be true or false, got {self.odom_bias!r}")

    @property
    def gate(self) -> float:
        """Squared-Mahalanobis threshold (chi-square, 6 dof, ``gate_quantile``)."""
        from scipy.stats import chi2

        return float(chi2.ppf(self.gate_quantile, 6))


@dataclass
class Fix:
    """One per-frame localization result, in the body frame.

    T_map_base: [4, 4] body (base_link, or the camera without a body) in the map at
    ``stamp_ns``. covariance: [6, 6] (see module docstring). confidence: 0..1.
    """

    stamp_ns: int
    T_map_base: np.ndarray
    covariance: np.ndarray
    status: Status = Status.OK
    confidence: float = 1.0


@dataclass
class Decision:
    """What the tracker did with one fix (or hint).

    action: 'initialised', 'accepted', 'rejected', 'reinitialised', 'candidate' (kept as
    evidence for initialisation), 'ignored' (DEGENERATE / low confidence / unusable), or
    'reset' (time jumped back). mahalanobis2: squared distance to the prediction (NaN
    when not gated). gate: the threshold it was compared with.
    """

    action: str
    mahalanobis2: float = float("nan")
    gate: float = float("nan")
    message: str = ""

    @property
    def applied(self) -> bool:
        """True when the fix moved the state."""
        return self.action in ("initialised", "accepted", "reinitialised")


@dataclass
class TrackerStats:
    """Counters since construction (kept across ``reset``)."""

    accepted: int = 0
    rejected: int = 0
    ignored: int = 0
    initialisations: int = 0
    reinitialisations: int = 0
    resets: int = 0
    last_mahalanobis2: float = float("nan")
    last_action: str = ""


@dataclass
class _Obs:
    """A T_map_odom measurement with where odometry was when it was taken."""

    stamp_ns: int
    M: np.ndarray  # [4, 4] T_map_odom implied by the fix
    C: np.ndarray  # [6, 6] its covariance (map frame, module convention)
    T_odom_base: np.ndarray  # [4, 4] odometry at the fix stamp
    travel: float  # odometry path length (m) up to this fix
    turn: float  # odometry rotation (rad) up to this fix
    confidence: float = 1.0
    hint: bool = False
    C_fix: Optional[np.ndarray] = None  # [6, 6] covariance of the fix's T_map_base (module convention)


# ---------------------------------------------------------------------------- algebra


def pose_difference(T_a: np.ndarray, T_b: np.ndarray) -> np.ndarray:
    """``T_a - T_b`` as the [6] perturbation (dp, drot) with T_a = T_b (+) delta (module convention)."""
    d = np.empty(6)
    d[:3] = T_a[:3, 3] - T_b[:3, 3]
    d[3:] = so3_log(T_a[:3, :3] @ T_b[:3, :3].T)
    return d


def pose_plus(T: np.ndarray, delta: np.ndarray) -> np.ndarray:
    """``T (+) delta``: position + delta[:3], rotation exp(delta[3:]) R."""
    out = np.array(T, dtype=np.float64, copy=True)
    out[:3, 3] += delta[:3]
    out[:3, :3] = so3_exp(delta[3:]) @ out[:3, :3]
    return out


def _lever(M: np.ndarray, T_odom_base: np.ndarray) -> np.ndarray:
    """J with ``cov(T_map_odom) = J cov(T_map_base) J^T`` for T_map_odom = T_map_base inv(T_odom_base).

    Rotating T_map_base by drot about the body turns T_map_odom about the odom origin and
    shifts it by ``(R_mo p_ob) x drot``, so ``J = [[I, [R_mo p_ob]x], [0, I]]``; its inverse
    flips the sign of the off-diagonal block.
    """
    J = np.eye(6)
    J[:3, 3:] = skew(M[:3, :3] @ T_odom_base[:3, 3])
    return J


def corrected_increment(D: np.ndarray, length_m: float, bias: np.ndarray) -> np.ndarray:
    """An odometry increment with a systematic error removed.

    D: [4, 4] ``inv(T_odom_base_a) @ T_odom_base_b`` (body frame at a), over a path of
    ``length_m`` metres; bias: [6] odometry error per metre travelled, body frame: a
    translation error [3] (m/m; along the direction of travel it is a scale error, across
    it a misaligned odometry heading) and a rotation rate [3] (rad/m). The measured
    increment is D = (true increment) with the error added, so the correction subtracts
    it; the rotation rate acts half before and half after the measured rotation (a
    constant rate over the segment), and the translation turns by the first half, as a
    chord does on a constant-curvature path.
    """
    bias = np.asarray(bias, dtype=np.float64)
    half = so3_exp(-0.5 * length_m * bias[3:])
    out = np.eye(4)
    out[:3, :3] = half @ D[:3, :3] @ half
    out[:3, 3] = half @ (D[:3, 3] - length_m * bias[:3])
    return out


def _sym(C: np.ndarray) -> np.ndarray:
    return 0.5 * (C + C.T)


def _mahalanobis2(delta: np.ndarray, C: np.ndarray) -> float:
    try:
        return float(delta @ np.linalg.solve(C, delta))
    except np.linalg.LinAlgError:
        return float("inf")


def _usable(T: np.ndarray, C: np.ndarray) -> str:
    """'' when a pose and covariance can enter the state, else why not."""
    T, C = np.asarray(T, dtype=np.float64), np.asarray(C, dtype=np.float64)
    if T.shape != (4, 4) or not np.all(np.isfinite(T)):
        return "pose is not a finite [4, 4] matrix"
    R = T[:3, :3]
    if not np.allclose(R @ R.T, np.eye(3), atol=1e-4) or np.linalg.det(R) < 0:
        return "pose rotation is not a rotation"
    if C.shape != (6, 6) or not np.all(np.isfinite(C)):
        return "covariance is not a finite [6, 6] matrix"
    if np.linalg.eigvalsh(_sym(C)).min() <= 0:
        return "covariance is not positive definite"
    return ""


# ---------------------------------------------------------------------------- tracker


class PoseTracker:
    """Fuses fixes over time through odometry into ``T_map_odom`` (see the module docstring).

    Not thread-safe: the caller serialises ``update``/``add_hint``/``predict`` (the node
    calls it from its one worker thread and reads snapshots under its own lock).
    odometry: False when there is no odometry (``T_odom_base`` is then always identity and
    the prior is a constant position with growing covariance).
    """

    def __init__(self, config: Optional[TrackerConfig] = None, odometry: bool = True) -> None:
        self.config = config or TrackerConfig()
        self.config.validate()
        self.odometry = bool(odometry)
        self._gate = self.config.gate
        self.stats = TrackerStats()
        self.reset(count=False)

    # ------------------------------------------------------------------ state
    def reset(self, count: bool = True) -> None:
        """Forget the state (map reload, time jump, operator reset); counters stay."""
        self.state = TrackState.UNINITIALISED
        self._M: Optional[np.ndarray] = None  # T_map_odom estimate
        self._P: Optional[np.ndarray] = None  # its covariance at the last estimate
        self._at: Optional[_Obs] = None  # odometry/time of the last estimate
        self._window: Deque[_Obs] = deque(maxlen=self.config.window)
        self._candidates: Deque[_Obs] = deque(maxlen=max(self.config.window, self.config.init_min_fixes + 4))
        self._rejected: Deque[_Obs] = deque(maxlen=self.config.kidnap_fixes)
        self._last_odom: Optional[Tuple[int, np.ndarray, float, float]] = None  # stamp, T_odom_base, travel, turn
        self._last_accept_ns: Optional[int] = None
        self._newest_ns: Optional[int] = None
        self._innovations: Deque[Tuple[np.ndarray, np.ndarray, np.ndarray]] = deque(
            maxlen=max(self.config.adaptive_window, 1))  # (innovation, predicted cov, fix cov)
        self.scale = 1.0  # variance factor applied to fix covariances (adaptive)
        self.bias = np.zeros(6)  # odometry error per metre, body frame: translation, rotation (config.odom_bias)
        self._Pb = self._bias_prior()  # its covariance
        if count:
            self.stats.resets += 1

    @property
    def T_map_odom(self) -> Optional[np.ndarray]:
        """[4, 4] current estimate, None before initialisation (kept while LOST)."""
        return None if self._M is None else self._M.copy()

    @property
    def covariance(self) -> Optional[np.ndarray]:
        """[6, 6] covariance of ``T_map_odom`` at the last estimate (see ``predict`` for later stamps)."""
        return None if self._P is None else self._P.copy()

    def predict(self, stamp_ns: int, T_odom_base: Optional[np.ndarray] = None
                ) -> Optional[Tuple[np.ndarray, np.ndarray]]:
        """Fused ``(T_map_base [4, 4], covariance [6, 6])`` at ``stamp_ns`` given odometry then.

        The covariance includes the odometry drift since the last estimate. None before
        initialisation. Does not change the state.
        """
        if self._M is None:
            return None
        obs = self._odom_obs(stamp_ns, T_odom_base, advance=False)
        P = self._predicted_cov(obs)
        M = self._carry(self._M, self._at, obs, self.bias)
        Jinv = _lever(M, obs.T_odom_base)
        Jinv[:3, 3:] *= -1.0
        return M @ obs.T_odom_base, _sym(Jinv @ P @ Jinv.T)

    def T_map_odom_at(self, stamp_ns: int, T_odom_base: Optional[np.ndarray] = None) -> Optional[np.ndarray]:
        """[4, 4] map->odom to publish when odometry reads ``T_odom_base`` at ``stamp_ns``.

        Equal to ``T_map_odom`` unless an odometry bias is estimated: then map->odom
        absorbs the odometry's systematic error since the last estimate, so that
        map->odom composed with this odom->base is the corrected body pose. None before
        initialisation.
        """
        pred = self.predict(stamp_ns, T_odom_base)
        if pred is None:
            return None
        T = np.eye(4) if (T_odom_base is None or not self.odometry) else np.asarray(T_odom_base, dtype=np.float64)
        return pred[0] @ invert(T)

    # ------------------------------------------------------------------ inputs
    def update(self, fix: Fix, T_odom_base: Optional[np.ndarray] = None) -> Decision:
        """Feed one fix with odometry at its stamp (None without odometry); returns the decision."""
        cfg = self.config
        jump = self._check_time(fix.stamp_ns)
        if jump is not None:
            return jump
        why = _usable(fix.T_map_base, fix.covariance)
        if not why and fix.status not in (Status.OK, Status.DEGENERATE):
            why = f"status {getattr(fix.status, 'value', fix.status)} is not a fix"
        if not why and fix.status == Status.DEGENERATE and not cfg.fuse_degenerate:
            why = "DEGENERATE fixes are not fused (fuse_degenerate false)"
        if not why and not fix.confidence >= cfg.min_confidence:
            why = f"confidence {fix.confidence:.2f} below min_confidence {cfg.min_confidence:.2f}"
        if not why and T_odom_base is not None and _usable(T_odom_base, np.eye(6)):
            why = "odometry pose is not a finite rigid transform"
        if why:
            self.check_lost(fix.stamp_ns)
            return self._count(Decision("ignored", message=why))
        obs = self._odom_obs(fix.stamp_ns, T_odom_base, advance=True)
        T_mb = np.asarray(fix.T_map_base, dtype=np.float64)
        obs.M = T_mb @ invert(obs.T_odom_base)
        J = _lever(obs.M, obs.T_odom_base)
        obs.C_fix = _sym(np.asarray(fix.covariance, dtype=np.float64))
        obs.C = _sym(J @ obs.C_fix @ J.T)
        obs.confidence = float(fix.confidence)
        self.check_lost(fix.stamp_ns)
        if self.state != TrackState.TRACKING:
            return self._count(self._try_initialise(obs))
        return self._count(self._gate_and_fuse(obs))

    def add_hint(self, stamp_ns: int, T_map_base: np.ndarray, covariance: np.ndarray,
                 T_odom_base: Optional[np.ndarray] = None, reset: bool = True) -> Decision:
        """A pose hint (operator's /initialpose, a localize-near request) for the body.

        The hint never sets the state by itself: with ``reset`` the state is dropped and
        the hint waits as one piece of initialisation evidence, so the first fix that
        agrees with it (within both covariances) initialises; without ``reset`` it is
        evidence only while not tracking. Returns 'candidate' or 'ignored' (unusable
        pose or covariance).
        """
        why = _usable(T_map_base, covariance)
        if why:
            return Decision("ignored", message=f"hint ignored: {why}")
        if reset:
            self.reset()
        elif self.state == TrackState.TRACKING:
            return Decision("candidate", message="tracking: the hint only narrows retrieval (reset to re-initialise)")
        obs = self._odom_obs(stamp_ns, T_odom_base, advance=False)
        obs.M = np.asarray(T_map_base, dtype=np.float64) @ invert(obs.T_odom_base)
        J = _lever(obs.M, obs.T_odom_base)
        obs.C = _sym(J @ np.asarray(covariance, dtype=np.float64) @ J.T)
        obs.hint = True
        self._candidates.append(obs)
        return Decision("candidate", message="hint stored; the first fix that agrees with it initialises")

    # ------------------------------------------------------------------ internals
    def _count(self, d: Decision) -> Decision:
        s = self.stats
        s.last_action = d.action
        if math.isfinite(d.mahalanobis2):
            s.last_mahalanobis2 = d.mahalanobis2
        if d.action in ("accepted",):
            s.accepted += 1
        elif d.action == "initialised":
            s.accepted += 1
            s.initialisations += 1
        elif d.action == "reinitialised":
            s.accepted += 1
            s.reinitialisations += 1
        elif d.action == "rejected":
            s.rejected += 1
        elif d.action == "ignored":
            s.ignored += 1
        return d

    def _check_time(self, stamp_ns: int) -> Optional[Decision]:
        newest = self._newest_ns
        if newest is not None and stamp_ns < newest - int(self.config.time_jump_back_s * 1e9):
            self.reset()
            self._newest_ns = stamp_ns
            return self._count(Decision("reset", message=f"time jumped back {(newest - stamp_ns) * 1e-9:.1f} s: "
                                                         "state reset"))
        self._newest_ns = stamp_ns if newest is None else max(newest, stamp_ns)
        return None

    def _odom_obs(self, stamp_ns: int, T_odom_base: Optional[np.ndarray], advance: bool) -> _Obs:
        """An _Obs at stamp_ns carrying the odometry path length/turn up to it."""
        T = np.eye(4) if (T_odom_base is None or not self.odometry) else np.asarray(T_odom_base, dtype=np.float64)
        travel = turn = 0.0
        if self._last_odom is not None:
            _, T0, travel0, turn0 = self._last_odom
            travel = travel0 + float(np.linalg.norm(T[:3, 3] - T0[:3, 3]))
            turn = turn0 + float(np.linalg.norm(so3_log(T[:3, :3] @ T0[:3, :3].T)))
        if advance:
            self._last_odom = (stamp_ns, T, travel, turn)
        return _Obs(stamp_ns, np.eye(4), np.eye(6), T, travel, turn)

    def _bias_on(self) -> bool:
        return self.odometry and self.config.odom_bias

    def _bias_prior(self) -> np.ndarray:
        cfg = self.config
        rot = math.radians(cfg.odom_rotation_drift_deg_per_m)
        return np.diag([cfg.odom_translation_drift ** 2] * 3 + [rot * rot] * 3)

    def _update_bias(self, a: _Obs, b: _Obs) -> None:
        """Kalman update of the odometry bias from consecutive accepted fixes a, b (odom_bias)."""
        length = b.travel - a.travel
        if not self._bias_on() or a.C_fix is None or b.C_fix is None or length <= 1e-3:
            return
        Pb = self._Pb + self._bias_prior() * (length / self.config.odom_bias_change_m)
        T_a, T_b = a.M @ a.T_odom_base, b.M @ b.T_odom_base
        D = invert(a.T_odom_base) @ b.T_odom_base

        def residual(bias: np.ndarray) -> np.ndarray:  # fix b against fix a carried by corrected odometry
            return pose_difference(T_b, T_a @ corrected_increment(D, length, bias))

        r0 = residual(self.bias)
        H = np.zeros((6, 6))
        for k in range(6):
            e = np.zeros(6)
            e[k] = 1e-6
            H[:, k] = (residual(self.bias + e) - r0) / 1e-6
        J_a = np.eye(6)  # fix a's error moves the carried pose rigidly
        J_a[:3, 3:] = -skew((T_a @ corrected_increment(D, length, self.bias))[:3, 3] - T_a[:3, 3])
        R = self.scale * (J_a @ a.C_fix @ J_a.T + b.C_fix) + self._drift(a, b)  # isotropic drift: any frame
        S = _sym(H @ Pb @ H.T + R)
        if _mahalanobis2(r0, S) > self._gate:  # slip, a fix error the gate let through: not a bias
            return
        K = Pb @ H.T @ np.linalg.inv(S)  # H is d(residual)/d(bias) = -d(prediction)/d(bias)
        self.bias = self.bias - K @ r0
        self._Pb = _sym((np.eye(6) - K @ H) @ Pb)

    def _carry(self, M: np.ndarray, src: _Obs, dst: _Obs, bias: np.ndarray) -> np.ndarray:
        """T_map_odom at ``dst`` implied by ``M`` at ``src`` through bias-corrected odometry."""
        if not self._bias_on() or not np.any(bias):
            return M
        length = abs(dst.travel - src.travel)
        if dst.stamp_ns >= src.stamp_ns:
            K = corrected_increment(invert(src.T_odom_base) @ dst.T_odom_base, length, bias)
        else:
            K = invert(corrected_increment(invert(dst.T_odom_base) @ src.T_odom_base, length, bias))
        return M @ src.T_odom_base @ K @ invert(dst.T_odom_base)

    def _drift(self, a: _Obs, b: _Obs) -> np.ndarray:
        """[6, 6] body-frame-at-b covariance of the odometry error accumulated from a to b."""
        cfg = self.config
        d = abs(b.travel - a.travel)
        turn = abs(b.turn - a.turn)
        dt = abs(b.stamp_ns - a.stamp_ns) * 1e-9
        if self.odometry:
            rot_per_m = math.radians(cfg.odom_rotation_drift_deg_per_m)
            sp = math.sqrt((cfg.odom_translation_drift * d) ** 2 + (0.5 * rot_per_m * d * d) ** 2
                           + cfg.odom_position_rate ** 2 * dt)
            sr = math.hypot(rot_per_m * d + cfg.odom_rotation_drift_per_rad * turn,
                            math.radians(cfg.odom_rotation_rate_deg) * math.sqrt(dt))
        else:
            sp = cfg.no_odom_position_rate * math.sqrt(dt)
            sr = math.radians(cfg.no_odom_rotation_rate_deg) * math.sqrt(dt)
        return np.diag([sp * sp] * 3 + [sr * sr] * 3)

    def _drift_map(self, a: _Obs, b: _Obs, M: np.ndarray) -> np.ndarray:
        """The drift from a to b as a covariance of T_map_odom (expressed at b's body pose)."""
        J = _lever(M, b.T_odom_base)
        return _sym(J @ self._drift(a, b) @ J.T)

    def _predicted_cov(self, obs: _Obs) -> np.ndarray:
        return _sym(self._P + self._drift_map(self._at, obs, self._M) + self._bias_cov(self._at, obs))

    def _bias_cov(self, a: _Obs, b: _Obs) -> np.ndarray:
        """[6, 6] covariance of T_map_odom carried from a to b due to the bias estimate's uncertainty."""
        if not self._bias_on() or not np.any(self._Pb) or a.stamp_ns == b.stamp_ns:
            return np.zeros((6, 6))
        base = self._carry(self._M, a, b, self.bias)
        J = np.zeros((6, 6))
        h = 1e-6
        for k in range(6):
            e = np.zeros(6)
            e[k] = h
            J[:, k] = pose_difference(self._carry(self._M, a, b, self.bias + e), base) / h
        return _sym(J @ self._Pb @ J.T)

    def _agree(self, a: _Obs, b: _Obs) -> float:
        """Squared Mahalanobis distance between two observations' T_map_odom (drift between included)."""
        C = self.scale * (a.C + b.C) + self._drift_map(a, b, b.M)
        return _mahalanobis2(pose_difference(b.M, a.M), C)

    def _try_initialise(self, obs: _Obs) -> Decision:
        cfg = self.config
        if obs.confidence > cfg.init_single_confidence:
            self._start([obs])
            return Decision("initialised", message=f"one fix with confidence {obs.confidence:.2f} > "
                                                   f"{cfg.init_single_confidence:.2f}")
        agreeing = [c for c in self._candidates if self._agree(c, obs) <= self._gate]
        self._candidates.append(obs)
        if len(agreeing) + 1 >= cfg.init_min_fixes:
            fixes = [c for c in agreeing if not c.hint] + [obs]
            was = self.state
            self._start(fixes)
            hints = len(agreeing) - (len(fixes) - 1)
            what = f"{len(fixes)} agreeing fixes" + (" and a hint" if hints else "")
            return Decision("initialised", message=f"initialised from {what}" +
                            (" (was lost)" if was == TrackState.LOST else ""))
        return Decision("candidate", message=f"waiting for {cfg.init_min_fixes} agreeing fixes "
                                             f"({len(agreeing) + 1} so far)")

    def _start(self, fixes: Sequence[_Obs]) -> None:
        self._window.clear()
        self._window.extend(fixes)
        self._candidates.clear()
        self._rejected.clear()
        self._innovations.clear()  # measured against a state that is being replaced
        for a, b in zip(fixes, fixes[1:]):  # agreeing fixes also tell the odometry's bias
            self._update_bias(a, b)
        self._M = None
        self._estimate(fixes[-1])
        self.state = TrackState.TRACKING
        self._last_accept_ns = fixes[-1].stamp_ns

    def _gate_and_fuse(self, obs: _Obs) -> Decision:
        cfg = self.config
        P = self._predicted_cov(obs)
        nu = pose_difference(obs.M, self._carry(self._M, self._at, obs, self.bias))
        m2 = _mahalanobis2(nu, P + self.scale * obs.C)
        self._adapt(nu, P, obs.C)
        if m2 <= self._gate:
            if self._window:
                self._update_bias(self._window[-1], obs)
            self._window.append(obs)
            self._rejected.clear()
            self._estimate(obs)
            self._last_accept_ns = obs.stamp_ns
            return Decision("accepted", m2, self._gate)
        self._rejected.append(obs)
        if len(self._rejected) >= cfg.kidnap_fixes:
            group = list(self._rejected)
            if all(self._agree(a, b) <= self._gate for a, b in zip(group, group[1:])):
                self._start(group)
                return Decision("reinitialised", m2, self._gate,
                                f"{len(group)} consecutive fixes agree with each other but not with the state "
                                f"(kidnapped?): re-initialised from them")
        return Decision("rejected", m2, self._gate, f"innovation {m2:.1f} > gate {self._gate:.1f}")

    def _adapt(self, nu: np.ndarray, P: np.ndarray, C: np.ndarray) -> None:
        """Update the fix-covariance variance factor from the recent innovations (docstring)."""
        cfg = self.config
        if cfg.adaptive_window == 0:
            return
        self._innovations.append((nu, P, C))
        if len(self._innovations) < cfg.adaptive_min_samples:
            return
        from scipy.stats import chi2

        target = float(chi2.median(6))

        def median_nis(s: float) -> float:
            return float(np.median([_mahalanobis2(n, p + s * c) for n, p, c in self._innovations]))

        lo, hi = 1.0, cfg.adaptive_max_scale
        if median_nis(lo) <= target:
            self.scale = 1.0
        elif median_nis(hi) > target:
            self.scale = hi
        else:
            for _ in range(30):  # the median NIS decreases with s: bisect on log s
                mid = math.sqrt(lo * hi)
                lo, hi = (mid, hi) if median_nis(mid) > target else (lo, mid)
            self.scale = hi

    def _estimate(self, now: _Obs) -> None:
        """Robust information-weighted average of the window, expressed at ``now``.

        Gauss-Newton over the [6] perturbation of T_map_odom at ``now``: each window fix
        is compared with the state carried back to it through the (bias-corrected)
        odometry; Huber weights are re-computed every iteration.
        """
        cfg = self.config
        obs = list(self._window)
        M = obs[-1].M.copy() if self._M is None else self._M.copy()
        Cs = [self.scale * o.C + self._drift_map(o, now, M) for o in obs]
        infos = [np.linalg.inv(C) for C in Cs]

        def residuals(M_: np.ndarray) -> list:
            return [pose_difference(o.M, self._carry(M_, now, o, self.bias)) for o in obs]

        A = np.eye(6)
        w = np.ones(len(obs))
        r = residuals(M)
        for _ in range(10):
            Js = []
            for o in obs:
                J = -np.eye(6)
                # a rotation of M about the odom origin also moves the carried pose's origin
                J[:3, 3:] = skew(self._carry(M, now, o, self.bias)[:3, 3] - M[:3, 3])
                Js.append(J)
            d = np.sqrt([max(ri @ Ii @ ri, 0.0) for ri, Ii in zip(r, infos)])
            w = np.where(d <= cfg.huber_k, 1.0, cfg.huber_k / np.maximum(d, 1e-12))
            A = sum(wi * J.T @ Ii @ J for wi, J, Ii in zip(w, Js, infos))
            g = sum(wi * J.T @ (Ii @ ri) for wi, J, Ii, ri in zip(w, Js, infos, r))
            step = -np.linalg.solve(A, g)
            M = pose_plus(M, step)
            r = residuals(M)
            if np.linalg.norm(step[:3]) < 1e-7 and np.linalg.norm(step[3:]) < 1e-9:
                break
        P = np.linalg.inv(A)
        if len(obs) > 1:
            # Fixes of one scene share map errors: when they scatter more than their
            # covariances say, the average is that much less certain (variance factor).
            chi = sum(wi * (ri @ Ii @ ri) for wi, ri, Ii in zip(w, r, infos))
            P = P * max(1.0, chi / (6.0 * (len(obs) - 1)))
        self._M, self._P, self._at = M, _sym(P), now

    def check_lost(self, stamp_ns: int) -> None:
        """Move TRACKING to LOST when no fix was accepted for lost_timeout_s or the prediction
        at ``stamp_ns`` (with the latest odometry) is too uncertain to gate with."""
        if self.state != TrackState.TRACKING:
            return
        cfg = self.config
        if self._last_accept_ns is not None and (stamp_ns - self._last_accept_ns) * 1e-9 > cfg.lost_timeout_s:
            self.state = TrackState.LOST
            return
        if self._last_odom is not None:
            std = self.position_std(stamp_ns, self._last_odom[1])
            if std > cfg.lost_position_std_m:
                self.state = TrackState.LOST

    # ------------------------------------------------------------------ reporting
    def position_std(self, stamp_ns: int, T_odom_base: Optional[np.ndarray] = None) -> float:
        """Largest position standard deviation (m) of the fused body pose at ``stamp_ns`` (NaN if none)."""
        pred = self.predict(stamp_ns, T_odom_base)
        if pred is None:
            return float("nan")
        return float(math.sqrt(max(np.linalg.eigvalsh(pred[1][:3, :3]).max(), 0.0)))

    def summary(self) -> dict:
        """Plain-value snapshot for diagnostics."""
        s = self.stats
        return {"state": self.state.value, "accepted": s.accepted, "rejected": s.rejected, "ignored": s.ignored,
                "initialisations": s.initialisations, "reinitialisations": s.reinitialisations,
                "resets": s.resets, "last_mahalanobis2": s.last_mahalanobis2, "last_action": s.last_action,
                "gate": self._gate, "window": len(self._window), "fix_covariance_scale": self.scale,
                "odom_translation_bias": float(np.linalg.norm(self.bias[:3])),
                "odom_rotation_bias_deg_per_m": float(np.degrees(np.linalg.norm(self.bias[3:])))}
