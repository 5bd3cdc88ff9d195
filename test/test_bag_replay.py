"""Bag replay (``reloc-replay``): a rosbag2 recorded from the demo renderer, played back over real
DDS with /clock to a separate reloc_node process running with use_sim_time.

- Scheduling without ROS: bag-time order, rate, /clock before every message, preload of
  latched topics skipped by --start-offset, topic selection and clear errors.
- The player as a process: a listener gets exactly the recorded CDR bytes, a /clock that
  covers the played bag time, and /tf_static when it subscribes late (transient local).
- End to end: a map built from lap 0 of the bag with ``reloc-map build --format bag``, lap 1
  replayed with ``reloc-replay --start-offset`` to the node; its ~/pose and ~/pose_raw are
  compared with the bag's ground truth (/ground_truth/odom), and its diagnostics carry
  bag-time stamps (the node really ran on the simulated clock).
"""
from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from reloc_ros.playback import BagMessage, BagSource, PlaybackConfig, plan, preload, schedule
from reloc_ros.types import InvalidInputError

FRAMES = 16  # per lap; the camera runs at 4 Hz, so a lap is 4 s of bag time
DEPTH_TOPICS = ["/camera/depth/image_raw", "/camera/depth/camera_info"]


def _replay_cmd(bag: Path, *args: str):
    return [sys.executable, "-m", "reloc_ros.ros.bag_replay", str(bag), *args]


# ------------------------------------------------------------------------------ no ROS


def _msg(topic: str, t: int) -> BagMessage:
    return BagMessage(topic, "std_msgs/msg/String", t, b"")


def test_schedule_bag_order_rate_and_clock_before_each_message():
    start = 1_000_000_000
    msgs = [_msg("/a", start), _msg("/b", start + 100_000_000), _msg("/a", start + 1_000_000_000)]
    first = [_msg("/tf_static", start - 5_000_000_000)]
    ev = list(schedule(msgs, start, rate=2.0, clock_hz=10.0, first=first))
    walls = [e.wall_ns for e in ev]
    assert walls == sorted(walls)
    assert ev[0].clock_ns == start and ev[1].message is first[0]  # clock first, then the preload
    out = [e for e in ev if e.message is not None]
    assert [e.message for e in out] == first + msgs
    # rate 2: bag 1 s after the start plays 0.5 s of wall time after it
    assert [e.wall_ns for e in out] == [0, 0, 50_000_000, 500_000_000]
    clocks = [(e.wall_ns, e.clock_ns) for e in ev if e.clock_ns is not None]
    assert all(b[1] > a[1] for a, b in zip(clocks, clocks[1:])), "the clock must only move forward"
    for w, c in clocks:  # the clock is the bag time at that wall time
        assert abs(c - (start + 2 * w)) <= 2
    # every message is preceded by a clock at least its log time
    last = None
    for e in ev:
        if e.clock_ns is not None:
            last = e.clock_ns
        elif e.message is not first[0]:
            assert last >= e.message.log_ns
    # ticks every 0.1 s of wall time between the messages: 0, 0.1, .., 0.5 s
    ticks = {w for w, _ in clocks}
    assert {0, 100_000_000, 200_000_000, 300_000_000, 400_000_000, 500_000_000} <= ticks
    # no /clock at all with clock_hz 0; out-of-order input is refused
    assert all(e.clock_ns is None for e in schedule(msgs, start, 1.0, 0.0))
    with pytest.raises(ValueError, match="out of order"):
        list(schedule(msgs[::-1], start, 1.0, 10.0))


def test_playback_config_rejects_bad_values():
    for bad in (dict(rate=0.0), dict(rate=float("nan")), dict(start_offset=-1.0), dict(duration=0.0),
                dict(clock_hz=-1.0)):
        with pytest.raises(ValueError):
            PlaybackConfig(**bad).validate()


@pytest.fixture(scope="module")
def bag(tmp_path_factory):
    """Two laps of 16 frames (320x240, 4 Hz) with depth, odometry and ground truth, as MCAP."""
    from reloc_ros.demo.record_bag import RecordConfig, record_demo_bag

    return record_demo_bag(tmp_path_factory.mktemp("bag") / "room_bag", RecordConfig(frames=FRAMES, laps=2))


def test_recorded_bag_reads_back_with_exact_ground_truth(bag):
    """reloc-map's bag reader finds image, camera_info, ground truth and depth by itself and
    chains /ground_truth/odom (map->base_link) with /tf_static (base_link->camera_optical)."""
    from reloc_ros.datasets import open_dataset
    from reloc_ros.geometry import pose_errors

    ds = open_dataset("bag", bag.path, use_depth=True, depth_topic=DEPTH_TOPICS[0], kf_select=False)
    assert len(ds) == 2 * FRAMES and not ds.skipped
    for i in (0, FRAMES - 1, FRAMES, 2 * FRAMES - 1):
        fr = ds[i]
        t, r = pose_errors(fr.T_world_cam, bag.T_map_base[i] @ bag.T_base_cam)
        assert t < 1e-9 and r < 1e-6
        assert abs(fr.stamp - bag.stamps_ns[i] * 1e-9) < 1e-6
        assert fr.image.shape == (240, 320, 3) and fr.depth.shape == (240, 320) and np.all(fr.depth > 0)
        np.testing.assert_allclose(fr.camera.K, bag.camera.K)


