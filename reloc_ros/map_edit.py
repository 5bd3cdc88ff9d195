"""Editing keyframe maps without a rebuild: add keyframes, remove a region, merge, convert.

- ``add_keyframes(map_dir, frames)``: in place, cost proportional to the frames added.
  New keyframes get features, depth points and points triangulated against their
  neighbours among old *and* new keyframes (the old ones' local data is read from the
  store); their blocks are appended to ``store.bin``/``globals.f32``, their vectors added
  to the FAISS index; a new keyframe table and index are written under new file names and
  the manifest, replaced atomically, commits them. Old keyframes are not touched (their
  keypoints without a point stay without one). A reader that loaded the map before keeps
  its consistent view (appends never change its blocks); a crash before the commit leaves
  the previous map, whose loader ignores the unreferenced tail.
- ``remove_region(map_dir, ...)``: drops the keyframes whose centre lies in a box or
  sphere (or by name); writes a compacted map (blocks copied byte for byte, index rebuilt
  from the stored descriptors) and swaps it in atomically.
- ``merge_maps(a, b, out, shared)``: b's keyframes move into a's frame through the frames
  both maps hold (``T_a_b = T_world_cam_a @ inv(T_world_cam_b)``, averaged over the shared
  frames, their disagreement reported); shared frames are kept once (a's).
- ``convert_map(old, new)``: a format-2 map to this format, losslessly.

Global descriptors stay comparable: the map's VLAD vocabulary is never retrained by an
edit. Added keyframes are described with the map's stored vocabulary; a merged map takes
a's and re-describes b's keyframes with it from their stored SIFT descriptors (no image
is read again) when the two vocabularies differ. The FAISS index keeps its PCA / coarse
quantizer (trained on the first build) and only adds vectors, unless the map grew past
the size where ``RetrievalConfig`` picks another index kind, when it is rebuilt from the
stored descriptors (once per threshold).
"""
from __future__ import annotations

import datetime
import fcntl
import json
import logging
import shutil
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from reloc_ros import __version__
from reloc_ros.config import from_dict
from reloc_ros.features import Features, root_sift
from reloc_ros.geometry import check_pose, invert
from reloc_ros.map_store import TABLE_KEYS, StoreWriter, committed_end, concat_tables, sha256_file, write_manifest
from reloc_ros.maps import (MANIFEST, MAP_FORMAT_VERSION, PARTS, POINT_DEPTH, POINT_NONE, POINT_TRIANGULATED,
                            KeyframeMap, MapBuildConfig, MapError, _load_npz, _swap_into_place,
                            _triangulate_keyframe, stored_image, write_image)
from reloc_ros.map_build import extract_keyframe
from reloc_ros.retrieval import RetrievalConfig, RetrievalIndex, create_descriptor, index_kind_for
from reloc_ros.types import InvalidInputError, PosedFrame

log = logging.getLogger("reloc_ros.map_edit")

# keyframes.npz arrays with one row per keyframe besides the store table
_ROW_KEYS = ("names", "T_world_cam", "K", "sizes", "source_K", "source_sizes")


@contextmanager
def _edit_lock(root: Path):
    """One edit of a map directory at a time (advisory lock file; readers do not take it)."""
    root.mkdir(parents=True, exist_ok=True)
    fh = open(root / ".edit.lock", "w")
    try:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as e:
            raise MapError(f"map {root} is being edited by another process") from e
        yield
    finally:
        fh.close()


def _build_config(kmap: KeyframeMap) -> MapBuildConfig:
    return from_dict(MapBuildConfig, kmap.manifest.get("build_config", {}), "map")


def _retrieval_config(kmap: KeyframeMap) -> RetrievalConfig:
    return _build_config(kmap).retrieval


def _descriptor(kmap: KeyframeMap):
    d = create_descriptor(_retrieval_config(kmap))
    d.load_state(kmap.descriptor_state)
    return d


def _source_keypoints(kmap: KeyframeMap, i: int) -> np.ndarray:
    """Keyframe i's undistorted keypoints in its *source* image's pixels (what triangulation
    uses with source_K), from the stored-image pixels (inverse of build_map's scaling)."""
    kf = kmap.keyframe_arrays
    s = kf["sizes"][i] / kf["source_sizes"][i]
    return ((kmap.features(i).keypoints.astype(np.float64) + 0.5) / s - 0.5)


