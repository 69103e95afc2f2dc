"""A folder of videos plus captions -> webdataset tar shards for training (layout: magi_train.data.shard_format).

    python -m data_tools.make_shards SRC_DIR OUT_DIR [--shard-size-mb 256] [--max-samples-per-shard N]
        [--min-frames 1] [--min-height 1] [--min-width 1] [--captions-csv FILE] [--workers 2]

Videos: *.mp4, *.webm, *.mov, *.mkv, *.avi anywhere under SRC_DIR, decoded with PyAV to check them and read their
size, fps and length; the bytes go into the shard as they are. Captions: a CSV (path and caption columns), or a
sidecar {name}.txt, or the "caption" field of a sidecar {name}.json; the rest of a sidecar json is kept as
"trajectories" in the sample's metadata. A file that is corrupt, too small or uncaptioned is skipped and listed
in the report (OUT_DIR/report.json); nothing stops the run but an unreadable source folder.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tqdm import tqdm

from magi_train.data.shard_format import INDEX_SUFFIX, write_shard
from magi_train.data.video_codec import CorruptVideoError, read_video

from .shard_sources import SourceVideo, attach_captions, find_videos, sample_key


@dataclass
class ShardReport:
    src_dir: str
    out_dir: str
    videos_found: int = 0
    samples_written: int = 0
    bytes_written: int = 0
    shards: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)   # (relative path, reason): filters, captions
    corrupt: list[tuple[str, str]] = field(default_factory=list)   # (relative path, decoder error)

    def summary(self) -> str:
        return (f"{self.samples_written}/{self.videos_found} videos -> {len(self.shards)} shards "
                f"({self.bytes_written / 2**20:.1f} MiB) in {self.out_dir}; skipped {len(self.skipped)}, "
                f"corrupt {len(self.corrupt)}")


def _check_video(path: str) -> dict:
    """Decode a video fully (runs in a worker process): its facts, or the error that makes it unusable."""
    try:
        frames, fps = read_video(path)
        return {"frames": int(frames.shape[0]), "height": int(frames.shape[1]), "width": int(frames.shape[2]),
                "fps": fps}
    except CorruptVideoError as e:
        return {"error": str(e)}
    except Exception as e:   # one strange file must never end the run
        return {"error": f"{path}: {type(e).__name__}: {e}"}


def _filter_reason(facts: dict, min_frames: int, min_height: int, min_width: int, max_frames: int | None) -> str:
    if facts["frames"] < min_frames:
        return f"{facts['frames']} frames < min_frames={min_frames}"
    if max_frames is not None and facts["frames"] > max_frames:
        return f"{facts['frames']} frames > max_frames={max_frames}"
    if facts["height"] < min_height or facts["width"] < min_width:
        return f"size {facts['height']}x{facts['width']} < min {min_height}x{min_width}"
    return ""


def make_shards(src_dir: str | os.PathLike, out_dir: str | os.PathLike, shard_size_mb: float = 256.0,
                max_samples_per_shard: int | None = None, min_frames: int = 1, min_height: int = 1,
                min_width: int = 1, max_frames: int | None = None, captions_csv: str | os.PathLike | None = None,
                require_caption: bool = True, num_workers: int = 0, overwrite: bool = False,
                progress: bool = True) -> ShardReport:
    """Pack the usable videos of src_dir into out_dir/shard-000000.tar, ... (sorted by path, so reruns give the
    same shards). A shard closes when adding a sample would pass shard_size_mb or max_samples_per_shard."""
    if shard_size_mb <= 0:
        raise ValueError(f"shard_size_mb: must be > 0, got {shard_size_mb}")
    if max_samples_per_shard is not None and max_samples_per_shard < 1:
        raise ValueError(f"max_samples_per_shard: must be >= 1 or None, got {max_samples_per_shard}")
    # the inputs first: a missing src_dir or captions csv stops here, before out_dir is created
    sources = attach_captions(src_dir, find_videos(src_dir), captions_csv)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    old = sorted(out.glob("shard-*.tar"))
    if old and not overwrite:
        raise FileExistsError(f"out_dir: {out} already holds {len(old)} shards; pass overwrite=True (--overwrite)")
    for p in old:
        p.unlink()
        Path(str(p)[:-4] + INDEX_SUFFIX).unlink(missing_ok=True)

    report = ShardReport(str(src_dir), str(out), videos_found=len(sources))
    limit_bytes = shard_size_mb * 2**20
    pending: list[tuple[str, dict[str, bytes]]] = []
    pending_bytes = 0
    taken: set[str] = set()

    def flush() -> None:
        nonlocal pending, pending_bytes
        if pending:
            path = out / f"shard-{len(report.shards):06d}.tar"
            write_shard(path, pending)
            report.shards.append(path.name)
            report.bytes_written += path.stat().st_size
            report.samples_written += len(pending)
            pending, pending_bytes = [], 0

    pool = mp.get_context("fork").Pool(num_workers) if num_workers > 0 else None
    try:
        checks = (pool.imap(_check_video, [str(s.path) for s in sources], chunksize=4) if pool
                  else map(_check_video, (str(s.path) for s in sources)))
        bar = tqdm(zip(sources, checks), total=len(sources), desc="make_shards", unit="video", disable=not progress)
        for sv, facts in bar:
            sample = _build_sample(sv, facts, report, taken, require_caption,
                                   (min_frames, min_height, min_width, max_frames))
            if sample is None:
                continue
            size = sum(len(b) for b in sample[1].values())
            if pending and (pending_bytes + size > limit_bytes or
                            (max_samples_per_shard and len(pending) >= max_samples_per_shard)):
                flush()
            pending.append(sample)
            pending_bytes += size
            bar.set_postfix(shards=len(report.shards), skipped=len(report.skipped), corrupt=len(report.corrupt))
        flush()
    finally:
        if pool is not None:
            pool.terminate()
    _write_report(out / "report.json", report)
    return report


def _build_sample(sv: SourceVideo, facts: dict, report: ShardReport, taken: set[str], require_caption: bool,
                  limits: tuple) -> tuple[str, dict[str, bytes]] | None:
    if "error" in facts:
        report.corrupt.append((sv.rel, facts["error"]))
        return None
    if sv.problem:
        report.skipped.append((sv.rel, sv.problem))
        return None
    reason = _filter_reason(facts, *limits)
    if reason:
        report.skipped.append((sv.rel, reason))
        return None
    if sv.caption is None and require_caption:
        report.skipped.append((sv.rel, "no caption (csv row, .txt or .json 'caption')"))
        return None
    try:
        data = sv.path.read_bytes()
    except OSError as e:
        report.corrupt.append((sv.rel, f"unreadable: {e}"))
        return None
    key = sample_key(sv.rel, taken)
    meta = {"key": key, "source": sv.rel, **facts, "caption_source": sv.caption_source or "none"}
    if sv.sidecar:
        meta["trajectories"] = sv.sidecar
    ext = sv.path.suffix.lower().lstrip(".")
    return key, {ext: data, "txt": (sv.caption or "").encode("utf-8"), "json": json.dumps(meta).encode("utf-8")}


def _write_report(path: Path, report: ShardReport) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(asdict(report), indent=1))
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("src_dir")
    ap.add_argument("out_dir")
    ap.add_argument("--shard-size-mb", type=float, default=256.0)
    ap.add_argument("--max-samples-per-shard", type=int, default=None)
    ap.add_argument("--min-frames", type=int, default=1)
    ap.add_argument("--max-frames", type=int, default=None)
    ap.add_argument("--min-height", type=int, default=1)
    ap.add_argument("--min-width", type=int, default=1)
    ap.add_argument("--captions-csv", default=None)
    ap.add_argument("--allow-no-caption", action="store_true", help="keep uncaptioned videos with an empty caption")
    ap.add_argument("--workers", type=int, default=0, help="processes that decode-check videos")
    ap.add_argument("--overwrite", action="store_true")
    a = ap.parse_args(argv)
    try:
        report = make_shards(a.src_dir, a.out_dir, a.shard_size_mb, a.max_samples_per_shard, a.min_frames,
                             a.min_height, a.min_width, a.max_frames, a.captions_csv, not a.allow_no_caption,
                             a.workers, a.overwrite)
    except (FileNotFoundError, FileExistsError, NotADirectoryError, PermissionError, ValueError) as e:
        raise SystemExit(f"make_shards: {e}") from None   # a missing input or bad argument: one line, exit 1
    print(report.summary())
    for rel, why in report.corrupt[:20]:
        print(f"  corrupt: {rel}: {why}")
    for rel, why in report.skipped[:20]:
        print(f"  skipped: {rel}: {why}")
    if len(report.corrupt) + len(report.skipped) > 40:
        print(f"  ... full list in {Path(a.out_dir) / 'report.json'}")


if __name__ == "__main__":
    main()
