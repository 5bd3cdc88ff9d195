"""Network architectures in PyTorch (Reloc3r, VGGT, Reloc-VGGT), built by name.

Imports torch lazily through the submodules, so ``import reloc_ros.models`` is cheap.
"""
from __future__ import annotations

from typing import Any, Mapping, Optional

__all__ = ["build", "available"]


def available() -> list:
    """Names accepted by :func:`build`."""
    return ["reloc3r", "vggt", "reloc_vggt"]


def build(name: str, config: Optional[Mapping[str, Any]] = None):
    """Build network ``name`` ('reloc3r', 'vggt' or 'reloc_vggt') with random
    (default-initialised) weights.

    config: a fixture's ``config`` dict, or ``{}`` / ``{'img_size': 512}`` for the
    full-size published architecture; for 'reloc_vggt' VGGT's config plus an optional
    ``tokenizer_hidden`` (the pose tokenizer's width; a reloc-train ``model.json`` holds
    both). Unknown keys raise ValueError. Load weights
    afterwards with ``reloc_ros.models.checkpoints.load_checkpoint``.
    Returns a ``torch.nn.Module`` in eval mode on the CPU.
    """
    config = dict(config or {})
    if name == "reloc3r":
        from reloc_ros.models.reloc3r import build_reloc3r

        return build_reloc3r(config)
    if name == "vggt":
        from reloc_ros.models.vggt import build_vggt

        return build_vggt(config)
    if name == "reloc_vggt":
        from reloc_ros.models.reloc_vggt import build_reloc_vggt

        hidden = config.pop("tokenizer_hidden", None)
        return build_reloc_vggt(config) if hidden is None else build_reloc_vggt(config, tokenizer_hidden=int(hidden))
    raise ValueError(f"unknown model {name!r}; choose one of {available()}")
