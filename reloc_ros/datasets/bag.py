"""A recorded rosbag2 (MCAP or sqlite3), read without ROS through the pure-Python ``rosbags``.

One pass over the bag collects image metadata (not pixels), camera_info, poses and TF;
poses are interpolated to the image stamps, keyframes are picked by distance and angle,
and pixels are read back from the bag only when a frame is accessed.
"""
from __future__ import annotations

import logging
import threading
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from reloc_ros.datasets.base import (
    Dataset, FrameRecord, as_matrix4, camera_from_values, decode_image_bytes, drop_invalid_poses,
    quat_xyzw_to_matrix, select, to_rgb8)
from reloc_ros.datasets.trajectory import interpolate_poses, select_keyframes
from reloc_ros.geometry import invert
from reloc_ros.types import Camera, InvalidInputError

logger = logging.getLogger("reloc_ros.datasets")

IMAGE_TYPES = ("sensor_msgs/msg/Image", "sensor_msgs/msg/CompressedImage")
INFO_TYPE = "sensor_msgs/msg/CameraInfo"
TF_TYPE = "tf2_msgs/msg/TFMessage"
POSE_TYPES = ("geometry_msgs/msg/PoseStamped", "geometry_msgs/msg/PoseWithCovarianceStamped",
              "nav_msgs/msg/Odometry", "geometry_msgs/msg/TransformStamped")


@dataclass
class BagOptions:
    """Options of the ``bag`` reader (seconds, metres, degrees).

    image_topic: sensor_msgs/Image or CompressedImage topic (default: the only image
    topic whose name does not contain "depth").
    camera_info_topic: its CameraInfo (default: ``<image topic's namespace>/camera_info``,
    else the only CameraInfo topic). fx, fy, cx, cy: intrinsics to use instead.
    pose_topic: PoseStamped / PoseWithCovarianceStamped / Odometry / TransformStamped
    topic giving the pose of ``pose_child_frame`` (Odometry/TransformStamped: their
    child_frame_id) in the map frame. With no child frame the pose is taken to be the
    image's camera (optical) frame; otherwise TF carries it to the image header's frame.
    tf_parent / tf_child: poses from /tf + /tf_static instead: T_parent_cam where cam
    is the image header's frame_id when TF knows it (chained through tf_child), else
    tf_child itself (then taken to be the camera optical frame).
    T_body_cam: 16 numbers (or a file), the camera optical frame in the pose topic's
    body frame or in tf_child; replaces the TF lookup to the image frame.
    max_gap: pose samples (and each TF edge) are interpolated only across gaps up to this.
    kf_select / kf_min_dist / kf_min_angle_deg: keep a frame only when it moved this far
    or turned this much from the last kept frame (False keeps every frame).
    depth_topic: optional depth Image (16UC1/mono16 * depth_scale metres, or 32FC1
    metres) paired with each image within depth_max_dt; its camera_info from
    depth_camera_info_topic (default: its namespace's camera_info, else the colour
    camera), T_cam_depth from TF between the two frame ids (identity if none).

    Multi-camera rigs: image_topics lists several image topics (comma-separated or a
    list); every image becomes a frame of its camera. camera_ids names the cameras, one
    per topic (default: each topic's namespace, '/cam_front/image_raw' -> 'cam_front');
    camera_info_topics gives their CameraInfo (default: '<namespace>/camera_info').
    Each camera's extrinsic T_base_cam is read from the bag's /tf_static, base_frame ->
    the image header's frame_id; the body pose T_world_base comes from pose_topic (the
    pose of pose_child_frame / the message's child frame, carried to base_frame by TF;
    without a child frame it is base_frame's) or from TF tf_parent -> base_frame, and
    T_world_cam = T_world_base @ T_base_cam. Names are '<camera_id>/<index>' with the
    index in that camera's image list (``frames`` slices every camera's list); keyframes
    are selected per camera on the body pose, so synchronised cameras keep the same
    captures.
    """

    image_topic: Optional[str] = None
    camera_info_topic: Optional[str] = None
    fx: Optional[float] = None
    fy: Optional[float] = None
    cx: Optional[float] = None
    cy: Optional[float] = None
    pose_topic: Optional[str] = None
    pose_child_frame: Optional[str] = None
    T_body_cam: Optional[Any] = None
    tf_parent: Optional[str] = None
    tf_child: Optional[str] = None
    max_gap: float = 0.5
    kf_select: bool = True
    kf_min_dist: float = 0.1
    kf_min_angle_deg: float = 10.0
    depth_topic: Optional[str] = None
    depth_camera_info_topic: Optional[str] = None
    depth_scale: float = 0.001
    depth_max_dt: float = 0.02
    image_topics: Optional[Any] = None
    camera_ids: Optional[Any] = None
    camera_info_topics: Optional[Any] = None
    base_frame: str = "base_link"

    def validate(self) -> None:
        if self.image_topics is not None:
            topics = _name_list(self.image_topics, "image_topics")
            if not topics:
                raise ValueError("bag dataset: image_topics lists no topic")
            for key in ("camera_ids", "camera_info_topics"):
                val = getattr(self, key)
                if val is not None and len(_name_list(val, key)) != len(topics):
                    raise ValueError(f"bag dataset: {key} must name one entry per image topic "
                                     f"({len(topics)} topics, {len(_name_list(val, key))} entries)")
            clash = [k for k in ("image_topic", "camera_info_topic", "fx", "T_body_cam", "tf_child", "depth_topic")
                     if getattr(self, k) is not None]
            if clash:
                raise ValueError(f"bag dataset: {', '.join(clash)} cannot be combined with image_topics (a rig "
                                 "takes each camera's intrinsics from its camera_info and its mount from "
                                 "/tf_static)")
            if not _frame_id(str(self.base_frame)):
                raise ValueError("bag dataset: base_frame must be a frame id")
        elif self.camera_ids is not None or self.camera_info_topics is not None:
            raise ValueError("bag dataset: camera_ids and camera_info_topics need image_topics")
        if self.pose_topic and self.tf_parent:
            raise ValueError("bag dataset: give pose_topic or tf_parent, not both")
        given = [v is not None for v in (self.fx, self.fy, self.cx, self.cy)]
        if any(given) and not all(given):
            raise ValueError("bag dataset: give all of fx, fy, cx, cy or none")
        if not (self.max_gap > 0 and self.depth_max_dt > 0 and self.depth_scale > 0):
            raise ValueError("bag dataset: max_gap, depth_max_dt and depth_scale must be > 0")
        if self.kf_min_dist < 0 or self.kf_min_angle_deg < 0:
            raise ValueError("bag dataset: kf_min_dist and kf_min_angle_deg must be >= 0")


