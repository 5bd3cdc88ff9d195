"""The keyframe map: a versioned, self-contained directory built from posed images.

Layout of a map directory (format version ``MAP_FORMAT_VERSION``)::

    manifest.json      format version, build parameters, counts, "parts" (the file names
                       of the current keyframes/retrieval/index files: an in-place edit
                       writes new ones and commits by replacing the manifest), per-file
                       sha256 (all files but the two CRC-covered stores below)
    keyframes.npz      names [N] str, T_world_cam [N,4,4], K [N,3,3] (of the stored
                       images), sizes [N,2] (w,h), source_K [N,3,3], source_sizes [N,2];
                       the store table: store_offset [N] int64, store_bytes [N] int64,
                       store_crc32 [N] uint32, num_keypoints [N] int32, num_points [N]
                       int32, global_crc32 [N] uint32 (reloc_ros.map_store);
                       maps built from rig frames (reloc_ros.rig.RigFrame) add
                       camera_ids [N] str (rig camera of each keyframe, '' if unknown)
                       and T_world_base [N,4,4] (body pose of its capture, NaN if unknown)
    store.bin          per keyframe, one page-aligned block: keypoints [n,2] float32
                       (stored-image pixels), descriptors [n,128] uint8 SIFT, and only for
                       the keypoints that have one: their index, 3D point (float32 world
                       metres) and source (1 depth, 2 triangulated). Memory-mapped, read
                       on demand through a bounded LRU cache (reloc_ros.map_store).
    globals.f32        global descriptors [N,D] float32, raw rows, memory-mapped
    retrieval.npz      descriptor state (VLAD vocabulary)
    index.faiss        FAISS index over the global descriptors
    images/NNNNNN.jpg  downscaled keyframe images (learned estimators read them)
    cache/<name>/      optional estimator caches (e.g. Reloc3r keyframe tokens)

All npz files are written and read without pickle. ``KeyframeMap.load`` checks every
documented array (presence, shape, dtype, poses finite and rigid, store table against
the file sizes, index size) and raises MapError naming the file and the key; keyframe
blocks, descriptor rows and images are checked (CRC-32 / sha256) when first read, so
loading costs the same at 10^2 and 10^5 keyframes.

Versions. ``format_version`` is the on-disk contract: a map of another format version
is refused (older: "rebuild it"). ``reloc_ros_version`` (the release that wrote the map)
guards what a release may have changed without a format bump:

- written by a newer major.minor release than the running one: refused. A newer
  release may store data this one would misread at the same format version, and the
  older code cannot know; upgrade reloc_ros or rebuild the map with this one.
- written by a newer patch release: loaded with a warning (patch releases never change
  what a map holds).
- written by an older release: loaded with a warning; the format version is unchanged,
  so the layout is the same, but rebuilding picks up the build improvements since.
- missing or not a version string: refused (every map of this format records it).

Replacement. ``build_map`` builds beside the target and swaps it in atomically
(``renameat2(RENAME_EXCHANGE)`` on Linux, else rename-aside + rename, a microsecond
window without the directory), so a reader never sees half a map. Readers that already
hold a loaded map read keyframe images lazily: ``KeyframeMap.image`` checks each file's
sha256 against the manifest it loaded and raises MapError ("map changed on disk since it
was loaded; reload it") instead of returning another map's image for the same index.
"""
from __future__ import annotations

import ctypes
import dataclasses
import datetime
import errno
import hashlib
import json
import logging
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import cv2
import numpy as np

from reloc_ros import __version__
from reloc_ros.config import to_dict
from reloc_ros.features import FeatureConfig, Features, match_descriptors, match_descriptors_both
from reloc_ros.geometry import check_pose, invert
from reloc_ros.map_store import (GLOBALS_FILE, HEADER_BYTES, PAGE, STORE_FILE, TABLE_KEYS, KeyframeStore,  # noqa: F401
                                 MapError, MappedRows, sha256_file, write_local_data, write_manifest)
from reloc_ros.retrieval import RetrievalConfig, RetrievalIndex, create_descriptor
from reloc_ros.refine import RefineConfig
from reloc_ros.types import Camera, InvalidInputError, PosedFrame

log = logging.getLogger("reloc_ros.maps")

# 2: keypoints without OpenCV SIFT's +0.25 px upscaling offset (features.SiftExtractor);
# a version-1 map's keypoints and depth/triangulated points carry it, and queries no longer
# do, so version-1 maps are refused with "rebuild it".
# 3: local data in the page-aligned, memory-mapped store.bin and global descriptors in
# globals.f32 (reloc_ros.map_store) instead of features.npz / retrieval.npz, which had to
# be loaded whole; version-2 maps convert losslessly (`reloc-map convert`).
MAP_FORMAT_VERSION = 3
CONVERTIBLE_VERSIONS = (2,)
PARTS = {"keyframes": "keyframes.npz", "retrieval": "retrieval.npz", "index": "index.faiss"}
MANIFEST = "manifest.json"

POINT_NONE, POINT_DEPTH, POINT_TRIANGULATED = 0, 1, 2


@dataclass
class TriangulationConfig:
    """Options for 3D points triangulated from the known keyframe poses.

    neighbors: keyframes matched with each keyframe (closest in pose with overlapping view).
    candidates: the neighbours are spread over the distance ranks of this many nearest
        keyframes that look the same way (bounds the neighbourhood in large maps).
    max_view_angle_deg: neighbours must look within this angle of the keyframe's axis.
    max_epipolar_px: Sampson distance (pixels) under the known poses for a match to count.
    max_reproj_px: reprojection error (pixels) in every view of an accepted point.
    min_angle_deg: smallest triangulation angle (over view pairs) of an accepted point.
    """

    neighbors: int = 10
    candidates: int = 64
    max_view_angle_deg: float = 60.0
    max_epipolar_px: float = 2.0
    max_reproj_px: float = 2.0
    min_angle_deg: float = 2.0


