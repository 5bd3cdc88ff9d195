"""Map refinement (reloc_ros.refine) before and after, on the shared splits (prints; asserts nothing).

    .venv/bin/python bench/bench_refine.py [--shared ../shared] [--out out/refine]
        [--splits 7s-rgb,kitti,strecha,room-rgb] [--refine-option k=v ...] [--no-baseline]
        [--json out/refine/refine.json]

For each split the map frames are refined (``refine.refine_frames``: pose-prior bundle
adjustment over multi-view tracks) and ``maps.build_map`` is run on the refined frames;
the queries are then localized exactly as ``bench/bench_core.py`` does (same splits,
default LocalizerConfig) and compared with the unrefined map (``--no-baseline`` skips it).
Strecha is leave-one-out: each query's map of the other 24 images is refined without the
query (features cached across builds). Also printed: how far refinement moved the poses
(median / max cm and deg), the scale change, track statistics and the time it took.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_core  # noqa: E402

from reloc_ros.config import from_dict, nest_dotted, parse_kv  # noqa: E402
from reloc_ros.evaluation import make_record, summarize  # noqa: E402
from reloc_ros.localizer import Localizer, LocalizerConfig  # noqa: E402
from reloc_ros.maps import KeyframeMap, MapBuildConfig, build_map  # noqa: E402
from reloc_ros.refine import RefineConfig, refine_frames  # noqa: E402

SPLITS = ["7s-rgb", "kitti", "strecha", "room-rgb", "7s-depth", "room-depth"]


def _evaluate(map_path: Path, queries: list, warmup: int, loc_cfg: LocalizerConfig) -> list:
    loc = Localizer.from_map(map_path, dataclasses.replace(loc_cfg))
    for f in queries[:warmup]:
        loc.localize(f.image, f.camera)
    return [make_record(f.name, f.T_world_cam, loc.localize(f.image, f.camera)) for f in queries]


def _summary(records: list) -> dict:
    s = summarize(records)
    s["ok_beyond_25cm"] = sum(r.translation_error_m > 0.25 for r in records if r.status == "ok")
    return s


def _moves(reports: list) -> dict:
    cm = np.concatenate([r.moved_cm for r in reports])
    deg = np.concatenate([r.moved_deg for r in reports])
    return {"moved_cm_median": float(np.median(cm)), "moved_cm_max": float(cm.max()),
            "moved_deg_median": float(np.median(deg)), "moved_deg_max": float(deg.max()),
            "scale_change": [r.scale_change for r in reports][:3],
            "refine_s": float(np.median([sum(r.seconds.values()) for r in reports]))}


def run(split: bench_core.Split, out: Path, rcfg: RefineConfig, mcfg: MapBuildConfig, loc_cfg: LocalizerConfig,
        baseline: bool) -> dict:
    frames = split.map_frames()
    res: dict = {}
    if split.leave_one_out:
        cache: dict = {}
        tmp = Path(tempfile.mkdtemp(prefix="refine_loo_", dir=out))
        recs = {"base": [], "refined": []}
        reports = []
        try:
            for i, q in enumerate(frames):
                rest = [f for j, f in enumerate(frames) if j != i]
                variants = [("refined", None)] + ([("base", rest)] if baseline else [])
                for tag, fr in variants:
                    if fr is None:
                        fr, rep = refine_frames(rest, rcfg, feature_cache=cache)
                        reports.append(rep)
                    path = build_map(fr, tmp / f"{tag}{i}", mcfg, feature_cache=cache, overwrite=True)
                    loc = Localizer(KeyframeMap.load(path), dataclasses.replace(loc_cfg))
                    recs[tag].append(make_record(q.name, q.T_world_cam, loc.localize(q.image, q.camera)))
                    shutil.rmtree(path, ignore_errors=True)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        res["refined"] = _summary(recs["refined"])
        if baseline:
            res["base"] = _summary(recs["base"])
        res["refine"] = _moves(reports)
        res["report_first"] = reports[0].to_dict()
        return res
    queries = split.queries()
    cache = {}
    t = time.perf_counter()
    refined, rep = refine_frames(frames, rcfg, feature_cache=cache)
    res["refine"] = _moves([rep])
    res["report"] = rep.to_dict()
    print(f"  refine {split.name}: {rep.summary()} ({time.perf_counter() - t:.1f} s)", flush=True)
    for tag, fr in [("refined", refined)] + ([("base", frames)] if baseline else []):
        path = build_map(fr, out / f"{split.name}-{tag}", mcfg, feature_cache=cache, overwrite=True)
        res[tag] = _summary(_evaluate(path, queries, split.warmup, loc_cfg))
        res[tag]["num_points3d"] = KeyframeMap.load(path).manifest["num_points3d"]
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shared", default="../shared")
    ap.add_argument("--out", default="out/refine")
    ap.add_argument("--splits", default="7s-rgb,kitti,strecha,room-rgb")
    ap.add_argument("--refine-option", action="append", default=[], metavar="K=V", help="RefineConfig field")
    ap.add_argument("--no-baseline", action="store_true", help="skip the unrefined map")
    ap.add_argument("--json", help="write the summaries here")
    args = ap.parse_args(argv)
    names = [s.strip() for s in args.splits.split(",") if s.strip()]
    unknown = [s for s in names if s not in SPLITS]
    if unknown:
        ap.error(f"unknown split(s) {unknown}; known: {SPLITS}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rcfg = from_dict(RefineConfig, nest_dotted(parse_kv(args.refine_option)), "refine")
    loc_cfg = LocalizerConfig()
    splits = bench_core._splits(Path(args.shared))
    print(f"cpu: {os.cpu_count()} cores; load average {os.getloadavg()}; refine config {dataclasses.asdict(rcfg)}",
          flush=True)
    results, rows = {}, []
    for name in names:
        split = splits[name]
        if split.map_frames is None:
            print(f"{name}: skipped, its data under {args.shared}/data is absent")
            continue
        mcfg = bench_core._build_config(split, {})
        t0 = time.perf_counter()
        r = run(split, out, rcfg, mcfg, loc_cfg, not args.no_baseline)
        results[name] = r
        mv = r["refine"]
        move = (f"{mv['moved_cm_median']:.2f} / {mv['moved_cm_max']:.2f} cm, {mv['moved_deg_median']:.3f} / "
                f"{mv['moved_deg_max']:.3f} deg")
        for tag in ("base", "refined"):
            if tag in r:
                rows.append(bench_core._row(f"{name} {tag}", r[tag]) + (f" {move} |" if tag == "refined" else " - |"))
                print(rows[-1], flush=True)
        print(f"{name}: {time.perf_counter() - t0:.0f} s, load average {os.getloadavg()}", flush=True)
    bench_core.print_table(rows, ["poses moved median / max"])
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
