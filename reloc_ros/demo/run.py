"""``make demo``: map a rendered room, run reloc_node, replay queries over DDS, print errors.

1. Render a procedurally textured room (reloc_ros.demo.scene) from ``--map-frames``
   poses on an orbit (exact poses, intrinsics and depth) and build a keyframe map.
2. Render ``--queries`` frames from other poses (a smaller orbit, random offsets of up to
   0.15 m and 15 deg) and write them as a posed folder.
3. Start ``reloc_node`` as a separate process on a private localhost DDS domain.
4. Start ``reloc_ros.demo.replay`` as another process: it sends each query as Image +
   CameraInfo + TF (odom->base_link with a drifting odom, base_link->camera on
   /tf_static), waits for the fused ``~/pose`` and ``/tf``, and prints the per-frame error.
5. Print a summary with the node's fused state (tracker state, fixes accepted/rejected).
   Exit 0 when the state is tracking and at least 80 % of the queries got a fused pose
   with a median camera error under 5 cm and map->odom consistent with the truth.

Needs nothing outside the package (no ../shared). Output goes to ``--out`` (default: a
temporary directory, removed unless ``--keep``).
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
from typing import List, Optional

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
    ap.add_argument("--map-frames", type=int, default=36, help="keyframes rendered for the map")
    ap.add_argument("--queries", type=int, default=16, help="query frames replayed to the node")
    ap.add_argument("--estimator", default="geometric")
    ap.add_argument("--timeout", type=float, default=120.0, help="seconds per query before giving up")
    args = ap.parse_args(argv)
    if args.map_frames < 8 or args.queries < 1:
        ap.error("--map-frames must be >= 8 and --queries >= 1")

    from reloc_ros.datasets import write_folder_dataset
    from reloc_ros.demo.procs import NodeProcess, isolated_ros_env
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

    env = isolated_ros_env()
    params = {"map_path": str(map_dir), "estimator": args.estimator, "max_rate": 0.0, "diagnostics_period": 0.5,
              "transform_tolerance": 0.2}
    node = NodeProcess(params, env, log_path=out / "reloc_node.log", workdir=out,
                       remaps={"image": "/camera/image_raw", "camera_info": "/camera/camera_info"})
    print(f"[demo] starting reloc_node (ROS_DOMAIN_ID={env['ROS_DOMAIN_ID']}, log {node.log_path})", flush=True)
    results = out / "results.json"
    rc = 1
    with node:
        cmd = [sys.executable, "-m", "reloc_ros.demo.replay", "--src", str(qdir), "--out", str(results),
               "--timeout", str(args.timeout), "--tolerance", "0.2"]
        try:
            rp = subprocess.run(cmd, env=env, timeout=args.timeout * (args.queries + 2))
            rc = rp.returncode
        except subprocess.TimeoutExpired:
            print("[demo] replay timed out", flush=True)
        alive = node.alive()
    if rc != 0 or not results.exists():
        print(f"[demo] replay failed (exit {rc}); node log tail:\n{node.log_tail()}", flush=True)
        return 1

    data = json.loads(results.read_text())
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


if __name__ == "__main__":
    sys.exit(main())
