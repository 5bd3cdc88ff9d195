"""Local features: SIFT keypoints with RootSIFT descriptors, and mutual ratio-test matching.

SIFT (OpenCV) is the choice for a tool that must work on any scene without training or
weights: it is scale/rotation invariant, sub-pixel accurate (which the 2 cm / 0.1 deg
targets need), and ships in opencv-python-headless. Descriptors are stored as uint8
(OpenCV's SIFT values are integers 0..255) and turned into RootSIFT for matching.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import cv2
import numpy as np

from reloc_ros.types import InvalidInputError


@dataclass
class FeatureConfig:
    """Local feature extraction and matching options.

    max_keypoints: keep the strongest N keypoints per image.
    max_image_size: images whose long side exceeds this (pixels) are downscaled for
        extraction; keypoints are returned in the original image's pixels.
    contrast_threshold: SIFT contrast threshold (lower finds more in low-texture scenes).
    image_scale: extra downscale after the max_image_size cap (1.0 = none); the
        localizer uses it for queries (LocalizerConfig.query_image_scale).
    ratio: Lowe ratio test threshold on descriptor distances.
    mutual: also require mutual nearest neighbours.
    """

    max_keypoints: int = 2048
    max_image_size: int = 1024
    contrast_threshold: float = 0.02
    image_scale: float = 1.0
    ratio: float = 0.85
    mutual: bool = True

    def validate(self) -> None:
        if self.max_keypoints < 8:
            raise ValueError("features.max_keypoints must be >= 8")
        if self.max_image_size < 64:
            raise ValueError("features.max_image_size must be >= 64")
        if not 0.1 <= self.image_scale <= 1.0:
            raise ValueError("features.image_scale must be in [0.1, 1]")
        if not 0.0 < self.ratio <= 1.0:
            raise ValueError("features.ratio must be in (0, 1]")


@dataclass
class Features:
    """Keypoints [N, 2] float32 (x, y) in image pixels; descriptors [N, 128] uint8 SIFT."""

    keypoints: np.ndarray
    descriptors: np.ndarray

    def __len__(self) -> int:
        return len(self.keypoints)

    def root(self) -> np.ndarray:
        """RootSIFT descriptors [N, 128] float32, L2-normalised (Arandjelovic & Zisserman 2012)."""
        return root_sift(self.descriptors)


def root_sift(desc: np.ndarray) -> np.ndarray:
    """[N, 128] SIFT (any dtype) -> RootSIFT float32, unit L2 norm."""
    d = desc.astype(np.float32)
    d /= np.maximum(d.sum(axis=1, keepdims=True), 1e-6)
    return np.sqrt(d)


def to_grey(image: np.ndarray) -> np.ndarray:
    """[H, W, 3] RGB / [H, W, 4] RGBA / [H, W] -> [H, W] uint8 grey; clear error otherwise."""
    if not isinstance(image, np.ndarray) or image.size == 0:
        raise InvalidInputError("image is empty or not an array")
    if image.dtype != np.uint8:
        if image.dtype == np.uint16:
            image = (image >> 8).astype(np.uint8)
        else:
            raise InvalidInputError(f"unsupported image dtype {image.dtype}")
    if image.ndim == 2:
        return image
    if image.ndim == 3 and image.shape[2] == 1:
        return image[:, :, 0]
    if image.ndim == 3 and image.shape[2] in (3, 4):
        return cv2.cvtColor(image[:, :, :3], cv2.COLOR_RGB2GRAY)
    raise InvalidInputError(f"unsupported image shape {image.shape}")


class SiftExtractor:
    """SIFT extraction with a fixed configuration (the cv2 object is reused across calls)."""

    def __init__(self, config: Optional[FeatureConfig] = None):
        self.config = config or FeatureConfig()
        # nfeatures=0: keep all, then select by response, so the N strongest survive
        # across octaves rather than OpenCV's per-call truncation.
        # enable_precise_upscale: OpenCV's default first octave upsamples the image by
        # bilinear resize (pixel x of the input sits at 2x + 0.5 there) but divides the
        # coordinates by 2, so every keypoint is 0.25 px (of the extraction image) right of
        # and below where it is; measured by flipping an image (a keypoint at x must come
        # back at W-1-x), in input-image pixels: +0.250 at scale 1, +0.333 at 0.75, +0.5 at
        # 0.5 (test_features.py). Precise upscaling (OpenCV >= 4.8) maps x to 2x exactly
        # (0.000 px) at the same cost. Maps store these keypoints: maps.MAP_FORMAT_VERSION 2.
        self._sift = cv2.SIFT_create(nfeatures=0, contrastThreshold=self.config.contrast_threshold,
                                     enable_precise_upscale=True)

    def __call__(self, image: np.ndarray) -> Features:
        """Extract from [H, W(, C)] uint8; keypoints in the input image's pixel frame."""
        grey = to_grey(image)
        h, w = grey.shape
        scale = min(1.0, self.config.max_image_size / max(h, w)) * self.config.image_scale
        sxy = np.array([scale, scale])
        if scale < 1.0:
            size = (round(w * scale), round(h * scale))
            grey = cv2.resize(grey, size, interpolation=cv2.INTER_AREA)
            # the rounded size sets each axis' true scale (1536x1024 at 2/3 -> 1024x683:
            # y is 683/1024, not 2/3, a 0.25 px error at the image centre)
            sxy = np.array([size[0] / w, size[1] / h])
        kps, desc = self._sift.detectAndCompute(grey, None)
        if desc is None or len(kps) == 0:
            return Features(np.zeros((0, 2), np.float32), np.zeros((0, 128), np.uint8))
        resp = np.array([k.response for k in kps], np.float32)
        order = np.argsort(-resp, kind="stable")[: self.config.max_keypoints]
        xy = np.array([kps[i].pt for i in order], np.float32)
        # cv2 keypoints use pixel centres at integer coordinates; rescale about (-0.5, -0.5)
        # so coordinates stay consistent with K of the full-size image.
        xy = (xy + 0.5) / sxy - 0.5
        d = np.clip(np.round(desc[order]), 0, 255).astype(np.uint8)
        return Features(xy.astype(np.float32), d)


