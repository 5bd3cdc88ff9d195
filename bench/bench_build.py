"""Map-building throughput: fresh `reloc-map build` processes, interleaved (prints; asserts nothing).

    .venv/bin/python bench/bench_build.py [--shared ../shared] [--reps 3] [--out out/bench_build]
        [--baseline DIR] [--splits 7s-depth,kitti] [--thread-scaling] [--neighbours] [--memory]

Per split and repetition, in one interleaved series (so that a shared machine's load
hits every variant alike): ``--workers 1`` (the sequential build, in-process) and
``--workers 0`` (every core, the default), both of this tree, and, with ``--baseline DIR``
(a checkout of an earlier commit, e.g. ``git worktree add /tmp/base <rev>``), that tree's
sequential build (a commit older than ``--workers`` builds sequentially anyway). Printed:
median wall time of the whole process (imports included), the build's own stage times
(manifest ``build_seconds``), and the throughput ratio of each variant to the first one.
The maps of every variant are compared point for point (3D points are the end product
of the build; the keypoints and descriptors follow from the same extraction code); a
baseline map in an older format is reported as not compared.

``--neighbours`` prints the time to choose one keyframe's triangulation neighbours in maps
of 10^3-10^5 keyframes (synthetic poses on a 1 km square), with the k-d tree the build
uses and by a scan of every keyframe.

``--memory`` builds 7-Scenes maps of 125, 250 and 500 keyframes (frames 0:500:4, :2, :1,
``--workers 1``) and prints each build's peak anonymous and file-backed resident memory
(polled from /proc/self/status every 50 ms): the anonymous part is what a build cannot
give back; file-backed pages (the spilled local data, libraries) the kernel can reclaim.

``--thread-scaling`` also prints what a second thread gives the two kernels that dominate
a build, SIFT extraction and the pair-similarity GEMM, in this process: how much of the
sequential build already runs on both cores.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import List, Tuple

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SPLITS = {  # name: (reader format, dataset folder, frames)
    "7s-depth": ("7scenes", "7scenes_redkitchen_0000_0499", "0:250:5"),
    "kitti": ("kitti", "kitti_odometry_06_0000_0050", "0:51:2"),
    "strecha": ("strecha", "strecha_herzjesus_p25_half", "0:25:1"),
}


def build_once(tree: Path, split: str, data: Path, out: Path, workers: int) -> dict:
    """One `reloc-map build` in a fresh process importing ``tree``'s reloc_ros."""
    fmt, folder, frames = SPLITS[split]
    env = dict(os.environ, PYTHONPATH=str(tree))
    cmd = [sys.executable, "-m", "reloc_ros.cli.map_cli", "build", "--format", fmt, str(data / folder),
           "--frames", frames, "-o", str(out), "--overwrite"]
    if "--workers" in (tree / "reloc_ros" / "cli" / "map_cli.py").read_text():
        cmd += ["--workers", str(workers)]
    elif workers != 1:
        raise ValueError(f"{tree} predates --workers: it builds sequentially only")
    t = time.perf_counter()
    # cwd=tree: `python -m` puts the working directory first on sys.path, ahead of an
    # editable install of another tree
    res = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if res.returncode != 0:
        raise RuntimeError(f"build failed ({' '.join(cmd)}):\n{res.stderr[-2000:]}")
    stages = json.loads((out / "manifest.json").read_text())["build_seconds"]
    return {"wall": wall, **stages}


def point_difference(a: Path, b: Path) -> str:
    """Max |dP| (m) over the points both maps have, and whether the same keypoints have one."""
    from reloc_ros.map_store import MapError
    from reloc_ros.maps import KeyframeMap

    try:
        ma, mb = KeyframeMap.load(a), KeyframeMap.load(b)
    except MapError as e:  # a baseline from before the current map format
        return f"not compared ({e})"
    if ma.names != mb.names:
        return "different keyframes"
    dmax, same = 0.0, True
    for k in range(ma.num_keyframes):
        pa, pb = ma.points3d(k), mb.points3d(k)
        fa, fb = np.isfinite(pa[:, 0]), np.isfinite(pb[:, 0])
        same &= bool(np.array_equal(fa, fb))
        both = fa & fb
        if both.any():
            dmax = max(dmax, float(np.abs(pa[both] - pb[both]).max()))
    return f"{'same' if same else 'DIFFERENT'} point sets, max |dP| {dmax:.2g} m"


