"""``reloc-eval``: localize the frames of a posed dataset against a map and score them.

    reloc-eval --map MAP_DIR --format F SRC --frames a:b:s [--estimator NAME]
               [--estimator-option k=v ...] [--localizer-option k=v ...] [--top-k N]
               --json OUT.json [--plot OUT.png] [--dataset-option k=v ...] [--quiet]
    reloc-eval --leave-one-out --format F SRC --frames a:b:s [--map-option k=v ...]
               [--no-depth] ... --json OUT.json
    reloc-eval --rig-demo N [--map RIG_MAP_DIR] [--rig-cameras a,b] [--rig-textureless rotate|NAME]
               [--rig-size WxH] [--rig-map-poses M] ... --json OUT.json

Queries are the selected frames, opened without depth (a query is one image). Each is
localized with ``Localizer.localize(image, camera)``; one line per query is printed,
then a table (medians, recalls, per-stage latency p50/p90). The JSON holds
``summary`` (see reloc_ros.evaluation.summarize), ``queries`` (one record each) and
``meta`` (command, configuration, map size on disk and in RAM per keyframe).

``--leave-one-out`` builds, for each selected frame, a map of the other selected
frames in a temporary directory (features extracted once and shared across builds)
and queries that frame against it; ``--map`` is not used. ``--map-option`` sets
MapBuildConfig fields (dotted keys for nested ones, e.g. ``features.max_keypoints=4000``)
and ``--no-depth`` builds those maps without depth. Prebuilt maps carry their own
depth choice (``reloc-map build --no-depth``).

``--rig-demo N`` evaluates N captures of the rendered multi-camera rig of
``reloc_ros.demo.rig_scene`` (front/left/right/back, exact ground truth) with
``RigLocalizer.localize``; errors are of the *body* pose (T_world_base). Without ``--map``
a rig map is built from the rig's frames at ``--rig-map-poses`` body poses in a temporary
directory. ``--rig-cameras`` keeps only the named cameras in every capture;
``--rig-textureless rotate`` replaces camera i mod n of capture i by a texture-less view
(a camera name: that camera in every capture). SRC and ``--format`` are not used.

Exit status: 0 = evaluated (whatever the accuracy), 2 = bad arguments, dataset or map.
"""
from __future__ import annotations

import argparse
import logging
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import List, Optional, Sequence

import numpy as np

__all__ = ["main", "build_parser"]

log = logging.getLogger("reloc_ros.eval")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="reloc-eval",
        description="Localize dataset frames against a keyframe map and report accuracy and latency.",
    )
    p.add_argument("src", nargs="?", default=None, help="dataset source (folder, or bag); not with --rig-demo")
    p.add_argument("--format", "-f", default=None, dest="fmt",
                   help="dataset format (7scenes, kitti, strecha, ...); required unless --rig-demo")
    p.add_argument("--frames", default=None, help="start:stop:step over the sorted frames (default: all)")
    p.add_argument("--map", "-m", dest="map_dir", default=None, help="map directory (reloc-map build output)")
    p.add_argument("--estimator", default=None, help="estimator name (default: the localizer's default)")
    p.add_argument("--estimator-option", action="append", default=[], metavar="K=V",
                   help="estimator option, repeatable")
    p.add_argument("--localizer-option", action="append", default=[], metavar="K=V",
                   help="LocalizerConfig field, repeatable; dotted keys for nested ones "
                        "(e.g. fusion=reloc3r, averaging.ray_inlier_deg=5)")
    p.add_argument("--top-k", type=int, default=None, help="keyframes retrieved per query")
    p.add_argument("--dataset-option", action="append", default=[], metavar="K=V",
                   help="dataset format option, repeatable")
    p.add_argument("--json", required=True, dest="json_out", help="output JSON path")
    p.add_argument("--plot", default=None, help="output PNG path (top view and error CDFs)")
    p.add_argument("--leave-one-out", action="store_true",
                   help="query each selected frame against a map of the other selected frames")
    p.add_argument("--map-option", action="append", default=[], metavar="K=V",
                   help="MapBuildConfig field for --leave-one-out maps, repeatable (dotted keys nest)")
    p.add_argument("--no-depth", action="store_true", help="build --leave-one-out maps without depth")
    p.add_argument("--quiet", "-q", action="store_true", help="no per-query lines")
    p.add_argument("--rig-demo", type=int, default=None, metavar="N",
                   help="evaluate N captures of the rendered demo rig instead of a dataset")
    p.add_argument("--rig-cameras", default=None, help="--rig-demo: comma-separated cameras to keep")
    p.add_argument("--rig-textureless", default=None, metavar="rotate|NAME",
                   help="--rig-demo: blank one camera per capture (rotating) or the named camera")
    p.add_argument("--rig-size", default="640x480", help="--rig-demo: WxH of every rig camera")
    p.add_argument("--rig-map-poses", type=int, default=16,
                   help="--rig-demo without --map: body poses of the rig map built")
    return p


