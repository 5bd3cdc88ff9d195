"""Parallel and distributed map building (reloc_ros.map_build): the map equals the
single-process one for the local process pool and for a local Ray instance."""
import dataclasses
import io
import os

import numpy as np
import pytest

from reloc_ros.demo.scene import ProceduralRoom, RoomConfig, demo_camera, orbit_poses, render_frames
from reloc_ros.features import FeatureConfig, SiftExtractor, match_descriptors
from reloc_ros.map_build import ProcessExecutor, Progress, SerialExecutor, make_executor, plan_regions
from reloc_ros.maps import POINT_DEPTH, POINT_TRIANGULATED, KeyframeMap, MapBuildConfig, PairMatcher, build_map
from reloc_ros.types import InvalidInputError, PosedFrame

try:
    import ray
except ImportError:  # the Ray tests skip; everything else runs
    ray = None
needs_ray = pytest.mark.skipif(ray is None, reason="ray is not installed (requirements.txt lists it; make setup)")


@pytest.fixture(scope="module")
def room_frames():
    """10 small rendered frames around the room: depth on every other one (the rest are
    triangulated across frames), and one frame whose pose is not rigid (skipped)."""
    room = ProceduralRoom(RoomConfig())
    frames = render_frames(room, orbit_poses(room, 10), demo_camera(320, 240, 262.5), "kf")
    for fr in frames[1::2]:
        fr.depth = fr.depth_camera = fr.T_cam_depth = None
    bad = frames[0].T_world_cam.copy()
    bad[:3, :3] *= 2.0
    frames.insert(4, PosedFrame("not_rigid", frames[0].image, bad, frames[0].camera))
    return frames


def _fresh(frames):
    """Copies with their own pose arrays: build_map stores the checked (re-orthonormalised)
    pose into each frame it is given, and every build here must start from the same input."""
    return [dataclasses.replace(f, T_world_cam=f.T_world_cam.copy()) for f in frames]


def _cfg(workers, ray_address=""):
    return MapBuildConfig(workers=workers, ray_address=ray_address, features=FeatureConfig(max_keypoints=1024))


@pytest.fixture(scope="module")
def serial_map(room_frames, tmp_path_factory):
    return KeyframeMap.load(build_map(_fresh(room_frames), tmp_path_factory.mktemp("serial") / "m", _cfg(1)))


def _assert_same_map(a: KeyframeMap, b: KeyframeMap):
    assert b.names == a.names
    assert b.manifest["skipped_frames"] == a.manifest["skipped_frames"]
    np.testing.assert_array_equal(b.T_world_cam, a.T_world_cam)
    for i in range(a.num_keyframes):
        fa, fb = a.features(i), b.features(i)
        np.testing.assert_array_equal(fb.keypoints, fa.keypoints)
        np.testing.assert_array_equal(fb.descriptors, fa.descriptors)
        np.testing.assert_array_equal(b.point_sources(i), a.point_sources(i))
        np.testing.assert_allclose(b.points3d(i), a.points3d(i), rtol=0, atol=1e-5, equal_nan=True)
    # float32 unit vectors: BLAS with 1 thread (workers) or several (sequential) rounds the
    # VLAD sums differently in the last bits (up to ~1e-6 measured on KITTI)
    np.testing.assert_allclose(np.asarray(b.global_descriptors), np.asarray(a.global_descriptors), atol=1e-5)
    for key in ("num_points_from_depth", "num_points_triangulated"):
        assert b.manifest[key] == a.manifest[key]


def test_serial_map_has_depth_and_triangulated_points(serial_map):
    # the comparison below is only meaningful if both stages produced points
    assert serial_map.num_keyframes == 10
    assert serial_map.manifest["skipped_frames"][0][0] == "not_rigid"
    assert serial_map.manifest["num_points_from_depth"] > 1000
    assert serial_map.manifest["num_points_triangulated"] > 500
    srcs = [serial_map.point_sources(i) for i in range(serial_map.num_keyframes)]
    assert any((s == POINT_TRIANGULATED).any() for s in srcs[1::2])  # frames without depth
    assert all((s == POINT_DEPTH).any() for s in srcs[0::2])


def test_process_pool_build_equals_serial(room_frames, serial_map, tmp_path):
    cache: dict = {}
    kmap = KeyframeMap.load(build_map(_fresh(room_frames), tmp_path / "m", _cfg(2), feature_cache=cache))
    _assert_same_map(serial_map, kmap)
    # the caller's cache was filled from the workers: features per frame, matches per pair
    assert sum(isinstance(k, str) for k in cache) == 10
    assert any(isinstance(k, tuple) and k[0] == "matches" for k in cache)
    # and a rebuild from that cache (nothing extracted or matched again) is the same map
    again = KeyframeMap.load(build_map(_fresh(room_frames), tmp_path / "m2", _cfg(2), feature_cache=cache))
    _assert_same_map(serial_map, again)


