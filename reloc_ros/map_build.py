"""Parallel and distributed map building: the executors and the per-item work of ``build_map``.

``maps.build_map`` has three compute stages, each independent per keyframe once its
inputs exist:

1. *Keyframe extraction* (per frame): SIFT, keypoint undistortion, depth points.
   The driver (the process calling ``build_map``) reads and checks the frames in order,
   exactly as a sequential build does (same skipped frames, same order), and sends each
   loaded frame to a worker; results come back in frame order through a bounded window,
   so memory stays bounded and image I/O and writing overlap the workers' compute.
2. *Triangulation* (per keyframe without depth points). Each keyframe's neighbours are
   chosen by the driver over all poses (``maps._select_neighbors``, as sequentially);
   keyframes are then grouped into spatial *regions* (Morton order of the camera centres,
   consecutive runs), and a region's task carries only the keypoints and uint8 SIFT of
   the region's keyframes and of their neighbours (RootSIFT is recomputed by the worker:
   4x smaller to ship). A region is the unit of distribution: on a cluster no worker
   holds the whole map. (The retrieval vocabulary is then fitted by ``build_map`` as
   sequentially: FAISS k-means depends on its thread count.)
3. *Global descriptors* (per keyframe), in batches, from the fitted vocabulary's state.

Every keyframe is computed by the same function on the same inputs whichever executor
runs it, so the map equals the single-process one (``test/test_map_build_parallel.py``
checks keypoints, descriptors and points against the serial build for the process pool
and for a local Ray instance; global descriptors agree to ~1e-6, BLAS rounding with 1
thread in workers vs several in the driver).

Executors (``make_executor``):

- ``SerialExecutor``: in-process, the sequential build (``workers=1``).
- ``ProcessExecutor``: a local process pool (``forkserver`` on Linux: workers fork from
  a clean server that has imported this module once, so no thread state of the caller,
  OpenMP's included, is forked, and a worker starts in milliseconds). Each worker bounds
  OpenCV / BLAS / FAISS / torch to ``cores // workers`` threads (``threads.limit_threads``):
  libraries that each start one thread per core would otherwise put workers x cores
  threads on the cores, and OpenMP's spin-waiting makes that slower than one process.
  As with any non-fork start method, workers import the caller's ``__main__`` module:
  a script calling ``build_map`` must guard its entry point (``if __name__ == "__main__"``).
- ``RayExecutor``: Ray tasks (``ray_address``: ``"local"`` starts a local instance, any
  other value is passed to ``ray.init(address=...)``, e.g. ``"auto"`` or
  ``"ray://head:10001"``). reloc_ros must be importable on every node; frames travel
  from the driver, so the recording needs to be readable only there. A Ray this module
  started stays up for later builds in the process (``ray.shutdown()`` ends it).

Progress: ``Progress`` prints a bar with the ETA to stderr for every stage that runs
longer than ``Progress.delay_s`` (short builds, e.g. in tests, print nothing).
"""
from __future__ import annotations

import collections
import logging
import math
import multiprocessing
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, TextIO, Tuple

import numpy as np

from reloc_ros.features import Features, SiftExtractor, root_sift, undistort_keypoints
from reloc_ros.geometry import check_pose
from reloc_ros.types import InvalidInputError, PosedFrame, RelocError

log = logging.getLogger("reloc_ros.map_build")


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


# -- progress -------------------------------------------------------------------------

