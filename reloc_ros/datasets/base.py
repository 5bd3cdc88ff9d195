"""The one form every dataset reader produces: a lazily loaded sequence of posed frames.

A reader lists the frames of its source, sorts them, applies the ``frames`` slice,
reads poses and intrinsics (cheap, no image decoding) and hands ``FrameRecord``s to
``finalize``, which drops frames whose pose is not a finite rigid transform (so a NaN
pose never reaches a map) and builds the ``Dataset``. Images and depth are decoded only
in ``Dataset.__getitem__``.
"""
from __future__ import annotations

import dataclasses
import logging
import re
from pathlib import Path
from typing import Any, Callable, Iterator, List, Mapping, Optional, Sequence, Tuple, Type, TypeVar, Union

import cv2
import numpy as np

from reloc_ros.geometry import check_pose
from reloc_ros.types import Camera, InvalidInputError, PosedFrame

logger = logging.getLogger("reloc_ros.datasets")

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".ppm", ".pgm")

# Rigidity tolerance on R^T R - I: poses in text files carry 6-8 significant digits.
POSE_TOL = 1e-3

C = TypeVar("C")


# --------------------------------------------------------------------------- frames


def parse_frames(frames: Union[None, str, slice, int]) -> slice:
    """Parse a frame selection into a python slice over the sorted frame list.

    frames: None or "" (all), "start:stop:step" with any part empty ("0:250:5",
    "::10", "-20:"), a single index "7" (that one frame), an int, or a slice.
    Raises InvalidInputError for anything else or a zero step.
    """
    if frames is None:
        return slice(None)
    if isinstance(frames, slice):
        sl = frames
    elif isinstance(frames, (int, np.integer)) and not isinstance(frames, bool):
        i = int(frames)
        sl = slice(i, i + 1 if i != -1 else None)
    elif isinstance(frames, str):
        text = frames.strip()
        if text == "":
            return slice(None)
        parts = text.split(":")
        if len(parts) > 3:
            raise InvalidInputError(f"frames {frames!r}: expected start:stop:step")
        try:
            vals = [int(p) if p.strip() != "" else None for p in parts]
        except ValueError:
            raise InvalidInputError(f"frames {frames!r}: start, stop and step must be integers") from None
        if len(vals) == 1:
            i = vals[0]
            if i is None:
                return slice(None)
            sl = slice(i, i + 1 if i != -1 else None)
        else:
            vals += [None] * (3 - len(vals))
            sl = slice(*vals)
    else:
        raise InvalidInputError(f"frames must be a 'start:stop:step' string, got {frames!r}")
    if sl.step == 0:
        raise InvalidInputError(f"frames {frames!r}: step must not be zero")
    return sl


def natural_key(text: str) -> list:
    """Sort key that orders embedded numbers numerically ("img2" < "img10")."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", text)]


# --------------------------------------------------------------------------- options


def parse_options(cls: Type[C], options: Mapping[str, Any], fmt: str) -> C:
    """Typed options dataclass ``cls`` from ``options`` (strings from a CLI are coerced).

    None values mean "use the default". Raises InvalidInputError naming the bad key.
    """
    from reloc_ros.config import from_dict

    data = {k: v for k, v in dict(options or {}).items() if v is not None}
    try:
        return from_dict(cls, data, where=f"{fmt} dataset")
    except ValueError as e:
        raise InvalidInputError(str(e)) from None


# --------------------------------------------------------------------------- text files

_WINDOWS_NAN = re.compile(r"^[-+]?\d*\.?\d*#(IND|QNAN|SNAN|INF)\w*$", re.IGNORECASE)


def parse_float(token: str, where: str) -> float:
    """float(token), also reading MSVC's "-1.#IND" / "1.#INF" spellings as NaN."""
    try:
        return float(token)
    except ValueError:
        if _WINDOWS_NAN.match(token):
            return float("nan")
        raise InvalidInputError(f"{where}: {token!r} is not a number") from None


