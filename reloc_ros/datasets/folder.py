"""Our own posed-folder format (read and write); docs/datasets.md is its specification.

::

    SRC/
      images/<name>.png|jpg|...    colour (RGB) or grey images; <name> may contain '/'
      poses.txt                    "<name> <16 or 12 numbers>" a line: row-major T_world_cam
                                   (or images/<name>.pose.txt holding 16 or 12 numbers)
      intrinsics.txt               "<name|*> width height fx fy cx cy [dist...]" a line
                                   (or cameras.yaml: default: {...}, images: {<name>: {...}})
      stamps.txt                   optional "<name> seconds"
      depth/<name>.png|.npy        optional: uint16 * depth_scale metres, or float32 metres
      depth_intrinsics.txt         optional, as intrinsics.txt (default: registered to colour)
      depth_extrinsics.txt         optional "<name|*> <16 numbers>" T_cam_depth (default I)
      dataset.yaml                 optional: {format: reloc_ros-folder, version: 1|2, depth_scale: ...}
      camera_ids.txt               optional "<name> <camera id>": the rig camera of each frame
      base_poses.txt               optional "<name> <16 or 12 numbers>": T_world_base (body pose)
      rig.yaml                     optional: cameras: {<id>: {intrinsics: {...}, T_base_cam: [16]}}
"""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Tuple

import cv2
import numpy as np

from reloc_ros.datasets.base import (
    Dataset, FileDepth, FileImage, FrameRecord, as_matrix4, camera_from_values, clean_pose, finalize, list_images,
    parse_float, read_matrix_file, read_text, read_yaml_mapping, require_dir, select, strip_comment)
from reloc_ros.geometry import invert
from reloc_ros.types import Camera, InvalidInputError, PosedFrame

logger = logging.getLogger("reloc_ros.datasets")

FOLDER_FORMAT_VERSION = 2
"""Newest version this reader reads. Version 2 adds the rig files (camera_ids.txt,
base_poses.txt, rig.yaml); the writer stamps 1 on folders without them, so older readers
still read those."""

# |T_world_cam - T_world_base @ T_base_cam| allowed where a folder gives all three
# (text files carry full repr precision; this only catches a wrong mount or pose).
RIG_CONSISTENCY_TOL = 1e-6


@dataclass
class FolderOptions:
    """Options of the ``folder`` reader.

    depth_scale: metres per unit of a uint16 depth PNG (default: ``dataset.yaml``'s
    value, else 0.001, i.e. millimetres). Ignored for ``.npy`` depth (already metres).
    """

    depth_scale: Optional[float] = None

    def validate(self) -> None:
        if self.depth_scale is not None and not self.depth_scale > 0:
            raise ValueError("folder dataset: depth_scale must be > 0")


def _named_rows(path: Path, what: str) -> Dict[str, Tuple[int, List[float]]]:
    """name -> (line number, numbers) of '<name> numbers...' lines ('#' starts a comment)."""
    return {name: (ln, [parse_float(t, f"{path}:{ln}") for t in words])
            for name, (ln, words) in _named_words(path, what).items()}


def _cameras_from_txt(path: Path) -> Dict[str, Camera]:
    cams = {}
    for name, (ln, v) in _named_rows(path, "intrinsics file").items():
        if len(v) < 6:
            raise InvalidInputError(f"{path}:{ln}: expected '<name|*> width height fx fy cx cy [dist...]', "
                                    f"found {len(v)} numbers; the file is truncated or corrupt")
        w, h, fx, fy, cx, cy = v[:6]
        if w != int(w) or h != int(h):
            raise InvalidInputError(f"{path}:{ln}: width and height must be integers")
        cams[name] = camera_from_values(fx, fy, cx, cy, int(w), int(h), v[6:] or None, where=f"{path}:{ln}")
    return cams


