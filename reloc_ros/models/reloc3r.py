"""Reloc3r relative pose network, an independent implementation of ``Reloc3rRelpose``.

Parameter names and shapes equal the official ones (``reloc3r_state_dict_keys.txt``),
so official checkpoints load with ``strict=True``; outputs reproduce the official
module on CPU float32 (checked against ``reloc3r_tiny_io.pt`` in the tests).

Architecture (see docs/models_reloc3r.md): a ViT encoder with 2D RoPE on 16x16
patches (no absolute position embedding), a siamese cross-attention decoder whose
weights are shared by both views, and a pose head (1x1 residual convs, average pool,
MLP) regressing a translation (3, direction only) and a 9D rotation projected onto
SO(3) by SVD.

Conventions
- Images: ``[B, 3, H, W]`` float in [-1, 1] (RGB, ``(x/255 - 0.5) / 0.5``), H and W
  multiples of the patch size. ``true_shape`` ``[B, 2]`` is (H, W) of the real image.
- Tokens: ``[B, N, C]`` with N = (H/16)(W/16) in row-major (y, then x) order and
  positions ``[B, N, 2]`` as integer (y, x) patch indices.
- ``pose2`` ``[B, 4, 4]`` maps camera-2 points into camera 1 (``T_cam1_cam2``, OpenCV
  axes); ``pose1`` maps camera 1 into camera 2. The translation's magnitude is
  meaningless (trained with an angular loss): only its direction carries information.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from reloc_ros.models.rope import apply_rope2d_cos_sin, rope2d_cos_sin
from reloc_ros.types import InvalidInputError

__all__ = [
    "Reloc3rConfig",
    "Reloc3rNet",
    "build_reloc3r",
    "rot9_to_rotation",
    "raw_to_pose",
    "patch_positions",
    "preprocess_image",
    "preprocess_transform",
    "views_from_images",
]

_LN_EPS = 1e-6  # every LayerNorm of the published model


@dataclass(frozen=True)
class Reloc3rConfig:
    """Sizes of the Reloc3r network; the defaults are the published Reloc3r-224/512.

    img_size: 224 or 512, the preprocessing resolution (long side; affects no parameter).
    patch_size: pixels per patch side (16).
    enc_embed_dim / enc_depth / enc_num_heads: ViT encoder width (1024), blocks (24), heads (16).
    dec_embed_dim / dec_depth / dec_num_heads: decoder width (768), blocks (12), heads (12).
    mlp_ratio: MLP hidden width over the block width (4).
    head_width: pose head width (1024; equals 4 * 16^2 in the published model).
    rope_base: RoPE2D frequency base (100).
    """

    img_size: int = 512
    patch_size: int = 16
    enc_embed_dim: int = 1024
    enc_depth: int = 24
    enc_num_heads: int = 16
    dec_embed_dim: int = 768
    dec_depth: int = 12
    dec_num_heads: int = 12
    mlp_ratio: float = 4.0
    head_width: int = 1024
    rope_base: float = 100.0

    @classmethod
    def from_dict(cls, d: Optional[Mapping[str, Any]] = None) -> "Reloc3rConfig":
        """Validated config from a dict (a fixture's ``config``, ``{}`` or ``{'img_size': 512}``)."""
        d = dict(d or {})
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown Reloc3r config keys {unknown}; known: {sorted(names)}")
        cfg = cls(**d)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        """Raise ValueError for sizes the architecture cannot take."""
        if self.img_size <= 0 or self.img_size % self.patch_size:
            raise ValueError(f"img_size {self.img_size} must be a positive multiple of patch_size {self.patch_size}")
        for dim, heads, what in (
            (self.enc_embed_dim, self.enc_num_heads, "encoder"),
            (self.dec_embed_dim, self.dec_num_heads, "decoder"),
        ):
            if heads <= 0 or dim % heads or (dim // heads) % 4:
                raise ValueError(f"{what}: dim {dim} / heads {heads} must give a head_dim divisible by 4 (2D RoPE)")
        if min(self.enc_depth, self.dec_depth, self.patch_size, self.head_width) <= 0:
            raise ValueError(f"invalid Reloc3r sizes {asdict(self)}")

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)


# ----------------------------------------------------------------------------- blocks


class Mlp(nn.Module):
    """fc1 -> exact-erf GELU -> fc2, on [..., dim]."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    # [B, h, Nq, d] x [B, h, Nk, d] -> [B, Nq, h*d]; SDPA's default scale is d^-0.5 as published.
    out = F.scaled_dot_product_attention(q, k, v)
    return out.transpose(1, 2).flatten(2)


class SelfAttention(nn.Module):
    """Multi-head self-attention with 2D RoPE on q and k; one fused ``qkv`` Linear."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, rope: Tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).view(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        cos, sin = rope
        q = apply_rope2d_cos_sin(q, cos, sin)
        k = apply_rope2d_cos_sin(k, cos, sin)
        return self.proj(_attend(q, k, v))


class CrossAttention(nn.Module):
    """Multi-head cross-attention: queries from x (RoPE on x's positions), keys/values
    from the other view y (RoPE on y's positions for the keys)."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.projq = nn.Linear(dim, dim)
        self.projk = nn.Linear(dim, dim)
        self.projv = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        B, N, C = t.shape
        return t.view(B, N, self.num_heads, C // self.num_heads).transpose(1, 2)

    def forward(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        rope_x: Tuple[torch.Tensor, torch.Tensor],
        rope_y: Tuple[torch.Tensor, torch.Tensor],
    ) -> torch.Tensor:
        q = apply_rope2d_cos_sin(self._heads(self.projq(x)), *rope_x)
        k = apply_rope2d_cos_sin(self._heads(self.projk(y)), *rope_y)
        v = self._heads(self.projv(y))
        return self.proj(_attend(q, k, v))


class EncoderBlock(nn.Module):
    """Pre-norm ViT block: x += SA(LN x); x += MLP(LN x)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=_LN_EPS)
        self.attn = SelfAttention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=_LN_EPS)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor, rope: Tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), rope)
        return x + self.mlp(self.norm2(x))


