"""A small TF buffer with time interpolation, for machines where tf2_ros is not importable.

tf2_ros is C++-backed and has no PyPI wheel; on a real ROS 2 install the node uses
tf2_ros (see ``make_tf_lookup``) and this module's buffer only when that import fails.

Semantics follow tf2 where it matters for a localizer:
- frames form a tree; each child has one parent (a new parent replaces the old history);
- dynamic transforms are interpolated (linear translation, slerp rotation) between the
  two samples around the requested stamp; no extrapolation, beyond the exact newest or
  oldest sample it is an error (TF extrapolation is the bug users hit most);
- static transforms (``/tf_static``) hold at every time;
- stamp 0 means "the latest time every link of the chain has";
- time going backwards (a bag loop, a simulator restart) clears dynamic history, as
  tf2 does on a backwards clock jump: per link when a sample is older than that link's
  newest by more than ``jump_back_tolerance_s``, and for every link when the node's ROS
  clock jumps back (``TfListener``). Without this every new sample would be older than
  ``newest - cache_time`` and dropped, and every lookup would fail until time caught up.
Times are integer nanoseconds; transforms are [4, 4] float64 ``T_parent_child``, metres.
"""
from __future__ import annotations

import bisect
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Tuple

import numpy as np
from scipy.spatial.transform import Rotation

from reloc_ros.geometry import invert
from reloc_ros.types import RelocError

log = logging.getLogger("reloc_ros.ros.tf_buffer")

# A sample this much older than its link's newest means time went backwards. Samples of
# one link come from one publisher, in stamp order (DDS keeps a writer's order); the only
# legitimate steps back are forward-dated transforms (AMCL / slam_toolbox stamp map->odom
# ahead by their transform tolerance) jittering by the publisher's latency, well under
# a second. A bag loop or a simulator restart steps back by far more (the bag length, to
# t = 0), and interleaving those samples with the old history would interpolate between
# two timelines. Jumps below this are absorbed: the new samples become newest within it.
DEFAULT_JUMP_BACK_TOLERANCE_S = 1.0


class TfLookupError(RelocError):
    """A transform is not available at the requested time (unknown frame, gap, extrapolation)."""


@dataclass
class _Link:
    parent: str
    static: bool = False
    stamps: List[int] = field(default_factory=list)
    trans: List[np.ndarray] = field(default_factory=list)
    quats: List[np.ndarray] = field(default_factory=list)  # (x, y, z, w)


def _slerp(q0: np.ndarray, q1: np.ndarray, a: float) -> np.ndarray:
    d = float(np.dot(q0, q1))
    if d < 0.0:  # shortest arc
        q1, d = -q1, -d
    if d > 0.9995:
        q = q0 + a * (q1 - q0)
        return q / np.linalg.norm(q)
    th = np.arccos(np.clip(d, -1.0, 1.0))
    return (np.sin((1 - a) * th) * q0 + np.sin(a * th) * q1) / np.sin(th)