@dataclass
class MapBuildConfig:
    """Options of ``build_map`` (recorded in the manifest).

    use_depth: take 3D points from depth where the dataset has it (else triangulate).
    triangulate: triangulate keypoints that have no depth point from the known poses.
    image_max_size: long side (pixels) of the stored keyframe images.
    max_depth_m / min_depth_m: valid depth range.
    depth_edge_ratio: reject depth at discontinuities (3x3 max/min ratio above this).
    workers: processes that extract and triangulate (0 = every available core, 1 = in
        this process); with ``ray_address``, Ray tasks at a time (0 = every cluster CPU).
        The map is the same whatever the count (reloc_ros.map_build).
    ray_address: '' = no Ray; 'local' = start a local Ray instance; else the address of a
        Ray cluster ("auto", "ray://head:10001") that extraction and triangulation run on.
    refine: bundle-adjust the keyframe poses against the images before triangulating
        (``reloc_ros.refine``: multi-view tracks, robust loss, pose priors that hold the
        gauge and metric scale); the map stores the refined poses and the manifest the
        report (how far poses moved). Off by default: it pays when the poses come from a
        SLAM system that is a little inconsistent with the images and the map is RGB-only
        (7-Scenes RGB-only: recall 0.14 -> 0.30), and costs where the queries are judged
        against the same source as the map poses (KITTI's GNSS/INS: 0.66 -> 1.26 cm;
        7-Scenes with its depth, whose poses came from that depth: 8.7 -> 12.7 cm, and the
        build warns). docs/RESULTS.md.
    refinement: options of that refinement (its ``features`` are the map's).
    """

    features: FeatureConfig = field(default_factory=FeatureConfig)
    retrieval: RetrievalConfig = field(default_factory=RetrievalConfig)
    triangulation: TriangulationConfig = field(default_factory=TriangulationConfig)
    use_depth: bool = True
    triangulate: bool = True
    image_max_size: int = 640
    min_depth_m: float = 0.1
    max_depth_m: float = 20.0
    depth_edge_ratio: float = 1.05
    workers: int = 0
    ray_address: str = ""
    refine: bool = False
    refinement: RefineConfig = field(default_factory=RefineConfig)

    def validate(self) -> None:
        self.features.validate()
        self.retrieval.validate()
        if self.refine:
            self.refinement.validate()
        if self.image_max_size < 64:
            raise ValueError("image_max_size must be >= 64")
        if self.workers < 0:
            raise ValueError(f"workers must be >= 0 (0 = every core), got {self.workers}")
        tc = self.triangulation
        if not 1 <= tc.neighbors <= tc.candidates:
            raise ValueError(f"triangulation needs 1 <= neighbors <= candidates, got {tc.neighbors} and "
                             f"{tc.candidates}")


def _load_npz(path: Path) -> Dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except Exception as e:  # zipfile.BadZipFile, ValueError, OSError on truncation
        raise MapError(f"cannot read {path.name}: {e}") from e


def _release(version: object) -> Optional[Tuple[int, int, int]]:
    """(major, minor, patch) of a version string such as "0.1.0" or "1.2.dev3"; None if none."""
    m = re.match(r"^\s*(\d+)\.(\d+)(?:\.(\d+))?", version) if isinstance(version, str) else None
    return (int(m.group(1)), int(m.group(2)), int(m.group(3) or 0)) if m else None


def _check_release(path: Path, manifest: dict) -> None:
    """Apply the reloc_ros_version policy of the module docstring; MapError or a warning."""
    written = manifest.get("reloc_ros_version")
    theirs, ours = _release(written), _release(__version__)
    if theirs is None:
        raise MapError(f"map {path}: {MANIFEST} has no valid 'reloc_ros_version' (got {written!r}); "
                       "rebuild it with `reloc-map build`")
    if ours is None or theirs == ours:
        return
    if theirs[:2] > ours[:2]:
        raise MapError(
            f"map {path} was written by reloc_ros {written}, newer than this reloc_ros {__version__}: a newer "
            "release may store data this one misreads even at the same format version; upgrade reloc_ros or "
            "rebuild the map with this version (`reloc-map build`)"
        )
    if theirs > ours:
        log.warning("map %s was written by reloc_ros %s, a newer patch release than this %s; loading it",
                    path, written, __version__)
    else:
        log.warning("map %s was written by an older reloc_ros %s (this is %s); format version %d is unchanged so "
                    "it loads, rebuild it to get the build improvements since", path, written, __version__,
                    MAP_FORMAT_VERSION)


def _array(path: Path, fname: str, arrays: Dict[str, np.ndarray], key: str, shape: Sequence,
           dims: Dict[str, int], kinds: str, what: str) -> np.ndarray:
    """``arrays[key]`` checked for presence, shape and dtype kind; raises MapError naming file and key.

    shape: ints (fixed) and names (``"N"``): a name already in ``dims`` must match, a new
    one is bound to the array's size. kinds: allowed numpy dtype kinds; what: their name.
    """
    if key not in arrays:
        raise MapError(f"map {path}: {fname} has no array '{key}' (truncated, or not written by reloc-map "
                       "build); rebuild it with `reloc-map build`")
    a = arrays[key]
    ok = a.ndim == len(shape)
    bound: Dict[str, int] = {}
    if ok:
        for s, n in zip(shape, a.shape):
            if isinstance(s, int):
                ok = ok and n == s
            elif s in dims or s in bound:
                ok = ok and n == dims.get(s, bound.get(s))
            else:
                bound[s] = n
    if not ok:
        want = ", ".join(str(s) for s in shape)
        known = ", ".join(f"{k}={v}" for k, v in dims.items() if k in shape)
        raise MapError(f"map {path}: {fname}['{key}'] has shape {list(a.shape)}, expected [{want}]"
                       + (f" with {known}" if known else ""))
    if a.dtype.kind not in kinds:
        raise MapError(f"map {path}: {fname}['{key}'] has dtype {a.dtype}, expected {what}")
    dims.update(bound)
    return a


