import json
import shutil

import numpy as np
import pytest

from reloc_ros.datasets import open_dataset
from reloc_ros.maps import (MAP_FORMAT_VERSION, POINT_DEPTH, KeyframeMap, MapBuildConfig, MapError, TriangulationConfig,
                            _select_neighbors, build_map, neighbor_tree)
from reloc_ros.types import Camera, PosedFrame


def test_map_roundtrip_is_self_consistent(small_depth_map):
    kmap = KeyframeMap.load(small_depth_map)
    assert kmap.num_keyframes == 20 and kmap.manifest["format_version"] == MAP_FORMAT_VERSION
    assert kmap.manifest["num_points_from_depth"] > 1000
    # each keyframe's 3D points project back onto its own keypoints (stored-image pixels)
    for i in (0, 7, 19):
        P, kp, T, K = kmap.points3d(i), kmap.features(i).keypoints, kmap.T_world_cam[i], kmap.cameras[i].K
        ok = np.isfinite(P[:, 0])
        Xc = (P[ok] - T[:3, 3]) @ T[:3, :3]
        x = Xc @ K.T
        assert np.median(np.linalg.norm(x[:, :2] / x[:, 2:] - kp[ok], axis=1)) < 0.5
    img = kmap.image(0)
    assert img.shape == (kmap.cameras[0].height, kmap.cameras[0].width, 3)


def test_rgb_only_map_triangulates_points_that_agree_with_depth(seven_scenes, small_depth_map, tmp_path):
    ds = open_dataset("7scenes", seven_scenes, frames="0:100:5", use_depth=False)
    rgb = KeyframeMap.load(build_map(ds, tmp_path / "rgb", MapBuildConfig(use_depth=False)))
    depth = KeyframeMap.load(small_depth_map)
    assert rgb.manifest["num_points_from_depth"] == 0 and rgb.manifest["num_points_triangulated"] > 1000
    d = []
    for i in range(rgb.num_keyframes):
        a, b = rgb.points3d(i), depth.points3d(i)
        both = np.isfinite(a[:, 0]) & np.isfinite(b[:, 0]) & (depth.point_sources(i) == POINT_DEPTH)
        d.append(np.linalg.norm(a[both] - b[both], axis=1))
    # Independent sources (multi-view geometry from the given poses vs the depth sensor)
    # agree only to ~8 cm here: 7-Scenes' poses are self-consistent to ~0.3-1 deg
    # (bench/check_gt_consistency.py). Exact agreement is tested on synthetic data in
    # test_pipeline_synthetic.py; this bound catches convention errors (metres off).
    assert np.median(np.concatenate(d)) < 0.15


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def _corridor(n: int) -> np.ndarray:
    """n cameras 0.5 m apart along x, looking along z (T_world_cam [n, 4, 4]); every
    fourth one turned 90 degrees (looks another way: never a neighbour)."""
    T = np.tile(np.eye(4), (n, 1, 1))
    T[:, 0, 3] = 0.5 * np.arange(n)
    T[::4, :3, :3] = [[0, 0, 1], [0, 1, 0], [-1, 0, 0]]
    return T


def test_neighbours_stay_in_the_keyframes_neighbourhood_of_a_large_map():
    cfg = TriangulationConfig()
    T = _corridor(1000)
    tree = neighbor_tree(T, cfg)
    assert tree is not None and neighbor_tree(T[:100], cfg) is None
    for i in (1, 2, 501, 999):
        nb = _select_neighbors(T, i, cfg, tree)
        # the k-d tree path equals a scan of every keyframe
        np.testing.assert_array_equal(nb, _select_neighbors(T, i, cfg))
        assert len(nb) == cfg.neighbors and i not in nb and not np.any(nb % 4 == 0)
        # spread over the ranks of the 64 nearest that look the same way: 3/4 of the
        # cameras look along z, so those lie within 0.5 m x (4/3 x 64 / 2 + 1) of i
        assert np.abs(T[nb, 0, 3] - T[i, 0, 3]).max() <= 0.5 * (64 * 4 / 3 / (2 if i == 501 else 1) + 1)
        assert np.abs(T[nb, 0, 3] - T[i, 0, 3]).min() <= 1.0  # and still a near one
    with pytest.raises(ValueError, match="neighbors <= candidates"):
        MapBuildConfig(triangulation=TriangulationConfig(neighbors=10, candidates=5)).validate()


