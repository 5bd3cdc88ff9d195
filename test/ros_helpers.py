"""Helpers for tests that run reloc_node as a separate process over real DDS."""
from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Iterator, Mapping, Optional, Tuple

import pytest

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
REMAPS = {"image": "/camera/image_raw", "image/compressed": "/camera/image_raw/compressed",
          "camera_info": "/camera/camera_info"}


def shared_dataset(name: str) -> Path:
    """../shared/data/<name>, or skip the test with the reason."""
    p = SHARED / "data" / name
    if not p.is_dir():
        pytest.skip(f"shared research data not found at {p} (tests read it from ../shared/data)")
    return p


def require_ros() -> None:
    """Skip unless rclpy and the message packages the node needs are importable."""
    for mod in ("rclpy", "sensor_msgs.msg", "tf2_msgs.msg", "diagnostic_msgs.msg", "std_srvs.srv"):
        pytest.importorskip(mod, reason=f"ROS 2 Python package {mod} is not installed")


@contextlib.contextmanager
def node_and_replayer(params: Mapping[str, object], workdir: Path, compressed: bool = False,
                      initialpose_topic: Optional[str] = None, make_replayer=None,
                      remaps: Optional[Mapping[str, str]] = REMAPS) -> Iterator[Tuple[object, object]]:
    """Start reloc_node (separate process, private localhost domain) and a Replayer talking to it.

    make_replayer(domain_id) builds another replayer (e.g. a RigReplayer) instead of the
    single-camera one. Yields (NodeProcess, replayer). On exit both are stopped; the node's log
    is printed so a failing test shows it.
    """
    from reloc_ros.demo.procs import NodeProcess, apply_env, isolated_ros_env
    from reloc_ros.demo.replay import Replayer

    env = isolated_ros_env()
    apply_env(env)  # the Fast DDS profile must be set before this process's first participant
    node = NodeProcess(params, env, log_path=workdir / f"reloc_node_{time.monotonic_ns()}.log", remaps=remaps,
                       workdir=workdir).start()
    rp = None
    rc = None
    try:
        if make_replayer is not None:
            rp = make_replayer(int(env["ROS_DOMAIN_ID"]))
        else:
            rp = Replayer(domain_id=int(env["ROS_DOMAIN_ID"]), compressed=compressed,
                          image_topic=REMAPS["image/compressed" if compressed else "image"],
                          initialpose_topic=initialpose_topic)
        yield node, rp
    finally:
        if rp is not None:
            rp.close()
        rc = node.stop()
        print(f"--- reloc_node log ({node.log_path}), exit code {rc} ---\n{node.log_tail(60)}")
    assert rc == 0, f"reloc_node did not shut down cleanly on SIGINT (exit code {rc})"


def call_service(rp, srv_type, name: str, request, timeout: float = 30.0, on_ready=None):
    """Call a service of the node from the replayer's context; fails the test on timeout.

    on_ready: called once the new client has discovered the service, just before the
    request goes out (discovery alone can take hundreds of ms on a loaded machine)."""
    client = rp.node.create_client(srv_type, name)
    try:
        assert client.wait_for_service(timeout_sec=timeout), f"service {name} not available"
        if on_ready is not None:
            on_ready()
        fut = client.call_async(request)
        end = time.monotonic() + timeout
        while not fut.done():
            assert time.monotonic() < end, f"service {name} did not answer within {timeout} s"
            time.sleep(0.01)
        return fut.result()
    finally:
        rp.node.destroy_client(client)


def set_string_param(rp, node_name: str, name: str, value: str) -> None:
    """Set a string parameter of a running node through its set_parameters service."""
    from rcl_interfaces.msg import Parameter, ParameterType, ParameterValue
    from rcl_interfaces.srv import SetParameters

    req = SetParameters.Request(parameters=[Parameter(
        name=name, value=ParameterValue(type=ParameterType.PARAMETER_STRING, string_value=value))])
    res = call_service(rp, SetParameters, f"{node_name}/set_parameters", req)
    assert res.results[0].successful, res.results[0].reason


@contextlib.contextmanager
def launch_test_setup(work: Path, node_params: Mapping[str, object], map_and_queries) -> Iterator[object]:
    """What a launch test module needs: an isolated ROS environment with reloc_ros in an ament
    prefix (skips with the reason when ``ros2 launch reloc_ros`` is unusable), a params file of
    ``node_params`` for ``reloc_node``, and the ros2 daemon of this private domain, as an
    operator's shell has one (the CLI then finds the node and its topics' QoS without
    discovering the graph each time); the daemon is stopped at the end, so nothing outlives
    the test. Yields a namespace: env, params, map_dir, queries, work."""
    from types import SimpleNamespace

    import yaml

    from reloc_ros.demo.procs import isolated_ros_env, launch_unavailable, ros2_cli, with_ament_prefix

    env = with_ament_prefix(isolated_ros_env())
    why = launch_unavailable(env)
    if why:
        pytest.skip(f"ros2 launch reloc_ros is not usable here: {why}")
    env["ROS_LOG_DIR"] = str(work / "roslog")
    params = work / "params.yaml"
    params.write_text(yaml.safe_dump({"reloc_node": {"ros__parameters": dict(node_params)}}))
    map_dir, queries = map_and_queries
    ros2_cli(["daemon", "start"], env)
    try:
        yield SimpleNamespace(env=env, params=params, map_dir=map_dir, queries=queries, work=work)
    finally:
        ros2_cli(["daemon", "stop"], env)
