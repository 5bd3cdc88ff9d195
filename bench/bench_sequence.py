"""Sequence benchmark: the fused pose *stream* (PoseTracker through drifting odometry) over time.

    make bench-sequence [MODE=core|node] [RUNS=7scenes,7scenes+foreign40,kitti,room+foreign30]
    .venv/bin/python bench/bench_sequence.py [--mode core|node] [--runs 7scenes,7scenes+foreign40,kitti]
        [--shared ../shared] [--out out/bench_seq] [--max-rate HZ] [--latency-ms MS]
        [--foreign-source auto|strecha|room|map] [--tracker-options "{window: 10}"]
        [--fuse-degenerate] [--no-prior] [--seed N]

A posed sequence is replayed at its sensor rate. The body (base_link) carries the camera
on the demo mount (``reloc_ros.demo.replay.DEFAULT_T_BASE_CAM``); its odometry is the
ground truth corrupted by ``reloc_ros.sequence.drifting_odometry`` (seeded; 2 % of the
distance, 1 deg/m yaw). A run ``<dataset>+foreign<N>`` replaces N consecutive frames
(from ``--foreign-at`` of the sequence) by images of another place, published with the
same CameraInfo while the odometry stream continues (``--foreign-source``): Strecha
Herz-Jesus-P25 facade images cropped to the query's aspect and resized (grey for KITTI;
the default with ../shared), a differently textured rendered room (the default for
``room`` and without ../shared), or ``map``: frames of another place *in the same map*
(7-Scenes frames 0.., the room's keyframes), which localize confidently and metres from
the body, the hard case for gating.

Modes:

- ``core``: ``Localizer`` + ``PoseTracker`` in this process. The node's newest-frame
  worker is emulated against the sensor clock (``reloc_ros.sequence.newest_frame_schedule``):
  a frame arriving while a localization runs is replaced by newer ones; each
  localization takes its measured wall time (or ``--latency-ms``), and ``--max-rate``
  throttles in stamp time like the node's ``max_rate``. The fused pose at every frame is
  ``tracker.predict`` with the tracker state of the fixes finished when the frame arrived.
- ``node``: ``reloc_node`` as a separate process over DDS on a private domain, on
  simulated time (``use_sim_time``; this process publishes /clock from a synthetic clock
  starting at a fixed time and paced in real time). Image + CameraInfo + /tf
  odom->base_link (the drifting odometry) at each image stamp, base_link->camera on
  /tf_static (latched). map->base at every frame stamp is looked up (interpolated, no
  extrapolation, as tf2) from the map->odom the node published and our odom->base; raw
  fixes come from ``~/pose_raw``, fused poses with covariance from ``~/pose``, counters
  from /diagnostics.

Datasets (../shared/data; a missing one is skipped with the reason):
``7scenes``: redkitchen, map 0:250:5 with depth, every frame 250..499 at 30 Hz;
``kitti``: 06, map 0:51:2, every frame 0..50 at 10 Hz;
``room``: the demo's rendered room (36-keyframe orbit map), 150 frames of a slower orbit
at 30 Hz, needs nothing outside the package. Maps and rendered frames are cached under
--out and reused.

Measured (lengths m/cm, angles deg): TF error of map->base at every frame (median, p95,
max), the fraction of frames over 25 cm / 5 deg, TF jumps (body displacement caused by a
frame-to-frame change of map->odom; max and count > 10 cm), time to first TF, fixes
accepted / rejected / ignored, foreign fixes accepted, raw fix vs fused errors, the
growth of the TF error over the foreign block vs the odometry drift over it, and the
fused NEES (position / rotation; calibrated median 2.37). Output: --out/<mode>_<run>.json
and .png (error over time: raw fixes as dots, fused TF, odometry alone from the true
map->odom at the first TF frame), and --out/<mode>_summary.json. Prints; asserts nothing.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional

import numpy as np
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from reloc_ros.config import from_dict  # noqa: E402
from reloc_ros.demo.replay import DEFAULT_T_BASE_CAM  # noqa: E402
from reloc_ros.geometry import invert  # noqa: E402
from reloc_ros.ros.frames import camera_to_body  # noqa: E402  (pure numpy)
from reloc_ros.sequence import (OdometryDrift, RawFix, drifting_odometry, estimate_metrics,  # noqa: E402
                                newest_frame_schedule, odometry_only, sequence_metrics)
from reloc_ros.tracking import TrackerConfig  # noqa: E402
from reloc_ros.types import Camera  # noqa: E402

T0_NS = 1_000 * 1_000_000_000  # the synthetic clock's first frame stamp (node mode, and core-mode stamps)
NS = 1_000_000_000
DATASETS = ("7scenes", "kitti", "room")


# ---------------------------------------------------------------------------- sequences


@dataclass
class SequenceRun:
    """One replay: frames, truth, odometry, foreign block."""

    name: str  # run name, e.g. 7scenes+foreign40
    dataset: str
    map_path: Path
    camera: Camera
    rate_hz: float
    names: List[str]
    T_world_cam: np.ndarray  # [N, 4, 4] true camera poses
    load: Callable[[int], np.ndarray]  # frame index -> image of the sequence
    foreign: np.ndarray  # [N] bool
    foreign_images: Dict[int, np.ndarray] = field(default_factory=dict)
    foreign_source: str = ""
    T_base_cam: np.ndarray = field(default_factory=lambda: DEFAULT_T_BASE_CAM.copy())
    odometry_seed: int = 0

    def __post_init__(self) -> None:
        n = len(self.T_world_cam)
        self.stamps_ns = (T0_NS + np.round(np.arange(n) * NS / self.rate_hz)).astype(np.int64)
        self.T_map_base = np.stack([T @ invert(self.T_base_cam) for T in self.T_world_cam])
        self.T_odom_base = drifting_odometry(self.T_map_base, OdometryDrift(translation=0.02, yaw_deg_per_m=1.0,
                                                                           seed=self.odometry_seed))

    def __len__(self) -> int:
        return len(self.T_world_cam)

    def image(self, i: int) -> np.ndarray:
        return self.foreign_images[i] if self.foreign[i] else self.load(i)


def _cached_map(path: Path, make_dataset: Callable[[], object]) -> Path:
    from bench_core import cached_map
    from reloc_ros.maps import MapBuildConfig

    return cached_map(path, MapBuildConfig(), make_dataset)


def _room_frames(out: Path, what: str, camera: Camera):
    """Rendered-room frames, cached as posed folders: 'map' (36-keyframe orbit), 'seq' (150
    frames of a slower, smaller orbit at 1 cm a frame) and 'foreign' (a differently
    textured room without boxes, same poses as 'seq')."""
    from reloc_ros.datasets import open_dataset, write_folder_dataset
    from reloc_ros.demo.scene import ProceduralRoom, RoomConfig, orbit_poses, render_frames

    d = out / "room" / what
    if not d.is_dir():  # write_folder_dataset moves a finished folder into place
        room = ProceduralRoom(RoomConfig(seed=1234, boxes=())) if what == "foreign" else ProceduralRoom()
        if what == "map":
            poses = orbit_poses(room, 36)
        else:
            poses = orbit_poses(ProceduralRoom(), 600, radius_scale=0.85, phase=0.3)[:150]
        t = time.perf_counter()
        frames = render_frames(room, poses, camera, f"{what}_")
        write_folder_dataset(frames, d, overwrite=True)
        print(f"rendered {len(frames)} {what} frames of the room in {time.perf_counter() - t:.0f} s", flush=True)
    return open_dataset("folder", d, use_depth=(what == "map"))


def _strecha_foreign(src: Path, n: int, camera: Camera, grey: bool) -> List[np.ndarray]:
    """n images of the Strecha facade, each a window of the query's aspect (80 % of the largest
    such window, panned along the image), resized to the query size."""
    import cv2

    files = sorted((src / "images").glob("*.jpg"))
    if not files:
        raise FileNotFoundError(f"no images in {src / 'images'}")
    out, cache = [], {}
    w, h = camera.width, camera.height
    for j in range(n):
        f = files[j % len(files)]
        if f not in cache:
            cache[f] = cv2.cvtColor(cv2.imread(str(f), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
        img = cache[f]
        H, W = img.shape[:2]
        cw, ch = (int(H * w / h), H) if W / H > w / h else (W, int(W * h / w))
        cw, ch = int(cw * 0.8), int(ch * 0.8)
        x0 = int((W - cw) * (0.5 + 0.5 * math.sin(0.7 * j)))
        y0 = int((H - ch) * (0.5 + 0.3 * math.cos(0.9 * j)))
        crop = cv2.resize(img[y0:y0 + ch, x0:x0 + cw], (w, h), interpolation=cv2.INTER_AREA)
        out.append(cv2.cvtColor(crop, cv2.COLOR_RGB2GRAY) if grey else crop)
    return out


def _room_foreign(out: Path, n: int, camera: Camera, grey: bool) -> List[np.ndarray]:
    import cv2

    from reloc_ros.demo.scene import ProceduralRoom, RoomConfig, orbit_poses

    room = ProceduralRoom(RoomConfig(seed=1234, boxes=()))
    imgs = [room.render(T, camera)[0] for T in orbit_poses(room, max(n, 2), radius_scale=0.85)[:n]]
    return [cv2.cvtColor(i, cv2.COLOR_RGB2GRAY) if grey else i for i in imgs]


def prepare(run: str, args) -> Optional[SequenceRun]:
    """The SequenceRun for ``<dataset>[+foreign<N>]``, or None (reason printed) when data are missing."""
    from reloc_ros.datasets import open_dataset
    from reloc_ros.demo.scene import demo_camera

    dataset, _, extra = run.partition("+")
    n_foreign = 0
    if extra:
        if not extra.startswith("foreign") or not extra[7:].isdigit():
            raise SystemExit(f"bad run name {run!r}: expected <dataset>[+foreign<N>]")
        n_foreign = int(extra[7:])
    if dataset not in DATASETS:
        raise SystemExit(f"unknown dataset {dataset!r} in run {run!r}; known: {', '.join(DATASETS)}")
    out = Path(args.out)
    data = Path(args.shared) / "data"
    if dataset == "7scenes":
        src = data / "7scenes_redkitchen_0000_0499"
        if not src.is_dir():
            print(f"[{run}] skipped: {src} is absent")
            return None
        map_path = _cached_map(out / "7scenes_map", lambda: open_dataset("7scenes", src, frames="0:250:5"))
        ds = open_dataset("7scenes", src, frames="250:500", use_depth=False)
        rate = 30.0
    elif dataset == "kitti":
        src = data / "kitti_odometry_06_0000_0050"
        if not src.is_dir():
            print(f"[{run}] skipped: {src} is absent")
            return None
        map_path = _cached_map(out / "kitti_map", lambda: open_dataset("kitti", src, frames="0:51:2"))
        ds = open_dataset("kitti", src, frames="0:51", use_depth=False)
        rate = 10.0
    else:
        cam = demo_camera()
        map_path = _cached_map(out / "room_map", lambda: [f for f in _room_frames(out, "map", cam)])
        ds = _room_frames(out, "seq", cam)
        rate = 30.0
    first = ds[0]
    n = len(ds)
    foreign = np.zeros(n, bool)
    images: Dict[int, np.ndarray] = {}
    source = ""
    if n_foreign:
        if n_foreign >= n:
            raise SystemExit(f"run {run}: {n_foreign} foreign frames but only {n} frames")
        s = min(int(round(args.foreign_at * n)), n - n_foreign)
        foreign[s:s + n_foreign] = True
        grey = first.image.ndim == 2
        strecha = data / "strecha_herzjesus_p25_half"
        kind = args.foreign_source
        if kind == "auto":
            kind = "room" if dataset == "room" or not strecha.is_dir() else "strecha"
        if kind == "map" and dataset == "kitti":
            raise SystemExit("--foreign-source map needs 7scenes or room (KITTI's map covers the whole sequence)")
        if kind == "strecha" and not strecha.is_dir():
            print(f"[{run}] skipped: {strecha} is absent (foreign images)")
            return None
        if kind == "strecha":
            imgs = _strecha_foreign(strecha, n_foreign, first.camera, grey)
            source = (f"Strecha Herz-Jesus-P25 (half size) images, windows of the query aspect panned over the "
                      f"facade, resized to {first.camera.width}x{first.camera.height}{' grey' if grey else ''}")
        elif kind == "room":
            imgs = _room_foreign(out, n_foreign, first.camera, grey)
            source = "rendered room with another texture seed (1234) and no boxes, same camera"
        elif dataset == "7scenes":
            mds = open_dataset("7scenes", src, frames=f"0:{n_foreign}", use_depth=False)
            imgs = [mds[k].image for k in range(n_foreign)]
            source = (f"7-Scenes redkitchen frames 0..{n_foreign - 1}: another place IN the map (a consistent "
                      f"trajectory whose fixes are confident and metres from the body)")
        else:
            mds = _room_frames(out, "map", first.camera)
            imgs = [mds[k % len(mds)].image for k in range(n_foreign)]
            source = "the room's own map keyframes (another place in the map, confident fixes)"
        images = {s + k: im for k, im in enumerate(imgs)}
    return SequenceRun(name=run, dataset=dataset, map_path=map_path, camera=first.camera, rate_hz=rate,
                       names=list(ds.names), T_world_cam=np.asarray(ds.poses, dtype=np.float64),
                       load=lambda i: ds[i].image, foreign=foreign, foreign_images=images, foreign_source=source,
                       odometry_seed=args.seed)


# ---------------------------------------------------------------------------- core mode


def _status(res) -> str:
    return getattr(res.status, "value", str(res.status))


def run_core(seq: SequenceRun, args, tracker_cfg: TrackerConfig) -> dict:
    """Localizer + PoseTracker in-process, the node's newest-frame worker emulated on the sensor clock."""
    from reloc_ros.localizer import Localizer, LocalizerConfig, PosePrior
    from reloc_ros.tracking import Fix, PoseTracker, TrackState
    from reloc_ros.types import Status

    loc = Localizer.from_map(seq.map_path, LocalizerConfig(top_k=args.top_k))
    rng = np.random.default_rng(0)
    shape = seq.load(0).shape
    for img in (rng.integers(0, 255, shape, dtype=np.uint8), seq.load(0)):  # warm-up, outside the tracker
        loc.localize(img, seq.camera)
    tracker = PoseTracker(tracker_cfg)
    snapshots: List[tuple] = []  # (done_ns, tracker copy)
    fixes: List[RawFix] = []
    records: List[dict] = []
    pose_topic: List[tuple] = []  # (frame, T_map_base, covariance) of each fused pose ~/pose would carry

    def localize(j: int, start_ns: int) -> int:
        stamp, odom = int(seq.stamps_ns[j]), seq.T_odom_base[j]
        prior = None
        if args.use_prior and tracker.state == TrackState.TRACKING:
            T_mb, C_mb = tracker.predict(stamp, odom)
            T_mc, C_mc = camera_to_body(T_mb, C_mb, invert(seq.T_base_cam))
            prior = PosePrior(T_mc, C_mc)
        img = seq.image(j)
        t = time.perf_counter()
        res = loc.localize(img, seq.camera, prior)
        wall_ns = int((time.perf_counter() - t) * 1e9)
        dur = int(args.latency_ms * 1e6) if args.latency_ms is not None else wall_ns
        rec = {"index": j, "name": seq.names[j], "foreign": bool(seq.foreign[j]), "status": _status(res),
               "localize_ms": wall_ns * 1e-6, "retrieval": getattr(res, "retrieval", ""),
               "confidence": float(res.confidence), "inliers": [int(x) for x in res.inliers],
               "message": res.message, "start_s": (start_ns - seq.stamps_ns[0]) * 1e-9,
               "done_s": (start_ns + dur - seq.stamps_ns[0]) * 1e-9, "prior": prior is not None}
        if res.status in (Status.OK, Status.DEGENERATE) and res.T_world_cam is not None:
            T_mb, C_mb = camera_to_body(res.T_world_cam, res.covariance, seq.T_base_cam)
            pred = tracker.predict(stamp, odom)
            d = tracker.update(Fix(stamp, T_mb, C_mb, res.status, float(res.confidence)), odom)
            after = tracker.predict(stamp, odom)
            fx = RawFix(j, T_mb, C_mb, status=_status(res), foreign=bool(seq.foreign[j]), action=d.action,
                        done_ns=start_ns + dur, T_fused=None if after is None else after[0],
                        cov_fused=None if after is None else after[1])
            fixes.append(fx)
            gt = seq.T_map_base[j]
            rec.update(action=d.action, mahalanobis2=d.mahalanobis2, gate=d.gate, decision=d.message,
                       raw_t_m=float(np.linalg.norm(T_mb[:3, 3] - gt[:3, 3])),
                       raw_std_m=float(np.sqrt(np.linalg.eigvalsh(C_mb[:3, :3]).max())),
                       raw_std_deg=float(np.degrees(np.sqrt(np.linalg.eigvalsh(C_mb[3:, 3:]).max()))),
                       state=tracker.state.value)
            if pred is not None:  # the prediction the fix was gated against
                rec.update(pred_t_m=float(np.linalg.norm(pred[0][:3, 3] - gt[:3, 3])),
                           pred_std_m=float(np.sqrt(np.linalg.eigvalsh(pred[1][:3, :3]).max())),
                           pred_std_deg=float(np.degrees(np.sqrt(np.linalg.eigvalsh(pred[1][3:, 3:]).max()))))
            if after is not None:
                rec.update(fused_t_m=float(np.linalg.norm(after[0][:3, 3] - gt[:3, 3])),
                           fused_std_m=float(np.sqrt(np.linalg.eigvalsh(after[1][:3, :3]).max())))
            snapshots.append((start_ns + dur, copy.deepcopy(tracker)))
        elif hasattr(tracker, "check_lost"):  # as the node does for a frame without a fix
            tracker.check_lost(stamp)
            snapshots.append((start_ns + dur, copy.deepcopy(tracker)))
        if tracker.state == TrackState.TRACKING:  # what the node publishes on ~/pose for this frame
            pose_topic.append((j,) + tuple(tracker.predict(stamp, odom)))
        records.append(rec)
        return dur

    t_wall = time.perf_counter()
    events = newest_frame_schedule(seq.stamps_ns, localize, args.max_rate)
    wall = time.perf_counter() - t_wall
    n = len(seq)
    M = np.full((n, 4, 4), np.nan)
    C = np.full((n, 6, 6), np.nan)
    k = -1
    for i in range(n):  # the state a TF consumer has when frame i arrives
        while k + 1 < len(snapshots) and snapshots[k + 1][0] <= seq.stamps_ns[i]:
            k += 1
        if k >= 0 and snapshots[k][1].T_map_odom is not None:
            tr = snapshots[k][1]
            # what the node sends on /tf: the held state, with odom_bias corrected for the odometry now
            M[i] = tr.T_map_odom_at(int(seq.stamps_ns[i]), seq.T_odom_base[i])
            C[i] = tr.predict(int(seq.stamps_ns[i]), seq.T_odom_base[i])[1]
    counts = {a: sum(e.action == a for e in events) for a in ("localized", "dropped", "skipped")}
    metrics = sequence_metrics(seq.stamps_ns, seq.T_map_base, seq.T_odom_base, M, fixes, seq.foreign, C)
    metrics["pose_topic"] = _pose_topic_metrics(seq, pose_topic)
    metrics["worker"] = counts
    metrics["tracker"] = tracker.summary()
    metrics["localize_ms"] = _ms_stats([r["localize_ms"] for r in records])
    metrics["wall_s"] = wall
    init = [f for f in fixes if f.action == "initialised"]
    metrics["first_fix_done_s"] = (init[0].done_ns - seq.stamps_ns[0]) * 1e-9 if init else float("nan")
    return {"metrics": metrics, "records": records, "T_map_odom": M, "fixes": fixes}