class DecoderBlock(nn.Module):
    """x += SA(LN1 x); x += CA(LN2 x, LN_y y); x += MLP(LN3 x). Attribute order fixes the
    state-dict order of the published model (norm_y last)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=_LN_EPS)
        self.attn = SelfAttention(dim, num_heads)
        self.cross_attn = CrossAttention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=_LN_EPS)
        self.norm3 = nn.LayerNorm(dim, eps=_LN_EPS)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.norm_y = nn.LayerNorm(dim, eps=_LN_EPS)

    def forward(self, x, y, rope_x, rope_y) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), rope_x)
        x = x + self.cross_attn(self.norm2(x), self.norm_y(y), rope_x, rope_y)
        return x + self.mlp(self.norm3(x))


class PatchEmbed(nn.Module):
    """16x16 conv patchify: [B, 3, H, W] -> tokens [B, (H/p)(W/p), C], row-major (y, x)."""

    def __init__(self, patch_size: int, dim: int) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(3, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        return self.proj(img).flatten(2).transpose(1, 2)


class ResConvBlock(nn.Module):
    """x + relu(c3(relu(c2(relu(c1 x))))), each c a 1x1 conv (identity skip).

    A 1x1 convolution is a per-token linear map, so it runs as ``F.linear`` on tokens
    [B, N, C] with the conv weights viewed as [C, C]: the same numbers, without the
    slow CPU convolution path and with plain GEMMs in exported graphs.
    """

    def __init__(self, width: int) -> None:
        super().__init__()
        self.res_conv1 = nn.Conv2d(width, width, 1)
        self.res_conv2 = nn.Conv2d(width, width, 1)
        self.res_conv3 = nn.Conv2d(width, width, 1)

    @staticmethod
    def _pointwise(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, conv.weight.flatten(1), conv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: tokens [B, N, C]."""
        h = F.relu(self._pointwise(self.res_conv1, x))
        h = F.relu(self._pointwise(self.res_conv2, h))
        return x + F.relu(self._pointwise(self.res_conv3, h))


