"""The synthetic world written in the Physics-IQ benchmark's layout, for tests and demos of the Physics-IQ metrics
without the benchmark: each scene is one synthetic clip cut at its switch frame into a conditioning video and a
testing video (take 1), and a second take of the same start with slightly different bounciness and gravity (two
real takes of a scene differ the same way: only once something bounces or collides).

    python -m magi_eval.physics_iq_standin OUT --num-scenes 8 --height 32 --width 32 --fps 8 \
        --prefix-frames 12 --num-frames 12
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import sys
from pathlib import Path

from data_tools.synthetic_world import WorldConfig, clip_seed, generate_clip
from magi_train.data.video_codec import write_video

VIEW = "perspective-center"
TAKE2_RESTITUTION, TAKE2_GRAVITY = 0.9, 1.05     # factors of the second take's physics


def write_standin(out: Path, num_scenes: int, world: WorldConfig, prefix_frames: int, seed: int = 0) -> Path:
    fps = int(world.fps)
    cond = out / "split-videos" / "conditioning-videos" / f"{fps}FPS"
    test = out / "split-videos" / "testing-videos" / f"{fps}FPS"
    for d in (cond, test, out / "descriptions"):
        d.mkdir(parents=True, exist_ok=True)
    take2_world = dataclasses.replace(world, restitution=world.restitution * TAKE2_RESTITUTION,
                                      gravity=world.gravity * TAKE2_GRAVITY)
    rows = []
    for i in range(num_scenes):
        s = clip_seed(seed, i)
        one, two = generate_clip(world, s), generate_clip(take2_world, s)
        scenario = f"synthetic-{i:04d}"
        id1, id2 = f"{i + 1:04d}", f"{num_scenes + i + 1:04d}"
        write_video(cond / f"{id1}_conditioning-videos_{fps}FPS_{VIEW}_take-1_{scenario}.mp4",
                    one.frames[:prefix_frames], fps, threads=1)
        t1 = test / f"{id1}_testing-videos_{fps}FPS_{VIEW}_take-1_{scenario}.mp4"
        write_video(t1, one.frames[prefix_frames:], fps, threads=1)
        write_video(test / f"{id2}_testing-videos_{fps}FPS_{VIEW}_take-2_{scenario}.mp4", two.frames[prefix_frames:],
                    fps, threads=1)
        traj = dict(one.trajectories)   # centres from the switch frame on, as the testing video starts there
        traj["objects"] = [{**o, "centers": o["centers"][prefix_frames:]} for o in traj["objects"]]
        t1.with_suffix(".json").write_text(json.dumps(traj))
        rows.append({"scenario": f"{id1}_{VIEW}_take-1_{scenario}.mp4", "description": one.caption})
    with open(out / "descriptions" / "descriptions.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["scenario", "description"])
        w.writeheader()
        w.writerows(rows)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m magi_eval.physics_iq_standin", description=__doc__.split("\n")[0])
    ap.add_argument("out")
    ap.add_argument("--num-scenes", type=int, default=8)
    ap.add_argument("--height", type=int, default=32)
    ap.add_argument("--width", type=int, default=32)
    ap.add_argument("--fps", type=int, default=8)
    ap.add_argument("--prefix-frames", type=int, default=12)
    ap.add_argument("--num-frames", type=int, default=12, help="frames of each testing video")
    ap.add_argument("--seed", type=int, default=1)
    a = ap.parse_args(argv)
    try:
        world = WorldConfig(height=a.height, width=a.width, fps=a.fps, num_frames=a.prefix_frames + a.num_frames)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = write_standin(Path(a.out), a.num_scenes, world, a.prefix_frames, a.seed)
    print(f"wrote {a.num_scenes} scenes in the Physics-IQ layout to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
