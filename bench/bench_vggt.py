#!/usr/bin/env python
"""Reloc-VGGT benchmark: latency and memory per backend and mask, and Sim(3) vs motion averaging.

Two parts (``--part latency|fusion|all``):

latency
    One localization = the network forward for one query and K keyframes (``cached``:
    with a warm keyframe cache, i.e. only the query runs) + decoding + the Sim(3)
    fusion. Printed per config, backend (torch, onnxruntime), mask (dense, star, cached)
    and K: median and min wall time over ``--reps`` runs after one warm-up (the min is
    the better estimate on a shared machine). Each line runs in a fresh process, so its
    peak memory is its own: the peak RSS (Linux VmHWM, reset once the model and graphs
    are loaded) over the warm-up and timed localizations, total (weights, runtime,
    keyframe cache, activations) and above the loaded level ("inference"; for ``cached``
    it includes the cold first call that encodes the K keyframes and the cache); on CUDA
    also ``torch.cuda.max_memory_allocated`` during the timed runs. Random weights (timing
    does not depend on them).

fusion
    Sim(3) alignment vs motion averaging (robust and Reloc3r's) of the same simulated
    VGGT predictions, on the keyframe/query geometries of
    ``../shared/fixtures/reloc3r_motion_averaging_io.npz`` (n = 2, 5, 10 keyframes). Each
    frame's predicted camera (in the reference keyframe's frame, VGGT scale) gets
    rotation noise (per-axis sigma) and centre noise (sigma as a fraction of the mean
    keyframe distance); optionally a fraction of frames are outliers (30 deg, 0.5).
    Prints the median position / rotation error and the rate of < 0.25 m.

Examples::

    .venv/bin/python bench/bench_vggt.py --part latency --configs compact small
    .venv/bin/python bench/bench_vggt.py --part fusion --trials 500
    .venv/bin/python bench/bench_vggt.py --device cuda --precision bf16 --configs full --backends torch
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# name -> (VGGT config, default image (H, W))
CONFIGS = {
    # the fixture's compact sizes (embed 64, 2 block pairs)
    "compact": ({"aggregator": {"img_size": 518, "patch_size": 14, "embed_dim": 64, "depth": 2, "num_heads": 2,
                                "patch_embed": "dinov2_vits14_reg", "num_register_tokens": 4},
                 "camera_head": {"dim_in": 128, "trunk_depth": 1, "num_heads": 2},
                 "patch_embed_dinov2": {"embed_dim": 64, "depth": 2, "num_heads": 2, "mlp_ratio": 4,
                                        "num_register_tokens": 4}}, (140, 196)),
    # ViT-S sizes everywhere (DINOv2-S/14 + 12 block pairs of width 384, 6 heads)
    "small": ({"embed_dim": 384, "depth": 12, "num_heads": 6, "dino_embed_dim": 384, "dino_depth": 12,
               "dino_num_heads": 6, "head_trunk_depth": 2, "head_num_heads": 6}, (168, 224)),
    # the published VGGT-1B
    "full": ({}, (392, 518)),
}


def _random_poses(K: int, rng) -> np.ndarray:
    """K random camera-to-world poses [K, 4, 4]: uniform rotations, N(0, 1) m centres."""
    T = np.tile(np.eye(4), (K, 1, 1))
    try:
        from scipy.spatial.transform import Rotation

        T[:, :3, :3] = Rotation.random(K, random_state=rng.integers(1 << 31)).as_matrix()
    except ImportError:  # bench/gpu_check.py runs where scipy may be missing: QR of a Gaussian
        q, r = np.linalg.qr(rng.normal(size=(K, 3, 3)))
        q = q * np.sign(np.diagonal(r, axis1=1, axis2=2))[:, None, :]
        q[np.linalg.det(q) < 0, :, 0] *= -1
        T[:, :3, :3] = q
    T[:, :3, 3] = rng.normal(size=(K, 3))
    return T


def localization_inputs(K: int, hw, device="cpu", dtype=None, key_prefix=("bench",)) -> dict:
    """Seeded inputs of one localization with K keyframes (the same for a given K).

    hw: image (H, W), multiples of 14. device / dtype: where the images are put (e.g. on
    the GPU in the run dtype, so that a timed call moves nothing; None keeps float32).
    Returns {'q': [1,3,H,W], 'kf': [1,K,3,H,W] in [0, 1], 'T_world_kf': [K,4,4] float64
    camera-to-world, 'enc': [1,K,9] float32 pose-tokenizer input (CPU), 'keys': K
    keyframe cache keys, 'hw': (H, W)}.
    """
    import torch

    from reloc_ros.models.reloc_vggt import encode_known_poses

    hw = tuple(hw)
    g = torch.Generator().manual_seed(K)
    q = torch.rand(1, 3, *hw, generator=g)
    kf = torch.rand(1, K, 3, *hw, generator=g)
    q, kf = q.to(device, dtype or torch.float32), kf.to(device, dtype or torch.float32)
    T_world_kf = _random_poses(K, np.random.default_rng(K))
    enc = torch.from_numpy(encode_known_poses(T_world_kf, None, hw)[0])[None].float()
    keys = [(*key_prefix, i) for i in range(K)]
    return {"q": q, "kf": kf, "T_world_kf": T_world_kf, "enc": enc, "keys": keys, "hw": hw}


def localize_once(runner, inputs: dict):
    """One localization: network (``runner.predict``, pose encodings [1, K+1, 9] on the
    CPU) then decoding + Sim(3). Returns (pose encodings, network seconds, total seconds)."""
    from reloc_ros.models.reloc_vggt import predicted_T_ref_cam, sim3_localize

    t0 = time.perf_counter()
    pe = runner.predict(inputs["q"], inputs["kf"], inputs["enc"], kf_keys=inputs["keys"])
    t1 = time.perf_counter()  # predict returns CPU tensors: the device work is done here
    sim3_localize(inputs["T_world_kf"], predicted_T_ref_cam(pe[0], inputs["hw"]))
    return pe, t1 - t0, time.perf_counter() - t0


def time_localization(runner, inputs: dict, reps: int, warmup: int = 1, cuda: bool = False) -> dict:
    """Times ``reps`` localizations (:func:`localize_once`) after ``warmup`` untimed ones
    (for ``cached`` the first fills the keyframe cache: its time is 'first_ms').

    Returns median/min ms of the whole localization and of the network alone
    ('net_median_ms', 'net_min_ms'), 'first_ms', and on CUDA 'gpu_peak_warmup_mb'
    (torch.cuda.max_memory_allocated up to the end of the warm-up, since the caller's
    last reset), 'gpu_base_mb' (allocated after the warm-up) and 'gpu_peak_mb' (peak
    of the timed calls, absolute).
    """
    import torch

    first = None
    for _ in range(max(int(warmup), 1)):
        _, _, dt = localize_once(runner, inputs)
        first = dt if first is None else first
    row = {"first_ms": 1e3 * first}
    if cuda:
        torch.cuda.synchronize()
        row["gpu_peak_warmup_mb"] = torch.cuda.max_memory_allocated() / 2**20
        torch.cuda.reset_peak_memory_stats()
        row["gpu_base_mb"] = torch.cuda.memory_allocated() / 2**20
    times, net = [], []
    for _ in range(reps):
        _, tn, tt = localize_once(runner, inputs)
        if cuda:
            torch.cuda.synchronize()
        net.append(tn)
        times.append(tt)
    row.update({"median_ms": 1e3 * statistics.median(times), "min_ms": 1e3 * min(times),
                "net_median_ms": 1e3 * statistics.median(net), "net_min_ms": 1e3 * min(net)})
    if cuda:
        row["gpu_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return row


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter (VmHWM) of this process (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def measure_one(args, cname: str, backend: str, mask: str, K: int) -> dict:
    """Time one (config, backend, mask, K) in this process; returns a result row."""
    import resource

    import psutil
    import torch

    from reloc_ros.backends.vggt_runner import RelocVGGTRunner
    from reloc_ros.models.reloc_vggt import build_reloc_vggt

    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = args.device.startswith("cuda")
    cfg, hw = CONFIGS[cname]
    if args.hw:
        hw = tuple(args.hw)
    torch.manual_seed(0)  # same random weights in every process: exported graphs are reused
    net = build_reloc_vggt(cfg)
    precision = args.precision if backend == "torch" else ("fp16" if cuda and args.precision != "fp32" else "fp32")
    artifacts = Path(args.artifacts) / cname
    runner = RelocVGGTRunner(net, backend, precision, args.device, mask, artifacts_dir=artifacts,
                             threads=args.threads, max_keyframes=max(args.ks), cache_capacity=max(args.ks) + 1)
    inputs = localization_inputs(K, hw, key_prefix=("bench", cname))

    if backend != "torch":
        runner._session("keyframe" if mask == "cached" else mask, hw)  # export/load before measuring memory
        if mask == "cached":
            runner._session("query", hw)
    rss_ready = psutil.Process().memory_info().rss
    exact_peak = _reset_peak_rss()  # from here on, VmHWM is the peak of the localizations only
    # one warm-up (fills the keyframe cache for cached, first-run allocations), then the timed runs
    t = time_localization(runner, inputs, args.reps, warmup=1, cuda=cuda)
    peak_rss = _peak_rss() if exact_peak else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    row = {"config": cname, "backend": backend, "mask": mask, "K": K, "hw": list(hw), "precision": precision,
           "device": args.device, "median_ms": t["median_ms"], "min_ms": t["min_ms"],
           "first_ms": t["first_ms"], "reps": args.reps, "threads": args.threads,
           "peak_rss_mb": peak_rss / 2**20, "inference_rss_mb": max(peak_rss - rss_ready, 0) / 2**20}
    if cuda:
        row["gpu_peak_mb"] = t["gpu_peak_mb"] - t["gpu_base_mb"]
    return row


def bench_latency(args) -> list:
    """Every (config, backend, mask, K) in a fresh process, so that its peak memory is its own."""
    import subprocess

    rows = []
    args.artifacts = args.artifacts or tempfile.mkdtemp(prefix="bench_vggt_")
    for cname in args.configs:
        print(f"\n== config {cname}: images {(tuple(args.hw) if args.hw else CONFIGS[cname][1])}, "
              f"{args.reps} timed runs after one warm-up, threads {args.threads or 'default'}", flush=True)
        for backend in args.backends:
            for mask in args.masks:
                for K in args.ks:
                    if K > args.max_k.get(mask, 10**9):
                        continue
                    cmd = [sys.executable, __file__, "--one", cname, backend, mask, str(K), "--reps", str(args.reps),
                           "--device", args.device, "--precision", args.precision, "--threads", str(args.threads),
                           "--artifacts", args.artifacts, "--ks", *map(str, args.ks)]
                    if args.hw:
                        cmd += ["--hw", *map(str, args.hw)]
                    p = subprocess.run(cmd, capture_output=True, text=True)
                    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
                    if p.returncode or not lines:
                        err = (p.stderr.strip().splitlines() or ["?"])[-1]
                        print(f"{backend:12s} {mask:7s} K={K:3d} FAILED: {err}", flush=True)
                        continue
                    row = json.loads(lines[-1])
                    rows.append(row)
                    mem = (f"GPU +{row['gpu_peak_mb']:8.1f} MB" if "gpu_peak_mb" in row else
                           f"RSS peak {row['peak_rss_mb']:7.0f} MB (+{row['inference_rss_mb']:6.1f} MB inference)")
                    print(f"{backend:12s} {mask:7s} K={K:3d}  median {row['median_ms']:9.1f} ms  "
                          f"min {row['min_ms']:9.1f} ms  (first {row['first_ms']:8.1f} ms)  {mem}", flush=True)
    _ratios(rows)
    return rows


def _ratios(rows: list) -> None:
    print("\nlatency ratios of the min times (K=max / K=1; K=20 / K=10: 2 if linear, 4 if quadratic):")
    keys = sorted({(r["config"], r["backend"], r["mask"]) for r in rows})
    for k in keys:
        by_k = {r["K"]: r["min_ms"] for r in rows if (r["config"], r["backend"], r["mask"]) == k}
        if 1 in by_k and len(by_k) > 1:
            kmax = max(by_k)
            extra = f"   K20/K10 {by_k[20] / by_k[10]:.2f}" if 20 in by_k and 10 in by_k else ""
            print(f"  {k[0]:8s} {k[1]:12s} {k[2]:7s} K={kmax}/K=1: {by_k[kmax] / by_k[1]:6.2f}{extra}")


def bench_fusion(args) -> list:
    from scipy.spatial.transform import Rotation

    from reloc_ros.averaging import reloc3r_motion_averaging, robust_motion_averaging
    from reloc_ros.geometry import invert, pose_errors
    from reloc_ros.models.reloc_vggt import relative_pairs, sim3_localize

    path = Path(args.shared) / "fixtures" / "reloc3r_motion_averaging_io.npz"
    if not path.is_file():
        print(f"fusion comparison skipped: {path} not found (pass --shared)")
        return []
    fx = np.load(path, allow_pickle=False)
    rng = np.random.default_rng(args.seed)
    rows = []
    print(f"\nSim(3) vs motion averaging, {args.trials} trials per line "
          f"(median centre error m / rotation error deg / rate < 0.25 m)")
    for sr, st, pout in [(1.0, 0.02, 0.0), (3.0, 0.05, 0.0), (3.0, 0.05, 0.2)]:
        for n in (2, 5, 10):
            db, qg = fx[f"n{n}_poses_db"], fx[f"n{n}_q_gt"]
            T_ref = invert(db[0]) @ np.concatenate([db, qg[None]])
            dbar = float(np.mean(np.linalg.norm(T_ref[1:, :3, 3], axis=1)))
            errs = {"sim3": [], "robust_ma": [], "reloc3r_ma": []}
            for _ in range(args.trials):
                P = T_ref.copy()
                P[:, :3, 3] /= dbar  # VGGT-like normalised scale
                for i in range(1, n + 1):  # frame 0 is the reference: VGGT predicts it exactly
                    out = rng.random() < pout
                    s_r, s_t = (30.0, 0.5) if out else (sr, st)
                    P[i, :3, :3] = Rotation.from_rotvec(np.radians(s_r) * rng.standard_normal(3)).as_matrix() @ P[i, :3, :3]
                    P[i, :3, 3] += s_t * rng.standard_normal(3)
                errs["sim3"].append(pose_errors(sim3_localize(db, P).T_world_cam, qg))
                rel = relative_pairs(P)
                errs["robust_ma"].append(pose_errors(robust_motion_averaging(db, rel).T_world_cam, qg))
                errs["reloc3r_ma"].append(pose_errors(reloc3r_motion_averaging(db, rel), qg))
            line = f"n={n:2d} rot {sr:.0f} deg, centre {st:.2f}, outliers {pout:.1f} ({dbar:.2f} m mean dist):"
            for k, v in errs.items():
                e = np.array(v)
                row = {"n": n, "rot_sigma_deg": sr, "centre_sigma": st, "outlier_rate": pout, "method": k,
                       "median_m": float(np.median(e[:, 0])), "median_deg": float(np.median(e[:, 1])),
                       "rate_025m": float(np.mean(e[:, 0] < 0.25))}
                rows.append(row)
                line += f"  {k} {row['median_m']:.3f} m {row['median_deg']:.2f} deg {row['rate_025m']:.2f}"
            print(line, flush=True)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=["latency", "fusion", "all"], default="all")
    ap.add_argument("--configs", nargs="+", choices=sorted(CONFIGS), default=["compact", "small"])
    ap.add_argument("--backends", nargs="+", choices=["torch", "onnxruntime", "tensorrt"], default=["torch", "onnxruntime"])
    ap.add_argument("--masks", nargs="+", choices=["dense", "star", "cached"], default=["dense", "star", "cached"])
    ap.add_argument("--ks", nargs="+", type=int, default=[1, 2, 5, 10, 20])
    ap.add_argument("--max-k", nargs="*", default=[], metavar="MASK=K",
                    help="skip larger K for a mask, e.g. dense=10 (slow configs)")
    ap.add_argument("--hw", nargs=2, type=int, metavar=("H", "W"), help="image size (multiples of 14)")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", choices=["fp32", "fp16", "bf16"], default="fp32")
    ap.add_argument("--threads", type=int, default=0, help="torch / ONNX Runtime threads (0 = default)")
    ap.add_argument("--artifacts", help="folder for ONNX graphs / engines (default: a temp dir)")
    ap.add_argument("--trials", type=int, default=300)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--shared", default=str(ROOT.parent / "shared"))
    ap.add_argument("--json", help="write all rows to this JSON file")
    ap.add_argument("--one", nargs=4, metavar=("CONFIG", "BACKEND", "MASK", "K"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.max_k = {kv.split("=")[0]: int(kv.split("=")[1]) for kv in args.max_k}
    if args.one:  # child process of bench_latency
        c, b, m, k = args.one
        print(json.dumps(measure_one(args, c, b, m, int(k))))
        return 0
    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}; device {args.device}, "
          f"precision {args.precision}")
    out = {}
    if args.part in ("latency", "all"):
        out["latency"] = bench_latency(args)
    if args.part in ("fusion", "all"):
        out["fusion"] = bench_fusion(args)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
