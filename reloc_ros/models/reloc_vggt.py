"""Reloc-VGGT: the multi-view fused localizer on the VGGT backbone.

The query and its K retrieved keyframes form one VGGT sequence, keyframes first (the
reference keyframe is frame 0, so VGGT's world is the reference keyframe's camera) and
the query last. Three additions to VGGT (docs/models_vggt.md):

- **Pose tokenizer.** Each keyframe's known pose, relative to the reference keyframe and
  scale-normalised (:func:`encode_known_poses`), is encoded as VGGT's own 9-d pose
  encoding and projected by an MLP to an embedding added to that frame's camera token;
  the query gets a learned "unknown" embedding. Both are zero-initialised, so that
  without a trained tokenizer the network is exactly VGGT.
- **Sparse-mask global attention**, selected per call (the frame attention and the
  camera head are VGGT's, unmasked):
  ``dense``  every token attends to every frame (VGGT as published);
  ``star``   the query attends to all frames, each keyframe to itself and the query
             (no keyframe <-> keyframe);
  ``cached`` the query attends to all frames, each keyframe only to itself. Keyframe
             tokens then do not depend on the query, so their per-layer global keys and
             values are kept in an LRU cache across queries (:class:`KeyframeKVCache`);
             with a warm cache only the query's tokens run through the network.
  ``star`` and ``cached`` cost O(K P^2) attention instead of dense's O(K^2 P^2).
- **Metric query pose** from the predicted cameras (numpy, float64):
  :func:`sim3_localize` aligns the predicted keyframe poses to their known map poses
  with a robust Sim(3) (rotation averaging + Umeyama); :func:`relative_pairs` gives the
  predicted query-to-keyframe relative poses for motion averaging
  (``reloc_ros.averaging``).

Conventions: images [B, S, 3, H, W] / [B, 3, H, W] RGB in [0, 1], H and W multiples of
14, every frame of a sequence the same size. Pose encodings [..., 9] as in
``reloc_ros.models.vggt`` (camera-from-reference extrinsics, VGGT's normalised scale).
Poses ``T_a_b`` are [4, 4] camera-to-world in OpenCV axes, metres, radians.
"""
from __future__ import annotations

import itertools
import math
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable, Dict, Hashable, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from reloc_ros.geometry import invert, project_to_so3, umeyama
from reloc_ros.models.vggt import (VGGT, VGGTConfig, extri_intri_to_pose_encoding, extrinsics_to_T_world_cam,
                                   pose_encoding_to_extri_intri)
from reloc_ros.types import InvalidInputError, Status

__all__ = [
    "MASKS",
    "PoseTokenizer",
    "KeyframeKVCache",
    "RelocVGGT",
    "build_reloc_vggt",
    "global_attention_mask",
    "encode_known_poses",
    "predicted_T_ref_cam",
    "relative_pairs",
    "Sim3Config",
    "Sim3Result",
    "sim3_localize",
]

MASKS = ("dense", "star", "cached")

KeyframeSource = Union[torch.Tensor, Callable[[Sequence[int]], torch.Tensor]]


# ----------------------------------------------------------------------------- masks


def global_attention_mask(num_frames: int, tokens_per_frame: int, mask: str, device=None,
                          num_queries: int = 1) -> torch.Tensor:
    """Boolean global-attention mask [S*P, S*P] (True = may attend), rows = queries.

    Frames 0..S-Q-1 are keyframes, the last Q = ``num_queries`` frames the query views
    (one camera, or the cameras of one rig capture). ``dense``: all True. ``star``:
    keyframe rows see their own frame and every query view. ``cached``: keyframe rows see
    only their own frame. The query views' rows see every frame in all three.
    This explicit form defines the masks; the network uses equivalent batched kernels.
    """
    if mask not in MASKS:
        raise ValueError(f"mask must be one of {MASKS}, got {mask!r}")
    S, P, Q = num_frames, tokens_per_frame, num_queries
    frame = torch.arange(S, device=device).repeat_interleave(P)
    allowed = torch.ones(S, S, dtype=torch.bool, device=device)
    if mask != "dense":
        allowed = torch.eye(S, dtype=torch.bool, device=device)
        allowed[S - Q:, :] = True
        if mask == "star":
            allowed[:, S - Q:] = True
    return allowed[frame][:, frame]


# ----------------------------------------------------------------------------- tokenizer


class PoseTokenizer(nn.Module):
    """Known keyframe poses -> embeddings added to the camera tokens.

    ``forward(pose_enc [B, K, 9])`` -> [B, K, C]: a 2-layer MLP (9 -> hidden -> C, GELU)
    of the pose encoding of a keyframe's known camera-from-reference extrinsics
    (scale-normalised, :func:`encode_known_poses`) and its FoV. ``unknown`` [1, 1, C] is
    the query's embedding. The output layer and ``unknown`` start at zero, so an
    untrained tokenizer adds exact zeros and the network is VGGT.
    """

    def __init__(self, dim: int, hidden: int = 256) -> None:
        super().__init__()
        self.proj = nn.Sequential(nn.Linear(9, hidden), nn.GELU(), nn.Linear(hidden, dim))
        self.unknown = nn.Parameter(torch.zeros(1, 1, dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.unknown.device.type == "meta":
            return
        nn.init.trunc_normal_(self.proj[0].weight, std=0.02)
        nn.init.zeros_(self.proj[0].bias)
        nn.init.zeros_(self.proj[2].weight)
        nn.init.zeros_(self.proj[2].bias)
        nn.init.zeros_(self.unknown)

    def forward(self, pose_enc: torch.Tensor) -> torch.Tensor:
        return self.proj(pose_enc.to(self.unknown.dtype))


# ----------------------------------------------------------------------------- KV cache


@dataclass
class _KFState:
    """One keyframe's cached, query-independent state (``cached`` mask).

    k, v: [L, heads, P, head_dim] global-attention keys/values of every layer (after
    qk-norm and RoPE). cam: [2C] last-layer camera token (frame ++ global output).
    """

    k: torch.Tensor
    v: torch.Tensor
    cam: torch.Tensor

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.k, self.v, self.cam))