def undistort_keypoints(kps: np.ndarray, camera) -> np.ndarray:
    """Pixel keypoints [N, 2] of a distorted camera -> ideal pinhole pixels with the same K."""
    if camera.dist is None or len(kps) == 0:
        return kps
    pts = cv2.undistortPoints(kps.reshape(-1, 1, 2).astype(np.float64), camera.K, camera.dist, P=camera.K)
    return pts.reshape(-1, 2).astype(np.float32)


def match_descriptors(q: np.ndarray, db: np.ndarray, ratio: float = 0.85, mutual: bool = True,
                      rows: Optional[np.ndarray] = None) -> np.ndarray:
    """Match RootSIFT descriptors q [N, D] to db [M, D] (both unit-norm float32).

    Returns [K, 2] int indices (i_q, i_db) passing Lowe's ratio test on Euclidean
    distances (and mutual nearest neighbour when ``mutual``). One BLAS GEMM gives the
    similarities; the best, second best and reverse best come from three linear
    passes (measured 1.6x faster than FAISS knn here, and the mutual check is free).
    rows: indices into q of the only descriptors to match (None = all); the result is
    what matching all of q would give for those rows, at |rows| / N of the GEMM (the
    mutual check then needs the candidates' columns against all of q: one small GEMM).
    """
    if len(q) == 0 or len(db) < 2:
        return np.zeros((0, 2), np.int64)
    q = np.asarray(q, np.float32)
    db = np.asarray(db, np.float32)
    if rows is None:
        return _ratio_mutual(q @ db.T, ratio, mutual)[0]
    rows = np.asarray(rows, np.int64)
    if len(rows) == 0:
        return np.zeros((0, 2), np.int64)
    m = _ratio_mutual(q[rows] @ db.T, ratio, mutual=False)[0]
    if mutual and len(m):
        cols, inv = np.unique(m[:, 1], return_inverse=True)
        # reverse best over all of q; argmax (not a value comparison) because the two
        # GEMMs may round the same dot product differently
        m = m[(db[cols] @ q.T).argmax(axis=1)[inv] == rows[m[:, 0]]]
    return np.stack([rows[m[:, 0]], m[:, 1]], axis=1)


