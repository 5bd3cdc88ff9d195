"""`reloc-map`: build and inspect keyframe maps.

    reloc-map build --format 7scenes SRC --frames 0:250:5 -o MAP_DIR [--no-depth]
                    [--option features.max_keypoints=4096 ...]
                    [--cache-estimator reloc3r --estimator-option weights=/path/Reloc3r-512.pth ...]
    reloc-map info MAP_DIR
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
    b.add_argument("--overwrite", action="store_true")
    b.add_argument("--option", action="append", default=[], metavar="K=V",
                   help="MapBuildConfig option, dotted for nested (features.max_keypoints=4096)")
    b.add_argument("--dataset-option", action="append", default=[], metavar="K=V",
                   help="dataset reader option (e.g. image_topic=/cam/image for bags)")
    b.add_argument("--cache-estimator", default=None, help="learned estimator whose keyframe cache to build")
    b.add_argument("--estimator-option", action="append", default=[], metavar="K=V")
    i = sub.add_parser("info", help="print a map's manifest summary")
    i.add_argument("map")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.cmd == "info":
            return _info(args.map)
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
