#!/usr/bin/env python
"""Prepared GPU check (issue 11, item 3): environment, GPU-relevant tests, latency and
peak memory of full-size Reloc3r-512 and Reloc-VGGT (VGGT-1B backbone) with random
weights, against the issue's targets; JSON + Markdown report.

Run through ``bench/gpu_check.sh`` (it picks the interpreter and sets PYTHONPATH). Needs
numpy and torch; onnx + onnxruntime for the ONNX Runtime rows, tensorrt for the TensorRT
rows (each recorded as "not available" when missing). It never imports cv2, faiss,
poselib or ROS; scipy is optional.

What runs, in order of importance, within ``--budget-s`` (default 420 s; every task is
skipped, with the reason in the report, when its estimated time no longer fits):

1. the targets, bf16 eager on the GPU, K = 10: Reloc3r-512 ``cached`` (<= 25 ms), fused
   ``star`` (<= 80 ms) and ``cached`` (<= 20 ms) per query;
2. the other K (1, 5, 20), the ``dense`` mask and Reloc3r's ``reencode`` in bf16 eager;
3. the GPU-relevant tests (pytest on the backend / model test files, per-file time limit);
4. fp16 eager; 5. ``torch.compile`` (K = 10 first); 6. ONNX Runtime CUDA EP (fp16);
7. TensorRT (fp16) when importable.

Each (model, runtime, precision, variant, K) is one task with its own try/except (an OOM
or a failed compile is recorded and the rest goes on) and its own peak memory
(``torch.cuda.max_memory_allocated``, reset before each task). Tasks run in a worker
process; the parent kills it at the budget and restarts it after a crash, so one
broken CUDA context does not end the check.

Timing: one localization = what the product does per query. ``reloc3r`` ``cached``:
encode the query, decoder + head on K (keyframe, query) pairs from keyframe tokens kept
on the device (fp16, as the map cache stores them), SVD on the host; ``reencode``: the
whole network on K pairs (the authors' way). Fused model: ``RelocVGGTRunner.predict``
(inputs already on the device in the run dtype; ``cached`` with a warm keyframe cache)
then decoding + Sim(3) on the host ("network" columns: predict alone). Median and min of
``--reps`` CUDA-synchronised calls after ``--warmup`` untimed ones (the first is
reported as ``first_ms``: for ``torch.compile`` it includes compilation).

    bash bench/gpu_check.sh                          # GPU: full sizes, report in out/gpu_check/
    bash bench/gpu_check.sh --dry-run                # CPU: tiny configs, < 1 min (CI runs this)
    bash bench/gpu_check.sh --only torch-compile,onnxruntime --budget-s 300   # a second pass
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Dict, List, Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

MODELS = ("reloc3r", "reloc-vggt")
RUNTIMES = ("torch-eager", "torch-compile", "onnxruntime", "tensorrt")
# Reloc3r: 'cached' = keyframe tokens from the map cache (the estimator's path);
# 'reencode' = both images of every pair encoded again. Fused model: the masks.
VARIANTS = {"reloc3r": ("cached", "reencode"), "reloc-vggt": ("star", "cached", "dense")}
# Graph-based runtimes run the variants their runners export.
GRAPH_VARIANTS = {"reloc3r": ("cached",), "reloc-vggt": ("cached", "star", "dense")}

# The targets (H100/H200-class GPU), judged on bf16 eager PyTorch, K = 10.
TARGETS = [
    {"name": "Reloc3r-512, K=10 (cached keyframe tokens)", "model": "reloc3r", "variant": "cached", "K": 10,
     "limit_ms": 25.0},
    {"name": "fused Reloc-VGGT `star`, K=10", "model": "reloc-vggt", "variant": "star", "K": 10, "limit_ms": 80.0},
    {"name": "fused Reloc-VGGT `cached` (warm), K=10", "model": "reloc-vggt", "variant": "cached", "K": 10,
     "limit_ms": 20.0},
]
TARGET_RUNTIME, TARGET_PRECISION = "torch-eager", "bf16"


def model_specs(dry: bool) -> Dict[str, dict]:
    """Architecture config, image size (H, W) and published key list of each model."""
    from bench_reloc3r import SMALL
    from bench_vggt import CONFIGS

    if dry:  # the fixtures' compact sizes: seconds on a CPU
        return {"reloc3r": {"label": "Reloc3r (fixture sizes: enc 128x2, dec 96x2; head width 128)",
                            "config": {**SMALL, "img_size": 224, "head_width": 128}, "hw": (64, 96), "keys": None},
                "reloc-vggt": {"label": "Reloc-VGGT (compact fixture sizes: embed 64, 2 block pairs)",
                               "config": CONFIGS["compact"][0], "hw": (70, 98), "keys": None}}
    return {"reloc3r": {"label": "Reloc3r-512 (426.5 M parameters)", "config": {"img_size": 512},
                        "hw": (384, 512), "keys": "reloc3r_state_dict_keys.txt"},
            "reloc-vggt": {"label": "Reloc-VGGT on VGGT-1B (aggregator + camera head + pose tokenizer)",
                           "config": CONFIGS["full"][0], "hw": CONFIGS["full"][1],
                           "keys": "vggt1b_state_dict_keys.txt"}}


# ----------------------------------------------------------------------------- plan


def _task(model, runtime, precision, variant, K) -> dict:
    return {"id": f"{model}|{runtime}|{precision}|{variant}|K{K}", "kind": "bench", "model": model,
            "runtime": runtime, "precision": precision, "variant": variant, "K": int(K)}


def _order_ks(ks: List[int], first: int) -> List[int]:
    return ([first] if first in ks else []) + [k for k in ks if k != first]


def build_plan(args) -> List[dict]:
    """Every task, most important first (see the module docstring)."""
    ks = args.ks
    k0 = 10 if 10 in ks else ks[-1]
    eager_precisions = args.precisions
    first_prec = "bf16" if "bf16" in eager_precisions else eager_precisions[0]
    plan: List[dict] = []

    def eager(prec, targets_only=False, skip_targets=False):
        out = []
        tgt = [("reloc3r", "cached"), ("reloc-vggt", "star"), ("reloc-vggt", "cached")]
        if not skip_targets:
            out += [_task(m, "torch-eager", prec, v, k0) for m, v in tgt]
        if targets_only:
            return out
        for m, v in tgt:
            out += [_task(m, "torch-eager", prec, v, k) for k in ks if k != k0]
        out += [_task("reloc-vggt", "torch-eager", prec, "dense", k) for k in _order_ks(ks, k0)]
        out += [_task("reloc3r", "torch-eager", prec, "reencode", k) for k in _order_ks(ks, k0)]
        return out

    plan += eager(first_prec, targets_only=True)
    plan += eager(first_prec, skip_targets=True)
    plan.append({"id": "tests", "kind": "tests"})
    for prec in eager_precisions:
        if prec != first_prec:
            plan += eager(prec)
    # torch.compile: K = k0 of every variant first, then the other K
    comp_prec = [first_prec] + [p for p in eager_precisions if p != first_prec]
    for prec in comp_prec:
        for m, v in [("reloc3r", "cached"), ("reloc-vggt", "cached"), ("reloc-vggt", "star"),
                     ("reloc-vggt", "dense"), ("reloc3r", "reencode")]:
            plan.append(_task(m, "torch-compile", prec, v, k0))
    for prec in comp_prec:
        for m, v in [("reloc3r", "cached"), ("reloc-vggt", "cached"), ("reloc-vggt", "star"),
                     ("reloc-vggt", "dense"), ("reloc3r", "reencode")]:
            plan += [_task(m, "torch-compile", prec, v, k) for k in ks if k != k0]
    # graph runtimes: fp16 on CUDA (fp32 with ONNX Runtime's CPU provider in the dry run)
    graph_prec = "fp32" if args.dry_run else "fp16"
    for m in ("reloc3r", "reloc-vggt"):
        for v in GRAPH_VARIANTS[m]:
            plan += [_task(m, "onnxruntime", graph_prec, v, k) for k in _order_ks(ks, k0)]
    for m in ("reloc3r", "reloc-vggt"):
        for v in GRAPH_VARIANTS[m]:
            plan += [_task(m, "tensorrt", "fp16", v, k) for k in _order_ks(ks, k0)]
    if args.only:
        keep = set(args.only)
        rts, mods = keep & set(RUNTIMES), keep & set(MODELS)

        def kept(t: dict) -> bool:
            if t["kind"] == "tests":
                return "tests" in keep
            return bool(rts or mods) and (not rts or t["runtime"] in rts) and (not mods or t["model"] in mods)

        plan = [t for t in plan if kept(t)]
    if args.skip_tests:
        plan = [t for t in plan if t["kind"] != "tests"]
    if args.dry_run:  # compile (dynamo with the 'eager' backend): once per model exercises the patching
        plan = [t for t in plan if t.get("runtime") != "torch-compile"
                or (t["K"] == ks[0] and t["precision"] == eager_precisions[0] and t["variant"] == "cached")]
    return plan


# ----------------------------------------------------------------------------- estimates

# Seconds a task is expected to take, used to skip what no longer fits the budget. GPU:
# guesses for an H100/H200 (model builds, exports and engine builds dominate); each
# (model, runtime) estimate is replaced by what its previous task really took.
EST = {
    "gpu": {"build": {"reloc3r": 15, "reloc-vggt": 30}, "cpu_build": {"reloc3r": 20, "reloc-vggt": 60},
            "torch-eager": 4, "torch-compile": {"reloc3r": 60, "reloc-vggt": 150},
            "onnxruntime-setup": {"reloc3r": 150, "reloc-vggt": 360}, "onnxruntime": 10,
            "tensorrt-setup": {"reloc3r": 300, "reloc-vggt": 600}, "tensorrt": 5, "tests_min": 30},
    "dry": {"build": {"reloc3r": 2, "reloc-vggt": 2}, "cpu_build": {"reloc3r": 2, "reloc-vggt": 2},
            "torch-eager": 1, "torch-compile": {"reloc3r": 8, "reloc-vggt": 15},
            "onnxruntime-setup": {"reloc3r": 10, "reloc-vggt": 15}, "onnxruntime": 1,
            "tensorrt-setup": {"reloc3r": 30, "reloc-vggt": 30}, "tensorrt": 1, "tests_min": 5},
}


# ----------------------------------------------------------------------------- environment


def _run_quiet(cmd: List[str], timeout: float = 20.0) -> Optional[str]:
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        return p.stdout.strip() if p.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def collect_env() -> dict:
    """Versions and devices; every missing piece is said plainly, nothing raises."""
    env: dict = {"python": sys.version.split()[0], "executable": sys.executable, "platform": platform.platform(),
                 "cpu_count": os.cpu_count(), "hostname": platform.node()}
    try:
        import numpy

        env["numpy"] = numpy.__version__
    except ImportError as e:
        env["numpy"] = f"not importable: {e}"
    try:
        import torch

        env["torch"] = torch.__version__
        env["torch_cuda_build"] = torch.version.cuda or "none (CPU build)"
        env["cuda_available"] = bool(torch.cuda.is_available())
        if env["cuda_available"]:
            p = torch.cuda.get_device_properties(0)
            env["gpu"] = torch.cuda.get_device_name(0)
            env["gpu_count"] = torch.cuda.device_count()
            env["gpu_capability"] = f"{p.major}.{p.minor}"
            env["gpu_memory_gib"] = round(p.total_memory / 2**30, 1)
            env["cudnn"] = str(torch.backends.cudnn.version())
    except ImportError as e:
        env["torch"] = f"not importable: {e}"
        env["cuda_available"] = False
    smi = _run_quiet(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"])
    env["nvidia_smi"] = smi if smi else "nvidia-smi not found or failed"
    if smi:
        env["driver"] = smi.splitlines()[0].split(",")[1].strip()
    try:
        import onnxruntime as ort

        env["onnxruntime"] = ort.__version__
        env["onnxruntime_providers"] = list(ort.get_available_providers())
        env["onnxruntime_cuda"] = "CUDAExecutionProvider" in env["onnxruntime_providers"]
    except Exception as e:  # ImportError or a broken install
        env["onnxruntime"] = f"not available: {type(e).__name__}: {e}"
        env["onnxruntime_providers"] = []
        env["onnxruntime_cuda"] = False
    try:
        import onnx

        env["onnx"] = onnx.__version__
    except Exception as e:
        env["onnx"] = f"not available: {type(e).__name__}: {e}"
    from reloc_ros.backends.common import BackendUnavailableError
    from reloc_ros.backends.tensorrt_backend import import_tensorrt

    try:
        trt = import_tensorrt()
        env["tensorrt"] = f"{trt.__name__} {getattr(trt, '__version__', '?')}"
        env["tensorrt_available"] = True
    except BackendUnavailableError as e:
        env["tensorrt"] = str(e)
        env["tensorrt_available"] = False
    # Modules the rest of the package uses; the check imports none of them (scipy optional).
    import importlib.util

    for mod in ("scipy", "psutil", "cv2", "faiss", "poselib", "rclpy"):
        try:
            found = importlib.util.find_spec(mod) is not None
        except (ImportError, ValueError):
            found = False
        env[f"opt_{mod}"] = "installed" if found else "absent"
    return env


def print_env(env: dict) -> None:
    print("== environment", flush=True)
    for k, v in env.items():
        print(f"  {k}: {v}", flush=True)
    if not env.get("tensorrt_available"):
        print("  => TensorRT is NOT AVAILABLE here: TensorRT rows are recorded as 'not available'.", flush=True)
    if not env.get("onnxruntime_cuda"):
        print("  => ONNX Runtime has no CUDAExecutionProvider here.", flush=True)


# ----------------------------------------------------------------------------- key lists


def parse_key_list(path: Path) -> List[tuple]:
    """[(name, shape)] of a published state-dict key list ('name (d0, d1, ...)' lines)."""
    rows = []
    for line in path.read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        name, shape = line.split(" ", 1)
        rows.append((name, tuple(int(s) for s in shape.strip("() \n").split(",") if s.strip())))
    return rows


def keylist_check(model: str, net, path: Optional[Path]) -> dict:
    """Names and shapes of ``net``'s state dict against the published key list.

    reloc3r: the whole list, in order. reloc-vggt: the aggregator and camera head against
    VGGT-1B's list (its depth/point/track heads are not part of this model); the pose
    tokenizer is this project's addition and is counted separately.
    """
    own = [(k, tuple(v.shape)) for k, v in net.state_dict().items()]
    res = {"model": model, "tensors": len(own), "parameters": int(sum(p.numel() for p in net.parameters()))}
    if path is None or not path.is_file():
        res.update(status="not checked", reason=f"key list {path} not found" if path else "dry run: compact sizes")
        return res
    ref = parse_key_list(path)
    if model == "reloc-vggt":
        pre = ("aggregator.", "camera_head.")
        extra = [(k, s) for k, s in own if not k.startswith(pre)]
        res["added_by_this_project"] = {"tensors": len(extra), "prefixes": sorted({k.split(".")[0] for k, _ in extra})}
        own_d = {k: s for k, s in own if k.startswith(pre)}
        ref_d = {k: s for k, s in ref if k.startswith(pre)}
        same = own_d == ref_d
        missing = sorted(set(ref_d) - set(own_d))
        unexpected = sorted(set(own_d) - set(ref_d))
        misshaped = sorted(k for k in set(own_d) & set(ref_d) if own_d[k] != ref_d[k])
        res["compared"] = len(ref_d)
    else:
        same = own == ref
        ref_d, own_d = dict(ref), dict(own)
        missing = sorted(set(ref_d) - set(own_d))
        unexpected = sorted(set(own_d) - set(ref_d))
        misshaped = sorted(k for k in set(own_d) & set(ref_d) if own_d[k] != ref_d[k])
        res["compared"] = len(ref)
    res["key_list"] = str(path)
    res["status"] = "match" if same else "MISMATCH"
    if not same:
        res.update(missing=missing[:10], unexpected=unexpected[:10], misshaped=misshaped[:10],
                   order_differs=not (missing or unexpected or misshaped))
    return res


# ----------------------------------------------------------------------------- worker


def _emit(path: Path, rec: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(rec) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _short(e: BaseException, n: int = 400) -> str:
    msg = f"{type(e).__name__}: {e}".strip().replace("\n", " | ")
    return msg if len(msg) <= n else msg[: n - 3] + "..."


_FATAL = ("illegal memory access", "device-side assert", "CUDA error: unspecified launch failure",
          "an illegal instruction", "CUBLAS_STATUS_EXECUTION_FAILED")


@contextlib.contextmanager
def compiled_methods(targets, backend: str):
    """Replace each (object, method name) by ``torch.compile`` of the bound method for the
    block (instance attribute over the class method), and undo it afterwards.

    Compiling the methods the runners call (not the runners) keeps their Python-side
    work (keyframe cache, host transfers, SVD) as in production."""
    import torch

    cfg = torch._dynamo.config
    for name in ("cache_size_limit", "recompile_limit"):
        if hasattr(cfg, name):
            setattr(cfg, name, max(getattr(cfg, name), 64))
    patched = []
    try:
        for obj, name in targets:
            obj.__dict__[name] = torch.compile(getattr(obj, name), backend=backend, dynamic=False)
            patched.append((obj, name))
        yield
    finally:
        for obj, name in patched:
            obj.__dict__.pop(name, None)
        torch._dynamo.reset()


def _dynamo_counts() -> Dict[str, int]:
    try:
        from torch._dynamo.utils import counters

        return {"graph_breaks": int(sum(counters["graph_break"].values())),
                "graphs": int(counters["stats"].get("unique_graphs", 0))}
    except Exception:
        return {}


class Worker:
    """Runs the tasks of a plan in one process, keeping the built networks between tasks."""

    def __init__(self, args) -> None:
        import torch

        self.args = args
        self.torch = torch
        self.cuda = torch.cuda.is_available() and not args.dry_run
        self.device = "cuda" if self.cuda else "cpu"
        self.specs = model_specs(args.dry_run)
        self.est = EST["dry" if args.dry_run else "gpu"]
        self.nets: Dict[str, object] = {}
        self.cpu_nets: Dict[str, object] = {}
        self.graph_runners: Dict[tuple, object] = {}
        self.setup_done: set = set()
        self.observed: Dict[tuple, float] = {}
        self.build_s = 0.0  # seconds spent building networks so far
        self.kf_cache: Dict[tuple, tuple] = {}
        self.artifacts = Path(args.artifacts)
        self.fixtures = Path(args.shared) / "fixtures"
        self.kmax = max(args.ks)
        self.t_start = time.time()
        if args.dry_run:  # CI machines are small and shared: one thread is the most stable
            torch.set_num_threads(1)

    # -- helpers
    def log(self, msg: str) -> None:
        print(f"[{time.time() - self.t_start:6.1f} s] {msg}", flush=True)

    def _net(self, model: str, cpu: bool = False):
        store = self.cpu_nets if cpu else self.nets
        if model in store:
            return store[model]
        from reloc_ros.models.reloc3r import build_reloc3r
        from reloc_ros.models.reloc_vggt import build_reloc_vggt

        spec = self.specs[model]
        dev = "cpu" if cpu else self.device
        t0 = time.time()
        self.torch.manual_seed(0)
        if model == "reloc3r":
            net = build_reloc3r(spec["config"], device=dev)
        else:
            net = build_reloc_vggt(spec["config"], device=dev, cache_capacity=self.kmax + 1)
        dt = time.time() - t0
        self.build_s += dt
        if not cpu:
            chk = keylist_check(model, net, self.fixtures / spec["keys"] if spec["keys"] else None)
            chk["build_s"] = dt
            _emit(self.args.rows, {"type": "keylist", **chk})
            self.log(f"built {model} on {dev} in {dt:.1f} s: {chk['parameters'] / 1e6:.1f} M parameters; "
                     f"key list: {chk['status']}")
        else:
            self.log(f"built {model} on cpu (for ONNX export) in {dt:.1f} s")
        store[model] = net
        return net

    def estimate(self, t: dict) -> float:
        e = self.est
        if t["kind"] == "tests":
            return e["tests_min"]
        m, rt = t["model"], t["runtime"]
        s = 0.0
        if rt in ("torch-eager", "torch-compile", "tensorrt") and m not in self.nets:
            s += e["build"][m]
        if rt == "onnxruntime" and m not in self.cpu_nets:
            s += e["cpu_build"][m]
        if rt == "torch-compile":
            return s + self.observed.get((m, rt, t["variant"]), e["torch-compile"][m])
        if rt in ("onnxruntime", "tensorrt"):
            key = (m, rt, t["precision"], t["variant"])
            if key not in self.setup_done:
                s += e[f"{rt}-setup"][m] * (2 if (m, t["variant"]) == ("reloc-vggt", "cached") else 1)
            return s + self.observed.get((m, rt, t["variant"]), e[rt])
        return s + self.observed.get((m, rt, t["variant"]), e[rt])

    # -- tasks
    def run(self, tasks: List[dict]) -> int:
        for t in tasks:
            _emit(self.args.rows, {"type": "start", "id": t["id"], "time": time.time()})
            why = self.unavailable(t) if t["kind"] == "bench" else None
            if why:  # said at once, whatever the budget
                row = {"type": "bench", **t, "device": self.device, "status": "not available", "error": why}
                _emit(self.args.rows, row)
                self.log(_row_line(row))
                continue
            left = self.args.deadline - time.time()
            est = self.estimate(t)
            if est > left:
                rec = {"type": t["kind"], **t, "status": "skipped",
                       "reason": f"time budget: estimated {est:.0f} s, {max(left, 0):.0f} s left"}
                _emit(self.args.rows, rec)
                self.log(f"{t['id']}: skipped ({rec['reason']})")
                continue
            if t["kind"] == "tests":
                _emit(self.args.rows, {"type": "tests", **t, **self.run_tests(left)})
                continue
            t0, built0 = time.time(), self.build_s
            graph_key = (t["model"], t["runtime"], t["precision"], t["variant"])
            set_up = t["runtime"] not in ("onnxruntime", "tensorrt") or graph_key in self.setup_done
            try:
                row = self.run_bench(t)
            except Exception as e:  # one failing config must not stop the rest
                row = {"status": "oom" if "OutOfMemory" in type(e).__name__ else "error", "error": _short(e)}
                if self.args.verbose:
                    traceback.print_exc()
                self._cleanup()
            row = {"type": "bench", **t, "device": self.device, **row, "task_s": round(time.time() - t0, 2)}
            if row["status"] == "ok" and set_up:  # model builds and graph exports are estimated apart
                spent = time.time() - t0 - (self.build_s - built0)
                self.observed[(t["model"], t["runtime"], t["variant"])] = max(spent, 0.1)
            _emit(self.args.rows, row)
            self.log(_row_line(row))
            if row["status"] in ("error", "oom") and any(s in row.get("error", "") for s in _FATAL):
                self.log("the CUDA context is unusable after this error: the worker exits for a fresh one")
                return 3
        return 0

    def _cleanup(self) -> None:
        for net in self.nets.values():
            if hasattr(net, "kv_cache"):
                net.kv_cache.clear()
        if self.cuda:
            self.torch.cuda.empty_cache()

    def unavailable(self, t: dict) -> Optional[str]:
        """Why the task's runtime cannot run on this machine (None when it can)."""
        rt = t["runtime"]
        if rt == "tensorrt":
            from reloc_ros.backends.common import BackendUnavailableError
            from reloc_ros.backends.tensorrt_backend import import_tensorrt

            try:
                import_tensorrt()
            except BackendUnavailableError as e:
                return _short(e, 300)
            if not self.cuda:
                return "TensorRT needs a CUDA GPU"
        if rt == "onnxruntime":
            try:
                import onnx  # noqa: F401  (export)
                import onnxruntime as ort
            except Exception as e:
                return _short(e, 300)
            if self.cuda and "CUDAExecutionProvider" not in ort.get_available_providers():
                return f"ONNX Runtime has no CUDAExecutionProvider (providers: {ort.get_available_providers()})"
        return None

    def run_bench(self, t: dict) -> dict:
        torch = self.torch
        m, rt, prec, var = t["model"], t["runtime"], t["precision"], t["variant"]
        self._cleanup()
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            free0 = torch.cuda.mem_get_info()[0]
        runner = self._runner(t)
        if m == "reloc3r":
            row = self._time_reloc3r(runner, t)
        else:
            row = self._time_fused(runner, t)
        row["status"] = "ok"
        if self.cuda:
            row["gpu_before_mb"] = base / 2**20
            row["gpu_peak_task_mb"] = torch.cuda.max_memory_allocated() / 2**20
            # ONNX Runtime / TensorRT allocate outside torch: device-wide use instead
            row["gpu_used_delta_mb"] = (free0 - torch.cuda.mem_get_info()[0]) / 2**20
        if rt in ("onnxruntime", "tensorrt"):
            self.setup_done.add((m, rt, prec, var))
        return row

    def _runner(self, t: dict):
        from reloc_ros.backends.reloc3r_runner import Reloc3rRunner
        from reloc_ros.backends.vggt_runner import RelocVGGTRunner

        m, rt, prec, var = t["model"], t["runtime"], t["precision"], t["variant"]
        hash_ = f"gpucheck-{m}-{'dry' if self.args.dry_run else 'full'}-seed0"  # random weights: skip hashing GBs
        if rt in ("torch-eager", "torch-compile"):
            net = self._net(m)
            if m == "reloc3r":
                return Reloc3rRunner(net, "torch", prec, self.device, model_hash=hash_, max_batch=self.kmax)
            return RelocVGGTRunner(net, "torch", prec, self.device, var, model_hash=hash_,
                                   max_keyframes=self.kmax, cache_capacity=self.kmax + 1)
        key = (m, rt, prec, var if m == "reloc-vggt" else "")
        if key in self.graph_runners:
            return self.graph_runners[key]
        net = self._net(m, cpu=(rt == "onnxruntime"))
        art = self.artifacts / f"{m}-{rt}"
        if m == "reloc3r":
            r = Reloc3rRunner(net, rt, prec, self.device, artifacts_dir=art, model_hash=hash_, max_batch=self.kmax,
                              threads=self.args.threads)
        else:
            r = RelocVGGTRunner(net, rt, prec, self.device, var, artifacts_dir=art, model_hash=hash_,
                                max_keyframes=self.kmax, cache_capacity=self.kmax + 1, threads=self.args.threads)
        self.graph_runners[key] = r
        return r

    def _compile_targets(self, t: dict, net) -> list:
        if t["model"] == "reloc3r":
            return [(net, "encode_native"), (net, "decode"), (net, "head")]
        return [(net, "_sequence"), (net.aggregator, "run_blocks"), (net, "_run_star"), (net, "_query_step"),
                (net.camera_head, "from_camera_tokens")]

    def _time_reloc3r(self, runner, t: dict) -> dict:
        from bench_reloc3r import cached_localization, reencode_localization

        torch = self.torch
        K, var, rt = t["K"], t["variant"], t["runtime"]
        H, W = self.specs["reloc3r"]["hw"]
        p = runner.net.config.patch_size
        grid = (H // p, W // p)
        on_dev = rt in ("torch-eager", "torch-compile", "tensorrt")
        ck = (t["precision"], rt, on_dev)
        if ck not in self.kf_cache:
            g = torch.Generator().manual_seed(0)
            kf_imgs = torch.rand(self.kmax, 3, H, W, generator=g) * 2 - 1
            q_img = torch.rand(1, 3, H, W, generator=g) * 2 - 1
            # keyframe tokens as the map cache stores them (fp16), encoded once, untimed
            toks = torch.cat([runner.encode(kf_imgs[i:i + 4]) for i in range(0, self.kmax, 4)]).half()
            if on_dev:
                dt = runner.dtype if rt != "tensorrt" else torch.float16
                kf_imgs, q_img, toks = kf_imgs.to(self.device, dt), q_img.to(self.device, dt), toks.to(self.device)
            self.kf_cache.clear()  # one set at a time: the tokens of 20 keyframes are 30 MB at 512
            self.kf_cache[ck] = (kf_imgs, q_img, toks)
        kf_imgs, q_img, toks = self.kf_cache[ck]
        if var == "cached":
            fn = cached_localization(runner, toks, q_img, grid, K)
        else:
            if rt != "torch-eager" and rt != "torch-compile":
                raise ValueError("reencode is timed on PyTorch only")
            fn = reencode_localization(runner, kf_imgs, q_img, K)
        reps, warm = self.args.reps, self.args.warmup
        row: dict = {"hw": [H, W]}
        if rt == "torch-compile":
            ref = fn()
            before = _dynamo_counts()
            with compiled_methods(self._compile_targets(t, runner.net), self.args.compile_backend):
                row.update(self._timed(fn, reps, warm))
                out = fn()
                after = _dynamo_counts()
            row["max_abs_diff_vs_eager"] = float((out.double().cpu() - ref.double().cpu()).abs().max())
            row["dynamo"] = {k: after[k] - before.get(k, 0) for k in after}
            row["compile_backend"] = self.args.compile_backend
        else:
            row.update(self._timed(fn, reps, warm))
        return row

    def _timed(self, fn, reps: int, warm: int) -> dict:
        from bench_reloc3r import measure

        torch = self.torch
        t0 = time.perf_counter()
        fn()
        if self.cuda:
            torch.cuda.synchronize()
        row = {"first_ms": 1e3 * (time.perf_counter() - t0)}
        if self.cuda:
            row["gpu_peak_warmup_mb"] = torch.cuda.max_memory_allocated() / 2**20
        med, mn, _, _, cuda_peak = measure(fn, reps, self.device, warmup=max(warm - 1, 0), rss=False)
        row.update(median_ms=med, min_ms=mn, reps=reps)
        if self.cuda:
            row["gpu_peak_mb"] = cuda_peak
        return row

    def _time_fused(self, runner, t: dict) -> dict:
        from bench_vggt import localization_inputs, localize_once, time_localization

        torch = self.torch
        K, rt = t["K"], t["runtime"]
        hw = self.specs["reloc-vggt"]["hw"]
        if rt in ("torch-eager", "torch-compile"):
            inputs = localization_inputs(K, hw, self.device, runner.dtype, key_prefix=("gpucheck", rt))
        elif rt == "tensorrt":
            inputs = localization_inputs(K, hw, self.device, torch.float16, key_prefix=("gpucheck", rt))
        else:  # ONNX Runtime feeds numpy arrays from the host
            inputs = localization_inputs(K, hw, key_prefix=("gpucheck", rt))
        reps, warm = self.args.reps, self.args.warmup
        row: dict = {"hw": list(hw)}
        if rt == "torch-compile":
            ref = localize_once(runner, inputs)[0]
            before = _dynamo_counts()
            with compiled_methods(self._compile_targets(t, runner.net), self.args.compile_backend):
                row.update(time_localization(runner, inputs, reps, warmup=warm, cuda=self.cuda))
                out = localize_once(runner, inputs)[0]
                after = _dynamo_counts()
            row["max_abs_diff_vs_eager"] = float((out - ref).abs().max())
            row["dynamo"] = {k: after[k] - before.get(k, 0) for k in after}
            row["compile_backend"] = self.args.compile_backend
        else:
            row.update(time_localization(runner, inputs, reps, warmup=warm, cuda=self.cuda))
        row["reps"] = reps
        return row

    def run_tests(self, left: float) -> dict:
        """pytest on each test file in turn (own time limit each), counts from JUnit XML."""
        files = self.args.test_files
        limit = min(self.args.tests_timeout, left - 5)
        per_file = max(limit / max(len(files), 1), 10.0)
        res = {"status": "ok", "files": {}, "passed": 0, "failed": 0, "errors": 0, "skipped": 0,
               "failures": [], "time_limit_s": round(limit, 1)}
        t_end = time.time() + limit
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
        for f in files:
            left_f = t_end - time.time()
            if left_f < 5:
                res["files"][f] = {"status": "skipped", "reason": "tests time limit reached"}
                continue
            with tempfile.TemporaryDirectory(prefix="gpucheck-pytest-") as tmp:
                xml = Path(tmp) / "junit.xml"
                cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={xml}",
                       "-o", "junit_family=xunit1", f]
                if self.args.tests_k:
                    cmd += ["-k", self.args.tests_k]
                t0 = time.time()
                self.log(f"pytest {f} (limit {min(per_file * 2, left_f):.0f} s)")
                p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, **_group_kwargs())
                try:
                    out, _ = p.communicate(timeout=min(per_file * 2, left_f))
                    timed_out = False
                except subprocess.TimeoutExpired:
                    _kill_group(p)
                    out, _ = p.communicate()
                    timed_out = True
                fr = {"seconds": round(time.time() - t0, 1), "rc": p.returncode,
                      "summary": (out or "").strip().splitlines()[-1:] or [""]}
                fr["summary"] = fr["summary"][0][-300:]
                if timed_out:
                    fr["status"] = "timed out"
                    res["status"] = "incomplete"
                if xml.is_file():
                    fr.update(_junit_counts(xml))
                    for k in ("passed", "failed", "errors", "skipped"):
                        res[k] += fr.get(k, 0)
                    res["failures"] += fr.pop("failures", [])
                elif not timed_out:
                    fr["status"] = "no report"
                    fr["output_tail"] = (out or "")[-1500:]
                res["files"][f] = fr
                self.log(f"  {f}: {fr.get('passed', 0)} passed, {fr.get('failed', 0)} failed, "
                         f"{fr.get('errors', 0)} errors, {fr.get('skipped', 0)} skipped in {fr['seconds']} s"
                         + (" (TIMED OUT)" if timed_out else ""))
        return res


