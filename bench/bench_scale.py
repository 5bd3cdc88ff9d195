"""Maps at scale, 10^2..10^5 keyframes: retrieval alone, then whole maps end to end.

    .venv/bin/python bench/bench_scale.py [--shared ../shared] [--out out/bench_scale]
        [--part all|retrieval|e2e] [--sizes 100,1000,10000,100000] [--kinds flat,hnsw,ivfpq]
        [--repeat 4] [--simd-size 10000] [--threads 1]
        [--e2e-sizes 100,1000,10000,100000] [--keep-maps] [--no-node-rss]

End to end (``--part e2e``; writes ``bench_scale_e2e.json`` / ``.png``; needs ~25 GB of
free disk at 10^5, deleted after each size unless --keep-maps). The real map: 7-Scenes
redkitchen frames 0:500:5 with depth (100 keyframes), built by ``build_map``. A map of N
keyframes tiles it (``synthesize_map``): copies of the 100 real keyframes translated on a
10 m grid, each keeping a random 60-100 % of its keypoints (with their descriptors and
3D points) and described by the VLAD of that subset in the real map's vocabulary; images
are hard links to the real ones. Queries: the 50 frames 2:500:10 (none a keyframe), the
same at every size. Per size, in a fresh process doing what the node does (import, load
the map, ``Localizer``, localize): map load time, spawn to first localization, resident
memory (/proc VmRSS, VmHWM) after two passes over the queries, retrieval p50/p99 and
recall@10 against exact search, query latency p50/p90 (both passes), and the p50 against
the 10^2 map interleaved query by query in the same process (the ratio that survives a
loaded machine). Then the real node (``python -m reloc_ros.ros.node``) is started on the
map: time to its 'loaded map' log line and its RSS. Then 50 real frames (1:500:10) are
added in place (``map_edit.add_keyframes``): seconds by stage. "Build time per keyframe"
of the tiled maps is their assembly (VLAD, store, index), not feature extraction: the
real build's cost per keyframe is the 10^2 map's and the add's.
Tiling makes 1000 near-duplicate copies of each keyframe at 10^5, so the exact top-10 is
decided by small similarity differences among copies: a harder recall test than a real
map's, and a pose may come from another copy (counted right modulo its tile offset).

Retrieval alone (``--part retrieval``): approximate FAISS indexes against exact search.

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
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

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


def _word_sorted(vlad, x: np.ndarray):
    """RootSIFT x [M, 128] sorted by visual word, so each word's residual sum over a subset
    is one GEMM on a slice: (rank [M]: position of each feature in that order, sorted
    residuals [M, 128], word bounds [k + 1])."""
    cent = vlad.centroids
    _, a = vlad._index.search(np.ascontiguousarray(x), 1)
    a = a[:, 0]
    order = np.argsort(a, kind="stable")
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    return rank, (x - cent[a])[order], np.searchsorted(a[order], np.arange(len(cent) + 1))


def _subset_vlads(W: np.ndarray, resid: np.ndarray, bounds: np.ndarray) -> np.ndarray:
    """VLADs [V, D] of V feature subsets, W [V, M] 0/1 over the word-sorted features."""
    k = len(bounds) - 1
    acc = np.zeros((len(W), k, resid.shape[1]), np.float32)
    for w in range(k):
        lo, hi = bounds[w], bounds[w + 1]
        if hi > lo:
            acc[:, w] = W[:, lo:hi] @ resid[lo:hi]
    return _finish_vlad(acc)


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
        rank, resid, bounds = _word_sorted(vlad, x)
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
        desc = _subset_vlads(W, resid, bounds)
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


# -- end to end: maps of 10^2..10^5 keyframes, loaded and queried as the node does ----------
E2E_SCENE = "7scenes_redkitchen_0000_0499"
E2E_MAP_FRAMES = "0:500:5"     # the real 10^2 map (with depth), built by build_map
E2E_QUERY_FRAMES = "2:500:10"  # 50 queries, none of them a keyframe
E2E_ADD_FRAMES = "1:500:10"    # 50 frames added to each map (reloc_ros.map_edit.add_keyframes)
TILE_SPACING_M = 10.0


def _e2e_base(shared: Path, work: Path) -> Path:
    """The real map: 7-Scenes redkitchen frames 0:500:5 with depth, built by build_map (cached)."""
    from reloc_ros.maps import KeyframeMap, MapBuildConfig, MapError, build_map

    out = work / "base_map"
    try:
        KeyframeMap.load(out)
        return out
    except MapError:
        pass
    ds = open_dataset("7scenes", shared / "data" / E2E_SCENE, frames=E2E_MAP_FRAMES)
    return build_map(ds, out, MapBuildConfig(), overwrite=True, source=f"7scenes:{E2E_SCENE} frames={E2E_MAP_FRAMES}")


def _tile_offsets(n_tiles: int) -> np.ndarray:
    """[n_tiles, 3] translations: tile 0 is the real map, the others on a square grid
    TILE_SPACING_M apart in the world x/y plane (the kitchen spans ~3 m, so copies never overlap)."""
    side = int(np.ceil(np.sqrt(n_tiles)))
    t = np.arange(n_tiles)
    return np.stack([TILE_SPACING_M * (t % side), TILE_SPACING_M * (t // side), np.zeros(n_tiles)], axis=1)


def tiled_vlads(base, n: int, seed: int = 0):
    """Global descriptors [n, D] of the tiled map of ``synthesize_map`` and the keypoint
    masks [B][tiles] of its copies (None for tile 0)."""
    B = base.num_keyframes
    tiles = int(np.ceil(n / B))
    vlad = VladDescriptor(RetrievalConfig())
    vlad.load_state(base.descriptor_state)
    cent = vlad.centroids
    G = np.empty((n, cent.size), np.float32)
    masks: List[List[np.ndarray]] = [[None] * tiles for _ in range(B)]
    for b in range(min(B, n)):
        kd = base.keyframe(b)
        G[b] = base.global_descriptors[b]
        per = len(range(b + B, n, B))  # tiles >= 1 holding a copy of b
        if per == 0:
            continue
        x = root_sift(kd.descriptors)
        rank, resid, bounds = _word_sorted(vlad, x)
        W = np.zeros((per, len(x)), np.float32)
        for v in range(per):
            rng = np.random.default_rng([seed, v + 1, b])
            keep = rng.random(len(x)) < rng.uniform(0.6, 1.0)
            masks[b][v + 1] = keep
            W[v, rank[keep]] = 1.0
        desc = _subset_vlads(W, resid, bounds)
        if b == 0:  # the batched VLAD is VladDescriptor.describe's
            ref = vlad.describe(Features(kd.keypoints[masks[0][1]], kd.descriptors[masks[0][1]]))
            if float(np.abs(desc[0] - ref).max()) > 1e-4:
                raise AssertionError("batched VLAD differs from VladDescriptor.describe")
        G[b + B: n: B] = desc
    return G, masks


def synthesize_map(base_dir: Path, n: int, out: Path, seed: int = 0) -> dict:
    """A map of n keyframes tiled from the real base map (written as build_map would, format 3).

    Keyframe k = base keyframe b = k mod B in tile t = k div B. Tile 0 is the base map
    itself. In tile t >= 1 the keyframe keeps a random subset (60-100 %, uniform) of the
    base keyframe's keypoints with their descriptors and 3D points, pose and points
    translated by the tile's offset; its global descriptor is the VLAD of that subset in
    the base map's vocabulary (what ``map_edit.add_keyframes`` would compute: distinct for
    every keyframe, so retrieval must really rank). Images are hard links to the base
    images (the same picture), counted at full size in the disk figures.
    """
    from reloc_ros.map_store import TABLE_KEYS, StoreWriter, write_manifest
    from reloc_ros.maps import PARTS, KeyframeMap, _swap_into_place

    t0 = time.perf_counter()
    base = KeyframeMap.load(base_dir)
    B = base.num_keyframes
    tiles = int(np.ceil(n / B))
    offsets = _tile_offsets(tiles)
    G, masks = tiled_vlads(base, n, seed)
    t_vlad = time.perf_counter()
    tmp = out.with_name(out.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    (tmp / "images").mkdir(parents=True)
    w = StoreWriter(tmp, G.shape[1])
    kf = base.keyframe_arrays
    rows = {key: [] for key in ("names", "T_world_cam", "K", "sizes", "source_K", "source_sizes")}
    known = {}
    for k in range(n):
        t, b = divmod(k, B)
        kd = base.keyframe(b)
        T = base.T_world_cam[b].copy()
        T[:3, 3] += offsets[t]
        if t == 0:
            w.append(kd.keypoints, kd.descriptors, kd.points3d, kd.point_source, G[k])
        else:
            m = masks[b][t]
            w.append(kd.keypoints[m], kd.descriptors[m], kd.points3d[m] + offsets[t].astype(np.float32),
                     kd.point_source[m], G[k])
        rows["names"].append(base.names[b] if t == 0 else f"tile{t:05d}/{base.names[b]}")
        rows["T_world_cam"].append(T)
        for key in ("K", "sizes", "source_K", "source_sizes"):
            rows[key].append(kf[key][b])
        os.link(base.path / "images" / f"{b:06d}.jpg", tmp / "images" / f"{k:06d}.jpg")
        known[f"images/{k:06d}.jpg"] = base.manifest["files"][f"images/{b:06d}.jpg"]
    table = w.close()
    t_write = time.perf_counter()
    cfg = RetrievalConfig(**base.manifest["build_config"]["retrieval"])
    index = RetrievalIndex.build(G, cfg)
    index.save(tmp / PARTS["index"])
    t_index = time.perf_counter()
    arrays = {key: (np.array(v, dtype=str) if key == "names" else np.stack(v)) for key, v in rows.items()}
    np.savez(tmp / PARTS["keyframes"], **arrays, **{key: table[key] for key in TABLE_KEYS})
    np.savez(tmp / PARTS["retrieval"], **base.descriptor_state)
    man = dict(base.manifest)
    man.update({"num_keyframes": n, "num_keypoints": int(table["num_keypoints"].sum()),
                "num_points3d": int(table["num_points"].sum()), "faiss_index": index.description,
                "source": f"bench_scale: {tiles} tiles of {base_dir}", "skipped_frames": []})
    write_manifest(tmp, man, known=known)
    _swap_into_place(tmp, out)
    return {"G": G, "seconds": {"vlad": t_vlad - t0, "store_images": t_write - t_vlad, "index": t_index - t_write,
                                "total": time.perf_counter() - t0}, "index": index.description, "tiles": tiles}


def _dir_bytes(p: Path) -> int:
    return sum(f.stat().st_size for f in Path(p).rglob("*") if f.is_file())


def _proc_status() -> Dict[str, int]:
    """VmRSS, VmHWM, RssAnon, RssFile of this process in bytes (Linux /proc)."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, val = line.partition(":")
        if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem"):
            out[key] = int(val.split()[0]) * 1024
    return out