def _localizer_config(args):
    from reloc_ros.config import nest_dotted, parse_kv
    from reloc_ros.localizer import LocalizerConfig

    data = nest_dotted(parse_kv(args.localizer_option))
    if args.estimator is not None:
        data["estimator"] = args.estimator
    if args.estimator_option:
        data["estimator_options"] = {**data.get("estimator_options", {}), **parse_kv(args.estimator_option)}
    if args.top_k is not None:
        data["top_k"] = args.top_k
    return LocalizerConfig.from_dict(data)


def _dir_bytes(path: Path) -> int:
    return int(sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file()))


def _evaluate_one(loc, name: str, image, camera, T_gt, records: list, quiet: bool) -> None:
    from reloc_ros.evaluation import format_record, make_record

    t0 = time.perf_counter()
    res = loc.localize(image, camera)
    wall = (time.perf_counter() - t0) * 1e3
    if "total" not in res.timings_ms:  # every stage sums into the reported latency
        res.timings_ms = {**res.timings_ms, "total": wall}
    rec = make_record(name, T_gt, res)
    records.append(rec)
    if not quiet:
        print(format_record(len(records) - 1, rec), flush=True)


def _error_record(name: str, T_gt, message: str):
    from reloc_ros.evaluation import make_record
    from reloc_ros.types import LocalizationResult, Status

    return make_record(name, T_gt, LocalizationResult(Status.ERROR, message=message))


def _run_map(args, ds, cfg, records: list) -> dict:
    from reloc_ros.evaluation import format_record
    from reloc_ros.localizer import Localizer
    from reloc_ros.types import InvalidInputError

    loc = Localizer.from_map(args.map_dir, cfg)
    kmap = loc.kmap
    poses = ds.poses
    for i in range(len(ds)):
        name = ds.names[i]
        try:
            frame = ds[i]
        except InvalidInputError as e:  # a corrupt image is a failed query, not a crash
            records.append(_error_record(name, poses[i], str(e)))
            if not args.quiet:
                print(format_record(len(records) - 1, records[-1]), flush=True)
            continue
        _evaluate_one(loc, name, frame.image, frame.camera, poses[i], records, args.quiet)
    n_kf = kmap.num_keyframes
    disk = _dir_bytes(kmap.path)
    ram = kmap.memory_bytes() if hasattr(kmap, "memory_bytes") else None
    return {
        "map": str(Path(args.map_dir).resolve()),
        "map_keyframes": n_kf,
        "map_disk_bytes": disk,
        "map_disk_bytes_per_keyframe": disk / n_kf,
        "map_ram_bytes": ram,
        "map_ram_bytes_per_keyframe": None if ram is None else ram / n_kf,
        "T_world_kf": kmap.T_world_cam,
    }


def _run_leave_one_out(args, ds_src: str, cfg, records: list) -> dict:
    from reloc_ros.config import from_dict, nest_dotted, parse_kv
    from reloc_ros.datasets import open_dataset
    from reloc_ros.evaluation import format_record
    from reloc_ros.localizer import Localizer
    from reloc_ros.maps import MapBuildConfig, build_map
    from reloc_ros.types import InvalidInputError

    build_opts = nest_dotted(parse_kv(args.map_option))
    if args.no_depth:
        build_opts["use_depth"] = False
    build_cfg = from_dict(MapBuildConfig, build_opts, "map")
    ds = open_dataset(args.fmt, ds_src, frames=args.frames, use_depth=not args.no_depth,
                      **parse_kv(args.dataset_option))
    if len(ds) < 2:
        raise ValueError(f"--leave-one-out needs at least 2 frames, the selection has {len(ds)}")
    frames, bad = [], {}
    for i in range(len(ds)):  # decoded once, reused by every build
        try:
            frames.append(ds[i])
        except InvalidInputError as e:
            frames.append(None)
            bad[i] = str(e)
    poses = ds.poses
    cache: dict = {}
    build_ms: List[float] = []
    disk: List[int] = []
    with tempfile.TemporaryDirectory(prefix="reloc_eval_loo_") as tmp:
        for i in range(len(ds)):
            name = ds.names[i]
            if i in bad:
                records.append(_error_record(name, poses[i], bad[i]))
                if not args.quiet:
                    print(format_record(len(records) - 1, records[-1]), flush=True)
                continue
            others = [f for j, f in enumerate(frames) if j != i and f is not None]
            out = Path(tmp) / f"map_{i:04d}"
            t0 = time.perf_counter()
            build_map(others, out, build_cfg, feature_cache=cache, source=f"{args.fmt}:{ds_src} leave-one-out")
            build_ms.append((time.perf_counter() - t0) * 1e3)
            disk.append(_dir_bytes(out) / max(len(others), 1))
            loc = Localizer.from_map(out, cfg)
            _evaluate_one(loc, name, frames[i].image, frames[i].camera, poses[i], records, args.quiet)
            del loc
            shutil.rmtree(out, ignore_errors=True)
    return {
        "leave_one_out": True,
        "map_build_config": build_opts,
        "map_build_ms_median": float(np.median(build_ms)) if build_ms else None,
        "map_disk_bytes_per_keyframe": float(np.median(disk)) if disk else None,
        "T_world_kf": poses,
    }


