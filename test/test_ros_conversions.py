"""Image / CompressedImage / CameraInfo / pose messages <-> numpy, without cv_bridge."""
import numpy as np
import pytest

pytest.importorskip("sensor_msgs.msg", reason="ROS 2 message packages (sensor_msgs) are not installed")

import cv2  # noqa: E402
from sensor_msgs.msg import CameraInfo, CompressedImage, Image  # noqa: E402

from reloc_ros.geometry import make_T, so3_exp  # noqa: E402
from reloc_ros.ros.conversions import (MessageConversionError, camera_for_image, camera_info_to_camera,  # noqa: E402
                                       camera_to_camera_info, compressed_msg_to_rgb, image_msg_to_rgb,
                                       image_to_numpy, matrix_to_transform_stamped, ns_to_stamp,
                                       numpy_to_compressed_msg, numpy_to_image_msg, pose_with_covariance_stamped,
                                       pose_with_covariance_to_numpy, stamp_to_ns, transform_msg_to_matrix)
from reloc_ros.types import Camera, InvalidInputError  # noqa: E402


@pytest.fixture
def rgb():
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, size=(7, 9, 3), dtype=np.uint8)


@pytest.mark.parametrize("encoding", ["rgb8", "bgr8", "rgba8", "bgra8"])
def test_colour_encodings_decode_to_rgb(rgb, encoding):
    stored = {"rgb8": rgb, "bgr8": rgb[..., ::-1],
              "rgba8": np.dstack([rgb, np.full((7, 9), 17, np.uint8)]),
              "bgra8": np.dstack([rgb[..., ::-1], np.full((7, 9), 17, np.uint8)])}[encoding]
    msg = numpy_to_image_msg(np.ascontiguousarray(stored), encoding, 5, "cam")
    assert (msg.height, msg.width, msg.step) == (7, 9, 9 * stored.shape[2])
    np.testing.assert_array_equal(image_msg_to_rgb(msg), rgb)


def test_mono8_and_mono16(rgb):
    grey = rgb[..., 0].copy()
    np.testing.assert_array_equal(image_msg_to_rgb(numpy_to_image_msg(grey, "mono8")), grey)
    # A 12-bit sensor in mono16: shifted by 4 bits, not divided by 257 (which would be nearly black).
    twelve = (grey.astype(np.uint16) << 4) | 0xF
    out = image_msg_to_rgb(numpy_to_image_msg(twelve, "mono16"))
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, grey)


def test_step_padding_is_removed(rgb):
    h, w = rgb.shape[:2]
    step = w * 3 + 5  # padded rows, as some drivers send
    buf = np.zeros((h, step), np.uint8)
    buf[:, : w * 3] = rgb.reshape(h, w * 3)
    msg = Image(height=h, width=w, encoding="rgb8", step=step, data=buf.tobytes())
    np.testing.assert_array_equal(image_msg_to_rgb(msg), rgb)


def test_big_endian_mono16():
    vals = np.array([[1, 256, 4095], [65535, 0, 513]], dtype=np.uint16)
    msg = Image(height=2, width=3, encoding="mono16", is_bigendian=1, step=6, data=vals.astype(">u2").tobytes())
    np.testing.assert_array_equal(image_to_numpy(msg), vals)
    msg_le = Image(height=2, width=3, encoding="mono16", is_bigendian=0, step=6, data=vals.astype("<u2").tobytes())
    np.testing.assert_array_equal(image_to_numpy(msg_le), vals)


def test_unknown_encoding_is_a_clear_error(rgb):
    msg = numpy_to_image_msg(rgb, "rgb8")
    msg.encoding = "yuv422"
    with pytest.raises(MessageConversionError, match="unsupported image encoding 'yuv422'"):
        image_msg_to_rgb(msg)
    assert issubclass(MessageConversionError, InvalidInputError)


