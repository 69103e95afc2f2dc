"""Webdataset tar shards: writing (atomic, deterministic) and indexing (sample -> member byte ranges).

A shard is a plain tar (readable by webdataset and `tar`): the members of one sample share a key,
`{key}.{ext}`, with the key ending at the first dot of the file name. Two sample layouts:

raw shards (data_tools.make_shards)
    {key}.mp4 | .webm | .mov | .mkv   the video bytes as found (not re-encoded)
    {key}.txt                          caption (utf-8)
    {key}.json                         {"fps", "frames", "height", "width", "source", ["trajectories"]}
latent shards (data_tools.precompute)
    {key}.latent.safetensors           tensor "latent" [C, t, h, w] (float32 or bfloat16), already VAE-scaled
    {key}.text.safetensors             tensor "emb" [n, D]: only the n valid caption tokens (the mask is all-true
                                       over them; readers pad to a batch length and rebuild the mask)
    {key}.txt                          caption
    {key}.json                         {"fps", "frames", "height", "width", "latent_shape", "text_length",
                                        "vae", "text_encoder", ["trajectories"]}

Each `shard-NNNNNN.tar` may have a sidecar `shard-NNNNNN.idx.json` (written by write_shard) holding every
sample's member offsets and its json metadata without trajectories, so that readers index thousands of
shards without scanning tar headers. A sidecar whose recorded tar size differs from the tar is ignored.
"""
from __future__ import annotations

import io
import json
import os
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

VIDEO_EXTS = ("mp4", "webm", "mov", "mkv", "avi")
INDEX_SUFFIX = ".idx.json"
_HEAVY_META = ("trajectories",)   # left out of the index: large, and only needed with the sample itself


@dataclass
class SampleRef:
    key: str
    members: dict[str, tuple[int, int]]   # extension -> (byte offset of the data in the tar, size)
    info: dict                            # the sample's json metadata minus heavy fields; {} if none


@dataclass
class ShardIndex:
    path: str
    samples: list[SampleRef]
    errors: list[str] = field(default_factory=list)   # unreadable headers or metadata, one line each


def split_name(name: str) -> tuple[str, str]:
    """'dir/abc.latent.safetensors' -> ('dir/abc', 'latent.safetensors') (webdataset's key/extension rule)."""
    head, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    return (f"{head}/{stem}" if head else stem), (ext if dot else "")


def index_path(shard: str | os.PathLike) -> Path:
    p = Path(shard)
    return p.with_name(p.name[:-4] + INDEX_SUFFIX if p.name.endswith(".tar") else p.name + INDEX_SUFFIX)


def _tarinfo(name: str, size: int) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.size, ti.mtime, ti.mode, ti.uid, ti.gid, ti.uname, ti.gname = size, 0, 0o644, 0, 0, "", ""
    return ti


