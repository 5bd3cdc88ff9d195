"""limit_threads: real OpenCV / FAISS / OpenBLAS thread limits, restored afterwards."""
import os
import sys
import threading

import cv2
import faiss
import numpy as np
import pytest

from reloc_ros import threads
from reloc_ros.threads import THREAD_ENV_VARS, default_threads, limit_threads, thread_limits


@pytest.fixture
def restore_threads():
    """Put every limit (and the environment variables) back as they were."""
    before = thread_limits()
    env = {k: os.environ.get(k) for k in THREAD_ENV_VARS}
    yield before
    cv2.setNumThreads(before["opencv"])
    faiss.omp_set_num_threads(before["faiss_openmp"])
    if "torch" in before:
        sys.modules["torch"].set_num_threads(before["torch"])
    for name, setter, _ in threads._openblas_libraries():
        if f"blas:{name}" in before:
            setter(before[f"blas:{name}"])
    for k, v in env.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    assert thread_limits() == before


def test_limit_threads_caps_opencv_faiss_and_blas(restore_threads):
    np.ones((64, 64)) @ np.ones((64, 64))  # numpy's OpenBLAS is loaded
    done = limit_threads(1)
    assert cv2.getNumThreads() == 1
    assert faiss.omp_get_max_threads() == 1
    now = thread_limits()
    blas = [k for k in now if k.startswith("blas:")]
    assert blas, "numpy's OpenBLAS should be found in /proc/self/maps"
    assert all(now[k] == 1 for k in blas)
    assert set(blas) <= set(done)
    assert done["opencv"] == done["faiss_openmp"] == 1
    assert all(os.environ[k] == "1" for k in THREAD_ENV_VARS)
    if "torch" in sys.modules:
        assert sys.modules["torch"].get_num_threads() == 1 and done["torch"] == 1
    else:
        assert "torch" not in done and "torch" not in sys.modules  # not imported just for this


def test_faiss_limit_is_per_thread_so_the_worker_calls_it(restore_threads):
    if os.cpu_count() == 1:
        pytest.skip("one core: every OpenMP default is already 1")
    seen = {}
    probe = threading.Thread(target=lambda: seen.update(default=faiss.omp_get_max_threads()))
    probe.start()
    probe.join()
    default = seen["default"]  # what any new thread starts from

    def worker():
        seen["before"] = faiss.omp_get_max_threads()
        limit_threads(1)
        seen["after"] = faiss.omp_get_max_threads()

    limit_threads(2 if default != 2 else 3)  # in the main thread
    th = threading.Thread(target=worker)
    th.start()
    th.join()
    # A new thread starts from the process default, whatever the main thread set ...
    assert seen["before"] == default
    # ... and limit_threads in that thread bounds it; OpenCV's setting is process-wide.
    assert seen["after"] == 1 and cv2.getNumThreads() == 1


@pytest.mark.parametrize("bad", [0, -2, 1.5, True, "2"])
def test_bad_thread_counts_are_refused(bad):
    with pytest.raises(ValueError, match="positive integer"):
        limit_threads(bad)


def test_default_threads_is_at_most_four():
    assert default_threads() == min(4, os.cpu_count() or 1)
