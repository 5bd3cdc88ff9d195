"""The demo's rendered room: depth and poses are exact, and the views are rich in features."""
import cv2
import numpy as np
import pytest

from reloc_ros.demo.scene import ProceduralRoom, RoomConfig, demo_camera, look_pose, orbit_poses
from reloc_ros.geometry import invert, is_rigid


@pytest.fixture(scope="module")
def room():
    # Coarser texels than the demo keep the test quick; the geometry is the same.
    return ProceduralRoom(RoomConfig(texel_m=0.008))


def test_depth_reprojects_consistently_between_views(room):
    """A pixel back-projected with its depth and projected into another view lands on the same
    surface point there: same depth and the same colour (the renders, poses and intrinsics agree)."""
    cam = demo_camera(320, 240, 262.5)
    T1 = look_pose([3.0, 2.5, 1.4], yaw=0.2, pitch=0.2)
    T2 = look_pose([3.3, 2.3, 1.3], yaw=0.35, pitch=0.15, roll=0.05)
    img1, d1 = room.render(T1, cam)
    img2, d2 = room.render(T2, cam)
    rng = np.random.default_rng(0)
    v, u = rng.integers(10, 230, 400), rng.integers(10, 310, 400)
    X1 = np.linalg.solve(cam.K, np.stack([u, v, np.ones_like(u)]).astype(float)) * d1[v, u]
    Xw = T1[:3, :3] @ X1 + T1[:3, 3:4]
    T21 = invert(T2)
    X2 = T21[:3, :3] @ Xw + T21[:3, 3:4]
    rvec, _ = cv2.Rodrigues(T21[:3, :3])
    proj, _ = cv2.projectPoints(Xw.T, rvec, T21[:3, 3], cam.K, None)
    uv2 = proj.reshape(-1, 2)
    ui, vi = np.round(uv2[:, 0]).astype(int), np.round(uv2[:, 1]).astype(int)
    inside = (ui >= 2) & (ui < 318) & (vi >= 2) & (vi < 238)
    # Points hidden in view 2 have a nearer surface there; keep the visible ones.
    visible = inside.copy()
    visible[inside] = np.abs(d2[vi[inside], ui[inside]] - X2[2, inside]) < 0.02
    assert visible.sum() > 200
    dz = np.abs(d2[vi[visible], ui[visible]] - X2[2, visible])
    assert np.median(dz) < 0.005
    # Colour at the reprojected location (rounded pixel) matches up to texture slope.
    c1 = img1[v[visible], u[visible]].astype(float)
    c2 = img2[vi[visible], ui[visible]].astype(float)
    assert np.median(np.abs(c1 - c2)) < 25.0


def test_depth_is_positive_and_bounded_by_the_room(room):
    cam = demo_camera(160, 120, 131.25)
    for T in orbit_poses(room, 4):
        assert is_rigid(T)
        _, depth = room.render(T, cam)
        assert depth.dtype == np.float32 and np.all(depth > 0.05)
        assert depth.max() < np.linalg.norm(room.size)


def test_views_have_many_distinctive_features(room):
    """SIFT finds many features, and ratio-test matches between two views obey the true epipolar geometry."""
    cam = demo_camera(320, 240, 262.5)
    T1 = look_pose([3.0, 2.5, 1.4], yaw=0.2, pitch=0.2)
    T2 = look_pose([3.2, 2.2, 1.3], yaw=0.45, pitch=0.15)
    sift = cv2.SIFT_create()
    feats = []
    for T in (T1, T2):
        kps, d = sift.detectAndCompute(cv2.cvtColor(room.render(T, cam)[0], cv2.COLOR_RGB2GRAY), None)
        assert len(kps) > 300
        feats.append((np.array([k.pt for k in kps]), d))
    pairs = [m[0] for m in cv2.BFMatcher().knnMatch(feats[0][1], feats[1][1], k=2)
             if m[0].distance < 0.8 * m[1].distance]
    assert len(pairs) > 100
    x1 = feats[0][0][[m.queryIdx for m in pairs]]
    x2 = feats[1][0][[m.trainIdx for m in pairs]]
    T21 = invert(T2) @ T1
    t = T21[:3, 3]
    E = np.array([[0, -t[2], t[1]], [t[2], 0, -t[0]], [-t[1], t[0], 0]]) @ T21[:3, :3]
    Kinv = np.linalg.inv(cam.K)
    F = Kinv.T @ E @ Kinv
    h1 = np.c_[x1, np.ones(len(x1))]
    h2 = np.c_[x2, np.ones(len(x2))]
    Fx1, Ftx2 = h1 @ F.T, h2 @ F
    sampson = (np.sum(h2 * Fx1, 1) ** 2) / (Fx1[:, 0] ** 2 + Fx1[:, 1] ** 2 + Ftx2[:, 0] ** 2 + Ftx2[:, 1] ** 2)
    assert np.mean(np.sqrt(sampson) < 1.0) > 0.9


def test_trajectories_stay_in_free_space(room):
    for T in np.concatenate([orbit_poses(room, 24), orbit_poses(room, 16, 0.8, 0.37, seed=11, jitter=1.0)]):
        assert room.inside_free_space(T[:3, 3], margin=0.3)
