"""Streaming mp4 (readable while it grows), frame dumps, and the I2V / V2V readers."""
import numpy as np
import pytest
import torch

from magi_infer.config import load_infer_config
from magi_infer.runner import MagiRunner
from magi_infer.video_io import (PngDumper, StreamingVideoWriter, count_frames, read_image, read_prefix_video,
                                 to_uint8_frames)
from magi_train.data.video_codec import read_video, write_video


pytestmark = pytest.mark.usefixtures("one_thread")


def ramp(t, h=32, w=48, offset=0):
    frames = np.zeros((t, h, w, 3), np.uint8)
    for i in range(t):
        frames[i, :, :, 0] = (offset + i * 20) % 256
        frames[i, :, :, 1] = np.linspace(0, 255, w, dtype=np.uint8)[None]
    return frames


def test_writer_file_is_readable_after_every_chunk(tmp_path):
    path = tmp_path / "s.mp4"
    counts = []
    with StreamingVideoWriter(path, fps=8, width=48, height=32, frames_dir=tmp_path / "frames") as w:
        for k in range(3):
            w.write(ramp(8, offset=k * 60))
            counts.append(count_frames(path))
    # the muxer writes a frame's fragment when the next frame arrives: all but the newest are on disk
    assert counts == [7, 15, 23]
    frames, fps = read_video(path)
    assert frames.shape == (24, 32, 48, 3) and fps == 8
    assert abs(int(frames[9, 5, 5, 0]) - 80) < 8   # chunk 1, frame 1 (red ramp survives the codec)
    assert len(list((tmp_path / "frames").glob("frame_*.png"))) == 24
    with pytest.raises(ValueError, match="frames"):
        StreamingVideoWriter(tmp_path / "x.mp4", 8, 48, 32).write(ramp(2, h=16))


def test_png_dump_round_trip(tmp_path):
    PngDumper(tmp_path).write(ramp(1))
    img = read_image(tmp_path / "frame_00000.png", width=48, height=32)
    assert img.shape == (1, 32, 48, 3) and np.array_equal(img, ramp(1))
    assert read_image(tmp_path / "frame_00000.png", width=16, height=16).shape == (1, 16, 16, 3)


def test_prefix_video_reader_resamples_and_scales(tmp_path):
    write_video(tmp_path / "p.mp4", ramp(24), fps=24)
    same = read_prefix_video(tmp_path / "p.mp4", fps=24, width=48, height=32, max_frames=10)
    assert same.shape == (10, 32, 48, 3)
    half = read_prefix_video(tmp_path / "p.mp4", fps=12, width=16, height=16, max_frames=32)
    assert half.shape == (12, 16, 16, 3)   # 1 s at 12 fps
    assert abs(int(half[3, 8, 8, 0]) - int(same[6, 16, 24, 0])) < 8   # every other frame


def test_to_uint8_frames():
    v = torch.tensor([-1.0, 0.0, 1.0]).reshape(1, 1, 3, 1, 1).expand(1, 3, 3, 1, 1)
    assert to_uint8_frames(v)[:, 0, 0, 0].tolist() == [0, 128, 255]


def test_runner_streams_while_generating(tmp_path):
    cfg = load_infer_config("configs/infer/tiny.yaml", ["video_size_h=32", "video_size_w=32", "num_frames=24",
                                                        "num_steps=4", "window_size=2", "noise2clean_kvrange=[2,1]"])
    runner = MagiRunner(cfg)
    path = tmp_path / "out.mp4"
    seen = []
    stats = runner.run("t2v", ["a red ball"], str(path), progress=False,
                       on_chunk=lambda chunk, writer: seen.append((chunk.index, count_frames(path))))
    assert [i for i, _ in seen] == [0, 1, 2]
    counts = [c for _, c in seen]
    assert counts == sorted(counts) and counts[0] >= 7 and counts[-1] >= 23
    assert count_frames(path) == 24 and stats["frames"] == 24 and len(stats["seconds_per_chunk"]) == 3


def test_runner_writes_the_mp4_off_the_thread_that_runs_the_denoising_loop(tmp_path, monkeypatch):
    """The thread that queues the GPU's work does nothing else: the mp4 is encoded on the decode thread."""
    import threading

    writers = []
    real_write = StreamingVideoWriter.write
    monkeypatch.setattr(StreamingVideoWriter, "write",
                        lambda self, frames: (writers.append(threading.current_thread().name), real_write(self, frames)))
    cfg = load_infer_config("configs/infer/tiny.yaml", ["video_size_h=32", "video_size_w=32", "num_frames=16",
                                                        "num_steps=2", "window_size=1", "noise2clean_kvrange=[]"])
    stats = MagiRunner(cfg).run("t2v", ["a red ball"], str(tmp_path / "out.mp4"), progress=False)
    assert len(writers) == stats["chunks"] == 2
    assert threading.current_thread().name not in writers and set(writers) == {"magi-decode"}
    assert count_frames(tmp_path / "out.mp4") == 16
