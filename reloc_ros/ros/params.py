"""The node's ROS parameters as one typed dataclass, declared and validated once at start.

``NodeParams`` holds every parameter with its default; ``PARAM_DOCS`` describes each one
(the same text goes into the ROS ParameterDescriptor and ``config/reloc.yaml``).
``NodeParams.from_dict`` is the single validation point and raises ValueError with the
parameter name in the message. Times are seconds, rates Hz.
"""
from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, fields
from typing import Any, Dict, Mapping, Tuple

import yaml

TF_MODES = ("map_to_odom", "map_to_base", "none")
PROCESSING_MODES = ("continuous", "trigger")
IMAGE_TRANSPORTS = ("raw", "compressed")
IMAGE_QOS = ("sensor_data", "reliable", "best_effort", "system_default")


@dataclass(frozen=True)
class NodeParams:
    """Configuration of ``reloc_node`` (see PARAM_DOCS for each field)."""

    map_path: str = ""
    estimator: str = "geometric"
    estimator_options: str = "{}"
    localizer_options: str = "{}"
    top_k: int = 5  # = LocalizerConfig.top_k (test_ros_params checks they agree)
    image_transport: str = "raw"
    image_qos: str = "sensor_data"
    image_qos_depth: int = 5
    map_frame: str = "map"
    odom_frame: str = "odom"
    base_frame: str = "base_link"
    camera_frame: str = ""
    tf_mode: str = "map_to_odom"
    transform_tolerance: float = 0.2
    tf_publish_rate: float = 20.0
    tf_timeout: float = 0.3
    camera_info_timeout: float = 1.0
    processing_mode: str = "continuous"
    max_rate: float = 2.0
    min_confidence: float = 0.0
    fuse_degenerate: bool = False
    tracker_options: str = "{}"
    use_prior: bool = True
    hint_topic: str = "~/localize_near"
    hint_timeout: float = 10.0
    hint_min_position_std: float = 0.25
    hint_min_rotation_std_deg: float = 5.0
    num_threads: int = 0
    max_image_pixels: int = 50_000_000
    amcl_seeding: bool = False
    initialpose_topic: str = "/initialpose"
    publish_markers: bool = False
    diagnostics_period: float = 1.0
    input_timeout: float = 5.0
    cameras: Tuple[str, ...] = ()
    camera_transports: Tuple[str, ...] = ()
    rig_sync_window: float = 0.03
    rig_timeout: float = 0.1
    rig_options: str = "{}"

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "NodeParams":
        """Build and validate from a name -> value mapping; unknown names raise ValueError."""
        names = {f.name: f for f in fields(cls)}
        unknown = sorted(set(d) - set(names))
        if unknown:
            raise ValueError(f"unknown parameter(s): {', '.join(unknown)}")
        kw: Dict[str, Any] = {}
        for name, value in d.items():
            kind = type(getattr(cls(), name))
            kw[name] = _coerce(name, value, kind)
        p = cls(**kw)
        p.validate()
        return p

    def validate(self) -> None:
        """Raise ValueError naming the first parameter whose value is unusable."""
        _choice("image_transport", self.image_transport, IMAGE_TRANSPORTS)
        _choice("image_qos", self.image_qos, IMAGE_QOS)
        _choice("tf_mode", self.tf_mode, TF_MODES)
        _choice("processing_mode", self.processing_mode, PROCESSING_MODES)
        if not self.estimator.strip():
            raise ValueError("estimator must name an estimator (e.g. 'geometric')")
        if self.top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {self.top_k}")
        if self.image_qos_depth < 1:
            raise ValueError(f"image_qos_depth must be >= 1, got {self.image_qos_depth}")
        for name in ("transform_tolerance", "tf_publish_rate", "tf_timeout", "camera_info_timeout", "max_rate",
                     "input_timeout"):
            v = getattr(self, name)
            if not math.isfinite(v) or v < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {v}")
        if not (math.isfinite(self.diagnostics_period) and self.diagnostics_period > 0):
            raise ValueError(f"diagnostics_period must be > 0 s, got {self.diagnostics_period}")
        if not 0.0 <= self.min_confidence <= 1.0:
            raise ValueError(f"min_confidence must be in [0, 1], got {self.min_confidence}")
        for name in ("hint_timeout", "hint_min_position_std", "hint_min_rotation_std_deg"):
            v = getattr(self, name)
            if not math.isfinite(v) or v < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {v}")
        if self.num_threads < 0:
            raise ValueError(f"num_threads must be >= 0 (0: automatic), got {self.num_threads}")
        if self.max_image_pixels < 1:
            raise ValueError(f"max_image_pixels must be >= 1, got {self.max_image_pixels}")
        if self.amcl_seeding and self.hint_topic.strip() and self.hint_topic.strip() == self.initialpose_topic.strip():
            raise ValueError("hint_topic must differ from initialpose_topic when amcl_seeding publishes on it")
        for name in ("map_frame", "odom_frame"):
            if not getattr(self, name).strip("/ "):
                raise ValueError(f"{name} must not be empty")
        if self.tf_mode == "map_to_base" and not self.base_frame.strip("/ "):
            raise ValueError("tf_mode 'map_to_base' needs base_frame")
        if self.tf_mode == "map_to_odom" and not self.base_frame.strip("/ "):
            raise ValueError("tf_mode 'map_to_odom' needs base_frame (map->odom is map->base composed with odom->base)")
        if self.amcl_seeding and self.tf_mode != "none":
            raise ValueError("amcl_seeding needs tf_mode 'none': AMCL publishes map->odom itself and two "
                             "publishers of one transform fight")
        if self.amcl_seeding and not self.initialpose_topic.strip():
            raise ValueError("amcl_seeding needs initialpose_topic")
        self._validate_rig()
        self.estimator_options_dict()
        self.localizer_options_dict()
        self.tracker_config()

    def _validate_rig(self) -> None:
        names = list(self.cameras)
        for n in names:
            if not _CAMERA_NAME.match(n):
                raise ValueError(f"cameras: {n!r} is not a camera namespace (letters, digits, '_', "
                                 f"'/'-separated, e.g. 'front' or 'rig/front')")
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"cameras must be unique, repeated: {dup}")
        if self.camera_transports:
            if len(self.camera_transports) != len(names):
                raise ValueError(f"camera_transports must be empty or name one transport per camera "
                                 f"({len(names)} cameras, {len(self.camera_transports)} transports)")
            for t in self.camera_transports:
                _choice("camera_transports", t, IMAGE_TRANSPORTS)
        for name in ("rig_sync_window", "rig_timeout"):
            v = getattr(self, name)
            if not math.isfinite(v) or v < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {v}")
        if self.rig_sync_window <= 0:
            raise ValueError(f"rig_sync_window must be > 0 s, got {self.rig_sync_window}")
        if names:
            if not self.base_frame.strip("/ "):
                raise ValueError("cameras needs base_frame: the rig pose is the body's, each camera's "
                                 "extrinsic is the TF base_frame <- its image frame_id")
            if self.camera_frame.strip():
                raise ValueError("camera_frame must be empty with cameras: each camera's frame is its "
                                 "image header's frame_id")
        if names or _mapping("rig_options", self.rig_options):
            self.rig_config()

    def rig_config(self):
        """``rig_options`` -> a validated reloc_ros.rig.RigConfig."""
        from reloc_ros.config import from_dict
        from reloc_ros.rig import RigConfig

        cfg = from_dict(RigConfig, _mapping("rig_options", self.rig_options), "rig_options")
        cfg.validate()
        return cfg

    def camera_transport(self, i: int) -> str:
        """Transport of camera i (``camera_transports[i]``, else ``image_transport``)."""
        return self.camera_transports[i] if self.camera_transports else self.image_transport

    def estimator_options_dict(self) -> Dict[str, Any]:
        """``estimator_options`` parsed (YAML/JSON mapping) -> dict; ValueError if not a mapping."""
        return _mapping("estimator_options", self.estimator_options)

    def localizer_options_dict(self) -> Dict[str, Any]:
        """``localizer_options`` parsed -> dict of extra LocalizerConfig fields."""
        d = _mapping("localizer_options", self.localizer_options)
        clash = {"estimator", "estimator_options", "top_k"} & set(d)
        if clash:
            raise ValueError(f"localizer_options must not set {sorted(clash)}: they are node parameters")
        return d

    def tracker_config(self):
        """``tracker_options`` + ``min_confidence`` + ``fuse_degenerate`` -> a validated TrackerConfig."""
        from reloc_ros.config import from_dict
        from reloc_ros.tracking import TrackerConfig

        d = _mapping("tracker_options", self.tracker_options)
        clash = {"min_confidence", "fuse_degenerate"} & set(d)
        if clash:
            raise ValueError(f"tracker_options must not set {sorted(clash)}: they are node parameters")
        d.update(min_confidence=self.min_confidence, fuse_degenerate=self.fuse_degenerate)
        return from_dict(TrackerConfig, d, "tracker_options")

    def localizer_config_dict(self) -> Dict[str, Any]:
        """The mapping handed to ``LocalizerConfig.from_dict``."""
        d = dict(self.localizer_options_dict())
        d.update(estimator=self.estimator, estimator_options=self.estimator_options_dict(), top_k=self.top_k)
        return d

    def replace(self, **changes: Any) -> "NodeParams":
        """A validated copy with some fields changed."""
        p = dataclasses.replace(self, **changes)
        p.validate()
        return p


