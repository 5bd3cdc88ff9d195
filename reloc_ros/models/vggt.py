"""VGGT aggregator + camera head, an independent implementation.

Parameter names and shapes equal the ``aggregator.*`` and ``camera_head.*`` entries of
the published ``VGGT`` module (``vggt1b_state_dict_keys.txt``), so ``facebook/VGGT-1B``'s
``model.pt`` loads them strictly (its depth / point / track heads are skipped); outputs
reproduce the published module on CPU float32 (checked against ``vggt_compact_io.pt``).

Architecture (docs/models_vggt.md):
- Patch embedding: a DINOv2 ViT with register tokens (ViT-L/14, 4 registers in VGGT-1B),
  learned absolute position embedding at 518 px bicubically (antialiased) resized to the
  input grid; only its normalised patch tokens are kept.
- Each frame's token sequence is [camera token, register tokens, patch tokens]; the
  first frame of a sequence gets its own camera/register token (index 0), every other
  frame shares index 1. ``patch_start_idx`` = 1 + registers.
- ``depth`` x (frame block, global block): frame attention runs within each frame,
  global attention over all frames' tokens. Both use qk-LayerNorm, LayerScale and 2D
  RoPE (base 100) at patch positions (y+1, x+1), special tokens at (0, 0).
- Camera head: the last layer's camera tokens [B, S, 2C] go through 4 refinement
  iterations (adaLN modulation by the embedded previous estimate, a small transformer
  over the S frames, MLP delta) giving pose encodings [B, S, 9].

Conventions
- Images ``[B, S, 3, H, W]`` (or ``[S, 3, H, W]``) RGB float in [0, 1]; H, W multiples of 14.
- Pose encoding ``[..., 9]`` = translation (3), quaternion xyzw (4, not normalised),
  fov_h, fov_w (radians). The extrinsics it encodes are camera-from-world [3, 4] with
  world = the first frame's camera (OpenCV axes); translations are in VGGT's normalised
  scene scale, not metres.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from reloc_ros.models.rope import apply_rope2d_cos_sin, rope2d_cos_sin
from reloc_ros.types import InvalidInputError

if TYPE_CHECKING:  # pragma: no cover
    from reloc_ros.models.checkpoints import KeyCheck

__all__ = [
    "VGGTConfig",
    "VGGT",
    "Aggregator",
    "CameraHead",
    "DinoV2",
    "build_vggt",
    "load_vggt_weights",
    "pose_encoding_to_extri_intri",
    "extri_intri_to_pose_encoding",
    "quat_to_mat",
    "mat_to_quat",
    "extrinsics_to_T_world_cam",
    "VGGT_SKIPPED_HEADS",
]

# Heads of the published VGGT that the localizer never runs; their weights are skipped.
VGGT_SKIPPED_HEADS = ("depth_head.", "point_head.", "track_head.")

_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)

# Sizes of the DINOv2 variants the published aggregator can take (name -> dim, depth, heads).
_DINO_PRESETS = {
    "dinov2_vits14_reg": (384, 12, 6),
    "dinov2_vitb14_reg": (768, 12, 12),
    "dinov2_vitl14_reg": (1024, 24, 16),
}


# ----------------------------------------------------------------------------- config


@dataclass(frozen=True)
class VGGTConfig:
    """Sizes of the VGGT aggregator + camera head; defaults are the published VGGT-1B.

    img_size: resolution (px) of DINOv2's learned position-embedding grid (518).
    patch_size: pixels per patch side (14).
    embed_dim / depth / num_heads: aggregator width (1024), alternating block pairs (24),
      heads (16). mlp_ratio: MLP hidden width over block width (4).
    num_register_tokens: aggregator register tokens per frame (4).
    dino_embed_dim / dino_depth / dino_num_heads / dino_mlp_ratio / dino_num_register_tokens:
      the DINOv2 patch embedding (ViT-L/14 with 4 registers: 1024 / 24 / 16 / 4 / 4);
      dino_embed_dim must equal embed_dim.
    head_dim_in: camera-head width, 2 * embed_dim (2048). head_trunk_depth: its
      transformer blocks (4). head_num_heads: its heads (16).
    num_iterations: camera-head refinement iterations (4).
    rope_base: 2D RoPE frequency base (100).
    """

    img_size: int = 518
    patch_size: int = 14
    embed_dim: int = 1024
    depth: int = 24
    num_heads: int = 16
    mlp_ratio: float = 4.0
    num_register_tokens: int = 4
    dino_embed_dim: int = 1024
    dino_depth: int = 24
    dino_num_heads: int = 16
    dino_mlp_ratio: float = 4.0
    dino_num_register_tokens: int = 4
    head_dim_in: int = 2048
    head_trunk_depth: int = 4
    head_num_heads: int = 16
    num_iterations: int = 4
    rope_base: float = 100.0

    @classmethod
    def from_dict(cls, d: Optional[Mapping[str, Any]] = None) -> "VGGTConfig":
        """Validated config from ``{}`` (VGGT-1B), a flat dict of field names, or the
        fixture's nested form ``{'aggregator': {...}, 'camera_head': {...},
        'patch_embed_dinov2': {...}}`` (keys named as the published constructors name them).
        Unknown keys raise ValueError."""
        d = dict(d or {})
        flat: Dict[str, Any] = {}
        nested = {"aggregator", "camera_head", "patch_embed_dinov2"}
        if set(d) & nested:
            extra = sorted(set(d) - nested)
            if extra:
                raise ValueError(f"unknown VGGT config keys {extra} next to {sorted(nested)}")
            agg = dict(d.get("aggregator", {}))
            pe_name = agg.pop("patch_embed", "dinov2_vitl14_reg")
            if pe_name not in _DINO_PRESETS:
                raise ValueError(f"unsupported patch_embed {pe_name!r}; known: {sorted(_DINO_PRESETS)}")
            pdim, pdepth, pheads = _DINO_PRESETS[pe_name]
            flat.update(dino_embed_dim=pdim, dino_depth=pdepth, dino_num_heads=pheads)
            _take(agg, flat, "aggregator", {
                "img_size": "img_size", "patch_size": "patch_size", "embed_dim": "embed_dim",
                "depth": "depth", "num_heads": "num_heads", "mlp_ratio": "mlp_ratio",
                "num_register_tokens": "num_register_tokens"})
            dino = dict(d.get("patch_embed_dinov2", {}))
            dino.pop("note", None)
            _take(dino, flat, "patch_embed_dinov2", {
                "embed_dim": "dino_embed_dim", "depth": "dino_depth", "num_heads": "dino_num_heads",
                "mlp_ratio": "dino_mlp_ratio", "num_register_tokens": "dino_num_register_tokens"})
            head = dict(d.get("camera_head", {}))
            _take(head, flat, "camera_head", {
                "dim_in": "head_dim_in", "trunk_depth": "head_trunk_depth", "num_heads": "head_num_heads",
                "num_iterations": "num_iterations"})
            if "head_dim_in" not in flat and "embed_dim" in flat:
                flat["head_dim_in"] = 2 * flat["embed_dim"]
        else:
            names = set(cls.__dataclass_fields__)
            unknown = sorted(set(d) - names)
            if unknown:
                raise ValueError(f"unknown VGGT config keys {unknown}; known: {sorted(names)}")
            flat = d
            if "embed_dim" in flat and "head_dim_in" not in flat:
                flat["head_dim_in"] = 2 * int(flat["embed_dim"])
        cfg = cls(**flat)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        """Raise ValueError for sizes the architecture cannot take."""
        if self.dino_embed_dim != self.embed_dim:
            raise ValueError(f"DINOv2 width {self.dino_embed_dim} must equal the aggregator width {self.embed_dim}")
        if self.head_dim_in != 2 * self.embed_dim:
            raise ValueError(f"camera head width {self.head_dim_in} must be 2 * embed_dim = {2 * self.embed_dim}")
        if self.img_size <= 0 or self.img_size % self.patch_size:
            raise ValueError(f"img_size {self.img_size} must be a positive multiple of patch_size {self.patch_size}")
        for dim, heads, what, rope in (
            (self.embed_dim, self.num_heads, "aggregator", True),
            (self.dino_embed_dim, self.dino_num_heads, "DINOv2", False),
            (self.head_dim_in, self.head_num_heads, "camera head", False),
        ):
            if heads <= 0 or dim % heads or (rope and (dim // heads) % 4):
                raise ValueError(f"{what}: width {dim} / heads {heads} must divide (head_dim % 4 == 0 with RoPE)")
        if min(self.depth, self.dino_depth, self.head_trunk_depth, self.num_iterations) <= 0:
            raise ValueError(f"invalid VGGT sizes {asdict(self)}")
        if self.num_register_tokens < 0 or self.dino_num_register_tokens < 0:
            raise ValueError("register token counts must be >= 0")

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)

    @property
    def patch_start_idx(self) -> int:
        """Index of the first patch token in each frame's sequence (1 camera + registers)."""
        return 1 + self.num_register_tokens


