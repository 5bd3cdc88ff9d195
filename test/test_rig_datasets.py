"""Multi-camera recordings: a real rosbag2 of a 3-camera rig rendered in the demo room
(written with rosbags, read back with the bag reader's image_topics mode), maps built
from it, and the posed-folder format with camera ids, per-camera intrinsics and the rig
pose."""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import pytest

from reloc_ros.datasets import open_dataset, write_folder_dataset
from reloc_ros.demo.record_bag import _latched_qos, _Msgs
from reloc_ros.demo.rig_scene import RigSceneConfig, demo_rig, render_rig_frames, rig_path
from reloc_ros.demo.scene import ProceduralRoom, RoomConfig, demo_camera
from reloc_ros.geometry import invert
from reloc_ros.maps import KeyframeMap, MapBuildConfig, build_map
from reloc_ros.rig import Rig, RigCamera, RigFrame
from reloc_ros.types import InvalidInputError, PosedFrame

W, H = 160, 120
CAPTURES = 5
START_NS = 1_700_000_000_000_000_000
PERIOD_NS = 250_000_000
SCENE = RigSceneConfig(cameras=RigSceneConfig().cameras[:3], width=W, height=H, focal=525.0 * W / 640.0)


def small_rig() -> Rig:
    """front, left, right of the demo rig; 'left' has its own (longer) focal length and
    principal point, so a reader mixing up camera_info topics is caught."""
    rig = demo_rig(SCENE)
    left = rig["left"]
    other = demo_camera(W, H, 1.3 * SCENE.focal)
    other.K[0, 2] += 3.0
    rig.cameras[1] = RigCamera(left.name, other, left.T_base_cam)
    rig.validate()
    return rig


@pytest.fixture(scope="module")
def scene():
    room = ProceduralRoom(RoomConfig())
    rig = small_rig()
    poses = rig_path(room, CAPTURES, SCENE, jitter=0.5, seed=5)
    frames = render_rig_frames(room, rig, poses, "cap", depth=False)
    return rig, poses, frames


