"""reloc-train: a tiny Reloc-VGGT trained from scratch on rendered rooms (real renderer,
real network, real DDP over gloo between two torchrun processes).

Checks: the loss falls; an interrupted + resumed run ends bit-identical to an
uninterrupted one; checkpoints load strictly through the model builder; config errors
name the key; 2 gloo processes reach the same weights as 1 with the same global batch;
Reloc3r fine-tuning keeps its encoder frozen.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from reloc_ros.training.config import load_train_config
from reloc_ros.training.data import Sampler, collate, overlap_matrix
from reloc_ros.training.trainer import frame_sets, load_trained_model, train

REPO = Path(__file__).resolve().parents[1]

TINY = {
    "model": {"kind": "reloc_vggt", "tokenizer_hidden": 16, "mask": "cached",
              "arch": {"img_size": 42, "embed_dim": 32, "depth": 1, "num_heads": 2, "num_register_tokens": 1,
                       "dino_embed_dim": 32, "dino_depth": 1, "dino_num_heads": 2, "dino_num_register_tokens": 0,
                       "head_dim_in": 64, "head_trunk_depth": 1, "head_num_heads": 2, "num_iterations": 2}},
    "data": {"render": {"train_rooms": 2, "eval_rooms": 1, "frames_per_room": 32, "image_width": 42,
                        "image_height": 28, "texel_m": 0.03, "step_m": 0.3},
             "num_keyframes": 3, "min_overlap": 0.2, "min_baseline_m": 0.1, "eval_samples": 4},
    "optim": {"lr": 2e-3, "warmup_steps": 2, "steps": 30, "batch_size": 4},
    "run": {"eval_every": 0, "ckpt_every": 0, "log_every": 1, "threads": 1, "progress": False},
}


def _cfg(tmp: Path, name: str, **sections):
    data = json.loads(json.dumps(TINY))
    data["data"]["render"]["cache_dir"] = str(tmp / "render_cache")
    data["run"]["out_dir"] = str(tmp / name)
    for sec, vals in sections.items():
        data.setdefault(sec, {}).update(vals)
    return load_train_config(data=data)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("train")
    cfg = _cfg(tmp, "probe")
    return tmp, frame_sets(cfg)


def _weights_equal(a, b) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a) and a.keys() == b.keys()


def test_rendered_samples_are_consistent(tiny):
    tmp, (train_sets, eval_sets) = tiny
    fs = train_sets[0]
    assert fs.images.shape == (32, 28, 42, 3) and fs.images.dtype == np.uint8
    # overlap of a frame with itself is 1 (depth-consistent), and the matrix lies in [0, 1]
    assert np.allclose(np.diag(fs.overlap), 1.0)
    assert fs.overlap.min() >= 0 and fs.overlap.max() <= 1
    # without depth, covisibility is a frustum test at the assumed depth: self = 1 too
    ov = overlap_matrix(fs.K[:4], fs.T_world_cam[:4], fs.hw, None, 2.0)
    assert np.allclose(np.diag(ov), 1.0)
    cfg = _cfg(tmp, "probe")
    s = Sampler(train_sets, cfg.data, 0)
    a, b = s.spec(5, 1), s.spec(5, 1)
    assert a == b and len(a.keyframes) == 3 and a.query not in a.keyframes
    ovq = train_sets[a.scene].overlap[a.query, list(a.keyframes)]
    assert ovq[0] == ovq.max() and np.all(ovq >= 0.2)
    batch = collate(train_sets, [a])
    # ground truth of the reference keyframe is the identity, and the known keyframe
    # encodings are the first K ground-truth rows (same frame and scale)
    assert torch.allclose(batch.gt_enc[0, 0, :7], torch.tensor([0, 0, 0, 0, 0, 0, 1.0]), atol=1e-6)
    assert torch.equal(batch.gt_enc[0, :3], batch.kf_pose_enc[0])


def test_loss_falls_and_checkpoint_loads_strictly(tiny):
    tmp, sets = tiny
    cfg = _cfg(tmp, "falls")
    s = train(cfg, sets=sets)
    rows = [r for r in __import__("csv").DictReader((tmp / "falls" / "curve.csv").open()) if r["train_loss"]]
    losses = np.array([float(r["train_loss"]) for r in rows])
    assert len(losses) == 30
    assert losses[-5:].mean() < 0.7 * losses[:5].mean(), losses
    assert (tmp / "falls" / "curve.png").is_file()
    # the final model loads strictly through the builder and computes what the trained net computes
    net, meta = load_trained_model(tmp / "falls")
    assert meta["kind"] == "reloc_vggt" and meta["image_hw"] == [28, 42]
    assert _weights_equal(net.state_dict(), s["net"].state_dict())
    from reloc_ros.models.checkpoints import CheckpointError, load_checkpoint, save_safetensors
    from reloc_ros.models.reloc_vggt import build_reloc_vggt

    fresh = build_reloc_vggt(meta["arch"], tokenizer_hidden=meta["tokenizer_hidden"])
    load_checkpoint(fresh, tmp / "falls" / "model.safetensors")
    b = collate(sets[1], Sampler(sets[1], cfg.data, 0).fixed_specs(1, 0))
    out = fresh(b.query, b.keyframes, b.kf_pose_enc, mask="cached")["pose_enc"]
    ref = s["net"].eval().forward_batched(b.query, b.keyframes, b.kf_pose_enc, mask="cached")["pose_enc"]
    assert torch.allclose(out, ref, atol=1e-5)
    # a file missing a tensor is refused with the name
    sd = dict(net.state_dict())
    sd.pop("pose_tokenizer.unknown")
    save_safetensors(sd, tmp / "broken.safetensors")
    with pytest.raises(CheckpointError, match="pose_tokenizer.unknown"):
        load_checkpoint(fresh, tmp / "broken.safetensors")


def test_resume_continues_exactly(tiny):
    tmp, sets = tiny
    full = train(_cfg(tmp, "full", optim={**TINY["optim"], "steps": 6}), sets=sets)["net"].state_dict()
    cfg = _cfg(tmp, "resumed", optim={**TINY["optim"], "steps": 6})
    first = train(cfg, stop_after=3, sets=sets)
    assert first["step"] == 3
    assert (tmp / "resumed" / "checkpoints" / "last.txt").read_text() == "step_0000003"
    second = train(cfg, sets=sets)  # run.resume: auto
    assert second["step"] == 6
    assert _weights_equal(second["net"].state_dict(), full)
    assert not _weights_equal(first["net"].state_dict(), full)


def test_config_errors_name_the_key(tmp_path):
    with pytest.raises(ValueError, match="optim.*lrr"):
        load_train_config(data={"optim": {"lrr": 1}})
    with pytest.raises(ValueError, match="num_keyframes"):
        load_train_config(data={"data": {"num_keyframes": 1}})
    with pytest.raises(ValueError, match="init_weights"):
        load_train_config(data={"model": {"stage": 1}})
    with pytest.raises(ValueError, match="amp"):
        load_train_config(data={"run": {"amp": "bf16"}})
    with pytest.raises(ValueError, match="multiples of the model's patch size 14"):
        load_train_config(data={"data": {"render": {"image_width": 100}}})
    with pytest.raises(ValueError, match="mask"):
        load_train_config(data={"model": {"mask": "sparse"}})
    with pytest.raises(ValueError, match="width"):
        load_train_config(data={"model": {"arch": {"embed_dim": 30, "num_heads": 4}}})
    p = tmp_path / "bad.yaml"
    p.write_text("- a list\n")
    with pytest.raises(ValueError, match="mapping"):
        load_train_config(p)
    from reloc_ros.cli.train_cli import main

    assert main(["--config", str(p)]) == 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_two_gloo_processes_match_one(tiny):
    tmp, sets = tiny
    over = {"optim": {**TINY["optim"], "steps": 2}, "run": {**TINY["run"], "dtype": "float64"}}
    single = train(_cfg(tmp, "single", **over), sets=sets)["net"].state_dict()
    cfg = _cfg(tmp, "ddp", **over)
    cfg_path = tmp / "ddp.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg.to_dict()))
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                            "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
           "-m", "reloc_ros.cli.train_cli", "--config", str(cfg_path), "--quiet"]
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    from reloc_ros.models.checkpoints import read_state_dict

    ddp = read_state_dict(tmp / "ddp" / "model.safetensors")  # float64 as trained (a model load casts to float32)
    assert all(v.dtype == torch.float64 for v in ddp.values())
    assert ddp.keys() == single.keys()
    diff = max(float((ddp[k] - single[k]).abs().max()) for k in ddp if ddp[k].numel())
    moved = max(float((ddp[k] - s0).abs().max()) for k, s0 in
                train(_cfg(tmp, "zero", **{**over, "optim": {**TINY["optim"], "steps": 1}}),
                      stop_after=0, sets=sets)["net"].state_dict().items() if s0.numel())
    assert moved > 1e-4  # the two steps really changed the weights
    assert diff < 1e-10, diff


def test_reloc3r_finetune_keeps_encoder_frozen(tmp_path):
    cfg = load_train_config(data={
        "model": {"kind": "reloc3r", "arch": {"img_size": 48, "enc_embed_dim": 32, "enc_depth": 1,
                                              "enc_num_heads": 2, "dec_embed_dim": 32, "dec_depth": 1,
                                              "dec_num_heads": 2, "head_width": 64}},
        "data": {"render": {"train_rooms": 1, "eval_rooms": 1, "frames_per_room": 24, "image_width": 48,
                            "image_height": 32, "texel_m": 0.03, "step_m": 0.3, "cache_dir": str(tmp_path / "rc")},
                 "num_keyframes": 2, "min_overlap": 0.2, "min_baseline_m": 0.1, "eval_samples": 4},
        "optim": {"lr": 1e-3, "warmup_steps": 1, "steps": 3, "batch_size": 2},
        "run": {"out_dir": str(tmp_path / "r3"), "eval_every": 0, "ckpt_every": 0, "threads": 1, "progress": False}})
    from reloc_ros.training.trainer import build_model

    before = build_model(cfg).state_dict()
    s = train(cfg)
    after = s["net"].state_dict()
    for k in after:
        same = torch.equal(before[k], after[k])
        if k.startswith(("patch_embed.", "enc_blocks.")):
            assert same, k
    assert not torch.equal(before["pose_head.fc_t.weight"], after["pose_head.fc_t.weight"])
    ev = s["eval"]["pair"]
    assert np.isfinite(ev["median_r_deg"]) and np.isfinite(ev["median_dir_deg"])
    net, meta = load_trained_model(tmp_path / "r3")
    assert meta["kind"] == "reloc3r" and _weights_equal(net.state_dict(), after)


def test_dataset_reader_source_trains(tiny, tmp_path):
    """Training from a dataset reader (a posed folder, no depth: frustum covisibility)."""
    from reloc_ros.datasets import write_folder_dataset
    from reloc_ros.types import Camera, PosedFrame

    _, (train_sets, _) = tiny
    fs = train_sets[0]
    frames = [PosedFrame(f"f{i:03d}", fs.images[i], fs.T_world_cam[i], Camera(fs.K[i], fs.hw[1], fs.hw[0]))
              for i in range(len(fs))]
    src = write_folder_dataset(frames, tmp_path / "posed", overwrite=True)
    cfg = load_train_config(data={
        "model": TINY["model"],
        "data": {"source": "dataset", "dataset": {"format": "folder", "src": str(src), "frames": "0:24",
                                                  "eval_frames": "24:32", "image_width": 42, "image_height": 28,
                                                  "assumed_depth_m": 2.0},
                 "num_keyframes": 2, "min_overlap": 0.2, "min_baseline_m": 0.1, "eval_samples": 2},
        "optim": {**TINY["optim"], "steps": 2},
        "run": {**TINY["run"], "out_dir": str(tmp_path / "out")}})
    s = train(cfg)
    assert s["step"] == 2 and np.isfinite(s["eval"]["loss"])
    assert (tmp_path / "out" / "model.safetensors").is_file()
