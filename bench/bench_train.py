"""Issue 11 proof: train the compact Reloc-VGGT from scratch on rendered rooms and measure it.

    .venv/bin/python bench/bench_train.py --out out/train_demo [--config config/train_demo.yaml]
        [--runs full,nopose,dense,star] [--parallel 2] [--steps N] [--eval-samples N]
        [--skip-train] [--skip-ddp] [--ddp-steps 3] [--skip-e2e]
    .venv/bin/python bench/bench_train.py --out out/train_demo --e2e-only full_long   # reloc-eval only
    .venv/bin/python bench/bench_train.py --out out/train_demo --node-dds full_long   # node over DDS only

Trains (``reloc-train`` CLI, one process per run, ``--parallel`` at a time, 1 thread each):
  full    pose tokens, ``cached`` mask (the product's default), end to end;
  nopose  the same without pose tokens (keyframe poses hidden from the network);
  dense   pose tokens, ``dense`` mask;   star   pose tokens, ``star`` mask.
Then, on held-out rooms (disjoint seeds), for every trained run: median query centre /
rotation error from the product's decoders (Sim(3), robust motion averaging, anchor) vs
the nearest-keyframe baseline (the most covisible keyframe's pose: what retrieval alone
gives) and the oracle-closest keyframe; each model also under the other masks;
per-query latency of each mask (``RelocVGGTRunner``, torch, warm cache for ``cached``);
ONNX Runtime vs PyTorch on the trained ``full`` checkpoint; DDP: ``torchrun
--nproc_per_node 2`` (gloo) vs 1 process, same global batch, float64, max weight
difference after N steps.
Writes ``<out>/results.json``, ``<out>/results.md`` and ``<out>/curves.png``
(``<out>/<run>/curve.png`` per run).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from reloc_ros.training.config import load_train_config  # noqa: E402
from reloc_ros.training.data import Sampler, collate  # noqa: E402
from reloc_ros.training.trainer import evaluate, frame_sets, load_trained_model  # noqa: E402

log = logging.getLogger("bench_train")

RUNS = {
    "full": ["model.pose_tokens=true", "model.mask=cached"],
    "nopose": ["model.pose_tokens=false", "model.mask=cached"],
    "dense": ["model.pose_tokens=true", "model.mask=dense"],
    "star": ["model.pose_tokens=true", "model.mask=star"],
}


def _train_runs(args, names: List[str]) -> Dict[str, float]:
    """Run the trainings as CLI subprocesses, ``args.parallel`` at a time; returns wall s."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    pending = list(names)
    running: Dict[str, Any] = {}
    walls: Dict[str, float] = {}
    while pending or running:
        while pending and len(running) < args.parallel:
            n = pending.pop(0)
            cmd = [sys.executable, "-m", "reloc_ros.cli.train_cli", "--config", args.config, "--out-dir",
                   str(Path(args.out) / n), "--set", "run.threads=1", "--set", "run.resume=never"] + \
                sum((["--set", s] for s in RUNS[n]), [])
            if args.steps:
                cmd += ["--steps", str(args.steps)]
            log.info("train %s: %s", n, " ".join(cmd))
            f = open(Path(args.out) / f"{n}.log", "w")
            running[n] = (subprocess.Popen(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT), time.time(), f)
        time.sleep(2)
        for n in list(running):
            p, t0, f = running[n]
            if p.poll() is not None:
                f.close()
                walls[n] = time.time() - t0
                if p.returncode != 0:
                    raise RuntimeError(f"training {n} failed (exit {p.returncode}); see {Path(args.out) / (n + '.log')}")
                log.info("trained %s in %.0f s", n, walls[n])
                del running[n]
    return walls