def _check_arrays(path: Path, kf: Dict[str, np.ndarray], manifest: dict, files: Dict[str, str],
                  K_: str = "keyframes.npz") -> Dict[str, int]:
    """Cross-check the resident arrays of a map against the layout; returns the sizes {N, D}.

    Raises MapError naming the file and key of the first inconsistency, so a corrupt or
    hand-edited map fails at load time instead of as an IndexError mid-query. The store
    table is checked against the layout here and against the file sizes when mapped.
    """
    dims: Dict[str, int] = {}
    names = _array(path, K_, kf, "names", ["N"], dims, "US", "strings")
    n = dims["N"]
    if n == 0:
        raise MapError(f"map {path} has no keyframes")
    T = _array(path, K_, kf, "T_world_cam", ["N", 4, 4], dims, "f", "float")
    K = _array(path, K_, kf, "K", ["N", 3, 3], dims, "f", "float")
    sizes = _array(path, K_, kf, "sizes", ["N", 2], dims, "iu", "integers")
    if "camera_ids" in kf:  # rig maps: optional, informative (keyframe ownership and body pose)
        _array(path, K_, kf, "camera_ids", ["N"], dims, "US", "strings")
    if "T_world_base" in kf:
        _array(path, K_, kf, "T_world_base", ["N", 4, 4], dims, "f", "float")
    for key, shape, kinds in (("source_K", ["N", 3, 3], "f"), ("source_sizes", ["N", 2], "iu")):
        if key in kf:  # metadata (original resolution), not used by the localizer
            _array(path, K_, kf, key, shape, dims, kinds, "float" if kinds == "f" else "integers")
    # Poses: finite and rigid (orthonormal R with det +1, last row 0 0 0 1), vectorised.
    Tf = T.astype(np.float64)
    R = Tf[:, :3, :3]
    finite = np.all(np.isfinite(Tf.reshape(n, -1)), axis=1)
    with np.errstate(invalid="ignore"):
        orth = np.all(np.abs(np.einsum("nji,njk->nik", R, R) - np.eye(3)) < 1e-3, axis=(1, 2))
        det = np.abs(np.linalg.det(np.where(finite[:, None, None], R, np.eye(3))) - 1.0) < 1e-3
        last = np.all(np.abs(Tf[:, 3] - [0, 0, 0, 1]) < 1e-3, axis=1)
    bad = np.nonzero(~(finite & orth & det & last))[0]
    if len(bad):
        i = int(bad[0])
        raise MapError(f"map {path}: {K_}['T_world_cam'][{i}] (keyframe {names[i]!s}) is not a finite rigid "
                       f"transform ({len(bad)} such poses): {np.array2string(Tf[i], precision=4)}")
    bad = np.nonzero(~(np.all(np.isfinite(K.reshape(n, -1)), axis=1) & (K[:, 0, 0] > 0) & (K[:, 1, 1] > 0)))[0]
    if len(bad):
        raise MapError(f"map {path}: {K_}['K'][{int(bad[0])}] is not a valid intrinsics matrix: {K[bad[0]].tolist()}")
    if np.any(sizes <= 0):
        raise MapError(f"map {path}: {K_}['sizes'] has non-positive image sizes")

    tab = {k: _array(path, K_, kf, k, ["N"], dims, "iu", "integers") for k in TABLE_KEYS}
    off, nb, nkp, npt = tab["store_offset"], tab["store_bytes"], tab["num_keypoints"], tab["num_points"]
    if np.any(off < 0) or np.any(off % PAGE):
        raise MapError(f"map {path}: {K_}['store_offset'] must be non-negative multiples of {PAGE} (page-aligned)")
    if np.any(nkp < 0) or np.any(npt < 0) or np.any(npt > nkp):
        raise MapError(f"map {path}: {K_}['num_points'] must lie in 0..num_keypoints")
    if np.any(nb < HEADER_BYTES + 136 * nkp.astype(np.int64) + 17 * npt.astype(np.int64)):
        raise MapError(f"map {path}: {K_}['store_bytes'] is too small for the keypoints it should hold")
    order = np.argsort(off, kind="stable")
    if np.any(off[order][1:] < (off + nb)[order][:-1]):
        raise MapError(f"map {path}: {K_} store blocks overlap")

    D = manifest.get("global_dim")
    if not isinstance(D, int) or D <= 0:
        raise MapError(f"map {path}: {MANIFEST} has no valid 'global_dim' (got {D!r}); rebuild it with `reloc-map build`")
    dims["D"] = D
    missing = [f"images/{i:06d}.jpg" for i in range(n) if f"images/{i:06d}.jpg" not in files]
    if missing:
        raise MapError(f"map {path}: {MANIFEST} lists no checksum for keyframe image {missing[0]} "
                       f"({len(missing)} missing)")
    return dims


