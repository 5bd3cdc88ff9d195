"""On-disk storage of a keyframe map's per-keyframe data, read on demand with bounded RAM.

A map of 10^5 keyframes holds ~30 GB of local data (2048 SIFT keypoints a keyframe) and
3.3 GB of global descriptors: neither may be resident on an onboard computer. What a
query needs resident is only what retrieval needs (poses, the FAISS index, intrinsics);
the local data of the few keyframes a query retrieves is read from disk. So:

``store.bin``: one page-aligned block per keyframe (4096-byte boundaries, so that one
keyframe is a contiguous run of whole pages: the kernel reads exactly its pages, and
they can be dropped from the process again). Block layout, little-endian::

    b"RKF3", n (uint32, keypoints), p (uint32, keypoints with a 3D point), 4 reserved bytes
    keypoints     [n, 2] float32   stored-image pixels (OpenCV convention)
    descriptors   [n, 128] uint8   SIFT as extracted (RootSIFT is derived on read)
    point_index   [p] uint32       rows of the keypoints that have a 3D point
    points3d      [p, 3] float32   world metres
    point_source  [p] uint8        1 depth, 2 triangulated (maps.POINT_*)

Compact without loss: descriptors stay uint8 (RootSIFT, 4x larger, is computed on
read and cached), and points are stored only where they exist (83 % of the keypoints of
the RGB-only 7-Scenes map and 85 % of KITTI's have none). The descriptors are 128 of the
~150 bytes a keypoint costs, so on disk this is within -3..+6 % of format 2's dense
arrays (the 4-byte point index and the page padding cost as much on depth maps); what
changes is that nothing of it is resident. Keypoints and points stay float32: float16
has 0.25-0.5 px resolution at 640 px and ~5 mm at 10 m, which would be measurable.

``globals.f32``: the global descriptors [N, D] float32, raw rows (row i = keyframe i),
read at the rows the retrieval re-ranking asks for.

Integrity without hashing gigabytes at load: ``keyframes.npz`` (itself sha256-checked by
the manifest) holds per block and per descriptor row a CRC-32 (zlib), checked when the
block or row is first read (~5 GB/s: 0.06 ms for a 300 KB block); a mismatch raises
MapError. Files only grow by appending (``reloc_ros.map_edit``), so a reader that holds
the mapping of an earlier version keeps reading its own blocks unchanged.

Bounded RAM: both files are memory-mapped read-only (MADV_RANDOM: no read-ahead of
neighbouring keyframes), every read copies the bytes out and then drops the pages from
the process (MADV_DONTNEED: clean file pages stay in the kernel's page cache, which the
kernel may reclaim, but stop counting as this process's resident memory). Decoded
keyframes live in an LRU cache bounded in bytes (``cache_mb``), RootSIFT included.
"""
from __future__ import annotations

import hashlib
import json
import mmap
import os
import threading
import zlib
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, Optional, Tuple

import numpy as np

from reloc_ros.features import root_sift
from reloc_ros.types import RelocError

STORE_FILE = "store.bin"
GLOBALS_FILE = "globals.f32"
PAGE = 4096
BLOCK_MAGIC = b"RKF3"
HEADER_BYTES = 16
# Files covered by per-block / per-row CRCs in keyframes.npz instead of a manifest sha256
# (hashing 30 GB at every load would take minutes).
LAZY_FILES = (STORE_FILE, GLOBALS_FILE)
TABLE_KEYS = ("store_offset", "store_bytes", "store_crc32", "num_keypoints", "num_points", "global_crc32")


class MapError(RelocError):
    """A map directory is missing, corrupt, truncated, from another format version, or empty."""