def read_text(path: Path, what: str = "file") -> str:
    """Text of ``path``; FileNotFoundError / InvalidInputError with the path on failure."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        return path.read_text(encoding="utf-8", errors="strict")
    except UnicodeDecodeError:
        raise InvalidInputError(f"{path}: not a text file") from None


def read_yaml_mapping(path: Path, what: str, expected: str = "a mapping") -> dict:
    """A YAML file whose top level is a mapping; InvalidInputError naming the file otherwise."""
    import yaml

    try:
        data = yaml.safe_load(read_text(path, what))
    except yaml.YAMLError as e:
        raise InvalidInputError(f"{path}: invalid YAML ({e})") from None
    if not isinstance(data, dict):
        raise InvalidInputError(f"{path}: expected {expected}")
    return data


_COMMENT = re.compile(r"(?:^|\s)#")


def strip_comment(line: str) -> str:
    """``line`` without a '#' comment (one at the start or after whitespace, so MSVC's
    "-1.#IND" stays a number), stripped."""
    m = _COMMENT.search(line)
    return (line[:m.start()] if m else line).strip()


def numeric_rows(path: Path, what: str = "file") -> List[Tuple[int, List[float]]]:
    """(1-based line number, numbers) of each non-empty, non-comment line of a text file."""
    rows = []
    for ln, line in enumerate(read_text(path, what).splitlines(), start=1):
        s = strip_comment(line)
        if not s:
            continue
        rows.append((ln, [parse_float(t, f"{path}:{ln}") for t in s.replace(",", " ").split()]))
    return rows


def read_matrix_file(path: Path, what: str = "pose file") -> np.ndarray:
    """A 4x4 (16 numbers) or 3x4 (12 numbers) matrix from a text file, as [4, 4] float64.

    Values may be NaN (then the pose is rejected later, not here). A file with any other
    count is truncated or corrupt: InvalidInputError naming the file.
    """
    vals = [v for _, row in numeric_rows(path, what) for v in row]
    if len(vals) == 16:
        return np.asarray(vals, dtype=np.float64).reshape(4, 4)
    if len(vals) == 12:
        return np.vstack([np.asarray(vals, dtype=np.float64).reshape(3, 4), [0, 0, 0, 1]])
    raise InvalidInputError(
        f"{path}: expected 16 numbers (4x4 pose) or 12 (3x4), found {len(vals)}; the file is truncated or corrupt")


def pose_problem(T: np.ndarray, tol: float = POSE_TOL) -> Optional[str]:
    """None when T [4, 4] is a finite rigid transform, else why not (for ``ds.skipped``)."""
    T = np.asarray(T, dtype=np.float64)
    if T.shape != (4, 4):
        return f"pose has shape {T.shape}, expected (4, 4)"
    if not np.all(np.isfinite(T)):
        return "pose contains NaN or inf"
    if not np.allclose(T[3], [0, 0, 0, 1], atol=tol):
        return f"pose last row is {T[3].tolist()}, expected [0, 0, 0, 1]"
    R = T[:3, :3]
    err = float(np.abs(R.T @ R - np.eye(3)).max())
    if err > tol:
        return f"pose rotation is not orthonormal (max |R^T R - I| = {err:.3g})"
    det = float(np.linalg.det(R))
    if abs(det - 1.0) > tol:
        return f"pose rotation has determinant {det:.4g}, expected +1"
    return None


def clean_pose(T: np.ndarray, what: str = "pose") -> np.ndarray:
    """[4, 4] float64 copy of a rigid T (InvalidInputError otherwise), its rotation
    re-orthonormalised only when it is not orthonormal to machine precision already,
    so that exact poses round-trip bit for bit."""
    T = np.array(T, dtype=np.float64)
    if T.shape == (4, 4) and np.all(np.isfinite(T)) and np.abs(T[:3, :3].T @ T[:3, :3] - np.eye(3)).max() < 1e-12 \
            and np.array_equal(T[3], [0.0, 0.0, 0.0, 1.0]) and np.linalg.det(T[:3, :3]) > 0:
        return T
    return check_pose(T, what, tol=POSE_TOL)


def quat_xyzw_to_matrix(q: Sequence[float]) -> np.ndarray:
    """[3, 3] rotation of a quaternion (x, y, z, w) (normalised here; zero norm -> NaN)."""
    x, y, z, w = (float(v) for v in q)
    n = np.sqrt(x * x + y * y + z * z + w * w)
    if not np.isfinite(n) or n < 1e-12:
        return np.full((3, 3), np.nan)
    x, y, z, w = x / n, y / n, z / n, w / n
    return np.array([
        [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
        [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
        [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
    ])


def camera_from_values(fx: float, fy: float, cx: float, cy: float, width: int, height: int,
                       dist: Optional[Sequence[float]] = None, where: str = "camera") -> Camera:
    """A validated Camera (pixels) or InvalidInputError naming ``where``."""
    K = np.array([[fx, 0.0, cx], [0.0, fy, cy], [0.0, 0.0, 1.0]], dtype=np.float64)
    d = None if dist is None else np.asarray(list(dist), dtype=np.float64)
    if d is not None and (d.size not in (4, 5, 8, 12, 14) or not np.all(np.isfinite(d))):
        raise InvalidInputError(f"{where}: distortion must be 4, 5, 8, 12 or 14 finite OpenCV coefficients, "
                                f"got {list(dist)}")
    cam = Camera(K, int(width), int(height), d)
    try:
        cam.validate()
    except InvalidInputError as e:
        raise InvalidInputError(f"{where}: {e}") from None
    return cam


# --------------------------------------------------------------------------- images


def _jpeg_truncated(data: bytes) -> bool:
    # Entropy-coded data byte-stuffs 0xFF, so FFD9 (EOI) and FFDA (SOS) only occur as
    # markers; an EXIF thumbnail's EOI comes before the main image's last SOS.
    return data.rfind(b"\xff\xd9") < data.rfind(b"\xff\xda")


def decode_image_bytes(data: bytes, what: str) -> np.ndarray:
    """Decode an encoded image (PNG, JPEG, ...) to [H, W, 3] uint8 RGB or [H, W] uint8 grey.

    16-bit images are scaled to 8 bits (value / 257). Corrupt, truncated or empty data
    raises InvalidInputError naming ``what``.
    """
    if not data:
        raise InvalidInputError(f"{what}: empty image file")
    if data[:2] == b"\xff\xd8" and _jpeg_truncated(data):
        raise InvalidInputError(f"{what}: truncated JPEG (no end-of-image marker after the last scan)")
    if data[:8] == b"\x89PNG\r\n\x1a\n" and b"IEND" not in data[-64:]:
        raise InvalidInputError(f"{what}: truncated PNG (no IEND chunk)")
    img = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_UNCHANGED)
    if img is None or img.size == 0:
        raise InvalidInputError(f"{what}: cannot decode image (corrupt or unsupported format)")
    return to_rgb8(img, what, bgr=True)


def to_rgb8(img: np.ndarray, what: str, bgr: bool) -> np.ndarray:
    """Normalise a decoded array to [H, W, 3] uint8 RGB or [H, W] uint8 grey.

    bgr: channel order of 3/4-channel input (OpenCV decodes to BGR).
    """
    if img.dtype == np.uint16:
        img = ((img.astype(np.uint32) + 128) // 257).astype(np.uint8)
    elif img.dtype != np.uint8:
        raise InvalidInputError(f"{what}: unsupported image dtype {img.dtype}")
    if img.ndim == 3 and img.shape[2] == 1:
        img = img[:, :, 0]
    if img.ndim == 2:
        return np.ascontiguousarray(img)
    if img.ndim != 3 or img.shape[2] not in (3, 4):
        raise InvalidInputError(f"{what}: unsupported image shape {img.shape}")
    if img.shape[2] == 4:
        img = img[:, :, :3]
    if bgr:
        img = img[:, :, ::-1]
    return np.ascontiguousarray(img)


def read_image_file(path: Path) -> np.ndarray:
    """Decode an image file to [H, W, 3] uint8 RGB or [H, W] uint8 grey (InvalidInputError)."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise InvalidInputError(f"{path}: cannot read image ({e.strerror or e})") from None
    return decode_image_bytes(data, str(path))


