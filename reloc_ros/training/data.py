"""Training samples for ``reloc-train``: a query plus K keyframes that overlap it.

Frames come from a :class:`FrameSet` (images at network size, intrinsics, camera-to-world
poses and a covisibility matrix), built either from procedural rooms
(``reloc_ros.demo.scene``, rendered once into a disk cache) or from any dataset reader
(``reloc_ros.datasets.open_dataset``).

Covisibility ``overlap[i, j]``: the fraction of frame i's sampled pixels whose 3D point
(from depth, else from an assumed depth) projects inside frame j, in front of it, and,
when j has depth, not occluded there. Keyframe candidates of a query: frames with
``min_overlap <= overlap <= max_overlap`` and a centre at least ``min_baseline_m`` away.

Samples are a pure function of (seed, step, position in the global batch), so any
number of processes, and a resumed run, draw exactly the same data.

Conventions: images uint8 [H, W, 3] RGB in storage, float [3, H, W] in [0, 1] in
batches; poses T_world_cam [4, 4] camera-to-world, OpenCV axes, metres; intrinsics
[3, 3] pixels of the network-size image.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch

from reloc_ros.models.reloc_vggt import encode_known_poses
from reloc_ros.training.config import AugmentSection, DataSection, DatasetSection, RenderSection

log = logging.getLogger("reloc_ros.training.data")

__all__ = ["FrameSet", "overlap_matrix", "render_room_frames", "render_frame_sets", "dataset_frame_set",
           "SampleSpec", "Sampler", "Batch", "collate", "augment_images"]

_RENDER_VERSION = "room-v1"


@dataclass
class FrameSet:
    """Posed frames of one scene.

    images: [N, H, W, 3] uint8. K: [N, 3, 3] pixel intrinsics. T_world_cam: [N, 4, 4].
    overlap: [N, N] float32 covisibility (row = the frame whose pixels are tested).
    name: scene identifier.
    """

    name: str
    images: np.ndarray
    K: np.ndarray
    T_world_cam: np.ndarray
    overlap: np.ndarray

    def __len__(self) -> int:
        return len(self.images)

    @property
    def hw(self) -> Tuple[int, int]:
        return int(self.images.shape[1]), int(self.images.shape[2])


# ----------------------------------------------------------------------------- covisibility


def overlap_matrix(K: np.ndarray, T_world_cam: np.ndarray, hw: Tuple[int, int], depth: Optional[np.ndarray] = None,
                   assumed_depth_m: float = 2.5, grid: Tuple[int, int] = (12, 9), depth_tol: float = 0.05
                   ) -> np.ndarray:
    """Covisibility [N, N]: fraction of frame i's grid pixels seen by frame j.

    K [N, 3, 3], T_world_cam [N, 4, 4], hw = (H, W); depth [N, H, W] metres (z-depth,
    <= 0 or non-finite = invalid) or None (every pixel at ``assumed_depth_m``).
    With depth, a point counts only when j's depth at its projection agrees within
    ``depth_tol`` (relative), i.e. it is not occluded in j.
    """
    N = len(K)
    H, W = hw
    gx, gy = grid
    u = (np.arange(gx) + 0.5) * W / gx - 0.5
    v = (np.arange(gy) + 0.5) * H / gy - 0.5
    uu, vv = np.meshgrid(u, v)
    pix = np.stack([uu.ravel(), vv.ravel(), np.ones(uu.size)], 0)  # [3, G]
    ui = np.clip(np.round(uu.ravel()).astype(int), 0, W - 1)
    vi = np.clip(np.round(vv.ravel()).astype(int), 0, H - 1)
    out = np.zeros((N, N), np.float32)
    T_cam_world = np.linalg.inv(T_world_cam)
    for i in range(N):
        rays = np.linalg.solve(K[i], pix)  # z = 1
        z = np.full(pix.shape[1], assumed_depth_m) if depth is None else depth[i][vi, ui].astype(np.float64)
        valid = np.isfinite(z) & (z > 0)
        if not valid.any():
            continue
        pc = rays[:, valid] * z[valid]
        pw = T_world_cam[i, :3, :3] @ pc + T_world_cam[i, :3, 3:4]  # [3, G']
        pj = np.einsum("nab,bg->nag", T_cam_world[:, :3, :3], pw) + T_cam_world[:, :3, 3:4]  # [N, 3, G']
        zj = pj[:, 2]
        with np.errstate(divide="ignore", invalid="ignore"):
            proj = np.einsum("nab,nbg->nag", K, pj)
            x = proj[:, 0] / proj[:, 2]
            y = proj[:, 1] / proj[:, 2]
        ok = (zj > 1e-3) & (x >= -0.5) & (x <= W - 0.5) & (y >= -0.5) & (y <= H - 0.5)
        if depth is not None:
            xi = np.clip(np.round(np.nan_to_num(x)).astype(int), 0, W - 1)
            yi = np.clip(np.round(np.nan_to_num(y)).astype(int), 0, H - 1)
            dj = depth[np.arange(N)[:, None], yi, xi]
            ok &= np.isfinite(dj) & (dj > 0) & (np.abs(dj - zj) <= depth_tol * zj)
        out[i] = ok.sum(1) / float(pix.shape[1])
    return out


# ----------------------------------------------------------------------------- rendered rooms


def _room_config(rs: RenderSection, seed: int):
    """A random RoomConfig (size, boxes against the walls) for ``seed``."""
    from reloc_ros.demo.scene import RoomConfig

    rng = np.random.default_rng([rs.seed, seed, 1])
    size = tuple(float(rng.uniform(lo, hi)) for lo, hi in zip(rs.room_size_min, rs.room_size_max))
    boxes = []
    for _ in range(int(rng.integers(rs.boxes_range[0], rs.boxes_range[1] + 1))):
        w, d, h = rng.uniform(0.4, 1.0), rng.uniform(0.4, 1.0), rng.uniform(0.4, 1.8)
        side = int(rng.integers(0, 4))  # against one of the four walls, so the centre stays free
        if side < 2:
            x0 = 0.1 if side == 0 else size[0] - 0.1 - w
            y0 = rng.uniform(0.1, size[1] - 0.1 - d)
        else:
            y0 = 0.1 if side == 2 else size[1] - 0.1 - d
            x0 = rng.uniform(0.1, size[0] - 0.1 - w)
        boxes.append(((float(x0), float(y0), 0.0), (float(x0 + w), float(y0 + d), float(min(h, size[2] - 0.3)))))
    return RoomConfig(size=size, boxes=tuple(boxes), texel_m=rs.texel_m, seed=int(rng.integers(0, 2**31 - 1)))


def _room_path(room, rs: RenderSection, rng: np.random.Generator) -> np.ndarray:
    """[n, 4, 4] camera poses on a smooth random loop through the room's free space.

    Loops around the centre on an ellipse with random radii, wobble, height and a
    heading offset that varies slowly (cameras look outwards, sideways and inwards), so
    revisits of a place see it from other viewpoints."""
    from reloc_ros.demo.scene import look_pose

    n = rs.frames_per_room
    c = room.size / 2.0
    for attempt in range(50):
        shrink = 1.0 - attempt / 60.0
        ax = rng.uniform(0.2, 0.34) * room.size[0] * shrink
        ay = rng.uniform(0.2, 0.34) * room.size[1] * shrink
        perim = math.pi * (3 * (ax + ay) - math.sqrt((3 * ax + ay) * (ax + 3 * ay)))
        loops = max(1.0, n * rs.step_m / perim)
        a = rng.uniform(0, 2 * np.pi) + np.linspace(0, 2 * np.pi * loops, n, endpoint=False)
        ph = rng.uniform(0, 2 * np.pi, 6)
        wob = 0.12 * np.sin(3 * a / loops + ph[0])
        pos = np.stack([c[0] + (ax + wob) * np.cos(a), c[1] + (ay + wob) * np.sin(a),
                        np.clip(1.35 + 0.25 * np.sin(a / loops + ph[1]) + 0.1 * np.sin(5 * a / loops + ph[2]),
                                0.6, room.size[2] - 0.5)], 1)
        if all(room.inside_free_space(p, 0.35) for p in pos):
            break
    else:
        raise RuntimeError(f"no free camera path in room {room.config}")
    heading = a + np.pi / 2  # direction of travel (counter-clockwise)
    offset = np.radians(rng.uniform(-100, -20)) + np.radians(60) * np.sin(a / loops + ph[3])  # mostly outward
    pitch = np.radians(8.0) + np.radians(12.0) * np.sin(2 * a / loops + ph[4])
    roll = np.radians(3.0) * np.sin(3 * a / loops + ph[5])
    return np.stack([look_pose(p, y, pt, r) for p, y, pt, r in zip(pos, heading + offset, pitch, roll)])


def render_room_frames(rs: RenderSection, split: str, index: int) -> FrameSet:
    """Render room ``index`` of ``split`` ('train' | 'eval'): path, images, overlap."""
    from reloc_ros.demo.scene import ProceduralRoom, demo_camera

    seed = index if split == "train" else 100000 + index
    room = ProceduralRoom(_room_config(rs, seed))
    rng = np.random.default_rng([rs.seed, seed, 2])
    poses = _room_path(room, rs, rng)
    W, H = rs.image_width, rs.image_height
    cam = demo_camera(W, H, float(rng.uniform(*rs.focal_range)) * W)
    imgs, depths = [], []
    for T in poses:
        img, d = room.render(T, cam)
        imgs.append(img)
        depths.append(d)
    K = np.repeat(cam.K[None], len(poses), 0)
    ov = overlap_matrix(K, poses, (H, W), np.stack(depths))
    return FrameSet(f"{split}-room{index:04d}", np.stack(imgs), K, poses, ov)


def _render_key(rs: RenderSection) -> str:
    d = asdict(rs)
    d.pop("cache_dir")
    d.pop("train_rooms")
    d.pop("eval_rooms")
    d["version"] = _RENDER_VERSION
    return hashlib.sha1(json.dumps(d, sort_keys=True).encode()).hexdigest()[:12]


def _save_npz(path: Path, fs: FrameSet) -> None:
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, images=fs.images, K=fs.K, T_world_cam=fs.T_world_cam, overlap=fs.overlap)
    tmp.replace(path)


def _load_npz(path: Path, name: str) -> FrameSet:
    with np.load(path, allow_pickle=False) as z:
        return FrameSet(name, z["images"], z["K"], z["T_world_cam"], z["overlap"])


def render_frame_sets(rs: RenderSection, split: str, cache_dir: Path, render: bool = True,
                      progress: bool = False) -> List[FrameSet]:
    """All rooms of a split, rendered into ``cache_dir/<config hash>/`` on first use.

    render=False only loads (raises FileNotFoundError for a missing room): processes other
    than rank 0 wait for rank 0 to render, then load.
    """
    n = rs.train_rooms if split == "train" else rs.eval_rooms
    folder = Path(cache_dir) / _render_key(rs)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "render.json").write_text(json.dumps(asdict(rs), indent=1, sort_keys=True)) if render else None
    out = []
    for i in range(n):
        path = folder / f"{split}_{i:04d}.npz"
        name = f"{split}-room{i:04d}"
        if path.is_file():
            out.append(_load_npz(path, name))
            continue
        if not render:
            raise FileNotFoundError(f"rendered room {path} missing")
        fs = render_room_frames(rs, split, i)
        _save_npz(path, fs)
        out.append(fs)
        if progress:
            log.info("rendered %s (%d frames) -> %s", name, len(fs), path)
    return out


# ----------------------------------------------------------------------------- dataset readers


def dataset_frame_set(ds_cfg: DatasetSection, frames: Optional[str], name: str) -> FrameSet:
    """Frames of a dataset reader prepared to the network size (centre crop + resize,
    intrinsics following), with covisibility from registered depth when available."""
    import cv2

    from reloc_ros.datasets import open_dataset
    from reloc_ros.estimators.vggt_fused import _crop_box, prepare_image

    ds = open_dataset(ds_cfg.format, ds_cfg.src, frames, use_depth=ds_cfg.use_depth, **ds_cfg.options)
    n = len(ds)
    if n < 3:
        raise ValueError(f"dataset {ds_cfg.format}:{ds_cfg.src} frames {frames!r} has {n} frames; need >= 3")
    idx = np.unique(np.linspace(0, n - 1, min(n, ds_cfg.max_frames)).round().astype(int))
    hw = (ds_cfg.image_height, ds_cfg.image_width)
    imgs, Ks, Ts, depths = [], [], [], []
    have_depth = ds_cfg.use_depth
    for i in idx:
        f = ds[int(i)]
        arr, K = prepare_image(f.image, f.camera, hw)
        imgs.append(np.round(arr.transpose(1, 2, 0) * 255).astype(np.uint8))
        Ks.append(K)
        Ts.append(np.asarray(f.T_world_cam, np.float64))
        d = f.depth
        registered = (d is not None and (f.T_cam_depth is None or np.allclose(f.T_cam_depth, np.eye(4)))
                      and d.shape[:2] == f.image.shape[:2])
        if have_depth and registered:
            x0, y0, cw, ch = _crop_box(d.shape[0], d.shape[1], hw)
            depths.append(cv2.resize(d[y0:y0 + ch, x0:x0 + cw].astype(np.float32), (hw[1], hw[0]),
                                     interpolation=cv2.INTER_NEAREST))
        else:
            have_depth = False
    ds.close()
    K = np.stack(Ks)
    T = np.stack(Ts)
    ov = overlap_matrix(K, T, hw, np.stack(depths) if have_depth else None, ds_cfg.assumed_depth_m)
    return FrameSet(name, np.stack(imgs), K, T, ov)


# ----------------------------------------------------------------------------- sampling


@dataclass(frozen=True)
class SampleSpec:
    """One training sample: frame set index, query frame, keyframes (reference first)."""

    scene: int
    query: int
    keyframes: Tuple[int, ...]


class Sampler:
    """Deterministic query + K-keyframe samples over a list of frame sets.

    ``spec(step, slot)``: the sample at position ``slot`` of the global batch of
    ``step`` (a pure function of seed, step and slot). Keyframes are K distinct
    candidates of the query (see the module docstring) drawn at random; the one with
    the highest covisibility is the reference (frame 0), as a retrieval ranking would
    put it first.
    """

    def __init__(self, sets: Sequence[FrameSet], cfg: DataSection, seed: int) -> None:
        self.sets = list(sets)
        self.K = cfg.num_keyframes
        self.seed = int(seed)
        self.candidates: List[List[np.ndarray]] = []
        self.valid: List[Tuple[int, int]] = []
        for s, fs in enumerate(self.sets):
            cands = []
            C = fs.T_world_cam[:, :3, 3]
            for q in range(len(fs)):
                ov = fs.overlap[q]
                base = np.linalg.norm(C - C[q], axis=1)
                ok = (ov >= cfg.min_overlap) & (ov <= cfg.max_overlap) & (base >= cfg.min_baseline_m)
                ok[q] = False
                c = np.flatnonzero(ok)
                cands.append(c)
                if len(c) >= self.K:
                    self.valid.append((s, q))
            self.candidates.append(cands)
        if not self.valid:
            raise ValueError(f"no query has {self.K} keyframe candidates (overlap in [{cfg.min_overlap}, "
                             f"{cfg.max_overlap}], baseline >= {cfg.min_baseline_m} m): render more frames per "
                             "room, a denser path, or relax the overlap bounds")

    def __len__(self) -> int:
        return len(self.valid)

    def spec(self, step: int, slot: int) -> SampleSpec:
        rng = np.random.default_rng([self.seed, int(step), int(slot)])
        s, q = self.valid[int(rng.integers(len(self.valid)))]
        return self._draw(s, q, rng)

    def _draw(self, s: int, q: int, rng: np.random.Generator) -> SampleSpec:
        c = self.candidates[s][q]
        pick = rng.choice(c, self.K, replace=False)
        pick = pick[np.argsort(-self.sets[s].overlap[q, pick], kind="stable")]
        return SampleSpec(s, q, tuple(int(i) for i in pick))

    def fixed_specs(self, n: int, seed: int) -> List[SampleSpec]:
        """``n`` samples spread evenly over the valid queries (evaluation sets)."""
        rng = np.random.default_rng([seed, 7])
        idx = np.unique(np.linspace(0, len(self.valid) - 1, min(n, len(self.valid))).round().astype(int))
        return [self._draw(*self.valid[i], rng) for i in idx]


# ----------------------------------------------------------------------------- batches


def augment_images(imgs: np.ndarray, aug: AugmentSection, rng: np.random.Generator) -> np.ndarray:
    """Photometric augmentation of float images [S, H, W, 3] in [0, 1] (one draw per frame)."""
    S = imgs.shape[0]
    out = imgs.astype(np.float32, copy=True)
    if aug.saturation > 0:
        grey = out.mean(-1, keepdims=True)
        s = 1 + rng.uniform(-aug.saturation, aug.saturation, (S, 1, 1, 1))
        out = grey + (out - grey) * s
    if aug.contrast > 0:
        m = out.mean((1, 2, 3), keepdims=True)
        out = m + (out - m) * (1 + rng.uniform(-aug.contrast, aug.contrast, (S, 1, 1, 1)))
    if aug.brightness > 0:
        out = out * (1 + rng.uniform(-aug.brightness, aug.brightness, (S, 1, 1, 1)))
    if aug.gain > 0:
        out = out * (1 + rng.uniform(-aug.gain, aug.gain, (S, 1, 1, 3)))
    if aug.noise > 0:
        out = out + rng.normal(0, aug.noise, out.shape)
    return np.clip(out, 0.0, 1.0).astype(np.float32)


@dataclass
class Batch:
    """Collated samples (B = number of samples).

    query [B, 3, H, W], keyframes [B, K, 3, H, W] in [0, 1]; kf_pose_enc [B, K, 9] (the
    pose tokenizer's input); gt_enc [B, K+1, 9] ground-truth encodings of keyframes then
    query (camera-from-reference, translation / scale); scale [B] metres per unit;
    T_world_kf [B, K, 4, 4] and T_world_query [B, 4, 4] (numpy, float64) for decoding.
    """

    query: torch.Tensor
    keyframes: torch.Tensor
    kf_pose_enc: torch.Tensor
    gt_enc: torch.Tensor
    scale: np.ndarray
    T_world_kf: np.ndarray
    T_world_query: np.ndarray
    specs: List[SampleSpec]

    def to(self, device, dtype=torch.float32) -> "Batch":
        return Batch(self.query.to(device, dtype), self.keyframes.to(device, dtype), self.kf_pose_enc.to(device, dtype),
                     self.gt_enc.to(device, dtype), self.scale, self.T_world_kf, self.T_world_query, self.specs)


def collate(sets: Sequence[FrameSet], specs: Sequence[SampleSpec], aug: Optional[AugmentSection] = None,
            seeds: Optional[Sequence[Sequence[int]]] = None) -> Batch:
    """Tensors of samples; ``aug`` (with per-sample ``seeds``) augments images and
    shuffles the non-reference keyframes."""
    qs, kfs, encs, gts, scales, Tk, Tq = [], [], [], [], [], [], []
    for n, sp in enumerate(specs):
        fs = sets[sp.scene]
        kf = list(sp.keyframes)
        rng = np.random.default_rng(list(seeds[n])) if (aug is not None and seeds is not None) else None
        if rng is not None and aug.shuffle_keyframes and len(kf) > 2:
            rest = kf[1:]
            rng.shuffle(rest)
            kf = kf[:1] + rest
        frames = kf + [sp.query]
        imgs = fs.images[frames].astype(np.float32) / 255.0
        if rng is not None:
            imgs = augment_images(imgs, aug, rng)
        imgs = torch.from_numpy(np.ascontiguousarray(imgs.transpose(0, 3, 1, 2)))
        T = fs.T_world_cam[frames]
        enc_kf, scale = encode_known_poses(T[:-1], fs.K[kf], fs.hw)
        gt, _ = encode_known_poses(T, fs.K[frames], fs.hw, scale=scale)
        qs.append(imgs[-1])
        kfs.append(imgs[:-1])
        encs.append(torch.from_numpy(enc_kf))
        gts.append(torch.from_numpy(gt))
        scales.append(scale)
        Tk.append(T[:-1])
        Tq.append(T[-1])
    return Batch(torch.stack(qs), torch.stack(kfs), torch.stack(encs), torch.stack(gts), np.asarray(scales),
                 np.stack(Tk), np.stack(Tq), list(specs))