def test_truncated_file_is_a_clear_map_error(small_depth_map, tmp_path):
    m = _copy(small_depth_map, tmp_path / "m")
    f = m / "keyframes.npz"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(MapError, match="corrupt or truncated"):
        KeyframeMap.load(m)


def test_older_version_asks_for_a_rebuild(small_depth_map, tmp_path):
    m = _copy(small_depth_map, tmp_path / "m")
    man = json.loads((m / "manifest.json").read_text())
    man["format_version"] = 0
    (m / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(MapError, match="rebuild"):
        KeyframeMap.load(m)


def test_missing_and_non_map_directories(tmp_path):
    with pytest.raises(MapError, match="does not exist"):
        KeyframeMap.load(tmp_path / "nope")
    with pytest.raises(MapError, match="not a reloc_ros map"):
        KeyframeMap.load(tmp_path)


def test_empty_map_and_bad_frames_are_refused_or_skipped(seven_scenes, tmp_path):
    with pytest.raises(MapError, match="no usable keyframes"):
        build_map([], tmp_path / "empty")
    ds = open_dataset("7scenes", seven_scenes, frames="0:30:10", use_depth=False)
    frames = [ds[i] for i in range(len(ds))]
    frames[1] = PosedFrame("nan_pose", frames[1].image, np.full((4, 4), np.nan), frames[1].camera)
    frames.append(PosedFrame("bad_camera", frames[0].image, frames[0].T_world_cam,
                             Camera(np.zeros((3, 3)), 640, 480)))
    out = build_map(frames, tmp_path / "m", MapBuildConfig(use_depth=False))
    kmap = KeyframeMap.load(out)
    assert kmap.names == [frames[0].name, frames[2].name]
    assert {s[0] for s in kmap.manifest["skipped_frames"]} == {"nan_pose", "bad_camera"}
    with pytest.raises(MapError, match="not empty"):
        build_map(frames, out)


def test_corrupt_image_in_a_dataset_is_skipped_with_its_reason(seven_scenes, tmp_path):
    from reloc_ros.datasets import write_folder_dataset

    src = open_dataset("7scenes", seven_scenes, frames="0:30:10", use_depth=False)
    folder = write_folder_dataset([src[i] for i in range(len(src))], tmp_path / "posed")
    images = sorted((folder / "images").iterdir())
    images[1].write_bytes(images[1].read_bytes()[:200])  # truncated PNG
    ds = open_dataset("folder", folder)
    kmap = KeyframeMap.load(build_map(ds, tmp_path / "m", MapBuildConfig(use_depth=False)))
    assert kmap.num_keyframes == 2
    (name, reason), = kmap.manifest["skipped_frames"]
    assert name == ds.names[1] and reason


def test_failed_rebuild_keeps_the_old_map(small_depth_map, tmp_path):
    m = _copy(small_depth_map, tmp_path / "m")
    with pytest.raises(MapError, match="no usable keyframes"):
        build_map([], m, overwrite=True)
    assert KeyframeMap.load(m).num_keyframes == 20


# --------------------------------------------------------------------------- corrupt arrays

def _rewrite_npz(m, fname, drop=(), **replace):
    """Rewrite one npz of map ``m`` (drop / replace arrays) and refresh its manifest checksum,
    so that the array checks, not the checksum check, are what a corruption meets."""
    from reloc_ros.map_store import sha256_file

    f = m / fname
    with np.load(f, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files if k not in drop}
    arrays.update(replace)
    np.savez(f, **arrays)
    man = json.loads((m / "manifest.json").read_text())
    man["files"][fname] = sha256_file(f)
    (m / "manifest.json").write_text(json.dumps(man))


def _arrays(m, fname):
    with np.load(m / fname, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def _corruptions(m):
    """(file, drop, replace, expected message) cases built from the real arrays of map m."""
    kf = _arrays(m, "keyframes.npz")
    T_nan = kf["T_world_cam"].copy()
    T_nan[3, 0, 3] = np.nan
    T_scaled = kf["T_world_cam"].copy()
    T_scaled[5, :3, :3] *= 2.0
    off = kf["store_offset"]
    overlap = off.copy()
    overlap[5] = off[4]
    return [
        ("keyframes.npz", ("T_world_cam",), {}, r"keyframes.npz has no array 'T_world_cam'"),
        ("keyframes.npz", ("store_offset",), {}, r"keyframes.npz has no array 'store_offset'"),
        ("keyframes.npz", ("global_crc32",), {}, r"keyframes.npz has no array 'global_crc32'"),
        ("keyframes.npz", (), {"names": kf["names"][:-1]},
         r"keyframes.npz\['T_world_cam'\] has shape \[20, 4, 4\], expected \[N, 4, 4\] with N=19"),
        ("keyframes.npz", (), {"K": kf["K"][:, :2]},
         r"keyframes.npz\['K'\] has shape \[20, 2, 3\], expected \[N, 3, 3\]"),
        ("keyframes.npz", (), {"sizes": kf["sizes"].astype(np.float32)}, r"keyframes.npz\['sizes'\] has dtype float32"),
        ("keyframes.npz", (), {"T_world_cam": T_nan}, r"keyframes.npz\['T_world_cam'\]\[3\] .* not a finite rigid"),
        ("keyframes.npz", (), {"T_world_cam": T_scaled}, r"keyframes.npz\['T_world_cam'\]\[5\] .* not a finite rigid"),
        ("keyframes.npz", (), {"store_crc32": kf["store_crc32"][:-1]},
         r"keyframes.npz\['store_crc32'\] has shape \[19\], expected \[N\] with N=20"),
        ("keyframes.npz", (), {"store_offset": off.astype(np.float64)}, r"keyframes.npz\['store_offset'\] has dtype"),
        ("keyframes.npz", (), {"store_offset": off + 100}, r"page-aligned"),
        ("keyframes.npz", (), {"store_offset": overlap}, r"store blocks overlap"),
        ("keyframes.npz", (), {"num_points": kf["num_keypoints"] + 1}, r"num_points'\] must lie in 0..num_keypoints"),
        ("keyframes.npz", (), {"store_bytes": kf["store_bytes"] // 4}, r"store_bytes'\] is too small"),
        ("keyframes.npz", (), {"num_keypoints": kf["num_keypoints"] * 10}, r"store_bytes'\] is too small"),
    ]


def test_every_array_is_checked_with_a_map_error_naming_file_and_key(small_depth_map, tmp_path):
    for k, (fname, drop, replace, message) in enumerate(_corruptions(small_depth_map)):
        m = _copy(small_depth_map, tmp_path / f"m{k}")
        _rewrite_npz(m, fname, drop, **replace)
        with pytest.raises(MapError, match=message):
            KeyframeMap.load(m)
        shutil.rmtree(m)


def test_index_size_must_match_the_keyframes(small_depth_map, tmp_path):
    from reloc_ros.map_store import sha256_file
    from reloc_ros.retrieval import RetrievalIndex

    m = _copy(small_depth_map, tmp_path / "m")
    G = KeyframeMap.load(m).global_descriptors[:]
    RetrievalIndex.build(G[:-2]).save(m / "index.faiss")
    man = json.loads((m / "manifest.json").read_text())
    man["files"]["index.faiss"] = sha256_file(m / "index.faiss")
    (m / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(MapError, match="index.faiss has 18 entries for 20 keyframes"):
        KeyframeMap.load(m)


def test_keyframe_image_without_a_checksum_is_refused(small_depth_map, tmp_path):
    m = _copy(small_depth_map, tmp_path / "m")
    man = json.loads((m / "manifest.json").read_text())
    del man["files"]["images/000007.jpg"]
    (m / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(MapError, match="lists no checksum for keyframe image images/000007.jpg"):
        KeyframeMap.load(m)


def _set_release(m, version):
    man = json.loads((m / "manifest.json").read_text())
    if version is None:
        del man["reloc_ros_version"]
    else:
        man["reloc_ros_version"] = version
    (m / "manifest.json").write_text(json.dumps(man))


def test_reloc_ros_version_policy(small_depth_map, tmp_path, caplog):
    import logging

    from reloc_ros import __version__
    from reloc_ros.maps import _release

    major, minor, patch = _release(__version__)
    m = _copy(small_depth_map, tmp_path / "m")
    _set_release(m, f"{major}.{minor + 1}.0")
    with pytest.raises(MapError, match=rf"written by reloc_ros {major}\.{minor + 1}\.0, newer than this"):
        KeyframeMap.load(m)
    _set_release(m, f"{major + 1}.0.0")
    with pytest.raises(MapError, match="upgrade reloc_ros or rebuild"):
        KeyframeMap.load(m)
    for bad in (None, "banana"):
        _set_release(m, bad)
        with pytest.raises(MapError, match="no valid 'reloc_ros_version'"):
            KeyframeMap.load(m)
    with caplog.at_level(logging.WARNING, logger="reloc_ros.maps"):
        _set_release(m, f"{major}.{minor}.{patch + 1}")
        assert KeyframeMap.load(m).num_keyframes == 20
        assert "newer patch release" in caplog.text
        caplog.clear()
        _set_release(m, "0.0.1" if (major, minor, patch) > (0, 0, 1) else "0.0.0")
        assert KeyframeMap.load(m).num_keyframes == 20
        assert "older reloc_ros" in caplog.text
        caplog.clear()
        _set_release(m, __version__)
        KeyframeMap.load(m)
        assert caplog.text == ""


# --------------------------------------------------------------------------- atomic replacement

@pytest.fixture(scope="module")
def two_frame_sets(seven_scenes):
    """Two disjoint sets of 3 real frames (different keyframe 0)."""
    ds = open_dataset("7scenes", seven_scenes, frames="0:60:5", use_depth=False)
    return [ds[i] for i in (0, 4, 8)], [ds[i] for i in (2, 6, 10)]


FAST = dict(use_depth=False, triangulate=False)


def test_rebuilt_map_is_detected_by_a_loaded_one(two_frame_sets, tmp_path):
    a_frames, b_frames = two_frame_sets
    path = tmp_path / "map"
    a = KeyframeMap.load(build_map(a_frames, path, MapBuildConfig(**FAST)))
    img_a0 = a.image(0)
    build_map(b_frames, path, MapBuildConfig(**FAST), overwrite=True)
    # Same path, same index 0, another image: refused, not silently returned.
    with pytest.raises(MapError, match="changed on disk since it was loaded; reload it"):
        a.image(0)
    b = KeyframeMap.load(path)
    assert b.names == [f.name for f in b_frames] and a.names != b.names
    assert not np.array_equal(b.image(0), img_a0)
    # nothing left beside the map: neither the build directory nor the old map
    assert sorted(p.name for p in tmp_path.iterdir()) == ["map"]
    with pytest.raises(MapError, match="out of range"):
        b.image(3)


def test_swap_never_leaves_the_path_missing(tmp_path):
    import threading

    from reloc_ros.maps import _swap_into_place

    target = tmp_path / "map"
    target.mkdir()
    (target / "manifest.json").write_text("0")
    seen_missing, stop = [], threading.Event()

    def watch():
        while not stop.is_set():
            if not (target / "manifest.json").is_file():
                seen_missing.append(1)

    th = threading.Thread(target=watch)
    th.start()
    methods = set()
    try:
        for k in range(1, 200):
            new = tmp_path / "map.partial"
            new.mkdir()
            (new / "manifest.json").write_text(str(k))
            methods.add(_swap_into_place(new, target))
    finally:
        stop.set()
        th.join()
    assert (target / "manifest.json").read_text() == "199"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["map"]
    if methods == {"exchange"}:
        assert not seen_missing  # renameat2(RENAME_EXCHANGE): atomic
    else:
        assert methods == {"rename-aside"}, methods  # kernel/filesystem without RENAME_EXCHANGE
