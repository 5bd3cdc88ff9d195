"""Multi-camera rig localization against exact ground truth: a 4-camera rig (front, left,
right, back; no overlap) driving through the rendered demo room (reloc_ros.demo.rig_scene).

Images are 320x240 to keep the module under a minute on a 2-core CPU.
"""
import numpy as np
import pytest

from reloc_ros.demo.rig_scene import (RigSceneConfig, demo_rig, render_capture, render_rig_frames, rig_path,
                                      textureless)
from reloc_ros.demo.scene import ProceduralRoom, RoomConfig
from reloc_ros.evaluation import make_record
from reloc_ros.features import FeatureConfig
from reloc_ros.geometry import pose_errors, so3_exp
from reloc_ros.localizer import LocalizerConfig, PosePrior
from reloc_ros.maps import KeyframeMap, MapBuildConfig, build_map
from reloc_ros.rig import (CameraView, Rig, RigCamera, RigConfig, RigLocalizer, body_to_camera_covariance,
                           camera_to_body_covariance, fuse_body_poses)
from reloc_ros.types import Camera, InvalidInputError, Status

SCENE = RigSceneConfig(width=320, height=240, focal=262.5)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    room = ProceduralRoom(RoomConfig())
    rig = demo_rig(SCENE)
    frames = render_rig_frames(room, rig, rig_path(room, 10, SCENE), "map")
    kmap = KeyframeMap.load(build_map(frames, tmp_path_factory.mktemp("rig") / "map", MapBuildConfig()))
    poses = rig_path(room, 6, SCENE, phase=0.2, jitter=0.5, seed=3)
    captures = [render_capture(room, rig, T) for T in poses]
    return room, rig, kmap, poses, captures


@pytest.fixture(scope="module")
def loc(world):
    return RigLocalizer(world[2])


def test_rig_map_keeps_camera_and_body_pose(world):
    _, rig, kmap, _, _ = world
    assert kmap.camera_ids is not None and kmap.T_world_base is not None
    assert sorted(set(kmap.camera_ids)) == sorted(rig.names)
    assert kmap.manifest["rig_cameras"] == sorted(rig.names)
    for i, cid in enumerate(kmap.camera_ids):
        np.testing.assert_allclose(kmap.T_world_base[i] @ rig[cid].T_base_cam, kmap.T_world_cam[i], atol=1e-6)


def test_rig_localizes_the_body_to_millimetres(world, loc):
    _, _, _, poses, captures = world
    res = [loc.localize(c) for c in captures[:4]]
    assert all(r.status == Status.OK and r.method == "generalized_pnp" for r in res), [r.message for r in res]
    assert all(r.used_cameras == ["front", "left", "right", "back"] for r in res)
    recs = [make_record(f"c{i}", T, r.as_localization_result()) for i, (T, r) in enumerate(zip(poses, res))]
    assert np.median([r.translation_error_m for r in recs]) < 0.005
    assert np.median([r.rotation_error_deg for r in recs]) < 0.05
    # the covariance is neither absurdly over- nor under-confident (NEES ~3 when calibrated)
    assert 0.05 < np.median([r.nees_position for r in recs]) < 15


def test_a_textureless_camera_is_reported_and_the_rest_localize(world, loc):
    _, _, _, poses, captures = world
    for i in range(2):
        cap = [CameraView(v.name, textureless(v.image) if j == i else v.image, v.camera, v.T_base_cam)
               for j, v in enumerate(captures[i])]
        r = loc.localize(cap)
        assert r.status == Status.OK, r.message
        assert r.cameras[i].state == "no_features" and "local features" in r.cameras[i].reason
        t, a = pose_errors(r.T_world_base, poses[i])
        assert t < 0.005 and a < 0.05