PARAM_DOCS: Dict[str, str] = {
    "map_path": "Keyframe map directory built with reloc-map. Empty or unusable: the node starts, reports "
                "ERROR on /diagnostics and localizes after ~/reload_map loads a good map. Read again by "
                "~/reload_map, so it can be changed at run time.",
    "estimator": "Pose estimator of the core library: geometric (CPU: SIFT, PnP or essential matrices), "
                 "reloc3r, vggt-fused.",
    "estimator_options": "Estimator options as a YAML/JSON mapping string, e.g. "
                         "\"{mode: pnp, pnp_max_reproj_px: 4.0}\".",
    "localizer_options": "Extra LocalizerConfig fields as a YAML/JSON mapping string (not estimator/top_k).",
    "top_k": "Number of keyframes retrieved per query.",
    "image_transport": "raw (sensor_msgs/Image on 'image') or compressed (CompressedImage on 'image/compressed').",
    "image_qos": "QoS of the image and camera_info subscriptions: sensor_data (best effort, depth "
                 "image_qos_depth; receives from reliable and best-effort publishers), reliable, best_effort, "
                 "system_default.",
    "image_qos_depth": "History depth of the image subscriptions (only the newest frame is processed anyway).",
    "map_frame": "Fixed frame of the map; header frame of ~/pose and parent of the published TF.",
    "odom_frame": "Odometry frame (REP-105); child of the published map->odom.",
    "base_frame": "Robot body frame. ~/pose is this frame's pose (camera pose composed with the "
                  "base_frame->camera TF). Empty: ~/pose is the camera's pose and no body TF is needed.",
    "camera_frame": "Camera optical frame; empty uses the image header's frame_id.",
    "tf_mode": "map_to_odom (REP-105, default: from the fused state through odom->base), map_to_base "
               "(robots without odometry: the fused state runs with a constant-position prior), none.",
    "transform_tolerance": "Seconds the published TF is post-dated, so consumers can use it until the next "
                           "broadcast without extrapolation errors.",
    "tf_publish_rate": "Hz at which the last map->odom (or map->base) is re-broadcast between fixes "
                       "(0: only on fixes).",
    "tf_timeout": "Seconds the worker waits for odom->base and base->camera at the image stamp.",
    "camera_info_timeout": "Seconds the worker waits for a first CameraInfo before failing a frame. Once "
                           "CameraInfo comes paired with images (same stamp), a frame waits at most 0.1 s "
                           "for its pair, then the latest CameraInfo is used.",
    "processing_mode": "continuous (localize the newest frame, at most max_rate Hz) or trigger (only after "
                       "~/trigger).",
    "max_rate": "Continuous mode: maximum localization rate in Hz of image-stamp time (0: as fast as possible).",
    "min_confidence": "Fixes with a lower confidence (0..1) never enter the fused state (they still go to "
                      "~/pose_raw).",
    "fuse_degenerate": "Let DEGENERATE fixes (a pose whose covariance shows a weak direction, or one from a "
                       "small image patch) enter the fused state. Off: they only go to ~/pose_raw.",
    "tracker_options": "Options of the temporal fusion (reloc_ros.tracking.TrackerConfig) as a YAML/JSON "
                       "mapping string, e.g. \"{gate_quantile: 0.999, window: 10, odom_translation_drift: "
                       "0.02}\".",
    "use_prior": "While tracking (or given a hint), retrieve keyframes near the predicted pose first, "
                 "falling back to global retrieval.",
    "hint_topic": "PoseWithCovarianceStamped hint 'the robot is near here' (pose of base_frame in the header "
                  "frame, transformed through TF): narrows retrieval for hint_timeout s and counts as one "
                  "piece of initialisation evidence. Empty: not subscribed.",
    "hint_timeout": "Seconds a hint keeps narrowing retrieval.",
    "hint_min_position_std": "Floor (m) of a hint's position std per axis (RViz sends zeros for z).",
    "hint_min_rotation_std_deg": "Floor (deg) of a hint's rotation std per axis (RViz sends zeros for roll "
                                 "and pitch).",
    "num_threads": "Threads for OpenCV, FAISS, BLAS and torch (0: min(4, CPU count), leaving cores to the "
                   "rest of an onboard stack).",
    "max_image_pixels": "Largest image (width x height) decoded; larger or decompression-bomb images are "
                        "refused from their header, before decoding.",
    "amcl_seeding": "Also publish the pose of the first fix after start, ~/enable, ~/reload_map and each "
                    "~/trigger on initialpose_topic to seed AMCL (needs tf_mode none).",
    "initialpose_topic": "With amcl_seeding: where the first fused pose is published to seed AMCL. "
                         "Without: an operator's pose estimate (RViz '2D Pose Estimate') read on it resets "
                         "the fused state; the first fix that agrees with it re-initialises.",
    "publish_markers": "Publish visualization_msgs/MarkerArray on ~/markers (used keyframes, estimate).",
    "diagnostics_period": "Seconds between /diagnostics messages (also sent at once when the status changes).",
    "input_timeout": "Seconds without an image after which diagnostics warns of a stalled input (0: never).",
    "cameras": "Multi-camera rig: camera namespaces, e.g. [front, left, right]; camera <name> is read on "
               "'<name>/image' (or '<name>/image/compressed') and '<name>/camera_info', its extrinsic from "
               "the TF base_frame <- the image's frame_id at the image stamp. Frames are grouped into "
               "captures by stamp and one body pose is estimated from all cameras (reloc_ros.rig). Empty "
               "(default): one camera on 'image' and 'camera_info'.",
    "camera_transports": "Per-camera transport with cameras, raw or compressed, one per camera in the same "
                         "order. Empty: every camera uses image_transport.",
    "rig_sync_window": "Largest stamp difference (s) of two frames of one rig capture (approximate-time "
                       "grouping, as message_filters' slop); keep it under half the frame period.",
    "rig_timeout": "Seconds (arrival time) a rig capture waits for missing cameras after its first frame; "
                   "then it is localized with the cameras present.",
    "rig_options": "Rig localization options (reloc_ros.rig.RigConfig) as a YAML/JSON mapping string, e.g. "
                   "\"{extrinsic_rotation_std_deg: 0.1, extrinsic_translation_std_m: 0.002}\".",
}

