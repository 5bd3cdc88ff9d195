"""Safe checkpoint reading, layout normalisation and key/shape checking.

Formats read (never unpickling code objects):
- ``*.safetensors`` (e.g. the hub's ``model.safetensors``): flat state dict.
- ``*.pth`` / ``*.pt`` / ``*.bin``: ``torch.load(weights_only=True)``, either a flat state
  dict (``Reloc3r-224.pth``, VGGT's ``model.pt``) or the older ``{'model': state_dict}``
  training layout, whose DUSt3R-style names are remapped: ``dec_blocks2.*`` ->
  ``dec_blocks.*`` (Reloc3r's shared decoder comes from DUSt3R's second decoder) and
  ``head4.*`` -> ``head.*`` -> ``pose_head.*`` when the architecture has those names.
  A ``module.`` prefix (DataParallel) is stripped.

``load_checkpoint`` then loads strictly: every architecture tensor must be present
with its exact shape, and nothing else may be left over except names under explicitly
ignored prefixes (e.g. VGGT's depth/point/track heads).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from reloc_ros.types import RelocError

__all__ = [
    "CheckpointError",
    "KeyCheck",
    "read_state_dict",
    "normalize_layout",
    "check_state_dict",
    "load_checkpoint",
    "save_safetensors",
    "state_dict_hash",
    "expected_shapes",
]

_PICKLE_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")


class CheckpointError(RelocError):
    """A checkpoint file is missing, unreadable, or does not fit the architecture."""


@dataclass
class KeyCheck:
    """Result of comparing a checkpoint with an architecture.

    missing: names the architecture needs and the file lacks. unexpected: names in the
    file the architecture does not have (after layout remapping, minus ignored ones).
    mismatched: (name, file shape, architecture shape). ignored: names dropped by prefix.
    remapped: number of names renamed by the layout normalisation. layout: 'flat' or 'model'.
    """

    missing: List[str] = field(default_factory=list)
    unexpected: List[str] = field(default_factory=list)
    mismatched: List[Tuple[str, Tuple[int, ...], Tuple[int, ...]]] = field(default_factory=list)
    ignored: List[str] = field(default_factory=list)
    remapped: int = 0
    layout: str = "flat"
    num_tensors: int = 0
    num_elements: int = 0

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def summary(self, limit: int = 10) -> str:
        """Human-readable multi-line summary (first ``limit`` names of each problem)."""
        lines = [
            f"layout={self.layout} tensors={self.num_tensors} elements={self.num_elements:,} "
            f"remapped={self.remapped} ignored={len(self.ignored)}"
        ]
        for what, items in (("missing", self.missing), ("unexpected", self.unexpected)):
            if items:
                more = f" ... (+{len(items) - limit})" if len(items) > limit else ""
                lines.append(f"{len(items)} {what}: {', '.join(items[:limit])}{more}")
        if self.mismatched:
            shown = "; ".join(f"{n}: file {tuple(a)} vs arch {tuple(b)}" for n, a, b in self.mismatched[:limit])
            lines.append(f"{len(self.mismatched)} shape mismatches: {shown}")
        lines.append("OK: keys and shapes match" if self.ok else "MISMATCH")
        return "\n".join(lines)


def read_state_dict(path: Union[str, Path]) -> Dict[str, torch.Tensor]:
    """Tensors of a checkpoint file as found (no remapping), on the CPU.

    Accepts .safetensors and pickle-container formats read with ``weights_only=True``
    (memory-mapped when possible, so multi-GB files are not copied up front).
    Raises CheckpointError for a missing, unreadable or non-tensor file.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file

            return dict(load_file(str(path), device="cpu"))
        except Exception as e:  # corrupt header, truncated file
            raise CheckpointError(f"cannot read safetensors file {path}: {e}") from e
    if path.suffix not in _PICKLE_SUFFIXES:
        raise CheckpointError(f"unsupported checkpoint format {path.suffix!r} ({path}); use .safetensors or .pth/.pt/.bin")
    obj = None
    err: Optional[Exception] = None
    for mmap in (True, False):  # mmap needs the zip format; the legacy format does not support it
        try:
            obj = torch.load(str(path), map_location="cpu", weights_only=True, mmap=mmap)
            break
        except Exception as e:
            err = e
    if obj is None:
        raise CheckpointError(f"cannot read {path} as a weights-only torch checkpoint: {err}") from err
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a state dict")
    return dict(obj)