class KeyframeMap:
    """A loaded keyframe map (read-only). See the module docstring for the layout.

    Resident: poses, intrinsics, names, the store table, the FAISS index (an IVF-PQ at
    10^5 keyframes holds ~72 B a keyframe) and the descriptor state. Read on demand:
    keyframe local data (``features``, ``points3d``, ...; LRU-cached up to ``cache_mb``),
    global descriptor rows (``global_descriptors[ids]``) and images.
    """

    DEFAULT_CACHE_MB = 256.0

    def __init__(self, path: Path, manifest: dict, kf: Dict[str, np.ndarray], retrieval: Dict[str, np.ndarray],
                 index: RetrievalIndex, store: KeyframeStore, global_descriptors: MappedRows):
        self.path = Path(path)
        self.manifest = manifest
        self.names: List[str] = [str(n) for n in kf["names"]]
        self.T_world_cam: np.ndarray = kf["T_world_cam"].astype(np.float64)
        self.cameras: List[Camera] = [Camera(K, int(s[0]), int(s[1])) for K, s in zip(kf["K"], kf["sizes"])]
        # Rig maps only (else None): the rig camera that took each keyframe ('' unknown)
        # and the body pose [N, 4, 4] of its capture (NaN unknown).
        self.camera_ids: Optional[List[str]] = [str(c) for c in kf["camera_ids"]] if "camera_ids" in kf else None
        self.T_world_base: Optional[np.ndarray] = (kf["T_world_base"].astype(np.float64)
                                                   if "T_world_base" in kf else None)
        self.keyframe_arrays = kf  # as loaded (what map_edit copies forward)
        self.store = store
        self.num_keypoints: np.ndarray = kf["num_keypoints"]
        self.global_descriptors = global_descriptors  # [N, D] float32 rows, memory-mapped
        self.descriptor_state = dict(retrieval)
        self.index = index

    # -- loading ---------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | Path, verify: bool = True, use_gpu: bool = True,
             cache_mb: Optional[float] = None) -> "KeyframeMap":
        """Load and check a map directory; raises MapError with the reason.

        verify: sha256 of the small files (keyframe table, vocabulary, index, estimator
        caches) against the manifest, and presence of every keyframe image; blocks, rows
        and images are checked when read whatever this says. cache_mb: bound of the LRU
        cache of decoded keyframes (default ``DEFAULT_CACHE_MB``).
        """
        path = Path(path)
        if not path.is_dir():
            raise MapError(f"map directory {path} does not exist")
        mpath = path / MANIFEST
        if not mpath.is_file():
            raise MapError(f"{path} is not a reloc_ros map (no {MANIFEST})")
        try:
            manifest = json.loads(mpath.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise MapError(f"{mpath} is corrupt: {e}") from e
        version = manifest.get("format_version")
        if version != MAP_FORMAT_VERSION:
            older = isinstance(version, int) and version < MAP_FORMAT_VERSION
            how = ""
            if older:
                how = "; rebuild it with `reloc-map build`"
                if version in CONVERTIBLE_VERSIONS:
                    how += f" or convert it (lossless, no recomputation) with `reloc-map convert {path} NEW_DIR`"
            raise MapError(f"map {path} has format version {version!r}, this reloc_ros reads version "
                           f"{MAP_FORMAT_VERSION}" + how)
        files = manifest.get("files", {})
        parts = {**PARTS, **manifest.get("parts", {})}
        for name in parts.values():
            if name not in files:
                raise MapError(f"manifest of {path} lists no {name}")
        if verify:
            for name, digest in files.items():
                if name.startswith("images/"):
                    continue  # sha256-checked by image() when read; presence below
                f = path / name
                if not f.is_file():
                    raise MapError(f"map file {f} is missing")
                if sha256_file(f) != digest:
                    raise MapError(f"map file {f} is corrupt or truncated (checksum mismatch)")
            try:
                present = set(os.listdir(path / "images"))
            except OSError:
                present = set()
            lost = [n for n in files if n.startswith("images/") and n[7:] not in present]
            if lost:
                raise MapError(f"map file {path / lost[0]} is missing ({len(lost)} keyframe images missing)")
        _check_release(path, manifest)
        kf = _load_npz(path / parts["keyframes"])
        retr = _load_npz(path / parts["retrieval"])
        dims = _check_arrays(path, kf, manifest, files, parts["keyframes"])
        table = {k: kf[k] for k in TABLE_KEYS}
        store = KeyframeStore(path / STORE_FILE, table, cls.DEFAULT_CACHE_MB if cache_mb is None else cache_mb)
        G = MappedRows(path / GLOBALS_FILE, dims["N"], dims["D"], kf["global_crc32"])
        try:
            index = RetrievalIndex.load(path / parts["index"], use_gpu=use_gpu)
        except Exception as e:
            raise MapError(f"cannot read FAISS index of {path}: {e}") from e
        if len(index) != dims["N"]:
            raise MapError(f"map {path}: {parts['index']} has {len(index)} entries for {dims['N']} keyframes")
        if int(index.index.d) != dims["D"]:
            raise MapError(f"map {path}: {parts['index']} has dimension {index.index.d}, "
                           f"{MANIFEST}['global_dim'] is {dims['D']}")
        index.attach_vectors(G)  # exact re-ranking of an approximate index, rows read on demand
        return cls(path, manifest, kf, retr, index, store, G)

    # -- access ----------------------------------------------------------------------
    @property
    def num_keyframes(self) -> int:
        return len(self.names)

    def _check_id(self, i) -> int:
        i = int(i)
        if not 0 <= i < self.num_keyframes:
            raise MapError(f"keyframe {i} out of range 0..{self.num_keyframes - 1} of map {self.path}")
        return i

    def keyframe(self, i: int):
        """Keyframe i's decoded local data (``map_store.KeyframeData``), from the LRU cache."""
        return self.store.get(self._check_id(i))

    def features(self, i: int) -> Features:
        d = self.keyframe(i)
        return Features(d.keypoints, d.descriptors)

    def root_descriptors(self, i: int, with_points_only: bool = False) -> np.ndarray:
        """RootSIFT [Ni, 128] float32 of keyframe i (LRU-cached with its keyframe); with_points_only
        keeps the rows of ``point_index(i)`` (keypoints that have a 3D point), for 2D-3D matching."""
        return self.store.root(self._check_id(i), bool(with_points_only))

    def point_index(self, i: int) -> np.ndarray:
        """Indices (into keyframe i's keypoints) of the keypoints with a 3D point."""
        return self.keyframe(i).point_index

    def points3d(self, i: int) -> np.ndarray:
        """[Ni, 3] world points (metres) of keyframe i's keypoints, NaN where unknown."""
        return self.keyframe(i).points3d

    def point_sources(self, i: int) -> np.ndarray:
        """[Ni] uint8 source of keyframe i's points (POINT_NONE / POINT_DEPTH / POINT_TRIANGULATED)."""
        return self.keyframe(i).point_source

    def image(self, i: int) -> np.ndarray:
        """Stored keyframe image [H, W, 3] uint8 RGB (intrinsics: ``cameras[i]``).

        Read lazily, so the bytes are checked against the sha256 of the manifest this map
        was loaded with (~0.1 ms for a JPEG of tens of KB): a map rebuilt into the same
        directory since raises MapError instead of yielding another map's keyframe.
        """
        i = self._check_id(i)
        rel = f"images/{i:06d}.jpg"
        f = self.path / rel
        try:
            data = f.read_bytes()
        except OSError as e:
            raise MapError(f"cannot read keyframe image {f}: {e}; if the map was rebuilt or moved, reload it") from e
        if hashlib.sha256(data).hexdigest() != self.manifest.get("files", {}).get(rel):
            raise MapError(f"map {self.path} changed on disk since it was loaded; reload it "
                           f"({rel} differs from the manifest loaded)")
        bgr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
        cam = self.cameras[i]
        if bgr is None or bgr.shape[:2] != (cam.height, cam.width):
            raise MapError(f"keyframe image {f} cannot be decoded as a {cam.width}x{cam.height} image")
        return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)

    def cache_dir(self, name: str) -> Path:
        return self.path / "cache" / name

    def memory_bytes(self) -> int:
        """Bytes this map holds in RAM: the resident arrays (poses, intrinsics, table), the
        LRU cache of decoded keyframes as it is now (at most ``cache_mb``) and the index.
        The memory-mapped store and descriptor rows are not counted (read on demand)."""
        arrs = [self.T_world_cam, *self.keyframe_arrays.values(), *self.descriptor_state.values()]
        n = sum(a.nbytes for a in arrs) + sum(c.K.nbytes + 64 for c in self.cameras)
        n += self.store.cached_bytes
        return int(n + self.index.memory_bytes())


# -- building ------------------------------------------------------------------------

def _registered_depth(frame: PosedFrame, cfg: MapBuildConfig) -> Optional[np.ndarray]:
    """Depth [H, W] metres in the colour camera's pixels (0 = none), from any depth camera."""
    depth = frame.depth
    if depth is None:
        return None
    depth = np.asarray(depth, np.float32)
    dcam = frame.depth_camera or frame.camera
    T_cd = np.eye(4) if frame.T_cam_depth is None else np.asarray(frame.T_cam_depth, np.float64)
    h, w = frame.camera.height, frame.camera.width
    same_geometry = (np.allclose(T_cd, np.eye(4)) and np.allclose(dcam.K, frame.camera.K)
                     and depth.shape == (h, w))
    if same_geometry:
        out = depth.copy()
    else:
        v, u = np.nonzero(np.isfinite(depth) & (depth > 0))
        z = depth[v, u].astype(np.float64)
        Kd, K = dcam.K, frame.camera.K
        x, y = (u - Kd[0, 2]) / Kd[0, 0] * z, (v - Kd[1, 2]) / Kd[1, 1] * z
        # one coordinate at a time: no [N, 3] temporaries
        R, t = T_cd[:3, :3], T_cd[:3, 3]
        zc = R[2, 0] * x + R[2, 1] * y + R[2, 2] * z + t[2]
        ok = zc > 1e-6
        x, y, z, zc = x[ok], y[ok], z[ok], zc[ok]
        uc = np.round(K[0, 0] * (R[0, 0] * x + R[0, 1] * y + R[0, 2] * z + t[0]) / zc + K[0, 2]).astype(np.int64)
        vc = np.round(K[1, 1] * (R[1, 0] * x + R[1, 1] * y + R[1, 2] * z + t[1]) / zc + K[1, 2]).astype(np.int64)
        inside = (uc >= 0) & (uc < w) & (vc >= 0) & (vc < h)
        out = np.full(h * w, np.inf, np.float32)
        np.minimum.at(out, vc[inside] * w + uc[inside], zc[inside].astype(np.float32))  # z-buffer: nearest wins
        out = out.reshape(h, w)
        out[~np.isfinite(out)] = 0
    out[~np.isfinite(out)] = 0
    out[(out < cfg.min_depth_m) | (out > cfg.max_depth_m)] = 0
    return out