def _camera_from_mapping(d: dict, where: str) -> Camera:
    try:
        if "K" in d:
            K = np.asarray(d["K"], dtype=np.float64).reshape(3, 3)
            fx, fy, cx, cy = K[0, 0], K[1, 1], K[0, 2], K[1, 2]
        else:
            fx, fy, cx, cy = (float(d[k]) for k in ("fx", "fy", "cx", "cy"))
        w, h = int(d["width"]), int(d["height"])
        dist = d.get("dist")
    except (KeyError, TypeError, ValueError) as e:
        raise InvalidInputError(f"{where}: needs width, height and fx, fy, cx, cy (or K): {e!r}") from None
    return camera_from_values(fx, fy, cx, cy, w, h, dist or None, where=where)


def _cameras_from_yaml(path: Path) -> Dict[str, Camera]:
    data = read_yaml_mapping(path, "cameras.yaml", "a mapping with 'default' and/or 'images'")
    cams = {}
    if data.get("default") is not None:
        cams["*"] = _camera_from_mapping(data["default"], f"{path}: default")
    for name, d in (data.get("images") or {}).items():
        cams[str(name)] = _camera_from_mapping(d, f"{path}: images.{name}")
    return cams


def _read_cameras(root: Path, stem: str, required: bool) -> Dict[str, Camera]:
    txt, yml = root / f"{stem}.txt", root / ("cameras.yaml" if stem == "intrinsics" else f"{stem}.yaml")
    if txt.is_file():
        return _cameras_from_txt(txt)
    if yml.is_file():
        return _cameras_from_yaml(yml)
    if required:
        raise FileNotFoundError(f"{root}: no {txt.name} or {yml.name}")
    return {}


def _named_words(path: Path, what: str) -> Dict[str, Tuple[int, List[str]]]:
    """name -> (line number, words) of '<name> words...' lines ('#' starts a comment)."""
    out: Dict[str, Tuple[int, List[str]]] = {}
    for ln, line in enumerate(read_text(path, what).splitlines(), start=1):
        s = strip_comment(line)
        if not s:
            continue
        tok = s.split()
        if tok[0] in out:
            raise InvalidInputError(f"{path}:{ln}: {tok[0]!r} is listed twice")
        out[tok[0]] = (ln, tok[1:])
    return out


@dataclass
class _RigSpec:
    """What a folder says about its rig: frame -> camera id, frame -> T_world_base,
    camera id -> intrinsics / T_base_cam (each may be empty)."""

    camera_of: Dict[str, str]
    base_pose: Dict[str, np.ndarray]
    intrinsics: Dict[str, Camera]
    T_base_cam: Dict[str, np.ndarray]


def _read_rig(root: Path) -> _RigSpec:
    spec = _RigSpec({}, {}, {}, {})
    ids_txt = root / "camera_ids.txt"
    if ids_txt.is_file():
        for name, (ln, words) in _named_words(ids_txt, "camera ids file").items():
            if len(words) != 1:
                raise InvalidInputError(f"{ids_txt}:{ln}: expected '<name> <camera id>', found {len(words)} "
                                        "words after the name")
            spec.camera_of[name] = words[0]
    base_txt = root / "base_poses.txt"
    if base_txt.is_file():
        for name, (ln, v) in _named_rows(base_txt, "body poses file").items():
            if len(v) not in (12, 16):
                raise InvalidInputError(f"{base_txt}:{ln}: expected 16 (or 12) numbers after the name, found "
                                        f"{len(v)}; the file is truncated or corrupt")
            spec.base_pose[name] = as_matrix4(v, f"{base_txt}:{ln}")
    rig_yaml = root / "rig.yaml"
    if rig_yaml.is_file():
        data = read_yaml_mapping(rig_yaml, "rig.yaml", "a mapping with 'cameras'")
        cams = data.get("cameras") or {}
        if not isinstance(cams, dict):
            raise InvalidInputError(f"{rig_yaml}: 'cameras' must map camera ids to {{intrinsics, T_base_cam}}")
        for cid, d in cams.items():
            where = f"{rig_yaml}: cameras.{cid}"
            if not isinstance(d, dict):
                raise InvalidInputError(f"{where}: expected a mapping with intrinsics and/or T_base_cam")
            if d.get("intrinsics") is not None:
                spec.intrinsics[str(cid)] = _camera_from_mapping(d["intrinsics"], f"{where}.intrinsics")
            if d.get("T_base_cam") is not None:
                try:
                    T = clean_pose(as_matrix4(d["T_base_cam"], f"{where}.T_base_cam"), f"{where}.T_base_cam")
                except (TypeError, ValueError) as e:
                    raise InvalidInputError(f"{where}.T_base_cam: expected 16 numbers ({e})") from None
                spec.T_base_cam[str(cid)] = T
    return spec


