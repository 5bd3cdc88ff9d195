"""Editing maps without a rebuild (reloc_ros.map_edit): add, remove, merge, convert."""
import json
import shutil

import numpy as np
import pytest

from reloc_ros.datasets import open_dataset
from reloc_ros.features import Features
from reloc_ros.map_edit import add_keyframes, convert_map, merge_maps, remove_region
from reloc_ros.map_store import STORE_FILE
from reloc_ros.maps import KeyframeMap, MapBuildConfig, MapError, build_map
from reloc_ros.retrieval import create_descriptor


def _frames(seven_scenes, sl, use_depth=True):
    ds = open_dataset("7scenes", seven_scenes, frames=sl, use_depth=use_depth)
    return [ds[i] for i in range(len(ds))]


@pytest.fixture(scope="module")
def half_map(tmp_path_factory, seven_scenes):
    """Frames 0:100:10 with depth (the even half of the small_depth_map fixture's frames)."""
    return build_map(_frames(seven_scenes, "0:100:10"), tmp_path_factory.mktemp("edit") / "half", MapBuildConfig())


def _vlad(kmap, feats):
    from reloc_ros.config import from_dict
    from reloc_ros.retrieval import RetrievalConfig

    d = create_descriptor(from_dict(RetrievalConfig, kmap.manifest["build_config"]["retrieval"], "retrieval"))
    d.load_state(kmap.descriptor_state)
    return d.describe(feats)


def test_added_keyframes_equal_a_full_build_and_old_data_is_untouched(half_map, small_depth_map, seven_scenes,
                                                                      tmp_path):
    m = shutil.copytree(half_map, tmp_path / "m")
    old = KeyframeMap.load(m)  # a reader holding the map during the edit
    old_f3 = old.features(3).descriptors.copy()
    store_before = (m / STORE_FILE).read_bytes()
    stats = add_keyframes(m, _frames(seven_scenes, "5:100:10") + _frames(seven_scenes, "0:1:1"))
    assert stats["added"] == 10 and stats["keyframes_before"] == 10 and not stats["index_rebuilt"]
    assert [s[0] for s in stats["skipped_frames"]] == [old.names[0]]  # already in the map: skipped, with reason
    assert "already in the map" in stats["skipped_frames"][0][1]
    # appends only: the old blocks are byte for byte what they were
    assert (m / STORE_FILE).read_bytes()[: len(store_before)] == store_before
    np.testing.assert_array_equal(old.features(3).descriptors, old_f3)
    new = KeyframeMap.load(m)
    assert new.num_keyframes == 20 and new.names[:10] == old.names
    assert sorted(p.name for p in m.glob("keyframes*.npz")) == ["keyframes.g1.npz"]  # previous table removed
    full = KeyframeMap.load(small_depth_map)  # frames 0:100:5 built at once
    for j in range(10, 20):
        i = full.names.index(new.names[j])
        np.testing.assert_array_equal(new.T_world_cam[j], full.T_world_cam[i])
        np.testing.assert_array_equal(new.features(j).descriptors, full.features(i).descriptors)
        np.testing.assert_allclose(new.features(j).keypoints, full.features(i).keypoints, atol=1e-4)
        # depth points and points triangulated against old + new neighbours, as the full build has them
        a, b = new.points3d(j), full.points3d(i)
        np.testing.assert_array_equal(np.isfinite(a[:, 0]), np.isfinite(b[:, 0]))
        np.testing.assert_allclose(a[np.isfinite(a[:, 0])], b[np.isfinite(b[:, 0])], atol=1e-3)
        # described with the map's own vocabulary: comparable with the old keyframes
        np.testing.assert_allclose(new.global_descriptors[j], _vlad(new, new.features(j)), atol=1e-6)
    assert (new.point_sources(15) == 2).any()  # some points were triangulated
    # an added keyframe is retrieved for its own image
    fr = _frames(seven_scenes, "45:46:1")[0]
    ids, _ = new.index.search(_vlad(new, Features(*_extract(new, fr))), 1)
    assert new.names[int(ids[0])] == fr.name
    with pytest.raises(MapError, match="no keyframes to add"):
        add_keyframes(m, _frames(seven_scenes, "5:6:1"))