def _pose_topic_metrics(seq: SequenceRun, rows: List[tuple]) -> dict:
    """Errors and NEES of the fused poses ~/pose publishes (one per processed frame while tracking)."""
    if not rows:
        return estimate_metrics(np.zeros((0, 4, 4)), np.zeros((0, 6, 6)), np.zeros((0, 4, 4)))
    return estimate_metrics(np.stack([r[1] for r in rows]), np.stack([r[2] for r in rows]),
                            seq.T_map_base[[r[0] for r in rows]])


def _ms_stats(v) -> dict:
    v = np.asarray([x for x in v if np.isfinite(x)])
    return {"n": int(len(v)), "p50": float(np.median(v)) if len(v) else float("nan"),
            "p90": float(np.percentile(v, 90)) if len(v) else float("nan")}


# ---------------------------------------------------------------------------- node mode


class SimClock:
    """Publishes rosgraph_msgs/Clock on /clock: held at a time, or running at real-time speed."""

    def __init__(self, node, start_ns: int, period_s: float = 0.005) -> None:
        from rclpy.qos import QoSProfile, ReliabilityPolicy
        from rosgraph_msgs.msg import Clock

        self._Clock = Clock
        self._pub = node.create_publisher(Clock, "/clock", QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE))
        self._lock = threading.Lock()
        self._base_ns, self._base_mono, self._running = int(start_ns), time.monotonic(), False
        self._stop = threading.Event()
        self._period = period_s
        self._thread = threading.Thread(target=self._loop, name="sim_clock", daemon=True)
        self._thread.start()

    def now_ns(self) -> int:
        with self._lock:
            if not self._running:
                return self._base_ns
            return self._base_ns + int((time.monotonic() - self._base_mono) * 1e9)

    def set(self, t_ns: int, running: bool) -> None:
        """Jump to t_ns (never backwards) and hold or run from there."""
        t_ns = max(int(t_ns), self.now_ns())
        with self._lock:
            self._base_ns, self._base_mono, self._running = t_ns, time.monotonic(), running

    def sleep_until(self, t_ns: int) -> None:
        while True:
            dt = (t_ns - self.now_ns()) * 1e-9
            if dt <= 0:
                return
            time.sleep(min(dt, 0.01))

    def _loop(self) -> None:
        from reloc_ros.ros.conversions import ns_to_stamp

        while not self._stop.wait(self._period):
            try:
                self._pub.publish(self._Clock(clock=ns_to_stamp(self.now_ns())))
            except Exception:  # context shut down
                return

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=1.0)