def _name_list(value: Any, key: str) -> List[str]:
    """Topic or camera names from 'a,b,c' (a CLI string) or a list of strings."""
    if isinstance(value, str):
        items = value.split(",")
    elif isinstance(value, (list, tuple)):
        items = list(value)
    else:
        raise ValueError(f"bag dataset: {key} must be a comma-separated string or a list, got {value!r}")
    out = [str(v).strip() for v in items]
    if any(not v for v in out):
        raise ValueError(f"bag dataset: {key} has an empty entry: {value!r}")
    return out


# --------------------------------------------------------------------------- messages


def stamp_ns(msg: Any, fallback: int) -> int:
    """Header stamp of ``msg`` in integer nanoseconds (``fallback`` when it is zero)."""
    st = msg.header.stamp
    t = int(st.sec) * 1_000_000_000 + int(st.nanosec)
    return t if t > 0 else int(fallback)


def _frame_id(s: str) -> str:
    return s.strip().lstrip("/")


def _transform_to_T(translation: Any, rotation: Any) -> np.ndarray:
    T = np.eye(4)
    T[:3, :3] = quat_xyzw_to_matrix((rotation.x, rotation.y, rotation.z, rotation.w))
    T[:3, 3] = (translation.x, translation.y, translation.z)
    return T


_RAW_ENCODINGS = {  # encoding -> (channels, dtype, bgr order)
    "mono8": (1, np.uint8, False), "8uc1": (1, np.uint8, False),
    "mono16": (1, np.uint16, False), "16uc1": (1, np.uint16, False),
    "rgb8": (3, np.uint8, False), "bgr8": (3, np.uint8, True),
    "rgba8": (4, np.uint8, False), "bgra8": (4, np.uint8, True),
    "32fc1": (1, np.float32, False),
}


def raw_image_array(msg: Any, what: str) -> np.ndarray:
    """sensor_msgs/Image -> [H, W] or [H, W, C] array of its encoding, honouring ``step``
    and ``is_bigendian``. Raises InvalidInputError for unknown encodings or short data."""
    enc = str(msg.encoding).lower()
    if enc not in _RAW_ENCODINGS:
        raise InvalidInputError(f"{what}: unsupported image encoding {msg.encoding!r} "
                                f"(supported: {', '.join(sorted(_RAW_ENCODINGS))})")
    ch, dtype, _ = _RAW_ENCODINGS[enc]
    h, w, step = int(msg.height), int(msg.width), int(msg.step)
    row_bytes = w * ch * np.dtype(dtype).itemsize
    data = np.frombuffer(bytes(msg.data) if not isinstance(msg.data, np.ndarray) else msg.data, dtype=np.uint8)
    if h <= 0 or w <= 0 or step < row_bytes or data.size < step * (h - 1) + row_bytes:
        raise InvalidInputError(f"{what}: image data ({data.size} bytes) does not fit {w}x{h} {msg.encoding} "
                                f"with step {step}")
    if data.size < step * h:
        data = np.concatenate([data, np.zeros(step * h - data.size, np.uint8)])
    rows = data[:step * h].reshape(h, step)[:, :row_bytes]
    dt = np.dtype(dtype).newbyteorder(">" if msg.is_bigendian else "<") if np.dtype(dtype).itemsize > 1 \
        else np.dtype(dtype)
    arr = np.ascontiguousarray(rows).view(dt).reshape(h, w, ch) if ch > 1 else \
        np.ascontiguousarray(rows).view(dt).reshape(h, w)
    return arr.astype(dtype, copy=False)


def decode_image_msg(msg: Any, msgtype: str, what: str) -> np.ndarray:
    """Image or CompressedImage message -> [H, W, 3] uint8 RGB or [H, W] uint8 grey.

    Raw encodings mono8, mono16 (scaled to 8 bits), rgb8, bgr8, rgba8, bgra8; compressed
    data through cv2.imdecode. InvalidInputError for anything else or corrupt data.
    """
    if msgtype.endswith("CompressedImage"):
        fmt = str(msg.format).lower()
        if "compresseddepth" in fmt:
            raise InvalidInputError(f"{what}: compressedDepth is a depth format, not a colour image")
        return decode_image_bytes(bytes(msg.data), what)
    enc = str(msg.encoding).lower()
    if enc == "32fc1":
        raise InvalidInputError(f"{what}: 32FC1 is a depth encoding, not a colour image")
    arr = raw_image_array(msg, what)
    return to_rgb8(arr, what, bgr=_RAW_ENCODINGS[enc][2])


def decode_depth_msg(msg: Any, msgtype: str, scale: float, what: str) -> np.ndarray:
    """Depth Image message -> [H, W] float32 metres (0 invalid).

    16UC1/mono16 values are multiplied by ``scale``; 32FC1 is already metres.
    """
    if msgtype.endswith("CompressedImage"):
        raise InvalidInputError(f"{what}: compressed depth is not supported; record raw depth images")
    enc = str(msg.encoding).lower()
    arr = raw_image_array(msg, what)
    if enc in ("16uc1", "mono16"):
        out = (arr.astype(np.float64) * scale).astype(np.float32)
    elif enc == "32fc1":
        out = arr.astype(np.float32)
    else:
        raise InvalidInputError(f"{what}: depth encoding must be 16UC1, mono16 or 32FC1, got {msg.encoding!r}")
    out[~np.isfinite(out) | (out < 0)] = 0.0
    return out