def _latency(net, cfg, sets, specs, mask: str, n: int = 20) -> Dict[str, float]:
    """Per-query network latency (ms, median / min over n queries) through the product's
    runner; for ``cached`` the keyframe states are warm (same keyframes as the last call)."""
    from reloc_ros.backends.vggt_runner import RelocVGGTRunner

    runner = RelocVGGTRunner(net, backend="torch", mask=mask)
    b = collate(sets, specs[:1])
    keys = [("bench", i) for i in range(b.keyframes.shape[1])]
    runner.predict(b.query, b.keyframes, b.kf_pose_enc, kf_keys=keys)  # warm-up (+ fills the cache)
    ts = []
    for _ in range(n):
        t0 = time.perf_counter()
        runner.predict(b.query, b.keyframes, b.kf_pose_enc, kf_keys=keys)
        ts.append((time.perf_counter() - t0) * 1e3)
    net.kv_cache.clear()
    return {"median_ms": float(np.median(ts)), "min_ms": float(np.min(ts))}


def _onnx_vs_torch(net, sets, specs, out: Path) -> Dict[str, Any]:
    from reloc_ros.backends.vggt_runner import RelocVGGTRunner

    res: Dict[str, Any] = {}
    for mask in ("cached", "star", "dense"):
        tr = RelocVGGTRunner(net, backend="torch", mask=mask)
        ox = RelocVGGTRunner(net, backend="onnxruntime", mask=mask, artifacts_dir=out / "onnx")
        diffs = []
        for sp in specs:
            b = collate(sets, [sp])
            a = tr.predict(b.query, b.keyframes, b.kf_pose_enc)
            o = ox.predict(b.query, b.keyframes, b.kf_pose_enc)
            diffs.append(float((a - o).abs().max()))
        res[mask] = {"max_abs_diff": max(diffs), "median_abs_diff": float(np.median(diffs)), "samples": len(specs)}
    return res


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_check(args, steps: int) -> Dict[str, Any]:
    """torchrun 2 gloo processes vs 1 process, same global batch, float64."""
    import yaml

    out = Path(args.out) / "ddp"
    base = load_train_config(args.config, ["run.dtype=float64", f"optim.steps={steps}", "run.eval_every=0",
                                           "run.ckpt_every=0", "data.eval_samples=8", "run.threads=1",
                                           "run.resume=never", "run.progress=false"])
    cfgs = {}
    for name in ("one", "two"):
        c = load_train_config(data=base.to_dict(), overrides=[f"run.out_dir={out / name}"])
        p = out / f"{name}.yaml"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(yaml.safe_dump(c.to_dict()))
        cfgs[name] = p
    env = dict(os.environ, OMP_NUM_THREADS="1")
    t0 = time.time()
    r1 = subprocess.run([sys.executable, "-m", "reloc_ros.cli.train_cli", "--config", str(cfgs["one"]), "--quiet"],
                        cwd=REPO, env=env, capture_output=True, text=True)
    t1 = time.time()
    cmd = [str(Path(sys.executable).parent / "torchrun"), "--nproc_per_node", "2", "--master_port", str(_free_port()),
           "-m", "reloc_ros.cli.train_cli", "--config", str(cfgs["two"]), "--quiet"]
    r2 = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    t2 = time.time()
    if r1.returncode or r2.returncode:
        return {"error": (r1.stderr + r2.stderr)[-2000:]}
    from reloc_ros.models.checkpoints import read_state_dict
    from reloc_ros.training.trainer import build_model

    # Read the float64 files as written (loading into a model would cast to float32).
    sa = read_state_dict(out / "one" / "model.safetensors")
    sb = read_state_dict(out / "two" / "model.safetensors")
    init = build_model(base).double().state_dict()
    diff = max(float((sa[k].double() - sb[k].double()).abs().max()) for k in sa if sa[k].numel())
    moved = max(float((sa[k].double() - init[k].double()).abs().max()) for k in sa if sa[k].numel())
    return {"steps": steps, "global_batch": base.optim.batch_size, "dtype": "float64",
            "max_abs_weight_diff": diff, "max_abs_weight_change": moved, "tolerance": 1e-9,
            "pass": diff < 1e-9, "one_process_s": t1 - t0, "torchrun_2_gloo_s": t2 - t1,
            "command": " ".join(cmd[1:])}


