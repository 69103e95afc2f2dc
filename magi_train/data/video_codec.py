"""Read and write whole videos with PyAV (frames as uint8 [T, H, W, 3] RGB arrays).

Writers are atomic (temp file + os.replace) and bit-exact across runs for the same input and settings, so a
seeded generator produces the same bytes every time. Readers raise CorruptVideoError (a ValueError) with the
file name and the reason instead of returning a short or garbled clip.
"""
from __future__ import annotations

import io
import os
import tempfile
from fractions import Fraction
from pathlib import Path
from typing import BinaryIO, Union

import av
import numpy as np
from av.video.reformatter import VideoReformatter

VideoSource = Union[str, os.PathLike, bytes, bytearray, memoryview, BinaryIO]

# Codecs whose default pixel format is chroma-subsampled 4:2:0 and therefore need even frame sizes.
_YUV420_CODECS = {"libx264", "h264", "libopenh264", "libvpx", "libvpx-vp9", "mpeg4", "libx265", "hevc"}
_CONTAINER_FLAGS = {".mp4": {"movflags": "+faststart"}, ".mov": {"movflags": "+faststart"}}


class CorruptVideoError(ValueError):
    """The bytes are not a decodable video (truncated, garbled, no video stream, or no frames)."""


def _name(src: VideoSource) -> str:
    if isinstance(src, (str, os.PathLike)):
        return str(src)
    return f"<{type(src).__name__} video>"


def _open_input(src: VideoSource):
    if isinstance(src, (bytes, bytearray, memoryview)):
        return av.open(io.BytesIO(bytes(src)), mode="r")
    return av.open(src if not isinstance(src, os.PathLike) else os.fspath(src), mode="r")


def read_video(src: VideoSource, max_frames: int | None = None) -> tuple[np.ndarray, float]:
    """Decode every frame (or the first max_frames) of a video file, bytes or binary file object.

    Returns (frames uint8 [T, H, W, 3] RGB, fps). Raises CorruptVideoError when the container cannot be
    opened, holds no video stream, yields no frame, or yields fewer frames than its header announces
    (the usual sign of a truncated file whose index survived).
    """
    name = _name(src)
    frames: list[np.ndarray] = []
    try:
        with _open_input(src) as container:
            if not container.streams.video:
                raise CorruptVideoError(f"{name}: no video stream")
            stream = container.streams.video[0]
            announced = int(stream.frames or 0)
            rate = stream.average_rate or stream.guessed_rate or stream.base_rate
            fps = float(rate) if rate else 0.0
            # one reformatter for the whole clip: a fresh colour converter per frame costs more than decoding
            rgb = VideoReformatter()
            for frame in container.decode(stream):
                frames.append(rgb.reformat(frame, format="rgb24").to_ndarray())
                if max_frames is not None and len(frames) >= max_frames:
                    break
    except CorruptVideoError:
        raise
    except (av.FFmpegError, EOFError, OSError, ValueError, IndexError) as e:
        raise CorruptVideoError(f"{name}: cannot decode ({type(e).__name__}: {e})") from None
    if not frames:
        raise CorruptVideoError(f"{name}: no decodable frame")
    if max_frames is None and announced and len(frames) < announced:
        raise CorruptVideoError(f"{name}: truncated, decoded {len(frames)} of {announced} frames")
    if fps <= 0:
        raise CorruptVideoError(f"{name}: unknown frame rate")
    return np.stack(frames), fps


def probe_video(src: VideoSource) -> dict:
    """Header facts without decoding pixels: {"fps", "frames" (0 if unknown), "height", "width", "codec"}."""
    name = _name(src)
    try:
        with _open_input(src) as container:
            if not container.streams.video:
                raise CorruptVideoError(f"{name}: no video stream")
            s = container.streams.video[0]
            rate = s.average_rate or s.guessed_rate or s.base_rate
            return {"fps": float(rate) if rate else 0.0, "frames": int(s.frames or 0),
                    "height": int(s.codec_context.height), "width": int(s.codec_context.width),
                    "codec": s.codec_context.name}
    except CorruptVideoError:
        raise
    except (av.FFmpegError, EOFError, OSError, ValueError, IndexError) as e:
        raise CorruptVideoError(f"{name}: cannot open ({type(e).__name__}: {e})") from None


