"""Launch the managed (lifecycle) reloc node: ros2 launch reloc_ros reloc_lifecycle.launch.py map:=/path/to/map.

Same arguments as reloc.launch.py (it is included with managed:=true), plus ``autostart``
(default false): without it the node waits unconfigured for a lifecycle manager
(nav2_lifecycle_manager) or ``ros2 lifecycle set /reloc_node configure`` / ``activate``.
configure loads and checks the map and the estimator, activate starts the subscriptions,
~/pose and /tf, deactivate stops /tf at once, cleanup frees the map.
"""
import os

from ament_index_python.packages import get_package_share_directory
from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, IncludeLaunchDescription
from launch.launch_description_sources import PythonLaunchDescriptionSource
from launch.substitutions import LaunchConfiguration


def generate_launch_description():
    share = get_package_share_directory("reloc_ros")
    return LaunchDescription([
        DeclareLaunchArgument("autostart", default_value="false",
                              description="Configure and activate the node at start instead of waiting for a "
                                          "lifecycle manager."),
        IncludeLaunchDescription(
            PythonLaunchDescriptionSource(os.path.join(share, "launch", "reloc.launch.py")),
            launch_arguments={"managed": "true", "autostart": LaunchConfiguration("autostart")}.items()),
    ])
