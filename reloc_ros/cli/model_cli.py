"""``reloc-model``: check an official checkpoint against our architectures, convert it.

    reloc-model inspect CHECKPOINT [--arch reloc3r|vggt] [--img-size 224|512] [--config JSON]
    reloc-model convert CHECKPOINT [-o OUT.safetensors] [--arch ...] [--img-size ...] [--config JSON]

``inspect`` reads the file without executing pickled code, normalises its layout (flat
state dict, ``{'model': ...}`` with DUSt3R-style names, ``module.`` prefixes) and
compares every name and shape with the architecture built on the 'meta' device (no
memory); ``--config`` (a JSON object or a .json file) selects another size of the
same architecture, e.g. a fixture's ``config``. ``convert`` does the same and, when everything matches, writes a
safetensors copy holding exactly the architecture's tensors under their final names
(so it loads with ``strict=True``), with metadata (arch, source file, content hash).
No weights are ever downloaded.

Exit status: 0 = keys and shapes match (and the copy was written), 1 = mismatch,
2 = unreadable file or bad arguments.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

__all__ = ["main", "inspect_checkpoint", "convert_checkpoint"]


def _arch(arch: str, img_size: int, config: Optional[dict] = None) -> Tuple[Dict[str, Tuple[int, ...]], Tuple[str, ...]]:
    """({name: shape} of the architecture, file prefixes it skips on purpose)."""
    from reloc_ros.models.checkpoints import expected_shapes

    if arch == "reloc3r":
        from reloc_ros.models.reloc3r import build_reloc3r

        cfg = dict(config or {})
        cfg.setdefault("img_size", img_size)
        return expected_shapes(build_reloc3r(cfg, device="meta")), ()
    if arch == "vggt":
        from reloc_ros.models.vggt import VGGT_SKIPPED_HEADS, build_vggt

        net = build_vggt(dict(config or {}), device="meta")
        return expected_shapes(net), tuple(VGGT_SKIPPED_HEADS)
    raise ValueError(f"unknown --arch {arch!r}")


def _parse_config(text: Optional[str]) -> Optional[dict]:
    if not text:
        return None
    src = Path(text).read_text() if text.strip().endswith(".json") and Path(text).is_file() else text
    try:
        cfg = json.loads(src)
    except json.JSONDecodeError as e:
        raise ValueError(f"--config is neither a JSON object nor a .json file: {e}") from e
    if not isinstance(cfg, dict):
        raise ValueError("--config must be a JSON object")
    return cfg


def inspect_checkpoint(path: str, arch: str = "reloc3r", img_size: int = 512, config: Optional[dict] = None):
    """(KeyCheck, normalised state dict, {name: shape} expected) of a checkpoint vs an architecture."""
    from reloc_ros.models.checkpoints import check_state_dict, normalize_layout, read_state_dict

    expected, skip = _arch(arch, img_size, config)
    raw = read_state_dict(path)
    state, layout, remapped = normalize_layout(raw, expected)
    return check_state_dict(state, expected, skip, layout, remapped), state, expected


def convert_checkpoint(path: str, out: Optional[str] = None, arch: str = "reloc3r", img_size: int = 512,
                       config: Optional[dict] = None):
    """Check ``path`` and write the safetensors copy; returns (KeyCheck, output path or None)."""
    from reloc_ros.models.checkpoints import save_safetensors, state_dict_hash

    chk, state, expected = inspect_checkpoint(path, arch, img_size, config)
    if not chk.ok:
        return chk, None
    keep = {k: state[k] for k in expected}
    dst = Path(out) if out else Path(path).with_name(Path(path).stem + ".safetensors")
    if dst.resolve() == Path(path).resolve():
        raise ValueError(f"output {dst} would overwrite the input; pass -o")
    meta = {
        "arch": arch,
        "img_size": str(img_size),
        "source": Path(path).name,
        "layout": chk.layout,
        "weights_hash": state_dict_hash(keep),
        "writer": "reloc-model convert",
    }
    return chk, save_safetensors(keep, dst, metadata=meta)


def _dtype_summary(state, names: Sequence[str]) -> str:
    counts: Dict[str, int] = {}
    for k in names:
        if k in state:
            counts[str(state[k].dtype).replace("torch.", "")] = counts.get(str(state[k].dtype).replace("torch.", ""), 0) + 1
    return ", ".join(f"{d}: {n}" for d, n in sorted(counts.items()))


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="reloc-model", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name, help_ in (("inspect", "check names and shapes"), ("convert", "check, then write a safetensors copy")):
        p = sub.add_parser(name, help=help_)
        p.add_argument("checkpoint", help=".pth / .pt / .bin / .safetensors file")
        p.add_argument("--arch", choices=("reloc3r", "vggt"), default="reloc3r")
        p.add_argument("--img-size", type=int, choices=(224, 512), default=512, help="Reloc3r variant (224 or 512)")
        p.add_argument("--config", help="architecture sizes as a JSON object or .json file (default: published)")
        p.add_argument("--json", action="store_true", help="print the result as JSON")
        if name == "convert":
            p.add_argument("-o", "--output", help="output .safetensors (default: next to the input)")
    args = ap.parse_args(argv)

    from reloc_ros.types import RelocError

    try:
        config = _parse_config(args.config)
        if args.cmd == "inspect":
            chk, state, expected = inspect_checkpoint(args.checkpoint, args.arch, args.img_size, config)
            out = None
        else:
            chk, out = convert_checkpoint(args.checkpoint, args.output, args.arch, args.img_size, config)
            state, expected = None, None
    except (RelocError, ValueError, OSError) as e:
        print(f"reloc-model: error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({
            "ok": chk.ok, "layout": chk.layout, "tensors": chk.num_tensors, "elements": chk.num_elements,
            "missing": chk.missing, "unexpected": chk.unexpected,
            "mismatched": [[n, list(a), list(b)] for n, a, b in chk.mismatched],
            "ignored": len(chk.ignored), "remapped": chk.remapped, "output": str(out) if out else None,
        }, indent=1))
    else:
        print(f"{args.checkpoint} vs {args.arch}" + (f"-{args.img_size}" if args.arch == "reloc3r" else ""))
        print(chk.summary())
        if state is not None and expected is not None:
            print(f"dtypes: {_dtype_summary(state, list(expected))}")
        if out:
            print(f"wrote {out}")
    return 0 if chk.ok else 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