def _validate_frames(frames: np.ndarray, fps: float, codec: str) -> np.ndarray:
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.shape[0] < 1:
        raise ValueError(f"frames: expected uint8 [T, H, W, 3] with T >= 1, got shape {tuple(frames.shape)}")
    if frames.dtype != np.uint8:
        raise ValueError(f"frames: expected dtype uint8, got {frames.dtype}")
    if not fps > 0:
        raise ValueError(f"fps: must be > 0, got {fps}")
    h, w = frames.shape[1:3]
    if codec in _YUV420_CODECS and (h % 2 or w % 2):
        raise ValueError(f"frames: codec {codec} stores 4:2:0 chroma and needs even height and width, got {h}x{w}")
    return frames


# BT.601 limited range ("tv"), what swscale uses for untagged SD video; the stream is tagged accordingly.
_RGB_TO_YCBCR = np.array([[65.481, 128.553, 24.966],
                          [-37.797, -74.203, 112.0],
                          [112.0, -93.786, -18.214]], np.float32) / 255.0
_SMPTE170M, _RANGE_MPEG = 6, 1   # FFmpeg's AVCOL_{SPC,PRI,TRC}_SMPTE170M and AVCOL_RANGE_MPEG


def rgb_to_yuv420p(rgb: np.ndarray) -> np.ndarray:
    """uint8 [H, W, 3] RGB -> PyAV's yuv420p layout [H * 3 / 2, W] (Y plane, then U and V at half size).

    Done here rather than by swscale: swscale's SIMD reads the uninitialised padding of PyAV's frame buffers,
    which made the encoded bytes differ between runs now and then."""
    h, w = rgb.shape[:2]
    ycc = rgb.astype(np.float32) @ _RGB_TO_YCBCR.T + np.array([16.0, 128.0, 128.0], np.float32)
    y = ycc[..., 0]
    chroma = ycc[..., 1:].reshape(h // 2, 2, w // 2, 2, 2).mean(axis=(1, 3))   # 2x2 box filter
    planes = [y.reshape(-1), chroma[..., 0].reshape(-1), chroma[..., 1].reshape(-1)]
    return np.clip(np.rint(np.concatenate(planes)), 0, 255).astype(np.uint8).reshape(h * 3 // 2, w)


def write_video(path: str | os.PathLike, frames: np.ndarray, fps: float, codec: str = "libx264",
                crf: int = 18, preset: str = "medium", threads: int = 0) -> Path:
    """Encode uint8 [T, H, W, 3] RGB frames to path (container from its extension: .mp4, .mov, .webm, .mkv).

    Written as yuv420p (plays in browsers and standard players) to a temporary file that replaces path only
    once complete. threads=0 lets the encoder choose; pass threads=1 for bytes that are identical on every
    machine (x264's output depends on its thread count), as the synthetic world does.
    """
    frames = _validate_frames(frames, fps, codec)
    path = Path(path)
    suffix = path.suffix.lower()
    if not suffix:
        raise ValueError(f"path: needs an extension that names the container (.mp4, .mov, .webm, .mkv), got {path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=f".tmp{suffix}", dir=path.parent)
    os.close(fd)
    try:
        _encode(tmp, frames, fps, codec, crf, preset, threads, suffix)
        os.chmod(tmp, 0o644)   # mkstemp makes it private; a finished video is an ordinary readable file
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def _encode(tmp: str, frames: np.ndarray, fps: float, codec: str, crf: int, preset: str, threads: int,
            suffix: str) -> None:
    fmt = {".mp4": "mp4", ".mov": "mov", ".webm": "webm", ".mkv": "matroska"}.get(suffix)
    # bitexact: no library version strings or timestamps in the file, so equal input gives equal bytes.
    container_options = {"fflags": "+bitexact", **_CONTAINER_FLAGS.get(suffix, {})}
    with av.open(tmp, mode="w", format=fmt, container_options=container_options) as container:
        stream = container.add_stream(codec, rate=Fraction(fps).limit_denominator(100000))
        stream.width, stream.height = int(frames.shape[2]), int(frames.shape[1])
        stream.pix_fmt = "yuv420p"
        cc = stream.codec_context
        cc.thread_count = threads
        cc.colorspace, cc.color_primaries, cc.color_trc, cc.color_range = (_SMPTE170M, _SMPTE170M, _SMPTE170M,
                                                                            _RANGE_MPEG)
        cc.flags |= av.codec.context.Flags.bitexact
        opts = {}
        if codec == "libx264":
            opts = {"crf": str(crf), "preset": preset}
        elif codec in ("libvpx", "libvpx-vp9"):
            opts = {"crf": str(crf), "b": "0", "deadline": "good", "row-mt": "0"}
        stream.options = opts
        for rgb in frames:
            frame = av.VideoFrame.from_ndarray(rgb_to_yuv420p(rgb), format="yuv420p")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