def test_pair_matcher_matches_each_pair_once_with_the_per_pair_result(room_frames):
    cfg = _cfg(1)
    frames = [f for f in room_frames if f.name != "not_rigid"][:4]
    roots = [SiftExtractor(cfg.features)(f.image).root() for f in frames]
    names = [f.name for f in frames]
    rng = np.random.default_rng(1)
    # keyframes 0, 1 need every point (RGB-only), 2, 3 a third (depth elsewhere)
    need = {i: np.ones(len(r), bool) if i < 2 else rng.random(len(r)) < 0.33 for i, r in enumerate(roots)}
    pairs = [(0, 1), (1, 0), (0, 2), (2, 0), (2, 3), (3, 1)]
    cache: dict = {}
    match = PairMatcher(roots, need, cfg, names, pairs, cache)
    for i, j in pairs:
        got = match(i, [j])[j]
        full = match_descriptors(roots[i], roots[j], cfg.features.ratio, cfg.features.mutual)
        np.testing.assert_array_equal(got[np.lexsort(got.T[::-1])], full[need[i][full[:, 0]]])
    # (0, 1) and (1, 0) came from one GEMM and both went to the caller's cache; the
    # subset-matched pairs did not (the cache holds full-row matches only)
    assert {("matches", names[0], names[1]), ("matches", names[1], names[0])} <= set(cache)
    assert ("matches", names[2], names[3]) not in cache


def test_worker_errors_reach_the_caller(room_frames, tmp_path):
    bad = PosedFrame("float_image", room_frames[0].image.astype(np.float32), room_frames[0].T_world_cam,
                     room_frames[0].camera)
    with pytest.raises(InvalidInputError, match="unsupported image dtype"):
        build_map(_fresh(room_frames[:3]) + [bad], tmp_path / "m", _cfg(2))
    assert not (tmp_path / "m").exists()


def _pid_and_limits():
    from reloc_ros.threads import thread_limits

    return os.getpid(), thread_limits()


def test_process_workers_run_elsewhere_with_bounded_threads():
    with ProcessExecutor(2, threads=1) as ex:
        got = list(ex.imap(_pid_and_limits, [()] * 6))
    assert all(pid != os.getpid() for pid, _ in got)
    # BLAS / OpenCV / OpenMP capped per worker, so 2 workers do not put 2 x cores threads on the cores
    for _, limits in got:
        assert limits["opencv"] == 1 and limits["faiss_openmp"] == 1
        assert all(v == 1 for k, v in limits.items() if k.startswith("blas:"))


def test_executor_choice_and_regions():
    assert isinstance(make_executor(1), SerialExecutor)
    assert isinstance(make_executor(4, items=1), SerialExecutor)  # one item: no pool
    with make_executor(2, items=10) as ex:
        assert isinstance(ex, ProcessExecutor) and ex.workers == 2
    with pytest.raises(ValueError, match="workers must be >= 0"):
        make_executor(-1)
    with pytest.raises(ValueError, match="workers must be >= 0"):
        MapBuildConfig(workers=-2).validate()
    # regions cover every keyframe once and are spatially compact: two clusters 10 m apart
    T = np.tile(np.eye(4), (40, 1, 1))
    T[:, 0, 3] = np.r_[np.linspace(0, 1, 20), np.linspace(10, 11, 20)][np.random.default_rng(0).permutation(40)]
    regions = plan_regions(T, range(40), workers=2)
    assert sorted(sum(regions, [])) == list(range(40)) and len(regions) == 2
    for r in regions:
        assert np.ptp(T[r, 0, 3]) <= 1.0
    regions = plan_regions(T, range(40), workers=2, max_region=5)
    assert sorted(sum(regions, [])) == list(range(40)) and len(regions) == 8


def test_progress_prints_count_rate_and_eta():
    out = io.StringIO()
    p = Progress(4, "map build: test", stream=out, delay_s=0.0)
    p.log_interval_s = 0.0
    p.update()
    p.update(3)
    p.close()
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("map build: test [#####") and "1/4" in lines[0] and "ETA" in lines[0]
    assert "4/4 100%" in lines[-1] and "ETA 0.0 s" in lines[-1]
    quiet = io.StringIO()
    q = Progress(4, "short", stream=quiet)  # default delay: a short stage prints nothing
    q.update(4)
    q.close()
    assert quiet.getvalue() == ""


@pytest.fixture(scope="module")
def ray_session():
    yield
    if ray.is_initialized():
        ray.shutdown()


@needs_ray
def test_local_ray_build_equals_serial(room_frames, serial_map, tmp_path, ray_session):
    kmap = KeyframeMap.load(build_map(_fresh(room_frames), tmp_path / "m", _cfg(2, "local")))
    assert ray.is_initialized() and ray.cluster_resources().get("CPU", 0) >= 1
    _assert_same_map(serial_map, kmap)
    bad = PosedFrame("float_image", room_frames[0].image.astype(np.float32), room_frames[0].T_world_cam,
                     room_frames[0].camera)
    with pytest.raises(InvalidInputError, match="unsupported image dtype"):
        build_map(_fresh(room_frames[:3]) + [bad], tmp_path / "bad", _cfg(2, "local"))