def _depth_points(frame: PosedFrame, kps: np.ndarray, cfg: MapBuildConfig) -> np.ndarray:
    """World points [N, 3] for keypoints [N, 2] (colour pixels) from depth; NaN where invalid."""
    out = np.full((len(kps), 3), np.nan, np.float32)
    depth = _registered_depth(frame, cfg)
    if depth is None or len(kps) == 0:
        return out
    h, w = depth.shape
    # Nearest valid depth in a 3x3 window, rejected at discontinuities, where a keypoint's
    # depth is ambiguous between foreground and background.
    big = np.where(depth > 0, depth, np.inf)
    dmin = cv2.erode(big, np.ones((3, 3), np.uint8), borderType=cv2.BORDER_REPLICATE)
    dmax = cv2.dilate(depth, np.ones((3, 3), np.uint8), borderType=cv2.BORDER_REPLICATE)
    u = np.clip(np.round(kps[:, 0]).astype(int), 0, w - 1)
    v = np.clip(np.round(kps[:, 1]).astype(int), 0, h - 1)
    z = depth[v, u]
    lo, hi = dmin[v, u], dmax[v, u]
    ok = (z > 0) & np.isfinite(lo) & (hi <= lo * cfg.depth_edge_ratio)
    K = frame.camera.K
    xn = (kps[:, 0] - K[0, 2]) / K[0, 0]
    yn = (kps[:, 1] - K[1, 2]) / K[1, 1]
    Xc = np.stack([xn * z, yn * z, z], axis=1)
    T = frame.T_world_cam
    Xw = Xc @ T[:3, :3].T + T[:3, 3]
    out[ok] = Xw[ok]
    return out


def _select_neighbors(T: np.ndarray, i: int, cfg: TriangulationConfig, tree=None) -> np.ndarray:
    """Keyframes to triangulate keyframe i's points with: looking the same way, spread in baseline.

    Nearest keyframes alone give tiny triangulation angles (depth error grows as
    1/angle), so the candidates are sampled evenly over their distance ranks: a few
    near ones for matching robustness, the rest wide-baseline for accuracy. Candidates
    are the ``cfg.candidates`` nearest keyframes that look the same way, not every one:
    over a building or a city, ranks spread over all keyframes would pick neighbours
    that see nothing of keyframe i. T: [N, 4, 4] T_world_cam; tree: a
    ``scipy.spatial.cKDTree`` over the camera centres, so large maps are not scanned
    whole for every keyframe.
    """
    c = T[:, :3, 3]
    z = T[:, :3, 2]
    idx = np.arange(len(T))
    if tree is not None and len(T) > 2 * cfg.candidates:
        k = 4 * cfg.candidates
        while True:  # widen the query until enough candidates look the same way
            idx = np.sort(np.asarray(tree.query(c[i], k=min(k, len(T)))[1]))
            looking = np.degrees(np.arccos(np.clip(z[idx] @ z[i], -1, 1))) < cfg.max_view_angle_deg
            if looking.sum() > cfg.candidates or k >= len(T):
                break
            k *= 4
    ang = np.degrees(np.arccos(np.clip(z[idx] @ z[i], -1, 1)))
    dist = np.linalg.norm(c[idx] - c[i], axis=1)
    keep = (ang < cfg.max_view_angle_deg) & (idx != i)
    cand, dist = idx[keep], dist[keep]
    if len(cand) <= cfg.neighbors:
        return cand
    order = np.argsort(dist, kind="stable")[:cfg.candidates]
    cand = cand[order]
    pick = np.unique(np.round(np.linspace(0, len(cand) - 1, cfg.neighbors)).astype(int))
    return cand[pick]


def neighbor_tree(T: np.ndarray, cfg: TriangulationConfig):
    """A k-d tree over the camera centres of T [N, 4, 4] for ``_select_neighbors``, or None
    when the map is small enough to scan."""
    if len(T) <= 2 * cfg.candidates:
        return None
    from scipy.spatial import cKDTree

    return cKDTree(T[:, :3, 3])


def _fundamental(K1, T_w1, K2, T_w2) -> np.ndarray:
    """F with x2^T F x1 = 0 for pixels of camera 1 and 2 (camera-to-world poses)."""
    T21 = invert(T_w2) @ T_w1
    R, t = T21[:3, :3], T21[:3, 3]
    tx = np.array([[0, -t[2], t[1]], [t[2], 0, -t[0]], [-t[1], t[0], 0]])
    return np.linalg.inv(K2).T @ tx @ R @ np.linalg.inv(K1)


def _sampson(F, x1, x2) -> np.ndarray:
    h1 = np.concatenate([x1, np.ones((len(x1), 1))], 1)
    h2 = np.concatenate([x2, np.ones((len(x2), 1))], 1)
    Fx1 = h1 @ F.T
    Ftx2 = h2 @ F
    num = np.sum(h2 * Fx1, axis=1) ** 2
    den = Fx1[:, 0] ** 2 + Fx1[:, 1] ** 2 + Ftx2[:, 0] ** 2 + Ftx2[:, 1] ** 2
    return np.sqrt(num / np.maximum(den, 1e-12))