class Progress:
    """A progress bar with rate and ETA on stderr, for long builds.

    Nothing is printed until ``delay_s`` seconds have passed (a short stage stays
    silent); then, on a terminal, one line redrawn at most every ``interval_s``; into a
    file or pipe (logs), a new line every ``log_interval_s``. ``close`` prints the final
    count and time when anything was printed. ETA = remaining items x mean time per
    item so far (the items of one stage cost alike).
    """

    delay_s = 2.0
    interval_s = 0.2
    log_interval_s = 10.0

    def __init__(self, total: int, label: str, stream: Optional[TextIO] = None, delay_s: Optional[float] = None):
        self.total, self.label = max(0, int(total)), label
        self.stream = stream if stream is not None else sys.stderr
        self.delay = self.delay_s if delay_s is None else delay_s
        self.done = 0
        self.t0 = time.monotonic()
        self._last = -math.inf
        self._printed: object = False  # False, or the count last printed
        isatty = getattr(self.stream, "isatty", None)
        self._tty = bool(isatty and isatty())

    def update(self, n: int = 1) -> None:
        self.done += n
        now = time.monotonic()
        if now - self.t0 < self.delay:
            return
        if now - self._last >= (self.interval_s if self._tty else self.log_interval_s):
            self._last = now
            self._write(self.line(now))

    def line(self, now: Optional[float] = None) -> str:
        """``label [#####.....] done/total pct% elapsed, rate, ETA`` (seconds)."""
        el = (time.monotonic() if now is None else now) - self.t0
        frac = self.done / self.total if self.total else 1.0
        bar = "#" * int(round(20 * frac))
        rate = self.done / el if el > 0 else 0.0
        eta = (self.total - self.done) / rate if rate > 0 else math.inf
        eta_s = f"ETA {_seconds(eta)}" if math.isfinite(eta) else "ETA ?"
        return (f"{self.label} [{bar:<20}] {self.done}/{self.total} {100 * frac:3.0f}% "
                f"{_seconds(el)} elapsed, {rate:.2f}/s, {eta_s}")

    def _write(self, text: str) -> None:
        self.stream.write(("\r" + text + "\x1b[K") if self._tty else text + "\n")
        self.stream.flush()
        self._printed = self.done

    def close(self) -> None:
        if self._printed is not False:
            if self._printed != self.done or self._tty:
                self._write(self.line())
            if self._tty:
                self.stream.write("\n")
                self.stream.flush()


def _seconds(s: float) -> str:
    if s < 60:
        return f"{s:.1f} s"
    m, s = divmod(int(round(s)), 60)
    return f"{m}:{s:02d} min" if m < 60 else f"{m // 60}:{m % 60:02d}:{s:02d} h"


# -- executors ------------------------------------------------------------------------

_WORKER_THREADS: Optional[int] = None


def _init_worker(threads: int) -> None:
    """Bound the numeric libraries' thread pools of this worker process (once)."""
    global _WORKER_THREADS
    if _WORKER_THREADS != threads:
        from reloc_ros.threads import limit_threads

        limit_threads(threads)
        _WORKER_THREADS = threads


def _call_in_worker(threads: int, fn: Callable, args: tuple) -> Any:
    _init_worker(threads)
    return fn(*args)


class Executor:
    """Runs picklable top-level functions; ``imap`` yields results in submission order.

    workers: tasks run at the same time (1 for the serial executor).
    """

    workers = 1
    name = "serial"

    def imap(self, fn: Callable, argsets: Iterable[tuple], window: Optional[int] = None) -> Iterator[Any]:
        """``fn(*args)`` for each args, results in order; at most ``window`` tasks in flight
        (default 2 x workers + 2; 1 for the serial executor), so inputs and results held at
        once stay bounded."""
        window = max(1, window or (1 if isinstance(self, SerialExecutor) else 2 * self.workers + 2))
        pending: collections.deque = collections.deque()
        try:
            for args in argsets:
                pending.append(self._submit(fn, args))
                if len(pending) >= window:
                    yield self._result(pending.popleft())
            while pending:
                yield self._result(pending.popleft())
        finally:
            for h in pending:  # an error or an abandoned generator: drop what is queued
                self._cancel(h)

    def _submit(self, fn: Callable, args: tuple) -> Any:
        return (fn, args)  # run lazily at _result, in order: the sequential build

    def _result(self, handle: Any) -> Any:
        fn, args = handle
        return fn(*args)

    def _cancel(self, handle: Any) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self) -> "Executor":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class SerialExecutor(Executor):
    """In-process, one item at a time: the sequential build."""