def measure_child(args) -> int:
    """In a fresh process, what the node does: load the map, localize. Prints one JSON line."""
    t_spawn = float(args.spawn_time)
    import reloc_ros.localizer as L
    from reloc_ros.maps import KeyframeMap
    from reloc_ros.threads import limit_threads

    limit_threads(args.threads)
    t_import = time.time()
    ds = open_dataset("7scenes", Path(args.shared) / "data" / E2E_SCENE, frames=E2E_QUERY_FRAMES, use_depth=False)
    first = ds[0]
    t_read = time.time()
    kmap = KeyframeMap.load(args.measure_map)
    t_load = time.time()
    loc = L.Localizer(kmap, L.LocalizerConfig())
    r0 = loc.localize(first.image, first.camera)
    t_first = time.time()
    after_first = _proc_status()
    queries = [ds[i] for i in range(len(ds))]
    Q = np.load(Path(args.work) / "query_vlad.npy")
    exact = np.load(Path(args.measure_map + ".exact.npy"))
    res = {"n": kmap.num_keyframes, "import_s": t_import - t_spawn, "load_s": t_load - t_read,
           "setup_first_localization_s": t_first - t_load,
           "spawn_to_first_localization_s": (t_first - t_spawn) - (t_read - t_import),
           "first_status": r0.status.name, "rss_after_first": after_first}
    passes = []
    offs = _tile_offsets(int(np.ceil(kmap.num_keyframes / int(args.base_keyframes))))
    for p in range(2):
        total, stages, correct = [], {}, 0
        for fr in queries:
            r = loc.localize(fr.image, fr.camera)
            total.append(r.timings_ms.get("total", np.nan))
            for key in ("features", "retrieval", "estimate"):
                stages.setdefault(key, []).append(r.timings_ms.get(key, np.nan))
            if r.localized and r.T_world_cam is not None:
                # tiles are translated copies: a pose in another tile is right modulo its offset
                err = np.linalg.norm(r.T_world_cam[:3, 3] - offs - fr.T_world_cam[:3, 3], axis=1).min()
                correct += bool(err < 0.25)
        passes.append({"p50_ms": float(np.percentile(total, 50)), "p90_ms": float(np.percentile(total, 90)),
                       **{f"{k}_p50_ms": float(np.nanpercentile(v, 50)) for k, v in stages.items()},
                       "within_25cm_modulo_tile": int(correct), "queries": len(queries)})
    res["passes"] = passes
    times, ids = [], []
    for rep in range(3):
        for q in Q:
            t = time.perf_counter()
            i, _ = kmap.index.search(q, K)
            times.append((time.perf_counter() - t) * 1e3)
            if rep == 0:
                ids.append(i)
    res["retrieval_p50_ms"] = float(np.percentile(times, 50))
    res["retrieval_p99_ms"] = float(np.percentile(times, 99))
    res["recall_at_10"] = _recall(ids, exact)
    res["index"] = kmap.index.description
    res["rss_end"] = _proc_status()
    res["map_memory_bytes"] = kmap.memory_bytes()
    res["lru_cached_bytes"] = kmap.store.cached_bytes
    res["store_reads"] = kmap.store.reads
    if args.paired_base and Path(args.paired_base).resolve() != Path(args.measure_map).resolve():
        # Latency ratio robust to the load of a shared machine: the same queries against the
        # base map and this one, interleaved query by query (order alternating), after RSS
        # was recorded above.
        ref = L.Localizer(KeyframeMap.load(args.paired_base), L.LocalizerConfig())
        a_ms, b_ms = [], []
        for j, fr in enumerate(queries):
            pair = [(ref, a_ms), (loc, b_ms)]
            for lz, acc in (pair if j % 2 == 0 else pair[::-1]):
                acc.append(lz.localize(fr.image, fr.camera).timings_ms.get("total", np.nan))
        res["paired"] = {"base_p50_ms": float(np.percentile(a_ms, 50)), "this_p50_ms": float(np.percentile(b_ms, 50)),
                         "base_p90_ms": float(np.percentile(a_ms, 90)), "this_p90_ms": float(np.percentile(b_ms, 90)),
                         "ratio_p50": float(np.percentile(b_ms, 50) / np.percentile(a_ms, 50))}
    print("RESULT " + json.dumps(res, default=float), flush=True)
    return 0


