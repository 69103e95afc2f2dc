"""One cell of a sweep: a checkpoint x sampler settings, continuing every held-out clip (V2V) and scoring it.

A cell lives in {sweep_dir}/cells/{name}/, its name made from the settings that define it (checkpoint, sampler
keys, run-time keys, clips, inference config content). Everything is written into a staging directory beside it
(.stage-{name}-{pid}) and renamed into place at the end, so a cell directory exists only when complete: a rerun
of the sweep skips complete cells and redoes the others, discarding their half-written staging directories.

Files of a cell: cell.json (settings, checkpoint and its training step, per-clip scores, means with 95%
intervals, timing, the copy-last-frame baseline and the truth scored as a prediction, FVD), per_clip.csv, and clip{i}.mp4 (prefix + continuation) for the
first `videos` clips."""
from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import re
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import yaml
from tqdm import tqdm

from magi_train.data.video_codec import write_video
from magi_train.evaluation import copy_last_frame, mean_ci95, physics_iq_scores, score_continuation
from magi_train.evaluation.image_metrics import psnr_per_frame, ssim_per_frame

from .checkpoints import check_fits, resolve_checkpoint, training_weights
from .clips import EvalClip, load_clips, scratch_dir
from .config import EvalConfig

log = logging.getLogger("magi_eval")
CELL_FILE = "cell.json"
FAULT_STALL_CELL = "MAGI_FAULT_STALL_CELL"   # tests: stall before renaming the cell whose name contains this


def cell_settings(cfg: EvalConfig) -> dict:
    """What defines a cell (its name hashes this)."""
    infer_file = Path(cfg.infer_config)
    if not infer_file.is_file():
        raise FileNotFoundError(f"infer_config: {cfg.infer_config} does not exist")
    return {"checkpoint": str(Path(cfg.checkpoint).expanduser().resolve()),
            "sampler": cfg.sampler_overrides(), "infer_overrides": list(cfg.infer_overrides),
            "clips": {"kind": cfg.clips.kind, "path": str(Path(cfg.clips.path).expanduser().resolve()),
                      "max_clips": cfg.clips.max_clips, "prefix_frames": cfg.clips.prefix_frames,
                      "num_frames": cfg.clips.num_frames},
            "infer_config": str(infer_file.resolve()),
            "infer_config_sha1": hashlib.sha1(infer_file.read_bytes()).hexdigest()}


def cell_name(settings: dict) -> str:
    digest = hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:8]
    ckpt = Path(settings["checkpoint"])
    parts = [f"{ckpt.parent.name}-{ckpt.name}" if ckpt.parent.name in ("export", "checkpoints") else ckpt.name]
    parts += [f"{k}-{v}" for k, v in settings["sampler"].items()] + list(settings["infer_overrides"])
    slug = re.sub(r"[^A-Za-z0-9.=-]+", "_", "_".join(parts))[:80]
    return f"{slug}_{digest}"


def is_complete(cell_dir: Path) -> bool:
    return (cell_dir / CELL_FILE).is_file()


