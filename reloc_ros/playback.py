"""Bag playback without ROS: which messages of a rosbag2 to send, and when.

``ros2 bag play`` semantics, computed here so the ROS adapter
(``reloc_ros.ros.bag_replay``) only sleeps and publishes:

- messages go out in bag (log) time order; a message logged at bag time ``t`` is due
  ``(t - t_start) / rate`` wall seconds after playback starts;
- the simulated clock (``/clock``) is the bag time at the current wall time: ticks every
  ``1 / clock_hz`` wall seconds, and one carrying exactly ``t`` just before each message,
  so a ``use_sim_time`` node never receives a message stamped ahead of its clock;
- ``start_offset`` skips the first seconds of the bag, but messages of latched topics
  (``/tf_static``, or any topic recorded with transient-local durability) logged before
  the start are still sent first, as a late-joining subscriber would get them from the
  original publisher;
- ``topics`` / ``exclude_topics`` select topics by exact name.

Times: bag times are integer nanoseconds of the bag's log clock; wall times are integer
nanoseconds since the playback start (a monotonic clock).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

from reloc_ros.types import InvalidInputError

logger = logging.getLogger("reloc_ros.playback")

TRANSIENT_LOCAL = "transient_local"


@dataclass
class PlaybackConfig:
    """How to play a bag (seconds, Hz).

    rate: bag seconds played per wall second (2.0 = twice as fast). start_offset: skip
    this many bag seconds after the bag's first message. duration: stop after this many
    bag seconds from the start (None: to the end). topics: play only these topics (None:
    all); exclude_topics: never these. loop: start again at the end (the clock jumps back,
    as with ``ros2 bag play --loop``). clock_hz: /clock ticks per wall second (0: no
    /clock at all). latched_topics: always published transient-local, whatever the bag
    recorded.
    """

    rate: float = 1.0
    start_offset: float = 0.0
    duration: Optional[float] = None
    topics: Optional[Sequence[str]] = None
    exclude_topics: Sequence[str] = ()
    loop: bool = False
    clock_hz: float = 40.0  # ros2 bag play --clock default
    latched_topics: Sequence[str] = ("/tf_static",)

    def validate(self) -> None:
        if not (self.rate > 0 and self.rate < float("inf")):
            raise ValueError(f"playback: rate must be > 0, got {self.rate}")
        if not self.start_offset >= 0:
            raise ValueError(f"playback: start_offset must be >= 0 s, got {self.start_offset}")
        if self.duration is not None and not self.duration > 0:
            raise ValueError(f"playback: duration must be > 0 s, got {self.duration}")
        if not (self.clock_hz >= 0 and self.clock_hz < float("inf")):
            raise ValueError(f"playback: clock_hz must be >= 0, got {self.clock_hz}")


@dataclass(frozen=True)
class TopicInfo:
    """A topic of the bag: its type ('pkg/msg/Name'), message count and durability
    ('transient_local' or 'volatile', from the recorded offered QoS)."""

    name: str
    msgtype: str
    count: int
    durability: str


@dataclass(frozen=True)
class BagMessage:
    """One serialized message: topic, bag log time (ns) and the raw CDR bytes as recorded."""

    topic: str
    msgtype: str
    log_ns: int
    data: bytes


@dataclass(frozen=True)
class PlayEvent:
    """Something to do ``wall_ns`` after the playback (or loop) start: publish
    ``clock_ns`` on /clock, or publish ``message`` (exactly one is set)."""

    wall_ns: int
    clock_ns: Optional[int] = None
    message: Optional[BagMessage] = None


class BagSource:
    """A rosbag2 (folder with metadata.yaml, or a single .mcap / .db3 file) read with rosbags.

    Only rosbag2 is accepted: its messages are already CDR, the bytes a ROS 2 publisher
    sends, so they are replayed as recorded without a message definition round trip.
    """

    def __init__(self, path: Path) -> None:
        from rosbags.highlevel import AnyReader

        from reloc_ros.datasets.bag import _bag_path

        self.path = _bag_path(Path(path))
        try:
            self._reader = AnyReader([self.path])
            self._reader.open()
        except Exception as e:  # rosbags raises several unrelated types for bad bags
            raise InvalidInputError(f"{self.path}: cannot open bag ({type(e).__name__}: {e})") from None
        if not self._reader.is2:
            self._reader.close()
            raise InvalidInputError(f"{self.path}: a ROS 1 bag; convert it first (rosbags-convert --src BAG "
                                    "--dst OUT)")
        self.start_ns = int(self._reader.start_time)
        self.end_ns = int(self._reader.end_time)
        self.topics: Dict[str, TopicInfo] = {}
        for c in self._reader.connections:
            fmt = getattr(c.ext, "serialization_format", "cdr")
            if fmt != "cdr":
                raise InvalidInputError(f"{self.path}: topic {c.topic} is serialized as {fmt!r}, not cdr")
            prev = self.topics.get(c.topic)
            if prev is not None and prev.msgtype != c.msgtype:
                raise InvalidInputError(f"{self.path}: topic {c.topic} has two types ({prev.msgtype}, {c.msgtype})")
            dur = _durability(getattr(c.ext, "offered_qos_profiles", []))
            count = int(c.msgcount) + (prev.count if prev else 0)
            if prev is not None and prev.durability == TRANSIENT_LOCAL:
                dur = TRANSIENT_LOCAL
            self.topics[c.topic] = TopicInfo(c.topic, c.msgtype, count, dur)

    def select_topics(self, cfg: PlaybackConfig) -> List[str]:
        """Names of the topics to play (sorted); unknown names in cfg.topics raise InvalidInputError."""
        if cfg.topics is not None:
            missing = sorted(set(cfg.topics) - set(self.topics))
            if missing:
                raise InvalidInputError(f"{self.path}: no topic {', '.join(missing)} in the bag; "
                                        f"topics: {sorted(self.topics)}")
            chosen = set(cfg.topics)
        else:
            chosen = set(self.topics)
        return sorted(chosen - set(cfg.exclude_topics))

    def latched(self, topic: str, cfg: PlaybackConfig) -> bool:
        """True when ``topic`` is published transient-local (listed in cfg, or recorded so)."""
        return topic in cfg.latched_topics or self.topics[topic].durability == TRANSIENT_LOCAL

    def messages(self, topics: Iterable[str], start_ns: Optional[int] = None,
                 stop_ns: Optional[int] = None) -> Iterator[BagMessage]:
        """Messages of ``topics`` with start_ns <= log time < stop_ns, in log time order."""
        wanted = set(topics)
        conns = [c for c in self._reader.connections if c.topic in wanted]
        if not conns:
            return
        try:
            for conn, t, raw in self._reader.messages(connections=conns, start=start_ns, stop=stop_ns):
                yield BagMessage(conn.topic, conn.msgtype, int(t), bytes(raw))
        except Exception as e:
            raise InvalidInputError(f"{self.path}: cannot read bag ({type(e).__name__}: {e})") from None

    def close(self) -> None:
        self._reader.close()

    def __enter__(self) -> "BagSource":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _durability(profiles) -> str:
    """'transient_local' when every recorded publisher offered it (what ros2 bag play uses)."""
    names = []
    for q in profiles or []:
        d = getattr(q, "durability", None)
        names.append(getattr(d, "name", str(d)).lower())
    return TRANSIENT_LOCAL if names and all(n == TRANSIENT_LOCAL for n in names) else "volatile"


@dataclass
class PlayPlan:
    """The bag time window and topics of one pass: [start_ns, stop_ns) in bag time."""

    topics: List[str]
    latched: List[str]
    start_ns: int
    stop_ns: int
    skipped: Dict[str, str] = field(default_factory=dict)  # topic -> why it is not played


def plan(source: BagSource, cfg: PlaybackConfig) -> PlayPlan:
    """Topics and the bag time window to play; InvalidInputError when nothing is left."""
    cfg.validate()
    topics = source.select_topics(cfg)
    if not topics:
        raise InvalidInputError(f"{source.path}: no topics left to play")
    start = source.start_ns + int(round(cfg.start_offset * 1e9))
    if start > source.end_ns:
        raise InvalidInputError(f"{source.path}: start_offset {cfg.start_offset} s is past the bag's end "
                                f"({(source.end_ns - source.start_ns) * 1e-9:.3f} s)")
    stop = source.end_ns + 1
    if cfg.duration is not None:
        stop = min(stop, start + int(round(cfg.duration * 1e9)))
    return PlayPlan(topics, [t for t in topics if source.latched(t, cfg)], start, stop)


def preload(source: BagSource, p: PlayPlan) -> List[BagMessage]:
    """Messages of latched topics logged before the start: sent first, at the start time."""
    if p.start_ns <= source.start_ns or not p.latched:
        return []
    return list(source.messages(p.latched, source.start_ns, p.start_ns))


def schedule(messages: Iterable[BagMessage], start_ns: int, rate: float, clock_hz: float,
             first: Sequence[BagMessage] = ()) -> Iterator[PlayEvent]:
    """The events of one pass in due order (``wall_ns`` non-decreasing).

    messages: in log time order, none before start_ns (bag ns, the time that plays at wall
    0). first: sent at wall 0 before anything else (e.g. ``preload``). clock_hz: /clock
    ticks per wall second (0: none). A message at bag time t is due at
    ``(t - start_ns) / rate``; the clock carries ``start_ns + wall * rate``.
    """
    period = int(round(1e9 / clock_hz)) if clock_hz > 0 else 0
    last_clock = None
    next_tick = 0

    def clock(wall: int, value: int) -> Iterator[PlayEvent]:
        nonlocal last_clock
        if period and (last_clock is None or value > last_clock):
            last_clock = value
            yield PlayEvent(wall, clock_ns=value)

    yield from clock(0, start_ns)
    for m in first:
        yield PlayEvent(0, message=m)
    prev_t = start_ns
    for m in messages:
        if m.log_ns < prev_t:
            raise ValueError(f"schedule: messages out of order ({m.topic} at {m.log_ns} < {prev_t})")
        prev_t = m.log_ns
        due = int(round((m.log_ns - start_ns) / rate))
        while period and next_tick <= due:
            # ticks that fall before this message
            yield from clock(next_tick, start_ns + int(round(next_tick * rate)))
            next_tick += period
        yield from clock(due, m.log_ns)
        yield PlayEvent(due, message=m)


def wall_span_s(p: PlayPlan, rate: float) -> float:
    """Wall seconds one pass takes (to the last possible message)."""
    return (p.stop_ns - 1 - p.start_ns) / rate * 1e-9


def summarize(counts: Dict[str, int]) -> str:
    """'topic: n, ...' sorted by topic."""
    return ", ".join(f"{t}: {n}" for t, n in sorted(counts.items()))


def split_topics(values: Optional[Sequence[str]]) -> Optional[Tuple[str, ...]]:
    """Topic names from repeated or comma/space-separated CLI values (None stays None)."""
    if values is None:
        return None
    out: List[str] = []
    for v in values:
        out.extend(t for t in v.replace(",", " ").split() if t)
    return tuple(out)
