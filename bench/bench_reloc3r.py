"""Latency and peak memory of one Reloc3r localization (K keyframe pairs).

Two ways to run one localization against K retrieved keyframes:
- ``cached``: keyframe encoder tokens come from the map cache (stored fp16, as the
  estimator does); only the query is encoded, then decoder + head run on the K pairs
  in one batch (the ``reloc3r`` estimator's path).
- ``reencode``: the authors' way: the whole network runs on every (keyframe, query)
  pair, so both images of each pair are encoded again (here as one batch of K pairs,
  which is the most favourable form of it).

Per backend (torch; onnxruntime) and per size: the small configuration (the fixture's
tiny sizes, random weights) and the published full size (random weights; 426.5M
parameters) where feasible. Peak memory is the process's resident set size (psutil,
sampled every 2 ms during the timed call) and, on CUDA, torch's peak allocation.
Prints a table; asserts nothing.

    python bench/bench_reloc3r.py                       # small, K=1,2,5,10,20 + full 224, K=1,2,5
    python bench/bench_reloc3r.py --size full --img-size 512 --full-ks 1,2,5,10
    python bench/bench_reloc3r.py --device cuda --precision fp16 --backends torch,tensorrt --size full --img-size 512
"""
from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from reloc_ros.backends.onnx_backend import OnnxRunner  # noqa: E402
from reloc_ros.backends.reloc3r_runner import Reloc3rRunner, export_reloc3r_onnx  # noqa: E402
from reloc_ros.models.reloc3r import build_reloc3r, raw_to_pose  # noqa: E402

SMALL = {"patch_size": 16, "enc_embed_dim": 128, "enc_depth": 2, "enc_num_heads": 4,
         "dec_embed_dim": 96, "dec_depth": 2, "dec_num_heads": 3}
IMG_HW = {224: (224, 224), 512: (384, 512)}


class PeakRSS:
    """Peak resident set size (bytes) of this process while the block runs (psutil)."""

    def __init__(self, interval: float = 0.002) -> None:
        import psutil  # imported here: bench/gpu_check.py uses this module without psutil

        self.proc = psutil.Process()
        self.interval = interval
        self.peak = 0
        self.start = 0

    def _poll(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(self.interval)

    def __enter__(self) -> "PeakRSS":
        self.start = self.peak = self.proc.memory_info().rss
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._poll, daemon=True)
        self._t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def measure(fn, repeats: int, device: str, warmup: int = 1, rss: bool = True):
    """(median ms, min ms, peak RSS MB, RSS growth MB, peak CUDA MB or nan) over repeats
    after ``warmup`` untimed calls. Each timed call ends with a CUDA synchronisation on a
    CUDA device. rss=False skips the RSS sampling thread (its 2 ms wake-ups would
    perturb GPU timings; the RSS columns are then nan). The CUDA peak
    (torch.cuda.max_memory_allocated) covers the timed calls only."""
    for _ in range(max(int(warmup), 0)):
        fn()
    _sync(device)
    times = []
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    with (PeakRSS() if rss else contextlib.nullcontext()) as mem:
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            _sync(device)
            times.append((time.perf_counter() - t0) * 1e3)
    cuda = torch.cuda.max_memory_allocated() / 2**20 if device.startswith("cuda") else float("nan")
    peak, grow = (mem.peak / 2**20, (mem.peak - mem.start) / 2**20) if rss else (float("nan"), float("nan"))
    return statistics.median(times), min(times), peak, grow, cuda


def cached_localization(runner: Reloc3rRunner, kf_tokens: torch.Tensor, q_img: torch.Tensor, grid, K: int):
    """One localization from cached keyframe tokens (the ``reloc3r`` estimator's path), as a
    callable returning the K query poses T_kf_query [K, 4, 4] (float64, CPU).

    kf_tokens: [>= K, N, C] keyframe encoder tokens as the map cache keeps them (fp16; on
    the CPU or already on the runner's device); q_img: [1, 3, H, W] in [-1, 1]; grid: the
    (h, w) patch grid of both. Per call: encode the query, decoder + head on the K
    (keyframe, query) pairs in one batch, SVD on the host.
    """

    def fn():
        fq = runner.encode(q_img)
        t, r = runner.pairs(kf_tokens[:K].float(), grid, fq, grid)
        return raw_to_pose(t.double(), r.double())

    return fn


def reencode_localization(runner: Reloc3rRunner, kf_imgs: torch.Tensor, q_img: torch.Tensor, K: int, full=None):
    """The authors' way as a callable: the whole network on K (keyframe, query) pairs,
    both images of every pair encoded again (one batch). Returns pose2 [K, 4, 4].

    kf_imgs: [>= K, 3, H, W], q_img: [1, 3, H, W] in [-1, 1]. torch backend: runs
    ``runner.net``; onnxruntime: ``full`` is an OnnxRunner of the exported 'full' graph.
    """

    def fn():
        a, b = kf_imgs[:K], q_img.expand(K, -1, -1, -1)
        if runner.backend == "torch":
            with torch.inference_mode():
                dt = runner.dtype
                _, p2 = runner.net({"img": a.to(runner.device, dt)}, {"img": b.to(runner.device, dt)})
                return p2["pose"]
        out = full.run({"img1": a.cpu().numpy(), "img2": b.contiguous().cpu().numpy()})
        return raw_to_pose(torch.from_numpy(out["t2"]).double(), torch.from_numpy(out["rot9_2"]).double())

    return fn