class ProcessExecutor(Executor):
    """A local process pool of ``workers`` processes, each with ``threads`` library threads."""

    name = "processes"

    def __init__(self, workers: int, threads: Optional[int] = None):
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        self.workers = workers
        self.threads = threads or max(1, available_cores() // workers)
        methods = multiprocessing.get_all_start_methods()
        ctx = multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")
        if ctx.get_start_method() == "forkserver":
            # Imported once by the server, then inherited by every worker it forks. No-op
            # when the process's forkserver is already running (workers import on demand).
            ctx.set_forkserver_preload(["reloc_ros.map_build", "reloc_ros.maps"])
        self._pool = ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_init_worker,
                                         initargs=(self.threads,))

    def _submit(self, fn: Callable, args: tuple) -> Any:
        return self._pool.submit(fn, *args)

    def _result(self, handle: Any) -> Any:
        try:
            return handle.result()
        except BrokenProcessPool as e:
            raise RelocError(f"a map-building worker process died ({e}); out of memory? retry with fewer "
                             f"workers (--workers, now {self.workers})") from e

    def _cancel(self, handle: Any) -> None:
        handle.cancel()

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


class RayExecutor(Executor):
    """Ray tasks (1 CPU each) on a local instance or a cluster; see the module docstring."""

    name = "ray"

    def __init__(self, address: str, workers: int = 0):
        try:
            import ray
        except ImportError as e:
            raise RelocError("ray_address is set but Ray is not installed (pip install ray)") from e
        self._ray = ray
        if not ray.is_initialized():
            try:
                if address == "local":
                    ray.init(address="local", num_cpus=workers or available_cores(), include_dashboard=False,
                             log_to_driver=False)
                else:
                    ray.init(address=address, log_to_driver=False)
            except (ConnectionError, RuntimeError, ValueError) as e:
                raise RelocError(f"cannot start or reach Ray at ray_address={address!r}: {e}") from e
        cpus = int(ray.cluster_resources().get("CPU", 1))
        # Enough tasks in flight to keep every CPU of the cluster busy (or ``workers``).
        self.workers = max(1, min(workers, cpus) if workers else cpus)
        self._remote = ray.remote(num_cpus=1)(_call_in_worker)

    def _submit(self, fn: Callable, args: tuple) -> Any:
        return self._remote.remote(1, fn, args)

    def _result(self, handle: Any) -> Any:
        try:
            return self._ray.get(handle)
        except self._ray.exceptions.RayTaskError as e:
            # re-raise what the task raised (e.g. InvalidInputError), not Ray's wrapper
            cause = getattr(e, "cause", None)
            raise (cause if isinstance(cause, BaseException) else e) from None

    def _cancel(self, handle: Any) -> None:
        try:
            self._ray.cancel(handle)
        except Exception:  # already finished or gone: nothing to cancel
            pass


def make_executor(workers: int = 0, ray_address: str = "", items: Optional[int] = None) -> Executor:
    """The executor for a build stage.

    workers: 0 = every available core, 1 = sequential in this process, n = n processes
    (with Ray: at most n tasks at a time, 0 = every CPU of the cluster). ray_address:
    '' = no Ray, 'local' = start a local Ray instance, else a cluster address.
    items: the stage's item count; never more local workers than items, and 0 or 1
    item runs in this process.
    """
    if workers < 0:
        raise ValueError(f"workers must be >= 0 (0 = all cores), got {workers}")
    if ray_address:
        return RayExecutor(ray_address, workers)
    n = available_cores() if workers == 0 else workers
    if items is not None:
        n = min(n, items)
    if multiprocessing.current_process().daemon:
        n = 1  # a pool's own worker (daemonic) may not start processes: build in it
    return SerialExecutor() if n <= 1 else ProcessExecutor(n)


