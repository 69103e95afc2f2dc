"""Synthetic world: seeded short videos of balls and squares falling, bouncing off walls and each other.

Each clip comes with a caption written from what happens ("a red ball falls and bounces twice") and a json of
ground-truth trajectories (per object: shape, colour, size and the centre in pixels at every frame). The same
(config, seed) always gives the same frames, captions and trajectories, and the same mp4 bytes when encoded in a
fresh process (this CLI, or write_dataset(num_workers > 0)). Any resolution, fps and length.

    python -m data_tools.synthetic_world OUT_DIR --num-clips 64 --height 64 --width 64 --fps 12 --num-frames 24
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from magi_train.data.video_codec import write_video

from .world_caption import caption as make_caption, visible_events
from .world_physics import SHAPES, Body, PhysicsParams, overlap, simulate
from .world_render import BACKGROUND_COLOURS, BACKGROUND_KINDS, OBJECT_COLOURS, background_image, render
from .world_tracker import track_centroids, trajectory_error

__all__ = ["WorldConfig", "Clip", "generate_clip", "write_dataset", "track_centroids", "trajectory_error",
           "clip_seed", "OBJECT_COLOURS", "BACKGROUND_COLOURS"]

MIN_OBJECT_SIZE = 3.0   # pixels; smaller shapes vanish under anti-aliasing and codec blur
COORDINATES = "pixels, origin at the top-left corner, y down; pixel (row i, column j) has centre (j+0.5, i+0.5)"


@dataclass
class WorldConfig:
    height: int = 64                       # frame height in pixels
    width: int = 64                        # frame width in pixels
    fps: float = 12.0                      # frames per second (physics runs in seconds, so motion scales with it)
    num_frames: int = 24                   # frames per clip
    min_objects: int = 1                   # objects per clip, drawn uniformly in [min_objects, max_objects]
    max_objects: int = 3
    shapes: tuple[str, ...] = SHAPES       # subset of ("ball", "square")
    min_size: float | None = None          # ball radius / half square side in px; None: 6% of the shorter side
    max_size: float | None = None          # None: 12% of the shorter side (both at least 3 px)
    gravity: float = 2.0                   # frame heights per second^2
    restitution: float = 0.8               # share of normal speed kept at each bounce
    max_speed: float = 1.2                 # largest initial speed, frame heights per second
    drop_probability: float = 0.5          # chance that an object starts at rest (it falls)
    backgrounds: tuple[str, ...] = BACKGROUND_KINDS                     # "solid", "gradient"
    background_colours: tuple[str, ...] = tuple(BACKGROUND_COLOURS)     # names in BACKGROUND_COLOURS
    colours: tuple[str, ...] = tuple(OBJECT_COLOURS)                   # names in OBJECT_COLOURS, one per object
    codec: str = "libx264"                 # mp4 encoder used by write_dataset
    crf: int = 18                          # encoder quality (lower = better)

    def __post_init__(self) -> None:
        self.shapes, self.backgrounds = tuple(self.shapes), tuple(self.backgrounds)
        self.background_colours, self.colours = tuple(self.background_colours), tuple(self.colours)
        for name in ("height", "width", "num_frames", "min_objects", "max_objects"):
            v = getattr(self, name)
            if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1:
                raise ValueError(f"world.{name}: must be a positive integer, got {v!r}")
        if min(self.height, self.width) < 16:
            raise ValueError(f"world.height/width: must be at least 16 px, got {self.height}x{self.width}")
        if not self.fps > 0:
            raise ValueError(f"world.fps: must be > 0, got {self.fps}")
        if self.max_objects < self.min_objects:
            raise ValueError(f"world.max_objects: must be >= min_objects={self.min_objects}, got {self.max_objects}")
        for name, allowed in (("shapes", SHAPES), ("backgrounds", BACKGROUND_KINDS),
                              ("background_colours", tuple(BACKGROUND_COLOURS)), ("colours", tuple(OBJECT_COLOURS))):
            values = getattr(self, name)
            bad = [v for v in values if v not in allowed]
            if not values or bad:
                raise ValueError(f"world.{name}: got {list(values)!r}, accepted values are {', '.join(allowed)}")
        if self.max_objects > len(self.colours):
            raise ValueError(f"world.max_objects: each object needs its own colour, at most {len(self.colours)}, "
                             f"got {self.max_objects}")
        lo, hi = self.size_range
        if lo < MIN_OBJECT_SIZE or hi < lo:
            raise ValueError(f"world.min_size/max_size: need {MIN_OBJECT_SIZE} <= min_size <= max_size, got {lo}, {hi}")
        if 2 * hi > 0.5 * min(self.height, self.width):
            raise ValueError(f"world.max_size: objects must fit a quarter of the frame, at most "
                             f"{0.125 * min(self.height, self.width):g} px, got {hi:g}")
        if not 0 <= self.restitution <= 1:
            raise ValueError(f"world.restitution: must be in [0, 1], got {self.restitution}")
        if not 0 <= self.drop_probability <= 1:
            raise ValueError(f"world.drop_probability: must be in [0, 1], got {self.drop_probability}")
        if self.gravity < 0 or self.max_speed < 0:
            raise ValueError(f"world.gravity/max_speed: must be >= 0, got {self.gravity}, {self.max_speed}")

    @property
    def size_range(self) -> tuple[float, float]:
        short = min(self.height, self.width)
        lo = self.min_size if self.min_size is not None else max(MIN_OBJECT_SIZE, 0.06 * short)
        hi = self.max_size if self.max_size is not None else max(lo, 0.12 * short)
        return float(lo), float(hi)


@dataclass
class Clip:
    frames: np.ndarray          # uint8 [T, H, W, 3] RGB
    caption: str
    trajectories: dict          # see generate_clip
    fps: float = field(default=12.0)


def clip_seed(seed: int, index: int) -> int:
    """Seed of clip `index` of a dataset seeded with `seed` (independent streams, stable across runs)."""
    return int(np.random.SeedSequence([int(seed), int(index)]).generate_state(1, np.uint32)[0])


def _place(rng: np.random.Generator, cfg: WorldConfig, n: int) -> list[Body]:
    lo, hi = cfg.size_range
    bodies: list[Body] = []
    for _ in range(n):
        shape = str(rng.choice(cfg.shapes))
        size = float(rng.uniform(lo, hi))
        for _attempt in range(200):   # rejection sampling of a free spot; a crowded clip just gets fewer objects
            # upper part of the frame, so that falls and bounces have room to happen
            y_max = cfg.height - size if _attempt >= 100 else max(size, 0.7 * cfg.height - size)
            pos = np.array([rng.uniform(size, cfg.width - size), rng.uniform(size, y_max)])
            probe = Body(shape, size + 1.0, pos, np.zeros(2))
            if all(overlap(probe, b) is None for b in bodies):
                break
        else:
            continue
        if rng.random() < cfg.drop_probability:
            vel = np.zeros(2)
        else:
            angle, speed = rng.uniform(0, 2 * np.pi), rng.uniform(0.2, 1.0) * cfg.max_speed * cfg.height
            vel = speed * np.array([np.cos(angle), np.sin(angle)])
        bodies.append(Body(shape, size, pos, vel))
    return bodies


def generate_clip(cfg: WorldConfig, seed: int) -> Clip:
    """Simulate and render one clip. trajectories = {width, height, fps, num_frames, seed, coordinates,
    background{kind, colour, rgb, bottom_rgb}, objects[{id, shape, colour, rgb, radius | size, extent,
    centers [[x, y] per frame]}], events[{frame, kind, objects, speed}]}; ball radius and square side `size`
    in pixels, `extent` = half the width of either shape."""
    rng = np.random.default_rng(seed)
    n = int(rng.integers(cfg.min_objects, cfg.max_objects + 1))
    bodies = _place(rng, cfg, n)
    n = len(bodies)
    colour_names = [str(c) for c in rng.choice(cfg.colours, size=n, replace=False)]
    bg_kind = str(rng.choice(cfg.backgrounds))
    bg_names = [str(c) for c in rng.choice(cfg.background_colours, size=2, replace=len(cfg.background_colours) < 2)]
    bg_top = BACKGROUND_COLOURS[bg_names[0]]
    bg_bottom = BACKGROUND_COLOURS[bg_names[1]] if bg_kind == "gradient" else bg_top
    initial = [tuple(map(float, b.vel)) for b in bodies]
    start_on_floor = [bool(b.pos[1] >= cfg.height - b.size - 1.0) for b in bodies]
    shapes, sizes = [b.shape for b in bodies], [b.size for b in bodies]

    params = PhysicsParams(width=cfg.width, height=cfg.height, gravity=cfg.gravity * cfg.height,
                           restitution=cfg.restitution, event_speed=0.1 * cfg.height)
    centres, events = simulate(bodies, params, cfg.num_frames, cfg.fps)
    rgbs = [OBJECT_COLOURS[c] for c in colour_names]
    frames = render(centres, shapes, sizes, rgbs, background_image(cfg.height, cfg.width, bg_kind, bg_top, bg_bottom))

    lo, hi = cfg.size_range
    names = [_describe(shapes[i], sizes[i], colour_names[i], lo, hi, n) for i in range(n)]
    resting = [bool(np.hypot(*b.vel) < params.event_speed and b.pos[1] >= cfg.height - b.size - 0.5) for b in bodies]
    bg_words = bg_names[0] if bg_kind == "solid" else f"{bg_names[0]} to {bg_names[1]} gradient"
    # A bounce is worth a word when it rises ~5% of the frame (v^2 / 2g); gravity-free worlds use a speed floor.
    caption_speed = max(np.sqrt(2 * params.gravity * 0.05 * cfg.height), 0.2 * cfg.height)
    shown = visible_events(events, caption_speed, min_gap_frames=max(2, round(0.25 * cfg.fps)))
    text = make_caption(names, shapes, initial, shown, resting, bg_words, slow_speed=0.15 * cfg.height,
                        start_on_floor=start_on_floor)

    objects = []
    for i in range(n):
        obj = {"id": i, "shape": shapes[i], "colour": colour_names[i], "rgb": list(rgbs[i])}
        obj.update({"radius": round(sizes[i], 4)} if shapes[i] == "ball" else {"size": round(2 * sizes[i], 4)})
        obj["extent"] = round(sizes[i], 4)
        obj["centers"] = [[round(float(x), 4), round(float(y), 4)] for x, y in centres[:, i]]
        objects.append(obj)
    trajectories = {
        "width": cfg.width, "height": cfg.height, "fps": cfg.fps, "num_frames": cfg.num_frames, "seed": int(seed),
        "coordinates": COORDINATES,
        "gravity_px_per_s2": params.gravity, "restitution": cfg.restitution,
        "background": {"kind": bg_kind, "colour": bg_names[0] if bg_kind == "solid" else bg_names,
                       "rgb": list(bg_top), "bottom_rgb": list(bg_bottom)},
        "objects": objects,
        "events": [{"frame": e.frame, "kind": e.kind, "objects": list(e.objects), "speed": round(e.speed, 3)}
                   for e in events],
    }
    return Clip(frames=frames, caption=text, trajectories=trajectories, fps=cfg.fps)


def _describe(shape: str, size: float, colour: str, lo: float, hi: float, n: int) -> str:
    words = [colour, shape]
    if n > 1 and hi - lo >= 1.0:
        if size < lo + (hi - lo) / 3:
            words.insert(0, "small")
        elif size > lo + 2 * (hi - lo) / 3:
            words.insert(0, "large")
    return " ".join(words)


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _write_clip(out: Path, key: str, cfg: WorldConfig, seed: int, overwrite: bool) -> str:
    paths = [out / f"{key}.{ext}" for ext in ("txt", "json", "mp4")]
    if not overwrite and all(p.exists() for p in paths):
        return key
    clip = generate_clip(cfg, seed)
    _write_text(paths[0], clip.caption + "\n")
    _write_text(paths[1], json.dumps(clip.trajectories))
    write_video(paths[2], clip.frames, cfg.fps, codec=cfg.codec, crf=cfg.crf, threads=1)
    return key


def _write_clip_task(args: tuple) -> str:
    return _write_clip(*args)


def write_dataset(out_dir: str | os.PathLike, num_clips: int, cfg: WorldConfig | None = None, seed: int = 0,
                  split_name: str = "train", overwrite: bool = False, progress: bool = True,
                  num_workers: int = 0) -> list[str]:
    """Write {key}.mp4, {key}.txt (caption) and {key}.json (trajectories) for num_clips clips, key =
    f"{split_name}-{i:06d}"; clip i uses clip_seed(seed, i). Clips already complete are kept unless
    overwrite (the mp4 is written last, so its presence marks a finished clip). Returns the keys.

    Frames, captions and trajectories are always the same for the same seed. The mp4 bytes are too when the
    clips are encoded in a fresh process: the CLI, or num_workers > 0 (new processes, also faster). In a long
    -lived process that has done other work, x264 was seen to produce a different (equally valid) encoding
    about once in a few hundred clips."""
    cfg = cfg or WorldConfig()
    if cfg.height % 2 or cfg.width % 2:
        raise ValueError(f"world.height/width: mp4 (4:2:0) needs even sizes, got {cfg.height}x{cfg.width}")
    if num_clips < 0:
        raise ValueError(f"num_clips: must be >= 0, got {num_clips}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tasks = [(out, f"{split_name}-{i:06d}", cfg, clip_seed(seed, i), overwrite) for i in range(num_clips)]
    bar = dict(total=num_clips, desc=f"synthetic world {split_name}", unit="clip", disable=not progress)
    if num_workers <= 0:
        return [_write_clip(*t) for t in tqdm(tasks, **bar)]
    # spawn, not fork: fresh processes (no torch, clean heap) keep x264's output reproducible
    with mp.get_context("spawn").Pool(num_workers) as pool:
        return list(tqdm(pool.imap(_write_clip_task, tasks, chunksize=4), **bar))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out_dir")
    ap.add_argument("--num-clips", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--split", default="train", help="key prefix, e.g. train or val")
    ap.add_argument("--overwrite", action="store_true")
    ap.add_argument("--workers", type=int, default=0, help="generator processes (0: this one)")
    defaults = WorldConfig()
    for name in ("height", "width", "num_frames", "min_objects", "max_objects", "crf"):
        ap.add_argument(f"--{name.replace('_', '-')}", type=int, default=getattr(defaults, name))
    for name in ("fps", "gravity", "restitution", "max_speed", "drop_probability", "min_size", "max_size"):
        ap.add_argument(f"--{name.replace('_', '-')}", type=float, default=getattr(defaults, name))
    ap.add_argument("--shapes", nargs="+", default=list(defaults.shapes))
    ap.add_argument("--backgrounds", nargs="+", default=list(defaults.backgrounds))
    args = vars(ap.parse_args(argv))
    out_dir, num_clips, seed, split, overwrite, workers = (
        args.pop(k) for k in ("out_dir", "num_clips", "seed", "split", "overwrite", "workers"))
    cfg = WorldConfig(**args)
    keys = write_dataset(out_dir, num_clips, cfg, seed, split_name=split, overwrite=overwrite, num_workers=workers)
    print(json.dumps({"out_dir": str(out_dir), "clips": len(keys), "config": asdict(cfg)}, default=list))


if __name__ == "__main__":
    main()
