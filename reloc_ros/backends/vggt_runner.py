"""The Reloc-VGGT network behind one interface for every backend and mask.

``RelocVGGTRunner.predict(query, keyframes, kf_pose_enc, kf_keys)`` returns the
predicted pose encodings [1, K+1, 9] (keyframes then query) for one query, on:

- 'torch': :class:`reloc_ros.models.reloc_vggt.RelocVGGT` itself (fp32/fp16/bf16, CPU or
  CUDA), with its own keyframe KV cache for the ``cached`` mask;
- 'onnxruntime' / 'tensorrt': exported graphs with a dynamic number of keyframes K.
  ``dense`` / ``star``: one graph ``(query, keyframes, kf_pose_enc) -> pose_enc_list``.
  ``cached``: two graphs, ``keyframe`` ``(images [M,3,H,W], slots [M], pose_enc [M,9]) ->
  (k, v [M, L, heads, P, d], cam [M, 2C])`` run once per keyframe, and ``query``
  ``(query, kv_k, kv_v [L, 1, heads, K*P, d], kf_cam [1, K, 2C]) -> pose_enc_list``; the
  keyframe states are kept in an LRU cache by the runner.

Graphs always add the pose tokenizer's output, so these backends need ``kf_pose_enc``.
ONNX files / engines live under ``artifacts_dir``, named by the weights' hash, the
image size, the graph kind and the precision, and are reused.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable, Dict, Hashable, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from reloc_ros.backends.common import BACKENDS, PRECISIONS, BackendError, resolve_device, resolve_dtype
from reloc_ros.models.checkpoints import state_dict_hash
from reloc_ros.models.reloc_vggt import MASKS, KeyframeKVCache, RelocVGGT, _KFState
from reloc_ros.types import InvalidInputError

log = logging.getLogger("reloc_ros.backends.vggt")

__all__ = ["SequenceGraph", "KeyframeGraph", "QueryGraph", "export_reloc_vggt_onnx", "RelocVGGTRunner"]


def _stack_iterations(enc: List[torch.Tensor]) -> torch.Tensor:
    return torch.stack(enc, dim=0)


class SequenceGraph(nn.Module):
    """Exportable whole sequence under ``dense`` or ``star``.

    forward(query [1,3,H,W], keyframes [1,K,3,H,W], kf_pose_enc [1,K,9]) ->
    pose_enc_list [iterations, 1, K+1, 9] (float32). K is dynamic.
    """

    def __init__(self, net: RelocVGGT, mask: str) -> None:
        super().__init__()
        if mask not in ("dense", "star"):
            raise ValueError(f"SequenceGraph takes mask 'dense' or 'star', got {mask!r}")
        self.net, self.mask = net, mask

    def forward(self, query, keyframes, kf_pose_enc):
        return _stack_iterations(self.net(query, keyframes, kf_pose_enc, mask=self.mask)["pose_enc_list"])


class KeyframeGraph(nn.Module):
    """Exportable query-independent keyframe states (``cached`` mask).

    forward(images [M,3,H,W], slots [M] int64, pose_enc [M,9]) -> (k, v [M, L, heads, P, d],
    cam [M, 2C]) in the backbone dtype. M is dynamic.
    """

    def __init__(self, net: RelocVGGT) -> None:
        super().__init__()
        self.net = net

    def forward(self, images, slots, pose_enc):
        return self.net.keyframe_tensors(images, slots, pose_enc)


class QueryGraph(nn.Module):
    """Exportable query step (``cached`` mask).

    forward(query [1,3,H,W], kv_k, kv_v [L, 1, heads, K*P, d], kf_cam [1, K, 2C]) ->
    pose_enc_list [iterations, 1, K+1, 9]. K is dynamic.
    """

    def __init__(self, net: RelocVGGT) -> None:
        super().__init__()
        self.net = net

    def forward(self, query, kv_k, kv_v, kf_cam):
        net = self.net
        H, W = query.shape[-2:]
        x = net._embed_slots(query, torch.ones(1, dtype=torch.long, device=query.device))
        x = torch.cat((x[:, :1] + net.pose_tokenizer.unknown.to(x.dtype), x[:, 1:]), dim=1)
        rope = net._rope(H, W, query.device)
        f_out = x
        for li, (fb, gb) in enumerate(zip(net.aggregator.frame_blocks, net.aggregator.global_blocks)):
            x = fb(x, rope)
            f_out = x
            q, k, v = gb.attn.qkv_heads(gb.norm1(x), rope)
            kk = torch.cat((kv_k[li], k), dim=2)
            vv = torch.cat((kv_v[li], v), dim=2)
            x = x + gb.ls1(gb.attn.out(F.scaled_dot_product_attention(q, kk, vv)))
            x = gb.ffn(x)
        q_cam = torch.cat((f_out[:, 0], x[:, 0]), dim=-1)[:, None]
        cams = torch.cat((kf_cam.to(q_cam.dtype), q_cam), dim=1)
        return _stack_iterations(net.camera_head.from_camera_tokens(cams.float()))


def _example(net: RelocVGGT, kind: str, img_hw: Tuple[int, int], K: int):
    H, W = img_hw
    dt = net.dtype
    g = torch.Generator().manual_seed(0)
    cfg = net.config
    P = cfg.patch_start_idx + (H // cfg.patch_size) * (W // cfg.patch_size)
    L, h = cfg.depth, cfg.num_heads
    d = cfg.embed_dim // h
    if kind in ("dense", "star"):
        return (torch.rand(1, 3, H, W, generator=g).to(dt), torch.rand(1, K, 3, H, W, generator=g).to(dt),
                torch.randn(1, K, 9, generator=g))
    if kind == "keyframe":
        return (torch.rand(K, 3, H, W, generator=g).to(dt), torch.tensor([0] + [1] * (K - 1)),
                torch.randn(K, 9, generator=g))
    return (torch.rand(1, 3, H, W, generator=g).to(dt), torch.randn(L, 1, h, K * P, d, generator=g).to(dt),
            torch.randn(L, 1, h, K * P, d, generator=g).to(dt), torch.randn(1, K, 2 * cfg.embed_dim, generator=g).to(dt))


_IO = {
    "dense": (["query", "keyframes", "kf_pose_enc"], ["pose_enc_list"], {"keyframes": {1: "K"}, "kf_pose_enc": {1: "K"},
                                                                           "pose_enc_list": {2: "S"}}),
    "star": (["query", "keyframes", "kf_pose_enc"], ["pose_enc_list"], {"keyframes": {1: "K"}, "kf_pose_enc": {1: "K"},
                                                                          "pose_enc_list": {2: "S"}}),
    "keyframe": (["images", "slots", "pose_enc"], ["k", "v", "cam"], {"images": {0: "M"}, "slots": {0: "M"},
                                                                      "pose_enc": {0: "M"}, "k": {0: "M"}, "v": {0: "M"},
                                                                      "cam": {0: "M"}}),
    "query": (["query", "kv_k", "kv_v", "kf_cam"], ["pose_enc_list"], {"kv_k": {3: "KP"}, "kv_v": {3: "KP"},
                                                                       "kf_cam": {1: "K"}, "pose_enc_list": {2: "S"}}),
}


def export_reloc_vggt_onnx(net: RelocVGGT, kind: str, path: Union[str, Path], img_hw: Tuple[int, int],
                           example_k: int = 2) -> Path:
    """Export one Reloc-VGGT graph ('dense' | 'star' | 'keyframe' | 'query') for images of
    size img_hw (H, W) with a dynamic keyframe count, traced with ``example_k`` keyframes.

    The DINOv2 position embedding is resized for img_hw before tracing, so the graph
    holds it as a constant (the antialiased bicubic resize does not export).
    """
    from reloc_ros.backends.onnx_backend import export_onnx

    if kind not in _IO:
        raise ValueError(f"kind must be one of {sorted(_IO)}, got {kind!r}")
    net = net.eval()
    p = net.config.patch_size
    with torch.no_grad():  # cached only when computed without autograd
        net.aggregator.patch_embed.resized_pos_embed(img_hw[0] // p, img_hw[1] // p)
    module = {"dense": lambda: SequenceGraph(net, "dense"), "star": lambda: SequenceGraph(net, "star"),
              "keyframe": lambda: KeyframeGraph(net), "query": lambda: QueryGraph(net)}[kind]()
    ins, outs, dyn = _IO[kind]
    with torch.no_grad():
        return export_onnx(module, _example(net, kind, img_hw, example_k), path, ins, outs, dyn)


class RelocVGGTRunner:
    """Runs Reloc-VGGT for one query at a time on one backend with one mask.

    net: the network with its weights loaded (float32, CPU); the runner moves/casts it.
    backend: 'torch' | 'onnxruntime' | 'tensorrt'; precision: 'fp32' | 'fp16' | 'bf16';
    device: 'cpu' | 'cuda[:N]'; mask: 'dense' | 'star' | 'cached'.
    artifacts_dir: ONNX graphs / engines (required unless backend is 'torch').
    max_keyframes: largest K a TensorRT engine is built for. cache_capacity: keyframe
    states kept for ``cached`` (ONNX/TensorRT; the torch model keeps its own).
    threads: ONNX Runtime intra-op threads (0 = default).
    """

    def __init__(self, net: RelocVGGT, backend: str = "torch", precision: str = "fp32", device: str = "cpu",
                 mask: str = "cached", artifacts_dir: Optional[Union[str, Path]] = None,
                 model_hash: Optional[str] = None, max_keyframes: int = 20, cache_capacity: int = 32,
                 threads: int = 0) -> None:
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        if mask not in MASKS:
            raise ValueError(f"mask must be one of {MASKS}, got {mask!r}")
        self.backend, self.precision, self.mask = backend, precision, mask
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(precision)
        if backend == "onnxruntime" and (precision == "bf16" or (precision == "fp16" and self.device.type != "cuda")):
            raise BackendError("ONNX Runtime runs Reloc-VGGT in fp32 (CPU) or fp16 (CUDA provider)")
        if backend == "tensorrt" and precision == "bf16":
            raise BackendError("the TensorRT backend builds fp16 or fp32 engines")
        self.artifacts_dir = Path(artifacts_dir) if artifacts_dir else None
        if backend != "torch" and self.artifacts_dir is None:
            raise ValueError(f"backend {backend!r} needs an artifacts_dir for its ONNX graphs / engines")
        if backend == "tensorrt":
            from reloc_ros.backends.tensorrt_backend import gpu_identity, import_tensorrt

            import_tensorrt()
            gpu_identity(self.device.index or 0)
        self.model_hash = model_hash or state_dict_hash(net.state_dict())
        self.max_keyframes = int(max_keyframes)
        self.threads = int(threads)
        target = self.device if backend != "onnxruntime" else torch.device("cpu")
        export_dtype = self.dtype if backend != "onnxruntime" or precision == "fp16" else torch.float32
        self.net = net.eval().to(target).set_precision(export_dtype)
        self.cache = KeyframeKVCache(cache_capacity)
        self._sessions: Dict[str, object] = {}

    # -- sessions
    def _session(self, kind: str, img_hw: Tuple[int, int]):
        name = f"{kind}-{img_hw[0]}x{img_hw[1]}"
        sess = self._sessions.get(name)
        if sess is not None:
            return sess
        assert self.artifacts_dir is not None
        self.artifacts_dir.mkdir(parents=True, exist_ok=True)
        path = self.artifacts_dir / f"reloc_vggt-{self.model_hash}-{self.precision}-{name}.onnx"
        if not path.is_file():
            log.info("exporting Reloc-VGGT %s graph to %s", kind, path)
            export_reloc_vggt_onnx(self.net, kind, path, img_hw)
        if self.backend == "onnxruntime":
            from reloc_ros.backends.onnx_backend import OnnxRunner

            sess = OnnxRunner(path, device=str(self.device), threads=self.threads)
        else:
            from reloc_ros.backends.tensorrt_backend import TensorRTRunner, build_engine

            ex = _example(self.net, kind, img_hw, 1)
            names = _IO[kind][0]
            dyn = _IO[kind][2]
            prof = {}
            for nm, t in zip(names, ex):
                if nm not in dyn:
                    continue
                (axis,) = dyn[nm].keys()
                per = t.shape[axis]  # size for one keyframe
                shp = list(t.shape)
                lo, opt, hi = list(shp), list(shp), list(shp)
                lo[axis], opt[axis], hi[axis] = per, per * min(10, self.max_keyframes), per * self.max_keyframes
                prof[nm] = (tuple(lo), tuple(opt), tuple(hi))
            engine = build_engine(path, self.artifacts_dir / "engines", self.model_hash, prof, self.precision,
                                  device_index=self.device.index or 0)
            sess = TensorRTRunner(engine, self.device.index or 0)
        self._sessions[name] = sess
        return sess

    def _run(self, sess, feeds: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        if self.backend == "onnxruntime":
            out = sess.run({k: v.detach().cpu().numpy() for k, v in feeds.items()})
            return {k: torch.from_numpy(v) for k, v in out.items()}
        return sess.run(feeds)

    # -- inference
    @torch.inference_mode()
    def predict(self, query: torch.Tensor, keyframes: Union[torch.Tensor, Callable[[Sequence[int]], torch.Tensor]],
                kf_pose_enc: Optional[torch.Tensor] = None, kf_keys: Optional[Sequence[Hashable]] = None
                ) -> torch.Tensor:
        """Pose encodings [1, K+Q, 9] (float32, CPU) of K keyframes then the query views.

        query [1,3,H,W] (Q = 1) or [1,Q,3,H,W] (the torch backend only) and keyframes [1,K,3,H,W] in [0, 1] (or, for ``cached``, a loader
        ``(indices) -> [M,3,H,W]`` asked only for cache misses, with ``kf_keys``).
        kf_pose_enc: [1, K, 9] from :func:`reloc_ros.models.reloc_vggt.encode_known_poses`.
        """
        dev, dt = (self.device, self.dtype) if self.backend != "onnxruntime" else (torch.device("cpu"), self.net.dtype)
        query = query.to(dev, dt)
        if isinstance(keyframes, torch.Tensor):
            keyframes = keyframes.to(dev, dt)
        if self.backend == "torch":
            enc = None if kf_pose_enc is None else kf_pose_enc.to(dev)
            out = self.net(query, keyframes, enc, mask=self.mask, kf_keys=kf_keys)
            return out["pose_enc"].float().cpu()
        if kf_pose_enc is None:
            raise InvalidInputError(f"backend {self.backend!r} needs kf_pose_enc (its graphs always add pose tokens)")
        H, W = query.shape[-2:]
        if self.mask != "cached":
            if not isinstance(keyframes, torch.Tensor):
                raise InvalidInputError(f"mask {self.mask!r} needs the keyframe images as a tensor")
            K = keyframes.shape[1]
            if self.backend == "tensorrt" and K > self.max_keyframes:
                raise InvalidInputError(f"{K} keyframes exceed the engine's max_keyframes {self.max_keyframes}")
            out = self._run(self._session(self.mask, (H, W)),
                            {"query": query, "keyframes": keyframes, "kf_pose_enc": kf_pose_enc.float().to(query.device)})
            return out["pose_enc_list"][-1].float().cpu()
        return self._predict_cached(query, keyframes, kf_pose_enc, kf_keys, (H, W))

    def _predict_cached(self, query, keyframes, kf_pose_enc, kf_keys, hw) -> torch.Tensor:
        is_tensor = isinstance(keyframes, torch.Tensor)
        K = keyframes.shape[1] if is_tensor else (len(kf_keys) if kf_keys is not None else 0)
        if K < 1:
            raise InvalidInputError("Reloc-VGGT needs at least one keyframe (a loader needs kf_keys)")
        if self.backend == "tensorrt" and K > self.max_keyframes:
            raise InvalidInputError(f"{K} keyframes exceed the engine's max_keyframes {self.max_keyframes}")
        slots = [0] + [1] * (K - 1)
        keys: List[Optional[Tuple]] = [None] * K
        states: List[Optional[_KFState]] = [None] * K
        if kf_keys is not None:
            for i in range(K):
                keys[i] = (kf_keys[i], slots[i], kf_pose_enc[0, i].float().cpu().numpy().tobytes(), hw)
                states[i] = self.cache.get(keys[i])
        miss = [i for i in range(K) if states[i] is None]
        if miss:
            imgs = keyframes[0, miss] if is_tensor else keyframes(miss)
            out = self._run(self._session("keyframe", hw), {
                "images": imgs.to(query.device, query.dtype),
                "slots": torch.tensor([slots[i] for i in miss], device=query.device),
                "pose_enc": kf_pose_enc[0, miss].float().to(query.device)})
            for j, i in enumerate(miss):
                states[i] = _KFState(out["k"][j], out["v"][j], out["cam"][j])
                if keys[i] is not None:
                    self.cache.put(keys[i], states[i])
        tag = tuple(keys) if kf_keys is not None else None
        memo = self.cache.stacked
        if tag is not None and memo is not None and memo[0] == tag:
            kv_k, kv_v, kf_cam = memo[1]
        else:
            # [L, h, P, d] per keyframe -> [L, 1, h, K*P, d]
            kv_k = torch.cat([s.k for s in states], dim=2)[:, None]
            kv_v = torch.cat([s.v for s in states], dim=2)[:, None]
            kf_cam = torch.stack([s.cam for s in states])[None]
            if tag is not None:
                self.cache.stacked = (tag, (kv_k, kv_v, kf_cam))
        out = self._run(self._session("query", hw), {"query": query, "kv_k": kv_k, "kv_v": kv_v, "kf_cam": kf_cam})
        return out["pose_enc_list"][-1].float().cpu()