def run_cell(cfg: EvalConfig) -> Path:
    """Run (or skip, when complete) the cell cfg describes; returns its directory."""
    settings = cell_settings(cfg)
    name = cell_name(settings)
    cells = Path(cfg.sweep_dir) / "cells"
    final = cells / name
    if is_complete(final):
        print(f"[magi_eval] cell {name}: complete, skipped", flush=True)
        return final
    if not cfg.in_shard(name):
        print(f"[magi_eval] cell {name}: shard {cfg.shard} leaves it to another process", flush=True)
        return final
    ckpt = resolve_checkpoint(cfg.checkpoint)
    from magi_infer.config import load_infer_config

    P, F = cfg.clips.prefix_frames, cfg.clips.num_frames
    infer = load_infer_config(cfg.infer_config, {**_pairs(cfg.infer_overrides),
                                                 **{f"sampler.{k}": v for k, v in settings["sampler"].items()},
                                                 "load": str(ckpt.path) if ckpt.kind == "magi" else None,
                                                 "prefix_frames": P, "num_frames": F})
    check_fits(ckpt, infer.model, cfg.infer_config)
    runner, rank, env = _build_runner(infer, ckpt, cfg.infer_config)
    try:
        with scratch_dir() as scratch:
            clips = load_clips(cfg.clips, infer.fps, infer.video_size_w, infer.video_size_h, Path(scratch))
            if rank != 0:   # parallel layouts: every rank runs the forwards, rank 0 decodes, scores and writes
                for clip in clips:
                    for _ in runner.generator("v2v", [clip.caption], prefix_video_path=str(clip.prefix_video)):
                        pass
                return final
            return _score_and_write(cfg, settings, name, ckpt, infer, runner, clips, cells, final)
    finally:
        if env is not None:
            from magi_train.parallel.env import destroy_parallel

            destroy_parallel(env)


def _pairs(items: list[str]) -> dict:
    out = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"infer_overrides: expected key=value, got {item!r}")
        k, v = item.split("=", 1)
        out[k.strip()] = yaml.safe_load(v)
    return out


def _build_runner(infer, ckpt, infer_config: str):
    """magi_infer's runner on the cell's weights: a MAGI-1 directory through magi_infer's `load`, a training
    checkpoint (DCP) as whole tensors handed to the same builder (any tp/cp/pp layout under torchrun)."""
    from magi_infer.distributed import needs_parallel, setup_parallel, single_process_env
    from magi_infer.model_build import build_inference_dit
    from magi_infer.runner import MagiRunner, resolve_device, resolve_dtype
    from magi_train.checkpoint.magi_format import CheckpointMismatch

    model, rank, env = None, 0, None
    try:
        full_state = training_weights(infer.model, ckpt)[0] if ckpt.kind == "training" else None
        if needs_parallel(infer):
            env = setup_parallel(infer)
            rank = env.rank
            if infer.device == "auto":
                infer.device = str(env.device)
            model = build_inference_dit(infer, env, resolve_dtype(infer, env.device), full_state=full_state)
        elif full_state is not None:
            device = resolve_device(infer)
            model = build_inference_dit(infer, single_process_env(device), resolve_dtype(infer, device),
                                        full_state=full_state)
        return MagiRunner(infer, model=model), rank, env
    except CheckpointMismatch as e:
        raise ValueError(f"checkpoint: {ckpt.path} does not fit the model of {infer_config} ({e})") from None


def _generate(runner, clip: EvalClip, num_frames: int) -> tuple[np.ndarray, dict]:
    gen = runner.generator("v2v", [clip.caption], prefix_video_path=str(clip.prefix_video))
    parts, chunk_seconds = [], []
    last = start = time.perf_counter()
    for _, pixels in runner.frames(gen):
        parts.append(pixels)
        now = time.perf_counter()
        chunk_seconds.append(now - last)
        last = now
    frames = np.concatenate(parts)[:num_frames]
    return frames, {"seconds": last - start, "chunks": len(chunk_seconds), "forwards": gen.forwards,
                    "frames": len(frames)}


def score_clip(clip: EvalClip, pred: np.ndarray) -> dict[str, float]:
    """Every metric the clip supports: PSNR/SSIM always, trajectory error with trajectories, Physics-IQ with take 2."""
    if clip.trajectories is not None:
        s = score_continuation(pred, clip.truth, clip.trajectories, first_frame=clip.trajectory_first_frame)
        out = s.summary()
    else:
        out = {"psnr": float(np.mean(psnr_per_frame(pred, clip.truth))),
               "ssim": float(np.mean(ssim_per_frame(pred, clip.truth)))}
    if clip.take2 is not None:
        out.update(physics_iq_scores(pred, clip.truth, clip.take2).summary())
    return out


