"""Dataset readers: the three shared datasets read against their raw files, COLMAP/TUM
files written here from real 7-Scenes frames (so the conventions round-trip), a real
rosbag2 written with rosbags (MCAP and sqlite3), the posed-folder round trip, and bad
input (NaN pose, corrupt image, truncated pose file, missing folder)."""
from __future__ import annotations

import math
from pathlib import Path

import cv2
import numpy as np
import pytest
from scipy.spatial.transform import Rotation, Slerp

from reloc_ros.datasets import (
    DATASET_FORMATS, interpolate_poses, open_dataset, parse_frames, select_keyframes, write_folder_dataset)
from reloc_ros.datasets.bag import decode_image_msg
from reloc_ros.geometry import is_rigid
from reloc_ros.types import Camera, InvalidInputError, PosedFrame

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
DATA = SHARED / "data"
SEVEN = DATA / "7scenes_redkitchen_0000_0499"
KITTI = DATA / "kitti_odometry_06_0000_0050"
STRECHA = DATA / "strecha_herzjesus_p25_half"


def need(path: Path) -> Path:
    if not path.is_dir():
        pytest.skip(f"shared dataset {path} is absent (research data lives beside the repo in ../shared/data)")
    return path


def raw_7scenes_pose(i: int) -> np.ndarray:
    return np.loadtxt(SEVEN / f"frame-{i:06d}.pose.txt")


def make_7scenes_copy(dst: Path, frames, depth: bool = False) -> Path:
    """A 7-Scenes-layout folder in dst: images linked from the shared data, pose files copied."""
    dst.mkdir(parents=True, exist_ok=True)
    for i in frames:
        stem = f"frame-{i:06d}"
        (dst / f"{stem}.color.jpg").symlink_to(SEVEN / f"{stem}.color.jpg")
        (dst / f"{stem}.pose.txt").write_text((SEVEN / f"{stem}.pose.txt").read_text())
        if depth:
            (dst / f"{stem}.depth.png").symlink_to(SEVEN / f"{stem}.depth.png")
    return dst


# --------------------------------------------------------------------------- shared formats


def test_7scenes_frames_poses_intrinsics_depth():
    need(SEVEN)
    ds = open_dataset("7scenes", SEVEN, frames="0:250:5")
    assert len(ds) == 50 and ds.skipped == []
    assert ds.names[:3] == ["frame-000000", "frame-000005", "frame-000010"] and ds.names[-1] == "frame-000245"
    poses = ds.poses
    assert poses.shape == (50, 4, 4) and poses.dtype == np.float64
    for k, i in enumerate(range(0, 250, 5)):
        raw = raw_7scenes_pose(i)
        assert np.array_equal(poses[k][:3, 3], raw[:3, 3])  # translation untouched
        assert np.abs(poses[k][:3, :3] - raw[:3, :3]).max() < 5e-4  # only re-orthonormalised
        assert is_rigid(poses[k], 1e-9)
    cam = ds.cameras[0]
    assert np.array_equal(cam.K, [[525, 0, 320], [0, 525, 240], [0, 0, 1]]) and (cam.width, cam.height) == (640, 480)
    f = ds[3]
    assert f.name == "frame-000015" and f.image.shape == (480, 640, 3) and f.image.dtype == np.uint8
    bgr = cv2.imread(str(SEVEN / "frame-000015.color.jpg"))
    assert np.array_equal(f.image, bgr[:, :, ::-1])
    raw_depth = cv2.imread(str(SEVEN / "frame-000015.depth.png"), cv2.IMREAD_UNCHANGED)
    assert f.depth.dtype == np.float32 and f.depth.shape == (480, 640)
    valid = (raw_depth > 0) & (raw_depth < 65535)
    assert np.allclose(f.depth[valid], raw_depth[valid] / 1000.0) and np.all(f.depth[~valid] == 0)
    assert f.depth_camera.K[0, 0] == 585 and np.array_equal(f.T_cam_depth, np.eye(4))
    assert ds.stamps == [None] * 50


def test_7scenes_depth_options_and_no_depth():
    need(SEVEN)
    reg = open_dataset("7scenes", SEVEN, frames="0:1", depth_registered="true")[0]
    assert reg.depth_camera.K[0, 0] == 525
    other = open_dataset("7scenes", SEVEN, frames="0:1", depth_fx="580")[0]  # CLI strings are coerced
    assert other.depth_camera.K[0, 0] == 580 and other.depth_camera.K[1, 1] == 580
    T = np.eye(4)
    T[0, 3] = 0.025
    ext = open_dataset("7scenes", SEVEN, frames="0:1", T_cam_depth=T.ravel().tolist())[0]
    assert np.array_equal(ext.T_cam_depth, T)
    rgb_only = open_dataset("7scenes", SEVEN, frames="0:1", use_depth=False)
    assert not rgb_only.has_depth and rgb_only[0].depth is None and rgb_only[0].depth_camera is None


def test_frames_selection_semantics():
    need(SEVEN)
    q = open_dataset("7scenes", SEVEN, frames="250:500:5")
    assert len(q) == 50 and q.names[0] == "frame-000250" and q.names[-1] == "frame-000495"
    assert open_dataset("7scenes", SEVEN, frames="::100").names == [f"frame-{i:06d}" for i in range(0, 500, 100)]
    assert len(open_dataset("7scenes", SEVEN, frames="490:")) == 10
    assert open_dataset("7scenes", SEVEN, frames="-2:").names == ["frame-000498", "frame-000499"]
    assert open_dataset("7scenes", SEVEN, frames="7").names == ["frame-000007"]
    assert len(open_dataset("7scenes", SEVEN)) == 500