def test_bag_source_plans_topics_offsets_and_latched_preload(bag):
    with BagSource(bag.path) as src:
        assert src.topics["/tf_static"].durability == "transient_local"
        assert src.topics["/camera/image_raw"].msgtype == "sensor_msgs/msg/Image"
        assert src.topics["/camera/image_raw"].count == 2 * FRAMES
        off = bag.lap_offset_s(1)
        p = plan(src, PlaybackConfig(start_offset=off, exclude_topics=DEPTH_TOPICS))
        assert p.latched == ["/tf_static"] and not set(DEPTH_TOPICS) & set(p.topics)
        pre = preload(src, p)
        assert [m.topic for m in pre] == ["/tf_static"], "tf_static before the offset must still be sent"
        played = list(src.messages(["/camera/image_raw"], p.start_ns, p.stop_ns))
        assert len(played) == FRAMES and played[0].log_ns > bag.stamps_ns[FRAMES - 1]
        p2 = plan(src, PlaybackConfig(topics=["/tf"], duration=1.0))
        assert p2.topics == ["/tf"] and len(list(src.messages(p2.topics, p2.start_ns, p2.stop_ns))) == 4
        with pytest.raises(InvalidInputError, match="no topic /nope"):
            plan(src, PlaybackConfig(topics=["/nope"]))
        with pytest.raises(InvalidInputError, match="past the bag's end"):
            plan(src, PlaybackConfig(start_offset=100.0))
    with pytest.raises(FileNotFoundError):
        BagSource(bag.path.parent / "missing")


def test_sqlite3_bag_reads_like_mcap(tmp_path):
    """The sqlite3 storage plugin: same topics, durability and bytes for the player and the
    map builder's reader."""
    from reloc_ros.datasets import open_dataset
    from reloc_ros.demo.record_bag import RecordConfig, record_demo_bag

    rec = record_demo_bag(tmp_path / "db3", RecordConfig(frames=3, laps=1, width=64, height=48, focal=60.0,
                                                         depth=False, storage="sqlite3"))
    assert list((tmp_path / "db3").glob("*.db3"))
    with BagSource(rec.path) as src:
        assert src.topics["/tf_static"].durability == "transient_local"
        p = plan(src, PlaybackConfig(start_offset=0.1))
        assert [m.topic for m in preload(src, p)] == ["/tf_static"]
        assert len(list(src.messages(["/camera/image_raw"], p.start_ns, p.stop_ns))) == 2
    ds = open_dataset("bag", rec.path, use_depth=False, kf_select=False)
    assert len(ds) == 3 and ds[2].image.shape == (48, 64, 3)


# ------------------------------------------------------------------------------ over DDS


class _Listener:
    """Raw subscriptions in this process's own rclpy context (no sim time here)."""

    def __init__(self, domain_id: int) -> None:
        import rclpy
        from rclpy.executors import SingleThreadedExecutor
        from rclpy.qos import QoSProfile, ReliabilityPolicy
        from rosgraph_msgs.msg import Clock
        from sensor_msgs.msg import Image

        self.ctx = rclpy.Context()
        rclpy.init(context=self.ctx, domain_id=domain_id)
        self.node = rclpy.create_node("replay_listener", context=self.ctx)
        self.lock = threading.Lock()
        self.images, self.clocks, self.tf_static = [], [], []
        self.node.create_subscription(Image, "/camera/image_raw", lambda b: self._add(self.images, b),
                                      QoSProfile(depth=100), raw=True)
        self.node.create_subscription(
            Clock, "/clock", lambda m: self._add(self.clocks, m.clock.sec * 1_000_000_000 + m.clock.nanosec),
            QoSProfile(depth=100, reliability=ReliabilityPolicy.BEST_EFFORT))
        self.ex = SingleThreadedExecutor(context=self.ctx)
        self.ex.add_node(self.node)
        self.thread = threading.Thread(target=self.ex.spin, daemon=True)
        self.thread.start()

    def _add(self, lst, item) -> None:
        with self.lock:
            lst.append(item)

    def subscribe_tf_static(self) -> None:
        from rclpy.qos import DurabilityPolicy, QoSProfile
        from tf2_msgs.msg import TFMessage

        self.node.create_subscription(TFMessage, "/tf_static", lambda m: self._add(self.tf_static, m),
                                      QoSProfile(depth=10, durability=DurabilityPolicy.TRANSIENT_LOCAL))

    def close(self) -> None:
        import rclpy

        self.ex.shutdown(timeout_sec=2.0)
        self.node.destroy_node()
        rclpy.try_shutdown(context=self.ctx)


