"""Losses of ``reloc-train``.

- :func:`camera_encoding_loss` (Reloc-VGGT): VGGT's camera loss. Every refinement
  iteration i of n is supervised, weighted ``gamma ** (n - 1 - i)`` (the last counts
  most), with the L1 (or Huber) distance between predicted and true 9-d encodings
  split into translation / quaternion / FoV terms (VGGT trains its camera head this
  way). The ground truth lives where the network predicts: camera-from-reference
  extrinsics with translations divided by the keyframes' mean distance from the
  reference, exactly the frame and scale of the pose tokenizer's input
  (``encode_known_poses``), so the scale is known at test time and the Sim(3) decoding
  recovers metres from the keyframes. The query frame's term gets ``query_weight``.
- :func:`relative_pose_loss` (Reloc3r): geodesic rotation angle plus the angle between
  predicted and true translation directions (radians), as Reloc3r's ``loss.py``:
  the magnitude of t is unobservable from two images, so only its direction is trained.
"""
from __future__ import annotations

from typing import Dict, List, Tuple

import torch
import torch.nn.functional as F

from reloc_ros.training.config import LossSection

__all__ = ["camera_encoding_loss", "relative_pose_loss", "geodesic_angle", "direction_angle"]


def _dist(a: torch.Tensor, b: torch.Tensor, huber_delta: float) -> torch.Tensor:
    """Per-element L1 or Huber distance (same shape as a)."""
    if huber_delta > 0:
        return F.huber_loss(a, b, reduction="none", delta=huber_delta)
    return (a - b).abs()


def camera_encoding_loss(pred_list: List[torch.Tensor], gt: torch.Tensor, cfg: LossSection
                         ) -> Tuple[torch.Tensor, Dict[str, float]]:
    """VGGT camera loss over refinement iterations.

    pred_list: n tensors [B, S, 9] (keyframes then the query last); gt: [B, S, 9].
    Returns (scalar loss, {'trans', 'rot', 'fov', 'query_trans', 'query_rot'} of the
    last iteration, batch means, for logging).
    """
    n = len(pred_list)
    B, S, _ = gt.shape
    w = torch.ones(S, dtype=gt.dtype, device=gt.device)
    w[-1] = cfg.query_weight
    w = w / w.sum()
    total = gt.new_zeros(())
    logs: Dict[str, float] = {}
    for i, pred in enumerate(pred_list):
        g = cfg.gamma ** (n - 1 - i)
        d = _dist(pred.to(gt.dtype), gt, cfg.huber_delta)  # [B, S, 9]
        lt = d[..., :3].mean(-1)
        lr = d[..., 3:7].mean(-1)
        lf = d[..., 7:].mean(-1)
        per_frame = cfg.weight_trans * lt + cfg.weight_rot * lr + cfg.weight_fov * lf  # [B, S]
        total = total + g * (per_frame * w).sum(-1).mean()
        if i == n - 1:
            lt, lr, lf = lt.detach(), lr.detach(), lf.detach()
            logs = {"trans": float(lt.mean()), "rot": float(lr.mean()), "fov": float(lf.mean()),
                    "query_trans": float(lt[:, -1].mean()), "query_rot": float(lr[:, -1].mean())}
    return total, logs


def geodesic_angle(R_pred: torch.Tensor, R_gt: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Rotation angle (radians) of R_pred^T R_gt, [...] for [..., 3, 3] inputs; the
    cosine is clamped just inside [-1, 1] so the gradient stays finite."""
    tr = (R_pred.transpose(-1, -2) @ R_gt).diagonal(dim1=-2, dim2=-1).sum(-1)
    return torch.acos(((tr - 1) / 2).clamp(-1 + eps, 1 - eps))


def direction_angle(t_pred: torch.Tensor, t_gt: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Angle (radians) between translation directions [..., 3] (magnitudes ignored)."""
    c = F.cosine_similarity(t_pred, t_gt, dim=-1, eps=1e-9)
    return torch.acos(c.clamp(-1 + eps, 1 - eps))


def relative_pose_loss(pose_pred: torch.Tensor, pose_gt: torch.Tensor, cfg: LossSection
                       ) -> Tuple[torch.Tensor, Dict[str, float]]:
    """Reloc3r loss: pose_pred / pose_gt [B, 4, 4] relative poses (view 2 -> view 1).
    Returns (mean of rotation angle + weight_trans * direction angle, logs in degrees)."""
    ra = geodesic_angle(pose_pred[:, :3, :3], pose_gt[:, :3, :3])
    ta = direction_angle(pose_pred[:, :3, 3], pose_gt[:, :3, 3])
    loss = (cfg.weight_rot * ra + cfg.weight_trans * ta).mean()
    return loss, {"rot_deg": float(torch.rad2deg(ra.detach()).mean()), "dir_deg": float(torch.rad2deg(ta.detach()).mean())}
