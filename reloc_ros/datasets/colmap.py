"""COLMAP text model (``cameras.txt``, ``images.txt``) plus its image folder."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np

from reloc_ros.datasets.base import (
    Dataset, FileImage, FrameRecord, camera_from_values, finalize, natural_key, parse_float, quat_xyzw_to_matrix,
    read_text, require_dir, select)
from reloc_ros.types import Camera, InvalidInputError


@dataclass
class ColmapOptions:
    """Options of the ``colmap`` reader.

    images: image folder (default: the first of ``MODEL/images``, ``MODEL/../images``,
    ``MODEL/../../images``, ``SRC/images`` that exists).
    model: folder with cameras.txt/images.txt (default: SRC, else SRC/sparse/0, SRC/sparse).
    """

    images: Optional[str] = None
    model: Optional[str] = None


def _camera_from_colmap(model: str, w: int, h: int, p: List[float], where: str) -> Camera:
    """Camera (OpenCV pixel convention) of one COLMAP camera model and its parameters."""
    model = model.upper()
    need = {"SIMPLE_PINHOLE": 3, "PINHOLE": 4, "SIMPLE_RADIAL": 4, "RADIAL": 5, "OPENCV": 8, "FULL_OPENCV": 12}
    if model not in need:
        raise InvalidInputError(f"{where}: camera model {model} is not supported "
                                f"(supported: {', '.join(need)})")
    if len(p) != need[model]:
        raise InvalidInputError(f"{where}: {model} needs {need[model]} parameters, found {len(p)}")
    dist: Optional[List[float]] = None
    if model == "SIMPLE_PINHOLE":
        fx = fy = p[0]
        cx, cy = p[1], p[2]
    elif model == "PINHOLE":
        fx, fy, cx, cy = p
    elif model == "SIMPLE_RADIAL":
        fx = fy = p[0]
        cx, cy = p[1], p[2]
        dist = [p[3], 0.0, 0.0, 0.0]
    elif model == "RADIAL":
        fx = fy = p[0]
        cx, cy = p[1], p[2]
        dist = [p[3], p[4], 0.0, 0.0]
    elif model == "OPENCV":
        fx, fy, cx, cy = p[:4]
        dist = p[4:8]
    else:  # FULL_OPENCV: k1 k2 p1 p2 k3 k4 k5 k6 is OpenCV's rational model order
        fx, fy, cx, cy = p[:4]
        dist = p[4:12]
    # COLMAP puts the centre of the top-left pixel at (0.5, 0.5); OpenCV (and every
    # keypoint we extract) at (0, 0).
    return camera_from_values(fx, fy, cx - 0.5, cy - 0.5, w, h, dist, where=where)


def read_colmap_cameras(path: Path) -> Dict[int, Camera]:
    """camera id -> Camera (OpenCV pixel convention) from a COLMAP cameras.txt."""
    cams: Dict[int, Camera] = {}
    for ln, line in enumerate(read_text(path, "COLMAP cameras.txt").splitlines(), start=1):
        s = line.strip()
        if not s or s.startswith("#"):
            continue
        tok = s.split()
        where = f"{path}:{ln}"
        if len(tok) < 4:
            raise InvalidInputError(f"{where}: expected 'CAMERA_ID MODEL WIDTH HEIGHT PARAMS...'")
        try:
            cid, w, h = int(tok[0]), int(tok[2]), int(tok[3])
        except ValueError:
            raise InvalidInputError(f"{where}: camera id, width and height must be integers") from None
        cams[cid] = _camera_from_colmap(tok[1], w, h, [parse_float(t, where) for t in tok[4:]], where)
    return cams


def read_colmap_images(path: Path) -> List[Tuple[str, np.ndarray, int]]:
    """(name, T_world_cam [4, 4], camera id) of each image of a COLMAP images.txt.

    COLMAP stores world-to-camera (qvec w, x, y, z; tvec), inverted here.
    """
    out = []
    lines = read_text(path, "COLMAP images.txt").splitlines()
    i = 0
    while i < len(lines):
        s = lines[i].strip()
        ln = i + 1
        i += 1
        if not s or s.startswith("#"):
            continue
        tok = s.split()
        where = f"{path}:{ln}"
        if len(tok) < 10:
            raise InvalidInputError(f"{where}: expected 'IMAGE_ID QW QX QY QZ TX TY TZ CAMERA_ID NAME', "
                                    f"found {len(tok)} fields; the file is truncated or corrupt")
        qw, qx, qy, qz, tx, ty, tz = (parse_float(t, where) for t in tok[1:8])
        try:
            cid = int(tok[8])
        except ValueError:
            raise InvalidInputError(f"{where}: camera id {tok[8]!r} is not an integer") from None
        R_cw = quat_xyzw_to_matrix((qx, qy, qz, qw))
        t_cw = np.array([tx, ty, tz])
        T = np.eye(4)
        T[:3, :3] = R_cw.T
        T[:3, 3] = -R_cw.T @ t_cw
        out.append((" ".join(tok[9:]), T, cid))
        i += 1  # the POINTS2D line that follows every image line (possibly empty)
    return out


def _find_model(root: Path, opts: ColmapOptions) -> Path:
    if opts.model:
        model = require_dir(Path(opts.model), "COLMAP model folder")
    else:
        cands = [root, root / "sparse" / "0", root / "sparse"]
        model = next((c for c in cands if (c / "cameras.txt").is_file()), None)
        if model is None:
            binary = next((c for c in cands if (c / "cameras.bin").is_file()), None)
            if binary is not None:
                raise InvalidInputError(f"{binary}: binary COLMAP model; convert it to text first "
                                        f"(colmap model_converter --input_path {binary} --output_path {binary} "
                                        "--output_type TXT)")
            raise FileNotFoundError(f"{root}: no COLMAP text model (cameras.txt, images.txt) in "
                                    f"{', '.join(str(c) for c in cands)}")
    return model


def open_colmap(src: Path, sl: slice, use_depth: bool, opts: ColmapOptions) -> Dataset:
    """Read a COLMAP text model; frames sorted by image name (names are COLMAP's NAME).

    points3D.txt is ignored. Principal points are shifted by -0.5 px into OpenCV's pixel
    convention.
    """
    root = require_dir(src, "COLMAP folder")
    model = _find_model(root, opts)
    cams = read_colmap_cameras(model / "cameras.txt")
    entries = read_colmap_images(model / "images.txt")
    if opts.images:
        img_dir = require_dir(Path(opts.images), "COLMAP image folder")
    else:
        cands = [model / "images", model.parent / "images", model.parent.parent / "images", root / "images"]
        img_dir = next((c for c in cands if c.is_dir()), None)
        if img_dir is None:
            raise FileNotFoundError(f"no image folder for COLMAP model {model}; pass images=PATH "
                                    f"(looked in {', '.join(str(c) for c in cands)})")
    entries.sort(key=lambda e: natural_key(e[0]))
    records, skipped = [], []
    for name, T, cid in select(entries, sl):
        if cid not in cams:
            raise InvalidInputError(f"{model / 'images.txt'}: image {name} uses camera {cid}, "
                                    "which cameras.txt does not define")
        path = img_dir / name
        if not path.is_file():
            skipped.append((name, f"image file missing: {path}"))
            continue
        records.append(FrameRecord(name=name, T_world_cam=T, camera=cams[cid], image=FileImage(path)))
    return finalize("colmap", root, records, skipped, use_depth)
