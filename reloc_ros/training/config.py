"""Typed configuration of ``reloc-train`` (YAML -> dataclasses, validated once).

A training config is one YAML mapping with the sections below; every key is optional
(defaults documented on each field) and unknown keys are rejected with the key's name.
Units: metres, degrees where the name says ``_deg``, pixels for image sizes.

    model:  {kind, arch, tokenizer_hidden, pose_tokens, mask, stage, init_weights, ...}
    data:   {source, render: {...}, dataset: {...}, num_keyframes, overlap..., augment: {...}}
    loss:   {...}
    optim:  {lr, steps, batch_size, ...}
    run:    {out_dir, eval_every, ckpt_every, seed, device, amp, dtype, ...}
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Literal, Mapping, Optional, Union

from reloc_ros.config import from_dict

__all__ = ["ModelSection", "RenderSection", "DatasetSection", "AugmentSection", "DataSection", "LossSection",
           "OptimSection", "RunSection", "TrainConfig", "load_train_config", "apply_overrides"]


def _positive(where: str, **values: Union[int, float]) -> None:
    for name, v in values.items():
        if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
            raise ValueError(f"{where}.{name} must be a finite number > 0, got {v!r}")


def _non_negative(where: str, **values: Union[int, float]) -> None:
    for name, v in values.items():
        if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
            raise ValueError(f"{where}.{name} must be a finite number >= 0, got {v!r}")


@dataclass
class ModelSection:
    """Which network is trained, and which of its parts.

    kind: 'reloc_vggt' (the fused multi-view model) or 'reloc3r' (pairwise relative pose).
    arch: architecture sizes, as ``reloc_ros.models.reloc_vggt.build_reloc_vggt`` /
        ``reloc_ros.models.reloc3r.build_reloc3r`` take them ({} = the full-size
        published architecture: VGGT-1B / Reloc3r-512).
    tokenizer_hidden: pose-tokenizer MLP width (reloc_vggt).
    pose_tokens: feed the keyframes' known poses through the pose tokenizer (reloc_vggt).
        False hides them: the network is plain VGGT with the chosen mask.
    mask: global-attention mask trained with: 'dense' | 'star' | 'cached' (reloc_vggt).
    stage: reloc_vggt: 1 = train the pose tokenizer only (backbone + camera head frozen,
        the authors' first stage; needs ``init_weights``), 2 = end to end. reloc3r: the
        encoder (patch_embed + enc_blocks) is always frozen, as its authors trained.
    train_camera_head_in_stage1: also train the camera head in stage 1.
    init_weights: checkpoint to start from (.safetensors / .pt, strict load; for
        reloc_vggt the pose tokenizer may be absent from it and then starts at zero),
        or None = random initialisation (seeded by run.seed).
    """

    kind: Literal["reloc_vggt", "reloc3r"] = "reloc_vggt"
    arch: Dict[str, Any] = field(default_factory=dict)
    tokenizer_hidden: int = 256
    pose_tokens: bool = True
    mask: Literal["dense", "star", "cached"] = "cached"
    stage: int = 2
    train_camera_head_in_stage1: bool = False
    init_weights: Optional[str] = None

    def validate(self) -> None:
        _positive("model", tokenizer_hidden=self.tokenizer_hidden)
        if self.stage not in (1, 2):
            raise ValueError(f"model.stage must be 1 (tokenizer only) or 2 (end to end), got {self.stage!r}")
        if self.kind == "reloc_vggt" and self.stage == 1:
            if not self.pose_tokens:
                raise ValueError("model.stage 1 trains only the pose tokenizer, so it needs model.pose_tokens: true")
            if self.init_weights is None:
                raise ValueError("model.stage 1 freezes the backbone, so it needs model.init_weights (a trained "
                                 "VGGT / Reloc-VGGT checkpoint); train from scratch with stage 2")
        if self.init_weights is not None and not Path(self.init_weights).is_file():
            raise ValueError(f"model.init_weights {self.init_weights} does not exist")
        # Build-time validation of arch happens in the model's own config class; do it
        # here too so a bad size fails before any data is rendered.
        if self.kind == "reloc_vggt":
            from reloc_ros.models.vggt import VGGTConfig

            VGGTConfig.from_dict(self.arch)
        else:
            from reloc_ros.models.reloc3r import Reloc3rConfig

            Reloc3rConfig.from_dict(self.arch)


@dataclass
class RenderSection:
    """Procedural rooms (``reloc_ros.demo.scene``) rendered once into a disk cache.

    train_rooms / eval_rooms: number of rooms; eval rooms use disjoint seeds
        (``seed + 100000 + i``), so evaluation never sees a training room.
    frames_per_room: posed frames rendered per room along a random smooth camera path.
    image_width / image_height: rendered size = network input size (multiples of the
        patch size, 14 for VGGT / 16 for Reloc3r).
    focal_range: per-room focal length range, as a fraction of the image width
        (0.7 = 71 deg horizontal FoV).
    room_size_min / room_size_max: room extent ranges (metres, x y z).
    boxes_range: [min, max] boxes per room.
    step_m: mean camera spacing along the path (metres).
    texel_m: texture resolution (metres per texel; coarser renders faster).
    seed: base seed of room layouts, textures and paths.
    cache_dir: where rendered rooms are stored (``.npz``, keyed by every field above);
        None = ``<run.out_dir>/../render_cache``.
    """

    train_rooms: int = 24
    eval_rooms: int = 4
    frames_per_room: int = 96
    image_width: int = 112
    image_height: int = 84
    focal_range: List[float] = field(default_factory=lambda: [0.65, 0.85])
    room_size_min: List[float] = field(default_factory=lambda: [4.0, 3.5, 2.5])
    room_size_max: List[float] = field(default_factory=lambda: [7.0, 6.0, 3.2])
    boxes_range: List[int] = field(default_factory=lambda: [2, 5])
    step_m: float = 0.12
    texel_m: float = 0.01
    seed: int = 0
    cache_dir: Optional[str] = None

    def validate(self) -> None:
        _positive("data.render", train_rooms=self.train_rooms, eval_rooms=self.eval_rooms,
                  frames_per_room=self.frames_per_room, image_width=self.image_width,
                  image_height=self.image_height, step_m=self.step_m, texel_m=self.texel_m)
        if self.frames_per_room < 8:
            raise ValueError(f"data.render.frames_per_room must be >= 8, got {self.frames_per_room}")
        for name, n in (("focal_range", 2), ("room_size_min", 3), ("room_size_max", 3), ("boxes_range", 2)):
            v = getattr(self, name)
            if len(v) != n or not all(isinstance(x, (int, float)) and math.isfinite(x) and x >= 0 for x in v):
                raise ValueError(f"data.render.{name} must be {n} finite numbers >= 0, got {v!r}")
        if not 0 < self.focal_range[0] <= self.focal_range[1]:
            raise ValueError(f"data.render.focal_range must be 0 < lo <= hi, got {self.focal_range}")
        if any(lo > hi or lo < 2.0 for lo, hi in zip(self.room_size_min, self.room_size_max)):
            raise ValueError(f"data.render room sizes need 2 <= min <= max per axis, got {self.room_size_min} / "
                             f"{self.room_size_max}")
        if self.boxes_range[0] > self.boxes_range[1]:
            raise ValueError(f"data.render.boxes_range must be [min, max], got {self.boxes_range}")


@dataclass
class DatasetSection:
    """Posed frames from any dataset reader (``reloc_ros.datasets.open_dataset``).

    format / src / frames: as ``reloc-eval`` takes them (frames "start:stop:step"; quote it
        in YAML, where an unquoted 0:100 reads as a base-60 integer).
    eval_frames: frames held out for evaluation (same syntax; must not overlap ``frames``
        in practice: pick other sequences or a disjoint range).
    options: the format's reader options.
    use_depth: use the dataset's depth for overlap (else frustum overlap from poses only,
        with ``assumed_depth_m``).
    assumed_depth_m: scene depth assumed when no depth is used (metres).
    image_width / image_height: network input size; frames are centre-cropped to its
        aspect ratio and resized (intrinsics follow).
    max_frames: frames loaded at most per split (evenly subsampled beyond).
    """

    format: str = ""
    src: str = ""
    frames: Optional[str] = None
    eval_frames: Optional[str] = None
    options: Dict[str, Any] = field(default_factory=dict)
    use_depth: bool = True
    assumed_depth_m: float = 2.5
    image_width: int = 112
    image_height: int = 84
    max_frames: int = 2000

    def validate(self) -> None:
        _positive("data.dataset", assumed_depth_m=self.assumed_depth_m, image_width=self.image_width,
                  image_height=self.image_height, max_frames=self.max_frames)


@dataclass
class AugmentSection:
    """Photometric augmentation of training samples (never of evaluation samples).

    brightness / contrast / saturation: maximum relative change (0 = off), drawn per
        frame. gain: maximum per-channel gain change (white balance). noise: std of
        additive Gaussian pixel noise (in [0, 1] units). shuffle_keyframes: random order
        of the non-reference keyframes. geometric augmentation is not applied: crops
        or flips change intrinsics / handedness, which the pose encoding would have to
        follow.
    """

    brightness: float = 0.2
    contrast: float = 0.2
    saturation: float = 0.2
    gain: float = 0.05
    noise: float = 0.01
    shuffle_keyframes: bool = True

    def validate(self) -> None:
        _non_negative("data.augment", brightness=self.brightness, contrast=self.contrast,
                      saturation=self.saturation, gain=self.gain, noise=self.noise)
        for name in ("brightness", "contrast", "saturation", "gain"):
            if getattr(self, name) >= 1:
                raise ValueError(f"data.augment.{name} must be < 1, got {getattr(self, name)}")


@dataclass
class DataSection:
    """Training samples: a query and K keyframes that overlap it.

    source: 'render' (procedural rooms) or 'dataset' (a dataset reader).
    num_keyframes: K (>= 2: the Sim(3) decoding needs two keyframe centres).
    min_overlap / max_overlap: a keyframe candidate's covisibility with the query (the
        fraction of the query's pixels whose 3D point is seen by the keyframe, from depth;
        from frustum sampling at an assumed depth without depth). max_overlap excludes
        near-duplicates of the query.
    min_baseline_m: keyframes closer than this to the query's centre are not candidates
        (a map keyframe at the query's own position would make the task trivial).
    eval_samples: fixed held-out samples scored at each evaluation.
    """

    source: Literal["render", "dataset"] = "render"
    render: RenderSection = field(default_factory=RenderSection)
    dataset: DatasetSection = field(default_factory=DatasetSection)
    num_keyframes: int = 4
    min_overlap: float = 0.3
    max_overlap: float = 0.9
    min_baseline_m: float = 0.25
    eval_samples: int = 64
    augment: AugmentSection = field(default_factory=AugmentSection)

    def validate(self) -> None:
        if self.num_keyframes < 2:
            raise ValueError(f"data.num_keyframes must be >= 2 (Sim(3) needs two keyframe centres), got "
                             f"{self.num_keyframes}")
        if not 0 <= self.min_overlap < self.max_overlap <= 1:
            raise ValueError(f"data needs 0 <= min_overlap < max_overlap <= 1, got {self.min_overlap}, "
                             f"{self.max_overlap}")
        _non_negative("data", min_baseline_m=self.min_baseline_m)
        _positive("data", eval_samples=self.eval_samples)
        if self.source == "dataset" and not (self.dataset.format and self.dataset.src):
            raise ValueError("data.source 'dataset' needs data.dataset.format and data.dataset.src")


@dataclass
class LossSection:
    """Loss weights.

    reloc_vggt (VGGT's camera loss): per refinement iteration i of n, weight
        ``gamma ** (n - 1 - i)``; per frame the L1 (or Huber) distance of the predicted
        9-d encoding to the ground truth (camera-from-reference, translation divided by
        the keyframes' mean distance from the reference, as the pose tokenizer's input)
        split into translation (``weight_trans``), quaternion (``weight_rot``) and FoV
        (``weight_fov``) parts. ``query_weight`` multiplies the query frame's term (the
        keyframes' terms have weight 1; their poses are inputs when pose tokens are on).
    reloc3r: geodesic rotation angle (radians) + ``weight_trans`` x angle between the
        predicted and true translation directions (radians), both directions of a pair.
    huber_delta: 0 = L1, > 0 = Huber with this delta (reloc_vggt).
    """

    gamma: float = 0.6
    weight_trans: float = 1.0
    weight_rot: float = 1.0
    weight_fov: float = 0.5
    query_weight: float = 2.0
    huber_delta: float = 0.0

    def validate(self) -> None:
        _positive("loss", gamma=self.gamma, weight_trans=self.weight_trans, weight_rot=self.weight_rot)
        _non_negative("loss", weight_fov=self.weight_fov, query_weight=self.query_weight,
                      huber_delta=self.huber_delta)


@dataclass
class OptimSection:
    """AdamW with linear warm-up then cosine decay to ``min_lr_ratio * lr``.

    batch_size: global batch (samples per step over all processes; must divide evenly).
    steps: optimizer steps. max_minutes: stop early (after a checkpoint and a final
    evaluation) once this much wall time has passed; 0 = no limit.
    """

    lr: float = 3e-4
    weight_decay: float = 0.05
    betas: List[float] = field(default_factory=lambda: [0.9, 0.95])
    warmup_steps: int = 100
    min_lr_ratio: float = 0.05
    steps: int = 2000
    batch_size: int = 8
    grad_clip: float = 1.0
    max_minutes: float = 0.0

    def validate(self) -> None:
        _positive("optim", lr=self.lr, steps=self.steps, batch_size=self.batch_size)
        _non_negative("optim", weight_decay=self.weight_decay, warmup_steps=self.warmup_steps,
                      min_lr_ratio=self.min_lr_ratio, grad_clip=self.grad_clip, max_minutes=self.max_minutes)
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"optim.betas must be two numbers in [0, 1), got {self.betas}")
        if int(self.steps) != self.steps or int(self.batch_size) != self.batch_size:
            raise ValueError("optim.steps and optim.batch_size must be integers")


@dataclass
class RunSection:
    """Where and how the run executes.

    out_dir: checkpoints (``checkpoints/step_XXXXXXX/`` + ``last``), ``curve.csv``,
        ``curve.png``, ``eval.jsonl``, ``config.yaml``.
    eval_every / ckpt_every / log_every: steps (0 = only at the end).
    seed: weights, sampling and augmentation (samples depend only on (seed, step,
        position in the global batch), so any number of processes sees the same data).
    device: 'cpu' | 'cuda' | 'cuda:N' ('cuda' under torchrun = the local rank's GPU).
    amp: 'off' | 'bf16' | 'fp16' mixed precision (CUDA only; fp16 uses a grad scaler).
    dtype: parameter dtype, 'float32' or 'float64' (float64 for exactness checks).
    threads: torch intra-op threads per process (0 = leave torch's default).
    deterministic: ``torch.use_deterministic_algorithms`` (required for exact resume on GPU).
    resume: 'auto' (continue from ``out_dir/checkpoints/last`` when present), 'never',
        or a checkpoint directory.
    progress: show a progress bar on stderr (rank 0).
    keep_checkpoints: step checkpoints kept (the newest; ``last`` is always kept).
    """

    out_dir: str = "out/train"
    eval_every: int = 200
    ckpt_every: int = 200
    log_every: int = 10
    seed: int = 0
    device: str = "cpu"
    amp: Literal["off", "bf16", "fp16"] = "off"
    dtype: Literal["float32", "float64"] = "float32"
    threads: int = 0
    deterministic: bool = True
    resume: str = "auto"
    progress: bool = True
    keep_checkpoints: int = 2

    def validate(self) -> None:
        _non_negative("run", eval_every=self.eval_every, ckpt_every=self.ckpt_every, threads=self.threads,
                      keep_checkpoints=self.keep_checkpoints)
        _positive("run", log_every=self.log_every)
        if not (self.device == "cpu" or self.device.startswith("cuda")):
            raise ValueError(f"run.device must be 'cpu', 'cuda' or 'cuda:N', got {self.device!r}")
        if self.amp != "off" and not self.device.startswith("cuda"):
            raise ValueError(f"run.amp {self.amp!r} needs a CUDA device (run.device is {self.device!r}); "
                             "use amp: off on the CPU")
        if self.amp != "off" and self.dtype == "float64":
            raise ValueError("run.amp needs run.dtype float32")
        if self.resume not in ("auto", "never") and not Path(self.resume).is_dir():
            raise ValueError(f"run.resume must be 'auto', 'never' or a checkpoint directory, got {self.resume!r}")


@dataclass
class TrainConfig:
    """The whole training configuration (see the module docstring)."""

    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    loss: LossSection = field(default_factory=LossSection)
    optim: OptimSection = field(default_factory=OptimSection)
    run: RunSection = field(default_factory=RunSection)

    def validate(self) -> None:
        if self.model.kind == "reloc3r":
            p = int(self.model.arch.get("patch_size", 16))
        else:
            p = int(self.model.arch.get("patch_size", 14))
        src = self.data.render if self.data.source == "render" else self.data.dataset
        if src.image_width % p or src.image_height % p:
            raise ValueError(f"image size {src.image_width}x{src.image_height} must be multiples of the model's "
                             f"patch size {p}")

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)


def apply_overrides(data: Dict[str, Any], overrides: List[str]) -> Dict[str, Any]:
    """Set dotted keys ``a.b.c=value`` (value parsed as YAML) in a nested dict."""
    import yaml

    out = dict(data)
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} must be KEY=VALUE (dotted key, e.g. optim.steps=100)")
        key, raw = item.split("=", 1)
        parts = [k for k in key.strip().split(".") if k]
        if not parts:
            raise ValueError(f"override {item!r} has an empty key")
        node = out
        for k in parts[:-1]:
            child = node.get(k)
            child = dict(child) if isinstance(child, Mapping) else {}
            node[k] = child
            node = child
        # "0:100:5" (a frame range) would be read by YAML 1.1 as a base-60 integer.
        node[parts[-1]] = raw if (":" in raw and not raw.lstrip().startswith(("{", "["))) else yaml.safe_load(raw)
    return out


def load_train_config(path: Optional[Union[str, Path]] = None, overrides: Optional[List[str]] = None,
                      data: Optional[Mapping[str, Any]] = None) -> TrainConfig:
    """TrainConfig from a YAML file (or a dict) plus dotted overrides; raises ValueError
    naming the offending key for anything invalid."""
    import yaml

    raw: Dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ValueError(f"training config {p} does not exist")
        loaded = yaml.safe_load(p.read_text())
        if loaded is not None and not isinstance(loaded, Mapping):
            raise ValueError(f"training config {p} must hold a mapping, got {type(loaded).__name__}")
        raw = dict(loaded or {})
    if data is not None:
        raw.update(data)
    if overrides:
        raw = apply_overrides(raw, overrides)
    return from_dict(TrainConfig, raw, "train")
