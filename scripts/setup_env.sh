#!/usr/bin/env bash
# Create .venv with every dependency (CPU builds), ROS 2 from PyPI when no system ROS 2
# is sourced, the generated tf2_msgs, and this package in editable mode. Idempotent.
# Usage: scripts/setup_env.sh [VENV_DIR]   (default .venv)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
venv=${1:-$root/.venv}
stamp="$venv/.reloc_ros_setup"
want=$(cat "$root/requirements.txt" "$root/requirements-ros.txt" "$root/setup.py" | sha256sum | cut -c1-16)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then exit 0; fi
if [ ! -x "$venv/bin/python" ]; then
  if [ -n "${ROS_DISTRO:-}" ]; then
    # Use the system's rclpy, tf2_ros and message packages.
    python3 -m venv --system-site-packages "$venv"
  else
    python3 -m venv "$venv"
  fi
fi
# (the grep hides this machine's harmless pip index warnings; pip's exit status is kept)
pip() { "$venv/bin/python" -m pip -q --disable-pip-version-check "$@" 2> >(grep -v "is ignored: it is neither" >&2); }
pip install -r "$root/requirements.txt"
if [ -z "${ROS_DISTRO:-}" ]; then
  pip install -r "$root/requirements-ros.txt"
  bash "$root/scripts/gen_tf2_msgs.sh" "$venv"
fi
pip install --no-deps -e "$root"
"$venv/bin/python" -c "import torch, faiss, cv2, poselib, rclpy, tf2_msgs.msg" 
echo "$want" > "$stamp"
echo "environment ready: $venv"