def _lookup(table: dict, name: str):
    return table.get(name, table.get("*"))


def _read_meta(root: Path) -> dict:
    path = root / "dataset.yaml"
    if not path.is_file():
        return {}
    import yaml

    try:
        meta = yaml.safe_load(read_text(path, "dataset.yaml")) or {}
    except yaml.YAMLError as e:
        raise InvalidInputError(f"{path}: invalid YAML ({e})") from None
    if not isinstance(meta, dict):
        raise InvalidInputError(f"{path}: expected a mapping")
    version = meta.get("version", FOLDER_FORMAT_VERSION)
    if not isinstance(version, int) or version > FOLDER_FORMAT_VERSION:
        raise InvalidInputError(f"{path}: folder format version {version!r} is newer than this reader "
                                f"({FOLDER_FORMAT_VERSION})")
    return meta


def open_folder(src: Path, sl: slice, use_depth: bool, opts: FolderOptions) -> Dataset:
    """Read a posed folder (format above); frames sorted naturally by name.

    Names are image paths relative to ``images/`` without the extension.
    """
    root = require_dir(src, "posed folder")
    img_dir = require_dir(root / "images", "image folder")
    meta = _read_meta(root)
    depth_scale = opts.depth_scale if opts.depth_scale is not None else float(meta.get("depth_scale", 0.001))
    images = list_images(img_dir, recursive=True)
    if not images:
        raise InvalidInputError(f"{img_dir}: no images")
    names = [p.relative_to(img_dir).with_suffix("").as_posix() for p in images]
    poses_txt = root / "poses.txt"
    pose_rows = _named_rows(poses_txt, "poses file") if poses_txt.is_file() else None
    rig = _read_rig(root)
    cams = _read_cameras(root, "intrinsics", required=not rig.intrinsics)
    stamps = {n: v for n, (_, v) in _named_rows(root / "stamps.txt", "stamps file").items()} \
        if (root / "stamps.txt").is_file() else {}
    depth_dir = root / "depth"
    depth_cams = _read_cameras(root, "depth_intrinsics", required=False) if use_depth else {}
    depth_ext = {}
    if use_depth and (root / "depth_extrinsics.txt").is_file():
        for n, (ln, v) in _named_rows(root / "depth_extrinsics.txt", "depth extrinsics file").items():
            depth_ext[n] = as_matrix4(v, f"{root / 'depth_extrinsics.txt'}:{ln}")
    records, skipped = [], []
    for path, name in select(list(zip(images, names)), sl):
        cid = rig.camera_of.get(name)
        T_wb = rig.base_pose.get(name)
        T_bc = rig.T_base_cam.get(cid) if cid is not None else None
        T = None
        if pose_rows is not None:
            if name in pose_rows:
                ln, v = pose_rows[name]
                if len(v) not in (12, 16):
                    raise InvalidInputError(f"{poses_txt}:{ln}: expected 16 (or 12) numbers after the name, found "
                                            f"{len(v)}; the file is truncated or corrupt")
                T = as_matrix4(v, f"{poses_txt}:{ln}")
        else:
            pose_file = path.with_name(path.stem + ".pose.txt")
            if pose_file.is_file():
                T = read_matrix_file(pose_file)
        T, T_wb = _rig_poses(root, name, cid, T, T_wb, T_bc)
        if T is None:
            skipped.append((name, f"no pose in {poses_txt.name}" if pose_rows is not None
                            else f"no poses.txt and no {path.stem}.pose.txt"))
            continue
        cam = cams.get(name)
        if cam is None and cid is not None:
            cam = rig.intrinsics.get(cid)
        if cam is None:
            cam = cams.get("*")
        if cam is None:
            raise InvalidInputError(f"{root}: no intrinsics for image {name!r} (no line of its own"
                                    + (f", none for its camera {cid!r} in rig.yaml" if cid is not None else "")
                                    + " and no '*' default)")
        stamp = None
        if name in stamps:
            if len(stamps[name]) != 1:
                raise InvalidInputError(f"{root / 'stamps.txt'}: {name}: expected one number")
            stamp = stamps[name][0]
        depth = depth_cam = T_cd = None
        if use_depth:
            for ext in (".png", ".npy"):
                dp = depth_dir / f"{name}{ext}"
                if dp.is_file():
                    depth = FileDepth(dp, depth_scale, (0,))
                    depth_cam = _lookup(depth_cams, name)
                    T_cd = _lookup(depth_ext, name)
                    break
        records.append(FrameRecord(name=name, T_world_cam=T, camera=cam, image=FileImage(path), stamp=stamp,
                                   depth=depth, depth_camera=depth_cam, T_cam_depth=T_cd, camera_id=cid,
                                   T_world_base=T_wb))
    return finalize("folder", root, records, skipped, use_depth)


