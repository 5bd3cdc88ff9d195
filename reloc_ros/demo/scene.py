"""A procedurally textured room, ray-cast in numpy with exact poses, intrinsics and depth.

World frame: z up (REP-103), the room spans [0, sx] x [0, sy] x [0, sz] metres, boxes
stand on the floor. Cameras are OpenCV optical frames (x right, y down, z forward);
``render`` takes a camera-to-world ``T_world_cam`` [4, 4] and a pinhole ``Camera`` and
returns the [H, W, 3] uint8 RGB image and the [H, W] float32 z-depth in metres, exactly
consistent with ``cv2.projectPoints`` (pixel centres at integer coordinates).

Every surface has its own texture (seeded), mixing smooth colour fields, hundreds of
shapes from centimetres to decimetres, random glyphs and fine grain, so SIFT finds many
distinctive features at any viewing distance in the room. Textures are mip-mapped so
distant surfaces do not alias into features that no other view would reproduce.
"""
from __future__ import annotations

import string
from dataclasses import dataclass, field
from typing import List, Sequence, Tuple

import cv2
import numpy as np

from reloc_ros.geometry import make_T
from reloc_ros.types import Camera, PosedFrame


@dataclass(frozen=True)
class RoomConfig:
    """Room geometry and texture resolution.

    size: (sx, sy, sz) metres. boxes: ((x0, y0, z0), (x1, y1, z1)) axis-aligned obstacles.
    texel_m: texture resolution (metres per texel) at mip level 0. seed: texture seed.
    """

    size: Tuple[float, float, float] = (6.0, 5.0, 3.0)
    boxes: Tuple[Tuple[Tuple[float, float, float], Tuple[float, float, float]], ...] = (
        ((0.3, 0.3, 0.0), (1.1, 1.0, 0.9)),
        ((4.6, 3.7, 0.0), (5.6, 4.6, 1.2)),
        ((4.8, 0.4, 0.0), (5.5, 1.2, 0.6)),
        ((0.4, 3.9, 0.0), (1.0, 4.7, 1.6)),
    )
    texel_m: float = 0.004
    seed: int = 7


@dataclass
class _Surface:
    axis: int  # normal axis (0 x, 1 y, 2 z)
    uv_axes: Tuple[int, int]  # world axes mapped to texture columns / rows
    origin: np.ndarray  # world coordinates of texel (0, 0) along uv_axes
    mips: List[np.ndarray] = field(default_factory=list)  # [h, w, 3] uint8, level 0 first
    shade: float = 1.0


