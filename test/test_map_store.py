"""The memory-mapped keyframe store (reloc_ros.map_store) and format-3 maps built on it."""
import json
import shutil

import numpy as np
import pytest

from reloc_ros.map_store import (PAGE, STORE_FILE, KeyframeStore, MapError, MappedRows, StoreWriter, decode_block,
                                 encode_block)
from reloc_ros.maps import MAP_FORMAT_VERSION, KeyframeMap


def _keyframe(rng, n, with_points=0.4):
    kp = rng.uniform(0, 640, (n, 2)).astype(np.float32)
    desc = rng.integers(0, 256, (n, 128), dtype=np.uint8)
    pts = np.full((n, 3), np.nan, np.float32)
    have = rng.random(n) < with_points
    pts[have] = rng.normal(0, 3, (int(have.sum()), 3))
    src = np.where(have, rng.integers(1, 3, n), 0).astype(np.uint8)
    return kp, desc, pts, src


def test_block_roundtrip_is_exact_and_page_aligned():
    rng = np.random.default_rng(0)
    for n in (0, 1, 37, 2048):
        kp, desc, pts, src = _keyframe(rng, n)
        buf = encode_block(kp, desc, pts, src)
        assert len(buf) % PAGE == 0
        d = decode_block(buf, "test")
        np.testing.assert_array_equal(d.keypoints, kp)
        np.testing.assert_array_equal(d.descriptors, desc)
        np.testing.assert_array_equal(d.points3d, pts)  # NaN where none, bit-exact elsewhere
        np.testing.assert_array_equal(d.point_source, src)
        np.testing.assert_array_equal(d.point_index, np.flatnonzero(np.isfinite(pts[:, 0])))
    with pytest.raises(ValueError, match="must be"):
        encode_block(kp, desc.astype(np.float32), pts, src)
    with pytest.raises(MapError, match="bad magic"):
        decode_block(b"\0" * PAGE, "test")


def _store(tmp_path, n_kf=12, n=500, seed=0):
    rng = np.random.default_rng(seed)
    data = [_keyframe(rng, n) for _ in range(n_kf)]
    G = rng.normal(size=(n_kf, 64)).astype(np.float32)
    w = StoreWriter(tmp_path, 64)
    for (kp, d, p, s), g in zip(data, G):
        w.append(kp, d, p, s, g)
    return data, G, w.close()


def test_lru_cache_is_bounded_in_bytes_and_reads_on_demand(tmp_path):
    data, G, table = _store(tmp_path)
    assert np.all(table["store_offset"] % PAGE == 0)
    one = decode_block(encode_block(*data[0]), "x").nbytes
    store = KeyframeStore(tmp_path / STORE_FILE, table, cache_mb=3.5 * one / 2 ** 20)
    for i in (0, 1, 2, 3, 4, 0):
        d = store.get(i)
        np.testing.assert_array_equal(d.descriptors, data[i][1])
        assert store.cached_bytes <= store.cache_limit
    assert store.reads == 6  # keyframe 0 was evicted by 1..4 (3 fit), so it is read again
    store.get(0)
    assert store.reads == 6  # ... and is now a cache hit
    r = store.root(2, points_only=True)  # RootSIFT of the keypoints with a point, cached with the keyframe
    assert r.shape == (int(np.isfinite(data[2][2][:, 0]).sum()), 128) and r.dtype == np.float32
    assert store.cached_bytes <= store.cache_limit
    rows = MappedRows(tmp_path / "globals.f32", len(G), 64, table["global_crc32"])
    np.testing.assert_array_equal(rows[[5, 1, 7]], G[[5, 1, 7]])
    np.testing.assert_array_equal(rows[3], G[3])
    np.testing.assert_array_equal(rows[2:4], G[2:4])
    np.testing.assert_array_equal(np.asarray(rows), G)
    assert rows.nbytes == G.nbytes and rows.shape == G.shape


