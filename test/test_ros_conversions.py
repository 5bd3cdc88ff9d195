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
    msg.roi.x_offset, msg.roi.y_offset, msg.roi.width, msg.roi.height = 100, 50, 200, 100
    cam = camera_info_to_camera(msg)
    assert (cam.width, cam.height) == (200, 100)
    np.testing.assert_allclose(cam.K[:2, 2], [220, 190])


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
