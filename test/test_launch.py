"""launch/*.launch.py: described arguments (static, runs everywhere) and wrong arguments under the
real ``ros2 launch`` (a clear error and a non-zero exit within seconds, never a hang).

The real-launch tests need the ROS 2 launch stack (a sourced ROS 2, or ``make setup`` with
../shared/wheels/ros2-launch) and reloc_ros in an ament prefix; they skip with the reason
otherwise. test_launch_real.py and test_launch_lifecycle.py run the node through the launch files.
"""
import ast
import os
import time
from pathlib import Path

import pytest

from ros_helpers import require_ros

LAUNCH_DIR = Path(__file__).resolve().parents[1] / "launch"
REQUIRED_ARGS = {"map", "params_file", "estimator", "require_map", "use_sim_time", "namespace", "image",
                 "camera_info", "managed", "autostart"}


def _declared_args_from_source(path):
    found = {}
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "DeclareLaunchArgument":
            kw = {k.arg: k.value for k in node.keywords}
            desc = kw.get("description")
            found[node.args[0].value] = desc.value if isinstance(desc, ast.Constant) else ""
    return found


def test_launch_files_declare_described_arguments():
    args = _declared_args_from_source(LAUNCH_DIR / "reloc.launch.py")
    assert REQUIRED_ARGS <= set(args), f"missing launch arguments: {REQUIRED_ARGS - set(args)}"
    lc = _declared_args_from_source(LAUNCH_DIR / "reloc_lifecycle.launch.py")
    assert "autostart" in lc
    for name, desc in {**args, **lc}.items():
        assert len(desc) > 15, f"launch argument '{name}' has no real description"


@pytest.fixture(scope="module")
def launch_env(tmp_path_factory):
    """Environment for `ros2 launch` (private DDS domain, ament prefix), or skip with the reason."""
    require_ros()
    from reloc_ros.demo.procs import isolated_ros_env, launch_unavailable, with_ament_prefix

    env = with_ament_prefix(isolated_ros_env())
    why = launch_unavailable(env)
    if why:
        pytest.skip(f"ros2 launch reloc_ros is not usable here: {why}")
    env["ROS_LOG_DIR"] = str(tmp_path_factory.mktemp("roslog"))
    return env


def _launch(env, *args, timeout=60.0):
    from reloc_ros.demo.procs import ros2_cli

    t0 = time.monotonic()
    res = ros2_cli(["launch", "reloc_ros", *args], env, timeout=timeout)
    return res.returncode, res.stdout, time.monotonic() - t0


@pytest.mark.parametrize("launch_file", ["reloc.launch.py", "reloc_lifecycle.launch.py"])
def test_wrong_arguments_fail_fast_with_the_reason(launch_env, room_map_and_queries, tmp_path, launch_file):
    map_dir = room_map_and_queries[0]
    bad_params = tmp_path / "bad.yaml"
    bad_params.write_text("reloc_node:\n  ros__parameters:\n    tf_mode: sideways\n")
    not_a_map = tmp_path / "empty_dir"
    not_a_map.mkdir()
    cases = [
        ((), "no map: pass map:="),
        ((f"map:={tmp_path / 'missing'}",), "does not exist"),
        ((f"map:={not_a_map}",), "is not a reloc-map output directory"),
        ((f"map:={map_dir}", "estimator:=nonsense"), "unknown estimator 'nonsense'"),
        ((f"map:={map_dir}", f"params_file:={bad_params}"), "tf_mode must be one of"),
        ((f"map:={map_dir}", f"params_file:={tmp_path / 'nowhere.yaml'}"), "cannot read params_file"),
    ]
    for args, reason in cases:
        rc, out, took = _launch(launch_env, launch_file, *args)
        assert rc != 0, f"{launch_file} {args}: exit code 0 for wrong arguments:\n{out}"
        assert reason in out, f"{launch_file} {args}: the reason '{reason}' is not in the output:\n{out}"
        assert "process started" not in out, f"{launch_file} {args}: the node was started anyway:\n{out}"
        assert took < 30, f"{launch_file} {args}: took {took:.1f} s to fail"


def test_require_map_false_starts_the_node_without_a_map(launch_env):
    """The escape hatch keeps the plain node's documented behaviour: up without a map, reporting on
    /diagnostics, waiting for ~/reload_map (checked with `ros2 param get` on the running node)."""
    import signal
    import subprocess

    from reloc_ros.demo.procs import ros2_cli, ros2_executable

    proc = subprocess.Popen([ros2_executable(), "launch", "reloc_ros", "reloc.launch.py", "require_map:=false"],
                            env=launch_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        res = ros2_cli(["param", "get", "--no-daemon", "--timeout", "30", "/reloc_node", "map_path"], launch_env)
        assert res.returncode == 0 and "String value is:" in res.stdout, res.stdout
    finally:
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out
    assert "process has finished cleanly" in out, out


def test_launch_module_parses_without_ros():
    """The launch files must at least be valid Python on any machine (they are shipped as data)."""
    for f in LAUNCH_DIR.glob("*.launch.py"):
        compile(f.read_text(), str(f), "exec")
    assert os.access(Path(__file__).resolve().parents[1] / "scripts" / "reloc_node", os.X_OK)
    assert os.access(Path(__file__).resolve().parents[1] / "scripts" / "reloc_lifecycle_node", os.X_OK)


def test_installed_like_a_ros_package_ros2_pkg_and_ros2_run(launch_env, room_map_and_queries):
    """The ament layout in the prefix: `ros2 pkg` sees the package and its two executables, and
    `ros2 run reloc_ros reloc_node --ros-args ...` runs the node (Ctrl-C: the terminal's SIGINT to
    the process group; exit 0)."""
    import signal
    import subprocess

    from reloc_ros.demo.procs import ros2_cli, ros2_executable

    prefix = ros2_cli(["pkg", "prefix", "reloc_ros"], launch_env)
    assert prefix.returncode == 0, prefix.stdout
    share = Path(prefix.stdout.strip()) / "share" / "reloc_ros"
    for f in ("package.xml", "launch/reloc.launch.py", "launch/reloc_lifecycle.launch.py", "config/reloc.yaml"):
        assert (share / f).is_file(), f"{share / f} is not installed"
    exes = ros2_cli(["pkg", "executables", "reloc_ros"], launch_env).stdout.split("\n")
    assert {"reloc_ros reloc_node", "reloc_ros reloc_lifecycle_node"} <= set(exes), exes

    proc = subprocess.Popen([ros2_executable(), "run", "reloc_ros", "reloc_node", "--ros-args", "-p",
                             f"map_path:={room_map_and_queries[0]}", "-p", "top_k:=4"], env=launch_env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        res = ros2_cli(["param", "get", "--no-daemon", "--timeout", "30", "/reloc_node", "top_k"], launch_env)
        assert res.stdout.strip() == "Integer value is: 4", res.stdout
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out
    assert "loaded map" in out, out