class TfBuffer:
    """Thread-safe transform store with interpolated lookups.

    cache_time_s: how much history (seconds) each dynamic link keeps behind its newest sample.
    jump_back_tolerance_s: a dynamic sample older than its link's newest by more than this
    (seconds; capped at ``cache_time_s``, beyond which it would be pruned at once) is time
    going backwards: the link's history is cleared and the sample stored (logged at
    warning level, counted in ``jumps_back``). See ``DEFAULT_JUMP_BACK_TOLERANCE_S``.
    """

    def __init__(self, cache_time_s: float = 10.0,
                 jump_back_tolerance_s: float = DEFAULT_JUMP_BACK_TOLERANCE_S) -> None:
        if not cache_time_s > 0:
            raise ValueError(f"cache_time_s must be > 0, got {cache_time_s}")
        if not jump_back_tolerance_s > 0:
            raise ValueError(f"jump_back_tolerance_s must be > 0, got {jump_back_tolerance_s}")
        self._cache_ns = int(cache_time_s * 1e9)
        self.jump_back_tolerance_s = float(min(jump_back_tolerance_s, cache_time_s))
        self._jump_ns = int(self.jump_back_tolerance_s * 1e9)
        self.jumps_back = 0  # links whose history a backwards step in time cleared
        self._links: Dict[str, _Link] = {}
        self._cond = threading.Condition()

    def clear(self) -> None:
        """Drop the history of every dynamic link (tf2's ``clear``); static links stay.

        The links keep their parents, so a lookup before new data says "no data" for the
        link rather than "frame does not exist".
        """
        with self._cond:
            for link in self._links.values():
                if not link.static:
                    link.stamps, link.trans, link.quats = [], [], []
            self._cond.notify_all()

    # ------------------------------------------------------------------ writing
    def set_transform(self, parent: str, child: str, stamp_ns: int, T_parent_child: np.ndarray,
                      static: bool = False) -> None:
        """Store ``T_parent_child`` [4, 4] at ``stamp_ns`` (ignored for static links)."""
        parent, child = parent.lstrip("/"), child.lstrip("/")
        if not parent or not child or parent == child:
            raise ValueError(f"invalid transform {parent!r} -> {child!r}")
        T = np.asarray(T_parent_child, dtype=np.float64)
        if T.shape != (4, 4) or not np.all(np.isfinite(T)):
            raise ValueError(f"transform {parent} -> {child} is not a finite [4, 4] matrix")
        q = Rotation.from_matrix(T[:3, :3]).as_quat()
        with self._cond:
            link = self._links.get(child)
            if link is None or link.parent != parent or link.static != static:
                link = _Link(parent=parent, static=static)
                self._links[child] = link
            if static:
                link.stamps, link.trans, link.quats = [0], [T[:3, 3].copy()], [q]
            else:
                if link.stamps and stamp_ns < link.stamps[-1] - self._jump_ns:
                    log.warning("TF %s -> %s went back in time from %.3f s to %.3f s (bag loop or simulator "
                                "restart?): clearing its history", parent, child, link.stamps[-1] * 1e-9,
                                stamp_ns * 1e-9)
                    link.stamps, link.trans, link.quats = [], [], []
                    self.jumps_back += 1
                i = bisect.bisect_left(link.stamps, stamp_ns)
                if i < len(link.stamps) and link.stamps[i] == stamp_ns:
                    link.trans[i], link.quats[i] = T[:3, 3].copy(), q
                else:
                    link.stamps.insert(i, int(stamp_ns))
                    link.trans.insert(i, T[:3, 3].copy())
                    link.quats.insert(i, q)
                cut = bisect.bisect_left(link.stamps, link.stamps[-1] - self._cache_ns)
                if cut:
                    del link.stamps[:cut], link.trans[:cut], link.quats[:cut]
            self._cond.notify_all()

    def set_transform_msg(self, msg, static: bool = False) -> None:
        """Store a geometry_msgs/TransformStamped."""
        from reloc_ros.ros.conversions import stamp_to_ns, transform_msg_to_matrix

        self.set_transform(msg.header.frame_id, msg.child_frame_id, stamp_to_ns(msg.header.stamp),
                           transform_msg_to_matrix(msg.transform), static=static)

    # ------------------------------------------------------------------ reading
    def frames(self) -> List[str]:
        """Every frame the buffer knows."""
        with self._cond:
            names = set(self._links)
            names.update(link.parent for link in self._links.values())
        return sorted(names)

    def _chain(self, frame: str) -> List[str]:
        chain = [frame]
        while frame in self._links:
            frame = self._links[frame].parent
            if frame in chain:
                raise TfLookupError(f"TF loop through frame '{frame}'")
            chain.append(frame)
        return chain

    def _link_at(self, child: str, stamp_ns: int) -> np.ndarray:
        link = self._links[child]
        if link.static:
            i = 0
            t, q = link.trans[0], link.quats[0]
        else:
            st = link.stamps
            if not st:
                raise TfLookupError(f"no data for {link.parent} -> {child}")
            i = bisect.bisect_left(st, stamp_ns)
            if i < len(st) and st[i] == stamp_ns:
                t, q = link.trans[i], link.quats[i]
            elif i == 0 or i == len(st):
                side = "past" if i == len(st) else "before the oldest data"
                raise TfLookupError(
                    f"extrapolation into the {side}: {link.parent} -> {child} requested at "
                    f"{stamp_ns * 1e-9:.6f} s, data spans {st[0] * 1e-9:.6f}..{st[-1] * 1e-9:.6f} s"
                )
            else:
                a = (stamp_ns - st[i - 1]) / float(st[i] - st[i - 1])
                t = (1 - a) * link.trans[i - 1] + a * link.trans[i]
                q = _slerp(link.quats[i - 1], link.quats[i], a)
        T = np.eye(4)
        T[:3, :3] = Rotation.from_quat(q).as_matrix()
        T[:3, 3] = t
        return T

    def _latest_common(self, links: List[str]) -> int:
        newest = [self._links[c].stamps[-1] for c in links if not self._links[c].static and self._links[c].stamps]
        return min(newest) if newest else 0

    def lookup(self, target: str, source: str, stamp_ns: int = 0) -> np.ndarray:
        """T_target_source [4, 4] at ``stamp_ns`` (0: latest common time). Raises TfLookupError."""
        target, source = target.lstrip("/"), source.lstrip("/")
        with self._cond:
            return self._lookup_locked(target, source, stamp_ns)

    def _lookup_locked(self, target: str, source: str, stamp_ns: int) -> np.ndarray:
        if target == source:
            return np.eye(4)
        known = set(self._links) | {link.parent for link in self._links.values()}
        for f in (target, source):
            if f not in known:
                raise TfLookupError(f"frame '{f}' does not exist in the TF tree")
        up_s, up_t = self._chain(source), self._chain(target)
        common = next((f for f in up_s if f in up_t), None)
        if common is None:
            raise TfLookupError(f"'{target}' and '{source}' are not connected in the TF tree")
        links_s = up_s[:up_s.index(common)]
        links_t = up_t[:up_t.index(common)]
        if stamp_ns == 0:
            stamp_ns = self._latest_common(links_s + links_t)
        T_common_source = np.eye(4)
        for child in links_s:  # walk source -> common
            T_common_source = self._link_at(child, stamp_ns) @ T_common_source
        T_common_target = np.eye(4)
        for child in links_t:
            T_common_target = self._link_at(child, stamp_ns) @ T_common_target
        return invert(T_common_target) @ T_common_source

    def can_transform(self, target: str, source: str, stamp_ns: int = 0) -> bool:
        """True when ``lookup`` would succeed now."""
        try:
            self.lookup(target, source, stamp_ns)
            return True
        except TfLookupError:
            return False

    def wait_lookup(self, target: str, source: str, stamp_ns: int, timeout_s: float) -> np.ndarray:
        """``lookup``, waiting up to ``timeout_s`` seconds for data to arrive. Raises TfLookupError."""
        deadline = time.monotonic() + max(timeout_s, 0.0)
        target, source = target.lstrip("/"), source.lstrip("/")
        with self._cond:
            while True:
                try:
                    return self._lookup_locked(target, source, stamp_ns)
                except TfLookupError as e:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise TfLookupError(f"{e} (waited {timeout_s:.3f} s)") from None
                    self._cond.wait(left)