class _Lazy:
    """A list-like view ``[old keyframes (read from the store) ..., new ones (in memory)]``."""

    def __init__(self, n_old: int, old, new: List):
        self.n_old, self.old, self.new = n_old, old, new

    def __len__(self):
        return self.n_old + len(self.new)

    def __getitem__(self, j):
        j = int(j)
        return self.old(j) if j < self.n_old else self.new[j - self.n_old]


def _frame_local_data(fr: PosedFrame, cfg: MapBuildConfig):
    """What build_map computes per frame (the same functions): features, undistorted
    keypoints, depth points, the stored image."""
    feats, kp_ud, p = extract_keyframe(fr, cfg, None)
    return feats, kp_ud, p, stored_image(fr.image, cfg.image_max_size)


def _rig_rows(kf: Dict[str, np.ndarray], n: int) -> Tuple[np.ndarray, np.ndarray]:
    ids = kf["camera_ids"] if "camera_ids" in kf else np.array([""] * n, dtype=str)
    base = kf["T_world_base"] if "T_world_base" in kf else np.full((n, 4, 4), np.nan)
    return ids, base


def add_keyframes(map_dir: str | Path, frames: Sequence[PosedFrame], use_depth: Optional[bool] = None,
                  source: str = "") -> dict:
    """Add posed frames (poses in the map's world frame) to the map at ``map_dir``, in place.

    Features, depth points and triangulation use the map's own build configuration
    (``use_depth`` may override it). Frames whose name is already in the map, whose
    image is unreadable or whose pose is not rigid are skipped with the reason. Returns
    statistics: keyframes added, seconds per stage, index rebuilt or not, skipped frames.
    Raises MapError when the map cannot be loaded or nothing could be added.
    """
    root = Path(map_dir)
    t0 = time.perf_counter()
    with _edit_lock(root):
        kmap = KeyframeMap.load(root, use_gpu=False)
        cfg = _build_config(kmap)
        if use_depth is not None:
            cfg.use_depth = bool(use_depth)
        n_old = kmap.num_keyframes
        known = set(kmap.names)
        new: Dict[str, list] = {k: [] for k in ("names", "T", "K", "sizes", "src_K", "src_sizes", "kp", "desc",
                                                "pts", "src", "cam_ids", "bases")}
        images, skipped = [], []
        for idx in range(len(frames)):
            names_known = getattr(frames, "names", None)
            name = names_known[idx] if names_known is not None else str(idx)
            try:
                fr = frames[idx]
                name = fr.name
                if name in known:
                    raise InvalidInputError(f"a keyframe named {name!r} is already in the map")
                T = check_pose(fr.T_world_cam, f"pose of {fr.name}")
                fr.camera.validate()
                fr.T_world_cam = T
                feats, kp_ud, p, small = _frame_local_data(fr, cfg)
            except (InvalidInputError, OSError) as e:
                log.warning("skipping frame %s: %s", name, e)
                skipped.append([str(name), str(e)])
                continue
            known.add(name)
            h, w = fr.image.shape[:2]
            cam_s = fr.camera.scaled(small.shape[1] / w, small.shape[0] / h)
            new["names"].append(fr.name)
            new["T"].append(T)
            new["K"].append(cam_s.K)
            new["sizes"].append([small.shape[1], small.shape[0]])
            new["src_K"].append(np.asarray(fr.camera.K, np.float64))
            new["src_sizes"].append([w, h])
            new["kp"].append(kp_ud)
            new["desc"].append(feats.descriptors)
            new["pts"].append(p)
            new["src"].append(np.where(np.isfinite(p[:, 0]), POINT_DEPTH, POINT_NONE).astype(np.uint8))
            new["cam_ids"].append(str(getattr(fr, "camera_id", "") or ""))
            tb = getattr(fr, "T_world_base", None)
            new["bases"].append(np.full((4, 4), np.nan) if tb is None else np.asarray(tb, np.float64))
            images.append(small)
        m = len(new["names"])
        if m == 0:
            raise MapError("no keyframes to add: every frame was skipped" + (f" ({skipped[0][1]})" if skipped else ""))
        t_feat = time.perf_counter()
        kf = kmap.keyframe_arrays
        T_all = np.concatenate([kmap.T_world_cam, np.stack(new["T"])])
        names_all = kmap.names + new["names"]
        if cfg.triangulate:
            kps = _Lazy(n_old, lambda j: _source_keypoints(kmap, j), new["kp"])
            roots = _Lazy(n_old, lambda j: kmap.root_descriptors(j), [root_sift(d) for d in new["desc"]])
            Ks = _Lazy(n_old, lambda j: kf["source_K"][j].astype(np.float64), new["src_K"])
            for a in range(m):
                need = ~np.isfinite(new["pts"][a][:, 0])
                if not need.any():
                    continue
                tri = _triangulate_keyframe(n_old + a, kps, roots, T_all, Ks, cfg, names_all)
                fill = need & np.isfinite(tri[:, 0])
                new["pts"][a][fill] = tri[fill]
                new["src"][a][fill] = POINT_TRIANGULATED
        t_tri = time.perf_counter()
        descriptor = _descriptor(kmap)
        G_new = np.stack([descriptor.describe(Features(k, d)) for k, d in zip(new["kp"], new["desc"])]
                         ).astype(np.float32)
        kps_s = []
        for a in range(m):
            s = np.asarray(new["sizes"][a], np.float64) / np.asarray(new["src_sizes"][a], np.float64)
            kps_s.append(((new["kp"][a] + 0.5) * s - 0.5).astype(np.float32))
        # -- write (appends, then new-generation files, then the manifest commits) -----
        old_table = {k: kf[k] for k in TABLE_KEYS}
        writer = StoreWriter(root, kmap.global_descriptors.shape[1], (committed_end(old_table), n_old))
        try:
            for a in range(m):
                writer.append(kps_s[a], new["desc"][a], new["pts"][a], new["src"][a], G_new[a])
        finally:
            table = concat_tables(old_table, writer.close())
        for a, small in enumerate(images):
            write_image(root / "images" / f"{n_old + a:06d}.jpg", small)
        rcfg = _retrieval_config(kmap)
        n_all = n_old + m
        rebuilt = index_kind_for(n_all, rcfg) != kmap.index.kind
        if rebuilt:  # crossed a size threshold: the kind changes (once), from stored descriptors
            G_all = np.concatenate([kmap.global_descriptors[:], G_new])
            index = RetrievalIndex.build(G_all, rcfg)
        else:
            index = kmap.index
            index.index.add(np.ascontiguousarray(G_new))
        gen = int(kmap.manifest.get("generation", 0)) + 1
        parts = {"keyframes": f"keyframes.g{gen}.npz", "retrieval": kmap.manifest.get("parts", PARTS)["retrieval"],
                 "index": f"index.g{gen}.faiss"}
        index.save(root / parts["index"])
        arrays = {"names": np.array(names_all, dtype=str), "T_world_cam": T_all,
                  "K": np.concatenate([kf["K"], np.stack(new["K"])]),
                  "sizes": np.concatenate([kf["sizes"], np.array(new["sizes"], np.int32)]).astype(np.int32),
                  "source_K": np.concatenate([kf["source_K"], np.stack(new["src_K"])]),
                  "source_sizes": np.concatenate([kf["source_sizes"], np.array(new["src_sizes"], np.int32)]
                                                 ).astype(np.int32), **table}
        if "camera_ids" in kf or any(new["cam_ids"]) or any(np.isfinite(b).all() for b in new["bases"]):
            ids, base = _rig_rows(kf, n_old)
            arrays["camera_ids"] = np.concatenate([ids, np.array(new["cam_ids"], dtype=str)])
            arrays["T_world_base"] = np.concatenate([base, np.stack(new["bases"])])
        np.savez(root / parts["keyframes"], **arrays)
        t_write = time.perf_counter()
        man = dict(kmap.manifest)
        old_parts = {**PARTS, **man.get("parts", {})}
        srcs = np.concatenate(new["src"])
        man.update({
            "reloc_ros_version": __version__, "generation": gen, "parts": parts, "num_keyframes": n_all,
            "num_keypoints": int(table["num_keypoints"].sum()), "num_points3d": int(table["num_points"].sum()),
            "num_points_from_depth": int(man.get("num_points_from_depth", 0) + (srcs == POINT_DEPTH).sum()),
            "num_points_triangulated": int(man.get("num_points_triangulated", 0) + (srcs == POINT_TRIANGULATED).sum()),
            "faiss_index": index.description,
        })
        stats = {"op": "add", "keyframes_before": n_old, "added": m, "skipped_frames": skipped,
                 "index_rebuilt": bool(rebuilt), "source": source,
                 "time": datetime.datetime.now(datetime.timezone.utc).isoformat(),
                 "seconds": {"features": round(t_feat - t0, 3), "triangulation": round(t_tri - t_feat, 3),
                             "describe_write_index": round(t_write - t_tri, 3)}}
        man["edits"] = list(man.get("edits", [])) + [{k: v for k, v in stats.items() if k != "skipped_frames"}]
        stale = {old_parts["keyframes"], old_parts["index"]} - set(parts.values())
        write_manifest(root, man, known=kmap.manifest.get("files", {}), exclude=stale)
        for f in stale:  # after the commit: a crash before it left the previous map intact
            (root / f).unlink(missing_ok=True)
        stats["seconds"]["total"] = round(time.perf_counter() - t0, 3)
        log.info("added %d keyframes to %s (now %d) in %.2f s", m, root, n_all, stats["seconds"]["total"])
        return stats


