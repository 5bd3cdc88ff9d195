"""The ``reloc-train`` training loop: DDP, AMP, checkpoints with exact resume, evaluation.

``train(config)`` runs in one process or under ``torchrun`` (one process per rank;
``WORLD_SIZE`` / ``RANK`` / ``LOCAL_RANK`` from the environment; NCCL on CUDA, gloo on
CPU; several nodes work as torchrun sets them up). Each optimizer step consumes one
global batch of ``optim.batch_size`` samples split evenly over the ranks; a sample is a
pure function of (seed, step, slot), so 1 process and N processes see the same data
and, with DistributedDataParallel averaging the gradients, reach the same weights up to
the summation order of the all-reduce.

Checkpoints (``<out_dir>/checkpoints/step_XXXXXXX/``):
  ``model.safetensors`` (the network's state dict, loadable with the model builder and
  a strict ``load_state_dict``), ``model.json`` (kind, architecture, tokenizer width,
  mask, image size), ``train_state.pt`` (optimizer, grad scaler, step, RNG states; plain
  tensors and containers, read with ``torch.load(weights_only=True)``).
  ``checkpoints/last.txt`` names the newest. The final model is also written to
  ``<out_dir>/model.safetensors`` + ``model.json``.
Resume continues from the saved step with the same optimizer state and sample stream,
so an interrupted run ends with the same weights as an uninterrupted one (bit for bit
on the same machine and thread count; tested).
"""
from __future__ import annotations

import csv
import json
import logging
import math
import os
import random
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
from torch import nn

from reloc_ros.training.config import TrainConfig
from reloc_ros.training.data import Batch, FrameSet, Sampler, SampleSpec, collate, dataset_frame_set, render_frame_sets
from reloc_ros.training.losses import camera_encoding_loss, relative_pose_loss

log = logging.getLogger("reloc_ros.training")

__all__ = ["DistInfo", "build_model", "load_trained_model", "evaluate", "decode_query_poses", "train",
           "frame_sets", "pose_errors"]


# ----------------------------------------------------------------------------- distributed


@dataclass
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0


def _setup_distributed(cfg: TrainConfig) -> Tuple[DistInfo, bool]:
    """Process group from torchrun's environment (no-op for a single process).
    Returns (info, whether this call created the group)."""
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    dev = torch.device("cpu")
    if cfg.run.device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise RuntimeError(f"run.device {cfg.run.device!r} but CUDA is not available")
        idx = local if cfg.run.device == "cuda" else int(cfg.run.device.split(":")[1])
        torch.cuda.set_device(idx)
        dev = torch.device("cuda", idx)
    created = False
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
        created = True
    if world > 1 and cfg.optim.batch_size % world:
        raise ValueError(f"optim.batch_size {cfg.optim.batch_size} must be divisible by the {world} processes")
    return DistInfo(rank, world, local, dev), created


def _barrier(info: DistInfo) -> None:
    if info.world > 1:
        import torch.distributed as dist

        dist.barrier()


# ----------------------------------------------------------------------------- model


def build_model(cfg: TrainConfig) -> nn.Module:
    """The network of ``cfg.model`` (random init seeded by run.seed, or init_weights),
    in train mode, float32 on the CPU."""
    torch.manual_seed(cfg.run.seed)
    m = cfg.model
    if m.kind == "reloc_vggt":
        from reloc_ros.models.reloc_vggt import build_reloc_vggt
        from reloc_ros.models.vggt import load_vggt_weights

        net = build_reloc_vggt(m.arch, tokenizer_hidden=m.tokenizer_hidden)
        if m.init_weights:
            load_vggt_weights(net, m.init_weights, optional_prefixes=("pose_tokenizer.",))
    else:
        from reloc_ros.models.checkpoints import load_checkpoint
        from reloc_ros.models.reloc3r import build_reloc3r

        net = build_reloc3r(m.arch)
        if m.init_weights:
            load_checkpoint(net, m.init_weights)
    return net.train()