class TfListener:
    """Feeds a TfBuffer from ``/tf`` and ``/tf_static`` on an rclpy node (tf2_ros QoS).

    Also clears the buffer's dynamic history when the node's ROS clock jumps backwards by
    more than the buffer's ``jump_back_tolerance_s`` or switches between system and ROS
    (sim) time, as tf2_ros's Buffer does: a jump callback on ``node.get_clock()``
    (counted in ``clock_jumps``). ``close()`` unregisters it.
    """

    def __init__(self, node, buffer: TfBuffer, callback_group=None) -> None:
        from rclpy.clock import JumpThreshold
        from rclpy.duration import Duration
        from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy
        from tf2_msgs.msg import TFMessage

        self.buffer = buffer
        self.clock_jumps = 0
        dyn = QoSProfile(depth=100, history=HistoryPolicy.KEEP_LAST, reliability=ReliabilityPolicy.RELIABLE,
                         durability=DurabilityPolicy.VOLATILE)
        stat = QoSProfile(depth=100, history=HistoryPolicy.KEEP_LAST, reliability=ReliabilityPolicy.RELIABLE,
                          durability=DurabilityPolicy.TRANSIENT_LOCAL)
        self._log = node.get_logger()
        self._subs = [
            node.create_subscription(TFMessage, "/tf", lambda m: self._on(m, False), dyn,
                                     callback_group=callback_group),
            node.create_subscription(TFMessage, "/tf_static", lambda m: self._on(m, True), stat,
                                     callback_group=callback_group),
        ]
        threshold = JumpThreshold(min_forward=None,
                                  min_backward=Duration(nanoseconds=-int(buffer.jump_back_tolerance_s * 1e9)),
                                  on_clock_change=True)
        # The handle must stay referenced: the callback is unregistered when it is collected.
        self._jump_handle = node.get_clock().create_jump_callback(threshold, post_callback=self._on_time_jump)

    def _on_time_jump(self, jump) -> None:
        """Clock jump callback (runs where the clock is set, e.g. the /clock subscription)."""
        self.clock_jumps += 1
        self._log.warning(f"ROS time jumped by {jump.delta.nanoseconds * 1e-9:+.3f} s ({jump.clock_change}): "
                          "clearing the TF buffer")
        self.buffer.clear()

    def close(self) -> None:
        """Unregister the clock jump callback (the subscriptions go with the node)."""
        if self._jump_handle is not None:
            self._jump_handle.unregister()
            self._jump_handle = None

    def _on(self, msg, static: bool) -> None:
        for tf in msg.transforms:
            try:
                self.buffer.set_transform_msg(tf, static=static)
            except (ValueError, RelocError) as e:
                # One bad transform from another node must not poison the buffer or kill us.
                self._log.warning(f"ignoring transform {tf.header.frame_id} -> {tf.child_frame_id}: {e}",
                                  throttle_duration_sec=5.0)