class PairMatcher:
    """Matches of keyframe pairs for triangulation, each unordered pair matched once where possible.

    roots: RootSIFT [Ni, 128] per keyframe id; need: keyframe id -> bool [Ni], the
    keypoints that need a point (only those are matched); wanted: every directed pair
    (i, j) that will be asked for; cache: the caller's feature cache, read and filled
    with full-row matches keyed ("matches", name_i, name_j).

    Both directions of a pair come from one GEMM (``match_descriptors_both``) when both
    are wanted and most keypoints of both need a point (RGB-only maps); otherwise one
    direction is matched on the needed rows only (maps with depth: a fraction of the
    GEMM). Results equal ``match_descriptors`` of each pair filtered to the needed rows.
    """

    def __init__(self, roots, need: Dict[int, np.ndarray], cfg: MapBuildConfig, names,
                 wanted: Iterable[Tuple[int, int]], cache: Optional[dict] = None):
        self.roots, self.need, self.cfg, self.names, self.cache = roots, need, cfg, names, cache
        self.wanted = set(wanted)
        self._reverse: Dict[Tuple[int, int], np.ndarray] = {}  # full rows, computed with (j, i)
        self._done: set = set()

    def __call__(self, i: int, js: Iterable[int]) -> Dict[int, np.ndarray]:
        """Neighbour j -> matches [K, 2] (index in i, index in j) of i's needed keypoints."""
        return {int(j): self._pair(i, int(j)) for j in js}

    def _pair(self, i: int, j: int) -> np.ndarray:
        fc, need, key = self.cfg.features, self.need, ("matches", self.names[i], self.names[j])
        self._done.add((i, j))
        m = self._reverse.pop((i, j), None)
        if m is None and self.cache is not None:
            m = self.cache.get(key)
        if m is None:
            share = need[i].mean() + (need[j].mean() if j in need else 0.0) if len(need[i]) else 0.0
            if fc.mutual and (j, i) in self.wanted and (j, i) not in self._done and share > 1.0:
                m, back = match_descriptors_both(self.roots[i], self.roots[j], fc.ratio)
                self._reverse[(j, i)] = back
                if self.cache is not None:
                    self.cache[("matches", self.names[j], self.names[i])] = back
            elif not need[i].all():
                return match_descriptors(self.roots[i], self.roots[j], fc.ratio, fc.mutual,
                                         rows=np.nonzero(need[i])[0])
            else:
                m = match_descriptors(self.roots[i], self.roots[j], fc.ratio, fc.mutual)
            if self.cache is not None:
                self.cache[key] = m
        return m[need[i][m[:, 0]]] if len(m) else m


def _triangulate_keyframe(i: int, kps: List[np.ndarray], roots: List[np.ndarray], T: np.ndarray,
                          Ks: List[np.ndarray], cfg: MapBuildConfig, names: List[str],
                          cache: Optional[dict] = None, nbrs: Optional[np.ndarray] = None,
                          matches: Optional[Dict[int, np.ndarray]] = None) -> np.ndarray:
    """Multi-view DLT of keyframe i's keypoints from matches in its neighbours; [Ni, 3] (NaN = none).

    kps / roots / T / Ks / names are indexed by keyframe id (lists over the map, or dicts
    holding i and its neighbours); nbrs: ``_select_neighbors`` over all poses, computed
    here when None (T must then be the [N, 4, 4] array of every keyframe). matches:
    neighbour j -> matches of i to j (``PairMatcher``; only these keypoints of i
    are triangulated), else every pair is matched here (read from and added to ``cache``).
    """
    tc = cfg.triangulation
    n = len(kps[i])
    out = np.full((n, 3), np.nan, np.float32)
    if n == 0:
        return out
    if nbrs is None:
        nbrs = _select_neighbors(T, i, tc)
    P = {j: Ks[j] @ invert(T[j])[:3, :] for j in [i, *nbrs]}
    obs: List[List[tuple]] = [[] for _ in range(n)]
    for j in nbrs:
        key = ("matches", names[i], names[j])
        m = matches[j] if matches is not None else cache.get(key) if cache is not None else None
        if m is None:
            m = match_descriptors(roots[i], roots[j], cfg.features.ratio, cfg.features.mutual)
            if cache is not None:
                cache[key] = m
        if len(m) == 0:
            continue
        F = _fundamental(Ks[i], T[i], Ks[j], T[j])
        d = _sampson(F, kps[i][m[:, 0]], kps[j][m[:, 1]])
        for a, b in m[d < tc.max_epipolar_px]:
            obs[a].append((j, kps[j][b]))
    idx = np.array([a for a in range(n) if obs[a]], np.int64)
    if len(idx) == 0:
        return out
    V = 1 + max(len(obs[a]) for a in idx)
    # Views per point, padded: a padded view has an all-zero P (adds zero rows to DLT).
    Ps = np.zeros((len(idx), V, 3, 4))
    xs = np.zeros((len(idx), V, 2))
    valid = np.zeros((len(idx), V), bool)
    for r, a in enumerate(idx):
        Ps[r, 0], xs[r, 0], valid[r, 0] = P[i], kps[i][a], True
        for v, (j, x) in enumerate(obs[a], start=1):
            Ps[r, v], xs[r, v], valid[r, v] = P[j], x, True
    for _ in range(3):  # triangulate, drop views with large reprojection error, repeat
        X = _triangulate(Ps, xs, valid)
        err = _reproj(Ps, X, xs)
        bad = valid & (err > tc.max_reproj_px)
        bad[:, 0] = False  # the keyframe's own observation anchors the point
        if not bad.any():
            break
        valid &= ~bad
    X = _triangulate(Ps, xs, valid)
    err = np.where(valid, _reproj(Ps, X, xs), 0)
    depth_ok = np.all(~valid | (_depths(Ps, X) > 0), axis=1)
    # largest angle between the rays of any two valid views
    centres = np.zeros((len(idx), V, 3))
    for r, a in enumerate(idx):
        centres[r, 0] = T[i][:3, 3]
        for v, (j, _) in enumerate(obs[a], start=1):
            centres[r, v] = T[j][:3, 3]
    rays = X[:, None, :] - centres
    rays /= np.maximum(np.linalg.norm(rays, axis=2, keepdims=True), 1e-12)
    cosm = np.einsum("pvd,pwd->pvw", rays, rays)
    cosm = np.where(valid[:, :, None] & valid[:, None, :], cosm, 1.0)
    max_angle = np.degrees(np.arccos(np.clip(cosm.min(axis=(1, 2)), -1, 1)))
    ok = (valid.sum(1) >= 2) & depth_ok & np.all(err <= tc.max_reproj_px, axis=1) & (max_angle >= tc.min_angle_deg)
    out[idx[ok]] = X[ok]
    return out


def _triangulate(Ps: np.ndarray, xs: np.ndarray, valid: np.ndarray, iterations: int = 5) -> np.ndarray:
    """Points [N, 3] that minimise the squared reprojection error (pixels) over their valid views.

    Ps [N, V, 3, 4] projection matrices, xs [N, V, 2] pixels, valid [N, V]. The DLT alone
    minimises an algebraic error that weighs each view by the point's depth in it and by
    the norm of its P rows, which grows with the camera's distance from the world origin:
    its points depend on where the world frame is. Gauss-Newton from the DLT gives the
    maximum-likelihood point under equal pixel noise, the same in any world frame (COLMAP
    refines its triangulated points so, by bundle adjustment with the poses held).
    """
    X = _dlt(Ps, xs, valid)
    w = valid.astype(np.float64)[..., None]
    for _ in range(iterations):
        p = _project(Ps, X)  # [N, V, 3]
        z = np.where(np.abs(p[..., 2]) < 1e-12, 1e-12, p[..., 2])[..., None]
        uv = p[..., :2] / z
        r = (uv - xs) * w  # [N, V, 2]
        # d uv / d X = (P[:2, :3] - uv P[2, :3]) / z, zero for padded views
        J = (Ps[..., :2, :3] - uv[..., :, None] * Ps[..., 2:3, :3]) / z[..., None] * w[..., None]
        H = np.einsum("nvki,nvkj->nij", J, J)
        g = np.einsum("nvki,nvk->ni", J, r)
        H += 1e-9 * np.trace(H, axis1=1, axis2=2)[:, None, None] * np.eye(3)  # guard a singular H
        try:
            step = np.linalg.solve(H, -g[..., None])[..., 0]
        except np.linalg.LinAlgError:  # an exactly singular H (degenerate views): keep X so far
            break
        X = X + np.where(np.isfinite(step), step, 0.0)
    return X