def _node_rss(map_dir: Path, frames: Sequence, timeout: float = 300.0) -> Optional[dict]:
    """The real node (``python -m reloc_ros.ros.node``, own process, private DDS domain)
    started on the map, fed the query frames one at a time over DDS (reloc_ros.demo.replay)
    until it publishes a fix on ``~/pose_raw``: seconds from spawn to its 'loaded map' log
    line and to that first fix, and its resident memory then. None without ROS."""
    try:
        from reloc_ros.demo.procs import NodeProcess, apply_env, isolated_ros_env, wait_until
        from reloc_ros.demo.replay import Replayer
    except Exception as e:  # rclpy / ROS not importable here
        print(f"  node: skipped ({e})")
        return None
    import re

    work = Path(tempfile.mkdtemp(prefix="bench_scale_node_"))
    env = isolated_ros_env()
    apply_env(env)
    params = {"map_path": str(map_dir), "max_rate": 0.0, "transform_tolerance": 0.2, "use_prior": False}
    t0 = time.time()
    node = NodeProcess(params, env, remaps={"image": "/camera/image_raw", "camera_info": "/camera/camera_info"},
                       workdir=work).start()
    rp = None
    out: dict = {}
    try:
        rp = Replayer(domain_id=int(env["ROS_DOMAIN_ID"]), image_topic="/camera/image_raw")
        if not wait_until(lambda: "loaded map" in node.log_tail(400) or not node.alive(), timeout, 0.1) \
                or not node.alive():
            print(f"  node did not load the map: {node.log_tail(10)}")
            return None
        out["spawn_to_map_loaded_s"] = time.time() - t0
        m = re.search(r"loaded map '.*' \((\d+) keyframes\) in ([0-9.]+) s", node.log_tail(400))
        out["node_reported_load_s"] = float(m.group(2)) if m else None
        rp.wait_ready(timeout, camera=frames[0].camera)
        for i, fr in enumerate(frames[:5]):
            o = rp.run_frame(i, fr.name, fr.image, fr.camera, fr.T_world_cam, timeout=120.0, tolerance_s=0.2)
            if o.T_map_base_raw is not None:
                out["spawn_to_first_fix_s"] = time.time() - t0
                out["frames_until_first_fix"] = i + 1
                break
        for line in Path(f"/proc/{node.pid}/status").read_text().splitlines():
            key, _, val = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                out[key] = int(val.split()[0]) * 1024
        return out
    finally:
        if rp is not None:
            rp.close()
        node.stop()
        shutil.rmtree(work, ignore_errors=True)