def _set_trainable(net: nn.Module, cfg: TrainConfig) -> List[str]:
    """requires_grad per the stage; returns the frozen parameter-name prefixes."""
    m = cfg.model
    frozen: List[str] = []
    for p in net.parameters():
        p.requires_grad_(True)
    if m.kind == "reloc_vggt":
        if not m.pose_tokens:
            frozen.append("pose_tokenizer.")  # unused: keep its exact zeros
        if m.stage == 1:
            frozen += ["aggregator."] + ([] if m.train_camera_head_in_stage1 else ["camera_head."])
        frozen.append("aggregator.patch_embed.mask_token")  # never used by VGGT
    else:
        frozen += ["patch_embed.", "enc_blocks."]  # Reloc3r's --freeze_encoder (enc_norm stays trainable)
    for n, p in net.named_parameters():
        if n.startswith(tuple(frozen)) or p.numel() == 0:  # empty: e.g. DINOv2 without registers
            p.requires_grad_(False)
    return frozen


class _StepModule(nn.Module):
    """What DDP wraps: one forward of a batch (so DDP's hooks see every used parameter)."""

    def __init__(self, net: nn.Module, cfg: TrainConfig) -> None:
        super().__init__()
        self.net = net
        self.kind = cfg.model.kind
        self.mask = cfg.model.mask
        self.pose_tokens = cfg.model.pose_tokens

    def forward(self, query: torch.Tensor, keyframes: torch.Tensor, kf_pose_enc: torch.Tensor):
        if self.kind == "reloc_vggt":
            out = self.net.forward_batched(query, keyframes, kf_pose_enc if self.pose_tokens else None, mask=self.mask)
            return torch.stack(out["pose_enc_list"], 0)  # [iters, B, S, 9]
        # Reloc3r: view 1 = reference keyframe, view 2 = query; images in [-1, 1].
        B, _, H, W = query.shape
        shape = torch.tensor([[H, W]] * B, device=query.device)
        v1 = {"img": keyframes[:, 0] * 2 - 1, "true_shape": shape}
        v2 = {"img": query * 2 - 1, "true_shape": shape}
        p1, p2 = self.net(v1, v2)
        return torch.stack((p1["pose"], p2["pose"]), 0)  # [2, B, 4, 4]: 1->2, 2->1


def _model_meta(cfg: TrainConfig, net: nn.Module, hw: Tuple[int, int], step: int) -> Dict[str, Any]:
    return {"kind": cfg.model.kind, "arch": net.config.to_dict(), "tokenizer_hidden": cfg.model.tokenizer_hidden,
            "pose_tokens": cfg.model.pose_tokens, "mask": cfg.model.mask, "image_hw": list(hw), "step": int(step),
            "format": "reloc_ros.training/1"}


def load_trained_model(path: str | Path, device: str = "cpu") -> Tuple[nn.Module, Dict[str, Any]]:
    """A network trained by ``reloc-train``: ``path`` is a checkpoint directory (or its
    ``model.safetensors``) with ``model.json`` beside it. Built with the model builder
    and loaded strictly (``reloc_ros.models.checkpoints.load_checkpoint``). Eval mode."""
    from reloc_ros.models.checkpoints import load_checkpoint

    p = Path(path)
    folder = p if p.is_dir() else p.parent
    weights = folder / "model.safetensors" if p.is_dir() else p
    meta_path = folder / "model.json"
    if not meta_path.is_file():
        raise FileNotFoundError(f"{meta_path} missing (a reloc-train checkpoint has model.json beside its weights)")
    meta = json.loads(meta_path.read_text())
    from reloc_ros.models import build

    if meta.get("kind") == "reloc_vggt":
        net = build("reloc_vggt", dict(meta["arch"], tokenizer_hidden=int(meta["tokenizer_hidden"])))
    elif meta.get("kind") == "reloc3r":
        net = build("reloc3r", meta["arch"])
    else:
        raise ValueError(f"{meta_path}: unknown model kind {meta.get('kind')!r}")
    load_checkpoint(net, weights)
    return net.to(device).eval(), meta


# ----------------------------------------------------------------------------- data


def frame_sets(cfg: TrainConfig, info: Optional[DistInfo] = None) -> Tuple[List[FrameSet], List[FrameSet]]:
    """(training, held-out) frame sets of ``cfg.data`` (rank 0 renders, the others load)."""
    info = info or DistInfo()
    d = cfg.data
    if d.source == "render":
        cache = Path(d.render.cache_dir) if d.render.cache_dir else Path(cfg.run.out_dir).parent / "render_cache"
        sets = {}
        if info.main:
            for split in ("train", "eval"):
                sets[split] = render_frame_sets(d.render, split, cache, render=True, progress=True)
        _barrier(info)
        if not info.main:
            for split in ("train", "eval"):
                sets[split] = render_frame_sets(d.render, split, cache, render=False)
        return sets["train"], sets["eval"]
    ds = d.dataset
    if not ds.eval_frames:
        raise ValueError("data.dataset.eval_frames is required: held-out frames for evaluation")
    return ([dataset_frame_set(ds, ds.frames, f"{ds.format}-train")],
            [dataset_frame_set(ds, ds.eval_frames, f"{ds.format}-eval")])


