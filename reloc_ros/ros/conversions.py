"""sensor_msgs / geometry_msgs <-> numpy and reloc_ros types, without cv_bridge.

cv_bridge is not on PyPI for ROS 2 (and PyPI's ``cv-bridge`` is a broken ROS 1 copy), so
images are decoded here directly, honouring ``step`` (row padding), ``encoding`` and
``is_bigendian``. Reading functions only use message attributes (duck typing); building
functions import the message classes lazily, so this module imports without ROS.

Frames and units: poses are [4, 4] float64 ``T_parent_child`` in metres; quaternions are
ROS order (x, y, z, w); covariances are [6, 6] (x, y, z, rx, ry, rz) row-major, m^2 and
rad^2, in the parent (header) frame; stamps are integer nanoseconds.
"""
from __future__ import annotations

from typing import Optional, Tuple

import cv2
import numpy as np
from scipy.spatial.transform import Rotation

from reloc_ros.types import OPENCV_DIST_LENGTHS, Camera, InvalidInputError


class MessageConversionError(InvalidInputError):
    """A ROS message cannot be turned into a usable image, camera or pose."""


# encoding -> (numpy dtype, channels, channel order of the stored bytes)
ENCODINGS = {
    "mono8": (np.uint8, 1, "L"),
    "mono16": (np.uint16, 1, "L"),
    "rgb8": (np.uint8, 3, "RGB"),
    "bgr8": (np.uint8, 3, "BGR"),
    "rgba8": (np.uint8, 4, "RGBA"),
    "bgra8": (np.uint8, 4, "BGRA"),
}

# Distortion models a pinhole Camera with OpenCV coefficients can represent, and the
# number of coefficients each has in a CameraInfo (REP-104); "" (unset) takes any
# length OpenCV accepts.
_PINHOLE_MODELS = {"", "plumb_bob", "rational_polynomial"}
_MODEL_DIST_LENGTH = {"plumb_bob": 5, "rational_polynomial": 8}

# Largest image decoded by default (pixels). 50 MP is above any camera a localizer
# runs on (8K UHD is 33 MP) while bounding a decode to ~150 MB for RGB (~300 MB for
# 16-bit), so a corrupt or hostile header cannot make the node allocate gigabytes.
DEFAULT_MAX_PIXELS = 50_000_000

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# JPEG start-of-frame markers: C0..CF except DHT (C4), JPG (C8) and DAC (CC).
_JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}


# --------------------------------------------------------------------------- time


def stamp_to_ns(stamp) -> int:
    """builtin_interfaces/Time -> integer nanoseconds."""
    return int(stamp.sec) * 1_000_000_000 + int(stamp.nanosec)


