"""The prepared GPU check (bench/gpu_check.sh) in its CPU dry mode, so that it cannot rot
while no GPU is around: every model / variant / precision gets a measured row, the
targets, tests and key-list sections are filled, and both reports are written."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("onnxruntime")

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    env = dict(os.environ, GPU_CHECK_PYTHON=sys.executable)
    p = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), "--dry-run", "--out", str(out),
                        "--budget-s", "150"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return out, json.loads((out / "report.json").read_text()), p.stdout


def test_dry_run_measures_every_model_variant_and_precision(dry_run):
    out, rep, _ = dry_run
    assert rep["mode"] == "dry-run"
    rows = rep["rows"]
    eager = {(r["model"], r["variant"], r["precision"], r["K"]): r for r in rows if r["runtime"] == "torch-eager"}
    for model, variants in (("reloc3r", ("cached", "reencode")), ("reloc-vggt", ("dense", "star", "cached"))):
        for variant in variants:
            for precision in ("fp32", "bf16"):
                for K in (1, 2):
                    r = eager.get((model, variant, precision, K))
                    assert r is not None, (model, variant, precision, K)
                    assert r["status"] == "ok", r
                    assert 0 < r["min_ms"] <= r["median_ms"] and r["first_ms"] > 0
                    if model == "reloc-vggt":  # network alone is part of the whole localization
                        assert 0 < r["net_median_ms"] <= r["median_ms"] + 1e-6
    # torch.compile ran its patch-and-restore path and matched eager exactly (dynamo, eager backend)
    comp = [r for r in rows if r["runtime"] == "torch-compile"]
    assert {r["model"] for r in comp} == {"reloc3r", "reloc-vggt"}
    for r in comp:
        assert r["status"] == "ok", r
        assert r["max_abs_diff_vs_eager"] == 0.0 and r["compile_backend"] == "eager"
    # ONNX Runtime (CPU provider in the dry run) for each exported variant
    ort = {(r["model"], r["variant"]) for r in rows if r["runtime"] == "onnxruntime" and r["status"] == "ok"}
    assert ort == {("reloc3r", "cached"), ("reloc-vggt", "dense"), ("reloc-vggt", "star"), ("reloc-vggt", "cached")}
    # TensorRT is recorded plainly, whether present or not
    trt = [r for r in rows if r["runtime"] == "tensorrt"]
    assert trt and all(r["status"] in ("ok", "not available", "skipped") for r in trt)
    if not rep["env"]["tensorrt_available"]:
        assert all(r["status"] == "not available" and "tensorrt" in r["error"] for r in trt)


def test_dry_run_reports(dry_run):
    out, rep, _ = dry_run
    md = (out / "report.md").read_text()
    assert (out / "console.log").is_file() and "== targets" in (out / "console.log").read_text()
    assert "GPU check report (DRY RUN" in md and "## Targets" in md and "## Latency" in md
    assert [t["limit_ms"] for t in rep["targets"]] == [25.0, 80.0, 20.0]
    assert all(t["verdict"].startswith("n/a") and t["median_ms"] > 0 for t in rep["targets"])
    tests = rep["tests"]
    assert tests["status"] == "ok" and tests["passed"] >= 1 and tests["failed"] == 0 and tests["errors"] == 0
    assert "| test/test_backends.py |" in md
    assert rep["elapsed_s"] < rep["budget_s"]
    assert "TensorRT" in md and ("not available" in md or "importable" in md)


def test_dry_run_checks_full_size_key_lists_when_fixtures_exist(dry_run):
    _, rep, _ = dry_run
    if not (SHARED / "fixtures" / "vggt1b_state_dict_keys.txt").is_file():
        pytest.skip(f"shared fixtures {SHARED / 'fixtures'} are absent")
    full = {k["model"]: k for k in rep["keylists"] if k.get("where")}
    assert full["reloc3r"]["status"] == "match" and full["reloc3r"]["parameters"] == 426_523_916
    assert full["reloc-vggt"]["status"] == "match" and full["reloc-vggt"]["compared"] == 1279
    assert full["reloc-vggt"]["added_by_this_project"]["prefixes"] == ["pose_tokenizer"]


def test_budget_skips_what_does_not_fit(tmp_path):
    """With almost no time, the most important task is still tried first and the rest is
    skipped with the budget as reason (not silently dropped)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    p = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--dry-run", "--out", str(tmp_path),
                        "--budget-s", "6", "--skip-tests", "--only", "torch-eager,torch-compile"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=200)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    rep = json.loads((tmp_path / "report.json").read_text())
    rows = rep["rows"]
    assert rows[0]["runtime"] == "torch-eager" and rows[0]["model"] == "reloc3r" and rows[0]["variant"] == "cached"
    skipped = [r for r in rows if r["status"] == "skipped"]
    assert skipped and all("budget" in r["reason"] for r in skipped)
    assert {r["runtime"] for r in rows} <= {"torch-eager", "torch-compile"}
    assert "skipped to stay within" in (tmp_path / "report.md").read_text()
