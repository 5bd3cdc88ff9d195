"""Dataset readers: every supported source as one lazily loaded sequence of posed frames.

>>> ds = open_dataset("7scenes", "../shared/data/7scenes_redkitchen_0000_0499", frames="0:250:5")
>>> len(ds), ds.names[:2], ds.poses.shape          # poses without decoding any image
>>> frame = ds[0]                                   # PosedFrame: image, T_world_cam, camera, depth

Formats and the posed-folder format of our own are specified in docs/datasets.md.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Dict, Tuple, Type, Union

from reloc_ros.datasets.bag import BagOptions, open_bag
from reloc_ros.datasets.base import Dataset, FrameRecord, parse_frames, parse_options
from reloc_ros.datasets.colmap import ColmapOptions, open_colmap
from reloc_ros.datasets.folder import FolderOptions, open_folder, write_folder_dataset
from reloc_ros.datasets.kitti import KittiOptions, open_kitti
from reloc_ros.datasets.sevenscenes import SevenScenesOptions, open_7scenes
from reloc_ros.datasets.strecha import StrechaOptions, open_strecha
from reloc_ros.datasets.trajectory import interpolate_poses, select_keyframes
from reloc_ros.datasets.tum import TumOptions, open_tum
from reloc_ros.types import InvalidInputError

_READERS: Dict[str, Tuple[Callable[..., Dataset], Type]] = {
    "7scenes": (open_7scenes, SevenScenesOptions),
    "kitti": (open_kitti, KittiOptions),
    "strecha": (open_strecha, StrechaOptions),
    "colmap": (open_colmap, ColmapOptions),
    "tum": (open_tum, TumOptions),
    "bag": (open_bag, BagOptions),
    "folder": (open_folder, FolderOptions),
}

DATASET_FORMATS: Tuple[str, ...] = tuple(_READERS)
"""Names accepted by ``open_dataset`` (and ``--format``)."""

OPTION_TYPES: Dict[str, Type] = {k: v[1] for k, v in _READERS.items()}
"""Format -> typed options dataclass (its docstring documents every option)."""


def open_dataset(fmt: str, src: Union[str, Path], frames: Union[None, str, slice, int] = None,
                 use_depth: bool = True, **fmt_options: Any) -> Dataset:
    """Open a posed-image source as a ``Dataset`` without decoding any image.

    fmt: one of DATASET_FORMATS. src: the dataset folder (or bag folder/file).
    frames: "start:stop:step" (python slice semantics, any part empty) over the sorted
    frame list, e.g. "0:250:5"; None keeps all. use_depth: load depth where the source
    has it. fmt_options: the format's options (OPTION_TYPES[fmt]); strings are coerced.

    Returns a Dataset: ``len(ds)``, ``ds.names``, ``ds.poses`` [N, 4, 4] T_world_cam
    (camera-to-world, OpenCV axes, metres), ``ds.cameras``, ``ds.stamps``,
    ``ds.skipped`` [(name, reason)], ``ds[i]`` -> PosedFrame, ``ds.subset(indices)``.
    Raises FileNotFoundError for a missing source, InvalidInputError for bad options or
    a corrupt/truncated metadata file. Frames whose pose is not a finite rigid
    transform are dropped (logged, listed in ``ds.skipped``).
    """
    key = str(fmt).lower()
    if key not in _READERS:
        raise InvalidInputError(f"unknown dataset format {fmt!r}; known: {', '.join(DATASET_FORMATS)}")
    reader, opt_cls = _READERS[key]
    opts = parse_options(opt_cls, fmt_options, key)
    sl = parse_frames(frames)
    if src is None or str(src) == "":
        raise InvalidInputError(f"{key} dataset: no source path given")
    return reader(Path(src).expanduser(), sl, bool(use_depth), opts)


__all__ = [
    "DATASET_FORMATS", "OPTION_TYPES", "Dataset", "FrameRecord", "open_dataset", "parse_frames",
    "write_folder_dataset", "interpolate_poses", "select_keyframes",
    "BagOptions", "ColmapOptions", "FolderOptions", "KittiOptions", "SevenScenesOptions", "StrechaOptions",
    "TumOptions",
]