def test_parse_frames_rejects_bad_specs():
    assert parse_frames("0:250:5") == slice(0, 250, 5)
    assert parse_frames(":10") == slice(None, 10, None)
    assert parse_frames("::-1") == slice(None, None, -1)
    assert parse_frames(None) == slice(None) and parse_frames("") == slice(None)
    for bad in ("0:10:0", "a:b", "1:2:3:4", "1.5:3"):
        with pytest.raises(InvalidInputError):
            parse_frames(bad)


def test_kitti_poses_calib_grey_images():
    need(KITTI)
    ds = open_dataset("kitti", KITTI)
    raw = np.loadtxt(KITTI / "poses.txt")
    assert len(ds) == 51 == len(raw) and ds.names[0] == "000000" and ds.names[-1] == "000050"
    for i in (0, 1, 25, 50):
        assert np.abs(ds.poses[i][:3] - raw[i].reshape(3, 4)).max() < 1e-6
    cam = ds.cameras[0]
    assert np.allclose(cam.K, [[707.0912, 0, 601.8873], [0, 707.0912, 183.1104], [0, 0, 1]])
    assert (cam.width, cam.height) == (1226, 370)
    f = ds[10]
    assert f.image.shape == (370, 1226) and f.image.dtype == np.uint8 and f.depth is None
    assert open_dataset("kitti", KITTI, frames="0::2").names[:3] == ["000000", "000002", "000004"]


def test_kitti_odometry_layout_with_times(tmp_path):
    need(KITTI)
    seq = tmp_path / "sequences" / "06"
    (seq / "image_0").mkdir(parents=True)
    for i in range(4):
        (seq / "image_0" / f"{i:06d}.png").symlink_to(KITTI / "image_l" / f"{i:06d}.png")
    rows = (KITTI / "calib.txt").read_text().split("\n")
    (seq / "calib.txt").write_text(f"P0: {rows[0]}\nP1: {rows[1]}\n")
    (seq / "times.txt").write_text("0.0\n0.103\n0.207\n0.31\n")
    (tmp_path / "poses").mkdir()
    (tmp_path / "poses" / "06.txt").write_text("\n".join((KITTI / "poses.txt").read_text().split("\n")[:4]) + "\n")
    ds = open_dataset("kitti", seq)
    assert len(ds) == 4 and ds.stamps == [0.0, 0.103, 0.207, 0.31]
    assert np.abs(ds.poses[3][:3] - np.loadtxt(KITTI / "poses.txt")[3].reshape(3, 4)).max() < 1e-6
    assert ds.cameras[0].K[0, 2] == pytest.approx(601.8873)


def test_strecha_cameras():
    need(STRECHA)
    ds = open_dataset("strecha", STRECHA)
    assert len(ds) == 25 and ds.names[0] == "0000" and ds.names[-1] == "0024"
    lines = (STRECHA / "gt_dense_cameras" / "0007.jpg.camera").read_text().split("\n")
    K = np.array([[float(v) for v in lines[i].split()] for i in range(3)])
    R = np.array([[float(v) for v in lines[i].split()] for i in range(4, 7)])
    C = np.array([float(v) for v in lines[7].split()])
    T = ds.poses[7]
    assert np.array_equal(T[:3, 3], C) and np.abs(T[:3, :3] - R).max() < 1e-5
    assert np.array_equal(ds.cameras[7].K, K) and ds.cameras[7].dist is None
    assert (ds.cameras[7].width, ds.cameras[7].height) == (1536, 1024)
    assert ds[7].image.shape == (1024, 1536, 3)


# --------------------------------------------------------------------------- bad input


def test_nan_and_non_rigid_poses_are_dropped_and_listed(tmp_path, caplog):
    need(SEVEN)
    root = make_7scenes_copy(tmp_path / "seq", range(5))
    (root / "frame-000001.pose.txt").write_text("nan 0 0 0\n0 1 0 0\n0 0 1 0\n0 0 0 1\n")
    (root / "frame-000002.pose.txt").write_text("2 0 0 0\n0 1 0 0\n0 0 1 0\n0 0 0 1\n")
    (root / "frame-000003.pose.txt").write_text("-1.#IND 0 0 0\n0 1 0 0\n0 0 1 0\n0 0 0 1\n")  # 7-Scenes' own NaN
    with caplog.at_level("WARNING", logger="reloc_ros.datasets"):
        ds = open_dataset("7scenes", root)
    assert ds.names == ["frame-000000", "frame-000004"]
    skipped = dict(ds.skipped)
    assert set(skipped) == {"frame-000001", "frame-000002", "frame-000003"}
    assert "NaN" in skipped["frame-000001"] and "orthonormal" in skipped["frame-000002"]
    assert "frame-000001" in caplog.text
    assert np.all(np.isfinite(ds.poses))