def _dlt(Ps: np.ndarray, xs: np.ndarray, valid: np.ndarray) -> np.ndarray:
    w = valid[..., None].astype(np.float64)
    rows1 = (xs[..., 0:1] * Ps[..., 2, :] - Ps[..., 0, :]) * w
    rows2 = (xs[..., 1:2] * Ps[..., 2, :] - Ps[..., 1, :]) * w
    A = np.concatenate([rows1, rows2], axis=1)  # [N, 2V, 4]
    # normalise rows so views weigh alike regardless of P's scale
    A /= np.maximum(np.linalg.norm(A, axis=2, keepdims=True), 1e-12)
    _, _, Vt = np.linalg.svd(A)
    Xh = Vt[:, -1, :]
    return Xh[:, :3] / np.where(np.abs(Xh[:, 3:]) < 1e-12, 1e-12, Xh[:, 3:])


def _project(Ps, X):
    Xh = np.concatenate([X, np.ones((len(X), 1))], 1)
    return np.einsum("pvij,pj->pvi", Ps, Xh)


def _reproj(Ps, X, xs) -> np.ndarray:
    p = _project(Ps, X)
    z = np.where(np.abs(p[..., 2]) < 1e-12, 1e-12, p[..., 2])
    return np.linalg.norm(p[..., :2] / z[..., None] - xs, axis=2)


def _depths(Ps, X) -> np.ndarray:
    return _project(Ps, X)[..., 2]


def stored_image(image: np.ndarray, max_size: int) -> np.ndarray:
    """A keyframe image [H, W] or [H, W, 3] as the map stores it: RGB uint8, downscaled
    (INTER_AREA) so the long side is at most ``max_size`` pixels."""
    h, w = image.shape[:2]
    s = min(1.0, max_size / max(h, w))
    img = image if image.ndim == 3 else np.repeat(image[:, :, None], 3, axis=2)
    return cv2.resize(img, (round(w * s), round(h * s)), interpolation=cv2.INTER_AREA) if s < 1 else img


def write_image(path: Path, rgb: np.ndarray) -> None:
    """Write a stored keyframe image [h, w, 3] RGB as JPEG (quality 92)."""
    cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 92])


class _WithPoses:
    """``frames`` with some frames replaced (index -> PosedFrame); the others stay lazy."""

    def __init__(self, frames: Sequence[PosedFrame], replaced: Dict[int, PosedFrame]) -> None:
        self._frames, self._replaced = frames, replaced
        self.names = getattr(frames, "names", None)

    def __len__(self) -> int:
        return len(self._frames)

    def __getitem__(self, i):
        return self._replaced[i] if i in self._replaced else self._frames[i]


def _refine_poses(frames: Sequence[PosedFrame], cfg: MapBuildConfig, feature_cache: dict
                  ) -> Tuple[Sequence[PosedFrame], Optional[dict]]:
    """Bundle-adjusted poses for the usable frames (``MapBuildConfig.refine``); frames that
    cannot be read or are badly posed are left as they are, for the build to skip and
    report. Returns (frames, the refinement report for the manifest or None)."""
    from reloc_ros.refine import refine_frames

    good: Dict[int, PosedFrame] = {}
    for i in range(len(frames)):
        try:
            fr = frames[i]
            check_pose(fr.T_world_cam, f"pose of {fr.name}")
            fr.camera.validate()
        except (InvalidInputError, OSError):
            continue
        good[i] = fr
    if len(good) < 2:
        log.warning("map refinement skipped: fewer than two usable frames")
        return frames, None
    if cfg.use_depth and any(fr.depth is not None for fr in good.values()):
        # Depth-registered poses (RGB-D SLAM) usually come from that depth; moving them to fit
        # the images moved 7-Scenes' maps 4.7 cm from its ground truth (docs/RESULTS.md).
        log.warning("map refinement of frames with depth: their poses usually come from that depth, "
                    "and refining them measured worse on 7-Scenes (docs/RESULTS.md); refine only poses "
                    "known to disagree with the images")
    idx = sorted(good)
    rcfg = dataclasses.replace(cfg.refinement, features=cfg.features)
    refined, report = refine_frames([good[i] for i in idx], rcfg, feature_cache=feature_cache)
    log.info("map refinement: %s", report.summary().splitlines()[0])
    info = {k: v for k, v in report.to_dict().items() if k not in ("moved_cm", "moved_deg")}
    return _WithPoses(frames, dict(zip(idx, refined))), info