def ns_to_stamp(ns: int):
    """Integer nanoseconds (>= 0) -> builtin_interfaces/Time."""
    from builtin_interfaces.msg import Time

    ns = int(ns)
    if ns < 0:
        raise ValueError(f"negative time {ns} ns cannot be a ROS stamp")
    return Time(sec=ns // 1_000_000_000, nanosec=ns % 1_000_000_000)


# --------------------------------------------------------------------------- images


def _as_bytes_array(buf) -> np.ndarray:
    """uint8 view of a message byte field (array.array, bytes or a list), without a copy when possible."""
    try:
        return np.frombuffer(buf, dtype=np.uint8)
    except TypeError:
        return np.asarray(buf, dtype=np.uint8).ravel()


def image_to_numpy(msg) -> np.ndarray:
    """sensor_msgs/Image -> the stored pixels as numpy, without colour conversion.

    Returns [H, W] (mono8 uint8, mono16 uint16) or [H, W, C] uint8 (C = 3 or 4, channels in
    the order the encoding names). Row padding (``step`` > W * bytes per pixel) is removed
    and 16-bit data are byte-swapped to native order when ``is_bigendian`` differs.
    Raises MessageConversionError for an unknown encoding or a buffer that does not match
    ``height``, ``width`` and ``step``.
    """
    enc = str(msg.encoding).strip().lower()
    if enc not in ENCODINGS:
        raise MessageConversionError(
            f"unsupported image encoding '{msg.encoding}' (supported: {', '.join(ENCODINGS)})"
        )
    dtype, channels, _ = ENCODINGS[enc]
    h, w, step = int(msg.height), int(msg.width), int(msg.step)
    if h <= 0 or w <= 0:
        raise MessageConversionError(f"image has an empty size {w}x{h}")
    itemsize = np.dtype(dtype).itemsize
    row_bytes = w * channels * itemsize
    if step < row_bytes:
        raise MessageConversionError(
            f"image step {step} B is shorter than a {enc} row of width {w} ({row_bytes} B)"
        )
    if step % itemsize:
        raise MessageConversionError(f"image step {step} B is not a multiple of {itemsize} ({enc})")
    buf = msg.data
    nbytes = len(buf)
    if nbytes != step * h:
        raise MessageConversionError(
            f"image data has {nbytes} B, expected step*height = {step}*{h} = {step * h} B"
        )
    raw = _as_bytes_array(buf)
    rows = raw.reshape(h, step)[:, :row_bytes]
    if itemsize > 1:
        order = ">" if msg.is_bigendian else "<"
        arr = np.ascontiguousarray(rows).view(np.dtype(dtype).newbyteorder(order)).astype(dtype)
    else:
        arr = rows
    arr = arr.reshape(h, w, channels) if channels > 1 else arr.reshape(h, w)
    return np.ascontiguousarray(arr)


def to_localizer_image(arr: np.ndarray, encoding: str) -> np.ndarray:
    """Pixels of a given encoding -> what the localizer takes.

    Returns [H, W, 3] uint8 RGB for colour encodings (alpha dropped) and [H, W] uint8 for
    mono. mono16 is shifted right by the fewest bits that fit the frame's maximum into
    8 bits: a power-of-two scale keeps 10/12-bit sensors bright without per-frame
    contrast stretching.
    """
    enc = encoding.lower()
    order = ENCODINGS[enc][2]
    if order == "L":
        return _shift_to_uint8(arr) if arr.dtype == np.uint16 else arr
    if order == "RGB":
        return arr
    if order == "BGR":
        return np.ascontiguousarray(arr[..., ::-1])
    if order == "RGBA":
        return np.ascontiguousarray(arr[..., :3])
    return np.ascontiguousarray(arr[..., 2::-1])  # BGRA


def _shift_to_uint8(arr: np.ndarray) -> np.ndarray:
    """uint16 pixels (any shape) -> uint8, shifted right by the fewest bits that fit the
    maximum into 8 bits. One shift for all channels keeps the colour balance; a power of
    two keeps 10/12-bit sensors bright without per-frame contrast stretching."""
    top = int(arr.max()) if arr.size else 0
    shift = max(top.bit_length() - 8, 0)
    return (arr >> shift).astype(np.uint8)


def check_image_size(width: int, height: int, expected_size: Optional[Tuple[int, int]] = None,
                     max_pixels: int = DEFAULT_MAX_PIXELS, what: str = "image") -> None:
    """Refuse an image size before any pixel is decoded or copied.

    width, height: pixels, as the message or the compressed header states them.
    expected_size: (width, height) in pixels the image must have (the CameraInfo's), or None.
    max_pixels: largest width * height accepted. Raises MessageConversionError.
    """
    w, h = int(width), int(height)
    if w <= 0 or h <= 0:
        raise MessageConversionError(f"{what} has an empty size {w}x{h}")
    if w * h > max_pixels:
        raise MessageConversionError(
            f"{what} is {w}x{h} ({w * h / 1e6:.1f} MP), above the limit of {max_pixels / 1e6:.1f} MP "
            f"(max_pixels); refused before decoding"
        )
    if expected_size is not None and (w, h) != (int(expected_size[0]), int(expected_size[1])):
        raise MessageConversionError(
            f"{what} is {w}x{h} but CameraInfo says {int(expected_size[0])}x{int(expected_size[1])}"
        )


def _check_max_pixels(max_pixels: int) -> int:
    if isinstance(max_pixels, bool) or not isinstance(max_pixels, (int, np.integer)) or max_pixels <= 0:
        raise ValueError(f"max_pixels must be a positive integer, got {max_pixels!r}")
    return int(max_pixels)


def image_msg_to_rgb(msg, expected_size: Optional[Tuple[int, int]] = None,
                     max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """sensor_msgs/Image -> [H, W, 3] uint8 RGB or [H, W] uint8 grey (localizer input).

    The stated size is checked against ``max_pixels`` and ``expected_size`` (w, h) before
    the data are touched. Raises MessageConversionError.
    """
    check_image_size(msg.width, msg.height, expected_size, _check_max_pixels(max_pixels))
    return to_localizer_image(image_to_numpy(msg), str(msg.encoding).strip())


def _u16(data: np.ndarray, i: int) -> int:
    return (int(data[i]) << 8) | int(data[i + 1])


def _u32(data: np.ndarray, i: int) -> int:
    return int.from_bytes(data[i:i + 4].tobytes(), "big")


def _jpeg_size(data: np.ndarray) -> Tuple[int, int]:
    """(width, height) from the first start-of-frame segment; only segment headers are read.

    Segments before the frame header (APPn such as EXIF, whose thumbnail's own SOF lies
    inside the APP1 segment, DQT, DHT, ...) are skipped by their length field.
    Raises ValueError with the reason when the header is corrupt or truncated.
    """
    n = data.size
    i = 2  # after SOI
    while True:
        if i >= n:
            raise ValueError("JPEG ends before its frame header (SOF)")
        if data[i] != 0xFF:
            raise ValueError(f"JPEG header is corrupt: no marker at byte {i}")
        while i < n and data[i] == 0xFF:  # fill bytes may pad any marker
            i += 1
        if i >= n:
            raise ValueError("JPEG ends before its frame header (SOF)")
        marker = int(data[i])
        i += 1
        if marker == 0xD8 or marker == 0x01 or 0xD0 <= marker <= 0xD7:
            continue  # standalone markers: no length field
        if marker == 0x00 or marker == 0xD9 or marker == 0xDA:
            raise ValueError(f"JPEG has no frame header (SOF) before marker 0xFF{marker:02X}")
        if i + 2 > n:
            raise ValueError("JPEG header is truncated")
        length = _u16(data, i)
        if length < 2:
            raise ValueError(f"JPEG segment 0xFF{marker:02X} has an invalid length {length}")
        if marker in _JPEG_SOF:
            if length < 8 or i + 7 > n:
                raise ValueError("JPEG frame header (SOF) is truncated")
            height, width = _u16(data, i + 3), _u16(data, i + 5)
            if height == 0:
                raise ValueError("JPEG frame header gives height 0 (a DNL-defined height is not supported)")
            return width, height
        i += length


def compressed_image_size(data) -> Tuple[str, int, int]:
    """(container, width, height) of PNG or JPEG bytes, read from the header without decoding.

    PNG: the IHDR chunk, which the PNG specification requires first. JPEG: the first
    start-of-frame segment (baseline, progressive, lossless, arithmetic). Sizes in pixels.
    Raises MessageConversionError for other containers and corrupt or truncated headers.
    """
    arr = _as_bytes_array(data)
    n = arr.size
    head = arr[:8].tobytes()
    if head == _PNG_SIGNATURE:
        # signature (8) | chunk length (4) | "IHDR" (4) | width (4) | height (4) | ...
        if n < 24 or arr[12:16].tobytes() != b"IHDR":
            raise MessageConversionError(f"PNG ({n} B) could not be decoded: its header has no IHDR chunk")
        return "png", _u32(arr, 16), _u32(arr, 20)
    if head[:2] == b"\xff\xd8":
        try:
            w, h = _jpeg_size(arr)
        except ValueError as e:
            raise MessageConversionError(f"JPEG ({n} B) could not be decoded: {e}") from None
        return "jpeg", w, h
    raise MessageConversionError(
        f"compressed image ({n} B, first bytes {head[:4].hex()}) is neither JPEG nor PNG; "
        "only JPEG and PNG are supported"
    )


def _decoded_to_localizer(img: np.ndarray, what: str) -> np.ndarray:
    """cv2.imdecode output (BGR/BGRA/grey, uint8 or uint16) -> [H, W, 3] uint8 RGB or [H, W] uint8."""
    if img.ndim == 3 and img.shape[2] == 1:
        img = img[..., 0]
    if img.ndim == 3:
        if img.shape[2] not in (3, 4):
            raise MessageConversionError(f"{what} decodes to {img.shape[2]} channels (1, 3 or 4 supported)")
        img = img[..., 2::-1]  # BGR(A) -> RGB, alpha dropped (before the shift: alpha must not set it)
    if img.dtype == np.uint16:
        img = _shift_to_uint8(img)
    elif img.dtype != np.uint8:
        raise MessageConversionError(f"{what} decodes to unsupported dtype {img.dtype}")
    return np.ascontiguousarray(img)


def compressed_msg_to_rgb(msg, expected_size: Optional[Tuple[int, int]] = None,
                          max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """sensor_msgs/CompressedImage (jpeg/png) -> [H, W, 3] uint8 RGB or [H, W] uint8 grey.

    The width and height are read from the PNG/JPEG header first, and the image is refused
    above ``max_pixels`` or when it differs from ``expected_size`` (w, h) before
    ``cv2.imdecode`` allocates anything, so a decompression bomb costs nothing. 8- and
    16-bit grey, colour and colour+alpha are accepted; 16-bit is shifted to 8 bits as
    mono16 is (``to_localizer_image``), alpha is dropped. Raises MessageConversionError for
    depth-compressed streams, containers other than JPEG/PNG and undecodable bytes.
    """
    max_pixels = _check_max_pixels(max_pixels)
    fmt = str(msg.format).lower()
    if "compresseddepth" in fmt:
        raise MessageConversionError(f"compressed depth images are not colour images (format '{msg.format}')")
    data = _as_bytes_array(msg.data)
    if data.size == 0:
        raise MessageConversionError("compressed image has no data")
    container, w, h = compressed_image_size(data)
    what = f"{container.upper()} image"
    check_image_size(w, h, expected_size, max_pixels, what)
    img = cv2.imdecode(data, cv2.IMREAD_UNCHANGED)
    if img is None or img.size == 0:
        raise MessageConversionError(
            f"compressed image ({data.size} B, format '{msg.format}') could not be decoded"
        )
    if img.shape[:2] != (h, w):  # e.g. a decoder applying EXIF orientation
        raise MessageConversionError(
            f"{what} decoded to {img.shape[1]}x{img.shape[0]} but its header says {w}x{h}"
        )
    return _decoded_to_localizer(img, what)


def numpy_to_image_msg(arr: np.ndarray, encoding: str, stamp_ns: int = 0, frame_id: str = ""):
    """numpy pixels -> sensor_msgs/Image (dense rows, little-endian).

    arr: [H, W] (mono8 uint8 / mono16 uint16) or [H, W, C] uint8 whose channel order is the
    one ``encoding`` names (e.g. RGB for rgb8). The data are assigned as bytes, which is
    two orders of magnitude faster than assigning a numpy array to ``msg.data``.
    """
    from sensor_msgs.msg import Image

    enc = encoding.lower()
    if enc not in ENCODINGS:
        raise MessageConversionError(f"unsupported image encoding '{encoding}'")
    dtype, channels, _ = ENCODINGS[enc]
    arr = np.asarray(arr)
    want_ndim = 2 if channels == 1 else 3
    if arr.dtype != dtype or arr.ndim != want_ndim or (channels > 1 and arr.shape[2] != channels):
        raise MessageConversionError(
            f"array {arr.dtype}{list(arr.shape)} does not fit encoding {enc} ({np.dtype(dtype)}, {channels} channels)"
        )
    arr = np.ascontiguousarray(arr.astype(np.dtype(dtype).newbyteorder("<"), copy=False))
    h, w = arr.shape[:2]
    msg = Image()
    msg.header.stamp = ns_to_stamp(stamp_ns)
    msg.header.frame_id = frame_id
    msg.height, msg.width = h, w
    msg.encoding = enc
    msg.is_bigendian = 0
    msg.step = w * channels * np.dtype(dtype).itemsize
    msg.data = arr.tobytes()
    return msg


def numpy_to_compressed_msg(rgb: np.ndarray, fmt: str = "jpeg", stamp_ns: int = 0, frame_id: str = "",
                            quality: int = 95):
    """[H, W, 3] uint8 RGB or [H, W] uint8 grey -> sensor_msgs/CompressedImage (jpeg or png)."""
    from sensor_msgs.msg import CompressedImage

    fmt = fmt.lower()
    if fmt not in ("jpeg", "png"):
        raise MessageConversionError(f"unsupported compression '{fmt}' (jpeg or png)")
    img = rgb if rgb.ndim == 2 else cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)
    params = [cv2.IMWRITE_JPEG_QUALITY, int(quality)] if fmt == "jpeg" else []
    ok, enc = cv2.imencode(".jpg" if fmt == "jpeg" else ".png", img, params)
    if not ok:
        raise MessageConversionError("image could not be compressed")
    msg = CompressedImage()
    msg.header.stamp = ns_to_stamp(stamp_ns)
    msg.header.frame_id = frame_id
    msg.format = fmt
    msg.data = enc.tobytes()
    return msg


# --------------------------------------------------------------------------- cameras


def camera_info_to_camera(msg) -> Camera:
    """sensor_msgs/CameraInfo -> Camera (K in pixels of the image as published).

    Binning and ROI are applied to K, width and height, as image_proc does. Raises
    MessageConversionError for an uncalibrated camera (K all zeros), non-finite values, a
    distortion model that is not OpenCV's pinhole one (plumb_bob, rational_polynomial), a
    distortion vector of the wrong length for its model (plumb_bob 5, rational_polynomial
    8, unset: 4, 5, 8, 12 or 14; all zeros of any length means none), skew (K[0,1] != 0:
    the pinhole model here ignores it), or a principal point outside the image after
    ROI/binning (see ``Camera.validate``).
    """
    K = np.asarray(msg.k, dtype=np.float64).reshape(3, 3)
    width, height = int(msg.width), int(msg.height)
    if not np.any(K):
        raise MessageConversionError("CameraInfo is uncalibrated (K is all zeros)")
    if not np.all(np.isfinite(K)) or K[0, 0] <= 0 or K[1, 1] <= 0 or K[2, 2] == 0:
        raise MessageConversionError(f"CameraInfo has invalid intrinsics K={K.tolist()}")
    K = K / K[2, 2]
    model = str(msg.distortion_model).strip().lower()
    D = np.asarray(msg.d, dtype=np.float64).ravel()
    if not np.all(np.isfinite(D)):
        raise MessageConversionError("CameraInfo distortion coefficients are not finite")
    if np.any(D):
        if model not in _PINHOLE_MODELS:
            raise MessageConversionError(
                f"unsupported distortion model '{msg.distortion_model}' (plumb_bob or rational_polynomial)"
            )
        want = _MODEL_DIST_LENGTH.get(model)
        if want is not None and D.size != want:
            raise MessageConversionError(
                f"CameraInfo distortion model '{model}' needs {want} coefficients, got {D.size}"
            )
        if D.size not in OPENCV_DIST_LENGTHS:
            raise MessageConversionError(
                f"CameraInfo has {D.size} distortion coefficients; OpenCV accepts "
                f"{', '.join(map(str, OPENCV_DIST_LENGTHS))}"
            )
    roi = msg.roi
    bx = max(int(msg.binning_x), 1)
    by = max(int(msg.binning_y), 1)
    use_roi = int(roi.width) > 0 and int(roi.height) > 0
    if use_roi:
        K[0, 2] -= int(roi.x_offset)
        K[1, 2] -= int(roi.y_offset)
        width, height = int(roi.width), int(roi.height)
    if bx > 1 or by > 1:
        K[0, :] /= bx
        K[1, :] /= by
        width, height = width // bx, height // by
    if width <= 0 or height <= 0:
        raise MessageConversionError(f"CameraInfo has an empty image size {width}x{height}")
    cam = Camera(K, width, height, D if np.any(D) else None)
    try:
        cam.validate()
    except InvalidInputError as e:
        hint = (f" (after ROI x_offset={int(roi.x_offset)}, y_offset={int(roi.y_offset)}: an ROI that excludes "
                "the principal point is not supported)") if use_roi and "principal point" in str(e) else ""
        raise MessageConversionError(f"CameraInfo: {e}{hint}") from None
    return cam


def camera_to_camera_info(camera: Camera, stamp_ns: int = 0, frame_id: str = ""):
    """Camera -> sensor_msgs/CameraInfo (P = [K | 0], R = I).

    Distortion: none or 4/5 coefficients -> plumb_bob (5, k3 = 0 when absent), 8 ->
    rational_polynomial; 12 and 14 have no CameraInfo model and raise MessageConversionError.
    """
    from sensor_msgs.msg import CameraInfo

    msg = CameraInfo()
    msg.header.stamp = ns_to_stamp(stamp_ns)
    msg.header.frame_id = frame_id
    msg.width, msg.height = int(camera.width), int(camera.height)
    d = np.zeros(5) if camera.dist is None else np.asarray(camera.dist, dtype=np.float64).ravel()
    if d.size == 4:
        d = np.append(d, 0.0)
    if d.size not in (5, 8):
        raise MessageConversionError(
            f"a camera with {d.size} distortion coefficients has no CameraInfo model "
            "(plumb_bob 5, rational_polynomial 8)"
        )
    msg.distortion_model = "plumb_bob" if d.size == 5 else "rational_polynomial"
    msg.d = [float(x) for x in d]
    msg.k = [float(x) for x in camera.K.ravel()]
    msg.r = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0]
    P = np.zeros((3, 4))
    P[:, :3] = camera.K
    msg.p = [float(x) for x in P.ravel()]
    return msg


def check_image_matches_camera(image: np.ndarray, camera: Camera) -> None:
    """Raise MessageConversionError when the image size differs from the CameraInfo size."""
    h, w = image.shape[:2]
    if (w, h) != (camera.width, camera.height):
        raise MessageConversionError(
            f"image is {w}x{h} but CameraInfo says {camera.width}x{camera.height}"
        )


# --------------------------------------------------------------------------- poses


def quaternion_to_matrix(x: float, y: float, z: float, w: float) -> np.ndarray:
    """ROS quaternion (x, y, z, w) -> [3, 3] rotation; raises on a zero or non-finite quaternion."""
    q = np.array([x, y, z, w], dtype=np.float64)
    n = np.linalg.norm(q)
    if not np.isfinite(n) or n < 1e-9:
        raise MessageConversionError(f"invalid quaternion {q.tolist()}")
    return Rotation.from_quat(q / n).as_matrix()


def matrix_to_quaternion(R: np.ndarray) -> Tuple[float, float, float, float]:
    """[3, 3] rotation -> ROS quaternion (x, y, z, w) with w >= 0."""
    q = Rotation.from_matrix(np.asarray(R, dtype=np.float64)).as_quat()
    if q[3] < 0:
        q = -q
    return float(q[0]), float(q[1]), float(q[2]), float(q[3])


def transform_msg_to_matrix(tf) -> np.ndarray:
    """geometry_msgs/Transform -> [4, 4] T_parent_child (metres)."""
    T = np.eye(4)
    q = tf.rotation
    T[:3, :3] = quaternion_to_matrix(q.x, q.y, q.z, q.w)
    T[:3, 3] = [tf.translation.x, tf.translation.y, tf.translation.z]
    if not np.all(np.isfinite(T)):
        raise MessageConversionError("transform has non-finite translation")
    return T


def matrix_to_transform_stamped(T: np.ndarray, parent: str, child: str, stamp_ns: int):
    """[4, 4] T_parent_child -> geometry_msgs/TransformStamped (header.frame_id = parent)."""
    from geometry_msgs.msg import TransformStamped

    msg = TransformStamped()
    msg.header.stamp = ns_to_stamp(stamp_ns)
    msg.header.frame_id = parent
    msg.child_frame_id = child
    t = np.asarray(T, dtype=np.float64)
    msg.transform.translation.x, msg.transform.translation.y, msg.transform.translation.z = (
        float(t[0, 3]), float(t[1, 3]), float(t[2, 3]))
    (msg.transform.rotation.x, msg.transform.rotation.y, msg.transform.rotation.z,
     msg.transform.rotation.w) = matrix_to_quaternion(t[:3, :3])
    return msg


def pose_msg_to_matrix(pose) -> np.ndarray:
    """geometry_msgs/Pose -> [4, 4] (pose of the child in the header frame, metres)."""
    T = np.eye(4)
    q = pose.orientation
    T[:3, :3] = quaternion_to_matrix(q.x, q.y, q.z, q.w)
    T[:3, 3] = [pose.position.x, pose.position.y, pose.position.z]
    return T


def matrix_to_pose_msg(T: np.ndarray):
    """[4, 4] -> geometry_msgs/Pose."""
    from geometry_msgs.msg import Pose

    p = Pose()
    t = np.asarray(T, dtype=np.float64)
    p.position.x, p.position.y, p.position.z = float(t[0, 3]), float(t[1, 3]), float(t[2, 3])
    p.orientation.x, p.orientation.y, p.orientation.z, p.orientation.w = matrix_to_quaternion(t[:3, :3])
    return p


def pose_with_covariance_stamped(T: np.ndarray, covariance: np.ndarray, frame_id: str, stamp_ns: int):
    """[4, 4] pose in ``frame_id`` + [6, 6] covariance -> geometry_msgs/PoseWithCovarianceStamped."""
    from geometry_msgs.msg import PoseWithCovarianceStamped

    cov = np.asarray(covariance, dtype=np.float64)
    if cov.shape != (6, 6) or not np.all(np.isfinite(cov)):
        raise MessageConversionError(f"covariance must be a finite [6, 6] matrix, got {cov.shape}")
    msg = PoseWithCovarianceStamped()
    msg.header.stamp = ns_to_stamp(stamp_ns)
    msg.header.frame_id = frame_id
    msg.pose.pose = matrix_to_pose_msg(T)
    msg.pose.covariance = [float(x) for x in cov.ravel()]
    return msg


def pose_with_covariance_to_numpy(msg) -> Tuple[np.ndarray, np.ndarray]:
    """geometry_msgs/PoseWithCovarianceStamped -> ([4, 4] pose, [6, 6] covariance)."""
    return pose_msg_to_matrix(msg.pose.pose), np.asarray(msg.pose.covariance, dtype=np.float64).reshape(6, 6)


def decode_image(msg, compressed: bool, expected_size: Optional[Tuple[int, int]] = None,
                 max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Image or CompressedImage -> localizer image ([H, W, 3] uint8 RGB or [H, W] uint8).

    expected_size: (width, height) pixels the image must have (from its CameraInfo), or
    None. max_pixels: largest width * height decoded. Both are checked from the message
    fields (raw) or the PNG/JPEG header (compressed) before any pixel is decoded or
    copied. Raises MessageConversionError.
    """
    if compressed:
        return compressed_msg_to_rgb(msg, expected_size, max_pixels)
    return image_msg_to_rgb(msg, expected_size, max_pixels)


def camera_for_image(info_msg: Optional[object], image: np.ndarray) -> Camera:
    """CameraInfo (or None) checked against an image -> Camera. Raises MessageConversionError."""
    if info_msg is None:
        raise MessageConversionError("no CameraInfo received on 'camera_info'")
    cam = camera_info_to_camera(info_msg)
    check_image_matches_camera(image, cam)
    return cam


def image_and_camera(msg, compressed: bool, info_msg: Optional[object],
                     max_pixels: int = DEFAULT_MAX_PIXELS) -> Tuple[np.ndarray, Camera]:
    """Image/CompressedImage + its CameraInfo -> (localizer image, Camera), in the safe order.

    The CameraInfo is converted first so the image is refused by its stated size (not
    its decoded pixels) when it differs from the CameraInfo or exceeds ``max_pixels``.
    Raises MessageConversionError.
    """
    if info_msg is None:
        raise MessageConversionError("no CameraInfo received on 'camera_info'")
    cam = camera_info_to_camera(info_msg)
    image = decode_image(msg, compressed, (cam.width, cam.height), max_pixels)
    check_image_matches_camera(image, cam)
    return image, cam