def run_e2e(args) -> dict:
    from reloc_ros.localizer import Localizer, LocalizerConfig
    from reloc_ros.map_edit import add_keyframes
    from reloc_ros.maps import KeyframeMap

    shared = Path(args.shared)
    work = Path(args.out) / "e2e"
    work.mkdir(parents=True, exist_ok=True)
    base_dir = _e2e_base(shared, work)
    base = KeyframeMap.load(base_dir)
    B = base.num_keyframes
    loc = Localizer(base, LocalizerConfig())
    qds = open_dataset("7scenes", shared / "data" / E2E_SCENE, frames=E2E_QUERY_FRAMES, use_depth=False)
    Q = np.stack([loc.descriptor.describe(loc.extractor(qds[i].image)) for i in range(len(qds))])
    np.save(work / "query_vlad.npy", Q)
    add_ds = open_dataset("7scenes", shared / "data" / E2E_SCENE, frames=E2E_ADD_FRAMES)
    add_frames = [add_ds[i] for i in range(len(add_ds))]
    node_frames = [qds[i] for i in range(5)] if args.node_rss else []
    build = base.manifest.get("build_seconds", {})
    rows = []
    for n in sorted(args.e2e_sizes):
        print(f"== N={n}", flush=True)
        mdir = work / f"map_{n}"
        syn = synthesize_map(base_dir, n, mdir)
        G = syn.pop("G")
        exact = np.argsort(-(Q @ G.T), axis=1, kind="stable")[:, :K]
        np.save(str(mdir) + ".exact.npy", exact)
        del G
        gc.collect()
        disk = _dir_bytes(mdir)
        row = {"n": n, "tiles": syn["tiles"], "index": syn["index"],
               "assembly_s": {k: round(v, 2) for k, v in syn["seconds"].items()},
               "assembly_s_per_kf": syn["seconds"]["total"] / n, "disk_bytes_per_kf": disk / n,
               "disk_bytes": disk, "store_bytes_per_kf": (mdir / "store.bin").stat().st_size / n}
        print(f"  assembled in {syn['seconds']['total']:.1f} s ({syn['index']}), disk {disk / n / 1e3:.0f} KB/kf",
              flush=True)
        subprocess.run(["sync"], check=False)
        t_spawn = time.time()
        p = subprocess.run([sys.executable, __file__, "--measure-map", str(mdir), "--spawn-time", repr(t_spawn),
                            "--shared", str(shared), "--work", str(work), "--threads", str(args.threads),
                            "--base-keyframes", str(B), "--paired-base", str(base_dir)],
                           capture_output=True, text=True)
        line = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
        if p.returncode != 0 or not line:
            print(p.stdout[-2000:], p.stderr[-4000:])
            raise RuntimeError(f"measurement of N={n} failed")
        row.update(json.loads(line[0][7:]))
        print(f"  load {row['load_s']:.2f} s, spawn->first localization {row['spawn_to_first_localization_s']:.2f} s, "
              f"RSS {row['rss_end']['VmRSS'] / 2**30:.2f} GB (peak {row['rss_end']['VmHWM'] / 2**30:.2f}), "
              f"retrieval p50 {row['retrieval_p50_ms']:.2f} p99 {row['retrieval_p99_ms']:.2f} ms "
              f"recall@10 {row['recall_at_10']:.3f}; query p50/p90 pass1 {row['passes'][0]['p50_ms']:.0f}/"
              f"{row['passes'][0]['p90_ms']:.0f} pass2 {row['passes'][1]['p50_ms']:.0f}/"
              f"{row['passes'][1]['p90_ms']:.0f} ms" + (
                  f"; interleaved with the 10^2 map: p50 {row['paired']['this_p50_ms']:.0f} vs "
                  f"{row['paired']['base_p50_ms']:.0f} ms, ratio {row['paired']['ratio_p50']:.2f}"
                  if "paired" in row else ""), flush=True)
        if args.node_rss:
            row["node"] = _node_rss(mdir, node_frames)
            if row["node"]:
                print(f"  node: map loaded {row['node']['spawn_to_map_loaded_s']:.1f} s after spawn, first fix "
                      f"{row['node'].get('spawn_to_first_fix_s', float('nan')):.1f} s, "
                      f"RSS {row['node']['VmRSS'] / 2**30:.2f} GB", flush=True)
        t = time.perf_counter()
        st = add_keyframes(mdir, add_frames, source="bench_scale add")
        row["add50"] = {"seconds": round(time.perf_counter() - t, 3), "added": st["added"], **st["seconds"],
                        "index_rebuilt": st["index_rebuilt"]}
        print(f"  add {st['added']} keyframes: {row['add50']['seconds']:.1f} s {st['seconds']}", flush=True)
        rows.append(row)
        if not args.keep_maps:
            shutil.rmtree(mdir)
            Path(str(mdir) + ".exact.npy").unlink(missing_ok=True)
    return {"rows": rows, "base_map": str(base_dir), "base_keyframes": B,
            "base_build_seconds": build, "base_build_s_per_kf": (build.get("total") or 0) / B,
            "queries": int(len(Q)), "threads": args.threads, "load_average": os.getloadavg(),
            "tile_spacing_m": TILE_SPACING_M}