# ----------------------------------------------------------------------------- evaluation


def _rot_deg(Ra: np.ndarray, Rb: np.ndarray) -> float:
    c = np.clip((np.trace(Ra.T @ Rb) - 1) / 2, -1.0, 1.0)
    return float(np.degrees(np.arccos(c)))


def pose_errors(T_est: Optional[np.ndarray], T_gt: np.ndarray) -> Tuple[float, float]:
    """(centre error m, rotation error deg); (inf, inf) without an estimate."""
    if T_est is None or not np.all(np.isfinite(T_est)):
        return math.inf, math.inf
    return float(np.linalg.norm(T_est[:3, 3] - T_gt[:3, 3])), _rot_deg(T_est[:3, :3], T_gt[:3, :3])


def decode_query_poses(pred_enc: np.ndarray | torch.Tensor, T_world_kf: np.ndarray, hw: Tuple[int, int],
                       scale: float) -> Dict[str, Optional[np.ndarray]]:
    """Query poses T_world_cam [4, 4] (or None) from one sample's predicted encodings
    [K+1, 9] by each decoder of the product: 'sim3' (``sim3_localize``),
    'motion_averaging' (``robust_motion_averaging`` of the predicted query->keyframe
    directions) and 'anchor' (reference keyframe pose composed with the predicted
    reference->query pose at the known normalisation ``scale`` in metres)."""
    from reloc_ros.averaging import robust_motion_averaging
    from reloc_ros.models.reloc_vggt import predicted_T_ref_cam, relative_pairs, sim3_localize

    enc = torch.as_tensor(np.asarray(pred_enc, dtype=np.float64))
    T_ref_cam = predicted_T_ref_cam(enc, hw)
    out: Dict[str, Optional[np.ndarray]] = {"sim3": None, "motion_averaging": None, "anchor": None}
    if not np.all(np.isfinite(T_ref_cam)):
        return out
    out["sim3"] = sim3_localize(T_world_kf, T_ref_cam).T_world_cam
    try:
        out["motion_averaging"] = robust_motion_averaging(T_world_kf, relative_pairs(T_ref_cam)).T_world_cam
    except Exception as e:  # a degenerate configuration is a failure of this decoder, not of the run
        log.debug("motion averaging failed: %s", e)
    T = T_ref_cam[-1].copy()
    T[:3, 3] *= scale
    out["anchor"] = T_world_kf[0] @ T
    return out


def _median(x: List[float]) -> float:
    return float(np.median(np.asarray(x))) if x else math.nan


