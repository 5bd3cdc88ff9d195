"""Map refinement (reloc_ros.refine) against exact ground truth: a rendered room with perturbed poses."""
import dataclasses

import numpy as np
import pytest

from reloc_ros.demo.scene import ProceduralRoom, RoomConfig, demo_camera, look_pose, render_frames
from reloc_ros.geometry import rotation_angle_deg, so3_exp, umeyama
from reloc_ros.refine import RefineConfig, refine, refine_frames
from reloc_ros.types import InvalidInputError

# Two BA runs per round keep the file fast; the default (3) converges the same here.
CFG = RefineConfig(variance_iterations=2)


@pytest.fixture(scope="module")
def scene():
    """10 frames of 320x240 along a wall (overlapping views: tracks over many frames)."""
    room = ProceduralRoom(RoomConfig())
    cam = demo_camera(320, 240, 262.5)
    poses = np.stack([look_pose([1.6 + 0.25 * i, 1.2 + 0.1 * np.sin(i), 1.2 + 0.1 * np.cos(i)],
                                np.pi / 2 + np.radians(12 * np.sin(0.9 * i)), np.radians(10)) for i in range(10)])
    return render_frames(room, poses, cam, "f")


def _perturb(frames, rot_deg, pos_m, seed):
    rng = np.random.default_rng(seed)
    out = []
    for f in frames:
        T = f.T_world_cam.copy()
        T[:3, :3] = so3_exp(np.radians(rot_deg) * rng.normal(size=3)) @ T[:3, :3]
        T[:3, 3] += pos_m * rng.normal(size=3)
        out.append(dataclasses.replace(f, T_world_cam=T))
    return out


def _errors(T_est, frames, align):
    """Per frame (centre error m, rotation error deg) against the exact poses, optionally after a similarity."""
    G = np.stack([f.T_world_cam for f in frames])
    T_est = np.asarray(T_est)
    s, R, t = umeyama(T_est[:, :3, 3], G[:, :3, 3]) if align else (1.0, np.eye(3), np.zeros(3))
    e_t = np.linalg.norm((s * T_est[:, :3, 3] @ R.T + t) - G[:, :3, 3], axis=1)
    e_r = np.array([rotation_angle_deg(R @ a[:3, :3], b[:3, :3]) for a, b in zip(T_est, G)])
    return e_t, e_r


@pytest.fixture(scope="module")
def perturbed(scene):
    noisy = _perturb(scene, 0.5, 0.02, seed=1)
    return noisy, refine(noisy, CFG)


def test_ba_brings_perturbed_poses_back_to_the_exact_ones(scene, perturbed):
    noisy, res = perturbed
    rep = res.report
    before_t, before_r = _errors([f.T_world_cam for f in noisy], scene, align=True)
    after_t, after_r = _errors(res.T_world_cam, scene, align=True)
    # Up to the similarity the priors fix (their mean), the images decide: measured 2.2 cm / 1.2 deg ->
    # 0.09 cm / 0.28 deg median; what remains of rotation is the common offset of the noisy priors.
    assert np.median(after_t) < 0.1 * np.median(before_t)
    assert np.median(after_r) < 0.5 * np.median(before_r)
    # without alignment too: the refined poses are closer to the truth than the input
    raw_t, _ = _errors(res.T_world_cam, scene, align=False)
    assert np.median(raw_t) < 0.5 * np.median(_errors([f.T_world_cam for f in noisy], scene, align=False)[0])
    # multi-view tracks from union-find, and the reprojection error falls to the keypoint noise
    assert rep.num_frames_connected == len(scene) and rep.tracks_over_two_views > 0.3
    assert rep.track_length_max > 3
    assert rep.reproj_px_before > 1.0 and rep.reproj_px_after < 0.3
    # the report of pose movement matches the poses
    moved = [100 * np.linalg.norm(a.T_world_cam[:3, 3] - b[:3, 3]) for a, b in zip(noisy, res.T_world_cam)]
    np.testing.assert_allclose(rep.moved_cm, moved, rtol=1e-9)
    assert 0.5 < np.median(rep.moved_cm) < 5 and 0.1 < np.median(rep.moved_deg) < 2
    # variance components recover the noise put in (0.5 deg and 2 cm per axis) within a factor 2
    vc = rep.variance_components[-1]
    assert 0.25 < vc["rotation_deg"] < 1.0 and 0.01 < vc["position_m"] < 0.04


