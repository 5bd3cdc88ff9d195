"""``reloc-train``: train Reloc-VGGT (stage 1 / 2) or fine-tune Reloc3r from a YAML config.

    reloc-train --config config/train_demo.yaml [--set KEY=VALUE ...] [--out-dir DIR]
                [--steps N] [--stop-after N] [--check] [--quiet]
    torchrun --nproc_per_node 2 -m reloc_ros.cli.train_cli --config ...   (DDP, gloo on CPU)
    torchrun --nnodes 2 --node_rank R --master_addr HOST --nproc_per_node G \\
             -m reloc_ros.cli.train_cli --config ... --set run.device=cuda   (NCCL)

``--set`` overrides any config key by its dotted name (value parsed as YAML), e.g.
``--set optim.lr=1e-4 --set model.mask=dense``. ``--check`` validates the config and
prints it, without training. ``--stop-after N`` leaves after step N with a checkpoint
(as if interrupted; a later run with ``run.resume: auto`` continues exactly).
Writes under ``run.out_dir``: ``checkpoints/``, ``model.safetensors`` + ``model.json``
(the final network), ``curve.csv`` / ``curve.png``, ``eval.jsonl``, ``summary.json``.

Exit status: 0 = trained (or config valid with --check), 2 = invalid config or arguments.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import List, Optional, Sequence

__all__ = ["main", "build_parser"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="reloc-train", description="Train the fused multi-view regressor (Reloc-VGGT) "
                                "or fine-tune Reloc3r on rendered rooms or posed datasets.")
    p.add_argument("--config", "-c", required=True, help="training YAML (see config/train_demo.yaml)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                   help="override a config key by dotted name (repeatable)")
    p.add_argument("--out-dir", default=None, help="shorthand for --set run.out_dir=DIR")
    p.add_argument("--steps", type=int, default=None, help="shorthand for --set optim.steps=N")
    p.add_argument("--stop-after", type=int, default=None, help="leave after this step (checkpointed)")
    p.add_argument("--check", action="store_true", help="validate and print the config, then exit")
    p.add_argument("--quiet", action="store_true", help="no progress bar, warnings only")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=logging.WARNING if (args.quiet or rank) else logging.INFO,
                        format=f"%(asctime)s [rank {rank}] %(name)s: %(message)s")
    from reloc_ros.training.config import load_train_config

    overrides: List[str] = list(args.overrides)
    if args.out_dir:
        overrides.append(f"run.out_dir={args.out_dir}")
    if args.steps is not None:
        overrides.append(f"optim.steps={args.steps}")
    if args.quiet:
        overrides.append("run.progress=false")
    try:
        cfg = load_train_config(args.config, overrides)
    except ValueError as e:
        print(f"reloc-train: invalid configuration: {e}", file=sys.stderr)
        return 2
    if args.check:
        print(json.dumps(cfg.to_dict(), indent=1))
        return 0
    from reloc_ros.training.trainer import train

    summary = train(cfg, stop_after=args.stop_after)
    if rank == 0:
        ev = summary.get("eval", {})
        brief = {k: ev[k] for k in ("loss", "sim3", "nearest_kf", "pair") if k in ev}
        print(json.dumps({"step": summary["step"], "train_seconds": round(summary["train_seconds"], 1),
                          "out_dir": cfg.run.out_dir, "eval": brief}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
