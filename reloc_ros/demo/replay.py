"""Replay posed frames to ``reloc_node`` over DDS as a robot would, and check what comes back.

Each frame is sent as sensor_msgs/Image (or CompressedImage) + CameraInfo, with TF
``odom -> base_link`` at the image stamp on ``/tf`` and the camera mount
``base_link -> camera`` on ``/tf_static``. The odometry frame is made to drift from
the map (``true_map_to_odom``), so the node's map->odom is only right when it composes
its estimate with odom->base and base->camera correctly.

Ground truth: a frame's ``T_world_cam`` (camera-to-map) gives
``T_map_base = T_world_cam @ inv(T_base_cam)`` and
``T_odom_base = inv(T_map_odom_true) @ T_map_base``.

Used by ``make demo`` (``python -m reloc_ros.demo.replay``, a separate process from the
node), the end-to-end tests and ``bench/bench_node.py``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np

from reloc_ros.geometry import invert, make_T, pose_errors, so3_exp
from reloc_ros.types import Camera

# Camera mount used by the demo and tests: 0.25 m ahead, 0.05 m right, 0.9 m up of base_link,
# tilted 10 deg down and turned 5 deg left, optical axes (z forward, x right, y down).
_R_BASE_OPTICAL = np.array([[0.0, 0.0, 1.0], [-1.0, 0.0, 0.0], [0.0, -1.0, 0.0]])
DEFAULT_T_BASE_CAM = make_T(so3_exp([0.0, 0.0, np.radians(5.0)]) @ so3_exp([0.0, np.radians(10.0), 0.0])
                            @ _R_BASE_OPTICAL, [0.25, -0.05, 0.9])


def true_map_to_odom(i: int) -> np.ndarray:
    """T_map_odom [4, 4] of frame i: an offset that keeps drifting (1 cm, 0.3 deg per frame)."""
    yaw = np.radians(25.0 + 0.3 * i)
    return make_T(so3_exp([0.0, 0.0, yaw]) @ so3_exp([np.radians(2.0), 0.0, 0.0]),
                  [1.5 + 0.01 * i, -0.7 + 0.005 * i, 0.05])


@dataclass
class Diagnostics:
    """The node's latest /diagnostics status: level 0 OK, 1 WARN, 2 ERROR."""

    level: int
    message: str
    values: Dict[str, str]
    received_mono: float

    def count(self, key: str) -> int:
        return int(self.values.get(key, "0") or 0)

    @property
    def handled(self) -> int:
        """Frames the node has finished with (processed, failed, skipped or dropped)."""
        return sum(self.count(k) for k in ("frames_processed", "frames_failed", "frames_skipped", "frames_dropped"))


@dataclass
class FrameOutcome:
    """What the node did with one replayed frame."""

    index: int
    name: str
    stamp_ns: int
    T_map_base: Optional[np.ndarray] = None  # from ~/pose (fused)
    covariance: Optional[np.ndarray] = None
    T_map_odom: Optional[np.ndarray] = None  # newest map->odom on /tf after ~/pose arrived
    T_map_base_raw: Optional[np.ndarray] = None  # from ~/pose_raw (this frame's own fix)
    covariance_raw: Optional[np.ndarray] = None
    latency_ms: float = float("nan")  # image stamp -> ~/pose received here
    diagnostics: Optional[Diagnostics] = None
    extra: Dict[str, float] = field(default_factory=dict)


