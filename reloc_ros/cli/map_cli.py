"""`reloc-map`: build and inspect keyframe maps.

    reloc-map build --format 7scenes SRC --frames 0:250:5 -o MAP_DIR [--no-depth] [--refine]
                    [--workers N] [--ray-address local|ADDR]
                    [--option features.max_keypoints=4096 ...]
                    [--cache-estimator reloc3r --estimator-option weights=/path/Reloc3r-512.pth ...]
    reloc-map info MAP_DIR
    reloc-map add MAP_DIR --format 7scenes SRC --frames 250:300:5 [--no-depth]
    reloc-map remove MAP_DIR (--box XMIN,YMIN,ZMIN,XMAX,YMAX,ZMAX | --sphere X,Y,Z,R | --names N1,N2)
                    [-o OUT_DIR]
    reloc-map merge MAP_A MAP_B -o OUT_DIR [--shared NAME_A[:NAME_B] ...]
    reloc-map convert OLD_MAP_DIR NEW_MAP_DIR     (format 2 -> this format, lossless)

add/remove/merge edit without a rebuild (reloc_ros.map_edit): add works in place in time
proportional to the frames added; remove and merge write a new map from the stored data.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys

from reloc_ros.config import from_dict, nest_dotted, parse_kv
from reloc_ros.types import RelocError


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="reloc-map", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="build a map directory from posed images")
    b.add_argument("src", help="dataset folder or bag")
    b.add_argument("--format", required=True, help="7scenes | kitti | strecha | colmap | tum | bag | folder")
    b.add_argument("--frames", default=None, help="start:stop:step into the sorted frames")
    b.add_argument("-o", "--output", required=True, help="map directory to write")
    b.add_argument("--no-depth", action="store_true", help="ignore depth (RGB-only map, triangulated points)")
    b.add_argument("--refine", action="store_true",
                   help="bundle-adjust the keyframe poses against the images first (poses that disagree "
                        "with the images: visual SLAM, GNSS/INS; not poses derived from the map's own "
                        "depth; options: --option refinement.KEY=V)")
    b.add_argument("--overwrite", action="store_true")
    b.add_argument("--option", action="append", default=[], metavar="K=V",
                   help="MapBuildConfig option, dotted for nested (features.max_keypoints=4096)")
    b.add_argument("--dataset-option", action="append", default=[], metavar="K=V",
                   help="dataset reader option (e.g. image_topic=/cam/image for bags)")
    b.add_argument("--cache-estimator", default=None, help="learned estimator whose keyframe cache to build")
    b.add_argument("--estimator-option", action="append", default=[], metavar="K=V")
    b.add_argument("--workers", type=int, default=None,
                   help="processes (or Ray tasks at a time) that build the map; default every core "
                        "(Ray: every cluster CPU); 1 = in this process. The map is the same for any count")
    b.add_argument("--ray-address", default=None, metavar="ADDR",
                   help="build on Ray: 'local' starts a local instance, else a cluster address "
                        "('auto', 'ray://head:10001'); reloc_ros must be installed on every node")
    i = sub.add_parser("info", help="print a map's manifest summary")
    i.add_argument("map")
    a = sub.add_parser("add", help="add posed frames to a map in place (no rebuild)")
    a.add_argument("map")
    a.add_argument("src", help="dataset folder or bag (poses in the map's frame)")
    a.add_argument("--format", required=True)
    a.add_argument("--frames", default=None)
    a.add_argument("--no-depth", action="store_true")
    a.add_argument("--dataset-option", action="append", default=[], metavar="K=V")
    r = sub.add_parser("remove", help="remove the keyframes in a region (or by name)")
    r.add_argument("map")
    r.add_argument("--box", default=None, help="xmin,ymin,zmin,xmax,ymax,zmax of camera centres (metres)")
    r.add_argument("--sphere", default=None, help="x,y,z,radius (metres)")
    r.add_argument("--names", default=None, help="comma-separated keyframe names")
    r.add_argument("-o", "--output", default=None, help="write here instead of replacing the map")
    r.add_argument("--overwrite", action="store_true")
    m = sub.add_parser("merge", help="merge map B into map A's frame through shared frames")
    m.add_argument("map_a")
    m.add_argument("map_b")
    m.add_argument("-o", "--output", required=True)
    m.add_argument("--shared", action="append", default=[], metavar="NAME_A[:NAME_B]",
                   help="a frame both maps hold (default: every common name)")
    m.add_argument("--overwrite", action="store_true")
    c = sub.add_parser("convert", help="convert a format-2 map to this format (lossless)")
    c.add_argument("old")
    c.add_argument("new")
    c.add_argument("--overwrite", action="store_true")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.cmd == "info":
            return _info(args.map)
        if args.cmd in ("add", "remove", "merge", "convert"):
            return _edit(args)
        return _build(args)
    except (RelocError, ValueError, FileNotFoundError) as e:
        print(f"reloc-map: error: {e}", file=sys.stderr)
        return 2


def _build(args) -> int:
    from reloc_ros.datasets import open_dataset
    from reloc_ros.maps import MapBuildConfig, build_map

    opts = nest_dotted(parse_kv(args.option))
    if args.no_depth:
        opts["use_depth"] = False
    if args.refine:
        opts["refine"] = True
    if args.workers is not None:
        opts["workers"] = args.workers
    if args.ray_address is not None:
        opts["ray_address"] = args.ray_address
    cfg = from_dict(MapBuildConfig, opts, "map")
    ds = open_dataset(args.format, args.src, frames=args.frames, use_depth=cfg.use_depth,
                      **parse_kv(args.dataset_option))
    estimators = []
    if args.cache_estimator:
        from reloc_ros.estimators import create

        estimators.append(create(args.cache_estimator, parse_kv(args.estimator_option)))
    out = build_map(ds, args.output, cfg, estimators=estimators, overwrite=args.overwrite,
                    source=f"{args.format}:{args.src} frames={args.frames}")
    return _info(out)


def _floats(text, n, what):
    if text is None:
        return None
    try:
        v = [float(x) for x in text.split(",")]
    except ValueError:
        v = []
    if len(v) != n:
        raise ValueError(f"--{what} needs {n} comma-separated numbers, got {text!r}")
    return v


def _edit(args) -> int:
    from reloc_ros import map_edit

    if args.cmd == "add":
        from reloc_ros.datasets import open_dataset

        ds = open_dataset(args.format, args.src, frames=args.frames, use_depth=not args.no_depth,
                          **parse_kv(args.dataset_option))
        stats = map_edit.add_keyframes(args.map, ds, use_depth=False if args.no_depth else None,
                                       source=f"{args.format}:{args.src} frames={args.frames}")
        out = args.map
    elif args.cmd == "remove":
        names = [n for n in args.names.split(",") if n] if args.names else None
        stats = map_edit.remove_region(args.map, box=_floats(args.box, 6, "box"), sphere=_floats(args.sphere, 4, "sphere"),
                                       names=names, out=args.output, overwrite=args.overwrite)
        out = args.output or args.map
    elif args.cmd == "merge":
        shared = [tuple(s.split(":", 1)) if ":" in s else (s, s) for s in args.shared] or None
        stats = map_edit.merge_maps(args.map_a, args.map_b, args.output, shared=shared, overwrite=args.overwrite)
        out = args.output
    else:
        stats = map_edit.convert_map(args.old, args.new, overwrite=args.overwrite)
        out = args.new
    print(json.dumps(stats, indent=1, default=str))
    return _info(out)


def _info(path) -> int:
    from reloc_ros.maps import KeyframeMap

    kmap = KeyframeMap.load(path)
    m = kmap.manifest
    keys = ["format_version", "num_keyframes", "num_keypoints", "num_points3d", "num_points_from_depth",
            "num_points_triangulated", "global_descriptor", "faiss_index", "build_seconds", "source"]
    summary = {k: m.get(k) for k in keys}
    summary["skipped_frames"] = len(m.get("skipped_frames", []))
    size = sum(f.stat().st_size for f in kmap.path.rglob("*") if f.is_file())
    summary["disk_bytes_per_keyframe"] = size // kmap.num_keyframes
    summary["ram_bytes_per_keyframe"] = kmap.memory_bytes() // kmap.num_keyframes
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
