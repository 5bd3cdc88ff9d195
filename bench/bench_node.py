"""Benchmark reloc_node as a separate process over DDS (prints, does not assert).

1. Latency: frames at ``--latency-rate`` Hz (default 10) for ``--latency-duration`` s; for each
   published pose, image stamp -> pose received here (what a subscriber sees), plus the
   node's own stamp -> publish latency from /diagnostics. p50 / p90.
2. Load: frames at ``--rate`` Hz (default 30) for ``--duration`` s (default 120); node CPU
   (% of one core) and resident memory sampled every second, RSS trend over the second
   half (does memory grow?), frames sent / received / dropped by the node / lost in DDS.

Input: a rendered-room map and query frames (no shared data needed), 640x480 RGB, or
``--map`` + ``--queries`` (a posed folder) to use your own. The node runs with
``--max-rate`` (default 0: localize as fast as it can, the worst case for CPU and drops).

    .venv/bin/python bench/bench_node.py --duration 120
    .venv/bin/python bench/bench_node.py --duration 20 --latency-duration 10   # quick
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _pct(xs, q):
    return float(np.percentile(xs, q)) if len(xs) else float("nan")


def _prepare(args, work: Path):
    from reloc_ros.datasets import open_dataset
    from reloc_ros.demo.scene import ProceduralRoom, demo_camera, orbit_poses, render_frames
    from reloc_ros.maps import MapBuildConfig, build_map

    if args.map:
        ds = open_dataset("folder", args.queries, use_depth=False)
        return Path(args.map), [ds[i] for i in range(min(len(ds), 20))]
    room = ProceduralRoom()
    cam = demo_camera()
    t0 = time.monotonic()
    frames = render_frames(room, orbit_poses(room, args.map_frames), cam, "kf_")
    map_dir = build_map(frames, work / "map", MapBuildConfig(), overwrite=True)
    queries = render_frames(room, orbit_poses(room, 10, radius_scale=0.8, phase=0.37, seed=11, jitter=1.0), cam, "q_")
    print(f"prepared room map ({len(frames)} keyframes) and {len(queries)} queries in "
          f"{time.monotonic() - t0:.0f} s", flush=True)
    return map_dir, queries


def _stream(rp, queries, rate_hz: float, duration_s: float, on_tick=None):
    """Publish frames at rate_hz for duration_s (camera info + odom TF + image each)."""
    period = 1.0 / rate_hz
    msgs = []
    for q in queries:  # pre-encode: the benchmark measures the node, not message building
        msgs.append(rp.image_msg(q.image, 0))
    sent = []
    t0 = time.monotonic()
    k = 0
    next_t = t0
    while time.monotonic() - t0 < duration_s:
        q = queries[k % len(queries)]
        stamp = rp.publish_frame(k, q.image, q.camera, q.T_world_cam, image_msg=msgs[k % len(msgs)])
        sent.append(stamp)
        k += 1
        if on_tick:
            on_tick()
        next_t += period
        time.sleep(max(0.0, next_t - time.monotonic()))
    return sent


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--duration", type=float, default=120.0, help="load phase length (s) at --rate")
    ap.add_argument("--rate", type=float, default=30.0, help="input rate (Hz) of the load phase")
    ap.add_argument("--latency-duration", type=float, default=30.0, help="latency phase length (s)")
    ap.add_argument("--latency-rate", type=float, default=10.0, help="input rate (Hz) of the latency phase")
    ap.add_argument("--max-rate", type=float, default=0.0, help="the node's max_rate parameter (0: unthrottled)")
    ap.add_argument("--map-frames", type=int, default=36)
    ap.add_argument("--map", default=None, help="existing map directory (with --queries)")
    ap.add_argument("--queries", default=None, help="posed folder of query frames (with --map)")
    ap.add_argument("--no-shm-profile", action="store_true", help="run without config/fastdds_shm.xml")
    args = ap.parse_args(argv)
    if bool(args.map) != bool(args.queries):
        ap.error("--map and --queries go together")

    import psutil

    from reloc_ros.demo.procs import NodeProcess, apply_env, isolated_ros_env
    from reloc_ros.demo.replay import Replayer

    work = Path(tempfile.mkdtemp(prefix="bench_node_"))
    map_dir, queries = _prepare(args, work)
    env = isolated_ros_env(shm_profile=not args.no_shm_profile)
    apply_env(env)
    params = {"map_path": str(map_dir), "max_rate": args.max_rate, "diagnostics_period": 1.0,
              "transform_tolerance": 0.2}
    node = NodeProcess(params, env, log_path=work / "reloc_node.log", workdir=work,
                       remaps={"image": "/camera/image_raw", "camera_info": "/camera/camera_info"}).start()
    print(f"node pid {node.pid}, ROS_DOMAIN_ID {env['ROS_DOMAIN_ID']}, max_rate {args.max_rate}, "
          f"shm profile {'off' if args.no_shm_profile else env.get('FASTDDS_DEFAULT_PROFILES_FILE')}", flush=True)
    rp = Replayer(domain_id=int(env["ROS_DOMAIN_ID"]))
    proc = psutil.Process(node.pid)
    try:
        rp.wait_ready(180.0, camera=queries[0].camera)
        rp.wait_diag(lambda d: d.values.get("map_keyframes", "0") != "0", 120.0)
        # Warm-up: first localizations pay one-off costs (lazy imports, caches).
        for i in range(2):
            q = queries[i]
            rp.run_frame(i, q.name, q.image, q.camera, q.T_world_cam, timeout=120.0)

        # ---- phase 1: latency at 10 Hz
        d0 = rp.diag
        node_lat = []

        def sample_node_latency():
            d = rp.diag
            if d is not None and d.values.get("last_latency_ms") not in (None, "nan"):
                node_lat.append(float(d.values["last_latency_ms"]))

        sent = _stream(rp, queries, args.latency_rate, args.latency_duration, sample_node_latency)
        time.sleep(3.0)  # let the last frame finish
        lat = [(rp.poses[s][2] - s) * 1e-6 for s in sent if s in rp.poses]
        d1 = rp.diag
        print(f"\n== latency, input {args.latency_rate:g} Hz for {args.latency_duration:g} s ==")
        print(f"frames sent {len(sent)}, poses received {len(lat)}, node: received "
              f"{d1.count('frames_received') - d0.count('frames_received')}, dropped "
              f"{d1.count('frames_dropped') - d0.count('frames_dropped')}, failed "
              f"{d1.count('frames_failed') - d0.count('frames_failed')}")
        print(f"stamp -> pose received (ms): p50 {_pct(lat, 50):.0f}, p90 {_pct(lat, 90):.0f}, "
              f"min {min(lat) if lat else float('nan'):.0f}, max {max(lat) if lat else float('nan'):.0f}")
        ul = sorted(set(node_lat))
        print(f"node stamp -> publish (ms, /diagnostics samples): p50 {_pct(ul, 50):.0f}, p90 {_pct(ul, 90):.0f}")
        print(f"core localize (ms, last): {d1.values.get('last_localize_ms')}")

        # ---- phase 2: CPU / RSS at 30 Hz
        samples = []  # (t, cpu %, rss MB)
        proc.cpu_percent(None)
        t_start = time.monotonic()
        stop = threading.Event()

        def sampler():
            while not stop.wait(1.0):
                samples.append((time.monotonic() - t_start, proc.cpu_percent(None), proc.memory_info().rss / 2**20))

        th = threading.Thread(target=sampler, daemon=True)
        d0 = rp.diag
        th.start()
        sent = _stream(rp, queries, args.rate, args.duration)
        stop.set()
        th.join()
        time.sleep(2.5)
        d1 = rp.diag
        s = np.array(samples)
        print(f"\n== load, input {args.rate:g} Hz for {args.duration:g} s ==")
        recv = d1.count("frames_received") - d0.count("frames_received")
        dropped = d1.count("frames_dropped") - d0.count("frames_dropped")
        skipped = d1.count("frames_skipped") - d0.count("frames_skipped")
        processed = d1.count("frames_processed") - d0.count("frames_processed")
        print(f"frames sent {len(sent)} ({len(sent) / args.duration:.1f} Hz achieved), received by node {recv} "
              f"(lost in DDS {len(sent) - recv}), dropped by the worker (newer frame arrived) {dropped}, "
              f"skipped (max_rate) {skipped}, localized/processed {processed} "
              f"({processed / args.duration:.2f} Hz), poses published "
              f"{d1.count('poses_published') - d0.count('poses_published')}")
        if len(s) >= 6:
            # Localizing a frame briefly holds ~25 MB of working memory, so single samples
            # swing; a leak shows as a rising floor: compare medians of the first and last
            # thirds and fit the per-10-s minimum.
            T = s[-1, 0]
            first, last = s[s[:, 0] <= T / 3, 2], s[s[:, 0] >= 2 * T / 3, 2]
            win = np.floor(s[:, 0] / 10.0)
            floors = np.array([[s[win == w, 0].mean(), s[win == w, 2].min()] for w in np.unique(win)])
            slope = np.polyfit(floors[:, 0], floors[:, 1], 1)[0] * 60 if len(floors) > 2 else float("nan")
            print(f"node CPU (% of one core): mean {s[:, 1].mean():.0f}, p90 {_pct(s[:, 1], 90):.0f}")
            per30 = [f"{s[(s[:, 0] >= t) & (s[:, 0] < t + 30), 2].max():.0f}" for t in range(0, int(T), 30)
                     if np.any((s[:, 0] >= t) & (s[:, 0] < t + 30))]
            print(f"node RSS max per 30 s window (MB): {' '.join(per30)}")
            print(f"node RSS (MB): first {s[0, 2]:.0f}, last {s[-1, 2]:.0f}, max {s[:, 2].max():.0f}; median of the "
                  f"first third {np.median(first):.0f}, of the last third {np.median(last):.0f} "
                  f"(growth {np.median(last) - np.median(first):+.1f}); slope of the 10-s floor "
                  f"{slope:+.2f} MB/min")
        print(f"node alive at the end: {node.alive()}")
    finally:
        rp.close()
        node.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
