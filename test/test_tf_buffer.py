"""The fallback TF buffer: tree lookups, interpolation, no extrapolation, waiting."""
import threading
import time

import numpy as np
import pytest

from reloc_ros.geometry import invert, make_T, rotation_angle_deg, so3_exp
from reloc_ros.ros.tf_buffer import TfBuffer, TfLookupError

S = 1_000_000_000  # ns per second


def _T(rx, ry, rz, x, y, z):
    return make_T(so3_exp([rx, ry, rz]), [x, y, z])


@pytest.fixture
def buf():
    b = TfBuffer(cache_time_s=10.0)
    b.set_transform("odom", "base_link", 10 * S, _T(0, 0, 0.0, 1.0, 0.0, 0.0))
    b.set_transform("odom", "base_link", 11 * S, _T(0, 0, 0.4, 2.0, 1.0, 0.0))
    b.set_transform("base_link", "camera", 0, _T(-1.2, 0.1, -1.5, 0.3, 0.0, 0.9), static=True)
    b.set_transform("map", "odom", 10 * S, _T(0, 0, 0.2, 5.0, -1.0, 0.0))
    b.set_transform("map", "odom", 12 * S, _T(0, 0, 0.2, 5.0, -1.0, 0.0))
    return b


def test_interpolates_translation_linearly_and_rotation_by_slerp(buf):
    T = buf.lookup("odom", "base_link", int(10.25 * S))
    np.testing.assert_allclose(T[:3, 3], [1.25, 0.25, 0.0], atol=1e-12)
    np.testing.assert_allclose(T[:3, :3], so3_exp([0, 0, 0.1]), atol=1e-12)


def test_exact_stamps_return_the_samples(buf):
    np.testing.assert_allclose(buf.lookup("odom", "base_link", 11 * S), _T(0, 0, 0.4, 2.0, 1.0, 0.0), atol=1e-12)


def test_chain_through_static_and_dynamic_links(buf):
    t = int(10.5 * S)
    want = buf.lookup("map", "odom", t) @ buf.lookup("odom", "base_link", t) @ _T(-1.2, 0.1, -1.5, 0.3, 0.0, 0.9)
    got = buf.lookup("map", "camera", t)
    np.testing.assert_allclose(got, want, atol=1e-12)
    np.testing.assert_allclose(buf.lookup("camera", "map", t), invert(want), atol=1e-12)


def test_lookup_between_siblings_goes_through_the_common_parent(buf):
    buf.set_transform("base_link", "lidar", 0, _T(0, 0, 1.0, 0.1, 0.2, 0.3), static=True)
    got = buf.lookup("camera", "lidar", 11 * S)
    want = invert(_T(-1.2, 0.1, -1.5, 0.3, 0.0, 0.9)) @ _T(0, 0, 1.0, 0.1, 0.2, 0.3)
    np.testing.assert_allclose(got, want, atol=1e-12)


def test_no_extrapolation(buf):
    with pytest.raises(TfLookupError, match="extrapolation into the past"):
        buf.lookup("odom", "base_link", int(11.01 * S))
    with pytest.raises(TfLookupError, match="before the oldest"):
        buf.lookup("odom", "base_link", int(9.99 * S))


def test_unknown_and_disconnected_frames(buf):
    with pytest.raises(TfLookupError, match="'nowhere' does not exist"):
        buf.lookup("map", "nowhere", 10 * S)
    buf.set_transform("world2", "island", 10 * S, np.eye(4))
    with pytest.raises(TfLookupError, match="not connected"):
        buf.lookup("map", "island", 10 * S)


def test_stamp_zero_means_latest_common_time(buf):
    # odom->base ends at 11 s, map->odom at 12 s: the latest common time is 11 s.
    want = buf.lookup("map", "odom", 11 * S) @ buf.lookup("odom", "base_link", 11 * S)
    np.testing.assert_allclose(buf.lookup("map", "base_link", 0), want, atol=1e-12)


def test_static_transforms_hold_at_any_time(buf):
    for t in (0, 1, 10**18):
        np.testing.assert_allclose(buf.lookup("base_link", "camera", t), _T(-1.2, 0.1, -1.5, 0.3, 0.0, 0.9),
                                   atol=1e-12)