def image_file_size(path: Path) -> Optional[Tuple[int, int]]:
    """(width, height) in pixels from a PNG or JPEG header without decoding; None if unknown."""
    try:
        with open(path, "rb") as f:
            head = f.read(64 * 1024)
    except OSError:
        return None
    if head[:8] == b"\x89PNG\r\n\x1a\n" and len(head) >= 24 and head[12:16] == b"IHDR":
        return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")
    if head[:2] == b"\xff\xd8":
        i = 2
        while i + 9 < len(head):
            if head[i] != 0xFF:
                i += 1
                continue
            marker = head[i + 1]
            if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7 or marker == 0xFF:
                i += 1 if marker == 0xFF else 2
                continue
            seglen = int.from_bytes(head[i + 2:i + 4], "big")
            if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
                h = int.from_bytes(head[i + 5:i + 7], "big")
                w = int.from_bytes(head[i + 7:i + 9], "big")
                return (w, h) if w > 0 and h > 0 else None
            i += 2 + seglen
    return None


def first_image_size(paths: Sequence[Path]) -> Optional[Tuple[int, int]]:
    """(width, height) of the first of ``paths`` whose header can be read (None if none)."""
    for p in paths[:20]:
        size = image_file_size(p)
        if size is not None:
            return size
    for p in paths[:3]:
        try:
            img = read_image_file(p)
        except InvalidInputError:
            continue
        return img.shape[1], img.shape[0]
    return None