def match_descriptors_both(a: np.ndarray, b: np.ndarray, ratio: float = 0.85) -> Tuple[np.ndarray, np.ndarray]:
    """Mutual ratio-test matches of a [N, D] to b [M, D] and of b to a, from one GEMM.

    Returns (a->b [K1, 2] (i_a, i_b), b->a [K2, 2] (i_b, i_a)), what
    ``match_descriptors(a, b)`` and ``match_descriptors(b, a)`` return. Mutual nearest
    neighbours are the same pairs in both directions; only the ratio test differs
    (second best in b's row of a, or in a's column of b), so the reverse direction
    costs two linear passes instead of a second GEMM (a transposed copy or a column
    argmax of the [N, M] matrix costs several GEMMs: ``bench/bench_build.py
    --thread-scaling``).
    """
    empty = np.zeros((0, 2), np.int64)
    if len(a) < 2 or len(b) < 2:
        return (match_descriptors(a, b), match_descriptors(b, a))
    sim = np.asarray(a, np.float32) @ np.asarray(b, np.float32).T  # [N, M]
    m_ab, mutual_rows = _ratio_mutual(sim, ratio, mutual=True, reverse=True)
    if len(mutual_rows) == 0:
        return m_ab, empty
    r, c = mutual_rows[:, 0], mutual_rows[:, 1]
    s1 = sim[r, c].copy()  # each of these columns' best (mutual)
    sim[r, c] = -np.inf
    s2 = sim.max(axis=0)[c]  # a full column max is cheaper than gathering the columns
    keep = _distance(s1) < ratio * _distance(s2)
    return m_ab, np.stack([c[keep], r[keep]], axis=1).astype(np.int64)


def _distance(sim: np.ndarray) -> np.ndarray:
    """Euclidean distance of unit vectors from their dot product: dist^2 = 2 - 2 sim."""
    return np.sqrt(np.maximum(2.0 - 2.0 * sim, 0.0))


def _ratio_mutual(sim: np.ndarray, ratio: float, mutual: bool, reverse: bool = False
                  ) -> Tuple[np.ndarray, np.ndarray]:
    """Row-wise ratio-test (and mutual) matches [K, 2] (row, column) of a similarity
    matrix [N, M] (M >= 2), and what the reverse direction needs when ``reverse``: every
    mutual nearest-neighbour pair [L, 2], with ``sim`` left as it was (else the pairs are
    empty, as the per-query matching needs none, and ``sim`` is modified)."""
    rows = np.arange(len(sim))
    nn = sim.argmax(axis=1)
    s1 = sim[rows, nn].copy()
    # column max is a SIMD-friendly reduction; column argmax is not
    col_best = sim.max(axis=0) if mutual else None
    sim[rows, nn] = -np.inf
    s2 = sim.max(axis=1)
    if reverse:
        sim[rows, nn] = s1
    keep = _distance(s1) < ratio * _distance(s2)
    both = np.zeros((0, 2), np.int64)
    if mutual:
        is_mutual = s1 >= col_best[nn]
        keep &= is_mutual
        if reverse:
            mr = np.nonzero(is_mutual)[0]
            both = np.stack([mr, nn[mr]], axis=1).astype(np.int64)
    iq = np.nonzero(keep)[0]
    return np.stack([iq, nn[iq]], axis=1).astype(np.int64), both