def test_data_size_mismatch_is_a_clear_error(rgb):
    msg = numpy_to_image_msg(rgb[..., 0].copy(), "mono8")
    msg.encoding = "rgb8"  # says 3 channels, carries 1
    with pytest.raises(MessageConversionError, match="step"):
        image_msg_to_rgb(msg)
    msg = numpy_to_image_msg(rgb, "rgb8")
    msg.data = bytes(msg.data)[:-3]
    with pytest.raises(MessageConversionError, match="expected step\\*height"):
        image_msg_to_rgb(msg)


def test_array_that_does_not_fit_the_encoding_is_refused(rgb):
    with pytest.raises(MessageConversionError):
        numpy_to_image_msg(rgb, "mono8")
    with pytest.raises(MessageConversionError):
        numpy_to_image_msg(rgb.astype(np.uint16), "rgb8")


def test_compressed_png_is_lossless_and_jpeg_close():
    rng = np.random.default_rng(1)
    img = cv2.GaussianBlur(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8), (0, 0), 2.0)
    np.testing.assert_array_equal(compressed_msg_to_rgb(numpy_to_compressed_msg(img, "png")), img)
    dec = compressed_msg_to_rgb(numpy_to_compressed_msg(img, "jpeg", quality=98))
    assert dec.shape == img.shape and np.abs(dec.astype(int) - img).mean() < 3.0
    grey = img[..., 1].copy()
    np.testing.assert_array_equal(compressed_msg_to_rgb(numpy_to_compressed_msg(grey, "png")), grey)


def test_undecodable_compressed_bytes_are_a_clear_error():
    msg = CompressedImage(format="jpeg", data=b"\xff\xd8 this is not a jpeg" * 10)
    with pytest.raises(MessageConversionError, match="could not be decoded"):
        compressed_msg_to_rgb(msg)
    with pytest.raises(MessageConversionError, match="no data"):
        compressed_msg_to_rgb(CompressedImage(format="jpeg"))
    with pytest.raises(MessageConversionError, match="depth"):
        compressed_msg_to_rgb(CompressedImage(format="16UC1; compressedDepth png", data=b"123"))


def test_camera_info_round_trip():
    K = np.array([[525.0, 0, 319.5], [0, 526.0, 239.5], [0, 0, 1]])
    cam = Camera(K, 640, 480, np.array([0.1, -0.05, 0.001, 0.002, 0.0]))
    back = camera_info_to_camera(camera_to_camera_info(cam, 10, "cam"))
    np.testing.assert_allclose(back.K, K)
    np.testing.assert_allclose(back.dist, cam.dist)
    assert (back.width, back.height) == (640, 480)


def test_camera_info_binning_and_roi():
    K = np.array([[500.0, 0, 320], [0, 500, 240], [0, 0, 1]])
    msg = camera_to_camera_info(Camera(K, 640, 480))
    msg.binning_x = msg.binning_y = 2
    cam = camera_info_to_camera(msg)
    assert (cam.width, cam.height) == (320, 240)
    np.testing.assert_allclose(cam.K[:2], [[250, 0, 160], [0, 250, 120]])
    msg = camera_to_camera_info(Camera(K, 640, 480))
    msg.roi.x_offset, msg.roi.y_offset, msg.roi.width, msg.roi.height = 100, 50, 300, 250
    cam = camera_info_to_camera(msg)
    assert (cam.width, cam.height) == (300, 250)
    np.testing.assert_allclose(cam.K[:2, 2], [220, 190])
    # A crop that leaves the principal point outside is refused by name (Camera.validate
    # rejects such cameras, so accepting the message would fail every frame later).
    msg.roi.width, msg.roi.height = 200, 100
    with pytest.raises(MessageConversionError, match="principal point .* ROI"):
        camera_info_to_camera(msg)