def test_priors_hold_gauge_and_metric_scale(perturbed):
    noisy, res = perturbed
    C0 = np.stack([f.T_world_cam[:3, 3] for f in noisy])
    C = res.T_world_cam[:, :3, 3]
    s, _, _ = umeyama(C, C0)  # refined onto input: what the position priors minimise
    assert abs(s - 1) < 1e-3 and abs(res.report.scale_change - 1 / s) < 1e-9
    assert np.linalg.norm(C.mean(0) - C0.mean(0)) < 1e-3  # gauge: the centres' mean stays


def test_exact_poses_stay_and_points_match_the_true_depth(scene):
    res = refine(scene, CFG)
    assert max(res.report.moved_cm) < 0.2 and max(res.report.moved_deg) < 0.05
    assert res.report.variance_components[-1]["rotation_deg"] < 0.05  # images agree with the poses
    errs = []
    for f, P in zip(scene, res.points_per_frame()):
        ok = np.isfinite(P[:, 0])
        kp = res.keypoints[scene.index(f)][ok]
        z_true = f.depth[np.round(kp[:, 1]).astype(int), np.round(kp[:, 0]).astype(int)]
        T = f.T_world_cam
        errs.append(np.abs(((P[ok] - T[:3, 3]) @ T[:3, :3])[:, 2] - z_true) / z_true)
    errs = np.concatenate(errs)
    assert len(errs) > 1000 and np.median(errs) < 0.01


def test_refine_frames_returns_copies_with_refined_poses(scene):
    noisy = _perturb(scene[:4], 0.3, 0.01, seed=2)
    out, rep = refine_frames(noisy, CFG, feature_cache={})
    assert [f.name for f in out] == [f.name for f in noisy]
    assert all(o.image is n.image for o, n in zip(out, noisy))
    assert rep.num_frames == 4 and len(rep.moved_deg) == 4
    assert not np.allclose(out[0].T_world_cam, noisy[0].T_world_cam)
    assert "poses moved median" in rep.summary()


def test_bad_input_errors(scene):
    with pytest.raises(InvalidInputError, match="at least two"):
        refine(scene[:1], CFG)
    bad = dataclasses.replace(scene[1], T_world_cam=np.full((4, 4), np.nan))
    with pytest.raises(InvalidInputError):
        refine([scene[0], bad], CFG)
    with pytest.raises(InvalidInputError, match="unique"):
        refine([scene[0], scene[0]], CFG)
    with pytest.raises(ValueError, match="loss"):
        refine(scene[:2], RefineConfig(loss="l3"))
    with pytest.raises(ValueError, match="prior_position_std_m"):
        refine(scene[:2], RefineConfig(prior_position_std_m=0.0))


def test_build_map_with_refine_stores_the_refined_poses(scene, perturbed, tmp_path, caplog):
    """``MapBuildConfig.refine``: the map holds the bundle-adjusted poses (as ``refine`` gives
    them for the same frames and options), the manifest the report, and an unusable frame is
    still skipped and listed by the build, not by the refinement. These frames have depth,
    so the build warns that their poses may come from it."""
    import json
    import logging

    from reloc_ros.maps import KeyframeMap, MapBuildConfig, build_map

    noisy, res = perturbed
    bad = dataclasses.replace(noisy[0], name="bad", T_world_cam=np.full((4, 4), np.nan))
    cfg = MapBuildConfig(refine=True, refinement=CFG, workers=1)
    with caplog.at_level(logging.WARNING, logger="reloc_ros.maps"):
        out = build_map(noisy + [bad], tmp_path / "map", cfg)
    assert "map refinement of frames with depth" in caplog.text
    kmap = KeyframeMap.load(out)
    assert kmap.num_keyframes == len(noisy)
    np.testing.assert_allclose(kmap.T_world_cam, res.T_world_cam, atol=1e-9)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["refinement"]["num_frames_connected"] == len(noisy)
    assert [s[0] for s in manifest["skipped_frames"]] == ["bad"]