LookupFn = Callable[[str, str, int, float], np.ndarray]


def make_tf_lookup(node, callback_group=None) -> Tuple[LookupFn, str]:
    """A ``lookup(target, source, stamp_ns, timeout_s) -> T_target_source`` for ``node``.

    Uses tf2_ros when importable (a real ROS install), else TfBuffer + TfListener.
    Returns (lookup function raising TfLookupError, backend name).
    """
    try:
        import tf2_ros  # noqa: F401
    except ImportError:
        buf = TfBuffer()
        listener = TfListener(node, buf, callback_group)

        def lookup(target: str, source: str, stamp_ns: int, timeout_s: float) -> np.ndarray:
            return buf.wait_lookup(target, source, stamp_ns, timeout_s)

        lookup._keepalive = listener  # type: ignore[attr-defined]
        return lookup, "reloc_ros.ros.tf_buffer"

    from rclpy.duration import Duration
    from rclpy.time import Time

    from reloc_ros.ros.conversions import transform_msg_to_matrix

    buf2 = tf2_ros.Buffer()
    listener2 = tf2_ros.TransformListener(buf2, node, spin_thread=False)

    def lookup2(target: str, source: str, stamp_ns: int, timeout_s: float) -> np.ndarray:
        try:
            tf = buf2.lookup_transform(target, source, Time(nanoseconds=stamp_ns),
                                       timeout=Duration(nanoseconds=int(timeout_s * 1e9)))
        except tf2_ros.TransformException as e:
            raise TfLookupError(str(e)) from None
        return transform_msg_to_matrix(tf.transform)

    lookup2._keepalive = listener2  # type: ignore[attr-defined]
    return lookup2, "tf2_ros"
