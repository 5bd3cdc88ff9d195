"""Start ``reloc_node`` as a separate process on an isolated DDS domain (demo, tests, benchmark).

Isolation: ``ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST`` keeps traffic on loopback and a
per-run ``ROS_DOMAIN_ID`` keeps parallel runs apart (``ROS_LOCALHOST_ONLY`` is ignored by
the kilted wheels). ``FASTDDS_DEFAULT_PROFILES_FILE`` points at the shipped 32 MB
shared-memory profile so best-effort full-size images are not dropped.
"""
from __future__ import annotations

import itertools
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, Mapping, Optional

import yaml

_PKG_ROOT = Path(__file__).resolve().parents[1]  # .../reloc_ros
_counter = itertools.count()


def fastdds_profile_path() -> Optional[Path]:
    """The shipped config/fastdds_shm.xml (source tree or installed share dir), or None."""
    candidates = [_PKG_ROOT.parent / "config" / "fastdds_shm.xml"]
    try:
        from ament_index_python.packages import get_package_share_directory

        candidates.append(Path(get_package_share_directory("reloc_ros")) / "config" / "fastdds_shm.xml")
    except Exception:  # not on an ament install
        pass
    return next((p for p in candidates if p.is_file()), None)


def unique_domain_id() -> int:
    """A ROS domain id in 1..100 that differs between processes and between calls in one process."""
    return 1 + (os.getpid() * 13 + next(_counter) * 7) % 100


def isolated_ros_env(domain_id: Optional[int] = None, shm_profile: bool = True,
                     base: Optional[Mapping[str, str]] = None) -> Dict[str, str]:
    """Environment for a node or replay process on a private localhost DDS domain.

    Also puts this package's parent directory on PYTHONPATH so ``python -m reloc_ros...``
    works from a source checkout whatever the install state.
    """
    env = dict(os.environ if base is None else base)
    env["ROS_DOMAIN_ID"] = str(unique_domain_id() if domain_id is None else int(domain_id))
    env["ROS_AUTOMATIC_DISCOVERY_RANGE"] = "LOCALHOST"
    env.pop("ROS_LOCALHOST_ONLY", None)
    if shm_profile:
        prof = fastdds_profile_path()
        if prof is not None:
            env["FASTDDS_DEFAULT_PROFILES_FILE"] = str(prof)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(_PKG_ROOT.parent), env.get("PYTHONPATH", "")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("OMP_NUM_THREADS", "2")
    return env


def with_ament_prefix(env: Dict[str, str]) -> Dict[str, str]:
    """Add this interpreter's prefix (a venv where setup_env.sh or pip installed reloc_ros as an
    ament package) to AMENT_PREFIX_PATH, as an activated venv does. Returns env."""
    prefix = sys.prefix
    marker = Path(prefix) / "share" / "ament_index" / "resource_index" / "packages" / "reloc_ros"
    paths = [p for p in env.get("AMENT_PREFIX_PATH", "").split(os.pathsep) if p]
    if marker.exists() and prefix not in paths:
        env["AMENT_PREFIX_PATH"] = os.pathsep.join([prefix] + paths)
    return env


def ros2_executable() -> Optional[str]:
    """The ``ros2`` command of this interpreter's prefix (venv) or, else, of PATH (sourced ROS 2)."""
    here = Path(sys.executable).with_name("ros2")
    return str(here) if here.is_file() else shutil.which("ros2")


def launch_unavailable(env: Optional[Mapping[str, str]] = None) -> Optional[str]:
    """Why ``ros2 launch reloc_ros reloc.launch.py`` cannot run here, or None when it can.

    Needs the ros2 CLI with its launch verb (a sourced ROS 2, or the ros2-launch wheels that
    setup_env.sh installs from ../shared/wheels/ros2-launch) and reloc_ros in an ament prefix
    of env's AMENT_PREFIX_PATH (colcon install, or the venv laid out by setup_env.sh).
    """
    import importlib.util

    for mod in ("launch", "launch_ros", "ros2launch", "ament_index_python"):
        if importlib.util.find_spec(mod) is None:
            return (f"Python package {mod} is not installed (ROS 2 launch: a sourced ROS 2, or run "
                    f"`make setup` with ../shared/wheels/ros2-launch present)")
    if ros2_executable() is None:
        return "the ros2 command is not installed"
    env = dict(os.environ if env is None else env)
    for prefix in env.get("AMENT_PREFIX_PATH", "").split(os.pathsep):
        if prefix and (Path(prefix) / "share" / "ament_index" / "resource_index" / "packages" / "reloc_ros").exists():
            share = Path(prefix) / "share" / "reloc_ros"
            if not (share / "launch" / "reloc.launch.py").exists():
                return f"{share}/launch/reloc.launch.py is missing (re-run `make setup` or colcon build)"
            return None
    return ("reloc_ros is not in an ament prefix of AMENT_PREFIX_PATH "
            f"({env.get('AMENT_PREFIX_PATH', '') or 'unset'}): run `make setup` (venv) or colcon build + source")


