"""Launch reloc_node: ros2 launch reloc_ros reloc.launch.py map:=/path/to/map [image:=/cam/image_raw ...]."""
import os

from ament_index_python.packages import get_package_share_directory
from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, OpaqueFunction, SetEnvironmentVariable
from launch.conditions import IfCondition
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import Node, SetParameter


def _reloc_node(context):
    # Resolved here so that an empty map:= keeps map_path from params_file instead of blanking it.
    map_path = LaunchConfiguration("map").perform(context)
    image = LaunchConfiguration("image").perform(context)
    parameters = [LaunchConfiguration("params_file").perform(context)]
    if map_path:
        parameters.append({"map_path": map_path})
    return [Node(
        package="reloc_ros",
        executable="reloc_node",
        name="reloc_node",
        namespace=LaunchConfiguration("namespace"),
        parameters=parameters,
        remappings=[
            ("image", image),
            ("image/compressed", image + "/compressed"),
            ("camera_info", LaunchConfiguration("camera_info")),
        ],
        output="screen",
    )]


def generate_launch_description():
    share = get_package_share_directory("reloc_ros")
    return LaunchDescription([
        DeclareLaunchArgument("map", default_value="",
                              description="Keyframe map directory (reloc-map output); overrides map_path "
                                          "of params_file when given."),
        DeclareLaunchArgument("params_file", default_value=os.path.join(share, "config", "reloc.yaml"),
                              description="Node parameters (YAML with a reloc_node: ros__parameters: block)."),
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
        SetEnvironmentVariable("FASTDDS_DEFAULT_PROFILES_FILE", os.path.join(share, "config", "fastdds_shm.xml"),
                               condition=IfCondition(LaunchConfiguration("shm_profile"))),
        SetParameter(name="use_sim_time", value=LaunchConfiguration("use_sim_time")),
        OpaqueFunction(function=_reloc_node),
    ])
