"""2D rotary position embedding ("RoPE100") shared by the Reloc3r and VGGT networks.

The head dimension D of q or k is split in two halves: the first half is rotated by
the token's row index y, the second by its column index x. Within a half of size
h = D/2 the frequencies are ``inv_freq_j = base^(-2j/h)`` for j = 0..h/2-1, the angle
table is ``[a, a]`` (the frequencies repeated once) and the rotation pairs dim i with
dim i + h/2 ("rotate_half", non-interleaved):
``out = x * cos(angle) + rotate_half(x) * sin(angle)``.

Only real arithmetic (no complex numbers, no gather on a precomputed table) so that
the ONNX exporter and TensorRT take the graph as is.

Two forms:
- :func:`apply_rope2d` (x, pos): self-contained, for one call.
- :func:`rope2d_cos_sin` once per forward + :func:`apply_rope2d_cos_sin` per layer:
  the same numbers without recomputing the trigonometry in every attention layer.
"""
from __future__ import annotations

from typing import Tuple

import torch
from torch import nn

__all__ = ["RoPE2D", "apply_rope2d", "rope2d_cos_sin", "apply_rope2d_cos_sin", "rope_inv_freq"]


def rope_inv_freq(half_dim: int, base: float = 100.0, device=None) -> torch.Tensor:
    """Inverse frequencies [half_dim/2] (float32, radians per patch) for one axis of size ``half_dim``.

    Computed in float32 exactly as ``1 / base^(arange(0, half_dim, 2) / half_dim)`` so that
    the angles are bit-identical to the published CroCo/VGGT implementations.
    """
    if half_dim % 2:
        raise ValueError(f"RoPE2D needs head_dim divisible by 4, got half_dim={half_dim}")
    return 1.0 / (base ** (torch.arange(0, half_dim, 2, device=device).float() / half_dim))


def rope2d_cos_sin(
    pos: torch.Tensor, head_dim: int, base: float = 100.0, dtype: torch.dtype = torch.float32
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Rotation tables for token positions.

    pos: [B, N, 2] integer (or integral float) positions as (y, x) in patch units; B may
    be 1 to broadcast over a batch. head_dim: D of the q/k it will rotate (divisible by 4).
    Returns (cos, sin), each [B, 1, N, head_dim] in ``dtype``: first half from y, second from x.
    """
    if pos.dim() != 3 or pos.shape[-1] != 2:
        raise ValueError(f"RoPE2D positions must be [B,N,2] (y,x), got {tuple(pos.shape)}")
    if head_dim % 4:
        raise ValueError(f"RoPE2D needs head_dim divisible by 4, got {head_dim}")
    inv_freq = rope_inv_freq(head_dim // 2, base, device=pos.device)
    # Angles in float32 even for fp16 models: fp16 angles lose whole radians at large positions.
    p = pos.to(torch.float32)
    ay = p[..., 0:1] * inv_freq
    ax = p[..., 1:2] * inv_freq
    ang = torch.cat((ay, ay, ax, ax), dim=-1).unsqueeze(1)
    return ang.cos().to(dtype), ang.sin().to(dtype)


def _rotate_halves(x: torch.Tensor) -> torch.Tensor:
    # rotate_half inside each of the two (y, x) halves: [a, b] -> [-b, a] with a, b of size D/4.
    D = x.shape[-1]
    q = D // 4
    a1, b1, a2, b2 = x[..., :q], x[..., q : 2 * q], x[..., 2 * q : 3 * q], x[..., 3 * q :]
    return torch.cat((-b1, a1, -b2, a2), dim=-1)


def apply_rope2d_cos_sin(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate q or k x [B, heads, N, D] with tables from :func:`rope2d_cos_sin` ([B|1, 1, N, D])."""
    return x * cos + _rotate_halves(x) * sin


def apply_rope2d(x: torch.Tensor, pos: torch.Tensor, base: float = 100.0) -> torch.Tensor:
    """Rotate q or k by 2D token positions.

    x: [B, heads, N, D] queries or keys (any float dtype), D divisible by 4.
    pos: [B, N, 2] integer (or integral float) token positions as (y, x) in patch units
    (B may be 1 to broadcast).
    base: frequency base (100 for CroCo/Reloc3r and VGGT).
    Returns a tensor shaped and typed like ``x``.
    """
    if x.dim() != 4:
        raise ValueError(f"apply_rope2d expects x [B,H,N,D], got {tuple(x.shape)}")
    cos, sin = rope2d_cos_sin(pos, x.shape[-1], base, x.dtype)
    return apply_rope2d_cos_sin(x, cos, sin)


class RoPE2D(nn.Module):
    """Module form of :func:`apply_rope2d` (no parameters, no buffers in the state dict).

    forward(x [B, heads, N, D], pos [B, N, 2] as (y, x)) -> [B, heads, N, D].
    """

    def __init__(self, base: float = 100.0) -> None:
        super().__init__()
        self.base = float(base)

    def forward(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        return apply_rope2d(x, pos, self.base)

    def extra_repr(self) -> str:
        return f"base={self.base}"