def write_shard(path: str | os.PathLike, samples: Iterable[tuple[str, dict[str, bytes]]]) -> ShardIndex:
    """Write samples [(key, {ext: bytes})] to a tar at path (temp file, then rename), plus its sidecar index.

    Keys may not contain '.', and every sample's members are written consecutively in the given order. The
    bytes depend only on the input (zero mtimes and owners), so rebuilding a shard reproduces it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:
            for key, members in samples:
                if "." in key.rpartition("/")[2] or not key:
                    raise ValueError(f"key: must be non-empty and contain no '.', got {key!r}")
                for ext, data in members.items():
                    tar.addfile(_tarinfo(f"{key}.{ext}", len(data)), io.BytesIO(data))
        index = scan_shard(tmp)
        index.path = str(path)
        _write_sidecar(path, index, os.path.getsize(tmp))
        os.replace(tmp, path)
    except BaseException:
        if tmp.exists():
            tmp.unlink()
        raise
    return index


def _write_sidecar(path: Path, index: ShardIndex, tar_size: int) -> None:
    side = index_path(path)
    tmp = side.with_name(f".{side.name}.tmp")
    doc = {"tar_size": tar_size, "samples": [{"key": s.key, "members": s.members, "info": s.info}
                                             for s in index.samples]}
    tmp.write_text(json.dumps(doc))
    os.replace(tmp, side)


def scan_shard(path: str | os.PathLike) -> ShardIndex:
    """Index a tar by reading its headers (and each sample's .json). A damaged header ends the scan: the
    samples before it are kept and the damage is recorded in errors, never raised."""
    samples: list[SampleRef] = []
    errors: list[str] = []
    by_key: dict[str, SampleRef] = {}
    try:
        with open(path, "rb") as f, tarfile.open(fileobj=f, mode="r:") as tar:
            while True:
                try:
                    ti = tar.next()
                except (tarfile.TarError, OSError, EOFError, UnicodeDecodeError) as e:
                    errors.append(f"{path}: unreadable tar header after {len(samples)} samples ({e})")
                    break
                if ti is None:
                    damage = _damage_after(f, tar.offset, samples)
                    if damage:
                        errors.append(f"{path}: {damage} after {len(samples)} samples")
                    break
                if not ti.isfile():
                    continue
                key, ext = split_name(ti.name)
                if not ext:
                    continue
                ref = by_key.get(key)
                if ref is None:
                    ref = by_key[key] = SampleRef(key, {}, {})
                    samples.append(ref)
                ref.members[ext] = (ti.offset_data, ti.size)
            for ref in samples:
                if "json" in ref.members:
                    off, size = ref.members["json"]
                    f.seek(off)
                    try:
                        ref.info = {k: v for k, v in json.loads(f.read(size)).items() if k not in _HEAVY_META}
                    except (ValueError, UnicodeDecodeError, AttributeError) as e:
                        errors.append(f"{path}: sample {ref.key}: unreadable json metadata ({e})")
                        ref.info = {"_corrupt": str(e)}
    except (tarfile.TarError, OSError) as e:
        errors.append(f"{path}: cannot open as tar ({e})")
    return ShardIndex(str(path), samples, errors)


def _damage_after(f, end: int, samples: list[SampleRef]) -> str:
    """tarfile reads a bad header after the first as the end of the archive; tell the two apart: a real end is
    followed only by zero padding, and every member's data lies inside the file."""
    size = os.fstat(f.fileno()).st_size
    if any(off + n > size for s in samples for off, n in s.members.values()):
        return "truncated tar (member data past the end of the file)"
    f.seek(end)
    while True:
        block = f.read(1 << 16)
        if not block:
            return ""
        if block.strip(b"\0"):
            return f"unreadable tar header at byte {end}"


def load_index(path: str | os.PathLike) -> ShardIndex:
    """The shard's sidecar index if it matches the tar, else a header scan."""
    side = index_path(path)
    if side.exists():
        try:
            doc = json.loads(side.read_text())
            if doc.get("tar_size") == os.path.getsize(path):
                return ShardIndex(str(path), [SampleRef(s["key"], {k: tuple(v) for k, v in s["members"].items()},
                                                        s.get("info", {})) for s in doc["samples"]])
        except (ValueError, KeyError, TypeError, OSError):
            pass
    return scan_shard(path)


def read_members(f, ref: SampleRef, exts: Iterable[str] | None = None) -> dict[str, bytes]:
    """Bytes of a sample's members (all, or the given extensions) from an open binary tar file."""
    out = {}
    for ext, (off, size) in ref.members.items():
        if exts is None or ext in exts:
            f.seek(off)
            data = f.read(size)
            if len(data) != size:
                raise EOFError(f"member {ref.key}.{ext}: shard ends after {len(data)} of {size} bytes")
            out[ext] = data
    return out


def iter_shard(path: str | os.PathLike):
    """Yield (key, {ext: bytes}) for every sample of a shard, in stored order (used by precompute)."""
    index = load_index(path)
    with open(path, "rb") as f:
        for ref in index.samples:
            yield ref.key, read_members(f, ref)