def _madvise(mm: mmap.mmap, option_name: str, start: int = 0, length: int = 0) -> None:
    opt = getattr(mmap, option_name, None)
    if opt is None or not hasattr(mm, "madvise"):
        return
    if length:  # whole pages covering [start, start + length), within the mapping
        length = min(length + start % PAGE, len(mm) - (start - start % PAGE))
        start -= start % PAGE
    try:
        mm.madvise(opt, start, length) if length else mm.madvise(opt)
    except (OSError, ValueError):  # advice only: a kernel that refuses it changes nothing
        pass


# -- one keyframe's local data ---------------------------------------------------------

@dataclass
class KeyframeData:
    """Decoded local data of one keyframe (what ``store.bin`` holds for it).

    keypoints [n, 2] float32 stored-image pixels; descriptors [n, 128] uint8 SIFT;
    points3d [n, 3] float32 world metres (NaN where none); point_source [n] uint8
    (0 none, 1 depth, 2 triangulated); point_index [p] int64 rows with a point.
    """

    keypoints: np.ndarray
    descriptors: np.ndarray
    points3d: np.ndarray
    point_source: np.ndarray
    point_index: np.ndarray

    def __post_init__(self):
        self._root: Dict[bool, np.ndarray] = {}

    def root(self, points_only: bool) -> np.ndarray:
        d = self._root.get(points_only)
        if d is None:
            desc = self.descriptors[self.point_index] if points_only else self.descriptors
            d = self._root[points_only] = root_sift(desc)
        return d

    @property
    def nbytes(self) -> int:
        arrays = (self.keypoints, self.descriptors, self.points3d, self.point_source, self.point_index,
                  *self._root.values())
        return int(sum(a.nbytes for a in arrays))


def encode_block(keypoints: np.ndarray, descriptors: np.ndarray, points3d: np.ndarray,
                 point_source: np.ndarray) -> bytes:
    """Bytes of one keyframe block (layout in the module docstring), padded to whole pages.

    keypoints [n, 2], descriptors [n, 128] uint8, points3d [n, 3] (NaN = no point),
    point_source [n] uint8. Raises ValueError on inconsistent shapes or dtypes.
    """
    kp = np.ascontiguousarray(keypoints, dtype="<f4")
    n = len(kp)
    desc = np.asarray(descriptors)
    if desc.dtype != np.uint8 or desc.shape != (n, 128) or kp.shape != (n, 2):
        raise ValueError(f"encode_block: keypoints {kp.shape} and uint8 descriptors {desc.shape}/{desc.dtype} "
                         "must be [n, 2] and [n, 128]")
    pts = np.asarray(points3d, dtype=np.float32)
    src = np.asarray(point_source, dtype=np.uint8)
    if pts.shape != (n, 3) or src.shape != (n,):
        raise ValueError(f"encode_block: points3d {pts.shape} / point_source {src.shape} do not match {n} keypoints")
    have = np.flatnonzero(np.all(np.isfinite(pts), axis=1))
    p = len(have)
    parts = [BLOCK_MAGIC, np.array([n, p, 0], "<u4").tobytes(), kp.tobytes(), np.ascontiguousarray(desc).tobytes(),
             have.astype("<u4").tobytes(), np.ascontiguousarray(pts[have], dtype="<f4").tobytes(),
             src[have].tobytes()]
    raw = b"".join(parts)
    return raw + b"\0" * (-len(raw) % PAGE)


