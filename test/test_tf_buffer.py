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
