#!/usr/bin/env python
"""The embedded default, end to end, through the project's real entry points:

  1. synthetic physics world (train + held-out clips)      python -m data_tools.synthetic_world
  2. webdataset shards                                       python -m data_tools.make_shards
  3. patch VAE: 4x4 RGB blocks onto 12 principal components python scripts/train_vae.py --architecture patch
  4. latents + caption embeddings (offline hash encoder)     python -m data_tools.precompute
  5. tiny DiT trained with experiment=quickstart             python -m magi_train.train
  6. T2V from a caption, V2V continuation of a held-out clip python -m magi_infer
  7. V2V evaluation vs copy-last-frame                       python -m magi_eval
  8. a PNG strip (truth | model | copy-last-frame) and the T2V object check (captions of 4 held-out clips)

Every budget counts steps and samples, never seconds, and each process runs one thread (training: two, data
parallel), so a busy machine trains the same thing as an idle one. The world's mp4s are lossless (x264 at crf 0):
x264 does not write the same bytes on every run, but lossless clips decode to the same frames whatever bytes it
chose (docs/quickstart.md). Every
stage whose output already exists is skipped, so a crashed run continues where it stopped. What was tried and
measured: docs/quickstart.md.
    python scripts/quickstart.py [--run-dir runs/quickstart] [--long | --fast] [--max-objects 1|2|3]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

PY = sys.executable
ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Budget:
    train_clips: int
    val_clips: int
    dit_steps: int
    eval_clips: int
    sampler_steps: int
    batch_size: int = 8


BUDGETS = {
    "fast": Budget(train_clips=32, val_clips=2, dit_steps=8, eval_clips=2, sampler_steps=4, batch_size=4),
    "default": Budget(train_clips=768, val_clips=16, dit_steps=2400, eval_clips=16, sampler_steps=16),
    "long": Budget(train_clips=3000, val_clips=16, dit_steps=7200, eval_clips=16, sampler_steps=16),
}
# One thread in every stage. The count changes float sums (1e-8 in the weights after 6 steps at 1 vs 2 threads),
# so it is fixed for the same weights on every machine; and this model's tensors are so small that on a busy
# machine a second thread only spin-waits (precompute ran 8x slower with two, measured in docs/quickstart.md).
THREADS = 1
# Training runs data parallel over TRAIN_PROCESSES processes of one thread each (torchrun, gloo; data.batch_size is
# per process, so the global batch stays Budget.batch_size): both cores of the reference machine, 1.5-1.7x the
# samples per second of one process (not 2x: the all-reduce and shared caches, docs/quickstart.md). A sum over two
# ranks is commutative, so the weights are the same on every run.
TRAIN_PROCESSES = 2
# crf 0: lossless, so the decoded clips (and all that is computed from them) are the same on every run
WORLD = ["--height", "32", "--width", "32", "--num-frames", "24", "--fps", "8", "--crf", "0"]
# One object a clip: it falls, bounces off the floor and walls, and the tiny model learns that within the budget
# (trajectory error 0.2-0.5x copy-last-frame's). With two or three objects in the 32x32 box they collide every few
# frames, and on those clips the same model is no better than copying (0.9-1.4x; more steps did not change it):
# --max-objects 2 or 3 trains and scores that harder world (docs/quickstart.md, sixth pass).
MAX_OBJECTS = 1


def world_args(max_objects: int = MAX_OBJECTS) -> list[str]:
    return [*WORLD, "--max-objects", str(max_objects)]


FPS, PREFIX, FUTURE = 8, 12, 12
VAE_FACTOR = 4          # 32x32 px -> 8x8 latent cells of 4x4 RGB blocks
VAE_CHANNELS = 12       # their top principal components (experiment=quickstart in_channels): 33 dB, docs/quickstart.md
# MAGI-1's context guidance below t = 0.3 (its cfg_t_range bins): v_alone + k (v_with_context - v_alone), k by the
# world's objects a clip. On the one-object world the model uses its context well: its weights give 2.35 px at k = 1,
# 2.05 at 2, 2.26 at 3 and 3.22 at 7 (mean of 3 sampler seeds). With collisions the model's context signal is weak
# and the 1-3 object world needs 7: 13.9 px at 1, 6.2 at 5, 5.6 at 7, 5.8 at 10 (docs/quickstart.md)
CONTEXT_GUIDANCE = {1: 2.0, 2: 7.0, 3: 7.0}


def prev_chunk_scales(max_objects: int) -> list[float]:
    k = CONTEXT_GUIDANCE[max_objects]
    return [k, k, k, 1.0, 1.0]


STRIP_CLIPS = 4         # held-out clips shown in the PNG strip
# T2V from the captions of this many held-out clips, the check over all: one video is one sample, and one prompt's
# sample says little (--long's weights drew the first prompt's object in 8% of frames, 7 others' in 96-100%)
T2V_PROMPTS = 4


CPU_SECONDS: dict[str, float] = {}   # per stage: what it would take alone on the machine (one thread each)


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def stage(name: str, done: Path | None, cmd: list[str], timings: dict, env=None) -> None:
    if done is not None and done.exists():
        print(f"[quickstart] {name}: already done ({done})", flush=True)
        timings[name] = 0.0
        return
    print(f"[quickstart] {name}: {' '.join(cmd)}", flush=True)
    threads_env = {k: str(THREADS) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    t0, cpu0 = time.perf_counter(), _children_cpu()
    proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, **threads_env, **(env or {})})
    timings[name] = time.perf_counter() - t0
    CPU_SECONDS[name] = _children_cpu() - cpu0
    if proc.returncode != 0:
        sys.exit(f"[quickstart] {name} failed with exit code {proc.returncode}; rerun the same command to continue")


def train_launcher() -> list[str]:
    if TRAIN_PROCESSES == 1:
        return [PY]
    return [PY, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={TRAIN_PROCESSES}"]


def latest_export(run: Path) -> Path:
    exports = sorted((run / "dit" / "export").glob("step_*"))
    if not exports:
        sys.exit(f"[quickstart] no exported weights under {run / 'dit' / 'export'}")
    return exports[-1]


def write_infer_config(run: Path, weights: Path, steps: int, max_objects: int) -> Path:
    """Run-time keys as MAGI-1 users know them, for the tiny model of experiment=quickstart."""
    from magi_train.training.config_loading import load_config

    model = load_config(["experiment=quickstart", f"data.shards={run}"]).model
    cfg = {
        "model_config": {k: getattr(model, k) for k in (
            "num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups", "kv_channels",
            "in_channels", "out_channels", "caption_channels", "caption_max_length", "chunk_width",
            "patch_size", "t_patch_size", "attention_backend")},
        "runtime_config": {
            "seed": 1234, "video_size_h": 32, "video_size_w": 32, "num_frames": FUTURE, "fps": FPS,
            "num_steps": steps, "window_size": 2, "chunk_width": model.chunk_width, "cfg_number": 3,
            "text_scales": [3.0, 3.0, 3.0, 0.0, 0.0], "prev_chunk_scales": prev_chunk_scales(max_objects),
            "noise2clean_kvrange": [], "clean_chunk_kvrange": -1, "shift": 3.0,
            "load": str(weights), "vae_pretrained": str(run / "vae"), "temporal_downsample_factor": 1,
            "prefix_frames": PREFIX,
        },
    }
    path = run / "infer.json"
    path.write_text(json.dumps(cfg, indent=1))
    return path


def vae_command(clips: Path, out: Path) -> list[str]:
    """The latent space: 4x4 RGB blocks less the clips' mean, onto their top VAE_CHANNELS principal components,
    scaled to unit std (no network to train; a conv VAE trained for 75 s lost the objects under load)."""
    return [PY, "scripts/train_vae.py", "--data", str(clips), "--out", str(out), "--architecture", "patch",
            "--latent-channels", str(VAE_CHANNELS), "--spatial-factor", str(VAE_FACTOR), "--val-clips", "4",
            "--no-progress"]


def write_png_strip(cell_dir: Path, out: Path, clips: int) -> Path:
    """quickstart.png from the evaluation cell's videos: rows truth | model | copy-last-frame per clip."""
    import numpy as np

    from magi_train.data.video_codec import read_video
    from magi_train.evaluation import copy_last_frame
    from magi_train.evaluation.png_strip import write_strip

    rows = []
    for i in range(clips):
        model, truth = (read_video(cell_dir / name)[0] for name in (f"clip{i}.mp4", f"clip{i}_truth.mp4"))
        copy = np.concatenate([truth[:PREFIX], copy_last_frame(truth[:PREFIX], len(truth) - PREFIX)])
        rows.append((truth, model[:len(truth)], copy))
    return write_strip(out, rows, prefix_frames=PREFIX, every=2)