def decode_block(buf: bytes, where: str) -> KeyframeData:
    """Inverse of ``encode_block`` (trailing padding ignored); MapError naming ``where``."""
    if len(buf) < HEADER_BYTES or buf[:4] != BLOCK_MAGIC:
        raise MapError(f"{where}: not a keyframe block (bad magic)")
    n, p, _ = np.frombuffer(buf, "<u4", 3, 4)
    n, p = int(n), int(p)
    need = HEADER_BYTES + 136 * n + 17 * p
    if p > n or len(buf) < need:
        raise MapError(f"{where}: block of {len(buf)} bytes cannot hold {n} keypoints and {p} points")
    o = HEADER_BYTES
    kp = np.frombuffer(buf, "<f4", 2 * n, o).reshape(n, 2).astype(np.float32)
    o += 8 * n
    desc = np.frombuffer(buf, np.uint8, 128 * n, o).reshape(n, 128).copy()
    o += 128 * n
    idx = np.frombuffer(buf, "<u4", p, o).astype(np.int64)
    o += 4 * p
    xyz = np.frombuffer(buf, "<f4", 3 * p, o).reshape(p, 3)
    o += 12 * p
    s = np.frombuffer(buf, np.uint8, p, o)
    if p and (idx.max() >= n or np.any(np.diff(idx) <= 0)):
        raise MapError(f"{where}: point rows are not increasing keypoint indices")
    pts = np.full((n, 3), np.nan, np.float32)
    pts[idx] = xyz
    src = np.zeros(n, np.uint8)
    src[idx] = s
    return KeyframeData(kp, desc, pts, src, idx)


# -- writing ---------------------------------------------------------------------------

class StoreWriter:
    """Appends keyframe blocks to ``store.bin`` and rows to ``globals.f32``.

    ``start`` (bytes, rows): where the committed data of an existing map ends; anything
    after it (a crashed edit's leftovers) is cut first. Returns per keyframe the table
    entries ``keyframes.npz`` records (``TABLE_KEYS``).
    """

    def __init__(self, root: Path, dim: int, start: Tuple[int, int] = (0, 0)):
        self.root = Path(root)
        self.dim = int(dim)
        end, rows = start
        self._store = open(self.root / STORE_FILE, "r+b" if end else "wb")
        self._globals = open(self.root / GLOBALS_FILE, "r+b" if rows else "wb")
        self._store.truncate(end)
        self._globals.truncate(rows * self.dim * 4)
        self._store.seek(end)
        self._globals.seek(rows * self.dim * 4)
        self._end = end
        self.table: Dict[str, list] = {k: [] for k in TABLE_KEYS}

    def append(self, keypoints, descriptors, points3d, point_source, global_descriptor) -> None:
        block = encode_block(keypoints, descriptors, points3d, point_source)
        g = np.ascontiguousarray(global_descriptor, dtype="<f4").reshape(-1)
        if len(g) != self.dim:
            raise ValueError(f"global descriptor has {len(g)} values, the map's have {self.dim}")
        self._store.write(block)
        gb = g.tobytes()
        self._globals.write(gb)
        n = len(keypoints)
        t = self.table
        t["store_offset"].append(self._end)
        t["store_bytes"].append(len(block))
        t["store_crc32"].append(zlib.crc32(block))
        t["num_keypoints"].append(n)
        t["num_points"].append(int(np.all(np.isfinite(np.asarray(points3d)), axis=1).sum()) if n else 0)
        t["global_crc32"].append(zlib.crc32(gb))
        self._end += len(block)

    def close(self) -> Dict[str, np.ndarray]:
        for f in (self._store, self._globals):
            f.flush()
            os.fsync(f.fileno())
            f.close()
        return table_arrays(self.table)


def table_arrays(table: Dict[str, Iterable]) -> Dict[str, np.ndarray]:
    dtypes = {"store_offset": np.int64, "store_bytes": np.int64, "store_crc32": np.uint32,
              "num_keypoints": np.int32, "num_points": np.int32, "global_crc32": np.uint32}
    return {k: np.asarray(list(table[k]) if not isinstance(table[k], np.ndarray) else table[k], dtypes[k])
            for k in TABLE_KEYS}


