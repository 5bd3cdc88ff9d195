"""Bounding the worker threads of the numeric libraries reloc_ros runs on.

OpenCV (SIFT, image ops), FAISS (OpenMP: matching, retrieval), BLAS (numpy GEMMs in
matching and averaging; OpenBLAS copies ship inside the numpy, scipy, faiss and opencv
wheels) and PyTorch (learned estimators) each start one thread per core by default.
On a robot's onboard computer the localizer shares those cores with drivers, the
controller and SLAM, so an unbounded query can starve them; ``limit_threads`` caps all
of them at once, in-process.

What each setting reaches:

- OpenCV: ``cv2.setNumThreads``, process-wide.
- FAISS: ``faiss.omp_set_num_threads`` sets the OpenMP limit *of the calling thread* (and
  of the OpenMP teams it starts): threads created later with ``threading`` start from the
  process default again (``OMP_NUM_THREADS`` as read at library load). Call
  ``limit_threads`` in the thread that runs the localizer (e.g. the node's worker thread),
  or set ``OMP_NUM_THREADS`` before the process starts.
- PyTorch: ``torch.set_num_threads``, process-wide, only when torch is already imported
  (importing it here would cost ~1 s and hundreds of MB for nodes that never use it);
  a torch imported later reads the environment variables below.
- BLAS: through threadpoolctl when it is installed (any BLAS: OpenBLAS, MKL, BLIS);
  otherwise every OpenBLAS already loaded in the process is found in ``/proc/self/maps``
  (Linux) and set through its ``openblas_set_num_threads`` entry point. Other BLAS
  libraries already loaded are not reached without threadpoolctl.
- ``OMP_NUM_THREADS``, ``OPENBLAS_NUM_THREADS``, ``MKL_NUM_THREADS`` are set in
  ``os.environ``: they only affect libraries loaded after the call and child processes
  (libraries read them once, at load time).
"""
from __future__ import annotations

import ctypes
import logging
import os
import sys
from typing import Callable, Dict, List, Tuple

log = logging.getLogger("reloc_ros.threads")

THREAD_ENV_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")

# Entry points of the OpenBLAS builds found in wheels: plain, 64-bit-integer (ILP64)
# suffixed, and numpy/scipy's prefixed "scipy_openblas" builds.
_OPENBLAS_SET = ("openblas_set_num_threads", "openblas_set_num_threads64_",
                 "scipy_openblas_set_num_threads64_", "scipy_openblas_set_num_threads")
_OPENBLAS_GET = ("openblas_get_num_threads", "openblas_get_num_threads64_",
                 "scipy_openblas_get_num_threads64_", "scipy_openblas_get_num_threads")


def default_threads() -> int:
    """Threads the localizer should use by default: ``min(4, os.cpu_count())``.

    An onboard computer shares its cores with the rest of the robot's stack (drivers,
    state estimation, planning), which must not be starved by a relocalization query;
    beyond 4 threads a 640x480 query gains little (SIFT extraction and PnP are partly
    serial) while the latency of everything else on the machine suffers.
    """
    return max(1, min(4, os.cpu_count() or 1))


def _openblas_libraries() -> List[Tuple[str, Callable[[int], None], Callable[[], int]]]:
    """(file name, set, get) for every OpenBLAS loaded in this process (Linux; else [])."""
    try:
        with open("/proc/self/maps") as f:
            paths = {line.split(None, 5)[5].strip() for line in f if len(line.split(None, 5)) == 6}
    except OSError:
        return []
    out = []
    for path in sorted(p for p in paths if "openblas" in os.path.basename(p).lower() and ".so" in p):
        try:
            # RTLD_NOLOAD: only take a handle on the copy already mapped, never load one.
            lib = ctypes.CDLL(path, mode=os.RTLD_NOLOAD | os.RTLD_LOCAL)
        except OSError:
            continue
        setter = next((getattr(lib, s) for s in _OPENBLAS_SET if hasattr(lib, s)), None)
        getter = next((getattr(lib, s) for s in _OPENBLAS_GET if hasattr(lib, s)), None)
        if setter is None or getter is None:
            continue
        setter.argtypes, setter.restype = [ctypes.c_int], None
        getter.argtypes, getter.restype = [], ctypes.c_int
        out.append((os.path.basename(path), setter, getter))
    return out


def limit_threads(n: int) -> Dict[str, int]:
    """Cap OpenCV, FAISS (calling thread), PyTorch (if imported) and BLAS at ``n`` threads.

    n: threads per library (>= 1); see ``default_threads``. Also sets ``THREAD_ENV_VARS``
    in ``os.environ`` for libraries loaded later and child processes. Read the module
    docstring for what each setting reaches (FAISS's OpenMP limit is per thread).
    Returns what was set, e.g. ``{"opencv": 2, "faiss_openmp": 2, "torch": 2,
    "blas:libscipy_openblas64_-....so": 2, "env:OMP_NUM_THREADS": 2}``.
    Raises ValueError for n <= 0.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
        raise ValueError(f"thread count must be a positive integer, got {n!r}")
    done: Dict[str, int] = {}
    import cv2
    import faiss

    cv2.setNumThreads(n)
    done["opencv"] = n
    faiss.omp_set_num_threads(n)
    done["faiss_openmp"] = n
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(n)
        done["torch"] = n
    try:
        import threadpoolctl
    except ImportError:
        threadpoolctl = None
    if threadpoolctl is not None:
        # Called (not used as a context manager), threadpool_limits leaves the limits set.
        threadpoolctl.threadpool_limits(limits=n, user_api="blas")
        for info in threadpoolctl.threadpool_info():
            if info.get("user_api") == "blas":
                done[f"blas:{os.path.basename(info['filepath'])}"] = n
    else:
        libs = _openblas_libraries()
        for name, setter, _ in libs:
            setter(n)
            done[f"blas:{name}"] = n
        if not libs:
            log.info("limit_threads: no OpenBLAS found loaded and threadpoolctl is not installed; "
                     "BLAS is bounded only through the environment variables")
    for var in THREAD_ENV_VARS:
        os.environ[var] = str(n)
        done[f"env:{var}"] = n
    log.info("limited threads to %d: %s", n, ", ".join(done))
    return done


def thread_limits() -> Dict[str, int]:
    """Current limits, keyed as ``limit_threads`` returns them (FAISS: the calling thread's)."""
    import cv2
    import faiss

    out = {"opencv": int(cv2.getNumThreads()), "faiss_openmp": int(faiss.omp_get_max_threads())}
    torch = sys.modules.get("torch")
    if torch is not None:
        out["torch"] = int(torch.get_num_threads())
    for name, _, getter in _openblas_libraries():
        out[f"blas:{name}"] = int(getter())
    return out
