"""Group the frames of several cameras into rig captures by stamp (approximate time).

``CaptureSynchronizer`` is what ``message_filters.ApproximateTimeSynchronizer`` does for a
multi-camera rig, without ROS and with one difference that matters for localization: a
capture never waits forever for a camera. A frame joins the open capture whose reference
stamp (its first frame's) is within ``window_s`` of its own and that does not hold that
camera yet; otherwise it opens a new capture. A capture is released

- ``complete``: as soon as every camera is in it;
- ``passed``: when every missing camera has already delivered a frame newer than the
  capture's stamp + window (cameras deliver in stamp order, so nothing can come for it);
- ``timeout``: ``timeout_s`` after its first frame arrived (arrival clock), with the
  cameras present (a camera that is late or dead does not block the others);
- ``superseded``: when a newer capture is released, older ones still open are released
  with it (in stamp order), so captures always leave in stamp order;
- ``overflow``: beyond ``max_open`` open captures the oldest is released.

A frame whose stamp is not newer than the last released capture's stamp + window is late
(its capture is gone) and dropped (``late`` counts them). A frame repeated with the same
camera and stamp (a resend) replaces the first.

Stamps are integer nanoseconds; arrival times (``now``) are seconds of a monotonic clock.
Not thread-safe: the caller serialises ``add`` and ``poll``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence


@dataclass
class Capture:
    """One rig capture.

    stamp_ns: the capture's stamp: that of the first camera in the synchronizer's camera
        order that is present (a rig's "master" camera when listed first).
    frames: camera name -> (stamp_ns, item) of the cameras present.
    missing: camera names not in the capture, in camera order.
    reason: why it was released: 'complete', 'passed', 'timeout', 'superseded', 'overflow'.
    first_arrival: arrival time (s, the caller's monotonic clock) of its first frame.
    """

    stamp_ns: int
    frames: Dict[str, Any]
    missing: List[str]
    reason: str
    first_arrival: float

    @property
    def complete(self) -> bool:
        return not self.missing


@dataclass
class _Open:
    ref_ns: int
    first_arrival: float
    frames: Dict[str, Any] = field(default_factory=dict)


class CaptureSynchronizer:
    """Approximate-time grouping of named cameras' frames into captures (see module docstring).

    names: the rig's cameras (unique, order = reference order for ``Capture.stamp_ns``).
    window_s: largest stamp difference (s) of two frames of one capture, > 0; keep it
        under half the frame period, or consecutive frames of one camera may be grouped.
    timeout_s: how long (s, arrival clock) an incomplete capture waits for its missing
        cameras, >= 0 (0: released at the next ``add``/``poll``).
    max_open: most captures kept open at once (>= 1).
    """

    def __init__(self, names: Sequence[str], window_s: float, timeout_s: float, max_open: int = 8) -> None:
        names = list(names)
        if not names or len(set(names)) != len(names) or not all(isinstance(n, str) and n for n in names):
            raise ValueError(f"CaptureSynchronizer needs unique non-empty camera names, got {names}")
        if not window_s > 0 or not timeout_s >= 0 or max_open < 1:
            raise ValueError(f"CaptureSynchronizer: window_s must be > 0, timeout_s >= 0 and max_open >= 1 "
                             f"(got {window_s}, {timeout_s}, {max_open})")
        self.names = names
        self.window_ns = int(round(window_s * 1e9))
        self.timeout_s = float(timeout_s)
        self.max_open = int(max_open)
        self._open: List[_Open] = []  # sorted by ref_ns
        self._newest: Dict[str, int] = {}  # newest stamp seen per camera
        self._released_ns: Optional[int] = None
        self.late = 0
        self.released = {"complete": 0, "passed": 0, "timeout": 0, "superseded": 0, "overflow": 0}

    @property
    def open_captures(self) -> int:
        return len(self._open)

    def add(self, name: str, stamp_ns: int, item: Any, now: float) -> List[Capture]:
        """Add one frame of camera ``name``; returns the captures released (stamp order),
        including any that timed out by ``now``. KeyError for an unknown camera."""
        if name not in self.names:
            raise KeyError(f"unknown camera {name!r} (cameras: {self.names})")
        stamp_ns = int(stamp_ns)
        out: List[Capture] = []
        if self._released_ns is not None and stamp_ns - self._released_ns <= self.window_ns:
            if self._released_ns - stamp_ns > 1_000_000_000:
                # stamps jumped back by more than a second (bag loop, sim restart): start afresh
                out += self._release_upto(len(self._open), "superseded")
                self._released_ns = None
                self._newest.clear()
            else:
                self.late += 1
                return self.poll(now)
        self._newest[name] = max(self._newest.get(name, stamp_ns), stamp_ns)
        best, best_d = None, None
        for g in self._open:
            d = abs(stamp_ns - g.ref_ns)
            if d > self.window_ns:
                continue
            if name in g.frames and g.frames[name][0] != stamp_ns:
                continue
            if best is None or d < best_d:
                best, best_d = g, d
        if best is None:
            best = _Open(stamp_ns, now)
            self._open.append(best)
            self._open.sort(key=lambda g: g.ref_ns)
        best.frames[name] = (stamp_ns, item)
        if len(best.frames) == len(self.names):
            out += self._release_upto(self._open.index(best) + 1, "superseded", last_reason="complete")
        out += self.poll(now)
        return out

    def poll(self, now: float) -> List[Capture]:
        """Release captures that timed out by ``now`` or that no missing camera can still join."""
        out: List[Capture] = []
        while len(self._open) > self.max_open:
            out += self._release_upto(1, "overflow")
        i = len(self._open) - 1
        while i >= 0:  # the newest releasable capture releases every older one with it
            g = self._open[i]
            if now - g.first_arrival >= self.timeout_s:
                out += self._release_upto(i + 1, "superseded", last_reason="timeout")
                break
            if all(self._newest.get(n, -1) - g.ref_ns > self.window_ns for n in self.names if n not in g.frames):
                out += self._release_upto(i + 1, "superseded", last_reason="passed")
                break
            i -= 1
        return out

    def flush(self) -> List[Capture]:
        """Release every open capture (e.g. at the end of a recording)."""
        return self._release_upto(len(self._open), "superseded")

    def _release_upto(self, n: int, reason: str, last_reason: Optional[str] = None) -> List[Capture]:
        done, self._open = self._open[:n], self._open[n:]
        out = []
        for j, g in enumerate(done):
            why = last_reason if (last_reason is not None and j == len(done) - 1) else reason
            ref = next(n for n in self.names if n in g.frames)
            out.append(Capture(g.frames[ref][0], dict(g.frames), [n for n in self.names if n not in g.frames],
                               why, g.first_arrival))
            self.released[why] += 1
            self._released_ns = g.ref_ns if self._released_ns is None else max(self._released_ns, g.ref_ns)
        return out