def camera_from_info(msg: Any, what: str) -> Camera:
    """Camera (pixels) of a sensor_msgs/CameraInfo, for the image as published.

    ROI and binning are applied as image_geometry does: cx' = (cx - x_offset) / binning.
    plumb_bob / rational_polynomial distortion goes into Camera.dist; other non-zero
    models raise InvalidInputError.
    """
    K = np.asarray(msg.k, dtype=np.float64).reshape(3, 3)
    if not np.any(K) or K[0, 0] <= 0:
        raise InvalidInputError(f"{what}: camera_info is uncalibrated (K is zero)")
    d = np.asarray(msg.d, dtype=np.float64).ravel()
    model = str(msg.distortion_model).lower()
    if d.size and np.any(d) and model not in ("plumb_bob", "rational_polynomial"):
        raise InvalidInputError(f"{what}: distortion model {msg.distortion_model!r} is not supported "
                                "(plumb_bob or rational_polynomial)")
    bx, by = max(int(msg.binning_x), 1), max(int(msg.binning_y), 1)
    roi = msg.roi
    w, h = int(msg.width), int(msg.height)
    fx, fy, cx, cy = K[0, 0], K[1, 1], K[0, 2], K[1, 2]
    if int(roi.width) > 0 and int(roi.height) > 0 and (int(roi.width), int(roi.height)) != (w, h):
        cx, cy = cx - int(roi.x_offset), cy - int(roi.y_offset)
        w, h = int(roi.width), int(roi.height)
    fx, cx, w = fx / bx, cx / bx, w // bx
    fy, cy, h = fy / by, cy / by, h // by
    return camera_from_values(fx, fy, cx, cy, w, h, d if (d.size and np.any(d)) else None, where=what)


# --------------------------------------------------------------------------- TF


class TfTree:
    """/tf and /tf_static as a tree of edges parent -> child (frame ids without a leading '/').

    Static edges hold for all times; dynamic ones are interpolated (linear + SLERP)
    between samples at most ``max_gap_ns`` apart, never extrapolated.
    """

    def __init__(self, max_gap_ns: int) -> None:
        self.max_gap_ns = int(max_gap_ns)
        self.static: Dict[str, Tuple[str, np.ndarray]] = {}
        self._dyn: Dict[str, Tuple[str, List[int], List[np.ndarray]]] = {}
        self.dynamic: Dict[str, Tuple[str, np.ndarray, np.ndarray]] = {}
        self._warned: set = set()

    def add(self, parent: str, child: str, t_ns: int, T: np.ndarray, static: bool) -> None:
        """Record T_parent_child (at t_ns for dynamic edges)."""
        parent, child = _frame_id(parent), _frame_id(child)
        if not parent or not child or parent == child or not np.all(np.isfinite(T)):
            return
        known = self.static.get(child, self._dyn.get(child, (None,)))[0]
        if known is not None and known != parent:
            if (child, parent) not in self._warned:
                logger.warning("TF: frame %s has two parents (%s, %s); keeping %s", child, known, parent, known)
                self._warned.add((child, parent))
            return
        if static:
            self.static[child] = (parent, T)
        else:
            self._dyn.setdefault(child, (parent, [], []))
            self._dyn[child][1].append(int(t_ns))
            self._dyn[child][2].append(T)

    def freeze(self) -> None:
        """Sort dynamic samples by time (the last sample wins at equal stamps)."""
        for child, (parent, ts, Ts) in self._dyn.items():
            t = np.asarray(ts, dtype=np.int64)
            order = np.argsort(t, kind="stable")
            t, T = t[order], np.asarray(Ts)[order]
            last = np.append(t[1:] != t[:-1], True)
            self.dynamic[child] = (parent, t[last], T[last])
            if child in self.static:
                logger.warning("TF: frame %s is both static and dynamic; using the dynamic one", child)
                del self.static[child]

    def parent(self, frame: str) -> Optional[str]:
        if frame in self.dynamic:
            return self.dynamic[frame][0]
        if frame in self.static:
            return self.static[frame][0]
        return None

    def frames(self) -> set:
        out = set(self.static) | set(self.dynamic)
        out |= {p for p, _ in self.static.values()} | {v[0] for v in self.dynamic.values()}
        return out

    def _up(self, frame: str) -> List[str]:
        chain = [frame]
        while True:
            p = self.parent(chain[-1])
            if p is None or p in chain:
                return chain
            chain.append(p)

    def connected(self, a: str, b: str) -> bool:
        return bool(set(self._up(_frame_id(a))) & set(self._up(_frame_id(b))))

    def lookup(self, target: str, source: str, t_ns: np.ndarray) -> Tuple[np.ndarray, np.ndarray, List[Optional[str]]]:
        """T_target_source [M, 4, 4] at times t_ns [M] (int ns), with ok [M] and reasons."""
        target, source = _frame_id(target), _frame_id(source)
        t_ns = np.asarray(t_ns, dtype=np.int64)
        M = len(t_ns)
        up_s, up_t = self._up(source), self._up(target)
        common = [f for f in up_s if f in set(up_t)]
        if not common:
            return (np.full((M, 4, 4), np.nan), np.zeros(M, bool),
                    [f"TF has no path between {target!r} and {source!r}"] * M)
        anc = common[0]
        ok = np.ones(M, dtype=bool)
        reasons: List[Optional[str]] = [None] * M

        def to_anc(chain: List[str]) -> np.ndarray:
            acc = np.broadcast_to(np.eye(4), (M, 4, 4)).copy()
            for child in chain[:chain.index(anc)]:
                if child in self.dynamic:
                    parent, ts, Ts = self.dynamic[child]
                    E, good, why = interpolate_poses(t_ns, ts, Ts, self.max_gap_ns, seconds_per_unit=1e-9)
                    for m in np.flatnonzero(~good & ok):
                        reasons[m] = f"TF {parent} -> {child}: {why[m]}"
                    ok[:] &= good
                    E = np.where(good[:, None, None], E, np.eye(4))
                else:
                    E = np.broadcast_to(self.static[child][1], (M, 4, 4))
                acc = E @ acc
            return acc

        T_anc_source = to_anc(up_s)
        T_anc_target = to_anc(up_t)
        out = invert(T_anc_target) @ T_anc_source
        out[~ok] = np.nan
        return out, ok, reasons


# --------------------------------------------------------------------------- lazy access


