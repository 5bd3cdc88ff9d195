"""``reloc-replay``: play a rosbag2 onto its topics with /clock, like ``ros2 bag play --clock``.

    reloc-replay BAG [--rate R] [--start-offset S] [--duration D] [--topics T ...]
                     [--exclude-topics T ...] [--loop] [--clock-hz HZ]
                     [--wait-for TOPIC ...] [--wait-timeout S] [--delay S] [--quiet]
                     [--ros-args -r /old:=/new ...]

Needs only pip (rosbags + the rclpy wheels), no ROS 2 install and no rosbag2. Run the
consumers with ``use_sim_time:=true``: they then see the bag's time on /clock, so TF
lookups at the recorded stamps work and their timers run at bag pace.

Messages are replayed as the recorded CDR bytes (``Publisher.publish`` of serialized
data): no deserialization, so any type whose Python package is installed plays exactly
as recorded; topics whose type is not installed are skipped with a warning. Every topic
is published reliable (matches reliable and best-effort subscribers); latched topics
(``/tf_static`` and topics recorded transient-local) are published transient-local with
a history deep enough for all their messages. Scheduling (bag order, rate, offsets,
clock ticks) is ``reloc_ros.playback``; this module only sleeps and publishes.

Ctrl-C stops playback cleanly (exit 0); a bad bag or option exits 2 with the reason.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from reloc_ros.playback import (BagSource, PlaybackConfig, PlayPlan, plan, preload, schedule, split_topics,
                                summarize, wall_span_s)
from reloc_ros.types import InvalidInputError

logger = logging.getLogger("reloc_ros.replay")

LATE_WARN_S = 0.1  # report messages published this much after they were due
ACK_TIMEOUT_S = 2.0  # at the end, how long to wait for subscribers to acknowledge the last messages


def message_class(msgtype: str):
    """The installed Python class of 'pkg/msg/Name' (or 'pkg/Name'); None when not installed."""
    parts = msgtype.split("/")
    if len(parts) == 2:
        parts = [parts[0], "msg", parts[1]]
    if len(parts) != 3 or not all(parts):
        return None
    try:
        return getattr(importlib.import_module(f"{parts[0]}.{parts[1]}"), parts[2])
    except (ImportError, AttributeError):
        return None


@dataclass
class PlaybackStats:
    """What one playback did: messages per topic, passes, how late the publishing ran."""

    published: Dict[str, int] = field(default_factory=dict)
    clock_ticks: int = 0
    passes: int = 0
    late_messages: int = 0  # published more than LATE_WARN_S after due
    max_late_s: float = 0.0
    wall_s: float = 0.0
    bag_start_ns: int = 0
    bag_stop_ns: int = 0
    interrupted: bool = False


class BagPlayer:
    """Publishes a bag's topics and /clock from an rclpy node in its own context.

    source: the open bag. cfg: what and how to play. node_name / args: rclpy node name
    and ROS command-line arguments (remaps, domain) for this player's context.
    """

    def __init__(self, source: BagSource, cfg: PlaybackConfig, node_name: str = "reloc_replay",
                 args: Optional[Sequence[str]] = None) -> None:
        import rclpy
        from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy
        from rclpy.signals import SignalHandlerOptions

        self.source = source
        self.cfg = cfg
        self.plan: PlayPlan = plan(source, cfg)
        self._ctx = rclpy.Context()
        rclpy.init(args=list(args) if args else None, context=self._ctx,
                   signal_handler_options=SignalHandlerOptions.NO)
        try:
            self.node = rclpy.create_node(node_name, context=self._ctx)
            self._pubs = {}
            for topic in self.plan.topics:
                info = source.topics[topic]
                cls = message_class(info.msgtype)
                if cls is None:
                    self.plan.skipped[topic] = f"type {info.msgtype} is not installed"
                    continue
                latched = topic in self.plan.latched
                depth = max(1, min(info.count, 1000)) if latched else 10
                qos = QoSProfile(depth=depth, history=HistoryPolicy.KEEP_LAST,
                                 reliability=ReliabilityPolicy.RELIABLE,
                                 durability=DurabilityPolicy.TRANSIENT_LOCAL if latched else DurabilityPolicy.VOLATILE)
                self._pubs[topic] = self.node.create_publisher(cls, topic, qos)
            for topic, why in self.plan.skipped.items():
                logger.warning("not playing %s: %s", topic, why)
            if not self._pubs:
                raise InvalidInputError(f"{source.path}: none of the selected topics has an installed message type")
            self._clock_pub = None
            if cfg.clock_hz > 0:
                from rosgraph_msgs.msg import Clock

                # rclpy's and rclcpp's time sources subscribe best-effort, depth 1.
                self._clock_pub = self.node.create_publisher(
                    Clock, "/clock", QoSProfile(depth=1, reliability=ReliabilityPolicy.BEST_EFFORT))
                self._Clock = Clock
        except BaseException:
            self.close()
            raise

    @property
    def topics(self) -> List[str]:
        """Topics actually published (resolved names, remaps applied)."""
        return sorted(p.topic_name for p in self._pubs.values())

    def wait_for_subscribers(self, topics: Sequence[str], timeout: float, stop: threading.Event) -> List[str]:
        """Wait until each of ``topics`` (bag names) has a matched subscriber; returns those still without."""
        unknown = [t for t in topics if t not in self._pubs and t != "/clock"]
        if unknown:
            raise InvalidInputError(f"--wait-for: {', '.join(unknown)} not played (playing {sorted(self._pubs)})")
        pubs = [self._clock_pub if t == "/clock" else self._pubs[t] for t in topics]
        if any(p is None for p in pubs):
            raise InvalidInputError("--wait-for /clock with --clock-hz 0")
        deadline = time.monotonic() + timeout
        while True:
            missing = [t for t, p in zip(topics, pubs) if p.get_subscription_count() == 0]
            if not missing or time.monotonic() >= deadline or stop.wait(0.02):
                return missing

    def _publish_clock(self, bag_ns: int) -> None:
        from builtin_interfaces.msg import Time

        self._clock_pub.publish(self._Clock(clock=Time(sec=bag_ns // 1_000_000_000, nanosec=bag_ns % 1_000_000_000)))

    def play(self, stop: Optional[threading.Event] = None, progress: bool = False) -> PlaybackStats:
        """Play the plan (once, or until ``stop`` with cfg.loop); blocks until done."""
        stop = stop or threading.Event()
        cfg, p = self.cfg, self.plan
        st = PlaybackStats(published={t: 0 for t in self._pubs}, bag_start_ns=p.start_ns, bag_stop_ns=p.stop_ns)
        topics = sorted(self._pubs)
        t_begin = time.monotonic_ns()
        if progress:
            t_from = (p.start_ns - self.source.start_ns) * 1e-9
            t_to = (p.stop_ns - 1 - self.source.start_ns) * 1e-9
            print(f"reloc-replay: playing {len(topics)} topics, bag time {t_from:.3f}..{t_to:.3f} s "
                  f"at rate {cfg.rate:g} (~{wall_span_s(p, cfg.rate):.1f} s per pass)", flush=True)
        while not stop.is_set() and self._ctx.ok():
            first = [m for m in preload(self.source, p) if m.topic in self._pubs]
            events = schedule(self.source.messages(topics, p.start_ns, p.stop_ns), p.start_ns, cfg.rate,
                              cfg.clock_hz, first)
            t0 = time.monotonic_ns()
            for ev in events:
                wait_ns = t0 + ev.wall_ns - time.monotonic_ns()
                if wait_ns > 0 and stop.wait(wait_ns * 1e-9):
                    break
                if not self._ctx.ok():
                    break
                if ev.message is None:
                    self._publish_clock(ev.clock_ns)
                    st.clock_ticks += 1
                    continue
                late = (time.monotonic_ns() - t0 - ev.wall_ns) * 1e-9
                if late > LATE_WARN_S:
                    st.late_messages += 1
                st.max_late_s = max(st.max_late_s, late)
                self._pubs[ev.message.topic].publish(ev.message.data)
                st.published[ev.message.topic] += 1
            else:
                st.passes += 1
                if progress:
                    print(f"reloc-replay: pass {st.passes} done", flush=True)
                if cfg.loop:
                    continue
                break
            break
        st.interrupted = stop.is_set() or not self._ctx.ok()
        st.wall_s = (time.monotonic_ns() - t_begin) * 1e-9
        return st

    def close(self) -> None:
        import rclpy
        from rclpy.duration import Duration

        node = getattr(self, "node", None)
        if node is not None and self._ctx.ok():
            # Reliable samples still in flight die with their writer (the last images of a
            # pass on a loaded machine): wait, bounded, until the subscribers acknowledged them.
            for pub in getattr(self, "_pubs", {}).values():
                pub.wait_for_all_acked(Duration(seconds=ACK_TIMEOUT_S))
        if node is not None:
            node.destroy_node()
            self.node = None
        rclpy.try_shutdown(context=self._ctx)


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="reloc-replay",
                                 description="Play a rosbag2 onto its topics with /clock, like ros2 bag play --clock.",
                                 epilog="Consumers must run with use_sim_time:=true. ROS arguments (remaps, "
                                        "e.g. --ros-args -r /camera/image_raw:=/cam/image) follow --ros-args.")
    ap.add_argument("bag", help="rosbag2 folder (metadata.yaml) or a single .mcap / .db3 file")
    ap.add_argument("--rate", type=float, default=1.0, help="playback speed factor (bag s per wall s)")
    ap.add_argument("--start-offset", type=float, default=0.0, help="start this many seconds into the bag")
    ap.add_argument("--duration", type=float, default=None, help="play this many bag seconds only")
    ap.add_argument("--topics", nargs="+", default=None, metavar="TOPIC", help="play only these topics")
    ap.add_argument("--exclude-topics", nargs="+", default=[], metavar="TOPIC", help="never play these topics")
    ap.add_argument("--loop", action="store_true", help="play again from the start offset at the end")
    ap.add_argument("--clock-hz", type=float, default=40.0, help="/clock ticks per wall second (0: no /clock)")
    ap.add_argument("--wait-for", nargs="+", default=[], metavar="TOPIC",
                    help="before playing, wait until these topics (or /clock) have a subscriber")
    ap.add_argument("--wait-timeout", type=float, default=30.0, help="seconds --wait-for waits at most")
    ap.add_argument("--delay", type=float, default=0.0,
                    help="wall seconds to wait before playing (after --wait-for), so subscribers finish discovery")
    ap.add_argument("--quiet", action="store_true", help="print only errors")
    return ap


def main(argv: Optional[List[str]] = None) -> int:
    """Console script ``reloc-replay``. Exit 0 when played (or stopped by SIGINT/SIGTERM),
    1 when --wait-for timed out, 2 on a bad bag or option."""
    try:
        from rclpy.utilities import remove_ros_args
    except ImportError as e:
        print(f"reloc-replay: error: rclpy is not importable ({e}); run `make setup` or source a ROS 2 install",
              file=sys.stderr)
        return 2
    raw = list(sys.argv[1:] if argv is None else argv)
    ros_args = raw[raw.index("--ros-args"):] if "--ros-args" in raw else []
    args = _parser().parse_args(remove_ros_args(["reloc-replay"] + raw)[1:])
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    cfg = PlaybackConfig(rate=args.rate, start_offset=args.start_offset, duration=args.duration,
                         topics=split_topics(args.topics), exclude_topics=split_topics(args.exclude_topics) or (),
                         loop=args.loop, clock_hz=args.clock_hz)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        cfg.validate()
        with BagSource(Path(args.bag)) as source:
            player = BagPlayer(source, cfg, args=["reloc-replay"] + ros_args if ros_args else None)
            try:
                if args.wait_for:
                    missing = player.wait_for_subscribers(split_topics(args.wait_for), args.wait_timeout, stop)
                    if missing and not stop.is_set():
                        print(f"reloc-replay: no subscriber on {', '.join(missing)} after {args.wait_timeout} s",
                              file=sys.stderr)
                        return 1
                if args.delay > 0:
                    stop.wait(args.delay)
                stats = player.play(stop, progress=not args.quiet)
            finally:
                player.close()
    except (InvalidInputError, ValueError, FileNotFoundError) as e:
        print(f"reloc-replay: error: {e}", file=sys.stderr)
        return 2
    if not args.quiet:
        late = f", {stats.late_messages} late > {LATE_WARN_S:g} s" if stats.late_messages else ""
        print(f"reloc-replay: {'stopped' if stats.interrupted else 'done'} after {stats.wall_s:.1f} s, "
              f"{stats.passes} pass(es), {stats.clock_ticks} /clock ticks, max lag {stats.max_late_s * 1e3:.0f} ms"
              f"{late}; published {summarize(stats.published)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