@torch.no_grad()
def evaluate(net: nn.Module, cfg: TrainConfig, sets: List[FrameSet], specs: List[SampleSpec], device: torch.device,
             dtype: torch.dtype = torch.float32, mask: Optional[str] = None, pose_tokens: Optional[bool] = None,
             per_sample: bool = False) -> Dict[str, Any]:
    """Held-out loss and localization errors (medians) of the query.

    reloc_vggt: decoders 'sim3', 'motion_averaging', 'anchor' vs the baselines
    'nearest_kf' (the reference = most covisible keyframe's pose, what retrieval alone
    gives) and 'oracle_kf' (the keyframe closest to the true query centre).
    reloc3r: rotation and translation-direction errors of the (reference, query) pair.
    """
    was = net.training
    net.eval()
    mask = mask or cfg.model.mask
    pose_tokens = cfg.model.pose_tokens if pose_tokens is None else pose_tokens
    step = _StepModule(net, cfg)
    step.mask, step.pose_tokens = mask, pose_tokens
    bs = max(1, cfg.optim.batch_size)
    losses: List[float] = []
    errs: Dict[str, List[Tuple[float, float]]] = {}
    rows: List[Dict[str, Any]] = []
    for i in range(0, len(specs), bs):
        b = collate(sets, specs[i:i + bs]).to(device, dtype)
        out = step(b.query, b.keyframes, b.kf_pose_enc)
        if cfg.model.kind == "reloc_vggt":
            loss, _ = camera_encoding_loss(list(out.float() if dtype != torch.float64 else out), b.gt_enc, cfg.loss)
            losses.append(float(loss) * len(b.specs))
            hw = sets[0].hw
            pred = out[-1].double().cpu().numpy()
            for n in range(len(b.specs)):
                Tq = b.T_world_query[n]
                Tk = b.T_world_kf[n]
                est = decode_query_poses(pred[n], Tk, hw, float(b.scale[n]))
                est["nearest_kf"] = Tk[0]
                est["oracle_kf"] = Tk[int(np.argmin(np.linalg.norm(Tk[:, :3, 3] - Tq[:3, 3], axis=1)))]
                row = {}
                for k, T in est.items():
                    e = pose_errors(T, Tq)
                    errs.setdefault(k, []).append(e)
                    row[k] = e
                rows.append(row)
        else:
            gt21 = torch.as_tensor(np.linalg.inv(b.T_world_kf[:, 0]) @ b.T_world_query, dtype=out.dtype)
            gt12 = torch.linalg.inv(gt21)
            l1, _ = relative_pose_loss(out[0], gt12.to(out.device), cfg.loss)
            l2, lg = relative_pose_loss(out[1], gt21.to(out.device), cfg.loss)
            losses.append(float(l1 + l2) * len(b.specs))
            from reloc_ros.training.losses import direction_angle, geodesic_angle

            ra = torch.rad2deg(geodesic_angle(out[1][:, :3, :3].double().cpu(), gt21[:, :3, :3].double()))
            ta = torch.rad2deg(direction_angle(out[1][:, :3, 3].double().cpu(), gt21[:, :3, 3].double()))
            errs.setdefault("pair", []).extend(zip(ta.tolist(), ra.tolist()))
    net.train(was)
    res: Dict[str, Any] = {"loss": sum(losses) / max(1, len(specs)), "samples": len(specs)}
    for k, e in errs.items():
        t = [a for a, _ in e]
        r = [b for _, b in e]
        if cfg.model.kind == "reloc_vggt":
            res[k] = {"median_t_m": _median(t), "median_r_deg": _median(r),
                      "failures": int(sum(1 for x in t if not math.isfinite(x))),
                      "rate_0.25m_10deg": float(np.mean([(a < 0.25 and b < 10) for a, b in e]))}
        else:
            res[k] = {"median_dir_deg": _median(t), "median_r_deg": _median(r)}
    if per_sample:
        res["rows"] = rows
    return res


# ----------------------------------------------------------------------------- checkpoints


