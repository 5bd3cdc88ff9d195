"""reloc_ros: visual relocalization against a prior keyframe map.

The core library (maps, retrieval, features, geometry, averaging, estimators, evaluation)
knows nothing of ROS; ``reloc_ros.ros`` is a thin adapter over it.
"""
import logging

__version__ = "0.1.0"
logger = logging.getLogger("reloc_ros")
