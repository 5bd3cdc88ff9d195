"""``reloc_node``: the ROS 2 adapter of the localization core (no localization logic here).

Subscribes (relative names, so users remap them):
  ``image`` (sensor_msgs/Image) or ``image/compressed`` (CompressedImage), ``camera_info``.
  With ``cameras`` (a multi-camera rig): ``<name>/image`` (or ``<name>/image/compressed``)
  and ``<name>/camera_info`` per camera instead; frames are grouped into captures by stamp
  (reloc_ros.sync) and each capture gives one body pose (reloc_ros.rig.RigLocalizer), fed
  to the same tracker and outputs as a single camera's fix.
  ``initialpose_topic`` (operator reset, unless amcl_seeding) and ``hint_topic``
  (geometry_msgs/PoseWithCovarianceStamped, read in their header frame through TF).
Publishes:
  ``~/pose`` geometry_msgs/PoseWithCovarianceStamped: the FUSED pose of ``base_frame`` (or
  of the camera when ``base_frame`` is empty) in ``map_frame`` at the image stamp, from
  the tracker state (reloc_ros.tracking: fixes fused through odometry, gated, averaged),
  with the state's covariance; published for each processed frame while tracking.
  ``~/pose_raw``: every per-frame fix (OK or DEGENERATE), same frames, its own covariance.
  ``/tf``: map->odom (REP-105) from the tracker state only, or map->base (no odometry);
  re-broadcast at ``tf_publish_rate`` stamped now + ``transform_tolerance``, never older
  than a transform already sent, and not at all before initialisation, while disabled or
  after a map reload until the new map has initialised the state.
  ``/diagnostics``: OK/WARN/ERROR with the reason, counters and the tracker's state.
  ``~/markers`` (optional) and ``initialpose_topic`` (AMCL seeding mode).
Services: ``~/trigger`` (std_srvs/Trigger), ``~/enable`` (std_srvs/SetBool),
``~/reload_map`` (std_srvs/Trigger).

A plain node by default: it must come up and report on /diagnostics even when the map is
missing or corrupt, and recover through ``~/reload_map`` without a lifecycle manager;
``~/enable`` and ``~/reload_map`` give the run-time control a lifecycle would. Stacks with a
lifecycle manager (Nav2) run the managed variant, ``reloc_lifecycle_node``
(reloc_ros.ros.lifecycle_node), built from the same ``RelocCore``.

The image callback only stores the newest message (rig: the newest released capture);
one worker thread decodes and localizes it, so a slow estimator never builds a backlog
(replaced frames are counted as dropped).
"""
from __future__ import annotations

import signal
import sys
import threading
from collections import OrderedDict
import time
import traceback
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

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

from reloc_ros.ros.conversions import (MessageConversionError, image_and_camera, matrix_to_transform_stamped,
                                       ns_to_stamp, pose_with_covariance_stamped, pose_with_covariance_to_numpy,
                                       stamp_to_ns)
from reloc_ros.geometry import invert
from reloc_ros.ros.frames import camera_to_body, covariance_is_usable, floor_covariance
from reloc_ros.ros.params import NodeParams, declare_params
from reloc_ros.ros.tf_buffer import TfLookupError, make_tf_lookup
from reloc_ros.sync import Capture, CaptureSynchronizer
from reloc_ros.tracking import Fix, PoseTracker, TrackState
from reloc_ros.types import RelocError, Status

# Once CameraInfo arrives paired with images (same stamp), how long a frame waits for its
# pair: drivers send both within milliseconds, and a missing pair must not stall the worker.
_INFO_PAIR_WAIT_S = 0.1

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
    unordered_stamps: int = 0  # images whose stamp did not advance (zero / repeated / backwards)
    info_unpaired: int = 0  # frames whose paired CameraInfo never came (latest used)
    stale_results: int = 0  # results discarded because the map was reloaded meanwhile
    hints: int = 0
    last_retrieval: str = ""


@dataclass
class _RigCam:
    """Inputs and last outcome of one camera of a rig (parameter ``cameras``)."""

    name: str
    compressed: bool
    image_topic: str  # relative: '<name>/image' or '<name>/image/compressed'
    info_topic: str
    latest_info: Optional[CameraInfo] = None
    infos: "OrderedDict[int, CameraInfo]" = field(default_factory=OrderedDict)  # recent, by stamp
    info_waited: bool = False  # its first CameraInfo was waited for once
    tf_missing: bool = False  # its extrinsic was missing at the last capture: do not wait for it again
    received: int = 0
    captures_missing: int = 0  # captures released without a frame of this camera
    captures_excluded: int = 0  # captures in which its frame was unusable (CameraInfo, TF, image)
    state: str = ""  # in the last processed capture: used, no_inliers, no_features, excluded, missing
    reason: str = ""
    inliers: int = 0


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