def test_bad_camera_info_is_a_clear_error():
    with pytest.raises(MessageConversionError, match="uncalibrated"):
        camera_info_to_camera(CameraInfo(width=640, height=480))
    msg = camera_to_camera_info(Camera(np.diag([500.0, 500.0, 1.0]), 640, 480))
    msg.distortion_model = "equidistant"
    msg.d = [0.1, 0.01, 0.0, 0.0]
    with pytest.raises(MessageConversionError, match="equidistant"):
        camera_info_to_camera(msg)
    msg = camera_to_camera_info(Camera(np.diag([500.0, 500.0, 1.0]), 640, 480))
    with pytest.raises(MessageConversionError, match="no CameraInfo"):
        camera_for_image(None, np.zeros((480, 640, 3), np.uint8))
    with pytest.raises(MessageConversionError, match="image is 320x240 but CameraInfo says 640x480"):
        camera_for_image(msg, np.zeros((240, 320, 3), np.uint8))


def test_transform_and_pose_round_trip():
    T = make_T(so3_exp([0.3, -1.2, 2.0]), [1.0, -2.0, 0.5])
    msg = matrix_to_transform_stamped(T, "map", "odom", 1_500_000_123)
    assert msg.header.frame_id == "map" and msg.child_frame_id == "odom"
    assert stamp_to_ns(msg.header.stamp) == 1_500_000_123
    np.testing.assert_allclose(transform_msg_to_matrix(msg.transform), T, atol=1e-12)
    cov = np.diag([0.01, 0.02, 0.03, 0.001, 0.002, 0.003])
    cov[0, 1] = cov[1, 0] = 0.004
    T2, cov2 = pose_with_covariance_to_numpy(pose_with_covariance_stamped(T, cov, "map", 7))
    np.testing.assert_allclose(T2, T, atol=1e-12)
    np.testing.assert_array_equal(cov2, cov)
    with pytest.raises(MessageConversionError):
        pose_with_covariance_stamped(T, np.full((6, 6), np.nan), "map", 7)


def test_zero_quaternion_is_refused():
    msg = matrix_to_transform_stamped(np.eye(4), "a", "b", 0)
    msg.transform.rotation.w = 0.0
    with pytest.raises(MessageConversionError, match="quaternion"):
        transform_msg_to_matrix(msg.transform)


def test_stamp_conversion():
    assert stamp_to_ns(ns_to_stamp(12_345_678_901)) == 12_345_678_901
    with pytest.raises(ValueError):
        ns_to_stamp(-1)


# --------------------------------------------------------------------------- image size caps


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    import struct
    import zlib

    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)


def _png_bomb(width: int, height: int) -> bytes:
    """A structurally valid PNG whose IHDR claims width x height RGB8 with a few hundred bytes
    of IDAT: what a decoder would allocate for is width*height*3 bytes."""
    import struct
    import zlib

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 4096, 9)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat)
            + _png_chunk(b"IEND", b""))


def test_png_bomb_is_refused_from_its_header_without_decoding():
    import time

    from reloc_ros.ros.conversions import DEFAULT_MAX_PIXELS, compressed_image_size, decode_image

    data = _png_bomb(100_000, 100_000)  # 10^10 px: 30 GB if decoded
    assert len(data) < 1000
    assert compressed_image_size(data) == ("png", 100_000, 100_000)
    msg = CompressedImage(format="png", data=data)
    t0 = time.perf_counter()
    with pytest.raises(MessageConversionError, match=r"PNG image is 100000x100000 .*above the limit of 50.0 MP"):
        decode_image(msg, compressed=True)
    assert time.perf_counter() - t0 < 0.5  # refused from 24 header bytes, nothing allocated
    assert DEFAULT_MAX_PIXELS == 50_000_000
    # A caller's tighter cap applies the same way, to a size OpenCV would happily decode.
    small = numpy_to_compressed_msg(np.zeros((48, 64, 3), np.uint8), "png")
    with pytest.raises(MessageConversionError, match="above the limit"):
        decode_image(small, compressed=True, max_pixels=64 * 48 - 1)
    assert decode_image(small, compressed=True, max_pixels=64 * 48).shape == (48, 64, 3)
    with pytest.raises(ValueError, match="max_pixels"):
        decode_image(small, compressed=True, max_pixels=0)


