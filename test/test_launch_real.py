"""The real ``ros2 launch reloc_ros reloc.launch.py`` under launch_pytest, checked as an operator would.

One launch for the module (a rendered-room map, a params_file and the launch arguments); the
node is fed over real DDS by reloc_ros.demo.replay.Replayer (a separate rclpy context in this
process) and inspected with the ``ros2`` CLI in subprocesses: ``ros2 param get``,
``ros2 topic echo --once``, ``ros2 service call``. After the launch is shut down (SIGINT, as
Ctrl-C does) the exit codes of the launch and of the node are checked.

Skips with the reason without the ROS 2 launch stack (a sourced ROS 2, or ``make setup`` with
../shared/wheels/ros2-launch) or without reloc_ros in an ament prefix.
"""
import time

import numpy as np
import pytest
import yaml

from ros_helpers import launch_test_setup, require_ros

require_ros()
launch_pytest = pytest.importorskip(
    "launch_pytest", reason="launch_pytest is not installed (a sourced ROS 2, or `make setup` with "
                            "../shared/wheels/ros2-launch)")
import launch  # noqa: E402

from reloc_ros.demo.procs import (apply_env, ros2_cli,  # noqa: E402
                                  ros2_executable)
from reloc_ros.geometry import pose_errors  # noqa: E402

TOL_S = 0.2
NODE_PARAMS = {"max_rate": 0.0, "top_k": 3, "diagnostics_period": 0.5, "transform_tolerance": TOL_S,
               "camera_info_timeout": 0.5, "tf_timeout": 1.0, "use_prior": False,
               # publish the fused pose from the first accepted fix (3 frames are sent)
               "tracker_options": "{init_single_confidence: 0.0, window: 1}"}


@pytest.fixture(scope="module")
def setup(tmp_path_factory, room_map_and_queries):
    with launch_test_setup(tmp_path_factory.mktemp("launch_real"), NODE_PARAMS, room_map_and_queries) as s:
        yield s


@pytest.fixture(scope="module")
def launch_proc(setup):
    return launch.actions.ExecuteProcess(
        cmd=[ros2_executable(), "launch", "reloc_ros", "reloc.launch.py", f"map:={setup.map_dir}",
             "estimator:=geometric", f"params_file:={setup.params}", "image:=/camera/image_raw",
             "camera_info:=/camera/camera_info"],
        env=setup.env, cached_output=True, output="screen", name="ros2_launch_reloc")


@launch_pytest.fixture(scope="module")
def launch_description(launch_proc):
    return launch.LaunchDescription([launch_proc, launch_pytest.actions.ReadyToTest()])


def _cli(setup, *args, timeout=60.0):
    """``ros2 <args>``; while the node is not (yet) in the daemon's graph, try again for up to 30 s."""
    end = time.monotonic() + 30.0
    while True:
        res = ros2_cli(list(args), setup.env, timeout=timeout)
        if res.stdout.strip() != "Node not found" or time.monotonic() > end:
            break
        time.sleep(0.5)
    assert res.returncode == 0, f"`ros2 {' '.join(args)}` failed ({res.returncode}):\n{res.stdout}"
    return res.stdout


@pytest.mark.launch(fixture=launch_description)
def test_parameters_are_the_launch_arguments(setup, launch_proc):
    get = lambda name: _cli(setup, "param", "get", "/reloc_node", name)  # noqa: E731
    assert get("map_path").strip() == f"String value is: {setup.map_dir}"  # map:=
    assert get("estimator").strip() == "String value is: geometric"  # estimator:=
    assert get("top_k").strip() == "Integer value is: 3"  # params_file:=


@pytest.mark.launch(fixture=launch_description)
def test_pose_and_tf_after_images_then_topic_echo_and_trigger(setup, launch_proc):
    from reloc_ros.demo.replay import Replayer

    apply_env(setup.env)  # this process's participant: same domain and Fast DDS profile
    q0 = setup.queries[0]
    rp = Replayer(domain_id=int(setup.env["ROS_DOMAIN_ID"]), image_topic="/camera/image_raw",
                  info_topic="/camera/camera_info")
    try:
        rp.wait_ready(timeout=60.0, camera=q0.camera)
        fused = []
        for k, q in enumerate(setup.queries[:3]):
            out = rp.run_frame(k, q.name, q.image, q.camera, q.T_world_cam, timeout=120.0, tolerance_s=TOL_S)
            if out.T_map_base is not None:
                t, r = pose_errors(out.T_map_base @ rp.T_base_cam, q.T_world_cam)
                assert t < 0.05 and r < 2.0, f"{q.name}: pose error {t:.3f} m {r:.2f} deg"
                assert out.T_map_odom is not None, f"{q.name}: ~/pose but no map->odom on /tf"
                fused.append(out)
        assert len(fused) >= 2, f"only {len(fused)}/3 frames gave a fused ~/pose; last diagnostics {out.diagnostics}"
        last = fused[-1]

        # The operator's view: ~/pose is latched (transient local; echo takes the publisher's QoS
        # from the daemon's graph), so echo prints the newest pose after the replay stopped.
        text = _cli(setup, "topic", "echo", "--once", "--timeout", "30", "/reloc_node/pose")
        msg = yaml.safe_load(text.split("---")[0])
        assert isinstance(msg, dict), f"ros2 topic echo printed no message:\n{text}"
        assert msg["header"]["frame_id"] == "map"
        stamp_ns = int(msg["header"]["stamp"]["sec"]) * 10**9 + int(msg["header"]["stamp"]["nanosec"])
        assert stamp_ns == last.stamp_ns, "ros2 topic echo did not print the newest pose"
        p = msg["pose"]["pose"]["position"]
        np.testing.assert_allclose([p["x"], p["y"], p["z"]], last.T_map_base[:3, 3], atol=1e-6)
        assert len(msg["pose"]["covariance"]) == 36

        reply = _cli(setup, "service", "call", "/reloc_node/trigger", "std_srvs/srv/Trigger")
        assert "success=True" in reply, reply
    finally:
        rp.close()


@pytest.mark.launch(fixture=launch_description, shutdown=True)
def test_shutdown_is_clean(launch_proc):
    out = launch_proc.get_stdout() + launch_proc.get_stderr()
    assert launch_proc.return_code == 0, f"ros2 launch exited with {launch_proc.return_code}:\n{out[-3000:]}"
    assert "[reloc_node-1]: process has finished cleanly" in out, out[-3000:]
