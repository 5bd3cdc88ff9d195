"""``make demo``: a procedurally textured room rendered with exact poses, map build, and the
ROS 2 node fed over DDS from a separate replay process."""