def _junit_counts(xml: Path) -> dict:
    root = ET.parse(xml).getroot()
    out = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0, "failures": [], "skip_reasons": {}}
    for case in root.iter("testcase"):
        name = f"{case.get('classname', '')}::{case.get('name', '')}"
        kids = {c.tag: c for c in case}
        if "failure" in kids or "error" in kids:
            c = kids.get("failure", kids.get("error"))
            key = "failed" if "failure" in kids else "errors"
            out[key] += 1
            msg = (c.get("message") or "")[:300]
            # a package this machine lacks (faiss, poselib, ...) is the environment's doing, not the code's
            kind = key + (" (module missing on this machine)" if "No module named" in msg else "")
            out["failures"].append({"test": name, "kind": kind, "message": msg})
        elif "skipped" in kids:
            out["skipped"] += 1
            reason = (kids["skipped"].get("message") or "")[:160]
            out["skip_reasons"][reason] = out["skip_reasons"].get(reason, 0) + 1
        else:
            out["passed"] += 1
    return out


def _row_line(r: dict) -> str:
    head = f"{r['model']:10s} {r['runtime']:13s} {r['precision']:4s} {r['variant']:8s} K={r['K']:2d}"
    if r.get("status") != "ok":
        return f"{head}: {r.get('status')}: {r.get('error', r.get('reason', ''))[:160]}"
    s = f"{head}: median {r['median_ms']:8.2f} ms (min {r['min_ms']:8.2f})"
    if "net_median_ms" in r:
        s += f" network {r['net_median_ms']:8.2f}"
    s += f", first {r['first_ms']:8.1f} ms"
    if "gpu_peak_mb" in r:
        s += f", GPU peak {r['gpu_peak_mb']:7.0f} MB"
    if "max_abs_diff_vs_eager" in r:
        s += f", |compiled - eager| {r['max_abs_diff_vs_eager']:.2e}"
    return s


