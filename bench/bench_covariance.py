"""Covariance calibration of the default ``geometric`` estimator, out of sample (prints; asserts nothing).

    .venv/bin/python bench/bench_covariance.py [--shared ../shared] [--out out/bench_covariance]
        [--sets calibration,synthetic,kitti,strecha,7scenes] [--strecha-step 1]
    .venv/bin/python bench/bench_covariance.py --fit      # refit the constants (calibration set only)

Per localized query the position and rotation NEES ``e^T C^-1 e`` under the reported
covariance (reloc_ros.evaluation.make_record); calibrated 3-dof NEES has median 2.37
and 95 % of its values below 7.81 (chi-square(3)).

Sets (maps cached under --out/maps, rendered frames under --out/frames):

- ``calibration``: the ONE set the three covariance constants of GeometricConfig
  (``cov_keyframe_gain``, ``cov_depth_field_gain``, ``cov_common_mode``) are fitted on,
  with ``--fit``. A procedurally rendered room that is *not* the synthetic report room
  (texture seed 23 instead of 7, other size and boxes, other keyframe and query
  trajectories), 30 keyframes, 30 queries with exact ground truth, six maps: exact
  depth and RGB-only maps, and the same with the corruption real maps have, every
  keyframe pose perturbed by ~3.5 mm / 0.05 deg ('mild', a bundle-adjusted map) or
  ~1 cm / 0.3 deg ('noisy', KinectFusion-like) in norm, plus Kinect-like depth noise
  (sigma 1.2 mm + 1.9 mm (z - 0.4 m)^2, Nguyen et al. 2012).
- ``synthetic``: the rendered room of test/test_pipeline_synthetic.py (RoomConfig(),
  24 keyframes on the orbit), 24 queries on the jittered orbit (seed 3), exact ground
  truth, exact maps; depth map and RGB-only map.
- ``kitti``: KITTI 06, map frames 0:51:2 (triangulated points), queries 1:51:2.
- ``strecha``: Herz-Jesus-P25 leave-one-out: every image (--strecha-step 1, 25 queries;
  2 gives 13) against a map of all 24 other images (triangulated). Every query needs
  its own map (~5 s each to build; features and matches are shared, maps are cached).
- ``7scenes``: redkitchen map 0:250:5 with depth, queries 250:500:5. Its ground truth is
  inconsistent with its own images at the 2-10 cm level (docs/RESULTS.md), so its NEES
  measures the ground truth as much as the covariance.

Maps are cached by name: delete --out/maps after changing how maps are built.
A set whose data are absent is skipped with the reason. Output: one table (NEES over
all localized queries, OK and DEGENERATE, with the covariance the localizer reports),
--out/<set>.json per set (reloc_ros.evaluation.write_json) and
--out/bench_covariance.json (the table). With --fit also --out/fit.json.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional

import numpy as np

from reloc_ros.datasets import open_dataset
from reloc_ros.demo.scene import ProceduralRoom, RoomConfig, demo_camera, orbit_poses, render_frames
from reloc_ros.evaluation import make_record, summarize, write_json
from reloc_ros.geometry import make_T, so3_exp, so3_log
from reloc_ros.localizer import Localizer, LocalizerConfig
from reloc_ros.maps import KeyframeMap, MapBuildConfig
from reloc_ros.types import PosedFrame

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_core import cached_map  # noqa: E402

CHI2_3DOF_95 = 7.81
SETS = ("calibration", "synthetic", "kitti", "strecha", "7scenes")

# The calibration room: nothing shared with the synthetic report room but the renderer.
CAL_ROOM = RoomConfig(
    size=(7.0, 5.5, 2.8),
    boxes=(((0.4, 0.4, 0.0), (1.4, 1.0, 1.1)),
           ((5.4, 4.2, 0.0), (6.6, 5.1, 0.8)),
           ((3.0, 4.6, 0.0), (3.8, 5.2, 1.5)),
           ((5.9, 0.3, 0.0), (6.6, 1.4, 1.9))),
    seed=23,
)
# Keyframe pose noise per axis (metres, radians) of the two corrupted map qualities:
# 'noisy' ~1 cm / 0.3 deg in norm (KinectFusion-like ground truth, above the 2 px
# triangulation gate), 'mild' ~3.5 mm / 0.05 deg in norm (a bundle-adjusted map).
CAL_KF_POSE_SIGMA = {"noisy": (0.0058, np.radians(0.17)), "mild": (0.002, np.radians(0.03))}


def kinect_depth_sigma(z: np.ndarray) -> np.ndarray:
    """Axial depth noise (metres) of a structured-light sensor at depth z (Nguyen et al. 2012)."""
    return 0.0012 + 0.0019 * (z - 0.4) ** 2


@dataclass
class EvalSet:
    """One report row: a localizer per query (maps may differ per query, e.g. leave-one-out)."""

    name: str
    what: str
    queries: List[PosedFrame] = field(default_factory=list)
    localizer_for: Optional[Callable[[int], Localizer]] = None


# ------------------------------------------------------------------ rendered sets

def _frames_cached(path: Path, make: Callable[[], List[PosedFrame]]) -> List[PosedFrame]:
    """Rendered frames are deterministic; cache them (images, depth, poses) as one npz."""
    cam = demo_camera()
    if path.is_file():
        z = np.load(path, allow_pickle=False)
        return [PosedFrame(name=str(n), image=im, T_world_cam=T, camera=cam, depth=d, depth_camera=cam,
                           T_cam_depth=np.eye(4)) for n, im, d, T in zip(z["names"], z["images"], z["depth"], z["T"])]
    frames = make()
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, names=np.array([f.name for f in frames]), images=np.stack([f.image for f in frames]),
                        depth=np.stack([f.depth for f in frames]), T=np.stack([f.T_world_cam for f in frames]))
    return frames


def _map_cached(path: Path, frames: Callable[[], object], cfg: MapBuildConfig,
                feature_cache: Optional[dict] = None) -> KeyframeMap:
    return KeyframeMap.load(cached_map(path, cfg, frames, feature_cache=feature_cache))


def corrupt_keyframes(frames: List[PosedFrame], seed: int, level: str = "noisy") -> List[PosedFrame]:
    """Keyframes as a real map has them: pose off by CAL_KF_POSE_SIGMA[level], Kinect-like depth noise."""
    rng = np.random.default_rng(seed)
    st, sr = CAL_KF_POSE_SIGMA[level]
    out = []
    for f in frames:
        dT = make_T(so3_exp(rng.normal(0, sr, 3)), rng.normal(0, st, 3))
        d = f.depth.astype(np.float64)
        d = d + rng.normal(size=d.shape) * kinect_depth_sigma(d)
        out.append(PosedFrame(name=f.name, image=f.image, T_world_cam=f.T_world_cam @ dT, camera=f.camera,
                              depth=d.astype(np.float32), depth_camera=f.depth_camera, T_cam_depth=f.T_cam_depth))
    return out


def rendered_sets(out: Path, which: str, cfg: LocalizerConfig) -> List[EvalSet]:
    cam = demo_camera()
    if which == "calibration":
        room_cfg, tag = CAL_ROOM, "cal"
        kf_poses = lambda room: orbit_poses(room, 30, radius_scale=0.85, phase=0.05, seed=5, jitter=0.3)  # noqa: E731
        q_poses = lambda room: orbit_poses(room, 30, radius_scale=1.05, phase=0.11, seed=6, jitter=0.7)  # noqa: E731
    else:
        room_cfg, tag = RoomConfig(), "syn"
        kf_poses = lambda room: orbit_poses(room, 24)  # noqa: E731
        q_poses = lambda room: orbit_poses(room, 24, phase=0.13, jitter=0.5, seed=3)  # noqa: E731
    room: List[ProceduralRoom] = []

    def get_room() -> ProceduralRoom:
        if not room:
            room.append(ProceduralRoom(room_cfg))
        return room[0]

    queries = _frames_cached(out / "frames" / f"{tag}_queries.npz",
                             lambda: render_frames(get_room(), q_poses(get_room()), cam, "q"))

    def exact_keyframes():
        return _frames_cached(out / "frames" / f"{tag}_keyframes.npz",
                              lambda: render_frames(get_room(), kf_poses(get_room()), cam, "kf"))

    variants = [("depth", True, exact_keyframes, "exact map"), ("rgb", False, exact_keyframes, "exact map")]
    if which == "calibration":
        for level, seed, what in (("mild", 29, "~3.5 mm/0.05 deg"), ("noisy", 17, "~1 cm/0.3 deg")):
            kfs = lambda level=level, seed=seed: corrupt_keyframes(exact_keyframes(), seed, level)  # noqa: E731
            variants += [(f"{level}-depth", True, kfs, f"keyframes {what} off + Kinect depth noise"),
                         (f"{level}-rgb", False, kfs, f"keyframes {what} off")]
    sets = []
    for var, depth, frames, what in variants:
        kmap = _map_cached(out / "maps" / f"{tag}_{var}", frames, MapBuildConfig(use_depth=depth))
        loc = Localizer(kmap, cfg)
        room_what = "calibration room seed 23" if which == "calibration" else "test room seed 7"
        sets.append(EvalSet(f"{which}/{var}", f"{room_what}, {'depth' if depth else 'RGB-only'} map, {what}",
                            queries, lambda i, loc=loc: loc))
    return sets


# ------------------------------------------------------------------ real data

def kitti_set(shared: Path, out: Path, cfg: LocalizerConfig) -> List[EvalSet]:
    src = shared / "data" / "kitti_odometry_06_0000_0050"
    if not src.exists():
        raise FileNotFoundError(f"{src} is absent")
    kmap = _map_cached(out / "maps" / "kitti_0_51_2", lambda: open_dataset("kitti", src, frames="0:51:2"),
                       MapBuildConfig())
    q = open_dataset("kitti", src, frames="1:51:2", use_depth=False)
    loc = Localizer(kmap, cfg)
    return [EvalSet("kitti", "KITTI 06 map 0:51:2 (triangulated), queries 1:51:2",
                    [q[i] for i in range(len(q))], lambda i: loc)]


def sevenscenes_set(shared: Path, out: Path, cfg: LocalizerConfig) -> List[EvalSet]:
    src = shared / "data" / "7scenes_redkitchen_0000_0499"
    if not src.exists():
        raise FileNotFoundError(f"{src} is absent")
    kmap = _map_cached(out / "maps" / "7s_depth_0_250_5", lambda: open_dataset("7scenes", src, frames="0:250:5"),
                       MapBuildConfig())
    q = open_dataset("7scenes", src, frames="250:500:5", use_depth=False)
    loc = Localizer(kmap, cfg)
    return [EvalSet("7scenes", "redkitchen map 0:250:5 with depth, queries 250:500:5",
                    [q[i] for i in range(len(q))], lambda i: loc)]


def strecha_set(shared: Path, out: Path, cfg: LocalizerConfig, step: int) -> List[EvalSet]:
    src = shared / "data" / "strecha_herzjesus_p25_half"
    if not src.exists():
        raise FileNotFoundError(f"{src} is absent")
    ds = open_dataset("strecha", src)
    frames = [ds[i] for i in range(len(ds))]
    qidx = list(range(0, len(frames), step))
    cache: dict = {}  # features and keyframe matches, shared by every leave-one-out build

    def localizer_for(j: int) -> Localizer:
        i = qidx[j]
        kmap = _map_cached(out / "maps" / f"strecha_loo_{i:02d}",
                           lambda: [f for k, f in enumerate(frames) if k != i], MapBuildConfig(), cache)
        return Localizer(kmap, cfg)

    which = "every image" if step == 1 else f"every {step}th image"
    return [EvalSet("strecha", f"Herz-Jesus-P25 leave-one-out, {which} vs a map of the other 24",
                    [frames[i] for i in qidx], localizer_for)]


# ------------------------------------------------------------------ running

def evaluate(s: EvalSet) -> tuple:
    """Localize every query; returns (records, PnP covariance decompositions or None per query)."""
    records, parts = [], []
    for j, f in enumerate(s.queries):
        loc = s.localizer_for(j)
        if j == 0:  # warm-up once (first-call costs)
            loc.localize(f.image, f.camera)
        est = loc.estimator
        est.last_pnp_covariance = None
        res = loc.localize(f.image, f.camera)
        records.append(make_record(f.name, f.T_world_cam, res))
        parts.append(getattr(est, "last_pnp_covariance", None) if res.localized else None)
    return records, parts


CHI2_3DOF_MEDIAN = 2.366


def _nees_batch(cov: np.ndarray, e: np.ndarray) -> np.ndarray:
    """e^T C^-1 e for covariances [..., 3, 3] and errors [q, 3] (broadcast over leading axes)."""
    return np.einsum("...i,...i->...", e, np.linalg.solve(cov, e[..., None])[..., 0])


def fit_gains(samples: Dict[str, list]) -> dict:
    """Grid-fit (cov_keyframe_gain, cov_depth_field_gain, cov_common_mode) on calibration samples.

    samples: variant -> [(PnPCovariance, position error [3], rotation error [3])] of its
    status-OK PnP queries. Objective: sum over variants of log(median NEES / 2.366)^2,
    position and rotation, i.e. every map variant's median NEES as close as possible to
    the chi-square(3) median in ratio.
    """
    names = ("pixel", "query", "keyframe", "depth_field", "common")
    data = {}
    for v, items in samples.items():
        P = np.array([[pc.parts.get(k, np.zeros((6, 6))) for k in names] for pc, _, _ in items])  # [q, 5, 6, 6]
        data[v] = (P, np.array([e for _, e, _ in items]), np.array([e for _, _, e in items]))
    g_kf = 10 ** np.arange(-1.0, 2.51, 0.1)
    g_df = 10 ** np.arange(0.0, 3.01, 0.1)
    beta = np.arange(0.0, 1.001, 0.05)
    best = (np.inf, None)
    for a in g_kf:
        for b in g_df:
            obj = 0.0
            for P, ep, er in data.values():
                base = P[:, 0] + P[:, 1] + a * P[:, 2] + b * P[:, 3]  # [q, 6, 6]
                cov = base[None] + (beta ** 2)[:, None, None, None] * P[None, :, 4]  # [nb, q, 6, 6]
                npos = np.median(_nees_batch(cov[..., :3, :3], ep[None]), axis=1)
                nrot = np.median(_nees_batch(cov[..., 3:, 3:], er[None]), axis=1)
                obj = obj + np.log(npos / CHI2_3DOF_MEDIAN) ** 2 + np.log(nrot / CHI2_3DOF_MEDIAN) ** 2
            i = int(np.argmin(obj))
            if obj[i] < best[0]:
                best = (float(obj[i]), (float(a), float(b), float(beta[i])))
    obj, (a, b, c) = best
    per = {}
    for v, (P, ep, er) in data.items():
        cov = P[:, 0] + P[:, 1] + a * P[:, 2] + b * P[:, 3] + c ** 2 * P[:, 4]
        per[v] = {"n": len(ep), "nees_position_median": float(np.median(_nees_batch(cov[:, :3, :3], ep))),
                  "nees_rotation_median": float(np.median(_nees_batch(cov[:, 3:, 3:], er)))}
    return {"cov_keyframe_gain": a, "cov_depth_field_gain": b, "cov_common_mode": c, "objective": obj,
            "per_variant": per}


def row(s: EvalSet, records: list) -> dict:
    summ = summarize(records)
    loc = [r for r in records if r.localized and np.isfinite(r.nees_position)]
    ok = [r for r in loc if r.status == "ok"]
    p = np.array([r.nees_position for r in loc])
    q = np.array([r.nees_rotation for r in loc])
    return {
        "set": s.name, "what": s.what, "n": len(records), "n_localized": len(loc), "n_ok": len(ok),
        "nees_position_median": float(np.median(p)) if len(p) else float("nan"),
        "nees_rotation_median": float(np.median(q)) if len(q) else float("nan"),
        "nees_position_within_95": float(np.mean(p < CHI2_3DOF_95)) if len(p) else float("nan"),
        "nees_rotation_within_95": float(np.mean(q < CHI2_3DOF_95)) if len(q) else float("nan"),
        "nees_position_median_ok": float(np.median([r.nees_position for r in ok])) if ok else float("nan"),
        "median_translation_m": summ["median_translation_m_localized"],
        "median_rotation_deg": summ["median_rotation_deg_localized"],
        "median_position_sigma_m": float(np.median([np.sqrt(np.trace(r.covariance[:3, :3]) / 3) for r in loc]))
        if loc else float("nan"),
        "latency_ms_p50": summ["latency_ms_p50"],
        "pnp_ms_p50": summ["stage_latency_ms"].get("estimate.pnp", {}).get("p50", float("nan")),
        "summary": summ,
    }


def format_rows(rows: List[dict]) -> str:
    head = (f"{'set':<24} {'n':>3} {'loc':>3} {'NEESpos':>8} {'NEESrot':>8} {'pos<7.81':>8} {'rot<7.81':>8} "
            f"{'med err':>16} {'med sigma':>9} {'p50 ms':>7}")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r['set']:<24} {r['n']:>3} {r['n_localized']:>3} {r['nees_position_median']:>8.2f} "
            f"{r['nees_rotation_median']:>8.2f} {r['nees_position_within_95']:>8.2f} "
            f"{r['nees_rotation_within_95']:>8.2f} "
            f"{r['median_translation_m'] * 100:>7.2f}cm/{r['median_rotation_deg']:>5.3f}d "
            f"{r['median_position_sigma_m'] * 100:>7.2f}cm {r['latency_ms_p50']:>7.0f}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shared", default="../shared")
    ap.add_argument("--out", default="out/bench_covariance")
    ap.add_argument("--sets", default=",".join(SETS), help=f"comma-separated subset of {SETS}")
    ap.add_argument("--strecha-step", type=int, default=1,
                    help="leave-one-out for every n-th Strecha image only (each needs its own map)")
    ap.add_argument("--estimator-option", action="append", default=[], metavar="K=V",
                    help="geometric estimator option, e.g. cov_depth_field_gain=10 (the gains are refitted "
                         "from the covariance decomposition with --fit, whatever they are set to)")
    ap.add_argument("--fit", action="store_true",
                    help="fit the three covariance constants on the calibration set (only) and print them")
    args = ap.parse_args(argv)
    if args.fit and args.sets == ",".join(SETS):
        args.sets = "calibration"
    from reloc_ros.config import parse_kv

    shared, out = Path(args.shared), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = LocalizerConfig(estimator_options=parse_kv(args.estimator_option))
    print(f"cpu: {os.cpu_count()} cores, load average {os.getloadavg()}", flush=True)
    rows, skipped, all_records, samples = [], {}, {}, {}
    for name in [s.strip() for s in args.sets.split(",") if s.strip()]:
        if name not in SETS:
            ap.error(f"unknown set {name!r}; known: {SETS}")
        t0 = time.perf_counter()
        try:
            if name in ("calibration", "synthetic"):
                sets = rendered_sets(out, name, cfg)
            elif name == "kitti":
                sets = kitti_set(shared, out, cfg)
            elif name == "strecha":
                sets = strecha_set(shared, out, cfg, args.strecha_step)
            else:
                sets = sevenscenes_set(shared, out, cfg)
        except FileNotFoundError as e:
            print(f"skipped {name}: {e}", flush=True)
            skipped[name] = str(e)
            continue
        for s in sets:
            records, parts = evaluate(s)
            if args.fit:
                if not s.name.startswith("calibration/"):
                    ap.error("--fit fits on the calibration set only")
                samples[s.name] = [(pc, rec.T_gt[:3, 3] - rec.T_est[:3, 3],
                                    so3_log(rec.T_gt[:3, :3] @ rec.T_est[:3, :3].T))
                                   for rec, pc in zip(records, parts) if pc is not None and rec.status == "ok"]
            r = row(s, records)
            rows.append(r)
            all_records[s.name] = records
            print(format_rows([r]).splitlines()[-1] + f"   ({time.perf_counter() - t0:.0f} s)", flush=True)
            write_json(out / f"{s.name.replace('/', '_')}.json", r["summary"], records,
                       {"set": s.name, "what": s.what, "localizer_config": cfg.estimator_options})
    print()
    print(format_rows(rows))
    if args.fit:
        from reloc_ros.estimators.geometric import GeometricConfig

        t = time.perf_counter()
        fit = fit_gains(samples)
        print(f"\nfitted on {', '.join(f'{k} ({len(v)})' for k, v in samples.items())} in "
              f"{time.perf_counter() - t:.0f} s (objective {fit['objective']:.2f}):")
        for k in ("cov_keyframe_gain", "cov_depth_field_gain", "cov_common_mode"):
            print(f"  {k} = {fit[k]:.3g}   (GeometricConfig default {getattr(GeometricConfig, k)})")
        for v, d in fit["per_variant"].items():
            print(f"  {v:<24} n {d['n']:3d}  median NEES position {d['nees_position_median']:.2f}  "
                  f"rotation {d['nees_rotation_median']:.2f}")
        (out / "fit.json").write_text(json.dumps(fit, indent=1))
        print(f"wrote {out / 'fit.json'}")
    print("calibrated 3-dof NEES: median 2.37, 95 % below 7.81. 'calibration/*' rows are the set the "
          "constants were fitted on; every other row is out of sample.")
    for k, v in skipped.items():
        print(f"skipped {k}: {v}")
    js = {"command": ["bench/bench_covariance.py", *(sys.argv[1:] if argv is None else list(argv))],
          "estimator_options": cfg.estimator_options, "rows": [{k: v for k, v in r.items() if k != "summary"}
                                                                for r in rows],
          "skipped": skipped}
    path = out / "bench_covariance.json"
    path.write_text(json.dumps(js, indent=1, default=float).replace("NaN", "null"))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
