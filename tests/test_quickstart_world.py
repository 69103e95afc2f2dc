"""The quickstart's synthetic world decodes to the same frames on every run (issue 21: two runs an hour apart got
x264 bytes that differed in 12-14 of 48 clips, so the latent space and the weights moved). x264's choices are not
reproducible, so the quickstart encodes losslessly: whatever bytes x264 writes, they decode to the same frames.
Here two presets stand in for two runs (they make different bytes, as the varying runs did)."""
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from data_tools.synthetic_world import WorldConfig, clip_seed, generate_clip
from magi_train.data.video_codec import read_video, write_video

ROOT = Path(__file__).resolve().parent.parent


def _quickstart():
    spec = importlib.util.spec_from_file_location("quickstart_world_args", ROOT / "scripts" / "quickstart.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _quickstart_world_args() -> list[str]:
    return _quickstart().world_args()


def _arg(args: list[str], name: str) -> str:
    return args[args.index(name) + 1]


def test_world_clips_decode_the_same_whatever_bytes_x264_writes(tmp_path):
    args = _quickstart_world_args()
    crf = int(_arg(args, "--crf"))
    cfg = WorldConfig(height=int(_arg(args, "--height")), width=int(_arg(args, "--width")), num_frames=8,
                      fps=float(_arg(args, "--fps")))
    for i in range(3):
        frames = generate_clip(cfg, clip_seed(0, i)).frames
        paths = [write_video(tmp_path / f"{i}_{p}.mp4", frames, cfg.fps, crf=crf, preset=p, threads=1)
                 for p in ("medium", "veryslow")]
        assert paths[0].read_bytes() != paths[1].read_bytes()          # different encodings ...
        a, b = (read_video(p)[0] for p in paths)
        np.testing.assert_array_equal(a, b)                            # ... of the same frames


def test_world_cli_writes_what_the_quickstart_asks(tmp_path):
    """The CLI passes the quickstart's crf on to the encoder: its clip decodes as a lossless one does."""
    args = _quickstart_world_args()
    subprocess.run([sys.executable, "-m", "data_tools.synthetic_world", str(tmp_path), "--num-clips", "1",
                    "--seed", "3", *args], cwd=ROOT, check=True, capture_output=True)
    cfg = WorldConfig(height=int(_arg(args, "--height")), width=int(_arg(args, "--width")),
                      num_frames=int(_arg(args, "--num-frames")), fps=float(_arg(args, "--fps")),
                      max_objects=int(_arg(args, "--max-objects")))
    frames = generate_clip(cfg, clip_seed(3, 0)).frames
    reference = write_video(tmp_path / "reference.mp4", frames, cfg.fps, crf=0, preset="veryslow", threads=1)
    np.testing.assert_array_equal(read_video(tmp_path / "train-000000.mp4")[0], read_video(reference)[0])


def test_a_run_directory_keeps_the_world_it_was_made_with(tmp_path):
    """Finished stages are skipped on a rerun, so asking for another object count in the same run directory would
    score a model of one world with the sampler settings of another: the quickstart refuses, naming the flag."""
    module = _quickstart()
    world = tmp_path / "world"
    world.mkdir()
    (world / "world_args.json").write_text(json.dumps(module.world_args(1)))
    with pytest.raises(SystemExit) as exit_:
        module.main(["--run-dir", str(tmp_path), "--max-objects", "3"])
    assert "--max-objects 3" in str(exit_.value.code) and "--max-objects 1" in str(exit_.value.code)
