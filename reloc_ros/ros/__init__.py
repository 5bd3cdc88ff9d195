"""ROS 2 adapter of the localization core: node, message conversions, TF buffer, parameters.

Only ``node`` (and ``tf_buffer.TfListener``) import rclpy; ``conversions``, ``params``
and ``frames`` stay importable without a ROS install so their logic is unit-testable.
"""