def test_jpeg_of_another_size_is_refused_before_decoding():
    from reloc_ros.ros.conversions import decode_image

    img = np.full((48, 64, 3), 90, np.uint8)
    msg = numpy_to_compressed_msg(img, "jpeg")
    assert decode_image(msg, compressed=True, expected_size=(64, 48)).shape == (48, 64, 3)
    # Cut the entropy-coded data: decoding would fail, so the size error proves the check
    # ran on the header, before cv2.imdecode.
    data = bytes(msg.data)
    sos = data.index(b"\xff\xda")
    cut = CompressedImage(format="jpeg", data=data[:sos + 20])
    with pytest.raises(MessageConversionError, match="JPEG image is 64x48 but CameraInfo says 640x480"):
        decode_image(cut, compressed=True, expected_size=(640, 480))
    with pytest.raises(MessageConversionError, match="could not be decoded"):
        decode_image(cut, compressed=True, expected_size=(64, 48))


def test_jpeg_header_parser_skips_segments_and_reads_progressive_frames():
    from reloc_ros.ros.conversions import compressed_image_size

    img = np.random.default_rng(3).integers(0, 256, (37, 53, 3), dtype=np.uint8)
    ok, prog = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_PROGRESSIVE, 1])
    assert ok and b"\xff\xc2" in prog.tobytes()
    assert compressed_image_size(prog.tobytes()) == ("jpeg", 53, 37)
    # An APP1 (EXIF-like) segment holding a thumbnail's own SOF (999x777) comes first:
    # it must be skipped by its length, not read as the frame header.
    thumb_sof = b"\xff\xc0\x00\x11\x08\x03\x09\x03\xe7\x03" + b"\x00" * 9
    app1 = b"\xff\xe1" + (2 + len(thumb_sof) + 6).to_bytes(2, "big") + b"Exif\x00\x00" + thumb_sof
    ok, base = cv2.imencode(".jpg", img)
    data = base.tobytes()[:2] + app1 + base.tobytes()[2:]
    assert compressed_image_size(data) == ("jpeg", 53, 37)
    np.testing.assert_array_equal(compressed_msg_to_rgb(CompressedImage(format="jpeg", data=data)),
                                  compressed_msg_to_rgb(CompressedImage(format="jpeg", data=base.tobytes())))
    with pytest.raises(MessageConversionError, match="could not be decoded: JPEG ends before its frame header"):
        compressed_image_size(data[:30])


def test_unknown_container_is_a_clear_error():
    ok, bmp = cv2.imencode(".bmp", np.zeros((8, 8, 3), np.uint8))
    with pytest.raises(MessageConversionError, match="neither JPEG nor PNG"):
        compressed_msg_to_rgb(CompressedImage(format="bmp", data=bmp.tobytes()))
    with pytest.raises(MessageConversionError, match="no IHDR"):
        compressed_msg_to_rgb(CompressedImage(format="png", data=b"\x89PNG\r\n\x1a\n" + b"\x00" * 30))


def test_raw_image_size_is_checked_before_the_data():
    from reloc_ros.ros.conversions import decode_image

    # 10^10 px stated with no data at all: the cap fires first, with the size in the message.
    huge = Image(height=100_000, width=100_000, encoding="rgb8", step=300_000)
    with pytest.raises(MessageConversionError, match=r"image is 100000x100000 .*above the limit"):
        decode_image(huge, compressed=False)
    msg = numpy_to_image_msg(np.zeros((48, 64, 3), np.uint8), "rgb8")
    with pytest.raises(MessageConversionError, match="image is 64x48 but CameraInfo says 640x480"):
        decode_image(msg, compressed=False, expected_size=(640, 480))
    assert decode_image(msg, compressed=False, expected_size=(64, 48)).shape == (48, 64, 3)


