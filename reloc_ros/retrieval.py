"""Image retrieval: global descriptors and the FAISS index over the map's keyframes.

The default descriptor needs no pretrained weights: VLAD (Jegou et al. 2010) over
RootSIFT with a vocabulary trained by FAISS k-means on the map's own descriptors,
with intra-normalisation and signed square-root (Arandjelovic & Zisserman 2013).
A learned descriptor (NetVLAD, MegaLoc, ...) implements ``GlobalDescriptor``.
"""
from __future__ import annotations

import abc
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple

import numpy as np

# The faiss-cpu wheel is one library with run-time SIMD dispatch (AVX2, AVX512 code paths
# inside), but its loader still tries the old per-ISA modules first and logs each miss
# ("No module named 'faiss.swigfaiss_avx2'") at INFO: expected, not a fallback to generic
# code. faiss_simd_level() says what is really used.
logging.getLogger("faiss.loader").setLevel(logging.WARNING)
import faiss  # noqa: E402

from reloc_ros.features import Features, root_sift  # noqa: E402

log = logging.getLogger("reloc_ros.retrieval")


INDEX_KINDS = ("auto", "flat", "hnsw", "ivfpq")
IVFPQ_MIN_SIZE = 1000  # fewer keyframes cannot train an 8-bit PQ and a useful coarse quantizer


@dataclass
class RetrievalConfig:
    """Retrieval options.

    descriptor: global descriptor name ('vlad').
    vlad_clusters: VLAD vocabulary size (k-means centres over RootSIFT).
    kmeans_max_samples: descriptors sampled from the map to train the vocabulary.
    index: FAISS index kind: 'auto' (by map size, below), 'flat' (exact inner product),
        'hnsw' or 'ivfpq' (approximate; see docs/DESIGN.md "Retrieval at scale").
    flat_max_size: with 'auto', maps up to this many keyframes use the exact flat index.
        Flat search of 8192-d VLADs on one core is linear and memory-bound (1.0 ms at 10^3,
        14 ms at 10^4, 129 ms at 10^5; 32 KB per keyframe), the approximate indexes with
        re-ranking take 1.0-1.5 ms at recall@10 >= 0.977 up to 10^5 (bench/bench_scale.py);
        5000 keeps every map built so far exact and flat search under ~7 ms.
    hnsw_max_size: with 'auto', maps up to this size use HNSW, larger ones IVF-PQ, whose
        ~72 B per keyframe (vs ~2.4 KB for HNSW's projected vectors and graph) bounds the
        index's memory.
    pca_dim: the approximate indexes search in a PCA projection of the descriptors to
        this dimension (0 = no projection; VLAD 8192-d: 32 KB -> 2 KB per keyframe). On
        real VLADs tiled to 10^5 keyframes, the exact top-10 was in the projection's
        exact top-200 for 99.8 % (512), 98.6 % (256) of its members.
    pca_train_size: descriptors sampled to train the PCA (its cost is cubic in this).
    hnsw_m, hnsw_ef_construction, hnsw_ef_search: HNSW graph degree and beam widths
        (FAISS searches with max(ef_search, shortlist); 128 gave recall@10 0.93 at 10^5,
        256 0.97).
    ivf_nlist: IVF coarse cells; 0 = 4 sqrt(N), at most N / 39 (FAISS's minimum training
        points per cell).
    ivf_nprobe: IVF cells visited per query.
    pq_bytes: PQ code bytes per keyframe (8-bit sub-quantizers over the PCA projection;
        32 bytes reached recall@10 0.94 at 10^5, 64 bytes 0.98).
    rerank_shortlist: the approximate indexes return this many candidates (at least k),
        re-ranked by the exact inner product on the map's descriptors when the index has
        them (``RetrievalIndex.attach_vectors``; a memory-mapped array is read only at
        the shortlist's rows). 0 = by index kind: 200 for HNSW, 1000 for IVF-PQ. PQ codes
        rank near-duplicate places coarsely: on a 10^5-keyframe map tiled from 100 real
        keyframes, a shortlist of 200 held the exact top-10 for recall@10 0.886 (nprobe 32
        or 64), 1000 for 1.000 at ~9 ms a query (bench_scale.py; chosen on those same
        maps, docs/RESULTS.md).
    use_gpu: put the index on a GPU when faiss-gpu and a GPU are present (flat and
        IVF-PQ; HNSW stays on the CPU, FAISS has no GPU HNSW).
    """

    descriptor: str = "vlad"
    vlad_clusters: int = 64
    kmeans_max_samples: int = 200_000
    index: str = "auto"
    flat_max_size: int = 5_000
    hnsw_max_size: int = 50_000
    pca_dim: int = 512
    pca_train_size: int = 2048
    hnsw_m: int = 32
    hnsw_ef_construction: int = 40
    hnsw_ef_search: int = 256
    ivf_nlist: int = 0
    ivf_nprobe: int = 32
    pq_bytes: int = 64
    rerank_shortlist: int = 0
    use_gpu: bool = True

    def validate(self) -> None:
        if self.descriptor not in DESCRIPTORS:
            raise ValueError(f"retrieval.descriptor must be one of {sorted(DESCRIPTORS)}")
        if self.vlad_clusters < 2:
            raise ValueError("retrieval.vlad_clusters must be >= 2")
        if self.index not in INDEX_KINDS:
            raise ValueError(f"retrieval.index must be one of {INDEX_KINDS}, got {self.index!r}")
        if self.flat_max_size < 0 or self.hnsw_max_size < self.flat_max_size:
            raise ValueError("retrieval.flat_max_size must be >= 0 and hnsw_max_size >= flat_max_size")
        if self.pca_dim < 0 or self.pca_train_size < 2:
            raise ValueError("retrieval.pca_dim must be >= 0 (0 = none) and pca_train_size >= 2")
        if self.hnsw_m < 2 or self.hnsw_ef_construction < 1 or self.hnsw_ef_search < 1:
            raise ValueError("retrieval.hnsw_m must be >= 2, hnsw_ef_construction and hnsw_ef_search >= 1")
        if self.ivf_nlist < 0 or self.ivf_nprobe < 1:
            raise ValueError("retrieval.ivf_nlist must be >= 0 (0 = auto) and ivf_nprobe >= 1")
        if self.pq_bytes < 1:
            raise ValueError("retrieval.pq_bytes must be >= 1")
        if self.rerank_shortlist < 0:
            raise ValueError("retrieval.rerank_shortlist must be >= 0 (0 = by index kind)")