# ----------------------------------------------------------------------------- orchestration


def _group_kwargs() -> dict:
    """A new process group (not a new session) so that a child and its children can be
    killed together, while a parent that is killed still takes them down with its session."""
    if sys.version_info >= (3, 11):
        return {"process_group": 0}
    return {"preexec_fn": os.setpgrp}


def _kill_group(p: subprocess.Popen) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(p.pid, sig)
        except (ProcessLookupError, PermissionError):
            return
        try:
            p.wait(timeout=5)
            return
        except subprocess.TimeoutExpired:
            continue


def _read_records(path: Path) -> List[dict]:
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            pass  # a line cut by a kill
    return out


def run_plan(args, plan: List[dict], passthrough: List[str], progress=None) -> None:
    """Runs the plan in worker processes: kills the worker at the budget (+ grace), starts
    a fresh one after a crash for the tasks left, at most 3 times."""
    grace = 10.0 if not args.dry_run else 5.0
    restarts = 0
    done: set = set()
    while True:
        left_tasks = [t for t in plan if t["id"] not in done]
        if not left_tasks:
            return
        if time.time() > args.deadline - 2:
            for t in left_tasks:
                _emit(args.rows, {"type": t["kind"], **t, "status": "skipped", "reason": "time budget used up"})
            return
        plan_path = Path(args.artifacts) / f"plan-{restarts}.json"
        plan_path.write_text(json.dumps(left_tasks))
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", str(plan_path),
               "--deadline", repr(args.deadline), *passthrough]
        p = subprocess.Popen(cmd, **_group_kwargs())
        killed = False
        try:
            while True:
                left = args.deadline + grace - time.time()
                if left <= 0:
                    _kill_group(p)
                    rc, killed = p.returncode, True
                    break
                try:
                    rc = p.wait(timeout=min(left, 30.0))
                    break
                except subprocess.TimeoutExpired:
                    if progress:  # a report of what is done so far, in case this process is killed
                        try:
                            progress()
                        except Exception as e:  # the final report is written again at the end
                            print(f"[check] interim report failed: {_short(e)}", flush=True)
        except BaseException:
            _kill_group(p)
            raise
        recs = _read_records(args.rows)
        finished = {r["id"] for r in recs if r.get("type") in ("bench", "tests")}
        started = [r["id"] for r in recs if r.get("type") == "start"]
        done |= finished
        in_flight = [i for i in started if i not in finished]
        by_id = {t["id"]: t for t in plan}
        for i in in_flight:
            why = "killed at the time budget" if killed else f"the worker process died (exit status {rc})"
            t = by_id[i]
            _emit(args.rows, {"type": t["kind"], **t, "status": "error" if not killed else "skipped",
                              "error" if not killed else "reason": why})
            done.add(i)
            print(f"[check] {i}: {why}", flush=True)
        if killed:
            for t in plan:
                if t["id"] not in done:
                    _emit(args.rows, {"type": t["kind"], **t, "status": "skipped", "reason": "time budget used up"})
            return
        if rc == 0:
            return
        restarts += 1
        if restarts > 3:
            for t in plan:
                if t["id"] not in done:
                    _emit(args.rows, {"type": t["kind"], **t, "status": "error",
                                      "error": "not run: the worker failed 4 times"})
            return
        print(f"[check] worker exited with status {rc}; starting a fresh one for the tasks left", flush=True)