def summarise(rows: list[dict[str, float]]) -> dict[str, dict[str, float]]:
    out = {}
    for k in rows[0]:
        mean, ci = mean_ci95([r[k] for r in rows])
        out[k] = {"mean": mean, "ci95": ci}
    return out


def _score_and_write(cfg, settings, name, ckpt, infer, runner, clips, cells: Path, final: Path) -> Path:
    cells.mkdir(parents=True, exist_ok=True)
    for stale in cells.glob(f".stage-{name}-*"):      # a killed earlier attempt of this cell
        shutil.rmtree(stale, ignore_errors=True)
    stage = cells / f".stage-{name}-{os.getpid()}"
    stage.mkdir()
    F = cfg.clips.num_frames
    rows, baseline, floor, timing, preds = [], [], [], [], []
    bar = tqdm(clips, desc=f"cell {name[:40]}", unit="clip", disable=not cfg.progress, leave=False, position=1,
               file=sys.stderr)
    for i, clip in enumerate(bar):
        pred, t = _generate(runner, clip, F)
        rows.append(score_clip(clip, pred))
        baseline.append(score_clip(clip, copy_last_frame(clip.prefix, F)))
        floor.append(score_clip(clip, clip.truth))
        timing.append(t)
        preds.append(pred)
        if i < cfg.videos:
            write_video(stage / f"clip{i}.mp4", np.concatenate([clip.prefix, pred]), infer.fps)
            write_video(stage / f"clip{i}_truth.mp4", np.concatenate([clip.prefix, clip.truth]), infer.fps)
    bar.close()
    chunks = sum(t["chunks"] for t in timing)
    seconds = sum(t["seconds"] for t in timing)
    record = {
        "name": name, "settings": settings, "checkpoint": str(ckpt.path), "checkpoint_label": ckpt.label,
        "training_step": ckpt.step,
        "sampler": {k: _plain(getattr(infer.sampler, k)) for k in vars(infer.sampler)},
        "clips": [c.name for c in clips], "per_clip": rows, "metrics": summarise(rows),
        "baseline_copy_last_frame": summarise(baseline),
        "ground_truth": summarise(floor),   # the truth scored as a prediction: the metrics' own floor (tracker error)
        "forwards_per_chunk": sum(t["forwards"] for t in timing) / chunks,
        "seconds_per_chunk": seconds / chunks, "frames_per_second": sum(t["frames"] for t in timing) / seconds,
        "fvd": _fvd(cfg, clips, preds), "finished": time.time(),
    }
    with open(stage / "per_clip.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["clip", *rows[0]])
        w.writerows([[c.name, *(f"{v:.6g}" for v in r.values())] for c, r in zip(clips, rows)])
    (stage / CELL_FILE).write_text(json.dumps(record, indent=1))
    stall = os.environ.get(FAULT_STALL_CELL)
    if stall and stall in name:
        (cells / f"stalled_{name}").write_text(str(os.getpid()))
        time.sleep(600)
    try:
        os.rename(stage, final)
    except OSError:   # another process completed the same cell first: keep its result
        shutil.rmtree(stage, ignore_errors=True)
    m = record["metrics"]
    print(f"[magi_eval] cell {name}: " + ", ".join(f"{k} {v['mean']:.4g}" for k, v in m.items()) +
          f" | {record['seconds_per_chunk']:.2f} s/chunk, {record['forwards_per_chunk']:.1f} forwards/chunk", flush=True)
    return final


def _plain(v):
    return list(v) if isinstance(v, (list, tuple)) else v


def _fvd(cfg: EvalConfig, clips: list[EvalClip], preds: list[np.ndarray]):
    if not cfg.fvd.i3d_path:
        return None
    from magi_train.evaluation.fvd import I3DFeatures, fvd

    return fvd([c.truth for c in clips], preds, I3DFeatures(cfg.fvd.i3d_path))


__all__ = ["run_cell", "cell_settings", "cell_name", "is_complete", "score_clip", "CELL_FILE", "FAULT_STALL_CELL"]