class RelocCore:
    """The node's logic, independent of how its ROS entities come and go.

    Shared by ``RelocNode`` (plain node: everything at construction, the map loaded by the
    worker so the node is up at once) and ``reloc_ros.ros.lifecycle_node.RelocLifecycleNode``
    (managed node: the same pieces created by the lifecycle transitions). Used as a mixin
    before ``rclpy.node.Node`` (or ``LifecycleNode``) in the bases.
    """

    def _setup_params(self, p: NodeParams) -> None:
        """Take validated parameters and build the configs; ConfigError if they are unusable."""
        try:
            from reloc_ros.localizer import LocalizerConfig

            self._loc_cfg = LocalizerConfig.from_dict(p.localizer_config_dict())
            self._tracker_cfg = p.tracker_config()
            self._rig_cfg = p.rig_config() if p.cameras else None
        except ValueError as e:
            raise ConfigError(str(e)) from None
        self.p: NodeParams = p

    def _setup_state(self) -> None:
        """Run-time state (no ROS entities); called once per configuration."""
        p = self.p
        from reloc_ros.threads import default_threads, limit_threads

        self._num_threads = p.num_threads or default_threads()
        self._threads = limit_threads(self._num_threads)
        self._compressed = p.image_transport == "compressed"
        self._map_frame = p.map_frame.strip("/")
        self._odom_frame = p.odom_frame.strip("/")
        self._base_frame = p.base_frame.strip("/")
        self._image_topic = "image/compressed" if self._compressed else "image"
        # Multi-camera rig (parameter `cameras`): frames grouped into captures by stamp, one
        # body pose per capture from reloc_ros.rig.RigLocalizer.
        self._rig_names: List[str] = list(p.cameras)
        self._cams: Dict[str, _RigCam] = {}
        for i, name in enumerate(self._rig_names):
            comp = p.camera_transport(i) == "compressed"
            self._cams[name] = _RigCam(name, comp, f"{name}/image" + ("/compressed" if comp else ""),
                                       f"{name}/camera_info")
        self._sync = (CaptureSynchronizer(self._rig_names, p.rig_sync_window, p.rig_timeout)
                      if self._rig_names else None)
        # the worker polls the synchronizer while idle, so a capture missing a camera leaves on time
        self._idle_wait = min(0.2, max(p.rig_timeout / 2, 0.01)) if self._sync is not None else 0.2
        self._rig_loc = None  # RigLocalizer sharing the loaded Localizer (worker only)

        self._lock = threading.Lock()
        self._frame_cond = threading.Condition(self._lock)
        self._info_cond = threading.Condition(self._lock)
        self._map_lock = threading.Lock()  # serialises map loads (start-up and ~/reload_map)
        self._swap_lock = threading.Lock()  # a frame's outputs vs. swapping in a new map
        self._stop = threading.Event()
        self._worker: Optional[threading.Thread] = None
        self._pending: Optional[Tuple[object, float]] = None
        self._camera_info: Optional[CameraInfo] = None
        self._infos: "OrderedDict[int, CameraInfo]" = OrderedDict()  # recent CameraInfo by stamp
        self._info_synced = False  # seen a CameraInfo with an image's exact stamp
        self._stats = _Stats()
        self._enabled = True
        self._trigger_pending = False
        self._seed_pending = True
        self._last_accepted_stamp: Optional[int] = None
        self._last_accepted_mono: Optional[float] = None
        self._last_image_mono: Optional[float] = None
        self._start_mono = time.monotonic()
        self._localizer = None
        self._map_path_loaded = ""
        self._map_error = "not loaded yet"
        self._map_loading = ""  # path of a map being loaded
        self._level, self._message = OK, "starting"
        self._last_diag_key: Optional[Tuple[int, str]] = None
        self._tf_out: Optional[Tuple[np.ndarray, str, str]] = None  # what the TF timer broadcasts
        self._tf_sent_ns: Optional[int] = None  # stamp of the newest transform sent
        self._tf_allowed = True  # False while a managed node is inactive: /tf must stay silent
        self._map_generation = 0  # bumped by every successful map load
        # The tracker is only touched under _track_lock (worker, hint callbacks, reload).
        self._track_lock = threading.Lock()
        self._tracker = PoseTracker(self._tracker_cfg, odometry=p.tf_mode != "map_to_base")
        self._hint: Optional[Tuple[np.ndarray, np.ndarray, float]] = None  # T_map_body, cov, expiry (mono)
        self._last_innovation = float("nan")
        self._last_decision = ""
        self._fused_std = float("nan")
        self._io_group = ReentrantCallbackGroup()
        self._timer_group = MutuallyExclusiveCallbackGroup()
        self._outputs: list = []  # (destroy function, entity) of _create_outputs
        self._inputs: list = []  # (destroy function, entity) of _create_inputs
        self._tf_timer = None
        if not hasattr(self, "_lookup"):
            self._lookup, self._tf_backend = None, "none"

    def _create_outputs(self, make_publisher) -> None:
        """Publishers (made by ``make_publisher(type, topic, qos)``), services and the diagnostics
        timer. /diagnostics always uses a plain publisher, so a managed node that is not active
        still reports why."""
        p = self.p
        srv_group = MutuallyExclusiveCallbackGroup()
        reload_group = MutuallyExclusiveCallbackGroup()  # a map load takes seconds: ~/enable must still answer
        pose_qos = QoSProfile(depth=1, history=HistoryPolicy.KEEP_LAST, reliability=ReliabilityPolicy.RELIABLE,
                              durability=DurabilityPolicy.TRANSIENT_LOCAL)  # latched like amcl_pose
        tf_qos = QoSProfile(depth=100, history=HistoryPolicy.KEEP_LAST, reliability=ReliabilityPolicy.RELIABLE,
                            durability=DurabilityPolicy.VOLATILE)  # tf2_ros broadcaster QoS

        def pub(msg_type, topic, qos):
            entity = make_publisher(msg_type, topic, qos)
            self._outputs.append((self._destroy_publisher, entity))
            return entity

        self._pose_pub = pub(PoseWithCovarianceStamped, "~/pose", pose_qos)
        self._raw_pub = pub(PoseWithCovarianceStamped, "~/pose_raw", 10)
        self._tf_pub = pub(TFMessage, "/tf", tf_qos) if p.tf_mode != "none" else None
        self._diag_pub = self.create_publisher(DiagnosticArray, "/diagnostics", 10)
        self._outputs.append((self.destroy_publisher, self._diag_pub))
        self._marker_pub = pub(MarkerArray, "~/markers", 1) if p.publish_markers else None
        self._seed_pub = pub(PoseWithCovarianceStamped, p.initialpose_topic, 10) if p.amcl_seeding else None
        for srv_type, name, cb, group in ((Trigger, "~/trigger", self._srv_trigger, srv_group),
                                          (SetBool, "~/enable", self._srv_enable, srv_group),
                                          (Trigger, "~/reload_map", self._srv_reload, reload_group)):
            self._outputs.append((self.destroy_service, self.create_service(srv_type, name, cb, callback_group=group)))
        timer = self.create_timer(p.diagnostics_period, self._publish_diagnostics, callback_group=self._timer_group)
        self._outputs.append((self.destroy_timer, timer))

    def _destroy_publisher(self, publisher) -> None:
        destroy = getattr(self, "destroy_lifecycle_publisher", None)
        if destroy is not None and publisher in getattr(self, "_managed_entities", ()):
            destroy(publisher)
        else:
            self.destroy_publisher(publisher)

    def _create_inputs(self) -> None:
        """Subscriptions (images, camera_info, hints), the TF listener (once) and the TF timer."""
        p = self.p
        img_qos = _image_qos(p)
        io_group = self._io_group

        def sub(msg_type, topic, cb, qos):
            self._inputs.append((self.destroy_subscription,
                                 self.create_subscription(msg_type, topic, cb, qos, callback_group=io_group)))

        if self._cams:
            for c in self._cams.values():
                sub(CompressedImage if c.compressed else Image, c.image_topic,
                    lambda m, n=c.name: self._on_rig_image(n, m), img_qos)
                sub(CameraInfo, c.info_topic, lambda m, n=c.name: self._on_rig_info(n, m), img_qos)
        else:
            sub(CompressedImage if self._compressed else Image, self._image_topic, self._on_image, img_qos)
            sub(CameraInfo, "camera_info", self._on_camera_info, img_qos)
        if self._lookup is None:
            # kept for the node's life: the buffer must hold odom->base history before the first frame
            self._lookup, self._tf_backend = make_tf_lookup(self, io_group)
        hint_qos = QoSProfile(depth=1, history=HistoryPolicy.KEEP_LAST, reliability=ReliabilityPolicy.RELIABLE,
                              durability=DurabilityPolicy.VOLATILE)
        if not p.amcl_seeding and p.initialpose_topic.strip():
            sub(PoseWithCovarianceStamped, p.initialpose_topic, lambda m: self._on_hint(m, reset=True), hint_qos)
        if p.hint_topic.strip():
            sub(PoseWithCovarianceStamped, p.hint_topic, lambda m: self._on_hint(m, reset=False), hint_qos)
        with self._lock:
            self._tf_allowed = True
        if self._tf_pub is not None and p.tf_publish_rate > 0:
            self._tf_timer = self.create_timer(1.0 / p.tf_publish_rate, self._send_tf,
                                               callback_group=self._timer_group)

    def _stop_tf(self) -> None:
        """Stop /tf at once: nothing held, nothing re-broadcast, no new fix may set it again."""
        with self._lock:
            self._tf_allowed = False
            self._tf_out = None
        if self._tf_timer is not None:
            self.destroy_timer(self._tf_timer)
            self._tf_timer = None

    def _destroy_inputs(self) -> None:
        self._stop_tf()
        for destroy, entity in self._inputs:
            destroy(entity)
        self._inputs = []

    def _destroy_outputs(self) -> None:
        for destroy, entity in self._outputs:
            destroy(entity)
        self._outputs = []

    def _log_config(self) -> None:
        p = self.p
        if self._cams:
            inputs = ("rig of " + ", ".join(f"{self.resolve_topic_name(c.image_topic)}" for c in self._cams.values())
                      + f" (sync window {p.rig_sync_window} s, timeout {p.rig_timeout} s, qos {p.image_qos})")
        else:
            inputs = f"{self.resolve_topic_name(self._image_topic)} ({p.image_transport}, qos {p.image_qos})"
        self.get_logger().info(
            f"reloc_node: map_path='{p.map_path}', estimator={p.estimator}, top_k={p.top_k}, "
            f"input={inputs}, "
            f"tf_mode={p.tf_mode}, processing={p.processing_mode} (max_rate {p.max_rate} Hz), "
            f"tf backend {self._tf_backend}, threads {self._threads}")

    def _start_worker(self, load_map: bool) -> None:
        """Start the worker thread; with load_map it first loads map_path (the plain node's start)."""
        self._stop.clear()
        self._worker = threading.Thread(target=self._work, args=(load_map,), name="reloc_worker", daemon=True)
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
        with self._lock:
            self._stats.received += 1
            self._last_image_mono = recv
            self._accept_locked(stamp, msg, recv)

    def _on_rig_info(self, name: str, msg: CameraInfo) -> None:
        with self._lock:
            c = self._cams[name]
            c.latest_info = msg
            c.infos[stamp_to_ns(msg.header.stamp)] = msg
            while len(c.infos) > 30:
                c.infos.popitem(last=False)
            self._info_cond.notify_all()

    def _on_rig_image(self, name: str, msg) -> None:
        """Add a rig camera's frame to the synchronizer; a released capture is handed to the
        worker like a single frame (newest only). Never blocks on the localizer."""
        recv = time.monotonic()
        with self._lock:
            self._stats.received += 1
            self._cams[name].received += 1
            self._last_image_mono = recv
            self._take_captures_locked(self._sync.add(name, stamp_to_ns(msg.header.stamp), msg, recv))

    def _take_captures_locked(self, captures: Sequence[Capture]) -> None:
        for cap in captures:  # in stamp order: the newest accepted one ends up pending
            for n in cap.missing:
                self._cams[n].captures_missing += 1
            self._accept_locked(cap.stamp_ns, cap, cap.first_arrival)

    def _accept_locked(self, stamp: int, item, recv: float) -> None:
        """Make a frame (or rig capture) the pending one unless disabled, untriggered or throttled."""
        p = self.p
        s = self._stats
        if not self._enabled:
            s.skipped += 1
            return
        if p.processing_mode == "trigger" and not self._trigger_pending:
            s.skipped += 1
            return
        last = self._last_accepted_stamp
        if last is not None and stamp <= last and last - stamp < 1e9:
            s.unordered_stamps += 1  # zero or repeated stamps: throttle on arrival time instead
        if (p.processing_mode == "continuous" and p.max_rate > 0 and not self._trigger_pending
                and last is not None and self._throttled(stamp, last, recv)):
            s.skipped += 1
            return
        self._trigger_pending = False
        self._last_accepted_stamp = stamp
        self._last_accepted_mono = recv
        if self._pending is not None:
            s.dropped += 1
        self._pending = (item, recv)
        self._frame_cond.notify()

    def _throttled(self, stamp: int, last: int, recv_mono: float) -> bool:
        """max_rate on stamp time, so a replayed bag throttles the same way; on arrival time
        when stamps do not advance (zero or repeated stamps must not stall processing); a
        jump back of more than a second (bag loop, sim restart) starts afresh."""
        period_ns = 1e9 / self.p.max_rate
        if stamp > last:
            return stamp - last < period_ns
        if last - stamp >= 1e9:
            return False
        return (recv_mono - (self._last_accepted_mono or 0.0)) * 1e9 < period_ns

    def _on_hint(self, msg: PoseWithCovarianceStamped, reset: bool) -> None:
        """A pose hint for the body, in its header frame: transformed to the map through TF."""
        p = self.p
        kind = "initial pose" if reset else "hint"
        frame = (msg.header.frame_id or "").strip("/")
        stamp = stamp_to_ns(msg.header.stamp)
        try:
            T_f_body, cov = pose_with_covariance_to_numpy(msg)
            if not frame:
                raise MessageConversionError("header.frame_id is empty: a hint must name its frame")
            if frame == self._map_frame:
                T_map_f = np.eye(4)
            else:
                T_map_f = self._lookup(self._map_frame, frame, stamp, p.tf_timeout)
            T_odom_base = None
            if p.tf_mode != "map_to_base":
                try:
                    T_odom_base = self._lookup(self._odom_frame, self._base_frame, stamp, p.tf_timeout)
                except TfLookupError:
                    # An operator's click is rough and often stamped "now", past the newest
                    # odometry: the latest odometry is as good as it gets.
                    T_odom_base = self._lookup(self._odom_frame, self._base_frame, 0, p.tf_timeout)
        except (MessageConversionError, TfLookupError) as e:
            self._set_status(WARN, f"{kind} ignored: {e}")
            return
        cov = floor_covariance(cov, p.hint_min_position_std, np.radians(p.hint_min_rotation_std_deg))
        R = T_map_f[:3, :3]
        J = np.zeros((6, 6))
        J[:3, :3] = J[3:, 3:] = R  # the covariance was expressed in the header frame's axes
        T_map_body, cov_map = T_map_f @ T_f_body, J @ cov @ J.T
        with self._track_lock:
            d = self._tracker.add_hint(stamp, T_map_body, cov_map, T_odom_base, reset=reset)
            if reset:
                self._hold_tf(None)
        if d.action == "ignored":
            self._set_status(WARN, f"{kind} ignored: {d.message}")
            return
        with self._lock:
            self._hint = (T_map_body, cov_map, time.monotonic() + p.hint_timeout)
            self._stats.hints += 1
        self._set_status(OK, f"{kind} in '{frame}' accepted: {d.message}")

    # ------------------------------------------------------------------ worker
    def _work(self, load_map: bool = True) -> None:
        from reloc_ros.threads import limit_threads

        limit_threads(self._num_threads)  # FAISS's OpenMP limit is per thread
        if load_map:
            self._load_map(self.p.map_path)
        while not self._stop.is_set():
            with self._frame_cond:
                while self._pending is None and not self._stop.is_set():
                    if self._sync is not None:
                        self._take_captures_locked(self._sync.poll(time.monotonic()))
                        if self._pending is not None:
                            break
                    self._frame_cond.wait(self._idle_wait)
                item, self._pending = self._pending, None
            if item is not None and not self._stop.is_set():
                try:
                    if isinstance(item[0], Capture):
                        self._process_capture(*item)
                    else:
                        self._process(*item)
                except Exception as e:  # the worker must survive anything a frame can cause
                    if self._stop.is_set():
                        return  # shutting down: publishers and logger may already be gone
                    self.get_logger().error(f"unexpected error processing a frame: {e}\n{traceback.format_exc()}")
                    self._frame_failed(f"internal error: {type(e).__name__}: {e}")

    def _wait_camera_info(self, stamp: int) -> Optional[CameraInfo]:
        """The CameraInfo for an image: the one with the same stamp when the camera sends them in
        pairs (as drivers do; the two topics arrive in any order, so a frame waits a little for
        its pair), else the latest one. Only the very first CameraInfo is waited for up to
        camera_info_timeout; a pair that does not come within _INFO_PAIR_WAIT_S is given up
        and the latest is used from then on, so a broken pairing never stalls the worker."""
        with self._info_cond:
            latest = self._camera_info
            wait = self.p.camera_info_timeout if latest is None else min(self.p.camera_info_timeout,
                                                                         _INFO_PAIR_WAIT_S)
            deadline = time.monotonic() + wait
            while True:
                info = self._infos.get(stamp)
                if info is not None:
                    self._info_synced = True
                    return info
                latest = self._camera_info
                if latest is not None and (not self._info_synced or stamp_to_ns(latest.header.stamp) >= stamp):
                    return latest
                left = deadline - time.monotonic()
                if left <= 0 or self._stop.is_set():
                    if latest is not None and self._info_synced:
                        self._info_synced = False
                        self._stats.info_unpaired += 1
                    return latest
                self._info_cond.wait(left)

    def _process(self, msg, recv_mono: float) -> None:
        p = self.p
        start = time.monotonic()
        stamp = stamp_to_ns(msg.header.stamp)
        with self._lock:
            self._stats.last_queue_ms = (start - recv_mono) * 1e3
        try:
            # the CameraInfo first: the image size is checked against it before decoding
            image, camera = image_and_camera(msg, self._compressed, self._wait_camera_info(stamp),
                                             p.max_image_pixels)
        except MessageConversionError as e:
            self._frame_failed(f"bad input: {e}")
            return
        with self._lock:
            loc, generation = self._localizer, self._map_generation
        if loc is None:
            self._frame_failed(f"no map loaded: {self._map_error}", count_failed=False)
            return

        cam_frame = (p.camera_frame or msg.header.frame_id).strip("/")
        body_frame = self._base_frame or cam_frame
        T_base_cam = np.eye(4)
        if self._base_frame and self._base_frame != cam_frame:
            if not cam_frame:
                self._frame_failed("image header has no frame_id and camera_frame is not set", processed=True)
                return
            try:
                T_base_cam = self._lookup(self._base_frame, cam_frame, stamp, p.tf_timeout)
            except TfLookupError as e:
                self._not_localized(f"no TF {self._base_frame} <- {cam_frame} at the image stamp: {e}")
                return
        T_odom_base, odom_note = None, ""
        if p.tf_mode != "map_to_base":
            try:
                T_odom_base = self._lookup(self._odom_frame, self._base_frame, stamp, p.tf_timeout)
            except TfLookupError as e:
                odom_note = f"no TF {self._odom_frame} <- {self._base_frame} at the image stamp: {e}"

        prior = self._prior(stamp, T_odom_base, T_base_cam)
        try:
            res = loc.localize(image, camera, prior)
        except RelocError as e:
            self._frame_failed(f"bad input: {e}", processed=True)
            return
        self._publish_result(loc, res, stamp, start, generation, T_base_cam, body_frame, T_odom_base, odom_note)

    def _wait_rig_infos(self, names: Sequence[str]) -> None:
        """Wait (once per camera, at most camera_info_timeout) for the first CameraInfo of the
        capture's cameras that have none yet, as the single-camera path does for its first."""
        with self._info_cond:
            need = [n for n in names if self._cams[n].latest_info is None and not self._cams[n].info_waited]
            if not need:
                return
            deadline = time.monotonic() + self.p.camera_info_timeout
            while any(self._cams[n].latest_info is None for n in need) and not self._stop.is_set():
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._info_cond.wait(left)
            for n in need:
                self._cams[n].info_waited = True

    def _rig_localizer_for(self, loc):
        """The RigLocalizer sharing ``loc`` (map, configuration, extractor); rebuilt after a reload."""
        if self._rig_loc is None or self._rig_loc.localizer is not loc:
            from reloc_ros.rig import RigLocalizer

            self._rig_loc = RigLocalizer(loc.kmap, rig_config=self._rig_cfg, localizer=loc)
        return self._rig_loc

    def _process_capture(self, cap: Capture, recv_mono: float) -> None:
        """One rig capture: per camera CameraInfo, image and extrinsic (TF base_frame <- its
        frame_id at its stamp); a camera whose input is unusable is excluded with the reason
        and the others localize the body. The result takes the single-camera output path
        with the body as the tracked frame."""
        from reloc_ros.rig import CameraView

        p = self.p
        start = time.monotonic()
        stamp = cap.stamp_ns
        with self._lock:
            self._stats.last_queue_ms = (start - recv_mono) * 1e3
            loc, generation = self._localizer, self._map_generation
        if loc is None:
            self._frame_failed(f"no map loaded: {self._map_error}", count_failed=False)
            return
        rig_loc = self._rig_localizer_for(loc)
        self._wait_rig_infos(list(cap.frames))
        base = self._base_frame
        views, excluded = [], {}
        for name in self._rig_names:
            if name not in cap.frames:
                continue
            c = self._cams[name]
            fstamp, msg = cap.frames[name]
            with self._lock:
                info = c.infos.get(fstamp)
                info = c.latest_info if info is None else info
            try:
                if info is None:
                    raise MessageConversionError(f"no CameraInfo received on {self.resolve_topic_name(c.info_topic)}")
                image, camera = image_and_camera(msg, c.compressed, info, p.max_image_pixels)
            except MessageConversionError as e:
                excluded[name] = f"bad input: {e}"
                continue
            frame = (msg.header.frame_id or "").strip("/")
            T_base_cam = np.eye(4)
            if not frame:
                excluded[name] = "image header has no frame_id (needed for the camera's TF extrinsic)"
                continue
            if frame != base:
                try:
                    # a mount known missing is not waited for again: it would delay every capture
                    T_base_cam = self._lookup(base, frame, fstamp, 0.0 if c.tf_missing else p.tf_timeout)
                    c.tf_missing = False
                except TfLookupError as e:
                    c.tf_missing = True
                    excluded[name] = f"no TF {base} <- {frame} (camera extrinsic) at the image stamp: {e}"
                    continue
            views.append(CameraView(name, image, camera, T_base_cam, fstamp * 1e-9))
        T_odom_base, odom_note = None, ""
        if p.tf_mode != "map_to_base":
            try:
                T_odom_base = self._lookup(self._odom_frame, base, stamp, p.tf_timeout)
            except TfLookupError as e:
                odom_note = f"no TF {self._odom_frame} <- {base} at the capture stamp: {e}"
        res = None
        if views:
            res = rig_loc.localize(views, self._prior(stamp, T_odom_base, np.eye(4)))
        reports = {r.name: r for r in (res.cameras if res is not None else [])}
        notes, warn = [], False
        with self._lock:
            for name in self._rig_names:
                c = self._cams[name]
                r = reports.get(name)
                if name not in cap.frames:
                    c.state, c.reason, c.inliers = "missing", "no frame in this capture", 0
                elif name in excluded:
                    c.state, c.reason, c.inliers = "excluded", excluded[name], 0
                elif r is not None:
                    c.state, c.reason, c.inliers = r.state, r.warning or r.reason, r.inliers
                if c.state == "excluded":
                    c.captures_excluded += 1
                    notes.append(f"camera '{name}' excluded: {c.reason}")
                    warn = True
                elif r is not None and r.warning:
                    notes.append(f"camera '{name}': {r.warning}")
                    warn = True
        if res is None:
            self._frame_failed("no usable camera in the capture: " + "; ".join(notes), processed=True)
            return
        lres = res.as_localization_result()
        lres.retrieval = res.retrieval
        if res.status != Status.ERROR:
            used = ", ".join(res.used_cameras) or "none"
            notes.insert(0, f"cameras used: {used} ({res.method})")
        self._publish_result(loc, lres, stamp, start, generation, np.eye(4), base, T_odom_base, odom_note,
                             notes, warn)

    def _publish_result(self, loc, res, stamp: int, start: float, generation: int, T_base_cam: np.ndarray,
                        body_frame: str, T_odom_base: Optional[np.ndarray], odom_note: str,
                        notes_extra: Sequence[str] = (), warn_extra: bool = False) -> None:
        """Everything after the core's estimate, shared by single frames and rig captures:
        counters, ~/pose_raw, the tracker, ~/pose, /tf and the status. ``res`` is a
        LocalizationResult whose T_world_cam is the camera pose (``T_base_cam`` moves it to
        ``body_frame``); a rig's result holds the body pose with T_base_cam = I.
        notes_extra / warn_extra: what the status adds (a rig camera excluded: WARN)."""
        p = self.p
        # A map swap waits for this frame's outputs (milliseconds), so nothing computed on the
        # old map is published after the new one is in place.
        with self._swap_lock:
            with self._lock:
                stale = generation != self._map_generation
                s = self._stats
                s.last_localize_ms = float(res.timings_ms.get("total", (time.monotonic() - start) * 1e3))
                s.last_inliers = int(sum(res.inliers)) if res.inliers else 0
                s.last_keyframes = tuple(int(k) for k in res.keyframe_ids)
                s.last_confidence = float(res.confidence)
                s.last_status = res.status.value
                s.last_retrieval = res.retrieval
                if stale:
                    s.stale_results += 1
            if stale:
                self._not_localized("result discarded: the map was reloaded while this frame was processed")
                return
            if res.status == Status.ERROR:
                self._frame_failed(f"localizer rejected the input: {res.message}", processed=True)
                return
            if res.localized and not covariance_is_usable(res.covariance):
                self._frame_failed("localizer returned an unusable covariance (not finite / not PSD / all zeros)",
                                   processed=True)
                return

            raw_note, decision = "", None
            if res.localized:
                T_map_body, cov = camera_to_body(res.T_world_cam, res.covariance, T_base_cam)
                self._raw_pub.publish(pose_with_covariance_stamped(T_map_body, cov, self._map_frame, stamp))
                if p.tf_mode != "map_to_base" and T_odom_base is None:
                    raw_note = f"fix not fused: {odom_note}"
                else:
                    decision = self._fuse(Fix(stamp, T_map_body, cov, res.status, float(res.confidence)),
                                          T_odom_base)
            else:
                raw_note = f"not localized: {res.message or res.status.value}"
                with self._track_lock:
                    self._tracker.check_lost(stamp)

            with self._track_lock:
                state = self._tracker.state
                pred = self._tracker.predict(stamp, T_odom_base) if (T_odom_base is not None or
                                                                     p.tf_mode == "map_to_base") else None
                # the state itself: map->odom moves only when a fix changes the state (with
                # TrackerConfig.odom_bias, ~/pose and the map->odom sent on /tf also carry the bias
                # correction between fixes: _bias_corrected_map_odom)
                T_map_odom = self._tracker.T_map_odom
            published = state == TrackState.TRACKING and pred is not None
            if published:
                T_fused, cov_fused = pred
                pose_msg = pose_with_covariance_stamped(T_fused, cov_fused, self._map_frame, stamp)
                self._pose_pub.publish(pose_msg)
                with self._lock:
                    self._fused_std = float(np.sqrt(max(np.linalg.eigvalsh(cov_fused[:3, :3]).max(), 0.0)))
                    seed = self._seed_pub is not None and self._seed_pending
                    self._seed_pending = False
                if seed:
                    self._seed_pub.publish(pose_msg)
                if self._marker_pub is not None and res.localized:
                    self._publish_markers(loc, res, stamp)
            if p.tf_mode == "map_to_odom" and T_map_odom is not None:
                self._hold_tf((T_map_odom, self._map_frame, self._odom_frame))
            elif p.tf_mode == "map_to_base" and pred is not None:
                self._hold_tf((pred[0], self._map_frame, body_frame))
            latency_ms = (self.get_clock().now().nanoseconds - stamp) * 1e-6
            with self._lock:
                self._stats.last_latency_ms = latency_ms
            if not res.localized:
                self._set_status(WARN, "; ".join([raw_note, *notes_extra]), "processed", "not_localized",
                                 *(("published",) if published else ()))
                return
            level = WARN if warn_extra else OK
            notes = list(notes_extra)
            if res.status == Status.DEGENERATE:
                level = WARN
                notes.append(f"degenerate: {res.message}")
            if raw_note:
                level = WARN
                notes.append(raw_note)
            if decision is not None:
                notes.append(decision[1])
                if decision[0] in ("rejected", "reset", "ignored"):
                    level = WARN
            if state != TrackState.TRACKING:
                level = WARN
                notes.append(f"tracker {state.value}")
            text = "localized" + ("; " + "; ".join(notes) if notes else "")
            counters = ("processed", "localized") + (("published",) if published else ())
            self._set_status(level, text, *counters)

    def _prior(self, stamp: int, T_odom_base: Optional[np.ndarray], T_base_cam: np.ndarray):
        """A retrieval prior for the camera: an unexpired hint, else the tracker's prediction."""
        if not self.p.use_prior:
            return None
        from reloc_ros.localizer import PosePrior

        with self._lock:
            hint = self._hint
            if hint is not None and time.monotonic() > hint[2]:
                hint = self._hint = None
        if hint is not None:
            T_map_body, cov = hint[0], hint[1]
        else:
            with self._track_lock:
                if self._tracker.state != TrackState.TRACKING:
                    return None
                pred = self._tracker.predict(stamp, T_odom_base if self.p.tf_mode != "map_to_base" else None)
            if pred is None:
                return None
            T_map_body, cov = pred
        T_map_cam, cov_cam = camera_to_body(T_map_body, cov, invert(T_base_cam))
        return PosePrior(T_map_cam, cov_cam)

    def _fuse(self, fix: Fix, T_odom_base: Optional[np.ndarray]) -> Tuple[str, str]:
        """Feed the tracker; returns (action, what it did and why) for diagnostics."""
        with self._track_lock:
            d = self._tracker.update(fix, T_odom_base)
        text = {"accepted": f"fix accepted (innovation {d.mahalanobis2:.1f} <= {d.gate:.1f})",
                "rejected": f"fix rejected: {d.message}",
                "initialised": f"tracker initialised: {d.message}",
                "reinitialised": f"tracker re-initialised: {d.message}",
                "candidate": f"fix kept as initialisation evidence: {d.message}",
                "ignored": f"fix not fused: {d.message}",
                "reset": f"tracker reset: {d.message}"}.get(d.action, d.action)
        if d.action in ("reinitialised", "rejected", "reset"):
            self.get_logger().warning(text, throttle_duration_sec=1.0)
        with self._lock:
            self._last_decision = text
            if np.isfinite(d.mahalanobis2):
                self._last_innovation = d.mahalanobis2
        return d.action, text

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
                with self._swap_lock:
                    with self._lock:
                        self._localizer = loc
                        self._map_generation += 1
                        self._map_path_loaded = path
                        self._map_error = ""
                        self._seed_pending = True
                        self._hint = None
                    with self._track_lock:
                        # A new map is a new frame: nothing of the old state may survive it.
                        self._tracker.reset()
                        self._hold_tf(None)
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
                self._tf_out = None  # nor keep re-broadcasting a correction nobody maintains
        response.success = True
        response.message = "enabled" if request.data else "disabled"
        self._set_status(OK if request.data else WARN, f"{response.message} by ~/enable")
        return response

    def _srv_reload(self, request, response):
        path = str(self.get_parameter("map_path").value)
        response.success, response.message = self._load_map(path)
        return response

    # ------------------------------------------------------------------ outputs
    def _hold_tf(self, tf: Optional[Tuple[np.ndarray, str, str]]) -> None:
        """Set what /tf carries (None: stop broadcasting) and send a changed transform at once."""
        if self._tf_pub is None:
            return
        with self._lock:
            changed = tf is not None and (self._tf_out is None or not np.array_equal(self._tf_out[0], tf[0]))
            if tf is not None and not (self._enabled and self._tf_allowed):
                return
            self._tf_out = tf
        if changed:
            self._send_tf()

    def _send_tf(self) -> None:
        """Broadcast the held transform stamped now + transform_tolerance (as AMCL does).

        Never sends a stamp at or before one already sent (tf2 rejects or warns about
        those), except after the clock jumped back by more than a second (bag loop, sim
        restart), when the old stamps are meaningless.
        """
        stamp = self.get_clock().now().nanoseconds + int(self.p.transform_tolerance * 1e9)
        with self._lock:
            tf = self._tf_out
            if tf is None:
                return
            last = self._tf_sent_ns
            if last is not None and stamp <= last:
                if last - stamp < 1_000_000_000:
                    return
            self._tf_sent_ns = stamp
        T, parent, child = tf
        if parent == self._map_frame and child == self._odom_frame:
            T = self._bias_corrected_map_odom(T)
        self._tf_pub.publish(TFMessage(transforms=[matrix_to_transform_stamped(T, parent, child, stamp)]))

    def _bias_corrected_map_odom(self, T_map_odom: np.ndarray) -> np.ndarray:
        """With ``TrackerConfig.odom_bias``, map->odom for the latest odometry on /tf: it absorbs
        the odometry's estimated systematic error since the last fix, so map->odom->base is the
        corrected body pose between fixes too. It moves with odometry only, never with a fix
        the gate rejected. Without the option, or when odom->base cannot be looked up now, the
        held transform is sent unchanged."""
        if not self._tracker.config.odom_bias or self._lookup is None:
            return T_map_odom
        try:
            T_odom_base = self._lookup(self._odom_frame, self._base_frame, 0, 0.0)
        except Exception:  # no odometry yet or a broken tree: keep what the state holds
            return T_map_odom
        with self._track_lock:
            T = self._tracker.T_map_odom_at(self.get_clock().now().nanoseconds, T_odom_base)
        return T if T is not None and np.all(np.isfinite(T)) else T_map_odom

    def _publish_markers(self, loc, res, stamp: int) -> None:
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
            where = ("any rig camera (" + ", ".join(self._rig_names) + ")" if self._cams
                     else self.resolve_topic_name(self._image_topic))
            cond = (WARN, f"no image received on {where} for {since:.1f} s")
        elif not self._enabled:
            cond = (WARN, "disabled by ~/enable")
        if cond is None:
            return self._level, self._message
        if self._level != OK and self._message and self._message not in cond[1] and cond[1] not in self._message:
            return max(cond[0], self._level), f"{cond[1]}; last event: {self._message}"
        return cond

    def diagnostics_status(self) -> DiagnosticStatus:
        """The current diagnostic status (what /diagnostics carries)."""
        with self._track_lock:
            tr = self._tracker.summary()
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
                "camera_info_received": str(self._camera_info is not None if not self._cams else
                                            all(c.latest_info is not None for c in self._cams.values())).lower(),
                "tf_backend": self._tf_backend,
                "last_retrieval": s.last_retrieval,
                "image_stamps_not_increasing": str(s.unordered_stamps),
                "camera_info_unpaired": str(s.info_unpaired),
                "results_discarded_map_reloaded": str(s.stale_results),
                "hints_received": str(s.hints),
                "tracker_state": tr["state"],
                "fixes_accepted": str(tr["accepted"]),
                "fixes_rejected": str(tr["rejected"]),
                "fixes_ignored": str(tr["ignored"]),
                "initialisations": str(tr["initialisations"]),
                "reinitialisations": str(tr["reinitialisations"]),
                "tracker_resets": str(tr["resets"]),
                "last_innovation": f"{self._last_innovation:.2f}",
                "innovation_gate": f"{tr['gate']:.2f}",
                "last_fusion": self._last_decision,
                "fused_position_std_m": f"{self._fused_std:.3f}",
                "tf_broadcasting": str(self._tf_out is not None).lower(),
                "threads": str(self._num_threads),
            }
            if self._cams:
                # per rig camera, the outcome in the last processed capture and its input counters
                rel = self._sync.released
                values.update({"rig_cameras": " ".join(self._rig_names),
                               "captures_complete": str(rel["complete"]),
                               "captures_partial": str(sum(rel.values()) - rel["complete"]),
                               "rig_frames_late": str(self._sync.late)})
                for n, c in self._cams.items():
                    values.update({f"camera.{n}.state": c.state, f"camera.{n}.reason": c.reason,
                                   f"camera.{n}.inliers": str(c.inliers),
                                   f"camera.{n}.images_received": str(c.received),
                                   f"camera.{n}.camera_info_received": str(c.latest_info is not None).lower(),
                                   f"camera.{n}.captures_missing": str(c.captures_missing),
                                   f"camera.{n}.captures_excluded": str(c.captures_excluded)})
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
            self._pending = None
        if self._worker is not None:
            self._worker.join(timeout=5.0)
            self._worker = None