def _extract(kmap, fr):
    from reloc_ros.config import from_dict
    from reloc_ros.features import FeatureConfig, SiftExtractor

    f = SiftExtractor(from_dict(FeatureConfig, kmap.manifest["build_config"]["features"], "features"))(fr.image)
    return f.keypoints, f.descriptors


def test_remove_a_region_keeps_the_rest_as_stored(small_depth_map, tmp_path):
    full = KeyframeMap.load(small_depth_map)
    c = full.T_world_cam[7, :3, 3]
    d = np.linalg.norm(full.T_world_cam[:, :3, 3] - c, axis=1)
    r = float(np.sort(d)[3]) + 1e-6  # the 4 keyframes nearest keyframe 7
    stats = remove_region(small_depth_map, sphere=[*c, r], out=tmp_path / "cut")
    cut = KeyframeMap.load(tmp_path / "cut")
    gone = {full.names[i] for i in np.flatnonzero(d <= r)}
    assert stats["removed"] == 4 and len(gone) == 4
    assert cut.names == [n for n in full.names if n not in gone] and len(cut.index) == 16
    for j, name in enumerate(cut.names):
        i = full.names.index(name)
        np.testing.assert_array_equal(cut.points3d(j), full.points3d(i))
        np.testing.assert_array_equal(cut.global_descriptors[j], full.global_descriptors[i])
        np.testing.assert_array_equal(cut.image(j), full.image(i))
    assert cut.manifest["edits"][-1]["op"] == "remove"
    with pytest.raises(ValueError, match="box"):
        remove_region(small_depth_map, box=[0, 0, 0, -1, 1, 1], out=tmp_path / "x")
    with pytest.raises(MapError, match="no keyframes"):
        remove_region(small_depth_map, box=[-1e3] * 3 + [1e3] * 3, out=tmp_path / "empty")


def test_merge_through_a_shared_frame_recovers_one_frame(half_map, seven_scenes, tmp_path):
    # map b: frames 90..190 posed in another world frame (a rigid motion of a's), sharing frame 90
    ang = np.radians(30)
    T_b_a = np.eye(4)
    T_b_a[:3, :3] = [[np.cos(ang), -np.sin(ang), 0], [np.sin(ang), np.cos(ang), 0], [0, 0, 1]]
    T_b_a[:3, 3] = [4.0, -2.0, 0.5]
    frames_b = _frames(seven_scenes, "90:200:20")
    truth = {f.name: f.T_world_cam.copy() for f in frames_b}
    for f in frames_b:
        f.T_world_cam = T_b_a @ f.T_world_cam
    b = build_map(frames_b, tmp_path / "b", MapBuildConfig(triangulate=False))
    stats = merge_maps(half_map, b, tmp_path / "ab")
    a, kb, ab = KeyframeMap.load(half_map), KeyframeMap.load(b), KeyframeMap.load(tmp_path / "ab")
    assert stats["shared_frames"] == [[a.names[9], a.names[9]]] and stats["added_from_b"] == 5
    assert stats["b_redescribed"]  # b trained its own vocabulary: its keyframes are re-described with a's
    np.testing.assert_allclose(np.array(stats["T_a_b"]), np.linalg.inv(T_b_a), atol=1e-6)
    assert ab.names == a.names + kb.names[1:]
    for j, name in enumerate(ab.names[10:], start=10):
        np.testing.assert_allclose(ab.T_world_cam[j], truth[name], atol=1e-6)
        i = kb.names.index(name)
        P = kb.points3d(i)
        ok = np.isfinite(P[:, 0])
        moved = P[ok].astype(np.float64) @ np.linalg.inv(T_b_a)[:3, :3].T + np.linalg.inv(T_b_a)[:3, 3]
        np.testing.assert_allclose(ab.points3d(j)[ok], moved, atol=1e-4)
        np.testing.assert_allclose(ab.global_descriptors[j], _vlad(a, kb.features(i)), atol=1e-6)
    # the map a keyframes are a's, unchanged; the descriptors of both halves are in one space
    np.testing.assert_array_equal(ab.global_descriptors[3], a.global_descriptors[3])
    np.testing.assert_array_equal(ab.descriptor_state["vlad_centroids"], a.descriptor_state["vlad_centroids"])
    # without a shared frame, or when shared frames disagree on the transform: refused
    with pytest.raises(MapError, match="share no frame"):
        merge_maps(tmp_path / "b", _only(a, tmp_path), tmp_path / "x")
    with pytest.raises(MapError, match="disagree on the transform"):
        merge_maps(half_map, b, tmp_path / "y", shared=[(a.names[9], kb.names[0]), (a.names[0], kb.names[0])])