def test_no_single_camera_localizes_but_the_rig_does(world):
    """Each camera keeps only its 12 strongest keypoints: a handful of 2D-3D inliers each,
    below what one camera needs (pnp_min_inliers 20, and too few 2D-2D matches for the
    essential fallback), while the rig's generalized PnP has them all. 12 keypoints are
    too few for global retrieval, so both use a tracking prior of the body (10 cm / 3 deg
    off, 20 cm / 5 deg std) to pick keyframes, as the node does while tracking."""
    _, _, kmap, poses, captures = world
    weak = RigLocalizer(kmap, LocalizerConfig(top_k=2, features=FeatureConfig(max_keypoints=12)))
    rng = np.random.default_rng(5)
    nobody, errors = 0, []
    for T, cap in zip(poses, captures):
        T_prior = T.copy()
        T_prior[:3, :3] = so3_exp(np.radians(3.0) * _unit(rng)) @ T[:3, :3]
        T_prior[:3, 3] += 0.1 * _unit(rng)
        prior = PosePrior(T_prior, np.diag([0.2] * 3 + [np.radians(5)] * 3) ** 2)
        singles = [weak.localize_camera(v, prior) for v in cap]
        rig_res = weak.localize(cap, prior)
        assert rig_res.localized, rig_res.message
        errors.append(pose_errors(rig_res.T_world_base, T))
        if not any(s.localized for s in singles):
            nobody += 1
            assert all(s.status == Status.NOT_LOCALIZED for s in singles)
    assert nobody >= len(captures) - 1  # measured: all 6
    assert max(t for t, _ in errors) < 0.01 and max(a for _, a in errors) < 0.2  # measured 1.3 mm, 0.05 deg


def _unit(rng):
    v = rng.normal(size=3)
    return v / np.linalg.norm(v)


def test_invalid_cameras_are_excluded_with_a_reason(world, loc):
    _, rig, _, poses, captures = world
    cap = captures[1]
    bad_K = cap[0].camera.K.copy()
    bad_K[0, 2] = 5000.0  # principal point far outside: K of another resolution
    views = [
        CameraView("front", cap[0].image, Camera(bad_K, SCENE.width, SCENE.height), cap[0].T_base_cam),
        CameraView("left", cap[1].image, cap[1].camera, None),  # TF extrinsic missing
        CameraView("right", cap[2].image[:100], cap[2].camera, cap[2].T_base_cam),  # wrong size
        CameraView("back", cap[3].image, cap[3].camera, cap[3].T_base_cam),
        CameraView("back", cap[3].image, cap[3].camera, cap[3].T_base_cam),  # twice
    ]
    r = loc.localize(views)
    assert r.status == Status.OK, r.message
    assert [c.state for c in r.cameras] == ["excluded", "excluded", "excluded", "used", "excluded"]
    reasons = [c.reason for c in r.cameras]
    assert "principal point" in reasons[0] and "extrinsic" in reasons[1] and "image is" in reasons[2]
    assert "twice" in reasons[4]
    t, a = pose_errors(r.T_world_base, poses[1])
    assert t < 0.01 and a < 0.1
    # nothing usable: an ERROR result naming every camera, not an exception
    r = loc.localize(views[:3])
    assert r.status == Status.ERROR and "front" in r.message and "left" in r.message
    assert loc.localize([]).status == Status.ERROR


def test_one_camera_rig_agrees_with_the_single_camera_path(world, loc):
    _, _, _, poses, captures = world
    for T, cap in zip(poses[:2], captures[:2]):
        rig_res = loc.localize(cap[:1])
        single = loc.localize_camera(cap[0])
        assert rig_res.status == single.status == Status.OK
        t, a = pose_errors(rig_res.T_world_base, single.T_world_base)
        assert t < 0.002 and a < 0.03
        ratio = np.diag(rig_res.covariance) / np.diag(single.covariance)
        assert np.all((ratio > 0.3) & (ratio < 3.0)), ratio


def test_essential_fallback_across_cameras(world):
    _, _, kmap, poses, captures = world
    ess = RigLocalizer(kmap, LocalizerConfig(estimator_options={"mode": "essential"}))
    for T, cap in zip(poses[:2], captures[:2]):
        r = ess.localize(cap)
        assert r.localized and r.method == "essential", r.message
        assert len({c.name for c in r.cameras if c.state == "used"}) >= 3
        t, a = pose_errors(r.T_world_base, T)
        assert t < 0.05 and a < 0.5


def test_prior_on_the_body_guides_retrieval(world, loc):
    _, _, _, poses, captures = world
    prior = PosePrior(poses[2], np.diag([0.05] * 3 + [np.radians(3)] * 3) ** 2)
    r = loc.localize(captures[2], prior)
    assert r.status == Status.OK
    t, a = pose_errors(r.T_world_base, poses[2])
    assert t < 0.005 and a < 0.05