def _e2e(args, weights: Path) -> Dict[str, Any]:
    """The trained checkpoint end to end: a held-out rendered room at 640x480 (map = every
    second frame of a path, built with ``build_map``; queries = 16 of the others, a posed
    folder), then ``reloc-eval --estimator vggt-fused`` (retrieval -> K keyframes -> the
    network -> Sim(3) / motion averaging) on the torch and ONNX Runtime backends, and
    the geometric estimator for reference."""
    from reloc_ros.datasets import write_folder_dataset
    from reloc_ros.demo.scene import ProceduralRoom, demo_camera, render_frames
    from reloc_ros.maps import MapBuildConfig, build_map
    from reloc_ros.training.data import _room_config, _room_path

    cfg = load_train_config(args.config)
    rs = cfg.data.render
    out = Path(args.out) / "e2e"
    seed = 200000  # neither a training (0..) nor an evaluation (100000..) room
    room = ProceduralRoom(_room_config(rs, seed))
    poses = _room_path(room, rs, np.random.default_rng([rs.seed, seed, 2]))
    cam = demo_camera(640, 480, 0.75 * 640)
    t0 = time.time()
    mp = render_frames(room, poses[0::2], cam, "map_")
    qi = np.linspace(0, len(poses[1::2]) - 1, 16).round().astype(int)
    qs = render_frames(room, poses[1::2][qi], cam, "query_")
    map_dir = build_map(mp, out / "map", MapBuildConfig(), overwrite=True)
    qdir = write_folder_dataset(qs, out / "queries", overwrite=True)
    res: Dict[str, Any] = {"map_frames": len(mp), "queries": len(qs), "prepare_s": time.time() - t0}
    # Baseline without a network: the map keyframe whose centre is closest to the true
    # query centre (an oracle: better than any retrieval ranking).
    Tm = np.stack([f.T_world_cam for f in mp])
    bt, br = [], []
    for f in qs:
        j = int(np.argmin(np.linalg.norm(Tm[:, :3, 3] - f.T_world_cam[:3, 3], axis=1)))
        bt.append(float(np.linalg.norm(Tm[j, :3, 3] - f.T_world_cam[:3, 3])))
        R = Tm[j, :3, :3].T @ f.T_world_cam[:3, :3]
        br.append(float(np.degrees(np.arccos(np.clip((np.trace(R) - 1) / 2, -1, 1)))))
    res["nearest map keyframe (oracle)"] = {"median_translation_m": float(np.median(bt)),
                                            "median_rotation_deg": float(np.median(br))}
    H, W = rs.image_height, rs.image_width
    runs = {
        "vggt-fused torch sim3": ["--estimator", "vggt-fused"],
        "vggt-fused torch motion_averaging": ["--estimator", "vggt-fused", "--estimator-option",
                                              "fusion=motion_averaging"],
        "vggt-fused onnxruntime sim3": ["--estimator", "vggt-fused", "--estimator-option", "backend=onnxruntime",
                                        "--estimator-option", f"artifacts_dir={out / 'onnx'}"],
        "geometric (reference)": ["--estimator", "geometric"],
    }
    common = ["--estimator-option", f"weights={weights}", "--estimator-option", f"image_width={W}",
              "--estimator-option", f"max_keyframes={cfg.data.num_keyframes}"]
    for name, extra in runs.items():
        js = out / (name.replace(" ", "_") + ".json")
        cmd = [sys.executable, "-m", "reloc_ros.cli.eval_cli", str(qdir), "--format", "folder", "--map", str(map_dir),
               "--top-k", str(cfg.data.num_keyframes), "--json", str(js), "--quiet"] + extra + \
            (common if "vggt" in name else [])
        t0 = time.time()
        r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
        if r.returncode != 0:
            res[name] = {"error": r.stderr[-1500:]}
            continue
        sm = json.loads(js.read_text())["summary"]
        res[name] = {k: sm.get(k) for k in ("n_queries", "n_localized", "median_translation_m", "median_rotation_deg")}
        res[name]["wall_s"] = time.time() - t0
        res[name]["command"] = " ".join(["reloc-eval"] + cmd[3:])
    res["network_input"] = [H, W]
    return res


