"""Reloc3r network: RoPE2D, fixture equivalence, architecture, preprocessing, the
batched-pairs path and the ``reloc3r`` estimator on a real (tiny) keyframe map."""
from __future__ import annotations

import logging

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from reloc_ros.geometry import project_to_so3  # noqa: E402
from reloc_ros.models import build  # noqa: E402
from reloc_ros.models.reloc3r import (  # noqa: E402
    Reloc3rConfig,
    patch_positions,
    preprocess_image,
    raw_to_pose,
    rot9_to_rotation,
    views_from_images,
)
from reloc_ros.models.rope import RoPE2D, apply_rope2d  # noqa: E402
from reloc_ros.types import InvalidInputError, RelocError  # noqa: E402

from conftest import SHARED, require  # noqa: E402
FIXTURE = SHARED / "fixtures" / "reloc3r_tiny_io.pt"
KEYS = SHARED / "fixtures" / "reloc3r_state_dict_keys.txt"
SCENES = SHARED / "data" / "7scenes_redkitchen_0000_0499"



@pytest.fixture(scope="module")
def fx():
    require(FIXTURE)
    return torch.load(FIXTURE, weights_only=True)


@pytest.fixture(scope="module")
def tiny(fx):
    net = build("reloc3r", fx["config"])
    net.load_state_dict(fx["state_dict"], strict=True)
    return net


# ----------------------------------------------------------------------------- RoPE2D


def _rope_reference(x, pos, base=100.0):
    """Straight from the definition: per half, per frequency, rotate pairs (i, i + D/4)."""
    B, H, N, D = x.shape
    half, q = D // 2, D // 4
    out = x.clone()
    for axis in range(2):
        for j in range(q):
            f = base ** (-(2 * j) / half)
            ang = pos[:, :, axis].double() * f  # [B, N]
            c, s = torch.cos(ang)[:, None, :], torch.sin(ang)[:, None, :]
            a = x[..., axis * half + j].double()
            b = x[..., axis * half + q + j].double()
            out[..., axis * half + j] = (a * c - b * s).to(x.dtype)
            out[..., axis * half + q + j] = (b * c + a * s).to(x.dtype)
    return out


def test_rope2d_matches_definition():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 12, 16, generator=g)
    pos = torch.randint(0, 40, (2, 12, 2), generator=g)
    assert torch.allclose(apply_rope2d(x, pos), _rope_reference(x, pos), atol=1e-5)
    assert torch.allclose(RoPE2D()(x, pos), apply_rope2d(x, pos))


def test_rope2d_scores_depend_on_relative_position_only():
    g = torch.Generator().manual_seed(1)
    q, k = torch.randn(1, 1, 1, 64, generator=g, dtype=torch.float64), torch.randn(1, 1, 1, 64, generator=g, dtype=torch.float64)

    def score(pq, pk):
        a = apply_rope2d(q, torch.tensor([[pq]]))
        b = apply_rope2d(k, torch.tensor([[pk]]))
        return float((a * b).sum())

    # angles are float32 as published, hence 1e-5 rather than float64 round-off
    assert score((3, 5), (1, 2)) == pytest.approx(score((13, 25), (11, 22)), abs=1e-5)
    assert score((3, 5), (1, 2)) != pytest.approx(score((3, 5), (2, 1)), abs=1e-3)
    # rotation keeps norms
    x = torch.randn(2, 4, 7, 32, dtype=torch.float64)
    p = torch.randint(0, 30, (2, 7, 2))
    assert torch.allclose(apply_rope2d(x, p).norm(dim=-1), x.norm(dim=-1))


def test_rope2d_rejects_bad_shapes():
    with pytest.raises(ValueError):
        apply_rope2d(torch.zeros(1, 1, 4, 6), torch.zeros(1, 4, 2, dtype=torch.long))
    with pytest.raises(ValueError):
        apply_rope2d(torch.zeros(1, 1, 4, 8), torch.zeros(1, 4, 3, dtype=torch.long))


# ----------------------------------------------------------------------------- fixture equivalence