def t2v_presence(frames_dir: Path, trajectories: Path):
    """(object_presence of one T2V video's PNG frames for the colours its clip's trajectory json names, the frames
    [T, H, W, 3] uint8)."""
    import numpy as np
    from PIL import Image

    from data_tools.world_tracker import object_presence

    frames = np.stack([np.asarray(Image.open(p).convert("RGB")) for p in sorted(frames_dir.glob("frame_*.png"))])
    return object_presence(frames, [o["rgb"] for o in json.loads(trajectories.read_text())["objects"]]), frames


def t2v_check(videos: list[tuple[Path, Path]], strip: Path) -> dict:
    """Share of the T2V frames holding an object of a colour the prompt names and how far it travels, per
    (frames_dir, trajectories json) of a prompt and their mean, on the lossless PNG frames magi_infer dumps (the
    mp4's x264 bytes vary between runs; the PNGs do not); the frames also go to a PNG strip, a row per prompt."""
    import numpy as np

    from magi_train.evaluation.png_strip import write_strip

    rows, per_prompt = [], []
    for frames_dir, trajectories in videos:
        presence, frames = t2v_presence(frames_dir, trajectories)
        rows.append((frames,))
        per_prompt.append(presence)
    write_strip(strip, rows, prefix_frames=1, every=2, labels=["T2V"])
    out = {k: float(np.mean([r[k] for r in per_prompt])) for k in ("frames_with_object", "travel_px", "pixels")}
    return {**out, "per_prompt": per_prompt}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run-dir", default="runs/quickstart")
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--long", action="store_true",
                   help="4x the clips and 3x the steps (~25 minutes on 2 cores, docs/quickstart.md)")
    g.add_argument("--fast", action="store_true", help="a minute-long smoke run of every stage (tests)")
    ap.add_argument("--max-objects", type=int, default=MAX_OBJECTS, choices=sorted(CONTEXT_GUIDANCE),
                    help=f"objects a clip are drawn from 1 to this (default {MAX_OBJECTS}; 2-3 collide: docs/quickstart.md)")
    args = ap.parse_args(argv)
    b = BUDGETS["long" if args.long else "fast" if args.fast else "default"]
    run = Path(args.run_dir).resolve()
    run.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    t_start = time.perf_counter()

    world, world_cli = run / "world", world_args(args.max_objects)
    # finished stages are skipped on a rerun, so a run directory keeps the world it was made with
    made_with = world / "world_args.json"
    earlier = json.loads(made_with.read_text()) if made_with.exists() else world_cli
    if earlier != world_cli:
        sys.exit(f"[quickstart] --max-objects {args.max_objects}: {run} holds a world made with "
                 f"{' '.join(earlier)}; use another --run-dir")
    world.mkdir(exist_ok=True)
    made_with.write_text(json.dumps(world_cli))
    stage("world/train", world / "train" / f"train-{b.train_clips - 1:06d}.mp4",
          [PY, "-m", "data_tools.synthetic_world", str(world / "train"), "--num-clips", str(b.train_clips),
           "--seed", "0", "--split", "train", *world_cli], timings)
    stage("world/val", world / "val" / f"val-{b.val_clips - 1:06d}.mp4",
          [PY, "-m", "data_tools.synthetic_world", str(world / "val"), "--num-clips", str(b.val_clips),
           "--seed", "1", "--split", "val", *world_cli], timings)
    shards = run / "shards"
    for split in ("train", "val"):
        stage(f"shards/{split}", shards / f"raw_{split}" / "report.json",
              [PY, "-m", "data_tools.make_shards", str(world / split), str(shards / f"raw_{split}"),
               "--max-samples-per-shard", "256"], timings)
    stage("vae", run / "vae" / "config.json", vae_command(world / "train", run / "vae"), timings)
    for split in ("train", "val"):
        stage(f"precompute/{split}", shards / f"latent_{split}" / "DONE",
              [PY, "-m", "data_tools.precompute", str(shards / f"raw_{split}"), str(shards / f"latent_{split}"),
               "--vae-kind", "small", "--vae-path", str(run / "vae"), "--text-kind", "hash"], timings)
        (shards / f"latent_{split}" / "DONE").touch()
    stage("train", run / "dit" / "export",
          [*train_launcher(), "-m", "magi_train.train", "experiment=quickstart", f"output_dir={run}", "name=dit",
           f"data.shards={shards / 'latent_train'}", f"data.val_shards={shards / 'latent_val'}",
           f"train.max_steps={b.dit_steps}", f"data.batch_size={b.batch_size // TRAIN_PROCESSES}",
           f"parallel.dp={TRAIN_PROCESSES}", "parallel.dp_mode=ddp",
           "train.checkpoint.every_steps=" + str(max(b.dit_steps // 3, 1)),
           "train.validation.every_steps=" + str(max(b.dit_steps // 3, 1))], timings,
          env={"WANDB_MODE": os.environ.get("WANDB_MODE", "offline")})
    infer_cfg = write_infer_config(run, latest_export(run), b.sampler_steps, args.max_objects)
    videos = run / "videos"
    videos.mkdir(exist_ok=True)
    prompt = (world / "val" / "val-000000.txt").read_text().strip()
    t2v_videos = []
    for k in range(min(T2V_PROMPTS, b.val_clips)):   # the first is videos/t2v.mp4, from the V2V clip's caption
        tag = "" if k == 0 else f"_{k}"
        stage(f"infer/t2v{tag}", None,
              [PY, "-m", "magi_infer", "--config_file", str(infer_cfg), "--mode", "t2v",
               "--prompt", (world / "val" / f"val-{k:06d}.txt").read_text().strip(),
               "--output_path", str(videos / f"t2v{tag}.mp4"), "num_frames=24",
               f"frames_dir={videos / f't2v_frames{tag}'}"], timings)
        t2v_videos.append((videos / f"t2v_frames{tag}", world / "val" / f"val-{k:06d}.json"))
    stage("infer/v2v", None,
          [PY, "-m", "magi_infer", "--config_file", str(infer_cfg), "--mode", "v2v", "--prompt", prompt,
           "--prefix_video_path", str(world / "val" / "val-000000.mp4"),
           "--output_path", str(videos / "v2v_val-000000.mp4")], timings)
    stage("evaluate", None,
          [PY, "-m", "magi_eval", f"checkpoint={latest_export(run)}", f"infer_config={infer_cfg}",
           f"clips.path={world / 'val'}", f"clips.prefix_frames={PREFIX}", f"clips.num_frames={FUTURE}",
           f"clips.max_clips={b.eval_clips}", f"sweep_dir={run / 'eval'}", f"videos={min(STRIP_CLIPS, b.eval_clips)}",
           "progress=false"], timings)

    # the newest cell of these weights: a rerun with other sampler settings adds a cell beside the old ones
    cell_dir = max((d for d in (run / "eval" / "cells").glob("[!.]*") if (d / "cell.json").exists() and
                    json.loads((d / "cell.json").read_text())["checkpoint"] == str(latest_export(run).resolve())),
                   key=lambda d: (d / "cell.json").stat().st_mtime_ns)
    cell = json.loads((cell_dir / "cell.json").read_text())
    summary = {m: {k: v["mean"] for k, v in cell[key].items()} for m, key in
               (("model", "metrics"), ("copy_last_frame", "baseline_copy_last_frame"), ("ground_truth", "ground_truth"))}
    strip = write_png_strip(cell_dir, run / "quickstart.png", min(STRIP_CLIPS, b.eval_clips))
    t2v = t2v_check(t2v_videos, videos / "t2v.png")
    total = time.perf_counter() - t_start
    report = {"run_dir": str(run), "seconds_total": round(total, 1),
              "seconds_per_stage": {k: round(v, 1) for k, v in timings.items()},
              "cpu_seconds_per_stage": {k: round(v, 1) for k, v in CPU_SECONDS.items()},
              "videos": sorted(str(p) for p in videos.glob("*.mp4")) + sorted(str(p) for p in (run / "eval").glob("*.mp4")),
              "scores": summary, "scores_csv": str(run / "eval" / "results.csv"),
              "plot": str(run / "eval" / "grid.png"), "strip": str(strip), "t2v": t2v,
              "weights": str(latest_export(run))}
    (run / "summary.json").write_text(json.dumps(report, indent=1))
    print("\n==================== quickstart summary ====================")
    print(f"run directory     {run}")
    print(f"total time        {total:.0f} s  (training {timings.get('train', 0):.0f} s); CPU time of the stages "
          f"{sum(CPU_SECONDS.values()):.0f} s (the wall time on an idle machine: one thread each)")
    for v in report["videos"]:
        print(f"video             {v}")
    print(f"scores            {report['scores_csv']}   plot {report['plot']}")
    print(f"strip             {strip}  (rows truth | model | copy-last-frame)   T2V {videos / 't2v.png'}")
    shares = " ".join(f"{r['frames_with_object']:.0%}" for r in t2v["per_prompt"])
    print(f"t2v               object in {t2v['frames_with_object']:.0%} of frames ({shares} for the {len(t2v_videos)} "
          f"prompts), moves {t2v['travel_px']:.1f} px "
          f"(colours of the prompt's objects)")
    print((run / "eval" / "results.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
