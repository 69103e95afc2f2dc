"""python -m magi_infer end to end on the tiny model (CPU) in every mode, and its one-line errors."""
import json
import subprocess
import sys

import numpy as np
import pytest

from magi_infer.cli import main
from magi_infer.video_io import PngDumper, count_frames
from magi_train.data.video_codec import probe_video, write_video

FAST = ["video_size_h=32", "video_size_w=32", "num_frames=16", "num_steps=4", "window_size=2",
        "noise2clean_kvrange=[2,1]"]


pytestmark = pytest.mark.usefixtures("one_thread")


def cli(tmp_path, mode, *extra, overrides=()):
    out = tmp_path / f"{mode}.mp4"
    stats = tmp_path / f"{mode}.json"
    rc = main(["--config_file", "configs/infer/tiny.yaml", "--mode", mode, "--prompt", "a red ball rolls",
               "--output_path", str(out), "--no_progress", "--stats_json", str(stats), *extra, *FAST, *overrides])
    return rc, out, (json.loads(stats.read_text()) if stats.exists() else None)


def test_t2v_with_chunk_wise_prompts(tmp_path, capsys):
    rc, out, stats = cli(tmp_path, "t2v", "--prompt", "it bounces", "--prompt_start_chunks", "0,1")
    assert rc == 0 and count_frames(out) == 16 and stats["chunks"] == 2
    # the first line says what runs
    assert capsys.readouterr().out.splitlines()[0] == (
        "magi_infer: attention sdpa_chunked, dtype float32, device cpu, layout tp1 cp1 pp1, compile off")
    info = probe_video(out)
    assert (info["height"], info["width"], round(info["fps"])) == (32, 32, 8)


def test_i2v(tmp_path):
    frame = np.zeros((1, 48, 40, 3), np.uint8)
    frame[..., 2] = 255
    PngDumper(tmp_path / "img").write(frame)
    rc, out, stats = cli(tmp_path, "i2v", "--image_path", str(tmp_path / "img" / "frame_00000.png"))
    # MAGI-1: the image's latent frame plus num_frames, rounded up to chunks (3 chunks of 8 frames)
    assert rc == 0 and count_frames(out) == 24 and stats["chunks"] == 3


def test_v2v(tmp_path):
    frames = np.random.default_rng(0).integers(0, 255, (20, 32, 32, 3), dtype=np.uint8)
    write_video(tmp_path / "prefix.mp4", frames, fps=8)
    rc, out, stats = cli(tmp_path, "v2v", "--prefix_video_path", str(tmp_path / "prefix.mp4"),
                         overrides=["prefix_frames=12"])
    # 12 prefix frames = 3 latent frames: chunk 0 cached, 1 frame pinned in chunk 1; 4 + 3 -> 4 chunks
    assert rc == 0 and stats["chunks"] == 3 and count_frames(out) == 4 * 5


@pytest.mark.parametrize("overrides,message", [
    (["num_stepz=4"], "num_stepz: unknown key; did you mean num_steps?"),
    (["video_size_h=40"], "video_size_h: 40 is not divisible by 16"),
    (["num_frames=12"], "num_frames: 12 is not a multiple of the chunk"),
    (["num_steps=5"], "num_steps: must be a multiple of window_size"),
])
def test_bad_input_gets_one_line(tmp_path, capsys, overrides, message):
    rc, out, _ = cli(tmp_path, "t2v", overrides=overrides)
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("error: ") and message in err and "\n" not in err
    assert not out.exists()


def test_missing_image_for_i2v(tmp_path, capsys):
    rc, _, _ = cli(tmp_path, "i2v")
    assert rc == 2 and "image_path" in capsys.readouterr().err


def test_module_entry_point(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "magi_infer", "--config_file", "configs/infer/tiny.yaml", "--mode",
                           "t2v", "--prompt", "x", "--output_path", str(tmp_path / "o.mp4"), "video_size_w=20"],
                          capture_output=True, text=True, timeout=120)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error")]
    assert proc.returncode == 2 and errors == ["error: video_size_w: 20 is not divisible by 16 (VAE factor 8 x patch 2)"]
