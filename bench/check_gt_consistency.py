"""How self-consistent is a dataset's ground truth? (prints; asserts nothing)

    .venv/bin/python bench/check_gt_consistency.py [--shared ../shared] [--pairs 300:290,300:270,480:460]

For pairs of 7-Scenes frames, aligns the two depth point clouds by point-to-point ICP
started at the ground-truth relative pose, and prints how far ICP moves away from it.
With ground truth consistent with its own depth maps, ICP stays within ~0.1 deg/ few mm.
This bounds the accuracy any localizer can show against that ground truth (the
"pseudo ground truth" problem, Brachmann et al. ICCV 2021).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from scipy.spatial import cKDTree

from reloc_ros.datasets import open_dataset
from reloc_ros.geometry import invert, rotation_angle_deg, umeyama


def _cloud(frame, stride: int = 7) -> np.ndarray:
    d = frame.depth
    K = (frame.depth_camera or frame.camera).K
    v, u = np.nonzero(d > 0)
    v, u = v[::stride], u[::stride]
    z = d[v, u].astype(np.float64)
    X = np.stack([(u - K[0, 2]) / K[0, 0] * z, (v - K[1, 2]) / K[1, 1] * z, z], axis=1)
    T = np.eye(4) if frame.T_cam_depth is None else frame.T_cam_depth
    return X @ T[:3, :3].T + T[:3, 3]  # colour-camera coordinates


def icp_vs_gt(fa, fb, max_dist: float = 0.03, iters: int = 30):
    """(rotation deg, translation m) between ICP's and the GT relative pose a -> b."""
    A, B = _cloud(fa), _cloud(fb)
    tree = cKDTree(B)
    T_gt = invert(fb.T_world_cam) @ fa.T_world_cam
    R, t = T_gt[:3, :3], T_gt[:3, 3]
    for _ in range(iters):
        d, i = tree.query(A @ R.T + t)
        m = d < max_dist
        _, R, t = umeyama(A[m], B[i[m]], with_scale=False)
    return rotation_angle_deg(R, T_gt[:3, :3]), float(np.linalg.norm(t - T_gt[:3, 3])), int(m.sum())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shared", default="../shared")
    ap.add_argument("--pairs", default="300:295,300:290,300:270,300:245,480:470,480:460,480:440")
    args = ap.parse_args(argv)
    src = Path(args.shared) / "data" / "7scenes_redkitchen_0000_0499"
    if not src.exists():
        print(f"skipped: {src} is absent")
        return 0
    ds = open_dataset("7scenes", src)
    for pair in args.pairs.split(","):
        a, b = (int(x) for x in pair.split(":"))
        r, t, n = icp_vs_gt(ds[a], ds[b])  # 7-Scenes indices are frame numbers
        print(f"frames {a} -> {b} ({abs(a - b)} apart): ICP moves {r:.2f} deg, {t * 100:.1f} cm from GT "
              f"({n} inlier points)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