def e2e_table(res: dict) -> str:
    lines = [f"{'N':>7} {'index':18s} {'disk KB/kf':>10} {'asm ms/kf':>9} {'RSS GB':>7} {'load s':>7} "
             f"{'first loc s':>11} {'retr p50/p99 ms':>15} {'recall@10':>9} {'query p50/p90 ms':>16} {'add50 s':>7} "
             f"{'p50 vs 10^2':>11}"]
    for r in res["rows"]:
        p = r["passes"][1]
        lines.append(f"{r['n']:>7} {r['index']:18s} {r['disk_bytes_per_kf'] / 1e3:>10.0f} "
                     f"{r['assembly_s_per_kf'] * 1e3:>9.1f} {r['rss_end']['VmRSS'] / 2**30:>7.2f} {r['load_s']:>7.2f} "
                     f"{r['spawn_to_first_localization_s']:>11.2f} "
                     f"{r['retrieval_p50_ms']:>7.2f}/{r['retrieval_p99_ms']:<7.2f} {r['recall_at_10']:>9.3f} "
                     f"{p['p50_ms']:>7.0f}/{p['p90_ms']:<8.0f} {r['add50']['seconds']:>7.1f} "
                     f"{r['paired']['ratio_p50'] if 'paired' in r else 1.0:>11.2f}")
    return "\n".join(lines)