def _node_dds(args, run: str) -> Dict[str, Any]:
    """reloc_node over DDS (a plain process on a private domain) with ``vggt-fused`` and the
    trained checkpoint, on the map and queries of the end-to-end check (run ``--e2e-only``
    first); ``reloc_ros.demo.replay`` sends each query as Image + CameraInfo + TF and
    scores the node's fused ~/pose."""
    from reloc_ros.demo.procs import NodeProcess, isolated_ros_env, with_ament_prefix

    cfg = load_train_config(args.config)
    base = Path(args.out)
    out = base / "node_dds"
    out.mkdir(parents=True, exist_ok=True)
    map_dir, qdir = (base / "e2e" / "map").resolve(), (base / "e2e" / "queries").resolve()
    if not map_dir.is_dir():
        raise SystemExit(f"{map_dir} missing: run --e2e-only {run} first")
    env = with_ament_prefix(isolated_ros_env())
    opts = {"weights": str((base / run / "model.safetensors").resolve()), "image_width": cfg.data.render.image_width,
            "max_keyframes": cfg.data.num_keyframes}
    params = {"map_path": str(map_dir), "estimator": "vggt-fused", "estimator_options": json.dumps(opts),
              "top_k": cfg.data.num_keyframes, "max_rate": 0.0, "diagnostics_period": 0.5, "transform_tolerance": 0.2}
    node = NodeProcess(params, env, log_path=out / "reloc_node.log", workdir=out,
                       remaps={"image": "/camera/image_raw", "camera_info": "/camera/camera_info"}, use_launch=False)
    res = out / "results.json"
    with node:
        rp = subprocess.run([sys.executable, "-m", "reloc_ros.demo.replay", "--src", str(qdir), "--out", str(res),
                             "--timeout", "60", "--tolerance", "0.2"], env=env, timeout=900)
        alive = node.alive()
    if rp.returncode != 0 or not res.is_file():
        return {"error": f"replay exit {rp.returncode}", "node_log": node.log_tail()}
    d = json.loads(res.read_text())
    rows = d["frames"]
    pub = [r for r in rows if r["published"]]
    diag = d.get("final_diagnostics", {})
    return {"run": run, "queries": len(rows), "published": len(pub), "node_alive": alive,
            "median_cam_t_m": float(np.median([r["cam_t_m"] for r in pub])) if pub else None,
            "median_cam_r_deg": float(np.median([r["cam_r_deg"] for r in pub])) if pub else None,
            "median_localize_ms": float(np.median([r["localize_ms"] for r in pub])) if pub else None,
            "diagnostics": {k: diag.get(k) for k in ("tracker_state", "fixes_accepted", "fixes_rejected",
                                                      "poses_published", "frames_failed")}}