class RelocNode(RelocCore, Node):
    """The relocalization node; see the module docstring for its interface."""

    def __init__(self, **node_kwargs) -> None:
        Node.__init__(self, "reloc_node", **node_kwargs)
        try:
            params = declare_params(self)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        self._setup_params(params)
        self._setup_state()
        self._create_outputs(self.create_publisher)
        self._create_inputs()
        self._log_config()
        self._start_worker(load_map=True)


def main(args=None) -> int:
    """Console script ``reloc_node``: run the node until SIGINT/SIGTERM. Exit 2 on bad parameters."""
    return run_node(RelocNode, args)


def run_node(make_node, args=None) -> int:
    """Run ``make_node()`` until SIGINT/SIGTERM; 0 after a clean stop, 2 on a ConfigError.

    Shutdown is ordered by hand (rclpy's own signal handler invalidates the context
    first): stop the worker while publishers still work, then the executor, then the
    node and the context, so no callback ever publishes into a dead context.
    """
    rclpy.init(args=args, signal_handler_options=SignalHandlerOptions.NO)
    try:
        node = make_node()
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
        # a managed node sets `finished` after its shutdown transition: nothing is left to do
        while not stop.wait(0.2) and spinner.is_alive() and not getattr(node, "finished", False):
            pass
        if getattr(node, "finished", False):
            time.sleep(0.5)  # let the shutdown transition's service response go out first
    finally:
        node.shutdown()
        executor.shutdown(timeout_sec=5.0)
        spinner.join(timeout=5.0)
        node.destroy_node()
        rclpy.try_shutdown()
        # Exiting now with 0: a late SIGINT (e.g. launch shutting down right after a lifecycle
        # shutdown) must not hit the default handler during interpreter exit and turn it into -2.
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_IGN)
    return 0


if __name__ == "__main__":
    sys.exit(main())