def _rig_poses(root: Path, name: str, cid: Optional[str], T: Optional[np.ndarray], T_wb: Optional[np.ndarray],
               T_bc: Optional[np.ndarray]) -> Tuple[Optional[np.ndarray], Optional[np.ndarray]]:
    """(T_world_cam, T_world_base) of a frame from what the folder gives: any two of the
    camera pose, the body pose and its camera's mount give the third; all three must agree."""
    if T_bc is None or not (np.all(np.isfinite(T_bc))):
        return T, T_wb
    if T is None and T_wb is not None:
        return T_wb @ T_bc, T_wb
    if T is not None and T_wb is None:
        return T, (T @ invert(T_bc) if np.all(np.isfinite(T)) else None)
    if T is not None and T_wb is not None and np.all(np.isfinite(T)) and np.all(np.isfinite(T_wb)):
        err = float(np.abs(T_wb @ T_bc - T).max())
        if err > RIG_CONSISTENCY_TOL:
            raise InvalidInputError(f"{root}: frame {name!r} (camera {cid!r}): poses.txt disagrees with "
                                    f"T_world_base @ T_base_cam (base_poses.txt, rig.yaml) by {err:.3g}")
    return T, T_wb


# --------------------------------------------------------------------------- writer


def _check_name(name: str) -> None:
    parts = name.split("/")
    if (not name or any(c.isspace() for c in name) or "\\" in name or name.startswith("/")
            or any(p in ("", ".", "..") for p in parts) or name.startswith("#")):
        raise InvalidInputError(f"frame name {name!r} cannot be a file name in a posed folder "
                                "(no whitespace, backslash, empty/./.. parts, leading '/' or '#')")


def _num(x: float) -> str:
    return repr(float(x))


def _camera_line(name: str, cam: Camera) -> str:
    K = cam.K
    vals = [cam.width, cam.height]
    nums = [_num(K[0, 0]), _num(K[1, 1]), _num(K[0, 2]), _num(K[1, 2])]
    if cam.dist is not None:
        nums += [_num(d) for d in cam.dist]
    return " ".join([name, str(vals[0]), str(vals[1])] + nums)


