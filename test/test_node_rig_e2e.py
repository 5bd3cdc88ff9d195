"""reloc_node with a multi-camera rig (parameter ``cameras``), end to end over real DDS.

The node runs as a separate process on a private localhost domain with four cameras
(front, left, right, back of reloc_ros.demo.rig_scene, 320x240, no overlap); the rig
replayer (reloc_ros.demo.rig_replay) publishes each capture as per-camera Image +
CameraInfo, odom->base_link on /tf with a drifting odometry, and the mounts of front, left
and right on /tf_static -- not back's; left publishes CompressedImage (PNG) with
``camera_transports`` set per camera. Checked against the renderer's exact body poses:

- every capture gives a fused ~/pose of base_link at the capture stamp, mm-level, and
  map->odom o (true) odom->base_link == ~/pose (the single-camera node's TF semantics);
- the camera without a mount is excluded with its reason on /diagnostics
  (``camera.back.*``), the overall status is WARN, the other three are used;
- a camera whose CameraInfo is invalid is excluded and the rest still localize;
- a capture in which two cameras send nothing is released after ``rig_timeout`` with the
  cameras present and still localizes.
"""
from __future__ import annotations


import numpy as np
import pytest

from ros_helpers import node_and_replayer, require_ros

require_ros()

from reloc_ros.geometry import invert, pose_errors  # noqa: E402

OK, WARN, ERROR = 0, 1, 2
TOL_S = 0.2
CAMERAS = ["front", "left", "right", "back"]


@pytest.fixture(scope="module")
def rig_world(tmp_path_factory):
    from reloc_ros.demo.rig_scene import RigSceneConfig, demo_rig, render_capture, render_rig_frames, rig_path
    from reloc_ros.demo.scene import ProceduralRoom, RoomConfig
    from reloc_ros.maps import MapBuildConfig, build_map

    scene = RigSceneConfig(width=320, height=240, focal=262.5)
    room = ProceduralRoom(RoomConfig())
    rig = demo_rig(scene)
    map_dir = build_map(render_rig_frames(room, rig, rig_path(room, 10, scene), "map"),
                        tmp_path_factory.mktemp("rig_e2e") / "map", MapBuildConfig())
    poses = rig_path(room, 6, scene, phase=0.2, jitter=0.5, seed=3)
    captures = [{v.name: v.image for v in render_capture(room, rig, T)} for T in poses]
    return map_dir, rig, poses, captures


def rig_node_and_replayer(params, workdir, rig, no_mount=(), compressed=()):
    """The node (no remaps: cameras subscribe under their namespaces) and a RigReplayer."""
    from reloc_ros.demo.rig_replay import RigReplayer

    return node_and_replayer(params, workdir, remaps=None, make_replayer=lambda domain_id: RigReplayer(
        rig, no_mount=no_mount, compressed=compressed, compression="png", domain_id=domain_id))


@pytest.fixture(scope="module")
def rig_run(rig_world, tmp_path_factory):
    """Six captures in lockstep: 0-3 full, 4 with left's CameraInfo invalid, 5 with only front and right."""
    from reloc_ros.ros.conversions import camera_to_camera_info

    map_dir, rig, poses, captures = rig_world
    params = {"map_path": str(map_dir), "cameras": CAMERAS, "camera_transports": ["raw", "compressed", "raw", "raw"],
              "image_qos": "reliable", "max_rate": 0.0,
              "diagnostics_period": 0.5, "transform_tolerance": TOL_S, "tf_timeout": 1.0,
              "camera_info_timeout": 0.5, "rig_timeout": 0.3, "use_prior": False,
              "tracker_options": "{init_single_confidence: 0.0, window: 1}"}
    bad_info = camera_to_camera_info(rig["left"].camera, 0, "left_optical")
    bad_info.k = [0.0] * 9  # uncalibrated
    rows = []
    with rig_node_and_replayer(params, tmp_path_factory.mktemp("rig_run"), rig, no_mount=["back"],
                               compressed=["left"]) as (node, rp):
        ready = rp.wait_ready_rig(120.0)
        for i, (T, imgs) in enumerate(zip(poses, captures)):
            kw = {}
            if i == 4:
                kw["info_msgs"] = {"left": bad_info}
            if i == 5:
                imgs = {n: imgs[n] for n in ("front", "right")}
            rows.append((T, rp.run_capture(i, T, imgs, timeout=120.0, **kw)))
        final = rp.wait_diag(lambda d: d.count("frames_processed") >= len(rows), 5.0)
        alive = node.alive()
    return {"ready": ready, "rows": rows, "final": final, "alive": alive}