def ros2_cli(args, env: Mapping[str, str], timeout: float = 60.0) -> subprocess.CompletedProcess:
    """Run ``ros2 <args>`` as an operator would (text output, stdout and stderr merged), with
    env's DDS domain and ament prefix. Raises subprocess.TimeoutExpired after timeout s."""
    return subprocess.run([ros2_executable() or "ros2", *args], env=dict(env), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=timeout)


def apply_env(env: Mapping[str, str]) -> None:
    """Copy the DDS-relevant variables into this process (before its first rclpy.init)."""
    for k in ("ROS_DOMAIN_ID", "ROS_AUTOMATIC_DISCOVERY_RANGE", "FASTDDS_DEFAULT_PROFILES_FILE"):
        if k in env:
            os.environ[k] = env[k]


class NodeProcess:
    """``python -m reloc_ros.ros.node`` in its own process, with a params file and a log file.

    params: node parameters (written to a ``--params-file`` so strings such as "{}" stay
    strings). remaps: ROS remappings, e.g. {"image": "/camera/image_raw"}.
    use_launch: start it as an operator would, ``ros2 launch reloc_ros reloc.launch.py
    params_file:=... image:=... camera_info:=...`` (see launch_unavailable()); remaps may then
    only name image, image/compressed (= image + "/compressed") and camera_info. SIGINT stops
    the launch, which stops the node; the exit code is the launch's.
    """

    def __init__(self, params: Mapping[str, object], env: Mapping[str, str], log_path: Optional[Path] = None,
                 remaps: Optional[Mapping[str, str]] = None, workdir: Optional[Path] = None,
                 use_launch: bool = False) -> None:
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="reloc_node_"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.params_file = self.workdir / f"params_{os.getpid()}_{next(_counter)}.yaml"
        self.params_file.write_text(yaml.safe_dump({"reloc_node": {"ros__parameters": dict(params)}}))
        self.log_path = Path(log_path or self.workdir / "reloc_node.log")
        self.env = dict(env)
        if use_launch:
            remaps = dict(remaps or {})
            image = remaps.pop("image", "image")
            if remaps.pop("image/compressed", image + "/compressed") != image + "/compressed":
                raise ValueError("reloc.launch.py remaps image/compressed to <image>/compressed only")
            info = remaps.pop("camera_info", "camera_info")
            if remaps:
                raise ValueError(f"reloc.launch.py has no argument for remapping {sorted(remaps)}")
            self.env = with_ament_prefix(self.env)
            self.cmd = [ros2_executable() or "ros2", "launch", "reloc_ros", "reloc.launch.py",
                        f"params_file:={self.params_file}", f"image:={image}", f"camera_info:={info}"]
            if params.get("map_path"):
                self.cmd.append(f"map:={params['map_path']}")
        else:
            self.cmd = [sys.executable, "-m", "reloc_ros.ros.node", "--ros-args", "--params-file",
                        str(self.params_file)]
            for k, v in (remaps or {}).items():
                self.cmd += ["-r", f"{k}:={v}"]
        self.proc: Optional[subprocess.Popen] = None

    def start(self) -> "NodeProcess":
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(self.cmd, env=self.env, stdout=self._log, stderr=subprocess.STDOUT,
                                     cwd=str(_PKG_ROOT.parent))
        return self

    @property
    def pid(self) -> int:
        return self.proc.pid if self.proc else -1

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 15.0) -> Optional[int]:
        """SIGINT, then SIGKILL after ``timeout`` s. Returns the exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        self._log.close()
        return self.proc.returncode

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def __enter__(self) -> "NodeProcess":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def wait_until(predicate, timeout: float, period: float = 0.05) -> bool:
    """Poll predicate() until true or timeout seconds pass."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(period)
    return bool(predicate())