class KeyframeKVCache:
    """LRU cache of per-keyframe global keys/values for the ``cached`` mask.

    Keys are (user key, frame slot, pose-encoding bytes, image size, dtype, device):
    everything a keyframe's tokens depend on under ``cached`` for fixed weights, so a hit
    is exactly what recomputing would give. ``capacity``: entries kept; each holds
    2 * depth * P * C values (205 MB in fp32 for VGGT-1B at 518x392, P = 1041; 41 KB for
    the compact test config at 70x98). ``stacked`` memoises the keys/values of the last
    keyframe list laid out for one query (reused while consecutive queries retrieve the
    same keyframes). Not thread-safe: one cache serves one query stream.
    """

    def __init__(self, capacity: int = 32) -> None:
        if capacity < 0:
            raise ValueError(f"cache capacity must be >= 0, got {capacity}")
        self.capacity = int(capacity)
        self._d: "OrderedDict[Hashable, _KFState]" = OrderedDict()
        self.hits = 0
        self.misses = 0
        self.stacked: Optional[Tuple[Tuple, object]] = None  # (tuple of entry keys, backend's layout)

    def __len__(self) -> int:
        return len(self._d)

    def get(self, key: Hashable) -> Optional[_KFState]:
        st = self._d.get(key)
        if st is None:
            self.misses += 1
            return None
        self.hits += 1
        self._d.move_to_end(key)
        return st

    def put(self, key: Hashable, state: _KFState) -> None:
        if self.capacity == 0:
            return
        self._d[key] = state
        self._d.move_to_end(key)
        while len(self._d) > self.capacity:
            self._d.popitem(last=False)

    def clear(self) -> None:
        self._d.clear()
        self.stacked = None
        self.hits = self.misses = 0

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for s in self._d.values())

    def info(self) -> Dict[str, int]:
        return {"entries": len(self._d), "capacity": self.capacity, "hits": self.hits,
                "misses": self.misses, "bytes": self.nbytes}


# ----------------------------------------------------------------------------- network