# -- maps written anew (remove, merge, convert) ----------------------------------------------

class _NewMap:
    """Writes a map directory beside ``out`` (``out.partial``) and swaps it in at ``finish``."""

    def __init__(self, out: Path, dim: int, overwrite: bool):
        self.out = Path(out)
        if self.out.exists() and not overwrite and any(not p.name.startswith(".") for p in self.out.iterdir()):
            raise MapError(f"{self.out} exists and is not empty (pass overwrite)")
        self.tmp = self.out.with_name(self.out.name + ".partial")
        if self.tmp.exists():
            shutil.rmtree(self.tmp)
        (self.tmp / "images").mkdir(parents=True)
        self.writer = StoreWriter(self.tmp, dim)
        self.rows: Dict[str, list] = {k: [] for k in (*_ROW_KEYS, "camera_ids", "T_world_base")}
        self.G: List[np.ndarray] = []
        self.point_counts = np.zeros(3, np.int64)

    def add(self, kmap: KeyframeMap, i: int, T_a_b: Optional[np.ndarray] = None,
            g: Optional[np.ndarray] = None) -> None:
        """Copy keyframe i of ``kmap`` (moved by T_a_b [4,4] when given; g: its global
        descriptor row if not the stored one)."""
        kf = kmap.keyframe_arrays
        d = kmap.keyframe(i)
        T = kmap.T_world_cam[i]
        pts = d.points3d
        ids, base = _rig_rows(kf, kmap.num_keyframes)
        base = base[i]
        if T_a_b is not None:
            T = T_a_b @ T
            pts = (pts.astype(np.float64) @ T_a_b[:3, :3].T + T_a_b[:3, 3]).astype(np.float32)
            base = T_a_b @ base if np.all(np.isfinite(base)) else base
        g = kmap.global_descriptors[i] if g is None else g
        self.writer.append(d.keypoints, d.descriptors, pts, d.point_source, g)
        self.point_counts += np.bincount(d.point_source, minlength=3)[:3]
        k = len(self.rows["names"])
        for key in _ROW_KEYS:
            self.rows[key].append(T if key == "T_world_cam" else kf[key][i])
        self.rows["camera_ids"].append(str(ids[i]))
        self.rows["T_world_base"].append(base)
        self.G.append(np.asarray(g, np.float32))
        shutil.copyfile(kmap.path / "images" / f"{i:06d}.jpg", self.tmp / "images" / f"{k:06d}.jpg")

    def finish(self, descriptor_state: Dict[str, np.ndarray], rcfg: RetrievalConfig, manifest: dict,
               rig: bool) -> Path:
        n = len(self.rows["names"])
        if n == 0:
            shutil.rmtree(self.tmp)
            raise MapError("the edit leaves no keyframes")
        table = self.writer.close()
        G = np.stack(self.G)
        index = RetrievalIndex.build(G, rcfg)
        index.save(self.tmp / PARTS["index"])
        arrays = {k: np.stack(v) if k not in ("names",) else np.array(v, dtype=str)
                  for k, v in self.rows.items() if k in _ROW_KEYS}
        if rig:
            arrays["camera_ids"] = np.array(self.rows["camera_ids"], dtype=str)
            arrays["T_world_base"] = np.stack(self.rows["T_world_base"])
        np.savez(self.tmp / PARTS["keyframes"], **arrays, **table)
        np.savez(self.tmp / PARTS["retrieval"], **descriptor_state)
        manifest = dict(manifest)
        manifest.update({"format_version": MAP_FORMAT_VERSION, "reloc_ros_version": __version__,
                         "generation": 0, "parts": dict(PARTS), "num_keyframes": n,
                         "num_keypoints": int(table["num_keypoints"].sum()),
                         "num_points3d": int(table["num_points"].sum()),
                         "num_points_from_depth": int(self.point_counts[POINT_DEPTH]),
                         "num_points_triangulated": int(self.point_counts[POINT_TRIANGULATED]),
                         "faiss_index": index.description, "global_dim": int(G.shape[1])})
        write_manifest(self.tmp, manifest)
        _swap_into_place(self.tmp, self.out)
        return self.out