def _run_rig_demo(args, cfg, records: list, tmp: str) -> dict:
    """Rig captures of reloc_ros.demo.rig_scene against a rig map (built in ``tmp`` without --map)."""
    from reloc_ros.demo.rig_scene import (RigSceneConfig, demo_rig, render_capture, render_rig_frames, rig_path,
                                          textureless)
    from reloc_ros.demo.scene import ProceduralRoom, RoomConfig
    from reloc_ros.evaluation import format_record, make_record
    from reloc_ros.maps import MapBuildConfig, build_map
    from reloc_ros.rig import CameraView, RigLocalizer

    if args.rig_demo < 1:
        raise ValueError("--rig-demo needs N >= 1 captures")
    try:
        w, h = (int(v) for v in args.rig_size.lower().split("x"))
    except ValueError:
        raise ValueError(f"--rig-size must be WxH, got {args.rig_size!r}") from None
    scene = RigSceneConfig(width=w, height=h, focal=525.0 * w / 640.0)
    room = ProceduralRoom(RoomConfig())
    rig = demo_rig(scene)
    keep = rig.names if not args.rig_cameras else [c.strip() for c in args.rig_cameras.split(",") if c.strip()]
    unknown = [c for c in keep + ([args.rig_textureless] if args.rig_textureless not in (None, "rotate") else [])
               if c not in rig.names]
    if unknown:
        raise ValueError(f"unknown rig camera(s) {unknown}; the demo rig has {rig.names}")
    map_dir = args.map_dir
    if map_dir is None:
        map_dir = str(Path(tmp) / "rig_map")
        frames = render_rig_frames(room, rig, rig_path(room, args.rig_map_poses, scene), "map")
        build_map(frames, map_dir, MapBuildConfig(), source="reloc-eval --rig-demo")
    loc = RigLocalizer.from_map(map_dir, cfg)
    poses = rig_path(room, args.rig_demo, scene, phase=0.2, jitter=0.5, seed=3)
    cams: list = []
    for i, T in enumerate(poses):
        cap = render_capture(room, rig, T, keep)
        blank = (cap[i % len(cap)].name if args.rig_textureless == "rotate" else args.rig_textureless)
        cap = [CameraView(v.name, textureless(v.image) if v.name == blank else v.image, v.camera, v.T_base_cam)
               for v in cap]
        t0 = time.perf_counter()
        res = loc.localize(cap)
        if "total" not in res.timings_ms:
            res.timings_ms["total"] = (time.perf_counter() - t0) * 1e3
        records.append(make_record(f"capture{i:04d}", T, res.as_localization_result()))
        cams.append([{"name": c.name, "state": c.state, "reason": c.reason, "inliers": c.inliers}
                     for c in res.cameras])
        if not args.quiet:
            print(format_record(len(records) - 1, records[-1]) + "  [" + " ".join(
                f"{c.name}:{c.inliers if c.state == 'used' else c.state}" for c in res.cameras) + "]", flush=True)
    kmap = loc.kmap
    return {"rig_demo": {"captures": args.rig_demo, "cameras": keep, "textureless": args.rig_textureless,
                         "size": [w, h], "map": str(Path(map_dir).resolve()) if args.map_dir else "temporary",
                         "map_keyframes": kmap.num_keyframes, "camera_reports": cams},
            "T_world_kf": kmap.T_world_base if kmap.T_world_base is not None else kmap.T_world_cam}


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    from reloc_ros.config import parse_kv, to_dict
    from reloc_ros.evaluation import format_table, plot, summarize, write_json
    from reloc_ros.types import RelocError

    if args.rig_demo is not None:
        return _main_rig_demo(args, argv)
    if args.src is None or args.fmt is None:
        print("reloc-eval: SRC and --format are required (or use --rig-demo N)", file=sys.stderr)
        return 2
    if not args.leave_one_out and not args.map_dir:
        print("reloc-eval: --map is required (or use --leave-one-out)", file=sys.stderr)
        return 2
    if args.leave_one_out and args.map_dir:
        print("reloc-eval: --map is ignored with --leave-one-out (each query gets its own map)", file=sys.stderr)
    if args.no_depth and not args.leave_one_out:
        print("reloc-eval: note: --no-depth only affects --leave-one-out maps; queries never use depth "
              "and a prebuilt map keeps its own depth choice", file=sys.stderr)

    records: list = []
    t_start = time.perf_counter()
    try:
        cfg = _localizer_config(args)
        if args.leave_one_out:
            info = _run_leave_one_out(args, args.src, cfg, records)
            skipped = []
        else:
            from reloc_ros.datasets import open_dataset

            ds = open_dataset(args.fmt, args.src, frames=args.frames, use_depth=False,
                              **parse_kv(args.dataset_option))
            if len(ds) == 0:
                raise ValueError(f"no frames selected from {args.src} (frames {args.frames!r})")
            skipped = ds.skipped
            info = _run_map(args, ds, cfg, records)
    except (RelocError, ValueError, FileNotFoundError, NotADirectoryError) as e:
        print(f"reloc-eval: {type(e).__name__}: {e}", file=sys.stderr)
        return 2

    T_world_kf = info.pop("T_world_kf")
    summary = summarize(records)
    title = (f"{args.fmt} {Path(args.src).name} frames {args.frames or 'all'} | {cfg.estimator}"
             + (" | leave-one-out" if args.leave_one_out else f" | map {Path(args.map_dir).name}"))
    print()
    print(title)
    print(format_table(summary))
    if info.get("map_disk_bytes_per_keyframe") is not None:
        ram = info.get("map_ram_bytes_per_keyframe")
        print(f"map per keyframe: {info['map_disk_bytes_per_keyframe'] / 1024:.1f} KiB on disk"
              + (f", {ram / 1024:.1f} KiB in RAM" if ram is not None else ""))
    meta = {
        "command": ["reloc-eval", *(sys.argv[1:] if argv is None else list(argv))],
        "format": args.fmt,
        "src": str(Path(args.src).resolve()),
        "frames": args.frames,
        "localizer_config": to_dict(cfg),
        "dataset_skipped": [list(s) for s in skipped],
        "wall_time_s": time.perf_counter() - t_start,
        **info,
    }
    out = write_json(args.json_out, summary, records, meta)
    print(f"wrote {out}")
    if args.plot:
        print(f"wrote {plot(args.plot, records, T_world_kf, title=title)}")
    return 0


