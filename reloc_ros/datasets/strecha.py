"""EPFL/Strecha multi-view benchmark: ``images/NNNN.jpg`` + ``gt_dense_cameras/NNNN.jpg.camera``."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Tuple

import numpy as np

from reloc_ros.datasets.base import (
    Dataset, FileImage, FrameRecord, camera_from_values, finalize, list_images, numeric_rows, require_dir, select)
from reloc_ros.types import Camera, InvalidInputError


@dataclass
class StrechaOptions:
    """Options of the ``strecha`` reader.

    image_dir, camera_dir: folders relative to SRC (``images``, ``gt_dense_cameras``).
    """

    image_dir: str = "images"
    camera_dir: str = "gt_dense_cameras"


def read_strecha_camera(path: Path) -> Tuple[np.ndarray, Camera]:
    """(T_world_cam [4, 4], Camera) from a Strecha ``.camera`` file.

    Layout: K (3 lines), distortion (1 line), R camera-to-world (3 lines), camera centre
    C in world metres (1 line), ``width height``; so T_world_cam = [R | C].
    """
    rows = [r for _, r in numeric_rows(path, "Strecha camera file")]
    if len(rows) < 9 or any(len(r) != 3 for r in rows[:3] + rows[4:8]) or len(rows[8]) != 2:
        raise InvalidInputError(f"{path}: expected K (3 lines of 3), distortion, R (3 lines of 3), C (3) and "
                                f"'width height'; the file is truncated or corrupt")
    K = np.asarray(rows[0:3])
    dist = rows[3]
    R = np.asarray(rows[4:7])
    C = np.asarray(rows[7])
    w, h = rows[8]
    d = None
    if any(dist):
        d = list(dist) + [0.0] * max(0, 4 - len(dist))
    cam = camera_from_values(K[0, 0], K[1, 1], K[0, 2], K[1, 2], int(w), int(h), d, where=str(path))
    T = np.eye(4)
    T[:3, :3] = R
    T[:3, 3] = C
    return T, cam


def open_strecha(src: Path, sl: slice, use_depth: bool, opts: StrechaOptions) -> Dataset:
    """Read a Strecha scene folder; frames sorted by image name (names are the stems)."""
    root = require_dir(src, "Strecha scene folder")
    img_dir = require_dir(root / opts.image_dir, "Strecha image folder")
    cam_dir = require_dir(root / opts.camera_dir, "Strecha camera folder")
    images = list_images(img_dir)
    if not images:
        raise InvalidInputError(f"{img_dir}: no images")
    records, skipped = [], []
    for img in select(images, sl):
        cam_path = cam_dir / f"{img.name}.camera"
        if not cam_path.is_file():
            skipped.append((img.stem, f"no ground-truth camera {cam_path.name}"))
            continue
        T, cam = read_strecha_camera(cam_path)
        records.append(FrameRecord(name=img.stem, T_world_cam=T, camera=cam, image=FileImage(img)))
    return finalize("strecha", root, records, skipped, use_depth)