def _wait(pred, timeout: float) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(0.02)
    return bool(pred())


def test_replay_process_sends_recorded_bytes_clock_and_latched_tf_static(bag, tmp_path):
    """The bytes a subscriber gets are the recorded CDR, the clock runs over the played
    bag time, and a subscriber that joins late still gets /tf_static."""
    from ros_helpers import require_ros

    require_ros()
    pytest.importorskip("rosgraph_msgs.msg", reason="rosgraph_msgs (for /clock) is not installed")
    from reloc_ros.demo.procs import apply_env, isolated_ros_env

    env = isolated_ros_env()
    apply_env(env)
    lis = _Listener(int(env["ROS_DOMAIN_ID"]))
    log = open(tmp_path / "replay.log", "wb")
    # Rate 1 (4 s of playback): the late /tf_static subscriber must be discovered while the
    # player is still alive (a transient-local sample dies with its writer); the delay lets
    # this process's reader match the player's writer before the first image.
    proc = subprocess.Popen(_replay_cmd(bag.path, "--start-offset", f"{bag.lap_offset_s(1)}", "--rate", "1",
                                        "--topics", "/camera/image_raw", "/tf_static", "/tf",
                                        "--wait-for", "/camera/image_raw", "/clock", "--delay", "1.0"),
                            env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        assert _wait(lambda: len(lis.images) > 0, 30.0), "no image from the player"
        lis.subscribe_tf_static()  # late: only transient-local durability delivers it now
        rc = proc.wait(timeout=30.0)
        assert _wait(lambda: len(lis.images) == FRAMES, 5.0), f"{len(lis.images)} of {FRAMES} images"
        assert _wait(lambda: bool(lis.tf_static), 5.0), "the late subscriber got no /tf_static"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
        lis.close()
        print((tmp_path / "replay.log").read_text())
    assert rc == 0
    with BagSource(bag.path) as src:
        p = plan(src, PlaybackConfig(start_offset=bag.lap_offset_s(1)))
        recorded = [m.data for m in src.messages(["/camera/image_raw"], p.start_ns, p.stop_ns)]
    got = list(lis.images)
    assert got == recorded, "replayed bytes differ from the recorded ones (or came out of order)"
    tf = lis.tf_static[0].transforms[0]
    assert (tf.header.frame_id, tf.child_frame_id) == ("base_link", "camera_optical")
    clocks = list(lis.clocks)
    assert clocks == sorted(clocks), "/clock went backwards"
    lap1 = bag.stamps_ns[FRAMES:]
    assert clocks[0] <= lap1[0] and clocks[-1] >= lap1[-1], "the clock does not cover the played bag time"
    # 40 Hz ticks over 4 s of wall time, plus one per message: dozens, not thousands
    assert 40 <= len(clocks) <= 300, len(clocks)


def test_replay_loops_until_sigint_with_the_clock_jumping_back(bag, tmp_path):
    """--loop plays the window again (the clock restarts at the start offset, as with
    ros2 bag play --loop) until SIGINT, which ends the player cleanly (exit 0)."""
    from ros_helpers import require_ros

    require_ros()
    pytest.importorskip("rosgraph_msgs.msg", reason="rosgraph_msgs (for /clock) is not installed")
    from reloc_ros.demo.procs import apply_env, isolated_ros_env

    env = isolated_ros_env()
    apply_env(env)
    lis = _Listener(int(env["ROS_DOMAIN_ID"]))
    proc = subprocess.Popen(_replay_cmd(bag.path, "--loop", "--rate", "8", "--duration", "1.0",
                                        "--topics", "/camera/image_raw", "--wait-for", "/camera/image_raw",
                                        "--delay", "0.5"),
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        # 1 s of bag (4 images) per pass at rate 8: three passes take ~0.4 s
        looped = _wait(lambda: len(lis.images) >= 12, 30.0)
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=15.0)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        lis.close()
    print(out)
    assert looped, f"only {len(lis.images)} images: no loop"
    assert proc.returncode == 0 and "stopped after" in out
    with lis.lock:
        clocks = list(lis.clocks)
    jumps = [b < a for a, b in zip(clocks, clocks[1:])]
    assert sum(jumps) >= 2, "the clock never went back to the start of the window"
    assert min(clocks) == bag.start_ns and max(clocks) <= bag.start_ns + 10**9


def test_node_localizes_a_replayed_bag_against_its_ground_truth(bag, tmp_path):
    """Map from lap 0 (reloc-map build --format bag), lap 1 replayed with reloc-replay to a
    node with use_sim_time: its poses match the bag's exact ground truth."""
    from ros_helpers import node_and_replayer, require_ros

    require_ros()
    pytest.importorskip("rosgraph_msgs.msg", reason="rosgraph_msgs (for /clock) is not installed")
    from diagnostic_msgs.msg import DiagnosticArray

    from reloc_ros.cli.map_cli import main as reloc_map
    from reloc_ros.demo.procs import wait_until
    from reloc_ros.geometry import pose_errors

    map_dir = tmp_path / "map"
    assert reloc_map(["build", "--format", "bag", str(bag.path), "--frames", f"0:{FRAMES}", "-o", str(map_dir),
                      "--dataset-option", f"depth_topic={DEPTH_TOPICS[0]}"]) == 0
    gt = {int(t): i for i, t in enumerate(bag.stamps_ns)}
    lap1 = set(int(t) for t in bag.stamps_ns[FRAMES:])
    params = {"map_path": str(map_dir), "use_sim_time": True}  # everything else: the node's defaults
    with node_and_replayer(params, tmp_path) as (node, rp):
        diag_stamps = []
        rp.node.create_subscription(DiagnosticArray, "/diagnostics",
                                    lambda m: diag_stamps.append(m.header.stamp.sec * 10**9 + m.header.stamp.nanosec),
                                    10)
        # Under sim time the node's diagnostics timer waits for /clock, and the status it sent
        # when the map loaded may precede discovery: its log says when the map is in.
        assert wait_until(lambda: "loaded map" in node.log_tail(20), 60.0), node.log_tail(20)
        assert wait_until(lambda: rp.node.count_publishers(rp.pose_topic) > 0, 30.0)
        t0 = time.monotonic()
        res = subprocess.run(_replay_cmd(bag.path, "--start-offset", f"{bag.lap_offset_s(1)}",
                                         "--exclude-topics", *DEPTH_TOPICS,
                                         "--wait-for", "/camera/image_raw", "/camera/camera_info", "/clock",
                                         "--delay", "1.0"),
                             env=node.env, capture_output=True, text=True, timeout=60.0)
        print(res.stdout, res.stderr)
        assert res.returncode == 0
        # The node finishes the frame it is working on after the bag ends: wait until quiet.
        n_prev, quiet_since = -1, time.monotonic()
        while time.monotonic() - quiet_since < 2.0 and time.monotonic() - t0 < 60.0:
            n = len(rp.poses) + len(rp.raw_poses)
            if n != n_prev:
                n_prev, quiet_since = n, time.monotonic()
            time.sleep(0.1)
        with rp._cond:
            poses, raws = dict(rp.poses), dict(rp.raw_poses)
        assert node.alive()
        final = rp.diag

    def errors(got):
        rows = []
        for stamp, (T, _, _) in sorted(got.items()):
            assert stamp in lap1, f"pose stamped {stamp}, not a lap-1 image stamp"
            rows.append(pose_errors(T, bag.T_map_base[gt[stamp]]))
        return np.asarray(rows).reshape(-1, 2)

    e_pose, e_raw = errors(poses), errors(raws)
    lines = [f"{name}: {len(e)} poses, median {np.median(e[:, 0]) * 1000:.2f} mm / {np.median(e[:, 1]):.3f} deg, "
             f"max {e[:, 0].max() * 1000:.2f} mm / {e[:, 1].max():.3f} deg"
             for name, e in (("~/pose", e_pose), ("~/pose_raw", e_raw)) if len(e)]
    print("\n".join(lines), f"\nfinal diagnostics: {final}")
    # Camera 4 Hz, the node's default max_rate 2 Hz of stamp time: about every second frame
    # of the 16 is localized; at least 5 fixes and 3 fused poses (tracking needs 2 fixes).
    assert len(e_raw) >= 5 and len(e_pose) >= 3, "\n".join(lines)
    # Exact ground truth, noise-free renders and a depth map: the geometric estimator's fixes
    # are at the mm level (measured medians 0.7-1.6 mm, 0.02-0.03 deg); the fused pose also
    # carries the (2 %/m) odometry drift between fixes. Bounds with 3-5x margin.
    assert np.median(e_raw[:, 0]) < 0.005 and np.median(e_raw[:, 1]) < 0.1, "\n".join(lines)
    assert np.median(e_pose[:, 0]) < 0.01 and np.median(e_pose[:, 1]) < 0.2, "\n".join(lines)
    # The node ran on the bag's clock: its diagnostics are stamped in bag time.
    in_bag = [s for s in diag_stamps if bag.stamps_ns[FRAMES - 1] < s <= bag.stamps_ns[-1] + 2 * 10**9]
    assert in_bag, f"no diagnostics stamped in bag time (stamps {diag_stamps[:5]}...)"
