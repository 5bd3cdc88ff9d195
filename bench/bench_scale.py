"""Retrieval at scale: approximate FAISS indexes against exact search, 10^2..10^5 keyframes.

    .venv/bin/python bench/bench_scale.py [--shared ../shared] [--out out/bench_scale]
        [--sizes 100,1000,10000,100000] [--kinds flat,hnsw,ivfpq] [--repeat 4]
        [--simd-size 10000] [--threads 1]

Descriptors are real: VLAD (reloc_ros.retrieval.VladDescriptor, vocabulary trained on the
map frames as ``build_map`` does) of real SIFT features (reloc_ros.features.SiftExtractor,
map frames at the build's scale, queries at the localizer's ``query_image_scale``) of the
shared 7-Scenes (500), KITTI (51) and Strecha (25) frames. Held out as queries: 7-Scenes
frames 2::10, KITTI 1::5, Strecha 0::5 (65 frames); the other 511 are the base frames.

A map of N keyframes: the first min(N, 511) keyframes are the base frames themselves; the
rest are synthetic keyframes, each built from the real local features of one base frame
and of its successor in the same sequence (an intermediate viewpoint):
- a partial view: the features of the base frame inside a random image window covering
  45-100 % of its width and height (a closer or shifted camera sees part of the scene);
- mixed with the features of the successor frame inside its own random window, in a
  random proportion of 0-60 % of the base frame's count (a viewpoint between the two);
- then the VLAD of that feature set exactly as ``VladDescriptor.describe`` computes it
  (assignment to the same vocabulary; checked equal to ``describe`` on a sample).
So every synthetic descriptor is the VLAD of real SIFT descriptors of real images; a
10^5 map holds ~195 such views per base frame, denser than a real map, which likely makes the
exact top-10 harder (not easier) for an approximate index to reproduce.

Measured per size and index kind (``RetrievalConfig.index`` forced to the kind; 'flat' is
the exact reference): recall@10 against exact flat search (mean over queries of
|approx top-10 ∩ exact top-10| / 10), search latency p50/p99 of one query (``search``
as the localizer calls it, repeated ``--repeat`` times), index memory (bytes of the
serialised index, which is what stays resident), build time; and the spatial prior:
``Localizer.keyframes_near``'s k-d tree query (cKDTree over keyframe centres, at most
``prior_max_candidates``) p50/p99 at each size, on synthetic centres spread as a real
map grows (new keyframes occupy new space at the real maps' keyframe density).
Also (``--simd-size``): flat/HNSW/IVF-PQ search latency at every SIMD level the FAISS
library dispatches to on this CPU (``faiss.SIMDConfig``). Latencies are wall-clock on a
shared 2-core machine with one FAISS/BLAS thread: compare within one run. Peak RSS is
~6.6 GB at 10^5 (the 3.3 GB descriptors, the 3.3 GB exact reference index).
Writes ``<out>/bench_scale.json`` and ``<out>/bench_scale.png``.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np

from reloc_ros.datasets import open_dataset
from reloc_ros.features import FeatureConfig, Features, SiftExtractor, root_sift
from reloc_ros.retrieval import RetrievalConfig, RetrievalIndex, VladDescriptor, faiss_simd_level, index_kind_for

ROOT = Path(__file__).resolve().parents[1]
QUERY_SCALE = 1.0  # LocalizerConfig.query_image_scale
K = 10


# -- real features ---------------------------------------------------------------------
def _sources(shared: Path):
    d = shared / "data"
    # (format, folder, query frame slice): the rest of each folder are base frames
    return [("7scenes", d / "7scenes_redkitchen_0000_0499", slice(2, None, 10)),
            ("kitti", d / "kitti_odometry_06_0000_0050", slice(1, None, 5)),
            ("strecha", d / "strecha_herzjesus_p25_half", slice(0, None, 5))]


def real_features(shared: Path, cache: Path) -> Dict[str, np.ndarray]:
    """SIFT of every shared frame, cached (pickle-free npz). Arrays: kp [M,2], desc [M,128]
    uint8, off [F+1], size [F,2] (w,h of the extraction's pixel frame), seq [F], order [F]
    (index within its sequence), query [F] bool."""
    if cache.is_file():
        return dict(np.load(cache, allow_pickle=False))
    map_ex = SiftExtractor(FeatureConfig())
    q_ex = SiftExtractor(FeatureConfig(image_scale=QUERY_SCALE))
    kps, descs, sizes, seqs, orders, isq = [], [], [], [], [], []
    t0 = time.perf_counter()
    for s, (fmt, src, qsel) in enumerate(_sources(shared)):
        if not src.exists():
            raise FileNotFoundError(f"shared data {src} is absent")
        ds = open_dataset(fmt, src, use_depth=False)
        qids = set(range(len(ds))[qsel])
        for i in range(len(ds)):
            img = ds[i].image
            f = (q_ex if i in qids else map_ex)(img)
            kps.append(f.keypoints.astype(np.float32))
            descs.append(f.descriptors)
            sizes.append((img.shape[1], img.shape[0]))
            seqs.append(s)
            orders.append(i)
            isq.append(i in qids)
        print(f"  features of {fmt}: {len(ds)} frames, {time.perf_counter() - t0:.0f} s", flush=True)
    out = {"kp": np.concatenate(kps), "desc": np.concatenate(descs),
           "off": np.concatenate([[0], np.cumsum([len(k) for k in kps])]).astype(np.int64),
           "size": np.array(sizes, np.int32), "seq": np.array(seqs, np.int32),
           "order": np.array(orders, np.int32), "query": np.array(isq, bool)}
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.savez(cache, **out)
    return out


def _frame(F, i) -> Tuple[np.ndarray, np.ndarray]:
    a, b = F["off"][i], F["off"][i + 1]
    return F["kp"][a:b], F["desc"][a:b]


def _window(rng, kp: np.ndarray, size: np.ndarray, lo: float) -> np.ndarray:
    """Indices of keypoints inside a random window covering lo..100 % of each side."""
    w, h = size
    fw, fh = rng.uniform(lo, 1.0, 2)
    x0, y0 = rng.uniform(0, 1 - fw) * w, rng.uniform(0, 1 - fh) * h
    inside = (kp[:, 0] >= x0) & (kp[:, 0] < x0 + fw * w) & (kp[:, 1] >= y0) & (kp[:, 1] < y0 + fh * h)
    return np.flatnonzero(inside)


def _finish_vlad(acc: np.ndarray) -> np.ndarray:
    """acc [m, k, 128] residual sums -> [m, k*128] VLAD as VladDescriptor.describe ends."""
    acc = acc / np.maximum(np.linalg.norm(acc, axis=2, keepdims=True), 1e-12)
    v = acc.reshape(len(acc), -1)
    v = np.sign(v) * np.sqrt(np.abs(v))
    n = np.linalg.norm(v, axis=1, keepdims=True)
    return (v / np.where(n > 0, n, 1.0)).astype(np.float32)


def synthetic_map(F, vlad: VladDescriptor, base: np.ndarray, n_total: int, seed: int = 0,
                  check: int = 5) -> np.ndarray:
    """[n_total, D] float32 map descriptors: the base frames' VLAD, then synthetic views
    (module docstring) interleaved over the base frames so that every prefix spreads over
    all of them. ``check`` synthetic views are recomputed with ``vlad.describe``."""
    rng = np.random.default_rng(seed)
    nb = len(base)
    per = int(np.ceil(max(n_total - nb, 0) / nb))
    cent = vlad.centroids
    k = len(cent)
    out = np.empty((n_total, cent.size), np.float32)
    for j, i in enumerate(base[:n_total]):
        out[j] = vlad.describe(Features(*_frame(F, i)))
    if per == 0:
        return out
    # successor of each base frame within its sequence (predecessor for the last one)
    succ = {}
    for j, i in enumerate(base):
        same = base[F["seq"][base] == F["seq"][i]]
        later = same[F["order"][same] > F["order"][i]]
        succ[i] = later[np.argmin(F["order"][later])] if len(later) else same[np.argsort(F["order"][same])[-2]]
    checks = []
    for j, i in enumerate(base):
        s = succ[i]
        kp_b, d_b = _frame(F, i)
        kp_s, d_s = _frame(F, s)
        x = root_sift(np.concatenate([d_b, d_s]))
        _, a = vlad._index.search(np.ascontiguousarray(x), 1)
        a = a[:, 0]
        # features sorted by visual word: each word's residual sum is one GEMM on a slice
        order = np.argsort(a, kind="stable")
        rank = np.empty_like(order)
        rank[order] = np.arange(len(order))
        resid = (x - cent[a])[order]
        bounds = np.searchsorted(a[order], np.arange(k + 1))
        W = np.zeros((per, len(x)), np.float32)
        for v in range(per):
            sb = _window(rng, kp_b, F["size"][i], 0.45)
            ws = _window(rng, kp_s, F["size"][s], 0.45)
            n_s = min(len(ws), int(rng.uniform(0.0, 0.6) * len(sb)))
            sel = np.concatenate([sb, len(kp_b) + rng.choice(ws, n_s, replace=False)])
            W[v, rank[sel]] = 1.0
            if len(checks) < check and v == 0:
                kp_all, d_all = np.concatenate([kp_b, kp_s]), np.concatenate([d_b, d_s])
                checks.append((j, v, vlad.describe(Features(kp_all[sel], d_all[sel]))))
        acc = np.zeros((per, k, x.shape[1]), np.float32)
        for w in range(k):
            lo, hi = bounds[w], bounds[w + 1]
            if hi > lo:
                acc[:, w] = W[:, lo:hi] @ resid[lo:hi]
        desc = _finish_vlad(acc)
        for v in range(per):
            pos = nb + v * nb + j
            if pos < n_total:
                out[pos] = desc[v]
        for cj, cv, ref in checks:
            if cj == j:
                err = float(np.abs(desc[cv] - ref).max())
                if err > 1e-4:
                    raise AssertionError(f"batched VLAD differs from VladDescriptor.describe by {err}")
    return out


# -- measurements ----------------------------------------------------------------------
def _recall(approx: List[np.ndarray], exact: np.ndarray) -> float:
    return float(np.mean([len(set(a[:K].tolist()) & set(e[:K].tolist())) / K for a, e in zip(approx, exact)]))


def _timed_search(index: RetrievalIndex, Q: np.ndarray, repeat: int) -> Tuple[List[np.ndarray], np.ndarray]:
    ids, times = [], []
    for r in range(repeat):
        for q in Q:
            t = time.perf_counter()
            i, _ = index.search(q, K)
            times.append(time.perf_counter() - t)
            if r == 0:
                ids.append(i)
    return ids, np.array(times) * 1e3


def _index_bytes(index: RetrievalIndex) -> int:
    import faiss

    if not index.approximate:  # serialising a 3.3 GB flat index would copy it once more
        return int(index.index.ntotal) * int(index.index.d) * 4
    cpu = faiss.index_gpu_to_cpu(index.index) if "Gpu" in type(index.index).__name__ else index.index
    return int(faiss.serialize_index(cpu).size)


def _centres(F, base: np.ndarray, n: int, seed: int = 0) -> np.ndarray:
    """[n, 4, 4] keyframe poses for the spatial-prior timing: the 7-Scenes base trajectory
    (its real poses) tiled on a 3 m grid, so the map grows in area at a real density."""
    T = _SEVEN_POSES
    tiles = int(np.ceil(n / len(T)))
    side = int(np.ceil(np.sqrt(tiles)))
    out = np.repeat(T[None], tiles, axis=0).reshape(-1, 4, 4)[:n].copy()
    t = np.arange(n) // len(T)
    out[:, 0, 3] += 3.0 * (t % side)
    out[:, 1, 3] += 3.0 * (t // side)
    return out


_SEVEN_POSES = None


def _prior_timing(T_all: np.ndarray, G: np.ndarray, Q: np.ndarray, repeat: int, seed: int = 0) -> np.ndarray:
    """keyframes_near (the real method, on a stand-in holding the map's arrays) ms per call."""
    from types import SimpleNamespace

    from scipy.spatial import cKDTree

    from reloc_ros.localizer import Localizer, LocalizerConfig, PosePrior

    stand_in = SimpleNamespace(config=LocalizerConfig(), _centres=cKDTree(T_all[:, :3, 3]),
                               kmap=SimpleNamespace(num_keyframes=len(T_all), T_world_cam=T_all,
                                                    global_descriptors=G))
    rng = np.random.default_rng(seed)
    cov = np.diag([0.1 ** 2] * 3 + [np.radians(5) ** 2] * 3)
    times, found = [], []
    for _ in range(repeat):
        for q in Q:
            T = T_all[rng.integers(len(T_all))].copy()
            T[:3, 3] += rng.normal(0, 0.1, 3)
            t = time.perf_counter()
            ids = Localizer.keyframes_near(stand_in, PosePrior(T, cov), q)
            times.append(time.perf_counter() - t)
            found.append(len(ids))
    return np.array(times) * 1e3


def simd_levels(X: np.ndarray, Q: np.ndarray, repeat: int) -> List[dict]:
    """Search p50/p99 (ms) of flat, HNSW and IVF-PQ over X at every SIMD level the FAISS
    library can dispatch to on this CPU (``faiss.SIMDConfig.set_level``; a wheel without
    run-time dispatch has one level). The level is restored afterwards."""
    import faiss

    cfg = getattr(faiss, "SIMDConfig", None)
    if cfg is None or not hasattr(cfg, "set_level"):
        return []
    names = [n for n in dir(faiss) if n.startswith("SIMDLevel_") and n != "SIMDLevel_COUNT"]
    levels = [(n[len("SIMDLevel_"):], getattr(faiss, n)) for n in names]
    levels = [(n, v) for n, v in levels if cfg.is_simd_level_available(v)]
    current = cfg.get_level()
    indexes = {k: RetrievalIndex.build(X, RetrievalConfig(index=k)) for k in ("flat", "hnsw", "ivfpq")}
    out = []
    try:
        for _ in range(2):  # two rounds: the first level is not the only one to meet a cold cache
            for name, level in sorted(levels, key=lambda t: t[1]):
                cfg.set_level(level)
                row = {"level": name}
                for kind, index in indexes.items():
                    _, ms = _timed_search(index, Q, repeat)
                    row[f"{kind}_p50_ms"] = round(float(np.percentile(ms, 50)), 3)
                    row[f"{kind}_p99_ms"] = round(float(np.percentile(ms, 99)), 3)
                out.append(row)
                print(f"  SIMD {name:15s} " + " ".join(f"{k} {v}" for k, v in row.items() if k != "level"),
                      flush=True)
    finally:
        cfg.set_level(current)
    return out


def run(args) -> dict:
    import faiss

    from reloc_ros.threads import limit_threads

    limit_threads(args.threads)
    F = real_features(Path(args.shared), Path(args.out) / "features.npz")
    qi, base = np.flatnonzero(F["query"]), np.flatnonzero(~F["query"])
    global _SEVEN_POSES
    _SEVEN_POSES = open_dataset("7scenes", Path(args.shared) / "data" / "7scenes_redkitchen_0000_0499",
                                use_depth=False).poses[F["order"][base[F["seq"][base] == 0]]]
    vlad = VladDescriptor(RetrievalConfig())
    vlad.fit([Features(*_frame(F, i)) for i in base])
    Q = np.stack([vlad.describe(Features(*_frame(F, i))) for i in qi])
    sizes = sorted(args.sizes)
    t0 = time.perf_counter()
    X = synthetic_map(F, vlad, base, max(sizes), seed=0)
    gen_s = time.perf_counter() - t0
    print(f"{len(base)} base frames, {len(qi)} queries, D={X.shape[1]}; {len(X)} map descriptors in {gen_s:.0f} s; "
          f"FAISS SIMD: {faiss_simd_level()}; threads {args.threads}", flush=True)
    simd = simd_levels(X[:args.simd_size], Q, args.repeat) if args.simd_size else []
    rows = []
    for n in sizes:
        Xn = X[:n]
        exact = None
        for kind in args.kinds:
            cfg = RetrievalConfig(index=kind)
            try:
                t = time.perf_counter()
                index = RetrievalIndex.build(Xn, cfg)
                build_s = time.perf_counter() - t
            except ValueError as e:
                print(f"  N={n} {kind}: skipped ({e})")
                continue
            ids, ms = _timed_search(index, Q, args.repeat)
            if kind == "flat":
                exact = np.stack([np.pad(i, (0, K - len(i)), constant_values=-1) for i in ids])
            row = {"n": n, "kind": kind, "auto_kind": index_kind_for(n, RetrievalConfig()),
                   "build_s": round(build_s, 2), "index_bytes": _index_bytes(index),
                   "p50_ms": round(float(np.percentile(ms, 50)), 3), "p99_ms": round(float(np.percentile(ms, 99)), 3)}
            if index.approximate:
                index.attach_vectors(None)
                raw, _ = _timed_search(index, Q, 1)
                row["recall_at_10_index_only"] = round(_recall(raw, exact), 4)
            row["recall_at_10"] = round(_recall(ids, exact), 4) if exact is not None else None
            rows.append(row)
            print(f"  N={n:>6} {kind:5s} recall@10 {row['recall_at_10']} "
                  f"(index only {row.get('recall_at_10_index_only', '-')}) p50 {row['p50_ms']} ms "
                  f"p99 {row['p99_ms']} ms  index {row['index_bytes'] / 1e6:.2f} MB  build {build_s:.1f} s",
                  flush=True)
            del index
            gc.collect()
        T_all = _centres(F, base, n)
        ms = _prior_timing(T_all, Xn, Q, 5 * args.repeat)
        rows.append({"n": n, "kind": "spatial_prior", "p50_ms": round(float(np.percentile(ms, 50)), 3),
                     "p99_ms": round(float(np.percentile(ms, 99)), 3)})
        print(f"  N={n:>6} keyframes_near p50 {rows[-1]['p50_ms']} ms p99 {rows[-1]['p99_ms']} ms", flush=True)
    import resource

    return {"sizes": sizes, "rows": rows, "simd_levels": simd, "simd_size": args.simd_size,
            "queries": int(len(qi)), "base_frames": int(len(base)),
            "descriptor_dim": int(X.shape[1]), "generate_s": round(gen_s, 1), "faiss_simd": faiss_simd_level(),
            "faiss_version": faiss.__version__, "threads": args.threads, "repeat": args.repeat,
            "load_average": os.getloadavg(),
            "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
            "defaults": {k: v for k, v in RetrievalConfig().__dict__.items()}}


def table(res: dict) -> str:
    lines = [f"{'N':>7} {'index':14s} {'recall@10':>9} {'idx-only':>8} {'p50 ms':>8} {'p99 ms':>8} "
             f"{'index MB':>9} {'build s':>8}"]
    for r in res["rows"]:
        auto = " (auto)" if r.get("auto_kind") == r["kind"] else ""
        rec = "" if r.get("recall_at_10") is None else f"{r['recall_at_10']:.3f}"
        raw = "" if "recall_at_10_index_only" not in r else f"{r['recall_at_10_index_only']:.3f}"
        mb = "" if "index_bytes" not in r else f"{r['index_bytes'] / 1e6:.2f}"
        bs = "" if "build_s" not in r else f"{r['build_s']:.1f}"
        lines.append(f"{r['n']:>7} {r['kind'] + auto:14s} {rec:>9} {raw:>8} {r['p50_ms']:>8.3f} {r['p99_ms']:>8.3f} "
                     f"{mb:>9} {bs:>8}")
    return "\n".join(lines)


def plot(res: dict, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(13, 3.6))
    FigureCanvasAgg(fig)
    panels = [("recall_at_10", "recall@10 vs exact", False), ("p50_ms", "search p50 (ms)", True),
              ("p99_ms", "search p99 (ms)", True), ("index_bytes", "index memory (MB)", True)]
    kinds = sorted({r["kind"] for r in res["rows"]})
    for j, (key, title, logy) in enumerate(panels):
        ax = fig.add_subplot(1, 4, j + 1)
        for kind in kinds:
            pts = [(r["n"], r[key]) for r in res["rows"] if r["kind"] == kind and r.get(key) is not None]
            if not pts:
                continue
            xs, ys = zip(*pts)
            ys = [y / 1e6 for y in ys] if key == "index_bytes" else ys
            ax.plot(xs, ys, "o-", label="keyframes_near (k-d tree)" if kind == "spatial_prior" else kind)
        ax.set_xscale("log")
        if logy:
            ax.set_yscale("log")
        if key == "recall_at_10":
            ax.axhline(0.95, color="grey", ls="--", lw=0.8)
        ax.set_xlabel("keyframes")
        ax.set_title(title, fontsize=9)
        if j == 1:  # the latency panel has every curve
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shared", default=str(ROOT.parent / "shared"))
    ap.add_argument("--out", default=str(ROOT / "out" / "bench_scale"))
    ap.add_argument("--sizes", type=lambda s: [int(float(v)) for v in s.split(",")],
                    default=[100, 1000, 10_000, 100_000])
    ap.add_argument("--kinds", type=lambda s: s.split(","), default=["flat", "hnsw", "ivfpq"])
    ap.add_argument("--repeat", type=int, default=4, help="passes over the queries for the latencies")
    ap.add_argument("--simd-size", type=int, default=10_000,
                    help="keyframes for the SIMD-level comparison (0: skip it)")
    ap.add_argument("--threads", type=int, default=1, help="FAISS/BLAS threads (1: a query runs on one core)")
    args = ap.parse_args(argv)
    if "flat" not in args.kinds:
        args.kinds = ["flat"] + args.kinds  # the exact reference
    if not (Path(args.shared) / "data").is_dir():
        print(f"bench_scale: shared data not found under {args.shared}; nothing to measure", file=sys.stderr)
        return 2
    res = run(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_scale.json").write_text(json.dumps(res, indent=1, default=float))
    plot(res, out / "bench_scale.png")
    print(table(res))
    for r in res["simd_levels"]:
        print(f"SIMD level {r['level']:15s} (N={res['simd_size']}): " + ", ".join(
            f"{k} {r[k + '_p50_ms']:.3f}/{r[k + '_p99_ms']:.3f} ms p50/p99" for k in ("flat", "hnsw", "ivfpq")))
    print(f"peak RSS {res['peak_rss_gb']} GB; load average {res['load_average']}; wrote {out / 'bench_scale.json'}, "
          f"{out / 'bench_scale.png'}")
    return 0


if __name__ == "__main__":
    if "--extract-only" in sys.argv:
        real_features(Path(sys.argv[2]), Path(sys.argv[3]))
        sys.exit(0)
    sys.exit(main())