def test_rig_model_validation():
    cam = Camera(np.array([[300.0, 0, 160], [0, 300, 120], [0, 0, 1]]), 320, 240)
    Rig([RigCamera("a", cam, np.eye(4))]).validate()
    with pytest.raises(InvalidInputError, match="unique"):
        Rig([RigCamera("a", cam, np.eye(4)), RigCamera("a", cam, np.eye(4))]).validate()
    with pytest.raises(InvalidInputError, match="'b'.*rigid"):
        Rig([RigCamera("b", cam, np.diag([2.0, 1, 1, 1]))]).validate()
    with pytest.raises(InvalidInputError, match="at least one"):
        Rig([]).validate()


def test_covariance_moves_between_body_and_camera():
    rng = np.random.default_rng(1)
    T_wb = np.eye(4)
    T_wb[:3, :3] = so3_exp(rng.normal(size=3))
    T_bc = np.eye(4)
    T_bc[:3, :3] = so3_exp(rng.normal(size=3))
    T_bc[:3, 3] = [0.3, -0.2, 0.5]
    A = rng.normal(size=(6, 6))
    C = A @ A.T * 1e-4
    np.testing.assert_allclose(camera_to_body_covariance(body_to_camera_covariance(C, T_wb, T_bc), T_wb, T_bc), C,
                               atol=1e-12)
    # first-order check: a small body perturbation moves the camera as the map says
    d = np.r_[1e-6 * rng.normal(size=3), 1e-6 * rng.normal(size=3)]
    T_wb2 = np.eye(4)
    T_wb2[:3, :3] = so3_exp(d[3:]) @ T_wb[:3, :3]
    T_wb2[:3, 3] = T_wb[:3, 3] + d[:3]
    dc = (T_wb2 @ T_bc)[:3, 3] - (T_wb @ T_bc)[:3, 3]
    a = T_wb[:3, :3] @ T_bc[:3, 3]
    np.testing.assert_allclose(dc, d[:3] + np.cross(d[3:], a), atol=1e-11)


def test_fuse_body_poses_gates_a_wrong_camera():
    rng = np.random.default_rng(2)
    truth = np.eye(4)
    truth[:3, 3] = [1.0, 2.0, 0.5]
    cov = np.diag([1e-4] * 3 + [1e-5] * 3)
    Ts = []
    for _ in range(3):
        T = truth.copy()
        T[:3, :3] = so3_exp(rng.normal(scale=3e-3, size=3))
        T[:3, 3] += rng.normal(scale=1e-2, size=3)
        Ts.append(T)
    wrong = truth.copy()
    wrong[:3, 3] += [0.5, 0, 0]
    T, C, keep = fuse_body_poses(Ts + [wrong], [cov] * 4)
    assert keep.tolist() == [True, True, True, False]
    t, _ = pose_errors(T, truth)
    assert t < 0.03
    np.testing.assert_allclose(C, cov / 3, rtol=1e-6)


def test_per_camera_fusion_gates_a_camera_with_a_wrong_extrinsic(world):
    """The learned estimators' path (each camera alone, body poses fused), run here with
    the geometric estimator: a camera whose extrinsic is 10 deg off is gated out, and the
    generalized solver keeps few of its matches and warns about it."""
    _, _, kmap, poses, captures = world
    per_cam = RigLocalizer(kmap, rig_config=RigConfig(method="per_camera"))
    cap = captures[3]
    r = per_cam.localize(cap)
    assert r.status == Status.OK and r.method == "per_camera_fusion" and len(r.used_cameras) == 4
    t, a = pose_errors(r.T_world_base, poses[3])
    assert t < 0.005 and a < 0.05
    T_bad = cap[2].T_base_cam.copy()
    T_bad[:3, :3] = so3_exp(np.radians([0.0, 10.0, 0.0])) @ T_bad[:3, :3]
    bad = [*cap[:2], CameraView("right", cap[2].image, cap[2].camera, T_bad), cap[3]]
    r = per_cam.localize(bad)
    assert r.status == Status.OK and r.used_cameras == ["front", "left", "back"]
    assert "gate" in r.cameras[2].reason
    t, a = pose_errors(r.T_world_base, poses[3])
    assert t < 0.005 and a < 0.05
    gen = RigLocalizer(kmap).localize(bad)
    assert gen.status == Status.OK
    # its matches are mostly outliers of the rig pose (measured 77 of 1599), and it says so
    assert gen.cameras[2].inliers < 0.1 * gen.cameras[2].matches
    assert "extrinsic" in gen.cameras[2].warning and not any(c.warning for c in gen.cameras[:2] + gen.cameras[3:])
    t, a = pose_errors(gen.T_world_base, poses[3])
    assert t < 0.005 and a < 0.05


