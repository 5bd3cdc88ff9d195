#!/usr/bin/env bash
# Create .venv with every dependency (CPU builds), ROS 2 from PyPI when no system ROS 2
# is sourced, the generated tf2_msgs, the ROS 2 launch stack and `ros2` CLI from local
# wheels when ../shared/wheels/ros2-launch exists, and this package in editable mode laid
# out as an ament package in the venv prefix. Idempotent: a rerun with nothing changed
# returns at once.
# Usage: scripts/setup_env.sh [VENV_DIR]   (default .venv)
# Env:   RELOC_ROS2_LAUNCH_WHEELS  folder of the launch wheels (default ../shared/wheels/ros2-launch)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
venv=${1:-$root/.venv}
wheels=${RELOC_ROS2_LAUNCH_WHEELS:-$root/../shared/wheels/ros2-launch}
stamp="$venv/.reloc_ros_setup"
# Everything that changes what gets installed: requirements, setup.py, this script, the file
# lists behind the data_files (a new launch file must be linked), and the wheels folder
# (its appearance must trigger the launch install).
want=$( {
  cat "$root/requirements.txt" "$root/requirements-ros.txt" "$root/requirements-ros-launch.txt" \
      "$root/setup.py" "$0"
  (cd "$root" && ls -1 launch config scripts resource)
  echo "ROS_DISTRO=${ROS_DISTRO:-}"
  if [ -d "$wheels" ]; then ls -1 "$wheels"; fi
} | sha256sum | cut -c1-16)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then exit 0; fi
if [ ! -x "$venv/bin/python" ]; then
  if [ -n "${ROS_DISTRO:-}" ]; then
    # Use the system's rclpy, tf2_ros, message packages and launch.
    python3 -m venv --system-site-packages "$venv"
  else
    python3 -m venv "$venv"
  fi
fi
venv=$(cd "$venv" && pwd)
# (the grep hides this machine's harmless pip index warnings; pip's exit status is kept)
pip() { "$venv/bin/python" -m pip -q --disable-pip-version-check "$@" 2> >(grep -v "is ignored: it is neither" >&2); }
pip install -r "$root/requirements.txt"
if [ -z "${ROS_DISTRO:-}" ]; then
  pip install -r "$root/requirements-ros.txt"
  bash "$root/scripts/gen_tf2_msgs.sh" "$venv"
  if [ -d "$wheels" ]; then
    pip install --find-links "$wheels" -r "$root/requirements-ros-launch.txt"
  else
    echo "note: $wheels not found: not installing ros2 launch / launch_pytest / the ros2 CLI (the launch tests skip without them)"
  fi
fi
pip install --no-deps -e "$root"

# An editable install does not place setup.py's data_files (setuptools installs only the
# package code in editable mode), so link them into the venv prefix, file by file, as
# `colcon build --symlink-install` does: <venv>/share/ament_index/.../reloc_ros,
# share/reloc_ros/{package.xml,launch/*,config/*}, lib/reloc_ros/<executables>. Files are
# linked one by one because `ros2 launch <pkg> <file>` walks share/<pkg> without following
# directory links. The list comes from setup.py itself, so it cannot drift.
(cd "$root" && "$venv/bin/python" - "$venv" <<'EOF'
import os, sys
import setuptools

prefix = sys.argv[1]
root = os.getcwd()
kw = {}
setuptools.setup = lambda **k: kw.update(k)  # read setup()'s arguments without running a command
exec(compile(open("setup.py").read(), "setup.py", "exec"), {"__name__": "__main__", "__file__": "setup.py"})
for dest, files in kw["data_files"]:
    os.makedirs(os.path.join(prefix, dest), exist_ok=True)
    wanted = {os.path.basename(f): os.path.join(root, f) for f in files}
    for name in os.listdir(os.path.join(prefix, dest)):  # links to files since removed from the tree
        p = os.path.join(prefix, dest, name)
        if os.path.islink(p) and os.readlink(p).startswith(root + os.sep) and name not in wanted \
                and not os.path.exists(p):
            os.remove(p)
    for name, src in wanted.items():
        dst = os.path.join(prefix, dest, name)
        if os.path.lexists(dst):
            os.remove(dst)
        os.symlink(src, dst)
EOF
) >/dev/null
# `ros2 launch/run/pkg` find packages through AMENT_PREFIX_PATH: an activated venv sets it.
if ! grep -q "reloc_ros: ament prefix" "$venv/bin/activate"; then
  cat >> "$venv/bin/activate" <<'EOF'
# reloc_ros: ament prefix (ros2 launch/run/pkg find packages installed in this venv)
case ":${AMENT_PREFIX_PATH:-}:" in *":$VIRTUAL_ENV:"*) ;; *) AMENT_PREFIX_PATH="$VIRTUAL_ENV${AMENT_PREFIX_PATH:+:$AMENT_PREFIX_PATH}"; export AMENT_PREFIX_PATH;; esac
EOF
fi
"$venv/bin/python" -c "import torch, faiss, cv2, poselib, rclpy, tf2_msgs.msg"
echo "$want" > "$stamp"
echo "environment ready: $venv"