def write_rig_bag(path: Path, rig: Rig, poses: np.ndarray, frames: List[RigFrame],
                  skip_mount: Optional[str] = None) -> None:
    """A bag as a robot with three cameras records it: per camera /cam_<name>/image_raw +
    camera_info in frame cam_<name>_optical, the mounts on /tf_static (base_link ->
    optical frame, one latched message per camera; ``skip_mount`` leaves one out), the
    body ground truth /ground_truth/odom (map -> base_link) and /tf map -> base_link."""
    from rosbags.rosbag2 import StoragePlugin, Writer

    m = _Msgs()
    by_cap: Dict[int, List[RigFrame]] = {}
    for k, f in enumerate(frames):
        by_cap.setdefault(k // len(rig.cameras), []).append(f)
    with Writer(path, version=9, storage_plugin=StoragePlugin.MCAP) as w:
        conns = {}

        def write(topic: str, msg, log_ns: int, qos=None) -> None:
            if topic not in conns:
                conns[topic] = w.add_connection(topic, msg.__msgtype__, typestore=m.ts,
                                                offered_qos_profiles=qos or ())
            w.write(conns[topic], int(log_ns), m.ts.serialize_cdr(msg, msg.__msgtype__))

        for rc in rig.cameras:
            if rc.name != skip_mount:
                write("/tf_static", m.tf(rc.T_base_cam, "base_link", f"cam_{rc.name}_optical", START_NS), START_NS,
                      _latched_qos())
        for i, T_wb in enumerate(poses):
            t = START_NS + PERIOD_NS * (i + 1)
            write("/tf", m.tf(T_wb, "map", "base_link", t), t)
            write("/ground_truth/odom", m.odometry(T_wb, "map", "base_link", t), t)
            for f in by_cap[i]:
                ns = f"/cam_{f.camera_id}"
                write(f"{ns}/camera_info", m.camera_info(f.camera, t, f"cam_{f.camera_id}_optical"), t + 1_000_000)
                write(f"{ns}/image_raw", m.image(f.image, "rgb8", t, f"cam_{f.camera_id}_optical"), t + 2_000_000)


TOPICS = "/cam_front/image_raw,/cam_left/image_raw,/cam_right/image_raw"


@pytest.fixture(scope="module")
def rig_bag(scene, tmp_path_factory):
    rig, poses, frames = scene
    path = tmp_path_factory.mktemp("rigbag") / "rig"
    write_rig_bag(path, rig, poses, frames)
    return path


def check_against_truth(ds, rig: Rig, poses: np.ndarray) -> None:
    assert len(ds) == CAPTURES * 3 and ds.skipped == []
    for k in range(len(ds)):
        r = ds.record(k)
        i = int(r.name.split("/")[1])
        rc = rig[r.camera_id]
        assert r.name == f"{rc.name}/{i:06d}"
        assert np.abs(r.T_world_base - poses[i]).max() < 1e-9
        assert np.abs(r.T_world_cam - poses[i] @ rc.T_base_cam).max() < 1e-9
        assert np.array_equal(r.camera.K, rc.camera.K) and (r.camera.width, r.camera.height) == (W, H)
        assert abs(r.stamp - (START_NS + PERIOD_NS * (i + 1)) * 1e-9) < 1e-6


def test_rig_bag_poses_ids_intrinsics_images(scene, rig_bag):
    rig, poses, frames = scene
    ds = open_dataset("bag", rig_bag, image_topics=TOPICS, pose_topic="/ground_truth/odom", kf_select=False)
    # the demo rig's names come back through camera_ids= (default: the topic namespace)
    assert sorted(set(ds.camera_ids)) == ["cam_front", "cam_left", "cam_right"]
    named = open_dataset("bag", rig_bag, image_topics=TOPICS, camera_ids="front,left,right",
                         pose_topic="/ground_truth/odom", kf_select=False)
    assert named.camera_ids[:3] == ["front", "left", "right"]  # captures in stamp order, cameras in topic order
    renamed = Rig([RigCamera(f"cam_{c.name}", c.camera, c.T_base_cam) for c in rig.cameras])
    check_against_truth(ds, renamed, poses)
    # the same from TF (map -> base_link) instead of the pose topic
    tf = open_dataset("bag", rig_bag, image_topics=TOPICS, tf_parent="map", kf_select=False)
    assert tf.names == ds.names and np.abs(tf.poses - ds.poses).max() < 1e-12
    f = named[named.index("left/000003")]
    assert isinstance(f, RigFrame) and f.camera_id == "left"
    truth = next(g for g in frames if g.name == "cap0003_left")
    assert np.array_equal(f.image, truth.image)
    assert np.abs(f.T_world_base - poses[3]).max() < 1e-9
    # frames slices every camera's image list
    part = open_dataset("bag", rig_bag, image_topics=TOPICS, pose_topic="/ground_truth/odom", kf_select=False,
                        frames="1:3")
    assert sorted(part.names) == sorted(f"cam_{c}/{i:06d}" for c in ("front", "left", "right") for i in (1, 2))
    ds.close(), named.close(), tf.close(), part.close()


def test_rig_bag_keyframes_select_whole_captures(scene, rig_bag):
    rig, poses, _ = scene
    ds = open_dataset("bag", rig_bag, image_topics=TOPICS, pose_topic="/ground_truth/odom", kf_min_dist=100.0,
                      kf_min_angle_deg=100.0)
    # selection runs on the body pose, so every camera keeps the same captures (here the
    # ones that turned >= 100 deg since the last kept one: some, not all)
    kept = {c: sorted(n.split("/")[1] for n in ds.names if n.startswith(c + "/"))
            for c in ("cam_front", "cam_left", "cam_right")}
    assert kept["cam_front"] == kept["cam_left"] == kept["cam_right"]
    assert 0 < len(kept["cam_front"]) < CAPTURES and kept["cam_front"][0] == "000000"
    ds.close()


def test_rig_bag_builds_a_rig_map(scene, rig_bag, tmp_path):
    rig, poses, _ = scene
    ds = open_dataset("bag", rig_bag, image_topics=TOPICS, camera_ids="front,left,right",
                      pose_topic="/ground_truth/odom", kf_select=False)
    out = build_map(ds, tmp_path / "map", MapBuildConfig(), source="rig bag")
    ds.close()
    kmap = KeyframeMap.load(out)
    assert kmap.camera_ids is not None and len(kmap.camera_ids) == len(ds)
    for k, name in enumerate(kmap.names):
        cam, i = name.split("/")
        assert kmap.camera_ids[k] == cam
        assert np.abs(kmap.T_world_base[k] - poses[int(i)]).max() < 1e-9
        assert np.abs(invert(kmap.T_world_base[k]) @ kmap.T_world_cam[k] - rig[cam].T_base_cam).max() < 1e-9


def test_rig_bag_missing_mount_is_a_clear_error(scene, tmp_path):
    rig, poses, frames = scene
    write_rig_bag(tmp_path / "nomount", rig, poses, frames, skip_mount="left")
    with pytest.raises(InvalidInputError, match=r"camera 'cam_left'.*no extrinsic.*'base_link' -> "
                                                r"'cam_left_optical'"):
        open_dataset("bag", tmp_path / "nomount", image_topics=TOPICS, pose_topic="/ground_truth/odom")
    # the other two cameras still read
    ds = open_dataset("bag", tmp_path / "nomount", image_topics="/cam_front/image_raw,/cam_right/image_raw",
                      pose_topic="/ground_truth/odom", kf_select=False)
    assert len(ds) == 2 * CAPTURES
    ds.close()


def test_rig_bag_option_errors(rig_bag):
    with pytest.raises(InvalidInputError, match="one entry per image topic"):
        open_dataset("bag", rig_bag, image_topics=TOPICS, camera_ids="a,b")
    with pytest.raises(InvalidInputError, match="cannot be combined with image_topics"):
        open_dataset("bag", rig_bag, image_topics=TOPICS, image_topic="/cam_front/image_raw")
    with pytest.raises(InvalidInputError, match="repeat"):
        open_dataset("bag", rig_bag, image_topics=TOPICS, camera_ids="a,a,b", pose_topic="/ground_truth/odom")
    with pytest.raises(InvalidInputError, match="no topic '/cam_back/image_raw'"):
        open_dataset("bag", rig_bag, image_topics="/cam_back/image_raw", pose_topic="/ground_truth/odom")
    with pytest.raises(InvalidInputError, match="need image_topics"):
        open_dataset("bag", rig_bag, camera_ids="front")
    with pytest.raises(InvalidInputError, match="pose of 'base_link' but TF has no path from it to base_frame "
                                                "'chassis'"):
        open_dataset("bag", rig_bag, image_topics=TOPICS, pose_topic="/ground_truth/odom", base_frame="chassis")
    with pytest.raises(InvalidInputError, match="base_frame 'chassis' is not connected to tf_parent 'map'"):
        open_dataset("bag", rig_bag, image_topics=TOPICS, tf_parent="map", base_frame="chassis")


# --------------------------------------------------------------------------- posed folder


def test_folder_round_trip_with_camera_ids(scene, tmp_path):
    rig, poses, frames = scene
    plain = PosedFrame(name="single", image=frames[0].image, T_world_cam=frames[0].T_world_cam,
                       camera=frames[0].camera)
    out = write_folder_dataset(frames + [plain], tmp_path / "rigfolder")
    assert (out / "camera_ids.txt").is_file() and (out / "rig.yaml").is_file()
    ds = open_dataset("folder", out)
    assert len(ds) == len(frames) + 1 and ds.skipped == []
    by_name = {f.name: f for f in frames}
    for k, name in enumerate(ds.names):
        r = ds.record(k)
        if name == "single":
            assert r.camera_id is None and r.T_world_base is None and not isinstance(ds[k], RigFrame)
            continue
        f = by_name[name]
        assert r.camera_id == f.camera_id
        assert np.array_equal(r.T_world_cam, f.T_world_cam) and np.array_equal(r.T_world_base, f.T_world_base)
        assert np.array_equal(r.camera.K, f.camera.K)
    g = ds[ds.index("cap0002_left")]
    assert isinstance(g, RigFrame) and g.camera_id == "left" and np.array_equal(g.image, by_name[g.name].image)
    # per-camera intrinsics and mounts live in rig.yaml
    import yaml

    spec = yaml.safe_load((out / "rig.yaml").read_text())
    assert sorted(spec["cameras"]) == ["front", "left", "right"]
    for rc in rig.cameras:
        T = np.asarray(spec["cameras"][rc.name]["T_base_cam"], dtype=np.float64).reshape(4, 4)
        assert np.abs(T - rc.T_base_cam).max() < 1e-12
        assert spec["cameras"][rc.name]["intrinsics"]["fx"] == rc.camera.K[0, 0]
    # the non-rig frame's camera is the '*' default there; rig cameras' own intrinsics win over it
    lines = [ln for ln in (out / "intrinsics.txt").read_text().splitlines() if not ln.startswith("#")]
    assert len(lines) == 1 and lines[0].startswith("* ")


def test_folder_rig_pose_and_extrinsics_give_camera_poses(scene, tmp_path):
    """A hand-written rig folder: no poses.txt, only the body poses and each camera's mount."""
    rig, poses, frames = scene
    out = write_folder_dataset(frames, tmp_path / "f")
    (out / "poses.txt").unlink()
    ds = open_dataset("folder", out)
    assert len(ds) == len(frames)
    for k, name in enumerate(ds.names):
        f = next(g for g in frames if g.name == name)
        assert np.abs(ds.poses[k] - f.T_world_cam).max() < 1e-12
    # an inconsistent poses.txt is refused, naming the frame
    out2 = write_folder_dataset(frames, tmp_path / "g")
    lines = (out2 / "poses.txt").read_text().splitlines()
    bad = [ln for ln in lines if ln.startswith("cap0001_front ")][0]
    vals = bad.split()
    vals[4] = repr(float(vals[4]) + 0.01)  # x translation off by 1 cm
    (out2 / "poses.txt").write_text("\n".join(" ".join(vals) if ln == bad else ln for ln in lines) + "\n")
    with pytest.raises(InvalidInputError, match="cap0001_front.*T_world_base @ T_base_cam"):
        open_dataset("folder", out2)


def test_old_folders_read_as_before(scene, tmp_path):
    _, _, frames = scene
    plain = [PosedFrame(name=f.name, image=f.image, T_world_cam=f.T_world_cam, camera=f.camera) for f in frames[:4]]
    out = write_folder_dataset(plain, tmp_path / "old")
    assert not (out / "camera_ids.txt").exists() and not (out / "rig.yaml").exists()
    assert "version: 1" in (out / "dataset.yaml").read_text()
    ds = open_dataset("folder", out)
    assert ds.camera_ids == [None] * 4 and np.isnan(ds.base_poses).all()
    assert type(ds[0]) is PosedFrame