def _edit_entry(op: str, **kw) -> dict:
    return {"op": op, "time": datetime.datetime.now(datetime.timezone.utc).isoformat(), **kw}


def remove_region(map_dir: str | Path, box: Optional[Sequence[float]] = None,
                  sphere: Optional[Sequence[float]] = None, names: Optional[Sequence[str]] = None,
                  out: Optional[str | Path] = None, overwrite: bool = False) -> dict:
    """Remove the keyframes whose camera centre lies in ``box`` (xmin, ymin, zmin, xmax,
    ymax, zmax; world metres) or ``sphere`` (x, y, z, radius), or whose name is in
    ``names``. Writes the rest to ``out`` (default: the map itself, replaced atomically).
    Local data and descriptors are copied as stored; the index is rebuilt from them.
    """
    src = Path(map_dir)
    t0 = time.perf_counter()
    kmap = KeyframeMap.load(src, use_gpu=False)
    c = kmap.T_world_cam[:, :3, 3]
    drop = np.zeros(kmap.num_keyframes, bool)
    if box is not None:
        b = np.asarray(box, np.float64)
        if b.shape != (6,) or np.any(b[3:] < b[:3]):
            raise ValueError("box must be xmin,ymin,zmin,xmax,ymax,zmax with max >= min")
        drop |= np.all((c >= b[:3]) & (c <= b[3:]), axis=1)
    if sphere is not None:
        s = np.asarray(sphere, np.float64)
        if s.shape != (4,) or s[3] < 0:
            raise ValueError("sphere must be x,y,z,radius with radius >= 0")
        drop |= np.linalg.norm(c - s[:3], axis=1) <= s[3]
    if names:
        unknown = sorted(set(names) - set(kmap.names))
        if unknown:
            raise ValueError(f"no keyframe named {unknown[0]!r} in {src} ({len(unknown)} unknown names)")
        drop |= np.isin(np.array(kmap.names), list(names))
    if box is None and sphere is None and not names:
        raise ValueError("remove_region needs a box, a sphere or names")
    target = Path(out) if out is not None else src
    with _edit_lock(src):
        w = _NewMap(target, kmap.global_descriptors.shape[1], overwrite or target == src)
        for i in np.flatnonzero(~drop):
            w.add(kmap, int(i))
        man = dict(kmap.manifest)
        stats = _edit_entry("remove", keyframes_before=kmap.num_keyframes, removed=int(drop.sum()),
                            box=None if box is None else list(map(float, box)),
                            sphere=None if sphere is None else list(map(float, sphere)),
                            names=len(names or []))
        man["edits"] = list(man.get("edits", [])) + [stats]
        w.finish(kmap.descriptor_state, _retrieval_config(kmap), man, kmap.camera_ids is not None)
    stats["seconds"] = round(time.perf_counter() - t0, 3)
    log.info("removed %d of %d keyframes -> %s", stats["removed"], kmap.num_keyframes, target)
    return stats