# -- stage 1: keyframe extraction ----------------------------------------------------

_EXTRACTORS: Dict[tuple, SiftExtractor] = {}


def extract_keyframe(frame: PosedFrame, cfg, feats: Optional[Features]) -> Tuple[Optional[Features], np.ndarray,
                                                                                 np.ndarray]:
    """Work of one frame: (features or None when ``feats`` was given, keypoints [N, 2]
    undistorted source-image pixels, world points [N, 3] metres from depth, NaN = none).

    cfg: maps.MapBuildConfig; feats: features already extracted (a caller's cache).
    """
    from reloc_ros.maps import _depth_points

    given = feats is not None
    if not given:
        key = tuple(sorted(vars(cfg.features).items()))
        ex = _EXTRACTORS.get(key)
        if ex is None:
            ex = _EXTRACTORS[key] = SiftExtractor(cfg.features)
        feats = ex(frame.image)
    kp_ud = undistort_keypoints(feats.keypoints, frame.camera)
    p = _depth_points(frame, kp_ud, cfg) if cfg.use_depth else np.full((len(kp_ud), 3), np.nan, np.float32)
    return (None if given else feats), kp_ud, p


def extract_keyframes(frames: Sequence[PosedFrame], cfg, feature_cache: Optional[dict],
                      skipped: List[List[str]]) -> Iterator[Tuple[PosedFrame, Features, np.ndarray, np.ndarray]]:
    """Stage 1 of ``build_map``: (frame, features, undistorted keypoints, depth points) per
    usable frame, in frame order; the frame's ``T_world_cam`` is the checked pose.

    Frames that cannot be read or whose pose or camera is invalid are appended to
    ``skipped`` as [name, reason] (with a warning) and not yielded, as in a sequential
    build. ``feature_cache`` (name -> Features) is read and filled. cfg: MapBuildConfig
    (``workers``, ``ray_address`` choose the executor).
    """
    log_ = logging.getLogger("reloc_ros.maps")  # the warnings a sequential build has always logged
    n = len(frames)
    names_known = getattr(frames, "names", None)
    loaded: collections.deque = collections.deque()

    def tasks() -> Iterator[tuple]:
        for idx in range(n):
            name = names_known[idx] if names_known is not None else str(idx)
            try:
                fr = frames[idx]
                name = fr.name
                T = check_pose(fr.T_world_cam, f"pose of {fr.name}")
                fr.camera.validate()
            except (InvalidInputError, OSError) as e:
                log_.warning("skipping frame %s: %s", name, e)
                skipped.append([str(name), str(e)])
                progress.update()
                continue
            fr.T_world_cam = T
            feats = feature_cache.get(fr.name) if feature_cache is not None else None
            loaded.append((fr, feats))
            yield (fr, cfg, feats)

    progress = Progress(n, "map build: keyframes")
    with make_executor(cfg.workers, cfg.ray_address, n) as ex:
        try:
            for got, kp_ud, p in ex.imap(extract_keyframe, tasks()):
                fr, feats = loaded.popleft()
                if feats is None:
                    feats = got
                    if feature_cache is not None:
                        feature_cache[fr.name] = feats
                progress.update()
                # copies: Ray hands back read-only arrays, and build_map fills points in place
                yield fr, feats, np.array(kp_ud, copy=True), np.array(p, copy=True)
        finally:
            progress.close()


