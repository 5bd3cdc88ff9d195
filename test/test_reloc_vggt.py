"""Reloc-VGGT: VGGT equivalence of ``dense``, the sparse masks and the keyframe KV cache,
the pose tokenizer input, Sim(3) and motion-averaging fusion, ONNX Runtime vs PyTorch,
and the ``vggt-fused`` estimator on a real (tiny) keyframe map."""
from __future__ import annotations


import numpy as np
import pytest

torch = pytest.importorskip("torch")

from reloc_ros.averaging import robust_motion_averaging  # noqa: E402
from reloc_ros.geometry import invert, pose_errors  # noqa: E402
from reloc_ros.models.reloc_vggt import (  # noqa: E402
    build_reloc_vggt,
    encode_known_poses,
    global_attention_mask,
    predicted_T_ref_cam,
    relative_pairs,
    sim3_localize,
)
from reloc_ros.models.vggt import build_vggt, extri_intri_to_pose_encoding, load_vggt_weights  # noqa: E402
from reloc_ros.types import InvalidInputError, Status  # noqa: E402

from conftest import SHARED, require  # noqa: E402
FIXTURE = SHARED / "fixtures" / "vggt_compact_io.pt"
MA_FIXTURE = SHARED / "fixtures" / "reloc3r_motion_averaging_io.npz"
SCENES = SHARED / "data" / "7scenes_redkitchen_0000_0499"
HW = (70, 98)



@pytest.fixture(scope="module")
def fx():
    require(FIXTURE)
    return torch.load(FIXTURE, weights_only=True)


def _reloc(fx, trained_tokenizer: bool = False, cache: int = 32):
    net = build_reloc_vggt(fx["config"], cache_capacity=cache)
    chk = load_vggt_weights(net, fx["state_dict"], optional_prefixes=("pose_tokenizer.",))
    assert chk.ok
    if trained_tokenizer:
        # Stand-in for a trained tokenizer: non-zero weights, so pose tokens matter.
        g = torch.Generator().manual_seed(5)
        with torch.no_grad():
            for p in net.pose_tokenizer.parameters():
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return net