def test_corrupt_block_and_row_are_map_errors_when_read(tmp_path):
    data, G, table = _store(tmp_path)
    raw = bytearray((tmp_path / STORE_FILE).read_bytes())
    raw[int(table["store_offset"][4]) + 100] ^= 0xFF
    (tmp_path / STORE_FILE).write_bytes(bytes(raw))
    store = KeyframeStore(tmp_path / STORE_FILE, table)
    store.get(3)  # other blocks are fine
    with pytest.raises(MapError, match="keyframe 4: block checksum mismatch"):
        store.get(4)
    g = bytearray((tmp_path / "globals.f32").read_bytes())
    g[6 * 64 * 4 + 8] ^= 0x01
    (tmp_path / "globals.f32").write_bytes(bytes(g))
    rows = MappedRows(tmp_path / "globals.f32", len(G), 64, table["global_crc32"])
    rows[[0, 5]]
    with pytest.raises(MapError, match="global descriptor 6 checksum mismatch"):
        rows[[2, 6]]
    (tmp_path / STORE_FILE).write_bytes(bytes(raw[: len(raw) // 2]))
    with pytest.raises(MapError, match="truncated"):
        KeyframeStore(tmp_path / STORE_FILE, table)


def test_appending_leaves_earlier_blocks_and_readers_untouched(tmp_path):
    data, G, table = _store(tmp_path, n_kf=4)
    reader = KeyframeStore(tmp_path / STORE_FILE, table)
    before = (tmp_path / STORE_FILE).read_bytes()
    end = int((table["store_offset"] + table["store_bytes"]).max())
    # a crashed edit's unreferenced tail is cut before appending
    with open(tmp_path / STORE_FILE, "ab") as f:
        f.write(b"garbage")
    rng = np.random.default_rng(5)
    w = StoreWriter(tmp_path, 64, (end, 4))
    extra = _keyframe(rng, 300)
    w.append(*extra, rng.normal(size=64).astype(np.float32))
    t2 = w.close()
    assert int(t2["store_offset"][0]) == end
    assert (tmp_path / STORE_FILE).read_bytes()[:end] == before[:end]
    np.testing.assert_array_equal(reader.get(3).keypoints, data[3][0])  # the old mapping still reads
    from reloc_ros.map_store import concat_tables

    store = KeyframeStore(tmp_path / STORE_FILE, concat_tables(table, t2))
    np.testing.assert_array_equal(store.get(4).descriptors, extra[1])


def test_map_keeps_only_retrieval_data_resident(small_depth_map):
    kmap = KeyframeMap.load(small_depth_map, cache_mb=2)
    assert kmap.manifest["format_version"] == MAP_FORMAT_VERSION == 3
    for i in range(kmap.num_keyframes):  # every keyframe's local data read once through the cache
        kmap.root_descriptors(i, with_points_only=True)
        assert kmap.store.cached_bytes <= 2 * 2 ** 20 or len(kmap.store._lru) == 1
    vocabulary = sum(a.nbytes for a in kmap.descriptor_state.values())  # fixed size, not per keyframe
    per_kf = (kmap.memory_bytes() - kmap.index.memory_bytes() - kmap.store.cached_bytes - vocabulary
              ) / kmap.num_keyframes
    assert per_kf < 2000, per_kf  # poses, intrinsics, table: not the ~300 KB of local data
    # the store holds only keypoints that have points: fewer bytes than the dense layout
    store_bytes = (small_depth_map / STORE_FILE).stat().st_size
    m, p = kmap.manifest["num_keypoints"], kmap.manifest["num_points3d"]
    assert store_bytes < m * (8 + 128 + 12 + 1) + kmap.num_keyframes * PAGE
    assert p < m


def test_format_2_map_asks_for_rebuild_or_convert(small_depth_map, tmp_path):
    m = shutil.copytree(small_depth_map, tmp_path / "m")
    man = json.loads((m / "manifest.json").read_text())
    man["format_version"] = 2
    (m / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(MapError, match=r"format version 2.*rebuild it with `reloc-map build` or convert it"):
        KeyframeMap.load(m)