def thread_scaling(data: Path) -> None:
    """ms per SIFT extraction (mean over 5 frames of 7-Scenes and of KITTI) and per
    2048x2048x128 GEMM, with 1 and 2 library threads, alternating twice."""
    from reloc_ros.datasets import open_dataset
    from reloc_ros.features import SiftExtractor
    from reloc_ros.threads import limit_threads

    def ms(fn, n: int) -> float:
        fn()
        t = time.perf_counter()
        for _ in range(n):
            fn()
        return (time.perf_counter() - t) / n * 1e3

    images = {}
    for name in ("7s-depth", "kitti"):
        ds = open_dataset(SPLITS[name][0], data / SPLITS[name][1], "0:50:10")
        images[name] = [ds[i].image for i in range(len(ds))]
    rng = np.random.default_rng(0)
    a, b = (rng.random((2048, 128), np.float32) for _ in range(2))
    ex = SiftExtractor()
    rows = {1: np.zeros(3), 2: np.zeros(3)}
    for threads in (1, 2, 1, 2):
        limit_threads(threads)
        rows[threads] += [ms(lambda ims=ims: [ex(im) for im in ims], 1) / len(ims) for ims in images.values()] + \
            [ms(lambda: a @ b.T, 20)]
    print("| kernel | 1 thread ms | 2 threads ms | ratio |\n|---|---|---|---|")
    for k, name in enumerate([f"SIFT, {n} frame" for n in images] + ["similarity GEMM 2048x2048x128"]):
        print(f"| {name} | {rows[1][k] / 2:.1f} | {rows[2][k] / 2:.1f} | {rows[1][k] / rows[2][k]:.2f}x |")
    # why the reverse direction of a pair is not read off the matrix column-wise
    sim = a @ b.T
    print(f"\nthe 2048x2048 similarity matrix (2 threads): transposed copy {ms(lambda: np.ascontiguousarray(sim.T), 5):.1f}"
          f" ms, column argmax {ms(lambda: sim.argmax(axis=0), 5):.1f} ms, column max {ms(lambda: sim.max(axis=0), 5):.1f}"
          f" ms, the GEMM {rows[2][2] / 2:.1f} ms")
    from reloc_ros.maps import TriangulationConfig, _select_neighbors

    for name in ("7s-depth", "kitti"):  # how many pair GEMMs a build's triangulation needs
        ds = open_dataset(SPLITS[name][0], data / SPLITS[name][1], SPLITS[name][2])
        T = np.stack([ds[i].T_world_cam for i in range(len(ds))])
        nb = {i: set(_select_neighbors(T, i, TriangulationConfig()).tolist()) for i in range(len(T))}
        directed = sum(len(v) for v in nb.values())
        both = sum(i in nb[j] for i in nb for j in nb[i])
        print(f"{name}: {directed} directed neighbour pairs, {both} with their reverse, {directed - both // 2} GEMMs "
              f"when each pair wanted both ways is matched once")
    print()


def neighbour_selection() -> None:
    from reloc_ros.maps import TriangulationConfig, _select_neighbors, neighbor_tree

    cfg = TriangulationConfig()
    rng = np.random.default_rng(0)
    print("| keyframes | k-d tree build s | per keyframe, tree ms | per keyframe, scan ms |\n|---|---|---|---|")
    for n in (1000, 10000, 100000):
        T = np.tile(np.eye(4), (n, 1, 1))
        T[:, :3, 3] = rng.random((n, 3)) * [1000, 1000, 2]
        t0 = time.perf_counter()
        tree = neighbor_tree(T, cfg)
        t1 = time.perf_counter()
        for i in range(200):
            _select_neighbors(T, i, cfg, tree)
        t2 = time.perf_counter()
        for i in range(20):
            _select_neighbors(T, i, cfg)
        t3 = time.perf_counter()
        print(f"| {n} | {t1 - t0:.2f} | {(t2 - t1) / 200 * 1e3:.2f} | {(t3 - t2) / 20 * 1e3:.2f} |")
    print()


