"""TUM RGB-D sequence: ``rgb.txt`` + ``groundtruth.txt`` (+ optional ``depth.txt``)."""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Tuple

import numpy as np

from reloc_ros.datasets.base import (
    Dataset, FileDepth, FileImage, FrameRecord, camera_from_values, finalize, first_image_size, numeric_rows,
    parse_float, quat_xyzw_to_matrix, read_text, read_yaml_mapping, require_dir, select, strip_comment)
from reloc_ros.datasets.trajectory import interpolate_poses
from reloc_ros.types import Camera, InvalidInputError

logger = logging.getLogger("reloc_ros.datasets")

# Published calibration of the three Kinects (fx, fy, cx, cy, k1, k2, p1, p2, k3); the
# freiburg3 colour images are already undistorted. "ros_default" is the nominal set.
TUM_CAMERAS = {
    "fr1": (517.306408, 516.469215, 318.643040, 255.313989, (0.262383, -0.953104, -0.005358, 0.002628, 1.163314)),
    "fr2": (520.908620, 521.007327, 325.141442, 249.701764, (0.231222, -0.784899, -0.003257, -0.000105, 0.917205)),
    "fr3": (535.4, 539.2, 320.1, 247.6, None),
    "ros_default": (525.0, 525.0, 319.5, 239.5, None),
}


@dataclass
class TumOptions:
    """Options of the ``tum`` reader (seconds, pixels, metres).

    max_dt: an image needs a ground-truth sample within this many seconds.
    max_gap: the two samples it is interpolated between must be at most this far apart.
    camera: one of fr1, fr2, fr3, ros_default (default: ``camera.yaml`` in SRC, else
    detected from "freiburgN" in the folder name).
    fx, fy, cx, cy (+ optional dist, width, height): explicit intrinsics, overriding
    the above. width/height default to the first image's size.
    depth_scale: metres per depth-PNG unit (1/5000).
    depth_max_dt: a depth image is paired with an RGB image within this many seconds.
    """

    max_dt: float = 0.02
    max_gap: float = 0.1
    camera: Optional[str] = None
    fx: Optional[float] = None
    fy: Optional[float] = None
    cx: Optional[float] = None
    cy: Optional[float] = None
    dist: Optional[List[float]] = None
    width: Optional[int] = None
    height: Optional[int] = None
    depth_scale: float = 1.0 / 5000.0
    depth_max_dt: float = 0.02

    def validate(self) -> None:
        given = [v is not None for v in (self.fx, self.fy, self.cx, self.cy)]
        if any(given) and not all(given):
            raise ValueError("tum dataset: give all of fx, fy, cx, cy or none")
        if self.camera is not None and self.camera not in TUM_CAMERAS:
            raise ValueError(f"tum dataset: camera must be one of {sorted(TUM_CAMERAS)}, got {self.camera!r}")
        if self.max_dt <= 0 or self.max_gap <= 0 or self.depth_max_dt <= 0 or self.depth_scale <= 0:
            raise ValueError("tum dataset: max_dt, max_gap, depth_max_dt and depth_scale must be > 0")


def read_tum_list(path: Path, what: str) -> List[Tuple[float, str]]:
    """(timestamp seconds, relative file) of each line of rgb.txt / depth.txt."""
    out = []
    for ln, line in enumerate(read_text(path, what).splitlines(), start=1):
        s = strip_comment(line)
        if not s:
            continue
        tok = s.split()
        if len(tok) < 2:
            raise InvalidInputError(f"{path}:{ln}: expected 'timestamp filename'")
        out.append((parse_float(tok[0], f"{path}:{ln}"), tok[1]))
    return out


def read_tum_trajectory(path: Path) -> Tuple[np.ndarray, np.ndarray]:
    """(t [S] seconds, T [S, 4, 4]) from 'timestamp tx ty tz qx qy qz qw' lines, sorted by time.

    Rows with non-finite values are kept (as NaN poses) so the caller can report them.
    """
    ts, Ts = [], []
    for ln, row in numeric_rows(path, "TUM trajectory"):
        if len(row) != 8:
            raise InvalidInputError(f"{path}:{ln}: expected 'timestamp tx ty tz qx qy qz qw', found {len(row)} "
                                    "numbers; the file is truncated or corrupt")
        T = np.eye(4)
        T[:3, :3] = quat_xyzw_to_matrix(row[4:8])
        T[:3, 3] = row[1:4]
        ts.append(row[0])
        Ts.append(T)
    if not ts:
        raise InvalidInputError(f"{path}: no poses")
    t = np.asarray(ts)
    order = np.argsort(t, kind="stable")
    return t[order], np.asarray(Ts)[order]


