"""How self-consistent is a dataset's ground truth? (prints; asserts nothing)

    .venv/bin/python bench/check_gt_consistency.py [--shared ../shared] [--pairs 300:290,300:270,480:460]
        [--fx 500,525,550]

Two independent checks on pairs of 7-Scenes frames:
- depth: aligns the two depth point clouds by point-to-point ICP started at the
  ground-truth relative pose and prints how far ICP moves away from it;
- colour: SIFT matches filtered by their own fundamental matrix (RANSAC, 1 px) and
  their epipolar distance under the ground-truth relative pose, for each colour focal
  length in --fx (the published one is 525).
With ground truth consistent with its images, ICP stays within ~0.1 deg / a few mm and
the epipolar distance under ground truth stays near the matches' own ~0.5 px. Whatever
exceeds that bounds the accuracy any localizer can show against this ground truth (the
"pseudo ground truth" problem, Brachmann et al. ICCV 2021).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import cv2
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


def epipolar_vs_gt(fa, fb, fx_values):
    """Matches of colour frames a, b that fit their own F (RANSAC, 1 px); returns
    (n inliers, {fx: median epipolar distance in px of those matches under the GT pose})."""
    sift = cv2.SIFT_create(6000)
    grey = [cv2.cvtColor(f.image, cv2.COLOR_RGB2GRAY) if f.image.ndim == 3 else f.image for f in (fa, fb)]
    (ka, da), (kb, db) = (sift.detectAndCompute(g, None) for g in grey)
    m = [x for x, y in cv2.BFMatcher().knnMatch(da, db, k=2) if x.distance < 0.75 * y.distance]
    pa = np.float64([ka[x.queryIdx].pt for x in m])
    pb = np.float64([kb[x.trainIdx].pt for x in m])
    _, inl = cv2.findFundamentalMat(pa, pb, cv2.FM_RANSAC, 1.0, 0.999)
    inl = inl.ravel() > 0
    pa, pb = pa[inl], pb[inl]
    T_ba = invert(fb.T_world_cam) @ fa.T_world_cam
    t = T_ba[:3, 3]
    E = np.array([[0, -t[2], t[1]], [t[2], 0, -t[0]], [-t[1], t[0], 0]]) @ T_ba[:3, :3]
    out = {}
    for fx in fx_values:
        K = fa.camera.K.copy()
        K[0, 0] = K[1, 1] = fx
        Ki = np.linalg.inv(K)
        F = Ki.T @ E @ Ki
        lines = np.c_[pa, np.ones(len(pa))] @ F.T
        d = np.abs(np.sum(np.c_[pb, np.ones(len(pb))] * lines, axis=1)) / np.hypot(lines[:, 0], lines[:, 1])
        out[fx] = float(np.median(d))
    return int(inl.sum()), out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shared", default="../shared")
    ap.add_argument("--pairs", default="300:295,300:290,300:270,300:245,480:470,480:460,480:440,250:210,340:300")
    ap.add_argument("--fx", default="525", help="colour focal lengths (px) to try in the epipolar check")
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
        n_m, epi = epipolar_vs_gt(ds[a], ds[b], [float(x) for x in args.fx.split(",")])
        print(f"    colour: {n_m} matches fit their own F to 1 px; median epipolar distance under GT "
              + ", ".join(f"{d:.2f} px (fx {fx:g})" for fx, d in epi.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