def _take(src: Dict[str, Any], dst: Dict[str, Any], where: str, mapping: Mapping[str, str]) -> None:
    unknown = sorted(set(src) - set(mapping))
    if unknown:
        raise ValueError(f"unknown VGGT {where} config keys {unknown}; known: {sorted(mapping)}")
    for k, v in src.items():
        dst[mapping[k]] = v


# ----------------------------------------------------------------------------- blocks


class LayerScale(nn.Module):
    """Per-channel learned residual scale ``x * gamma`` (gamma [dim])."""

    def __init__(self, dim: int, init_values: float) -> None:
        super().__init__()
        self.init_values = float(init_values)
        self.gamma = nn.Parameter(torch.full((dim,), self.init_values))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class Mlp(nn.Module):
    """fc1 -> exact-erf GELU -> fc2 on [..., in_dim] -> [..., out_dim]."""

    def __init__(self, in_dim: int, hidden: int, out_dim: Optional[int] = None) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, out_dim or in_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


Rope = Optional[Tuple[torch.Tensor, torch.Tensor]]


class Attention(nn.Module):
    """Multi-head self-attention with optional qk-LayerNorm (eps 1e-5) and 2D RoPE.

    ``qkv_heads`` and ``out`` are exposed separately so that the Reloc-VGGT sparse
    masks can route queries to chosen keys (and reuse cached keys/values).
    """

    def __init__(self, dim: int, num_heads: int, qk_norm: bool) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        if qk_norm:
            self.q_norm = nn.LayerNorm(self.head_dim)
            self.k_norm = nn.LayerNorm(self.head_dim)
        else:
            self.q_norm = nn.Identity()
            self.k_norm = nn.Identity()
        self.proj = nn.Linear(dim, dim)

    def qkv_heads(self, x: torch.Tensor, rope: Rope = None) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [B, N, C] -> q, k, v each [B, heads, N, head_dim] (q, k normed and rotated)."""
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q = apply_rope2d_cos_sin(q, *rope)
            k = apply_rope2d_cos_sin(k, *rope)
        return q, k, v

    def out(self, o: torch.Tensor) -> torch.Tensor:
        """Attention output [B, heads, N, head_dim] -> projected [B, N, C]."""
        B, _, N, _ = o.shape
        return self.proj(o.transpose(1, 2).reshape(B, N, self.num_heads * self.head_dim))

    def forward(self, x: torch.Tensor, rope: Rope = None) -> torch.Tensor:
        q, k, v = self.qkv_heads(x, rope)
        return self.out(F.scaled_dot_product_attention(q, k, v))


class Block(nn.Module):
    """Pre-norm transformer block with LayerScale: x += ls1(attn(n1 x)); x += ls2(mlp(n2 x))."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, init_values: float,
                 qk_norm: bool = False, ln_eps: float = 1e-5) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=ln_eps)
        self.attn = Attention(dim, num_heads, qk_norm)
        self.ls1 = LayerScale(dim, init_values)
        self.norm2 = nn.LayerNorm(dim, eps=ln_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.ls2 = LayerScale(dim, init_values)

    def forward(self, x: torch.Tensor, rope: Rope = None) -> torch.Tensor:
        x = x + self.ls1(self.attn(self.norm1(x), rope))
        return self.ffn(x)

    def ffn(self, x: torch.Tensor) -> torch.Tensor:
        """Second half of the block (after the attention residual)."""
        return x + self.ls2(self.mlp(self.norm2(x)))


# ----------------------------------------------------------------------------- DINOv2


class PatchEmbed(nn.Module):
    """Conv patchify: [N, 3, H, W] -> [N, (H/p)(W/p), C], row-major (y, x)."""

    def __init__(self, patch_size: int, dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class DinoV2(nn.Module):
    """DINOv2 ViT with register tokens used as VGGT's patch embedding.

    forward(images [N, 3, H, W], ImageNet-normalised) -> patch tokens [N, (H/14)(W/14), C]
    after the final LayerNorm (the published ``x_norm_patchtokens``); the class and
    register outputs are dropped. ``mask_token`` is kept only so that published
    checkpoints load strictly (VGGT never masks).
    """

    def __init__(self, img_size: int, patch_size: int, dim: int, depth: int, num_heads: int,
                 mlp_ratio: float, num_register_tokens: int) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.num_register_tokens = num_register_tokens
        grid = img_size // patch_size
        self.grid = grid
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + grid * grid, dim))
        self.register_tokens = nn.Parameter(torch.zeros(1, num_register_tokens, dim))
        self.mask_token = nn.Parameter(torch.zeros(1, dim), requires_grad=False)
        self.patch_embed = PatchEmbed(patch_size, dim)
        self.blocks = nn.ModuleList(
            [Block(dim, num_heads, mlp_ratio, init_values=1.0, qk_norm=False, ln_eps=1e-6) for _ in range(depth)]
        )
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        # (h, w, pos_embed version) -> resized table; the bicubic resize depends only on the grid.
        self._pos_cache: Dict[Tuple[int, int], Tuple[int, torch.Tensor]] = {}

    def resized_pos_embed(self, h: int, w: int) -> torch.Tensor:
        """Position embedding [1, 1 + h*w, C] for an h x w patch grid.

        The learned grid is bicubically resized (antialiased, output size given
        exactly) as the published DINOv2 does; the square native grid is used as is.
        Cached per grid size: it is a function of the weights and the grid only, and
        caching keeps the resize out of exported ONNX graphs.
        """
        pe = self.pos_embed
        # int(): under ONNX tracing the grid arrives as traced scalars.
        h, w = int(h), int(w)
        if h == w == self.grid:
            return pe
        key = (h, w)
        hit = self._pos_cache.get(key)
        ver = (pe._version, pe.data_ptr(), pe.dtype, pe.device)
        if hit is not None and hit[0] == ver:
            return hit[1]
        pe32 = pe if pe.dtype == torch.float64 else pe.float()  # float64 stays exact (training checks)
        dim = pe32.shape[-1]
        g = self.grid
        patch = pe32[:, 1:].reshape(1, g, g, dim).permute(0, 3, 1, 2)
        patch = F.interpolate(patch, size=(h, w), mode="bicubic", antialias=True)
        patch = patch.permute(0, 2, 3, 1).reshape(1, h * w, dim)
        out = torch.cat((pe32[:, :1], patch), dim=1).to(pe.dtype)
        if not pe.requires_grad or not torch.is_grad_enabled():
            self._pos_cache[key] = (ver, out)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        N, _, H, W = x.shape
        p = self.patch_size
        tok = self.patch_embed(x)
        tok = torch.cat((self.cls_token.expand(N, -1, -1), tok), dim=1)
        tok = tok + self.resized_pos_embed(H // p, W // p)
        if self.num_register_tokens:
            tok = torch.cat((tok[:, :1], self.register_tokens.expand(N, -1, -1), tok[:, 1:]), dim=1)
        for blk in self.blocks:
            tok = blk(tok)
        tok = self.norm(tok)
        return tok[:, 1 + self.num_register_tokens:]


# ----------------------------------------------------------------------------- aggregator


def special_token_positions(h: int, w: int, num_special: int, device=None) -> torch.Tensor:
    """Token positions [1, num_special + h*w, 2] (y, x) of one frame: special tokens at
    (0, 0), patch (i, j) at (i + 1, j + 1), row-major."""
    ys = torch.arange(h, device=device).repeat_interleave(w) + 1
    xs = torch.arange(w, device=device).repeat(h) + 1
    pos = torch.stack((ys, xs), dim=-1)
    pos = torch.cat((torch.zeros(num_special, 2, dtype=pos.dtype, device=device), pos), dim=0)
    return pos.unsqueeze(0)


def frame_special_tokens(token: torch.Tensor, B: int, S: int) -> torch.Tensor:
    """Expand a learned ``[1, 2, X, C]`` token to ``[B*S, X, C]``: index 0 for each
    sequence's first frame, index 1 for the others."""
    first = token[:, :1].expand(B, 1, -1, -1)
    rest = token[:, 1:].expand(B, S - 1, -1, -1)
    return torch.cat((first, rest), dim=1).reshape(B * S, token.shape[2], token.shape[3])


class Aggregator(nn.Module):
    """VGGT's alternating-attention aggregator.

    ``forward(images [B, S, 3, H, W] in [0, 1])`` returns ``(tokens_list, patch_start_idx)``:
    ``depth`` tensors ``[B, S, P, 2C]`` (cat of each layer's frame-block and global-block
    output) with P = patch_start_idx + (H/14)(W/14).
    """

    def __init__(self, cfg: VGGTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        C = cfg.embed_dim
        self.patch_size = cfg.patch_size
        self.patch_start_idx = cfg.patch_start_idx
        self.camera_token = nn.Parameter(torch.zeros(1, 2, 1, C))
        self.register_token = nn.Parameter(torch.zeros(1, 2, cfg.num_register_tokens, C))
        self.patch_embed = DinoV2(cfg.img_size, cfg.patch_size, cfg.dino_embed_dim, cfg.dino_depth,
                                  cfg.dino_num_heads, cfg.dino_mlp_ratio, cfg.dino_num_register_tokens)
        self.frame_blocks = nn.ModuleList(
            [Block(C, cfg.num_heads, cfg.mlp_ratio, init_values=0.01, qk_norm=True) for _ in range(cfg.depth)]
        )
        self.global_blocks = nn.ModuleList(
            [Block(C, cfg.num_heads, cfg.mlp_ratio, init_values=0.01, qk_norm=True) for _ in range(cfg.depth)]
        )
        self.register_buffer("_mean", torch.tensor(_IMAGENET_MEAN).view(1, 1, 3, 1, 1), persistent=False)
        self.register_buffer("_std", torch.tensor(_IMAGENET_STD).view(1, 1, 3, 1, 1), persistent=False)

    @property
    def dtype(self) -> torch.dtype:
        return self.camera_token.dtype

    def check_images(self, images: torch.Tensor) -> torch.Tensor:
        """Validate images and return them as [B, S, 3, H, W] in the model's dtype."""
        if images.dim() == 4:
            images = images.unsqueeze(0)
        if images.dim() != 5 or images.shape[2] != 3:
            raise InvalidInputError(f"VGGT expects images [B,S,3,H,W] or [S,3,H,W], got {tuple(images.shape)}")
        H, W = images.shape[-2:]
        p = self.patch_size
        if H % p or W % p or H == 0 or W == 0:
            raise InvalidInputError(f"image size {H}x{W} is not a positive multiple of the patch size {p}")
        if images.shape[1] < 1:
            raise InvalidInputError("VGGT needs at least one frame")
        return images.to(self.dtype)

    def rope(self, h: int, w: int, device=None) -> Tuple[torch.Tensor, torch.Tensor]:
        """RoPE tables (cos, sin) [1, 1, P, head_dim] of one frame's tokens."""
        pos = special_token_positions(h, w, self.patch_start_idx, device)
        return rope2d_cos_sin(pos, self.cfg.embed_dim // self.cfg.num_heads, self.cfg.rope_base, self.dtype)

    def embed_frames(self, images: torch.Tensor) -> torch.Tensor:
        """Per-frame input tokens [B*S, P, C] (camera, registers, DINOv2 patch tokens) of
        images [B, S, 3, H, W] in [0, 1]; frame 0 of each sequence gets special index 0."""
        B, S, _, H, W = images.shape
        x = (images - self._mean.to(images.dtype)) / self._std.to(images.dtype)
        patches = self.patch_embed(x.reshape(B * S, 3, H, W))
        cam = frame_special_tokens(self.camera_token, B, S)
        reg = frame_special_tokens(self.register_token, B, S)
        return torch.cat((cam, reg, patches), dim=1)

    def run_blocks(self, tokens: torch.Tensor, B: int, S: int, rope: Tuple[torch.Tensor, torch.Tensor],
                   keep_all: bool = True) -> List[torch.Tensor]:
        """Alternate frame and global attention on tokens [B*S, P, C].

        rope: one frame's tables [1, 1, P, d]. Returns the per-layer outputs
        [B, S, P, 2C] (all layers, or only the last one when ``keep_all`` is False).
        """
        P, C = tokens.shape[1], tokens.shape[2]
        rope_g = (rope[0].repeat(1, 1, S, 1), rope[1].repeat(1, 1, S, 1))
        out: List[torch.Tensor] = []
        x = tokens
        n = len(self.frame_blocks)
        for i, (fb, gb) in enumerate(zip(self.frame_blocks, self.global_blocks)):
            x = fb(x.reshape(B * S, P, C), rope)
            f_out = x.reshape(B, S, P, C)
            x = gb(x.reshape(B, S * P, C), rope_g)
            g_out = x.reshape(B, S, P, C)
            if keep_all or i == n - 1:
                out.append(torch.cat((f_out, g_out), dim=-1))
        return out

    def forward(self, images: torch.Tensor) -> Tuple[List[torch.Tensor], int]:
        images = self.check_images(images)
        B, S, _, H, W = images.shape
        tokens = self.embed_frames(images)
        rope = self.rope(H // self.patch_size, W // self.patch_size, images.device)
        return self.run_blocks(tokens, B, S, rope), self.patch_start_idx


# ----------------------------------------------------------------------------- camera head


class CameraHead(nn.Module):
    """Iterative camera head: last-layer camera tokens [B, S, dim_in] -> list of
    ``num_iterations`` pose encodings [B, S, 9] (translation linear, quaternion
    linear, FoV through ReLU). Attention in its trunk runs over the S frames."""

    def __init__(self, dim_in: int, trunk_depth: int, num_heads: int, mlp_ratio: float = 4.0,
                 num_iterations: int = 4) -> None:
        super().__init__()
        self.num_iterations = num_iterations
        self.trunk = nn.Sequential(*[Block(dim_in, num_heads, mlp_ratio, init_values=0.01) for _ in range(trunk_depth)])
        self.token_norm = nn.LayerNorm(dim_in)
        self.trunk_norm = nn.LayerNorm(dim_in)
        self.empty_pose_tokens = nn.Parameter(torch.zeros(1, 1, 9))
        self.embed_pose = nn.Linear(9, dim_in)
        self.poseLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim_in, 3 * dim_in))
        self.adaln_norm = nn.LayerNorm(dim_in, elementwise_affine=False, eps=1e-6)
        self.pose_branch = Mlp(dim_in, dim_in // 2, 9)

    def forward(self, tokens_list: Sequence[torch.Tensor], num_iterations: Optional[int] = None) -> List[torch.Tensor]:
        """tokens_list: aggregator outputs (only the last, [B, S, P, dim_in], is read)."""
        return self.from_camera_tokens(tokens_list[-1][:, :, 0], num_iterations)

    def from_camera_tokens(self, cam_tokens: torch.Tensor, num_iterations: Optional[int] = None) -> List[torch.Tensor]:
        """cam_tokens [B, S, dim_in] (last aggregator layer, token 0) -> list of [B, S, 9]."""
        x = self.token_norm(cam_tokens.to(self.embed_pose.weight.dtype))
        B, S, _ = x.shape
        normed = self.adaln_norm(x)
        pred = None
        outs: List[torch.Tensor] = []
        for _ in range(num_iterations or self.num_iterations):
            inp = self.empty_pose_tokens.expand(B, S, -1) if pred is None else pred.detach()
            shift, scale, gate = self.poseLN_modulation(self.embed_pose(inp)).chunk(3, dim=-1)
            h = gate * (normed * (1 + scale) + shift) + x
            h = self.trunk(h)
            delta = self.pose_branch(self.trunk_norm(h))
            pred = delta if pred is None else pred + delta
            outs.append(torch.cat((pred[..., :7], F.relu(pred[..., 7:])), dim=-1))
        return outs


# ----------------------------------------------------------------------------- model


class VGGT(nn.Module):
    """VGGT with the aggregator and camera head only (the published attribute names).

    ``model(images)`` -> dict(pose_enc [B, S, 9], pose_enc_list, extrinsic [B, S, 3, 4],
    intrinsic [B, S, 3, 3]) with images [B, S, 3, H, W] in [0, 1].
    """

    def __init__(self, config: Optional[VGGTConfig] = None) -> None:
        super().__init__()
        cfg = config or VGGTConfig()
        cfg.validate()
        self.config = cfg
        self.aggregator = Aggregator(cfg)
        self.camera_head = CameraHead(cfg.head_dim_in, cfg.head_trunk_depth, cfg.head_num_heads,
                                      cfg.mlp_ratio, cfg.num_iterations)
        if self.aggregator.camera_token.device.type != "meta":
            init_vggt_weights(self)

    def set_precision(self, dtype: torch.dtype) -> "VGGT":
        """Aggregator in ``dtype`` (float32/float16/bfloat16); the camera head stays float32
        as in the published inference code (heads run with autocast disabled)."""
        self.aggregator.to(dtype)
        self.camera_head.to(torch.float32)
        return self

    def forward(self, images: torch.Tensor) -> Dict[str, Any]:
        tokens, _ = self.aggregator(images)
        enc = self.camera_head([tokens[-1].float()])
        H, W = images.shape[-2:]
        ext, intr = pose_encoding_to_extri_intri(enc[-1], (H, W))
        return {"pose_enc": enc[-1], "pose_enc_list": enc, "extrinsic": ext, "intrinsic": intr}


def init_vggt_weights(model: nn.Module) -> None:
    """Random initialisation for tests and benchmarks (published weights are loaded over it):
    truncated-normal (std 0.02) Linear weights, zero biases, tiny special tokens."""
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm) and m.elementwise_affine:
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, LayerScale):
            nn.init.constant_(m.gamma, m.init_values)
        elif isinstance(m, DinoV2):
            nn.init.trunc_normal_(m.pos_embed, std=0.02)
            nn.init.normal_(m.cls_token, std=1e-6)
            nn.init.normal_(m.register_tokens, std=1e-6)
            nn.init.zeros_(m.mask_token)
        elif isinstance(m, Aggregator):
            nn.init.normal_(m.camera_token, std=1e-6)
            nn.init.normal_(m.register_token, std=1e-6)
        elif isinstance(m, CameraHead):
            nn.init.zeros_(m.empty_pose_tokens)


def build_vggt(config: Optional[Mapping[str, Any]] = None, device: Union[str, torch.device] = "cpu") -> VGGT:
    """Build the VGGT aggregator + camera head with random weights, in eval mode.

    config: the fixture's ``config`` dict, a flat dict of ``VGGTConfig`` fields, or ``{}``
    for VGGT-1B. device: ``'meta'`` builds the architecture without allocating or
    initialising any weight (1.1 B parameters for VGGT-1B), e.g. to compare names/shapes.
    """
    cfg = VGGTConfig.from_dict(config)
    with torch.device(device):
        model = VGGT(cfg)
    return model.eval()


# ----------------------------------------------------------------------------- weights


def load_vggt_weights(model: nn.Module, source: Union[str, Path, Mapping[str, torch.Tensor]],
                      optional_prefixes: Sequence[str] = ()) -> KeyCheck:
    """Load published VGGT weights strictly into ``model`` (a VGGT, or any module with
    the same ``aggregator`` / ``camera_head`` children).

    source: a checkpoint path (``model.pt`` of facebook/VGGT-1B, a safetensors copy, or
    a ``{'model': ...}`` wrapper; read without unpickling code) or a state dict.
    Names under the depth/point/track heads are skipped. Every other name of the model
    must be present with its exact shape, and nothing else may be left over, except
    names under ``optional_prefixes`` (e.g. an untrained ``pose_tokenizer.``), which
    keep their initial values when the file lacks them.
    Raises CheckpointError listing missing / unexpected / mis-shaped names.
    """
    from reloc_ros.models.checkpoints import (CheckpointError, check_state_dict, expected_shapes,
                                              normalize_layout, read_state_dict)

    raw = read_state_dict(source) if isinstance(source, (str, Path)) else dict(source)
    expected = expected_shapes(model)
    state, layout, remapped = normalize_layout(raw, expected)
    present_optional = {k for k in expected if k.startswith(tuple(optional_prefixes)) and k in state}
    required = {k: v for k, v in expected.items()
                if not k.startswith(tuple(optional_prefixes)) or k in present_optional}
    chk = check_state_dict(state, required, VGGT_SKIPPED_HEADS, layout, remapped)
    if not chk.ok:
        where = source if isinstance(source, (str, Path)) else "state dict"
        raise CheckpointError(f"{where} does not fit {type(model).__name__}:\n{chk.summary()}")
    model.load_state_dict({k: v for k, v in state.items() if k in required}, strict=False)
    return chk


# ----------------------------------------------------------------------------- pose encoding


def quat_to_mat(q: torch.Tensor) -> torch.Tensor:
    """Rotation matrices [..., 3, 3] of quaternions [..., 4] (x, y, z, w; any norm:
    the formula divides by |q|^2, as VGGT's decoder does)."""
    x, y, z, w = q.unbind(-1)
    two_s = 2.0 / (q * q).sum(-1)
    m = torch.stack((
        1 - two_s * (y * y + z * z), two_s * (x * y - z * w), two_s * (x * z + y * w),
        two_s * (x * y + z * w), 1 - two_s * (x * x + z * z), two_s * (y * z - x * w),
        two_s * (x * z - y * w), two_s * (y * z + x * w), 1 - two_s * (x * x + y * y),
    ), dim=-1)
    return m.reshape(q.shape[:-1] + (3, 3))


def mat_to_quat(R: torch.Tensor) -> torch.Tensor:
    """Unit quaternions [..., 4] (x, y, z, w) with w >= 0 of rotations [..., 3, 3]."""
    R64 = R.double()
    m = R64.reshape(-1, 3, 3)
    tr = m[:, 0, 0] + m[:, 1, 1] + m[:, 2, 2]
    # Four candidate formulas; each is well conditioned where its |component| is largest.
    cand = torch.stack((
        torch.stack((m[:, 2, 1] - m[:, 1, 2], m[:, 0, 2] - m[:, 2, 0], m[:, 1, 0] - m[:, 0, 1], 1 + tr), -1),
        torch.stack((1 + m[:, 0, 0] - m[:, 1, 1] - m[:, 2, 2], m[:, 0, 1] + m[:, 1, 0], m[:, 0, 2] + m[:, 2, 0],
                     m[:, 2, 1] - m[:, 1, 2]), -1),
        torch.stack((m[:, 0, 1] + m[:, 1, 0], 1 - m[:, 0, 0] + m[:, 1, 1] - m[:, 2, 2], m[:, 1, 2] + m[:, 2, 1],
                     m[:, 0, 2] - m[:, 2, 0]), -1),
        torch.stack((m[:, 0, 2] + m[:, 2, 0], m[:, 1, 2] + m[:, 2, 1], 1 - m[:, 0, 0] - m[:, 1, 1] + m[:, 2, 2],
                     m[:, 1, 0] - m[:, 0, 1]), -1),
    ), dim=1)  # [n, 4 candidates, 4]
    diag = torch.stack((1 + tr, 1 + m[:, 0, 0] - m[:, 1, 1] - m[:, 2, 2],
                        1 - m[:, 0, 0] + m[:, 1, 1] - m[:, 2, 2], 1 - m[:, 0, 0] - m[:, 1, 1] + m[:, 2, 2]), -1)
    best = diag.argmax(-1)
    q = cand[torch.arange(m.shape[0]), best]
    q = q / q.norm(dim=-1, keepdim=True)
    q = torch.where(q[:, 3:4] < 0, -q, q)
    return q.reshape(R.shape[:-2] + (4,)).to(R.dtype)


def pose_encoding_to_extri_intri(pose_enc: torch.Tensor, image_size_hw: Tuple[int, int]
                                 ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Decode pose encodings [..., 9] into extrinsics [..., 3, 4] (camera-from-world,
    world = first frame, OpenCV axes, VGGT's normalised scale) and intrinsics [..., 3, 3]
    (pixels, principal point at the image centre) for images of size (H, W) px."""
    H, W = float(image_size_hw[0]), float(image_size_hw[1])
    R = quat_to_mat(pose_enc[..., 3:7])
    ext = torch.cat((R, pose_enc[..., :3, None]), dim=-1)
    fy = (H / 2.0) / torch.tan(pose_enc[..., 7] / 2.0)
    fx = (W / 2.0) / torch.tan(pose_enc[..., 8] / 2.0)
    intr = torch.zeros(pose_enc.shape[:-1] + (3, 3), dtype=pose_enc.dtype, device=pose_enc.device)
    intr[..., 0, 0] = fx
    intr[..., 1, 1] = fy
    intr[..., 0, 2] = W / 2.0
    intr[..., 1, 2] = H / 2.0
    intr[..., 2, 2] = 1.0
    return ext, intr


def extri_intri_to_pose_encoding(extrinsics: torch.Tensor, intrinsics: Optional[torch.Tensor],
                                 image_size_hw: Tuple[int, int]) -> torch.Tensor:
    """Inverse of :func:`pose_encoding_to_extri_intri`: extrinsics [..., 3|4, 4]
    (camera-from-world), intrinsics [..., 3, 3] in pixels (or None: fov = 0) ->
    pose encodings [..., 9] (unit quaternion, w >= 0; fov in radians)."""
    H, W = float(image_size_hw[0]), float(image_size_hw[1])
    t = extrinsics[..., :3, 3]
    q = mat_to_quat(extrinsics[..., :3, :3])
    if intrinsics is None:
        fov = torch.zeros(t.shape[:-1] + (2,), dtype=t.dtype, device=t.device)
    else:
        fov_h = 2 * torch.atan((H / 2.0) / intrinsics[..., 1, 1])
        fov_w = 2 * torch.atan((W / 2.0) / intrinsics[..., 0, 0])
        fov = torch.stack((fov_h, fov_w), dim=-1).to(t.dtype)
    return torch.cat((t, q, fov), dim=-1)


def extrinsics_to_T_world_cam(extrinsics: Union[np.ndarray, torch.Tensor]) -> np.ndarray:
    """Camera-to-world poses [..., 4, 4] float64 from camera-from-world extrinsics
    [..., 3, 4] (rotation re-orthonormalised: VGGT's quaternions need not be unit)."""
    E = extrinsics.detach().cpu().double().numpy() if isinstance(extrinsics, torch.Tensor) else np.asarray(extrinsics, np.float64)
    R = E[..., :3, :3]
    U, _, Vt = np.linalg.svd(R)
    d = np.sign(np.linalg.det(U @ Vt))
    U[..., :, 2] *= d[..., None]
    R = U @ Vt
    t = E[..., :3, 3]
    T = np.zeros(E.shape[:-2] + (4, 4))
    Rt = np.swapaxes(R, -1, -2)
    T[..., :3, :3] = Rt
    T[..., :3, 3] = -(Rt @ t[..., None])[..., 0]
    T[..., 3, 3] = 1.0
    return T