def e2e_plot(res: dict, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = res["rows"]
    n = [r["n"] for r in rows]
    panels = [
        ("disk per keyframe (KB)", {"total": [r["disk_bytes_per_kf"] / 1e3 for r in rows],
                                    "store.bin": [r["store_bytes_per_kf"] / 1e3 for r in rows]}),
        ("assembly time per keyframe (ms)", {"tiling": [r["assembly_s_per_kf"] * 1e3 for r in rows]}),
        ("resident memory (GB)", {"fresh process": [r["rss_end"]["VmRSS"] / 2**30 for r in rows],
                                  "peak": [r["rss_end"]["VmHWM"] / 2**30 for r in rows],
                                  **({"node after first fix": [(r.get("node") or {}).get("VmRSS", np.nan) / 2**30
                                                          for r in rows]} if any(r.get("node") for r in rows) else {})}),
        ("retrieval (ms)", {"p50": [r["retrieval_p50_ms"] for r in rows], "p99": [r["retrieval_p99_ms"] for r in rows]}),
        ("recall@10 vs exact", {"recall": [r["recall_at_10"] for r in rows]}),
        ("query latency (ms)", {"p50": [r["passes"][1]["p50_ms"] for r in rows],
                                "p90": [r["passes"][1]["p90_ms"] for r in rows],
                                "p50 first pass": [r["passes"][0]["p50_ms"] for r in rows],
                                "p50 interleaved, this map": [r.get("paired", {}).get("this_p50_ms", np.nan)
                                                              for r in rows],
                                "p50 interleaved, 10^2 map": [r.get("paired", {}).get("base_p50_ms", np.nan)
                                                              for r in rows]}),
        ("load (s)", {"KeyframeMap.load": [r["load_s"] for r in rows],
                      "spawn -> first localization": [r["spawn_to_first_localization_s"] for r in rows],
                      **({"node spawn -> first fix": [(r.get("node") or {}).get("spawn_to_first_fix_s", np.nan)
                                                      for r in rows]} if any(r.get("node") for r in rows) else {})}),
        ("add 50 keyframes (s)", {"total": [r["add50"]["seconds"] for r in rows]}),
    ]
    fig = Figure(figsize=(16, 6.5))
    FigureCanvasAgg(fig)
    for j, (title, series) in enumerate(panels):
        ax = fig.add_subplot(2, 4, j + 1)
        for label, ys in series.items():
            ax.plot(n, ys, "o-", label=label)
        ax.set_xscale("log")
        ax.set_xlabel("keyframes")
        ax.set_title(title, fontsize=9)
        if len(series) > 1:
            ax.legend(fontsize=7)
        if title.startswith("recall"):
            ax.axhline(0.95, color="grey", ls="--", lw=0.8)
        if title.startswith("resident"):
            ax.axhline(4.0, color="grey", ls="--", lw=0.8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shared", default=str(ROOT.parent / "shared"))
    ap.add_argument("--out", default=str(ROOT / "out" / "bench_scale"))
    ap.add_argument("--part", choices=["all", "retrieval", "e2e"], default="all",
                    help="retrieval: index kinds on descriptors only; e2e: whole maps loaded and queried")
    ap.add_argument("--sizes", type=lambda s: [int(float(v)) for v in s.split(",")],
                    default=[100, 1000, 10_000, 100_000])
    ap.add_argument("--e2e-sizes", type=lambda s: [int(float(v)) for v in s.split(",")],
                    default=[100, 1000, 10_000, 100_000])
    ap.add_argument("--kinds", type=lambda s: s.split(","), default=["flat", "hnsw", "ivfpq"])
    ap.add_argument("--repeat", type=int, default=4, help="passes over the queries for the latencies")
    ap.add_argument("--simd-size", type=int, default=10_000,
                    help="keyframes for the SIMD-level comparison (0: skip it)")
    ap.add_argument("--threads", type=int, default=1, help="FAISS/BLAS threads (1: a query runs on one core)")
    ap.add_argument("--keep-maps", action="store_true", help="keep the e2e maps (10^5: ~25 GB)")
    ap.add_argument("--no-node-rss", dest="node_rss", action="store_false",
                    help="skip starting the real ROS node on each e2e map")
    ap.add_argument("--measure-map", default=None, help=argparse.SUPPRESS)  # child process of the e2e part
    ap.add_argument("--spawn-time", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--work", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--base-keyframes", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--paired-base", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.measure_map:
        return measure_child(args)
    if "flat" not in args.kinds:
        args.kinds = ["flat"] + args.kinds  # the exact reference
    if not (Path(args.shared) / "data").is_dir():
        print(f"bench_scale: shared data not found under {args.shared}; nothing to measure", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.part in ("all", "retrieval"):
        res = run(args)
        (out / "bench_scale.json").write_text(json.dumps(res, indent=1, default=float))
        plot(res, out / "bench_scale.png")
        print(table(res))
        for r in res["simd_levels"]:
            print(f"SIMD level {r['level']:15s} (N={res['simd_size']}): " + ", ".join(
                f"{k} {r[k + '_p50_ms']:.3f}/{r[k + '_p99_ms']:.3f} ms p50/p99" for k in ("flat", "hnsw", "ivfpq")))
        print(f"peak RSS {res['peak_rss_gb']} GB; load average {res['load_average']}; wrote "
              f"{out / 'bench_scale.json'}, {out / 'bench_scale.png'}")
    if args.part in ("all", "e2e"):
        res = run_e2e(args)
        (out / "bench_scale_e2e.json").write_text(json.dumps(res, indent=1, default=float))
        e2e_plot(res, out / "bench_scale_e2e.png")
        print(f"real base map: {res['base_keyframes']} keyframes built in {res['base_build_seconds']} s "
              f"({res['base_build_s_per_kf']:.2f} s/kf); {res['queries']} queries; load average {res['load_average']}")
        print(e2e_table(res))
        print(f"wrote {out / 'bench_scale_e2e.json'}, {out / 'bench_scale_e2e.png'}")
    return 0


if __name__ == "__main__":
    if "--extract-only" in sys.argv:
        real_features(Path(sys.argv[2]), Path(sys.argv[3]))
        sys.exit(0)
    sys.exit(main())