def _texture(h: int, w: int, texel_m: float, rng: np.random.Generator) -> np.ndarray:
    """[h, w, 3] uint8 multi-scale texture: colour field + shapes + glyphs + grain."""
    gh, gw = max(2, h // 120), max(2, w // 120)
    field_ = rng.uniform(40, 215, size=(gh, gw, 3)).astype(np.float32)
    img = cv2.resize(field_, (w, h), interpolation=cv2.INTER_CUBIC)
    img = np.clip(img, 0, 255).astype(np.uint8)
    area_m2 = h * w * texel_m * texel_m
    px = 1.0 / texel_m  # texels per metre

    def colour() -> Tuple[int, int, int]:
        c = rng.integers(0, 256, size=3)
        if rng.random() < 0.5:  # keep strong luminance contrast; SIFT sees grey only
            c = c // 4 if rng.random() < 0.5 else 192 + c // 4
        return int(c[0]), int(c[1]), int(c[2])

    for _ in range(int(25 * area_m2)):  # large blobs: visible from across the room
        r = int(rng.uniform(0.05, 0.25) * px)
        cx, cy = int(rng.integers(0, w)), int(rng.integers(0, h))
        if rng.random() < 0.5:
            cv2.circle(img, (cx, cy), r, colour(), -1, cv2.LINE_AA)
        else:
            ang = float(rng.uniform(0, 180))
            cv2.ellipse(img, (cx, cy), (r, max(3, int(r * rng.uniform(0.3, 1.0)))), ang, 0, 360, colour(), -1,
                        cv2.LINE_AA)
    for _ in range(int(60 * area_m2)):  # mid-size rectangles and polygons with corners
        s = rng.uniform(0.02, 0.12) * px
        cx, cy = rng.uniform(0, w), rng.uniform(0, h)
        k = int(rng.integers(3, 7))
        ang = np.sort(rng.uniform(0, 2 * np.pi, k))
        rad = s * rng.uniform(0.5, 1.0, k)
        pts = np.stack([cx + rad * np.cos(ang), cy + rad * np.sin(ang)], 1).astype(np.int32)
        cv2.fillPoly(img, [pts], colour(), cv2.LINE_AA)
    for _ in range(int(20 * area_m2)):  # lines
        p0 = (int(rng.integers(0, w)), int(rng.integers(0, h)))
        d = rng.uniform(0.05, 0.4) * px
        a = rng.uniform(0, 2 * np.pi)
        p1 = (int(p0[0] + d * np.cos(a)), int(p0[1] + d * np.sin(a)))
        cv2.line(img, p0, p1, colour(), max(1, int(rng.uniform(0.003, 0.012) * px)), cv2.LINE_AA)
    letters = string.ascii_uppercase + string.digits
    for _ in range(int(30 * area_m2)):  # glyphs: many corners, all different
        text = "".join(rng.choice(list(letters), size=int(rng.integers(1, 4))))
        scale = rng.uniform(0.02, 0.08) * px / 22.0
        org = (int(rng.integers(0, w)), int(rng.integers(0, h)))
        cv2.putText(img, text, org, cv2.FONT_HERSHEY_SIMPLEX, scale, colour(), max(1, int(scale * 2.5)),
                    cv2.LINE_AA)
    grain = rng.normal(0, 6, size=(h, w, 1)).astype(np.float32)
    out = np.clip(img.astype(np.float32) + grain, 0, 255)
    return cv2.GaussianBlur(out, (0, 0), 0.7).astype(np.uint8)


class ProceduralRoom:
    """The demo world: an axis-aligned textured room with boxes, rendered by ray casting."""

    def __init__(self, config: RoomConfig = RoomConfig()) -> None:
        self.config = config
        self.size = np.asarray(config.size, dtype=np.float64)
        self.boxes = [(np.asarray(lo, np.float64), np.asarray(hi, np.float64)) for lo, hi in config.boxes]
        rng = np.random.default_rng(config.seed)
        self.surfaces: List[_Surface] = []
        # Room faces 0..5: (axis, side) with side 0 = low plane, 1 = high plane.
        for axis in range(3):
            for side in range(2):
                self.surfaces.append(self._make_surface(axis, np.zeros(3), self.size, rng))
        # Box faces follow, 6 per box in the same (axis, side) order.
        for lo, hi in self.boxes:
            for axis in range(3):
                for side in range(2):
                    self.surfaces.append(self._make_surface(axis, lo, hi, rng))

    def _make_surface(self, axis: int, lo: np.ndarray, hi: np.ndarray, rng: np.random.Generator) -> _Surface:
        uv = tuple(a for a in range(3) if a != axis)
        tm = self.config.texel_m
        w = max(8, int(np.ceil((hi[uv[0]] - lo[uv[0]]) / tm)) + 2)
        h = max(8, int(np.ceil((hi[uv[1]] - lo[uv[1]]) / tm)) + 2)
        tex = _texture(h, w, tm, rng)
        mips = [tex]
        while min(mips[-1].shape[:2]) > 16 and len(mips) < 6:
            mips.append(cv2.pyrDown(mips[-1]))
        # Fixed per-face brightness, as if lit from above: view-independent, so every view
        # of a point sees the same colour.
        shade = (0.8, 0.9, 0.85, 0.95, 0.75, 1.0)[2 * axis + int(rng.integers(0, 2))]
        return _Surface(axis, uv, np.array([lo[uv[0]], lo[uv[1]]]), mips, shade)

    # ------------------------------------------------------------------ rendering
    def inside_free_space(self, p: np.ndarray, margin: float = 0.1) -> bool:
        """True when point p [3] (metres) is in the room, at least ``margin`` from walls and boxes."""
        p = np.asarray(p, dtype=np.float64)
        if np.any(p < margin) or np.any(p > self.size - margin):
            return False
        return not any(np.all(p > lo - margin) and np.all(p < hi + margin) for lo, hi in self.boxes)

    def render(self, T_world_cam: np.ndarray, camera: Camera) -> Tuple[np.ndarray, np.ndarray]:
        """Image [H, W, 3] uint8 RGB and z-depth [H, W] float32 metres seen by ``camera`` at ``T_world_cam``."""
        W, H = camera.width, camera.height
        u, v = np.meshgrid(np.arange(W, dtype=np.float64), np.arange(H, dtype=np.float64))
        pix = np.stack([u.ravel(), v.ravel(), np.ones(W * H)], 0)
        d_cam = np.linalg.solve(camera.K, pix)  # z = 1: the ray parameter is the z-depth
        R, o = T_world_cam[:3, :3], T_world_cam[:3, 3]
        d = (R @ d_cam).T  # [N, 3] world directions
        n = d.shape[0]
        with np.errstate(divide="ignore", invalid="ignore"):
            inv = 1.0 / d
            # Room interior: exit through the far plane on each axis.
            far = np.where(d > 0, self.size, 0.0)
            t_ax = (far - o) * inv
            t_ax[~np.isfinite(t_ax) | (t_ax <= 0)] = np.inf
            axis = np.argmin(t_ax, 1)
            t_best = t_ax[np.arange(n), axis]
            surf = 2 * axis + (d[np.arange(n), axis] > 0)
            for b, (lo, hi) in enumerate(self.boxes):
                t1 = (lo - o) * inv
                t2 = (hi - o) * inv
                tmin = np.where(np.isnan(t1), -np.inf, np.minimum(t1, t2))
                tmax = np.where(np.isnan(t2), np.inf, np.maximum(t1, t2))
                near_ax = np.argmax(tmin, 1)
                t_near = tmin[np.arange(n), near_ax]
                t_far = tmax.min(1)
                hit = (t_near <= t_far) & (t_near > 1e-6) & (t_near < t_best)
                t_best = np.where(hit, t_near, t_best)
                # Entering through the low plane means the ray travels +axis: face side 0.
                side = d[np.arange(n), near_ax] < 0
                surf = np.where(hit, 6 + 6 * b + 2 * near_ax + side, surf)
        p = o + d * t_best[:, None]
        rgb = np.zeros((n, 3), np.float32)
        # Texel footprint of one pixel: depth / focal (metres), in mip levels.
        foot = t_best / float(np.sqrt(camera.K[0, 0] * camera.K[1, 1]))
        level = np.clip(np.floor(np.log2(np.maximum(foot / self.config.texel_m, 1.0)) + 0.5), 0, 5).astype(int)
        for sid in np.unique(surf):
            s = self.surfaces[int(sid)]
            m = surf == sid
            uu = (p[m, s.uv_axes[0]] - s.origin[0]) / self.config.texel_m
            vv = (p[m, s.uv_axes[1]] - s.origin[1]) / self.config.texel_m
            lv = np.minimum(level[m], len(s.mips) - 1)
            col = np.zeros((int(m.sum()), 3), np.float32)
            for L in np.unique(lv):
                k = lv == L
                col[k] = _bilinear(s.mips[int(L)], uu[k] / 2.0 ** L, vv[k] / 2.0 ** L)
            rgb[m] = col * s.shade
        image = np.clip(rgb, 0, 255).reshape(H, W, 3).astype(np.uint8)
        depth = t_best.reshape(H, W).astype(np.float32)
        return image, depth


def _bilinear(tex: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Sample tex [h, w, 3] at texel coordinates (x, y) [N] (texel centres at integers)."""
    h, w = tex.shape[:2]
    x = np.clip(x - 0.5, 0, w - 1.001)
    y = np.clip(y - 0.5, 0, h - 1.001)
    x0, y0 = x.astype(int), y.astype(int)
    ax, ay = (x - x0)[:, None], (y - y0)[:, None]
    return ((1 - ax) * (1 - ay) * tex[y0, x0] + ax * (1 - ay) * tex[y0, x0 + 1]
            + (1 - ax) * ay * tex[y0 + 1, x0] + ax * ay * tex[y0 + 1, x0 + 1])


# ---------------------------------------------------------------------- trajectories


def look_pose(position: Sequence[float], yaw: float, pitch: float, roll: float = 0.0) -> np.ndarray:
    """T_world_cam [4, 4] of an optical camera at ``position`` (metres, z-up world).

    yaw: heading of the optical axis about world z (radians, 0 = +x), pitch: positive looks
    down, roll: about the optical axis.
    """
    # Optical axes for yaw = pitch = roll = 0: z forward = +x, x right = -y, y down = -z.
    R0 = np.array([[0.0, 0.0, 1.0], [-1.0, 0.0, 0.0], [0.0, -1.0, 0.0]])
    cz, sz = np.cos(yaw), np.sin(yaw)
    Rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1.0]])
    cp, sp = np.cos(pitch), np.sin(pitch)
    Ry = np.array([[cp, 0, sp], [0, 1.0, 0], [-sp, 0, cp]])  # about body y (left): +pitch looks down
    cr, sr = np.cos(roll), np.sin(roll)
    Rx = np.array([[1.0, 0, 0], [0, cr, -sr], [0, sr, cr]])
    return make_T(Rz @ Ry @ Rx @ R0, np.asarray(position, dtype=np.float64))


def demo_camera(width: int = 640, height: int = 480, f: float = 525.0) -> Camera:
    """The demo's pinhole camera (no distortion), principal point at the image centre."""
    K = np.array([[f, 0, (width - 1) / 2.0], [0, f, (height - 1) / 2.0], [0, 0, 1.0]])
    return Camera(K, width, height)


def orbit_poses(room: ProceduralRoom, n: int, radius_scale: float = 1.0, phase: float = 0.0,
                seed: int = 0, jitter: float = 0.0) -> np.ndarray:
    """[n, 4, 4] T_world_cam on an ellipse around the room centre, looking outwards at the walls.

    radius_scale scales the ellipse (1.0: 1.3 m x 1.0 m semi-axes); phase (radians) shifts
    the start; jitter (0..1) adds seeded random offsets of up to 0.15 m and 15 deg.
    """
    rng = np.random.default_rng(seed)
    c = room.size / 2.0
    out = []
    for i in range(n):
        a = phase + 2 * np.pi * i / n
        pos = np.array([c[0] + 1.3 * radius_scale * np.cos(a), c[1] + 1.0 * radius_scale * np.sin(a),
                        1.3 + 0.15 * np.sin(3 * a)])
        yaw = a + 0.35 * np.sin(2 * a)
        pitch = np.radians(12.0) + 0.1 * np.cos(a)
        roll = 0.0
        if jitter > 0:
            pos = pos + rng.uniform(-0.15, 0.15, 3) * jitter
            yaw += np.radians(rng.uniform(-15, 15)) * jitter
            pitch += np.radians(rng.uniform(-8, 8)) * jitter
            roll += np.radians(rng.uniform(-5, 5)) * jitter
        out.append(look_pose(pos, yaw, pitch, roll))
    return np.stack(out)


def render_frames(room: ProceduralRoom, poses: np.ndarray, camera: Camera, prefix: str) -> List[PosedFrame]:
    """PosedFrames (image, exact depth registered to the image, pose) for each pose [N, 4, 4]."""
    frames = []
    for i, T in enumerate(poses):
        img, depth = room.render(T, camera)
        frames.append(PosedFrame(name=f"{prefix}{i:04d}", image=img, T_world_cam=T.copy(), camera=camera,
                                 depth=depth, depth_camera=camera, T_cam_depth=np.eye(4)))
    return frames
