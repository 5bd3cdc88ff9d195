"""Replay multi-camera rig captures to ``reloc_node`` (parameter ``cameras``) over DDS.

Each capture is, all with one stamp: TF ``odom -> base_link`` on ``/tf`` (the drifting
odometry of ``replay.true_map_to_odom``), then per camera a CameraInfo and an Image (or
CompressedImage) on ``<prefix><name>/camera_info`` and ``<prefix><name>/image``, with
header frame ``<name>_optical``. Each camera's mount ``base_link -> <name>_optical`` goes on
``/tf_static`` (latched), except for the cameras listed in ``no_mount`` (to show that a camera
without an extrinsic is excluded and the rest localize).

Ground truth: body poses ``T_world_base`` of ``reloc_ros.demo.rig_scene`` (rendered room,
exact), so ``T_odom_base = inv(true_map_to_odom(i)) @ T_world_base``.

``python -m reloc_ros.demo.rig_replay`` renders the captures itself (the rig and path of
rig_scene, so the node's map must be of the same room: ``make demo-rig`` /
``python -m reloc_ros.demo.run --rig`` builds it) and prints per-capture errors.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Dict, List, Mapping, Optional, Sequence, Union

import numpy as np

from reloc_ros.demo.replay import FrameOutcome, Replayer, true_map_to_odom
from reloc_ros.geometry import invert, pose_errors
from reloc_ros.rig import Rig
from reloc_ros.types import Camera


def camera_frame(name: str) -> str:
    """The optical frame id the replayer gives camera ``name``."""
    return f"{name.strip('/').replace('/', '_')}_optical"


class RigReplayer(Replayer):
    """A Replayer for a rig: one image + camera_info publisher pair per camera.

    rig: the cameras (names = the node's ``cameras``), their intrinsics and mounts.
    topic_prefix: camera n is published on ``{topic_prefix}{n}/image`` (``/image/compressed``
    when compressed) and ``{topic_prefix}{n}/camera_info``; "/" matches a node at the root
    namespace with relative camera names. no_mount: cameras whose mount is not sent.
    compressed: True (every camera) or the names of the cameras that publish CompressedImage
    (``compression``: jpeg or png) on ``.../image/compressed``; the others publish raw rgb8.
    Other arguments as ``Replayer``.
    """

    def __init__(self, rig: Rig, topic_prefix: str = "/", no_mount: Sequence[str] = (),
                 compressed: Union[bool, Sequence[str]] = False, compression: str = "jpeg",
                 image_qos: str = "reliable", **kw) -> None:
        self.rig = rig
        self.no_mount = set(no_mount)
        self.topic_prefix = topic_prefix
        self.compressed_names = set(rig.names) if compressed is True else set(compressed or ())
        self.compression = compression
        first = rig.cameras[0]
        self._image_topics = {c.name: f"{topic_prefix}{c.name}/image" + (
            "/compressed" if c.name in self.compressed_names else "") for c in rig.cameras}
        self._info_topics = {c.name: f"{topic_prefix}{c.name}/camera_info" for c in rig.cameras}
        self.pubs: Dict[str, tuple] = {}
        super().__init__(image_topic=self._image_topics[first.name], info_topic=self._info_topics[first.name],
                         compressed=first.name in self.compressed_names, image_qos=image_qos,
                         camera_frame=camera_frame(first.name), T_base_cam=first.T_base_cam, **kw)
        from sensor_msgs.msg import CameraInfo, CompressedImage, Image

        qos = self.image_pub.qos_profile
        self.pubs[first.name] = (self.image_pub, self.info_pub)
        for c in rig.cameras[1:]:
            kind = CompressedImage if c.name in self.compressed_names else Image
            self.pubs[c.name] = (self.node.create_publisher(kind, self._image_topics[c.name], qos),
                                 self.node.create_publisher(CameraInfo, self._info_topics[c.name], qos))

    def publish_mount(self) -> None:
        """Every camera's mount base_link -> <name>_optical on /tf_static (latched), but no_mount's."""
        from tf2_msgs.msg import TFMessage

        from reloc_ros.ros.conversions import matrix_to_transform_stamped

        now = self.now_ns()
        self.tf_static_pub.publish(TFMessage(transforms=[
            matrix_to_transform_stamped(c.T_base_cam, self.base_frame, camera_frame(c.name), now)
            for c in self.rig.cameras if c.name not in self.no_mount]))

    def wait_ready_rig(self, timeout: float = 60.0) -> object:
        """Wait until the node subscribes to every camera, publishes ~/pose and /diagnostics, and
        reports a CameraInfo for every camera (sent every 0.2 s until then). TimeoutError else."""
        deadline = time.monotonic() + timeout

        def matched() -> bool:
            return (all(i.get_subscription_count() > 0 and c.get_subscription_count() > 0
                        for i, c in self.pubs.values())
                    and self.node.count_publishers(self.pose_topic) > 0 and self.diag is not None)

        while not matched():
            if time.monotonic() > deadline:
                missing = [n for n, (i, c) in self.pubs.items()
                           if not (i.get_subscription_count() and c.get_subscription_count())]
                raise TimeoutError(f"reloc_node not discovered (cameras without a subscriber: {missing}, "
                                   f"diagnostics {self.diag is not None})")
            time.sleep(0.02)
        while True:
            stamp = self.now_ns()
            for c in self.rig.cameras:
                self.publish_rig_info(c.name, c.camera, stamp)
            if self.wait_for(lambda: self.diag is not None
                             and self.diag.values.get("camera_info_received") == "true", 0.2):
                break
            if time.monotonic() > deadline:
                raise TimeoutError("reloc_node never reported a CameraInfo for every camera")
        with self._cond:
            return self.diag

    def publish_rig_info(self, name: str, camera: Camera, stamp_ns: int) -> None:
        from reloc_ros.ros.conversions import camera_to_camera_info

        self.pubs[name][1].publish(camera_to_camera_info(camera, stamp_ns, camera_frame(name)))

    def rig_image_msg(self, name: str, image: np.ndarray, stamp_ns: int):
        from reloc_ros.ros.conversions import numpy_to_compressed_msg, numpy_to_image_msg

        if name in self.compressed_names:
            return numpy_to_compressed_msg(image, self.compression, stamp_ns, camera_frame(name))
        return numpy_to_image_msg(np.ascontiguousarray(image), "rgb8", stamp_ns, camera_frame(name))

    def publish_capture(self, index: int, T_world_base: np.ndarray, images: Mapping[str, np.ndarray],
                        stamp_ns: Optional[int] = None, infos: Optional[Mapping[str, Camera]] = None,
                        info_msgs: Optional[Mapping[str, object]] = None) -> int:
        """odom -> base_link, then each camera's CameraInfo and image, all stamped alike.

        images: camera name -> [H, W, 3] uint8 RGB (cameras left out send nothing).
        infos: camera name -> Camera sent instead of the rig's; info_msgs: name -> a
        CameraInfo message sent as is (restamped), e.g. an invalid one. Returns the stamp.
        """
        stamp = self.now_ns() if stamp_ns is None else stamp_ns
        self.publish_odom(invert(true_map_to_odom(index)) @ np.asarray(T_world_base, np.float64), stamp)
        for name, img in images.items():
            if info_msgs and name in info_msgs:
                m = info_msgs[name]
                from reloc_ros.ros.conversions import ns_to_stamp

                m.header.stamp = ns_to_stamp(stamp)
                self.pubs[name][1].publish(m)
            else:
                self.publish_rig_info(name, (infos or {}).get(name, self.rig[name].camera), stamp)
            self.pubs[name][0].publish(self.rig_image_msg(name, img, stamp))
        return stamp

    def run_capture(self, index: int, T_world_base: np.ndarray, images: Mapping[str, np.ndarray],
                    timeout: float = 60.0, **publish_kw) -> FrameOutcome:
        """Publish one capture and wait until the node has handled it (lockstep). Returns the
        fused pose, ~/pose_raw, the map->odom sent with the pose, and the diagnostics after it."""
        with self._cond:
            before = self.diag.handled if self.diag is not None else 0
        stamp = self.publish_capture(index, T_world_base, images, **publish_kw)
        return self.collect_outcome(FrameOutcome(index, f"capture{index}", stamp), before, timeout)


def capture_errors(out: FrameOutcome, T_world_base: np.ndarray) -> Dict[str, float]:
    """body_t_m / body_r_deg: ~/pose vs the true body pose; odom_chain_m / odom_chain_deg:
    (map->odom TF) o (true odom->base_link) vs the true body pose."""
    res: Dict[str, float] = {}
    if out.T_map_base is None:
        return res
    t, r = pose_errors(out.T_map_base, T_world_base)
    res.update(body_t_m=t, body_r_deg=r)
    if out.T_map_odom is not None:
        T_odom_base = invert(true_map_to_odom(out.index)) @ T_world_base
        t2, r2 = pose_errors(out.T_map_odom @ T_odom_base, T_world_base)
        res.update(odom_chain_m=t2, odom_chain_deg=r2)
    return res


def main(argv: Optional[List[str]] = None) -> int:
    """Render rig captures in the demo room, replay them in lockstep, print errors, write JSON."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--captures", type=int, default=12, help="captures replayed")
    ap.add_argument("--size", default="640x480", help="image size WxH (focal scales with the width)")
    ap.add_argument("--cameras", default="front,left,right,back", help="cameras of rig_scene that publish")
    ap.add_argument("--no-mount", default="", help="cameras whose base_link->camera mount is not sent")
    ap.add_argument("--node", default="/reloc_node", help="fully qualified name of the node")
    ap.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for the node per capture")
    ap.add_argument("--ready-timeout", type=float, default=120.0)
    ap.add_argument("--out", default=None, help="write per-capture results as JSON here")
    args = ap.parse_args(argv)

    from reloc_ros.demo.rig_scene import RigSceneConfig, demo_rig, render_capture, rig_path
    from reloc_ros.demo.scene import ProceduralRoom

    w, h = (int(v) for v in args.size.lower().split("x"))
    scene = RigSceneConfig(width=w, height=h, focal=525.0 * w / 640.0)
    names = [n for n in args.cameras.split(",") if n]
    full = demo_rig(scene)
    rig = Rig([full[n] for n in names])
    room = ProceduralRoom()
    poses = rig_path(room, args.captures, scene, phase=0.2, jitter=0.5, seed=3)
    rp = RigReplayer(rig, reloc_node=args.node, no_mount=[n for n in args.no_mount.split(",") if n])
    rows = []
    final = None
    try:
        diag = rp.wait_ready_rig(args.ready_timeout)
        print(f"rig_replay: node ready ({diag.message}); sending {len(poses)} captures of {names}", flush=True)
        print(f"{'capture':>8} {'status':>6} {'body err mm':>11} {'body err deg':>12} {'map->odom mm':>12} "
              f"{'latency ms':>10} {'localize ms':>11}  cameras", flush=True)
        for i, T in enumerate(poses):
            images = {v.name: v.image for v in render_capture(room, rig, T)}
            out = rp.run_capture(i, T, images, timeout=args.timeout)
            err = capture_errors(out, T)
            d = out.diagnostics
            vals = d.values if d else {}
            cams = " ".join(f"{n}:{vals.get(f'camera.{n}.state', '?')}" for n in names)
            loc_ms = float(vals.get("last_localize_ms", "nan"))
            print(f"{i:>8} {'pose' if out.T_map_base is not None else '-':>6} "
                  f"{1e3 * err.get('body_t_m', np.nan):11.2f} {err.get('body_r_deg', np.nan):12.3f} "
                  f"{1e3 * err.get('odom_chain_m', np.nan):12.2f} {out.latency_ms:10.0f} {loc_ms:11.0f}  {cams}",
                  flush=True)
            rows.append({"index": i, "published": out.T_map_base is not None, "latency_ms": out.latency_ms,
                         "localize_ms": loc_ms, **err, "message": d.message if d else "",
                         "cameras": {n: vals.get(f"camera.{n}.state", "") for n in names}})
        time.sleep(0.5)
        with rp._cond:
            final = rp.diag
    finally:
        rp.close()
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"captures": rows, "final_diagnostics": final.values if final else {}}, f, indent=1)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