def _inputs(K: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(1, 3, *HW, generator=g), torch.rand(1, K, 3, *HW, generator=g), torch.randn(1, K, 9, generator=g)


def test_dense_with_untrained_pose_tokens_is_vggt_exactly(fx):
    c = fx["cases"]["S3_140x196"]
    vggt = build_vggt(fx["config"])
    load_vggt_weights(vggt, fx["state_dict"])
    net = _reloc(fx)
    imgs = c["images"]  # [1, 3, 3, H, W]: two keyframes then the query
    enc = torch.randn(1, 2, 9, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = vggt.camera_head(vggt.aggregator(imgs)[0])
        with_tokens = net(imgs[:, 2], imgs[:, :2], enc, mask="dense")
        without = net(imgs[:, 2], imgs[:, :2], None, mask="dense")
    for a, b, r, f in zip(with_tokens["pose_enc_list"], without["pose_enc_list"], ref, c["pose_enc_list"]):
        assert torch.equal(a, r) and torch.equal(b, r)  # bit-identical to VGGT
        assert float((a - f).abs().max()) <= 1e-5  # and to the published code's outputs


def test_attention_mask_definitions():
    S, P = 4, 2  # three keyframes, query last
    frame = torch.arange(S).repeat_interleave(P)
    d = global_attention_mask(S, P, "dense")
    s = global_attention_mask(S, P, "star")
    c = global_attention_mask(S, P, "cached")
    assert d.all()
    for i in range(S * P):
        fi = frame[i]
        for j in range(S * P):
            fj = frame[j]
            q_row = fi == S - 1
            assert bool(s[i, j]) == bool(q_row or fj == fi or fj == S - 1)
            assert bool(c[i, j]) == bool(q_row or fj == fi)
    with pytest.raises(ValueError):
        global_attention_mask(S, P, "sparse")


@pytest.mark.parametrize("mask", ["dense", "star", "cached"])
def test_batched_masks_equal_the_explicit_masked_attention(fx, mask):
    net = _reloc(fx, trained_tokenizer=True)
    q, kf, enc = _inputs(4)
    with torch.no_grad():
        ref = net.forward_reference(q, kf, enc, mask=mask)
        out = net(q, kf, enc, mask=mask)
    assert float((out["camera_tokens"] - ref["camera_tokens"]).abs().max()) <= 1e-5
    for a, b in zip(out["pose_enc_list"], ref["pose_enc_list"]):
        assert float((a - b).abs().max()) <= 1e-5


@pytest.mark.parametrize("mask", ["dense", "star", "cached"])
def test_several_query_views_equal_the_explicit_masked_attention(fx, mask):
    """A rig capture's Q views go in as one query: every mask's kernel (the KV-cache path
    for ``cached``, warm and cold) equals the explicit mask with Q query frames; the views
    see each other; Q = 1 given as [B, 1, 3, H, W] is the single-view network exactly."""
    net = _reloc(fx, trained_tokenizer=True)
    q1, kf, enc = _inputs(3)
    views = torch.stack([q1[0], torch.rand(3, *HW, generator=torch.Generator().manual_seed(11)),
                         torch.rand(3, *HW, generator=torch.Generator().manual_seed(12))])[None]  # [1, 3, 3, H, W]
    with torch.no_grad():
        ref = net.forward_reference(views, kf, enc, mask=mask)
        out = net(views, kf, enc, mask=mask)
        assert out["pose_enc"].shape == (1, 6, 9)
        assert float((out["camera_tokens"] - ref["camera_tokens"]).abs().max()) <= 1e-5
        if mask == "cached":
            keys = ["a", "b", "c"]
            net(views, kf, enc, mask=mask, kf_keys=keys)
            warm = net(views, kf, enc, mask=mask, kf_keys=keys)
            assert float((warm["pose_enc"] - out["pose_enc"]).abs().max()) <= 1e-6
        # the first view's output depends on the other views (they attend to each other)
        alone = net(q1, kf, enc, mask=mask)
        assert float((alone["pose_enc"][0, 3] - out["pose_enc"][0, 3]).abs().max()) > 1e-6
        one = net(q1[:, None], kf, enc, mask=mask)
        assert torch.equal(one["pose_enc"], alone["pose_enc"])
    m = global_attention_mask(5, 1, "star", num_queries=2)  # keyframes 0-2, views 3-4
    assert m[0].tolist() == [True, False, False, True, True] and m[3].all() and m[4].all()


def test_sparse_masks_differ_from_dense_once_keyframes_see_each_other(fx):
    net = _reloc(fx, trained_tokenizer=True)
    q, kf, enc = _inputs(3)
    with torch.no_grad():
        outs = {m: net.forward_reference(q, kf, enc, mask=m)["camera_tokens"] for m in ("dense", "star", "cached")}
    assert float((outs["dense"] - outs["star"]).abs().max()) > 1e-6
    assert float((outs["star"] - outs["cached"]).abs().max()) > 1e-6


def test_cached_keyframe_tokens_do_not_depend_on_the_query_star_ones_do(fx):
    net = _reloc(fx, trained_tokenizer=True)
    q1, kf, enc = _inputs(3)
    q2 = torch.rand(1, 3, *HW, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        for mask, independent in (("cached", True), ("star", False)):
            a = net.forward_reference(q1, kf, enc, mask=mask)["tokens_list"]
            b = net.forward_reference(q2, kf, enc, mask=mask)["tokens_list"]
            diff = max(float((x[:, :3] - y[:, :3]).abs().max()) for x, y in zip(a, b))
            assert (diff == 0.0) if independent else (diff > 1e-6), (mask, diff)
            # the query's own tokens always depend on the query
            assert float((a[-1][:, 3] - b[-1][:, 3]).abs().max()) > 1e-6


def test_cached_warm_cache_equals_computation_without_cache(fx):
    net = _reloc(fx, trained_tokenizer=True, cache=8)
    _, kf, enc = _inputs(3)
    keys = ["a", "b", "c"]
    loads = []

    def loader(idx):
        loads.append(list(idx))
        return kf[0, list(idx)]

    with torch.no_grad():
        net(_inputs(3, seed=1)[0], loader, enc, mask="cached", kf_keys=keys)  # cold: fills the cache
        assert loads == [[0, 1, 2]] and net.kv_cache.info()["entries"] == 3
        for seed in (2, 3):  # consecutive queries against the same keyframes
            q = _inputs(3, seed=seed)[0]
            warm = net(q, loader, enc, mask="cached", kf_keys=keys)
            cold = net(q, kf, enc, mask="cached", kf_keys=None)  # no cache at all
            ref = net.forward_reference(q, kf, enc, mask="cached")
            assert torch.equal(warm["pose_enc"], cold["pose_enc"])
            assert float((warm["pose_enc"] - ref["pose_enc"]).abs().max()) <= 1e-5
        assert loads == [[0, 1, 2]]  # warm queries never loaded a keyframe image
        assert net.kv_cache.hits == 6
        # Different pose tokens (another reference / scale) are another cache entry...
        net(q, loader, enc * 2, mask="cached", kf_keys=keys)
        assert loads[-1] == [0, 1, 2]
        # ...a new keyframe set reuses the keyframes it shares, and the LRU stays bounded.
        net(q, loader, enc[:, [1, 0, 2]], mask="cached", kf_keys=["b", "a", "d"])
        assert net.kv_cache.info()["entries"] <= 8
        # New weights invalidate the cache.
        net.load_state_dict(net.state_dict())
        assert net.kv_cache.info()["entries"] == 0
    with pytest.raises(InvalidInputError, match="one query at a time"):
        net(torch.rand(2, 3, *HW), torch.rand(2, 3, 3, *HW), None, mask="cached")
    for mask in ("dense", "star", "cached"):
        with pytest.raises(InvalidInputError, match="kf_pose_enc"):
            net(q, kf, enc[:, :2], mask=mask)
        with pytest.raises(InvalidInputError, match="keyframes"):
            net(q, kf[:, :, :, :14], None, mask=mask)


def test_known_poses_are_encoded_relative_to_the_reference_and_scale_normalised():
    from scipy.spatial.transform import Rotation

    rng = np.random.default_rng(0)
    T = np.tile(np.eye(4), (4, 1, 1))
    T[:, :3, :3] = Rotation.random(4, random_state=0).as_matrix()
    T[:, :3, 3] = rng.normal(size=(4, 3)) * 3.0
    Kmat = np.tile(np.array([[100.0, 0, 49], [0, 100.0, 35], [0, 0, 1]]), (4, 1, 1))
    enc, scale = encode_known_poses(T, Kmat, HW)
    T_ref = invert(T[0]) @ T
    assert scale == pytest.approx(np.linalg.norm(T_ref[1:, :3, 3], axis=1).mean())
    assert np.allclose(enc[0, :7], [0, 0, 0, 0, 0, 0, 1], atol=1e-6)  # the reference itself
    # decoding gives back the normalised relative poses (camera-to-reference)
    dec = predicted_T_ref_cam(torch.from_numpy(enc), HW)
    T_n = T_ref.copy()
    T_n[:, :3, 3] /= scale
    assert np.allclose(dec, T_n, atol=1e-5)
    # the same poses moved by any rigid motion of the world encode identically
    G = np.eye(4)
    G[:3, :3] = Rotation.random(random_state=7).as_matrix()
    G[:3, 3] = [5, -2, 1]
    assert np.allclose(encode_known_poses(G @ T, Kmat, HW)[0], enc, atol=1e-5)
    fov = extri_intri_to_pose_encoding(torch.eye(4)[None, :3], torch.from_numpy(Kmat[:1]), HW)[0, 7:]
    assert np.allclose(enc[:, 7:], fov.numpy(), atol=1e-6)
    with pytest.raises(InvalidInputError):
        encode_known_poses(np.full((2, 4, 4), np.nan), None, HW)


def _simulated_predictions(db, qg, s=0.37, seed=0):
    """Exact VGGT-style predictions: camera-to-reference poses in an arbitrary scale."""
    T_ref = invert(db[0]) @ np.concatenate([db, qg[None]])
    T_ref[:, :3, 3] *= s
    return T_ref


@pytest.mark.parametrize("n", [2, 5, 10])
def test_sim3_and_motion_averaging_recover_the_query_from_exact_predictions(n):
    require(MA_FIXTURE)
    f = np.load(MA_FIXTURE, allow_pickle=False)
    db, qg = f[f"n{n}_poses_db"], f[f"n{n}_q_gt"]
    P = _simulated_predictions(db, qg)
    res = sim3_localize(db, P)
    assert res.status is Status.OK and res.inlier_mask.all()
    t_err, r_err = pose_errors(res.T_world_cam, qg)
    assert t_err < 1e-6 and r_err < 1e-5
    assert res.scale == pytest.approx(1 / 0.37)
    ev = np.linalg.eigvalsh(res.covariance)
    assert np.all(ev > 0)
    fr = robust_motion_averaging(db, relative_pairs(P))
    t_err, r_err = pose_errors(fr.T_world_cam, qg)
    assert t_err < 1e-5 and r_err < 1e-5


def test_sim3_rejects_outlier_keyframes_and_needs_two_keyframes():
    require(MA_FIXTURE)
    f = np.load(MA_FIXTURE, allow_pickle=False)
    db, qg = f["n10_poses_db"], f["n10_q_gt"]
    P = _simulated_predictions(db, qg)
    P[3, :3, 3] += 2.0  # a wrong keyframe position
    P[7, :3, :3] = P[7, :3, :3] @ np.array([[0, -1, 0], [1, 0, 0], [0, 0, 1.0]])  # a wrong rotation
    res = sim3_localize(db, P)
    assert not res.inlier_mask[3] and not res.inlier_mask[7] and res.inlier_mask.sum() == 8
    t_err, r_err = pose_errors(res.T_world_cam, qg)
    assert t_err < 1e-6 and r_err < 1e-5
    one = sim3_localize(db[:1], P[[0, 10]])
    assert one.status is Status.NOT_LOCALIZED and one.T_world_cam is None and "2" in one.message
    with pytest.raises(InvalidInputError):
        sim3_localize(db, P[:5])


@pytest.mark.parametrize("mask", ["dense", "star", "cached"])
def test_onnxruntime_matches_pytorch(fx, mask, tmp_path):
    pytest.importorskip("onnxruntime")
    from reloc_ros.backends.vggt_runner import RelocVGGTRunner

    net = _reloc(fx, trained_tokenizer=True)
    rt = RelocVGGTRunner(net, "torch", mask=mask)
    ro = RelocVGGTRunner(net, "onnxruntime", mask=mask, artifacts_dir=tmp_path)
    for K in (1, 3):  # one exported graph, a dynamic number of keyframes
        q, kf, enc = _inputs(K, seed=K)
        keys = list(range(K))
        b = ro.predict(q, kf, enc, kf_keys=keys)  # first: exports from a fresh network
        a = rt.predict(q, kf, enc, kf_keys=keys)
        assert a.shape == b.shape == (1, K + 1, 9)
        assert float((a - b).abs().max()) <= 1e-4
    if mask == "cached":
        # key 0 came with other pose tokens at K = 1: a separate entry, no false hit
        assert ro.cache.hits == 0 and ro.cache.info()["entries"] == 4
        b2 = ro.predict(q, kf, enc, kf_keys=keys)  # warm
        assert ro.cache.hits == 3 and torch.equal(b, b2)


# ----------------------------------------------------------------------------- estimator


@pytest.fixture(scope="module")
def tiny_map(tmp_path_factory, fx):
    require(SCENES)
    from safetensors.torch import save_file

    from reloc_ros.datasets import open_dataset
    from reloc_ros.maps import KeyframeMap, MapBuildConfig, build_map

    root = tmp_path_factory.mktemp("vggt_map")
    ds = open_dataset("7scenes", str(SCENES), frames="0:250:25", use_depth=False)
    path = build_map(ds, root / "map", MapBuildConfig(use_depth=False, triangulate=False, image_max_size=160))
    weights = root / "compact.safetensors"
    save_file({k: v.contiguous() for k, v in fx["state_dict"].items()}, str(weights))
    query = open_dataset("7scenes", str(SCENES), frames="100:101", use_depth=False)[0]
    return KeyframeMap.load(path), weights, query


def test_rig_capture_goes_in_as_one_multi_view_query(tiny_map, fx):
    """A rig capture's views are one query of the network (issue 9, item 5): the views'
    rows come from one forward in which they attend to each other, and RigLocalizer
    takes that path for vggt-fused."""
    from reloc_ros.datasets import open_dataset
    from reloc_ros.estimators import Query, create
    from reloc_ros.geometry import make_T
    from reloc_ros.localizer import LocalizerConfig
    from reloc_ros.rig import CameraView, RigConfig, RigLocalizer

    kmap, weights, q = tiny_map
    q2 = open_dataset("7scenes", str(SCENES), frames="160:161", use_depth=False)[0]
    opts = dict(weights=str(weights), model_config=fx["config"], image_width=98, max_keyframes=3, mask="cached")
    est = create("vggt-fused", opts)
    ids = [4, 3, 5]
    views = [Query(q.image, q.camera), Query(q2.image, q2.camera)]
    kf_ids, both, _ = est._forward(views, ids, kmap)
    _, alone, _ = est._forward(views[:1], ids, kmap)
    assert kf_ids == ids and both.shape == (5, 4, 4) and alone.shape == (4, 4, 4)
    assert np.abs(both[3] - alone[3]).max() > 1e-6  # the first view attends to the second
    outs = est.estimate_views(views, ids, kmap)
    assert len(outs) == 2 and all(o.absolute is not None or "Sim(3)" in o.message for o in outs)
    cfg = LocalizerConfig(estimator="vggt-fused", estimator_options=opts, top_k=3)
    rig = RigLocalizer(kmap, cfg)
    T_b1 = make_T(np.eye(3), [0.1, 0.0, 0.0])
    res = rig.localize([CameraView("a", q.image, q.camera, np.eye(4)), CameraView("b", q2.image, q2.camera, T_b1)])
    assert res.method == "multi_view", res.message
    assert all(r.keyframe_ids for r in res.cameras)
    assert res.localized == (res.T_world_base is not None) and (res.localized or res.message)
    assert RigLocalizer(kmap, cfg, RigConfig(method="per_camera")).localize(
        [CameraView("a", q.image, q.camera, np.eye(4))]).method == "per_camera_fusion"
    with pytest.raises(ValueError, match="multi_view"):
        RigLocalizer(kmap, LocalizerConfig(), RigConfig(method="multi_view"))


def test_estimator_refuses_without_weights_and_never_downloads(tmp_path):
    from reloc_ros.estimators import create

    with pytest.raises(ValueError, match="weights"):
        create("vggt-fused", {})
    with pytest.raises(ValueError, match="does not exist"):
        create("vggt-fused", {"weights": str(tmp_path / "model.pt")})
    with pytest.raises(ValueError, match="unknown"):
        create("vggt-fused", {"allow_random_weights": True, "maks": "star"})


def test_estimator_on_a_real_map(tiny_map, fx):
    from reloc_ros.estimators import Query, create
    from reloc_ros.geometry import is_rigid

    kmap, weights, q = tiny_map
    ids = [4, 3, 5, 2]
    opts = dict(weights=str(weights), model_config=fx["config"], image_width=98, max_keyframes=3)
    est = create("vggt-fused", dict(opts, fusion="motion_averaging", mask="cached"))
    out1 = est.estimate(Query(q.image, q.camera), ids, kmap)
    assert [p.keyframe_id for p in out1.pairs] == [4, 3, 5]  # first max_keyframes, reference first
    assert all(is_rigid(p.T_kf_query) and not p.metric for p in out1.pairs)
    assert est.cache_info()["misses"] == 3
    out2 = est.estimate(Query(q.image, q.camera), [3, 5, 4], kmap)  # same set, reference 4 kept
    assert est.cache_info()["hits"] == 3
    assert [p.keyframe_id for p in out2.pairs] == [4, 3, 5]
    for a, b in zip(out1.pairs, out2.pairs):
        assert np.allclose(a.T_kf_query, b.T_kf_query, atol=1e-9)
    # Same network output through the 'star' and 'dense' masks: different attention, same API.
    for mask in ("star", "dense"):
        o = create("vggt-fused", dict(opts, fusion="motion_averaging", mask=mask)).estimate(
            Query(q.image, q.camera), ids, kmap)
        assert len(o.pairs) == 3 and "network" in o.timings_ms
    # Sim(3): with random weights the keyframes rarely agree; either a pose or a reason.
    o = create("vggt-fused", dict(opts, mask="cached")).estimate(Query(q.image, q.camera), ids, kmap)
    assert (o.absolute is not None and is_rigid(o.absolute.T_world_cam)) or "Sim(3)" in o.message
    with pytest.raises(InvalidInputError):
        est.estimate(Query(q.image[:, :, 0].astype(np.float32), q.camera), ids, kmap)
    with pytest.raises(InvalidInputError):
        est.estimate(Query(q.image, q.camera), [999], kmap)
    assert est.estimate(Query(q.image, q.camera), [], kmap).message