class GlobalDescriptor(abc.ABC):
    """Maps one image (and its local features) to a unit-norm vector [D] float32."""

    name = "base"

    @abc.abstractmethod
    def fit(self, features: Sequence[Features]) -> None:
        """Train on the map's keyframes (no-op for pretrained descriptors)."""

    @abc.abstractmethod
    def describe(self, features: Features, image: Optional[np.ndarray] = None) -> np.ndarray:
        """[D] float32 unit-norm descriptor."""

    @abc.abstractmethod
    def state(self) -> Dict[str, np.ndarray]:
        """Arrays that restore the descriptor with ``load_state`` (saved in the map)."""

    @abc.abstractmethod
    def load_state(self, state: Dict[str, np.ndarray]) -> None: ...


def sample_root_sift(features: Sequence[Features], max_samples: int, rng: np.random.Generator) -> np.ndarray:
    """RootSIFT rows [M, 128] float32 of the features' descriptors taken together: all of
    them when there are at most ``max_samples``, else ``rng.choice(total, max_samples,
    replace=False)`` of them, in that order. Only the sampled rows are converted: all of a
    map's RootSIFT at once would be 1 GB of float32 per 1000 keyframes of 2048 features."""
    counts = np.array([len(f) for f in features], np.int64)
    total = int(counts.sum())
    if total <= max_samples:
        rows = [root_sift(f.descriptors) for f, c in zip(features, counts) if c > 0]
        return np.concatenate(rows) if rows else np.zeros((0, 128), np.float32)
    sel = rng.choice(total, max_samples, replace=False)
    order = np.argsort(sel, kind="stable")
    flat = sel[order]
    starts = np.concatenate([[0], np.cumsum(counts)])
    owner = np.searchsorted(starts, flat, side="right") - 1  # keyframe of each sampled row, ascending
    kfs, first = np.unique(owner, return_index=True)
    bounds = np.append(first, len(flat))
    x = np.empty((max_samples, 128), np.float32)
    for k, a, b in zip(kfs, bounds[:-1], bounds[1:]):
        x[order[a:b]] = root_sift(features[k].descriptors[flat[a:b] - starts[k]])
    return x