def _poll_build(data: Path, frames: str, out: Path) -> None:
    """Run one sequential build in this process and print its peak RssAnon / RssFile (kB)."""
    import threading

    peak = {"RssAnon": 0, "RssFile": 0}

    def poll() -> None:
        while True:
            with open("/proc/self/status") as f:
                for line in f:
                    key = line.split(":")[0]
                    if key in peak:
                        peak[key] = max(peak[key], int(line.split()[1]))
            time.sleep(0.05)

    threading.Thread(target=poll, daemon=True).start()
    from reloc_ros.cli.map_cli import main as map_main

    map_main(["build", "--format", "7scenes", str(data / SPLITS["7s-depth"][1]), "--frames", frames, "-o", str(out),
              "--workers", "1", "--overwrite"])
    time.sleep(0.1)
    print(json.dumps(peak))


def memory_scaling(data: Path, out: Path, trees: List[Tuple[str, Path]]) -> None:
    print("| tree | keyframes | peak RssAnon MB | peak RssFile MB |\n|---|---|---|---|")
    for name, tree in trees:
        for frames, n in (("0:500:4", 125), ("0:500:2", 250), ("0:500:1", 500)):
            res = subprocess.run([sys.executable, __file__, "--_poll-build", frames, "--shared", str(data.parent),
                                  "--out", str(out)], capture_output=True, text=True, cwd=tree,
                                 env=dict(os.environ, PYTHONPATH=str(tree)))
            if res.returncode != 0:
                raise RuntimeError(res.stderr[-2000:])
            peak = json.loads(res.stdout.strip().splitlines()[-1])
            print(f"| {name} | {n} | {peak['RssAnon'] / 1e3:.0f} | {peak['RssFile'] / 1e3:.0f} |", flush=True)
    print()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shared", default=str(REPO.parent / "shared"))
    ap.add_argument("--splits", default="7s-depth,kitti")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--baseline", default="", help="checkout of an earlier commit: its sequential build is the reference")
    ap.add_argument("--out", default=str(REPO / "out" / "bench_build"))
    ap.add_argument("--thread-scaling", action="store_true", help="also time SIFT and the GEMM with 1 and 2 threads")
    ap.add_argument("--neighbours", action="store_true", help="also time neighbour selection in large maps")
    ap.add_argument("--memory", action="store_true", help="also measure a build's peak memory at 125-500 keyframes")
    ap.add_argument("--_poll-build", dest="poll_build", default="", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    data = Path(args.shared).resolve() / "data"
    if not data.is_dir():
        print(f"no shared data at {data}: nothing to measure", file=sys.stderr)
        return 2
    variants = [("this tree, --workers 1", REPO, 1), ("this tree, --workers 0 (all cores)", REPO, 0)]
    if args.baseline:
        variants.insert(0, (f"baseline {args.baseline}, --workers 1", Path(args.baseline).resolve(), 1))
    out = Path(args.out).resolve()  # builds run with cwd = their tree
    if args.poll_build:
        _poll_build(data, args.poll_build, out / "memory")
        return 0
    print(f"{os.cpu_count()} CPUs; load {os.getloadavg()[0]:.1f} at start")
    if args.memory:
        memory_scaling(data, out, [("this", REPO)] + ([("baseline", Path(args.baseline).resolve())]
                                                                  if args.baseline else []))
    if args.thread_scaling:
        thread_scaling(data)
    if args.neighbours:
        neighbour_selection()
    for split in (args.splits.split(",") if args.reps > 0 else []):
        runs = {v[0]: [] for v in variants}
        for rep in range(args.reps):
            for name, tree, workers in variants:
                r = build_once(tree, split, data, out / split / f"v{variants.index((name, tree, workers))}", workers)
                runs[name].append(r)
                print(f"  {split} rep {rep} {name}: {r['wall']:.2f} s (load {os.getloadavg()[0]:.1f})", flush=True)
        ref = statistics.median(r["wall"] for r in runs[variants[0][0]])
        print(f"\n{split}: median of {args.reps} (wall s, process start to exit; stages from the manifest)")
        print("| variant | wall | features | triangulation | total in build | throughput vs first |")
        print("|---|---|---|---|---|---|")
        for name, _, _ in variants:
            med = {k: statistics.median(r[k] for r in runs[name]) for k in ("wall", "features", "triangulation", "total")}
            print(f"| {name} | {med['wall']:.2f} | {med['features']:.2f} | {med['triangulation']:.2f} | "
                  f"{med['total']:.2f} | {ref / med['wall']:.2f}x |")
        for k in range(1, len(variants)):
            print(f"maps: {variants[k][0]} vs {variants[0][0]}: "
                  f"{point_difference(out / split / 'v0', out / split / f'v{k}')}")
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
