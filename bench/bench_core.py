"""Core latency and map-size benchmark on the 7-Scenes dev split (prints; asserts nothing).

    .venv/bin/python bench/bench_core.py [--shared ../shared] [--out out/bench] [--top-k 10]

Builds (once, cached under --out) the depth and RGB-only maps of redkitchen frames
0:250:5, localizes frames 250:500:5 against each after a short warm-up, and prints
p50/p90 latency per stage, accuracy, and the map's size on disk and in RAM per keyframe.
Targets (issue 2): p50 <= 120 ms with depth, <= 250 ms without, on a 2-core CPU.
Compare numbers from one run only: the machine is shared and noisy.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import psutil

from reloc_ros.datasets import open_dataset
from reloc_ros.evaluation import format_table, make_record, summarize
from reloc_ros.localizer import Localizer, LocalizerConfig
from reloc_ros.maps import KeyframeMap, MapBuildConfig, MapError, build_map


def _map(ds_dir: Path, out: Path, depth: bool) -> Path:
    path = out / ("7s_depth" if depth else "7s_rgb")
    try:
        KeyframeMap.load(path)
        return path
    except MapError:
        pass
    ds = open_dataset("7scenes", ds_dir, frames="0:250:5", use_depth=depth)
    t = time.perf_counter()
    build_map(ds, path, MapBuildConfig(use_depth=depth), overwrite=True)
    print(f"built {path} in {time.perf_counter() - t:.1f} s")
    return path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shared", default="../shared")
    ap.add_argument("--out", default="out/bench")
    ap.add_argument("--top-k", type=int, default=LocalizerConfig.top_k)
    ap.add_argument("--warmup", type=int, default=3)
    args = ap.parse_args(argv)
    ds_dir = Path(args.shared) / "data" / "7scenes_redkitchen_0000_0499"
    if not ds_dir.exists():
        print(f"skipped: {ds_dir} is absent")
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    queries = open_dataset("7scenes", ds_dir, frames="250:500:5", use_depth=False)
    frames = [queries[i] for i in range(len(queries))]  # decode outside the timed loop
    print(f"cpu: {os.cpu_count()} cores, load average {os.getloadavg()}")
    for depth in (True, False):
        path = _map(ds_dir, out, depth)
        proc = psutil.Process()
        rss0 = proc.memory_info().rss
        loc = Localizer.from_map(path, LocalizerConfig(top_k=args.top_k))
        for f in frames[: args.warmup]:
            loc.localize(f.image, f.camera)
        records = [make_record(f.name, f.T_world_cam, loc.localize(f.image, f.camera)) for f in frames]
        rss1 = proc.memory_info().rss
        s = summarize(records)
        n = loc.kmap.num_keyframes
        disk = sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())
        print(f"\n=== 7-Scenes redkitchen map 0:250:5 {'WITH depth' if depth else 'RGB-only'}, "
              f"queries 250:500:5, top_k={args.top_k} ===")
        print(format_table(s))
        ok = [r for r in records if r.status == "ok"]
        if ok:
            t = sorted(r.translation_error_m for r in ok)
            print(f"status OK only: {len(ok)} queries, median "
                  f"{t[len(t) // 2] * 100:.1f} cm, worst {t[-1] * 100:.1f} cm / "
                  f"{max(r.rotation_error_deg for r in ok):.1f} deg, {sum(x > 0.25 for x in t)} beyond 25 cm")
        print(f"map: {n} keyframes; disk {disk / n / 1024:.0f} KiB/keyframe; arrays in RAM "
              f"{loc.kmap.memory_bytes() / n / 1024:.0f} KiB/keyframe; process RSS growth "
              f"{(rss1 - rss0) / n / 1024:.0f} KiB/keyframe (includes the localizer)")
        target = 120 if depth else 250
        p50 = s["latency_ms_p50"]
        print(f"latency p50 {p50:.0f} ms vs target {target} ms: {'met' if p50 <= target else 'MISSED'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