def normalize_layout(
    state: Mapping[str, object], arch_names: Optional[Iterable[str]] = None
) -> Tuple[Dict[str, torch.Tensor], str, int]:
    """Flat ``{name: tensor}`` from any supported layout.

    state: what :func:`read_state_dict` returned. arch_names: the architecture's names,
    used to resolve ``head.*`` -> ``pose_head.*``. Returns (state, layout, n_remapped);
    non-tensor entries of a training checkpoint (epoch, args, optimizer) are dropped.
    """
    layout = "flat"
    if "model" in state and isinstance(state["model"], Mapping):
        state = state["model"]
        layout = "model"
    arch = set(arch_names or ())
    flat = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    if flat and all(k.startswith("module.") for k in flat):
        flat = {k[len("module.") :]: v for k, v in flat.items()}
    out: Dict[str, torch.Tensor] = {}
    renamed = 0
    has_dec2 = any(k.startswith("dec_blocks2.") for k in flat)
    for k, v in flat.items():
        new = k
        if has_dec2 and k.startswith("dec_blocks."):
            continue  # DUSt3R's first-view decoder; Reloc3r's shared decoder is dec_blocks2
        if k.startswith("dec_blocks2."):
            new = "dec_blocks." + k[len("dec_blocks2.") :]
        elif k.startswith("head4."):
            new = "head." + k[len("head4.") :]
        if new.startswith("head.") and arch and new not in arch and ("pose_" + new) in arch:
            new = "pose_" + new
        renamed += new != k
        out[new] = v
    return out, layout, renamed


def expected_shapes(net: nn.Module) -> Dict[str, Tuple[int, ...]]:
    """{name: shape} of a module's state dict (works for modules on the 'meta' device)."""
    return {k: tuple(v.shape) for k, v in net.state_dict().items()}


def check_state_dict(
    state: Mapping[str, torch.Tensor],
    expected: Mapping[str, Sequence[int]],
    ignore_prefixes: Sequence[str] = (),
    layout: str = "flat",
    remapped: int = 0,
) -> KeyCheck:
    """Compare names and shapes of ``state`` with ``expected`` ({name: shape})."""
    chk = KeyCheck(layout=layout, remapped=remapped)
    for k, v in state.items():
        if k in expected:
            if tuple(v.shape) != tuple(expected[k]):
                chk.mismatched.append((k, tuple(v.shape), tuple(expected[k])))
        elif any(k.startswith(p) for p in ignore_prefixes):
            chk.ignored.append(k)
        else:
            chk.unexpected.append(k)
    chk.missing = [k for k in expected if k not in state]
    kept = [v for k, v in state.items() if k in expected]
    chk.num_tensors = len(kept)
    chk.num_elements = int(sum(v.numel() for v in kept))
    return chk


def load_checkpoint(
    net: nn.Module,
    path: Union[str, Path],
    ignore_prefixes: Sequence[str] = (),
) -> KeyCheck:
    """Load a checkpoint into ``net`` strictly (names and shapes must match exactly).

    ignore_prefixes: file names to drop silently (e.g. heads the architecture omits).
    Tensors are cast to the parameters' dtype. Raises CheckpointError with the list
    of missing / unexpected / mis-shaped names when the file does not fit.
    """
    raw = read_state_dict(path)
    expected = expected_shapes(net)
    state, layout, remapped = normalize_layout(raw, expected)
    chk = check_state_dict(state, expected, ignore_prefixes, layout, remapped)
    if not chk.ok:
        raise CheckpointError(f"{path} does not fit {type(net).__name__}:\n{chk.summary()}")
    keep = {k: v for k, v in state.items() if k in expected}
    net.load_state_dict(keep, strict=True)
    return chk


def save_safetensors(state: Mapping[str, torch.Tensor], path: Union[str, Path], metadata: Optional[Dict[str, str]] = None) -> Path:
    """Write a flat state dict as safetensors (contiguous CPU copies; shared storage unshared)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for k, v in state.items():
        v = v.detach().to("cpu")
        # safetensors refuses views into shared storage; whole tensors are written as is
        # (no copy, which matters for multi-GB memory-mapped checkpoints).
        whole = v.is_contiguous() and v.storage_offset() == 0 and v.untyped_storage().nbytes() == v.numel() * v.element_size()
        tensors[k] = v if whole else v.contiguous().clone()
    tmp = path.with_suffix(path.suffix + ".tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    tmp.replace(path)  # atomic: a crash never leaves a truncated file under the final name
    return path


def state_dict_hash(state: Mapping[str, torch.Tensor], length: int = 16) -> str:
    """Content hash (hex, ``length`` chars) of names, dtypes, shapes and bytes of a state dict.

    Identifies weights for on-disk caches (keyframe tokens, TensorRT engines).
    """
    h = hashlib.blake2b(digest_size=16)
    for k in sorted(state):
        v = state[k].detach()
        h.update(f"{k}|{v.dtype}|{tuple(v.shape)}".encode())
        if v.device.type != "meta":
            h.update(v.to("cpu").contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:length]