def test_image_and_camera_checks_the_size_against_camera_info_first():
    from reloc_ros.ros.conversions import image_and_camera

    K = np.array([[500.0, 0, 320], [0, 500, 240], [0, 0, 1]])
    info = camera_to_camera_info(Camera(K, 640, 480))
    good = numpy_to_compressed_msg(np.zeros((480, 640, 3), np.uint8), "jpeg")
    image, cam = image_and_camera(good, True, info)
    assert image.shape == (480, 640, 3) and (cam.width, cam.height) == (640, 480)
    bomb = CompressedImage(format="png", data=_png_bomb(20_000, 20_000))  # 400 MP, 1.2 GB decoded
    with pytest.raises(MessageConversionError, match="PNG image is 20000x20000 but CameraInfo says 640x480"):
        image_and_camera(bomb, True, info, max_pixels=10**9)
    with pytest.raises(MessageConversionError, match="no CameraInfo"):
        image_and_camera(good, True, None)


# --------------------------------------------------------------------------- 16-bit compressed


@pytest.mark.parametrize("channels", [1, 3, 4])
def test_16bit_png_decodes_to_8bit_by_the_mono16_shift(channels):
    rgb = np.random.default_rng(4).integers(0, 256, (12, 10, 3), dtype=np.uint8)
    # A 12-bit sensor: 4 bits of shift, whatever the (full 16-bit) alpha says.
    twelve = (rgb.astype(np.uint16) << 4) | 0xF
    if channels == 1:
        stored, want = twelve[..., 0].copy(), rgb[..., 0]
    else:
        stored, want = twelve[..., ::-1], rgb  # OpenCV stores BGR(A)
        if channels == 4:
            stored = np.dstack([stored, np.full((12, 10), 65535, np.uint16)])
    ok, png = cv2.imencode(".png", np.ascontiguousarray(stored))
    assert ok
    out = compressed_msg_to_rgb(CompressedImage(format="png", data=png.tobytes()))
    assert out.dtype == np.uint8 and out.shape == want.shape
    np.testing.assert_array_equal(out, want)


def test_8bit_png_with_alpha_drops_it():
    rgb = np.random.default_rng(5).integers(0, 256, (6, 5, 3), dtype=np.uint8)
    ok, png = cv2.imencode(".png", np.dstack([rgb[..., ::-1], np.full((6, 5), 7, np.uint8)]))
    np.testing.assert_array_equal(compressed_msg_to_rgb(CompressedImage(format="png", data=png.tobytes())), rgb)


# --------------------------------------------------------------------------- camera validation

K_GOOD = np.array([[500.0, 0, 320], [0, 500, 240], [0, 0, 1]])


@pytest.mark.parametrize("n", range(1, 16))
def test_camera_validate_accepts_only_opencv_distortion_lengths(n):
    cam = Camera(K_GOOD, 640, 480, np.full(n, 0.01))
    if n in (4, 5, 8, 12, 14):
        cam.validate()
    else:
        with pytest.raises(InvalidInputError, match=f"distortion has {n} coefficients; OpenCV accepts 4, 5, 8, 12, 14"):
            cam.validate()
    # all zeros of any length: no distortion
    zero = Camera(K_GOOD, 640, 480, np.zeros(n))
    zero.validate()
    assert zero.dist is None


def test_camera_validate_rejects_skew_and_principal_point_outside():
    skewed = K_GOOD.copy()
    skewed[0, 1] = 0.5
    with pytest.raises(InvalidInputError, match="skew K\\[0,1\\]=0.5; the pinhole model of reloc_ros ignores skew"):
        Camera(skewed, 640, 480).validate()
    skewed[0, 1] = 1e-12  # float noise from a calibration tool is not skew
    Camera(skewed, 640, 480).validate()
    for cx, cy in ((-1.0, 240.0), (641.0, 240.0), (320.0, -0.5), (320.0, 480.5)):
        K = K_GOOD.copy()
        K[0, 2], K[1, 2] = cx, cy
        with pytest.raises(InvalidInputError, match="principal point .* outside the 640x480 image"):
            Camera(K, 640, 480).validate()
    K = K_GOOD.copy()
    K[0, 2], K[1, 2] = 640.0, 0.0  # on the border is still inside
    Camera(K, 640, 480).validate()
    with pytest.raises(InvalidInputError, match="NaN|not finite"):
        Camera(K_GOOD, 640, 480, np.array([0.1, np.nan, 0, 0, 0])).validate()
    with pytest.raises(InvalidInputError, match="pinhole form"):
        Camera(K_GOOD * 2, 640, 480).validate()


