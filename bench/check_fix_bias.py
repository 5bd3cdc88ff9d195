"""Split the error of a split's OK fixes into a smooth bias and fix-to-fix scatter (prints).

Temporal fusion can average the scatter away, not a bias shared by neighbouring fixes.
On 7-Scenes redkitchen (map 0:250:5 with depth, queries 250..499 every 2nd) this tells
how much of the fixes' error any fusion could remove (docs/RESULTS.md, issue 8).

    .venv/bin/python bench/check_fix_bias.py [--shared ../shared] [--window 11]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shared", default="../shared")
    ap.add_argument("--window", type=int, default=11, help="consecutive fixes of the moving median")
    args = ap.parse_args()
    src = Path(args.shared) / "data" / "7scenes_redkitchen_0000_0499"
    if not src.is_dir():
        print(f"skipped: {src} is absent")
        return 0
    from reloc_ros.datasets import open_dataset
    from reloc_ros.localizer import Localizer
    from reloc_ros.maps import build_map
    from reloc_ros.types import Status

    with tempfile.TemporaryDirectory() as tmp:
        loc = Localizer.from_map(build_map(open_dataset("7scenes", src, frames="0:250:5"), Path(tmp) / "map"))
        ds = open_dataset("7scenes", src, frames="250:500:2", use_depth=False)
        err = []
        for i in range(len(ds)):
            f = ds[i]
            r = loc.localize(f.image, f.camera)
            if r.status == Status.OK:
                err.append(r.T_world_cam[:3, 3] - f.T_world_cam[:3, 3])
    E = np.array(err)
    h = args.window // 2
    smooth = np.array([np.median(E[max(0, k - h):k + h + 1], axis=0) for k in range(len(E))])
    norm = lambda a: 100 * float(np.median(np.linalg.norm(a, axis=1)))  # noqa: E731
    print(f"OK fixes {len(E)}: median error {norm(E):.1f} cm; moving median of {args.window} fixes "
          f"(the bias) {norm(smooth):.1f} cm; scatter around it {norm(E - smooth):.1f} cm")
    return 0


if __name__ == "__main__":
    sys.exit(main())