class LocalDataSpill:
    """Every keyframe's local data during a build, in flat files under ``root`` instead of RAM.

    A build holds keypoints, SIFT and points of every keyframe until the map is written:
    about 300 KB a keyframe of 2048 features, 30 GB at 10^5 keyframes. Appended here in
    frame order, they are read back through memory maps (the page cache holds what the
    triangulation's regions touch, and the kernel can drop it again), so the build's
    resident memory does not grow with the recording. ``finish`` returns per-keyframe
    array views: keypoints [Ni, 2] float32, descriptors [Ni, 128] uint8, points [Ni, 3]
    float32 and point sources [Ni] uint8; the last two writable (triangulation fills them).
    """

    FIELDS = (("keypoints", np.float32, 2), ("descriptors", np.uint8, 128), ("points3d", np.float32, 3),
              ("point_source", np.uint8, 1))

    def __init__(self, root) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True)
        self._files = {name: open(self.root / f"{name}.bin", "wb") for name, _, _ in self.FIELDS}
        self.offsets = [0]

    def append(self, keypoints: np.ndarray, descriptors: np.ndarray, points3d: np.ndarray,
               point_source: np.ndarray) -> None:
        arrays = dict(keypoints=keypoints, descriptors=descriptors, points3d=points3d, point_source=point_source)
        n = len(keypoints)
        for name, dtype, width in self.FIELDS:
            a = np.ascontiguousarray(arrays[name], dtype=dtype)
            if a.size != n * width:
                raise ValueError(f"{name}: {a.shape} for {n} keypoints")
            self._files[name].write(a.tobytes())
        self.offsets.append(self.offsets[-1] + n)

    def finish(self) -> Tuple[List[np.ndarray], ...]:
        """(keypoints, descriptors, points3d, point_source): one view per keyframe each."""
        out = []
        total = self.offsets[-1]
        for name, dtype, width in self.FIELDS:
            self._files[name].close()
            shape = (total, width) if width > 1 else (total,)
            # np.memmap cannot map an empty file
            arr = (np.memmap(self.root / f"{name}.bin", dtype=dtype, mode="r+", shape=shape) if total
                   else np.zeros(shape, dtype))
            out.append([arr[a:b] for a, b in zip(self.offsets[:-1], self.offsets[1:])])
        return tuple(out)


# -- stage 2: triangulation ----------------------------------------------------------

class _LazyRoots:
    """RootSIFT [n, 128] float32 of keyframe j, computed from its uint8 SIFT (``descs[j]``)
    on first use and kept for the ``max_items`` most recently used keyframes: float32
    RootSIFT is 1 MB a keyframe of 2048 features, four times the SIFT it comes from."""

    def __init__(self, descs, max_items: int = 128):
        self._descs, self.max_items = descs, max_items
        self._cache: "collections.OrderedDict[int, np.ndarray]" = collections.OrderedDict()

    def __getitem__(self, j: int) -> np.ndarray:
        r = self._cache.get(j)
        if r is None:
            r = self._cache[j] = root_sift(self._descs[j])
            if len(self._cache) > self.max_items:
                self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(j)
        return r


def triangulate_region(region: Sequence[int], nbrs: Dict[int, np.ndarray], kps: Dict[int, np.ndarray],
                       descs: Dict[int, np.ndarray], T: Dict[int, np.ndarray], Ks: Dict[int, np.ndarray],
                       names: Dict[int, str], need: Dict[int, np.ndarray], cfg,
                       cached: Optional[dict]) -> Tuple[List[np.ndarray], Optional[dict]]:
    """Work of one region: triangulated points [Ni, 3] float32 (NaN = none) of each keyframe
    in ``region`` (global keyframe ids) for its keypoints in ``need`` (bool [Ni]), and the
    full-row pair matches it computed (when ``cached`` is a dict: the caller's known
    matches for these pairs, keyed as ``maps.PairMatcher`` keys them).

    kps / descs / T / Ks / names: keypoints [n, 2] (undistorted source pixels), uint8 SIFT
    [n, 128], T_world_cam [4, 4], source intrinsics [3, 3] and names of the region's
    keyframes and of every neighbour in ``nbrs`` (keyframe id -> neighbour ids).
    """
    from reloc_ros.maps import PairMatcher, _triangulate_keyframe

    roots = _LazyRoots(descs)
    cache = dict(cached) if cached is not None else None
    match = PairMatcher(roots, need, cfg, names, ((i, int(j)) for i in region for j in nbrs[i]), cache)
    out = [_triangulate_keyframe(i, kps, roots, T, Ks, cfg, names, nbrs=nbrs[i], matches=match(i, nbrs[i]))
           for i in region]
    new = {k: v for k, v in cache.items() if k not in cached} if cache is not None else None
    return out, new