def test_reloc_eval_rig_demo(world, tmp_path, capsys):
    from reloc_ros.cli.eval_cli import main

    out = tmp_path / "rig.json"
    assert main(["--rig-demo", "2", "--map", str(world[2].path), "--rig-size", f"{SCENE.width}x{SCENE.height}",
                 "--rig-textureless", "rotate", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "front:no_features" in text and "left:no_features" in text  # capture 0 and 1
    import json

    data = json.loads(out.read_text())
    assert data["summary"]["n_queries"] == 2 and data["summary"]["n_localized"] == 2
    assert data["meta"]["rig_demo"]["camera_reports"][0][0]["state"] == "no_features"
    assert main(["--rig-demo", "1", "--map", str(world[2].path), "--rig-cameras", "nose", "--json", str(out)]) == 2
    assert "unknown rig camera" in capsys.readouterr().err
    assert main(["--json", str(out)]) == 2
    assert "--format are required" in capsys.readouterr().err


def test_patch_inliers_are_degenerate_unless_cameras_look_apart(world, loc):
    """The generalised patch rule (RigConfig.min_spread_*): small inlier patches in one
    camera, or in cameras looking the same way, are DEGENERATE; in two cameras 90 deg
    apart they are not."""
    from reloc_ros.rig import CameraReport, _CamData

    _, rig, _, poses, _ = world
    img = np.zeros((SCENE.height, SCENE.width), np.uint8)

    def cam(name, T=None):
        return _CamData(0, name, rig[name].camera, rig[name].T_base_cam if T is None else T, img)

    def rep(name, extent, inliers):
        return CameraReport(name, "used", inliers=inliers, extent=extent)

    front, left = cam("front"), cam("left")
    near_front = cam("front", rig["front"].T_base_cam @ np.diag([1.0, 1, 1, 1]))
    near_front.T_base_cam[:3, :3] = so3_exp(np.radians([0.0, 10.0, 0.0])) @ near_front.T_base_cam[:3, :3]
    assert loc._spread_reason([(front, rep("front", 0.01, 300))], poses[0])
    assert loc._spread_reason([(front, rep("front", 0.01, 300)), (left, rep("left", 0.01, 3))], poses[0])
    assert loc._spread_reason([(front, rep("front", 0.01, 300)), (near_front, rep("front", 0.01, 50))], poses[0])
    assert loc._spread_reason([(front, rep("front", 0.01, 300)), (left, rep("left", 0.01, 8))], poses[0]) == ""
    assert loc._spread_reason([(front, rep("front", 0.2, 300))], poses[0]) == ""


def test_rig_shares_a_single_camera_localizer_and_extrinsic_uncertainty_widens(world):
    from reloc_ros.localizer import Localizer

    _, _, kmap, poses, captures = world
    single = Localizer(kmap)
    shared = RigLocalizer(kmap, localizer=single)
    assert shared.localizer is single
    with pytest.raises(ValueError, match="same map"):
        RigLocalizer(kmap, LocalizerConfig(top_k=3), localizer=single)
    a = shared.localize(captures[0])
    b = RigLocalizer(kmap, rig_config=RigConfig(extrinsic_rotation_std_deg=0.1, extrinsic_translation_std_m=0.002),
                     localizer=single).localize(captures[0])
    np.testing.assert_allclose(a.T_world_base, b.T_world_base, atol=1e-9)  # same solution, wider covariance
    assert np.all(np.diag(b.covariance) > 1.5 * np.diag(a.covariance))


# ------------------------------------------------------------- capture synchronizer (reloc_ros.sync)

MS = 1_000_000  # ns


def _sync(timeout=0.1, window=0.01, **kw):
    from reloc_ros.sync import CaptureSynchronizer

    return CaptureSynchronizer(["front", "left", "right"], window, timeout, **kw)


def test_sync_groups_frames_within_the_window_and_releases_complete_captures():
    s = _sync()
    assert s.add("left", 1000 * MS + 3 * MS, "l0", now=0.0) == []
    assert s.add("front", 1000 * MS, "f0", now=0.001) == []
    out = s.add("right", 1000 * MS - 4 * MS, "r0", now=0.002)
    assert len(out) == 1 and out[0].complete and out[0].reason == "complete"
    cap = out[0]
    assert cap.stamp_ns == 1000 * MS  # the first listed camera's stamp
    assert {n: v[1] for n, v in cap.frames.items()} == {"front": "f0", "left": "l0", "right": "r0"}
    assert cap.first_arrival == 0.0
    # a frame 20 ms later (outside the 10 ms window) opens a new capture; nothing released
    assert s.add("front", 1033 * MS, "f1", now=0.01) == [] and s.open_captures == 1


def test_sync_missing_camera_does_not_block():
    s = _sync(timeout=0.1)
    s.add("front", 2000 * MS, "f", now=1.0)
    s.add("left", 2001 * MS, "l", now=1.01)
    assert s.poll(now=1.05) == []  # still waiting for right
    out = s.poll(now=1.1)
    assert len(out) == 1 and out[0].reason == "timeout" and out[0].missing == ["right"]
    assert sorted(out[0].frames) == ["front", "left"]


def test_sync_releases_when_the_missing_camera_has_moved_on_and_keeps_stamp_order():
    s = _sync(timeout=10.0)
    s.add("front", 100 * MS, "f0", now=0.0)
    s.add("left", 100 * MS, "l0", now=0.0)
    # right skipped stamp 100 ms (a dropped frame): its next frame proves nothing comes for it
    out = s.add("right", 200 * MS, "r1", now=0.05)
    assert [c.reason for c in out] == ["passed"] and out[0].missing == ["right"]
    s.add("front", 200 * MS, "f1", now=0.06)
    out = s.add("left", 200 * MS, "l1", now=0.07)
    assert [(c.stamp_ns, c.reason) for c in out] == [(200 * MS, "complete")]
    # a newer complete capture releases an older open one first (stamp order)
    s.add("front", 300 * MS, "f2", now=0.1)
    for n in ("front", "left", "right"):
        out = s.add(n, 400 * MS, n, now=0.2)
    assert [(c.stamp_ns, c.reason) for c in out] == [(300 * MS, "superseded"), (400 * MS, "complete")]
    assert s.released["complete"] == 2 and s.released["passed"] == 1 and s.released["superseded"] == 1


def test_sync_late_frames_are_dropped_resends_replace_and_time_going_back_restarts():
    s = _sync(timeout=0.05)
    for n in ("front", "left", "right"):
        s.add(n, 2500 * MS, n, now=0.0)
    assert s.add("left", 2495 * MS, "late", now=0.01) == [] and s.late == 1 and s.open_captures == 0
    s.add("front", 2600 * MS, "a", now=0.02)
    s.add("front", 2600 * MS, "b", now=0.021)  # same camera and stamp: a resend replaces
    assert s.open_captures == 1
    out = s.poll(now=0.1)
    assert out[0].frames["front"] == (2600 * MS, "b")
    # a bag loop: stamps jump back by seconds, grouping starts afresh instead of dropping all
    for n in ("front", "left", "right"):
        out = s.add(n, 10 * MS, n, now=0.2)
    assert len(out) == 1 and out[0].complete and out[0].stamp_ns == 10 * MS


def test_sync_bounds_open_captures_and_validates():
    from reloc_ros.sync import CaptureSynchronizer

    s = _sync(timeout=100.0, max_open=2)
    released = []
    for k in range(4):
        released += s.add("front", (k + 1) * 100 * MS, k, now=0.0)
    assert s.open_captures == 2 and [c.reason for c in released] == ["overflow", "overflow"]
    with pytest.raises(KeyError, match="unknown camera"):
        s.add("rear", 0, None, now=0.0)
    for bad in ((["a", "a"], 0.01, 0.1), ([], 0.01, 0.1), (["a"], 0.0, 0.1), (["a"], 0.01, -1.0)):
        with pytest.raises(ValueError):
            CaptureSynchronizer(*bad)
