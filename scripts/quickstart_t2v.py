#!/usr/bin/env python
"""The quickstart's T2V object check over several held-out prompts instead of one: one table row per sampler
setting, read from a quickstart run directory (its infer.json and exported weights).

  python scripts/quickstart_t2v.py --run-dir runs/quickstart --prompts 8
  python scripts/quickstart_t2v.py --run-dir R --set text_scales=[7.5,7.5,7.5,0,0] --set num_steps=32

Each --set is one row (space-separated magi_infer overrides; none = the quickstart's own T2V call). Columns: mean
share of the 24 generated frames that hold an object of a colour the prompt names
(data_tools.world_tracker.object_presence, as scripts/quickstart.py's t2v_check), prompts with an object in at least
90% of their frames, mean travel of that object (px), mean pixels of the best object per frame. Runs one thread."""
from __future__ import annotations

import argparse
import contextlib
import io
import os
import shlex
import sys
import tempfile
from pathlib import Path

import numpy as np


def t2v_presence(run: Path, clip: int, overrides: list[str], work: Path) -> tuple[dict, np.ndarray]:
    from magi_infer.cli import main as infer
    from quickstart import t2v_presence as presence   # the quickstart's own check of one video

    val = run / "world" / "val"
    prompt = (val / f"val-{clip:06d}.txt").read_text().strip()
    frames_dir = work / f"t2v_{clip}"
    argv = ["--config_file", str(run / "infer.json"), "--mode", "t2v", "--prompt", prompt, "--no_progress",
            "--output_path", str(work / f"t2v_{clip}.mp4"), "num_frames=24", f"frames_dir={frames_dir}", *overrides]
    with contextlib.redirect_stdout(io.StringIO()):
        if infer(argv) != 0:
            sys.exit(f"magi_infer failed for clip {clip} with {overrides}")
    return presence(frames_dir, val / f"val-{clip:06d}.json")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run-dir", required=True)
    ap.add_argument("--prompts", type=int, default=8, help="held-out clips 0..N-1 give the prompts")
    ap.add_argument("--set", action="append", default=[], help="magi_infer overrides of one row")
    ap.add_argument("--strips", help="write each row's T2V frames here as a PNG strip (one row per prompt)")
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    run = Path(args.run_dir).resolve()
    print("| sampler overrides | frames with an object | prompts >= 90% | travel px | pixels |")
    print("|---|---|---|---|---|")
    for k, row in enumerate(args.set or [""]):
        overrides = shlex.split(row)
        with tempfile.TemporaryDirectory() as tmp:
            out = [t2v_presence(run, i, overrides, Path(tmp)) for i in range(args.prompts)]
        res = [r for r, _ in out]
        if args.strips:
            from magi_train.evaluation.png_strip import write_strip

            Path(args.strips).mkdir(parents=True, exist_ok=True)
            write_strip(Path(args.strips) / f"t2v_row{k}.png", [(f,) for _, f in out], prefix_frames=1, every=2,
                        labels=["T2V"])
        share = [r["frames_with_object"] for r in res]
        print(f"| {row or '(the quickstart T2V call)'} | {np.mean(share):.0%} ({' '.join(f'{s:.0%}' for s in share)}) "
              f"| {sum(s >= 0.9 for s in share)}/{len(res)} | {np.mean([r['travel_px'] for r in res]):.1f} "
              f"| {np.mean([r['pixels'] for r in res]):.1f} |", flush=True)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main())
