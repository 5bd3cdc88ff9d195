"""Launch reloc_node: ros2 launch reloc_ros reloc.launch.py map:=/path/to/map [image:=/cam/image_raw ...].

The arguments are checked before the node starts (reloc_ros.ros.params.check_launch_params):
a missing map, a directory that is not a reloc-map output, an unknown estimator or any bad
value in params_file stops the launch at once with the reason and exit code 1. A node that
exits with an error code ends the launch with exit code 1 too. ``require_map:=false`` starts
without a map (the node then reports on /diagnostics until ~/reload_map loads one).

``managed:=true`` (what reloc_lifecycle.launch.py sets) starts the managed variant
``reloc_lifecycle_node`` instead; ``autostart:=true`` then configures and activates it.
"""
import os

from ament_index_python.packages import get_package_share_directory
from launch import LaunchDescription
from launch.actions import (DeclareLaunchArgument, EmitEvent, OpaqueFunction, RegisterEventHandler,
                            SetEnvironmentVariable)
from launch.conditions import IfCondition
from launch.event_handlers import OnProcessExit
from launch.events import matches_action
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import LifecycleNode, Node, SetParameter


def _truthy(context, name):
    value = LaunchConfiguration(name).perform(context).strip().lower()
    if value not in ("true", "false", "1", "0"):
        raise RuntimeError(f"reloc.launch.py: {name}:={value!r} must be true or false")
    return value in ("true", "1")


def _fail_on_error_exit(event, context):
    # Raised inside the launch loop: `ros2 launch` logs it and exits 1 instead of 0.
    if event.returncode != 0:
        raise RuntimeError(f"reloc.launch.py: {event.action.name} exited with code {event.returncode} "
                           f"(its log above says why)")


def _reloc_node(context):
    from reloc_ros.ros.params import check_launch_params

    # Resolved here so that an empty map:= keeps map_path from params_file instead of blanking it.
    map_path = LaunchConfiguration("map").perform(context)
    estimator = LaunchConfiguration("estimator").perform(context)
    params_file = LaunchConfiguration("params_file").perform(context)
    image = LaunchConfiguration("image").perform(context)
    managed = _truthy(context, "managed")
    overrides = {}
    if map_path:
        overrides["map_path"] = os.path.abspath(os.path.expanduser(map_path))
    if estimator:
        overrides["estimator"] = estimator
    try:
        check_launch_params(params_file, overrides, require_map=_truthy(context, "require_map"))
    except ValueError as e:
        raise RuntimeError(f"reloc.launch.py: {e}") from None
    kwargs = dict(
        package="reloc_ros",
        name="reloc_node",
        namespace=LaunchConfiguration("namespace"),
        parameters=[params_file, overrides],
        remappings=[
            ("image", image),
            ("image/compressed", image + "/compressed"),
            ("camera_info", LaunchConfiguration("camera_info")),
        ],
        output="screen",
    )
    if not managed:
        node = Node(executable="reloc_node", **kwargs)
        return [node, RegisterEventHandler(OnProcessExit(target_action=node, on_exit=_fail_on_error_exit))]

    from launch_ros.event_handlers import OnStateTransition
    from launch_ros.events.lifecycle import ChangeState
    from lifecycle_msgs.msg import Transition

    node = LifecycleNode(executable="reloc_lifecycle_node", **kwargs)
    actions = [node, RegisterEventHandler(OnProcessExit(target_action=node, on_exit=_fail_on_error_exit))]
    if _truthy(context, "autostart"):
        # What a lifecycle manager does: configure, then activate once the node is inactive.
        actions += [
            RegisterEventHandler(OnStateTransition(
                target_lifecycle_node=node, goal_state="inactive",
                entities=[EmitEvent(event=ChangeState(lifecycle_node_matcher=matches_action(node),
                                                      transition_id=Transition.TRANSITION_ACTIVATE))])),
            EmitEvent(event=ChangeState(lifecycle_node_matcher=matches_action(node),
                                        transition_id=Transition.TRANSITION_CONFIGURE)),
        ]
    return actions


def generate_launch_description():
    share = get_package_share_directory("reloc_ros")
    return LaunchDescription([
        DeclareLaunchArgument("map", default_value="",
                              description="Keyframe map directory (reloc-map output); overrides map_path "
                                          "of params_file when given."),
        DeclareLaunchArgument("params_file", default_value=os.path.join(share, "config", "reloc.yaml"),
                              description="Node parameters (YAML with a reloc_node: ros__parameters: block)."),
        DeclareLaunchArgument("estimator", default_value="",
                              description="Pose estimator (geometric, reloc3r, vggt-fused); overrides the "
                                          "params_file value when given."),
        DeclareLaunchArgument("require_map", default_value="true",
                              description="Refuse to start without a usable map directory; false starts the "
                                          "node anyway (it waits for ~/reload_map)."),
        DeclareLaunchArgument("use_sim_time", default_value="false",
                              description="Use /clock (bag replay or simulation) for stamps, TF and throttling."),
        DeclareLaunchArgument("namespace", default_value="", description="Namespace of the node and its topics."),
        DeclareLaunchArgument("image", default_value="image",
                              description="Image topic to remap 'image' to; in compressed mode the node "
                                          "subscribes to <image>/compressed."),
        DeclareLaunchArgument("camera_info", default_value="camera_info",
                              description="CameraInfo topic to remap 'camera_info' to."),
        DeclareLaunchArgument("shm_profile", default_value="false",
                              description="Load config/fastdds_shm.xml (32 MB shared memory) for full-size "
                                          "best-effort images from a camera on the same host."),
        DeclareLaunchArgument("managed", default_value="false",
                              description="Start the managed (lifecycle) node reloc_lifecycle_node instead "
                                          "of the plain reloc_node."),
        DeclareLaunchArgument("autostart", default_value="false",
                              description="With managed:=true, configure and activate the node at start "
                                          "(otherwise a lifecycle manager or `ros2 lifecycle set` does)."),
        SetEnvironmentVariable("FASTDDS_DEFAULT_PROFILES_FILE", os.path.join(share, "config", "fastdds_shm.xml"),
                               condition=IfCondition(LaunchConfiguration("shm_profile"))),
        SetParameter(name="use_sim_time", value=LaunchConfiguration("use_sim_time")),
        OpaqueFunction(function=_reloc_node),
    ])