class Replayer:
    """An rclpy node in its own context and spin thread that feeds and watches ``reloc_node``.

    reloc_node: the node's fully qualified name (its ~/pose is ``<reloc_node>/pose``).
    image_topic / info_topic: where the node's ``image`` (or ``image/compressed``) and
    ``camera_info`` are remapped to. image_qos: 'sensor_data' or 'reliable'.
    T_base_cam: [4, 4] camera mount published on /tf_static. domain_id: ROS domain
    (None: ROS_DOMAIN_ID).
    """

    def __init__(self, reloc_node: str = "/reloc_node", image_topic: str = "/camera/image_raw",
                 info_topic: str = "/camera/camera_info", compressed: bool = False, image_qos: str = "sensor_data",
                 camera_frame: str = "camera_optical", base_frame: str = "base_link", odom_frame: str = "odom",
                 map_frame: str = "map", T_base_cam: np.ndarray = DEFAULT_T_BASE_CAM,
                 initialpose_topic: Optional[str] = None, domain_id: Optional[int] = None,
                 node_name: str = "reloc_replay") -> None:
        import rclpy
        from diagnostic_msgs.msg import DiagnosticArray
        from geometry_msgs.msg import PoseWithCovarianceStamped
        from rclpy.executors import SingleThreadedExecutor
        from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy, qos_profile_sensor_data
        from sensor_msgs.msg import CameraInfo, CompressedImage, Image
        from tf2_msgs.msg import TFMessage

        self._ctx = rclpy.Context()
        kw = {} if domain_id is None else {"domain_id": int(domain_id)}
        rclpy.init(context=self._ctx, **kw)
        self.node = rclpy.create_node(node_name, context=self._ctx)
        self.compressed = compressed
        self.camera_frame, self.base_frame, self.odom_frame, self.map_frame = (
            camera_frame, base_frame, odom_frame, map_frame)
        self.T_base_cam = np.asarray(T_base_cam, dtype=np.float64)
        self.reloc_node = reloc_node.rstrip("/")
        self.pose_topic = f"{self.reloc_node}/pose"

        if image_qos == "sensor_data":
            qos = qos_profile_sensor_data
        else:
            qos = QoSProfile(depth=5, history=HistoryPolicy.KEEP_LAST, reliability=ReliabilityPolicy.RELIABLE,
                             durability=DurabilityPolicy.VOLATILE)
        self.image_pub = self.node.create_publisher(CompressedImage if compressed else Image, image_topic, qos)
        self.info_pub = self.node.create_publisher(CameraInfo, info_topic, qos)
        rel = QoSProfile(depth=100, history=HistoryPolicy.KEEP_LAST, reliability=ReliabilityPolicy.RELIABLE,
                         durability=DurabilityPolicy.VOLATILE)
        latched = QoSProfile(depth=100, history=HistoryPolicy.KEEP_LAST, reliability=ReliabilityPolicy.RELIABLE,
                             durability=DurabilityPolicy.TRANSIENT_LOCAL)
        self.tf_pub = self.node.create_publisher(TFMessage, "/tf", rel)
        self.tf_static_pub = self.node.create_publisher(TFMessage, "/tf_static", latched)

        self._cond = threading.Condition()
        self.poses: Dict[int, Tuple[np.ndarray, np.ndarray, float]] = {}  # stamp -> (T, cov, recv wall ns)
        self.raw_poses: Dict[int, Tuple[np.ndarray, np.ndarray, float]] = {}  # ~/pose_raw, same layout
        self.initialposes: Dict[int, np.ndarray] = {}
        self.tf_received: Dict[Tuple[str, str], Dict[int, np.ndarray]] = {}
        self.diag: Optional[Diagnostics] = None
        self.resends = 0  # frames sent again by run_frame because the node had not counted them
        self.diag_history: List[Diagnostics] = []
        self.node.create_subscription(PoseWithCovarianceStamped, self.pose_topic, self._on_pose, rel)
        self.node.create_subscription(PoseWithCovarianceStamped, f"{self.reloc_node}/pose_raw",
                                      lambda m: self._on_pose(m, self.raw_poses), rel)
        self.node.create_subscription(TFMessage, "/tf", self._on_tf, rel)
        self.node.create_subscription(DiagnosticArray, "/diagnostics", self._on_diag, rel)
        if initialpose_topic:
            self.node.create_subscription(PoseWithCovarianceStamped, initialpose_topic, self._on_initialpose, rel)

        self._executor = SingleThreadedExecutor(context=self._ctx)
        self._executor.add_node(self.node)
        self._spin = threading.Thread(target=self._spin_loop, name="replay_spin", daemon=True)
        self._spin.start()
        self.publish_mount()

    # ------------------------------------------------------------------ plumbing
    def _spin_loop(self) -> None:
        from rclpy.executors import ExternalShutdownException

        try:
            while self._ctx.ok():
                self._executor.spin_once(timeout_sec=0.05)
        except (ExternalShutdownException, Exception):  # context shut down while spinning
            pass

    def close(self) -> None:
        """Stop spinning and shut the context down."""
        import rclpy

        try:
            rclpy.shutdown(context=self._ctx)
        except Exception:
            pass
        self._spin.join(timeout=2.0)
        try:
            self._executor.shutdown(timeout_sec=1.0)
            self.node.destroy_node()
        except Exception:
            pass

    def __enter__(self) -> "Replayer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def now_ns(self) -> int:
        """The replay node's clock (system time) in nanoseconds."""
        return self.node.get_clock().now().nanoseconds

    # ------------------------------------------------------------------ callbacks
    def _on_pose(self, msg, into: Optional[dict] = None) -> None:
        from reloc_ros.ros.conversions import pose_with_covariance_to_numpy, stamp_to_ns

        T, cov = pose_with_covariance_to_numpy(msg)
        recv = time.time_ns()
        with self._cond:
            (self.poses if into is None else into)[stamp_to_ns(msg.header.stamp)] = (T, cov, recv)
            self._cond.notify_all()

    def _on_initialpose(self, msg) -> None:
        from reloc_ros.ros.conversions import pose_with_covariance_to_numpy, stamp_to_ns

        with self._cond:
            self.initialposes[stamp_to_ns(msg.header.stamp)] = pose_with_covariance_to_numpy(msg)[0]
            self._cond.notify_all()

    def _on_tf(self, msg) -> None:
        from reloc_ros.ros.conversions import stamp_to_ns, transform_msg_to_matrix

        with self._cond:
            for tf in msg.transforms:
                if tf.header.frame_id != self.map_frame:
                    continue  # only what the localizer publishes
                d = self.tf_received.setdefault((tf.header.frame_id, tf.child_frame_id), {})
                d[stamp_to_ns(tf.header.stamp)] = transform_msg_to_matrix(tf.transform)
                if len(d) > 5000:  # re-broadcasts at 20 Hz: keep memory bounded in long runs
                    for k in sorted(d)[:1000]:
                        del d[k]
            self._cond.notify_all()

    def _on_diag(self, msg) -> None:
        name = self.reloc_node.lstrip("/").split("/")[-1]
        for st in msg.status:
            if not st.name.startswith(f"{name}:"):
                continue
            level = st.level[0] if isinstance(st.level, (bytes, bytearray)) else int(st.level)
            d = Diagnostics(level, st.message, {kv.key: kv.value for kv in st.values}, time.monotonic())
            with self._cond:
                self.diag = d
                self.diag_history.append(d)
                if len(self.diag_history) > 2000:
                    del self.diag_history[:1000]
                self._cond.notify_all()

    # ------------------------------------------------------------------ waiting
    def wait_for(self, predicate: Callable[[], bool], timeout: float) -> bool:
        """Wait until predicate() (evaluated under the lock) is true; False on timeout."""
        with self._cond:
            return self._cond.wait_for(predicate, timeout=timeout)

    def wait_ready(self, timeout: float = 30.0, with_camera_info: bool = True,
                   camera: Optional[Camera] = None) -> Diagnostics:
        """Wait for discovery both ways and the node's first diagnostics.

        With ``with_camera_info``, CameraInfo for ``camera`` is sent every 0.2 s until the
        node reports it received one, which proves the sensor path is matched (a
        best-effort sample sent before the reader matched is silently lost).
        Raises TimeoutError with what was missing.
        """
        deadline = time.monotonic() + timeout

        def matched() -> bool:
            return (self.image_pub.get_subscription_count() > 0 and self.info_pub.get_subscription_count() > 0
                    and self.node.count_publishers(self.pose_topic) > 0 and self.diag is not None)

        while not matched():
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"reloc_node not discovered: image subs {self.image_pub.get_subscription_count()}, "
                    f"camera_info subs {self.info_pub.get_subscription_count()}, pose publishers "
                    f"{self.node.count_publishers(self.pose_topic)}, diagnostics {self.diag is not None}")
            time.sleep(0.02)
        if with_camera_info:
            if camera is None:
                raise ValueError("wait_ready(with_camera_info=True) needs the camera")
            while True:
                self.publish_camera_info(camera, self.now_ns())
                if self.wait_for(lambda: self.diag is not None
                                 and self.diag.values.get("camera_info_received") == "true", 0.2):
                    break
                if time.monotonic() > deadline:
                    raise TimeoutError("reloc_node never reported receiving CameraInfo")
        with self._cond:
            return self.diag

    def wait_diag(self, predicate: Callable[[Diagnostics], bool], timeout: float) -> Optional[Diagnostics]:
        """The first diagnostics (latest first) satisfying predicate within timeout, else None."""
        ok = self.wait_for(lambda: self.diag is not None and predicate(self.diag), timeout)
        with self._cond:
            return self.diag if ok else None

    def wait_pose(self, stamp_ns: int, timeout: float) -> Optional[Tuple[np.ndarray, np.ndarray, float]]:
        """(T_map_base [4, 4], covariance [6, 6], receive wall ns) of the pose stamped stamp_ns."""
        self.wait_for(lambda: stamp_ns in self.poses, timeout)
        with self._cond:
            return self.poses.get(stamp_ns)

    def tf_at(self, parent: str, child: str, stamp_ns: int, timeout: float = 1.0) -> Optional[np.ndarray]:
        """A transform the node published with exactly this stamp, or None."""
        self.wait_for(lambda: stamp_ns in self.tf_received.get((parent, child), {}), timeout)
        with self._cond:
            return self.tf_received.get((parent, child), {}).get(stamp_ns)

    def tf_newest(self, parent: str, child: str, min_stamp_ns: int, timeout: float = 1.0) -> Optional[np.ndarray]:
        """The newest transform the node published with a stamp >= min_stamp_ns, or None.

        The node stamps TF with its clock + transform_tolerance, so after a pose arrived
        (receive time t) the transform it sent with that pose carries a stamp >= t.
        """
        def newest():
            d = self.tf_received.get((parent, child), {})
            ok = [s for s in d if s >= min_stamp_ns]
            return d[max(ok)] if ok else None

        self.wait_for(lambda: newest() is not None, timeout)
        time.sleep(0.05)  # a re-broadcast of the previous value may have overtaken the new one
        with self._cond:
            return newest()

    # ------------------------------------------------------------------ publishing
    def publish_mount(self) -> None:
        """base_link -> camera on /tf_static (latched)."""
        from tf2_msgs.msg import TFMessage

        from reloc_ros.ros.conversions import matrix_to_transform_stamped

        self.tf_static_pub.publish(TFMessage(transforms=[
            matrix_to_transform_stamped(self.T_base_cam, self.base_frame, self.camera_frame, self.now_ns())]))

    def publish_odom(self, T_odom_base: np.ndarray, stamp_ns: int) -> None:
        """odom -> base_link at stamp_ns on /tf."""
        from tf2_msgs.msg import TFMessage

        from reloc_ros.ros.conversions import matrix_to_transform_stamped

        self.tf_pub.publish(TFMessage(transforms=[
            matrix_to_transform_stamped(T_odom_base, self.odom_frame, self.base_frame, stamp_ns)]))

    def publish_camera_info(self, camera: Camera, stamp_ns: int) -> None:
        from reloc_ros.ros.conversions import camera_to_camera_info

        self.info_pub.publish(camera_to_camera_info(camera, stamp_ns, self.camera_frame))

    def image_msg(self, image: np.ndarray, stamp_ns: int, encoding: str = "rgb8"):
        """An Image (``encoding``: rgb8, bgr8, rgba8, bgra8, mono8, mono16) or CompressedImage
        (``encoding`` jpeg or png) message of an [H, W, 3] uint8 RGB image."""
        import cv2

        from reloc_ros.ros.conversions import numpy_to_compressed_msg, numpy_to_image_msg

        if self.compressed:
            return numpy_to_compressed_msg(image, encoding if encoding in ("jpeg", "png") else "jpeg", stamp_ns,
                                           self.camera_frame)
        grey = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY) if image.ndim == 3 else image
        arr = {"rgb8": lambda: image, "bgr8": lambda: image[..., ::-1],
               "rgba8": lambda: np.dstack([image, np.full(image.shape[:2], 255, np.uint8)]),
               "bgra8": lambda: np.dstack([image[..., ::-1], np.full(image.shape[:2], 255, np.uint8)]),
               "mono8": lambda: grey, "mono16": lambda: grey.astype(np.uint16) * 257}[encoding]()
        return numpy_to_image_msg(np.ascontiguousarray(arr), encoding, stamp_ns, self.camera_frame)

    def publish_frame(self, index: int, image: np.ndarray, camera: Camera, T_world_cam: np.ndarray,
                      stamp_ns: Optional[int] = None, encoding: str = "rgb8", send_info: bool = True,
                      image_msg=None, info_camera: Optional[Camera] = None,
                      T_odom_base: Optional[np.ndarray] = None) -> int:
        """Send TF odom->base, CameraInfo (of ``info_camera`` if given) and the image, all with
        one stamp; returns the stamp.

        odom->base is ``T_odom_base`` [4, 4] when given (e.g. from
        ``reloc_ros.sequence.drifting_odometry``), else the ground truth seen from the
        drifting ``true_map_to_odom(index)``.
        """
        stamp = self.now_ns() if stamp_ns is None else stamp_ns
        if T_odom_base is None:
            T_map_base = np.asarray(T_world_cam, dtype=np.float64) @ invert(self.T_base_cam)
            T_odom_base = invert(true_map_to_odom(index)) @ T_map_base
        self.publish_odom(T_odom_base, stamp)
        if send_info:
            self.publish_camera_info(camera if info_camera is None else info_camera, stamp)
        if image_msg is None:
            image_msg = self.image_msg(image, stamp, encoding)
        else:
            image_msg.header.stamp = _stamp(stamp)
        self.image_pub.publish(image_msg)
        return stamp

    def run_frame(self, index: int, name: str, image: np.ndarray, camera: Camera, T_world_cam: np.ndarray,
                  timeout: float = 30.0, tolerance_s: float = 0.2, resend_after_s: float = 3.0,
                  **publish_kw) -> FrameOutcome:
        """Publish one frame and wait until the node has handled it (lockstep replay).

        Returns the pose (if published), the map->odom TF published for it, and the
        diagnostics after it. tolerance_s must match the node's transform_tolerance.
        """
        with self._cond:
            before = self.diag.handled if self.diag is not None else 0
            received = self.diag.count("frames_received") if self.diag is not None else 0
        stamp = self.publish_frame(index, image, camera, T_world_cam, **publish_kw)
        out = FrameOutcome(index, name, stamp)
        # A best-effort sample can be lost (e.g. right after discovery): if the node has not
        # counted it after resend_after_s, send the same frame (same stamp) again.
        for _ in range(3):
            if self.wait_for(lambda: self.diag is not None and self.diag.count("frames_received") > received,
                             resend_after_s):
                break
            self.resends += 1
            self.publish_frame(index, image, camera, T_world_cam, stamp_ns=stamp, **publish_kw)
        return self.collect_outcome(out, before, timeout)

    def collect_outcome(self, out: FrameOutcome, before: int, timeout: float) -> FrameOutcome:
        """Wait until the node handled the input stamped ``out.stamp_ns`` (diagnostics counter
        ``handled`` above ``before``, or a pose) and fill ``out`` with what it published for it."""
        stamp = out.stamp_ns
        self.wait_for(lambda: stamp in self.poses or stamp in self.raw_poses
                      or (self.diag is not None and self.diag.handled > before), timeout)
        pose = self.wait_pose(stamp, 0.3)
        self.wait_for(lambda: stamp in self.raw_poses, 0.3)  # the two topics need not arrive in order
        with self._cond:
            raw = self.raw_poses.get(stamp)
        if raw is not None:
            out.T_map_base_raw, out.covariance_raw = raw[0], raw[1]
        if pose is not None:
            out.T_map_base, out.covariance = pose[0], pose[1]
            out.latency_ms = (pose[2] - stamp) * 1e-6
            out.T_map_odom = self.tf_newest(self.map_frame, self.odom_frame, pose[2], 1.0)
        self.wait_for(lambda: self.diag is not None and self.diag.handled > before, 2.0)
        with self._cond:
            out.diagnostics = self.diag
        return out