class BagHandle:
    """Opens the bag on first use and keeps it open until ``close()`` (thread-safe)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._reader = None
        self._lock = threading.Lock()

    def _open(self):
        from rosbags.highlevel import AnyReader
        from rosbags.typesys import Stores, get_typestore

        reader = AnyReader([self.path], default_typestore=get_typestore(Stores.LATEST))
        reader.open()
        return reader

    def read(self, topic: str, log_ns: int, ordinal: int) -> Tuple[Any, str]:
        """(deserialized message, msgtype) of the ``ordinal``-th message on ``topic`` logged at ``log_ns``."""
        with self._lock:
            if self._reader is None:
                try:
                    self._reader = self._open()
                except Exception as e:  # rosbags raises several unrelated types
                    raise InvalidInputError(f"{self.path}: cannot reopen bag ({e})") from None
            reader = self._reader
            conns = [c for c in reader.connections if c.topic == topic]
            try:
                for k, (conn, _, raw) in enumerate(reader.messages(connections=conns, start=log_ns, stop=log_ns + 1)):
                    if k == ordinal:
                        return reader.deserialize(raw, conn.msgtype), conn.msgtype
            except Exception as e:
                raise InvalidInputError(f"{self.path}: cannot read {topic} at {log_ns} ns ({e})") from None
        raise InvalidInputError(f"{self.path}: message on {topic} at {log_ns} ns is missing")

    def close(self) -> None:
        with self._lock:
            if self._reader is not None:
                try:
                    self._reader.close()
                finally:
                    self._reader = None

    def __getstate__(self):
        return {"path": self.path}

    def __setstate__(self, state):
        self.__init__(state["path"])


@dataclass(frozen=True)
class BagImage:
    """Image source: one message of a bag, decoded on call."""

    handle: BagHandle = field(compare=False)
    topic: str
    log_ns: int
    ordinal: int

    def __call__(self) -> np.ndarray:
        msg, msgtype = self.handle.read(self.topic, self.log_ns, self.ordinal)
        return decode_image_msg(msg, msgtype, f"{self.handle.path} {self.topic} @ {self.log_ns} ns")


@dataclass(frozen=True)
class BagDepth:
    """Depth source: one depth Image message of a bag, decoded on call to float32 metres."""

    handle: BagHandle = field(compare=False)
    topic: str
    log_ns: int
    ordinal: int
    scale: float

    def __call__(self) -> np.ndarray:
        msg, msgtype = self.handle.read(self.topic, self.log_ns, self.ordinal)
        return decode_depth_msg(msg, msgtype, self.scale, f"{self.handle.path} {self.topic} @ {self.log_ns} ns")


# --------------------------------------------------------------------------- reader


@dataclass
class _ImgMeta:
    stamp: int
    log_ns: int
    ordinal: int
    frame: str
    size: Optional[Tuple[int, int]]


def _bag_path(src: Path) -> Path:
    src = Path(src).expanduser()
    if not src.exists():
        raise FileNotFoundError(f"bag not found: {src}")
    if src.is_dir() and not (src / "metadata.yaml").is_file():
        files = sorted(list(src.glob("*.mcap")) + list(src.glob("*.db3")))
        if len(files) == 1:
            return files[0]
        raise InvalidInputError(f"{src}: not a rosbag2 folder (no metadata.yaml"
                                + (f", {len(files)} storage files" if files else "") + ")")
    return src


def _camera_info_for(topic: str) -> str:
    base = topic[: -len("/compressed")] if topic.endswith("/compressed") else topic
    return base.rsplit("/", 1)[0] + "/camera_info"


def _pick_topic(topics: Dict[str, str], wanted: Optional[str], types: Sequence[str], what: str, path: Path,
                prefer=None) -> str:
    if wanted:
        if wanted not in topics:
            raise InvalidInputError(f"{path}: no topic {wanted!r}; topics: {sorted(topics)}")
        if topics[wanted] not in types:
            raise InvalidInputError(f"{path}: {wanted} is {topics[wanted]}, expected {' or '.join(types)}")
        return wanted
    cands = sorted(t for t, ty in topics.items() if ty in types)
    if prefer is not None and len(cands) > 1:
        cands = [c for c in cands if prefer(c)] or cands
    if len(cands) == 1:
        return cands[0]
    if not cands:
        raise InvalidInputError(f"{path}: no {what} topic ({' or '.join(types)}); topics: {sorted(topics)}")
    raise InvalidInputError(f"{path}: several {what} topics {cands}; choose one with the option for it")


def _pose_from_msg(msg: Any, msgtype: str) -> Tuple[np.ndarray, str, Optional[str]]:
    """(T_parent_child, parent frame, child frame or None) of a pose-carrying message."""
    if msgtype.endswith("TransformStamped"):
        return _transform_to_T(msg.transform.translation, msg.transform.rotation), msg.header.frame_id, \
            msg.child_frame_id
    pose = msg.pose.pose if msgtype.endswith(("PoseWithCovarianceStamped", "Odometry")) else msg.pose
    child = msg.child_frame_id if msgtype.endswith("Odometry") else None
    return _transform_to_T(pose.position, pose.orientation), msg.header.frame_id, child


def open_bag(src: Path, sl: slice, use_depth: bool, opts: BagOptions) -> Dataset:
    """Read images and their poses from a rosbag2; see ``BagOptions``.

    Frames are the image messages sorted by header stamp (bag time when the stamp is
    zero); ``frames`` slices that list and names are its indices ("000042"). Images
    without a pose (outside the pose/TF time range or across a gap) and invalid poses
    are listed in ``skipped``; keyframe selection then thins the rest.
    """
    from rosbags.highlevel import AnyReader
    from rosbags.typesys import Stores, get_typestore

    path = _bag_path(src)
    try:
        reader = AnyReader([path], default_typestore=get_typestore(Stores.LATEST))
        reader.open()
    except FileNotFoundError:
        raise
    except Exception as e:
        raise InvalidInputError(f"{path}: cannot open bag ({type(e).__name__}: {e})") from None
    try:
        return _read(reader, path, sl, use_depth, opts)
    finally:
        reader.close()


@dataclass
class _Topics:
    image: str
    image_type: str
    info: Optional[str]
    pose: Optional[str]
    depth: Optional[str]
    depth_info: Optional[str]

    def wanted(self) -> set:
        return {self.image, self.info, self.pose, self.depth, self.depth_info} - {None}


@dataclass
class _Scan:
    tf: TfTree
    images: List[_ImgMeta] = field(default_factory=list)
    depths: List[_ImgMeta] = field(default_factory=list)
    infos: List[Tuple[int, Camera]] = field(default_factory=list)
    depth_infos: List[Tuple[int, Camera]] = field(default_factory=list)
    pose_t: List[int] = field(default_factory=list)
    pose_T: List[np.ndarray] = field(default_factory=list)
    pose_frames: set = field(default_factory=set)
    pose_child: Optional[str] = None
    bad_info: Optional[InvalidInputError] = None


def _choose_topics(topics: Dict[str, str], path: Path, use_depth: bool, opts: BagOptions) -> _Topics:
    image = _pick_topic(topics, opts.image_topic, IMAGE_TYPES, "image", path, prefer=lambda t: "depth" not in t.lower())
    info = None
    if opts.fx is None:
        if opts.camera_info_topic:
            info = _pick_topic(topics, opts.camera_info_topic, (INFO_TYPE,), "camera_info", path)
        elif topics.get(_camera_info_for(image)) == INFO_TYPE:
            info = _camera_info_for(image)
        else:
            infos = sorted(t for t, ty in topics.items() if ty == INFO_TYPE and "depth" not in t.lower())
            if len(infos) != 1:
                raise InvalidInputError(f"{path}: cannot tell the camera_info of {image} (candidates {infos}); "
                                        "pass camera_info_topic= or fx, fy, cx, cy")
            info = infos[0]
    pose = None
    if opts.pose_topic or not opts.tf_parent:
        try:
            pose = _pick_topic(topics, opts.pose_topic, POSE_TYPES, "pose", path)
        except InvalidInputError as e:
            if opts.pose_topic:
                raise
            tf_note = "the bag has TF" if any(ty == TF_TYPE for ty in topics.values()) else "the bag has no TF"
            raise InvalidInputError(f"{e}; or give tf_parent (and tf_child) to take poses from TF ({tf_note})") \
                from None
    depth = depth_info = None
    if use_depth and opts.depth_topic:
        depth = _pick_topic(topics, opts.depth_topic, ("sensor_msgs/msg/Image",), "depth", path)
        if opts.depth_camera_info_topic:
            depth_info = _pick_topic(topics, opts.depth_camera_info_topic, (INFO_TYPE,), "camera_info", path)
        elif topics.get(_camera_info_for(depth)) == INFO_TYPE:
            depth_info = _camera_info_for(depth)
    return _Topics(image, topics[image], info, pose, depth, depth_info)


def _messages(reader, wanted, tf: TfTree) -> Iterator[Tuple[object, int, int, object]]:
    """The bag's messages on the ``wanted`` topics in log order, as (connection, log time
    ns, ordinal among messages of that topic logged at the same ns, deserialised message);
    every /tf and /tf_static message goes into ``tf`` instead."""
    conns = [c for c in reader.connections if c.topic in wanted or c.msgtype == TF_TYPE]
    seen_at: Dict[Tuple[str, int], int] = defaultdict(int)
    for conn, log_ns, raw in reader.messages(connections=conns):
        ordinal = seen_at[(conn.topic, log_ns)]
        seen_at[(conn.topic, log_ns)] += 1
        msg = reader.deserialize(raw, conn.msgtype)
        if conn.msgtype == TF_TYPE:
            static = conn.topic.rstrip("/").endswith("tf_static")
            for ts in msg.transforms:
                tf.add(ts.header.frame_id, ts.child_frame_id, stamp_ns(ts, log_ns),
                       _transform_to_T(ts.transform.translation, ts.transform.rotation), static)
            continue
        yield conn, log_ns, ordinal, msg


def _scan(reader, path: Path, tp: _Topics, opts: BagOptions) -> _Scan:
    """One pass over the bag: image/depth metadata (no pixels), camera_info, poses, TF."""
    sc = _Scan(TfTree(int(round(opts.max_gap * 1e9))))
    try:
        for conn, log_ns, ordinal, msg in _messages(reader, tp.wanted(), sc.tf):
            topic = conn.topic
            if topic == tp.image:
                size = None if tp.image_type.endswith("CompressedImage") else (int(msg.width), int(msg.height))
                sc.images.append(_ImgMeta(stamp_ns(msg, log_ns), log_ns, ordinal, _frame_id(msg.header.frame_id),
                                          size))
            elif topic == tp.depth:
                sc.depths.append(_ImgMeta(stamp_ns(msg, log_ns), log_ns, ordinal, _frame_id(msg.header.frame_id),
                                          (int(msg.width), int(msg.height))))
            elif topic in (tp.info, tp.depth_info):
                try:
                    cam = camera_from_info(msg, f"{path} {topic}")
                except InvalidInputError as e:
                    sc.bad_info = e
                    continue
                (sc.infos if topic == tp.info else sc.depth_infos).append((stamp_ns(msg, log_ns), cam))
            elif topic == tp.pose:
                _add_pose(sc, msg, conn.msgtype, log_ns)
    except InvalidInputError:
        raise
    except Exception as e:  # rosbags raises several unrelated types for damaged bags
        raise InvalidInputError(f"{path}: cannot read bag ({type(e).__name__}: {e})") from None
    sc.tf.freeze()
    sc.infos.sort(key=lambda x: x[0])
    sc.depth_infos.sort(key=lambda x: x[0])
    sc.depths.sort(key=lambda m: (m.stamp, m.log_ns, m.ordinal))
    return sc


def _add_pose(sc, msg, msgtype: str, log_ns: int) -> None:
    """Append one pose-topic message (PoseStamped / Odometry / TransformStamped ...) to a scan."""
    T, parent, child = _pose_from_msg(msg, msgtype)
    sc.pose_t.append(stamp_ns(msg, log_ns))
    sc.pose_T.append(T)
    sc.pose_frames.add(_frame_id(parent))
    if child:
        sc.pose_child = _frame_id(child)


def _camera_at(series: List[Tuple[int, Camera]], t: int) -> Camera:
    """The camera_info in force at t ns: the latest at or before t, else the first."""
    j = int(np.searchsorted([s for s, _ in series], t, side="right")) - 1
    return series[max(j, 0)][1]


def _poses_from_topic(sc: _Scan, path: Path, topic: str, stamps: np.ndarray, cam_frames: List[str],
                      opts: BagOptions):
    t = np.asarray(sc.pose_t, dtype=np.int64)
    if len(t) == 0:
        raise InvalidInputError(f"{path}: no messages on {topic}")
    if len(sc.pose_frames) > 1:
        raise InvalidInputError(f"{path}: {topic} mixes frames {sorted(sc.pose_frames)}")
    Ts = np.asarray(sc.pose_T)
    finite = np.all(np.isfinite(Ts.reshape(len(Ts), -1)), axis=1)
    order = np.argsort(t[finite], kind="stable")
    t, Ts = t[finite][order], Ts[finite][order]
    last = np.append(t[1:] != t[:-1], True)  # at equal stamps the last message wins
    T_all, ok, why = interpolate_poses(stamps, t[last], Ts[last], int(round(opts.max_gap * 1e9)),
                                       seconds_per_unit=1e-9)
    body = _frame_id(opts.pose_child_frame) if opts.pose_child_frame else sc.pose_child
    if opts.T_body_cam is not None:
        return T_all @ as_matrix4(opts.T_body_cam, "T_body_cam"), ok, why
    if not body:
        return T_all, ok, why
    for frame in sorted(set(cam_frames)):
        if frame == body:
            continue
        idx = [k for k, f in enumerate(cam_frames) if f == frame]
        if not frame or not sc.tf.connected(body, frame):
            raise InvalidInputError(
                f"{path}: {topic} gives the pose of {body!r} but the images are in frame {frame!r} and TF has no "
                "path between them; pass T_body_cam (16 numbers) or pose_child_frame")
        E, good, why_tf = sc.tf.lookup(body, frame, stamps[idx])
        T_all[idx] = T_all[idx] @ np.where(good[:, None, None], E, np.eye(4))
        for j, k in enumerate(idx):
            if not good[j] and ok[k]:
                ok[k], why[k] = False, why_tf[j]
    return T_all, ok, why


def _poses_from_tf(sc: _Scan, path: Path, stamps: np.ndarray, cam_frames: List[str], opts: BagOptions):
    tf = sc.tf
    parent = _frame_id(opts.tf_parent)
    if parent not in tf.frames():
        raise InvalidInputError(f"{path}: tf_parent {parent!r} is not in TF (frames: {sorted(tf.frames())})")
    child = _frame_id(opts.tf_child) if opts.tf_child else None
    extra = None
    if opts.T_body_cam is not None:
        if not child:
            raise InvalidInputError("bag dataset: T_body_cam with tf_parent needs tf_child (the frame it starts from)")
        extra = as_matrix4(opts.T_body_cam, "T_body_cam")
    T_all = np.full((len(stamps), 4, 4), np.nan)
    ok = np.zeros(len(stamps), dtype=bool)
    why: List[Optional[str]] = [None] * len(stamps)
    for frame in sorted(set(cam_frames)):
        idx = [k for k, f in enumerate(cam_frames) if f == frame]
        if extra is not None:
            target = child
        elif frame and frame in tf.frames() and tf.connected(parent, frame):
            target = frame  # parent -> ... -> tf_child -> ... -> the image's optical frame
            if child and child != frame and not tf.connected(child, frame):
                raise InvalidInputError(f"{path}: tf_child {child!r} is not connected to the image frame {frame!r}")
        elif child:
            logger.warning("%s: image frame %r is not in TF; taking tf_child %r as the camera optical frame",
                           path, frame, child)
            target = child
        else:
            raise InvalidInputError(f"{path}: image frame {frame!r} is not connected to {parent!r} in TF; "
                                    "pass tf_child (the camera optical frame)")
        E, good, why_tf = tf.lookup(parent, target, stamps[idx])
        T_all[idx] = E if extra is None else E @ extra
        ok[idx] = good
        for j, k in enumerate(idx):
            why[k] = why_tf[j]
    return T_all, ok, why


def _pair_depth(sc: _Scan, path: Path, handle: BagHandle, topic: str, meta: _ImgMeta, cam: Camera,
                opts: BagOptions, warned: set):
    """(depth source, depth camera, T_cam_depth) of the depth image nearest ``meta`` in time, or Nones."""
    if not sc.depths:
        return None, None, None
    t_d = [m.stamp for m in sc.depths]
    j = int(np.searchsorted(t_d, meta.stamp))
    best = min((i for i in (j - 1, j) if 0 <= i < len(t_d)), key=lambda i: abs(t_d[i] - meta.stamp))
    if abs(t_d[best] - meta.stamp) > opts.depth_max_dt * 1e9:
        return None, None, None
    dm = sc.depths[best]
    depth_cam = _camera_at(sc.depth_infos, dm.stamp) if sc.depth_infos else None
    if depth_cam is None and dm.size != (cam.width, cam.height):
        depth_cam = cam.scaled(dm.size[0] / cam.width, dm.size[1] / cam.height)
    T_cd = np.eye(4)
    if dm.frame and meta.frame and dm.frame != meta.frame:
        E, good, why = sc.tf.lookup(meta.frame, dm.frame, np.asarray([meta.stamp]))
        if good[0]:
            T_cd = E[0]
        elif (meta.frame, dm.frame) not in warned:
            warned.add((meta.frame, dm.frame))
            logger.warning("%s: %s; taking T_cam_depth = I", path, why[0])
    return BagDepth(handle, topic, dm.log_ns, dm.ordinal, opts.depth_scale), depth_cam, T_cd


def _read(reader, path: Path, sl: slice, use_depth: bool, opts: BagOptions) -> Dataset:
    topics: Dict[str, str] = {}
    for c in reader.connections:
        topics.setdefault(c.topic, c.msgtype)
    if opts.image_topics is not None:
        return _read_rig(reader, topics, path, sl, opts)
    tp = _choose_topics(topics, path, use_depth, opts)
    sc = _scan(reader, path, tp, opts)
    if not sc.images:
        raise InvalidInputError(f"{path}: no messages on {tp.image}")
    if tp.info and not sc.infos:
        raise (sc.bad_info or InvalidInputError(f"{path}: no usable message on {tp.info}"))

    order = sorted(range(len(sc.images)), key=lambda i: (sc.images[i].stamp, sc.images[i].log_ns,
                                                          sc.images[i].ordinal))
    chosen = select([(f"{k:06d}", sc.images[i]) for k, i in enumerate(order)], sl)
    handle = BagHandle(path)
    fixed_cam = None
    if opts.fx is not None:
        size = next((m.size for _, m in chosen if m.size), None)
        if size is None and chosen:  # compressed images carry no size: decode one
            img = BagImage(handle, tp.image, chosen[0][1].log_ns, chosen[0][1].ordinal)()
            size = (img.shape[1], img.shape[0])
        size = size or (1, 1)
        fixed_cam = camera_from_values(opts.fx, opts.fy, opts.cx, opts.cy, size[0], size[1], where="bag intrinsics")

    stamps = np.asarray([m.stamp for _, m in chosen], dtype=np.int64)
    cam_frames = [m.frame for _, m in chosen]
    if tp.pose:
        T_all, ok, why = _poses_from_topic(sc, path, tp.pose, stamps, cam_frames, opts)
    else:
        T_all, ok, why = _poses_from_tf(sc, path, stamps, cam_frames, opts)

    records, skipped, warned = [], [], set()
    for k, (name, meta) in enumerate(chosen):
        if not ok[k]:
            skipped.append((name, f"no pose at t={meta.stamp * 1e-9:.9f}: {why[k]}"))
            continue
        cam = fixed_cam if fixed_cam is not None else _camera_at(sc.infos, meta.stamp)
        if meta.size is not None and meta.size != (cam.width, cam.height):
            skipped.append((name, f"image is {meta.size[0]}x{meta.size[1]} but camera_info says "
                                  f"{cam.width}x{cam.height}"))
            continue
        depth, depth_cam, T_cd = _pair_depth(sc, path, handle, tp.depth, meta, cam, opts, warned)
        records.append(FrameRecord(name=name, T_world_cam=T_all[k], camera=cam,
                                   image=BagImage(handle, tp.image, meta.log_ns, meta.ordinal),
                                   stamp=meta.stamp * 1e-9, depth=depth, depth_camera=depth_cam, T_cam_depth=T_cd))
    kept, skipped = drop_invalid_poses("bag", path, records, skipped)
    if opts.kf_select and kept:
        keep = select_keyframes(np.stack([r.T_world_cam for r in kept]), opts.kf_min_dist, opts.kf_min_angle_deg)
        logger.info("%s: %d of %d posed images kept as keyframes (kf_min_dist %.3g m, kf_min_angle_deg %.3g)",
                    path, len(keep), len(kept), opts.kf_min_dist, opts.kf_min_angle_deg)
        kept = [kept[i] for i in keep]
    return Dataset("bag", path, kept, skipped, use_depth, handle.close)


# --------------------------------------------------------------------------- multi-camera rigs


@dataclass
class _RigCam:
    camera_id: str
    image: str
    image_type: str
    info: str
    images: List[_ImgMeta] = field(default_factory=list)
    infos: List[Tuple[int, Camera]] = field(default_factory=list)
    bad_info: Optional[InvalidInputError] = None


def _camera_id_for(topic: str) -> str:
    """'/cam_front/image_raw[/compressed]' -> 'cam_front' (the node's camera namespace)."""
    base = topic[: -len("/compressed")] if topic.endswith("/compressed") else topic
    ns = base.rsplit("/", 1)[0].strip("/")
    return ns or base.strip("/")


def _rig_cameras(topics: Dict[str, str], path: Path, opts: BagOptions) -> List[_RigCam]:
    images = _name_list(opts.image_topics, "image_topics")
    ids = _name_list(opts.camera_ids, "camera_ids") if opts.camera_ids is not None else \
        [_camera_id_for(t) for t in images]
    infos = _name_list(opts.camera_info_topics, "camera_info_topics") if opts.camera_info_topics is not None \
        else [None] * len(images)
    dup = sorted({c for c in ids if ids.count(c) > 1})
    if dup:
        raise InvalidInputError(f"{path}: camera ids {dup} repeat (from image_topics {images}); "
                                "name the cameras with camera_ids=")
    if len(set(images)) != len(images):
        raise InvalidInputError(f"{path}: image_topics lists a topic twice: {images}")
    out = []
    for cid, image, info in zip(ids, images, infos):
        _pick_topic(topics, image, IMAGE_TYPES, "image", path)
        if info is None:
            info = _camera_info_for(image)
            if topics.get(info) != INFO_TYPE:
                raise InvalidInputError(f"{path}: camera {cid!r}: no CameraInfo topic {info} for {image}; "
                                        "pass camera_info_topics= (one per image topic)")
        else:
            _pick_topic(topics, info, (INFO_TYPE,), "camera_info", path)
        out.append(_RigCam(cid, image, topics[image], info))
    return out


def _scan_rig(reader, path: Path, cams: List[_RigCam], pose_topic: Optional[str], opts: BagOptions) -> _Scan:
    """One pass: every camera's image metadata (no pixels) and camera_info, poses, TF."""
    by_image = {c.image: c for c in cams}
    by_info: Dict[str, List[_RigCam]] = defaultdict(list)
    for c in cams:
        by_info[c.info].append(c)  # two cameras may share one camera_info topic
    wanted = set(by_image) | set(by_info) | ({pose_topic} if pose_topic else set())
    sc = _Scan(TfTree(int(round(opts.max_gap * 1e9))))
    try:
        for conn, log_ns, ordinal, msg in _messages(reader, wanted, sc.tf):
            topic = conn.topic
            if topic in by_image:
                c = by_image[topic]
                size = None if c.image_type.endswith("CompressedImage") else (int(msg.width), int(msg.height))
                c.images.append(_ImgMeta(stamp_ns(msg, log_ns), log_ns, ordinal, _frame_id(msg.header.frame_id),
                                         size))
            if topic in by_info:
                for c in by_info[topic]:
                    try:
                        c.infos.append((stamp_ns(msg, log_ns), camera_from_info(msg, f"{path} {topic}")))
                    except InvalidInputError as e:
                        c.bad_info = e
            if topic == pose_topic:
                _add_pose(sc, msg, conn.msgtype, log_ns)
    except InvalidInputError:
        raise
    except Exception as e:  # rosbags raises several unrelated types for damaged bags
        raise InvalidInputError(f"{path}: cannot read bag ({type(e).__name__}: {e})") from None
    sc.tf.freeze()
    for c in cams:
        c.infos.sort(key=lambda x: x[0])
        c.images.sort(key=lambda m: (m.stamp, m.log_ns, m.ordinal))
    return sc


def _static_extrinsic(tf: TfTree, base: str, frame: str) -> Optional[np.ndarray]:
    """T_base_frame [4, 4] through /tf_static edges only (a mount is fixed), or None."""

    def up(f: str) -> List[Tuple[str, np.ndarray]]:
        chain, acc = [(f, np.eye(4))], np.eye(4)
        while f in tf.static and tf.static[f][0] not in [c for c, _ in chain]:
            parent, T = tf.static[f]
            acc = T @ acc
            f = parent
            chain.append((f, acc))
        return chain  # (ancestor, T_ancestor_start)

    from_base = dict(up(base))
    for anc, T_anc_frame in up(frame):
        if anc in from_base:
            return invert(from_base[anc]) @ T_anc_frame
    return None


def _rig_extrinsic(sc: _Scan, path: Path, cam: _RigCam, base: str) -> Tuple[str, np.ndarray]:
    frames = sorted({m.frame for m in cam.images})
    if len(frames) != 1 or not frames[0]:
        raise InvalidInputError(f"{path}: camera {cam.camera_id!r} ({cam.image}): its images must all carry one "
                                f"header frame_id (the camera optical frame), found {frames}")
    frame = frames[0]
    T = _static_extrinsic(sc.tf, base, frame)
    if T is None:
        dyn = " (TF has a path, but not through /tf_static alone: a camera mount must be static)" \
            if sc.tf.connected(base, frame) else ""
        raise InvalidInputError(
            f"{path}: camera {cam.camera_id!r} ({cam.image}): no extrinsic, /tf_static has no transform "
            f"{base!r} -> {frame!r}{dyn}; record the camera mount on /tf_static or set base_frame")
    return frame, T


def _check_body_source(sc: _Scan, path: Path, pose_topic: Optional[str], opts: BagOptions) -> None:
    """InvalidInputError when the body pose source cannot reach base_frame at all."""
    base = _frame_id(opts.base_frame)
    if pose_topic:
        body = _frame_id(opts.pose_child_frame) if opts.pose_child_frame else sc.pose_child
        if body and body != base and not sc.tf.connected(body, base):
            raise InvalidInputError(f"{path}: {pose_topic} gives the pose of {body!r} but TF has no path from it to "
                                    f"base_frame {base!r}; set base_frame (the frame the camera mounts hang from) "
                                    "or pose_child_frame")
        return
    parent = _frame_id(opts.tf_parent)
    if parent not in sc.tf.frames():
        raise InvalidInputError(f"{path}: tf_parent {parent!r} is not in TF (frames: {sorted(sc.tf.frames())})")
    if not sc.tf.connected(parent, base):
        raise InvalidInputError(f"{path}: base_frame {base!r} is not connected to tf_parent {parent!r} in TF")


def _rig_body_poses(sc: _Scan, path: Path, pose_topic: Optional[str], stamps: np.ndarray, opts: BagOptions):
    """T_world_base [M, 4, 4] at stamps [M] ns, ok [M], reasons (source checked by _check_body_source)."""
    base = _frame_id(opts.base_frame)
    if pose_topic:
        # the pose topic's body is carried to base_frame exactly as to an image frame
        return _poses_from_topic(sc, path, pose_topic, stamps, [base] * len(stamps), opts)
    return sc.tf.lookup(_frame_id(opts.tf_parent), base, stamps)


def _read_rig(reader, topics: Dict[str, str], path: Path, sl: slice, opts: BagOptions) -> Dataset:
    """Every image of every camera of ``opts.image_topics`` as a posed frame (see BagOptions)."""
    cams = _rig_cameras(topics, path, opts)
    pose_topic = None
    if opts.pose_topic or not opts.tf_parent:
        try:
            pose_topic = _pick_topic(topics, opts.pose_topic, POSE_TYPES, "pose", path)
        except InvalidInputError as e:
            if opts.pose_topic:
                raise
            raise InvalidInputError(f"{e}; or give tf_parent to take the body pose from TF") from None
    sc = _scan_rig(reader, path, cams, pose_topic, opts)
    base = _frame_id(opts.base_frame)
    _check_body_source(sc, path, pose_topic, opts)
    handle = BagHandle(path)
    records, skipped = [], []
    for ci, cam in enumerate(cams):
        if not cam.images:
            raise InvalidInputError(f"{path}: camera {cam.camera_id!r}: no messages on {cam.image}")
        if not cam.infos:
            raise (cam.bad_info or InvalidInputError(f"{path}: camera {cam.camera_id!r}: no usable message on "
                                                     f"{cam.info}"))
        _, T_base_cam = _rig_extrinsic(sc, path, cam, base)
        chosen = select([(f"{cam.camera_id}/{k:06d}", m) for k, m in enumerate(cam.images)], sl)
        stamps = np.asarray([m.stamp for _, m in chosen], dtype=np.int64)
        T_wb, ok, why = _rig_body_poses(sc, path, pose_topic, stamps, opts) if len(chosen) else ([], [], [])
        cam_records = []
        for k, (name, meta) in enumerate(chosen):
            if not ok[k]:
                skipped.append((name, f"no body pose at t={meta.stamp * 1e-9:.9f}: {why[k]}"))
                continue
            camera = _camera_at(cam.infos, meta.stamp)
            if meta.size is not None and meta.size != (camera.width, camera.height):
                skipped.append((name, f"image is {meta.size[0]}x{meta.size[1]} but camera_info says "
                                      f"{camera.width}x{camera.height}"))
                continue
            cam_records.append(FrameRecord(
                name=name, T_world_cam=T_wb[k] @ T_base_cam, camera=camera,
                image=BagImage(handle, cam.image, meta.log_ns, meta.ordinal), stamp=meta.stamp * 1e-9,
                camera_id=cam.camera_id, T_world_base=np.array(T_wb[k])))
        kept, skipped = drop_invalid_poses("bag", path, cam_records, skipped)
        if opts.kf_select and kept:
            # on the body pose: every camera of a synchronised rig keeps the same captures
            keep = select_keyframes(np.stack([r.T_world_base for r in kept]), opts.kf_min_dist,
                                    opts.kf_min_angle_deg)
            logger.info("%s: camera %s: %d of %d posed images kept as keyframes", path, cam.camera_id, len(keep),
                        len(kept))
            kept = [kept[i] for i in keep]
        records += [(r.stamp, ci, r) for r in kept]
    records.sort(key=lambda x: (x[0], x[1]))
    return Dataset("bag", path, [r for _, _, r in records], skipped, False, handle.close)
