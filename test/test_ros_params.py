"""The node's parameters: one typed dataclass, validated once, documented in config/reloc.yaml."""
from dataclasses import fields
from pathlib import Path

import pytest
import yaml

from reloc_ros.ros.params import PARAM_DOCS, NodeParams, render_yaml

REPO = Path(__file__).resolve().parents[1]


def test_defaults_are_valid_and_documented():
    p = NodeParams()
    p.validate()
    assert set(PARAM_DOCS) == {f.name for f in fields(NodeParams)}
    assert all(len(doc) > 20 for doc in PARAM_DOCS.values())


def test_shipped_yaml_lists_every_parameter_with_its_default():
    text = (REPO / "config" / "reloc.yaml").read_text()
    assert text == render_yaml(), "config/reloc.yaml is out of date: regenerate with render_yaml()"
    values = yaml.safe_load(text)["reloc_node"]["ros__parameters"]
    assert NodeParams.from_dict(values) == NodeParams()
    for name in values:  # each parameter carries a comment
        assert f"    {name}:" in text


@pytest.mark.parametrize("bad, match", [
    ({"tf_mode": "map_to_bse"}, "tf_mode must be one of"),
    ({"processing_mode": "sometimes"}, "processing_mode"),
    ({"image_transport": "theora"}, "image_transport"),
    ({"image_qos": "fast"}, "image_qos"),
    ({"max_rate": -1.0}, "max_rate"),
    ({"transform_tolerance": float("nan")}, "transform_tolerance"),
    ({"diagnostics_period": 0.0}, "diagnostics_period"),
    ({"min_confidence": 1.5}, "min_confidence"),
    ({"top_k": 0}, "top_k"),
    ({"top_k": 2.5}, "top_k must be an integer"),
    ({"publish_markers": "yes"}, "publish_markers must be a bool"),
    ({"amcl_seeding": True}, "amcl_seeding needs tf_mode 'none'"),
    ({"base_frame": ""}, "needs base_frame"),
    ({"estimator_options": "[1, 2]"}, "estimator_options must be a mapping"),
    ({"estimator_options": "{a: [1"}, "not valid YAML"),
    ({"localizer_options": "{top_k: 3}"}, "must not set"),
    ({"no_such_param": 1}, "unknown parameter"),
    ({"tracker_options": "{gate_quantile: 2}"}, "gate_quantile"),
    ({"tracker_options": "{windw: 3}"}, "unknown tracker_options option"),
    ({"tracker_options": "{min_confidence: 0.5}"}, "node parameters"),
    ({"num_threads": -1}, "num_threads"),
    ({"max_image_pixels": 0}, "max_image_pixels"),
    ({"hint_timeout": -1.0}, "hint_timeout"),
    ({"publish_degenerate": True}, "unknown parameter"),  # replaced by fuse_degenerate
    ({"cameras": ["front", "front"]}, "cameras must be unique"),
    ({"cameras": ["front", "2nd"]}, "not a camera namespace"),
    ({"cameras": ["front", 3]}, "cameras must be a list of strings"),
    ({"cameras": ["front", "left"], "camera_transports": ["raw"]}, "one transport per camera"),
    ({"cameras": ["front"], "camera_transports": ["theora"]}, "camera_transports must be one of"),
    ({"cameras": ["front"], "camera_frame": "cam"}, "camera_frame must be empty with cameras"),
    ({"cameras": ["front"], "tf_mode": "none", "base_frame": ""}, "cameras needs base_frame"),
    ({"rig_sync_window": 0.0}, "rig_sync_window must be > 0"),
    ({"rig_timeout": -0.1}, "rig_timeout"),
    ({"rig_options": "{min_spread_angle_deg: 200}"}, "min_spread_angle_deg"),
    ({"cameras": ["front"], "rig_options": "{metod: auto}"}, "unknown rig_options option"),
])
def test_bad_values_are_refused_with_the_parameter_named(bad, match):
    with pytest.raises(ValueError, match=match):
        NodeParams.from_dict(bad)


def test_integers_are_accepted_for_float_parameters():
    p = NodeParams.from_dict({"max_rate": 3, "transform_tolerance": 0})
    assert p.max_rate == 3.0 and isinstance(p.max_rate, float)


def test_localizer_config_mapping():
    p = NodeParams.from_dict({"estimator": "geometric", "estimator_options": '{"mode": "pnp"}', "top_k": 7,
                              "localizer_options": "{fusion: robust}"})
    assert p.localizer_config_dict() == {"fusion": "robust", "estimator": "geometric",
                                         "estimator_options": {"mode": "pnp"}, "top_k": 7}


def test_consistent_modes_are_accepted():
    p = NodeParams.from_dict({"amcl_seeding": True, "tf_mode": "none", "base_frame": ""})
    assert p.amcl_seeding and p.tf_mode == "none"
    assert NodeParams.from_dict({"tf_mode": "map_to_base"}).tf_mode == "map_to_base"


def test_node_defaults_agree_with_the_core():
    from reloc_ros.localizer import LocalizerConfig

    assert NodeParams().top_k == LocalizerConfig().top_k
    assert NodeParams().estimator == LocalizerConfig().estimator


def test_tracker_config_comes_from_node_parameters():
    p = NodeParams.from_dict({"min_confidence": 0.3, "fuse_degenerate": True, "tracker_options": "{window: 4}"})
    cfg = p.tracker_config()
    assert (cfg.min_confidence, cfg.fuse_degenerate, cfg.window) == (0.3, True, 4)


def test_rig_parameters():
    """`cameras` comes from ROS as a string list (or, unset in a params file, None / an empty
    byte array); transports default to image_transport; rig_options become a RigConfig."""
    p = NodeParams.from_dict({"cameras": ["front", "rig/left"], "camera_transports": ["raw", "compressed"],
                              "rig_options": "{extrinsic_rotation_std_deg: 0.1}"})
    assert p.cameras == ("front", "rig/left") and p.camera_transport(1) == "compressed"
    assert p.rig_config().extrinsic_rotation_std_deg == 0.1
    q = NodeParams.from_dict({"cameras": ["a", "b"], "image_transport": "compressed"})
    assert [q.camera_transport(i) for i in range(2)] == ["compressed", "compressed"]
    for unset in (None, b"", []):
        assert NodeParams.from_dict({"cameras": unset}).cameras == ()
    assert NodeParams.from_dict({"cameras": "front, left"}).cameras == ("front", "left")  # a launch argument
