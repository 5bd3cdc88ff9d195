import numpy as np

from reloc_ros.datasets import open_dataset
from reloc_ros.features import SiftExtractor
from reloc_ros.retrieval import RetrievalConfig, RetrievalIndex, VladDescriptor


def test_vlad_retrieves_the_keyframe_nearest_in_time(seven_scenes):
    ds = open_dataset("7scenes", seven_scenes, frames="0:200:20", use_depth=False)
    ex = SiftExtractor()
    feats = [ex(ds[i].image) for i in range(len(ds))]
    vlad = VladDescriptor(RetrievalConfig(vlad_clusters=32))
    vlad.fit(feats)
    index = RetrievalIndex.build(np.stack([vlad.describe(f) for f in feats]))
    hits = 0
    for q in (5, 45, 85, 125, 165):  # frames between keyframes
        query = open_dataset("7scenes", seven_scenes, frames=f"{q}:{q + 1}", use_depth=False)[0]
        ids, sims = index.search(vlad.describe(ex(query.image)), 2)
        assert np.all(np.diff(sims) <= 1e-6)  # sorted by similarity
        hits += int(abs(q - 20 * ids[0]) <= 25)
    assert hits >= 4


def test_index_roundtrip_and_approximate_index_for_large_maps(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 64)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    small = RetrievalIndex.build(x)
    big = RetrievalIndex.build(x, RetrievalConfig(flat_max_size=100))
    assert "Flat" in type(small.index).__name__ and "HNSW" in type(big.index).__name__
    for idx in (small, big):
        idx.save(tmp_path / "i.faiss")
        loaded = RetrievalIndex.load(tmp_path / "i.faiss")
        ids, _ = loaded.search(x[17], 3)
        assert ids[0] == 17


def test_vlad_state_roundtrip_gives_identical_descriptors(seven_scenes):
    ds = open_dataset("7scenes", seven_scenes, frames="0:40:20", use_depth=False)
    feats = [SiftExtractor()(ds[i].image) for i in range(len(ds))]
    a = VladDescriptor(RetrievalConfig(vlad_clusters=16))
    a.fit(feats)
    b = VladDescriptor(RetrievalConfig(vlad_clusters=16))
    b.load_state(a.state())
    np.testing.assert_array_equal(a.describe(feats[0]), b.describe(feats[0]))
    assert abs(np.linalg.norm(a.describe(feats[1])) - 1) < 1e-5
