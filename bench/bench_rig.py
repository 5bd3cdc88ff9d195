"""Multi-camera rig benchmark on the rendered demo room (exact ground truth; prints, asserts nothing).

    .venv/bin/python bench/bench_rig.py [--out out/bench_rig] [--captures 20] [--map-poses 16]
        [--size 640x480] [--latency-captures 10] [--json out/bench_rig/rig.json]

The rig is reloc_ros.demo.rig_scene's default: four cameras (front, left, right, back;
optical axes 90 deg apart, 63 deg field of view, so no overlap) on a body driving round
the room. The map is built from the rig's own frames at ``--map-poses`` body poses (with
depth); the captures are at jittered poses between them (``rig_path(phase=0.2,
jitter=0.5, seed=3)``). Reported:

- full: every camera; body pose error median / p90, localized %, NEES;
- one texture-less: in capture i, camera i mod 4 sees a blank wall (``textureless``);
- one camera only: in capture i, only camera i mod 4 sees texture (the other three are
  blank) against the single-camera Localizer on that camera alone (its pose moved to the
  body), both on the same images;
- per_camera_fusion: every camera localized alone, body poses fused (``RigConfig(method=
  'per_camera')``, the path of the learned estimators), for comparison;
- essential_only: the essential-matrix path alone (estimator mode 'essential'): 5-point
  pairs of every camera fused with the lever-arm-shifted keyframes;
- latency p50 / p90 per capture for the first 1, 2, 3, 4 cameras (front, left, right,
  back) on the first ``--latency-captures`` captures, with the ratio to one camera, and
  the single-camera Localizer on the front camera.

Latencies are wall-clock on a shared machine: compare numbers of one run only; the load
average is printed.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from reloc_ros.demo.rig_scene import (RigSceneConfig, demo_rig, render_capture, render_rig_frames, rig_path,
                                      textureless)
from reloc_ros.demo.scene import ProceduralRoom, RoomConfig
from reloc_ros.evaluation import make_record
from reloc_ros.localizer import LocalizerConfig
from reloc_ros.maps import KeyframeMap, MapBuildConfig, MapError, build_map
from reloc_ros.rig import CameraView, RigConfig, RigLocalizer


def _stats(recs) -> dict:
    loc = [r for r in recs if r.localized]
    t = np.array([r.translation_error_m for r in loc]) * 1e3
    a = np.array([r.rotation_error_deg for r in loc])
    nees = np.array([r.nees_position for r in loc if np.isfinite(r.nees_position)])
    ok = sum(r.status == "ok" for r in recs)
    return {
        "n": len(recs), "localized_pct": 100.0 * len(loc) / max(len(recs), 1), "ok_pct": 100.0 * ok / max(len(recs), 1),
        "median_mm": float(np.median(t)) if len(t) else float("nan"),
        "p90_mm": float(np.percentile(t, 90)) if len(t) else float("nan"),
        "max_mm": float(t.max()) if len(t) else float("nan"),
        "median_deg": float(np.median(a)) if len(a) else float("nan"),
        "p90_deg": float(np.percentile(a, 90)) if len(a) else float("nan"),
        "max_deg": float(a.max()) if len(a) else float("nan"),
        "within_5mm_0.05deg_pct": 100.0 * sum(r.translation_error_m <= 0.005 and r.rotation_error_deg <= 0.05
                                              for r in recs) / max(len(recs), 1),
        "median_nees_position": float(np.median(nees)) if len(nees) else float("nan"),
    }


def _row(name: str, s: dict) -> str:
    return (f"{name:<28} {s['n']:>3} {s['localized_pct']:>6.1f}% {s['median_mm']:>7.2f} {s['p90_mm']:>7.2f} "
            f"{s['median_deg']:>7.3f} {s['p90_deg']:>7.3f} {s['within_5mm_0.05deg_pct']:>6.1f}% "
            f"{s['median_nees_position']:>6.2f}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="out/bench_rig", help="map cache and output folder")
    p.add_argument("--captures", type=int, default=20)
    p.add_argument("--map-poses", type=int, default=16)
    p.add_argument("--size", default="640x480", help="WxH of every camera (focal scales with the width)")
    p.add_argument("--latency-captures", type=int, default=10)
    p.add_argument("--json", default=None, help="output JSON (default: OUT/rig.json)")
    args = p.parse_args(argv)
    w, h = (int(v) for v in args.size.lower().split("x"))
    scene = RigSceneConfig(width=w, height=h, focal=525.0 * w / 640.0)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    room = ProceduralRoom(RoomConfig())
    rig = demo_rig(scene)
    map_dir = out / f"map_{w}x{h}_{args.map_poses}"
    t0 = time.perf_counter()
    try:
        kmap = KeyframeMap.load(map_dir)
        if kmap.camera_ids is None:
            raise MapError("not a rig map")
    except MapError:
        frames = render_rig_frames(room, rig, rig_path(room, args.map_poses, scene), "map")
        build_map(frames, map_dir, MapBuildConfig(), source="bench_rig demo rig", overwrite=True)
        kmap = KeyframeMap.load(map_dir)
    print(f"map {map_dir}: {kmap.num_keyframes} keyframes ({time.perf_counter() - t0:.1f} s)")
    poses = rig_path(room, args.captures, scene, phase=0.2, jitter=0.5, seed=3)
    captures = [render_capture(room, rig, T) for T in poses]
    loc = RigLocalizer(kmap)
    names = rig.names
    results: dict = {"config": {"size": [w, h], "captures": args.captures, "map_poses": args.map_poses,
                                "cameras": names}, "load_average_start": os.getloadavg()}

    full = [loc.localize(c) for c in captures]
    recs = {"full": [make_record(f"c{i}", T, r.as_localization_result()) for i, (T, r) in
                     enumerate(zip(poses, full))]}
    rec_tl, rec_one, rec_single = [], [], []
    for i, (T, cap) in enumerate(zip(poses, captures)):
        j = i % len(cap)
        tl = [CameraView(v.name, textureless(v.image) if k == j else v.image, v.camera, v.T_base_cam)
              for k, v in enumerate(cap)]
        rec_tl.append(make_record(f"c{i}", T, loc.localize(tl).as_localization_result()))
        one = [CameraView(v.name, v.image if k == j else textureless(v.image), v.camera, v.T_base_cam)
               for k, v in enumerate(cap)]
        rec_one.append(make_record(f"c{i}:{cap[j].name}", T, loc.localize(one).as_localization_result()))
        rec_single.append(make_record(f"c{i}:{cap[j].name}", T,
                                      loc.localize_camera(cap[j]).as_localization_result()))
    recs.update({"one_textureless": rec_tl, "one_camera_rig": rec_one, "one_camera_single": rec_single})
    # The learned estimators' path (each camera alone, body poses fused), here with the
    # geometric estimator, for comparison with the generalized pose.
    per_cam = RigLocalizer(kmap, rig_config=RigConfig(method="per_camera"))
    pc_res = [per_cam.localize(c) for c in captures]
    recs["per_camera_fusion"] = [make_record(f"c{i}", T, r.as_localization_result())
                                 for i, (T, r) in enumerate(zip(poses, pc_res))]
    # The essential-matrix path alone (what mode 'auto' falls back to without 2D-3D inliers).
    ess = RigLocalizer(kmap, LocalizerConfig(estimator_options={"mode": "essential"}))
    recs["essential_only"] = [make_record(f"c{i}", T, ess.localize(c).as_localization_result())
                              for i, (T, c) in enumerate(zip(poses, captures))]
    stats = {k: _stats(v) for k, v in recs.items()}
    # Paired comparison of the rig with one textured camera and that camera alone.
    pair = [(a.translation_error_m, b.translation_error_m, a.rotation_error_deg, b.rotation_error_deg)
            for a, b in zip(rec_one, rec_single) if a.localized and b.localized]
    if pair:
        d = np.array(pair)
        stats["one_camera_rig_minus_single"] = {
            "n_both_localized": len(pair),
            "median_translation_diff_mm": float(np.median(d[:, 0] - d[:, 1]) * 1e3),
            "median_rotation_diff_deg": float(np.median(d[:, 2] - d[:, 3])),
            "rig_localized": sum(r.localized for r in rec_one),
            "single_localized": sum(r.localized for r in rec_single)}

    lat = {}
    m = min(args.latency_captures, len(captures))
    for k in range(1, len(names) + 1):
        ms = ([r.timings_ms["total"] for r in full[:m]] if k == len(names) else
              [loc.localize(c[:k]).timings_ms["total"] for c in captures[:m]])
        lat[k] = {"p50_ms": float(np.percentile(ms, 50)), "p90_ms": float(np.percentile(ms, 90))}
    for k in lat:
        lat[k]["p50_ratio_to_1"] = lat[k]["p50_ms"] / lat[1]["p50_ms"]
    ms = [loc.localize_camera(c[0]).timings_ms["total"] for c in captures[:m]]
    lat["single_camera_localizer"] = {"p50_ms": float(np.percentile(ms, 50)), "p90_ms": float(np.percentile(ms, 90)),
                                      "p50_ratio_to_1": float(np.percentile(ms, 50)) / lat[1]["p50_ms"]}
    ms = [r.timings_ms["total"] for r in pc_res[:m]]
    lat["per_camera_fusion_4"] = {"p50_ms": float(np.percentile(ms, 50)), "p90_ms": float(np.percentile(ms, 90)),
                                  "p50_ratio_to_1": float(np.percentile(ms, 50)) / lat[1]["p50_ms"]}
    stats["latency"] = lat
    stats["stages_4_cameras_p50_ms"] = {key: float(np.median([r.timings_ms.get(key, 0.0) for r in full[:m]]))
                                        for key in full[0].timings_ms}
    results["stats"] = stats
    results["load_average_end"] = os.getloadavg()

    print(f"\n{'case':<28} {'n':>3} {'loc':>7} {'med mm':>7} {'p90 mm':>7} {'med deg':>7} {'p90 deg':>7} "
          f"{'<=5mm&0.05d':>7} {'NEES':>6}")
    for k in ("full", "one_textureless", "one_camera_rig", "one_camera_single", "per_camera_fusion",
              "essential_only"):
        print(_row(k, stats[k]))
    if "one_camera_rig_minus_single" in stats:
        print("one camera, rig - single:", json.dumps(stats["one_camera_rig_minus_single"]))
    print("\nlatency per capture (ms):")
    for k, v in lat.items():
        label = k if isinstance(k, str) else f"{k} camera(s)"
        print(f"  {label}: p50 {v['p50_ms']:.0f}  p90 {v['p90_ms']:.0f}  (p50 x{v['p50_ratio_to_1']:.2f} of one)")
    print("4-camera stages p50 (ms):", {k: round(v) for k, v in stats["stages_4_cameras_p50_ms"].items()})
    print(f"load average: start {results['load_average_start']}, end {results['load_average_end']}")
    path = Path(args.json) if args.json else out / "rig.json"
    path.write_text(json.dumps(results, indent=1, default=float))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
