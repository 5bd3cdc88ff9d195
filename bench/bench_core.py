"""Localization-core benchmark on every shared split, one table (prints; asserts nothing).

    .venv/bin/python bench/bench_core.py [--shared ../shared] [--out out/bench]
        [--splits 7s-depth,7s-rgb,kitti,strecha,room-depth,room-rgb[,corridor-rgb,corridor-depth]] [--stages]
        [--top-k 5] [--query-scale 0.75] [--estimator-option k=v ...] [--map-option k=v ...]

Splits (the ones of docs/RESULTS.md; the reference column is the independent COLMAP-style
pipeline of issue 13, where it was run):
- 7s-depth / 7s-rgb: 7-Scenes redkitchen, map frames 0:250:5 with / without depth,
  queries 250:500:5 (after a short warm-up);
- kitti: KITTI 06, map 0:51:2, queries 1:51:2;
- strecha: Herz-Jesus-P25 (half resolution), leave-one-out: each image against a map of
  the other 24 (built per query, features and pair matches cached across builds);
- room-depth / room-rgb: the rendered room of test/test_pipeline_synthetic.py (exact
  ground truth), 24 keyframes, 12 jittered queries.
- corridor-rgb / corridor-depth (opt-in, not in the default run): a rendered 40 m
  corridor driven forward like KITTI (1226x370, f 707; 26 keyframes 0.6 m apart,
  25 queries between them with up to 5 cm / 1 deg of jitter), exact ground truth: the
  forward-motion geometry of KITTI without its ground-truth noise.

Maps are cached under --out, keyed by the split, a hash of the build configuration and
the source of the map-building modules, so a changed ``--map-option``, default or
map-building code rebuilds them; a map the running reloc_ros refuses (format version) is
rebuilt too.

``--stages`` also prints, per split, where precision goes: query features, 2D-3D matches
and PnP inliers (totals and per keyframe), 3D points per retrieved keyframe, and the
inliers' reprojection residuals under the estimated and under the ground-truth pose (a
ground truth inconsistent with the images shows as residuals under it far above those
under the estimate). Latencies are wall-clock with the default thread pools on a
shared machine: compare numbers of one run only; the load average is printed.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np

from reloc_ros.config import from_dict, nest_dotted, parse_kv, to_dict
from reloc_ros.datasets import open_dataset
from reloc_ros.evaluation import make_record, summarize
from reloc_ros.localizer import Localizer, LocalizerConfig
from reloc_ros.maps import KeyframeMap, MapBuildConfig, MapError, build_map

SPLITS = ["7s-depth", "7s-rgb", "kitti", "strecha", "room-depth", "room-rgb"]
# Opt-in (``--splits corridor-rgb``): rendered, so exact ground truth, but KITTI-like.
EXTRA_SPLITS = ["corridor-rgb", "corridor-depth"]

# Issue 13: the independent pipeline (pycolmap 4.2.1, COLMAP SIFT 4096 at full resolution,
# exhaustive matching, LO-RANSAC PnP) on the same splits: (median cm, median deg, recall 5cm/5deg).
REFERENCE = {"7s-depth": (15.3, 3.09, 0.20), "7s-rgb": (59.0, 11.5, 0.26), "kitti": (0.53, 0.021, None),
             "strecha": (0.57, 0.027, None)}
LATENCY_TARGET_MS = {"7s-depth": 150, "kitti": 300}


class Split:
    """A map source (frames to build from) and queries, each a list of PosedFrame."""

    def __init__(self, name: str, map_frames: Callable[[], list], queries: Callable[[], list], use_depth: bool,
                 leave_one_out: bool = False, warmup: int = 0):
        self.name, self.map_frames, self.queries = name, map_frames, queries
        self.use_depth, self.leave_one_out, self.warmup = use_depth, leave_one_out, warmup


def _splits(shared: Path) -> Dict[str, Split]:
    d = shared / "data"
    s7, kit, stre = d / "7scenes_redkitchen_0000_0499", d / "kitti_odometry_06_0000_0050", \
        d / "strecha_herzjesus_p25_half"

    def frames(fmt, src, sel, depth):
        def load():
            ds = open_dataset(fmt, src, frames=sel, use_depth=depth)
            return [ds[i] for i in range(len(ds))]
        return load if src.exists() else None

    room_cache: dict = {}

    def room(part):
        def load():
            if not room_cache:
                from reloc_ros.demo.scene import ProceduralRoom, RoomConfig, demo_camera, orbit_poses, render_frames
                r = ProceduralRoom(RoomConfig())
                cam = demo_camera()
                room_cache["kf"] = render_frames(r, orbit_poses(r, 24), cam, "kf")
                room_cache["q"] = render_frames(r, orbit_poses(r, 12, phase=0.13, jitter=0.5, seed=3), cam, "q")
            return room_cache[part]
        return load

    corridor_cache: dict = {}

    def corridor(part):
        def load():
            if not corridor_cache:
                corridor_cache["kf"], corridor_cache["q"] = _corridor_frames()
            return corridor_cache[part]
        return load

    return {
        "corridor-rgb": Split("corridor-rgb", corridor("kf"), corridor("q"), False),
        "corridor-depth": Split("corridor-depth", corridor("kf"), corridor("q"), True),
        "7s-depth": Split("7s-depth", frames("7scenes", s7, "0:250:5", True),
                          frames("7scenes", s7, "250:500:5", False), True, warmup=3),
        "7s-rgb": Split("7s-rgb", frames("7scenes", s7, "0:250:5", False),
                        frames("7scenes", s7, "250:500:5", False), False, warmup=3),
        "kitti": Split("kitti", frames("kitti", kit, "0:51:2", False), frames("kitti", kit, "1:51:2", False),
                       False, warmup=2),
        "strecha": Split("strecha", frames("strecha", stre, None, False), None, False, leave_one_out=True),
        "room-depth": Split("room-depth", room("kf"), room("q"), True, warmup=2),
        "room-rgb": Split("room-rgb", room("kf"), room("q"), False, warmup=2),
    }


def _corridor_frames():
    """(keyframes, queries) of the corridor split: lists of PosedFrame with exact depth."""
    from reloc_ros.demo.scene import ProceduralRoom, RoomConfig, look_pose, render_frames
    from reloc_ros.types import Camera

    # Boxes along the walls stand in for parked cars and a pillar (depth variety).
    room = ProceduralRoom(RoomConfig(size=(40.0, 8.0, 4.0), texel_m=0.008, seed=11, boxes=(
        ((5.0, 0.0, 0.0), (9.0, 1.5, 1.2)), ((14.0, 6.5, 0.0), (18.0, 8.0, 1.4)),
        ((22.0, 0.0, 0.0), (25.0, 1.2, 1.0)), ((28.0, 6.8, 0.0), (33.0, 8.0, 1.5)),
        ((11.0, 0.0, 0.0), (12.0, 0.8, 2.5)))))
    W, H, f = 1226, 370, 707.0
    cam = Camera(np.array([[f, 0, (W - 1) / 2], [0, f, (H - 1) / 2], [0, 0, 1.0]]), W, H)
    rng = np.random.default_rng(0)

    def pose(x: float, jitter: bool) -> np.ndarray:
        p = np.array([x, 3.2 + 0.1 * np.sin(x / 5), 1.6])
        yaw, pitch, roll = 0.03 * np.sin(x / 7), np.radians(2.0), 0.0
        if jitter:
            p = p + rng.uniform(-0.05, 0.05, 3)
            yaw += np.radians(rng.uniform(-1, 1))
            pitch += np.radians(rng.uniform(-0.5, 0.5))
            roll += np.radians(rng.uniform(-0.5, 0.5))
        return look_pose(p, yaw, pitch, roll)

    xs = 1.0 + 0.6 * np.arange(26)
    kf = render_frames(room, np.stack([pose(x, False) for x in xs]), cam, "kf")
    q = render_frames(room, np.stack([pose(x + 0.3, True) for x in xs[:-1]]), cam, "q")
    return kf, q


def _build_config(split: Split, map_options: dict) -> MapBuildConfig:
    return from_dict(MapBuildConfig, {**map_options, "use_depth": split.use_depth}, "map")


def cached_map(path: Path, cfg: MapBuildConfig, make_frames: Callable[[], Sequence], **build_kw) -> Path:
    """A map built from ``make_frames()`` with ``cfg``, cached at ``path`` + a key of the
    build configuration and of the source of the modules that decide what a map holds:
    a changed option, default or map-building code (a new triangulation) builds anew
    instead of being judged on an old map. Shared by the benches; ``build_kw`` go to
    ``build_map``."""
    import reloc_ros

    root = Path(reloc_ros.__file__).parent
    code = b"".join((root / f).read_bytes() for f in ("features.py", "maps.py", "map_build.py", "map_store.py",
                                                        "refine.py", "retrieval.py"))
    key = hashlib.sha256(json.dumps(to_dict(cfg), sort_keys=True, default=str).encode() + code).hexdigest()[:10]
    path = path.with_name(f"{path.name}-{key}")
    try:
        KeyframeMap.load(path)
        return path
    except MapError:
        pass
    t = time.perf_counter()
    build_map(make_frames(), path, cfg, overwrite=True, **build_kw)
    print(f"  built {path} in {time.perf_counter() - t:.1f} s", flush=True)
    return path


class StageLog:
    """Per-query numbers from the geometric estimator's ``last_stats`` (see --stages)."""

    def __init__(self):
        self.rows: List[dict] = []

    def add(self, loc: Localizer, T_gt: np.ndarray, camera, res) -> None:
        st = getattr(loc.estimator, "last_stats", None) or {}
        row = {"features": st.get("query_features", 0), "matches": st.get("pnp_matches", 0),
               "inliers": st.get("pnp_inliers", 0), "status": res.status.value}
        kfs = list(st.get("matches_per_kf", {}))
        row["kf_points"] = [len(loc.kmap.point_index(k)) for k in kfs]
        row["kf_matches"] = list(st.get("matches_per_kf", {}).values())
        row["kf_inliers"] = [st.get("inliers_per_kf", {}).get(k, 0) for k in kfs]
        x, X = st.get("inlier_x"), st.get("inlier_X")
        if x is not None and len(x) and res.T_world_cam is not None:
            row["res_est"] = float(np.median(_reproj(res.T_world_cam, X, x, camera.K)))
            row["res_gt"] = float(np.median(_reproj(T_gt, X, x, camera.K)))
        self.rows.append(row)

    def report(self) -> str:
        if not self.rows:
            return "  (no stage data)"
        r = self.rows

        def med(key, agg=None):
            v = [agg(x[key]) if agg else x[key] for x in r if key in x and (not agg or len(x[key]))]
            return float(np.median(v)) if v else float("nan")

        return (f"  stages (median over {len(r)} queries): query features {med('features'):.0f}; "
                f"3D points per retrieved keyframe {med('kf_points', np.median):.0f}; 2D-3D matches "
                f"{med('matches'):.0f} (best keyframe {med('kf_matches', max):.0f}); PnP inliers {med('inliers'):.0f} "
                f"(best keyframe {med('kf_inliers', max):.0f}, keyframes with >= 10: "
                f"{med('kf_inliers', lambda v: sum(i >= 10 for i in v)):.0f}); inlier residual median "
                f"{med('res_est'):.2f} px under the estimate, {med('res_gt'):.2f} px under the ground truth")


