"""VGGT aggregator + camera head: fixture equivalence, full-size names/shapes, strict
weight loading, pose-encoding conversions, input validation."""
from __future__ import annotations


import numpy as np
import pytest

torch = pytest.importorskip("torch")

from reloc_ros.models import build  # noqa: E402
from reloc_ros.models.checkpoints import CheckpointError  # noqa: E402
from reloc_ros.models.vggt import (  # noqa: E402
    VGGTConfig,
    build_vggt,
    extri_intri_to_pose_encoding,
    extrinsics_to_T_world_cam,
    load_vggt_weights,
    mat_to_quat,
    pose_encoding_to_extri_intri,
    quat_to_mat,
)
from reloc_ros.types import InvalidInputError  # noqa: E402

from conftest import SHARED, require  # noqa: E402
FIXTURE = SHARED / "fixtures" / "vggt_compact_io.pt"
KEYS = SHARED / "fixtures" / "vggt1b_state_dict_keys.txt"



@pytest.fixture(scope="module")
def fx():
    require(FIXTURE)
    return torch.load(FIXTURE, weights_only=True)


@pytest.fixture(scope="module")
def compact(fx):
    net = build("vggt", fx["config"])
    chk = load_vggt_weights(net, fx["state_dict"])
    assert chk.ok and not chk.ignored
    return net


def _maxdiff(a: torch.Tensor, b: torch.Tensor) -> float:
    # Equal infinities (a FoV of 0 gives an infinite focal length) count as equal.
    same_inf = torch.isinf(a) & torch.isinf(b) & (torch.sign(a) == torch.sign(b))
    d = (a - b).abs()
    d[same_inf] = 0.0
    return float(d.max())


@pytest.mark.parametrize("case", ["S3_140x196", "S2_126x168"])
def test_compact_fixture_reproduces_the_published_outputs(fx, compact, case):
    c = fx["cases"][case]
    with torch.no_grad():
        tokens, psi = compact.aggregator(c["images"])
        encs = compact.camera_head(tokens)
    assert psi == c["patch_start_idx"]
    assert len(tokens) == fx["config"]["aggregator"]["depth"]
    assert _maxdiff(tokens[-1], c["last_tokens"]) <= 1e-5
    assert len(encs) == len(c["pose_enc_list"]) == 4
    for mine, ref in zip(encs, c["pose_enc_list"]):
        assert _maxdiff(mine, ref) <= 1e-5
    ext, intr = pose_encoding_to_extri_intri(encs[-1], c["images"].shape[-2:])
    assert _maxdiff(ext, c["extrinsics"]) <= 1e-5
    assert _maxdiff(intr, c["intrinsics"]) <= 1e-5
    # The model's own forward agrees with the two-step call.
    with torch.no_grad():
        out = compact(c["images"])
    assert _maxdiff(out["pose_enc"], c["pose_enc_list"][-1]) <= 1e-5


def test_full_size_names_and_shapes_equal_the_published_key_list():
    require(KEYS)
    ref = {}
    for line in KEYS.read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        name, shape = line.split(" ", 1)
        if name.startswith(("aggregator.", "camera_head.")):
            ref[name] = tuple(int(s) for s in shape.strip("() \n").split(",") if s.strip())
    net = build_vggt({}, device="meta")  # 1.1 B parameters: shapes only, nothing allocated
    own = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    assert own == ref
    assert sum(int(np.prod(s)) for s in own.values()) == 1_125_286_930