@pytest.mark.parametrize("case", ["224x224", "384x512", "384x512_portrait_true_shape"])
def test_reproduces_official_outputs(fx, tiny, case):
    c = fx["cases"][case]
    with torch.no_grad():
        out = tiny.forward_with_intermediates(
            {"img": c["img1"], "true_shape": c["true_shape1"]}, {"img": c["img2"], "true_shape": c["true_shape2"]}
        )
    got = {
        "pose1": out["pose1"]["pose"], "pose2": out["pose2"]["pose"],
        "enc_feat1": out["enc_feat1"], "dec1_last": out["dec1_last"],
        "head1_t_raw": out["pose1"]["t_raw"], "head1_rot9_raw": out["pose1"]["rot9_raw"],
        "head2_t_raw": out["pose2"]["t_raw"], "head2_rot9_raw": out["pose2"]["rot9_raw"],
    }
    want = {"pose1": c["pose1"], "pose2": c["pose2"], **c.get("intermediates", {})}
    for name, ref in want.items():
        err = float((got[name] - ref).abs().max())
        assert err <= 1e-5, f"{case}: {name} differs by {err}"
    # the public call form of the authors' module returns the same poses
    with torch.no_grad():
        p1, p2 = tiny({"img": c["img1"], "true_shape": c["true_shape1"]}, {"img": c["img2"], "true_shape": c["true_shape2"]})
    assert float((p2["pose"] - c["pose2"]).abs().max()) <= 1e-5
    assert float((p1["pose"] - c["pose1"]).abs().max()) <= 1e-5


def test_fixture_weights_load_strictly_and_in_order(fx):
    net = build("reloc3r", fx["config"])
    assert list(net.state_dict()) == list(fx["state_dict"])
    missing, unexpected = net.load_state_dict(fx["state_dict"], strict=True)
    assert not missing and not unexpected


# ----------------------------------------------------------------------------- architecture


def _key_list():
    require(KEYS)
    rows = []
    for line in KEYS.read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        name, shape = line.split(" ", 1)
        rows.append((name, tuple(int(s) for s in shape.strip("() ").split(",") if s.strip())))
    return rows


@pytest.mark.parametrize("cfg", [{}, {"img_size": 512}, {"img_size": 224}])
def test_full_size_names_and_shapes_equal_official(cfg):
    from reloc_ros.models.reloc3r import build_reloc3r

    meta = build_reloc3r(cfg, device="meta")  # names and shapes only: no 1.7 GB allocation
    got = [(k, tuple(v.shape)) for k, v in meta.state_dict().items()]
    assert got == _key_list()
    assert sum(p.numel() for p in meta.parameters()) == 426_523_916


def test_config_validation():
    with pytest.raises(ValueError, match="unknown"):
        Reloc3rConfig.from_dict({"enc_dim": 3})
    with pytest.raises(ValueError):
        Reloc3rConfig.from_dict({"enc_embed_dim": 100, "enc_num_heads": 3})
    with pytest.raises(ValueError):
        build("nope", {})


# ----------------------------------------------------------------------------- rotation head


def test_rot9_projection_is_closest_rotation():
    g = torch.Generator().manual_seed(3)
    m = torch.randn(6, 9, generator=g, dtype=torch.float64)
    R = rot9_to_rotation(m)
    for Mi, Ri in zip(m.reshape(-1, 3, 3), R):
        Mn = Mi / Mi.norm(dim=1, keepdim=True)  # rows normalised first, as published
        assert np.allclose(Ri.numpy(), project_to_so3(Mn.numpy()), atol=1e-10)
        assert np.linalg.det(Ri.numpy()) == pytest.approx(1.0, abs=1e-12)
    T = raw_to_pose(torch.tensor([[1.0, 2.0, 3.0]], dtype=torch.float64), m[:1])
    assert T.shape == (1, 4, 4) and torch.equal(T[0, 3], torch.tensor([0, 0, 0, 1.0], dtype=torch.float64))


# ----------------------------------------------------------------------------- preprocessing


