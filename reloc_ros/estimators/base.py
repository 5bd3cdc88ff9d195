"""The one interface every pose estimator implements (geometric, Reloc3r, Reloc-VGGT)."""
from __future__ import annotations

import abc
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Optional, Sequence

import numpy as np

from reloc_ros.types import Camera, EstimatorOutput

if TYPE_CHECKING:  # pragma: no cover
    from reloc_ros.maps import KeyframeMap


@dataclass
class Query:
    """A query image with lazily shared per-query data.

    image: [H, W, 3] uint8 RGB or [H, W] uint8 grey. camera: its intrinsics.
    features: local features (reloc_ros.features.Features) when the localizer already
    extracted them for retrieval, so estimators do not extract twice.
    """

    image: np.ndarray
    camera: Camera
    features: Optional[Any] = None


class Estimator(abc.ABC):
    """Estimates a query's pose relative to (or absolutely from) retrieved keyframes.

    Implementations return relative ``PairEstimate``s (fused by motion averaging in the
    localizer), an ``AbsoluteEstimate`` (already in the map frame), or both.
    """

    name: ClassVar[str] = "base"

    def prepare(self, kmap: "KeyframeMap") -> None:
        """Called once after a map is loaded (e.g. load cached keyframe tokens)."""

    def build_map_cache(self, kmap: "KeyframeMap", cache_dir: Path) -> None:
        """Optional, at map build time: write per-keyframe caches under ``cache_dir``."""

    @abc.abstractmethod
    def estimate(self, query: Query, keyframe_ids: Sequence[int], kmap: "KeyframeMap") -> EstimatorOutput:
        """Estimate the query pose against keyframes ``keyframe_ids`` of ``kmap``."""