# ----------------------------------------------------------------------------- report


def _fmt(x, nd=1) -> str:
    return "-" if x is None else f"{x:.{nd}f}"


def evaluate_targets(rows: List[dict], env: dict, dry: bool, ks: List[int]) -> List[dict]:
    """Each target against its bf16 eager row; a dry run (no K = 10) shows its largest K, no verdict."""
    out = []
    for tg in TARGETS:
        tg = dict(tg)
        if tg["K"] not in ks:
            tg["K"] = max(ks)
            tg["name"] += f" (shown: K={tg['K']})"
        cand = [r for r in rows if r.get("type") == "bench" and r["model"] == tg["model"]
                and r["variant"] == tg["variant"] and r["K"] == tg["K"]]
        prim = [r for r in cand if r["runtime"] == TARGET_RUNTIME and r["precision"] == TARGET_PRECISION]
        ok = [r for r in cand if r.get("status") == "ok"]
        res = {**tg, "runtime": TARGET_RUNTIME, "precision": TARGET_PRECISION}
        if prim and prim[0].get("status") == "ok":
            r = prim[0]
            res.update(median_ms=r["median_ms"], min_ms=r["min_ms"], net_median_ms=r.get("net_median_ms"))
            if dry:
                res["verdict"] = "n/a (dry run: CPU, tiny sizes)"
            else:
                res["verdict"] = "PASS" if r["median_ms"] <= tg["limit_ms"] else "MISS"
        else:
            why = prim[0].get("error") or prim[0].get("reason") if prim else "not in the plan"
            res["verdict"] = f"not measured ({prim[0]['status']}: {why})" if prim else "not measured"
        if ok:
            best = min(ok, key=lambda r: r["median_ms"])
            res["best"] = {"median_ms": best["median_ms"], "runtime": best["runtime"], "precision": best["precision"]}
        out.append(res)
    return out


