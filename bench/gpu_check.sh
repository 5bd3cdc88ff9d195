#!/usr/bin/env bash
# Prepared GPU check (issue 11, item 3): environment, GPU-relevant tests, full-size
# Reloc3r-512 / Reloc-VGGT latency and memory against the issue's targets, JSON + Markdown
# report (default out/gpu_check/). Finishes within --budget-s (default 420 s).
#
#   bash bench/gpu_check.sh                   # on a machine with an NVIDIA GPU
#   bash bench/gpu_check.sh --dry-run         # CPU, tiny configs, well under a minute
#   bash bench/gpu_check.sh --prepare         # here: copy the fixtures that fit into out/gpu_shared
#   bash bench/gpu_check.sh --link-shared ... # there: link ../shared -> out/gpu_shared first
#   bash bench/gpu_check.sh --help            # every option of bench/gpu_check.py
#
# Interpreter: $GPU_CHECK_PYTHON, else .venv/bin/python when present, else python3. It needs
# numpy and torch (onnx/onnxruntime/tensorrt optional); this package comes from the
# source tree via PYTHONPATH, nothing is installed.
set -u
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 2

# The device machine takes the working tree plus 'carry' paths, 64 MiB in all: keep a margin.
LIMIT_MIB="${GPU_CHECK_TREE_LIMIT_MIB:-60}"
SHARED_SRC="${RELOC_SHARED:-$ROOT/../shared}"

prepare() {
    # Copy the fixtures that fit into out/gpu_shared/fixtures (ignored by git; name it in
    # the device tool's 'carry'), most useful first: the key lists (the check itself),
    # then the test fixtures.
    local dst="$ROOT/out/gpu_shared/fixtures"
    if [ ! -d "$SHARED_SRC/fixtures" ]; then
        echo "no $SHARED_SRC/fixtures: nothing to prepare" >&2
        return 1
    fi
    rm -rf "$ROOT/out/gpu_shared"
    mkdir -p "$dst"
    local tree
    tree=$(git ls-files -co --exclude-standard -z | xargs -0 stat -c %s 2>/dev/null | awk '{s+=$1} END {print s+0}')
    local budget=$(( LIMIT_MIB * 1048576 - tree ))
    echo "working tree: $(( tree / 1048576 )) MiB; room for fixtures under ${LIMIT_MIB} MiB: $(( budget / 1048576 )) MiB"
    local f size
    for f in reloc3r_state_dict_keys.txt vggt1b_state_dict_keys.txt README.md reloc3r_tiny_io.pt \
             reloc3r_motion_averaging_io.npz vggt_compact_io.pt; do
        [ -f "$SHARED_SRC/fixtures/$f" ] || continue
        size=$(stat -c %s "$SHARED_SRC/fixtures/$f")
        if [ "$size" -le "$budget" ]; then
            cp "$SHARED_SRC/fixtures/$f" "$dst/"
            budget=$(( budget - size ))
            echo "  + $f ($(( size / 1024 )) KiB)"
        else
            echo "  - $f ($(( size / 1048576 )) MiB) left out: does not fit (its tests will skip there)"
        fi
    done
    echo "carry: out/gpu_shared"
}

PY="${GPU_CHECK_PYTHON:-}"
if [ -z "$PY" ]; then
    if [ -x "$ROOT/.venv/bin/python" ]; then PY="$ROOT/.venv/bin/python"; else PY=python3; fi
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1

OUT_DIR="$ROOT/out/gpu_check"
ARGS=()
while [ $# -gt 0 ]; do
    case "$1" in
        --prepare) prepare; exit $? ;;
        --link-shared)
            # The tests look for ../shared; on the device machine only the carried copy exists.
            if [ ! -e "$ROOT/../shared" ] && [ -d "$ROOT/out/gpu_shared/fixtures" ]; then
                ln -s "$ROOT/out/gpu_shared" "$ROOT/../shared" \
                    && echo "linked $ROOT/../shared -> out/gpu_shared" \
                    || echo "could not link ../shared: fixture tests will skip" >&2
            fi
            shift; continue ;;
        --out) OUT_DIR="$2"; ARGS+=("$1" "$2"); shift 2; continue ;;
        --out=*) OUT_DIR="${1#--out=}" ;;
    esac
    ARGS+=("$1")
    shift
done
mkdir -p "$OUT_DIR"
echo "gpu_check: $PY ($("$PY" -c 'import sys; print(sys.version.split()[0])' 2>&1)), repo $ROOT"
set -o pipefail
"$PY" "$ROOT/bench/gpu_check.py" "${ARGS[@]}" 2>&1 | tee "$OUT_DIR/console.log"
exit "${PIPESTATUS[0]}"