def concat_tables(a: Dict[str, np.ndarray], b: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
    return {k: np.concatenate([a[k], b[k]]).astype(a[k].dtype) for k in TABLE_KEYS}


def committed_end(table: Dict[str, np.ndarray]) -> int:
    """Bytes of ``store.bin`` the table references (where an append starts)."""
    if len(table["store_offset"]) == 0:
        return 0
    return int((table["store_offset"] + table["store_bytes"]).max())


def write_local_data(root: Path, keypoints, descriptors, points3d, point_source, G: np.ndarray
                     ) -> Dict[str, np.ndarray]:
    """Write ``store.bin`` and ``globals.f32`` of a new map from per-keyframe lists
    (shapes as ``encode_block``; G [N, D] float32). Returns the table arrays."""
    w = StoreWriter(root, G.shape[1])
    try:
        for kp, d, p, s, g in zip(keypoints, descriptors, points3d, point_source, G):
            w.append(kp, d, p, s, g)
    finally:
        table = w.close()
    return table


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_manifest(root: Path, manifest: dict, known: Optional[Dict[str, str]] = None,
                   exclude: Iterable[str] = ()) -> None:
    """Record the sha256 of every file under ``root`` except the CRC-covered ``LAZY_FILES``,
    hidden files and ``exclude`` (relative paths about to be deleted), and write
    ``manifest.json`` atomically (temporary file + rename: the commit point of an in-place
    edit). ``known``: digests of files unchanged since (reused, not rehashed)."""
    files = {}
    known = known or {}
    exclude = set(exclude)
    for f in sorted(root.rglob("*")):
        rel = f.relative_to(root)
        if (not f.is_file() or str(rel) in LAZY_FILES or str(rel) in exclude
                or any(p.startswith(".") for p in rel.parts) or f.parent == root and f.name.startswith("manifest")):
            continue
        rel = str(rel)
        files[rel] = known.get(rel) or sha256_file(f)
    manifest["files"] = files
    tmp = root / "manifest.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=1))
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, root / "manifest.json")


# -- reading ---------------------------------------------------------------------------

def _map_file(path: Path, need: int, what: str) -> Optional[mmap.mmap]:
    try:
        size = path.stat().st_size
    except OSError as e:
        raise MapError(f"map file {path} is missing: {e}") from e
    if size < need:
        raise MapError(f"map file {path} is truncated: {size} bytes, the keyframe table needs {need} ({what})")
    if size == 0:
        return None
    with open(path, "rb") as f:
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    _madvise(mm, "MADV_RANDOM")
    return mm


class KeyframeStore:
    """Reads keyframe blocks from a memory-mapped ``store.bin`` through a byte-bounded LRU cache.

    Thread-safe (the node's worker and a reload may overlap). ``cache_mb`` bounds the
    decoded keyframes kept (arrays and derived RootSIFT); the most recent one is always
    kept even if larger.
    """

    def __init__(self, path: Path, table: Dict[str, np.ndarray], cache_mb: float = 256.0):
        self.path = Path(path)
        self.offset = table["store_offset"]
        self.nbytes = table["store_bytes"]
        self.crc = table["store_crc32"]
        self.num_keypoints = table["num_keypoints"]
        self._mm = _map_file(self.path, committed_end(table), f"{len(self.offset)} keyframe blocks")
        self.cache_limit = int(cache_mb * 2 ** 20)
        self._lru: "OrderedDict[int, KeyframeData]" = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.reads = 0  # blocks read from disk (cache misses), for benchmarks

    def __len__(self) -> int:
        return len(self.offset)

    def get(self, i: int) -> KeyframeData:
        i = int(i)
        with self._lock:
            d = self._lru.pop(i, None)
            if d is not None:
                self._lru[i] = d
                return d
        d = self._read(i)
        with self._lock:
            if i not in self._lru:
                self._lru[i] = d
                self._bytes += d.nbytes
            self._evict()
        return d

    def root(self, i: int, points_only: bool) -> np.ndarray:
        """RootSIFT of keyframe i (all rows, or the rows of ``point_index``), cached with it."""
        d = self.get(i)
        if points_only in d._root:
            return d._root[points_only]
        before = d.nbytes
        r = d.root(points_only)
        with self._lock:
            if self._lru.get(int(i)) is d:
                self._bytes += d.nbytes - before
            self._evict()
        return r

    def _evict(self) -> None:
        while self._bytes > self.cache_limit and len(self._lru) > 1:
            _, old = self._lru.popitem(last=False)
            self._bytes -= old.nbytes

    def _read(self, i: int) -> KeyframeData:
        a, n = int(self.offset[i]), int(self.nbytes[i])
        where = f"{self.path} keyframe {i}"
        if n == 0 or self._mm is None:
            raise MapError(f"{where}: empty block")
        buf = self._mm[a:a + n]  # a copy: the mapping's pages can be dropped right after
        _madvise(self._mm, "MADV_DONTNEED", a, n)
        self.reads += 1
        if zlib.crc32(buf) != int(self.crc[i]):
            raise MapError(f"{where}: block checksum mismatch (the map is corrupt, or was changed on disk "
                           "since it was loaded; reload or rebuild it)")
        d = decode_block(buf, where)
        if len(d.keypoints) != int(self.num_keypoints[i]):
            raise MapError(f"{where}: block holds {len(d.keypoints)} keypoints, the table says "
                           f"{int(self.num_keypoints[i])}")
        return d

    @property
    def cached_bytes(self) -> int:
        return self._bytes

    def clear_cache(self) -> None:
        with self._lock:
            self._lru.clear()
            self._bytes = 0