def write_reports(args, env: dict, started: float, plan: List[dict], extra: dict) -> dict:
    recs = _read_records(args.rows)
    rows = [r for r in recs if r.get("type") == "bench"]
    tests = next((r for r in recs if r.get("type") == "tests"), None)
    keylists = [r for r in recs if r.get("type") == "keylist"] + extra.get("keylists", [])
    specs = model_specs(args.dry_run)
    targets = evaluate_targets(rows, env, args.dry_run, args.ks)
    elapsed = time.time() - started
    report = {"mode": "dry-run" if args.dry_run else "gpu", "budget_s": args.budget_s, "elapsed_s": round(elapsed, 1),
              "env": env, "models": {m: {k: v for k, v in s.items()} for m, s in specs.items()},
              "settings": {"reps": args.reps, "warmup": args.warmup, "ks": args.ks, "precisions": args.precisions,
                           "compile_backend": args.compile_backend},
              "targets": targets, "keylists": keylists, "tests": tests, "rows": rows,
              "planned": len(plan)}
    out = Path(args.out)
    (out / "report.json").write_text(json.dumps(report, indent=1, default=str))
    (out / "report.md").write_text(render_markdown(report))
    return report


def render_markdown(rep: dict) -> str:
    env, rows = rep["env"], rep["rows"]
    L = []
    dry = rep["mode"] == "dry-run"
    L.append(f"# GPU check report ({'DRY RUN on CPU, tiny configurations' if dry else 'GPU'})\n")
    gpu = env.get("gpu", "no CUDA GPU visible to torch")
    L.append(f"- GPU: **{gpu}**" + (f" (compute capability {env.get('gpu_capability')}, "
                                     f"{env.get('gpu_memory_gib')} GiB, driver {env.get('driver', '?')})"
                                     if env.get("cuda_available") else ""))
    L.append(f"- torch {env.get('torch')} (CUDA build: {env.get('torch_cuda_build')}, cuDNN {env.get('cudnn', '-')}),"
             f" Python {env.get('python')}, numpy {env.get('numpy')}, {env.get('cpu_count')} CPUs")
    L.append(f"- ONNX Runtime: {env.get('onnxruntime')}; providers {env.get('onnxruntime_providers')}"
             + ("" if env.get("onnxruntime_cuda") else " -> **no CUDA execution provider**"))
    L.append(f"- onnx: {env.get('onnx')}")
    trt = (f"importable: {env['tensorrt']}" if env.get("tensorrt_available")
           else f"**not available** ({env.get('tensorrt', '')})")
    L.append(f"- TensorRT: {trt}")
    L.append("- optional modules: " + ", ".join(f"{k[4:]} {v}" for k, v in env.items() if k.startswith("opt_")))
    L.append(f"- time: {rep['elapsed_s']} s of a {rep['budget_s']} s budget; {rep['settings']['reps']} timed "
             f"runs after {rep['settings']['warmup']} warm-up(s) per configuration; random weights\n")
    for m, s in rep["models"].items():
        L.append(f"- `{m}`: {s['label']}, images {s['hw'][0]}x{s['hw'][1]}")
    L.append("")
    L.append(f"## Targets ({TARGET_PRECISION}, {TARGET_RUNTIME}; issue 11: on an H100/H200-class GPU)\n")
    hopper = ("H100", "H200", "H800", "H20", "GH200")
    if not dry and env.get("gpu") and not any(x in env.get("gpu", "") for x in hopper):
        L.append(f"Note: this GPU ({env.get('gpu')}) is not H100/H200 class; the limits are for that class.\n")
    L.append("| target | limit ms | median ms | min ms | network median ms | verdict | best of all runtimes |")
    L.append("|---|---|---|---|---|---|---|")
    for t in rep["targets"]:
        best = t.get("best")
        b = f"{best['median_ms']:.1f} ms ({best['runtime']}, {best['precision']})" if best else "-"
        L.append(f"| {t['name']} | {t['limit_ms']:.0f} | {_fmt(t.get('median_ms'))} | {_fmt(t.get('min_ms'))} | "
                 f"{_fmt(t.get('net_median_ms'))} | {t['verdict']} | {b} |")
    L.append("\nOne localization per query: Reloc3r = query encode + K pairs + SVD; fused = network + "
             "decoding + Sim(3) (the network column is the network alone). With random weights Sim(3) "
             "sees meaningless predictions, so its share may differ from a trained model's.\n")
    L.append("## Key lists (full-size architectures vs the published state dicts)\n")
    if rep["keylists"]:
        L.append("| model | status | compared tensors | parameters | note |")
        L.append("|---|---|---|---|---|")
        for k in rep["keylists"]:
            note = k.get("reason", "")
            if k.get("added_by_this_project"):
                a = k["added_by_this_project"]
                note += f"+{a['tensors']} tensors of this project ({', '.join(a['prefixes'])})"
            if k.get("status") == "MISMATCH":
                note += f" missing {k.get('missing')}, unexpected {k.get('unexpected')}, misshaped {k.get('misshaped')}"
            L.append(f"| {k['model']}{' (' + k['where'] + ')' if k.get('where') else ''} | {k['status']} | "
                     f"{k.get('compared', '-')} | {k['parameters']:,} | {note} |")
    else:
        L.append("No model was built (see the rows below).")
    L.append("\n## Tests\n")
    tests = rep["tests"]
    if not tests:
        L.append("Not run (not in the plan).")
    elif tests.get("status") == "skipped":
        L.append(f"Skipped: {tests.get('reason')}")
    else:
        L.append(f"{tests['passed']} passed, {tests['failed']} failed, {tests['errors']} errors, "
                 f"{tests['skipped']} skipped (limit {tests['time_limit_s']} s; status {tests['status']}).\n")
        L.append("| file | passed | failed | errors | skipped | seconds | status |")
        L.append("|---|---|---|---|---|---|---|")
        for f, r in tests["files"].items():
            L.append(f"| {f} | {r.get('passed', '-')} | {r.get('failed', '-')} | {r.get('errors', '-')} | "
                     f"{r.get('skipped', '-')} | {r.get('seconds', '-')} | {r.get('status', 'done')} |")
        for fl in tests.get("failures", [])[:30]:
            L.append(f"- {fl['kind']}: `{fl['test']}`: {fl['message']}")
        reasons: Dict[str, int] = {}
        for r in tests["files"].values():
            for k, v in r.get("skip_reasons", {}).items():
                reasons[k] = reasons.get(k, 0) + v
        for k, v in sorted(reasons.items(), key=lambda kv: -kv[1])[:10]:
            L.append(f"- skipped x{v}: {k}")
    L.append("\n## Latency (median ms, min in brackets) per K\n")
    ks = rep["settings"]["ks"]
    groups: Dict[tuple, Dict[int, dict]] = {}
    for r in rows:
        groups.setdefault((r["model"], r["runtime"], r["precision"], r["variant"]), {})[r["K"]] = r
    L.append("| model | runtime | precision | variant | " + " | ".join(f"K={k}" for k in ks) + " |")
    L.append("|---|---|---|---|" + "---|" * len(ks))
    for key in sorted(groups, key=lambda k: (k[0], RUNTIMES.index(k[1]), k[2], k[3])):
        cells = []
        for k in ks:
            r = groups[key].get(k)
            if r is None:
                cells.append("")
            elif r.get("status") == "ok":
                cells.append(f"{r['median_ms']:.1f} ({r['min_ms']:.1f})")
            else:
                cells.append(r.get("status", "?"))
        L.append(f"| {' | '.join(key)} | " + " | ".join(cells) + " |")
    L.append("\n## All configurations\n")
    L.append("GPU peak MB: `torch.cuda.max_memory_allocated` over the timed calls (weights, caches and "
             "activations; reset per configuration); warm-up peak includes the first call (for `cached` "
             "it encodes the keyframes). ONNX Runtime / TensorRT allocate outside torch: see "
             "'GPU used delta' (device-wide, from cudaMemGetInfo).\n")
    L.append("| model | runtime | prec | variant | K | status | median ms | min ms | network ms | first ms | "
             "GPU peak MB | warm-up peak MB | GPU used delta MB | note |")
    L.append("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in sorted(rows, key=lambda r: (r["model"], RUNTIMES.index(r["runtime"]), r["precision"], r["variant"],
                                         r["K"])):
        note = r.get("error") or r.get("reason") or ""
        if "max_abs_diff_vs_eager" in r:
            note = f"|compiled-eager| {r['max_abs_diff_vs_eager']:.2e}; dynamo {r.get('dynamo')} " + note
        note = note.replace("|", "/")
        L.append(f"| {r['model']} | {r['runtime']} | {r['precision']} | {r['variant']} | {r['K']} | "
                 f"{r.get('status')} | "
                 f"{_fmt(r.get('median_ms'), 2)} | {_fmt(r.get('min_ms'), 2)} | {_fmt(r.get('net_median_ms'), 2)} | "
                 f"{_fmt(r.get('first_ms'))} | {_fmt(r.get('gpu_peak_mb'), 0)} | "
                 f"{_fmt(r.get('gpu_peak_warmup_mb'), 0)} | "
                 f"{_fmt(r.get('gpu_used_delta_mb'), 0)} | {note[:300]} |")
    counts: Dict[str, int] = {}
    for r in rows:
        counts[r.get("status", "?")] = counts.get(r.get("status", "?"), 0) + 1
    L.append("\nStatus counts: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    skipped = [r for r in rows if r.get("status") == "skipped"]
    if skipped:
        L.append(f"\n{len(skipped)} configurations were skipped to stay within the {rep['budget_s']} s budget "
                 "(most important first: targets, other K, fp16, compile, ONNX Runtime, TensorRT); rerun with "
                 "`--only RUNTIME[,...]` or a larger `--budget-s` to measure them.")
    return "\n".join(L) + "\n"


# ----------------------------------------------------------------------------- main


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(ROOT / "out" / "gpu_check"), help="report folder (report.json, report.md)")
    ap.add_argument("--budget-s", type=float, default=None, help="global time budget (default 420; dry run 120)")
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny configs, K=1,2, 1 rep: checks the script itself")
    ap.add_argument("--ks", type=lambda s: [int(x) for x in s.split(",")], default=None, help="default 1,5,10,20")
    ap.add_argument("--precisions", type=lambda s: s.split(","), default=None,
                    help="default bf16,fp16 (dry: fp32,bf16)")
    ap.add_argument("--reps", type=int, default=None, help="timed runs per configuration (default 20; dry 1)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed runs first (default 3; dry 1)")
    ap.add_argument("--only", type=lambda s: s.split(","), default=None,
                    help="comma list of runtimes (torch-eager, torch-compile, onnxruntime, tensorrt), "
                         "models (reloc3r, reloc-vggt) and/or 'tests'")
    ap.add_argument("--skip-tests", action="store_true")
    ap.add_argument("--tests-timeout", type=float, default=None,
                    help="seconds for all test files (default 120; dry 60)")
    ap.add_argument("--tests-k", default=None, help="pytest -k expression (dry default: engine_cache_key)")
    ap.add_argument("--test-files", type=lambda s: s.split(","), default=None)
    ap.add_argument("--compile-backend", default=None, help="torch.compile backend (default inductor; dry: eager)")
    ap.add_argument("--shared", default=None, help="folder holding fixtures/ (default ../shared, else out/gpu_shared)")
    ap.add_argument("--artifacts", default=None, help="ONNX graphs / engines (default: a temporary folder, removed)")
    ap.add_argument("--threads", type=int, default=0, help="ONNX Runtime intra-op threads (0 = default)")
    ap.add_argument("--verbose", action="store_true", help="print tracebacks of failing configurations")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--rows", help=argparse.SUPPRESS)
    ap.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    dry = args.dry_run
    args.budget_s = args.budget_s if args.budget_s is not None else (120.0 if dry else 420.0)
    args.ks = args.ks or ([1, 2] if dry else [1, 5, 10, 20])
    args.precisions = args.precisions or (["fp32", "bf16"] if dry else ["bf16", "fp16"])
    args.reps = args.reps if args.reps is not None else (1 if dry else 20)
    args.warmup = args.warmup if args.warmup is not None else (1 if dry else 3)
    args.tests_timeout = args.tests_timeout if args.tests_timeout is not None else (60.0 if dry else 120.0)
    args.tests_k = args.tests_k if args.tests_k is not None else ("engine_cache_key" if dry else "")
    args.test_files = args.test_files or (["test/test_backends.py"] if dry else
                                          ["test/test_backends.py", "test/test_reloc_vggt.py", "test/test_vggt.py",
                                           "test/test_reloc3r.py"])
    args.compile_backend = args.compile_backend or ("eager" if dry else "inductor")
    if args.shared is None:
        env_shared = os.environ.get("RELOC_SHARED")
        cands = [Path(env_shared)] if env_shared else []
        cands += [ROOT.parent / "shared", ROOT / "out" / "gpu_shared"]
        args.shared = str(next((c for c in cands if (c / "fixtures").is_dir()), cands[0]))
    bad = [p for p in args.precisions if p not in ("fp32", "fp16", "bf16")]
    if bad or any(k < 1 for k in args.ks):
        ap.error(f"bad --precisions {bad} or --ks {args.ks}")
    unknown = set(args.only or ()) - set(RUNTIMES) - set(MODELS) - {"tests"}
    if unknown:
        ap.error(f"--only: unknown {sorted(unknown)}; choose from {list(RUNTIMES) + list(MODELS) + ['tests']}")
    return args