def _only(a, tmp_path):
    """A copy of map a without frame 90 (so that it shares no frame with b)."""
    out = tmp_path / "a_wo"
    remove_region(a.path, names=[a.names[9]], out=out)
    return out


def _write_format_2(kmap, dst):
    """The same map in the format-2 layout (features.npz + retrieval.npz), per its documentation."""
    shutil.copytree(kmap.path, dst, ignore=shutil.ignore_patterns("store.bin", "globals.f32", "keyframes.npz",
                                                                  "retrieval.npz", "manifest.json"))
    from reloc_ros.map_store import TABLE_KEYS, write_manifest

    n = kmap.num_keyframes
    kf = {k: v for k, v in kmap.keyframe_arrays.items() if k not in TABLE_KEYS}
    np.savez(dst / "keyframes.npz", **kf)
    ks = [kmap.keyframe(i) for i in range(n)]
    np.savez(dst / "features.npz", keypoints=np.concatenate([k.keypoints for k in ks]),
             descriptors=np.concatenate([k.descriptors for k in ks]),
             offsets=np.concatenate([[0], np.cumsum([len(k.keypoints) for k in ks])]).astype(np.int64),
             points3d=np.concatenate([k.points3d for k in ks]), point_source=np.concatenate([k.point_source for k in ks]))
    np.savez(dst / "retrieval.npz", global_descriptors=kmap.global_descriptors[:], **kmap.descriptor_state)
    man = {k: v for k, v in kmap.manifest.items() if k not in ("parts", "global_dim", "generation")}
    man["format_version"] = 2
    write_manifest(dst, man)


def test_convert_a_format_2_map_is_lossless(small_depth_map, tmp_path):
    full = KeyframeMap.load(small_depth_map)
    old = tmp_path / "v2"
    _write_format_2(full, old)
    with pytest.raises(MapError, match="convert it"):
        KeyframeMap.load(old)
    stats = convert_map(old, tmp_path / "v3")
    conv = KeyframeMap.load(tmp_path / "v3")
    assert stats["keyframes"] == 20 and conv.names == full.names
    for i in range(full.num_keyframes):
        for a, b in zip(vars(conv.keyframe(i)).values(), vars(full.keyframe(i)).values()):
            if isinstance(a, np.ndarray):
                np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(conv.global_descriptors[:], full.global_descriptors[:])
    man = json.loads((old / "manifest.json").read_text())
    man["files"]["features.npz"] = "0" * 64
    (old / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(MapError, match="corrupt"):
        convert_map(old, tmp_path / "v3b")


def test_cli_edits(small_depth_map, seven_scenes, tmp_path, capsys):
    from reloc_ros.cli.map_cli import main

    names = KeyframeMap.load(small_depth_map).names
    m = shutil.copytree(small_depth_map, tmp_path / "grow")
    assert main(["add", str(m), str(seven_scenes), "--format", "7scenes", "--frames", "2:3:1"]) == 0
    assert '"added": 1' in capsys.readouterr().out and KeyframeMap.load(m).num_keyframes == 21
    assert main(["remove", str(small_depth_map), "--names", f"{names[0]},{names[5]}", "-o", str(tmp_path / "r")]) == 0
    out = capsys.readouterr().out
    assert '"removed": 2' in out and '"num_keyframes": 18' in out
    assert main(["merge", str(small_depth_map), str(tmp_path / "r"), "-o", str(tmp_path / "m")]) == 0
    merged = KeyframeMap.load(tmp_path / "m")
    assert merged.names == names  # every keyframe of r is shared with the first map: nothing new
    assert main(["remove", str(small_depth_map), "--box", "1,2,3"]) == 2
    assert "--box needs 6" in capsys.readouterr().err
    assert main(["convert", str(small_depth_map), str(tmp_path / "c")]) == 2
    assert "convert reads format-2 maps" in capsys.readouterr().err