def _fmt(e: Dict[str, Any]) -> str:
    return f"{e['median_t_m']:.3f} m / {e['median_r_deg']:.1f} deg"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="out/train_demo")
    ap.add_argument("--config", default=str(REPO / "config/train_demo.yaml"))
    ap.add_argument("--runs", default="full,nopose,dense,star")
    ap.add_argument("--parallel", type=int, default=2)
    ap.add_argument("--steps", type=int, default=0, help="override optim.steps of every run")
    ap.add_argument("--eval-samples", type=int, default=300)
    ap.add_argument("--skip-train", action="store_true", help="measure already trained runs")
    ap.add_argument("--skip-ddp", action="store_true")
    ap.add_argument("--ddp-steps", type=int, default=3)
    ap.add_argument("--skip-e2e", action="store_true", help="skip the end-to-end reloc-eval check")
    ap.add_argument("--node-dds", default=None, metavar="RUN",
                    help="only: reloc_node over DDS with vggt-fused and RUN's checkpoint on the e2e room")
    ap.add_argument("--e2e-only", default=None, metavar="RUN",
                    help="only the end-to-end reloc-eval check of a trained run (e.g. full)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.node_dds:
        res = _node_dds(args, args.node_dds)
        (out / "node_dds.json").write_text(json.dumps(res, indent=1, default=float))
        print(json.dumps(res, indent=1, default=float))
        return 0
    if args.e2e_only:
        res = _e2e(args, out / args.e2e_only / "model.safetensors")
        (out / "e2e.json").write_text(json.dumps(res, indent=1, default=float))
        print(json.dumps(res, indent=1, default=float))
        return 0
    names = [n for n in args.runs.split(",") if n]
    for n in names:
        if n not in RUNS:
            raise SystemExit(f"unknown run {n!r}; known: {sorted(RUNS)}")
    results: Dict[str, Any] = {"config": args.config, "command": " ".join(sys.argv), "runs": {}}
    cfg0 = load_train_config(args.config, [f"data.eval_samples={args.eval_samples}"])
    # Render once here (the runs load the cache).
    t0 = time.time()
    train_sets, eval_sets = frame_sets(cfg0)
    results["render_s"] = time.time() - t0
    if not args.skip_train:
        results["train_wall_s"] = _train_runs(args, names)
    specs = Sampler(eval_sets, cfg0.data, 12345).fixed_specs(args.eval_samples, 12345)
    results["eval_samples"] = len(specs)
    results["train_queries"] = len(Sampler(train_sets, cfg0.data, 0))
    for n in names:
        net, meta = load_trained_model(out / n)
        cfg = load_train_config(args.config, RUNS[n] + [f"data.eval_samples={args.eval_samples}"])
        summ = json.loads((out / n / "summary.json").read_text())
        r: Dict[str, Any] = {"steps": meta["step"], "train_seconds": summ["train_seconds"],
                             "parameters": summ["parameters"], "mask": meta["mask"], "pose_tokens": meta["pose_tokens"]}
        r["eval"] = evaluate(net, cfg, eval_sets, specs, torch.device("cpu"))
        r["eval_other_masks"] = {}
        for m in ("dense", "star", "cached"):
            if m != meta["mask"]:
                e = evaluate(net, cfg, eval_sets, specs, torch.device("cpu"), mask=m)
                r["eval_other_masks"][m] = {k: e[k] for k in ("loss", "sim3")}
        r["latency"] = {m: _latency(net, cfg, eval_sets, specs, m) for m in ("dense", "star", "cached")}
        results["runs"][n] = r
        log.info("%s: sim3 %s, nearest kf %s", n, _fmt(r["eval"]["sim3"]), _fmt(r["eval"]["nearest_kf"]))
    if "full" in names:
        net, _ = load_trained_model(out / "full")
        results["onnx_vs_torch"] = _onnx_vs_torch(net, eval_sets, specs[:8], out)
    if not args.skip_ddp:
        results["ddp"] = _ddp_check(args, args.ddp_steps)
    if "full" in names and not args.skip_e2e:
        results["e2e"] = _e2e(args, out / "full" / "model.safetensors")
    (out / "results.json").write_text(json.dumps(results, indent=1, default=float))
    _curves(out, names)
    (out / "results.md").write_text(_markdown(results, names))
    print((out / "results.md").read_text())
    return 0


def _curves(out: Path, names: List[str]) -> None:
    import csv

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 3, figsize=(16, 4.2))
    for n in names:
        rows = list(csv.DictReader((out / n / "curve.csv").open()))
        tr = [(int(r["step"]), float(r["train_loss"])) for r in rows if r["train_loss"]]
        ev = [(int(r["step"]), float(r["eval_loss"]), float(r["eval_t_m"]), float(r["eval_r_deg"]),
               float(r["baseline_t_m"]), float(r["baseline_r_deg"])) for r in rows if r["eval_loss"]]
        if tr:
            s, v = zip(*tr)
            k = max(1, len(v) // 25)
            ax[0].plot(s[k - 1:], np.convolve(v, np.ones(k) / k, mode="valid"), label=f"{n} train")
        if ev:
            e = np.array(ev)
            ax[0].plot(e[:, 0], e[:, 1], "o--", ms=3, label=f"{n} held-out")
            ax[1].plot(e[:, 0], e[:, 2], "o-", ms=3, label=n)
            ax[2].plot(e[:, 0], e[:, 3], "o-", ms=3, label=n)
    if ev:
        ax[1].axhline(e[-1, 4], color="k", ls=":", label="nearest keyframe")
        ax[2].axhline(e[-1, 5], color="k", ls=":", label="nearest keyframe")
    ax[0].set_yscale("log")
    ax[0].set_title("loss (VGGT camera loss)")
    ax[1].set_title("held-out median query centre error (m), Sim(3)")
    ax[2].set_title("held-out median query rotation error (deg), Sim(3)")
    ax[1].set_yscale("log")
    ax[2].set_yscale("log")
    for a in ax:
        a.set_xlabel("step")
        a.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=90)
    plt.close(fig)


