"""``reloc_node``: the ROS 2 adapter of the localization core (no localization logic here).

Subscribes (relative names, so users remap them):
  ``image`` (sensor_msgs/Image) or ``image/compressed`` (CompressedImage), ``camera_info``.
Publishes:
  ``~/pose`` geometry_msgs/PoseWithCovarianceStamped: pose of ``base_frame`` (or of the
  camera when ``base_frame`` is empty) in ``map_frame``, stamped with the image stamp,
  covariance from the estimator propagated to that frame; nothing when not localized.
  ``/tf``: map->odom (REP-105, from the estimate and odom->base at the image stamp) or
  map->base, post-dated by ``transform_tolerance`` and re-broadcast at ``tf_publish_rate``.
  ``/diagnostics``: OK/WARN/ERROR with the reason and counters.
  ``~/markers`` (optional) and ``initialpose_topic`` (AMCL seeding mode).
Services: ``~/trigger`` (std_srvs/Trigger), ``~/enable`` (std_srvs/SetBool),
``~/reload_map`` (std_srvs/Trigger).

A plain node, not a managed (lifecycle) one: it must come up and report on /diagnostics
even when the map is missing or corrupt, and recover through ``~/reload_map`` without a
lifecycle manager (there is none in a PyPI ROS install); a lifecycle node whose
``on_configure`` fails has inactive publishers and cannot say why on /diagnostics.
``~/enable`` and ``~/reload_map`` give the run-time control a lifecycle would.

The image callback only stores the newest message; one worker thread decodes and
localizes it, so a slow estimator never builds a backlog (replaced frames are counted
as dropped).
"""
from __future__ import annotations

import signal
import sys
import threading
from collections import OrderedDict
import time
import traceback
from dataclasses import dataclass
from typing import Optional, Tuple

import numpy as np
import rclpy
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from geometry_msgs.msg import Point, PoseWithCovarianceStamped
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup, ReentrantCallbackGroup
from rclpy.executors import MultiThreadedExecutor
from rclpy.node import Node
from rclpy.signals import SignalHandlerOptions
from rclpy.qos import (DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy,
                       qos_profile_sensor_data, qos_profile_system_default)
from sensor_msgs.msg import CameraInfo, CompressedImage, Image
from std_srvs.srv import SetBool, Trigger
from tf2_msgs.msg import TFMessage
from visualization_msgs.msg import Marker, MarkerArray

from reloc_ros.ros.conversions import (MessageConversionError, camera_for_image, decode_image,
                                       matrix_to_transform_stamped, ns_to_stamp, pose_with_covariance_stamped,
                                       stamp_to_ns)
from reloc_ros.ros.frames import camera_to_body, covariance_is_usable, map_to_odom
from reloc_ros.ros.params import NodeParams, declare_params
from reloc_ros.ros.tf_buffer import TfLookupError, make_tf_lookup
from reloc_ros.types import RelocError, Status

OK, WARN, ERROR = DiagnosticStatus.OK, DiagnosticStatus.WARN, DiagnosticStatus.ERROR
_LEVEL_NAME = {OK: "OK", WARN: "WARN", ERROR: "ERROR"}


class ConfigError(ValueError):
    """The node's parameters are unusable; the node refuses to start."""


@dataclass
class _Stats:
    received: int = 0
    dropped: int = 0  # accepted for processing, replaced by a newer frame before the worker took it
    skipped: int = 0  # not accepted: disabled, trigger mode without trigger, max_rate throttle
    failed: int = 0  # bad input or localizer error
    processed: int = 0  # localizer ran
    localized: int = 0
    not_localized: int = 0
    published: int = 0
    last_latency_ms: float = float("nan")  # image stamp -> pose published (node clock)
    last_localize_ms: float = float("nan")  # core's own total
    last_queue_ms: float = float("nan")  # received -> worker started
    last_inliers: int = 0
    last_keyframes: tuple = ()
    last_confidence: float = float("nan")
    last_status: str = ""


def _image_qos(p: NodeParams) -> QoSProfile:
    if p.image_qos == "sensor_data":
        q = qos_profile_sensor_data
        return QoSProfile(depth=p.image_qos_depth, history=q.history, reliability=q.reliability,
                          durability=q.durability)
    if p.image_qos == "system_default":
        return qos_profile_system_default
    rel = ReliabilityPolicy.RELIABLE if p.image_qos == "reliable" else ReliabilityPolicy.BEST_EFFORT
    return QoSProfile(depth=p.image_qos_depth, history=HistoryPolicy.KEEP_LAST, reliability=rel,
                      durability=DurabilityPolicy.VOLATILE)