def _cam(d, name, key):
    return d.values.get(f"camera.{name}.{key}", "")


def test_rig_node_publishes_fused_body_poses_and_consistent_map_to_odom(rig_run):
    from reloc_ros.demo.replay import true_map_to_odom

    assert rig_run["alive"], "node died"
    assert rig_run["ready"].values["rig_cameras"] == " ".join(CAMERAS)
    for i, (T, out) in enumerate(rig_run["rows"]):
        assert out.T_map_base is not None, f"capture {i} has no fused pose: {out.diagnostics}"
        t, r = pose_errors(out.T_map_base, T)
        print(f"capture {i}: body error {t * 1e3:.2f} mm / {r:.4f} deg, stamp->pose {out.latency_ms:.0f} ms, "
              f"core {out.diagnostics.values.get('last_localize_ms')} ms; {out.diagnostics.message}")
        assert t < 0.005 and r < 0.05, f"capture {i}: body error {t * 1e3:.2f} mm / {r:.3f} deg"
        assert out.T_map_base_raw is not None
        cov = out.covariance
        assert np.all(np.isfinite(cov)) and np.allclose(cov, cov.T, atol=1e-12) and np.all(np.diag(cov) > 0)
        # map->odom o odom->base_link == ~/pose at the capture stamp (odom is the replayer's truth)
        assert out.T_map_odom is not None, f"no map->odom TF for capture {i}"
        T_odom_base = invert(true_map_to_odom(i)) @ T
        np.testing.assert_allclose(out.T_map_odom @ T_odom_base, out.T_map_base, atol=1e-6)
    final = rig_run["final"]
    assert final is not None and final.values["tracker_state"] == "tracking"
    assert final.count("frames_failed") == 0
    assert final.count("captures_complete") >= 5 and final.count("captures_partial") >= 1


def test_camera_without_mount_is_excluded_with_a_diagnostic(rig_run):
    for i, (_, out) in enumerate(rig_run["rows"][:4]):
        d = out.diagnostics
        assert d.level == WARN and "camera 'back' excluded" in d.message, d.message
        assert _cam(d, "back", "state") == "excluded" and "no TF base_link <- back_optical" in _cam(d, "back", "reason")
        for n in ("front", "left", "right"):
            assert _cam(d, n, "state") == "used" and int(_cam(d, n, "inliers")) > 0, (i, n, d.values)
        assert "cameras used: front, left, right" in d.message
    assert int(rig_run["final"].values["camera.back.captures_excluded"]) >= 5


def test_invalid_camera_info_excludes_that_camera_only(rig_run):
    T, out = rig_run["rows"][4]
    d = out.diagnostics
    assert _cam(d, "left", "state") == "excluded" and "uncalibrated" in _cam(d, "left", "reason")
    assert _cam(d, "front", "state") == "used" and _cam(d, "right", "state") == "used"
    assert out.T_map_base is not None


def test_capture_with_missing_cameras_is_released_and_localizes(rig_run):
    T, out = rig_run["rows"][5]
    d = out.diagnostics
    assert _cam(d, "left", "state") == "missing" and _cam(d, "back", "state") == "missing"
    assert _cam(d, "front", "state") == "used" and _cam(d, "right", "state") == "used"
    assert int(d.values["camera.left.captures_missing"]) == 1
    t, r = pose_errors(out.T_map_base, T)
    assert t < 0.005 and r < 0.05
