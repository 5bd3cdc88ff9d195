"""Record a rosbag2 of a robot driving laps in the rendered demo room, with exact ground truth.

    python -m reloc_ros.demo.record_bag OUT [--frames 16] [--laps 2] [--hz 4] [--size 320x240]
                                        [--focal 262.5] [--storage mcap|sqlite3] [--no-depth]

No ROS needed: messages are built and serialized with ``rosbags``. The layout is that of
a robot with an RGB-D camera, as ``ros2 bag record`` would store it:

- ``/camera/image_raw`` sensor_msgs/Image rgb8 and ``/camera/camera_info``, frame
  ``camera_optical`` (OpenCV axes); ``/camera/depth/image_raw`` 32FC1 metres, registered
  to the colour image, and ``/camera/depth/camera_info`` (unless ``depth=False``);
- ``/tf``: ``odom -> base_link`` at every image stamp, a drifting wheel odometry
  (``reloc_ros.sequence.drifting_odometry``);
- ``/tf_static``: ``base_link -> camera_optical`` (the demo mount
  ``reloc_ros.demo.replay.DEFAULT_T_BASE_CAM``), recorded transient-local;
- ``/ground_truth/odom`` nav_msgs/Odometry, ``map -> base_link`` exact (as a simulator's
  ground-truth plugin publishes it).

The base drives planar laps (z = 0) around the room centre; lap k is a smaller ellipse
shifted by half a frame spacing with seeded jitter, so a map built from lap 0 is queried
from poses it does not contain. Header stamps are the bag time of the frame; the log time
of camera messages is 1-2 ms later (after TF, as a recorder receives them).

``reloc-map build --format bag OUT --frames 0:N --dataset-option depth_topic=/camera/depth/image_raw``
builds a map from the first lap (N = frames per lap) with the ground-truth poses.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

from reloc_ros.demo.replay import DEFAULT_T_BASE_CAM
from reloc_ros.demo.scene import ProceduralRoom, RoomConfig, demo_camera
from reloc_ros.geometry import make_T, so3_exp
from reloc_ros.sequence import OdometryDrift, drifting_odometry
from reloc_ros.types import Camera

IMAGE_TOPIC = "/camera/image_raw"
INFO_TOPIC = "/camera/camera_info"
DEPTH_TOPIC = "/camera/depth/image_raw"
DEPTH_INFO_TOPIC = "/camera/depth/camera_info"
GT_TOPIC = "/ground_truth/odom"
MAP_FRAME, ODOM_FRAME, BASE_FRAME, CAMERA_FRAME = "map", "odom", "base_link", "camera_optical"


@dataclass
class RecordConfig:
    """What to record (metres, seconds, pixels).

    frames: images per lap; laps: number of laps; hz: camera rate (bag time).
    width / height / focal: pinhole camera (principal point at the centre). depth: also
    record the registered depth image. storage: 'mcap' or 'sqlite3'. start_s: bag time of
    the first frame (Unix seconds). texel_m / room_seed: demo room texture resolution and
    seed. jitter: lap k > 0 pose noise (0..1: up to 0.15 m and 15 deg). odom_drift: the
    odometry error model (seeded).
    """

    frames: int = 16
    laps: int = 2
    hz: float = 4.0
    width: int = 320
    height: int = 240
    focal: float = 262.5
    depth: bool = True
    storage: str = "mcap"
    start_s: float = 1_700_000_000.0
    texel_m: float = 0.006
    room_seed: int = 7
    jitter: float = 0.5
    odom_drift: OdometryDrift = field(default_factory=OdometryDrift)

    def validate(self) -> None:
        if self.frames < 2 or self.laps < 1:
            raise ValueError("record_bag: need frames >= 2 and laps >= 1")
        if not self.hz > 0:
            raise ValueError(f"record_bag: hz must be > 0, got {self.hz}")
        if self.width < 16 or self.height < 16 or not self.focal > 0:
            raise ValueError("record_bag: image at least 16x16 and focal > 0")
        if self.storage not in ("mcap", "sqlite3"):
            raise ValueError(f"record_bag: storage must be mcap or sqlite3, got {self.storage!r}")


@dataclass
class RecordedBag:
    """The written bag and its ground truth.

    stamps_ns [N]: image stamps (= bag time), lap-major. T_map_base [N, 4, 4], T_odom_base
    [N, 4, 4]: what /ground_truth/odom and /tf carry. T_base_cam [4, 4]: the mount.
    start_ns: the bag's first log time. frames_per_lap: images per lap.
    """

    path: Path
    camera: Camera
    stamps_ns: np.ndarray
    T_map_base: np.ndarray
    T_odom_base: np.ndarray
    T_base_cam: np.ndarray
    start_ns: int
    frames_per_lap: int

    def lap_offset_s(self, lap: int, margin_s: float = 0.05) -> float:
        """Seconds from the bag start to just before lap ``lap`` (for --start-offset)."""
        return max(0.0, (int(self.stamps_ns[lap * self.frames_per_lap]) - self.start_ns) * 1e-9 - margin_s)


def lap_base_poses(room: ProceduralRoom, frames: int, lap: int, jitter: float, seed: int = 11) -> np.ndarray:
    """[frames, 4, 4] planar T_map_base of lap ``lap``: an ellipse around the room centre
    (1.3 m x 1.0 m at lap 0, 12 % smaller per lap), the camera turned outwards to the walls."""
    rng = np.random.default_rng(seed + lap)
    c = room.size / 2.0
    scale = 1.0 - 0.12 * lap
    out = []
    for i in range(frames):
        a = 2 * np.pi * (i + 0.5 * lap) / frames
        pos = np.array([c[0] + 1.3 * scale * np.cos(a), c[1] + 1.0 * scale * np.sin(a), 0.0])
        yaw = a + 0.35 * np.sin(2 * a)
        if lap > 0 and jitter > 0:
            pos[:2] += rng.uniform(-0.15, 0.15, 2) * jitter
            yaw += np.radians(rng.uniform(-15, 15)) * jitter
        out.append(make_T(so3_exp([0.0, 0.0, yaw]), pos))
    return np.stack(out)


class _Msgs:
    """rosbags message builders (typestore of the newest ROS 2 distribution)."""

    def __init__(self) -> None:
        from rosbags.typesys import Stores, get_typestore

        self.ts = get_typestore(Stores.LATEST)
        self.T = self.ts.types

    def header(self, stamp_ns: int, frame: str):
        Time, Header = self.T["builtin_interfaces/msg/Time"], self.T["std_msgs/msg/Header"]
        return Header(stamp=Time(sec=int(stamp_ns // 1_000_000_000), nanosec=int(stamp_ns % 1_000_000_000)),
                      frame_id=frame)

    def pose(self, T: np.ndarray):
        from reloc_ros.ros.conversions import matrix_to_quaternion

        x, y, z, w = matrix_to_quaternion(T[:3, :3])
        P = self.T
        return P["geometry_msgs/msg/Pose"](position=P["geometry_msgs/msg/Point"](x=float(T[0, 3]), y=float(T[1, 3]),
                                                                                  z=float(T[2, 3])),
                                           orientation=P["geometry_msgs/msg/Quaternion"](x=x, y=y, z=z, w=w))

    def tf(self, T: np.ndarray, parent: str, child: str, stamp_ns: int):
        from reloc_ros.ros.conversions import matrix_to_quaternion

        x, y, z, w = matrix_to_quaternion(T[:3, :3])
        P = self.T
        tr = P["geometry_msgs/msg/Transform"](
            translation=P["geometry_msgs/msg/Vector3"](x=float(T[0, 3]), y=float(T[1, 3]), z=float(T[2, 3])),
            rotation=P["geometry_msgs/msg/Quaternion"](x=x, y=y, z=z, w=w))
        ts = P["geometry_msgs/msg/TransformStamped"](header=self.header(stamp_ns, parent), child_frame_id=child,
                                                      transform=tr)
        return P["tf2_msgs/msg/TFMessage"](transforms=[ts])

    def odometry(self, T: np.ndarray, parent: str, child: str, stamp_ns: int):
        P = self.T
        cov = np.zeros(36)  # exact ground truth
        return P["nav_msgs/msg/Odometry"](
            header=self.header(stamp_ns, parent), child_frame_id=child,
            pose=P["geometry_msgs/msg/PoseWithCovariance"](pose=self.pose(T), covariance=cov),
            twist=P["geometry_msgs/msg/TwistWithCovariance"](
                twist=P["geometry_msgs/msg/Twist"](linear=P["geometry_msgs/msg/Vector3"](x=0.0, y=0.0, z=0.0),
                                                   angular=P["geometry_msgs/msg/Vector3"](x=0.0, y=0.0, z=0.0)),
                covariance=np.zeros(36)))

    def image(self, arr: np.ndarray, encoding: str, stamp_ns: int, frame: str):
        arr = np.ascontiguousarray(arr)
        h, w = arr.shape[:2]
        return self.T["sensor_msgs/msg/Image"](header=self.header(stamp_ns, frame), height=h, width=w,
                                               encoding=encoding, is_bigendian=0, step=arr.strides[0],
                                               data=arr.view(np.uint8).reshape(-1))

    def camera_info(self, cam: Camera, stamp_ns: int, frame: str):
        P = self.T
        K = np.asarray(cam.K, dtype=np.float64)
        Pm = np.hstack([K, np.zeros((3, 1))])
        return P["sensor_msgs/msg/CameraInfo"](
            header=self.header(stamp_ns, frame), height=cam.height, width=cam.width, distortion_model="plumb_bob",
            d=np.zeros(5), k=K.ravel(), r=np.eye(3).ravel(), p=Pm.ravel(), binning_x=0, binning_y=0,
            roi=P["sensor_msgs/msg/RegionOfInterest"](x_offset=0, y_offset=0, height=0, width=0, do_rectify=False))


def _latched_qos():
    """The offered QoS ``ros2 bag record`` stores for a tf2 static broadcaster."""
    from rosbags.interfaces import Qos, QosDurability, QosHistory, QosLiveliness, QosReliability, QosTime

    zero = QosTime(0, 0)
    return [Qos(QosHistory.KEEP_LAST, 1, QosReliability.RELIABLE, QosDurability.TRANSIENT_LOCAL, zero, zero,
                QosLiveliness.AUTOMATIC, zero, False)]


def record_demo_bag(out: Path, cfg: RecordConfig = RecordConfig()) -> RecordedBag:
    """Render ``cfg.laps`` laps of ``cfg.frames`` images and write them as a rosbag2 at ``out``
    (a new folder). Returns the ground truth of what was written."""
    from rosbags.rosbag2 import StoragePlugin, Writer

    cfg.validate()
    out = Path(out)
    room = ProceduralRoom(RoomConfig(texel_m=cfg.texel_m, seed=cfg.room_seed))
    cam = demo_camera(cfg.width, cfg.height, cfg.focal)
    T_base_cam = DEFAULT_T_BASE_CAM
    T_map_base = np.concatenate([lap_base_poses(room, cfg.frames, k, cfg.jitter) for k in range(cfg.laps)])
    T_odom_base = drifting_odometry(T_map_base, cfg.odom_drift)
    n = len(T_map_base)
    start_ns = int(round(cfg.start_s * 1e9))
    period_ns = int(round(1e9 / cfg.hz))
    stamps = start_ns + period_ns * np.arange(n, dtype=np.int64)
    m = _Msgs()
    plugin = StoragePlugin.MCAP if cfg.storage == "mcap" else StoragePlugin.SQLITE3
    with Writer(out, version=9, storage_plugin=plugin) as w:
        conns: Dict[str, object] = {}

        def conn(topic: str, msgtype: str, qos: Optional[List] = None):
            if topic not in conns:
                conns[topic] = w.add_connection(topic, msgtype, typestore=m.ts, offered_qos_profiles=qos or ())
            return conns[topic]

        def write(topic: str, msg, log_ns: int, qos: Optional[List] = None) -> None:
            c = conn(topic, msg.__msgtype__, qos)
            w.write(c, int(log_ns), m.ts.serialize_cdr(msg, msg.__msgtype__))

        write("/tf_static", m.tf(T_base_cam, BASE_FRAME, CAMERA_FRAME, start_ns), start_ns, _latched_qos())
        for i in range(n):
            t = int(stamps[i])
            T_world_cam = T_map_base[i] @ T_base_cam
            rgb, depth = room.render(T_world_cam, cam)
            write("/tf", m.tf(T_odom_base[i], ODOM_FRAME, BASE_FRAME, t), t)
            write(GT_TOPIC, m.odometry(T_map_base[i], MAP_FRAME, BASE_FRAME, t), t)
            write(INFO_TOPIC, m.camera_info(cam, t, CAMERA_FRAME), t + 1_000_000)
            write(IMAGE_TOPIC, m.image(rgb, "rgb8", t, CAMERA_FRAME), t + 2_000_000)
            if cfg.depth:
                write(DEPTH_INFO_TOPIC, m.camera_info(cam, t, CAMERA_FRAME), t + 1_000_000)
                write(DEPTH_TOPIC, m.image(depth.astype(np.float32), "32FC1", t, CAMERA_FRAME), t + 2_000_000)
    return RecordedBag(out, cam, stamps, T_map_base, T_odom_base, T_base_cam, start_ns, cfg.frames)


def main(argv: Optional[List[str]] = None) -> int:
    """Write the demo bag; print its topics and the map-building command."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out", help="bag folder to create (must not exist)")
    d = RecordConfig()
    ap.add_argument("--frames", type=int, default=d.frames, help="images per lap")
    ap.add_argument("--laps", type=int, default=d.laps)
    ap.add_argument("--hz", type=float, default=d.hz, help="camera rate (bag time)")
    ap.add_argument("--size", default=f"{d.width}x{d.height}", help="WIDTHxHEIGHT")
    ap.add_argument("--focal", type=float, default=d.focal, help="focal length in pixels")
    ap.add_argument("--storage", default=d.storage, choices=("mcap", "sqlite3"))
    ap.add_argument("--no-depth", action="store_true", help="do not record the depth image")
    args = ap.parse_args(argv)
    try:
        w, h = (int(v) for v in args.size.lower().split("x"))
        cfg = RecordConfig(frames=args.frames, laps=args.laps, hz=args.hz, width=w, height=h, focal=args.focal,
                           depth=not args.no_depth, storage=args.storage)
        rec = record_demo_bag(Path(args.out), cfg)
    except ValueError as e:
        print(f"record_bag: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # rosbags WriterError (e.g. the folder exists)
        print(f"record_bag: error: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    n = len(rec.stamps_ns)
    print(f"record_bag: wrote {rec.path} ({n} frames, {args.laps} laps of {args.frames}, "
          f"{(rec.stamps_ns[-1] - rec.start_ns) * 1e-9:.2f} s)")
    depth_opt = "" if args.no_depth else f" --dataset-option depth_topic={DEPTH_TOPIC}"
    print(f"map from lap 0:  reloc-map build --format bag {rec.path} --frames 0:{args.frames} -o MAP{depth_opt}")
    if args.laps > 1:
        print(f"replay lap 1:    reloc-replay {rec.path} --start-offset {rec.lap_offset_s(1):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
