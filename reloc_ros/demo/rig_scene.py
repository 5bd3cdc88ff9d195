"""A multi-camera rig driving through the demo room (reloc_ros.demo.scene), exact ground truth.

Body frame ``base_link`` (REP-103): x forward, y left, z up, on the body's path at
``RigSceneConfig.body_height``. The default rig has four cameras (front, left, right,
back) whose optical axes are 90 deg apart: with the demo camera's 63 deg horizontal field
of view no two of them overlap. Each camera's extrinsic ``T_base_cam`` maps its OpenCV
optical frame to the body; images are rendered at ``T_world_base @ T_base_cam``, so the
body pose of every capture is exact.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import numpy as np

from reloc_ros.demo.scene import ProceduralRoom, demo_camera, look_pose
from reloc_ros.geometry import make_T
from reloc_ros.rig import CameraView, Rig, RigCamera, RigFrame
from reloc_ros.types import Camera


@dataclass(frozen=True)
class RigSceneConfig:
    """The rig and its path.

    cameras: (name, yaw about body z in degrees, mount position (x, y, z) in the body
        frame in metres); every camera is pitched down by ``pitch_deg``.
    width, height, focal: the pinhole camera of every rig camera (pixels).
    body_height: height of base_link above the floor (metres).
    radius_scale: the path is the demo orbit ellipse (1.3 m x 1.0 m semi-axes) times this.
    """

    cameras: Tuple[Tuple[str, float, Tuple[float, float, float]], ...] = (
        ("front", 0.0, (0.25, 0.0, 0.35)),
        ("left", 90.0, (0.0, 0.15, 0.35)),
        ("right", -90.0, (0.0, -0.15, 0.35)),
        ("back", 180.0, (-0.25, 0.0, 0.35)),
    )
    pitch_deg: float = 10.0
    width: int = 640
    height: int = 480
    focal: float = 525.0
    body_height: float = 0.95
    radius_scale: float = 1.0


def demo_rig(config: RigSceneConfig = RigSceneConfig(), camera: Optional[Camera] = None) -> Rig:
    """The rig of ``config`` (validated)."""
    cam = camera or demo_camera(config.width, config.height, config.focal)
    rig = Rig([RigCamera(name, cam, look_pose(pos, np.radians(yaw), np.radians(config.pitch_deg)))
               for name, yaw, pos in config.cameras])
    rig.validate()
    return rig


def rig_path(room: ProceduralRoom, n: int, config: RigSceneConfig = RigSceneConfig(), phase: float = 0.0,
             seed: int = 0, jitter: float = 0.0) -> np.ndarray:
    """[n, 4, 4] T_world_base along the demo ellipse, heading along the path (counter-clockwise).

    phase (radians) shifts the start; jitter (0..1) adds seeded offsets of up to 0.15 m,
    15 deg of heading and 3 deg of roll/pitch (a robot on uneven ground).
    """
    rng = np.random.default_rng(seed)
    c = room.size / 2.0
    a_x, a_y = 1.3 * config.radius_scale, 1.0 * config.radius_scale
    out = []
    for i in range(n):
        a = phase + 2 * np.pi * i / n
        pos = np.array([c[0] + a_x * np.cos(a), c[1] + a_y * np.sin(a), config.body_height])
        heading = np.arctan2(a_y * np.cos(a), -a_x * np.sin(a))  # tangent of the ellipse
        roll = pitch = 0.0
        if jitter > 0:
            pos[:2] += rng.uniform(-0.15, 0.15, 2) * jitter
            heading += np.radians(rng.uniform(-15, 15)) * jitter
            roll, pitch = np.radians(rng.uniform(-3, 3, 2)) * jitter
        cz, sz = np.cos(heading), np.sin(heading)
        cp, sp = np.cos(pitch), np.sin(pitch)
        cr, sr = np.cos(roll), np.sin(roll)
        R = (np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1.0]]) @ np.array([[cp, 0, sp], [0, 1.0, 0], [-sp, 0, cp]])
             @ np.array([[1.0, 0, 0], [0, cr, -sr], [0, sr, cr]]))
        out.append(make_T(R, pos))
    return np.stack(out)


def render_rig_frames(room: ProceduralRoom, rig: Rig, poses: np.ndarray, prefix: str,
                      depth: bool = True) -> List[RigFrame]:
    """Map-building frames: every camera at every body pose [N, 4, 4], as RigFrames named
    ``{prefix}{i:04d}_{camera}`` with camera_id, T_world_base and (optionally) exact depth."""
    frames = []
    for i, T_wb in enumerate(poses):
        for rc in rig.cameras:
            T = T_wb @ rc.T_base_cam
            img, z = room.render(T, rc.camera)
            frames.append(RigFrame(name=f"{prefix}{i:04d}_{rc.name}", image=img, T_world_cam=T, camera=rc.camera,
                                   depth=z if depth else None, depth_camera=rc.camera if depth else None,
                                   T_cam_depth=np.eye(4) if depth else None, camera_id=rc.name,
                                   T_world_base=T_wb.copy()))
    return frames


def render_capture(room: ProceduralRoom, rig: Rig, T_world_base: np.ndarray,
                   names: Optional[Sequence[str]] = None) -> List[CameraView]:
    """One capture: the images of ``names`` (default: all cameras) at body pose T_world_base [4, 4]."""
    views = []
    for rc in rig.cameras:
        if names is not None and rc.name not in names:
            continue
        img, _ = room.render(T_world_base @ rc.T_base_cam, rc.camera)
        views.append(CameraView(rc.name, img, rc.camera, rc.T_base_cam))
    return views


def textureless(image: np.ndarray) -> np.ndarray:
    """The view of a texture-less surface (a blank wall, the sky) in place of ``image``: a
    smooth vertical shading of its mean colour, no features."""
    h, w = image.shape[:2]
    mean = image.reshape(-1, image.shape[2] if image.ndim == 3 else 1).mean(axis=0)
    ramp = np.linspace(0.85, 1.1, h)[:, None, None]
    out = np.clip(ramp * mean[None, None, :], 0, 255) * np.ones((1, w, 1))
    out = out.astype(np.uint8)
    return out if image.ndim == 3 else out[:, :, 0]