def _mean_transform(Ts: np.ndarray) -> np.ndarray:
    """Chordal L2 mean of rigid transforms [n, 4, 4] (rotation by SVD, mean translation)."""
    U, _, Vt = np.linalg.svd(Ts[:, :3, :3].sum(axis=0))
    R = U @ np.diag([1, 1, np.sign(np.linalg.det(U @ Vt))]) @ Vt
    out = np.eye(4)
    out[:3, :3], out[:3, 3] = R, Ts[:, :3, 3].mean(axis=0)
    return out


def merge_maps(map_a: str | Path, map_b: str | Path, out: str | Path,
               shared: Optional[Sequence[Tuple[str, str]]] = None, overwrite: bool = False,
               max_disagreement_m: float = 0.05, max_disagreement_deg: float = 2.0) -> dict:
    """Merge map b into map a's world frame; write the result to ``out``.

    shared: (name in a, name in b) pairs of frames both maps hold (the same image and
    camera, posed in each map's own frame); default: every name the two maps have in
    common. ``T_a_b`` is their mean ``T_a @ inv(T_b)``; when the shared frames disagree on it
    by more than max_disagreement_m / max_disagreement_deg (the maps are not rigidly
    related: another scale, or a bad pose) MapError is raised. Shared frames are kept once
    (a's). Other names present in both maps are an error (ambiguous keyframes).
    """
    from reloc_ros.geometry import rotation_angle_deg

    t0 = time.perf_counter()
    a, b = KeyframeMap.load(map_a, use_gpu=False), KeyframeMap.load(map_b, use_gpu=False)
    ia = {n: i for i, n in enumerate(a.names)}
    ib = {n: i for i, n in enumerate(b.names)}
    pairs = list(shared) if shared else [(n, n) for n in a.names if n in ib]
    if not pairs:
        raise MapError(f"maps {map_a} and {map_b} share no frame: give the shared frames (name in a, name in b)")
    for na, nb in pairs:
        if na not in ia or nb not in ib:
            raise MapError(f"shared frame {na!r} / {nb!r} is not in map a / map b")
    Ts = np.stack([a.T_world_cam[ia[na]] @ invert(b.T_world_cam[ib[nb]]) for na, nb in pairs])
    T_a_b = _mean_transform(Ts)
    dt = float(np.max(np.linalg.norm(Ts[:, :3, 3] - T_a_b[:3, 3], axis=1)))
    dr = float(max(rotation_angle_deg(T[:3, :3], T_a_b[:3, :3]) for T in Ts))
    if dt > max_disagreement_m or dr > max_disagreement_deg:
        raise MapError(f"the {len(pairs)} shared frames disagree on the transform between the maps by up to "
                       f"{dt:.3f} m / {dr:.2f} deg (limits {max_disagreement_m} m / {max_disagreement_deg} deg): "
                       "the maps are not rigidly related (scale, or a wrong pose)")
    dup_b = {nb for _, nb in pairs}
    clash = sorted((set(a.names) & set(b.names)) - dup_b - {na for na, _ in pairs})
    if clash:
        raise MapError(f"{len(clash)} keyframe names are in both maps but not shared frames, e.g. {clash[0]!r}")
    same_vocab = (set(a.descriptor_state) == set(b.descriptor_state)
                  and all(np.array_equal(a.descriptor_state[k], b.descriptor_state[k]) for k in a.descriptor_state))
    desc_a = None if same_vocab else _descriptor(a)
    if a.global_descriptors.shape[1] != b.global_descriptors.shape[1] and same_vocab:
        raise MapError("the maps' global descriptors have different dimensions")
    if True:  # (written beside ``out`` and swapped in: no lock needed)
        w = _NewMap(Path(out), a.global_descriptors.shape[1], overwrite)
        for i in range(a.num_keyframes):
            w.add(a, i)
        moved = 0
        for j in range(b.num_keyframes):
            if b.names[j] in dup_b:
                continue
            g = None
            if desc_a is not None:  # b's rows are in another vocabulary's space: re-describe
                g = desc_a.describe(b.features(j))
            w.add(b, j, T_a_b, g)
            moved += 1
        man = dict(a.manifest)
        stats = _edit_entry("merge", a=str(map_a), b=str(map_b), keyframes_a=a.num_keyframes, added_from_b=moved,
                            shared_frames=[list(p) for p in pairs], T_a_b=T_a_b.tolist(),
                            shared_disagreement_m=round(dt, 6), shared_disagreement_deg=round(dr, 4),
                            b_redescribed=not same_vocab)
        man["edits"] = list(a.manifest.get("edits", [])) + [stats]
        man["source"] = f"merge of {a.manifest.get('source', map_a)} and {b.manifest.get('source', map_b)}"
        man["skipped_frames"] = list(a.manifest.get("skipped_frames", [])) + list(b.manifest.get("skipped_frames", []))
        w.finish(a.descriptor_state, _retrieval_config(a), man, a.camera_ids is not None or b.camera_ids is not None)
    stats["seconds"] = round(time.perf_counter() - t0, 3)
    log.info("merged %s (%d) + %s (%d new) -> %s; shared frames disagree by %.4f m / %.3f deg",
             map_a, a.num_keyframes, map_b, moved, out, dt, dr)
    return stats