def test_wait_lookup_returns_when_data_arrives(buf):
    t = int(11.5 * S)

    def later():
        time.sleep(0.15)
        buf.set_transform("odom", "base_link", 12 * S, _T(0, 0, 0.6, 3.0, 1.0, 0.0))

    th = threading.Thread(target=later)
    t0 = time.monotonic()
    th.start()
    T = buf.wait_lookup("odom", "base_link", t, timeout_s=5.0)
    waited = time.monotonic() - t0
    th.join()
    assert 0.1 < waited < 4.0
    np.testing.assert_allclose(T[:3, 3], [2.5, 1.0, 0.0], atol=1e-12)
    assert rotation_angle_deg(T[:3, :3], so3_exp([0, 0, 0.5])) < 1e-9


def test_wait_lookup_times_out_with_the_reason(buf):
    t0 = time.monotonic()
    with pytest.raises(TfLookupError, match="waited 0.200 s"):
        buf.wait_lookup("odom", "base_link", 20 * S, timeout_s=0.2)
    assert time.monotonic() - t0 < 2.0


def test_old_samples_are_pruned():
    b = TfBuffer(cache_time_s=1.0)
    for k in range(50):
        b.set_transform("odom", "base_link", k * S // 10, _T(0, 0, 0, k, 0, 0))
    assert b.can_transform("odom", "base_link", 48 * S // 10)
    assert not b.can_transform("odom", "base_link", 30 * S // 10)


def test_bad_transforms_are_refused():
    b = TfBuffer()
    with pytest.raises(ValueError):
        b.set_transform("a", "a", 0, np.eye(4))
    with pytest.raises(ValueError):
        b.set_transform("a", "b", 0, np.full((4, 4), np.nan))
    with pytest.raises(ValueError):
        TfBuffer(cache_time_s=0)


def test_reparenting_replaces_history():
    b = TfBuffer()
    b.set_transform("odom", "base_link", 1 * S, np.eye(4))
    b.set_transform("map", "base_link", 2 * S, _T(0, 0, 0, 1, 2, 3))
    assert not b.can_transform("odom", "base_link", 1 * S)
    np.testing.assert_allclose(b.lookup("map", "base_link", 2 * S)[:3, 3], [1, 2, 3])


# --------------------------------------------------------------------------- time going backwards

def test_backwards_jump_clears_the_link_and_lookups_work_at_the_new_times(caplog):
    import logging

    b = TfBuffer(cache_time_s=10.0)
    b.set_transform("base_link", "camera", 0, _T(0, 0, 0, 0.1, 0, 0), static=True)
    for k in range(100, 131):  # the first pass of a bag: 100..130 s
        b.set_transform("odom", "base_link", k * S, _T(0, 0, 0, k, 0, 0))
    assert b.jumps_back == 0
    with caplog.at_level(logging.WARNING, logger="reloc_ros.ros.tf_buffer"):
        # the bag loops: time restarts at 100 s
        b.set_transform("odom", "base_link", 100 * S, _T(0, 0, 0, -1, 0, 0))
        b.set_transform("odom", "base_link", 101 * S, _T(0, 0, 0, -2, 0, 0))
    assert b.jumps_back == 1  # once per jump, not per sample
    assert "went back in time from 130.000 s to 100.000 s" in caplog.text
    # interpolated between the new samples only (the old pass said x = 100.5 here)
    np.testing.assert_allclose(b.lookup("odom", "base_link", int(100.5 * S))[:3, 3], [-1.5, 0, 0], atol=1e-12)
    np.testing.assert_allclose(b.lookup("odom", "camera", int(100.5 * S))[:3, 3], [-1.4, 0, 0], atol=1e-12)
    assert not b.can_transform("odom", "base_link", 120 * S)  # the old pass is gone


def test_small_steps_back_are_out_of_order_samples_not_jumps():
    b = TfBuffer(cache_time_s=10.0)
    b.set_transform("map", "odom", int(10.5 * S), _T(0, 0, 0, 2, 0, 0))  # forward-dated
    b.set_transform("map", "odom", 10 * S, _T(0, 0, 0, 1, 0, 0))  # 0.5 s older: within tolerance
    assert b.jumps_back == 0
    np.testing.assert_allclose(b.lookup("map", "odom", int(10.25 * S))[:3, 3], [1.5, 0, 0], atol=1e-12)


def test_tolerance_is_capped_by_the_cache_time():
    # A 0.8 s step back with a 0.5 s cache: stored as a jump, not pruned at once, so the
    # link does not stay stuck behind its old newest sample.
    b = TfBuffer(cache_time_s=0.5, jump_back_tolerance_s=1.0)
    assert b.jump_back_tolerance_s == 0.5
    b.set_transform("odom", "base_link", 10 * S, np.eye(4))
    b.set_transform("odom", "base_link", int(9.2 * S), _T(0, 0, 0, 1, 0, 0))
    b.set_transform("odom", "base_link", int(9.3 * S), _T(0, 0, 0, 2, 0, 0))
    assert b.jumps_back == 1
    np.testing.assert_allclose(b.lookup("odom", "base_link", int(9.25 * S))[:3, 3], [1.5, 0, 0], atol=1e-12)
    with pytest.raises(ValueError, match="jump_back_tolerance_s"):
        TfBuffer(jump_back_tolerance_s=0)


def test_clear_keeps_static_links_and_the_tree(buf):
    buf.clear()
    np.testing.assert_allclose(buf.lookup("base_link", "camera", 5 * S), _T(-1.2, 0.1, -1.5, 0.3, 0.0, 0.9),
                               atol=1e-12)
    with pytest.raises(TfLookupError, match="no data for odom -> base_link"):
        buf.lookup("odom", "base_link", 10 * S)
    buf.set_transform("odom", "base_link", 1 * S, _T(0, 0, 0, 3, 0, 0))
    np.testing.assert_allclose(buf.lookup("odom", "camera", 1 * S)[:3, 3],
                               (_T(0, 0, 0, 3, 0, 0) @ _T(-1.2, 0.1, -1.5, 0.3, 0.0, 0.9))[:3, 3], atol=1e-12)


def test_listener_clears_the_buffer_when_ros_time_jumps_back():
    for mod in ("rclpy", "tf2_msgs.msg"):
        pytest.importorskip(mod, reason=f"{mod} is not installed")
    import rclpy
    from rclpy.context import Context
    from rclpy.time import Time

    from reloc_ros.demo.procs import unique_domain_id
    from reloc_ros.ros.tf_buffer import TfListener

    ctx = Context()
    rclpy.init(context=ctx, domain_id=unique_domain_id())
    node = None
    try:
        node = rclpy.create_node("tf_jump_test", context=ctx)
        b = TfBuffer()
        listener = TfListener(node, b)
        b.set_transform("jt_base", "jt_cam", 0, np.eye(4), static=True)
        b.set_transform("jt_odom", "jt_base", 100 * S, np.eye(4))
        clock = node.get_clock()
        # What rclpy's TimeSource does with use_sim_time and /clock messages:
        clock._set_ros_time_is_active(True)
        clock.set_ros_time_override(Time(seconds=100, clock_type=clock.clock_type))
        b.set_transform("jt_odom", "jt_base", 100 * S, np.eye(4))
        jumps = listener.clock_jumps
        clock.set_ros_time_override(Time(seconds=99.5, clock_type=clock.clock_type))  # within tolerance
        assert listener.clock_jumps == jumps and b.can_transform("jt_odom", "jt_base", 100 * S)
        clock.set_ros_time_override(Time(seconds=5, clock_type=clock.clock_type))  # simulator restart
        assert listener.clock_jumps == jumps + 1
        assert not b.can_transform("jt_odom", "jt_base", 100 * S)
        assert b.can_transform("jt_base", "jt_cam", 5 * S)  # static survives
        listener.close()
        b.set_transform("jt_odom", "jt_base", 5 * S, np.eye(4))
        clock.set_ros_time_override(Time(seconds=1, clock_type=clock.clock_type))
        assert b.can_transform("jt_odom", "jt_base", 5 * S)  # unregistered: no more clearing
    finally:
        if node is not None:
            node.destroy_node()
        rclpy.shutdown(context=ctx)