def read_depth_png(path: Path, scale: float, invalid: Sequence[int] = (0, 65535)) -> np.ndarray:
    """[H, W] float32 metres from a 16-bit PNG (value * scale), ``invalid`` values -> 0."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise InvalidInputError(f"{path}: cannot read depth ({e.strerror or e})") from None
    if data[:8] == b"\x89PNG\r\n\x1a\n" and b"IEND" not in data[-64:]:
        raise InvalidInputError(f"{path}: truncated PNG (no IEND chunk)")
    raw = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_UNCHANGED)
    if raw is None:
        raise InvalidInputError(f"{path}: cannot decode depth image")
    if raw.ndim != 2 or raw.dtype != np.uint16:
        raise InvalidInputError(f"{path}: depth must be a single-channel 16-bit PNG, got {raw.dtype} {raw.shape}")
    depth = (raw.astype(np.float64) * scale).astype(np.float32)
    depth[np.isin(raw, np.asarray(invalid, dtype=np.uint16))] = 0.0
    return depth


def read_depth_npy(path: Path) -> np.ndarray:
    """[H, W] float32 metres from a .npy (no pickles); non-finite or negative -> 0."""
    try:
        arr = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        raise InvalidInputError(f"{path}: cannot read depth array ({e})") from None
    if arr.ndim != 2 or not np.issubdtype(arr.dtype, np.floating):
        raise InvalidInputError(f"{path}: depth must be a 2-D float array in metres, got {arr.dtype} {arr.shape}")
    depth = arr.astype(np.float32)
    depth[~np.isfinite(depth) | (depth < 0)] = 0.0
    return depth


@dataclasses.dataclass(frozen=True)
class FileImage:
    """Image source: decodes ``path`` on call."""

    path: Path

    def __call__(self) -> np.ndarray:
        return read_image_file(self.path)


@dataclasses.dataclass(frozen=True)
class FileDepth:
    """Depth source: ``.png`` (uint16 * scale metres, ``invalid`` -> 0) or ``.npy`` (float metres)."""

    path: Path
    scale: float = 0.001
    invalid: Tuple[int, ...] = (0, 65535)

    def __call__(self) -> np.ndarray:
        if self.path.suffix.lower() == ".npy":
            return read_depth_npy(self.path)
        return read_depth_png(self.path, self.scale, self.invalid)


# --------------------------------------------------------------------------- dataset


@dataclasses.dataclass(frozen=True)
class FrameRecord:
    """What a reader knows about one frame before decoding anything.

    T_world_cam: [4, 4] camera-to-world, OpenCV axes, metres (may be invalid until
    ``finalize`` checks it). camera: intrinsics of the colour image. image / depth:
    zero-argument callables that decode on demand (depth: [Hd, Wd] float32 metres).
    depth_camera: None means "registered to the colour image" (the colour camera
    rescaled to the depth size). T_cam_depth: [4, 4] depth -> colour camera (None = I).
    camera_id: the rig camera that took the frame (None for single-camera sources);
    T_world_base: [4, 4] body (rig) pose at that moment, body-to-world, or None. Frames
    with a camera_id decode to ``reloc_ros.rig.RigFrame``, which maps record per keyframe.
    """

    name: str
    T_world_cam: np.ndarray
    camera: Camera
    image: Callable[[], np.ndarray]
    stamp: Optional[float] = None
    depth: Optional[Callable[[], np.ndarray]] = None
    depth_camera: Optional[Camera] = None
    T_cam_depth: Optional[np.ndarray] = None
    camera_id: Optional[str] = None
    T_world_base: Optional[np.ndarray] = None


class Dataset:
    """Posed frames of one source, sorted, with images decoded lazily.

    names: unique stable names. poses: [N, 4, 4] float64 T_world_cam (camera-to-world,
    OpenCV axes, metres). cameras: intrinsics of each colour image. stamps: seconds or
    None. skipped: (name, reason) of frames dropped at open time. ``ds[i]`` decodes
    frame i into a ``PosedFrame`` (InvalidInputError for a corrupt image).
    """

    def __init__(self, fmt: str, root: Path, records: Sequence[FrameRecord],
                 skipped: Sequence[Tuple[str, str]] = (), use_depth: bool = True,
                 closer: Optional[Callable[[], None]] = None) -> None:
        self.format = fmt
        self.root = Path(root)
        self._records = list(records)
        self._skipped = list(skipped)
        self.use_depth = bool(use_depth)
        self._closer = closer
        self._index = {r.name: i for i, r in enumerate(self._records)}
        if len(self._index) != len(self._records):
            seen, dups = set(), []
            for r in self._records:
                if r.name in seen:
                    dups.append(r.name)
                seen.add(r.name)
            raise InvalidInputError(f"{fmt} dataset {root}: duplicate frame names {dups[:5]}")

    def __len__(self) -> int:
        return len(self._records)

    @property
    def names(self) -> List[str]:
        """Unique, stable frame names, in dataset order."""
        return [r.name for r in self._records]

    @property
    def poses(self) -> np.ndarray:
        """[N, 4, 4] float64 T_world_cam (a copy)."""
        if not self._records:
            return np.zeros((0, 4, 4))
        return np.stack([r.T_world_cam for r in self._records]).astype(np.float64)

    @property
    def cameras(self) -> List[Camera]:
        """Intrinsics (pixels) of each colour image (copies), read without decoding it."""
        return [_copy_camera(r.camera) for r in self._records]

    @property
    def stamps(self) -> List[Optional[float]]:
        """Capture time of each frame in seconds, or None where the source has none."""
        return [r.stamp for r in self._records]

    @property
    def camera_ids(self) -> List[Optional[str]]:
        """Rig camera of each frame (None where the source names none)."""
        return [r.camera_id for r in self._records]

    @property
    def base_poses(self) -> np.ndarray:
        """[N, 4, 4] float64 T_world_base (body-to-world) of each frame; NaN where unknown."""
        out = np.full((len(self._records), 4, 4), np.nan)
        for i, r in enumerate(self._records):
            if r.T_world_base is not None:
                out[i] = r.T_world_base
        return out

    @property
    def skipped(self) -> List[Tuple[str, str]]:
        """(name, reason) of each frame of the selection dropped at open time."""
        return list(self._skipped)

    @property
    def has_depth(self) -> bool:
        """True when depth is requested and at least one frame has it."""
        return self.use_depth and any(r.depth is not None for r in self._records)

    def index(self, name: str) -> int:
        """Position of the frame called ``name`` (KeyError if absent)."""
        return self._index[name]

    def __contains__(self, name: object) -> bool:
        """True when a frame is called ``name`` (never decodes images)."""
        return isinstance(name, str) and name in self._index

    def record(self, i: int) -> FrameRecord:
        """What is known about frame i without decoding it (pose, camera, sources)."""
        return self._records[i]

    def __getitem__(self, i):
        """Frame i decoded into a PosedFrame (its own copies of pose and cameras); a slice
        gives a ``subset`` view. InvalidInputError for an unreadable image or depth."""
        if isinstance(i, slice):
            return self.subset(range(len(self))[i])
        if isinstance(i, (bool, np.bool_)) or not isinstance(i, (int, np.integer)):
            raise TypeError(f"dataset index must be an int or slice, got {type(i).__name__}")
        n = len(self._records)
        if not -n <= int(i) < n:
            raise IndexError(f"frame index {i} out of range for {n} frames")
        return self._load(self._records[int(i)])

    def __iter__(self) -> Iterator[PosedFrame]:
        for r in self._records:
            yield self._load(r)

    def subset(self, indices: Sequence[int]) -> "Dataset":
        """A view on frames ``indices`` (positions in this dataset), sharing its sources.

        The view keeps this dataset's ``skipped`` list (open-time drops).
        """
        idx = [int(i) for i in list(indices)]
        n = len(self._records)
        bad = [i for i in idx if not -n <= i < n]
        if bad:
            raise IndexError(f"subset indices {bad[:5]} out of range for {n} frames")
        view = Dataset(self.format, self.root, [self._records[i] for i in idx], self._skipped,
                       self.use_depth, self._closer)
        return view

    def close(self) -> None:
        """Release open files (bags); the dataset reopens them if used again."""
        if self._closer is not None:
            self._closer()

    def __enter__(self) -> "Dataset":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"Dataset(format={self.format!r}, root={str(self.root)!r}, frames={len(self)}, "
                f"skipped={len(self._skipped)}, depth={self.has_depth})")

    def _load(self, r: FrameRecord) -> PosedFrame:
        image = r.image()
        h, w = image.shape[:2]
        if (w, h) != (r.camera.width, r.camera.height):
            raise InvalidInputError(
                f"frame {r.name!r}: image is {w}x{h} but its camera says {r.camera.width}x{r.camera.height}")
        depth = depth_cam = T_cd = None
        if self.use_depth and r.depth is not None:
            depth = r.depth()
            hd, wd = depth.shape
            if r.depth_camera is None:
                depth_cam = r.camera if (wd, hd) == (w, h) else r.camera.scaled(wd / w, hd / h)
            else:
                depth_cam = r.depth_camera
                if (wd, hd) != (depth_cam.width, depth_cam.height):
                    raise InvalidInputError(
                        f"frame {r.name!r}: depth is {wd}x{hd} but its camera says "
                        f"{depth_cam.width}x{depth_cam.height}")
            T_cd = np.eye(4) if r.T_cam_depth is None else np.array(r.T_cam_depth, dtype=np.float64)
        # copies, so a caller rescaling a frame's K in place cannot change the dataset
        if r.camera_id is not None:
            from reloc_ros.rig import RigFrame  # lazily: the rig pulls in the localizer stack

            return RigFrame(name=r.name, image=image, T_world_cam=np.array(r.T_world_cam, dtype=np.float64),
                            camera=_copy_camera(r.camera), depth=depth, depth_camera=_copy_camera(depth_cam),
                            T_cam_depth=T_cd, stamp=r.stamp, camera_id=r.camera_id,
                            T_world_base=None if r.T_world_base is None
                            else np.array(r.T_world_base, dtype=np.float64))
        return PosedFrame(name=r.name, image=image, T_world_cam=np.array(r.T_world_cam, dtype=np.float64),
                          camera=_copy_camera(r.camera), depth=depth, depth_camera=_copy_camera(depth_cam),
                          T_cam_depth=T_cd, stamp=r.stamp)


def _copy_camera(cam: Optional[Camera]) -> Optional[Camera]:
    if cam is None:
        return None
    return Camera(cam.K.copy(), cam.width, cam.height, None if cam.dist is None else cam.dist.copy())


def drop_invalid_poses(fmt: str, root: Path, records: Sequence[FrameRecord],
                       skipped: Sequence[Tuple[str, str]] = ()) -> Tuple[List[FrameRecord], List[Tuple[str, str]]]:
    """Split off records whose pose is not a finite rigid transform (logged, reason added to
    ``skipped``); the rest get their rotation re-orthonormalised. Returns (kept, skipped)."""
    kept: List[FrameRecord] = []
    skipped = list(skipped)
    for r in records:
        why = pose_problem(r.T_world_cam)
        if why is None:
            try:
                T = clean_pose(r.T_world_cam, f"pose of {r.name}")
            except InvalidInputError as e:
                why = str(e)
        T_wb = r.T_world_base
        if why is None and T_wb is not None:
            why = pose_problem(T_wb)
            if why is None:
                T_wb = clean_pose(T_wb, f"body pose of {r.name}")
            else:
                why = f"body pose T_world_base: {why}"
        if why is not None:
            skipped.append((r.name, why))
            continue
        kept.append(dataclasses.replace(r, T_world_cam=T, T_world_base=T_wb))
    for name, why in skipped[:10]:
        logger.warning("%s dataset %s: skipping frame %s: %s", fmt, root, name, why)
    if len(skipped) > 10:
        logger.warning("%s dataset %s: %d frames skipped in all (see ds.skipped)", fmt, root, len(skipped))
    return kept, skipped


def finalize(fmt: str, root: Path, records: Sequence[FrameRecord], skipped: Sequence[Tuple[str, str]] = (),
             use_depth: bool = True, closer: Optional[Callable[[], None]] = None) -> Dataset:
    """Drop records whose pose is not a finite rigid transform and build the Dataset."""
    kept, skipped = drop_invalid_poses(fmt, root, records, skipped)
    return Dataset(fmt, root, kept, skipped, use_depth, closer)


def select(items: Sequence, sl: slice) -> list:
    """items[sl] as a list (the ``frames`` selection over the sorted frame list)."""
    return list(items)[sl]


def require_dir(path: Path, what: str) -> Path:
    """``path`` as a Path, or FileNotFoundError naming ``what`` when it is not a folder."""
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"{what} not found: {path}")
    if not path.is_dir():
        raise InvalidInputError(f"{what} is not a folder: {path}")
    return path


def list_images(folder: Path, recursive: bool = False) -> List[Path]:
    """Image files (by extension) in ``folder``, naturally sorted by relative path."""
    it = folder.rglob("*") if recursive else folder.iterdir()
    out = [p for p in it if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS]
    return sorted(out, key=lambda p: natural_key(p.relative_to(folder).as_posix()))


def as_matrix4(value: Any, what: str) -> np.ndarray:
    """[4, 4] float64 from 16 numbers, a 4x4/3x4 array, or a path to a text file holding one."""
    if isinstance(value, (str, Path)):
        return read_matrix_file(Path(value), what)
    arr = np.asarray(value, dtype=np.float64)
    if arr.size == 16:
        return arr.reshape(4, 4)
    if arr.size == 12:
        return np.vstack([arr.reshape(3, 4), [0, 0, 0, 1]])
    raise InvalidInputError(f"{what}: expected a 4x4 matrix (16 numbers), got shape {arr.shape}")
