"""``make demo``: map a rendered room, run reloc_node, replay queries over DDS, print errors.

1. Render a procedurally textured room (reloc_ros.demo.scene) from ``--map-frames``
   poses on an orbit (exact poses, intrinsics and depth) and build a keyframe map.
2. Render ``--queries`` frames from other poses (a smaller orbit, random offsets of up to
   0.15 m and 15 deg) and write them as a posed folder.
3. Start ``reloc_node`` on a private localhost DDS domain: with ``ros2 launch reloc_ros
   reloc.launch.py`` when the launch stack and the ament layout are there (a sourced ROS 2 +
   colcon, or ``make setup`` with ../shared/wheels/ros2-launch), else as a plain process
   (``python -m reloc_ros.ros.node``); ``--no-launch`` forces the latter.
4. Start ``reloc_ros.demo.replay`` as another process: it sends each query as Image +
   CameraInfo + TF (odom->base_link with a drifting odom, base_link->camera on
   /tf_static), waits for the fused ``~/pose`` and ``/tf``, and prints the per-frame error.
5. Print a summary with the node's fused state (tracker state, fixes accepted/rejected).
   Exit 0 when the state is tracking and at least 80 % of the queries got a fused pose
   with a median camera error under 5 cm and map->odom consistent with the truth.

Needs nothing outside the package (no ../shared). Output goes to ``--out`` (default: a
temporary directory, removed unless ``--keep``).

``--rig`` (``make demo-rig``): the same with the four-camera rig of reloc_ros.demo.rig_scene
(front, left, right, back; no overlap). The map is built from the rig's frames at
``--map-frames`` body poses; the node runs with ``cameras: [front, left, right, back]``;
``reloc_ros.demo.rig_replay`` publishes ``--queries`` captures (per camera Image +
CameraInfo, odom->base_link, each camera's mount on /tf_static) and prints the body pose
error per capture. Exit 0 when the state is tracking and at least 80 % of the captures got
a fused pose with a median body error under 5 mm and map->odom consistent with the truth.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import List, Optional, Tuple

import numpy as np


def _stats(xs: List[float]) -> str:
    if not xs:
        return "n/a"
    a = np.asarray(xs)
    return f"median {np.median(a):.3g}, p90 {np.percentile(a, 90):.3g}, max {a.max():.3g}"


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description="reloc_ros end-to-end demo on a rendered room")
    ap.add_argument("--out", default=None, help="output directory (default: a temporary one)")
    ap.add_argument("--keep", action="store_true", help="keep the output directory")
    ap.add_argument("--map-frames", type=int, default=None,
                    help="keyframes rendered for the map (default 36; --rig: body poses, default 16)")
    ap.add_argument("--queries", type=int, default=16, help="query frames replayed to the node")
    ap.add_argument("--estimator", default="geometric")
    ap.add_argument("--timeout", type=float, default=120.0, help="seconds per query before giving up")
    ap.add_argument("--no-launch", action="store_true",
                    help="start the node as a plain process even when `ros2 launch` is available")
    ap.add_argument("--rig", action="store_true", help="four-camera rig instead of one camera (make demo-rig)")
    ap.add_argument("--size", default="640x480", help="--rig: image size WxH of every camera")
    args = ap.parse_args(argv)
    if args.map_frames is None:
        args.map_frames = 16 if args.rig else 36
    if args.map_frames < 8 or args.queries < 1:
        ap.error("--map-frames must be >= 8 and --queries >= 1")
    if args.rig:
        return _main_rig(args)

    from reloc_ros.datasets import write_folder_dataset
    from reloc_ros.demo.scene import ProceduralRoom, demo_camera, orbit_poses, render_frames
    from reloc_ros.maps import MapBuildConfig, build_map

    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="reloc_demo_"))
    out.mkdir(parents=True, exist_ok=True)
    t_all = time.monotonic()
    print(f"[demo] output in {out}", flush=True)
    t0 = time.monotonic()
    room = ProceduralRoom()
    cam = demo_camera()
    map_frames = render_frames(room, orbit_poses(room, args.map_frames), cam, "map_")
    queries = render_frames(room, orbit_poses(room, args.queries, radius_scale=0.8, phase=0.37, seed=11, jitter=1.0),
                            cam, "query_")
    print(f"[demo] rendered {len(map_frames)} map + {len(queries)} query frames "
          f"({cam.width}x{cam.height}) in {time.monotonic() - t0:.1f} s", flush=True)
    t0 = time.monotonic()
    map_dir = build_map(map_frames, out / "map", MapBuildConfig(), overwrite=True)
    print(f"[demo] built map {map_dir} in {time.monotonic() - t0:.1f} s", flush=True)
    qdir = write_folder_dataset(queries, out / "queries", overwrite=True)
    del map_frames

    params = {"map_path": str(map_dir), "estimator": args.estimator, "max_rate": 0.0, "diagnostics_period": 0.5,
              "transform_tolerance": 0.2}
    data, alive = _node_and_replay(args, out, "demo", params,
                                   {"image": "/camera/image_raw", "camera_info": "/camera/camera_info"},
                                   ["reloc_ros.demo.replay", "--src", str(qdir), "--tolerance", "0.2"])
    if data is None:
        return 1
    rows = data["frames"]
    pub = [r for r in rows if r["published"]]
    t_err = [100 * r["cam_t_m"] for r in pub]
    r_err = [r["cam_r_deg"] for r in pub]
    chain = [100 * r["odom_chain_m"] for r in pub if "odom_chain_m" in r]
    lat = [r["latency_ms"] for r in pub]
    loc_ms = [r["localize_ms"] for r in pub if np.isfinite(r["localize_ms"])]
    diag = data.get("final_diagnostics", {})
    print("\n[demo] summary")
    print(f"  queries with a fused ~/pose     : {len(pub)}/{len(rows)} (the first fix alone is not evidence)")
    print(f"  camera position error (cm)      : {_stats(t_err)}")
    print(f"  camera rotation error (deg)     : {_stats(r_err)}")
    print(f"  map->odom o odom->base error (cm): {_stats(chain)}  ({len(chain)} TFs checked)")
    print(f"  stamp -> pose received (ms)     : {_stats(lat)}")
    print(f"  core localize time (ms)         : {_stats(loc_ms)}")
    print(f"  node counters                   : received {diag.get('frames_received')}, "
          f"dropped {diag.get('frames_dropped')}, failed {diag.get('frames_failed')}, "
          f"published {diag.get('poses_published')}, map keyframes {diag.get('map_keyframes')}")
    print(f"  fused state (reloc_ros.tracking): {diag.get('tracker_state')}; fixes accepted "
          f"{diag.get('fixes_accepted')}, rejected {diag.get('fixes_rejected')}, ignored "
          f"{diag.get('fixes_ignored')}, re-initialisations {diag.get('reinitialisations')}; "
          f"fused position std {diag.get('fused_position_std_m')} m")
    print(f"  node still running at the end   : {alive}")
    print(f"  total demo time                 : {time.monotonic() - t_all:.0f} s")
    ok = (alive and diag.get("tracker_state") == "tracking" and len(pub) >= 0.8 * len(rows) and t_err
          and float(np.median(t_err)) < 5.0
          and len(chain) == len(pub) and float(np.median(chain)) < 5.0)
    print(f"[demo] {'PASS' if ok else 'FAIL'}")
    if not args.keep and not args.out:
        shutil.rmtree(out, ignore_errors=True)
    return 0 if ok else 1


def _node_and_replay(args, out: Path, tag: str, params: dict, remaps: Optional[dict], replay: List[str]
                     ) -> Tuple[Optional[dict], bool]:
    """Start reloc_node (through ``ros2 launch`` when available) on a private DDS domain, run
    the replay module ``replay[0]`` with its arguments against it, and return (the replay's
    results JSON, or None when it failed; whether the node was still running at the end)."""
    from reloc_ros.demo.procs import NodeProcess, isolated_ros_env, launch_unavailable, with_ament_prefix

    env = with_ament_prefix(isolated_ros_env())
    why_not = "--no-launch given" if args.no_launch else launch_unavailable(env)
    node = NodeProcess(params, env, log_path=out / "reloc_node.log", workdir=out, remaps=remaps,
                       use_launch=why_not is None)
    how = "with `ros2 " + " ".join(node.cmd[1:]) + "`" if why_not is None else f"as a plain process ({why_not})"
    print(f"[{tag}] starting reloc_node {how} (ROS_DOMAIN_ID={env['ROS_DOMAIN_ID']}, log {node.log_path})",
          flush=True)
    results = out / "results.json"
    rc = 1
    with node:
        cmd = [sys.executable, "-m", *replay, "--out", str(results), "--timeout", str(args.timeout)]
        try:
            rc = subprocess.run(cmd, env=env, timeout=args.timeout * (args.queries + 2)).returncode
        except subprocess.TimeoutExpired:
            print(f"[{tag}] replay timed out", flush=True)
        alive = node.alive()
    if rc != 0 or not results.exists():
        print(f"[{tag}] replay failed (exit {rc}); node log tail:\n{node.log_tail()}", flush=True)
        return None, alive
    return json.loads(results.read_text()), alive


def _main_rig(args) -> int:
    """``--rig``: map the room with the rig, run the node on its four cameras, replay captures."""
    from reloc_ros.demo.rig_scene import RigSceneConfig, demo_rig, render_rig_frames, rig_path
    from reloc_ros.demo.scene import ProceduralRoom
    from reloc_ros.maps import MapBuildConfig, build_map

    try:
        w, h = (int(v) for v in args.size.lower().split("x"))
    except ValueError:
        print(f"[demo-rig] --size must be WxH, got {args.size!r}", file=sys.stderr)
        return 2
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="reloc_demo_rig_"))
    out.mkdir(parents=True, exist_ok=True)
    t_all = time.monotonic()
    print(f"[demo-rig] output in {out}", flush=True)
    t0 = time.monotonic()
    scene = RigSceneConfig(width=w, height=h, focal=525.0 * w / 640.0)  # as rig_replay renders
    room = ProceduralRoom()
    rig = demo_rig(scene)
    map_frames = render_rig_frames(room, rig, rig_path(room, args.map_frames, scene), "map")
    print(f"[demo-rig] rendered {len(map_frames)} map frames ({args.map_frames} poses x {len(rig.cameras)} "
          f"cameras, {w}x{h}) in {time.monotonic() - t0:.1f} s", flush=True)
    t0 = time.monotonic()
    map_dir = build_map(map_frames, out / "map", MapBuildConfig(), overwrite=True)
    print(f"[demo-rig] built map {map_dir} in {time.monotonic() - t0:.1f} s", flush=True)
    del map_frames

    params = {"map_path": str(map_dir), "estimator": args.estimator, "max_rate": 0.0, "diagnostics_period": 0.5,
              "transform_tolerance": 0.2, "cameras": rig.names, "image_qos": "reliable"}
    data, alive = _node_and_replay(args, out, "demo-rig", params, None,
                                   ["reloc_ros.demo.rig_replay", "--captures", str(args.queries), "--size",
                                    f"{w}x{h}", "--cameras", ",".join(rig.names)])
    if data is None:
        return 1
    rows = data["captures"]
    pub = [r for r in rows if r["published"]]
    t_err = [1e3 * r["body_t_m"] for r in pub]
    r_err = [r["body_r_deg"] for r in pub]
    chain = [1e3 * r["odom_chain_m"] for r in pub if "odom_chain_m" in r]
    lat = [r["latency_ms"] for r in pub]
    loc_ms = [r["localize_ms"] for r in pub if np.isfinite(r["localize_ms"])]
    diag = data.get("final_diagnostics", {})
    print("\n[demo-rig] summary")
    print(f"  captures with a fused ~/pose    : {len(pub)}/{len(rows)}")
    print(f"  body position error (mm)        : {_stats(t_err)}")
    print(f"  body rotation error (deg)       : {_stats(r_err)}")
    print(f"  map->odom o odom->base err (mm) : {_stats(chain)}  ({len(chain)} TFs checked)")
    print(f"  stamp -> pose received (ms)     : {_stats(lat)}")
    print(f"  core localize time (ms)         : {_stats(loc_ms)}")
    print("  cameras in the last capture     : " + ", ".join(
        f"{n} {diag.get(f'camera.{n}.state')} ({diag.get(f'camera.{n}.inliers')} inliers)" for n in rig.names))
    print(f"  node counters                   : images {diag.get('frames_received')}, captures complete "
          f"{diag.get('captures_complete')}, partial {diag.get('captures_partial')}, failed "
          f"{diag.get('frames_failed')}, published {diag.get('poses_published')}")
    print(f"  fused state (reloc_ros.tracking): {diag.get('tracker_state')}; fixes accepted "
          f"{diag.get('fixes_accepted')}, rejected {diag.get('fixes_rejected')}")
    print(f"  node still running at the end   : {alive}")
    print(f"  total demo time                 : {time.monotonic() - t_all:.0f} s")
    ok = (alive and diag.get("tracker_state") == "tracking" and len(pub) >= 0.8 * len(rows) and t_err
          and float(np.median(t_err)) < 5.0 and len(chain) == len(pub) and float(np.median(chain)) < 5.0)
    print(f"[demo-rig] {'PASS' if ok else 'FAIL'}")
    if not args.keep and not args.out:
        shutil.rmtree(out, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