class RelocVGGT(nn.Module):
    """VGGT aggregator + camera head + pose tokenizer, with selectable global-attention masks.

    Parameter names: ``aggregator.*`` and ``camera_head.*`` exactly as VGGT (so VGGT-1B's
    ``model.pt`` loads with :func:`reloc_ros.models.vggt.load_vggt_weights`, passing
    ``optional_prefixes=('pose_tokenizer.',)``), plus ``pose_tokenizer.*``.
    """

    def __init__(self, config: Optional[VGGTConfig] = None, tokenizer_hidden: int = 256,
                 cache_capacity: int = 32) -> None:
        super().__init__()
        base = VGGT(config)
        self.config = base.config
        self.aggregator = base.aggregator
        self.camera_head = base.camera_head
        self.pose_tokenizer = PoseTokenizer(self.config.embed_dim, tokenizer_hidden)
        self.kv_cache = KeyframeKVCache(cache_capacity)

    # -- housekeeping
    def _load_from_state_dict(self, *args, **kwargs):  # noqa: D401 - torch hook
        # New weights invalidate every cached keyframe state.
        self.kv_cache.clear()
        return super()._load_from_state_dict(*args, **kwargs)

    def set_precision(self, dtype: torch.dtype) -> "RelocVGGT":
        """Aggregator + tokenizer in ``dtype``; the camera head stays float32 (as VGGT)."""
        self.aggregator.to(dtype)
        self.pose_tokenizer.to(dtype)
        self.camera_head.to(torch.float32)
        self.kv_cache.clear()
        return self

    @property
    def dtype(self) -> torch.dtype:
        return self.aggregator.dtype

    # -- pieces shared by every path
    def _rope(self, H: int, W: int, device) -> Tuple[torch.Tensor, torch.Tensor]:
        p = self.config.patch_size
        return self.aggregator.rope(H // p, W // p, device)

    def _add_pose_tokens(self, tokens: torch.Tensor, B: int, S: int, kf_pose_enc: Optional[torch.Tensor]
                         ) -> torch.Tensor:
        """tokens [B*S, P, C] with frames (keyframes..., query views); adds the tokenizer
        output to each camera token (nothing at all when ``kf_pose_enc`` is None)."""
        if kf_pose_enc is None:
            return tokens
        emb = self.pose_tokenizer(kf_pose_enc)  # [B, K, C]
        unk = self.pose_tokenizer.unknown.expand(B, S - emb.shape[1], -1)
        emb = torch.cat((emb, unk), dim=1).reshape(B * S, 1, -1).to(tokens.dtype)
        return torch.cat((tokens[:, :1] + emb, tokens[:, 1:]), dim=1)

    def _embed_slots(self, images: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """Input tokens [M, P, C] of independent frames [M, 3, H, W], frame ``i`` using
        special-token index ``slots[i]`` (0 = a sequence's first frame, 1 = the others)."""
        agg = self.aggregator
        x = (images.to(self.dtype) - agg._mean[0].to(self.dtype)) / agg._std[0].to(self.dtype)
        patches = agg.patch_embed(x)
        cam = agg.camera_token[0].index_select(0, slots)
        reg = agg.register_token[0].index_select(0, slots)
        return torch.cat((cam, reg, patches), dim=1)

    @staticmethod
    def _views(query: torch.Tensor) -> torch.Tensor:
        """query [B, 3, H, W] (one view) or [B, Q, 3, H, W] (Q views of one capture) -> [B, Q, 3, H, W]."""
        if query.dim() == 4 and query.shape[1] == 3:
            return query[:, None]
        if query.dim() == 5 and query.shape[2] == 3 and query.shape[1] >= 1:
            return query
        raise InvalidInputError(f"query must be [B,3,H,W] or [B,Q,3,H,W], got {tuple(query.shape)}")

    def _check(self, query: torch.Tensor, keyframes: Optional[torch.Tensor]) -> Tuple[int, int, int]:
        """query [B, Q, 3, H, W] (see ``_views``) -> (B, H, W), keyframes checked against it."""
        B, _, _, H, W = query.shape
        p = self.config.patch_size
        if H % p or W % p or H == 0 or W == 0:
            raise InvalidInputError(f"image size {H}x{W} is not a positive multiple of the patch size {p}")
        if keyframes is not None:
            if (keyframes.dim() != 5 or keyframes.shape[0] != B or keyframes.shape[2:] != query.shape[2:]
                    or keyframes.shape[1] < 1):
                raise InvalidInputError(
                    f"keyframes must be [B,K>=1,3,H,W] matching the query {tuple(query.shape[2:])}, "
                    f"got {tuple(keyframes.shape)}")
        return B, H, W

    @staticmethod
    def _check_enc(kf_pose_enc: Optional[torch.Tensor], B: int, K: int) -> None:
        if kf_pose_enc is not None and tuple(kf_pose_enc.shape) != (B, K, 9):
            raise InvalidInputError(f"kf_pose_enc must be [{B},{K},9], got {tuple(kf_pose_enc.shape)}")

    def _sequence(self, query: torch.Tensor, keyframes: torch.Tensor, kf_pose_enc: Optional[torch.Tensor]):
        """Checked inputs -> (input tokens [B*S, P, C] of (keyframes..., query views) with
        pose tokens added, rope for the patch grid, B, S)."""
        query = self._views(query)
        B, H, W = self._check(query, keyframes)
        self._check_enc(kf_pose_enc, B, keyframes.shape[1])
        images = torch.cat((keyframes.to(self.dtype), query.to(self.dtype)), dim=1)
        S = images.shape[1]
        tokens = self._add_pose_tokens(self.aggregator.embed_frames(images), B, S, kf_pose_enc)
        return tokens, self._rope(H, W, images.device), B, S

    # -- the whole sequence at once (dense, star, and the explicit-mask reference)
    def forward(self, query: torch.Tensor, keyframes: KeyframeSource, kf_pose_enc: Optional[torch.Tensor] = None,
                mask: str = "dense", kf_keys: Optional[Sequence[Hashable]] = None,
                num_iterations: Optional[int] = None) -> Dict[str, object]:
        """Predict the cameras of K keyframes and a query (or Q query views).

        query: [B, 3, H, W] in [0, 1], or [B, Q, 3, H, W]: Q views taken together (a rig
        capture's cameras), each with its own output row. keyframes: [B, K, 3, H, W] in [0, 1] (the first is
        the reference), or for ``cached`` with B = 1 a callable ``(indices) -> [M,3,H,W]``
        that is only asked for the keyframes missing from the cache.
        kf_pose_enc: [B, K, 9] known keyframe poses from :func:`encode_known_poses`, or
        None for no pose tokens (then ``dense`` is VGGT exactly).
        mask: 'dense' | 'star' | 'cached'. kf_keys: K hashable keyframe identities
        (``cached`` only; None disables the cache for this call).
        Returns {'pose_enc_list': list of [B, K+Q, 9] (keyframes then query views, every
        refinement iteration), 'pose_enc': the last, 'camera_tokens': [B, K+Q, 2C]}.
        """
        if mask not in MASKS:
            raise ValueError(f"mask must be one of {MASKS}, got {mask!r}")
        if mask == "cached":
            cams = self._cached_camera_tokens(query, keyframes, kf_pose_enc, kf_keys)
        else:
            if callable(keyframes) and not isinstance(keyframes, torch.Tensor):
                raise InvalidInputError(f"mask {mask!r} needs the keyframe images as a tensor")
            tokens, rope, B, S = self._sequence(query, keyframes, kf_pose_enc)
            if mask == "dense":
                last = self.aggregator.run_blocks(tokens, B, S, rope, keep_all=False)[-1]
            else:
                last = self._run_star(tokens, B, S, rope, num_queries=S - keyframes.shape[1])
            cams = last[:, :, 0]
        enc = self.camera_head.from_camera_tokens(cams.float(), num_iterations)
        return {"pose_enc_list": enc, "pose_enc": enc[-1], "camera_tokens": cams}

    def forward_batched(self, query: torch.Tensor, keyframes: torch.Tensor, kf_pose_enc: Optional[torch.Tensor] = None,
                        mask: str = "dense", num_iterations: Optional[int] = None) -> Dict[str, object]:
        """``forward`` for a batch of B sequences under any mask, differentiable (training).

        query [B, 3, H, W], keyframes [B, K, 3, H, W] in [0, 1]; kf_pose_enc [B, K, 9] or
        None. ``cached`` runs the same attention pattern as the KV-cache path (keyframes
        see only themselves) without a cache, so gradients reach the keyframe branch.
        Returns forward's dict ('pose_enc_list', 'pose_enc', 'camera_tokens').
        """
        if mask not in MASKS:
            raise ValueError(f"mask must be one of {MASKS}, got {mask!r}")
        tokens, rope, B, S = self._sequence(query, keyframes, kf_pose_enc)
        if mask == "dense":
            last = self.aggregator.run_blocks(tokens, B, S, rope, keep_all=False)[-1]
        else:
            last = self._run_star(tokens, B, S, rope, kf_sees_query=mask == "star",
                                  num_queries=S - keyframes.shape[1])
        cams = last[:, :, 0]
        # The camera head runs at its own (float32 or float64) precision, outside any
        # autocast region, as VGGT's heads do.
        with torch.autocast(device_type=cams.device.type, enabled=False):
            enc = self.camera_head.from_camera_tokens(cams.to(self.camera_head.embed_pose.weight.dtype),
                                                      num_iterations)
        return {"pose_enc_list": enc, "pose_enc": enc[-1], "camera_tokens": cams}

    def forward_reference(self, query: torch.Tensor, keyframes: torch.Tensor, kf_pose_enc: Optional[torch.Tensor] = None,
                          mask: str = "dense", num_iterations: Optional[int] = None) -> Dict[str, object]:
        """The same network computed the plain way: the whole sequence through every
        global block with the explicit boolean mask of :func:`global_attention_mask`.
        Slow (O((K P)^2) for every mask); it defines what ``forward`` must equal.
        Returns forward's dict plus 'tokens_list' (per layer [B, K+1, P, 2C])."""
        tokens, rope, B, S = self._sequence(query, keyframes, kf_pose_enc)
        P, C = tokens.shape[1:]
        am = global_attention_mask(S, P, mask, tokens.device, num_queries=S - keyframes.shape[1])
        rope_g = (rope[0].repeat(1, 1, S, 1), rope[1].repeat(1, 1, S, 1))
        x = tokens
        out = []
        for fb, gb in zip(self.aggregator.frame_blocks, self.aggregator.global_blocks):
            x = fb(x.reshape(B * S, P, C), rope)
            f_out = x.reshape(B, S, P, C)
            x = x.reshape(B, S * P, C)
            q, k, v = gb.attn.qkv_heads(gb.norm1(x), rope_g)
            x = x + gb.ls1(gb.attn.out(F.scaled_dot_product_attention(q, k, v, attn_mask=am)))
            x = gb.ffn(x)
            out.append(torch.cat((f_out, x.reshape(B, S, P, C)), dim=-1))
        cams = out[-1][:, :, 0]
        enc = self.camera_head.from_camera_tokens(cams.float(), num_iterations)
        return {"pose_enc_list": enc, "pose_enc": enc[-1], "camera_tokens": cams, "tokens_list": out}

    def _run_star(self, tokens: torch.Tensor, B: int, S: int, rope, kf_sees_query: bool = True,
                  num_queries: int = 1) -> torch.Tensor:
        """Star-masked alternating attention on tokens [B*S, P, C] -> last layer [B, S, P, 2C].

        Keyframe k's queries attend to [frame k, the Q query views] (batched as B*K
        sequences of (1+Q)P keys), the query views' to all S*P keys: linear in K.
        ``kf_sees_query=False`` gives the ``cached`` mask (keyframe k attends to its own
        frame only) for a whole batch with autograd, as training needs; inference uses the
        KV-cache path."""
        P, C = tokens.shape[1:]
        Q = num_queries
        K = S - Q
        x = tokens
        f_out = x
        for fb, gb in zip(self.aggregator.frame_blocks, self.aggregator.global_blocks):
            x = fb(x, rope)  # [B*S, P, C]
            f_out = x
            q, k, v = gb.attn.qkv_heads(gb.norm1(x), rope)  # [B*S, h, P, d], per frame
            h, d = q.shape[1], q.shape[3]
            q, k, v = (t.reshape(B, S, h, P, d) for t in (q, k, v))
            if kf_sees_query:
                # the query views' keys side by side: [B, 1, h, Q*P, d]
                kq, vq = (t[:, K:].permute(0, 2, 1, 3, 4).reshape(B, 1, h, Q * P, d) for t in (k, v))
                k_kf = torch.cat((k[:, :K], kq.expand(B, K, h, Q * P, d)), dim=3).reshape(B * K, h, (1 + Q) * P, d)
                v_kf = torch.cat((v[:, :K], vq.expand(B, K, h, Q * P, d)), dim=3).reshape(B * K, h, (1 + Q) * P, d)
            else:
                k_kf = k[:, :K].reshape(B * K, h, P, d)
                v_kf = v[:, :K].reshape(B * K, h, P, d)
            o_kf = F.scaled_dot_product_attention(q[:, :K].reshape(B * K, h, P, d), k_kf, v_kf)
            k_all = k.transpose(1, 2).reshape(B, h, S * P, d)
            v_all = v.transpose(1, 2).reshape(B, h, S * P, d)
            if Q == 1:
                o_q = F.scaled_dot_product_attention(q[:, K], k_all, v_all)[:, None]
            else:
                q_q = q[:, K:].permute(0, 2, 1, 3, 4).reshape(B, h, Q * P, d)
                o_q = F.scaled_dot_product_attention(q_q, k_all, v_all).reshape(B, h, Q, P, d).permute(0, 2, 1, 3, 4)
            o = torch.cat((o_kf.reshape(B, K, h, P, d), o_q), dim=1).reshape(B * S, h, P, d)
            x = x + gb.ls1(gb.attn.out(o))
            x = gb.ffn(x)
        return torch.cat((f_out, x), dim=-1).reshape(B, S, P, 2 * C)

    # -- cached mask
    def keyframe_tensors(self, images: torch.Tensor, slots: torch.Tensor,
                         pose_enc: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Query-independent keys/values of M keyframes under the ``cached`` mask (exportable).

        images: [M, 3, H, W] in [0, 1]; slots: [M] long (0 for the reference keyframe,
        1 for the others); pose_enc: [M, 9] or None. Each keyframe runs alone (its global
        attention sees only its own frame), batched over M. Returns (K, V [M, L, heads,
        P, d], camera tokens [M, 2C]).
        """
        _, _, H, W = images.shape
        x = self._embed_slots(images, slots.to(images.device))
        if pose_enc is not None:
            x = torch.cat((x[:, :1] + self.pose_tokenizer(pose_enc)[:, None].to(x.dtype), x[:, 1:]), dim=1)
        rope = self._rope(H, W, images.device)
        ks, vs = [], []
        f_out = x
        for fb, gb in zip(self.aggregator.frame_blocks, self.aggregator.global_blocks):
            x = fb(x, rope)
            f_out = x
            q, k, v = gb.attn.qkv_heads(gb.norm1(x), rope)
            ks.append(k)
            vs.append(v)
            x = x + gb.ls1(gb.attn.out(F.scaled_dot_product_attention(q, k, v)))
            x = gb.ffn(x)
        return torch.stack(ks, dim=1), torch.stack(vs, dim=1), torch.cat((f_out[:, 0], x[:, 0]), dim=-1)

    @torch.no_grad()
    def keyframe_states(self, images: torch.Tensor, slots: torch.Tensor,
                        pose_enc: Optional[torch.Tensor]) -> List[_KFState]:
        """``keyframe_tensors`` split into one cacheable state per keyframe."""
        K_all, V_all, cam = self.keyframe_tensors(images, slots, pose_enc)
        return [_KFState(K_all[i].clone(), V_all[i].clone(), cam[i].clone()) for i in range(len(images))]

    def _cached_camera_tokens(self, query: torch.Tensor, keyframes: KeyframeSource,
                              kf_pose_enc: Optional[torch.Tensor], kf_keys: Optional[Sequence[Hashable]]) -> torch.Tensor:
        is_tensor = isinstance(keyframes, torch.Tensor)
        query = self._views(query)
        B, H, W = self._check(query, keyframes if is_tensor else None)
        if B != 1:
            raise InvalidInputError(f"mask 'cached' runs one query at a time (B = 1), got B = {B}")
        if is_tensor:
            K = keyframes.shape[1]
        elif kf_keys is not None:
            K = len(kf_keys)
        else:
            raise InvalidInputError("keyframes given as a loader need kf_keys")
        if K < 1:
            raise InvalidInputError("Reloc-VGGT needs at least one keyframe")
        if kf_keys is not None and len(kf_keys) != K:
            raise InvalidInputError(f"{len(kf_keys)} kf_keys for {K} keyframes")
        self._check_enc(kf_pose_enc, 1, K)
        dev = query.device
        slots = [0] + [1] * (K - 1)
        cache_keys: List[Optional[Tuple]] = [None] * K
        states: List[Optional[_KFState]] = [None] * K
        if kf_keys is not None:
            for i in range(K):
                enc_bytes = b"" if kf_pose_enc is None else kf_pose_enc[0, i].detach().float().cpu().numpy().tobytes()
                cache_keys[i] = (kf_keys[i], slots[i], enc_bytes, H, W, self.dtype, str(dev))
                states[i] = self.kv_cache.get(cache_keys[i])
        miss = [i for i in range(K) if states[i] is None]
        if miss:
            if is_tensor:
                imgs = keyframes[0, miss]
            else:
                imgs = keyframes(miss)
                if not isinstance(imgs, torch.Tensor) or tuple(imgs.shape) != (len(miss), 3, H, W):
                    raise InvalidInputError(f"keyframe loader returned {getattr(imgs, 'shape', type(imgs))}, "
                                            f"expected [{len(miss)},3,{H},{W}]")
            enc = None if kf_pose_enc is None else kf_pose_enc[0, miss]
            new = self.keyframe_states(imgs.to(dev), torch.tensor([slots[i] for i in miss], device=dev), enc)
            for i, st in zip(miss, new):
                states[i] = st
                if cache_keys[i] is not None:
                    self.kv_cache.put(cache_keys[i], st)
        return self._query_step(query[0], states, cache_keys if kf_keys is not None else None, kf_pose_enc is not None)

    def _stacked_kv(self, states: List[_KFState], keys: Optional[List[Tuple]], P: int, Q: int = 1):
        """Key/value buffers [L, 1, h, (K+Q) P, d] with the keyframes' part filled and room
        for the Q query views' tokens at the end; memoised for a repeated keyframe list."""
        tag = (tuple(keys), Q) if keys is not None else None
        memo = self.kv_cache.stacked
        if tag is not None and memo is not None and memo[0] == tag:
            return memo[1]
        L, h, _, d = states[0].k.shape
        K = len(states)
        kbuf = states[0].k.new_empty(L, 1, h, (K + Q) * P, d)
        vbuf = torch.empty_like(kbuf)
        for i, st in enumerate(states):
            kbuf[:, 0, :, i * P:(i + 1) * P] = st.k
            vbuf[:, 0, :, i * P:(i + 1) * P] = st.v
        if tag is not None:
            self.kv_cache.stacked = (tag, (kbuf, vbuf))
        return kbuf, vbuf

    @torch.no_grad()
    def _query_step(self, query: torch.Tensor, states: List[_KFState], keys: Optional[List[Tuple]],
                    use_pose_tokens: bool) -> torch.Tensor:
        """The query views' tokens (query [Q, 3, H, W]) through every layer, their global
        attention reading the keyframes' cached keys/values plus the views' own.
        Returns camera tokens [1, K+Q, 2C]."""
        Q, _, H, W = query.shape
        x = self._embed_slots(query, torch.ones(Q, dtype=torch.long, device=query.device))
        if use_pose_tokens:
            x = torch.cat((x[:, :1] + self.pose_tokenizer.unknown.to(x.dtype), x[:, 1:]), dim=1)
        P = x.shape[1]
        rope = self._rope(H, W, query.device)
        kbuf, vbuf = self._stacked_kv(states, keys, P, Q)
        K = len(states)
        f_out = x
        for li, (fb, gb) in enumerate(zip(self.aggregator.frame_blocks, self.aggregator.global_blocks)):
            x = fb(x, rope)
            f_out = x
            q, k, v = gb.attn.qkv_heads(gb.norm1(x), rope)  # [Q, h, P, d]
            if Q == 1:
                kbuf[li, :, :, K * P:] = k
                vbuf[li, :, :, K * P:] = v
                x = x + gb.ls1(gb.attn.out(F.scaled_dot_product_attention(q, kbuf[li], vbuf[li])))
            else:
                h, d = q.shape[1], q.shape[3]
                kbuf[li, 0, :, K * P:] = k.transpose(0, 1).reshape(h, Q * P, d)
                vbuf[li, 0, :, K * P:] = v.transpose(0, 1).reshape(h, Q * P, d)
                qq = q.transpose(0, 1).reshape(1, h, Q * P, d)
                o = F.scaled_dot_product_attention(qq, kbuf[li], vbuf[li]).reshape(h, Q, P, d).transpose(0, 1)
                x = x + gb.ls1(gb.attn.out(o))
            x = gb.ffn(x)
        q_cam = torch.cat((f_out[:, 0], x[:, 0]), dim=-1)  # [Q, 2C]
        kf_cam = torch.stack([st.cam for st in states])  # [K, 2C]
        return torch.cat((kf_cam, q_cam), dim=0)[None]


def build_reloc_vggt(config: Optional[Dict] = None, device: Union[str, torch.device] = "cpu",
                     tokenizer_hidden: int = 256, cache_capacity: int = 32) -> RelocVGGT:
    """Reloc-VGGT with random VGGT weights and a zero (untrained) pose tokenizer, eval mode.

    config: as :func:`reloc_ros.models.vggt.build_vggt` (``{}`` = VGGT-1B). device 'meta'
    builds shapes only.
    """
    cfg = VGGTConfig.from_dict(config)
    with torch.device(device):
        model = RelocVGGT(cfg, tokenizer_hidden, cache_capacity)
    return model.eval()


# ----------------------------------------------------------------------------- poses


def encode_known_poses(T_world_kf: np.ndarray, K_kf: Optional[np.ndarray], image_hw: Tuple[int, int],
                       scale: Optional[float] = None) -> Tuple[np.ndarray, float]:
    """Pose-tokenizer input of K keyframes: their known poses relative to the first
    (reference) keyframe, scale-normalised.

    T_world_kf: [K, 4, 4] camera-to-world (metres); K_kf: [K, 3, 3] intrinsics in pixels of
    the network-size images (H, W) = image_hw, or None (FoV entries 0). scale: metres per
    normalised unit; None = mean distance of the other keyframes' centres from the
    reference (1 m when K = 1 or all centres coincide).
    Returns (pose_enc [K, 9] float32: camera-from-reference extrinsics with translation
    divided by ``scale``, in VGGT's encoding, so the reference is [0,0,0, 0,0,0,1, fov]),
    scale).
    """
    T = np.asarray(T_world_kf, dtype=np.float64)
    if T.ndim != 3 or T.shape[1:] != (4, 4) or len(T) == 0 or not np.all(np.isfinite(T)):
        raise InvalidInputError(f"T_world_kf must be finite [K,4,4] with K >= 1, got {T.shape}")
    T_ref_kf = invert(T[0]) @ T
    if scale is None:
        d = np.linalg.norm(T_ref_kf[1:, :3, 3], axis=1)
        scale = float(d.mean()) if len(d) and d.mean() > 1e-9 else 1.0
    if not (math.isfinite(scale) and scale > 0):
        raise InvalidInputError(f"pose normalisation scale must be > 0, got {scale}")
    T_n = T_ref_kf.copy()
    T_n[:, :3, 3] /= scale
    E = invert(T_n)[:, :3, :]
    intr = None if K_kf is None else torch.as_tensor(np.asarray(K_kf, dtype=np.float64))
    enc = extri_intri_to_pose_encoding(torch.as_tensor(E), intr, image_hw)
    return enc.float().numpy(), float(scale)


def predicted_T_ref_cam(pose_enc: torch.Tensor, image_hw: Tuple[int, int]) -> np.ndarray:
    """Camera-to-reference poses [..., S, 4, 4] float64 (VGGT's normalised scale) from the
    predicted pose encodings [..., S, 9] (rotations re-orthonormalised)."""
    ext, _ = pose_encoding_to_extri_intri(pose_enc.detach().double().cpu(), image_hw)
    return extrinsics_to_T_world_cam(ext)


def relative_pairs(T_ref_cam: np.ndarray) -> np.ndarray:
    """Predicted query -> keyframe relative poses T_kf_query [K, 4, 4] (translation in
    VGGT's normalised scale: use its direction) from camera-to-reference poses
    [K+1, 4, 4] (keyframes then query)."""
    T = np.asarray(T_ref_cam, dtype=np.float64)
    return invert(T[:-1]) @ T[-1][None]


@dataclass
class Sim3Config:
    """Robust Sim(3) alignment of predicted keyframe poses to their known poses.

    inlier_position_ratio: a keyframe agrees with an alignment when its aligned centre is
        within this fraction of the keyframes' spread (RMS distance of the known centres
        from their centroid, floored at ``min_spread_m``) of its known centre.
    inlier_rotation_deg: ... and its aligned rotation within this angle of the known one.
    min_spread_m: floor of that spread (metres); below it the scale is unobservable and
        the result is DEGENERATE.
    max_hypotheses: keyframe pairs tried as minimal samples (all pairs when there are at
        most this many, else a fixed pseudo-random subset of this size).
    position_floor_ratio / rotation_floor_deg: per-keyframe noise assumed before looking
        at residuals (blended with ``prior_strength`` pseudo-observations), so a perfect
        fit never yields a zero covariance.
    prior_strength: pseudo-observations behind those floors (> 0).
    """

    inlier_position_ratio: float = 0.25
    inlier_rotation_deg: float = 15.0
    min_spread_m: float = 0.02
    max_hypotheses: int = 64
    position_floor_ratio: float = 0.02
    rotation_floor_deg: float = 1.0
    prior_strength: float = 2.0

    def validate(self) -> None:
        for name in ("inlier_position_ratio", "inlier_rotation_deg", "min_spread_m", "position_floor_ratio",
                     "rotation_floor_deg", "prior_strength"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                raise ValueError(f"Sim3Config.{name} must be a finite number > 0, got {v!r}")
        if int(self.max_hypotheses) != self.max_hypotheses or self.max_hypotheses < 1:
            raise ValueError(f"Sim3Config.max_hypotheses must be an integer >= 1, got {self.max_hypotheses!r}")


@dataclass
class Sim3Result:
    """Query pose from a Sim(3) alignment.

    T_world_cam: [4, 4] or None. covariance: [6, 6] (x, y, z, rx, ry, rz), world frame,
    m^2 / rad^2, rotation as a left perturbation; None without a pose.
    scale: metres per VGGT unit. inlier_mask: [K] keyframes consistent with the alignment.
    residuals_m / residuals_deg: [K] per-keyframe centre / rotation residuals.
    """

    T_world_cam: Optional[np.ndarray]
    covariance: Optional[np.ndarray]
    status: Status
    confidence: float
    inlier_mask: np.ndarray
    scale: float = float("nan")
    message: str = ""
    residuals_m: np.ndarray = field(default_factory=lambda: np.zeros(0))
    residuals_deg: np.ndarray = field(default_factory=lambda: np.zeros(0))


def _project_so3_batch(M: np.ndarray) -> np.ndarray:
    """Closest rotations [n, 3, 3] (Frobenius) to matrices [n, 3, 3]."""
    U, _, Vt = np.linalg.svd(M)
    D = np.ones(M.shape[:-1])
    D[..., 2] = np.sign(np.linalg.det(U @ Vt))
    return (U * D[..., None, :]) @ Vt


def _rot_mean(Rs: np.ndarray, w: Optional[np.ndarray] = None) -> np.ndarray:
    w = np.ones(len(Rs)) if w is None else w
    return project_to_so3(np.einsum("n,nij->ij", w, Rs))


def _angles_deg(Ra: np.ndarray, Rb: np.ndarray) -> np.ndarray:
    """Geodesic angles [n] between rotations Ra [n,3,3] and Rb [n,3,3] (or [3,3])."""
    c = np.clip(((Ra * Rb).sum(axis=(-2, -1)) - 1.0) / 2.0, -1.0, 1.0)
    return np.degrees(np.arccos(c))


def _fit_given_rotation(R: np.ndarray, p: np.ndarray, c: np.ndarray, w: np.ndarray) -> Tuple[float, np.ndarray]:
    """Least-squares (s, t) of c ~ s R p + t with R fixed (weights w)."""
    w = w / w.sum()
    pm, cm = w @ p, w @ c
    Rp = (p - pm) @ R.T
    den = float(w @ np.sum(Rp**2, axis=1))
    s = float(w @ np.sum(Rp * (c - cm), axis=1)) / den if den > 1e-18 else float("nan")
    return s, cm - s * R @ pm


def sim3_localize(T_world_kf: np.ndarray, T_ref_cam_pred: np.ndarray, config: Optional[Sim3Config] = None,
                  weights: Optional[np.ndarray] = None) -> Sim3Result:
    """Query pose in the map from a robust Sim(3) between predicted and known keyframes.

    T_world_kf: [K, 4, 4] known keyframe camera-to-world poses (metres).
    T_ref_cam_pred: [K+1, 4, 4] predicted camera-to-reference poses (VGGT's normalised
    scale), keyframes in the same order, then the query.
    weights: [K] >= 0 or None.

    Find (s, R, t) with ``T_world_kf ~ [R R_pred | s R c_pred + t]``: every keyframe pair
    proposes R = mean of its two ``R_known R_pred^T``, s from the ratio of their
    baselines, t from their centroids; the hypothesis with most agreeing keyframes (centre
    and rotation, :class:`Sim3Config`) is refined on its inliers by (a) rotation
    averaging + least-squares scale/translation and (b) weighted Umeyama on the centres
    (when >= 3 inlier centres are not collinear), keeping whichever fits the inliers
    better; inliers are re-evaluated and the fit repeated. The query pose is the aligned
    prediction. Covariance from the inlier residuals (blended with the floors), the
    position part inflated with the query's distance from the inlier centroid.
    Needs K >= 2 keyframes with distinct centres (the scale is otherwise unobservable).
    """
    cfg = config or Sim3Config()
    cfg.validate()
    Tk = np.asarray(T_world_kf, dtype=np.float64)
    Tp = np.asarray(T_ref_cam_pred, dtype=np.float64)
    if Tk.ndim != 3 or Tk.shape[1:] != (4, 4) or Tp.shape != (len(Tk) + 1, 4, 4):
        raise InvalidInputError(f"sim3_localize needs [K,4,4] known and [K+1,4,4] predicted poses, got "
                                f"{Tk.shape} and {Tp.shape}")
    if not (np.all(np.isfinite(Tk)) and np.all(np.isfinite(Tp))):
        raise InvalidInputError("sim3_localize: non-finite pose")
    K = len(Tk)
    w_all = np.ones(K) if weights is None else np.asarray(weights, dtype=np.float64).ravel()
    if w_all.shape != (K,) or np.any(w_all < 0) or not np.all(np.isfinite(w_all)):
        raise InvalidInputError(f"weights must be [K] finite >= 0, got {weights!r}")
    none = np.zeros(K, dtype=bool)
    if K < 2 or np.count_nonzero(w_all) < 2:
        return Sim3Result(None, None, Status.NOT_LOCALIZED, 0.0, none,
                          message=f"Sim(3) alignment needs >= 2 weighted keyframes, got {np.count_nonzero(w_all)}")
    Rk = _project_so3_batch(Tk[:, :3, :3])
    Rp = _project_so3_batch(Tp[:, :3, :3])
    c, p = Tk[:, :3, 3], Tp[:K, :3, 3]
    R_i = Rk @ np.swapaxes(Rp[:K], 1, 2)  # R_known R_pred^T, one rotation guess per keyframe
    spread = float(np.sqrt(np.mean(np.sum((c - c.mean(0)) ** 2, axis=1))))
    degenerate_spread = spread < cfg.min_spread_m
    spread = max(spread, cfg.min_spread_m)
    thr_m = cfg.inlier_position_ratio * spread

    def residuals(s, R, t):
        rm = np.linalg.norm(s * p @ R.T + t - c, axis=1)
        rd = _angles_deg(R[None] @ Rp[:K], Rk)
        return rm, rd

    def cost(rm, rd, mask):
        return float(np.sum(w_all[mask] * ((rm[mask] / thr_m) ** 2 + (rd[mask] / cfg.inlier_rotation_deg) ** 2)))

    usable = np.flatnonzero(w_all > 0)
    pairs = np.array(list(itertools.combinations(usable.tolist(), 2)))
    if len(pairs) > cfg.max_hypotheses:  # a fixed spread of pairs: deterministic results
        pairs = pairs[np.random.default_rng(0).choice(len(pairs), int(cfg.max_hypotheses), replace=False)]
    best = None
    bp = np.linalg.norm(p[pairs[:, 0]] - p[pairs[:, 1]], axis=1)
    pairs, bp = pairs[bp > 1e-12], bp[bp > 1e-12]
    if len(pairs):
        # All minimal hypotheses at once: [M] scales, [M,3,3] rotations, [M,3] translations.
        Rh = _project_so3_batch(R_i[pairs[:, 0]] + R_i[pairs[:, 1]])
        sh = np.linalg.norm(c[pairs[:, 0]] - c[pairs[:, 1]], axis=1) / bp
        th = 0.5 * (c[pairs[:, 0]] + c[pairs[:, 1]]) - sh[:, None] * (
            Rh @ (0.5 * (p[pairs[:, 0]] + p[pairs[:, 1]]))[:, :, None])[:, :, 0]
        Rp_h = (Rh.reshape(-1, 3) @ p.T).reshape(len(Rh), 3, K).transpose(0, 2, 1)  # R p, [M, K, 3]
        rm_h = np.linalg.norm(sh[:, None, None] * Rp_h + th[:, None] - c[None], axis=2)
        # angle(R R_pred, R_known): trace((R R_pred)^T R_known) = <R, R_known R_pred^T> (Frobenius)
        cos = (Rh.reshape(-1, 9) @ R_i.reshape(K, 9).T - 1.0) / 2.0
        rd_h = np.degrees(np.arccos(np.clip(cos, -1.0, 1.0)))
        inl_h = (rm_h < thr_m) & (rd_h < cfg.inlier_rotation_deg) & (w_all > 0)[None]
        support = (inl_h * w_all[None]).sum(1)
        cost_h = (inl_h * w_all[None] * ((rm_h / thr_m) ** 2 + (rd_h / cfg.inlier_rotation_deg) ** 2)).sum(1)
        m = int(np.lexsort((cost_h, -support))[0])  # most support, then lowest cost
        best = (sh[m], Rh[m], th[m], inl_h[m])
    if best is None or best[3].sum() < 2:
        return Sim3Result(None, None, Status.NOT_LOCALIZED, 0.0, none,
                          message="no two keyframes agree on a Sim(3) alignment (predicted centres coincide or "
                                  "disagree in rotation/position)")
    s, R, t, inl = best
    for _ in range(4):
        w = w_all * inl
        cands = []
        Ra = _rot_mean(R_i[inl], w[inl])
        sa, ta = _fit_given_rotation(Ra, p[inl], c[inl], w[inl])
        if math.isfinite(sa) and sa > 0:
            cands.append((sa, Ra, ta))
        if inl.sum() >= 3:
            cc = c[inl] - c[inl].mean(0)
            sv = np.linalg.svd(cc, compute_uv=False)
            if sv[1] > 0.1 * sv[0]:
                su, Ru, tu = umeyama(p[inl], c[inl], with_scale=True, weights=w[inl])
                if math.isfinite(su) and su > 0:
                    cands.append((su, Ru, tu))
        if not cands:
            break
        s, R, t = min(cands, key=lambda h: cost(*residuals(*h), inl))
        rm, rd = residuals(s, R, t)
        new = (rm < thr_m) & (rd < cfg.inlier_rotation_deg) & (w_all > 0)
        if new.sum() < 2 or np.array_equal(new, inl):
            break
        inl = new
    rm, rd = residuals(s, R, t)
    n = int(inl.sum())
    T = np.eye(4)
    T[:3, :3] = R @ Rp[K]
    T[:3, 3] = s * R @ Tp[K, :3, 3] + t
    # Residual variances (3 dof a keyframe for position, 3 for rotation), shrunk toward
    # the floors; the Sim(3) uses 7 of the 6n observations.
    dof = max(6 * n - 7, 0)
    s0 = cfg.position_floor_ratio * spread
    var_p = (float(np.sum(rm[inl] ** 2)) + 3 * cfg.prior_strength * s0**2) / (0.5 * dof + 3 * cfg.prior_strength)
    r0 = math.radians(cfg.rotation_floor_deg)
    var_r = (float(np.sum(np.radians(rd[inl]) ** 2)) + 3 * cfg.prior_strength * r0**2) / (0.5 * dof + 3 * cfg.prior_strength)
    cen = c[inl].mean(0)
    lever = float(np.sum((T[:3, 3] - cen) ** 2) / max(np.sum((c[inl] - cen) ** 2), 1e-12))
    cov = np.zeros((6, 6))
    cov[:3, :3] = var_p * (1.0 / n + lever) * np.eye(3) + var_r * np.sum((T[:3, 3] - cen) ** 2) / n * np.eye(3)
    cov[3:, 3:] = var_r / n * np.eye(3)
    frac = n / len(usable)
    status = Status.DEGENERATE if degenerate_spread else Status.OK
    conf = frac * (n / (n + 2.0)) * (0.25 if degenerate_spread else 1.0)
    msg = (f"{n}/{K} keyframes agree (scale {s:.3g} m/unit, centre RMS {math.sqrt(np.mean(rm[inl]**2)):.3f} m, "
           f"rotation RMS {math.sqrt(np.mean(rd[inl]**2)):.2f} deg)")
    if degenerate_spread:
        msg = f"keyframe centres within {cfg.min_spread_m} m: scale poorly observable; " + msg
    return Sim3Result(T, cov, status, float(conf), inl, float(s), msg, rm, rd)