def test_strict_loading_reports_missing_unexpected_and_misshaped_keys(fx, tmp_path):
    sd = dict(fx["state_dict"])
    net = build_vggt(fx["config"])
    # The published checkpoint's other heads are skipped...
    with_heads = dict(sd, **{"depth_head.proj.weight": torch.zeros(3), "track_head.x": torch.zeros(1)})
    chk = load_vggt_weights(net, with_heads)
    assert sorted(chk.ignored) == ["depth_head.proj.weight", "track_head.x"]
    # ...but anything else is an error, and so is a missing or mis-shaped tensor.
    with pytest.raises(CheckpointError, match="unexpected"):
        load_vggt_weights(net, dict(sd, **{"aggregator.extra": torch.zeros(1)}))
    missing = dict(sd)
    missing.pop("camera_head.embed_pose.weight")
    with pytest.raises(CheckpointError, match="missing"):
        load_vggt_weights(net, missing)
    bad = dict(sd, **{"aggregator.camera_token": torch.zeros(1, 2, 1, 32)})
    with pytest.raises(CheckpointError, match="shape"):
        load_vggt_weights(net, bad)
    # Files: a plain torch state dict (read with weights_only) and safetensors.
    from safetensors.torch import save_file

    torch.save(with_heads, tmp_path / "model.pt")
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "model.safetensors"))
    for f in ("model.pt", "model.safetensors"):
        fresh = build_vggt(fx["config"])
        load_vggt_weights(fresh, tmp_path / f)
        for k, v in fresh.state_dict().items():
            assert torch.equal(v, sd[k]), (f, k)
    with pytest.raises(CheckpointError, match="not found"):
        load_vggt_weights(net, tmp_path / "absent.pt")


def test_pose_encoding_round_trip_and_quaternion_conventions():
    from scipy.spatial.transform import Rotation

    g = torch.Generator().manual_seed(3)
    R = torch.from_numpy(Rotation.random(16, random_state=3).as_matrix())
    q = mat_to_quat(R)
    assert torch.all(q[:, 3] >= 0)
    assert torch.allclose(q.norm(dim=-1), torch.ones(16, dtype=q.dtype))
    # xyzw scalar-last, the same convention as scipy (up to sign)
    q_sp = torch.from_numpy(Rotation.from_matrix(R.numpy()).as_quat())
    q_sp = torch.where(q_sp[:, 3:] < 0, -q_sp, q_sp)
    assert torch.allclose(q, q_sp, atol=1e-12)
    # quat_to_mat divides by |q|^2, so any scaling of q decodes to the same rotation
    assert torch.allclose(quat_to_mat(3.0 * q), R, atol=1e-12)
    ext = torch.cat((R, torch.randn(16, 3, 1, generator=g, dtype=R.dtype)), dim=-1).view(2, 8, 3, 4)
    intr = torch.zeros(2, 8, 3, 3, dtype=R.dtype)
    intr[..., 0, 0], intr[..., 1, 1] = 300.0, 310.0
    intr[..., 0, 2], intr[..., 1, 2], intr[..., 2, 2] = 98.0, 70.0, 1.0
    enc = extri_intri_to_pose_encoding(ext, intr, (140, 196))
    ext2, intr2 = pose_encoding_to_extri_intri(enc, (140, 196))
    assert torch.allclose(ext2, ext, atol=1e-10)
    assert torch.allclose(intr2, intr, atol=1e-9)
    # camera-from-world -> camera-to-world
    T = extrinsics_to_T_world_cam(ext[0])
    E = np.concatenate([ext[0].numpy(), np.tile([[[0, 0, 0, 1.0]]], (8, 1, 1))], axis=1)
    assert np.allclose(T @ E, np.eye(4), atol=1e-10)


def test_config_validation_and_bad_input(compact):
    assert VGGTConfig.from_dict({}) == VGGTConfig()
    with pytest.raises(ValueError, match="unknown"):
        VGGTConfig.from_dict({"embed_dims": 64})
    with pytest.raises(ValueError, match="unknown"):
        VGGTConfig.from_dict({"aggregator": {"depth": 2, "bogus": 1}})
    with pytest.raises(ValueError, match="patch_embed"):
        VGGTConfig.from_dict({"aggregator": {"patch_embed": "conv"}})
    with pytest.raises(ValueError, match="width"):
        VGGTConfig.from_dict({"embed_dim": 64, "dino_embed_dim": 32})
    with pytest.raises(InvalidInputError, match="multiple of the patch size"):
        compact.aggregator(torch.rand(1, 2, 3, 100, 98))
    with pytest.raises(InvalidInputError, match=r"\[B,S,3,H,W\]"):
        compact.aggregator(torch.rand(2, 1, 70, 98))
