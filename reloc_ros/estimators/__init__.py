"""Pose estimators behind one interface (``base.Estimator``), created by name.

Learned estimators import torch lazily, so the geometric path never pays for it.
"""
from __future__ import annotations

import importlib
from typing import Any, Mapping, Optional

from reloc_ros.estimators.base import Estimator, Query

# name -> "module:Class"
_REGISTRY = {
    "geometric": "reloc_ros.estimators.geometric:GeometricEstimator",
    "reloc3r": "reloc_ros.estimators.reloc3r:Reloc3rEstimator",
    "vggt-fused": "reloc_ros.estimators.vggt_fused:VGGTFusedEstimator",
}


def available() -> list:
    return sorted(_REGISTRY)


def create(name: str, options: Optional[Mapping[str, Any]] = None) -> Estimator:
    """Build estimator ``name`` with its options dict (validated by the estimator's config)."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown estimator {name!r}; choose one of {available()}")
    module, cls = _REGISTRY[name].split(":")
    return getattr(importlib.import_module(module), cls)(**dict(options or {}))


__all__ = ["Estimator", "Query", "create", "available"]