def _reproj(T_world_cam: np.ndarray, X: np.ndarray, x: np.ndarray, K: np.ndarray) -> np.ndarray:
    R, c = T_world_cam[:3, :3], T_world_cam[:3, 3]
    Xc = (X - c) @ R
    p = Xc[:, :2] / Xc[:, 2:3] * [K[0, 0], K[1, 1]] + [K[0, 2], K[1, 2]]
    return np.linalg.norm(p - x, axis=1)


def run_split(split: Split, out: Path, loc_cfg: LocalizerConfig, map_options: dict,
              stages: Optional[StageLog]) -> dict:
    cfg = _build_config(split, map_options)
    frames = split.map_frames()
    records = []
    info: dict = {}
    if split.leave_one_out:
        cache: dict = {}
        tmp = Path(tempfile.mkdtemp(prefix="bench_loo_", dir=out))
        build_s = []
        try:
            for i, q in enumerate(frames):
                t = time.perf_counter()
                path = build_map([f for j, f in enumerate(frames) if j != i], tmp / f"m{i}", cfg,
                                 feature_cache=cache, overwrite=True)
                build_s.append(time.perf_counter() - t)
                loc = Localizer(KeyframeMap.load(path), dataclasses.replace(loc_cfg))
                res = loc.localize(q.image, q.camera)
                records.append(make_record(q.name, q.T_world_cam, res))
                if stages is not None:
                    stages.add(loc, q.T_world_cam, q.camera, res)
                shutil.rmtree(path, ignore_errors=True)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        info["build_s_median"] = float(np.median(build_s))
    else:
        path = cached_map(out / split.name, cfg, lambda: frames, source=f"bench_core {split.name}")
        queries = split.queries()
        loc = Localizer.from_map(path, dataclasses.replace(loc_cfg))
        for f in queries[: split.warmup]:
            loc.localize(f.image, f.camera)
        for f in queries:
            res = loc.localize(f.image, f.camera)
            records.append(make_record(f.name, f.T_world_cam, res))
            if stages is not None:
                stages.add(loc, f.T_world_cam, f.camera, res)
        n = loc.kmap.num_keyframes
        info["disk_kib_per_kf"] = sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / n / 1024
        info["build_s"] = loc.kmap.manifest.get("build_seconds", {}).get("total")
    s = summarize(records)
    s.update(info)
    ok = [r for r in records if r.status == "ok"]
    s["ok_beyond_25cm"] = sum(r.translation_error_m > 0.25 for r in ok)
    return s