def _stamp(ns: int):
    from reloc_ros.ros.conversions import ns_to_stamp

    return ns_to_stamp(ns)


def frame_errors(out: FrameOutcome, T_world_cam: np.ndarray, T_base_cam: np.ndarray) -> Dict[str, float]:
    """Errors of one outcome against ground truth.

    cam_t_m / cam_r_deg: camera pose recovered from ~/pose (T_map_base @ T_base_cam) vs truth.
    odom_chain_m / odom_chain_deg: (map->odom TF) o (true odom->base) vs true map->base.
    """
    res: Dict[str, float] = {}
    if out.T_map_base is None:
        return res
    t, r = pose_errors(out.T_map_base @ T_base_cam, T_world_cam)
    res.update(cam_t_m=t, cam_r_deg=r)
    if out.T_map_odom is not None:
        T_map_base_true = T_world_cam @ invert(T_base_cam)
        T_odom_base = invert(true_map_to_odom(out.index)) @ T_map_base_true
        t2, r2 = pose_errors(out.T_map_odom @ T_odom_base, T_map_base_true)
        res.update(odom_chain_m=t2, odom_chain_deg=r2)
    return res


def main(argv: Optional[List[str]] = None) -> int:
    """Replay a dataset to a running reloc_node in lockstep; print per-frame errors; write JSON."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--format", default="folder", help="dataset format for reloc_ros.datasets.open_dataset")
    ap.add_argument("--src", required=True, help="dataset folder")
    ap.add_argument("--frames", default=None, help="start:stop:step over the sorted frames")
    ap.add_argument("--node", default="/reloc_node", help="fully qualified name of the node")
    ap.add_argument("--image-topic", default="/camera/image_raw")
    ap.add_argument("--info-topic", default="/camera/camera_info")
    ap.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for the node per frame")
    ap.add_argument("--ready-timeout", type=float, default=120.0, help="seconds to wait for the node to appear")
    ap.add_argument("--tolerance", type=float, default=0.2, help="the node's transform_tolerance (s)")
    ap.add_argument("--out", default=None, help="write per-frame results as JSON here")
    args = ap.parse_args(argv)

    from reloc_ros.datasets import open_dataset

    ds = open_dataset(args.format, args.src, frames=args.frames, use_depth=False)
    if len(ds) == 0:
        print(f"replay: no frames in {args.src}", file=sys.stderr)
        return 1
    rp = Replayer(reloc_node=args.node, image_topic=args.image_topic, info_topic=args.info_topic)
    rows = []
    try:
        first = ds[0]
        diag = rp.wait_ready(args.ready_timeout, camera=first.camera)
        print(f"replay: node ready ({diag.message}); sending {len(ds)} frames", flush=True)
        print(f"{'frame':>16} {'status':>8} {'cam err cm':>10} {'cam err deg':>11} {'map->odom cm':>12} "
              f"{'latency ms':>10}  message", flush=True)
        for i in range(len(ds)):
            fr = first if i == 0 else ds[i]
            out = rp.run_frame(i, fr.name, fr.image, fr.camera, fr.T_world_cam, timeout=args.timeout,
                               tolerance_s=args.tolerance)
            err = frame_errors(out, fr.T_world_cam, rp.T_base_cam)
            d = out.diagnostics
            status = "pose" if out.T_map_base is not None else ("-" if d is None else ("WARN", "ERROR")[d.level == 2])
            msg = "" if d is None else d.message
            print(f"{fr.name:>16} {status:>8} {100 * err.get('cam_t_m', np.nan):10.2f} "
                  f"{err.get('cam_r_deg', np.nan):11.2f} {100 * err.get('odom_chain_m', np.nan):12.2f} "
                  f"{out.latency_ms:10.0f}  {msg if out.T_map_base is None else ''}", flush=True)
            rows.append({"name": fr.name, "stamp_ns": out.stamp_ns, "published": out.T_map_base is not None,
                         "latency_ms": out.latency_ms, **err,
                         "localize_ms": float(d.values.get("last_localize_ms", "nan")) if d else float("nan"),
                         "message": msg})
        time.sleep(0.5)
        with rp._cond:
            final = rp.diag
    finally:
        rp.close()
    summary = {"frames": rows, "final_diagnostics": final.values if final else {}}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(summary, f, indent=1)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