def _morton_order(centres: np.ndarray) -> np.ndarray:
    """Indices of [N, 3] points sorted along a Z-order curve (10 bits per axis), so that
    consecutive runs are compact regions whatever order the frames came in."""
    lo, hi = centres.min(axis=0), centres.max(axis=0)
    q = ((centres - lo) / np.maximum(hi - lo, 1e-9) * 1023).astype(np.uint64)
    code = np.zeros(len(centres), np.uint64)
    for b in range(10):
        for a in range(3):
            code |= ((q[:, a] >> np.uint64(b)) & np.uint64(1)) << np.uint64(3 * b + a)
    return np.argsort(code, kind="stable")


def plan_regions(T_all: np.ndarray, todo: Sequence[int], workers: int, max_region: int = 32) -> List[List[int]]:
    """Keyframes ``todo`` grouped into spatially compact regions: one per worker while they
    hold at most ``max_region`` keyframes (what one task ships stays bounded), else of that
    size. Few, large regions: a task ships and RootSIFT-normalises its keyframes'
    neighbours too, which, spread over distance ranks, are mostly outside the region, and
    a pair is matched once only when both of its keyframes are in the same region."""
    todo = np.asarray(todo, np.int64)
    if len(todo) == 0:
        return []
    order = todo[_morton_order(T_all[todo, :3, 3])]
    size = max(1, min(max_region, math.ceil(len(todo) / max(1, workers))))
    return [order[k:k + size].tolist() for k in range(0, len(order), size)]


def _triangulate_regions(ex: Executor, todo: List[int], nbrs: Dict[int, np.ndarray], kps, descs, T_all, Ks, names,
                         needs_point: Dict[int, np.ndarray], cfg, feature_cache: Optional[dict],
                         fill: Callable[[int, np.ndarray], None]) -> None:
    """``triangulate_points`` on workers: one task per spatial region (``plan_regions``)."""
    regions = plan_regions(T_all, todo, ex.workers)

    def tasks() -> Iterator[tuple]:
        for region in regions:
            involved = sorted(set(region).union(*(nbrs[i].tolist() for i in region)))
            cached = None
            if feature_cache is not None:
                cached = {}
                for i in region:
                    for j in nbrs[i]:
                        key = ("matches", names[i], names[j])
                        if key in feature_cache:
                            cached[key] = feature_cache[key]
            yield (region, {i: nbrs[i] for i in region}, {j: kps[j] for j in involved},
                   {j: descs[j] for j in involved}, {j: T_all[j] for j in involved}, {j: Ks[j] for j in involved},
                   {j: names[j] for j in involved},
                   {i: needs_point[i] for i in region}, cfg, cached)

    for region, (tris, new) in zip(regions, ex.imap(triangulate_region, tasks())):
        for i, tri in zip(region, tris):
            fill(i, tri)
        if new and feature_cache is not None:
            feature_cache.update(new)