# Parameters that may change at run time; the rest are read-only after start.
DYNAMIC_PARAMS = frozenset({"map_path"})


_CAMERA_NAME = re.compile(r"^/?[A-Za-z][A-Za-z0-9_]*(/[A-Za-z][A-Za-z0-9_]*)*$")


def _choice(name: str, value: str, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")


def _coerce(name: str, value: Any, kind: type) -> Any:
    if kind is bool:
        if isinstance(value, bool):
            return value
        raise ValueError(f"{name} must be a bool, got {value!r}")
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{name} must be an integer, got {value!r}")
        return int(value)
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{name} must be a number, got {value!r}")
        return float(value)
    if kind is tuple:
        # ROS declares an empty list as a byte array and reads `[]` from a params file as
        # "not set" (None); a launch argument may come as one string
        if value is None or (isinstance(value, (bytes, bytearray)) and not value):
            return ()
        if isinstance(value, str):
            value = [v for v in value.replace(",", " ").split() if v]
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            raise ValueError(f"{name} must be a list of strings, got {value!r}")
        return tuple(value)
    if not isinstance(value, str):
        raise ValueError(f"{name} must be a string, got {value!r}")
    return value


def _mapping(name: str, text: str) -> Dict[str, Any]:
    try:
        d = yaml.safe_load(text) if text.strip() else {}
    except yaml.YAMLError as e:
        raise ValueError(f"{name} is not valid YAML/JSON: {e}") from None
    if d is None:
        d = {}
    if not isinstance(d, dict):
        raise ValueError(f"{name} must be a mapping, got {type(d).__name__}: {text!r}")
    return d


def declare_params(node) -> NodeParams:
    """Declare every parameter on an rclpy node (with descriptions) and return them validated.

    Raises ValueError on a bad value; the node should refuse to start then.
    """
    declare_param_descriptors(node)
    return read_params(node)


def declare_param_descriptors(node) -> None:
    """Declare every parameter (default, description, read-only flag) without validating values."""
    from rcl_interfaces.msg import ParameterDescriptor

    defaults = NodeParams()
    for f in fields(NodeParams):
        default = getattr(defaults, f.name)
        # dynamic typing lets `-p max_rate:=2` (an integer) set a float parameter; from_dict
        # then checks every type, so nothing unchecked gets through.
        # (lists too: rclpy types an empty list as a byte array, which a string list must replace)
        desc = ParameterDescriptor(description=PARAM_DOCS[f.name], read_only=f.name not in DYNAMIC_PARAMS,
                                   dynamic_typing=isinstance(default, (float, tuple)))
        node.declare_parameter(f.name, list(default) if isinstance(default, tuple) else default, desc)


def read_params(node) -> NodeParams:
    """The node's current parameter values, validated (ValueError naming the bad one)."""
    return NodeParams.from_dict({f.name: node.get_parameter(f.name).value for f in fields(NodeParams)})


def params_from_file(path: str, node_name: str = "reloc_node") -> Dict[str, Any]:
    """The NodeParams entries of a ROS parameters YAML file for ``node_name``.

    Reads the ``/**`` wildcard block and the node's own block (the node's wins), as rcl does
    for a node without a namespace. Other entries (use_sim_time, qos_overrides) are left out.
    ValueError when the file is missing or not a parameters file.
    """
    try:
        with open(path) as f:
            doc = yaml.safe_load(f) or {}
    except OSError as e:
        raise ValueError(f"cannot read params_file {path!r}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise ValueError(f"params_file {path!r} is not valid YAML: {e}") from None
    if not isinstance(doc, dict):
        raise ValueError(f"params_file {path!r} is not a ROS parameters file (a mapping of node names)")
    names = {f.name for f in fields(NodeParams)}
    out: Dict[str, Any] = {}
    for key in ("/**", node_name, "/" + node_name):
        block = doc.get(key)
        if isinstance(block, dict) and isinstance(block.get("ros__parameters"), dict):
            out.update({k: v for k, v in block["ros__parameters"].items() if k in names})
    return out


def check_launch_params(params_file: str, overrides: Mapping[str, Any], require_map: bool = True) -> NodeParams:
    """What a launch file checks before it starts the node, so wrong arguments fail at once.

    ``params_file`` merged with ``overrides`` (launch arguments) must validate as NodeParams,
    name a known estimator, and (with ``require_map``) point map_path at a reloc-map directory
    (one with a manifest.json; its contents are checked when the node loads it). Raises
    ValueError with a message meant for the operator.
    """
    import os

    d = params_from_file(params_file)
    d.update(overrides)
    p = NodeParams.from_dict(d)
    from reloc_ros.estimators import available

    if p.estimator not in available():
        raise ValueError(f"unknown estimator {p.estimator!r}: choose one of {available()}")
    if require_map:
        if not p.map_path:
            raise ValueError("no map: pass map:=<directory built by reloc-map> (or set map_path in params_file)")
        if not os.path.isdir(p.map_path):
            raise ValueError(f"map {p.map_path!r} does not exist (pass map:=<directory built by reloc-map>)")
        if not os.path.isfile(os.path.join(p.map_path, "manifest.json")):
            raise ValueError(f"map {p.map_path!r} is not a reloc-map output directory (no manifest.json)")
    return p


def render_yaml() -> str:
    """config/reloc.yaml: every parameter with its default and its description as a comment."""
    import json
    import textwrap

    lines = [
        "# reloc_node parameters: every parameter with its default.",
        "# Use: ros2 launch reloc_ros reloc.launch.py map:=/path/to/map params_file:=this_file",
        "#  or: ros2 run reloc_ros reloc_node --ros-args --params-file config/reloc.yaml",
        "# Only map_path can change at run time (then call ~/reload_map); the rest are read at start.",
        "# Times in seconds, rates in Hz, frames as ROS frame ids. Generated by",
        "# reloc_ros.ros.params.render_yaml(); test_ros_params checks it stays in sync.",
        "reloc_node:",
        "  ros__parameters:",
    ]
    d = NodeParams()
    for f in fields(NodeParams):
        v = getattr(d, f.name)
        lines += ["    # " + line for line in textwrap.wrap(PARAM_DOCS[f.name], 92)]
        text = (("true" if v else "false") if isinstance(v, bool) else json.dumps(v) if isinstance(v, str)
                else json.dumps(list(v)) if isinstance(v, tuple) else repr(v))
        lines.append(f"    {f.name}: {text}")
    return "\n".join(lines) + "\n"