def camera_from_yaml(path: Path, default_size: Optional[Tuple[int, int]]) -> Camera:
    """Camera from a ROS camera_info YAML (camera_matrix/distortion_coefficients/image_width)
    or a flat one (fx, fy, cx, cy[, dist, width, height])."""
    data = read_yaml_mapping(path, "camera YAML")
    try:
        if "camera_matrix" in data:
            K = np.asarray(data["camera_matrix"]["data"], dtype=np.float64).reshape(3, 3)
            fx, fy, cx, cy = K[0, 0], K[1, 1], K[0, 2], K[1, 2]
            dist = (data.get("distortion_coefficients") or {}).get("data")
            w, h = data.get("image_width"), data.get("image_height")
        else:
            fx, fy, cx, cy = (float(data[k]) for k in ("fx", "fy", "cx", "cy"))
            dist = data.get("dist")
            w, h = data.get("width"), data.get("height")
    except (KeyError, TypeError, ValueError) as e:
        raise InvalidInputError(f"{path}: cannot read intrinsics ({e!r})") from None
    if w is None or h is None:
        if default_size is None:
            raise InvalidInputError(f"{path}: no image size and none could be read from the images")
        w, h = default_size
    return camera_from_values(fx, fy, cx, cy, int(w), int(h), dist if dist is not None and any(dist) else None,
                              where=str(path))


def _tum_camera(root: Path, opts: TumOptions, size: Optional[Tuple[int, int]]) -> Camera:
    w = opts.width if opts.width is not None else (size[0] if size else 640)
    h = opts.height if opts.height is not None else (size[1] if size else 480)
    if opts.fx is not None:
        return camera_from_values(opts.fx, opts.fy, opts.cx, opts.cy, w, h, opts.dist, where="tum intrinsics")
    key = opts.camera
    if key is None:
        if (root / "camera.yaml").is_file():
            return camera_from_yaml(root / "camera.yaml", (w, h))
        m = re.search(r"freiburg([123])", root.resolve().name) or re.search(r"(?:^|[^a-z])fr([123])(?:[^0-9]|$)",
                                                                           root.resolve().name)
        if m is None:
            raise InvalidInputError(f"{root}: cannot tell the TUM camera (no camera.yaml, no 'freiburgN' in the "
                                    "folder name); pass camera=fr1|fr2|fr3|ros_default or fx, fy, cx, cy")
        key = f"fr{m.group(1)}"
    fx, fy, cx, cy, dist = TUM_CAMERAS[key]
    return camera_from_values(fx, fy, cx, cy, w, h, dist, where=f"tum camera {key}")


def _nearest(t_sorted: np.ndarray, t: float) -> Tuple[int, float]:
    i = int(np.searchsorted(t_sorted, t))
    best, dbest = -1, float("inf")
    for j in (i - 1, i):
        if 0 <= j < len(t_sorted) and abs(t_sorted[j] - t) < dbest:
            best, dbest = j, abs(t_sorted[j] - t)
    return best, dbest


def open_tum(src: Path, sl: slice, use_depth: bool, opts: TumOptions) -> Dataset:
    """Read a TUM RGB-D sequence; frames sorted by RGB timestamp (names: image file stems).

    groundtruth.txt gives the colour camera's optical centre and orientation
    (camera-to-world, metres); it is interpolated to each RGB stamp. Depth (depth.txt,
    PNG / depth_scale metres) is registered to the colour image.
    """
    root = require_dir(src, "TUM sequence folder")
    rgb = read_tum_list(root / "rgb.txt", "TUM rgb.txt")
    if not rgb:
        raise InvalidInputError(f"{root / 'rgb.txt'}: no images")
    rgb.sort(key=lambda e: e[0])
    t_gt, T_gt = read_tum_trajectory(root / "groundtruth.txt")
    finite = np.all(np.isfinite(T_gt.reshape(len(T_gt), -1)), axis=1)
    if not finite.all():
        logger.warning("%s: ignoring %d ground-truth rows with NaN/inf or a zero quaternion",
                       root / "groundtruth.txt", int((~finite).sum()))
    t_gt, T_gt = t_gt[finite], T_gt[finite]
    keep = np.concatenate([[True], np.diff(t_gt) > 0]) if len(t_gt) else np.zeros(0, bool)
    t_gt, T_gt = t_gt[keep], T_gt[keep]
    depth_list: List[Tuple[float, str]] = []
    if use_depth and (root / "depth.txt").is_file():
        depth_list = sorted(read_tum_list(root / "depth.txt", "TUM depth.txt"))
    t_depth = np.asarray([d[0] for d in depth_list])
    chosen = select(rgb, sl)
    size = first_image_size([root / f for _, f in chosen[:5]])
    camera = _tum_camera(root, opts, size)
    T_q, ok, reasons = interpolate_poses(np.asarray([t for t, _ in chosen]), t_gt, T_gt, opts.max_gap, opts.max_dt)
    records, skipped = [], []
    for k, (t, f) in enumerate(chosen):
        name = Path(f).stem
        if not ok[k]:
            skipped.append((name, f"no ground truth at t={t:.6f}: {reasons[k]}"))
            continue
        path = root / f
        if not path.is_file():
            skipped.append((name, f"image file missing: {path}"))
            continue
        depth = None
        if len(depth_list):
            j, dt = _nearest(t_depth, t)
            if dt <= opts.depth_max_dt and (root / depth_list[j][1]).is_file():
                depth = FileDepth(root / depth_list[j][1], opts.depth_scale, (0,))
        records.append(FrameRecord(name=name, T_world_cam=T_q[k], camera=camera, image=FileImage(path), stamp=t,
                                   depth=depth))
    return finalize("tum", root, records, skipped, use_depth)
