"""The README's first command, shortened (--fast): every stage runs through its real entry point and leaves
valid output (playable mp4s, a parseable score table, a plot, the PNG strips, MAGI-1 weights). Whether the
default trains a world model that works is measured in docs/quickstart.md (far too long for a test); what a test
can hold, that the latent space carries the objects, is tests/test_quickstart_latents.py."""
import csv
import json
import subprocess
import sys
from pathlib import Path

import av
import pytest

ROOT = Path(__file__).resolve().parent.parent


def _frames(path: Path) -> int:
    with av.open(str(path)) as c:
        return sum(1 for _ in c.decode(video=0))


@pytest.mark.timeout(400)
def test_fast_quickstart_end_to_end(tmp_path):
    run = tmp_path / "qs"
    proc = subprocess.run([sys.executable, "scripts/quickstart.py", "--fast", "--run-dir", str(run)], cwd=ROOT,
                          capture_output=True, text=True, env={"WANDB_MODE": "disabled", "OMP_NUM_THREADS": "2",
                                                               **{k: v for k, v in __import__("os").environ.items()
                                                                  if k not in ("WANDB_MODE",)}})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "quickstart summary" in proc.stdout
    summary = json.loads((run / "summary.json").read_text())
    assert set(summary["seconds_per_stage"]) >= {"world/train", "shards/train", "vae", "precompute/train", "train",
                                                  "infer/t2v", "infer/v2v", "evaluate"}
    assert _frames(run / "videos" / "t2v.mp4") == 24
    assert _frames(run / "videos" / "v2v_val-000000.mp4") == 12
    continuations = sorted((run / "eval" / "cells").glob("*/clip0.mp4"))   # prefix + continuation, one cell
    assert len(continuations) == 1 and _frames(continuations[0]) == 24
    rows = list(csv.DictReader(open(run / "eval" / "results.csv")))
    assert len(rows) == 1 and float(rows[0]["ssim_mean"]) <= 1.0
    assert (run / "eval" / "grid.png").stat().st_size > 1000
    assert (Path(summary["weights"]) / "model.safetensors").exists()
    assert float(summary["scores"]["ground_truth"]["traj_err_px"]) < 1.0   # the tracker itself is accurate
    from PIL import Image
    strip = Image.open(summary["strip"])   # 2 clips x 3 rows (truth | model | copy) of 32 px frames, enlarged 4x
    assert strip.size[1] > 2 * 3 * 128 and strip.size[0] >= 7 * 128
    assert (run / "videos" / "t2v.png").exists()
    assert set(summary["t2v"]) == {"frames_with_object", "travel_px", "pixels", "per_prompt"}
    assert len(summary["t2v"]["per_prompt"]) == 2   # T2V from each held-out clip's caption (--fast has 2)
    assert Image.open(run / "videos" / "t2v.png").size[1] > 2 * 128
    assert json.loads((run / "vae" / "config.json").read_text())["arch"]["architecture"] == "patch"
    # a rerun skips every finished stage
    again = subprocess.run([sys.executable, "scripts/quickstart.py", "--fast", "--run-dir", str(run)], cwd=ROOT,
                           capture_output=True, text=True)
    assert again.returncode == 0 and again.stdout.count("already done") >= 8