def _passthrough(args) -> List[str]:
    out = ["--out", args.out, "--budget-s", str(args.budget_s), "--ks", ",".join(map(str, args.ks)),
           "--precisions", ",".join(args.precisions), "--reps", str(args.reps), "--warmup", str(args.warmup),
           "--tests-timeout", str(args.tests_timeout), "--tests-k", args.tests_k,
           "--test-files", ",".join(args.test_files), "--compile-backend", args.compile_backend,
           "--shared", args.shared, "--artifacts", args.artifacts, "--threads", str(args.threads),
           "--rows", str(args.rows)]
    if args.dry_run:
        out.append("--dry-run")
    if args.verbose:
        out.append("--verbose")
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        args.rows = Path(args.rows)
        tasks = json.loads(Path(args.worker).read_text())
        return Worker(args).run(tasks)
    started = time.time()
    args.deadline = started + args.budget_s
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    args.rows = out / "rows.jsonl"
    if args.rows.exists():
        args.rows.unlink()
    own_artifacts = args.artifacts is None
    args.artifacts = args.artifacts or tempfile.mkdtemp(prefix="gpu_check_")
    print(f"== GPU check ({'dry run' if args.dry_run else 'full sizes'}), budget {args.budget_s:.0f} s, "
          f"report in {out}", flush=True)
    env = collect_env()
    print_env(env)
    if not args.dry_run and not env.get("cuda_available"):
        print("!! torch sees no CUDA GPU: running the full-size check on the CPU would take hours. "
              "Use --dry-run on a CPU machine.", flush=True)
        write_reports(args, env, started, [], {})
        return 2
    extra: dict = {}
    fixtures = Path(args.shared) / "fixtures"
    state = "present" if fixtures.is_dir() else "ABSENT: key lists not checked"
    print(f"== fixtures: {fixtures} ({state})", flush=True)
    if args.dry_run and fixtures.is_dir():
        # the full-size architectures on 'meta' (no memory) against the key lists, so that
        # the check of the GPU run is exercised here too
        from reloc_ros.models.reloc3r import build_reloc3r
        from reloc_ros.models.reloc_vggt import build_reloc_vggt

        full = model_specs(False)
        for m, build in (("reloc3r", build_reloc3r), ("reloc-vggt", build_reloc_vggt)):
            k = keylist_check(m, build(full[m]["config"], device="meta"), fixtures / full[m]["keys"])
            k["where"] = "full size, built on meta"
            extra.setdefault("keylists", []).append(k)
            print(f"  {m} full size (meta) vs {full[m]['keys']}: {k['status']}", flush=True)
    plan = build_plan(args)
    print(f"== plan: {len(plan)} tasks (most important first)", flush=True)

    def _on_term(signum, frame):  # write what exists, then stop (the worker group is killed by run_plan)
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _on_term)
    try:
        run_plan(args, plan, _passthrough(args), progress=lambda: write_reports(args, env, started, plan, extra))
    except KeyboardInterrupt:
        print("[check] interrupted: writing the report of what was measured", flush=True)
    finally:
        rep = write_reports(args, env, started, plan, extra)
        if own_artifacts:
            shutil.rmtree(args.artifacts, ignore_errors=True)
    print(f"\n== targets ({TARGET_PRECISION} {TARGET_RUNTIME})", flush=True)
    for t in rep["targets"]:
        print(f"  {t['name']}: limit {t['limit_ms']:.0f} ms, median {_fmt(t.get('median_ms'))} ms -> {t['verdict']}",
              flush=True)
    tests = rep["tests"]
    if tests and tests.get("status") != "skipped":
        print(f"== tests: {tests['passed']} passed, {tests['failed']} failed, {tests['errors']} errors, "
              f"{tests['skipped']} skipped", flush=True)
    print(f"== report: {out / 'report.md'} and {out / 'report.json'} ({rep['elapsed_s']} s)", flush=True)
    return 1 if any(k.get("status") == "MISMATCH" for k in rep["keylists"]) else 0


if __name__ == "__main__":
    sys.exit(main())
