import faiss
import numpy as np
import pytest

from reloc_ros.config import from_dict
from reloc_ros.datasets import open_dataset
from reloc_ros.features import Features, SiftExtractor, root_sift
from reloc_ros.retrieval import (IVFPQ_MIN_SIZE, RetrievalConfig, RetrievalIndex, VladDescriptor, index_kind_for,
                                 sample_root_sift)


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


# -- retrieval at scale: index kinds, approximate recall, persistence, configuration --------
def _places_vlad(n_keyframes: int, seed: int = 0, clusters: int = 16) -> tuple:
    """VLAD ([N, 128 * clusters], via VladDescriptor) of synthetic SIFT-like local features:
    80 places, each a set of 400 local patches drawn Zipf-like from 2000 shared patterns
    (repeated texture across places, as in buildings); a keyframe sees a random 40-90 %
    of its place's patches with per-observation noise, plus 10 % clutter. Queries are
    further views of the same places. Returns (map descriptors, query descriptors)."""
    rng = np.random.default_rng(seed)
    patterns = rng.gamma(0.6, 20.0, size=(2000, 128))  # SIFT histograms: sparse, positive
    zipf = 1.0 / np.arange(1, 2001) ** 0.8
    places = [rng.choice(2000, 400, p=zipf / zipf.sum()) for _ in range(80)]

    def view(place):
        idx = places[place][rng.random(400) < rng.uniform(0.4, 0.9)]
        clutter = rng.integers(0, 2000, max(1, len(idx) // 10))
        d = patterns[np.concatenate([idx, clutter])] * rng.uniform(0.8, 1.2, (len(idx) + len(clutter), 1))
        d = d + rng.normal(0, 4.0, d.shape)
        return Features(rng.uniform(0, 640, (len(d), 2)).astype(np.float32), np.clip(d, 0, 255).astype(np.uint8))

    feats = [view(i % 80) for i in range(n_keyframes)]
    vlad = VladDescriptor(RetrievalConfig(vlad_clusters=clusters), seed=seed)
    vlad.fit(feats[:300])
    X = np.stack([vlad.describe(f) for f in feats])
    Q = np.stack([vlad.describe(view(p)) for p in rng.integers(0, 80, 40)])
    return X, Q


@pytest.fixture(autouse=True, scope="module")
def _one_faiss_thread():
    # OpenMP on a busy 2-core machine is several times slower, not faster
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(threads)


@pytest.fixture(scope="module")
def realistic_descriptors(_one_faiss_thread):
    return _places_vlad(2000, clusters=8)


def _exact_top(X, Q, k):
    return np.argsort(-(Q @ X.T), axis=1, kind="stable")[:, :k]


def test_index_kind_follows_map_size_and_keeps_small_maps_exact():
    cfg = RetrievalConfig()
    assert [index_kind_for(n, cfg) for n in (1, 100, cfg.flat_max_size)] == ["flat"] * 3
    assert index_kind_for(cfg.flat_max_size + 1, cfg) == "hnsw"
    assert index_kind_for(cfg.hnsw_max_size, cfg) == "hnsw"
    assert index_kind_for(cfg.hnsw_max_size + 1, cfg) == "ivfpq"
    assert index_kind_for(10, RetrievalConfig(index="ivfpq")) == "ivfpq"  # forced
    # IVF-PQ cannot train on a few hundred rows: 'auto' keeps HNSW there
    assert index_kind_for(IVFPQ_MIN_SIZE - 1, RetrievalConfig(flat_max_size=10, hnsw_max_size=20)) == "hnsw"
    rng = np.random.default_rng(1)
    x = rng.normal(size=(1200, 96)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    built = {RetrievalIndex.build(x, RetrievalConfig(flat_max_size=f, hnsw_max_size=h)).kind
             for f, h in ((2000, 2000), (100, 2000), (100, 1000))}
    assert built == {"flat", "hnsw", "ivfpq"}
    small = RetrievalIndex.build(x[:300])  # today's maps: exact flat, results as before
    assert type(small.index) is faiss.IndexFlatIP and not small.approximate
    ids, sims = small.search(x[3], 5)
    np.testing.assert_array_equal(ids, np.argsort(-(x[:300] @ x[3]), kind="stable")[:5])


def test_approximate_indexes_reach_exact_recall_at_10(realistic_descriptors):
    X, Q = realistic_descriptors
    exact = _exact_top(X, Q, 10)
    for kind in ("ivfpq", "hnsw"):
        # a shortlist of 30 of 2000 (the default 200 would be a tenth of this small map)
        index = RetrievalIndex.build(X, RetrievalConfig(index=kind, rerank_shortlist=30))
        assert index.kind == kind and index.approximate
        got = [index.search(q, 10) for q in Q]
        recall = np.mean([len(set(i.tolist()) & set(e.tolist())) / 10 for (i, _), e in zip(got, exact)])
        assert recall >= 0.95, f"{kind}: recall@10 {recall:.3f} against exact search"
        for q, (i, s) in zip(Q[:5], got[:5]):  # re-ranked: exact cosines, best first
            np.testing.assert_allclose(s, X[i] @ q, rtol=1e-5, atol=1e-6)
            assert np.all(np.diff(s) <= 1e-7)
        index.attach_vectors(None)  # index alone: approximate similarities, lower recall
        alone = np.mean([len(set(index.search(q, 10)[0].tolist()) & set(e.tolist())) / 10 for q, e in zip(Q, exact)])
        assert alone <= recall


@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivfpq"])
def test_each_index_kind_survives_save_and_load(tmp_path, realistic_descriptors, kind):
    X, Q = realistic_descriptors
    X = X[:1200]
    cfg = RetrievalConfig(index=kind, hnsw_ef_search=77, ivf_nprobe=9)
    index = RetrievalIndex.build(X, cfg)
    before = [index.search(q, 7) for q in Q[:10]]
    index.save(tmp_path / "index.faiss")
    np.save(tmp_path / "g.npy", X)
    # the map's descriptors may be memory-mapped: re-ranking reads the shortlist's rows only
    loaded = RetrievalIndex.load(tmp_path / "index.faiss", vectors=np.load(tmp_path / "g.npy", mmap_mode="r"))
    assert loaded.kind == kind and len(loaded) == len(X) and loaded.index.d == X.shape[1]
    for q, (i0, s0) in zip(Q[:10], before):
        i1, s1 = loaded.search(q, 7)
        np.testing.assert_array_equal(i0, i1)
        np.testing.assert_allclose(s0, s1, rtol=1e-6)
    # the manifest's name of the index, and its resident size (what the file holds)
    expected = {"flat": "IndexFlatIP", "hnsw": f"PCA{cfg.pca_dim},HNSW{cfg.hnsw_m}"}.get(kind)
    if kind == "ivfpq":
        expected = f"PCA{cfg.pca_dim},IVF{faiss.downcast_index(loaded.index.index).nlist},PQ{cfg.pq_bytes}"
    assert loaded.description == expected
    size = (tmp_path / "index.faiss").stat().st_size
    assert 0.9 * size <= loaded.memory_bytes() <= 1.1 * size
    inner = faiss.downcast_index(loaded.index.index) if kind != "flat" else loaded.index
    if kind == "hnsw":
        assert inner.hnsw.efSearch == 77
    if kind == "ivfpq":
        assert inner.nprobe == 9 and inner.pq.M == cfg.pq_bytes
        assert isinstance(loaded.index, faiss.IndexPreTransform) and inner.d == cfg.pca_dim


def test_retrieval_config_is_validated():
    RetrievalConfig().validate()
    bad = [dict(index="lsh"), dict(flat_max_size=-1), dict(flat_max_size=10, hnsw_max_size=5),
           dict(pca_dim=-3), dict(pca_train_size=1), dict(hnsw_m=1), dict(hnsw_ef_search=0),
           dict(ivf_nlist=-1), dict(ivf_nprobe=0), dict(pq_bytes=0), dict(rerank_shortlist=-1)]
    for kw in bad:
        with pytest.raises(ValueError):
            RetrievalConfig(**kw).validate()
    with pytest.raises(ValueError):
        from_dict(RetrievalConfig, {"index_type": "hnsw"}, "retrieval")  # unknown key
    x = np.eye(8, dtype=np.float32)
    with pytest.raises(ValueError, match="at least"):
        RetrievalIndex.build(x, RetrievalConfig(index="ivfpq"))
    with pytest.raises(ValueError):
        RetrievalIndex.build(np.zeros((0, 8), np.float32))
    with pytest.raises(ValueError):
        RetrievalIndex.build(x, RetrievalConfig(index="hnsw")).attach_vectors(np.zeros((8, 7), np.float32))


def test_loaded_map_reranks_with_its_own_descriptors(small_depth_map):
    from reloc_ros.maps import KeyframeMap

    kmap = KeyframeMap.load(small_depth_map)
    assert kmap.index.vectors is kmap.global_descriptors  # attached, not copied
    assert kmap.manifest["faiss_index"] == kmap.index.description == "IndexFlatIP"  # small map: exact
    assert kmap.memory_bytes() >= kmap.index.memory_bytes() == kmap.global_descriptors.nbytes


def test_vocabulary_sample_equals_sampling_every_descriptor_concatenated():
    rng = np.random.default_rng(3)
    feats = [Features(np.zeros((n, 2), np.float32), rng.integers(0, 255, (n, 128), dtype=np.uint8))
             for n in (700, 0, 1300, 5, 2000)]
    everything = np.concatenate([root_sift(f.descriptors) for f in feats if len(f)])
    for m in (1000, 4005, 10_000):  # fewer than, exactly, more than all 4005 rows
        expected = everything[np.random.default_rng(0).choice(len(everything), m, replace=False)] \
            if m < len(everything) else everything
        np.testing.assert_array_equal(sample_root_sift(feats, m, np.random.default_rng(0)), expected)
    assert sample_root_sift(feats[1:2], 10, np.random.default_rng(0)).shape == (0, 128)