def test_corrupt_and_truncated_images_raise_with_the_file_name(tmp_path):
    need(SEVEN)
    root = make_7scenes_copy(tmp_path / "seq", range(3))
    bad = root / "frame-000001.color.jpg"
    bad.unlink()
    bad.write_bytes(b"this is not a jpeg at all")
    cut = root / "frame-000002.color.jpg"
    data = (SEVEN / "frame-000002.color.jpg").read_bytes()
    cut.unlink()
    cut.write_bytes(data[: len(data) // 2])
    ds = open_dataset("7scenes", root)
    assert len(ds) == 3  # opening reads no pixels
    assert ds[0].image.shape == (480, 640, 3)
    with pytest.raises(InvalidInputError, match="frame-000001.color.jpg"):
        ds[1]
    with pytest.raises(InvalidInputError, match="frame-000002.color.jpg"):
        ds[2]


def test_truncated_pose_files_raise_clear_errors(tmp_path):
    need(SEVEN)
    root = make_7scenes_copy(tmp_path / "seq", range(2))
    (root / "frame-000001.pose.txt").write_text("1 0 0 0\n0 1 0 0\n0 0 1")
    with pytest.raises(InvalidInputError, match=r"frame-000001\.pose\.txt.*truncated"):
        open_dataset("7scenes", root)
    need(KITTI)
    seq = tmp_path / "kitti"
    (seq / "image_l").mkdir(parents=True)
    for i in range(3):
        (seq / "image_l" / f"{i:06d}.png").symlink_to(KITTI / "image_l" / f"{i:06d}.png")
    (seq / "calib.txt").write_text((KITTI / "calib.txt").read_text())
    lines = (KITTI / "poses.txt").read_text().split("\n")
    (seq / "poses.txt").write_text("\n".join(lines[:2]) + "\n" + lines[2][:40])
    with pytest.raises(InvalidInputError, match=r"poses\.txt:3.*truncated"):
        open_dataset("kitti", seq)
    (seq / "poses.txt").write_text("\n".join(lines[:2]) + "\n")
    with pytest.raises(InvalidInputError, match="2 poses but"):
        open_dataset("kitti", seq)


def test_missing_source_unknown_format_and_options(tmp_path):
    assert set(DATASET_FORMATS) == {"7scenes", "kitti", "strecha", "colmap", "tum", "bag", "folder"}
    for fmt in DATASET_FORMATS:
        with pytest.raises(FileNotFoundError):
            open_dataset(fmt, tmp_path / "does-not-exist")
    with pytest.raises(InvalidInputError, match="unknown dataset format"):
        open_dataset("nuscenes", tmp_path)
    with pytest.raises(InvalidInputError, match="depth_fxx"):
        open_dataset("7scenes", tmp_path, depth_fxx=1)
    with pytest.raises(InvalidInputError, match="depth_fx"):
        open_dataset("7scenes", tmp_path, depth_fx="not-a-number")
    with pytest.raises(InvalidInputError, match="no 7-Scenes frames"):
        open_dataset("7scenes", tmp_path)


# --------------------------------------------------------------------------- colmap


def write_png(path: Path, img: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), img if img.ndim == 2 else img[:, :, ::-1])


def test_colmap_conventions_by_hand(tmp_path):
    """A pose and cameras written by hand in COLMAP's documented conventions."""
    model = tmp_path / "sparse" / "0"
    model.mkdir(parents=True)
    (model / "cameras.txt").write_text(
        "# Camera list\n1 SIMPLE_RADIAL 40 30 50 20.5 15.5 0.01\n2 OPENCV 40 30 50 51 20 15 0.1 -0.2 0.001 0.002\n")
    c, s = math.cos(math.pi / 4), math.sin(math.pi / 4)  # 90 deg about z, qvec is (w, x, y, z)
    (model / "images.txt").write_text(
        "# Image list\n"
        f"1 {c} 0 0 {s} 1 2 3 1 b.png\n\n"
        f"2 1 0 0 0 0 0 0 2 a.png\n10.0 12.0 -1 11.0 13.0 5\n")
    img = np.random.default_rng(0).integers(0, 255, (30, 40, 3), dtype=np.uint8)
    write_png(tmp_path / "images" / "a.png", img)
    write_png(tmp_path / "images" / "b.png", img)
    ds = open_dataset("colmap", tmp_path)
    assert ds.names == ["a.png", "b.png"]
    T = ds.poses[1]
    assert np.allclose(T[:3, :3], [[0, 1, 0], [-1, 0, 0], [0, 0, 1]], atol=1e-12)  # R_wc = R_cw^T
    assert np.allclose(T[:3, 3], [-2, 1, -3], atol=1e-12)  # C = -R_cw^T t
    radial, opencv = ds.cameras[1], ds.cameras[0]
    assert np.allclose(radial.K, [[50, 0, 20], [0, 50, 15], [0, 0, 1]])  # centre shifted by -0.5 px
    assert np.allclose(radial.dist, [0.01, 0, 0, 0])
    assert np.allclose(opencv.K, [[50, 0, 19.5], [0, 51, 14.5], [0, 0, 1]])
    assert np.allclose(opencv.dist, [0.1, -0.2, 0.001, 0.002])
    assert np.array_equal(ds[0].image, img)


def test_colmap_roundtrip_from_7scenes(tmp_path):
    need(SEVEN)
    src = open_dataset("7scenes", SEVEN, frames="0:300:60", use_depth=False)
    (tmp_path / "images").mkdir()
    cams, imgs = [], []
    for k, (name, T) in enumerate(zip(src.names, src.poses)):
        (tmp_path / "images" / f"{name}.jpg").symlink_to(SEVEN / f"{name}.color.jpg")
        R_cw = T[:3, :3].T
        t_cw = -R_cw @ T[:3, 3]
        x, y, z, w = Rotation.from_matrix(R_cw).as_quat()
        nums = " ".join(repr(float(v)) for v in (w, x, y, z, *t_cw))
        imgs.append(f"{k + 1} {nums} 1 {name}.jpg\n\n")
    cams.append("1 PINHOLE 640 480 525 525 320.5 240.5\n")
    (tmp_path / "cameras.txt").write_text("".join(cams))
    (tmp_path / "images.txt").write_text("".join(imgs))
    (tmp_path / "points3D.txt").write_text("# ignored\n")
    ds = open_dataset("colmap", tmp_path)
    assert ds.names == [f"{n}.jpg" for n in src.names]
    assert np.abs(ds.poses - src.poses).max() < 1e-9
    assert np.array_equal(ds.cameras[0].K, src.cameras[0].K)
    assert np.array_equal(ds[2].image, src[2].image)


# --------------------------------------------------------------------------- tum


def test_tum_association_interpolation_and_depth(tmp_path):
    need(SEVEN)
    root = tmp_path / "rgbd_dataset_freiburg3_redkitchen"
    (root / "rgb").mkdir(parents=True)
    (root / "depth").mkdir()
    poses = [raw_7scenes_pose(i) for i in range(6)]
    gt, rgb, dep = ["# timestamp tx ty tz qx qy qz qw\n"], ["# timestamp filename\n"], []
    for i, T in enumerate(poses):
        t = 1000.0 + 0.1 * i
        q = Rotation.from_matrix(T[:3, :3]).as_quat()  # x, y, z, w: TUM's order
        gt.append(f"{t:.6f} " + " ".join(repr(float(v)) for v in (*T[:3, 3], *q)) + "\n")
        (root / "rgb" / f"{t:.6f}.jpg").symlink_to(SEVEN / f"frame-{i:06d}.color.jpg")
        (root / "depth" / f"{t + 0.004:.6f}.png").symlink_to(SEVEN / f"frame-{i:06d}.depth.png")
        rgb.append(f"{t:.6f} rgb/{t:.6f}.jpg\n")
        dep.append(f"{t + 0.004:.6f} depth/{t + 0.004:.6f}.png\n")
    (root / "rgb" / "1000.250000.jpg").symlink_to(SEVEN / "frame-000002.color.jpg")
    (root / "rgb" / "999.000000.jpg").symlink_to(SEVEN / "frame-000000.color.jpg")
    rgb += ["1000.250000 rgb/1000.250000.jpg\n", "999.000000 rgb/999.000000.jpg\n"]
    (root / "groundtruth.txt").write_text("".join(gt))
    (root / "rgb.txt").write_text("".join(rgb))
    (root / "depth.txt").write_text("".join(dep))

    ds = open_dataset("tum", root, max_dt=0.06, max_gap=0.15, depth_scale=0.001)
    assert ds.names == ["1000.000000", "1000.100000", "1000.200000", "1000.250000", "1000.300000",
                        "1000.400000", "1000.500000"]
    assert dict(ds.skipped).keys() == {"999.000000"} and "before the first" in ds.skipped[0][1]
    for k, i in ((0, 0), (1, 1), (2, 2), (4, 3), (6, 5)):
        assert np.array_equal(ds.poses[k][:3, 3], poses[i][:3, 3])
        assert np.abs(ds.poses[k][:3, :3] - poses[i][:3, :3]).max() < 5e-4
    mid = Slerp([0, 1], Rotation.from_matrix([ds.poses[2][:3, :3], ds.poses[4][:3, :3]]))(0.5).as_matrix()
    assert np.allclose(ds.poses[3][:3, :3], mid, atol=1e-9)
    assert np.allclose(ds.poses[3][:3, 3], (poses[2][:3, 3] + poses[3][:3, 3]) / 2, atol=1e-12)
    assert ds.stamps[3] == pytest.approx(1000.25)
    cam = ds.cameras[0]  # detected from the folder name
    assert (cam.K[0, 0], cam.K[1, 1], cam.K[0, 2], cam.K[1, 2]) == (535.4, 539.2, 320.1, 247.6)
    f = ds[1]
    raw = cv2.imread(str(SEVEN / "frame-000001.depth.png"), cv2.IMREAD_UNCHANGED)
    assert np.allclose(f.depth, raw / 1000.0) and np.array_equal(f.depth_camera.K, cam.K)
    fr1 = open_dataset("tum", root, frames="1:2", camera="fr1", max_dt=0.06, max_gap=0.15).cameras[0]
    assert fr1.K[0, 0] == 517.306408 and fr1.dist is not None and fr1.dist[0] == 0.262383
    # the default max_dt (0.02 s) is tighter than this 0.1 s ground truth: the halfway frame goes
    strict = open_dataset("tum", root, max_gap=0.15)
    assert "1000.250000" in dict(strict.skipped) and "max_dt" in dict(strict.skipped)["1000.250000"]


# --------------------------------------------------------------------------- trajectory helpers


def test_interpolate_poses_is_exact_for_constant_rates():
    t = np.array([0.0, 1.0, 2.0])
    T = np.stack([np.eye(4)] * 3)
    for k in range(3):
        T[k, :3, :3] = Rotation.from_euler("z", 30 * k, degrees=True).as_matrix()
        T[k, :3, 3] = [k, 2 * k, 0]
    out, ok, why = interpolate_poses(np.array([-0.1, 0.0, 0.25, 1.0, 1.5, 2.0, 2.1]), t, T, max_gap=1.5)
    assert ok.tolist() == [False, True, True, True, True, True, False]
    assert "before" in why[0] and "after" in why[6]
    assert np.allclose(out[2, :3, :3], Rotation.from_euler("z", 7.5, degrees=True).as_matrix(), atol=1e-12)
    assert np.allclose(out[4, :3, 3], [1.5, 3, 0], atol=1e-12)
    assert np.array_equal(out[3], T[1])
    _, ok, why = interpolate_poses(np.array([0.5]), t, T, max_gap=0.5)
    assert not ok[0] and "max_gap" in why[0]


def test_select_keyframes_by_distance_and_angle():
    T = np.stack([np.eye(4)] * 8)
    T[:, 0, 3] = [0, 0.04, 0.08, 0.12, 0.12, 0.12, 0.12, 0.12]
    for k, deg in ((4, 4), (5, 8), (6, 12), (7, 12)):
        T[k, :3, :3] = Rotation.from_euler("y", deg, degrees=True).as_matrix()
    assert select_keyframes(T, 0.1, 10) == [0, 3, 6]
    assert select_keyframes(T, 0.0, 0.0) == list(range(8))


# --------------------------------------------------------------------------- bag

R_LINK_OPTICAL = np.array([[0, 0, 1], [-1, 0, 0], [0, -1, 0]], dtype=float)  # REP-103 optical axes


def _T(R=np.eye(3), t=(0, 0, 0)):
    T = np.eye(4)
    T[:3, :3] = R
    T[:3, 3] = t
    return T


T_MAP_ODOM = _T(Rotation.from_euler("z", 30, degrees=True).as_matrix(), (1.0, 2.0, 0.0))
T_BASE_LINK = _T(Rotation.from_euler("z", 5, degrees=True).as_matrix(), (0.2, 0.0, 0.5))
T_LINK_OPT = _T(R_LINK_OPTICAL)


def T_odom_base(t: float) -> np.ndarray:
    """Drive 0.4 m/s along x for 2 s, then turn in place at 40 deg/s."""
    if t <= 2.0:
        return _T(t=(0.4 * t, 0, 0))
    return _T(Rotation.from_euler("z", 40 * (t - 2.0), degrees=True).as_matrix(), (0.8, 0, 0))


def T_map_cam(t: float) -> np.ndarray:
    return T_MAP_ODOM @ T_odom_base(t) @ T_BASE_LINK @ T_LINK_OPT


IMG_W, IMG_H = 32, 24
IMAGE_STAMPS = [-0.5] + [round(0.1 * k, 10) for k in range(41)] + [4.5]


def bag_image(k: int) -> np.ndarray:
    return np.random.default_rng(k).integers(0, 256, (IMG_H, IMG_W, 3), dtype=np.uint8)


def write_bag(path: Path, storage: str, compressed: bool, with_depth: bool) -> None:
    from rosbags.rosbag2 import StoragePlugin, Writer
    from rosbags.typesys import Stores, get_typestore

    ts = get_typestore(Stores.ROS2_HUMBLE)
    ty = ts.types
    BASE = 1_700_000_000  # seconds: a realistic epoch so stamps are large integers

    def stamp(t: float):
        ns = BASE * 10**9 + int(round(t * 1e9))
        return ty["builtin_interfaces/msg/Time"](sec=ns // 10**9, nanosec=ns % 10**9)

    def header(t, frame):
        return ty["std_msgs/msg/Header"](stamp=stamp(t), frame_id=frame)

    def tfs(t, parent, child, T):
        q = Rotation.from_matrix(T[:3, :3]).as_quat()
        return ty["geometry_msgs/msg/TransformStamped"](
            header=header(t, parent), child_frame_id=child,
            transform=ty["geometry_msgs/msg/Transform"](
                translation=ty["geometry_msgs/msg/Vector3"](x=T[0, 3], y=T[1, 3], z=T[2, 3]),
                rotation=ty["geometry_msgs/msg/Quaternion"](x=q[0], y=q[1], z=q[2], w=q[3])))

    def pose(T):
        q = Rotation.from_matrix(T[:3, :3]).as_quat()
        return ty["geometry_msgs/msg/Pose"](
            position=ty["geometry_msgs/msg/Point"](x=T[0, 3], y=T[1, 3], z=T[2, 3]),
            orientation=ty["geometry_msgs/msg/Quaternion"](x=q[0], y=q[1], z=q[2], w=q[3]))

    plugin = StoragePlugin.MCAP if storage == "mcap" else StoragePlugin.SQLITE3
    msgs = []  # (t, topic, msgtype, msg)
    K = [30.0, 0, 15.5, 0, 31.0, 11.5, 0, 0, 1]
    roi = ty["sensor_msgs/msg/RegionOfInterest"](x_offset=0, y_offset=0, height=0, width=0, do_rectify=False)
    info = ty["sensor_msgs/msg/CameraInfo"](
        header=header(-1.0, "camera_optical"), height=IMG_H, width=IMG_W, distortion_model="plumb_bob",
        d=np.array([0.1, -0.05, 0.001, 0.002, 0.0]), k=np.array(K), r=np.eye(3).ravel(),
        p=np.array([30.0, 0, 15.5, 0, 0, 31.0, 11.5, 0, 0, 0, 1, 0]), binning_x=0, binning_y=0, roi=roi)
    msgs.append((-1.0, "/camera/camera_info", "sensor_msgs/msg/CameraInfo", info))
    static = ty["tf2_msgs/msg/TFMessage"](transforms=[tfs(-1.0, "base_link", "camera_link", T_BASE_LINK),
                                                     tfs(-1.0, "camera_link", "camera_optical", T_LINK_OPT)])
    msgs.append((-1.0, "/tf_static", "tf2_msgs/msg/TFMessage", static))
    for j in range(0, 201):  # odom -> base_link at 50 Hz over [0, 4] s
        t = j * 0.02
        msgs.append((t, "/tf", "tf2_msgs/msg/TFMessage",
                     ty["tf2_msgs/msg/TFMessage"](transforms=[tfs(t, "odom", "base_link", T_odom_base(t))])))
        if j % 10 == 0:  # map -> odom at 5 Hz
            msgs.append((t, "/tf", "tf2_msgs/msg/TFMessage",
                         ty["tf2_msgs/msg/TFMessage"](transforms=[tfs(t, "/map", "odom", T_MAP_ODOM)])))
        if j % 5 == 0:  # camera pose at 10 Hz, odometry at 10 Hz
            msgs.append((t, "/camera_pose", "geometry_msgs/msg/PoseStamped",
                         ty["geometry_msgs/msg/PoseStamped"](header=header(t, "map"), pose=pose(T_map_cam(t)))))
            cov = ty["geometry_msgs/msg/PoseWithCovariance"](pose=pose(T_odom_base(t)), covariance=np.zeros(36))
            twist = ty["geometry_msgs/msg/TwistWithCovariance"](
                twist=ty["geometry_msgs/msg/Twist"](linear=ty["geometry_msgs/msg/Vector3"](x=0, y=0, z=0),
                                                    angular=ty["geometry_msgs/msg/Vector3"](x=0, y=0, z=0)),
                covariance=np.zeros(36))
            msgs.append((t, "/odom", "nav_msgs/msg/Odometry",
                         ty["nav_msgs/msg/Odometry"](header=header(t, "odom"), child_frame_id="base_link",
                                                     pose=cov, twist=twist)))
    for k, t in enumerate(IMAGE_STAMPS):
        img = bag_image(k)
        if compressed:
            ok, buf = cv2.imencode(".png", img[:, :, ::-1])
            msgs.append((t, "/camera/image_raw/compressed", "sensor_msgs/msg/CompressedImage",
                         ty["sensor_msgs/msg/CompressedImage"](header=header(t, "camera_optical"),
                                                               format="rgb8; png compressed bgr8",
                                                               data=np.frombuffer(buf.tobytes(), np.uint8))))
        else:
            step = IMG_W * 3 + 8  # padded rows: the reader must honour step
            data = np.zeros((IMG_H, step), np.uint8)
            data[:, : IMG_W * 3] = img.reshape(IMG_H, -1)
            msgs.append((t, "/camera/image_raw", "sensor_msgs/msg/Image",
                         ty["sensor_msgs/msg/Image"](header=header(t, "camera_optical"), height=IMG_H, width=IMG_W,
                                                     encoding="rgb8", is_bigendian=0, step=step,
                                                     data=data.ravel())))
        if with_depth:
            depth = np.full((IMG_H, IMG_W), 1000 + 10 * k, np.uint16)
            depth[0, 0] = 0
            msgs.append((t + 0.003, "/camera/depth/image_raw", "sensor_msgs/msg/Image",
                         ty["sensor_msgs/msg/Image"](header=header(t + 0.003, "camera_optical"), height=IMG_H,
                                                     width=IMG_W, encoding="16UC1", is_bigendian=0, step=IMG_W * 2,
                                                     data=depth.view(np.uint8).ravel())))
    msgs.sort(key=lambda m: m[0])
    with Writer(path, version=9, storage_plugin=plugin) as writer:
        conns = {}
        for t, topic, msgtype, msg in msgs:
            if topic not in conns:
                conns[topic] = writer.add_connection(topic, msgtype, typestore=ts)
            ns = BASE * 10**9 + int(round(t * 1e9))
            writer.write(conns[topic], ns, ts.serialize_cdr(msg, msgtype))


EXPECTED_KF = [0, 3, 6, 9, 12, 15, 18, 23, 26, 29, 32, 35, 38]  # image k (t = 0.1 k); see T_odom_base


@pytest.fixture(scope="module")
def bags(tmp_path_factory):
    root = tmp_path_factory.mktemp("bags")
    write_bag(root / "raw_mcap", "mcap", compressed=False, with_depth=True)
    write_bag(root / "compressed_sqlite", "sqlite3", compressed=True, with_depth=False)
    return root


@pytest.mark.parametrize("bag", ["raw_mcap", "compressed_sqlite"])
def test_bag_tf_chain_poses_intrinsics_images(bags, bag):
    ds = open_dataset("bag", bags / bag, tf_parent="map", tf_child="base_link", kf_select=False)
    # index 0 (t = -0.5 s) and the last (t = 4.5 s) lie outside the TF time range
    assert [n for n, _ in ds.skipped] == ["000000", "000042"]
    assert all("pose sample" in why for _, why in ds.skipped)
    assert ds.names == [f"{k + 1:06d}" for k in range(41)]
    for i, k in enumerate(range(41)):
        assert np.abs(ds.poses[i] - T_map_cam(0.1 * k)).max() < 1e-6, f"frame {k}"
    assert ds.stamps[10] == pytest.approx(1_700_000_000 + 1.0, abs=1e-6)
    cam = ds.cameras[0]
    assert np.allclose(cam.K, [[30, 0, 15.5], [0, 31, 11.5], [0, 0, 1]])
    assert np.allclose(cam.dist, [0.1, -0.05, 0.001, 0.002, 0.0]) and (cam.width, cam.height) == (IMG_W, IMG_H)
    f = ds[7]
    assert np.array_equal(f.image, bag_image(8))  # name 000008 = image k=7 (index 0 is the early one)
    ds.close()


def test_bag_pose_topics_and_keyframes(bags):
    ds = open_dataset("bag", bags / "raw_mcap", pose_topic="/camera_pose")  # keyframes on by default
    assert ds.names == [f"{k + 1:06d}" for k in EXPECTED_KF]
    for name, T in zip(ds.names, ds.poses):
        assert np.abs(T - T_map_cam(0.1 * (int(name) - 1))).max() < 1e-6
    # consecutive keyframes moved >= 0.1 m or turned >= 10 deg
    P = ds.poses
    for a, b in zip(P[:-1], P[1:]):
        moved = np.linalg.norm(a[:3, 3] - b[:3, 3])
        turned = Rotation.from_matrix(a[:3, :3].T @ b[:3, :3]).magnitude() * 180 / np.pi
        assert moved >= 0.1 or turned >= 10
    # Odometry gives base_link in odom; TF's static chain carries it to the optical frame
    odo = open_dataset("bag", bags / "compressed_sqlite", pose_topic="/odom", kf_select=False)
    T_odom_cam = [T_odom_base(0.1 * k) @ T_BASE_LINK @ T_LINK_OPT for k in range(41)]
    assert np.abs(odo.poses - np.stack(T_odom_cam)).max() < 1e-6
    assert np.array_equal(odo[40].image, bag_image(41))


def test_bag_frames_slice_and_fixed_extrinsics(bags):
    # frames index the stamp-sorted image list before any pose or keyframe filtering
    ds = open_dataset("bag", bags / "raw_mcap", frames="10:20:3", tf_parent="map", kf_select=False)
    assert ds.names == ["000010", "000013", "000016", "000019"]
    # T_body_cam from tf_child replaces the TF lookup to the image frame: same poses
    fixed = open_dataset("bag", bags / "raw_mcap", frames="10:20:3", tf_parent="map", tf_child="base_link",
                         T_body_cam=(T_BASE_LINK @ T_LINK_OPT).ravel().tolist(), kf_select=False)
    assert np.abs(fixed.poses - ds.poses).max() < 1e-9
    assert np.abs(ds.poses[0] - T_map_cam(0.9)).max() < 1e-6


def test_bag_depth_topic_pairing(bags):
    ds = open_dataset("bag", bags / "raw_mcap", tf_parent="map", kf_select=False,
                      depth_topic="/camera/depth/image_raw")
    f = ds[4]  # image k = 4 -> depth written with value 1000 + 10 * 5 mm (index shift of one)
    assert f.depth.dtype == np.float32 and f.depth[0, 0] == 0
    assert np.allclose(f.depth[1:, 1:], 1.05) and np.array_equal(f.T_cam_depth, np.eye(4))
    assert np.array_equal(f.depth_camera.K, f.camera.K)
    no_depth = open_dataset("bag", bags / "raw_mcap", use_depth=False, tf_parent="map", kf_select=False,
                            depth_topic="/camera/depth/image_raw")
    assert no_depth[4].depth is None


def test_bag_errors_are_clear(bags, tmp_path):
    with pytest.raises(InvalidInputError, match="several pose topics"):
        open_dataset("bag", bags / "raw_mcap")
    with pytest.raises(InvalidInputError, match="no topic '/nope'"):
        open_dataset("bag", bags / "raw_mcap", image_topic="/nope", pose_topic="/odom")
    with pytest.raises(InvalidInputError, match="not in TF"):
        open_dataset("bag", bags / "raw_mcap", tf_parent="earth")
    (tmp_path / "notabag").mkdir()
    with pytest.raises(InvalidInputError, match="not a rosbag2"):
        open_dataset("bag", tmp_path / "notabag")
    data = next((bags / "raw_mcap").glob("*.mcap")).read_bytes()
    (tmp_path / "cut.mcap").write_bytes(data[: len(data) // 2])
    with pytest.raises(InvalidInputError, match="cannot open bag"):
        open_dataset("bag", tmp_path / "cut.mcap", tf_parent="map")


def test_decode_image_msg_encodings():
    from rosbags.typesys import Stores, get_typestore

    ty = get_typestore(Stores.ROS2_HUMBLE).types
    hdr = ty["std_msgs/msg/Header"](stamp=ty["builtin_interfaces/msg/Time"](sec=1, nanosec=0), frame_id="c")
    rgb = np.random.default_rng(1).integers(0, 256, (3, 4, 3), dtype=np.uint8)

    def msg(enc, arr, step=None, big=0):
        raw = arr.reshape(arr.shape[0], -1).view(np.uint8)
        step = step or raw.shape[1]
        data = np.zeros((arr.shape[0], step), np.uint8)
        data[:, : raw.shape[1]] = raw
        return ty["sensor_msgs/msg/Image"](header=hdr, height=arr.shape[0], width=arr.shape[1], encoding=enc,
                                           is_bigendian=big, step=step, data=data.ravel())

    T = "sensor_msgs/msg/Image"
    assert np.array_equal(decode_image_msg(msg("rgb8", rgb, step=16), T, "x"), rgb)
    assert np.array_equal(decode_image_msg(msg("bgr8", rgb[:, :, ::-1].copy()), T, "x"), rgb)
    rgba = np.concatenate([rgb, np.full((3, 4, 1), 7, np.uint8)], axis=2)
    assert np.array_equal(decode_image_msg(msg("rgba8", rgba), T, "x"), rgb)
    assert np.array_equal(decode_image_msg(msg("bgra8", rgba[:, :, [2, 1, 0, 3]].copy()), T, "x"), rgb)
    grey = rgb[:, :, 0].copy()
    assert np.array_equal(decode_image_msg(msg("mono8", grey, step=8), T, "x"), grey)
    g16 = grey.astype(np.uint16) * 257
    assert np.array_equal(decode_image_msg(msg("mono16", g16), T, "x"), grey)
    assert np.array_equal(decode_image_msg(msg("mono16", g16.byteswap(), big=1), T, "x"), grey)
    with pytest.raises(InvalidInputError, match="unsupported image encoding"):
        decode_image_msg(msg("yuv422", grey), T, "x")
    short = msg("rgb8", rgb)
    short.data = short.data[:10]
    with pytest.raises(InvalidInputError, match="does not fit"):
        decode_image_msg(short, T, "x")
    bad = ty["sensor_msgs/msg/CompressedImage"](header=hdr, format="jpeg", data=np.frombuffer(b"garbage", np.uint8))
    with pytest.raises(InvalidInputError, match="cannot decode"):
        decode_image_msg(bad, "sensor_msgs/msg/CompressedImage", "x")


# --------------------------------------------------------------------------- folder


def synthetic_frames():
    rng = np.random.default_rng(3)
    cam = Camera(np.array([[50.0, 0, 19.5], [0, 52.0, 14.5], [0, 0, 1]]), 40, 30, np.array([0.1, -0.01, 0, 0, 0.001]))
    grey_cam = Camera(np.array([[40.0, 0, 20], [0, 40.0, 15], [0, 0, 1]]), 40, 30)
    out = []
    for k in range(3):
        T = np.eye(4)
        T[:3, :3] = Rotation.from_rotvec(rng.normal(size=3)).as_matrix()
        T[:3, 3] = rng.normal(size=3)
        depth = (rng.integers(0, 5000, (15, 20)) / 1000.0).astype(np.float32)  # whole millimetres
        out.append(PosedFrame(name=f"seq/img{k * 5}", image=rng.integers(0, 256, (30, 40, 3), dtype=np.uint8),
                              T_world_cam=T, camera=cam, depth=depth, stamp=10.0 + k / 3))
    out.append(PosedFrame(name="grey", image=rng.integers(0, 256, (30, 40), dtype=np.uint8),
                          T_world_cam=np.eye(4), camera=grey_cam))
    return out


@pytest.mark.parametrize("depth_format", ["png", "npy"])
def test_folder_roundtrip(tmp_path, depth_format):
    frames = synthetic_frames()
    out = write_folder_dataset(frames, tmp_path / "posed", depth_format=depth_format)
    ds = open_dataset("folder", out)
    assert ds.names == ["grey", "seq/img0", "seq/img5", "seq/img10"]  # natural order
    by_name = {f.name: f for f in frames}
    for i, name in enumerate(ds.names):
        src, got = by_name[name], ds[i]
        assert np.array_equal(got.T_world_cam, src.T_world_cam)  # repr() floats round-trip exactly
        assert np.array_equal(got.image, src.image)
        assert np.array_equal(got.camera.K, src.camera.K) and (got.camera.width, got.camera.height) == (40, 30)
        assert (got.camera.dist is None) == (src.camera.dist is None)
        if src.camera.dist is not None:
            assert np.array_equal(got.camera.dist, src.camera.dist)
        assert got.stamp == src.stamp
        if src.depth is None:
            assert got.depth is None
        else:
            assert np.array_equal(got.depth, src.depth) and got.depth.dtype == np.float32
            assert np.allclose(got.depth_camera.K, src.camera.scaled(0.5).K)
    assert open_dataset("folder", out, frames="1:3").names == ["seq/img0", "seq/img5"]


def test_folder_roundtrip_from_7scenes_keeps_depth_camera(tmp_path):
    need(SEVEN)
    src = open_dataset("7scenes", SEVEN, frames="100:103")
    out = write_folder_dataset(src, tmp_path / "kitchen")
    ds = open_dataset("folder", out)
    assert ds.names == src.names and np.array_equal(ds.poses, src.poses)
    a, b = src[1], ds[1]
    assert np.array_equal(a.image, b.image) and np.array_equal(a.depth, b.depth)
    assert b.depth_camera.K[0, 0] == 585 and b.camera.K[0, 0] == 525
    assert open_dataset("folder", out, use_depth=False)[0].depth is None


def test_folder_alternative_files_and_writer_errors(tmp_path):
    root = tmp_path / "hand"
    img = np.random.default_rng(5).integers(0, 256, (30, 40, 3), dtype=np.uint8)
    write_png(root / "images" / "a.png", img)
    write_png(root / "images" / "b.png", img)
    (root / "images" / "a.pose.txt").write_text("1 0 0 0.5\n0 1 0 0\n0 0 1 0\n0 0 0 1\n")
    (root / "images" / "b.pose.txt").write_text("1 0 0 0\n0 1 0 nan\n0 0 1 0\n0 0 0 1\n")
    (root / "cameras.yaml").write_text("default: {width: 40, height: 30, fx: 50, fy: 50, cx: 20, cy: 15}\n"
                                       "images:\n  b: {width: 40, height: 30, K: [60, 0, 20, 0, 60, 15, 0, 0, 1]}\n")
    ds = open_dataset("folder", root)
    assert ds.names == ["a"] and ds.skipped[0][0] == "b"
    assert ds.poses[0][0, 3] == 0.5 and ds.cameras[0].K[0, 0] == 50

    bad = synthetic_frames()
    bad[1].T_world_cam[0, 0] = np.nan
    with pytest.raises(InvalidInputError, match="seq/img5"):
        write_folder_dataset(bad, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]
    write_folder_dataset(synthetic_frames()[:1], tmp_path / "out")
    with pytest.raises(FileExistsError):
        write_folder_dataset(synthetic_frames()[:1], tmp_path / "out")
    write_folder_dataset(synthetic_frames()[3:], tmp_path / "out", overwrite=True)
    assert open_dataset("folder", tmp_path / "out").names == ["grey"]
    spaced = synthetic_frames()[3]
    spaced.name = "has space"
    with pytest.raises(InvalidInputError, match="has space"):
        write_folder_dataset([spaced], tmp_path / "out2")


def test_subset_is_a_view(tmp_path):
    frames = synthetic_frames()
    ds = open_dataset("folder", write_folder_dataset(frames, tmp_path / "p"))
    sub = ds.subset([3, 0])
    assert sub.names == ["seq/img10", "grey"] and np.array_equal(sub.poses, ds.poses[[3, 0]])
    assert np.array_equal(sub[0].image, ds[3].image)
    others = ds.subset([i for i in range(len(ds)) if i != 1])  # leave-one-out
    assert len(others) == 3 and "seq/img0" not in others.names
    with pytest.raises(IndexError):
        ds.subset([7])