def _main_rig_demo(args, argv) -> int:
    from reloc_ros.config import to_dict
    from reloc_ros.evaluation import format_table, plot, summarize, write_json
    from reloc_ros.types import RelocError

    records: list = []
    t_start = time.perf_counter()
    try:
        cfg = _localizer_config(args)
        with tempfile.TemporaryDirectory(prefix="reloc_eval_rig_") as tmp:
            info = _run_rig_demo(args, cfg, records, tmp)
    except (RelocError, ValueError, FileNotFoundError, NotADirectoryError) as e:
        print(f"reloc-eval: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    T_world_kf = info.pop("T_world_kf")
    summary = summarize(records)
    rd = info["rig_demo"]
    title = (f"demo rig {','.join(rd['cameras'])}" + (f" textureless={rd['textureless']}" if rd["textureless"] else "")
             + f" {rd['captures']} captures | {cfg.estimator} | body pose")
    print()
    print(title)
    print(format_table(summary))
    meta = {"command": ["reloc-eval", *(sys.argv[1:] if argv is None else list(argv))],
            "localizer_config": to_dict(cfg), "wall_time_s": time.perf_counter() - t_start, **info}
    out = write_json(args.json_out, summary, records, meta)
    print(f"wrote {out}")
    if args.plot:
        print(f"wrote {plot(args.plot, records, T_world_kf, title=title)}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