def _img(h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_preprocessing_sizes_as_published():
    arr, hw = preprocess_image(_img(480, 640), 512)
    assert hw == (384, 512) and arr.shape == (3, 384, 512) and arr.dtype == np.float32
    assert arr.min() >= -1.0 and arr.max() <= 1.0
    assert preprocess_image(_img(480, 640), 224)[1] == (224, 224)
    assert preprocess_image(_img(640, 480), 512)[1] == (512, 384)  # portrait stays portrait
    assert preprocess_image(_img(600, 600), 512)[1] == (384, 512)  # square -> 512x384
    assert preprocess_image(_img(1080, 1920), 512)[1] == (288, 512)
    h, w = preprocess_image(_img(370, 1226), 512)[1]
    assert (h, w) == (144, 512) and h % 16 == 0
    # an exact 2x downscale of a constant image keeps the value (normalisation to [-1, 1])
    flat = np.full((768, 1024, 3), 255, np.uint8)
    assert np.allclose(preprocess_image(flat, 512)[0], 1.0, atol=1e-6)


def test_preprocessing_rejects_bad_images():
    with pytest.raises(InvalidInputError):
        preprocess_image(np.zeros((8, 8, 3), np.uint8), 512)
    with pytest.raises(InvalidInputError):
        preprocess_image(np.zeros((100, 100, 3), np.float32), 512)
    with pytest.raises(ValueError):
        preprocess_image(_img(480, 640), 300)


def test_portrait_convention_equals_native_orientation(tiny):
    """A portrait image given the authors' way (tensor transposed to landscape + portrait
    true_shape) gives the same poses as the image passed in its own orientation."""
    imgs = [_img(640, 480, 1), _img(640, 480, 2)]
    v = views_from_images(imgs, 512)
    assert tuple(v["img"].shape[-2:]) == (384, 512) and v["true_shape"].tolist() == [[512, 384]] * 2
    native = v["img"].transpose(-1, -2)
    with torch.no_grad():
        _, p_conv = tiny({"img": v["img"][:1], "true_shape": v["true_shape"][:1]},
                         {"img": v["img"][1:], "true_shape": v["true_shape"][1:]})
        _, p_nat = tiny({"img": native[:1]}, {"img": native[1:]})
    assert float((p_conv["pose"] - p_nat["pose"]).abs().max()) <= 1e-5


def test_mixed_orientation_batch_equals_per_sample(fx, tiny):
    c = fx["cases"]
    img1 = torch.cat([c["384x512"]["img1"], c["384x512_portrait_true_shape"]["img1"]])
    img2 = torch.cat([c["384x512"]["img2"], c["384x512_portrait_true_shape"]["img2"]])
    ts = torch.tensor([[384, 512], [512, 384]])
    with torch.no_grad():
        _, p2 = tiny({"img": img1, "true_shape": ts}, {"img": img2, "true_shape": ts})
    assert float((p2["pose"][0] - c["384x512"]["pose2"][0]).abs().max()) <= 1e-5
    assert float((p2["pose"][1] - c["384x512_portrait_true_shape"]["pose2"][0]).abs().max()) <= 1e-5


# ----------------------------------------------------------------------------- batched pairs


def test_batched_pairs_with_shared_query_equal_unbatched(tiny):
    """K keyframes vs one query in one forward (query tokens broadcast) == K separate
    forwards of the authors' pair call with view1 = keyframe, view2 = query."""
    g = torch.Generator().manual_seed(5)
    kf = torch.rand(4, 3, 224, 224, generator=g) * 2 - 1
    q = torch.rand(1, 3, 224, 224, generator=g) * 2 - 1
    with torch.no_grad():
        fk, pk = tiny.encode_native(kf)
        fq, pq = tiny.encode_native(q)
        batched = tiny.pairs_from_tokens(fk, pk, fq, pq)
        for i in range(4):
            _, p2 = tiny({"img": kf[i : i + 1]}, {"img": q})
            assert float((batched[i] - p2["pose"][0]).abs().max()) <= 1e-5


def test_pairs_with_different_token_grids(tiny):
    """Views of different sizes (384x512 keyframe, 224x224 query) take the unbatched
    decoder path and still match the authors' pair call."""
    g = torch.Generator().manual_seed(6)
    a = torch.rand(1, 3, 384, 512, generator=g) * 2 - 1
    b = torch.rand(1, 3, 224, 224, generator=g) * 2 - 1
    with torch.no_grad():
        fa, pa = tiny.encode_native(a)
        fb, pb = tiny.encode_native(b)
        pose = tiny.pairs_from_tokens(fa, pa, fb, pb)
        _, p2 = tiny({"img": a}, {"img": b})
    assert float((pose - p2["pose"]).abs().max()) <= 1e-5


def test_patch_positions_row_major():
    assert patch_positions(2, 3).tolist() == [[0, 0], [0, 1], [0, 2], [1, 0], [1, 1], [1, 2]]


def test_encoder_rejects_bad_inputs(tiny):
    with pytest.raises(InvalidInputError):
        tiny.encode(torch.zeros(1, 3, 100, 224))
    with pytest.raises(InvalidInputError):
        tiny.encode(torch.zeros(1, 1, 224, 224))
    with pytest.raises(InvalidInputError):  # portrait tensor declared landscape
        tiny.encode(torch.zeros(1, 3, 512, 384), torch.tensor([[384, 512]]))


# ----------------------------------------------------------------------------- estimator


@pytest.fixture(scope="module")
def tiny_weights(fx, tmp_path_factory):
    from safetensors.torch import save_file

    p = tmp_path_factory.mktemp("w") / "tiny.safetensors"
    save_file(dict(fx["state_dict"]), str(p))
    return p


def _frame(i):
    import cv2

    from reloc_ros.types import Camera, PosedFrame

    img = cv2.cvtColor(cv2.imread(str(SCENES / f"frame-{i:06d}.color.jpg")), cv2.COLOR_BGR2RGB)
    T = np.loadtxt(SCENES / f"frame-{i:06d}.pose.txt")
    K = np.array([[525.0, 0, 320], [0, 525, 240], [0, 0, 1]])
    return PosedFrame(f"{i:06d}", img, T, Camera(K, 640, 480))


@pytest.fixture(scope="module")
def tiny_map(fx, tiny_weights, tmp_path_factory):
    require(SCENES)
    from reloc_ros.estimators import create
    from reloc_ros.maps import KeyframeMap, MapBuildConfig, build_map

    est = create("reloc3r", {"weights": str(tiny_weights), "config": fx["config"], "cache_dtype": "fp32"})
    out = tmp_path_factory.mktemp("map") / "map"
    build_map([_frame(i) for i in (0, 40, 80)], out, MapBuildConfig(use_depth=False, triangulate=False), estimators=[est])
    return KeyframeMap.load(out)


def _direct_pose2(net, kf_image, q_image, img_size=512):
    a, _ = preprocess_image(kf_image, img_size)
    b, _ = preprocess_image(q_image, img_size)
    with torch.no_grad():
        _, p2 = net({"img": torch.from_numpy(a)[None]}, {"img": torch.from_numpy(b)[None]})
    return p2["pose"][0].double().numpy()


def test_estimator_refuses_missing_weights():
    from reloc_ros.estimators import create

    with pytest.raises(RelocError, match="weights"):
        create("reloc3r", {})
    with pytest.raises(RelocError):
        create("reloc3r", {"weights": "/nonexistent/reloc3r.pth"})
    with pytest.raises(ValueError, match="img_size"):
        create("reloc3r", {"allow_random_weights": True, "img_size": 300})


def test_estimator_cached_tokens_give_the_authors_pair_poses(fx, tiny, tiny_weights, tiny_map):
    from reloc_ros.estimators import create
    from reloc_ros.estimators.base import Query

    cache = tiny_map.cache_dir("reloc3r")
    assert any(p.suffix == ".safetensors" for p in cache.iterdir())
    est = create("reloc3r", {"weights": str(tiny_weights), "config": fx["config"], "cache_dtype": "fp32"})
    est.prepare(tiny_map)
    assert len(est._tokens) == tiny_map.num_keyframes  # loaded from the map, not re-encoded
    q = _frame(60)
    out = est.estimate(Query(q.image, q.camera), [2, 0, 1], tiny_map)
    assert [p.keyframe_id for p in out.pairs] == [2, 0, 1]
    for p in out.pairs:
        assert p.metric is False and p.weight == 1.0
        ref = _direct_pose2(tiny, tiny_map.image(p.keyframe_id), q.image)
        assert np.abs(p.T_kf_query - ref).max() <= 1e-5
        R = p.T_kf_query[:3, :3]
        assert np.allclose(R.T @ R, np.eye(3), atol=1e-12)
    assert {"encode_query", "keyframe_tokens", "pairs"} <= set(out.timings_ms)


def test_estimator_without_cache_encodes_on_first_use(fx, tiny_weights, tiny_map, caplog):
    from reloc_ros.estimators import create
    from reloc_ros.estimators.base import Query

    q = _frame(60)
    cached = create("reloc3r", {"weights": str(tiny_weights), "config": fx["config"], "cache_dtype": "fp32"})
    cached.prepare(tiny_map)
    ref = cached.estimate(Query(q.image, q.camera), [0, 1, 2], tiny_map)
    # fp16 cache name differs -> no cache file for it -> keyframes encoded at query time
    fresh = create("reloc3r", {"weights": str(tiny_weights), "config": fx["config"], "cache_dtype": "fp16"})
    with caplog.at_level(logging.WARNING):
        fresh.prepare(tiny_map)
    assert "no token cache" in caplog.text
    out = fresh.estimate(Query(q.image, q.camera), [0, 1, 2], tiny_map)
    for a, b in zip(ref.pairs, out.pairs):
        assert np.abs(a.T_kf_query - b.T_kf_query).max() <= 1e-2  # fp16-rounded keyframe tokens


def test_estimator_ignores_cache_of_other_weights(fx, tiny_map, caplog):
    from reloc_ros.estimators import create

    other = create("reloc3r", {"allow_random_weights": True, "config": fx["config"], "cache_dtype": "fp32", "seed": 3})
    assert other.model_hash not in {p.name.split("-")[1] for p in tiny_map.cache_dir("reloc3r").iterdir()}
    with caplog.at_level(logging.WARNING):
        other.prepare(tiny_map)
    assert len(other._tokens) == 0  # the map's tokens belong to the fixture weights


def test_estimator_bad_input(fx, tiny_weights, tiny_map):
    from reloc_ros.estimators import create
    from reloc_ros.estimators.base import Query

    est = create("reloc3r", {"weights": str(tiny_weights), "config": fx["config"]})
    q = _frame(60)
    assert est.estimate(Query(q.image, q.camera), [], tiny_map).pairs == []
    with pytest.raises(InvalidInputError):
        est.estimate(Query(q.image, q.camera), [0, 99], tiny_map)
    with pytest.raises(InvalidInputError):
        est.estimate(Query(np.zeros((5, 5, 3), np.uint8), q.camera), [0], tiny_map)


def test_estimator_survives_corrupt_cache(fx, tiny_weights, tiny_map, tmp_path):
    import shutil

    from reloc_ros.estimators import create
    from reloc_ros.maps import KeyframeMap

    copy = tmp_path / "map"
    shutil.copytree(tiny_map.path, copy)
    for f in (copy / "cache" / "reloc3r").iterdir():
        f.write_bytes(f.read_bytes()[:100])  # truncated
    kmap = KeyframeMap.load(copy, verify=False)  # the map's own checksum would refuse it first
    est = create("reloc3r", {"weights": str(tiny_weights), "config": fx["config"], "cache_dtype": "fp32"})
    est.prepare(kmap)
    assert est._tokens == {}
    from reloc_ros.estimators.base import Query

    q = _frame(60)
    assert len(est.estimate(Query(q.image, q.camera), [0, 1], kmap).pairs) == 2


def test_preprocessing_follows_the_published_recipe():
    """224: PIL-Lanczos resize so the short side is 224 (long side round(224 * aspect)),
    centre 224x224 crop; 512: long side 512, crop to multiples of 16 around the centre."""
    from PIL import Image

    img = _img(480, 640, 7)
    got, _ = preprocess_image(img, 224)
    ref = np.asarray(Image.fromarray(img).resize((299, 224), Image.Resampling.LANCZOS))[:, 37:261]
    assert np.allclose(got, (ref.transpose(2, 0, 1) / 255.0 - 0.5) / 0.5, atol=1e-6)
    img = _img(300, 700, 8)  # -> 512 x 219 resized, crop 512 x 208 starting at row 5
    got, hw = preprocess_image(img, 512)
    ref = np.asarray(Image.fromarray(img).resize((512, 219), Image.Resampling.LANCZOS))[5:213]
    assert hw == (208, 512)
    assert np.allclose(got, (ref.transpose(2, 0, 1) / 255.0 - 0.5) / 0.5, atol=1e-6)


def test_estimator_onnxruntime_backend_matches_torch(fx, tiny_weights, tiny_map, tmp_path):
    pytest.importorskip("onnxruntime")
    from reloc_ros.estimators import create
    from reloc_ros.estimators.base import Query

    q = _frame(60)
    opts = {"weights": str(tiny_weights), "config": fx["config"], "cache_dtype": "fp32"}
    ref = create("reloc3r", opts)
    ort = create("reloc3r", {**opts, "backend": "onnxruntime", "artifacts_dir": str(tmp_path)})
    ref.prepare(tiny_map)
    ort.prepare(tiny_map)
    a = ref.estimate(Query(q.image, q.camera), [0, 1, 2], tiny_map)
    b = ort.estimate(Query(q.image, q.camera), [0, 1, 2], tiny_map)
    for pa, pb in zip(a.pairs, b.pairs):
        assert np.abs(pa.T_kf_query - pb.T_kf_query).max() <= 1e-4
    assert len(list(tmp_path.glob("*.onnx"))) == 2  # encoder + pairs graphs, exported once