def build_map(frames: Sequence[PosedFrame], out_dir: str | Path, config: Optional[MapBuildConfig] = None,
              feature_cache: Optional[dict] = None, estimators: Sequence = (), source: str = "",
              overwrite: bool = False) -> Path:
    """Build a map directory from posed frames (any sequence of PosedFrame, e.g. a dataset).

    Frames whose image is unreadable or whose pose is not rigid are skipped with a
    warning (listed in the manifest). ``feature_cache`` (a dict the caller keeps) lets repeated
    builds over the same images (leave-one-out) extract features and match pairs once. ``estimators``
    get ``build_map_cache`` called so learned estimators can cache keyframe tokens.
    Raises MapError when no usable keyframe remains.
    """
    cfg = config or MapBuildConfig()
    cfg.validate()
    out = Path(out_dir)
    if out.exists() and not overwrite and any(out.iterdir()):
        raise MapError(f"{out} exists and is not empty (pass overwrite)")
    # Build beside the target and swap at the end, so a failed build loses no old map.
    tmp = out.with_name(out.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    (tmp / "images").mkdir(parents=True)
    t0 = time.perf_counter()
    from reloc_ros import map_build  # parallel / distributed stages (cfg.workers, cfg.ray_address)

    refinement = None
    if cfg.refine and len(frames) > 1:
        if feature_cache is None:
            feature_cache = {}  # the refinement's features are the map's: extracted once
        frames, refinement = _refine_poses(frames, cfg, feature_cache)

    names, poses, Ks, sizes, src_K, src_sizes = [], [], [], [], [], []
    cam_ids, bases = [], []  # rig frames (reloc_ros.rig.RigFrame) carry these
    skipped: List[List[str]] = []
    # local data on disk until the map is written: the build's memory does not grow with it
    spill = map_build.LocalDataSpill(tmp / ".local")
    for fr, feats, kp_ud, p in map_build.extract_keyframes(frames, cfg, feature_cache, skipped):
        T = fr.T_world_cam  # checked by extract_keyframes; unusable frames are in skipped
        # stored image: downscaled; keypoints are stored in its pixel frame
        h, w = fr.image.shape[:2]
        k = len(names)
        small = stored_image(fr.image, cfg.image_max_size)
        write_image(tmp / "images" / f"{k:06d}.jpg", small)
        cam_s = fr.camera.scaled(small.shape[1] / w, small.shape[0] / h)
        names.append(fr.name)
        poses.append(T)
        Ks.append(cam_s.K)
        sizes.append([small.shape[1], small.shape[0]])
        src_K.append(fr.camera.K)
        src_sizes.append([w, h])
        cam_ids.append(str(getattr(fr, "camera_id", "") or ""))
        tb = getattr(fr, "T_world_base", None)
        bases.append(np.full((4, 4), np.nan) if tb is None else np.asarray(tb, np.float64))
        spill.append(kp_ud, feats.descriptors, p,
                     np.where(np.isfinite(p[:, 0]), POINT_DEPTH, POINT_NONE).astype(np.uint8))
    if not names:
        shutil.rmtree(tmp)
        raise MapError("no usable keyframes: every frame was skipped" + (f" ({skipped[0][1]})" if skipped else ""))
    kps, descs, pts, srcs = spill.finish()
    t_feat = time.perf_counter()
    T_all = np.stack(poses)
    if cfg.triangulate and len(names) > 1:
        map_build.triangulate_points(kps, descs, T_all, [np.asarray(K) for K in src_K], names, pts, srcs, cfg,
                                     feature_cache, POINT_TRIANGULATED)
    t_tri = time.perf_counter()
    # keypoints move to the stored image's pixel frame (scale about pixel corners)
    kps_s = (((kps[k] + 0.5) * [sizes[k][0] / src_sizes[k][0], sizes[k][1] / src_sizes[k][1]] - 0.5
              ).astype(np.float32) for k in range(len(names)))
    feats_all = [Features(kp, d) for kp, d in zip(kps, descs)]
    descriptor = create_descriptor(cfg.retrieval)
    # here, with this thread's limits: FAISS k-means depends on its thread count (map_build)
    descriptor.fit(feats_all)
    G = map_build.describe_keyframes(descriptor, feats_all, cfg)  # [N, D] float32, on cfg.workers
    index = RetrievalIndex.build(G, cfg.retrieval)
    index.save(tmp / "index.faiss")
    rig = {}
    if any(cam_ids) or any(np.isfinite(b).all() for b in bases):
        rig = {"camera_ids": np.array(cam_ids, dtype=str), "T_world_base": np.stack(bases)}
    table = write_local_data(tmp, kps_s, descs, pts, srcs, G)
    np.savez(tmp / "keyframes.npz", names=np.array(names, dtype=str), T_world_cam=T_all,
             K=np.stack(Ks), sizes=np.array(sizes, np.int32), source_K=np.stack(src_K),
             source_sizes=np.array(src_sizes, np.int32), **rig, **table)
    np.savez(tmp / "retrieval.npz", **descriptor.state())
    n_pts = int(sum(np.isfinite(p[:, 0]).sum() for p in pts))
    manifest = {
        "format_version": MAP_FORMAT_VERSION,
        "reloc_ros_version": __version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "source": source,
        "build_config": to_dict(cfg),
        "num_keyframes": len(names),
        "num_keypoints": int(table["num_keypoints"].sum()),
        "num_points3d": n_pts,
        "num_points_from_depth": int(sum((s == POINT_DEPTH).sum() for s in srcs)),
        "num_points_triangulated": int(sum((s == POINT_TRIANGULATED).sum() for s in srcs)),
        "global_descriptor": descriptor.name,
        "faiss_index": index.description,
        "global_dim": int(G.shape[1]),
        "parts": dict(PARTS),
        "skipped_frames": skipped,
        "refinement": refinement,
        "rig_cameras": sorted({c for c in cam_ids if c}),
        "build_seconds": {"features": round(t_feat - t0, 2), "triangulation": round(t_tri - t_feat, 2),
                          "total": round(time.perf_counter() - t0, 2)},
        "files": {},
    }
    del kps, descs, pts, srcs, feats_all  # the spill's memory maps, before its files go
    shutil.rmtree(tmp / ".local")
    _write_manifest(tmp, manifest)
    if estimators:
        # Caches are written before the swap, so the map appears complete or not at all.
        kmap = KeyframeMap.load(tmp)
        for est in estimators:
            d = kmap.cache_dir(est.name)
            d.mkdir(parents=True, exist_ok=True)
            est.build_map_cache(kmap, d)
        _write_manifest(tmp, manifest)
    _swap_into_place(tmp, out)
    log.info("built map %s: %d keyframes, %d 3D points in %.1f s", out, len(names), n_pts,
             time.perf_counter() - t0)
    return out


def _write_manifest(root: Path, manifest: dict) -> None:
    write_manifest(root, manifest)


# -- atomic replacement --------------------------------------------------------------

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2  # linux/fs.h


def _rename_exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths atomically (Linux ``renameat2(RENAME_EXCHANGE)``).

    Returns False where that is unavailable (not Linux, glibc < 2.28, a kernel or
    filesystem without RENAME_EXCHANGE); raises OSError for real failures.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(a), None, str(b))


def _remove(p: Path) -> None:
    if p.is_symlink() or p.is_file():
        p.unlink()
    elif p.exists():
        shutil.rmtree(p)


def _swap_into_place(new: Path, target: Path) -> str:
    """Make directory ``new`` appear at ``target``, deleting what was there; returns the method.

    "rename" when nothing was there, "exchange" (atomic: ``target`` always exists) with
    renameat2, else "rename-aside" (the old one is renamed away first: ``target`` is
    missing between two renames). Readers of the old map that hold open files keep
    reading them (Linux unlink semantics); lazy readers detect the change by checksum.
    """
    if not os.path.lexists(target):
        os.rename(new, target)
        return "rename"
    if _rename_exchange(new, target):
        _remove(new)  # now the previous map
        return "exchange"
    aside = target.with_name(f"{target.name}.old-{os.getpid()}")
    _remove(aside)
    os.rename(target, aside)
    os.rename(new, target)
    _remove(aside)
    return "rename-aside"
