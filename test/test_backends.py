"""Backends: ONNX export with a dynamic number of keyframes and ONNX Runtime vs PyTorch,
PyTorch reduced precisions, and TensorRT's availability checks and engine cache key."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnxruntime")

from reloc_ros.backends import BackendError, BackendUnavailableError, resolve_device  # noqa: E402
from reloc_ros.backends.common import TOLERANCE  # noqa: E402
from reloc_ros.backends.onnx_backend import OnnxRunner  # noqa: E402
from reloc_ros.backends.reloc3r_runner import Reloc3rRunner, export_reloc3r_onnx  # noqa: E402
from reloc_ros.models import build  # noqa: E402

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
FIXTURE = SHARED / "fixtures" / "reloc3r_tiny_io.pt"


@pytest.fixture(scope="module")
def fx():
    if not FIXTURE.exists():
        pytest.skip(f"shared fixture {FIXTURE} is absent (expected ../shared next to the repo)")
    return torch.load(FIXTURE, weights_only=True)


def _net(fx):
    net = build("reloc3r", fx["config"])
    net.load_state_dict(fx["state_dict"], strict=True)
    return net


def _imgs(n, h=224, w=224, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, h, w, generator=g) * 2 - 1


def _maxdiff(a, b) -> float:
    return float((torch.as_tensor(a).float() - torch.as_tensor(b).float()).abs().max())


def test_full_graph_onnxruntime_matches_torch_for_any_k(fx, tmp_path):
    """The whole network exported once (K = 2) runs for K = 1 and K = 3 in ONNX Runtime
    and matches PyTorch fp32 on the raw head outputs (the SVD step stays outside)."""
    net = _net(fx)
    path = export_reloc3r_onnx(net, "full", tmp_path / "full.onnx", img_hw=(224, 224))
    ort = OnnxRunner(path)
    assert ort.input_names == ["img1", "img2"] and ort.output_names == ["t1", "rot9_1", "t2", "rot9_2"]
    for K in (1, 3):
        a, b = _imgs(K, seed=K), _imgs(K, seed=10 + K)
        out = ort.run({"img1": a.numpy(), "img2": b.numpy()})
        with torch.no_grad():
            p1, p2 = net({"img": a}, {"img": b})
        assert out["t2"].shape == (K, 3) and out["rot9_2"].shape == (K, 9)
        for name, ref in (("t1", p1["t_raw"]), ("rot9_1", p1["rot9_raw"]), ("t2", p2["t_raw"]), ("rot9_2", p2["rot9_raw"])):
            assert _maxdiff(out[name], ref) <= TOLERANCE["fp32"], name


def test_fixture_case_through_onnxruntime(fx, tmp_path):
    """The recorded official outputs are reproduced through ONNX Runtime (landscape 384x512)."""
    from reloc_ros.models.reloc3r import raw_to_pose

    c = fx["cases"]["384x512"]
    path = export_reloc3r_onnx(_net(fx), "full", tmp_path / "full512.onnx", img_hw=(384, 512))
    out = OnnxRunner(path).run({"img1": c["img1"].numpy(), "img2": c["img2"].numpy()})
    assert _maxdiff(out["rot9_2"], c["intermediates"]["head2_rot9_raw"]) <= 1e-4
    pose2 = raw_to_pose(torch.from_numpy(out["t2"]), torch.from_numpy(out["rot9_2"]))
    assert _maxdiff(pose2, c["pose2"]) <= 1e-4


def test_runner_onnxruntime_cached_stages_match_torch(fx, tmp_path):
    """Encoder and pairs graphs (query tokens broadcast to K keyframes) vs the torch runner."""
    ref = Reloc3rRunner(_net(fx), "torch", "fp32")
    ort = Reloc3rRunner(_net(fx), "onnxruntime", "fp32", artifacts_dir=tmp_path)
    imgs = _imgs(5, seed=3)
    f_ref, f_ort = ref.encode(imgs), ort.encode(imgs)
    assert _maxdiff(f_ref, f_ort) <= TOLERANCE["fp32"]
    for K in (4, 1):
        t_ref, r_ref = ref.pairs(f_ref[:K], (14, 14), f_ref[4:], (14, 14))
        t_ort, r_ort = ort.pairs(f_ref[:K], (14, 14), f_ref[4:], (14, 14))
        assert t_ort.shape == (K, 3)
        assert _maxdiff(t_ref, t_ort) <= TOLERANCE["fp32"] and _maxdiff(r_ref, r_ort) <= TOLERANCE["fp32"]
    names = sorted(p.name for p in tmp_path.iterdir())
    assert len(names) == 2 and all(ort.model_hash in n for n in names)  # one graph per stage, reused


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_torch_reduced_precision_close_to_fp32(fx, precision):
    ref = Reloc3rRunner(_net(fx), "torch", "fp32")
    low = Reloc3rRunner(_net(fx), "torch", precision)
    assert low.net.patch_embed.proj.weight.dtype != torch.float32
    assert low.net.pose_head.fc_rot.weight.dtype == torch.float32  # the head stays fp32, as published
    imgs = _imgs(3, seed=4)
    f_ref, f_low = ref.encode(imgs), low.encode(imgs)
    assert _maxdiff(f_ref, f_low) <= TOLERANCE[precision]
    t_ref, r_ref = ref.pairs(f_ref[:2], (14, 14), f_ref[2:], (14, 14))
    t_low, r_low = low.pairs(f_low[:2], (14, 14), f_low[2:], (14, 14))
    assert _maxdiff(t_ref, t_low) <= TOLERANCE[precision] and _maxdiff(r_ref, r_low) <= TOLERANCE[precision]


def test_onnx_runner_errors(fx, tmp_path):
    path = export_reloc3r_onnx(_net(fx), "encoder", tmp_path / "enc.onnx", img_hw=(224, 224))
    r = OnnxRunner(path)
    with pytest.raises(BackendError, match="missing ONNX inputs"):
        r.run({})
    with pytest.raises(BackendError):
        OnnxRunner(tmp_path / "nope.onnx")
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a graph")
    with pytest.raises(BackendError):
        OnnxRunner(bad)


def test_runner_argument_errors(fx):
    with pytest.raises(ValueError):
        Reloc3rRunner(_net(fx), "tvm")
    with pytest.raises(ValueError):
        Reloc3rRunner(_net(fx), "onnxruntime")  # needs an artifacts_dir
    with pytest.raises(BackendError):
        Reloc3rRunner(_net(fx), "onnxruntime", "bf16", artifacts_dir="/tmp/x")


# ----------------------------------------------------------------------------- devices / TensorRT


def _has_cuda() -> bool:
    return torch.cuda.is_available()


def _trt_importable() -> bool:
    from reloc_ros.backends.tensorrt_backend import import_tensorrt

    try:
        import_tensorrt()
        return True
    except BackendUnavailableError:
        return False


@pytest.mark.skipif(_has_cuda(), reason="this machine has CUDA")
def test_cuda_request_without_gpu_is_a_clear_error(fx):
    with pytest.raises(BackendUnavailableError, match="CUDA"):
        resolve_device("cuda")
    with pytest.raises(BackendUnavailableError):
        Reloc3rRunner(_net(fx), "torch", "fp16", device="cuda")


def test_tensorrt_unavailable_is_a_clear_error(fx, tmp_path):
    if _trt_importable() and _has_cuda():
        pytest.skip("TensorRT and a GPU are present: covered by test_tensorrt_engine_matches_torch")
    with pytest.raises(BackendUnavailableError) as e:
        Reloc3rRunner(_net(fx), "tensorrt", "fp16", device="cpu", artifacts_dir=tmp_path)
    msg = str(e.value)
    assert ("tensorrt_rtx" in msg and "tensorrt" in msg) or "CUDA" in msg


def test_engine_cache_key_tracks_every_input(tmp_path):
    from reloc_ros.backends.tensorrt_backend import engine_cache_key

    onnx_a = tmp_path / "a.onnx"
    onnx_a.write_bytes(b"graph-a")
    onnx_b = tmp_path / "b.onnx"
    onnx_b.write_bytes(b"graph-b")
    prof = {"feat_kf": ((1, 196, 1024), (10, 196, 1024), (20, 196, 1024))}
    base = engine_cache_key("h1", onnx_a, "NVIDIA H100-sm90", "tensorrt", "10.9", prof)
    assert base == engine_cache_key("h1", onnx_a, "NVIDIA H100-sm90", "tensorrt", "10.9", prof)
    variants = [
        engine_cache_key("h2", onnx_a, "NVIDIA H100-sm90", "tensorrt", "10.9", prof),
        engine_cache_key("h1", onnx_b, "NVIDIA H100-sm90", "tensorrt", "10.9", prof),
        engine_cache_key("h1", onnx_a, "NVIDIA RTX 4090-sm89", "tensorrt", "10.9", prof),
        engine_cache_key("h1", onnx_a, "NVIDIA H100-sm90", "tensorrt_rtx", "1.7", prof),
        engine_cache_key("h1", onnx_a, "NVIDIA H100-sm90", "tensorrt", "10.9", {"feat_kf": ((1, 196, 1024),) * 3}),
        engine_cache_key("h1", onnx_a, "NVIDIA H100-sm90", "tensorrt", "10.9", prof, precision="fp32"),
    ]
    assert len({base, *variants}) == 7


@pytest.mark.skipif(not (_has_cuda() and _trt_importable()), reason="needs an NVIDIA GPU with TensorRT / TensorRT-RTX")
def test_tensorrt_engine_matches_torch(fx, tmp_path):  # pragma: no cover - no GPU in CI
    ref = Reloc3rRunner(_net(fx), "torch", "fp32", device="cuda")
    trt = Reloc3rRunner(_net(fx), "tensorrt", "fp16", device="cuda", artifacts_dir=tmp_path, max_batch=8)
    imgs = _imgs(5, seed=7)
    f_ref, f_trt = ref.encode(imgs), trt.encode(imgs)
    assert _maxdiff(f_ref, f_trt) <= TOLERANCE["fp16"]
    t_ref, r_ref = ref.pairs(f_ref[:4], (14, 14), f_ref[4:], (14, 14))
    t_trt, r_trt = trt.pairs(f_ref[:4], (14, 14), f_ref[4:], (14, 14))
    assert _maxdiff(t_ref, t_trt) <= TOLERANCE["fp16"] and _maxdiff(r_ref, r_trt) <= TOLERANCE["fp16"]
    engines = list((tmp_path / "engines").glob("*.engine"))
    assert engines and np.all([e.stat().st_size > 0 for e in engines])