class VladDescriptor(GlobalDescriptor):
    name = "vlad"

    def __init__(self, config: Optional[RetrievalConfig] = None, seed: int = 0):
        self.config = config or RetrievalConfig()
        self.seed = seed
        self.centroids: Optional[np.ndarray] = None  # [k, 128] float32
        self._index: Optional[faiss.Index] = None

    def fit(self, features: Sequence[Features]) -> None:
        x = sample_root_sift(features, self.config.kmeans_max_samples, np.random.default_rng(self.seed))
        if len(x) == 0:
            raise ValueError("cannot train the VLAD vocabulary: no local features in the map")
        k = int(min(self.config.vlad_clusters, max(2, len(x) // 39)))
        km = faiss.Kmeans(x.shape[1], k, niter=20, seed=self.seed, verbose=False,
                          max_points_per_centroid=100_000)
        km.train(np.ascontiguousarray(x))
        self._set(km.centroids.astype(np.float32))

    def _set(self, centroids: np.ndarray) -> None:
        self.centroids = np.ascontiguousarray(centroids, dtype=np.float32)
        self._index = faiss.IndexFlatL2(self.centroids.shape[1])
        self._index.add(self.centroids)

    @property
    def dim(self) -> int:
        return 0 if self.centroids is None else self.centroids.size

    def describe(self, features: Features, image: Optional[np.ndarray] = None) -> np.ndarray:
        if self.centroids is None:
            raise RuntimeError("VLAD vocabulary not trained/loaded")
        k, d = self.centroids.shape
        out = np.zeros((k, d), np.float32)
        if len(features) > 0:
            x = root_sift(features.descriptors)
            _, assign = self._index.search(np.ascontiguousarray(x), 1)
            assign = assign[:, 0]
            # sum of residuals per word as one small GEMM (np.add.at is ~10x slower)
            onehot = np.zeros((len(x), k), np.float32)
            onehot[np.arange(len(x)), assign] = 1.0
            out = onehot.T @ x - onehot.sum(axis=0)[:, None] * self.centroids
        # intra-normalisation: stops bursty visual words dominating the similarity
        out /= np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)
        v = out.ravel()
        v = np.sign(v) * np.sqrt(np.abs(v))
        n = np.linalg.norm(v)
        return (v / n if n > 0 else v).astype(np.float32)

    def state(self) -> Dict[str, np.ndarray]:
        return {"vlad_centroids": self.centroids}

    def load_state(self, state: Dict[str, np.ndarray]) -> None:
        self._set(state["vlad_centroids"])


DESCRIPTORS = {"vlad": VladDescriptor}


def create_descriptor(config: RetrievalConfig) -> GlobalDescriptor:
    return DESCRIPTORS[config.descriptor](config)


def index_kind_for(n: int, config: RetrievalConfig) -> str:
    """The index kind ('flat' | 'hnsw' | 'ivfpq') ``RetrievalIndex.build`` uses for n keyframes."""
    if config.index != "auto":
        return config.index
    if n <= config.flat_max_size:
        return "flat"
    if n <= config.hnsw_max_size or n < IVFPQ_MIN_SIZE:
        return "hnsw"
    return "ivfpq"


# rerank_shortlist 0: candidates an approximate index returns for exact re-ranking, by kind
AUTO_SHORTLIST = {"hnsw": 200, "ivfpq": 1000}


class RetrievalIndex:
    """FAISS inner-product index over unit-norm global descriptors [N, D].

    Exact (``IndexFlatIP``) or approximate: HNSW or IVF-PQ over a PCA projection
    (``IndexPreTransform``), whose shortlist is re-ranked exactly when the descriptors are
    attached. The kind is in the serialised index itself, so ``load`` restores it.
    """

    def __init__(self, index: faiss.Index, vectors: Optional[np.ndarray] = None,
                 rerank_shortlist: int = RetrievalConfig.rerank_shortlist):
        self.index = index
        self.vectors = vectors
        self.rerank_shortlist = int(rerank_shortlist)
        self._kind = _kind_of(index)
        _log_simd_once()

    @property
    def kind(self) -> str:
        """'flat' | 'hnsw' | 'ivfpq' (what the map records as its retrieval index)."""
        return self._kind

    @property
    def approximate(self) -> bool:
        return self.kind != "flat"

    @property
    def description(self) -> str:
        """What the map's manifest records: the FAISS class for the exact index (as before,
        'IndexFlatIP'), else the chain, e.g. 'PCA512,IVF1265,PQ64' or 'PCA512,HNSW32'."""
        if self._kind == "flat":
            return "IndexFlatIP"
        index = _cpu(self.index)
        inner = _inner(index)
        parts = []
        if isinstance(index, faiss.IndexPreTransform):
            parts.append(f"PCA{index.chain.at(0).d_out}")
        if self._kind == "hnsw":
            parts.append(f"HNSW{inner.hnsw.nb_neighbors(1)}")
        elif self._kind == "ivfpq":
            parts.append(f"IVF{inner.nlist},PQ{inner.pq.M}")
        return ",".join(parts)

    def memory_bytes(self) -> int:
        """Resident bytes of the index (its vectors or codes, graph, lists, projection),
        not counting attached vectors."""
        n = int(self.index.ntotal)
        if self._kind == "flat":
            return n * int(self.index.d) * 4
        index = _cpu(self.index)
        total = 0
        if isinstance(index, faiss.IndexPreTransform):
            lt = faiss.downcast_VectorTransform(index.chain.at(0))
            total += 4 * (lt.d_in * lt.d_out + lt.d_out)
        inner = _inner(index)
        if self._kind == "hnsw":
            storage = faiss.downcast_index(inner.storage)
            return total + n * int(storage.code_size) + 4 * int(inner.hnsw.neighbors.size()) + 12 * n
        if self._kind == "ivfpq":
            return (total + n * (int(inner.code_size) + 8) + 4 * int(inner.quantizer.ntotal) * int(inner.d)
                    + 4 * int(inner.pq.centroids.size()))
        return total + len(faiss.serialize_index(index))

    def attach_vectors(self, vectors: Optional[np.ndarray]) -> None:
        """Descriptors [N, D] float32 (np.ndarray or np.memmap) for the exact re-ranking of
        an approximate index's shortlist; None detaches (ranking by the index alone)."""
        if vectors is not None and (vectors.ndim != 2 or len(vectors) != len(self) or vectors.shape[1] != self.index.d):
            raise ValueError(f"attach_vectors: expected [{len(self)}, {self.index.d}], got {vectors.shape}")
        self.vectors = vectors

    @classmethod
    def build(cls, descriptors: np.ndarray, config: Optional[RetrievalConfig] = None,
              seed: int = 0) -> "RetrievalIndex":
        """Index over descriptors [N, D] (unit norm) of the kind ``index_kind_for`` picks.

        The descriptors stay attached (no copy when already float32 C-contiguous) for the
        re-ranking. Raises ValueError for an empty array or an IVF-PQ of too few rows.
        """
        config = config or RetrievalConfig()
        config.validate()
        x = np.ascontiguousarray(descriptors, dtype=np.float32)
        if x.ndim != 2 or len(x) == 0:
            raise ValueError(f"RetrievalIndex.build: descriptors must be [N>0, D], got {x.shape}")
        n, d = x.shape
        kind = index_kind_for(n, config)
        if kind == "flat":
            index = faiss.IndexFlatIP(d)
            index.add(x)
        else:
            index = _build_approximate(x, kind, config, seed)
        return cls(_maybe_gpu(index, config.use_gpu), x, config.rerank_shortlist)

    def __len__(self) -> int:
        return self.index.ntotal

    def search(self, descriptor: np.ndarray, k: int) -> Tuple[np.ndarray, np.ndarray]:
        """Top-k keyframe ids [k'] and cosine similarities [k'] for one descriptor [D].

        Approximate indexes fetch max(k, rerank_shortlist) candidates and, with attached
        vectors, return the k best by exact inner product (else the index's own estimates,
        whose ranking is approximate).
        """
        k = min(int(k), len(self))
        if k <= 0:
            return np.zeros(0, np.int64), np.zeros(0, np.float32)
        q = np.ascontiguousarray(np.asarray(descriptor, dtype=np.float32).reshape(1, -1))
        approximate = self.approximate
        shortlist = self.rerank_shortlist or AUTO_SHORTLIST.get(self.kind, 0)
        want = min(max(k, shortlist), len(self)) if approximate else k
        sims, ids = self.index.search(q, want)
        keep = ids[0] >= 0
        ids, sims = ids[0][keep].astype(np.int64), sims[0][keep]
        if approximate and self.vectors is not None and len(ids):
            # sorted rows: a memory-mapped store is read front to back
            rows = np.sort(ids)
            exact = np.asarray(self.vectors[rows], dtype=np.float32) @ q[0]
            best = np.argsort(-exact, kind="stable")[:k]
            return rows[best], exact[best].astype(np.float32)
        return ids[:k], sims[:k]

    def save(self, path: Path) -> None:
        index = self.index
        if hasattr(faiss, "index_gpu_to_cpu") and _is_gpu(index):
            index = faiss.index_gpu_to_cpu(index)
        faiss.write_index(index, str(path))

    @classmethod
    def load(cls, path: Path, use_gpu: bool = True, vectors: Optional[np.ndarray] = None,
             rerank_shortlist: int = RetrievalConfig.rerank_shortlist) -> "RetrievalIndex":
        """Read an index written by ``save`` (any kind: the file holds the structure and the
        search parameters); vectors: see ``attach_vectors``."""
        out = cls(_maybe_gpu(faiss.read_index(str(path)), use_gpu), None, rerank_shortlist)
        if vectors is not None:
            out.attach_vectors(vectors)
        return out


def _build_approximate(x: np.ndarray, kind: str, config: RetrievalConfig, seed: int) -> faiss.Index:
    """PCA(x) -> HNSW or IVF-PQ, as one IndexPreTransform (one file, one ``search``)."""
    n, d = x.shape
    if kind == "ivfpq" and n < IVFPQ_MIN_SIZE:
        raise ValueError(f"retrieval.index 'ivfpq' needs at least {IVFPQ_MIN_SIZE} keyframes, got {n}")
    rng = np.random.default_rng(seed)
    train = x if n <= config.pca_train_size else x[np.sort(rng.choice(n, config.pca_train_size, replace=False))]
    dp = d if config.pca_dim <= 0 else min(config.pca_dim, d, len(train))
    if kind == "ivfpq":
        m = min(config.pq_bytes, dp)
        dp -= dp % m  # PQ splits the projection into m equal sub-vectors
    transform = None
    if dp < d:
        transform = faiss.PCAMatrix(d, dp)
        transform.train(np.ascontiguousarray(train))
        # the full eigenvector matrix (D x train rows, 64 MB for VLAD) only serves training;
        # the projection is A (pca_dim x D), which is what is saved and applied
        transform.PCAMat.clear()
        xp = transform.apply(x)
    else:
        xp = x
    if kind == "hnsw":
        index = faiss.IndexHNSWFlat(dp, config.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = config.hnsw_ef_construction
        index.hnsw.efSearch = config.hnsw_ef_search
    elif kind == "ivfpq":
        nlist = config.ivf_nlist or int(round(4 * np.sqrt(n)))
        nlist = max(1, min(nlist, n // 39))
        quantizer = faiss.IndexFlatIP(dp)
        index = faiss.IndexIVFPQ(quantizer, dp, nlist, m, 8, faiss.METRIC_INNER_PRODUCT)
        # polysemous training (the factory's default for "PQ") costs minutes and only
        # serves Hamming pre-filtering, which is not used here
        index.do_polysemous_training = False
        index.cp.seed = seed
        index.pq.cp.seed = seed
        index.pq.cp.min_points_per_centroid = 3  # 256 centroids of 8 dims train well from ~800 rows
        index.train(xp)
        index.nprobe = min(config.ivf_nprobe, nlist)
    else:
        raise ValueError(f"unknown approximate index kind {kind!r}")
    index.add(xp)
    if transform is None:
        return index
    # (FAISS's Python constructors keep references to the quantizer, transform and index)
    return faiss.IndexPreTransform(transform, index)


_SIMD_LOGGED = False


def _log_simd_once() -> None:
    global _SIMD_LOGGED
    if not _SIMD_LOGGED:
        _SIMD_LOGGED = True
        log.info("FAISS %s uses SIMD level %s", getattr(faiss, "__version__", "?"), faiss_simd_level())


def _inner(index: faiss.Index) -> faiss.Index:
    """The searching index behind a PCA transform (downcast to its class), else index."""
    return faiss.downcast_index(index.index) if isinstance(index, faiss.IndexPreTransform) else index


def _kind_of(index: faiss.Index) -> str:
    name = type(_inner(index)).__name__  # CPU or Gpu* class
    for kind, tag in (("hnsw", "HNSW"), ("ivfpq", "IVFPQ"), ("flat", "Flat")):
        if tag in name:
            return kind
    return name


def _cpu(index: faiss.Index) -> faiss.Index:
    """A CPU copy of a GPU index (small for the approximate kinds), else the index."""
    return faiss.index_gpu_to_cpu(index) if _is_gpu(index) else index


def _is_gpu(index: faiss.Index) -> bool:
    return "Gpu" in type(index).__name__ or "Gpu" in type(_inner(index)).__name__


def _maybe_gpu(index: faiss.Index, use_gpu: bool) -> faiss.Index:
    """The index on GPU 0 when asked and possible (flat, IVF-PQ, either behind a PCA);
    otherwise (no faiss-gpu, no GPU, HNSW, a kind FAISS cannot move) the CPU index."""
    if not (use_gpu and hasattr(faiss, "get_num_gpus") and hasattr(faiss, "StandardGpuResources")
            and faiss.get_num_gpus() > 0):
        return index
    inner = _inner(index)
    if not isinstance(inner, (faiss.IndexFlat, faiss.IndexIVFPQ)):
        return index
    try:
        res = faiss.StandardGpuResources()
        co = faiss.GpuClonerOptions()
        # PQ with > 48 bytes needs half-precision lookup tables on the GPU
        co.useFloat16LookupTables = isinstance(inner, faiss.IndexIVFPQ) and inner.pq.M > 48
        gpu_index = faiss.index_cpu_to_gpu(res, 0, index, co)
    except Exception as e:  # e.g. a PQ size the GPU kernels do not support
        log.warning("FAISS index stays on the CPU: %s", e)
        return index
    gpu_index.referenced_resources = res  # the GPU index must not outlive its resources
    return gpu_index


def faiss_simd_level() -> str:
    """The SIMD code path FAISS uses here, e.g. 'AVX512_VPOPCNT (dynamic dispatch; compiled:
    DD AVX2 AVX512 AVX512_VPOPCNT)' or 'AVX2' for a wheel with one module per ISA."""
    cfg = getattr(faiss, "SIMDConfig", None)
    compiled = faiss.get_compile_options().strip() if hasattr(faiss, "get_compile_options") else "?"
    if cfg is not None and hasattr(cfg, "get_level_name"):
        dd = bool(cfg.has_dynamic_dispatch()) if hasattr(cfg, "has_dynamic_dispatch") else False
        return f"{cfg.get_level_name()} ({'dynamic dispatch; ' if dd else ''}compiled: {compiled})"
    return compiled
