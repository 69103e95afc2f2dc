"""Video files for inference: a streaming mp4 writer (the file plays while it grows), frame dumps, and readers
for the I2V image and the V2V prefix video (scaled to the run's size, resampled to its fps). PyAV only.

Streaming: fragmented mp4 (moov first, one fragment per frame), x264 without lookahead so every frame is muxed
as soon as it is encoded, and a keyframe at the start of every chunk. The muxer closes a fragment when the next
frame arrives, so after a chunk is written every frame but its last is readable; close() writes the rest.
The file is written in place (it must be readable while it grows), not through a temp file."""
from __future__ import annotations

import os
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import torch

STREAM_MOVFLAGS = "frag_every_frame+empty_moov+default_base_moof"


def to_uint8_frames(video: torch.Tensor) -> np.ndarray:
    """[3, T, H, W] (or [1, 3, T, H, W]) in [-1, 1] -> uint8 [T, H, W, 3]."""
    if video.dim() == 5:
        if video.shape[0] != 1:
            raise ValueError(f"to_uint8_frames: one video at a time, got batch {video.shape[0]}")
        video = video[0]
    frames = ((video.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return frames.permute(1, 2, 3, 0).cpu().numpy()


def frames_to_video(frames: np.ndarray) -> torch.Tensor:
    """uint8 [T, H, W, 3] -> float [1, 3, T, H, W] in [-1, 1] (what the VAE encodes)."""
    return torch.from_numpy(np.ascontiguousarray(frames)).permute(3, 0, 1, 2)[None].float() / 127.5 - 1.0


class PngDumper:
    """Writes frame_00000.png, frame_00001.png, ... into a directory (temp file + rename per frame)."""

    def __init__(self, directory: str | os.PathLike):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.count = 0

    def write(self, frames: np.ndarray) -> None:
        for frame in frames:
            codec = av.CodecContext.create("png", "w")
            codec.width, codec.height, codec.pix_fmt = frame.shape[1], frame.shape[0], "rgb24"
            data = b"".join(bytes(p) for p in codec.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
            data += b"".join(bytes(p) for p in codec.encode(None))
            path = self.dir / f"frame_{self.count:05d}.png"
            tmp = path.with_suffix(".png.tmp")
            tmp.write_bytes(data)
            os.replace(tmp, path)
            self.count += 1


class StreamingVideoWriter:
    """write(frames uint8 [T, H, W, 3]) appends a chunk to a playable, growing mp4."""

    def __init__(self, path: str | os.PathLike, fps: int, width: int, height: int, crf: int = 18,
                 frames_dir: str | os.PathLike | None = None):
        if width % 2 or height % 2:
            raise ValueError(f"video size {width}x{height}: H.264 needs even width and height")
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.width, self.height = width, height
        self.container = av.open(str(self.path), "w", format="mp4",
                                 options={"movflags": STREAM_MOVFLAGS, "flush_packets": "1"})
        self.stream = self.container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001),
                                                options={"tune": "zerolatency", "preset": "veryfast", "crf": str(crf)})
        self.stream.width, self.stream.height, self.stream.pix_fmt = width, height, "yuv420p"
        self.dumper = PngDumper(frames_dir) if frames_dir else None
        self.frames_written = 0
        self.closed = False

    def write(self, frames: np.ndarray) -> None:
        if self.closed:
            raise RuntimeError(f"{self.path}: writer is closed")
        if frames.ndim != 4 or frames.shape[1:] != (self.height, self.width, 3) or frames.dtype != np.uint8:
            raise ValueError(f"frames: expected uint8 [T, {self.height}, {self.width}, 3], got {frames.dtype} "
                             f"{list(frames.shape)}")
        for i, frame in enumerate(frames):
            vf = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")
            if i == 0:  # a keyframe per chunk: each chunk decodes on its own
                vf.pict_type = av.video.frame.PictureType.I
            for packet in self.stream.encode(vf):
                self.container.mux(packet)
        self.frames_written += len(frames)
        if self.dumper is not None:
            self.dumper.write(frames)

    def close(self) -> None:
        if self.closed:
            return
        for packet in self.stream.encode(None):
            self.container.mux(packet)
        self.container.close()
        self.closed = True

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


def _resized(frame: av.VideoFrame, width: int, height: int) -> np.ndarray:
    return frame.reformat(width=width, height=height, format="rgb24").to_ndarray()


def read_image(path: str | os.PathLike, width: int, height: int) -> np.ndarray:
    """The I2V image scaled to width x height (MAGI-1's 'fit'): uint8 [1, H, W, 3]."""
    if not Path(path).exists():
        raise FileNotFoundError(f"image_path: {path} does not exist")
    with av.open(str(path)) as c:
        for frame in c.decode(video=0):
            return _resized(frame, width, height)[None]
    raise ValueError(f"image_path: {path} holds no image")


def read_prefix_video(path: str | os.PathLike, fps: float, width: int, height: int, max_frames: int) -> np.ndarray:
    """The first max_frames frames of a video resampled to fps and scaled: uint8 [T, H, W, 3]."""
    if not Path(path).exists():
        raise FileNotFoundError(f"prefix_video_path: {path} does not exist")
    out: list[np.ndarray] = []
    with av.open(str(path)) as c:
        stream = c.streams.video[0]
        for frame in c.decode(stream):
            t = float(frame.pts * stream.time_base) if frame.pts is not None else len(out) / fps
            # fps conversion: each output tick takes the first source frame at or after it
            while len(out) < max_frames and len(out) / fps <= t + 1e-6:
                out.append(_resized(frame, width, height))
            if len(out) >= max_frames:
                break
    if not out:
        raise ValueError(f"prefix_video_path: {path} holds no frame")
    return np.stack(out)


def count_frames(path: str | os.PathLike) -> int:
    """Frames a reader can decode from the file right now (used to watch a stream grow)."""
    with av.open(str(path)) as c:
        return sum(1 for _ in c.decode(video=0))
