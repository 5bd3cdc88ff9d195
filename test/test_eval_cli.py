"""reloc-eval end to end on a small real 7-Scenes split: a map built from a few frames,
queried with others, as a subprocess; JSON keys and ranges, PNG output, error exits."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
SEVEN = SHARED / "data" / "7scenes_redkitchen_0000_0499"

pytestmark = pytest.mark.skipif(
    not SEVEN.is_dir(), reason=f"shared 7-Scenes extract not found at {SEVEN} (needs ../shared next to the repo)")

REQUIRED = ["n_queries", "n_localized", "median_translation_m", "median_rotation_deg", "recall_5cm_5deg",
            "recall_25cm_2deg", "recall_50cm_5deg", "recall_5m_10deg", "latency_ms_p50", "latency_ms_p90",
            "stage_latency_ms"]


def _run(args, timeout=240):
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "reloc_ros.cli.eval_cli", *map(str, args)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def small_map(tmp_path_factory):
    from reloc_ros.datasets import open_dataset
    from reloc_ros.maps import MapBuildConfig, build_map

    out = tmp_path_factory.mktemp("map") / "redkitchen_small"
    build_map(open_dataset("7scenes", SEVEN, frames="0:60:10"), out, MapBuildConfig())
    return out


def _check_json(path, n_queries):
    doc = json.loads(Path(path).read_text())
    s = doc["summary"]
    for key in REQUIRED:
        assert key in s, key
    assert s["n_queries"] == n_queries and 0 <= s["n_localized"] <= n_queries
    for key in ("recall_5cm_5deg", "recall_25cm_2deg", "recall_50cm_5deg", "recall_5m_10deg"):
        assert 0.0 <= s[key] <= 1.0
    assert s["recall_5cm_5deg"] <= s["recall_50cm_5deg"] <= s["recall_5m_10deg"]
    assert 0 < s["latency_ms_p50"] <= s["latency_ms_p90"]
    assert "total" in s["stage_latency_ms"]
    assert len(doc["queries"]) == n_queries
    for q in doc["queries"]:
        assert q["status"] in ("ok", "degenerate", "not_localized", "error")
        assert np.array(q["T_gt"]).shape == (4, 4)
    return doc


def _is_png(path):
    import cv2

    data = Path(path).read_bytes()
    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    return data[:8] == b"\x89PNG\r\n\x1a\n" and img is not None and img.shape[1] > 500


def test_eval_against_a_map_writes_json_table_and_plot(small_map, tmp_path):
    out_json, out_png = tmp_path / "eval.json", tmp_path / "eval.png"
    proc = _run(["--map", small_map, "--format", "7scenes", SEVEN, "--frames", "5:60:20",
                 "--json", out_json, "--plot", out_png])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "recall" in proc.stdout and "frame-000025" in proc.stdout
    doc = _check_json(out_json, 3)
    # Queries sit between map keyframes 10 cm apart: the geometric path must localize them well.
    assert doc["summary"]["n_localized"] == 3
    assert doc["summary"]["median_translation_m"] < 0.05
    assert doc["meta"]["map_keyframes"] == 6 and doc["meta"]["map_disk_bytes_per_keyframe"] > 0
    assert _is_png(out_png)


def test_leave_one_out_builds_one_map_per_query(tmp_path):
    out_json = tmp_path / "loo.json"
    proc = _run(["--leave-one-out", "--format", "7scenes", SEVEN, "--frames", "0:40:10", "--json", out_json,
                 "--plot", tmp_path / "loo.png"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    doc = _check_json(out_json, 4)
    assert doc["meta"]["leave_one_out"] is True
    assert {q["name"] for q in doc["queries"]} == {f"frame-{i:06d}" for i in (0, 10, 20, 30)}
    assert doc["meta"]["map_build_ms_median"] > 0
    assert _is_png(tmp_path / "loo.png")


def test_bad_arguments_exit_with_a_clear_message(tmp_path, capsys):
    from reloc_ros.cli.eval_cli import main

    assert main(["--format", "7scenes", str(SEVEN), "--json", str(tmp_path / "x.json")]) == 2
    assert "--map is required" in capsys.readouterr().err
    assert main(["--map", str(tmp_path / "nowhere"), "--format", "7scenes", str(SEVEN), "--frames", "0:5:5",
                 "--json", str(tmp_path / "x.json")]) == 2
    err = capsys.readouterr().err
    assert "MapError" in err and "nowhere" in err
    assert main(["--map", str(tmp_path), "--format", "nosuchformat", str(SEVEN), "--json",
                 str(tmp_path / "x.json")]) == 2
    assert "unknown dataset format" in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists()
