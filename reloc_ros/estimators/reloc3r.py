"""Reloc3r estimator: relative poses of the query against K keyframes in one batch.

Per query: the query image is encoded once; the keyframes' encoder tokens come from
the map cache written at build time (``build_map_cache``) or, when that is missing,
are encoded on first use and kept in memory; then the decoder and pose head run on all
K (keyframe, query) pairs in one batched forward with view1 = keyframe and view2 =
query. Each pair gives ``pose2`` = ``T_kf_query`` (query camera -> keyframe camera,
OpenCV axes), whose translation carries a direction only (``metric=False``); the
localizer fuses the pairs by motion averaging. The authors' code instead re-encodes
both images of every pair (``bench/bench_reloc3r.py`` measures both).

The network ignores intrinsics (it assumes a centred principal point and similar
focal lengths for both images, as trained).
"""
from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from reloc_ros.config import from_dict
from reloc_ros.estimators.base import Estimator, Query
from reloc_ros.types import EstimatorOutput, InvalidInputError, PairEstimate, RelocError

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from reloc_ros.maps import KeyframeMap

log = logging.getLogger("reloc_ros.estimators.reloc3r")

CACHE_FORMAT = 1


@dataclass
class Reloc3rEstimatorConfig:
    """Options of the ``reloc3r`` estimator.

    weights: checkpoint file (.safetensors / .pth / .pt / .bin; flat or {'model': ...}).
      None is refused unless ``allow_random_weights`` (tests and benchmarks only).
    img_size: 512 (Reloc3r-512: long side 512, sides cropped to multiples of 16) or 224
      (Reloc3r-224: short side 224, centre square crop).
    backend: 'torch' | 'onnxruntime' | 'tensorrt'. precision: 'fp32' | 'fp16' | 'bf16'
      (fp16/bf16 for the backbone; the pose head always runs in fp32).
    device: 'cpu' | 'cuda' | 'cuda:N'.
    config: architecture overrides (``Reloc3rConfig`` keys; None = published size).
    allow_random_weights: build with seeded random weights when ``weights`` is None.
    seed: seed of those random weights.
    max_pairs_per_batch: pairs per forward (bounds memory; K above it runs in chunks).
    cache_dtype: 'fp16' | 'fp32', dtype of keyframe tokens in the map cache.
    artifacts_dir: folder for ONNX graphs / TensorRT engines (None = <map>/cache/reloc3r/
      artifacts after ``prepare``, else a temporary folder).
    threads: ONNX Runtime intra-op threads (0 = its default).
    """

    weights: Optional[str] = None
    img_size: int = 512
    backend: str = "torch"
    precision: str = "fp32"
    device: str = "cpu"
    config: Optional[Dict[str, Any]] = None
    allow_random_weights: bool = False
    seed: int = 0
    max_pairs_per_batch: int = 32
    cache_dtype: str = "fp16"
    artifacts_dir: Optional[str] = None
    threads: int = 0

    def validate(self) -> None:
        from reloc_ros.backends.common import BACKENDS, PRECISIONS

        if self.img_size not in (224, 512):
            raise ValueError(f"reloc3r.img_size must be 224 or 512, got {self.img_size}")
        if self.backend not in BACKENDS:
            raise ValueError(f"reloc3r.backend must be one of {BACKENDS}, got {self.backend!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"reloc3r.precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.cache_dtype not in ("fp16", "fp32"):
            raise ValueError(f"reloc3r.cache_dtype must be 'fp16' or 'fp32', got {self.cache_dtype!r}")
        if self.max_pairs_per_batch < 1:
            raise ValueError("reloc3r.max_pairs_per_batch must be >= 1")


@dataclass
class _Tokens:
    tokens: "torch.Tensor"  # [N, C], cache dtype
    grid: Tuple[int, int]  # patch grid (h, w)


class Reloc3rEstimator(Estimator):
    """Reloc3r relative pose regression behind the ``Estimator`` interface (see module doc)."""

    name = "reloc3r"

    def __init__(self, weights: Optional[str] = None, **options: Any) -> None:
        import torch

        from reloc_ros.backends.reloc3r_runner import Reloc3rRunner
        from reloc_ros.models.checkpoints import load_checkpoint, state_dict_hash
        from reloc_ros.models.reloc3r import build_reloc3r

        if weights is not None:
            options["weights"] = str(weights)
        self.config: Reloc3rEstimatorConfig = from_dict(Reloc3rEstimatorConfig, options, "reloc3r")
        cfg = self.config
        arch = dict(cfg.config or {})
        arch.setdefault("img_size", cfg.img_size)
        if cfg.weights is None:
            if not cfg.allow_random_weights:
                raise RelocError(
                    "reloc3r needs a weights file (weights=PATH to Reloc3r-224/512 .pth or model.safetensors); "
                    "nothing is downloaded at run time. Random weights only with allow_random_weights=True."
                )
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(cfg.seed)
                net = build_reloc3r(arch)
        else:
            if not Path(cfg.weights).is_file():
                raise RelocError(f"reloc3r weights file not found: {cfg.weights}")
            # Allocate without random init (seconds for 426M parameters): the strict
            # load below overwrites every tensor or fails.
            net = build_reloc3r(arch, device="meta").to_empty(device="cpu")
            load_checkpoint(net, cfg.weights)
        self.model_hash = state_dict_hash(net.state_dict())
        self._tmpdir = None
        art = cfg.artifacts_dir
        if art is None and cfg.backend != "torch":
            import tempfile

            self._tmpdir = tempfile.TemporaryDirectory(prefix="reloc3r-artifacts-")
            art = self._tmpdir.name
        self.runner = Reloc3rRunner(
            net, cfg.backend, cfg.precision, cfg.device, art, self.model_hash,
            max_batch=cfg.max_pairs_per_batch, threads=cfg.threads,
        )
        self._tokens: Dict[int, _Tokens] = {}
        self._map_key: Optional[str] = None

    # ------------------------------------------------------------------ preprocessing
    def _image_tensor(self, image: np.ndarray) -> Tuple["torch.Tensor", Tuple[int, int]]:
        import torch

        from reloc_ros.models.reloc3r import preprocess_image

        arr, (h, w) = preprocess_image(image, self.config.img_size)
        p = self.runner.net.config.patch_size
        return torch.from_numpy(arr)[None], (h // p, w // p)

    def encode_images(self, images: Sequence[np.ndarray]) -> List[_Tokens]:
        """Encoder tokens of [H,W,3] uint8 RGB images (batched by preprocessed size)."""
        import torch

        prepped = [self._image_tensor(im) for im in images]
        out: List[Optional[_Tokens]] = [None] * len(images)
        groups: Dict[Tuple[int, int], List[int]] = {}
        for i, (_, grid) in enumerate(prepped):
            groups.setdefault(grid, []).append(i)
        bs = self.config.max_pairs_per_batch
        dt = torch.float16 if self.config.cache_dtype == "fp16" else torch.float32
        for grid, idx in groups.items():
            for s in range(0, len(idx), bs):
                chunk = idx[s : s + bs]
                feats = self.runner.encode(torch.cat([prepped[i][0] for i in chunk]))
                for i, f in zip(chunk, feats):
                    out[i] = _Tokens(f.to(dt).clone(), grid)
        return out  # type: ignore[return-value]

    # ------------------------------------------------------------------ map cache
    def _cache_file(self, cache_dir: Path) -> Path:
        return Path(cache_dir) / f"tokens-{self.model_hash}-{self.config.img_size}-{self.config.cache_dtype}.safetensors"

    @staticmethod
    def _names_key(kmap: "KeyframeMap") -> str:
        return hashlib.sha256("\n".join(kmap.names).encode()).hexdigest()[:16]

    def build_map_cache(self, kmap: "KeyframeMap", cache_dir: Path) -> None:
        """Encode every keyframe image once and store the tokens in ``cache_dir``.

        File: ``tokens-<model hash>-<img_size>-<dtype>.safetensors`` with one [N, C] tensor
        per keyframe (``kf000012``) and its patch grid (``grid000012``, int32 (h, w)),
        plus metadata (model hash, keyframe names hash) checked by ``prepare``.
        """
        import torch

        from reloc_ros.models.checkpoints import save_safetensors

        tensors: Dict[str, torch.Tensor] = {}
        n = kmap.num_keyframes
        bs = max(1, self.config.max_pairs_per_batch)
        for s in range(0, n, bs):
            ids = list(range(s, min(n, s + bs)))
            for i, tok in zip(ids, self.encode_images([kmap.image(i) for i in ids])):
                tensors[f"kf{i:06d}"] = tok.tokens
                tensors[f"grid{i:06d}"] = torch.tensor(tok.grid, dtype=torch.int32)
                self._tokens[i] = tok
        meta = {
            "format": str(CACHE_FORMAT),
            "model_hash": self.model_hash,
            "img_size": str(self.config.img_size),
            "names": self._names_key(kmap),
            "num_keyframes": str(n),
        }
        path = save_safetensors(tensors, self._cache_file(cache_dir), metadata=meta)
        self._map_key = self._names_key(kmap)
        log.info("reloc3r: cached tokens of %d keyframes in %s", n, path)

    def prepare(self, kmap: "KeyframeMap") -> None:
        """Load the map's keyframe tokens for this model (if the build cached them).

        A missing cache, or one from other weights / another map, is not an error:
        keyframes are then encoded on first use (logged once).
        """
        from safetensors import safe_open

        self._tokens = {}
        self._map_key = self._names_key(kmap)
        path = self._cache_file(kmap.cache_dir(self.name))
        if not path.is_file():
            log.warning("reloc3r: no token cache %s; keyframes will be encoded on first use", path)
            return
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                if meta.get("model_hash") != self.model_hash or meta.get("names") != self._map_key:
                    log.warning("reloc3r: token cache %s is for other weights or another map; ignoring it", path)
                    return
                for i in range(kmap.num_keyframes):
                    g = f.get_tensor(f"grid{i:06d}")
                    self._tokens[i] = _Tokens(f.get_tensor(f"kf{i:06d}"), (int(g[0]), int(g[1])))
        except Exception as e:  # truncated or corrupt cache: fall back to encoding
            self._tokens = {}
            log.warning("reloc3r: cannot read token cache %s (%s); keyframes will be encoded on first use", path, e)

    def _keyframe_tokens(self, ids: Sequence[int], kmap: "KeyframeMap") -> List[_Tokens]:
        key = self._names_key(kmap)
        if key != self._map_key:
            self._tokens, self._map_key = {}, key  # another map: nothing cached applies
        todo = [i for i in dict.fromkeys(ids) if i not in self._tokens]
        if todo:
            for i, tok in zip(todo, self.encode_images([kmap.image(i) for i in todo])):
                self._tokens[i] = tok
        return [self._tokens[i] for i in ids]

    # ------------------------------------------------------------------ estimation
    def estimate(self, query: Query, keyframe_ids: Sequence[int], kmap: "KeyframeMap") -> EstimatorOutput:
        """One ``PairEstimate`` per keyframe: ``T_kf_query`` [4,4] (query -> keyframe camera,
        unit-free translation direction, ``metric=False``), weight 1."""
        ids = [int(i) for i in keyframe_ids]
        if not ids:
            return EstimatorOutput(message="no keyframes to compare with")
        bad = [i for i in ids if not 0 <= i < kmap.num_keyframes]
        if bad:
            raise InvalidInputError(f"keyframe ids {bad} out of range 0..{kmap.num_keyframes - 1}")
        timings: Dict[str, float] = {}
        t0 = time.perf_counter()
        q = self.encode_images([query.image])[0]
        t1 = time.perf_counter()
        kfs = self._keyframe_tokens(ids, kmap)
        t2 = time.perf_counter()
        T = self._pair_poses(q, kfs)
        t3 = time.perf_counter()
        timings.update(encode_query=(t1 - t0) * 1e3, keyframe_tokens=(t2 - t1) * 1e3, pairs=(t3 - t2) * 1e3)
        pairs = [PairEstimate(keyframe_id=i, T_kf_query=T[j], weight=1.0, metric=False) for j, i in enumerate(ids)]
        return EstimatorOutput(pairs=pairs, timings_ms=timings)

    def _pair_poses(self, q: _Tokens, kfs: Sequence[_Tokens]) -> np.ndarray:
        """[K, 4, 4] float64 pose2 of each (keyframe, query) pair, batched by keyframe grid."""
        import torch

        from reloc_ros.models.reloc3r import raw_to_pose

        out = np.zeros((len(kfs), 4, 4))
        groups: Dict[Tuple[int, int], List[int]] = {}
        for j, k in enumerate(kfs):
            groups.setdefault(k.grid, []).append(j)
        bs = self.config.max_pairs_per_batch
        fq = q.tokens.float()[None]
        for grid, idx in groups.items():
            for s in range(0, len(idx), bs):
                chunk = idx[s : s + bs]
                feat = torch.stack([kfs[j].tokens for j in chunk]).float()
                t, r = self.runner.pairs(feat, grid, fq, q.grid)
                # SVD in float64: the returned rotations are orthonormal to 1e-15.
                out[chunk] = raw_to_pose(t.double(), r.double()).numpy()
        return out

    def describe(self) -> Dict[str, Any]:
        """Config and model hash (for logs and result files)."""
        d = asdict(self.config)
        d["model_hash"] = self.model_hash
        return d


__all__ = ["Reloc3rEstimator", "Reloc3rEstimatorConfig"]
