import numpy as np
import pytest

from reloc_ros.datasets import open_dataset
from reloc_ros.geometry import pose_errors
from reloc_ros.localizer import Localizer, LocalizerConfig
from reloc_ros.types import Camera, Status


@pytest.fixture(scope="module")
def loc(small_depth_map):
    return Localizer.from_map(small_depth_map)


@pytest.fixture(scope="module")
def queries(seven_scenes):
    return open_dataset("7scenes", seven_scenes, frames="2:100:12", use_depth=False)


def test_queries_between_keyframes_localize_to_centimetres(loc, queries):
    errs, covs = [], []
    for i in range(len(queries)):
        q = queries[i]
        r = loc.localize(q.image, q.camera)
        assert r.status is Status.OK, r.message
        errs.append(pose_errors(r.T_world_cam, q.T_world_cam))
        assert r.covariance.shape == (6, 6) and np.all(np.linalg.eigvalsh(r.covariance) > 0)
        covs.append(np.diag(r.covariance))
        assert 0 < r.confidence <= 1 and r.keyframe_ids and r.timings_ms["total"] > 0
        assert {"features", "retrieval", "estimate", "fusion"} <= set(r.timings_ms)
    t, a = np.array(errs).T
    assert np.median(t) < 0.02 and np.median(a) < 0.5
    assert np.ptp(np.array(covs), axis=0).max() > 0  # derived per query, not a constant


def test_essential_matrix_path_with_robust_averaging(small_depth_map, queries):
    loc = Localizer.from_map(small_depth_map, LocalizerConfig.from_dict(
        {"estimator_options": {"mode": "essential"}}))
    q = queries[3]
    r = loc.localize(q.image, q.camera)
    assert r.localized and len(r.keyframe_ids) >= 2
    t, a = pose_errors(r.T_world_cam, q.T_world_cam)
    assert t < 0.15 and a < 2.0


def test_bad_queries_give_clear_statuses(loc, queries):
    q = queries[0]
    wrong_size = loc.localize(q.image, Camera(q.camera.K, 320, 240))
    assert wrong_size.status is Status.ERROR and "camera says" in wrong_size.message
    nan_cam = loc.localize(q.image, Camera(np.full((3, 3), np.nan), 640, 480))
    assert nan_cam.status is Status.ERROR
    blank = loc.localize(np.zeros((480, 640, 3), np.uint8), q.camera)
    assert blank.status is Status.NOT_LOCALIZED and not blank.localized
    noise = np.random.default_rng(0).integers(0, 255, (480, 640, 3), dtype=np.uint8)
    r = loc.localize(noise, q.camera)  # plenty of features, zero true matches
    assert r.status is Status.NOT_LOCALIZED, (r.status, r.message)
    assert loc.localize(q.image[:, :, 0].copy(), q.camera).localized  # grey works too


def test_config_is_validated_at_the_boundary():
    with pytest.raises(ValueError, match="estimator"):
        LocalizerConfig.from_dict({"estimator": "magic"})
    with pytest.raises(ValueError, match="unknown"):
        LocalizerConfig.from_dict({"topk": 3})
    with pytest.raises(ValueError, match="top_k"):
        LocalizerConfig.from_dict({"top_k": 0})