def test_localizer_query_check_rejects_a_distortion_opencv_cannot_use():
    from reloc_ros.localizer import _check_query

    image = np.zeros((480, 640, 3), np.uint8)
    _check_query(image, Camera(K_GOOD, 640, 480, np.full(5, 0.01)))
    with pytest.raises(InvalidInputError, match="distortion has 7 coefficients"):
        _check_query(image, Camera(K_GOOD, 640, 480, dist=np.ones(7)))
    # The same vector reaching OpenCV is what the check prevents: it raises cv2.error.
    from reloc_ros.features import undistort_keypoints

    with pytest.raises(cv2.error):
        undistort_keypoints(np.ones((3, 2), np.float32), Camera(K_GOOD, 640, 480, np.ones(7)))


def _info(model: str, d, K=K_GOOD, size=(640, 480)):
    msg = camera_to_camera_info(Camera(K, *size))
    msg.distortion_model = model
    msg.d = [float(x) for x in d]
    return msg


def test_camera_info_distortion_length_must_fit_its_model():
    assert camera_info_to_camera(_info("plumb_bob", [0.1, 0.01, 0, 0, 0.001])).dist.size == 5
    assert camera_info_to_camera(_info("rational_polynomial", [0.1] * 8)).dist.size == 8
    assert camera_info_to_camera(_info("", [0.1] * 4)).dist.size == 4
    with pytest.raises(MessageConversionError, match="'plumb_bob' needs 5 coefficients, got 8"):
        camera_info_to_camera(_info("plumb_bob", [0.1] * 8))
    with pytest.raises(MessageConversionError, match="'rational_polynomial' needs 8 coefficients, got 5"):
        camera_info_to_camera(_info("rational_polynomial", [0.1] * 5))
    with pytest.raises(MessageConversionError, match="7 distortion coefficients; OpenCV accepts"):
        camera_info_to_camera(_info("", [0.1] * 7))
    # zeros of a wrong length: no distortion, accepted
    assert camera_info_to_camera(_info("plumb_bob", [0.0] * 7)).dist is None
    with pytest.raises(MessageConversionError, match="not finite"):
        camera_info_to_camera(_info("plumb_bob", [0.1, float("nan"), 0, 0, 0]))


def test_camera_info_skew_and_principal_point_are_refused():
    skewed = K_GOOD.copy()
    skewed[0, 1] = 2.0
    with pytest.raises(MessageConversionError, match="CameraInfo: .*skew.*ignores skew"):
        camera_info_to_camera(_info("plumb_bob", [0] * 5, K=skewed))
    # K of a 1920x1080 calibration sent with 640x480 images
    big = np.array([[1400.0, 0, 960], [0, 1400, 540], [0, 0, 1]])
    msg = _info("plumb_bob", [0] * 5, K=big)
    with pytest.raises(MessageConversionError, match=r"principal point \(960, 540\) px lies outside the 640x480"):
        camera_info_to_camera(msg)


def test_camera_to_camera_info_names_the_model_of_its_distortion():
    four = camera_info_to_camera(camera_to_camera_info(Camera(K_GOOD, 640, 480, [0.1, 0.01, 0.001, 0.002])))
    np.testing.assert_allclose(four.dist, [0.1, 0.01, 0.001, 0.002, 0.0])
    msg = camera_to_camera_info(Camera(K_GOOD, 640, 480, np.full(8, 0.01)))
    assert msg.distortion_model == "rational_polynomial"
    assert camera_info_to_camera(msg).dist.size == 8
    with pytest.raises(MessageConversionError, match="12 distortion coefficients has no CameraInfo model"):
        camera_to_camera_info(Camera(K_GOOD, 640, 480, np.full(12, 0.01)))