def _markdown(res: Dict[str, Any], names: List[str]) -> str:
    L = [f"# reloc-train proof ({res['command']})", "",
         f"held-out samples: {res['eval_samples']} (rooms with seeds disjoint from training); training queries: "
         f"{res['train_queries']}", "",
         "| run | mask | pose tokens | steps | train min | Sim(3) | motion averaging | anchor | nearest keyframe | "
         "oracle keyframe | Sim(3) < 0.25 m & 10 deg | failures |",
         "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for n in names:
        r = res["runs"][n]
        e = r["eval"]
        L.append(f"| {n} | {r['mask']} | {r['pose_tokens']} | {r['steps']} | {r['train_seconds'] / 60:.1f} | "
                 f"{_fmt(e['sim3'])} | {_fmt(e['motion_averaging'])} | {_fmt(e['anchor'])} | {_fmt(e['nearest_kf'])} | "
                 f"{_fmt(e['oracle_kf'])} | {e['sim3']['rate_0.25m_10deg']:.2f} | sim3 {e['sim3']['failures']}, "
                 f"MA {e['motion_averaging']['failures']} |")
    L += ["", "Masks: each trained model evaluated under every mask (Sim(3) decoding), and per-query latency "
          "(torch CPU, 1 thread, median ms over 20 queries, `cached` with a warm keyframe cache; shared machine, "
          "compare within a row):", "",
          "| run (trained with) | dense | star | cached | latency dense / star / cached ms |", "|---|---|---|---|---|"]
    for n in names:
        r = res["runs"][n]
        cells = []
        for m in ("dense", "star", "cached"):
            e = r["eval"]["sim3"] if m == r["mask"] else r["eval_other_masks"][m]["sim3"]
            cells.append(_fmt(e) + (" (trained)" if m == r["mask"] else ""))
        lat = " / ".join(f"{r['latency'][m]['median_ms']:.1f}" for m in ("dense", "star", "cached"))
        L.append(f"| {n} ({r['mask']}) | " + " | ".join(cells) + f" | {lat} |")
    if "onnx_vs_torch" in res:
        L += ["", "ONNX Runtime vs PyTorch (trained `full` checkpoint, max abs difference of the final pose "
              "encodings over held-out samples): " + ", ".join(
                  f"{m} {v['max_abs_diff']:.1e}" for m, v in res["onnx_vs_torch"].items())]
    if "ddp" in res:
        d = res["ddp"]
        if "error" in d:
            L += ["", f"DDP check failed: {d['error']}"]
        else:
            L += ["", f"DDP: `{d['command']}` vs 1 process, global batch {d['global_batch']}, {d['steps']} steps, "
                  f"float64: max |w_2proc - w_1proc| = {d['max_abs_weight_diff']:.2e} (weights moved up to "
                  f"{d['max_abs_weight_change']:.2e}; tolerance {d['tolerance']:.0e}: "
                  f"{'PASS' if d['pass'] else 'FAIL'})"]
    if "e2e" in res:
        e = res["e2e"]
        L += ["", f"End to end on a held-out rendered room (640x480, {e['map_frames']}-keyframe map built with "
              f"`build_map`, {e['queries']} queries, `reloc-eval`, top-k = K, network input "
              f"{e['network_input'][1]}x{e['network_input'][0]}):", "",
              "| estimator | localized | median centre error | median rotation error | wall s |", "|---|---|---|---|---|"]
        for k, v in e.items():
            if isinstance(v, dict) and "median_translation_m" in v:
                L.append(f"| {k} | {v.get('n_localized', '-')}/{v.get('n_queries', '-')} | "
                         f"{v['median_translation_m']:.4f} m | {v['median_rotation_deg']:.2f} deg | "
                         f"{v.get('wall_s', float('nan')):.0f} |")
            elif isinstance(v, dict) and "error" in v:
                L.append(f"| {k} | failed: {v['error'][-200:]} | | | |")
    return "\n".join(L) + "\n"


if __name__ == "__main__":
    sys.exit(main())