class MappedRows:
    """The global descriptors [N, D] float32 as a read-only array-like over ``globals.f32``.

    ``rows[ids]`` (int, slice or int array) returns a float32 copy; each row's CRC is
    checked the first time it is read, and the pages read are dropped from the process
    again (see the module docstring). ``np.asarray(rows)`` reads everything (tools only).
    """

    ndim = 2
    dtype = np.dtype(np.float32)

    def __init__(self, path: Path, n: int, dim: int, crc: np.ndarray):
        self.path = Path(path)
        self.shape = (int(n), int(dim))
        self.row_bytes = int(dim) * 4
        self.crc = crc
        self._verified = np.zeros(n, bool)
        self._mm = _map_file(self.path, n * self.row_bytes, f"{n} rows of {dim} float32")
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return self.shape[0]

    @property
    def nbytes(self) -> int:
        """Bytes of the rows on disk (not resident)."""
        return self.shape[0] * self.row_bytes

    def __array__(self, dtype=None, copy=None):
        out = self[np.arange(len(self))]
        return out if dtype is None else out.astype(dtype)

    def __getitem__(self, key) -> np.ndarray:
        if isinstance(key, tuple):
            rows = self[key[0]]
            return rows[(slice(None),) + key[1:]] if np.ndim(rows) == 2 else rows[key[1:]]
        if isinstance(key, slice):
            ids = np.arange(len(self))[key]
        else:
            ids = np.asarray(key)
            if ids.dtype == bool:
                ids = np.flatnonzero(ids)
        scalar = ids.ndim == 0
        ids = np.atleast_1d(ids).astype(np.int64)
        n = len(self)
        ids = np.where(ids < 0, ids + n, ids)
        if len(ids) and (ids.min() < 0 or ids.max() >= n):
            raise IndexError(f"global descriptor row out of range 0..{n - 1}")
        out = np.empty((len(ids), self.shape[1]), np.float32)
        rb = self.row_bytes
        with self._lock:
            for j, r in enumerate(ids):
                buf = self._mm[r * rb:(r + 1) * rb]
                if not self._verified[r]:
                    if zlib.crc32(buf) != int(self.crc[r]):
                        raise MapError(f"{self.path}: global descriptor {int(r)} checksum mismatch (corrupt map, "
                                       "or changed on disk since it was loaded; reload or rebuild it)")
                    self._verified[r] = True
                out[j] = np.frombuffer(buf, "<f4")
            if len(ids):
                lo, hi = int(ids.min()) * rb, (int(ids.max()) + 1) * rb
                _madvise(self._mm, "MADV_DONTNEED", lo, hi - lo)
        return out[0] if scalar else out