def _same_camera(a: Camera, b: Camera) -> bool:
    da = np.zeros(0) if a.dist is None else a.dist
    db = np.zeros(0) if b.dist is None else b.dist
    return (a.width, a.height) == (b.width, b.height) and np.array_equal(a.K, b.K) and np.array_equal(da, db)


def _encode_image(img: np.ndarray, fmt: str, quality: int, what: str) -> bytes:
    if img.dtype != np.uint8 or not (img.ndim == 2 or (img.ndim == 3 and img.shape[2] == 3)):
        raise InvalidInputError(f"{what}: image must be [H, W, 3] or [H, W] uint8, got {img.dtype} {img.shape}")
    bgr = img if img.ndim == 2 else np.ascontiguousarray(img[:, :, ::-1])
    params = [int(cv2.IMWRITE_JPEG_QUALITY), int(quality)] if fmt == "jpg" else []
    ok, buf = cv2.imencode("." + fmt, bgr, params)
    if not ok:
        raise InvalidInputError(f"{what}: cannot encode image as {fmt}")
    return buf.tobytes()


def write_folder_dataset(frames: Iterable[PosedFrame], out_dir, *, image_format: str = "png",
                         depth_format: str = "png", depth_scale: float = 0.001, jpeg_quality: int = 95,
                         overwrite: bool = False) -> Path:
    """Write posed frames as a posed folder (docs/datasets.md) readable by ``open_dataset('folder', ...)``.

    frames: PosedFrames with image [H, W, 3] uint8 RGB or [H, W] uint8 grey, T_world_cam
    [4, 4] camera-to-world (OpenCV axes, metres), camera matching the image size, and
    optional depth [Hd, Wd] float32 metres (0 invalid) with depth_camera / T_cam_depth.
    image_format: "png" (lossless, default) or "jpg". depth_format: "png" (uint16,
    value = round(depth / depth_scale), so 1 mm steps by default) or "npy" (float32,
    exact). The folder is built beside ``out_dir`` and moved into place at the end, so
    a bad frame (InvalidInputError naming it) leaves no half-written dataset.
    overwrite: replace an existing ``out_dir``; otherwise FileExistsError.
    Returns the output folder.
    """
    out = Path(out_dir).expanduser()
    if image_format not in ("png", "jpg"):
        raise InvalidInputError(f"image_format must be 'png' or 'jpg', got {image_format!r}")
    if depth_format not in ("png", "npy"):
        raise InvalidInputError(f"depth_format must be 'png' or 'npy', got {depth_format!r}")
    if not depth_scale > 0:
        raise InvalidInputError(f"depth_scale must be > 0, got {depth_scale!r}")
    if out.exists() and not overwrite and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} exists and is not empty (pass overwrite=True to replace it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        names, poses, cams, stamps, dcams, dexts = [], [], [], [], [], []
        cam_ids: List[Optional[str]] = []
        bases: List[Optional[np.ndarray]] = []
        seen = set()
        for k, f in enumerate(frames):
            what = f"frame {k} ({getattr(f, 'name', '?')!r})"
            if not isinstance(f, PosedFrame):
                raise InvalidInputError(f"{what}: expected a PosedFrame, got {type(f).__name__}")
            _check_name(f.name)
            if f.name in seen:
                raise InvalidInputError(f"{what}: duplicate frame name")
            seen.add(f.name)
            T = clean_pose(f.T_world_cam, f"{what} T_world_cam")
            img = np.asarray(f.image)
            f.camera.validate()
            if img.shape[:2] != (f.camera.height, f.camera.width):
                raise InvalidInputError(f"{what}: image is {img.shape[1]}x{img.shape[0]} but its camera says "
                                        f"{f.camera.width}x{f.camera.height}")
            dst = tmp / "images" / f"{f.name}.{image_format}"
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.write_bytes(_encode_image(img, image_format, jpeg_quality, what))
            dcam = dext = None
            if f.depth is not None:
                depth = np.asarray(f.depth, dtype=np.float32)
                if depth.ndim != 2:
                    raise InvalidInputError(f"{what}: depth must be [H, W], got {depth.shape}")
                depth = np.where(np.isfinite(depth) & (depth > 0), depth, 0).astype(np.float32)
                dpath = tmp / "depth" / f"{f.name}.{depth_format}"
                dpath.parent.mkdir(parents=True, exist_ok=True)
                if depth_format == "npy":
                    np.save(dpath, depth, allow_pickle=False)
                else:
                    q = np.round(depth.astype(np.float64) / depth_scale)
                    over = q > 65534
                    if over.any():
                        logger.warning("%s: %d depth values beyond %.3f m cannot be stored at depth_scale %g; "
                                       "written as invalid", what, int(over.sum()), 65534 * depth_scale, depth_scale)
                        q[over] = 0
                    ok, buf = cv2.imencode(".png", q.astype(np.uint16))
                    if not ok:
                        raise InvalidInputError(f"{what}: cannot encode depth PNG")
                    dpath.write_bytes(buf.tobytes())
                dcam = f.depth_camera
                if dcam is None:
                    hd, wd = depth.shape
                    dcam = f.camera if (wd, hd) == (f.camera.width, f.camera.height) else \
                        f.camera.scaled(wd / f.camera.width, hd / f.camera.height)
                elif (dcam.width, dcam.height) != (depth.shape[1], depth.shape[0]):
                    raise InvalidInputError(f"{what}: depth is {depth.shape[1]}x{depth.shape[0]} but its camera "
                                            f"says {dcam.width}x{dcam.height}")
                dext = np.eye(4) if f.T_cam_depth is None else clean_pose(f.T_cam_depth, f"{what} T_cam_depth")
            cid = getattr(f, "camera_id", None)  # reloc_ros.rig.RigFrame
            if cid is not None and (not isinstance(cid, str) or any(c.isspace() for c in cid) or cid.startswith("#")):
                raise InvalidInputError(f"{what}: camera_id {cid!r} must be a string without whitespace")
            cam_ids.append(cid or None)
            tb = getattr(f, "T_world_base", None)
            bases.append(None if tb is None else clean_pose(tb, f"{what} T_world_base"))
            names.append(f.name)
            poses.append(T)
            cams.append(f.camera)
            stamps.append(f.stamp)
            dcams.append(dcam)
            dexts.append(dext)
        if not names:
            raise InvalidInputError("write_folder_dataset: no frames to write")
        with open(tmp / "poses.txt", "w") as fh:
            fh.write("# <name> T_world_cam row-major 4x4 (camera-to-world, OpenCV axes, metres)\n")
            for n, T in zip(names, poses):
                fh.write(n + " " + " ".join(_num(v) for v in T.ravel()) + "\n")
        in_rig = _write_rig(tmp, names, poses, cams, cam_ids, bases)
        _write_cameras(tmp / "intrinsics.txt", [n for n in names if n not in in_rig],
                       [c for n, c in zip(names, cams) if n not in in_rig])
        if any(s is not None for s in stamps):
            with open(tmp / "stamps.txt", "w") as fh:
                fh.write("# <name> stamp in seconds\n")
                for n, s in zip(names, stamps):
                    if s is not None:
                        fh.write(f"{n} {_num(s)}\n")
        with_depth = [(n, c, e) for n, c, e in zip(names, dcams, dexts) if c is not None]
        if with_depth:
            _write_cameras(tmp / "depth_intrinsics.txt", [n for n, _, _ in with_depth], [c for _, c, _ in with_depth])
            with open(tmp / "depth_extrinsics.txt", "w") as fh:
                fh.write("# <name|*> T_cam_depth row-major 4x4 (depth camera -> colour camera, metres)\n")
                exts = [e for _, _, e in with_depth]
                if all(np.array_equal(e, exts[0]) for e in exts):
                    fh.write("* " + " ".join(_num(v) for v in exts[0].ravel()) + "\n")
                else:
                    for n, _, e in with_depth:
                        fh.write(n + " " + " ".join(_num(v) for v in e.ravel()) + "\n")
        with open(tmp / "dataset.yaml", "w") as fh:
            # version 1 unless the rig files are used, so older readers read plain folders
            version = 2 if any(c is not None for c in cam_ids) or any(b is not None for b in bases) else 1
            fh.write(f"format: reloc_ros-folder\nversion: {version}\ndepth_scale: {_num(depth_scale)}\n")
        if out.exists():
            shutil.rmtree(out) if out.is_dir() else out.unlink()
        os.chmod(tmp, 0o755)  # mkdtemp makes it 0700
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _write_rig(tmp: Path, names: List[str], poses: List[np.ndarray], cams: List[Camera],
               cam_ids: List[Optional[str]], bases: List[Optional[np.ndarray]]) -> set:
    """camera_ids.txt, base_poses.txt and rig.yaml (per-camera intrinsics where all of a
    camera's frames share one, T_base_cam where every one of its frames gives the same
    T_world_base^-1 T_world_cam). Returns the names whose intrinsics rig.yaml holds."""
    import yaml

    if any(c is not None for c in cam_ids):
        with open(tmp / "camera_ids.txt", "w") as fh:
            fh.write("# <name> <rig camera id>\n")
            for n, c in zip(names, cam_ids):
                if c is not None:
                    fh.write(f"{n} {c}\n")
    if any(b is not None for b in bases):
        with open(tmp / "base_poses.txt", "w") as fh:
            fh.write("# <name> T_world_base row-major 4x4 (body-to-world, metres)\n")
            for n, b in zip(names, bases):
                if b is not None:
                    fh.write(n + " " + " ".join(_num(v) for v in b.ravel()) + "\n")
    spec: Dict[str, dict] = {}
    covered = set()
    for cid in dict.fromkeys(c for c in cam_ids if c is not None):
        idx = [k for k, c in enumerate(cam_ids) if c == cid]
        entry: dict = {}
        if all(_same_camera(cams[k], cams[idx[0]]) for k in idx):
            cam = cams[idx[0]]
            entry["intrinsics"] = {"width": int(cam.width), "height": int(cam.height), "fx": float(cam.K[0, 0]),
                                   "fy": float(cam.K[1, 1]), "cx": float(cam.K[0, 2]), "cy": float(cam.K[1, 2])}
            if cam.dist is not None:
                entry["intrinsics"]["dist"] = [float(d) for d in cam.dist]
            covered |= {names[k] for k in idx}
        if all(bases[k] is not None for k in idx):
            mounts = [invert(bases[k]) @ poses[k] for k in idx]
            if max(float(np.abs(m - mounts[0]).max()) for m in mounts) < 1e-9:
                entry["T_base_cam"] = [float(v) for v in mounts[0].ravel()]
        if entry:
            spec[cid] = entry
    if spec:
        with open(tmp / "rig.yaml", "w") as fh:
            fh.write("# per rig camera: intrinsics (pixels) and T_base_cam (camera optical frame -> body, "
                     "row-major 4x4, metres)\n")
            yaml.safe_dump({"cameras": spec}, fh, sort_keys=False, default_flow_style=None)
    return covered


def _write_cameras(path: Path, names: List[str], cams: List[Camera]) -> None:
    with open(path, "w") as fh:
        fh.write("# <name|*> width height fx fy cx cy [OpenCV distortion k1 k2 p1 p2 ...] (pixels)\n")
        if not cams:
            return
        if all(_same_camera(c, cams[0]) for c in cams):
            fh.write(_camera_line("*", cams[0]) + "\n")
        else:
            for n, c in zip(names, cams):
                fh.write(_camera_line(n, c) + "\n")
