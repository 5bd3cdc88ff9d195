"""Microsoft 7-Scenes sequence folder: ``frame-NNNNNN.color.{jpg,png}``, ``.depth.png``, ``.pose.txt``."""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np

from reloc_ros.datasets.base import (
    Dataset, FileDepth, FileImage, FrameRecord, as_matrix4, camera_from_values, finalize, require_dir,
    read_matrix_file, select)
from reloc_ros.types import InvalidInputError


@dataclass
class SevenScenesOptions:
    """Options of the ``7scenes`` reader (pixels, metres).

    fx, fy, cx, cy: colour intrinsics (the published 525, 525, 320, 240).
    width, height: colour image size (640x480).
    depth_fx, depth_fy, depth_cx, depth_cy: depth-camera intrinsics; the Kinect depth
    camera is not registered to the colour camera and has its own focal length (585).
    depth_fy defaults to depth_fx.
    depth_registered: treat depth as registered to the colour image (depth camera =
    colour camera, T_cam_depth = I), ignoring the depth_* intrinsics.
    T_cam_depth: depth -> colour camera [4, 4] (16 numbers or a text file); identity
    when not given (no calibration is published).
    """

    fx: float = 525.0
    fy: float = 525.0
    cx: float = 320.0
    cy: float = 240.0
    width: int = 640
    height: int = 480
    depth_fx: float = 585.0
    depth_fy: Optional[float] = None
    depth_cx: float = 320.0
    depth_cy: float = 240.0
    depth_registered: bool = False
    T_cam_depth: Optional[Any] = None


_FRAME_RE = re.compile(r"^frame-(\d+)\.color\.(jpg|jpeg|png)$", re.IGNORECASE)


def open_7scenes(src: Path, sl: slice, use_depth: bool, opts: SevenScenesOptions) -> Dataset:
    """Read a 7-Scenes sequence folder; frames sorted by frame number.

    Poses are camera-to-world, OpenCV axes, metres. Depth: uint16 millimetres, 0 and
    65535 invalid -> [H, W] float32 metres with 0 invalid.
    """
    root = require_dir(src, "7-Scenes sequence folder")
    found = {}
    for p in root.iterdir():
        m = _FRAME_RE.match(p.name)
        if m:
            num = int(m.group(1))
            if num in found:
                raise InvalidInputError(f"{root}: two colour images for frame {num}: {found[num].name}, {p.name}")
            found[num] = p
    if not found:
        raise InvalidInputError(f"{root}: no 7-Scenes frames (frame-NNNNNN.color.jpg) found")
    nums = sorted(found)
    camera = camera_from_values(opts.fx, opts.fy, opts.cx, opts.cy, opts.width, opts.height, where="7scenes camera")
    if opts.depth_registered:
        depth_camera = camera
    else:
        dfy = opts.depth_fy if opts.depth_fy is not None else opts.depth_fx
        depth_camera = camera_from_values(opts.depth_fx, dfy, opts.depth_cx, opts.depth_cy, opts.width, opts.height,
                                          where="7scenes depth camera")
    T_cam_depth = np.eye(4)
    if opts.T_cam_depth is not None and not opts.depth_registered:
        T_cam_depth = as_matrix4(opts.T_cam_depth, "7scenes T_cam_depth")
    records, skipped = [], []
    for num in select(nums, sl):
        img = found[num]
        stem = img.name.split(".color.")[0]
        pose_path = root / f"{stem}.pose.txt"
        if not pose_path.is_file():
            skipped.append((stem, f"no pose file {pose_path.name}"))
            continue
        T = read_matrix_file(pose_path)
        depth_path = root / f"{stem}.depth.png"
        has_depth = use_depth and depth_path.is_file()
        records.append(FrameRecord(
            name=stem, T_world_cam=T, camera=camera, image=FileImage(img),
            depth=FileDepth(depth_path, 0.001, (0, 65535)) if has_depth else None,
            depth_camera=depth_camera if has_depth else None,
            T_cam_depth=T_cam_depth if has_depth else None))
    return finalize("7scenes", root, records, skipped, use_depth)
