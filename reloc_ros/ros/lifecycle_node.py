"""``reloc_lifecycle_node``: reloc_node as a managed (lifecycle) node, for Nav2-style bring-up.

Same node name (``reloc_node``), parameters, topics and services as the plain node
(reloc_ros.ros.node, whose ``RelocCore`` does all the work); only when things exist differs:

- unconfigured: parameters declared, nothing else. Lifecycle services answer.
- configure: parameters validated, the map loaded and checked and the estimator built
  (``Localizer.from_map``), publishers, /diagnostics, ``~/trigger``, ``~/enable``,
  ``~/reload_map`` created. A bad parameter, an unknown estimator or an unusable map fails
  the transition (the node stays unconfigured; the reason is logged), so a lifecycle
  manager sees the failure instead of a node that is up but cannot localize.
- activate: image/camera_info/hint subscriptions, the TF re-broadcast timer and the worker
  start; ``~/pose``, ``~/pose_raw`` and ``/tf`` publish.
- deactivate: /tf stops at once (no transform held, timer destroyed, lifecycle publishers
  off), then the subscriptions and the worker stop. The map and the fused state are kept,
  so a later activate resumes tracking.
- cleanup: publishers, services and the map are freed (back to unconfigured).
- shutdown (from any state) and SIGINT/SIGTERM: everything above is torn down, exit 0.

/diagnostics is a plain publisher from configure on, so an inactive node still says why.
"""
from __future__ import annotations

import sys
import traceback

from rclpy.callback_groups import MutuallyExclusiveCallbackGroup
from rclpy.lifecycle import LifecycleNode, LifecycleState, TransitionCallbackReturn
from rclpy.lifecycle.node import LifecycleNodeMixin
from rclpy.node import Node

from reloc_ros.ros.node import OK, WARN, ConfigError, RelocCore, run_node
from reloc_ros.ros.params import declare_param_descriptors, read_params

SUCCESS, FAILURE, ERROR = (TransitionCallbackReturn.SUCCESS, TransitionCallbackReturn.FAILURE,
                           TransitionCallbackReturn.ERROR)


class RelocLifecycleNode(RelocCore, LifecycleNode):
    """The managed relocalization node; see the module docstring for the transitions."""

    def __init__(self, **node_kwargs) -> None:
        # The lifecycle services get their own callback group: a deactivate must not wait
        # behind parameter or other default-group callbacks to stop /tf.
        Node.__init__(self, "reloc_node", **node_kwargs)
        LifecycleNodeMixin.__init__(self, callback_group=MutuallyExclusiveCallbackGroup())
        # Values are read and checked in on_configure: a managed node reports a bad
        # configuration as a failed transition, not by dying.
        declare_param_descriptors(self)
        self._configured = False
        self._active = False
        self._worker = None
        self.finished = False
        self.get_logger().info("reloc_node (managed): unconfigured; waiting for configure")

    # ------------------------------------------------------------------ transitions
    def on_configure(self, state: LifecycleState) -> TransitionCallbackReturn:
        try:
            try:
                self._setup_params(read_params(self))
            except (ValueError, ConfigError) as e:
                self.get_logger().error(f"configure failed: invalid parameters: {e}")
                return FAILURE
            self._setup_state()
            self._create_outputs(self.create_lifecycle_publisher)
            ok, msg = self._load_map(self.p.map_path)  # also builds the estimator
            if not ok:
                self.get_logger().error(f"configure failed: {msg}")
                self._destroy_outputs()
                return FAILURE
            self._configured = True
            self._log_config()
            return SUCCESS
        except Exception as e:  # rclpy would turn this into a silent ERROR transition
            self.get_logger().error(f"configure failed: {type(e).__name__}: {e}\n{traceback.format_exc()}")
            return ERROR

    def on_activate(self, state: LifecycleState) -> TransitionCallbackReturn:
        try:
            ret = super().on_activate(state)  # enables the lifecycle publishers, before any input
            if ret != SUCCESS:
                return ret
            self._create_inputs()
            self._start_worker(load_map=False)
            self._active = True
            self._set_status(OK, "activated")
            return SUCCESS
        except Exception as e:
            self.get_logger().error(f"activate failed: {type(e).__name__}: {e}\n{traceback.format_exc()}")
            return ERROR

    def on_deactivate(self, state: LifecycleState) -> TransitionCallbackReturn:
        try:
            self._deactivate()
            self._set_status(WARN, "inactive (deactivated): not localizing, /tf stopped")
            return SUCCESS
        except Exception as e:
            self.get_logger().error(f"deactivate failed: {type(e).__name__}: {e}\n{traceback.format_exc()}")
            return ERROR

    def on_cleanup(self, state: LifecycleState) -> TransitionCallbackReturn:
        try:
            self._cleanup()
            return SUCCESS
        except Exception as e:
            self.get_logger().error(f"cleanup failed: {type(e).__name__}: {e}\n{traceback.format_exc()}")
            return ERROR

    def on_shutdown(self, state: LifecycleState) -> TransitionCallbackReturn:
        try:
            self.shutdown()
            self.finished = True  # run_node ends the process (exit 0) once the transition completes
            return SUCCESS
        except Exception as e:
            self.get_logger().error(f"shutdown failed: {type(e).__name__}: {e}\n{traceback.format_exc()}")
            return ERROR

    def on_error(self, state: LifecycleState) -> TransitionCallbackReturn:
        # Tear down whatever a failed transition left; SUCCESS returns the node to unconfigured.
        try:
            self.shutdown()
            return SUCCESS
        except Exception:
            return FAILURE

    # ------------------------------------------------------------------ helpers
    def _deactivate(self) -> None:
        if not self._active:
            return
        self._active = False
        self._stop_tf()  # first: /tf must go quiet before anything slow (the worker's frame) is awaited
        LifecycleNode.on_deactivate(self, None)  # lifecycle publishers off
        RelocCore.shutdown(self)  # worker
        self._destroy_inputs()

    def _cleanup(self) -> None:
        if not self._configured:
            return
        self._configured = False
        self._destroy_outputs()
        with self._map_lock, self._swap_lock:
            with self._lock:
                self._localizer = None  # frees the map (with the rig localizer sharing it)
                self._rig_loc = None
                self._map_path_loaded = ""
                self._map_error = "cleaned up"
            with self._track_lock:
                self._tracker.reset()

    def shutdown(self) -> None:
        """Deactivate and clean up from whatever state the node is in (idempotent)."""
        self._deactivate()
        self._cleanup()


def main(args=None) -> int:
    """Console script ``reloc_lifecycle_node``: run until SIGINT/SIGTERM (or a shutdown transition)."""
    return run_node(RelocLifecycleNode, args)


if __name__ == "__main__":
    sys.exit(main())
