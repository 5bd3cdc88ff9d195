"""Image retrieval: global descriptors and the FAISS index over the map's keyframes.

The default descriptor needs no pretrained weights: VLAD (Jegou et al. 2010) over
RootSIFT with a vocabulary trained by FAISS k-means on the map's own descriptors,
with intra-normalisation and signed square-root (Arandjelovic & Zisserman 2013).
A learned descriptor (NetVLAD, MegaLoc, ...) implements ``GlobalDescriptor``.
"""
from __future__ import annotations

import abc
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple

import faiss
import numpy as np

from reloc_ros.features import Features, root_sift


@dataclass
class RetrievalConfig:
    """Retrieval options.

    descriptor: global descriptor name ('vlad').
    vlad_clusters: VLAD vocabulary size (k-means centres over RootSIFT).
    kmeans_max_samples: descriptors sampled from the map to train the vocabulary.
    flat_max_size: maps up to this many keyframes use an exact flat inner-product
        index; larger maps use HNSW (approximate, sub-linear search).
    use_gpu: put the index on a GPU when faiss-gpu and a GPU are present.
    """

    descriptor: str = "vlad"
    vlad_clusters: int = 64
    kmeans_max_samples: int = 200_000
    flat_max_size: int = 20_000
    use_gpu: bool = True

    def validate(self) -> None:
        if self.descriptor not in DESCRIPTORS:
            raise ValueError(f"retrieval.descriptor must be one of {sorted(DESCRIPTORS)}")
        if self.vlad_clusters < 2:
            raise ValueError("retrieval.vlad_clusters must be >= 2")


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


class VladDescriptor(GlobalDescriptor):
    name = "vlad"

    def __init__(self, config: Optional[RetrievalConfig] = None, seed: int = 0):
        self.config = config or RetrievalConfig()
        self.seed = seed
        self.centroids: Optional[np.ndarray] = None  # [k, 128] float32
        self._index: Optional[faiss.Index] = None

    def fit(self, features: Sequence[Features]) -> None:
        descs = [root_sift(f.descriptors) for f in features if len(f) > 0]
        if not descs:
            raise ValueError("cannot train the VLAD vocabulary: no local features in the map")
        x = np.concatenate(descs).astype(np.float32)
        rng = np.random.default_rng(self.seed)
        if len(x) > self.config.kmeans_max_samples:
            x = x[rng.choice(len(x), self.config.kmeans_max_samples, replace=False)]
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


class RetrievalIndex:
    """FAISS inner-product index over unit-norm global descriptors [N, D]."""

    def __init__(self, index: faiss.Index):
        self.index = index

    @classmethod
    def build(cls, descriptors: np.ndarray, config: Optional[RetrievalConfig] = None) -> "RetrievalIndex":
        config = config or RetrievalConfig()
        x = np.ascontiguousarray(descriptors, dtype=np.float32)
        n, d = x.shape
        if n <= config.flat_max_size:
            index = faiss.IndexFlatIP(d)
        else:
            # HNSW keeps recall high without training and searches in ~log(N).
            index = faiss.IndexHNSWFlat(d, 32, faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efSearch = 128
        index.add(x)
        return cls(_maybe_gpu(index, config.use_gpu))

    def __len__(self) -> int:
        return self.index.ntotal

    def search(self, descriptor: np.ndarray, k: int) -> Tuple[np.ndarray, np.ndarray]:
        """Top-k keyframe ids [k'] and cosine similarities [k'] for one descriptor [D]."""
        k = min(int(k), len(self))
        if k <= 0:
            return np.zeros(0, np.int64), np.zeros(0, np.float32)
        sims, ids = self.index.search(np.ascontiguousarray(descriptor[None], dtype=np.float32), k)
        keep = ids[0] >= 0
        return ids[0][keep].astype(np.int64), sims[0][keep]

    def save(self, path: Path) -> None:
        index = self.index
        if hasattr(faiss, "index_gpu_to_cpu") and _is_gpu(index):
            index = faiss.index_gpu_to_cpu(index)
        faiss.write_index(index, str(path))

    @classmethod
    def load(cls, path: Path, use_gpu: bool = True) -> "RetrievalIndex":
        return cls(_maybe_gpu(faiss.read_index(str(path)), use_gpu))


def _is_gpu(index: faiss.Index) -> bool:
    return "Gpu" in type(index).__name__


def _maybe_gpu(index: faiss.Index, use_gpu: bool) -> faiss.Index:
    if use_gpu and hasattr(faiss, "get_num_gpus") and faiss.get_num_gpus() > 0 \
            and hasattr(faiss, "StandardGpuResources") and isinstance(index, faiss.IndexFlat):
        res = faiss.StandardGpuResources()
        gpu_index = faiss.index_cpu_to_gpu(res, 0, index)
        gpu_index.referenced_resources = res  # the GPU index must not outlive its resources
        return gpu_index
    return index