def _node_params(seq: SequenceRun, args, tracker_opts: dict) -> dict:
    from reloc_ros.ros.params import NodeParams

    known = set(NodeParams.__dataclass_fields__)
    p = {"map_path": str(seq.map_path), "max_rate": float(args.max_rate), "diagnostics_period": 0.1,
         "transform_tolerance": args.transform_tolerance, "tf_publish_rate": 20.0, "camera_info_timeout": 1.0,
         "tf_timeout": 1.0, "top_k": args.top_k, "use_sim_time": True, "publish_degenerate": True}
    extra = {"tracker_options": yaml.safe_dump(tracker_opts, default_flow_style=True).strip() if tracker_opts
             else "{}", "fuse_degenerate": bool(args.fuse_degenerate), "use_prior": bool(args.use_prior)}
    missing = [k for k in extra if k not in known]
    if missing:
        print(f"[node] note: the node has no parameter(s) {missing}; running without them", flush=True)
    p.update({k: v for k, v in extra.items() if k in known})
    return p


def run_node(seq: SequenceRun, args, tracker_opts: dict) -> dict:
    """reloc_node as a separate process on simulated time; TF, ~/pose_raw, ~/pose and /diagnostics recorded."""
    from diagnostic_msgs.msg import DiagnosticArray
    from geometry_msgs.msg import PoseWithCovarianceStamped
    from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy

    from reloc_ros.demo.procs import NodeProcess, apply_env, isolated_ros_env
    from reloc_ros.demo.replay import Replayer
    from reloc_ros.ros.conversions import pose_with_covariance_to_numpy, stamp_to_ns
    from reloc_ros.ros.tf_buffer import TfBuffer, TfLookupError

    out = Path(args.out)
    env = isolated_ros_env()
    apply_env(env)
    params = _node_params(seq, args, tracker_opts)
    node = NodeProcess(params, env, log_path=out / f"node_{seq.name}.log", workdir=out / "node_work",
                       remaps={"image": "/camera/image_raw", "camera_info": "/camera/camera_info"}).start()
    rp = Replayer(domain_id=int(env["ROS_DOMAIN_ID"]), T_base_cam=seq.T_base_cam)
    rel = QoSProfile(depth=100, history=HistoryPolicy.KEEP_LAST, reliability=ReliabilityPolicy.RELIABLE,
                     durability=DurabilityPolicy.VOLATILE)
    events: List[tuple] = []  # ('raw', stamp) / ('diag', values), in arrival order (one executor thread)
    ev_lock = threading.Lock()

    def on_raw(msg):
        with ev_lock:
            events.append(("raw", stamp_to_ns(msg.header.stamp), pose_with_covariance_to_numpy(msg)))

    def on_diag(msg):
        for st in msg.status:
            if st.name.startswith("reloc_node:"):
                with ev_lock:
                    events.append(("diag", {kv.key: kv.value for kv in st.values}))

    rp.node.create_subscription(PoseWithCovarianceStamped, "/reloc_node/pose_raw", on_raw, rel)
    rp.node.create_subscription(DiagnosticArray, "/diagnostics", on_diag, rel)
    clock = SimClock(rp.node, T0_NS - 5 * NS)
    grey = seq.load(0).ndim == 2
    enc = "mono8" if grey else "rgb8"
    n = len(seq)
    sent: List[int] = []
    t_start = time.monotonic()
    try:
        clock.set(T0_NS - 5 * NS, running=True)
        rp.wait_ready(args.ready_timeout, camera=seq.camera)
        d = rp.wait_diag(lambda d: d.values.get("map_keyframes", "0") not in ("0", ""), 120.0)
        if d is None:
            raise RuntimeError(f"node never loaded the map: {rp.diag}\n{node.log_tail()}")
        # Warm-up on two frames of noise (never localized, so the tracker stays empty).
        noise = np.random.default_rng(0).integers(0, 255, seq.load(0).shape, dtype=np.uint8)
        for k in range(2):
            before = rp.diag.handled
            stamp = clock.now_ns()
            rp.publish_frame(-1, noise, seq.camera, np.eye(4), stamp_ns=stamp, encoding=enc, T_odom_base=np.eye(4))
            rp.wait_for(lambda: rp.diag is not None and rp.diag.handled > before, 60.0)
        print(f"[node] ready after {time.monotonic() - t_start:.0f} s (ROS_DOMAIN_ID {env['ROS_DOMAIN_ID']}); "
              f"streaming {n} frames at {seq.rate_hz:g} Hz", flush=True)
        msgs = [rp.image_msg(seq.image(i), 0, enc) for i in range(n)]  # encode outside the timed loop
        with rp._cond:
            d0 = rp.diag
        with ev_lock:
            events.clear()
        clock.set(int(seq.stamps_ns[0]) - NS // 10, running=True)
        for i in range(n):
            clock.sleep_until(int(seq.stamps_ns[i]))
            rp.publish_frame(i, None, seq.camera, seq.T_world_cam[i], stamp_ns=int(seq.stamps_ns[i]),
                             image_msg=msgs[i], T_odom_base=seq.T_odom_base[i])
            sent.append(int(seq.stamps_ns[i]))
        # Wait for the node to finish the frames it took, then let TF cover the last stamp.
        ok = rp.wait_for(lambda: rp.diag is not None and rp.diag.count("frames_received") > 0
                         and rp.diag.handled >= rp.diag.count("frames_received")
                         and rp.diag.received_mono > time.monotonic() - 0.5, args.drain_timeout)
        clock.sleep_until(int(seq.stamps_ns[-1]) + int((args.transform_tolerance + 0.5) * NS))
        time.sleep(0.3)
        with rp._cond:
            final = rp.diag
            tf_series = dict(rp.tf_received.get(("map", "odom"), {}))
            fused_poses = dict(rp.poses)
        if not ok:
            print("[node] warning: the node had not finished every frame when the wait ended", flush=True)
    finally:
        clock.close()
        rp.close()
        rc = node.stop()
    alive_note = f"node exit code {rc}"
    if final is None:
        raise RuntimeError(f"no diagnostics from the node; log:\n{node.log_tail()}")

    # TF lookups as tf2 would do them: map->odom (node) o odom->base (ours) at every frame stamp.
    buf = TfBuffer(cache_time_s=1e6)
    for s, T in sorted(tf_series.items()):
        buf.set_transform("map", "odom", s, T)
    M = np.full((n, 4, 4), np.nan)
    for i in range(n):
        try:
            M[i] = buf.lookup("map", "odom", int(seq.stamps_ns[i]))
        except (TfLookupError, KeyError):
            pass
    idx = {int(s): i for i, s in enumerate(seq.stamps_ns)}
    fused_at = {}
    for s, (T, cov, _) in fused_poses.items():
        if s in idx:
            fused_at[idx[s]] = (T, cov)
    # Raw fixes, and the tracker's decision for each, attributed from /diagnostics: the node
    # publishes ~/pose_raw, updates the tracker, then sends diagnostics at once (its message
    # names the decision), so the first diagnostics after a raw pose whose tracker counters
    # (or frames_processed) changed belongs to it.
    fixes: List[RawFix] = []
    pending: List[RawFix] = []
    prev = d0.values if d0 is not None else {}
    ambiguous = 0

    def cnt(v, k):
        try:
            return int(v.get(k, "0") or 0)
        except ValueError:
            return 0

    keys = {"accepted": "fixes_accepted", "rejected": "fixes_rejected", "ignored": "fixes_ignored"}
    tracker_keys = ("fixes_accepted", "fixes_rejected", "fixes_ignored", "initialisations", "reinitialisations")
    for ev in events:
        if ev[0] == "raw":
            s = ev[1]
            if s not in idx:
                continue
            i = idx[s]
            T, cov = ev[2]
            f = RawFix(i, T, cov, status="ok", foreign=bool(seq.foreign[i]), action="")
            if i in fused_at:
                f.T_fused, f.cov_fused = fused_at[i]
            fixes.append(f)
            pending.append(f)
            continue
        v = ev[1]
        dt = {k: cnt(v, k) - cnt(prev, k) for k in tracker_keys}
        processed = cnt(v, "frames_processed") - cnt(prev, "frames_processed")
        if pending and (any(x > 0 for x in dt.values()) or processed > 0):
            if len(pending) == 1 and sum(dt.values()) - dt["initialisations"] - dt["reinitialisations"] <= 1:
                f = pending[0]
                f.action = ("reinitialised" if dt["reinitialisations"] else "initialised" if dt["initialisations"]
                            else "accepted" if dt["fixes_accepted"] else "rejected" if dt["fixes_rejected"]
                            else "ignored" if dt["fixes_ignored"] else "candidate")
                if v.get("last_result") in ("ok", "degenerate"):
                    f.status = v["last_result"]
            else:
                ambiguous += len(pending)
            pending = []
        prev = v
    # The TF a consumer looks up carries no covariance: the fused NEES comes from ~/pose (the
    # fused pose at each processed frame, published with its covariance).
    metrics = sequence_metrics(seq.stamps_ns, seq.T_map_base, seq.T_odom_base, M, fixes, seq.foreign, None)
    metrics["pose_topic"] = _pose_topic_metrics(seq, [(i, T, cv) for i, (T, cv) in sorted(fused_at.items())])
    fv = final.values
    metrics["node"] = {k: fv.get(k) for k in ("frames_received", "frames_dropped", "frames_skipped",
                                               "frames_failed", "frames_processed", "frames_localized",
                                               "poses_published", "tracker_state", "fixes_accepted",
                                               "fixes_rejected", "fixes_ignored", "reinitialisations",
                                               "last_innovation", "last_localize_ms")}
    metrics["node"]["frames_sent"] = len(sent)
    metrics["node"]["exit"] = alive_note
    metrics["node"]["fixes_with_attributed_action"] = sum(bool(f.action) for f in fixes)
    metrics["node"]["fixes_ambiguous"] = ambiguous
    metrics["node"]["tf_messages"] = len(tf_series)
    # counters over the streamed frames (the warm-up frames are in d0)
    for a, k in keys.items():
        metrics["fixes"][f"node_{a}"] = cnt(fv, k) - cnt(d0.values if d0 else {}, k)
    records = [{"index": f.index, "name": seq.names[f.index], "foreign": f.foreign, "action": f.action,
                "raw_t_m": float(np.linalg.norm(f.T_map_base[:3, 3] - seq.T_map_base[f.index, :3, 3])),
                "raw_std_m": float(np.sqrt(max(np.linalg.eigvalsh(f.covariance[:3, :3]).max(), 0.0)))}
               for f in fixes]
    return {"metrics": metrics, "records": records, "T_map_odom": M, "fixes": fixes}


# ---------------------------------------------------------------------------- output


def plot_run(path: Path, seq: SequenceRun, result: dict, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m = result["metrics"]
    t = np.asarray(m["per_frame"]["t_s"])
    fig, axes = plt.subplots(2, 1, figsize=(13, 7), sharex=True)
    tf_t = np.asarray(m["per_frame"]["tf_t_m"]) * 100
    tf_r = np.asarray(m["per_frame"]["tf_r_deg"])
    first = m["first_tf_frame"]
    oo = None
    if first >= 0:
        from reloc_ros.sequence import body_errors

        oo = body_errors(odometry_only(seq.T_map_base, seq.T_odom_base, first), seq.T_map_base)
    colours = {"accepted": "tab:green", "initialised": "tab:green", "reinitialised": "tab:olive",
               "rejected": "tab:red", "ignored": "tab:gray", "candidate": "tab:purple", "": "tab:blue",
               "unknown": "tab:blue"}
    for ax, fused, odo, unit, scale, thr in ((axes[0], tf_t, None if oo is None else oo[0] * 100, "cm", 100, 25.0),
                                             (axes[1], tf_r, None if oo is None else oo[1], "deg", 1, 5.0)):
        if seq.foreign.any():
            s, e = np.flatnonzero(seq.foreign)[[0, -1]]
            ax.axvspan(t[s], t[e], color="orange", alpha=0.15, label="foreign frames")
        if odo is not None:
            ax.plot(t, odo, "--", color="tab:brown", lw=1, label="odometry alone (true map->odom at first TF)")
        ax.plot(t, fused, "-", color="k", lw=1.2, label="fused TF (map->odom o odom->base), every frame")
        seen = set()
        for f in result["fixes"]:
            gt = seq.T_map_base[f.index]
            if unit == "cm":
                v = np.linalg.norm(f.T_map_base[:3, 3] - gt[:3, 3]) * scale
            else:
                from reloc_ros.geometry import rotation_angle_deg

                v = rotation_angle_deg(f.T_map_base[:3, :3], gt[:3, :3])
            a = f.action or "unknown"
            lab = f"raw fix: {a}" + (" (foreign)" if f.foreign else "")
            ax.plot(t[f.index], v, "x" if f.foreign else "o", ms=4, color=colours.get(a, "tab:blue"),
                    label=None if lab in seen else lab)
            seen.add(lab)
        ax.axhline(thr, color="tab:red", lw=0.6, ls=":", label=f"{thr:g} {unit}")
        ax.set_yscale("symlog", linthresh=1.0 if unit == "cm" else 0.1)
        ax.set_ylim(bottom=0)
        ax.set_ylabel(f"error ({unit}, symlog)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    axes[1].set_xlabel("time since the first frame (s)")
    axes[0].set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _json(o):
    if isinstance(o, dict):
        return {str(k): _json(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_json(v) for v in o]
    if isinstance(o, np.ndarray):
        return _json(o.tolist())
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (float, np.floating)):
        return None if not math.isfinite(float(o)) else float(o)
    return o


def targets(seq: SequenceRun, m: dict) -> Dict[str, Optional[bool]]:
    """The issue's checks for this run (measured, not enforced)."""
    t: Dict[str, Optional[bool]] = {}
    if seq.dataset == "7scenes":
        t["fused median <= 0.8 x raw median"] = bool(m["ratio_fused_to_raw_median"] <= 0.8)
        t["no frame > 25 cm after the first fix"] = bool(m["frames_over"]["over_m"] == 0
                                                         and m["frames_without_tf_after_first"] == 0)
    if seq.dataset == "kitti":
        t["fused median <= 2 cm"] = bool(m["tf"]["t_m"]["median"] <= 0.02)
    if seq.foreign.any():
        t["no foreign fix accepted"] = bool(m["fixes"]["foreign_accepted"] == 0)
        fb = m.get("foreign_block", {})
        t["TF error growth over the block <= odometry drift"] = fb.get("growth_within_drift")
        if fb.get("growth_within_bound") is not None:
            t["(TF error growth <= drift + start rotation error x distance)"] = fb.get("growth_within_bound")
    return t


def print_run(mode: str, seq: SequenceRun, m: dict) -> None:
    tf, raw = m["tf"], m["raw"]
    f = m["fixes"]
    cm = lambda d: f"{100 * d['median']:.1f} / {100 * d['p95']:.1f} / {100 * d['max']:.1f}"  # noqa: E731
    dg = lambda d: f"{d['median']:.2f} / {d['p95']:.2f} / {d['max']:.2f}"  # noqa: E731
    print(f"\n=== {mode}: {seq.name} ({len(seq)} frames at {seq.rate_hz:g} Hz, "
          f"{m['duration_s']:.1f} s) ===")
    if "worker" in m:
        w = m["worker"]
        print(f"worker: localized {w['localized']}, dropped {w['dropped']}, skipped {w['skipped']}; "
              f"localize p50 {m['localize_ms']['p50']:.0f} ms p90 {m['localize_ms']['p90']:.0f} ms")
    if "node" in m:
        nd = m["node"]
        print(f"node: sent {nd['frames_sent']}, received {nd['frames_received']}, dropped {nd['frames_dropped']}, "
              f"skipped {nd['frames_skipped']}, failed {nd['frames_failed']}, processed {nd['frames_processed']}; "
              f"tracker {nd['tracker_state']}; TF msgs {nd['tf_messages']}; {nd['exit']}")
    print(f"time to first TF: {m['time_to_first_tf_s']:.2f} s (frame {m['first_tf_frame']})")
    print(f"{'':28s} {'median / p95 / max cm':>24s} {'median / p95 / max deg':>24s}  n")
    print(f"{'raw fixes (not foreign)':28s} {cm(raw['t_m']):>24s} {dg(raw['r_deg']):>24s}  {raw['t_m']['n']}")
    print(f"{'raw fixes, status OK':28s} {cm(m['raw_ok']['t_m']):>24s} {dg(m['raw_ok']['r_deg']):>24s}  "
          f"{m['raw_ok']['t_m']['n']}")
    print(f"{'fused TF, every frame':28s} {cm(tf['t_m']):>24s} {dg(tf['r_deg']):>24s}  {tf['t_m']['n']}")
    print(f"{'fused TF at raw-fix frames':28s} {cm(m['fused_at_fix']['t_m']):>24s} "
          f"{dg(m['fused_at_fix']['r_deg']):>24s}  {m['fused_at_fix']['t_m']['n']}")
    print(f"{'fused pose right after fix':28s} {cm(m['fused_after_fix']['t_m']):>24s} "
          f"{dg(m['fused_after_fix']['r_deg']):>24s}  {m['fused_after_fix']['t_m']['n']}")
    if "odometry_only" in m:
        oo = m["odometry_only"]
        print(f"{'odometry alone':28s} {cm(oo['t_m']):>24s} {dg(oo['r_deg']):>24s}  {oo['t_m']['n']}")
    fo = m["frames_over"]
    print(f"fused/raw median ratio {m['ratio_fused_to_raw_median']:.2f}; frames over 25 cm or 5 deg "
          f"{fo['count']} ({100 * fo['fraction']:.1f} %: {fo['over_m']} over 25 cm, {fo['over_deg']} over 5 deg, "
          f"{m['frames_without_tf_after_first']} without TF)")
    j = m["jumps"]
    print(f"TF jumps: max {100 * j['max_m']:.1f} cm / {j['max_deg']:.2f} deg, {j['count_over']} over "
          f"{100 * j['threshold_m']:.0f} cm")
    print(f"fixes: {f['raw']} raw ({f['ok']} OK, {f['degenerate']} DEGENERATE), accepted {f['accepted']}, "
          f"rejected {f['rejected']}, ignored {f['ignored']}, actions {f['actions']}; foreign fixes {f['foreign']} "
          f"({f['foreign_ok']} OK), foreign accepted {f['foreign_accepted']}")
    def nees(label, ne):
        print(f"{label}: position median {ne['position_median']:.2f} ({100 * ne['position_within_95']:.0f} % <= "
              f"7.81), rotation median {ne['rotation_median']:.2f} ({100 * ne['rotation_within_95']:.0f} % <= 7.81),"
              f" n {ne['n']}")

    if m["nees"]["n"]:
        nees("fused NEES, every frame (tracker.predict)", m["nees"])
    pt = m["pose_topic"]
    print(f"~/pose (fused, each processed frame while tracking): {100 * pt['t_m']['median']:.1f} / "
          f"{100 * pt['t_m']['p95']:.1f} / {100 * pt['t_m']['max']:.1f} cm, {pt['r_deg']['median']:.2f} / "
          f"{pt['r_deg']['p95']:.2f} / {pt['r_deg']['max']:.2f} deg, n {pt['t_m']['n']}")
    nees("fused NEES of ~/pose", pt["nees"])
    if "foreign_block" in m:
        fb = m["foreign_block"]
        print(f"foreign block frames {fb['start']}..{fb['stop'] - 1} ({fb['distance_m']:.2f} m travelled): "
              f"TF error {100 * fb.get('tf_error_start_m', float('nan')):.1f} -> max "
              f"{100 * fb.get('tf_error_max_m', float('nan')):.1f} cm (growth "
              f"{100 * fb.get('tf_growth_max_m', float('nan')):.1f} cm) vs odometry drift over the block max "
              f"{100 * fb['odometry_drift_max_m']:.1f} cm / {fb['odometry_drift_max_deg']:.2f} deg; bound with the "
              f"correction's rotation error at the start x distance moved "
              f"{100 * fb.get('tf_growth_bound_m', float('nan')):.1f} cm")
        print(f"foreign images: {seq.foreign_source}")
    for k, v in targets(seq, m).items():
        print(f"target: {k}: {'met' if v else ('MISSED' if v is not None else 'n/a')}")


def main(argv=None) -> int:
    from reloc_ros.ros.params import NodeParams

    defaults = NodeParams()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mode", choices=("core", "node"), default="core")
    ap.add_argument("--runs", default="7scenes,7scenes+foreign40,kitti,room+foreign30",
                    help="comma-separated <dataset>[+foreign<N>], datasets: " + ", ".join(DATASETS))
    ap.add_argument("--shared", default="../shared")
    ap.add_argument("--out", default="out/bench_seq")
    ap.add_argument("--seed", type=int, default=0, help="odometry drift seed")
    ap.add_argument("--foreign-at", type=float, default=0.4, help="where the foreign block starts (fraction)")
    ap.add_argument("--foreign-source", choices=("auto", "strecha", "room", "map"), default="auto",
                    help="foreign images: strecha (default with ../shared), room (another rendered room), map "
                         "(frames of another place in the same map: confident wrong fixes)")
    ap.add_argument("--max-rate", type=float, default=0.0, help="localize at most this many Hz of stamp time (0: "
                                                                 "as fast as the worker can)")
    ap.add_argument("--latency-ms", type=float, default=None, help="core mode: take this long per localization "
                                                                   "instead of the measured time (deterministic)")
    ap.add_argument("--top-k", type=int, default=defaults.top_k)
    ap.add_argument("--tracker-options", default="{}", help="TrackerConfig fields as a YAML mapping")
    ap.add_argument("--fuse-degenerate", action="store_true", default=bool(getattr(defaults, "fuse_degenerate",
                                                                                  False)))
    ap.add_argument("--no-prior", dest="use_prior", action="store_false", default=bool(getattr(defaults, "use_prior",
                                                                                               True)),
                    help="no prior-guided retrieval from the tracked pose")
    ap.add_argument("--tag", default="", help="appended to the output file names (variants of one run)")
    ap.add_argument("--transform-tolerance", type=float, default=0.2, help="node mode: the node's parameter")
    ap.add_argument("--ready-timeout", type=float, default=180.0)
    ap.add_argument("--drain-timeout", type=float, default=60.0)
    args = ap.parse_args(argv)

    opts = yaml.safe_load(args.tracker_options) or {}
    if not isinstance(opts, dict):
        ap.error("--tracker-options must be a YAML mapping")
    opts = dict(opts)
    if args.fuse_degenerate:
        opts["fuse_degenerate"] = True
    tracker_cfg = from_dict(TrackerConfig, opts, "tracker_options")
    if args.mode == "node":
        try:
            import rclpy  # noqa: F401
            import rosgraph_msgs.msg  # noqa: F401
        except ImportError as e:
            print(f"node mode skipped: {e}")
            return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"cpu: {os.cpu_count()} cores, load average {tuple(round(x, 2) for x in os.getloadavg())}; mode "
          f"{args.mode}, max_rate {args.max_rate:g}, latency "
          f"{'measured' if args.latency_ms is None else f'{args.latency_ms:g} ms'}, use_prior {args.use_prior}, "
          f"tracker {opts or 'defaults'}", flush=True)
    summary = {"mode": args.mode, "args": vars(args), "tracker_config": vars(tracker_cfg), "runs": {}}
    for run in [r.strip() for r in args.runs.split(",") if r.strip()]:
        seq = prepare(run, args)
        if seq is None:
            summary["runs"][f"{args.mode}_{run.replace('+', '_')}"] = {"skipped": True}
            continue
        t = time.perf_counter()
        res = run_core(seq, args, tracker_cfg) if args.mode == "core" else run_node(seq, args, opts)
        m = res["metrics"]
        m["targets"] = targets(seq, m)
        m["foreign_source"] = seq.foreign_source
        print_run(args.mode, seq, m)
        stem = f"{args.mode}_{run.replace('+', '_')}"
        if seq.foreign.any() and args.foreign_source != "auto":
            stem += f"_{args.foreign_source}"
        if args.tag:
            stem += f"_{args.tag}"
        title = (f"{args.mode} mode, {run}: {len(seq)} frames at {seq.rate_hz:g} Hz, odometry 2 %/1 deg per m "
                 f"(seed {args.seed}); fused median {100 * m['tf']['t_m']['median']:.1f} cm, raw median "
                 f"{100 * m['raw']['t_m']['median']:.1f} cm")
        plot_run(out / f"{stem}.png", seq, res, title)
        doc = {"run": run, "mode": args.mode, "metrics": m, "fixes": res["records"],
               "frames": [{"index": i, "name": seq.names[i], "stamp_ns": int(seq.stamps_ns[i]),
                           "foreign": bool(seq.foreign[i])} for i in range(len(seq))]}
        (out / f"{stem}.json").write_text(json.dumps(_json(doc), indent=1))
        print(f"wrote {out / stem}.json and .png ({time.perf_counter() - t:.0f} s)", flush=True)
        summary["runs"][stem] = {k: v for k, v in m.items() if k != "per_frame"}
        summary["runs"][stem]["args"] = vars(args)
    # One summary per mode, updated run by run (earlier invocations' other runs are kept).
    path = out / f"{args.mode}_summary.json"
    try:
        old = json.loads(path.read_text())
        runs = {**old.get("runs", {}), **_json(summary["runs"])}
    except (OSError, ValueError):
        runs = _json(summary["runs"])
    path.write_text(json.dumps({**_json(summary), "runs": runs}, indent=1))
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
