"""KITTI odometry sequence: grey left images, ``poses.txt`` (3x4 a line), ``calib.txt`` (P0)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

import numpy as np

from reloc_ros.datasets.base import (
    Dataset, FileImage, FrameRecord, camera_from_values, finalize, first_image_size, list_images,
    numeric_rows, parse_float, read_text, require_dir, select)
from reloc_ros.types import InvalidInputError


@dataclass
class KittiOptions:
    """Options of the ``kitti`` reader.

    image_dir: image folder relative to SRC (default: ``image_l``, else ``image_0``).
    poses: pose file (default: ``SRC/poses.txt``, else the odometry layout's
    ``SRC/../../poses/<SRC name>.txt``), one row-major 3x4 camera-to-world a line.
    calib: calibration file (default ``SRC/calib.txt``), P0 (``P0: ...`` or the first
    12-number line) gives K of the left grey camera.
    """

    image_dir: Optional[str] = None
    poses: Optional[str] = None
    calib: Optional[str] = None


def read_kitti_poses(path: Path) -> List[np.ndarray]:
    """[4, 4] camera-to-world of each line of a KITTI pose file (12 numbers a line)."""
    out = []
    for ln, row in numeric_rows(path, "KITTI pose file"):
        if len(row) != 12:
            raise InvalidInputError(f"{path}:{ln}: expected 12 numbers (3x4 pose), found {len(row)}; "
                                    "the file is truncated or corrupt")
        out.append(np.vstack([np.asarray(row).reshape(3, 4), [0, 0, 0, 1]]))
    return out


def read_kitti_p0(path: Path) -> np.ndarray:
    """[3, 4] projection matrix P0 (pixels) from a KITTI calib file."""
    for ln, line in enumerate(read_text(path, "KITTI calib file").splitlines(), start=1):
        s = line.strip()
        if not s:
            continue
        key, _, rest = s.partition(":") if ":" in s else ("", "", s)
        if key and key.strip() != "P0":
            continue
        vals = [parse_float(t, f"{path}:{ln}") for t in rest.split()]
        if len(vals) != 12:
            raise InvalidInputError(f"{path}:{ln}: P0 needs 12 numbers, found {len(vals)}")
        return np.asarray(vals).reshape(3, 4)
    raise InvalidInputError(f"{path}: no P0 projection matrix")


def open_kitti(src: Path, sl: slice, use_depth: bool, opts: KittiOptions) -> Dataset:
    """Read a KITTI odometry sequence (left grey camera); frames sorted by number.

    Poses are camera i -> camera 0 (camera-to-world), OpenCV axes, metres; images are
    [H, W] uint8 grey. ``times.txt`` (seconds) fills the stamps when present.
    """
    root = require_dir(src, "KITTI sequence folder")
    if opts.image_dir:
        img_dir = require_dir(root / opts.image_dir, "KITTI image folder")
    else:
        cands = [root / d for d in ("image_l", "image_0") if (root / d).is_dir()]
        if not cands:
            raise FileNotFoundError(f"{root}: no KITTI image folder (image_l/ or image_0/)")
        img_dir = cands[0]
    images = list_images(img_dir)
    if not images:
        raise InvalidInputError(f"{img_dir}: no images")
    if opts.poses:
        pose_path = Path(opts.poses)
    else:
        pose_path = root / "poses.txt"
        alt = root.parent.parent / "poses" / f"{root.name}.txt"
        if not pose_path.is_file() and alt.is_file():
            pose_path = alt
    poses = read_kitti_poses(pose_path)
    if len(poses) != len(images):
        raise InvalidInputError(f"{pose_path} has {len(poses)} poses but {img_dir} has {len(images)} images; "
                                "the pose file is truncated or belongs to another sequence")
    P0 = read_kitti_p0(Path(opts.calib) if opts.calib else root / "calib.txt")
    K = P0[:, :3]
    stamps: List[Optional[float]] = [None] * len(images)
    times = root / "times.txt"
    if times.is_file():
        rows = numeric_rows(times, "KITTI times file")
        if len(rows) != len(images):
            raise InvalidInputError(f"{times} has {len(rows)} stamps but {img_dir} has {len(images)} images")
        stamps = [r[1][0] for r in rows]
    chosen = select(range(len(images)), sl)
    size = first_image_size([images[i] for i in chosen] or images)
    if size is None:
        raise InvalidInputError(f"{img_dir}: cannot read the size of any image")
    camera = camera_from_values(K[0, 0], K[1, 1], K[0, 2], K[1, 2], size[0], size[1], where=f"P0 of {root}")
    records = [FrameRecord(name=images[i].stem, T_world_cam=poses[i], camera=camera, image=FileImage(images[i]),
                           stamp=stamps[i]) for i in chosen]
    return finalize("kitti", root, records, (), use_depth)