def convert_map(old: str | Path, new: str | Path, overwrite: bool = False) -> dict:
    """Write a format-2 map (features.npz / retrieval.npz) as a map of this format.

    Lossless: the same keypoints, descriptors, points, poses, global descriptors and
    FAISS index; only the storage changes. Checks the old map's sha256 first.
    """

    src, out = Path(old), Path(new)
    t0 = time.perf_counter()
    try:
        man = json.loads((src / MANIFEST).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise MapError(f"{src} is not a readable reloc_ros map: {e}") from e
    if man.get("format_version") != 2:
        raise MapError(f"convert reads format-2 maps; {src} is format {man.get('format_version')!r}")
    for name, digest in man.get("files", {}).items():
        f = src / name
        if not f.is_file() or sha256_file(f) != digest:
            raise MapError(f"map file {f} is missing or corrupt (checksum mismatch); rebuild the map")
    kf, ft, rt = (_load_npz(src / f) for f in ("keyframes.npz", "features.npz", "retrieval.npz"))
    G = rt.pop("global_descriptors").astype(np.float32)
    off = ft["offsets"]
    n = len(kf["names"])
    if len(off) != n + 1 or len(G) != n:
        raise MapError(f"{src}: features/retrieval arrays do not match its {n} keyframes")
    scratch = out.with_name(out.name + ".partial")
    if out.exists() and not overwrite and any(out.iterdir()):
        raise MapError(f"{out} exists and is not empty (pass overwrite)")
    if scratch.exists():
        shutil.rmtree(scratch)
    shutil.copytree(src, scratch, ignore=shutil.ignore_patterns("features.npz", "retrieval.npz", MANIFEST))
    w = StoreWriter(scratch, G.shape[1])
    try:
        for i in range(n):
            a, b = int(off[i]), int(off[i + 1])
            w.append(ft["keypoints"][a:b], ft["descriptors"][a:b], ft["points3d"][a:b], ft["point_source"][a:b], G[i])
    finally:
        table = w.close()
    np.savez(scratch / PARTS["keyframes"], **kf, **table)
    np.savez(scratch / PARTS["retrieval"], **rt)
    man.update({"format_version": MAP_FORMAT_VERSION, "reloc_ros_version": __version__, "global_dim": int(G.shape[1]),
                "parts": dict(PARTS), "generation": 0,
                "edits": list(man.get("edits", [])) + [_edit_entry("convert", from_format=2)]})
    write_manifest(scratch, man)
    _swap_into_place(scratch, out)
    KeyframeMap.load(out)  # the result must load
    return {"op": "convert", "keyframes": n, "seconds": round(time.perf_counter() - t0, 3),
            "bytes_before": _dir_bytes(src), "bytes_after": _dir_bytes(out)}


def _dir_bytes(p: Path) -> int:
    return sum(f.stat().st_size for f in Path(p).rglob("*") if f.is_file())


__all__ = ["add_keyframes", "remove_region", "merge_maps", "convert_map"]
