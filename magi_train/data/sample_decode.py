"""Turn the bytes of one shard sample into tensors, and a list of decoded samples into a batch dict.

Raw:    video float32 [3, T, H, W] in [-1, 1] (temporal crop, stride, resize-to-cover + centre crop).
Latent: latent float32 [C, t, h, w] (temporal crop), text token embeddings [n, D].
Any failure raises SampleError naming the sample; the reader skips and counts it.
"""
from __future__ import annotations

import json

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load as load_safetensors

from .config import DataConfig
from .shard_format import VIDEO_EXTS
from .video_codec import CorruptVideoError, read_video


class SampleError(ValueError):
    """A sample that cannot be decoded (corrupt bytes, wrong shape, too short). `reason` is a short tag the
    loader counts by (skip_guard.py); the message names the sample."""

    def __init__(self, message: str, reason: str = "undecodable"):
        super().__init__(message)
        self.reason = reason


def _text(members: dict[str, bytes], key: str) -> str:
    if "txt" in members:
        return members["txt"].decode("utf-8").strip()
    meta = members.get("json")
    if meta is not None:
        cap = json.loads(meta).get("caption")
        if isinstance(cap, str):
            return cap.strip()
    raise SampleError(f"{key}: no caption (.txt member or 'caption' in .json)", "no caption")


def _meta(members: dict[str, bytes], key: str) -> dict:
    if "json" not in members:
        return {}
    try:
        return json.loads(members["json"])
    except (ValueError, UnicodeDecodeError) as e:
        raise SampleError(f"{key}: unreadable json metadata ({e})", "unreadable metadata") from None


def _crop_start(total: int, need: int, rng: np.random.Generator | None) -> int:
    if total < need:
        raise ValueError
    return int(rng.integers(0, total - need + 1)) if rng is not None else 0


def resize_cover_crop(video: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """[T, 3, h, w] float -> [T, 3, height, width]: scale so the frame covers the target, crop the centre."""
    h, w = video.shape[-2:]
    scale = max(height / h, width / w)
    nh, nw = max(height, round(h * scale)), max(width, round(w * scale))
    if (nh, nw) != (h, w):
        video = F.interpolate(video, size=(nh, nw), mode="bilinear", align_corners=False, antialias=scale < 1)
    top, left = (nh - height) // 2, (nw - width) // 2
    return video[..., top:top + height, left:left + width]


def decode_raw(key: str, members: dict[str, bytes], cfg: DataConfig, rng: np.random.Generator | None) -> dict:
    ext = next((e for e in VIDEO_EXTS if e in members), None)
    if ext is None:
        raise SampleError(f"{key}: no video member", "no video")
    caption, meta = _text(members, key), _meta(members, key)
    need = None if cfg.num_frames is None else (cfg.num_frames - 1) * cfg.frame_stride + 1
    known_total = int(meta["frames"]) if isinstance(meta.get("frames"), int) else None
    try:
        if need is None:
            frames, fps = read_video(members[ext])
            start = 0
        elif known_total is not None:   # choose the crop first, then decode only up to its end
            start = _crop_start(known_total, need, rng)
            frames, fps = read_video(members[ext], max_frames=start + need)
        else:
            frames, fps = read_video(members[ext])
            start = _crop_start(len(frames), need, rng)
    except CorruptVideoError as e:
        raise SampleError(f"{key}: {e}", "corrupt video") from None
    except ValueError:
        raise SampleError(f"{key}: {known_total} frames, needs {need}", "too short") from None
    if need is not None:
        frames = frames[start:start + need]
        if len(frames) < need:
            raise SampleError(f"{key}: decoded {start + len(frames)} frames, needs {start + need}", "too short")
    frames = frames[::cfg.frame_stride]
    # numpy for the elementwise work: single-threaded, so it never fights the trainer's torch threads
    video = frames.transpose(3, 0, 1, 2).astype(np.float32) * np.float32(1 / 127.5) - np.float32(1.0)
    video = torch.from_numpy(video)                                                        # [3, T, H, W]
    if cfg.resolution is not None and tuple(video.shape[-2:]) != tuple(cfg.resolution):
        video = resize_cover_crop(video.transpose(0, 1), *cfg.resolution).transpose(0, 1).clamp(-1, 1).contiguous()
    return {"video": video, "caption": caption, "key": key, "fps": fps / cfg.frame_stride, "meta": meta}


def decode_latent(key: str, members: dict[str, bytes], cfg: DataConfig, rng: np.random.Generator | None) -> dict:
    caption, meta = _text(members, key), _meta(members, key)
    try:
        latent = load_safetensors(members["latent.safetensors"])["latent"].float()
        emb = load_safetensors(members["text.safetensors"])["emb"].float()
    except Exception as e:   # safetensors raises its own error types for damaged headers
        raise SampleError(f"{key}: unreadable tensors ({type(e).__name__}: {e})", "unreadable tensors") from None
    if latent.ndim != 4 or emb.ndim != 2:
        raise SampleError(f"{key}: latent must be [C, t, h, w] and emb [n, D], got {tuple(latent.shape)}, "
                          f"{tuple(emb.shape)}", "wrong shape")
    for name, t in (("latent", latent), ("text embedding", emb)):
        if not bool(torch.isfinite(t).all()):   # one such sample turns a whole step's update into NaN
            raise SampleError(f"{key}: {name} holds {int((~torch.isfinite(t)).sum())} non-finite values (NaN/inf)",
                              "non-finite values")
    if cfg.num_frames is not None:
        try:
            start = _crop_start(latent.shape[1], cfg.num_frames, rng)
        except ValueError:
            raise SampleError(f"{key}: {latent.shape[1]} latent frames, needs {cfg.num_frames}", "too short") from None
        latent = latent[:, start:start + cfg.num_frames].contiguous()
    return {"latent": latent, "text_emb": emb, "caption": caption, "key": key,
            "fps": float(meta.get("fps", 0.0)), "meta": meta}


def _stack(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.from_numpy(np.stack([t.numpy() for t in tensors]))   # numpy: one thread, see decode_raw


def collate(samples: list[dict], kind: str, text_length: int | None) -> dict:
    batch = {k: [s[k] for s in samples] for k in ("caption", "key", "fps", "meta")}
    if kind == "raw":
        batch["video"] = _stack([s["video"] for s in samples])
        return batch
    batch["latent"] = _stack([s["latent"] for s in samples])
    lengths = [s["text_emb"].shape[0] for s in samples]
    dims = {s["text_emb"].shape[1] for s in samples}
    if len(dims) != 1:
        raise SampleError(f"text embeddings of one batch differ in width: {sorted(dims)}")
    length = text_length or max(max(lengths), 1)
    emb = torch.zeros(len(samples), length, dims.pop())
    mask = torch.zeros(len(samples), length, dtype=torch.bool)
    for i, s in enumerate(samples):
        n = min(lengths[i], length)
        emb[i, :n] = s["text_emb"][:n]
        mask[i, :n] = True
    batch["text_emb"], batch["text_mask"] = emb, mask
    return batch