class PoseHead(nn.Module):
    """Last decoder tokens [B, N, dec_dim] -> (t_raw [B, 3], rot9_raw [B, 9]).

    1x1 convolutions and a global average pool see the tokens as an unordered set, so
    the spatial layout (landscape or portrait) does not change the result.
    """

    def __init__(self, dec_dim: int, width: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dec_dim, width)
        self.res_conv = nn.ModuleList([ResConvBlock(width) for _ in range(2)])
        self.more_mlps = nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU())
        self.fc_t = nn.Linear(width, 3)
        self.fc_rot = nn.Linear(width, 9)

    def forward(self, tokens: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        feat = self.proj(tokens)
        for blk in self.res_conv:
            feat = blk(feat)
        feat = self.more_mlps(feat.mean(dim=1))  # global average pool over the tokens
        return self.fc_t(feat), self.fc_rot(feat)


# ----------------------------------------------------------------------------- geometry


def rot9_to_rotation(rot9: torch.Tensor) -> torch.Tensor:
    """Closest rotation to the row-normalised 3x3 matrix of a raw 9D output.

    rot9: [B, 9] (row-major 3x3). Returns R [B, 3, 3] (float32 or float64 as given),
    det +1: each row is L2-normalised, then the special orthogonal Procrustes solution
    ``U diag(1, 1, det(U V^T)) V^T`` of the SVD ``M = U S V^T`` is taken. Runs outside
    the ONNX graph (SVD does not export).
    """
    M = F.normalize(rot9.reshape(-1, 3, 3), p=2, dim=-1)
    U, _, Vh = torch.linalg.svd(M)
    d = torch.det(U @ Vh)
    U = torch.cat([U[:, :, :2], U[:, :, 2:] * d.view(-1, 1, 1)], dim=2)
    return U @ Vh


def raw_to_pose(t_raw: torch.Tensor, rot9: torch.Tensor) -> torch.Tensor:
    """[B, 4, 4] relative pose from the head's raw translation [B, 3] and 9D rotation [B, 9]."""
    B = t_raw.shape[0]
    pose = torch.zeros(B, 4, 4, dtype=t_raw.dtype, device=t_raw.device)
    pose[:, :3, :3] = rot9_to_rotation(rot9.to(t_raw.dtype))
    pose[:, :3, 3] = t_raw
    pose[:, 3, 3] = 1.0
    return pose


def patch_positions(h: int, w: int, device=None) -> torch.Tensor:
    """Integer (y, x) positions [h*w, 2] of an h x w patch grid in row-major order."""
    ys = torch.arange(h, device=device).repeat_interleave(w)
    xs = torch.arange(w, device=device).repeat(h)
    return torch.stack((ys, xs), dim=-1)


# ----------------------------------------------------------------------------- network


class Reloc3rNet(nn.Module):
    """Reloc3r relative pose network with the published parameter names.

    Call as the official module: ``pose1, pose2 = net(view1, view2)`` with
    ``view = {'img': [B,3,H,W] in [-1,1], 'true_shape': [B,2] (H, W)}``; each pose is a
    dict with 'pose' [B,4,4] (float32) plus the head's raw 't_raw' [B,3] and 'rot9_raw'
    [B,9]. Portrait images follow the authors' convention: the tensor is landscape
    (W >= H) and a portrait ``true_shape`` says it was transposed, so it is transposed
    back before patchifying. Pair-level building blocks (``encode``, ``decode``,
    ``head``, ``pairs_from_tokens``) let callers cache encoder tokens.
    """

    def __init__(self, config: Optional[Reloc3rConfig] = None) -> None:
        super().__init__()
        cfg = config or Reloc3rConfig()
        cfg.validate()
        self.config = cfg
        self.patch_embed = PatchEmbed(cfg.patch_size, cfg.enc_embed_dim)
        self.enc_blocks = nn.ModuleList(
            [EncoderBlock(cfg.enc_embed_dim, cfg.enc_num_heads, cfg.mlp_ratio) for _ in range(cfg.enc_depth)]
        )
        self.enc_norm = nn.LayerNorm(cfg.enc_embed_dim, eps=_LN_EPS)
        self.decoder_embed = nn.Linear(cfg.enc_embed_dim, cfg.dec_embed_dim)
        self.dec_blocks = nn.ModuleList(
            [DecoderBlock(cfg.dec_embed_dim, cfg.dec_num_heads, cfg.mlp_ratio) for _ in range(cfg.dec_depth)]
        )
        self.dec_norm = nn.LayerNorm(cfg.dec_embed_dim, eps=_LN_EPS)
        self.pose_head = PoseHead(cfg.dec_embed_dim, cfg.head_width)
        self._init_weights()

    def _init_weights(self) -> None:
        # Random weights are only for tests and benchmarks; xavier keeps activations
        # in range through 24 blocks so that timings and tolerances are representative.
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    # -- dtype handling: the head always runs in float32, as published
    @property
    def backbone_dtype(self) -> torch.dtype:
        return self.patch_embed.proj.weight.dtype

    def set_precision(self, dtype: torch.dtype) -> "Reloc3rNet":
        """Cast encoder and decoder to ``dtype`` (float32/float16/bfloat16); the pose head stays float32."""
        for name, mod in self.named_children():
            mod.to(torch.float32 if name == "pose_head" else dtype)
        return self

    def _rope(self, pos: torch.Tensor, dim: int, heads: int) -> Tuple[torch.Tensor, torch.Tensor]:
        return rope2d_cos_sin(pos, dim // heads, self.config.rope_base, self.backbone_dtype)

    # -- stages
    def encode(self, img: torch.Tensor, true_shape: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """Encoder tokens of images.

        img: [B, 3, H, W] in [-1, 1], H and W multiples of 16. true_shape: [B, 2] (H, W)
        or None (= the tensor's own shape). A row of true_shape that is portrait (H > W)
        while the tensor is landscape marks a transposed image (authors' convention).
        Returns feat [B, N, enc_dim] (after enc_norm, backbone dtype) and pos [B, N, 2]
        (int64 (y, x) patch indices).
        """
        img = img.to(self.backbone_dtype)
        if img.dim() != 4 or img.shape[1] != 3:
            raise InvalidInputError(f"Reloc3r expects images [B,3,H,W], got {tuple(img.shape)}")
        B, _, H, W = img.shape
        p = self.config.patch_size
        if H % p or W % p:
            raise InvalidInputError(f"image size {H}x{W} is not a multiple of the patch size {p}")
        flip = torch.zeros(B, dtype=torch.bool)
        if true_shape is not None:
            ts = torch.as_tensor(true_shape).reshape(B, 2).cpu()
            ts_portrait = ts[:, 0] > ts[:, 1]
            if H > W and not bool(ts_portrait.all()):
                raise InvalidInputError(f"image tensor is portrait ({H}x{W}) but a true_shape is landscape")
            if W > H:
                # Authors' convention: a landscape tensor with a portrait true_shape is a
                # transposed portrait image; undo the transpose before patchifying.
                flip = ts_portrait
        if bool(flip.any()) and not bool(flip.all()):
            # Same token count either way, so the rows can be patchified apart and merged.
            feats, poss = zip(*(self.encode(img[i : i + 1], ts[i : i + 1]) for i in range(B)))
            return torch.cat(feats), torch.cat(poss)
        if B > 0 and bool(flip.all()):
            img = img.transpose(-1, -2)
        return self.encode_native(img)

    def encode_native(self, img: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Encoder tokens of images in their own orientation (no true_shape convention).

        img: [B, 3, H, W] in [-1, 1] (H, W multiples of 16; portrait allowed).
        Returns feat [B, (H/16)(W/16), enc_dim] and pos [B, N, 2] (y, x) patch indices.
        """
        B, _, H, W = img.shape
        p = self.config.patch_size
        x = self.patch_embed(img)
        pos = patch_positions(H // p, W // p, img.device).unsqueeze(0)
        rope = self._rope(pos, self.config.enc_embed_dim, self.config.enc_num_heads)
        for blk in self.enc_blocks:
            x = blk(x, rope)
        return self.enc_norm(x), pos.expand(B, -1, -1)

    def decode(
        self, feat1: torch.Tensor, pos1: torch.Tensor, feat2: torch.Tensor, pos2: torch.Tensor
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Siamese decoder on encoder tokens of the two views of each pair.

        feat1/feat2: [B, N1|N2, enc_dim] (B of either may be 1 to broadcast, e.g. one query
        against K keyframes); pos1/pos2: [B|1, N, 2]. Both views read the previous
        layer's tokens of the other view; one weight set serves both (both directions
        run as one batch). Returns the last layer's tokens after dec_norm,
        (dec1 [B, N1, dec_dim], dec2 [B, N2, dec_dim]).
        """
        # Broadcast a single view against a batch (one query vs K keyframes) without
        # Python max() on sizes, which would freeze the batch in a traced ONNX graph.
        if feat1.shape[0] == 1 and feat2.shape[0] != 1:
            feat1, pos1 = feat1.expand(feat2.shape[0], -1, -1), pos1[:1]
        elif feat2.shape[0] == 1 and feat1.shape[0] != 1:
            feat2, pos2 = feat2.expand(feat1.shape[0], -1, -1), pos2[:1]
        f1 = self.decoder_embed(feat1.to(self.backbone_dtype))
        f2 = self.decoder_embed(feat2.to(self.backbone_dtype))
        cfg = self.config
        r1 = self._rope(pos1, cfg.dec_embed_dim, cfg.dec_num_heads)
        r2 = self._rope(pos2, cfg.dec_embed_dim, cfg.dec_num_heads)
        if f1.shape[1] == f2.shape[1]:
            # Stack (view1 | view2) on the batch: one GEMM per layer for both directions.
            shape = (f1.shape[0], -1, -1, -1)
            rx = tuple(torch.cat((a.expand(shape), b.expand(shape))) for a, b in zip(r1, r2))
            ry = tuple(torch.cat((b.expand(shape), a.expand(shape))) for a, b in zip(r1, r2))
            x = torch.cat((f1, f2))
            for blk in self.dec_blocks:
                x1, x2 = x.chunk(2)
                x = blk(x, torch.cat((x2, x1)), rx, ry)
            x1, x2 = self.dec_norm(x).chunk(2)
            return x1, x2
        for blk in self.dec_blocks:
            f1, f2 = blk(f1, f2, r1, r2), blk(f2, f1, r2, r1)
        return self.dec_norm(f1), self.dec_norm(f2)

    def head(self, dec: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Pose head in float32 on last decoder tokens [B, N, dec_dim] -> (t_raw [B,3], rot9_raw [B,9])."""
        return self.pose_head(dec.float())

    def pairs_raw(
        self,
        feat1: torch.Tensor,
        pos1: torch.Tensor,
        feat2: torch.Tensor,
        pos2: torch.Tensor,
        both: bool = False,
    ) -> Tuple[torch.Tensor, ...]:
        """Decoder + head on encoder tokens; raw outputs (graph-exportable, no SVD).

        Returns (t2 [B,3], rot9_2 [B,9]) for pose2 (view 2 -> view 1), and when ``both``
        also (t1, rot9_1) for pose1.
        """
        dec1, dec2 = self.decode(feat1, pos1, feat2, pos2)
        if both and dec1.shape[1] != dec2.shape[1]:
            (t1, r1), (t2, r2) = self.head(dec1), self.head(dec2)
            return t2, r2, t1, r1
        if both:
            t, r = self.head(torch.cat((dec1, dec2)))
            t1, t2 = t.chunk(2)
            r1, r2 = r.chunk(2)
            return t2, r2, t1, r1
        return self.head(dec2)

    def pairs_from_tokens(self, feat1, pos1, feat2, pos2) -> torch.Tensor:
        """pose2 [B, 4, 4] (view 2 -> view 1, float32) for pairs of encoder tokens (see :meth:`decode`)."""
        t2, r2 = self.pairs_raw(feat1, pos1, feat2, pos2)
        return raw_to_pose(t2, r2)

    def forward(self, view1: Mapping[str, torch.Tensor], view2: Mapping[str, torch.Tensor]):
        """(pose1, pose2) as the official module: each {'pose': [B,4,4], 't_raw': [B,3], 'rot9_raw': [B,9]}.

        view: {'img': [B,3,H,W] in [-1,1], 'true_shape': [B,2] (H, W)}. pose2 maps
        camera-2 points into camera 1; pose1 the reverse.
        """
        out = self.forward_with_intermediates(view1, view2)
        return out["pose1"], out["pose2"]

    def forward_with_intermediates(self, view1, view2) -> Dict[str, Any]:
        """Like forward, plus 'enc_feat1', 'enc_feat2' [B,N,enc_dim] and 'dec1_last', 'dec2_last' [B,N,dec_dim]."""
        img1, img2 = view1["img"], view2["img"]
        ts1, ts2 = view1.get("true_shape"), view2.get("true_shape")
        if img1.shape[0] != img2.shape[0]:
            raise InvalidInputError(f"view batch sizes differ: {img1.shape[0]} vs {img2.shape[0]}")
        if img1.shape == img2.shape and _same_orientation(ts1, ts2, img1.shape[0]):
            B = img1.shape[0]
            ts = None if ts1 is None else torch.cat((torch.as_tensor(ts1), torch.as_tensor(ts2)))
            feat, pos = self.encode(torch.cat((img1, img2)), ts)
            feat1, feat2, pos1, pos2 = feat[:B], feat[B:], pos[:B], pos[B:]
        else:
            feat1, pos1 = self.encode(img1, ts1)
            feat2, pos2 = self.encode(img2, ts2)
        dec1, dec2 = self.decode(feat1, pos1, feat2, pos2)
        if dec1.shape[1] == dec2.shape[1]:
            t, r = self.head(torch.cat((dec1, dec2)))
            (t1, t2), (r1, r2) = t.chunk(2), r.chunk(2)
        else:
            (t1, r1), (t2, r2) = self.head(dec1), self.head(dec2)
        return {
            "pose1": {"pose": raw_to_pose(t1, r1), "t_raw": t1, "rot9_raw": r1},
            "pose2": {"pose": raw_to_pose(t2, r2), "t_raw": t2, "rot9_raw": r2},
            "enc_feat1": feat1,
            "enc_feat2": feat2,
            "dec1_last": dec1,
            "dec2_last": dec2,
        }


def _same_orientation(ts1, ts2, B: int) -> bool:
    if ts1 is None or ts2 is None:
        return ts1 is None and ts2 is None
    a = torch.as_tensor(ts1).reshape(B, 2)
    b = torch.as_tensor(ts2).reshape(B, 2)
    return bool(((a[:, 0] > a[:, 1]) == (b[:, 0] > b[:, 1])).all())


def build_reloc3r(config: Optional[Mapping[str, Any]] = None, device: Any = "cpu") -> Reloc3rNet:
    """Reloc3r network with random weights, in eval mode.

    config: dict for :class:`Reloc3rConfig` ({} = published full size, 426,523,916
    parameters). device: 'cpu', 'cuda' or 'meta' (names and shapes only, no memory).
    """
    cfg = Reloc3rConfig.from_dict(config)
    with torch.device(device):
        net = Reloc3rNet(cfg)
    return net.eval()


# ----------------------------------------------------------------------------- preprocessing


def _resize(img: np.ndarray, w: int, h: int, shrink: bool) -> np.ndarray:
    """Resample as the authors do: PIL Lanczos when shrinking, bicubic otherwise."""
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - Pillow ships with matplotlib
        import cv2

        # Without PIL: area averaging is the antialiased downscale closest to PIL's Lanczos.
        return cv2.resize(img, (w, h), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_CUBIC)
    resample = Image.Resampling.LANCZOS if shrink else Image.Resampling.BICUBIC
    return np.asarray(Image.fromarray(img).resize((w, h), resample=resample))


def preprocess_transform(image_hw: Tuple[int, int], img_size: int = 512, square_ok: bool = False) -> Dict[str, Any]:
    """The resize and crop :func:`preprocess_image` applies to an image of (H, W) pixels.

    Returns {'scale': (sx, sy), 'resized': (h, w), 'crop': (x0, y0), 'size': (h, w)}: a
    pixel u of the input lands at ``u * s - crop`` in the network image (pixel units).
    """
    H, W = image_hw
    if img_size not in (224, 512):
        raise ValueError(f"img_size must be 224 or 512, got {img_size}")
    S = max(W, H)
    # 224: long side to round(224 * aspect) so that the short side becomes 224; 512: long side 512.
    L = round(224 * max(W / H, H / W)) if img_size == 224 else 512
    nw, nh = int(round(W * L / S)), int(round(H * L / S))
    cx, cy = nw // 2, nh // 2
    if img_size == 224:
        half = min(cx, cy)
        x0, y0, cw, ch = cx - half, cy - half, 2 * half, 2 * half
    else:
        halfw, halfh = ((2 * cx) // 16) * 8, ((2 * cy) // 16) * 8
        if not square_ok and nw == nh:
            halfh = 3 * halfw // 4
        x0, y0, cw, ch = cx - halfw, cy - halfh, 2 * halfw, 2 * halfh
    if cw < 16 or ch < 16:
        raise InvalidInputError(f"image {W}x{H} too small for Reloc3r preprocessing at {img_size}")
    return {"scale": (nw / W, nh / H), "resized": (nh, nw), "crop": (x0, y0), "size": (ch, cw), "shrink": S > L}


def preprocess_image(image: np.ndarray, img_size: int = 512, square_ok: bool = False) -> Tuple[np.ndarray, Tuple[int, int]]:
    """Resize and centre-crop an image as the authors' ``load_images`` does.

    image: [H, W, 3] uint8 RGB (or [H, W] grey, replicated).
    img_size 224: resize so that the short side is 224, centre-crop 224x224.
    img_size 512: resize the long side to 512, centre-crop each side down to a multiple
    of 16; a square result becomes 512 wide x 384 high unless ``square_ok``.
    Sizes are rounded as published; PIL Lanczos when shrinking, bicubic when enlarging.
    Returns (img [3, h, w] float32 in [-1, 1], (h, w)) in the image's own orientation
    (portrait stays portrait; :func:`views_from_images` applies the landscape convention).
    The geometry is :func:`preprocess_transform`.
    """
    if img_size not in (224, 512):
        raise ValueError(f"img_size must be 224 or 512, got {img_size}")
    img = np.asarray(image)
    if img.ndim == 2:
        img = np.repeat(img[:, :, None], 3, axis=2)
    if img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8 or min(img.shape[:2]) < 16:
        raise InvalidInputError(f"expected an [H,W,3] uint8 RGB image of at least 16x16, got {img.shape} {img.dtype}")
    g = preprocess_transform(img.shape[:2], img_size, square_ok)
    nh, nw = g["resized"]
    ch, cw = g["size"]
    x0, y0 = g["crop"]
    res = _resize(np.ascontiguousarray(img), nw, nh, g["shrink"])[y0 : y0 + ch, x0 : x0 + cw]
    out = (res.astype(np.float32) / 255.0 - 0.5) / 0.5
    return np.ascontiguousarray(out.transpose(2, 0, 1)), (ch, cw)


def views_from_images(images: Sequence[np.ndarray], img_size: int = 512) -> Dict[str, torch.Tensor]:
    """Batch of preprocessed images as a view dict {'img': [B,3,h,w], 'true_shape': [B,2] int32}.

    Portrait images are transposed to landscape with a portrait ``true_shape`` (the
    authors' dataset convention). All images must give the same token count.
    """
    tensors, shapes = [], []
    for im in images:
        arr, (h, w) = preprocess_image(im, img_size)
        t = torch.from_numpy(arr)
        if h > w:
            t = t.transpose(1, 2)
        tensors.append(t)
        shapes.append((h, w))
    if len({tuple(t.shape) for t in tensors}) != 1:
        raise InvalidInputError(f"images preprocess to different sizes {shapes}; batch them separately")
    return {"img": torch.stack(tensors), "true_shape": torch.tensor(shapes, dtype=torch.int32)}


def count_parameters(net: nn.Module) -> int:
    """Number of parameter elements."""
    return sum(p.numel() for p in net.parameters())


def state_dict_shapes(net: nn.Module) -> List[Tuple[str, Tuple[int, ...]]]:
    """[(name, shape)] of a module's state dict in order (works on the 'meta' device)."""
    return [(k, tuple(v.shape)) for k, v in net.state_dict().items()]

