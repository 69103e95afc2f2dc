#!/usr/bin/env python
"""Time and memory of a shortcut_distill step against a flow-matching step of the same model, through the entry
points users run (python -m magi_train.distill / magi_train.train), printed as a table.

    python scripts/bench_distill.py --preset 4.5B --layers 4 --frames 24 --height 60 --width 104 --steps 4

The teacher is a checkpoint of the same shape with seeded random weights (timing needs no trained weights),
written first; the student starts from it. Synthetic latents of frames x height x width (24 x 60 x 104 latent =
96 frames at 480x832 px = 37,440 tokens for patch 2). Steady state: the mean over the steps after the first two.
Left out: data loading (synthetic, in memory), checkpoint writes and export (switched off)."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def write_teacher(preset: str, layers: int, out: Path) -> Path:
    import torch

    from magi_train.config import model_preset
    from magi_train.model import build_dit
    from magi_train.checkpoint.magi_format import save_magi_checkpoint

    cfg = model_preset(preset, num_layers=layers, params_dtype="float32")
    torch.manual_seed(0)
    model = build_dit(cfg)
    with torch.no_grad():   # the release's final linear starts at zero; give the teacher a non-zero output
        model.final_linear.linear.weight.normal_(0, 0.02)
    save_magi_checkpoint(model, out)
    return out


def run(module: str, keys: list[str], out: Path, name: str) -> list[dict]:
    cmd = [sys.executable, "-m", module, *keys, f"output_dir={out}", f"name={name}"]
    proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "WANDB_MODE": "disabled"}, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"{name} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    lines = [json.loads(x) for x in (out / name / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return [m for m in lines if "step_time_s" in m]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="4.5B")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--frames", type=int, default=24)
    ap.add_argument("--height", type=int, default=60)
    ap.add_argument("--width", type=int, default=104)
    ap.add_argument("--text-length", type=int, default=256)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--activation-checkpointing", action="store_true")
    ap.add_argument("--attention-backend", default="auto", help="model.attention_backend (auto: the device's fastest "
                    "exact backend, the default users get)")
    ap.add_argument("--extra", nargs="*", default=[], help="more key=value overrides for both runs")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        teacher = write_teacher(args.preset, args.layers, tmp / "teacher")
        common = [f"model={args.preset}", f"model.num_layers={args.layers}", "data=synthetic",
                  f"data.latent_frames={args.frames}", f"data.latent_height={args.height}",
                  f"data.latent_width={args.width}", f"data.text_length={args.text_length}", "data.batch_size=1",
                  f"train.max_steps={args.steps}", "train.log_every=1", f"train.device={args.device}",
                  "train.progress_bar=false", "train.checkpoint.every_steps=0", "train.checkpoint.save_at_end=false",
                  "train.checkpoint.export_at_end=false", "train.validation.every_steps=0", "train.ema.enabled=false",
                  f"train.recompute={'full' if args.activation_checkpointing else 'none'}",
                  f"model.attention_backend={args.attention_backend}",
                  f"train.init_from={teacher}", *args.extra]
        tokens = (args.frames) * (args.height // 2) * (args.width // 2)
        print(f"{args.preset}-shaped blocks x {args.layers} layers, {tokens} tokens a sample, batch 1, "
              f"activation checkpointing {'on' if args.activation_checkpointing else 'off'}, attention backend "
              f"{args.attention_backend}, {args.steps} steps")
        print("| objective | step time (s) | peak memory (GiB) | time vs flow matching |")
        print("| --- | --- | --- | --- |", flush=True)
        # the distillation step first: a run cut short by a time limit still has the figure it is for
        rows = {}
        for label, module, keys in [
            ("shortcut_distill (cfg 3 teacher, student target)", "magi_train.distill", [f"distill.teacher={teacher}"]),
            ("flow_matching", "magi_train.train", []),
        ]:
            ms = run(module, [*common, *keys], tmp, label.split()[0])
            steady = ms[2:] or ms[-1:]
            rows[label] = (sum(m["step_time_s"] for m in steady) / len(steady), max(m["peak_mem_gib"] for m in ms))
            t, mem = rows[label]
            ratio = f"{t / rows['flow_matching'][0]:.2f}x" if "flow_matching" in rows else "(below)"
            print(f"| {label} | {t:.3f} | {mem:.1f} | {ratio} |", flush=True)
        t_fm, t_sd = rows["flow_matching"][0], rows["shortcut_distill (cfg 3 teacher, student target)"][0]
        print(f"shortcut_distill / flow_matching step time: {t_sd / t_fm:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