def triangulate_points(kps: List[np.ndarray], descs: List[np.ndarray], T_all: np.ndarray, Ks: List[np.ndarray],
                       names: List[str], pts: List[np.ndarray], srcs: List[np.ndarray], cfg,
                       feature_cache: Optional[dict], point_value: int) -> None:
    """Stage 2 of ``build_map``: fill keypoints without a point (NaN in ``pts[i]``) with
    triangulated ones, in place, and mark them ``point_value`` in ``srcs[i]``.

    kps: per keyframe [Ni, 2] undistorted source-image pixels; descs: [Ni, 128] uint8;
    T_all: [N, 4, 4] T_world_cam; Ks: source intrinsics [3, 3]; names: keyframe names
    (keys of the pair-match cache in ``feature_cache``). cfg: MapBuildConfig.
    The retrieval vocabulary is not fitted alongside (it needs no points): FAISS k-means
    depends on its OpenMP thread count (centroids up to 0.009 apart for 1 vs 2 threads on
    a 10-frame room), so for the maps to be equal it runs, as sequentially, in the calling
    thread with its limits, where it would spin-wait for cores the workers hold.
    """
    from reloc_ros.maps import PairMatcher, _select_neighbors, _triangulate_keyframe, neighbor_tree

    needs_point = {i: ~np.isfinite(p[:, 0]) for i, p in enumerate(pts)}
    todo = [i for i in range(len(names)) if needs_point[i].any()]
    if not todo:
        return
    tree = neighbor_tree(T_all, cfg.triangulation)
    nbrs = {i: _select_neighbors(T_all, i, cfg.triangulation, tree) for i in todo}
    progress = Progress(len(todo), "map build: triangulation")

    def fill(i: int, tri: np.ndarray) -> None:
        need = ~np.isfinite(pts[i][:, 0])
        ok = need & np.isfinite(tri[:, 0])
        pts[i][ok] = tri[ok]
        srcs[i][ok] = point_value
        progress.update()

    with make_executor(cfg.workers, cfg.ray_address, len(todo)) as ex:
        try:
            if isinstance(ex, SerialExecutor):
                # The sequential build: nothing shipped; keyframes in frame order, whose
                # neighbours are near in the map and mostly near in time (an LRU keeps them)
                roots = _LazyRoots(descs)
                match = PairMatcher(roots, needs_point, cfg, names, ((i, int(j)) for i in todo for j in nbrs[i]),
                                    feature_cache)
                for i in todo:
                    fill(i, _triangulate_keyframe(i, kps, roots, T_all, Ks, cfg, names, nbrs=nbrs[i],
                                                  matches=match(i, nbrs[i])))
            else:
                _triangulate_regions(ex, todo, nbrs, kps, descs, T_all, Ks, names, needs_point, cfg, feature_cache,
                                     fill)
        finally:
            progress.close()


# -- stage 3: global descriptors -----------------------------------------------------

def describe_batch(retrieval_cfg, state: Dict[str, np.ndarray], feats: Sequence[Features]) -> np.ndarray:
    """Work of one batch: global descriptors [n, D] float32 of ``feats`` by the descriptor
    that ``state`` restores (``retrieval.create_descriptor(retrieval_cfg).load_state``)."""
    from reloc_ros.retrieval import create_descriptor

    d = create_descriptor(retrieval_cfg)
    d.load_state(state)
    return np.stack([d.describe(f) for f in feats]).astype(np.float32)


def describe_keyframes(descriptor, feats: Sequence[Features], cfg, max_batch: int = 256) -> np.ndarray:
    """Global descriptors [N, D] float32 of every keyframe's features, by the fitted
    ``descriptor`` (a retrieval.GlobalDescriptor), in batches of keyframes on the executor
    of ``cfg`` (MapBuildConfig). Equal to describing them one by one in this process."""
    progress = Progress(len(feats), "map build: global descriptors")
    with make_executor(cfg.workers, cfg.ray_address, len(feats)) as ex:
        try:
            if isinstance(ex, SerialExecutor):
                out = []
                for f in feats:
                    out.append(descriptor.describe(f))
                    progress.update()
                return np.stack(out).astype(np.float32)
            size = max(1, min(max_batch, math.ceil(len(feats) / (4 * ex.workers))))
            batches = [feats[k:k + size] for k in range(0, len(feats), size)]
            state = descriptor.state()
            parts = []
            for g in ex.imap(describe_batch, ((cfg.retrieval, state, b) for b in batches)):
                parts.append(np.array(g, copy=True))
                progress.update(len(g))
            return np.concatenate(parts)
        finally:
            progress.close()
