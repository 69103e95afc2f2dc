"""The dataset index: every usable sample of every shard, with the shape it will have in a batch.

Built once per loader from the shard sidecar indexes (or tar headers). Samples that cannot be used whatever
happens (no video or latent member, metadata saying they are too short) are left out here and counted, so the
batch plan only holds samples that are expected to decode.
"""
from __future__ import annotations

import glob
import os
from dataclasses import dataclass, field
from pathlib import Path

from .config import DataConfig
from .shard_format import VIDEO_EXTS, SampleRef, load_index

LATENT_MEMBERS = ("latent.safetensors", "text.safetensors")


def resolve_shards(spec: str | list[str], key: str = "data.shards") -> list[str]:
    """Sorted tar paths from a directory, glob, brace pattern, comma-separated string or list of these; `key`
    names the setting in the error (a data tool's argument, or the training config key)."""
    specs = spec if isinstance(spec, (list, tuple)) else [s for s in str(spec).split(",") if s]
    paths: list[str] = []
    for s in specs:
        s = os.path.expanduser(s)
        if os.path.isdir(s):
            paths += glob.glob(os.path.join(s, "*.tar"))
        elif "{" in s:
            import braceexpand
            for p in braceexpand.braceexpand(s):
                paths += glob.glob(p) if any(c in p for c in "*?[") else [p]
        elif any(c in s for c in "*?["):
            paths += glob.glob(s)
        else:
            paths.append(s)
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(f"{key}: {len(missing)} shard(s) not found, first: {missing[0]}")
    paths = sorted(set(os.path.abspath(p) for p in paths))
    if not paths:
        raise FileNotFoundError(f"{key}: no .tar shard matches {spec!r}")
    return paths


@dataclass
class IndexedSample:
    shard: int             # position in DatasetIndex.shards
    ref: SampleRef
    shape: tuple           # bucket key: (frames, height, width) in the stream's units


@dataclass
class DatasetIndex:
    shards: list[str]
    samples: list[IndexedSample]
    shard_samples: list[list[int]]                      # sample ids per shard, stored order
    filtered: dict[str, int] = field(default_factory=dict)   # reason -> count of samples left out
    errors: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.samples)


def bucket_shape(cfg: DataConfig, ref: SampleRef) -> tuple | str:
    """The shape a sample takes in a batch, or a reason string why it cannot be used."""
    info = ref.info
    if "_corrupt" in info:
        return "corrupt_metadata"
    if cfg.kind == "latent":
        if not all(m in ref.members for m in LATENT_MEMBERS):
            return "missing_latent_or_text"
        shape = info.get("latent_shape")
        if not shape or len(shape) != 4:
            return "missing_latent_shape"
        frames, h, w = int(shape[1]), int(shape[2]), int(shape[3])
        if cfg.num_frames is not None:
            if frames < cfg.num_frames:
                return "too_short"
            frames = cfg.num_frames
        return (frames, h, w)
    if not any(e in ref.members for e in VIDEO_EXTS):
        return "missing_video"
    frames = info.get("frames")
    if cfg.num_frames is not None:
        need = (cfg.num_frames - 1) * cfg.frame_stride + 1
        if frames is not None and int(frames) < need:
            return "too_short"
        frames = cfg.num_frames
    elif frames is None:
        return "missing_frame_count"
    else:
        frames = (int(frames) - 1) // cfg.frame_stride + 1
    if cfg.resolution is not None:
        h, w = cfg.resolution
    elif "height" in info and "width" in info:
        h, w = int(info["height"]), int(info["width"])
    else:
        return "missing_size"
    return (int(frames), h, w)


def build_index(cfg: DataConfig, shards: str | list[str]) -> DatasetIndex:
    paths = resolve_shards(shards)
    index = DatasetIndex(paths, [], [])
    for shard_id, path in enumerate(paths):
        si = load_index(path)
        index.errors += si.errors
        ids = []
        for ref in si.samples:
            shape = bucket_shape(cfg, ref)
            if isinstance(shape, str):
                index.filtered[shape] = index.filtered.get(shape, 0) + 1
                continue
            ref.info = {}   # the shape is all the plan needs; millions of metadata dicts would fill memory
            ids.append(len(index.samples))
            index.samples.append(IndexedSample(shard_id, ref, shape))
        index.shard_samples.append(ids)
    if not index.samples:
        raise ValueError(f"data.shards: no usable sample in {len(paths)} shard(s) "
                         f"(left out: {index.filtered or 'none'}; errors: {index.errors[:2] or 'none'})")
    return index


def shard_name(index: DatasetIndex, sample_id: int) -> str:
    return Path(index.shards[index.samples[sample_id].shard]).name