class RelocNode(Node):
    """The relocalization node; see the module docstring for its interface."""

    def __init__(self, **node_kwargs) -> None:
        super().__init__("reloc_node", **node_kwargs)
        try:
            self.p: NodeParams = declare_params(self)
            from reloc_ros.localizer import LocalizerConfig

            self._loc_cfg = LocalizerConfig.from_dict(self.p.localizer_config_dict())
        except ValueError as e:
            raise ConfigError(str(e)) from None
        p = self.p
        self._compressed = p.image_transport == "compressed"
        self._map_frame = p.map_frame.strip("/")
        self._odom_frame = p.odom_frame.strip("/")
        self._base_frame = p.base_frame.strip("/")

        self._lock = threading.Lock()
        self._frame_cond = threading.Condition(self._lock)
        self._info_cond = threading.Condition(self._lock)
        self._map_lock = threading.Lock()  # serialises map loads (start-up and ~/reload_map)
        self._stop = threading.Event()
        self._pending: Optional[Tuple[object, float]] = None
        self._camera_info: Optional[CameraInfo] = None
        self._infos: "OrderedDict[int, CameraInfo]" = OrderedDict()  # recent CameraInfo by stamp
        self._info_synced = False  # seen a CameraInfo with an image's exact stamp
        self._stats = _Stats()
        self._enabled = True
        self._trigger_pending = False
        self._seed_pending = True
        self._last_accepted_stamp: Optional[int] = None
        self._last_image_mono: Optional[float] = None
        self._start_mono = time.monotonic()
        self._localizer = None
        self._map_path_loaded = ""
        self._map_error = "not loaded yet"
        self._map_loading = ""  # path of a map being loaded
        self._level, self._message = OK, "starting"
        self._last_diag_key: Optional[Tuple[int, str]] = None
        self._last_tf: Optional[Tuple[np.ndarray, str, str]] = None

        io_group = ReentrantCallbackGroup()
        srv_group = MutuallyExclusiveCallbackGroup()  # a map load may take seconds: off the I/O path
        timer_group = MutuallyExclusiveCallbackGroup()

        pose_qos = QoSProfile(depth=1, history=HistoryPolicy.KEEP_LAST, reliability=ReliabilityPolicy.RELIABLE,
                              durability=DurabilityPolicy.TRANSIENT_LOCAL)  # latched like amcl_pose
        self._pose_pub = self.create_publisher(PoseWithCovarianceStamped, "~/pose", pose_qos)
        tf_qos = QoSProfile(depth=100, history=HistoryPolicy.KEEP_LAST, reliability=ReliabilityPolicy.RELIABLE,
                            durability=DurabilityPolicy.VOLATILE)  # tf2_ros broadcaster QoS
        self._tf_pub = self.create_publisher(TFMessage, "/tf", tf_qos) if p.tf_mode != "none" else None
        self._diag_pub = self.create_publisher(DiagnosticArray, "/diagnostics", 10)
        self._marker_pub = self.create_publisher(MarkerArray, "~/markers", 1) if p.publish_markers else None
        self._seed_pub = (self.create_publisher(PoseWithCovarianceStamped, p.initialpose_topic, 10)
                          if p.amcl_seeding else None)

        img_qos = _image_qos(p)
        if self._compressed:
            self._image_topic = "image/compressed"
            self.create_subscription(CompressedImage, self._image_topic, self._on_image, img_qos,
                                     callback_group=io_group)
        else:
            self._image_topic = "image"
            self.create_subscription(Image, self._image_topic, self._on_image, img_qos, callback_group=io_group)
        self.create_subscription(CameraInfo, "camera_info", self._on_camera_info, img_qos, callback_group=io_group)
        self._lookup, self._tf_backend = make_tf_lookup(self, io_group)

        self.create_service(Trigger, "~/trigger", self._srv_trigger, callback_group=srv_group)
        self.create_service(SetBool, "~/enable", self._srv_enable, callback_group=srv_group)
        self.create_service(Trigger, "~/reload_map", self._srv_reload, callback_group=srv_group)

        self.create_timer(p.diagnostics_period, self._publish_diagnostics, callback_group=timer_group)
        if self._tf_pub is not None and p.tf_publish_rate > 0:
            self.create_timer(1.0 / p.tf_publish_rate, self._rebroadcast_tf, callback_group=timer_group)

        self.get_logger().info(
            f"reloc_node: map_path='{p.map_path}', estimator={p.estimator}, top_k={p.top_k}, "
            f"input={self.resolve_topic_name(self._image_topic)} ({p.image_transport}, qos {p.image_qos}), "
            f"tf_mode={p.tf_mode}, processing={p.processing_mode} (max_rate {p.max_rate} Hz), "
            f"tf backend {self._tf_backend}")
        self._worker = threading.Thread(target=self._work, name="reloc_worker", daemon=True)
        self._worker.start()

    # ------------------------------------------------------------------ input callbacks
    def _on_camera_info(self, msg: CameraInfo) -> None:
        with self._lock:
            self._camera_info = msg
            self._infos[stamp_to_ns(msg.header.stamp)] = msg
            while len(self._infos) > 30:
                self._infos.popitem(last=False)
            self._info_cond.notify_all()

    def _on_image(self, msg) -> None:
        """Store the newest frame; never blocks on the localizer."""
        recv = time.monotonic()
        stamp = stamp_to_ns(msg.header.stamp)
        p = self.p
        with self._lock:
            s = self._stats
            s.received += 1
            self._last_image_mono = recv
            if not self._enabled:
                s.skipped += 1
                return
            if p.processing_mode == "trigger" and not self._trigger_pending:
                s.skipped += 1
                return
            if (p.processing_mode == "continuous" and p.max_rate > 0 and not self._trigger_pending
                    and self._last_accepted_stamp is not None
                    and 0 <= stamp - self._last_accepted_stamp < 1e9 / p.max_rate):
                s.skipped += 1  # throttled on stamp time, so a replayed bag throttles the same way
                return
            self._trigger_pending = False
            self._last_accepted_stamp = stamp
            if self._pending is not None:
                s.dropped += 1
            self._pending = (msg, recv)
            self._frame_cond.notify()

    # ------------------------------------------------------------------ worker
    def _work(self) -> None:
        self._load_map(self.p.map_path)
        while not self._stop.is_set():
            with self._frame_cond:
                while self._pending is None and not self._stop.is_set():
                    self._frame_cond.wait(0.2)
                item, self._pending = self._pending, None
            if item is not None and not self._stop.is_set():
                try:
                    self._process(*item)
                except Exception as e:  # the worker must survive anything a frame can cause
                    if self._stop.is_set():
                        return  # shutting down: publishers and logger may already be gone
                    self.get_logger().error(f"unexpected error processing a frame: {e}\n{traceback.format_exc()}")
                    self._frame_failed(f"internal error: {type(e).__name__}: {e}")

    def _wait_camera_info(self, stamp: int) -> Optional[CameraInfo]:
        """The CameraInfo for an image: the one with the same stamp when the camera sends them in
        pairs (as drivers do; waiting up to camera_info_timeout for it, since the two topics
        arrive in any order), else the latest one."""
        deadline = time.monotonic() + self.p.camera_info_timeout
        with self._info_cond:
            while True:
                info = self._infos.get(stamp)
                if info is not None:
                    self._info_synced = True
                    return info
                latest = self._camera_info
                if latest is not None and (not self._info_synced or stamp_to_ns(latest.header.stamp) > stamp):
                    return latest
                left = deadline - time.monotonic()
                if left <= 0 or self._stop.is_set():
                    return latest
                self._info_cond.wait(left)

    def _process(self, msg, recv_mono: float) -> None:
        p = self.p
        start = time.monotonic()
        stamp = stamp_to_ns(msg.header.stamp)
        with self._lock:
            self._stats.last_queue_ms = (start - recv_mono) * 1e3
        try:
            image = decode_image(msg, self._compressed)
            camera = camera_for_image(self._wait_camera_info(stamp), image)
        except MessageConversionError as e:
            self._frame_failed(f"bad input: {e}")
            return
        loc = self._localizer
        if loc is None:
            self._frame_failed(f"no map loaded: {self._map_error}", count_failed=False)
            return
        try:
            res = loc.localize(image, camera)
        except RelocError as e:
            self._frame_failed(f"bad input: {e}", processed=True)
            return
        with self._lock:
            s = self._stats
            s.last_localize_ms = float(res.timings_ms.get("total", (time.monotonic() - start) * 1e3))
            s.last_inliers = int(sum(res.inliers)) if res.inliers else 0
            s.last_keyframes = tuple(int(k) for k in res.keyframe_ids)
            s.last_confidence = float(res.confidence)
            s.last_status = res.status.value
        if res.status == Status.ERROR:
            self._frame_failed(f"localizer rejected the input: {res.message}", processed=True)
            return
        if not res.localized:
            self._not_localized(f"not localized: {res.message or res.status.value}")
            return
        if res.status == Status.DEGENERATE and not p.publish_degenerate:
            self._not_localized(f"degenerate result not published (publish_degenerate false): {res.message}")
            return
        if res.confidence < p.min_confidence:
            self._not_localized(f"confidence {res.confidence:.2f} below min_confidence {p.min_confidence:.2f}")
            return
        if not covariance_is_usable(res.covariance):
            self._frame_failed("localizer returned an unusable covariance (not finite / not PSD / all zeros)",
                               processed=True)
            return

        cam_frame = (p.camera_frame or msg.header.frame_id).strip("/")
        if self._base_frame and self._base_frame != cam_frame:
            if not cam_frame:
                self._frame_failed("image header has no frame_id and camera_frame is not set", processed=True)
                return
            try:
                T_base_cam = self._lookup(self._base_frame, cam_frame, stamp, p.tf_timeout)
            except TfLookupError as e:
                self._not_localized(f"localized but no TF {self._base_frame} <- {cam_frame} at the image stamp: {e}")
                return
            T_map_body, cov = camera_to_body(res.T_world_cam, res.covariance, T_base_cam)
        else:
            T_map_body, cov = np.asarray(res.T_world_cam, dtype=np.float64), np.asarray(res.covariance)
        body_frame = self._base_frame or cam_frame

        tf_note = ""
        tf_out = None
        if p.tf_mode == "map_to_odom":
            try:
                T_odom_base = self._lookup(self._odom_frame, self._base_frame, stamp, p.tf_timeout)
                tf_out = (map_to_odom(T_map_body, T_odom_base), self._map_frame, self._odom_frame)
            except TfLookupError as e:
                tf_note = f"; map->odom not updated, no TF {self._odom_frame} <- {self._base_frame}: {e}"
        elif p.tf_mode == "map_to_base":
            tf_out = (T_map_body, self._map_frame, body_frame)

        pose_msg = pose_with_covariance_stamped(T_map_body, cov, self._map_frame, stamp)
        self._pose_pub.publish(pose_msg)
        if tf_out is not None:
            self._publish_tf(tf_out, stamp + int(p.transform_tolerance * 1e9))
        with self._lock:
            seed = self._seed_pub is not None and self._seed_pending
            self._seed_pending = False
        if seed:
            self._seed_pub.publish(pose_msg)
        if self._marker_pub is not None:
            self._publish_markers(loc, res, T_map_body, stamp)
        latency_ms = (self.get_clock().now().nanoseconds - stamp) * 1e-6
        with self._lock:
            self._stats.last_latency_ms = latency_ms
        level = WARN if (res.status == Status.DEGENERATE or tf_note) else OK
        text = ("localized" if res.status == Status.OK else f"localized, degenerate: {res.message}") + tf_note
        self._set_status(level, text, "processed", "localized", "published")

    def _frame_failed(self, reason: str, count_failed: bool = True, processed: bool = False) -> None:
        self.get_logger().warning(reason, throttle_duration_sec=2.0)
        counters = ("failed" if count_failed else "skipped",) + (("processed",) if processed else ())
        self._set_status(ERROR, reason, *counters)

    def _not_localized(self, reason: str) -> None:
        self._set_status(WARN, reason, "processed", "not_localized")

    # ------------------------------------------------------------------ map
    def _load_map(self, path: str) -> Tuple[bool, str]:
        """Load a map; on failure keep the previous one (if any). Returns (success, message)."""
        from reloc_ros.localizer import Localizer

        with self._map_lock:
            with self._lock:
                self._map_loading = path
            if not path:
                ok, msg = False, "map_path is empty: set it and call ~/reload_map"
            else:
                try:
                    t0 = time.monotonic()
                    loc = Localizer.from_map(path, self._loc_cfg)
                    ok = True
                    msg = (f"loaded map '{path}' ({loc.kmap.num_keyframes} keyframes) in "
                           f"{time.monotonic() - t0:.1f} s")
                except Exception as e:  # MapError or anything a bad file causes: the node stays up
                    ok, msg = False, f"cannot load map '{path}': {type(e).__name__}: {e}"
            with self._lock:
                self._map_loading = ""
            if ok:
                with self._lock:
                    self._localizer = loc
                    self._map_path_loaded = path
                    self._map_error = ""
                    self._seed_pending = True
                self.get_logger().info(msg)
                self._set_status(OK, msg)
            else:
                with self._lock:
                    had = self._localizer is not None
                    if had:
                        msg += f" (still using '{self._map_path_loaded}')"
                    else:
                        self._map_error = msg
                self.get_logger().error(msg)
                self._set_status(WARN if had else ERROR, msg)
            return ok, msg

    # ------------------------------------------------------------------ services
    def _srv_trigger(self, request, response):
        with self._lock:
            if self._localizer is None:
                response.success, response.message = False, f"no map loaded: {self._map_error}"
            elif not self._enabled:
                response.success, response.message = False, "node is disabled: call ~/enable true first"
            else:
                self._trigger_pending = True
                self._seed_pending = True
                response.success, response.message = True, "the next frame will be localized"
        return response

    def _srv_enable(self, request, response):
        with self._lock:
            was = self._enabled
            self._enabled = bool(request.data)
            if self._enabled and not was:
                self._seed_pending = True
            if not self._enabled:
                self._pending = None  # a disabled node must not publish a frame taken before
        response.success = True
        response.message = "enabled" if request.data else "disabled"
        self._set_status(OK if request.data else WARN, f"{response.message} by ~/enable")
        return response

    def _srv_reload(self, request, response):
        path = str(self.get_parameter("map_path").value)
        response.success, response.message = self._load_map(path)
        return response

    # ------------------------------------------------------------------ outputs
    def _publish_tf(self, tf: Tuple[np.ndarray, str, str], stamp_ns: int) -> None:
        T, parent, child = tf
        with self._lock:
            self._last_tf = tf
        self._tf_pub.publish(TFMessage(transforms=[matrix_to_transform_stamped(T, parent, child, stamp_ns)]))

    def _rebroadcast_tf(self) -> None:
        with self._lock:
            tf = self._last_tf
        if tf is None:
            return
        stamp = self.get_clock().now().nanoseconds + int(self.p.transform_tolerance * 1e9)
        T, parent, child = tf
        self._tf_pub.publish(TFMessage(transforms=[matrix_to_transform_stamped(T, parent, child, stamp)]))

    def _publish_markers(self, loc, res, T_map_body: np.ndarray, stamp: int) -> None:
        arr = MarkerArray()
        delete = Marker()
        delete.action = Marker.DELETEALL
        arr.markers.append(delete)
        poses = [(np.asarray(loc.kmap.T_world_cam[k]), "keyframes", (0.1, 0.8, 0.1)) for k in res.keyframe_ids]
        poses.append((np.asarray(res.T_world_cam), "estimate", (0.9, 0.1, 0.1)))
        for i, (T, ns, rgb) in enumerate(poses):
            m = Marker()
            m.header.frame_id = self._map_frame
            m.header.stamp = ns_to_stamp(stamp)
            m.ns, m.id, m.type, m.action = ns, i, Marker.ARROW, Marker.ADD
            c, z = T[:3, 3], T[:3, 2]  # camera centre and optical axis
            m.points = [Point(x=float(c[0]), y=float(c[1]), z=float(c[2])),
                        Point(x=float(c[0] + 0.25 * z[0]), y=float(c[1] + 0.25 * z[1]), z=float(c[2] + 0.25 * z[2]))]
            m.scale.x, m.scale.y, m.scale.z = 0.02, 0.04, 0.05
            m.color.r, m.color.g, m.color.b, m.color.a = rgb[0], rgb[1], rgb[2], 1.0
            m.pose.orientation.w = 1.0
            arr.markers.append(m)
        self._marker_pub.publish(arr)

    def _set_status(self, level: int, message: str, *counters: str) -> None:
        """Set the latest event's status and count it, atomically, so a diagnostics message never
        shows a frame counted with the previous frame's reason."""
        with self._lock:
            self._level, self._message = level, message
            for c in counters:
                setattr(self._stats, c, getattr(self._stats, c) + 1)
        self._publish_diagnostics(only_if_changed=True)

    def _summary(self) -> Tuple[int, str]:
        """Overall level and reason: a persistent condition (no map, stalled input, disabled) wins,
        with the latest event's reason appended so a bad frame is never hidden behind it."""
        now = time.monotonic()
        cond: Optional[Tuple[int, str]] = None
        if self._localizer is None and self._map_loading:
            cond = (WARN, f"loading map '{self._map_loading}'")
        elif self._localizer is None:
            cond = (ERROR, f"no map loaded: {self._map_error}")
        elif self.p.input_timeout > 0 and now - (self._last_image_mono or self._start_mono) > self.p.input_timeout:
            since = now - (self._last_image_mono or self._start_mono)
            cond = (WARN, f"no image received on {self.resolve_topic_name(self._image_topic)} for {since:.1f} s")
        elif not self._enabled:
            cond = (WARN, "disabled by ~/enable")
        if cond is None:
            return self._level, self._message
        if self._level != OK and self._message and self._message not in cond[1] and cond[1] not in self._message:
            return max(cond[0], self._level), f"{cond[1]}; last event: {self._message}"
        return cond

    def diagnostics_status(self) -> DiagnosticStatus:
        """The current diagnostic status (what /diagnostics carries)."""
        with self._lock:
            level, message = self._summary()
            s = self._stats
            loc = self._localizer
            values = {
                "status": _LEVEL_NAME[level],
                "last_result": s.last_status,
                "last_latency_ms": f"{s.last_latency_ms:.1f}",
                "last_localize_ms": f"{s.last_localize_ms:.1f}",
                "last_queue_ms": f"{s.last_queue_ms:.1f}",
                "last_inliers": str(s.last_inliers),
                "last_confidence": f"{s.last_confidence:.3f}",
                "keyframes_used": " ".join(str(k) for k in s.last_keyframes),
                "map_path": self._map_path_loaded,
                "map_keyframes": str(loc.kmap.num_keyframes) if loc is not None else "0",
                "frames_received": str(s.received),
                "frames_dropped": str(s.dropped),
                "frames_skipped": str(s.skipped),
                "frames_failed": str(s.failed),
                "frames_processed": str(s.processed),
                "frames_localized": str(s.localized),
                "frames_not_localized": str(s.not_localized),
                "poses_published": str(s.published),
                "enabled": str(self._enabled).lower(),
                "processing_mode": self.p.processing_mode,
                "camera_info_received": str(self._camera_info is not None).lower(),
                "tf_backend": self._tf_backend,
            }
        st = DiagnosticStatus(level=level, name=f"{self.get_name()}: localization", message=message,
                              hardware_id="reloc_ros")
        st.values = [KeyValue(key=k, value=v) for k, v in values.items()]
        return st

    def _publish_diagnostics(self, only_if_changed: bool = False) -> None:
        st = self.diagnostics_status()
        key = (int.from_bytes(st.level, "little") if isinstance(st.level, bytes) else int(st.level), st.message)
        with self._lock:
            if only_if_changed and key == self._last_diag_key:
                return
            self._last_diag_key = key
        arr = DiagnosticArray()
        arr.header.stamp = self.get_clock().now().to_msg()
        arr.status = [st]
        self._diag_pub.publish(arr)

    def shutdown(self) -> None:
        """Stop the worker (waits for the frame in progress, at most 5 s)."""
        self._stop.set()
        with self._lock:
            self._frame_cond.notify_all()
            self._info_cond.notify_all()
        self._worker.join(timeout=5.0)


def main(args=None) -> int:
    """Console script ``reloc_node``: run the node until SIGINT/SIGTERM. Exit 2 on bad parameters.

    Shutdown is ordered by hand (rclpy's own signal handler invalidates the context
    first): stop the worker while publishers still work, then the executor, then the
    node and the context, so no callback ever publishes into a dead context.
    """
    rclpy.init(args=args, signal_handler_options=SignalHandlerOptions.NO)
    try:
        node = RelocNode()
    except ConfigError as e:
        print(f"reloc_node: invalid parameters: {e}", file=sys.stderr)
        rclpy.try_shutdown()
        return 2
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    executor = MultiThreadedExecutor(num_threads=4)
    executor.add_node(node)
    spinner = threading.Thread(target=executor.spin, name="executor", daemon=True)
    spinner.start()
    try:
        while not stop.wait(0.2) and spinner.is_alive():
            pass
    finally:
        node.shutdown()
        executor.shutdown(timeout_sec=5.0)
        spinner.join(timeout=5.0)
        node.destroy_node()
        rclpy.try_shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
