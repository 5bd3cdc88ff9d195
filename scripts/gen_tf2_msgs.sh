#!/usr/bin/env bash
# Generate and install tf2_msgs (TFMessage) into a venv whose ROS 2 comes from PyPI.
# PyPI has no tf2_msgs wheel; the rosidl generators it does have build it in ~15 s.
# Usage: scripts/gen_tf2_msgs.sh VENV_DIR
set -euo pipefail
venv=$(cd "$1" && pwd)
here=$(cd "$(dirname "$0")" && pwd)
py="$venv/bin/python3"
if "$py" -c "import tf2_msgs.msg" 2>/dev/null; then exit 0; fi
# The message wheels' generator_py export files hard-code the wheel builder's include
# paths; point them at this interpreter's Python and numpy headers.
pyinc=$("$py" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')
npinc=$("$py" -c 'import numpy; print(numpy.get_include())')
for f in "$venv"/share/*/cmake/*__rosidl_generator_pyExport.cmake; do
  sed -i -E "s#/opt/python/cp3[0-9]+-cp3[0-9]+/include/python3\.[0-9]+#${pyinc}#g; s#/opt/python/cp3[0-9]+-cp3[0-9]+/lib/python3\.[0-9]+/site-packages/numpy/(_core|core)/include#${npinc}#g" "$f"
done
build=$(mktemp -d)
trap 'rm -rf "$build"' EXIT
export CMAKE_PREFIX_PATH="$venv" AMENT_PREFIX_PATH="$venv" PATH="$venv/bin:$PATH"
cmake -S "$here/tf2_msgs" -B "$build" -DCMAKE_INSTALL_PREFIX="$venv" -DBUILD_TESTING=OFF \
  -DPython3_EXECUTABLE="$py" -DCMAKE_BUILD_TYPE=Release >"$build/cmake.log" 2>&1 \
  || { tail -40 "$build/cmake.log"; exit 1; }
cmake --build "$build" -j2 >"$build/build.log" 2>&1 || { tail -40 "$build/build.log"; exit 1; }
cmake --install "$build" >/dev/null
"$py" -c "import tf2_msgs.msg; print('tf2_msgs generated:', tf2_msgs.msg.TFMessage)"