def print_table(rows: List[str], extra_columns: Sequence[str] = ()) -> None:
    """The markdown table of ``_row`` lines (plus any extra columns the rows carry)."""
    cols = ["split", "median t / r", "recall 5cm/5deg", "localized", "latency p50 / p90 ms",
            "independent pipeline", *extra_columns]
    print("\n| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        print(r)


def _row(name: str, s: dict) -> str:
    ref = REFERENCE.get(name)
    refs = (f"{ref[0]:g} cm / {ref[1]:g} deg" + (f", {ref[2]:.2f}" if ref[2] is not None else "")) if ref else "-"
    tgt = LATENCY_TARGET_MS.get(name)
    lat = f"{s['latency_ms_p50']:.0f} / {s['latency_ms_p90']:.0f}" + (f" (<= {tgt})" if tgt else "")
    t, r = s["median_translation_m"] * 100, s["median_rotation_deg"]
    tfmt = f"{t:.2f}" if t < 10 else f"{t:.1f}"
    return (f"| {name} | {tfmt} cm / {r:.3f} deg | {s['recall_5cm_5deg']:.2f} | "
            f"{s['n_localized']}/{s['n_queries']} ({s['n_degenerate']} DEG, {s['ok_beyond_25cm']} OK >25cm) | "
            f"{lat} | {refs} |")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shared", default="../shared")
    ap.add_argument("--out", default="out/bench")
    ap.add_argument("--splits", default=",".join(SPLITS), help=f"comma-separated subset of {SPLITS + EXTRA_SPLITS}")
    ap.add_argument("--stages", action="store_true", help="print per-stage numbers (see the docstring)")
    ap.add_argument("--top-k", type=int, default=LocalizerConfig.top_k)
    ap.add_argument("--query-scale", type=float, default=LocalizerConfig.query_image_scale)
    ap.add_argument("--estimator-option", action="append", default=[], metavar="K=V",
                    help="GeometricConfig field, repeatable")
    ap.add_argument("--map-option", action="append", default=[], metavar="K=V",
                    help="MapBuildConfig field (dotted keys nest, e.g. features.max_image_size=1600), repeatable")
    ap.add_argument("--json", help="write the summaries here")
    args = ap.parse_args(argv)
    names = [s.strip() for s in args.splits.split(",") if s.strip()]
    unknown = [s for s in names if s not in SPLITS + EXTRA_SPLITS]
    if unknown:
        ap.error(f"unknown split(s) {unknown}; known: {SPLITS + EXTRA_SPLITS}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    loc_cfg = LocalizerConfig(top_k=args.top_k, query_image_scale=args.query_scale,
                              estimator_options=parse_kv(args.estimator_option))
    map_options = nest_dotted(parse_kv(args.map_option))
    splits = _splits(Path(args.shared))
    print(f"cpu: {os.cpu_count()} cores; load average {os.getloadavg()}; top_k {args.top_k}, query scale "
          f"{args.query_scale}, estimator options {loc_cfg.estimator_options}, map options {map_options}", flush=True)
    rows, summaries = [], {}
    for name in names:
        split = splits[name]
        if split.map_frames is None:
            print(f"{name}: skipped, its data under {args.shared}/data is absent")
            continue
        t0 = time.perf_counter()
        stages = StageLog() if args.stages else None
        s = run_split(split, out, loc_cfg, map_options, stages)
        summaries[name] = s
        rows.append(_row(name, s))
        print(f"{name}: {time.perf_counter() - t0:.0f} s, load average {os.getloadavg()}", flush=True)
        print(rows[-1], flush=True)
        if stages is not None:
            print(stages.report(), flush=True)
            st = s["stage_latency_ms"]
            print("  latency p50 by stage: " + ", ".join(f"{k} {v['p50']:.0f}" for k, v in st.items()
                                                         if k != "total"), flush=True)
    print_table(rows)
    if args.json:
        Path(args.json).write_text(json.dumps(summaries, indent=1, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