def bench_size(name, arch, ks, backends, args, rows):
    H, W = IMG_HW[args.img_size]
    p = arch.get("patch_size", 16)
    grid = (H // p, W // p)
    g = torch.Generator().manual_seed(0)
    kmax = max(ks)
    kf_imgs = torch.rand(kmax, 3, H, W, generator=g) * 2 - 1
    q_img = torch.rand(1, 3, H, W, generator=g) * 2 - 1
    torch.manual_seed(0)
    t0 = time.perf_counter()
    net = build_reloc3r(arch)
    print(f"[{name}] built {sum(x.numel() for x in net.parameters()) / 1e6:.1f}M parameters "
          f"in {time.perf_counter() - t0:.1f} s; images {H}x{W}", flush=True)
    for backend in backends:
        with tempfile.TemporaryDirectory(prefix=f"bench-reloc3r-{name}-") as tmp:
            bench_backend(name, net, backend, Path(tmp), grid, kf_imgs, q_img, ks, args, rows)


def bench_backend(name, net, backend, work, grid, kf_imgs, q_img, ks, args, rows):
    """Rows for one backend: cached and re-encode latency for each K."""
    H, W = q_img.shape[-2:]
    kmax = max(ks)
    try:
        runner = Reloc3rRunner(net, backend, args.precision, args.device, artifacts_dir=work,
                               max_batch=max(kmax, 1), threads=args.threads)
    except Exception as e:  # backend not available here: say why, go on
        print(f"[{name}] {backend}: unavailable: {e}", flush=True)
        return
    # keyframe tokens as the map cache stores them (fp16), encoded once, untimed
    kf_tokens = torch.cat([runner.encode(kf_imgs[i : i + 8]) for i in range(0, kmax, 8)]).half()
    full = None
    if backend == "onnxruntime":
        t0 = time.perf_counter()
        full = OnnxRunner(export_reloc3r_onnx(runner.net, "full", work / "full.onnx", img_hw=(H, W)),
                          threads=args.threads)
        print(f"[{name}] onnx export + session of the full graph: {time.perf_counter() - t0:.1f} s", flush=True)
    for K in ks:
        modes = [("cached", cached_localization(runner, kf_tokens, q_img, grid, K))]
        if backend in ("torch", "onnxruntime") and not args.no_reencode:
            modes.append(("reencode", reencode_localization(runner, kf_imgs, q_img, K, full)))
        for mode, fn in modes:
            reps = args.repeats if name == "small" else args.full_repeats
            med, mn, peak, grow, cuda = measure(fn, reps, args.device)
            rows.append((name, backend, args.precision, mode, K, med, mn, med / K, peak, grow, cuda))
            print(f"[{name}] {backend:11s} {mode:8s} K={K:2d}: {med:9.1f} ms (min {mn:.1f}), "
                  f"peak RSS {peak:.0f} MB (+{grow:.0f})", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", choices=("small", "full", "both"), default="both")
    ap.add_argument("--img-size", type=int, choices=(224, 512), default=224)
    ap.add_argument("--ks", default="1,2,5,10,20", help="K values for the small configuration")
    ap.add_argument("--full-ks", default="1,2,5", help="K values for the full-size network")
    ap.add_argument("--backends", default="torch,onnxruntime")
    ap.add_argument("--full-backends", default="torch", help="backends for the full size (ONNX export needs ~2x the weights in RAM)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", default="fp32", choices=("fp32", "fp16", "bf16"))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--full-repeats", type=int, default=1)
    ap.add_argument("--threads", type=int, default=0, help="torch / ONNX Runtime threads (0 = all cores)")
    ap.add_argument("--no-reencode", action="store_true", help="skip the authors' re-encode-every-pair mode")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, cpu count {os.cpu_count()}, "
          f"device {args.device}" + (f" ({torch.cuda.get_device_name()})" if args.device.startswith("cuda") else ""),
          f", load average {os.getloadavg()[0]:.1f}", flush=True)
    rows = []
    if args.size in ("small", "both"):
        bench_size("small", {**SMALL, "img_size": args.img_size}, [int(k) for k in args.ks.split(",")],
                   args.backends.split(","), args, rows)
    if args.size in ("full", "both"):
        bench_size("full", {"img_size": args.img_size}, [int(k) for k in args.full_ks.split(",")],
                   args.full_backends.split(","), args, rows)
    print()
    print("| size | backend | precision | mode | K | median ms | min ms | ms / pair | peak RSS MB | RSS growth MB | peak CUDA MB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print("| {} | {} | {} | {} | {} | {:.1f} | {:.1f} | {:.1f} | {:.0f} | {:.0f} | {} |".format(
            *r[:10], "-" if r[10] != r[10] else f"{r[10]:.0f}"))
    by = {(r[0], r[1], r[3], r[4]): r[5] for r in rows}
    print()
    for (size, backend, mode, K), ms in sorted(by.items()):
        if mode == "cached" and (size, backend, "reencode", K) in by:
            print(f"{size} {backend} K={K}: re-encoding every pair costs {by[(size, backend, 'reencode', K)] / ms:.2f}x the cached path")


if __name__ == "__main__":
    main()