def _rng_state() -> Dict[str, Any]:
    st = np.random.get_state()
    py = random.getstate()
    return {"torch": torch.get_rng_state(), "numpy_keys": torch.from_numpy(st[1].astype(np.int64)),
            "numpy_pos": int(st[2]), "numpy_has_gauss": int(st[3]), "numpy_gauss": float(st[4]),
            "python": torch.tensor(list(py[1]), dtype=torch.int64), "python_version": int(py[0]),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def _set_rng_state(st: Dict[str, Any]) -> None:
    torch.set_rng_state(st["torch"])
    np.random.set_state(("MT19937", st["numpy_keys"].numpy().astype(np.uint32), st["numpy_pos"],
                         st["numpy_has_gauss"], st["numpy_gauss"]))
    random.setstate((st["python_version"], tuple(int(x) for x in st["python"].tolist()), None))
    if st.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def _save_checkpoint(out: Path, net: nn.Module, opt, scaler, step: int, meta: Dict[str, Any], keep: int) -> Path:
    from reloc_ros.models.checkpoints import save_safetensors

    ck = out / "checkpoints"
    d = ck / f"step_{step:07d}"
    tmp = ck / f".tmp_step_{step:07d}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    save_safetensors(net.state_dict(), tmp / "model.safetensors", {"format": "reloc_ros.training/1"})
    (tmp / "model.json").write_text(json.dumps(meta, indent=1))
    torch.save({"step": int(step), "optimizer": opt.state_dict(),
                "scaler": scaler.state_dict() if scaler is not None else {}, "rng": _rng_state()},
               tmp / "train_state.pt")
    if d.exists():
        shutil.rmtree(d)
    tmp.replace(d)
    (ck / "last.txt.tmp").write_text(d.name)
    (ck / "last.txt.tmp").replace(ck / "last.txt")
    olds = sorted(p for p in ck.glob("step_*") if p.is_dir())
    for p in olds[:-keep] if keep > 0 else []:
        shutil.rmtree(p, ignore_errors=True)
    return d


def _resume_dir(cfg: TrainConfig) -> Optional[Path]:
    if cfg.run.resume == "never":
        return None
    if cfg.run.resume != "auto":
        return Path(cfg.run.resume)
    last = Path(cfg.run.out_dir) / "checkpoints" / "last.txt"
    if last.is_file():
        d = last.parent / last.read_text().strip()
        if d.is_dir():
            return d
    return None


# ----------------------------------------------------------------------------- curve and progress


class _Curve:
    """``curve.csv`` (one row per logged step / evaluation) and ``curve.png``."""

    FIELDS = ["step", "time_s", "lr", "train_loss", "eval_loss", "eval_t_m", "eval_r_deg", "baseline_t_m",
              "baseline_r_deg"]

    def __init__(self, out: Path, resume_step: int) -> None:
        self.path = out / "curve.csv"
        rows = []
        if resume_step > 0 and self.path.is_file():
            with self.path.open() as f:
                rows = [r for r in csv.DictReader(f) if int(r["step"]) <= resume_step]
        with self.path.open("w", newline="") as f:
            w = csv.DictWriter(f, self.FIELDS)
            w.writeheader()
            w.writerows(rows)

    def add(self, **row: Any) -> None:
        with self.path.open("a", newline="") as f:
            csv.DictWriter(f, self.FIELDS).writerow({k: row.get(k, "") for k in self.FIELDS})

    def plot(self) -> Optional[Path]:
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            return None
        with self.path.open() as f:
            rows = list(csv.DictReader(f))

        def col(name):
            pts = [(int(r["step"]), float(r[name])) for r in rows if r.get(name) not in ("", None)]
            return [p[0] for p in pts], [p[1] for p in pts]

        fig, ax = plt.subplots(1, 3, figsize=(15, 4))
        s, v = col("train_loss")
        if v:
            ax[0].plot(s, v, lw=0.6, alpha=0.5, label="train (per log step)")
            k = max(1, len(v) // 30)
            sm = np.convolve(v, np.ones(k) / k, mode="valid")
            ax[0].plot(s[k - 1:], sm, label=f"train (mean of {k})")
        s, v = col("eval_loss")
        ax[0].plot(s, v, "o-", label="held-out")
        ax[0].set_yscale("log")
        ax[0].set_xlabel("step")
        ax[0].set_title("loss")
        ax[0].legend()
        for i, (m, b, unit) in enumerate((("eval_t_m", "baseline_t_m", "m"), ("eval_r_deg", "baseline_r_deg", "deg"))):
            s, v = col(m)
            ax[i + 1].plot(s, v, "o-", label="model (Sim(3) decoding)")
            s, v = col(b)
            ax[i + 1].plot(s, v, "--", label="nearest keyframe")
            ax[i + 1].set_xlabel("step")
            ax[i + 1].set_title(f"held-out median query error ({unit})")
            ax[i + 1].legend()
        fig.tight_layout()
        png = self.path.with_suffix(".png")
        fig.savefig(png, dpi=90)
        plt.close(fig)
        return png


class _Progress:
    """One-line progress bar on stderr when it is a terminal, a log line per
    ``every`` steps otherwise."""

    def __init__(self, total: int, start: int, enabled: bool, every: int) -> None:
        self.total, self.start, self.enabled, self.every = total, start, enabled, every
        self.t0 = time.perf_counter()
        self.tty = sys.stderr.isatty()

    def update(self, step: int, text: str) -> None:
        if not self.enabled:
            return
        done = step - self.start
        el = time.perf_counter() - self.t0
        rate = done / el if el > 0 else 0.0
        eta = (self.total - step) / rate if rate > 0 else math.inf
        frac = step / self.total
        bar = "#" * int(30 * frac) + "." * (30 - int(30 * frac))
        line = f"[{bar}] {step}/{self.total} {text} {rate:.2f} it/s eta {eta / 60:.1f} min"
        if self.tty:
            sys.stderr.write("\r" + line[:200])
            sys.stderr.flush()
        elif step % self.every == 0 or step == self.total:
            sys.stderr.write(line + "\n")
            sys.stderr.flush()

    def close(self) -> None:
        if self.enabled and self.tty:
            sys.stderr.write("\n")


# ----------------------------------------------------------------------------- training


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate of optimizer step ``step`` (0-based): linear warm-up, cosine decay."""
    o = cfg.optim
    if step < o.warmup_steps:
        return o.lr * (step + 1) / o.warmup_steps
    p = (step - o.warmup_steps) / max(1, o.steps - o.warmup_steps)
    return o.lr * (o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, p))))


def _batch_loss(out: torch.Tensor, b: Batch, cfg: TrainConfig) -> Tuple[torch.Tensor, Dict[str, float]]:
    if cfg.model.kind == "reloc_vggt":
        return camera_encoding_loss(list(out), b.gt_enc, cfg.loss)
    gt21 = torch.as_tensor(np.linalg.inv(b.T_world_kf[:, 0]) @ b.T_world_query, dtype=out.dtype, device=out.device)
    l1, _ = relative_pose_loss(out[0], torch.linalg.inv(gt21), cfg.loss)
    l2, logs = relative_pose_loss(out[1], gt21, cfg.loss)
    return l1 + l2, logs


def train(cfg: TrainConfig, stop_after: Optional[int] = None, sets: Optional[Tuple[List[FrameSet], List[FrameSet]]] = None
          ) -> Dict[str, Any]:
    """Train per ``cfg``; returns a summary dict (rank 0: with the last evaluation).

    stop_after: leave after this optimizer step (a checkpoint is written), as if
    interrupted; the learning-rate schedule still follows ``optim.steps``.
    sets: (training, held-out) frame sets, instead of building them from ``cfg.data``.
    """
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    info, created = _setup_distributed(cfg)
    run = cfg.run
    if run.threads > 0:
        torch.set_num_threads(run.threads)
    if run.deterministic:
        if info.device.type == "cuda":
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=info.device.type == "cuda")
    out = Path(run.out_dir)
    if info.main:
        out.mkdir(parents=True, exist_ok=True)
        import yaml

        (out / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    dtype = torch.float64 if run.dtype == "float64" else torch.float32
    train_sets, eval_sets = sets if sets is not None else frame_sets(cfg, info)
    sampler = Sampler(train_sets, cfg.data, run.seed)
    eval_specs = Sampler(eval_sets, cfg.data, run.seed).fixed_specs(cfg.data.eval_samples, run.seed)
    hw = train_sets[0].hw

    net = build_model(cfg).to(info.device, dtype)
    frozen = _set_trainable(net, cfg)
    params = [p for p in net.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.optim.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.optim.lr,
                            betas=tuple(cfg.optim.betas))
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(run.amp)
    scaler = torch.amp.GradScaler("cuda") if run.amp == "fp16" else None
    start = 0
    rd = _resume_dir(cfg)
    if rd is not None:
        from reloc_ros.models.checkpoints import load_checkpoint

        load_checkpoint(net, rd / "model.safetensors")
        st = torch.load(rd / "train_state.pt", map_location="cpu", weights_only=True)
        opt.load_state_dict(st["optimizer"])
        if scaler is not None and st.get("scaler"):
            scaler.load_state_dict(st["scaler"])
        _set_rng_state(st["rng"])
        start = int(st["step"])
        if info.main:
            log.info("resumed from %s at step %d", rd, start)
    step_mod = _StepModule(net, cfg)
    model = step_mod
    if info.world > 1:
        model = DDP(step_mod, device_ids=[info.device.index] if info.device.type == "cuda" else None,
                    find_unused_parameters=False)
    curve = _Curve(out, start) if info.main else None
    prog = _Progress(cfg.optim.steps, start, run.progress and info.main, run.log_every)
    local = cfg.optim.batch_size // info.world
    slots = range(info.rank * local, (info.rank + 1) * local)
    n_params = sum(p.numel() for p in net.parameters())
    n_train = sum(p.numel() for p in params)
    if info.main:
        log.info("model %s: %d parameters (%d trained; frozen: %s); %d training queries in %d scenes, %d held-out "
                 "samples; %d process(es), global batch %d", cfg.model.kind, n_params, n_train, frozen or "none",
                 len(sampler), len(train_sets), len(eval_specs), info.world, cfg.optim.batch_size)
    t0 = time.perf_counter()
    last_eval: Dict[str, Any] = {}
    step = start
    end = cfg.optim.steps if stop_after is None else min(cfg.optim.steps, stop_after)
    loss_acc, n_acc = 0.0, 0

    def do_eval(s: int) -> Dict[str, Any]:
        res = evaluate(net, cfg, eval_sets, eval_specs, info.device, dtype)
        if curve is not None:
            row = {"step": s, "time_s": round(time.perf_counter() - t0, 2), "eval_loss": res["loss"]}
            if cfg.model.kind == "reloc_vggt":
                row.update(eval_t_m=res["sim3"]["median_t_m"], eval_r_deg=res["sim3"]["median_r_deg"],
                           baseline_t_m=res["nearest_kf"]["median_t_m"], baseline_r_deg=res["nearest_kf"]["median_r_deg"])
            else:
                row.update(eval_t_m=res["pair"]["median_dir_deg"], eval_r_deg=res["pair"]["median_r_deg"])
            curve.add(**row)
            with (out / "eval.jsonl").open("a") as f:
                f.write(json.dumps({"step": s, **res}) + "\n")
        return res

    if start == 0 and info.main and run.eval_every:
        last_eval = do_eval(0)
    _barrier(info)
    while step < end:
        lr = lr_at(step, cfg)
        for g in opt.param_groups:
            g["lr"] = lr
        specs = [sampler.spec(step, s) for s in slots]
        b = collate(train_sets, specs, cfg.data.augment, [[run.seed, step, s, 1] for s in slots]).to(info.device, dtype)
        with torch.autocast(device_type=info.device.type, dtype=amp_dtype or torch.bfloat16, enabled=amp_dtype is not None):
            pred = model(b.query, b.keyframes, b.kf_pose_enc)
        loss, logs = _batch_loss(pred.to(dtype), b, cfg)
        opt.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
        else:
            loss.backward()
        if cfg.optim.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.optim.grad_clip)
        if scaler is not None:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
        step += 1
        lv = float(loss.detach())
        if info.world > 1:
            t = torch.tensor([lv], dtype=torch.float64, device=info.device)
            dist.all_reduce(t)
            lv = float(t) / info.world
        if not math.isfinite(lv):
            raise FloatingPointError(f"loss is {lv} at step {step}; lower optim.lr or check the data")
        loss_acc += lv
        n_acc += 1
        prog.update(step, f"loss {lv:.4f} lr {lr:.2e}")
        if curve is not None and (step % run.log_every == 0 or step == end):
            curve.add(step=step, time_s=round(time.perf_counter() - t0, 2), lr=lr, train_loss=loss_acc / n_acc)
            loss_acc, n_acc = 0.0, 0
        timeout = cfg.optim.max_minutes > 0 and (time.perf_counter() - t0) > 60 * cfg.optim.max_minutes
        if info.world > 1:
            t = torch.tensor([int(timeout)], device=info.device)
            dist.all_reduce(t)
            timeout = bool(t.item())
        final = step == end or timeout
        if run.ckpt_every and (step % run.ckpt_every == 0) or final:
            if info.main:
                _save_checkpoint(out, net, opt, scaler, step, _model_meta(cfg, net, hw, step), run.keep_checkpoints)
            _barrier(info)
        if info.main and ((run.eval_every and step % run.eval_every == 0) or final):
            last_eval = do_eval(step)
            log.info("step %d eval: %s", step, json.dumps({k: v for k, v in last_eval.items() if k != "rows"}))
        _barrier(info)
        if timeout:
            log.warning("optim.max_minutes reached at step %d", step)
            break
    prog.close()
    summary: Dict[str, Any] = {"step": step, "train_seconds": time.perf_counter() - t0, "parameters": n_params,
                               "trained_parameters": n_train, "world_size": info.world, "eval": last_eval}
    if info.main:
        from reloc_ros.models.checkpoints import save_safetensors

        if step == cfg.optim.steps or (stop_after is None):
            save_safetensors(net.state_dict(), out / "model.safetensors", {"format": "reloc_ros.training/1"})
            (out / "model.json").write_text(json.dumps(_model_meta(cfg, net, hw, step), indent=1))
        if curve is not None:
            curve.plot()
        (out / "summary.json").write_text(json.dumps(summary, indent=1, default=float))
    summary["net"] = net
    if created:
        dist.destroy_process_group()
    return summary
