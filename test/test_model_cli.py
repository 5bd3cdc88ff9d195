"""Checkpoint formats and ``reloc-model inspect|convert``: every published layout loads
strictly and reproduces the official outputs; bad files fail with a clear message."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from reloc_ros.cli.model_cli import main  # noqa: E402
from reloc_ros.models import build  # noqa: E402
from reloc_ros.models.checkpoints import CheckpointError, load_checkpoint, read_state_dict, state_dict_hash  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
FIXTURE = SHARED / "fixtures" / "reloc3r_tiny_io.pt"
VGGT_FIXTURE = SHARED / "fixtures" / "vggt_compact_io.pt"


@pytest.fixture(scope="module")
def fx():
    if not FIXTURE.exists():
        pytest.skip(f"shared fixture {FIXTURE} is absent (expected ../shared next to the repo)")
    return torch.load(FIXTURE, weights_only=True)


def _pose2(net, case):
    with torch.no_grad():
        _, p2 = net({"img": case["img1"], "true_shape": case["true_shape1"]},
                    {"img": case["img2"], "true_shape": case["true_shape2"]})
    return p2["pose"]


def _old_layout(sd):
    """The Dec 2024 training layout: {'model': ...} with DUSt3R-style names and extras."""
    model = {}
    for k, v in sd.items():
        if k.startswith("dec_blocks."):
            model["dec_blocks2." + k[len("dec_blocks."):]] = v
            model[k] = torch.zeros_like(v)  # DUSt3R's first-view decoder: must be dropped
        elif k.startswith("pose_head."):
            model["head4." + k[len("pose_head."):]] = v
        else:
            model[k] = v
    return {"model": model, "epoch": 7, "args": "namespace-as-text"}


@pytest.mark.parametrize("fmt", ["safetensors", "pth_flat", "pth_model_layout", "pth_module_prefix"])
def test_every_layout_loads_strictly_and_reproduces_fixture(fx, tmp_path, fmt):
    sd = fx["state_dict"]
    if fmt == "safetensors":
        from safetensors.torch import save_file

        path = tmp_path / "model.safetensors"
        save_file(dict(sd), str(path))
    elif fmt == "pth_flat":
        path = tmp_path / "Reloc3r-224.pth"
        torch.save(dict(sd), path)
    elif fmt == "pth_model_layout":
        path = tmp_path / "checkpoint-last.pth"
        torch.save(_old_layout(sd), path)
    else:
        path = tmp_path / "ddp.pth"
        torch.save({"module." + k: v for k, v in sd.items()}, path)
    net = build("reloc3r", fx["config"])
    chk = load_checkpoint(net, path)
    assert chk.ok and chk.num_tensors == len(sd)
    if fmt == "pth_model_layout":
        assert chk.layout == "model" and chk.remapped > 0
    case = fx["cases"]["224x224"]
    assert float((_pose2(net, case) - case["pose2"]).abs().max()) <= 1e-5


def test_pickled_code_is_never_executed(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"weights": torch.zeros(2), "payload": Path("/etc/passwd")}, path)  # non-tensor class object
    with pytest.raises(CheckpointError, match="weights-only"):
        read_state_dict(path)


def test_bad_files_give_clear_errors(fx, tmp_path):
    net = build("reloc3r", fx["config"])
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(net, tmp_path / "missing.pth")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00" * 10)
    with pytest.raises(CheckpointError, match="safetensors"):
        load_checkpoint(net, junk)
    odd = tmp_path / "w.npz"
    odd.write_bytes(b"x")
    with pytest.raises(CheckpointError, match="unsupported"):
        load_checkpoint(net, odd)
    sd = dict(fx["state_dict"])
    sd["pose_head.fc_t.weight"] = torch.zeros(4, 1024)
    del sd["enc_norm.bias"]
    sd["extra.weight"] = torch.zeros(1)
    bad = tmp_path / "bad.pth"
    torch.save(sd, bad)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(net, bad)
    msg = str(e.value)
    assert "enc_norm.bias" in msg and "extra.weight" in msg and "pose_head.fc_t.weight" in msg
    # nothing was loaded: the network keeps its weights
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())


def test_cli_inspect_and_convert_roundtrip(fx, tmp_path, capsys):
    src = tmp_path / "checkpoint-last.pth"
    torch.save(_old_layout(fx["state_dict"]), src)
    cfg = json.dumps(fx["config"])
    assert main(["inspect", str(src), "--config", cfg]) == 0
    assert "OK: keys and shapes match" in capsys.readouterr().out
    out = tmp_path / "reloc3r-tiny.safetensors"
    assert main(["convert", str(src), "-o", str(out), "--config", cfg, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] and report["layout"] == "model" and report["output"] == str(out)
    from safetensors import safe_open

    with safe_open(str(out), framework="pt") as f:
        assert set(f.keys()) == set(fx["state_dict"])  # DUSt3R extras dropped, names final
        assert f.metadata()["weights_hash"] == state_dict_hash(fx["state_dict"])
    net = build("reloc3r", fx["config"])
    net.load_state_dict(read_state_dict(out), strict=True)
    case = fx["cases"]["384x512"]
    assert float((_pose2(net, case) - case["pose2"]).abs().max()) <= 1e-5


def test_cli_reports_mismatch_against_full_size(fx, tmp_path, capsys):
    """The tiny fixture is not Reloc3r-512: shapes differ, exit status 1, no file written."""
    src = tmp_path / "tiny.pth"
    torch.save(dict(fx["state_dict"]), src)
    assert main(["inspect", str(src), "--img-size", "512"]) == 1
    assert "shape mismatches" in capsys.readouterr().out
    assert main(["convert", str(src), "-o", str(tmp_path / "x.safetensors")]) == 1
    assert not (tmp_path / "x.safetensors").exists()
    assert main(["inspect", str(tmp_path / "none.pth")]) == 2
    assert "not found" in capsys.readouterr().err
    assert main(["inspect", str(src), "--config", "[1,2]"]) == 2


def test_cli_vggt_arch(tmp_path, capsys):
    if not VGGT_FIXTURE.exists():
        pytest.skip(f"shared fixture {VGGT_FIXTURE} is absent")
    vfx = torch.load(VGGT_FIXTURE, weights_only=True)
    sd = dict(vfx["state_dict"])
    sd["depth_head.scratch.weight"] = torch.zeros(3)  # published heads we skip on purpose
    src = tmp_path / "model.pt"
    torch.save(sd, src)
    out = tmp_path / "vggt.safetensors"
    assert main(["convert", str(src), "--arch", "vggt", "--config", json.dumps(vfx["config"]), "-o", str(out)]) == 0
    assert "ignored=1" in capsys.readouterr().out
    assert set(read_state_dict(out)) == set(vfx["state_dict"])


def test_cli_entry_point_runs_as_module(fx, tmp_path):
    src = tmp_path / "tiny.safetensors"
    from safetensors.torch import save_file

    save_file(dict(fx["state_dict"]), str(src))
    r = subprocess.run(
        [sys.executable, "-m", "reloc_ros.cli.model_cli", "inspect", str(src), "--config", json.dumps(fx["config"])],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert r.returncode == 0, r.stderr
    assert "tensors=" in r.stdout
