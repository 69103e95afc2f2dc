"""Held-out clips of an evaluation, at the model's size and frame rate: what conditions the model (a video whose
first prefix_frames frames are the prefix), the true continuation, and where known a second real take (Physics-IQ)
and the true trajectories (synthetic world).

Two layouts:
  synthetic    NAME.mp4 + NAME.json (trajectories) + NAME.txt (caption), as data_tools.synthetic_world writes; the
               clip's first frames are the prefix, the next ones the truth.
  physics_iq   a local copy of the Physics-IQ benchmark: split-videos/{conditioning,testing}[-videos]/{fps}FPS/
               {id}_{conditioning|testing}-videos_{fps}FPS_{view}_take-{1|2}_{scenario}.mp4, captions from
               descriptions/descriptions.csv when present; the prefix is the end of the conditioning video, the
               truth the start of take 1, and take 2 of the same view and scenario gives the physical variance."""
from __future__ import annotations

import csv
import json
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from magi_infer.video_io import read_prefix_video
from magi_train.data.video_codec import write_video

from .config import ClipsConfig

ALL_FRAMES = 1 << 30


@dataclass
class EvalClip:
    name: str
    caption: str
    prefix_video: Path            # its first prefix frames condition the model
    prefix: np.ndarray            # uint8 [P, H, W, 3] as the model sees them
    truth: np.ndarray             # uint8 [F, H, W, 3]
    take2: Optional[np.ndarray] = None        # a second real take of the continuation (Physics-IQ)
    trajectories: Optional[dict] = None       # synthetic-world json
    trajectory_first_frame: int = 0           # frame of the json that truth[0] is


def load_clips(cfg: ClipsConfig, fps: int, width: int, height: int, scratch: Path) -> list[EvalClip]:
    """The first cfg.max_clips clips. scratch: where Physics-IQ prefixes are written as short videos."""
    root = Path(cfg.path).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"clips.path: {cfg.path} is not a directory")
    if cfg.kind == "synthetic":
        return _synthetic(root, cfg, fps, width, height)
    return _physics_iq(root, cfg, fps, width, height, scratch)


def _read(path: Path, fps: int, width: int, height: int, frames: int) -> np.ndarray:
    return read_prefix_video(path, fps, width, height, frames)


def _synthetic(root: Path, cfg: ClipsConfig, fps, width, height) -> list[EvalClip]:
    videos = sorted(p for p in root.glob("*.mp4") if p.with_suffix(".json").exists())
    if not videos:
        raise FileNotFoundError(f"clips.path: no *.mp4 with a trajectory .json beside it in {root}")
    P, F = cfg.prefix_frames, cfg.num_frames
    out = []
    for v in videos[:cfg.max_clips]:
        frames = _read(v, fps, width, height, P + F)
        if len(frames) < P + F:
            raise ValueError(f"clips: {v.name} has {len(frames)} frames at {fps} fps, needs clips.prefix_frames + "
                             f"clips.num_frames = {P + F}")
        caption = v.with_suffix(".txt").read_text().strip() if v.with_suffix(".txt").exists() else ""
        out.append(EvalClip(v.stem, caption, v, frames[:P], frames[P:], None,
                            json.loads(v.with_suffix(".json").read_text()), P))
    return out


_NAME = re.compile(r"(?P<id>\d+)_(?P<kind>conditioning|testing)-videos_(?P<fps>\d+)FPS_(?P<view>[^_]+)_"
                   r"take-(?P<take>\d)_(?P<scenario>.+)\.mp4")


def _split_dir(root: Path, kind: str, fps: int) -> Path:
    for name in (f"{kind}-videos", kind):
        d = root / "split-videos" / name / f"{fps}FPS"
        if d.is_dir():
            return d
    have = sorted(str(p.relative_to(root)) for p in (root / "split-videos").glob("*/*FPS")) \
        if (root / "split-videos").is_dir() else []
    raise FileNotFoundError(f"clips.path: {root} has no split-videos/{kind}-videos/{fps}FPS for the model's {fps} fps "
                            f"(found: {', '.join(have) or 'nothing'}; Physics-IQ's fps_changer makes other rates)")


def _captions(root: Path) -> dict[str, str]:
    path = root / "descriptions" / "descriptions.csv"
    if not path.is_file():
        return {}
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    return {Path(r["scenario"]).stem: r["description"] for r in rows if r.get("scenario") and r.get("description")}


def _physics_iq(root: Path, cfg: ClipsConfig, fps, width, height, scratch: Path) -> list[EvalClip]:
    cond_dir, test_dir = _split_dir(root, "conditioning", fps), _split_dir(root, "testing", fps)
    tests = [m for m in map(_NAME.fullmatch, sorted(p.name for p in test_dir.glob("*.mp4"))) if m]
    take2 = {(m["view"], m["scenario"]): m.string for m in tests if m["take"] == "2"}
    captions = _captions(root)
    P, F = cfg.prefix_frames, cfg.num_frames
    out = []
    for m in [m for m in tests if m["take"] == "1"][:cfg.max_clips]:
        key = f"{m['id']}_{m['view']}_take-1_{m['scenario']}"
        cond = cond_dir / f"{m['id']}_conditioning-videos_{fps}FPS_{m['view']}_take-1_{m['scenario']}.mp4"
        if not cond.is_file():
            raise FileNotFoundError(f"clips.path: {cond} (the conditioning video of {m.string}) does not exist")
        if (m["view"], m["scenario"]) not in take2:
            raise FileNotFoundError(f"clips.path: no take-2 testing video for {m['view']} {m['scenario']} in {test_dir}")
        prefix = _read(cond, fps, width, height, ALL_FRAMES)[-P:]
        truth = _read(test_dir / m.string, fps, width, height, F)
        second = _read(test_dir / take2[(m["view"], m["scenario"])], fps, width, height, F)
        if len(prefix) < P or len(truth) < F or len(second) < F:
            raise ValueError(f"clips: {key} has {len(prefix)} conditioning and {min(len(truth), len(second))} testing "
                             f"frames at {fps} fps, needs clips.prefix_frames={P} and clips.num_frames={F}")
        # the model reads its prefix from a video: the conditioning video's last P frames, written losslessly
        prefix_video = write_video(scratch / f"{key}.prefix.mp4", prefix, fps, crf=0)
        traj_path = (test_dir / m.string).with_suffix(".json")
        traj = json.loads(traj_path.read_text()) if traj_path.is_file() else None
        caption = captions.get(key, m["scenario"].removeprefix("trimmed-").replace("-", " "))
        out.append(EvalClip(key, caption, prefix_video, prefix, truth, second, traj, 0))
    if not out:
        raise FileNotFoundError(f"clips.path: no take-1 testing videos named like Physics-IQ's in {test_dir}")
    return out


def scratch_dir() -> tempfile.TemporaryDirectory:
    return tempfile.TemporaryDirectory(prefix="magi_eval_")


__all__ = ["EvalClip", "load_clips", "scratch_dir"]
